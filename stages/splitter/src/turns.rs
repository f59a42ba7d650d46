//! Fair share between tenants: the splitter's work queues per tenant and
//! the loop that picks whose work runs next.
//!
//! Turns travel on `<p>.turns.<tenant>.<priority>` (stream `<P>_TURNS`),
//! documents to fetch on `<p>.fetch.<tenant>` (`<P>_FETCH`); each tenant has
//! a durable consumer per queue, created when it first has work and removed
//! by the server after an hour unused, shared by every splitter replica.
//! [`Scheduler::run`] reads how many messages each tenant has waiting (one
//! stream-info request), orders the tenants by stride scheduling ([`Fair`]:
//! each pick advances the tenant's pass by `1 / weight`; a tenant that was
//! idle starts level with the last one served, so nobody banks credit) and
//! pulls one message from the first tenant that has one ready. Within a
//! tenant its consumer is one queue in arrival order, whatever the priority:
//! documents and priorities share the tenant's turns as they shared the
//! whole splitter before. Everything lives in JetStream, so a crash or a
//! second replica changes nothing but who handles the next message.
//!
//! `docs.submitted` stays the public subject: [`Admission`] moves each
//! submission (after the same contract checks as before) onto its tenant's
//! queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::{StreamExt as _, TryStreamExt as _};
use pagestream_pipeline::consumer::{ConsumerSpec, Delivery, Handler, Processor, StageError};
use pagestream_pipeline::nats::{render_definitions, Names};
use pagestream_pipeline::tenants::ANONYMOUS;
use pagestream_pipeline::StageContext;
use pagestream_schemas::{peek_doc_id, DocumentSubmitted};
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
        let mut idle = Duration::from_millis(20);
        let mut failures = 0u32;
        tracing::info!(stage = STAGE, stream = %self.stream, kind = self.kind, "consuming per tenant");
        loop {
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            while tasks.try_join_next().is_some() {}
            let busy: Vec<String> = {
                let a = active.lock().expect("active tenants");
                a.iter()
                    .filter(|(_, n)| self.per_tenant > 0 && **n >= self.per_tenant)
                    .map(|(t, _)| t.clone())
                    .collect()
            };
            match self.next(&ctx, &stream, &mut consumers, &mut fair, &busy).await {
                Ok(Some((tenant, msg))) => {
                    failures = 0;
                    idle = Duration::from_millis(20);
                    *active.lock().expect("active tenants").entry(tenant.clone()).or_default() += 1;
                    let (processor, active) = (processor.clone(), active.clone());
                    tasks.spawn(async move {
                        processor.process(msg).await;
                        let mut a = active.lock().expect("active tenants");
                        if let Some(n) = a.get_mut(&tenant) {
                            *n -= 1;
                            if *n == 0 {
                                a.remove(&tenant);
                            }
                        }
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    failures += 1;
                    let error = format!("{} queues: {e:#}", self.kind);
                    pagestream_pipeline::consumer::log_pull_failure(STAGE, failures, &error);
                    idle = Duration::from_secs(1);
                }
            }
            drop(permit);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                // A message handled here frees a permit: look again at once.
                _ = tasks.join_next(), if !tasks.is_empty() => {}
                _ = self.wake.notified() => {
                    idle = Duration::from_millis(10);
                }
                _ = tokio::time::sleep(idle) => {}
            }
            idle = (idle * 2).min(Duration::from_millis(250));
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
        let mut waiting = BTreeMap::new();
        let mut total = 0u64;
        while let Some((subject, n)) = info.try_next().await? {
            total += n as u64;
            let Some(tenant) = subject.strip_prefix(&self.subject_prefix).and_then(|r| r.split('.').next()) else {
                continue;
            };
            if n > 0 && !busy.iter().any(|b| b == tenant) {
                let weight = ctx.config.tenants.limits_for(owner_of(tenant)).weight;
                waiting.insert(tenant.to_string(), weight);
            }
        }
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
        let id = match sub.start_page {
            None => format!("{}:submitted", sub.doc_id),
            Some(n) => format!("{}:split:{n}", sub.doc_id),
        };
        s.queue_turn(&sub, &id).await
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

    #[test]
    fn tenant_keys_are_owner_ids_or_anonymous() {
        assert_eq!(tenant_key(Some("2bb80d537b1da3e3")), "2bb80d537b1da3e3");
        assert_eq!(tenant_key(Some("not.a.subject>")), ANONYMOUS);
        assert_eq!(tenant_key(None), ANONYMOUS);
        assert_eq!(owner_of(ANONYMOUS), None);
    }
}
