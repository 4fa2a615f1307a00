//! Alerting: every `every`, each flow's figures are read from the journal
//! (counts, minute roll-ups, quota use, drift events), the core's rules
//! decide which conditions hold (`dovetail_core::alert`), and the alert book
//! turns them into notices: fired once, repeated at an interval, resolved.
//!
//! A notice is logged, and for each `[notify.NAME]` journalled as a record
//! of the internal flow `notify.NAME`, so it is delivered like any record:
//! with retries and backoff, and dead-lettered (and visible) if the
//! receiver keeps failing. The book is saved in the journal after every
//! change, so a restart neither forgets nor re-fires what is active.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use dovetail_core::alert::{self, AlertBook, AlertRules, FlowSnapshot, Notice, NoticeKind, QuotaReading, Severity};
use dovetail_core::clock::{Clock, Timestamp};
use dovetail_core::config::{Config, NotifyFormat};
use dovetail_core::ids;
use dovetail_core::policy::Window;
use dovetail_core::rollup::{MinuteRollup, summarise};
use dovetail_journal::{FlowCounts, Journal, JournalError, NewRecord, Prepared};

/// The journal key the book is saved under.
pub(crate) const BOOK_KEY: &str = "alert_book";
/// The newest drift event already reported.
const DRIFT_SEEN_KEY: &str = "alert_drift_seen";
/// When alerting first ran on this journal: silence is counted from here
/// at the earliest, and a restart does not reset it.
const SINCE_KEY: &str = "alerting_since";
/// The longest look back: roll-ups are kept this long.
const MAX_LOOKBACK: Duration = crate::retention::ROLLUP_RETENTION;
/// The prefix of the internal flows that carry notices.
pub(crate) const NOTIFY_PREFIX: &str = "notify.";

/// An active alert as the dashboard shows it.
pub(crate) struct ActiveAlert {
    pub flow: String,
    pub severity: Severity,
    pub summary: String,
    pub since: Timestamp,
}

/// Where the dashboard reads the active alerts.
pub(crate) type AlertSource = Arc<dyn Fn() -> Vec<ActiveAlert> + Send + Sync>;

/// One notification channel.
pub(crate) struct Notifier {
    pub name: String,
    pub format: NotifyFormat,
    pub min_severity: Severity,
    pub wake: Arc<Notify>,
}

impl Notifier {
    pub fn flow(&self) -> String {
        format!("{NOTIFY_PREFIX}{}", self.name)
    }
}

pub(crate) struct Alerting {
    /// Each flow's rules: `[alerts]` with the flow's `alerts` over them.
    pub rules: BTreeMap<String, AlertRules>,
    /// The flow's connector and its quota limits (hour, day).
    pub quotas: BTreeMap<String, (String, Option<u64>, Option<u64>)>,
    pub notifiers: Vec<Notifier>,
    pub book: Mutex<AlertBook>,
    pub started_at: Timestamp,
    /// The newest drift event already reported.
    pub drift_seen: Mutex<i64>,
}

impl Alerting {
    pub fn new(config: &Config, notifiers: Vec<Notifier>, saved: Saved) -> Alerting {
        let rules = config.flows.iter().map(|(name, f)| (name.clone(), config.alerts.merged(&f.alerts))).collect();
        let quotas = config
            .flows
            .iter()
            .filter_map(|(name, f)| {
                let connector = f.sink.connector();
                let q = config.connectors.get(connector)?.policies().quota?;
                Some((name.clone(), (connector.to_string(), q.per_hour, q.per_day)))
            })
            .collect();
        Alerting {
            rules,
            quotas,
            notifiers,
            book: Mutex::new(saved.book),
            started_at: saved.since,
            drift_seen: Mutex::new(saved.drift_seen),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, AlertBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Active alerts, for the dashboard.
    pub fn active(&self) -> Vec<ActiveAlert> {
        self.book()
            .active()
            .map(|a| ActiveAlert {
                flow: a.key.flow.clone(),
                severity: a.severity,
                summary: a.summary.clone(),
                since: a.started_at,
            })
            .collect()
    }

    /// One evaluation of every flow; returns the notices it produced.
    /// Every figure is read first: a journal error changes nothing.
    pub async fn evaluate(&self, journal: &dyn Journal, now: Timestamp) -> Result<Vec<Notice>, JournalError> {
        let counts = journal.counts().await?;
        let longest = self.rules.values().map(longest_window).max().unwrap_or_default();
        let minutes = journal.minutes(None, now.minus(longest), now).await?;
        let drift = journal.drift_events(None, 1000).await?;
        let mut quota_used = BTreeMap::new();
        for (connector, ..) in self.quotas.values() {
            if !quota_used.contains_key(connector) {
                quota_used.insert(connector.clone(), journal.quota_used(connector, now).await?);
            }
        }
        let seen = {
            let mut seen = self.drift_seen.lock().unwrap_or_else(|p| p.into_inner());
            let before = *seen;
            *seen = drift.iter().map(|d| d.id).max().unwrap_or(before).max(before);
            before
        };
        let mut notices = Vec::new();
        for (flow, rules) in &self.rules {
            let c = counts.iter().find(|c| &c.flow == flow).cloned().unwrap_or_default();
            let own: Vec<&MinuteRollup> = minutes.iter().filter(|m| &m.flow == flow).collect();
            let mut snapshot = self.snapshot(flow, rules, &c, &own, now);
            snapshot.drift_events = drift
                .iter()
                .filter(|d| &d.flow == flow && d.id > seen)
                .map(|d| format!("{} `{}` ({})", d.event.kind.as_str(), d.event.path, d.event.json_type.as_str()))
                .collect();
            if let Some((connector, per_hour, per_day)) = self.quotas.get(flow)
                && let Some(used) = quota_used.get(connector)
            {
                for (window, limit, used) in
                    [(Window::Hour, per_hour, used.this_hour), (Window::Day, per_day, used.today)]
                {
                    if let Some(limit) = limit.filter(|l| *l > 0) {
                        let used = used as f64 / limit as f64;
                        snapshot.quota.push(QuotaReading { connector: connector.clone(), window, used });
                    }
                }
            }
            let conditions = alert::evaluate(rules, &snapshot);
            notices.extend(self.book().observe(now, flow, conditions, rules.repeat_every));
        }
        // The alerts of flows no longer in the config resolve.
        let gone: std::collections::BTreeSet<String> =
            self.book().active().map(|a| a.key.flow.clone()).filter(|f| !self.rules.contains_key(f)).collect();
        for flow in gone {
            notices.extend(self.book().observe(now, &flow, Vec::new(), Duration::MAX));
        }
        Ok(notices)
    }

    fn snapshot(
        &self,
        flow: &str,
        rules: &AlertRules,
        c: &FlowCounts,
        minutes: &[&MinuteRollup],
        now: Timestamp,
    ) -> FlowSnapshot {
        let windows = rules.windows();
        let over = |span: Option<Duration>| span.map(|d| summarise(minutes.iter().copied(), now.minus(d), now));
        let errors = over(windows.error_rate);
        let rejections = over(windows.rejection_rate);
        let latency = over(windows.latency);
        let min_samples = rules.p95_latency.as_ref().map_or(1, |r| r.min_samples.max(1));
        let baseline = windows
            .latency
            .zip(windows.latency_baseline)
            .map(|(l, b)| {
                let end = now.minus(l);
                summarise(minutes.iter().copied(), end.minus(b), end)
            })
            // Too few deliveries tell nothing about what is normal.
            .filter(|s| s.delivered >= min_samples);
        let last_received_at =
            minutes.iter().filter(|m| m.received > 0).map(|m| Timestamp::from_millis(m.minute * 60_000)).max();
        FlowSnapshot {
            flow: flow.to_string(),
            now,
            started_at: self.started_at,
            attempts_in_window: errors.as_ref().map_or(0, |s| s.attempts),
            failed_in_window: errors.as_ref().map_or(0, |s| s.attempts.saturating_sub(s.delivered)),
            received_in_window: rejections.as_ref().map_or(0, |s| s.received),
            quarantined_in_window: rejections.as_ref().map_or(0, |s| s.quarantined),
            last_received_at,
            latency_samples: latency.as_ref().map_or(0, |s| s.delivered),
            p95_latency_ms: latency.as_ref().and_then(|s| s.p95_latency_ms),
            baseline_p95_ms: baseline.as_ref().and_then(|s| s.p95_latency_ms),
            dlq_depth: c.dead,
            oldest_pending_at: c.oldest_pending_at,
            paused_for_auth: c.paused.as_ref().map(|p| p.reason.clone()),
            quota: Vec::new(),
            drift_events: Vec::new(),
        }
    }

    /// Logs a notice and journals it for every notifier that wants it.
    pub async fn announce(&self, journal: &dyn Journal, notice: &Notice, clock: &dyn Clock) {
        let a = &notice.alert;
        let (flow, rule) = (&a.key.flow, a.key.rule.as_str());
        match notice.kind {
            NoticeKind::Fired | NoticeKind::Repeated => {
                tracing::warn!(flow = %flow, rule, severity = a.severity.as_str(),
                repeat = matches!(notice.kind, NoticeKind::Repeated), "alert: {}", a.summary)
            }
            NoticeKind::Resolved => tracing::info!(flow = %flow, rule, "alert resolved: {}", a.summary),
        }
        // A resolution goes wherever the firing went: by the highest severity reached.
        let severity = match notice.kind {
            NoticeKind::Resolved => a.peak.unwrap_or(a.severity).max(a.severity),
            NoticeKind::Fired | NoticeKind::Repeated => a.severity,
        };
        for n in self.notifiers.iter().filter(|n| severity >= n.min_severity) {
            let body = match n.format {
                NotifyFormat::Json => alert::generic_json(notice),
                NotifyFormat::Slack => alert::slack_json(notice),
            };
            let kind = match notice.kind {
                NoticeKind::Fired => "fired",
                NoticeKind::Repeated => "repeated",
                NoticeKind::Resolved => "resolved",
            };
            let connector = a.key.connector.as_deref().unwrap_or("-");
            // The same notice is journalled once, even if it is announced again.
            let delivery_id = format!("{flow}/{rule}/{connector}/{kind}/{}", notice.at.as_millis());
            let record = NewRecord {
                flow: n.flow(),
                idempotency_key: ids::idempotency_key(&n.flow(), Some(&delivery_id)),
                delivery_id: Some(delivery_id),
                external_key: None,
                correlation_id: ids::new_correlation_id(),
                content_type: Some("application/json".into()),
                payload: body.to_string().into_bytes(),
                received_at: clock.now(),
                quarantine: None,
                prepared: Some(Prepared::default()),
            };
            match journal.ingest(record).await {
                Ok(_) => n.wake.notify_one(),
                Err(e) => tracing::error!(notifier = %n.name, error = %e, "cannot journal an alert notice"),
            }
        }
    }

    /// Saves the book and the drift mark, so that a restart neither forgets
    /// nor re-fires (a crash between journalling a notice and this save
    /// sends that notice again: notices are at least once).
    pub async fn save(&self, journal: &dyn Journal, now: Timestamp) {
        let seen = *self.drift_seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = journal.save_state(DRIFT_SEEN_KEY, seen.to_string(), now).await {
            tracing::error!(error = %e, "cannot save the alerts' drift mark");
        }
        let text = match serde_json::to_string(&*self.book()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise the alert book");
                return;
            }
        };
        if let Err(e) = journal.save_state(BOOK_KEY, text, now).await {
            tracing::error!(error = %e, "cannot save the alert book");
        }
    }
}

/// The longest span of roll-ups a flow's rules need (the latency baseline
/// sits before the latency window; silence looks back `max_silence`, at
/// least a day), at most as long as roll-ups are kept.
fn longest_window(rules: &AlertRules) -> Duration {
    let w = rules.windows();
    let latency = w.latency.unwrap_or_default() + w.latency_baseline.unwrap_or_default();
    let silence = rules.max_silence.unwrap_or_default().max(Duration::from_secs(86_400));
    [w.error_rate.unwrap_or_default(), w.rejection_rate.unwrap_or_default(), latency, silence]
        .into_iter()
        .max()
        .unwrap_or_default()
        .min(MAX_LOOKBACK)
}

/// What alerting keeps in the journal between runs.
pub(crate) struct Saved {
    pub book: AlertBook,
    pub drift_seen: i64,
    pub since: Timestamp,
}

/// Loads what alerting saved; on a first run, marks the drift events
/// already recorded as seen and records when alerting started.
pub(crate) async fn load(journal: &dyn Journal, now: Timestamp) -> Saved {
    let book = load_book(journal).await;
    let drift_seen = match journal.load_state(DRIFT_SEEN_KEY).await.ok().flatten().and_then(|s| s.parse().ok()) {
        Some(seen) => seen,
        None => journal.drift_events(None, 1).await.ok().and_then(|d| d.first().map(|e| e.id)).unwrap_or(0),
    };
    let since = match journal.load_state(SINCE_KEY).await.ok().flatten().and_then(|s| s.parse::<i64>().ok()) {
        Some(ms) => Timestamp::from_millis(ms),
        None => {
            if let Err(e) = journal.save_state(SINCE_KEY, now.as_millis().to_string(), now).await {
                tracing::warn!(error = %e, "cannot record when alerting started");
            }
            now
        }
    };
    Saved { book, drift_seen, since }
}

/// Loads the saved book (an unreadable one is logged and replaced).
async fn load_book(journal: &dyn Journal) -> AlertBook {
    match journal.load_state(BOOK_KEY).await {
        Ok(Some(text)) => serde_json::from_str(&text).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the saved alert book cannot be read; starting a new one");
            AlertBook::new()
        }),
        Ok(None) => AlertBook::new(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot load the alert book; starting a new one");
            AlertBook::new()
        }
    }
}

pub(crate) async fn run(
    alerting: Arc<Alerting>,
    journal: Arc<dyn Journal>,
    clock: Arc<dyn Clock>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let now = clock.now();
        match alerting.evaluate(journal.as_ref(), now).await {
            Ok(notices) => {
                for notice in &notices {
                    alerting.announce(journal.as_ref(), notice, clock.as_ref()).await;
                }
                if !notices.is_empty() {
                    alerting.save(journal.as_ref(), now).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot evaluate the alert rules"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
}
