//! The durable journal: every record, its state and every attempt.
//!
//! A record is acknowledged to its source only after [`Journal::ingest`]
//! returns, and that happens only after the transaction holding it has been
//! committed to disk. Concurrent ingests are group-committed: many records,
//! one transaction, one fsync.
//!
//! Backends implement [`Journal`] and must pass [`conformance`], the suite
//! that pins down the semantics (leases, de-duplication, retries, the DLQ,
//! the minute roll-ups). [`SqliteJournal`] is the embedded default.
//!
//! This crate depends only on `dovetail-core`; it knows nothing of HTTP,
//! flows' configuration or the engine.

pub mod conformance;
mod sqlite;
mod stats;
mod wal_vfs;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use dovetail_core::clock::Timestamp;
use dovetail_core::policy::ErrorClass;
use dovetail_core::record::{Attempt, RecordId, StateName};
use dovetail_core::rollup::MinuteRollup;

pub use sqlite::{SqliteJournal, SqliteOptions};
pub use stats::{COMMIT_BUCKETS, DurationHistogram, WriterStats};

/// What went wrong talking to the store. Messages name the store and the operation.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {location}: {source}")]
    Sqlite {
        location: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("journal {location}: cannot open: {reason}")]
    Open { location: String, reason: String },
    /// A write whose transaction failed as a whole (disk full, the size
    /// cap, an I/O error): nothing of it was stored.
    #[error("journal {location}: not stored: {reason}")]
    NotStored { location: String, reason: String },
    #[error("journal is shut down")]
    Closed,
    #[error(
        "journal {location} holds data written by a newer Dovetail (schema {found}, this build knows {known}); upgrade dovetail"
    )]
    SchemaTooNew { location: String, found: i64, known: i64 },
}

pub type Result<T> = std::result::Result<T, JournalError>;

/// A record as its source hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    pub flow: String,
    /// The source's own id for this delivery (e.g. `webhook-id`); the same id
    /// twice in one flow is journalled once.
    pub delivery_id: Option<String>,
    /// The record's stable key in the source system (from the flow's `key`).
    pub external_key: Option<String>,
    pub idempotency_key: String,
    pub correlation_id: String,
    pub content_type: Option<String>,
    pub payload: Vec<u8>,
    pub received_at: Timestamp,
    /// Set when the record is unusable as received: it is kept, dead, with this reason.
    pub quarantine: Option<(ErrorClass, String)>,
    /// `Some` when intake validated and mapped the record with the flow's
    /// configuration; `None` for a record that was not (a quarantined one,
    /// which has `quarantine` set). Must be `None` whenever `quarantine` is
    /// `Some`: the store ignores it for a quarantined record, which is
    /// validated and mapped again if it is ever replayed.
    pub prepared: Option<Prepared>,
}

/// What validation and mapping made of a record's raw payload: the body to
/// send and which mappings produced it. The raw payload is kept apart,
/// unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prepared {
    /// The mapped body to send. `None` means "send the raw payload as is":
    /// a flow without a mapping.
    pub body: Option<Vec<u8>>,
    /// The version of the flow's mapping that produced `body`.
    pub mapping_version: Option<u32>,
    /// The version of the sink mapping applied after the flow's, if any.
    pub sink_mapping_version: Option<u32>,
}

/// The answer to an ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    New(RecordId),
    /// Already journalled under this flow and delivery id.
    Duplicate(RecordId),
}

impl Ingested {
    pub fn id(self) -> RecordId {
        match self {
            Ingested::New(id) | Ingested::Duplicate(id) => id,
        }
    }
}

/// A record leased for one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedRecord {
    pub id: RecordId,
    pub flow: String,
    pub idempotency_key: String,
    pub correlation_id: String,
    pub content_type: Option<String>,
    pub payload: Vec<u8>,
    /// The number of this attempt (1 for the first).
    pub attempt: u32,
    /// Transient failures so far, including attempts interrupted by a crash.
    pub failures: u32,
    pub lease_until: Timestamp,
    /// For records leased in [`LeaseMode::Batch`]: the bulk request's idempotency key.
    pub batch_key: Option<String>,
    /// `Some` iff the record is prepared (validated and mapped with the
    /// flow's configuration at intake or by an earlier attempt). `None`: the
    /// lease holder must validate and map `payload`, and store the result
    /// with [`Journal::prepare`], before sending.
    pub prepared: Option<Prepared>,
}

/// Which due records a lease takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseMode {
    /// The oldest due records, in parallel.
    Oldest,
    /// Only the oldest open record of each external key: one key's records
    /// go out one at a time, in order of arrival. Records without a key are
    /// not held back.
    InKeyOrder,
    /// One batch for a bulk request, bound to the batch's idempotency key
    /// (derived from its records' keys). A batch whose attempt was kept bound
    /// (see [`AttemptReport::keep_batch`]) is leased again whole, as soon as
    /// its oldest record is due, and never mixed with other records: its
    /// retry carries the same key, so a partner that applied it before
    /// answers from its idempotency store.
    Batch,
}

/// Which records an operator action applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Ids(Vec<RecordId>),
    Flow(String),
    All,
}

/// Where a record goes after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Transient failure: back to pending, due at `at`.
    Retry {
        at: Timestamp,
    },
    Dead {
        class: ErrorClass,
        reason: String,
    },
    /// Not the record's fault and not transient (credentials): back to
    /// pending without spending its retry budget; the caller pauses the flow.
    Hold {
        at: Timestamp,
    },
}

/// The result of one attempt, written by the lease holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptReport {
    pub id: RecordId,
    /// Must match the lease; a report from a lease that expired and was taken over is ignored.
    pub owner: String,
    pub attempt: Attempt,
    pub outcome: Outcome,
    /// Keep the record bound to its batch: the bulk request's fate is
    /// unknown, so the same records must go again under the same key.
    pub keep_batch: bool,
    /// The connector whose quota this attempt's request used, if it has one.
    /// Counted even when the lease was lost: the request was sent.
    pub quota: Option<String>,
}

/// Requests counted against a connector's quota in the windows holding an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct QuotaUsed {
    pub this_hour: u64,
    pub today: u64,
}

/// Counts per flow for `dovetail status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct FlowCounts {
    pub flow: String,
    pub pending: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub dead: u64,
    /// Of `dead`, those quarantined as unusable (class `validation`).
    pub quarantined: u64,
    pub discarded: u64,
    /// When the oldest record still waiting (pending or in flight) arrived.
    pub oldest_pending_at: Option<Timestamp>,
    pub paused: Option<Pause>,
}

/// Why a flow is paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pause {
    pub since: Timestamp,
    pub reason: String,
}

/// A connector's health as the engine last recorded it: breaker state and
/// pace. Written on breaker transitions and throttling, so `dovetail status`
/// can show it from another process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectorHealth {
    pub connector: String,
    /// `closed`, `open` or `half_open`.
    pub breaker: String,
    /// When the breaker entered this state.
    pub since: Timestamp,
    pub open_until: Option<Timestamp>,
    /// Why the breaker last changed state.
    pub reason: Option<String>,
    /// Current client-side pace (requests per second), when a rate is configured.
    pub current_rate: Option<f64>,
    pub configured_rate: Option<f64>,
    /// Nothing is sent to the connector before this (Retry-After, RateLimit-Reset).
    pub blocked_until: Option<Timestamp>,
    pub updated_at: Timestamp,
}

/// A drift event as stored, with its flow and id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredDrift {
    pub id: i64,
    pub flow: String,
    #[serde(flatten)]
    pub event: dovetail_core::shape::DriftEvent,
}

/// A dead-letter queue entry, without its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub id: RecordId,
    pub flow: String,
    pub class: ErrorClass,
    pub reason: String,
    pub dead_at: Timestamp,
    pub received_at: Timestamp,
    pub attempts: u32,
    pub correlation_id: String,
}

/// Everything known about one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordDetail {
    pub id: RecordId,
    pub flow: String,
    pub state: StateName,
    pub delivery_id: Option<String>,
    pub external_key: Option<String>,
    pub idempotency_key: String,
    pub correlation_id: String,
    pub content_type: Option<String>,
    /// The raw payload exactly as received.
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// The mapped body, when the record is prepared by a mapping (`None`
    /// with `prepared`: the raw payload is sent as is).
    #[serde(skip)]
    pub mapped: Option<Vec<u8>>,
    pub mapping_version: Option<u32>,
    pub sink_mapping_version: Option<u32>,
    /// Validated and mapped with the flow's configuration; a record that is
    /// not is validated and mapped again at its next lease.
    pub prepared: bool,
    pub received_at: Timestamp,
    pub next_attempt_at: Option<Timestamp>,
    pub lease_until: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// When retention removed the payload and the mapped body (the record's metadata stays).
    pub payload_purged_at: Option<Timestamp>,
    pub dead_class: Option<ErrorClass>,
    pub dead_reason: Option<String>,
    pub attempts: Vec<Attempt>,
}

/// The durable store of records. Every method is one transaction.
///
/// Time is always passed in, never read, so backends are deterministic
/// under test.
#[async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Stores a record durably (or finds its duplicate) before returning; a
    /// new record is counted in its minute's roll-up ([`Journal::minutes`]).
    async fn ingest(&self, record: NewRecord) -> Result<Ingested>;

    /// Leases up to `limit` records of `flow` that are due at `now`: pending
    /// ones whose time has come, and in-flight ones whose lease expired
    /// (their lost attempt is recorded as `interrupted` and counts as a
    /// failure). Which records are due depends on `mode`.
    async fn lease_with(
        &self,
        mode: LeaseMode,
        flow: &str,
        owner: &str,
        now: Timestamp,
        lease_for: Duration,
        limit: usize,
    ) -> Result<Vec<LeasedRecord>>;

    /// [`Journal::lease_with`] in [`LeaseMode::Oldest`].
    async fn lease(
        &self,
        flow: &str,
        owner: &str,
        now: Timestamp,
        lease_for: Duration,
        limit: usize,
    ) -> Result<Vec<LeasedRecord>> {
        self.lease_with(LeaseMode::Oldest, flow, owner, now, lease_for, limit).await
    }

    /// Records an attempt and moves the record on, and counts it in the
    /// roll-up of the minute it started ([`Journal::minutes`]); `false` (and
    /// nothing counted) if `owner` no longer holds the lease.
    async fn complete(&self, report: AttemptReport) -> Result<bool>;

    /// Records several attempts in one transaction (a bulk request's records).
    async fn complete_many(&self, reports: Vec<AttemptReport>) -> Result<Vec<bool>> {
        let mut applied = Vec::with_capacity(reports.len());
        for r in reports {
            applied.push(self.complete(r).await?);
        }
        Ok(applied)
    }

    /// When the next record of `flow` becomes due (pending or lease expiry), if any.
    async fn next_due(&self, flow: &str) -> Result<Option<Timestamp>>;

    /// Counts per flow, for every flow that has records or is paused.
    async fn counts(&self) -> Result<Vec<FlowCounts>>;

    /// Dead letters, oldest first.
    async fn dead_letters(&self, flow: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>>;

    async fn record(&self, id: RecordId) -> Result<Option<RecordDetail>>;

    /// Stores the preparation a lease holder made for a record leased
    /// unprepared, only while `owner` holds the lease for `attempt`. The
    /// dispatcher calls it *before* sending, so that whatever goes out is
    /// stored first and every later attempt sends exactly the same body.
    /// `false`: the lease is lost; nothing was written and nothing may be sent.
    async fn prepare(&self, id: RecordId, owner: &str, attempt: u32, prepared: Prepared) -> Result<bool>;

    /// Records named by `needle`: a record id, a correlation id, a delivery
    /// id or an external key; newest first, at most `limit`. Scans the
    /// records (an operator lookup, not a hot path).
    async fn find(&self, needle: &str, limit: usize) -> Result<Vec<RecordId>>;

    /// How many dead records `selector` matches.
    async fn count_dead(&self, selector: &Selector) -> Result<u64>;

    /// Moves up to `limit` records that were dead at `now` (dead-lettered at
    /// or before it) back to pending, due at `now`, with their idempotency
    /// key unchanged and a fresh retry budget. Their preparation is cleared:
    /// each is validated and mapped again, with the current configuration, at
    /// its next lease. Calling it in chunks with the same `now` never picks
    /// up a record that died again meanwhile.
    async fn replay(&self, selector: &Selector, now: Timestamp, limit: usize) -> Result<u64>;

    /// Marks up to `limit` records that were dead at `now` discarded (kept, never delivered).
    async fn discard(&self, selector: &Selector, now: Timestamp, limit: usize) -> Result<u64>;

    async fn pause_flow(&self, flow: &str, reason: &str, now: Timestamp) -> Result<()>;
    async fn resume_flow(&self, flow: &str) -> Result<bool>;
    async fn pause_of(&self, flow: &str) -> Result<Option<Pause>>;

    /// Replaces the recorded health of `health.connector`.
    async fn set_connector_health(&self, health: ConnectorHealth) -> Result<()>;

    /// Every connector's recorded health, by name.
    async fn connector_health(&self) -> Result<Vec<ConnectorHealth>>;

    /// Requests counted for `connector` in the UTC hour and day holding `at`.
    async fn quota_used(&self, connector: &str, at: Timestamp) -> Result<QuotaUsed>;

    /// Removes the payloads (raw and mapped) of up to `limit` of `flow`'s
    /// delivered or discarded records that finished before `before`; the
    /// records, their keys and attempts stay. Dead and waiting records keep
    /// their payloads.
    async fn purge_payloads(&self, flow: &str, before: Timestamp, now: Timestamp, limit: usize) -> Result<u64>;

    /// Keeps a flow's learned payload shape (serialized by the caller).
    async fn save_shape(&self, flow: &str, shape: String, now: Timestamp) -> Result<()>;
    async fn load_shape(&self, flow: &str) -> Result<Option<String>>;

    /// Keeps a piece of the engine's own state (the alert book) under `key`,
    /// replacing what was there; serialized by the caller.
    async fn save_state(&self, key: &str, value: String, now: Timestamp) -> Result<()>;
    async fn load_state(&self, key: &str) -> Result<Option<String>>;

    /// Records drift events of a flow.
    async fn record_drift(&self, flow: &str, events: Vec<dovetail_core::shape::DriftEvent>) -> Result<()>;

    /// Drift events, newest first.
    async fn drift_events(&self, flow: Option<&str>, limit: usize) -> Result<Vec<StoredDrift>>;

    /// The minute roll-ups of `flow` (of every flow: `None`) for the minutes
    /// that overlap `[since, until)` ([`dovetail_core::rollup::minute_range`]),
    /// ordered by flow, then minute; a minute without traffic has none.
    ///
    /// A backend writes them in the same transaction as what they count, by
    /// the rules of [`dovetail_core::rollup`]: [`Journal::ingest`] counts a
    /// new record (received, quarantined) in the minute of its `received_at`;
    /// [`Journal::complete`] and [`Journal::complete_many`] count each report
    /// that applies (delivered with its latency and end, failed by class,
    /// dead, retried) in the minute its attempt started; a lease that takes
    /// back an expired one counts its lost attempt as an `interrupted`
    /// failure in the minute it was leased. Operator actions (replay,
    /// discard) count nothing.
    async fn minutes(&self, flow: Option<&str>, since: Timestamp, until: Timestamp) -> Result<Vec<MinuteRollup>>;

    /// Deletes the roll-ups of every minute that ended at or before `before`
    /// (the minute holding `before` stays), for retention; returns how many.
    async fn prune_minutes(&self, before: Timestamp) -> Result<u64>;

    /// Succeeds when the store can take writes.
    async fn ping(&self) -> Result<()>;

    /// Whether another process (the CLI's `dlq replay` or `resume`) has
    /// committed to the store since the last call; the first call only
    /// starts counting. The engine asks every few hundred milliseconds and
    /// wakes its flows. `false` from a store that cannot tell: there such
    /// changes wait for the dispatchers' idle poll.
    async fn changed_elsewhere(&self) -> Result<bool> {
        Ok(false)
    }

    /// What the store's writer has done since it opened (commits, the jobs
    /// they carried, how long each took), for metrics; `None` from a store
    /// that does not count them.
    fn writer_stats(&self) -> Option<WriterStats> {
        None
    }
}
