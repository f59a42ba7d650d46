//! Scheduled webhook deliveries: the webhooks stream (`nats/notifier.json`)
//! holds one message per delivery and attempt ([`Job`]: the event, its
//! callback, the attempts made, the first attempt's time and the time it is
//! due), consumed by the delivery loop ([`run`]) of every notifier replica.
//!
//! Each message gets at most one attempt, and a handler never sleeps:
//! - not due yet, the endpoint or tenant at its concurrency limit, or a
//!   terminal event whose page events are unfinished: nak with a delay
//!   (no attempt; the consumer's `max_deliver` is unlimited for this);
//! - the endpoint's circuit open ([`crate::breaker`]): not attempted,
//!   scheduled for the end of the cool-down, and given up when that is past
//!   the retry window;
//! - a failed attempt: republished with one more attempt and its "not
//!   before" time, then acked; given up when the next attempt would come
//!   after `notifier.retry_for_secs` from the first.
//!
//! Every end leaves a record: delivered or given up in the callbacks bucket
//! (`<doc>.pages`, `<doc>.page_failures`, `<doc>.document`), and a dead
//! letter (`callback_failed`) for each delivery given up. A terminal event
//! whose document has pages with an outcome but no page event ever read
//! (evicted from the events stream before the notifier read it: the events
//! consumer's ack floor is past the terminal event) records those pages as
//! lost (`<doc>.pages_lost`, failed) with a dead letter `callback_lost`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use pagestream_pipeline::callbacks::CallbackRecord;
use pagestream_pipeline::consumer::{dead_letter, ErrorKind, StageError};
use pagestream_pipeline::stage::StageContext;
use pagestream_pipeline::tenants::tenant_of;
use pagestream_pipeline::util::now_rfc3339;
use pagestream_schemas::{Callback, CallbackEvents, ErrorInfo, Event, FinalStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::breaker::{endpoint_of, Admit};
use crate::deliver::{backoff, count_delivery, Attempt, Webhook};
use crate::{terminal_status, Notifier, STAGE};

/// The webhooks stream and its consumer.
pub const DEFINITIONS: &str = include_str!("../../../nats/notifier.json");
/// The durable consumer of the webhooks stream, shared by every replica.
pub const CONSUMER: &str = "notifier_webhooks";
/// How long one pull request waits on the server.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How often a terminal event looks again whether its pages are finished.
const PAGES_POLL: Duration = Duration::from_secs(1);
/// How long, past the retry window, a terminal event waits for its pages.
const PAGES_GRACE: Duration = Duration::from_secs(60);

/// One scheduled delivery (JSON on `<p>.webhooks.<doc>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// The event the webhook is about.
    pub event: Event,
    pub callback: Callback,
    /// The document's owner (its tenant's concurrency limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub webhook_id: String,
    /// The body: a page event's when scheduled, a document's at its first
    /// attempt; the same on every attempt after that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// Times this delivery was republished (its message id's suffix).
    pub generation: u32,
    /// Unix milliseconds: scheduled, first attempt (or first not attempted
    /// for an open circuit: its retry window starts), due.
    pub scheduled_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_ms: Option<u64>,
    pub not_before_ms: u64,
    /// The event's sequence in the events stream.
    pub event_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ErrorInfo>,
}

impl Job {
    pub fn new(
        event: Event,
        callback: Callback,
        owner: Option<String>,
        webhook_id: String,
        body: Option<String>,
        event_seq: u64,
    ) -> Job {
        let now = now_ms();
        Job {
            event,
            callback,
            owner,
            webhook_id,
            body,
            attempts: 0,
            generation: 0,
            scheduled_ms: now,
            first_ms: None,
            not_before_ms: now,
            event_seq,
            last_error: None,
        }
    }

    fn kind(&self) -> &'static str {
        if self.event.page.is_some() {
            "page"
        } else {
            "document"
        }
    }

    /// Deduplicates a redelivered event's scheduling and a republication:
    /// one terminal delivery per document, one per page event.
    fn msg_id(&self) -> String {
        match self.event.page {
            Some(_) => format!("{}.{}", self.webhook_id, self.generation),
            None => format!("{}.document.{}", self.event.doc_id, self.generation),
        }
    }
}

/// Publishes `job` on the webhooks stream and waits for its PubAck.
pub(crate) async fn publish(ctx: &StageContext, job: &Job) -> Result<()> {
    let payload = Bytes::from(serde_json::to_vec(job)?);
    let msg = PublishMessage::build().payload(payload).message_id(job.msg_id());
    ctx.js.send_publish(ctx.names.webhooks(&job.event.doc_id), msg).await?.await.context("webhook delivery PubAck")?;
    Ok(())
}

/// What becomes of a delivery's message.
#[derive(Debug)]
enum Step {
    /// Finished (delivered, given up, or nothing to do): ack.
    Done,
    /// Not now: nak with this delay; counted under the reason, if any.
    Later(Duration, Option<&'static str>),
    /// Publish this successor (next attempt), then ack.
    Next(Box<Job>, &'static str),
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// `d` give or take 20%, so that deliveries put off together do not all
/// come back at the same moment.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0);
    d.mul_f64(0.8 + f64::from(nanos % 1000) / 2500.0)
}

/// The delay of a delivery whose endpoint or tenant is at its limit, by its
/// message's deliveries: 250 ms doubling to 8 s.
fn busy_delay(delivered: i64) -> Duration {
    jitter(Duration::from_millis(250 << (delivered.clamp(1, 6) - 1)))
}

fn scheduled(reason: &'static str) {
    metrics::counter!("pagestream_webhook_retries_scheduled_total", "reason" => reason).increment(1);
}

/// The delivery loop: pulls as many messages as it has free slots
/// (`notifier.concurrency`), each handled by [`Notifier::step`], until
/// `shutdown`.
pub(crate) async fn run(n: Arc<Notifier>, shutdown: CancellationToken) -> Result<()> {
    let stream_name = n.ctx.names.webhooks_stream();
    let stream = n.ctx.js.get_stream(&stream_name).await.with_context(|| format!("stream {stream_name}"))?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer(CONSUMER)
        .await
        .map_err(|e| anyhow::anyhow!("consumer {CONSUMER} on {stream_name}: {e}"))?;
    let ack_wait = consumer.cached_info().config.ack_wait;
    let permits = Arc::new(Semaphore::new(n.cfg.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let mut failures: u32 = 0;
    tracing::info!(stream = %stream_name, consumer = CONSUMER, "delivering webhooks");
    'pull: loop {
        if failures > 0 {
            let pause = pagestream_pipeline::consumer::pull_backoff(failures);
            tokio::select! {
                _ = shutdown.cancelled() => break 'pull,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break 'pull,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        while tasks.try_join_next().is_some() {}
        let mut free = vec![first];
        while let Ok(p) = permits.clone().try_acquire_owned() {
            free.push(p);
        }
        let mut batch = match consumer.batch().max_messages(free.len()).expires(PULL_EXPIRES).messages().await {
            Ok(b) => b,
            Err(e) => {
                failures += 1;
                pagestream_pipeline::consumer::log_pull_failure(crate::STAGE, failures, &e);
                continue 'pull;
            }
        };
        loop {
            let msg = match batch.next().await {
                Some(Ok(m)) => {
                    failures = 0;
                    m
                }
                Some(Err(e)) => {
                    failures += 1;
                    tracing::debug!(error = %e, failures, "pulling webhook deliveries failed");
                    break;
                }
                None => break,
            };
            let Some(permit) = free.pop() else {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                continue;
            };
            let n = n.clone();
            tasks.spawn(async move {
                n.process(msg, ack_wait).await;
                drop(permit);
            });
        }
    }
    tracing::info!(in_flight = tasks.len(), "stopping: finishing webhook attempts in flight");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

impl Notifier {
    /// Handles one delivery message and acks, naks or republishes it.
    async fn process(&self, msg: jetstream::Message, ack_wait: Duration) {
        let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
        let keepalive = pagestream_pipeline::consumer::keep_alive(&msg, ack_wait);
        let step = match serde_json::from_slice::<Job>(&msg.payload) {
            Ok(job) => self.step(job, delivered).await,
            Err(e) => Err(StageError::bad_message(e)),
        };
        keepalive.abort();
        match step {
            Ok(Step::Done) => {
                let _ = msg.double_ack().await;
            }
            Ok(Step::Later(delay, reason)) => {
                if let Some(reason) = reason {
                    scheduled(reason);
                }
                let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            }
            Ok(Step::Next(job, reason)) => match publish(&self.ctx, &job).await {
                Ok(()) => {
                    scheduled(reason);
                    let _ = msg.double_ack().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, webhook_id = job.webhook_id, "scheduling the next attempt failed; retrying");
                    let _ = msg.ack_with(AckKind::Nak(Some(pagestream_pipeline::consumer::backoff(delivered)))).await;
                }
            },
            Err(err) if err.kind == ErrorKind::Permanent => {
                tracing::error!(error = %err, "an undecodable webhook delivery; dead-lettering");
                let subject = msg.subject.to_string();
                let written =
                    dead_letter(&self.ctx.js, &self.ctx.names, STAGE, &subject, msg.payload.to_vec(), &err, delivered)
                        .await;
                let _ = msg
                    .ack_with(if written.is_ok() { AckKind::Term } else { AckKind::Nak(Some(Duration::from_secs(5))) })
                    .await;
            }
            Err(err) => {
                let delay = pagestream_pipeline::consumer::backoff(delivered);
                tracing::warn!(error = %err, attempt = delivered, ?delay, "webhook delivery step failed; retrying");
                let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            }
        }
    }

    /// One step of a delivery: at most one attempt.
    async fn step(&self, mut job: Job, delivered: i64) -> Result<Step, StageError> {
        let now = now_ms();
        if job.not_before_ms > now {
            return Ok(Step::Later(Duration::from_millis(job.not_before_ms - now), None));
        }
        let doc = job.event.doc_id.clone();
        // The document's event went out: nothing is delivered after it.
        if self.store.record(&doc).await.map_err(StageError::nats)?.is_some() {
            return Ok(Step::Done);
        }
        if let Some(page) = job.event.page {
            if self.store.pages_done(&doc).await.map_err(StageError::nats)?.contains(page) {
                return Ok(Step::Done); // finished by an earlier copy
            }
        } else if job.callback.events == CallbackEvents::Page && !self.pages_finished(&job).await? {
            return Ok(Step::Later(PAGES_POLL, Some("pages_pending")));
        }
        let endpoint = endpoint_of(&job.callback.url);
        let owner = tenant_of(job.owner.as_deref()).to_string();
        let permit = match self.limits.admit(&endpoint, &owner, Instant::now()) {
            Admit::Go(p) => p,
            Admit::Busy => return Ok(Step::Later(busy_delay(delivered), Some("endpoint_busy"))),
            Admit::Open { retry_in, last_error } => {
                let last = last_error.unwrap_or_else(|| ErrorInfo::new("callback_status", "repeated failures"));
                let error = ErrorInfo::new(
                    last.code.clone(),
                    format!(
                        "not attempted: the endpoint's circuit is open after repeated failures (last: {})",
                        last.message
                    ),
                );
                return self.later(job, error, jitter(retry_in) + Duration::from_millis(100), "circuit_open").await;
            }
        };
        let hook = self.hook(&mut job).await?;
        job.first_ms.get_or_insert(now);
        let result = self.sender.attempt(&job.callback.url, &hook).await;
        job.attempts += 1;
        let verdict = match &result {
            Attempt::Retry { error, .. } => Err(error),
            _ => Ok(()),
        };
        if permit.finish(verdict, job.attempts > 1, Instant::now()) {
            tracing::warn!(
                endpoint,
                cooldown_secs = self.cfg.breaker_cooldown_secs,
                "webhook endpoint failing: circuit open, its deliveries wait for the cool-down"
            );
        }
        match result {
            Attempt::Delivered { status } => {
                self.delivered(&job).await?;
                tracing::debug!(
                    doc_id = doc,
                    webhook_id = job.webhook_id,
                    attempts = job.attempts,
                    status,
                    "webhook delivered"
                );
                Ok(Step::Done)
            }
            Attempt::Failed { error } => {
                self.give_up(&job, error).await?;
                Ok(Step::Done)
            }
            Attempt::Retry { error, retry_after } => {
                let delay = retry_after.unwrap_or_else(|| backoff(job.attempts));
                self.later(job, error, delay, "failed").await
            }
        }
    }

    /// Puts a delivery off by `delay` after `error` (an attempt that failed,
    /// or none for an open circuit), or gives it up when that is past its
    /// retry window.
    async fn later(
        &self,
        mut job: Job,
        error: ErrorInfo,
        delay: Duration,
        reason: &'static str,
    ) -> Result<Step, StageError> {
        let now = now_ms();
        let fresh = job.first_ms.is_none();
        let first = *job.first_ms.get_or_insert(now);
        if now + millis(delay) > first + millis(self.retry_for) {
            let took = Duration::from_millis(now.saturating_sub(first));
            let error = ErrorInfo::new(
                error.code.clone(),
                format!("{}; gave up after {} attempts in {:.0} s", error.message, job.attempts, took.as_secs_f32()),
            );
            self.give_up(&job, error).await?;
            return Ok(Step::Done);
        }
        if reason == "circuit_open" && !fresh {
            // Nothing changed in the delivery: its message waits as it is.
            return Ok(Step::Later(delay, Some(reason)));
        }
        job.last_error = Some(error);
        job.not_before_ms = now + millis(delay);
        job.generation += 1;
        Ok(Step::Next(Box::new(job), reason))
    }

    /// The webhook to send (a document's body is built once, then kept).
    async fn hook(&self, job: &mut Job) -> Result<Webhook, StageError> {
        if job.body.is_none() {
            let status = terminal_status(&job.event).unwrap_or(FinalStatus::Completed);
            let hook = self.document_hook(&job.event, status).await?;
            job.body = Some(String::from_utf8_lossy(&hook.body).into_owned());
        }
        let body = Bytes::from(job.body.clone().unwrap_or_default());
        Ok(Webhook { id: job.webhook_id.clone(), kind: job.kind(), body })
    }

    fn took(job: &Job) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(job.first_ms.unwrap_or(job.scheduled_ms)))
    }

    async fn delivered(&self, job: &Job) -> Result<(), StageError> {
        let doc = &job.event.doc_id;
        match job.event.page {
            Some(page) => self.store.page_done(doc, page, false).await.map_err(StageError::nats)?,
            None => {
                let record = self.record(job, "delivered", None);
                self.store.set_record(doc, &record).await.map_err(StageError::nats)?;
                tracing::info!(
                    doc_id = doc,
                    webhook_id = job.webhook_id,
                    attempts = job.attempts,
                    "document webhook delivered"
                );
            }
        }
        count_delivery(job.kind(), true, Self::took(job));
        Ok(())
    }

    fn record(&self, job: &Job, state: &str, error: Option<ErrorInfo>) -> CallbackRecord {
        let status = terminal_status(&job.event).unwrap_or(FinalStatus::Completed);
        CallbackRecord {
            state: state.into(),
            event: format!("document.{}", status.as_str()),
            webhook_id: job.webhook_id.clone(),
            attempts: job.attempts,
            error,
            at: now_rfc3339(),
        }
    }

    /// Gives a delivery up: a dead letter first (the record that cannot be
    /// missed), then the callbacks bucket says so.
    async fn give_up(&self, job: &Job, error: ErrorInfo) -> Result<(), StageError> {
        let doc = &job.event.doc_id;
        let err = StageError::permanent(
            "callback_failed",
            format!("webhook {} to {}: {}: {}", job.webhook_id, job.callback.url, error.code, error.message),
        )
        .doc(doc);
        let payload = serde_json::to_vec(&job.event).unwrap_or_default();
        let subject = self.ctx.names.webhooks(doc);
        dead_letter(&self.ctx.js, &self.ctx.names, STAGE, &subject, payload, &err, i64::from(job.attempts))
            .await
            .map_err(StageError::publish)?;
        match job.event.page {
            Some(page) => self.store.page_done(doc, page, true).await.map_err(StageError::nats)?,
            None => {
                let record = self.record(job, "failed", Some(error.clone()));
                self.store.set_record(doc, &record).await.map_err(StageError::nats)?;
            }
        }
        count_delivery(job.kind(), false, Self::took(job));
        tracing::warn!(doc_id = doc, webhook_id = job.webhook_id, attempts = job.attempts, error = %err, "webhook given up");
        Ok(())
    }

    /// Whether every page of the document with an outcome has its page
    /// event finished, so that its terminal event may go. Pages whose event
    /// the notifier never read, once the events consumer has handled every
    /// event up to the terminal one (they were evicted first), and pages
    /// still unfinished [`PAGES_GRACE`] past the retry window, are recorded
    /// as lost.
    async fn pages_finished(&self, job: &Job) -> Result<bool, StageError> {
        let doc = &job.event.doc_id;
        let (counters, finished) =
            tokio::try_join!(self.ctx.counters.doc(doc), self.store.pages_done(doc)).map_err(StageError::nats)?;
        let mut unfinished: Vec<u32> =
            counters.uploaded.pages().chain(counters.failed.pages()).filter(|p| !finished.contains(*p)).collect();
        unfinished.sort_unstable();
        unfinished.dedup();
        if unfinished.is_empty() {
            return Ok(true);
        }
        if now_ms() > job.scheduled_ms + millis(self.retry_for + PAGES_GRACE) {
            self.lost(job, &unfinished, "were still unfinished well past the retry window").await?;
            return Ok(true);
        }
        let seen = self.store.pages_seen(doc).await.map_err(StageError::nats)?;
        if unfinished.iter().any(|p| seen.contains(*p)) {
            return Ok(false); // scheduled, not finished yet
        }
        if self.events_read_through(job.event_seq).await? {
            self.lost(job, &unfinished, "were never read by the notifier (evicted from the events stream first)")
                .await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether the events consumer has handled every event up to stream
    /// sequence `seq` (its ack floor is there).
    async fn events_read_through(&self, seq: u64) -> Result<bool, StageError> {
        let stream = self.ctx.js.get_stream(self.ctx.names.events_stream()).await.map_err(StageError::nats)?;
        let info = stream.consumer_info("notifier").await.map_err(StageError::nats)?;
        Ok(info.ack_floor.stream_sequence >= seq)
    }

    /// Records page events that will never be delivered: a dead letter,
    /// then each page lost (and failed) in the callbacks bucket.
    async fn lost(&self, job: &Job, pages: &[u32], why: &str) -> Result<(), StageError> {
        let doc = &job.event.doc_id;
        let err = StageError::permanent(
            "callback_lost",
            format!(
                "page events of pages {pages:?} of document {doc} {why}; their webhooks to {} were not sent",
                job.callback.url
            ),
        )
        .doc(doc);
        let payload = serde_json::to_vec(&job.event).unwrap_or_default();
        let subject = self.ctx.names.webhooks(doc);
        dead_letter(&self.ctx.js, &self.ctx.names, STAGE, &subject, payload, &err, 1)
            .await
            .map_err(StageError::publish)?;
        for page in pages {
            self.store.page_lost(doc, *page).await.map_err(StageError::nats)?;
        }
        metrics::counter!("pagestream_webhook_events_lost_total").increment(pages.len() as u64);
        tracing::error!(doc_id = doc, pages = ?pages, error = %err, "page webhooks lost");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_deliveries_back_off_from_a_quarter_second_to_eight() {
        for (delivered, ms) in [(1, 250u64), (2, 500), (6, 8000), (60, 8000)] {
            let d = busy_delay(delivered).as_millis() as u64;
            assert!(d >= ms * 8 / 10 && d <= ms * 12 / 10, "{delivered}: {d} ms");
        }
    }

    #[test]
    fn message_ids_deduplicate_one_terminal_delivery_per_document() {
        let ev: Event = serde_json::from_value(serde_json::json!({
            "v": 1, "doc_id": "d1", "stage": "uploader", "state": "completed", "at": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        let cb = Callback { url: "http://x/h".into(), events: CallbackEvents::Page };
        let mut job = Job::new(ev.clone(), cb.clone(), None, "msg_d1_completed".into(), None, 7);
        assert_eq!(job.msg_id(), "d1.document.0");
        job.generation = 3;
        assert_eq!(job.msg_id(), "d1.document.3");
        let mut page = ev;
        page.page = Some(4);
        let job = Job::new(page, cb, None, "msg_d1_p4_uploaded".into(), Some("{}".into()), 8);
        assert_eq!((job.msg_id().as_str(), job.kind()), ("msg_d1_p4_uploaded.0", "page"));
        let back: Job = serde_json::from_slice(&serde_json::to_vec(&job).unwrap()).unwrap();
        assert_eq!((back.event_seq, back.body.as_deref()), (8, Some("{}")));
    }
}
