//! `dovetail status`: is every flow healthy? One line per flow.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;

use dovetail_core::clock::{Clock, SystemClock, Timestamp};
use dovetail_core::duration::format_duration;
use dovetail_journal::{ConnectorHealth, FlowCounts, Journal, Pause};

use crate::project;

/// The stable JSON shape of `dovetail status --json` (documented in the README).
#[derive(Serialize)]
struct StatusReport {
    generated_at: Timestamp,
    flows: Vec<FlowStatus>,
    connectors: Vec<ConnectorHealth>,
    quotas: Vec<QuotaStatus>,
}

#[derive(Serialize)]
struct QuotaStatus {
    connector: String,
    per_hour: Option<u64>,
    used_this_hour: u64,
    per_day: Option<u64>,
    used_today: u64,
}

#[derive(Serialize)]
struct FlowStatus {
    flow: String,
    /// "running" or "paused".
    state: &'static str,
    pending: u64,
    in_flight: u64,
    delivered: u64,
    dead: u64,
    /// Of `dead`, records quarantined as unusable (not JSON, breaking the
    /// schema or the model, refused by a mapping).
    quarantined: u64,
    /// `quarantined` over every record the flow has received (0 with none).
    rejection_rate: f64,
    discarded: u64,
    oldest_pending_at: Option<Timestamp>,
    oldest_pending_age_seconds: Option<f64>,
    paused: Option<Pause>,
    /// False for a flow that has records in the journal but is no longer in the config.
    configured: bool,
}

pub async fn status(path: &Path, json: bool) -> Result<ExitCode> {
    let loaded = project::load(path)?;
    let journal = project::open_existing_journal(&loaded)?;
    let now = SystemClock.now();
    let mut counts = journal.counts().await?;
    for name in loaded.config.flows.keys() {
        if !counts.iter().any(|c| &c.flow == name) {
            counts.push(FlowCounts { flow: name.clone(), ..Default::default() });
        }
    }
    counts.sort_by(|a, b| a.flow.cmp(&b.flow));
    let flows: Vec<FlowStatus> = counts
        .into_iter()
        .map(|c| FlowStatus {
            configured: loaded.config.flows.contains_key(&c.flow),
            state: if c.paused.is_some() { "paused" } else { "running" },
            oldest_pending_age_seconds: c.oldest_pending_at.map(|t| now.since(t).as_secs_f64()),
            flow: c.flow,
            pending: c.pending,
            in_flight: c.in_flight,
            delivered: c.delivered,
            dead: c.dead,
            quarantined: c.quarantined,
            rejection_rate: {
                let received = c.pending + c.in_flight + c.delivered + c.dead + c.discarded;
                if received == 0 { 0.0 } else { c.quarantined as f64 / received as f64 }
            },
            discarded: c.discarded,
            oldest_pending_at: c.oldest_pending_at,
            paused: c.paused,
        })
        .collect();
    let mut connectors: Vec<ConnectorHealth> = journal.connector_health().await?;
    connectors.retain(|c| loaded.config.connectors.contains_key(&c.connector));
    let mut quotas = Vec::new();
    for (name, c) in &loaded.config.connectors {
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
    let report = StatusReport { generated_at: now, flows, connectors, quotas };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, now);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(report: &StatusReport, now: Timestamp) {
    let mut rows = vec![
        ["FLOW", "STATE", "PENDING", "IN FLIGHT", "DELIVERED", "DEAD", "QUARANTINED", "OLDEST PENDING"]
            .map(String::from)
            .to_vec(),
    ];
    for f in &report.flows {
        let age = f.oldest_pending_at.map(|t| format_duration(std::time::Duration::from_secs(now.since(t).as_secs())));
        let name = if f.configured { f.flow.clone() } else { format!("{} (not in config)", f.flow) };
        rows.push(vec![
            name,
            f.state.to_string(),
            f.pending.to_string(),
            f.in_flight.to_string(),
            f.delivered.to_string(),
            f.dead.to_string(),
            if f.quarantined == 0 {
                "0".to_string()
            } else {
                format!("{} ({:.1}%)", f.quarantined, f.rejection_rate * 100.0)
            },
            age.unwrap_or_else(|| "-".into()),
        ]);
    }
    print!("{}", crate::dlq::table(&rows));
    if !report.connectors.is_empty() {
        let mut rows = vec![["CONNECTOR", "BREAKER", "SINCE", "PACE", "BLOCKED UNTIL"].map(String::from).to_vec()];
        for c in &report.connectors {
            let breaker = match c.open_until {
                Some(until) if until > now => format!("open until {until}"),
                _ => c.breaker.clone(),
            };
            let pace = match (c.current_rate, c.configured_rate) {
                (Some(cur), Some(max)) => format!("{cur:.1}/{max:.1} per s"),
                _ => "unlimited".to_string(),
            };
            let blocked = c.blocked_until.filter(|b| *b > now).map(|b| b.to_string()).unwrap_or_else(|| "-".into());
            rows.push(vec![c.connector.clone(), breaker, c.since.to_string(), pace, blocked]);
        }
        println!();
        print!("{}", crate::dlq::table(&rows));
        for c in report.connectors.iter().filter(|c| c.breaker != "closed") {
            if let Some(reason) = &c.reason {
                println!("  {}: {}", c.connector, crate::dlq::printable(reason));
            }
        }
    }
    for q in &report.quotas {
        let part = |used: u64, limit: Option<u64>, window: &str| limit.map(|l| format!("{used}/{l} this {window}"));
        let parts: Vec<String> = [part(q.used_this_hour, q.per_hour, "hour"), part(q.used_today, q.per_day, "day")]
            .into_iter()
            .flatten()
            .collect();
        println!("  {} quota: {}", q.connector, parts.join(", "));
    }
    for f in &report.flows {
        if let Some(p) = &f.paused {
            println!(
                "\n{} is paused since {}: {}\n  records are held; after fixing the cause run `dovetail resume {}`",
                f.flow,
                p.since,
                crate::dlq::printable(&p.reason),
                f.flow
            );
        }
    }
}

/// `dovetail drift`: the stable JSON shape is `{"drift": [{id, flow, kind, path,
/// json_type, previous_types, at, example_record_id}]}`, newest first.
pub async fn drift(path: &Path, flow: Option<&str>, limit: usize, json: bool) -> Result<ExitCode> {
    let loaded = project::load(path)?;
    let journal = project::open_existing_journal(&loaded)?;
    let events = journal.drift_events(flow, limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "drift": events }))?);
        return Ok(ExitCode::SUCCESS);
    }
    if events.is_empty() {
        println!("no schema drift recorded{}", flow.map(|f| format!(" for flow `{f}`")).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![["AT", "FLOW", "KIND", "FIELD", "TYPE", "WAS", "EXAMPLE RECORD"].map(String::from).to_vec()];
    for d in &events {
        let e = &d.event;
        let was: Vec<&str> = e.previous_types.iter().map(|t| t.as_str()).collect();
        rows.push(vec![
            e.at.to_string(),
            d.flow.clone(),
            e.kind.as_str().to_string(),
            crate::dlq::printable(&e.path),
            e.json_type.as_str().to_string(),
            if was.is_empty() { "-".to_string() } else { was.join(", ") },
            e.example_record_id.to_string(),
        ]);
    }
    print!("{}", crate::dlq::table(&rows));
    Ok(ExitCode::SUCCESS)
}
