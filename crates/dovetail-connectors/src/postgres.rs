//! The PostgreSQL sink: upserts records into a table on their stable key.
//!
//! A batch is one statement, so it is applied whole or not at all:
//!
//! ```sql
//! WITH input AS (SELECT r.*, e.n FROM jsonb_array_elements($1) WITH ORDINALITY e(doc, n),
//!                     jsonb_populate_record(NULL::t, e.doc) r),
//!      latest AS (SELECT DISTINCT ON (key) * FROM input ORDER BY key, version DESC, n DESC)
//! INSERT INTO t AS old (cols) SELECT cols FROM latest
//! ON CONFLICT (key) DO UPDATE SET col = EXCLUDED.col, ...
//! WHERE old.version IS NULL OR old.version <= EXCLUDED.version
//! ```
//!
//! PostgreSQL converts each field to its column's type. Two records of one
//! key in a batch collapse to the newest (an upsert may not touch a row
//! twice), and the version guard keeps a stored newer row: a late or
//! replayed old record is applied as a no-op, never as a regression. An
//! equal version is written again, so a replay after a mapping fix corrects
//! the row.
//!
//! Records that cannot be written are told apart from the rest: a record
//! that is not an object or lacks a key or version is refused before the
//! statement; if the statement fails on the data (SQLSTATE classes 22 and
//! 23: a bad value, a constraint), each record is written alone so only the
//! bad ones are refused.

use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::sync::Mutex;

use dovetail_core::config::{PostgresSinkConfig, Secret};
use dovetail_core::policy::{Answer, ServiceAnswer};

use crate::http::{AttemptResult, BatchResult, ItemAnswer, Outbound};

/// One flow's upsert target.
pub struct PgSink {
    connector: String,
    url: Secret,
    config: PostgresSinkConfig,
    timeout: Duration,
    /// Idle connections; the dispatcher's permits bound how many exist.
    idle: Mutex<Vec<tokio_postgres::Client>>,
    /// The statement, built once the table's columns are known, and again
    /// after the table changed under it.
    statement: std::sync::Mutex<Option<Arc<String>>>,
}

impl std::fmt::Debug for PgSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSink").field("connector", &self.connector).field("table", &self.config.table).finish()
    }
}

/// A failure that applies to the whole write.
struct Failed {
    answer: Answer,
    detail: String,
    /// A bad value (SQLSTATE class 22) or a broken constraint (23): about a
    /// record, not the database, so worth narrowing down to which one.
    data: bool,
}

impl PgSink {
    pub fn new(connector: &str, url: Secret, config: PostgresSinkConfig, timeout: Duration) -> PgSink {
        PgSink {
            connector: connector.to_string(),
            url,
            config,
            timeout,
            idle: Mutex::new(Vec::new()),
            statement: std::sync::Mutex::new(None),
        }
    }

    pub fn connector(&self) -> &str {
        &self.connector
    }

    /// `table` for display.
    pub fn table(&self) -> &str {
        &self.config.table
    }

    pub async fn send_one(&self, out: Outbound<'_>) -> AttemptResult {
        let result = self.send_batch(&[out]).await;
        match result.items {
            Ok(Some(mut items)) if items.len() == 1 => {
                let item = items.remove(0);
                AttemptResult { answer: item.answer, detail: item.detail, ..result.request }
            }
            _ => result.request,
        }
    }

    /// Upserts the records in one statement; per-record answers whenever
    /// some were refused and others written.
    ///
    /// The whole write, narrowing down included, stays within one and a half
    /// `timeout`s, so it ends well inside the records' lease (two timeouts
    /// and five seconds).
    pub async fn send_batch(&self, items: &[Outbound<'_>]) -> BatchResult {
        let started = Instant::now();
        let deadline = started + self.timeout + self.timeout / 2;
        let mut answers: Vec<Option<ItemAnswer>> = vec![None; items.len()];
        let mut rows = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match self.row_problem(item.payload) {
                Some(why) => answers[i] = Some(refused(why)),
                None => rows.push(i),
            }
        }
        let whole = |answer: Answer, detail: Option<String>| BatchResult {
            request: AttemptResult { answer, duration: started.elapsed(), detail, hint: Default::default() },
            items: Ok(None),
        };
        if rows.is_empty() {
            let items = answers.into_iter().flatten().collect();
            return BatchResult { items: Ok(Some(items)), ..whole(applied(), None) };
        }
        let client = match self.client(deadline).await {
            Ok(c) => c,
            Err(f) => return whole(f.answer, Some(f.detail)),
        };
        let result = self.write(&client, items, &rows, answers, deadline).await;
        if !client.is_closed() {
            self.idle.lock().await.push(client);
        }
        match result {
            Ok(None) => whole(applied(), None),
            Ok(Some(items)) => BatchResult { items: Ok(Some(items)), ..whole(applied(), None) },
            Err(f) => whole(f.answer, Some(f.detail)),
        }
    }

    /// Writes `rows` of `items`: `Ok(None)` when every record was written,
    /// `Ok(Some(answers))` when some were refused.
    async fn write(
        &self,
        client: &tokio_postgres::Client,
        items: &[Outbound<'_>],
        rows: &[usize],
        mut answers: Vec<Option<ItemAnswer>>,
        deadline: Instant,
    ) -> Result<Option<Vec<ItemAnswer>>, Failed> {
        let body = json_array(rows.iter().map(|&i| items[i].payload));
        match self.upsert(client, &body, deadline).await {
            Ok(()) => {}
            Err(f) if is_data_error(&f) && rows.len() == 1 => answers[rows[0]] = Some(refused(f.detail)),
            Err(f) if is_data_error(&f) => {
                // Which record is it? Each alone: only the bad ones are refused.
                // A database failure midway leaves what was written written
                // (upserts are idempotent) and the batch goes again.
                for &i in rows {
                    answers[i] = Some(match self.upsert(client, &json_array([items[i].payload]), deadline).await {
                        Ok(()) => ItemAnswer { answer: applied(), detail: None },
                        Err(f) if is_data_error(&f) => refused(f.detail),
                        Err(f) => return Err(f),
                    });
                }
            }
            Err(f) => return Err(f),
        }
        if answers.iter().all(Option::is_none) {
            return Ok(None);
        }
        Ok(Some(answers.into_iter().map(|a| a.unwrap_or(ItemAnswer { answer: applied(), detail: None })).collect()))
    }

    /// Why a record cannot be a row, checked before anything is sent.
    fn row_problem(&self, payload: &[u8]) -> Option<String> {
        let value: serde_json::Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => return Some(format!("the record is not JSON: {e}")),
        };
        let Some(object) = value.as_object() else {
            return Some("a row is written from a JSON object; the record is not one".to_string());
        };
        let needed =
            self.config.key.iter().map(|k| (k, "key")).chain(self.config.version_column.iter().map(|v| (v, "version")));
        for (column, what) in needed {
            if object.get(column).is_none_or(serde_json::Value::is_null) {
                return Some(format!("the record has no `{column}` ({what} column)"));
            }
        }
        None
    }

    async fn upsert(&self, client: &tokio_postgres::Client, body: &str, deadline: Instant) -> Result<(), Failed> {
        let cached = self.statement.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sql = match cached {
            Some(sql) => sql,
            None => {
                let sql = Arc::new(within(deadline, client, self.build_statement(client)).await??);
                *self.statement.lock().unwrap_or_else(|p| p.into_inner()) = Some(sql.clone());
                sql
            }
        };
        let result = match within(deadline, client, client.execute(sql.as_str(), &[&body])).await? {
            Ok(_) => Ok(()),
            Err(e) => Err(failure(&e)),
        };
        if let Err(f) = &result
            && f.answer == Answer::Service(ServiceAnswer::Unavailable)
        {
            // The table may have changed (a column dropped or added): read
            // it again for the next attempt.
            *self.statement.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        result
    }

    /// The upsert for this table, with every column written (read from the
    /// catalogue unless the config lists them).
    async fn build_statement(&self, client: &tokio_postgres::Client) -> Result<String, Failed> {
        let c = &self.config;
        let columns = match &c.columns {
            Some(columns) => columns.clone(),
            None => {
                // Quoted as the statement quotes it, so `Orders` is `"Orders"` in both.
                let rows = client
                    .query(
                        "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass \
                         AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attidentity <> 'a' \
                         ORDER BY attnum",
                        &[&quoted(&c.table)],
                    )
                    .await
                    .map_err(|e| failure(&e))?;
                rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
            }
        };
        // A key the statement cannot write (generated, `GENERATED ALWAYS AS
        // IDENTITY`) would never conflict: every record would insert a new row.
        if let Some(k) = c.key.iter().find(|k| !columns.contains(k)) {
            return Err(Failed {
                answer: Answer::Service(ServiceAnswer::Refused),
                detail: format!(
                    "key column `{k}` of `{}` cannot be written (missing, generated or an identity always generated); the upsert needs it",
                    c.table
                ),
                data: false,
            });
        }
        Ok(upsert_sql(&c.table, &c.key, c.version_column.as_deref(), &columns))
    }

    async fn client(&self, deadline: Instant) -> Result<tokio_postgres::Client, Failed> {
        while let Some(c) = self.idle.lock().await.pop() {
            if !c.is_closed() {
                return Ok(c);
            }
        }
        let mut config: tokio_postgres::Config =
            // Retried, never dead-lettered: every record would fail the same
            // way until the operator fixes the URL.
            self.url.expose().parse().map_err(|e: tokio_postgres::Error| Failed {
                answer: Answer::Connection,
                detail: format!("connector `{}`: the URL is not a PostgreSQL URL: {e}", self.connector),
                data: false,
            })?;
        config.connect_timeout(self.timeout).keepalives_idle(Duration::from_secs(30));
        config.application_name("dovetail");
        // `connect_timeout` covers the TCP connect only; this covers the handshake too.
        let left = deadline.saturating_duration_since(Instant::now());
        let connected = tokio::time::timeout(left, config.connect(tokio_postgres::NoTls)).await;
        let (client, connection) = match connected {
            Ok(c) => c.map_err(|e| failure(&e))?,
            Err(_) => {
                return Err(Failed {
                    answer: Answer::Timeout,
                    detail: format!("connecting took longer than {left:?}"),
                    data: false,
                });
            }
        };
        let connector = self.connector.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%connector, error = %e, "a PostgreSQL sink connection ended");
            }
        });
        Ok(client)
    }
}

/// Runs one query within the write's deadline (and `timeout`); past it, the
/// server is asked to cancel the query, which may still run.
async fn within<T>(
    deadline: Instant,
    client: &tokio_postgres::Client,
    query: impl std::future::Future<Output = T>,
) -> Result<T, Failed> {
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, query).await {
        Ok(t) => Ok(t),
        Err(_) => {
            let cancel = client.cancel_token();
            tokio::spawn(async move {
                let _ = cancel.cancel_query(tokio_postgres::NoTls).await;
            });
            Err(Failed {
                answer: Answer::Timeout,
                detail: "the upsert did not finish in time (one and a half times the connector's timeout)".into(),
                data: false,
            })
        }
    }
}

fn applied() -> Answer {
    Answer::Service(ServiceAnswer::Applied)
}

fn refused(detail: String) -> ItemAnswer {
    ItemAnswer { answer: Answer::Service(ServiceAnswer::Refused), detail: Some(detail) }
}

fn json_array<'a>(payloads: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut body = String::from("[");
    for (i, p) in payloads.into_iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&String::from_utf8_lossy(p));
    }
    body.push(']');
    body
}

fn is_data_error(f: &Failed) -> bool {
    f.data
}

/// What an error means for the write, by SQLSTATE class.
fn failure(e: &tokio_postgres::Error) -> Failed {
    let Some(db) = e.as_db_error() else {
        return Failed { answer: Answer::Connection, detail: pg_error(e), data: false };
    };
    let code = db.code().code();
    let answer = match &code[..2] {
        "22" | "23" => ServiceAnswer::Refused,
        "28" => ServiceAnswer::Denied,
        "42" if code == "42501" => ServiceAnswer::Denied,
        // An undefined table or column: the table may have changed under a
        // cached statement; the statement is read again and the write retried.
        "42" if code == "42P01" || code == "42703" => ServiceAnswer::Unavailable,
        // Any other class 42 (a type mismatch the table's definition causes):
        // every record would fail the same way until the table is fixed;
        // they wait in the DLQ.
        "42" => ServiceAnswer::Refused,
        _ => ServiceAnswer::Unavailable,
    };
    Failed { answer: Answer::Service(answer), detail: pg_error(e), data: matches!(&code[..2], "22" | "23") }
}

/// What PostgreSQL said (code, message, detail), not just "db error"; never the URL.
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let detail = db.detail().map(|d| format!(" ({d})")).unwrap_or_default();
            format!("{} [{}]{detail}", db.message(), db.code().code())
        }
        None => {
            let cause = std::error::Error::source(e).map(|s| format!(": {s}")).unwrap_or_default();
            format!("{e}{cause}")
        }
    }
}

/// A checked name (letters, digits, `_`, `schema.table`) quoted for SQL: `a.b` → `"a"."b"`.
pub fn quoted(name: &str) -> String {
    name.split('.').map(|part| format!("\"{part}\"")).collect::<Vec<_>>().join(".")
}

/// The upsert statement (its one parameter: a JSON array of objects, as text).
pub fn upsert_sql(table: &str, key: &[String], version: Option<&str>, columns: &[String]) -> String {
    let t = quoted(table);
    let cols = columns.iter().map(|c| quoted(c)).collect::<Vec<_>>().join(", ");
    let keys = key.iter().map(|c| quoted(c)).collect::<Vec<_>>().join(", ");
    let newest = match version {
        Some(v) => format!("{}, {} DESC NULLS LAST, dovetail_n DESC", keys, quoted(v)),
        None => format!("{keys}, dovetail_n DESC"),
    };
    let updates: Vec<String> =
        columns.iter().filter(|c| !key.contains(c)).map(|c| format!("{0} = EXCLUDED.{0}", quoted(c))).collect();
    let on_conflict = if updates.is_empty() {
        "DO NOTHING".to_string()
    } else {
        let guard = match version {
            Some(v) => format!(" WHERE old.{0} IS NULL OR old.{0} <= EXCLUDED.{0}", quoted(v)),
            None => String::new(),
        };
        format!("DO UPDATE SET {}{guard}", updates.join(", "))
    };
    format!(
        "WITH input AS (SELECT r.*, e.dovetail_n FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY \
         AS e(doc, dovetail_n), LATERAL jsonb_populate_record(NULL::{t}, e.doc) AS r), \
         latest AS (SELECT DISTINCT ON ({keys}) * FROM input ORDER BY {newest}) \
         INSERT INTO {t} AS old ({cols}) SELECT {cols} FROM latest ON CONFLICT ({keys}) {on_conflict}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_guards_versions_and_collapses_duplicates() {
        let cols = ["id", "name", "version"].map(String::from);
        let sql = upsert_sql("app.customers", &["id".into()], Some("version"), &cols);
        assert!(sql.contains(r#"INSERT INTO "app"."customers" AS old ("id", "name", "version")"#), "{sql}");
        assert!(
            sql.contains(
                r#"ON CONFLICT ("id") DO UPDATE SET "name" = EXCLUDED."name", "version" = EXCLUDED."version""#
            )
        );
        assert!(sql.contains(r#"WHERE old."version" IS NULL OR old."version" <= EXCLUDED."version""#));
        assert!(
            sql.contains(
                r#"DISTINCT ON ("id") * FROM input ORDER BY "id", "version" DESC NULLS LAST, dovetail_n DESC"#
            )
        );
        let no_version = upsert_sql("t", &["id".into()], None, &cols);
        assert!(!no_version.contains("WHERE old"), "{no_version}");
        let keys_only = upsert_sql("t", &["id".into()], None, &["id".to_string()]);
        assert!(keys_only.ends_with("DO NOTHING"));
    }
}
