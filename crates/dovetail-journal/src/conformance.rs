//! The conformance suite every [`Journal`] backend must pass.
//!
//! Each check takes a fresh, empty journal. A backend's test file runs them
//! all with [`journal_conformance!`](crate::journal_conformance):
//!
//! ```ignore
//! dovetail_journal::journal_conformance!(async { MyJournal::open_fresh().await });
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dovetail_core::clock::Timestamp;
use dovetail_core::policy::ErrorClass;
use dovetail_core::record::{Attempt, StateName};
use dovetail_core::rollup::{MinuteRollup, bucket_of, minute_of};

use crate::{AttemptReport, Ingested, Journal, LeaseMode, NewRecord, Outcome, Prepared, Selector};

const T0: Timestamp = Timestamp::from_secs(1_800_000_000);
const LEASE: Duration = Duration::from_secs(30);

/// Generates one `#[tokio::test]` per conformance check; `$make` is an
/// expression evaluating to a future of a fresh `Arc<J>` where `J: Journal`.
/// With `after = check`, `check(&journal)` (an async fn taking `&J`) runs
/// after every check: a backend's own consistency checks.
#[macro_export]
macro_rules! journal_conformance {
    ($make:expr) => {
        $crate::journal_conformance!($make, after = $crate::conformance::nothing_more);
    };
    ($make:expr, after = $after:path) => {
        $crate::journal_conformance!(@tests $make; $after;
            ingest_lease_deliver, duplicate_delivery_is_journalled_once, lease_is_exclusive_until_it_expires,
            retry_waits_until_due, dead_letter_and_replay_keep_the_key, discard_keeps_the_record,
            quarantine_is_dead_at_intake, hold_does_not_spend_the_budget, pause_and_resume,
            oldest_pending_and_counts, replay_in_chunks, concurrent_ingests_all_land, lease_limit_and_order,
            stale_owner_cannot_complete, same_owner_cannot_complete_an_older_attempt,
            replay_takes_only_what_was_dead_at_its_start, connector_health_is_replaced_per_connector,
            sent_requests_count_against_the_quota_even_with_a_lost_lease, one_key_at_a_time_in_key_order,
            a_batch_of_unknown_fate_goes_again_whole_and_alone, a_bound_batch_waits_for_all_its_records,
            drift_events_and_shapes_are_kept, retention_purges_only_finished_payloads,
            records_are_found_by_id_correlation_delivery_id_and_key, engine_state_is_kept_by_key, a_prepared_record_leases_with_its_mapped_body, an_unprepared_record_leases_unprepared,
            only_the_lease_holder_stores_a_preparation, replay_clears_the_preparation,
            retention_purges_the_mapped_body_too, a_quarantined_record_is_stored_unprepared,
            rollups_count_intake_but_not_duplicates, rollups_count_outcomes_latency_and_freshness,
            a_lost_lease_counts_nothing_in_the_rollups, an_expired_lease_counts_one_interrupted_attempt,
            complete_many_counts_every_applied_report, rollups_are_per_minute, minutes_filter_by_flow_and_time,
            prune_minutes_deletes_only_older_minutes);
    };
    (@tests $make:expr; $after:path; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let journal = $make.await;
                $crate::conformance::$name(&*journal).await;
                $after(&*journal).await;
            }
        )*
    };
}

/// The `after` check of a backend that has none of its own.
pub async fn nothing_more<J: ?Sized>(_: &J) {}

pub(crate) fn new_record(flow: &str, delivery_id: Option<&str>, body: &str) -> NewRecord {
    NewRecord {
        flow: flow.to_string(),
        external_key: None,
        delivery_id: delivery_id.map(str::to_string),
        idempotency_key: format!("key-{flow}-{}", delivery_id.unwrap_or(body)),
        correlation_id: "corr-1".to_string(),
        content_type: Some("application/json".to_string()),
        payload: body.as_bytes().to_vec(),
        received_at: T0,
        quarantine: None,
        prepared: None,
    }
}

fn prepared(body: Option<&str>, mapping_version: Option<u32>, sink_mapping_version: Option<u32>) -> Prepared {
    Prepared { body: body.map(|b| b.as_bytes().to_vec()), mapping_version, sink_mapping_version }
}

/// A report with no quota, no batch binding and no new preparation.
fn plain_report(
    id: dovetail_core::record::RecordId,
    owner: impl Into<String>,
    attempt: Attempt,
    outcome: Outcome,
) -> AttemptReport {
    AttemptReport { quota: None, keep_batch: false, id, owner: owner.into(), attempt, outcome }
}

fn attempt(number: u32, status: u16, class: Option<ErrorClass>) -> Attempt {
    Attempt {
        number,
        started_at: T0,
        duration_ms: 12,
        status: Some(status),
        class,
        error: class.map(|c| c.as_str().to_string()),
    }
}

async fn counts_of(j: &dyn Journal, flow: &str) -> crate::FlowCounts {
    j.counts().await.unwrap().into_iter().find(|c| c.flow == flow).unwrap_or_default()
}

pub async fn ingest_lease_deliver(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{\"id\":1}")).await.unwrap();
    let Ingested::New(id) = id else { panic!("first ingest must be new") };
    assert_eq!(counts_of(j, "orders").await.pending, 1);
    let leased = j.lease("orders", "node-a", T0, LEASE, 10).await.unwrap();
    assert_eq!(leased.len(), 1);
    let r = &leased[0];
    assert_eq!((r.id, r.attempt, r.failures), (id, 1, 0));
    assert_eq!(r.payload, b"{\"id\":1}");
    assert_eq!(r.idempotency_key, "key-orders-d1");
    assert_eq!(counts_of(j, "orders").await.in_flight, 1);
    let ok = j.complete(plain_report(id, "node-a", attempt(1, 200, None), Outcome::Delivered)).await.unwrap();
    assert!(ok);
    let c = counts_of(j, "orders").await;
    assert_eq!((c.pending, c.in_flight, c.delivered), (0, 0, 1));
    let detail = j.record(id).await.unwrap().unwrap();
    assert_eq!(detail.state, StateName::Delivered);
    assert_eq!(detail.attempts.len(), 1);
    assert_eq!(detail.attempts[0].status, Some(200));
    assert!(j.lease("orders", "node-a", T0.plus(LEASE * 10), LEASE, 10).await.unwrap().is_empty());
}

pub async fn duplicate_delivery_is_journalled_once(j: &dyn Journal) {
    let a = j.ingest(new_record("orders", Some("same"), "{}")).await.unwrap();
    let b = j.ingest(new_record("orders", Some("same"), "{}")).await.unwrap();
    assert!(matches!(a, Ingested::New(_)));
    assert_eq!(b, Ingested::Duplicate(a.id()));
    let other_flow = j.ingest(new_record("refunds", Some("same"), "{}")).await.unwrap();
    assert!(matches!(other_flow, Ingested::New(_)));
    let no_id_1 = j.ingest(new_record("orders", None, "{\"n\":1}")).await.unwrap();
    let no_id_2 = j.ingest(new_record("orders", None, "{\"n\":1}")).await.unwrap();
    assert_ne!(no_id_1.id(), no_id_2.id(), "records without a delivery id are never merged");
    assert_eq!(counts_of(j, "orders").await.pending, 3);
}

pub async fn lease_is_exclusive_until_it_expires(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    assert_eq!(j.lease("orders", "a", T0, LEASE, 10).await.unwrap().len(), 1);
    assert!(j.lease("orders", "b", T0.plus(LEASE / 2), LEASE, 10).await.unwrap().is_empty());
    let later = T0.plus(LEASE);
    let taken = j.lease("orders", "b", later, LEASE, 10).await.unwrap();
    assert_eq!(taken.len(), 1, "an expired lease is taken over");
    assert_eq!((taken[0].attempt, taken[0].failures), (2, 1));
    assert_eq!(taken[0].idempotency_key, "key-orders-d1", "the same key after a takeover");
    let detail = j.record(id).await.unwrap().unwrap();
    assert_eq!(detail.attempts.len(), 1);
    assert_eq!(detail.attempts[0].class, Some(ErrorClass::Interrupted));
}

pub async fn stale_owner_cannot_complete(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    j.lease("orders", "b", T0.plus(LEASE), LEASE, 10).await.unwrap();
    let stale = plain_report(id, "a", attempt(1, 200, None), Outcome::Delivered);
    assert!(!j.complete(stale).await.unwrap(), "a lost lease cannot write");
    assert_eq!(j.record(id).await.unwrap().unwrap().state, StateName::InFlight);
    let fresh = plain_report(id, "b", attempt(2, 200, None), Outcome::Delivered);
    assert!(j.complete(fresh).await.unwrap());
}

pub async fn same_owner_cannot_complete_an_older_attempt(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    // The process stalled past its lease and took the record over itself.
    let again = j.lease("orders", "a", T0.plus(LEASE), LEASE, 10).await.unwrap();
    assert_eq!(again[0].attempt, 2);
    let old = plain_report(id, "a", attempt(1, 503, Some(ErrorClass::Server)), Outcome::Retry { at: T0 });
    assert!(!j.complete(old).await.unwrap(), "the older attempt's result is ignored");
    assert_eq!(j.record(id).await.unwrap().unwrap().state, StateName::InFlight);
    let new = plain_report(id, "a", attempt(2, 200, None), Outcome::Delivered);
    assert!(j.complete(new).await.unwrap());
}

pub async fn replay_takes_only_what_was_dead_at_its_start(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    let dead_at = T0.plus(Duration::from_secs(60));
    let mut a = attempt(1, 422, Some(ErrorClass::Rejected));
    a.started_at = dead_at;
    let dead = Outcome::Dead { class: ErrorClass::Rejected, reason: "no".into() };
    j.complete(AttemptReport { quota: None, keep_batch: false, id, owner: "a".into(), attempt: a, outcome: dead })
        .await
        .unwrap();
    let started = T0.plus(Duration::from_secs(30));
    assert_eq!(j.replay(&Selector::All, started, 10).await.unwrap(), 0, "died after the replay started");
    assert_eq!(j.discard(&Selector::All, started, 10).await.unwrap(), 0);
    assert_eq!(j.replay(&Selector::All, dead_at.plus(LEASE), 10).await.unwrap(), 1);
}

pub async fn connector_health_is_replaced_per_connector(j: &dyn Journal) {
    let open = crate::ConnectorHealth {
        connector: "billing".into(),
        breaker: "open".into(),
        since: T0,
        open_until: Some(T0.plus(LEASE)),
        reason: Some("5 consecutive failures".into()),
        current_rate: Some(2.5),
        configured_rate: Some(10.0),
        blocked_until: None,
        updated_at: T0,
    };
    j.set_connector_health(open.clone()).await.unwrap();
    assert_eq!(j.connector_health().await.unwrap(), vec![open.clone()]);
    let closed = crate::ConnectorHealth { breaker: "closed".into(), open_until: None, reason: None, ..open };
    j.set_connector_health(closed.clone()).await.unwrap();
    assert_eq!(j.connector_health().await.unwrap(), vec![closed]);
}

pub async fn sent_requests_count_against_the_quota_even_with_a_lost_lease(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    j.lease("orders", "b", T0.plus(LEASE), LEASE, 10).await.unwrap();
    let quota = Some("billing".to_string());
    let stale = AttemptReport {
        quota: quota.clone(),
        keep_batch: false,
        id,
        owner: "a".into(),
        attempt: attempt(1, 503, Some(ErrorClass::Server)),
        outcome: Outcome::Retry { at: T0 },
    };
    assert!(!j.complete(stale).await.unwrap());
    let fresh = AttemptReport {
        quota,
        keep_batch: false,
        id,
        owner: "b".into(),
        attempt: attempt(2, 200, None),
        outcome: Outcome::Delivered,
    };
    assert!(j.complete(fresh).await.unwrap());
    let used = j.quota_used("billing", T0).await.unwrap();
    assert_eq!((used.this_hour, used.today), (2, 2));
    let next_day = T0.plus(Duration::from_secs(86_400));
    assert_eq!(j.quota_used("billing", next_day).await.unwrap(), crate::QuotaUsed::default());
    assert_eq!(j.quota_used("other", T0).await.unwrap(), crate::QuotaUsed::default());
}

pub async fn one_key_at_a_time_in_key_order(j: &dyn Journal) {
    let keyed = |d: &str, key: Option<&str>| NewRecord {
        external_key: key.map(str::to_string),
        ..new_record("orders", Some(d), "{}")
    };
    let a1 = j.ingest(keyed("a1", Some("cus_a"))).await.unwrap().id();
    let a2 = j.ingest(keyed("a2", Some("cus_a"))).await.unwrap().id();
    let b1 = j.ingest(keyed("b1", Some("cus_b"))).await.unwrap().id();
    let free = j.ingest(keyed("n1", None)).await.unwrap().id();
    let ids = |l: Vec<crate::LeasedRecord>| l.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(j.lease_with(crate::LeaseMode::InKeyOrder, "orders", "a", T0, LEASE, 10).await.unwrap()),
        [a1, b1, free]
    );
    assert!(
        j.lease_with(crate::LeaseMode::InKeyOrder, "orders", "a", T0, LEASE, 10).await.unwrap().is_empty(),
        "a2 waits for a1"
    );
    // a1 fails and will be retried: a2 still waits behind it.
    let retry = Outcome::Retry { at: T0.plus(Duration::from_secs(5)) };
    j.complete(plain_report(a1, "a", attempt(1, 503, Some(ErrorClass::Server)), retry)).await.unwrap();
    assert!(
        j.lease_with(crate::LeaseMode::InKeyOrder, "orders", "a", T0.plus(Duration::from_secs(1)), LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let later = T0.plus(Duration::from_secs(5));
    assert_eq!(ids(j.lease_with(crate::LeaseMode::InKeyOrder, "orders", "a", later, LEASE, 10).await.unwrap()), [a1]);
    let dead = Outcome::Dead { class: ErrorClass::Rejected, reason: "no".into() };
    j.complete(plain_report(a1, "a", attempt(2, 422, Some(ErrorClass::Rejected)), dead)).await.unwrap();
    assert_eq!(
        ids(j.lease_with(crate::LeaseMode::InKeyOrder, "orders", "a", later, LEASE, 10).await.unwrap()),
        [a2],
        "a dead record no longer blocks its key"
    );
    assert_eq!(j.record(a2).await.unwrap().unwrap().external_key.as_deref(), Some("cus_a"));
}

pub async fn a_batch_of_unknown_fate_goes_again_whole_and_alone(j: &dyn Journal) {
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(j.ingest(new_record("orders", Some(&format!("b{i}")), "{}")).await.unwrap().id());
    }
    let first = j.lease_with(crate::LeaseMode::Batch, "orders", "a", T0, LEASE, 2).await.unwrap();
    assert_eq!(first.iter().map(|r| r.id).collect::<Vec<_>>(), ids[..2]);
    let key = first[0].batch_key.clone().unwrap();
    assert_eq!(first[1].batch_key.as_deref(), Some(key.as_str()));
    assert!(key.starts_with("dtb1-"));
    // The request was lost: both wait, bound, with different jittered due times.
    for (r, secs) in first.iter().zip([5, 7]) {
        let at = T0.plus(Duration::from_secs(secs));
        let report = AttemptReport {
            quota: None,
            keep_batch: true,
            id: r.id,
            owner: "a".into(),
            attempt: attempt(1, 503, Some(ErrorClass::Server)),
            outcome: Outcome::Retry { at },
        };
        assert!(j.complete(report).await.unwrap());
    }
    // The unbound record goes on its own meanwhile.
    let other =
        j.lease_with(crate::LeaseMode::Batch, "orders", "a", T0.plus(Duration::from_secs(1)), LEASE, 10).await.unwrap();
    assert_eq!(other.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[2]]);
    let again =
        j.lease_with(crate::LeaseMode::Batch, "orders", "a", T0.plus(Duration::from_secs(5)), LEASE, 10).await.unwrap();
    assert_eq!(again.iter().map(|r| r.id).collect::<Vec<_>>(), ids[..2], "whole, when its oldest is due");
    assert!(again.iter().all(|r| r.batch_key.as_deref() == Some(key.as_str())), "under the same key");
    // Answered per record this time: the batch lets its records go.
    let report = plain_report(
        ids[0],
        "a",
        attempt(2, 503, Some(ErrorClass::Server)),
        Outcome::Retry { at: T0.plus(Duration::from_secs(6)) },
    );
    assert!(j.complete(report).await.unwrap());
    let alone =
        j.lease_with(crate::LeaseMode::Batch, "orders", "a", T0.plus(Duration::from_secs(6)), LEASE, 10).await.unwrap();
    assert_eq!(alone.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[0]]);
    assert_ne!(alone[0].batch_key.as_deref(), Some(key.as_str()), "a new batch, a new key");
}

pub async fn a_bound_batch_waits_for_all_its_records(j: &dyn Journal) {
    for i in 0..2 {
        j.ingest(new_record("orders", Some(&format!("w{i}")), "{}")).await.unwrap();
    }
    let batch = j.lease_with(crate::LeaseMode::Batch, "orders", "a", T0, LEASE, 10).await.unwrap();
    assert_eq!(batch.len(), 2);
    // Only the first member's result is written so far (say the engine died
    // between the two): the other is still in flight.
    let report = AttemptReport {
        quota: None,
        keep_batch: true,
        id: batch[0].id,
        owner: "a".into(),
        attempt: attempt(1, 503, Some(ErrorClass::Server)),
        outcome: Outcome::Retry { at: T0 },
    };
    assert!(j.complete(report).await.unwrap());
    let soon = T0.plus(Duration::from_secs(1));
    assert!(
        j.lease_with(crate::LeaseMode::Batch, "orders", "b", soon, LEASE, 10).await.unwrap().is_empty(),
        "never part of a bound batch"
    );
    // When the other's lease expires, both go again, under the same key.
    let later = T0.plus(LEASE);
    let again = j.lease_with(crate::LeaseMode::Batch, "orders", "b", later, LEASE, 10).await.unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].batch_key, batch[0].batch_key);
}

pub async fn drift_events_and_shapes_are_kept(j: &dyn Journal) {
    use dovetail_core::shape::{DriftEvent, DriftKind, JsonType};
    assert_eq!(j.load_shape("orders").await.unwrap(), None);
    j.save_shape("orders", "{\"records\":3}".into(), T0).await.unwrap();
    j.save_shape("orders", "{\"records\":4}".into(), T0).await.unwrap();
    assert_eq!(j.load_shape("orders").await.unwrap().as_deref(), Some("{\"records\":4}"));
    let retyped = DriftEvent {
        kind: DriftKind::Retyped,
        path: "amount".into(),
        json_type: JsonType::String,
        previous_types: vec![JsonType::Integer, JsonType::Number],
        at: T0,
        example_record_id: 42,
    };
    let added = DriftEvent {
        kind: DriftKind::Added,
        path: "coupon".into(),
        json_type: JsonType::String,
        previous_types: vec![],
        at: T0,
        example_record_id: 43,
    };
    j.record_drift("orders", vec![retyped.clone(), added.clone()]).await.unwrap();
    j.record_drift("refunds", vec![added.clone()]).await.unwrap();
    let events = j.drift_events(Some("orders"), 10).await.unwrap();
    assert_eq!(events.iter().map(|e| e.event.clone()).collect::<Vec<_>>(), [added, retyped], "newest first");
    assert_eq!(j.drift_events(None, 10).await.unwrap().len(), 3);
}

pub async fn retention_purges_only_finished_payloads(j: &dyn Journal) {
    let delivered = j.ingest(new_record("orders", Some("p1"), "{\"a\":1}")).await.unwrap().id();
    let dead = j.ingest(new_record("orders", Some("p2"), "{\"a\":2}")).await.unwrap().id();
    let waiting = j.ingest(new_record("orders", Some("p3"), "{\"a\":3}")).await.unwrap().id();
    j.lease("orders", "a", T0, LEASE, 2).await.unwrap();
    let done = plain_report(delivered, "a", attempt(1, 200, None), Outcome::Delivered);
    let refused = Outcome::Dead { class: ErrorClass::Rejected, reason: "no".into() };
    let failed = plain_report(dead, "a", attempt(1, 422, Some(ErrorClass::Rejected)), refused);
    assert_eq!(j.complete_many(vec![done, failed]).await.unwrap(), [true, true]);
    let early = T0;
    assert_eq!(j.purge_payloads("orders", early, early, 100).await.unwrap(), 0, "nothing finished before the cut-off");
    let later = T0.plus(Duration::from_secs(3600));
    assert_eq!(j.purge_payloads("orders", later, later, 100).await.unwrap(), 1);
    assert_eq!(j.purge_payloads("orders", later, later, 100).await.unwrap(), 0, "once");
    let d = j.record(delivered).await.unwrap().unwrap();
    assert!(d.payload.is_empty());
    assert_eq!((d.payload_purged_at, d.idempotency_key.as_str()), (Some(later), "key-orders-p1"), "the record stays");
    assert_eq!(j.record(dead).await.unwrap().unwrap().payload, b"{\"a\":2}", "a dead record keeps what a replay needs");
    assert_eq!(j.record(waiting).await.unwrap().unwrap().payload, b"{\"a\":3}");
}

pub async fn retry_waits_until_due(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    let at = T0.plus(Duration::from_secs(10));
    let rep = plain_report(id, "a", attempt(1, 503, Some(ErrorClass::Server)), Outcome::Retry { at });
    assert!(j.complete(rep).await.unwrap());
    assert_eq!(j.next_due("orders").await.unwrap(), Some(at));
    assert!(j.lease("orders", "a", T0.plus(Duration::from_secs(9)), LEASE, 10).await.unwrap().is_empty());
    let again = j.lease("orders", "a", at, LEASE, 10).await.unwrap();
    assert_eq!((again[0].attempt, again[0].failures), (2, 1));
}

pub async fn dead_letter_and_replay_keep_the_key(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    let dead = Outcome::Dead { class: ErrorClass::Rejected, reason: "422: amount missing".into() };
    j.complete(plain_report(id, "a", attempt(1, 422, Some(ErrorClass::Rejected)), dead)).await.unwrap();
    let dl = j.dead_letters(Some("orders"), 100).await.unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(
        (dl[0].id, dl[0].class, dl[0].reason.as_str(), dl[0].attempts),
        (id, ErrorClass::Rejected, "422: amount missing", 1)
    );
    assert!(j.dead_letters(Some("refunds"), 100).await.unwrap().is_empty());
    assert_eq!(j.count_dead(&Selector::Ids(vec![id])).await.unwrap(), 1);
    let later = T0.plus(Duration::from_secs(60));
    assert_eq!(j.replay(&Selector::Ids(vec![id]), later, 100).await.unwrap(), 1);
    assert!(j.dead_letters(None, 100).await.unwrap().is_empty());
    let again = j.lease("orders", "a", later, LEASE, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].idempotency_key, "key-orders-d1");
    assert_eq!((again[0].attempt, again[0].failures), (2, 0), "replay gives a fresh budget, attempts keep counting");
    assert_eq!(j.replay(&Selector::Ids(vec![id]), later, 100).await.unwrap(), 0, "only dead records replay");
}

pub async fn discard_keeps_the_record(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    let dead = Outcome::Dead { class: ErrorClass::Rejected, reason: "no".into() };
    j.complete(plain_report(id, "a", attempt(1, 400, Some(ErrorClass::Rejected)), dead)).await.unwrap();
    let later = T0.plus(Duration::from_secs(1));
    assert_eq!(j.discard(&Selector::Flow("orders".into()), later, 100).await.unwrap(), 1);
    let c = counts_of(j, "orders").await;
    assert_eq!((c.dead, c.discarded), (0, 1));
    assert_eq!(j.record(id).await.unwrap().unwrap().state, StateName::Discarded);
}

pub async fn quarantine_is_dead_at_intake(j: &dyn Journal) {
    let mut r = new_record("orders", Some("bad"), "not json");
    r.quarantine = Some((ErrorClass::Validation, "body is not JSON".into()));
    let id = j.ingest(r).await.unwrap().id();
    assert!(j.lease("orders", "a", T0, LEASE, 10).await.unwrap().is_empty());
    let dl = j.dead_letters(None, 10).await.unwrap();
    assert_eq!((dl[0].id, dl[0].class), (id, ErrorClass::Validation));
    let c = counts_of(j, "orders").await;
    assert_eq!((c.dead, c.quarantined), (1, 1));
    assert_eq!(j.record(id).await.unwrap().unwrap().payload, b"not json", "raw bytes are kept");
}

pub async fn hold_does_not_spend_the_budget(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    let rep = plain_report(id, "a", attempt(1, 401, Some(ErrorClass::Auth)), Outcome::Hold { at: T0 });
    assert!(j.complete(rep).await.unwrap());
    let again = j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    assert_eq!((again[0].attempt, again[0].failures), (2, 0));
}

pub async fn pause_and_resume(j: &dyn Journal) {
    assert_eq!(j.pause_of("orders").await.unwrap(), None);
    j.pause_flow("orders", "401 from billing", T0).await.unwrap();
    let p = j.pause_of("orders").await.unwrap().unwrap();
    assert_eq!((p.since, p.reason.as_str()), (T0, "401 from billing"));
    assert!(counts_of(j, "orders").await.paused.is_some(), "a paused flow shows in the counts even without records");
    assert!(j.resume_flow("orders").await.unwrap());
    assert!(!j.resume_flow("orders").await.unwrap());
    assert_eq!(j.pause_of("orders").await.unwrap(), None);
}

pub async fn oldest_pending_and_counts(j: &dyn Journal) {
    let mut early = new_record("orders", Some("1"), "{}");
    early.received_at = T0;
    let mut late = new_record("orders", Some("2"), "{}");
    late.received_at = T0.plus(Duration::from_secs(5));
    j.ingest(late).await.unwrap();
    j.ingest(early).await.unwrap();
    assert_eq!(counts_of(j, "orders").await.oldest_pending_at, Some(T0));
    j.lease("orders", "a", T0.plus(Duration::from_secs(5)), LEASE, 1).await.unwrap();
    assert_eq!(counts_of(j, "orders").await.oldest_pending_at, Some(T0), "in-flight records still wait");
}

pub async fn replay_in_chunks(j: &dyn Journal) {
    for i in 0..25 {
        let mut r = new_record("orders", Some(&i.to_string()), "x");
        r.quarantine = Some((ErrorClass::Validation, "x".into()));
        j.ingest(r).await.unwrap();
    }
    let sel = Selector::Flow("orders".into());
    assert_eq!(j.count_dead(&sel).await.unwrap(), 25);
    let mut done = 0;
    loop {
        let n = j.replay(&sel, T0, 10).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(n <= 10);
        done += n;
    }
    assert_eq!(done, 25);
    assert_eq!(counts_of(j, "orders").await.pending, 25);
}

pub async fn concurrent_ingests_all_land<J: Journal + ?Sized>(j: &J) {
    // Borrowed journals cannot move into tasks, so run the ingests as
    // concurrent futures on this task; the backend sees them interleaved.
    let futures = (0..500).map(|i| j.ingest(new_record("orders", Some(&format!("d{i}")), "{}")));
    let ids: Vec<Ingested> = futures_join_all(futures).await;
    let distinct: BTreeSet<_> = ids.iter().map(|i| i.id()).collect();
    assert_eq!(distinct.len(), 500);
    assert_eq!(counts_of_generic(j, "orders").await, 500);
}

async fn counts_of_generic<J: Journal + ?Sized>(j: &J, flow: &str) -> u64 {
    j.counts().await.unwrap().into_iter().find(|c| c.flow == flow).map(|c| c.pending).unwrap_or(0)
}

/// A minimal join-all so the suite needs no futures crate.
async fn futures_join_all<F: std::future::Future<Output = crate::Result<Ingested>>>(
    futs: impl Iterator<Item = F>,
) -> Vec<Ingested> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut results: Vec<Option<Ingested>> = vec![None; set.len()];
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, f) in set.iter_mut().enumerate() {
            if results[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => results[i] = Some(r.unwrap()),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    results.into_iter().map(Option::unwrap).collect()
}

pub async fn lease_limit_and_order(j: &dyn Journal) {
    for i in 0..5 {
        j.ingest(new_record("orders", Some(&i.to_string()), "{}")).await.unwrap();
    }
    j.ingest(new_record("refunds", Some("r"), "{}")).await.unwrap();
    let first = j.lease("orders", "a", T0, LEASE, 3).await.unwrap();
    assert_eq!(first.len(), 3);
    assert!(first.windows(2).all(|w| w[0].id < w[1].id));
    assert!(first.iter().all(|r| r.flow == "orders"));
    let rest = j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    assert_eq!(rest.len(), 2);
    assert!(rest[0].id > first[2].id);
}

pub async fn a_prepared_record_leases_with_its_mapped_body(j: &dyn Journal) {
    let mapped = prepared(Some("{\"amount\":1290}"), Some(3), Some(7));
    let raw_as_is = prepared(None, None, None);
    // Every lease mode returns the preparation: each has its own query.
    for (flow, mode) in [("orders", LeaseMode::Oldest), ("keyed", LeaseMode::InKeyOrder), ("bulk", LeaseMode::Batch)] {
        let a = j
            .ingest(NewRecord {
                prepared: Some(mapped.clone()),
                ..new_record(flow, Some("m"), "{\"amount\":\"12.90\"}")
            })
            .await
            .unwrap()
            .id();
        let b = j
            .ingest(NewRecord { prepared: Some(raw_as_is.clone()), ..new_record(flow, Some("r"), "{}") })
            .await
            .unwrap()
            .id();
        let leased = j.lease_with(mode, flow, "a", T0, LEASE, 10).await.unwrap();
        assert_eq!(leased.iter().map(|r| r.id).collect::<Vec<_>>(), [a, b], "{mode:?}");
        assert_eq!(leased[0].prepared.as_ref(), Some(&mapped), "{mode:?}: the mapped body and its versions");
        assert_eq!(leased[0].payload, b"{\"amount\":\"12.90\"}", "{mode:?}: the raw payload is kept as received");
        assert_eq!(leased[1].prepared.as_ref(), Some(&raw_as_is), "{mode:?}: prepared, sent as received");
        let d = j.record(a).await.unwrap().unwrap();
        assert_eq!(d.mapped.as_deref(), Some(&b"{\"amount\":1290}"[..]));
        assert_eq!((d.mapping_version, d.sink_mapping_version, d.prepared), (Some(3), Some(7), true));
        assert_eq!(d.payload, b"{\"amount\":\"12.90\"}");
        let d = j.record(b).await.unwrap().unwrap();
        assert_eq!((d.prepared, d.mapped, d.mapping_version), (true, None, None));
    }
}

pub async fn an_unprepared_record_leases_unprepared(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    let detail = j.record(id).await.unwrap().unwrap();
    assert_eq!(
        (detail.prepared, detail.mapped, detail.mapping_version, detail.sink_mapping_version),
        (false, None, None, None)
    );
    let leased = j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].prepared, None, "validated and mapped by the lease holder");
}

pub async fn only_the_lease_holder_stores_a_preparation(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    assert_eq!(j.lease("orders", "a", T0, LEASE, 10).await.unwrap()[0].prepared, None);
    // a stalls past its lease; b takes the record over.
    let taken_at = T0.plus(LEASE);
    assert_eq!(j.lease("orders", "b", taken_at, LEASE, 10).await.unwrap()[0].prepared, None);
    let stale = prepared(Some("{\"stale\":true}"), Some(1), None);
    assert!(!j.prepare(id, "a", 1, stale.clone()).await.unwrap(), "a lost lease may not prepare");
    assert!(!j.prepare(id, "b", 1, stale).await.unwrap(), "nor an older attempt of the holder");
    let d = j.record(id).await.unwrap().unwrap();
    assert_eq!((d.prepared, d.mapped, d.mapping_version), (false, None, None), "nothing was stored");
    let fresh = prepared(Some("{\"mapped\":true}"), Some(2), Some(5));
    assert!(j.prepare(id, "b", 2, fresh.clone()).await.unwrap());
    let d = j.record(id).await.unwrap().unwrap();
    assert_eq!(d.mapped.as_deref(), Some(&b"{\"mapped\":true}"[..]));
    assert_eq!((d.mapping_version, d.sink_mapping_version, d.prepared), (Some(2), Some(5), true));
    // Whatever the attempt's outcome, the next lease sends exactly this.
    let retry_at = taken_at.plus(Duration::from_secs(10));
    let report = plain_report(id, "b", attempt(2, 503, Some(ErrorClass::Server)), Outcome::Retry { at: retry_at });
    assert!(j.complete(report).await.unwrap());
    let again = j.lease("orders", "c", retry_at, LEASE, 10).await.unwrap();
    assert_eq!(again[0].prepared.as_ref(), Some(&fresh), "the next lease needn't map it again");
}

pub async fn engine_state_is_kept_by_key(j: &dyn Journal) {
    assert_eq!(j.load_state("alert_book").await.unwrap(), None);
    j.save_state("alert_book", "{\"v\":1}".into(), T0).await.unwrap();
    j.save_state("other", "x".into(), T0).await.unwrap();
    j.save_state("alert_book", "{\"v\":2}".into(), T0).await.unwrap();
    assert_eq!(j.load_state("alert_book").await.unwrap().as_deref(), Some("{\"v\":2}"), "the latest replaces");
    assert_eq!(j.load_state("other").await.unwrap().as_deref(), Some("x"));
}

pub async fn records_are_found_by_id_correlation_delivery_id_and_key(j: &dyn Journal) {
    let first = NewRecord { external_key: Some("ord_1".into()), ..new_record("orders", Some("evt_1"), "{}") };
    let a = j.ingest(first).await.unwrap().id();
    let second = NewRecord { external_key: Some("ord_1".into()), ..new_record("orders", Some("evt_2"), "{}") };
    let b = j.ingest(second).await.unwrap().id();
    let third = NewRecord { correlation_id: "corr-c".into(), ..new_record("orders", Some("evt_3"), "{}") };
    let c = j.ingest(third).await.unwrap().id();
    let corr = j.record(c).await.unwrap().unwrap().correlation_id;
    assert_eq!(j.find("ord_1", 10).await.unwrap(), [b, a], "every record of a key, newest first");
    assert_eq!(j.find("ord_1", 1).await.unwrap(), [b]);
    assert_eq!(j.find("evt_1", 10).await.unwrap(), [a]);
    assert_eq!(j.find(&corr, 10).await.unwrap(), [c]);
    assert_eq!(j.find(&a.to_string(), 10).await.unwrap(), [a]);
    assert!(j.find("nothing", 10).await.unwrap().is_empty());
}

pub async fn replay_clears_the_preparation(j: &dyn Journal) {
    let p = prepared(Some("{\"mapped\":true}"), Some(2), Some(5));
    let id =
        j.ingest(NewRecord { prepared: Some(p.clone()), ..new_record("orders", Some("d1"), "{}") }).await.unwrap().id();
    assert_eq!(j.lease("orders", "a", T0, LEASE, 10).await.unwrap()[0].prepared.as_ref(), Some(&p));
    let dead = Outcome::Dead { class: ErrorClass::Rejected, reason: "422".into() };
    let report = plain_report(id, "a", attempt(1, 422, Some(ErrorClass::Rejected)), dead);
    assert!(j.complete(report).await.unwrap());
    assert!(j.record(id).await.unwrap().unwrap().prepared, "a dead record keeps its preparation until replayed");
    let later = T0.plus(Duration::from_secs(60));
    assert_eq!(j.replay(&Selector::Ids(vec![id]), later, 10).await.unwrap(), 1);
    let d = j.record(id).await.unwrap().unwrap();
    assert_eq!((d.prepared, d.mapped, d.mapping_version, d.sink_mapping_version), (false, None, None, None));
    assert_eq!(d.payload, b"{}", "the raw payload stays for the new mapping");
    let again = j.lease("orders", "a", later, LEASE, 10).await.unwrap();
    assert_eq!(again[0].prepared, None, "validated and mapped again with the current configuration");
}

pub async fn retention_purges_the_mapped_body_too(j: &dyn Journal) {
    let p = prepared(Some("{\"mapped\":1}"), Some(4), None);
    let delivered = j
        .ingest(NewRecord { prepared: Some(p.clone()), ..new_record("orders", Some("p1"), "{\"a\":1}") })
        .await
        .unwrap()
        .id();
    let waiting = j
        .ingest(NewRecord { prepared: Some(p.clone()), ..new_record("orders", Some("p2"), "{\"a\":2}") })
        .await
        .unwrap()
        .id();
    j.lease("orders", "a", T0, LEASE, 1).await.unwrap();
    let done = plain_report(delivered, "a", attempt(1, 200, None), Outcome::Delivered);
    assert!(j.complete(done).await.unwrap());
    assert_eq!(j.record(delivered).await.unwrap().unwrap().mapped.as_deref(), Some(&b"{\"mapped\":1}"[..]));
    let later = T0.plus(Duration::from_secs(3600));
    assert_eq!(j.purge_payloads("orders", later, later, 100).await.unwrap(), 1);
    let d = j.record(delivered).await.unwrap().unwrap();
    assert!(d.payload.is_empty());
    assert_eq!((d.mapped, d.payload_purged_at), (None, Some(later)), "the mapped body goes with the raw payload");
    let w = j.record(waiting).await.unwrap().unwrap();
    assert_eq!(w.mapped.as_deref(), Some(&b"{\"mapped\":1}"[..]), "a waiting record keeps what it will send");
}

pub async fn a_quarantined_record_is_stored_unprepared(j: &dyn Journal) {
    let mut r = new_record("orders", Some("bad"), "{\"amount\":\"x\"}");
    r.quarantine = Some((ErrorClass::Validation, "amount: not a number".into()));
    r.prepared = Some(prepared(Some("{\"amount\":0}"), Some(1), Some(1)));
    let id = j.ingest(r).await.unwrap().id();
    let d = j.record(id).await.unwrap().unwrap();
    assert_eq!((d.prepared, d.mapped, d.mapping_version, d.sink_mapping_version), (false, None, None, None));
    assert_eq!(j.replay(&Selector::Ids(vec![id]), T0, 10).await.unwrap(), 1);
    assert_eq!(j.lease("orders", "a", T0, LEASE, 10).await.unwrap()[0].prepared, None);
}

/// `secs` seconds after [`T0`] (which starts a minute).
fn at(secs: u64) -> Timestamp {
    T0.plus(Duration::from_secs(secs))
}

/// An empty roll-up of `flow` for the minute `offset` minutes after [`T0`]'s.
fn rollup(flow: &str, offset: i64) -> MinuteRollup {
    MinuteRollup { flow: flow.to_string(), minute: minute_of(T0) + offset, ..MinuteRollup::default() }
}

/// Every roll-up of `flow`, a day either side of [`T0`].
async fn rollups(j: &dyn Journal, flow: &str) -> Vec<MinuteRollup> {
    let day = Duration::from_secs(86_400);
    j.minutes(Some(flow), Timestamp::from_millis(T0.as_millis() - 86_400_000), T0.plus(day)).await.unwrap()
}

fn by_class(pairs: &[(ErrorClass, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(c, n)| (c.as_str().to_string(), *n)).collect()
}

/// `attempt` started at `started_at`, lasting `ms`.
fn timed(mut a: Attempt, started_at: Timestamp, ms: u64) -> Attempt {
    a.started_at = started_at;
    a.duration_ms = ms;
    a
}

pub async fn rollups_count_intake_but_not_duplicates(j: &dyn Journal) {
    assert!(matches!(j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap(), Ingested::New(_)));
    assert!(matches!(j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap(), Ingested::Duplicate(_)));
    j.ingest(new_record("orders", None, "{}")).await.unwrap();
    let mut bad = new_record("orders", Some("bad"), "not json");
    bad.quarantine = Some((ErrorClass::Validation, "body is not JSON".into()));
    j.ingest(bad.clone()).await.unwrap();
    j.ingest(bad).await.unwrap();
    j.ingest(new_record("refunds", Some("d1"), "{}")).await.unwrap();
    assert_eq!(
        rollups(j, "orders").await,
        [MinuteRollup { received: 3, quarantined: 1, ..rollup("orders", 0) }],
        "duplicates are not counted, a quarantined record is received and quarantined"
    );
    assert_eq!(rollups(j, "refunds").await, [MinuteRollup { received: 1, ..rollup("refunds", 0) }]);
    // Operator actions are not traffic.
    assert_eq!(j.replay(&Selector::All, T0, 10).await.unwrap(), 1);
    j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    assert_eq!(rollups(j, "orders").await, [MinuteRollup { received: 3, quarantined: 1, ..rollup("orders", 0) }]);
}

pub async fn rollups_count_outcomes_latency_and_freshness(j: &dyn Journal) {
    let mut ids = Vec::new();
    for d in ["d1", "d2", "d3", "d4"] {
        ids.push(j.ingest(new_record("orders", Some(d), "{}")).await.unwrap().id());
    }
    assert_eq!(j.lease("orders", "a", T0, LEASE, 10).await.unwrap().len(), 4);
    // Slow, but the latest delivery to end.
    let slow = timed(attempt(1, 200, None), T0, 40_000);
    assert!(j.complete(plain_report(ids[0], "a", slow, Outcome::Delivered)).await.unwrap());
    let retry = Outcome::Retry { at: at(5) };
    assert!(j.complete(plain_report(ids[1], "a", attempt(1, 503, Some(ErrorClass::Server)), retry)).await.unwrap());
    let dead = Outcome::Dead { class: ErrorClass::Rejected, reason: "422".into() };
    assert!(j.complete(plain_report(ids[2], "a", attempt(1, 422, Some(ErrorClass::Rejected)), dead)).await.unwrap());
    let hold = Outcome::Hold { at: at(10) };
    assert!(j.complete(plain_report(ids[3], "a", attempt(1, 401, Some(ErrorClass::Auth)), hold)).await.unwrap());
    // The retried record goes again and delivers fast, ending before the slow one.
    assert_eq!(j.lease("orders", "a", at(5), LEASE, 1).await.unwrap()[0].id, ids[1]);
    let fast = timed(attempt(2, 200, None), at(5), 12);
    assert!(j.complete(plain_report(ids[1], "a", fast, Outcome::Delivered)).await.unwrap());
    let mut latency_buckets = rollup("orders", 0).latency_buckets;
    latency_buckets[bucket_of(40_000)] += 1;
    latency_buckets[bucket_of(12)] += 1;
    assert_eq!(
        rollups(j, "orders").await,
        [MinuteRollup {
            received: 4,
            delivered: 2,
            dead: 1,
            retried: 1,
            failures_by_class: by_class(&[(ErrorClass::Server, 1), (ErrorClass::Rejected, 1), (ErrorClass::Auth, 1)]),
            latency_count: 2,
            latency_sum_ms: 40_012,
            latency_buckets,
            last_delivered_at: Some(at(40)),
            ..rollup("orders", 0)
        }],
        "a hold counts only its class; latency is of deliveries; freshness is the latest end"
    );
}

pub async fn a_lost_lease_counts_nothing_in_the_rollups(j: &dyn Journal) {
    let id = j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap().id();
    j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    j.lease("orders", "b", T0.plus(LEASE), LEASE, 10).await.unwrap();
    let taken_over = [MinuteRollup {
        received: 1,
        failures_by_class: by_class(&[(ErrorClass::Interrupted, 1)]),
        ..rollup("orders", 0)
    }];
    assert_eq!(rollups(j, "orders").await, taken_over, "the takeover counts the lost attempt as interrupted");
    let stale = |outcome| plain_report(id, "a", attempt(1, 503, Some(ErrorClass::Server)), outcome);
    assert!(!j.complete(plain_report(id, "a", attempt(1, 200, None), Outcome::Delivered)).await.unwrap());
    assert!(!j.complete(stale(Outcome::Retry { at: T0 })).await.unwrap());
    assert!(!j.complete(stale(Outcome::Hold { at: T0 })).await.unwrap());
    let dead = Outcome::Dead { class: ErrorClass::Server, reason: "gave up".into() };
    assert_eq!(j.complete_many(vec![stale(dead)]).await.unwrap(), [false]);
    assert_eq!(rollups(j, "orders").await, taken_over, "reports of a lost lease count nothing");
}

pub async fn an_expired_lease_counts_one_interrupted_attempt(j: &dyn Journal) {
    j.ingest(new_record("orders", Some("d1"), "{}")).await.unwrap();
    j.lease("orders", "a", at(90), LEASE, 10).await.unwrap();
    assert!(j.lease("orders", "a", at(100), LEASE, 10).await.unwrap().is_empty());
    assert_eq!(rollups(j, "orders").await, [MinuteRollup { received: 1, ..rollup("orders", 0) }]);
    assert_eq!(j.lease("orders", "b", at(125), LEASE, 10).await.unwrap().len(), 1);
    assert!(j.lease("orders", "b", at(130), LEASE, 10).await.unwrap().is_empty());
    let interrupted =
        MinuteRollup { failures_by_class: by_class(&[(ErrorClass::Interrupted, 1)]), ..rollup("orders", 1) };
    assert_eq!(
        rollups(j, "orders").await,
        [MinuteRollup { received: 1, ..rollup("orders", 0) }, interrupted],
        "once, in the minute the lost attempt was leased"
    );
}

pub async fn complete_many_counts_every_applied_report(j: &dyn Journal) {
    let mut ids = Vec::new();
    for d in ["d1", "d2", "d3", "d4"] {
        ids.push(j.ingest(new_record("orders", Some(d), "{}")).await.unwrap().id());
    }
    j.lease("orders", "a", T0, LEASE, 10).await.unwrap();
    let dead = Outcome::Dead { class: ErrorClass::Rejected, reason: "422".into() };
    let reports = vec![
        plain_report(ids[0], "a", timed(attempt(1, 200, None), T0, 300), Outcome::Delivered),
        plain_report(ids[1], "a", timed(attempt(1, 200, None), T0, 700), Outcome::Delivered),
        plain_report(ids[2], "a", attempt(1, 422, Some(ErrorClass::Rejected)), dead),
        // Not this owner's lease: ignored, and not counted.
        plain_report(ids[3], "z", attempt(1, 200, None), Outcome::Delivered),
    ];
    assert_eq!(j.complete_many(reports).await.unwrap(), [true, true, true, false]);
    let mut latency_buckets = rollup("orders", 0).latency_buckets;
    latency_buckets[bucket_of(300)] += 1;
    latency_buckets[bucket_of(700)] += 1;
    assert_eq!(
        rollups(j, "orders").await,
        [MinuteRollup {
            received: 4,
            delivered: 2,
            dead: 1,
            failures_by_class: by_class(&[(ErrorClass::Rejected, 1)]),
            latency_count: 2,
            latency_sum_ms: 1_000,
            latency_buckets,
            last_delivered_at: Some(T0.plus(Duration::from_millis(700))),
            ..rollup("orders", 0)
        }]
    );
}

pub async fn rollups_are_per_minute(j: &dyn Journal) {
    let received = |d: &str, ms: u64| NewRecord {
        received_at: T0.plus(Duration::from_millis(ms)),
        ..new_record("orders", Some(d), "{}")
    };
    let first = j.ingest(received("d1", 0)).await.unwrap().id();
    j.ingest(received("d2", 59_999)).await.unwrap();
    let third = j.ingest(received("d3", 60_000)).await.unwrap().id();
    assert_eq!(j.lease("orders", "a", at(60), LEASE, 10).await.unwrap().len(), 3);
    // Counted in the minute the attempt started, though it ends in the next.
    let late = timed(attempt(1, 200, None), T0.plus(Duration::from_millis(119_999)), 1_000);
    assert!(j.complete(plain_report(first, "a", late, Outcome::Delivered)).await.unwrap());
    let retry = timed(attempt(1, 503, Some(ErrorClass::Server)), at(120), 10);
    assert!(j.complete(plain_report(third, "a", retry, Outcome::Retry { at: at(130) })).await.unwrap());
    let mut latency_buckets = rollup("orders", 0).latency_buckets;
    latency_buckets[bucket_of(1_000)] += 1;
    assert_eq!(
        rollups(j, "orders").await,
        [
            MinuteRollup { received: 2, ..rollup("orders", 0) },
            MinuteRollup {
                received: 1,
                delivered: 1,
                latency_count: 1,
                latency_sum_ms: 1_000,
                latency_buckets,
                last_delivered_at: Some(T0.plus(Duration::from_millis(120_999))),
                ..rollup("orders", 1)
            },
            MinuteRollup { retried: 1, failures_by_class: by_class(&[(ErrorClass::Server, 1)]), ..rollup("orders", 2) },
        ]
    );
}

pub async fn minutes_filter_by_flow_and_time(j: &dyn Journal) {
    for (flow, d, secs) in [("orders", "o0", 0), ("orders", "o1", 60), ("orders", "o2", 120), ("refunds", "r1", 60)] {
        j.ingest(NewRecord { received_at: at(secs), ..new_record(flow, Some(d), "{}") }).await.unwrap();
    }
    let keys =
        |rows: Vec<MinuteRollup>| rows.into_iter().map(|r| (r.flow, r.minute - minute_of(T0))).collect::<Vec<_>>();
    let pairs = |p: &[(&str, i64)]| p.iter().map(|(f, m)| (f.to_string(), *m)).collect::<Vec<_>>();
    assert_eq!(
        keys(j.minutes(Some("orders"), T0, at(180)).await.unwrap()),
        pairs(&[("orders", 0), ("orders", 1), ("orders", 2)])
    );
    assert_eq!(keys(j.minutes(None, at(60), at(120)).await.unwrap()), pairs(&[("orders", 1), ("refunds", 1)]));
    assert_eq!(
        keys(j.minutes(None, at(30), at(61)).await.unwrap()),
        pairs(&[("orders", 0), ("orders", 1), ("refunds", 1)]),
        "every minute that overlaps the window, by flow then minute"
    );
    assert_eq!(keys(j.minutes(None, at(121), at(600)).await.unwrap()), pairs(&[("orders", 2)]));
    assert!(j.minutes(Some("refunds"), T0, at(60)).await.unwrap().is_empty());
    assert!(j.minutes(Some("nothing"), T0, at(180)).await.unwrap().is_empty());
    assert!(j.minutes(None, at(60), at(60)).await.unwrap().is_empty());
    assert!(j.minutes(None, at(180), T0).await.unwrap().is_empty());
}

pub async fn prune_minutes_deletes_only_older_minutes(j: &dyn Journal) {
    for (flow, d, secs) in [("orders", "o0", 0), ("orders", "o1", 60), ("orders", "o2", 120), ("refunds", "r0", 0)] {
        j.ingest(NewRecord { received_at: at(secs), ..new_record(flow, Some(d), "{}") }).await.unwrap();
    }
    assert_eq!(j.prune_minutes(T0).await.unwrap(), 0, "the minute holding `before` stays");
    assert_eq!(j.prune_minutes(at(90)).await.unwrap(), 2, "minute 0 of both flows");
    let left = j.minutes(None, T0, at(180)).await.unwrap();
    assert_eq!(
        left,
        [MinuteRollup { received: 1, ..rollup("orders", 1) }, MinuteRollup { received: 1, ..rollup("orders", 2) }]
    );
    assert_eq!(j.prune_minutes(at(90)).await.unwrap(), 0);
    // Counting goes on in a kept minute.
    j.ingest(NewRecord { received_at: at(150), ..new_record("orders", Some("o3"), "{}") }).await.unwrap();
    assert_eq!(rollups(j, "orders").await[1], MinuteRollup { received: 2, ..rollup("orders", 2) });
}
