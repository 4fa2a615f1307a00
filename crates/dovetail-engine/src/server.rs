//! The engine's HTTP surface: one route per webhook flow, `/healthz` and `/readyz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::json;

use dovetail_journal::Journal;

use dovetail_core::clock::Clock;

use crate::connector::ConnectorRuntime;
use crate::intake::Intake;
use crate::metrics::Metrics;

/// What `/metrics` reads at scrape time.
pub(crate) struct Scrape {
    pub metrics: Arc<Metrics>,
    pub journal: Arc<dyn Journal>,
    pub connectors: Vec<Arc<ConnectorRuntime>>,
    /// Each connector with a quota: its hourly and daily limits.
    pub quotas: Vec<(String, Option<u64>, Option<u64>)>,
    pub clock: Arc<dyn Clock>,
    /// With an admin token, scrapes need it too (Prometheus: `authorization: { credentials: TOKEN }`).
    pub token: Option<dovetail_core::config::Secret>,
}

pub(crate) fn router(
    intakes: Vec<Intake>,
    journal: Arc<dyn Journal>,
    scrape: Scrape,
    admin: Router,
    max_body: usize,
) -> Router {
    let mut app = admin
        .route("/healthz", get(|| async { axum::Json(json!({ "status": "alive" })) }))
        .route("/readyz", get(readyz).with_state(journal))
        .route("/metrics", get(metrics).with_state(Arc::new(scrape)));
    for intake in intakes {
        let path = intake.path.clone();
        let route = post(
            move |State(i): State<Arc<Intake>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>| async move {
                match body {
                    Ok(body) => i.receive(headers, body).await,
                    Err(rejection) => refuse_body(&rejection, max_body),
                }
            },
        )
        .with_state(Arc::new(intake));
        app = app.route(&path, route);
    }
    app.layer(DefaultBodyLimit::max(max_body)).fallback(not_found)
}

/// A body that could not be read (too large, cut off) is refused before
/// anything else happens; nothing is stored.
fn refuse_body(rejection: &BytesRejection, max_body: usize) -> Response {
    let status = rejection.status();
    let error = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("the body is larger than the limit of {max_body} bytes (set by [engine] max_body)")
    } else {
        rejection.body_text()
    };
    (status, axum::Json(json!({ "error": error }))).into_response()
}

async fn readyz(State(journal): State<Arc<dyn Journal>>) -> Response {
    match journal.ping().await {
        Ok(()) => axum::Json(json!({ "status": "ready", "journal": "ok" })).into_response(),
        Err(e) => {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "status": "not_ready", "journal": e.to_string() })))
                .into_response()
        }
    }
}

async fn metrics(State(s): State<Arc<Scrape>>, headers: HeaderMap) -> Response {
    if let Some(token) = &s.token
        && !crate::admin::authorized(token, &headers)
    {
        return (StatusCode::UNAUTHORIZED, "# send Authorization: Bearer TOKEN (the engine's admin_token)\n")
            .into_response();
    }
    match s.metrics.render(s.journal.as_ref(), &s.connectors, &s.quotas, s.clock.now()).await {
        Ok(text) => {
            ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                .into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("# the journal cannot be read: {e}\n")).into_response(),
    }
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, axum::Json(json!({ "error": "no flow receives webhooks on this path" }))).into_response()
}
