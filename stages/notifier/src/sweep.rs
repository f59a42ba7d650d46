//! The sweep: a document's terminal webhook goes out even when its terminal
//! event left the events stream before the notifier read it (the stream
//! discards its oldest events at `nats.max_event_bytes`; a notifier down
//! long enough, or a flood of events, evicts unread ones).
//!
//! Every document reaching its terminal state leaves a marker in the
//! durable records (`ended.<tenant>.<doc>`, [`DocRecords::ended`]); the
//! events consumer clears it when it schedules the terminal webhook (or
//! finds none due). Every [`EVERY`] the sweep reads the markers left and,
//! for each, [`decide`]s:
//! - the webhook is scheduled or finished (the callbacks bucket says so):
//!   clear the marker;
//! - the terminal event is still in the stream: the consumer will read it
//!   (or did, and had nothing to send: its ack floor is past it, clear);
//! - the event is gone: schedule the terminal webhook from the record (its
//!   callback and owner are durable there), then clear. Its page events,
//!   gone with it, are recorded lost by the delivery loop as usual.
//!
//! Several replicas may sweep at once: a delivery's message id on the
//! webhooks stream (`<webhook id>.0`) makes the second schedule a no-op.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use pagestream_pipeline::progress::DocState;
use pagestream_pipeline::records::{DocRecords, Ended};
use pagestream_pipeline::util::now_rfc3339;
use pagestream_schemas::{DocInfo, Event, EventState, FinalStatus, VERSION};
use tokio_util::sync::CancellationToken;

use crate::jobs::{self, Job};
use crate::{document_webhook_id, Notifier, STAGE};

/// The first sweep, after start (the consumer catches up meanwhile).
const FIRST: Duration = Duration::from_secs(5);
/// Between sweeps.
const EVERY: Duration = Duration::from_secs(30);

/// What to do with one marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing left to do: the marker goes.
    Clear,
    /// The events consumer has yet to read the terminal event.
    Wait,
    /// The terminal event was evicted unread: schedule its webhook.
    Recover,
}

/// `settled`: the webhook is scheduled or finished; `event_seq`: the
/// terminal event's sequence if the stream still holds it; `ack_floor`:
/// the events consumer's.
pub(crate) fn decide(settled: bool, event_seq: Option<u64>, ack_floor: u64) -> Action {
    match (settled, event_seq) {
        (true, _) => Action::Clear,
        (false, Some(seq)) if seq <= ack_floor => Action::Clear,
        (false, Some(_)) => Action::Wait,
        (false, None) => Action::Recover,
    }
}

/// The terminal event's state and status for a terminal document state.
fn terminal_of(state: DocState) -> Option<(EventState, FinalStatus)> {
    match state {
        DocState::Completed => Some((EventState::Completed, FinalStatus::Completed)),
        DocState::CompletedWithErrors => Some((EventState::Completed, FinalStatus::CompletedWithErrors)),
        DocState::Failed => Some((EventState::Failed, FinalStatus::Failed)),
        DocState::Cancelled => Some((EventState::Cancelled, FinalStatus::Cancelled)),
        DocState::Queued | DocState::Running => None,
    }
}

/// Sweeps until `shutdown`; a failed sweep is logged and tried again.
pub(crate) async fn run(n: Arc<Notifier>, shutdown: CancellationToken) -> Result<()> {
    let records = DocRecords::new(&n.ctx.counters);
    let mut wait = FIRST;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = EVERY;
        match sweep(&n, &records).await {
            Ok(0) => {}
            Ok(recovered) => tracing::warn!(recovered, "terminal webhooks scheduled for events evicted unread"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "webhook sweep failed; trying again"),
        }
    }
}

/// One pass over the markers; the number of webhooks recovered.
async fn sweep(n: &Notifier, records: &DocRecords) -> Result<usize> {
    let ended = records.ended().await?;
    if ended.is_empty() {
        return Ok(0);
    }
    let stream = n.ctx.js.get_stream(n.ctx.names.events_stream()).await.context("reading the events stream")?;
    let ack_floor =
        stream.consumer_info("notifier").await.context("reading the events consumer")?.ack_floor.stream_sequence;
    let mut recovered = 0;
    for e in ended {
        let Some((event_state, status)) = terminal_of(e.state) else {
            records.clear_ended(&e.tenant, &e.doc_id).await?;
            continue;
        };
        // `.scheduled` is written before any delivery: one read settles
        // almost every marker; the record is read only for a document whose
        // webhook an older notifier scheduled (before the marker existed).
        let settled = n.store.is_document_scheduled(&e.doc_id).await? || n.store.record(&e.doc_id).await?.is_some();
        let subject = n.ctx.names.doc_event(&e.doc_id, event_state);
        let event_seq = if settled {
            None
        } else {
            match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(msg) => Some(msg.sequence),
                Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => None,
                Err(err) => return Err(anyhow::anyhow!("reading {subject}: {err}")),
            }
        };
        match decide(settled, event_seq, ack_floor) {
            Action::Clear => records.clear_ended(&e.tenant, &e.doc_id).await?,
            Action::Wait => {}
            Action::Recover => {
                if recover(n, &e, event_state, status, ack_floor).await? {
                    recovered += 1;
                }
                records.clear_ended(&e.tenant, &e.doc_id).await?;
            }
        }
    }
    Ok(recovered)
}

/// Schedules the terminal webhook of a document whose terminal event was
/// evicted unread; false when it has none.
async fn recover(n: &Notifier, e: &Ended, state: EventState, status: FinalStatus, ack_floor: u64) -> Result<bool> {
    let (callback, owner) = n.callback_of(&e.doc_id).await.map_err(|err| anyhow::anyhow!("{err}"))?;
    let Some(callback) = callback else { return Ok(false) };
    let event = Event {
        v: VERSION,
        doc_id: e.doc_id.clone(),
        stage: STAGE.into(),
        state,
        page: None,
        error: None,
        info: Some(DocInfo { status: Some(status), ..DocInfo::default() }),
        ms: None,
        at: now_rfc3339(),
    };
    let webhook_id = document_webhook_id(&e.doc_id, status);
    // Its page events went before it: read through the ack floor, so pages
    // never read are recorded lost at once.
    let job = Job::new(event, callback, owner, webhook_id, None, ack_floor);
    jobs::publish(&n.ctx, &job).await?;
    n.store.document_scheduled(&e.doc_id).await?;
    metrics::counter!("pagestream_webhook_events_recovered_total").increment(1);
    tracing::warn!(
        doc_id = e.doc_id,
        state = status.as_str(),
        "terminal event evicted unread: its webhook is scheduled from the record"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_is_cleared_waited_on_or_recovered() {
        // Scheduled or delivered: whatever the stream holds.
        assert_eq!(decide(true, None, 0), Action::Clear);
        assert_eq!(decide(true, Some(9), 3), Action::Clear);
        // Still in the stream, not read yet: the consumer will.
        assert_eq!(decide(false, Some(9), 8), Action::Wait);
        // Read, and nothing scheduled: nothing was due.
        assert_eq!(decide(false, Some(9), 9), Action::Clear);
        assert_eq!(decide(false, Some(9), 12), Action::Clear);
        // Gone unread: recovered.
        assert_eq!(decide(false, None, 12), Action::Recover);
    }

    #[test]
    fn every_terminal_state_names_its_event_and_status() {
        assert_eq!(
            terminal_of(DocState::CompletedWithErrors),
            Some((EventState::Completed, FinalStatus::CompletedWithErrors))
        );
        assert_eq!(terminal_of(DocState::Cancelled), Some((EventState::Cancelled, FinalStatus::Cancelled)));
        assert_eq!(terminal_of(DocState::Failed).map(|t| t.1), Some(FinalStatus::Failed));
        assert_eq!(terminal_of(DocState::Completed).map(|t| t.1), Some(FinalStatus::Completed));
        assert_eq!(terminal_of(DocState::Running), None);
        assert_eq!(terminal_of(DocState::Queued), None);
    }
}
