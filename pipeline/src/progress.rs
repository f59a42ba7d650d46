//! Per-document progress: events plus counters.
//!
//! Each stage publishes one event per page and state on
//! `<p>.events.<doc>.page.<state>.<page>` and document-level events on
//! `<p>.events.<doc>.doc.<state>`. The stream keeps one message per subject
//! and every publish carries `Nats-Msg-Id` = subject (the history, for SSE
//! and failure reasons). After the event is durable the page is marked in
//! the document's [`Counters`] (an idempotent bitmap per state), which is
//! what status reads and completion checks use: their cost does not grow
//! with the page count, and a redelivered page never counts twice.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, stream::Stream};
use futures::TryStreamExt;
use pagestream_schemas::{decode, encode, DocInfo, ErrorInfo, Event, EventState, Message, VERSION};
use serde::Serialize;

use crate::counters::{Counters, DocCounters};
use crate::nats::Names;
use crate::util::now_rfc3339;

/// Publishes `payload` on `subject` with `Nats-Msg-Id` and waits for the PubAck.
pub async fn publish_durable(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    payload: Vec<u8>,
) -> Result<(), async_nats::Error> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    let ack = js.publish_with_headers(subject, headers, payload.into()).await?.await?;
    if ack.duplicate {
        // A re-run after a crash or redelivery: JetStream kept the first copy.
        tracing::info!(msg_id, "duplicate publish suppressed");
    }
    Ok(())
}

/// Publishes a message of the public schema with a deterministic message id.
pub async fn publish_message<M: Message>(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    msg: &M,
) -> Result<(), async_nats::Error> {
    publish_durable(js, subject, msg_id, encode(msg)).await
}

/// Builder-ish helper for the events a stage emits.
#[derive(Debug, Clone)]
pub struct Progress {
    js: jetstream::Context,
    names: Names,
    counters: Counters,
    stage: &'static str,
}

impl Progress {
    pub fn new(js: jetstream::Context, names: Names, counters: Counters, stage: &'static str) -> Self {
        Progress { js, names, counters, stage }
    }

    /// A page reached `state` (rendered, inferred, uploaded, failed).
    pub async fn page(
        &self,
        doc_id: &str,
        page: u32,
        state: EventState,
        error: Option<ErrorInfo>,
        ms: Option<f32>,
    ) -> Result<(), async_nats::Error> {
        let subject = self.names.page_event(doc_id, state.as_str(), page);
        let ev = Event {
            v: VERSION,
            doc_id: doc_id.into(),
            stage: self.stage.into(),
            state,
            page: Some(page),
            error,
            info: None,
            ms,
            at: now_rfc3339(),
        };
        publish_message(&self.js, subject.clone(), &subject, &ev).await?;
        // The event first: a crash in between leaves the message unacked,
        // and its redelivery marks the page (the event is deduplicated).
        self.counters.mark(doc_id, state, page, ms).await.map_err(|e| -> async_nats::Error { e.into() })?;
        Ok(())
    }

    /// A document reached `state` (queued, split, failed, completed, cancelled).
    pub async fn doc(
        &self,
        doc_id: &str,
        state: EventState,
        info: Option<DocInfo>,
        error: Option<ErrorInfo>,
    ) -> Result<(), async_nats::Error> {
        let subject = self.names.doc_event(doc_id, state.as_str());
        let ev = Event {
            v: VERSION,
            doc_id: doc_id.into(),
            stage: self.stage.into(),
            state,
            page: None,
            error,
            info,
            ms: None,
            at: now_rfc3339(),
        };
        publish_message(&self.js, subject.clone(), &subject, &ev).await
    }
}

/// Document state as users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DocState {
    Queued,
    Running,
    Completed,
    CompletedWithErrors,
    Failed,
    Cancelled,
}

impl DocState {
    pub fn is_terminal(self) -> bool {
        matches!(self, DocState::Completed | DocState::CompletedWithErrors | DocState::Failed | DocState::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DocState::Queued => "queued",
            DocState::Running => "running",
            DocState::Completed => "completed",
            DocState::CompletedWithErrors => "completed_with_errors",
            DocState::Failed => "failed",
            DocState::Cancelled => "cancelled",
        }
    }

    /// Parses a state name as used by the API (`?status=`).
    pub fn parse(s: &str) -> Option<DocState> {
        ALL_STATES.into_iter().find(|st| st.as_str() == s)
    }

    /// The state after document-level event `state` (with the final status
    /// the uploader recorded, for `completed`), given the state before.
    /// The first terminal state sticks: a `completed` arriving after a
    /// cancellation (a page finishing in the race) does not undo it, and a
    /// cancellation after completion changes nothing. `failed` followed by
    /// the uploader's `completed` (status failed) stays failed.
    pub fn after(self, state: &str, final_status: Option<&str>) -> DocState {
        let next = match state {
            "queued" => DocState::Queued,
            "split" => DocState::Running,
            "failed" => DocState::Failed,
            "cancelled" => DocState::Cancelled,
            "completed" => match final_status {
                Some("failed") => DocState::Failed,
                Some("completed_with_errors") => DocState::CompletedWithErrors,
                Some("cancelled") => DocState::Cancelled,
                _ => DocState::Completed,
            },
            _ => return self,
        };
        if self.is_terminal() {
            return self;
        }
        if next == DocState::Queued && self == DocState::Running {
            return self;
        }
        next
    }
}

/// Every document state, in lifecycle order.
pub const ALL_STATES: [DocState; 6] = [
    DocState::Queued,
    DocState::Running,
    DocState::Completed,
    DocState::CompletedWithErrors,
    DocState::Failed,
    DocState::Cancelled,
];

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

/// Reads a document's status; `None` when no event exists for it.
/// With `page_details`, failed pages' reasons are fetched too (one direct
/// get per failed page).
pub async fn read_status(
    js: &jetstream::Context,
    names: &Names,
    counters: &Counters,
    doc_id: &str,
    page_details: bool,
) -> Result<Option<DocStatus>> {
    let stream = js.get_stream(names.events_stream()).await.context("events stream")?;
    // Only the document-level subjects (a handful), never one per page.
    let subjects = subject_counts(&stream, &names.doc_events_only(doc_id)).await?;
    if subjects.is_empty() {
        return Ok(None);
    }
    let base = format!("{}.events.{doc_id}.doc.", names.prefix);
    let doc_states: Vec<String> = subjects.keys().filter_map(|s| s.strip_prefix(&base)).map(str::to_string).collect();
    let c = counters.doc(doc_id).await?;
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
            .map(|p| names.page_event(doc_id, EventState::Failed.as_str(), p))
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
    for state in &doc_states {
        events.push(last_event_seq(&stream, &names.doc_event(doc_id, state)).await?);
    }
    events.sort_by_key(|(seq, _)| *seq);
    for (_, ev) in events {
        let before = status.state;
        let final_status = ev.info.as_ref().and_then(|i| i.status.clone());
        status.state = before.after(ev.state.as_str(), final_status.as_deref());
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
    Ok(Some(status))
}

fn merge_info(into: &mut DocInfo, from: DocInfo) {
    macro_rules! take {
        ($($f:ident),*) => { $( if from.$f.is_some() { into.$f = from.$f; } )* };
    }
    take!(title, filename, sha256, bytes, page_count, status, manifest, model, model_sha256, owner);
}

async fn last_event(stream: &Stream, subject: &str) -> Result<Event> {
    Ok(last_event_seq(stream, subject).await?.1)
}

async fn last_event_seq(stream: &Stream, subject: &str) -> Result<(u64, Event)> {
    let raw = stream.get_last_raw_message_by_subject(subject).await.with_context(|| format!("reading {subject}"))?;
    let ev = decode::<Event>(&raw.payload).with_context(|| format!("decoding event {subject}"))?;
    Ok((raw.sequence, ev))
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
    /// Documents known to be cancelled.
    known: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Page counts of split documents (a document's count never changes).
    page_counts: std::sync::Mutex<std::collections::HashMap<String, u32>>,
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

    pub async fn is_cancelled(&self, doc_id: &str) -> Result<bool> {
        if self.known.lock().expect("event lookup lock").contains(doc_id) {
            return Ok(true);
        }
        let subject = self.names.doc_event(doc_id, EventState::Cancelled.as_str());
        let cancelled = self.event_exists(&subject).await?;
        if cancelled {
            self.known.lock().expect("event lookup lock").insert(doc_id.to_string());
        }
        Ok(cancelled)
    }

    /// The document's page count as its splitter recorded it (`None`:
    /// not split yet, or split before the count was recorded). One direct
    /// get per document and process; messages may not claim another count.
    pub async fn page_count(&self, doc_id: &str) -> Result<Option<u32>> {
        if let Some(n) = self.page_counts.lock().expect("event lookup lock").get(doc_id) {
            return Ok(Some(*n));
        }
        let stream = self
            .stream
            .get_or_try_init(|| async { self.js.get_stream(self.names.events_stream()).await.context("events stream") })
            .await?;
        let subject = self.names.doc_event(doc_id, EventState::Split.as_str());
        let count = match stream.direct_get_last_for_subject(&subject).await {
            Ok(raw) => decode::<Event>(&raw.payload).ok().and_then(|e| e.info).and_then(|i| i.page_count),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => None,
            Err(e) => return Err(anyhow::anyhow!("reading {subject}: {e}")),
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
    pub async fn page_reached(&self, doc_id: &str, page: u32, state: EventState) -> Result<bool> {
        self.event_exists(&self.names.page_event(doc_id, state.as_str(), page)).await
    }

    async fn event_exists(&self, subject: &str) -> Result<bool> {
        let stream = self
            .stream
            .get_or_try_init(|| async { self.js.get_stream(self.names.events_stream()).await.context("events stream") })
            .await?;
        match stream.direct_get_last_for_subject(subject).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(false),
            Err(e) => Err(anyhow::anyhow!("reading {subject}: {e}")),
        }
    }
}

/// Every event of a document currently stored, in stream order, with its
/// sequence number: one ordered consumer, read until nothing is pending.
/// `filter` narrows it (e.g. `<p>.events.<doc>.page.>`).
pub async fn read_events(js: &jetstream::Context, names: &Names, filter: String) -> Result<Vec<(u64, Event)>> {
    let stream = js.get_stream(names.events_stream()).await.context("events stream")?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig { filter_subject: filter, ..Default::default() })
        .await
        .context("creating an ordered consumer on the events stream")?;
    let mut out = Vec::new();
    // An empty filter match: nothing will ever arrive.
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.context("reading events")?;
    while let Some(msg) = messages.try_next().await.context("reading events")? {
        let info = msg.info().map_err(|e| anyhow::anyhow!("event metadata: {e}"))?;
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

/// Subject → message count for every subject matching `filter`.
pub async fn subject_counts(stream: &Stream, filter: &str) -> Result<BTreeMap<String, usize>> {
    let info = stream.info_with_subjects(filter).await.context("stream info with subjects")?;
    info.try_collect::<BTreeMap<_, _>>().await.context("listing event subjects")
}
