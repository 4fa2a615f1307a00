//! The SQLite journal against the conformance suite, plus what only a file can show.

use std::sync::Arc;

use dovetail_journal::{Journal, NewRecord, SqliteJournal, SqliteOptions};

async fn fresh() -> Arc<SqliteJournal> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    // The directory must outlive the journal; leak it for the test's lifetime.
    std::mem::forget(dir);
    Arc::new(SqliteJournal::open(&path, SqliteOptions::default()).unwrap())
}

dovetail_journal::journal_conformance!(fresh());

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
            };
            (i, j.ingest(r).await)
        });
    }
    let mut acked = Vec::new();
    let mut refused = 0;
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            (i, Ok(ingested)) => acked.push((i, ingested.id())),
            (_, Err(_)) => refused += 1,
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

/// A journal written by the first release (schema 1, no key column) opens,
/// keeps its records and gains the column.
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
    let old = j.record(1).await.unwrap().unwrap();
    assert_eq!((old.idempotency_key.as_str(), old.external_key), ("k-old", None));
    let leased = j
        .lease_with(
            dovetail_journal::LeaseMode::InKeyOrder,
            "orders",
            "a",
            dovetail_core::clock::Timestamp::from_secs(10),
            std::time::Duration::from_secs(30),
            10,
        )
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
}
