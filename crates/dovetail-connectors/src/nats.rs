//! The NATS JetStream sink: one record, one publish, confirmed by the
//! stream's acknowledgement (`PubAck`), the broker's publisher confirm.
//!
//! Every message carries `Nats-Msg-Id` = the record's idempotency key, so a
//! retry after a lost acknowledgement is dropped by JetStream as a duplicate
//! (within the stream's duplicate window, two minutes by default: a stream
//! fed by Dovetail should have one at least as long as its retry gaps). A
//! duplicate's `PubAck` says so and counts as applied.
//!
//! The client connects on the first send, so the engine starts while NATS
//! is down, and then reconnects by itself; a send while it is disconnected
//! fails at once as a connection failure rather than waiting for the
//! timeout. Credentials in the URL go to the server in `CONNECT`, never into
//! the server address, so neither the client's logs nor ours can show them.
//!
//! [`connect`] and the re-exported [`async_nats`] also serve the engine's
//! JetStream source, so both sides use one client and one way to connect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::{ConnectErrorKind, ServerAddr};
use tokio::sync::OnceCell;

use dovetail_core::config::{Secret, without_credentials};
use dovetail_core::policy::{Answer, LimitHint, ServiceAnswer};

use crate::http::{AttemptResult, Outbound};

/// The NATS client crate, for the engine's JetStream source.
pub use async_nats;

/// The header JetStream de-duplicates on.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// How often the client pings the server: a dead connection is noticed
/// after two missed pongs.
const PING_INTERVAL: Duration = Duration::from_secs(10);

/// How far back a refused reconnect explains being disconnected.
const RECONNECT_MEMORY: Duration = Duration::from_secs(60);

/// One flow's JetStream subject.
pub struct NatsSink {
    connector: String,
    url: Secret,
    /// For display: without credentials.
    server: String,
    subject: String,
    timeout: Duration,
    /// Connected on the first send; async-nats reconnects it from then on.
    session: OnceCell<Session>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("connector", &self.connector)
            .field("server", &self.server)
            .field("subject", &self.subject)
            .finish()
    }
}

struct Session {
    connection: NatsConnection,
    jetstream: jetstream::Context,
}

impl NatsSink {
    pub fn new(connector: &str, url: Secret, subject: &str, timeout: Duration) -> NatsSink {
        NatsSink {
            connector: connector.to_string(),
            server: without_credentials(url.expose()),
            url,
            subject: subject.to_string(),
            timeout,
            session: OnceCell::new(),
        }
    }

    pub fn connector(&self) -> &str {
        &self.connector
    }

    /// The subject it publishes to.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Publishes one record and waits for JetStream's acknowledgement, all
    /// within the connector's timeout.
    pub async fn send(&self, out: Outbound<'_>) -> AttemptResult {
        let started = Instant::now();
        let connected = AtomicBool::new(false);
        let (answer, detail) = match tokio::time::timeout(self.timeout, self.publish(&out, &connected)).await {
            Ok(Ok(ack)) if ack.duplicate => (Answer::Service(ServiceAnswer::Applied), Some("duplicate".to_string())),
            Ok(Ok(ack)) => (
                Answer::Service(ServiceAnswer::Applied),
                Some(format!("stream {} sequence {}", ack.stream, ack.sequence)),
            ),
            Ok(Err(failure)) => self.judge(failure, started),
            Err(_) if !connected.load(Ordering::Relaxed) => (
                Answer::Connection,
                Some(format!("cannot connect to NATS at {} within {:?}", self.server, self.timeout)),
            ),
            Err(_) => self.judge(Failure::TimedOut, started),
        };
        AttemptResult { answer, duration: started.elapsed(), detail, hint: LimitHint::default() }
    }

    async fn publish(
        &self,
        out: &Outbound<'_>,
        connected: &AtomicBool,
    ) -> Result<jetstream::publish::PublishAck, Failure> {
        let session = self.session.get_or_try_init(|| self.open()).await.map_err(Failure::Connect)?;
        connected.store(true, Ordering::Relaxed);
        if session.connection.client.connection_state() == State::Disconnected {
            return Err(Failure::Disconnected);
        }
        let headers = headers(out)?;
        let ack = session
            .jetstream
            .publish_with_headers(self.subject.clone(), headers, bytes::Bytes::copy_from_slice(out.payload))
            .await
            .map_err(|e| Failure::Publish(e.kind(), e.to_string()))?;
        ack.await.map_err(|e| Failure::Publish(e.kind(), e.to_string()))
    }

    async fn open(&self) -> Result<Session, NatsConnectError> {
        let connection = connect(&self.url, &format!("dovetail {}", self.connector), self.timeout).await?;
        let jetstream = jetstream::ContextBuilder::new().timeout(self.timeout).build(connection.client.clone());
        Ok(Session { connection, jetstream })
    }

    /// What a failure means. A permissions violation arrives apart from the
    /// publish (the server drops the message and says so on the connection),
    /// so a publish that timed out after one counts as denied.
    fn judge(&self, failure: Failure, started: Instant) -> (Answer, Option<String>) {
        let session = self.session.get();
        if matches!(failure, Failure::Disconnected) {
            // Reconnecting: refused credentials (rotated, revoked) show as
            // failed reconnects, each a few seconds apart.
            let recently = started.checked_sub(RECONNECT_MEMORY).unwrap_or(started);
            if let Some(denial) = session.and_then(|s| s.connection.denied_since(recently)) {
                return (Answer::Service(ServiceAnswer::Denied), Some(denial));
            }
        }
        if matches!(failure, Failure::TimedOut | Failure::Publish(PublishErrorKind::TimedOut, _)) {
            if let Some(denial) = session.and_then(|s| s.connection.denied_since(started)) {
                return (Answer::Service(ServiceAnswer::Denied), Some(denial));
            }
            if session.is_some_and(|s| s.connection.client.connection_state() != State::Connected) {
                return (
                    Answer::Connection,
                    Some(format!("lost the connection to NATS at {}; reconnecting", self.server)),
                );
            }
        }
        let (answer, detail) = failure.answer(&self.subject, &self.server, self.timeout);
        (answer, Some(detail))
    }
}

/// Why a publish did not get its acknowledgement.
#[derive(Debug)]
enum Failure {
    Connect(NatsConnectError),
    /// The client is between connections.
    Disconnected,
    /// A header value that cannot go on the wire.
    Header(String),
    Publish(PublishErrorKind, String),
    TimedOut,
}

impl Failure {
    fn answer(&self, subject: &str, server: &str, timeout: Duration) -> (Answer, String) {
        match self {
            Failure::Connect(e) if e.denied => (Answer::Service(ServiceAnswer::Denied), e.to_string()),
            Failure::Connect(e) => (Answer::Connection, e.to_string()),
            Failure::Disconnected => {
                (Answer::Connection, format!("not connected to NATS at {server}; the client is reconnecting"))
            }
            Failure::Header(reason) => (Answer::Service(ServiceAnswer::Refused), reason.clone()),
            Failure::TimedOut => (Answer::Timeout, format!("no acknowledgement from JetStream within {timeout:?}")),
            Failure::Publish(kind, message) => {
                let detail = match kind {
                    PublishErrorKind::StreamNotFound => format!(
                        "no JetStream stream captures subject `{subject}` (no responders; right after a NATS \
                         restart JetStream may not be ready yet): add the subject to a stream's subjects"
                    ),
                    PublishErrorKind::TimedOut => format!("no acknowledgement from JetStream within {timeout:?}"),
                    _ => format!("JetStream did not take the message: {message}"),
                };
                (publish_answer(*kind), detail)
            }
        }
    }
}

/// What a failed publish means for the record.
fn publish_answer(kind: PublishErrorKind) -> Answer {
    match kind {
        // No responders: nothing stores the subject, or JetStream is not
        // ready yet (right after a NATS restart). Retried within the
        // record's budget: a subject no stream captures still ends
        // dead-lettered, not lost, after the retries.
        PublishErrorKind::StreamNotFound => Answer::Service(ServiceAnswer::Unavailable),
        // Too large for the server: sending it again changes nothing.
        PublishErrorKind::MaxPayloadExceeded => Answer::Service(ServiceAnswer::Refused),
        PublishErrorKind::TimedOut => Answer::Timeout,
        PublishErrorKind::BrokenPipe => Answer::Connection,
        PublishErrorKind::MaxAckPending
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence
        | PublishErrorKind::Other => Answer::Service(ServiceAnswer::Unavailable),
    }
}

/// `Nats-Msg-Id`, `X-Correlation-ID` and `Content-Type`. A value with a
/// control character (CR, LF) would break the protocol's header block: the
/// correlation id and content type are then left out, a bad message id
/// refuses the record.
fn headers(out: &Outbound<'_>) -> Result<async_nats::HeaderMap, Failure> {
    let mut headers = async_nats::HeaderMap::new();
    let Some(id) = header_value(out.idempotency_key) else {
        return Err(Failure::Header(format!(
            "the idempotency key {:?} cannot be a NATS header value",
            out.idempotency_key
        )));
    };
    headers.insert(MSG_ID_HEADER, id);
    if let Some(correlation) = header_value(out.correlation_id) {
        headers.insert("X-Correlation-ID", correlation);
    }
    if let Some(content_type) = out.content_type.and_then(header_value) {
        headers.insert("Content-Type", content_type);
    }
    Ok(headers)
}

fn header_value(value: &str) -> Option<&str> {
    let value = value.trim();
    (!value.is_empty() && !value.chars().any(char::is_control)).then_some(value)
}

/// A client and what the server said on the side.
pub struct NatsConnection {
    pub client: async_nats::Client,
    notices: Arc<Notices>,
}

impl NatsConnection {
    /// The last permissions or authorization violation the server reported
    /// at or after `since`.
    pub fn denied_since(&self, since: Instant) -> Option<String> {
        let last = self.notices.denial.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().filter(|(at, _)| *at >= since).map(|(_, text)| text.clone())
    }
}

/// Server errors that arrive on the connection rather than as an answer.
#[derive(Default)]
struct Notices {
    denial: Mutex<Option<(Instant, String)>>,
}

impl Notices {
    fn heard(&self, event: async_nats::Event) {
        let text = match event {
            async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
                "NATS refused the credentials (authorization violation)".to_string()
            }
            // A reconnect refused.
            async_nats::Event::ClientError(async_nats::ClientError::Other(text))
                if text.contains("authorization violation") =>
            {
                "NATS refused the credentials when reconnecting (authorization violation)".to_string()
            }
            async_nats::Event::ServerError(async_nats::ServerError::Other(text))
                if text.to_ascii_lowercase().contains("permissions violation") =>
            {
                format!("NATS refused: {text}")
            }
            _ => return,
        };
        *self.denial.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), text));
    }
}

/// The connection could not be made.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot connect to NATS at {server}: {reason}")]
pub struct NatsConnectError {
    /// Without credentials.
    pub server: String,
    pub reason: String,
    /// The server refused the credentials.
    pub denied: bool,
}

/// Connects to the server of `url` (`nats://[user:password@]host[:port]`,
/// or `nats://token@host`), giving up after `timeout`. The client then
/// reconnects by itself for ever.
pub async fn connect(url: &Secret, name: &str, timeout: Duration) -> Result<NatsConnection, NatsConnectError> {
    let server = without_credentials(url.expose());
    let failed = |reason: String, denied: bool| NatsConnectError { server: server.clone(), reason, denied };
    let (address, credentials) = parse_url(url.expose()).map_err(|reason| failed(reason, false))?;
    let notices = Arc::new(Notices::default());
    let heard = notices.clone();
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(timeout)
        .ping_interval(PING_INTERVAL)
        // The address given is the address used: no servers learnt from
        // the cluster, whose names may not resolve here.
        .ignore_discovered_servers()
        .event_callback(move |event| {
            let heard = heard.clone();
            async move { heard.heard(event) }
        });
    options = match credentials {
        Credentials::None => options,
        Credentials::Token(token) => options.token(token),
        Credentials::UserPassword(user, password) => options.user_and_password(user, password),
    };
    let client = async_nats::connect_with_options(address, options).await.map_err(|e| {
        let denied = matches!(e.kind(), ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication);
        failed(e.to_string(), denied)
    })?;
    Ok(NatsConnection { client, notices })
}

/// How the URL authenticates.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    None,
    /// `nats://TOKEN@host`.
    Token(String),
    UserPassword(String, String),
}

/// The server address without credentials, and the credentials apart
/// (percent-decoded).
fn parse_url(url: &str) -> Result<(ServerAddr, Credentials), String> {
    let with: ServerAddr = url.parse().map_err(|e: std::io::Error| e.to_string())?;
    let credentials = match (with.username(), with.password()) {
        (Some(user), Some(password)) => Credentials::UserPassword(percent_decoded(user), percent_decoded(password)),
        (Some(token), None) => Credentials::Token(percent_decoded(token)),
        _ => Credentials::None,
    };
    let host = with.host();
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    let without: ServerAddr =
        format!("{}://{host}:{}", with.scheme(), with.port()).parse().map_err(|e: std::io::Error| e.to_string())?;
    Ok((without, credentials))
}

/// `%XX` escapes decoded (a URL's user and password); anything malformed is
/// kept as written.
pub(crate) fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b))) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_failures_map_onto_answers() {
        assert_eq!(publish_answer(PublishErrorKind::StreamNotFound), Answer::Service(ServiceAnswer::Unavailable));
        assert_eq!(publish_answer(PublishErrorKind::MaxPayloadExceeded), Answer::Service(ServiceAnswer::Refused));
        assert_eq!(publish_answer(PublishErrorKind::TimedOut), Answer::Timeout);
        assert_eq!(publish_answer(PublishErrorKind::BrokenPipe), Answer::Connection);
        assert_eq!(publish_answer(PublishErrorKind::MaxAckPending), Answer::Service(ServiceAnswer::Unavailable));
        assert_eq!(publish_answer(PublishErrorKind::Other), Answer::Service(ServiceAnswer::Unavailable));
    }

    #[test]
    fn a_missing_stream_is_explained() {
        let (answer, detail) = Failure::Publish(PublishErrorKind::StreamNotFound, "no responders".into()).answer(
            "orders.accepted",
            "nats://h:4222",
            Duration::from_secs(5),
        );
        assert_eq!(answer, Answer::Service(ServiceAnswer::Unavailable), "retried: JetStream may be restarting");
        assert!(detail.contains("no JetStream stream captures subject `orders.accepted`"), "{detail}");
    }

    #[test]
    fn refused_credentials_are_denied_other_connect_failures_are_connection() {
        let e = |denied| NatsConnectError { server: "nats://h:4222".into(), reason: "x".into(), denied };
        assert_eq!(Failure::Connect(e(true)).answer("s", "", Duration::ZERO).0, Answer::Service(ServiceAnswer::Denied));
        assert_eq!(Failure::Connect(e(false)).answer("s", "", Duration::ZERO).0, Answer::Connection);
        assert_eq!(Failure::Disconnected.answer("s", "", Duration::ZERO).0, Answer::Connection);
        assert_eq!(Failure::TimedOut.answer("s", "", Duration::ZERO).0, Answer::Timeout);
    }

    #[test]
    fn refusals_on_the_side_are_remembered() {
        let notices = Notices::default();
        let before = Instant::now();
        notices.heard(async_nats::Event::Disconnected);
        assert!(notices.denial.lock().unwrap().is_none());
        notices.heard(async_nats::Event::ServerError(async_nats::ServerError::Other(
            "Permissions Violation for Publish to \"orders\"".into(),
        )));
        let denial = notices.denial.lock().unwrap().clone().unwrap();
        assert!(denial.0 >= before && denial.1.contains("Permissions Violation"), "{denial:?}");
        notices.heard(async_nats::Event::ClientError(async_nats::ClientError::Other("authorization violation".into())));
        assert!(notices.denial.lock().unwrap().as_ref().unwrap().1.contains("reconnecting"));
    }

    #[test]
    fn credentials_are_taken_out_of_the_address() {
        let (address, credentials) = parse_url("nats://me:p%40ss@127.0.0.1:4223").unwrap();
        assert_eq!(address.as_url_str(), "nats://127.0.0.1:4223");
        assert_eq!(credentials, Credentials::UserPassword("me".into(), "p@ss".into()));
        let (address, credentials) = parse_url("nats://s3cr3t@nats.internal").unwrap();
        assert_eq!(address.as_url_str(), "nats://nats.internal:4222");
        assert_eq!(credentials, Credentials::Token("s3cr3t".into()));
        let (address, credentials) = parse_url("nats://[::1]:4222").unwrap();
        assert_eq!(address.host(), "::1");
        assert_eq!(credentials, Credentials::None);
        assert!(parse_url("nats://exa mple:x").is_err());
    }

    #[test]
    fn percent_escapes_are_decoded_and_malformed_ones_kept() {
        assert_eq!(percent_decoded("a%2Fb%3a"), "a/b:");
        assert_eq!(percent_decoded("100%"), "100%");
        assert_eq!(percent_decoded("%zz"), "%zz");
    }

    #[test]
    fn headers_carry_the_key_and_drop_unsafe_values() {
        let out = Outbound {
            payload: b"{}",
            content_type: Some("application/json\r\nX-Evil: 1"),
            idempotency_key: "dt1-abc",
            correlation_id: "corr-1",
        };
        let h = headers(&out).unwrap();
        assert_eq!(h.get(MSG_ID_HEADER).map(|v| v.as_str()), Some("dt1-abc"));
        assert_eq!(h.get("X-Correlation-ID").map(|v| v.as_str()), Some("corr-1"));
        assert!(h.get("Content-Type").is_none());
        let bad = Outbound { idempotency_key: "a\nb", ..out };
        assert!(matches!(headers(&bad), Err(Failure::Header(_))));
    }

    #[test]
    fn debug_shows_no_password() {
        let sink = NatsSink::new(
            "bus",
            Secret::new("nats://me:hunter2@127.0.0.1:4222".into()),
            "orders",
            Duration::from_secs(1),
        );
        let shown = format!("{sink:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("nats://127.0.0.1:4222"), "{shown}");
    }
}
