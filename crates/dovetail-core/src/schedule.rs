//! One schedule syntax for everything that runs on its own (pollers,
//! batches): an interval, `"every 5m"` (or just `"5m"`), or a five-field
//! cron expression, `"*/15 * * * *"`, optionally in a time zone:
//! `"CRON_TZ=Europe/Paris 0 9 * * Mon-Fri"` (UTC otherwise). Cron fields
//! are minute, hour, day of month, month, day of week; names (`Mon`, `Jan`),
//! ranges, lists and steps work; days of the week are named, not numbered
//! (dialects disagree on what 0 and 7 mean). When both the day of month and
//! the day of week are restricted, both must match (Vixie cron runs when
//! either does). In a zone with daylight saving time, a
//! run whose local time a spring-forward gap skips happens an hour later
//! that day, and one in an autumn fold runs once.
//!
//! Pure: the next run is computed from a time passed in.

use std::str::FromStr;
use std::time::Duration;

use crate::clock::Timestamp;

#[derive(Debug, Clone)]
pub enum Schedule {
    Every(Duration),
    Cron { source: String, cron: Box<jiff_cron::Schedule>, tz: jiff::tz::TimeZone },
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "every {}", crate::duration::format_duration(*d)),
            Schedule::Cron { source, .. } => f.write_str(source),
        }
    }
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        let interval = text.strip_prefix("every ").unwrap_or(text);
        if let Ok(d) = crate::duration::parse_duration(interval) {
            if d.is_zero() {
                return Err(format!("`{text}` would run without pause; give an interval such as \"5m\""));
            }
            return Ok(Schedule::Every(d));
        }
        let (tz, expr) = match text.strip_prefix("CRON_TZ=") {
            Some(rest) => {
                let (zone, expr) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                let tz = jiff::tz::TimeZone::get(zone)
                    .map_err(|_| format!("`{zone}` is not a time zone name (IANA, e.g. \"Europe/Paris\")"))?;
                (tz, expr.trim())
            }
            None => (jiff::tz::TimeZone::UTC, text),
        };
        let fields: Vec<&str> = expr.split_whitespace().collect();
        if fields.len() == 5 && fields[4].chars().any(|c| c.is_ascii_digit()) {
            // Cron dialects disagree on numbering (0 or 7 is Sunday, or 1 is): names cannot be misread.
            return Err(format!(
                "`{}` numbers the days of the week; name them instead (Mon-Fri, Sun, Sat,Sun)",
                fields[4]
            ));
        }
        let fields = fields.len();
        if fields != 5 {
            return Err(format!(
                "`{text}` is neither an interval (\"every 5m\") nor a five-field cron expression (\"*/15 * * * *\"): it has {fields} fields"
            ));
        }
        // The cron crate counts seconds first; schedules run on whole minutes.
        let cron = jiff_cron::Schedule::from_str(&format!("0 {expr}"))
            .map_err(|e| format!("`{expr}` is not a cron expression: {e}"))?;
        Ok(Schedule::Cron { source: text.to_string(), cron: Box::new(cron), tz })
    }

    /// The first run strictly after `t` (`None` for a cron expression that never fires again).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Every(d) => Some(t.plus(*d)),
            Schedule::Cron { cron, tz, .. } => {
                let at = jiff::Timestamp::from_millisecond(t.as_millis()).ok()?.to_zoned(tz.clone());
                let next = cron.after(at).next()?;
                Some(Timestamp::from_millis(next.timestamp().as_millisecond()))
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Schedule::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        Timestamp::from_millis(s.parse::<jiff::Timestamp>().unwrap().as_millisecond())
    }

    fn next(schedule: &str, after: &str) -> String {
        Schedule::parse(schedule).unwrap().next_after(at(after)).unwrap().to_string()
    }

    #[test]
    fn intervals_add_up() {
        assert_eq!(next("every 5m", "2026-11-23T10:00:00Z"), "2026-11-23T10:05:00.000Z");
        assert_eq!(next("90s", "2026-11-23T10:00:00Z"), "2026-11-23T10:01:30.000Z");
        assert!(Schedule::parse("every 0s").is_err());
    }

    #[test]
    fn cron_fires_on_the_next_matching_minute() {
        assert_eq!(next("*/15 * * * *", "2026-11-23T10:07:30Z"), "2026-11-23T10:15:00.000Z");
        assert_eq!(next("*/15 * * * *", "2026-11-23T10:15:00Z"), "2026-11-23T10:30:00.000Z", "strictly after");
        assert_eq!(next("0 9 * * Mon-Fri", "2026-11-21T12:00:00Z"), "2026-11-23T09:00:00.000Z", "Saturday → Monday");
        assert_eq!(next("30 2 1 Jan *", "2026-11-23T00:00:00Z"), "2027-01-01T02:30:00.000Z");
    }

    #[test]
    fn cron_runs_in_its_time_zone_across_dst() {
        // 09:00 in Paris is 08:00 UTC in winter and 07:00 UTC in summer.
        assert_eq!(next("CRON_TZ=Europe/Paris 0 9 * * *", "2026-11-23T12:00:00Z"), "2026-11-24T08:00:00.000Z");
        assert_eq!(next("CRON_TZ=Europe/Paris 0 9 * * *", "2026-07-01T12:00:00Z"), "2026-07-02T07:00:00.000Z");
        // 02:30 does not exist in Paris on 2026-03-29: that day's run is an hour later, at 03:30 (01:30 UTC).
        assert_eq!(next("CRON_TZ=Europe/Paris 30 2 * * *", "2026-03-28T12:00:00Z"), "2026-03-29T01:30:00.000Z");
    }

    #[test]
    fn a_time_in_the_autumn_fold_runs_once() {
        let s = "CRON_TZ=Europe/Paris 30 2 * * *";
        assert_eq!(next(s, "2026-10-24T23:00:00Z"), "2026-10-25T00:30:00.000Z");
        assert_eq!(next(s, "2026-10-25T00:30:00Z"), "2026-10-26T01:30:00.000Z", "not again at the second 02:30");
    }

    #[test]
    fn bad_schedules_say_what_is_accepted() {
        let err = |s: &str| Schedule::parse(s).unwrap_err();
        assert!(err("every five minutes").contains("neither an interval"), "{}", err("every five minutes"));
        assert!(err("* * * *").contains("it has 4 fields"));
        assert!(err("0 9 * * * 2026").contains("it has 6 fields"));
        assert!(err("61 * * * *").contains("not a cron expression"), "{}", err("61 * * * *"));
        assert!(err("CRON_TZ=Mars/Base 0 9 * * *").contains("`Mars/Base` is not a time zone"));
        assert!(err("0 9 * * 1-5").contains("name them instead"), "{}", err("0 9 * * 1-5"));
    }
}
