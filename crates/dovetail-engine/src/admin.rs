//! The admin API under `/api/v1`: the same read models as the CLI (status,
//! dead letters, records, traces, drift) and the operator actions (replay,
//! discard, resume), described by an OpenAPI 3.1 document at
//! `/api/v1/openapi.json`.
//!
//! With `[engine] admin_token` set, every endpoint but the OpenAPI document
//! wants `Authorization: Bearer TOKEN`. Without it, the API is read-only:
//! actions answer 403 and say how to enable them.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use dovetail_core::clock::Clock;
use dovetail_core::config::{Config, Secret};
use dovetail_journal::{Journal, Selector};

use crate::views;

/// Records moved per transaction by replay and discard.
const CHUNK: usize = 1000;
/// Most records a list or trace answers with.
const MAX_LIMIT: usize = 1000;

pub(crate) struct Admin {
    pub config: Arc<Config>,
    pub journal: Arc<dyn Journal>,
    pub clock: Arc<dyn Clock>,
    pub token: Option<Secret>,
    /// Woken after a replay or a resume, so it is acted on now.
    pub dispatchers: crate::Dispatchers,
}

type Shared = State<Arc<Admin>>;

pub(crate) fn router(admin: Admin) -> Router {
    let admin = Arc::new(admin);
    Router::new()
        .route("/api/v1/openapi.json", get(|| async { axum::Json(crate::openapi::document()) }))
        .route("/api/v1/status", get(status))
        .route("/api/v1/dlq", get(dead_letters))
        .route("/api/v1/dlq/replay", post(replay))
        .route("/api/v1/dlq/discard", post(discard))
        .route("/api/v1/records/{id}", get(record))
        .route("/api/v1/trace/{needle}", get(trace))
        .route("/api/v1/drift", get(drift))
        .route("/api/v1/flows/{flow}/resume", post(resume))
        .with_state(admin)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn journal_error(e: dovetail_journal::JournalError) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, format!("the journal cannot answer: {e}"))
}

/// `None` when the request may go on; else the refusal.
fn refuse(admin: &Admin, headers: &HeaderMap, action: bool) -> Option<Response> {
    refuse_with(admin.token.as_ref(), headers, action)
}

fn refuse_with(token: Option<&Secret>, headers: &HeaderMap, action: bool) -> Option<Response> {
    let Some(token) = token else {
        return action.then(|| {
            error(
                StatusCode::FORBIDDEN,
                "actions need an admin token: set [engine] admin_token = \"env:NAME\" and send Authorization: Bearer TOKEN",
            )
        });
    };
    if authorized(token, headers) {
        None
    } else {
        Some(error(StatusCode::UNAUTHORIZED, "send Authorization: Bearer TOKEN with the engine's admin_token"))
    }
}

/// `Authorization: Bearer TOKEN`, or HTTP Basic with the token as the
/// password (what a browser sends for the dashboard), any user name.
pub(crate) fn authorized(token: &Secret, headers: &HeaderMap) -> bool {
    use base64::Engine as _;
    let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else { return false };
    if let Some(t) = value.strip_prefix("Bearer ") {
        return token.matches(t);
    }
    let Some(encoded) = value.strip_prefix("Basic ") else { return false };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else { return false };
    let Ok(text) = String::from_utf8(decoded) else { return false };
    text.split_once(':').is_some_and(|(_, password)| token.matches(password))
}

/// The answer to a browser without the token: ask for it (HTTP Basic).
pub(crate) fn challenge() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(axum::http::header::WWW_AUTHENTICATE, "Basic realm=\"Dovetail\", charset=\"UTF-8\"")],
        "the dashboard needs the engine's admin_token as the password (any user name)",
    )
        .into_response()
}

async fn status(State(a): Shared, headers: HeaderMap) -> Response {
    if let Some(r) = refuse(&a, &headers, false) {
        return r;
    }
    match views::status_report(&a.config, a.journal.as_ref(), a.clock.now()).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => journal_error(e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    flow: Option<String>,
    limit: Option<usize>,
}

async fn dead_letters(State(a): Shared, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    if let Some(r) = refuse(&a, &headers, false) {
        return r;
    }
    match a.journal.dead_letters(q.flow.as_deref(), q.limit.unwrap_or(100).min(MAX_LIMIT)).await {
        Ok(dead) => axum::Json(json!({ "dead_letters": dead })).into_response(),
        Err(e) => journal_error(e),
    }
}

async fn record(State(a): Shared, headers: HeaderMap, Path(id): Path<i64>) -> Response {
    if let Some(r) = refuse(&a, &headers, false) {
        return r;
    }
    match a.journal.record(id).await {
        Ok(Some(detail)) => axum::Json(views::record_json(&a.config, &detail)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("there is no record {id}")),
        Err(e) => journal_error(e),
    }
}

async fn trace(
    State(a): Shared,
    headers: HeaderMap,
    Path(needle): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Some(r) = refuse(&a, &headers, false) {
        return r;
    }
    let ids = match a.journal.find(&needle, q.limit.unwrap_or(10).min(MAX_LIMIT)).await {
        Ok(ids) => ids,
        Err(e) => return journal_error(e),
    };
    let mut records = Vec::with_capacity(ids.len());
    for id in ids {
        match a.journal.record(id).await {
            Ok(Some(detail)) => records.push(views::record_json(&a.config, &detail)),
            Ok(None) => {}
            Err(e) => return journal_error(e),
        }
    }
    if records.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            format!("no record has the id, correlation id, delivery id or key `{needle}`"),
        );
    }
    axum::Json(json!({ "records": records })).into_response()
}

async fn drift(State(a): Shared, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    if let Some(r) = refuse(&a, &headers, false) {
        return r;
    }
    match a.journal.drift_events(q.flow.as_deref(), q.limit.unwrap_or(100).min(MAX_LIMIT)).await {
        Ok(events) => axum::Json(json!({ "drift": events })).into_response(),
        Err(e) => journal_error(e),
    }
}

/// Which dead letters an action applies to: exactly one of the three.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Which {
    #[serde(default)]
    ids: Vec<i64>,
    flow: Option<String>,
    #[serde(default)]
    all: bool,
}

impl Which {
    fn selector(self) -> Option<Selector> {
        match (self.ids.is_empty(), self.flow, self.all) {
            (false, None, false) => Some(Selector::Ids(self.ids)),
            (true, Some(f), false) => Some(Selector::Flow(f)),
            (true, None, true) => Some(Selector::All),
            _ => None,
        }
    }
}

#[derive(Clone, Copy)]
enum Action {
    Replay,
    Discard,
}

async fn replay(
    State(a): Shared,
    headers: HeaderMap,
    body: Result<axum::Json<Which>, axum::extract::rejection::JsonRejection>,
) -> Response {
    act(&a, &headers, body, Action::Replay).await
}

async fn discard(
    State(a): Shared,
    headers: HeaderMap,
    body: Result<axum::Json<Which>, axum::extract::rejection::JsonRejection>,
) -> Response {
    act(&a, &headers, body, Action::Discard).await
}

/// Replays or discards in chunks, all under one cut-off time, so records that
/// die while it runs are not swept up.
async fn act(
    a: &Admin,
    headers: &HeaderMap,
    body: Result<axum::Json<Which>, axum::extract::rejection::JsonRejection>,
    action: Action,
) -> Response {
    if let Some(r) = refuse(a, headers, true) {
        return r;
    }
    let selector = match body {
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
        Ok(axum::Json(which)) => match which.selector() {
            Some(s) => s,
            None => {
                let help = "say which records: {\"ids\": [..]}, {\"flow\": \"..\"} or {\"all\": true}";
                return error(StatusCode::BAD_REQUEST, help);
            }
        },
    };
    let cutoff = a.clock.now();
    let mut total = 0u64;
    loop {
        let moved = match action {
            Action::Replay => a.journal.replay(&selector, cutoff, CHUNK).await,
            Action::Discard => a.journal.discard(&selector, cutoff, CHUNK).await,
        };
        match moved {
            Ok(n) => {
                total += n;
                if n < CHUNK as u64 {
                    break;
                }
            }
            Err(e) => return journal_error(e),
        }
    }
    let key = match action {
        Action::Replay => "replayed",
        Action::Discard => "discarded",
    };
    if matches!(action, Action::Replay) && total > 0 {
        // Ids may name any flow's records: waking a flow costs next to nothing.
        a.dispatchers.nudge(match &selector {
            Selector::Flow(flow) => Some(flow),
            Selector::Ids(_) | Selector::All => None,
        });
    }
    tracing::info!(count = total, action = key, "dead letters {key} through the admin API");
    axum::Json(json!({ key: total })).into_response()
}

async fn resume(State(a): Shared, headers: HeaderMap, Path(flow): Path<String>) -> Response {
    if let Some(r) = refuse(&a, &headers, true) {
        return r;
    }
    let notifier = flow.strip_prefix("notify.").is_some_and(|n| a.config.notify.contains_key(n));
    if !a.config.flows.contains_key(&flow) && !notifier {
        return error(StatusCode::NOT_FOUND, format!("there is no flow named `{flow}`"));
    }
    match a.journal.resume_flow(&flow).await {
        Ok(resumed) => {
            if resumed {
                a.dispatchers.nudge(Some(&flow));
            }
            axum::Json(json!({ "flow": flow, "resumed": resumed })).into_response()
        }
        Err(e) => journal_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        h
    }

    #[test]
    fn without_a_token_reads_are_open_and_actions_refused() {
        assert!(refuse_with(None, &HeaderMap::new(), false).is_none());
        let refused = refuse_with(None, &bearer("anything"), true).unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn with_a_token_everything_wants_it() {
        let token = Secret::new("s3cret".into());
        for action in [false, true] {
            assert_eq!(
                refuse_with(Some(&token), &HeaderMap::new(), action).unwrap().status(),
                StatusCode::UNAUTHORIZED
            );
            assert_eq!(refuse_with(Some(&token), &bearer("s3cre"), action).unwrap().status(), StatusCode::UNAUTHORIZED);
            assert!(refuse_with(Some(&token), &bearer("s3cret"), action).is_none());
        }
        let mut basic = HeaderMap::new();
        basic.insert("authorization", "Basic b3BzOnMzY3JldA==".parse().unwrap()); // ops:s3cret
        assert!(authorized(&token, &basic));
        basic.insert("authorization", "Basic b3BzOnMzY3JldHg=".parse().unwrap()); // ops:s3cretx
        assert!(!authorized(&token, &basic));
    }
}
