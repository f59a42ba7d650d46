//! Shared runtime of the pagestream stages.
//!
//! Owns: layered configuration ([`config`]), NATS names, connection and
//! provisioning tools ([`nats`]) and what a pipeline provisions at start-up
//! ([`provision`]), the one consumer loop with its ack / nak / dead-letter
//! rules ([`consumer`]) and the errors handlers return ([`error`]), the blob
//! store ([`blob`]), progress events and document status ([`progress`];
//! the document state machine: [`doc_state`]), metrics and admin endpoints
//! ([`metrics`], [`admin`], [`health`]), shutdown ([`shutdown`]) and the
//! common `main` of stage binaries ([`bin`]).
//!
//! Layered, without file cycles (no module uses, directly or through
//! others, a module that uses it; `tests/tests/layering.rs` checks it).
//! From the bottom: errors, the document state machine, metrics and
//! telemetry; helpers, tenants and config; NATS names and tools; the stores
//! built on them (blob, counters, registry, then records and callbacks);
//! start-up provisioning and progress; the stage context; the consumer loop
//! and the binaries' `main`.
//!
//! Must not know: PDFs, models, result layouts or HTTP routes of the API —
//! those belong to the stages.

pub mod admin;
pub mod bin;
pub mod blob;
pub mod callbacks;
pub mod config;
pub mod consumer;
pub mod counters;
pub mod doc_state;
pub mod embedded;
pub mod error;
pub mod health;
pub mod metrics;
pub mod nats;
pub mod outbound;
pub mod progress;
pub mod provision;
pub mod records;
pub mod registry;
pub mod shutdown;
pub mod stage;
pub mod telemetry;
pub mod tenants;
pub mod util;

pub use config::Config;
pub use consumer::{ConsumerSpec, Delivery, Handler};
pub use error::{ErrorKind, StageError};
pub use stage::StageContext;
