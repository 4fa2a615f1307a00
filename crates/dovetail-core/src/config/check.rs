//! What a config means: cross-references, sane policies, best practice,
//! and the resolution of secret references.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use base64::Engine as _;

use super::load::{Finding, Loaded};
use super::{
    AuthConfig, Config, ConfigErrors, ConnectorConfig, HttpConnector, Secret, SecretRef, SinkConfig, SourceConfig,
};
use crate::signature::{SigningSecret, Verifier};

/// Where `env:` (and later `vault:`) references are looked up; the engine
/// passes the process environment, tests pass a map.
pub trait SecretSource {
    fn lookup(&self, reference: &SecretRef) -> Option<Secret>;
}

impl SecretSource for BTreeMap<String, String> {
    fn lookup(&self, reference: &SecretRef) -> Option<Secret> {
        match reference {
            SecretRef::Env(name) => self.get(name).cloned().map(Secret::new),
            SecretRef::Invalid { .. } => None,
        }
    }
}

/// Paths the engine serves itself; a webhook may not take them.
const RESERVED_PATHS: [&str; 6] = ["/", "/healthz", "/readyz", "/metrics", "/api", "/ui"];

impl Config {
    /// Every meaning error and best-practice warning, with key paths.
    pub(super) fn check(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        self.check_engine(&mut out);
        for (name, c) in &self.connectors {
            check_name(&mut out, "connectors", name);
            match c {
                ConnectorConfig::Http(h) => check_http_connector(&mut out, name, h),
                ConnectorConfig::Postgres(s) => check_service_connector(
                    &mut out,
                    name,
                    s,
                    &["postgres", "postgresql"],
                    "postgres://dovetail@db.internal/app",
                ),
                ConnectorConfig::Nats(s) => {
                    check_service_connector(&mut out, name, s, &["nats"], "nats://127.0.0.1:4222")
                }
                ConnectorConfig::Amqp(s) => {
                    check_service_connector(&mut out, name, s, &["amqp"], "amqp://dovetail@mq.internal:5672/%2f")
                }
            }
        }
        let mut paths: BTreeMap<&str, &str> = BTreeMap::new();
        // Readers that must not be shared between flows: what one takes, the other never sees.
        let mut readers: BTreeMap<String, &str> = BTreeMap::new();
        for (name, flow) in &self.flows {
            check_name(&mut out, "flows", name);
            match &flow.source {
                SourceConfig::Webhook { path, signature } => {
                    let at = ["flows", name, "source", "path"];
                    if !path.starts_with('/') {
                        out.push(Finding::error(
                            &at,
                            format!("`{path}` is not an absolute path"),
                            "start it with /, e.g. \"/hooks/orders\"",
                        ));
                    } else if let Some(problem) = webhook_path_problem(path) {
                        out.push(Finding::error(
                            &at,
                            format!("`{path}` {problem}"),
                            "use a plain path of letters, digits, - _ . and /, e.g. \"/hooks/orders\"",
                        ));
                    } else if RESERVED_PATHS.iter().any(|r| path == r || path.starts_with(&format!("{r}/"))) {
                        out.push(Finding::error(
                            &at,
                            format!("`{path}` is served by the engine itself"),
                            "choose another path, e.g. under /hooks/",
                        ));
                    } else if let Some(other) = paths.insert(path, name) {
                        out.push(Finding::error(
                            &at,
                            format!("flow `{other}` already receives webhooks on `{path}`"),
                            "give each flow its own path",
                        ));
                    }
                    match signature {
                        None => out.push(Finding::warning(
                            &["flows", name, "source"],
                            "this webhook accepts unsigned requests: anyone who can reach it can inject records",
                            "add signature = { scheme = \"standard-webhooks\", secret = \"env:NAME\" } (or stripe, github)",
                        )),
                        Some(sig) if sig.secret.is_none() && sig.secrets.is_empty() => out.push(Finding::error(
                            &["flows", name, "source", "signature"],
                            "a signature needs a secret",
                            "add secret = \"env:NAME\", or secrets = [\"env:OLD\", \"env:NEW\"] during a rotation",
                        )),
                        Some(_) => {}
                    }
                }
                SourceConfig::PostgresOutbox(o) => {
                    for (key, value) in [
                        ("table", &o.table),
                        ("id_column", &o.id_column),
                        ("payload_column", &o.payload_column),
                        ("sent_column", &o.sent_column),
                    ] {
                        check_sql_name(&mut out, &["flows", name, "source", key], value);
                    }
                    check_url_secret(&mut out, &["flows", name, "source", "url"], &o.url);
                    if o.batch == 0 {
                        out.push(Finding::error(
                            &["flows", name, "source", "batch"],
                            "a batch of 0 takes nothing",
                            "e.g. 500",
                        ));
                    }
                }
                SourceConfig::Files(f) => {
                    if f.mode == super::FileMode::FullExtract && flow.key.is_none() {
                        out.push(Finding::error(
                            &["flows", name, "source", "mode"],
                            "a full extract is compared key by key",
                            "add key = \".id\" (the record's stable key) to the flow",
                        ));
                    }
                    let norm = |p: &str| p.trim_start_matches("./").trim_end_matches('/').to_string();
                    if norm(&f.dir) == norm(&f.archive) || norm(&f.dir) == norm(&f.failed) {
                        out.push(Finding::error(
                            &["flows", name, "source", "archive"],
                            "processed files must move out of the folder that is read",
                            "e.g. archive = \"archive\", failed = \"failed\"",
                        ));
                    }
                }
                SourceConfig::PostgresCdc(c) => {
                    check_url_secret(&mut out, &["flows", name, "source", "url"], &c.url);
                    if let Some(other) = readers.insert(format!("cdc {} {}", c.url, c.slot), name) {
                        out.push(Finding::error(
                            &["flows", name, "source", "slot"],
                            format!("flow `{other}` reads the same replication slot: each would advance it past changes the other has not read"),
                            "give each flow its own slot (and publication)",
                        ));
                    }
                    for (key, value) in [("slot", &c.slot), ("publication", &c.publication)] {
                        let plain = !value.is_empty()
                            && value.len() <= 63
                            && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                        if !plain {
                            out.push(Finding::error(
                                &["flows", name, "source", key],
                                format!("`{value}` is not a plain {key} name"),
                                "use lower-case letters, digits and _ (at most 63), e.g. \"dovetail_orders\"",
                            ));
                        }
                    }
                    if c.tables.is_empty() {
                        out.push(Finding::error(
                            &["flows", name, "source", "tables"],
                            "name the tables whose changes are read",
                            "e.g. tables = [\"public.orders\"]",
                        ));
                    }
                    for t in &c.tables {
                        check_sql_name(&mut out, &["flows", name, "source", "tables"], t);
                    }
                    if c.batch == 0 {
                        out.push(Finding::error(
                            &["flows", name, "source", "batch"],
                            "a batch of 0 reads nothing",
                            "e.g. 500",
                        ));
                    }
                }
                SourceConfig::Nats(n) => {
                    self.check_connector_kind(&mut out, &["flows", name, "source", "connector"], &n.connector, "nats");
                    let reader = format!("nats {} {} {}", n.connector, n.stream, n.consumer);
                    if let Some(other) = readers.insert(reader, name) {
                        out.push(Finding::error(
                            &["flows", name, "source", "consumer"],
                            format!("flow `{other}` reads through the same consumer: the two would split the messages"),
                            "give each flow its own consumer name",
                        ));
                    }
                    for (key, value) in [("stream", &n.stream), ("consumer", &n.consumer)] {
                        if value.is_empty() || value.contains(['.', '*', '>', ' ', '/', '\\']) {
                            out.push(Finding::error(
                                &["flows", name, "source", key],
                                format!("`{value}` is not a JetStream {key} name"),
                                "use letters, digits, - and _, e.g. \"ORDERS\"",
                            ));
                        }
                    }
                    if n.ack_wait < std::time::Duration::from_secs(1) {
                        out.push(Finding::error(
                            &["flows", name, "source", "ack_wait"],
                            "the server would redeliver before a message can be journalled",
                            "e.g. \"30s\" (the default)",
                        ));
                    }
                }
                SourceConfig::Amqp(a) => {
                    self.check_connector_kind(&mut out, &["flows", name, "source", "connector"], &a.connector, "amqp");
                    if let Some(other) = readers.insert(format!("amqp {} {}", a.connector, a.queue), name) {
                        out.push(Finding::error(
                            &["flows", name, "source", "queue"],
                            format!("flow `{other}` consumes the same queue: the two would split the messages"),
                            "bind a queue per flow to the exchange",
                        ));
                    }
                    if a.queue.len() > 255 {
                        out.push(Finding::error(
                            &["flows", name, "source", "queue"],
                            "AMQP names hold at most 255 bytes",
                            "use a shorter queue name",
                        ));
                    }
                    if a.queue.is_empty() {
                        out.push(Finding::error(
                            &["flows", name, "source", "queue"],
                            "the queue name is empty",
                            "e.g. \"orders\"",
                        ));
                    }
                    if a.prefetch == 0 {
                        out.push(Finding::error(
                            &["flows", name, "source", "prefetch"],
                            "a prefetch of 0 means no limit: the broker would push the whole queue into memory",
                            "e.g. 100 (the default)",
                        ));
                    }
                }
                SourceConfig::Poll(p) => {
                    self.check_connector_kind(&mut out, &["flows", name, "source", "connector"], &p.connector, "http");
                    if !p.path.is_empty() && !p.path.starts_with('/') {
                        out.push(Finding::error(
                            &["flows", name, "source", "path"],
                            format!("`{}` must start with /", p.path),
                            "write it relative to the connector's base_url, e.g. \"/v1/contacts\"",
                        ));
                    }
                    if p.max_pages == 0 {
                        out.push(Finding::error(
                            &["flows", name, "source", "max_pages"],
                            "a run that reads no page reads nothing",
                            "e.g. 100 (the default)",
                        ));
                    }
                }
            }
            if flow.retention.is_zero() {
                out.push(Finding::error(
                    &["flows", name, "retention"],
                    "a retention of 0 would remove payloads before anyone could look",
                    "e.g. \"30d\" (the default)",
                ));
            }
            check_mapping_version(&mut out, &["flows", name, "mapping"], flow.mapping.as_ref());
            if let Some(model) = &flow.model
                && !self.models.contains_key(model)
            {
                let known = self.models.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
                out.push(Finding::error(
                    &["flows", name, "model"],
                    format!("there is no model named `{model}`"),
                    if known.is_empty() {
                        format!("declare it under [models.{model}] with schema = \"schemas/{model}.json\"")
                    } else {
                        format!("declare [models.{model}] or use one of: {known}")
                    },
                ));
            }
            if flow.ordering == super::Ordering::PerKey && flow.key.is_none() {
                out.push(Finding::error(
                    &["flows", name, "ordering"],
                    "per-key ordering needs the record's key",
                    "add key = \".id\" (a jq path to the external key)",
                ));
            }
            match &flow.sink {
                SinkConfig::Http { method, path, batch, mapping, .. } => {
                    check_mapping_version(&mut out, &["flows", name, "sink", "mapping"], mapping.as_ref());
                    if let Some(b) = batch {
                        check_batch_size(&mut out, name, flow, b, "use the partner's documented bulk limit, e.g. 100");
                    }
                    if !["POST", "PUT", "PATCH", "DELETE"].contains(&method.as_str()) {
                        out.push(Finding::error(
                            &["flows", name, "sink", "method"],
                            format!("`{method}` is not a write method"),
                            "use POST, PUT, PATCH or DELETE (upper case)",
                        ));
                    }
                    if !path.is_empty() && !path.starts_with('/') {
                        out.push(Finding::error(
                            &["flows", name, "sink", "path"],
                            format!("`{path}` must start with /"),
                            "write it relative to the connector's base_url, e.g. \"/v1/orders\"",
                        ));
                    }
                }
                SinkConfig::Postgres(p) => {
                    check_mapping_version(&mut out, &["flows", name, "sink", "mapping"], p.mapping.as_ref());
                    check_sql_name(&mut out, &["flows", name, "sink", "table"], &p.table);
                    if p.key.is_empty() {
                        out.push(Finding::error(
                            &["flows", name, "sink", "key"],
                            "an upsert needs the columns of the table's unique key",
                            "e.g. key = [\"id\"]",
                        ));
                    }
                    let named =
                        p.key.iter().map(|k| ("key", k)).chain(p.version_column.iter().map(|v| ("version_column", v)));
                    for (key, column) in named {
                        check_column_name(&mut out, &["flows", name, "sink", key], column);
                        if let Some(columns) = &p.columns
                            && !columns.contains(column)
                        {
                            out.push(Finding::error(
                                &["flows", name, "sink", "columns"],
                                format!("`{column}` ({key}) is not among the columns written"),
                                format!("add \"{column}\" to columns"),
                            ));
                        }
                    }
                    for column in p.columns.iter().flatten() {
                        check_column_name(&mut out, &["flows", name, "sink", "columns"], column);
                    }
                    if let Some(b) = &p.batch {
                        check_batch_size(&mut out, name, flow, b, "e.g. 500");
                    }
                }
                SinkConfig::Nats { subject, mapping, .. } => {
                    check_mapping_version(&mut out, &["flows", name, "sink", "mapping"], mapping.as_ref());
                    if subject.is_empty() || subject.contains(['*', '>', ' ']) || subject.split('.').any(str::is_empty)
                    {
                        out.push(Finding::error(
                            &["flows", name, "sink", "subject"],
                            format!("`{subject}` is not a subject to publish to"),
                            "use dot-separated tokens without wildcards, e.g. \"orders.created\"",
                        ));
                    }
                }
                SinkConfig::Amqp { exchange, routing_key, mapping, .. } => {
                    check_mapping_version(&mut out, &["flows", name, "sink", "mapping"], mapping.as_ref());
                    for (key, value) in [("exchange", exchange), ("routing_key", routing_key)] {
                        if value.len() > 255 {
                            out.push(Finding::error(
                                &["flows", name, "sink", key],
                                "AMQP names hold at most 255 bytes",
                                "use a shorter name",
                            ));
                        }
                    }
                    if exchange.is_empty() && routing_key.is_empty() {
                        out.push(Finding::error(
                            &["flows", name, "sink", "routing_key"],
                            "the default exchange routes by queue name: the routing key names the queue",
                            "e.g. routing_key = \"orders\", or set exchange",
                        ));
                    }
                }
            }
            let sink = &flow.sink;
            self.check_connector_kind(&mut out, &["flows", name, "sink", "connector"], sink.connector(), sink.kind());
        }
        for name in self.models.keys() {
            check_name(&mut out, "models", name);
        }
        for (name, n) in &self.notify {
            check_name(&mut out, "notify", name);
            let literal = !n.url.starts_with("env:");
            let url_ok = ["http://", "https://"].iter().any(|p| n.url.strip_prefix(p).is_some_and(|r| !r.is_empty()));
            if literal && !url_ok {
                out.push(Finding::error(
                    &["notify", name, "url"],
                    format!("`{}` is not an http(s) URL", n.url),
                    "write e.g. \"https://alerts.example.com/hooks/dovetail\", or \"env:NAME\" for a secret URL",
                ));
            }
        }
        for (path, r) in self.secret_refs() {
            if let SecretRef::Invalid { reason } = r {
                let path: Vec<&str> = path.iter().map(String::as_str).collect();
                out.push(Finding::error(&path, "this is not a secret reference", reason.clone()));
            }
        }
        if self.flows.is_empty() {
            out.push(Finding::warning(
                &["flows"],
                "no flows are declared, so the engine has nothing to do",
                "add a [flows.NAME] table; `dovetail init` writes an example",
            ));
        }
        out
    }

    /// Every secret reference with its key path.
    fn secret_refs(&self) -> Vec<(Vec<String>, &SecretRef)> {
        let p = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut out = Vec::new();
        if let Some(r) = &self.engine.admin_token {
            out.push((p(&["engine", "admin_token"]), r));
        }
        for (name, c) in &self.connectors {
            let ConnectorConfig::Http(h) = c else { continue };
            match &h.auth {
                Some(AuthConfig::Bearer { token }) => out.push((p(&["connectors", name, "auth", "token"]), token)),
                Some(AuthConfig::Basic { password, .. }) => {
                    out.push((p(&["connectors", name, "auth", "password"]), password))
                }
                Some(AuthConfig::ApiKey { key, .. }) => out.push((p(&["connectors", name, "auth", "key"]), key)),
                Some(AuthConfig::Oauth2ClientCredentials { client_secret, .. }) => {
                    out.push((p(&["connectors", name, "auth", "client_secret"]), client_secret))
                }
                Some(AuthConfig::Oauth2RefreshToken { client_secret, refresh_token, .. }) => {
                    out.extend(client_secret.iter().map(|s| (p(&["connectors", name, "auth", "client_secret"]), s)));
                    out.push((p(&["connectors", name, "auth", "refresh_token"]), refresh_token));
                }
                None => {}
            }
        }
        for (name, flow) in &self.flows {
            let SourceConfig::Webhook { signature: Some(sig), .. } = &flow.source else { continue };
            out.extend(sig.secret.iter().map(|r| (p(&["flows", name, "source", "signature", "secret"]), r)));
            out.extend(sig.secrets.iter().map(|r| (p(&["flows", name, "source", "signature", "secrets"]), r)));
        }
        out
    }

    fn check_engine(&self, out: &mut Vec<Finding>) {
        let e = &self.engine;
        if e.listen.parse::<SocketAddr>().is_err() {
            out.push(Finding::error(
                &["engine", "listen"],
                format!("`{}` is not an address", e.listen),
                "write IP:PORT, e.g. \"127.0.0.1:8080\" or \"0.0.0.0:8080\"",
            ));
        }
        if let Err(msg) = crate::config::StoreUrl::parse(&e.store) {
            out.push(Finding::error(
                &["engine", "store"],
                msg,
                "write \"sqlite://dovetail.db\" (a path relative to this file)",
            ));
        }
        if e.max_body.0 == 0 {
            out.push(Finding::error(
                &["engine", "max_body"],
                "a body limit of 0 refuses every webhook",
                "use e.g. \"1MiB\"",
            ));
        }
        if let Some(n) = e.delivery_threads.filter(|n| !(1..=MAX_DELIVERY_THREADS).contains(n)) {
            out.push(Finding::error(
                &["engine", "delivery_threads"],
                format!("{n} delivery threads is outside 1..={MAX_DELIVERY_THREADS}"),
                "leave it out (half the cores), or use e.g. 2",
            ));
        }
    }
}

fn check_name(out: &mut Vec<Finding>, section: &str, name: &str) {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        out.push(Finding::error(
            &[section, name],
            format!("`{name}` is not a usable name"),
            "use letters, digits, _ and -",
        ));
    }
}

fn check_mapping_version(out: &mut Vec<Finding>, at: &[&str], mapping: Option<&super::MappingConfig>) {
    if mapping.is_some_and(|m| m.version == 0) {
        let mut key = at.to_vec();
        key.push("version");
        out.push(Finding::error(&key, "mapping versions start at 1", "write version = 1 and bump it on every change"));
    }
}

fn check_batch_size(out: &mut Vec<Finding>, name: &str, flow: &super::FlowConfig, b: &super::BatchConfig, fix: &str) {
    if b.max_records == 0 || b.max_records > 10_000 {
        out.push(Finding::error(
            &["flows", name, "sink", "batch", "max_records"],
            format!("{} records per request is outside 1..=10000", b.max_records),
            fix,
        ));
    }
    if flow.ordering == super::Ordering::PerKey {
        out.push(Finding::error(
            &["flows", name, "ordering"],
            "per-key ordering and batches cannot be combined yet",
            "drop one of them",
        ));
    }
}

/// A plain SQL name: letters, digits and `_`, `schema.table` for a table.
fn check_sql_name(out: &mut Vec<Finding>, at: &[&str], value: &str) {
    let plain = !value.is_empty()
        && value.split('.').all(|part| {
            part.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if !plain {
        out.push(Finding::error(
            at,
            format!("`{value}` is not a plain SQL name"),
            "use letters, digits and _ (schema.table for a table)",
        ));
    }
}

fn check_column_name(out: &mut Vec<Finding>, at: &[&str], value: &str) {
    if value.contains('.') {
        out.push(Finding::error(
            at,
            format!("`{value}` is not a column name"),
            "name the column alone, without its table",
        ));
    } else {
        check_sql_name(out, at, value);
    }
}

/// A URL written into the config must not carry a password.
fn check_url_secret(out: &mut Vec<Finding>, at: &[&str], url: &str) {
    let secret_in_url = url.contains("password=")
        || url.split_once("://").and_then(|(_, rest)| rest.split_once('@')).is_some_and(|(who, _)| who.contains(':'));
    if !url.starts_with("env:") && secret_in_url {
        out.push(Finding::error(
            at,
            "this URL holds a password; secrets are referenced, never written into the config",
            "write url = \"env:NAME\" and export the URL in the engine's environment",
        ));
    }
}

fn check_service_connector(
    out: &mut Vec<Finding>,
    name: &str,
    s: &super::ServiceConnector,
    schemes: &[&str],
    example: &str,
) {
    let at = |key: &'static str| ["connectors", name, key];
    check_url_secret(out, &at("url"), &s.url);
    let scheme_ok = s.url.starts_with("env:")
        || schemes
            .iter()
            .any(|sc| s.url.strip_prefix(sc).and_then(|r| r.strip_prefix("://")).is_some_and(|r| !r.is_empty()));
    if !scheme_ok {
        out.push(Finding::error(
            &at("url"),
            format!("`{}` is not a {}:// URL", super::without_credentials(&s.url), schemes[0]),
            format!("write e.g. \"{example}\", or \"env:NAME\" when it holds a password"),
        ));
    }
    if s.timeout.is_zero() {
        out.push(Finding::error(&at("timeout"), "a timeout of 0 fails every write", "use e.g. \"10s\""));
    }
    if s.max_in_flight == 0 || s.max_in_flight > MAX_IN_FLIGHT {
        out.push(Finding::error(
            &at("max_in_flight"),
            format!("{} writes in flight is outside 1..={MAX_IN_FLIGHT}", s.max_in_flight),
            "use e.g. 4",
        ));
    }
}

impl Config {
    /// `connector` must exist and be of `kind`.
    fn check_connector_kind(&self, out: &mut Vec<Finding>, at: &[&str], connector: &str, kind: &str) {
        let of_kind =
            || self.connectors.iter().filter(|(_, c)| c.kind() == kind).map(|(n, _)| n.as_str()).collect::<Vec<_>>();
        match self.connectors.get(connector) {
            Some(c) if c.kind() == kind => {}
            Some(c) => out.push(Finding::error(
                at,
                format!("connector `{connector}` is of type `{}`; this needs a `{kind}` connector", c.kind()),
                match of_kind().as_slice() {
                    [] => format!("declare one with type = \"{kind}\""),
                    known => format!("use one of: {}", known.join(", ")),
                },
            )),
            None => {
                let known = of_kind();
                out.push(Finding::error(
                    at,
                    format!("there is no connector named `{connector}`"),
                    if known.is_empty() {
                        format!("declare it under [connectors.{connector}] with type = \"{kind}\"")
                    } else {
                        format!("declare [connectors.{connector}] or use one of: {}", known.join(", "))
                    },
                ));
            }
        }
    }
}

fn check_http_connector(out: &mut Vec<Finding>, name: &str, h: &HttpConnector) {
    let at = |key: &'static str| ["connectors", name, key];
    let url_ok = ["http://", "https://"]
        .iter()
        .any(|s| h.base_url.strip_prefix(s).is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/')));
    if !url_ok {
        out.push(Finding::error(
            &at("base_url"),
            format!("`{}` is not an http(s) URL", h.base_url),
            "write e.g. \"https://api.example.com\"",
        ));
    } else if h.base_url.starts_with("http://") && !is_loopback_url(&h.base_url) {
        out.push(Finding::warning(
            &at("base_url"),
            "credentials and records would cross the network unencrypted",
            "use https://",
        ));
    }
    if h.timeout.is_zero() {
        out.push(Finding::error(&at("timeout"), "a timeout of 0 fails every request", "use e.g. \"10s\""));
    }
    if h.max_in_flight == 0 || h.max_in_flight > MAX_IN_FLIGHT {
        out.push(Finding::error(
            &at("max_in_flight"),
            format!("{} requests in flight is outside 1..={MAX_IN_FLIGHT}", h.max_in_flight),
            "use e.g. 16",
        ));
    }
    for header in h.headers.keys() {
        let lower = header.to_ascii_lowercase();
        if ENGINE_HEADERS.contains(&lower.as_str()) {
            out.push(Finding::error(
                &["connectors", name, "headers", header],
                format!("`{header}` is set by the engine on every request"),
                "remove it; use `auth` for credentials and `api_version` for the version header",
            ));
        } else if lower.is_empty()
            || !lower.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            out.push(Finding::error(
                &["connectors", name, "headers", header],
                format!("`{header}` is not a header name"),
                "e.g. \"X-Tenant\"",
            ));
        }
    }
    if let Some(AuthConfig::ApiKey { header, query, .. }) = &h.auth {
        let where_ = ["connectors", name, "auth"];
        match (header, query) {
            (Some(_), Some(_)) | (None, None) => out.push(Finding::error(
                &where_,
                "an api_key goes in a header or in a query parameter: name exactly one",
                "add header = \"X-Api-Key\" or query = \"api_key\"",
            )),
            (Some(hn), None)
                if hn.is_empty()
                    || !hn.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) =>
            {
                out.push(Finding::error(
                    &["connectors", name, "auth", "header"],
                    format!("`{hn}` is not a header name"),
                    "e.g. \"X-Api-Key\"",
                ))
            }
            (None, Some(q))
                if q.is_empty() || !q.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)) =>
            {
                out.push(Finding::error(
                    &["connectors", name, "auth", "query"],
                    format!("`{q}` is not a plain query parameter name"),
                    "e.g. \"api_key\"",
                ))
            }
            _ => {}
        }
    }
    if let Some(
        AuthConfig::Oauth2ClientCredentials { token_url, .. } | AuthConfig::Oauth2RefreshToken { token_url, .. },
    ) = &h.auth
        && !["http://", "https://"].iter().any(|p| token_url.strip_prefix(p).is_some_and(|r| !r.is_empty()))
    {
        out.push(Finding::error(
            &["connectors", name, "auth", "token_url"],
            format!("`{token_url}` is not an http(s) URL"),
            "write the partner's token endpoint, e.g. \"https://api.example.com/oauth/token\"",
        ));
    }
    if let Some(q) = &h.quota {
        if q.per_day.is_none() && q.per_hour.is_none() {
            out.push(Finding::error(
                &["connectors", name, "quota"],
                "a quota needs per_day or per_hour",
                "e.g. quota = { per_day = 10000 }",
            ));
        }
        if q.per_day == Some(0) || q.per_hour == Some(0) {
            out.push(Finding::error(&["connectors", name, "quota"], "a quota of 0 sends nothing", "use at least 1"));
        }
        if !(q.alert_at > 0.0 && q.alert_at <= 1.0) {
            out.push(Finding::error(
                &["connectors", name, "quota", "alert_at"],
                format!("{} is outside (0, 1]", q.alert_at),
                "e.g. 0.75",
            ));
        }
    }
    if let Some(rl) = &h.rate_limit {
        if !(rl.requests_per_second.is_finite() && rl.requests_per_second > 0.0) {
            out.push(Finding::error(
                &["connectors", name, "rate_limit", "requests_per_second"],
                "the rate must be above 0",
                "e.g. 45 (set it below the partner's documented limit)",
            ));
        }
        if rl.burst == Some(0) {
            out.push(Finding::error(
                &["connectors", name, "rate_limit", "burst"],
                "a burst of 0 sends nothing",
                "use at least 1",
            ));
        }
    }
    let b = &h.breaker;
    let bat = |key: &'static str| ["connectors", name, "breaker", key];
    if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
        out.push(Finding::error(&bat("failure_ratio"), format!("{} is outside (0, 1]", b.failure_ratio), "e.g. 0.5"));
    }
    if b.min_calls == 0 || b.consecutive_failures == 0 {
        out.push(Finding::error(
            &bat(if b.min_calls == 0 { "min_calls" } else { "consecutive_failures" }),
            "0 would open the breaker on nothing",
            "use at least 1",
        ));
    }
    if b.open_for.is_zero() || b.window.is_zero() {
        out.push(Finding::error(
            &bat(if b.open_for.is_zero() { "open_for" } else { "window" }),
            "a zero duration cannot work here",
            "e.g. \"30s\"",
        ));
    }
    if b.max_open_for < b.open_for {
        out.push(Finding::error(
            &bat("max_open_for"),
            "max_open_for is shorter than open_for",
            "make it at least open_for",
        ));
    }
    let r = &h.retry;
    let rat = |key: &'static str| ["connectors", name, "retry", key];
    if r.max_attempts == 0 {
        out.push(Finding::error(
            &rat("max_attempts"),
            "0 attempts would dead-letter every transient failure unseen",
            "use at least 1; 6 to 10 is typical",
        ));
    }
    if !(0.0..=1.0).contains(&r.jitter) {
        out.push(Finding::error(&rat("jitter"), format!("{} is outside 0..1", r.jitter), "use a fraction, e.g. 0.5"));
    }
    if r.initial_backoff.is_zero() {
        out.push(Finding::error(
            &rat("initial_backoff"),
            "retrying at once hammers a partner that is already failing",
            "use e.g. \"1s\"",
        ));
    }
    if r.initial_backoff > r.max_backoff {
        out.push(Finding::error(
            &rat("max_backoff"),
            "max_backoff is shorter than initial_backoff",
            "make max_backoff at least initial_backoff",
        ));
    }
    if let Some(v) = &h.api_version
        && (v.header.is_empty() || v.header.contains(|c: char| c.is_whitespace() || c == ':'))
    {
        out.push(Finding::error(
            &["connectors", name, "api_version", "header"],
            format!("`{}` is not a header name", v.header),
            "e.g. \"Api-Version\"",
        ));
    }
}

/// Most concurrent requests a connector may allow.
const MAX_IN_FLIGHT: usize = 10_000;
/// More delivery threads than this is a typo, not a machine.
const MAX_DELIVERY_THREADS: usize = 1024;

/// Headers every outbound request carries from the engine itself; a static
/// header of the same name would be sent twice.
const ENGINE_HEADERS: [&str; 6] =
    ["idempotency-key", "x-correlation-id", "traceparent", "content-type", "authorization", "content-length"];

/// Why a webhook path cannot be routed as the literal path it looks like
/// (the router treats `{name}`, `:name` and `*name` as wildcards).
fn webhook_path_problem(path: &str) -> Option<&'static str> {
    if !path.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b)) {
        return Some("has characters a webhook path cannot have");
    }
    if path.contains("//") || (path.len() > 1 && path.ends_with('/')) {
        return Some("has an empty segment");
    }
    None
}

fn is_loopback_url(url: &str) -> bool {
    let host = url.trim_start_matches("http://");
    ["127.", "localhost", "[::1]"].iter().any(|p| host.starts_with(p))
}

/// The config with secrets looked up and signature keys parsed: what the engine runs.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub flows: BTreeMap<String, ResolvedFlow>,
    pub connectors: BTreeMap<String, ResolvedAuth>,
    /// `[engine] admin_token`.
    pub admin_token: Option<Secret>,
    /// Each `[notify.NAME]`'s URL, looked up when it is `env:NAME`.
    pub notify: BTreeMap<String, Secret>,
    /// Each PostgreSQL source's (outbox, CDC) database URL, looked up when it is `env:NAME`.
    pub source_urls: BTreeMap<String, Secret>,
    /// Each database or broker connector's URL, looked up when it is `env:NAME`.
    pub connector_urls: BTreeMap<String, Secret>,
}

#[derive(Clone)]
pub struct ResolvedFlow {
    pub verifier: Option<std::sync::Arc<Verifier>>,
    /// The flow's stages. [`Loaded::resolve`] sets the keys;
    /// [`Loaded::attach_files`] adds the schemas and mappings.
    pub pipeline: std::sync::Arc<crate::pipeline::Pipeline>,
}

impl std::fmt::Debug for ResolvedFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedFlow").field("signed", &self.verifier.is_some()).finish()
    }
}

/// The credential a connector sends: a header (`Authorization`, an API-key
/// header) and/or a query parameter, each `(name, value)`.
#[derive(Debug, Clone, Default)]
pub struct ResolvedAuth {
    pub header: Option<(String, Secret)>,
    pub query: Option<(String, Secret)>,
    /// Bearer tokens obtained from an OAuth 2.0 token endpoint.
    pub oauth: Option<ResolvedOAuth>,
}

/// An OAuth 2.0 client: where to get tokens and with what.
#[derive(Debug, Clone)]
pub struct ResolvedOAuth {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    /// Set for the refresh-token grant; client credentials otherwise.
    pub refresh_token: Option<Secret>,
    pub scope: Option<String>,
}

impl Loaded {
    /// Looks up every secret; every missing one is reported, not just the first.
    pub fn resolve(&self, secrets: &dyn SecretSource) -> Result<Resolved, ConfigErrors> {
        let mut findings = Vec::new();
        let mut fetch = |path: &[&str], r: &SecretRef| -> Option<Secret> {
            let found = secrets.lookup(r).filter(|s| !s.expose().is_empty());
            if found.is_none()
                && let SecretRef::Env(var) = r
            {
                findings.push(Finding::error(
                    path,
                    format!("the secret `{r}` is not set"),
                    format!("export {var}=... in the engine's environment (it is empty or missing)"),
                ));
            }
            found
        };
        let mut connectors = BTreeMap::new();
        let mut connector_urls = BTreeMap::new();
        for (name, c) in &self.config.connectors {
            let ConnectorConfig::Http(h) = c else {
                let url = c.service().map(|s| s.url.as_str()).unwrap_or_default();
                let url = match SecretRef::parse(url) {
                    Ok(r) => fetch(&["connectors", name, "url"], &r),
                    Err(_) => Some(Secret::new(url.to_string())),
                };
                connector_urls.extend(url.map(|u| (name.clone(), u)));
                continue;
            };
            let at = |key: &'static str| ["connectors", name.as_str(), "auth", key];
            let auth = match &h.auth {
                None => ResolvedAuth::default(),
                Some(AuthConfig::Bearer { token }) => ResolvedAuth {
                    header: fetch(&at("token"), token)
                        .map(|t| ("authorization".to_string(), Secret::new(format!("Bearer {}", t.expose())))),
                    query: None,
                    oauth: None,
                },
                Some(AuthConfig::Basic { username, password }) => ResolvedAuth {
                    header: fetch(&at("password"), password).map(|p| {
                        let raw = format!("{username}:{}", p.expose());
                        let value = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw));
                        ("authorization".to_string(), Secret::new(value))
                    }),
                    query: None,
                    oauth: None,
                },
                Some(AuthConfig::ApiKey { key, header, query }) => {
                    let value = fetch(&at("key"), key);
                    ResolvedAuth {
                        header: header.clone().zip(value.clone()),
                        query: query.clone().zip(value),
                        oauth: None,
                    }
                }
                Some(AuthConfig::Oauth2ClientCredentials { token_url, client_id, client_secret, scope }) => {
                    ResolvedAuth {
                        oauth: fetch(&at("client_secret"), client_secret).map(|secret| ResolvedOAuth {
                            token_url: token_url.clone(),
                            client_id: client_id.clone(),
                            client_secret: Some(secret),
                            refresh_token: None,
                            scope: scope.clone(),
                        }),
                        ..ResolvedAuth::default()
                    }
                }
                Some(AuthConfig::Oauth2RefreshToken { token_url, client_id, client_secret, refresh_token, scope }) => {
                    let secret = client_secret.as_ref().map(|s| fetch(&at("client_secret"), s));
                    let refresh = fetch(&at("refresh_token"), refresh_token);
                    let oauth = match (secret, refresh) {
                        (Some(None), _) | (_, None) => None,
                        (secret, Some(refresh)) => Some(ResolvedOAuth {
                            token_url: token_url.clone(),
                            client_id: client_id.clone(),
                            client_secret: secret.flatten(),
                            refresh_token: Some(refresh),
                            scope: scope.clone(),
                        }),
                    };
                    ResolvedAuth { oauth, ..ResolvedAuth::default() }
                }
            };
            connectors.insert(name.clone(), auth);
        }
        let mut flows = BTreeMap::new();
        let mut key_errors = Vec::new();
        for (name, flow) in &self.config.flows {
            let signature = match &flow.source {
                SourceConfig::Webhook { signature, .. } => signature.as_ref(),
                _ => None,
            };
            let verifier = signature.map(|sig| {
                let refs = sig.secret.iter().chain(sig.secrets.iter());
                let keys: Vec<SigningSecret> = refs
                    .filter_map(|r| {
                        let key = if sig.secret.as_ref() == Some(r) { "secret" } else { "secrets" };
                        let path = ["flows", name.as_str(), "source", "signature", key];
                        let value = fetch(&path, r)?;
                        SigningSecret::parse(sig.scheme, value.expose())
                            .map_err(|e| {
                                key_errors.push(Finding::error(
                                    &path,
                                    format!("the value of `{r}` is not a {} secret: {e}", sig.scheme.as_str()),
                                    "copy the signing secret exactly as the sender shows it",
                                ))
                            })
                            .ok()
                    })
                    .collect();
                std::sync::Arc::new(Verifier::new(sig.scheme, keys).with_tolerance(sig.tolerance))
            });
            let pipeline = crate::pipeline::Pipeline {
                key: flow.key.clone(),
                idempotency_key: flow.idempotency_key.clone(),
                ..Default::default()
            };
            flows.insert(name.clone(), ResolvedFlow { verifier, pipeline: std::sync::Arc::new(pipeline) });
        }
        let admin_token = self.config.engine.admin_token.as_ref().and_then(|r| fetch(&["engine", "admin_token"], r));
        let mut source_urls = BTreeMap::new();
        for (name, flow) in &self.config.flows {
            let url = match &flow.source {
                SourceConfig::PostgresOutbox(o) => &o.url,
                SourceConfig::PostgresCdc(c) => &c.url,
                _ => continue,
            };
            let url = match SecretRef::parse(url) {
                Ok(r) => fetch(&["flows", name, "source", "url"], &r),
                Err(_) => Some(Secret::new(url.clone())),
            };
            if let Some(url) = url {
                source_urls.insert(name.clone(), url);
            }
        }
        let mut notify = BTreeMap::new();
        for (name, n) in &self.config.notify {
            let url = match SecretRef::parse(&n.url) {
                Ok(r) => fetch(&["notify", name, "url"], &r),
                Err(_) => Some(Secret::new(n.url.clone())),
            };
            let Some(url) = url else { continue };
            let url_ok = ["http://", "https://"]
                .iter()
                .any(|p| url.expose().strip_prefix(p).is_some_and(|r| !r.is_empty() && !r.starts_with('/')));
            if url_ok {
                notify.insert(name.clone(), url);
            } else {
                // The value may be a secret: it is not repeated.
                key_errors.push(Finding::error(
                    &["notify", name, "url"],
                    format!("`{}` does not hold an http(s) URL", n.url),
                    "give the whole URL, e.g. https://hooks.slack.com/services/...",
                ));
            }
        }
        findings.extend(key_errors);
        if findings.is_empty() {
            Ok(Resolved { flows, connectors, admin_token, notify, source_urls, connector_urls })
        } else {
            Err(ConfigErrors(self.locate(findings)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::load;

    const CONFIG: &str = r#"
[connectors.a]
type = "http"
base_url = "https://a.example"
auth = { type = "bearer", token = "env:A_TOKEN" }

[connectors.b]
type = "http"
base_url = "https://b.example"
auth = { type = "basic", username = "dovetail", password = "env:B_PASSWORD" }

[flows.f]
source = { type = "webhook", path = "/hooks/f", signature = { scheme = "github", secrets = ["env:OLD", "env:NEW"] } }
sink = { type = "http", connector = "a" }
"#;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn bearer_and_basic_become_authorization_headers() {
        let (loaded, _) = load(CONFIG, Path::new("d.toml")).unwrap();
        let r =
            loaded.resolve(&env(&[("A_TOKEN", "t0k"), ("B_PASSWORD", "pa:ss"), ("OLD", "o"), ("NEW", "n")])).unwrap();
        let header =
            |c: &str| r.connectors[c].header.as_ref().map(|(n, v)| (n.clone(), v.expose().to_string())).unwrap();
        assert_eq!(header("a"), ("authorization".into(), "Bearer t0k".into()));
        // base64("dovetail:pa:ss")
        assert_eq!(header("b"), ("authorization".into(), "Basic ZG92ZXRhaWw6cGE6c3M=".into()));
        assert!(r.flows["f"].verifier.is_some());
    }

    #[test]
    fn api_keys_go_in_a_header_or_a_query_parameter() {
        let text = CONFIG.replace(
            r#"auth = { type = "bearer", token = "env:A_TOKEN" }"#,
            r#"auth = { type = "api_key", query = "api_key", key = "env:A_TOKEN" }"#,
        );
        let (loaded, _) = load(&text, Path::new("d.toml")).unwrap();
        let r = loaded.resolve(&env(&[("A_TOKEN", "k3y"), ("B_PASSWORD", "p"), ("OLD", "o"), ("NEW", "n")])).unwrap();
        let (name, value) = r.connectors["a"].query.clone().unwrap();
        assert_eq!((name.as_str(), value.expose()), ("api_key", "k3y"));
        assert!(r.connectors["a"].header.is_none());
        let both = text.replace(r#"query = "api_key","#, r#"query = "api_key", header = "X-Key","#);
        assert!(errors_of(&both).iter().any(|e| e.starts_with("connectors.a.auth: ")), "{:?}", errors_of(&both));
    }

    #[test]
    fn oauth2_grants_resolve_their_secrets() {
        let cc = CONFIG.replace(
            r#"auth = { type = "bearer", token = "env:A_TOKEN" }"#,
            r#"auth = { type = "oauth2_client_credentials", token_url = "https://a.example/oauth/token", client_id = "dovetail", client_secret = "env:A_TOKEN", scope = "orders:write" }"#,
        );
        let (loaded, _) = load(&cc, Path::new("d.toml")).unwrap();
        let r = loaded.resolve(&env(&[("A_TOKEN", "s3"), ("B_PASSWORD", "p"), ("OLD", "o"), ("NEW", "n")])).unwrap();
        let o = r.connectors["a"].oauth.clone().unwrap();
        assert_eq!(
            (o.client_id.as_str(), o.client_secret.unwrap().expose(), o.scope.as_deref()),
            ("dovetail", "s3", Some("orders:write"))
        );
        assert!(o.refresh_token.is_none());

        let rt = CONFIG.replace(
            r#"auth = { type = "bearer", token = "env:A_TOKEN" }"#,
            r#"auth = { type = "oauth2_refresh_token", token_url = "ftp://x", client_id = "dovetail", refresh_token = "env:RT" }"#,
        );
        assert!(errors_of(&rt).iter().any(|e| e.starts_with("connectors.a.auth.token_url")), "{:?}", errors_of(&rt));
        let rt = rt.replace("ftp://x", "https://a.example/token");
        let (loaded, _) = load(&rt, Path::new("d.toml")).unwrap();
        let missing = loaded.resolve(&env(&[("B_PASSWORD", "p"), ("OLD", "o"), ("NEW", "n")])).unwrap_err();
        assert_eq!(missing.0[0].key, "connectors.a.auth.refresh_token");
        let r = loaded.resolve(&env(&[("RT", "r1"), ("B_PASSWORD", "p"), ("OLD", "o"), ("NEW", "n")])).unwrap();
        let o = r.connectors["a"].oauth.clone().unwrap();
        assert_eq!(o.refresh_token.unwrap().expose(), "r1");
        assert!(o.client_secret.is_none(), "a public client");
    }

    #[test]
    fn rate_limits_and_breakers_are_checked() {
        let text = CONFIG.replace("base_url = \"https://a.example\"", "base_url = \"https://a.example\"\nrate_limit = { requests_per_second = 0 }\nbreaker = { failure_ratio = 1.5, open_for = \"1m\", max_open_for = \"10s\" }");
        let errors = errors_of(&text);
        for key in [
            "connectors.a.rate_limit.requests_per_second",
            "connectors.a.breaker.failure_ratio",
            "connectors.a.breaker.max_open_for",
        ] {
            assert!(errors.iter().any(|e| e.starts_with(key)), "{key}: {errors:?}");
        }
    }

    #[test]
    fn every_missing_secret_is_reported_with_its_key() {
        let (loaded, _) = load(CONFIG, Path::new("d.toml")).unwrap();
        let errors = loaded.resolve(&env(&[("A_TOKEN", "t0k"), ("NEW", "")])).unwrap_err();
        let keys: Vec<&str> = errors.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["connectors.b.auth.password", "flows.f.source.signature.secrets", "flows.f.source.signature.secrets"],
            "{errors}"
        );
        assert!(errors.0.iter().all(|e| e.line > 0), "{errors}");
    }

    fn errors_of(text: &str) -> Vec<String> {
        match load(text, Path::new("d.toml")) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| format!("{}: {}", e.key, e.message)).collect(),
        }
    }

    #[test]
    fn webhook_paths_that_would_route_as_wildcards_are_refused() {
        for bad in ["/hooks/{id}", "/hooks/:id", "/hooks/*rest", "/hooks/a b", "/hooks//x", "/hooks/x/", "/hooks?x=1"] {
            let text = CONFIG.replace("/hooks/f", bad);
            let errors = errors_of(&text);
            assert!(errors.iter().any(|e| e.starts_with("flows.f.source.path")), "{bad}: {errors:?}");
        }
        assert!(errors_of(&CONFIG.replace("/hooks/f", "/hooks/v1.orders-new_x~y")).is_empty());
    }

    #[test]
    fn static_headers_cannot_shadow_the_engines_own() {
        let text = CONFIG.replace(
            "base_url = \"https://a.example\"",
            "base_url = \"https://a.example\"\nheaders = { \"Idempotency-Key\" = \"x\", \"Bad Name\" = \"y\" }",
        );
        let errors = errors_of(&text);
        assert!(errors.iter().any(|e| e.starts_with("connectors.a.headers.Idempotency-Key: ")), "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("connectors.a.headers.Bad Name: ")), "{errors:?}");
    }

    #[test]
    fn delivery_threads_must_be_at_least_one() {
        let with = |n: &str| format!("[engine]\ndelivery_threads = {n}\n{CONFIG}");
        let errors = errors_of(&with("0"));
        assert!(errors.iter().any(|e| e.starts_with("engine.delivery_threads: ")), "{errors:?}");
        assert!(errors_of(&with("2")).is_empty());
    }

    #[test]
    fn max_in_flight_is_bounded() {
        let text = CONFIG
            .replace("base_url = \"https://a.example\"", "base_url = \"https://a.example\"\nmax_in_flight = 99999999");
        assert!(errors_of(&text).iter().any(|e| e.starts_with("connectors.a.max_in_flight")));
    }

    #[test]
    fn resolved_secrets_never_show_in_debug_output() {
        let (loaded, _) = load(CONFIG, Path::new("d.toml")).unwrap();
        let r = loaded
            .resolve(&env(&[("A_TOKEN", "s3cret-token"), ("B_PASSWORD", "pw-value"), ("OLD", "o"), ("NEW", "n")]))
            .unwrap();
        let shown = format!("{r:?}");
        assert!(!shown.contains("s3cret-token") && !shown.contains("pw-value"), "{shown}");
    }

    const SERVICES: &str = r#"
[connectors.db]
type = "postgres"
url = "env:WAREHOUSE_DB"

[connectors.bus]
type = "nats"
url = "nats://127.0.0.1:4222"

[connectors.mq]
type = "amqp"
url = "env:MQ_URL"

[connectors.api]
type = "http"
base_url = "https://api.example"

[flows.to_db]
source = { type = "amqp", connector = "mq", queue = "orders" }
sink = { type = "postgres", connector = "db", table = "app.orders", key = ["id"], version_column = "version" }

[flows.to_bus]
source = { type = "nats", connector = "bus", stream = "ORDERS", consumer = "dovetail" }
sink = { type = "nats", connector = "bus", subject = "orders.accepted" }

[flows.cdc]
source = { type = "postgres_cdc", url = "env:WAREHOUSE_DB", slot = "dovetail_orders", publication = "dovetail_orders", tables = ["public.orders"], schedule = "every 1s" }
sink = { type = "amqp", connector = "mq", exchange = "events", routing_key = "orders" }
"#;

    #[test]
    fn database_and_broker_connectors_resolve_their_urls() {
        assert_eq!(errors_of(SERVICES), Vec::<String>::new());
        let (loaded, _) = load(SERVICES, Path::new("d.toml")).unwrap();
        let r =
            loaded.resolve(&env(&[("WAREHOUSE_DB", "postgres://u:p@db/app"), ("MQ_URL", "amqp://u:p@mq")])).unwrap();
        assert_eq!(r.connector_urls["db"].expose(), "postgres://u:p@db/app");
        assert_eq!(r.connector_urls["bus"].expose(), "nats://127.0.0.1:4222");
        assert_eq!(r.source_urls["cdc"].expose(), "postgres://u:p@db/app");
        let missing = loaded.resolve(&env(&[("WAREHOUSE_DB", "postgres://db/app")])).unwrap_err();
        assert_eq!(missing.0[0].key, "connectors.mq.url");
    }

    #[test]
    fn sinks_and_sources_need_a_connector_of_their_kind() {
        let cases = [
            (
                r#"connector = "db", table"#,
                r#"connector = "api", table"#,
                "flows.to_db.sink.connector: connector `api` is of type `http`",
            ),
            (
                r#"connector = "mq", queue"#,
                r#"connector = "nope", queue"#,
                "flows.to_db.source.connector: there is no connector named `nope`",
            ),
            (r#"subject = "orders.accepted""#, r#"subject = "orders.*""#, "flows.to_bus.sink.subject"),
            (r#"key = ["id"], version_column"#, r#"key = [], version_column"#, "flows.to_db.sink.key"),
            (
                r#"version_column = "version""#,
                r#"version_column = "version", columns = ["id"]"#,
                "flows.to_db.sink.columns: `version` (version_column)",
            ),
            (r#"tables = ["public.orders"]"#, r#"tables = ["orders; drop"]"#, "flows.cdc.source.tables"),
            (r#"slot = "dovetail_orders""#, r#"slot = "Bad-Slot""#, "flows.cdc.source.slot"),
            (
                r#"url = "nats://127.0.0.1:4222""#,
                r#"url = "http://127.0.0.1:4222""#,
                "connectors.bus.url: `http://127.0.0.1:4222` is not a nats:// URL",
            ),
            (
                r#"url = "nats://127.0.0.1:4222""#,
                r#"url = "nats://me:secret@127.0.0.1:4222""#,
                "connectors.bus.url: this URL holds a password",
            ),
            (r#"consumer = "dovetail""#, r#"consumer = "a.b""#, "flows.to_bus.source.consumer"),
        ];
        for (from, to, expected) in cases {
            assert!(SERVICES.contains(from), "{from}");
            let errors = errors_of(&SERVICES.replace(from, to));
            assert!(errors.iter().any(|e| e.starts_with(expected)), "{to}: {errors:?}");
        }
        let twice = format!(
            "{SERVICES}\n[flows.cdc2]\nsource = {{ type = \"postgres_cdc\", url = \"env:WAREHOUSE_DB\", slot = \"dovetail_orders\", publication = \"p2\", tables = [\"t\"], schedule = \"every 1s\" }}\nsink = {{ type = \"nats\", connector = \"bus\", subject = \"x\" }}\n"
        );
        assert!(
            errors_of(&twice).iter().any(|e| e.starts_with("flows.cdc2.source.slot: flow `cdc` reads the same")),
            "{:?}",
            errors_of(&twice)
        );
        let prefetch = SERVICES.replace(r#"queue = "orders" }"#, r#"queue = "orders", prefetch = 0 }"#);
        assert!(errors_of(&prefetch).iter().any(|e| e.starts_with("flows.to_db.source.prefetch")));
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(super::super::without_credentials("amqp://u:p@mq:5672/%2f?x=1"), "amqp://mq:5672/%2f");
        assert_eq!(super::super::without_credentials("postgres://u:p@db/app?password=x"), "postgres://db/app");
        assert_eq!(super::super::without_credentials("nats://h:4222"), "nats://h:4222");
        assert_eq!(super::super::without_credentials("env:DB"), "env:DB");
    }
}
