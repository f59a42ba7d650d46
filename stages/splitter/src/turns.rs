//! Fair share between tenants: the splitter's work queues per tenant and
//! the loop that picks whose work runs next.
//!
//! Turns travel on `<p>.turns.<tenant>` (stream `<P>_TURNS`),
//! documents to fetch on `<p>.fetch.<tenant>` (`<P>_FETCH`); each tenant has
//! a durable consumer per queue, created when it first has work and removed
//! by the server after an hour unused, shared by every splitter replica.
//! [`Scheduler::run`] reads how many messages each tenant has waiting (one
//! stream-info request), orders the tenants by stride scheduling ([`Fair`]:
//! each pick advances the tenant's pass by `1 / weight`; a tenant that was
//! idle starts level with the last one served, so nobody banks credit) and
//! pulls one message from the first tenant that has one ready. Within a
//! tenant its consumer is one queue in arrival order, whatever the priority
//! (which sets how much a turn renders, not when it comes): documents share
//! the tenant's turns as they shared the whole splitter before. (Turns
//! queued by a splitter from before this subject lost its priority token,
//! `<p>.turns.<tenant>.<priority>`, are taken by the same consumer.) Everything lives in JetStream, so a crash or a
//! second replica changes nothing but who handles the next message.
//!
//! `docs.submitted` stays the public subject: [`Admission`] moves each
//! submission (after the same contract checks as before) onto its tenant's
//! queue.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::{StreamExt as _, TryStreamExt as _};
use pagestream_pipeline::consumer::{ConsumerSpec, Delivery, Handler, Processor, StageError};
use pagestream_pipeline::nats::{render_definitions, Names};
use pagestream_pipeline::progress::DocState;
use pagestream_pipeline::tenants::ANONYMOUS;
use pagestream_pipeline::StageContext;
use pagestream_schemas::{peek_doc_id, DocumentSubmitted, Priority};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{Splitter, STAGE};

const DEFINITIONS: &str = include_str!("../../../nats/splitter.json");

/// The tenant key of a document's owner: its owner id (16 lowercase hex
/// characters, as the ingress sets it), else [`ANONYMOUS`].
pub fn tenant_key(owner: Option<&str>) -> &str {
    match owner {
        Some(o) if o.len() == 16 && o.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => o,
        _ => ANONYMOUS,
    }
}

/// The owner a tenant key stands for (`None`: anonymous).
fn owner_of(tenant: &str) -> Option<&str> {
    (tenant != ANONYMOUS).then_some(tenant)
}

#[derive(Deserialize)]
struct ConsumerDef {
    config: jetstream::consumer::pull::Config,
}

/// The per-tenant consumer templates of `nats/splitter.json` (its streams
/// are provisioned by [`provision`]).
#[derive(Deserialize)]
struct Definitions {
    tenant_consumers: BTreeMap<String, ConsumerDef>,
}

fn definitions(ctx: &StageContext, tenant: &str) -> Result<Definitions> {
    let text = render_definitions(DEFINITIONS, &ctx.names, &ctx.config.nats).replace("{tenant}", tenant);
    serde_json::from_str(&text).context("nats/splitter.json is invalid")
}

/// Creates or updates the splitter's own streams (turns, fetches, parked
/// documents) from `nats/splitter.json` (idempotent, like every stage's
/// provisioning).
pub async fn provision(ctx: &StageContext) -> Result<()> {
    let text = render_definitions(DEFINITIONS, &ctx.names, &ctx.config.nats);
    pagestream_pipeline::nats::provision_definitions(&ctx.js, &ctx.names, "nats/splitter.json", &text).await
}

/// Stride scheduling between tenants with work waiting.
#[derive(Debug, Default)]
pub struct Fair {
    pass: HashMap<String, u64>,
    /// The pass of the tenant served last (virtual time).
    now: u64,
}

const STRIDE: u64 = 1_000_000;

impl Fair {
    /// The tenants of `waiting` (tenant → weight) in the order to try:
    /// lowest pass first, ties by name. A tenant that was idle starts at
    /// the current virtual time.
    pub fn order(&mut self, waiting: &BTreeMap<String, u32>) -> Vec<String> {
        let now = self.now;
        // Forget idle tenants that could not be behind anyway.
        self.pass.retain(|t, p| waiting.contains_key(t) || *p > now);
        let mut order: Vec<(u64, String)> = waiting
            .keys()
            .map(|t| {
                let p = self.pass.entry(t.clone()).or_insert(now);
                *p = (*p).max(now);
                (*p, t.clone())
            })
            .collect();
        order.sort();
        order.into_iter().map(|(_, t)| t).collect()
    }

    /// `tenant` got one unit of work.
    pub fn charge(&mut self, tenant: &str, weight: u32) {
        let p = self.pass.entry(tenant.to_string()).or_insert(self.now);
        self.now = self.now.max(*p);
        *p += STRIDE / u64::from(weight.max(1));
    }
}

/// The tenants with messages waiting on a queue, from its stream's
/// per-subject counts (`<prefix><tenant>.<…>` → messages), each with its
/// weight (`weight`); tenants at their cap (`busy`) and those with nothing
/// waiting are left out. Also the messages of every tenant together.
pub fn waiting_tenants(
    counts: &[(String, u64)],
    prefix: &str,
    busy: &[String],
    weight: impl Fn(&str) -> u32,
) -> (BTreeMap<String, u32>, u64) {
    let mut waiting = BTreeMap::new();
    let mut total = 0;
    for (subject, n) in counts {
        total += n;
        let Some(tenant) = subject.strip_prefix(prefix).and_then(|r| r.split('.').next()) else { continue };
        if *n > 0 && !busy.iter().any(|b| b == tenant) {
            waiting.insert(tenant.to_string(), weight(tenant));
        }
    }
    (waiting, total)
}

/// The tenants with `per_tenant` messages in flight in this process (0: no
/// cap, none).
pub fn at_cap(active: &HashMap<String, usize>, per_tenant: usize) -> Vec<String> {
    active.iter().filter(|(_, n)| per_tenant > 0 && **n >= per_tenant).map(|(t, _)| t.clone()).collect()
}

/// One message of `tenant` is done: its count goes down (and away at 0).
fn release(active: &mut HashMap<String, usize>, tenant: &str) {
    if let Some(n) = active.get_mut(tenant) {
        *n -= 1;
        if *n == 0 {
            active.remove(tenant);
        }
    }
}

/// How long the pulling loop waits for work, after handling a message…
const IDLE_AFTER_WORK: Duration = Duration::from_millis(20);
/// …after a failure to read the queues…
const IDLE_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// …after this process queued work…
const IDLE_AFTER_WAKE: Duration = Duration::from_millis(10);
/// …and at most, doubling while there is none.
const IDLE_MAX: Duration = Duration::from_millis(250);

/// The wait after `idle` found nothing: twice as long, up to [`IDLE_MAX`].
fn next_idle(idle: Duration) -> Duration {
    (idle * 2).min(IDLE_MAX)
}

/// The message id of a turn of `doc_id` starting at `start_page` (`None`:
/// the submission's first turn), the same in every replica, so that a
/// redelivered message queues its turn once.
pub fn turn_id(doc_id: &str, start_page: Option<u32>) -> String {
    match start_page {
        None => format!("{doc_id}:submitted"),
        Some(n) => format!("{doc_id}:split:{n}"),
    }
}

/// One turn of a document, planned from where it starts and its priority:
/// the pages it renders and its bound on pages in flight. The priority
/// scales both (`Priority::scale`); nothing else about a turn depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnPlan {
    /// First page (1-based).
    pub start: u32,
    /// Last page, if the document has that many.
    pub end: u32,
    /// The document's pages rendered and not yet finished, at most.
    pub in_flight_limit: u32,
}

impl TurnPlan {
    /// The turn starting at `start_page` (`None`: the first), with
    /// `splitter.chunk_pages` and `splitter.doc_pages_in_flight` (both at
    /// least 2, `Config::validate`) scaled by `priority`.
    pub fn new(start_page: Option<u32>, priority: Priority, chunk_pages: u32, doc_pages_in_flight: u32) -> TurnPlan {
        let start = start_page.unwrap_or(1).max(1);
        TurnPlan {
            start,
            end: start.saturating_add(priority.scale(chunk_pages).saturating_sub(1)),
            in_flight_limit: priority.scale(doc_pages_in_flight),
        }
    }

    /// The pages this turn renders.
    pub fn pages(&self) -> RangeInclusive<u32> {
        self.start..=self.end
    }

    /// Where the next turn starts, once the document's page count is known
    /// (`None`: this turn is its last).
    pub fn next_start(&self, page_count: u32) -> Option<u32> {
        (self.end < page_count).then(|| self.end + 1)
    }
}

/// Whether a turn may render its next page: the document has fewer than
/// `limit` pages in flight and, with a tenant limit
/// (`tenants.max_pages_in_flight`: `(pages in flight, limit)`), so has the
/// tenant.
pub fn has_room(doc_in_flight: u32, limit: u32, tenant: Option<(u32, u32)>) -> bool {
    doc_in_flight < limit && tenant.is_none_or(|(in_flight, max)| in_flight < max)
}

/// What a turn does when no live inferencer serves its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoModel {
    /// The document fails (`model_unavailable`): it did not ask to wait.
    Fail,
    /// The turn is parked until the model is live; `announce`: the document
    /// is made visible as queued for its model first.
    Park { announce: bool },
}

/// The decision for a turn starting at `start` whose model no live
/// inferencer serves. `state` is the document's state (read for a first
/// turn only: a later one passes `None`); `wait`: the document waits for
/// its model (`wait_for_model`, or the default model).
///
/// A document that has not started (first turn, no state or `queued`)
/// fails unless it waits; a started one always waits (its model went away
/// mid-document).
pub fn without_model(start: u32, state: Option<DocState>, wait: bool) -> NoModel {
    let fresh = start == 1 && state.is_none_or(|s| s == DocState::Queued);
    if fresh && !wait {
        NoModel::Fail
    } else {
        NoModel::Park { announce: fresh }
    }
}

/// One kind of per-tenant work queue and its fair-share pulling loop.
pub struct Scheduler {
    /// `turns` or `fetch` (a key of `tenant_consumers` in `nats/splitter.json`).
    pub kind: &'static str,
    pub stream: String,
    /// Subject prefix before the tenant token: `<p>.turns.` / `<p>.fetch.`.
    pub subject_prefix: String,
    pub concurrency: usize,
    /// Messages of one tenant handled at once by this process (0: no cap).
    pub per_tenant: usize,
    /// Signalled when this process queues work here: an idle loop looks at
    /// once instead of at its next poll (up to 250 ms later).
    pub wake: Arc<tokio::sync::Notify>,
}

impl Scheduler {
    /// Pulls and handles messages until `shutdown`, then waits for the ones
    /// in flight.
    pub async fn run<H: Handler>(self, ctx: StageContext, handler: Arc<H>, shutdown: CancellationToken) -> Result<()> {
        let stream = ctx.js.get_stream(&self.stream).await.with_context(|| format!("stream {}", self.stream))?;
        let spec = ConsumerSpec::new(&ctx, STAGE, self.stream.clone(), self.kind.into(), self.concurrency);
        let ack_wait = Duration::from_secs(ctx.config.nats.ack_wait_secs);
        let processor = Arc::new(Processor::new(&ctx, spec, handler, ack_wait));
        let permits = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let active: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let mut consumers: HashMap<String, PullConsumer> = HashMap::new();
        let mut fair = Fair::default();
        let mut tasks = JoinSet::new();
        let mut idle = IDLE_AFTER_WORK;
        let mut failures = 0u32;
        tracing::info!(stage = STAGE, stream = %self.stream, kind = self.kind, "consuming per tenant");
        loop {
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            while tasks.try_join_next().is_some() {}
            let busy = at_cap(&active.lock().expect("active tenants"), self.per_tenant);
            match self.next(&ctx, &stream, &mut consumers, &mut fair, &busy).await {
                Ok(Some((tenant, msg))) => {
                    failures = 0;
                    idle = IDLE_AFTER_WORK;
                    *active.lock().expect("active tenants").entry(tenant.clone()).or_default() += 1;
                    let (processor, active) = (processor.clone(), active.clone());
                    tasks.spawn(async move {
                        processor.process(msg).await;
                        release(&mut active.lock().expect("active tenants"), &tenant);
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    failures += 1;
                    let error = format!("{} queues: {e:#}", self.kind);
                    pagestream_pipeline::consumer::log_pull_failure(STAGE, failures, &error);
                    idle = IDLE_AFTER_FAILURE;
                }
            }
            drop(permit);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                // A message handled here frees a permit: look again at once.
                _ = tasks.join_next(), if !tasks.is_empty() => {}
                _ = self.wake.notified() => {
                    idle = IDLE_AFTER_WAKE;
                }
                _ = tokio::time::sleep(idle) => {}
            }
            idle = next_idle(idle);
        }
        tracing::info!(
            stage = STAGE,
            kind = self.kind,
            in_flight = tasks.len(),
            "stopping: finishing in-flight messages"
        );
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// The next message by fair share, with its tenant (`None`: nothing is
    /// ready for a tenant under its cap).
    async fn next(
        &self,
        ctx: &StageContext,
        stream: &jetstream::stream::Stream,
        consumers: &mut HashMap<String, PullConsumer>,
        fair: &mut Fair,
        busy: &[String],
    ) -> Result<Option<(String, jetstream::Message)>> {
        let mut info = stream.info_with_subjects(format!("{}>", self.subject_prefix)).await?;
        let mut counts = Vec::new();
        while let Some((subject, n)) = info.try_next().await? {
            counts.push((subject, n as u64));
        }
        let weight = |tenant: &str| ctx.config.tenants.limits_for(owner_of(tenant)).weight;
        let (waiting, total) = waiting_tenants(&counts, &self.subject_prefix, busy, weight);
        // Messages waiting or in flight, every tenant together (the
        // per-tenant consumers are many; this is the splitter's queue).
        ctx.metrics.queue(STAGE, self.kind, total, 0, 0);
        for tenant in fair.order(&waiting) {
            let consumer = match consumers.get(&tenant) {
                Some(c) => c.clone(),
                None => {
                    let def = definitions(ctx, &tenant)?
                        .tenant_consumers
                        .remove(self.kind)
                        .with_context(|| format!("nats/splitter.json has no {} tenant consumer", self.kind))?;
                    let c: PullConsumer = stream
                        .create_consumer(def.config)
                        .await
                        .with_context(|| format!("creating the {} consumer of tenant {tenant}", self.kind))?;
                    consumers.insert(tenant.clone(), c.clone());
                    c
                }
            };
            let got = match consumer.fetch().max_messages(1).messages().await {
                Ok(mut batch) => batch.next().await,
                Err(e) => {
                    // Removed after an hour unused, or the server moved it:
                    // made again on the next round.
                    tracing::debug!(tenant, error = %e, "pulling a tenant's consumer failed");
                    consumers.remove(&tenant);
                    continue;
                }
            };
            match got {
                Some(Ok(msg)) => {
                    fair.charge(&tenant, waiting[&tenant]);
                    return Ok(Some((tenant, msg)));
                }
                Some(Err(e)) => {
                    tracing::debug!(tenant, error = %e, "pulling a tenant's consumer failed");
                    consumers.remove(&tenant);
                }
                // Its waiting messages are in flight or waiting for redelivery.
                None => {}
            }
        }
        Ok(None)
    }
}

/// The `splitter` consumer of `docs.submitted` (and of `docs.split.*` left
/// by a splitter before per-tenant queues): each document goes onto its
/// tenant's turn queue.
pub struct Admission(pub Arc<Splitter>);

impl Handler for Admission {
    type Input = DocumentSubmitted;

    async fn handle(&self, sub: DocumentSubmitted, delivery: &Delivery) -> Result<(), StageError> {
        let s = &self.0;
        if sub.start_page.is_some() && delivery.subject == s.ctx.names.docs_submitted() {
            let err = StageError::bad_message(
                "start_page is set by the splitter only (on its turn queues); a submission must leave it unset",
            );
            return Err(s.refuse(&sub.doc_id, Some(&sub), err).await?);
        }
        if sub.start_page.is_none() {
            // A document published on NATS gets its durable record (owner,
            // state) here; one the ingress recorded keeps its own.
            pagestream_pipeline::records::DocRecords::new(&s.ctx.counters)
                .adopt(&sub)
                .await
                .map_err(|e| StageError::nats(format!("{e:#}")))?;
        }
        s.queue_turn(&sub, &turn_id(&sub.doc_id, sub.start_page)).await
    }

    async fn undecodable(&self, payload: &[u8], _: &Delivery, err: StageError) -> StageError {
        match peek_doc_id(payload) {
            Some(doc_id) => self.0.refuse(&doc_id, None, err).await.unwrap_or_else(|e| e),
            None => err,
        }
    }

    async fn give_up(&self, sub: DocumentSubmitted, _: &Delivery, err: &StageError) -> Result<(), StageError> {
        self.0.fail_document(&sub, err.info()).await
    }
}

/// Subject prefixes of the two per-tenant queues.
pub fn turns_prefix(names: &Names) -> String {
    format!("{}.turns.", names.prefix)
}

pub fn fetch_prefix(names: &Names) -> String {
    format!("{}.fetch.", names.prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(ts: &[(&str, u32)]) -> BTreeMap<String, u32> {
        ts.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    #[test]
    fn a_newcomer_goes_next_and_weights_share_the_picks() {
        let mut f = Fair::default();
        let mut picks = Vec::new();
        // A alone for a while.
        for _ in 0..10 {
            let t = f.order(&waiting(&[("a", 1)]))[0].clone();
            f.charge(&t, 1);
            picks.push(t);
        }
        // B arrives: it does not wait behind A's history.
        let order = f.order(&waiting(&[("a", 1), ("b", 1)]));
        assert_eq!(order[0], "b", "{order:?}");
        // With weights 3 : 1, B gets a quarter of 40 picks.
        let mut counts = HashMap::new();
        for _ in 0..40 {
            let w = waiting(&[("a", 1), ("b", 3)]);
            let t = f.order(&w)[0].clone();
            f.charge(&t, w[&t]);
            *counts.entry(t).or_insert(0) += 1;
        }
        assert!((29..=31).contains(&counts["b"]), "{counts:?}");
    }

    #[test]
    fn an_idle_tenant_banks_no_credit() {
        let mut f = Fair::default();
        for _ in 0..5 {
            f.order(&waiting(&[("a", 1), ("b", 1)]));
            f.charge("a", 1);
            f.charge("b", 1);
        }
        // C was idle all along: it goes once, then alternates.
        let mut picks = Vec::new();
        for _ in 0..6 {
            let t = f.order(&waiting(&[("a", 1), ("c", 1)]))[0].clone();
            f.charge(&t, 1);
            picks.push(t);
        }
        let c = picks.iter().filter(|t| *t == "c").count();
        assert_eq!(c, 3, "{picks:?}");
    }

    /// Picks `n` times among `w` (tenant → weight), charging each pick.
    fn picks(f: &mut Fair, w: &BTreeMap<String, u32>, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let t = f.order(w)[0].clone();
                f.charge(&t, w[&t]);
                t
            })
            .collect()
    }

    fn count(picks: &[String], tenant: &str) -> usize {
        picks.iter().filter(|t| *t == tenant).count()
    }

    #[test]
    fn over_many_picks_each_tenant_gets_its_weights_share() {
        let mut f = Fair::default();
        let w = waiting(&[("a", 1), ("b", 2), ("c", 5)]);
        let got = picks(&mut f, &w, 800);
        let shares = [count(&got, "a"), count(&got, "b"), count(&got, "c")];
        for (share, want) in shares.into_iter().zip([100, 200, 500]) {
            assert!(share.abs_diff(want) <= 1, "{shares:?}, want [100, 200, 500]");
        }
        // Interleaved, not in bursts: in every window of 8 picks, c has 5 ± 1.
        for window in got.windows(8) {
            let c = count(window, "c");
            assert!((4..=6).contains(&c), "{window:?}");
        }
    }

    #[test]
    fn equal_weights_alternate_and_ties_go_by_name() {
        let mut f = Fair::default();
        let w = waiting(&[("b", 7), ("a", 7)]);
        assert_eq!(f.order(&w), ["a", "b"], "a tie goes to the first name");
        assert_eq!(picks(&mut f, &w, 6), ["a", "b", "a", "b", "a", "b"]);
        // A weight of 0 counts as 1 (no division by zero, no free picks).
        let w0 = waiting(&[("a", 0), ("b", 1)]);
        let got = picks(&mut f, &w0, 10);
        assert_eq!((count(&got, "a"), count(&got, "b")), (5, 5), "{got:?}");
    }

    #[test]
    fn a_newcomer_starts_level_with_the_tenant_served_last() {
        let mut f = Fair::default();
        let _ = picks(&mut f, &waiting(&[("a", 1)]), 100);
        // B is first (it has no history), then they alternate: B does not
        // get 100 picks in a row for A's past, nor wait behind it.
        let got = picks(&mut f, &waiting(&[("a", 1), ("b", 1)]), 10);
        assert_eq!(got[0], "b", "{got:?}");
        assert_eq!(count(&got, "b"), 5, "{got:?}");
        assert!(got.windows(2).all(|p| p[0] != p[1]), "{got:?}");
    }

    #[test]
    fn a_tenant_that_was_idle_returns_without_credit() {
        let mut f = Fair::default();
        let both = waiting(&[("a", 1), ("b", 1)]);
        let _ = picks(&mut f, &both, 4);
        // B goes idle while A takes 50 turns alone…
        let _ = picks(&mut f, &waiting(&[("a", 1)]), 50);
        // …and on its return gets its share from now on, not 50 turns back.
        let got = picks(&mut f, &both, 20);
        assert!(count(&got, "b") <= 11, "{got:?}");
        assert!(count(&got, "a") >= 9, "A is not starved by B's return: {got:?}");
    }

    #[test]
    fn a_tenant_waiting_on_messages_in_flight_banks_no_credit() {
        let mut f = Fair::default();
        let both = waiting(&[("a", 1), ("b", 1)]);
        // B has messages waiting, but every one is in flight (its pull comes
        // back empty): A is served after it, 20 rounds.
        for _ in 0..20 {
            let order = f.order(&both);
            let served = order.iter().find(|t| *t == "a").unwrap().clone();
            f.charge(&served, 1);
        }
        // B's messages come back: it gets its turn now, not 20 in a row.
        let got = picks(&mut f, &both, 10);
        assert!(count(&got, "b") <= 6, "{got:?}");
        assert!(got[..3].contains(&"a".to_string()), "A waits at most two picks: {got:?}");
    }

    #[test]
    fn the_tenants_waiting_come_from_the_subject_counts() {
        let counts: Vec<(String, u64)> = [
            // A turn queued by this splitter, and two by an older one (with
            // the priority token): one tenant.
            ("p.turns.aaaa", 2),
            ("p.turns.aaaa.high", 2),
            ("p.turns.aaaa.low", 1),
            ("p.turns.bbbb.normal", 0),
            ("p.turns.cccc.normal", 4),
            ("p.turns.dddd.normal", 3),
            ("p.other.eeee", 5),
        ]
        .into_iter()
        .map(|(s, n)| (s.to_string(), n))
        .collect();
        let busy = vec!["dddd".to_string()];
        let weight = |t: &str| if t == "cccc" { 3 } else { 1 };
        let (w, total) = waiting_tenants(&counts, "p.turns.", &busy, weight);
        // bbbb has nothing waiting, dddd is at its cap, eeee is another queue.
        assert_eq!(w, waiting(&[("aaaa", 1), ("cccc", 3)]));
        // Every message counts toward the queue's size.
        assert_eq!(total, 17);
    }

    #[test]
    fn a_tenant_at_its_cap_is_busy_until_a_message_is_done() {
        let mut active: HashMap<String, usize> = [("a".to_string(), 2), ("b".to_string(), 1)].into();
        assert_eq!(at_cap(&active, 2), ["a"]);
        assert!(at_cap(&active, 0).is_empty(), "0: no cap");
        release(&mut active, "a");
        assert!(at_cap(&active, 2).is_empty());
        release(&mut active, "b");
        assert!(!active.contains_key("b"), "a tenant with nothing in flight is forgotten");
        release(&mut active, "nobody");
        assert_eq!(active.len(), 1);
    }

    #[test]
    fn an_idle_loop_backs_off_to_a_quarter_second() {
        let mut idle = IDLE_AFTER_WAKE;
        let mut seen = Vec::new();
        for _ in 0..7 {
            idle = next_idle(idle);
            seen.push(idle.as_millis());
        }
        assert_eq!(seen, [20, 40, 80, 160, 250, 250, 250]);
        assert_eq!(next_idle(IDLE_AFTER_FAILURE), IDLE_MAX);
    }

    #[test]
    fn the_turn_size_and_bound_follow_the_priority() {
        let plan = |start, p| TurnPlan::new(start, p, 8, 16);
        assert_eq!(plan(None, Priority::Normal), TurnPlan { start: 1, end: 8, in_flight_limit: 16 });
        assert_eq!(plan(None, Priority::High), TurnPlan { start: 1, end: 16, in_flight_limit: 32 });
        assert_eq!(plan(None, Priority::Low), TurnPlan { start: 1, end: 4, in_flight_limit: 8 });
        assert_eq!(plan(Some(9), Priority::Normal).pages(), 9..=16);
        assert_eq!(plan(Some(0), Priority::Normal).start, 1, "pages are 1-based");
        // A low-priority turn is never empty.
        assert_eq!(TurnPlan::new(Some(5), Priority::Low, 2, 2).pages(), 5..=5);
        assert_eq!(TurnPlan::new(Some(u32::MAX), Priority::High, 8, 16).end, u32::MAX);
    }

    #[test]
    fn a_turn_queues_the_next_one_until_the_last_page() {
        let first = TurnPlan::new(None, Priority::Normal, 8, 16);
        assert_eq!(first.next_start(20), Some(9));
        assert_eq!(first.next_start(9), Some(9));
        assert_eq!(first.next_start(8), None, "exactly one turn");
        assert_eq!(first.next_start(3), None);
        let last = TurnPlan::new(first.next_start(20), Priority::Normal, 8, 16);
        assert_eq!((last.pages(), last.next_start(20)), (9..=16, Some(17)));
        assert_eq!(turn_id("d", None), "d:submitted");
        assert_eq!(turn_id("d", Some(17)), "d:split:17");
    }

    #[test]
    fn a_page_waits_for_room_in_its_document_and_its_tenant() {
        assert!(has_room(15, 16, None));
        assert!(!has_room(16, 16, None), "the document's bound");
        assert!(has_room(0, 16, Some((2, 3))));
        assert!(!has_room(0, 16, Some((3, 3))), "the tenant's bound");
        assert!(!has_room(16, 16, Some((0, 3))));
    }

    #[test]
    fn without_its_model_a_document_fails_or_parks() {
        use DocState::*;
        // Not started: fails unless it waits; waiting, it is announced.
        for state in [None, Some(Queued)] {
            assert_eq!(without_model(1, state, false), NoModel::Fail, "{state:?}");
            assert_eq!(without_model(1, state, true), NoModel::Park { announce: true }, "{state:?}");
        }
        // Started (its model went away mid-document): it waits, whatever it asked.
        for wait in [false, true] {
            assert_eq!(without_model(1, Some(Running), wait), NoModel::Park { announce: false });
            assert_eq!(without_model(9, None, wait), NoModel::Park { announce: false });
        }
    }

    #[test]
    fn tenant_keys_are_owner_ids_or_anonymous() {
        assert_eq!(tenant_key(Some("2bb80d537b1da3e3")), "2bb80d537b1da3e3");
        assert_eq!(tenant_key(Some("not.a.subject>")), ANONYMOUS);
        assert_eq!(tenant_key(None), ANONYMOUS);
        assert_eq!(owner_of(ANONYMOUS), None);
    }
}
