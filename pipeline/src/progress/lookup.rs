//! The cheap per-page questions stages ask the events stream.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use async_nats::jetstream::{self, stream::Stream};
use pagestream_schemas::{decode, Event, EventState};

use crate::nats::Names;
use crate::progress::ProgressError;
use crate::records::DocRecords;

/// Cancelled documents a process remembers: a page of one of them is
/// acked without a NATS request. Forgetting one is harmless (the next
/// question asks the events stream again), so the set is bounded.
pub const CANCELLED_CACHE: usize = 4096;

/// A set of the `max` most recently added strings (the oldest is dropped
/// when a new one does not fit).
#[derive(Debug)]
struct RecentSet {
    max: usize,
    members: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentSet {
    fn new(max: usize) -> Self {
        RecentSet { max: max.max(1), members: HashSet::new(), order: VecDeque::new() }
    }

    fn contains(&self, item: &str) -> bool {
        self.members.contains(item)
    }

    fn insert(&mut self, item: &str) {
        if self.members.contains(item) {
            return;
        }
        if self.order.len() >= self.max {
            if let Some(oldest) = self.order.pop_front() {
                self.members.remove(&oldest);
            }
        }
        self.members.insert(item.to_string());
        self.order.push_back(item.to_string());
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.members.len()
    }
}

/// The per-page questions stages ask the events stream, each one direct get
/// of one event subject: "was this document cancelled?" (before every page;
/// a positive answer is remembered, a cancellation is final) and "did this
/// page already reach a state?" (for a redelivery whose work was done).
#[derive(Debug)]
pub struct EventLookup {
    js: jetstream::Context,
    names: Names,
    stream: tokio::sync::OnceCell<Stream>,
    /// Durable records (page counts whose `split` event is gone).
    records: tokio::sync::OnceCell<DocRecords>,
    /// Documents known to be cancelled (the most recent
    /// [`CANCELLED_CACHE`]; an older one costs one direct get again).
    known: Mutex<RecentSet>,
    /// Page counts of split documents (a document's count never changes).
    page_counts: Mutex<HashMap<String, u32>>,
}

impl EventLookup {
    pub fn new(js: jetstream::Context, names: Names) -> Self {
        EventLookup {
            js,
            names,
            stream: Default::default(),
            records: Default::default(),
            known: Mutex::new(RecentSet::new(CANCELLED_CACHE)),
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
            self.known.lock().expect("event lookup lock").insert(doc_id);
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
        let mut count = match stream.direct_get_last_for_subject(&subject).await {
            Ok(raw) => decode::<Event>(&raw.payload).ok().and_then(|e| e.info).and_then(|i| i.page_count),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => None,
            Err(e) => return Err(ProgressError::new(format!("reading {subject}"), e)),
        };
        if count.is_none() {
            // The `split` event may have been discarded (the events stream
            // keeps its newest bytes): the durable record has the count.
            let record =
                self.records().await?.get(doc_id).await.map_err(|e| ProgressError::new("document record", e))?;
            count = record.and_then(|r| r.page_count);
        }
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

    async fn records(&self) -> Result<&DocRecords, ProgressError> {
        self.records
            .get_or_try_init(|| async {
                let kv = self
                    .js
                    .get_key_value(self.names.progress_bucket())
                    .await
                    .map_err(ProgressError::at("progress bucket"))?;
                Ok(DocRecords::from_store(kv))
            })
            .await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cancelled_set_keeps_only_the_most_recent() {
        let mut set = RecentSet::new(CANCELLED_CACHE);
        for i in 0..3 * CANCELLED_CACHE {
            set.insert(&format!("doc-{i}"));
            set.insert(&format!("doc-{i}")); // a repeat takes no second place
            assert!(set.len() <= CANCELLED_CACHE);
        }
        assert_eq!((set.len(), set.order.len()), (CANCELLED_CACHE, CANCELLED_CACHE));
        assert!(set.contains(&format!("doc-{}", 3 * CANCELLED_CACHE - 1)), "the newest is kept");
        assert!(set.contains(&format!("doc-{}", 2 * CANCELLED_CACHE)), "the oldest kept one");
        assert!(!set.contains(&format!("doc-{}", 2 * CANCELLED_CACHE - 1)), "older ones are forgotten");
        assert!(!set.contains("doc-0"));
    }
}
