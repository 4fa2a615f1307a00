//! Webhook intake: verify, validate and map, journal, then answer.
//!
//! The order is the contract. A request that fails verification gets 401
//! and touches nothing. A verified request goes through the flow's
//! pipeline (keys, schema, mapping, model, sink mapping) and is journalled
//! with its raw bytes and, apart from them, the mapped body; only when the
//! journal says the record is durable does the sender hear 2xx; if the
//! journal fails, the sender hears 503 and retries. A record the pipeline
//! refuses (not JSON, invalid, a mapping error) is still kept: quarantined,
//! dead with class `validation`, raw bytes intact, and answered 2xx with
//! the stage and the reason, so the sender does not retry it forever.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;
use tokio::sync::Notify;

use dovetail_core::clock::Clock;
use dovetail_core::ids;
use dovetail_core::pipeline::{Pipeline, Rejection};
use dovetail_core::shape::FieldList;
use dovetail_core::signature::{Scheme, Verifier};
use dovetail_journal::{Ingested, Journal};

/// One flow's webhook endpoint.
pub(crate) struct Intake {
    pub flow: String,
    pub path: String,
    pub verifier: Option<Arc<Verifier>>,
    /// The flow's learned payload shape, for drift detection.
    pub shape: Arc<crate::drift::FlowShape>,
    /// The flow's keys, schema and mappings: a record any of them refuses is quarantined.
    pub pipeline: Arc<Pipeline>,
    pub jq_time_limit: std::time::Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub journal: Arc<dyn Journal>,
    pub clock: Arc<dyn Clock>,
    pub wake: Arc<Notify>,
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn answer(status: StatusCode, correlation_id: &str, body: serde_json::Value) -> Response {
    (status, [("x-correlation-id", correlation_id.to_string())], axum::Json(body)).into_response()
}

impl Intake {
    pub async fn receive(&self, headers: HeaderMap, body: Bytes) -> Response {
        let started = std::time::Instant::now();
        let now = self.clock.now();
        let correlation_id =
            ids::inbound_correlation_id(header(&headers, "traceparent"), header(&headers, "x-correlation-id"))
                .unwrap_or_else(ids::new_correlation_id);
        let mut delivery_id = match &self.verifier {
            Some(v) => match v.verify(|name| header(&headers, name), &body, now) {
                Ok(verified) => verified.delivery_id,
                Err(e) => {
                    tracing::warn!(flow = %self.flow, correlation_id = %correlation_id, error = %e, "webhook refused: signature check failed");
                    return answer(StatusCode::UNAUTHORIZED, &correlation_id, json!({ "error": e.to_string() }));
                }
            },
            // Unsigned endpoints may still name their deliveries.
            None => header(&headers, "webhook-id").or(header(&headers, "idempotency-key")).map(str::to_string),
        };
        // A flow that reads nothing of its records (no keys, schema or
        // mappings) needs only well-formed JSON and the fields for drift
        // learning, both read in one pass without building a `Value`;
        // except for Stripe, whose delivery id is in the body.
        let (mut processed, fields) =
            if self.pipeline.reads_nothing() && self.verifier.as_ref().is_none_or(|v| v.scheme() != Scheme::Stripe) {
                self.pipeline.check_and_list(&body)
            } else {
                (crate::contract::process(&self.flow, &self.pipeline, self.jq_time_limit, body.clone()).await, None)
            };
        if delivery_id.is_none()
            && self.verifier.as_ref().is_some_and(|v| v.scheme() == Scheme::Stripe)
            && let Some(v) = &processed.input
        {
            // Stripe names its events in the body, not in a header.
            delivery_id = v.get("id").and_then(|id| id.as_str()).map(str::to_string);
        }
        // The parsed input is kept for drift learning; the record needs only keys and result.
        let parsed = processed.input.take();
        let (record, rejection) = crate::contract::new_record(
            &self.flow,
            processed,
            delivery_id,
            &correlation_id,
            header(&headers, "content-type"),
            body.to_vec(),
            now,
        );
        match self.journal.ingest(record).await {
            Ok(Ingested::New(id)) => {
                self.metrics.received(&self.flow, started.elapsed());
                if let Some(Rejection { stage, reason }) = rejection {
                    let stage = stage.as_str();
                    self.metrics.quarantined(&self.flow, stage);
                    tracing::warn!(flow = %self.flow, record_id = id, correlation_id = %correlation_id, stage, %reason, "record quarantined at intake");
                    return answer(
                        StatusCode::ACCEPTED,
                        &correlation_id,
                        json!({ "status": "quarantined", "record_id": id, "stage": stage, "reason": reason }),
                    );
                }
                self.wake.notify_one();
                if let Some(fields) = fields.or_else(|| parsed.as_ref().map(FieldList::of_value)) {
                    self.shape.learn(&fields, id, now, self.journal.as_ref()).await;
                }
                tracing::debug!(flow = %self.flow, record_id = id, correlation_id = %correlation_id, "record journalled");
                answer(StatusCode::ACCEPTED, &correlation_id, json!({ "status": "accepted", "record_id": id }))
            }
            Ok(Ingested::Duplicate(id)) => {
                self.metrics.duplicate(&self.flow);
                tracing::debug!(flow = %self.flow, record_id = id, "duplicate delivery acknowledged, not journalled again");
                answer(StatusCode::OK, &correlation_id, json!({ "status": "duplicate", "record_id": id }))
            }
            Err(e) => {
                tracing::error!(flow = %self.flow, correlation_id = %correlation_id, error = %e, "cannot journal a webhook; answering 503 so the sender retries");
                answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &correlation_id,
                    json!({ "error": "the record could not be stored; retry later" }),
                )
            }
        }
    }
}
