//! The transactional outbox pattern: an application writes its events into
//! an outbox table in the same transaction as its own changes; on the
//! flow's schedule Dovetail takes the unsent rows (`FOR UPDATE SKIP LOCKED`,
//! so several engines never take the same row), journals each through the
//! flow's pipeline, and marks them sent in that same database transaction.
//!
//! The journal commits before the outbox transaction does: a crash in
//! between leaves the rows unsent, and the next run reads them again as
//! duplicates (a row is named `outbox:ID`), so nothing is lost or doubled.

use std::sync::Arc;
use std::time::Duration;

use sha2::Digest as _;
use tokio::sync::watch;

use dovetail_core::config::{OutboxConfig, Secret};
use dovetail_journal::Ingested;

use dovetail_connectors::postgres::{pg_error, quoted};

use crate::contract::SourceContext;

pub(crate) struct Outbox {
    pub ctx: SourceContext,
    pub config: OutboxConfig,
    pub url: Secret,
}

/// What one run took.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct OutboxRun {
    pub rows: usize,
    pub new: usize,
}

pub(crate) async fn run(outbox: Arc<Outbox>, mut stop: watch::Receiver<bool>) {
    let mut client: Option<tokio_postgres::Client> = None;
    while !*stop.borrow() {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match outbox.connect().await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(flow = %outbox.ctx.flow, error = %e, "cannot connect to the outbox database; trying again at the next run");
                    None
                }
            };
        }
        if let Some(c) = client.as_mut() {
            // Stopping drops the open transaction: it rolls back and its rows stay unsent.
            let mut stopping = stop.clone();
            let drained = tokio::select! {
                d = outbox.drain(c, &stop) => d,
                _ = stopping.wait_for(|s| *s) => return,
            };
            match drained {
                Ok(run) if run.rows > 0 => {
                    tracing::debug!(flow = %outbox.ctx.flow, rows = run.rows, new = run.new, "outbox rows journalled")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(flow = %outbox.ctx.flow, error = %e, "outbox run stopped; its rows stay unsent and are read again")
                }
            }
        }
        if !outbox.ctx.wait_for_next(&outbox.config.schedule, &mut stop).await {
            return;
        }
    }
}

impl Outbox {
    async fn connect(&self) -> Result<tokio_postgres::Client, String> {
        let mut config: tokio_postgres::Config = self.url.expose().parse().map_err(|e| pg_error(&e))?;
        config.connect_timeout(Duration::from_secs(10)).keepalives_idle(Duration::from_secs(30));
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| pg_error(&e))?;
        let flow = self.ctx.flow.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(%flow, error = %e, "the outbox database connection ended");
            }
        });
        Ok(client)
    }

    /// Takes batches of unsent rows until there are none left.
    async fn drain(
        &self,
        client: &mut tokio_postgres::Client,
        stop: &watch::Receiver<bool>,
    ) -> Result<OutboxRun, String> {
        let c = &self.config;
        let (id, payload, table, sent) =
            (quoted(&c.id_column), quoted(&c.payload_column), quoted(&c.table), quoted(&c.sent_column));
        let select = format!(
            "SELECT {id}::text, {payload}::text, ctid::text FROM {table} WHERE {sent} IS NULL AND {id} IS NOT NULL \
             ORDER BY {id} LIMIT $1 FOR UPDATE SKIP LOCKED"
        );
        // The rows taken, by their physical address: locked, so it cannot move.
        let mark = format!("UPDATE {table} SET {sent} = now() WHERE ctid = ANY($1::text[]::tid[])");
        let mut run = OutboxRun::default();
        while !*stop.borrow() {
            let tx = client.transaction().await.map_err(|e| pg_error(&e))?;
            let rows = tx.query(&select, &[&i64::from(c.batch)]).await.map_err(|e| pg_error(&e))?;
            let mut taken = Vec::with_capacity(rows.len());
            for row in &rows {
                let started = std::time::Instant::now();
                let id: String = row.try_get(0).map_err(|e| pg_error(&e))?;
                let payload: Option<String> = row.try_get(1).map_err(|e| pg_error(&e))?;
                // A null payload is kept (quarantined as not JSON), never skipped.
                let raw = payload.unwrap_or_default().into_bytes();
                // The payload's hash in the name: an id handed out again (a
                // table reset, a restore) with other content is a new record.
                let name = format!("outbox:{}:{id}:{}", c.table, hex::encode(&sha2::Sha256::digest(&raw)[..8]));
                let processed = self.ctx.process(&raw).await;
                // If the journal fails, dropping `tx` rolls back: the rows stay unsent.
                let ingested = self
                    .ctx
                    .journal(processed, name, raw, started)
                    .await
                    .map_err(|e| format!("cannot journal outbox row {id}: {e}"))?;
                if matches!(ingested, Ingested::New(_)) {
                    run.new += 1;
                }
                taken.push(row.try_get::<_, String>(2).map_err(|e| pg_error(&e))?);
            }
            if !taken.is_empty() {
                tx.execute(&mark, &[&taken]).await.map_err(|e| pg_error(&e))?;
            }
            tx.commit().await.map_err(|e| pg_error(&e))?;
            run.rows += taken.len();
            if run.new > 0 {
                self.ctx.wake.notify_one();
            }
            if rows.len() < c.batch as usize {
                break;
            }
        }
        Ok(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_per_part() {
        assert_eq!(quoted("app.outbox"), r#""app"."outbox""#);
        assert_eq!(quoted("order"), r#""order""#);
    }
}
