//! Shared runtime of the pagestream stages.
//!
//! Owns: layered configuration ([`config`]), NATS names and provisioning from
//! the `nats/` data files ([`nats`]), the one consumer loop with its ack / nak
//! / dead-letter rules ([`consumer`]), the blob store ([`blob`]), progress
//! events and document status ([`progress`]), metrics and admin endpoints
//! ([`metrics`], [`admin`], [`health`]), shutdown ([`shutdown`]) and the
//! common `main` of stage binaries ([`bin`]).
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
pub mod embedded;
pub mod health;
pub mod metrics;
pub mod nats;
pub mod outbound;
pub mod progress;
pub mod records;
pub mod registry;
pub mod shutdown;
pub mod stage;
pub mod telemetry;
pub mod tenants;
pub mod util;

pub use config::Config;
pub use consumer::{ConsumerSpec, Delivery, ErrorKind, Handler, StageError};
pub use stage::StageContext;
