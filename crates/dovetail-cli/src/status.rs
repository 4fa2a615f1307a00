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
    let pct = |r: Option<f64>| r.map_or_else(|| "-".to_string(), |r| format!("{:.1}%", r * 100.0));
    let mut rows = vec![
        [
            "LAST 24H",
            "RECEIVED",
            "DELIVERED",
            "SUCCESS",
            "ERRORS",
            "AVG/P95 MS",
            "LAST DELIVERY",
            "7D DELIVERED",
            "7D SUCCESS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for f in &report.flows {
        let (d, w) = (&f.last_24h, &f.last_7d);
        let errors: Vec<String> = d.errors_by_class.iter().map(|(c, n)| format!("{c} {n}")).collect();
        let latency = match (d.avg_latency_ms, d.p95_latency_ms) {
            (Some(a), Some(p)) if p == u64::MAX => format!("{a:.0}/>60000"),
            (Some(a), Some(p)) => format!("{a:.0}/{p}"),
            _ => "-".to_string(),
        };
        let last = w.last_delivered_at.map_or_else(
            || "never".to_string(),
            |t| format!("{} ago", format_duration(std::time::Duration::from_secs(now.since(t).as_secs()))),
        );
        rows.push(vec![
            f.flow.clone(),
            d.received.to_string(),
            d.delivered.to_string(),
            pct(d.success_rate),
            if errors.is_empty() { "-".to_string() } else { errors.join(", ") },
            latency,
            last,
            w.delivered.to_string(),
            pct(w.success_rate),
        ]);
    }
    println!();
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

/// `dovetail alerts`: the active alerts and the recently resolved ones, as
/// the engine last saved them in the journal. JSON: `{"active": [alert],
/// "recent": [{"alert", "resolved_at"}]}`, where an alert is `{key: {flow,
/// rule, connector}, severity, summary, value, threshold, started_at,
/// last_notified_at}`; recent ones newest first.
pub async fn alerts(path: &Path, json: bool) -> Result<ExitCode> {
    let loaded = project::load(path)?;
    let journal = project::open_existing_journal(&loaded)?;
    let book: dovetail_core::alert::AlertBook = match journal.load_state(dovetail_engine::ALERT_BOOK_KEY).await? {
        Some(text) => serde_json::from_str(&text)?,
        None => Default::default(),
    };
    let active: Vec<_> = book.active().collect();
    let recent: Vec<_> = book.recent().rev().collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "active": active, "recent": recent }))?);
        return Ok(ExitCode::SUCCESS);
    }
    if active.is_empty() {
        println!("no active alerts");
    } else {
        let mut rows = vec![["FLOW", "RULE", "SEVERITY", "SINCE", "WHAT"].map(String::from).to_vec()];
        for a in &active {
            rows.push(vec![
                a.key.flow.clone(),
                a.key.rule.as_str().to_string(),
                a.severity.as_str().to_string(),
                a.started_at.to_string(),
                crate::dlq::printable(&a.summary),
            ]);
        }
        print!("{}", crate::dlq::table(&rows));
    }
    if !recent.is_empty() {
        println!("\nrecently resolved:");
        let mut rows = vec![["FLOW", "RULE", "FROM", "RESOLVED", "WHAT"].map(String::from).to_vec()];
        for r in recent.iter().take(20) {
            rows.push(vec![
                r.alert.key.flow.clone(),
                r.alert.key.rule.as_str().to_string(),
                r.alert.started_at.to_string(),
                r.resolved_at.to_string(),
                crate::dlq::printable(&r.alert.summary),
            ]);
        }
        print!("{}", crate::dlq::table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}
