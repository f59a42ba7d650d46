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

/// The turn to park for `sub`: where it starts, always set (a first turn
/// starts at page 1), so that unparking resumes it there.
fn parked_turn(sub: &DocumentSubmitted) -> DocumentSubmitted {
    DocumentSubmitted { start_page: Some(sub.start_page.unwrap_or(1)), ..sub.clone() }
}

/// The model and document of a parked subject
/// (`<p>.parked.<model>.<doc>`; `prefix` is `<p>.parked.`).
fn parked_subject<'a>(subject: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    subject.strip_prefix(prefix).and_then(|r| r.split_once('.'))
}

/// What a round does with one parked document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    /// Its model is not live and this round does not sweep: not read.
    Skip,
    /// Its model is live: republished on its tenant's queue, then deleted.
    Unpark,
    /// A sweep: deleted if the document was cancelled or finished meanwhile.
    Sweep,
}

/// The decision for a parked document whose model is (`live`) or is not
/// served now, in a round that sweeps (`sweep`) or not.
fn look(live: bool, sweep: bool) -> Look {
    match (live, sweep) {
        (true, _) => Look::Unpark,
        (false, true) => Look::Sweep,
        (false, false) => Look::Skip,
    }
}

/// The message id of the turn unparked from the parked message `sequence`:
/// the same in every replica and after a crash, so JetStream keeps one.
fn unpark_id(doc_id: &str, sequence: u64) -> String {
    format!("{doc_id}:unpark:{sequence}")
}

/// Whether round `round` also sweeps (every [`SWEEP_EVERY`] rounds).
fn sweeps(round: u32) -> bool {
    round.is_multiple_of(SWEEP_EVERY)
}

/// Whether the `failures`-th failure in a row is logged: the first, then
/// one a minute (a round a second).
fn warn_now(failures: u32) -> bool {
    failures == 1 || failures.is_multiple_of(60)
}

impl Splitter {
    /// Parks the turn `sub` until its model is live.
    pub(crate) async fn park(&self, sub: &DocumentSubmitted) -> Result<(), StageError> {
        let parked = parked_turn(sub);
        let start = parked.start_page.unwrap_or(1);
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
        match unpark_once(&splitter, &live, sweeps(round)).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if warn_now(failures) {
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
        let Some((model, _doc)) = parked_subject(&subject, &prefix) else { continue };
        let action = look(served.contains_key(model), sweep);
        if action == Look::Skip {
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
        if action == Look::Unpark {
            let id = unpark_id(&sub.doc_id, msg.sequence);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_turn_resumes_where_it_stopped() {
        let sub: DocumentSubmitted =
            serde_json::from_value(serde_json::json!({"v": 1, "doc_id": "d", "source": {"blob": "b"}})).unwrap();
        assert_eq!(parked_turn(&sub).start_page, Some(1), "a first turn parks at page 1");
        let later = DocumentSubmitted { start_page: Some(17), ..sub };
        let parked = parked_turn(&later);
        assert_eq!((parked.start_page, parked.doc_id.as_str()), (Some(17), "d"));
    }

    #[test]
    fn parked_subjects_name_the_model_then_the_document() {
        assert_eq!(parked_subject("p.parked.layout_cdla.doc-1", "p.parked."), Some(("layout_cdla", "doc-1")));
        assert_eq!(parked_subject("p.parked.m.d.x", "p.parked."), Some(("m", "d.x")));
        assert_eq!(parked_subject("p.parked.only", "p.parked."), None);
        assert_eq!(parked_subject("q.parked.m.d", "p.parked."), None, "another pipeline's");
    }

    #[test]
    fn a_parked_document_is_unparked_when_live_and_swept_otherwise() {
        assert_eq!(look(true, false), Look::Unpark);
        assert_eq!(look(true, true), Look::Unpark, "a live model wins over the sweep");
        assert_eq!(look(false, true), Look::Sweep);
        assert_eq!(look(false, false), Look::Skip, "not even read");
        // One sweep every 30 rounds (~30 s), not the first rounds.
        let swept: Vec<u32> = (1..=90).filter(|r| sweeps(*r)).collect();
        assert_eq!(swept, [30, 60, 90]);
    }

    #[test]
    fn unparking_is_deduplicated_per_parked_message() {
        assert_eq!(unpark_id("d", 42), "d:unpark:42");
        assert_ne!(unpark_id("d", 42), unpark_id("d", 43), "parked again later: another turn");
    }

    #[test]
    fn failures_are_logged_once_then_once_a_minute() {
        let logged: Vec<u32> = (1..=180).filter(|f| warn_now(*f)).collect();
        assert_eq!(logged, [1, 60, 120, 180]);
    }
}
