//! Running a flow's pipeline (keys, schema, mappings) for one record.
//!
//! A pipeline without jq is cheap and runs where it is called. One with jq
//! runs on tokio's blocking pool, so a slow or looping program cannot stall
//! the async workers that serve webhooks, health checks and dispatchers;
//! past its time limit ([`JQ_TIME_LIMIT`] by default) the record is refused (quarantined) and the
//! engine goes on. jaq cannot be interrupted, so a program that loops for
//! ever keeps one blocking thread busy until the engine restarts: the log
//! says so.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use dovetail_core::clock::Timestamp;
use dovetail_core::ids;
use dovetail_core::pipeline::{self, Keys, Pipeline, Processed, Rejection, Stage};
use dovetail_core::policy::ErrorClass;
use dovetail_journal::{NewRecord, Prepared};

/// The record to journal for `raw` after the pipeline ran: prepared (raw
/// bytes plus mapped body and versions), or quarantined with the stage and
/// the reason. An empty delivery id counts as none (else every later empty
/// one would be a "duplicate"); without one, the flow's `idempotency_key`
/// names the record.
pub(crate) fn new_record(
    flow: &str,
    processed: Processed,
    delivery_id: Option<String>,
    correlation_id: &str,
    content_type: Option<&str>,
    raw: Vec<u8>,
    now: Timestamp,
) -> (NewRecord, Option<Rejection>) {
    let delivery_id = delivery_id.filter(|id| !id.trim().is_empty()).or(processed.keys.dedup);
    let (prepared, rejection) = match processed.result {
        Ok(t) => (
            Some(Prepared {
                body: t.body(),
                mapping_version: t.mapping_version,
                sink_mapping_version: t.sink_mapping_version,
            }),
            None,
        ),
        Err(r) => (None, Some(r)),
    };
    let record = NewRecord {
        flow: flow.to_string(),
        external_key: processed.keys.external,
        idempotency_key: ids::idempotency_key(flow, delivery_id.as_deref()),
        delivery_id,
        correlation_id: correlation_id.to_string(),
        content_type: content_type.map(str::to_string),
        payload: raw,
        received_at: now,
        quarantine: rejection.as_ref().map(|r| (ErrorClass::Validation, r.reason.clone())),
        prepared,
    };
    (record, rejection)
}

/// The longest a pipeline with jq may take for one record, by default.
pub(crate) const JQ_TIME_LIMIT: Duration = Duration::from_secs(5);

/// Runs every stage of `pipeline` on `raw`.
pub(crate) async fn process(flow: &str, pipeline: &Arc<Pipeline>, limit: Duration, raw: Bytes) -> Processed {
    if !pipeline.uses_jq() {
        return pipeline.run(&raw);
    }
    let (p, bytes) = (pipeline.clone(), raw.clone());
    let job = tokio::task::spawn_blocking(move || p.run(&bytes));
    let reason = match tokio::time::timeout(limit, job).await {
        Ok(Ok(processed)) => return processed,
        Ok(Err(e)) => format!("the mapping failed inside the jq engine: {e}"),
        Err(_) => {
            tracing::error!(
                flow,
                ?limit,
                "a jq program ran past its time limit; the record is quarantined, and if the program loops it keeps a thread busy until the engine restarts"
            );
            format!("the mapping did not finish within {limit:?}; check the program for a loop")
        }
    };
    Processed {
        input: pipeline::parse(&raw).ok(),
        keys: Keys::default(),
        result: Err(Rejection { stage: Stage::Mapping, reason }),
    }
}

/// What a pulling source (a poller, a file drop) needs to journal records
/// for its flow.
pub(crate) struct SourceContext {
    pub flow: String,
    pub pipeline: Arc<Pipeline>,
    pub jq_time_limit: Duration,
    pub journal: Arc<dyn dovetail_journal::Journal>,
    pub clock: Arc<dyn dovetail_core::clock::Clock>,
    /// The flow's dispatcher.
    pub wake: Arc<tokio::sync::Notify>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl SourceContext {
    /// Sleeps until `schedule`'s next run; `false` when the engine stops
    /// first (a schedule that never fires again waits for the stop).
    pub async fn wait_for_next(
        &self,
        schedule: &dovetail_core::schedule::Schedule,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        let now = self.clock.now();
        let Some(next) = schedule.next_after(now) else {
            tracing::warn!(flow = %self.flow, %schedule, "the schedule never fires again; the source idles");
            let _ = stop.wait_for(|s| *s).await;
            return false;
        };
        tokio::select! {
            _ = tokio::time::sleep(next.since(now)) => true,
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    /// Runs the flow's pipeline on one record's raw bytes.
    pub async fn process(&self, raw: &[u8]) -> Processed {
        process(&self.flow, &self.pipeline, self.jq_time_limit, Bytes::copy_from_slice(raw)).await
    }

    /// Journals a processed record under `delivery_id` and counts it.
    pub async fn journal(
        &self,
        processed: Processed,
        delivery_id: String,
        raw: Vec<u8>,
        started: std::time::Instant,
    ) -> Result<dovetail_journal::Ingested, dovetail_journal::JournalError> {
        let stage = processed.result.as_ref().err().map(|r| r.stage.as_str());
        let (record, _) = new_record(
            &self.flow,
            processed,
            Some(delivery_id),
            &ids::new_correlation_id(),
            Some("application/json"),
            raw,
            self.clock.now(),
        );
        let ingested = self.journal.ingest(record).await?;
        match ingested {
            dovetail_journal::Ingested::New(_) => {
                self.metrics.received(&self.flow, started.elapsed());
                if let Some(stage) = stage {
                    self.metrics.quarantined(&self.flow, stage);
                }
            }
            dovetail_journal::Ingested::Duplicate(_) => self.metrics.duplicate(&self.flow),
        }
        Ok(ingested)
    }
}
