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
