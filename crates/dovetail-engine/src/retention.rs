//! Raw payload retention: a background job removes the payloads of records
//! that finished (delivered or discarded) longer ago than their flow's
//! `retention`. The records themselves, their keys and attempts stay;
//! dead and waiting records always keep their payloads. The same job drops
//! minute roll-ups older than [`ROLLUP_RETENTION`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use dovetail_core::clock::{Clock, Timestamp};
use dovetail_journal::Journal;

/// Records cleared per transaction.
const CHUNK: usize = 10_000;

/// How long minute roll-ups are kept: the dashboard's 7 days and a margin.
pub(crate) const ROLLUP_RETENTION: Duration = Duration::from_secs(8 * 86_400);

pub(crate) async fn run(
    flows: Vec<(String, Duration)>,
    journal: Arc<dyn Journal>,
    clock: Arc<dyn Clock>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for (flow, keep) in &flows {
            let mut purged = 0;
            loop {
                let now = clock.now();
                let before = Timestamp::from_millis(
                    now.as_millis().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX)),
                );
                match journal.purge_payloads(flow, before, now, CHUNK).await {
                    Ok(n) => {
                        purged += n;
                        if n < CHUNK as u64 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%flow, error = %e, "cannot apply payload retention; trying again later");
                        break;
                    }
                }
            }
            if purged > 0 {
                tracing::info!(%flow, purged, "removed payloads past their retention");
            }
        }
        if let Err(e) = journal.prune_minutes(clock.now().minus(ROLLUP_RETENTION)).await {
            tracing::warn!(error = %e, "cannot drop old minute roll-ups; trying again later");
        }
    }
}
