//! The engine's HTTP surface: one route per webhook flow, `/healthz` and `/readyz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::json;

use dovetail_journal::Journal;

use crate::intake::Intake;

pub(crate) fn router(intakes: Vec<Intake>, journal: Arc<dyn Journal>, max_body: usize) -> Router {
    let mut app = Router::new()
        .route("/healthz", get(|| async { axum::Json(json!({ "status": "alive" })) }))
        .route("/readyz", get(readyz).with_state(journal));
    for intake in intakes {
        let path = intake.path.clone();
        let route = post(|State(i): State<Arc<Intake>>, headers: HeaderMap, body: Bytes| async move {
            i.receive(headers, body).await
        })
        .with_state(Arc::new(intake));
        app = app.route(&path, route);
    }
    app.layer(DefaultBodyLimit::max(max_body)).fallback(not_found)
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

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, axum::Json(json!({ "error": "no flow receives webhooks on this path" }))).into_response()
}
