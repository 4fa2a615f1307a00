//! The PostgreSQL upsert sink against the real PostgreSQL on 127.0.0.1:5432
//! (database `test`, user `postgres`; `DOVETAIL_TEST_PG` overrides).
//! Without it the tests say so and pass, except under CI=true.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_core::config;
use dovetail_engine::{EngineOptions, RunningEngine};
use dovetail_journal::{Journal, SqliteJournal, SqliteOptions};

fn pg_url() -> String {
    std::env::var("DOVETAIL_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

async fn database() -> Option<tokio_postgres::Client> {
    match tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            Some(client)
        }
        Err(e) => {
            let msg = format!("PostgreSQL is not reachable at {} ({e})", pg_url());
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg}");
            }
            eprintln!("skipped: {msg}");
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}_{:08x}", std::process::id() ^ nanos)
}

/// An engine with one webhook flow `/hooks/customers` into `sink`.
async fn engine(
    dir: &std::path::Path,
    db_url: &str,
    connector_extra: &str,
    sink: &str,
) -> (RunningEngine, Arc<SqliteJournal>) {
    let text = format!(
        r#"[engine]
listen = "127.0.0.1:0"

[connectors.warehouse]
type = "postgres"
url = "env:WAREHOUSE_DB"
{connector_extra}

[flows.customers]
source = {{ type = "webhook", path = "/hooks/customers" }}
key = ".id"
sink = {sink}
"#
    );
    let (loaded, _) = config::load(&text, &dir.join("dovetail.toml")).unwrap();
    let secrets: std::collections::BTreeMap<String, String> = [("WAREHOUSE_DB".to_string(), db_url.to_string())].into();
    let resolved = loaded.resolve(&secrets).unwrap();
    let journal = Arc::new(SqliteJournal::open(&dir.join("journal.db"), SqliteOptions::default()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = EngineOptions { idle_poll: Duration::from_millis(50), ..EngineOptions::default() };
    let engine = dovetail_engine::start(&loaded.config, &resolved, journal.clone(), listener, options).await.unwrap();
    (engine, journal)
}

async fn post(engine: &RunningEngine, body: serde_json::Value) {
    dovetail_connectors::http::install_crypto_provider();
    let url = format!("http://{}/hooks/customers", engine.addr);
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
}

/// Waits until the flow has nothing pending or in flight.
async fn settled(journal: &SqliteJournal, expected: u64) -> dovetail_journal::FlowCounts {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counts = journal.counts().await.unwrap();
        let c = counts.into_iter().find(|c| c.flow == "customers").unwrap_or_default();
        if c.pending + c.in_flight == 0 && c.delivered + c.dead == expected {
            return c;
        }
        assert!(Instant::now() < deadline, "not settled: {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn row(db: &tokio_postgres::Client, table: &str, id: &str) -> Option<(String, i32, i64)> {
    db.query_opt(&format!("SELECT name, qty, version FROM {table} WHERE id = $1"), &[&id])
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upserts_keep_the_newest_version_and_refuse_only_the_bad_records() {
    let Some(db) = database().await else { return };
    let table = unique("dovetail_upsert");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id text PRIMARY KEY, name text NOT NULL, qty integer, version bigint NOT NULL,
                               loaded_at timestamptz GENERATED ALWAYS AS ('2026-01-01'::timestamptz) STORED);
         INSERT INTO {table} (id, name, qty, version) VALUES ('stored', 'newer in the table', 10, 10);"
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        r#"{{ type = "postgres", connector = "warehouse", table = "{table}", key = ["id"], version_column = "version", batch = {{ max_records = 50, max_wait = "300ms" }} }}"#
    );
    let (engine, journal) = engine(dir.path(), &pg_url(), "", &sink).await;
    let records = [
        serde_json::json!({"id": "a", "name": "A1", "qty": 1, "version": 1}),
        serde_json::json!({"id": "a", "name": "A3", "qty": 3, "version": 3}),
        // Older than the one before it: must not win.
        serde_json::json!({"id": "a", "name": "A2", "qty": 2, "version": 2}),
        // Not an integer: refused by PostgreSQL, alone.
        serde_json::json!({"id": "b", "name": "B1", "qty": "many", "version": 1}),
        // No version: refused before the statement.
        serde_json::json!({"id": "c", "name": "C", "qty": 5}),
        serde_json::json!({"id": "d", "name": "D1", "qty": 4, "version": 1, "ignored": true}),
        // Older than the stored row.
        serde_json::json!({"id": "stored", "name": "old news", "qty": 1, "version": 5}),
    ];
    for r in records {
        post(&engine, r).await;
    }
    let c = settled(&journal, 7).await;
    assert_eq!((c.delivered, c.dead), (5, 2), "{c:?}");
    assert_eq!(row(&db, &table, "a").await, Some(("A3".into(), 3, 3)));
    assert_eq!(row(&db, &table, "d").await, Some(("D1".into(), 4, 1)));
    assert_eq!(row(&db, &table, "stored").await, Some(("newer in the table".into(), 10, 10)));
    assert_eq!(row(&db, &table, "b").await, None);
    assert_eq!(row(&db, &table, "c").await, None);
    let dead = journal.dead_letters(Some("customers"), 10).await.unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("invalid input syntax for type integer")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("no `version`")), "{reasons:?}");

    // A later, separate write of an equal version corrects the row (a
    // replay after a mapping fix); an older one is a no-op.
    post(&engine, serde_json::json!({"id": "a", "name": "A3 fixed", "qty": 3, "version": 3})).await;
    post(&engine, serde_json::json!({"id": "d", "name": "D0", "qty": 0, "version": 0})).await;
    settled(&journal, 9).await;
    assert_eq!(row(&db, &table, "a").await, Some(("A3 fixed".into(), 3, 3)));
    assert_eq!(row(&db, &table, "d").await, Some(("D1".into(), 4, 1)));

    // A column dropped under the running engine: the write fails once on
    // the cached statement, the columns are read again, the retry lands.
    db.batch_execute(&format!("ALTER TABLE {table} DROP COLUMN qty")).await.unwrap();
    post(&engine, serde_json::json!({"id": "e", "name": "E1", "qty": 1, "version": 1})).await;
    let c = settled(&journal, 10).await;
    assert_eq!((c.delivered, c.dead), (8, 2), "{c:?}");
    let e = db.query_one(&format!("SELECT name FROM {table} WHERE id = 'e'"), &[]).await.unwrap();
    assert_eq!(e.get::<_, String>(0), "E1");
    engine.shutdown().await;
    db.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_retried_never_dead_lettered() {
    // Only the port matters: nothing listens on it.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{closed}/test");
    let extra = r#"retry = { max_attempts = 100, initial_backoff = "10ms", max_backoff = "20ms" }
breaker = { enabled = false }"#;
    let sink = r#"{ type = "postgres", connector = "warehouse", table = "customers", key = ["id"] }"#;
    let (engine, journal) = engine(dir.path(), &url, extra, sink).await;
    post(&engine, serde_json::json!({"id": "a", "name": "A"})).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let detail = loop {
        // The only record of a new journal.
        if let Some(d) = journal.record(1).await.unwrap()
            && d.attempts.len() >= 3
        {
            break d;
        }
        assert!(Instant::now() < deadline, "no retries seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    engine.shutdown().await;
    assert!(detail.dead_reason.is_none(), "{detail:?}");
    let errors: Vec<_> = detail.attempts.iter().filter_map(|a| a.error.clone()).collect();
    assert!(errors.iter().all(|e| e.starts_with("connection failed")), "{errors:?}");
}
