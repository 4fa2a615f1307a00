//! Crash safety of the real `dovetail` binary under SIGKILL.
//!
//! A misbehaving partner (503s, 429 with `Retry-After`, connections dropped
//! after the effect was committed, answers slower than the connector's
//! timeout, 422 for some bodies) sits behind an engine that is SIGKILLed
//! twice while webhooks pour in and once more while deliveries are still in
//! flight, and restarted each time on the same journal. The senders behave
//! like Stripe or Svix: they resend the same delivery (same `webhook-id`, same
//! body, freshly signed) until they hear 2xx.
//!
//! What must hold at the end:
//! * every webhook was acknowledged, and journalled exactly once;
//! * every accepted record took effect at the partner exactly once;
//! * every rejected record is in the dead-letter queue, once, with class
//!   `rejected`, and nothing else is there;
//! * a rejected record was never sent again after its 422 was recorded;
//! * every request carried the record's own, unchanging `Idempotency-Key`.
//!
//! Only upper bounds on waiting: a slow machine makes the test slower, never
//! red. Everything runs on 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dovetail_core::clock::{Clock, SystemClock};
use dovetail_core::ids::idempotency_key;
use dovetail_core::signature::{Scheme, SigningSecret, sign};
use dovetail_testkit::partner::{Behaviour, Partner, Reply};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dovetail");
const FLOW: &str = "orders";
const HOOK_PATH: &str = "/hooks/orders";
const SINK_PATH: &str = "/v1/orders";
const ORDERS_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const BILLING_TOKEN: &str = "tok_crash_test";

/// Webhooks sent.
const N: usize = 300;
/// Concurrent senders.
const SENDERS: usize = 8;
/// The engine is SIGKILLed when this many webhooks have been acknowledged.
const KILL_AT_ACKS: [usize; 2] = [N / 3, 2 * N / 3];
/// The last orders are answered slowly (past the connector's timeout) the
/// first time, so that the kill after the last acknowledgement finds them
/// in flight.
const SLOW_LANE: usize = 10;
/// The partner's answer for slow replies; the connector's timeout is 1 s.
const SLOW: Duration = Duration::from_millis(1500);

/// Generous upper bounds, never lower bounds on speed.
const READY_WITHIN: Duration = Duration::from_secs(30);
const SENDING_WITHIN: Duration = Duration::from_secs(180);
const SETTLED_WITHIN: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// The orders.

fn order_id(i: usize) -> String {
    format!("ord_{i:04}")
}

fn webhook_id(i: usize) -> String {
    format!("msg_crash_{i:04}")
}

/// Every tenth order is one the partner refuses with 422.
fn is_reject(i: usize) -> bool {
    i.is_multiple_of(10)
}

fn is_slow_lane(i: usize) -> bool {
    i >= N - SLOW_LANE && !is_reject(i)
}

fn body(i: usize) -> String {
    let status = if is_reject(i) { "reject" } else { "paid" };
    let lane = if is_slow_lane(i) { r#","lane":"slow""# } else { "" };
    format!(
        r#"{{"id":"{}","customer":{{"id":"cus_{}"}},"currency":"EUR","amount":"{}.{:02}","status":"{status}"{lane}}}"#,
        order_id(i),
        i % 37,
        10 + i,
        i % 100
    )
}

/// The order id of a body the partner received (`None` if it is not one of ours).
fn order_of(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(body).ok()?.get("id")?.as_str().map(str::to_string)
}

// ---------------------------------------------------------------------------
// The partner.

/// Deterministic faults for the first requests, then a well-behaved partner.
/// Bodies with `"status":"reject"` always get 422; the slow lane's first
/// request commits its effect and answers only after `SLOW`.
fn behaviour() -> Behaviour {
    let script: Vec<Reply> = (0..400)
        .map(|k| match k % 20 {
            3 | 13 => Reply::Status { status: 503, body: r#"{"error":"maintenance"}"#.into() },
            5 => Reply::DropAfterCommit,
            9 => Reply::SlowAfterCommit(SLOW),
            11 => Reply::RetryAfter { status: 429, value: "1".into() },
            16 => Reply::DropBeforeCommit,
            _ => Reply::Ok,
        })
        .collect();
    Behaviour { enforce_idempotency: true, ..Behaviour::script(script, Reply::Ok) }
        .fail_body(
            r#""status":"reject""#,
            Reply::Status { status: 422, body: r#"{"error":"order refused by billing"}"#.into() },
        )
        .fail_body(r#""lane":"slow""#, Reply::SlowAfterCommit(SLOW))
        .require("authorization", &format!("Bearer {BILLING_TOKEN}"))
}

// ---------------------------------------------------------------------------
// The engine process.

fn config_text(port: u16, partner_url: &str) -> String {
    format!(
        r#"
[engine]
store  = "sqlite://journal.db"
listen = "127.0.0.1:{port}"

[connectors.billing]
type     = "http"
base_url = "{partner_url}"
auth     = {{ type = "bearer", token = "env:BILLING_TOKEN" }}
timeout  = "1s"
retry    = {{ max_attempts = 20, initial_backoff = "50ms", max_backoff = "500ms", jitter = 0.5 }}
# The partner here fails on purpose; a short open time keeps the breaker
# (which holds records, never loses them) from stretching the test.
breaker  = {{ open_for = "300ms", max_open_for = "1s" }}

[flows.{FLOW}]
source = {{ type = "webhook", path = "{HOOK_PATH}", signature = {{ scheme = "standard-webhooks", secret = "env:ORDERS_SECRET" }} }}
sink   = {{ type = "http", connector = "billing", method = "POST", path = "{SINK_PATH}" }}
"#
    )
}

/// The `dovetail run` child; SIGKILLed when dropped, also on panic.
struct Engine {
    config: PathBuf,
    log: PathBuf,
    base: String,
    child: Option<Child>,
    starts: u32,
}

impl Engine {
    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = OpenOptions::new().create(true).append(true).open(&self.log).expect("open the engine log");
        writeln!(log, "===== test: engine start #{} =====", self.starts).expect("write the engine log");
        let child = Command::new(BIN)
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .env_remove("DOVETAIL_CONFIG")
            .env("DOVETAIL_LOG", "info")
            .env("ORDERS_SECRET", ORDERS_SECRET)
            .env("BILLING_TOKEN", BILLING_TOKEN)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn `dovetail run`");
        self.child = Some(child);
    }

    /// Starts the engine and waits (bounded) until `/readyz` answers 200. A
    /// child that exits early (e.g. the port is not yet free again) is
    /// started again.
    async fn start(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + READY_WITHIN;
        self.spawn();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("poll the engine")) {
                assert!(
                    Instant::now() < deadline,
                    "the engine keeps exiting ({status}) instead of becoming ready\n{}",
                    log_tail(&self.log, 40)
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
                self.spawn();
                continue;
            }
            let ready = http
                .get(format!("{}/readyz", self.base))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the engine was not ready within {READY_WITHIN:?}\n{}",
                log_tail(&self.log, 40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    format!("--- last {lines} lines of {} ---\n{tail}\n---", path.display())
}

/// Runs a read command of the CLI (`status --json`, `dlq ...`) and parses its JSON.
fn cli_json(config: &Path, args: &[String]) -> Value {
    let out = Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(config)
        .env_remove("DOVETAIL_CONFIG")
        .env("DOVETAIL_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run the dovetail CLI");
    assert!(
        out.status.success(),
        "`dovetail {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("`dovetail {}` printed no JSON ({e}):\n{}", args.join(" "), String::from_utf8_lossy(&out.stdout))
    })
}

async fn cli(config: &Path, args: &[&str]) -> Value {
    let config = config.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || cli_json(&config, &args)).await.expect("the CLI task panicked")
}

/// Per-flow counts of `dovetail status --json` for our flow.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    pending: u64,
    in_flight: u64,
    delivered: u64,
    dead: u64,
    discarded: u64,
    paused: bool,
}

async fn counts(config: &Path) -> Counts {
    let v = cli(config, &["status", "--json"]).await;
    let flow = v["flows"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["flow"] == FLOW))
        .unwrap_or_else(|| panic!("`dovetail status --json` has no flow `{FLOW}`: {v}"));
    let n = |k: &str| flow[k].as_u64().unwrap_or_else(|| panic!("status field {k} missing: {flow}"));
    Counts {
        pending: n("pending"),
        in_flight: n("in_flight"),
        delivered: n("delivered"),
        dead: n("dead"),
        discarded: n("discarded"),
        paused: flow["state"] != "running",
    }
}

// ---------------------------------------------------------------------------
// The webhook senders.

#[derive(Default)]
struct Sent {
    /// Order index → journal record id from the 2xx answer.
    acked: BTreeMap<usize, i64>,
    /// Acknowledged as `duplicate` (the first answer was lost to a kill).
    duplicates: usize,
    /// Resends after a connection error.
    connection_errors: usize,
    /// Non-2xx answers by status.
    refused: BTreeMap<u16, usize>,
}

/// Delivers order `i` like a well-behaved webhook sender: the same id and
/// body, freshly signed, again and again until a 2xx (or the deadline).
async fn deliver(
    http: &reqwest::Client,
    url: &str,
    secret: &SigningSecret,
    i: usize,
    deadline: Instant,
    sent: &Mutex<Sent>,
) -> Option<(i64, bool)> {
    let (id, body) = (webhook_id(i), body(i));
    while Instant::now() < deadline {
        let mut request = http
            .post(url)
            .timeout(Duration::from_secs(10))
            .header("content-type", "application/json")
            .body(body.clone());
        for (name, value) in sign(Scheme::StandardWebhooks, secret, &id, SystemClock.now(), body.as_bytes()) {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                let status = response.status().as_u16();
                let bytes = response.bytes().await;
                let answer = bytes.ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok());
                // An answer cut short by a kill is resent like any failure.
                if let Some(record_id) = answer.as_ref().and_then(|a| a["record_id"].as_i64()) {
                    let duplicate = answer.as_ref().is_some_and(|a| a["status"] == "duplicate");
                    assert!(
                        (status == 202 && !duplicate) || (status == 200 && duplicate),
                        "unexpected intake answer {status} {answer:?} for {id}"
                    );
                    return Some((record_id, duplicate));
                }
                sent.lock().unwrap().connection_errors += 1;
            }
            Ok(response) => {
                *sent.lock().unwrap().refused.entry(response.status().as_u16()).or_default() += 1;
            }
            Err(_) => sent.lock().unwrap().connection_errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(50 + spread_ms(i))).await;
    }
    None
}

/// A small deterministic spread so that senders do not retry in lockstep.
fn spread_ms(i: usize) -> u64 {
    (i as u64 * 7919) % 50
}

// ---------------------------------------------------------------------------
// The test.

struct Kill {
    what: String,
    acks: usize,
    effects: u64,
    /// Left behind by the dead engine, as `dovetail status` saw it.
    orphaned_in_flight: u64,
    pending: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_receiving_and_delivering_loses_nothing_and_applies_nothing_twice() {
    let t0 = Instant::now();
    dovetail_connectors::http::install_crypto_provider();
    let partner = Partner::start(behaviour()).await.expect("start the partner");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("dovetail.toml");
    let port = dovetail_testkit::free_port();
    std::fs::write(&config, config_text(port, &partner.url())).expect("write the config");
    let mut engine = Engine {
        config: config.clone(),
        log: dir.path().join("engine.log"),
        base: format!("http://127.0.0.1:{port}"),
        child: None,
        starts: 0,
    };
    // On a failure, keep the journal and the engine's log for a post-mortem.
    let keep = KeepOnPanic { dir: Some(dir), log: engine.log.clone() };

    let http = reqwest::Client::builder().build().expect("reqwest client");
    engine.start(&http).await;

    // ----- send, killing the engine twice along the way -----
    let secret = Arc::new(SigningSecret::parse(Scheme::StandardWebhooks, ORDERS_SECRET).expect("secret"));
    let url = Arc::new(format!("{}{HOOK_PATH}", engine.base));
    let next = Arc::new(AtomicUsize::new(0));
    let acks = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(Mutex::new(Sent::default()));
    let send_deadline = Instant::now() + SENDING_WITHIN;
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..SENDERS {
        let (http, secret, url, next, acks, sent) =
            (http.clone(), secret.clone(), url.clone(), next.clone(), acks.clone(), sent.clone());
        senders.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= N {
                    return;
                }
                if let Some((record_id, duplicate)) = deliver(&http, &url, &secret, i, send_deadline, &sent).await {
                    let mut s = sent.lock().unwrap();
                    s.acked.insert(i, record_id);
                    s.duplicates += usize::from(duplicate);
                    acks.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }

    let mut kills = Vec::new();
    for threshold in KILL_AT_ACKS {
        while acks.load(Ordering::SeqCst) < threshold && !senders.is_empty() && Instant::now() < send_deadline {
            if let Some(joined) = senders.try_join_next() {
                joined.expect("a sender panicked");
                continue;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let at = acks.load(Ordering::SeqCst);
        engine.kill();
        let effects = partner.stats().effects;
        let c = counts(&config).await;
        kills.push(Kill {
            what: format!("while receiving (threshold {threshold})"),
            acks: at,
            effects,
            orphaned_in_flight: c.in_flight,
            pending: c.pending,
        });
        engine.start(&http).await;
    }
    while let Some(joined) = senders.join_next().await {
        joined.expect("a sender panicked");
    }

    // ----- kill once more: everything acknowledged, deliveries still under way -----
    engine.kill();
    let c = counts(&config).await;
    kills.push(Kill {
        what: "after the last acknowledgement".into(),
        acks: acks.load(Ordering::SeqCst),
        effects: partner.stats().effects,
        orphaned_in_flight: c.in_flight,
        pending: c.pending,
    });
    engine.start(&http).await;
    let sending_done = t0.elapsed();

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let good: BTreeSet<String> = sent.acked.keys().filter(|&&i| !is_reject(i)).map(|&i| order_id(i)).collect();

    // ----- wait (bounded) until the journal has settled and every good order took effect -----
    let settle_deadline = Instant::now() + SETTLED_WITHIN;
    let mut last_status_at = Instant::now() - Duration::from_secs(10);
    let mut settled = None;
    let mut last_counts = Counts::default();
    while Instant::now() < settle_deadline {
        let effects = partner.effects_by_record();
        let all_applied = good.iter().all(|id| effects.contains_key(id));
        if all_applied || last_status_at.elapsed() >= Duration::from_secs(2) {
            last_status_at = Instant::now();
            last_counts = counts(&config).await;
            if all_applied && last_counts.pending == 0 && last_counts.in_flight == 0 {
                settled = Some(t0.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // ----- gather the evidence -----
    let stats = partner.stats();
    let effects = partner.effects_by_record();
    let doubles = partner.double_effects();
    let requests = partner.requests();
    let dlq = cli(&config, &["dlq", "list", "--json", "--limit", "100000"]).await;
    let dead_letters = dlq["dead_letters"].as_array().cloned().unwrap_or_default();
    let details = record_details(&config, sent.acked.values().copied().collect()).await;
    let final_counts = counts(&config).await;
    engine.kill();

    let mut failures: Vec<String> = Vec::new();
    let mut fail = |msg: String| failures.push(msg);

    // Every webhook acknowledged, each journalled once.
    let unacked: Vec<String> = (0..N).filter(|i| !sent.acked.contains_key(i)).map(order_id).collect();
    if !unacked.is_empty() {
        fail(format!(
            "{} of {N} webhooks were never acknowledged within {SENDING_WITHIN:?}: {unacked:?}",
            unacked.len()
        ));
    }
    let distinct_records: BTreeSet<i64> = sent.acked.values().copied().collect();
    if distinct_records.len() != sent.acked.len() {
        fail(format!(
            "{} acknowledged orders map to only {} record ids: {:?}",
            sent.acked.len(),
            distinct_records.len(),
            sent.acked
        ));
    }
    if !sent.refused.is_empty() {
        fail(format!("the intake refused correctly signed webhooks (status → count): {:?}", sent.refused));
    }
    if settled.is_none() {
        let missing: Vec<&String> = good.iter().filter(|id| !effects.contains_key(*id)).collect();
        fail(format!(
            "not settled within {SETTLED_WITHIN:?}: status {last_counts:?}; good orders without an effect: {missing:?}"
        ));
    }
    let total = final_counts.pending
        + final_counts.in_flight
        + final_counts.delivered
        + final_counts.dead
        + final_counts.discarded;
    if total != N as u64 {
        fail(format!("the journal holds {total} records for {N} distinct webhooks: {final_counts:?}"));
    }
    if final_counts.paused {
        fail(format!("the flow ended up paused: {final_counts:?}"));
    }

    // Exactly one effect per good order, none for rejected ones.
    if !doubles.is_empty() {
        fail(format!("DOUBLE EFFECTS at the partner (order → effects): {doubles:?}"));
    }
    let no_effect: Vec<&String> = good.iter().filter(|id| !effects.contains_key(*id)).collect();
    if !no_effect.is_empty() {
        fail(format!("LOST: {} acknowledged orders never took effect: {no_effect:?}", no_effect.len()));
    }
    let rejected_applied: Vec<(&String, &u64)> =
        effects.iter().filter(|(id, _)| (0..N).any(|i| is_reject(i) && order_id(i) == **id)).collect();
    if !rejected_applied.is_empty() {
        fail(format!("orders the partner refuses have effects: {rejected_applied:?}"));
    }

    // Partner requests: each carries the record's own key, always the same one.
    let mut requests_by_order: BTreeMap<String, usize> = BTreeMap::new();
    let mut keys_by_order: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut without_key = 0;
    for r in &requests {
        if r.path != SINK_PATH {
            fail(format!("a request to {} {} (expected {SINK_PATH})", r.method, r.path));
        }
        let Some(order) = order_of(&r.body) else {
            fail(format!("a request whose body names no order: {:?}", String::from_utf8_lossy(&r.body)));
            continue;
        };
        *requests_by_order.entry(order.clone()).or_default() += 1;
        match r.header("idempotency-key") {
            Some(k) => {
                keys_by_order.entry(order).or_default().insert(k.to_string());
            }
            None => without_key += 1,
        }
    }
    if without_key > 0 || stats.missing_key > 0 {
        fail(format!("{without_key} requests reached the partner without Idempotency-Key ({stats:?})"));
    }
    for i in 0..N {
        let expected = idempotency_key(FLOW, Some(&webhook_id(i)));
        if let Some(keys) = keys_by_order.get(&order_id(i))
            && (keys.len() != 1 || !keys.contains(&expected))
        {
            fail(format!("{}: Idempotency-Keys {keys:?}, expected only {expected}", order_id(i)));
        }
    }

    // The journal's view of every record.
    let mut interrupted_attempts = 0;
    let mut retried_after_crash = Vec::new();
    for (&i, record_id) in &sent.acked {
        let Some(d) = details.get(record_id) else {
            fail(format!("{}: record {record_id} missing from `dovetail dlq show`", order_id(i)));
            continue;
        };
        let order = order_id(i);
        if d["payload"]["id"] != order.as_str() {
            fail(format!("record {record_id} was acknowledged for {order} but holds {}", d["payload"]));
        }
        if d["idempotency_key"] != idempotency_key(FLOW, Some(&webhook_id(i))).as_str() {
            fail(format!("{order}: journal key {} is not derived from its webhook-id", d["idempotency_key"]));
        }
        let attempts = d["attempts"].as_array().cloned().unwrap_or_default();
        let interrupted = attempts.iter().filter(|a| a["class"] == "interrupted").count();
        interrupted_attempts += interrupted;
        let want_state = if is_reject(i) { "dead" } else { "delivered" };
        if d["state"] != want_state {
            fail(format!(
                "{order} (record {record_id}) is {} (expected {want_state}); dead: {} {}; effects at the partner: {}; attempts: {}",
                d["state"],
                d["dead_class"],
                d["dead_reason"],
                effects.get(&order).copied().unwrap_or(0),
                attempts_line(&attempts)
            ));
        }
        if is_reject(i) {
            // The 422 is recorded once, as the last attempt; anything before it
            // can only be an attempt a kill interrupted.
            let n = requests_by_order.get(&order).copied().unwrap_or(0);
            let last_is_422 = attempts.last().is_some_and(|a| a["status"] == 422 && a["class"] == "rejected");
            let earlier_interrupted =
                attempts[..attempts.len().saturating_sub(1)].iter().all(|a| a["class"] == "interrupted");
            if !last_is_422 || !earlier_interrupted || n == 0 || n > attempts.len() {
                fail(format!(
                    "{order} (record {record_id}): the partner saw {n} request(s); journal attempts: {}",
                    attempts_line(&attempts)
                ));
            }
            if n > 1 {
                retried_after_crash.push(order);
            }
        }
    }

    // The DLQ: exactly the refused orders, each once, class `rejected`.
    let reject_records: BTreeMap<i64, String> =
        sent.acked.iter().filter(|(i, _)| is_reject(**i)).map(|(&i, &r)| (r, order_id(i))).collect();
    let mut dlq_ids = BTreeMap::new();
    for d in &dead_letters {
        let id = d["id"].as_i64().unwrap_or(-1);
        *dlq_ids.entry(id).or_insert(0) += 1;
        if d["flow"] != FLOW || d["class"] != "rejected" {
            fail(format!("DLQ entry {id} is not a `rejected` dead letter of `{FLOW}`: {d}"));
        }
    }
    for (record_id, order) in &reject_records {
        match dlq_ids.get(record_id) {
            Some(1) => {}
            n => fail(format!("{order} (record {record_id}) appears {} times in the DLQ", n.unwrap_or(&0))),
        }
    }
    let strays: Vec<String> = dlq_ids
        .keys()
        .filter(|id| !reject_records.contains_key(*id))
        .map(|id| {
            let order = details.get(id).and_then(|d| d["payload"]["id"].as_str()).unwrap_or("?");
            format!("record {id} ({order}, {} effect(s) at the partner)", effects.get(order).copied().unwrap_or(0))
        })
        .collect();
    // A record the partner applied must end `delivered`. (A 409 answered while
    // the first request with the same Idempotency-Key is still being processed
    // means "not yet", not "refused": it must not dead-letter the record.)
    if !strays.is_empty() {
        fail(format!(
            "{} accepted orders were dead-lettered although the partner applied them: {}",
            strays.len(),
            strays.join(", ")
        ));
    }

    // ----- summary -----
    println!("crash test summary");
    println!(
        "  webhooks: {} of {N} acknowledged ({} as duplicates of a delivery whose answer a kill lost), {} resends after connection errors, refused: {:?}",
        sent.acked.len(),
        sent.duplicates,
        sent.connection_errors,
        sent.refused
    );
    for k in &kills {
        println!(
            "  SIGKILL {}: {} acks, {} effects so far; left behind {} in flight, {} pending",
            k.what, k.acks, k.effects, k.orphaned_in_flight, k.pending
        );
    }
    println!("  engine starts: {}", engine.starts);
    println!(
        "  partner: {} requests, {} effects, {} idempotent replays, {} conflicts (409), {} non-2xx, {} dropped",
        stats.requests, stats.effects, stats.replays, stats.conflicts, stats.rejected, stats.dropped
    );
    println!(
        "  journal: {} delivered, {} dead, {} pending, {} in flight; {} DLQ entries; {} interrupted attempts; rejected orders re-sent after a crash: {:?}",
        final_counts.delivered,
        final_counts.dead,
        final_counts.pending,
        final_counts.in_flight,
        dead_letters.len(),
        interrupted_attempts,
        retried_after_crash
    );
    println!(
        "  time: all acknowledged and third restart done at {:.1}s, settled at {}, total {:.1}s",
        sending_done.as_secs_f64(),
        settled.map(|d| format!("{:.1}s", d.as_secs_f64())).unwrap_or_else(|| "never".into()),
        t0.elapsed().as_secs_f64()
    );

    assert!(failures.is_empty(), "{} problem(s):\n- {}", failures.len(), failures.join("\n- "));
    drop(keep);
}

fn attempts_line(attempts: &[Value]) -> String {
    let parts: Vec<String> = attempts
        .iter()
        .map(|a| {
            format!(
                "#{} {} {}",
                a["number"],
                a["status"].as_u64().map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                a["class"].as_str().unwrap_or("delivered")
            )
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// `dovetail dlq show ID --json` for every record, a few processes at a time.
async fn record_details(config: &Path, ids: Vec<i64>) -> BTreeMap<i64, Value> {
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in ids.chunks(ids.len().div_ceil(SENDERS).max(1)) {
        let (config, chunk) = (config.to_path_buf(), chunk.to_vec());
        tasks.spawn_blocking(move || {
            chunk
                .into_iter()
                .map(|id| (id, cli_json(&config, &["dlq".into(), "show".into(), id.to_string(), "--json".into()])))
                .collect::<Vec<_>>()
        });
    }
    let mut out = BTreeMap::new();
    while let Some(part) = tasks.join_next().await {
        out.extend(part.expect("a `dlq show` task panicked"));
    }
    out
}

/// Keeps the test's folder (journal, config, engine log) if the test fails,
/// and prints where it is and the end of the engine's log.
struct KeepOnPanic {
    dir: Option<tempfile::TempDir>,
    log: PathBuf,
}

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let path = dir.keep();
            eprintln!("crash test failed; journal, config and engine log kept in {}", path.display());
            eprintln!("{}", log_tail(&self.log, 60));
        }
    }
}
