//! The detector: a model manifest plus an ONNX Runtime session, loaded once
//! at start. Loading checks the weights' sha256 and the manifest against the
//! model's declared inputs and outputs, and fails with a precise message.

use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use image::RgbImage;
use ort::session::Session;
use ort::value::Tensor;
use pagestream_pipeline::config::InferencerConfig;
use pagestream_schemas::{Detection, ModelRef};
use sha2::{Digest, Sha256};

use crate::manifest::{Decoder, Manifest};
use crate::picodet::{self, TensorView};
use crate::preprocess::to_tensor;

static ORT_ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads libonnxruntime (once per process).
fn ort_environment(library: &Path) -> Result<&'static ort::environment::Environment, String> {
    ORT_ENV
        .get_or_init(|| {
            if !library.exists() {
                return Err(format!(
                    "libonnxruntime not found at {} (set PAGESTREAM_INFERENCER_ONNXRUNTIME_LIBRARY, or run scripts/setup to install it)",
                    library.display()
                ));
            }
            ort::init_from(library)
                .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", library.display()))?
                .with_name("pagestream")
                .build()
                .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A loaded model, ready to detect.
pub struct Detector {
    pub manifest: Manifest,
    pub model: ModelRef,
    pub labels: Vec<String>,
    session: Mutex<Session>,
}

/// Timings of one detection, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct DetectTimings {
    pub preprocess_ms: f32,
    pub model_ms: f32,
    pub decode_ms: f32,
}

impl Detector {
    /// Loads the configured model (manifest + weights) on ONNX Runtime, CPU.
    pub fn load(cfg: &InferencerConfig, model: &str) -> Result<Detector, String> {
        let manifest = Manifest::load(&cfg.models_dir, model)?;
        let weights = manifest.weights_path(&cfg.weights_dir);
        let bytes = std::fs::read(&weights).map_err(|e| {
            format!(
                "model {model}: cannot read weights {}: {e} (run scripts/setup, or set PAGESTREAM_INFERENCER_WEIGHTS_DIR)",
                weights.display()
            )
        })?;
        let sha = hex::encode(Sha256::digest(&bytes));
        if sha != manifest.weights.sha256 {
            return Err(format!(
                "model {model}: {} has sha256 {sha}, the manifest expects {} (re-run scripts/setup)",
                weights.display(),
                manifest.weights.sha256
            ));
        }
        let env = ort_environment(&cfg.onnxruntime_library)?;
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            cfg.threads
        };
        let session = Session::builder(env)
            .and_then(|b| Ok(b.with_intra_threads(threads)?))
            .and_then(|b| Ok(b.with_inter_threads(1)?))
            .and_then(|mut b| b.commit_from_memory(&bytes))
            .map_err(|e| format!("model {model}: ONNX Runtime cannot load {}: {e}", weights.display()))?;
        let labels = resolve_labels(&manifest, &session)?;
        check_io(&manifest, &session)?;
        Ok(Detector {
            model: ModelRef { name: manifest.name.clone(), sha256: sha },
            manifest,
            labels,
            session: Mutex::new(session),
        })
    }

    /// Runs the model on one page image; boxes are in that image's pixels.
    pub fn detect(&self, img: &RgbImage) -> Result<(Vec<Detection>, DetectTimings), String> {
        let mut t = DetectTimings::default();
        let started = Instant::now();
        let input = &self.manifest.input;
        let data = to_tensor(img, input);
        let shape = [1usize, 3, input.height as usize, input.width as usize];
        let tensor = Tensor::from_array((shape, data)).map_err(|e| format!("input tensor: {e}"))?;
        t.preprocess_ms = ms(started);

        let started = Instant::now();
        let mut session = self.session.lock().map_err(|_| "session lock poisoned".to_string())?;
        let outputs =
            session.run(ort::inputs![input.name.as_str() => tensor]).map_err(|e| format!("inference failed: {e}"))?;
        t.model_ms = ms(started);

        let started = Instant::now();
        let mut views = Vec::with_capacity(outputs.len());
        for i in 0..outputs.len() {
            let (shape, data) =
                outputs[i].try_extract_tensor::<f32>().map_err(|e| format!("output {i} is not a float tensor: {e}"))?;
            views.push(TensorView { shape, data });
        }
        let out = &self.manifest.output;
        let raw = match out.decoder {
            Decoder::Picodet => {
                picodet::decode(&views, &out.strides, input.width, input.height, out.score_threshold, out.nms_iou)?
            }
        };
        let sx = img.width() as f32 / input.width as f32;
        let sy = img.height() as f32 / input.height as f32;
        let detections = raw
            .into_iter()
            .map(|(class, score, b)| {
                // Clip to the model input, then scale to the page image.
                let clip = |v: f32, max: u32| v.clamp(0.0, max as f32);
                Detection {
                    label: self.labels.get(class).cloned().unwrap_or_else(|| format!("class_{class}")),
                    score,
                    bbox: [
                        clip(b[0], input.width) * sx,
                        clip(b[1], input.height) * sy,
                        clip(b[2], input.width) * sx,
                        clip(b[3], input.height) * sy,
                    ],
                }
            })
            .collect();
        t.decode_ms = ms(started);
        Ok((detections, t))
    }
}

fn ms(since: Instant) -> f32 {
    since.elapsed().as_secs_f32() * 1000.0
}

fn resolve_labels(manifest: &Manifest, session: &Session) -> Result<Vec<String>, String> {
    let out = &manifest.output;
    if !out.labels.is_empty() {
        return Ok(out.labels.clone());
    }
    let key = &out.labels_metadata_key;
    let meta = session.metadata().map_err(|e| format!("model {}: reading metadata: {e}", manifest.name))?;
    let text =
        meta.custom(key).ok_or_else(|| format!("model {}: metadata has no key {key:?} for labels", manifest.name))?;
    let labels: Vec<String> = text.split(['\n', ',']).map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if labels.is_empty() {
        return Err(format!("model {}: metadata key {key:?} holds no labels", manifest.name));
    }
    Ok(labels)
}

fn check_io(manifest: &Manifest, session: &Session) -> Result<(), String> {
    let name = &manifest.name;
    let input = &manifest.input;
    let declared = session.inputs().iter().find(|i| i.name() == input.name).ok_or_else(|| {
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        format!("model {name}: manifest input {:?} is not among the model's inputs {names:?}", input.name)
    })?;
    if let Some(shape) = declared.dtype().tensor_shape() {
        let dims: Vec<i64> = shape.iter().copied().collect();
        let want = [1, 3, input.height as i64, input.width as i64];
        let ok = dims.len() == 4 && dims.iter().zip(want).all(|(d, w)| *d < 0 || *d == w);
        if !ok {
            return Err(format!(
                "model {name}: input {:?} has shape {dims:?}, the manifest describes [1, 3, {}, {}]",
                input.name, input.height, input.width
            ));
        }
    }
    let outputs = session.outputs().len();
    match manifest.output.decoder {
        Decoder::Picodet if outputs != 2 * manifest.output.strides.len() => Err(format!(
            "model {name}: the picodet decoder with {} strides needs {} outputs, the model has {outputs}",
            manifest.output.strides.len(),
            2 * manifest.output.strides.len()
        )),
        _ => Ok(()),
    }
}
