//! Alerting end to end: a rule's condition holds, the alert fires once to
//! a notification webhook (generic JSON and Slack bodies), is saved in the
//! journal, and resolves when the condition clears.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_core::config;
use dovetail_engine::EngineOptions;
use dovetail_journal::{Journal, Selector, SqliteJournal, SqliteOptions};
use dovetail_testkit::partner::{Behaviour, Partner, Reply};

async fn wait_for<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_fires_an_alert_to_both_webhooks_and_discarding_it_resolves() {
    dovetail_connectors::http::install_crypto_provider();
    let partner =
        Partner::start(Behaviour::default().fail_body("reject", Reply::Status { status: 422, body: "refused".into() }))
            .await
            .unwrap();
    // A receiver that refuses every request (a revoked webhook).
    let revoked =
        Partner::start(Behaviour::default().require("authorization", "Bearer nobody-has-this")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[engine]
listen = "127.0.0.1:0"

[alerts]
repeat_every = "1h"

[notify.ops]
url = "{url}/hooks/alerts"

[notify.revoked]
url = "{revoked}/hooks/gone"

[notify.chat]
url = "env:CHAT_WEBHOOK_URL"
format = "slack"
min_severity = "warning"

[connectors.billing]
type = "http"
base_url = "{url}"

[flows.orders]
source = {{ type = "webhook", path = "/hooks/orders" }}
sink = {{ type = "http", connector = "billing", path = "/v1/orders" }}
"#,
        url = partner.url(),
        revoked = revoked.url()
    );
    let (loaded, _) = config::load(&text, Path::new("dovetail.toml")).unwrap();
    let secrets: BTreeMap<String, String> =
        [("CHAT_WEBHOOK_URL".to_string(), format!("{}/services/T000/B000/XXXX", partner.url()))].into();
    let resolved = loaded.resolve(&secrets).unwrap();
    let journal = Arc::new(SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = EngineOptions {
        idle_poll: Duration::from_millis(50),
        alert_every: Duration::from_millis(100),
        ..EngineOptions::default()
    };
    let engine = dovetail_engine::start(&loaded.config, &resolved, journal.clone(), listener, options).await.unwrap();
    let base = format!("http://{}", engine.addr);
    let sent = reqwest::Client::new()
        .post(format!("{base}/hooks/orders"))
        .header("webhook-id", "o1")
        .body(r#"{"id":"o1","status":"reject"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);

    let alerts_at = |path: &'static str| {
        let partner = &partner;
        move || -> Vec<serde_json::Value> {
            partner
                .effects()
                .iter()
                .filter(|e| e.path == path)
                .map(|e| serde_json::from_slice(&e.body).unwrap())
                .collect()
        }
    };
    let ops = alerts_at("/hooks/alerts");
    let chat = alerts_at("/services/T000/B000/XXXX");
    let fired = wait_for("the generic notice", async || ops().into_iter().next()).await;
    assert_eq!((fired["status"].as_str(), fired["rule"].as_str()), (Some("firing"), Some("dlq_depth")), "{fired}");
    assert_eq!((fired["flow"].as_str(), fired["severity"].as_str()), (Some("orders"), Some("warning")));
    let slack = wait_for("the Slack notice", async || chat().into_iter().next()).await;
    assert!(slack["text"].as_str().unwrap().starts_with("[FIRING] orders"), "{slack}");
    assert!(slack["blocks"].is_array());
    // Saved, so a restart would not fire it again.
    let book = wait_for("the saved book", async || journal.load_state("alert_book").await.unwrap()).await;
    assert!(book.contains("dlq_depth"), "{book}");

    // The operator discards the dead letter: the alert resolves, once.
    journal
        .discard(&Selector::Flow("orders".into()), dovetail_core::clock::Timestamp::from_millis(i64::MAX), 10)
        .await
        .unwrap();
    let resolved_notice =
        wait_for("the resolution", async || ops().into_iter().find(|n| n["status"] == "resolved")).await;
    assert_eq!(resolved_notice["rule"], "dlq_depth");
    tokio::time::sleep(Duration::from_millis(500)).await; // several more evaluations
    let notices = ops();
    assert_eq!(notices.len(), 2, "fired once and resolved once, nothing repeated within the hour: {notices:?}");
    // The notices are records of internal flows, delivered like any other.
    let counts = journal.counts().await.unwrap();
    let ops_flow = counts.iter().find(|c| c.flow == "notify.ops").unwrap();
    assert_eq!(ops_flow.delivered, 2);
    // The revoked receiver's notices are dead-lettered; its flow is not paused,
    // so later alerts still go to it (and to everyone else).
    let revoked_flow = wait_for("the revoked receiver's dead letters", async || {
        journal.counts().await.unwrap().into_iter().find(|c| c.flow == "notify.revoked" && c.dead == 2)
    })
    .await;
    assert_eq!(revoked_flow.paused, None);
    let dead = journal.dead_letters(Some("notify.revoked"), 10).await.unwrap();
    assert!(dead.iter().all(|d| d.class == dovetail_core::policy::ErrorClass::Auth), "{dead:?}");
    engine.shutdown().await;
}
