//! File drops on a real folder: rows become records, bad rows are
//! quarantined with their row number, files move to the archive once
//! durable, a file read again journals nothing twice, and a full extract
//! yields only what changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_core::config;
use dovetail_engine::EngineOptions;
use dovetail_journal::{Journal, SqliteJournal, SqliteOptions};
use dovetail_testkit::partner::{Behaviour, Partner};

fn bodies(partner: &Partner, path: &str) -> Vec<serde_json::Value> {
    partner.effects().iter().filter(|e| e.path == path).map(|e| serde_json::from_slice(&e.body).unwrap()).collect()
}

async fn until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_files_are_processed_once_with_bad_rows_quarantined_and_extracts_diffed() {
    dovetail_connectors::http::install_crypto_provider();
    let partner = Partner::start(Behaviour::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    for sub in ["inbox", "extracts"] {
        std::fs::create_dir(base.join(sub)).unwrap();
    }
    std::fs::write(base.join("inbox/orders-1.csv"), "id,total\nA1,10.00\nA2,11.00\nA3,12.00,oops\nA4,13.00\n").unwrap();
    let text = format!(
        r#"[engine]
listen = "127.0.0.1:0"

[connectors.erp]
type = "http"
base_url = "{url}"

[flows.orders]
source = {{ type = "files", dir = "inbox", format = "csv", schedule = "every 200ms" }}
key = ".id"
sink = {{ type = "http", connector = "erp", path = "/v1/orders" }}

[flows.products]
source = {{ type = "files", dir = "extracts", format = "jsonl", schedule = "every 200ms", mode = "full_extract", archive = "extracts-archive" }}
key = ".sku"
sink = {{ type = "http", connector = "erp", path = "/v1/products" }}
"#,
        url = partner.url()
    );
    let (loaded, _) = config::load(&text, &base.join("dovetail.toml")).unwrap();
    let resolved = loaded.resolve(&std::collections::BTreeMap::new()).unwrap();
    let journal = Arc::new(SqliteJournal::open(&base.join("journal.db"), SqliteOptions::default()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = EngineOptions {
        idle_poll: Duration::from_millis(50),
        base_dir: base.to_path_buf(),
        ..EngineOptions::default()
    };
    let engine = dovetail_engine::start(&loaded.config, &resolved, journal.clone(), listener, options).await.unwrap();

    let orders = until("the CSV rows", || Some(bodies(&partner, "/v1/orders")).filter(|b| b.len() == 3)).await;
    assert!(orders.contains(&serde_json::json!({"id": "A1", "total": "10.00"})), "{orders:?}");
    until("the file to be archived", || base.join("archive/orders-1.csv").exists().then_some(())).await;
    assert!(!base.join("inbox/orders-1.csv").exists());
    let dead = journal.dead_letters(Some("orders"), 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.starts_with("orders-1.csv row 4: "), "{}", dead[0].reason);
    let bad = journal.record(dead[0].id).await.unwrap().unwrap();
    assert_eq!(bad.payload, b"A3,12.00,oops\n", "the raw row is kept");

    // The same file dropped again (as after a crash before its move): nothing twice.
    std::fs::copy(base.join("archive/orders-1.csv"), base.join("inbox/orders-1.csv")).unwrap();
    until("the copy to be archived", || (!base.join("inbox/orders-1.csv").exists()).then_some(())).await;
    let c = journal.counts().await.unwrap().into_iter().find(|c| c.flow == "orders").unwrap();
    assert_eq!(c.pending + c.in_flight + c.delivered + c.dead, 4, "nothing journalled twice: {c:?}");

    // A full extract, then the next one: only the changed and the new rows.
    std::fs::write(base.join("extracts/p-1.jsonl"), "{\"sku\":\"S1\",\"price\":1}\n{\"sku\":\"S2\",\"price\":2}\n")
        .unwrap();
    until("the first extract", || Some(bodies(&partner, "/v1/products")).filter(|b| b.len() == 2)).await;
    until("the first extract archived", || base.join("extracts-archive/p-1.jsonl").exists().then_some(())).await;
    std::fs::write(
        base.join("extracts/p-2.jsonl"),
        "{\"sku\":\"S1\",\"price\":1}\n{\"sku\":\"S2\",\"price\":3}\n{\"sku\":\"S3\",\"price\":4}\n",
    )
    .unwrap();
    let products =
        until("the second extract", || Some(bodies(&partner, "/v1/products")).filter(|b| b.len() >= 4)).await;
    until("the second extract archived", || base.join("extracts-archive/p-2.jsonl").exists().then_some(())).await;
    // Rows are journalled before their file moves: the journal holds exactly what the diff let through.
    let c = journal.counts().await.unwrap().into_iter().find(|c| c.flow == "products").unwrap();
    assert_eq!(c.pending + c.in_flight + c.delivered, 4, "S1 did not change: {c:?}");
    assert_eq!(products.len(), 4, "{products:?}");
    let mut second: Vec<String> = products[2..].iter().map(|p| p.to_string()).collect();
    second.sort();
    assert_eq!(second, [r#"{"sku":"S2","price":3}"#, r#"{"sku":"S3","price":4}"#]);

    // S2's price goes back to what it was: that is a change as well.
    std::fs::write(
        base.join("extracts/p-3.jsonl"),
        "{\"sku\":\"S1\",\"price\":1}\n{\"sku\":\"S2\",\"price\":2}\n{\"sku\":\"S3\",\"price\":4}\n",
    )
    .unwrap();
    until("the third extract archived", || base.join("extracts-archive/p-3.jsonl").exists().then_some(())).await;
    let c = journal.counts().await.unwrap().into_iter().find(|c| c.flow == "products").unwrap();
    assert_eq!(c.pending + c.in_flight + c.delivered, 5, "only S2 changed: {c:?}");

    // The second extract again, byte for byte: S2 goes back to 3, which is news again.
    std::fs::copy(base.join("extracts-archive/p-2.jsonl"), base.join("extracts/p-4.jsonl")).unwrap();
    until("the fourth extract archived", || base.join("extracts-archive/p-4.jsonl").exists().then_some(())).await;
    let c = journal.counts().await.unwrap().into_iter().find(|c| c.flow == "products").unwrap();
    assert_eq!(c.pending + c.in_flight + c.delivered, 6, "S2 changed back: {c:?}");
    engine.shutdown().await;
}
