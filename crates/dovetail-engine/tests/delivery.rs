//! The engine end to end over real HTTP on 127.0.0.1: signed webhooks in,
//! a misbehaving partner out, a real SQLite journal in between.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_core::clock::{Clock, SystemClock};
use dovetail_core::config::{self, Config, Resolved};
use dovetail_core::policy::ErrorClass;
use dovetail_core::record::StateName;
use dovetail_core::signature::{Scheme, SigningSecret, sign};
use dovetail_engine::{EngineOptions, RunningEngine};
use dovetail_journal::{FlowCounts, Journal, Selector, SqliteJournal, SqliteOptions};
use dovetail_testkit::partner::{Behaviour, OAuth, Partner, Reply};

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STRIPE_SECRET: &str = "whsec_stripe_test_secret";
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const ADMIN_TOKEN: &str = "admin-token-for-tests";
type Headers = Vec<(&'static str, String)>;

const FAST_RETRY: &str = r#"{ max_attempts = 4, initial_backoff = "50ms", max_backoff = "200ms", jitter = 0.0 }"#;

struct Harness {
    engine: Option<RunningEngine>,
    journal: Arc<SqliteJournal>,
    partner: Partner,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    /// The config, with every placeholder filled in.
    text: String,
    jq_time_limit: Duration,
    idle_poll: Duration,
}

fn config_text(partner: &str, retry: &str, connector_extra: &str) -> String {
    // Extra lines may bring their own auth; `{partner}` in them is the partner's URL.
    let connector_extra = connector_extra.replace("{partner}", partner);
    let auth = if connector_extra.contains("auth =") {
        String::new()
    } else {
        r#"auth = { type = "bearer", token = "env:BILLING_TOKEN" }"#.to_string()
    };
    format!(
        r#"
[engine]
store = "sqlite://journal.db"
listen = "127.0.0.1:0"
max_body = "4KiB"
admin_token = "env:ADMIN_TOKEN"

[connectors.billing]
type = "http"
base_url = "{partner}"
api_version = {{ header = "Api-Version", value = "2026-01-01" }}
{auth}
timeout = "500ms"
retry = {retry}
{connector_extra}

[flows.orders]
source = {{ type = "webhook", path = "/hooks/orders", signature = {{ scheme = "standard-webhooks", secret = "env:ORDERS_SECRET" }} }}
sink = {{ type = "http", connector = "billing", path = "/v1/orders" }}

[flows.customers]
source = {{ type = "webhook", path = "/hooks/customers", signature = {{ scheme = "standard-webhooks", secret = "env:ORDERS_SECRET" }} }}
sink = {{ type = "http", connector = "billing", path = "/v1/customers" }}
key = ".id"
ordering = "per_key"

[flows.bulk]
source = {{ type = "webhook", path = "/hooks/bulk", signature = {{ scheme = "standard-webhooks", secret = "env:ORDERS_SECRET" }} }}
sink = {{ type = "http", connector = "billing", path = "/v1/orders/bulk", batch = {{ max_records = 10, max_wait = "200ms" }} }}

[flows.shortlived]
source = {{ type = "webhook", path = "/hooks/shortlived", signature = {{ scheme = "standard-webhooks", secret = "env:ORDERS_SECRET" }} }}
sink = {{ type = "http", connector = "billing", path = "/v1/shortlived" }}
retention = "1ms"

[flows.validated]
source = {{ type = "webhook", path = "/hooks/validated", signature = {{ scheme = "standard-webhooks", secret = "env:ORDERS_SECRET" }} }}
sink = {{ type = "http", connector = "billing", path = "/v1/validated" }}
schema = "{{schema}}"

[flows.payments]
source = {{ type = "webhook", path = "/hooks/stripe", signature = {{ scheme = "stripe", secret = "env:STRIPE_SECRET" }} }}
sink = {{ type = "http", connector = "billing", path = "/v1/payments" }}

[flows.pushes]
source = {{ type = "webhook", path = "/hooks/github", signature = {{ scheme = "github", secret = "env:GITHUB_SECRET" }} }}
sink = {{ type = "http", connector = "billing", path = "/v1/pushes" }}

[models.Order]
schema = "{{dir}}/order.model.json"

# A shop that sends no delivery id: its event id de-duplicates.
[flows.shop]
source = {{ type = "webhook", path = "/hooks/shop" }}
mapping = {{ file = "{{dir}}/shop_to_order.jq", version = 1 }}
model = "Order"
key = ".order.number"
idempotency_key = ".event_id"
sink = {{ type = "http", connector = "billing", path = "/v1/erp-orders", mapping = {{ file = "{{dir}}/order_to_erp.jq", version = 4 }} }}

# A mapping whose cost depends on the record.
[flows.counting]
source = {{ type = "webhook", path = "/hooks/counting" }}
mapping = {{ file = "{{dir}}/counting.jq", version = 1 }}
sink = {{ type = "http", connector = "billing", path = "/v1/counts" }}
"#
    )
}

fn secrets() -> BTreeMap<String, String> {
    [
        ("BILLING_TOKEN", "tok_123"),
        ("OAUTH_SECRET", "cs_live_secret"),
        ("ORDERS_SECRET", SW_SECRET),
        ("STRIPE_SECRET", STRIPE_SECRET),
        ("GITHUB_SECRET", GITHUB_SECRET),
        ("ADMIN_TOKEN", ADMIN_TOKEN),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn load(text: &str) -> (Config, Resolved) {
    let (loaded, _warnings) = config::load(text, Path::new("dovetail.toml")).expect("test config is valid");
    let mut resolved = loaded.resolve(&secrets()).expect("test secrets resolve");
    loaded.attach_files(&mut resolved, &|p| std::fs::read_to_string(p)).expect("test schemas compile");
    (loaded.config, resolved)
}

/// The shop's order → the canonical Order. Version 1 refuses amounts with
/// more decimals than the currency has (to_minor_units never rounds).
const SHOP_TO_ORDER: &str = r#"{
  order_id: .order.number,
  placed_at: (.order.placed | parse_datetime("%d/%m/%Y %H:%M"; "Europe/Paris")),
  amount_minor: (.order.currency as $c | .order.total | to_minor_units($c)),
  currency: (.order.currency | currency_code),
  customer: { name: (.customer.name | collapse_whitespace | titlecase), phone: (.customer.phone | to_e164("FR")) },
  gift: (.order.gift | to_bool)
}"#;

const ORDER_MODEL: &str = r#"{
  "type": "object",
  "required": ["order_id", "placed_at", "amount_minor", "currency", "customer"],
  "properties": { "amount_minor": { "type": "integer", "minimum": 1 } }
}"#;

const ORDER_TO_ERP: &str = r#"{id: .order_id, total: (.amount_minor | from_minor_units("EUR")), at: .placed_at, phone: .customer.phone, gift: .gift}"#;

const ORDER_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["id", "amount"],
  "properties": { "id": { "type": "string" }, "amount": { "type": "string", "pattern": "^[0-9]+\\.[0-9]{2}$" } }
}"#;

impl Harness {
    async fn start(behaviour: Behaviour) -> Harness {
        Harness::with_retry(behaviour, FAST_RETRY).await
    }

    async fn with_retry(behaviour: Behaviour, retry: &str) -> Harness {
        Harness::with_connector(behaviour, retry, "").await
    }

    /// `connector_extra`: more lines for `[connectors.billing]`. Without an
    /// `auth =` among them the connector sends a static bearer token, which
    /// the partner requires.
    async fn with_connector(behaviour: Behaviour, retry: &str, connector_extra: &str) -> Harness {
        dovetail_connectors::http::install_crypto_provider();
        let behaviour = if connector_extra.contains("auth =") {
            behaviour
        } else {
            behaviour.require("authorization", "Bearer tok_123")
        };
        let partner = Partner::start(behaviour.require("api-version", "2026-01-01")).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap());
        let schema = dir.path().join("order.schema.json");
        std::fs::write(&schema, ORDER_SCHEMA).unwrap();
        for (file, text) in [
            ("order.model.json", ORDER_MODEL),
            ("shop_to_order.jq", SHOP_TO_ORDER),
            ("order_to_erp.jq", ORDER_TO_ERP),
            ("counting.jq", "{id, count: (reduce range(.n) as $i (0; . + 1))}"),
        ] {
            std::fs::write(dir.path().join(file), text).unwrap();
        }
        let text = config_text(&partner.url(), retry, connector_extra)
            .replace("{schema}", &schema.display().to_string())
            .replace("{dir}", &dir.path().display().to_string());
        let mut h = Harness {
            engine: None,
            journal,
            partner,
            base: String::new(),
            http: reqwest::Client::new(),
            _dir: dir,
            text,
            jq_time_limit: Duration::from_secs(5),
            idle_poll: Duration::from_millis(50),
        };
        h.restart().await;
        h
    }

    /// Starts the engine (again) on the same journal, reading the config and its files afresh.
    async fn restart(&mut self) {
        if let Some(e) = self.engine.take() {
            e.shutdown().await;
        }
        let (config, resolved) = load(&self.text);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let options = EngineOptions {
            idle_poll: self.idle_poll,
            housekeeping: Duration::from_millis(200),
            jq_time_limit: self.jq_time_limit,
            ..EngineOptions::default()
        };
        let engine = dovetail_engine::start(&config, &resolved, self.journal.clone(), listener, options).await.unwrap();
        self.base = format!("http://{}", engine.addr);
        self.engine = Some(engine);
    }

    async fn post(&self, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, serde_json::Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).body(body.to_vec());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let json = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    /// A Standard Webhooks delivery signed now.
    async fn send_order(&self, id: &str, body: &str) -> (u16, serde_json::Value) {
        let secret = SigningSecret::parse(Scheme::StandardWebhooks, SW_SECRET).unwrap();
        let headers = sign(Scheme::StandardWebhooks, &secret, id, SystemClock.now(), body.as_bytes());
        let headers: Vec<(&str, String)> = headers.into_iter().collect();
        self.post("/hooks/orders", &headers, body.as_bytes()).await
    }

    async fn counts(&self, flow: &str) -> FlowCounts {
        self.journal.counts().await.unwrap().into_iter().find(|c| c.flow == flow).unwrap_or_default()
    }

    /// Polls until `pred` holds on the flow's counts; generous bound, never a speed test.
    async fn wait_for(&self, flow: &str, what: &str, pred: impl Fn(&FlowCounts) -> bool) -> FlowCounts {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = self.counts(flow).await;
            if pred(&c) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; counts: {c:?}; partner: {:?}",
                self.partner.stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(e) = self.engine.take() {
            e.shutdown().await;
        }
    }
}

fn order(id: &str) -> String {
    format!(r#"{{"id":"{id}","amount":"12.50","currency":"EUR"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_webhook_is_delivered_once_with_every_header() {
    let h = Harness::start(Behaviour::default()).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let secret = SigningSecret::parse(Scheme::StandardWebhooks, SW_SECRET).unwrap();
    let body = order("ord_1");
    let mut headers: Vec<(&str, String)> =
        sign(Scheme::StandardWebhooks, &secret, "msg_1", SystemClock.now(), body.as_bytes());
    headers.push(("traceparent", tp.to_string()));
    headers.push(("content-type", "application/json".to_string()));
    let (status, json) = h.post("/hooks/orders", &headers, body.as_bytes()).await;
    assert_eq!(status, 202, "{json}");
    assert_eq!(json["status"], "accepted");
    h.wait_for("orders", "delivery", |c| c.delivered == 1).await;

    let effects = h.partner.effects();
    assert_eq!(effects.len(), 1);
    assert_eq!(effects[0].record_id.as_deref(), Some("ord_1"));
    assert_eq!(effects[0].path, "/v1/orders");
    assert_eq!(effects[0].body.as_ref(), body.as_bytes(), "the payload is forwarded byte for byte");
    let req = &h.partner.requests()[0];
    assert_eq!(req.header("api-version"), Some("2026-01-01"));
    assert_eq!(req.header("authorization"), Some("Bearer tok_123"));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(
        req.header("x-correlation-id"),
        Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        "the inbound trace id travels on"
    );
    assert!(req.header("traceparent").unwrap().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    let key = req.header("idempotency-key").unwrap();
    assert_eq!(
        key,
        dovetail_core::ids::idempotency_key("orders", Some("msg_1")),
        "the key is derived from the delivery id"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_altered_stale_and_unsigned_requests_get_401_and_touch_nothing() {
    let h = Harness::start(Behaviour::default()).await;
    let secret = SigningSecret::parse(Scheme::StandardWebhooks, SW_SECRET).unwrap();
    let wrong = SigningSecret::parse(Scheme::StandardWebhooks, "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=").unwrap();
    let body = order("ord_x");
    let now = SystemClock.now();
    let cases: Vec<(&str, Headers, String)> = vec![
        ("forged", sign(Scheme::StandardWebhooks, &wrong, "m1", now, body.as_bytes()), body.clone()),
        ("altered", sign(Scheme::StandardWebhooks, &secret, "m2", now, body.as_bytes()), body.replace("12.50", "0.01")),
        (
            "stale",
            sign(Scheme::StandardWebhooks, &secret, "m3", six_minutes_before(now), body.as_bytes()),
            body.clone(),
        ),
        ("unsigned", vec![], body.clone()),
    ];
    for (what, headers, sent) in cases {
        let (status, json) = h.post("/hooks/orders", &headers, sent.as_bytes()).await;
        assert_eq!(status, 401, "{what}: {json}");
        assert!(json["error"].is_string(), "{what}: the refusal says why");
    }
    assert_eq!(h.counts("orders").await, FlowCounts::default(), "nothing was journalled");
    assert_eq!(h.partner.stats().requests, 0);
    h.stop().await;
}

/// Past the 5-minute tolerance.
fn six_minutes_before(t: dovetail_core::clock::Timestamp) -> dovetail_core::clock::Timestamp {
    dovetail_core::clock::Timestamp::from_millis(t.as_millis() - 6 * 60 * 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_webhook_id_twice_is_accepted_twice_and_journalled_once() {
    let h = Harness::start(Behaviour::default()).await;
    let (s1, j1) = h.send_order("msg_dup", &order("ord_2")).await;
    let (s2, j2) = h.send_order("msg_dup", &order("ord_2")).await;
    assert_eq!((s1, s2), (202, 200), "{j1} {j2}");
    assert_eq!(j2["status"], "duplicate");
    assert_eq!(j1["record_id"], j2["record_id"]);
    h.wait_for("orders", "delivery", |c| c.delivered == 1).await;
    let c = h.counts("orders").await;
    assert_eq!(c.pending + c.in_flight + c.delivered, 1);
    assert_eq!(h.partner.stats().effects, 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_with_the_same_key_until_delivered() {
    let script =
        vec![Reply::Status { status: 503, body: "down".into() }, Reply::Status { status: 500, body: "oops".into() }];
    let h = Harness::start(Behaviour::script(script, Reply::Ok)).await;
    let (_, json) = h.send_order("msg_r", &order("ord_3")).await;
    h.wait_for("orders", "delivery after retries", |c| c.delivered == 1).await;
    let requests = h.partner.requests();
    assert_eq!(requests.len(), 3);
    let keys: Vec<_> = requests.iter().map(|r| r.header("idempotency-key").unwrap().to_string()).collect();
    assert!(keys.windows(2).all(|w| w[0] == w[1]), "one key on every retry: {keys:?}");
    let id = json["record_id"].as_i64().unwrap();
    let detail = h.journal.record(id).await.unwrap().unwrap();
    let classes: Vec<_> = detail.attempts.iter().map(|a| (a.status, a.class)).collect();
    assert_eq!(
        classes,
        [(Some(503), Some(ErrorClass::Server)), (Some(500), Some(ErrorClass::Server)), (Some(200), None)]
    );
    assert!(detail.attempts[0].error.as_deref().unwrap().contains("down"), "the partner's answer is kept");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_422_is_dead_lettered_at_once_with_the_response_body() {
    let behaviour = Behaviour::default()
        .fail_body("bad", Reply::Status { status: 422, body: r#"{"error":"amount invalid"}"#.into() });
    let h = Harness::start(behaviour).await;
    let (_, json) = h.send_order("msg_bad", r#"{"id":"bad","amount":"-1"}"#).await;
    h.wait_for("orders", "dead letter", |c| c.dead == 1).await;
    let dl = h.journal.dead_letters(Some("orders"), 10).await.unwrap();
    assert_eq!(dl[0].id, json["record_id"].as_i64().unwrap());
    assert_eq!(dl[0].class, ErrorClass::Rejected);
    assert!(dl[0].reason.contains("422") && dl[0].reason.contains("amount invalid"), "{}", dl[0].reason);
    // Let retries that should not happen have time to happen.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.partner.stats().requests, 1, "a 422 is never retried");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_before_the_next_attempt() {
    let script = vec![Reply::RetryAfter { status: 429, value: "1".into() }];
    let h = Harness::start(Behaviour::script(script, Reply::Ok)).await;
    h.send_order("msg_ra", &order("ord_4")).await;
    h.wait_for("orders", "delivery", |c| c.delivered == 1).await;
    let r = h.partner.requests();
    assert_eq!(r.len(), 2);
    let gap = r[1].at.duration_since(r[0].at);
    assert!(gap >= Duration::from_millis(1000), "retried {gap:?} after a Retry-After of 1s");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_after_the_partner_committed_causes_no_double_effect() {
    let retry = r#"{ max_attempts = 4, initial_backoff = "1s", max_backoff = "2s", jitter = 0.0 }"#;
    let script = vec![Reply::SlowAfterCommit(Duration::from_millis(800))];
    let h = Harness::with_retry(Behaviour::script(script, Reply::Ok), retry).await;
    let (_, json) = h.send_order("msg_slow", &order("ord_5")).await;
    h.wait_for("orders", "delivery", |c| c.delivered == 1).await;
    assert!(h.partner.double_effects().is_empty());
    assert_eq!(h.partner.stats().effects, 1);
    assert_eq!(h.partner.stats().replays, 1, "the retry was answered from the partner's idempotency store");
    let detail = h.journal.record(json["record_id"].as_i64().unwrap()).await.unwrap().unwrap();
    assert_eq!(detail.attempts[0].class, Some(ErrorClass::Timeout));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_after_commit_causes_no_double_effect() {
    let h = Harness::start(Behaviour::script(vec![Reply::DropAfterCommit, Reply::DropBeforeCommit], Reply::Ok)).await;
    let (_, json) = h.send_order("msg_drop", &order("ord_6")).await;
    h.wait_for("orders", "delivery", |c| c.delivered == 1).await;
    assert!(h.partner.double_effects().is_empty());
    assert_eq!(h.partner.stats().effects, 1);
    let detail = h.journal.record(json["record_id"].as_i64().unwrap()).await.unwrap().unwrap();
    assert_eq!(detail.attempts[0].class, Some(ErrorClass::Connection));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_failure_pauses_the_flow_and_holds_the_record() {
    let h = Harness::start(Behaviour::always(Reply::Status { status: 401, body: "token expired".into() })).await;
    let (_, json) = h.send_order("msg_auth", &order("ord_7")).await;
    let id = json["record_id"].as_i64().unwrap();
    let c = h.wait_for("orders", "pause", |c| c.paused.is_some() && c.pending == 1).await;
    assert!(c.paused.unwrap().reason.contains("401"));
    h.send_order("msg_auth_2", &order("ord_8")).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.partner.stats().requests, 1, "a paused flow sends nothing more");
    let c = h.counts("orders").await;
    assert_eq!((c.pending, c.dead), (2, 0), "records are held, never dead-lettered");
    let detail = h.journal.record(id).await.unwrap().unwrap();
    assert_eq!(detail.state, StateName::Pending);
    assert_eq!(detail.attempts[0].class, Some(ErrorClass::Auth));

    h.partner.set_behaviour(Behaviour::default().require("authorization", "Bearer tok_123"));
    assert!(h.journal.resume_flow("orders").await.unwrap());
    h.wait_for("orders", "delivery after resume", |c| c.delivered == 2).await;
    assert!(h.partner.double_effects().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_dead_lettered_when_the_budget_is_spent() {
    let h = Harness::start(Behaviour::always(Reply::Status { status: 503, body: "maintenance".into() })).await;
    h.send_order("msg_503", &order("ord_9")).await;
    h.wait_for("orders", "dead letter", |c| c.dead == 1).await;
    assert_eq!(h.partner.stats().requests, 4, "max_attempts = 4");
    let dl = h.journal.dead_letters(None, 10).await.unwrap();
    assert_eq!(dl[0].class, ErrorClass::Server);
    assert!(dl[0].reason.starts_with("gave up after 4 transient failures"), "{}", dl[0].reason);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_json_is_quarantined_with_its_raw_bytes() {
    let h = Harness::start(Behaviour::default()).await;
    let (status, json) = h.send_order("msg_nj", "amount=12&currency=EUR").await;
    assert_eq!(status, 202, "{json}");
    assert_eq!(json["status"], "quarantined");
    assert!(json["reason"].as_str().unwrap().contains("not JSON"));
    let detail = h.journal.record(json["record_id"].as_i64().unwrap()).await.unwrap().unwrap();
    assert_eq!(detail.state, StateName::Dead);
    assert_eq!(detail.dead_class, Some(ErrorClass::Validation));
    assert_eq!(detail.payload, b"amount=12&currency=EUR");
    assert_eq!(h.partner.stats().requests, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_413_and_touches_nothing() {
    let h = Harness::start(Behaviour::default()).await;
    let big = format!(r#"{{"id":"big","pad":"{}"}}"#, "x".repeat(5000));
    let (status, json) = h.send_order("msg_big", &big).await;
    assert_eq!(status, 413);
    assert!(json["error"].as_str().unwrap().contains("limit of 4096 bytes"), "{json}");
    assert_eq!(h.counts("orders").await, FlowCounts::default());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_and_github_signatures_are_verified() {
    let h = Harness::start(Behaviour::default()).await;
    let now = SystemClock.now();
    let body = r#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;
    let stripe = SigningSecret::parse(Scheme::Stripe, STRIPE_SECRET).unwrap();
    let headers = sign(Scheme::Stripe, &stripe, "evt_1", now, body.as_bytes());
    assert_eq!(h.post("/hooks/stripe", &headers, body.as_bytes()).await.0, 202);
    assert_eq!(h.post("/hooks/stripe", &headers, body.as_bytes()).await.0, 200, "Stripe's event id de-duplicates");
    let forged = SigningSecret::parse(Scheme::Stripe, "whsec_other").unwrap();
    let headers = sign(Scheme::Stripe, &forged, "evt_2", now, body.as_bytes());
    assert_eq!(h.post("/hooks/stripe", &headers, body.as_bytes()).await.0, 401);

    let gh = SigningSecret::parse(Scheme::GitHub, GITHUB_SECRET).unwrap();
    let push = r#"{"id":"push_1","ref":"refs/heads/main"}"#;
    let headers = sign(Scheme::GitHub, &gh, "delivery-1", now, push.as_bytes());
    assert_eq!(h.post("/hooks/github", &headers, push.as_bytes()).await.0, 202);
    let altered = push.replace("main", "evil");
    assert_eq!(h.post("/hooks/github", &headers, altered.as_bytes()).await.0, 401);
    // An empty delivery id names nothing: two such pushes are two records.
    let other = r#"{"id":"push_2"}"#;
    let headers = sign(Scheme::GitHub, &gh, "", now, other.as_bytes());
    let (s1, j1) = h.post("/hooks/github", &headers, other.as_bytes()).await;
    let (s2, j2) = h.post("/hooks/github", &headers, other.as_bytes()).await;
    assert_eq!((s1, s2), (202, 202), "{j1} {j2}");
    assert_ne!(j1["record_id"], j2["record_id"]);
    h.wait_for("payments", "delivery", |c| c.delivered == 1).await;
    h.wait_for("pushes", "delivery", |c| c.delivered == 3).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_and_unknown_paths() {
    let h = Harness::start(Behaviour::default()).await;
    let get = |p: &str| h.http.get(format!("{}{p}", h.base)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&ready.bytes().await.unwrap()).unwrap();
    assert_eq!(body["journal"], "ok");
    assert_eq!(h.post("/hooks/nothing", &[], b"{}").await.0, 404);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_trips_the_breaker_holds_records_and_sees_only_probes() {
    let extra = r#"max_in_flight = 2
breaker = { consecutive_failures = 3, open_for = "300ms", max_open_for = "1s" }"#;
    let h = Harness::with_connector(Behaviour::default(), FAST_RETRY, extra).await;
    h.send_order("msg_up", &order("ord_up")).await;
    h.wait_for("orders", "delivery before the outage", |c| c.delivered == 1).await;

    h.partner.set_behaviour(Behaviour::always(Reply::DropBeforeCommit));
    let before = h.partner.stats().requests;
    for i in 0..20 {
        h.send_order(&format!("msg_out_{i}"), &order(&format!("ord_out_{i}"))).await;
    }
    // The breaker opens and says so in the journal.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = h.journal.connector_health().await.unwrap();
        if health.iter().any(|c| c.connector == "billing" && c.breaker != "closed") {
            break;
        }
        assert!(Instant::now() < deadline, "the breaker never opened: {health:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The outage lasts three seconds of real time, whatever the machine's speed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = h.partner.stats().requests - before;
    let c = h.counts("orders").await;
    assert_eq!(c.dead, 0, "no record is dead-lettered for an outage");
    // Without the breaker, 20 records with a 50-200 ms backoff and 4 attempts
    // each would make 80 calls and then dead-letter all of them. With it: the
    // calls that trip it (at most 3 failures + 2 in flight), then one probe
    // per open period (300 ms, 600 ms, then 1 s): a handful.
    assert!(during <= 12, "{during} calls reached a partner that was down");

    h.partner.set_behaviour(Behaviour::default().require("authorization", "Bearer tok_123"));
    h.wait_for("orders", "delivery after the outage", |c| c.delivered == 21).await;
    let health = h.journal.connector_health().await.unwrap();
    assert_eq!(health[0].breaker, "closed", "{health:?}");
    assert!(h.partner.double_effects().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pace_below_the_partners_limit_never_meets_a_429() {
    let extra = "rate_limit = { requests_per_second = 4, burst = 4 }";
    let h = Harness::with_connector(Behaviour::default().rate_limited(5.0, 5), FAST_RETRY, extra).await;
    for i in 0..24 {
        h.send_order(&format!("msg_p{i}"), &order(&format!("ord_p{i}"))).await;
    }
    h.wait_for("orders", "paced delivery", |c| c.delivered == 24).await;
    let stats = h.partner.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    // The bucket allows its burst plus four per second in any one second.
    assert!(h.partner.requests_per_window(Duration::from_secs(1)) <= 8);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pace_above_the_partners_limit_slows_down_and_never_jumps_retry_after() {
    // Misconfigured on purpose: we think 20/s, the partner allows 2/s. One
    // request at a time, so every request we send was decided after the
    // partner's last answer.
    let extra = "rate_limit = { requests_per_second = 20, burst = 20 }\nmax_in_flight = 1";
    let h = Harness::with_connector(Behaviour::default().rate_limited(2.0, 2), FAST_RETRY, extra).await;
    for i in 0..8 {
        h.send_order(&format!("msg_q{i}"), &order(&format!("ord_q{i}"))).await;
    }
    h.wait_for("orders", "delivery despite throttling", |c| c.delivered == 8).await;
    let stats = h.partner.stats();
    assert!(stats.rate_limited > 0, "the partner did throttle: {stats:?}");
    assert_eq!(stats.retry_after_violations, 0, "never sent before Retry-After: {stats:?}");
    assert_eq!(h.counts("orders").await.dead, 0, "throttling dead-letters nothing");
    let health = h.journal.connector_health().await.unwrap();
    assert!(health[0].current_rate.unwrap() < 20.0, "the connector slowed down: {health:?}");
    h.stop().await;
}

fn oauth_partner(ttl: Duration) -> Behaviour {
    Behaviour::default().oauth(OAuth {
        token_path: "/oauth/token".into(),
        client_id: "dovetail".into(),
        client_secret: "cs_live_secret".into(),
        token_ttl: ttl,
        refresh_token: None,
    })
}

const OAUTH: &str = r#"auth = { type = "oauth2_client_credentials", token_url = "{partner}/oauth/token", client_id = "dovetail", client_secret = "env:OAUTH_SECRET" }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_tokens_are_cached_shared_and_renewed_before_they_expire() {
    // Renewal is due 3.2 s after the token is fetched; the first five
    // deliveries take a fraction of that even on a slow machine.
    let h = Harness::with_connector(oauth_partner(Duration::from_secs(4)), FAST_RETRY, OAUTH).await;
    for i in 0..5 {
        h.send_order(&format!("msg_o{i}"), &order(&format!("ord_o{i}"))).await;
    }
    h.wait_for("orders", "delivery with a token", |c| c.delivered == 5).await;
    assert_eq!(h.partner.stats().tokens_issued, 1, "one token served every request: {:?}", h.partner.stats());
    // Outlive the first token; the next records need a new one.
    tokio::time::sleep(Duration::from_millis(4200)).await;
    for i in 5..10 {
        h.send_order(&format!("msg_o{i}"), &order(&format!("ord_o{i}"))).await;
    }
    h.wait_for("orders", "delivery after the token expired", |c| c.delivered == 10).await;
    let stats = h.partner.stats();
    assert_eq!(stats.tokens_issued, 2, "{stats:?}");
    assert_eq!(stats.invalid_token, 0, "an expired token is renewed before it is used: {stats:?}");
    assert!(h.counts("orders").await.paused.is_none());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_renewed_once_and_the_request_sent_again() {
    let h = Harness::with_connector(oauth_partner(Duration::from_secs(3600)), FAST_RETRY, OAUTH).await;
    h.send_order("msg_r1", &order("ord_r1")).await;
    h.wait_for("orders", "first delivery", |c| c.delivered == 1).await;
    h.partner.revoke_all_tokens();
    h.send_order("msg_r2", &order("ord_r2")).await;
    h.wait_for("orders", "delivery with a renewed token", |c| c.delivered == 2).await;
    let stats = h.partner.stats();
    assert_eq!((stats.tokens_issued, stats.invalid_token), (2, 1), "{stats:?}");
    assert!(h.partner.double_effects().is_empty());
    assert!(h.counts("orders").await.paused.is_none(), "a renewed token is not an auth failure");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_the_token_endpoint_refuses_pause_the_flow_and_hold_records() {
    let h = Harness::with_connector(oauth_partner(Duration::from_secs(3600)), FAST_RETRY, OAUTH).await;
    h.partner.set_client_secret("rotated-by-the-partner");
    let (_, json) = h.send_order("msg_cs", &order("ord_cs")).await;
    let c = h.wait_for("orders", "the pause", |c| c.paused.is_some()).await;
    let reason = c.paused.unwrap().reason;
    assert!(reason.contains("token endpoint") && reason.contains("401"), "{reason}");
    assert!(!reason.contains("cs_live_secret"), "no secret in the pause reason: {reason}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = h.counts("orders").await;
    assert_eq!((c.pending, c.dead), (1, 0), "the record is held");
    let detail = h.journal.record(json["record_id"].as_i64().unwrap()).await.unwrap().unwrap();
    assert_eq!(detail.attempts[0].class, Some(ErrorClass::Auth));
    assert_eq!(h.partner.stats().effects, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_quota_holds_records_until_the_next_window() {
    let extra = "quota = { per_hour = 5, alert_at = 0.6 }";
    // Slow answers keep the first five on the wire while the dispatcher
    // looks for more work: those must count before they are answered.
    let slow = Behaviour::always(Reply::SlowAfterCommit(Duration::from_millis(200)));
    let h = Harness::with_connector(slow, FAST_RETRY, extra).await;
    for i in 0..8 {
        h.send_order(&format!("msg_k{i}"), &order(&format!("ord_k{i}"))).await;
    }
    h.wait_for("orders", "the quota's worth of deliveries", |c| c.delivered >= 5).await;
    // Give the engine every chance to overspend.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = h.counts("orders").await;
    assert_eq!((c.delivered, c.pending, c.dead), (5, 3, 0), "held, not dropped");
    assert_eq!(h.partner.stats().requests, 5, "not one request past the quota");
    let used = h.journal.quota_used("billing", SystemClock.now()).await.unwrap();
    assert_eq!((used.this_hour, used.today), (5, 5));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_ordering_delivers_one_keys_updates_in_order_despite_a_failure() {
    // The first request fails; without ordering, later updates of the same
    // customer would overtake the one being retried.
    let script = vec![Reply::Status { status: 503, body: "busy".into() }];
    let h = Harness::start(Behaviour::script(script, Reply::Ok)).await;
    let secret = SigningSecret::parse(Scheme::StandardWebhooks, SW_SECRET).unwrap();
    for v in 1..=5 {
        for customer in ["cus_a", "cus_b"] {
            let body = format!(r#"{{"id":"{customer}","version":{v}}}"#);
            let headers =
                sign(Scheme::StandardWebhooks, &secret, &format!("{customer}-{v}"), SystemClock.now(), body.as_bytes());
            assert_eq!(h.post("/hooks/customers", &headers, body.as_bytes()).await.0, 202);
        }
    }
    h.wait_for("customers", "every update", |c| c.delivered == 10).await;
    for customer in ["cus_a", "cus_b"] {
        let versions: Vec<u64> = h
            .partner
            .effects()
            .iter()
            .filter(|e| e.record_id.as_deref() == Some(customer))
            .map(|e| serde_json::from_slice::<serde_json::Value>(&e.body).unwrap()["version"].as_u64().unwrap())
            .collect();
        assert_eq!(versions, [1, 2, 3, 4, 5], "{customer}'s updates arrived out of order");
    }
    let detail = h.journal.record(1).await.unwrap().unwrap();
    assert_eq!(detail.external_key.as_deref(), Some("cus_a"));
    h.stop().await;
}

async fn send_bulk(h: &Harness, n: usize) {
    let secret = SigningSecret::parse(Scheme::StandardWebhooks, SW_SECRET).unwrap();
    for i in 0..n {
        let status = if i % 5 == 4 { "reject" } else { "paid" };
        let body = format!(r#"{{"id":"ord_b{i}","status":"{status}"}}"#);
        let headers = sign(Scheme::StandardWebhooks, &secret, &format!("bulk-{i}"), SystemClock.now(), body.as_bytes());
        assert_eq!(h.post("/hooks/bulk", &headers, body.as_bytes()).await.0, 202);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_requests_carry_many_records_and_dead_letter_only_the_refused_ones() {
    let partner = Behaviour::default().bulk("/v1/orders/bulk").fail_item("reject", 422);
    let h = Harness::start(partner).await;
    send_bulk(&h, 25).await;
    let c = h.wait_for("bulk", "every record settled", |c| c.delivered + c.dead == 25).await;
    assert_eq!((c.delivered, c.dead), (20, 5));
    let stats = h.partner.stats();
    assert!(stats.bulk_requests < 25, "records were batched: {stats:?}");
    assert_eq!(stats.bulk_items, 20);
    assert!(h.partner.double_effects().is_empty());
    let dead = h.journal.dead_letters(Some("bulk"), 10).await.unwrap();
    assert!(dead.iter().all(|d| d.class == ErrorClass::Rejected && d.reason.contains("422")), "{dead:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_request_lost_after_the_partner_applied_it_is_not_applied_twice() {
    // The first bulk request is applied, then the connection drops: the same
    // records go again with the same batch key and the partner replays.
    let partner =
        Behaviour::script(vec![Reply::DropAfterCommit], Reply::Ok).bulk("/v1/orders/bulk").fail_item("reject", 422);
    let h = Harness::start(partner).await;
    send_bulk(&h, 8).await;
    h.wait_for("bulk", "every record settled", |c| c.delivered + c.dead == 8).await;
    let stats = h.partner.stats();
    assert!(stats.dropped >= 1, "{stats:?}");
    assert!(h.partner.double_effects().is_empty(), "{:?}", h.partner.double_effects());
    assert_eq!(h.partner.effects_by_record().len(), 7, "every accepted record applied once");
    h.stop().await;
}

async fn send_validated(h: &Harness, id: &str, body: &str) -> (u16, serde_json::Value) {
    let secret = SigningSecret::parse(Scheme::StandardWebhooks, SW_SECRET).unwrap();
    let headers = sign(Scheme::StandardWebhooks, &secret, id, SystemClock.now(), body.as_bytes());
    h.post("/hooks/validated", &headers, body.as_bytes()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_breaking_the_schema_are_quarantined_with_pointers_and_never_sent() {
    let h = Harness::start(Behaviour::default()).await;
    let (status, json) = send_validated(&h, "v1", r#"{"id":"ord_1","amount":"12.50"}"#).await;
    assert_eq!((status, json["status"].as_str()), (202, Some("accepted")));
    let (status, json) = send_validated(&h, "v2", r#"{"id":7,"amount":"12,50"}"#).await;
    assert_eq!((status, json["status"].as_str()), (202, Some("quarantined")), "{json}");
    let reason = json["reason"].as_str().unwrap();
    assert!(reason.contains("/id: 7 is not of type") && reason.contains("/amount: "), "{reason}");
    let c = h.wait_for("validated", "the valid record", |c| c.delivered == 1).await;
    assert_eq!(c.dead, 1);
    let dead = h.journal.dead_letters(Some("validated"), 10).await.unwrap();
    assert_eq!(dead[0].class, ErrorClass::Validation);
    assert_eq!(
        h.journal.record(dead[0].id).await.unwrap().unwrap().payload,
        br#"{"id":7,"amount":"12,50"}"#,
        "raw bytes kept"
    );

    // Replayed before the schema (or the record) is fixed, it is checked
    // again and goes back to the DLQ without reaching the partner.
    let before = h.partner.stats().requests;
    let sel = dovetail_journal::Selector::Flow("validated".into());
    assert_eq!(h.journal.replay(&sel, SystemClock.now(), 10).await.unwrap(), 1);
    h.wait_for("validated", "the replayed record back in the DLQ", |c| {
        c.dead == 1 && c.pending == 0 && c.in_flight == 0
    })
    .await;
    assert_eq!(h.partner.stats().requests, before, "an invalid record is never sent");
    let detail = h.journal.record(dead[0].id).await.unwrap().unwrap();
    assert!(
        detail
            .attempts
            .last()
            .unwrap()
            .error
            .as_deref()
            .unwrap()
            .starts_with("not sent: the record does not match its schema")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_non_json_record_is_not_sent() {
    let h = Harness::start(Behaviour::default()).await;
    let (_, json) = h.send_order("msg_raw", "not json at all").await;
    assert_eq!(json["status"], "quarantined");
    let sel = dovetail_journal::Selector::Flow("orders".into());
    assert_eq!(h.journal.replay(&sel, SystemClock.now(), 10).await.unwrap(), 1);
    h.wait_for("orders", "the replayed record back in the DLQ", |c| c.dead == 1 && c.pending == 0 && c.in_flight == 0)
        .await;
    assert_eq!(h.partner.stats().requests, 0, "raw bytes that are not JSON never reach the partner");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_in_the_payloads_is_recorded_with_an_example_record() {
    let h = Harness::start(Behaviour::default()).await;
    for i in 0..dovetail_core::shape::WARMUP {
        h.send_order(&format!("msg_w{i}"), &order(&format!("ord_w{i}"))).await;
    }
    assert!(h.journal.drift_events(Some("orders"), 10).await.unwrap().is_empty(), "nothing during the warm-up");
    let (_, json) =
        h.send_order("msg_w_new", r#"{"id":"ord_x","amount":12.5,"currency":"EUR","coupon":"WELCOME"}"#).await;
    let id = json["record_id"].as_i64().unwrap();
    let events = h.journal.drift_events(Some("orders"), 10).await.unwrap();
    let seen: Vec<(&str, &str, &str)> =
        events.iter().map(|e| (e.event.kind.as_str(), e.event.path.as_str(), e.event.json_type.as_str())).collect();
    assert_eq!(seen, [("added", "coupon", "string"), ("retyped", "amount", "number")]);
    assert!(events.iter().all(|e| e.event.example_record_id == id));
    assert_eq!(events[1].event.previous_types, [dovetail_core::shape::JsonType::String]);
    let journal = h.journal.clone();
    h.stop().await;
    // Saved at shutdown: the learned shape outlives the process.
    let shape = journal.load_shape("orders").await.unwrap().unwrap();
    assert!(shape.contains("coupon"), "{shape}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_past_their_retention_are_removed_but_records_stay() {
    let h = Harness::start(Behaviour::default().fail_body("reject", Reply::Status { status: 422, body: "no".into() }))
        .await;
    let secret = SigningSecret::parse(Scheme::StandardWebhooks, SW_SECRET).unwrap();
    let mut ids = Vec::new();
    for (id, body) in [("r1", r#"{"id":"a"}"#), ("r2", r#"{"id":"b","status":"reject"}"#)] {
        let headers = sign(Scheme::StandardWebhooks, &secret, id, SystemClock.now(), body.as_bytes());
        let (_, json) = h.post("/hooks/shortlived", &headers, body.as_bytes()).await;
        ids.push(json["record_id"].as_i64().unwrap());
    }
    h.wait_for("shortlived", "both settled", |c| c.delivered == 1 && c.dead == 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = h.journal.record(ids[0]).await.unwrap().unwrap();
        if d.payload_purged_at.is_some() {
            assert!(d.payload.is_empty());
            assert_eq!(d.attempts.len(), 1, "the record and its attempts stay");
            break;
        }
        assert!(Instant::now() < deadline, "retention never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = h.journal.record(ids[1]).await.unwrap().unwrap();
    assert_eq!(dead.payload, br#"{"id":"b","status":"reject"}"#, "a dead record keeps its payload for a replay");
    h.stop().await;
}

fn shop_order(event: &str, number: &str, total: &str) -> String {
    format!(
        r#"{{"event_id":"{event}","order":{{"number":"{number}","placed":"23/11/2026 09:30","total":"{total}","currency":"eur","gift":"N"}},"customer":{{"name":"  jean-luc   PICARD ","phone":"06 12 34 56 78"}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_mapped_through_the_model_and_the_partner_gets_the_mapped_body() {
    let h = Harness::start(Behaviour::default()).await;
    let raw = shop_order("evt_1", "SO-1", "149.90");
    let (status, json) = h.post("/hooks/shop", &[], raw.as_bytes()).await;
    assert_eq!((status, json["status"].as_str()), (202, Some("accepted")), "{json}");
    h.wait_for("shop", "delivery", |c| c.delivered == 1).await;

    let effects = h.partner.effects();
    let sent: serde_json::Value = serde_json::from_slice(&effects[0].body).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({"id": "SO-1", "total": "149.90", "at": "2026-11-23T08:30:00Z", "phone": "+33612345678", "gift": false})
    );
    let req = &h.partner.requests()[0];
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("idempotency-key").unwrap(), dovetail_core::ids::idempotency_key("shop", Some("evt_1")));

    let id = json["record_id"].as_i64().unwrap();
    let d = h.journal.record(id).await.unwrap().unwrap();
    assert_eq!(d.payload, raw.as_bytes(), "the raw capture is kept byte for byte, apart from the mapped body");
    assert_eq!(d.mapped.as_deref(), Some(effects[0].body.as_ref()), "what was sent is what was stored");
    assert_eq!((d.mapping_version, d.sink_mapping_version, d.prepared), (Some(1), Some(4), true));
    assert_eq!(d.external_key.as_deref(), Some("SO-1"));
    let story: Vec<String> = dovetail_engine::views::story(&d).into_iter().map(|s| s.event).collect();
    assert_eq!(story[1], "validated and mapped by mapping v1, sink mapping v4");
    assert!(story[2].starts_with("attempt 1: HTTP 200 in ") && story[2].ends_with(" ms, delivered"), "{story:?}");
    assert_eq!(story.last().map(String::as_str), Some("delivered"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_delivery_id_the_idempotency_key_expression_de_duplicates() {
    let h = Harness::start(Behaviour::default()).await;
    let (s1, j1) = h.post("/hooks/shop", &[], shop_order("evt_7", "SO-7", "10.00").as_bytes()).await;
    // The shop retries the same event (a field it fills late has changed).
    let (s2, j2) =
        h.post("/hooks/shop", &[], shop_order("evt_7", "SO-7", "10.00").replace("  jean", "jean").as_bytes()).await;
    let (s3, _) = h.post("/hooks/shop", &[], shop_order("evt_8", "SO-7", "10.00").as_bytes()).await;
    assert_eq!((s1, s2, s3), (202, 200, 202), "{j1} {j2}");
    assert_eq!(j2["status"], "duplicate");
    assert_eq!(j1["record_id"], j2["record_id"]);
    h.wait_for("shop", "both events", |c| c.delivered == 2).await;
    assert_eq!(h.partner.stats().effects, 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_error_quarantines_the_record_and_a_replay_after_the_fix_delivers_it() {
    let mut h = Harness::start(Behaviour::default()).await;
    // 3 decimals: v1 refuses to round.
    let (status, json) = h.post("/hooks/shop", &[], shop_order("evt_2", "SO-2", "19.999").as_bytes()).await;
    assert_eq!((status, json["status"].as_str(), json["stage"].as_str()), (202, Some("quarantined"), Some("mapping")));
    assert!(json["reason"].as_str().unwrap().starts_with("mapping v1 failed: jq error:"), "{json}");
    // A mapping whose output breaks the model is refused at the model.
    let (_, json) = h.post("/hooks/shop", &[], shop_order("evt_3", "SO-3", "0.00").as_bytes()).await;
    assert_eq!(json["stage"], "model", "{json}");
    assert!(json["reason"].as_str().unwrap().contains("/amount_minor"), "{json}");
    let c = h.wait_for("shop", "both quarantined", |c| c.dead == 2).await;
    assert_eq!(c.delivered, 0);
    assert_eq!(h.partner.stats().requests, 0, "nothing half-mapped reaches the partner");
    let dead = h.journal.dead_letters(Some("shop"), 10).await.unwrap();
    assert!(dead.iter().all(|d| d.class == ErrorClass::Validation));
    let id = json["record_id"].as_i64().unwrap();
    assert_eq!(h.journal.record(id).await.unwrap().unwrap().mapped, None, "a refused record has no mapped body");

    // The operator fixes the mapping (v2 rounds half-up to cents) and replays.
    let fixed = SHOP_TO_ORDER.replace(
        "(.order.currency as $c | .order.total | to_minor_units($c))",
        "(.order.total | tonumber * 100 | round | if . < 1 then 1 else . end)",
    );
    std::fs::write(h._dir.path().join("shop_to_order.jq"), fixed).unwrap();
    h.text = h.text.replace("shop_to_order.jq\", version = 1", "shop_to_order.jq\", version = 2");
    h.restart().await;
    let sel = dovetail_journal::Selector::Flow("shop".into());
    assert_eq!(h.journal.replay(&sel, SystemClock.now(), 10).await.unwrap(), 2);
    h.wait_for("shop", "the replayed records", |c| c.delivered == 2).await;
    let totals: Vec<String> = h
        .partner
        .effects()
        .iter()
        .map(|e| serde_json::from_slice::<serde_json::Value>(&e.body).unwrap()["total"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(totals.iter().filter(|t| *t == "20.00").count(), 1, "{totals:?}");
    let d = h.journal.record(id).await.unwrap().unwrap();
    assert_eq!((d.mapping_version, d.prepared), (Some(2), true), "the record keeps the version that mapped it");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_past_its_time_limit_quarantines_the_record_and_the_engine_goes_on() {
    let mut h = Harness::start(Behaviour::default()).await;
    // Counting to two million takes jq (debug build) about two seconds: twenty times the limit.
    h.jq_time_limit = Duration::from_millis(100);
    h.restart().await;
    let (status, json) = h.post("/hooks/counting", &[], br#"{"id":"slow","n":2000000}"#).await;
    assert_eq!((status, json["status"].as_str(), json["stage"].as_str()), (202, Some("quarantined"), Some("mapping")));
    assert!(json["reason"].as_str().unwrap().contains("did not finish within 100ms"), "{json}");
    let (status, json) = h.post("/hooks/counting", &[], br#"{"id":"quick","n":3}"#).await;
    assert_eq!((status, json["status"].as_str()), (202, Some("accepted")), "{json}");
    h.wait_for("counting", "the quick record", |c| c.delivered == 1).await;
    let sent: serde_json::Value = serde_json::from_slice(&h.partner.effects()[0].body).unwrap();
    assert_eq!(sent, serde_json::json!({"id": "quick", "count": 3}));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_read_the_levels() {
    let h = Harness::start(Behaviour::default().fail_body("reject", Reply::Status { status: 422, body: "no".into() }))
        .await;
    h.send_order("m1", &order("ord_m1")).await;
    h.send_order("m2", r#"{"id":"ord_m2","status":"reject"}"#).await;
    h.send_order("m3", "not json").await;
    h.send_order("m1", &order("ord_m1")).await;
    h.wait_for("orders", "delivery and dead letters", |c| c.delivered == 1 && c.dead == 2).await;
    let refused = h.http.get(format!("{}/metrics", h.base)).send().await.unwrap();
    assert_eq!(refused.status(), 401, "with an admin token, scrapes need it");
    let resp = h.http.get(format!("{}/metrics", h.base)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    let text = resp.text().await.unwrap();
    for line in [
        r#"dovetail_records_received_total{flow="orders"} 3"#,
        r#"dovetail_duplicate_deliveries_total{flow="orders"} 1"#,
        r#"dovetail_records_quarantined_total{flow="orders",stage="parse"} 1"#,
        r#"dovetail_records_delivered_total{flow="orders",connector="billing"} 1"#,
        r#"dovetail_attempt_failures_total{flow="orders",connector="billing",class="rejected"} 1"#,
        r#"dovetail_records_dead_lettered_total{flow="orders",connector="billing",class="rejected"} 1"#,
        r#"dovetail_attempt_duration_seconds_count{flow="orders",connector="billing"} 2"#,
        r#"dovetail_ingest_duration_seconds_count{flow="orders"} 3"#,
        r#"dovetail_dlq_depth{flow="orders"} 2"#,
        r#"dovetail_records_pending{flow="orders"} 0"#,
        r#"dovetail_flow_paused{flow="orders"} 0"#,
        r#"dovetail_circuit_breaker_state{connector="billing",state="closed"} 1"#,
        r#"dovetail_circuit_breaker_state{connector="billing",state="open"} 0"#,
        "# TYPE dovetail_attempt_duration_seconds histogram",
        "# UNIT dovetail_attempt_duration_seconds seconds",
        "# TYPE dovetail_journal_commits counter",
        "# TYPE dovetail_journal_commit_duration_seconds histogram",
        "# UNIT dovetail_journal_commit_duration_seconds seconds",
        "# EOF",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    // The journal writer's own counters: every record above took commits.
    let value = |name: &str| -> f64 {
        let line = text.lines().find(|l| l.split(' ').next() == Some(name));
        line.and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{name}` in:\n{text}"))
    };
    let commits = value("dovetail_journal_commits_total");
    assert!(commits >= 4.0, "four webhooks were journalled, each answered after a commit: {commits}");
    assert!(value("dovetail_journal_writes_total") >= commits, "each commit carries at least one write");
    let timed = value("dovetail_journal_commit_duration_seconds_count");
    assert!(timed >= 4.0, "{timed}");
    assert_eq!(value(r#"dovetail_journal_commit_duration_seconds_bucket{le="+Inf"}"#), timed);
    assert!(value("dovetail_journal_commit_duration_seconds_sum") > 0.0);
    h.stop().await;
}

impl Harness {
    async fn api(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(serde_json::to_vec(&b).unwrap());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap_or(serde_json::Value::Null))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_reads_and_acts_with_the_token() {
    let h = Harness::start(Behaviour::default()).await;
    let t = Some(ADMIN_TOKEN);
    let (status, json) = h.api("GET", "/api/v1/status", None, None).await;
    assert_eq!(status, 401, "{json}");
    assert!(json["error"].as_str().unwrap().contains("Bearer"));

    let (_, sent) = h.send_order("api_1", "not json").await;
    let id = sent["record_id"].as_i64().unwrap();
    h.wait_for("orders", "the quarantine", |c| c.dead == 1).await;
    let (status, json) = h.api("GET", "/api/v1/status", t, None).await;
    assert_eq!(status, 200);
    let orders = json["flows"].as_array().unwrap().iter().find(|f| f["flow"] == "orders").unwrap().clone();
    assert_eq!((orders["dead"].as_u64(), orders["quarantined"].as_u64()), (Some(1), Some(1)), "{orders}");
    let (_, json) = h.api("GET", "/api/v1/dlq?flow=orders", t, None).await;
    assert_eq!(json["dead_letters"][0]["id"].as_i64(), Some(id));
    let (_, record) = h.api("GET", &format!("/api/v1/records/{id}"), t, None).await;
    assert_eq!(record["payload"], "not json");
    let corr = record["correlation_id"].as_str().unwrap().to_string();
    let (_, json) = h.api("GET", &format!("/api/v1/trace/{corr}"), t, None).await;
    assert_eq!(json["records"][0]["id"].as_i64(), Some(id));
    assert_eq!(h.api("GET", "/api/v1/records/999999", t, None).await.0, 404);

    let which = serde_json::json!({ "ids": [id] });
    assert_eq!(h.api("POST", "/api/v1/dlq/replay", Some("wrong"), Some(which.clone())).await.0, 401);
    let (status, json) =
        h.api("POST", "/api/v1/dlq/replay", t, Some(serde_json::json!({ "ids": [id], "all": true }))).await;
    assert_eq!(status, 400, "ids and all together are ambiguous: {json}");
    let (status, json) = h.api("POST", "/api/v1/dlq/replay", t, Some(which)).await;
    assert_eq!((status, json["replayed"].as_u64()), (200, Some(1)), "{json}");
    h.wait_for("orders", "the replayed record back in the DLQ", |c| c.dead == 1 && c.pending == 0 && c.in_flight == 0)
        .await;
    let (status, json) = h.api("POST", "/api/v1/dlq/discard", t, Some(serde_json::json!({ "flow": "orders" }))).await;
    assert_eq!((status, json["discarded"].as_u64()), (200, Some(1)), "{json}");
    let (status, json) = h.api("POST", "/api/v1/flows/orders/resume", t, None).await;
    assert_eq!((status, json["resumed"].as_bool()), (200, Some(false)), "it was not paused: {json}");
    assert_eq!(h.api("POST", "/api/v1/flows/nope/resume", t, None).await.0, 404);
    h.stop().await;
}

impl Harness {
    /// A partner that refuses the token (so the flow pauses), an idle poll
    /// of an hour and leases of two minutes, longer than any wait here: a
    /// dispatcher with nothing to do acts only when it is woken.
    async fn deaf_to_time() -> Harness {
        let mut h =
            Harness::start(Behaviour::always(Reply::Status { status: 401, body: "token expired".into() })).await;
        h.idle_poll = Duration::from_secs(3600);
        h.text = h.text.replace(r#"timeout = "500ms""#, r#"timeout = "60s""#);
        h.restart().await;
        h
    }
}

/// A dispatcher with nothing due sleeps until its idle poll or the end of the
/// lease it holds; an operator's replay or resume through the API wakes it.
/// Here the poll is an hour and leases run two minutes, longer than the
/// harness' wait, so the records go out only if the API woke the flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_or_a_resume_through_the_api_acts_at_once_not_at_the_next_poll() {
    let h = Harness::deaf_to_time().await;
    let t = Some(ADMIN_TOKEN);
    h.send_order("nudge_1", &order("ord_n1")).await;
    h.wait_for("orders", "the pause", |c| c.paused.is_some() && c.pending == 1).await;
    h.partner.set_behaviour(Behaviour::default().require("authorization", "Bearer tok_123"));
    let (status, json) = h.api("POST", "/api/v1/flows/orders/resume", t, None).await;
    assert_eq!((status, json["resumed"].as_bool()), (200, Some(true)), "{json}");
    h.wait_for("orders", "delivery after the resume", |c| c.delivered == 1).await;

    h.partner.set_behaviour(Behaviour::always(Reply::Status { status: 422, body: "unknown currency".into() }));
    h.send_order("nudge_2", &order("ord_n2")).await;
    h.wait_for("orders", "the dead letter", |c| c.dead == 1).await;
    h.partner.set_behaviour(Behaviour::default().require("authorization", "Bearer tok_123"));
    for (i, which) in
        [serde_json::json!({ "flow": "orders" }), serde_json::json!({ "all": true })].into_iter().enumerate()
    {
        let (status, json) = h.api("POST", "/api/v1/dlq/replay", t, Some(which)).await;
        assert_eq!((status, json["replayed"].as_u64()), (200, Some(1)), "{json}");
        h.wait_for("orders", "delivery after the replay", |c| c.delivered == 2 + i as u64).await;
        if i == 0 {
            // Dead again, to be replayed by the other selector.
            h.partner.set_behaviour(Behaviour::always(Reply::Status { status: 422, body: "again".into() }));
            h.send_order("nudge_3", &order("ord_n3")).await;
            h.wait_for("orders", "the second dead letter", |c| c.dead == 1).await;
            h.partner.set_behaviour(Behaviour::default().require("authorization", "Bearer tok_123"));
        }
    }
    assert!(h.partner.double_effects().is_empty());
    h.stop().await;
}

/// The CLI changes the journal from its own process, where the engine
/// cannot be told; the engine notices the other connection's commit and
/// wakes its flows. As above, the idle poll is an hour and leases run two
/// minutes, so only that wakes them within the harness' wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_or_a_resume_from_another_process_is_noticed_without_the_idle_poll() {
    let h = Harness::deaf_to_time().await;
    // What `dovetail resume` and `dovetail dlq replay` open: the same file, another connection.
    let cli = SqliteJournal::open(&h._dir.path().join("journal.db"), SqliteOptions::default()).unwrap();
    h.send_order("elsewhere_1", &order("ord_e1")).await;
    h.wait_for("orders", "the pause", |c| c.paused.is_some() && c.pending == 1).await;
    h.partner.set_behaviour(Behaviour::always(Reply::Status { status: 422, body: "unknown currency".into() }));
    assert!(cli.resume_flow("orders").await.unwrap());
    h.wait_for("orders", "the dead letter after the resume", |c| c.dead == 1).await;
    h.partner.set_behaviour(Behaviour::default().require("authorization", "Bearer tok_123"));
    let replayed = cli.replay(&Selector::Flow("orders".into()), SystemClock.now(), 100).await.unwrap();
    assert_eq!(replayed, 1);
    h.wait_for("orders", "delivery after the replay", |c| c.delivered == 1).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route_the_api_serves() {
    let h = Harness::start(Behaviour::default()).await;
    let (status, doc) = h.api("GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.1.0")));
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 9, "{:?}", paths.keys().collect::<Vec<_>>());
    for (path, item) in paths {
        let concrete = path.replace("{id}", "1").replace("{needle}", "x").replace("{flow}", "orders");
        for method in item.as_object().unwrap().keys().filter(|m| *m == "get" || *m == "post") {
            let body = (method == "post").then(|| serde_json::json!({ "ids": [1] }));
            let (status, json) = h.api(&method.to_uppercase(), &concrete, Some(ADMIN_TOKEN), body).await;
            assert_ne!(json["error"], "no flow receives webhooks on this path", "{method} {path} is not served");
            assert!(status != 405, "{method} {path}: {status}");
        }
    }
    h.stop().await;
}
