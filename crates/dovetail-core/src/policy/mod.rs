//! Delivery policies: what an answer means and when to try again.
//!
//! Plain functions and values, no I/O: the engine asks them, the tests drive
//! them with fixed inputs and a fake clock.

mod backoff;
mod breaker;
mod classify;
mod quota;
mod rate;
mod retry_after;

pub use backoff::{Jitter, MAX_RETRY_AFTER, RandomJitter, RetryPolicy};
pub use breaker::{Admission, Breaker, BreakerPolicy, BreakerState, Transition};
pub use classify::{Answer, ErrorClass, ServiceAnswer, Verdict, classify};
pub use quota::{QuotaAlert, QuotaPolicy, QuotaUsage, Window};
pub use rate::{LimitHint, LimiterState, RateLimit, RateLimiter};
pub use retry_after::parse_retry_after;
