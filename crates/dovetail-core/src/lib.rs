//! Dovetail's pure core.
//!
//! Types and policies that every other crate builds on, with no I/O: the
//! configuration model and its checker, record states, the classification
//! of delivery results, backoff schedules, `Retry-After` parsing, webhook
//! signature schemes and record identifiers. Time, randomness and the
//! environment come in through parameters ([`clock::Clock`],
//! [`policy::Jitter`], [`config::SecretSource`]), so all of it is unit-tested
//! without sleeping or touching the machine.
//!
//! This crate must not depend on any other Dovetail crate, on an async
//! runtime, or on a network or database library.

pub mod alert;
pub mod clock;
pub mod config;
pub mod duration;
pub mod ids;
pub mod keypath;
pub mod mapping;
pub mod pipeline;
pub mod policy;
pub mod record;
pub mod rollup;
pub mod schedule;
pub mod schema;
pub mod shape;
pub mod signature;
