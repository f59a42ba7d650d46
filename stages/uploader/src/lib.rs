//! Uploader: the sink. For each `PageInferred` it writes the page image and
//! the page JSON, records the page as uploaded (or failed), and when every
//! page of the document has an outcome writes `manifest.json` ([`layout`]).
//! For a `DocumentFailed` it writes a manifest with `status: failed`.
//!
//! Completion: after its page is marked in the document's counters, the
//! uploader reads the uploaded and failed page sets (two reads, whatever the
//! page count); whoever sees them cover `page_count` pages writes the manifest. Two uploaders finishing the last
//! pages at once may both write it — with the same content, atomically — so
//! the manifest is always complete and never missing.
//!
//! Knows nothing about PDFs or models beyond the message fields.

use std::sync::Arc;

use anyhow::Result;
use pagestream_pipeline::blob::{read_image, upload_key, BlobStore};
use pagestream_pipeline::consumer::{self, ConsumerSpec, Delivery, Handler, StageError};
use pagestream_pipeline::nats::Names;
use pagestream_pipeline::progress::{DocState, Progress, ProgressError};
use pagestream_pipeline::util::now_rfc3339;
use pagestream_pipeline::StageContext;
use pagestream_schemas::{
    decode, DecodeError, DocInfo, DocumentCancelled, DocumentFailed, ErrorInfo, EventState, FinalStatus, ModelRef,
    PageInferred,
};
use tokio_util::sync::CancellationToken;

use pagestream_results::layout::{Keys, Manifest, PageResult, SourceInfo, MANIFEST_SCHEMA};
use pagestream_results::ResultStore;

mod config;
mod crops;
pub use config::UploaderConfig;

pub const STAGE: &str = "uploader";

pub struct Uploader {
    ctx: StageContext,
    /// `[uploader]`.
    cfg: UploaderConfig,
    blobs: BlobStore,
    store: ResultStore,
    progress: Progress,
    /// The roles of the regions cut out of the page (`uploader.crops`).
    crop_roles: Vec<pagestream_results::content::Role>,
}

fn store_err(e: anyhow::Error) -> StageError {
    StageError::transient("result_store", format!("{e:#}"))
}

impl Uploader {
    pub async fn new(ctx: StageContext, cfg: UploaderConfig) -> Result<Self> {
        ctx.health.register(STAGE);
        let store = ResultStore::from_config(&cfg.results).await?;
        let blobs = ctx.blobs().await?;
        let progress = ctx.progress(STAGE);
        ctx.health.set_ready(STAGE, true);
        let crop_roles = cfg.crop_roles();
        Ok(Uploader { ctx, cfg, blobs, store, progress, crop_roles })
    }

    fn keys(&self, doc_id: &str) -> Keys {
        Keys::new(&self.cfg.results.prefix, doc_id)
    }

    /// Writes one result object (`kind`: image, json or manifest), counted
    /// in `pagestream_result_bytes_total`.
    async fn put(&self, kind: &'static str, key: &str, bytes: Vec<u8>, content_type: &str) -> Result<(), StageError> {
        let n = bytes.len();
        self.store.put(key, bytes, content_type).await.map_err(store_err)?;
        self.ctx.metrics.result_bytes(kind, n);
        Ok(())
    }

    async fn page(&self, msg: PageInferred) -> Result<(), StageError> {
        let doc_id = msg.doc_id.clone();
        if self.ctx.is_cancelled(&doc_id).await? {
            tracing::debug!(doc_id, page = msg.page, "document cancelled; page skipped");
            self.ctx.metrics.message(STAGE, "skipped_cancelled");
            if let Some(key) = msg.image.as_ref().and_then(|i| i.blob.as_ref()) {
                let _ = self.blobs.delete(key).await;
            }
            return Ok(());
        }
        // A page message cannot claim another page count than its document's
        // (a publisher on the internal subjects could otherwise inflate the
        // counts or finish a document early).
        let known = self.ctx.events.page_count(&doc_id).await.map_err(StageError::nats)?;
        if let Some(n) = known.filter(|n| *n != msg.page_count || msg.page > *n) {
            if let Some(key) = msg.image.as_ref().and_then(|i| i.blob.as_ref()) {
                let _ = self.blobs.delete(key).await;
            }
            return Err(StageError::permanent(
                "bad_message",
                format!("page {} of {} does not fit the document's {n} pages", msg.page, msg.page_count),
            )
            .doc(&doc_id));
        }
        let keys = self.keys(&doc_id);
        match (&msg.error, &msg.image) {
            (Some(err), _) => {
                self.progress
                    .page(&doc_id, msg.page, EventState::Failed, Some(err.clone()), None)
                    .await
                    .map_err(StageError::publish)?;
                self.ctx.metrics.page_failure(STAGE);
            }
            (None, Some(image)) => {
                let started = std::time::Instant::now();
                let png = match read_image(&self.blobs, image).await {
                    Ok(png) => png,
                    // Redelivered after a lost ack: the page was uploaded and
                    // its claim-check blob released. Done; only finish up.
                    Err(e)
                        if e.code == "image_missing"
                            && self.ctx.page_reached(&doc_id, msg.page, EventState::Uploaded).await? =>
                    {
                        tracing::info!(doc_id, page = msg.page, "page already uploaded; redelivery acknowledged");
                        let model = (!msg.model.name.is_empty()).then(|| msg.model.clone());
                        return self.finalize_if_done(&doc_id, msg.page_count, model).await;
                    }
                    Err(e) => return Err(e),
                };
                let png_for_crops = if self.crop_roles.is_empty() { Vec::new() } else { png.clone() };
                self.put("image", &keys.page_image(msg.page), png, "image/png").await?;
                // What each box says, in reading order (pure; the rules are
                // pagestream_results::content's).
                let (mut detections, unassigned_text) =
                    pagestream_results::content::assign(&msg.detections, msg.text.as_ref());
                self.write_crops(&keys, msg.page, &png_for_crops, &mut detections).await?;
                let result = PageResult {
                    page: msg.page,
                    width: msg.width,
                    height: msg.height,
                    dpi: msg.dpi,
                    model: msg.model.clone(),
                    detections,
                    unassigned_text,
                    timings: msg.timings.clone(),
                };
                let json = serde_json::to_vec_pretty(&result).expect("page result serialises");
                self.put("json", &keys.page_json(msg.page), json, "application/json").await?;
                self.progress
                    .page(&doc_id, msg.page, EventState::Uploaded, None, Some(started.elapsed().as_secs_f32() * 1000.0))
                    .await
                    .map_err(StageError::publish)?;
                if let Some(key) = &image.blob {
                    // Results are durable; the claim-check copy is garbage now.
                    if let Err(e) = self.blobs.delete(key).await {
                        tracing::warn!(doc_id, key, error = %e, "could not delete page blob (it expires with the bucket's max age)");
                    }
                }
                self.ctx.metrics.page(STAGE);
            }
            (None, None) => {
                return Err(StageError::permanent("bad_message", "PageInferred without image or error").doc(&doc_id))
            }
        }
        let model = (!msg.model.name.is_empty()).then(|| msg.model.clone());
        self.finalize_if_done(&doc_id, msg.page_count, model).await
    }

    /// Cuts the regions `uploader.crops` names out of the page image and
    /// writes each beside the page (before the page JSON that names them:
    /// a redelivered page writes the same keys again).
    async fn write_crops(
        &self,
        keys: &Keys,
        page: u32,
        png: &[u8],
        detections: &mut [pagestream_results::DetectionResult],
    ) -> Result<(), StageError> {
        let wanted: Vec<usize> = detections
            .iter()
            .enumerate()
            .filter(|(_, d)| self.crop_roles.contains(&pagestream_results::content::role(&d.label)))
            .map(|(i, _)| i)
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let boxes: Vec<[f32; 4]> = wanted.iter().map(|&i| detections[i].bbox).collect();
        let png = png.to_vec();
        let crops = tokio::task::spawn_blocking(move || crops::cut(&png, &boxes))
            .await
            .map_err(pagestream_pipeline::consumer::transient("join"))?
            .map_err(|m| StageError::permanent("image_invalid", m))?;
        for (i, crop) in wanted.into_iter().zip(crops) {
            let Some(bytes) = crop else { continue };
            let order = detections[i].order.unwrap_or(i as u32);
            self.put("crop", &keys.crop(page, order), bytes, "image/png").await?;
            detections[i].crop = Some(pagestream_results::layout::rel_crop(page, order));
        }
        Ok(())
    }

    /// Writes the manifest when every page has an outcome.
    async fn finalize_if_done(&self, doc_id: &str, page_count: u32, model: Option<ModelRef>) -> Result<(), StageError> {
        // Cheap check first (two counter reads): only the last page(s) pay
        // for a full status read.
        let nats = |e: anyhow::Error| StageError::nats(e);
        let counters = &self.ctx.counters;
        let (uploaded, failed) =
            tokio::try_join!(counters.get(doc_id, EventState::Uploaded), counters.get(doc_id, EventState::Failed))
                .map_err(nats)?;
        if uploaded.union_len(&failed) < page_count {
            return Ok(());
        }
        let status = self
            .ctx
            .status(doc_id, true)
            .await
            .map_err(StageError::nats)?
            .ok_or_else(|| StageError::transient("status_missing", format!("no events for {doc_id} yet")))?;
        if !status.all_pages_done() || status.state == DocState::Cancelled {
            return Ok(());
        }
        let manifest = Manifest::from_status(&status, manifest_model(model, &status.info), now_rfc3339());
        self.write_manifest(doc_id, &manifest).await
    }

    async fn write_manifest(&self, doc_id: &str, manifest: &Manifest) -> Result<(), StageError> {
        let key = self.keys(doc_id).manifest();
        let json = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
        self.put("manifest", &key, json, "application/json").await?;
        let info = DocInfo {
            status: Some(manifest.status),
            manifest: Some(self.store.location(&key)),
            page_count: manifest.page_count,
            ..DocInfo::default()
        };
        // A document whose every page failed carries the reason, as a
        // document failure does.
        let error = manifest.error.clone();
        self.progress.doc(doc_id, EventState::Completed, Some(info), error).await.map_err(StageError::publish)?;
        self.ctx.metrics.document(STAGE, manifest.status.as_str());
        tracing::info!(doc_id, status = %manifest.status, manifest = %self.store.location(&key), "document finished");
        // The uploaded PDF is not needed any more (a splitter turn
        // redelivered later sees the document finished and skips it).
        if let Err(e) = self.blobs.delete(&upload_key(doc_id)).await {
            tracing::warn!(doc_id, error = %e, "could not delete the source PDF (it expires with the bucket's max age)");
        }
        Ok(())
    }

    /// Records the cancellation (once: the ingress usually has already) and
    /// writes a manifest with the pages finished so far.
    async fn document_cancelled(&self, msg: DocumentCancelled) -> Result<(), StageError> {
        let doc_id = msg.doc_id.as_str();
        let nats = |e: ProgressError| StageError::nats(e);
        let key = self.keys(doc_id).manifest();
        let info = DocInfo {
            status: Some(FinalStatus::Cancelled),
            manifest: Some(self.store.location(&key)),
            ..DocInfo::default()
        };
        self.progress.doc(doc_id, EventState::Cancelled, Some(info), None).await.map_err(StageError::publish)?;
        let Some(status) = self.ctx.status(doc_id, true).await.map_err(nats)? else {
            return Ok(());
        };
        if status.state != DocState::Cancelled {
            // It had already finished: its manifest stands.
            return Ok(());
        }
        let uploaded: Vec<u32> = status.counters.uploaded.pages().collect();
        let model = manifest_model(None, &status.info);
        let manifest = Manifest::cancelled(&status, &uploaded, model, msg.at.clone());
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        self.put("manifest", &key, json, "application/json").await?;
        self.ctx.metrics.document(STAGE, "cancelled");
        tracing::info!(doc_id, pages_kept = uploaded.len(), "document cancelled; manifest written");
        Ok(())
    }

    async fn document_failed(&self, msg: DocumentFailed) -> Result<(), StageError> {
        let status = self.ctx.status(&msg.doc_id, false).await.map_err(StageError::nats)?;
        if status.as_ref().is_some_and(|s| s.info.manifest.is_some()) {
            // Already finished (completed, cancelled, or this message
            // redelivered): a late failure never overwrites a manifest.
            tracing::info!(doc_id = msg.doc_id, "document already finished; failure not recorded over it");
            return Ok(());
        }
        let info = status.as_ref().map(|s| s.info.clone()).unwrap_or_default();
        let manifest = Manifest {
            schema: MANIFEST_SCHEMA.into(),
            doc_id: msg.doc_id.clone(),
            title: msg.title.clone().or(info.title).or_else(|| msg.source.filename.clone()),
            source: SourceInfo {
                filename: msg.source.filename.clone().or(info.filename),
                sha256: msg.source.sha256.clone().or(info.sha256),
                bytes: msg.source.bytes.or(info.bytes),
            },
            page_count: info.page_count,
            status: FinalStatus::Failed,
            error: Some(msg.error.clone()),
            model: None,
            pages: Vec::new(),
            queued_at: status.as_ref().and_then(|s| s.queued_at.clone()),
            started_at: status.as_ref().and_then(|s| s.started_at.clone()),
            finished_at: msg.at.clone(),
        };
        self.write_manifest(&msg.doc_id, &manifest).await
    }
}

/// What the uploader consumes: pages, and documents that failed or were
/// cancelled as a whole (told apart by subject).
#[derive(Debug)]
pub enum UploaderInput {
    Page(PageInferred),
    Failed(DocumentFailed),
    Cancelled(DocumentCancelled),
}

impl consumer::Input for UploaderInput {
    fn decode(names: &Names, delivery: &Delivery, payload: &[u8]) -> Result<Self, DecodeError> {
        Ok(if delivery.subject == names.docs_cancelled() {
            UploaderInput::Cancelled(decode(payload)?)
        } else if delivery.subject == names.docs_failed() {
            UploaderInput::Failed(decode(payload)?)
        } else {
            UploaderInput::Page(decode(payload)?)
        })
    }

    fn doc_id(&self) -> Option<&str> {
        Some(match self {
            UploaderInput::Page(m) => &m.doc_id,
            UploaderInput::Failed(m) => &m.doc_id,
            UploaderInput::Cancelled(m) => &m.doc_id,
        })
    }

    fn page(&self) -> Option<u32> {
        match self {
            UploaderInput::Page(m) => Some(m.page),
            _ => None,
        }
    }
}

impl Handler for Uploader {
    type Input = UploaderInput;

    /// Retries exhausted (result store unreachable for good): the page is
    /// recorded as failed with the reason, and the manifest is attempted.
    async fn give_up(&self, input: UploaderInput, _: &Delivery, err: &StageError) -> Result<(), StageError> {
        let UploaderInput::Page(page) = input else { return Ok(()) };
        let doc_id = &page.doc_id;
        // A page whose results are written (the manifest write was what
        // kept failing) is not failed after the fact: counts stay exact.
        if !self.ctx.page_reached(doc_id, page.page, EventState::Uploaded).await? {
            self.progress
                .page(doc_id, page.page, EventState::Failed, Some(err.info()), None)
                .await
                .map_err(StageError::publish)?;
            self.ctx.metrics.page_failure(STAGE);
        }
        if let Err(e) = self.finalize_if_done(doc_id, page.page_count, None).await {
            // Every page has an outcome but the manifest cannot be written
            // (the store that failed the page is still failing): the
            // document still ends, failed with the reason, rather than stay
            // `running` with nothing left to retry it.
            let info = ErrorInfo::new(
                "manifest_unwritten",
                format!("every page has an outcome, but the manifest could not be written: {}", e.info().message),
            )
            .at_stage(STAGE);
            self.progress.doc(doc_id, EventState::Failed, None, Some(info)).await.map_err(StageError::publish)?;
            self.ctx.metrics.document(STAGE, "failed");
            tracing::error!(doc_id, error = %e, "manifest not written; document marked failed");
        }
        Ok(())
    }

    async fn handle(&self, input: UploaderInput, _: &Delivery) -> Result<(), StageError> {
        match input {
            UploaderInput::Page(page) => self.page(page).await,
            UploaderInput::Failed(failed) => self.document_failed(failed).await,
            UploaderInput::Cancelled(cancelled) => self.document_cancelled(cancelled).await,
        }
    }
}

/// Runs the uploader until `shutdown`.
pub async fn run(ctx: StageContext, cfg: UploaderConfig, shutdown: CancellationToken) -> Result<()> {
    let spec = ConsumerSpec::new(&ctx, STAGE, ctx.names.inferred_stream(), "uploader".into(), cfg.concurrency);
    let uploader = Arc::new(Uploader::new(ctx.clone(), cfg).await?);
    spec.run(&ctx, uploader, shutdown).await
}

/// The `uploader` executable: its settings from the configuration sources,
/// its admin endpoints, [`run`] until SIGTERM. `pagestream` runs this
/// too when it is called `uploader` (a link to it, as in the container image).
pub async fn binary() -> Result<()> {
    pagestream_pipeline::bin::run_stage(
        STAGE,
        "uploader — writes page images, detections and manifests (local directory or S3)",
        |sources| sources.section::<UploaderConfig>(),
        |c| c.admin_addr.clone(),
        run,
    )
    .await
}

/// The model a manifest names: the weights the page message that finished
/// the document names (they really processed it), else the model the
/// splitter decided for the document (name and weights, on its split event,
/// read back with the status) — never the page results read back from the
/// store. `None` when the splitter recorded no agreed weights (live
/// replicas disagreed, e.g. mid rolling update) and no page message names any.
pub(crate) fn manifest_model(from_page: Option<ModelRef>, info: &DocInfo) -> Option<ModelRef> {
    from_page
        .filter(|m| !m.name.is_empty())
        .or_else(|| Some(ModelRef { name: info.model.clone()?, sha256: info.model_sha256.clone()? }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, sha: &str) -> ModelRef {
        ModelRef { name: name.into(), sha256: sha.into() }
    }

    #[test]
    fn the_manifest_names_the_pages_weights_else_the_splitters_decision() {
        let decided =
            DocInfo { model: Some("layout_cdla".into()), model_sha256: Some("aa".into()), ..DocInfo::default() };
        // A page that was inferred names the weights that processed it
        // (a canary's may differ from the decision).
        assert_eq!(manifest_model(Some(model("layout_cdla", "bb")), &decided), Some(model("layout_cdla", "bb")));
        // The last page failed before inference (no model): the decision.
        assert_eq!(manifest_model(None, &decided), Some(model("layout_cdla", "aa")));
        assert_eq!(manifest_model(Some(model("", "")), &decided), Some(model("layout_cdla", "aa")));
        // No agreed weights recorded and no page names any: none.
        let unagreed = DocInfo { model_sha256: None, ..decided };
        assert_eq!(manifest_model(None, &unagreed), None);
        assert_eq!(manifest_model(None, &DocInfo::default()), None);
    }
}
