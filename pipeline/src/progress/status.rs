//! Document status: the document-level events folded by the state
//! machine ([`DocState`]), plus the page counters; listings and timings.

use std::collections::{BTreeMap, BTreeSet};

use async_nats::jetstream::{self, stream::Stream};
use futures::TryStreamExt;
use pagestream_schemas::{decode, DocInfo, ErrorInfo, Event, EventState};
use serde::Serialize;

use crate::counters::{Counters, DocCounters};
use crate::nats::Names;
use crate::progress::{DocState, EventSubject, ProgressError};
use crate::records::{DocRecord, DocRecords};

/// Distinct pages per state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PageCounts {
    pub rendered: u32,
    pub inferred: u32,
    pub uploaded: u32,
    pub failed: u32,
}

/// A page that failed, with the reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedPage {
    pub page: u32,
    pub stage: String,
    pub error: ErrorInfo,
}

/// Everything known about a document, from its events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocStatus {
    pub doc_id: String,
    pub state: DocState,
    pub page_count: Option<u32>,
    pub pages: PageCounts,
    pub info: DocInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    pub failed_pages: Vec<FailedPage>,
    pub queued_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The page sets behind `pages` (with per-stage timing aggregates).
    #[serde(skip)]
    pub counters: DocCounters,
}

impl DocStatus {
    /// Every page has a terminal outcome (uploaded or failed).
    pub fn all_pages_done(&self) -> bool {
        matches!(self.page_count, Some(n) if self.pages.uploaded + self.pages.failed >= n)
    }
}

/// Per-stage time spent on each page (aggregated in the page counters as
/// pages are marked).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StageTiming {
    pub pages: u32,
    pub mean_ms: f32,
    pub max_ms: f32,
}

/// When a document was queued, started and finished, its wall time, and
/// per stage (`render`, `infer`, `upload`) the time per page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocTimings {
    pub queued_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// From start (else queueing) to finish, in milliseconds.
    pub wall_ms: Option<f64>,
    pub per_page_ms: BTreeMap<&'static str, StageTiming>,
}

impl DocStatus {
    /// The document's timings; no event is read.
    pub fn timings(&self) -> DocTimings {
        let mut per_page_ms = BTreeMap::new();
        let c = &self.counters;
        for (stage, set) in [("render", &c.rendered), ("infer", &c.inferred), ("upload", &c.uploaded)] {
            if let Some(mean) = set.mean_ms() {
                per_page_ms.insert(stage, StageTiming { pages: set.timed, mean_ms: mean as f32, max_ms: set.max_ms });
            }
        }
        let parse = |t: &Option<String>| {
            t.as_deref()
                .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
        };
        let wall_ms = match (parse(&self.started_at).or(parse(&self.queued_at)), parse(&self.finished_at)) {
            (Some(a), Some(b)) => Some(((b - a).as_seconds_f64() * 1000.0).round()),
            _ => None,
        };
        DocTimings {
            queued_at: self.queued_at.clone(),
            started_at: self.started_at.clone(),
            finished_at: self.finished_at.clone(),
            wall_ms,
            per_page_ms,
        }
    }
}

/// Every document with events, with the document-level events it has
/// (what [`DocState::could_be`] filters on), in id order: one stream-info
/// request, no event read.
pub async fn list_documents(
    js: &jetstream::Context,
    names: &Names,
) -> Result<BTreeMap<String, BTreeSet<EventState>>, ProgressError> {
    let stream = js.get_stream(names.events_stream()).await.map_err(ProgressError::at("events stream"))?;
    let subjects = subject_counts(&stream, &names.all_doc_events()).await?;
    let mut docs: BTreeMap<String, BTreeSet<EventState>> = BTreeMap::new();
    for subject in subjects.keys() {
        if let Some(EventSubject::Doc { doc_id, state }) = EventSubject::parse(names, subject) {
            docs.entry(doc_id.to_string()).or_default().insert(state);
        }
    }
    Ok(docs)
}

/// Reads a document's status; `None` when neither an event nor a record
/// exists for it. With `page_details`, failed pages' reasons are fetched
/// too (one direct get per failed page).
pub async fn read_status(
    js: &jetstream::Context,
    names: &Names,
    counters: &Counters,
    doc_id: &str,
    page_details: bool,
) -> Result<Option<DocStatus>, ProgressError> {
    Ok(read_status_with_record(js, names, counters, doc_id, page_details).await?.map(|(status, _)| status))
}

/// [`read_status`], with the document's durable record (`None`: it has
/// none — never recorded, older than records, or expired). The record
/// fills in what the events stream no longer holds: the owner
/// (`info.owner` is the record's whenever there is one), the page count,
/// and the state when the events that carried it were discarded (a
/// document whose every event is gone still reads as its record's state,
/// so its last pages complete it and its owner still sees it).
pub async fn read_status_with_record(
    js: &jetstream::Context,
    names: &Names,
    counters: &Counters,
    doc_id: &str,
    page_details: bool,
) -> Result<Option<(DocStatus, Option<DocRecord>)>, ProgressError> {
    let stream = js.get_stream(names.events_stream()).await.map_err(ProgressError::at("events stream"))?;
    // Only the document-level subjects (a handful), never one per page.
    let records = DocRecords::new(counters);
    let filter = names.doc_events_only(doc_id);
    let (subjects, record) = tokio::try_join!(subject_counts(&stream, &filter), async {
        records.get(doc_id).await.map_err(|e| ProgressError::new("document record", e))
    })?;
    if subjects.is_empty() && record.is_none() {
        return Ok(None);
    }
    let doc_states: Vec<EventState> = subjects
        .keys()
        .filter_map(|s| match EventSubject::parse(names, s)? {
            EventSubject::Doc { state, .. } => Some(state),
            EventSubject::Page { .. } => None,
        })
        .collect();
    let c = counters.doc(doc_id).await.map_err(ProgressError::at("page counters"))?;
    let counts = PageCounts {
        rendered: c.rendered.len(),
        inferred: c.inferred.len(),
        uploaded: c.uploaded.len(),
        // A page uploaded and later reported failed (a retry's give-up) is done once.
        failed: c.failed.minus_len(&c.uploaded),
    };
    let failed_subjects: Vec<String> = if page_details && !c.failed.is_empty() {
        c.failed
            .pages()
            .filter(|p| !c.uploaded.contains(*p))
            .map(|p| names.page_event(doc_id, EventState::Failed, p))
            .collect()
    } else {
        Vec::new()
    };
    let mut status = DocStatus {
        doc_id: doc_id.into(),
        state: DocState::Queued,
        page_count: None,
        pages: counts,
        info: DocInfo::default(),
        error: None,
        failed_pages: Vec::new(),
        queued_at: None,
        started_at: None,
        finished_at: None,
        counters: c,
    };
    // Fold document-level events in the order they were recorded.
    let mut events = Vec::with_capacity(doc_states.len());
    for state in doc_states {
        events.push(last_event_seq(&stream, &names.doc_event(doc_id, state)).await?);
    }
    events.sort_by_key(|(seq, _)| *seq);
    for (_, ev) in events {
        let before = status.state;
        status.state = before.after(ev.state, ev.info.as_ref().and_then(|i| i.status));
        if ev.state == EventState::Completed && before == DocState::Cancelled {
            continue; // a page finishing in the race with a cancellation
        }
        if let Some(info) = ev.info {
            merge_info(&mut status.info, info);
        }
        match ev.state {
            EventState::Queued => status.queued_at = Some(ev.at),
            EventState::Split => status.started_at = Some(ev.at),
            EventState::Failed => {
                status.error = ev.error;
                status.finished_at = Some(ev.at);
            }
            EventState::Completed | EventState::Cancelled if !before.is_terminal() => {
                if ev.error.is_some() {
                    status.error = ev.error; // every page failed: the manifest's reason
                }
                status.finished_at = Some(ev.at)
            }
            _ => {}
        }
    }
    if let Some(r) = &record {
        // Queued < running < terminal; the first terminal state sticks.
        let rank = |s: DocState| if s.is_terminal() { 2 } else { u8::from(s == DocState::Running) };
        if rank(r.state) > rank(status.state) {
            status.state = r.state;
        }
        status.info.owner = r.owner.clone();
        if status.info.page_count.is_none() {
            status.info.page_count = r.page_count;
        }
        if status.info.callback.is_none() {
            status.info.callback = r.callback.clone();
        }
    }
    status.page_count = status.info.page_count;
    if page_details {
        for subject in &failed_subjects {
            let ev = last_event(&stream, subject).await?;
            let error = ev.error.unwrap_or_default();
            // The stage that failed, not the one that recorded it.
            let stage = error.stage.clone().unwrap_or(ev.stage);
            status.failed_pages.push(FailedPage { page: ev.page.unwrap_or(0), stage, error });
        }
        status.failed_pages.sort_by_key(|f| f.page);
    }
    Ok(Some((status, record)))
}

fn merge_info(into: &mut DocInfo, from: DocInfo) {
    macro_rules! take {
        ($($f:ident),*) => { $( if from.$f.is_some() { into.$f = from.$f; } )* };
    }
    take!(title, filename, sha256, bytes, page_count, status, manifest, model, model_sha256, owner, callback);
}

async fn last_event(stream: &Stream, subject: &str) -> Result<Event, ProgressError> {
    Ok(last_event_seq(stream, subject).await?.1)
}

async fn last_event_seq(stream: &Stream, subject: &str) -> Result<(u64, Event), ProgressError> {
    let raw = stream
        .get_last_raw_message_by_subject(subject)
        .await
        .map_err(ProgressError::at(format!("reading {subject}")))?;
    let ev = decode::<Event>(&raw.payload).map_err(ProgressError::at(format!("decoding event {subject}")))?;
    Ok((raw.sequence, ev))
}

/// Every event of a document currently stored, in stream order, with its
/// sequence number: one ordered consumer, read until nothing is pending.
/// `filter` narrows it (e.g. `<p>.events.<doc>.page.>`).
pub async fn read_events(
    js: &jetstream::Context,
    names: &Names,
    filter: String,
) -> Result<Vec<(u64, Event)>, ProgressError> {
    let stream = js.get_stream(names.events_stream()).await.map_err(ProgressError::at("events stream"))?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig { filter_subject: filter, ..Default::default() })
        .await
        .map_err(ProgressError::at("creating an ordered consumer on the events stream"))?;
    let mut out = Vec::new();
    // An empty filter match: nothing will ever arrive.
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(ProgressError::at("reading events"))?;
    while let Some(msg) = messages.try_next().await.map_err(ProgressError::at("reading events"))? {
        let info = msg.info().map_err(|e| ProgressError::new("event metadata", e.to_string()))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        if let Ok(ev) = decode::<Event>(&msg.payload) {
            out.push((seq, ev));
        }
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// Subject → message count for every subject matching `filter`
/// ([`crate::nats::subject_counts`]).
pub async fn subject_counts(stream: &Stream, filter: &str) -> Result<BTreeMap<String, usize>, ProgressError> {
    crate::nats::subject_counts(stream, filter)
        .await
        .map_err(|e| ProgressError::new("listing event subjects", format!("{e:#}")))
}

/// Events on `filter` recorded within the last `window` (e.g. pages
/// uploaded in the last five minutes, for throughput): one short-lived
/// consumer starting at that time, whose pending count is the answer; no
/// event is read.
pub async fn count_events_since(
    js: &jetstream::Context,
    names: &Names,
    filter: String,
    window: std::time::Duration,
) -> Result<u64, ProgressError> {
    use jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let stream = js.get_stream(names.events_stream()).await.map_err(ProgressError::at("events stream"))?;
    let start_time = time::OffsetDateTime::now_utc() - window;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            ack_policy: AckPolicy::None,
            inactive_threshold: std::time::Duration::from_secs(10),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(ProgressError::at("counting recent events"))?;
    let info = consumer.cached_info();
    let pending = info.num_pending;
    // Gone by itself after `inactive_threshold` if this fails.
    let _ = stream.delete_consumer(&info.name).await;
    Ok(pending)
}
