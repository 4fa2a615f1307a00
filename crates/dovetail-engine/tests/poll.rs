//! Polling sources against the misbehaving partner's paged feed: every
//! record arrives once per version, across pages, overlaps, failures,
//! records changed while paging, a field that appears half-way, and a
//! restart.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_core::config;
use dovetail_engine::{EngineOptions, RunningEngine};
use dovetail_journal::{Journal, SqliteJournal, SqliteOptions};
use dovetail_testkit::partner::{Behaviour, Feed, Partner, Reply};

const FEED: &str = "/v1/contacts";

async fn engine(partner: &Partner, journal: Arc<SqliteJournal>, cursor: &str) -> RunningEngine {
    let text = format!(
        r#"[engine]
listen = "127.0.0.1:0"

[connectors.crm]
type = "http"
base_url = "{url}"
retry = {{ max_attempts = 5, initial_backoff = "20ms", max_backoff = "100ms" }}

[flows.contacts]
source = {{ type = "poll", connector = "crm", path = "{FEED}", schedule = "every 1s", version = ".updated_at", cursor = {cursor} }}
key = ".id"
sink = {{ type = "http", connector = "crm", path = "/v1/erp-contacts" }}
"#,
        url = partner.url()
    );
    let (loaded, _) = config::load(&text, Path::new("dovetail.toml")).unwrap();
    let resolved = loaded.resolve(&std::collections::BTreeMap::new()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = EngineOptions { idle_poll: Duration::from_millis(50), ..EngineOptions::default() };
    dovetail_engine::start(&loaded.config, &resolved, journal, listener, options).await.unwrap()
}

/// Effects at the sink: (id, updated_at) of every record applied.
fn applied(partner: &Partner) -> Vec<(String, String)> {
    partner
        .effects()
        .iter()
        .filter(|e| e.path == "/v1/erp-contacts")
        .map(|e| {
            let v: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
            (v["id"].to_string(), v["updated_at"].as_str().unwrap().to_string())
        })
        .collect()
}

async fn wait_for_applied(partner: &Partner, n: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = applied(partner);
        if a.len() >= n {
            return a;
        }
        assert!(Instant::now() < deadline, "only {} of {n} records arrived; partner: {:?}", a.len(), partner.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn no_duplicates(applied: &[(String, String)]) {
    let mut seen = std::collections::BTreeSet::new();
    for a in applied {
        assert!(seen.insert(a.clone()), "{a:?} applied twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updated_since_pages_overlaps_and_failures_deliver_each_version_once() {
    dovetail_connectors::http::install_crypto_provider();
    let feed = Feed::updated_since(10).fail_every(4, Reply::Status { status: 503, body: "busy".into() });
    let partner = Partner::start(Behaviour::default().feed(FEED, feed)).await.unwrap();
    for i in 0..25 {
        partner.feed_put(FEED, serde_json::json!({ "id": i, "name": format!("contact {i}") }));
    }
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap());
    let cursor = r#"{ type = "updated_since", param = "updated_since", field = ".updated_at", overlap = "5s", has_more = ".has_more" }"#;
    let e = engine(&partner, journal.clone(), cursor).await;
    let first = wait_for_applied(&partner, 25).await;
    no_duplicates(&first);

    // An update and a new record with a field that appears half-way.
    partner.feed_put(FEED, serde_json::json!({ "id": 3, "name": "contact 3, renamed" }));
    partner.feed_put(FEED, serde_json::json!({ "id": 99, "name": "new", "tier": "gold" }));
    let second = wait_for_applied(&partner, 27).await;
    no_duplicates(&second);
    let gold = partner.effects().into_iter().find(|e| e.record_id.as_deref() == Some("99")).unwrap();
    assert!(String::from_utf8_lossy(&gold.body).contains(r#""tier":"gold""#), "unknown fields are kept");

    // The cursor is durable; the overlap makes later runs ask a little back.
    let cursor = journal.load_state("cursor:contacts:updated_since").await.unwrap().unwrap();
    assert!(cursor.starts_with("2026-01-01T00:00:00.0"), "{cursor}");
    let asked: Vec<String> =
        partner.feed_requests(FEED).iter().filter_map(|r| r.query_param("updated_since")).collect();
    assert!(asked.iter().any(|s| s.as_str() < cursor.as_str()), "the overlap looks back: {asked:?} vs {cursor}");
    assert!(partner.stats().feed_requests > 4, "the 503s were retried");

    // A restart resumes from the journal: nothing is delivered again.
    e.shutdown().await;
    let e = engine(&partner, journal.clone(), r#"{ type = "updated_since", param = "updated_since", field = ".updated_at", overlap = "5s", has_more = ".has_more" }"#).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // at least one more run
    let after = applied(&partner);
    assert_eq!(after.len(), 27, "nothing applied twice after a restart");
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_page_and_link_cursors_read_every_record() {
    dovetail_connectors::http::install_crypto_provider();
    let styles = [
        (Feed::token(7), r#"{ type = "token", param = "cursor", next = ".next_cursor" }"#),
        (Feed::pages(7), r#"{ type = "page", param = "page", size_param = "per_page", size = 7 }"#),
        (Feed::link(7), r#"{ type = "link" }"#),
    ];
    for (feed, cursor) in styles {
        let partner = Partner::start(Behaviour::default().feed(FEED, feed)).await.unwrap();
        for i in 0..20 {
            partner.feed_put(FEED, serde_json::json!({ "id": i }));
        }
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap());
        let e = engine(&partner, journal, cursor).await;
        let got = wait_for_applied(&partner, 20).await;
        no_duplicates(&got);
        assert_eq!(got.len(), 20, "{cursor}");
        e.shutdown().await;
    }
}
