//! Schema drift at run time: each flow's learned payload shape, fed by
//! intake, kept in the journal across restarts, with drift events logged
//! and recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use dovetail_core::clock::{Clock, Timestamp};
use dovetail_core::shape::{DriftEvent, FieldList, Shape};
use dovetail_journal::Journal;

/// How often removed fields are looked for and the shape saved.
const EVERY: Duration = Duration::from_secs(5);

pub(crate) struct FlowShape {
    pub flow: String,
    shape: Mutex<Shape>,
    dirty: AtomicBool,
}

impl FlowShape {
    /// The shape the journal kept for `flow`, or a new one.
    pub async fn load(flow: &str, journal: &dyn Journal) -> FlowShape {
        let shape = match journal.load_shape(flow).await {
            Ok(Some(text)) => serde_json::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!(%flow, error = %e, "the stored payload shape is unreadable; learning it again");
                Shape::default()
            }),
            Ok(None) => Shape::default(),
            Err(e) => {
                tracing::warn!(%flow, error = %e, "cannot read the stored payload shape; learning it again");
                Shape::default()
            }
        };
        FlowShape { flow: flow.to_string(), shape: Mutex::new(shape), dirty: AtomicBool::new(false) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shape> {
        self.shape.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Learns an accepted record from its fields; records and logs what is new.
    pub async fn learn(&self, fields: &FieldList, record_id: i64, now: Timestamp, journal: &dyn Journal) {
        let events = self.lock().learn_list(fields, record_id, now);
        self.dirty.store(true, Ordering::Relaxed);
        self.report(events, journal).await;
    }

    async fn report(&self, events: Vec<DriftEvent>, journal: &dyn Journal) {
        if events.is_empty() {
            return;
        }
        for e in &events {
            tracing::warn!(flow = %self.flow, kind = e.kind.as_str(), path = %e.path, json_type = e.json_type.as_str(),
                example_record_id = e.example_record_id, "schema drift");
        }
        if let Err(e) = journal.record_drift(&self.flow, events).await {
            tracing::error!(flow = %self.flow, error = %e, "cannot record schema drift");
        }
    }

    async fn tick(&self, journal: &dyn Journal, now: Timestamp) {
        let removed = self.lock().removed(now);
        self.report(removed, journal).await;
        if self.dirty.swap(false, Ordering::Relaxed) {
            let text = serde_json::to_string(&*self.lock()).unwrap_or_default();
            if let Err(e) = journal.save_shape(&self.flow, text, now).await {
                self.dirty.store(true, Ordering::Relaxed);
                tracing::warn!(flow = %self.flow, error = %e, "cannot save the payload shape");
            }
        }
    }
}

/// Looks for removed fields and saves shapes until shutdown, and once more then.
pub(crate) async fn run(
    shapes: Vec<Arc<FlowShape>>,
    journal: Arc<dyn Journal>,
    clock: Arc<dyn Clock>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(EVERY) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        for s in &shapes {
            s.tick(journal.as_ref(), clock.now()).await;
        }
        if stopping {
            return;
        }
    }
}
