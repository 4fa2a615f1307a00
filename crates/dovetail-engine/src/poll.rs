//! Polling sources: on the flow's schedule, ask the partner "what changed
//! since I last asked?" through the flow's connector (so its auth, rate
//! limit and breaker apply), page through the answer, and journal each
//! record through the flow's pipeline like a webhook's.
//!
//! The cursor (where the next run starts) is kept in the journal and moves
//! only after a page's records are durable: a crash re-reads, never skips.
//! Records read again (the `updated_since` overlap, a re-run after a
//! crash) are duplicates by key and version and are not journalled twice.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sha2::Digest as _;
use tokio::sync::watch;

use dovetail_connectors::http::{Fetched, HttpSink};
use dovetail_core::config::{CursorConfig, PollConfig};
use dovetail_core::ids;
use dovetail_core::policy::Answer;
use dovetail_journal::Ingested;

use crate::connector::{self, Admit, ConnectorRuntime};
use crate::contract::SourceContext;

/// Attempts at one page before the run gives up (the next run resumes).
const PAGE_ATTEMPTS: u32 = 5;
/// The longest a poller waits for its connector's gate at once.
const MAX_GATE_WAIT: Duration = Duration::from_secs(5);

pub(crate) struct Poller {
    pub ctx: SourceContext,
    pub config: PollConfig,
    pub sink: HttpSink,
    pub connector: Arc<ConnectorRuntime>,
}

/// What one run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Run {
    pub pages: usize,
    pub new: usize,
    pub duplicates: usize,
}

pub(crate) async fn run(poller: Arc<Poller>, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        match poller.poll_once(&mut stop).await {
            Ok(run) => {
                tracing::debug!(flow = %poller.ctx.flow, pages = run.pages, new = run.new, duplicates = run.duplicates, "poll finished")
            }
            Err(why) => {
                tracing::warn!(flow = %poller.ctx.flow, error = %why, "poll stopped; the next run resumes from the saved cursor")
            }
        }
        if !poller.ctx.wait_for_next(&poller.config.schedule, &mut stop).await {
            return;
        }
    }
}

/// Where a flow's cursor is kept; a different cursor type starts afresh.
fn cursor_key(flow: &str, cursor: Option<&CursorConfig>) -> String {
    let kind = match cursor {
        Some(CursorConfig::UpdatedSince { .. }) => "updated_since",
        Some(CursorConfig::Token { .. }) => "token",
        Some(CursorConfig::Page { .. }) => "page",
        Some(CursorConfig::Link) => "link",
        None => "none",
    };
    format!("cursor:{flow}:{kind}")
}

/// Whether `a` is later than `b`: as times when both are RFC 3339 (their
/// texts may differ in precision or offset), as numbers when both are, else as text.
fn later(a: &str, b: &str) -> bool {
    if let (Ok(x), Ok(y)) = (a.parse::<jiff::Timestamp>(), b.parse::<jiff::Timestamp>()) {
        return x > y;
    }
    if let (Ok(x), Ok(y)) = (a.parse::<f64>(), b.parse::<f64>()) {
        return x > y;
    }
    a > b
}

/// A scalar JSON value as text (a string as is, a number as written).
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// RFC 3339 `t` minus `overlap`, or `t` unchanged when it is not a time.
fn minus(t: &str, overlap: Duration) -> String {
    match t.parse::<jiff::Timestamp>() {
        Ok(ts) if !overlap.is_zero() => {
            let back = jiff::SignedDuration::try_from(overlap).unwrap_or(jiff::SignedDuration::ZERO);
            ts.checked_sub(back).map_or_else(|_| t.to_string(), |x| x.to_string())
        }
        _ => t.to_string(),
    }
}

impl Poller {
    /// One run: pages until the partner has nothing newer, `max_pages`, or a failure.
    pub async fn poll_once(&self, stop: &mut watch::Receiver<bool>) -> Result<Run, String> {
        let key = cursor_key(&self.ctx.flow, self.config.cursor.as_ref());
        let mut saved = self.ctx.journal.load_state(&key).await.map_err(|e| e.to_string())?;
        let mut run = Run::default();
        let mut next_url: Option<String> = None;
        let mut page_no: u64 = 1;
        // `updated_since` within a run: the newest time of the last page.
        let mut since: Option<String> = None;
        while run.pages < self.config.max_pages && !*stop.borrow() {
            let query = self.query(saved.as_deref(), since.as_deref(), page_no);
            let fetched = self.fetch(next_url.as_deref(), &query, stop).await?;
            run.pages += 1;
            let body: Value = serde_json::from_str(fetched.body.as_deref().unwrap_or(""))
                .map_err(|e| format!("page {} is not JSON: {e}", run.pages))?;
            let records = self.records(&body)?;
            for record in &records {
                match self.journal_record(record).await? {
                    Ingested::New(_) => run.new += 1,
                    Ingested::Duplicate(_) => run.duplicates += 1,
                }
            }
            if run.new > 0 {
                self.ctx.wake.notify_one();
            }
            // The page is durable: the cursor may move.
            let more = match &self.config.cursor {
                None => false,
                Some(CursorConfig::UpdatedSince { field, has_more, .. }) => {
                    let asked = query.first().map(|(_, v)| v.clone());
                    let newest = records
                        .iter()
                        .filter_map(|r| field.lookup(r).and_then(text))
                        .reduce(|a, b| if later(&b, &a) { b } else { a });
                    // The next page starts where this one ended; the saved
                    // cursor only ever moves forward.
                    let advanced = newest.as_ref().is_some_and(|n| asked.as_ref().is_none_or(|a| later(n, a)));
                    if !advanced
                        && records.len() > 1
                        && has_more.as_ref().is_some_and(|p| p.lookup(&body) == Some(&Value::Bool(true)))
                    {
                        tracing::warn!(flow = %self.ctx.flow, at = ?asked,
                            "a whole page of records shares one `updated_since` value: the cursor cannot move past it; ask the partner for a larger page");
                    }
                    if let Some(n) = &newest
                        && saved.as_ref().is_none_or(|s| later(n, s))
                    {
                        self.save(&key, n).await?;
                        saved = Some(n.clone());
                    }
                    since = newest;
                    match has_more {
                        Some(path) => path.lookup(&body) == Some(&Value::Bool(true)) && advanced,
                        None => advanced,
                    }
                }
                Some(CursorConfig::Token { next, .. }) => match next.lookup(&body).and_then(text) {
                    // An empty token, or the one just sent, means the end.
                    Some(token) if !token.is_empty() && Some(&token) != saved.as_ref() => {
                        self.save(&key, &token).await?;
                        saved = Some(token);
                        !records.is_empty()
                    }
                    _ => false,
                },
                Some(CursorConfig::Page { .. }) => {
                    // Partners cap page sizes quietly: only an empty page is the last.
                    page_no += 1;
                    !records.is_empty()
                }
                Some(CursorConfig::Link) => {
                    next_url = fetched.next_link;
                    next_url.is_some()
                }
            };
            if !more {
                return Ok(run);
            }
        }
        if run.pages >= self.config.max_pages {
            tracing::warn!(flow = %self.ctx.flow, max_pages = self.config.max_pages,
                "the run read max_pages pages and more may follow; the next run goes on from the cursor (page and link cursors start again from the first page)");
        }
        Ok(run)
    }

    /// The query of a request: the cursor's parameter, if any.
    fn query(&self, saved: Option<&str>, since: Option<&str>, page_no: u64) -> Vec<(String, String)> {
        match &self.config.cursor {
            Some(CursorConfig::UpdatedSince { param, overlap, start, .. }) => {
                // The run's first page looks back by the overlap from the
                // saved cursor: records changed while the last run read its
                // last page. Later pages go on from the page before.
                let from = since.map(str::to_string).or_else(|| saved.map(|s| minus(s, *overlap)));
                from.or_else(|| start.clone()).map(|s| vec![(param.clone(), s)]).unwrap_or_default()
            }
            Some(CursorConfig::Token { param, .. }) => {
                saved.map(|t| vec![(param.clone(), t.to_string())]).unwrap_or_default()
            }
            Some(CursorConfig::Page { param, size_param, size }) => {
                let mut q = vec![(param.clone(), page_no.to_string())];
                if let (Some(p), Some(s)) = (size_param, size) {
                    q.push((p.clone(), s.to_string()));
                }
                q
            }
            Some(CursorConfig::Link) | None => Vec::new(),
        }
    }

    /// The records of a page: at `records`, or the body itself when it is
    /// an array, or its `data`.
    fn records(&self, body: &Value) -> Result<Vec<Value>, String> {
        let found = match &self.config.records {
            Some(path) => path.lookup(body),
            None if body.is_array() => Some(body),
            None => body.get("data"),
        };
        match found {
            Some(Value::Array(items)) => Ok(items.clone()),
            Some(Value::Null) => Ok(Vec::new()),
            _ => Err(format!(
                "the page has no array of records at `{}`",
                self.config.records.as_ref().map_or(".data".to_string(), |p| p.to_string())
            )),
        }
    }

    /// Journals one record through the pipeline, named by key and version.
    async fn journal_record(&self, record: &Value) -> Result<Ingested, String> {
        let started = std::time::Instant::now();
        let raw = serde_json::to_vec(record).map_err(|e| e.to_string())?;
        let processed = self.ctx.process(&raw).await;
        let version = match &self.config.version {
            Some(path) => path.lookup(record).and_then(text),
            None => None,
        }
        .unwrap_or_else(|| hex::encode(&sha2::Sha256::digest(&raw)[..12]));
        // Without a key, only the content tells records apart.
        let delivery_id = match &processed.keys.external {
            Some(key) => format!("{key}@{version}"),
            None => format!("-@{}", hex::encode(&sha2::Sha256::digest(&raw)[..16])),
        };
        self.ctx
            .journal(processed, delivery_id, raw, started)
            .await
            .map_err(|e| format!("cannot journal a polled record: {e}"))
    }

    async fn save(&self, key: &str, cursor: &str) -> Result<(), String> {
        self.ctx
            .journal
            .save_state(key, cursor.to_string(), self.ctx.clock.now())
            .await
            .map_err(|e| format!("cannot save the cursor: {e}"))
    }

    /// One page, through the connector's gate, retried on 429, 5xx and
    /// transport failures (the gate holds the next try until `Retry-After`).
    async fn fetch(
        &self,
        url: Option<&str>,
        query: &[(String, String)],
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Fetched, String> {
        let mut last = String::new();
        for attempt in 1..=PAGE_ATTEMPTS {
            let probe = loop {
                let (admit, change) = self.connector.admit(1, self.ctx.clock.now());
                connector::record(change, self.ctx.journal.as_ref()).await;
                match admit {
                    Admit::Send { probe, .. } => break probe,
                    Admit::Wait(wait, reason) => {
                        self.ctx.metrics.waited(&self.connector.name, reason);
                        tokio::select! {
                            _ = tokio::time::sleep(wait.min(MAX_GATE_WAIT)) => {}
                            _ = stop.wait_for(|s| *s) => return Err("stopping".into()),
                        }
                    }
                }
            };
            let fetched = match self.sink.fetch(url, query, &ids::new_correlation_id(), || self.ctx.clock.now()).await {
                Ok(f) => f,
                Err(why) => {
                    // Nothing went out: the gate's token and probe go back.
                    self.connector.unused(1, probe);
                    return Err(why);
                }
            };
            let (_, change) = self.connector.observe(&fetched.result, self.ctx.clock.now());
            connector::record(change, self.ctx.journal.as_ref()).await;
            let detail = fetched.result.detail.clone().unwrap_or_default();
            match fetched.result.answer {
                Answer::Status { status: 200..=299, .. } => return Ok(fetched),
                Answer::Status { status, .. } if status == 429 || status == 408 || status >= 500 => {
                    last = format!("HTTP {status}: {detail}");
                }
                Answer::Timeout | Answer::Connection => last = detail,
                Answer::Status { status, .. } => return Err(format!("HTTP {status}: {detail}")),
                Answer::Service(_) => return Err(detail),
            }
            tracing::info!(flow = %self.ctx.flow, attempt, error = %last, "a page failed; trying again");
            let retry_after = match fetched.result.answer {
                Answer::Status { retry_after: Some(wait), .. } => wait,
                _ => Duration::ZERO,
            };
            let backoff = Duration::from_millis(200 * 2u64.pow(attempt - 1)).max(retry_after.min(MAX_GATE_WAIT * 12));
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return Err("stopping".into()),
            }
        }
        Err(format!("gave up on a page after {PAGE_ATTEMPTS} attempts; last: {last}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_compare_as_times_or_numbers() {
        assert!(later("2026-01-01T10:00:00.7Z", "2026-01-01T10:00:00Z"), "more precision is not earlier");
        assert!(later("2026-01-01T11:30:00Z", "2026-01-01T12:00:00+02:00"), "offsets count");
        assert!(later("100", "99"), "numbers as numbers");
        assert!(!later("abc", "abd"));
    }

    #[test]
    fn the_overlap_looks_back() {
        assert_eq!(minus("2026-01-01T00:00:10.000Z", Duration::from_secs(5)), "2026-01-01T00:00:05Z");
        assert_eq!(minus("not a time", Duration::from_secs(5)), "not a time");
        assert_eq!(minus("2026-01-01T00:00:10Z", Duration::ZERO), "2026-01-01T00:00:10Z");
    }
}
