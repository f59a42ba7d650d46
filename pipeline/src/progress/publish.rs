//! Publishing: every message and event goes out with a deterministic
//! `Nats-Msg-Id` and waits for its PubAck, so a re-run after a crash is
//! deduplicated by JetStream.

use async_nats::jetstream;
use pagestream_schemas::{encode, DocInfo, ErrorInfo, Event, EventState, Message, VERSION};

use crate::counters::Counters;
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
    crate::telemetry::inject(&mut headers);
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
        publish_message(&self.js, subject.clone(), &subject, &ev).await
    }
}
