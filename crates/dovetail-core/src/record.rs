//! A record and the states it moves through.
//!
//! ```text
//!   intake ──► Pending ──lease──► InFlight ──2xx──► Delivered
//!                ▲  ▲                │
//!                │  └── retry/auth ──┤   (transient: later; auth: flow paused)
//!                │                   └──refused / budget spent──► Dead ──discard──► Discarded
//!                └────────────── replay ─────────────────────────────┘
//! ```
//!
//! Each state carries exactly the data it has: a lease has an expiry and an
//! owner, a dead record has a class and a reason.

use serde::Serialize;

use crate::clock::Timestamp;
use crate::policy::ErrorClass;

/// Journal-assigned record id.
pub type RecordId = i64;

/// Where a record is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// Waiting for delivery, not before `next_attempt_at`.
    Pending {
        next_attempt_at: Timestamp,
    },
    /// Leased by a dispatcher until `lease_until`; after that anyone may take it.
    InFlight {
        lease_until: Timestamp,
        owner: String,
    },
    Delivered {
        at: Timestamp,
    },
    /// Parked in the dead-letter queue.
    Dead {
        at: Timestamp,
        class: ErrorClass,
        reason: String,
    },
    /// Removed from the dead-letter queue by an operator; kept for the audit trail.
    Discarded {
        at: Timestamp,
    },
}

impl RecordState {
    pub fn name(&self) -> StateName {
        match self {
            RecordState::Pending { .. } => StateName::Pending,
            RecordState::InFlight { .. } => StateName::InFlight,
            RecordState::Delivered { .. } => StateName::Delivered,
            RecordState::Dead { .. } => StateName::Dead,
            RecordState::Discarded { .. } => StateName::Discarded,
        }
    }
}

/// The state without its data, for counts, filters and storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateName {
    Pending,
    InFlight,
    Delivered,
    Dead,
    Discarded,
}

impl StateName {
    pub const fn as_str(self) -> &'static str {
        match self {
            StateName::Pending => "pending",
            StateName::InFlight => "in_flight",
            StateName::Delivered => "delivered",
            StateName::Dead => "dead",
            StateName::Discarded => "discarded",
        }
    }

    pub fn parse(s: &str) -> Option<StateName> {
        [StateName::Pending, StateName::InFlight, StateName::Delivered, StateName::Dead, StateName::Discarded]
            .into_iter()
            .find(|n| n.as_str() == s)
    }
}

/// One delivery attempt as it is kept in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    /// 1-based, per record.
    pub number: u32,
    pub started_at: Timestamp,
    pub duration_ms: u64,
    /// HTTP status if the partner answered.
    pub status: Option<u16>,
    /// `None` when the attempt delivered.
    pub class: Option<ErrorClass>,
    /// What went wrong, including the partner's response body (truncated).
    pub error: Option<String>,
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
