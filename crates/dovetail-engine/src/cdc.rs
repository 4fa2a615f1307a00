//! Change data capture from PostgreSQL: the row changes of chosen tables,
//! decoded from logical replication (the `pgoutput` plugin, see
//! [`pgoutput`]) through a replication slot, each journalled as one record.
//!
//! `tokio-postgres` cannot speak the streaming replication protocol, so the
//! slot is read through the SQL interface: on the flow's schedule,
//! `pg_logical_slot_peek_binary_changes` returns up to `batch` messages
//! (always whole transactions: the server stops only after the transaction
//! that crosses the limit), and reads go on until one returns nothing.
//!
//! **Guarantee.** The slot is advanced (`pg_replication_slot_advance`) only
//! after every change of the transactions read has been journalled, and only
//! to the end LSN of the last of them (the `lsn` of its Commit row, where
//! its commit record ends: a slot confirmed there has consumed exactly that
//! transaction; the commit record's start, which Begin and Commit also
//! carry, would read it again for ever). A crash in between leaves the slot
//! where it was: the next run reads the same transactions again, and since a
//! change is named `cdc:SLOT:LSN:INDEX` (its own LSN and its place in its
//! transaction, the same on every read), the journal takes them as
//! duplicates. Nothing committed is lost or doubled; a rolled-back
//! transaction is never decoded.
//!
//! A read that returns nothing also advances the slot, to the WAL flush
//! position taken just before it: everything committed before that point was
//! decoded by the read and none of it is published, so the slot does not
//! hold WAL for ever while only other tables change.
//!
//! **A lost slot is not made again silently.** The source makes the slot
//! itself only while this flow has never read from it. Once it has (the
//! journal keeps `cdc:FLOW:SLOT`, written when the source makes the slot and
//! at its first advance on each connection), a slot that is gone (dropped by
//! hand, not carried over by a failover) is a setup error: a new slot would
//! start at the current WAL position, and every change committed since the
//! old one was lost would be skipped. The operator checks what was missed,
//! then makes the slot by hand
//! (`SELECT pg_create_logical_replication_slot('SLOT', 'pgoutput')`), and the
//! source goes on from there.
//!
//! **Timeouts.** Every query runs under the session's `statement_timeout`
//! ([`QUERY_TIMEOUT`]) and, on the client, a slightly longer timeout: a
//! connection that stops answering (half-open) is dropped, the run stops,
//! and the next run connects again. Nothing journalled is lost by that: the
//! slot was not advanced past it, and it is read again as duplicates.
//!
//! **Known limit: memory.** A read holds whole transactions in memory: the
//! server stops only after the transaction that crosses `batch`, so a
//! transaction of millions of rows (a bulk `UPDATE`, a large `COPY`) is read,
//! decoded and held at once, however small `batch` is. Such a read can also
//! take long enough to hit [`QUERY_TIMEOUT`], and then it fails at every
//! run; keep bulk changes to the captured tables in smaller transactions.
//!
//! Each change's payload:
//! `{"op": "insert"|"update"|"delete", "table": "public.orders", "lsn": "0/16B3748",
//! "xid": 1234, "commit_time": "<RFC 3339>", "new": {..}|null, "old": {..}|null,
//! "key": {..}|null, "unchanged": [..]}`; `old` when the table's replica
//! identity sends the old row (`FULL`), `key` when it sends only the key
//! (an update that changed the key, or a delete); `unchanged` names
//! TOASTed columns the server did not send (they are not in `new`). A
//! truncate is one record `{"op": "truncate", "tables": [..], "lsn", "xid",
//! "commit_time", "cascade", "restart_identity"}`. The `lsn` orders changes.

mod pgoutput;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::watch;

use dovetail_core::config::{CdcConfig, Secret};
use dovetail_journal::Ingested;

use dovetail_connectors::postgres::{pg_error, quoted};

use crate::contract::SourceContext;
use pgoutput::{Message, OldRow, Relations};

/// The server's limit on one query (`statement_timeout` on the session).
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(300);

/// The client's limit on one query (or on the whole setup): past the
/// server's own, so that a query the server cancels fails with its error,
/// and only a connection that stops answering ends here.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(QUERY_TIMEOUT.as_secs() + 30);

pub(crate) struct Cdc {
    pub ctx: SourceContext,
    pub config: CdcConfig,
    pub url: Secret,
}

/// What one run took.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CdcRun {
    pub transactions: usize,
    pub changes: usize,
    pub new: usize,
}

/// Why a run stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CdcError {
    /// The database is not ready for this source (an operator must act);
    /// tried again at every run, logged once.
    #[error("{0}")]
    Setup(String),
    /// The database, the journal or a message failed; tried again at the next run.
    #[error("{0}")]
    Failed(String),
    /// The database did not answer in time: the connection is dropped, and
    /// the next run connects again.
    #[error("{0}")]
    Stalled(String),
}

/// A connection, and what it knows. Dropping it ends the connection at
/// once; [`Session::close`] ends it so that the server has let go of the
/// slot when it returns.
struct Session {
    client: tokio_postgres::Client,
    /// The task driving the connection, aborted on drop: a half-open
    /// connection would otherwise linger until TCP gives up on it.
    connection: Option<tokio::task::JoinHandle<()>>,
    /// The server, tables, publication and slot were checked (or made) on it.
    ready: bool,
    /// That this flow has read from the slot is in the journal (written at
    /// the first advance on this connection, once).
    recorded: bool,
    relations: Relations,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(connection) = &self.connection {
            connection.abort();
        }
    }
}

/// How long each step of [`Session::close`] may take.
const CLOSE_STEP: Duration = Duration::from_secs(2);

impl Session {
    /// Ends the connection at shutdown. A read of the slot still running on
    /// the server (`interrupted`: its future was dropped, which does not stop
    /// it) is cancelled, and a trivial query waited for: the server answers
    /// it only after the cancelled read has ended and let go of the slot.
    /// Then the client says goodbye and the connection's task ends. Without
    /// this, the slot stayed held after the engine stopped, until the server
    /// finished decoding for nobody, and an operator or a restarted engine
    /// could not take it. Each step is bounded by [`CLOSE_STEP`]; past it
    /// the connection is dropped, as before.
    async fn close(mut self, interrupted: bool) {
        if interrupted {
            let cancel = self.client.cancel_token();
            let cancelled = tokio::time::timeout(CLOSE_STEP, cancel.cancel_query(tokio_postgres::NoTls)).await;
            if matches!(cancelled, Ok(Ok(()))) {
                let _ = tokio::time::timeout(CLOSE_STEP, self.client.simple_query("SELECT 1")).await;
            }
        }
        let Some(connection) = self.connection.take() else { return };
        // The client's end: the connection sends `Terminate` and finishes.
        drop(self);
        let abort = connection.abort_handle();
        if tokio::time::timeout(CLOSE_STEP, connection).await.is_err() {
            abort.abort();
        }
    }
}

/// What one read of the slot gave.
#[derive(Debug, Default)]
struct Batch {
    rows: usize,
    transactions: usize,
    changes: usize,
    new: usize,
    /// The end LSN of the last transaction whose changes are all journalled.
    last_end: Option<u64>,
    /// The WAL flush position taken before the read.
    flush_before: u64,
    /// What stopped the read after `last_end`, if anything did.
    failed: Option<CdcError>,
}

pub(crate) async fn run(source: Arc<Cdc>, mut stop: watch::Receiver<bool>) {
    let flow = source.ctx.flow.clone();
    let mut session: Option<Session> = None;
    // A setup problem is logged once, not at every run, until it changes.
    let mut reported: Option<String> = None;
    // Whether the loop ended in the middle of a read.
    let mut interrupted = false;
    while !*stop.borrow() {
        if session.as_ref().is_none_or(|s| s.client.is_closed()) {
            session = match source.connect().await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(%flow, error = %e, "cannot connect to the CDC database; trying again at the next run");
                    None
                }
            };
        }
        if let Some(s) = session.as_mut() {
            // Stopping mid-read leaves the slot where it was: what was journalled is read again as duplicates.
            let mut stopping = stop.clone();
            let drained = tokio::select! {
                d = source.drain(s, &stop) => Some(d),
                _ = stopping.wait_for(|s| *s) => None,
            };
            let Some(drained) = drained else {
                interrupted = true;
                break;
            };
            match drained {
                Ok(run) => {
                    if reported.take().is_some() {
                        tracing::info!(%flow, "the CDC source reads changes again");
                    }
                    if run.changes > 0 {
                        tracing::debug!(%flow, transactions = run.transactions, changes = run.changes, new = run.new, "changes journalled");
                    }
                }
                Err(e) => {
                    s.ready = false;
                    match e {
                        CdcError::Stalled(reason) => {
                            tracing::warn!(
                                %flow,
                                error = %reason,
                                "the CDC database stopped answering; the connection is dropped and made again at the next run"
                            );
                            session = None;
                        }
                        CdcError::Setup(reason) if reported.as_deref() != Some(reason.as_str()) => {
                            tracing::error!(%flow, %reason, "the CDC source cannot read changes; trying again at every run");
                            reported = Some(reason);
                        }
                        CdcError::Setup(reason) => {
                            tracing::debug!(%flow, %reason, "the CDC source still cannot read changes")
                        }
                        CdcError::Failed(reason) => tracing::warn!(
                            %flow,
                            error = %reason,
                            "CDC run stopped; changes not yet confirmed to the slot are read again at the next run"
                        ),
                    }
                }
            }
        }
        if !source.ctx.wait_for_next(&source.config.schedule, &mut stop).await {
            break;
        }
    }
    if let Some(s) = session {
        s.close(interrupted).await;
    }
}

impl Cdc {
    /// A new connection, with the session's `statement_timeout` set.
    async fn connect(&self) -> Result<Session, String> {
        let mut config: tokio_postgres::Config = self.url.expose().parse().map_err(|e| pg_error(&e))?;
        config
            .connect_timeout(Duration::from_secs(10))
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        // `connect_timeout` bounds the socket's connect, not the startup exchange after it.
        let (client, connection) = tokio::time::timeout(Duration::from_secs(30), config.connect(tokio_postgres::NoTls))
            .await
            .map_err(|_| "the database did not complete the connection within 30s".to_string())?
            .map_err(|e| pg_error(&e))?;
        let flow = self.ctx.flow.clone();
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(%flow, error = %e, "the CDC database connection ended");
            }
        });
        let session = Session {
            client,
            connection: Some(connection),
            ready: false,
            recorded: false,
            relations: Relations::default(),
        };
        let set = format!("SET statement_timeout = {}", QUERY_TIMEOUT.as_millis());
        match tokio::time::timeout(CLIENT_TIMEOUT, session.client.batch_execute(&set)).await {
            Ok(Ok(())) => Ok(session),
            Ok(Err(e)) => Err(format!("cannot set statement_timeout: {}", pg_error(&e))),
            Err(_) => Err(format!("the database did not answer `{set}` within {}s", CLIENT_TIMEOUT.as_secs())),
        }
    }

    /// The journal's key for "this flow has read from its slot".
    fn state_key(&self) -> String {
        format!("cdc:{}:{}", self.ctx.flow, self.config.slot)
    }

    /// Records in the journal that this flow has read from its slot, up to `lsn`.
    async fn record_read(&self, lsn: u64) -> Result<(), CdcError> {
        self.ctx
            .journal
            .save_state(&self.state_key(), lsn_text(lsn), self.ctx.clock.now())
            .await
            .map_err(|e| CdcError::Failed(format!("cannot record the slot's position in the journal: {e}")))
    }

    /// Reads until a read returns nothing, advancing the slot after each.
    async fn drain(&self, session: &mut Session, stop: &watch::Receiver<bool>) -> Result<CdcRun, CdcError> {
        if !session.ready {
            bounded("checking the database, publication and slot", self.prepare(&session.client)).await??;
            session.ready = true;
        }
        let mut run = CdcRun::default();
        while !*stop.borrow() {
            let batch = self.read(session).await?;
            run.transactions += batch.transactions;
            run.changes += batch.changes;
            run.new += batch.new;
            if batch.new > 0 {
                self.ctx.wake.notify_one();
            }
            if let Some(end) = batch.last_end {
                self.advance(session, end).await?;
            }
            if let Some(e) = batch.failed {
                return Err(e);
            }
            if batch.rows == 0 {
                self.advance(session, batch.flush_before).await?;
                break;
            }
        }
        Ok(run)
    }

    /// Checks the server and the tables, and makes the publication and then
    /// the slot if they are missing (in that order: a slot older than its
    /// publication cannot decode the changes in between).
    async fn prepare(&self, client: &tokio_postgres::Client) -> Result<(), CdcError> {
        let c = &self.config;
        let level: String = client
            .query_one("SELECT current_setting('wal_level')", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| failed(&e))?;
        if let Some(problem) = wal_level_problem(&level) {
            return Err(CdcError::Setup(problem));
        }
        let mut tables = Vec::with_capacity(c.tables.len());
        let mut missing = Vec::new();
        for t in &c.tables {
            let found = client
                .query_opt(
                    "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.oid = to_regclass($1)",
                    &[&quoted(t)],
                )
                .await
                .map_err(|e| failed(&e))?;
            match found {
                Some(row) => tables.push(row.try_get::<_, String>(0).map_err(|e| failed(&e))?),
                None => missing.push(format!("`{t}`")),
            }
        }
        if !missing.is_empty() {
            return Err(CdcError::Setup(format!(
                "table {} not found in the database: create it, or fix the source's `tables`",
                missing.join(", ")
            )));
        }
        tables.sort();

        let publication = client
            .query_opt("SELECT puballtables FROM pg_publication WHERE pubname = $1", &[&c.publication])
            .await
            .map_err(|e| failed(&e))?;
        match publication {
            None => {
                let list = c.tables.iter().map(|t| quoted(t)).collect::<Vec<_>>().join(", ");
                client
                    .batch_execute(&format!("CREATE PUBLICATION {} FOR TABLE {list}", quoted(&c.publication)))
                    .await
                    .map_err(|e| failed(&e))?;
                tracing::info!(flow = %self.ctx.flow, publication = %c.publication, tables = %tables.join(", "), "created the publication");
            }
            Some(row) => {
                let all: bool = row.try_get(0).map_err(|e| failed(&e))?;
                let covered: Vec<String> = client
                    .query(
                        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
                        &[&c.publication],
                    )
                    .await
                    .map_err(|e| failed(&e))?
                    .iter()
                    .map(|r| r.try_get::<_, String>(0))
                    .collect::<Result<_, _>>()
                    .map_err(|e| failed(&e))?;
                if all {
                    tracing::warn!(flow = %self.ctx.flow, publication = %c.publication, "the publication exists and is used as it is: it covers ALL tables, so every table's changes are read, not only `tables`");
                } else if covered != tables {
                    tracing::warn!(
                        flow = %self.ctx.flow,
                        publication = %c.publication,
                        covers = %covered.join(", "),
                        configured = %tables.join(", "),
                        "the publication exists and is used as it is: the tables it covers differ from `tables` (change it with ALTER PUBLICATION)"
                    );
                }
            }
        }

        let slot = client
            .query_opt(
                "SELECT coalesce(plugin::text, ''), slot_type, coalesce(database = current_database(), false) \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&c.slot],
            )
            .await
            .map_err(|e| failed(&e))?;
        match slot {
            None => {
                // Made afresh only if this flow never read from it: a new slot
                // starts here, and would skip whatever the lost one still held.
                let read = self.ctx.journal.load_state(&self.state_key()).await.map_err(|e| {
                    CdcError::Failed(format!("cannot read the slot's recorded position from the journal: {e}"))
                })?;
                if let Some(at) = read {
                    return Err(lost_slot(&c.slot, &at));
                }
                let at: String = client
                    .query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[&c.slot])
                    .await
                    .and_then(|row| row.try_get(0))
                    .map_err(|e| failed(&e))?;
                tracing::info!(flow = %self.ctx.flow, slot = %c.slot, lsn = %at, "created the replication slot; changes from here on are read");
                // From here on, losing it loses changes.
                self.record_read(parse_lsn(&at).map_err(CdcError::Failed)?).await?;
            }
            Some(row) => {
                let (plugin, kind, here): (String, String, bool) = (
                    row.try_get(0).map_err(|e| failed(&e))?,
                    row.try_get(1).map_err(|e| failed(&e))?,
                    row.try_get(2).map_err(|e| failed(&e))?,
                );
                if kind != "logical" || plugin != "pgoutput" {
                    return Err(CdcError::Setup(format!(
                        "replication slot `{}` exists but is a {kind} slot{}, not a logical one with pgoutput: name another slot",
                        c.slot,
                        if plugin.is_empty() { String::new() } else { format!(" of plugin `{plugin}`") }
                    )));
                }
                if !here {
                    return Err(CdcError::Setup(format!(
                        "replication slot `{}` belongs to another database: name another slot",
                        c.slot
                    )));
                }
            }
        }
        Ok(())
    }

    /// One read of the slot (without consuming it): journals every whole
    /// transaction read, in order, and says how far that got.
    async fn read(&self, session: &mut Session) -> Result<Batch, CdcError> {
        let c = &self.config;
        let client = &session.client;
        let flush: String =
            bounded("reading the WAL flush position", client.query_one("SELECT pg_current_wal_flush_lsn()::text", &[]))
                .await?
                .and_then(|row| row.try_get(0))
                .map_err(|e| failed(&e))?;
        let mut batch = Batch { flush_before: parse_lsn(&flush).map_err(CdcError::Failed)?, ..Batch::default() };
        let limit = i32::try_from(c.batch).unwrap_or(i32::MAX);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&c.slot, &limit, &c.publication];
        let peek = client.query(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
             'proto_version', '1', 'publication_names', $3)",
            &params,
        );
        let rows = bounded("reading the slot", peek).await?.map_err(|e| self.peek_error(&e))?;
        batch.rows = rows.len();
        let mut assembler = Assembler { slot: &c.slot, relations: &mut session.relations, open: None };
        for row in &rows {
            let transaction = row
                .try_get::<_, &str>(0)
                .map_err(|e| pg_error(&e))
                .and_then(parse_lsn)
                .and_then(|lsn| Ok((lsn, row.try_get::<_, &[u8]>(1).map_err(|e| pg_error(&e))?)))
                .and_then(|(lsn, data)| assembler.feed(lsn, data));
            let transaction = match transaction {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => {
                    batch.failed = Some(CdcError::Failed(e));
                    return Ok(batch);
                }
            };
            for change in transaction.changes {
                match self.journal(change).await {
                    Ok(new) => {
                        batch.changes += 1;
                        batch.new += usize::from(new);
                    }
                    Err(e) => {
                        batch.failed = Some(CdcError::Failed(e));
                        return Ok(batch);
                    }
                }
            }
            batch.transactions += 1;
            batch.last_end = Some(transaction.end_lsn);
        }
        if let Some(open) = assembler.open {
            // Never seen: the server stops only after whole transactions.
            batch.failed = Some(CdcError::Failed(format!(
                "the read ended inside transaction {} (no Commit); it is read again at the next run",
                open.xid
            )));
        }
        Ok(batch)
    }

    /// Journals one change; `true` when it is new.
    async fn journal(&self, change: Change) -> Result<bool, String> {
        let started = Instant::now();
        // Serialising a `Value` cannot fail: its keys are strings.
        let raw = serde_json::to_vec(&change.payload).unwrap_or_default();
        let processed = self.ctx.process(&raw).await;
        let ingested = self
            .ctx
            .journal(processed, change.delivery_id.clone(), raw, started)
            .await
            .map_err(|e| format!("cannot journal change {}: {e}", change.delivery_id))?;
        Ok(matches!(ingested, Ingested::New(_)))
    }

    /// Confirms the slot up to `lsn` (never backwards: a slot already past
    /// it is left alone), then, once per connection, records in the journal
    /// that this flow has read from the slot.
    async fn advance(&self, session: &mut Session, lsn: u64) -> Result<(), CdcError> {
        let to = lsn_text(lsn);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&self.config.slot, &to];
        let query = session.client.query_opt(
            "SELECT (pg_replication_slot_advance(slot_name, $2::text::pg_lsn)).end_lsn::text \
             FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
            &params,
        );
        let moved = bounded("advancing the slot", query)
            .await?
            .map_err(|e| CdcError::Failed(format!("cannot advance the slot to {to}: {}", pg_error(&e))))?;
        if let Some(row) = moved {
            let at: String = row.try_get(0).map_err(|e| failed(&e))?;
            tracing::trace!(flow = %self.ctx.flow, slot = %self.config.slot, lsn = %at, "slot advanced");
        }
        if !session.recorded {
            self.record_read(lsn).await?;
            session.recorded = true;
        }
        Ok(())
    }

    /// What a failed peek means, with what to do when it is a known trap.
    fn peek_error(&self, e: &tokio_postgres::Error) -> CdcError {
        let c = &self.config;
        let reason = pg_error(e);
        let undefined_object = e.as_db_error().is_some_and(|db| db.code().code() == "42704");
        if undefined_object && reason.contains("publication") {
            return CdcError::Setup(format!(
                "{reason}: slot `{slot}` holds changes from before publication `{publication}` existed (or it was \
                 dropped), which PostgreSQL cannot decode with it. Make the slot afresh by hand \
                 (SELECT pg_drop_replication_slot('{slot}'); SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')) \
                 and the next run goes on from there; changes made in between are not read",
                slot = c.slot,
                publication = c.publication
            ));
        }
        CdcError::Failed(format!("cannot read slot `{}`: {reason}", c.slot))
    }
}

/// `what` under [`CLIENT_TIMEOUT`]: past it, [`CdcError::Stalled`].
async fn bounded<T>(what: &str, query: impl Future<Output = T>) -> Result<T, CdcError> {
    tokio::time::timeout(CLIENT_TIMEOUT, query).await.map_err(|_| {
        CdcError::Stalled(format!("the database did not answer within {}s while {what}", CLIENT_TIMEOUT.as_secs()))
    })
}

/// What to tell the operator when the slot is gone though this flow read from it (up to `at`).
fn lost_slot(slot: &str, at: &str) -> CdcError {
    CdcError::Setup(format!(
        "replication slot `{slot}` is gone, though this flow has read from it (up to at least {at}): it was dropped, \
         or not carried over by a failover. Changes committed since it was lost may be missing, and a new slot \
         would skip them, so none is made. Check what was missed (and bring it over by other means), then make \
         the slot by hand: SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'); the source goes on \
         from there at its next run"
    ))
}

/// What to tell the operator when `wal_level` does not allow logical decoding.
fn wal_level_problem(level: &str) -> Option<String> {
    (level != "logical").then(|| {
        format!(
            "the database's wal_level is `{level}`, and reading changes needs `logical`: run \
             `ALTER SYSTEM SET wal_level = logical` as a superuser and restart PostgreSQL"
        )
    })
}

/// One change, ready to journal.
#[derive(Debug, Clone, PartialEq)]
struct Change {
    /// `cdc:SLOT:LSN:INDEX`, the same on every read of the transaction.
    delivery_id: String,
    payload: Value,
}

/// A committed transaction's changes, in order.
#[derive(Debug, Clone, PartialEq)]
struct Transaction {
    xid: u32,
    /// Where its commit record ends: confirm the slot here to consume it.
    end_lsn: u64,
    changes: Vec<Change>,
}

/// A transaction whose Commit has not been read yet.
#[derive(Debug)]
struct Open {
    xid: u32,
    commit_time: Value,
    changes: Vec<Change>,
}

/// Turns the messages of one read, in order, into whole transactions.
struct Assembler<'a> {
    slot: &'a str,
    relations: &'a mut Relations,
    open: Option<Open>,
}

impl Assembler<'_> {
    /// Takes the message at `lsn`; a Commit gives back its transaction.
    fn feed(&mut self, lsn: u64, data: &[u8]) -> Result<Option<Transaction>, String> {
        let at = || lsn_text(lsn);
        let message = pgoutput::decode(data).map_err(|e| format!("cannot decode the message at {}: {e}", at()))?;
        let (op, table, new, old, key, unchanged) = match message {
            Message::Begin(b) => {
                if let Some(open) = &self.open {
                    return Err(format!("transaction {} began at {} before {} committed", b.xid, at(), open.xid));
                }
                self.open = Some(Open { xid: b.xid, commit_time: commit_time(b.commit_time), changes: Vec::new() });
                return Ok(None);
            }
            Message::Commit(c) => {
                let open = self.open.take().ok_or_else(|| format!("a Commit at {} without its Begin", at()))?;
                return Ok(Some(Transaction { xid: open.xid, end_lsn: c.end_lsn, changes: open.changes }));
            }
            Message::Relation(r) => {
                self.relations.remember(r);
                return Ok(None);
            }
            Message::Type { .. } | Message::Origin { .. } | Message::Logical { .. } => return Ok(None),
            Message::Truncate { cascade, restart_identity, relations } => {
                let tables = relations
                    .iter()
                    .map(|&oid| self.relations.get(oid).map(|r| Value::String(r.qualified_name())))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let mut payload = Map::new();
                payload.insert("op".into(), "truncate".into());
                payload.insert("tables".into(), Value::Array(tables));
                self.push(lsn, payload, |p| {
                    p.insert("cascade".into(), cascade.into());
                    p.insert("restart_identity".into(), restart_identity.into());
                })?;
                return Ok(None);
            }
            Message::Insert { relation, new } => {
                let r = self.relations.get(relation).map_err(|e| e.to_string())?;
                let row = r.row(&new).map_err(|e| e.to_string())?;
                ("insert", r.qualified_name(), Some(row.values), None, None, row.unchanged)
            }
            Message::Update { relation, old, new } => {
                let r = self.relations.get(relation).map_err(|e| e.to_string())?;
                let row = r.row(&new).map_err(|e| e.to_string())?;
                let (old, key) = match old {
                    Some(OldRow::Full(t)) => (Some(r.row(&t).map_err(|e| e.to_string())?.values), None),
                    Some(OldRow::Key(t)) => (None, Some(r.key(&t).map_err(|e| e.to_string())?.values)),
                    None => (None, None),
                };
                ("update", r.qualified_name(), Some(row.values), old, key, row.unchanged)
            }
            Message::Delete { relation, old } => {
                let r = self.relations.get(relation).map_err(|e| e.to_string())?;
                let (old, key) = match old {
                    OldRow::Full(t) => (Some(r.row(&t).map_err(|e| e.to_string())?.values), None),
                    OldRow::Key(t) => (None, Some(r.key(&t).map_err(|e| e.to_string())?.values)),
                };
                ("delete", r.qualified_name(), None, old, key, Vec::new())
            }
        };
        let mut payload = Map::new();
        payload.insert("op".into(), op.into());
        payload.insert("table".into(), table.into());
        let object = |m: Option<Map<String, Value>>| m.map_or(Value::Null, Value::Object);
        self.push(lsn, payload, |p| {
            p.insert("new".into(), object(new));
            p.insert("old".into(), object(old));
            p.insert("key".into(), object(key));
            p.insert("unchanged".into(), unchanged.into_iter().map(Value::String).collect());
        })?;
        Ok(None)
    }

    /// Adds a change to the open transaction: `payload` (op and table),
    /// then the change's place (lsn, xid, commit time), then what `rest` adds.
    fn push(
        &mut self,
        lsn: u64,
        mut payload: Map<String, Value>,
        rest: impl FnOnce(&mut Map<String, Value>),
    ) -> Result<(), String> {
        let open = self.open.as_mut().ok_or_else(|| format!("a change at {} outside a transaction", lsn_text(lsn)))?;
        payload.insert("lsn".into(), lsn_text(lsn).into());
        payload.insert("xid".into(), open.xid.into());
        payload.insert("commit_time".into(), open.commit_time.clone());
        rest(&mut payload);
        let delivery_id = format!("cdc:{}:{}:{}", self.slot, lsn_text(lsn), open.changes.len());
        open.changes.push(Change { delivery_id, payload: Value::Object(payload) });
        Ok(())
    }
}

/// `X/Y` (PostgreSQL's `pg_lsn` text) as a number.
fn parse_lsn(text: &str) -> Result<u64, String> {
    let parse = || {
        let (hi, lo) = text.split_once('/')?;
        let (hi, lo) = (u32::from_str_radix(hi, 16).ok()?, u32::from_str_radix(lo, 16).ok()?);
        Some((u64::from(hi) << 32) | u64::from(lo))
    };
    parse().ok_or_else(|| format!("`{text}` is not an LSN"))
}

/// An LSN as PostgreSQL writes it: `0/16B3748`.
fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// A commit time (microseconds since 2000-01-01 UTC) in RFC 3339; null if out of range.
fn commit_time(micros_since_2000: i64) -> Value {
    const UNIX_AT_2000_MICROS: i64 = 946_684_800_000_000;
    micros_since_2000
        .checked_add(UNIX_AT_2000_MICROS)
        .and_then(|us| jiff::Timestamp::from_microsecond(us).ok())
        .map_or(Value::Null, |t| Value::String(t.to_string()))
}

fn failed(e: &tokio_postgres::Error) -> CdcError {
    CdcError::Failed(pg_error(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Messages as the server writes them.
    mod wire {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend(s.as_bytes());
            out.push(0);
        }

        pub fn begin(xid: u32, commit_time: i64) -> Vec<u8> {
            let mut m = vec![b'B'];
            m.extend(0x100_u64.to_be_bytes());
            m.extend(commit_time.to_be_bytes());
            m.extend(xid.to_be_bytes());
            m
        }

        pub fn commit(end_lsn: u64) -> Vec<u8> {
            let mut m = vec![b'C', 0];
            m.extend((end_lsn - 0x30).to_be_bytes());
            m.extend(end_lsn.to_be_bytes());
            m.extend(0_i64.to_be_bytes());
            m
        }

        /// `public.NAME (id int4 key, note text, big text)` with replica identity `identity`.
        pub fn relation(oid: u32, name: &str, identity: u8) -> Vec<u8> {
            let mut m = vec![b'R'];
            m.extend(oid.to_be_bytes());
            string(&mut m, "public");
            string(&mut m, name);
            m.push(identity);
            m.extend(3_i16.to_be_bytes());
            for (key, column, ty) in [(1_u8, "id", 23_u32), (0, "note", 25), (0, "big", 25)] {
                m.push(key);
                string(&mut m, column);
                m.extend(ty.to_be_bytes());
                m.extend((-1_i32).to_be_bytes());
            }
            m
        }

        /// Tuple data: `Some(text)`, `None` for null, `"\u{0}u"` for unchanged.
        pub fn tuple(out: &mut Vec<u8>, values: &[Option<&str>]) {
            out.extend((values.len() as i16).to_be_bytes());
            for v in values {
                match v {
                    None => out.push(b'n'),
                    Some("\u{0}u") => out.push(b'u'),
                    Some(t) => {
                        out.push(b't');
                        out.extend((t.len() as i32).to_be_bytes());
                        out.extend(t.as_bytes());
                    }
                }
            }
        }

        pub fn insert(oid: u32, values: &[Option<&str>]) -> Vec<u8> {
            let mut m = vec![b'I'];
            m.extend(oid.to_be_bytes());
            m.push(b'N');
            tuple(&mut m, values);
            m
        }

        pub fn update(oid: u32, old: Option<(u8, &[Option<&str>])>, new: &[Option<&str>]) -> Vec<u8> {
            let mut m = vec![b'U'];
            m.extend(oid.to_be_bytes());
            if let Some((kind, values)) = old {
                m.push(kind);
                tuple(&mut m, values);
            }
            m.push(b'N');
            tuple(&mut m, new);
            m
        }

        pub fn delete(oid: u32, kind: u8, values: &[Option<&str>]) -> Vec<u8> {
            let mut m = vec![b'D'];
            m.extend(oid.to_be_bytes());
            m.push(kind);
            tuple(&mut m, values);
            m
        }

        pub fn truncate(oids: &[u32], options: u8) -> Vec<u8> {
            let mut m = vec![b'T'];
            m.extend((oids.len() as i32).to_be_bytes());
            m.push(options);
            for oid in oids {
                m.extend(oid.to_be_bytes());
            }
            m
        }
    }

    /// 2024-05-01T12:00:00.5Z in microseconds since 2000-01-01.
    const COMMIT_TIME: i64 = 767_880_000_500_000;

    fn feed_all(messages: &[(u64, Vec<u8>)]) -> Result<Vec<Transaction>, String> {
        let mut relations = Relations::default();
        let mut a = Assembler { slot: "s1", relations: &mut relations, open: None };
        let mut out = Vec::new();
        for (lsn, m) in messages {
            out.extend(a.feed(*lsn, m)?);
        }
        assert!(a.open.is_none(), "a transaction was left open");
        Ok(out)
    }

    #[test]
    fn changes_become_payloads_with_stable_delivery_ids() {
        let messages = vec![
            (0x16B_3700, wire::begin(1234, COMMIT_TIME)),
            (0x16B_3700, wire::relation(7, "orders", b'f')),
            (0x16B_3700, wire::insert(7, &[Some("1"), Some("new"), None])),
            (
                0x16B_3748,
                wire::update(7, Some((b'O', &[Some("1"), Some("new"), None])), &[Some("1"), Some("paid"), None]),
            ),
            (0x16B_3790, wire::delete(7, b'O', &[Some("1"), Some("paid"), None])),
            (0x16B_37D0, wire::commit(0x16B_37D0)),
        ];
        let txns = feed_all(&messages).unwrap();
        assert_eq!(txns.len(), 1);
        let t = &txns[0];
        assert_eq!((t.xid, t.end_lsn), (1234, 0x16B_37D0));
        let ids: Vec<_> = t.changes.iter().map(|c| c.delivery_id.as_str()).collect();
        assert_eq!(ids, ["cdc:s1:0/16B3700:0", "cdc:s1:0/16B3748:1", "cdc:s1:0/16B3790:2"]);
        assert_eq!(
            t.changes[1].payload,
            json!({"op": "update", "table": "public.orders", "lsn": "0/16B3748", "xid": 1234,
                   "commit_time": "2024-05-01T12:00:00.5Z",
                   "new": {"id": 1, "note": "paid", "big": null}, "old": {"id": 1, "note": "new", "big": null},
                   "key": null, "unchanged": []})
        );
        // Key order is part of the contract: op, table, lsn first.
        let text = serde_json::to_string(&t.changes[0].payload).unwrap();
        assert!(text.starts_with(r#"{"op":"insert","table":"public.orders","lsn":"0/16B3700","xid":1234,"#), "{text}");
        assert_eq!(t.changes[2].payload["new"], Value::Null);
        assert_eq!(t.changes[2].payload["old"], json!({"id": 1, "note": "paid", "big": null}));
        // The same messages read again give the same ids and payloads.
        assert_eq!(feed_all(&messages).unwrap(), txns);
    }

    #[test]
    fn key_only_identity_unchanged_toast_and_truncate() {
        let messages = vec![
            (0x200, wire::begin(9, COMMIT_TIME)),
            (0x200, wire::relation(8, "lines", b'd')),
            (0x200, wire::update(8, None, &[Some("5"), Some("x"), Some("\u{0}u")])),
            (0x240, wire::update(8, Some((b'K', &[Some("5"), None, None])), &[Some("6"), Some("x"), Some("\u{0}u")])),
            (0x280, wire::delete(8, b'K', &[Some("6"), None, None])),
            (0x2C0, wire::commit(0x300)),
            (0x300, wire::begin(10, COMMIT_TIME)),
            (0x300, wire::relation(8, "lines", b'd')),
            (0x300, wire::relation(9, "orders", b'd')),
            (0x300, wire::truncate(&[8, 9], 1)),
            (0x340, wire::commit(0x380)),
        ];
        let txns = feed_all(&messages).unwrap();
        assert_eq!(txns.iter().map(|t| t.end_lsn).collect::<Vec<_>>(), [0x300, 0x380]);
        let [update, rekey, delete] = &txns[0].changes[..] else { panic!("{txns:?}") };
        assert_eq!(update.payload["new"], json!({"id": 5, "note": "x"}));
        assert_eq!(update.payload["unchanged"], json!(["big"]));
        assert_eq!((&update.payload["old"], &update.payload["key"]), (&Value::Null, &Value::Null));
        assert_eq!(rekey.payload["key"], json!({"id": 5}));
        assert_eq!(delete.payload["key"], json!({"id": 6}));
        assert_eq!(delete.payload["old"], Value::Null);
        assert_eq!(delete.payload["unchanged"], json!([]));
        let truncate = &txns[1].changes[0];
        assert_eq!(truncate.delivery_id, "cdc:s1:0/300:0");
        assert_eq!(
            truncate.payload,
            json!({"op": "truncate", "tables": ["public.lines", "public.orders"], "lsn": "0/300", "xid": 10,
                   "commit_time": "2024-05-01T12:00:00.5Z", "cascade": true, "restart_identity": false})
        );
    }

    #[test]
    fn out_of_order_messages_are_refused() {
        let change_outside = vec![(0x1, wire::relation(7, "t", b'd')), (0x1, wire::insert(7, &[None, None, None]))];
        assert!(feed_all(&change_outside).unwrap_err().contains("outside a transaction"));
        let unknown = [(0x1, wire::begin(1, 0)), (0x1, wire::insert(7, &[None, None, None]))];
        let mut relations = Relations::default();
        let mut a = Assembler { slot: "s", relations: &mut relations, open: None };
        assert_eq!(a.feed(unknown[0].0, &unknown[0].1), Ok(None));
        assert!(a.feed(unknown[1].0, &unknown[1].1).unwrap_err().contains("before its Relation message"));
        assert!(a.feed(0x2, &wire::begin(2, 0)).unwrap_err().contains("before 1 committed"));
        let mut a = Assembler { slot: "s", relations: &mut relations, open: None };
        assert!(a.feed(0x3, &wire::commit(0x40)).unwrap_err().contains("without its Begin"));
        assert!(a.feed(0x3, b"Zz").unwrap_err().contains("cannot decode the message at 0/3"));
    }

    #[test]
    fn lsns_read_and_written_as_postgres_does() {
        assert_eq!(parse_lsn("0/16B3748"), Ok(0x16B_3748));
        assert_eq!(parse_lsn("1A/0"), Ok(0x1A_0000_0000));
        assert_eq!(lsn_text(0x16B_3748), "0/16B3748");
        assert_eq!(lsn_text(0xFF_0000_00AB), "FF/AB");
        for bad in ["", "0", "0/", "/1", "x/1", "1/2/3", "100000000/0"] {
            assert!(parse_lsn(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commit_times_are_rfc3339() {
        assert_eq!(commit_time(0), json!("2000-01-01T00:00:00Z"));
        assert_eq!(commit_time(COMMIT_TIME), json!("2024-05-01T12:00:00.5Z"));
        assert_eq!(commit_time(i64::MAX), Value::Null);
    }

    #[test]
    fn wal_level_advice() {
        assert_eq!(wal_level_problem("logical"), None);
        let advice = wal_level_problem("replica").unwrap();
        assert!(advice.contains("`replica`") && advice.contains("ALTER SYSTEM SET wal_level = logical"), "{advice}");
        assert!(advice.contains("restart"), "{advice}");
    }

    /// Against the real PostgreSQL (see tests/cdc.rs), through the functions
    /// the run loop uses, to stop between the journal and the slot.
    mod live {
        use std::sync::Arc;

        use dovetail_core::config::{CdcConfig, Secret};
        use dovetail_core::schedule::Schedule;
        use dovetail_journal::{Journal, SqliteJournal, SqliteOptions};

        use super::super::*;

        fn pg_url() -> String {
            std::env::var("DOVETAIL_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
        }

        /// The database, or `None` (a skip) when it cannot be used; under CI=true, a panic.
        async fn database() -> Option<tokio_postgres::Client> {
            let skip = |msg: String| {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("{msg}");
                }
                eprintln!("skipped: {msg}");
                None
            };
            let client = match tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    client
                }
                Err(e) => return skip(format!("PostgreSQL is not reachable ({e})")),
            };
            let level: String = client.query_one("SHOW wal_level", &[]).await.ok()?.get(0);
            if level != "logical" {
                return skip(format!("PostgreSQL's wal_level is {level}, not logical"));
            }
            Some(client)
        }

        /// Drops the slot, publication and table when the test ends, even by a panic.
        struct Cleanup {
            name: String,
        }

        impl Drop for Cleanup {
            fn drop(&mut self) {
                let name = self.name.clone();
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    rt.block_on(async {
                        let (client, connection) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await?;
                        tokio::spawn(connection);
                        client
                            .batch_execute(&format!(
                                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{name}';
                                 DROP PUBLICATION IF EXISTS {name}; DROP TABLE IF EXISTS {name}, {name}_other;"
                            ))
                            .await
                    })
                    .map_err(std::io::Error::other)
                })
                .join();
            }
        }

        async fn source(
            name: &str,
            tables: Vec<String>,
            batch: u32,
            dir: &std::path::Path,
        ) -> (Cdc, Arc<SqliteJournal>) {
            let journal = Arc::new(SqliteJournal::open(&dir.join("journal.db"), SqliteOptions::default()).unwrap());
            let ctx = SourceContext {
                flow: "changes".into(),
                pipeline: Arc::new(dovetail_core::pipeline::Pipeline::default()),
                jq_time_limit: crate::contract::JQ_TIME_LIMIT,
                journal: journal.clone(),
                clock: Arc::new(dovetail_core::clock::SystemClock),
                wake: Arc::new(tokio::sync::Notify::new()),
                metrics: Arc::new(crate::metrics::Metrics::new()),
            };
            let config = CdcConfig {
                url: "env:CDC_DB".into(),
                slot: name.into(),
                publication: name.into(),
                tables,
                schedule: Schedule::parse("every 1s").unwrap(),
                batch,
            };
            (Cdc { ctx, config, url: Secret::new(pg_url()) }, journal)
        }

        async fn confirmed(db: &tokio_postgres::Client, slot: &str) -> u64 {
            let lsn: String = db
                .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
                .await
                .unwrap()
                .get(0);
            parse_lsn(&lsn).unwrap()
        }

        fn unique(prefix: &str) -> String {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
            format!("dovetail_test_{}_{prefix}{:x}", std::process::id(), nanos)
        }

        #[tokio::test]
        async fn a_read_not_confirmed_is_read_again_and_deduplicated() {
            let Some(db) = database().await else { return };
            let name = unique("l");
            let _cleanup = Cleanup { name: name.clone() };
            db.batch_execute(&format!("CREATE TABLE {name} (id int PRIMARY KEY, note text)")).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            // Messages, not changes: Begin, Relation, Insert, Commit are four.
            let (cdc, journal) = source(&name, vec![format!("public.{name}")], 100, dir.path()).await;
            let mut session = cdc.connect().await.unwrap();
            cdc.prepare(&session.client).await.unwrap();
            // One query string is one transaction: two calls, two transactions.
            db.batch_execute(&format!("INSERT INTO {name} VALUES (1, 'a')")).await.unwrap();
            db.batch_execute(&format!(
                "INSERT INTO {name} VALUES (2, 'b'), (3, 'c'); UPDATE {name} SET note = 'z' WHERE id = 1;"
            ))
            .await
            .unwrap();
            let before = confirmed(&db, &name).await;

            // Journalled, then a "crash" before the slot is advanced.
            let first = cdc.read(&mut session).await.unwrap();
            assert!(first.failed.is_none(), "{:?}", first.failed);
            assert_eq!((first.transactions, first.changes, first.new), (2, 4, 4));
            assert_eq!(confirmed(&db, &name).await, before, "read alone must not consume the slot");
            // The next run (a new connection) reads the same changes: all duplicates.
            let mut session = cdc.connect().await.unwrap();
            let again = cdc.read(&mut session).await.unwrap();
            assert_eq!((again.transactions, again.changes, again.new), (2, 4, 0));
            assert_eq!(again.last_end, first.last_end);
            let counts = journal.counts().await.unwrap();
            let total: u64 = counts.iter().map(|c| c.pending + c.in_flight + c.delivered + c.dead).sum();
            assert_eq!(total, 4, "nothing journalled twice: {counts:?}");

            // A drain advances the slot to the last Commit's end, and reads nothing more.
            let (_tx, stop) = watch::channel(false);
            let run = cdc.drain(&mut session, &stop).await.unwrap();
            assert_eq!((run.transactions, run.changes, run.new), (2, 4, 0));
            let end = first.last_end.unwrap();
            assert!(confirmed(&db, &name).await >= end);
            let empty = cdc.read(&mut session).await.unwrap();
            assert_eq!((empty.rows, empty.changes), (0, 0));
        }

        #[tokio::test]
        async fn the_slot_is_confirmed_to_the_commit_end_not_the_commit_start() {
            let Some(db) = database().await else { return };
            let name = unique("e");
            let _cleanup = Cleanup { name: name.clone() };
            db.batch_execute(&format!("CREATE TABLE {name} (id int PRIMARY KEY, note text)")).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (cdc, _journal) = source(&name, vec![name.clone()], 3, dir.path()).await;
            let mut session = cdc.connect().await.unwrap();
            cdc.prepare(&session.client).await.unwrap();
            for id in [1, 2] {
                db.execute(&format!("INSERT INTO {name} VALUES ({id}, 'a')"), &[]).await.unwrap();
            }
            let peek = format!(
                "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('{name}', NULL, NULL, \
                 'proto_version', '1', 'publication_names', '{name}')"
            );
            let rows = db.query(&peek, &[]).await.unwrap();
            let commits: Vec<(u64, pgoutput::Commit)> = rows
                .iter()
                .filter_map(|r| match pgoutput::decode(r.get::<_, &[u8]>(1)) {
                    Ok(Message::Commit(c)) => Some((parse_lsn(r.get(0)).unwrap(), c)),
                    _ => None,
                })
                .collect();
            assert_eq!(commits.len(), 2);
            let (row_lsn, first) = &commits[0];
            // The Commit row's lsn is the transaction's end LSN, past the commit record's start.
            assert_eq!(*row_lsn, first.end_lsn);
            assert!(first.commit_lsn < first.end_lsn);

            // Confirming the commit record's start would give the transaction again, for ever.
            cdc.advance(&mut session, first.commit_lsn).await.unwrap();
            let xids = |rows: &[tokio_postgres::Row]| {
                rows.iter()
                    .filter_map(|r| match pgoutput::decode(r.get::<_, &[u8]>(1)) {
                        Ok(Message::Begin(b)) => Some(b.xid),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            };
            let all = xids(&rows);
            assert_eq!(xids(&db.query(&peek, &[]).await.unwrap()), all);
            // Confirming its end consumes exactly it: the next one stays.
            cdc.advance(&mut session, first.end_lsn).await.unwrap();
            assert_eq!(confirmed(&db, &name).await, first.end_lsn);
            assert_eq!(xids(&db.query(&peek, &[]).await.unwrap()), all[1..]);
            // Never backwards.
            cdc.advance(&mut session, first.commit_lsn).await.unwrap();
            assert_eq!(confirmed(&db, &name).await, first.end_lsn);
            let batch = cdc.read(&mut session).await.unwrap();
            assert_eq!((batch.transactions, batch.last_end), (1, Some(commits[1].1.end_lsn)));
        }

        #[tokio::test]
        async fn a_slot_lost_after_reading_is_refused_until_made_by_hand() {
            let Some(db) = database().await else { return };
            let name = unique("g");
            let _cleanup = Cleanup { name: name.clone() };
            db.batch_execute(&format!("CREATE TABLE {name} (id int PRIMARY KEY)")).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (cdc, journal) = source(&name, vec![name.clone()], 100, dir.path()).await;
            let (_tx, stop) = watch::channel(false);
            let slots = async || -> i64 {
                db.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &[&name])
                    .await
                    .unwrap()
                    .get(0)
            };

            // Never read: the slot is made without fuss, and that is recorded.
            let mut session = cdc.connect().await.unwrap();
            cdc.drain(&mut session, &stop).await.unwrap();
            assert_eq!(slots().await, 1);
            let key = format!("cdc:changes:{name}");
            assert!(journal.load_state(&key).await.unwrap().is_some());
            db.batch_execute(&format!("INSERT INTO {name} VALUES (1)")).await.unwrap();
            assert_eq!(cdc.drain(&mut session, &stop).await.unwrap().changes, 1);

            // Lost after reading: the change made meanwhile would be skipped by a new slot.
            db.execute("SELECT pg_drop_replication_slot($1)", &[&name]).await.unwrap();
            db.batch_execute(&format!("INSERT INTO {name} VALUES (2)")).await.unwrap();
            for _ in 0..2 {
                let mut session = cdc.connect().await.unwrap();
                let err = cdc.drain(&mut session, &stop).await.unwrap_err();
                let CdcError::Setup(reason) = &err else { panic!("{err:?}") };
                assert!(reason.contains(&format!("`{name}` is gone")), "{reason}");
                assert!(reason.contains("may be missing"), "{reason}");
                assert!(
                    reason.contains(&format!("SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')")),
                    "{reason}"
                );
                assert_eq!(slots().await, 0, "no slot is made in its place");
            }

            // Made by hand: the source goes on from there.
            db.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&name]).await.unwrap();
            db.batch_execute(&format!("INSERT INTO {name} VALUES (3)")).await.unwrap();
            let mut session = cdc.connect().await.unwrap();
            let run = cdc.drain(&mut session, &stop).await.unwrap();
            assert_eq!((run.changes, run.new), (1, 1));

            // A journal that never read from the slot (another install) makes it afresh.
            db.execute("SELECT pg_drop_replication_slot($1)", &[&name]).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (fresh, _journal) = source(&name, vec![name.clone()], 100, dir.path()).await;
            let mut session = fresh.connect().await.unwrap();
            fresh.drain(&mut session, &stop).await.unwrap();
            assert_eq!(slots().await, 1);
        }

        #[tokio::test]
        async fn the_session_has_a_statement_timeout() {
            let Some(_db) = database().await else { return };
            let dir = tempfile::tempdir().unwrap();
            let (cdc, _journal) = source("unused", vec![], 100, dir.path()).await;
            let session = cdc.connect().await.unwrap();
            let timeout: String = session.client.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
            assert_eq!(timeout, "5min");
        }

        #[tokio::test]
        async fn setup_names_missing_tables_and_keeps_an_existing_publication() {
            let Some(db) = database().await else { return };
            let name = unique("s");
            let _cleanup = Cleanup { name: name.clone() };
            db.batch_execute(&format!(
                "CREATE TABLE {name} (id int PRIMARY KEY); CREATE TABLE {name}_other (id int PRIMARY KEY);"
            ))
            .await
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (cdc, _journal) = source(&name, vec![name.clone(), format!("public.{name}_gone")], 3, dir.path()).await;
            let session = cdc.connect().await.unwrap();
            let client = &session.client;
            let err = cdc.prepare(client).await.unwrap_err();
            assert!(
                matches!(&err, CdcError::Setup(m) if m.contains(&format!("`public.{name}_gone`")) && !m.contains(&format!("`{name}`"))),
                "{err:?}"
            );
            // Nothing was made for a source that cannot run.
            let slots: i64 = db
                .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &[&name])
                .await
                .unwrap()
                .get(0);
            assert_eq!(slots, 0);

            // An existing publication is used as it is.
            db.batch_execute(&format!("CREATE PUBLICATION {name} FOR TABLE {name}_other")).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (cdc, _journal) = source(&name, vec![name.clone()], 3, dir.path()).await;
            cdc.prepare(client).await.unwrap();
            let covered: Vec<String> = db
                .query("SELECT tablename::text FROM pg_publication_tables WHERE pubname = $1", &[&name])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert_eq!(covered, [format!("{name}_other")]);
            // A second prepare finds the slot it made.
            cdc.prepare(client).await.unwrap();
        }
    }
}
