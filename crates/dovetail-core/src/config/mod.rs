//! The configuration model: one TOML file declares the engine, its
//! connectors and its flows.
//!
//! Loading happens in three steps, each with errors that name the file, the
//! line, the key and how to fix it:
//! 1. [`load`]: TOML syntax and shape (unknown keys, wrong types, bad durations);
//! 2. [`Config::check`]: meaning (a sink naming a missing connector, two flows
//!    on one webhook path, a retry policy that cannot work);
//! 3. [`Config::resolve`]: secrets (`env:NAME`) looked up through a
//!    [`SecretSource`], and signature keys parsed.
//!
//! Secrets are never written inline: every secret field is a [`SecretRef`].

mod check;
mod files;
mod load;
mod values;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

pub use check::{Resolved, ResolvedAuth, ResolvedFlow, ResolvedOAuth, SecretSource};
pub use files::ReadFile;
pub use load::{ConfigError, ConfigErrors, Loaded, Severity, load, render_errors};
pub use values::{ByteSize, Secret, SecretRef};

use crate::policy::RetryPolicy;
use crate::signature::Scheme;

/// The whole file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub connectors: BTreeMap<String, ConnectorConfig>,
    #[serde(default)]
    pub flows: BTreeMap<String, FlowConfig>,
    /// Canonical models, named entity schemas that flows map into.
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    /// Alert rules for every flow (each flow may override them with its own `alerts`).
    #[serde(default)]
    pub alerts: crate::alert::AlertRules,
    /// Where alert notices go besides the log.
    #[serde(default)]
    pub notify: BTreeMap<String, NotifyConfig>,
}

/// `[notify.NAME]`: a webhook that receives alert notices, delivered like
/// any record (journalled, retried with backoff, dead-lettered).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// `https://...`, or `env:NAME` when the URL itself is a secret (a Slack
    /// incoming-webhook URL is).
    pub url: String,
    /// `json` (Dovetail's generic body) or `slack` (Slack-compatible).
    #[serde(default)]
    pub format: NotifyFormat,
    /// Notices below this severity are only logged.
    #[serde(default = "default_min_severity")]
    pub min_severity: crate::alert::Severity,
}

fn default_min_severity() -> crate::alert::Severity {
    crate::alert::Severity::Warning
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    #[default]
    Json,
    Slack,
}

/// `[models.NAME]`: a canonical entity (an Order, a Customer) declared once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A JSON Schema (2020-12) file, relative to this config file.
    pub schema: String,
    /// Example records of the model (JSON or JSON Lines files) that `dovetail check` validates.
    #[serde(default)]
    pub samples: Vec<String>,
}

/// `mapping = { file = "mappings/order.jq", version = 3 }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// A jq program, relative to this config file.
    pub file: String,
    /// Bumped by the operator whenever the program changes; each record keeps the version that mapped it.
    pub version: u32,
}

/// `[engine]`: where the journal lives and where the engine listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// `sqlite://PATH` (relative to the config file's folder).
    #[serde(default = "default_store")]
    pub store: String,
    /// Address of the webhook intake, health endpoints and admin API.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Largest accepted webhook body; larger requests get 413.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// The bearer token the admin API (`/api/v1`) and the dashboard's
    /// actions require, as `env:NAME`. Without it the API is read-only.
    #[serde(default)]
    pub admin_token: Option<SecretRef>,
    /// Threads for delivery (the dispatchers and their requests), apart
    /// from the ones that take webhooks, so that delivering a backlog
    /// cannot slow acknowledgements down. Default: half the cores, at least 1.
    #[serde(default)]
    pub delivery_threads: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            store: default_store(),
            listen: default_listen(),
            max_body: default_max_body(),
            admin_token: None,
            delivery_threads: None,
        }
    }
}

fn default_store() -> String {
    "sqlite://dovetail.db".to_string()
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_string()
}

fn default_max_body() -> ByteSize {
    ByteSize(1024 * 1024)
}

/// `[connectors.NAME]`: a named external system.
// Read once at start-up, a handful per config: the size of the HTTP variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConnectorConfig {
    Http(HttpConnector),
    /// A PostgreSQL database, for the `postgres` (upsert) sink.
    Postgres(ServiceConnector),
    /// A NATS server with JetStream, for `nats` sources and sinks.
    Nats(ServiceConnector),
    /// A RabbitMQ broker (AMQP 0-9-1), for `amqp` sources and sinks.
    Amqp(ServiceConnector),
}

/// A database or broker reached by URL: `postgres://`, `nats://`, `amqp://`.
/// The URL is written as `env:NAME` when it holds a password.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConnector {
    pub url: String,
    /// The longest one write (a statement, a publish and its confirm) may take.
    #[serde(default = "default_timeout", with = "values::duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Most writes outstanding at once (connections, for PostgreSQL).
    #[serde(default = "default_service_in_flight")]
    pub max_in_flight: usize,
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    #[serde(default)]
    pub breaker: BreakerConfig,
}

fn default_service_in_flight() -> usize {
    4
}

/// The policies every connector kind has, whatever it talks to.
#[derive(Debug, Clone, Copy)]
pub struct ConnectorPolicies<'a> {
    pub timeout: Duration,
    pub retry: &'a RetryConfig,
    pub max_in_flight: usize,
    pub rate_limit: Option<RateLimitConfig>,
    pub breaker: &'a BreakerConfig,
    pub quota: Option<QuotaConfig>,
}

impl ConnectorConfig {
    /// `http`, `postgres`, `nats` or `amqp`, as written in `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectorConfig::Http(_) => "http",
            ConnectorConfig::Postgres(_) => "postgres",
            ConnectorConfig::Nats(_) => "nats",
            ConnectorConfig::Amqp(_) => "amqp",
        }
    }

    pub fn policies(&self) -> ConnectorPolicies<'_> {
        match self {
            ConnectorConfig::Http(h) => ConnectorPolicies {
                timeout: h.timeout,
                retry: &h.retry,
                max_in_flight: h.max_in_flight,
                rate_limit: h.rate_limit,
                breaker: &h.breaker,
                quota: h.quota,
            },
            ConnectorConfig::Postgres(s) | ConnectorConfig::Nats(s) | ConnectorConfig::Amqp(s) => ConnectorPolicies {
                timeout: s.timeout,
                retry: &s.retry,
                max_in_flight: s.max_in_flight,
                rate_limit: s.rate_limit,
                breaker: &s.breaker,
                quota: None,
            },
        }
    }

    /// The URL (or `env:NAME`) of a database or broker connector.
    pub fn service(&self) -> Option<&ServiceConnector> {
        match self {
            ConnectorConfig::Http(_) => None,
            ConnectorConfig::Postgres(s) | ConnectorConfig::Nats(s) | ConnectorConfig::Amqp(s) => Some(s),
        }
    }

    /// Where the connector points, for display: the base URL, or the
    /// service URL without its credentials.
    pub fn display_target(&self) -> String {
        match self {
            ConnectorConfig::Http(h) => h.base_url.clone(),
            ConnectorConfig::Postgres(s) | ConnectorConfig::Nats(s) | ConnectorConfig::Amqp(s) => {
                without_credentials(&s.url)
            }
        }
    }
}

/// `scheme://user:pass@host/x` → `scheme://host/x`; `env:NAME` as it is.
pub fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, None), |(a, p)| (a, Some(p)));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            // A query may carry `password=`: it is left out.
            let path = path.map(|p| p.split('?').next().unwrap_or_default());
            match path {
                Some(p) => format!("{scheme}://{host}/{p}"),
                None => format!("{scheme}://{host}"),
            }
        }
        None => url.to_string(),
    }
}

/// An HTTP partner API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConnector {
    /// `https://api.example.com`; sink paths are appended to it.
    pub base_url: String,
    /// A pinned API version sent as a header on every request.
    #[serde(default)]
    pub api_version: Option<ApiVersion>,
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Whole-request timeout, from connect to the last byte of the answer.
    #[serde(default = "default_timeout", with = "values::duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Extra static headers sent on every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Most requests outstanding at once to this partner.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Client-side pace, set below the partner's documented limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// The circuit breaker; on by default.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Requests allowed per UTC day and/or hour.
    #[serde(default)]
    pub quota: Option<QuotaConfig>,
}

/// `quota = { per_day = 10000, per_hour = 1000, alert_at = 0.75 }`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    #[serde(default)]
    pub per_day: Option<u64>,
    #[serde(default)]
    pub per_hour: Option<u64>,
    #[serde(default = "default_alert_at")]
    pub alert_at: f64,
}

fn default_alert_at() -> f64 {
    0.75
}

impl QuotaConfig {
    pub fn policy(&self) -> crate::policy::QuotaPolicy {
        crate::policy::QuotaPolicy { per_day: self.per_day, per_hour: self.per_hour, alert_at: self.alert_at }
    }
}

/// `rate_limit = { requests_per_second = 45, burst = 10 }`; `burst` defaults to one second's worth.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    #[serde(default)]
    pub burst: Option<u32>,
}

impl RateLimitConfig {
    pub fn limit(&self) -> crate::policy::RateLimit {
        let burst =
            self.burst.unwrap_or_else(|| self.requests_per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
        crate::policy::RateLimit { requests_per_second: self.requests_per_second, burst }
    }
}

/// `breaker = { failure_ratio, min_calls, consecutive_failures, window, open_for, max_open_for }`;
/// any may be left out. `enabled = false` turns it off.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    pub enabled: bool,
    pub failure_ratio: f64,
    pub min_calls: u32,
    pub consecutive_failures: u32,
    #[serde(with = "values::duration")]
    pub window: Duration,
    #[serde(with = "values::duration")]
    pub open_for: Duration,
    #[serde(with = "values::duration")]
    pub max_open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        let p = crate::policy::BreakerPolicy::default();
        BreakerConfig {
            enabled: true,
            failure_ratio: p.failure_ratio,
            min_calls: p.min_calls,
            consecutive_failures: p.consecutive_failures,
            window: p.window,
            open_for: p.open_for,
            max_open_for: p.max_open_for,
        }
    }
}

impl BreakerConfig {
    /// The policy, or `None` when the breaker is turned off.
    pub fn policy(&self) -> Option<crate::policy::BreakerPolicy> {
        self.enabled.then_some(crate::policy::BreakerPolicy {
            failure_ratio: self.failure_ratio,
            min_calls: self.min_calls,
            consecutive_failures: self.consecutive_failures,
            window: self.window,
            open_for: self.open_for,
            max_open_for: self.max_open_for,
        })
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_in_flight() -> usize {
    16
}

/// `api_version = { header = "Api-Version", value = "2026-01-01" }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiVersion {
    pub header: String,
    pub value: String,
}

/// `auth = { type = "bearer", token = "env:TOKEN" }`,
/// `auth = { type = "basic", username = "me", password = "env:PASSWORD" }`,
/// `auth = { type = "api_key", header = "X-Api-Key", key = "env:KEY" }` or
/// `auth = { type = "api_key", query = "api_key", key = "env:KEY" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    Bearer {
        token: SecretRef,
    },
    Basic {
        username: String,
        password: SecretRef,
    },
    ApiKey {
        key: SecretRef,
        #[serde(default)]
        header: Option<String>,
        #[serde(default)]
        query: Option<String>,
    },
    /// OAuth 2.0 client credentials grant (RFC 6749 §4.4).
    Oauth2ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: SecretRef,
        #[serde(default)]
        scope: Option<String>,
    },
    /// OAuth 2.0 refresh token grant (RFC 6749 §6); a rotated refresh token
    /// is kept in memory for the life of the process.
    Oauth2RefreshToken {
        token_url: String,
        client_id: String,
        #[serde(default)]
        client_secret: Option<SecretRef>,
        refresh_token: SecretRef,
        #[serde(default)]
        scope: Option<String>,
    },
}

/// `retry = { max_attempts, initial_backoff, max_backoff, jitter }`; any may be left out.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    pub max_attempts: u32,
    #[serde(with = "values::duration")]
    pub initial_backoff: Duration,
    #[serde(with = "values::duration")]
    pub max_backoff: Duration,
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let p = RetryPolicy::default();
        RetryConfig {
            max_attempts: p.max_attempts,
            initial_backoff: p.initial_backoff,
            max_backoff: p.max_backoff,
            jitter: p.jitter,
        }
    }
}

impl RetryConfig {
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            jitter: self.jitter,
        }
    }
}

/// `[flows.NAME]`: source → sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    pub source: SourceConfig,
    pub sink: SinkConfig,
    /// A JSON Schema (2020-12) file, relative to this config file: records
    /// that do not match are quarantined at intake.
    #[serde(default)]
    pub schema: Option<String>,
    /// How long the raw payload of a delivered or discarded record is kept.
    /// Dead and waiting records always keep theirs.
    #[serde(default = "default_retention", with = "values::duration")]
    pub retention: Duration,
    /// The record's stable external key, a jq expression on the payload.
    #[serde(default)]
    pub key: Option<crate::keypath::KeyExpr>,
    /// A jq expression giving the record's de-duplication key, used when
    /// the source sends no delivery id: a second record with the same key
    /// is acknowledged and not journalled again.
    #[serde(default)]
    pub idempotency_key: Option<crate::keypath::KeyExpr>,
    /// Source shape → canonical model (or straight to the target's shape).
    #[serde(default)]
    pub mapping: Option<MappingConfig>,
    /// The canonical model (`[models.NAME]`) the mapping's output must match.
    #[serde(default)]
    pub model: Option<String>,
    /// Example inbound records (JSON or JSON Lines files) that `dovetail check`
    /// runs through validation and mapping.
    #[serde(default)]
    pub samples: Vec<String>,
    /// This flow's alert thresholds over the engine-wide `[alerts]`.
    #[serde(default)]
    pub alerts: crate::alert::AlertOverrides,
    /// `"per_key"`: records with the same key are delivered one at a time, in
    /// order of arrival; different keys in parallel.
    #[serde(default)]
    pub ordering: Ordering,
}

fn default_retention() -> Duration {
    Duration::from_secs(30 * 86_400)
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// As fast as possible; no order between records.
    #[default]
    None,
    PerKey,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Records pushed to `path` on the engine's listen address.
    Webhook {
        path: String,
        #[serde(default)]
        signature: Option<SignatureConfig>,
    },
    /// Files dropped into a folder (CSV or JSON Lines), each processed once
    /// and moved to `archive` (or `failed`), on a schedule.
    Files(Box<FilesConfig>),
    /// Rows of a PostgreSQL outbox table (the transactional outbox
    /// pattern), taken with `FOR UPDATE SKIP LOCKED` and marked sent once
    /// journalled.
    PostgresOutbox(Box<OutboxConfig>),
    /// Records fetched on a schedule from `connector`'s base URL + `path`
    /// ("what changed since I last asked?"), through the connector's auth,
    /// rate limit and breaker.
    Poll(Box<PollConfig>),
    /// Row changes of chosen tables, decoded from PostgreSQL's logical
    /// replication (the `pgoutput` plugin) through a replication slot that
    /// advances only past changes already journalled.
    PostgresCdc(Box<CdcConfig>),
    /// Messages of a NATS JetStream stream, read by a durable pull
    /// consumer and acknowledged only once journalled.
    Nats(Box<NatsSourceConfig>),
    /// Messages of a RabbitMQ queue, acknowledged only once journalled.
    Amqp(Box<AmqpSourceConfig>),
}

/// `source = { type = "postgres_cdc", url, slot, publication, tables, schedule, batch }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcConfig {
    /// `postgres://user@host/db`, or `env:NAME` when it holds a password.
    /// The database needs `wal_level = logical`.
    pub url: String,
    /// The logical replication slot (created with `pgoutput` if missing).
    pub slot: String,
    /// The publication (created `FOR TABLE tables` if missing).
    pub publication: String,
    /// `schema.table` or `table` names the publication covers.
    #[serde(default)]
    pub tables: Vec<String>,
    /// How often the slot is read.
    pub schedule: crate::schedule::Schedule,
    /// Most replication messages read per round trip (begin, relation and
    /// commit messages count too); a transaction is never split, so one
    /// large transaction comes back whole.
    #[serde(default = "default_outbox_batch")]
    pub batch: u32,
}

/// `source = { type = "nats", connector, stream, consumer, subject, ack_wait }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceConfig {
    pub connector: String,
    /// The JetStream stream to read.
    pub stream: String,
    /// The durable consumer's name (created if missing), so a restart goes
    /// on where the last run acknowledged.
    pub consumer: String,
    /// Only subjects matching this filter (default: the whole stream).
    #[serde(default)]
    pub subject: Option<String>,
    /// How long the server waits for an acknowledgement before redelivering.
    #[serde(default = "default_ack_wait", with = "values::duration")]
    pub ack_wait: Duration,
}

fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}

/// `source = { type = "amqp", connector, queue, prefetch }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSourceConfig {
    pub connector: String,
    /// The queue to consume (it must exist: Dovetail does not declare topology).
    pub queue: String,
    /// Most unacknowledged messages the broker hands over at once.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
}

fn default_prefetch() -> u16 {
    100
}

/// `source = { type = "poll", connector, path, schedule, records, cursor, version }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollConfig {
    pub connector: String,
    #[serde(default)]
    pub path: String,
    /// `"every 1m"` or a cron expression (see `schedule`).
    pub schedule: crate::schedule::Schedule,
    /// Where a page's records are: a jq path to an array (a body that is an array needs none).
    #[serde(default)]
    pub records: Option<crate::keypath::KeyPath>,
    /// How to ask for what is new; without one, every run reads everything.
    #[serde(default)]
    pub cursor: Option<CursorConfig>,
    /// The record's version (e.g. `.updated_at`): a record read again with
    /// the same key and version is a duplicate. Default: its content.
    #[serde(default)]
    pub version: Option<crate::keypath::KeyPath>,
    /// Most pages one run reads; the next run goes on from the cursor.
    #[serde(default = "default_max_pages")]
    pub max_pages: usize,
}

fn default_max_pages() -> usize {
    100
}

/// `source = { type = "postgres_outbox", url, table, id_column,
/// payload_column, sent_column, schedule, batch }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// `postgres://user@host/db`, or `env:NAME` when it holds a password.
    pub url: String,
    pub table: String,
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// The record (json, jsonb or text).
    #[serde(default = "default_payload_column")]
    pub payload_column: String,
    /// A timestamp column, null until the row is journalled.
    #[serde(default = "default_sent_column")]
    pub sent_column: String,
    pub schedule: crate::schedule::Schedule,
    /// Rows taken per transaction.
    #[serde(default = "default_outbox_batch")]
    pub batch: u32,
}

fn default_id_column() -> String {
    "id".to_string()
}

fn default_payload_column() -> String {
    "payload".to_string()
}

fn default_sent_column() -> String {
    "sent_at".to_string()
}

fn default_outbox_batch() -> u32 {
    100
}

/// `source = { type = "files", dir, format, schedule, archive, failed, mode }`;
/// folders are relative to the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    pub dir: String,
    pub format: FileFormat,
    pub schedule: crate::schedule::Schedule,
    #[serde(default = "default_archive")]
    pub archive: String,
    #[serde(default = "default_failed")]
    pub failed: String,
    #[serde(default)]
    pub mode: FileMode,
}

fn default_archive() -> String {
    "archive".to_string()
}

fn default_failed() -> String {
    "failed".to_string()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// A header row, then one record per row (fields become strings).
    Csv,
    /// One JSON record per line.
    Jsonl,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FileMode {
    /// Every row is a record.
    #[default]
    EachRow,
    /// Each file is a full extract: only rows whose key is new or whose
    /// content changed since the last file are records (needs `key`).
    FullExtract,
}

/// How a poller pages and remembers where it was.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CursorConfig {
    /// `?updated_since=T`: the newest `field` seen, minus `overlap` (records
    /// changed while the last page was read), kept in the journal.
    UpdatedSince {
        param: String,
        field: crate::keypath::KeyPath,
        #[serde(default, with = "values::duration")]
        overlap: Duration,
        /// Where the first run starts (RFC 3339); default: the beginning.
        #[serde(default)]
        start: Option<String>,
        /// A boolean in the body that says more pages follow (e.g. `.has_more`).
        #[serde(default)]
        has_more: Option<crate::keypath::KeyPath>,
    },
    /// An opaque next-page token in the body (e.g. `.next_cursor`), sent back as `param`.
    Token { param: String, next: crate::keypath::KeyPath },
    /// Page numbers from 1 in `param`, `size` records a page in `size_param`; a short page is the last.
    Page {
        param: String,
        #[serde(default)]
        size_param: Option<String>,
        #[serde(default)]
        size: Option<u32>,
    },
    /// RFC 8288 `Link: <...>; rel="next"` headers.
    Link,
}

/// `signature = { scheme = "standard-webhooks", secret = "env:NAME" }`; `secrets = [..]` during a rotation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureConfig {
    pub scheme: Scheme,
    #[serde(default)]
    pub secret: Option<SecretRef>,
    #[serde(default)]
    pub secrets: Vec<SecretRef>,
    /// How far `webhook-timestamp`/`t=` may be from now.
    #[serde(default = "default_tolerance", with = "values::duration")]
    pub tolerance: Duration,
}

fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    /// A request per record to `connector`'s base URL + `path`.
    Http {
        connector: String,
        #[serde(default = "default_method")]
        method: String,
        #[serde(default)]
        path: String,
        /// Many records per request, to a bulk endpoint.
        #[serde(default)]
        batch: Option<BatchConfig>,
        /// Canonical model → the partner's shape.
        #[serde(default)]
        mapping: Option<MappingConfig>,
    },
    /// Upserts into a PostgreSQL table on the record's stable key.
    Postgres(Box<PostgresSinkConfig>),
    /// Publishes to a NATS JetStream subject, de-duplicated by message id.
    Nats {
        connector: String,
        subject: String,
        #[serde(default)]
        mapping: Option<MappingConfig>,
    },
    /// Publishes to a RabbitMQ exchange with publisher confirms.
    Amqp {
        connector: String,
        /// `""` is the default exchange (routing key = queue name).
        #[serde(default)]
        exchange: String,
        routing_key: String,
        #[serde(default)]
        mapping: Option<MappingConfig>,
    },
}

/// `sink = { type = "postgres", connector, table, key, version_column, columns, batch }`.
///
/// Each record is a JSON object whose fields are the table's columns
/// (converted by PostgreSQL as `jsonb_populate_record` does). A batch is one
/// `INSERT ... ON CONFLICT (key) DO UPDATE` statement; with a
/// `version_column`, a row is only replaced by a record whose version is
/// not older, so a late or replayed old record never overwrites a newer one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    pub connector: String,
    /// `schema.table` or `table`.
    pub table: String,
    /// The columns of the unique key the upsert conflicts on.
    pub key: Vec<String>,
    /// A column (a number or a timestamp) that orders versions of a row.
    #[serde(default)]
    pub version_column: Option<String>,
    /// The columns written; default: every column of the table (a field
    /// missing from a record writes NULL).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Records per statement and how long a partial batch waits to fill.
    #[serde(default)]
    pub batch: Option<BatchConfig>,
    #[serde(default)]
    pub mapping: Option<MappingConfig>,
}

impl SinkConfig {
    /// The connector the sink writes through.
    pub fn connector(&self) -> &str {
        match self {
            SinkConfig::Http { connector, .. }
            | SinkConfig::Nats { connector, .. }
            | SinkConfig::Amqp { connector, .. } => connector,
            SinkConfig::Postgres(p) => &p.connector,
        }
    }

    /// Canonical model → the target's shape.
    pub fn mapping(&self) -> Option<&MappingConfig> {
        match self {
            SinkConfig::Http { mapping, .. } | SinkConfig::Nats { mapping, .. } | SinkConfig::Amqp { mapping, .. } => {
                mapping.as_ref()
            }
            SinkConfig::Postgres(p) => p.mapping.as_ref(),
        }
    }

    /// `http`, `postgres`, `nats` or `amqp`: the connector kind it needs.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Http { .. } => "http",
            SinkConfig::Postgres(_) => "postgres",
            SinkConfig::Nats { .. } => "nats",
            SinkConfig::Amqp { .. } => "amqp",
        }
    }
}

/// `batch = { max_records = 100, max_wait = "1s", results = "per_item" }`.
///
/// The request body is a JSON array of the records' payloads. With
/// `results = "per_item"` the partner's 2xx answer carries an array (at
/// `results_field`) of one object per record, in order, each with a
/// `status`; with `"all_or_nothing"` the answer's status is every record's.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    #[serde(default = "default_max_wait", with = "values::duration")]
    pub max_wait: Duration,
    #[serde(default)]
    pub results: BatchResults,
    #[serde(default = "default_results_field")]
    pub results_field: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BatchResults {
    #[default]
    PerItem,
    AllOrNothing,
}

fn default_max_records() -> usize {
    100
}

fn default_max_wait() -> Duration {
    Duration::from_secs(1)
}

fn default_results_field() -> String {
    "results".to_string()
}

fn default_method() -> String {
    "POST".to_string()
}

impl Config {
    pub fn http_connector(&self, name: &str) -> Option<&HttpConnector> {
        match self.connectors.get(name)? {
            ConnectorConfig::Http(h) => Some(h),
            _ => None,
        }
    }
}

/// Where the journal lives, from `[engine] store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://PATH`; a relative PATH is relative to the config file's folder.
    Sqlite(std::path::PathBuf),
}

impl StoreUrl {
    pub fn parse(s: &str) -> Result<StoreUrl, String> {
        if let Some(path) = s.strip_prefix("sqlite://").or_else(|| s.strip_prefix("sqlite:")) {
            if path.is_empty() {
                return Err("the SQLite path is empty".to_string());
            }
            return Ok(StoreUrl::Sqlite(path.into()));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Err("the PostgreSQL journal is not available in this version".to_string());
        }
        Err(format!("`{s}` is not a store URL"))
    }

    /// Resolves a relative SQLite path against `base` (the config's folder).
    pub fn relative_to(self, base: &std::path::Path) -> StoreUrl {
        match self {
            StoreUrl::Sqlite(p) if p.is_relative() => StoreUrl::Sqlite(base.join(p)),
            other => other,
        }
    }
}
