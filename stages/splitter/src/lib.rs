//! Splitter: turns each `DocumentSubmitted` into one `PageRendered` per page.
//!
//! It fetches the PDF to a temporary file (streamed from the blob store),
//! opens it with pdfium on the render thread ([`render`]) and publishes each
//! page as soon as it is rendered, waiting for the PubAck before asking for
//! the next: memory stays flat whatever the page count. Pages whose
//! `rendered` event exists are skipped after a redelivery, and every publish
//! carries `Nats-Msg-Id = <doc>:<page>:rendered`, so a crash never duplicates
//! a page. A document pdfium cannot open becomes a `DocumentFailed` for the
//! uploader (which writes a `failed` manifest) plus a dead-letter record.
//!
//! Knows nothing about models or result storage.

pub mod render;

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::Result;
use async_nats::jetstream;
use pagestream_pipeline::blob::{page_image_key, BlobStore};
use pagestream_pipeline::consumer::{self, transient, ConsumerSpec, Handler, StageError};
use pagestream_pipeline::progress::{pages_in_state, publish_message};
use pagestream_pipeline::util::now_rfc3339;
use pagestream_pipeline::{progress::Progress, StageContext};
use pagestream_schemas::{
    decode, encode, DocInfo, DocumentFailed, DocumentSubmitted, ErrorInfo, EventState, ImageRef, ModelRef,
    PageInferred, PageRendered, Timings, VERSION,
};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use render::{RenderEvent, RenderRequest, Renderer};

pub const STAGE: &str = "splitter";

/// The splitter's message handler.
pub struct Splitter {
    ctx: StageContext,
    blobs: BlobStore,
    renderer: Renderer,
    progress: Progress,
}

impl Splitter {
    /// Loads pdfium (failing with a clear message when it is missing).
    pub async fn new(ctx: StageContext) -> Result<Self> {
        ctx.health.register(STAGE);
        let lib = ctx.config.splitter.pdfium_library.clone();
        let renderer = tokio::task::spawn_blocking(move || Renderer::get(&lib)).await?.map_err(anyhow::Error::msg)?;
        let blobs = ctx.blobs().await?;
        let progress = ctx.progress(STAGE);
        ctx.health.set_ready(STAGE, true);
        Ok(Splitter { ctx, blobs, renderer, progress })
    }

    /// Tells the uploader and the events stream that the document failed.
    async fn fail_document(&self, sub: &DocumentSubmitted, error: ErrorInfo) -> Result<(), StageError> {
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
            .map_err(transient("nats_publish"))?;
        self.progress
            .doc(&sub.doc_id, EventState::Failed, None, Some(error))
            .await
            .map_err(transient("nats_publish"))?;
        self.ctx.metrics.document(STAGE, "failed");
        Ok(())
    }

    /// Pages of `doc_id` already rendered (from their events).
    async fn rendered_pages(&self, doc_id: &str) -> Result<HashSet<u32>, StageError> {
        let pages = pages_in_state(&self.ctx.js, &self.ctx.names, doc_id, EventState::Rendered)
            .await
            .map_err(|e| StageError::transient("nats", format!("{e:#}")))?;
        Ok(pages.into_iter().collect())
    }

    /// Copies the source PDF to a temporary file; returns it with its sha256 and size.
    async fn fetch(&self, sub: &DocumentSubmitted) -> Result<(tempfile::TempPath, String, u64), StageError> {
        let tmp = tempfile::Builder::new()
            .prefix("pagestream-")
            .suffix(".pdf")
            .tempfile()
            .map_err(transient("tempfile"))?
            .into_temp_path();
        let mut file = tokio::fs::File::create(&tmp).await.map_err(transient("tempfile"))?;
        let src = &sub.source;
        if let Some(bytes) = &src.inline {
            file.write_all(bytes).await.map_err(transient("tempfile"))?;
        } else if let Some(key) = &src.blob {
            if let Err(e) = self.blobs.copy_to(key, &mut file).await {
                return Err(if BlobStore::is_not_found(&e) {
                    StageError::permanent("source_missing", format!("blob {key:?} does not exist in the blob store"))
                } else {
                    StageError::transient("blob_store", format!("{e:#}"))
                });
            }
        } else {
            return Err(StageError::permanent(
                "source_unsupported",
                "source.url is not supported yet: upload through the ingress or send source.inline / source.blob",
            ));
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
        let cfg = &self.ctx.config.splitter;
        let image = if page.png.len() <= cfg.inline_image_max_bytes {
            ImageRef { format: "png".into(), inline: Some(ByteBuf::from(page.png)), blob: None }
        } else {
            let key = page_image_key(&sub.doc_id, page.page, "png");
            self.blobs
                .put_bytes(&key, &page.png)
                .await
                .map_err(|e| StageError::transient("blob_store", format!("{e:#}")))?;
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
            options: sub.options.without_secrets(),
            render_ms: Some(page.render_ms),
        };
        let id = format!("{}:{}:rendered", sub.doc_id, page.page);
        publish_message(&self.ctx.js, self.ctx.names.pages_rendered(), &id, &msg)
            .await
            .map_err(transient("nats_publish"))?;
        self.progress
            .page(&sub.doc_id, page.page, EventState::Rendered, None, Some(page.render_ms))
            .await
            .map_err(transient("nats_publish"))?;
        self.ctx.metrics.page(STAGE);
        Ok(())
    }

    /// A page that cannot be rendered goes straight to the uploader as failed.
    async fn publish_failed_page(
        &self,
        sub: &DocumentSubmitted,
        page_count: u32,
        page: u32,
        message: String,
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
            error: Some(ErrorInfo::new("page_render_failed", message).at_stage(STAGE)),
        };
        let id = format!("{}:{}:rendered", sub.doc_id, page);
        publish_message(&self.ctx.js, self.ctx.names.pages_inferred(), &id, &msg)
            .await
            .map_err(transient("nats_publish"))?;
        self.progress
            .page(&sub.doc_id, page, EventState::Rendered, None, None)
            .await
            .map_err(transient("nats_publish"))?;
        self.ctx.metrics.page_failure(STAGE);
        Ok(())
    }

    async fn split(&self, sub: DocumentSubmitted) -> Result<(), StageError> {
        let doc_id = sub.doc_id.clone();
        if self.ctx.is_cancelled(&doc_id).await? {
            tracing::info!(doc_id, "document cancelled before splitting; skipped");
            self.ctx.metrics.document(STAGE, "cancelled");
            return Ok(());
        }
        let (pdf, sha256, size) = self.fetch(&sub).await.map_err(|e| e.doc(&doc_id))?;
        let cfg = &self.ctx.config.splitter;
        let skip = self.rendered_pages(&doc_id).await?;
        let mut events = self.renderer.render(RenderRequest {
            pdf: pdf.to_path_buf(),
            password: sub.options.password.clone(),
            dpi: sub.options.dpi.unwrap_or(cfg.dpi),
            max_pixels: cfg.max_pixels,
            skip,
        });
        let page_count = match events.recv().await {
            Some(RenderEvent::Opened { page_count }) => page_count,
            Some(RenderEvent::OpenFailed { code, message }) => {
                let err = StageError::permanent(code, message).doc(&doc_id);
                self.fail_document(&sub, err.info()).await?;
                return Err(err);
            }
            other => return Err(StageError::transient("renderer", format!("unexpected render event {other:?}"))),
        };
        if page_count > cfg.max_pages {
            let err = StageError::permanent(
                "too_many_pages",
                format!("the document has {page_count} pages; the limit is {} (splitter.max_pages)", cfg.max_pages),
            )
            .doc(&doc_id);
            self.fail_document(&sub, err.info()).await?;
            return Err(err);
        }
        if page_count == 0 {
            let err = StageError::permanent("pdf_empty", "the document has no pages").doc(&doc_id);
            self.fail_document(&sub, err.info()).await?;
            return Err(err);
        }
        let filename = sub.source.filename.clone();
        let info = DocInfo {
            title: sub.title.clone().or_else(|| filename.clone()),
            filename,
            sha256: Some(sha256),
            bytes: Some(size),
            page_count: Some(page_count),
            model: sub.options.model.clone(),
            ..DocInfo::default()
        };
        self.progress.doc(&doc_id, EventState::Split, Some(info), None).await.map_err(transient("nats_publish"))?;
        while let Some(event) = events.recv().await {
            if self.ctx.is_cancelled(&doc_id).await? {
                // Dropping the receiver stops the render thread after this page.
                tracing::info!(doc_id, "document cancelled; remaining pages skipped");
                self.ctx.metrics.document(STAGE, "cancelled");
                return Ok(());
            }
            match event {
                RenderEvent::Page(page) => self.publish_page(&sub, page_count, page).await?,
                RenderEvent::PageFailed { page, message } => {
                    tracing::warn!(doc_id, page, %message, "page failed to render");
                    self.publish_failed_page(&sub, page_count, page, message).await?;
                }
                other => return Err(StageError::transient("renderer", format!("unexpected render event {other:?}"))),
            }
        }
        self.ctx.metrics.document(STAGE, "split");
        tracing::info!(doc_id, page_count, "document split");
        Ok(())
    }
}

impl Handler for Splitter {
    async fn handle(&self, msg: &jetstream::Message) -> Result<(), StageError> {
        let sub: DocumentSubmitted = decode(&msg.payload).map_err(|e| StageError::permanent("bad_message", e))?;
        let doc_id = sub.doc_id.clone();
        self.split(sub).await.map_err(|e| e.or_doc(&doc_id))
    }

    /// Retries exhausted (blob store or NATS down for good): the document fails.
    async fn give_up(&self, msg: &jetstream::Message, err: &StageError) -> Result<(), StageError> {
        match decode::<DocumentSubmitted>(&msg.payload) {
            Ok(sub) => self.fail_document(&sub, err.info()).await,
            Err(_) => Ok(()),
        }
    }

    /// Dead letters keep the submission, minus its password.
    fn redact(&self, payload: &[u8]) -> Vec<u8> {
        match decode::<DocumentSubmitted>(payload) {
            Ok(mut sub) if sub.options.password.is_some() => {
                sub.options = sub.options.without_secrets();
                encode(&sub)
            }
            _ => payload.to_vec(),
        }
    }
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

/// Runs the splitter until `shutdown`.
pub async fn run(ctx: StageContext, shutdown: CancellationToken) -> Result<()> {
    let spec = ConsumerSpec {
        stage: STAGE,
        stream: ctx.names.docs_stream(),
        durable: "splitter".into(),
        concurrency: ctx.config.splitter.concurrency,
        max_deliver: ctx.config.nats.max_deliver,
    };
    let splitter = Arc::new(Splitter::new(ctx.clone()).await?);
    consumer::run(ctx.js.clone(), ctx.names.clone(), spec, splitter, ctx.metrics.clone(), shutdown).await
}
