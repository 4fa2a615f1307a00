//! Tests for the fake partner, driven by a tiny raw-TCP HTTP/1.1 client.
//!
//! Nothing here relies on timing except through generous upper bounds
//! ([`LIMIT`]) that only trip when something hangs.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::*;

/// Upper bound for anything that should happen "soon"; only a hang hits it.
const LIMIT: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut).await.unwrap_or_else(|_| panic!("{what}: no result within {LIMIT:?}"))
}

#[derive(Debug)]
struct TestResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl TestResponse {
    fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("JSON response body")
    }
}

/// One HTTP/1.1 connection.
struct TestClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl TestClient {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = within("connect", TcpStream::connect(addr)).await.expect("connect to partner");
        let (rd, wr) = stream.into_split();
        TestClient { reader: BufReader::new(rd), writer: wr }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        within("write", self.writer.write_all(bytes)).await.expect("write request");
    }

    async fn send(&mut self, path: &str, headers: &[(&str, &str)], body: &str) {
        self.send_raw(&request_bytes(path, headers, body)).await;
    }

    /// The next response, or `None` if the connection was closed (or reset)
    /// before a single byte of it arrived.
    async fn recv(&mut self) -> Option<TestResponse> {
        within("response", self.recv_inner()).await
    }

    async fn recv_inner(&mut self) -> Option<TestResponse> {
        let mut line = String::new();
        match self.reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let mut parts = line.trim_end().splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "status line {line:?}");
        let status = parts.next().unwrap().parse().expect("status code");
        let mut headers = Vec::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).await.expect("header line");
            assert!(n > 0, "EOF inside response head");
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                break;
            }
            let (name, value) = l.split_once(':').expect("header colon");
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let len: usize =
            find_header(&headers, "content-length").expect("Content-Length on every response").parse().unwrap();
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).await.expect("body");
        Some(TestResponse { status, headers, body: String::from_utf8(body).expect("UTF-8 body") })
    }

    async fn call(&mut self, headers: &[(&str, &str)], body: &str) -> Option<TestResponse> {
        self.send("/records", headers, body).await;
        self.recv().await
    }

    /// True once the server has closed the connection (EOF or reset).
    async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(within("close", self.reader.read(&mut byte)).await, Ok(0) | Err(_))
    }
}

fn request_bytes(path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("POST {path} HTTP/1.1\r\nHost: partner.test\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

/// POST on a fresh connection, with an `Idempotency-Key` if given.
async fn post(p: &Partner, key: Option<&str>, body: &str) -> Option<TestResponse> {
    let mut client = TestClient::connect(p.addr()).await;
    match key {
        Some(key) => client.call(&[("Idempotency-Key", key)], body).await,
        None => client.call(&[], body).await,
    }
}

async fn start(b: Behaviour) -> Partner {
    Partner::start(b).await.expect("start partner")
}

fn status(status: u16, body: &str) -> Reply {
    Reply::Status { status, body: body.to_owned() }
}

#[tokio::test]
async fn ok_commits_one_effect() {
    let p = start(Behaviour::default()).await;
    assert!(p.url().starts_with("http://127.0.0.1:"));
    assert_eq!(p.url(), format!("http://127.0.0.1:{}", p.addr().port()));

    let r = post(&p, Some("k1"), r#"{"id":"r1","amount":5}"#).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, r#"{"ok":true,"effect":1}"#);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("idempotent-replayed"), None);

    let effects = p.effects();
    assert_eq!(effects.len(), 1);
    let e = &effects[0];
    assert_eq!(e.seq, 1);
    assert_eq!(e.idempotency_key.as_deref(), Some("k1"));
    assert_eq!(e.record_id.as_deref(), Some("r1"));
    assert_eq!(e.path, "/records");
    assert_eq!(&e.body[..], br#"{"id":"r1","amount":5}"#);
    assert_eq!(p.stats(), Stats { requests: 1, effects: 1, ..Stats::default() });
    p.shutdown().await;
}

#[tokio::test]
async fn same_key_is_replayed_without_new_effect() {
    let p = start(Behaviour::default()).await;
    let first = post(&p, Some("k1"), r#"{"id":"r1"}"#).await.unwrap();
    // The replay happens even on another connection and with another body.
    let again = post(&p, Some("k1"), r#"{"id":"r1","retry":true}"#).await.unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(p.effects().len(), 1);
    let stats = p.stats();
    assert_eq!((stats.requests, stats.effects, stats.replays), (2, 1, 1));
    assert!(p.double_effects().is_empty());
}

#[tokio::test]
async fn conflict_while_slow_commit_is_in_progress() {
    // The first request commits and then "hangs" far longer than the test.
    let p = start(Behaviour::script(vec![Reply::SlowAfterCommit(Duration::from_secs(3600))], Reply::Ok)).await;
    let mut slow = TestClient::connect(p.addr()).await;
    slow.send("/records", &[("Idempotency-Key", "k1")], r#"{"id":"r1"}"#).await;
    p.wait_until(LIMIT, |s| s.effects == 1).await.expect("slow request committed");

    let r = post(&p, Some("k1"), r#"{"id":"r1"}"#).await.unwrap();
    assert_eq!(r.status, 409);
    assert!(r.json()["error"].is_string());
    // Other keys are unaffected (and the script is exhausted: default Ok).
    let other = post(&p, Some("k2"), r#"{"id":"r2"}"#).await.unwrap();
    assert_eq!(other.status, 200);
    assert_eq!(other.json()["effect"], 2);

    let stats = p.stats();
    assert_eq!(stats.conflicts, 1);
    assert_eq!(stats.rejected, 1);
    assert_eq!(stats.effects, 2);
    // Shutdown does not wait for the hour-long reply.
    within("shutdown", p.shutdown()).await;
    assert!(slow.closed().await);
}

#[tokio::test]
async fn slow_commit_answers_late_then_replays() {
    let delay = Duration::from_millis(50);
    let p = start(Behaviour::always(Reply::SlowAfterCommit(delay))).await;
    let started = Instant::now();
    let r = post(&p, Some("k1"), r#"{"id":"r1"}"#).await.unwrap();
    assert!(started.elapsed() >= delay);
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"ok":true,"effect":1}"#));

    let again = post(&p, Some("k1"), r#"{"id":"r1"}"#).await.unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(again.body, r.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(p.stats().effects, 1);
}

#[tokio::test]
async fn missing_key_is_400_when_enforced_and_fine_when_not() {
    let p = start(Behaviour::default()).await;
    let r = post(&p, None, r#"{"id":"r1"}"#).await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.body, r#"{"error":"Idempotency-Key header required"}"#);
    let stats = p.stats();
    assert_eq!((stats.missing_key, stats.rejected, stats.effects), (1, 1, 0));

    p.set_behaviour(Behaviour { enforce_idempotency: false, ..Behaviour::default() });
    let r = post(&p, None, r#"{"id":"r1"}"#).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(p.effects()[0].idempotency_key, None);
}

#[tokio::test]
async fn drop_after_commit_closes_silently_and_retry_is_replayed() {
    let p = start(Behaviour::script(vec![Reply::DropAfterCommit], Reply::Ok)).await;
    let mut client = TestClient::connect(p.addr()).await;
    let r = client.call(&[("Idempotency-Key", "k1")], r#"{"id":"r1"}"#).await;
    assert!(r.is_none(), "expected no response bytes, got {r:?}");
    assert_eq!(p.effects().len(), 1);
    let stats = p.stats();
    assert_eq!((stats.dropped, stats.effects, stats.rejected), (1, 1, 0));

    // The client cannot know; its retry with the same key must not apply twice.
    let retry = post(&p, Some("k1"), r#"{"id":"r1"}"#).await.unwrap();
    assert_eq!(retry.status, 200);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.json()["effect"], 1);
    assert_eq!(p.effects().len(), 1);
    assert!(p.double_effects().is_empty());
}

#[tokio::test]
async fn drop_before_commit_has_no_effect_and_retry_applies() {
    let p = start(Behaviour::script(vec![Reply::DropBeforeCommit], Reply::Ok)).await;
    assert!(post(&p, Some("k1"), r#"{"id":"r1"}"#).await.is_none());
    assert_eq!(p.stats().effects, 0);
    assert_eq!(p.stats().dropped, 1);

    let retry = post(&p, Some("k1"), r#"{"id":"r1"}"#).await.unwrap();
    assert_eq!(retry.status, 200);
    assert_eq!(retry.header("idempotent-replayed"), None);
    assert_eq!(p.effects_by_record(), BTreeMap::from([("r1".to_owned(), 1)]));
}

#[tokio::test]
async fn script_in_order_then_default() {
    let p = start(Behaviour::script(
        vec![status(503, r#"{"error":"down"}"#), Reply::RetryAfter { status: 429, value: "7".into() }, Reply::Ok],
        status(422, r#"{"error":"invalid"}"#),
    ))
    .await;
    // A client retrying one record with one key, then sending two more.
    let mut client = TestClient::connect(p.addr()).await;
    let mut call = async |key: &str| client.call(&[("Idempotency-Key", key)], r#"{"id":"r1"}"#).await.unwrap();
    let r = call("k1").await;
    assert_eq!((r.status, r.body.as_str()), (503, r#"{"error":"down"}"#));
    let r = call("k1").await;
    assert_eq!((r.status, r.header("retry-after")), (429, Some("7")));
    let r = call("k1").await;
    assert_eq!((r.status, r.json()["effect"].as_u64()), (200, Some(1)));
    let r = call("k2").await;
    assert_eq!((r.status, r.body.as_str()), (422, r#"{"error":"invalid"}"#));
    let r = call("k3").await;
    assert_eq!(r.status, 422);

    let stats = p.stats();
    assert_eq!((stats.requests, stats.effects, stats.rejected), (5, 1, 4));
    // The three requests after "Retry-After: 7" all came too early.
    assert_eq!((stats.retry_after_violations, stats.rate_limited), (3, 0));
}

#[tokio::test]
async fn retry_after_value_is_verbatim() {
    let date = "Wed, 21 Oct 2015 07:28:00 GMT";
    let p = start(Behaviour::always(Reply::RetryAfter { status: 503, value: date.into() })).await;
    let r = post(&p, Some("k1"), "{}").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some(date));
    assert_eq!(p.stats().effects, 0);
}

#[tokio::test]
async fn by_body_overrides_without_consuming_the_script() {
    let b = Behaviour::script(vec![status(503, "{}")], Reply::Ok)
        .fail_body("poison", status(422, r#"{"error":"bad record"}"#));
    let p = start(b).await;
    let r = post(&p, Some("a"), r#"{"id":"poison"}"#).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (422, r#"{"error":"bad record"}"#));
    assert_eq!(post(&p, Some("b"), r#"{"id":"r2"}"#).await.unwrap().status, 503);
    assert_eq!(post(&p, Some("b"), r#"{"id":"r2"}"#).await.unwrap().status, 200);
    // Always fails, however often it is retried.
    assert_eq!(post(&p, Some("a"), r#"{"id":"poison"}"#).await.unwrap().status, 422);
    assert_eq!(p.effects_by_record(), BTreeMap::from([("r2".to_owned(), 1)]));
}

#[tokio::test]
async fn required_headers_give_401_or_400() {
    let b = Behaviour::default().require("Authorization", "Bearer s3cret").require("X-Tenant", "acme");
    let p = start(b).await;
    let mut c = TestClient::connect(p.addr()).await;

    let r = c.call(&[("Idempotency-Key", "k1")], "{}").await.unwrap();
    assert_eq!(r.status, 401);
    let wrong = [("Idempotency-Key", "k1"), ("Authorization", "Bearer nope")];
    assert_eq!(c.call(&wrong, "{}").await.unwrap().status, 401);
    let no_tenant = [("Idempotency-Key", "k1"), ("authorization", "Bearer s3cret")];
    let r = c.call(&no_tenant, "{}").await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "missing or invalid header x-tenant");
    let good = [("Idempotency-Key", "k1"), ("AUTHORIZATION", "Bearer s3cret"), ("x-TENANT", "acme")];
    assert_eq!(c.call(&good, "{}").await.unwrap().status, 200);

    let stats = p.stats();
    assert_eq!((stats.requests, stats.rejected, stats.effects), (4, 3, 1));
}

#[tokio::test]
async fn keep_alive_serves_several_requests_and_honours_close() {
    let p = start(Behaviour::default()).await;
    let mut c = TestClient::connect(p.addr()).await;
    let a = c.call(&[("Idempotency-Key", "a")], r#"{"id":1}"#).await.unwrap();
    let b = c.call(&[("Idempotency-Key", "b")], r#"{"id":2}"#).await.unwrap();
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(a.header("connection"), None);
    assert_eq!(b.json()["effect"], 2);

    let last = c.call(&[("Idempotency-Key", "c"), ("Connection", "close")], "{}").await.unwrap();
    assert_eq!(last.status, 200);
    assert_eq!(last.header("connection"), Some("close"));
    assert!(c.closed().await);
    assert_eq!(p.stats().effects, 3);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let p = start(Behaviour::default()).await;
    let mut c = TestClient::connect(p.addr()).await;
    let mut both = request_bytes("/one", &[("Idempotency-Key", "a")], "{}");
    both.extend(request_bytes("/two", &[("Idempotency-Key", "b")], "{}"));
    c.send_raw(&both).await;
    assert_eq!(c.recv().await.unwrap().json()["effect"], 1);
    assert_eq!(c.recv().await.unwrap().json()["effect"], 2);
    let paths: Vec<_> = p.effects().into_iter().map(|e| e.path).collect();
    assert_eq!(paths, ["/one", "/two"]);
}

#[tokio::test]
async fn double_effects_detects_one_record_under_two_keys() {
    let p = start(Behaviour::default()).await;
    for (key, body) in [
        ("k-a", r#"{"id":"r7","attempt":1}"#),
        ("k-b", r#"{"id":"r7","attempt":2}"#),
        ("k-c", r#"{"id":8}"#),
        ("k-d", r#"{"no_id":true}"#),
    ] {
        assert_eq!(post(&p, Some(key), body).await.unwrap().status, 200);
    }
    assert_eq!(p.double_effects(), BTreeMap::from([("r7".to_owned(), 2)]));
    assert_eq!(p.effects_by_record(), BTreeMap::from([("8".to_owned(), 1), ("r7".to_owned(), 2)]));
}

#[tokio::test]
async fn without_enforcement_a_repeated_key_applies_twice() {
    let p = start(Behaviour { enforce_idempotency: false, ..Behaviour::default() }).await;
    for _ in 0..2 {
        let r = post(&p, Some("same"), r#"{"id":"r1"}"#).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("idempotent-replayed"), None);
    }
    assert_eq!(p.double_effects(), BTreeMap::from([("r1".to_owned(), 2)]));
    assert_eq!(p.stats().replays, 0);
}

#[tokio::test]
async fn requests_and_correlation_ids_are_recorded() {
    let p = start(Behaviour::default()).await;
    let mut c = TestClient::connect(p.addr()).await;
    let before = Instant::now();
    c.call(&[("Idempotency-Key", "a"), ("X-Correlation-ID", "corr-1")], r#"{"id":"r1"}"#).await.unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    c.call(&[("Idempotency-Key", "b"), ("traceparent", traceparent)], "{}").await.unwrap();
    c.call(&[], "not json").await.unwrap(); // 400: no key

    let seen = p.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/records");
    assert_eq!(seen[0].header("x-correlation-id"), Some("corr-1"));
    assert_eq!(seen[0].header("IDEMPOTENCY-KEY"), Some("a"));
    assert!(seen[0].headers.iter().all(|(n, _)| *n == n.to_ascii_lowercase()));
    assert_eq!(&seen[2].body[..], b"not json");
    assert!(seen[0].at >= before && seen[0].at <= seen[1].at && seen[1].at <= seen[2].at);

    let effects = p.effects();
    assert_eq!(effects[0].correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(effects[1].correlation_id.as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    assert_eq!(effects[1].record_id, None);
}

#[tokio::test]
async fn chunked_request_bodies_are_refused() {
    let p = start(Behaviour::default()).await;
    let mut c = TestClient::connect(p.addr()).await;
    c.send_raw(
        b"POST /records HTTP/1.1\r\nIdempotency-Key: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    .await;
    let r = c.recv().await.unwrap();
    assert_eq!(r.status, 411);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed().await);
    let stats = p.stats();
    assert_eq!((stats.requests, stats.rejected, stats.effects), (1, 1, 0));
    assert_eq!(p.requests()[0].header("transfer-encoding"), Some("chunked"));
}

#[tokio::test]
async fn malformed_request_gets_400_and_close() {
    let p = start(Behaviour::default()).await;
    let mut c = TestClient::connect(p.addr()).await;
    c.send_raw(b"this is not http\r\n\r\n").await;
    assert_eq!(c.recv().await.unwrap().status, 400);
    assert!(c.closed().await);
    assert_eq!(p.stats().rejected, 1);
}

#[tokio::test]
async fn expect_continue_is_answered() {
    let p = start(Behaviour::default()).await;
    let mut c = TestClient::connect(p.addr()).await;
    c.send_raw(b"POST /x HTTP/1.1\r\nIdempotency-Key: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n").await;
    let mut interim = String::new();
    within("100 Continue", async {
        c.reader.read_line(&mut interim).await.unwrap();
        c.reader.read_line(&mut interim).await.unwrap();
    })
    .await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    c.send_raw(b"{}").await;
    assert_eq!(c.recv().await.unwrap().status, 200);
}

#[tokio::test]
async fn wait_until_reports_timeout_with_last_stats() {
    let p = start(Behaviour::default()).await;
    let err = p.wait_until(Duration::from_millis(30), |s| s.effects > 0).await.unwrap_err();
    assert_eq!(err, Stats::default());
    post(&p, Some("k"), "{}").await.unwrap();
    let ok = p.wait_until(LIMIT, |s| s.effects == 1).await.unwrap();
    assert_eq!(ok.requests, 1);
}

#[tokio::test]
async fn shutdown_and_drop_close_open_connections() {
    let p = start(Behaviour::default()).await;
    let mut c = TestClient::connect(p.addr()).await;
    assert_eq!(c.call(&[("Idempotency-Key", "a")], "{}").await.unwrap().status, 200);
    within("shutdown", p.shutdown()).await;
    assert!(c.closed().await);

    let p = start(Behaviour::default()).await;
    let mut c = TestClient::connect(p.addr()).await;
    assert_eq!(c.call(&[("Idempotency-Key", "a")], "{}").await.unwrap().status, 200);
    drop(p);
    assert!(c.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_connections_commit_each_key_once() {
    const CONNS: usize = 8;
    const PER_CONN: usize = 50;
    let p = start(Behaviour::default()).await;
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..CONNS {
        let addr = p.addr();
        tasks.spawn(async move {
            let mut c = TestClient::connect(addr).await;
            for i in 0..PER_CONN {
                // Every key is sent twice: the second must be a replay.
                let key = format!("k-{conn}-{i}");
                let body = format!(r#"{{"id":"r-{conn}-{i}"}}"#);
                let first = c.call(&[("Idempotency-Key", &key)], &body).await.unwrap();
                let second = c.call(&[("Idempotency-Key", &key)], &body).await.unwrap();
                assert_eq!((first.status, second.status), (200, 200));
                assert_eq!(first.body, second.body);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("client task");
    }
    let total = (CONNS * PER_CONN) as u64;
    let stats = p.stats();
    assert_eq!((stats.requests, stats.effects, stats.replays), (2 * total, total, total));
    let seqs: Vec<u64> = p.effects().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    assert!(p.double_effects().is_empty());
    assert_eq!(p.effects_by_record().len(), CONNS * PER_CONN);
}

// ---------------------------------------------------------------------------
// Rate limiting. Live tests use a refill rate of one token per hour, so the
// bucket never refills noticeably during a test, however slow the machine.

/// One token per hour.
const HOURLY: f64 = 1.0 / 3600.0;

fn limit(requests_per_second: f64, burst: u32) -> RateLimit {
    RateLimit { requests_per_second, burst, retry_after: RetryAfterStyle::Seconds, advertise: false }
}

fn with_limit(l: RateLimit) -> Behaviour {
    Behaviour { rate_limit: Some(l), ..Behaviour::default() }
}

/// POSTs `n` records with distinct keys, one after the other, on one
/// connection.
async fn post_many(p: &Partner, n: usize) -> Vec<TestResponse> {
    let mut c = TestClient::connect(p.addr()).await;
    let mut out = Vec::new();
    for i in 0..n {
        let key = format!("k{i}");
        out.push(c.call(&[("Idempotency-Key", &key)], &format!(r#"{{"id":"r{i}"}}"#)).await.unwrap());
    }
    out
}

fn retry_after_secs(r: &TestResponse) -> u64 {
    r.header("retry-after").expect("Retry-After").parse().expect("delay-seconds")
}

fn header_u64(r: &TestResponse, name: &str) -> u64 {
    r.header(name).unwrap_or_else(|| panic!("{name} missing")).parse().unwrap_or_else(|_| panic!("{name} not a number"))
}

#[test]
fn rate_limited_builder() {
    let b = Behaviour::default().rate_limited(0.5, 3);
    assert_eq!(b.rate_limit, Some(limit(0.5, 3)));
    assert_eq!(Behaviour::default().rate_limit, None);
}

#[tokio::test]
async fn rate_limit_answers_429_once_the_burst_is_spent() {
    let p = start(Behaviour::default().rate_limited(HOURLY, 3)).await;
    let rs = post_many(&p, 5).await;
    let statuses: Vec<u16> = rs.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    for r in &rs[3..] {
        assert_eq!(r.body, r#"{"error":"rate limited"}"#);
        assert!((1..=3600).contains(&retry_after_secs(r)), "{r:?}");
    }
    for r in &rs {
        assert_eq!(r.header("ratelimit-remaining"), None, "not advertised");
    }
    assert_eq!(rs[2].json()["effect"], 3);
    assert_eq!(p.effects().len(), 3);
    // The fifth request came right after the fourth was told to wait.
    assert_eq!(
        p.stats(),
        Stats { requests: 5, effects: 3, rejected: 2, rate_limited: 2, retry_after_violations: 1, ..Stats::default() }
    );
    assert_eq!(p.requests().len(), 5);
}

#[tokio::test]
async fn rate_limit_comes_after_required_headers_and_before_idempotency() {
    let b = Behaviour::default().require("Authorization", "Bearer t").rate_limited(HOURLY, 1);
    let p = start(b).await;
    let mut c = TestClient::connect(p.addr()).await;
    // Refused for the header: no token taken.
    assert_eq!(c.call(&[("Idempotency-Key", "k1")], "{}").await.unwrap().status, 401);
    let auth = [("Idempotency-Key", "k1"), ("Authorization", "Bearer t")];
    assert_eq!(c.call(&auth, r#"{"id":"r1"}"#).await.unwrap().status, 200);
    // A retry of the committed key is limited, not replayed ...
    let r = c.call(&auth, r#"{"id":"r1"}"#).await.unwrap();
    assert_eq!((r.status, r.header("idempotent-replayed")), (429, None));
    // ... and so is a request without a key.
    let r = c.call(&[("Authorization", "Bearer t")], "{}").await.unwrap();
    assert_eq!(r.status, 429);
    let stats = p.stats();
    assert_eq!((stats.replays, stats.missing_key, stats.rate_limited, stats.rejected), (0, 0, 2, 3));
    assert_eq!(stats.retry_after_violations, 1);
}

#[tokio::test]
async fn rate_limit_does_not_consume_the_script() {
    let b = Behaviour { rate_limit: Some(limit(HOURLY, 1)), ..Behaviour::script(vec![status(503, "{}")], Reply::Ok) };
    let p = start(b).await;
    // Test-only access to the bucket: empty it, or drop it to get a full one.
    let set_bucket = |bucket: Option<Bucket>| p.shared.lock().bucket = bucket;
    set_bucket(Some(Bucket { tokens: 0.0, at: Instant::now() }));
    assert_eq!(post(&p, Some("a"), "{}").await.unwrap().status, 429);
    set_bucket(None);
    assert_eq!(post(&p, Some("a"), "{}").await.unwrap().status, 503, "script entry still there");
    assert_eq!(post(&p, Some("a"), "{}").await.unwrap().status, 429);
    set_bucket(None);
    assert_eq!(post(&p, Some("a"), "{}").await.unwrap().status, 200);
    let stats = p.stats();
    assert_eq!((stats.rate_limited, stats.rejected, stats.effects), (2, 3, 1));
}

#[tokio::test]
async fn set_behaviour_keeps_the_bucket_only_for_an_equal_limit() {
    let p = start(with_limit(limit(HOURLY, 1))).await;
    let statuses = async |n| post_many(&p, n).await.iter().map(|r| r.status).collect::<Vec<_>>();
    assert_eq!(statuses(2).await, [200, 429]);
    // An equal limit keeps the empty bucket.
    p.set_behaviour(Behaviour { enforce_idempotency: false, ..with_limit(limit(HOURLY, 1)) });
    assert_eq!(statuses(1).await, [429]);
    // A different limit starts full.
    p.set_behaviour(with_limit(limit(HOURLY, 2)));
    assert_eq!(statuses(3).await, [200, 200, 429]);
    // No limit at all; a limit set again starts full.
    p.set_behaviour(Behaviour::default());
    assert_eq!(statuses(2).await, [200, 200]);
    p.set_behaviour(with_limit(limit(HOURLY, 2)));
    assert_eq!(statuses(3).await, [200, 200, 429]);
    assert_eq!(p.stats().rate_limited, 4);
}

#[tokio::test]
async fn violations_count_only_requests_inside_a_told_wait() {
    let p = start(Behaviour::default().rate_limited(HOURLY, 2)).await;
    // Back-to-back requests within the burst: nobody was told to wait.
    post_many(&p, 2).await;
    assert_eq!(p.stats().retry_after_violations, 0);
    let r = post(&p, Some("x"), "{}").await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(p.stats().retry_after_violations, 0, "the 429 itself is no violation");
    // Any later request, on any connection, is too early; each one counts,
    // and each is answered by the limiter as usual.
    for _ in 0..2 {
        assert_eq!(post(&p, Some("y"), "{}").await.unwrap().status, 429);
    }
    let stats = p.stats();
    assert_eq!((stats.retry_after_violations, stats.rate_limited, stats.requests), (2, 3, 5));
}

#[tokio::test]
async fn no_retry_after_means_no_violation() {
    let p = start(with_limit(RateLimit { retry_after: RetryAfterStyle::None, ..limit(HOURLY, 1) })).await;
    let rs = post_many(&p, 3).await;
    assert_eq!((rs[1].status, rs[2].status), (429, 429));
    assert_eq!(rs[1].header("retry-after"), None);
    assert_eq!(p.stats().retry_after_violations, 0);
}

#[tokio::test]
async fn scripted_retry_after_is_remembered_when_parseable() {
    let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
    let script = ["0", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"]
        .into_iter()
        .map(|v| Reply::RetryAfter { status: 503, value: v.into() })
        .collect();
    let p = start(Behaviour::script(script, Reply::RetryAfter { status: 503, value: future })).await;
    // "0", malformed and past values ask for no wait.
    post_many(&p, 4).await;
    assert_eq!(p.stats().retry_after_violations, 0);
    // The fourth named a date an hour ahead.
    post(&p, Some("k"), "{}").await.unwrap();
    assert_eq!(p.stats().retry_after_violations, 1);
}

#[tokio::test]
async fn http_date_retry_after_is_an_imf_fixdate_not_in_the_past() {
    let p = start(with_limit(RateLimit { retry_after: RetryAfterStyle::HttpDate, ..limit(HOURLY, 1) })).await;
    let before = SystemTime::now();
    let rs = post_many(&p, 2).await;
    let after = SystemTime::now();
    assert_eq!((rs[0].status, rs[1].status), (200, 429));
    let value = rs[1].header("retry-after").expect("Retry-After");
    assert!(value.len() == 29 && value.ends_with(" GMT"), "{value:?}");
    let date = httpdate::parse_http_date(value).expect("an HTTP-date");
    assert_eq!(httpdate::fmt_http_date(date), value, "IMF-fixdate");
    // About an hour from the 429, rounded up to a whole second.
    assert!(date >= before + Duration::from_secs(3599), "{value} vs {before:?}");
    assert!(date <= after + Duration::from_secs(3601), "{value} vs {after:?}");
    post(&p, Some("again"), "{}").await.unwrap();
    assert_eq!(p.stats().retry_after_violations, 1);
}

#[tokio::test]
async fn advertised_headers_on_every_response() {
    let script = vec![Reply::SlowAfterCommit(Duration::from_millis(1)), status(503, "{}")];
    let b = Behaviour {
        rate_limit: Some(RateLimit { advertise: true, ..limit(HOURLY, 4) }),
        ..Behaviour::script(script, Reply::Ok)
    };
    let p = start(b).await;
    let rs = post_many(&p, 5).await;
    let statuses: Vec<u16> = rs.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 503, 200, 200, 429]);
    let remaining: Vec<u64> = rs.iter().map(|r| header_u64(r, "ratelimit-remaining")).collect();
    assert_eq!(remaining, [3, 2, 1, 0, 0]);
    // Seconds until full: about one hour per missing token, rounded up.
    for (r, missing) in rs.iter().zip([1, 2, 3, 4, 4]) {
        let reset = header_u64(r, "ratelimit-reset");
        assert!(reset > (missing - 1) * 3600 && reset <= missing * 3600, "reset {reset} for {missing} missing");
    }
    assert!(retry_after_secs(&rs[4]) >= 1);
    // A retry of a committed key is limited too, and advertised.
    let mut c = TestClient::connect(p.addr()).await;
    let r = c.call(&[("Idempotency-Key", "k0")], "{}").await.unwrap();
    assert_eq!((r.status, header_u64(&r, "ratelimit-remaining")), (429, 0));
}

#[tokio::test]
async fn advertised_headers_without_limiting() {
    // An infinite rate refills at once: never limits, the bucket reads full.
    let p = start(with_limit(RateLimit { advertise: true, ..limit(f64::INFINITY, 2) })).await;
    let rs = post_many(&p, 3).await;
    for r in &rs {
        assert_eq!(r.status, 200);
        assert_eq!((header_u64(r, "ratelimit-remaining"), header_u64(r, "ratelimit-reset")), (2, 0));
    }
    let r = post(&p, None, "{}").await.unwrap();
    assert_eq!((r.status, header_u64(&r, "ratelimit-remaining")), (400, 2));
    assert_eq!(p.stats().rate_limited, 0);
}

#[test]
fn bucket_refills_at_the_rate() {
    let l = limit(0.5, 3);
    let t0 = Instant::now();
    let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
    let mut b = Bucket::full(&l, t0);
    assert_eq!(b.headers(&l), RateHeaders { remaining: 3, reset: 0 });
    assert_eq!(b.take(&l, t0), Ok(()));
    assert_eq!(b.headers(&l), RateHeaders { remaining: 2, reset: 2 });
    assert_eq!((b.take(&l, t0), b.take(&l, t0)), (Ok(()), Ok(())));
    assert_eq!(b.headers(&l), RateHeaders { remaining: 0, reset: 6 });
    // Empty: one token takes 2 s; later, less; never below 1 s.
    assert_eq!(b.take(&l, t0), Err(2));
    assert_eq!(b.take(&l, at(0.5)), Err(2));
    assert_eq!(b.take(&l, at(1.5)), Err(1));
    assert_eq!(b.take(&l, at(1.99)), Err(1));
    assert_eq!(b.take(&l, at(2.0)), Ok(()));
    assert_eq!(b.take(&l, at(2.0)), Err(2));
    // Refill stops at capacity; a stale instant changes nothing.
    b.refill(&l, at(100.0));
    b.refill(&l, at(50.0));
    assert_eq!(b.headers(&l), RateHeaders { remaining: 3, reset: 0 });
}

#[test]
fn bucket_edge_cases() {
    let t0 = Instant::now();
    // Burst 0 counts as 1.
    let l = limit(1.0, 0);
    let mut b = Bucket::full(&l, t0);
    assert_eq!((b.take(&l, t0), b.take(&l, t0)), (Ok(()), Err(1)));
    // Never refills: the wait announced is capped at a day.
    for rate in [0.0, -1.0, f64::NAN] {
        let l = limit(rate, 1);
        let mut b = Bucket::full(&l, t0);
        assert_eq!(b.take(&l, t0), Ok(()));
        assert_eq!(b.take(&l, t0 + Duration::from_secs(1000)), Err(MAX_WAIT_SECS));
        assert_eq!(b.headers(&l).reset, MAX_WAIT_SECS);
    }
    // Very slow refill is capped too.
    let l = limit(1e-300, 1);
    let mut b = Bucket::full(&l, t0);
    assert_eq!((b.take(&l, t0), b.take(&l, t0)), (Ok(()), Err(MAX_WAIT_SECS)));
    // Fractional waits round up.
    let l = limit(3.0, 1);
    let mut b = Bucket::full(&l, t0);
    assert_eq!((b.take(&l, t0), b.take(&l, t0)), (Ok(()), Err(1)));
    assert_eq!(b.headers(&l), RateHeaders { remaining: 0, reset: 1 });
}

#[test]
fn http_date_is_rounded_up_to_whole_seconds() {
    // 784111777 s after the epoch is Sun, 06 Nov 1994 08:49:37 GMT.
    let now = UNIX_EPOCH + Duration::from_millis(784_111_777_500);
    let (date, wait) = http_date_after(now, 1);
    assert_eq!((date.as_str(), wait), ("Sun, 06 Nov 1994 08:49:39 GMT", Duration::from_millis(1500)));
    let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
    let (date, wait) = http_date_after(now, 2);
    assert_eq!((date.as_str(), wait), ("Sun, 06 Nov 1994 08:49:39 GMT", Duration::from_secs(2)));
}

#[test]
fn retry_after_deadlines() {
    let now = Instant::now();
    let wall = UNIX_EPOCH + Duration::from_secs(784_111_777);
    assert_eq!(retry_after_deadline("7", now, wall), Some(now + Duration::from_secs(7)));
    assert_eq!(retry_after_deadline(" 0 ", now, wall), Some(now));
    assert_eq!(retry_after_deadline("Sun, 06 Nov 1994 08:49:47 GMT", now, wall), Some(now + Duration::from_secs(10)));
    assert_eq!(retry_after_deadline("Sun, 06 Nov 1994 08:49:30 GMT", now, wall), None, "past");
    for bad in ["", "-1", "1.5", "soon", "99999999999999999999999"] {
        assert_eq!(retry_after_deadline(bad, now, wall), None, "{bad:?}");
    }
}

#[test]
fn max_in_window_on_a_constructed_sequence() {
    let t0 = Instant::now();
    // Deliberately out of order: requests are recorded in decision order.
    let ms = [1150, 0, 2500, 100, 1199, 200, 1000, 1100];
    let arrivals: Vec<Instant> = ms.iter().map(|&m| t0 + Duration::from_millis(m)).collect();
    let count = |window: Duration| max_in_window(&mut arrivals.clone(), window);
    // [200, 1200) holds 200, 1000, 1100, 1150, 1199; 0 and 1000 are exactly
    // one second apart and never share a window.
    assert_eq!(count(Duration::from_secs(1)), 5);
    assert_eq!(count(Duration::from_millis(999)), 4);
    assert_eq!(count(Duration::from_millis(1000 - 199)), 4);
    assert_eq!(count(Duration::from_millis(100)), 3); // 1100, 1150, 1199
    assert_eq!(count(Duration::from_millis(50)), 2);
    assert_eq!(count(Duration::from_millis(1)), 1);
    assert_eq!(count(Duration::ZERO), 0);
    assert_eq!(count(Duration::from_secs(2)), 7);
    assert_eq!(count(Duration::from_millis(2501)), 8);
    assert_eq!(max_in_window(&mut [], Duration::from_secs(1)), 0);
    // Simultaneous arrivals share every non-empty window.
    assert_eq!(max_in_window(&mut [t0, t0, t0], Duration::from_nanos(1)), 3);
}

#[tokio::test]
async fn requests_per_window_uses_recorded_arrivals() {
    let p = start(Behaviour::default().rate_limited(HOURLY, 1)).await;
    assert_eq!(p.requests_per_window(Duration::from_secs(1)), 0);
    post_many(&p, 3).await; // 429s count too
    assert_eq!(p.requests_per_window(LIMIT), 3);
    assert_eq!(p.requests_per_window(Duration::ZERO), 0);
    // A constructed history: three requests, the last two seconds later.
    let t0 = Instant::now();
    {
        let mut st = p.shared.lock();
        for (r, ms) in st.requests.iter_mut().zip([0, 10, 2000]) {
            r.at = t0 + Duration::from_millis(ms);
        }
    }
    assert_eq!(p.requests_per_window(Duration::from_secs(1)), 2);
    assert_eq!(p.requests_per_window(Duration::from_millis(10)), 1);
    assert_eq!(p.requests_per_window(Duration::from_millis(2001)), 3);
}

// ---------------------------------------------------------------------------
// OAuth 2.0. Tokens that must stay valid during a test live for an hour;
// expiry is forced with `revoke_all_tokens`. Only `tokens_really_expire`
// waits for a real expiry, and it can only fail if the clock runs fast.

const TOKEN_PATH: &str = "/oauth/token";
const CLIENT_ID: &str = "dovetail";
const SECRET: &str = "s3cret";
const REFRESH: &str = "rt-initial";
const HOUR: Duration = Duration::from_secs(3600);
const CLIENT_CREDENTIALS: &str = "grant_type=client_credentials";

fn oauth_config(ttl: Duration) -> OAuth {
    OAuth {
        token_path: TOKEN_PATH.to_owned(),
        client_id: CLIENT_ID.to_owned(),
        client_secret: SECRET.to_owned(),
        token_ttl: ttl,
        refresh_token: Some(REFRESH.to_owned()),
    }
}

fn with_oauth(b: Behaviour) -> Behaviour {
    b.oauth(oauth_config(HOUR))
}

/// Standard base64 with padding, for building `Authorization: Basic`.
fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            out.push(if i <= chunk.len() { char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]) } else { '=' });
        }
    }
    out
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", base64_encode(format!("{id}:{secret}").as_bytes()))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A request with exactly these headers (plus `Host` and `Content-Length`).
fn raw_request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: partner.test\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

impl TestClient {
    /// A form-urlencoded POST to the token endpoint.
    async fn token(&mut self, headers: &[(&str, &str)], form: &str) -> TestResponse {
        let mut all = vec![("Content-Type", FORM_URLENCODED)];
        all.extend_from_slice(headers);
        self.send_raw(&raw_request("POST", TOKEN_PATH, &all, form)).await;
        self.recv().await.expect("token response")
    }
}

/// A token request on a fresh connection.
async fn token(p: &Partner, headers: &[(&str, &str)], form: &str) -> TestResponse {
    TestClient::connect(p.addr()).await.token(headers, form).await
}

/// A fresh access token (client credentials, HTTP Basic).
async fn access_token(p: &Partner) -> String {
    let r = token(p, &[("Authorization", &basic(CLIENT_ID, SECRET))], CLIENT_CREDENTIALS).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["access_token"].as_str().expect("access_token").to_owned()
}

/// POST /records with a key and, if given, a bearer token, on a fresh
/// connection.
async fn api_call(p: &Partner, token: Option<&str>, key: &str, body: &str) -> TestResponse {
    let mut c = TestClient::connect(p.addr()).await;
    let auth = token.map(bearer);
    let mut headers = vec![("Idempotency-Key", key)];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    c.call(&headers, body).await.expect("API response")
}

fn assert_invalid_token(r: &TestResponse) {
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.body, r#"{"error":"invalid_token"}"#);
    assert_eq!(r.header("www-authenticate"), Some(r#"Bearer error="invalid_token""#));
}

fn assert_token_error(r: &TestResponse, status: u16, error: &str) {
    assert_eq!((r.status, r.body.as_str()), (status, format!(r#"{{"error":"{error}"}}"#).as_str()), "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
}

#[test]
fn oauth_builder() {
    assert_eq!(Behaviour::default().oauth, None);
    let b = Behaviour::always(Reply::Ok).oauth(oauth_config(HOUR));
    assert_eq!(b.oauth, Some(oauth_config(HOUR)));
    assert!(matches!(b.default, Reply::Ok));
}

#[tokio::test]
async fn client_credentials_with_basic_auth() {
    let p = start(with_oauth(Behaviour::default())).await;
    let mut c = TestClient::connect(p.addr()).await;
    let auth = basic(CLIENT_ID, SECRET);
    let r = c.token(&[("Authorization", &auth)], CLIENT_CREDENTIALS).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!((r.header("cache-control"), r.header("pragma")), (Some("no-store"), Some("no-cache")));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("www-authenticate"), None);
    let json = r.json();
    let first = json["access_token"].as_str().unwrap().to_owned();
    assert!(first.starts_with("tok_1_") && first.len() > "tok_1_".len(), "{first}");
    assert_eq!((json["token_type"].as_str(), json["expires_in"].as_u64()), (Some("Bearer"), Some(3600)));
    assert!(json.get("refresh_token").is_none() && json.get("scope").is_none(), "{json}");
    // The fields come in the usual order.
    assert!(r.body.starts_with(r#"{"access_token":"tok_1_"#), "{}", r.body);

    // A scope is echoed; every token is new.
    let r = c.token(&[("Authorization", &auth)], "grant_type=client_credentials&scope=records%3Awrite+read").await;
    let json = r.json();
    assert_eq!(json["scope"], "records:write read");
    let second = json["access_token"].as_str().unwrap();
    assert!(second.starts_with("tok_2_"), "{second}");
    assert_ne!(second, first);

    let stats = p.stats();
    assert_eq!(stats, Stats { requests: 2, tokens_issued: 2, ..Stats::default() });
    assert_eq!(p.requests()[0].path, TOKEN_PATH);
}

#[tokio::test]
async fn client_credentials_with_post_fields() {
    let p = start(with_oauth(Behaviour::default())).await;
    let form = format!("grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={SECRET}");
    let r = token(&p, &[], &form).await;
    assert_eq!(r.status, 200, "{r:?}");
    let tok = r.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(api_call(&p, Some(&tok), "k1", r#"{"id":"r1"}"#).await.status, 200);
    // A Basic header may come with a client_id field naming the same client.
    let r = token(
        &p,
        &[("Authorization", &basic(CLIENT_ID, SECRET))],
        &format!("{CLIENT_CREDENTIALS}&client_id={CLIENT_ID}"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(p.stats().tokens_issued, 2);
}

#[tokio::test]
async fn credentials_are_form_decoded() {
    // RFC 6749, 2.3.1: both Basic parts are form-urlencoded first.
    let secret = "p@ss:w+rd %/";
    let encoded = "p%40ss%3Aw%2Brd+%25%2F";
    let p = start(Behaviour::default().oauth(OAuth { client_secret: secret.into(), ..oauth_config(HOUR) })).await;
    let r = token(&p, &[("Authorization", &basic(CLIENT_ID, encoded))], CLIENT_CREDENTIALS).await;
    assert_eq!(r.status, 200, "{r:?}");
    let form = format!("{CLIENT_CREDENTIALS}&client_id={CLIENT_ID}&client_secret={encoded}");
    assert_eq!(token(&p, &[], &form).await.status, 200);
    // The raw secret in Basic is not the same thing.
    let r = token(&p, &[("Authorization", &basic(CLIENT_ID, secret))], CLIENT_CREDENTIALS).await;
    assert_token_error(&r, 401, "invalid_client");
}

#[tokio::test]
async fn wrong_client_credentials_are_invalid_client() {
    let p = start(with_oauth(Behaviour::default())).await;
    let basic_challenge = Some(r#"Basic realm="token""#);

    let r = token(&p, &[("Authorization", &basic(CLIENT_ID, "wrong"))], CLIENT_CREDENTIALS).await;
    assert_token_error(&r, 401, "invalid_client");
    assert_eq!(r.header("www-authenticate"), basic_challenge);
    let r = token(&p, &[("Authorization", &basic("someone-else", SECRET))], CLIENT_CREDENTIALS).await;
    assert_token_error(&r, 401, "invalid_client");
    let r = token(&p, &[("Authorization", "Basic !!!not-base64")], CLIENT_CREDENTIALS).await;
    assert_token_error(&r, 401, "invalid_client");
    assert_eq!(r.header("www-authenticate"), basic_challenge);
    // Form fields: wrong secret, or no secret at all.
    let r = token(&p, &[], &format!("{CLIENT_CREDENTIALS}&client_id={CLIENT_ID}&client_secret=wrong")).await;
    assert_token_error(&r, 401, "invalid_client");
    assert_eq!(r.header("www-authenticate"), None);
    let r = token(&p, &[], &format!("{CLIENT_CREDENTIALS}&client_id={CLIENT_ID}")).await;
    assert_token_error(&r, 401, "invalid_client");
    // No client authentication; a bearer token is none either.
    assert_token_error(&token(&p, &[], CLIENT_CREDENTIALS).await, 401, "invalid_client");
    let r = token(&p, &[("Authorization", "Bearer tok_1")], CLIENT_CREDENTIALS).await;
    assert_token_error(&r, 401, "invalid_client");
    // A client_id field that contradicts Basic.
    let r =
        token(&p, &[("Authorization", &basic(CLIENT_ID, SECRET))], &format!("{CLIENT_CREDENTIALS}&client_id=other"))
            .await;
    assert_token_error(&r, 401, "invalid_client");

    assert_eq!(p.stats(), Stats { requests: 8, rejected: 8, token_failures: 8, ..Stats::default() });
}

#[tokio::test]
async fn set_client_secret_rotates_the_secret() {
    let p = start(with_oauth(Behaviour::default())).await;
    let before = access_token(&p).await;
    p.set_client_secret("rotated");
    let r = token(&p, &[("Authorization", &basic(CLIENT_ID, SECRET))], CLIENT_CREDENTIALS).await;
    assert_token_error(&r, 401, "invalid_client");
    let form = format!("{CLIENT_CREDENTIALS}&client_id={CLIENT_ID}&client_secret={SECRET}");
    assert_token_error(&token(&p, &[], &form).await, 401, "invalid_client");
    let r = token(&p, &[("Authorization", &basic(CLIENT_ID, "rotated"))], CLIENT_CREDENTIALS).await;
    assert_eq!(r.status, 200, "{r:?}");
    // A token issued before the rotation is still good.
    assert_eq!(api_call(&p, Some(&before), "k1", "{}").await.status, 200);
    let stats = p.stats();
    assert_eq!((stats.tokens_issued, stats.token_failures, stats.effects), (2, 2, 1));
}

#[tokio::test]
async fn api_requires_a_valid_bearer_token() {
    // A script entry and a rate limit of one request: a refused request
    // must use neither, and must not commit an effect.
    let b = with_oauth(Behaviour::script(vec![status(503, "{}")], Reply::Ok).rate_limited(HOURLY, 2));
    let p = start(b).await;
    let mut c = TestClient::connect(p.addr()).await;

    assert_invalid_token(&c.call(&[("Idempotency-Key", "k1")], r#"{"id":"r1"}"#).await.unwrap());
    // Refused before idempotency: no key at all is a 401, not a 400.
    assert_invalid_token(&c.call(&[], r#"{"id":"r1"}"#).await.unwrap());
    for auth in ["Bearer garbage", "Bearer tok_1", "Bearer", "Basic ZG92ZXRhaWw6czNjcmV0", "tok_1"] {
        let r = c.call(&[("Idempotency-Key", "k1"), ("Authorization", auth)], r#"{"id":"r1"}"#).await.unwrap();
        assert_invalid_token(&r);
    }
    assert!(p.effects().is_empty());
    assert_eq!(p.stats(), Stats { requests: 7, rejected: 7, invalid_token: 7, ..Stats::default() });

    // With a fresh token (scheme case-insensitive): the script entry and
    // the rate limit are still all there.
    let tok = access_token(&p).await;
    let auth = format!("bearer {tok}");
    let with_token = [("Idempotency-Key", "k1"), ("Authorization", auth.as_str())];
    assert_eq!(c.call(&with_token, r#"{"id":"r1"}"#).await.unwrap().status, 503);
    let r = c.call(&with_token, r#"{"id":"r1"}"#).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"ok":true,"effect":1}"#));
    assert_eq!(c.call(&with_token, r#"{"id":"r1"}"#).await.unwrap().status, 429);
    let effects = p.effects();
    assert_eq!((effects.len(), effects[0].record_id.as_deref()), (1, Some("r1")));
    let stats = p.stats();
    assert_eq!(
        stats,
        Stats {
            requests: 11,
            effects: 1,
            rejected: 9,
            rate_limited: 1,
            tokens_issued: 1,
            invalid_token: 7,
            ..Stats::default()
        }
    );
}

#[tokio::test]
async fn revoke_all_tokens_forces_a_new_token() {
    let p = start(with_oauth(Behaviour::default())).await;
    let first = access_token(&p).await;
    let second = access_token(&p).await;
    assert_eq!(api_call(&p, Some(&first), "k1", r#"{"id":"r1"}"#).await.status, 200);
    p.revoke_all_tokens();
    for tok in [&first, &second] {
        assert_invalid_token(&api_call(&p, Some(tok), "k2", r#"{"id":"r2"}"#).await);
    }
    // A new token works, and so does the refresh token.
    let third = access_token(&p).await;
    assert_eq!(api_call(&p, Some(&third), "k2", r#"{"id":"r2"}"#).await.status, 200);
    let r = token(
        &p,
        &[("Authorization", &basic(CLIENT_ID, SECRET))],
        &format!("grant_type=refresh_token&refresh_token={REFRESH}"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let stats = p.stats();
    assert_eq!((stats.effects, stats.invalid_token, stats.tokens_issued), (2, 2, 4));
}

#[tokio::test]
async fn tokens_really_expire() {
    // One second of life; the token is only used well after it ended, so a
    // slow machine cannot make this fail.
    let p = start(Behaviour::default().oauth(oauth_config(Duration::from_secs(1)))).await;
    let r = token(&p, &[("Authorization", &basic(CLIENT_ID, SECRET))], CLIENT_CREDENTIALS).await;
    assert_eq!(r.json()["expires_in"], 1);
    let tok = r.json()["access_token"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_invalid_token(&api_call(&p, Some(&tok), "k1", "{}").await);
    assert_eq!(p.stats().effects, 0);
}

#[test]
fn expiry_is_checked_by_instant() {
    let mut server = OAuthServer::new(oauth_config(Duration::from_millis(2500)));
    let t0 = Instant::now();
    let req = Request {
        method: "POST".into(),
        path: TOKEN_PATH.into(),
        headers: vec![
            ("content-type".into(), FORM_URLENCODED.into()),
            ("authorization".into(), basic(CLIENT_ID, SECRET)),
        ],
        body: Bytes::from_static(CLIENT_CREDENTIALS.as_bytes()),
        at: t0,
        idempotency_key: None,
        record_id: None,
        correlation_id: None,
    };
    let body: serde_json::Value = serde_json::from_str(&server.grant(&req, t0, 1).unwrap()).unwrap();
    // 2.5 s is advertised as 2: a client trusting it is never late.
    assert_eq!(body["expires_in"], 2);
    let auth = vec![("authorization".to_owned(), bearer(body["access_token"].as_str().unwrap()))];
    let at = |ms| t0 + Duration::from_millis(ms);
    assert!(server.accepts(&auth, t0));
    assert!(server.accepts(&auth, at(2499)));
    assert!(!server.accepts(&auth, at(2500)));
    // Expired tokens are forgotten when the next one is issued.
    server.grant(&req, at(3000), 2).unwrap();
    assert_eq!(server.tokens.len(), 1);
    // A TTL below a second is still advertised as 1; one too long to
    // represent never expires.
    for (ttl, expires_in) in [(Duration::from_millis(10), 1), (Duration::MAX, u64::MAX)] {
        let mut server = OAuthServer::new(oauth_config(ttl));
        let body: serde_json::Value = serde_json::from_str(&server.grant(&req, t0, 1).unwrap()).unwrap();
        assert_eq!(body["expires_in"].as_u64(), Some(expires_in));
    }
    let mut server = OAuthServer::new(oauth_config(Duration::MAX));
    let body: serde_json::Value = serde_json::from_str(&server.grant(&req, t0, 1).unwrap()).unwrap();
    let auth = vec![("authorization".to_owned(), bearer(body["access_token"].as_str().unwrap()))];
    assert!(server.accepts(&auth, t0 + Duration::from_secs(100 * 365 * 24 * 3600)));
}

#[tokio::test]
async fn refresh_token_grant_rotates_the_refresh_token() {
    let p = start(with_oauth(Behaviour::default())).await;
    let auth = basic(CLIENT_ID, SECRET);
    let refresh = async |rt: &str| {
        token(&p, &[("Authorization", &auth)], &format!("grant_type=refresh_token&refresh_token={rt}")).await
    };

    let r = refresh(REFRESH).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let json = r.json();
    let (tok, second) = (json["access_token"].as_str().unwrap(), json["refresh_token"].as_str().unwrap().to_owned());
    assert!(tok.starts_with("tok_1_"), "{tok}");
    assert_eq!((json["token_type"].as_str(), json["expires_in"].as_u64()), (Some("Bearer"), Some(3600)));
    assert_ne!(second, REFRESH);
    assert_eq!(api_call(&p, Some(tok), "k1", "{}").await.status, 200);

    // The old refresh token is dead; the new one works once and rotates again.
    assert_token_error(&refresh(REFRESH).await, 400, "invalid_grant");
    let r = refresh(&second).await;
    assert_eq!(r.status, 200, "{r:?}");
    let third = r.json()["refresh_token"].as_str().unwrap().to_owned();
    assert!(third != second && third != REFRESH);
    assert_token_error(&refresh(&second).await, 400, "invalid_grant");
    assert_token_error(&refresh("made-up").await, 400, "invalid_grant");

    // Client authentication still applies, by either method, and comes first.
    let form = format!("grant_type=refresh_token&refresh_token={third}");
    assert_token_error(&token(&p, &[], &form).await, 401, "invalid_client");
    let r = token(&p, &[], &format!("{form}&client_id={CLIENT_ID}&client_secret={SECRET}&scope=read")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["scope"], "read");
    assert!(r.json()["refresh_token"].is_string());
    // No refresh_token parameter at all.
    assert_token_error(
        &token(&p, &[("Authorization", &auth)], "grant_type=refresh_token").await,
        400,
        "invalid_request",
    );

    let stats = p.stats();
    assert_eq!((stats.tokens_issued, stats.token_failures, stats.rejected), (3, 5, 5));
}

#[tokio::test]
async fn unsupported_and_missing_grant_types() {
    let p = start(with_oauth(Behaviour::default())).await;
    let auth = basic(CLIENT_ID, SECRET);
    let headers = [("Authorization", auth.as_str())];
    for grant in ["password&username=a&password=b", "authorization_code&code=x", "CLIENT_CREDENTIALS", ""] {
        let r = token(&p, &headers, &format!("grant_type={grant}")).await;
        assert_token_error(&r, 400, "unsupported_grant_type");
    }
    assert_token_error(&token(&p, &headers, "scope=read").await, 400, "invalid_request");
    // Without a configured refresh token the refresh grant is not offered.
    p.set_behaviour(Behaviour::default().oauth(OAuth { refresh_token: None, ..oauth_config(HOUR) }));
    let r = token(&p, &headers, &format!("grant_type=refresh_token&refresh_token={REFRESH}")).await;
    assert_token_error(&r, 400, "unsupported_grant_type");
    assert_eq!(p.stats().token_failures, 6);
}

#[tokio::test]
async fn malformed_token_requests_are_invalid_request() {
    let p = start(with_oauth(Behaviour::default())).await;
    let auth = basic(CLIENT_ID, SECRET);
    let mut c = TestClient::connect(p.addr()).await;
    let mut send = async |method: &str, path: &str, content_type: Option<&str>, extra: &[(&str, &str)], body: &str| {
        let mut headers = extra.to_vec();
        headers.extend(content_type.map(|t| ("Content-Type", t)));
        c.send_raw(&raw_request(method, path, &headers, body)).await;
        c.recv().await.expect("response")
    };
    let basic_only = [("Authorization", auth.as_str())];
    let form = Some(FORM_URLENCODED);

    // Not POST; not a form; no Content-Type.
    assert_token_error(&send("GET", TOKEN_PATH, form, &basic_only, "").await, 400, "invalid_request");
    let json = r#"{"grant_type":"client_credentials"}"#;
    assert_token_error(
        &send("POST", TOKEN_PATH, Some("application/json"), &basic_only, json).await,
        400,
        "invalid_request",
    );
    assert_token_error(&send("POST", TOKEN_PATH, None, &basic_only, CLIENT_CREDENTIALS).await, 400, "invalid_request");
    // Repeated parameters and bad percent-encoding.
    let twice = "grant_type=client_credentials&grant_type=client_credentials";
    assert_token_error(&send("POST", TOKEN_PATH, form, &basic_only, twice).await, 400, "invalid_request");
    let bad = "grant_type=client_credentials&scope=%zz";
    assert_token_error(&send("POST", TOKEN_PATH, form, &basic_only, bad).await, 400, "invalid_request");
    // Two client authentication methods in one request.
    let both = format!("{CLIENT_CREDENTIALS}&client_id={CLIENT_ID}&client_secret={SECRET}");
    assert_token_error(&send("POST", TOKEN_PATH, form, &basic_only, &both).await, 400, "invalid_request");

    // A charset parameter, a query string, empty pairs and odd case are fine.
    let r = send(
        "POST",
        "/oauth/token?x=1",
        Some("Application/X-WWW-Form-Urlencoded; charset=UTF-8"),
        &[("authorization", &auth.replacen("Basic", "BASIC", 1))],
        "&grant_type=client_credentials&&",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    // Another path is the API, not the token endpoint.
    let r = send("POST", "/oauth/token/", form, &basic_only, CLIENT_CREDENTIALS).await;
    assert_invalid_token(&r);
    let stats = p.stats();
    assert_eq!((stats.token_failures, stats.tokens_issued, stats.invalid_token), (6, 1, 1));
}

#[tokio::test]
async fn token_endpoint_is_exempt_from_everything_else() {
    // Everything that could refuse or count a request: a script entry, a
    // body override, a required header, idempotency and an advertised rate
    // limit of one request.
    let b = Behaviour::script(vec![status(503, "{}")], Reply::Ok)
        .fail_body("grant_type", status(422, "{}"))
        .require("X-Tenant", "acme");
    let b = with_oauth(Behaviour { rate_limit: Some(RateLimit { advertise: true, ..limit(HOURLY, 1) }), ..b });
    let p = start(b).await;
    let mut c = TestClient::connect(p.addr()).await;
    let auth = basic(CLIENT_ID, SECRET);

    // Three token requests (one refused) beyond the burst, without key or
    // tenant, and a body that matches the override.
    for _ in 0..2 {
        let r = c.token(&[("Authorization", &auth)], CLIENT_CREDENTIALS).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("ratelimit-remaining"), None);
    }
    assert_eq!(c.token(&[], CLIENT_CREDENTIALS).await.status, 401);
    let tok = access_token(&p).await;
    let auth = bearer(&tok);
    let api = [("Idempotency-Key", "k1"), ("Authorization", auth.as_str()), ("X-Tenant", "acme")];
    // The script entry and the rate limiter's token are still there.
    let r = c.call(&api, "{}").await.unwrap();
    assert_eq!((r.status, header_u64(&r, "ratelimit-remaining")), (503, 0));
    let r = c.call(&api, "{}").await.unwrap();
    assert_eq!(r.status, 429);
    // Asking for a token while told to wait is no violation; the API is.
    assert_eq!(c.token(&[("Authorization", &basic(CLIENT_ID, SECRET))], CLIENT_CREDENTIALS).await.status, 200);
    assert_eq!(p.stats().retry_after_violations, 0);
    assert_eq!(c.call(&api, "{}").await.unwrap().status, 429);

    assert!(p.effects().is_empty());
    assert_eq!(
        p.stats(),
        Stats {
            requests: 8,
            rejected: 4,
            rate_limited: 2,
            retry_after_violations: 1,
            tokens_issued: 4,
            token_failures: 1,
            ..Stats::default()
        }
    );
    assert_eq!(p.requests().iter().filter(|r| r.path == TOKEN_PATH).count(), 5);
}

#[tokio::test]
async fn set_behaviour_keeps_oauth_state_only_for_an_equal_config() {
    let p = start(with_oauth(Behaviour::default())).await;
    let tok = access_token(&p).await;
    p.set_client_secret("rotated");
    let r = token(
        &p,
        &[("Authorization", &basic(CLIENT_ID, "rotated"))],
        &format!("grant_type=refresh_token&refresh_token={REFRESH}"),
    )
    .await;
    let rotated = r.json()["refresh_token"].as_str().unwrap().to_owned();

    // An equal configuration keeps tokens, secret and refresh token.
    p.set_behaviour(with_oauth(Behaviour::always(status(202, "{}"))));
    assert_eq!(api_call(&p, Some(&tok), "k1", "{}").await.status, 202);
    let r = token(
        &p,
        &[("Authorization", &basic(CLIENT_ID, "rotated"))],
        &format!("grant_type=refresh_token&refresh_token={rotated}"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");

    // Another configuration starts afresh from it.
    p.set_behaviour(Behaviour::default().oauth(oauth_config(2 * HOUR)));
    assert_invalid_token(&api_call(&p, Some(&tok), "k1", "{}").await);
    let r = token(
        &p,
        &[("Authorization", &basic(CLIENT_ID, SECRET))],
        &format!("grant_type=refresh_token&refresh_token={REFRESH}"),
    )
    .await;
    assert_eq!((r.status, r.json()["expires_in"].as_u64()), (200, Some(7200)));

    // Without OAuth, no token is needed, the helpers do nothing and the
    // token path is an ordinary API path.
    p.set_behaviour(Behaviour::default());
    p.revoke_all_tokens();
    p.set_client_secret("ignored");
    assert_eq!(api_call(&p, None, "k2", "{}").await.status, 200);
    assert_eq!(
        TestClient::connect(p.addr()).await.token(&[("Idempotency-Key", "k3")], CLIENT_CREDENTIALS).await.status,
        200
    );
    assert_eq!(p.stats().effects, 2);
    assert!(p.shared.lock().oauth.is_none());
}

#[test]
fn base64_and_form_decoding() {
    for (plain, encoded) in [
        (&b"dovetail:s3cret"[..], "ZG92ZXRhaWw6czNjcmV0"),
        (b"foobar", "Zm9vYmFy"),
        (b"fooba", "Zm9vYmE="),
        (b"foob", "Zm9vYg=="),
        (b"\xff\xfe\x00", "//4A"),
        (b"", ""),
    ] {
        assert_eq!(base64_encode(plain), encoded);
        assert_eq!(base64_decode(encoded).as_deref(), Some(plain), "{encoded}");
    }
    assert_eq!(base64_decode("Zm9vYg").as_deref(), Some(&b"foob"[..]), "unpadded");
    for bad in ["Zm9vY", "Zm9vYg===", "Zm9vYg=", "Zm9v Yg==", "Zm9-", "="] {
        assert_eq!(base64_decode(bad), None, "{bad:?}");
    }
    assert_eq!(decode_basic("ZG92ZXRhaWw6czNjcmV0"), Some(("dovetail".into(), "s3cret".into())));
    assert_eq!(decode_basic(&base64_encode(b"no-colon")), None);

    assert_eq!(form_decode("a+b%20c%2B%3d").as_deref(), Some("a b c+="));
    for bad in ["%", "%2", "%zz", "%+1", "%ff"] {
        assert_eq!(form_decode(bad), None, "{bad:?}");
    }
    let pairs = |body: &str| parse_form(body.as_bytes());
    assert_eq!(
        pairs("grant_type=client_credentials&&scope=&flag"),
        Some(vec![
            ("grant_type".into(), "client_credentials".into()),
            ("scope".into(), String::new()),
            ("flag".into(), String::new()),
        ])
    );
    assert_eq!(pairs("a=1&a=2"), None);
    assert_eq!(pairs("a=1&%61=2"), None, "repeated after decoding");
    assert_eq!(parse_form(b"a=\xff"), None);
}

// ---------------------------------------------------------------------------
// Bulk endpoint.

const BULK: &str = "/records/bulk";
const BATCH: &str = r#"[ {"id":"b1","n":1}, {"id":"b2","poison":true} ,{"id":3,"s":"a,]}\"["} ]"#;

/// POST a bulk request on a fresh connection, with an `Idempotency-Key`.
async fn post_bulk(p: &Partner, key: &str, body: &str) -> Option<TestResponse> {
    let mut client = TestClient::connect(p.addr()).await;
    client.send(BULK, &[("Idempotency-Key", key)], body).await;
    client.recv().await
}

fn bulk_behaviour(b: Behaviour) -> Behaviour {
    b.bulk(BULK).fail_item("poison", 422)
}

const BATCH_RESULTS: &str = r#"{"results":[{"status":201},{"status":422,"error":"item rejected"},{"status":201}]}"#;

#[test]
fn bulk_builders() {
    assert_eq!(Behaviour::default().bulk_path, None);
    assert!(Behaviour::default().bulk_item_failures.is_empty());
    let b = Behaviour::default().bulk("/b").fail_item("x", 422).fail_item("y", 409);
    assert_eq!(b.bulk_path.as_deref(), Some("/b"));
    assert_eq!(b.bulk_item_failures, vec![("x".to_owned(), 422), ("y".to_owned(), 409)]);
}

#[test]
fn json_array_items_splits_on_top_level_commas() {
    let items = |body: &str| {
        json_array_items(body.as_bytes()).map(|rs| rs.into_iter().map(|r| body[r].to_owned()).collect::<Vec<_>>())
    };
    assert_eq!(
        items(BATCH).unwrap(),
        [r#"{"id":"b1","n":1}"#, r#"{"id":"b2","poison":true}"#, r#"{"id":3,"s":"a,]}\"["}"#]
    );
    assert_eq!(items(" [ ] ").unwrap(), Vec::<String>::new());
    assert_eq!(items(r#"[1, "x", [2, {"a": [3]}], null]"#).unwrap(), ["1", r#""x""#, r#"[2, {"a": [3]}]"#, "null"]);
    for bad in ["", "{}", r#"{"id":1}"#, "[1,]", "[1", "1", "not json", "[1] [2]"] {
        assert_eq!(items(bad), None, "{bad:?}");
    }
}

#[tokio::test]
async fn bulk_commits_each_item_and_reports_per_item_results() {
    let p = start(bulk_behaviour(Behaviour::default())).await;
    let r = post_bulk(&p, "batch-1", BATCH).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, BATCH_RESULTS);
    assert_eq!(r.header("idempotent-replayed"), None);

    let effects = p.effects();
    assert_eq!(effects.len(), 2);
    let ids: Vec<_> = effects.iter().map(|e| e.record_id.as_deref()).collect();
    assert_eq!(ids, [Some("b1"), Some("3")]);
    assert_eq!(&effects[0].body[..], br#"{"id":"b1","n":1}"#);
    assert_eq!(&effects[1].body[..], br#"{"id":3,"s":"a,]}\"["}"#);
    for (e, seq) in effects.iter().zip(1..) {
        assert_eq!(e.seq, seq);
        assert_eq!(e.idempotency_key.as_deref(), Some("batch-1"));
        assert_eq!(e.path, BULK);
    }
    assert_eq!(p.effects_by_record(), BTreeMap::from([("b1".to_owned(), 1), ("3".to_owned(), 1)]));
    assert_eq!(p.stats(), Stats { requests: 1, effects: 2, bulk_requests: 1, bulk_items: 2, ..Stats::default() });

    // The same key is replayed verbatim and commits nothing, even with another body.
    let again = post_bulk(&p, "batch-1", r#"[{"id":"other"}]"#).await.unwrap();
    assert_eq!((again.status, again.body.as_str()), (200, BATCH_RESULTS));
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(p.effects().len(), 2);
    assert!(p.double_effects().is_empty());
    let stats = p.stats();
    assert_eq!((stats.requests, stats.replays, stats.bulk_requests, stats.bulk_items), (2, 1, 2, 2));

    // A new key for the same items applies them again: double effects show.
    post_bulk(&p, "batch-2", BATCH).await.unwrap();
    assert_eq!(p.double_effects(), BTreeMap::from([("b1".to_owned(), 2), ("3".to_owned(), 2)]));

    // Other paths are untouched by the bulk endpoint.
    let single = post(&p, Some("k1"), r#"[{"id":"s1"}]"#).await.unwrap();
    assert_eq!(single.body, r#"{"ok":true,"effect":5}"#);
    assert_eq!(p.effects()[4].record_id, None);
    p.shutdown().await;
}

#[tokio::test]
async fn bulk_drop_after_commit_commits_the_items_then_closes() {
    let p = start(bulk_behaviour(Behaviour::script(vec![Reply::DropAfterCommit], Reply::Ok))).await;
    assert!(post_bulk(&p, "batch-1", BATCH).await.is_none(), "no response bytes expected");
    let stats = p.stats();
    assert_eq!((stats.effects, stats.bulk_items, stats.dropped, stats.rejected), (2, 2, 1, 0));

    // The retry gets the stored batch response and applies nothing twice.
    let retry = post_bulk(&p, "batch-1", BATCH).await.unwrap();
    assert_eq!((retry.status, retry.body.as_str()), (200, BATCH_RESULTS));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(p.effects().len(), 2);
    assert!(p.double_effects().is_empty());
}

#[tokio::test]
async fn bulk_slow_after_commit_conflicts_then_answers_and_replays() {
    let delay = Duration::from_secs(2);
    let p = start(bulk_behaviour(Behaviour::script(vec![Reply::SlowAfterCommit(delay)], Reply::Ok))).await;
    let mut slow = TestClient::connect(p.addr()).await;
    slow.send(BULK, &[("Idempotency-Key", "batch-1")], BATCH).await;
    p.wait_until(LIMIT, |s| s.bulk_items == 2).await.expect("items committed before the answer");

    let conflict = post_bulk(&p, "batch-1", BATCH).await.unwrap();
    assert_eq!(conflict.status, 409);
    let r = slow.recv().await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, BATCH_RESULTS));
    let replay = post_bulk(&p, "batch-1", BATCH).await.unwrap();
    assert_eq!((replay.status, replay.body.as_str()), (200, BATCH_RESULTS));
    assert_eq!(p.effects().len(), 2);
}

#[tokio::test]
async fn bulk_body_must_be_a_json_array() {
    let p = start(bulk_behaviour(Behaviour::default())).await;
    for (key, body) in [("k1", r#"{"id":"b1"}"#), ("k2", "not json"), ("k3", "[1,]")] {
        let r = post_bulk(&p, key, body).await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (400, r#"{"error":"a bulk body is a JSON array"}"#), "{body}");
    }
    let stats = p.stats();
    assert_eq!((stats.effects, stats.bulk_items, stats.rejected, stats.bulk_requests), (0, 0, 3, 3));

    // The key was not remembered: a fixed body is processed afresh.
    let r = post_bulk(&p, "k1", r#"[{"id":"b1"}]"#).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"results":[{"status":201}]}"#));
    assert_eq!(r.header("idempotent-replayed"), None);
    // An empty batch is fine and commits nothing.
    let r = post_bulk(&p, "k4", "[]").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"results":[]}"#));
    assert_eq!(p.effects().len(), 1);
}

#[tokio::test]
async fn bulk_whole_batch_failures_commit_nothing() {
    let b =
        bulk_behaviour(Behaviour::script(vec![status(503, r#"{"error":"down"}"#), Reply::DropBeforeCommit], Reply::Ok))
            .fail_body("\"b2\"", status(422, r#"{"error":"bad batch"}"#));
    let p = start(b).await;
    let batch = r#"[{"id":"b1"},{"id":"b3"}]"#;
    let r = post_bulk(&p, "batch-1", batch).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (503, r#"{"error":"down"}"#));
    assert!(post_bulk(&p, "batch-1", batch).await.is_none(), "dropped before commit");
    // by_body matches the whole body: one poisoned record fails the batch.
    let r = post_bulk(&p, "batch-2", BATCH).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (422, r#"{"error":"bad batch"}"#));
    let stats = p.stats();
    assert_eq!((stats.effects, stats.bulk_items, stats.bulk_requests, stats.rejected), (0, 0, 3, 2));

    // The refused key is processed afresh once the partner recovers.
    let r = post_bulk(&p, "batch-1", batch).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"results":[{"status":201},{"status":201}]}"#));
    assert_eq!(p.effects_by_record(), BTreeMap::from([("b1".to_owned(), 1), ("b3".to_owned(), 1)]));
}

#[tokio::test]
async fn bulk_requests_pass_the_request_level_checks_first() {
    let p = start(bulk_behaviour(Behaviour::default().require("x-api-key", "secret"))).await;
    let r = post_bulk(&p, "batch-1", BATCH).await.unwrap();
    assert_eq!(r.status, 400);
    let mut client = TestClient::connect(p.addr()).await;
    client.send(BULK, &[], BATCH).await;
    let r = client.recv().await.unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    client.send(BULK, &[("x-api-key", "secret")], BATCH).await;
    let r = client.recv().await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (400, r#"{"error":"Idempotency-Key header required"}"#));
    let stats = p.stats();
    assert_eq!((stats.effects, stats.missing_key, stats.bulk_requests), (0, 1, 3));
}

// ---------------------------------------------------------------------------
// Change feeds.

const FEED: &str = "/changes";

impl TestClient {
    /// GET `target` with `Host: host` and `headers` on this connection.
    async fn get(&mut self, host: &str, target: &str, headers: &[(&str, &str)]) -> Option<TestResponse> {
        let mut request = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        self.send_raw(request.as_bytes()).await;
        self.recv().await
    }
}

/// GET `target` on a fresh connection, with `Host` naming the partner.
async fn get(p: &Partner, target: &str) -> TestResponse {
    let mut client = TestClient::connect(p.addr()).await;
    client.get(&p.addr().to_string(), target, &[]).await.expect("feed response")
}

fn feed_partner(feed: Feed) -> Behaviour {
    Behaviour::default().feed(FEED, feed)
}

/// Puts records `r<i>` (ids zero-padded) with field `n` into [`FEED`];
/// returns their `updated_at`s.
fn put_records(p: &Partner, range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| p.feed_put(FEED, serde_json::json!({ "id": format!("r{i:02}"), "n": i }))).collect()
}

fn record_ids(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("r{i:02}")).collect()
}

/// The string ids of a JSON array of records.
fn ids(records: &serde_json::Value) -> Vec<String> {
    let records = records.as_array().expect("records are a JSON array");
    records.iter().map(|r| r["id"].as_str().expect("a string id").to_owned()).collect()
}

fn last_updated_at(body: &serde_json::Value) -> String {
    let last = body["data"].as_array().and_then(|d| d.last()).expect("a non-empty page");
    last["updated_at"].as_str().expect("updated_at").to_owned()
}

/// Pages through an [`FeedStyle::UpdatedSince`] feed from `since` on one
/// connection, as a polling client would; returns the pages' ids.
async fn page_updated_since(p: &Partner, since: Option<&str>) -> Vec<Vec<String>> {
    let mut client = TestClient::connect(p.addr()).await;
    let host = p.addr().to_string();
    let mut target = since.map_or(FEED.to_owned(), |s| format!("{FEED}?updated_since={s}"));
    let mut pages = Vec::new();
    loop {
        let r = client.get(&host, &target, &[]).await.expect("feed response");
        assert_eq!(r.status, 200, "{r:?}");
        let body = r.json();
        pages.push(ids(&body["data"]));
        if !body["has_more"].as_bool().expect("has_more") {
            return pages;
        }
        assert!(pages.len() < 100, "the feed makes no progress");
        target = format!("{FEED}?updated_since={}", last_updated_at(&body));
    }
}

/// Ids in first-seen order, each once: what a de-duplicating client keeps.
fn dedup(pages: &[Vec<String>]) -> Vec<String> {
    let mut seen = Vec::new();
    for id in pages.iter().flatten() {
        if !seen.contains(id) {
            seen.push(id.clone());
        }
    }
    seen
}

#[test]
fn feed_builders() {
    assert!(Behaviour::default().feeds.is_empty());
    let b = Behaviour::default().feed("/a", Feed::token(5)).feed("/b", Feed::link(7)).feed("/a", Feed::pages(3));
    assert_eq!(b.feeds, vec![("/a".to_owned(), Feed::pages(3)), ("/b".to_owned(), Feed::link(7))]);
    assert_eq!(
        Feed::updated_since(10),
        Feed { page_size: 10, style: FeedStyle::UpdatedSince { param: "updated_since".into() }, fail_every: None }
    );
    assert_eq!(Feed::token(1).style, FeedStyle::Token { param: "cursor".into() });
    assert_eq!(Feed::pages(1).style, FeedStyle::Page { param: "page".into(), size_param: "per_page".into() });
    let failing = Feed::link(2).fail_every(3, status(503, "{}"));
    assert_eq!(failing.fail_every, Some((3, status(503, "{}"))));
}

#[test]
fn feed_clock_and_rfc3339() {
    assert_eq!(days_from_civil(2026, 1, 1) * 86_400_000, FEED_EPOCH_MS as i64);
    assert_eq!(feed_timestamp(0), FEED_EPOCH);
    assert_eq!(feed_timestamp(1), "2026-01-01T00:00:00.001Z");
    assert_eq!(feed_timestamp(59 * MILLIS_PER_DAY + 3_723_004), "2026-03-01T01:02:03.004Z");
    for tick in [0, 1, 999, 1000, 86_399_999, 400 * MILLIS_PER_DAY + 12_345] {
        let nanos = parse_rfc3339(&feed_timestamp(tick)).unwrap();
        assert_eq!(nanos, i128::from(FEED_EPOCH_MS + tick) * NANOS_PER_MILLI, "{tick}");
        assert_eq!(first_tick_at(nanos), tick);
    }
    for days in (-800_000..800_000).step_by(997) {
        let (y, m, d) = civil_from_days(days);
        assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
    }

    // Against an independent oracle: httpdate's IMF-fixdate parser.
    let unix_nanos = |imf: &str| {
        let t = httpdate::parse_http_date(imf).unwrap().duration_since(UNIX_EPOCH).unwrap();
        i128::from(t.as_secs()) * 1_000_000_000
    };
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(parse_rfc3339("2000-02-29T12:00:00+02:00"), Some(unix_nanos("Tue, 29 Feb 2000 10:00:00 GMT")));
    assert_eq!(parse_rfc3339("2024-12-31 23:30:00-00:45"), Some(unix_nanos("Wed, 01 Jan 2025 00:15:00 GMT")));
    assert_eq!(
        parse_rfc3339("2026-01-01t00:00:01.5z"),
        Some(i128::from(FEED_EPOCH_MS) * NANOS_PER_MILLI + 1_500_000_000)
    );
    assert_eq!(
        parse_rfc3339("2026-01-01T00:00:00.1234567891Z"),
        Some(i128::from(FEED_EPOCH_MS) * NANOS_PER_MILLI + 123_456_789),
        "digits beyond nanoseconds are truncated"
    );
    for bad in [
        "",
        "2026-01-01",
        "2026-01-01T00:00:00",
        "2026-01-01T00:00:00ZZ",
        "2026-01-01T00:00:00.Z",
        "2026-01-01T00:00:00+0100",
        "2026-01-01T00:00:00+01:00x",
        "2026-01-01T00:00:00 01:00",
        "2026-13-01T00:00:00Z",
        "2026-02-29T00:00:00Z",
        "2026-04-31T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:60:00Z",
        "2026-01-01T00:00:00+24:00",
        "2026-01-01X00:00:00Z",
        "+2026-01-01T00:00:00Z",
        "2026-1-01T00:00:00Z",
        "yesterday",
    ] {
        assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
    }

    let epoch = i128::from(FEED_EPOCH_MS) * NANOS_PER_MILLI;
    assert_eq!(first_tick_at(i128::MIN / 2), 0);
    assert_eq!(first_tick_at(epoch + 1), 1, "inclusive: the next tick at or after");
    assert_eq!(first_tick_at(epoch + NANOS_PER_MILLI), 1);
    assert_eq!(first_tick_at(epoch + NANOS_PER_MILLI + 1), 2);
    assert_eq!(first_tick_at(i128::MAX / 2), u64::MAX);
}

#[test]
fn feed_cursors_and_encodings() {
    for (data, encoded) in [(&b""[..], ""), (b"f", "Zg"), (b"fo", "Zm8"), (b"foo", "Zm9v"), (&[0xfb, 0xff], "-_8")] {
        assert_eq!(base64url_encode(data), encoded);
    }
    for (tick, id) in [(0, ""), (17, "r17"), (u64::MAX, "a:b/ü?&=+")] {
        let cursor = encode_cursor(tick, id);
        assert!(cursor.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{cursor}");
        assert_eq!(decode_cursor(&cursor), Some((tick, id.to_owned())));
    }
    for bad in ["", "!!", "Zm9v", "Zm9vOg", "eDox", "MTc6cjE3==", "MTc6cjE3+", "1", "OjE"] {
        assert_eq!(decode_cursor(bad), None, "{bad:?}");
    }
    assert_eq!(percent_encode("r-1.x_~"), "r-1.x_~");
    assert_eq!(percent_encode("a b/c&d=ü"), "a%20b%2Fc%26d%3D%C3%BC");

    let q = |query: &str, name: &str| query_value(Some(query), name);
    assert_eq!(query_value(None, "a"), Ok(None));
    assert_eq!(q("a=1&b=2", "b"), Ok(Some("2".into())));
    assert_eq!(q("x=1&%61=%3A+z", "a"), Ok(Some(": z".into())));
    assert_eq!(q("&&a=1&", "a"), Ok(Some("1".into())));
    assert_eq!(q("b=1&b=2", "a"), Ok(None), "other parameters may repeat");
    assert_eq!(q("a=1&a=1", "a"), Err("repeated a".into()));
    assert_eq!(q("a=", "a"), Err("invalid a".into()));
    assert_eq!(q("a", "a"), Err("invalid a".into()));
    assert_eq!(q("b=%zz&a=1", "a"), Err("malformed query".into()));

    let link = |host: &str| link_authority(&[("host".into(), host.into())], SocketAddr::from(([127, 0, 0, 1], 9)));
    assert_eq!(link("feeds.partner.test:8443"), "feeds.partner.test:8443");
    assert_eq!(link("[::1]:80"), "[::1]:80");
    assert_eq!(link("a>b"), "127.0.0.1:9");
    assert_eq!(link(""), "127.0.0.1:9");
    assert_eq!(link_authority(&[], SocketAddr::from(([127, 0, 0, 1], 9))), "127.0.0.1:9");
}

#[tokio::test]
async fn updated_since_pages_through_all_records_with_an_inclusive_overlap() {
    let p = start(feed_partner(Feed::updated_since(10))).await;
    let stamps = put_records(&p, 1..=25);
    assert_eq!(stamps[0], "2026-01-01T00:00:00.001Z");
    assert_eq!(stamps[24], "2026-01-01T00:00:00.025Z");
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "strictly increasing within one real millisecond");

    let pages = page_updated_since(&p, None).await;
    assert_eq!(pages, [record_ids(1..=10), record_ids(10..=19), record_ids(19..=25)]);
    // The boundary record really comes twice: updated_since is inclusive.
    assert_eq!(pages[1][0], pages[0][9]);
    assert_eq!(pages[2][0], pages[1][9]);
    assert_eq!(dedup(&pages), record_ids(1..=25), "every record exactly once after de-duplication");

    let stats = p.stats();
    assert_eq!(stats, Stats { requests: 3, feed_requests: 3, ..Stats::default() });
    let seen = p.feed_requests(FEED);
    assert_eq!(seen.len(), 3);
    assert_eq!(seen.len(), p.requests().len());
    assert_eq!((seen[0].path_only(), seen[0].query()), (FEED, None));
    assert_eq!(seen[1].query(), Some("updated_since=2026-01-01T00:00:00.010Z"));
    assert_eq!(seen[2].query_param("updated_since").as_deref(), Some(stamps[18].as_str()));
    assert_eq!(seen[2].query_param("cursor"), None);
    p.shutdown().await;
}

#[tokio::test]
async fn updated_since_serves_records_put_while_paging_on_later_pages() {
    let p = start(feed_partner(Feed::updated_since(10))).await;
    put_records(&p, 1..=15);
    let first = get(&p, FEED).await.json();
    assert_eq!(ids(&first["data"]), record_ids(1..=10));
    assert_eq!(first["has_more"], true);
    let watermark = last_updated_at(&first);

    // Meanwhile a record already seen changes, gaining a new field, and new ones arrive.
    let changed = p.feed_put(FEED, serde_json::json!({"id": "r03", "n": 3, "tier": "gold"}));
    put_records(&p, 16..=20);

    let rest = page_updated_since(&p, Some(&watermark)).await;
    let mut expected_second = record_ids(10..=15);
    expected_second.push("r03".into());
    expected_second.extend(record_ids(16..=18));
    assert_eq!(rest, [expected_second, record_ids(18..=20)]);
    let page = get(&p, &format!("{FEED}?updated_since={watermark}")).await.json();
    let r03 = page["data"].as_array().unwrap().iter().find(|r| r["id"] == "r03").unwrap().clone();
    assert_eq!(r03, serde_json::json!({"id": "r03", "n": 3, "tier": "gold", "updated_at": changed}));
    assert!(changed.as_str() > watermark.as_str());

    // The next poll from the last updated_at seen gets just the boundary record...
    let last = p.feed_records(FEED).last().unwrap()["updated_at"].as_str().unwrap().to_owned();
    let poll = get(&p, &format!("{FEED}?updated_since={last}")).await.json();
    assert_eq!((ids(&poll["data"]), &poll["has_more"]), (vec!["r20".to_owned()], &serde_json::json!(false)));
    // ...and, once something changed, that too.
    put_records(&p, 21..=21);
    let poll = get(&p, &format!("{FEED}?updated_since={last}")).await.json();
    assert_eq!(ids(&poll["data"]), ["r20", "r21"]);
    assert_eq!(p.feed_records(FEED).len(), 21, "r03 was replaced, not added");
}

#[tokio::test]
async fn updated_since_accepts_rfc3339_forms_and_refuses_malformed_ones() {
    let p = start(feed_partner(Feed::updated_since(100))).await;
    put_records(&p, 1..=10);
    let from = async |since: &str| {
        let r = get(&p, &format!("{FEED}?updated_since={since}")).await;
        assert_eq!(r.status, 200, "{since}: {r:?}");
        ids(&r.json()["data"])
    };
    for since in [
        "2026-01-01T00:00:00.005Z",
        "2026-01-01T00%3A00%3A00.005Z",
        "2026-01-01T01:00:00.005%2B01:00",
        "2025-12-31T23:00:00.005-01:00",
        "2026-01-01T00:00:00.0041Z",
        "2026-01-01t00:00:00.005z",
    ] {
        assert_eq!(from(since).await, record_ids(5..=10), "{since}");
    }
    assert_eq!(from("0001-01-01T00:00:00Z").await, record_ids(1..=10));
    assert_eq!(from("2026-01-01T00:00:00Z").await, record_ids(1..=10));
    assert_eq!(from("2030-01-01T00:00:00Z").await, Vec::<String>::new());
    let ignored = get(&p, &format!("{FEED}?status=open&updated_since=2026-01-01T00:00:00.009Z&sort=desc")).await;
    assert_eq!(ids(&ignored.json()["data"]), record_ids(9..=10), "unknown parameters are ignored");

    for (query, error) in [
        // A bare `+` is a space once form-decoded.
        ("updated_since=2026-01-01T01:00:00.005+01:00", "invalid updated_since"),
        ("updated_since=yesterday", "invalid updated_since"),
        ("updated_since=2026-02-30T00:00:00Z", "invalid updated_since"),
        ("updated_since=2026-01-01T00:00:00", "invalid updated_since"),
        ("updated_since=", "invalid updated_since"),
        ("updated_since=2026-01-01T00:00:00Z&updated_since=2026-01-01T00:00:00Z", "repeated updated_since"),
        ("x=%G0&updated_since=2026-01-01T00:00:00Z", "malformed query"),
    ] {
        let r = get(&p, &format!("{FEED}?{query}")).await;
        assert_eq!((r.status, r.json()), (400, serde_json::json!({ "error": error })), "{query}");
    }
    let stats = p.stats();
    assert_eq!((stats.feed_requests, stats.rejected, stats.effects), (17, 7, 0));
}

#[tokio::test]
async fn token_pages_through_all_records_exactly_once_with_opaque_cursors() {
    let p = start(feed_partner(Feed::token(10))).await;
    put_records(&p, 1..=25);
    let mut client = TestClient::connect(p.addr()).await;
    let host = p.addr().to_string();
    let mut target = FEED.to_owned();
    let (mut pages, mut cursors) = (Vec::new(), Vec::new());
    loop {
        let r = client.get(&host, &target, &[]).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let body = r.json();
        assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
        pages.push(ids(&body["data"]));
        let Some(cursor) = body["next_cursor"].as_str() else {
            assert!(body["next_cursor"].is_null());
            break;
        };
        assert!(!cursor.contains("r1") && !cursor.contains(':'), "the cursor is opaque: {cursor}");
        cursors.push(cursor.to_owned());
        target = format!("{FEED}?cursor={cursor}");
        assert!(pages.len() < 100, "no progress");
    }
    assert_eq!(pages, [record_ids(1..=10), record_ids(11..=20), record_ids(21..=25)]);
    assert_eq!(pages.concat(), record_ids(1..=25), "every record exactly once, no overlap");
    let seen = p.feed_requests(FEED);
    assert_eq!(seen[0].query(), None, "the first page is asked for without the cursor");
    assert_eq!(seen[2].query_param("cursor").as_ref(), Some(&cursors[1]));

    // Resuming from the last cursor re-reads the last page and, since the
    // cursor is a position, sees what changed meanwhile and skips nothing.
    p.feed_put(FEED, serde_json::json!({"id": "r05", "n": 5, "again": true}));
    put_records(&p, 26..=26);
    let resumed = get(&p, &format!("{FEED}?cursor={}", cursors[1])).await.json();
    let mut expected = record_ids(21..=25);
    expected.extend(["r05".to_owned(), "r26".to_owned()]);
    assert_eq!((ids(&resumed["data"]), &resumed["next_cursor"]), (expected, &serde_json::Value::Null));

    for cursor in ["bogus!", "Zm9v", "", "MTc6cjE3%3D"] {
        let r = get(&p, &format!("{FEED}?cursor={cursor}")).await;
        assert_eq!((r.status, r.json()), (400, serde_json::json!({"error": "invalid cursor"})), "{cursor:?}");
    }
    assert_eq!(p.stats().feed_requests, 8);
}

#[tokio::test]
async fn page_style_pages_with_total_pages_and_caps_per_page() {
    let p = start(feed_partner(Feed::pages(10)).feed("/empty", Feed::pages(10))).await;
    put_records(&p, 1..=25);
    let page = async |query: &str| {
        let r = get(&p, &format!("{FEED}{query}")).await;
        assert_eq!(r.status, 200, "{query}: {r:?}");
        let body = r.json();
        assert_eq!(body.as_object().unwrap().len(), 3, "{body}");
        (ids(&body["data"]), body["page"].as_u64().unwrap(), body["total_pages"].as_u64().unwrap())
    };
    assert_eq!(page("").await, (record_ids(1..=10), 1, 3));
    let mut all = Vec::new();
    for n in 1..=3 {
        let (records, number, total) = page(&format!("?page={n}")).await;
        assert_eq!((number, total), (n, 3));
        all.extend(records);
    }
    assert_eq!(all, record_ids(1..=25), "every record exactly once");
    assert_eq!(page("?page=3").await.0, record_ids(21..=25));
    assert_eq!(page("?page=4").await, (vec![], 4, 3));
    assert_eq!(page("?page=2&per_page=5").await, (record_ids(6..=10), 2, 5));
    assert_eq!(page("?per_page=100").await, (record_ids(1..=10), 1, 3), "per_page is capped at the page size");
    assert_eq!(page(&format!("?page={}", usize::MAX)).await.0, Vec::<String>::new());

    let empty = get(&p, "/empty").await;
    assert_eq!(empty.json(), serde_json::json!({"data": [], "page": 1, "total_pages": 0}));
    for (query, error) in [
        ("page=0", "invalid page"),
        ("page=-1", "invalid page"),
        ("page=two", "invalid page"),
        ("page=99999999999999999999999", "invalid page"),
        ("per_page=0", "invalid per_page"),
        ("page=1&page=2", "repeated page"),
    ] {
        let r = get(&p, &format!("{FEED}?{query}")).await;
        assert_eq!((r.status, r.json()), (400, serde_json::json!({ "error": error })), "{query}");
    }
}

/// The URL of a `Link: <url>; rel="next"` header, checking its form.
fn next_link(r: &TestResponse) -> Option<String> {
    let value = r.header("link")?;
    let (url, params) = value.strip_prefix('<').and_then(|v| v.split_once('>')).expect("Link: <url>; ...");
    assert_eq!(params, r#"; rel="next""#, "{value}");
    assert!(url.starts_with("http://") && !url.contains([' ', '<', '>', '"']), "{url}");
    Some(url.to_owned())
}

#[tokio::test]
async fn link_style_sends_absolute_next_links_until_the_last_page() {
    let p = start(feed_partner(Feed::link(10)).feed("/odd", Feed::link(1))).await;
    put_records(&p, 1..=25);
    let origin = format!("http://{}", p.addr());
    let mut client = TestClient::connect(p.addr()).await;
    let host = p.addr().to_string();
    let mut target = FEED.to_owned();
    let (mut pages, mut links) = (Vec::new(), Vec::new());
    loop {
        let r = client.get(&host, &target, &[]).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        pages.push(ids(&r.json()));
        let Some(url) = next_link(&r) else { break };
        target = url.strip_prefix(&origin).expect("a link to the partner itself").to_owned();
        links.push(url);
        assert!(pages.len() < 100, "no progress");
    }
    assert_eq!(pages, [record_ids(1..=10), record_ids(11..=20), record_ids(21..=25)]);
    assert_eq!(pages.concat(), record_ids(1..=25), "every record exactly once");
    assert_eq!(links, [format!("{origin}{FEED}?after=r10"), format!("{origin}{FEED}?after=r20")]);

    // The link names the host the client used.
    let mut other = TestClient::connect(p.addr()).await;
    let r = other.get("feeds.partner.test:8443", FEED, &[]).await.unwrap();
    assert_eq!(r.header("link"), Some(r#"<http://feeds.partner.test:8443/changes?after=r10>; rel="next""#));

    // Ids are percent-encoded in the link; numeric ids are fine too.
    p.feed_put("/odd", serde_json::json!({"id": "a b/ü&x", "v": 1}));
    p.feed_put("/odd", serde_json::json!({"id": 7, "v": 2}));
    let first = get(&p, "/odd").await;
    assert_eq!(first.json(), serde_json::json!([{"id": "a b/ü&x", "v": 1, "updated_at": "2026-01-01T00:00:00.026Z"}]));
    let url = next_link(&first).unwrap();
    assert_eq!(url, format!("{origin}/odd?after=a%20b%2F%C3%BC%26x"));
    let second = get(&p, url.strip_prefix(&origin).unwrap()).await;
    assert_eq!(second.json()[0]["id"], 7);
    assert_eq!(next_link(&second), None, "no link on the last page");

    let r = get(&p, &format!("{FEED}?after=nope")).await;
    assert_eq!((r.status, r.json()), (400, serde_json::json!({"error": "unknown after"})));
}

#[tokio::test]
async fn fail_every_answers_every_nth_feed_request_with_the_reply() {
    let throttled = Reply::RetryAfter { status: 429, value: "1".into() };
    let p = start(feed_partner(Feed::updated_since(10).fail_every(3, throttled))).await;
    put_records(&p, 1..=25);

    // A client that retries the same request after a refusal still gets everything.
    let mut client = TestClient::connect(p.addr()).await;
    let host = p.addr().to_string();
    let (mut target, mut pages, mut refusals) = (FEED.to_owned(), Vec::new(), Vec::new());
    loop {
        let r = client.get(&host, &target, &[]).await.unwrap();
        if r.status != 200 {
            refusals.push(r);
            continue;
        }
        let body = r.json();
        pages.push(ids(&body["data"]));
        if body["has_more"] == false {
            break;
        }
        target = format!("{FEED}?updated_since={}", last_updated_at(&body));
    }
    assert_eq!(dedup(&pages), record_ids(1..=25));
    assert_eq!(refusals.len(), 1, "the third of four requests");
    assert_eq!((refusals[0].status, refusals[0].body.as_str()), (429, r#"{"error":"try again later"}"#));
    assert_eq!(refusals[0].header("retry-after"), Some("1"));
    let stats = p.stats();
    assert_eq!((stats.feed_requests, stats.rejected, stats.effects), (4, 1, 0));

    // A changed feed starts counting afresh; an equal one keeps counting.
    let unavailable = Feed::updated_since(10).fail_every(2, status(503, r#"{"error":"maintenance"}"#));
    p.set_behaviour(feed_partner(unavailable.clone()));
    let statuses = async |n: usize| {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(get(&p, FEED).await.status);
        }
        out
    };
    assert_eq!(statuses(3).await, [200, 503, 200]);
    assert_eq!(get(&p, FEED).await.body, r#"{"error":"maintenance"}"#);
    p.set_behaviour(feed_partner(unavailable));
    assert_eq!(statuses(2).await, [200, 503], "the count went on");
    assert_eq!(p.feed_records(FEED).len(), 25, "set_behaviour keeps the records");

    // Drops close the connection without a byte.
    p.set_behaviour(feed_partner(Feed::updated_since(10).fail_every(1, Reply::DropBeforeCommit)));
    let mut dropped = TestClient::connect(p.addr()).await;
    assert!(dropped.get(&host, FEED, &[]).await.is_none());
    assert_eq!(p.stats().dropped, 1);

    // A slow reply serves the page late, with the rate limit headers as usual.
    let delay = Duration::from_millis(50);
    let slow = Feed::updated_since(10).fail_every(1, Reply::SlowAfterCommit(delay));
    let advertised = RateLimit { advertise: true, ..limit(HOURLY, 100) };
    p.set_behaviour(Behaviour { rate_limit: Some(advertised), ..feed_partner(slow) });
    let started = Instant::now();
    let r = get(&p, FEED).await;
    assert!(started.elapsed() >= delay);
    assert_eq!((r.status, ids(&r.json()["data"])), (200, record_ids(1..=10)));
    assert_eq!(r.header("ratelimit-remaining"), Some("99"));
    assert_eq!(p.stats().effects, 0, "a feed never commits");
}

#[tokio::test]
async fn feed_requests_pass_the_request_checks_but_need_no_idempotency_key() {
    let feed = Feed::updated_since(10).fail_every(2, status(503, "{}"));
    let p = start(Behaviour::default().require("x-api-key", "secret").feed(FEED, feed)).await;
    p.feed_put(FEED, serde_json::json!({"id": 1}));
    let host = p.addr().to_string();
    let mut client = TestClient::connect(p.addr()).await;
    let key = [("x-api-key", "secret")];

    let r = client.get(&host, FEED, &[]).await.unwrap();
    assert_eq!(r.status, 400, "required header first: {r:?}");
    let r = client.get(&host, FEED, &key).await.unwrap();
    assert_eq!((r.status, r.json()["data"][0]["id"].clone()), (200, serde_json::json!(1)), "the refusal did not count");
    assert_eq!(client.get(&host, FEED, &key).await.unwrap().status, 503);

    // Other methods on the feed path, and other paths, are the usual API.
    client.send_raw(&raw_request("POST", FEED, &[("x-api-key", "secret"), ("Idempotency-Key", "k1")], "{}")).await;
    assert_eq!(client.recv().await.unwrap().body, r#"{"ok":true,"effect":1}"#);
    let r = client.get(&host, "/other", &key).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (400, MISSING_KEY_BODY));

    let stats = p.stats();
    assert_eq!((stats.requests, stats.feed_requests, stats.effects, stats.rejected), (5, 3, 1, 3));
    assert_eq!(p.feed_requests(FEED).len(), 3, "only the GETs");
}

#[tokio::test]
async fn feed_records_keep_every_field_but_the_server_owns_updated_at() {
    let p = start(Behaviour::default()).await;
    let t1 =
        p.feed_put(FEED, serde_json::json!({"id": "a", "updated_at": "1999-01-01T00:00:00Z", "x": {"y": [1, null]}}));
    let t2 = p.feed_put(FEED, serde_json::json!({"id": 7, "name": "seven"}));
    // Half-way through, the partner starts sending a new field.
    let t3 = p.feed_put(FEED, serde_json::json!({"id": "7", "name": "seven", "tier": "gold"}));
    let stamps = ["2026-01-01T00:00:00.001Z", "2026-01-01T00:00:00.002Z", "2026-01-01T00:00:00.003Z"];
    assert_eq!([t1.as_str(), t2.as_str(), t3.as_str()], stamps);
    let expected = serde_json::json!([
        {"id": "a", "updated_at": t1, "x": {"y": [1, null]}},
        {"id": "7", "name": "seven", "tier": "gold", "updated_at": t3},
    ]);
    assert_eq!(serde_json::Value::Array(p.feed_records(FEED)), expected, "7 and \"7\" are one record");

    // Records put before the feed was configured are served once it is.
    assert_eq!(get(&p, FEED).await.status, 400, "no feed yet: the usual API wants a key");
    p.set_behaviour(feed_partner(Feed::updated_since(10)));
    assert_eq!(get(&p, FEED).await.json(), serde_json::json!({"data": expected, "has_more": false}));
    assert_eq!(p.stats().feed_requests, 1);
}

#[tokio::test]
#[should_panic(expected = "a feed record is a JSON object with a string or number \"id\"")]
async fn feed_put_needs_an_id() {
    let p = start(Behaviour::default()).await;
    p.feed_put(FEED, serde_json::json!({"name": "no id"}));
}
