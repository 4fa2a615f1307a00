//! Adapters to external systems.
//!
//! Each connector kind lives in its own module with the same shape: built
//! from its config, it performs one attempt and reports what happened as a
//! [`dovetail_core::policy::Answer`] for the core's classifier. Connectors
//! never decide whether to retry; the engine asks the core's policies.
//!
//! Depends on `dovetail-core` only; knows nothing of the journal or engine.

pub mod amqp;
pub mod http;
pub mod nats;
pub mod oauth;
pub mod postgres;
pub mod preview;
pub mod sink;
