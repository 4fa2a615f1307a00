//! One dispatcher per flow: lease due records, attempt each, write back.
//!
//! Requests in flight are bounded by the connector's permits, taken before
//! the lease so that a leased record is never waiting for a permit while its
//! lease runs down. The dispatcher sleeps until the earliest due record,
//! an intake wakes it, or the idle poll comes round.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

use dovetail_connectors::http::{AttemptResult, Outbound};
use dovetail_core::clock::Timestamp;
use dovetail_core::config::BatchConfig;
use dovetail_core::policy::{
    Answer, ErrorClass, Jitter, MAX_RETRY_AFTER, RetryPolicy, ServiceAnswer, Verdict, classify,
};
use dovetail_core::record::Attempt;
use dovetail_journal::{AttemptReport, Journal, LeaseMode, LeasedRecord, Outcome, Prepared};

use crate::connector::{self, Admit};
use crate::{EngineOptions, FlowRuntime};

/// After a journal error, how long before trying again.
const JOURNAL_BACKOFF: Duration = Duration::from_millis(500);

/// Most attempt reports written in one journal call.
const MAX_REPORTS_PER_WRITE: usize = 256;

pub(crate) async fn run(
    flow: Arc<FlowRuntime>,
    journal: Arc<dyn Journal>,
    options: EngineOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut inflight = tokio::task::JoinSet::new();
    let mut pause = PauseCache::default();
    let (reports, waiting) = mpsc::unbounded_channel();
    let recorder = tokio::spawn(record_reports(flow.clone(), journal.clone(), waiting));
    let reports = Reports(reports);
    while !*stop.borrow() {
        if recorder.is_finished() {
            // Reports would be dropped: stop, and let the engine see it.
            tracing::error!(flow = %flow.name, "the flow's attempt recorder stopped; stopping its dispatcher");
            break;
        }
        // Reap finished attempts so the set does not grow.
        while inflight.try_join_next().is_some() {}
        match pause.is_paused(&flow, journal.as_ref(), &options).await {
            Ok(true) => {
                // Deaf to intake: a paused flow woken by every arrival would
                // cost the intake thread a cross-thread wake-up per record.
                idle(&flow, &options, None, Listen::NudgesOnly, &mut stop).await;
                continue;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(flow = %flow.name, error = %e, "cannot read the flow's pause state");
                pause_for(JOURNAL_BACKOFF, &mut stop).await;
                continue;
            }
        }
        let mut permits = take_permits(&flow, &mut stop).await;
        if permits.is_empty() {
            continue;
        }
        if flow.batch.is_some() {
            // A bulk request is one request: one permit, one token.
            permits.truncate(1);
        }
        let now = options.clock.now();
        // The breaker and the rate limiter come before the lease, so a leased
        // record is never waiting for its turn while its lease runs down.
        let (admit, change) = flow.connector.admit(permits.len(), now);
        connector::record(change, journal.as_ref()).await;
        let (n, probe) = match admit {
            Admit::Send { n, probe } => (n, probe),
            Admit::Wait(wait, reason) => {
                flow.metrics.waited(&flow.connector.name, reason);
                drop(permits);
                tokio::select! {
                    _ = tokio::time::sleep(wait.min(options.idle_poll)) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
                continue;
            }
        };
        permits.truncate(n);
        let wanted = flow.batch.as_ref().map_or(n, |b| b.max_records);
        let mode = match (&flow.batch, flow.in_key_order) {
            (Some(_), _) => LeaseMode::Batch,
            (None, true) => LeaseMode::InKeyOrder,
            (None, false) => LeaseMode::Oldest,
        };
        let leased = journal.lease_with(mode, &flow.name, &options.node_id, now, flow.lease_for, wanted).await;
        let leased = match leased {
            Ok(l) => l,
            Err(e) => {
                flow.connector.unused(n, probe);
                tracing::error!(flow = %flow.name, error = %e, "cannot lease records");
                pause_for(JOURNAL_BACKOFF, &mut stop).await;
                continue;
            }
        };
        let requests = if flow.batch.is_some() { usize::from(!leased.is_empty()) } else { leased.len() };
        if requests < n {
            flow.connector.unused(n - requests, probe && leased.is_empty());
        }
        if leased.is_empty() {
            drop(permits);
            let next = journal.next_due(&flow.name).await.ok().flatten();
            idle(&flow, &options, next, Listen::Arrivals, &mut stop).await;
            continue;
        }
        if let Some(batch) = flow.batch.clone() {
            let partial = leased.len() < batch.max_records;
            let max_wait = batch.max_wait;
            let (f, journal, options, reports) = (flow.clone(), journal.clone(), options.clone(), reports.clone());
            // Boxed: the task's cell then holds a pointer, not the whole
            // future, which tokio would otherwise copy at every stage.
            inflight.spawn(Box::pin(async move {
                attempt_batch(&f, &*journal, &options, &reports, &batch, leased, probe, permits).await;
            }));
            if partial {
                // Let the next batch fill: a lone record waits at most max_wait.
                pause_for(max_wait, &mut stop).await;
            }
            continue;
        }
        for (record, permit) in leased.into_iter().zip(permits) {
            let (flow, journal, options, reports) = (flow.clone(), journal.clone(), options.clone(), reports.clone());
            inflight.spawn(Box::pin(async move {
                attempt(&flow, &*journal, &options, &reports, record, probe, permit).await;
            }));
        }
    }
    // Attempts already sent finish and are recorded; nothing new starts.
    while inflight.join_next().await.is_some() {}
    drop(reports);
    if let Err(e) = recorder.await
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Where attempts hand their reports to be journalled.
#[derive(Clone)]
struct Reports(mpsc::UnboundedSender<AttemptReport>);

/// Journals the reports of a dispatcher's attempts, as many as have
/// gathered in one `complete_many`: one writer job and one wake-up for the
/// lot, not one per record. An attempt's task hands its report over and
/// ends; the record stays leased until its report is in the journal, so
/// nothing can lease it in between. Ends when every sender is gone and the
/// last reports are written.
async fn record_reports(
    flow: Arc<FlowRuntime>,
    journal: Arc<dyn Journal>,
    mut waiting: mpsc::UnboundedReceiver<AttemptReport>,
) {
    let mut group = Vec::with_capacity(MAX_REPORTS_PER_WRITE);
    while waiting.recv_many(&mut group, MAX_REPORTS_PER_WRITE).await > 0 {
        // With keys in order, the next record of a key may be due now; a
        // bound batch may be leasable once its refused members are written;
        // a record going back to pending has a new due time, which a
        // dispatcher that went idle while it was being written has not seen.
        let wake = flow.in_key_order
            || flow.batch.is_some()
            || group.iter().any(|r| matches!(r.outcome, Outcome::Retry { .. } | Outcome::Hold { .. }));
        // Kept for writing one by one if the group fails as a whole.
        let reports = if group.len() > 1 { Some(group.clone()) } else { None };
        let ids: Vec<_> = group.iter().map(|r| r.id).collect();
        match journal.complete_many(std::mem::take(&mut group)).await {
            Ok(applied) => lost_leases(&flow, ids.into_iter().zip(applied)),
            Err(e) => match reports {
                // One report's failure (a full disk, the journal's size cap)
                // must not cost the others: each lost report means an
                // expired lease, an interrupted attempt counted against the
                // record's budget, and the record sent again.
                Some(reports) => {
                    tracing::warn!(flow = %flow.name, error = %e, "cannot record a group of attempts; recording them one by one");
                    for report in reports {
                        let id = report.id;
                        match journal.complete(report).await {
                            Ok(applied) => lost_leases(&flow, [(id, applied)]),
                            Err(e) => cannot_record(&flow, id, &e),
                        }
                    }
                }
                None => ids.iter().for_each(|id| cannot_record(&flow, *id, &e)),
            },
        }
        if wake {
            flow.wake.notify_one();
        }
    }
}

fn lost_leases(flow: &FlowRuntime, applied: impl IntoIterator<Item = (dovetail_core::record::RecordId, bool)>) {
    for (id, _) in applied.into_iter().filter(|(_, applied)| !applied) {
        tracing::warn!(flow = %flow.name, record_id = id,
            "the lease expired before the attempt finished; another dispatcher owns the record now");
    }
}

/// The lease will expire and the record will be tried again with the same
/// idempotency key, so the partner sees no double effect.
fn cannot_record(flow: &FlowRuntime, id: dovetail_core::record::RecordId, e: &dovetail_journal::JournalError) {
    tracing::error!(flow = %flow.name, record_id = id, error = %e, "cannot record an attempt");
}

/// The flow's pause flag, read from the journal at most once per idle poll
/// (a `dovetail resume` from the CLI lands within that) and at once when
/// `recheck_pause` is set: after one of this flow's attempts was refused for
/// its credentials, or a resume through the admin API.
#[derive(Default)]
struct PauseCache {
    checked: Option<(std::time::Instant, bool)>,
}

impl PauseCache {
    async fn is_paused(
        &mut self,
        flow: &FlowRuntime,
        journal: &dyn Journal,
        options: &EngineOptions,
    ) -> dovetail_journal::Result<bool> {
        let recheck = flow.recheck_pause.swap(false, std::sync::atomic::Ordering::AcqRel);
        let fresh = self.checked.filter(|(at, _)| !recheck && at.elapsed() < options.idle_poll);
        if let Some((_, paused)) = fresh {
            return Ok(paused);
        }
        let paused = journal.pause_of(&flow.name).await?.is_some();
        self.checked = Some((std::time::Instant::now(), paused));
        Ok(paused)
    }
}

/// One permit (waiting for it), plus as many more as are free right now.
async fn take_permits(flow: &FlowRuntime, stop: &mut watch::Receiver<bool>) -> Vec<OwnedSemaphorePermit> {
    let first = tokio::select! {
        p = flow.connector.permits.clone().acquire_owned() => p,
        _ = stop.wait_for(|s| *s) => return Vec::new(),
    };
    let Ok(first) = first else { return Vec::new() };
    let mut permits = vec![first];
    while let Ok(p) = flow.connector.permits.clone().try_acquire_owned() {
        permits.push(p);
    }
    permits
}

/// What ends an idle wait early, besides the stop and an operator's nudge.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listen {
    /// New records (intake) and finished ones (the recorder, for flows that
    /// wait on them).
    Arrivals,
    NudgesOnly,
}

async fn idle(
    flow: &FlowRuntime,
    options: &EngineOptions,
    next_due: Option<Timestamp>,
    listen: Listen,
    stop: &mut watch::Receiver<bool>,
) {
    let wait = next_due.map(|t| t.since(options.clock.now())).unwrap_or(options.idle_poll).min(options.idle_poll);
    // Due but not leased: held back behind an older record of its key, or in
    // a batch with a member still in flight. Their completion wakes us; the
    // floor keeps this from spinning meanwhile.
    let wait = if wait.is_zero() { options.idle_poll / 4 } else { wait };
    tokio::select! {
        _ = flow.wake.notified(), if listen == Listen::Arrivals => {}
        _ = flow.nudged.notified() => {}
        _ = tokio::time::sleep(wait) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

async fn pause_for(d: Duration, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

async fn attempt(
    flow: &FlowRuntime,
    journal: &dyn Journal,
    options: &EngineOptions,
    reports: &Reports,
    mut record: LeasedRecord,
    probe: bool,
    permit: OwnedSemaphorePermit,
) {
    let started_at = options.clock.now();
    match prepare(flow, journal, options, &mut record).await {
        Ready::Send => {}
        Ready::Refused(why) => {
            // Nothing goes out: the token, the quota slot and a breaker probe are returned.
            flow.connector.unused(1, probe);
            settle_unsent(flow, options, reports, &record, started_at, why);
            return;
        }
        Ready::Abandon => {
            flow.connector.unused(1, probe);
            return;
        }
    }
    let result = flow.sink.send(outbound(&record), || options.clock.now()).await;
    let now = options.clock.now();
    let (breaker_open_until, change) = flow.connector.observe(&result, now);
    // The permit bounds requests to the partner, not journal writes: once the
    // breaker and the limiter have seen this answer, the next request may go
    // out while it is being recorded.
    drop(permit);
    connector::record(change, journal).await;
    let sent = Sent { started_at, breaker_open_until, quota: flow.connector.quota_name(), keep_batch: false };
    let report = conclude(flow, journal, options, &record, &result, sent).await;
    reports.hand_over(report);
}

/// The request a record makes: its mapped body when a mapping made one,
/// else the raw payload as received.
fn outbound(record: &LeasedRecord) -> Outbound<'_> {
    let mapped = record.prepared.as_ref().and_then(|p| p.body.as_deref());
    Outbound {
        payload: mapped.unwrap_or(&record.payload),
        content_type: if mapped.is_some() { Some("application/json") } else { record.content_type.as_deref() },
        idempotency_key: &record.idempotency_key,
        correlation_id: &record.correlation_id,
    }
}

/// Sends leased records in one bulk request, then concludes each from its
/// own result when the partner gave per-record results, else from the
/// request's. Records that succeeded are delivered; only the others come
/// back, so a retried batch never carries a record that was applied.
#[allow(clippy::too_many_arguments)]
async fn attempt_batch(
    flow: &FlowRuntime,
    journal: &dyn Journal,
    options: &EngineOptions,
    reports: &Reports,
    batch: &BatchConfig,
    records: Vec<LeasedRecord>,
    probe: bool,
    permits: Vec<OwnedSemaphorePermit>,
) {
    let started_at = options.clock.now();
    let mut sendable = Vec::with_capacity(records.len());
    for mut record in records {
        match prepare(flow, journal, options, &mut record).await {
            Ready::Send => sendable.push(record),
            Ready::Refused(why) => settle_unsent(flow, options, reports, &record, started_at, why),
            Ready::Abandon => {}
        }
    }
    let records = sendable;
    if records.is_empty() {
        flow.connector.unused(1, probe);
        return;
    }
    let outs: Vec<Outbound<'_>> = records.iter().map(outbound).collect();
    let key = records[0].batch_key.clone().unwrap_or_else(|| {
        dovetail_core::ids::batch_idempotency_key(records.iter().map(|r| r.idempotency_key.as_str()))
    });
    let result = flow.sink.send_batch(&outs, &key, batch.results, &batch.results_field, || options.clock.now()).await;
    // Without a per-record answer nobody knows what the partner applied:
    // a retry must send exactly these records under the same key again.
    let keep_batch = !matches!(result.items, Ok(Some(_)));
    let now = options.clock.now();
    let (breaker_open_until, change) = flow.connector.observe(&result.request, now);
    drop(permits);
    connector::record(change, journal).await;
    // The request counts once against the quota.
    let mut quota = flow.connector.quota_name();
    let mut reports = Vec::with_capacity(records.len());
    for (i, record) in records.iter().enumerate() {
        let own = match &result.items {
            Ok(Some(items)) => AttemptResult {
                answer: items[i].answer,
                duration: result.request.duration,
                detail: items[i].detail.clone(),
                hint: result.request.hint,
            },
            Ok(None) => result.request.clone(),
            // A 2xx whose results cannot be read: nobody knows what was
            // applied. Retried as a server failure.
            Err(why) => AttemptResult {
                answer: Answer::Status { status: 502, retry_after: None },
                duration: result.request.duration,
                detail: Some(why.clone()),
                hint: result.request.hint,
            },
        };
        let sent = Sent { started_at, breaker_open_until, quota: quota.take(), keep_batch };
        reports.push(conclude(flow, journal, options, record, &own, sent).await);
    }
    // One transaction for the whole batch: a crash cannot leave some of a
    // bound batch pending (and leasable) while the rest is still in flight.
    match journal.complete_many(reports).await {
        Ok(applied) if applied.iter().all(|a| *a) => {}
        Ok(_) => tracing::warn!(flow = %flow.name, "some of a batch's leases expired before the attempt finished"),
        Err(e) => tracing::error!(flow = %flow.name, error = %e, "cannot record a batch's attempt"),
    }
    flow.wake.notify_one();
}

/// How an attempt went out, beyond its result.
struct Sent {
    started_at: Timestamp,
    breaker_open_until: Option<Timestamp>,
    /// The connector whose quota the request used (once per request).
    quota: Option<String>,
    keep_batch: bool,
}

/// Decides what an attempt's result means for one record; pauses the flow
/// on an auth failure. The caller writes the report.
async fn conclude(
    flow: &FlowRuntime,
    journal: &dyn Journal,
    options: &EngineOptions,
    record: &LeasedRecord,
    result: &AttemptResult,
    sent: Sent,
) -> AttemptReport {
    let Sent { started_at, breaker_open_until, quota, keep_batch } = sent;
    let now = options.clock.now();
    let (outcome, class) =
        decide(result, record.attempt, record.failures, &flow.retry, &*options.jitter, now, breaker_open_until);
    log_attempt(flow, record, result, &outcome);
    let connector = flow.sink.connector();
    flow.metrics.attempt(&flow.name, connector, result.duration.as_secs_f64(), class);
    match &outcome {
        Outcome::Dead { class, .. } => flow.metrics.dead_lettered(&flow.name, connector, *class),
        Outcome::Retry { .. } => flow.metrics.retried(&flow.name, connector),
        Outcome::Delivered | Outcome::Hold { .. } => {}
    }
    let status = match result.answer {
        Answer::Status { status, .. } => Some(status),
        _ => None,
    };
    let mut report = AttemptReport {
        quota,
        keep_batch,
        id: record.id,
        owner: options.node_id.clone(),
        attempt: Attempt {
            number: record.attempt,
            started_at,
            duration_ms: u64::try_from(result.duration.as_millis()).unwrap_or(u64::MAX),
            status,
            class,
            error: class.map(|_| describe(result)),
        },
        outcome,
    };
    if class == Some(ErrorClass::Auth) && !flow.pause_on_auth {
        // A notifier refused (a revoked Slack webhook): pausing would hold
        // every later alert behind an operator action; the notice is dead-lettered.
        let reason = format!("the receiver refused the request: {}", describe(result));
        report.outcome = Outcome::Dead { class: ErrorClass::Auth, reason };
    } else if class == Some(ErrorClass::Auth) {
        let reason = format!("connector `{}` refused our credentials: {}", flow.sink.connector(), describe(result));
        if let Err(e) = journal.pause_flow(&flow.name, &reason, now).await {
            tracing::error!(flow = %flow.name, error = %e, "cannot record the flow's pause");
            // Without the pause the record would be sent again at once.
            report.outcome = Outcome::Hold { at: now.plus(options.idle_poll.max(JOURNAL_BACKOFF)) };
        }
        flow.recheck_pause.store(true, std::sync::atomic::Ordering::Release);
    }
    report
}

/// Whether a leased record may go out.
enum Ready {
    Send,
    /// Dead-letter it without sending.
    Refused((ErrorClass, String)),
    /// The lease was lost (or the journal failed) before the preparation
    /// was stored: send nothing; the record comes back when the lease expires.
    Abandon,
}

/// Makes a leased record ready to send, or says why it must not be sent.
///
/// A record prepared at intake goes as it is. One that is not (replayed
/// from the DLQ after a fix, or quarantined before) goes through the flow's
/// current keys, schema and mappings again, and the result is stored
/// *before* anything is sent: whatever goes out under the record's key is
/// in the journal, and every later attempt sends exactly that.
async fn prepare(
    flow: &FlowRuntime,
    journal: &dyn Journal,
    options: &EngineOptions,
    record: &mut LeasedRecord,
) -> Ready {
    if record.failures >= flow.retry.max_attempts {
        // Interrupted attempts (engine crashes mid-send) spent the budget:
        // a record whose sending keeps killing the engine must stop here.
        let reason =
            format!("gave up after {} transient failures; the last attempts were interrupted", record.failures);
        return Ready::Refused((ErrorClass::Interrupted, reason));
    }
    if record.prepared.is_some() {
        return Ready::Send;
    }
    let processed =
        crate::contract::process(&flow.name, &flow.pipeline, flow.jq_time_limit, record.payload.clone().into()).await;
    let fresh = match processed.result {
        Ok(t) => Prepared {
            body: t.body(),
            mapping_version: t.mapping_version,
            sink_mapping_version: t.sink_mapping_version,
        },
        Err(r) => return Ready::Refused((ErrorClass::Validation, r.reason)),
    };
    match journal.prepare(record.id, &options.node_id, record.attempt, fresh.clone()).await {
        Ok(true) => {
            record.prepared = Some(fresh);
            Ready::Send
        }
        Ok(false) => {
            tracing::warn!(flow = %flow.name, record_id = record.id, "the lease expired while the record was being mapped; another dispatcher owns it now");
            Ready::Abandon
        }
        Err(e) => {
            tracing::error!(flow = %flow.name, record_id = record.id, error = %e, "cannot store a record's mapped body; not sending it");
            Ready::Abandon
        }
    }
}

/// Dead-letters a record without sending it.
fn settle_unsent(
    flow: &FlowRuntime,
    options: &EngineOptions,
    reports: &Reports,
    record: &LeasedRecord,
    now: Timestamp,
    (class, reason): (ErrorClass, String),
) {
    tracing::warn!(flow = %flow.name, record_id = record.id, correlation_id = %record.correlation_id, class = class.as_str(), %reason, "dead-lettered without sending");
    flow.metrics.dead_lettered(&flow.name, flow.sink.connector(), class);
    let report = AttemptReport {
        quota: None,
        keep_batch: false,
        id: record.id,
        owner: options.node_id.clone(),
        attempt: Attempt {
            number: record.attempt,
            started_at: now,
            duration_ms: 0,
            status: None,
            class: Some(class),
            error: Some(format!("not sent: {reason}")),
        },
        outcome: Outcome::Dead { class, reason },
    };
    reports.hand_over(report);
}

impl Reports {
    fn hand_over(&self, report: AttemptReport) {
        let id = report.id;
        if self.0.send(report).is_err() {
            // Only if the recorder stopped, which stops the dispatcher too.
            tracing::error!(record_id = id, "the attempt recorder has stopped; this attempt is not recorded");
        }
    }
}

/// What one attempt means for the record: the outcome to journal and the
/// error class to store with the attempt (`None` when delivered).
///
/// Two kinds of transient failure do not spend the record's retry budget,
/// because they are about the partner, not the record: a 429 (the record
/// waits for `Retry-After`, or the initial backoff), and any failure after
/// which the connector's breaker is open (the record waits for the breaker).
pub fn decide(
    result: &AttemptResult,
    attempt: u32,
    failures_before: u32,
    policy: &RetryPolicy,
    jitter: &dyn Jitter,
    now: Timestamp,
    breaker_open_until: Option<Timestamp>,
) -> (Outcome, Option<ErrorClass>) {
    match classify(&result.answer, attempt > 1) {
        Verdict::Delivered => (Outcome::Delivered, None),
        Verdict::DeadLetter(class) => (Outcome::Dead { class, reason: describe(result) }, Some(class)),
        Verdict::PauseFlow => (Outcome::Hold { at: now }, Some(ErrorClass::Auth)),
        Verdict::Retry { class: ErrorClass::RateLimited, not_before } => {
            let wait = not_before.unwrap_or(policy.initial_backoff).min(MAX_RETRY_AFTER);
            (Outcome::Hold { at: now.plus(wait) }, Some(ErrorClass::RateLimited))
        }
        Verdict::Retry { class, .. } if breaker_open_until.is_some() => {
            (Outcome::Hold { at: breaker_open_until.unwrap_or(now) }, Some(class))
        }
        Verdict::Retry { class, not_before } => {
            let failures = failures_before.saturating_add(1);
            match policy.next_delay(failures, not_before, jitter) {
                Some(delay) => (Outcome::Retry { at: now.plus(delay) }, Some(class)),
                None => {
                    let reason = format!("gave up after {failures} transient failures; last: {}", describe(result));
                    (Outcome::Dead { class, reason }, Some(class))
                }
            }
        }
    }
}

/// "503 Service Unavailable: {body}" / "timeout: ..." for attempts and the DLQ.
fn describe(result: &AttemptResult) -> String {
    let head = match &result.answer {
        Answer::Status { status, .. } => format!("HTTP {status}"),
        Answer::Timeout => "timed out".to_string(),
        Answer::Connection => "connection failed".to_string(),
        Answer::Service(s) => match s {
            ServiceAnswer::Applied => "applied".to_string(),
            ServiceAnswer::Refused => "refused".to_string(),
            ServiceAnswer::Denied => "access denied".to_string(),
            ServiceAnswer::Unavailable => "service unavailable".to_string(),
        },
    };
    match &result.detail {
        Some(d) => format!("{head}: {d}"),
        None => head,
    }
}

fn log_attempt(flow: &FlowRuntime, record: &LeasedRecord, result: &AttemptResult, outcome: &Outcome) {
    let (id, corr, n) = (record.id, &record.correlation_id, record.attempt);
    let ms = result.duration.as_millis();
    match outcome {
        Outcome::Delivered => {
            tracing::debug!(flow = %flow.name, record_id = id, correlation_id = %corr, attempt = n, ms, "delivered")
        }
        Outcome::Retry { at } => {
            tracing::info!(flow = %flow.name, record_id = id, correlation_id = %corr, attempt = n, ms,
            retry_at = %at, error = %describe(result), "transient failure; will retry")
        }
        Outcome::Dead { class, reason } => {
            tracing::warn!(flow = %flow.name, record_id = id, correlation_id = %corr, attempt = n,
            class = class.as_str(), %reason, "dead-lettered")
        }
        Outcome::Hold { .. } => {
            tracing::error!(flow = %flow.name, record_id = id, correlation_id = %corr, connector = flow.sink.connector(),
            error = %describe(result),
            "auth failure: the partner refused our credentials; flow paused, records held. Fix the credentials, then run `dovetail resume {}`",
            flow.name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoJitter;
    impl Jitter for NoJitter {
        fn sample(&self) -> f64 {
            0.0
        }
    }

    fn result(answer: Answer) -> AttemptResult {
        AttemptResult {
            answer,
            duration: Duration::from_millis(5),
            detail: Some("body".into()),
            hint: Default::default(),
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            jitter: 0.5,
        }
    }

    const NOW: Timestamp = Timestamp::from_secs(1000);

    #[test]
    fn transient_failures_retry_with_backoff_until_the_budget_is_spent() {
        let r = result(Answer::Status { status: 503, retry_after: None });
        assert_eq!(
            decide(&r, 1, 0, &policy(), &NoJitter, NOW, None).0,
            Outcome::Retry { at: NOW.plus(Duration::from_secs(1)) }
        );
        assert_eq!(
            decide(&r, 1, 1, &policy(), &NoJitter, NOW, None).0,
            Outcome::Retry { at: NOW.plus(Duration::from_secs(2)) }
        );
        let (outcome, class) = decide(&r, 1, 2, &policy(), &NoJitter, NOW, None);
        assert!(
            matches!(outcome, Outcome::Dead { class: ErrorClass::Server, ref reason } if reason.starts_with("gave up after 3"))
        );
        assert_eq!(class, Some(ErrorClass::Server));
    }

    #[test]
    fn a_429_holds_the_record_for_retry_after_without_spending_its_budget() {
        let r = result(Answer::Status { status: 429, retry_after: Some(Duration::from_secs(42)) });
        let late = decide(&r, 9, 7, &policy(), &NoJitter, NOW, None);
        assert_eq!(late, (Outcome::Hold { at: NOW.plus(Duration::from_secs(42)) }, Some(ErrorClass::RateLimited)));
        let r = result(Answer::Status { status: 429, retry_after: None });
        assert_eq!(
            decide(&r, 1, 0, &policy(), &NoJitter, NOW, None).0,
            Outcome::Hold { at: NOW.plus(Duration::from_secs(1)) }
        );
    }

    #[test]
    fn failures_while_the_breaker_is_open_hold_the_record_until_it_may_close() {
        let until = NOW.plus(Duration::from_secs(30));
        let r = result(Answer::Connection);
        let held = decide(&r, 9, 99, &policy(), &NoJitter, NOW, Some(until));
        assert_eq!(held, (Outcome::Hold { at: until }, Some(ErrorClass::Connection)));
        let rejected = result(Answer::Status { status: 422, retry_after: None });
        let dead = decide(&rejected, 1, 0, &policy(), &NoJitter, NOW, Some(until)).0;
        assert!(matches!(dead, Outcome::Dead { .. }), "a refusal is still a refusal");
    }

    #[test]
    fn rejections_dead_letter_with_the_response() {
        let r = result(Answer::Status { status: 422, retry_after: None });
        let (outcome, _) = decide(&r, 1, 0, &policy(), &NoJitter, NOW, None);
        assert_eq!(outcome, Outcome::Dead { class: ErrorClass::Rejected, reason: "HTTP 422: body".into() });
    }

    #[test]
    fn a_409_after_an_earlier_attempt_is_retried() {
        let r = result(Answer::Status { status: 409, retry_after: None });
        assert_eq!(
            decide(&r, 2, 1, &policy(), &NoJitter, NOW, None).0,
            Outcome::Retry { at: NOW.plus(Duration::from_secs(2)) }
        );
        assert!(matches!(
            decide(&r, 1, 0, &policy(), &NoJitter, NOW, None).0,
            Outcome::Dead { class: ErrorClass::Rejected, .. }
        ));
    }

    #[test]
    fn auth_failures_hold_the_record() {
        let r = result(Answer::Status { status: 401, retry_after: None });
        assert_eq!(
            decide(&r, 1, 5, &policy(), &NoJitter, NOW, None),
            (Outcome::Hold { at: NOW }, Some(ErrorClass::Auth))
        );
    }

    #[test]
    fn dropped_connections_and_timeouts_retry() {
        for a in [Answer::Timeout, Answer::Connection] {
            assert!(matches!(decide(&result(a), 1, 0, &policy(), &NoJitter, NOW, None).0, Outcome::Retry { .. }));
        }
    }
}
