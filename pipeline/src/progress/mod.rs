//! Per-document progress: events plus counters.
//!
//! Each stage publishes one event per page and state on
//! `<p>.events.<doc>.page.<state>.<page>` and document-level events on
//! `<p>.events.<doc>.doc.<state>`. The stream keeps one message per subject
//! and every publish carries `Nats-Msg-Id` = subject (the history, for SSE
//! and failure reasons). After the event is durable the page is marked in
//! the document's [`Counters`](crate::counters::Counters) (an idempotent
//! bitmap per state), which is what status reads and completion checks use:
//! their cost does not grow with the page count, and a redelivered page
//! never counts twice.
//!
//! By concern: [`publish`] (durable publishing, the [`Progress`] events a
//! stage emits), [`subject`] (event subjects parsed back), [`status`]
//! (status, listing and timings read from the events stream) and
//! [`lookup`] (the per-page questions stages ask). The document state
//! machine they fold events with is [`crate::doc_state`] (one layer down:
//! the document records keep the state too).

pub mod lookup;
pub mod publish;
pub mod status;
pub mod subject;

pub use crate::doc_state::{DocState, ALL_STATES};
pub use lookup::EventLookup;
pub use publish::{publish_durable, publish_message, Progress, OUTAGE_RIDE};
pub use status::{
    count_events_since, list_documents, read_events, read_status, read_status_with_record, subject_counts, DocStatus,
    DocTimings, FailedPage, PageCounts, StageTiming,
};
pub use subject::EventSubject;

/// Reading progress from JetStream failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ProgressError {
    /// What was being read (a subject, "events stream", …).
    pub what: String,
    #[source]
    pub source: async_nats::Error,
}

impl ProgressError {
    pub(crate) fn new(what: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        ProgressError { what: what.into(), source: source.into() }
    }

    /// A closure for `map_err`.
    pub(crate) fn at<E: Into<async_nats::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> ProgressError {
        let what = what.into();
        move |e| ProgressError::new(what, e)
    }
}
