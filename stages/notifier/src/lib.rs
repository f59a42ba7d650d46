//! The notifier stage: webhooks. It consumes the events stream (document
//! states and page outcomes, durable consumer `notifier`) and POSTs a
//! signed JSON event (Standard Webhooks: `webhook-id`, `webhook-timestamp`,
//! `webhook-signature`) to each document's callback URL — its own
//! `callback_url`, else `notifier.callback_url`.
//!
//! - `callback_events = document` (default): the terminal state only
//!   (`document.completed`, `document.completed_with_errors`,
//!   `document.failed`, `document.cancelled`);
//! - `page`: also `page.uploaded` / `page.failed` for each page, and the
//!   terminal event only after every page event of the document is
//!   finished (across notifier replicas: the delivered pages are counted in
//!   the callbacks bucket), never a page event after it.
//!
//! Two loops, so that no receiver holds a slot between attempts:
//! - the events consumer ([`Notifier::handle`]) only *schedules*: each
//!   event worth a webhook becomes a delivery on the webhooks stream
//!   (`nats/notifier.json`, [`jobs::Job`]) and is acked at once, so the
//!   events stream is read as fast as it is written;
//! - the delivery loop ([`jobs::run`]) makes one attempt per message, when
//!   the delivery is due, its endpoint's circuit is closed and the
//!   endpoint and the tenant have a free slot ([`breaker`]); a failed
//!   attempt (network errors, timeouts, 408, 429, 5xx) is republished with
//!   its attempt count and "not before" time (back-off 1 s doubling to
//!   60 s, `Retry-After` honoured) for `notifier.retry_for_secs` from its
//!   first attempt. Given up: a dead letter with the reason, and the
//!   document's status says `callback.state: failed`.
//!
//! A terminal event evicted from the events stream before it was read is
//! found by the [`sweep`] (from the durable records) and delivered all the
//! same; page events evicted unread are recorded lost ([`jobs`]).

pub mod breaker;
mod config;
pub mod deliver;
pub mod jobs;
pub mod sweep;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use pagestream_pipeline::callbacks::CallbackStore;
use pagestream_pipeline::consumer::{ConsumerSpec, Delivery, Handler, StageError};
use pagestream_pipeline::records::DocRecords;
use pagestream_pipeline::stage::StageContext;
use pagestream_schemas::{Callback, CallbackEvents, Event, EventState, FinalStatus};
use tokio_util::sync::CancellationToken;

pub use crate::config::NotifierConfig;

use crate::breaker::{Limits, Settings};
use crate::deliver::{Sender, Webhook};
use crate::jobs::Job;

pub const STAGE: &str = "notifier";

/// Documents whose callback is remembered (it never changes).
const KNOWN_MAX: usize = 4096;

/// A document's webhook (its own, else the default) and its owner.
type Known = (Option<Callback>, Option<String>);

pub(crate) struct Notifier {
    ctx: StageContext,
    /// `[notifier]`.
    cfg: NotifierConfig,
    sender: Sender,
    store: CallbackStore,
    limits: Limits,
    default: Option<Callback>,
    public_url: String,
    retry_for: Duration,
    known: Mutex<HashMap<String, Known>>,
}

/// The terminal state an event announces, if it is a document's last.
fn terminal_status(ev: &Event) -> Option<FinalStatus> {
    if ev.page.is_some() {
        return None;
    }
    match ev.state {
        EventState::Completed => Some(ev.info.as_ref().and_then(|i| i.status).unwrap_or(FinalStatus::Completed)),
        EventState::Failed => Some(FinalStatus::Failed),
        EventState::Cancelled => Some(FinalStatus::Cancelled),
        _ => None,
    }
}

impl Notifier {
    async fn callback_of(&self, doc_id: &str) -> Result<Known, StageError> {
        if let Some(known) = self.known.lock().expect("known callbacks").get(doc_id) {
            return Ok(known.clone());
        }
        // The durable record first (the events naming the callback may be
        // gone); the events for documents older than records.
        let record = DocRecords::new(&self.ctx.counters).get(doc_id).await.map_err(StageError::nats)?;
        let (own, owner) = match record {
            Some(r) if r.callback.is_some() => (r.callback, r.owner),
            record => {
                let st = self.ctx.status(doc_id, false).await.map_err(StageError::nats)?;
                let owner = match record {
                    Some(r) => r.owner,
                    None => st.as_ref().and_then(|s| s.info.owner.clone()),
                };
                (st.and_then(|s| s.info.callback), owner)
            }
        };
        let callback = (own.or_else(|| self.default.clone()), owner);
        let mut known = self.known.lock().expect("known callbacks");
        if known.len() >= KNOWN_MAX {
            known.clear();
        }
        known.insert(doc_id.to_string(), callback.clone());
        Ok(callback)
    }

    fn link(&self, path: String) -> String {
        format!("{}{path}", self.public_url.trim_end_matches('/'))
    }

    fn page_hook(&self, ev: &Event, page: u32) -> Webhook {
        let doc = &ev.doc_id;
        let state = ev.state.as_str();
        let mut data = serde_json::json!({
            "doc_id": doc,
            "page": page,
            "state": state,
            "links": {
                "status": self.link(format!("/v1/documents/{doc}")),
            },
        });
        if ev.state == EventState::Uploaded {
            data["links"]["image"] = self.link(format!("/v1/documents/{doc}/results/pages/{page}.png")).into();
            data["links"]["detections"] = self.link(format!("/v1/documents/{doc}/results/pages/{page}.json")).into();
        }
        if let Some(e) = &ev.error {
            data["error"] = serde_json::json!(e);
        }
        let body = serde_json::json!({"type": format!("page.{state}"), "timestamp": ev.at, "data": data});
        Webhook { id: format!("msg_{doc}_p{page}_{state}"), kind: "page", body: Bytes::from(body.to_string()) }
    }

    /// The document's terminal webhook, built when it is first attempted
    /// (its page counts are final then).
    async fn document_hook(&self, ev: &Event, status: FinalStatus) -> Result<Webhook, StageError> {
        let doc = &ev.doc_id;
        let st = self.ctx.status(doc, false).await.map_err(StageError::nats)?;
        let mut data = serde_json::json!({
            "doc_id": doc,
            "state": status.as_str(),
            "title": st.as_ref().and_then(|s| s.info.title.clone()),
            "page_count": st.as_ref().and_then(|s| s.page_count),
            "pages": st.as_ref().map(|s| serde_json::json!({"uploaded": s.pages.uploaded, "failed": s.pages.failed})),
            "links": {
                "status": self.link(format!("/v1/documents/{doc}")),
                "results": self.link(format!("/v1/documents/{doc}/results")),
                "coco": self.link(format!("/v1/documents/{doc}/results?format=coco")),
                "markdown": self.link(format!("/v1/documents/{doc}/results?format=markdown")),
                "chunks": self.link(format!("/v1/documents/{doc}/results?format=chunks")),
            },
        });
        if let Some(e) = ev.error.as_ref().or(st.as_ref().and_then(|s| s.error.as_ref())) {
            data["error"] = serde_json::json!(e);
        }
        let kind = format!("document.{}", status.as_str());
        let body = serde_json::json!({"type": kind, "timestamp": ev.at, "data": data});
        Ok(Webhook { id: document_webhook_id(doc, status), kind: "document", body: Bytes::from(body.to_string()) })
    }
}

fn document_webhook_id(doc_id: &str, status: FinalStatus) -> String {
    format!("msg_{doc_id}_{}", status.as_str())
}

/// The events consumer: schedules a delivery for each event worth a
/// webhook, and nothing else (no HTTP here).
impl Handler for Notifier {
    type Input = Event;

    async fn handle(&self, ev: Event, delivery: &Delivery) -> Result<(), StageError> {
        let doc_id = ev.doc_id.clone();
        let terminal = terminal_status(&ev);
        let page = match (ev.page, terminal) {
            (Some(p), _) if matches!(ev.state, EventState::Uploaded | EventState::Failed) => Some(p),
            (None, Some(_)) => None,
            _ => return Ok(()),
        };
        let (callback, owner) = self.callback_of(&doc_id).await?;
        let Some(callback) = callback else {
            return self.settled(&doc_id, owner.as_deref(), terminal).await;
        };
        if page.is_some() && callback.events != CallbackEvents::Page {
            return Ok(());
        }
        // The document's event went out: nothing is delivered after it.
        if self.store.record(&doc_id).await.map_err(StageError::nats)?.is_some() {
            return self.settled(&doc_id, owner.as_deref(), terminal).await;
        }
        let (webhook_id, body) = match (page, terminal) {
            (Some(page), _) => {
                if self.store.pages_done(&doc_id).await.map_err(StageError::nats)?.contains(page) {
                    return Ok(()); // delivered before a redelivery
                }
                let hook = self.page_hook(&ev, page);
                (hook.id, Some(String::from_utf8_lossy(&hook.body).into_owned()))
            }
            (None, Some(status)) => (document_webhook_id(&doc_id, status), None),
            (None, None) => return Ok(()),
        };
        let job = Job::new(ev, callback, owner.clone(), webhook_id, body, delivery.stream_sequence);
        jobs::publish(&self.ctx, &job).await.map_err(StageError::publish)?;
        match page {
            Some(page) => self.store.page_seen(&doc_id, page).await.map_err(StageError::nats),
            None => {
                self.store.document_scheduled(&doc_id).await.map_err(StageError::nats)?;
                self.settled(&doc_id, owner.as_deref(), terminal).await
            }
        }
    }
}

impl Notifier {
    /// A terminal event was handled (its webhook scheduled, or none due):
    /// the sweep's marker goes ([`sweep`]).
    async fn settled(
        &self,
        doc_id: &str,
        owner: Option<&str>,
        terminal: Option<FinalStatus>,
    ) -> Result<(), StageError> {
        if terminal.is_none() {
            return Ok(());
        }
        let tenant = pagestream_pipeline::tenants::tenant_of(owner);
        DocRecords::new(&self.ctx.counters).clear_ended(tenant, doc_id).await.map_err(StageError::nats)
    }
}

/// Creates or updates the webhooks stream and its consumer
/// (`nats/notifier.json`; idempotent, like every stage's provisioning).
async fn provision(ctx: &StageContext) -> Result<()> {
    let text = pagestream_pipeline::nats::render_definitions(jobs::DEFINITIONS, &ctx.names, &ctx.config.nats);
    pagestream_pipeline::nats::provision_definitions(&ctx.js, &ctx.names, "nats/notifier.json", &text).await
}

/// Runs the notifier until `shutdown`. Without `notifier.secret` webhooks
/// are off: it exits with an error saying so.
pub async fn run(ctx: StageContext, cfg: NotifierConfig, shutdown: CancellationToken) -> Result<()> {
    let Some(sender) = Sender::new(&cfg) else {
        anyhow::bail!("notifier.secret is not set (PAGESTREAM_NOTIFIER_SECRET=whsec_<base64>): webhooks are off");
    };
    provision(&ctx).await?;
    let store = CallbackStore::open(&ctx.js, &ctx.names, ctx.config.nats.replicas).await?;
    let default = Some(cfg.callback_url.clone())
        .filter(|u| !u.is_empty())
        .map(|url| Callback { url, events: cfg.callback_events });
    let limits = Limits::new(Settings {
        per_endpoint: cfg.per_endpoint_concurrency,
        per_owner: cfg.per_owner_concurrency,
        failures: cfg.breaker_failures,
        cooldown: Duration::from_secs(cfg.breaker_cooldown_secs),
        probe_wait: Duration::from_secs(cfg.attempt_timeout_secs),
    });
    let concurrency = cfg.concurrency;
    let notifier = Arc::new(Notifier {
        ctx: ctx.clone(),
        sender,
        store,
        limits,
        default,
        public_url: cfg.public_url.clone(),
        retry_for: Duration::from_secs(cfg.retry_for_secs),
        known: Mutex::default(),
        cfg,
    });
    let spec = ConsumerSpec::new(&ctx, STAGE, ctx.names.events_stream(), "notifier".into(), concurrency);
    // Either loop ending ends the stage: the other is told to stop.
    let stop = shutdown.child_token();
    let mut deliveries = tokio::spawn(jobs::run(notifier.clone(), stop.clone()));
    let sweeper = tokio::spawn(sweep::run(notifier.clone(), stop.clone()));
    let events = spec.run(&ctx, notifier, stop.clone());
    tokio::pin!(events);
    let (events, deliveries) = tokio::select! {
        r = &mut events => {
            stop.cancel();
            (r, deliveries.await)
        }
        d = &mut deliveries => {
            stop.cancel();
            (events.await, d)
        }
    };
    let swept = sweeper.await.context("the sweep panicked")?;
    events.and(deliveries.context("the delivery loop panicked")?).and(swept)
}

/// The `notifier` executable: its settings from the configuration sources,
/// its admin endpoints, [`run`] until SIGTERM. `pagestream` runs this
/// too when it is called `notifier` (a link to it, as in the container image).
pub async fn binary() -> Result<()> {
    pagestream_pipeline::bin::run_stage(
        STAGE,
        "notifier — delivers signed webhooks (Standard Webhooks) for document and page events",
        |sources| sources.section::<NotifierConfig>(),
        |c| c.admin_addr.clone(),
        run,
    )
    .await
}
