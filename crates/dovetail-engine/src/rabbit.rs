//! RabbitMQ sources: messages of the flow's queue go through the flow's
//! pipeline into the journal.
//!
//! Consumption uses manual acknowledgements: a message is acked only after
//! its record's journal transaction committed. A crash, a stop or a lost
//! connection before that leaves it unacked, and RabbitMQ requeues it; it
//! comes again (flagged redelivered). It is recognised as a duplicate, and
//! journalled once, only if it is named: by its `message_id`, which
//! publishers should set, else by the flow's `idempotency_key`. RabbitMQ
//! gives a message no stable id of its own, and its body does not name it
//! (the same body may come again as a new message: a status going active,
//! inactive, active). A message named by neither is a new record each time
//! it comes: a crash between the journal's commit and the ack journals it
//! twice (at least once). A message the pipeline refuses is journalled
//! as quarantined and acked like any other: nothing is dropped. If the
//! journal fails, the message is nacked back onto the queue and the source
//! backs off.
//!
//! The queue must exist: Dovetail declares no topology. A missing queue is
//! reported and looked for again with backoff, as is a broker that is down.
//! `prefetch` bounds the messages RabbitMQ hands over unacked.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use dovetail_connectors::amqp::amqprs::callbacks::ChannelCallback;
use dovetail_connectors::amqp::amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicNackArguments, BasicQosArguments, Channel, ConsumerMessage,
};
use dovetail_connectors::amqp::amqprs::connection::Connection;
use dovetail_connectors::amqp::amqprs::{self, Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use dovetail_connectors::amqp::connection_arguments;
use dovetail_core::config::{AmqpSourceConfig, Secret, without_credentials};
use dovetail_journal::Ingested;

use crate::contract::SourceContext;
use crate::reconnect::{Health, Trouble, backoff};

/// The longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a consumer that took no delivery yet must stay open before
/// the source counts as reading again.
const STEADY: Duration = Duration::from_secs(5);

pub(crate) struct AmqpSource {
    pub ctx: SourceContext,
    pub config: AmqpSourceConfig,
    pub url: Secret,
}

/// The open connection, the consuming channel and its deliveries.
struct Session {
    // Kept open while the session lasts; dropping it closes the connection.
    _connection: Connection,
    channel: Channel,
    deliveries: mpsc::UnboundedReceiver<ConsumerMessage>,
    /// Why the broker closed the channel or cancelled the consumer, if it did.
    closed: Arc<Mutex<Option<String>>>,
}

pub(crate) async fn run(source: Arc<AmqpSource>, mut stop: watch::Receiver<bool>) {
    let mut health = Health::new("RabbitMQ", "RabbitMQ");
    loop {
        // Stopping anywhere is safe: what is not acked is requeued when the
        // connection closes.
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

impl AmqpSource {
    /// Connects and consumes until something goes wrong.
    async fn read(&self, health: &mut Health) -> Trouble {
        let mut session = match self.open().await {
            Ok(session) => session,
            Err(trouble) => return trouble,
        };
        // Connected is not reading yet: the broker may close the channel or
        // cancel the consumer at once. The source counts as reading again
        // after its first delivery taken, or once the consumer has stayed
        // open for `STEADY` (an idle queue delivers nothing).
        let mut reading = false;
        let steady = tokio::time::sleep(STEADY);
        tokio::pin!(steady);
        let mut journal_failures = 0;
        loop {
            let delivery = tokio::select! {
                delivery = session.deliveries.recv() => delivery,
                _ = &mut steady, if !reading => {
                    reading = true;
                    health.recovered(&self.ctx.flow);
                    continue;
                }
            };
            let Some(delivery) = delivery else {
                let why = session.closed.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Trouble::Unreachable(match why {
                    Some(why) => format!("RabbitMQ stopped the consumer of queue `{}`: {why}", self.config.queue),
                    None => format!("the connection to RabbitMQ closed while consuming queue `{}`", self.config.queue),
                });
            };
            if let Err(trouble) = self.take(&session.channel, delivery, &mut journal_failures).await {
                return trouble;
            }
            if !reading {
                reading = true;
                health.recovered(&self.ctx.flow);
            }
        }
    }

    async fn open(&self) -> Result<Session, Trouble> {
        let queue = &self.config.queue;
        let arguments =
            connection_arguments(&self.url, &format!("dovetail {}", self.ctx.flow)).map_err(Trouble::Setup)?;
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, Connection::open(&arguments)).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => return Err(refused_or_unreachable(format!("cannot connect to RabbitMQ: {e}"))),
            Err(_) => {
                return Err(Trouble::Unreachable(format!("cannot connect to RabbitMQ within {CONNECT_TIMEOUT:?}")));
            }
        };
        let closed = Arc::new(Mutex::new(None));
        let opened = async {
            let channel = connection.open_channel(None).await?;
            channel.register_callback(Events { closed: closed.clone() }).await?;
            channel.basic_qos(BasicQosArguments::new(0, self.config.prefetch, false)).await?;
            Ok::<_, amqprs::error::Error>(channel)
        };
        let channel = opened.await.map_err(|e| refused_or_unreachable(format!("cannot open a channel: {e}")))?;
        let consume = BasicConsumeArguments::new(queue, "").manual_ack(true).finish();
        let deliveries = match channel.basic_consume_rx(consume).await {
            Ok((_tag, deliveries)) => deliveries,
            Err(e) => {
                // The broker closes the channel to say why; amqprs only says it closed.
                let why = closed.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Err(match why {
                    Some(why) if why.starts_with("404") => Trouble::Setup(format!(
                        "queue `{queue}` does not exist ({why}): declare it (Dovetail declares no queues)"
                    )),
                    Some(why) => refused_or_unreachable(format!("cannot consume queue `{queue}`: {why}")),
                    None => Trouble::Unreachable(format!("cannot consume queue `{queue}`: {e}")),
                });
            }
        };
        Ok(Session { _connection: connection, channel, deliveries, closed })
    }

    /// Journals one delivery, then acks it; if the journal fails, nacks it
    /// back onto the queue and waits before the next.
    async fn take(
        &self,
        channel: &Channel,
        delivery: ConsumerMessage,
        journal_failures: &mut u32,
    ) -> Result<(), Trouble> {
        let started = Instant::now();
        let Some(deliver) = delivery.deliver else {
            // amqprs always sets it; without a tag nothing can be acked, and the message is requeued.
            return Err(Trouble::Unreachable("a delivery without its delivery tag".into()));
        };
        let tag = deliver.delivery_tag();
        let raw = delivery.content.unwrap_or_default();
        let message_id = delivery.basic_properties.as_ref().and_then(BasicProperties::message_id).map(String::as_str);
        let name = delivery_id(message_id);
        let processed = self.ctx.process(&raw).await;
        match self.ctx.journal(processed, name, raw, started).await {
            Ok(ingested) => {
                *journal_failures = 0;
                if matches!(ingested, Ingested::New(_)) {
                    self.ctx.wake.notify_one();
                }
                channel.basic_ack(BasicAckArguments::new(tag, false)).await.map_err(|e| {
                    Trouble::Unreachable(format!(
                        "cannot ack a message of queue `{}` (it is journalled; when it comes again it is a \
                         duplicate): {e}",
                        self.config.queue
                    ))
                })
            }
            Err(e) => {
                *journal_failures += 1;
                let delay = backoff(*journal_failures);
                tracing::error!(
                    flow = %self.ctx.flow,
                    queue = %self.config.queue,
                    error = %e,
                    ?delay,
                    "cannot journal a RabbitMQ message; it goes back onto the queue"
                );
                channel.basic_nack(BasicNackArguments::new(tag, false, true)).await.map_err(|e| {
                    Trouble::Unreachable(format!("cannot nack a message of queue `{}`: {e}", self.config.queue))
                })?;
                tokio::time::sleep(delay).await;
                Ok(())
            }
        }
    }
}

/// A refusal by the broker (credentials, permissions, virtual host) needs
/// someone to act; anything else is an outage.
fn refused_or_unreachable(why: String) -> Trouble {
    if why.contains("ACCESS_REFUSED") || why.contains("NOT_ALLOWED") || why.contains("403") {
        Trouble::Setup(why)
    } else {
        Trouble::Unreachable(why)
    }
}

/// A message's delivery id, what makes a redelivery a duplicate: its
/// `message_id` when the publisher set one, else none (`""`): the flow's
/// `idempotency_key` names the record if it gives one, else the record gets
/// a fresh key. Not the body: two messages with the same body are two
/// records (a status going back to what it was).
fn delivery_id(message_id: Option<&str>) -> String {
    message_id.map(str::trim).unwrap_or_default().to_string()
}

/// The channel's callbacks: remember why the broker closed the channel or
/// cancelled the consumer (a deleted queue), which ends the deliveries.
struct Events {
    closed: Arc<Mutex<Option<String>>>,
}

impl Events {
    fn remember(&self, why: String) {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

#[async_trait::async_trait]
impl ChannelCallback for Events {
    async fn close(&mut self, _channel: &Channel, close: CloseChannel) -> Result<(), amqprs::error::Error> {
        self.remember(format!("{} {}", close.reply_code(), close.reply_text()));
        Ok(())
    }

    async fn cancel(&mut self, _channel: &Channel, _cancel: Cancel) -> Result<(), amqprs::error::Error> {
        // Accepting the cancel ends the deliveries, and the source reconnects.
        self.remember("the broker cancelled the consumer (was the queue deleted?)".into());
        Ok(())
    }

    async fn flow(&mut self, _channel: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, _ack: Ack) {}

    async fn publish_nack(&mut self, _channel: &Channel, _nack: Nack) {}

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        _ret: Return,
        _basic_properties: BasicProperties,
        _content: Vec<u8>,
    ) {
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_id_names_the_delivery_and_the_body_does_not() {
        assert_eq!(delivery_id(Some("m-1")), "m-1");
        assert_eq!(delivery_id(Some(" m-1 ")), "m-1");
        assert_eq!(delivery_id(None), "", "no id of the source's own: the flow's idempotency_key or a fresh one");
        assert_eq!(delivery_id(Some("  ")), "", "a blank id is no id");
    }

    #[test]
    fn without_a_message_id_the_flows_idempotency_key_names_the_record_else_a_fresh_key() {
        use dovetail_core::pipeline::{Keys, Processed, Rejection, Stage};
        let processed = |dedup: Option<&str>| Processed {
            input: None,
            keys: Keys { external: None, dedup: dedup.map(str::to_string) },
            result: Err(Rejection { stage: Stage::Mapping, reason: "test".into() }),
        };
        let record = |dedup: Option<&str>| {
            let now = dovetail_core::clock::Timestamp::from_millis(0);
            crate::contract::new_record("f", processed(dedup), Some(delivery_id(None)), "c", None, b"{}".to_vec(), now)
                .0
        };
        let keyed = record(Some("order-1:active"));
        assert_eq!(keyed.delivery_id.as_deref(), Some("order-1:active"));
        assert_eq!(keyed.idempotency_key, record(Some("order-1:active")).idempotency_key);
        let (a, b) = (record(None), record(None));
        assert_eq!(a.delivery_id, None);
        assert_ne!(a.idempotency_key, b.idempotency_key, "the same body again is another record");
    }

    #[test]
    fn refusals_need_someone_and_the_rest_is_an_outage() {
        assert!(matches!(refused_or_unreachable("403 ACCESS_REFUSED - no".into()), Trouble::Setup(_)));
        assert!(matches!(refused_or_unreachable("530 NOT_ALLOWED - vhost".into()), Trouble::Setup(_)));
        assert!(matches!(refused_or_unreachable("Connection refused (os error 111)".into()), Trouble::Unreachable(_)));
    }
}
