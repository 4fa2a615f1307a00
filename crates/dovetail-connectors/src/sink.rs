//! A flow's sink, whatever it writes to: the dispatcher sends through this
//! and never looks at the kind.

use dovetail_core::clock::Timestamp;
use dovetail_core::config::BatchResults;

use crate::amqp::AmqpSink;
use crate::http::{AttemptResult, BatchResult, HttpSink, Outbound};
use crate::nats::NatsSink;
use crate::postgres::PgSink;

/// One flow's sink.
#[derive(Debug)]
pub enum Sink {
    Http(HttpSink),
    Postgres(PgSink),
    Nats(NatsSink),
    Amqp(AmqpSink),
}

impl Sink {
    /// The connector it writes through.
    pub fn connector(&self) -> &str {
        match self {
            Sink::Http(s) => s.connector(),
            Sink::Postgres(s) => s.connector(),
            Sink::Nats(s) => s.connector(),
            Sink::Amqp(s) => s.connector(),
        }
    }

    /// One record, one attempt. `now` resolves an HTTP-date `Retry-After`.
    pub async fn send(&self, out: Outbound<'_>, now: impl Fn() -> Timestamp) -> AttemptResult {
        match self {
            Sink::Http(s) => s.send(out, now).await,
            Sink::Postgres(s) => s.send_one(out).await,
            Sink::Nats(s) => s.send(out).await,
            Sink::Amqp(s) => s.send(out).await,
        }
    }

    /// Many records in one attempt (flows with `batch`): one bulk request,
    /// or one upsert statement. Only HTTP and PostgreSQL sinks take batches
    /// (the config has no `batch` for the others).
    pub async fn send_batch(
        &self,
        items: &[Outbound<'_>],
        key: &str,
        results: BatchResults,
        results_field: &str,
        now: impl Fn() -> Timestamp,
    ) -> BatchResult {
        match self {
            Sink::Http(s) => s.send_batch(items, key, results, results_field, now).await,
            Sink::Postgres(s) => s.send_batch(items).await,
            Sink::Nats(s) => one_by_one(items, |o| s.send(o)).await,
            Sink::Amqp(s) => one_by_one(items, |o| s.send(o)).await,
        }
    }
}

/// A batch sent as single writes, each answered on its own.
async fn one_by_one<'a, F, Fut>(items: &[Outbound<'a>], send: F) -> BatchResult
where
    F: Fn(Outbound<'a>) -> Fut,
    Fut: std::future::Future<Output = AttemptResult>,
{
    let started = std::time::Instant::now();
    let mut answers = Vec::with_capacity(items.len());
    for item in items {
        let r = send(*item).await;
        answers.push(crate::http::ItemAnswer { answer: r.answer, detail: r.detail });
    }
    let request = AttemptResult {
        answer: dovetail_core::policy::Answer::Service(dovetail_core::policy::ServiceAnswer::Applied),
        duration: started.elapsed(),
        detail: None,
        hint: Default::default(),
    };
    BatchResult { request, items: Ok(Some(answers)) }
}
