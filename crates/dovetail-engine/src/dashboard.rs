//! The health dashboard at `/`: one server-rendered page, no external
//! assets, answering "is my integration healthy right now?" at a glance.
//!
//! Per flow: state, backlog, DLQ, and the last 24 hours and 7 days from the
//! journal's minute roll-ups (volume, success rate, errors by class,
//! average and p95 latency, freshness) with an hourly sparkline. Then the
//! connectors' health, active alerts, the dead-letter queue (filter by
//! flow, replay buttons that call the admin API with the token typed into
//! the page), and the graph of sources, flows and connectors.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use dovetail_core::clock::{Clock, Timestamp};
use dovetail_core::config::{Config, SourceConfig};
use dovetail_core::duration::format_duration;
use dovetail_core::rollup::{MinuteRollup, Summary};
use dovetail_journal::{DeadLetter, Journal};

use dovetail_core::alert::Severity;

use crate::alerting::{ActiveAlert, AlertSource};
use crate::views::{self, StatusReport};

pub(crate) struct Dashboard {
    pub config: Arc<Config>,
    pub journal: Arc<dyn Journal>,
    pub clock: Arc<dyn Clock>,
    /// Active alerts, when alerting runs: (flow, severity, summary, since).
    pub alerts: AlertSource,
    /// `[engine] admin_token`: with one, the page needs it too (it shows partners' answers).
    pub token: Option<dovetail_core::config::Secret>,
}

#[derive(Deserialize)]
pub(crate) struct Filter {
    flow: Option<String>,
}

const DAY: Duration = Duration::from_secs(86_400);
const DLQ_ROWS: usize = 200;

pub(crate) async fn page(
    State(d): State<Arc<Dashboard>>,
    headers: axum::http::HeaderMap,
    Query(filter): Query<Filter>,
) -> Response {
    if let Some(token) = &d.token
        && !crate::admin::authorized(token, &headers)
    {
        return crate::admin::challenge();
    }
    let now = d.clock.now();
    let week_ago = now.minus(7 * DAY);
    let data = async {
        let status = views::status_report(&d.config, d.journal.as_ref(), now).await?;
        let minutes = d.journal.minutes(None, week_ago, now).await?;
        let flow = filter.flow.as_deref().filter(|f| !f.is_empty());
        let dead = d.journal.dead_letters(flow, DLQ_ROWS).await?;
        Ok::<_, dovetail_journal::JournalError>((status, minutes, dead))
    };
    match data.await {
        Ok((status, minutes, dead)) => {
            let alerts = (d.alerts)();
            Html(render(&d.config, &status, &minutes, &dead, &alerts, filter.flow.as_deref(), now)).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Html(format!("<p>The journal cannot be read: {}</p>", esc(&e.to_string()))),
        )
            .into_response(),
    }
}

/// HTML-escapes text.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn percent(r: Option<f64>) -> String {
    r.map_or_else(|| "–".to_string(), |r| format!("{:.1}%", r * 100.0))
}

fn ago(now: Timestamp, t: Option<Timestamp>) -> String {
    t.map_or_else(
        || "never".to_string(),
        |t| format!("{} ago", format_duration(Duration::from_secs(now.since(t).as_secs()))),
    )
}

/// An inline SVG bar chart of `values` (delivered, failed) per slot.
fn sparkline(values: &[(u64, u64)]) -> String {
    let (w, h) = (4usize, 24.0f64);
    let max = values.iter().map(|(d, f)| d + f).max().unwrap_or(0).max(1) as f64;
    let mut svg = format!(
        r#"<svg class="spark" width="{}" height="{h}" viewBox="0 0 {} {h}" role="img" aria-label="deliveries per hour">"#,
        values.len() * w,
        values.len() * w
    );
    for (i, (delivered, failed)) in values.iter().enumerate() {
        let dh = *delivered as f64 / max * h;
        let fh = *failed as f64 / max * h;
        let x = i * w;
        let _ = write!(svg, r#"<rect x="{x}" y="{:.1}" width="3" height="{dh:.1}" class="ok"/>"#, h - dh);
        if *failed > 0 {
            let _ = write!(svg, r#"<rect x="{x}" y="{:.1}" width="3" height="{fh:.1}" class="bad"/>"#, h - dh - fh);
        }
    }
    svg.push_str("</svg>");
    svg
}

/// Delivered and failed attempts per hour over the 24 hours before `now`.
fn hourly(summary: &Summary, now: Timestamp) -> Vec<(u64, u64)> {
    let end_minute = now.as_millis().div_euclid(60_000);
    let mut hours = vec![(0u64, 0u64); 24];
    for (minute, delivered, failed) in &summary.per_minute {
        let back = (end_minute - minute) / 60;
        if (0..24).contains(&back) {
            let slot = &mut hours[23 - back as usize];
            slot.0 += delivered;
            slot.1 += failed;
        }
    }
    hours
}

fn errors(summary: &Summary) -> String {
    let mut by: Vec<(&String, &u64)> = summary.errors_by_class.iter().collect();
    by.sort_by(|a, b| b.1.cmp(a.1));
    let parts: Vec<String> = by.iter().take(3).map(|(class, n)| format!("{} {n}", esc(class))).collect();
    if parts.is_empty() { "–".to_string() } else { parts.join(", ") }
}

fn latency(s: &Summary) -> String {
    match (s.avg_latency_ms, s.p95_latency_ms) {
        (Some(avg), Some(p95)) if p95 == u64::MAX => format!("{avg:.0} / &gt;60000 ms"),
        (Some(avg), Some(p95)) => format!("{avg:.0} / {p95} ms"),
        _ => "–".to_string(),
    }
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2433;background:#f6f7f9}
header{background:#1d2433;color:#fff;padding:12px 20px;display:flex;justify-content:space-between;align-items:center}
header h1{font-size:18px;margin:0}
main{padding:12px 20px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:12px 0;padding:10px 14px;overflow-x:auto}
h2{font-size:15px;margin:4px 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eef0f3;white-space:nowrap;vertical-align:middle}
th{font-size:12px;color:#5b6475;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.reason{white-space:normal;max-width:480px}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600}
.good{background:#dff3e4;color:#17612e}.warn{background:#fff1cc;color:#7a5300}.crit{background:#fde2e1;color:#9b1c17}
.spark rect.ok{fill:#3b82c4}.spark rect.bad{fill:#d9534f}
.muted{color:#7b8494}
button{font:inherit;padding:3px 10px;border:1px solid #9aa3b2;border-radius:4px;background:#fff;cursor:pointer}
button:hover{background:#eef2f7}
#message{margin-left:10px}
svg.graph text{font:12px system-ui,sans-serif}
"#;

const SCRIPT: &str = r#"
const tokenInput = document.getElementById('token');
tokenInput.value = sessionStorage.getItem('dovetail-token') || '';
tokenInput.addEventListener('change', () => sessionStorage.setItem('dovetail-token', tokenInput.value));
async function replay(body) {
  const message = document.getElementById('message');
  sessionStorage.setItem('dovetail-token', tokenInput.value);
  let response;
  try {
    // location.origin: a page opened as http://user:token@host/ must not
    // put the credentials in the request's URL (browsers refuse that).
    response = await fetch(location.origin + '/api/v1/dlq/replay', {
      method: 'POST',
      headers: {'content-type': 'application/json', 'authorization': 'Bearer ' + tokenInput.value},
      body: JSON.stringify(body)
    });
  } catch (e) {
    message.textContent = String(e);
    message.className = 'badge crit';
    return;
  }
  const answer = await response.json().catch(() => ({}));
  if (response.ok) {
    message.textContent = 'replayed ' + answer.replayed + ' record(s)';
    message.className = 'badge good';
    setTimeout(() => location.reload(), 1500);
  } else {
    message.textContent = answer.error || ('HTTP ' + response.status);
    message.className = 'badge crit';
  }
}
document.querySelectorAll('button[data-replay]').forEach(b =>
  b.addEventListener('click', () => replay({ids: [Number(b.dataset.replay)]})));
const all = document.getElementById('replay-shown');
if (all) all.addEventListener('click', () => replay(all.dataset.flow ? {flow: all.dataset.flow} : {all: true}));
"#;

fn render(
    config: &Config,
    status: &StatusReport,
    minutes: &[MinuteRollup],
    dead: &[DeadLetter],
    alerts: &[ActiveAlert],
    filter: Option<&str>,
    now: Timestamp,
) -> String {
    let mut html = String::with_capacity(16 * 1024);
    let _ = write!(
        html,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>Dovetail</title><style>{STYLE}</style></head><body><header><h1>Dovetail</h1><span class="muted">{} flow(s) · {} · refresh to update</span></header><main>"#,
        status.flows.len(),
        now
    );
    flows_section(&mut html, status, minutes, now);
    connectors_section(&mut html, status, now);
    alerts_section(&mut html, alerts, now);
    dlq_section(&mut html, config, dead, filter);
    graph_section(&mut html, config);
    let _ = write!(html, "</main><script>{SCRIPT}</script></body></html>");
    html
}

fn flows_section(html: &mut String, status: &StatusReport, minutes: &[MinuteRollup], now: Timestamp) {
    html.push_str(r#"<section id="flows"><h2>Flows</h2><table><thead><tr><th>Flow</th><th>State</th><th>Pending</th><th>Oldest</th><th>DLQ</th><th>Rejected</th><th>24h received</th><th>24h delivered</th><th>24h success</th><th>24h errors</th><th>24h avg / p95</th><th>Last delivery</th><th>24h per hour</th><th>7d delivered</th><th>7d success</th></tr></thead><tbody>"#);
    for f in &status.flows {
        let day = views::summary_of(minutes, &f.flow, DAY, now);
        let week = views::summary_of(minutes, &f.flow, 7 * DAY, now);
        let state = match (f.state, f.dead > 0) {
            ("paused", _) => r#"<span class="badge crit">paused</span>"#,
            (_, true) => r#"<span class="badge warn">running</span>"#,
            _ => r#"<span class="badge good">running</span>"#,
        };
        let oldest =
            f.oldest_pending_age_seconds.map_or("–".to_string(), |s| format_duration(Duration::from_secs(s as u64)));
        let _ = write!(
            html,
            r#"<tr data-flow="{name}"><td><b>{name}</b></td><td>{state}</td><td class="num">{}</td><td class="num">{oldest}</td><td class="num" data-field="dead">{}</td><td class="num">{} ({})</td><td class="num" data-field="received-24h">{}</td><td class="num" data-field="delivered-24h">{}</td><td class="num" data-field="success-24h">{}</td><td>{}</td><td class="num">{}</td><td>{}</td><td>{}</td><td class="num">{}</td><td class="num">{}</td></tr>"#,
            f.pending + f.in_flight,
            f.dead,
            f.quarantined,
            percent(Some(f.rejection_rate)),
            day.received,
            day.delivered,
            percent(day.success_rate),
            errors(&day),
            latency(&day),
            ago(now, day.last_delivered_at.or(week.last_delivered_at)),
            sparkline(&hourly(&day, now)),
            week.delivered,
            percent(week.success_rate),
            name = esc(&f.flow),
        );
        if let Some(p) = &f.paused {
            let _ = write!(
                html,
                r#"<tr><td></td><td colspan="14" class="reason">paused since {}: {} — fix the cause, then <code>dovetail resume {}</code></td></tr>"#,
                p.since,
                esc(&p.reason),
                esc(&f.flow)
            );
        }
    }
    html.push_str("</tbody></table></section>");
}

fn connectors_section(html: &mut String, status: &StatusReport, now: Timestamp) {
    html.push_str(r#"<section id="connectors"><h2>Connectors</h2><table><thead><tr><th>Connector</th><th>Breaker</th><th>Since</th><th>Pace</th><th>Blocked until</th><th>Quota</th></tr></thead><tbody>"#);
    for c in &status.connectors {
        let breaker = match c.breaker.as_str() {
            "closed" => r#"<span class="badge good">closed</span>"#.to_string(),
            other => format!(r#"<span class="badge crit">{}</span>"#, esc(other)),
        };
        let pace = match (c.current_rate, c.configured_rate) {
            (Some(cur), Some(max)) => format!("{cur:.1} / {max:.1} per s"),
            _ => "unlimited".to_string(),
        };
        let blocked = c.blocked_until.filter(|b| *b > now).map_or("–".to_string(), |b| b.to_string());
        let quota = status
            .quotas
            .iter()
            .find(|q| q.connector == c.connector)
            .map(|q| {
                let part = |used: u64, limit: Option<u64>, w: &str| limit.map(|l| format!("{used}/{l} this {w}"));
                [part(q.used_this_hour, q.per_hour, "hour"), part(q.used_today, q.per_day, "day")]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_else(|| "–".to_string());
        let _ = write!(
            html,
            "<tr><td><b>{}</b></td><td>{breaker}</td><td>{}</td><td>{pace}</td><td>{blocked}</td><td>{quota}</td></tr>",
            esc(&c.connector),
            c.since
        );
    }
    html.push_str("</tbody></table></section>");
}

fn alerts_section(html: &mut String, alerts: &[ActiveAlert], now: Timestamp) {
    html.push_str(r#"<section id="alerts"><h2>Active alerts</h2>"#);
    if alerts.is_empty() {
        html.push_str(r#"<p class="muted">None.</p>"#);
    } else {
        html.push_str(
            "<table><thead><tr><th>Flow</th><th>Severity</th><th>Since</th><th>What</th></tr></thead><tbody>",
        );
        for a in alerts {
            let class = if a.severity == Severity::Critical { "crit" } else { "warn" };
            let _ = write!(
                html,
                r#"<tr><td>{}</td><td><span class="badge {class}">{}</span></td><td>{}</td><td class="reason">{}</td></tr>"#,
                esc(&a.flow),
                a.severity.as_str(),
                ago(now, Some(a.since)),
                esc(&a.summary)
            );
        }
        html.push_str("</tbody></table>");
    }
    html.push_str("</section>");
}

fn dlq_section(html: &mut String, config: &Config, dead: &[DeadLetter], filter: Option<&str>) {
    let filter = filter.filter(|f| !f.is_empty());
    html.push_str(r#"<section id="dlq"><h2>Dead-letter queue</h2><form method="get" action="/"><label>Flow <select name="flow"><option value="">all</option>"#);
    for name in config.flows.keys() {
        let selected = if Some(name.as_str()) == filter { " selected" } else { "" };
        let _ = write!(html, r#"<option value="{n}"{selected}>{n}</option>"#, n = esc(name));
    }
    let _ = write!(
        html,
        r#"</select></label> <button type="submit">Filter</button> · <label>Admin token <input id="token" type="password" autocomplete="off" size="24"></label> <button type="button" id="replay-shown" data-flow="{}">Replay all {}</button><span id="message"></span></form>"#,
        esc(filter.unwrap_or("")),
        filter.map_or("flows".to_string(), |f| format!("of {}", esc(f)))
    );
    if dead.is_empty() {
        html.push_str(r#"<p class="muted">Empty.</p>"#);
    } else {
        html.push_str("<table><thead><tr><th>Record</th><th>Flow</th><th>Class</th><th>Attempts</th><th>Dead at</th><th>Reason</th><th></th></tr></thead><tbody>");
        for d in dead {
            let _ = write!(
                html,
                r#"<tr data-record="{id}"><td class="num">{id}</td><td>{}</td><td>{}</td><td class="num">{}</td><td>{}</td><td class="reason">{}</td><td><button type="button" data-replay="{id}">Replay</button></td></tr>"#,
                esc(&d.flow),
                esc(d.class.as_str()),
                d.attempts,
                d.dead_at,
                esc(&d.reason.chars().take(300).collect::<String>()),
                id = d.id,
            );
        }
        html.push_str("</tbody></table>");
    }
    html.push_str("</section>");
}

/// Sources → flows → connectors, three columns of boxes joined by lines.
fn graph_section(html: &mut String, config: &Config) {
    let (row, box_w, box_h, gap) = (34.0, 200.0, 24.0, 90.0);
    let mut sources = Vec::new();
    let mut links = Vec::new();
    for (name, flow) in &config.flows {
        let connector = flow.sink.connector();
        sources.push(match &flow.source {
            SourceConfig::Webhook { path, .. } => format!("webhook {path}"),
            SourceConfig::Poll(p) => format!("poll {}{} {}", p.connector, p.path, p.schedule),
            SourceConfig::Files(f) => format!("files {} {}", f.dir, f.schedule),
            SourceConfig::PostgresOutbox(o) => format!("outbox {} {}", o.table, o.schedule),
            SourceConfig::PostgresCdc(c) => format!("cdc {} {}", c.tables.join(","), c.schedule),
            SourceConfig::Nats(n) => format!("nats {}/{}", n.stream, n.consumer),
            SourceConfig::Amqp(a) => format!("amqp {}", a.queue),
        });
        links.push((sources.len() - 1, name.clone(), connector.to_string()));
    }
    let flows: Vec<&String> = config.flows.keys().collect();
    let connectors: Vec<&String> = config.connectors.keys().collect();
    let rows = sources.len().max(connectors.len()).max(1);
    let (width, height) = (3.0 * box_w + 2.0 * gap + 10.0, rows as f64 * row + 10.0);
    let x = |col: usize| 5.0 + col as f64 * (box_w + gap);
    let y = |i: usize| 5.0 + i as f64 * row;
    let _ = write!(
        html,
        r#"<section id="graph"><h2>Sources, flows and connectors</h2><svg class="graph" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="dependency graph">"#
    );
    for (source, flow, connector) in &links {
        let fi = flows.iter().position(|f| *f == flow).unwrap_or(0);
        let ci = connectors.iter().position(|c| *c == connector);
        let (x0, y0) = (x(0) + box_w, y(*source) + box_h / 2.0);
        let (x1, y1) = (x(1), y(fi) + box_h / 2.0);
        let _ = write!(html, r##"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#9aa3b2"/>"##);
        if let Some(ci) = ci {
            let (x2, y2) = (x(2), y(ci) + box_h / 2.0);
            let _ = write!(html, r##"<line x1="{}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#9aa3b2"/>"##, x1 + box_w);
        }
    }
    let node = |html: &mut String, col: usize, i: usize, label: &str, fill: &str| {
        let _ = write!(
            html,
            r##"<rect x="{}" y="{}" width="{box_w}" height="{box_h}" rx="4" fill="{fill}" stroke="#7b8494"/><text x="{}" y="{}">{}</text>"##,
            x(col),
            y(i),
            x(col) + 8.0,
            y(i) + 16.0,
            esc(&label.chars().take(28).collect::<String>())
        );
    };
    for (i, s) in sources.iter().enumerate() {
        node(html, 0, i, s, "#eef2f7");
    }
    for (i, f) in flows.iter().enumerate() {
        node(html, 1, i, &format!("flow {f}"), "#dfeaf6");
    }
    for (i, c) in connectors.iter().enumerate() {
        let url = config.connectors.get(*c).map(|c| c.display_target()).unwrap_or_default();
        node(html, 2, i, &format!("{c} → {url}"), "#e8f3ea");
    }
    html.push_str("</svg></section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc(r#"<script>"x" & 'y'</script>"#),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn the_sparkline_has_a_bar_per_hour_and_marks_failures() {
        let svg = sparkline(&[(1, 0), (0, 0), (3, 1)]);
        assert_eq!(svg.matches(r#"class="ok""#).count(), 3);
        assert_eq!(svg.matches(r#"class="bad""#).count(), 1);
    }

    #[test]
    fn hours_count_back_from_now() {
        let now = Timestamp::from_millis(10 * 3_600_000);
        let summary = Summary {
            per_minute: vec![(now.as_millis() / 60_000 - 1, 5, 1), (now.as_millis() / 60_000 - 61, 2, 0)],
            ..Summary::default()
        };
        let hours = hourly(&summary, now);
        assert_eq!((hours[23], hours[22], hours[0]), ((5, 1), (2, 0), (0, 0)));
    }
}
