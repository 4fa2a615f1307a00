//! Does durability cost throughput? Ingest into the SQLite journal
//! (`synchronous = FULL`, an fsync per commit) from many concurrent callers,
//! against a baseline measured in the same run: the naive durable ingest,
//! one transaction (one fsync) per record.
//!
//! `cargo bench -p dovetail-journal --bench group_commit`

use std::sync::Arc;
use std::time::Instant;

use dovetail_core::clock::Timestamp;
use dovetail_core::record::Attempt;
use dovetail_journal::{AttemptReport, Journal, NewRecord, Outcome, SqliteJournal, SqliteOptions};

const PAYLOAD: &str = r#"{"id":"ord_000000","customer":{"id":"cus_42","email":"ada@example.com"},"currency":"EUR","amount":"129.90","status":"paid","lines":[{"sku":"A-1","qty":2,"price":"39.95"},{"sku":"B-7","qty":1,"price":"50.00"}],"created_at":"2026-11-23T10:15:00Z"}"#;

fn record(i: usize) -> NewRecord {
    NewRecord {
        flow: "orders".into(),
        external_key: None,
        delivery_id: Some(format!("msg_{i}")),
        idempotency_key: format!("dt1-{i:032x}"),
        correlation_id: format!("{i:032x}"),
        content_type: Some("application/json".into()),
        payload: PAYLOAD.as_bytes().to_vec(),
        received_at: Timestamp::from_secs(1_700_000_000),
        quarantine: None,
        prepared: None,
    }
}

/// One transaction and one fsync per record, as a straightforward durable
/// intake would do it.
fn baseline(dir: &std::path::Path, n: usize) -> f64 {
    let conn = rusqlite::Connection::open(dir.join("baseline.db")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.execute_batch("CREATE TABLE records (id INTEGER PRIMARY KEY, delivery_id TEXT UNIQUE, payload BLOB)").unwrap();
    let start = Instant::now();
    for i in 0..n {
        conn.execute(
            "INSERT INTO records (delivery_id, payload) VALUES (?1, ?2)",
            (format!("msg_{i}"), PAYLOAD.as_bytes()),
        )
        .unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn journal(dir: &std::path::Path, name: &str, n: usize, concurrency: usize) -> (f64, f64) {
    let j = Arc::new(SqliteJournal::open(&dir.join(name), SqliteOptions::default()).unwrap());
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency {
        let j = j.clone();
        tasks.spawn(async move {
            for i in (t..n).step_by(concurrency) {
                j.ingest(record(i)).await.unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let s = j.writer_stats().unwrap_or_default();
    (rate, s.jobs as f64 / s.commits.max(1) as f64)
}

/// The delivery side of the journal for records already ingested: lease up
/// to `window` at a time and complete each as delivered from its own task, as
/// the dispatcher does. Returns records/s.
async fn deliver(j: Arc<SqliteJournal>, n: usize, window: usize) -> f64 {
    let now = Timestamp::from_secs(1_700_000_100);
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let leased = j.lease("orders", "bench", now, std::time::Duration::from_secs(60), window).await.unwrap();
        assert!(!leased.is_empty(), "ran out of records after {done}");
        done += leased.len();
        let mut tasks = tokio::task::JoinSet::new();
        for r in leased {
            let j = j.clone();
            tasks.spawn(async move {
                let attempt = Attempt {
                    number: r.attempt,
                    started_at: now,
                    duration_ms: 1,
                    status: Some(200),
                    class: None,
                    error: None,
                };
                let report = AttemptReport {
                    id: r.id,
                    owner: "bench".into(),
                    attempt,
                    outcome: Outcome::Delivered,
                    keep_batch: false,
                    quota: None,
                };
                assert!(j.complete(report).await.unwrap());
            });
        }
        while tasks.join_next().await.is_some() {}
    }
    n as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    // `-- --records N`: only N records ingested by 64 callers, then leased
    // and completed; small enough to run under callgrind, whose instruction
    // counts do not vary from run to run as timings do.
    let argv: Vec<String> = std::env::args().collect();
    if let Some(n) = argv.iter().position(|a| a == "--records").and_then(|i| argv.get(i + 1)?.parse::<usize>().ok()) {
        let (rate, _) = journal(dir.path(), "profile.db", n, 64).await;
        let j = Arc::new(SqliteJournal::open(&dir.path().join("profile.db"), SqliteOptions::default()).unwrap());
        let delivered = deliver(j, n, 64).await;
        println!("{n} records: ingest {rate:.0}/s, lease and complete {delivered:.0}/s");
        return;
    }
    let base = baseline(dir.path(), 2_000);
    println!("journal ingest, {} byte payload, synchronous=FULL", PAYLOAD.len());
    println!("{:<44} {:>10} records/s", "baseline: one transaction per record", format!("{base:.0}"));
    for (concurrency, n) in [(1, 2_000), (16, 20_000), (64, 50_000), (256, 100_000)] {
        let (rate, factor) = journal(dir.path(), &format!("j{concurrency}.db"), n, concurrency).await;
        println!(
            "{:<44} {:>10} records/s  {:>6.1}x baseline  {:>6.1} records per commit",
            format!("SqliteJournal, {concurrency} concurrent callers"),
            format!("{rate:.0}"),
            rate / base,
            factor
        );
    }
    let j = Arc::new(SqliteJournal::open(&dir.path().join("j64.db"), SqliteOptions::default()).unwrap());
    let rate = deliver(j, 50_000, 64).await;
    println!("{:<44} {:>10} records/s", "lease 64 at a time, complete each", format!("{rate:.0}"));
}
