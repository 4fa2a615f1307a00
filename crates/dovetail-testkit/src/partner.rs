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
//! * optionally serves change feeds ([`Behaviour::feed`]): `GET` endpoints
//!   that answer "what changed since ...?" page by page in one of the
//!   pagination styles partners use ([`FeedStyle`]), over records a test
//!   puts while the partner runs ([`Partner::feed_put`]), failing every Nth
//!   request on cue ([`Feed::fail_every()`]);
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
//! 3. A `GET` to a [`Behaviour::feed`] path (the query ignored when matching)
//!    is answered by the feed and nothing below applies to it (see [`Feed`]):
//!    no `Idempotency-Key` is needed, no script entry is consumed, no effect
//!    is committed. Other methods on that path go on to the next steps.
//! 4. If [`Behaviour::enforce_idempotency`]: no `Idempotency-Key` gets 400
//!    `{"error":"Idempotency-Key header required"}`; a key whose effect was
//!    committed gets the original 200 response replayed with
//!    `Idempotent-Replayed: true`; a key whose effect is committed but whose
//!    response is still pending ([`Reply::SlowAfterCommit`]) gets 409.
//! 5. Otherwise the [`Reply`] is chosen: the first [`Behaviour::by_body`]
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
use std::ops::{Bound, Range};
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// Change feeds served on `GET` to these paths (compared with the
    /// request target's path, query ignored); see [`Behaviour::feed`] and
    /// [`Feed`]. Empty (the default) means no feed.
    pub feeds: Vec<(String, Feed)>,
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
            feeds: Vec::new(),
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

    /// Serve a change feed on `GET path` (see [`Feed`]), replacing any feed
    /// configured for the same path. `path` is compared with the request
    /// target's path (the query is the feed's parameters); other methods on
    /// `path` are answered as if there were no feed, so a partner can take
    /// `POST /records` and serve `GET /records?updated_since=...` like real
    /// APIs do. The records are put with [`Partner::feed_put`].
    pub fn feed(mut self, path: &str, feed: Feed) -> Self {
        match self.feeds.iter_mut().find(|(p, _)| p == path) {
            Some((_, existing)) => *existing = feed,
            None => self.feeds.push((path.to_owned(), feed)),
        }
        self
    }
}

/// Where feed time starts: every [`Partner::feed_put`] advances it by one
/// millisecond, so the first record put gets `2026-01-01T00:00:00.001Z`
/// and every `updated_at` is later than this (a client may start polling
/// with `updated_since` set to it).
pub const FEED_EPOCH: &str = "2026-01-01T00:00:00.000Z";

/// A change feed, as partner APIs offer it for polling ("what changed since
/// I last asked?"): `GET` on a path (see [`Behaviour::feed`]) pages through
/// the records a test put with [`Partner::feed_put`].
///
/// # Records
///
/// A record is a JSON object with an `"id"` (string or number; `"7"` and
/// `7` are the same record). [`Partner::feed_put`] inserts it or replaces
/// the record with the same id, and sets its `"updated_at"` from the
/// partner's feed clock: an RFC 3339 UTC timestamp with milliseconds,
/// [`FEED_EPOCH`] plus one millisecond per put (across all feeds), so every
/// put gets a strictly later, distinct `updated_at`, even within one real
/// millisecond. Like a real partner, the server owns `updated_at`: a value
/// in the record put is overwritten. Every other field is served as put,
/// unknown ones included, so a test can add a field half-way through.
/// Records are served sorted by (`updated_at`, id), oldest first, at most
/// [`page_size`](Feed::page_size) per page (0 counts as 1); an updated
/// record moves to the end. The feed filters nothing else and never
/// deletes.
///
/// # Pagination
///
/// The [`FeedStyle`] decides the parameters and the JSON shape; see there.
/// A malformed parameter (also an empty one, or one given twice) is
/// answered 400 `{"error":"<what>"}`, counted in [`Stats::rejected`], as
/// real APIs do; unknown parameters are ignored.
///
/// # Misbehaviour and checks
///
/// A feed request passes the OAuth, required header and rate limit checks
/// like any other request (see the [module docs](self)), and is counted in
/// [`Stats::feed_requests`] whatever its answer. Of the requests that pass
/// them, the Nth, 2Nth, 3Nth, ... (N and the [`Reply`] set with
/// [`Feed::fail_every()`]; counted per path since the partner started or
/// since [`Partner::set_behaviour`] changed this feed) are answered with
/// that reply instead of the page, like a partner that rate-limits or falls
/// over now and then: [`Reply::Status`] and [`Reply::RetryAfter`]
/// answer as usual (a `Retry-After` is remembered for
/// [`Stats::retry_after_violations`]), both drops close the connection
/// without an answer, [`Reply::SlowAfterCommit`] serves the page after the
/// delay (a client timeout) and [`Reply::Ok`] serves it normally. Nothing is
/// ever committed by a feed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feed {
    /// Most records per page; 0 counts as 1. With
    /// [`FeedStyle::Page`] also the largest page size a client may ask for.
    pub page_size: usize,
    /// How the client pages.
    pub style: FeedStyle,
    /// Answer every Nth feed request with this reply instead; `None` (or
    /// N = 0) never.
    pub fail_every: Option<(usize, Reply)>,
}

/// The pagination style of a [`Feed`], one per family of real partner APIs.
///
/// A polling client pages until the feed says there is no more, and next
/// time resumes from where it got: the last `updated_at` it saw
/// (`UpdatedSince`), or the last cursor or link it followed (`Token`,
/// `Link`: that re-reads the last page, so de-duplicate), or from page 1
/// (`Page`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedStyle {
    /// `GET path?updated_since=<RFC 3339>`: the records with `updated_at >=`
    /// the parameter (inclusive, as many real APIs do it), oldest first;
    /// without the parameter, from the first record. The body is
    /// `{"data":[...],"has_more":bool}`; while `has_more`, the client asks
    /// again with the last record's `updated_at`, and gets that record a
    /// second time at the top of the next page: clients must de-duplicate.
    /// Since every record has a distinct `updated_at`, a page size of 2 or
    /// more always makes progress (with 1, the client is stuck on one
    /// record, as it would be against such an API).
    ///
    /// The timestamp may have any fraction and offset (`Z` or `+hh:mm`);
    /// remember to percent-encode a `+` (as `%2B`), since the query is
    /// form-decoded and a bare `+` is a space, which is a 400.
    UpdatedSince {
        /// Name of the query parameter, e.g. `updated_since`.
        param: String,
    },
    /// `GET path` for the first page, then `GET path?cursor=<next_cursor>`.
    /// The body is `{"data":[...],"next_cursor":"<opaque>"}`, with
    /// `"next_cursor":null` once there are no further records right now.
    /// The cursor is opaque (unpadded base64url of the position after the
    /// page's last record), so records updated or added while paging show
    /// up on later pages and none is skipped. A cursor the partner did not
    /// issue is a 400.
    Token {
        /// Name of the query parameter, e.g. `cursor`.
        param: String,
    },
    /// `GET path?page=<n>&per_page=<k>`, 1-based, both optional (page 1,
    /// [`Feed::page_size`] records); a `per_page` above the page size is
    /// silently capped, as real APIs do. The body is
    /// `{"data":[...],"page":n,"total_pages":m}` with
    /// `m = ceil(records / per_page)` (0 without records); a page beyond the
    /// last has empty `data`. Pages are offsets into the records as they
    /// are at each request, so records updated while paging move to the end
    /// and shift the rest: like any offset-paged API, this skips and
    /// repeats records under concurrent change.
    Page {
        /// Name of the page number parameter, e.g. `page`.
        param: String,
        /// Name of the page size parameter, e.g. `per_page`.
        size_param: String,
    },
    /// RFC 8288 web linking, as in GitHub's API: the body is a bare JSON
    /// array, and unless it is the last page right now the response has
    /// `Link: <http://host/path?after=ID>; rel="next"`, an absolute URL built
    /// from the request's `Host` header (or the partner's address) with the
    /// last record's id percent-encoded. The first page is `GET path`. The
    /// next page starts after that record's position *at the time of the
    /// next request*: if that very record is updated in between, it moved
    /// to the end and the records between are skipped, as with real APIs
    /// that resolve an id cursor. An unknown id is a 400.
    Link,
}

impl Feed {
    /// A feed in `style` with `page_size` records per page that never fails.
    pub fn new(style: FeedStyle, page_size: usize) -> Self {
        Feed { page_size, style, fail_every: None }
    }

    /// [`FeedStyle::UpdatedSince`] with the parameter `updated_since`.
    pub fn updated_since(page_size: usize) -> Self {
        Feed::new(FeedStyle::UpdatedSince { param: "updated_since".to_owned() }, page_size)
    }

    /// [`FeedStyle::Token`] with the parameter `cursor`.
    pub fn token(page_size: usize) -> Self {
        Feed::new(FeedStyle::Token { param: "cursor".to_owned() }, page_size)
    }

    /// [`FeedStyle::Page`] with the parameters `page` and `per_page`.
    pub fn pages(page_size: usize) -> Self {
        Feed::new(FeedStyle::Page { param: "page".to_owned(), size_param: "per_page".to_owned() }, page_size)
    }

    /// [`FeedStyle::Link`].
    pub fn link(page_size: usize) -> Self {
        Feed::new(FeedStyle::Link, page_size)
    }

    /// Answer every `n`th feed request with `r` instead of a page (see
    /// [`Feed`]), e.g. 429 with `Retry-After` or 503.
    pub fn fail_every(mut self, n: usize, r: Reply) -> Self {
        self.fail_every = Some((n, r));
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
    /// `GET` requests to a feed path ([`Behaviour::feed`]), whatever their
    /// answer (refused, failed on cue and dropped ones included).
    pub feed_requests: u64,
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

    /// The request target without its query.
    pub fn path_only(&self) -> &str {
        split_target(&self.path).0
    }

    /// The raw query (after `?`, still encoded), if any.
    pub fn query(&self) -> Option<&str> {
        split_target(&self.path).1
    }

    /// The first value of query parameter `name`, form-decoded (`+` is a
    /// space); `None` if absent or not decodable.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query()?.split('&').find_map(|part| {
            let (n, v) = part.split_once('=').unwrap_or((part, ""));
            (form_decode(n)? == name).then(|| form_decode(v)).flatten()
        })
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
        let shared = Arc::new(Shared::new(behaviour, addr));
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
    /// Feed records are always kept; a feed's count towards
    /// [`Feed::fail_every()`] restarts if its configuration changed.
    pub fn set_behaviour(&self, b: Behaviour) {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        if b.rate_limit != st.behaviour.rate_limit {
            st.bucket = None;
        }
        if b.oauth != st.behaviour.oauth {
            st.oauth = b.oauth.clone().map(OAuthServer::new);
        }
        for (path, data) in &mut st.feeds {
            if feed_config(&b, path) != feed_config(&st.behaviour, path) {
                data.served = 0;
            }
        }
        st.behaviour = b;
        st.script_pos = 0;
    }

    /// Puts `record` into the feed at `path` (see [`Feed`]): inserts it, or
    /// replaces the record with the same `"id"`, and stamps it with the next
    /// `"updated_at"` of the feed clock, which it returns (e.g.
    /// `2026-01-01T00:00:00.001Z` for the first put). All other fields are
    /// kept as given. Works whether or not a feed is configured at `path`
    /// yet; [`Partner::set_behaviour`] keeps the records.
    ///
    /// # Panics
    ///
    /// Panics if `record` is not a JSON object with a string or number
    /// `"id"`.
    pub fn feed_put(&self, path: &str, mut record: serde_json::Value) -> String {
        let id = match record.get("id") {
            Some(serde_json::Value::String(id)) => id.clone(),
            Some(serde_json::Value::Number(id)) => id.to_string(),
            _ => panic!("a feed record is a JSON object with a string or number \"id\", not {record}"),
        };
        let mut st = self.shared.lock();
        st.feed_clock += 1;
        let tick = st.feed_clock;
        let updated_at = feed_timestamp(tick);
        record["updated_at"] = serde_json::Value::String(updated_at.clone());
        st.feeds.entry(path.to_owned()).or_default().put(tick, id, record.to_string().into());
        updated_at
    }

    /// The records of the feed at `path` as they are now, in feed order
    /// (oldest `updated_at` first), each with its `"updated_at"`.
    pub fn feed_records(&self, path: &str) -> Vec<serde_json::Value> {
        let st = self.shared.lock();
        let Some(data) = st.feeds.get(path) else {
            return Vec::new();
        };
        data.records.values().map(|json| serde_json::from_str(json).expect("a stored record is JSON")).collect()
    }

    /// The recorded `GET` requests (see [`Partner::requests`]) to `path`,
    /// whatever the query: the requests a client made to the feed there.
    /// [`SeenRequest::query_param`] reads their parameters.
    pub fn feed_requests(&self, path: &str) -> Vec<SeenRequest> {
        let st = self.shared.lock();
        st.requests.iter().filter(|r| r.method == "GET" && r.path_only() == path).cloned().collect()
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
    /// Feed records and counters by path, whether or not a feed is
    /// configured there (now).
    feeds: HashMap<String, FeedData>,
    /// The feed clock: how many records were put (see [`feed_timestamp`]).
    feed_clock: u64,
    /// The listening address, for absolute URLs when a request has no
    /// usable `Host`.
    addr: SocketAddr,
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
    /// Send this response after a pause, without committing anything.
    Delayed {
        delay: Duration,
        response: Response,
    },
}

struct Response {
    status: u16,
    body: Body,
    retry_after: Option<String>,
    replayed: bool,
    rate_limit: Option<RateHeaders>,
    /// Further headers, written as given.
    extra_headers: &'static [(&'static str, &'static str)],
    /// Further headers with computed values (e.g. `Link`), written as given.
    owned_headers: Vec<(&'static str, String)>,
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
        Response {
            status,
            body,
            retry_after: None,
            replayed: false,
            rate_limit: None,
            extra_headers: &[],
            owned_headers: Vec::new(),
        }
    }
}

impl Shared {
    fn new(behaviour: Behaviour, addr: SocketAddr) -> Self {
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
                feeds: HashMap::new(),
                feed_clock: 0,
                addr,
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
        if self.feed_for(req).is_some() {
            self.stats.feed_requests += 1;
        }
        let mut action = self.decide_reply(req, now);
        if let Some(headers) = self.advertised(now) {
            match &mut action {
                Action::Respond(response) | Action::Delayed { response, .. } => response.rate_limit = Some(headers),
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

        if let Some((path, feed)) = self.feed_for(req).cloned() {
            return self.serve_feed(req, &path, &feed, now);
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
            (Reply::Status { status, body }, _) => Action::Respond(self.status_reply(status, body)),
            (Reply::RetryAfter { status, value }, _) => Action::Respond(self.retry_after_reply(status, value, now)),
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

    /// A [`Reply::Status`]: counted, answered verbatim.
    fn status_reply(&mut self, status: u16, body: String) -> Response {
        self.count_status(status);
        Response::json(status, Body::Text(body))
    }

    /// A [`Reply::RetryAfter`] decided at `now`: counted and remembered for
    /// [`Stats::retry_after_violations`].
    fn retry_after_reply(&mut self, status: u16, value: String, now: Instant) -> Response {
        self.count_status(status);
        if let Some(not_before) = retry_after_deadline(&value, now, SystemTime::now()) {
            self.told_not_before(now, not_before);
        }
        Response { retry_after: Some(value), ..Response::json(status, Body::Static(RETRY_AFTER_BODY)) }
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
// Change feeds.

/// Feed time in milliseconds since the Unix epoch at tick 0: [`FEED_EPOCH`].
const FEED_EPOCH_MS: u64 = 1_767_225_600_000;
const NANOS_PER_MILLI: i128 = 1_000_000;
const MILLIS_PER_DAY: u64 = 86_400_000;

/// The feed configured at `path` in `b`, if any.
fn feed_config<'a>(b: &'a Behaviour, path: &str) -> Option<&'a Feed> {
    b.feeds.iter().find(|(p, _)| p == path).map(|(_, feed)| feed)
}

/// The records of one feed path and how many requests it served.
#[derive(Default)]
struct FeedData {
    /// Record JSON (as served) by sort key: (feed clock tick, id). Ticks
    /// are distinct, so the id only breaks ties in principle.
    records: BTreeMap<(u64, String), Arc<str>>,
    /// The current tick of each record id.
    ticks: HashMap<String, u64>,
    /// Requests that reached the feed step, for [`Feed::fail_every()`].
    served: usize,
}

impl FeedData {
    /// Inserts or replaces record `id`, now at `tick`.
    fn put(&mut self, tick: u64, id: String, json: Arc<str>) {
        if let Some(old) = self.ticks.insert(id.clone(), tick) {
            self.records.remove(&(old, id.clone()));
        }
        self.records.insert((tick, id), json);
    }
}

/// A page of a feed: the response body and, for [`FeedStyle::Link`], the
/// `Link` header.
struct FeedPage {
    body: String,
    link: Option<String>,
}

impl State {
    /// The path and configuration of the feed `req` is for: a `GET` whose
    /// path (query ignored) has a feed.
    fn feed_for(&self, req: &Request) -> Option<&(String, Feed)> {
        if req.method != "GET" {
            return None;
        }
        let path = split_target(&req.path).0;
        self.behaviour.feeds.iter().find(|(p, _)| p == path)
    }

    /// Answers a feed request that passed the request-level checks: the
    /// page, or the reply [`Feed::fail_every()`] asks for.
    fn serve_feed(&mut self, req: &Request, path: &str, feed: &Feed, now: Instant) -> Action {
        let data = self.feeds.entry(path.to_owned()).or_default();
        data.served += 1;
        let served = data.served;
        let failure = feed.fail_every.as_ref().filter(|(n, _)| *n > 0 && served.is_multiple_of(*n));
        match failure.map(|(_, r)| r.clone()) {
            None | Some(Reply::Ok) => Action::Respond(self.feed_response(req, path, feed)),
            Some(Reply::SlowAfterCommit(delay)) => {
                Action::Delayed { delay, response: self.feed_response(req, path, feed) }
            }
            Some(Reply::Status { status, body }) => Action::Respond(self.status_reply(status, body)),
            Some(Reply::RetryAfter { status, value }) => Action::Respond(self.retry_after_reply(status, value, now)),
            Some(Reply::DropAfterCommit | Reply::DropBeforeCommit) => {
                self.stats.dropped += 1;
                Action::Drop
            }
        }
    }

    /// The page `req` asks for, or 400 if its parameters are refused.
    fn feed_response(&mut self, req: &Request, path: &str, feed: &Feed) -> Response {
        let empty = FeedData::default();
        let data = self.feeds.get(path).unwrap_or(&empty);
        match feed_page(data, feed, path, req, self.addr) {
            Ok(FeedPage { body, link }) => Response {
                owned_headers: link.map(|l| ("Link", l)).into_iter().collect(),
                ..Response::json(200, Body::Text(body))
            },
            Err(error) => {
                self.count_status(400);
                Response::json(400, Body::Text(serde_json::json!({ "error": error }).to_string()))
            }
        }
    }
}

/// The page of `feed` (served at `path`) that `req` asks for, or why its
/// parameters are refused.
fn feed_page(data: &FeedData, feed: &Feed, path: &str, req: &Request, addr: SocketAddr) -> Result<FeedPage, String> {
    let query = split_target(&req.path).1;
    let size = feed.page_size.max(1);
    match &feed.style {
        FeedStyle::UpdatedSince { param } => updated_since_page(data, size, query_value(query, param)?, param),
        FeedStyle::Token { param } => token_page(data, size, query_value(query, param)?, param),
        FeedStyle::Page { param, size_param } => {
            let page = positive(query_value(query, param)?, param)?.unwrap_or(1);
            let per_page = positive(query_value(query, size_param)?, size_param)?.map_or(size, |k| k.min(size));
            Ok(numbered_page(data, page, per_page))
        }
        FeedStyle::Link => {
            let base = format!("http://{}{path}", link_authority(&req.headers, addr));
            link_page(data, size, query_value(query, "after")?, &base)
        }
    }
}

/// [`FeedStyle::UpdatedSince`]: records with `updated_at >= since`.
fn updated_since_page(data: &FeedData, size: usize, since: Option<String>, param: &str) -> Result<FeedPage, String> {
    let first_tick = match since {
        None => 0,
        Some(since) => first_tick_at(parse_rfc3339(&since).ok_or_else(|| format!("invalid {param}"))?),
    };
    let (page, has_more) = take_page(data.records.range((first_tick, String::new())..), size);
    let body = format!(r#"{{"data":{},"has_more":{has_more}}}"#, json_array(&page));
    Ok(FeedPage { body, link: None })
}

/// [`FeedStyle::Token`]: records after the position the cursor names.
fn token_page(data: &FeedData, size: usize, cursor: Option<String>, param: &str) -> Result<FeedPage, String> {
    let (page, more) = match cursor {
        None => take_page(data.records.iter(), size),
        Some(cursor) => {
            let after = decode_cursor(&cursor).ok_or_else(|| format!("invalid {param}"))?;
            take_page(data.records.range((Bound::Excluded(after), Bound::Unbounded)), size)
        }
    };
    let next = match page.last() {
        Some(((tick, id), _)) if more => format!(r#""{}""#, encode_cursor(*tick, id)),
        _ => "null".to_owned(),
    };
    let body = format!(r#"{{"data":{},"next_cursor":{next}}}"#, json_array(&page));
    Ok(FeedPage { body, link: None })
}

/// [`FeedStyle::Page`]: page `page` (1-based) of `per_page` records.
fn numbered_page(data: &FeedData, page: usize, per_page: usize) -> FeedPage {
    let total_pages = data.records.len().div_ceil(per_page);
    let skip = (page - 1).saturating_mul(per_page);
    let records: Vec<_> = data.records.iter().skip(skip).take(per_page).collect();
    let body = format!(r#"{{"data":{},"page":{page},"total_pages":{total_pages}}}"#, json_array(&records));
    FeedPage { body, link: None }
}

/// [`FeedStyle::Link`]: records after the one with id `after`, with a
/// `rel="next"` link to `base` unless this is the last page.
fn link_page(data: &FeedData, size: usize, after: Option<String>, base: &str) -> Result<FeedPage, String> {
    let (page, more) = match after {
        None => take_page(data.records.iter(), size),
        Some(id) => {
            let tick = *data.ticks.get(&id).ok_or("unknown after")?;
            take_page(data.records.range((Bound::Excluded((tick, id)), Bound::Unbounded)), size)
        }
    };
    let link = match page.last() {
        Some(((_, id), _)) if more => Some(format!(r#"<{base}?after={}>; rel="next""#, percent_encode(id))),
        _ => None,
    };
    Ok(FeedPage { body: json_array(&page), link })
}

type FeedEntry<'a> = (&'a (u64, String), &'a Arc<str>);

/// Up to `size` entries, and whether there are more after them.
fn take_page<'a>(mut entries: impl Iterator<Item = FeedEntry<'a>>, size: usize) -> (Vec<FeedEntry<'a>>, bool) {
    let page: Vec<_> = entries.by_ref().take(size).collect();
    let more = entries.next().is_some();
    (page, more)
}

/// The records' JSON as a JSON array.
fn json_array(entries: &[FeedEntry<'_>]) -> String {
    let mut out = String::with_capacity(2 + entries.iter().map(|(_, json)| json.len() + 1).sum::<usize>());
    out.push('[');
    for (i, (_, json)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(json);
    }
    out.push(']');
    out
}

/// A page number or size parameter: a positive integer.
fn positive(value: Option<String>, param: &str) -> Result<Option<usize>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    let valid = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    match valid.then(|| value.parse::<usize>().ok()).flatten() {
        Some(n) if n > 0 => Ok(Some(n)),
        _ => Err(format!("invalid {param}")),
    }
}

/// The value of query parameter `name`, form-decoded; an error if any part
/// of the query is malformed, or if `name` occurs twice or is empty.
fn query_value(query: Option<&str>, name: &str) -> Result<Option<String>, String> {
    let mut found = None;
    for part in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (n, v) = part.split_once('=').unwrap_or((part, ""));
        let (n, v) = form_decode(n).zip(form_decode(v)).ok_or("malformed query")?;
        if n != name {
            continue;
        }
        if v.is_empty() {
            return Err(format!("invalid {name}"));
        }
        if found.replace(v).is_some() {
            return Err(format!("repeated {name}"));
        }
    }
    Ok(found)
}

/// A request target split into path and query (without the `?`).
fn split_target(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// The authority for absolute URLs: the request's `Host` if it looks like
/// one (so the link works through whatever name the client used), else the
/// listening address.
fn link_authority(headers: &[(String, String)], addr: SocketAddr) -> String {
    let host = find_header(headers, "host").filter(|h| {
        !h.is_empty()
            && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']'))
    });
    host.map_or_else(|| addr.to_string(), str::to_owned)
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The opaque [`FeedStyle::Token`] cursor for the position after the
/// record at (`tick`, `id`): unpadded base64url of `tick:id`.
fn encode_cursor(tick: u64, id: &str) -> String {
    base64url_encode(format!("{tick}:{id}").as_bytes())
}

/// The position a cursor from [`encode_cursor`] names.
fn decode_cursor(cursor: &str) -> Option<(u64, String)> {
    if cursor.bytes().any(|b| matches!(b, b'+' | b'/' | b'=')) {
        return None;
    }
    let standard = cursor.replace('-', "+").replace('_', "/");
    let decoded = String::from_utf8(base64_decode(&standard)?).ok()?;
    let (tick, id) = decoded.split_once(':')?;
    let valid = !tick.is_empty() && tick.bytes().all(|b| b.is_ascii_digit());
    Some((valid.then(|| tick.parse().ok()).flatten()?, id.to_owned()))
}

/// Base64url without padding (RFC 4648, 5).
fn base64url_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// The `updated_at` of feed clock tick `tick`: [`FEED_EPOCH`] plus `tick`
/// milliseconds, as RFC 3339 UTC with milliseconds.
fn feed_timestamp(tick: u64) -> String {
    let ms = FEED_EPOCH_MS + tick;
    let (days, ms_of_day) = (ms / MILLIS_PER_DAY, ms % MILLIS_PER_DAY);
    // Feed time starts in 2026, so the day count fits comfortably.
    let (year, month, day) = civil_from_days(days as i64);
    let (secs, millis) = (ms_of_day / 1000, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The first feed clock tick whose `updated_at` is at or after `nanos`
/// (since the Unix epoch).
fn first_tick_at(nanos: i128) -> u64 {
    let since_epoch = nanos - i128::from(FEED_EPOCH_MS) * NANOS_PER_MILLI;
    if since_epoch <= 0 {
        return 0;
    }
    let ticks = (since_epoch + NANOS_PER_MILLI - 1) / NANOS_PER_MILLI;
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// An RFC 3339 date-time (`T`, `t` or a space between date and time; any
/// fraction, truncated to nanoseconds; `Z`, `z` or `+hh:mm`/`-hh:mm`) as
/// nanoseconds since the Unix epoch. `None` if malformed or out of range.
fn parse_rfc3339(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    let digits = |range: Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let at = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut fraction = 0i128;
    if at(i, b".") {
        let len = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if len == 0 {
            return None;
        }
        let kept = &b[i + 1..i + 1 + len.min(9)];
        fraction = kept.iter().fold(0, |n, d| n * 10 + i128::from(d - b'0')) * 10i128.pow(9 - kept.len() as u32);
        i += 1 + len;
    }
    let offset_secs = match b.get(i..)? {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == i + 6 && at(i + 3, b":") => {
            let (h, m) = (digits(i + 1..i + 3)?, digits(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'+' { h * 3600 + m * 60 } else { -(h * 3600 + m * 60) }
        }
        _ => return None,
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(i128::from(secs) * 1_000_000_000 + fraction)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date `days` after 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
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
            Action::Delayed { delay, response } => {
                // Earlier pipelined responses go out before the pause.
                if writer.flush().await.is_err() {
                    break;
                }
                tokio::time::sleep(delay).await;
                response
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
    for (name, value) in &response.owned_headers {
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
