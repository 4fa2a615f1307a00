//! Minute roll-ups of a flow's traffic, and what `status` and the dashboard
//! make of them: volume, success and error rates, errors by class, average
//! and p95 latency, freshness.
//!
//! The journal keeps one [`MinuteRollup`] per flow and minute, written in
//! the same transaction as what it counts; [`summarise`] turns any set of
//! them into a [`Summary`] for a time window (the last 24 hours, 7 days).
//!
//! Counting rules, fixed here so every backend and every view agrees:
//!
//! - An **attempt** is every recorded delivery attempt: one that delivered
//!   (`delivered`) or one that failed with an error class
//!   (`failures_by_class`). So `attempts = delivered + Σ failures_by_class`,
//!   `success_rate = delivered / attempts` and `error_rate = failed /
//!   attempts`. An attempt cut short by a crash (its lease expired) is a
//!   failed attempt of class `interrupted`, and only that. A record
//!   dead-lettered without being sent (its budget spent, or refused by its
//!   pipeline at lease) has a recorded attempt too, failed with its class.
//! - `received` counts records journalled at intake, duplicates excluded;
//!   `quarantined` those of them kept dead as unusable. Both are in the
//!   minute of the record's `received_at`.
//! - `retried` counts attempts whose result was "retry later", `dead` those
//!   whose result was "dead-letter"; an attempt held back (credentials,
//!   throttling, an open breaker) counts only as a failure of its class. Operator actions
//!   (replay, discard) are not traffic and are not counted.
//! - Latency is that of delivered attempts only, in a fixed histogram
//!   ([`LATENCY_BUCKETS_MS`]). Attempts are counted in the minute they
//!   started; `last_delivered_at` is when the latest delivery ended.
//!
//! A minute is a Unix minute: milliseconds since the epoch divided by 60 000
//! (rounded down), UTC.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Serialize;

use crate::clock::Timestamp;

/// Upper bounds (inclusive, in milliseconds) of the latency histogram's
/// buckets; a last, implicit bucket holds everything slower than 60 s.
///
/// Roughly log-spaced: each bound is at most twice the one before it, so the
/// estimate [`percentile`] gives (the upper bound of the bucket holding the
/// wanted rank) is never below the true value and, above 5 ms, less than
/// twice it. Stored histograms are laid out by these bounds: change them
/// only with the journal's storage in mind.
pub const LATENCY_BUCKETS_MS: [u64; 16] =
    [5, 10, 20, 40, 75, 150, 250, 500, 1_000, 2_000, 3_500, 6_000, 10_000, 20_000, 35_000, 60_000];

/// How many buckets a histogram has: one per bound plus the overflow bucket.
pub const LATENCY_BUCKET_COUNT: usize = LATENCY_BUCKETS_MS.len() + 1;

/// What [`percentile`] answers when the wanted rank is in the overflow
/// bucket: slower than the last bound (60 s), by an unknown amount. Show it
/// as "> 60 s".
pub const OVERFLOW_MS: u64 = u64::MAX;

const MINUTE_MS: i64 = 60_000;

/// One flow's counts for one minute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MinuteRollup {
    pub flow: String,
    /// Unix minute ([`minute_of`]).
    pub minute: i64,
    /// Records journalled at intake (duplicate deliveries excluded).
    pub received: u64,
    /// Of `received`, those quarantined as unusable.
    pub quarantined: u64,
    /// Attempts that delivered.
    pub delivered: u64,
    /// Attempts after which the record was dead-lettered.
    pub dead: u64,
    /// Attempts after which the record waits for a retry.
    pub retried: u64,
    /// Failed attempts by class ([`crate::policy::ErrorClass::as_str`]);
    /// classes without failures are left out.
    pub failures_by_class: BTreeMap<String, u64>,
    /// Delivered attempts with a latency (= `delivered`).
    pub latency_count: u64,
    pub latency_sum_ms: u64,
    /// Delivered attempts per latency bucket ([`bucket_of`]); length
    /// [`LATENCY_BUCKET_COUNT`].
    pub latency_buckets: Vec<u64>,
    /// When the latest delivery counted here ended.
    pub last_delivered_at: Option<Timestamp>,
}

impl Default for MinuteRollup {
    fn default() -> Self {
        MinuteRollup {
            flow: String::new(),
            minute: 0,
            received: 0,
            quarantined: 0,
            delivered: 0,
            dead: 0,
            retried: 0,
            failures_by_class: BTreeMap::new(),
            latency_count: 0,
            latency_sum_ms: 0,
            latency_buckets: vec![0; LATENCY_BUCKET_COUNT],
            last_delivered_at: None,
        }
    }
}

impl MinuteRollup {
    /// Failed attempts, all classes together.
    pub fn failed(&self) -> u64 {
        self.failures_by_class.values().sum()
    }
}

/// What a window of roll-ups adds up to.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Summary {
    pub since: Timestamp,
    pub until: Timestamp,
    pub received: u64,
    pub quarantined: u64,
    pub delivered: u64,
    pub dead: u64,
    pub retried: u64,
    /// Delivery attempts: delivered plus failed.
    pub attempts: u64,
    /// Delivered attempts over attempts; `None` without attempts.
    pub success_rate: Option<f64>,
    /// Failed attempts over attempts; `None` without attempts.
    pub error_rate: Option<f64>,
    /// Failed attempts by class.
    pub errors_by_class: BTreeMap<String, u64>,
    /// Mean latency of delivered attempts; `None` without any.
    pub avg_latency_ms: Option<f64>,
    /// The upper bound of the latency bucket holding the 95th percentile of
    /// delivered attempts ([`percentile`]); [`OVERFLOW_MS`] when it is
    /// slower than the last bound; `None` without any.
    pub p95_latency_ms: Option<u64>,
    /// When the latest delivery in the window ended (freshness).
    pub last_delivered_at: Option<Timestamp>,
    /// `(minute, delivered, failed attempts)` for each minute of the window
    /// that has a roll-up, all flows given together, in order. A minute
    /// missing had no traffic.
    pub per_minute: Vec<(i64, u64, u64)>,
}

/// The Unix minute holding `t`.
pub fn minute_of(t: Timestamp) -> i64 {
    t.as_millis().div_euclid(MINUTE_MS)
}

/// The minutes that overlap `[since, until)`: from the one holding `since`
/// to the one holding the last millisecond before `until`. Empty when
/// `until <= since`.
pub fn minute_range(since: Timestamp, until: Timestamp) -> Range<i64> {
    if until <= since {
        return 0..0;
    }
    let end = until.as_millis().div_euclid(MINUTE_MS) + i64::from(until.as_millis().rem_euclid(MINUTE_MS) != 0);
    minute_of(since)..end
}

/// The bucket of a latency: the first whose bound is at least `ms`, or the
/// overflow bucket (`LATENCY_BUCKETS_MS.len()`).
pub fn bucket_of(ms: u64) -> usize {
    LATENCY_BUCKETS_MS.partition_point(|&bound| bound < ms)
}

/// The `q` quantile (0 to 1) of a histogram laid out as [`bucket_of`]
/// counts: the upper bound of the bucket holding the observation of rank
/// ⌈q·n⌉ (at least 1), i.e. the true value is in that bucket, at most this
/// bound. [`OVERFLOW_MS`] when that bucket is the overflow bucket (or any
/// index past the bounds); `None` when the histogram is empty.
pub fn percentile(buckets: &[u64], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The epsilon keeps 0.95 × 100 (= 95.000…01 in floating point) at rank 95.
    let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
    let rank = ((q * total as f64) - 1e-9).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, &n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank.min(total) {
            return Some(LATENCY_BUCKETS_MS.get(i).copied().unwrap_or(OVERFLOW_MS));
        }
    }
    None
}

/// Adds up the roll-ups of `minutes` (any flows, any order) that fall in
/// the window `[since, until)` ([`minute_range`]); the others are ignored,
/// so one fetch of 7 days can be summarised for the last 24 hours too.
pub fn summarise<'a>(
    minutes: impl IntoIterator<Item = &'a MinuteRollup>,
    since: Timestamp,
    until: Timestamp,
) -> Summary {
    let window = minute_range(since, until);
    let mut s = Summary { since, until, ..Summary::default() };
    let mut failed = 0;
    let (mut latency_count, mut latency_sum) = (0u64, 0u64);
    let mut buckets = [0u64; LATENCY_BUCKET_COUNT];
    let mut per_minute: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
    for m in minutes.into_iter().filter(|m| window.contains(&m.minute)) {
        s.received += m.received;
        s.quarantined += m.quarantined;
        s.delivered += m.delivered;
        s.dead += m.dead;
        s.retried += m.retried;
        for (class, n) in &m.failures_by_class {
            *s.errors_by_class.entry(class.clone()).or_default() += n;
        }
        let minute_failed = m.failed();
        failed += minute_failed;
        latency_count += m.latency_count;
        latency_sum += m.latency_sum_ms;
        for (i, n) in m.latency_buckets.iter().enumerate() {
            buckets[i.min(LATENCY_BUCKET_COUNT - 1)] += n;
        }
        s.last_delivered_at = s.last_delivered_at.max(m.last_delivered_at);
        let slot = per_minute.entry(m.minute).or_default();
        slot.0 += m.delivered;
        slot.1 += minute_failed;
    }
    s.attempts = s.delivered + failed;
    if s.attempts > 0 {
        s.success_rate = Some(s.delivered as f64 / s.attempts as f64);
        s.error_rate = Some(failed as f64 / s.attempts as f64);
    }
    if latency_count > 0 {
        s.avg_latency_ms = Some(latency_sum as f64 / latency_count as f64);
    }
    s.p95_latency_ms = percentile(&buckets, 0.95);
    s.per_minute = per_minute.into_iter().map(|(m, (d, f))| (m, d, f)).collect();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start of a minute.
    const T0: Timestamp = Timestamp::from_secs(1_800_000_000);

    fn at_minute(offset: i64) -> i64 {
        minute_of(T0) + offset
    }

    fn classes(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(c, n)| (c.to_string(), *n)).collect()
    }

    /// A histogram with `n` observations in each `(bucket, n)`.
    fn histogram(pairs: &[(usize, u64)]) -> Vec<u64> {
        let mut h = vec![0; LATENCY_BUCKET_COUNT];
        for &(i, n) in pairs {
            h[i] += n;
        }
        h
    }

    #[test]
    fn bounds_are_increasing_log_spaced_from_5_ms_to_60_s() {
        assert_eq!(LATENCY_BUCKETS_MS.len(), 16);
        assert_eq!((LATENCY_BUCKETS_MS[0], LATENCY_BUCKETS_MS[15]), (5, 60_000));
        for pair in LATENCY_BUCKETS_MS.windows(2) {
            assert!(pair[0] < pair[1] && pair[1] <= 2 * pair[0], "{pair:?}");
        }
    }

    #[test]
    fn latencies_fall_in_the_first_bucket_whose_bound_holds_them() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(5), 0, "bounds are inclusive");
        assert_eq!(bucket_of(6), 1);
        assert_eq!(bucket_of(12), 2);
        assert_eq!(bucket_of(1_000), 8);
        assert_eq!(bucket_of(1_001), 9);
        assert_eq!(bucket_of(60_000), 15);
        assert_eq!(bucket_of(60_001), 16, "the overflow bucket");
        assert_eq!(bucket_of(u64::MAX), 16);
    }

    #[test]
    fn percentiles_name_the_bucket_holding_the_rank() {
        assert_eq!(percentile(&[], 0.95), None);
        assert_eq!(percentile(&histogram(&[]), 0.95), None);
        // 100 observations: 95 at ≤ 20 ms, 5 at ≤ 3.5 s. Rank 95 is the last fast one.
        assert_eq!(percentile(&histogram(&[(2, 95), (10, 5)]), 0.95), Some(20));
        // 94 fast ones: rank 95 is slow.
        assert_eq!(percentile(&histogram(&[(2, 94), (10, 6)]), 0.95), Some(3_500));
        assert_eq!(percentile(&histogram(&[(2, 94), (10, 6)]), 0.5), Some(20));
        // A single observation is every percentile.
        assert_eq!(percentile(&histogram(&[(7, 1)]), 0.95), Some(500));
        assert_eq!(percentile(&histogram(&[(7, 1)]), 0.0), Some(500));
        assert_eq!(percentile(&histogram(&[(3, 1), (7, 1)]), 1.0), Some(500));
        // 3 observations: rank ⌈2.85⌉ = 3.
        assert_eq!(percentile(&histogram(&[(0, 2), (4, 1)]), 0.95), Some(75));
        // 0.07 × 100 is 7.000000000000001 in floating point: still rank 7.
        assert_eq!(percentile(&histogram(&[(0, 7), (1, 93)]), 0.07), Some(5));
    }

    #[test]
    fn a_percentile_past_the_last_bound_is_overflow() {
        assert_eq!(percentile(&histogram(&[(15, 90), (16, 10)]), 0.95), Some(OVERFLOW_MS));
        assert_eq!(percentile(&histogram(&[(15, 95), (16, 5)]), 0.95), Some(60_000));
    }

    #[test]
    fn minute_ranges_cover_every_minute_overlapping_the_window() {
        let m = minute_of(T0);
        assert_eq!(minute_of(T0.plus(std::time::Duration::from_millis(59_999))), m);
        assert_eq!(minute_of(Timestamp::from_millis(-1)), -1);
        assert_eq!(minute_range(T0, T0.plus(std::time::Duration::from_secs(120))), m..m + 2);
        assert_eq!(minute_range(T0, T0.plus(std::time::Duration::from_secs(121))), m..m + 3);
        let mid = T0.plus(std::time::Duration::from_secs(30));
        assert_eq!(minute_range(mid, mid.plus(std::time::Duration::from_secs(1))), m..m + 1);
        assert_eq!(minute_range(mid, mid), 0..0);
        assert_eq!(minute_range(mid, T0), 0..0);
    }

    #[test]
    fn nothing_summarises_to_zeros_without_rates() {
        let until = T0.plus(std::time::Duration::from_secs(86_400));
        let s = summarise(&[], T0, until);
        assert_eq!(
            s,
            Summary {
                since: T0,
                until,
                received: 0,
                quarantined: 0,
                delivered: 0,
                dead: 0,
                retried: 0,
                attempts: 0,
                success_rate: None,
                error_rate: None,
                errors_by_class: BTreeMap::new(),
                avg_latency_ms: None,
                p95_latency_ms: None,
                last_delivered_at: None,
                per_minute: Vec::new(),
            }
        );
        // Received records but no attempt yet: still no rates.
        let waiting = MinuteRollup { flow: "orders".into(), minute: at_minute(0), received: 3, ..Default::default() };
        let s = summarise(&[waiting], T0, until);
        assert_eq!((s.received, s.attempts, s.success_rate, s.error_rate), (3, 0, None, None));
        assert_eq!(s.per_minute, [(at_minute(0), 0, 0)]);
    }

    #[test]
    fn minutes_add_up_across_flows_within_the_window() {
        let delivered_at = |secs| Some(T0.plus(std::time::Duration::from_secs(secs)));
        let orders_0 = MinuteRollup {
            flow: "orders".into(),
            minute: at_minute(0),
            received: 10,
            quarantined: 1,
            delivered: 6,
            dead: 1,
            retried: 2,
            failures_by_class: classes(&[("server", 2), ("rejected", 1)]),
            latency_count: 6,
            latency_sum_ms: 6 * 15,
            latency_buckets: histogram(&[(2, 6)]),
            last_delivered_at: delivered_at(50),
        };
        let refunds_0 = MinuteRollup {
            flow: "refunds".into(),
            minute: at_minute(0),
            received: 2,
            delivered: 2,
            failures_by_class: classes(&[("timeout", 1)]),
            latency_count: 2,
            latency_sum_ms: 2 * 3_000,
            latency_buckets: histogram(&[(10, 2)]),
            last_delivered_at: delivered_at(20),
            ..Default::default()
        };
        let orders_5 = MinuteRollup {
            flow: "orders".into(),
            minute: at_minute(5),
            received: 4,
            delivered: 2,
            failures_by_class: classes(&[("server", 1)]),
            retried: 1,
            latency_count: 2,
            latency_sum_ms: 2 * 15,
            latency_buckets: histogram(&[(2, 2)]),
            last_delivered_at: delivered_at(330),
            ..Default::default()
        };
        // Outside the window on both sides: ignored.
        let before = MinuteRollup { minute: at_minute(-1), delivered: 100, ..orders_5.clone() };
        let after = MinuteRollup { minute: at_minute(6), delivered: 100, ..orders_5.clone() };
        let until = T0.plus(std::time::Duration::from_secs(5 * 60 + 1));
        let s = summarise(&[after, orders_5, refunds_0, before, orders_0], T0, until);
        assert_eq!((s.since, s.until), (T0, until));
        assert_eq!((s.received, s.quarantined, s.delivered, s.dead, s.retried), (16, 1, 10, 1, 3));
        assert_eq!(s.errors_by_class, classes(&[("rejected", 1), ("server", 3), ("timeout", 1)]));
        assert_eq!(s.attempts, 15, "10 delivered + 5 failed");
        assert_eq!(s.success_rate, Some(10.0 / 15.0));
        assert_eq!(s.error_rate, Some(5.0 / 15.0));
        assert_eq!(s.avg_latency_ms, Some((8.0 * 15.0 + 2.0 * 3_000.0) / 10.0));
        // 10 deliveries: rank 10 is one of the two slow refunds.
        assert_eq!(s.p95_latency_ms, Some(3_500));
        assert_eq!(s.last_delivered_at, delivered_at(330));
        assert_eq!(s.per_minute, [(at_minute(0), 8, 4), (at_minute(5), 2, 1)]);
    }

    #[test]
    fn a_slow_tail_puts_p95_in_the_overflow_bucket() {
        let m = MinuteRollup {
            flow: "orders".into(),
            minute: at_minute(0),
            delivered: 20,
            latency_count: 20,
            latency_sum_ms: 18 * 100 + 2 * 90_000,
            latency_buckets: histogram(&[(5, 18), (16, 2)]),
            ..Default::default()
        };
        let s = summarise(&[m], T0, T0.plus(std::time::Duration::from_secs(60)));
        assert_eq!(s.p95_latency_ms, Some(OVERFLOW_MS));
        assert_eq!(s.avg_latency_ms, Some(9_090.0));
        assert_eq!((s.success_rate, s.error_rate), (Some(1.0), Some(0.0)));
    }

    #[test]
    fn only_failures_make_an_error_rate_of_one() {
        let m = MinuteRollup {
            flow: "orders".into(),
            minute: at_minute(0),
            dead: 1,
            retried: 3,
            failures_by_class: classes(&[("auth", 2), ("server", 3)]),
            ..Default::default()
        };
        let s = summarise(&[m], T0, T0.plus(std::time::Duration::from_secs(1)));
        assert_eq!((s.attempts, s.success_rate, s.error_rate), (5, Some(0.0), Some(1.0)));
        assert_eq!((s.avg_latency_ms, s.p95_latency_ms, s.last_delivered_at), (None, None, None));
    }
}
