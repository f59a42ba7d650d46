//! Splitter: turns each `DocumentSubmitted` into one `PageRendered` per page.
//!
//! It fetches the PDF to a temporary file (streamed from the blob store),
//! opens it with pdfium on the render thread ([`render`]) and publishes each
//! page as soon as it is rendered, waiting for the PubAck before asking for
//! the next: memory stays flat whatever the page count. Pages already marked
//! rendered in the document's counters are skipped after a redelivery, and
//! every publish carries `Nats-Msg-Id = <doc>:<page>:rendered`, so a crash
//! never duplicates a page. A document pdfium cannot open becomes a
//! `DocumentFailed` for the uploader (which writes a `failed` manifest) plus
//! a dead-letter record.
//!
//! Scheduling and flow control: a document is split in turns. One turn
//! renders the pages `[start, start + chunk)` (chunk = `splitter.chunk_pages`
//! scaled by the document's priority), then publishes the rest of the
//! document on its tenant's queue `<p>.turns.<tenant>` — behind
//! the tenant's documents submitted meanwhile — and acks; the next turn to
//! run is chosen fairly between tenants ([`turns`]). Turn boundaries depend only on
//! the priority, so a redelivered turn re-publishes the same continuation
//! (`Nats-Msg-Id = <doc>:split:<next>`), which JetStream deduplicates. Before
//! each page the turn waits while the document has `doc_pages_in_flight`
//! (scaled) pages rendered and not yet uploaded or failed, and while the
//! pages stream is full (`nats.max_pages_in_flight`).
//!
//! The priority acts through those two scaled numbers only (turn size and
//! pages in flight). The `<priority>` token of the turn subjects is
//! informational — for operators reading the stream, and kept because
//! subjects are a public contract: each tenant's consumer filters on
//! `<p>.turns.<tenant>.*` and takes every priority in arrival order, and
//! nothing downstream reads the priority (pages go to
//! `<p>.pages.rendered.<model>`, whatever their priority).
//!
//! Models: the document's model is decided once, by the ingress when it
//! accepts the document, else in its first turn (its `model` option, else
//! `pipeline.default_model`), both with
//! `pagestream_pipeline::registry::resolve_model`; it is written into the
//! continuation and into every page, which goes to that model's queue
//! `<p>.pages.rendered.<model>`. When no live inferencer serves the model
//! (the registry, `pagestream_pipeline::registry`), a new document that
//! named it fails with `model_unavailable` unless it asked to wait
//! (`wait_for_model`); a document for the default model always waits. A
//! waiting document, or one whose model's last replica went away, is
//! parked ([`park`]) — holding no worker — until the model is live.
//!
//! Documents by reference are fetched by a pool of their own
//! ([`fetch::Fetcher`]) into the blob store before their first turn.
//!
//! Knows nothing about how models run, or result storage.

mod config;
pub mod fetch;
mod park;
pub mod render;
mod tenant_pages;
pub mod text;
pub mod turns;
pub mod worker;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use anyhow::Result;
use pagestream_pipeline::blob::{page_image_key, BlobStore};
use pagestream_pipeline::consumer::{self, transient, ConsumerSpec, Delivery, Handler, StageError};
use pagestream_pipeline::progress::{publish_message, DocState};
use pagestream_pipeline::registry::{LiveModels, ModelChoice};
use pagestream_pipeline::util::now_rfc3339;
use pagestream_pipeline::{progress::Progress, StageContext};
use pagestream_schemas::{
    encode, peek_doc_id, DocInfo, DocumentFailed, DocumentSubmitted, ErrorInfo, EventState, ImageRef, ModelRef,
    PageInferred, PageRendered, Timings, VERSION,
};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

pub use config::SplitterConfig;
use render::{RenderEvent, RenderRequest, Renderer};
use worker::WorkerOptions;

pub const STAGE: &str = "splitter";

/// A source PDF fetched to a local file, kept between a document's turns.
#[derive(Debug)]
struct Fetched {
    doc_id: String,
    path: tempfile::TempPath,
    sha256: String,
    bytes: u64,
}

/// Longest a turn holds a splitter worker while waiting for room.
const MAX_HOLD: Duration = Duration::from_secs(2);

/// Fetched sources kept per process (the documents taking turns most recently).
const FETCH_CACHE: usize = 4;

/// The splitter's message handler.
pub struct Splitter {
    ctx: StageContext,
    /// `[splitter]`.
    cfg: SplitterConfig,
    blobs: BlobStore,
    renderer: Renderer,
    progress: Progress,
    fetched: Mutex<VecDeque<Arc<Fetched>>>,
    /// Which models live inferencers serve.
    live: LiveModels,
    shutdown: CancellationToken,
    /// Fetches documents by `http(s)://` reference.
    http: fetch::HttpClient,
    /// Wakes this process's idle turn scheduler when it queues a turn
    /// (other replicas find it by polling).
    pub(crate) turn_queued: Arc<tokio::sync::Notify>,
    /// The same for the fetch pool.
    pub(crate) fetch_queued: Arc<tokio::sync::Notify>,
}

impl Splitter {
    /// Starts the render worker (failing with a clear message when pdfium
    /// or the worker binary is missing).
    pub async fn new(ctx: StageContext, cfg: SplitterConfig, shutdown: CancellationToken) -> Result<Self> {
        ctx.health.register(STAGE);
        let c = &cfg;
        let options = WorkerOptions {
            program: WorkerOptions::locate(&c.render_worker).map_err(anyhow::Error::msg)?,
            library: c.pdfium_library.clone(),
            page_timeout: Duration::from_secs(c.render_timeout_secs),
            memory_bytes: c.render_memory_mb * 1024 * 1024,
        };
        let renderer =
            tokio::task::spawn_blocking(move || Renderer::isolated(options)).await?.map_err(anyhow::Error::msg)?;
        let blobs = ctx.blobs().await?;
        let progress = ctx.progress(STAGE);
        let live = LiveModels::watch(&ctx.js, &ctx.names, shutdown.child_token()).await?;
        ctx.health.set_ready(STAGE, true);
        let http = cfg.source_policy().client(Duration::from_secs(30));
        Ok(Splitter {
            ctx,
            cfg,
            blobs,
            renderer,
            progress,
            fetched: Mutex::default(),
            live,
            shutdown,
            http,
            turn_queued: Arc::default(),
            fetch_queued: Arc::default(),
        })
    }

    /// The document's source, fetched once for all its turns.
    async fn source(&self, sub: &DocumentSubmitted) -> Result<Arc<Fetched>, StageError> {
        let cached = self.fetched.lock().expect("fetch cache").iter().find(|f| f.doc_id == sub.doc_id).cloned();
        if let Some(f) = cached {
            return Ok(f);
        }
        let (path, sha256, bytes) = self.fetch(sub).await?;
        let f = Arc::new(Fetched { doc_id: sub.doc_id.clone(), path, sha256, bytes });
        let mut cache = self.fetched.lock().expect("fetch cache");
        cache.push_back(f.clone());
        while cache.len() > FETCH_CACHE {
            cache.pop_front();
        }
        Ok(f)
    }

    /// Drops a finished (or cancelled) document's local copy.
    fn forget(&self, doc_id: &str) {
        self.fetched.lock().expect("fetch cache").retain(|f| f.doc_id != doc_id);
    }

    /// Waits until `doc_id` has fewer than `limit` pages rendered and not yet
    /// uploaded or failed. A shutdown ends the wait with a transient error:
    /// the turn is redelivered, and pages it already rendered are skipped.
    ///
    /// With `tenant` = `(tenant, limit)` (`tenants.max_pages_in_flight`),
    /// it also waits while the tenant's documents together have `limit`
    /// pages in flight.
    async fn wait_for_room(
        &self,
        doc_id: &str,
        model: &str,
        limit: u32,
        tenant: Option<(&str, u32)>,
    ) -> Result<(), StageError> {
        let counters = &self.ctx.counters;
        let mut delay = Duration::from_millis(10);
        let mut waited = false;
        let started = tokio::time::Instant::now();
        loop {
            let (rendered, uploaded, failed) = tokio::try_join!(
                counters.get(doc_id, EventState::Rendered),
                counters.get(doc_id, EventState::Uploaded),
                counters.get(doc_id, EventState::Failed),
            )
            .map_err(StageError::nats)?;
            let in_flight = tenant_pages::in_flight(rendered.len(), uploaded.union_len(&failed));
            // The tenant's pages are read only when the document has room.
            let tenant = match tenant {
                Some((tenant, max)) if in_flight < limit => Some((self.tenant_pages_in_flight(tenant).await?, max)),
                _ => None,
            };
            if turns::has_room(in_flight, limit, tenant) {
                if waited {
                    self.ctx.metrics.message(STAGE, "flow_control_wait");
                }
                return Ok(());
            }
            waited = true;
            self.check_model(model)?;
            self.yield_if_slow(started, doc_id)?;
            self.pause(&mut delay, Duration::from_millis(200), "waiting for pages in flight to drain").await?;
        }
    }

    /// A deferral when no live inferencer serves `model`: the turn waits
    /// (its pages in flight stay queued for the model) instead of holding
    /// a splitter slot.
    fn check_model(&self, model: &str) -> Result<(), StageError> {
        if self.live.get(model).is_some() {
            return Ok(());
        }
        self.ctx.metrics.message(STAGE, "waiting_for_model");
        Err(StageError::deferred("waiting_for_model", format!("no live inferencer serves model {model:?}")))
    }

    /// A turn that has waited [`MAX_HOLD`] for room (its model's fleet is
    /// slower than the splitter) gives its worker to other documents: it is
    /// deferred and comes back a moment later, skipping the pages it
    /// already rendered. Without this, one document for a slow model would
    /// hold a splitter worker and starve the documents of faster models.
    fn yield_if_slow(&self, started: tokio::time::Instant, doc_id: &str) -> Result<(), StageError> {
        if started.elapsed() < MAX_HOLD {
            return Ok(());
        }
        self.ctx.metrics.message(STAGE, "turn_yielded");
        Err(StageError::deferred("pages_in_flight", format!("document {doc_id}: pages in flight are draining slowly")))
    }

    /// The models live inferencers serve, for messages.
    fn served(&self) -> String {
        let names: Vec<String> = self.live.models().into_keys().collect();
        if names.is_empty() {
            "no model is served right now".into()
        } else {
            format!("served: {}", names.join(", "))
        }
    }

    /// Sleeps `delay` (then doubles it, up to `max`), unless the process is
    /// shutting down: then a transient error, so the turn is redelivered.
    async fn pause(&self, delay: &mut Duration, max: Duration, what: &str) -> Result<(), StageError> {
        tokio::select! {
            _ = self.shutdown.cancelled() => {
                return Err(StageError::transient("shutting_down", format!("stopped while {what}")));
            }
            _ = tokio::time::sleep(*delay) => {}
        }
        *delay = (*delay * 2).min(max);
        Ok(())
    }

    /// The document cannot be split: it fails with `err`'s reason (its
    /// events and record), and `err` goes back to the consumer (a dead
    /// letter for a permanent error). The one way `split` gives up.
    async fn give_up(&self, sub: &DocumentSubmitted, err: StageError) -> Result<(), StageError> {
        let err = err.doc(&sub.doc_id);
        self.forget(&sub.doc_id);
        self.fail_document(sub, err.info()).await?;
        Err(err)
    }

    /// Tells the uploader and the events stream that the document failed.
    async fn fail_document(&self, sub: &DocumentSubmitted, error: ErrorInfo) -> Result<(), StageError> {
        if self.finished(&sub.doc_id).await? {
            tracing::info!(doc_id = sub.doc_id, code = error.code, "document already finished; failure not recorded");
            return Ok(());
        }
        let failed = DocumentFailed {
            v: VERSION,
            doc_id: sub.doc_id.clone(),
            stage: STAGE.into(),
            error: error.clone(),
            title: sub.title.clone(),
            source: pagestream_schemas::Source { inline: None, ..sub.source.clone() },
            at: now_rfc3339(),
        };
        let names = &self.ctx.names;
        publish_message(&self.ctx.js, names.docs_failed(), &format!("{}:failed", sub.doc_id), &failed)
            .await
            .map_err(StageError::publish)?;
        // A document published on NATS may fail here first: its webhook
        // must still be known.
        let info = sub.options.callback().map(|c| DocInfo { callback: Some(c), ..DocInfo::default() });
        self.progress.doc(&sub.doc_id, EventState::Failed, info, Some(error)).await.map_err(StageError::publish)?;
        self.ctx.metrics.document(STAGE, "failed");
        Ok(())
    }

    /// A submission refused for its content (it does not decode, or breaks
    /// the contract) but naming a valid document: the document fails with
    /// the reason, so its publisher sees it in the status, the events and a
    /// manifest, not only in the dead-letter stream. A document that has
    /// already started is left alone (a stray message cannot fail it).
    /// Returns `err` tagged with the document, for the dead letter.
    async fn refuse(
        &self,
        doc_id: &str,
        sub: Option<&DocumentSubmitted>,
        err: StageError,
    ) -> Result<StageError, StageError> {
        if self.doc_state(doc_id).await?.is_none_or(|s| s == DocState::Queued) {
            let blank = DocumentSubmitted {
                v: VERSION,
                doc_id: doc_id.to_string(),
                title: None,
                source: pagestream_schemas::Source::default(),
                options: pagestream_schemas::SubmitOptions::default(),
                submitted_at: None,
                start_page: None,
                owner: None,
            };
            let mut info = err.info();
            info.message = format!("submission refused: {}", info.message);
            self.fail_document(sub.unwrap_or(&blank), info).await?;
            tracing::warn!(doc_id, error = %err, "submission refused; document failed");
        }
        Ok(err.doc(doc_id))
    }

    /// Whether the document already reached a terminal state (a turn
    /// redelivered after the document finished has nothing to do, and its
    /// source may be gone).
    async fn finished(&self, doc_id: &str) -> Result<bool, StageError> {
        Ok(self.doc_state(doc_id).await?.is_some_and(DocState::is_terminal))
    }

    /// The document's state (`None`: no event yet).
    async fn doc_state(&self, doc_id: &str) -> Result<Option<DocState>, StageError> {
        let ctx = &self.ctx;
        let status = ctx.status(doc_id, false).await.map_err(StageError::nats)?;
        Ok(status.map(|s| s.state))
    }

    /// Pages of `doc_id` in `pages` already rendered (from its counters).
    async fn rendered_pages(
        &self,
        doc_id: &str,
        pages: std::ops::RangeInclusive<u32>,
    ) -> Result<HashSet<u32>, StageError> {
        let set = self.ctx.counters.get(doc_id, EventState::Rendered).await.map_err(StageError::nats)?;
        Ok(pages.filter(|p| set.contains(*p)).collect())
    }

    /// Copies the source PDF to a temporary file; returns it with its sha256 and size.
    async fn fetch(&self, sub: &DocumentSubmitted) -> Result<(tempfile::TempPath, String, u64), StageError> {
        let (tmp, mut file) = temp_pdf().await?;
        let src = &sub.source;
        if let Some(bytes) = &src.inline {
            file.write_all(bytes).await.map_err(transient("tempfile"))?;
        } else if let Some(key) = &src.blob {
            if let Err(e) = self.blobs.copy_to(key, &mut file).await {
                return Err(if e.is_not_found() {
                    StageError::permanent("source_missing", format!("blob {key:?} does not exist in the blob store"))
                } else {
                    StageError::blob_store(e)
                });
            }
        } else {
            // A `source.url` is fetched into the blob store by the fetch
            // pool before the document's first turn (see `split`).
            return Err(StageError::permanent("source_missing", "source: none of inline or blob is set"));
        }
        file.flush().await.map_err(transient("tempfile"))?;
        drop(file);
        let path = tmp.to_path_buf();
        let (sha, size) = tokio::task::spawn_blocking(move || sha256_file(&path))
            .await
            .map_err(transient("join"))?
            .map_err(transient("tempfile"))?;
        Ok((tmp, sha, size))
    }

    async fn publish_page(
        &self,
        sub: &DocumentSubmitted,
        page_count: u32,
        page: render::RenderedPage,
    ) -> Result<(), StageError> {
        let cfg = &self.cfg;
        // The words travel in the same message: the image goes inline only
        // if both fit the inline budget (a word's box and keys encode in
        // under 48 bytes), so a page message stays far below NATS's limit.
        let text_size = page.text.as_ref().map_or(0, |t| t.text_bytes() + t.words.len() * 48);
        let image = if page.png.len() + text_size <= cfg.inline_image_max_bytes {
            ImageRef { format: "png".into(), inline: Some(ByteBuf::from(page.png)), blob: None }
        } else {
            let key = page_image_key(&sub.doc_id, page.page, "png");
            self.blobs.put_bytes(&key, &page.png).await.map_err(StageError::blob_store)?;
            ImageRef { format: "png".into(), inline: None, blob: Some(key) }
        };
        let msg = PageRendered {
            v: VERSION,
            doc_id: sub.doc_id.clone(),
            page: page.page,
            page_count,
            width: page.width,
            height: page.height,
            dpi: page.dpi,
            image,
            render_ms: Some(page.render_ms),
            text: page.text,
            ocr: sub.options.ocr,
        };
        let id = format!("{}:{}:rendered", sub.doc_id, page.page);
        self.publish_when_room(&id, &msg, model_of(sub)).await?;
        self.progress
            .page(&sub.doc_id, page.page, EventState::Rendered, None, Some(page.render_ms))
            .await
            .map_err(StageError::publish)?;
        self.ctx.metrics.page(STAGE);
        Ok(())
    }

    /// Publishes a page, waiting while the pages stream is full (it holds at
    /// most `nats.max_pages_in_flight` messages and refuses more).
    async fn publish_when_room(&self, id: &str, msg: &PageRendered, model: &str) -> Result<(), StageError> {
        let payload = encode(msg);
        let mut delay = Duration::from_millis(20);
        let mut waited = false;
        let started = tokio::time::Instant::now();
        loop {
            match pagestream_pipeline::progress::publish_durable(
                &self.ctx.js,
                self.ctx.names.pages_rendered(model),
                id,
                payload.clone(),
            )
            .await
            {
                Ok(()) => {
                    if waited {
                        self.ctx.metrics.message(STAGE, "pipeline_full_wait");
                    }
                    return Ok(());
                }
                Err(e) if is_stream_full(e.as_ref()) => {
                    waited = true;
                    self.check_model(model)?;
                    self.yield_if_slow(started, &msg.doc_id)?;
                    self.pause(&mut delay, Duration::from_millis(250), "the pages stream was full").await?;
                }
                Err(e) => return Err(StageError::publish(e)),
            }
        }
    }

    /// A page that cannot be rendered goes straight to the uploader as failed.
    async fn publish_failed_page(
        &self,
        sub: &DocumentSubmitted,
        page_count: u32,
        page: u32,
        error: ErrorInfo,
    ) -> Result<(), StageError> {
        let msg = PageInferred {
            v: VERSION,
            doc_id: sub.doc_id.clone(),
            page,
            page_count,
            width: 0,
            height: 0,
            dpi: 0.0,
            model: ModelRef::default(),
            detections: Vec::new(),
            image: None,
            timings: Timings::default(),
            error: Some(error.at_stage(STAGE)),
            text: None,
        };
        let id = format!("{}:{}:rendered", sub.doc_id, page);
        publish_message(&self.ctx.js, self.ctx.names.pages_inferred(), &id, &msg).await.map_err(StageError::publish)?;
        self.progress.page(&sub.doc_id, page, EventState::Rendered, None, None).await.map_err(StageError::publish)?;
        self.ctx.metrics.page_failure(STAGE);
        Ok(())
    }

    /// One turn of a document: pages `[start, start + chunk)`, then the rest
    /// goes to the back of the queue. `sub` carries `choice`, its model
    /// ([`Splitter::handle`]).
    async fn split(&self, sub: DocumentSubmitted, choice: &ModelChoice) -> Result<(), StageError> {
        let doc_id = sub.doc_id.clone();
        let model = &choice.model;
        if self.finished(&doc_id).await? {
            tracing::info!(doc_id, "document already finished; turn skipped");
            self.forget(&doc_id);
            return Ok(());
        }
        if self.ctx.is_cancelled(&doc_id).await? {
            tracing::info!(doc_id, "document cancelled before splitting; skipped");
            self.forget(&doc_id);
            self.ctx.metrics.document(STAGE, "cancelled");
            return Ok(());
        }
        let cfg = &self.cfg;
        let priority = sub.options.priority.unwrap_or_default();
        let plan = turns::TurnPlan::new(sub.start_page, priority, cfg.chunk_pages, cfg.doc_pages_in_flight);
        if !choice.live {
            let state = if plan.start == 1 { self.doc_state(&doc_id).await? } else { None };
            let announce = match turns::without_model(plan.start, state, choice.wait) {
                turns::NoModel::Park { announce } => announce,
                turns::NoModel::Fail => {
                    let err = StageError::permanent(
                        "model_unavailable",
                        format!(
                            "no live inferencer serves model {model:?} ({}); submit with wait_for_model=true to wait for one",
                            self.served()
                        ),
                    );
                    return self.give_up(&sub, err).await;
                }
            };
            if announce {
                self.announce_waiting(&sub).await?;
            }
            // Waits without a worker or an ack-pending slot (`park`).
            self.forget(&doc_id);
            return self.park(&sub).await;
        }
        if sub.source.inline.is_none() && sub.source.blob.is_none() && sub.source.url.is_some() {
            // By reference: fetched by the fetch pool, never in a rendering
            // worker; the document comes back as a turn from the blob store.
            let tenant = turns::tenant_key(sub.owner.as_deref());
            let subject = self.ctx.names.fetch(tenant);
            publish_message(&self.ctx.js, subject, &format!("{doc_id}:fetch"), &sub)
                .await
                .map_err(StageError::publish)?;
            self.fetch_queued.notify_one();
            tracing::debug!(doc_id, "queued for the fetch pool");
            return Ok(());
        }
        let source = match self.source(&sub).await {
            Ok(source) => source,
            // The document cannot be read (missing, too large, not a PDF,
            // not allowed): it fails with the reason.
            Err(e) if e.kind == pagestream_pipeline::ErrorKind::Permanent => return self.give_up(&sub, e).await,
            Err(e) => return Err(e.doc(&doc_id)),
        };
        let skip = self.rendered_pages(&doc_id, plan.pages()).await?;
        let mut events = self.renderer.render(RenderRequest {
            pdf: source.path.to_path_buf(),
            password: sub.options.password.clone(),
            dpi: sub.options.dpi.unwrap_or(cfg.dpi),
            max_pixels: cfg.max_pixels,
            pages: plan.pages(),
            skip,
            text: cfg.text_layer,
        });
        let page_count = match events.recv().await {
            Some(RenderEvent::Opened { page_count }) => page_count,
            Some(RenderEvent::OpenFailed { code, message }) => {
                return self.give_up(&sub, StageError::permanent(code, message)).await
            }
            other => return Err(StageError::transient("renderer", format!("unexpected render event {other:?}"))),
        };
        if let Err(err) = check_page_count(page_count, cfg.max_pages) {
            return self.give_up(&sub, err).await;
        }
        let tenant = turns::tenant_key(sub.owner.as_deref());
        let tenant_limit = match self.tenant_page_limit(sub.owner.as_deref()) {
            0 => None,
            max => {
                self.record_active(tenant, &doc_id, page_count).await?;
                Some((tenant, max))
            }
        };
        if plan.start == 1 {
            let filename = sub.source.filename.clone();
            let info = DocInfo {
                title: sub.title_or_filename(),
                filename,
                sha256: Some(source.sha256.clone()),
                bytes: Some(source.bytes),
                page_count: Some(page_count),
                model: Some(model.clone()),
                model_sha256: choice.sha256.clone(),
                callback: sub.options.callback(),
                ..DocInfo::default()
            };
            self.progress.doc(&doc_id, EventState::Split, Some(info), None).await.map_err(StageError::publish)?;
        }
        while let Some(event) = events.recv().await {
            if self.ctx.is_cancelled(&doc_id).await? {
                // Dropping the receiver stops the render thread after this page.
                tracing::info!(doc_id, "document cancelled; remaining pages skipped");
                self.forget(&doc_id);
                self.ctx.metrics.document(STAGE, "cancelled");
                return Ok(());
            }
            self.wait_for_room(&doc_id, model, plan.in_flight_limit, tenant_limit).await?;
            match event {
                RenderEvent::Page(page) => {
                    // A span per page: the page's later stages descend from it.
                    let span = tracing::info_span!(
                        "page",
                        otel.name = "render",
                        page = page.page,
                        render_ms = f64::from(page.render_ms)
                    );
                    self.publish_page(&sub, page_count, page).instrument(span).await?
                }
                RenderEvent::PageFailed { page, code, message } => {
                    tracing::warn!(doc_id, page, code, %message, "page failed to render");
                    if matches!(code, "render_crashed" | "render_timeout") {
                        // The renderer itself failed: operators want a record.
                        let err = StageError::permanent(code, format!("page {page}: {message}")).doc(&doc_id);
                        let subject = self.ctx.names.docs_submitted();
                        consumer::dead_letter(&self.ctx.js, &self.ctx.names, STAGE, &subject, encode(&sub), &err, 1)
                            .await
                            .map_err(|e| StageError::publish(format!("{e:#}")))?;
                    }
                    self.publish_failed_page(&sub, page_count, page, ErrorInfo::new(code, message)).await?;
                }
                other => return Err(StageError::transient("renderer", format!("unexpected render event {other:?}"))),
            }
        }
        if let Some(next_start) = plan.next_start(page_count) {
            let next = DocumentSubmitted { start_page: Some(next_start), ..sub.clone() };
            let id = turns::turn_id(&doc_id, next.start_page);
            self.queue_turn(&next, &id).await?;
            self.ctx.metrics.message(STAGE, "turn");
            tracing::debug!(doc_id, next = next_start, page_count, "turn done; the rest is queued");
            return Ok(());
        }
        self.forget(&doc_id);
        self.ctx.metrics.document(STAGE, "split");
        tracing::info!(doc_id, page_count, "document split");
        Ok(())
    }
}

/// `sub` carrying its model decision: the model, and whether it waits for it.
fn carrying(mut sub: DocumentSubmitted, choice: &ModelChoice) -> DocumentSubmitted {
    sub.options.model = Some(choice.model.clone());
    if choice.wait {
        sub.options.wait_for_model = Some(true);
    }
    sub
}

/// A page count the splitter refuses before rendering any page: none, or
/// more than `splitter.max_pages`.
fn check_page_count(page_count: u32, max_pages: u32) -> Result<(), StageError> {
    if page_count == 0 {
        return Err(StageError::permanent("pdf_empty", "the document has no pages"));
    }
    if page_count > max_pages {
        return Err(StageError::permanent(
            "too_many_pages",
            format!("the document has {page_count} pages; the limit is {max_pages} (splitter.max_pages)"),
        ));
    }
    Ok(())
}

/// The document's model (decided by [`Splitter::handle`] before any page).
fn model_of(sub: &DocumentSubmitted) -> &str {
    sub.options.model.as_deref().unwrap_or_default()
}

/// Whether a publish failed because the stream is at its message limit
/// (JetStream answers "maximum messages exceeded" with `discard: new`).
fn is_stream_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.to_string().contains("maximum messages exceeded") {
            return true;
        }
        cur = err.source();
    }
    false
}

impl Splitter {
    /// Makes a turn that yielded (its pages in flight drain slowly) come
    /// back later: the message is delivered again after a delay (no worker
    /// held meanwhile); before it would reach `max_deliver` the turn is
    /// queued again as a fresh message instead, at once.
    async fn defer(&self, delivery: &Delivery, sub: DocumentSubmitted, e: StageError) -> Result<(), StageError> {
        if delivery.delivered + 1 < self.ctx.config.nats.max_deliver {
            return Err(e.doc(&sub.doc_id));
        }
        let start = sub.start_page.unwrap_or(1);
        let again = DocumentSubmitted { start_page: Some(start), ..sub };
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        let id = format!("{}:wait:{start}:{stamp}", again.doc_id);
        self.queue_turn(&again, &id).await?;
        tracing::debug!(doc_id = again.doc_id, reason = %e, "still waiting; turn queued again");
        Ok(())
    }

    /// Queues a turn of `sub` on its tenant's queue (`<p>.turns.<tenant>`),
    /// deduplicated by `id`.
    async fn queue_turn(&self, sub: &DocumentSubmitted, id: &str) -> Result<(), StageError> {
        let subject = self.ctx.names.turns(turns::tenant_key(sub.owner.as_deref()));
        publish_message(&self.ctx.js, subject, id, sub).await.map_err(StageError::publish)?;
        self.turn_queued.notify_one();
        Ok(())
    }

    /// A document that waits for its model before its first page: it is
    /// visible (queued, with its model) even when published on NATS.
    async fn announce_waiting(&self, sub: &DocumentSubmitted) -> Result<(), StageError> {
        if self.doc_state(&sub.doc_id).await?.is_some() {
            return Ok(());
        }
        let info = DocInfo {
            title: sub.title_or_filename(),
            filename: sub.source.filename.clone(),
            model: sub.options.model.clone(),
            callback: sub.options.callback(),
            ..DocInfo::default()
        };
        self.progress.doc(&sub.doc_id, EventState::Queued, Some(info), None).await.map_err(StageError::publish)
    }
}

impl Handler for Splitter {
    type Input = DocumentSubmitted;

    /// One turn, pulled from its tenant's queue (see [`turns`]).
    ///
    /// The document's model is decided once: the ingress decided it for a
    /// document it accepted, the first turn decides it for one published on
    /// NATS without one (the default, which it waits for), both with
    /// [`pagestream_pipeline::registry::resolve_model`]. The turn then
    /// carries it — into its pages, its continuation, the parking place.
    async fn handle(&self, sub: DocumentSubmitted, delivery: &Delivery) -> Result<(), StageError> {
        let choice = self.live.resolve(
            sub.options.model.as_deref(),
            sub.options.wait_for_model.unwrap_or(false),
            self.ctx.config.default_model(),
        );
        let sub = carrying(sub, &choice);
        match self.split(sub.clone(), &choice).await {
            // The model's last replica went away mid-turn: park what is
            // left (pages already rendered are skipped when it comes back).
            Err(e) if e.kind == pagestream_pipeline::ErrorKind::Deferred && e.code == "waiting_for_model" => {
                self.forget(&sub.doc_id);
                self.park(&sub).await
            }
            Err(e) if e.kind == pagestream_pipeline::ErrorKind::Deferred => self.defer(delivery, sub, e).await,
            other => other,
        }
    }

    /// A submission that does not decode but names a valid document: the
    /// document fails with the reason (see [`Splitter::refuse`]).
    async fn undecodable(&self, payload: &[u8], _: &Delivery, err: StageError) -> StageError {
        match peek_doc_id(payload) {
            Some(doc_id) => self.refuse(&doc_id, None, err).await.unwrap_or_else(|e| e),
            None => err,
        }
    }

    /// Retries exhausted (blob store or NATS down for good): the document fails.
    async fn give_up(&self, sub: DocumentSubmitted, _: &Delivery, err: &StageError) -> Result<(), StageError> {
        self.fail_document(&sub, err.info()).await
    }
}

/// A new temporary `.pdf` file (deleted with the path), open for writing.
async fn temp_pdf() -> Result<(tempfile::TempPath, tokio::fs::File), StageError> {
    let tmp =
        tempfile::Builder::new().prefix("pagestream-").suffix(".pdf").tempfile().map_err(transient("tempfile"))?;
    let tmp = tmp.into_temp_path();
    let file = tokio::fs::File::create(&tmp).await.map_err(transient("tempfile"))?;
    Ok((tmp, file))
}

fn sha256_file(path: &std::path::Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// Submissions moved onto the tenants' queues at once (the move is one publish).
const ADMISSION_CONCURRENCY: usize = 8;

/// Runs the splitter until `shutdown`: admission of submissions, the
/// tenants' turns (`splitter.concurrency` at once), the fetch pool
/// (`splitter.fetch_concurrency`) and the parking place's watch.
pub async fn run(ctx: StageContext, cfg: SplitterConfig, shutdown: CancellationToken) -> Result<()> {
    turns::provision(&ctx).await?;
    let splitter = Arc::new(Splitter::new(ctx.clone(), cfg, shutdown.clone()).await?);
    let cfg = &splitter.cfg;
    let admission = ConsumerSpec::new(&ctx, STAGE, ctx.names.docs_stream(), "splitter".into(), ADMISSION_CONCURRENCY);
    let turns = turns::Scheduler {
        kind: "turns",
        stream: ctx.names.turns_stream(),
        subject_prefix: turns::turns_prefix(&ctx.names),
        concurrency: cfg.concurrency,
        per_tenant: 0,
        wake: splitter.turn_queued.clone(),
    };
    let fetches = turns::Scheduler {
        kind: "fetch",
        stream: ctx.names.fetch_stream(),
        subject_prefix: turns::fetch_prefix(&ctx.names),
        concurrency: cfg.fetch_concurrency,
        per_tenant: cfg.fetches_per_tenant,
        wake: splitter.fetch_queued.clone(),
    };
    let unpark = tokio::spawn(park::unpark(splitter.clone(), splitter.live.clone(), shutdown.clone()));
    let result = tokio::try_join!(
        admission.run(&ctx, Arc::new(turns::Admission(splitter.clone())), shutdown.clone()),
        turns.run(ctx.clone(), splitter.clone(), shutdown.clone()),
        fetches.run(ctx.clone(), Arc::new(fetch::Fetcher(splitter.clone())), shutdown.clone()),
    );
    unpark.abort();
    result.map(|_| ())
}

/// The `splitter` executable: its settings from the configuration sources,
/// its admin endpoints, [`run`] until SIGTERM. `pagestream` runs this
/// too when it is called `splitter` (a link to it, as in the container image).
pub async fn binary() -> Result<()> {
    pagestream_pipeline::bin::run_stage(
        STAGE,
        "splitter — renders each submitted PDF page by page (pdfium)",
        |sources| sources.section::<SplitterConfig>(),
        |c| c.admin_addr.clone(),
        run,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_oversized_documents_are_refused_before_any_page() {
        let code = |n| check_page_count(n, 2000).err().map(|e| (e.code, e.kind, e.message));
        let (empty, kind, _) = code(0).unwrap();
        assert_eq!((empty, kind), ("pdf_empty", pagestream_pipeline::ErrorKind::Permanent));
        let (too_many, _, why) = code(2001).unwrap();
        assert_eq!(too_many, "too_many_pages");
        assert!(why.contains("2001 pages; the limit is 2000 (splitter.max_pages)"), "{why}");
        assert!(code(1).is_none() && code(2000).is_none());
    }

    #[test]
    fn a_turn_carries_its_model_decision() {
        let sub = DocumentSubmitted {
            v: VERSION,
            doc_id: "d1".into(),
            title: None,
            source: pagestream_schemas::Source { blob: Some("uploads/d1".into()), ..Default::default() },
            options: pagestream_schemas::SubmitOptions::default(),
            submitted_at: None,
            start_page: None,
            owner: None,
        };
        let choice = |model: &str, wait| ModelChoice { model: model.into(), wait, live: false, sha256: None };
        // The default, decided in the first turn: it waits for its fleet.
        let first = carrying(sub.clone(), &choice("dflt", true));
        assert_eq!((model_of(&first), first.options.wait_for_model), ("dflt", Some(true)));
        // A later turn carries it unchanged.
        assert_eq!(carrying(first.clone(), &choice("dflt", true)), first);
        // A model named without waiting stays so.
        let named = carrying(sub, &choice("m", false));
        assert_eq!((model_of(&named), named.options.wait_for_model), ("m", None));
    }
}
