//! The HTTP sink: one request per record to a named connector.
//!
//! Every request carries the connector's pinned API version header, its
//! credentials, the record's deterministic `Idempotency-Key` (the same on
//! every retry and after a restart) and its correlation id, both as
//! `X-Correlation-ID` and as a W3C `traceparent`.

use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::oauth::TokenSource;

use dovetail_core::clock::Timestamp;
use dovetail_core::config::{BatchResults, HttpConnector, ResolvedAuth, Secret};
use dovetail_core::policy::{Answer, LimitHint, parse_retry_after};

/// How much of a partner's response body is kept for the DLQ and logs.
pub const BODY_EXCERPT_LIMIT: usize = 4096;

/// A connector or sink that cannot be built from its (already checked) config.
#[derive(Debug, thiserror::Error)]
pub enum HttpSinkError {
    #[error("connector `{connector}`: header `{header}` cannot be sent: {reason}")]
    BadHeader { connector: String, header: String, reason: String },
    #[error("connector `{connector}`: cannot build the HTTP client: {reason}")]
    Client { connector: String, reason: String },
    #[error("connector `{connector}`: `{method}` is not an HTTP method")]
    BadMethod { connector: String, method: String },
}

/// What one attempt produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    pub answer: Answer,
    pub duration: Duration,
    /// Start of the response body (or the transport error), for the DLQ.
    pub detail: Option<String>,
    /// What the partner said about its rate limit.
    pub hint: LimitHint,
}

/// The record-specific parts of a request.
#[derive(Debug, Clone, Copy)]
pub struct Outbound<'a> {
    pub payload: &'a [u8],
    pub content_type: Option<&'a str>,
    pub idempotency_key: &'a str,
    pub correlation_id: &'a str,
}

/// hyper's pooled client (HTTP/1.1 and HTTP/2 over rustls), without
/// reqwest's per-request layers.
type DirectClient = hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<TcpConnector>, Full<Bytes>>;

/// A connector's HTTP clients, shared by every flow that uses it.
#[derive(Clone)]
pub struct ConnectorClient {
    /// For token fetches, pollers' pages, and records whose partner is
    /// reached through a proxy (`HTTPS_PROXY` and the like).
    pub general: reqwest::Client,
    /// For records' sends, when no proxy applies: hyper's pooled client
    /// directly. Per request, reqwest's redirect layer (the engine follows
    /// no redirects), URL re-parsing and header merging cost about as much
    /// CPU as the rest of the send (see the README's profile).
    direct: DirectClient,
    /// The proxy settings `general` reads from the environment.
    proxies: Arc<Matcher>,
}

/// One flow's HTTP sink through one connector.
#[derive(Clone)]
pub struct HttpSink {
    connector: String,
    client: reqwest::Client,
    /// The direct client and the target as a URI, unless a proxy applies.
    direct: Option<(DirectClient, http::Uri)>,
    method: reqwest::Method,
    /// For display: without credentials.
    url: String,
    /// What is requested: may carry an API key in its query.
    target: reqwest::Url,
    headers: HeaderMap,
    timeout: Duration,
    /// OAuth 2.0 bearer tokens, shared by the connector's flows.
    tokens: Option<Arc<TokenSource>>,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink")
            .field("connector", &self.connector)
            .field("method", &self.method)
            .field("url", &self.url)
            .finish()
    }
}

static CRYPTO: Once = Once::new();

/// Installs the process-wide TLS crypto provider (ring: small, builds with cc alone).
/// Idempotent; call before building any `reqwest::Client`.
pub fn install_crypto_provider() {
    CRYPTO.call_once(|| {
        // Another part of the process may have installed one already; that one is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

const USER_AGENT: &str = concat!("dovetail/", env!("CARGO_PKG_VERSION"));

/// The clients for one connector, shared by every flow that uses it.
pub fn client_for(name: &str, c: &HttpConnector) -> Result<ConnectorClient, HttpSinkError> {
    install_crypto_provider();
    let failed = |reason: String| HttpSinkError::Client { connector: name.to_string(), reason };
    let connect_timeout = c.timeout.min(Duration::from_secs(10));
    let general = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .pool_max_idle_per_host(c.max_in_flight)
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| failed(e.to_string()))?;
    // The same TLS as reqwest builds: the process's crypto provider and the
    // platform's certificate verifier, offering HTTP/2 and HTTP/1.1.
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone()).map_err(|e| failed(e.to_string()))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| failed(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let mut tcp = TcpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    // reqwest's defaults: a pooled connection that died silently (a NAT or
    // firewall dropped it) is noticed instead of hanging until the timeout.
    tcp.set_keepalive(Some(Duration::from_secs(15)));
    tcp.set_keepalive_interval(Some(Duration::from_secs(15)));
    tcp.set_keepalive_retries(Some(3));
    tcp.set_connect_timeout(Some(connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);
    let direct = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(c.max_in_flight)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector);
    Ok(ConnectorClient { general, direct, proxies: Arc::new(Matcher::from_env()) })
}

impl HttpSink {
    pub fn new(
        connector: &str,
        config: &HttpConnector,
        auth: &ResolvedAuth,
        tokens: Option<Arc<TokenSource>>,
        client: ConnectorClient,
        method: &str,
        path: &str,
    ) -> Result<HttpSink, HttpSinkError> {
        let bad = |header: &str, reason: String| HttpSinkError::BadHeader {
            connector: connector.to_string(),
            header: header.to_string(),
            reason,
        };
        let mut headers = HeaderMap::new();
        let mut put = |name: &str, value: &str, sensitive: bool| -> Result<(), HttpSinkError> {
            let n = HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad(name, e.to_string()))?;
            let mut v = HeaderValue::from_str(value).map_err(|e| bad(name, e.to_string()))?;
            v.set_sensitive(sensitive);
            headers.insert(n, v);
            Ok(())
        };
        for (name, value) in &config.headers {
            put(name, value, false)?;
        }
        if let Some(v) = &config.api_version {
            put(&v.header, &v.value, false)?;
        }
        if let Some((name, value)) = &auth.header {
            // A bad credential must not be echoed into an error message.
            put(name, value.expose(), true)
                .map_err(|_| bad(name, "the credential has characters a header cannot carry".into()))?;
        }
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| HttpSinkError::BadMethod { connector: connector.to_string(), method: method.to_string() })?;
        let url = format!("{}{}", config.base_url.trim_end_matches('/'), path);
        let mut target = reqwest::Url::parse(&url)
            .map_err(|e| HttpSinkError::Client { connector: connector.to_string(), reason: format!("`{url}`: {e}") })?;
        if let Some((name, value)) = &auth.query {
            target.query_pairs_mut().append_pair(name, value.expose());
        }
        // Records go through the direct client unless a proxy applies or
        // the URL carries credentials (`https://user:pass@host`), which
        // reqwest turns into a Basic header and the direct client would
        // drop. The URL was already parsed; a URI refusing it (it should
        // not) just means the general client sends.
        let userinfo = !target.username().is_empty() || target.password().is_some();
        let direct = http::Uri::try_from(target.as_str())
            .ok()
            .filter(|uri| !userinfo && client.proxies.intercept(uri).is_none())
            .map(|uri| (client.direct.clone(), uri));
        Ok(HttpSink {
            connector: connector.to_string(),
            client: client.general,
            direct,
            method,
            url,
            target,
            headers,
            timeout: config.timeout,
            tokens,
        })
    }

    pub fn connector(&self) -> &str {
        &self.connector
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Performs one attempt. `now` resolves an HTTP-date `Retry-After`.
    ///
    /// With OAuth, a 401 means the token may have expired early or been
    /// revoked: the token is renewed once and the request sent again, with
    /// the same idempotency key. A second 401 is the answer.
    pub async fn send(&self, out: Outbound<'_>, now: impl Fn() -> Timestamp) -> AttemptResult {
        self.send_reading(out, BODY_EXCERPT_LIMIT, now).await
    }

    /// Sends many records in one request to a bulk endpoint: the body is a
    /// JSON array of their payloads (each already known to be JSON), and
    /// `key` the batch's idempotency key (the journal binds it to the records).
    pub async fn send_batch(
        &self,
        items: &[Outbound<'_>],
        key: &str,
        results: BatchResults,
        results_field: &str,
        now: impl Fn() -> Timestamp,
    ) -> BatchResult {
        let mut body = Vec::with_capacity(items.iter().map(|i| i.payload.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item.payload);
        }
        body.push(b']');
        let correlation_id = items.first().map_or("", |i| i.correlation_id);
        let out =
            Outbound { payload: &body, content_type: Some("application/json"), idempotency_key: key, correlation_id };
        let mut request = self.send_reading(out, BATCH_BODY_LIMIT, now).await;
        let items = match (&request.answer, results) {
            (Answer::Status { status: 200..=299, .. }, BatchResults::PerItem) => {
                read_item_results(request.detail.as_deref().unwrap_or(""), results_field, items.len())
            }
            _ => Ok(None),
        };
        if let Some(d) = request.detail.as_mut()
            && d.len() > BODY_EXCERPT_LIMIT
        {
            let mut cut = BODY_EXCERPT_LIMIT;
            while !d.is_char_boundary(cut) {
                cut -= 1;
            }
            d.truncate(cut);
        }
        BatchResult { request, items }
    }

    async fn send_reading(&self, out: Outbound<'_>, body_limit: usize, now: impl Fn() -> Timestamp) -> AttemptResult {
        let Some(tokens) = &self.tokens else { return self.send_once(out, None, body_limit, &now).await };
        let started = Instant::now();
        let token = match tokens.bearer().await {
            Ok(t) => t,
            Err(failed) => return failed,
        };
        let first = self.send_once(out, Some(&token), body_limit, &now).await;
        if !matches!(first.answer, Answer::Status { status: 401, .. }) {
            return first;
        }
        let token = match tokens.renew_after_rejection(&token).await {
            Ok(t) => t,
            Err(failed) => return failed,
        };
        let mut second = self.send_once(out, Some(&token), body_limit, &now).await;
        second.duration = started.elapsed();
        second
    }

    async fn send_once(
        &self,
        out: Outbound<'_>,
        bearer: Option<&Secret>,
        body_limit: usize,
        now: &impl Fn() -> Timestamp,
    ) -> AttemptResult {
        let started = Instant::now();
        let headers = match self.record_headers(out, bearer, started) {
            Ok(h) => h,
            Err(unsent) => return unsent,
        };
        if let Some((client, uri)) = &self.direct {
            return self.send_direct(client, uri, (out, bearer, headers), body_limit, now, started).await;
        }
        let request = self
            .client
            .request(self.method.clone(), self.target.clone())
            .headers(headers)
            .timeout(self.timeout)
            .body(out.payload.to_vec());
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return transport_failure(e, started),
        };
        let (answer, hint) = answer_of(response.status(), response.headers(), now());
        let body = read_excerpt(response, body_limit).await;
        let detail = match body {
            Ok(b) if b.is_empty() => None,
            Ok(b) => Some(b),
            // The status arrived; a body cut short does not change what it means.
            Err(e) => Some(format!("(response body unreadable: {})", error_chain(&e.without_url()))),
        };
        AttemptResult { answer, duration: started.elapsed(), detail, hint }
    }

    /// One record's request headers: the connector's, what reqwest adds
    /// when they do not say otherwise, and the record's own. `Err` is the
    /// attempt's result when one of them cannot be sent in a header.
    fn record_headers(
        &self,
        out: Outbound<'_>,
        bearer: Option<&Secret>,
        started: Instant,
    ) -> Result<HeaderMap, AttemptResult> {
        let mut headers = HeaderMap::with_capacity(self.headers.len() + 7);
        headers.extend(self.headers.iter().map(|(n, v)| (n.clone(), v.clone())));
        headers.entry(header::ACCEPT).or_insert(HeaderValue::from_static("*/*"));
        headers.entry(header::USER_AGENT).or_insert(HeaderValue::from_static(USER_AGENT));
        let content_type = out.content_type.unwrap_or("application/json");
        let record_headers = [
            (header::CONTENT_TYPE, content_type),
            (HeaderName::from_static("idempotency-key"), out.idempotency_key),
            (HeaderName::from_static("x-correlation-id"), out.correlation_id),
        ];
        for (name, value) in record_headers {
            let Ok(v) = HeaderValue::from_str(value) else {
                let detail = format!("the record's `{name}` cannot be sent in a header");
                return Err(unsent(Answer::Connection, detail, started));
            };
            headers.insert(name, v);
        }
        if let Some(tp) = traceparent(out.correlation_id).and_then(|tp| HeaderValue::try_from(tp).ok()) {
            headers.insert(HeaderName::from_static("traceparent"), tp);
        }
        if let Some(token) = bearer {
            let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", token.expose())) else {
                let detail = "the partner's token cannot be sent in a header".to_string();
                return Err(unsent(Answer::Status { status: 401, retry_after: None }, detail, started));
            };
            v.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, v);
        }
        Ok(headers)
    }

    /// [`HttpSink::send_once`] through the direct client: the same request
    /// (`headers` from [`HttpSink::record_headers`], body, timeout over the
    /// answer and its body) and the same reading of the answer.
    async fn send_direct(
        &self,
        client: &DirectClient,
        uri: &http::Uri,
        (out, bearer, headers): (Outbound<'_>, Option<&Secret>, HeaderMap),
        body_limit: usize,
        now: &impl Fn() -> Timestamp,
        started: Instant,
    ) -> AttemptResult {
        let deadline = tokio::time::Instant::from_std(started + self.timeout);
        let body = Bytes::copy_from_slice(out.payload);
        let request = |headers: HeaderMap| {
            let mut request = http::Request::new(Full::new(body.clone()));
            *request.method_mut() = self.method.clone();
            *request.uri_mut() = uri.clone();
            *request.headers_mut() = headers;
            request
        };
        let mut sent = tokio::time::timeout_at(deadline, client.request(request(headers))).await;
        // As reqwest does: an HTTP/2 partner that closes the connection
        // gracefully (GOAWAY, NO_ERROR) or refuses the stream has not
        // processed the request; it goes again on another connection (its
        // headers made again: they were sent with the first).
        for _ in 0..2 {
            match &sent {
                Ok(Err(e)) if refused_unprocessed(e) => {
                    let headers = match self.record_headers(out, bearer, started) {
                        Ok(h) => h,
                        Err(unsent) => return unsent,
                    };
                    sent = tokio::time::timeout_at(deadline, client.request(request(headers))).await;
                }
                _ => break,
            }
        }
        let response = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let answer = if timed_out(&e) { Answer::Timeout } else { Answer::Connection };
                return unsent(answer, format!("error sending request: {}", error_chain(&e)), started);
            }
            Err(_) => return unsent(Answer::Timeout, "error sending request: operation timed out".into(), started),
        };
        let (answer, hint) = answer_of(response.status(), response.headers(), now());
        let detail = match tokio::time::timeout_at(deadline, read_body(response.into_body(), body_limit)).await {
            Ok(Ok(b)) if b.is_empty() => None,
            Ok(Ok(b)) => Some(b),
            // The status arrived; a body cut short does not change what it means.
            Ok(Err(e)) => Some(format!("(response body unreadable: {})", error_chain(&e))),
            Err(_) => Some("(response body unreadable: operation timed out)".to_string()),
        };
        AttemptResult { answer, duration: started.elapsed(), detail, hint }
    }
}

/// An attempt that got no answer from the partner.
fn unsent(answer: Answer, detail: String, started: Instant) -> AttemptResult {
    AttemptResult { answer, duration: started.elapsed(), detail: Some(detail), hint: LimitHint::default() }
}

/// An HTTP/2 graceful close (GOAWAY with NO_ERROR) or a refused stream:
/// the partner says it did not process the request (RFC 9113, 8.7).
fn refused_unprocessed(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).filter_map(|e| e.downcast_ref::<h2::Error>()).any(|h2| {
        let reason = h2.reason();
        h2.is_remote()
            && ((h2.is_go_away() && reason == Some(h2::Reason::NO_ERROR))
                || (h2.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM)))
    })
}

/// Whether a transport error was a timeout (connecting, say).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source())
        .any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut))
}

/// Up to `limit` bytes of a body, as text.
async fn read_body(mut body: hyper::body::Incoming, limit: usize) -> Result<String, hyper::Error> {
    let mut buf = Vec::new();
    while buf.len() < limit {
        let Some(frame) = body.frame().await else { break };
        if let Ok(chunk) = frame?.into_data() {
            let room = limit - buf.len();
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// One page read from a partner by a poller.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The request's result; for a 2xx, `detail` is `None` and the body is in `body`.
    pub result: AttemptResult,
    pub body: Option<String>,
    /// The `Link: <...>; rel="next"` target (absolute), when the partner pages that way.
    pub next_link: Option<String>,
}

impl HttpSink {
    /// GETs the sink's URL (or `url`, a next-page link on the same partner)
    /// with `query` added, for a poller: same headers, credentials, OAuth
    /// renewal on a 401, and timeout as a send. Bodies up to 8 MiB are read.
    /// `Err` when nothing was sent: the link leaves the connector's origin.
    pub async fn fetch(
        &self,
        url: Option<&str>,
        query: &[(String, String)],
        correlation_id: &str,
        now: impl Fn() -> Timestamp,
    ) -> Result<Fetched, String> {
        let mut target = match url {
            // A next link (absolute, or relative to the request) must stay on
            // the connector's origin: credentials go nowhere else.
            Some(u) => match self.target.join(u) {
                Ok(t) if t.origin() == self.target.origin() => t,
                _ => return Err(format!("the next-page link `{u}` leaves the connector's origin")),
            },
            None => self.target.clone(),
        };
        if !query.is_empty() {
            target.query_pairs_mut().extend_pairs(query.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        let target = &target;
        let Some(tokens) = &self.tokens else { return Ok(self.fetch_once(target, correlation_id, None, &now).await) };
        let token = match tokens.bearer().await {
            Ok(t) => t,
            Err(failed) => return Ok(Fetched { result: failed, body: None, next_link: None }),
        };
        let first = self.fetch_once(target, correlation_id, Some(&token), &now).await;
        if !matches!(first.result.answer, Answer::Status { status: 401, .. }) {
            return Ok(first);
        }
        Ok(match tokens.renew_after_rejection(&token).await {
            Ok(t) => self.fetch_once(target, correlation_id, Some(&t), &now).await,
            Err(failed) => Fetched { result: failed, body: None, next_link: None },
        })
    }

    async fn fetch_once(
        &self,
        target: &reqwest::Url,
        correlation_id: &str,
        bearer: Option<&Secret>,
        now: &impl Fn() -> Timestamp,
    ) -> Fetched {
        let started = Instant::now();
        let failed = |result| Fetched { result, body: None, next_link: None };
        let mut request = self
            .client
            .get(target.clone())
            .headers(self.headers.clone())
            .header(header::ACCEPT, "application/json")
            .header("x-correlation-id", correlation_id)
            .timeout(self.timeout);
        if let Some(token) = bearer
            && let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        {
            v.set_sensitive(true);
            request = request.header(header::AUTHORIZATION, v);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return failed(transport_failure(e, started)),
        };
        let (answer, hint) = answer_of(response.status(), response.headers(), now());
        let request_url = response.url().clone();
        let next_link = response
            .headers()
            .get_all("link")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(next_link)
            .and_then(|l| request_url.join(&l).ok())
            .map(|u| u.to_string());
        let ok = response.status().is_success();
        let body = read_excerpt(response, BATCH_BODY_LIMIT).await;
        match body {
            Ok(b) if ok => Fetched {
                result: AttemptResult { answer, duration: started.elapsed(), detail: None, hint },
                body: Some(b),
                next_link,
            },
            Ok(b) => failed(AttemptResult { answer, duration: started.elapsed(), detail: Some(b), hint }),
            Err(e) => {
                let detail = Some(format!("(response body unreadable: {})", error_chain(&e.without_url())));
                // A page that cannot be read whole is a failed page.
                let answer = if ok { Answer::Connection } else { answer };
                failed(AttemptResult { answer, duration: started.elapsed(), detail, hint })
            }
        }
    }
}

/// A response's status with its `Retry-After`, and what it says about the rate limit.
fn answer_of(status: http::StatusCode, headers: &HeaderMap, now: Timestamp) -> (Answer, LimitHint) {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let retry_after = text("retry-after").and_then(|v| parse_retry_after(v, now));
    (Answer::Status { status: status.as_u16(), retry_after }, limit_hint(&text, now))
}

/// The `rel="next"` target of an RFC 8288 `Link` header (commas inside
/// `<...>` belong to the URL).
fn next_link(header: &str) -> Option<String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in header.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&header[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&header[start..]);
    parts.into_iter().find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| target.to_string())
    })
}

/// How much of a bulk answer is read to find the per-record results.
pub const BATCH_BODY_LIMIT: usize = 8 * 1024 * 1024;

/// The answer to one bulk request.
#[derive(Debug, Clone)]
pub struct BatchResult {
    /// The request as a whole: transport failures, 5xx, 429, 401 apply to every record.
    pub request: AttemptResult,
    /// Per record, in request order, when the partner said; `Err` when a 2xx
    /// answer's results could not be read (nobody knows what was applied).
    pub items: Result<Option<Vec<ItemAnswer>>, String>,
}

/// One record's result inside a bulk answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemAnswer {
    pub answer: Answer,
    pub detail: Option<String>,
}

/// `{"results": [{"status": 201}, {"status": 422, "error": "..."}]}` → per-item answers.
fn read_item_results(body: &str, field: &str, expected: usize) -> Result<Option<Vec<ItemAnswer>>, String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("the bulk answer is not JSON: {e}"))?;
    let list = if field.is_empty() { Some(&v) } else { v.get(field) };
    let list = list.and_then(|l| l.as_array()).ok_or_else(|| format!("the bulk answer has no `{field}` array"))?;
    if list.len() != expected {
        return Err(format!("the bulk answer has {} results for {expected} records", list.len()));
    }
    // A result without a numeric status says nothing we can trust: reading
    // it as success could lose a refused record, so the whole answer is
    // unreadable and the batch is retried as it was.
    let items = list
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let status = item
                .get("status")
                .and_then(|s| s.as_u64())
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| format!("result {i} of the bulk answer has no numeric `status`: {item}"))?;
            let detail = (!(200..300).contains(&status)).then(|| item.to_string());
            Ok(ItemAnswer { answer: Answer::Status { status, retry_after: None }, detail })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Some(items))
}

/// `RateLimit-Remaining`/`-Reset` (IETF draft, reset in seconds) or the
/// common `X-RateLimit-*` forms, whose reset is often a Unix time.
fn limit_hint<'a>(text: &impl Fn(&str) -> Option<&'a str>, now: Timestamp) -> LimitHint {
    let number = |names: [&str; 2]| names.iter().find_map(|n| text(n)).and_then(|v| v.trim().parse::<u64>().ok());
    let remaining = number(["ratelimit-remaining", "x-ratelimit-remaining"]);
    let reset = number(["ratelimit-reset", "x-ratelimit-reset"]).map(|v| {
        // Times since the epoch are far larger than any sane window; some
        // partners send them in milliseconds.
        if v > 1_000_000_000_000 {
            Timestamp::from_millis(i64::try_from(v).unwrap_or(i64::MAX)).since(now)
        } else if v > 1_000_000_000 {
            Timestamp::from_secs(i64::try_from(v).unwrap_or(i64::MAX)).since(now)
        } else {
            Duration::from_secs(v)
        }
    });
    LimitHint { remaining, reset }
}

/// The URL is left out of transport errors: it may carry an API key.
fn transport_failure(e: reqwest::Error, started: Instant) -> AttemptResult {
    let answer = if e.is_timeout() { Answer::Timeout } else { Answer::Connection };
    unsent(answer, error_chain(&e.without_url()), started)
}

/// The error and its causes on one line ("error sending request: connection closed before message completed").
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

pub(crate) async fn read_excerpt(mut response: reqwest::Response, limit: usize) -> Result<String, reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= limit {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A W3C `traceparent` for a correlation id that is a valid trace-id.
pub(crate) fn traceparent(correlation_id: &str) -> Option<String> {
    let valid = correlation_id.len() == 32
        && correlation_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && correlation_id.bytes().any(|b| b != b'0');
    valid.then(|| format!("00-{correlation_id}-{:016x}-01", fastrand_span_id()))
}

fn fastrand_span_id() -> u64 {
    // Span ids only need to be unique-ish per hop; a zero id is invalid.
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_url_go_through_reqwest_which_sends_them() {
        let sink_for = |base_url: &str| {
            let config: HttpConnector = serde_json::from_value(serde_json::json!({ "base_url": base_url })).unwrap();
            let client = client_for("partner", &config).unwrap();
            HttpSink::new("partner", &config, &Default::default(), None, client, "POST", "/orders").unwrap()
        };
        assert!(sink_for("http://127.0.0.1:9").direct.is_some());
        assert!(sink_for("http://user:secret@127.0.0.1:9").direct.is_none());
        assert!(sink_for("http://user@127.0.0.1:9").direct.is_none());
    }

    #[test]
    fn per_item_results_must_each_say_their_status() {
        let ok = read_item_results(r#"{"results":[{"status":201},{"status":422,"error":"bad"}]}"#, "results", 2)
            .unwrap()
            .unwrap();
        let status = |a: &ItemAnswer| match a.answer {
            Answer::Status { status, .. } => status,
            other => panic!("{other:?}"),
        };
        assert_eq!((status(&ok[0]), status(&ok[1])), (201, 422));
        assert!(ok[1].detail.as_deref().unwrap().contains("bad"));
        for unreadable in [
            r#"{"results":[{"id":1},{"status":201}]}"#,
            r#"{"results":[{"status":"failed"},{"status":201}]}"#,
            r#"{"results":[{"status":201}]}"#,
            r#"{"items":[{"status":201},{"status":201}]}"#,
            "not json",
        ] {
            assert!(read_item_results(unreadable, "results", 2).is_err(), "{unreadable}");
        }
    }

    #[test]
    fn rate_limit_headers_in_both_forms() {
        let now = Timestamp::from_secs(1_800_000_000);
        let ietf = |n: &str| match n {
            "ratelimit-remaining" => Some("7"),
            "ratelimit-reset" => Some("30"),
            _ => None,
        };
        assert_eq!(limit_hint(&ietf, now), LimitHint { remaining: Some(7), reset: Some(Duration::from_secs(30)) });
        let github = |n: &str| match n {
            "x-ratelimit-remaining" => Some("0"),
            "x-ratelimit-reset" => Some("1800000042"),
            _ => None,
        };
        assert_eq!(limit_hint(&github, now), LimitHint { remaining: Some(0), reset: Some(Duration::from_secs(42)) });
        assert_eq!(limit_hint(&|_: &str| Some("soon"), now), LimitHint::default());
    }

    #[test]
    fn link_headers_give_the_next_page() {
        let h =
            r#"<https://api.example.com/items?page=1>; rel="prev", <https://api.example.com/items?page=3>; rel="next""#;
        assert_eq!(next_link(h).as_deref(), Some("https://api.example.com/items?page=3"));
        assert_eq!(
            next_link(r#"<https://a.example/x?after=9>; rel=next"#).as_deref(),
            Some("https://a.example/x?after=9")
        );
        assert_eq!(next_link(r#"<https://a.example/x?page=1>; rel="first""#), None);
        assert_eq!(
            next_link(r#"</items?fields=id,name&page=2>; rel="next""#).as_deref(),
            Some("/items?fields=id,name&page=2"),
            "commas inside the URL"
        );
    }

    #[test]
    fn traceparent_only_for_trace_ids() {
        let tp = traceparent("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-01"), "{tp}");
        assert_eq!(tp.len(), 55);
        assert_eq!(traceparent("req-7"), None);
        assert_eq!(traceparent("00000000000000000000000000000000"), None);
    }
}
