//! Prometheus metrics, served at `/metrics` in the OpenMetrics text format.
//!
//! Events (a record received, an attempt's result) are counted where they
//! happen, in memory; levels (DLQ depth, oldest pending age, breaker state,
//! quota used) are read at scrape time from the journal and the connectors,
//! so they are true after a restart too, and so are the journal writer's own
//! counters (commits, the writes they carried, commit durations). Names
//! follow Prometheus' rules: `dovetail_` prefix, base units (seconds),
//! `_total` on counters.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use dovetail_core::clock::Timestamp;
use dovetail_core::policy::ErrorClass;
use dovetail_journal::Journal;

use crate::connector::{ConnectorRuntime, WaitReason};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabel {
    flow: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    flow: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowConnector {
    flow: String,
    connector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    flow: String,
    connector: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectorLabel {
    connector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaitLabels {
    connector: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    connector: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WindowLabels {
    connector: String,
    window: String,
}

/// The journal writer's counters, read from the journal at each scrape and
/// encoded as they are: the writer keeps them, nothing here counts.
#[derive(Debug, Default)]
struct WriterCollector(std::sync::Mutex<Option<dovetail_journal::WriterStats>>);

impl Collector for WriterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return Ok(()) };
        let counters = [
            ("journal_commits", "Transactions the journal's writer committed.", stats.commits),
            ("journal_writes", "Writes those transactions carried (group commit: writes per commit).", stats.jobs),
        ];
        for (name, help, value) in counters {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        let h = &stats.commit_seconds;
        encoder
            .encode_descriptor(
                "journal_commit_duration",
                "Time to commit one journal transaction: WAL written and synced, checkpoint when due.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count(), &h.buckets(), None)
    }
}

type FloatGauge = Gauge<f64, AtomicU64>;
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets in seconds: 1 ms to about 65 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17))
}

fn hist<L: Clone + std::hash::Hash + Eq>() -> Histograms<L> {
    Family::new_with_constructor(latency_histogram as fn() -> Histogram)
}

/// Every metric the engine exports.
pub(crate) struct Metrics {
    registry: Registry,
    received: Family<FlowLabel, Counter>,
    quarantined: Family<StageLabels, Counter>,
    duplicates: Family<FlowLabel, Counter>,
    delivered: Family<FlowConnector, Counter>,
    failures: Family<ClassLabels, Counter>,
    dead_lettered: Family<ClassLabels, Counter>,
    retries: Family<FlowConnector, Counter>,
    attempt_seconds: Histograms<FlowConnector>,
    ingest_seconds: Histograms<FlowLabel>,
    waits: Family<WaitLabels, Counter>,
    // Read at scrape time.
    pending: Family<FlowLabel, Gauge>,
    in_flight: Family<FlowLabel, Gauge>,
    dlq_depth: Family<FlowLabel, Gauge>,
    oldest_pending_age: Family<FlowLabel, FloatGauge>,
    paused: Family<FlowLabel, Gauge>,
    breaker: Family<StateLabels, Gauge>,
    pace: Family<ConnectorLabel, FloatGauge>,
    quota_used: Family<WindowLabels, Gauge>,
    quota_limit: Family<WindowLabels, Gauge>,
    writer: Arc<WriterCollector>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dovetail");
        let m = Metrics {
            received: Family::default(),
            quarantined: Family::default(),
            duplicates: Family::default(),
            delivered: Family::default(),
            failures: Family::default(),
            dead_lettered: Family::default(),
            retries: Family::default(),
            attempt_seconds: hist(),
            ingest_seconds: hist(),
            waits: Family::default(),
            pending: Family::default(),
            in_flight: Family::default(),
            dlq_depth: Family::default(),
            oldest_pending_age: Family::default(),
            paused: Family::default(),
            breaker: Family::default(),
            pace: Family::default(),
            quota_used: Family::default(),
            quota_limit: Family::default(),
            writer: Arc::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("records_received", "Records journalled at intake (duplicates excluded)", m.received.clone());
        r.register(
            "records_quarantined",
            "Records refused at intake and kept in the DLQ, by pipeline stage",
            m.quarantined.clone(),
        );
        r.register(
            "duplicate_deliveries",
            "Deliveries acknowledged as duplicates, not journalled",
            m.duplicates.clone(),
        );
        r.register("records_delivered", "Records the partner accepted", m.delivered.clone());
        r.register("attempt_failures", "Delivery attempts that failed, by error class", m.failures.clone());
        r.register(
            "records_dead_lettered",
            "Records moved to the DLQ after an attempt, by class",
            m.dead_lettered.clone(),
        );
        r.register("retries", "Attempts that failed and were scheduled again", m.retries.clone());
        r.register_with_unit(
            "attempt_duration",
            "Duration of delivery attempts, from request to answer",
            Unit::Seconds,
            m.attempt_seconds.clone(),
        );
        r.register_with_unit(
            "ingest_duration",
            "Time to verify, map and durably journal a webhook",
            Unit::Seconds,
            m.ingest_seconds.clone(),
        );
        r.register(
            "connector_waits",
            "Times a dispatcher waited before sending: breaker open, rate limit, quota spent",
            m.waits.clone(),
        );
        r.register("records_pending", "Records waiting for delivery", m.pending.clone());
        r.register("records_in_flight", "Records leased for an attempt", m.in_flight.clone());
        r.register("dlq_depth", "Records in the dead-letter queue", m.dlq_depth.clone());
        r.register_with_unit(
            "oldest_pending_age",
            "Age of the oldest pending record",
            Unit::Seconds,
            m.oldest_pending_age.clone(),
        );
        r.register("flow_paused", "1 while the flow is paused after an auth failure", m.paused.clone());
        r.register("circuit_breaker_state", "1 for the connector's current breaker state", m.breaker.clone());
        r.register("rate_limit_pace", "Current client-side pace in requests per second", m.pace.clone());
        r.register("quota_used", "Requests counted against the quota in the current window", m.quota_used.clone());
        r.register("quota_limit", "The quota of the window", m.quota_limit.clone());
        r.register_collector(Box::new(m.writer.clone()));
        Metrics { registry, ..m }
    }

    pub fn received(&self, flow: &str, ingest: std::time::Duration) {
        self.received.get_or_create(&FlowLabel { flow: flow.to_string() }).inc();
        self.ingest_seconds.get_or_create(&FlowLabel { flow: flow.to_string() }).observe(ingest.as_secs_f64());
    }

    pub fn quarantined(&self, flow: &str, stage: &str) {
        self.quarantined.get_or_create(&StageLabels { flow: flow.to_string(), stage: stage.to_string() }).inc();
    }

    pub fn duplicate(&self, flow: &str) {
        self.duplicates.get_or_create(&FlowLabel { flow: flow.to_string() }).inc();
    }

    /// One attempt's result: `class` is `None` when it delivered.
    pub fn attempt(&self, flow: &str, connector: &str, seconds: f64, class: Option<ErrorClass>) {
        let fc = FlowConnector { flow: flow.to_string(), connector: connector.to_string() };
        self.attempt_seconds.get_or_create(&fc).observe(seconds);
        match class {
            None => self.delivered.get_or_create(&fc).inc(),
            Some(c) => self
                .failures
                .get_or_create(&ClassLabels { flow: fc.flow, connector: fc.connector, class: c.as_str().to_string() })
                .inc(),
        };
    }

    pub fn dead_lettered(&self, flow: &str, connector: &str, class: ErrorClass) {
        let labels =
            ClassLabels { flow: flow.to_string(), connector: connector.to_string(), class: class.as_str().to_string() };
        self.dead_lettered.get_or_create(&labels).inc();
    }

    pub fn retried(&self, flow: &str, connector: &str) {
        self.retries.get_or_create(&FlowConnector { flow: flow.to_string(), connector: connector.to_string() }).inc();
    }

    pub fn waited(&self, connector: &str, reason: WaitReason) {
        let labels = WaitLabels { connector: connector.to_string(), reason: reason.as_str().to_string() };
        self.waits.get_or_create(&labels).inc();
    }

    /// Reads the levels and renders everything.
    pub async fn render(
        &self,
        journal: &dyn Journal,
        connectors: &[Arc<ConnectorRuntime>],
        quotas: &[(String, Option<u64>, Option<u64>)],
        now: Timestamp,
    ) -> Result<String, dovetail_journal::JournalError> {
        for c in journal.counts().await? {
            let l = FlowLabel { flow: c.flow.clone() };
            self.pending.get_or_create(&l).set(c.pending as i64);
            self.in_flight.get_or_create(&l).set(c.in_flight as i64);
            self.dlq_depth.get_or_create(&l).set(c.dead as i64);
            let age = c.oldest_pending_at.map_or(0.0, |t| now.since(t).as_secs_f64());
            self.oldest_pending_age.get_or_create(&l).set(age);
            self.paused.get_or_create(&l).set(i64::from(c.paused.is_some()));
        }
        for c in connectors {
            let h = c.health(now);
            for state in ["closed", "open", "half_open"] {
                let labels = StateLabels { connector: c.name.clone(), state: state.to_string() };
                self.breaker.get_or_create(&labels).set(i64::from(h.breaker == state));
            }
            if let Some(rate) = h.current_rate {
                self.pace.get_or_create(&ConnectorLabel { connector: c.name.clone() }).set(rate);
            }
        }
        for (connector, per_hour, per_day) in quotas {
            let used = journal.quota_used(connector, now).await?;
            for (window, limit, used) in [("hour", per_hour, used.this_hour), ("day", per_day, used.today)] {
                let Some(limit) = limit else { continue };
                let labels = WindowLabels { connector: connector.clone(), window: window.to_string() };
                self.quota_used.get_or_create(&labels).set(used as i64);
                self.quota_limit.get_or_create(&labels).set(*limit as i64);
            }
        }
        *self.writer.0.lock().unwrap_or_else(|p| p.into_inner()) = journal.writer_stats();
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        Ok(out)
    }
}
