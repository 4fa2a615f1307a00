//! Inbound webhook signatures: verifying them and, for tests and dev tooling,
//! producing them.
//!
//! A source that pushes records to Dovetail over HTTP proves who it is by
//! signing each request with a shared secret. Three schemes cover the senders
//! we care about, all HMAC-SHA256 over slightly different content:
//!
//! - [`Scheme::StandardWebhooks`] (<https://www.standardwebhooks.com>, also
//!   what Svix sends): `webhook-id`, `webhook-timestamp` and a space-separated
//!   `webhook-signature` list of `v1,<base64>` over `{id}.{timestamp}.{body}`.
//! - [`Scheme::Stripe`]: `Stripe-Signature: t=<secs>,v1=<hex>,...` over
//!   `{t}.{body}`.
//! - [`Scheme::GitHub`]: `X-Hub-Signature-256: sha256=<hex>` over the body
//!   alone (so there is no replay window to enforce).
//!
//! The HTTP layer owns headers and the clock; this module only sees a header
//! lookup function, the raw body bytes and "now", which keeps it pure and lets
//! tests pin time. Every comparison of a computed MAC against a presented one
//! is constant time, and every [`SignatureError`] is safe to send back to the
//! caller: it names the header and the problem, never a secret or the
//! signature we expected.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

use crate::clock::Timestamp;

type HmacSha256 = Hmac<Sha256>;

/// Length of an HMAC-SHA256 tag in bytes.
const TAG_LEN: usize = 32;
type Tag = [u8; TAG_LEN];

const WEBHOOK_ID: &str = "webhook-id";
const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
const WEBHOOK_SIGNATURE: &str = "webhook-signature";
const STRIPE_SIGNATURE: &str = "stripe-signature";
const GITHUB_SIGNATURE: &str = "x-hub-signature-256";
const GITHUB_DELIVERY: &str = "x-github-delivery";

const WHSEC_PREFIX: &str = "whsec_";

/// Standard base64 alphabet. Encoding pads (as the spec's examples do);
/// decoding accepts padded or unpadded input because secrets get pasted by
/// hand and a dropped `=` should not be a configuration error.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A webhook signature scheme. Serialized as its config string
/// (`"standard-webhooks"`, `"stripe"`, `"github"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// Standard Webhooks (`webhook-id` / `webhook-timestamp` / `webhook-signature`).
    StandardWebhooks,
    /// Stripe's `Stripe-Signature` header.
    Stripe,
    /// GitHub's `X-Hub-Signature-256` header.
    #[serde(rename = "github")]
    GitHub,
}

impl Scheme {
    /// Every scheme, in a stable order.
    pub const ALL: [Scheme; 3] = [Scheme::StandardWebhooks, Scheme::Stripe, Scheme::GitHub];

    /// The config string for this scheme; the same text serde uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::StandardWebhooks => "standard-webhooks",
            Scheme::Stripe => "stripe",
            Scheme::GitHub => "github",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Key material for one scheme. Its `Debug` prints `SigningSecret(..)`, never
/// the key, so a secret can sit in structs that get logged.
///
/// A secret is only meaningful for the scheme it was parsed for: the same
/// string yields different key bytes under Standard Webhooks (base64-decoded)
/// than under Stripe or GitHub (used verbatim).
#[derive(Clone)]
pub struct SigningSecret {
    key: Vec<u8>,
}

impl SigningSecret {
    /// Parse a configured secret string for `scheme`.
    ///
    /// - Standard Webhooks: `whsec_` followed by base64 (the prefix is
    ///   optional); the HMAC key is the base64-decoded bytes.
    /// - Stripe and GitHub: the whole string's bytes are the key.
    ///
    /// An empty secret is an error for every scheme.
    ///
    /// Stripe secrets also start with `whsec_`, but Stripe signs with the
    /// whole string as the key, prefix included, so nothing is stripped there.
    pub fn parse(scheme: Scheme, raw: &str) -> Result<SigningSecret, SecretFormatError> {
        let key = match scheme {
            Scheme::StandardWebhooks => {
                let encoded = raw.strip_prefix(WHSEC_PREFIX).unwrap_or(raw);
                if encoded.is_empty() {
                    return Err(SecretFormatError::Empty { scheme });
                }
                BASE64.decode(encoded).map_err(|_| SecretFormatError::NotBase64)?
            }
            Scheme::Stripe | Scheme::GitHub => raw.as_bytes().to_vec(),
        };
        if key.is_empty() {
            return Err(SecretFormatError::Empty { scheme });
        }
        Ok(SigningSecret { key })
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(..)")
    }
}

/// Why a configured secret string cannot be used. The messages say how to fix
/// the configuration and never include the secret itself.
#[derive(Debug, thiserror::Error)]
pub enum SecretFormatError {
    /// Nothing to use as a key (an empty string, or a bare `whsec_`).
    #[error(
        "the {scheme} signing secret is empty; copy the endpoint's signing secret from the sender's webhook settings"
    )]
    Empty {
        /// The scheme the secret was parsed for.
        scheme: Scheme,
    },
    /// A Standard Webhooks secret whose body is not base64.
    #[error(
        "a standard-webhooks secret is `whsec_` followed by base64; the part after the prefix is not valid base64 (check that it was copied whole, without quotes or whitespace)"
    )]
    NotBase64,
}

/// Checks inbound requests against one scheme and one or more secrets.
///
/// Several secrets are accepted at once so a secret can be rotated without
/// downtime: configure old and new, then drop the old one once the sender has
/// switched. With no secrets at all every request fails with
/// [`SignatureError::Mismatch`].
#[derive(Clone, Debug)]
pub struct Verifier {
    scheme: Scheme,
    secrets: Vec<SigningSecret>,
    tolerance: Duration,
}

impl Verifier {
    /// How far a signed timestamp may be from now, in either direction, before
    /// the request is treated as a replay: five minutes, the value Stripe and
    /// the Standard Webhooks reference libraries use.
    pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

    /// A verifier for `scheme` that accepts a signature made with any of `secrets`.
    pub fn new(scheme: Scheme, secrets: Vec<SigningSecret>) -> Verifier {
        Verifier { scheme, secrets, tolerance: Self::DEFAULT_TOLERANCE }
    }

    /// Replace the replay window (ignored by GitHub, which signs no timestamp).
    pub fn with_tolerance(self, tolerance: Duration) -> Verifier {
        Verifier { tolerance, ..self }
    }

    /// The scheme this verifier checks.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Check one request.
    ///
    /// - `header` looks a header up by its lower-case name (the caller handles
    ///   case-insensitivity) and returns its value.
    /// - `body` must be the raw bytes as received: re-serialized JSON will not
    ///   verify.
    /// - `now` is compared with the signed timestamp (Standard Webhooks, Stripe).
    pub fn verify<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
        now: Timestamp,
    ) -> Result<Verified, SignatureError> {
        match self.scheme {
            Scheme::StandardWebhooks => self.verify_standard(&header, body, now),
            Scheme::Stripe => self.verify_stripe(&header, body, now),
            Scheme::GitHub => self.verify_github(&header, body),
        }
    }

    fn verify_standard<'h>(
        &self,
        header: &impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
        now: Timestamp,
    ) -> Result<Verified, SignatureError> {
        let id = required(header, WEBHOOK_ID)?;
        let timestamp = required(header, WEBHOOK_TIMESTAMP)?;
        let signatures = required(header, WEBHOOK_SIGNATURE)?;
        if id.is_empty() {
            // The id is the idempotency key downstream; an empty one is useless.
            return Err(malformed(WEBHOOK_ID, "the message id is empty"));
        }
        let sent_at = parse_unix_secs(WEBHOOK_TIMESTAMP, timestamp)?;
        let candidates = standard_candidates(signatures)?;
        // Freshness first: it is cheap and needs no key.
        self.check_fresh(sent_at, now)?;
        let content: [&[u8]; 5] = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body];
        self.check_any_match(&content, &candidates)?;
        Ok(Verified { delivery_id: Some(id.to_owned()) })
    }

    fn verify_stripe<'h>(
        &self,
        header: &impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
        now: Timestamp,
    ) -> Result<Verified, SignatureError> {
        let value = required(header, STRIPE_SIGNATURE)?;
        let parsed = parse_stripe(value)?;
        self.check_fresh(parsed.sent_at, now)?;
        let content: [&[u8]; 3] = [parsed.timestamp.as_bytes(), b".", body];
        self.check_any_match(&content, &parsed.candidates)?;
        // Stripe's event id lives in the body; the header carries none.
        Ok(Verified { delivery_id: None })
    }

    fn verify_github<'h>(
        &self,
        header: &impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
    ) -> Result<Verified, SignatureError> {
        let value = required(header, GITHUB_SIGNATURE)?;
        let hex_tag = value
            .strip_prefix("sha256=")
            .ok_or_else(|| malformed(GITHUB_SIGNATURE, "expected `sha256=` followed by 64 hex digits"))?;
        let tag = decode_hex_tag(hex_tag)
            .ok_or_else(|| malformed(GITHUB_SIGNATURE, "the part after `sha256=` is not 64 hex digits"))?;
        self.check_any_match(&[body], &[tag])?;
        // X-GitHub-Delivery is not covered by the signature: good for logs and
        // de-duplication, not proof of anything.
        Ok(Verified { delivery_id: header(GITHUB_DELIVERY).map(str::to_owned) })
    }

    /// Reject a signed timestamp further than the tolerance from `now`, in
    /// either direction. Stripe's own libraries only reject old timestamps; a
    /// far-future one is just as much a sign of a replay or a broken clock.
    fn check_fresh(&self, sent_at: i64, now: Timestamp) -> Result<(), SignatureError> {
        if Timestamp::from_secs(sent_at).distance(now) > self.tolerance {
            return Err(SignatureError::StaleTimestamp { skew_secs: now.as_secs().saturating_sub(sent_at) });
        }
        Ok(())
    }

    /// Succeed if any presented tag equals the HMAC of `content` under any
    /// configured secret. Every pair is compared, in constant time, so the
    /// timing reveals neither which secret nor which entry matched.
    fn check_any_match(&self, content: &[&[u8]], candidates: &[Tag]) -> Result<(), SignatureError> {
        let mut matched = Choice::from(0);
        for secret in &self.secrets {
            let expected = hmac_tag(&secret.key, content);
            for candidate in candidates {
                matched |= expected.ct_eq(candidate);
            }
        }
        if bool::from(matched) { Ok(()) } else { Err(SignatureError::Mismatch) }
    }
}

/// What a successful verification tells the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The sender's id for this delivery, usable as an idempotency key:
    /// standard-webhooks: the `webhook-id` (signed); github: `X-GitHub-Delivery`
    /// if present (not signed); stripe: `None` (Stripe's event id is in the body).
    pub delivery_id: Option<String>,
}

/// Why a request failed verification. The Display texts are safe to return to
/// an HTTP caller: they name the header and the problem, never a secret or the
/// expected signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A header the scheme requires is absent (lower-case name).
    #[error("missing the `{0}` header")]
    MissingHeader(&'static str),
    /// A header is present but cannot be parsed.
    #[error("the `{header}` header is malformed: {reason}")]
    Malformed {
        /// Lower-case header name.
        header: &'static str,
        /// What is wrong, phrased for the sender's operator.
        reason: String,
    },
    /// The signed timestamp is outside the tolerance. `skew_secs` is
    /// `now - timestamp`: positive when the request is old, negative when it
    /// claims to come from the future.
    #[error(
        "the signed timestamp is {}, outside the allowed window; check the sender's clock, or this is a replayed request",
        describe_skew(*.skew_secs)
    )]
    StaleTimestamp {
        /// `now - timestamp`, in seconds.
        skew_secs: i64,
    },
    /// The signatures parsed, but none matches the body under any configured secret.
    #[error(
        "no signature matches the request body; check that the signing secret is the one configured for this endpoint and that the body was not modified in transit"
    )]
    Mismatch,
}

fn describe_skew(skew_secs: i64) -> String {
    if skew_secs >= 0 {
        format!("{skew_secs} seconds old")
    } else {
        format!("{} seconds in the future", skew_secs.unsigned_abs())
    }
}

/// Produce the headers a sender would send, with lower-case names. For tests,
/// benchmarks and `dovetail dev send`.
///
/// - standard-webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`
///   (`v1,<base64>`);
/// - stripe: `stripe-signature` (`t=<secs>,v1=<hex>`); `id` is not used;
/// - github: `x-hub-signature-256` (`sha256=<hex>`) and `x-github-delivery` (= `id`).
///
/// `timestamp` is truncated to whole seconds.
pub fn sign(
    scheme: Scheme,
    secret: &SigningSecret,
    id: &str,
    timestamp: Timestamp,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let secs = timestamp.as_secs().to_string();
    match scheme {
        Scheme::StandardWebhooks => {
            let tag = hmac_tag(&secret.key, &[id.as_bytes(), b".", secs.as_bytes(), b".", body]);
            vec![
                (WEBHOOK_ID, id.to_owned()),
                (WEBHOOK_TIMESTAMP, secs),
                (WEBHOOK_SIGNATURE, format!("v1,{}", BASE64.encode(tag))),
            ]
        }
        Scheme::Stripe => {
            let tag = hmac_tag(&secret.key, &[secs.as_bytes(), b".", body]);
            vec![(STRIPE_SIGNATURE, format!("t={secs},v1={}", hex::encode(tag)))]
        }
        Scheme::GitHub => {
            let tag = hmac_tag(&secret.key, &[body]);
            vec![(GITHUB_SIGNATURE, format!("sha256={}", hex::encode(tag))), (GITHUB_DELIVERY, id.to_owned())]
        }
    }
}

/// HMAC-SHA256 of the concatenation of `parts`, without building the
/// concatenation (bodies can be large).
fn hmac_tag(key: &[u8], parts: &[&[u8]]) -> Tag {
    // HMAC is defined for keys of every length (long ones are hashed first),
    // so this cannot fail; the key is configuration, not request input.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn required<'h>(header: &impl Fn(&str) -> Option<&'h str>, name: &'static str) -> Result<&'h str, SignatureError> {
    header(name).ok_or(SignatureError::MissingHeader(name))
}

fn malformed(header: &'static str, reason: &str) -> SignatureError {
    SignatureError::Malformed { header, reason: reason.to_owned() }
}

/// Unix seconds as plain ASCII digits. Stricter than `i64::from_str` (no sign):
/// the exact text is part of the signed content, so anything a sender would
/// not produce is rejected rather than normalised.
fn parse_unix_secs(header: &'static str, raw: &str) -> Result<i64, SignatureError> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(header, "the timestamp must be integer Unix seconds"));
    }
    raw.parse().map_err(|_| malformed(header, "the timestamp is too large to be Unix seconds"))
}

/// Tags from a `webhook-signature` list (`v1,<base64> v1a,<base64> ...`).
///
/// Entries of other versions (`v1a` is ed25519) are skipped, as are `v1`
/// entries that are not a 32-byte base64 tag: a sender may list several and
/// one good entry is enough. Only a list with nothing usable is malformed.
fn standard_candidates(value: &str) -> Result<Vec<Tag>, SignatureError> {
    let mut saw_v1 = false;
    let mut tags = Vec::new();
    for entry in value.split(' ').filter(|e| !e.is_empty()) {
        let Some(("v1", encoded)) = entry.split_once(',') else {
            continue;
        };
        saw_v1 = true;
        if let Some(tag) = decode_base64_tag(encoded) {
            tags.push(tag);
        }
    }
    usable(WEBHOOK_SIGNATURE, saw_v1, tags, "`v1,<base64>`")
}

/// A parsed `Stripe-Signature` header.
struct StripeHeader<'a> {
    /// The `t=` value as sent; it is signed verbatim.
    timestamp: &'a str,
    sent_at: i64,
    candidates: Vec<Tag>,
}

/// Parse `t=<secs>,v1=<hex>,v1=<hex>,v0=<hex>`.
///
/// Only `v1` counts: Stripe's docs say to ignore every other scheme to prevent
/// downgrade attacks. Unreadable `v1` values are skipped like Stripe's own
/// libraries do, but a header that is not a `key=value` list, or that has no
/// or several timestamps, is malformed.
fn parse_stripe(value: &str) -> Result<StripeHeader<'_>, SignatureError> {
    let mut timestamp = None;
    let mut saw_v1 = false;
    let mut candidates = Vec::new();
    for item in value.split(',') {
        let Some((key, val)) = item.split_once('=') else {
            return Err(malformed(
                STRIPE_SIGNATURE,
                "expected comma-separated `key=value` items such as `t=<unix seconds>,v1=<hex>`",
            ));
        };
        match key {
            "t" if timestamp.is_some() => {
                // Two timestamps would make it ambiguous which one was signed.
                return Err(malformed(STRIPE_SIGNATURE, "more than one `t=` timestamp"));
            }
            "t" => timestamp = Some(val),
            "v1" => {
                saw_v1 = true;
                if let Some(tag) = decode_hex_tag(val) {
                    candidates.push(tag);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or_else(|| malformed(STRIPE_SIGNATURE, "no `t=` timestamp"))?;
    let sent_at = parse_unix_secs(STRIPE_SIGNATURE, timestamp)?;
    let candidates = usable(STRIPE_SIGNATURE, saw_v1, candidates, "`v1=<hex>`")?;
    Ok(StripeHeader { timestamp, sent_at, candidates })
}

/// Turn "no tags" into a Malformed error that says which of the two ways it
/// went wrong, so an operator can tell "wrong scheme configured at the
/// sender" from "garbled header".
fn usable(header: &'static str, saw_v1: bool, tags: Vec<Tag>, form: &str) -> Result<Vec<Tag>, SignatureError> {
    if !saw_v1 {
        return Err(malformed(header, &format!("no {form} signature; only v1 (HMAC-SHA256) signatures are supported")));
    }
    if tags.is_empty() {
        return Err(malformed(header, &format!("no {form} signature holds a 32-byte HMAC-SHA256")));
    }
    Ok(tags)
}

fn decode_hex_tag(text: &str) -> Option<Tag> {
    let mut tag = [0; TAG_LEN];
    hex::decode_to_slice(text, &mut tag).ok()?;
    Some(tag)
}

fn decode_base64_tag(text: &str) -> Option<Tag> {
    // Bound the work before decoding: a tag is 44 characters of base64.
    if text.len() > 64 {
        return None;
    }
    BASE64.decode(text).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Headers = Vec<(&'static str, String)>;

    fn lookup<'a>(headers: &'a [(&'static str, String)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |name| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    fn without(mut headers: Headers, name: &str) -> Headers {
        headers.retain(|(n, _)| *n != name);
        headers
    }

    fn with(mut headers: Headers, name: &'static str, value: &str) -> Headers {
        headers.retain(|(n, _)| *n != name);
        headers.push((name, value.to_owned()));
        headers
    }

    fn secret(scheme: Scheme, raw: &str) -> SigningSecret {
        SigningSecret::parse(scheme, raw).expect("test secret parses")
    }

    fn verifier(scheme: Scheme, raw: &str) -> Verifier {
        Verifier::new(scheme, vec![secret(scheme, raw)])
    }

    fn malformed_header(result: Result<Verified, SignatureError>) -> &'static str {
        match result {
            Err(SignatureError::Malformed { header, .. }) => header,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    // --- Published vectors -------------------------------------------------

    // Standard Webhooks: the "sign function works" test in the reference
    // libraries, standard-webhooks/standard-webhooks
    // libraries/javascript/src/webhook.test.ts (the same values appear in the
    // other languages' tests).
    const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SW_TIMESTAMP: i64 = 1_614_265_330;
    const SW_PAYLOAD: &[u8] = br#"{"test": 2432232314}"#;
    const SW_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    // GitHub: "Testing the webhook payload validation" in
    // https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
    const GH_SECRET: &str = "It's a Secret to Everybody";
    const GH_PAYLOAD: &[u8] = b"Hello, World!";
    const GH_SIGNATURE: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    // Stripe: stripe/stripe-dotnet src/StripeTests/Services/Events/EventUtilityTest.cs,
    // which signs the fixture src/StripeTests/Resources/event_test_signature.json
    // (reproduced byte for byte below, trailing newline included) with secret
    // "webhook_secret" at t=1533204620. Its v1 value was also recomputed here
    // with Python's hmac module as a cross-check.
    const STRIPE_SECRET: &str = "webhook_secret";
    const STRIPE_TIMESTAMP: i64 = 1_533_204_620;
    const STRIPE_PAYLOAD: &str = r#"{
  "id": "evt_123",
  "object": "event",
  "account": "acct_123",
  "api_version": "2017-05-25",
  "created": 1533204620,
  "data": {
    "object": {
      "id": "cus_123",
      "object": "customer",
      "created": 123456789,
      "email": "test@stripe.com",
      "livemode": false,
      "metadata": {}
    }
  },
  "livemode": false,
  "pending_webhooks": 1,
  "request": {
    "id": "req_123",
    "idempotency_key": "idempotency-key-123"
  },
  "type": "customer.created"
}
"#;
    const STRIPE_SIGNATURE_HEADER: &str = "t=1533204620,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef";

    fn sw_headers() -> Headers {
        vec![
            (WEBHOOK_ID, SW_ID.to_owned()),
            (WEBHOOK_TIMESTAMP, SW_TIMESTAMP.to_string()),
            (WEBHOOK_SIGNATURE, SW_SIGNATURE.to_owned()),
        ]
    }

    fn sw_now() -> Timestamp {
        Timestamp::from_secs(SW_TIMESTAMP)
    }

    fn stripe_headers() -> Headers {
        vec![(STRIPE_SIGNATURE, STRIPE_SIGNATURE_HEADER.to_owned())]
    }

    fn stripe_now() -> Timestamp {
        Timestamp::from_secs(STRIPE_TIMESTAMP + 100)
    }

    fn gh_headers() -> Headers {
        vec![(GITHUB_SIGNATURE, GH_SIGNATURE.to_owned())]
    }

    #[test]
    fn standard_webhooks_reference_vector_is_produced() {
        let key = secret(Scheme::StandardWebhooks, SW_SECRET);
        let headers = sign(Scheme::StandardWebhooks, &key, SW_ID, sw_now(), SW_PAYLOAD);
        assert_eq!(headers, sw_headers());
    }

    #[test]
    fn standard_webhooks_reference_vector_verifies_with_and_without_prefix() {
        for raw in [SW_SECRET, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] {
            let result = verifier(Scheme::StandardWebhooks, raw).verify(lookup(&sw_headers()), SW_PAYLOAD, sw_now());
            assert_eq!(result, Ok(Verified { delivery_id: Some(SW_ID.to_owned()) }));
        }
    }

    #[test]
    fn github_docs_vector_is_produced_and_verifies() {
        let key = secret(Scheme::GitHub, GH_SECRET);
        let headers = sign(Scheme::GitHub, &key, "delivery-1", Timestamp::from_secs(0), GH_PAYLOAD);
        assert_eq!(lookup(&headers)(GITHUB_SIGNATURE), Some(GH_SIGNATURE));
        assert_eq!(lookup(&headers)(GITHUB_DELIVERY), Some("delivery-1"));

        // GitHub signs no timestamp, so any `now` will do.
        let result =
            verifier(Scheme::GitHub, GH_SECRET).verify(lookup(&gh_headers()), GH_PAYLOAD, Timestamp::from_secs(0));
        assert_eq!(result, Ok(Verified { delivery_id: None }));
    }

    #[test]
    fn github_delivery_id_is_passed_through() {
        let headers = with(gh_headers(), GITHUB_DELIVERY, "72d3162e-cc78-11e3-81ab-4c9367dc0958");
        let result = verifier(Scheme::GitHub, GH_SECRET).verify(lookup(&headers), GH_PAYLOAD, Timestamp::from_secs(0));
        assert_eq!(result, Ok(Verified { delivery_id: Some("72d3162e-cc78-11e3-81ab-4c9367dc0958".to_owned()) }));
    }

    #[test]
    fn stripe_library_vector_verifies_and_is_produced() {
        let result = verifier(Scheme::Stripe, STRIPE_SECRET).verify(
            lookup(&stripe_headers()),
            STRIPE_PAYLOAD.as_bytes(),
            stripe_now(),
        );
        assert_eq!(result, Ok(Verified { delivery_id: None }));

        let key = secret(Scheme::Stripe, STRIPE_SECRET);
        let headers =
            sign(Scheme::Stripe, &key, "ignored", Timestamp::from_secs(STRIPE_TIMESTAMP), STRIPE_PAYLOAD.as_bytes());
        assert_eq!(
            headers,
            vec![(
                STRIPE_SIGNATURE,
                "t=1533204620,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7".to_owned()
            )]
        );
    }

    // --- Rejections ---------------------------------------------------------

    #[test]
    fn altered_body_is_a_mismatch_for_every_scheme() {
        let sw = verifier(Scheme::StandardWebhooks, SW_SECRET).verify(
            lookup(&sw_headers()),
            br#"{"test": 2432232315}"#,
            sw_now(),
        );
        assert_eq!(sw, Err(SignatureError::Mismatch));

        let body = STRIPE_PAYLOAD.replace("cus_123", "cus_124");
        let stripe =
            verifier(Scheme::Stripe, STRIPE_SECRET).verify(lookup(&stripe_headers()), body.as_bytes(), stripe_now());
        assert_eq!(stripe, Err(SignatureError::Mismatch));

        let gh = verifier(Scheme::GitHub, GH_SECRET).verify(
            lookup(&gh_headers()),
            b"Hello, World?",
            Timestamp::from_secs(0),
        );
        assert_eq!(gh, Err(SignatureError::Mismatch));
    }

    #[test]
    fn altered_signed_metadata_is_a_mismatch() {
        let other_id = with(sw_headers(), WEBHOOK_ID, "msg_p5jXN8AQM9LWM0D4loKWxJel");
        let result = verifier(Scheme::StandardWebhooks, SW_SECRET).verify(lookup(&other_id), SW_PAYLOAD, sw_now());
        assert_eq!(result, Err(SignatureError::Mismatch));

        let other_t = STRIPE_SIGNATURE_HEADER.replace("t=1533204620", "t=1533204621");
        let headers = with(stripe_headers(), STRIPE_SIGNATURE, &other_t);
        let result =
            verifier(Scheme::Stripe, STRIPE_SECRET).verify(lookup(&headers), STRIPE_PAYLOAD.as_bytes(), stripe_now());
        assert_eq!(result, Err(SignatureError::Mismatch));
    }

    #[test]
    fn wrong_secret_is_a_mismatch_for_every_scheme() {
        let sw = verifier(Scheme::StandardWebhooks, "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").verify(
            lookup(&sw_headers()),
            SW_PAYLOAD,
            sw_now(),
        );
        assert_eq!(sw, Err(SignatureError::Mismatch));

        let stripe = verifier(Scheme::Stripe, "whsec_other").verify(
            lookup(&stripe_headers()),
            STRIPE_PAYLOAD.as_bytes(),
            stripe_now(),
        );
        assert_eq!(stripe, Err(SignatureError::Mismatch));

        let gh = verifier(Scheme::GitHub, "It's a secret to everybody").verify(
            lookup(&gh_headers()),
            GH_PAYLOAD,
            Timestamp::from_secs(0),
        );
        assert_eq!(gh, Err(SignatureError::Mismatch));
    }

    #[test]
    fn no_configured_secrets_is_a_mismatch() {
        let result = Verifier::new(Scheme::GitHub, Vec::new()).verify(
            lookup(&gh_headers()),
            GH_PAYLOAD,
            Timestamp::from_secs(0),
        );
        assert_eq!(result, Err(SignatureError::Mismatch));
    }

    #[test]
    fn stale_timestamps_are_rejected_in_both_directions() {
        let sw = verifier(Scheme::StandardWebhooks, SW_SECRET);
        let stripe = verifier(Scheme::Stripe, STRIPE_SECRET);
        for skew in [301_i64, -301, 86_400, -86_400] {
            let now = Timestamp::from_secs(SW_TIMESTAMP + skew);
            assert_eq!(
                sw.verify(lookup(&sw_headers()), SW_PAYLOAD, now),
                Err(SignatureError::StaleTimestamp { skew_secs: skew })
            );
            let now = Timestamp::from_secs(STRIPE_TIMESTAMP + skew);
            assert_eq!(
                stripe.verify(lookup(&stripe_headers()), STRIPE_PAYLOAD.as_bytes(), now),
                Err(SignatureError::StaleTimestamp { skew_secs: skew })
            );
        }
    }

    #[test]
    fn a_millisecond_beyond_the_tolerance_is_stale() {
        let now = Timestamp::from_millis(SW_TIMESTAMP * 1000 + 300_001);
        let result = verifier(Scheme::StandardWebhooks, SW_SECRET).verify(lookup(&sw_headers()), SW_PAYLOAD, now);
        assert_eq!(result, Err(SignatureError::StaleTimestamp { skew_secs: 300 }));
    }

    #[test]
    fn timestamps_just_within_tolerance_are_accepted() {
        let sw = verifier(Scheme::StandardWebhooks, SW_SECRET);
        let stripe = verifier(Scheme::Stripe, STRIPE_SECRET);
        for skew in [300_i64, -300, 0] {
            let now = Timestamp::from_secs(SW_TIMESTAMP + skew);
            assert!(sw.verify(lookup(&sw_headers()), SW_PAYLOAD, now).is_ok(), "skew {skew}");
            let now = Timestamp::from_secs(STRIPE_TIMESTAMP + skew);
            assert!(stripe.verify(lookup(&stripe_headers()), STRIPE_PAYLOAD.as_bytes(), now).is_ok(), "skew {skew}");
        }
    }

    #[test]
    fn tolerance_is_configurable() {
        let now = Timestamp::from_secs(SW_TIMESTAMP + 3600);
        let strict = verifier(Scheme::StandardWebhooks, SW_SECRET);
        assert!(strict.verify(lookup(&sw_headers()), SW_PAYLOAD, now).is_err());
        let lenient = strict.with_tolerance(Duration::from_secs(3600));
        assert!(lenient.verify(lookup(&sw_headers()), SW_PAYLOAD, now).is_ok());
        assert_eq!(lenient.scheme(), Scheme::StandardWebhooks);
    }

    #[test]
    fn each_missing_header_is_named() {
        let sw = verifier(Scheme::StandardWebhooks, SW_SECRET);
        for name in [WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE] {
            let headers = without(sw_headers(), name);
            assert_eq!(sw.verify(lookup(&headers), SW_PAYLOAD, sw_now()), Err(SignatureError::MissingHeader(name)));
        }
        let stripe =
            verifier(Scheme::Stripe, STRIPE_SECRET).verify(lookup(&[]), STRIPE_PAYLOAD.as_bytes(), stripe_now());
        assert_eq!(stripe, Err(SignatureError::MissingHeader(STRIPE_SIGNATURE)));

        // GitHub's delivery id is optional; its signature is not. Neither is
        // the deprecated SHA-1 header a substitute.
        let sha1_only = vec![("x-hub-signature", "sha1=7d38cdd689735b008b3c702edd92eea23791c5f6".to_owned())];
        let gh = verifier(Scheme::GitHub, GH_SECRET).verify(lookup(&sha1_only), GH_PAYLOAD, Timestamp::from_secs(0));
        assert_eq!(gh, Err(SignatureError::MissingHeader(GITHUB_SIGNATURE)));
    }

    #[test]
    fn malformed_standard_webhooks_headers_are_named() {
        let sw = verifier(Scheme::StandardWebhooks, SW_SECRET);
        let cases: [(&'static str, &str); 13] = [
            (WEBHOOK_ID, ""),
            (WEBHOOK_TIMESTAMP, "hello"),
            (WEBHOOK_TIMESTAMP, ""),
            (WEBHOOK_TIMESTAMP, "1614265330.5"),
            (WEBHOOK_TIMESTAMP, "-1614265330"),
            (WEBHOOK_TIMESTAMP, "+1614265330"),
            (WEBHOOK_TIMESTAMP, " 1614265330"),
            (WEBHOOK_TIMESTAMP, "99999999999999999999"),
            (WEBHOOK_SIGNATURE, ""),
            (WEBHOOK_SIGNATURE, "v1,"),
            (WEBHOOK_SIGNATURE, "v1,dawfeoifkpqwoekfpqoekf"),
            (WEBHOOK_SIGNATURE, "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
            (WEBHOOK_SIGNATURE, "v1,g0hM9SsE"),
        ];
        for (name, value) in cases {
            let headers = with(sw_headers(), name, value);
            let result = sw.verify(lookup(&headers), SW_PAYLOAD, sw_now());
            assert_eq!(malformed_header(result), name, "{name}: {value:?}");
        }
    }

    #[test]
    fn malformed_stripe_headers_are_rejected() {
        let stripe = verifier(Scheme::Stripe, STRIPE_SECRET);
        let v1 = "v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7";
        let cases = [
            String::new(),
            "t".to_owned(),
            ",,".to_owned(),
            "t,,".to_owned(),
            "t,v1=,".to_owned(),
            "t,v1=,v0=".to_owned(),
            format!("t=,{v1}"),
            format!("t=abc,{v1}"),
            v1.to_owned(),
            format!("t=1533204620,t=1533204620,{v1}"),
            format!("t=1533204620,{v1},"),
            "t=1533204620".to_owned(),
            "t=1533204620,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef".to_owned(),
            "t=1533204620,v1=bad_signature".to_owned(),
            "v1,t=1".to_owned(),
        ];
        for value in cases {
            let headers = with(stripe_headers(), STRIPE_SIGNATURE, &value);
            let result = stripe.verify(lookup(&headers), STRIPE_PAYLOAD.as_bytes(), stripe_now());
            assert_eq!(malformed_header(result), STRIPE_SIGNATURE, "{value:?}");
        }
    }

    #[test]
    fn unreadable_extra_stripe_signatures_are_ignored() {
        // As in stripe-go's tests: a junk v1 next to a good one is not fatal.
        let value = format!("{STRIPE_SIGNATURE_HEADER},v1=bad_signature");
        let headers = with(stripe_headers(), STRIPE_SIGNATURE, &value);
        let result =
            verifier(Scheme::Stripe, STRIPE_SECRET).verify(lookup(&headers), STRIPE_PAYLOAD.as_bytes(), stripe_now());
        assert!(result.is_ok());
    }

    #[test]
    fn malformed_github_headers_are_rejected() {
        let gh = verifier(Scheme::GitHub, GH_SECRET);
        let cases = [
            "",
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha1=7d38cdd689735b008b3c702edd92eea23791c5f6",
            "sha256=",
            "sha256=757107ea0eb2509f",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e1",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17ff",
            "sha256=zz7107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "SHA256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        ];
        for value in cases {
            let headers = with(gh_headers(), GITHUB_SIGNATURE, value);
            let result = gh.verify(lookup(&headers), GH_PAYLOAD, Timestamp::from_secs(0));
            assert_eq!(malformed_header(result), GITHUB_SIGNATURE, "{value:?}");
        }
    }

    #[test]
    fn asymmetric_v1a_signatures_alone_are_rejected() {
        let value = "v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5BdqzCInXqYXFymVJaA7AZdpXwVLPo3mNl8EM+m7TBAg==";
        let headers = with(sw_headers(), WEBHOOK_SIGNATURE, value);
        let result = verifier(Scheme::StandardWebhooks, SW_SECRET).verify(lookup(&headers), SW_PAYLOAD, sw_now());
        assert_eq!(malformed_header(result), WEBHOOK_SIGNATURE);

        // The valid tag under a different version label does not count either.
        let relabelled = SW_SIGNATURE.replacen("v1,", "v1a,", 1);
        let headers = with(sw_headers(), WEBHOOK_SIGNATURE, &relabelled);
        let result = verifier(Scheme::StandardWebhooks, SW_SECRET).verify(lookup(&headers), SW_PAYLOAD, sw_now());
        assert!(result.is_err());
    }

    // --- Rotation -----------------------------------------------------------

    #[test]
    fn standard_webhooks_any_entry_under_any_secret_matches() {
        // From the reference libraries' "multi sig payload is valid" test:
        // junk v1 and v2 entries around the one valid signature.
        let list = format!(
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {SW_SIGNATURE} v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
        );
        let headers = with(sw_headers(), WEBHOOK_SIGNATURE, &list);
        let rotating = Verifier::new(
            Scheme::StandardWebhooks,
            vec![
                secret(Scheme::StandardWebhooks, "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
                secret(Scheme::StandardWebhooks, SW_SECRET),
            ],
        );
        assert!(rotating.verify(lookup(&headers), SW_PAYLOAD, sw_now()).is_ok());
    }

    #[test]
    fn sender_signing_with_old_and_new_secret_verifies_against_either() {
        let old = secret(Scheme::StandardWebhooks, "whsec_b2xkIHNlY3JldCBvbGQgc2VjcmV0IG9sZA==");
        let new = secret(Scheme::StandardWebhooks, SW_SECRET);
        let old_sig = lookup(&sign(Scheme::StandardWebhooks, &old, SW_ID, sw_now(), SW_PAYLOAD))(WEBHOOK_SIGNATURE)
            .map(str::to_owned)
            .expect("signed");
        // Only the second entry is made with the receiver's secret.
        let list = format!("{old_sig} {SW_SIGNATURE}");
        let headers = with(sw_headers(), WEBHOOK_SIGNATURE, &list);
        assert!(
            Verifier::new(Scheme::StandardWebhooks, vec![new]).verify(lookup(&headers), SW_PAYLOAD, sw_now()).is_ok()
        );
        assert!(
            Verifier::new(Scheme::StandardWebhooks, vec![old]).verify(lookup(&headers), SW_PAYLOAD, sw_now()).is_ok()
        );
    }

    #[test]
    fn stripe_second_v1_matches_second_secret() {
        let old = secret(Scheme::Stripe, "whsec_old");
        let old_header =
            sign(Scheme::Stripe, &old, "", Timestamp::from_secs(STRIPE_TIMESTAMP), STRIPE_PAYLOAD.as_bytes());
        let old_v1 = lookup(&old_header)(STRIPE_SIGNATURE)
            .and_then(|v| v.split_once(",v1="))
            .map(|(_, hex)| hex.to_owned())
            .expect("signed");
        let value =
            format!("t=1533204620,v1={old_v1},v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7");
        let headers = with(stripe_headers(), STRIPE_SIGNATURE, &value);
        let rotating = Verifier::new(
            Scheme::Stripe,
            vec![secret(Scheme::Stripe, "whsec_unrelated"), secret(Scheme::Stripe, STRIPE_SECRET)],
        );
        assert!(rotating.verify(lookup(&headers), STRIPE_PAYLOAD.as_bytes(), stripe_now()).is_ok());
    }

    #[test]
    fn github_second_secret_matches() {
        let rotating = Verifier::new(
            Scheme::GitHub,
            vec![secret(Scheme::GitHub, "the old one"), secret(Scheme::GitHub, GH_SECRET)],
        );
        assert!(rotating.verify(lookup(&gh_headers()), GH_PAYLOAD, Timestamp::from_secs(0)).is_ok());
    }

    // --- Secrets, schemes and messages --------------------------------------

    #[test]
    fn empty_secrets_are_rejected_for_every_scheme() {
        for scheme in Scheme::ALL {
            assert!(matches!(
                SigningSecret::parse(scheme, ""),
                Err(SecretFormatError::Empty { scheme: s }) if s == scheme
            ));
        }
        assert!(matches!(
            SigningSecret::parse(Scheme::StandardWebhooks, "whsec_"),
            Err(SecretFormatError::Empty { .. })
        ));
    }

    #[test]
    fn standard_webhooks_secret_must_be_base64() {
        for raw in ["whsec_not base64!", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n", "whsec_A"] {
            let err = SigningSecret::parse(Scheme::StandardWebhooks, raw).expect_err(raw);
            assert!(matches!(err, SecretFormatError::NotBase64));
            let message = err.to_string();
            assert!(message.contains("`whsec_` followed by base64"), "{message}");
            assert!(!message.contains(raw.trim_start_matches("whsec_")), "{message}");
        }
    }

    #[test]
    fn stripe_and_github_secrets_are_used_verbatim() {
        // "whsec_" is part of a Stripe key, not a prefix to strip, and a GitHub
        // secret is arbitrary text.
        assert!(SigningSecret::parse(Scheme::Stripe, "whsec_not base64!").is_ok());
        assert!(SigningSecret::parse(Scheme::GitHub, "whsec_").is_ok());
    }

    #[test]
    fn debug_output_hides_key_material() {
        let key = secret(Scheme::GitHub, GH_SECRET);
        assert_eq!(format!("{key:?}"), "SigningSecret(..)");
        let debug = format!("{:?}", Verifier::new(Scheme::GitHub, vec![key]));
        assert!(!debug.contains("Secret to Everybody"), "{debug}");
        assert!(!debug.contains("73, 116"), "{debug}"); // "It" as bytes
    }

    #[test]
    fn scheme_config_strings_round_trip() {
        for scheme in Scheme::ALL {
            let json = serde_json::to_string(&scheme).expect("serializes");
            assert_eq!(json, format!("\"{}\"", scheme.as_str()));
            assert_eq!(serde_json::from_str::<Scheme>(&json).expect("deserializes"), scheme);
            assert_eq!(scheme.to_string(), scheme.as_str());
        }
        assert_eq!(Scheme::ALL.map(Scheme::as_str), ["standard-webhooks", "stripe", "github"]);
        assert!(serde_json::from_str::<Scheme>("\"git-hub\"").is_err());
    }

    #[test]
    fn error_messages_name_the_problem_without_secrets_or_expected_tags() {
        let expected_hex = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let headers = with(
            gh_headers(),
            GITHUB_SIGNATURE,
            "sha256=0000000000000000000000000000000000000000000000000000000000000000",
        );
        let err = verifier(Scheme::GitHub, GH_SECRET)
            .verify(lookup(&headers), GH_PAYLOAD, Timestamp::from_secs(0))
            .expect_err("mismatch");
        let message = err.to_string();
        assert!(!message.contains(expected_hex) && !message.contains(GH_SECRET), "{message}");

        assert_eq!(SignatureError::MissingHeader(WEBHOOK_ID).to_string(), "missing the `webhook-id` header");
        let old = SignatureError::StaleTimestamp { skew_secs: 400 }.to_string();
        assert!(old.contains("400 seconds old"), "{old}");
        let future = SignatureError::StaleTimestamp { skew_secs: -400 }.to_string();
        assert!(future.contains("400 seconds in the future"), "{future}");
        let bad = malformed(WEBHOOK_TIMESTAMP, "the timestamp must be integer Unix seconds").to_string();
        assert!(bad.starts_with("the `webhook-timestamp` header is malformed"), "{bad}");
    }

    // --- Properties ---------------------------------------------------------

    fn any_scheme() -> impl Strategy<Value = Scheme> {
        prop::sample::select(Scheme::ALL.to_vec())
    }

    /// A secret of the given scheme from arbitrary key bytes, plus its config text.
    fn secret_text(scheme: Scheme, key: &[u8]) -> String {
        match scheme {
            Scheme::StandardWebhooks => format!("whsec_{}", BASE64.encode(key)),
            Scheme::Stripe | Scheme::GitHub => hex::encode(key),
        }
    }

    /// Header values: mostly arbitrary text, sometimes near-misses of the
    /// real formats so parsing gets past its first check.
    fn header_value() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,80}",
            "(v1a?,[A-Za-z0-9+/=]{0,50} ?){0,4}",
            "t=[0-9]{0,12}(,v[01]=[0-9a-f]{0,70}){0,3}",
            "sha256=[0-9a-fA-F]{0,70}",
            "[0-9]{0,22}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn verify_never_panics(
            scheme in any_scheme(),
            values in prop::collection::vec(prop::option::of(header_value()), 6),
            body in prop::collection::vec(any::<u8>(), 0..256),
            now in any::<i64>(),
        ) {
            let names = [WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE, STRIPE_SIGNATURE, GITHUB_SIGNATURE, GITHUB_DELIVERY];
            let headers: Headers = names
                .into_iter()
                .zip(values)
                .filter_map(|(name, value)| value.map(|v| (name, v)))
                .collect();
            let verifier = Verifier::new(scheme, vec![secret(scheme, &secret_text(scheme, b"key"))]);
            let _ = verifier.verify(lookup(&headers), &body, Timestamp::from_millis(now));
        }

        #[test]
        fn signed_requests_verify(
            scheme in any_scheme(),
            key in prop::collection::vec(any::<u8>(), 1..100),
            id in "\\PC{1,40}",
            secs in 0_i64..4_102_444_800,
            body in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let key = secret(scheme, &secret_text(scheme, &key));
            let sent_at = Timestamp::from_secs(secs);
            let headers = sign(scheme, &key, &id, sent_at, &body);
            let verified = Verifier::new(scheme, vec![key]).verify(lookup(&headers), &body, sent_at);
            let expected_id = match scheme {
                Scheme::Stripe => None,
                Scheme::StandardWebhooks | Scheme::GitHub => Some(id),
            };
            prop_assert_eq!(verified, Ok(Verified { delivery_id: expected_id }));
        }

        #[test]
        fn any_flipped_body_byte_fails(
            scheme in any_scheme(),
            body in prop::collection::vec(any::<u8>(), 1..256),
            index in any::<prop::sample::Index>(),
            flip in 1_u8..=255,
        ) {
            let key = secret(scheme, &secret_text(scheme, b"a fixed key"));
            let sent_at = Timestamp::from_secs(1_700_000_000);
            let headers = sign(scheme, &key, "msg_1", sent_at, &body);
            let mut tampered = body.clone();
            tampered[index.index(body.len())] ^= flip;
            let result = Verifier::new(scheme, vec![key]).verify(lookup(&headers), &tampered, sent_at);
            prop_assert_eq!(result, Err(SignatureError::Mismatch));
        }
    }
}
