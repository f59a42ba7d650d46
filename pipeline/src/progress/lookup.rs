//! The cheap per-page questions stages ask the events stream.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_nats::jetstream::{self, stream::Stream};
use pagestream_schemas::{decode, Event, EventState};

use crate::nats::Names;
use crate::progress::ProgressError;

/// The per-page questions stages ask the events stream, each one direct get
/// of one event subject: "was this document cancelled?" (before every page;
/// a positive answer is remembered, a cancellation is final) and "did this
/// page already reach a state?" (for a redelivery whose work was done).
#[derive(Debug)]
pub struct EventLookup {
    js: jetstream::Context,
    names: Names,
    stream: tokio::sync::OnceCell<Stream>,
    /// Documents known to be cancelled.
    known: Mutex<HashSet<String>>,
    /// Page counts of split documents (a document's count never changes).
    page_counts: Mutex<HashMap<String, u32>>,
}

impl EventLookup {
    pub fn new(js: jetstream::Context, names: Names) -> Self {
        EventLookup {
            js,
            names,
            stream: Default::default(),
            known: Default::default(),
            page_counts: Default::default(),
        }
    }

    pub async fn is_cancelled(&self, doc_id: &str) -> Result<bool, ProgressError> {
        if self.known.lock().expect("event lookup lock").contains(doc_id) {
            return Ok(true);
        }
        let subject = self.names.doc_event(doc_id, EventState::Cancelled);
        let cancelled = self.event_exists(&subject).await?;
        if cancelled {
            self.known.lock().expect("event lookup lock").insert(doc_id.to_string());
        }
        Ok(cancelled)
    }

    /// The document's page count as its splitter recorded it (`None`:
    /// not split yet, or split before the count was recorded). One direct
    /// get per document and process; messages may not claim another count.
    pub async fn page_count(&self, doc_id: &str) -> Result<Option<u32>, ProgressError> {
        if let Some(n) = self.page_counts.lock().expect("event lookup lock").get(doc_id) {
            return Ok(Some(*n));
        }
        let stream = self.stream().await?;
        let subject = self.names.doc_event(doc_id, EventState::Split);
        let count = match stream.direct_get_last_for_subject(&subject).await {
            Ok(raw) => decode::<Event>(&raw.payload).ok().and_then(|e| e.info).and_then(|i| i.page_count),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => None,
            Err(e) => return Err(ProgressError::new(format!("reading {subject}"), e)),
        };
        if let Some(n) = count {
            let mut counts = self.page_counts.lock().expect("event lookup lock");
            if counts.len() >= 10_000 {
                counts.clear();
            }
            counts.insert(doc_id.to_string(), n);
        }
        Ok(count)
    }

    /// Whether page `page` of `doc_id` already reached `state` (a redelivered
    /// message whose work was done, only its ack was lost).
    pub async fn page_reached(&self, doc_id: &str, page: u32, state: EventState) -> Result<bool, ProgressError> {
        self.event_exists(&self.names.page_event(doc_id, state, page)).await
    }

    async fn stream(&self) -> Result<&Stream, ProgressError> {
        self.stream
            .get_or_try_init(|| async {
                self.js.get_stream(self.names.events_stream()).await.map_err(ProgressError::at("events stream"))
            })
            .await
    }

    async fn event_exists(&self, subject: &str) -> Result<bool, ProgressError> {
        let stream = self.stream().await?;
        match stream.direct_get_last_for_subject(subject).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(false),
            Err(e) => Err(ProgressError::new(format!("reading {subject}"), e)),
        }
    }
}
