//! One connector's shared state at run time: its concurrency permits, rate
//! limiter and circuit breaker, used by every flow that sends through it.
//!
//! Decisions are the core's (`RateLimiter`, `Breaker`); this module only
//! holds them behind a lock, turns attempt results into their inputs, and
//! records their state in the journal when it changes.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Semaphore;

use dovetail_connectors::http::AttemptResult;
use dovetail_core::clock::Timestamp;
use dovetail_core::policy::{
    Admission, Answer, Breaker, BreakerPolicy, BreakerState, QuotaPolicy, QuotaUsage, RateLimit, RateLimiter,
    Transition,
};
use dovetail_journal::{ConnectorHealth, Journal};

pub(crate) struct ConnectorRuntime {
    pub name: String,
    pub permits: Arc<Semaphore>,
    gate: Mutex<Gate>,
}

struct Gate {
    quota: Option<Quota>,
    limiter: RateLimiter,
    breaker: Option<Breaker>,
    probe_started: Option<Timestamp>,
    /// The breaker state last written to the journal, and since when.
    recorded: (BreakerState, Timestamp, Option<String>),
}

struct Quota {
    policy: QuotaPolicy,
    usage: QuotaUsage,
    /// Admitted but not yet reported: requests that may be on the wire.
    reserved: usize,
}

/// What the gate allows now.
pub(crate) enum Admit {
    /// Send up to `n` records; `probe` when this is the breaker's half-open probe.
    Send { n: usize, probe: bool },
    /// Nothing may go out for this long.
    Wait(Duration, WaitReason),
}

/// Why a connector holds its sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitReason {
    /// The circuit breaker is open.
    Breaker,
    /// The quota of the hour or day is spent.
    Quota,
    /// The token bucket is empty, or the partner said to wait (Retry-After, RateLimit-Reset).
    RateLimit,
}

impl WaitReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            WaitReason::Breaker => "breaker_open",
            WaitReason::Quota => "quota_spent",
            WaitReason::RateLimit => "rate_limit",
        }
    }
}

/// A change worth recording: a breaker transition or a slowdown.
pub(crate) struct Change {
    pub transition: Option<Transition>,
    pub health: ConnectorHealth,
}

impl ConnectorRuntime {
    pub fn new(
        name: &str,
        max_in_flight: usize,
        rate: Option<RateLimit>,
        breaker: Option<BreakerPolicy>,
        quota: Option<(QuotaPolicy, QuotaUsage)>,
        now: Timestamp,
    ) -> Self {
        ConnectorRuntime {
            name: name.to_string(),
            permits: Arc::new(Semaphore::new(max_in_flight)),
            gate: Mutex::new(Gate {
                quota: quota.map(|(policy, usage)| Quota { policy, usage, reserved: 0 }),
                limiter: RateLimiter::new(rate, now),
                breaker: breaker.map(Breaker::new),
                probe_started: None,
                recorded: (BreakerState::Closed, now, None),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the breaker, then the limiter, for up to `wanted` sends.
    pub fn admit(&self, wanted: usize, now: Timestamp) -> (Admit, Option<Change>) {
        let mut g = self.lock();
        let mut probe = false;
        let mut transition = None;
        if let (Some(started), Some(b)) = (g.probe_started, g.breaker.as_mut()) {
            b.expire_probe(started, now);
        }
        if let Some(b) = g.breaker.as_mut() {
            let (admission, t) = b.admit(now);
            transition = t;
            match admission {
                Admission::Allow => {}
                Admission::Probe => probe = true,
                Admission::WaitUntil(until) => return (Admit::Wait(until.since(now), WaitReason::Breaker), None),
            }
        }
        let mut wanted = if probe { 1 } else { wanted };
        if let Some(q) = g.quota.as_mut() {
            // Requests already admitted count as used: they may be on the wire.
            let allowed = q.usage.admit(&q.policy, wanted + q.reserved, now).map(|n| n.saturating_sub(q.reserved));
            match allowed {
                Ok(n) if n > 0 => wanted = n,
                waiting => {
                    if probe && let Some(b) = g.breaker.as_mut() {
                        b.probe_unused();
                    }
                    // Spent until the next window, or all that is left is in flight.
                    let wait = waiting.err().unwrap_or(Duration::from_millis(100));
                    let change = transition.map(|t| g.change(self, Some(t), now));
                    return (Admit::Wait(wait, WaitReason::Quota), change);
                }
            }
        }
        let admit = match g.limiter.take(wanted, now) {
            Ok(n) => {
                if probe {
                    g.probe_started = Some(now);
                }
                if let Some(q) = g.quota.as_mut() {
                    q.reserved += n;
                }
                Admit::Send { n, probe }
            }
            Err(wait) => {
                if probe && let Some(b) = g.breaker.as_mut() {
                    b.probe_unused();
                }
                Admit::Wait(wait, WaitReason::RateLimit)
            }
        };
        let change = transition.map(|t| g.change(self, Some(t), now));
        (admit, change)
    }

    /// Returns what was admitted but not sent (fewer records were due).
    pub fn unused(&self, tokens: usize, probe: bool) {
        let mut g = self.lock();
        g.limiter.refund(tokens);
        if let Some(q) = g.quota.as_mut() {
            q.reserved = q.reserved.saturating_sub(tokens);
        }
        if probe && let Some(b) = g.breaker.as_mut() {
            b.probe_unused();
        }
    }

    /// Feeds one attempt's result to the limiter and the breaker. Returns
    /// when the breaker is open after it (records are then held, not failed)
    /// and any change to record.
    pub fn observe(&self, result: &AttemptResult, now: Timestamp) -> (Option<Timestamp>, Option<Change>) {
        let mut g = self.lock();
        let healthy = match result.answer {
            Answer::Status { status: 429, retry_after } => {
                g.limiter.throttled(retry_after, now);
                true
            }
            Answer::Status { status, .. } if (200..300).contains(&status) => {
                g.limiter.succeeded(now);
                true
            }
            Answer::Service(dovetail_core::policy::ServiceAnswer::Applied) => {
                g.limiter.succeeded(now);
                true
            }
            other => other.healthy(),
        };
        g.limiter.hint(result.hint, now);
        if let Some(q) = g.quota.as_mut() {
            q.reserved = q.reserved.saturating_sub(1);
            for alert in q.usage.record(&q.policy, 1, now) {
                tracing::warn!(connector = %self.name, window = alert.window.as_str(), used = alert.used, limit = alert.limit,
                    "quota alert: {} of {} requests used this {}", alert.used, alert.limit, alert.window.as_str());
            }
        }
        let transition = g.breaker.as_mut().and_then(|b| b.record(healthy, now));
        if transition.is_some() {
            g.probe_started = None;
        }
        let open_until = match g.breaker.as_ref().map(Breaker::state) {
            Some(BreakerState::Open { until }) => Some(until),
            _ => None,
        };
        let throttled = matches!(result.answer, Answer::Status { status: 429, .. });
        let change = (transition.is_some() || throttled).then(|| g.change(self, transition, now));
        (open_until, change)
    }

    /// The connector's name when it has a quota, for counting attempts against it.
    pub fn quota_name(&self) -> Option<String> {
        self.lock().quota.as_ref().map(|_| self.name.clone())
    }

    /// The health to write at start-up: closed, full pace.
    pub fn health(&self, now: Timestamp) -> ConnectorHealth {
        let mut g = self.lock();
        g.change(self, None, now).health
    }
}

impl Gate {
    fn change(&mut self, c: &ConnectorRuntime, transition: Option<Transition>, now: Timestamp) -> Change {
        if let Some(t) = &transition {
            self.recorded = (t.to, now, Some(t.reason.clone()));
        }
        let (state, since, reason) = self.recorded.clone();
        let limiter = self.limiter.state();
        let health = ConnectorHealth {
            connector: c.name.clone(),
            breaker: state.name().to_string(),
            since,
            open_until: match state {
                BreakerState::Open { until } => Some(until),
                _ => None,
            },
            reason,
            current_rate: limiter.current_rate,
            configured_rate: limiter.configured_rate,
            blocked_until: limiter.blocked_until.filter(|b| *b > now),
            updated_at: now,
        };
        Change { transition, health }
    }
}

/// Logs a change and writes it to the journal.
pub(crate) async fn record(change: Option<Change>, journal: &dyn Journal) {
    let Some(change) = change else { return };
    let name = change.health.connector.clone();
    let h = &change.health;
    if let Some(t) = &change.transition {
        match t.to {
            BreakerState::Open { until } => tracing::warn!(connector = %h.connector, %until, reason = %t.reason,
                "circuit breaker opened: records are held, not sent, until a probe succeeds"),
            BreakerState::HalfOpen { .. } => {
                tracing::info!(connector = %h.connector, reason = %t.reason, "circuit breaker half-open")
            }
            BreakerState::Closed => {
                tracing::info!(connector = %h.connector, reason = %t.reason, "circuit breaker closed")
            }
        }
    } else if let Some(rate) = h.current_rate {
        tracing::info!(connector = %h.connector, rate_per_second = rate, blocked_until = ?h.blocked_until.map(|t| t.to_string()),
            "partner throttled us (429): slowing down");
    } else {
        tracing::info!(connector = %h.connector, blocked_until = ?h.blocked_until.map(|t| t.to_string()), "partner throttled us (429): waiting");
    }
    if let Err(e) = journal.set_connector_health(change.health).await {
        tracing::error!(connector = %name, error = %e, "cannot record the connector's health");
    }
}
