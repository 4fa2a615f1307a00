//! A circuit breaker per connector.
//!
//! Closed, it counts outcomes in a rolling window and opens when the failure
//! ratio over at least `min_calls` calls reaches `failure_ratio`, or after
//! `consecutive_failures` in a row. Open, it admits nothing until its time
//! is up, then lets exactly one probe through (half-open). A successful
//! probe closes it; a failed one opens it again for twice as long, up to
//! `max_open_for`. So a partner that is down for N seconds sees about
//! log2(N / open_for) probes, not a retry storm.
//!
//! Only failures that say the partner is unwell count: 5xx, timeouts and
//! dropped connections. A 4xx is a healthy partner refusing a record; a 429
//! is the rate limiter's business.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::clock::Timestamp;

/// `breaker = { failure_ratio, min_calls, consecutive_failures, window, open_for, max_open_for }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BreakerPolicy {
    pub failure_ratio: f64,
    pub min_calls: u32,
    pub consecutive_failures: u32,
    pub window: Duration,
    pub open_for: Duration,
    pub max_open_for: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failure_ratio: 0.5,
            min_calls: 20,
            consecutive_failures: 5,
            window: Duration::from_secs(60),
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(300),
        }
    }
}

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    /// Nothing is sent before `until`.
    Open {
        until: Timestamp,
    },
    /// One probe may be (or is) in flight.
    HalfOpen {
        probing: bool,
    },
}

impl BreakerState {
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// May a request go out now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allow,
    /// Exactly one request, as the half-open probe.
    Probe,
    /// Nothing before this instant.
    WaitUntil(Timestamp),
}

/// A change of state worth a log line and a status update.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
    pub reason: String,
}

/// The rolling window is kept as this many slices, so its memory does not
/// grow with the call rate (a call per record at 15,000 records/s made a
/// one-minute window of a million entries). A call leaves the window up to
/// one slice (a sixtieth of it) early.
const SLICES: i64 = 60;

/// The calls that ended in one slice of the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slice {
    /// Which slice since the epoch: `millis / slice width`.
    index: i64,
    calls: u32,
    failed: u32,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: BreakerState,
    slices: VecDeque<Slice>,
    /// Calls and failures in `slices`, kept as they come and go: counting
    /// the window on every call cost O(window) per record.
    total: u32,
    failed: u32,
    consecutive: u32,
    /// Openings since the breaker last closed, for the growing open time.
    openings: u32,
}

/// How long a probe may stay unanswered before another is allowed; covers
/// a probe whose result was never reported (the engine lost it).
const PROBE_GRACE: Duration = Duration::from_secs(120);

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            policy,
            state: BreakerState::Closed,
            slices: VecDeque::new(),
            total: 0,
            failed: 0,
            consecutive: 0,
            openings: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Asks to send; moves open → half-open when the open time is over.
    pub fn admit(&mut self, now: Timestamp) -> (Admission, Option<Transition>) {
        match self.state {
            BreakerState::Closed => (Admission::Allow, None),
            BreakerState::Open { until } if now < until => (Admission::WaitUntil(until), None),
            BreakerState::Open { .. } => {
                let t = self.move_to(BreakerState::HalfOpen { probing: true }, "open time is over; sending one probe");
                (Admission::Probe, Some(t))
            }
            BreakerState::HalfOpen { probing: true } => {
                (Admission::WaitUntil(now.plus(Duration::from_millis(250))), None)
            }
            BreakerState::HalfOpen { probing: false } => {
                self.state = BreakerState::HalfOpen { probing: true };
                (Admission::Probe, None)
            }
        }
    }

    /// A probe was admitted but nothing was sent (no record was due).
    pub fn probe_unused(&mut self) {
        if self.state == (BreakerState::HalfOpen { probing: true }) {
            self.state = BreakerState::HalfOpen { probing: false };
        }
    }

    /// Records the outcome of a request that was sent. `healthy` is false
    /// for failures that count (5xx, timeouts, dropped connections).
    pub fn record(&mut self, healthy: bool, now: Timestamp) -> Option<Transition> {
        match self.state {
            BreakerState::HalfOpen { .. } if healthy => {
                self.openings = 0;
                self.forget_calls();
                Some(self.move_to(BreakerState::Closed, "the probe succeeded"))
            }
            BreakerState::HalfOpen { .. } => Some(self.open(now, "the probe failed".to_string())),
            // A late result from before the breaker opened changes nothing.
            BreakerState::Open { .. } => None,
            BreakerState::Closed => {
                self.count(healthy, now);
                self.consecutive = if healthy { 0 } else { self.consecutive + 1 };
                let (total, failed) = (self.total, self.failed);
                if self.consecutive >= self.policy.consecutive_failures {
                    Some(self.open(now, format!("{} consecutive failures", self.consecutive)))
                } else if total >= self.policy.min_calls
                    && f64::from(failed) / f64::from(total) >= self.policy.failure_ratio
                {
                    Some(self.open(now, format!("{failed} of the last {total} calls failed")))
                } else {
                    None
                }
            }
        }
    }

    /// Adds a call to the window and drops the slices that have left it.
    fn count(&mut self, healthy: bool, now: Timestamp) {
        let width = (i64::try_from(self.policy.window.as_millis()).unwrap_or(i64::MAX) / SLICES).max(1);
        let index = now.as_millis().div_euclid(width);
        let failed = u32::from(!healthy);
        match self.slices.back_mut() {
            // A clock that stepped back counts in the newest slice.
            Some(last) if last.index >= index => {
                last.calls += 1;
                last.failed += failed;
            }
            _ => self.slices.push_back(Slice { index, calls: 1, failed }),
        }
        self.total += 1;
        self.failed += failed;
        while let Some(first) = self.slices.front().copied()
            && now.since(Timestamp::from_millis(first.index.saturating_mul(width))) > self.policy.window
        {
            self.slices.pop_front();
            self.total -= first.calls;
            self.failed -= first.failed;
        }
    }

    fn forget_calls(&mut self) {
        self.slices.clear();
        self.total = 0;
        self.failed = 0;
        self.consecutive = 0;
    }

    /// Lets a stuck probe go: called when the probe's time is long past.
    pub fn expire_probe(&mut self, probe_started: Timestamp, now: Timestamp) {
        if self.state == (BreakerState::HalfOpen { probing: true }) && now.since(probe_started) > PROBE_GRACE {
            self.state = BreakerState::HalfOpen { probing: false };
        }
    }

    fn open(&mut self, now: Timestamp, reason: String) -> Transition {
        self.openings += 1;
        let factor = 1u32.checked_shl(self.openings - 1).unwrap_or(u32::MAX);
        let open_for = self.policy.open_for.saturating_mul(factor).min(self.policy.max_open_for);
        self.forget_calls();
        self.move_to(BreakerState::Open { until: now.plus(open_for) }, &reason)
    }

    fn move_to(&mut self, to: BreakerState, reason: &str) -> Transition {
        let from = std::mem::replace(&mut self.state, to);
        Transition { from, to, reason: reason.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_secs(10_000);

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failure_ratio: 0.5,
            min_calls: 10,
            consecutive_failures: 3,
            window: Duration::from_secs(60),
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(40),
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn consecutive_failures_open_it() {
        let mut b = Breaker::new(policy());
        assert_eq!(b.record(false, T0), None);
        assert_eq!(b.record(false, T0), None);
        let t = b.record(false, T0).unwrap();
        assert_eq!(t.to, BreakerState::Open { until: T0.plus(secs(10)) });
        assert_eq!(t.reason, "3 consecutive failures");
        assert_eq!(b.admit(T0.plus(secs(5))).0, Admission::WaitUntil(T0.plus(secs(10))));
    }

    #[test]
    fn a_failure_ratio_over_enough_calls_opens_it() {
        let mut b = Breaker::new(policy());
        for i in 0..9 {
            assert_eq!(b.record(i % 2 == 0, T0), None, "call {i}: fewer than min_calls");
        }
        let t = b.record(false, T0).unwrap();
        assert_eq!(t.reason, "5 of the last 10 calls failed");
    }

    #[test]
    fn old_calls_leave_the_window() {
        // 4 failures and 5 successes: one more failure would make 5 of 10.
        let fresh = || {
            let mut b = Breaker::new(policy());
            for ok in [false, true, false, true, false, true, false, true, true] {
                assert_eq!(b.record(ok, T0), None);
            }
            b
        };
        assert!(fresh().record(false, T0).is_some(), "within the window the ratio trips");
        let mut b = fresh();
        assert_eq!(b.record(false, T0.plus(secs(61))), None, "the old calls no longer count");
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn one_probe_after_the_open_time_and_a_success_closes_it() {
        let mut b = Breaker::new(policy());
        for _ in 0..3 {
            b.record(false, T0);
        }
        let (a, t) = b.admit(T0.plus(secs(10)));
        assert_eq!(a, Admission::Probe);
        assert_eq!(t.unwrap().to, BreakerState::HalfOpen { probing: true });
        assert!(matches!(b.admit(T0.plus(secs(10))).0, Admission::WaitUntil(_)), "only one probe at a time");
        let t = b.record(true, T0.plus(secs(11))).unwrap();
        assert_eq!((t.to, t.reason.as_str()), (BreakerState::Closed, "the probe succeeded"));
        assert_eq!(b.admit(T0.plus(secs(11))).0, Admission::Allow);
    }

    #[test]
    fn failed_probes_double_the_open_time_up_to_the_cap() {
        let mut b = Breaker::new(policy());
        for _ in 0..3 {
            b.record(false, T0);
        }
        let mut now = T0;
        let mut open_times = Vec::new();
        for _ in 0..4 {
            let BreakerState::Open { until } = b.state() else { panic!("open") };
            open_times.push(until.since(now).as_secs());
            now = until;
            assert_eq!(b.admit(now).0, Admission::Probe);
            b.record(false, now);
        }
        assert_eq!(open_times, [10, 20, 40, 40]);
    }

    #[test]
    fn an_outage_sees_a_handful_of_probes() {
        // A 10-minute outage with requests wanted every 100 ms.
        let mut b = Breaker::new(policy());
        let mut sent = 0;
        let mut now = T0;
        while now < T0.plus(secs(600)) {
            if let (Admission::Allow | Admission::Probe, _) = b.admit(now) {
                sent += 1;
                b.record(false, now);
            }
            now = now.plus(Duration::from_millis(100));
        }
        assert!(sent <= 20, "{sent} calls reached a partner that was down");
    }

    #[test]
    fn an_unused_probe_can_be_taken_again() {
        let mut b = Breaker::new(policy());
        for _ in 0..3 {
            b.record(false, T0);
        }
        assert_eq!(b.admit(T0.plus(secs(10))).0, Admission::Probe);
        b.probe_unused();
        assert_eq!(b.admit(T0.plus(secs(10))).0, Admission::Probe);
    }

    #[test]
    fn late_results_while_open_change_nothing() {
        let mut b = Breaker::new(policy());
        for _ in 0..3 {
            b.record(false, T0);
        }
        assert_eq!(b.record(true, T0), None);
        assert!(matches!(b.state(), BreakerState::Open { .. }));
    }

    proptest::proptest! {
        /// The kept counts are always the window's: every call of the last
        /// `window` counts, none older than `window` plus one slice, and
        /// the slices never outnumber the window's.
        #[test]
        fn the_counts_follow_the_window(calls in proptest::collection::vec((proptest::bool::ANY, 0u64..5_000), 1..400)) {
            let policy = BreakerPolicy { consecutive_failures: u32::MAX, failure_ratio: 2.0, ..BreakerPolicy::default() };
            let slice = policy.window / SLICES as u32;
            let mut b = Breaker::new(policy);
            let mut now = T0;
            let mut history = Vec::new();
            for (healthy, step_ms) in calls {
                now = now.plus(Duration::from_millis(step_ms));
                b.record(healthy, now);
                history.push((now, healthy));
                let (calls, failed) = b.slices.iter().fold((0, 0), |(c, f), s| (c + s.calls, f + s.failed));
                proptest::prop_assert_eq!((b.total, b.failed), (calls, failed));
                let within = |span: Duration| {
                    let kept: Vec<_> = history.iter().filter(|(t, _)| now.since(*t) <= span).collect();
                    (kept.len() as u32, kept.iter().filter(|(_, ok)| !ok).count() as u32)
                };
                let (least, most) = (within(policy.window - slice), within(policy.window + slice));
                proptest::prop_assert!(least.0 <= b.total && b.total <= most.0, "{} calls, {least:?}..{most:?}", b.total);
                proptest::prop_assert!(least.1 <= b.failed && b.failed <= most.1);
                proptest::prop_assert!(b.slices.len() <= SLICES as usize + 1);
            }
        }
    }
}
