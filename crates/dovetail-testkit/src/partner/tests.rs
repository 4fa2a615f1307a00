//! Tests for the fake partner, driven by a tiny raw-TCP HTTP/1.1 client.
//!
//! Nothing here relies on timing except through generous upper bounds
//! ([`LIMIT`]) that only trip when something hangs.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
