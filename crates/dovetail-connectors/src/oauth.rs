//! OAuth 2.0 bearer tokens for a connector (RFC 6749): the client
//! credentials grant, or the refresh token grant.
//!
//! A token is cached and shared by every request through the connector. It
//! is renewed before `expires_in` runs out (a fifth of its life early, at
//! most a minute), and at once when the partner refuses it. Concurrent
//! requests wait for one renewal instead of each asking the token endpoint.
//! The client authenticates with HTTP Basic (`client_secret_basic`).

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;
use tokio::sync::Mutex;

use dovetail_core::config::{ResolvedOAuth, Secret};
use dovetail_core::policy::Answer;

use crate::http::{AttemptResult, error_chain, read_excerpt};

/// Where bearer tokens come from, for one connector.
pub struct TokenSource {
    config: ResolvedOAuth,
    client: reqwest::Client,
    timeout: Duration,
    state: Mutex<TokenState>,
}

struct TokenState {
    access: Option<Cached>,
    /// A fetch that failed just now: callers queued behind it get its
    /// answer instead of each waiting out the token endpoint's timeout.
    failed: Option<(Instant, AttemptResult)>,
    /// The refresh token in use; a partner that rotates it gives a new one with each token.
    refresh_token: Option<Secret>,
}

struct Cached {
    token: Secret,
    renew_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    /// Seconds; some providers send it as a string.
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token: Option<String>,
}

/// How long a failed token fetch is remembered.
const FAILURE_MEMORY: Duration = Duration::from_secs(5);

/// Tokens with no `expires_in` are renewed after this long anyway.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

impl TokenSource {
    pub fn new(config: ResolvedOAuth, client: reqwest::Client, timeout: Duration) -> TokenSource {
        let refresh_token = config.refresh_token.clone();
        TokenSource {
            config,
            client,
            timeout,
            state: Mutex::new(TokenState { access: None, failed: None, refresh_token }),
        }
    }

    /// A token that is not about to expire, fetching one if needed. On
    /// failure, the result to record for the attempt: the token endpoint
    /// refusing our credentials reads as a 401 (pause the flow), its outages
    /// as the transient failures they are.
    pub async fn bearer(&self) -> Result<Secret, AttemptResult> {
        let mut state = self.state.lock().await;
        if let Some(c) = &state.access
            && Instant::now() < c.renew_at
        {
            return Ok(c.token.clone());
        }
        self.fetch_remembering(&mut state).await
    }

    async fn fetch_remembering(&self, state: &mut TokenState) -> Result<Secret, AttemptResult> {
        if let Some((at, failed)) = &state.failed
            && at.elapsed() < FAILURE_MEMORY
        {
            return Err(failed.clone());
        }
        let result = self.fetch(state).await;
        state.failed = result.as_ref().err().map(|f| (Instant::now(), f.clone()));
        result
    }

    /// The partner refused `rejected`: renew unless another request already did.
    pub async fn renew_after_rejection(&self, rejected: &Secret) -> Result<Secret, AttemptResult> {
        let mut state = self.state.lock().await;
        if let Some(c) = &state.access
            && &c.token != rejected
            && Instant::now() < c.renew_at
        {
            return Ok(c.token.clone());
        }
        state.access = None;
        self.fetch_remembering(&mut state).await
    }

    async fn fetch(&self, state: &mut TokenState) -> Result<Secret, AttemptResult> {
        let started = Instant::now();
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            match &state.refresh_token {
                Some(rt) => form.append_pair("grant_type", "refresh_token").append_pair("refresh_token", rt.expose()),
                None => form.append_pair("grant_type", "client_credentials"),
            };
            if let Some(scope) = &self.config.scope {
                form.append_pair("scope", scope);
            }
            if self.config.client_secret.is_none() {
                // A public client names itself in the body (RFC 6749 §2.3.1).
                form.append_pair("client_id", &self.config.client_id);
            }
            form.finish()
        };
        let mut request = self
            .client
            .post(&self.config.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .timeout(self.timeout)
            .body(body);
        if let Some(secret) = &self.config.client_secret {
            // RFC 6749 §2.3.1: both parts are form-encoded before Basic.
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let pair = format!("{}:{}", enc(&self.config.client_id), enc(secret.expose()));
            let value = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair));
            // Base64 is always a valid header value.
            if let Ok(mut header) = reqwest::header::HeaderValue::from_str(&value) {
                header.set_sensitive(true);
                request = request.header("authorization", header);
            }
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                let answer = if e.is_timeout() { Answer::Timeout } else { Answer::Connection };
                return Err(failure(started, answer, format!("token endpoint: {}", error_chain(&e.without_url()))));
            }
        };
        let status = response.status().as_u16();
        let body = read_excerpt(response, crate::http::BODY_EXCERPT_LIMIT).await.unwrap_or_default();
        if !(200..300).contains(&status) {
            // 400 (invalid_grant, invalid_client) and 401 mean our
            // credentials are wrong: that is an auth failure, not transient.
            let answer = if matches!(status, 400 | 401 | 403) {
                Answer::Status { status: 401, retry_after: None }
            } else {
                Answer::Status { status, retry_after: None }
            };
            return Err(failure(started, answer, format!("token endpoint answered {status}: {body}")));
        }
        let parsed: TokenResponse = serde_json::from_str(&body).map_err(|e| {
            failure(
                started,
                Answer::Status { status: 502, retry_after: None },
                format!("token endpoint sent no usable token: {e}"),
            )
        })?;
        let seconds = parsed
            .expires_in
            .as_ref()
            .and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())));
        // A day at most: a huge expires_in must not overflow the clock.
        let lifetime = seconds.map(Duration::from_secs).unwrap_or(DEFAULT_LIFETIME).min(Duration::from_secs(86_400));
        let early = (lifetime / 5).min(Duration::from_secs(60));
        let token = Secret::new(parsed.access_token);
        state.access = Some(Cached { token: token.clone(), renew_at: started + lifetime - early });
        if let Some(rotated) = parsed.refresh_token {
            state.refresh_token = Some(Secret::new(rotated));
        }
        tracing::debug!(token_url = %self.config.token_url, expires_in = ?parsed.expires_in, "obtained an OAuth2 access token");
        Ok(token)
    }
}

fn failure(started: Instant, answer: Answer, detail: String) -> AttemptResult {
    AttemptResult { answer, duration: started.elapsed(), detail: Some(detail), hint: Default::default() }
}
