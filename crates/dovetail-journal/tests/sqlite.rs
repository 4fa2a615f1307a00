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
