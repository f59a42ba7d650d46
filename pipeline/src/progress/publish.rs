//! Publishing: every message and event goes out with a deterministic
//! `Nats-Msg-Id` and waits for its PubAck, so a re-run after a crash is
//! deduplicated by JetStream.

use async_nats::jetstream;
use pagestream_schemas::{decode, encode, DocInfo, ErrorInfo, Event, EventState, Message, VERSION};

use crate::counters::Counters;
use crate::nats::Names;
pub use crate::nats::OUTAGE_RIDE;
use crate::records::DocRecords;
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
    crate::telemetry::inject(&mut headers);
    let payload = bytes::Bytes::from(payload);
    let started = std::time::Instant::now();
    let mut delay = OUTAGE_FIRST_DELAY;
    loop {
        let sent = match js.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(ack) => {
                if ack.duplicate {
                    // A re-run after a crash or redelivery: JetStream kept the first copy.
                    tracing::info!(msg_id, "duplicate publish suppressed");
                }
                return Ok(());
            }
            // The stream has no leader for a moment (a node of the cluster
            // restarts, an election is running) or the reply was lost: the
            // same message id again is safe, and riding the outage out here
            // keeps it from using up the *input* message's deliveries.
            Err(e) if outage(e.kind()) && started.elapsed() + delay <= OUTAGE_RIDE => {
                tracing::debug!(msg_id, error = %e, ?delay, "publish failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(OUTAGE_MAX_DELAY);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

const OUTAGE_FIRST_DELAY: std::time::Duration = std::time::Duration::from_millis(100);
const OUTAGE_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// Publish failures that an unchanged retry can cure.
fn outage(kind: jetstream::context::PublishErrorKind) -> bool {
    use jetstream::context::PublishErrorKind as K;
    matches!(kind, K::StreamNotFound | K::TimedOut | K::BrokenPipe)
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
        let subject = self.names.page_event(doc_id, state, page);
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
        let subject = self.names.doc_event(doc_id, state);
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
        publish_message(&self.js, subject.clone(), &subject, &ev).await?;
        // The durable record follows (owner, page count, state, the
        // tenant's index and quota entries): the events stream forgets, the
        // record does not. After the event, like the page counters: a
        // failure here fails the caller, whose retry writes it.
        let records = DocRecords::new(&self.counters);
        records
            .note_event(doc_id, state, ev.info.as_ref(), self.queued_owner(doc_id))
            .await
            .map_err(|e| -> async_nats::Error { e.into() })
    }

    /// The owner the document's `queued` event names, if it is still stored
    /// (only asked for a document without a record).
    async fn queued_owner(&self, doc_id: &str) -> Option<String> {
        let stream = self.js.get_stream(self.names.events_stream()).await.ok()?;
        let raw =
            stream.get_last_raw_message_by_subject(&self.names.doc_event(doc_id, EventState::Queued)).await.ok()?;
        decode::<Event>(&raw.payload).ok()?.info?.owner
    }
}
