//! Inferencer: runs the detection model on each `PageRendered` and publishes
//! a `PageInferred` with the detections (the page image reference passes
//! through for the uploader).
//!
//! Every served model is loaded once, at start, from its manifest
//! ([`manifest`]) on ONNX Runtime or tract ([`backend`], [`engine`]) and
//! warmed up before the stage reports ready. Pre-processing
//! ([`preprocess`]), decoding ([`picodet`], [`yolov8`], [`boxes`]) and NMS
//! ([`nms`]) are plain Rust. Each model has its inference thread(s) fed by a
//! [`batch::Batcher`]. A page whose image cannot be decoded or inferred is
//! forwarded as failed, with the reason.
//!
//! Model fleets: pages arrive per model (`<p>.pages.rendered.<model>`), from
//! one durable consumer per model shared by every replica serving it, so a
//! replica only ever sees pages of its own models and a page is never
//! inferred by another model than its document's. Each replica advertises
//! what it serves in the live registry (`pagestream_pipeline::registry`)
//! and refuses to start when its weights differ from the live fleet's for
//! the same model name, unless it is a canary (`inferencer.canary`).
//!
//! Knows nothing about PDFs or result storage.

pub mod backend;
pub mod batch;
pub mod boxes;
mod config;
pub mod engine;
pub mod gate;
pub mod manifest;
pub mod nms;
pub mod ocr;
pub mod picodet;
pub mod preprocess;
pub mod yolov8;

use std::sync::Arc;

use anyhow::Result;
use image::RgbImage;
use pagestream_pipeline::blob::{read_image, BlobStore};
use pagestream_pipeline::consumer::{transient, ConsumerSpec, Delivery, Handler, StageError};
use pagestream_pipeline::progress::{publish_message, Progress};
use pagestream_pipeline::registry;
use pagestream_pipeline::StageContext;
use pagestream_schemas::{EventState, ModelReplica, PageInferred, PageRendered, Timings, VERSION};
use tokio_util::sync::CancellationToken;

pub use config::{Backend, Device, InferencerConfig};

pub use batch::Batcher;
pub use engine::Detector;

pub const STAGE: &str = "inferencer";

pub struct Inferencer {
    ctx: StageContext,
    /// `[inferencer]`.
    cfg: InferencerConfig,
    blobs: BlobStore,
    /// Served models, `inferencer.model` first.
    models: Vec<Batcher>,
    /// The OCR models (`inferencer.ocr_model`), if any: checked at start,
    /// loaded when the first page to be read comes ([`LazyOcr`]).
    ocr: Option<LazyOcr>,
    progress: Progress,
    /// This process in the model registry.
    replica: String,
}

/// The OCR models of `inferencer.ocr_model`, loaded on first use and kept.
struct LazyOcr {
    cfg: InferencerConfig,
    metrics: Arc<pagestream_pipeline::metrics::Metrics>,
    loaded: tokio::sync::OnceCell<Arc<ocr::Ocr>>,
}

impl LazyOcr {
    async fn load_now(&self) -> anyhow::Result<Arc<ocr::Ocr>> {
        let c = self.cfg.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            ocr::Ocr::load(&c.models_dir, &c.weights_dir, &c.ocr_model, &backend::EngineOptions::from_config(&c))
        })
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Arc::new(loaded))
    }

    /// The models, loaded by the first caller (the others wait for it). A
    /// load that fails (it passed at start: the files changed since, or
    /// memory ran out) fails the page as transient, to be redelivered.
    async fn get(&self) -> Result<Arc<ocr::Ocr>, StageError> {
        self.loaded
            .get_or_try_init(|| async {
                let started = std::time::Instant::now();
                let ocr = self.load_now().await?;
                tracing::info!(
                    model = %ocr.manifest.name,
                    ms = started.elapsed().as_millis() as u64,
                    "OCR models loaded for the first page to read"
                );
                self.metrics.ocr_models_loaded(&self.cfg.ocr_model, true);
                Ok::<_, anyhow::Error>(ocr)
            })
            .await
            .cloned()
            .map_err(|e| StageError::transient("ocr_load", format!("loading the OCR models: {e:#}")))
    }
}

/// Decodes a PNG page image.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, String> {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .map(|i| i.to_rgb8())
        .map_err(|e| format!("page image is not a valid PNG: {e}"))
}

impl Inferencer {
    /// Loads and warms up every served model; fails with a precise message
    /// when one cannot be loaded (the stage then never turns ready).
    pub async fn new(ctx: StageContext, cfg: InferencerConfig) -> Result<Self> {
        ctx.health.register(STAGE);
        let wait = std::time::Duration::from_millis(cfg.batch_wait_ms);
        let mut models = Vec::new();
        for name in cfg.served_models() {
            let c = cfg.clone();
            let detector = tokio::task::spawn_blocking(move || -> Result<Detector, String> {
                let d = Detector::load(&c, &name).map_err(|e| e.to_string())?;
                // Warm up so the first real page is not slow and readiness is honest.
                d.detect(&RgbImage::new(64, 64)).map_err(|e| format!("model {name}: warm-up failed: {e}"))?;
                Ok(d)
            })
            .await?
            .map_err(anyhow::Error::msg)?;
            tracing::info!(
                model = %detector.model.name,
                sha256 = %detector.model.sha256,
                backend = detector.backend.as_str(),
                device = detector.device(),
                max_batch = detector.max_batch(),
                labels = ?detector.labels,
                "model loaded"
            );
            ctx.metrics.model_loaded(
                &detector.model.name,
                detector.backend.as_str(),
                cfg.device.as_str(),
                detector.device(),
            );
            models.push(Batcher::spawn(Arc::new(detector), cfg.batch_size, wait));
        }
        let ocr = if cfg.ocr_model.is_empty() {
            tracing::info!("no OCR (inferencer.ocr_model is empty): pages without a text layer get no text");
            None
        } else {
            let lazy = LazyOcr { cfg: cfg.clone(), metrics: ctx.metrics.clone(), loaded: Default::default() };
            // Loaded once now, so that a missing, corrupt or mismatched
            // model stops the stage at start, then dropped until a page
            // needs it: ~140 MiB of ONNX Runtime sessions not held by an
            // inferencer that sees only pages with a text layer.
            let checked = lazy.load_now().await?;
            tracing::info!(
                model = %checked.manifest.name,
                sha256 = %checked.sha256,
                backend = cfg.backend.as_str(),
                default_mode = cfg.ocr.as_str(),
                "OCR models checked; loaded again when the first page to read comes"
            );
            drop(checked);
            ctx.metrics.ocr_models_loaded(&cfg.ocr_model, false);
            Some(lazy)
        };
        let blobs = ctx.blobs().await?;
        let progress = ctx.progress(STAGE);
        let replica = registry::replica_id();
        Ok(Inferencer { ctx, cfg, blobs, models, ocr, progress, replica })
    }

    /// This replica's registry entries, one per served model.
    fn advertisements(&self) -> Vec<ModelReplica> {
        let cfg = &self.cfg;
        let started_at = pagestream_pipeline::util::now_rfc3339();
        self.models
            .iter()
            .map(|b| {
                let d = &b.detector;
                ModelReplica {
                    model: d.model.name.clone(),
                    sha256: d.model.sha256.clone(),
                    labels: d.labels.clone(),
                    backend: d.backend.as_str().into(),
                    device: d.device().into(),
                    batch_size: cfg.batch_size.clamp(1, d.max_batch().max(1)),
                    canary: cfg.canary,
                    replica: self.replica.clone(),
                    host: registry::host_name(),
                    started_at: started_at.clone(),
                }
            })
            .collect()
    }

    /// Joins the fleet: refuses conflicting weights, creates each model's
    /// consumer, advertises the models (until `shutdown`) and turns ready.
    async fn join_fleet(&self, shutdown: CancellationToken) -> Result<()> {
        let ctx = &self.ctx;
        let ads = self.advertisements();
        let store = registry::bucket(&ctx.js, &ctx.names, ctx.config.nats.replicas).await?;
        for ad in &ads {
            let fleet = registry::read_model(&store, &ad.model).await?;
            registry::check_weights(ad, fleet.as_ref()).map_err(anyhow::Error::msg)?;
            pagestream_pipeline::nats::provision_model_consumer(&ctx.js, &ctx.names, &ctx.config.nats, &ad.model)
                .await?;
        }
        registry::advertise(store, ads, shutdown).await?;
        ctx.health.set_ready(STAGE, true);
        Ok(())
    }

    /// The model that infers pages of `queue` ([`page_model`]).
    fn model_for(&self, queue: &str) -> Result<&Batcher, StageError> {
        let served: Vec<&str> = self.models.iter().map(|b| b.detector.model.name.as_str()).collect();
        page_model(queue, &served).map(|i| &self.models[i])
    }

    /// The output message for `page`, before detection, naming the model
    /// that infers it (`model`), else the one the page asked for.
    fn output(&self, page: &PageRendered, queue: &str, model: Option<&Batcher>) -> PageInferred {
        let model = match model {
            Some(b) => b.detector.model.clone(),
            None => pagestream_schemas::ModelRef { name: queue.to_string(), sha256: String::new() },
        };
        PageInferred {
            v: VERSION,
            doc_id: page.doc_id.clone(),
            page: page.page,
            page_count: page.page_count,
            width: page.width,
            height: page.height,
            dpi: page.dpi,
            model,
            detections: Vec::new(),
            image: Some(page.image.clone()),
            timings: Timings { render_ms: page.render_ms, infer_ms: None, ocr_ms: None },
            error: None,
            text: page.text.clone(),
        }
    }

    /// Publishes the result (or the failure) of a page downstream.
    async fn forward(&self, out: &PageInferred) -> Result<(), StageError> {
        let id = format!("{}:{}:inferred", out.doc_id, out.page);
        publish_message(&self.ctx.js, self.ctx.names.pages_inferred(), &id, out).await.map_err(StageError::publish)?;
        self.progress
            .page(&out.doc_id, out.page, EventState::Inferred, None, out.timings.infer_ms)
            .await
            .map_err(StageError::publish)
    }

    async fn infer(&self, page: PageRendered, queue: &str) -> Result<(), StageError> {
        let doc_id = page.doc_id.clone();
        let model = self.model_for(queue);
        let mut out = self.output(&page, queue, model.as_ref().ok().copied());
        let detected = match model {
            Ok(batcher) => self.detect(&page, batcher).await,
            Err(e) => Err(e),
        };
        let permanent = match detected {
            Ok((detections, infer_ms, read)) => {
                out.detections = detections;
                out.timings.infer_ms = Some(infer_ms);
                if let Some((text, ocr_ms)) = read {
                    out.text = Some(text);
                    out.timings.ocr_ms = Some(ocr_ms);
                }
                None
            }
            // Redelivered after a lost ack: the page went downstream and the
            // uploader already released its image. Nothing left to do.
            Err(e)
                if e.code == "image_missing"
                    && self.ctx.page_reached(&doc_id, page.page, EventState::Inferred).await? =>
            {
                tracing::info!(doc_id, page = page.page, "page already inferred; redelivery acknowledged");
                return Ok(());
            }
            Err(e) if e.kind == pagestream_pipeline::ErrorKind::Permanent => {
                out.image = None;
                out.error = Some(e.info().at_stage(STAGE));
                Some(e.doc(&doc_id))
            }
            Err(e) => return Err(e.doc(&doc_id)),
        };
        self.forward(&out).await?;
        if permanent.is_some() {
            self.release_image(&page).await;
        }
        match permanent {
            None => {
                self.ctx.metrics.page(STAGE);
                self.ctx.metrics.model_page(queue);
                Ok(())
            }
            Some(e) => {
                self.ctx.metrics.page_failure(STAGE);
                Err(e)
            }
        }
    }

    /// The OCR models, when `page` is to be read by OCR (its document's
    /// `ocr` option, else `inferencer.ocr`, and its text layer); loaded by
    /// the first page that needs them.
    async fn ocr_for(&self, page: &PageRendered) -> Result<Option<Arc<ocr::Ocr>>, StageError> {
        let mode = page.ocr.unwrap_or(self.cfg.ocr);
        match &self.ocr {
            Some(lazy) if mode.wants_ocr(page.text.as_ref()) => Ok(Some(lazy.get().await?)),
            _ => Ok(None),
        }
    }

    /// The page's detections and their time, and what OCR read on it with
    /// its time, when it is to be read ([`Inferencer::ocr_for`]).
    async fn detect(&self, page: &PageRendered, batcher: &Batcher) -> Result<Detected, StageError> {
        let bytes = read_image(&self.blobs, &page.image).await?;
        let started = std::time::Instant::now();
        let img = tokio::task::spawn_blocking(move || decode_image(&bytes))
            .await
            .map_err(transient("join"))?
            .map_err(|m| StageError::permanent("image_invalid", m))?;
        let decode_ms = started.elapsed().as_secs_f32() * 1000.0;
        let ocr = self.ocr_for(page).await?.map(|o| (o, img.clone()));
        let (mut detections, t) =
            batcher.detect(img).await.map_err(|m| StageError::permanent("inference_failed", m))?;
        let read = match ocr {
            Some((ocr, img)) => {
                let started = std::time::Instant::now();
                let page_read = tokio::task::spawn_blocking(move || ocr.recognize(&img))
                    .await
                    .map_err(transient("join"))?
                    .map_err(|m| StageError::permanent("ocr_failed", format!("OCR failed: {m}")))?;
                let ms = started.elapsed().as_secs_f32() * 1000.0;
                tracing::debug!(doc_id = %page.doc_id, page = page.page, lines = page_read.lines.len(), ms, "page read by OCR");
                Some((page_read.text, ms))
            }
            None => None,
        };
        let max = self.cfg.max_detections;
        if detections.len() > max {
            tracing::warn!(doc_id = %page.doc_id, page = page.page, found = detections.len(), kept = max, "too many detections; keeping the highest scores (inferencer.max_detections)");
            detections.sort_by(|a, b| b.score.total_cmp(&a.score));
            detections.truncate(max);
        }
        // The page's own work (PNG decode, pre-processing, model, decoding),
        // not the time it waited for the inference thread behind another page.
        Ok((detections, decode_ms + t.preprocess_ms + t.model_ms + t.decode_ms, read))
    }
}

/// A page's detections, their time (ms), and its text read by OCR with
/// the time that took (ms), if it was.
type Detected = (Vec<pagestream_schemas::Detection>, f32, Option<(pagestream_schemas::PageText, f32)>);

/// Which of the `served` models (its index) infers a page pulled from the
/// queue of model `queue` (the page's subject names its document's model);
/// a queue this replica does not serve is `model_unknown`.
/// Both are permanent.
pub fn page_model(queue: &str, served: &[&str]) -> Result<usize, StageError> {
    served.iter().position(|m| *m == queue).ok_or_else(|| {
        StageError::permanent(
            "model_unknown",
            format!("model {queue:?} is not served by this inferencer (it serves {served:?})"),
        )
    })
}

/// The model whose queue a message came from: the last token of
/// `<p>.pages.rendered.<model>`.
fn queue_of(delivery: &Delivery) -> &str {
    delivery.subject.rsplit('.').next().unwrap_or("")
}

impl Handler for Inferencer {
    type Input = PageRendered;

    async fn handle(&self, page: PageRendered, delivery: &Delivery) -> Result<(), StageError> {
        let queue = queue_of(delivery);
        let doc_id = page.doc_id.clone();
        if self.ctx.is_cancelled(&doc_id).await? {
            tracing::debug!(doc_id, page = page.page, "document cancelled; page skipped");
            self.ctx.metrics.message(STAGE, "skipped_cancelled");
            if let Some(key) = &page.image.blob {
                let _ = self.blobs.delete(key).await;
            }
            return Ok(());
        }
        self.infer(page, queue).await
    }

    /// Retries exhausted: the page goes downstream as failed, so its
    /// document still finishes (`completed_with_errors`).
    async fn give_up(&self, page: PageRendered, delivery: &Delivery, err: &StageError) -> Result<(), StageError> {
        let queue = queue_of(delivery);
        let mut out = self.output(&page, queue, self.model_for(queue).ok());
        out.image = None;
        out.error = Some(err.info().at_stage(STAGE));
        self.forward(&out).await?;
        self.release_image(&page).await;
        Ok(())
    }
}

impl Inferencer {
    /// Deletes the claim-check image of a page that failed here (it went
    /// downstream without it): nothing else would.
    async fn release_image(&self, page: &PageRendered) {
        if let Some(key) = &page.image.blob {
            if let Err(e) = self.blobs.delete(key).await {
                tracing::warn!(doc_id = page.doc_id, key, error = %e, "could not delete the image of a failed page");
            }
        }
    }
}

/// Publishes each served model's queue lag (`pagestream_model_pages_pending`,
/// `…_in_flight`) every few seconds, for autoscaling each fleet on its own.
async fn report_lag(ctx: StageContext, models: Vec<String>, shutdown: CancellationToken) {
    let Ok(stream) = ctx.js.get_stream(ctx.names.pages_stream()).await else { return };
    loop {
        for model in &models {
            if let Ok(info) = stream.consumer_info(ctx.names.model_consumer(model)).await {
                ctx.metrics.model_queue(model, info.num_pending, info.num_ack_pending);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
    }
}

/// Runs the inferencer until `shutdown`: one consumer loop per served model.
pub async fn run(ctx: StageContext, cfg: InferencerConfig, shutdown: CancellationToken) -> Result<()> {
    let inferencer = Arc::new(Inferencer::new(ctx.clone(), cfg).await?);
    inferencer.join_fleet(shutdown.clone()).await?;
    let batch = inferencer.cfg.batch_size.max(1);
    let names: Vec<String> = inferencer.models.iter().map(|b| b.detector.model.name.clone()).collect();
    tokio::spawn(report_lag(ctx.clone(), names, shutdown.clone()));
    let mut loops = tokio::task::JoinSet::new();
    for b in &inferencer.models {
        // The pull window: enough pages in flight to fill a batch, or to
        // keep every inference thread busy, plus one: the next page is
        // fetched and decoded while the model runs, so the model never
        // waits for NATS or the PNG decoder.
        let spec = ConsumerSpec::new(
            &ctx,
            STAGE,
            ctx.names.pages_stream(),
            ctx.names.model_consumer(&b.detector.model.name),
            (b.detector.parallel_runs() + 1).max(batch),
        );
        let (c, h, s) = (ctx.clone(), inferencer.clone(), shutdown.clone());
        loops.spawn(async move { spec.run(&c, h, s).await });
    }
    while let Some(done) = loops.join_next().await {
        done??;
    }
    Ok(())
}

/// The `inferencer` executable: its settings from the configuration sources,
/// its admin endpoints, [`run`] until SIGTERM. `pagestream` runs this
/// too when it is called `inferencer` (a link to it, as in the container image).
pub async fn binary() -> Result<()> {
    pagestream_pipeline::bin::run_stage(
        STAGE,
        "inferencer — runs the ONNX detection model on each rendered page",
        |sources| sources.section::<InferencerConfig>(),
        |c| c.admin_addr.clone(),
        run,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagestream_pipeline::ErrorKind;

    #[test]
    fn a_page_is_inferred_only_by_its_own_model() {
        let served = ["layout_cdla", "yolo_v8"];
        assert_eq!(page_model("yolo_v8", &served).unwrap(), 1);
        assert_eq!(page_model("layout_cdla", &served).unwrap(), 0);
        // A queue this replica does not serve: permanent, naming what it serves.
        let err = page_model("other", &served).unwrap_err();
        assert_eq!((err.code, err.kind), ("model_unknown", ErrorKind::Permanent));
        assert!(err.message.contains("layout_cdla"), "{err}");
    }
}
