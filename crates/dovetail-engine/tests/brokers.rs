//! NATS JetStream and RabbitMQ as sources and sinks, against the real
//! services: NATS on 127.0.0.1:4222 (`DOVETAIL_TEST_NATS` overrides) and
//! RabbitMQ on 127.0.0.1:5672 as guest (`DOVETAIL_TEST_AMQP`). Without them
//! a test says so and passes, except under CI=true.
//!
//! Every test makes its own stream, consumer, subjects and queues (named
//! after the process and the clock) and removes them at the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_connectors::amqp::amqprs::channel::{
    BasicGetArguments, BasicPublishArguments, Channel, QueueDeclareArguments, QueueDeleteArguments,
};
use dovetail_connectors::amqp::amqprs::connection::{Connection, OpenConnectionArguments};
use dovetail_connectors::amqp::amqprs::{self, BasicProperties};
use dovetail_connectors::amqp::{AmqpSink, connection_arguments};
use dovetail_connectors::http::Outbound;
use dovetail_connectors::nats::async_nats::jetstream::{self, consumer::pull, stream};
use dovetail_connectors::nats::{NatsSink, async_nats};
use dovetail_core::config::{self, Secret};
use dovetail_core::policy::{Answer, ServiceAnswer};
use dovetail_engine::{EngineOptions, RunningEngine};
use dovetail_journal::{Journal, SqliteJournal, SqliteOptions};
use dovetail_testkit::partner::{Behaviour, Partner};

fn nats_url() -> String {
    std::env::var("DOVETAIL_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

fn amqp_url() -> String {
    std::env::var("DOVETAIL_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

fn unreachable(what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what}");
    }
    eprintln!("skipped: {what}");
}

async fn nats() -> Option<jetstream::Context> {
    let connect = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2));
    match async_nats::connect_with_options(nats_url(), connect).await {
        Ok(client) => Some(jetstream::new(client)),
        Err(e) => {
            unreachable(&format!("NATS is not reachable at {} ({e})", nats_url()));
            None
        }
    }
}

/// A connection and a channel to RabbitMQ, for the test's own use.
async fn rabbit() -> Option<(Connection, Channel)> {
    let arguments: OpenConnectionArguments = connection_arguments(&Secret::new(amqp_url()), "dovetail tests").unwrap();
    let opened = async {
        let connection = Connection::open(&arguments).await?;
        let channel = connection.open_channel(None).await?;
        Ok::<_, amqprs::error::Error>((connection, channel))
    };
    match tokio::time::timeout(Duration::from_secs(5), opened).await {
        Ok(Ok(opened)) => Some(opened),
        Ok(Err(e)) => {
            unreachable(&format!("RabbitMQ is not reachable at {} ({e})", config::without_credentials(&amqp_url())));
            None
        }
        Err(_) => {
            unreachable(&format!("RabbitMQ did not answer at {}", config::without_credentials(&amqp_url())));
            None
        }
    }
}

/// Different on every run: names of streams, subjects and queues.
fn unique() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{:x}{:08x}", std::process::id(), nanos)
}

async fn until(what: &str, deadline: Instant, mut probe: impl AsyncFnMut() -> bool) {
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The engine on `text`, with `env:MQ_URL` resolved to RabbitMQ's URL.
async fn start(text: &str, journal: &Arc<SqliteJournal>, dir: &std::path::Path) -> RunningEngine {
    let (loaded, _) = config::load(text, &dir.join("dovetail.toml")).unwrap();
    let resolved = loaded.resolve(&BTreeMap::from([("MQ_URL".to_string(), amqp_url())])).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = EngineOptions { idle_poll: Duration::from_millis(50), ..EngineOptions::default() };
    dovetail_engine::start(&loaded.config, &resolved, journal.clone(), listener, options).await.unwrap()
}

fn json_out<'a>(payload: &'a [u8], key: &'a str) -> Outbound<'a> {
    Outbound { payload, content_type: Some("application/json"), idempotency_key: key, correlation_id: "corr-test" }
}

/// Valid orders (three named by `Nats-Msg-Id`, one published twice) and
/// one body that is not JSON, in a stream made after the engine started:
/// all delivered once, the bad one quarantined, the consumer left with
/// nothing pending. A restart with the consumer deleted (so JetStream hands
/// out every message again, as after a crash before the acks) delivers
/// only what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_source_journals_each_message_once_then_acks_it() {
    let Some(js) = nats().await else { return };
    dovetail_connectors::http::install_crypto_provider();
    let id = unique();
    let (name, consumer, subject) = (format!("DT_SRC_{id}"), format!("dovetail_{id}"), format!("dt.{id}.orders"));
    let partner = Partner::start(Behaviour::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[engine]
listen = "127.0.0.1:0"

[connectors.erp]
type = "http"
base_url = "{partner}"

[connectors.bus]
type = "nats"
url = "{nats}"

[flows.orders]
source = {{ type = "nats", connector = "bus", stream = "{name}", consumer = "{consumer}", subject = "{subject}", ack_wait = "5s" }}
key = ".id"
sink = {{ type = "http", connector = "erp", path = "/v1/orders" }}
"#,
        partner = partner.url(),
        nats = nats_url(),
    );
    let journal = Arc::new(SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap());
    // Started before the stream exists: the source waits for it.
    let engine = start(&text, &journal, dir.path()).await;

    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("dt.{id}.>")],
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = async |body: &str, msg_id: Option<&str>| {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(m) = msg_id {
            headers.insert("Nats-Msg-Id", m);
        }
        js.publish_with_headers(subject.clone(), headers, body.to_string().into()).await.unwrap().await.unwrap()
    };
    publish(r#"{"id": "n1"}"#, Some("order-n1")).await;
    publish(r#"{"id": "n2"}"#, Some("order-n2")).await;
    assert!(publish(r#"{"id": "n2"}"#, Some("order-n2")).await.duplicate, "JetStream drops the same id");
    publish(r#"{"id": "n3"}"#, Some("order-n3")).await;
    publish(r#"{"id": "n4"}"#, None).await;
    publish("this is not JSON", None).await;
    publish(r#"{"id": "n5"}"#, None).await;
    // Another subject of the stream, outside the flow's filter.
    js.publish(format!("dt.{id}.other"), r#"{"id": "x"}"#.into()).await.unwrap().await.unwrap();

    let stream = js.get_stream(&name).await.unwrap();
    let settled = async |wanted: usize| {
        // The engine creates the consumer when its source starts.
        let Ok(consumer) = stream.get_consumer::<pull::Config>(&consumer).await else { return false };
        let info = consumer.get_info().await.unwrap();
        partner.effects().len() == wanted && info.num_pending == 0 && info.num_ack_pending == 0
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    until("five deliveries and an empty consumer", deadline, async || settled(5).await).await;
    let by_record = partner.effects_by_record();
    assert_eq!(by_record.keys().map(String::as_str).collect::<Vec<_>>(), ["n1", "n2", "n3", "n4", "n5"]);
    assert!(partner.double_effects().is_empty(), "{:?}", partner.double_effects());
    let dead = journal.dead_letters(Some("orders"), 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let bad = journal.record(dead[0].id).await.unwrap().unwrap();
    assert_eq!(bad.payload, b"this is not JSON", "the raw message is kept");
    assert!(bad.delivery_id.as_deref().is_some_and(|d| d.starts_with(&format!("nats:{name}:5:"))), "{bad:?}");
    engine.shutdown().await;

    // Every message again, as if no ack had reached JetStream.
    stream.delete_consumer(&consumer).await.unwrap();
    let engine = start(&text, &journal, dir.path()).await;
    publish(r#"{"id": "n6"}"#, None).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    until("the new message and an empty consumer", deadline, async || settled(6).await).await;
    assert!(
        partner.double_effects().is_empty(),
        "redelivered messages were sent again: {:?}",
        partner.double_effects()
    );
    // The partner has the effect before its attempt is journalled; shutting
    // down journals every attempt that was sent.
    engine.shutdown().await;
    let counts = journal.counts().await.unwrap().into_iter().find(|c| c.flow == "orders").unwrap();
    assert_eq!((counts.delivered, counts.quarantined), (6, 1), "{counts:?}");
    js.delete_stream(&name).await.unwrap();
}

/// Webhooks out to a JetStream subject, each once, with its key as
/// `Nats-Msg-Id`; the same key published again is a duplicate JetStream
/// drops, answered as applied; a subject no stream captures is unavailable
/// (retried: JetStream may be restarting), with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sink_publishes_each_record_once() {
    let Some(js) = nats().await else { return };
    dovetail_connectors::http::install_crypto_provider();
    let id = unique();
    let name = format!("DT_SINK_{id}");
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("dts.{id}.>")],
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[engine]
listen = "127.0.0.1:0"

[connectors.bus]
type = "nats"
url = "{nats}"
timeout = "5s"

[flows.accepted]
source = {{ type = "webhook", path = "/hooks/accepted" }}
sink = {{ type = "nats", connector = "bus", subject = "dts.{id}.accepted" }}
"#,
        nats = nats_url(),
    );
    let journal = Arc::new(SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap());
    let engine = start(&text, &journal, dir.path()).await;
    let http = reqwest::Client::new();
    for n in 1..=3 {
        let response = http
            .post(format!("http://{}/hooks/accepted", engine.addr))
            .header("content-type", "application/json")
            .header("x-correlation-id", format!("corr-{n}"))
            .body(format!(r#"{{"id": "a{n}"}}"#))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }
    let mut stream = js.get_stream(&name).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    until("three records delivered", deadline, async || {
        let counts = journal.counts().await.unwrap();
        counts.iter().any(|c| c.flow == "accepted" && c.delivered == 3)
    })
    .await;
    assert_eq!(stream.info().await.unwrap().state.messages, 3);
    // Records without a key go out concurrently: in any order.
    let mut seen = Vec::new();
    for sequence in 1..=3 {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let key = message.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string()).unwrap();
        assert!(key.starts_with("dt1-"), "{key}");
        let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        let n = body["id"].as_str().and_then(|id| id.strip_prefix('a')).unwrap().to_string();
        assert_eq!(message.headers.get("X-Correlation-ID").map(|v| v.as_str()), Some(format!("corr-{n}").as_str()));
        seen.push((n, key));
    }
    seen.sort();
    let records: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(records, ["1", "2", "3"], "each record once");
    let mut keys: Vec<&str> = seen.iter().map(|(_, k)| k.as_str()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 3, "one key per record");
    engine.shutdown().await;

    // A retry after a lost PubAck: the same key again.
    let sink = NatsSink::new("bus", Secret::new(nats_url()), &format!("dts.{id}.direct"), Duration::from_secs(5));
    let first = sink.send(json_out(br#"{"id": "d1"}"#, "dt1-direct-key")).await;
    assert_eq!(first.answer, Answer::Service(ServiceAnswer::Applied), "{first:?}");
    assert_ne!(first.detail.as_deref(), Some("duplicate"));
    let again = sink.send(json_out(br#"{"id": "d1"}"#, "dt1-direct-key")).await;
    assert_eq!(again.answer, Answer::Service(ServiceAnswer::Applied), "{again:?}");
    assert_eq!(again.detail.as_deref(), Some("duplicate"));
    assert_eq!(stream.info().await.unwrap().state.messages, 4, "the retry was dropped by JetStream");

    let nowhere = NatsSink::new("bus", Secret::new(nats_url()), &format!("nowhere.{id}"), Duration::from_secs(5));
    let missing = nowhere.send(json_out(b"{}", "dt1-nowhere")).await;
    assert_eq!(missing.answer, Answer::Service(ServiceAnswer::Unavailable), "{missing:?}");
    assert!(missing.detail.as_deref().is_some_and(|d| d.contains("no JetStream stream captures")), "{missing:?}");

    let down = NatsSink::new("bus", Secret::new("nats://127.0.0.1:1".into()), "x", Duration::from_secs(2));
    assert_eq!(down.send(json_out(b"{}", "dt1-down")).await.answer, Answer::Connection);
    js.delete_stream(&name).await.unwrap();
}

async fn declare(channel: &Channel, queue: &str) {
    channel.queue_declare(QueueDeclareArguments::new(queue)).await.unwrap();
}

/// Ready messages and consumers of `queue` (a passive declare).
async fn queue_state(channel: &Channel, queue: &str) -> (u32, u32) {
    let mut arguments = QueueDeclareArguments::new(queue);
    arguments.passive(true);
    let (_, messages, consumers) = channel.queue_declare(arguments.finish()).await.unwrap().unwrap();
    (messages, consumers)
}

async fn publish_to_queue(channel: &Channel, queue: &str, body: &str, message_id: Option<&str>) {
    let mut properties = BasicProperties::default();
    if let Some(m) = message_id {
        properties.with_message_id(m);
    }
    channel
        .basic_publish(properties.finish(), body.as_bytes().to_vec(), BasicPublishArguments::new("", queue))
        .await
        .unwrap();
}

/// Messages of a queue declared after the engine started (some with
/// `message_id`, one not JSON), each delivered once and acked: with the
/// engine stopped, nothing is left to requeue. Messages without
/// `message_id` are named by nothing of their own: two with the same body
/// (a status going active, inactive, active) are two records, both
/// delivered. A copy published again with its `message_id` (as a crash
/// between journal and ack redelivers it) is a duplicate, and a restart
/// delivers only what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbit_source_journals_each_message_once_then_acks_it() {
    let Some((_connection, channel)) = rabbit().await else { return };
    dovetail_connectors::http::install_crypto_provider();
    let queue = format!("dovetail-test-src-{}", unique());

    let partner = Partner::start(Behaviour::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[engine]
listen = "127.0.0.1:0"

[connectors.erp]
type = "http"
base_url = "{partner}"

[connectors.mq]
type = "amqp"
url = "env:MQ_URL"

[flows.orders]
source = {{ type = "amqp", connector = "mq", queue = "{queue}", prefetch = 3 }}
key = ".id"
sink = {{ type = "http", connector = "erp", path = "/v1/orders" }}
"#,
        partner = partner.url(),
    );
    let journal = Arc::new(SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap());
    // Started before the queue exists: the source waits for it.
    let engine = start(&text, &journal, dir.path()).await;
    declare(&channel, &queue).await;
    publish_to_queue(&channel, &queue, r#"{"id": "r1"}"#, Some("order-r1")).await;
    publish_to_queue(&channel, &queue, r#"{"id": "r2"}"#, Some("order-r2")).await;
    publish_to_queue(&channel, &queue, r#"{"id": "r3"}"#, None).await;
    publish_to_queue(&channel, &queue, "not JSON either", None).await;
    publish_to_queue(&channel, &queue, r#"{"id": "r4"}"#, None).await;
    for status in ["active", "inactive", "active"] {
        publish_to_queue(&channel, &queue, &format!(r#"{{"id": "s1", "status": "{status}"}}"#), None).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    until("seven deliveries", deadline, async || partner.effects().len() == 7).await;
    let mut statuses: Vec<String> = partner
        .effects()
        .iter()
        .filter(|e| e.record_id.as_deref() == Some("s1"))
        .map(|e| serde_json::from_slice::<serde_json::Value>(&e.body).unwrap()["status"].as_str().unwrap().to_string())
        .collect();
    statuses.sort();
    assert_eq!(statuses, ["active", "active", "inactive"], "the same body again is delivered again");
    let dead = journal.dead_letters(Some("orders"), 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(journal.record(dead[0].id).await.unwrap().unwrap().payload, b"not JSON either");
    engine.shutdown().await;
    // Whatever the engine had not acked goes back to the queue once its consumer is gone.
    until("the engine's consumer to go", deadline, async || queue_state(&channel, &queue).await.1 == 0).await;
    assert_eq!(queue_state(&channel, &queue).await.0, 0, "every message was acked");

    publish_to_queue(&channel, &queue, r#"{"id": "r1"}"#, Some("order-r1")).await;
    publish_to_queue(&channel, &queue, r#"{"id": "r5"}"#, None).await;
    let engine = start(&text, &journal, dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    until("the new message", deadline, async || partner.effects().len() == 8).await;
    until("the queue to drain", deadline, async || queue_state(&channel, &queue).await.0 == 0).await;
    assert_eq!(
        partner.double_effects(),
        BTreeMap::from([("s1".to_string(), 3)]),
        "only the three s1 messages share a record id; the redelivered r1 was not sent again"
    );
    engine.shutdown().await;
    let counts = journal.counts().await.unwrap().into_iter().find(|c| c.flow == "orders").unwrap();
    assert_eq!((counts.delivered, counts.quarantined), (8, 1), "{counts:?}");
    channel.queue_delete(QueueDeleteArguments::new(&queue)).await.unwrap();
}

/// Publishes with confirms: a routed message is applied and sits in the
/// queue with the record's key as `message_id`, persistent; many senders at
/// once each get their own confirm; a routing key no queue is bound to is
/// refused, and so is an exchange that does not exist, after which the sink
/// opens a new channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_sink_confirms_routed_messages_and_refuses_unroutable_ones() {
    let Some((_connection, channel)) = rabbit().await else { return };
    let id = unique();
    let queue = format!("dovetail-test-sink-{id}");
    declare(&channel, &queue).await;
    let timeout = Duration::from_secs(5);
    let sink = Arc::new(AmqpSink::new("mq", Secret::new(amqp_url()), "", &queue, timeout));

    let first = sink.send(json_out(br#"{"id": "q1"}"#, "dt1-amqp-key")).await;
    assert_eq!(first.answer, Answer::Service(ServiceAnswer::Applied), "{first:?}");
    let got = channel.basic_get(BasicGetArguments::new(&queue).no_ack(true).finish()).await.unwrap();
    let (_, properties, body) = got.expect("the message is in the queue");
    assert_eq!(body, br#"{"id": "q1"}"#);
    assert_eq!(properties.message_id().map(String::as_str), Some("dt1-amqp-key"));
    assert_eq!(properties.correlation_id().map(String::as_str), Some("corr-test"));
    assert_eq!(properties.content_type().map(String::as_str), Some("application/json"));
    assert_eq!(properties.delivery_mode(), Some(amqprs::DELIVERY_MODE_PERSISTENT));

    let mut senders = tokio::task::JoinSet::new();
    for n in 0..20 {
        let sink = sink.clone();
        senders.spawn(async move {
            let body = format!(r#"{{"id": "c{n}"}}"#);
            sink.send(json_out(body.as_bytes(), &format!("dt1-c{n}"))).await.answer
        });
    }
    while let Some(answer) = senders.join_next().await {
        assert_eq!(answer.unwrap(), Answer::Service(ServiceAnswer::Applied));
    }
    assert_eq!(queue_state(&channel, &queue).await.0, 20);

    let unbound = AmqpSink::new("mq", Secret::new(amqp_url()), "", &format!("nobody-{id}"), timeout);
    for _ in 0..2 {
        let refused = unbound.send(json_out(b"{}", "dt1-unroutable")).await;
        assert_eq!(refused.answer, Answer::Service(ServiceAnswer::Refused), "{refused:?}");
        assert!(refused.detail.as_deref().is_some_and(|d| d.contains("unroutable")), "{refused:?}");
    }

    let missing = AmqpSink::new("mq", Secret::new(amqp_url()), &format!("no-exchange-{id}"), "x", timeout);
    for _ in 0..2 {
        let refused = missing.send(json_out(b"{}", "dt1-no-exchange")).await;
        assert_eq!(refused.answer, Answer::Service(ServiceAnswer::Refused), "{refused:?}");
        assert!(refused.detail.as_deref().is_some_and(|d| d.contains("404")), "{refused:?}");
    }

    let wrong = AmqpSink::new("mq", Secret::new("amqp://guest:wrong@127.0.0.1:5672/%2f".into()), "", &queue, timeout);
    let failed = wrong.send(json_out(b"{}", "dt1-wrong")).await;
    // RabbitMQ drops the connection without saying why: a connection failure, with a hint.
    assert_eq!(failed.answer, Answer::Connection, "{failed:?}");
    let detail = failed.detail.unwrap_or_default();
    assert!(detail.contains("check the user name, password"), "{detail}");
    assert!(!detail.contains("wrong"), "no password in the detail: {detail}");
    channel.queue_delete(QueueDeleteArguments::new(&queue)).await.unwrap();
}

/// With the brokers down, the engine starts, its sources wait (retrying
/// with backoff), and it stops at once when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_wait_for_brokers_that_are_down_and_stop_promptly() {
    dovetail_connectors::http::install_crypto_provider();
    let partner = Partner::start(Behaviour::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[engine]
listen = "127.0.0.1:0"

[connectors.erp]
type = "http"
base_url = "{partner}"

[connectors.bus]
type = "nats"
url = "nats://127.0.0.1:1"

[connectors.mq]
type = "amqp"
url = "amqp://127.0.0.1:1/%2f"

[flows.from_nats]
source = {{ type = "nats", connector = "bus", stream = "NOWHERE", consumer = "dovetail" }}
sink = {{ type = "http", connector = "erp", path = "/v1/a" }}

[flows.from_rabbit]
source = {{ type = "amqp", connector = "mq", queue = "nowhere" }}
sink = {{ type = "http", connector = "erp", path = "/v1/b" }}
"#,
        partner = partner.url(),
    );
    let journal = Arc::new(SqliteJournal::open(&dir.path().join("journal.db"), SqliteOptions::default()).unwrap());
    let engine = start(&text, &journal, dir.path()).await;
    let healthy = reqwest::get(format!("http://{}/healthz", engine.addr)).await.unwrap();
    assert!(healthy.status().is_success(), "{}", healthy.status());
    let stopping = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), engine.shutdown()).await.expect("the sources stop at once");
    assert!(stopping.elapsed() < Duration::from_secs(2));
}
