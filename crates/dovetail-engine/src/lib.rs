//! The runtime: webhook intake, one dispatcher per flow, health endpoints.
//!
//! The path of a record: [`intake`] verifies the signature, journals the
//! record (answering only once it is durable) and wakes the flow's
//! [`dispatch`]er; the dispatcher leases due records, sends each through
//! the flow's sink, asks the core's policies what the answer means, and
//! writes the attempt and the record's next state back to the journal.
//!
//! The engine holds no record state of its own: everything that matters
//! is in the journal, so a crash at any point loses nothing that was
//! acknowledged, and a restart carries on where the journal says.

mod admin;
mod alerting;
mod cdc;
mod connector;
mod contract;
mod dashboard;
mod dispatch;
mod drift;
mod files;
mod intake;
mod jetstream;
mod metrics;
mod openapi;
mod outbox;
mod poll;
mod rabbit;
mod reconnect;
mod retention;
mod server;
pub mod views;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use dovetail_connectors::http::{HttpSink, HttpSinkError, client_for};
use dovetail_connectors::oauth::TokenSource;
use dovetail_connectors::sink::Sink;
use dovetail_core::clock::{Clock, SystemClock};
use dovetail_core::config::{
    Config, ConnectorConfig, EngineConfig, Resolved, Secret, SecretRef, SecretSource, SinkConfig, SourceConfig,
};
use dovetail_core::policy::{Jitter, QuotaUsage, RandomJitter, RetryPolicy};
use dovetail_journal::Journal;

pub use dispatch::decide;

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Sink(#[from] HttpSinkError),
    #[error("flow `{flow}`: {reason}")]
    Flow { flow: String, reason: String },
    #[error("the engine stopped: {reason}")]
    Stopped { reason: String },
    #[error("cannot serve on {addr}: {source}")]
    Serve { addr: String, source: std::io::Error },
    #[error("cannot start the delivery threads: {0}")]
    Runtime(String),
}

/// The process environment as a [`SecretSource`] for `env:` references.
#[derive(Debug, Default, Clone, Copy)]
pub struct EnvSecrets;

impl SecretSource for EnvSecrets {
    fn lookup(&self, reference: &SecretRef) -> Option<Secret> {
        match reference {
            SecretRef::Env(name) => std::env::var(name).ok().map(Secret::new),
            SecretRef::Invalid { .. } => None,
        }
    }
}

/// What the engine takes from outside besides its config.
#[derive(Clone)]
pub struct EngineOptions {
    pub clock: Arc<dyn Clock>,
    pub jitter: Arc<dyn Jitter>,
    /// This process's lease owner name; unique per run.
    pub node_id: String,
    /// How often an idle dispatcher looks at the journal anyway (pauses lifted
    /// and replays made by the CLI, leases expired by another node).
    pub idle_poll: Duration,
    /// How often the engine asks the journal whether another process (the
    /// CLI's `dlq replay`, `resume`) changed it, and if so wakes every flow.
    pub journal_watch: Duration,
    /// How often background housekeeping (payload retention) runs.
    pub housekeeping: Duration,
    /// The longest a flow's jq (mappings, key expressions) may run for one
    /// record before the record is quarantined.
    pub jq_time_limit: Duration,
    /// How often the alert rules are evaluated.
    pub alert_every: Duration,
    /// The config file's folder: relative folders (file drops) are relative to it.
    pub base_dir: std::path::PathBuf,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            clock: Arc::new(SystemClock),
            jitter: Arc::new(RandomJitter),
            node_id: format!("node-{}-{:08x}", std::process::id(), fastrand_u32()),
            idle_poll: Duration::from_secs(1),
            journal_watch: Duration::from_millis(250),
            housekeeping: Duration::from_secs(600),
            jq_time_limit: contract::JQ_TIME_LIMIT,
            alert_every: Duration::from_secs(30),
            base_dir: std::path::PathBuf::from("."),
        }
    }
}

/// What a pulling source needs to journal its flow's records.
fn source_context(
    flow: &str,
    pipeline: Arc<dovetail_core::pipeline::Pipeline>,
    journal: &Arc<dyn Journal>,
    options: &EngineOptions,
    wake: Arc<Notify>,
    metrics: &Arc<metrics::Metrics>,
) -> contract::SourceContext {
    contract::SourceContext {
        flow: flow.to_string(),
        pipeline,
        jq_time_limit: options.jq_time_limit,
        journal: journal.clone(),
        clock: options.clock.clone(),
        wake,
        metrics: metrics.clone(),
    }
}

/// The journal key of the saved alert book (for `dovetail alerts`).
pub const ALERT_BOOK_KEY: &str = alerting::BOOK_KEY;

/// `https://host:port/path?q` → (`https://host:port`, `/path?q`).
fn split_url(url: &str) -> (String, String) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => (url[..after_scheme + i].to_string(), url[after_scheme + i..].to_string()),
        None => (url.to_string(), String::new()),
    }
}

fn fastrand_u32() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) as u32
}

/// Everything one flow needs at run time.
pub(crate) struct FlowRuntime {
    pub name: String,
    pub sink: Sink,
    pub retry: RetryPolicy,
    pub lease_for: Duration,
    /// Shared by every flow on the same connector: permits, pace, breaker.
    pub connector: Arc<connector::ConnectorRuntime>,
    pub wake: Arc<Notify>,
    /// An operator's action (a replay, a resume) for the dispatcher to see
    /// now; heard even while the flow is paused, when `wake` is not.
    pub nudged: Notify,
    /// Set when the flow's pause may have changed (an attempt refused for its
    /// credentials, an operator's resume), so the dispatcher re-reads it at
    /// once instead of at its next poll.
    pub recheck_pause: std::sync::atomic::AtomicBool,
    /// `ordering = "per_key"`.
    pub in_key_order: bool,
    /// Refused credentials pause the flow (false for notifiers: their notice is dead-lettered).
    pub pause_on_auth: bool,
    pub metrics: Arc<metrics::Metrics>,
    /// Bulk requests, when the sink sends many records at once.
    pub batch: Option<dovetail_core::config::BatchConfig>,
    /// Validation and mapping, run again for a record that is not prepared
    /// (replayed from the DLQ, or journalled by an older version).
    pub pipeline: Arc<dovetail_core::pipeline::Pipeline>,
    pub jq_time_limit: Duration,
}

impl FlowRuntime {
    /// Wakes the dispatcher to look again, now: at the pause and at what is due.
    pub(crate) fn nudge(&self) {
        self.recheck_pause.store(true, std::sync::atomic::Ordering::Release);
        self.nudged.notify_one();
    }
}

/// Every dispatcher by its flow's name, for the operator actions that change
/// what one should do (a replay, a resume): the flow is nudged at once rather
/// than left until its next idle poll.
#[derive(Clone, Default)]
pub(crate) struct Dispatchers(Arc<BTreeMap<String, Arc<FlowRuntime>>>);

impl Dispatchers {
    /// Nudges the named flow, or every flow for `None`.
    pub(crate) fn nudge(&self, flow: Option<&str>) {
        match flow {
            Some(name) => self.0.get(name).into_iter().for_each(|f| f.nudge()),
            None => self.0.values().for_each(|f| f.nudge()),
        }
    }

    /// Nudges every flow when another process has changed the journal, so
    /// that the CLI's replays and resumes are acted on within `every`, not
    /// left to each dispatcher's idle poll.
    async fn watch(self, journal: Arc<dyn Journal>, every: Duration, mut stop: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match journal.changed_elsewhere().await {
                Ok(true) => {
                    tracing::debug!("the journal was changed by another process; waking every flow");
                    self.nudge(None);
                }
                Ok(false) => {}
                // The dispatchers meet the same error and report it.
                Err(e) => tracing::debug!(error = %e, "cannot ask the journal whether another process changed it"),
            }
        }
    }
}

/// A started engine.
pub struct RunningEngine {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Declared after `tasks`: dropped after them.
    _delivery: DeliveryRuntime,
}

/// The runtime the dispatchers run on, apart from the one that takes
/// webhooks. Tokio has no task priorities; separate threads let the
/// operating system share the cores between acknowledging and delivering,
/// so a backlog being delivered cannot crowd out acknowledgements.
struct DeliveryRuntime(Option<tokio::runtime::Runtime>);

impl DeliveryRuntime {
    fn start(threads: usize) -> std::io::Result<DeliveryRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("dovetail-delivery")
            .enable_all()
            .build()?;
        Ok(DeliveryRuntime(Some(runtime)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("the delivery runtime lives as long as the engine").handle()
    }
}

impl Drop for DeliveryRuntime {
    fn drop(&mut self) {
        // Dropped from async code (the engine's own runtime), where a
        // blocking shutdown would panic. By then the dispatchers have
        // finished; what is left is idle connections.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// How many threads deliver records and how many take webhooks and run
/// the sources (the runtime `dovetail run` builds around the engine), for
/// this machine's cores. See [`split_cores`].
pub fn thread_split(engine: &EngineConfig) -> ThreadSplit {
    split_cores(std::thread::available_parallelism().map_or(1, |n| n.get()), engine.delivery_threads)
}

/// The cores split between the two runtimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadSplit {
    /// Webhooks, sources, the admin API and the dashboard.
    pub intake: usize,
    /// The dispatchers: leasing, sending, recording attempts.
    pub delivery: usize,
}

/// `delivery` threads (by default half the cores, at least one), and the
/// rest of the cores, at least one, for intake. The two runtimes do not
/// overlap: with two cores, two intake workers beside the delivery thread
/// and the journal's writer cost about a tenth more CPU per record than
/// one, in thread switches (README, Performance).
fn split_cores(cores: usize, delivery: Option<usize>) -> ThreadSplit {
    let delivery = delivery.unwrap_or(cores / 2).max(1);
    ThreadSplit { intake: cores.saturating_sub(delivery).max(1), delivery }
}

impl RunningEngine {
    /// Stops taking webhooks and leasing records, lets attempts in flight
    /// finish (each is bounded by its connector's timeout), then returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Runs until `signal` completes, then shuts down.
    ///
    /// Dispatchers and the server end only at shutdown. If one ends before
    /// (a panic, the listener failing), the engine stops and reports it
    /// rather than run on with a flow that silently delivers nothing: the
    /// process exits non-zero, its supervisor restarts it, and the journal
    /// says where to carry on.
    pub async fn run_until(mut self, signal: impl std::future::Future<Output = ()>) -> Result<(), EngineError> {
        tokio::select! {
            _ = signal => {
                tracing::info!("shutting down: finishing attempts in flight");
                self.shutdown().await;
                Ok(())
            }
            Some(ended) = self.tasks.join_next() => {
                let reason = match ended {
                    Err(e) if e.is_panic() => "a dispatcher or the server panicked".to_string(),
                    Err(e) => format!("a dispatcher or the server was cancelled: {e}"),
                    Ok(()) => "a dispatcher or the server stopped unexpectedly".to_string(),
                };
                tracing::error!(%reason, "stopping the engine; records are safe in the journal and resume on restart");
                self.shutdown().await;
                Err(EngineError::Stopped { reason })
            }
        }
    }
}

/// Builds every flow's runtime, binds nothing: `listener` is already bound.
pub async fn start(
    config: &Config,
    resolved: &Resolved,
    journal: Arc<dyn Journal>,
    listener: tokio::net::TcpListener,
    options: EngineOptions,
) -> Result<RunningEngine, EngineError> {
    let addr =
        listener.local_addr().map_err(|e| EngineError::Serve { addr: config.engine.listen.clone(), source: e })?;
    let delivery = DeliveryRuntime::start(thread_split(&config.engine).delivery)
        .map_err(|e| EngineError::Runtime(e.to_string()))?;
    let mut clients = BTreeMap::new();
    let mut connectors = BTreeMap::new();
    let mut token_sources = BTreeMap::new();
    let now = options.clock.now();
    for (name, c) in &config.connectors {
        if let ConnectorConfig::Http(h) = c {
            let client = client_for(name, h)?;
            // One token cache per connector: its flows share the partner's token.
            let oauth = resolved.connectors.get(name).and_then(|a| a.oauth.clone());
            token_sources
                .insert(name.clone(), oauth.map(|o| Arc::new(TokenSource::new(o, client.general.clone(), h.timeout))));
            clients.insert(name.clone(), client);
        }
        let policies = c.policies();
        let rate = policies.rate_limit.map(|r| r.limit());
        let quota = match &policies.quota {
            Some(q) => {
                // Requests sent in this hour and day by earlier runs still count.
                let used = journal.quota_used(name, now).await.unwrap_or_else(|e| {
                    tracing::warn!(connector = %name, error = %e, "cannot read the quota used so far; counting from zero");
                    Default::default()
                });
                Some((q.policy(), QuotaUsage::at(now, used.this_hour, used.today)))
            }
            None => None,
        };
        let runtime = Arc::new(connector::ConnectorRuntime::new(
            name,
            policies.max_in_flight,
            rate,
            policies.breaker.policy(),
            quota,
            now,
        ));
        // A new process starts closed and at full pace; say so, replacing
        // whatever the last run left in the journal.
        if let Err(e) = journal.set_connector_health(runtime.health(now)).await {
            tracing::warn!(connector = %name, error = %e, "cannot record the connector's health");
        }
        connectors.insert(name.clone(), runtime);
    }
    if resolved.flows.values().any(|f| f.pipeline.uses_jq()) {
        // libphonenumber's metadata and the time zones load on first use: not on a webhook's time.
        let _ = tokio::task::spawn_blocking(dovetail_core::mapping::warm_up).await;
    }
    let metrics = Arc::new(metrics::Metrics::new());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut intakes = Vec::new();
    let mut shapes = Vec::new();
    let mut dispatchers = BTreeMap::new();
    for (name, flow) in &config.flows {
        let missing =
            |what: &str| EngineError::Flow { flow: name.clone(), reason: format!("{what} is not configured") };
        let connector = flow.sink.connector();
        let policies = config.connectors.get(connector).ok_or_else(|| missing("its connector"))?.policies();
        let service_url =
            || resolved.connector_urls.get(connector).cloned().ok_or_else(|| missing("its connector's URL"));
        let mut oauth = false;
        let (sink, batch) = match &flow.sink {
            SinkConfig::Http { method, path, batch, .. } => {
                let http = config.http_connector(connector).ok_or_else(|| missing("its connector"))?;
                let auth = resolved.connectors.get(connector).cloned().unwrap_or_default();
                oauth = auth.oauth.is_some();
                let client = clients.get(connector).cloned().ok_or_else(|| missing("its connector"))?;
                let tokens = token_sources.get(connector).cloned().flatten();
                (Sink::Http(HttpSink::new(connector, http, &auth, tokens, client, method, path)?), batch.clone())
            }
            SinkConfig::Postgres(p) => {
                let sink = dovetail_connectors::postgres::PgSink::new(
                    connector,
                    service_url()?,
                    (**p).clone(),
                    policies.timeout,
                );
                (Sink::Postgres(sink), p.batch.clone())
            }
            SinkConfig::Nats { subject, .. } => {
                let sink =
                    dovetail_connectors::nats::NatsSink::new(connector, service_url()?, subject, policies.timeout);
                (Sink::Nats(sink), None)
            }
            SinkConfig::Amqp { exchange, routing_key, .. } => {
                let sink = dovetail_connectors::amqp::AmqpSink::new(
                    connector,
                    service_url()?,
                    exchange,
                    routing_key,
                    policies.timeout,
                );
                (Sink::Amqp(sink), None)
            }
        };
        let wake = Arc::new(Notify::new());
        let pipeline = resolved.flows.get(name).map(|f| f.pipeline.clone()).unwrap_or_default();
        let runtime = Arc::new(FlowRuntime {
            name: name.clone(),
            sink,
            retry: policies.retry.policy(),
            // Long enough for the slowest legal attempt, short enough that a
            // crashed node's records come back soon.
            // OAuth may add a token fetch and a second send after a 401.
            lease_for: if oauth { policies.timeout * 4 } else { policies.timeout * 2 } + Duration::from_secs(5),
            connector: connectors.get(connector).cloned().ok_or_else(|| missing("its connector"))?,
            wake: wake.clone(),
            nudged: Notify::new(),
            recheck_pause: Default::default(),
            in_key_order: flow.ordering == dovetail_core::config::Ordering::PerKey,
            pause_on_auth: true,
            batch,
            pipeline: pipeline.clone(),
            jq_time_limit: options.jq_time_limit,
            metrics: metrics.clone(),
        });
        match &flow.source {
            SourceConfig::Webhook { path, .. } => {
                let verifier = resolved.flows.get(name).and_then(|f| f.verifier.clone());
                let shape = Arc::new(drift::FlowShape::load(name, journal.as_ref()).await);
                shapes.push(shape.clone());
                intakes.push(intake::Intake {
                    shape,
                    flow: name.clone(),
                    path: path.clone(),
                    verifier,
                    pipeline,
                    jq_time_limit: options.jq_time_limit,
                    metrics: metrics.clone(),
                    journal: journal.clone(),
                    clock: options.clock.clone(),
                    wake,
                });
            }
            SourceConfig::PostgresOutbox(o) => {
                let url = resolved.source_urls.get(name).cloned().ok_or_else(|| EngineError::Flow {
                    flow: name.clone(),
                    reason: "its outbox database URL is not resolved".into(),
                })?;
                let outbox = outbox::Outbox {
                    ctx: source_context(name, pipeline, &journal, &options, wake, &metrics),
                    config: (**o).clone(),
                    url,
                };
                tasks.spawn(outbox::run(Arc::new(outbox), shutdown_rx.clone()));
            }
            SourceConfig::PostgresCdc(c) => {
                let url = resolved.source_urls.get(name).cloned().ok_or_else(|| EngineError::Flow {
                    flow: name.clone(),
                    reason: "its database URL is not resolved".into(),
                })?;
                let cdc = cdc::Cdc {
                    ctx: source_context(name, pipeline, &journal, &options, wake, &metrics),
                    config: (**c).clone(),
                    url,
                };
                tasks.spawn(cdc::run(Arc::new(cdc), shutdown_rx.clone()));
            }
            SourceConfig::Nats(n) => {
                let url = resolved
                    .connector_urls
                    .get(&n.connector)
                    .cloned()
                    .ok_or_else(|| missing("its source's connector"))?;
                let source = jetstream::NatsSource {
                    ctx: source_context(name, pipeline, &journal, &options, wake, &metrics),
                    config: (**n).clone(),
                    url,
                };
                tasks.spawn(jetstream::run(Arc::new(source), shutdown_rx.clone()));
            }
            SourceConfig::Amqp(a) => {
                let url = resolved
                    .connector_urls
                    .get(&a.connector)
                    .cloned()
                    .ok_or_else(|| missing("its source's connector"))?;
                let source = rabbit::AmqpSource {
                    ctx: source_context(name, pipeline, &journal, &options, wake, &metrics),
                    config: (**a).clone(),
                    url,
                };
                tasks.spawn(rabbit::run(Arc::new(source), shutdown_rx.clone()));
            }
            SourceConfig::Files(f) => {
                let source = files::FileSource {
                    ctx: source_context(name, pipeline, &journal, &options, wake, &metrics),
                    seen: Default::default(),
                    dir: options.base_dir.join(&f.dir),
                    archive: options.base_dir.join(&f.archive),
                    failed: options.base_dir.join(&f.failed),
                    config: (**f).clone(),
                };
                tasks.spawn(files::run(Arc::new(source), shutdown_rx.clone()));
            }
            SourceConfig::Poll(p) => {
                let missing = || EngineError::Flow {
                    flow: name.clone(),
                    reason: "its source's connector is not configured".into(),
                };
                let http = config.http_connector(&p.connector).ok_or_else(missing)?;
                let auth = resolved.connectors.get(&p.connector).cloned().unwrap_or_default();
                let client = clients.get(&p.connector).cloned().ok_or_else(missing)?;
                let tokens = token_sources.get(&p.connector).cloned().flatten();
                let poller = poll::Poller {
                    ctx: source_context(name, pipeline, &journal, &options, wake, &metrics),
                    config: (**p).clone(),
                    sink: HttpSink::new(&p.connector, http, &auth, tokens, client, "GET", &p.path)?,
                    connector: connectors.get(&p.connector).cloned().ok_or_else(missing)?,
                };
                tasks.spawn(poll::run(Arc::new(poller), shutdown_rx.clone()));
            }
        }
        if let Some(p) = journal.pause_of(name).await.ok().flatten() {
            tracing::warn!(flow = %name, since = %p.since, reason = %p.reason,
                "flow is paused; its records are held. After fixing the cause run `dovetail resume {name}`");
        }
        dispatchers.insert(runtime.name.clone(), runtime.clone());
        tasks
            .spawn_on(dispatch::run(runtime, journal.clone(), options.clone(), shutdown_rx.clone()), delivery.handle());
    }
    tasks.spawn(drift::run(shapes, journal.clone(), options.clock.clone(), shutdown_rx.clone()));
    let mut notifiers = Vec::new();
    for (name, n) in &config.notify {
        let Some(url) = resolved.notify.get(name) else { continue };
        let flow = format!("{}{name}", alerting::NOTIFY_PREFIX);
        let (origin, path) = split_url(url.expose());
        let http: dovetail_core::config::HttpConnector =
            serde_json::from_value(serde_json::json!({ "base_url": origin }))
                .map_err(|e| EngineError::Flow { flow: flow.clone(), reason: e.to_string() })?;
        let client = client_for(&flow, &http)?;
        let sink = HttpSink::new(&flow, &http, &Default::default(), None, client, "POST", &path)?;
        let connector = Arc::new(connector::ConnectorRuntime::new(
            &flow,
            http.max_in_flight,
            None,
            http.breaker.policy(),
            None,
            now,
        ));
        let wake = Arc::new(Notify::new());
        let runtime = Arc::new(FlowRuntime {
            name: flow,
            sink: Sink::Http(sink),
            retry: http.retry.policy(),
            lease_for: http.timeout * 2 + Duration::from_secs(5),
            connector,
            wake: wake.clone(),
            nudged: Notify::new(),
            recheck_pause: Default::default(),
            in_key_order: false,
            pause_on_auth: false,
            batch: None,
            pipeline: Default::default(),
            jq_time_limit: options.jq_time_limit,
            metrics: metrics.clone(),
        });
        dispatchers.insert(runtime.name.clone(), runtime.clone());
        tasks
            .spawn_on(dispatch::run(runtime, journal.clone(), options.clone(), shutdown_rx.clone()), delivery.handle());
        notifiers.push(alerting::Notifier { name: name.clone(), format: n.format, min_severity: n.min_severity, wake });
    }
    let dispatchers = Dispatchers(Arc::new(dispatchers));
    tasks.spawn(dispatchers.clone().watch(journal.clone(), options.journal_watch, shutdown_rx.clone()));
    let saved = alerting::load(journal.as_ref(), now).await;
    let alerting = Arc::new(alerting::Alerting::new(config, notifiers, saved));
    tasks.spawn(alerting::run(
        alerting.clone(),
        journal.clone(),
        options.clock.clone(),
        options.alert_every,
        shutdown_rx.clone(),
    ));
    let retention = config.flows.iter().map(|(name, f)| (name.clone(), f.retention)).collect();
    tasks.spawn(retention::run(
        retention,
        journal.clone(),
        options.clock.clone(),
        options.housekeeping,
        shutdown_rx.clone(),
    ));
    let quotas = config
        .connectors
        .iter()
        .filter_map(|(name, c)| c.policies().quota.map(|q| (name.clone(), q.per_hour, q.per_day)))
        .collect();
    let scrape = server::Scrape {
        metrics,
        journal: journal.clone(),
        connectors: connectors.values().cloned().collect(),
        quotas,
        clock: options.clock.clone(),
        token: resolved.admin_token.clone(),
    };
    let shared_config = Arc::new(config.clone());
    let dashboard = dashboard::Dashboard {
        config: shared_config.clone(),
        journal: journal.clone(),
        clock: options.clock.clone(),
        alerts: Arc::new(move || alerting.active()),
        token: resolved.admin_token.clone(),
    };
    let admin = admin::router(admin::Admin {
        config: shared_config,
        journal: journal.clone(),
        clock: options.clock.clone(),
        token: resolved.admin_token.clone(),
        dispatchers,
    })
    .merge(axum::Router::new().route("/", axum::routing::get(dashboard::page)).with_state(Arc::new(dashboard)));
    let app = server::router(intakes, journal.clone(), scrape, admin, config.engine.max_body.0);
    let mut stop = shutdown_rx.clone();
    tasks.spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "the HTTP server stopped");
        }
    });
    tracing::info!(%addr, flows = config.flows.len(), node = %options.node_id, "engine started");
    Ok(RunningEngine { addr, shutdown, tasks, _delivery: delivery })
}

#[cfg(test)]
mod tests {
    use super::{ThreadSplit, split_cores};

    #[test]
    fn delivery_takes_half_the_cores_and_intake_the_rest() {
        let split = |cores, delivery| {
            let ThreadSplit { intake, delivery } = split_cores(cores, delivery);
            (intake, delivery)
        };
        assert_eq!(split(1, None), (1, 1));
        assert_eq!(split(2, None), (1, 1));
        assert_eq!(split(3, None), (2, 1));
        assert_eq!(split(8, None), (4, 4));
        // Set by the operator: intake keeps at least one thread.
        assert_eq!(split(2, Some(2)), (1, 2));
        assert_eq!(split(8, Some(2)), (6, 2));
        assert_eq!(split(4, Some(16)), (1, 16));
    }
}
