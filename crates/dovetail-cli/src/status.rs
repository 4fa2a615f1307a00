//! `dovetail status`: is every flow healthy? One line per flow.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use dovetail_core::clock::{Clock, SystemClock, Timestamp};
use dovetail_core::duration::format_duration;
use dovetail_engine::views::{StatusReport, status_report};
use dovetail_journal::Journal;

use crate::project;

pub async fn status(path: &Path, json: bool) -> Result<ExitCode> {
    let loaded = project::load(path)?;
    let journal = project::open_existing_journal(&loaded)?;
    let now = SystemClock.now();
    let report = status_report(&loaded.config, journal.as_ref(), now).await?;
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
