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

use tokio::sync::watch;

use dovetail_core::config::{OutboxConfig, Secret};
use dovetail_journal::Ingested;

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
            match outbox.drain(c, &stop).await {
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
        let (client, connection) = tokio_postgres::connect(self.url.expose(), tokio_postgres::NoTls)
            .await
            // The error names the host, never the password.
            .map_err(|e| e.to_string())?;
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
        let select = format!(
            "SELECT {id}::text, {payload}::text FROM {table} WHERE {sent} IS NULL ORDER BY {id} LIMIT $1 FOR UPDATE SKIP LOCKED",
            id = c.id_column,
            payload = c.payload_column,
            table = c.table,
            sent = c.sent_column
        );
        let mark = format!(
            "UPDATE {table} SET {sent} = now() WHERE {id}::text = ANY($1)",
            table = c.table,
            sent = c.sent_column,
            id = c.id_column
        );
        let mut run = OutboxRun::default();
        while !*stop.borrow() {
            let tx = client.transaction().await.map_err(|e| e.to_string())?;
            let rows = tx.query(&select, &[&i64::from(c.batch)]).await.map_err(|e| e.to_string())?;
            let mut ids = Vec::with_capacity(rows.len());
            for row in &rows {
                let started = std::time::Instant::now();
                let id: String = row.try_get(0).map_err(|e| e.to_string())?;
                let payload: Option<String> = row.try_get(1).map_err(|e| e.to_string())?;
                // A null payload is kept (quarantined as not JSON), never skipped.
                let raw = payload.unwrap_or_default().into_bytes();
                let processed = self.ctx.process(&raw).await;
                // If the journal fails, dropping `tx` rolls back: the rows stay unsent.
                let ingested = self
                    .ctx
                    .journal(processed, format!("outbox:{id}"), raw, started)
                    .await
                    .map_err(|e| format!("cannot journal outbox row {id}: {e}"))?;
                if matches!(ingested, Ingested::New(_)) {
                    run.new += 1;
                }
                ids.push(id);
            }
            if !ids.is_empty() {
                tx.execute(&mark, &[&ids]).await.map_err(|e| e.to_string())?;
            }
            tx.commit().await.map_err(|e| e.to_string())?;
            run.rows += ids.len();
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
