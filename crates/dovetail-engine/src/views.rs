//! Read models shared by the CLI, the admin API and the dashboard: what a
//! flow's status is, what a record looks like to an operator. Each is built
//! from the configuration and the journal only, so the CLI can build them
//! without a running engine.

use serde::Serialize;
use serde_json::json;

use dovetail_connectors::http::Outbound;
use dovetail_connectors::preview::RequestPreview;
use dovetail_core::clock::Timestamp;
use dovetail_core::config::{Config, SinkConfig};
use dovetail_journal::{ConnectorHealth, FlowCounts, Journal, JournalError, Pause, RecordDetail};

/// The stable JSON shape of `dovetail status --json` and `GET /api/v1/status`.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub generated_at: Timestamp,
    pub flows: Vec<FlowStatus>,
    pub connectors: Vec<ConnectorHealth>,
    pub quotas: Vec<QuotaStatus>,
}

#[derive(Debug, Serialize)]
pub struct QuotaStatus {
    pub connector: String,
    pub per_hour: Option<u64>,
    pub used_this_hour: u64,
    pub per_day: Option<u64>,
    pub used_today: u64,
}

#[derive(Debug, Serialize)]
pub struct FlowStatus {
    pub flow: String,
    /// "running" or "paused".
    pub state: &'static str,
    pub pending: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub dead: u64,
    /// Of `dead`, records quarantined as unusable (not JSON, breaking the
    /// schema or the model, refused by a mapping).
    pub quarantined: u64,
    /// `quarantined` over every record the flow has received (0 with none).
    pub rejection_rate: f64,
    pub discarded: u64,
    pub oldest_pending_at: Option<Timestamp>,
    pub oldest_pending_age_seconds: Option<f64>,
    pub paused: Option<Pause>,
    /// False for a flow that has records in the journal but is no longer in the config.
    pub configured: bool,
}

/// Every flow of the config and the journal, the connectors' health and the quotas' use.
pub async fn status_report(
    config: &Config,
    journal: &dyn Journal,
    now: Timestamp,
) -> Result<StatusReport, JournalError> {
    let mut counts = journal.counts().await?;
    for name in config.flows.keys() {
        if !counts.iter().any(|c| &c.flow == name) {
            counts.push(FlowCounts { flow: name.clone(), ..Default::default() });
        }
    }
    counts.sort_by(|a, b| a.flow.cmp(&b.flow));
    let flows = counts
        .into_iter()
        .map(|c| {
            let received = c.pending + c.in_flight + c.delivered + c.dead + c.discarded;
            FlowStatus {
                configured: config.flows.contains_key(&c.flow),
                state: if c.paused.is_some() { "paused" } else { "running" },
                oldest_pending_age_seconds: c.oldest_pending_at.map(|t| now.since(t).as_secs_f64()),
                rejection_rate: if received == 0 { 0.0 } else { c.quarantined as f64 / received as f64 },
                flow: c.flow,
                pending: c.pending,
                in_flight: c.in_flight,
                delivered: c.delivered,
                dead: c.dead,
                quarantined: c.quarantined,
                discarded: c.discarded,
                oldest_pending_at: c.oldest_pending_at,
                paused: c.paused,
            }
        })
        .collect();
    let mut connectors: Vec<ConnectorHealth> = journal.connector_health().await?;
    connectors.retain(|c| config.connectors.contains_key(&c.connector));
    let mut quotas = Vec::new();
    for (name, c) in &config.connectors {
        let dovetail_core::config::ConnectorConfig::Http(h) = c;
        if let Some(q) = &h.quota {
            let used = journal.quota_used(name, now).await?;
            quotas.push(QuotaStatus {
                connector: name.clone(),
                per_hour: q.per_hour,
                used_this_hour: used.this_hour,
                per_day: q.per_day,
                used_today: used.today,
            });
        }
    }
    Ok(StatusReport { generated_at: now, flows, connectors, quotas })
}

/// The request a record makes (or made) through its flow's sink, from the
/// current config; `None` when the record is not prepared (nothing is
/// known to send until it is validated and mapped again), its payload was
/// purged, or its flow is gone.
pub fn request_of(config: &Config, detail: &RecordDetail) -> Option<RequestPreview> {
    if !detail.prepared || detail.payload_purged_at.is_some() {
        return None;
    }
    let flow = config.flows.get(&detail.flow)?;
    let SinkConfig::Http { connector, method, path, .. } = &flow.sink;
    let http = config.http_connector(connector)?;
    let out = Outbound {
        payload: detail.mapped.as_deref().unwrap_or(&detail.payload),
        content_type: if detail.mapped.is_some() { Some("application/json") } else { detail.content_type.as_deref() },
        idempotency_key: &detail.idempotency_key,
        correlation_id: &detail.correlation_id,
    };
    Some(RequestPreview::new(http, method, path, &out))
}

/// Which mappings produced a record's body, e.g. `mapping v3, sink mapping v1`.
pub fn versions(detail: &RecordDetail) -> String {
    let parts: Vec<String> = [("mapping", detail.mapping_version), ("sink mapping", detail.sink_mapping_version)]
        .into_iter()
        .filter_map(|(what, v)| v.map(|v| format!("{what} v{v}")))
        .collect();
    parts.join(", ")
}

/// The last error a record met: its last failed attempt's, or its dead reason.
pub fn last_error(detail: &RecordDetail) -> Option<String> {
    detail.attempts.iter().rev().find_map(|a| a.error.clone()).or_else(|| detail.dead_reason.clone())
}

/// Bytes as JSON when they are JSON, else as a (lossy) string, so the output is always valid JSON.
pub fn body_value(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(bytes)))
}

/// A record as `dlq show --json`, `trace --json` and `GET /api/v1/records/{id}` show it.
pub fn record_json(config: &Config, detail: &RecordDetail) -> serde_json::Value {
    // A RecordDetail always serialises: its fields are plain data.
    let mut v = serde_json::to_value(detail).unwrap_or_default();
    v["payload"] = body_value(&detail.payload);
    v["payload_is_json"] = json!(serde_json::from_slice::<serde::de::IgnoredAny>(&detail.payload).is_ok());
    v["mapped"] = detail.mapped.as_deref().map_or(serde_json::Value::Null, body_value);
    v["request"] = json!(request_of(config, detail));
    v["last_error"] = json!(last_error(detail));
    v
}
