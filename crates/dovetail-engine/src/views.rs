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
use dovetail_core::rollup::{MinuteRollup, Summary, summarise};
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
    /// From the journal's minute roll-ups.
    pub last_24h: WindowStats,
    pub last_7d: WindowStats,
}

/// What a flow did over a window, from the minute roll-ups.
#[derive(Debug, Serialize)]
pub struct WindowStats {
    pub received: u64,
    pub quarantined: u64,
    pub delivered: u64,
    pub dead: u64,
    /// Delivery attempts, delivered or failed.
    pub attempts: u64,
    pub success_rate: Option<f64>,
    pub error_rate: Option<f64>,
    pub errors_by_class: std::collections::BTreeMap<String, u64>,
    pub avg_latency_ms: Option<f64>,
    /// The upper bound of the latency bucket holding the 95th percentile
    /// (`null` without deliveries; above 60 s it is reported as `u64::MAX`).
    pub p95_latency_ms: Option<u64>,
    /// Freshness: the last successful delivery in the window.
    pub last_delivered_at: Option<Timestamp>,
}

impl From<&Summary> for WindowStats {
    fn from(s: &Summary) -> Self {
        WindowStats {
            received: s.received,
            quarantined: s.quarantined,
            delivered: s.delivered,
            dead: s.dead,
            attempts: s.attempts,
            success_rate: s.success_rate,
            error_rate: s.error_rate,
            errors_by_class: s.errors_by_class.clone(),
            avg_latency_ms: s.avg_latency_ms,
            p95_latency_ms: s.p95_latency_ms,
            last_delivered_at: s.last_delivered_at,
        }
    }
}

const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

/// A flow's roll-ups summarised over `(now - span, now]`.
pub fn summary_of(minutes: &[MinuteRollup], flow: &str, span: std::time::Duration, now: Timestamp) -> Summary {
    summarise(minutes.iter().filter(|m| m.flow == flow), now.minus(span), now)
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
    let minutes = journal.minutes(None, now.minus(7 * DAY), now).await?;
    let flows = counts
        .into_iter()
        .map(|c| {
            let received = c.pending + c.in_flight + c.delivered + c.dead + c.discarded;
            FlowStatus {
                last_24h: (&summary_of(&minutes, &c.flow, DAY, now)).into(),
                last_7d: (&summary_of(&minutes, &c.flow, 7 * DAY, now)).into(),
                configured: config.flows.contains_key(&c.flow)
                    || c.flow.strip_prefix("notify.").is_some_and(|n| config.notify.contains_key(n)),
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
        if let Some(q) = &c.policies().quota {
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
    let SinkConfig::Http { connector, method, path, .. } = &flow.sink else { return None };
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
    v["story"] = json!(story(detail));
    v
}

/// One step of a record's story.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// When it happened, when the journal knows.
    pub at: Option<Timestamp>,
    pub event: String,
}

/// A record's whole story from the journal, oldest first: received,
/// validated and mapped (with versions) or refused, each attempt with its
/// status and duration, and where it stands now.
pub fn story(detail: &RecordDetail) -> Vec<Step> {
    use dovetail_core::record::StateName;
    let step = |at: Option<Timestamp>, event: String| Step { at, event };
    let mut steps = vec![step(
        Some(detail.received_at),
        format!(
            "received{}, correlation id {}",
            detail.delivery_id.as_ref().map(|d| format!(" as delivery {d}")).unwrap_or_default(),
            detail.correlation_id
        ),
    )];
    let refused_at_intake = detail.attempts.is_empty()
        && detail.state == StateName::Dead
        && detail.dead_class == Some(dovetail_core::policy::ErrorClass::Validation);
    if refused_at_intake {
        let reason = detail.dead_reason.clone().unwrap_or_default();
        steps.push(step(Some(detail.received_at), format!("refused at intake (quarantined): {reason}")));
    } else if detail.prepared {
        let by = versions(detail);
        let how = if by.is_empty() {
            "validated; no mapping, sent as received".to_string()
        } else {
            format!("validated and mapped by {by}")
        };
        steps.push(step(None, how));
    } else {
        steps
            .push(step(None, "not prepared: validated and mapped with the current config before its next send".into()));
    }
    for a in &detail.attempts {
        let answer = a.status.map_or_else(|| "no answer".to_string(), |s| format!("HTTP {s}"));
        let outcome = match (a.class, &a.error) {
            (None, _) => "delivered".to_string(),
            (Some(c), Some(e)) => format!("{}: {e}", c.as_str()),
            (Some(c), None) => c.as_str().to_string(),
        };
        steps.push(step(
            Some(a.started_at),
            format!("attempt {}: {answer} in {} ms, {outcome}", a.number, a.duration_ms),
        ));
    }
    let now = match detail.state {
        StateName::Delivered => step(detail.finished_at, "delivered".into()),
        StateName::Dead => step(
            detail.finished_at,
            format!(
                "in the dead-letter queue ({}): {}",
                detail.dead_class.map_or("-", |c| c.as_str()),
                detail.dead_reason.as_deref().unwrap_or("")
            ),
        ),
        StateName::Discarded => step(detail.finished_at, "discarded by an operator".into()),
        StateName::Pending => step(detail.next_attempt_at, "pending: next attempt due".into()),
        StateName::InFlight => step(detail.lease_until, "in flight: leased until".into()),
    };
    steps.push(now);
    steps
}
