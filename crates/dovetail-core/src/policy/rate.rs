//! Client-side rate limiting: a token bucket per connector that slows down
//! when the partner pushes back and recovers gradually.
//!
//! The configured rate is a ceiling set below the partner's documented
//! limit. A 429 halves the current rate (never below a sixteenth of the
//! ceiling) and blocks the whole connector until the partner's
//! `Retry-After`; every success then adds back a twentieth of the ceiling.
//! `RateLimit-Remaining: 0` blocks until the advertised reset before a 429
//! ever happens. Without a configured rate the limiter only honours blocks.

use std::time::Duration;

use serde::Serialize;

use crate::clock::Timestamp;

/// `rate_limit = { requests_per_second, burst }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
}

/// What a partner's response said about its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitHint {
    /// `RateLimit-Remaining` / `X-RateLimit-Remaining`.
    pub remaining: Option<u64>,
    /// Time until the window resets (`RateLimit-Reset` / `X-RateLimit-Reset`).
    pub reset: Option<Duration>,
}

/// A snapshot for status and logs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LimiterState {
    /// Current pace in requests per second; `None` when no rate is configured.
    pub current_rate: Option<f64>,
    pub configured_rate: Option<f64>,
    pub blocked_until: Option<Timestamp>,
}

/// One connector's limiter. Not thread-safe by itself; the engine keeps it
/// behind a lock shared by every flow using the connector.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    limit: Option<RateLimit>,
    rate: f64,
    tokens: f64,
    last: Timestamp,
    blocked_until: Option<Timestamp>,
}

/// How far a 429 can slow the limiter: a sixteenth of the configured rate.
const MIN_RATE_FRACTION: f64 = 1.0 / 16.0;
/// How much of the configured rate each success gives back.
const RECOVERY_FRACTION: f64 = 1.0 / 20.0;

impl RateLimiter {
    pub fn new(limit: Option<RateLimit>, now: Timestamp) -> RateLimiter {
        let rate = limit.map_or(f64::INFINITY, |l| l.requests_per_second);
        let tokens = limit.map_or(f64::INFINITY, |l| f64::from(l.burst.max(1)));
        RateLimiter { limit, rate, tokens, last: now, blocked_until: None }
    }

    fn refill(&mut self, now: Timestamp) {
        if let Some(l) = self.limit {
            let elapsed = now.since(self.last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(f64::from(l.burst.max(1)));
        }
        self.last = self.last.max(now);
    }

    /// Takes up to `wanted` tokens. Returns how many were taken and, when
    /// none could be, how long until one can.
    pub fn take(&mut self, wanted: usize, now: Timestamp) -> Result<usize, Duration> {
        if let Some(until) = self.blocked_until {
            if now < until {
                return Err(until.since(now));
            }
            self.blocked_until = None;
        }
        if self.limit.is_none() {
            return Ok(wanted);
        }
        self.refill(now);
        let whole = self.tokens.floor();
        if whole < 1.0 {
            let missing = 1.0 - self.tokens;
            return Err(Duration::from_secs_f64(missing / self.rate).max(Duration::from_millis(1)));
        }
        let taken = (whole as usize).min(wanted);
        self.tokens -= taken as f64;
        Ok(taken)
    }

    /// Gives back tokens taken for requests that were never sent.
    pub fn refund(&mut self, n: usize) {
        if let Some(l) = self.limit {
            self.tokens = (self.tokens + n as f64).min(f64::from(l.burst.max(1)));
        }
    }

    /// The partner answered 429: slow down and wait as long as it asked
    /// (or, without `Retry-After`, one interval at the new rate, at least a second).
    pub fn throttled(&mut self, retry_after: Option<Duration>, now: Timestamp) {
        if let Some(l) = self.limit {
            self.rate = (self.rate / 2.0).max(l.requests_per_second * MIN_RATE_FRACTION);
            self.tokens = 0.0;
        }
        let pause = retry_after.unwrap_or_else(|| {
            if self.rate.is_finite() {
                Duration::from_secs_f64(1.0 / self.rate).max(Duration::from_secs(1))
            } else {
                Duration::from_secs(1)
            }
        });
        self.block_until(now.plus(pause), now);
    }

    /// The partner accepted a request: recover a step towards the configured rate.
    pub fn succeeded(&mut self, now: Timestamp) {
        if let Some(l) = self.limit {
            self.refill(now);
            self.rate = (self.rate + l.requests_per_second * RECOVERY_FRACTION).min(l.requests_per_second);
        }
    }

    /// Reads the partner's advertised budget: with nothing left, wait for the
    /// reset rather than spend a request on a certain 429.
    pub fn hint(&mut self, hint: LimitHint, now: Timestamp) {
        if hint.remaining == Some(0) {
            self.block_until(now.plus(hint.reset.unwrap_or(Duration::from_secs(1))), now);
        } else if let (Some(remaining), Some(_)) = (hint.remaining, self.limit) {
            self.refill(now);
            self.tokens = self.tokens.min(remaining as f64);
        }
    }

    fn block_until(&mut self, until: Timestamp, now: Timestamp) {
        // A partner asking for more than a day (or a misread header) must
        // not silence the connector for a year.
        let until = until.min(now.plus(crate::policy::MAX_RETRY_AFTER));
        self.blocked_until = Some(self.blocked_until.map_or(until, |b| b.max(until)));
    }

    pub fn state(&self) -> LimiterState {
        LimiterState {
            current_rate: self.limit.map(|_| self.rate),
            configured_rate: self.limit.map(|l| l.requests_per_second),
            blocked_until: self.blocked_until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: Timestamp = Timestamp::from_secs(1_000);

    fn limited(rps: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(Some(RateLimit { requests_per_second: rps, burst }), T0)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_full_bucket_allows_the_burst_then_paces() {
        let mut l = limited(10.0, 5);
        assert_eq!(l.take(100, T0), Ok(5));
        assert_eq!(l.take(1, T0), Err(ms(100)));
        assert_eq!(l.take(10, T0.plus(ms(250))), Ok(2));
    }

    #[test]
    fn refunds_return_unused_tokens_up_to_the_burst() {
        let mut l = limited(1.0, 3);
        assert_eq!(l.take(3, T0), Ok(3));
        l.refund(5);
        assert_eq!(l.take(10, T0), Ok(3));
    }

    #[test]
    fn a_429_blocks_until_retry_after_and_halves_the_rate() {
        let mut l = limited(10.0, 10);
        l.throttled(Some(Duration::from_secs(3)), T0);
        assert_eq!(l.state().current_rate, Some(5.0));
        assert_eq!(l.take(1, T0.plus(ms(2999))), Err(ms(1)));
        let after = T0.plus(Duration::from_secs(3));
        assert_eq!(l.take(100, after), Ok(10), "the bucket refilled at the slower rate while blocked");
        assert_eq!(l.take(1, after), Err(ms(200)));
    }

    #[test]
    fn repeated_429s_floor_at_a_sixteenth_and_successes_recover_gradually() {
        let mut l = limited(16.0, 1);
        for _ in 0..10 {
            l.throttled(None, T0);
        }
        assert_eq!(l.state().current_rate, Some(1.0));
        let mut steps = 0;
        while l.state().current_rate < Some(16.0) {
            l.succeeded(T0);
            steps += 1;
        }
        assert_eq!(steps, 19, "recovery takes many successes, not one");
    }

    #[test]
    fn without_a_configured_rate_only_blocks_apply() {
        let mut l = RateLimiter::new(None, T0);
        assert_eq!(l.take(1000, T0), Ok(1000));
        l.throttled(None, T0);
        assert_eq!(l.take(1, T0), Err(Duration::from_secs(1)));
        assert_eq!(l.take(7, T0.plus(Duration::from_secs(1))), Ok(7));
        assert_eq!(l.state().current_rate, None);
    }

    #[test]
    fn remaining_zero_waits_for_the_reset() {
        let mut l = limited(100.0, 50);
        l.hint(LimitHint { remaining: Some(0), reset: Some(Duration::from_secs(4)) }, T0);
        assert_eq!(l.take(1, T0), Err(Duration::from_secs(4)));
        let mut l = limited(100.0, 50);
        l.hint(LimitHint { remaining: Some(2), reset: None }, T0);
        assert_eq!(l.take(10, T0), Ok(2), "never more than the partner says is left");
    }

    #[test]
    fn blocks_are_capped_at_a_day() {
        let mut l = limited(10.0, 1);
        l.throttled(Some(Duration::from_secs(365 * 86_400)), T0);
        assert_eq!(l.take(1, T0), Err(crate::policy::MAX_RETRY_AFTER));
        let mut l = limited(10.0, 1);
        l.hint(LimitHint { remaining: Some(0), reset: Some(Duration::from_secs(u64::MAX / 4)) }, T0);
        assert_eq!(l.take(1, T0), Err(crate::policy::MAX_RETRY_AFTER));
    }

    #[test]
    fn a_later_block_never_shortens_an_earlier_one() {
        let mut l = limited(10.0, 1);
        l.throttled(Some(Duration::from_secs(10)), T0);
        l.throttled(Some(Duration::from_secs(1)), T0);
        assert_eq!(l.take(1, T0.plus(Duration::from_secs(5))), Err(Duration::from_secs(5)));
    }

    proptest! {
        /// Over any run of takes, no more than burst + rate × elapsed tokens are handed out.
        #[test]
        fn never_exceeds_the_configured_rate(rps in 0.5f64..200.0, burst in 1u32..50, steps in proptest::collection::vec(0u64..500, 1..200)) {
            let mut l = limited(rps, burst);
            let mut now = T0;
            let mut taken = 0usize;
            for step in steps {
                now = now.plus(ms(step));
                if let Ok(n) = l.take(3, now) {
                    taken += n;
                }
            }
            let allowed = f64::from(burst) + rps * now.since(T0).as_secs_f64();
            prop_assert!(taken as f64 <= allowed + 1e-6, "took {} > allowed {}", taken, allowed);
        }
    }
}
