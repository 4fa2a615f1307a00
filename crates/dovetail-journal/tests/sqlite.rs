//! The SQLite journal against the conformance suite, plus what only a file can show.

use std::sync::Arc;
use std::time::Duration;

use dovetail_core::clock::Timestamp;
use dovetail_core::record::Attempt;
use dovetail_core::rollup::MinuteRollup;
use dovetail_journal::{
    AttemptReport, Journal, LeaseMode, NewRecord, Outcome, Prepared, RecordDetail, SqliteJournal, SqliteOptions,
};

async fn fresh() -> Arc<SqliteJournal> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    // The directory must outlive the journal; leak it for the test's lifetime.
    std::mem::forget(dir);
    Arc::new(SqliteJournal::open(&path, SqliteOptions::default()).unwrap())
}

dovetail_journal::journal_conformance!(fresh(), after = counts_match_the_records);

/// `flow_counts` is kept by every write, not counted: after each check it
/// must say what counting the records says.
async fn counts_match_the_records(j: &SqliteJournal) {
    let conn = rusqlite::Connection::open(j.path()).unwrap();
    let query = |sql: &str| -> Vec<(String, String, i64)> {
        let mut stmt = conn.prepare(sql).unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
    };
    let kept = query("SELECT flow, state, n FROM flow_counts WHERE n <> 0 ORDER BY flow, state");
    let counted = query("SELECT flow, state, COUNT(*) FROM records GROUP BY flow, state ORDER BY flow, state");
    assert_eq!(kept, counted, "flow_counts drifted from the records");
}

#[tokio::test]
async fn acknowledged_records_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    let id = {
        let j = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
        let r = NewRecord {
            flow: "orders".into(),
            external_key: None,
            delivery_id: Some("d1".into()),
            idempotency_key: "k".into(),
            correlation_id: "c".into(),
            content_type: None,
            payload: b"{}".to_vec(),
            received_at: dovetail_core::clock::Timestamp::from_secs(1),
            quarantine: None,
            prepared: None,
        };
        j.ingest(r).await.unwrap().id()
    };
    let j = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(j.record(id).await.unwrap().unwrap().idempotency_key, "k");
}

#[test]
fn a_missing_folder_is_a_clear_error() {
    let err =
        SqliteJournal::open(std::path::Path::new("/nonexistent/dir/j.db"), SqliteOptions::default()).err().unwrap();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

/// A full journal refuses writes; what it acknowledged is all there, and it
/// works again once it has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_acknowledges_only_what_it_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    let options = SqliteOptions { max_size_bytes: Some(256 * 1024), ..SqliteOptions::default() };
    let j = Arc::new(SqliteJournal::open(&path, options).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..600 {
        let j = j.clone();
        tasks.spawn(async move {
            let r = NewRecord {
                flow: "orders".into(),
                external_key: None,
                delivery_id: Some(format!("d{i}")),
                idempotency_key: format!("k{i}"),
                correlation_id: "c".into(),
                content_type: None,
                payload: vec![b'x'; 2000],
                received_at: dovetail_core::clock::Timestamp::from_secs(1),
                quarantine: None,
                prepared: None,
            };
            (i, j.ingest(r).await)
        });
    }
    let mut acked = Vec::new();
    let mut refused = 0;
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            (i, Ok(ingested)) => acked.push((i, ingested.id())),
            (_, Err(e)) => {
                // Said as what it is, not as a failure to open the file.
                assert!(e.to_string().contains("not stored"), "{e}");
                refused += 1
            }
        }
    }
    assert!(refused > 0 && !acked.is_empty(), "the cap was hit part-way: {} acked, {refused} refused", acked.len());
    drop(j);
    let reopened = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
    for (i, id) in &acked {
        let r = reopened.record(*id).await.unwrap().unwrap_or_else(|| panic!("acknowledged record {id} is missing"));
        assert_eq!(r.idempotency_key, format!("k{i}"));
    }
    let pending: u64 = reopened.counts().await.unwrap().iter().map(|c| c.pending).sum();
    assert_eq!(pending, acked.len() as u64, "nothing unacknowledged was kept either");
    reopened.ping().await.unwrap();
}

/// The columns of `records` and the schema version of the file at `path`.
fn schema_of(path: &std::path::Path) -> (Vec<(String, String)>, i64) {
    let c = rusqlite::Connection::open(path).unwrap();
    let columns = c
        .prepare("SELECT name, type FROM pragma_table_info('records')")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    (columns, c.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap())
}

/// The columns every migrated file gains, with their declared types.
const ADDED: [(&str, &str); 7] = [
    ("external_key", "TEXT"),
    ("batch_key", "TEXT"),
    ("payload_purged_at", "INTEGER"),
    ("mapped", "BLOB"),
    ("mapping_version", "INTEGER"),
    ("sink_mapping_version", "INTEGER"),
    ("prepared", "INTEGER"),
];

const AT: Timestamp = Timestamp::from_secs(10);
const LEASE: Duration = Duration::from_secs(30);

/// The roll-ups of flow `orders`, minute 0 on.
async fn orders_minutes(j: &SqliteJournal) -> Vec<MinuteRollup> {
    j.minutes(Some("orders"), Timestamp::from_millis(0), Timestamp::from_secs(86_400)).await.unwrap()
}

/// Leases, delivers and purges the record `id` of flow `orders`, then reads it back.
async fn deliver_and_purge(j: &SqliteJournal, id: i64) -> RecordDetail {
    let leased = j.lease_with(LeaseMode::InKeyOrder, "orders", "a", AT, LEASE, 10).await.unwrap();
    assert_eq!(leased.iter().map(|r| r.id).collect::<Vec<_>>(), [id]);
    assert_eq!(leased[0].prepared, None, "a record of an older file is validated and mapped again");
    let attempt = Attempt {
        number: leased[0].attempt,
        started_at: AT,
        duration_ms: 5,
        status: Some(200),
        class: None,
        error: None,
    };
    let mapped = Prepared { body: Some(b"{\"m\":1}".to_vec()), mapping_version: Some(1), sink_mapping_version: None };
    assert!(j.prepare(id, "a", leased[0].attempt, mapped).await.unwrap());
    let report =
        AttemptReport { id, owner: "a".into(), attempt, outcome: Outcome::Delivered, keep_batch: false, quota: None };
    assert!(j.complete(report).await.unwrap());
    let d = j.record(id).await.unwrap().unwrap();
    assert_eq!((d.mapped.as_deref(), d.mapping_version, d.prepared), (Some(&b"{\"m\":1}"[..]), Some(1), true));
    let later = Timestamp::from_secs(100);
    assert_eq!(j.purge_payloads("orders", later, later, 10).await.unwrap(), 1);
    j.record(id).await.unwrap().unwrap()
}

/// A record of `flow` received at [`AT`], named `delivery_id`.
fn received(flow: &str, delivery_id: &str) -> NewRecord {
    NewRecord {
        flow: flow.into(),
        external_key: None,
        delivery_id: Some(delivery_id.into()),
        idempotency_key: format!("k-{delivery_id}"),
        correlation_id: "c".into(),
        content_type: None,
        payload: b"{}".to_vec(),
        received_at: AT,
        quarantine: None,
        prepared: None,
    }
}

/// The schema version this build writes.
const CURRENT: i64 = 5;

/// A journal of schema 4 kept no state counts: they are counted from its
/// records once, and kept from then on; the `records_state` index they
/// replace is dropped.
#[tokio::test]
async fn a_version_4_journal_gets_its_state_counts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v4.db");
    {
        let j = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
        for d in ["a", "b", "c"] {
            j.ingest(received("orders", d)).await.unwrap();
        }
        j.ingest(received("refunds", "r")).await.unwrap();
        j.lease("orders", "n", AT, Duration::from_secs(30), 1).await.unwrap();
    }
    {
        // What a version 4 file is: no `flow_counts`, a `records_state` index.
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "DROP TABLE flow_counts; CREATE INDEX records_state ON records (flow, state); PRAGMA user_version = 4;",
        )
        .unwrap();
    }
    let j = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(schema_of(&path).1, CURRENT);
    counts_match_the_records(&j).await;
    let counts = j.counts().await.unwrap();
    let orders = counts.iter().find(|c| c.flow == "orders").unwrap();
    assert_eq!((orders.pending, orders.in_flight, orders.oldest_pending_at), (2, 1, Some(AT)));
    assert_eq!(counts.iter().find(|c| c.flow == "refunds").unwrap().pending, 1);
    let c = rusqlite::Connection::open(&path).unwrap();
    let index: i64 = c
        .query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'records_state'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(index, 0, "the index the counts replace is gone");
    drop(j);
    // Opening it again counts nothing twice.
    let j = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
    counts_match_the_records(&j).await;
}

/// A journal written by the first release (schema 1) opens, keeps its
/// records and gains the columns of every later version; its records are not
/// prepared.
#[tokio::test]
async fn a_version_1_journal_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE records (
                id INTEGER PRIMARY KEY, flow TEXT NOT NULL, delivery_id TEXT, idempotency_key TEXT NOT NULL,
                correlation_id TEXT NOT NULL, content_type TEXT, payload BLOB NOT NULL, received_at INTEGER NOT NULL,
                state TEXT NOT NULL, next_attempt_at INTEGER, lease_owner TEXT, lease_until INTEGER, leased_at INTEGER,
                attempts INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0, finished_at INTEGER,
                dead_class TEXT, dead_reason TEXT);
             INSERT INTO records (flow, idempotency_key, correlation_id, payload, received_at, state, next_attempt_at)
             VALUES ('orders', 'k-old', 'c', x'7b7d', 1000, 'pending', 1000);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let j = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
    let (columns, version) = schema_of(&path);
    assert_eq!(version, CURRENT);
    counts_match_the_records(&j).await;
    for (name, declared) in ADDED {
        assert!(columns.iter().any(|(n, t)| n == name && t.starts_with(declared)), "{name} {declared} in {columns:?}");
    }
    let old = j.record(1).await.unwrap().unwrap();
    assert_eq!((old.idempotency_key.as_str(), old.external_key), ("k-old", None));
    assert_eq!((old.prepared, old.mapped, old.mapping_version, old.sink_mapping_version), (false, None, None, None));
    assert!(orders_minutes(&j).await.is_empty(), "an older file starts without roll-ups");
    let purged = deliver_and_purge(&j, 1).await;
    assert_eq!((purged.mapped.as_deref(), purged.payload_purged_at), (None, Some(Timestamp::from_secs(100))));
    let counted = orders_minutes(&j).await;
    assert_eq!((counted.len(), counted[0].delivered, counted[0].latency_sum_ms), (1, 1, 5));
    drop(j);
    // Opening it again changes nothing.
    let again = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(again.record(1).await.unwrap().unwrap(), purged);
    assert_eq!(schema_of(&path), (columns, version));
}

/// A journal of schema 2 opens, keeps its records and gains the preparation
/// columns; its records are not prepared. This one was migrated from version
/// 1 by a release that declared `payload_purged_at` TEXT, so a purge time is
/// stored as text: it still reads as a time.
#[tokio::test]
async fn a_version_2_journal_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE records (
                id INTEGER PRIMARY KEY, flow TEXT NOT NULL, delivery_id TEXT, idempotency_key TEXT NOT NULL,
                correlation_id TEXT NOT NULL, content_type TEXT, payload BLOB NOT NULL, received_at INTEGER NOT NULL,
                state TEXT NOT NULL, next_attempt_at INTEGER, lease_owner TEXT, lease_until INTEGER, leased_at INTEGER,
                attempts INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0, finished_at INTEGER,
                dead_class TEXT, dead_reason TEXT, external_key TEXT, batch_key TEXT, payload_purged_at TEXT);
             INSERT INTO records (flow, idempotency_key, correlation_id, payload, received_at, state, next_attempt_at,
                                  external_key)
             VALUES ('orders', 'k-waiting', 'c', x'7b7d', 1000, 'pending', 1000, 'cus_1');
             INSERT INTO records (flow, idempotency_key, correlation_id, payload, received_at, state, finished_at,
                                  payload_purged_at)
             VALUES ('orders', 'k-purged', 'c', x'', 1000, 'delivered', 2000, 5000);
             INSERT INTO records (flow, idempotency_key, correlation_id, payload, received_at, state, next_attempt_at,
                                  attempts, failures)
             VALUES ('orders', 'k-retrying', 'c', x'7b7d', 1000, 'pending', 9000000000000, 1, 1);
             PRAGMA user_version = 2;",
        )
        .unwrap();
    }
    let j = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
    let (columns, version) = schema_of(&path);
    assert_eq!(version, CURRENT);
    counts_match_the_records(&j).await;
    for (name, _) in ADDED {
        assert_eq!(columns.iter().filter(|(n, _)| n == name).count(), 1, "{name} in {columns:?}");
    }
    let old = j.record(2).await.unwrap().unwrap();
    assert_eq!(old.payload_purged_at, Some(Timestamp::from_secs(5)));
    assert_eq!((old.prepared, old.mapped, old.mapping_version), (false, None, None));
    let waiting = j.record(1).await.unwrap().unwrap();
    assert_eq!((waiting.external_key.as_deref(), waiting.prepared), (Some("cus_1"), false));
    // Already sent once, as its raw payload under its key: that is what it sends again.
    let retrying = j.record(3).await.unwrap().unwrap();
    assert_eq!((retrying.prepared, retrying.mapped), (true, None));
    let purged = deliver_and_purge(&j, 1).await;
    assert_eq!((purged.mapped.as_deref(), purged.payload_purged_at), (None, Some(Timestamp::from_secs(100))));
    assert_eq!(orders_minutes(&j).await.iter().map(|m| m.delivered).sum::<u64>(), 1);
}

/// A journal of schema 3 (everything but the roll-ups) opens as version 4
/// with an empty `flow_minutes`, and counts from then on; reopening keeps
/// the counts.
#[tokio::test]
async fn a_version_3_journal_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3.db");
    let record = |d: &str| received("orders", d);
    {
        let j = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
        j.ingest(record("old")).await.unwrap();
    }
    {
        // What a version 3 file is: the same tables, without the roll-ups.
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("DROP TABLE flow_minutes; PRAGMA user_version = 3;").unwrap();
    }
    let j = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(schema_of(&path).1, CURRENT);
    assert!(orders_minutes(&j).await.is_empty(), "records from before version 4 are not counted");
    let id = j.find("old", 1).await.unwrap()[0];
    deliver_and_purge(&j, id).await;
    j.ingest(record("new")).await.unwrap();
    let mut latency_buckets = MinuteRollup::default().latency_buckets;
    latency_buckets[dovetail_core::rollup::bucket_of(5)] = 1;
    let expected = MinuteRollup {
        flow: "orders".into(),
        minute: 0,
        received: 1,
        delivered: 1,
        latency_count: 1,
        latency_sum_ms: 5,
        latency_buckets,
        last_delivered_at: Some(AT.plus(Duration::from_millis(5))),
        ..MinuteRollup::default()
    };
    assert_eq!(orders_minutes(&j).await, std::slice::from_ref(&expected));
    drop(j);
    let again = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(orders_minutes(&again).await, [expected]);
}

/// A file whose `flow_minutes` lacks a counter column (one added by a later
/// class or latency bound) gains it on open, at zero.
#[tokio::test]
async fn missing_rollup_columns_are_added() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    drop(SqliteJournal::open(&path, SqliteOptions::default()).unwrap());
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("ALTER TABLE flow_minutes DROP COLUMN fail_in_progress; ALTER TABLE flow_minutes DROP COLUMN latency_le_60000;")
            .unwrap();
    }
    let j = SqliteJournal::open(&path, SqliteOptions::default()).unwrap();
    let c = rusqlite::Connection::open(&path).unwrap();
    let has = |column: &str| -> bool {
        c.query_row("SELECT COUNT(*) FROM pragma_table_info('flow_minutes') WHERE name = ?1", [column], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap()
            == 1
    };
    assert!(has("fail_in_progress") && has("latency_le_60000"));
    j.ingest(NewRecord { delivery_id: None, ..received("orders", "k") }).await.unwrap();
    assert_eq!(orders_minutes(&j).await.len(), 1);
}
