//! The embedded journal: one SQLite file in WAL mode.
//!
//! All writes go through one writer thread that owns the write connection.
//! It takes every job waiting in its queue, runs them in one `BEGIN
//! IMMEDIATE` transaction, commits once, and only then answers the callers.
//! If a job fails, the transaction is rolled back and the group run again
//! with each job in its own savepoint, so one failing job cannot leave half
//! its writes behind. Roll-up counts are gathered in memory and written
//! once per flow and minute before the commit. That is group commit: under load, hundreds of
//! ingests share one fsync, and no caller hears "stored" before its record
//! is on disk. Reads use a second connection, which WAL lets run beside the
//! writer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};
use tokio::sync::{mpsc, oneshot};

use dovetail_core::clock::Timestamp;
use dovetail_core::policy::{ErrorClass, Window};
use dovetail_core::record::{Attempt, RecordId, StateName};
use dovetail_core::rollup::{
    LATENCY_BUCKET_COUNT, LATENCY_BUCKETS_MS, MinuteRollup, bucket_of, minute_of, minute_range,
};
use dovetail_core::shape::{DriftEvent, DriftKind, JsonType};

use crate::stats::WriterCounters;
use crate::wal_vfs;
use crate::{
    AttemptReport, ConnectorHealth, DeadLetter, FlowCounts, Ingested, Journal, JournalError, LeaseMode, LeasedRecord,
    NewRecord, Outcome, Pause, Prepared, QuotaUsed, RecordDetail, Result, Selector, StoredDrift, WriterStats,
};

/// 1: the first release. 2: `records.external_key`, `batch_key`, `payload_purged_at`.
/// 3: `records.mapped`, `mapping_version`, `sink_mapping_version`, `prepared`
/// (records of older files are not prepared: validated and mapped again at
/// their next lease). 4: the `flow_minutes` roll-ups (an older file starts
/// with none). 5: `flow_counts`, the records of each flow in each state,
/// kept by every write in its own transaction (counted from the records
/// once, when an older file is opened), instead of the `records_state`
/// index, which every state change rewrote twice and every `counts()`
/// scanned whole.
const SCHEMA_VERSION: i64 = 5;

/// Columns added to `records` since version 1, with their declarations.
/// `CREATE TABLE IF NOT EXISTS` leaves an older file's table as it was, so
/// [`migrate`] adds whichever of these it lacks.
const ADDED_COLUMNS: [(&str, &str); 7] = [
    ("external_key", "TEXT"),
    ("batch_key", "TEXT"),
    ("payload_purged_at", "INTEGER"),
    ("mapped", "BLOB"),
    ("mapping_version", "INTEGER"),
    ("sink_mapping_version", "INTEGER"),
    ("prepared", "INTEGER NOT NULL DEFAULT 0"),
];

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS records (
    id              INTEGER PRIMARY KEY,
    flow            TEXT    NOT NULL,
    delivery_id     TEXT,
    external_key    TEXT,
    batch_key       TEXT,
    payload_purged_at INTEGER,
    mapped          BLOB,
    mapping_version INTEGER,
    sink_mapping_version INTEGER,
    prepared        INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT    NOT NULL,
    correlation_id  TEXT    NOT NULL,
    content_type    TEXT,
    payload         BLOB    NOT NULL,
    received_at     INTEGER NOT NULL,
    state           TEXT    NOT NULL,
    next_attempt_at INTEGER,
    lease_owner     TEXT,
    lease_until     INTEGER,
    leased_at       INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0,
    failures        INTEGER NOT NULL DEFAULT 0,
    finished_at     INTEGER,
    dead_class      TEXT,
    dead_reason     TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS records_delivery ON records (flow, delivery_id) WHERE delivery_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_pending  ON records (flow, next_attempt_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS records_inflight ON records (flow, lease_until)     WHERE state = 'in_flight';
CREATE INDEX IF NOT EXISTS records_dead     ON records (flow, id)              WHERE state = 'dead';
CREATE TABLE IF NOT EXISTS flow_counts (
    flow  TEXT    NOT NULL,
    state TEXT    NOT NULL,
    n     INTEGER NOT NULL,
    PRIMARY KEY (flow, state)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    record_id   INTEGER NOT NULL,
    number      INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    status      INTEGER,
    class       TEXT,
    error       TEXT,
    PRIMARY KEY (record_id, number)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS connector_health (
    connector       TEXT PRIMARY KEY,
    breaker         TEXT NOT NULL,
    since           INTEGER NOT NULL,
    open_until      INTEGER,
    reason          TEXT,
    current_rate    REAL,
    configured_rate REAL,
    blocked_until   INTEGER,
    updated_at      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quota_usage (
    connector TEXT NOT NULL,
    window    TEXT NOT NULL,
    start     INTEGER NOT NULL,
    used      INTEGER NOT NULL,
    PRIMARY KEY (connector, window, start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS flow_shapes (
    flow       TEXT PRIMARY KEY,
    shape      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS drift_events (
    id                INTEGER PRIMARY KEY,
    flow              TEXT NOT NULL,
    kind              TEXT NOT NULL,
    path              TEXT NOT NULL,
    json_type         TEXT NOT NULL,
    previous_types    TEXT NOT NULL,
    at                INTEGER NOT NULL,
    example_record_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS flow_pauses (
    flow   TEXT PRIMARY KEY,
    since  INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS engine_state (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
"#;

// `flow_minutes`: one row per flow and Unix minute, the counters of a
// `MinuteRollup`, PRIMARY KEY (flow, minute). Every counter, each failure
// class and each latency bucket included, is its own INTEGER column, so the
// UPSERT that counts an event adds to it in SQL (`x = x + excluded.x`)
// without reading the row back, as a TEXT or BLOB of counts would need (read,
// parse, add, write back). The cost is small: SQLite stores 0 and 1 in the
// record header alone and small counts in one or two bytes, so a row of ~35
// mostly-zero counters takes about what a comma-separated list would. The
// columns are generated from `ErrorClass` and `LATENCY_BUCKETS_MS`, and
// `migrate` adds whichever a file lacks: a new class or bound gets a column
// (starting at zero) with no other migration.

/// The failure classes counted in `flow_minutes`, one column (`fail_<class>`)
/// each, in the order of [`class_slot`].
const CLASSES: [ErrorClass; 9] = [
    ErrorClass::Rejected,
    ErrorClass::Auth,
    ErrorClass::RateLimited,
    ErrorClass::Server,
    ErrorClass::Timeout,
    ErrorClass::Connection,
    ErrorClass::Interrupted,
    ErrorClass::InProgress,
    ErrorClass::Validation,
];

/// Where a class is in [`CLASSES`]. Exhaustive, so that a new class cannot
/// go uncounted: it fails to compile here until it has a column.
const fn class_slot(class: ErrorClass) -> usize {
    match class {
        ErrorClass::Rejected => 0,
        ErrorClass::Auth => 1,
        ErrorClass::RateLimited => 2,
        ErrorClass::Server => 3,
        ErrorClass::Timeout => 4,
        ErrorClass::Connection => 5,
        ErrorClass::Interrupted => 6,
        ErrorClass::InProgress => 7,
        ErrorClass::Validation => 8,
    }
}

// Positions in a [`Tally`] and in [`COUNTER_COLUMNS`].
const RECEIVED: usize = 0;
const QUARANTINED: usize = 1;
const DELIVERED: usize = 2;
const DEAD: usize = 3;
const RETRIED: usize = 4;
const LATENCY_COUNT: usize = 5;
const LATENCY_SUM: usize = 6;
const FIRST_CLASS: usize = 7;
const FIRST_BUCKET: usize = FIRST_CLASS + CLASSES.len();
const COUNTERS: usize = FIRST_BUCKET + LATENCY_BUCKET_COUNT;

/// The counter columns of `flow_minutes`, in [`Tally`] order: `received`,
/// `quarantined`, `delivered`, `dead`, `retried`, `latency_count`,
/// `latency_sum_ms`, `fail_<class>` per [`CLASSES`], `latency_le_<bound>` per
/// bound and `latency_over` (slower than the last bound).
static COUNTER_COLUMNS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let fixed = ["received", "quarantined", "delivered", "dead", "retried", "latency_count", "latency_sum_ms"];
    let columns: Vec<String> = fixed
        .into_iter()
        .map(str::to_string)
        .chain(CLASSES.iter().map(|c| format!("fail_{}", c.as_str())))
        .chain(LATENCY_BUCKETS_MS.iter().map(|b| format!("latency_le_{b}")))
        .chain(["latency_over".to_string()])
        .collect();
    debug_assert_eq!(columns.len(), COUNTERS);
    columns
});

/// Adds a [`Tally`] to its flow and minute: `?1` flow, `?2` minute, then the
/// counters, then the latest delivery's end.
static ADD_TALLY: LazyLock<String> = LazyLock::new(|| {
    let columns = COUNTER_COLUMNS.join(", ");
    let values: Vec<String> = (3..3 + COUNTERS).map(|i| format!("?{i}")).collect();
    let sums: Vec<String> = COUNTER_COLUMNS.iter().map(|c| format!("{c} = {c} + excluded.{c}")).collect();
    format!(
        "INSERT INTO flow_minutes (flow, minute, {columns}, last_delivered_at) VALUES (?1, ?2, {}, ?{})
         ON CONFLICT (flow, minute) DO UPDATE SET {},
             last_delivered_at = COALESCE(MAX(last_delivered_at, excluded.last_delivered_at),
                                          last_delivered_at, excluded.last_delivered_at)",
        values.join(", "),
        3 + COUNTERS,
        sums.join(", ")
    )
});

/// What one event adds to its minute's roll-up.
#[derive(Clone)]
struct Tally {
    counters: [i64; COUNTERS],
    last_delivered_at: Option<i64>,
}

impl Tally {
    fn new() -> Tally {
        Tally { counters: [0; COUNTERS], last_delivered_at: None }
    }

    fn add(&mut self, other: &Tally) {
        for (mine, theirs) in self.counters.iter_mut().zip(other.counters) {
            *mine += theirs;
        }
        self.last_delivered_at = self.last_delivered_at.max(other.last_delivered_at);
    }
}

/// A write transaction: the writer's connection, plus the roll-up counts its
/// jobs added, written once per flow and minute just before the commit (one
/// upsert per record was a fifth of the writer's instructions). A job sees
/// the connection through `Deref`.
pub(crate) struct Tx<'c, 'h> {
    conn: &'c Connection,
    hot: &'h Hot<'c>,
    counted: std::cell::RefCell<Counted>,
}

/// The hot path's statements, prepared once for the writer's life and found
/// by the address of their `'static` SQL. rusqlite's statement cache hashes
/// and compares the whole SQL text to hand a statement out and again to take
/// it back: 8 % of the writer's instructions in callgrind.
pub(crate) struct Hot<'c> {
    slots: [std::cell::OnceCell<HotSlot<'c>>; 24],
}

struct HotSlot<'c> {
    sql: &'static str,
    stmt: std::cell::RefCell<rusqlite::Statement<'c>>,
}

impl Hot<'_> {
    pub(crate) fn new() -> Self {
        Hot { slots: std::array::from_fn(|_| std::cell::OnceCell::new()) }
    }
}

/// A statement from [`Hot`], or from rusqlite's cache when [`Hot`] has no
/// room or the statement is in use already.
pub(crate) enum HotStatement<'h, 'c> {
    Hot(std::cell::RefMut<'h, rusqlite::Statement<'c>>),
    Cached(rusqlite::CachedStatement<'c>),
}

impl<'c> std::ops::Deref for HotStatement<'_, 'c> {
    type Target = rusqlite::Statement<'c>;
    fn deref(&self) -> &Self::Target {
        match self {
            HotStatement::Hot(s) => s,
            HotStatement::Cached(s) => s,
        }
    }
}

impl std::ops::DerefMut for HotStatement<'_, '_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            HotStatement::Hot(s) => s,
            HotStatement::Cached(s) => s,
        }
    }
}

/// What a transaction's jobs counted, written just before it commits.
#[derive(Clone, Default)]
struct Counted {
    /// Roll-up counts by flow, then minute.
    tallies: std::collections::BTreeMap<String, std::collections::BTreeMap<i64, Tally>>,
    /// Records that entered (positive) or left (negative) each state, by
    /// flow, in the order of [`STATES`].
    moves: std::collections::BTreeMap<String, [i64; STATES.len()]>,
}

/// Every state a record can be in, as `flow_counts` and `records` spell it.
const STATES: [&str; 5] = [STATE_PENDING, STATE_IN_FLIGHT, STATE_DELIVERED, STATE_DEAD, STATE_DISCARDED];

fn state_slot(state: &str) -> usize {
    STATES.iter().position(|s| *s == state).unwrap_or_else(|| unreachable!("unknown record state `{state}`"))
}

/// `flow`'s entry, looked up by `&str`: the flow's name is copied once per
/// transaction, not per record.
fn of_flow<'m, V: Default>(by_flow: &'m mut std::collections::BTreeMap<String, V>, flow: &str) -> &'m mut V {
    if !by_flow.contains_key(flow) {
        by_flow.insert(flow.to_string(), V::default());
    }
    by_flow.get_mut(flow).unwrap_or_else(|| unreachable!("inserted above"))
}

impl std::ops::Deref for Tx<'_, '_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl<'c, 'h> Tx<'c, 'h> {
    fn new(conn: &'c Connection, hot: &'h Hot<'c>) -> Tx<'c, 'h> {
        Tx { conn, hot, counted: Default::default() }
    }

    /// A hot-path statement, prepared on first use and kept for the writer's
    /// life. rusqlite resets a statement after `execute` and when its rows
    /// are dropped, so one kept across jobs starts each use afresh.
    fn hot(&self, sql: &'static str) -> rusqlite::Result<HotStatement<'h, 'c>> {
        let hot: &'h Hot<'c> = self.hot;
        // This statement's slot, or the first free one.
        let slot = hot.slots.iter().find(|slot| slot.get().is_none_or(|found| std::ptr::eq(found.sql, sql)));
        if let Some(slot) = slot
            && slot.get().is_none()
        {
            // Persistent, as rusqlite's cache prepares them: a kept
            // statement on SQLite's lookaside memory would leave every
            // other allocation to malloc (a lease cost 15 % more).
            let stmt = self.conn.prepare_with_flags(sql, rusqlite::PrepFlags::SQLITE_PREPARE_PERSISTENT)?;
            let _ = slot.set(HotSlot { sql, stmt: std::cell::RefCell::new(stmt) });
        }
        match slot.and_then(|slot| slot.get()?.stmt.try_borrow_mut().ok()) {
            Some(stmt) => Ok(HotStatement::Hot(stmt)),
            None => Ok(HotStatement::Cached(self.conn.prepare_cached(sql)?)),
        }
    }

    /// Counts `n` records of `flow` moved from state `from` (`None`: new
    /// records) to state `to`, for `flow_counts` when this transaction commits.
    fn moved(&self, flow: &str, from: Option<&str>, to: &str, n: usize) {
        if n == 0 {
            return;
        }
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let mut counted = self.counted.borrow_mut();
        let moves = of_flow(&mut counted.moves, flow);
        if let Some(from) = from {
            moves[state_slot(from)] -= n;
        }
        moves[state_slot(to)] += n;
    }

    /// Adds `tally` to the roll-up of `flow`'s `minute` when this transaction commits.
    fn count(&self, flow: &str, minute: i64, tally: &Tally) {
        let mut counted = self.counted.borrow_mut();
        let minutes = of_flow(&mut counted.tallies, flow);
        match minutes.get_mut(&minute) {
            Some(t) => t.add(tally),
            None => {
                minutes.insert(minute, tally.clone());
            }
        }
    }

    fn snapshot(&self) -> Counted {
        self.counted.borrow().clone()
    }

    fn restore(&self, saved: Counted) {
        *self.counted.borrow_mut() = saved;
    }

    /// Writes the counted roll-ups and state counts; the transaction can then commit.
    fn flush(&self) -> rusqlite::Result<()> {
        let counted = std::mem::take(&mut *self.counted.borrow_mut());
        for (flow, minutes) in &counted.tallies {
            for (minute, tally) in minutes {
                add_tally(self, flow, *minute, tally)?;
            }
        }
        let mut stmt = self.hot(
            "INSERT INTO flow_counts (flow, state, n) VALUES (?1, ?2, ?3)
             ON CONFLICT (flow, state) DO UPDATE SET n = n + excluded.n",
        )?;
        for (flow, moves) in &counted.moves {
            for (state, n) in STATES.iter().zip(moves) {
                if *n != 0 {
                    stmt.execute(params![flow, state, n])?;
                }
            }
        }
        Ok(())
    }
}

/// Adds `tally` to the roll-up of `flow`'s `minute`, in the caller's transaction.
fn add_tally(conn: &Tx<'_, '_>, flow: &str, minute: i64, tally: &Tally) -> rusqlite::Result<()> {
    let mut stmt = conn.hot(ADD_TALLY.as_str())?;
    stmt.raw_bind_parameter(1, flow)?;
    stmt.raw_bind_parameter(2, minute)?;
    for (i, n) in tally.counters.iter().enumerate() {
        stmt.raw_bind_parameter(3 + i, n)?;
    }
    stmt.raw_bind_parameter(3 + COUNTERS, tally.last_delivered_at)?;
    stmt.raw_execute().map(|_| ())
}

/// A row of `SELECT flow, minute, <COUNTER_COLUMNS>, last_delivered_at FROM flow_minutes`.
fn rollup_row(r: &Row<'_>) -> rusqlite::Result<MinuteRollup> {
    let count = |i: usize| -> rusqlite::Result<u64> { Ok(u64::try_from(r.get::<_, i64>(2 + i)?).unwrap_or(0)) };
    let mut failures_by_class = std::collections::BTreeMap::new();
    for (slot, class) in CLASSES.iter().enumerate() {
        let n = count(FIRST_CLASS + slot)?;
        if n > 0 {
            failures_by_class.insert(class.as_str().to_string(), n);
        }
    }
    Ok(MinuteRollup {
        flow: r.get(0)?,
        minute: r.get(1)?,
        received: count(RECEIVED)?,
        quarantined: count(QUARANTINED)?,
        delivered: count(DELIVERED)?,
        dead: count(DEAD)?,
        retried: count(RETRIED)?,
        failures_by_class,
        latency_count: count(LATENCY_COUNT)?,
        latency_sum_ms: count(LATENCY_SUM)?,
        latency_buckets: (0..LATENCY_BUCKET_COUNT).map(|b| count(FIRST_BUCKET + b)).collect::<rusqlite::Result<_>>()?,
        last_delivered_at: ts(r.get(2 + COUNTERS)?),
    })
}

/// Creates `flow_minutes` if missing, and adds whichever counter columns an
/// existing one lacks.
fn migrate_minutes(conn: &Connection) -> rusqlite::Result<()> {
    let columns: Vec<String> =
        COUNTER_COLUMNS.iter().map(|c| format!("    {c} INTEGER NOT NULL DEFAULT 0,\n")).collect();
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS flow_minutes (
    flow   TEXT    NOT NULL,
    minute INTEGER NOT NULL,
{}    last_delivered_at INTEGER,
    PRIMARY KEY (flow, minute)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS flow_minutes_by_minute ON flow_minutes (minute);",
        columns.concat()
    ))?;
    for column in COUNTER_COLUMNS.iter() {
        let present: i64 =
            conn.query_row("SELECT COUNT(*) FROM pragma_table_info('flow_minutes') WHERE name = ?1", [column], |r| {
                r.get(0)
            })?;
        if present == 0 {
            conn.execute_batch(&format!("ALTER TABLE flow_minutes ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0"))?;
        }
    }
    Ok(())
}

/// Tuning for [`SqliteJournal`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// `synchronous = FULL`: fsync on every commit, so an acknowledged
    /// record survives power loss, not only a process crash.
    pub fsync_every_commit: bool,
    /// Most jobs in one group commit.
    pub max_batch: usize,
    /// A ceiling on the journal file's size; writes past it fail (and are
    /// not acknowledged) instead of filling the disk. `None`: no ceiling.
    pub max_size_bytes: Option<u64>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions { fsync_every_commit: true, max_batch: 1024, max_size_bytes: None }
    }
}

/// A unit of work for the writer thread. A job can be run more than once:
/// if one job of a group fails, the group's transaction is rolled back and
/// every job in it run again, each in its own savepoint.
trait Job: Send {
    /// Runs the job's writes and keeps its result; `false` if it failed.
    /// `careful`: inside a savepoint, so that a failure undoes only its own
    /// writes.
    fn run(&mut self, tx: &Tx<'_, '_>, careful: bool) -> bool;
    /// Answers the caller once the transaction's fate is known.
    fn finish(self: Box<Self>, commit: std::result::Result<(), &str>);
    /// Whether the job writes. A group of jobs that only read the writer's
    /// connection ([`SqliteJournal::on_writer`]) runs outside a transaction:
    /// it takes no write lock and is no commit.
    fn writes(&self) -> bool {
        true
    }
}

struct Write<F, T> {
    f: F,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
    location: Arc<str>,
    writes: bool,
}

impl<F, T> Job for Write<F, T>
where
    F: FnMut(&Tx<'_, '_>) -> rusqlite::Result<T> + Send,
    T: Send + 'static,
{
    fn run(&mut self, tx: &Tx<'_, '_>, careful: bool) -> bool {
        let result = if careful { in_savepoint(tx, &mut self.f) } else { (self.f)(tx) };
        let ok = result.is_ok();
        self.result = Some(result.map_err(|e| sql_err(&self.location, e)));
        ok
    }

    fn finish(self: Box<Self>, commit: std::result::Result<(), &str>) {
        let result = match (commit, self.result) {
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(JournalError::NotStored {
                location: self.location.to_string(),
                reason: "the job was not run".to_string(),
            }),
            (Err(why), _) => {
                Err(JournalError::NotStored { location: self.location.to_string(), reason: why.to_string() })
            }
        };
        let _ = self.reply.send(result);
    }

    fn writes(&self) -> bool {
        self.writes
    }
}

/// Runs one job in a savepoint so that its failure undoes only its own
/// writes, roll-up counts included. The job's own error is the one
/// reported, not a rollback's.
fn in_savepoint<T>(tx: &Tx<'_, '_>, f: impl FnOnce(&Tx<'_, '_>) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    tx.execute_batch("SAVEPOINT job")?;
    let counted = tx.snapshot();
    let result = f(tx).and_then(|v| tx.execute_batch("RELEASE job").map(|()| v));
    if result.is_err() {
        tx.restore(counted);
        if !tx.is_autocommit() && tx.execute_batch("ROLLBACK TO job; RELEASE job").is_err() {
            // The job's writes cannot be undone on their own (its savepoint is
            // gone): give up the whole transaction rather than commit them.
            // The writer sees that through `is_autocommit` and fails the jobs
            // run so far.
            roll_back(tx);
        }
    }
    result
}

fn sql_err(location: &str, source: rusqlite::Error) -> JournalError {
    JournalError::Sqlite { location: location.to_string(), source }
}

/// The SQLite journal. Cheap to share behind an `Arc`.
pub struct SqliteJournal {
    jobs: mpsc::Sender<Box<dyn Job>>,
    reader: Arc<Mutex<Connection>>,
    location: Arc<str>,
    stats: Arc<WriterCounters>,
    /// The writer connection's `PRAGMA data_version` at the last
    /// `changed_elsewhere`, -1 before the first: it changes only when
    /// another connection commits, and the engine's reader never writes.
    seen_version: std::sync::atomic::AtomicI64,
}

impl SqliteJournal {
    /// Opens (creating if needed) the journal at `path`.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteJournal> {
        let location: Arc<str> = Arc::from(path.display().to_string());
        let open_err = |reason: String| JournalError::Open { location: location.to_string(), reason };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            return Err(open_err(format!("the folder {} does not exist", dir.display())));
        }
        let mut writer = open_writer(path, &options).map_err(open_err)?;
        configure(&mut writer, &options).map_err(|e| sql_err(&location, e))?;
        migrate(&writer, &location)?;
        if let Some(max) = options.max_size_bytes {
            let page: i64 =
                writer.pragma_query_value(None, "page_size", |r| r.get(0)).map_err(|e| sql_err(&location, e))?;
            let pages = i64::try_from(max).unwrap_or(i64::MAX) / page.max(1);
            writer.pragma_update(None, "max_page_count", pages).map_err(|e| sql_err(&location, e))?;
        }
        let mut reader = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        configure(&mut reader, &options).map_err(|e| sql_err(&location, e))?;

        let (tx, rx) = mpsc::channel::<Box<dyn Job>>(options.max_batch * 4);
        let thread_location = location.clone();
        let stats = Arc::new(WriterCounters::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer_loop(writer, rx, options.max_batch, &thread_location, &thread_stats))
            .map_err(|e| open_err(format!("cannot start the writer thread: {e}")))?;
        let seen_version = std::sync::atomic::AtomicI64::new(-1);
        Ok(SqliteJournal { jobs: tx, reader: Arc::new(Mutex::new(reader)), location, stats, seen_version })
    }

    /// Replaces the text kept under `key` by `sql` (`?1` key, `?2` text, `?3` time).
    async fn put_text(&self, sql: &'static str, key: &str, text: String, now: Timestamp) -> Result<()> {
        let key = key.to_string();
        self.write(move |c| c.prepare_cached(sql)?.execute(params![key, text, now.as_millis()]).map(|_| ())).await
    }

    /// The text kept under `key` by `sql` (`?1` key), if any.
    async fn get_text(&self, sql: &'static str, key: &str) -> Result<Option<String>> {
        let key = key.to_string();
        self.read(move |c| c.prepare_cached(sql)?.query_row([key], |r| r.get(0)).optional()).await
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(&*self.location)
    }

    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        F: FnMut(&Tx<'_, '_>) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.to_writer(f, true).await
    }

    /// Runs `f`, which only reads, on the writer's connection, outside a
    /// transaction unless it shares a group with writes.
    async fn on_writer<T, F>(&self, f: F) -> Result<T>
    where
        F: FnMut(&Tx<'_, '_>) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.to_writer(f, false).await
    }

    async fn to_writer<T, F>(&self, f: F, writes: bool) -> Result<T>
    where
        F: FnMut(&Tx<'_, '_>) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(Write { f, result: None, reply, location: self.location.clone(), writes });
        self.jobs.send(job).await.map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let reader = self.reader.clone();
        let location = self.location.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn).map_err(|e| sql_err(&location, e))
        })
        .await
        .map_err(|_| JournalError::Closed)?
    }
}

/// The writer's connection. Where every commit is fsynced, it writes the WAL
/// through [`wal_vfs`], which hands each commit's frames to the kernel in
/// one write instead of two a frame.
fn open_writer(path: &Path, options: &SqliteOptions) -> std::result::Result<Connection, String> {
    if !options.fsync_every_commit {
        return Connection::open(path).map_err(|e| e.to_string());
    }
    wal_vfs::register().map_err(|rc| format!("cannot register the WAL VFS (SQLite result {rc})"))?;
    let flags = rusqlite::OpenFlags::default();
    Connection::open_with_flags_and_vfs(path, flags, wal_vfs::NAME).map_err(|e| e.to_string())
}

/// How long a write waits for another process's transaction (the CLI's
/// replay in chunks, another engine on the same file) before it fails.
const BUSY_BUDGET: Duration = Duration::from_secs(10);

/// The sleep before retry `count` (0 for the first) of a write that found
/// the journal locked, or `None` once `BUSY_BUDGET` is spent: 50 µs,
/// doubling to 1 ms. SQLite's own handler sleeps 1, 2, 5, 10 … 100 ms, so a
/// webhook's commit that met a CLI chunk waited tens of milliseconds after
/// the lock was free, and the CLI, retrying first, took it again.
fn busy_wait(count: i32) -> Option<Duration> {
    const DOUBLING: u32 = 5;
    let n = u32::try_from(count).unwrap_or(0);
    let step = |i: u32| Duration::from_micros(50 << i.min(DOUBLING)).min(Duration::from_millis(1));
    let waited =
        (0..n.min(DOUBLING)).map(step).sum::<Duration>() + Duration::from_millis(1) * n.saturating_sub(DOUBLING);
    (waited < BUSY_BUDGET).then(|| step(n))
}

fn configure(conn: &mut Connection, options: &SqliteOptions) -> rusqlite::Result<()> {
    conn.busy_handler(Some(|count| match busy_wait(count) {
        Some(wait) => {
            std::thread::sleep(wait);
            true
        }
        None => false,
    }))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if options.fsync_every_commit { "FULL" } else { "NORMAL" })?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    Ok(())
}

fn migrate(conn: &Connection, location: &str) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| sql_err(location, e))?;
    if version > SCHEMA_VERSION {
        return Err(JournalError::SchemaTooNew {
            location: location.to_string(),
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    conn.execute_batch(SCHEMA).map_err(|e| sql_err(location, e))?;
    migrate_minutes(conn).map_err(|e| sql_err(location, e))?;
    // Older files lack some of these columns; CREATE TABLE IF NOT EXISTS left them as they were.
    for (column, declaration) in ADDED_COLUMNS {
        let present: i64 = conn
            .query_row("SELECT COUNT(*) FROM pragma_table_info('records') WHERE name = ?1", [column], |r| r.get(0))
            .map_err(|e| sql_err(location, e))?;
        if present == 0 {
            conn.execute_batch(&format!("ALTER TABLE records ADD COLUMN {column} {declaration}"))
                .map_err(|e| sql_err(location, e))?;
        }
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS records_batch ON records (flow, batch_key) WHERE batch_key IS NOT NULL",
    )
    .map_err(|e| sql_err(location, e))?;
    // Retention's: finished records whose payload is still there.
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS records_unpurged ON records (flow, finished_at)
         WHERE state IN ('delivered', 'discarded') AND payload_purged_at IS NULL",
    )
    .map_err(|e| sql_err(location, e))?;
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS records_open_by_key ON records (flow, external_key, id)
         WHERE state IN ('pending', 'in_flight') AND external_key IS NOT NULL",
    )
    .map_err(|e| sql_err(location, e))?;
    if version < 5 {
        // Counted once from the records (from the old index, while it is
        // there, not from the rows); from here on every write keeps them.
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             DELETE FROM flow_counts;
             INSERT INTO flow_counts (flow, state, n) SELECT flow, state, COUNT(*) FROM records GROUP BY flow, state;
             DROP INDEX IF EXISTS records_state;
             COMMIT;",
        )
        .map_err(|e| sql_err(location, e))?;
    }
    if version < 3 {
        // A record already attempted under an older version went out as its
        // raw payload, under its key: that is its preparation. Mapping it now
        // would send a different body under the same key.
        conn.execute_batch(
            "UPDATE records SET prepared = 1 WHERE state IN ('pending', 'in_flight') AND attempts > 0 AND prepared = 0",
        )
        .map_err(|e| sql_err(location, e))?;
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(|e| sql_err(location, e))?;
    Ok(())
}

fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<Box<dyn Job>>,
    max_batch: usize,
    location: &str,
    stats: &WriterCounters,
) {
    let mut queue: std::collections::VecDeque<Box<dyn Job>> = std::collections::VecDeque::with_capacity(max_batch);
    let hot = Hot::new();
    loop {
        if queue.is_empty() {
            match rx.blocking_recv() {
                Some(job) => queue.push_back(job),
                None => return,
            }
        }
        while queue.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => queue.push_back(job),
                Err(_) => break,
            }
        }
        let mut group: Vec<Box<dyn Job>> = queue.drain(..queue.len().min(max_batch)).collect();
        if group.iter().all(|job| !job.writes()) {
            // Only questions (`ping`, `changed_elsewhere`): no transaction,
            // so no write lock taken from the CLI and no commit counted.
            let tx = Tx::new(&conn, &hot);
            for job in &mut group {
                job.run(&tx, false);
            }
            group.into_iter().for_each(|j| j.finish(Ok(())));
            continue;
        }
        // Most groups run straight through. If a job fails, the transaction
        // is rolled back and the whole group run again, each job in its own
        // savepoint so that the failure undoes only that job's writes.
        let tx = Tx::new(&conn, &hot);
        let mut outcome = run_group(&tx, &mut group, false);
        if outcome == GroupRun::JobFailed {
            tx.restore(Default::default());
            outcome = if roll_back(&conn) {
                run_group(&tx, &mut group, true)
            } else {
                GroupRun::NotBegun("the failed transaction could not be rolled back".to_string())
            };
        }
        match outcome {
            GroupRun::NotBegun(why) => {
                tracing::error!(journal = location, error = %why, "cannot begin a journal transaction");
                // A transaction left open would fail every later BEGIN.
                roll_back(&conn);
                let why = format!("cannot begin a transaction: {why}");
                group.into_iter().for_each(|j| j.finish(Err(&why)));
            }
            GroupRun::Lost(ran) => {
                // Some errors (disk full, I/O, out of memory) make SQLite roll
                // back the whole transaction on its own. The job that was
                // running fails; the others did nothing wrong and go again in
                // the next transaction, in their order (each such round fails
                // one job, so the queue keeps moving). A journal at its size
                // cap thus still takes what fits.
                let why = "SQLite rolled the transaction back after an error";
                tracing::error!(journal = location, "{why}; the job that was running failed, the others go again");
                let culprit = group.remove(ran - 1);
                for job in group.into_iter().rev() {
                    queue.push_front(job);
                }
                culprit.finish(Err(why));
            }
            GroupRun::Ran | GroupRun::JobFailed => match tx.flush().and_then(|()| {
                let started = std::time::Instant::now();
                conn.execute_batch("COMMIT").map(|()| started.elapsed())
            }) {
                Ok(took) => {
                    stats.committed(group.len(), took);
                    group.into_iter().for_each(|j| j.finish(Ok(())));
                }
                Err(e) => {
                    let why = e.to_string();
                    tracing::error!(journal = location, error = %why, "journal commit failed; nothing in this batch was acknowledged");
                    roll_back(&conn);
                    let why = format!("commit failed: {why}");
                    group.into_iter().for_each(|j| j.finish(Err(&why)));
                }
            },
        }
    }
}

/// Rolls back the open transaction, if there is one; `true` when none is
/// left open.
fn roll_back(conn: &Connection) -> bool {
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    conn.is_autocommit()
}

/// How running a group of jobs in one transaction went.
#[derive(Debug, PartialEq, Eq)]
enum GroupRun {
    /// Every job ran (in careful mode, some may have failed and been undone):
    /// the transaction is open, ready to commit.
    Ran,
    /// Straight through, a job failed: its writes are mixed with the
    /// others'; the transaction must be rolled back and the group run
    /// carefully.
    JobFailed,
    /// SQLite rolled the whole transaction back while the job numbered this
    /// (from 1) was running.
    Lost(usize),
    /// The transaction could not begin.
    NotBegun(String),
}

fn run_group(tx: &Tx<'_, '_>, group: &mut [Box<dyn Job>], careful: bool) -> GroupRun {
    if let Err(e) = tx.execute_batch("BEGIN IMMEDIATE") {
        return GroupRun::NotBegun(e.to_string());
    }
    for (i, job) in group.iter_mut().enumerate() {
        let ok = job.run(tx, careful);
        if tx.is_autocommit() {
            return GroupRun::Lost(i + 1);
        }
        if !ok && !careful {
            return GroupRun::JobFailed;
        }
    }
    GroupRun::Ran
}

const STATE_PENDING: &str = "pending";
const STATE_IN_FLIGHT: &str = "in_flight";
const STATE_DELIVERED: &str = "delivered";
const STATE_DEAD: &str = "dead";
const STATE_DISCARDED: &str = "discarded";

fn ts(ms: Option<i64>) -> Option<Timestamp> {
    ms.map(Timestamp::from_millis)
}

/// `(sql fragment, json parameter)` selecting records for an operator action.
fn selector_sql(selector: &Selector) -> (&'static str, String) {
    match selector {
        Selector::Ids(ids) => ("id IN (SELECT value FROM json_each(?1))", serde_json_array(ids)),
        Selector::Flow(flow) => ("flow = ?1", flow.clone()),
        Selector::All => ("?1 IS NOT NULL", String::new()),
    }
}

fn serde_json_array(ids: &[RecordId]) -> String {
    let items: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    format!("[{}]", items.join(","))
}

fn ingest_tx(conn: &Tx<'_, '_>, r: &NewRecord) -> rusqlite::Result<Ingested> {
    let (state, next_at, finished_at, class, reason) = match &r.quarantine {
        None => (STATE_PENDING, Some(r.received_at.as_millis()), None, None, None),
        Some((class, reason)) => {
            (STATE_DEAD, None, Some(r.received_at.as_millis()), Some(class.as_str()), Some(reason.as_str()))
        }
    };
    // A quarantined record is never prepared, whatever the caller says: a
    // replay validates and maps it again.
    let prepared = if r.quarantine.is_some() { None } else { r.prepared.as_ref() };
    // No `RETURNING id`: it buffers its row in a temporary table.
    let inserted = conn
        .hot(
            "INSERT INTO records (flow, delivery_id, idempotency_key, correlation_id, content_type, payload, received_at,
                                  state, next_attempt_at, finished_at, dead_class, dead_reason, external_key,
                                  mapped, mapping_version, sink_mapping_version, prepared)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
             ON CONFLICT (flow, delivery_id) WHERE delivery_id IS NOT NULL DO NOTHING",
        )?
        .execute(
            params![
                r.flow,
                r.delivery_id,
                r.idempotency_key,
                r.correlation_id,
                r.content_type,
                r.payload,
                r.received_at.as_millis(),
                state,
                next_at,
                finished_at,
                class,
                reason,
                r.external_key,
                prepared.and_then(|p| p.body.as_deref()),
                prepared.and_then(|p| p.mapping_version),
                prepared.and_then(|p| p.sink_mapping_version),
                prepared.is_some()
            ],
        )?;
    if inserted == 1 {
        let id = conn.last_insert_rowid();
        conn.moved(&r.flow, None, state, 1);
        let mut tally = Tally::new();
        tally.counters[RECEIVED] = 1;
        tally.counters[QUARANTINED] = i64::from(r.quarantine.is_some());
        conn.count(&r.flow, minute_of(r.received_at), &tally);
        return Ok(Ingested::New(id));
    }
    let id = conn
        .hot("SELECT id FROM records WHERE flow = ?1 AND delivery_id = ?2")?
        .query_row(params![r.flow, r.delivery_id], |row| row.get(0))?;
    Ok(Ingested::Duplicate(id))
}

/// What a lease reads of each record (before marking it leased), in the
/// order [`leased_row`] reads it.
const LEASED_COLUMNS: &str = "r.id, r.flow, r.idempotency_key, r.correlation_id, r.content_type, r.payload, r.attempts,
                              r.failures, r.mapped, r.mapping_version, r.sink_mapping_version, r.prepared";

/// A row of [`LEASED_COLUMNS`], as it will be once leased: its attempt is the next one.
fn leased_row(r: &Row<'_>, lease_until: Timestamp) -> rusqlite::Result<LeasedRecord> {
    let prepared = if r.get::<_, bool>(11)? {
        Some(Prepared { body: r.get(8)?, mapping_version: r.get(9)?, sink_mapping_version: r.get(10)? })
    } else {
        None
    };
    Ok(LeasedRecord {
        id: r.get(0)?,
        flow: r.get(1)?,
        idempotency_key: r.get(2)?,
        correlation_id: r.get(3)?,
        content_type: r.get(4)?,
        payload: r.get(5)?,
        attempt: r.get::<_, u32>(6)? + 1,
        failures: r.get(7)?,
        lease_until,
        batch_key: None,
        prepared,
    })
}

/// A lease's `flow = ?1` and `LIMIT ?3`, written so that SQLite does not
/// re-prepare the statement on every use. With STAT4 (on in the bundled
/// build), a bare parameter in LIMIT, or compared with an indexed column
/// in a query with ORDER BY, feeds the query planner; rusqlite clears the
/// bindings of a cached statement, which then counts as changed. A
/// re-prepare on every lease cost a quarter of the writer's time.
const FLOW_1: &str = "CAST(?1 AS TEXT)";
const LIMIT_3: &str = "CAST(?3 AS INTEGER)";

/// Only the oldest open record of each key is due.
const IN_KEY_ORDER: &str = "AND (r.external_key IS NULL OR NOT EXISTS (
       SELECT 1 FROM records p WHERE p.flow = r.flow AND p.external_key = r.external_key
                                 AND p.id < r.id AND p.state IN ('pending', 'in_flight')))";

/// The query that finds a lease's due records, oldest first (`?1` flow,
/// `?2` now, `?3` limit); for a new batch, only records in none.
fn due_sql(mode: LeaseMode) -> &'static str {
    const MODES: [LeaseMode; 3] = [LeaseMode::Oldest, LeaseMode::InKeyOrder, LeaseMode::Batch];
    static SQL: std::sync::LazyLock<[String; 3]> = std::sync::LazyLock::new(|| {
        MODES.map(|mode| {
            let only = match mode {
                LeaseMode::Oldest => "",
                LeaseMode::InKeyOrder => IN_KEY_ORDER,
                LeaseMode::Batch => "AND r.batch_key IS NULL",
            };
            format!(
                "SELECT {LEASED_COLUMNS} FROM records r
                 WHERE r.flow = {FLOW_1} AND r.state = 'pending' AND r.next_attempt_at <= ?2 {only}
                 ORDER BY r.next_attempt_at, r.id LIMIT {LIMIT_3}"
            )
        })
    });
    &SQL[MODES.iter().position(|m| *m == mode).unwrap_or(0)]
}

/// Marks records read by a lease query as leased, oldest id first. One
/// point update per record: an `UPDATE … WHERE id IN (…) RETURNING` builds
/// two temporary tables per lease, which cost more than the updates.
fn mark_leased(
    conn: &Tx<'_, '_>,
    flow: &str,
    mut leased: Vec<LeasedRecord>,
    owner: &str,
    now: Timestamp,
) -> rusqlite::Result<Vec<LeasedRecord>> {
    leased.sort_by_key(|r| r.id);
    conn.moved(flow, Some(STATE_PENDING), STATE_IN_FLIGHT, leased.len());
    let mut stmt = conn.hot(
        "UPDATE records SET state = 'in_flight', lease_owner = ?2, lease_until = ?3, leased_at = ?4,
                            attempts = attempts + 1, next_attempt_at = NULL
         WHERE id = ?1",
    )?;
    for r in &leased {
        stmt.execute(params![r.id, owner, r.lease_until.as_millis(), now.as_millis()])?;
    }
    Ok(leased)
}

fn lease_tx(
    conn: &Tx<'_, '_>,
    flow: &str,
    owner: &str,
    now: Timestamp,
    lease_for: Duration,
    limit: usize,
    in_key_order: bool,
) -> rusqlite::Result<Vec<LeasedRecord>> {
    let now_ms = now.as_millis();
    // A lease that ran out means the holder died or hung mid-attempt: the
    // attempt is recorded as interrupted and counts against the budget, so a
    // record that crashes the engine cannot loop forever.
    let interrupted = conn
        .hot(
            "INSERT OR IGNORE INTO attempts (record_id, number, started_at, duration_ms, status, class, error)
             SELECT id, attempts, COALESCE(leased_at, lease_until), lease_until - COALESCE(leased_at, lease_until), NULL, 'interrupted',
                    'the lease expired before a result was recorded (the engine stopped or hung mid-attempt)'
             FROM records WHERE flow = ?1 AND state = 'in_flight' AND lease_until <= ?2",
        )?
        .execute(params![flow, now_ms])?;
    if interrupted > 0 {
        // The lost attempts are failures too, counted in the minute they
        // started (times are after 1970: SQLite's `/` floors, as `minute_of`).
        conn.hot(
            "INSERT INTO flow_minutes (flow, minute, fail_interrupted)
             SELECT ?1, COALESCE(leased_at, lease_until) / 60000, COUNT(*)
             FROM records WHERE flow = ?1 AND state = 'in_flight' AND lease_until <= ?2 GROUP BY 2
             ON CONFLICT (flow, minute) DO UPDATE SET fail_interrupted = fail_interrupted + excluded.fail_interrupted",
        )?
        .execute(params![flow, now_ms])?;
    }
    let back = conn
        .hot(
            "UPDATE records SET state = 'pending', next_attempt_at = ?2, failures = failures + 1,
                                lease_owner = NULL, lease_until = NULL, leased_at = NULL
             WHERE flow = ?1 AND state = 'in_flight' AND lease_until <= ?2",
        )?
        .execute(params![flow, now_ms])?;
    conn.moved(flow, Some(STATE_IN_FLIGHT), STATE_PENDING, back);
    if limit == 0 {
        return Ok(Vec::new());
    }
    let until = now.plus(lease_for);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let due: Vec<LeasedRecord> = conn
        .hot(due_sql(if in_key_order { LeaseMode::InKeyOrder } else { LeaseMode::Oldest }))?
        .query_map(params![flow, now_ms, limit], |r| leased_row(r, until))?
        .collect::<rusqlite::Result<_>>()?;
    mark_leased(conn, flow, due, owner, now)
}

fn lease_batch_tx(
    conn: &Tx<'_, '_>,
    flow: &str,
    owner: &str,
    now: Timestamp,
    lease_for: Duration,
    limit: usize,
) -> rusqlite::Result<Vec<LeasedRecord>> {
    let now_ms = now.as_millis();
    // Expired leases come back first, exactly as for single records.
    let _ = lease_tx(conn, flow, owner, now, lease_for, 0, false)?;
    let oldest: Option<Option<String>> = conn
        .prepare_cached(
            "SELECT batch_key FROM records WHERE flow = CAST(?1 AS TEXT) AND state = 'pending' AND next_attempt_at <= ?2
             ORDER BY next_attempt_at, id LIMIT 1",
        )?
        .query_row(params![flow, now_ms], |r| r.get(0))
        .optional()?;
    let Some(bound) = oldest else { return Ok(Vec::new()) };
    let until = now.plus(lease_for);
    let row = |r: &Row<'_>| leased_row(r, until);
    if let Some(key) = &bound {
        let in_flight: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM records WHERE flow = ?1 AND batch_key = ?2 AND state = 'in_flight'")?
            .query_row(params![flow, key], |r| r.get(0))?;
        if in_flight > 0 {
            // Part of the batch is still out: it goes again whole or not at all.
            return Ok(Vec::new());
        }
    }
    let due: Vec<LeasedRecord> = match &bound {
        // A batch of unknown fate goes again whole, whatever each member's jittered due time.
        Some(key) => conn
            .prepare_cached(&format!(
                "SELECT {LEASED_COLUMNS} FROM records r WHERE r.flow = ?1 AND r.state = 'pending' AND r.batch_key = ?2"
            ))?
            .query_map(params![flow, key], row)?
            .collect::<rusqlite::Result<_>>()?,
        None => conn
            .prepare_cached(due_sql(LeaseMode::Batch))?
            .query_map(params![flow, now_ms, i64::try_from(limit).unwrap_or(i64::MAX)], row)?
            .collect::<rusqlite::Result<_>>()?,
    };
    let mut leased = mark_leased(conn, flow, due, owner, now)?;
    // A new batch gets a new key (its records and their attempt numbers), so
    // a set sent again after per-record failures is not answered from the
    // partner's store; a bound batch keeps the key it was sent under.
    let key = bound.unwrap_or_else(|| {
        let parts: Vec<String> = leased.iter().map(|r| format!("{}#{}", r.idempotency_key, r.attempt)).collect();
        dovetail_core::ids::batch_idempotency_key(parts.iter().map(String::as_str))
    });
    let mut bind = conn.prepare_cached("UPDATE records SET batch_key = ?2 WHERE id = ?1")?;
    for r in &mut leased {
        bind.execute(params![r.id, key])?;
        r.batch_key = Some(key.clone());
    }
    Ok(leased)
}

/// A completion's `UPDATE`: the new state (`$set`), the lease let go, the
/// batch binding (`$batch`), only where the lease is still held (`?1` id,
/// `?2` owner, `?3` attempt). Spelled out whole at compile time, so that
/// nothing is formatted per record.
macro_rules! complete_sql {
    ($set:literal, $batch:expr) => {
        concat!(
            "UPDATE records SET ",
            $set,
            ", lease_owner = NULL, lease_until = NULL, leased_at = NULL, ",
            $batch,
            " WHERE id = ?1 AND state = 'in_flight' AND lease_owner = ?2 AND attempts = ?3"
        )
    };
}

/// `?5` true: the batch's fate is unknown and its records stay bound to it,
/// to go again whole; false: a settled batch lets them go.
macro_rules! keep_batch_5 {
    () => {
        "batch_key = CASE WHEN ?5 THEN batch_key END"
    };
}

fn complete_tx(conn: &Tx<'_, '_>, rep: &AttemptReport) -> rusqlite::Result<bool> {
    let a = &rep.attempt;
    let end = a.started_at.plus(Duration::from_millis(a.duration_ms)).as_millis();
    // The lease is this owner's *and* this attempt's (`?2`, `?3`): an owner
    // whose lease expired and who then re-leased the same record (a paused
    // process, a clock jump) cannot complete the newer attempt with the
    // older result.
    if let Some(connector) = &rep.quota {
        count_quota(conn, connector, a.started_at)?;
    }
    let (n, keep) = (a.number, rep.keep_batch);
    // No `RETURNING`: it buffers its rows in a temporary table.
    let (changed, to) =
        match &rep.outcome {
            Outcome::Delivered => (
                conn.hot(complete_sql!("state = 'delivered', finished_at = ?4", keep_batch_5!()))?
                    .execute(params![rep.id, rep.owner, n, end, keep])?,
                STATE_DELIVERED,
            ),
            Outcome::Retry { at } => (
                conn.hot(complete_sql!(
                    "state = 'pending', next_attempt_at = ?4, failures = failures + 1",
                    keep_batch_5!()
                ))?
                .execute(params![rep.id, rep.owner, n, at.as_millis(), keep])?,
                STATE_PENDING,
            ),
            Outcome::Hold { at } => (
                conn.hot(complete_sql!("state = 'pending', next_attempt_at = ?4", keep_batch_5!()))?
                    .execute(params![rep.id, rep.owner, n, at.as_millis(), keep])?,
                STATE_PENDING,
            ),
            Outcome::Dead { class, reason } => (
                conn.hot(complete_sql!(
                    "state = 'dead', finished_at = ?4, dead_class = ?5, dead_reason = ?6",
                    "batch_key = NULL"
                ))?
                .execute(params![rep.id, rep.owner, n, end, class.as_str(), reason])?,
                STATE_DEAD,
            ),
        };
    if changed == 0 {
        // The lease is lost.
        return Ok(false);
    }
    // The record's flow, for its roll-up.
    let flow: String = conn.hot("SELECT flow FROM records WHERE id = ?1")?.query_row([rep.id], |r| r.get(0))?;
    conn.moved(&flow, Some(STATE_IN_FLIGHT), to, 1);
    conn.hot(
        "INSERT OR REPLACE INTO attempts (record_id, number, started_at, duration_ms, status, class, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        rep.id,
        a.number,
        a.started_at.as_millis(),
        i64::try_from(a.duration_ms).unwrap_or(i64::MAX),
        a.status,
        a.class.map(ErrorClass::as_str),
        a.error
    ])?;
    conn.count(&flow, minute_of(a.started_at), &attempt_tally(rep, end));
    Ok(true)
}

/// What an applied report adds to its minute: a delivery with its latency and
/// end, or a failure by its attempt's class (an attempt without a class is
/// not a failure) and, for `Dead` and `Retry`, where the record went.
fn attempt_tally(rep: &AttemptReport, end: i64) -> Tally {
    let mut t = Tally::new();
    let ms = rep.attempt.duration_ms;
    match &rep.outcome {
        Outcome::Delivered => {
            t.counters[DELIVERED] = 1;
            t.counters[LATENCY_COUNT] = 1;
            t.counters[LATENCY_SUM] = i64::try_from(ms).unwrap_or(i64::MAX);
            t.counters[FIRST_BUCKET + bucket_of(ms)] = 1;
            t.last_delivered_at = Some(end);
            return t;
        }
        Outcome::Dead { .. } => t.counters[DEAD] = 1,
        Outcome::Retry { .. } => t.counters[RETRIED] = 1,
        Outcome::Hold { .. } => {}
    }
    if let Some(class) = rep.attempt.class {
        t.counters[FIRST_CLASS + class_slot(class)] = 1;
    }
    t
}

fn count_quota(conn: &Tx<'_, '_>, connector: &str, at: Timestamp) -> rusqlite::Result<()> {
    let mut stmt = conn.hot(
        "INSERT INTO quota_usage (connector, window, start, used) VALUES (?1, ?2, ?3, 1)
         ON CONFLICT (connector, window, start) DO UPDATE SET used = used + 1",
    )?;
    for window in [Window::Hour, Window::Day] {
        stmt.execute(params![connector, window.as_str(), window.start(at).as_millis()])?;
    }
    Ok(())
}

fn class_of(s: Option<String>) -> Option<ErrorClass> {
    s.as_deref().and_then(ErrorClass::parse)
}

fn attempt_from_row(r: &Row<'_>) -> rusqlite::Result<Attempt> {
    Ok(Attempt {
        number: r.get(0)?,
        started_at: Timestamp::from_millis(r.get(1)?),
        duration_ms: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
        status: r.get(3)?,
        class: class_of(r.get(4)?),
        error: r.get(5)?,
    })
}

fn record_tx(conn: &Connection, id: RecordId) -> rusqlite::Result<Option<RecordDetail>> {
    let detail = conn
        .prepare_cached(
            "SELECT id, flow, state, delivery_id, idempotency_key, correlation_id, content_type, payload, received_at,
                    next_attempt_at, lease_until, finished_at, dead_class, dead_reason, external_key,
                    CAST(payload_purged_at AS INTEGER), mapped, mapping_version, sink_mapping_version, prepared
             FROM records WHERE id = ?1",
        )?
        .query_row([id], |r| {
            let state: String = r.get(2)?;
            Ok(RecordDetail {
                id: r.get(0)?,
                flow: r.get(1)?,
                state: StateName::parse(&state).unwrap_or(StateName::Pending),
                delivery_id: r.get(3)?,
                external_key: r.get(14)?,
                idempotency_key: r.get(4)?,
                correlation_id: r.get(5)?,
                content_type: r.get(6)?,
                payload: r.get(7)?,
                mapped: r.get(16)?,
                mapping_version: r.get(17)?,
                sink_mapping_version: r.get(18)?,
                prepared: r.get(19)?,
                received_at: Timestamp::from_millis(r.get(8)?),
                next_attempt_at: ts(r.get(9)?),
                lease_until: ts(r.get(10)?),
                finished_at: ts(r.get(11)?),
                payload_purged_at: ts(r.get(15)?),
                dead_class: class_of(r.get(12)?),
                dead_reason: r.get(13)?,
                attempts: Vec::new(),
            })
        })
        .optional()?;
    let Some(mut detail) = detail else { return Ok(None) };
    detail.attempts = conn
        .prepare_cached(
            "SELECT number, started_at, duration_ms, status, class, error FROM attempts WHERE record_id = ?1 ORDER BY number",
        )?
        .query_map([id], attempt_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(Some(detail))
}

/// Moves up to `limit` dead records that `cond` (over `?1`, `param`) selects
/// and that died by `now`, oldest first, to state `to`, setting `set` too
/// (`?2` is `now`); counted by flow for `flow_counts`. How many moved.
fn move_dead(
    conn: &Tx<'_, '_>,
    (cond, param): (&str, &str),
    now: Timestamp,
    limit: i64,
    to: &str,
    set: &str,
) -> rusqlite::Result<u64> {
    let chosen =
        format!("SELECT id FROM records WHERE state = 'dead' AND finished_at <= ?2 AND {cond} ORDER BY id LIMIT ?3");
    let args = params![param, now.as_millis(), limit];
    let by_flow = format!("SELECT flow, COUNT(*) FROM records WHERE id IN ({chosen}) GROUP BY flow");
    let mut stmt = conn.prepare_cached(&by_flow)?;
    for row in stmt.query_map(args, |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (flow, n) = row?;
        conn.moved(&flow, Some(STATE_DEAD), to, usize::try_from(n).unwrap_or(0));
    }
    let update = format!("UPDATE records SET state = '{to}', {set} WHERE id IN ({chosen})");
    conn.prepare_cached(&update)?.execute(args).map(|n| n as u64)
}

fn counts_tx(conn: &Connection) -> rusqlite::Result<Vec<FlowCounts>> {
    let mut by_flow: std::collections::BTreeMap<String, FlowCounts> = Default::default();
    // Kept, not counted: one row per flow and state.
    let mut stmt = conn.prepare_cached("SELECT flow, state, n FROM flow_counts WHERE n <> 0")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?;
    for row in rows {
        let (flow, state, n) = row?;
        if n < 0 {
            tracing::error!(%flow, %state, n, "the journal's state counts went below zero; please report this");
        }
        let c = by_flow.entry(flow.clone()).or_insert_with(|| FlowCounts { flow, ..Default::default() });
        let n = u64::try_from(n).unwrap_or(0);
        match state.as_str() {
            STATE_PENDING => c.pending = n,
            STATE_IN_FLIGHT => c.in_flight = n,
            STATE_DELIVERED => c.delivered = n,
            STATE_DEAD => c.dead = n,
            STATE_DISCARDED => c.discarded = n,
            _ => {}
        }
    }
    // The oldest open record, through the partial indexes of open records:
    // this visits each of the flow's pending and in-flight records (not its
    // finished ones), so it grows with a backlog.
    for c in by_flow.values_mut() {
        let open = [
            (c.pending, "SELECT MIN(received_at) FROM records WHERE flow = ?1 AND state = 'pending'"),
            (c.in_flight, "SELECT MIN(received_at) FROM records WHERE flow = ?1 AND state = 'in_flight'"),
        ];
        for (_, sql) in open.into_iter().filter(|(n, _)| *n > 0) {
            let oldest: Option<i64> = conn.prepare_cached(sql)?.query_row([&c.flow], |r| r.get(0))?;
            if let Some(o) = ts(oldest) {
                c.oldest_pending_at = Some(c.oldest_pending_at.map_or(o, |prev| prev.min(o)));
            }
        }
    }
    let mut stmt = conn.prepare_cached(
        "SELECT flow, COUNT(*) FROM records WHERE state = 'dead' AND dead_class = 'validation' GROUP BY flow",
    )?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (flow, n) = row?;
        if let Some(c) = by_flow.get_mut(&flow) {
            c.quarantined = u64::try_from(n).unwrap_or(0);
        }
    }
    let mut stmt = conn.prepare_cached("SELECT flow, since, reason FROM flow_pauses")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?)))? {
        let (flow, since, reason) = row?;
        let c = by_flow.entry(flow.clone()).or_insert_with(|| FlowCounts { flow, ..Default::default() });
        c.paused = Some(Pause { since: Timestamp::from_millis(since), reason });
    }
    Ok(by_flow.into_values().collect())
}

#[async_trait]
impl Journal for SqliteJournal {
    async fn ingest(&self, record: NewRecord) -> Result<Ingested> {
        self.write(move |c| ingest_tx(c, &record)).await
    }

    async fn lease_with(
        &self,
        mode: LeaseMode,
        flow: &str,
        owner: &str,
        now: Timestamp,
        lease_for: Duration,
        limit: usize,
    ) -> Result<Vec<LeasedRecord>> {
        let (flow, owner) = (flow.to_string(), owner.to_string());
        self.write(move |c| match mode {
            LeaseMode::Oldest => lease_tx(c, &flow, &owner, now, lease_for, limit, false),
            LeaseMode::InKeyOrder => lease_tx(c, &flow, &owner, now, lease_for, limit, true),
            LeaseMode::Batch => lease_batch_tx(c, &flow, &owner, now, lease_for, limit),
        })
        .await
    }

    async fn complete(&self, report: AttemptReport) -> Result<bool> {
        self.write(move |c| complete_tx(c, &report)).await
    }

    async fn complete_many(&self, reports: Vec<AttemptReport>) -> Result<Vec<bool>> {
        self.write(move |c| reports.iter().map(|r| complete_tx(c, r)).collect()).await
    }

    async fn next_due(&self, flow: &str) -> Result<Option<Timestamp>> {
        let flow = flow.to_string();
        self.read(move |c| {
            let pending: Option<i64> = c
                .prepare_cached("SELECT MIN(next_attempt_at) FROM records WHERE flow = ?1 AND state = 'pending'")?
                .query_row([&flow], |r| r.get(0))?;
            let lease: Option<i64> = c
                .prepare_cached("SELECT MIN(lease_until) FROM records WHERE flow = ?1 AND state = 'in_flight'")?
                .query_row([&flow], |r| r.get(0))?;
            Ok(match (pending, lease) {
                (Some(a), Some(b)) => Some(Timestamp::from_millis(a.min(b))),
                (a, b) => ts(a.or(b)),
            })
        })
        .await
    }

    async fn counts(&self) -> Result<Vec<FlowCounts>> {
        // One read transaction: the counts and the oldest records agree.
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let counts = counts_tx(&tx)?;
            tx.commit()?;
            Ok(counts)
        })
        .await
    }

    async fn dead_letters(&self, flow: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let flow = flow.map(str::to_string);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            c.prepare_cached(
                "SELECT id, flow, dead_class, dead_reason, finished_at, received_at, attempts, correlation_id
                 FROM records WHERE state = 'dead' AND (?1 IS NULL OR flow = ?1) ORDER BY id LIMIT ?2",
            )?
            .query_map(params![flow, limit], |r| {
                Ok(DeadLetter {
                    id: r.get(0)?,
                    flow: r.get(1)?,
                    class: class_of(r.get(2)?).unwrap_or(ErrorClass::Rejected),
                    reason: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                    dead_at: Timestamp::from_millis(r.get::<_, Option<i64>>(4)?.unwrap_or(0)),
                    received_at: Timestamp::from_millis(r.get(5)?),
                    attempts: r.get(6)?,
                    correlation_id: r.get(7)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn record(&self, id: RecordId) -> Result<Option<RecordDetail>> {
        self.read(move |c| record_tx(c, id)).await
    }

    async fn prepare(&self, id: RecordId, owner: &str, attempt: u32, prepared: Prepared) -> Result<bool> {
        let owner = owner.to_string();
        self.write(move |c| {
            let changed = c
                .prepare_cached(
                    "UPDATE records SET mapped = ?4, mapping_version = ?5, sink_mapping_version = ?6, prepared = 1
                 WHERE id = ?1 AND state = 'in_flight' AND lease_owner = ?2 AND attempts = ?3",
                )?
                .execute(params![
                    id,
                    owner,
                    attempt,
                    prepared.body,
                    prepared.mapping_version,
                    prepared.sink_mapping_version
                ])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn find(&self, needle: &str, limit: usize) -> Result<Vec<RecordId>> {
        let needle = needle.to_string();
        let id: Option<i64> = needle.parse().ok();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id FROM records
                 WHERE id IS ?1 OR correlation_id = ?2 OR delivery_id = ?2 OR external_key = ?2
                 ORDER BY id DESC LIMIT ?3",
            )?;
            let ids = stmt.query_map(params![id, needle, limit as i64], |r| r.get(0))?;
            ids.collect()
        })
        .await
    }

    async fn count_dead(&self, selector: &Selector) -> Result<u64> {
        let (cond, param) = selector_sql(selector);
        self.read(move |c| {
            let n: i64 =
                c.query_row(&format!("SELECT COUNT(*) FROM records WHERE state = 'dead' AND {cond}"), [param], |r| {
                    r.get(0)
                })?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn replay(&self, selector: &Selector, now: Timestamp, limit: usize) -> Result<u64> {
        let (cond, param) = selector_sql(selector);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.write(move |c| {
            let set = "next_attempt_at = ?2, failures = 0, finished_at = NULL, dead_class = NULL, dead_reason = NULL,
                       prepared = 0, mapped = NULL, mapping_version = NULL, sink_mapping_version = NULL";
            move_dead(c, (cond, &param), now, limit, STATE_PENDING, set)
        })
        .await
    }

    async fn discard(&self, selector: &Selector, now: Timestamp, limit: usize) -> Result<u64> {
        let (cond, param) = selector_sql(selector);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.write(move |c| move_dead(c, (cond, &param), now, limit, STATE_DISCARDED, "finished_at = ?2")).await
    }

    async fn pause_flow(&self, flow: &str, reason: &str, now: Timestamp) -> Result<()> {
        let (flow, reason) = (flow.to_string(), reason.to_string());
        self.write(move |c| {
            c.prepare_cached("INSERT INTO flow_pauses (flow, since, reason) VALUES (?1, ?2, ?3) ON CONFLICT (flow) DO UPDATE SET reason = excluded.reason")?
                .execute(params![flow, now.as_millis(), reason])
                .map(|_| ())
        })
        .await
    }

    async fn resume_flow(&self, flow: &str) -> Result<bool> {
        let flow = flow.to_string();
        self.write(move |c| {
            c.prepare_cached("DELETE FROM flow_pauses WHERE flow = ?1")?.execute([&flow]).map(|n| n > 0)
        })
        .await
    }

    async fn pause_of(&self, flow: &str) -> Result<Option<Pause>> {
        let flow = flow.to_string();
        self.read(move |c| {
            c.prepare_cached("SELECT since, reason FROM flow_pauses WHERE flow = ?1")?
                .query_row([flow], |r| Ok(Pause { since: Timestamp::from_millis(r.get(0)?), reason: r.get(1)? }))
                .optional()
        })
        .await
    }

    async fn set_connector_health(&self, h: ConnectorHealth) -> Result<()> {
        self.write(move |c| {
            c.prepare_cached(
                "INSERT OR REPLACE INTO connector_health
                 (connector, breaker, since, open_until, reason, current_rate, configured_rate, blocked_until, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                h.connector,
                h.breaker,
                h.since.as_millis(),
                h.open_until.map(Timestamp::as_millis),
                h.reason,
                h.current_rate,
                h.configured_rate,
                h.blocked_until.map(Timestamp::as_millis),
                h.updated_at.as_millis()
            ])
            .map(|_| ())
        })
        .await
    }

    async fn connector_health(&self) -> Result<Vec<ConnectorHealth>> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT connector, breaker, since, open_until, reason, current_rate, configured_rate, blocked_until, updated_at
                 FROM connector_health ORDER BY connector",
            )?
            .query_map([], |r| {
                Ok(ConnectorHealth {
                    connector: r.get(0)?,
                    breaker: r.get(1)?,
                    since: Timestamp::from_millis(r.get(2)?),
                    open_until: ts(r.get(3)?),
                    reason: r.get(4)?,
                    current_rate: r.get(5)?,
                    configured_rate: r.get(6)?,
                    blocked_until: ts(r.get(7)?),
                    updated_at: Timestamp::from_millis(r.get(8)?),
                })
            })?
            .collect()
        })
        .await
    }

    async fn quota_used(&self, connector: &str, at: Timestamp) -> Result<QuotaUsed> {
        let connector = connector.to_string();
        self.read(move |c| {
            let mut stmt =
                c.prepare_cached("SELECT used FROM quota_usage WHERE connector = ?1 AND window = ?2 AND start = ?3")?;
            let mut used = |w: Window| -> rusqlite::Result<u64> {
                let n: Option<i64> =
                    stmt.query_row(params![connector, w.as_str(), w.start(at).as_millis()], |r| r.get(0)).optional()?;
                Ok(n.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
            };
            Ok(QuotaUsed { this_hour: used(Window::Hour)?, today: used(Window::Day)? })
        })
        .await
    }

    async fn purge_payloads(&self, flow: &str, before: Timestamp, now: Timestamp, limit: usize) -> Result<u64> {
        let flow = flow.to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.write(move |c| {
            c.prepare_cached(
                "UPDATE records SET payload = X'', mapped = NULL, payload_purged_at = ?3
                 WHERE id IN (SELECT id FROM records WHERE flow = ?1 AND state IN ('delivered', 'discarded')
                              AND finished_at < ?2 AND payload_purged_at IS NULL LIMIT ?4)",
            )?
            .execute(params![flow, before.as_millis(), now.as_millis(), limit])
            .map(|n| n as u64)
        })
        .await
    }

    async fn save_shape(&self, flow: &str, shape: String, now: Timestamp) -> Result<()> {
        self.put_text(
            "INSERT OR REPLACE INTO flow_shapes (flow, shape, updated_at) VALUES (?1, ?2, ?3)",
            flow,
            shape,
            now,
        )
        .await
    }

    async fn save_state(&self, key: &str, value: String, now: Timestamp) -> Result<()> {
        self.put_text(
            "INSERT OR REPLACE INTO engine_state (key, value, updated_at) VALUES (?1, ?2, ?3)",
            key,
            value,
            now,
        )
        .await
    }

    async fn load_state(&self, key: &str) -> Result<Option<String>> {
        self.get_text("SELECT value FROM engine_state WHERE key = ?1", key).await
    }

    async fn load_shape(&self, flow: &str) -> Result<Option<String>> {
        self.get_text("SELECT shape FROM flow_shapes WHERE flow = ?1", flow).await
    }

    async fn record_drift(&self, flow: &str, events: Vec<DriftEvent>) -> Result<()> {
        let flow = flow.to_string();
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "INSERT INTO drift_events (flow, kind, path, json_type, previous_types, at, example_record_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for e in &events {
                let previous: Vec<&str> = e.previous_types.iter().map(|t| t.as_str()).collect();
                stmt.execute(params![
                    flow,
                    e.kind.as_str(),
                    e.path,
                    e.json_type.as_str(),
                    previous.join(","),
                    e.at.as_millis(),
                    e.example_record_id
                ])?;
            }
            Ok(())
        })
        .await
    }

    async fn drift_events(&self, flow: Option<&str>, limit: usize) -> Result<Vec<StoredDrift>> {
        let flow = flow.map(str::to_string);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            c.prepare_cached(
                "SELECT id, flow, kind, path, json_type, previous_types, at, example_record_id FROM drift_events
                 WHERE (?1 IS NULL OR flow = ?1) ORDER BY id DESC LIMIT ?2",
            )?
            .query_map(params![flow, limit], |r| {
                let previous: String = r.get(5)?;
                Ok(StoredDrift {
                    id: r.get(0)?,
                    flow: r.get(1)?,
                    event: DriftEvent {
                        kind: DriftKind::parse(&r.get::<_, String>(2)?).unwrap_or(DriftKind::Added),
                        path: r.get(3)?,
                        json_type: JsonType::parse(&r.get::<_, String>(4)?).unwrap_or(JsonType::Null),
                        previous_types: previous.split(',').filter_map(JsonType::parse).collect(),
                        at: Timestamp::from_millis(r.get(6)?),
                        example_record_id: r.get(7)?,
                    },
                })
            })?
            .collect()
        })
        .await
    }

    async fn minutes(&self, flow: Option<&str>, since: Timestamp, until: Timestamp) -> Result<Vec<MinuteRollup>> {
        let flow = flow.map(str::to_string);
        let window = minute_range(since, until);
        if window.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |c| {
            let columns = COUNTER_COLUMNS.join(", ");
            let select = format!("SELECT flow, minute, {columns}, last_delivered_at FROM flow_minutes");
            match flow {
                Some(flow) => c
                    .prepare_cached(&format!(
                        "{select} WHERE flow = ?1 AND minute >= ?2 AND minute < ?3 ORDER BY minute"
                    ))?
                    .query_map(params![flow, window.start, window.end], rollup_row)?
                    .collect(),
                None => c
                    .prepare_cached(&format!("{select} WHERE minute >= ?1 AND minute < ?2 ORDER BY flow, minute"))?
                    .query_map(params![window.start, window.end], rollup_row)?
                    .collect(),
            }
        })
        .await
    }

    async fn prune_minutes(&self, before: Timestamp) -> Result<u64> {
        self.write(move |c| {
            c.prepare_cached("DELETE FROM flow_minutes WHERE minute < ?1")?
                .execute([minute_of(before)])
                .map(|n| n as u64)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        // Through the writer: a journal whose writer is gone cannot store
        // anything, so it must not look ready.
        self.on_writer(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    fn writer_stats(&self) -> Option<WriterStats> {
        Some(self.stats.snapshot())
    }

    async fn changed_elsewhere(&self) -> Result<bool> {
        // On the writer's connection: the reader's version moves with every
        // one of our own commits too.
        let now: i64 = self.on_writer(|c| c.pragma_query_value(None, "data_version", |r| r.get(0))).await?;
        let before = self.seen_version.swap(now, std::sync::atomic::Ordering::AcqRel);
        Ok(before != -1 && before != now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_and_bucket_has_its_own_column() {
        for (slot, class) in CLASSES.iter().enumerate() {
            assert_eq!(class_slot(*class), slot, "{class:?}");
        }
        let distinct: std::collections::BTreeSet<&String> = COUNTER_COLUMNS.iter().collect();
        assert_eq!((COUNTER_COLUMNS.len(), distinct.len()), (COUNTERS, COUNTERS));
        assert_eq!(COUNTER_COLUMNS[FIRST_CLASS + class_slot(ErrorClass::InProgress)], "fail_in_progress");
        assert_eq!(COUNTER_COLUMNS[FIRST_BUCKET], "latency_le_5");
        assert_eq!(COUNTER_COLUMNS[COUNTERS - 1], "latency_over");
    }

    /// A job that fails in the middle of a group undoes only its own writes:
    /// the group is rolled back and run again carefully, and every other job
    /// in it commits exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_job_undoes_only_its_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(SqliteJournal::open(&dir.path().join("j.db"), SqliteOptions::default()).unwrap());
        let (gate, held) = hold_the_writer(&j).await;
        let put = |j: Arc<SqliteJournal>, key: &'static str, fail: bool| {
            tokio::spawn(async move {
                j.write(move |c| {
                    c.execute("INSERT INTO engine_state (key, value, updated_at) VALUES (?1, 'v', 0)", [key])?;
                    if fail {
                        // Written, then failed: this row must not survive.
                        c.execute("INSERT INTO engine_state (key, value, updated_at) VALUES (?1, 'v', 0)", [key])?;
                    }
                    Ok(())
                })
                .await
            })
        };
        // Ingests count in the minute roll-ups; a failed one must not.
        let ingest = |j: Arc<SqliteJournal>, id: &'static str, fail: bool| {
            tokio::spawn(async move {
                let record = crate::conformance::new_record("orders", Some(id), "{}");
                j.write(move |c| {
                    ingest_tx(c, &record)?;
                    if fail {
                        c.execute("INSERT INTO no_such_table VALUES (1)", [])?;
                    }
                    Ok(())
                })
                .await
            })
        };
        let tasks = vec![
            put(j.clone(), "a", false),
            ingest(j.clone(), "r1", false),
            put(j.clone(), "b", false),
            put(j.clone(), "bad", true),
            ingest(j.clone(), "r2", true),
            put(j.clone(), "c", false),
        ];
        while j.jobs.max_capacity() - j.jobs.capacity() < tasks.len() {
            tokio::task::yield_now().await;
        }
        gate.send(()).unwrap();
        held.await.unwrap().unwrap();
        let results: Vec<bool> = futures_ok(tasks).await;
        assert_eq!(results, [true, true, true, false, false, true]);
        for (key, present) in [("a", true), ("b", true), ("bad", false), ("c", true)] {
            assert_eq!(j.load_state(key).await.unwrap().is_some(), present, "{key}");
        }
        let minutes = j.minutes(Some("orders"), Timestamp::from_secs(0), Timestamp::from_secs(2_000_000_000)).await;
        let received: u64 = minutes.unwrap().iter().map(|m| m.received).sum();
        assert_eq!(received, 1, "the failed ingest is not counted");
        assert_eq!(j.counts().await.unwrap().iter().map(|c| c.pending).sum::<u64>(), 1);
        // The gate's transaction, then the six jobs in one.
        let stats = j.writer_stats().unwrap();
        assert_eq!((stats.commits, stats.jobs), (2, 7));
        assert_eq!(stats.commit_seconds.count(), 2, "each commit is timed");
    }

    #[test]
    fn a_locked_journal_is_retried_soon_and_given_up_after_the_budget() {
        let waits: Vec<Duration> = (0..7).map(|n| busy_wait(n).unwrap()).collect();
        let micros: Vec<u128> = waits.iter().map(Duration::as_micros).collect();
        assert_eq!(micros, [50, 100, 200, 400, 800, 1000, 1000]);
        let mut total = Duration::ZERO;
        let mut count = 0;
        while let Some(wait) = busy_wait(count) {
            total += wait;
            count += 1;
        }
        assert!(total >= BUSY_BUDGET && total < BUSY_BUDGET + Duration::from_millis(2), "{total:?} after {count}");
    }

    /// Another connection's commit (the CLI's, in its own process) is seen
    /// once; this journal's own writes and the question itself are not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_from_another_connection_is_seen_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let engine = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
        let cli = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
        assert!(!engine.changed_elsewhere().await.unwrap(), "the first call only starts counting");
        let record = |id: &str| crate::conformance::new_record("orders", Some(id), "{}");
        engine.ingest(record("own")).await.unwrap();
        assert!(!engine.changed_elsewhere().await.unwrap(), "its own commit");
        let wal = dir.path().join("j.db-wal");
        let size = std::fs::metadata(&wal).unwrap().len();
        for _ in 0..3 {
            assert!(!engine.changed_elsewhere().await.unwrap());
        }
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), size, "asking writes no WAL frames");
        let commits = engine.writer_stats().unwrap().commits;
        engine.ping().await.unwrap();
        assert!(!engine.changed_elsewhere().await.unwrap());
        assert_eq!(engine.writer_stats().unwrap().commits, commits, "asking is no commit");
        // Nor does it take the write lock: another connection's write
        // transaction, held open, does not stop it.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let asked = tokio::time::timeout(Duration::from_secs(5), engine.changed_elsewhere()).await;
        assert!(matches!(asked, Ok(Ok(false))), "{asked:?}");
        other.execute_batch("ROLLBACK").unwrap();
        cli.ingest(record("elsewhere")).await.unwrap();
        assert!(engine.changed_elsewhere().await.unwrap(), "another connection's commit");
        assert!(!engine.changed_elsewhere().await.unwrap(), "seen once");
    }

    /// A hot statement is prepared once and handed out again by its SQL's
    /// address; one still in use, or one beyond the slots, comes from
    /// rusqlite's cache instead, and each works.
    #[test]
    fn hot_statements_are_kept_and_never_shared() {
        let conn = Connection::open_in_memory().unwrap();
        let hot = Hot::new();
        let tx = Tx::new(&conn, &hot);
        const ONE: &str = "SELECT 1";
        let first = tx.hot(ONE).unwrap();
        assert!(matches!(first, HotStatement::Hot(_)));
        let nested = tx.hot(ONE).unwrap();
        assert!(matches!(nested, HotStatement::Cached(_)), "in use: not handed out twice");
        drop((first, nested));
        let mut again = tx.hot(ONE).unwrap();
        assert!(matches!(again, HotStatement::Hot(_)));
        assert_eq!(again.query_row([], |r| r.get::<_, i64>(0)).unwrap(), 1);
        drop(again);
        let many: Vec<&'static str> =
            (0..hot.slots.len() + 2).map(|i| &*Box::leak(format!("SELECT {i} + 1").into_boxed_str())).collect();
        for (i, sql) in many.iter().enumerate() {
            let mut stmt = tx.hot(sql).unwrap();
            // The first slot holds ONE: all but the last slot's worth are kept.
            assert_eq!(matches!(stmt, HotStatement::Hot(_)), i + 1 < hot.slots.len(), "{sql}");
            assert_eq!(stmt.query_row([], |r| r.get::<_, i64>(0)).unwrap(), i as i64 + 1);
        }
    }

    /// The statements a record's life runs are prepared once, however
    /// their parameters change: SQLite (with STAT4) re-prepares a statement
    /// whose planner looked at a parameter, and rusqlite's statement cache
    /// clears the bindings after every use.
    #[test]
    fn the_hot_path_never_re_prepares_a_statement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        drop(SqliteJournal::open(&path, SqliteOptions::default()).unwrap());
        let conn = Connection::open(&path).unwrap();
        let hot = Hot::new();
        let tx = Tx::new(&conn, &hot);
        let lease_for = Duration::from_secs(60);
        for i in 0..4_i64 {
            let now = Timestamp::from_secs(1_700_000_000 + i * 90);
            let flow = ["orders", "refunds"][i as usize % 2];
            for n in 0..3 {
                let mut record = crate::conformance::new_record(flow, Some(&format!("msg-{i}-{n}")), "{}");
                record.external_key = Some(format!("k{n}"));
                record.received_at = now;
                ingest_tx(&tx, &record).unwrap();
            }
            let mode = i < 2;
            let leased = lease_tx(&tx, flow, "me", now, lease_for, 1 + i as usize, mode).unwrap();
            let batch = lease_batch_tx(&tx, flow, "me", now, lease_for, 2 + i as usize).unwrap();
            for (k, r) in leased.iter().chain(&batch).enumerate() {
                let outcome = match k % 3 {
                    0 => Outcome::Delivered,
                    1 => Outcome::Retry { at: now.plus(Duration::from_secs(1)) },
                    _ => Outcome::Dead { class: ErrorClass::Rejected, reason: "no".into() },
                };
                let attempt = dovetail_core::record::Attempt {
                    number: r.attempt,
                    started_at: now,
                    duration_ms: 5 + k as u64,
                    status: Some(200),
                    class: None,
                    error: None,
                };
                let report = AttemptReport {
                    id: r.id,
                    owner: "me".into(),
                    attempt,
                    outcome,
                    keep_batch: k % 2 == 0,
                    quota: Some("partner".into()),
                };
                assert!(complete_tx(&tx, &report).unwrap());
            }
            tx.flush().unwrap();
        }
        // Every statement the connection holds, with its re-prepare count.
        let mut offenders = Vec::new();
        // SAFETY: the handle is this connection's and lives while we walk its
        // statements; nothing else uses the connection meanwhile.
        unsafe {
            let db = conn.handle();
            let mut stmt = rusqlite::ffi::sqlite3_next_stmt(db, std::ptr::null_mut());
            while !stmt.is_null() {
                let n = rusqlite::ffi::sqlite3_stmt_status(stmt, rusqlite::ffi::SQLITE_STMTSTATUS_REPREPARE, 0);
                if n > 0 {
                    let sql = std::ffi::CStr::from_ptr(rusqlite::ffi::sqlite3_sql(stmt));
                    offenders.push(format!("{n}x {}", sql.to_string_lossy()));
                }
                stmt = rusqlite::ffi::sqlite3_next_stmt(db, stmt);
            }
        }
        assert!(offenders.is_empty(), "re-prepared:\n{}", offenders.join("\n"));
    }

    /// A failed job whose savepoint cannot be rolled back (here it released
    /// the savepoint itself) must not have its writes committed: the whole
    /// transaction is given up, and every job in it hears an error or is
    /// stored, never half of one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_cannot_be_undone_takes_its_transaction_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(SqliteJournal::open(&dir.path().join("j.db"), SqliteOptions::default()).unwrap());
        let (gate, held) = hold_the_writer(&j).await;
        let good = {
            let j = j.clone();
            tokio::spawn(async move {
                j.write(|c| c.execute("INSERT INTO engine_state (key, value, updated_at) VALUES ('good', 'v', 0)", []))
                    .await
            })
        };
        let evil = {
            let j = j.clone();
            tokio::spawn(async move {
                j.write(|c| {
                    c.execute_batch("RELEASE job")?;
                    c.execute("INSERT INTO engine_state (key, value, updated_at) VALUES ('evil', 'v', 0)", [])?;
                    Err::<(), _>(rusqlite::Error::InvalidQuery)
                })
                .await
            })
        };
        while j.jobs.max_capacity() - j.jobs.capacity() < 2 {
            tokio::task::yield_now().await;
        }
        gate.send(()).unwrap();
        held.await.unwrap().unwrap();
        let good_ok = good.await.unwrap().is_ok();
        assert!(evil.await.unwrap().is_err());
        assert_eq!(j.load_state("evil").await.unwrap(), None, "a failed job's writes were committed");
        assert_eq!(j.load_state("good").await.unwrap().is_some(), good_ok, "an answer that does not match the journal");
        // The writer carries on.
        j.save_state("after", "v".into(), Timestamp::from_secs(0)).await.unwrap();
    }

    /// When SQLite rolls a whole transaction back (disk full, I/O), only the
    /// job that was running fails: the jobs before and after it go again.
    #[tokio::test]
    async fn a_lost_transaction_fails_only_the_job_that_lost_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(SqliteJournal::open(&dir.path().join("j.db"), SqliteOptions::default()).unwrap());
        let (gate, held) = hold_the_writer(&j).await;
        let put = |key: &'static str, lose: bool| {
            let j = j.clone();
            tokio::spawn(async move {
                j.write(move |c| {
                    c.execute("INSERT INTO engine_state (key, value, updated_at) VALUES (?1, 'v', 0)", [key])?;
                    if lose {
                        // As SQLite does on its own after SQLITE_FULL.
                        c.execute_batch("ROLLBACK")?;
                    }
                    Ok(())
                })
                .await
            })
        };
        let tasks = vec![put("before", false), put("loser", true), put("after", false)];
        while j.jobs.max_capacity() - j.jobs.capacity() < tasks.len() {
            tokio::task::yield_now().await;
        }
        gate.send(()).unwrap();
        held.await.unwrap().unwrap();
        let results: Vec<bool> = futures_ok(tasks).await;
        assert_eq!(results, [true, false, true]);
        for (key, present) in [("before", true), ("loser", false), ("after", true)] {
            assert_eq!(j.load_state(key).await.unwrap().is_some(), present, "{key}");
        }
    }

    /// Holds the writer thread in a job of its own until `gate` is sent
    /// to, so that the jobs queued meanwhile run as one group.
    async fn hold_the_writer(
        j: &Arc<SqliteJournal>,
    ) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<Result<()>>) {
        let (gate, gated) = std::sync::mpsc::channel::<()>();
        let (started, running) = std::sync::mpsc::channel::<()>();
        let gated = Arc::new(Mutex::new(gated));
        let held = {
            let j = j.clone();
            tokio::spawn(async move {
                j.write(move |_| {
                    let _ = started.send(());
                    let _ = gated.lock().unwrap().recv();
                    Ok(())
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || running.recv()).await.unwrap().unwrap();
        (gate, held)
    }

    async fn futures_ok(tasks: Vec<tokio::task::JoinHandle<Result<()>>>) -> Vec<bool> {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().is_ok());
        }
        out
    }
}
