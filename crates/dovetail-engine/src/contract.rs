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

use dovetail_core::pipeline::{self, Keys, Pipeline, Processed, Rejection, Stage};

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
