//! `dovetail test FLOW --input FILE`: one record through a flow's
//! validation and mappings, without sending it or touching the journal.
//! Prints what came in, each stage, what was mapped, and the exact request
//! that would go out.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use dovetail_connectors::http::Outbound;
use dovetail_connectors::preview::RequestPreview;
use dovetail_core::config::SinkConfig;
use dovetail_core::ids;
use dovetail_core::pipeline::{self, Keys, Pipeline, Rejection, Transformed};

use crate::project;

/// What happened to the sample, stage by stage.
struct Trial {
    raw: Vec<u8>,
    keys: Option<Keys>,
    transformed: Option<Transformed>,
    rejected: Option<Rejection>,
}

fn run_pipeline(pipeline: &Pipeline, raw: Vec<u8>) -> Trial {
    let mut trial = Trial { raw, keys: None, transformed: None, rejected: None };
    let input = match pipeline::parse(&trial.raw) {
        Ok(v) => v,
        Err(r) => {
            trial.rejected = Some(r);
            return trial;
        }
    };
    match pipeline.keys(&input) {
        Ok(k) => trial.keys = Some(k),
        Err(r) => {
            trial.rejected = Some(r);
            return trial;
        }
    }
    match pipeline.transform(&input) {
        Ok(t) => trial.transformed = Some(t),
        Err(r) => trial.rejected = Some(r),
    }
    trial
}

pub fn test(config: &Path, flow_name: &str, input: &Path, as_json: bool) -> Result<ExitCode> {
    let loaded = project::load(config)?;
    let Some(flow) = loaded.config.flows.get(flow_name) else {
        let known: Vec<&str> = loaded.config.flows.keys().map(String::as_str).collect();
        bail!("there is no flow named `{flow_name}` (flows: {})", known.join(", "));
    };
    let pipelines = match loaded.pipelines_without_samples(&|p| std::fs::read_to_string(p)) {
        Ok(p) => p,
        Err(errors) => bail!("the flow's files have errors:\n{errors}"),
    };
    let pipeline = pipelines.get(flow_name).cloned().unwrap_or_default();
    let raw = if input == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("cannot read the input from stdin")?;
        buf
    } else {
        std::fs::read(input).with_context(|| format!("cannot read the input {}", input.display()))?
    };
    let trial = run_pipeline(&pipeline, raw);
    let http_sink = match &flow.sink {
        SinkConfig::Http { connector, method, path, .. } => {
            loaded.config.http_connector(connector).map(|http| (http, method, path))
        }
        _ => None,
    };
    let request = match (&trial.transformed, http_sink) {
        (Some(t), Some((http, method, path))) => {
            let body = t.body();
            let dedup = trial.keys.as_ref().and_then(|k| k.dedup.as_deref());
            // A delivery id from the source (webhook-id, Stripe's event id) wins at intake.
            let key = match dedup {
                Some(d) => {
                    format!("{} (unless the source sends a delivery id)", ids::idempotency_key(flow_name, Some(d)))
                }
                None => "(derived from the source's delivery id; a new one for a record without)".to_string(),
            };
            let out = Outbound {
                payload: body.as_deref().unwrap_or(&trial.raw),
                content_type: Some(if body.is_some() { "application/json" } else { "(the inbound Content-Type)" }),
                idempotency_key: &key,
                correlation_id: "(the record's correlation id)",
            };
            Some(RequestPreview::new(http, method, path, &out))
        }
        _ => None,
    };
    let write = trial.transformed.as_ref().and(write_of(&flow.sink));
    if as_json {
        print_json(flow_name, &pipeline, &trial, request.as_ref(), write.as_deref())?;
    } else {
        print_text(flow_name, input, &pipeline, &trial, request.as_ref())?;
        if let Some(w) = write {
            println!("\n{w}");
        }
    }
    Ok(if trial.rejected.is_some() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// What a database or broker sink would do with the record.
fn write_of(sink: &SinkConfig) -> Option<String> {
    match sink {
        SinkConfig::Http { .. } => None,
        SinkConfig::Postgres(p) => {
            let guard =
                p.version_column.as_ref().map(|v| format!(", unless the stored `{v}` is newer")).unwrap_or_default();
            Some(format!(
                "the record would be upserted into `{}` on ({}) through connector `{}`{guard}",
                p.table,
                p.key.join(", "),
                p.connector
            ))
        }
        SinkConfig::Nats { connector, subject, .. } => Some(format!(
            "the record would be published to JetStream subject `{subject}` through connector `{connector}`, with its idempotency key as Nats-Msg-Id"
        )),
        SinkConfig::Amqp { connector, exchange, routing_key, .. } => {
            let exchange = if exchange.is_empty() { "the default exchange" } else { exchange };
            Some(format!(
                "the record would be published to `{exchange}` with routing key `{routing_key}` through connector `{connector}`, with its idempotency key as message_id"
            ))
        }
    }
}

fn pretty(bytes: &[u8]) -> String {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn print_text(flow: &str, input: &Path, p: &Pipeline, trial: &Trial, request: Option<&RequestPreview>) -> Result<()> {
    println!("flow {flow}: {} through validation and mapping (nothing is sent)\n", input.display());
    println!("received ({} bytes):\n{}", trial.raw.len(), pretty(&trial.raw));
    let mut stage_lines = false;
    let mut stage = |name: &str, what: &str| {
        if !stage_lines {
            println!();
            stage_lines = true;
        }
        println!("{name:<15} {what}");
    };
    if let Some(k) = &trial.keys {
        if p.key.is_some() {
            stage("key", k.external.as_deref().unwrap_or("(none)"));
        }
        if p.idempotency_key.is_some() {
            stage("idempotency key", k.dedup.as_deref().unwrap_or("(none: no de-duplication)"));
        }
    }
    if let Some(t) = &trial.transformed {
        if p.schema.is_some() {
            stage("schema", "valid");
        }
        if let Some(model) = &p.model {
            let what = if p.mapping.is_some() { "the mapped record" } else { "the record" };
            stage("model", &format!("{what} matches `{}`", model.name));
        }
        if let (Some(m), Some(c)) = (&p.mapping, &t.canonical) {
            println!("\nmapped by mapping v{}:\n{}", m.version, serde_json::to_string_pretty(c)?);
        }
        if let (Some(m), Some(o)) = (&p.sink_mapping, &t.outbound) {
            println!("\nmapped by sink mapping v{}:\n{}", m.version, serde_json::to_string_pretty(o)?);
        }
        if p.mapping.is_none() && p.sink_mapping.is_none() {
            println!("\nno mapping: the payload is sent as received");
        }
    }
    if let Some(r) = &trial.rejected {
        println!("\nREFUSED at the {} stage: {}", r.stage.as_str(), r.reason);
        println!("the engine would quarantine this record (class validation) and answer 202 with the reason");
    }
    if let Some(req) = request {
        println!("\nthe request that would be sent:\n{req}");
    }
    Ok(())
}

fn print_json(
    flow: &str,
    p: &Pipeline,
    trial: &Trial,
    request: Option<&RequestPreview>,
    write: Option<&str>,
) -> Result<()> {
    let raw = match serde_json::from_slice::<Value>(&trial.raw) {
        Ok(v) => v,
        Err(_) => Value::String(String::from_utf8_lossy(&trial.raw).into_owned()),
    };
    let t = trial.transformed.as_ref();
    let out = json!({
        "flow": flow,
        "ok": trial.rejected.is_none(),
        "received": raw,
        "key": trial.keys.as_ref().and_then(|k| k.external.clone()),
        "idempotency_key": trial.keys.as_ref().and_then(|k| k.dedup.clone()),
        "mapping_version": p.mapping.as_ref().map(|m| m.version),
        "mapped": t.and_then(|t| t.canonical.clone()),
        "model": p.model.as_ref().map(|m| m.name.clone()),
        "sink_mapping_version": p.sink_mapping.as_ref().map(|m| m.version),
        "outbound": t.and_then(|t| t.outbound.clone()),
        "rejected": trial.rejected.as_ref().map(|r| json!({"stage": r.stage.as_str(), "reason": r.reason})),
        "request": request,
        "write": write,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
