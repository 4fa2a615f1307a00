//! Classification of one delivery attempt's result, before anything is retried.
//!
//! The rules come from the product brief: 2xx delivered; 400/404/409/422
//! and the other 4xx are the partner refusing this record (dead-letter at
//! once, keep the body); 401/403 are our credentials (pause the flow, keep
//! the record); 429 waits as long as `Retry-After` says; 408, 5xx, timeouts
//! and dropped connections are transient.
//!
//! One refinement: every request carries an `Idempotency-Key`, and under the
//! IETF idempotency-key draft a 409 to a key that was sent before means "a
//! request with this key is still being processed" (our earlier attempt timed
//! out or lost its connection while the partner kept working). That 409 is
//! transient; a 409 to a first attempt is a real conflict.
//!
//! Status codes outside 1xx–5xx are treated as transient so that a record
//! is never dead-lettered on a guess; the retry budget still bounds them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What came back from one attempt, reduced to what the policy needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The partner answered with a status; `retry_after` is already resolved
    /// to a delay relative to the moment the answer arrived.
    Status { status: u16, retry_after: Option<Duration> },
    /// The request did not complete within the connector's timeout.
    Timeout,
    /// The connection failed or was dropped before a full answer arrived.
    Connection,
    /// A database or broker sink's answer, in its own terms.
    Service(ServiceAnswer),
}

/// What a database or a broker said to one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceAnswer {
    /// Committed (a database) or confirmed (a broker's ack).
    Applied,
    /// The record itself cannot be written (a constraint or type error, a
    /// message nobody can route): sending it again changes nothing.
    Refused,
    /// Our credentials or permissions were refused.
    Denied,
    /// The service failed or is shutting down (a serialization failure, a
    /// broker's nack): sending again may succeed.
    Unavailable,
}

/// Why an attempt did not deliver; stored with each attempt and shown in the DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The partner rejected the record (400, 404, 409, 422, other 4xx).
    Rejected,
    /// Our credentials were refused (401, 403).
    Auth,
    /// Throttled (429).
    RateLimited,
    /// The partner failed (5xx).
    Server,
    Timeout,
    Connection,
    /// The engine stopped while the attempt was in flight (its lease expired).
    Interrupted,
    /// 409 to a key sent before: the partner is still processing an earlier attempt.
    InProgress,
    /// The record itself is unusable (e.g. its body is not JSON).
    Validation,
}

impl ErrorClass {
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Rejected => "rejected",
            ErrorClass::Auth => "auth",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Server => "server",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Connection => "connection",
            ErrorClass::Interrupted => "interrupted",
            ErrorClass::InProgress => "in_progress",
            ErrorClass::Validation => "validation",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorClass> {
        [
            ErrorClass::Rejected,
            ErrorClass::Auth,
            ErrorClass::RateLimited,
            ErrorClass::Server,
            ErrorClass::Timeout,
            ErrorClass::Connection,
            ErrorClass::Interrupted,
            ErrorClass::InProgress,
            ErrorClass::Validation,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// What to do with the record after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Not transient: dead-letter now.
    DeadLetter(ErrorClass),
    /// Not transient and not the record's fault: hold the record, pause the flow.
    PauseFlow,
    /// Transient: try again, no earlier than `not_before` after now if given.
    Retry {
        class: ErrorClass,
        not_before: Option<Duration>,
    },
}

/// Classifies one attempt's answer. `key_sent_before` is true when this
/// record's idempotency key went out in an earlier attempt.
pub fn classify(answer: &Answer, key_sent_before: bool) -> Verdict {
    match *answer {
        Answer::Status { status, retry_after } => match status {
            200..=299 => Verdict::Delivered,
            401 | 403 => Verdict::PauseFlow,
            409 if key_sent_before => Verdict::Retry { class: ErrorClass::InProgress, not_before: retry_after },
            408 => Verdict::Retry { class: ErrorClass::Timeout, not_before: retry_after },
            429 => Verdict::Retry { class: ErrorClass::RateLimited, not_before: retry_after },
            400..=499 => Verdict::DeadLetter(ErrorClass::Rejected),
            500..=599 => Verdict::Retry { class: ErrorClass::Server, not_before: retry_after },
            // 1xx/3xx reaching us means a misconfigured endpoint or redirect
            // loop; retrying within the budget is safer than dropping.
            _ => Verdict::Retry { class: ErrorClass::Server, not_before: retry_after },
        },
        Answer::Timeout => Verdict::Retry { class: ErrorClass::Timeout, not_before: None },
        Answer::Connection => Verdict::Retry { class: ErrorClass::Connection, not_before: None },
        Answer::Service(ServiceAnswer::Applied) => Verdict::Delivered,
        Answer::Service(ServiceAnswer::Refused) => Verdict::DeadLetter(ErrorClass::Rejected),
        Answer::Service(ServiceAnswer::Denied) => Verdict::PauseFlow,
        Answer::Service(ServiceAnswer::Unavailable) => Verdict::Retry { class: ErrorClass::Server, not_before: None },
    }
}

impl Answer {
    /// Whether the answer says the other side is working (for the breaker):
    /// anything but a timeout, a dropped connection or a server failure.
    pub fn healthy(&self) -> bool {
        match *self {
            Answer::Status { status, .. } => !(status == 408 || status >= 500),
            Answer::Timeout | Answer::Connection | Answer::Service(ServiceAnswer::Unavailable) => false,
            Answer::Service(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> Verdict {
        classify(&Answer::Status { status: s, retry_after: None }, false)
    }

    #[test]
    fn service_answers_map_onto_the_same_verdicts() {
        let v = |a| classify(&Answer::Service(a), true);
        assert_eq!(v(ServiceAnswer::Applied), Verdict::Delivered);
        assert_eq!(v(ServiceAnswer::Refused), Verdict::DeadLetter(ErrorClass::Rejected));
        assert_eq!(v(ServiceAnswer::Denied), Verdict::PauseFlow);
        assert_eq!(v(ServiceAnswer::Unavailable), Verdict::Retry { class: ErrorClass::Server, not_before: None });
        assert!(!Answer::Service(ServiceAnswer::Unavailable).healthy());
        assert!(Answer::Service(ServiceAnswer::Refused).healthy());
        assert!(!Answer::Status { status: 503, retry_after: None }.healthy());
    }

    #[test]
    fn success_is_delivered() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(status(s), Verdict::Delivered, "{s}");
        }
    }

    #[test]
    fn refusals_of_the_record_are_dead_lettered_at_once() {
        for s in [400, 404, 409, 410, 422] {
            assert_eq!(status(s), Verdict::DeadLetter(ErrorClass::Rejected), "{s}");
        }
    }

    #[test]
    fn a_409_to_a_retried_key_means_still_processing() {
        let again = classify(&Answer::Status { status: 409, retry_after: Some(Duration::from_secs(2)) }, true);
        assert_eq!(again, Verdict::Retry { class: ErrorClass::InProgress, not_before: Some(Duration::from_secs(2)) });
        let first = classify(&Answer::Status { status: 409, retry_after: None }, false);
        assert_eq!(first, Verdict::DeadLetter(ErrorClass::Rejected), "a 409 to a first attempt is a real conflict");
        let other = classify(&Answer::Status { status: 422, retry_after: None }, true);
        assert_eq!(other, Verdict::DeadLetter(ErrorClass::Rejected), "only 409 gets this reading");
    }

    #[test]
    fn auth_failures_pause_and_are_never_retried_or_dead_lettered() {
        assert_eq!(status(401), Verdict::PauseFlow);
        assert_eq!(status(403), Verdict::PauseFlow);
    }

    #[test]
    fn throttling_carries_retry_after() {
        let v = classify(&Answer::Status { status: 429, retry_after: Some(Duration::from_secs(7)) }, false);
        assert_eq!(v, Verdict::Retry { class: ErrorClass::RateLimited, not_before: Some(Duration::from_secs(7)) });
        let v = classify(&Answer::Status { status: 503, retry_after: Some(Duration::from_secs(3)) }, false);
        assert_eq!(v, Verdict::Retry { class: ErrorClass::Server, not_before: Some(Duration::from_secs(3)) });
    }

    #[test]
    fn server_errors_timeouts_and_dropped_connections_are_transient() {
        for s in [500, 502, 503, 504] {
            assert!(matches!(status(s), Verdict::Retry { class: ErrorClass::Server, .. }), "{s}");
        }
        assert!(matches!(classify(&Answer::Timeout, false), Verdict::Retry { class: ErrorClass::Timeout, .. }));
        assert!(matches!(classify(&Answer::Connection, false), Verdict::Retry { class: ErrorClass::Connection, .. }));
    }

    #[test]
    fn error_class_names_round_trip() {
        for c in [
            ErrorClass::Rejected,
            ErrorClass::Auth,
            ErrorClass::Interrupted,
            ErrorClass::InProgress,
            ErrorClass::Validation,
        ] {
            assert_eq!(ErrorClass::parse(c.as_str()), Some(c));
        }
    }
}
