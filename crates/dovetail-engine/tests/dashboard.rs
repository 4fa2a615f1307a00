//! The dashboard in a real headless Chromium, driven over the W3C WebDriver
//! protocol (chromedriver): the page loads, shows a flow's figures, and a
//! replay click goes through the admin API and redelivers the record.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them).
//! Without them the test says so and passes, except under CI=true.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use dovetail_core::config;
use dovetail_engine::EngineOptions;
use dovetail_journal::{Journal, SqliteJournal, SqliteOptions};
use dovetail_testkit::partner::{Behaviour, Partner, Reply};

const TOKEN: &str = "dashboard-admin-token";

fn tool(env: &str, default: &str) -> Option<String> {
    let path = std::env::var(env).unwrap_or_else(|_| default.to_string());
    Path::new(&path).exists().then_some(path)
}

/// chromedriver and chromium, or the reason the test cannot run.
fn browser() -> Option<(String, String)> {
    let found = tool("CHROMEDRIVER", "/usr/bin/chromedriver").zip(tool("CHROMIUM", "/usr/bin/chromium"));
    if found.is_none() {
        let msg = "chromium and chromedriver not found (apt-get install chromium chromium-driver, or set CHROMIUM and CHROMEDRIVER)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
    }
    found
}

/// A WebDriver session on a chromedriver this test started; both end on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start(chromedriver: &str, chromium: &str) -> Browser {
        let port = dovetail_testkit::free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut b = Browser { driver, base, session: String::new(), http };
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
            }
        }}});
        let answer = b.call("POST", "/session", Some(caps)).await;
        b.session = answer["sessionId"].as_str().expect("a session").to_string();
        b
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = if path.starts_with("/session/") || path == "/session" {
            path.to_string()
        } else {
            format!("/session/{}{path}", self.session)
        };
        let mut req = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        v["value"].clone()
    }

    async fn element(&self, css: &str) -> String {
        let v = self.call("POST", "/element", Some(json!({ "using": "css selector", "value": css }))).await;
        v["element-6066-11e4-a52e-4f735466cecf"].as_str().unwrap_or_else(|| panic!("no element {css}: {v}")).to_string()
    }

    async fn text(&self, css: &str) -> String {
        let id = self.element(css).await;
        self.call("GET", &format!("/element/{id}/text"), None).await.as_str().unwrap_or("").to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_flows_figures_and_a_replay_click_redelivers() {
    let Some((chromedriver, chromium)) = browser() else { return };
    dovetail_connectors::http::install_crypto_provider();
    // The partner refuses the first order, then accepts everything.
    let partner =
        Partner::start(Behaviour::script(vec![Reply::Status { status: 422, body: "not yet".into() }], Reply::Ok))
            .await
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[engine]
listen = "127.0.0.1:0"
admin_token = "env:ADMIN_TOKEN"

[connectors.billing]
type = "http"
base_url = "{}"

[flows.orders]
source = {{ type = "webhook", path = "/hooks/orders" }}
sink = {{ type = "http", connector = "billing", path = "/v1/orders" }}
"#,
        partner.url()
    );
    let (loaded, _) = config::load(&text, Path::new("dovetail.toml")).unwrap();
    let secrets: BTreeMap<String, String> = [("ADMIN_TOKEN".to_string(), TOKEN.to_string())].into();
    let resolved = loaded.resolve(&secrets).unwrap();
    let journal = Arc::new(SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = EngineOptions { idle_poll: Duration::from_millis(50), ..EngineOptions::default() };
    let engine = dovetail_engine::start(&loaded.config, &resolved, journal.clone(), listener, options).await.unwrap();
    let base = format!("http://{}", engine.addr);
    let http = reqwest::Client::new();
    for id in ["A", "B", "C"] {
        let body = format!(r#"{{"id":"{id}"}}"#);
        let sent = http.post(format!("{base}/hooks/orders")).header("webhook-id", id).body(body).send().await.unwrap();
        assert_eq!(sent.status(), 202);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let counts = loop {
        let c = journal.counts().await.unwrap().into_iter().find(|c| c.flow == "orders").unwrap_or_default();
        if c.delivered == 2 && c.dead == 1 {
            break c;
        }
        assert!(Instant::now() < deadline, "records did not settle: {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(counts.dead, 1);
    let dead_id = journal.dead_letters(Some("orders"), 1).await.unwrap()[0].id;

    let b = Browser::start(&chromedriver, &chromium).await;
    // With an admin token the page asks for it (HTTP Basic, the token as the password).
    let refused = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers()["www-authenticate"].to_str().unwrap().starts_with("Basic"));
    let with_token = format!("http://operator:{TOKEN}@{}/", engine.addr);
    b.call("POST", "/url", Some(json!({ "url": with_token }))).await;
    let title = b.call("GET", "/title", None).await;
    assert_eq!(title, "Dovetail");
    let row = "tr[data-flow='orders']";
    assert_eq!(b.text(&format!("{row} td[data-field='received-24h']")).await, "3");
    assert_eq!(b.text(&format!("{row} td[data-field='delivered-24h']")).await, "2");
    assert_eq!(b.text(&format!("{row} td[data-field='dead']")).await, "1");
    assert!(b.text("#connectors").await.contains("billing"));
    assert!(b.text(&format!("tr[data-record='{dead_id}']")).await.contains("HTTP 422"));

    // The operator types the admin token and clicks the record's Replay button.
    let token = b.element("#token").await;
    b.call("POST", &format!("/element/{token}/value"), Some(json!({ "text": TOKEN }))).await;
    let button = b.element(&format!("button[data-replay='{dead_id}']")).await;
    b.call("POST", &format!("/element/{button}/click"), Some(json!({}))).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let message = b.text("#message").await;
        if message.contains("replayed 1 record") {
            break;
        }
        assert!(Instant::now() < deadline, "no confirmation on the page: {message:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        let d = journal.record(dead_id).await.unwrap().unwrap();
        if d.state.as_str() == "delivered" {
            break;
        }
        assert!(Instant::now() < deadline, "the replayed record was not delivered: {:?}", d.state);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.call("DELETE", &format!("/session/{}", b.session), None).await;
    engine.shutdown().await;
}
