//! The one consumer loop every transform and sink uses: fetch → handle →
//! ack / nak-with-delay / term + dead letter → metrics.
//!
//! Rules: a message is acked only after its handler returned `Ok`, which
//! handlers do only once their outputs are durable (PubAck received, object
//! written). A transient error naks with an exponential delay until
//! `max_deliver` is reached; then, like a permanent error, the message is
//! dead-lettered with its original payload and terminated. Long handlers
//! keep their message alive with in-progress acks.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use pagestream_schemas::{encode, DeadLetter, DecodeError, Message, DEAD_LETTER_PAYLOAD_MAX, VERSION};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use crate::error::{error_reference, transient, ErrorKind, StageError};
use crate::metrics::Metrics;
use crate::nats::Names;
use crate::stage::StageContext;
use crate::util::now_rfc3339;

/// How long a deferred message waits before it is delivered again.
pub const DEFER_DELAY: Duration = Duration::from_secs(1);

/// What every message task of one consumer loop shares.
struct LoopState {
    ack_wait: Duration,
    deferred: std::sync::Mutex<Deferred>,
}

/// Stream sequences of messages this process deferred, so that their
/// redelivery is not reported as a retry (bounded: oldest forgotten first).
#[derive(Default)]
struct Deferred {
    seqs: std::collections::VecDeque<u64>,
}

impl Deferred {
    const MAX: usize = 4096;
    fn insert(&mut self, seq: u64) {
        if self.seqs.len() == Self::MAX {
            self.seqs.pop_front();
        }
        self.seqs.push_back(seq);
    }
    fn take(&mut self, seq: u64) -> bool {
        match self.seqs.iter().position(|s| *s == seq) {
            Some(i) => {
                self.seqs.remove(i);
                true
            }
            None => false,
        }
    }
}

/// One delivery of a message, besides its decoded payload.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subject: String,
    /// 1 for the first delivery.
    pub delivered: i64,
    pub stream_sequence: u64,
}

/// What a consumer decodes each message into, once, before its handler
/// runs: a message type of the public schema, or an enum of several that
/// one consumer reads (told apart by subject).
pub trait Input: Sized + Send + 'static {
    fn decode(names: &Names, delivery: &Delivery, payload: &[u8]) -> Result<Self, DecodeError>;
    /// The document the message is about (errors and dead letters name it).
    fn doc_id(&self) -> Option<&str>;
    /// The page the message is about, for a page message (its span and log lines name it).
    fn page(&self) -> Option<u32> {
        None
    }
}

impl<M: Message + Send + 'static> Input for M {
    fn decode(_: &Names, _: &Delivery, payload: &[u8]) -> Result<Self, DecodeError> {
        pagestream_schemas::decode(payload)
    }
    fn doc_id(&self) -> Option<&str> {
        Message::doc_id(self)
    }
    fn page(&self) -> Option<u32> {
        Message::page(self)
    }
}

/// What a stage does with one message.
pub trait Handler: Send + Sync + 'static {
    /// The message(s) this handler consumes.
    type Input: Input;

    /// Handles one decoded message. Errors are tagged with the message's
    /// document by the loop.
    fn handle(&self, input: Self::Input, delivery: &Delivery) -> impl Future<Output = Result<(), StageError>> + Send;

    /// A payload that does not decode as [`Handler::Input`]: `err` (a
    /// permanent `bad_message`) is dead-lettered. A stage may first tell the
    /// document's publisher (the splitter fails the document it names).
    /// Returns the error to act on (a transient one retries the message).
    fn undecodable(
        &self,
        payload: &[u8],
        delivery: &Delivery,
        err: StageError,
    ) -> impl Future<Output = StageError> + Send {
        let _ = (payload, delivery);
        async { err }
    }

    /// Called once when a message's retries are exhausted (after its dead
    /// letter is written): report the page or document as failed so the
    /// user sees an outcome. Permanent errors are reported by `handle` itself.
    fn give_up(
        &self,
        input: Self::Input,
        delivery: &Delivery,
        err: &StageError,
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        let _ = (input, delivery, err);
        async { Ok(()) }
    }
}

/// Where and how a stage consumes. The durable consumer itself is
/// provisioned from `nats/` (see [`crate::provision::provision`]).
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Stage name for metrics, logs and the dead-letter subject.
    pub stage: &'static str,
    pub stream: String,
    pub durable: String,
    /// Messages handled at the same time.
    pub concurrency: usize,
    pub max_deliver: i64,
}

impl ConsumerSpec {
    /// `stage` consuming `stream` through `durable`, `concurrency` messages
    /// at a time, with the configured `nats.max_deliver`.
    pub fn new(ctx: &StageContext, stage: &'static str, stream: String, durable: String, concurrency: usize) -> Self {
        ConsumerSpec { stage, stream, durable, concurrency, max_deliver: ctx.config.nats.max_deliver }
    }

    /// Runs `handler` on this consumer until `shutdown` (see [`run`]).
    pub async fn run<H: Handler>(self, ctx: &StageContext, handler: Arc<H>, shutdown: CancellationToken) -> Result<()> {
        run(ctx.js.clone(), ctx.names.clone(), self, handler, ctx.metrics.clone(), shutdown).await
    }
}

/// Handles messages that a stage pulls with a loop of its own (the
/// splitter's per-tenant scheduler) exactly as [`run`] handles the ones it
/// pulls: decode once, in-progress acks, ack / nak with back-off / defer /
/// dead letter, metrics.
pub struct Processor<H> {
    js: jetstream::Context,
    names: Names,
    spec: ConsumerSpec,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    state: LoopState,
}

impl<H: Handler> Processor<H> {
    /// `ack_wait`: the consumers' ack wait (in-progress acks every third of it).
    pub fn new(ctx: &StageContext, spec: ConsumerSpec, handler: Arc<H>, ack_wait: Duration) -> Self {
        let state = LoopState { ack_wait, deferred: std::sync::Mutex::default() };
        Processor { js: ctx.js.clone(), names: ctx.names.clone(), spec, handler, metrics: ctx.metrics.clone(), state }
    }

    /// Handles one message and acks, naks or dead-letters it.
    pub async fn process(&self, msg: jetstream::Message) {
        process(&self.js, &self.names, &self.spec, self.handler.as_ref(), &self.metrics, msg, &self.state).await
    }
}

/// How long one pull request waits on the server for messages. Short, so
/// that a shutdown, which drains the open request, is quick; an idle stage
/// then sends one small request every 2 s.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// Runs the loop until `shutdown` is cancelled, then waits for in-flight
/// messages (they finish and are acked; nothing is cut).
pub async fn run<H: Handler>(
    js: jetstream::Context,
    names: Names,
    spec: ConsumerSpec,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    // Provisioned a moment ago: in a cluster its replicas may not have
    // elected a leader yet (see `retry_transient`).
    let what = format!("consumer {} on {}", spec.durable, spec.stream);
    let consumer: jetstream::consumer::PullConsumer = crate::nats::retry_transient(&what, || async {
        let stream = js.get_stream(&spec.stream).await.with_context(|| format!("stream {}", spec.stream))?;
        stream.get_consumer(&spec.durable).await.map_err(|e| anyhow::anyhow!("{what}: {e}"))
    })
    .await?;
    let ack_wait = consumer.cached_info().config.ack_wait;
    let lag = tokio::spawn(report_queue(consumer.clone(), spec.clone(), metrics.clone(), shutdown.clone()));
    let state = Arc::new(LoopState { ack_wait, deferred: std::sync::Mutex::default() });
    let concurrency = spec.concurrency.max(1);
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    tracing::info!(stage = spec.stage, stream = %spec.stream, consumer = %spec.durable, "consuming");
    // Pull in batches of exactly as many messages as there are free workers:
    // every message received starts at once (so none idles towards its ack
    // deadline in a local buffer), and nothing is pulled that cannot be
    // handled — backpressure without an in-memory queue.
    // Consecutive failed pulls: while a node is down or a consumer leader is
    // being elected, every pull fails at once (503); without a pause the
    // loop would spin (and log) tens of thousands of times a second.
    let mut pull_failures: u32 = 0;
    'pull: loop {
        if pull_failures > 0 {
            let pause = pull_backoff(pull_failures);
            tokio::select! {
                _ = shutdown.cancelled() => break 'pull,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        let first = tokio::select! {
            // Biased: with a free permit both branches are ready, and an
            // unbiased select would go on pulling after shutdown half the time.
            biased;
            _ = shutdown.cancelled() => break 'pull,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        while tasks.try_join_next().is_some() {}
        let mut free = vec![first];
        while let Ok(p) = permits.clone().try_acquire_owned() {
            free.push(p);
        }
        let pulled_at = tokio::time::Instant::now();
        let batch = consumer.batch().max_messages(free.len()).expires(PULL_EXPIRES).messages().await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                pull_failures += 1;
                log_pull_failure(spec.stage, pull_failures, &e);
                continue 'pull;
            }
        };
        loop {
            // The open pull request is drained even during shutdown (it
            // expires within 5 s): a message the server already sent is
            // handled and acked now rather than redelivered after its ack wait.
            // The client library falls back to its own timer (expiry + 10 s)
            // when the server's 408 goes missing; once shutting down we stop
            // listening when the server-side expiry has surely passed.
            let drain_deadline = pulled_at + PULL_EXPIRES + Duration::from_millis(500);
            let next = tokio::select! {
                n = batch.next() => n,
                _ = async {
                    shutdown.cancelled().await;
                    tokio::time::sleep_until(drain_deadline).await;
                } => None,
            };
            let msg = match next {
                Some(Ok(m)) => {
                    pull_failures = 0;
                    m
                }
                Some(Err(e)) => {
                    pull_failures += 1;
                    log_pull_failure(spec.stage, pull_failures, &e);
                    break;
                }
                None => {
                    pull_failures = 0; // the request ended normally
                    break;
                }
            };
            let Some(permit) = free.pop() else {
                // Cannot happen: the batch asks for as many messages as permits.
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                continue;
            };
            let ctx = (js.clone(), names.clone(), spec.clone(), handler.clone(), metrics.clone(), state.clone());
            tasks.spawn(async move {
                let (js, names, spec, handler, metrics, state) = ctx;
                process(&js, &names, &spec, handler.as_ref(), &metrics, msg, &state).await;
                drop(permit);
            });
        }
    }
    tracing::info!(stage = spec.stage, in_flight = tasks.len(), "stopping: finishing in-flight messages");
    while tasks.join_next().await.is_some() {}
    lag.abort();
    Ok(())
}

/// The pause before pull number `failures + 1` after `failures` failed in a
/// row: 100 ms doubling to 2 s.
/// Keeps `msg` alive with in-progress acks every third of `ack_wait` while
/// a handler works; abort the task when done.
pub fn keep_alive(msg: &jetstream::Message, ack_wait: Duration) -> tokio::task::JoinHandle<()> {
    let msg = msg.clone();
    let every = (ack_wait / 3).max(Duration::from_millis(500));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if msg.ack_with(AckKind::Progress).await.is_err() {
                break;
            }
        }
    })
}

/// Pause before pulling again after `failures` failed pulls in a row.
pub fn pull_backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(2))
}

/// A warning for the first failure of a streak and every 30th after it
/// (about once a minute at the longest pause); the others at debug level.
pub fn log_pull_failure(stage: &str, failures: u32, error: &dyn std::fmt::Display) {
    if failures == 1 || failures.is_multiple_of(30) {
        tracing::warn!(stage, failures, error = %error, "pulling messages failed; retrying with back-off");
    } else {
        tracing::debug!(stage, failures, error = %error, "pulling messages failed");
    }
}

/// How often a consumer loop publishes its queue's lag.
pub const QUEUE_REPORT_EVERY: Duration = Duration::from_secs(5);

/// Publishes the consumer's lag (`pagestream_queue_pending`,
/// `…_ack_pending`, `…_redelivered`) every [`QUEUE_REPORT_EVERY`], so any
/// autoscaler can scale the stage on its own metrics.
async fn report_queue(
    mut consumer: jetstream::consumer::PullConsumer,
    spec: ConsumerSpec,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        match consumer.info().await {
            Ok(info) => {
                metrics.queue(spec.stage, &spec.durable, info.num_pending, info.num_ack_pending, info.num_redelivered)
            }
            Err(e) => tracing::debug!(stage = spec.stage, error = %e, "reading the consumer's lag failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(QUEUE_REPORT_EVERY) => {}
        }
    }
}

async fn process<H: Handler>(
    js: &jetstream::Context,
    names: &Names,
    spec: &ConsumerSpec,
    handler: &H,
    metrics: &Metrics,
    msg: jetstream::Message,
    state: &LoopState,
) {
    let (ack_wait, deferred) = (state.ack_wait, &state.deferred);
    let started = Instant::now();
    let _in_flight = metrics.in_flight(spec.stage);
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    if delivered == 1 {
        // Stored at `published`, received now: this stage's queue latency.
        if let Ok(waited) = msg.info().map(|i| time::OffsetDateTime::now_utc() - i.published) {
            metrics.observe_queue_wait(spec.stage, Duration::try_from(waited).unwrap_or_default());
        }
    }
    if delivered > 1 && deferred.lock().expect("deferred set").take(seq) {
        tracing::debug!(stage = spec.stage, subject = %msg.subject, attempt = delivered, "handling a deferred message again");
    } else if delivered > 1 {
        tracing::info!(stage = spec.stage, subject = %msg.subject, attempt = delivered, "handling a redelivered message");
        metrics.message(spec.stage, "redelivered");
    }
    // Keep the message alive while a slow handler works.
    let keepalive = keep_alive(&msg, ack_wait);
    let delivery = Delivery { subject: msg.subject.to_string(), delivered, stream_sequence: seq };
    // One span per message, a child of its publisher's (the trace context
    // in its headers): log lines inside carry the stage, document and page.
    let span = tracing::info_span!(
        "message",
        otel.name = spec.stage,
        otel.kind = "consumer",
        stage = spec.stage,
        doc_id = tracing::field::Empty,
        page = tracing::field::Empty,
        attempt = delivered,
    );
    crate::telemetry::continue_from(&span, msg.headers.as_ref());
    // Decoded once; the handler gets the typed message.
    let result = match H::Input::decode(names, &delivery, &msg.payload) {
        Ok(input) => {
            let doc_id = input.doc_id().map(str::to_string);
            if let Some(d) = &doc_id {
                span.record("doc_id", d.as_str());
            }
            if let Some(p) = input.page() {
                span.record("page", p);
            }
            let result = handler.handle(input, &delivery).instrument(span.clone()).await;
            result.map_err(|e| match &doc_id {
                Some(d) => e.or_doc(d),
                None => e,
            })
        }
        Err(e) => {
            Err(handler.undecodable(&msg.payload, &delivery, StageError::bad_message(e)).instrument(span.clone()).await)
        }
    };
    keepalive.abort();
    metrics.observe_handling(spec.stage, started.elapsed());

    let outcome = match result {
        Ok(()) => match msg.double_ack().await {
            Ok(()) => "ack",
            Err(e) => {
                // The work is done and idempotent; a redelivery only repeats it.
                tracing::warn!(stage = spec.stage, error = %e, "ack not confirmed; message may be redelivered");
                "ack_unconfirmed"
            }
        },
        Err(err) if err.kind == ErrorKind::Deferred && delivered < spec.max_deliver => {
            tracing::debug!(stage = spec.stage, subject = %msg.subject, attempt = delivered, reason = %err, "deferred");
            deferred.lock().expect("deferred set").insert(seq);
            let _ = msg.ack_with(AckKind::Nak(Some(DEFER_DELAY))).await;
            "deferred"
        }
        Err(err) if err.kind == ErrorKind::Transient && delivered < spec.max_deliver => {
            let delay = backoff(delivered);
            tracing::warn!(stage = spec.stage, subject = %msg.subject, attempt = delivered, error = %err, ?delay, "transient failure; will retry");
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            "nak"
        }
        Err(err) => {
            if err.kind == ErrorKind::Permanent {
                // Bad input: the user's problem, reported to them; not an outage.
                tracing::warn!(stage = spec.stage, subject = %msg.subject, doc_id = ?err.doc_id, error = %err, "permanent failure; dead-lettering");
            } else {
                tracing::error!(stage = spec.stage, subject = %msg.subject, attempt = delivered, error = %err, "retries exhausted; dead-lettering");
            }
            match dead_letter(js, names, spec.stage, &msg.subject, msg.payload.to_vec(), &err, delivered).await {
                Ok(()) => {
                    // A transient failure decoded; decoding again is cheaper
                    // than keeping a copy of every message for this rare path.
                    let input = H::Input::decode(names, &delivery, &msg.payload);
                    if let (ErrorKind::Transient, Ok(input)) = (err.kind, input) {
                        if let Err(e) = handler.give_up(input, &delivery, &err).await {
                            tracing::error!(stage = spec.stage, error = %e, "could not report the failure downstream");
                        }
                    }
                    let _ = msg.ack_with(AckKind::Term).await;
                    "dead_letter"
                }
                Err(e) => {
                    // Without a dead-letter record we must not drop the message.
                    tracing::error!(stage = spec.stage, error = %e, "dead-letter publish failed; nak");
                    let _ = msg.ack_with(AckKind::Nak(Some(backoff(delivered)))).await;
                    "nak"
                }
            }
        }
    };
    metrics.message(spec.stage, outcome);
}

/// 0.5 s, 1 s, 2 s, … capped at 30 s.
pub fn backoff(delivered: i64) -> Duration {
    let exp = delivered.clamp(1, 7) as u32 - 1;
    Duration::from_millis(500 * 2u64.pow(exp)).min(Duration::from_secs(30))
}

/// Publishes a [`DeadLetter`] record and waits for its PubAck.
pub async fn dead_letter(
    js: &jetstream::Context,
    names: &Names,
    stage: &str,
    subject: &str,
    payload: Vec<u8>,
    err: &StageError,
    attempts: i64,
) -> Result<()> {
    let payload = pagestream_schemas::without_passwords(&payload);
    let original = payload.len();
    let (payload, payload_bytes) = if original > DEAD_LETTER_PAYLOAD_MAX {
        (payload[..DEAD_LETTER_PAYLOAD_MAX].to_vec(), Some(original as u64))
    } else {
        (payload, None)
    };
    let record = DeadLetter {
        v: VERSION,
        payload_bytes,
        stage: stage.to_string(),
        subject: subject.to_string(),
        doc_id: err.doc_id.clone(),
        error: err.detail(),
        attempts: attempts.max(1) as u64,
        payload: serde_bytes::ByteBuf::from(payload),
        at: now_rfc3339(),
    };
    js.publish(names.dlq(stage), encode(&record).into()).await?.await.context("dead-letter PubAck")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_backoff_grows_from_100_ms_to_2_s() {
        let ms: Vec<u128> = (1..=8).map(|n| pull_backoff(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(pull_backoff(u32::MAX).as_millis(), 2000);
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(100), Duration::from_secs(30));
    }
}
