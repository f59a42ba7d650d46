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
//! A delivery is retried in the handler (network errors, timeouts, 408,
//! 429, 5xx; back-off 1 s doubling to 60 s) for `notifier.retry_for_secs`;
//! the message stays in flight meanwhile (progress acks), so a slow
//! receiver holds a notifier slot, never a pipeline stage. Given up: a dead
//! letter with the reason, and the document's status says
//! `callback.state: failed`.

pub mod deliver;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use pagestream_pipeline::callbacks::{CallbackRecord, CallbackStore};
use pagestream_pipeline::consumer::{ConsumerSpec, Delivery, Handler, StageError};
use pagestream_pipeline::progress::status::read_status;
use pagestream_pipeline::stage::StageContext;
use pagestream_pipeline::util::now_rfc3339;
use pagestream_schemas::{Callback, CallbackEvents, Event, EventState, FinalStatus};
use tokio_util::sync::CancellationToken;

use crate::deliver::{Outcome, Sender, Webhook};

pub const STAGE: &str = "notifier";

/// Documents whose callback is remembered (it never changes).
const KNOWN_MAX: usize = 4096;

struct Notifier {
    ctx: StageContext,
    sender: Sender,
    store: CallbackStore,
    default: Option<Callback>,
    public_url: String,
    retry_for: Duration,
    known: Mutex<HashMap<String, Option<Callback>>>,
    /// One terminal delivery per document at a time in this process: a
    /// document can have two terminal events (the splitter's and the
    /// uploader's `failed`), and the second must see the first's record.
    terminal: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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
    async fn callback_of(&self, doc_id: &str) -> Result<Option<Callback>, StageError> {
        if let Some(known) = self.known.lock().expect("known callbacks").get(doc_id) {
            return Ok(known.clone());
        }
        let st = read_status(&self.ctx.js, &self.ctx.names, &self.ctx.counters, doc_id, false)
            .await
            .map_err(StageError::nats)?;
        let callback = st.and_then(|s| s.info.callback).or_else(|| self.default.clone());
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

    async fn document_hook(&self, ev: &Event, status: FinalStatus) -> Result<Webhook, StageError> {
        let doc = &ev.doc_id;
        let st = read_status(&self.ctx.js, &self.ctx.names, &self.ctx.counters, doc, false)
            .await
            .map_err(StageError::nats)?;
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
            },
        });
        if let Some(e) = ev.error.as_ref().or(st.as_ref().and_then(|s| s.error.as_ref())) {
            data["error"] = serde_json::json!(e);
        }
        let kind = format!("document.{}", status.as_str());
        let body = serde_json::json!({"type": kind, "timestamp": ev.at, "data": data});
        Ok(Webhook {
            id: format!("msg_{doc}_{}", status.as_str()),
            kind: "document",
            body: Bytes::from(body.to_string()),
        })
    }

    /// Waits until every page with an outcome has its page event finished
    /// (delivered or given up), so the terminal event comes last. Bounded:
    /// a page event is given up after `retry_for` at the latest.
    async fn wait_for_pages(&self, doc_id: &str) -> Result<(), StageError> {
        let deadline = Instant::now() + self.retry_for + Duration::from_secs(60);
        loop {
            let done = self.ctx.counters.doc(doc_id).await.map_err(StageError::nats)?.done();
            let delivered = self.store.pages_done(doc_id).await.map_err(StageError::nats)?.len();
            if delivered >= done {
                return Ok(());
            }
            if Instant::now() > deadline {
                tracing::warn!(
                    doc_id,
                    delivered,
                    done,
                    "page webhooks still unfinished; delivering the document's event"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Handler for Notifier {
    type Input = Event;

    async fn handle(&self, ev: Event, _: &Delivery) -> Result<(), StageError> {
        let doc_id = ev.doc_id.clone();
        let terminal = terminal_status(&ev);
        let page = match (ev.page, terminal) {
            (Some(p), _) if matches!(ev.state, EventState::Uploaded | EventState::Failed) => Some(p),
            (None, Some(_)) => None,
            _ => return Ok(()),
        };
        let Some(callback) = self.callback_of(&doc_id).await? else { return Ok(()) };
        if page.is_some() && callback.events != CallbackEvents::Page {
            return Ok(());
        }
        // The document's event went out: nothing is delivered after it.
        if self.store.record(&doc_id).await.map_err(StageError::nats)?.is_some() {
            return Ok(());
        }
        match (page, terminal) {
            (Some(page), _) => {
                if self.store.pages_done(&doc_id).await.map_err(StageError::nats)?.contains(page) {
                    return Ok(()); // delivered before a redelivery
                }
                let hook = self.page_hook(&ev, page);
                let outcome = self.sender.deliver(&callback.url, &hook).await;
                let failed = matches!(outcome, Outcome::Failed { .. });
                self.store.page_done(&doc_id, page, failed).await.map_err(StageError::nats)?;
                match outcome {
                    Outcome::Delivered { attempts, .. } => {
                        tracing::debug!(doc_id, page, attempts, webhook_id = hook.id, "page webhook delivered");
                        Ok(())
                    }
                    Outcome::Failed { error, .. } => Err(StageError::permanent(
                        "callback_failed",
                        format!("webhook {} to {}: {}: {}", hook.id, callback.url, error.code, error.message),
                    )),
                }
            }
            (None, Some(status)) => {
                let lock = self.terminal.lock().expect("terminal locks").entry(doc_id.clone()).or_default().clone();
                let _one = lock.lock().await;
                let result = self.deliver_terminal(&ev, &callback, status).await;
                self.terminal.lock().expect("terminal locks").remove(&doc_id);
                result
            }
            (None, None) => Ok(()),
        }
    }
}

impl Notifier {
    async fn deliver_terminal(&self, ev: &Event, callback: &Callback, status: FinalStatus) -> Result<(), StageError> {
        let doc_id = ev.doc_id.clone();
        if self.store.record(&doc_id).await.map_err(StageError::nats)?.is_some() {
            return Ok(()); // delivered by another terminal event of this document
        }
        if callback.events == CallbackEvents::Page {
            self.wait_for_pages(&doc_id).await?;
        }
        let hook = self.document_hook(ev, status).await?;
        let outcome = self.sender.deliver(&callback.url, &hook).await;
        let (state, attempts, error) = match &outcome {
            Outcome::Delivered { attempts, .. } => ("delivered", *attempts, None),
            Outcome::Failed { attempts, error } => ("failed", *attempts, Some(error.clone())),
        };
        let record = CallbackRecord {
            state: state.into(),
            event: format!("document.{}", status.as_str()),
            webhook_id: hook.id.clone(),
            attempts,
            error: error.clone(),
            at: now_rfc3339(),
        };
        self.store.set_record(&doc_id, &record).await.map_err(StageError::nats)?;
        tracing::info!(doc_id, webhook_id = hook.id, state, attempts, "document webhook finished");
        match error {
            None => Ok(()),
            Some(error) => Err(StageError::permanent(
                "callback_failed",
                format!("webhook {} to {}: {}: {}", hook.id, callback.url, error.code, error.message),
            )),
        }
    }
}

/// Runs the notifier until `shutdown`. Without `notifier.secret` webhooks
/// are off: it exits with an error saying so.
pub async fn run(ctx: StageContext, shutdown: CancellationToken) -> Result<()> {
    let cfg = ctx.config.notifier.clone();
    let Some(sender) = Sender::new(&cfg) else {
        anyhow::bail!("notifier.secret is not set (PAGESTREAM_NOTIFIER_SECRET=whsec_<base64>): webhooks are off");
    };
    let store = CallbackStore::open(&ctx.js, &ctx.names, ctx.config.nats.replicas).await?;
    let default = Some(cfg.callback_url.clone())
        .filter(|u| !u.is_empty())
        .map(|url| Callback { url, events: cfg.callback_events });
    let notifier = Arc::new(Notifier {
        ctx: ctx.clone(),
        sender,
        store,
        default,
        public_url: cfg.public_url.clone(),
        retry_for: Duration::from_secs(cfg.retry_for_secs),
        known: Mutex::default(),
        terminal: Mutex::default(),
    });
    let spec = ConsumerSpec::new(&ctx, STAGE, ctx.names.events_stream(), "notifier".into(), cfg.concurrency);
    spec.run(&ctx, notifier, shutdown).await
}
