//! Daily and hourly request quotas per connector.
//!
//! Windows are calendar windows in UTC (the hour, the day), as partners
//! count them. Every request that reaches the partner counts. When a window
//! is spent, nothing more is sent until the next one starts: records wait,
//! none is dropped. Crossing `alert_at` of a window raises one warning per
//! window.

use std::time::Duration;

use serde::Serialize;

use crate::clock::Timestamp;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// `quota = { per_day, per_hour, alert_at = 0.75 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QuotaPolicy {
    pub per_day: Option<u64>,
    pub per_hour: Option<u64>,
    pub alert_at: f64,
}

/// Which window a figure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    Hour,
    Day,
}

impl Window {
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Hour => "hour",
            Window::Day => "day",
        }
    }

    /// Start of the window holding `t`.
    pub fn start(self, t: Timestamp) -> Timestamp {
        let size = self.size_ms();
        Timestamp::from_millis(t.as_millis().div_euclid(size) * size)
    }

    fn size_ms(self) -> i64 {
        match self {
            Window::Hour => HOUR_MS,
            Window::Day => DAY_MS,
        }
    }

    fn end(self, t: Timestamp) -> Timestamp {
        Timestamp::from_millis(self.start(t).as_millis() + self.size_ms())
    }
}

/// A window's use crossed the alert threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QuotaAlert {
    pub window: Window,
    pub used: u64,
    pub limit: u64,
}

/// Requests used in the current windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuotaUsage {
    pub hour_start: Timestamp,
    pub hour: u64,
    pub day_start: Timestamp,
    pub day: u64,
}

impl QuotaUsage {
    /// Use as loaded from the journal for the windows holding `now`.
    pub fn at(now: Timestamp, hour: u64, day: u64) -> QuotaUsage {
        QuotaUsage { hour_start: Window::Hour.start(now), hour, day_start: Window::Day.start(now), day }
    }

    fn roll(&mut self, now: Timestamp) {
        if Window::Hour.start(now) != self.hour_start {
            self.hour_start = Window::Hour.start(now);
            self.hour = 0;
        }
        if Window::Day.start(now) != self.day_start {
            self.day_start = Window::Day.start(now);
            self.day = 0;
        }
    }

    /// How many of `wanted` requests may go now, or how long until any may.
    pub fn admit(&mut self, policy: &QuotaPolicy, wanted: usize, now: Timestamp) -> Result<usize, Duration> {
        self.roll(now);
        let left = |limit: Option<u64>, used: u64| limit.map_or(u64::MAX, |l| l.saturating_sub(used));
        let hour_left = left(policy.per_hour, self.hour);
        let day_left = left(policy.per_day, self.day);
        if day_left == 0 {
            return Err(Window::Day.end(now).since(now));
        }
        if hour_left == 0 {
            return Err(Window::Hour.end(now).since(now));
        }
        Ok(usize::try_from(hour_left.min(day_left)).unwrap_or(usize::MAX).min(wanted))
    }

    /// Counts `n` sent requests; returns the windows whose alert threshold this crossed.
    pub fn record(&mut self, policy: &QuotaPolicy, n: u64, now: Timestamp) -> Vec<QuotaAlert> {
        self.roll(now);
        let mut alerts = Vec::new();
        for (window, limit, used) in
            [(Window::Hour, policy.per_hour, &mut self.hour), (Window::Day, policy.per_day, &mut self.day)]
        {
            let before = *used;
            *used = used.saturating_add(n);
            if let Some(limit) = limit {
                let threshold = (limit as f64 * policy.alert_at).ceil() as u64;
                if before < threshold && *used >= threshold {
                    alerts.push(QuotaAlert { window, used: *used, limit });
                }
            }
        }
        alerts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-23T12:00:00Z
    const T0: Timestamp = Timestamp::from_secs(1_795_435_200);

    fn policy() -> QuotaPolicy {
        QuotaPolicy { per_day: Some(100), per_hour: Some(10), alert_at: 0.75 }
    }

    #[test]
    fn windows_are_utc_calendar_hours_and_days() {
        let t = T0.plus(Duration::from_secs(3 * 60 + 7));
        assert_eq!(Window::Hour.start(t), T0);
        assert_eq!(Window::Day.start(t).to_string(), "2026-11-23T00:00:00.000Z");
    }

    #[test]
    fn an_hour_spent_holds_until_the_next_hour() {
        let p = policy();
        let mut u = QuotaUsage::at(T0, 0, 0);
        assert_eq!(u.admit(&p, 25, T0), Ok(10));
        u.record(&p, 10, T0);
        let later = T0.plus(Duration::from_secs(1800));
        assert_eq!(u.admit(&p, 1, later), Err(Duration::from_secs(1800)));
        let next_hour = T0.plus(Duration::from_secs(3600));
        assert_eq!(u.admit(&p, 25, next_hour), Ok(10));
    }

    #[test]
    fn a_day_spent_holds_until_midnight_utc() {
        let p = QuotaPolicy { per_day: Some(5), per_hour: None, alert_at: 0.75 };
        let mut u = QuotaUsage::at(T0, 0, 5);
        assert_eq!(u.admit(&p, 1, T0), Err(Duration::from_secs(12 * 3600)));
    }

    #[test]
    fn the_alert_fires_once_per_window_when_crossing() {
        let p = policy();
        let mut u = QuotaUsage::at(T0, 0, 0);
        assert!(u.record(&p, 7, T0).is_empty());
        assert_eq!(u.record(&p, 1, T0), vec![QuotaAlert { window: Window::Hour, used: 8, limit: 10 }]);
        assert!(u.record(&p, 1, T0).is_empty(), "once per window");
        let next = T0.plus(Duration::from_secs(3600));
        assert_eq!(u.record(&p, 8, next), vec![QuotaAlert { window: Window::Hour, used: 8, limit: 10 }]);
        let alerts = u.record(&p, 60, next);
        assert!(alerts.contains(&QuotaAlert { window: Window::Day, used: 77, limit: 100 }), "{alerts:?}");
    }

    #[test]
    fn no_quota_admits_everything() {
        let p = QuotaPolicy { per_day: None, per_hour: None, alert_at: 0.75 };
        let mut u = QuotaUsage::at(T0, 0, 0);
        assert_eq!(u.admit(&p, 1000, T0), Ok(1000));
        assert!(u.record(&p, 1_000_000, T0).is_empty());
    }
}
