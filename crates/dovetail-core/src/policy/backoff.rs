//! Exponential backoff with jitter and a retry budget.
//!
//! The delay before retry *n* (1-based) is `initial * 2^(n-1)` capped at
//! `max`, then jittered downward by up to `jitter` of itself so that many
//! records failing together do not come back together. A `Retry-After` from
//! the partner is a floor: a record is never retried before the partner said.

use std::time::Duration;

use serde::Serialize;

/// A source of uniform samples in `[0, 1)`; injected so schedules are testable.
pub trait Jitter: Send + Sync {
    fn sample(&self) -> f64;
}

/// Jitter from a thread-local PRNG; fine for spreading retries, not for secrets.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn sample(&self) -> f64 {
        fastrand::f64()
    }
}

/// The connector's retry policy (`retry = { max_attempts, initial_backoff, max_backoff, jitter }`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Transient failures a record may have before it is dead-lettered.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Fraction in `[0, 1]` of each delay that is randomised away.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            jitter: 0.5,
        }
    }
}

/// The longest `Retry-After` honoured; a partner asking for more is capped so
/// a typo on their side cannot park records for a year.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

impl RetryPolicy {
    /// The un-jittered delay before retry number `retry` (1-based).
    pub fn base_delay(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(63);
        let factor = 1u64.checked_shl(exp).unwrap_or(u64::MAX);
        let ms = u64::try_from(self.initial_backoff.as_millis()).unwrap_or(u64::MAX).saturating_mul(factor);
        Duration::from_millis(ms).min(self.max_backoff)
    }

    /// After the `failures`-th transient failure, how long to wait before the
    /// next attempt, or `None` when the budget is spent and the record is to
    /// be dead-lettered.
    pub fn next_delay(&self, failures: u32, retry_after: Option<Duration>, jitter: &dyn Jitter) -> Option<Duration> {
        if failures >= self.max_attempts {
            return None;
        }
        let base = self.base_delay(failures);
        let spread = self.jitter.clamp(0.0, 1.0) * jitter.sample().clamp(0.0, 1.0);
        let jittered = base.mul_f64(1.0 - spread);
        let floor = retry_after.map(|d| d.min(MAX_RETRY_AFTER)).unwrap_or_default();
        Some(jittered.max(floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Fixed(f64);
    impl Jitter for Fixed {
        fn sample(&self) -> f64 {
            self.0
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            jitter: 0.5,
        }
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let p = policy();
        let secs: Vec<u64> = (1..=8).map(|n| p.base_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn without_jitter_sample_the_delay_is_the_base() {
        let p = policy();
        assert_eq!(p.next_delay(3, None, &Fixed(0.0)), Some(Duration::from_secs(4)));
    }

    #[test]
    fn jitter_shortens_by_at_most_its_fraction() {
        let p = policy();
        assert_eq!(p.next_delay(3, None, &Fixed(1.0)), Some(Duration::from_secs(2)));
        assert_eq!(p.next_delay(3, None, &Fixed(0.5)), Some(Duration::from_secs(3)));
    }

    #[test]
    fn budget_is_spent_after_max_attempts() {
        let p = policy();
        assert!(p.next_delay(5, None, &Fixed(0.0)).is_some());
        assert_eq!(p.next_delay(6, None, &Fixed(0.0)), None);
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = policy();
        let d = p.next_delay(1, Some(Duration::from_secs(30)), &Fixed(0.0));
        assert_eq!(d, Some(Duration::from_secs(30)));
        let d = p.next_delay(1, Some(Duration::from_secs(365 * 86_400)), &Fixed(0.0));
        assert_eq!(d, Some(MAX_RETRY_AFTER));
    }

    proptest! {
        #[test]
        fn delay_stays_within_bounds(
            failures in 1u32..100,
            initial_ms in 1u64..10_000,
            max_ms in 1u64..1_000_000,
            jitter in 0.0f64..=1.0,
            sample in 0.0f64..1.0,
            retry_after_ms in proptest::option::of(0u64..100_000),
        ) {
            let p = RetryPolicy {
                max_attempts: 1000,
                initial_backoff: Duration::from_millis(initial_ms),
                max_backoff: Duration::from_millis(max_ms),
                jitter,
            };
            let ra = retry_after_ms.map(Duration::from_millis);
            let d = p.next_delay(failures, ra, &Fixed(sample)).unwrap();
            let base = p.base_delay(failures);
            prop_assert!(base <= p.max_backoff);
            prop_assert!(d >= ra.unwrap_or_default());
            prop_assert!(d <= base.max(ra.unwrap_or_default()));
            prop_assert!(d >= base.mul_f64(1.0 - jitter) - Duration::from_millis(1));
        }

        #[test]
        fn base_delay_never_decreases(initial_ms in 1u64..10_000, max_ms in 1u64..1_000_000, n in 1u32..200) {
            let p = RetryPolicy { max_attempts: 10, initial_backoff: Duration::from_millis(initial_ms), max_backoff: Duration::from_millis(max_ms), jitter: 0.0 };
            prop_assert!(p.base_delay(n) <= p.base_delay(n + 1));
        }
    }
}
