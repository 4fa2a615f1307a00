//! NATS JetStream sources: a durable pull consumer reads the flow's stream,
//! and each message goes through the flow's pipeline into the journal.
//!
//! A message is acknowledged only after its record's journal transaction
//! committed, and the acknowledgement is awaited (a double ack): a crash,
//! a stop or a lost connection before that leaves it unacknowledged, and
//! JetStream delivers it again after the consumer's `ack_wait`. A message
//! delivered again is a duplicate by its delivery id, so it is journalled
//! once. A message the pipeline refuses is journalled as quarantined and
//! acknowledged like any other: nothing is dropped, and nothing blocks the
//! stream. If the journal fails, the message is nacked with a delay (so
//! JetStream offers it again) and the source backs off.
//!
//! The consumer (explicit acks, `ack_wait`, the `subject` filter, from the
//! start of the stream) is created if missing; the stream must exist.
//! Messages are pulled one at a time: each is journalled and acknowledged
//! before the next is asked for, so the stream's order is kept and at most
//! one message per flow is in hand when the engine stops. (Each record is
//! journalled before the next anyway; pulling several per request would
//! save round trips, not commits.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tokio::sync::watch;

use dovetail_connectors::nats::async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use dovetail_connectors::nats::async_nats::jetstream::context::GetStreamErrorKind;
use dovetail_connectors::nats::async_nats::jetstream::stream::ConsumerErrorKind;
use dovetail_connectors::nats::async_nats::jetstream::{self, AckKind, ErrorCode};
use dovetail_connectors::nats::async_nats::{self, HeaderMap, RequestErrorKind, StatusCode};
use dovetail_connectors::nats::{self, MSG_ID_HEADER, NatsConnection};
use dovetail_core::config::{NatsSourceConfig, Secret, without_credentials};
use dovetail_journal::Ingested;

use crate::contract::SourceContext;
use crate::reconnect::{Health, Trouble, backoff};

/// The longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one pull waits at the server for a message before it answers
/// "nothing yet" and the source asks again.
const PULL_WAIT: Duration = Duration::from_secs(5);
/// How much longer than [`PULL_WAIT`] the source waits for that answer
/// before it takes the server for gone.
const PULL_GRACE: Duration = Duration::from_secs(5);

pub(crate) struct NatsSource {
    pub ctx: SourceContext,
    pub config: NatsSourceConfig,
    pub url: Secret,
}

/// The connection and the consumer it reads.
struct Session {
    connection: NatsConnection,
    jetstream: jetstream::Context,
    /// The JetStream API subject that hands out the consumer's next message.
    next: String,
}

pub(crate) async fn run(source: Arc<NatsSource>, mut stop: watch::Receiver<bool>) {
    let mut health = Health::new("NATS", "JetStream");
    loop {
        // Stopping anywhere is safe: what is not acknowledged comes again.
        let trouble = tokio::select! {
            trouble = source.read(&mut health) => trouble,
            _ = stop.wait_for(|s| *s) => return,
        };
        health.failed(&source.ctx.flow, &without_credentials(source.url.expose()), &trouble);
        tokio::select! {
            _ = tokio::time::sleep(health.delay()) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

impl NatsSource {
    /// Connects and reads until something goes wrong.
    async fn read(&self, health: &mut Health) -> Trouble {
        let session = match self.open().await {
            Ok(session) => session,
            Err(trouble) => return trouble,
        };
        // Connected is not reading yet: the source counts as reading again
        // after its first pull JetStream answered (a message or "none yet").
        let mut reading = false;
        let mut journal_failures = 0;
        loop {
            let pulled = self.pull(&session).await;
            if pulled.is_ok() && !reading {
                reading = true;
                health.recovered(&self.ctx.flow);
            }
            let message = match pulled {
                Ok(Some(message)) => message,
                Ok(None) => continue,
                Err(trouble) => return trouble,
            };
            if let Err(trouble) = self.take(message, &mut journal_failures).await {
                return trouble;
            }
        }
    }

    async fn open(&self) -> Result<Session, Trouble> {
        let c = &self.config;
        let connection = nats::connect(&self.url, &format!("dovetail {}", self.ctx.flow), CONNECT_TIMEOUT)
            .await
            .map_err(|e| if e.denied { Trouble::Setup(e.to_string()) } else { Trouble::Unreachable(e.to_string()) })?;
        let jetstream = jetstream::new(connection.client.clone());
        let stream = jetstream.get_stream(&c.stream).await.map_err(|e| match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                Trouble::Setup(format!(
                    "stream `{}` does not exist: create it (Dovetail creates its consumer, not the stream)",
                    c.stream
                ))
            }
            GetStreamErrorKind::Request => Trouble::Unreachable(format!("cannot look up stream `{}`: {e}", c.stream)),
            _ => Trouble::Setup(format!("cannot use stream `{}`: {e}", c.stream)),
        })?;
        let wanted = pull::Config {
            durable_name: Some(c.consumer.clone()),
            description: Some(format!("Dovetail flow {}", self.ctx.flow)),
            ack_policy: AckPolicy::Explicit,
            ack_wait: c.ack_wait,
            deliver_policy: DeliverPolicy::All,
            filter_subject: c.subject.clone().unwrap_or_default(),
            ..Default::default()
        };
        let consumer = stream.get_or_create_consumer(&c.consumer, wanted).await.map_err(|e| match e.kind() {
            ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => {
                Trouble::Unreachable(format!("cannot look up consumer `{}`: {e}", c.consumer))
            }
            ConsumerErrorKind::InvalidConsumerType => Trouble::Setup(format!(
                "consumer `{}` on stream `{}` is a push consumer; Dovetail pulls: delete it or name another",
                c.consumer, c.stream
            )),
            _ => Trouble::Setup(format!("cannot create consumer `{}` on stream `{}`: {e}", c.consumer, c.stream)),
        })?;
        let found = &consumer.cached_info().config;
        if found.ack_policy != AckPolicy::Explicit {
            // With `none`, a message counts as handled once sent: a crash before the journal loses it.
            return Err(Trouble::Setup(format!(
                "consumer `{}` on stream `{}` acknowledges with policy {:?}; Dovetail acknowledges each message \
                 once journalled and needs `explicit`: delete the consumer or name another",
                c.consumer, c.stream, found.ack_policy
            )));
        }
        let wanted_filter = c.subject.as_deref().unwrap_or_default();
        if found.filter_subject != wanted_filter {
            tracing::warn!(
                flow = %self.ctx.flow,
                consumer = %c.consumer,
                found = %found.filter_subject,
                configured = %wanted_filter,
                "the existing consumer filters other subjects than configured; it is used as it is"
            );
        }
        let next = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", c.stream, c.consumer);
        Ok(Session { connection, jetstream, next })
    }

    /// The consumer's next message, or `None` when none came within
    /// [`PULL_WAIT`].
    async fn pull(&self, session: &Session) -> Result<Option<jetstream::Message>, Trouble> {
        let ask = format!(r#"{{"batch":1,"expires":{}}}"#, PULL_WAIT.as_nanos());
        let client = &session.connection.client;
        // Its own inbox: JetStream delivers a message under its stream
        // subject, which the client's shared request inbox cannot route.
        let request = async_nats::Request::new()
            .payload(ask.into())
            .inbox(client.new_inbox())
            .timeout(Some(PULL_WAIT + PULL_GRACE));
        let reply = client.send_request(session.next.clone(), request).await;
        let message = match reply {
            Ok(message) => message,
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                return Err(Trouble::Setup(format!(
                    "consumer `{}` on stream `{}` disappeared; creating it again",
                    self.config.consumer, self.config.stream
                )));
            }
            Err(e) => {
                return Err(Trouble::Unreachable(format!("pulling from stream `{}` failed: {e}", self.config.stream)));
            }
        };
        match message.status {
            None => Ok(Some(jetstream::Message { message, context: session.jetstream.clone() })),
            Some(status) if status == StatusCode::OK => {
                Ok(Some(jetstream::Message { message, context: session.jetstream.clone() }))
            }
            // Nothing within the wait.
            Some(status) if status == StatusCode::TIMEOUT || status == StatusCode::NOT_FOUND => Ok(None),
            Some(status) => Err(Trouble::Unreachable(format!(
                "JetStream answered a pull from consumer `{}` with {status}: {}",
                self.config.consumer,
                message.description.as_deref().unwrap_or("no description")
            ))),
        }
    }

    /// Journals one message, then acknowledges it; if the journal fails,
    /// nacks it with a delay and waits as long.
    async fn take(&self, message: jetstream::Message, journal_failures: &mut u32) -> Result<(), Trouble> {
        let started = Instant::now();
        let sequence = match message.info() {
            Ok(info) => info.stream_sequence,
            Err(e) => {
                // Not from a JetStream consumer: it cannot be acknowledged either.
                return Err(Trouble::Unreachable(format!("a pulled message has no JetStream metadata: {e}")));
            }
        };
        let raw = message.payload.to_vec();
        let name = delivery_id(&self.config.stream, message.headers.as_ref(), sequence, &raw);
        let processed = self.ctx.process(&raw).await;
        match self.ctx.journal(processed, name, raw, started).await {
            Ok(ingested) => {
                *journal_failures = 0;
                if matches!(ingested, Ingested::New(_)) {
                    self.ctx.wake.notify_one();
                }
                message.double_ack().await.map_err(|e| {
                    Trouble::Unreachable(format!(
                        "cannot acknowledge message {sequence} of stream `{}` (it is journalled; when it comes \
                         again it is a duplicate): {e}",
                        self.config.stream
                    ))
                })
            }
            Err(e) => {
                *journal_failures += 1;
                let delay = backoff(*journal_failures);
                tracing::error!(
                    flow = %self.ctx.flow,
                    stream = %self.config.stream,
                    sequence,
                    error = %e,
                    ?delay,
                    "cannot journal a JetStream message; it is not acknowledged and comes again"
                );
                if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
                    // Then it comes again after `ack_wait`.
                    tracing::debug!(flow = %self.ctx.flow, error = %e, "cannot nack the message");
                }
                tokio::time::sleep(delay).await;
                Ok(())
            }
        }
    }
}

/// A message's delivery id, what makes a redelivery a duplicate: the
/// publisher's `Nats-Msg-Id` when it set one (JetStream de-duplicates on it
/// too), else `nats:STREAM:SEQUENCE:HASH`. The payload's hash is part of it
/// because a stream deleted and created again numbers its messages from 1
/// anew: its new message 1 is not the old one.
fn delivery_id(stream: &str, headers: Option<&HeaderMap>, sequence: u64, payload: &[u8]) -> String {
    let msg_id = headers.and_then(|h| h.get(MSG_ID_HEADER)).map(|v| v.as_str().trim()).filter(|v| !v.is_empty());
    match msg_id {
        Some(id) => id.to_string(),
        None => format!("nats:{stream}:{sequence}:{}", hex::encode(&sha2::Sha256::digest(payload)[..8])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_publishers_message_id_names_the_delivery() {
        let mut headers = HeaderMap::new();
        headers.insert(MSG_ID_HEADER, "order-7");
        assert_eq!(delivery_id("ORDERS", Some(&headers), 3, b"{}"), "order-7");
    }

    #[test]
    fn without_one_the_stream_sequence_and_payload_do() {
        let id = delivery_id("ORDERS", None, 3, b"{}");
        assert!(id.starts_with("nats:ORDERS:3:"), "{id}");
        assert_eq!(id, delivery_id("ORDERS", None, 3, b"{}"), "a redelivery has the same id");
        assert_ne!(id, delivery_id("ORDERS", None, 3, b"{\"a\":1}"), "a recreated stream's message 3 is another");
        let mut blank = HeaderMap::new();
        blank.insert(MSG_ID_HEADER, " ");
        assert_eq!(delivery_id("ORDERS", Some(&blank), 3, b"{}"), id, "a blank id is no id");
    }
}
