//! Alert rules, their evaluation and the alerts' life cycle.
//!
//! Three pure steps, run by the engine on every evaluation of a flow:
//! 1. [`evaluate`]: a flow's [`AlertRules`] against a [`FlowSnapshot`] of
//!    numbers the engine took from the journal → the [`Condition`]s that
//!    hold now;
//! 2. [`AlertBook::observe`]: those conditions against the alerts already
//!    active → [`Notice`]s: a condition seen for the first time fires once,
//!    one that stays repeats every `repeat_every` since its last notice, one
//!    that is gone resolves once and joins a bounded list of recent alerts;
//! 3. [`generic_json`] / [`slack_json`]: a notice → a webhook body.
//!
//! Nothing here reads a clock or does I/O: the time comes in with the
//! snapshot and with `observe`, so tests drive plain [`Timestamp`]s.
//!
//! Levels and events: every rule is a level (it holds while its numbers are
//! bad) except schema drift, which is an event. A drift condition fires on
//! each evaluation that brings new drift events, even while the previous
//! batch's alert is active, never repeats, and resolves at the first
//! evaluation without new events (one `Resolved` notice, so receivers that
//! pair firing and resolved notices close it).
//!
//! Configuration: `[alerts]` holds the engine-wide rules and deserializes to
//! [`AlertRules`] (built-in defaults for what it leaves out); a flow's
//! `alerts = { ... }` deserializes to [`AlertOverrides`] and the flow's rules
//! are `engine_rules.merged(&flow_overrides)`. In both, a key left out is
//! inherited, `false` turns a rule off, and a rule's table is merged field by
//! field over the inherited rule (or over the rule's built-in defaults when
//! the inherited rule is off):
//!
//! ```toml
//! [alerts]
//! error_rate = { above = 0.1, window = "10m" }
//! max_silence = "2h"
//! repeat_every = "30m"
//!
//! [flows.orders]
//! alerts = { error_rate = { above = 0.3 }, dlq_depth = false, p95_latency = { above = "2s" } }
//! # orders: error rate above 30% over 10m; no DLQ alert; p95 above 2s or 5 times its baseline.
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::clock::Timestamp;
use crate::duration::format_duration;
use crate::policy::Window;

/// How many resolved alerts [`AlertBook::recent`] keeps.
pub const RECENT_LIMIT: usize = 100;

/// The longest auth-failure reason quoted in a summary, in characters.
const MAX_REASON_CHARS: usize = 300;

/// Drift events named in a summary; the rest are counted.
const MAX_DRIFT_NAMED: usize = 3;

// ---------------------------------------------------------------------------
// Rules

/// A flow's alert rules, resolved: `None` (or `false`) is off.
///
/// Deserializes from `[alerts]`: every key may be left out and takes the
/// default below; see [`AlertOverrides`] for the accepted values.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "AlertOverrides")]
pub struct AlertRules {
    /// Failed attempts over attempts in a rolling window. Critical.
    pub error_rate: Option<ErrorRateRule>,
    /// Nothing received for longer than this (counted from the engine's
    /// start at the earliest). Warning.
    pub max_silence: Option<Duration>,
    /// p95 delivery latency above a fixed threshold or a multiple of the
    /// flow's own baseline. Warning.
    pub p95_latency: Option<LatencyRule>,
    /// Alert when the dead-letter queue holds at least this many records. Warning.
    pub dlq_depth: Option<u64>,
    /// Alert when the oldest waiting record arrived longer ago than this. Critical.
    pub oldest_pending: Option<Duration>,
    /// Quarantined over received records in a rolling window. Warning.
    pub rejection_rate: Option<RateRule>,
    /// Alert as soon as the flow is paused for an auth failure. Critical.
    pub auth_failure: bool,
    /// Alert when a connector has used at least this fraction of a quota
    /// window. Warning; critical when the window is spent.
    pub quota_at: Option<f64>,
    /// Alert on each batch of new schema-drift events. Warning.
    pub drift: bool,
    /// How often an active alert is notified again.
    pub repeat_every: Duration,
}

/// `error_rate = { above, window, min_attempts }`: fires when strictly more
/// than `above` of at least `min_attempts` attempts in `window` failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorRateRule {
    /// A fraction in `[0, 1)`.
    pub above: f64,
    pub window: Duration,
    /// Fewer attempts than this say nothing (0 counts as 1).
    pub min_attempts: u64,
}

/// `rejection_rate = { above, window, min_records }`: fires when strictly
/// more than `above` of at least `min_records` records received in `window`
/// were quarantined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateRule {
    /// A fraction in `[0, 1)`.
    pub above: f64,
    pub window: Duration,
    /// Fewer records than this say nothing (0 counts as 1).
    pub min_records: u64,
}

/// `p95_latency = { above, baseline_multiple, window, baseline_window, min_samples }`:
/// fires when the p95 over `window` is strictly above `above`, or strictly
/// above `baseline_multiple` times the baseline (the p95 over the
/// `baseline_window` that ends where `window` starts). Either may be off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyRule {
    pub above: Option<Duration>,
    /// Greater than 1.
    pub baseline_multiple: Option<f64>,
    pub window: Duration,
    pub baseline_window: Duration,
    /// Fewer latency samples in `window` than this say nothing (0 counts as 1).
    pub min_samples: u64,
}

impl Default for ErrorRateRule {
    /// One attempt in five failing for five minutes is more than a partner's
    /// usual blips; twenty attempts keep one failure of three from paging.
    fn default() -> Self {
        ErrorRateRule { above: 0.2, window: Duration::from_secs(5 * 60), min_attempts: 20 }
    }
}

impl Default for RateRule {
    /// A source that sends one record in twenty we cannot use has changed;
    /// over 15 minutes and 20 records, so one bad record does not alert.
    fn default() -> Self {
        RateRule { above: 0.05, window: Duration::from_secs(15 * 60), min_records: 20 }
    }
}

impl Default for LatencyRule {
    /// No fixed threshold (partners' normal latency ranges from 50 ms to
    /// seconds); five times the flow's own p95 of the previous day is a
    /// partner in trouble, over 15 minutes and 20 samples so one slow
    /// request is not.
    fn default() -> Self {
        LatencyRule {
            above: None,
            baseline_multiple: Some(5.0),
            window: Duration::from_secs(15 * 60),
            baseline_window: Duration::from_secs(24 * 3600),
            min_samples: 20,
        }
    }
}

impl Default for AlertRules {
    /// - `error_rate`, `rejection_rate`, `p95_latency`: see their defaults;
    /// - `max_silence`: off, since how often records come differs per
    ///   integration; set it per flow;
    /// - `dlq_depth`: 1, since a record in the DLQ needs a human;
    /// - `oldest_pending`: 15m, past the retry schedule's early backoffs, so a
    ///   record that old is late, not merely retrying;
    /// - `auth_failure`: on, since the flow is paused until someone acts;
    /// - `quota_at`: 0.9, leaving time to act before records wait for the
    ///   next window;
    /// - `drift`: on, since a changed payload may break mappings downstream;
    /// - `repeat_every`: 1h, a reminder without drowning the channel.
    fn default() -> Self {
        AlertRules {
            error_rate: Some(ErrorRateRule::default()),
            max_silence: None,
            p95_latency: Some(LatencyRule::default()),
            dlq_depth: Some(1),
            oldest_pending: Some(Duration::from_secs(15 * 60)),
            rejection_rate: Some(RateRule::default()),
            auth_failure: true,
            quota_at: Some(0.9),
            drift: true,
            repeat_every: Duration::from_secs(3600),
        }
    }
}

/// The spans the engine must count over for [`FlowSnapshot`]; `None` when
/// the rule that needs it is off (the figure is then ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Windows {
    /// `attempts_in_window` and `failed_in_window`: `(now - this, now]`.
    pub error_rate: Option<Duration>,
    /// `received_in_window` and `quarantined_in_window`: `(now - this, now]`.
    pub rejection_rate: Option<Duration>,
    /// `latency_samples` and `p95_latency_ms`: `(now - this, now]`.
    pub latency: Option<Duration>,
    /// `baseline_p95_ms`: the span of this length that ends where the
    /// latency window starts, i.e. `(now - latency - this, now - latency]`.
    pub latency_baseline: Option<Duration>,
}

impl AlertRules {
    /// These rules with a flow's overrides applied (see the module docs).
    pub fn merged(&self, o: &AlertOverrides) -> AlertRules {
        AlertRules {
            error_rate: o.error_rate.apply(self.error_rate, |ov, base| ov.over(base)),
            max_silence: o.max_silence.apply(self.max_silence, |v, _| v.0),
            p95_latency: o.p95_latency.apply(self.p95_latency, |ov, base| ov.over(base)),
            dlq_depth: o.dlq_depth.apply(self.dlq_depth, |v, _| v.0),
            oldest_pending: o.oldest_pending.apply(self.oldest_pending, |v, _| v.0),
            rejection_rate: o.rejection_rate.apply(self.rejection_rate, |ov, base| ov.over(base)),
            auth_failure: o.auth_failure.unwrap_or(self.auth_failure),
            quota_at: o.quota_at.apply(self.quota_at, |v, _| v.0),
            drift: o.drift.unwrap_or(self.drift),
            repeat_every: o.repeat_every.map_or(self.repeat_every, |d| d.0),
        }
    }

    /// Which windows the engine must count over to fill a [`FlowSnapshot`].
    pub fn windows(&self) -> Windows {
        let latency = self.p95_latency.filter(|l| l.above.is_some() || l.baseline_multiple.is_some());
        Windows {
            error_rate: self.error_rate.map(|r| r.window),
            rejection_rate: self.rejection_rate.map(|r| r.window),
            latency: latency.map(|l| l.window),
            latency_baseline: latency.filter(|l| l.baseline_multiple.is_some()).map(|l| l.baseline_window),
        }
    }
}

impl From<AlertOverrides> for AlertRules {
    fn from(o: AlertOverrides) -> Self {
        AlertRules::default().merged(&o)
    }
}

/// A flow's `alerts = { ... }` (and the shape of `[alerts]`): every key may
/// be left out (inherited) and every rule may be `false` (off).
///
/// Keys: `error_rate = { above = 0.2, window = "5m", min_attempts = 20 }`,
/// `max_silence = "2h"`, `p95_latency = { above = "2s", baseline_multiple = 5,
/// window = "15m", baseline_window = "24h", min_samples = 20 }` (`above` and
/// `baseline_multiple` may be `false` too), `dlq_depth = 1`,
/// `oldest_pending = "15m"`, `rejection_rate = { above = 0.05, window = "15m",
/// min_records = 20 }`, `auth_failure = true`, `quota_at = 0.9`,
/// `drift = true`, `repeat_every = "1h"`. Rates are fractions in `[0, 1)`,
/// `quota_at` in `(0, 1]`, `baseline_multiple` above 1, `dlq_depth` at least
/// 1, durations longer than zero.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertOverrides {
    error_rate: Setting<ErrorRateOverride>,
    max_silence: Setting<Dur>,
    p95_latency: Setting<LatencyOverride>,
    dlq_depth: Setting<Depth>,
    oldest_pending: Setting<Dur>,
    rejection_rate: Setting<RateOverride>,
    auth_failure: Option<bool>,
    quota_at: Setting<Share>,
    drift: Option<bool>,
    repeat_every: Option<Dur>,
}

/// One overridable key: left out, `false`, or a value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum Setting<T> {
    #[default]
    Inherit,
    Off,
    Set(T),
}

impl<T> Setting<T> {
    /// The setting over the inherited value; `set` gets the inherited value
    /// (or `B::default()` when it is off) to merge into.
    fn apply<B: Default>(&self, inherited: Option<B>, set: impl FnOnce(&T, B) -> B) -> Option<B> {
        match self {
            Setting::Inherit => inherited,
            Setting::Off => None,
            Setting::Set(v) => Some(set(v, inherited.unwrap_or_default())),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Setting<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Setting<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value, or false to turn it off")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Setting<T>, E> {
                if v {
                    Err(E::custom("`true` is not a value here: give one, or write `false` to turn it off"))
                } else {
                    Ok(Setting::Off)
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Setting<T>, E> {
                T::deserialize(de::value::I64Deserializer::new(v)).map(Setting::Set)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Setting<T>, E> {
                T::deserialize(de::value::U64Deserializer::new(v)).map(Setting::Set)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Setting<T>, E> {
                T::deserialize(de::value::F64Deserializer::new(v)).map(Setting::Set)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Setting<T>, E> {
                T::deserialize(de::value::StrDeserializer::new(v)).map(Setting::Set)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Setting<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Setting::Set)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ErrorRateOverride {
    above: Option<Rate>,
    window: Option<Dur>,
    min_attempts: Option<u64>,
}

impl ErrorRateOverride {
    fn over(&self, base: ErrorRateRule) -> ErrorRateRule {
        ErrorRateRule {
            above: self.above.map_or(base.above, |v| v.0),
            window: self.window.map_or(base.window, |v| v.0),
            min_attempts: self.min_attempts.unwrap_or(base.min_attempts),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RateOverride {
    above: Option<Rate>,
    window: Option<Dur>,
    min_records: Option<u64>,
}

impl RateOverride {
    fn over(&self, base: RateRule) -> RateRule {
        RateRule {
            above: self.above.map_or(base.above, |v| v.0),
            window: self.window.map_or(base.window, |v| v.0),
            min_records: self.min_records.unwrap_or(base.min_records),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LatencyOverride {
    above: Setting<Dur>,
    baseline_multiple: Setting<Multiple>,
    window: Option<Dur>,
    baseline_window: Option<Dur>,
    min_samples: Option<u64>,
}

impl LatencyOverride {
    fn over(&self, base: LatencyRule) -> LatencyRule {
        LatencyRule {
            above: self.above.apply(base.above, |v, _| v.0),
            baseline_multiple: self.baseline_multiple.apply(base.baseline_multiple, |v, _| v.0),
            window: self.window.map_or(base.window, |v| v.0),
            baseline_window: self.baseline_window.map_or(base.baseline_window, |v| v.0),
            min_samples: self.min_samples.unwrap_or(base.min_samples),
        }
    }
}

/// A duration written `"5m"`, longer than zero.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let v = crate::duration::parse_duration(&s).map_err(de::Error::custom)?;
        if v.is_zero() {
            return Err(de::Error::custom(format!("`{s}` is no time at all; give a duration, e.g. \"5m\"")));
        }
        Ok(Dur(v))
    }
}

/// A fraction in `[0, 1)`: the share a rate must exceed.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rate(f64);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if (0.0..1.0).contains(&v) {
            Ok(Rate(v))
        } else {
            Err(de::Error::custom(format!("{v} is not a fraction from 0 up to (not including) 1, e.g. 0.2 for 20%")))
        }
    }
}

/// A fraction in `(0, 1]`: the share of a quota to alert at.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Share(f64);

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if v > 0.0 && v <= 1.0 {
            Ok(Share(v))
        } else {
            Err(de::Error::custom(format!("{v} is not a fraction above 0 and up to 1, e.g. 0.9 for 90%")))
        }
    }
}

/// A factor above 1.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Multiple(f64);

impl<'de> Deserialize<'de> for Multiple {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if v > 1.0 && v.is_finite() {
            Ok(Multiple(v))
        } else {
            Err(de::Error::custom(format!("{v} is not a factor above 1, e.g. 5 for five times the baseline")))
        }
    }
}

/// A count of at least 1.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Depth(u64);

impl<'de> Deserialize<'de> for Depth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        if v >= 1 {
            Ok(Depth(v))
        } else {
            Err(de::Error::custom("0 would alert on an empty queue; give at least 1, or `false` to turn it off"))
        }
    }
}

// ---------------------------------------------------------------------------
// Snapshot and evaluation

/// A flow's numbers at `now`, as the engine counted them from the journal.
/// Windowed figures are counted over [`AlertRules::windows`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FlowSnapshot {
    pub flow: String,
    pub now: Timestamp,
    /// When this engine process started: silence counts from here at the earliest.
    pub started_at: Timestamp,
    /// Attempts that finished in the error-rate window (delivered or not)…
    pub attempts_in_window: u64,
    /// …and those of them that did not deliver.
    pub failed_in_window: u64,
    /// Records received (accepted or quarantined) in the rejection-rate window…
    pub received_in_window: u64,
    /// …and those of them that were quarantined.
    pub quarantined_in_window: u64,
    /// When the flow last received a record, if ever.
    pub last_received_at: Option<Timestamp>,
    /// Attempts with a latency in the latency window, and their p95 (`None`: none).
    pub latency_samples: u64,
    pub p95_latency_ms: Option<u64>,
    /// The p95 over the baseline window (`None` when there is too little to tell).
    pub baseline_p95_ms: Option<u64>,
    /// Records in the dead-letter queue now.
    pub dlq_depth: u64,
    /// When the oldest record still waiting (pending or in flight) arrived.
    pub oldest_pending_at: Option<Timestamp>,
    /// The reason, when the flow is paused for an auth failure.
    pub paused_for_auth: Option<String>,
    /// Quota use of the flow's connectors; several readings per connector
    /// (hour and day) are allowed, the fullest counts.
    pub quota: Vec<QuotaReading>,
    /// Drift events recorded since the previous evaluation, one line each.
    pub drift_events: Vec<String>,
}

/// How much of one quota window a connector has used.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaReading {
    pub connector: String,
    pub window: Window,
    /// Used over allowed, e.g. 0.92.
    pub used: f64,
}

/// Which rule an alert is about; named as its configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    AuthFailure,
    ErrorRate,
    OldestPending,
    DlqDepth,
    MaxSilence,
    P95Latency,
    RejectionRate,
    Quota,
    Drift,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::AuthFailure => "auth_failure",
            RuleKind::ErrorRate => "error_rate",
            RuleKind::OldestPending => "oldest_pending",
            RuleKind::DlqDepth => "dlq_depth",
            RuleKind::MaxSilence => "max_silence",
            RuleKind::P95Latency => "p95_latency",
            RuleKind::RejectionRate => "rejection_rate",
            RuleKind::Quota => "quota",
            RuleKind::Drift => "drift",
        }
    }

    /// Words for messages.
    pub fn title(self) -> &'static str {
        match self {
            RuleKind::AuthFailure => "auth failure",
            RuleKind::ErrorRate => "error rate",
            RuleKind::OldestPending => "oldest pending record",
            RuleKind::DlqDepth => "dead-letter queue",
            RuleKind::MaxSilence => "silence",
            RuleKind::P95Latency => "p95 latency",
            RuleKind::RejectionRate => "rejection rate",
            RuleKind::Quota => "quota",
            RuleKind::Drift => "schema drift",
        }
    }

    /// The unit of a condition's `value` and `threshold`.
    pub fn unit(self) -> &'static str {
        match self {
            RuleKind::ErrorRate | RuleKind::RejectionRate | RuleKind::Quota => "ratio",
            RuleKind::MaxSilence | RuleKind::OldestPending => "seconds",
            RuleKind::P95Latency => "milliseconds",
            RuleKind::DlqDepth => "records",
            RuleKind::Drift => "events",
            // 1 while paused, against 0.
            RuleKind::AuthFailure => "flag",
        }
    }

    /// An event fires on each evaluation that has it and never repeats.
    pub fn is_event(self) -> bool {
        self == RuleKind::Drift
    }
}

/// What an alert is about: one per flow and rule (and connector, for quotas).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AlertKey {
    pub flow: String,
    pub rule: RuleKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
}

impl AlertKey {
    pub fn new(flow: &str, rule: RuleKind) -> AlertKey {
        AlertKey { flow: flow.to_string(), rule, connector: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// A rule that holds now.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub key: AlertKey,
    pub severity: Severity,
    /// One line with the numbers, starting with the flow's name.
    pub summary: String,
    /// In [`RuleKind::unit`].
    pub value: f64,
    pub threshold: f64,
}

/// The rules that hold for one flow now, in [`RuleKind`] order.
pub fn evaluate(rules: &AlertRules, s: &FlowSnapshot) -> Vec<Condition> {
    let flow = s.flow.as_str();
    let mut out = Vec::new();
    let mut push = |rule, severity, summary: String, value: f64, threshold: f64| {
        out.push(Condition { key: AlertKey::new(flow, rule), severity, summary, value, threshold });
    };

    if rules.auth_failure
        && let Some(reason) = &s.paused_for_auth
    {
        let summary = format!("{flow}: paused after an auth failure: {}", truncate(reason, MAX_REASON_CHARS));
        push(RuleKind::AuthFailure, Severity::Critical, summary, 1.0, 0.0);
    }

    if let Some(r) = rules.error_rate {
        let (n, failed) = (s.attempts_in_window, s.failed_in_window.min(s.attempts_in_window));
        if n >= r.min_attempts.max(1) {
            let ratio = failed as f64 / n as f64;
            if ratio > r.above {
                let summary = format!(
                    "{flow}: {} of {n} attempts failed in the last {} (threshold {})",
                    pct(ratio),
                    format_duration(r.window),
                    pct(r.above)
                );
                push(RuleKind::ErrorRate, Severity::Critical, summary, ratio, r.above);
            }
        }
    }

    if let (Some(max), Some(oldest)) = (rules.oldest_pending, s.oldest_pending_at) {
        let age = s.now.since(oldest);
        if age > max {
            let summary = format!(
                "{flow}: the oldest waiting record arrived {} ago (alert after {})",
                whole_secs(age),
                format_duration(max)
            );
            push(RuleKind::OldestPending, Severity::Critical, summary, secs(age), secs(max));
        }
    }

    if let Some(at) = rules.dlq_depth
        && s.dlq_depth >= at.max(1)
    {
        let n = s.dlq_depth;
        let summary = format!(
            "{flow}: {n} {} in the dead-letter queue (alert at {at})",
            if n == 1 { "record" } else { "records" }
        );
        push(RuleKind::DlqDepth, Severity::Warning, summary, n as f64, at as f64);
    }

    if let Some(max) = rules.max_silence {
        let since = s.last_received_at.map_or(s.started_at, |t| t.max(s.started_at));
        let quiet = s.now.since(since);
        if quiet > max {
            let summary = match s.last_received_at {
                Some(t) if t >= s.started_at => {
                    format!("{flow}: nothing received for {} (max_silence {})", whole_secs(quiet), format_duration(max))
                }
                _ => format!(
                    "{flow}: nothing received since the engine started {} ago (max_silence {})",
                    whole_secs(quiet),
                    format_duration(max)
                ),
            };
            push(RuleKind::MaxSilence, Severity::Warning, summary, secs(quiet), secs(max));
        }
    }

    if let (Some(r), Some(p95)) = (rules.p95_latency, s.p95_latency_ms)
        && s.latency_samples >= r.min_samples.max(1)
    {
        let window = format_duration(r.window);
        let fixed = r.above.map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)).filter(|&a| p95 > a);
        let relative = match (r.baseline_multiple, s.baseline_p95_ms) {
            (Some(m), Some(base)) if base > 0 && p95 as f64 > m * base as f64 => Some((m, base)),
            _ => None,
        };
        if let Some(limit) = fixed {
            let summary = format!("{flow}: p95 latency {} over the last {window} (threshold {})", ms(p95), ms(limit));
            push(RuleKind::P95Latency, Severity::Warning, summary, p95 as f64, limit as f64);
        } else if let Some((m, base)) = relative {
            let summary = format!(
                "{flow}: p95 latency {} over the last {window} is {} times its baseline of {} (threshold {} times)",
                ms(p95),
                factor(p95 as f64 / base as f64),
                ms(base),
                factor(m)
            );
            push(RuleKind::P95Latency, Severity::Warning, summary, p95 as f64, m * base as f64);
        }
    }

    if let Some(r) = rules.rejection_rate {
        let (n, bad) = (s.received_in_window, s.quarantined_in_window.min(s.received_in_window));
        if n >= r.min_records.max(1) {
            let ratio = bad as f64 / n as f64;
            if ratio > r.above {
                let summary = format!(
                    "{flow}: {} of {n} records received in the last {} were rejected (threshold {})",
                    pct(ratio),
                    format_duration(r.window),
                    pct(r.above)
                );
                push(RuleKind::RejectionRate, Severity::Warning, summary, ratio, r.above);
            }
        }
    }

    if let Some(at) = rules.quota_at {
        // The fullest window of each connector, in name order.
        let mut fullest: BTreeMap<&str, &QuotaReading> = BTreeMap::new();
        for q in &s.quota {
            let e = fullest.entry(q.connector.as_str()).or_insert(q);
            if q.used > e.used {
                *e = q;
            }
        }
        for q in fullest.into_values().filter(|q| q.used >= at) {
            let severity = if q.used >= 1.0 { Severity::Critical } else { Severity::Warning };
            let period = match q.window {
                Window::Hour => "hourly",
                Window::Day => "daily",
            };
            let summary = format!(
                "{flow}: connector {} has used {} of its {period} quota (alert at {})",
                q.connector,
                pct(q.used),
                pct(at)
            );
            out.push(Condition {
                key: AlertKey { flow: flow.to_string(), rule: RuleKind::Quota, connector: Some(q.connector.clone()) },
                severity,
                summary,
                value: q.used,
                threshold: at,
            });
        }
    }

    if rules.drift && !s.drift_events.is_empty() {
        let n = s.drift_events.len();
        let mut named = s.drift_events.iter().take(MAX_DRIFT_NAMED).cloned().collect::<Vec<_>>().join("; ");
        if n > MAX_DRIFT_NAMED {
            named.push_str(&format!(" and {} more", n - MAX_DRIFT_NAMED));
        }
        let summary = format!("{flow}: schema drift: {n} {}: {named}", if n == 1 { "change" } else { "changes" });
        out.push(Condition {
            key: AlertKey::new(flow, RuleKind::Drift),
            severity: Severity::Warning,
            summary,
            value: n as f64,
            threshold: 0.0,
        });
    }

    out
}

// ---------------------------------------------------------------------------
// The alerts' life cycle

/// An alert that fired and has not resolved (or, in a [`Notice`], the
/// alert the notice is about).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub key: AlertKey,
    /// As of the latest evaluation, like `summary`, `value` and `threshold`.
    pub severity: Severity,
    pub summary: String,
    pub value: f64,
    pub threshold: f64,
    #[serde(deserialize_with = "de_timestamp")]
    pub started_at: Timestamp,
    /// The highest severity the alert reached: a notifier that took its
    /// firing (by severity) takes its resolution too.
    #[serde(default)]
    pub peak: Option<Severity>,
    /// When the last Fired or Repeated notice went out.
    #[serde(deserialize_with = "de_timestamp")]
    pub last_notified_at: Timestamp,
}

/// An alert that resolved, for `dovetail alerts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedAlert {
    pub alert: Alert,
    #[serde(deserialize_with = "de_timestamp")]
    pub resolved_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// The condition appeared (for drift: a new batch of events).
    Fired,
    /// Still active: `repeat_every` has passed since the last notice, or the
    /// severity went up.
    Repeated,
    /// The condition is gone.
    Resolved,
}

/// Something to tell people about.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub kind: NoticeKind,
    /// The alert as of this notice.
    pub alert: Alert,
    /// When the notice was made (the `now` given to `observe`).
    pub at: Timestamp,
}

/// The active alerts of all flows, and the recently resolved ones.
///
/// Serializable so the engine can save it and carry active alerts across a
/// restart: a condition still present after a restart does not fire again,
/// and repeats keep their schedule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertBook {
    #[serde(with = "alert_list")]
    active: BTreeMap<AlertKey, Alert>,
    recent: VecDeque<ResolvedAlert>,
}

impl AlertBook {
    pub fn new() -> AlertBook {
        AlertBook::default()
    }

    /// Takes one flow's conditions at `now` (from [`evaluate`]) and says
    /// what to notify. Only `flow`'s alerts can resolve here, so flows are
    /// evaluated on their own schedules; conditions about another flow are
    /// ignored, and of two conditions with the same key the first counts.
    /// For a flow that no longer exists, call it with no conditions.
    ///
    /// Notices come in the conditions' order (Fired, Repeated), then the
    /// resolved alerts in key order.
    pub fn observe(
        &mut self,
        now: Timestamp,
        flow: &str,
        conditions: Vec<Condition>,
        repeat_every: Duration,
    ) -> Vec<Notice> {
        let mut notices = Vec::new();
        let mut seen = BTreeSet::new();
        for c in conditions {
            if c.key.flow != flow || seen.contains(&c.key) {
                continue;
            }
            seen.insert(c.key.clone());
            match self.active.get_mut(&c.key) {
                Some(alert) if !c.key.rule.is_event() => {
                    let escalated = c.severity > alert.severity;
                    alert.peak = alert.peak.max(Some(c.severity));
                    alert.severity = c.severity;
                    alert.summary = c.summary;
                    alert.value = c.value;
                    alert.threshold = c.threshold;
                    if escalated || now.since(alert.last_notified_at) >= repeat_every {
                        alert.last_notified_at = now;
                        notices.push(Notice { kind: NoticeKind::Repeated, alert: alert.clone(), at: now });
                    }
                }
                _ => {
                    let alert = Alert {
                        key: c.key.clone(),
                        severity: c.severity,
                        summary: c.summary,
                        value: c.value,
                        threshold: c.threshold,
                        started_at: now,
                        peak: Some(c.severity),
                        last_notified_at: now,
                    };
                    notices.push(Notice { kind: NoticeKind::Fired, alert: alert.clone(), at: now });
                    self.active.insert(c.key, alert);
                }
            }
        }
        let gone: Vec<AlertKey> =
            self.active.keys().filter(|k| k.flow == flow && !seen.contains(*k)).cloned().collect();
        for key in gone {
            if let Some(alert) = self.active.remove(&key) {
                notices.push(Notice { kind: NoticeKind::Resolved, alert: alert.clone(), at: now });
                self.recent.push_back(ResolvedAlert { alert, resolved_at: now });
            }
        }
        while self.recent.len() > RECENT_LIMIT {
            self.recent.pop_front();
        }
        notices
    }

    /// Active alerts, by flow, then rule, then connector.
    pub fn active(&self) -> impl Iterator<Item = &Alert> {
        self.active.values()
    }

    /// The last [`RECENT_LIMIT`] resolved alerts, oldest first.
    pub fn recent(&self) -> impl DoubleEndedIterator<Item = &ResolvedAlert> {
        self.recent.iter()
    }
}

/// Active alerts are saved as a list (JSON map keys must be strings).
mod alert_list {
    use super::*;

    pub fn serialize<S: serde::Serializer>(m: &BTreeMap<AlertKey, Alert>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<AlertKey, Alert>, D::Error> {
        Ok(Vec::<Alert>::deserialize(d)?.into_iter().map(|a| (a.key.clone(), a)).collect())
    }
}

/// Reads a [`Timestamp`] as it serializes: RFC 3339, or `@{ms}ms` out of range.
fn de_timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
    let s = String::deserialize(d)?;
    let ms = match s.strip_prefix('@').and_then(|r| r.strip_suffix("ms")) {
        Some(n) => n.parse::<i64>().ok(),
        None => s.parse::<jiff::Timestamp>().ok().map(|t| t.as_millisecond()),
    };
    ms.map(Timestamp::from_millis).ok_or_else(|| de::Error::custom(format!("`{s}` is not an RFC 3339 timestamp")))
}

// ---------------------------------------------------------------------------
// Notification bodies

/// The generic webhook body, one object per notice:
///
/// ```json
/// {"status": "firing", "repeat": false, "flow": "orders", "rule": "error_rate",
///  "connector": null, "severity": "critical",
///  "summary": "orders: 25% of 120 attempts failed in the last 5m (threshold 20%)",
///  "value": 0.25, "threshold": 0.2, "unit": "ratio",
///  "started_at": "2021-02-25T15:00:00.000Z", "at": "2021-02-25T15:00:00.000Z"}
/// ```
///
/// `status` is `firing` (Fired and Repeated; `repeat` tells them apart) or
/// `resolved`; `rule` is the rule's configuration key; `connector` is set
/// for quota alerts only; `value` and `threshold` are in `unit` (`ratio`,
/// `seconds`, `milliseconds`, `records`, `events` or `flag`); `at` is when
/// the notice was made (for `resolved`, when the alert resolved); the
/// summary is the latest evaluation's.
pub fn generic_json(notice: &Notice) -> serde_json::Value {
    let a = &notice.alert;
    json!({
        "status": if notice.kind == NoticeKind::Resolved { "resolved" } else { "firing" },
        "repeat": notice.kind == NoticeKind::Repeated,
        "flow": a.key.flow,
        "rule": a.key.rule.as_str(),
        "connector": a.key.connector,
        "severity": a.severity.as_str(),
        "summary": a.summary,
        "value": a.value,
        "threshold": a.threshold,
        "unit": a.key.rule.unit(),
        "started_at": a.started_at.to_string(),
        "at": notice.at.to_string(),
    })
}

/// A Slack incoming-webhook body: `text` (the notification and fallback
/// line) and `blocks` (a section with a bold title and the summary, and a
/// context line naming the flow, rule, connector and times). Text from
/// flows, partners and payloads is escaped for Slack's mrkdwn.
pub fn slack_json(notice: &Notice) -> serde_json::Value {
    let a = &notice.alert;
    let status = match notice.kind {
        NoticeKind::Fired => "[FIRING]",
        NoticeKind::Repeated => "[STILL FIRING]",
        NoticeKind::Resolved => "[RESOLVED]",
    };
    let subject = match &a.key.connector {
        Some(c) => format!("{}: {} of {c}", a.key.flow, a.key.rule.title()),
        None => format!("{}: {}", a.key.flow, a.key.rule.title()),
    };
    let detail = a.summary.strip_prefix(&format!("{}: ", a.key.flow)).unwrap_or(&a.summary);
    let (text, body) = match notice.kind {
        NoticeKind::Resolved => {
            let after = whole_secs(notice.at.since(a.started_at));
            (
                format!("{status} {subject} cleared after {after}. Last: {detail}"),
                format!("Cleared after {after}. Last: {detail}"),
            )
        }
        _ => (format!("{status} {}", a.summary), detail.to_string()),
    };
    let mut context = format!("flow {} | rule {}", a.key.flow, a.key.rule.as_str());
    if let Some(c) = &a.key.connector {
        context.push_str(&format!(" | connector {c}"));
    }
    context.push_str(&format!(" | since {}", a.started_at));
    if notice.kind == NoticeKind::Resolved {
        context.push_str(&format!(" | resolved {}", notice.at));
    }
    json!({
        "text": slack_escape(&text),
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": format!("*{} {}* ({})\n{}", status, slack_escape(&subject), a.severity.as_str(), slack_escape(&body)),
                },
            },
            {
                "type": "context",
                "elements": [{ "type": "mrkdwn", "text": slack_escape(&context) }],
            },
        ],
    })
}

/// Slack's three control characters in mrkdwn.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

// ---------------------------------------------------------------------------
// Numbers in words

/// `0.25` → `25%`, `0.3417` → `34.2%`.
fn pct(x: f64) -> String {
    let p = x * 100.0;
    if (p - p.round()).abs() < 1e-9 { format!("{}%", p.round()) } else { format!("{p:.1}%") }
}

/// `6.0` → `6`, `5.0125` → `5.01`.
fn factor(x: f64) -> String {
    let s = format!("{x:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Milliseconds: `850ms`, `2s`, `2.04s`.
fn ms(n: u64) -> String {
    if n == crate::rollup::OVERFLOW_MS {
        return format!(
            "over {}s",
            crate::rollup::LATENCY_BUCKETS_MS[crate::rollup::LATENCY_BUCKETS_MS.len() - 1] / 1000
        );
    }
    if n < 1000 {
        return format!("{n}ms");
    }
    let (s, rest) = (n / 1000, n % 1000);
    if rest == 0 { format!("{s}s") } else { format!("{s}.{}s", format!("{rest:03}").trim_end_matches('0')) }
}

/// A duration in whole seconds, rounded up so that anything past a
/// threshold reads past it.
fn whole_secs(d: Duration) -> String {
    format_duration(Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0)))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2021-02-25T15:00:00Z.
    const T0: Timestamp = Timestamp::from_secs(1_614_265_200);
    const START: Timestamp = Timestamp::from_secs(1_614_265_200 - 86_400);

    fn at(secs: u64) -> Timestamp {
        T0.plus(Duration::from_secs(secs))
    }

    fn mins(n: u64) -> Duration {
        Duration::from_secs(n * 60)
    }

    /// A healthy flow at T0: the engine has run a day, records arrive.
    fn snap(flow: &str) -> FlowSnapshot {
        FlowSnapshot {
            flow: flow.to_string(),
            now: T0,
            started_at: START,
            last_received_at: Some(T0),
            ..FlowSnapshot::default()
        }
    }

    fn only(rules: impl FnOnce(&mut AlertRules)) -> AlertRules {
        let mut r = AlertRules {
            error_rate: None,
            max_silence: None,
            p95_latency: None,
            dlq_depth: None,
            oldest_pending: None,
            rejection_rate: None,
            auth_failure: false,
            quota_at: None,
            drift: false,
            repeat_every: Duration::from_secs(3600),
        };
        rules(&mut r);
        r
    }

    fn rules_fired(rules: &AlertRules, s: &FlowSnapshot) -> Vec<RuleKind> {
        evaluate(rules, s).into_iter().map(|c| c.key.rule).collect()
    }

    fn cond(flow: &str, rule: RuleKind, severity: Severity) -> Condition {
        Condition {
            key: AlertKey::new(flow, rule),
            severity,
            summary: format!("{flow}: {}", rule.title()),
            value: 1.0,
            threshold: 0.0,
        }
    }

    fn kinds(notices: &[Notice]) -> Vec<(NoticeKind, RuleKind)> {
        notices.iter().map(|n| (n.kind, n.alert.key.rule)).collect()
    }

    // --- configuration -------------------------------------------------

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        alerts: AlertRules,
        #[serde(default)]
        flow: AlertOverrides,
    }

    fn parse(text: &str) -> Result<Doc, String> {
        toml::from_str::<Doc>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn an_empty_alerts_table_is_the_defaults() {
        let doc = parse("[alerts]\n[flow]\n").unwrap();
        assert_eq!(doc.alerts, AlertRules::default());
        assert_eq!(doc.alerts.merged(&doc.flow), AlertRules::default());
        assert_eq!(AlertRules::default().error_rate.unwrap().window, mins(5));
        assert_eq!(AlertRules::default().max_silence, None);
    }

    #[test]
    fn a_flow_overrides_the_engine_defaults_field_by_field() {
        let doc = parse(
            r#"
            [alerts]
            error_rate = { above = 0.1, window = "10m" }
            max_silence = "2h"
            repeat_every = "30m"
            drift = false

            [flow]
            error_rate = { above = 0.3 }
            dlq_depth = false
            p95_latency = { above = "2s", baseline_multiple = false }
            quota_at = 1
            "#,
        )
        .unwrap();
        let engine = &doc.alerts;
        assert_eq!(engine.error_rate, Some(ErrorRateRule { above: 0.1, window: mins(10), min_attempts: 20 }));
        assert_eq!(engine.max_silence, Some(mins(120)));
        assert_eq!(engine.repeat_every, mins(30));
        assert!(!engine.drift);

        let flow = engine.merged(&doc.flow);
        assert_eq!(flow.error_rate, Some(ErrorRateRule { above: 0.3, window: mins(10), min_attempts: 20 }));
        assert_eq!(flow.dlq_depth, None);
        assert_eq!(
            flow.p95_latency,
            Some(LatencyRule {
                above: Some(Duration::from_secs(2)),
                baseline_multiple: None,
                ..LatencyRule::default()
            })
        );
        assert_eq!(flow.quota_at, Some(1.0));
        // Inherited from the engine, not the built-in defaults.
        assert_eq!(flow.max_silence, Some(mins(120)));
        assert_eq!(flow.repeat_every, mins(30));
        assert!(!flow.drift);
        assert_eq!(flow.oldest_pending, Some(mins(15)));
    }

    #[test]
    fn a_rule_off_engine_wide_comes_back_with_its_own_defaults() {
        let doc = parse("[alerts]\nrejection_rate = false\n[flow]\nrejection_rate = { min_records = 5 }\n").unwrap();
        assert_eq!(doc.alerts.rejection_rate, None);
        let flow = doc.alerts.merged(&doc.flow);
        assert_eq!(flow.rejection_rate, Some(RateRule { min_records: 5, ..RateRule::default() }));
        let doc = parse("[alerts]\nrejection_rate = false\n[flow]\nrejection_rate = {}\n").unwrap();
        assert_eq!(doc.alerts.merged(&doc.flow).rejection_rate, Some(RateRule::default()));
    }

    #[test]
    fn bad_alert_settings_are_refused_with_a_reason() {
        for (text, wanted) in [
            ("[alerts]\nerror_rat = { above = 0.1 }", "unknown field `error_rat`"),
            ("[alerts]\nerror_rate = { above = 0.1, windw = \"5m\" }", "unknown field `windw`"),
            ("[alerts]\nerror_rate = { above = 1.0 }", "not a fraction"),
            ("[alerts]\nerror_rate = { above = -0.1 }", "not a fraction"),
            ("[alerts]\nquota_at = 0", "not a fraction above 0"),
            ("[alerts]\nmax_silence = \"5 minutes\"", "is not a duration"),
            ("[alerts]\nrepeat_every = \"0s\"", "no time at all"),
            ("[alerts]\ndlq_depth = 0", "at least 1"),
            ("[alerts]\ndlq_depth = true", "write `false` to turn it off"),
            ("[alerts]\np95_latency = { baseline_multiple = 1 }", "not a factor above 1"),
            ("[flow]\noldest_pending = 15", "a string"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(wanted), "{text}: {err}");
        }
    }

    #[test]
    fn windows_name_what_the_engine_must_count() {
        let w = AlertRules::default().windows();
        assert_eq!(
            w,
            Windows {
                error_rate: Some(mins(5)),
                rejection_rate: Some(mins(15)),
                latency: Some(mins(15)),
                latency_baseline: Some(mins(24 * 60)),
            }
        );
        let fixed_only = only(|r| {
            r.p95_latency = Some(LatencyRule {
                above: Some(Duration::from_secs(1)),
                baseline_multiple: None,
                ..LatencyRule::default()
            })
        });
        assert_eq!(fixed_only.windows(), Windows { latency: Some(mins(15)), ..Windows::default() });
        let neither = only(|r| r.p95_latency = Some(LatencyRule { baseline_multiple: None, ..LatencyRule::default() }));
        assert_eq!(neither.windows(), Windows::default());
    }

    // --- evaluation ------------------------------------------------------

    #[test]
    fn a_healthy_flow_raises_nothing_under_the_defaults() {
        let s = FlowSnapshot {
            attempts_in_window: 500,
            failed_in_window: 10,
            received_in_window: 500,
            quarantined_in_window: 2,
            latency_samples: 500,
            p95_latency_ms: Some(300),
            baseline_p95_ms: Some(250),
            oldest_pending_at: Some(T0),
            quota: vec![QuotaReading { connector: "billing".into(), window: Window::Day, used: 0.5 }],
            ..snap("orders")
        };
        assert_eq!(evaluate(&AlertRules::default(), &s), vec![]);
    }

    #[test]
    fn error_rate_fires_strictly_above_its_threshold() {
        let rules = only(|r| r.error_rate = Some(ErrorRateRule::default()));
        let with = |failed| FlowSnapshot { attempts_in_window: 120, failed_in_window: failed, ..snap("orders") };
        assert_eq!(evaluate(&rules, &with(24)), vec![], "24 of 120 is exactly 20%");
        assert_eq!(
            evaluate(&rules, &with(25)),
            vec![Condition {
                key: AlertKey::new("orders", RuleKind::ErrorRate),
                severity: Severity::Critical,
                summary: "orders: 20.8% of 120 attempts failed in the last 5m (threshold 20%)".into(),
                value: 25.0 / 120.0,
                threshold: 0.2,
            }]
        );
        let c = &evaluate(&rules, &with(41))[0];
        assert_eq!(c.summary, "orders: 34.2% of 120 attempts failed in the last 5m (threshold 20%)");
    }

    #[test]
    fn error_rate_needs_min_attempts() {
        let rules = only(|r| r.error_rate = Some(ErrorRateRule::default()));
        let all_failed = |n| FlowSnapshot { attempts_in_window: n, failed_in_window: n, ..snap("orders") };
        assert_eq!(rules_fired(&rules, &all_failed(19)), vec![]);
        assert_eq!(rules_fired(&rules, &all_failed(20)), vec![RuleKind::ErrorRate]);
        let zero = only(|r| r.error_rate = Some(ErrorRateRule { min_attempts: 0, ..ErrorRateRule::default() }));
        assert_eq!(rules_fired(&zero, &all_failed(0)), vec![], "no attempts is no rate");
    }

    #[test]
    fn rejection_rate_fires_strictly_above_and_needs_min_records() {
        let rules = only(|r| r.rejection_rate = Some(RateRule::default()));
        let with = |n, bad| FlowSnapshot { received_in_window: n, quarantined_in_window: bad, ..snap("orders") };
        assert_eq!(rules_fired(&rules, &with(100, 5)), vec![], "exactly 5%");
        let c = evaluate(&rules, &with(100, 6));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].summary, "orders: 6% of 100 records received in the last 15m were rejected (threshold 5%)");
        assert_eq!((c[0].severity, c[0].value, c[0].threshold), (Severity::Warning, 0.06, 0.05));
        assert_eq!(rules_fired(&rules, &with(19, 19)), vec![], "fewer than min_records");
        assert_eq!(rules_fired(&rules, &with(20, 19)), vec![RuleKind::RejectionRate]);
    }

    #[test]
    fn silence_counts_from_the_engine_start_at_the_earliest() {
        let rules = only(|r| r.max_silence = Some(mins(60)));
        // Last record three days ago, engine started 30 minutes ago: not yet.
        let old = Some(Timestamp::from_secs(T0.as_secs() - 3 * 86_400));
        let s = FlowSnapshot { started_at: T0, last_received_at: old, now: at(30 * 60), ..snap("orders") };
        assert_eq!(evaluate(&rules, &s), vec![]);
        let s = FlowSnapshot { now: at(60 * 60), ..s };
        assert_eq!(evaluate(&rules, &s), vec![], "exactly max_silence is not longer");
        let s = FlowSnapshot { now: at(60 * 60 + 1), ..s };
        let c = evaluate(&rules, &s);
        assert_eq!(c[0].summary, "orders: nothing received since the engine started 1h1s ago (max_silence 1h)");
        assert_eq!((c[0].value, c[0].threshold), (3601.0, 3600.0));
        // Never received anything: the same.
        let never = FlowSnapshot { last_received_at: None, ..s.clone() };
        assert_eq!(rules_fired(&rules, &never), vec![RuleKind::MaxSilence]);
    }

    #[test]
    fn silence_counts_from_the_last_record_since_the_start() {
        let rules = only(|r| r.max_silence = Some(mins(60)));
        let s = FlowSnapshot { last_received_at: Some(T0), now: at(3600), ..snap("orders") };
        assert_eq!(evaluate(&rules, &s), vec![]);
        let s = FlowSnapshot { now: T0.plus(Duration::from_millis(3_600_001)), ..s };
        let c = evaluate(&rules, &s);
        assert_eq!(c[0].summary, "orders: nothing received for 1h1s (max_silence 1h)");
        assert_eq!(c[0].severity, Severity::Warning);
    }

    #[test]
    fn latency_fires_strictly_above_a_multiple_of_its_baseline() {
        let rules = only(|r| r.p95_latency = Some(LatencyRule::default()));
        let with = |p95, base| FlowSnapshot {
            latency_samples: 50,
            p95_latency_ms: Some(p95),
            baseline_p95_ms: base,
            ..snap("orders")
        };
        assert_eq!(evaluate(&rules, &with(2000, Some(400))), vec![], "exactly 5 times");
        let c = evaluate(&rules, &with(2400, Some(400)));
        assert_eq!(
            c[0].summary,
            "orders: p95 latency 2.4s over the last 15m is 6 times its baseline of 400ms (threshold 5 times)"
        );
        assert_eq!((c[0].value, c[0].threshold, c[0].severity), (2400.0, 2000.0, Severity::Warning));
        assert_eq!(rules_fired(&rules, &with(2001, Some(400))), vec![RuleKind::P95Latency]);
        assert_eq!(rules_fired(&rules, &with(60_000, None)), vec![], "no baseline, no fixed threshold");
        assert_eq!(rules_fired(&rules, &with(60_000, Some(0))), vec![], "a zero baseline says nothing");
    }

    #[test]
    fn latency_fires_strictly_above_a_fixed_threshold_and_needs_samples() {
        let rule = LatencyRule { above: Some(Duration::from_secs(2)), ..LatencyRule::default() };
        let rules = only(|r| r.p95_latency = Some(rule));
        let with = |n, p95| FlowSnapshot {
            latency_samples: n,
            p95_latency_ms: Some(p95),
            baseline_p95_ms: Some(1900),
            ..snap("orders")
        };
        assert_eq!(evaluate(&rules, &with(20, 2000)), vec![]);
        let c = evaluate(&rules, &with(20, 2040));
        assert_eq!(c[0].summary, "orders: p95 latency 2.04s over the last 15m (threshold 2s)");
        assert_eq!(c[0].threshold, 2000.0);
        assert_eq!(evaluate(&rules, &with(19, 60_000)), vec![], "fewer than min_samples");
    }

    #[test]
    fn dlq_depth_fires_at_its_threshold() {
        let rules = only(|r| r.dlq_depth = AlertRules::default().dlq_depth);
        let with = |n| FlowSnapshot { dlq_depth: n, ..snap("orders") };
        assert_eq!(evaluate(&rules, &with(0)), vec![]);
        let c = evaluate(&rules, &with(1));
        assert_eq!(c[0].summary, "orders: 1 record in the dead-letter queue (alert at 1)");
        assert_eq!(c[0].severity, Severity::Warning);
        let ten = only(|r| r.dlq_depth = Some(10));
        assert_eq!(rules_fired(&ten, &with(9)), vec![]);
        assert_eq!(evaluate(&ten, &with(10))[0].summary, "orders: 10 records in the dead-letter queue (alert at 10)");
    }

    #[test]
    fn oldest_pending_fires_strictly_after_its_age() {
        let rules = only(|r| r.oldest_pending = Some(mins(15)));
        let with = |now| FlowSnapshot { oldest_pending_at: Some(T0), now, ..snap("orders") };
        assert_eq!(evaluate(&rules, &with(at(15 * 60))), vec![]);
        let c = evaluate(&rules, &with(T0.plus(Duration::from_millis(15 * 60_000 + 1))));
        assert_eq!(c[0].summary, "orders: the oldest waiting record arrived 15m1s ago (alert after 15m)");
        assert_eq!((c[0].severity, c[0].threshold), (Severity::Critical, 900.0));
        assert_eq!(evaluate(&rules, &FlowSnapshot { now: at(86_400), ..snap("orders") }), vec![], "nothing waits");
    }

    #[test]
    fn auth_failure_fires_on_the_first_evaluation() {
        let rules = only(|r| r.auth_failure = true);
        // The engine has just started and the flow was already paused.
        let s = FlowSnapshot {
            started_at: T0,
            paused_for_auth: Some("401 from billing: invalid token".into()),
            ..snap("orders")
        };
        let c = evaluate(&rules, &s);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].summary, "orders: paused after an auth failure: 401 from billing: invalid token");
        assert_eq!(c[0].severity, Severity::Critical);
        let mut book = AlertBook::new();
        assert_eq!(kinds(&book.observe(T0, "orders", c, mins(60))), [(NoticeKind::Fired, RuleKind::AuthFailure)]);
        assert_eq!(evaluate(&only(|_| ()), &s), vec![], "turned off");
    }

    #[test]
    fn a_long_auth_reason_is_cut() {
        let rules = only(|r| r.auth_failure = true);
        let s = FlowSnapshot { paused_for_auth: Some("é".repeat(1000)), ..snap("orders") };
        let c = evaluate(&rules, &s);
        assert_eq!(c[0].summary.chars().count(), "orders: paused after an auth failure: ".len() + MAX_REASON_CHARS + 1);
    }

    #[test]
    fn quota_fires_at_its_share_per_connector_with_the_fullest_window() {
        let rules = only(|r| r.quota_at = Some(0.9));
        let reading = |c: &str, window, used| QuotaReading { connector: c.into(), window, used };
        let s = FlowSnapshot {
            quota: vec![
                reading("billing", Window::Hour, 0.95),
                reading("billing", Window::Day, 0.92),
                reading("crm", Window::Day, 0.89),
                reading("erp", Window::Hour, 1.0),
            ],
            ..snap("orders")
        };
        let c = evaluate(&rules, &s);
        let got: Vec<_> = c.iter().map(|c| (c.key.connector.as_deref(), c.severity, c.summary.as_str())).collect();
        assert_eq!(
            got,
            [
                (
                    Some("billing"),
                    Severity::Warning,
                    "orders: connector billing has used 95% of its hourly quota (alert at 90%)"
                ),
                (
                    Some("erp"),
                    Severity::Critical,
                    "orders: connector erp has used 100% of its hourly quota (alert at 90%)"
                ),
            ]
        );
        let exactly = FlowSnapshot { quota: vec![reading("crm", Window::Day, 0.9)], ..snap("orders") };
        assert_eq!(
            evaluate(&rules, &exactly)[0].summary,
            "orders: connector crm has used 90% of its daily quota (alert at 90%)"
        );
    }

    #[test]
    fn drift_names_a_few_events_and_counts_the_rest() {
        let rules = only(|r| r.drift = true);
        let events: Vec<String> = (1..=5).map(|i| format!("added field{i} (string)")).collect();
        let s = FlowSnapshot { drift_events: events, ..snap("orders") };
        let c = evaluate(&rules, &s);
        assert_eq!(
            c[0].summary,
            "orders: schema drift: 5 changes: added field1 (string); added field2 (string); added field3 (string) and 2 more"
        );
        assert_eq!(rules_fired(&rules, &snap("orders")), vec![], "no new events");
    }

    #[test]
    fn with_every_rule_off_nothing_fires() {
        let s = FlowSnapshot {
            attempts_in_window: 100,
            failed_in_window: 100,
            received_in_window: 100,
            quarantined_in_window: 100,
            last_received_at: None,
            now: at(86_400 * 30),
            latency_samples: 100,
            p95_latency_ms: Some(100_000),
            baseline_p95_ms: Some(1),
            dlq_depth: 1000,
            oldest_pending_at: Some(START),
            paused_for_auth: Some("401".into()),
            quota: vec![QuotaReading { connector: "billing".into(), window: Window::Day, used: 1.0 }],
            drift_events: vec!["removed id".into()],
            ..snap("orders")
        };
        assert_eq!(evaluate(&only(|_| ()), &s), vec![]);
        let all = only(|r| {
            *r = AlertRules { max_silence: Some(mins(60)), ..AlertRules::default() };
        });
        assert_eq!(
            rules_fired(&all, &s),
            [
                RuleKind::AuthFailure,
                RuleKind::ErrorRate,
                RuleKind::OldestPending,
                RuleKind::DlqDepth,
                RuleKind::MaxSilence,
                RuleKind::P95Latency,
                RuleKind::RejectionRate,
                RuleKind::Quota,
                RuleKind::Drift,
            ]
        );
    }

    // --- the book ----------------------------------------------------------

    #[test]
    fn fires_once_repeats_after_the_interval_and_resolves_once() {
        let mut book = AlertBook::new();
        let hour = mins(60);
        let c = || vec![cond("orders", RuleKind::ErrorRate, Severity::Critical)];
        assert_eq!(kinds(&book.observe(T0, "orders", c(), hour)), [(NoticeKind::Fired, RuleKind::ErrorRate)]);
        assert_eq!(book.observe(at(60), "orders", c(), hour), vec![], "still active: no new notice");
        assert_eq!(book.observe(T0.plus(Duration::from_millis(3_599_999)), "orders", c(), hour), vec![]);
        let n = book.observe(at(3600), "orders", c(), hour);
        assert_eq!(kinds(&n), [(NoticeKind::Repeated, RuleKind::ErrorRate)]);
        assert_eq!((n[0].alert.started_at, n[0].alert.last_notified_at, n[0].at), (T0, at(3600), at(3600)));
        assert_eq!(book.observe(at(3600 + 1800), "orders", c(), hour), vec![], "counted from the last notice");
        assert_eq!(kinds(&book.observe(at(7200), "orders", c(), hour)), [(NoticeKind::Repeated, RuleKind::ErrorRate)]);

        let n = book.observe(at(7300), "orders", vec![], hour);
        assert_eq!(kinds(&n), [(NoticeKind::Resolved, RuleKind::ErrorRate)]);
        assert_eq!(n[0].at, at(7300));
        assert_eq!(book.observe(at(7400), "orders", vec![], hour), vec![], "resolves once");
        assert_eq!(book.active().count(), 0);
        let recent: Vec<_> = book.recent().collect();
        assert_eq!(recent.len(), 1);
        assert_eq!((recent[0].alert.started_at, recent[0].resolved_at), (T0, at(7300)));
    }

    #[test]
    fn an_active_alert_takes_the_latest_numbers() {
        let mut book = AlertBook::new();
        let c = |v: f64| Condition {
            value: v,
            summary: format!("orders: {v}"),
            ..cond("orders", RuleKind::DlqDepth, Severity::Warning)
        };
        book.observe(T0, "orders", vec![c(1.0)], mins(60));
        book.observe(at(60), "orders", vec![c(7.0)], mins(60));
        let a = book.active().next().unwrap();
        assert_eq!((a.value, a.summary.as_str(), a.started_at, a.last_notified_at), (7.0, "orders: 7", T0, T0));
    }

    #[test]
    fn a_higher_severity_is_notified_at_once() {
        let mut book = AlertBook::new();
        let quota = |sev| Condition {
            key: AlertKey { connector: Some("billing".into()), ..AlertKey::new("orders", RuleKind::Quota) },
            ..cond("orders", RuleKind::Quota, sev)
        };
        book.observe(T0, "orders", vec![quota(Severity::Warning)], mins(60));
        let n = book.observe(at(60), "orders", vec![quota(Severity::Critical)], mins(60));
        assert_eq!(kinds(&n), [(NoticeKind::Repeated, RuleKind::Quota)]);
        assert_eq!(n[0].alert.severity, Severity::Critical);
        assert_eq!(
            book.observe(at(120), "orders", vec![quota(Severity::Warning)], mins(60)),
            vec![],
            "going down is quiet"
        );
        assert_eq!(book.active().next().unwrap().severity, Severity::Warning);
    }

    #[test]
    fn a_condition_back_after_resolving_fires_again() {
        let mut book = AlertBook::new();
        let c = || vec![cond("orders", RuleKind::OldestPending, Severity::Critical)];
        book.observe(T0, "orders", c(), mins(60));
        book.observe(at(60), "orders", vec![], mins(60));
        let n = book.observe(at(120), "orders", c(), mins(60));
        assert_eq!(kinds(&n), [(NoticeKind::Fired, RuleKind::OldestPending)]);
        assert_eq!(n[0].alert.started_at, at(120));
    }

    #[test]
    fn flows_do_not_resolve_each_others_alerts() {
        let mut book = AlertBook::new();
        book.observe(T0, "orders", vec![cond("orders", RuleKind::ErrorRate, Severity::Critical)], mins(60));
        book.observe(T0, "refunds", vec![cond("refunds", RuleKind::ErrorRate, Severity::Critical)], mins(60));
        assert_eq!(book.observe(at(10), "refunds", vec![], mins(60)).len(), 1, "refunds resolves");
        let active: Vec<_> = book.active().map(|a| a.key.flow.as_str()).collect();
        assert_eq!(active, ["orders"]);
        // A condition about another flow is not this observation's business.
        let n = book.observe(at(20), "refunds", vec![cond("orders", RuleKind::DlqDepth, Severity::Warning)], mins(60));
        assert_eq!(n, vec![]);
        assert_eq!(book.active().count(), 1);
    }

    #[test]
    fn one_flow_has_one_alert_per_quota_connector() {
        let mut book = AlertBook::new();
        let quota = |c: &str| Condition {
            key: AlertKey { connector: Some(c.into()), ..AlertKey::new("orders", RuleKind::Quota) },
            ..cond("orders", RuleKind::Quota, Severity::Warning)
        };
        assert_eq!(book.observe(T0, "orders", vec![quota("billing"), quota("crm")], mins(60)).len(), 2);
        let n = book.observe(at(60), "orders", vec![quota("crm")], mins(60));
        assert_eq!(n.len(), 1);
        assert_eq!((n[0].kind, n[0].alert.key.connector.as_deref()), (NoticeKind::Resolved, Some("billing")));
    }

    #[test]
    fn drift_fires_per_batch_never_repeats_and_resolves_without_new_events() {
        let rules = only(|r| r.drift = true);
        let mut book = AlertBook::new();
        let mut step = |now, events: &[&str]| {
            let s =
                FlowSnapshot { now, drift_events: events.iter().map(|e| e.to_string()).collect(), ..snap("orders") };
            book.observe(now, "orders", evaluate(&rules, &s), Duration::from_secs(1))
        };
        let n = step(T0, &["added vip (boolean)"]);
        assert_eq!(kinds(&n), [(NoticeKind::Fired, RuleKind::Drift)]);
        // A new batch at the next evaluation: news again, even though active.
        let n = step(at(60), &["retyped total (string, was number)"]);
        assert_eq!(kinds(&n), [(NoticeKind::Fired, RuleKind::Drift)]);
        assert_eq!(n[0].alert.started_at, at(60));
        assert_eq!(n[0].alert.summary, "orders: schema drift: 1 change: retyped total (string, was number)");
        let n = step(at(120), &[]);
        assert_eq!(kinds(&n), [(NoticeKind::Resolved, RuleKind::Drift)]);
        assert_eq!(step(at(180), &[]), vec![]);
    }

    #[test]
    fn recent_keeps_the_last_hundred() {
        let mut book = AlertBook::new();
        for i in 0..(RECENT_LIMIT as u64 + 5) {
            book.observe(at(2 * i), "orders", vec![cond("orders", RuleKind::DlqDepth, Severity::Warning)], mins(60));
            book.observe(at(2 * i + 1), "orders", vec![], mins(60));
        }
        let recent: Vec<_> = book.recent().collect();
        assert_eq!(recent.len(), RECENT_LIMIT);
        assert_eq!(recent[0].alert.started_at, at(10), "the five oldest are gone");
        assert_eq!(recent[RECENT_LIMIT - 1].resolved_at, at(2 * (RECENT_LIMIT as u64 + 4) + 1));
    }

    #[test]
    fn a_saved_book_carries_alerts_across_a_restart_without_firing_again() {
        let mut book = AlertBook::new();
        let c = || vec![cond("orders", RuleKind::ErrorRate, Severity::Critical)];
        book.observe(T0, "orders", c(), mins(60));
        let both = vec![
            cond("orders", RuleKind::ErrorRate, Severity::Critical),
            cond("orders", RuleKind::DlqDepth, Severity::Warning),
        ];
        book.observe(T0.plus(Duration::from_millis(1500)), "orders", both, mins(60));
        book.observe(at(10), "orders", c(), mins(60));
        let saved = serde_json::to_value(&book).unwrap();
        assert_eq!(
            saved["active"],
            json!([{
                "key": {"flow": "orders", "rule": "error_rate"},
                "severity": "critical",
                "peak": "critical",
                "summary": "orders: error rate",
                "value": 1.0,
                "threshold": 0.0,
                "started_at": "2021-02-25T15:00:00.000Z",
                "last_notified_at": "2021-02-25T15:00:00.000Z",
            }])
        );
        assert_eq!(saved["recent"][0]["alert"]["started_at"], json!("2021-02-25T15:00:01.500Z"));
        assert_eq!(saved["recent"][0]["resolved_at"], json!("2021-02-25T15:00:10.000Z"));

        let mut restored: AlertBook = serde_json::from_value(saved).unwrap();
        assert_eq!(restored, book);
        assert_eq!(restored.observe(at(600), "orders", c(), mins(60)), vec![], "no second Fired");
        assert_eq!(
            kinds(&restored.observe(at(3600), "orders", c(), mins(60))),
            [(NoticeKind::Repeated, RuleKind::ErrorRate)]
        );
    }

    #[test]
    fn timestamps_out_of_rfc3339_range_round_trip() {
        let t = Timestamp::from_millis(i64::MAX);
        let text = serde_json::to_string(&t).unwrap();
        let back = de_timestamp(&mut serde_json::Deserializer::from_str(&text)).unwrap();
        assert_eq!(back, t);
        assert!(de_timestamp(&mut serde_json::Deserializer::from_str("\"yesterday\"")).is_err());
    }

    // --- bodies --------------------------------------------------------------

    fn error_rate_notice(kind: NoticeKind, now: Timestamp) -> Notice {
        Notice {
            kind,
            alert: Alert {
                key: AlertKey::new("orders", RuleKind::ErrorRate),
                severity: Severity::Critical,
                summary: "orders: 25% of 120 attempts failed in the last 5m (threshold 20%)".into(),
                value: 0.25,
                threshold: 0.2,
                started_at: T0,
                peak: Some(Severity::Critical),
                last_notified_at: if kind == NoticeKind::Resolved { T0 } else { now },
            },
            at: now,
        }
    }

    #[test]
    fn the_peak_severity_is_kept_when_severity_falls() {
        let mut book = AlertBook::new();
        let cond = |severity| Condition {
            key: AlertKey::new("orders", RuleKind::ErrorRate),
            severity,
            summary: "s".into(),
            value: 1.0,
            threshold: 0.5,
        };
        book.observe(T0, "orders", vec![cond(Severity::Critical)], Duration::from_secs(3600));
        book.observe(T0, "orders", vec![cond(Severity::Warning)], Duration::from_secs(3600));
        let resolved = book.observe(T0, "orders", vec![], Duration::from_secs(3600));
        assert_eq!(resolved[0].alert.severity, Severity::Warning);
        assert_eq!(resolved[0].alert.peak, Some(Severity::Critical), "a critical-only notifier hears the resolution");
        assert_eq!(ms(crate::rollup::OVERFLOW_MS), "over 60s");
    }

    #[test]
    fn generic_json_has_a_stable_shape() {
        let fired = generic_json(&error_rate_notice(NoticeKind::Fired, T0));
        assert_eq!(
            fired,
            json!({
                "status": "firing",
                "repeat": false,
                "flow": "orders",
                "rule": "error_rate",
                "connector": null,
                "severity": "critical",
                "summary": "orders: 25% of 120 attempts failed in the last 5m (threshold 20%)",
                "value": 0.25,
                "threshold": 0.2,
                "unit": "ratio",
                "started_at": "2021-02-25T15:00:00.000Z",
                "at": "2021-02-25T15:00:00.000Z",
            })
        );
        let repeated = generic_json(&error_rate_notice(NoticeKind::Repeated, at(3600)));
        assert_eq!((&repeated["status"], &repeated["repeat"]), (&json!("firing"), &json!(true)));
        assert_eq!(repeated["at"], json!("2021-02-25T16:00:00.000Z"));
        let resolved = generic_json(&error_rate_notice(NoticeKind::Resolved, at(90)));
        assert_eq!((&resolved["status"], &resolved["repeat"]), (&json!("resolved"), &json!(false)));
        assert_eq!(
            (&resolved["started_at"], &resolved["at"]),
            (&json!("2021-02-25T15:00:00.000Z"), &json!("2021-02-25T15:01:30.000Z"))
        );

        let mut quota = error_rate_notice(NoticeKind::Fired, T0);
        quota.alert.key = AlertKey { connector: Some("billing".into()), ..AlertKey::new("orders", RuleKind::Quota) };
        let body = generic_json(&quota);
        assert_eq!(
            (&body["rule"], &body["connector"], &body["unit"]),
            (&json!("quota"), &json!("billing"), &json!("ratio"))
        );
    }

    #[test]
    fn slack_json_reads_as_a_message() {
        assert_eq!(
            slack_json(&error_rate_notice(NoticeKind::Fired, T0)),
            json!({
                "text": "[FIRING] orders: 25% of 120 attempts failed in the last 5m (threshold 20%)",
                "blocks": [
                    {
                        "type": "section",
                        "text": {
                            "type": "mrkdwn",
                            "text": "*[FIRING] orders: error rate* (critical)\n25% of 120 attempts failed in the last 5m (threshold 20%)",
                        },
                    },
                    {
                        "type": "context",
                        "elements": [{
                            "type": "mrkdwn",
                            "text": "flow orders | rule error_rate | since 2021-02-25T15:00:00.000Z",
                        }],
                    },
                ],
            })
        );
        let repeated = slack_json(&error_rate_notice(NoticeKind::Repeated, at(3600)));
        assert_eq!(
            repeated["text"],
            json!("[STILL FIRING] orders: 25% of 120 attempts failed in the last 5m (threshold 20%)")
        );
        assert_eq!(
            slack_json(&error_rate_notice(NoticeKind::Resolved, at(3900))),
            json!({
                "text": "[RESOLVED] orders: error rate cleared after 1h5m. Last: 25% of 120 attempts failed in the last 5m (threshold 20%)",
                "blocks": [
                    {
                        "type": "section",
                        "text": {
                            "type": "mrkdwn",
                            "text": "*[RESOLVED] orders: error rate* (critical)\nCleared after 1h5m. Last: 25% of 120 attempts failed in the last 5m (threshold 20%)",
                        },
                    },
                    {
                        "type": "context",
                        "elements": [{
                            "type": "mrkdwn",
                            "text": "flow orders | rule error_rate | since 2021-02-25T15:00:00.000Z | resolved 2021-02-25T16:05:00.000Z",
                        }],
                    },
                ],
            })
        );
    }

    #[test]
    fn slack_json_escapes_text_from_partners_and_names_the_connector() {
        let rules = only(|r| r.auth_failure = true);
        let s = FlowSnapshot { paused_for_auth: Some("401 <html>Tom & Jerry</html>".into()), ..snap("orders") };
        let mut book = AlertBook::new();
        let n = book.observe(T0, "orders", evaluate(&rules, &s), mins(60));
        let body = slack_json(&n[0]);
        assert_eq!(
            body["text"],
            json!("[FIRING] orders: paused after an auth failure: 401 &lt;html&gt;Tom &amp; Jerry&lt;/html&gt;")
        );

        let mut quota = error_rate_notice(NoticeKind::Fired, T0);
        quota.alert.key = AlertKey { connector: Some("billing".into()), ..AlertKey::new("orders", RuleKind::Quota) };
        let body = slack_json(&quota);
        let section = body["blocks"][0]["text"]["text"].as_str().unwrap();
        assert!(section.starts_with("*[FIRING] orders: quota of billing* (critical)\n"), "{section}");
        assert_eq!(
            body["blocks"][1]["elements"][0]["text"],
            json!("flow orders | rule quota | connector billing | since 2021-02-25T15:00:00.000Z")
        );
    }

    #[test]
    fn rule_names_are_their_config_keys() {
        for rule in [
            RuleKind::AuthFailure,
            RuleKind::ErrorRate,
            RuleKind::OldestPending,
            RuleKind::DlqDepth,
            RuleKind::MaxSilence,
            RuleKind::P95Latency,
            RuleKind::RejectionRate,
            RuleKind::Quota,
            RuleKind::Drift,
        ] {
            assert_eq!(serde_json::to_value(rule).unwrap(), json!(rule.as_str()));
        }
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!([pct(0.2), pct(0.29), pct(25.0 / 120.0), pct(1.0)], ["20%", "29%", "20.8%", "100%"]);
        assert_eq!([factor(6.0), factor(5.0125), factor(2.5)], ["6", "5.01", "2.5"]);
        assert_eq!([ms(850), ms(2000), ms(2040), ms(12_345)], ["850ms", "2s", "2.04s", "12.345s"]);
        assert_eq!(whole_secs(Duration::from_millis(3_600_001)), "1h1s");
    }
}
