//! The RabbitMQ (AMQP 0-9-1) sink: one record, one publish, answered by
//! the broker's publisher confirm.
//!
//! The channel is in confirm mode, every message is persistent (delivery
//! mode 2) and `mandatory`, and carries `message_id` = the record's
//! idempotency key, so consumers can drop a retry whose first confirm was
//! lost. A publish counts as applied only once the broker acks its delivery
//! tag: the message is then in every queue it routes to (on disk, for
//! durable queues). A message no queue takes comes back (`basic.return`,
//! before its ack) and is refused rather than silently dropped. A channel
//! the broker closes fails every publish waiting on it, whichever message
//! caused the close: they are retried (unavailable), unless the close says
//! the exchange does not exist (refused) or access is refused (denied).
//!
//! One connection and one channel per sink, opened on the first send (the
//! engine starts while RabbitMQ is down) and again after either closes. The
//! dispatcher's senders share the channel: a lock covers the publish and its
//! delivery tag, never the wait for the confirm, so confirms for several
//! records can be outstanding at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use tokio::sync::{Mutex, oneshot};

use dovetail_core::config::{Secret, without_credentials};
use dovetail_core::policy::{Answer, LimitHint, ServiceAnswer};

use crate::http::{AttemptResult, Outbound};

/// The AMQP client crate, for the engine's RabbitMQ source.
pub use amqprs;

/// AMQP short strings (names, routing keys, most properties) hold at most
/// this many bytes.
const SHORT_STRING: usize = 255;

/// AMQP reply codes that matter here.
const NO_ROUTE: u16 = 312;
const ACCESS_REFUSED: u16 = 403;
const NOT_FOUND: u16 = 404;
const NOT_ALLOWED: u16 = 530;

/// One flow's exchange and routing key.
pub struct AmqpSink {
    connector: String,
    url: Secret,
    /// For display: without credentials.
    server: String,
    exchange: String,
    routing_key: String,
    timeout: Duration,
    /// The open connection and channel; locked for a publish and its tag.
    publisher: Mutex<Option<Publisher>>,
    confirms: Arc<Confirms>,
}

impl std::fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSink")
            .field("connector", &self.connector)
            .field("server", &self.server)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .finish()
    }
}

struct Publisher {
    connection: Connection,
    channel: Channel,
    /// Which channel the confirms in [`Confirms`] belong to.
    generation: u64,
    /// The broker numbers a confirm channel's publishes from 1.
    next_tag: u64,
}

impl AmqpSink {
    pub fn new(connector: &str, url: Secret, exchange: &str, routing_key: &str, timeout: Duration) -> AmqpSink {
        AmqpSink {
            connector: connector.to_string(),
            server: without_credentials(url.expose()),
            url,
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            timeout,
            publisher: Mutex::new(None),
            confirms: Arc::new(Confirms::default()),
        }
    }

    pub fn connector(&self) -> &str {
        &self.connector
    }

    /// `exchange` and `routing_key` for display (`""` is the default exchange).
    pub fn target(&self) -> (&str, &str) {
        (&self.exchange, &self.routing_key)
    }

    /// Publishes one record and waits for its confirm, all within the
    /// connector's timeout.
    pub async fn send(&self, out: Outbound<'_>) -> AttemptResult {
        let started = Instant::now();
        let published = AtomicBool::new(false);
        let (answer, detail) = match tokio::time::timeout(self.timeout, self.publish(&out, &published)).await {
            Ok(Ok(confirm)) => confirm.answer(&self.exchange, &self.routing_key),
            Ok(Err(failure)) => failure.answer(),
            Err(_) if !published.load(Ordering::Relaxed) => {
                (Answer::Connection, format!("cannot connect to RabbitMQ at {} within {:?}", self.server, self.timeout))
            }
            Err(_) => self.timed_out(),
        };
        AttemptResult { answer, duration: started.elapsed(), detail: Some(detail), hint: LimitHint::default() }
    }

    async fn publish(&self, out: &Outbound<'_>, published: &AtomicBool) -> Result<Confirm, Failure> {
        for (what, value) in [("exchange", &self.exchange), ("routing key", &self.routing_key)] {
            if value.len() > SHORT_STRING {
                return Err(Failure::Refused(format!("the {what} is longer than AMQP's {SHORT_STRING} bytes")));
            }
        }
        let properties = properties(out)?;
        let arguments = BasicPublishArguments {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            mandatory: true,
            immediate: false,
        };
        let (confirm, _pending) = {
            let mut slot = self.publisher.lock().await;
            let publisher = self.ready(&mut slot).await?;
            let (generation, tag) = (publisher.generation, publisher.next_tag);
            let confirm = self.confirms.expect(generation, tag, out.idempotency_key);
            // Forgets the tag if this send is abandoned (its timeout).
            let pending = Pending { confirms: self.confirms.clone(), generation, tag };
            if let Err(e) = publisher.channel.basic_publish(properties, out.payload.to_vec(), arguments).await {
                *slot = None;
                return Err(Failure::Lost(format!("the publish did not reach RabbitMQ: {e}")));
            }
            publisher.next_tag += 1;
            published.store(true, Ordering::Relaxed);
            (confirm, pending)
        };
        Ok(confirm.await.unwrap_or(Confirm::Lost))
    }

    /// The open publisher, opening a connection and a confirm channel as
    /// needed (a channel the broker closed on an error leaves the
    /// connection open).
    async fn ready<'a>(&self, slot: &'a mut Option<Publisher>) -> Result<&'a mut Publisher, Failure> {
        let connection = match slot.take() {
            // amqprs marks a channel closed only after the close callback:
            // `Confirms` knows first.
            Some(p) if p.connection.is_open() && p.channel.is_open() && !self.confirms.closed(p.generation) => {
                return Ok(slot.insert(p));
            }
            Some(p) if p.connection.is_open() => p.connection,
            _ => self.connect().await?,
        };
        // Tags restart at 1 on a new channel: whatever waits on the old one is lost.
        let generation = self.confirms.begin();
        let opened = async {
            let channel = connection.open_channel(None).await?;
            channel.register_callback(Events { confirms: self.confirms.clone(), generation }).await?;
            channel.confirm_select(ConfirmSelectArguments::default()).await?;
            Ok::<_, amqprs::error::Error>(channel)
        };
        let channel = opened.await.map_err(|e| Failure::from_error(&e, "cannot open a confirm channel"))?;
        Ok(slot.insert(Publisher { connection, channel, generation, next_tag: 1 }))
    }

    async fn connect(&self) -> Result<Connection, Failure> {
        // A bad URL is no fault of the record: retried until the config is fixed.
        let arguments =
            connection_arguments(&self.url, &format!("dovetail {}", self.connector)).map_err(Failure::Connection)?;
        Connection::open(&arguments)
            .await
            .map_err(|e| Failure::from_error(&e, &format!("cannot connect to RabbitMQ at {}", self.server)))
    }

    /// No confirm in time: a connection that died meanwhile is a connection
    /// failure, else the broker was slow (or is blocking publishers).
    fn timed_out(&self) -> (Answer, String) {
        if let Ok(slot) = self.publisher.try_lock()
            && !slot.as_ref().is_some_and(|p| p.connection.is_open())
        {
            return (
                Answer::Connection,
                format!("lost the connection to RabbitMQ at {} before the confirm", self.server),
            );
        }
        (Answer::Timeout, format!("no publisher confirm from RabbitMQ within {:?}", self.timeout))
    }
}

/// Persistent, `message_id` = the idempotency key, `correlation_id` and the
/// content type when they fit in a short string.
fn properties(out: &Outbound<'_>) -> Result<BasicProperties, Failure> {
    if out.idempotency_key.len() > SHORT_STRING {
        return Err(Failure::Refused("the idempotency key is too long for an AMQP message_id".into()));
    }
    let mut properties = BasicProperties::default();
    properties.with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT).with_message_id(out.idempotency_key);
    if !out.correlation_id.is_empty() {
        properties.with_correlation_id(truncated(out.correlation_id, SHORT_STRING));
    }
    if let Some(content_type) = out.content_type.filter(|c| c.len() <= SHORT_STRING) {
        properties.with_content_type(content_type);
    }
    Ok(properties.finish())
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What the broker said about one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Confirm {
    Ack,
    Nack,
    /// `basic.return`: no queue took the message.
    Returned {
        code: u16,
        text: String,
    },
    /// The broker closed the channel (e.g. no such exchange, no permission).
    Closed {
        code: u16,
        text: String,
    },
    /// The channel went away before a confirm came.
    Lost,
}

impl Confirm {
    fn answer(&self, exchange: &str, routing_key: &str) -> (Answer, String) {
        let target = format!("exchange `{exchange}` with routing key `{routing_key}`");
        match self {
            Confirm::Ack => (Answer::Service(ServiceAnswer::Applied), "confirmed".into()),
            Confirm::Nack => (
                Answer::Service(ServiceAnswer::Unavailable),
                "RabbitMQ nacked the message (it could not take responsibility for it)".into(),
            ),
            Confirm::Returned { code, text } if *code == NO_ROUTE => (
                Answer::Service(ServiceAnswer::Refused),
                format!("unroutable: no queue is bound to {target} ({code} {text})"),
            ),
            Confirm::Returned { code, text } => {
                (Answer::Service(ServiceAnswer::Refused), format!("returned by {target}: {code} {text}"))
            }
            Confirm::Closed { code, text } => {
                (closed_answer(*code), format!("RabbitMQ closed the channel publishing to {target}: {code} {text}"))
            }
            Confirm::Lost => (Answer::Connection, "the connection to RabbitMQ closed before the confirm".into()),
        }
    }
}

/// What a channel or connection closed by the broker means for every
/// publish waiting on it. The close may be caused by one message (406
/// PRECONDITION_FAILED: over the size limit, say) but answers all that are
/// in flight: those are retried (within each record's budget, so the one
/// at fault still ends dead-lettered), not refused. Only what applies to
/// every message alike is final: no such exchange (404) is refused, no
/// permission (403, 530) denied.
fn closed_answer(code: u16) -> Answer {
    match code {
        ACCESS_REFUSED | NOT_ALLOWED => Answer::Service(ServiceAnswer::Denied),
        NOT_FOUND => Answer::Service(ServiceAnswer::Refused),
        _ => Answer::Service(ServiceAnswer::Unavailable),
    }
}

/// A publish that failed before any confirm.
#[derive(Debug)]
enum Failure {
    Denied(String),
    Connection(String),
    Refused(String),
    Lost(String),
    Unavailable(String),
}

impl Failure {
    fn from_error(e: &amqprs::error::Error, context: &str) -> Failure {
        use amqprs::error::Error as E;
        let text = e.to_string();
        match e {
            _ if text.contains("ACCESS_REFUSED") || text.contains("NOT_ALLOWED") => {
                Failure::Denied(format!("{context}: {}", reply_text(&text)))
            }
            // RabbitMQ drops a connection whose credentials it refuses
            // without saying why: during the handshake, a reset says so.
            E::NetworkError(_) if text.contains("reset") || text.contains("shutdown") => Failure::Connection(format!(
                "{context}: the broker closed the connection during the handshake \
                 (check the user name, password and virtual host): {text}"
            )),
            E::NetworkError(_) | E::InternalChannelError(_) | E::ConnectionOpenError(_) => {
                Failure::Connection(format!("{context}: {}", reply_text(&text)))
            }
            _ => Failure::Unavailable(format!("{context}: {}", reply_text(&text))),
        }
    }

    fn answer(self) -> (Answer, String) {
        match self {
            Failure::Denied(d) => (Answer::Service(ServiceAnswer::Denied), d),
            Failure::Connection(d) | Failure::Lost(d) => (Answer::Connection, d),
            Failure::Refused(d) => (Answer::Service(ServiceAnswer::Refused), d),
            Failure::Unavailable(d) => (Answer::Service(ServiceAnswer::Unavailable), d),
        }
    }
}

/// amqprs reports a refused `connection.open` as its frame's debug text;
/// the broker's own words are the `reply_text`.
fn reply_text(error: &str) -> String {
    let code = error
        .split_once("reply_code: ")
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .filter(|code| !code.is_empty());
    let text = error
        .split_once("reply_text: ShortStr(")
        .and_then(|(_, rest)| rest.split_once('"'))
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(text, _)| text);
    match (code, text) {
        (Some(code), Some(text)) => format!("{code} {text}"),
        _ => error.to_string(),
    }
}

/// Publishes waiting for their confirm, by delivery tag, for the current
/// channel (`generation`); events of an older channel are ignored.
#[derive(Default)]
struct Confirms {
    state: StdMutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    generation: u64,
    /// The broker closed this generation's channel.
    closed: bool,
    by_tag: BTreeMap<u64, Waiter>,
}

struct Waiter {
    message_id: String,
    reply: oneshot::Sender<Confirm>,
}

impl Confirms {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new channel: what waits on the old one is lost.
    fn begin(&self) -> u64 {
        let mut w = self.lock();
        w.generation += 1;
        w.closed = false;
        for (_, waiter) in std::mem::take(&mut w.by_tag) {
            let _ = waiter.reply.send(Confirm::Lost);
        }
        w.generation
    }

    /// Whether the broker closed `generation`'s channel.
    fn closed(&self, generation: u64) -> bool {
        let w = self.lock();
        w.generation != generation || w.closed
    }

    /// Where the confirm of `tag` will come; at once `Lost` if the channel
    /// is gone (nothing would answer).
    fn expect(&self, generation: u64, tag: u64, message_id: &str) -> oneshot::Receiver<Confirm> {
        let (reply, receiver) = oneshot::channel();
        let mut w = self.lock();
        if w.generation == generation && !w.closed {
            w.by_tag.insert(tag, Waiter { message_id: message_id.to_string(), reply });
        } else {
            let _ = reply.send(Confirm::Lost);
        }
        receiver
    }

    fn forget(&self, generation: u64, tag: u64) {
        let mut w = self.lock();
        if w.generation == generation {
            w.by_tag.remove(&tag);
        }
    }

    /// An ack or nack for `tag`, or with `multiple` for every tag up to it.
    fn settle(&self, generation: u64, tag: u64, multiple: bool, confirm: Confirm) {
        let mut w = self.lock();
        if w.generation != generation {
            return;
        }
        let settled = if multiple {
            let later = w.by_tag.split_off(&(tag + 1));
            std::mem::replace(&mut w.by_tag, later)
        } else {
            w.by_tag.remove(&tag).map(|waiter| BTreeMap::from([(tag, waiter)])).unwrap_or_default()
        };
        for (_, waiter) in settled {
            let _ = waiter.reply.send(confirm.clone());
        }
    }

    /// A returned message carries no tag: it is the oldest waiting one with
    /// its `message_id` (returns come in publish order, before the ack).
    fn returned(&self, generation: u64, message_id: Option<&str>, code: u16, text: String) {
        let mut w = self.lock();
        if w.generation != generation {
            return;
        }
        let Some(message_id) = message_id else { return };
        let tag = w.by_tag.iter().find(|(_, waiter)| waiter.message_id == message_id).map(|(tag, _)| *tag);
        if let Some(waiter) = tag.and_then(|tag| w.by_tag.remove(&tag)) {
            let _ = waiter.reply.send(Confirm::Returned { code, text });
        }
    }

    /// The channel closed: nothing waiting will be confirmed.
    fn fail_all(&self, generation: u64, confirm: Confirm) {
        let mut w = self.lock();
        if w.generation != generation {
            return;
        }
        w.closed = true;
        for (_, waiter) in std::mem::take(&mut w.by_tag) {
            let _ = waiter.reply.send(confirm.clone());
        }
    }
}

/// A publish's place in [`Confirms`], given up when the send ends.
struct Pending {
    confirms: Arc<Confirms>,
    generation: u64,
    tag: u64,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.confirms.forget(self.generation, self.tag);
    }
}

/// The channel's callbacks, forwarding confirms, returns and the close to
/// the senders waiting in [`Confirms`].
struct Events {
    confirms: Arc<Confirms>,
    generation: u64,
}

#[async_trait::async_trait]
impl ChannelCallback for Events {
    async fn close(&mut self, _channel: &Channel, close: CloseChannel) -> Result<(), amqprs::error::Error> {
        let confirm = Confirm::Closed { code: close.reply_code(), text: close.reply_text().clone() };
        self.confirms.fail_all(self.generation, confirm);
        Ok(())
    }

    async fn cancel(&mut self, _channel: &Channel, _cancel: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(&mut self, _channel: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        self.confirms.settle(self.generation, ack.delivery_tag(), ack.mutiple(), Confirm::Ack);
    }

    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        self.confirms.settle(self.generation, nack.delivery_tag(), nack.multiple(), Confirm::Nack);
    }

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        ret: Return,
        basic_properties: BasicProperties,
        _content: Vec<u8>,
    ) {
        let message_id = basic_properties.message_id().map(String::as_str);
        self.confirms.returned(self.generation, message_id, ret.reply_code(), ret.reply_text().clone());
    }
}

/// Connection arguments for `url`:
/// `amqp://[user[:password]@]host[:port][/vhost]`, user, password and
/// virtual host percent-decoded (`%2f` is `/`), `guest:guest`, port 5672
/// and vhost `/` by default (an empty vhost too); a query is ignored.
/// `name` shows in the broker's connection list. Errors never repeat the
/// password.
pub fn connection_arguments(url: &Secret, name: &str) -> Result<OpenConnectionArguments, String> {
    let p = parse_url(url.expose())?;
    let mut arguments = OpenConnectionArguments::new(&p.host, p.port, &p.user, &p.password);
    arguments.virtual_host(&p.vhost).connection_name(truncated(name, SHORT_STRING));
    Ok(arguments.finish())
}

#[derive(Debug, PartialEq, Eq)]
struct AmqpUrl {
    host: String,
    port: u16,
    user: String,
    password: String,
    vhost: String,
}

fn parse_url(url: &str) -> Result<AmqpUrl, String> {
    let shown = without_credentials(url);
    let bad = |why: &str| format!("`{shown}` is not an AMQP URL: {why}");
    let rest = match url.split_once("://") {
        Some(("amqp", rest)) => rest,
        Some(("amqps", _)) => return Err(bad("amqps (TLS) is not supported")),
        _ => return Err(bad("write amqp://user@host:5672/vhost")),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = authority.rsplit_once('@').map_or((None, authority), |(u, h)| (Some(u), h));
    let (user, password) = match userinfo {
        Some(u) => u.split_once(':').map_or((u, ""), |(u, p)| (u, p)),
        None => ("guest", "guest"),
    };
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("an IPv6 host lacks its `]`"))?;
            (host, after.strip_prefix(':'))
        }
        None => hostport.split_once(':').map_or((hostport, None), |(h, p)| (h, Some(p))),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None | Some("") => 5672,
        Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
    };
    let vhost = match crate::nats::percent_decoded(path) {
        v if v.is_empty() => "/".to_string(),
        v => v,
    };
    if vhost.len() > SHORT_STRING {
        return Err(bad("the virtual host is longer than 255 bytes"));
    }
    Ok(AmqpUrl {
        host: host.to_string(),
        port,
        user: crate::nats::percent_decoded(user),
        password: crate::nats::percent_decoded(password),
        vhost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirms() -> (Confirms, u64) {
        let c = Confirms::default();
        let g = c.begin();
        (c, g)
    }

    #[test]
    fn acks_settle_their_tag_or_every_tag_up_to_it() {
        let (c, g) = confirms();
        let mut r: Vec<_> = (1..=4).map(|tag| c.expect(g, tag, &format!("k{tag}"))).collect();
        c.settle(g, 2, true, Confirm::Ack);
        assert_eq!(r[0].try_recv(), Ok(Confirm::Ack));
        assert_eq!(r[1].try_recv(), Ok(Confirm::Ack));
        assert!(r[2].try_recv().is_err(), "tag 3 is still waiting");
        c.settle(g, 4, false, Confirm::Nack);
        assert_eq!(r[3].try_recv(), Ok(Confirm::Nack));
        assert!(r[2].try_recv().is_err());
        c.settle(g, 3, false, Confirm::Ack);
        assert_eq!(r[2].try_recv(), Ok(Confirm::Ack));
    }

    #[test]
    fn a_return_goes_to_the_oldest_publish_with_its_message_id_and_its_ack_is_ignored() {
        let (c, g) = confirms();
        let mut a = c.expect(g, 1, "k1");
        let mut b = c.expect(g, 2, "k2");
        c.returned(g, Some("k2"), NO_ROUTE, "NO_ROUTE".into());
        c.settle(g, 2, true, Confirm::Ack);
        assert_eq!(b.try_recv(), Ok(Confirm::Returned { code: NO_ROUTE, text: "NO_ROUTE".into() }));
        assert_eq!(a.try_recv(), Ok(Confirm::Ack));
    }

    #[test]
    fn a_new_channel_loses_the_old_waiters_and_ignores_their_late_events() {
        let (c, g) = confirms();
        let mut old = c.expect(g, 1, "k1");
        let g2 = c.begin();
        assert_eq!(old.try_recv(), Ok(Confirm::Lost));
        let mut new = c.expect(g2, 1, "k9");
        c.settle(g, 1, false, Confirm::Nack);
        c.fail_all(g, Confirm::Lost);
        assert!(new.try_recv().is_err(), "events of the old channel do not touch the new one");
        c.fail_all(g2, Confirm::Closed { code: NOT_FOUND, text: "NOT_FOUND - no exchange".into() });
        assert_eq!(new.try_recv(), Ok(Confirm::Closed { code: NOT_FOUND, text: "NOT_FOUND - no exchange".into() }));
        assert!(c.closed(g2) && c.closed(g));
        let mut late = c.expect(g2, 2, "k10");
        assert_eq!(late.try_recv(), Ok(Confirm::Lost), "nothing would answer on a closed channel");
        let g3 = c.begin();
        assert!(!c.closed(g3));
    }

    #[test]
    fn a_forgotten_tag_is_not_settled() {
        let (c, g) = confirms();
        let mut r = c.expect(g, 1, "k1");
        c.forget(g, 1);
        c.settle(g, 1, false, Confirm::Ack);
        assert!(r.try_recv().is_err());
    }

    #[test]
    fn confirms_map_onto_answers() {
        let a = |c: Confirm| c.answer("events", "orders");
        assert_eq!(a(Confirm::Ack).0, Answer::Service(ServiceAnswer::Applied));
        assert_eq!(a(Confirm::Nack).0, Answer::Service(ServiceAnswer::Unavailable));
        let (answer, detail) = a(Confirm::Returned { code: NO_ROUTE, text: "NO_ROUTE".into() });
        assert_eq!(answer, Answer::Service(ServiceAnswer::Refused));
        assert!(detail.contains("exchange `events` with routing key `orders`"), "{detail}");
        assert_eq!(
            a(Confirm::Closed { code: ACCESS_REFUSED, text: String::new() }).0,
            Answer::Service(ServiceAnswer::Denied)
        );
        assert_eq!(
            a(Confirm::Closed { code: NOT_FOUND, text: String::new() }).0,
            Answer::Service(ServiceAnswer::Refused)
        );
        assert_eq!(
            a(Confirm::Closed { code: 541, text: String::new() }).0,
            Answer::Service(ServiceAnswer::Unavailable)
        );
        // One message over the limit closes the channel under every publish in flight: retried.
        let (answer, detail) = a(Confirm::Closed { code: 406, text: "PRECONDITION_FAILED - message size".into() });
        assert_eq!(answer, Answer::Service(ServiceAnswer::Unavailable));
        assert!(detail.contains("closed the channel") && detail.contains("406 PRECONDITION_FAILED"), "{detail}");
        assert_eq!(
            a(Confirm::Closed { code: 320, text: String::new() }).0,
            Answer::Service(ServiceAnswer::Unavailable)
        );
        assert_eq!(a(Confirm::Lost).0, Answer::Connection);
    }

    #[test]
    fn client_errors_map_onto_answers() {
        use amqprs::error::Error as E;
        let refused = E::ConnectionOpenError(
            r#"failed to open connection, reason: Close(MethodHeader { class_id: 10, method_id: 50 }, Close { reply_code: 530, reply_text: ShortStr(34, "NOT_ALLOWED - vhost nope not found"), class_id: 10, method_id: 40 })"#.into(),
        );
        let (answer, detail) = Failure::from_error(&refused, "cannot connect").answer();
        assert_eq!(answer, Answer::Service(ServiceAnswer::Denied));
        assert_eq!(detail, "cannot connect: 530 NOT_ALLOWED - vhost nope not found");
        let reset = E::NetworkError("network io error: Connection reset by peer (os error 104)".into());
        let (answer, detail) = Failure::from_error(&reset, "cannot connect").answer();
        assert_eq!(answer, Answer::Connection);
        assert!(detail.contains("check the user name, password"), "{detail}");
        let refused = E::NetworkError("network io error: Connection refused (os error 111)".into());
        assert_eq!(Failure::from_error(&refused, "x").answer().0, Answer::Connection);
        assert_eq!(
            Failure::from_error(&E::ChannelUseError("odd".into()), "x").answer().0,
            Answer::Service(ServiceAnswer::Unavailable)
        );
    }

    #[test]
    fn urls_are_parsed_with_rabbitmq_defaults() {
        let u = parse_url("amqp://guest:gu%40st@127.0.0.1:5673/%2f").unwrap();
        assert_eq!(
            u,
            AmqpUrl {
                host: "127.0.0.1".into(),
                port: 5673,
                user: "guest".into(),
                password: "gu@st".into(),
                vhost: "/".into()
            }
        );
        let u = parse_url("amqp://mq.internal").unwrap();
        assert_eq!((u.port, u.user.as_str(), u.password.as_str(), u.vhost.as_str()), (5672, "guest", "guest", "/"));
        let u = parse_url("amqp://me@[::1]:5674/orders?heartbeat=10").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.user.as_str(), u.vhost.as_str()), ("::1", 5674, "me", "orders"));
        let e = parse_url("amqps://u:hunter2@mq").unwrap_err();
        assert!(!e.contains("hunter2") && e.contains("TLS"), "{e}");
        assert!(parse_url("amqp://u:hunter2@mq:port").unwrap_err().contains("port"));
        assert!(parse_url("amqp://u:p@/x").is_err());
    }

    #[test]
    fn long_correlation_ids_are_cut_and_long_content_types_left_out() {
        let long = "é".repeat(200);
        let out =
            Outbound { payload: b"{}", content_type: Some(&long), idempotency_key: "dt1-k", correlation_id: &long };
        let p = properties(&out).unwrap();
        assert_eq!(p.message_id().map(String::as_str), Some("dt1-k"));
        assert_eq!(p.correlation_id().map(String::len), Some(254));
        assert!(p.content_type().is_none());
        assert_eq!(p.delivery_mode(), Some(amqprs::DELIVERY_MODE_PERSISTENT));
    }

    #[test]
    fn debug_shows_no_password() {
        let sink = AmqpSink::new(
            "mq",
            Secret::new("amqp://u:hunter2@mq:5672/%2f".into()),
            "",
            "orders",
            Duration::from_secs(1),
        );
        let shown = format!("{sink:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
