//! A fake partner HTTP API that misbehaves on cue.
//!
//! Dovetail forwards records to partner APIs that time out, rate-limit, reject
//! payloads and drop connections, and it must deliver every record exactly
//! once in effect: a retry may never apply a record a second time. To test
//! that, [`Partner`] stands in for a partner on `127.0.0.1` and
//!
//! * answers each request according to a [`Behaviour`]: a script of
//!   [`Reply`]s for the first requests, a default after that, and per-payload
//!   overrides (one poisoned record that always fails);
//! * enforces `Idempotency-Key` semantics like a well-behaved partner
//!   (draft-ietf-httpapi-idempotency-key-header): replays the stored response
//!   for a key that was already committed, answers 409 while the first request
//!   with that key is still being processed, 400 when the header is missing;
//! * optionally enforces a server-side rate limit ([`RateLimit`], a token
//!   bucket) with 429 and `Retry-After`, and counts requests that ignored a
//!   `Retry-After` it sent ([`Stats::retry_after_violations`]);
//! * optionally acts as an OAuth 2.0 authorization server ([`OAuth`]): it
//!   issues short-lived bearer tokens at a token endpoint and refuses API
//!   requests whose token is missing, unknown or expired;
//! * optionally serves a bulk endpoint ([`Behaviour::bulk`]) that takes a
//!   JSON array, commits one effect per item and answers per item, with
//!   chosen items rejected ([`Behaviour::fail_item`]);
//! * records every committed [`Effect`] and every [`SeenRequest`], so a test
//!   can ask for [`Partner::double_effects`] (the bug Dovetail must never
//!   have), inspect headers and arrival times (backoff, `Retry-After`) or ask
//!   for the peak request rate ([`Partner::requests_per_window`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use dovetail_testkit::partner::{Behaviour, Partner, Reply};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! // The first delivery is applied but its response is lost; later ones succeed.
//! let partner = Partner::start(Behaviour::script(vec![Reply::DropAfterCommit], Reply::Ok)).await?;
//! let base_url = partner.url(); // point the connector under test here
//! # let _ = base_url;
//! // ... have Dovetail deliver three records, then:
//! partner
//!     .wait_until(Duration::from_secs(30), |s| s.effects >= 3)
//!     .await
//!     .expect("all records delivered");
//! assert!(partner.double_effects().is_empty(), "a record was applied twice");
//! partner.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Why raw TCP
//!
//! The server is a small hand-written HTTP/1.1 implementation on
//! [`tokio::net::TcpListener`] rather than a web framework, because the
//! interesting failures are about *when* the connection dies:
//! [`Reply::DropAfterCommit`] closes the socket after the effect happened but
//! before a single response byte is written, which is exactly the case where
//! a client cannot know whether its request took effect. It also keeps the
//! double cheap enough to serve as a sink for benchmarks: with
//! [`Reply::Ok`] a connection costs one buffered read and one buffered write
//! per request, and no lock is held while doing I/O.
//!
//! # HTTP subset
//!
//! Request line, headers up to the empty line (64 KiB at most, otherwise 431),
//! body framed by `Content-Length` (16 MiB at most, otherwise 413). Requests
//! with `Transfer-Encoding` (chunked bodies) get 411 and the connection is
//! closed; malformed requests get 400 and the connection is closed.
//! Connections are persistent (several requests per connection, as pooling
//! clients such as reqwest expect; pipelined requests are answered in order)
//! unless the client sends `Connection: close` or speaks HTTP/1.0 without
//! `Connection: keep-alive`. `Expect: 100-continue` is answered. Every
//! response carries `Content-Type: application/json` and `Content-Length`.
//!
//! # How a request is answered
//!
//! Each request is decided atomically under one lock, in this order:
//!
//! 0. If [`Behaviour::oauth`] is set: a request to its
//!    [`token_path`](OAuth::token_path) is answered by the token endpoint and
//!    nothing below applies to it (see [`OAuth`]). Every other request needs
//!    a valid `Authorization: Bearer` token, or gets 401
//!    `{"error":"invalid_token"}` with `WWW-Authenticate: Bearer
//!    error="invalid_token"`, no effect.
//! 1. [`Behaviour::require_headers`]: a missing or different header gets 401
//!    (for `authorization`) or 400, no effect.
//! 2. If [`Behaviour::rate_limit`] is set: the request takes a token from the
//!    bucket, or, if there is none, gets 429 `{"error":"rate limited"}` with
//!    a `Retry-After` (see [`RateLimit`]), no effect. This applies to every
//!    request that passed step 1, including retries of a committed key and
//!    requests without `Idempotency-Key`.
//! 3. If [`Behaviour::enforce_idempotency`]: no `Idempotency-Key` gets 400
//!    `{"error":"Idempotency-Key header required"}`; a key whose effect was
//!    committed gets the original 200 response replayed with
//!    `Idempotent-Replayed: true`; a key whose effect is committed but whose
//!    response is still pending ([`Reply::SlowAfterCommit`]) gets 409.
//! 4. Otherwise the [`Reply`] is chosen: the first [`Behaviour::by_body`]
//!    entry whose needle occurs in the body, else the next unused
//!    [`Behaviour::script`] entry, else [`Behaviour::default`]. Only requests
//!    that reach this step consume a script entry, and a `by_body` match does
//!    not consume one. On the bulk endpoint, a committing reply commits the
//!    batch item by item (see [`Behaviour::bulk`]).
//!
//! A key is remembered only once its effect was committed (`Ok`,
//! `SlowAfterCommit`, `DropAfterCommit`); requests that were refused or
//! dropped before the commit can be retried with the same key and are then
//! processed afresh, as a real partner would.
//!
//! Independently of these steps, every request that arrives after the partner
//! sent a `Retry-After` (from the rate limiter, or a [`Reply::RetryAfter`]
//! whose value is delay-seconds or an HTTP-date) and before the instant it
//! named counts as a [`Stats::retry_after_violations`]. The partner remembers
//! the latest such instant it told any client, across all connections, so a
//! request by another client counts as well, as it would against a real
//! partner's per-account limit. Requests to the OAuth token endpoint, which
//! is not rate-limited, do not count.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// How many requests [`Partner::requests`] keeps; later requests are still
/// answered and counted in [`Stats::requests`] but not stored.
pub const MAX_RECORDED_REQUESTS: usize = 100_000;

/// Largest accepted request line plus headers, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest accepted request body, in bytes.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Read and write buffer size per connection.
const IO_BUFFER_BYTES: usize = 16 * 1024;
/// How often [`Partner::wait_until`] looks at the stats.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Longest `Retry-After` and `RateLimit-Reset` the rate limiter sends, in
/// seconds (one day); a limit that never refills announces this.
const MAX_WAIT_SECS: u64 = 24 * 60 * 60;

const MISSING_KEY_BODY: &str = r#"{"error":"Idempotency-Key header required"}"#;
const CONFLICT_BODY: &str = r#"{"error":"a request with this Idempotency-Key is still being processed"}"#;
const RETRY_AFTER_BODY: &str = r#"{"error":"try again later"}"#;
const UNAUTHORIZED_BODY: &str = r#"{"error":"missing or invalid authorization"}"#;
const RATE_LIMITED_BODY: &str = r#"{"error":"rate limited"}"#;
const INVALID_TOKEN_BODY: &str = r#"{"error":"invalid_token"}"#;
const BULK_NOT_ARRAY_BODY: &str = r#"{"error":"a bulk body is a JSON array"}"#;

/// The challenge on a 401 for a missing, unknown or expired bearer token
/// (RFC 6750, 3).
const BEARER_CHALLENGE: &[(&str, &str)] = &[("WWW-Authenticate", r#"Bearer error="invalid_token""#)];
/// Token endpoint responses must not be cached (RFC 6749, 5.1).
const NO_STORE: &[(&str, &str)] = &[("Cache-Control", "no-store"), ("Pragma", "no-cache")];
/// A token endpoint 401 for a client that authenticated with HTTP Basic
/// (RFC 6749, 5.2).
const BASIC_CHALLENGE: &[(&str, &str)] =
    &[("WWW-Authenticate", r#"Basic realm="token""#), ("Cache-Control", "no-store"), ("Pragma", "no-cache")];

/// What the partner does with one request that reached the reply step (see
/// the [module docs](self) for the order of checks).
#[derive(Clone, Debug)]
pub enum Reply {
    /// Commit the effect and answer `200 {"ok":true,"effect":N}`, where `N`
    /// is the effect's [`Effect::seq`].
    Ok,
    /// No effect; answer with this status and this body verbatim (for
    /// example 422 with a JSON error, 401, 400 or 503).
    Status {
        /// HTTP status code.
        status: u16,
        /// Response body, sent as is with `Content-Type: application/json`.
        body: String,
    },
    /// No effect; answer with this status (typically 429 or 503) and a
    /// `Retry-After` header carrying `value` verbatim (delay-seconds or an
    /// HTTP-date, or something malformed on purpose).
    RetryAfter {
        /// HTTP status code.
        status: u16,
        /// Value of the `Retry-After` header, not validated.
        value: String,
    },
    /// Commit the effect, then wait this long before answering 200. Models a
    /// client timeout after the effect already happened; while waiting, a
    /// request with the same `Idempotency-Key` gets 409.
    SlowAfterCommit(Duration),
    /// Commit the effect, then close the connection without writing any
    /// response byte. The client cannot tell whether its request took effect.
    DropAfterCommit,
    /// Close the connection without effect and without any response.
    DropBeforeCommit,
}

/// The partner's script: how it answers requests. Change it while running
/// with [`Partner::set_behaviour`].
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Replies used in order for the first requests that reach the reply
    /// step, one per request, across all connections.
    pub script: Vec<Reply>,
    /// Reply used once the script is exhausted.
    pub default: Reply,
    /// If the request body contains the needle (a byte substring), use that
    /// reply instead of the script or default; checked in order, before the
    /// script, and does not consume a script entry. Lets a test make one
    /// record always fail, e.g. with 422.
    pub by_body: Vec<(String, Reply)>,
    /// Enforce `Idempotency-Key` semantics (replay, 409 while in progress,
    /// 400 without the header). When false, every commit is a new effect even
    /// for a repeated key, which makes double effects observable.
    pub enforce_idempotency: bool,
    /// Headers that must be present with exactly this value (names compared
    /// case-insensitively, values byte for byte after trimming surrounding
    /// whitespace). Otherwise the request gets 401 if the name is
    /// `authorization`, else 400, and has no effect.
    pub require_headers: Vec<(String, String)>,
    /// A server-side rate limit, checked after the required headers and
    /// before anything else; `None` (the default) means unlimited.
    pub rate_limit: Option<RateLimit>,
    /// An OAuth 2.0 authorization server in front of the API: a token
    /// endpoint, and bearer tokens required on every other request. `None`
    /// (the default) means no OAuth. Do not combine it with a
    /// [`require_headers`](Behaviour::require_headers) entry for
    /// `authorization`: no request could satisfy both.
    pub oauth: Option<OAuth>,
    /// Path (request target, compared exactly, query included) of a bulk
    /// endpoint that takes a JSON array of records and answers per item; see
    /// [`Behaviour::bulk`]. `None` (the default) means no bulk endpoint.
    pub bulk_path: Option<String>,
    /// Per-item failures on the bulk endpoint: an item whose JSON (as sent)
    /// contains the needle (a byte substring) gets this status in the
    /// results and has no effect; checked in order. See [`Behaviour::bulk`].
    pub bulk_item_failures: Vec<(String, u16)>,
}

/// A server-side rate limit, as partner APIs enforce it: a token bucket that
/// holds up to `burst` tokens, starts full and refills at
/// `requests_per_second` (measured with [`Instant`]). Every request that
/// reaches the limiter (see the [module docs](self)) takes one token; when
/// there is none it is answered 429 `{"error":"rate limited"}` without
/// effect, counted in [`Stats::rate_limited`] and [`Stats::rejected`], and
/// does not consume a script entry.
///
/// The 429 carries `Retry-After` in the [`RetryAfterStyle`] chosen: the
/// seconds until one token is available, rounded up and at least 1 (an
/// HTTP-date is rounded up to the next whole second). A rate that is zero,
/// negative or NaN never refills, and the wait announced is capped at one
/// day. A `burst` of 0 counts as 1.
///
/// With `advertise`, every response to a request that reached
/// [`Partner`]'s decision (2xx, 429 and any other status, but not the 400s for
/// requests that could not be read) also carries `RateLimit-Remaining` (whole
/// tokens left after this request) and `RateLimit-Reset` (seconds until the
/// bucket is full again, rounded up).
///
/// [`Partner::set_behaviour`] keeps the bucket's state if the new behaviour
/// has an equal `rate_limit`, and starts a full bucket otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimit {
    /// Refill rate in tokens (requests) per second; may be fractional, e.g.
    /// `0.5` for one request every two seconds.
    pub requests_per_second: f64,
    /// Bucket capacity: how many requests may arrive back to back.
    pub burst: u32,
    /// How a 429 announces when to come back.
    pub retry_after: RetryAfterStyle,
    /// Send `RateLimit-Remaining` and `RateLimit-Reset` on every response.
    pub advertise: bool,
}

/// An OAuth 2.0 authorization server (RFC 6749) in front of the partner's
/// API, as partner APIs do it, with tokens that may expire every few
/// seconds.
///
/// # Token endpoint
///
/// `POST {token_path}` (the query, if any, is ignored when matching the path)
/// with `Content-Type: application/x-www-form-urlencoded` and
///
/// * `grant_type=client_credentials` (RFC 6749, 4.4), or
/// * `grant_type=refresh_token&refresh_token=...` (RFC 6749, 6), accepted
///   only when [`OAuth::refresh_token`] is set;
/// * an optional `scope`, echoed back in the response.
///
/// The client authenticates either with HTTP Basic, `Authorization: Basic
/// base64(client_id:client_secret)` where both parts are form-urlencoded
/// before encoding (RFC 6749, 2.3.1; `client_secret_basic`), or with
/// `client_id` and `client_secret` form fields (`client_secret_post`). Using
/// both methods in one request (a Basic header *and* a `client_secret` field)
/// is refused with `invalid_request`, as RFC 6749, 2.3 requires; a
/// `client_id` field next to Basic is tolerated if it names the same client.
///
/// Success is `200 {"access_token":"tok_<n>_<random>","token_type":"Bearer",
/// "expires_in":<secs>}`, plus `"refresh_token"` (a new one) for the refresh
/// grant and `"scope"` when one was requested, with `Cache-Control:
/// no-store`. Failures, all with body `{"error":"<code>"}` (RFC 6749, 5.2):
///
/// | status | `error`                  | when                                                               |
/// |--------|--------------------------|--------------------------------------------------------------------|
/// | 400    | `invalid_request`        | not `POST`, not form-urlencoded, malformed or repeated parameters, no `grant_type`, no `refresh_token` for the refresh grant, two client authentication methods |
/// | 401    | `invalid_client`         | no, unknown or wrong client credentials (with `WWW-Authenticate: Basic` if Basic was used) |
/// | 400    | `invalid_grant`          | a refresh token that is not the current one (e.g. already rotated) |
/// | 400    | `unsupported_grant_type` | any other grant, or the refresh grant without [`OAuth::refresh_token`] |
///
/// Client authentication is checked before the grant. Token requests are
/// counted in [`Stats::requests`] and recorded in [`Partner::requests`], and
/// in [`Stats::tokens_issued`] or [`Stats::token_failures`] (failures also in
/// [`Stats::rejected`]). They never consume a script entry, never commit an
/// effect and are exempt from [`Behaviour::by_body`],
/// [`Behaviour::require_headers`], the rate limit (they take no token, get no
/// `RateLimit-*` headers and never count as a `Retry-After` violation) and
/// idempotency enforcement.
///
/// # Protected API
///
/// Every other request must carry `Authorization: Bearer <token>` (scheme
/// case-insensitive) with an access token this partner issued that has not
/// expired by [`Instant`] and was not revoked
/// ([`Partner::revoke_all_tokens`]). Otherwise it is answered 401
/// `{"error":"invalid_token"}` with `WWW-Authenticate: Bearer
/// error="invalid_token"`, without effect and without consuming a script
/// entry, and counted in [`Stats::invalid_token`] and [`Stats::rejected`].
/// This check comes first, before required headers, the rate limiter and
/// idempotency. Tokens in the query or body (RFC 6750, 2.2 and 2.3) are not
/// accepted.
///
/// # Expiry
///
/// An access token is valid for exactly [`OAuth::token_ttl`] after it was
/// issued. `expires_in` advertises the TTL in whole seconds, rounded down
/// and at least 1, so a client that trusts `expires_in` never uses an
/// expired token unless the TTL is below one second. Rotating the client
/// secret ([`Partner::set_client_secret`]) does not invalidate tokens
/// already issued, and revoking tokens does not invalidate the refresh
/// token.
///
/// [`Partner::set_behaviour`] keeps the authorization server's state (issued
/// tokens, rotated refresh token and client secret) if the new behaviour has
/// an equal `oauth`, and starts afresh from the new configuration otherwise
/// (every token issued before is then invalid).
#[derive(Clone, Debug, PartialEq)]
pub struct OAuth {
    /// Path of the token endpoint, e.g. `/oauth/token`.
    pub token_path: String,
    /// The one client the server knows.
    pub client_id: String,
    /// Its secret; see [`Partner::set_client_secret`] to rotate it.
    pub client_secret: String,
    /// Lifetime of every access token, advertised as `expires_in` and
    /// enforced.
    pub token_ttl: Duration,
    /// When set, the refresh token grant is accepted with this token. Each
    /// use rotates it: the response carries a new refresh token and the old
    /// one is refused with `invalid_grant` from then on.
    pub refresh_token: Option<String>,
}

/// The form of the `Retry-After` header on the rate limiter's 429s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAfterStyle {
    /// Delay-seconds, e.g. `Retry-After: 2`.
    Seconds,
    /// An IMF-fixdate, e.g. `Retry-After: Sun, 06 Nov 1994 08:49:37 GMT`.
    HttpDate,
    /// No `Retry-After` header at all (the client has to guess).
    None,
}

impl Default for Behaviour {
    /// No script, default [`Reply::Ok`], no body overrides, idempotency
    /// enforced, no required headers: a well-behaved partner.
    fn default() -> Self {
        Behaviour {
            script: Vec::new(),
            default: Reply::Ok,
            by_body: Vec::new(),
            enforce_idempotency: true,
            require_headers: Vec::new(),
            rate_limit: None,
            oauth: None,
            bulk_path: None,
            bulk_item_failures: Vec::new(),
        }
    }
}

impl Behaviour {
    /// Answer every request with `r` (idempotency enforced).
    pub fn always(r: Reply) -> Self {
        Behaviour { default: r, ..Behaviour::default() }
    }

    /// Answer the first requests with `rs`, in order, then with `then`.
    pub fn script(rs: Vec<Reply>, then: Reply) -> Self {
        Behaviour { script: rs, default: then, ..Behaviour::default() }
    }

    /// Answer every request whose body contains `needle` with `r`, whatever
    /// the script says.
    pub fn fail_body(mut self, needle: &str, r: Reply) -> Self {
        self.by_body.push((needle.to_owned(), r));
        self
    }

    /// Require header `name` (case-insensitive) with exactly `value`.
    pub fn require(mut self, name: &str, value: &str) -> Self {
        self.require_headers.push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// Rate-limit requests to `requests_per_second` with bursts of up to
    /// `burst` (see [`RateLimit`]); 429s carry `Retry-After` in seconds and no
    /// `RateLimit-*` headers are advertised.
    pub fn rate_limited(mut self, requests_per_second: f64, burst: u32) -> Self {
        self.rate_limit =
            Some(RateLimit { requests_per_second, burst, retry_after: RetryAfterStyle::Seconds, advertise: false });
        self
    }

    /// Put an OAuth 2.0 authorization server in front of the API (see
    /// [`OAuth`]): every request other than to the token endpoint then needs
    /// a valid bearer token.
    pub fn oauth(mut self, o: OAuth) -> Self {
        self.oauth = Some(o);
        self
    }

    /// Serve a bulk endpoint at `path` (the whole request target, compared
    /// exactly), like partners' batch APIs.
    ///
    /// A bulk request goes through OAuth, required headers, the rate limit
    /// and request-level `Idempotency-Key` enforcement exactly like any other
    /// request (one token, one key for the whole batch; a replay of a
    /// committed key returns the stored batch response and commits nothing).
    /// The [`Reply`] is then chosen as usual, with [`Behaviour::by_body`]
    /// matched against the whole body, and:
    ///
    /// * [`Reply::Ok`], [`Reply::SlowAfterCommit`], [`Reply::DropAfterCommit`]:
    ///   the body must be a JSON array, otherwise the answer is 400
    ///   `{"error":"a bulk body is a JSON array"}` without effect (and the
    ///   key is not remembered). Each item, in order, is rejected if its
    ///   JSON as sent contains a [`Behaviour::fail_item`] needle (result
    ///   `{"status":<code>,"error":"item rejected"}`, no effect), and
    ///   otherwise committed as one [`Effect`] of its own (body: the item's
    ///   JSON as sent, record id: the item's top-level `"id"`, key and
    ///   correlation id: the request's) with result `{"status":201}`. The
    ///   response is `200 {"results":[...]}`, one result per item in order,
    ///   and this body is what a replay of the key returns. Slow and Drop
    ///   then wait or close as usual, after the items were committed.
    /// * [`Reply::Status`], [`Reply::RetryAfter`], [`Reply::DropBeforeCommit`]:
    ///   apply to the whole batch as usual; no item is committed.
    ///
    /// Rejected items do not count in [`Stats::rejected`]: the request
    /// itself succeeded.
    pub fn bulk(mut self, path: &str) -> Self {
        self.bulk_path = Some(path.to_owned());
        self
    }

    /// On the bulk endpoint (see [`Behaviour::bulk`]), reject every item
    /// whose JSON contains `needle` with `status`, without effect, while the
    /// other items of the batch are applied.
    pub fn fail_item(mut self, needle: &str, status: u16) -> Self {
        self.bulk_item_failures.push((needle.to_owned(), status));
        self
    }
}

/// One committed effect: the partner applied a request, or one item of a
/// bulk request (see [`Behaviour::bulk`]).
#[derive(Clone, Debug)]
pub struct Effect {
    /// Position in commit order, starting at 1; also the `effect` field of
    /// the 200 response.
    pub seq: u64,
    /// The request's `Idempotency-Key` header, if any.
    pub idempotency_key: Option<String>,
    /// The top-level `"id"` field of the JSON body if it is a string or a
    /// number (numbers in their JSON spelling), so effects can be counted per
    /// business record.
    pub record_id: Option<String>,
    /// The `x-correlation-id` header, or else the trace-id of `traceparent`.
    pub correlation_id: Option<String>,
    /// Request target (path and query).
    pub path: String,
    /// Request body; for a bulk item, the item's JSON as sent.
    pub body: Bytes,
}

/// Counters, as returned by [`Partner::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests received, including malformed ones and ones that were
    /// dropped.
    pub requests: u64,
    /// Effects committed (each committed bulk item is one effect).
    pub effects: u64,
    /// Requests answered with a replayed response (committed key).
    pub replays: u64,
    /// Requests answered 409 because their key was in progress.
    pub conflicts: u64,
    /// Requests answered with a non-2xx status (including 409, missing key,
    /// missing required header, refused OAuth token requests and bearer
    /// tokens, and malformed requests).
    pub rejected: u64,
    /// Connections dropped on purpose ([`Reply::DropAfterCommit`] and
    /// [`Reply::DropBeforeCommit`]).
    pub dropped: u64,
    /// Requests refused because `Idempotency-Key` was missing.
    pub missing_key: u64,
    /// Requests answered 429 by the [`RateLimit`] (also counted in
    /// `rejected`; scripted [`Reply::RetryAfter`]s are not counted here).
    pub rate_limited: u64,
    /// Requests that arrived after the partner sent a `Retry-After` and
    /// before the instant it named (see the [module docs](self)). They are
    /// answered as usual.
    pub retry_after_violations: u64,
    /// Access tokens issued by the [`OAuth`] token endpoint.
    pub tokens_issued: u64,
    /// Requests to the [`OAuth`] token endpoint that were refused (also
    /// counted in `rejected`).
    pub token_failures: u64,
    /// API requests refused with 401 `invalid_token` because their bearer
    /// token was missing, unknown, revoked or expired (also counted in
    /// `rejected`).
    pub invalid_token: u64,
    /// Requests to the bulk endpoint ([`Behaviour::bulk`]), whatever their
    /// answer (refused, replayed, failed or dropped ones included; token
    /// endpoint requests excluded).
    pub bulk_requests: u64,
    /// Bulk items committed (also counted in `effects`).
    pub bulk_items: u64,
}

/// A request as the partner saw it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// Request method, as sent.
    pub method: String,
    /// Request target (path and query), as sent.
    pub path: String,
    /// Headers in arrival order, names lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// Request body (empty if it was not read, e.g. a chunked request).
    pub body: Bytes,
    /// When the request line arrived.
    pub at: Instant,
}

impl SeenRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// A running fake partner on `127.0.0.1`. Dropping it, or calling
/// [`Partner::shutdown`], stops the listener and closes every connection.
pub struct Partner {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for Partner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Partner").field("addr", &self.addr).field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl Partner {
    /// Binds `127.0.0.1:0` and starts serving with `behaviour`. Must be called
    /// within a Tokio runtime; the server runs on spawned tasks.
    pub async fn start(behaviour: Behaviour) -> io::Result<Partner> {
        Partner::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), behaviour).await
    }

    /// Like [`Partner::start`], on a chosen address (for `dovetail dev partner`).
    pub async fn start_on(addr: SocketAddr, behaviour: Behaviour) -> io::Result<Partner> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(behaviour));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), stopped));
        Ok(Partner { addr, shared, stop: Some(stop), task: Some(task) })
    }

    /// The address the partner listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL without trailing slash, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the behaviour; applies from the next request decided (a
    /// request already being answered, e.g. a slow one, is not affected).
    /// The new script starts from its first entry. Committed keys, effects,
    /// requests and stats are kept, and so is the rate limiter's bucket if
    /// the new [`Behaviour::rate_limit`] equals the old one (otherwise the
    /// new limit starts with a full bucket), and so is the OAuth state
    /// (issued tokens, rotated secret and refresh token) if the new
    /// [`Behaviour::oauth`] equals the old one (otherwise it starts afresh).
    pub fn set_behaviour(&self, b: Behaviour) {
        let mut st = self.shared.lock();
        if b.rate_limit != st.behaviour.rate_limit {
            st.bucket = None;
        }
        if b.oauth != st.behaviour.oauth {
            st.oauth = b.oauth.clone().map(OAuthServer::new);
        }
        st.behaviour = b;
        st.script_pos = 0;
    }

    /// Revokes every access token issued so far, as if they had all expired
    /// now: the next API request with any of them gets 401 `invalid_token`
    /// and the client has to ask the token endpoint again. The refresh token
    /// stays valid. No effect without [`Behaviour::oauth`].
    pub fn revoke_all_tokens(&self) {
        if let Some(server) = &mut self.shared.lock().oauth {
            server.tokens.clear();
        }
    }

    /// Rotates the client secret: from now on token requests must
    /// authenticate with `secret`, and ones with the old secret get 401
    /// `invalid_client`. Tokens already issued stay valid until they expire.
    /// The rotated secret survives [`Partner::set_behaviour`] with an equal
    /// [`Behaviour::oauth`]. No effect without [`Behaviour::oauth`].
    pub fn set_client_secret(&self, secret: &str) {
        if let Some(server) = &mut self.shared.lock().oauth {
            server.client_secret = secret.to_owned();
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// Every committed effect, in commit order. Effects are kept without a
    /// cap (a small record per effect, sharing the request body), so a
    /// long benchmark grows with the number of effects.
    pub fn effects(&self) -> Vec<Effect> {
        self.shared.lock().effects.clone()
    }

    /// Every request seen, in the order they were decided, up to
    /// [`MAX_RECORDED_REQUESTS`].
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared.lock().requests.clone()
    }

    /// The largest number of recorded requests (see [`Partner::requests`])
    /// whose arrival instants ([`SeenRequest::at`]) fall within any interval
    /// `[t, t + window)`: the peak load a client put on the partner, whatever
    /// the answers were (429s included). Lets a test assert "never more than
    /// N requests in any second". Requests exactly `window` apart are not in
    /// the same window; a zero `window` gives 0.
    pub fn requests_per_window(&self, window: Duration) -> u64 {
        let mut arrivals: Vec<Instant> = self.shared.lock().requests.iter().map(|r| r.at).collect();
        max_in_window(&mut arrivals, window)
    }

    /// Business records (by [`Effect::record_id`]) that were applied more
    /// than once: the double effects Dovetail must never cause. Maps
    /// record id to effect count, only for counts above 1.
    pub fn double_effects(&self) -> BTreeMap<String, u64> {
        let mut counts = self.effects_by_record();
        counts.retain(|_, n| *n > 1);
        counts
    }

    /// Number of effects per [`Effect::record_id`] (effects without a record
    /// id are not counted).
    pub fn effects_by_record(&self) -> BTreeMap<String, u64> {
        let st = self.shared.lock();
        let mut counts = BTreeMap::new();
        for id in st.effects.iter().filter_map(|e| e.record_id.as_deref()) {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
        counts
    }

    /// Waits until `pred(&stats)` holds, checking about every 10 ms, for at
    /// most `timeout`. Returns the stats that satisfied `pred`, or `Err` with
    /// the last stats on timeout. Lets tests wait for delivery without fixed
    /// sleeps; give it a generous timeout, it returns as soon as it can.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&Stats) -> bool) -> Result<Stats, Stats> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let stats = self.stats();
            if pred(&stats) {
                return Ok(stats);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(stats);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Stops accepting, closes every open connection (including ones waiting
    /// in [`Reply::SlowAfterCommit`]) and returns once all of that is done.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Partner {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every
        // connection task and so closes every socket.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// Shared state and the decision logic.

struct Shared {
    state: Mutex<State>,
}

struct State {
    behaviour: Behaviour,
    script_pos: usize,
    stats: Stats,
    effects: Vec<Effect>,
    requests: Vec<SeenRequest>,
    keys: HashMap<String, KeyState>,
    /// The rate limiter's bucket; created full when first needed, dropped
    /// when the limit changes.
    bucket: Option<Bucket>,
    /// The latest `Retry-After` sent: when it was decided, and the instant it
    /// named.
    not_before: Option<(Instant, Instant)>,
    /// The authorization server, present exactly when `behaviour.oauth` is.
    oauth: Option<OAuthServer>,
}

#[derive(Clone, Debug)]
enum KeyState {
    /// Effect committed, response not yet sent.
    InFlight,
    /// Effect committed; the 200 response to replay.
    Done(Committed),
}

/// The body of the 200 answering a committed request.
#[derive(Clone, Debug)]
enum Committed {
    /// One effect with this seq: `{"ok":true,"effect":N}`.
    Effect(u64),
    /// A bulk request: `{"results":[...]}`.
    Bulk(Arc<str>),
}

impl Committed {
    fn body(&self) -> Body {
        match self {
            Committed::Effect(seq) => Body::Effect(*seq),
            Committed::Bulk(body) => Body::Shared(Arc::clone(body)),
        }
    }
}

/// A fully read request, plus what was derived from it outside the lock.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    at: Instant,
    idempotency_key: Option<String>,
    record_id: Option<String>,
    correlation_id: Option<String>,
}

enum Action {
    Respond(Response),
    /// Effect committed; sleep, mark the key done, then answer 200.
    Slow {
        delay: Duration,
        key: Option<String>,
        committed: Committed,
        rate_limit: Option<RateHeaders>,
    },
    /// Close the connection without answering.
    Drop,
}

struct Response {
    status: u16,
    body: Body,
    retry_after: Option<String>,
    replayed: bool,
    rate_limit: Option<RateHeaders>,
    /// Further headers, written as given.
    extra_headers: &'static [(&'static str, &'static str)],
}

/// Values of `RateLimit-Remaining` and `RateLimit-Reset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RateHeaders {
    remaining: u64,
    reset: u64,
}

enum Body {
    /// `{"ok":true,"effect":N}`
    Effect(u64),
    Static(&'static str),
    Text(String),
    Shared(Arc<str>),
}

impl Response {
    fn json(status: u16, body: Body) -> Self {
        Response { status, body, retry_after: None, replayed: false, rate_limit: None, extra_headers: &[] }
    }
}

impl Shared {
    fn new(behaviour: Behaviour) -> Self {
        let oauth = behaviour.oauth.clone().map(OAuthServer::new);
        Shared {
            state: Mutex::new(State {
                behaviour,
                script_pos: 0,
                stats: Stats::default(),
                effects: Vec::new(),
                requests: Vec::new(),
                keys: HashMap::new(),
                bucket: None,
                not_before: None,
                oauth,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not hide the evidence from the test.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides how to answer `req`, commits its effect if any, and records it.
    fn decide(&self, req: Request) -> Action {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.stats.requests += 1;
        let action = st.decide(&req);
        st.record(req);
        action
    }

    /// Counts and records a request that could not be read completely and is
    /// answered with `status`.
    fn malformed(&self, head: Option<Head>) {
        let mut st = self.lock();
        st.stats.requests += 1;
        st.stats.rejected += 1;
        if let Some(h) = head
            && st.requests.len() < MAX_RECORDED_REQUESTS
        {
            st.requests.push(SeenRequest {
                method: h.method,
                path: h.path,
                headers: h.headers,
                body: Bytes::new(),
                at: h.at,
            });
        }
    }

    /// A slow reply is about to be sent: its key may now be replayed.
    fn finish_slow(&self, key: Option<String>, committed: Committed) {
        if let Some(key) = key {
            self.lock().keys.insert(key, KeyState::Done(committed));
        }
    }
}

impl State {
    fn decide(&mut self, req: &Request) -> Action {
        let now = Instant::now();
        if let Some(server) = self.oauth.as_mut().filter(|server| server.is_token_endpoint(&req.path)) {
            return Action::Respond(token_response(server, &mut self.stats, req, now));
        }
        if let Some((told, not_before)) = self.not_before
            && (told..not_before).contains(&req.at)
        {
            self.stats.retry_after_violations += 1;
        }
        if self.is_bulk(req) {
            self.stats.bulk_requests += 1;
        }
        let mut action = self.decide_reply(req, now);
        if let Some(headers) = self.advertised(now) {
            match &mut action {
                Action::Respond(response) => response.rate_limit = Some(headers),
                Action::Slow { rate_limit, .. } => *rate_limit = Some(headers),
                Action::Drop => {}
            }
        }
        action
    }

    fn decide_reply(&mut self, req: &Request, now: Instant) -> Action {
        if self.oauth.as_ref().is_some_and(|server| !server.accepts(&req.headers, now)) {
            self.stats.invalid_token += 1;
            self.stats.rejected += 1;
            return Action::Respond(Response {
                extra_headers: BEARER_CHALLENGE,
                ..Response::json(401, Body::Static(INVALID_TOKEN_BODY))
            });
        }

        let b = &self.behaviour;
        for (name, value) in &b.require_headers {
            let present = req.headers.iter().any(|(n, v)| n.eq_ignore_ascii_case(name) && v == value.trim());
            if !present {
                self.stats.rejected += 1;
                return Action::Respond(if name.eq_ignore_ascii_case("authorization") {
                    Response::json(401, Body::Static(UNAUTHORIZED_BODY))
                } else {
                    let error = format!("missing or invalid header {}", name.to_ascii_lowercase());
                    Response::json(400, Body::Text(serde_json::json!({ "error": error }).to_string()))
                });
            }
        }

        if let Some(response) = self.rate_limit(now) {
            return Action::Respond(response);
        }

        let b = &self.behaviour;
        let enforce = b.enforce_idempotency;
        if enforce {
            let Some(key) = &req.idempotency_key else {
                self.stats.missing_key += 1;
                self.stats.rejected += 1;
                return Action::Respond(Response::json(400, Body::Static(MISSING_KEY_BODY)));
            };
            match self.keys.get(key) {
                Some(KeyState::Done(committed)) => {
                    self.stats.replays += 1;
                    return Action::Respond(Response { replayed: true, ..Response::json(200, committed.body()) });
                }
                Some(KeyState::InFlight) => {
                    self.stats.conflicts += 1;
                    self.stats.rejected += 1;
                    return Action::Respond(Response::json(409, Body::Static(CONFLICT_BODY)));
                }
                None => {}
            }
        }

        let reply = if let Some((_, r)) = b.by_body.iter().find(|(needle, _)| contains(&req.body, needle.as_bytes())) {
            r.clone()
        } else if let Some(r) = b.script.get(self.script_pos) {
            self.script_pos += 1;
            r.clone()
        } else {
            b.default.clone()
        };

        // The key to remember for a committed effect, if enforcing.
        let key = if enforce { req.idempotency_key.clone() } else { None };
        let committing = matches!(reply, Reply::Ok | Reply::SlowAfterCommit(_) | Reply::DropAfterCommit);
        let committed = if !committing {
            None
        } else if self.is_bulk(req) {
            let Some(body) = self.commit_bulk(req) else {
                self.count_status(400);
                return Action::Respond(Response::json(400, Body::Static(BULK_NOT_ARRAY_BODY)));
            };
            Some(Committed::Bulk(body))
        } else {
            Some(Committed::Effect(self.commit(req, req.record_id.clone(), req.body.clone())))
        };
        match (reply, committed) {
            (Reply::Ok, Some(committed)) => {
                let body = committed.body();
                if let Some(key) = key {
                    self.keys.insert(key, KeyState::Done(committed));
                }
                Action::Respond(Response::json(200, body))
            }
            (Reply::Status { status, body }, _) => {
                self.count_status(status);
                Action::Respond(Response::json(status, Body::Text(body)))
            }
            (Reply::RetryAfter { status, value }, _) => {
                self.count_status(status);
                if let Some(not_before) = retry_after_deadline(&value, now, SystemTime::now()) {
                    self.told_not_before(now, not_before);
                }
                Action::Respond(Response {
                    retry_after: Some(value),
                    ..Response::json(status, Body::Static(RETRY_AFTER_BODY))
                })
            }
            (Reply::SlowAfterCommit(delay), Some(committed)) => {
                if let Some(key) = &key {
                    self.keys.insert(key.clone(), KeyState::InFlight);
                }
                Action::Slow { delay, key, committed, rate_limit: None }
            }
            (Reply::DropAfterCommit, Some(committed)) => {
                if let Some(key) = key {
                    self.keys.insert(key, KeyState::Done(committed));
                }
                self.stats.dropped += 1;
                Action::Drop
            }
            (Reply::DropBeforeCommit, _) => {
                self.stats.dropped += 1;
                Action::Drop
            }
            (Reply::Ok | Reply::SlowAfterCommit(_) | Reply::DropAfterCommit, None) => {
                unreachable!("a committing reply always has a commit")
            }
        }
    }

    /// Whether `req` is for the bulk endpoint.
    fn is_bulk(&self, req: &Request) -> bool {
        self.behaviour.bulk_path.as_deref() == Some(req.path.as_str())
    }

    /// Commits the items of a bulk request that are not rejected and returns
    /// the response body, or `None` (nothing committed) if the body is not a
    /// JSON array.
    fn commit_bulk(&mut self, req: &Request) -> Option<Arc<str>> {
        #[derive(serde::Serialize)]
        struct ItemResult {
            status: u16,
            #[serde(skip_serializing_if = "Option::is_none")]
            error: Option<&'static str>,
        }
        #[derive(serde::Serialize)]
        struct BulkResponse {
            results: Vec<ItemResult>,
        }

        let items = json_array_items(&req.body)?;
        let mut results = Vec::with_capacity(items.len());
        for range in items {
            let item = req.body.slice(range);
            let failure =
                self.behaviour.bulk_item_failures.iter().find(|(needle, _)| contains(&item, needle.as_bytes()));
            if let Some(&(_, status)) = failure {
                results.push(ItemResult { status, error: Some("item rejected") });
            } else {
                self.commit(req, record_id(&item), item);
                self.stats.bulk_items += 1;
                results.push(ItemResult { status: 201, error: None });
            }
        }
        let body = serde_json::to_string(&BulkResponse { results }).expect("a bulk response serializes");
        Some(body.into())
    }

    /// Takes a token for a request decided at `now`, or returns the 429 to
    /// answer with if the bucket is empty. `None` without a rate limit.
    fn rate_limit(&mut self, now: Instant) -> Option<Response> {
        let limit = self.behaviour.rate_limit.as_ref()?;
        let bucket = self.bucket.get_or_insert_with(|| Bucket::full(limit, now));
        let secs = bucket.take(limit, now).err()?;
        let style = limit.retry_after;
        self.stats.rate_limited += 1;
        self.stats.rejected += 1;
        let retry_after = match style {
            RetryAfterStyle::Seconds => {
                self.told_not_before(now, now + Duration::from_secs(secs));
                Some(secs.to_string())
            }
            RetryAfterStyle::HttpDate => {
                let (date, wait) = http_date_after(SystemTime::now(), secs);
                self.told_not_before(now, now + wait);
                Some(date)
            }
            RetryAfterStyle::None => None,
        };
        Some(Response { retry_after, ..Response::json(429, Body::Static(RATE_LIMITED_BODY)) })
    }

    /// The `RateLimit-*` header values as of `now`, if advertised.
    fn advertised(&mut self, now: Instant) -> Option<RateHeaders> {
        let limit = self.behaviour.rate_limit.as_ref().filter(|l| l.advertise)?;
        let bucket = self.bucket.get_or_insert_with(|| Bucket::full(limit, now));
        bucket.refill(limit, now);
        Some(bucket.headers(limit))
    }

    /// A `Retry-After` decided at `now` told a client to wait until
    /// `not_before`; remember it unless an even later instant was told.
    fn told_not_before(&mut self, now: Instant, not_before: Instant) {
        if self.not_before.is_none_or(|(_, latest)| not_before > latest) {
            self.not_before = Some((now, not_before));
        }
    }

    fn count_status(&mut self, status: u16) {
        if !(200..300).contains(&status) {
            self.stats.rejected += 1;
        }
    }

    /// Commits one effect of `req` (the request, or one bulk item of it).
    fn commit(&mut self, req: &Request, record_id: Option<String>, body: Bytes) -> u64 {
        self.stats.effects += 1;
        let seq = self.stats.effects;
        self.effects.push(Effect {
            seq,
            idempotency_key: req.idempotency_key.clone(),
            record_id,
            correlation_id: req.correlation_id.clone(),
            path: req.path.clone(),
            body,
        });
        seq
    }

    fn record(&mut self, req: Request) {
        if self.requests.len() < MAX_RECORDED_REQUESTS {
            self.requests.push(SeenRequest {
                method: req.method,
                path: req.path,
                headers: req.headers,
                body: req.body,
                at: req.at,
            });
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The top-level `"id"` of a JSON object body, if it is a string or number.
fn record_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        id: Option<serde_json::Value>,
    }
    // Cheap pre-check so non-JSON bodies cost nothing.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    match serde_json::from_slice::<Probe>(body).ok()?.id? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The byte ranges of the items of a JSON array body, whitespace around them
/// excluded, or `None` if the body is not a JSON array.
fn json_array_items(body: &[u8]) -> Option<Vec<Range<usize>>> {
    // Validate first, so the scan below can rely on well-formed JSON.
    serde_json::from_slice::<Vec<serde_json::Value>>(body).ok()?;
    let mut items = Vec::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut start = 0;
    for (i, &b) in body.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    start = i + 1;
                }
            }
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    items.extend(trim_range(body, start..i));
                    break;
                }
            }
            b',' if depth == 1 => {
                items.extend(trim_range(body, start..i));
                start = i + 1;
            }
            _ => {}
        }
    }
    Some(items)
}

/// `range` of `body` without surrounding ASCII whitespace; `None` if that
/// leaves nothing.
fn trim_range(body: &[u8], range: Range<usize>) -> Option<Range<usize>> {
    let slice = &body[range.clone()];
    let start = range.start + (slice.len() - slice.trim_ascii_start().len());
    let end = range.end - (slice.len() - slice.trim_ascii_end().len());
    (start < end).then_some(start..end)
}

/// `x-correlation-id`, else the trace-id of a W3C `traceparent`
/// (`version-traceid-parentid-flags`).
fn correlation_id(headers: &[(String, String)]) -> Option<String> {
    if let Some(id) = find_header(headers, "x-correlation-id") {
        return Some(id.to_owned());
    }
    let traceparent = find_header(headers, "traceparent")?;
    let trace_id = traceparent.split('-').nth(1)?;
    (trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| trace_id.to_owned())
}

// ---------------------------------------------------------------------------
// OAuth 2.0.

/// The authorization server's state for one [`OAuth`] configuration.
struct OAuthServer {
    config: OAuth,
    /// The current client secret (rotated by [`Partner::set_client_secret`]).
    client_secret: String,
    /// The refresh token that is accepted now, if the grant is enabled.
    refresh_token: Option<String>,
    /// Access tokens issued and not revoked, with the instant they expire
    /// (`None`: a TTL too long to represent, never).
    tokens: HashMap<String, Option<Instant>>,
}

/// Why a token request was refused: an RFC 6749 (5.2) error code.
#[derive(Debug)]
struct Refusal {
    status: u16,
    error: &'static str,
    /// For the debug log only.
    reason: &'static str,
    /// The client tried HTTP Basic: answer with a Basic challenge.
    basic: bool,
}

impl Refusal {
    fn invalid_request(reason: &'static str) -> Self {
        Refusal { status: 400, error: "invalid_request", reason, basic: false }
    }

    fn invalid_client(reason: &'static str, basic: bool) -> Self {
        Refusal { status: 401, error: "invalid_client", reason, basic }
    }

    fn invalid_grant(reason: &'static str) -> Self {
        Refusal { status: 400, error: "invalid_grant", reason, basic: false }
    }

    fn unsupported_grant_type(reason: &'static str) -> Self {
        Refusal { status: 400, error: "unsupported_grant_type", reason, basic: false }
    }
}

/// A successful token response (RFC 6749, 5.1), fields in the usual order.
#[derive(serde::Serialize)]
struct Grant<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

impl OAuthServer {
    fn new(config: OAuth) -> Self {
        OAuthServer {
            client_secret: config.client_secret.clone(),
            refresh_token: config.refresh_token.clone(),
            tokens: HashMap::new(),
            config,
        }
    }

    /// Whether a request to `target` (path and query) is for the token
    /// endpoint.
    fn is_token_endpoint(&self, target: &str) -> bool {
        target.split_once('?').map_or(target, |(path, _)| path) == self.config.token_path
    }

    /// Whether `headers` carry a bearer token that is valid at `now`.
    fn accepts(&self, headers: &[(String, String)], now: Instant) -> bool {
        let Some((scheme, token)) = find_header(headers, "authorization").and_then(|v| v.split_once(' ')) else {
            return false;
        };
        scheme.eq_ignore_ascii_case("bearer")
            && self.tokens.get(token.trim_start()).is_some_and(|expiry| expiry.is_none_or(|at| now < at))
    }

    /// Handles a token request decided at `now`: the JSON body of the
    /// success response, naming the tokens with number `n`, or why it was
    /// refused.
    fn grant(&mut self, req: &Request, now: Instant, n: u64) -> Result<String, Refusal> {
        if req.method != "POST" {
            return Err(Refusal::invalid_request("the token endpoint only accepts POST"));
        }
        let form_type = find_header(&req.headers, "content-type")
            .is_some_and(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case(FORM_URLENCODED));
        if !form_type {
            return Err(Refusal::invalid_request("Content-Type is not application/x-www-form-urlencoded"));
        }
        let form = parse_form(&req.body).ok_or(Refusal::invalid_request("malformed or repeated form parameters"))?;
        let field = |name: &str| form.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());

        self.authenticate(find_header(&req.headers, "authorization"), field("client_id"), field("client_secret"))?;

        let new_refresh_token = match field("grant_type") {
            None => return Err(Refusal::invalid_request("no grant_type")),
            Some("client_credentials") => None,
            Some("refresh_token") => {
                let Some(current) = &self.refresh_token else {
                    return Err(Refusal::unsupported_grant_type("the refresh token grant is not enabled"));
                };
                let presented = field("refresh_token").ok_or(Refusal::invalid_request("no refresh_token"))?;
                if presented != current {
                    return Err(Refusal::invalid_grant("unknown, rotated or revoked refresh token"));
                }
                let rotated = format!("rt_{n}_{}", random_suffix(n));
                self.refresh_token = Some(rotated.clone());
                Some(rotated)
            }
            Some(_) => return Err(Refusal::unsupported_grant_type("unknown grant_type")),
        };

        // Forget expired tokens so a long run with short TTLs stays small;
        // an expired token is refused just like an unknown one.
        self.tokens.retain(|_, expiry| expiry.is_none_or(|at| now < at));
        let access_token = format!("tok_{n}_{}", random_suffix(n));
        self.tokens.insert(access_token.clone(), now.checked_add(self.config.token_ttl));
        let body = Grant {
            access_token: &access_token,
            token_type: "Bearer",
            expires_in: self.config.token_ttl.as_secs().max(1),
            refresh_token: new_refresh_token.as_deref(),
            scope: field("scope").filter(|s| !s.is_empty()),
        };
        Ok(serde_json::to_string(&body).expect("a token response serializes"))
    }

    /// Client authentication (RFC 6749, 2.3.1): HTTP Basic or form fields,
    /// not both.
    fn authenticate(
        &self,
        authorization: Option<&str>,
        form_id: Option<&str>,
        form_secret: Option<&str>,
    ) -> Result<(), Refusal> {
        let basic = authorization
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .map(|(_, credentials)| credentials.trim());
        let (id, secret) = match basic {
            Some(credentials) => {
                if form_secret.is_some() {
                    return Err(Refusal::invalid_request("two client authentication methods"));
                }
                let (id, secret) =
                    decode_basic(credentials).ok_or(Refusal::invalid_client("malformed Basic credentials", true))?;
                if form_id.is_some_and(|form_id| form_id != id) {
                    return Err(Refusal::invalid_client("client_id differs from the Basic credentials", true));
                }
                (id, secret)
            }
            None => match (form_id, form_secret) {
                (Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
                _ => return Err(Refusal::invalid_client("no client authentication", false)),
            },
        };
        if id == self.config.client_id && secret == self.client_secret {
            Ok(())
        } else {
            Err(Refusal::invalid_client("wrong client_id or client_secret", basic.is_some()))
        }
    }
}

/// Answers a request to the token endpoint and counts it.
fn token_response(server: &mut OAuthServer, stats: &mut Stats, req: &Request, now: Instant) -> Response {
    match server.grant(req, now, stats.tokens_issued + 1) {
        Ok(body) => {
            stats.tokens_issued += 1;
            Response { extra_headers: NO_STORE, ..Response::json(200, Body::Text(body)) }
        }
        Err(refusal) => {
            tracing::debug!(error = refusal.error, reason = refusal.reason, "fake partner: token request refused");
            stats.token_failures += 1;
            stats.rejected += 1;
            let body = serde_json::json!({ "error": refusal.error }).to_string();
            Response {
                extra_headers: if refusal.basic { BASIC_CHALLENGE } else { NO_STORE },
                ..Response::json(refusal.status, Body::Text(body))
            }
        }
    }
}

const FORM_URLENCODED: &str = "application/x-www-form-urlencoded";

/// The name-value pairs of an `application/x-www-form-urlencoded` body, in
/// order. `None` if it is not valid (bad percent-encoding, not UTF-8) or a
/// parameter occurs twice (RFC 6749, 3.2).
fn parse_form(body: &[u8]) -> Option<Vec<(String, String)>> {
    let body = std::str::from_utf8(body).ok()?;
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in body.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        let (name, value) = (form_decode(name)?, form_decode(value)?);
        if pairs.iter().any(|(n, _)| *n == name) {
            return None;
        }
        pairs.push((name, value));
    }
    Some(pairs)
}

/// Decodes one form-urlencoded component: `+` is a space, `%XX` a byte.
fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `client_id` and `client_secret` from the credentials of an HTTP Basic
/// `Authorization` header: base64 of `id:secret`, each part form-urlencoded
/// (RFC 6749, 2.3.1).
fn decode_basic(credentials: &str) -> Option<(String, String)> {
    let decoded = String::from_utf8(base64_decode(credentials)?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

/// Decodes standard base64 (RFC 4648, 4), padded or not.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let data = s.trim_end_matches('=');
    let padding = s.len() - data.len();
    if padding > 2 || (padding > 0 && !s.len().is_multiple_of(4)) || data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in data.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = ((acc << 6) | u32::from(v)) & 0xffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// 16 hex digits that differ between calls and between runs, so tokens
/// cannot be guessed from their number alone.
fn random_suffix(n: u64) -> String {
    use std::hash::BuildHasher as _;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:016x}", std::hash::RandomState::new().hash_one((n, nanos)))
}

// ---------------------------------------------------------------------------
// Rate limiting and timing.

/// The rate limiter's token bucket: `tokens` as of `at`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(limit: &RateLimit, now: Instant) -> Self {
        Bucket { tokens: capacity(limit), at: now }
    }

    /// Adds the tokens earned since the last refill (never beyond capacity).
    fn refill(&mut self, limit: &RateLimit, now: Instant) {
        let rate = refill_rate(limit);
        if rate.is_infinite() {
            self.tokens = capacity(limit);
        } else if now > self.at {
            self.tokens = (self.tokens + (now - self.at).as_secs_f64() * rate).min(capacity(limit));
        }
        self.at = self.at.max(now);
    }

    /// Takes one token at `now`, or returns the `Retry-After` in seconds: how
    /// long until one token is available, rounded up, at least 1.
    fn take(&mut self, limit: &RateLimit, now: Instant) -> Result<(), u64> {
        self.refill(limit, now);
        if self.tokens >= 1.0 - TOKEN_SLACK {
            self.tokens = (self.tokens - 1.0).max(0.0);
            Ok(())
        } else {
            Err(secs_to_earn(1.0 - self.tokens, refill_rate(limit)).max(1))
        }
    }

    /// `RateLimit-Remaining` and `RateLimit-Reset` for the current state.
    fn headers(&self, limit: &RateLimit) -> RateHeaders {
        RateHeaders {
            // Saturating float-to-int cast; tokens are never negative.
            remaining: (self.tokens + TOKEN_SLACK).floor() as u64,
            reset: secs_to_earn(capacity(limit) - self.tokens, refill_rate(limit)),
        }
    }
}

/// Rounding error tolerated when counting tokens, so that a client waiting
/// exactly as long as it takes to earn a token gets it even though the
/// refills were summed in floating point.
const TOKEN_SLACK: f64 = 1e-9;

/// Bucket capacity in tokens; a burst of 0 counts as 1.
fn capacity(limit: &RateLimit) -> f64 {
    f64::from(limit.burst.max(1))
}

/// Refill rate in tokens per second; 0 for a non-positive or NaN rate.
fn refill_rate(limit: &RateLimit) -> f64 {
    if limit.requests_per_second > 0.0 { limit.requests_per_second } else { 0.0 }
}

/// Whole seconds (rounded up, at most [`MAX_WAIT_SECS`]) to earn `tokens` at
/// `rate` tokens per second.
fn secs_to_earn(tokens: f64, rate: f64) -> u64 {
    if tokens <= 0.0 {
        return 0;
    }
    if rate <= 0.0 {
        return MAX_WAIT_SECS;
    }
    let secs = (tokens / rate).ceil();
    // The float-to-int cast saturates, so huge waits just hit the cap.
    (secs as u64).min(MAX_WAIT_SECS)
}

/// The IMF-fixdate `secs` seconds after `now`, rounded up to a whole second
/// so a client that waits until that date never comes back early, and how
/// long after `now` that date is.
fn http_date_after(now: SystemTime, secs: u64) -> (String, Duration) {
    let mut date = now + Duration::from_secs(secs);
    let nanos = date.duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    if nanos > 0 {
        date += Duration::from_nanos(u64::from(1_000_000_000 - nanos));
    }
    (httpdate::fmt_http_date(date), date.duration_since(now).unwrap_or_default())
}

/// The instant a `Retry-After: value` sent at `now` (wall clock `now_wall`)
/// asks the client to wait for: delay-seconds or an HTTP-date in the future.
/// `None` for malformed values, dates not in the future and absurd delays.
fn retry_after_deadline(value: &str, now: Instant, now_wall: SystemTime) -> Option<Instant> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(value.parse().ok()?)
    } else {
        httpdate::parse_http_date(value).ok()?.duration_since(now_wall).ok()?
    };
    now.checked_add(wait)
}

/// The largest number of `arrivals` within any interval `[t, t + window)`.
/// Sorts `arrivals`.
fn max_in_window(arrivals: &mut [Instant], window: Duration) -> u64 {
    arrivals.sort_unstable();
    let mut start = 0;
    let mut best = 0;
    for end in 0..arrivals.len() {
        while start <= end && arrivals[end] - arrivals[start] >= window {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best as u64
}

// ---------------------------------------------------------------------------
// Networking.

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // Either an explicit shutdown or the Partner was dropped.
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                Err(error) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "fake partner: accept failed");
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Why reading a request stopped.
enum ReadError {
    /// The peer went away (EOF or I/O error mid-request): just close.
    Closed,
    /// Answer with this status and message, then close.
    Bad(u16, &'static str),
}

/// Request line and headers.
struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    at: Instant,
    keep_alive: bool,
}

/// Per-connection scratch buffers, reused across requests.
struct Scratch {
    line: Vec<u8>,
    out: Vec<u8>,
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.split();
    let mut reader = BufReader::with_capacity(IO_BUFFER_BYTES, rd);
    let mut writer = BufWriter::with_capacity(IO_BUFFER_BYTES, wr);
    let mut scratch = Scratch { line: Vec::with_capacity(256), out: Vec::with_capacity(512) };
    loop {
        let head = match read_head(&mut reader, &mut scratch.line).await {
            Ok(Some(head)) => head,
            Ok(None) | Err(ReadError::Closed) => break,
            Err(ReadError::Bad(status, message)) => {
                shared.malformed(None);
                let _ = answer_and_close(&mut writer, &mut scratch.out, status, message).await;
                break;
            }
        };
        let len = match body_length(&head.headers) {
            Ok(len) => len,
            Err((status, message)) => {
                shared.malformed(Some(head));
                let _ = answer_and_close(&mut writer, &mut scratch.out, status, message).await;
                break;
            }
        };
        if len > 0 && find_header(&head.headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            let sent = async {
                writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                writer.flush().await
            };
            if sent.await.is_err() {
                break;
            }
        }
        let body = if len == 0 {
            Bytes::new()
        } else {
            let mut buf = vec![0; len];
            if reader.read_exact(&mut buf).await.is_err() {
                break;
            }
            Bytes::from(buf)
        };

        let keep_alive = head.keep_alive;
        let request = Request {
            idempotency_key: find_header(&head.headers, "idempotency-key").map(str::to_owned),
            record_id: record_id(&body),
            correlation_id: correlation_id(&head.headers),
            method: head.method,
            path: head.path,
            headers: head.headers,
            body,
            at: head.at,
        };
        let response = match shared.decide(request) {
            Action::Respond(response) => response,
            Action::Slow { delay, key, committed, rate_limit } => {
                // Earlier pipelined responses go out before the pause.
                if writer.flush().await.is_err() {
                    // The client is gone, but the partner still finishes its work.
                    tokio::time::sleep(delay).await;
                    shared.finish_slow(key, committed);
                    break;
                }
                tokio::time::sleep(delay).await;
                let body = committed.body();
                shared.finish_slow(key, committed);
                Response { rate_limit, ..Response::json(200, body) }
            }
            Action::Drop => {
                // Earlier pipelined responses still go out; this one never does.
                let _ = writer.flush().await;
                break;
            }
        };
        let written = write_response(&mut writer, &mut scratch.out, &response, !keep_alive).await;
        if written.is_err() {
            break;
        }
        if !keep_alive {
            let _ = writer.shutdown().await;
            break;
        }
        // Batch responses to pipelined requests; otherwise send right away.
        if reader.buffer().is_empty() && writer.flush().await.is_err() {
            break;
        }
    }
}

async fn answer_and_close<W: AsyncWrite + Unpin>(
    writer: &mut W,
    out: &mut Vec<u8>,
    status: u16,
    message: &'static str,
) -> io::Result<()> {
    let body = serde_json::json!({ "error": message }).to_string();
    write_response(writer, out, &Response::json(status, Body::Text(body)), true).await?;
    writer.shutdown().await
}

/// Reads one line into `line` without its line ending, charging its length
/// against `budget`. `Ok(false)` on EOF before the first byte.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    budget: &mut usize,
) -> Result<bool, ReadError> {
    line.clear();
    if *budget == 0 {
        return Err(ReadError::Bad(431, "request head too large"));
    }
    let n = (&mut *reader).take(*budget as u64).read_until(b'\n', line).await.map_err(|_| ReadError::Closed)?;
    if n == 0 {
        return Ok(false);
    }
    if line.last() != Some(&b'\n') {
        return Err(if n == *budget { ReadError::Bad(431, "request head too large") } else { ReadError::Closed });
    }
    *budget -= n;
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(true)
}

/// Reads the request line and headers. `Ok(None)` on a clean EOF between
/// requests.
async fn read_head<R: AsyncBufRead + Unpin>(reader: &mut R, line: &mut Vec<u8>) -> Result<Option<Head>, ReadError> {
    const BAD: ReadError = ReadError::Bad(400, "malformed request");
    let mut budget = MAX_HEAD_BYTES;
    // Tolerate empty lines before the request line (RFC 9112, 2.2).
    loop {
        if !read_line(reader, line, &mut budget).await? {
            return Ok(None);
        }
        if !line.is_empty() {
            break;
        }
    }
    let at = Instant::now();

    let request_line = std::str::from_utf8(line).map_err(|_| BAD)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BAD);
    };
    if method.is_empty() || path.is_empty() {
        return Err(BAD);
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(ReadError::Bad(505, "only HTTP/1.0 and HTTP/1.1 are supported")),
    };
    let method = method.to_owned();
    let path = path.to_owned();

    let mut headers = Vec::with_capacity(16);
    loop {
        if !read_line(reader, line, &mut budget).await? {
            return Err(ReadError::Closed);
        }
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(ReadError::Bad(400, "obsolete header line folding"));
        }
        let colon = line.iter().position(|&b| b == b':').ok_or(BAD)?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace()) {
            return Err(BAD);
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        let value = String::from_utf8_lossy(value.trim_ascii()).into_owned();
        headers.push((name, value));
    }

    let mut close = false;
    let mut keep_alive = false;
    for (_, value) in headers.iter().filter(|(n, _)| n == "connection") {
        for token in value.split(',').map(str::trim) {
            close |= token.eq_ignore_ascii_case("close");
            keep_alive |= token.eq_ignore_ascii_case("keep-alive");
        }
    }
    Ok(Some(Head { method, path, headers, at, keep_alive: !close && (http11 || keep_alive) }))
}

/// The body length from `Content-Length` (0 if absent).
fn body_length(headers: &[(String, String)]) -> Result<usize, (u16, &'static str)> {
    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err((411, "Transfer-Encoding is not supported; send Content-Length"));
    }
    let mut length = None;
    for (_, value) in headers.iter().filter(|(n, _)| n == "content-length") {
        let parsed = (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
            .then(|| value.parse::<usize>().ok())
            .flatten()
            .ok_or((400, "invalid Content-Length"))?;
        if length.is_some_and(|l| l != parsed) {
            return Err((400, "conflicting Content-Length headers"));
        }
        length = Some(parsed);
    }
    match length.unwrap_or(0) {
        n if n > MAX_BODY_BYTES => Err((413, "request body too large")),
        n => Ok(n),
    }
}

async fn write_response<W: AsyncWrite + Unpin>(
    writer: &mut W,
    out: &mut Vec<u8>,
    response: &Response,
    close: bool,
) -> io::Result<()> {
    let mut effect_buf = [0u8; 48];
    let body: &[u8] = match &response.body {
        Body::Effect(seq) => {
            let mut cursor = &mut effect_buf[..];
            write!(cursor, r#"{{"ok":true,"effect":{seq}}}"#)?;
            let len = 48 - cursor.len();
            &effect_buf[..len]
        }
        Body::Static(s) => s.as_bytes(),
        Body::Text(s) => s.as_bytes(),
        Body::Shared(s) => s.as_bytes(),
    };
    out.clear();
    write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        response.status,
        reason(response.status),
        body.len()
    )?;
    if let Some(value) = &response.retry_after {
        write!(out, "Retry-After: {value}\r\n")?;
    }
    if let Some(RateHeaders { remaining, reset }) = response.rate_limit {
        write!(out, "RateLimit-Remaining: {remaining}\r\nRateLimit-Reset: {reset}\r\n")?;
    }
    if response.replayed {
        out.extend_from_slice(b"Idempotent-Replayed: true\r\n");
    }
    for (name, value) in response.extra_headers {
        write!(out, "{name}: {value}\r\n")?;
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    writer.write_all(out).await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        425 => "Too Early",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        // The reason phrase may be empty (RFC 9112, 4).
        _ => "",
    }
}

#[cfg(test)]
mod tests;
