//! The parking place of documents waiting for a model no live inferencer
//! serves: stream `<P>_PARKED`, one message per document on
//! `<p>.parked.<model>.<doc>` holding the turn to run (its start page, its
//! model decided). Parking is a publish and then the turn's ack, so a
//! waiting document holds no splitter worker and no ack-pending slot, and
//! any number of them may wait.
//!
//! [`unpark`] runs in every splitter replica: once a second it lists the
//! parked subjects (one stream-info request) and, for each whose model is
//! live, republishes the turn on its tenant's queue with
//! `Nats-Msg-Id = <doc>:unpark:<sequence of the parked message>` — the same
//! in every replica and after a crash, so JetStream keeps one — and then
//! deletes the parked message. Every 30 s it also drops parked documents
//! that were cancelled or finished meanwhile.

use std::time::Duration;

use anyhow::{Context as _, Result};
use futures::TryStreamExt as _;
use pagestream_pipeline::consumer::StageError;
use pagestream_pipeline::registry::LiveModels;
use pagestream_schemas::{decode, encode, DocumentSubmitted};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{model_of, Splitter, STAGE};

/// How often parked documents are compared with the live models.
const EVERY: Duration = Duration::from_secs(1);
/// How often parked documents are checked for cancellation.
const SWEEP_EVERY: u32 = 30;

impl Splitter {
    /// Parks the turn `sub` until its model is live.
    pub(crate) async fn park(&self, sub: &DocumentSubmitted) -> Result<(), StageError> {
        let start = sub.start_page.unwrap_or(1);
        let parked = DocumentSubmitted { start_page: Some(start), ..sub.clone() };
        let subject = self.ctx.names.parked(model_of(sub), &sub.doc_id);
        // No Nats-Msg-Id: a document may park at the same page twice within
        // the duplicate window (its model came and went); one message per
        // subject keeps the latest.
        // The document's trace goes on when it is unparked.
        let mut headers = async_nats::HeaderMap::new();
        pagestream_pipeline::telemetry::inject(&mut headers);
        let ack = self
            .ctx
            .js
            .publish_with_headers(subject, headers, encode(&parked).into())
            .await
            .map_err(StageError::publish)?;
        ack.await.map_err(StageError::publish)?;
        self.ctx.metrics.message(STAGE, "parked");
        tracing::info!(doc_id = sub.doc_id, model = model_of(sub), start, "waiting for the model: parked");
        Ok(())
    }
}

/// Republishes parked documents whose model is live, until `shutdown`.
pub async fn unpark(splitter: std::sync::Arc<Splitter>, live: LiveModels, shutdown: CancellationToken) {
    let mut round = 0u32;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        round = round.wrapping_add(1);
        match unpark_once(&splitter, &live, round.is_multiple_of(SWEEP_EVERY)).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(error = %format!("{e:#}"), failures, "reading parked documents failed; retrying");
                }
            }
        }
    }
}

async fn unpark_once(s: &Splitter, live: &LiveModels, sweep: bool) -> Result<()> {
    let names = &s.ctx.names;
    let stream = s.ctx.js.get_stream(names.parked_stream()).await.context("the parked stream")?;
    let mut info = stream.info_with_subjects(names.all_parked()).await?;
    if info.info.state.messages == 0 {
        return Ok(());
    }
    let mut subjects = Vec::new();
    while let Some((subject, _)) = info.try_next().await? {
        subjects.push(subject);
    }
    let served = live.models();
    let prefix = format!("{}.parked.", names.prefix);
    for subject in subjects {
        let Some((model, _doc)) = subject.strip_prefix(&prefix).and_then(|r| r.split_once('.')) else { continue };
        let live_now = served.contains_key(model);
        if !live_now && !sweep {
            continue;
        }
        let Ok(msg) = stream.get_last_raw_message_by_subject(&subject).await else { continue };
        let sub: DocumentSubmitted = match decode(&msg.payload) {
            Ok(sub) => sub,
            Err(e) => {
                tracing::warn!(subject, error = %e, "dropping a parked message that does not decode");
                let _ = stream.delete_message(msg.sequence).await;
                continue;
            }
        };
        if live_now {
            let id = format!("{}:unpark:{}", sub.doc_id, msg.sequence);
            // A child of the span that parked it: the document stays one trace.
            let span = tracing::info_span!("unpark", doc_id = %sub.doc_id);
            pagestream_pipeline::telemetry::continue_from(&span, Some(&msg.headers));
            s.queue_turn(&sub, &id).instrument(span).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!(doc_id = sub.doc_id, model, "the model is live: unparked");
            s.ctx.metrics.message(STAGE, "unparked");
        } else if !(s.ctx.is_cancelled(&sub.doc_id).await? || s.finished(&sub.doc_id).await?) {
            continue;
        }
        // Another replica may have deleted it first.
        let _ = stream.delete_message(msg.sequence).await;
    }
    Ok(())
}
