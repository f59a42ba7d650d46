//! The detector: a model manifest plus a backend session, loaded once at
//! start. Loading checks the weights' sha256 and the manifest against the
//! model's declared inputs and outputs, and fails with a precise message.

use std::time::Instant;

use crate::InferencerConfig;
use image::RgbImage;
use pagestream_schemas::{Detection, ModelRef};
use sha2::{Digest, Sha256};

use crate::backend::{self, Backend, BackendKind, EngineOptions, ModelIo, OutTensor};
use crate::manifest::{Decoder, Manifest, Precision};
use crate::picodet::{self, TensorView};
use crate::preprocess::{to_tensor_into, Transform};
use crate::{boxes, yolov8};

/// A loaded model, ready to detect.
pub struct Detector {
    pub manifest: Manifest,
    pub model: ModelRef,
    pub labels: Vec<String>,
    pub backend: BackendKind,
    backend_impl: Box<dyn Backend>,
}

/// Timings of one detection, in milliseconds (a batch's model time is
/// shared by its pages).
#[derive(Debug, Clone, Copy, Default)]
pub struct DetectTimings {
    pub preprocess_ms: f32,
    pub model_ms: f32,
    pub decode_ms: f32,
}

/// Why a model could not be loaded; the message names the model and what
/// to do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    /// Its manifest is missing or invalid.
    #[error("{0}")]
    Manifest(String),
    /// Its weights are missing, or are not the ones the manifest names.
    #[error("{0}")]
    Weights(String),
    /// The backend could not load it (library, CUDA, an unsupported operator).
    #[error("{0}")]
    Backend(String),
    /// The model's inputs, outputs or labels do not fit its manifest.
    #[error("{0}")]
    Mismatch(String),
}

/// Why running the model on a batch of pages failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// The backend failed to run the model.
    #[error("{0}")]
    Backend(String),
    /// The outputs could not be decoded into detections.
    #[error("{0}")]
    Decode(String),
}

impl EngineOptions {
    /// The options a config asks for.
    pub fn from_config(cfg: &InferencerConfig) -> EngineOptions {
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            cfg.threads
        };
        EngineOptions {
            backend: cfg.backend,
            device: cfg.device,
            threads,
            sessions: if cfg.ort_sessions == 0 { threads } else { cfg.ort_sessions },
            cpu_arena: cfg.ort_cpu_arena,
            onnxruntime_library: cfg.onnxruntime_library.clone(),
        }
    }
}

/// Reads a model file and checks it is the one its manifest pins
/// (sha256); `what` names it in the errors ("model layout_cdla", "OCR
/// model ppocr_v4 (rec)"). Returns the bytes and their sha256.
pub(crate) fn read_weights(what: &str, path: &std::path::Path, sha256: &str) -> Result<(Vec<u8>, String), LoadError> {
    let bytes = std::fs::read(path).map_err(|e| {
        LoadError::Weights(format!(
            "{what}: cannot read {}: {e} (run scripts/setup, or set PAGESTREAM_INFERENCER_WEIGHTS_DIR)",
            path.display()
        ))
    })?;
    let got = hex::encode(Sha256::digest(&bytes));
    if got != sha256 {
        return Err(LoadError::Weights(format!(
            "{what}: {} has sha256 {got}, the manifest expects {sha256}: the file is corrupt or another model (re-run scripts/setup)",
            path.display()
        )));
    }
    Ok((bytes, got))
}

/// Reads a model file whose sha256 no manifest pins (a variant, checked
/// against its gate record instead).
fn read_any_weights(what: &str, path: &std::path::Path) -> Result<(Vec<u8>, String), LoadError> {
    let bytes = std::fs::read(path).map_err(|e| {
        LoadError::Weights(format!(
            "{what}: cannot read {}: {e} (make it with scripts/quantize, or scripts/setup --int8)",
            path.display()
        ))
    })?;
    let sha = hex::encode(Sha256::digest(&bytes));
    Ok((bytes, sha))
}

impl Detector {
    /// Loads `model` as the config says (backend, device, threads).
    pub fn load(cfg: &InferencerConfig, model: &str) -> Result<Detector, LoadError> {
        Detector::load_with(cfg, model, &EngineOptions::from_config(cfg))
    }

    /// Loads `model` (manifest from `cfg.models_dir`, weights from
    /// `cfg.weights_dir`) with explicit engine options.
    pub fn load_with(cfg: &InferencerConfig, model: &str, opts: &EngineOptions) -> Result<Detector, LoadError> {
        Detector::load_inner(cfg, model, opts, true)
    }

    /// Loads a variant (`<model>@<variant>`) whether or not it passed the
    /// accuracy gate: for the gate itself (`pagestream gate`).
    pub fn load_for_gate(cfg: &InferencerConfig, model: &str, opts: &EngineOptions) -> Result<Detector, LoadError> {
        Detector::load_inner(cfg, model, opts, false)
    }

    fn load_inner(
        cfg: &InferencerConfig,
        model: &str,
        opts: &EngineOptions,
        gated: bool,
    ) -> Result<Detector, LoadError> {
        let manifest = Manifest::load(&cfg.models_dir, model).map_err(LoadError::Manifest)?;
        let weights = manifest.weights_path(&cfg.weights_dir);
        if manifest.precision != Precision::Fp32 && opts.backend == BackendKind::Tract {
            return Err(LoadError::Backend(format!(
                "model {model}: the tract backend does not serve {} models: it runs their quantize/dequantize \
                 pairs without 8-bit kernels, slower than the fp32 model (yolov8n: 1.28 s a page against 0.71 s), \
                 and the accuracy gate judges variants with ONNX Runtime; serve it with inferencer.backend = \"ort\", \
                 or an fp32 model ({}) with tract",
                manifest.precision.as_str(),
                model.split('@').next().unwrap_or(model)
            )));
        }
        let (bytes, sha) = match &manifest.gate {
            // A variant: its sha256 is the one its gate record passed.
            Some(need) if gated => {
                let (bytes, sha) = read_any_weights(&format!("model {model}"), &weights)?;
                let record = crate::gate::check(&manifest, need, &weights, &sha).map_err(LoadError::Weights)?;
                if let Some(warning) = crate::gate::cpu_warning(&record, &crate::gate::cpu_features()) {
                    tracing::warn!("{warning}");
                }
                (bytes, sha)
            }
            Some(_) => read_any_weights(&format!("model {model}"), &weights)?,
            None => read_weights(&format!("model {model}"), &weights, &manifest.weights.sha256)?,
        };
        let input = &manifest.input;
        let backend_impl =
            backend::load(opts, model, &bytes, (&input.name, input.width, input.height)).map_err(LoadError::Backend)?;
        let labels = resolve_labels(&manifest, backend_impl.io()).map_err(LoadError::Mismatch)?;
        check_io(&manifest, backend_impl.io(), labels.len()).map_err(LoadError::Mismatch)?;
        Ok(Detector {
            model: ModelRef { name: manifest.name.clone(), sha256: sha },
            manifest,
            labels,
            backend: opts.backend,
            backend_impl,
        })
    }

    /// `cpu` or `cuda`.
    pub fn device(&self) -> &'static str {
        self.backend_impl.device()
    }

    /// Largest batch one model run takes (1 unless the model's batch axis
    /// is dynamic and the backend supports it).
    pub fn max_batch(&self) -> usize {
        self.backend_impl.max_batch()
    }

    /// How many pages may run at once, each on its own thread.
    pub fn parallel_runs(&self) -> usize {
        self.backend_impl.parallel_runs()
    }

    /// Runs the model on one page image; boxes are in that image's pixels.
    pub fn detect(&self, img: &RgbImage) -> Result<(Vec<Detection>, DetectTimings), RunError> {
        let mut all = self.detect_batch(&[img])?;
        Ok(all.pop().expect("one result per image"))
    }

    /// Runs the model on several pages, as few runs as the model allows.
    pub fn detect_batch(&self, imgs: &[&RgbImage]) -> Result<Vec<(Vec<Detection>, DetectTimings)>, RunError> {
        let mut results = Vec::with_capacity(imgs.len());
        for chunk in imgs.chunks(self.max_batch().max(1)) {
            let started = Instant::now();
            let (outputs, transforms, mut t) = self.run(chunk)?;
            let started_decode = Instant::now();
            let detections = transforms
                .iter()
                .enumerate()
                .map(|(item, tr)| self.decode(&outputs, item, chunk.len(), tr))
                .collect::<Result<Vec<_>, String>>()
                .map_err(RunError::Decode)?;
            let n = chunk.len() as f32;
            t.decode_ms = ms(started_decode) / n;
            t.model_ms = ms(started) / n - t.preprocess_ms - t.decode_ms;
            pagestream_pipeline::metrics::model_run(&self.model.name, chunk.len(), started.elapsed());
            results.extend(detections.into_iter().map(|d| (d, t)));
        }
        Ok(results)
    }

    /// The model's raw outputs for one page (parity checks between backends).
    pub fn raw_outputs(&self, img: &RgbImage) -> Result<Vec<OutTensor>, RunError> {
        Ok(self.run(&[img])?.0)
    }

    fn run(&self, imgs: &[&RgbImage]) -> Result<(Vec<OutTensor>, Vec<Transform>, DetectTimings), RunError> {
        let mut t = DetectTimings::default();
        let started = Instant::now();
        let input = &self.manifest.input;
        let per = 3 * input.width as usize * input.height as usize;
        let mut data = vec![0f32; per * imgs.len()];
        let transforms: Vec<Transform> =
            imgs.iter().zip(data.chunks_exact_mut(per)).map(|(img, out)| to_tensor_into(img, input, out)).collect();
        t.preprocess_ms = ms(started) / imgs.len() as f32;
        let shape = [imgs.len(), 3, input.height as usize, input.width as usize];
        let outputs = self.backend_impl.run(data, shape).map_err(RunError::Backend)?;
        Ok((outputs, transforms, t))
    }

    fn decode(
        &self,
        outputs: &[OutTensor],
        item: usize,
        batch: usize,
        tr: &Transform,
    ) -> Result<Vec<Detection>, String> {
        let input = &self.manifest.input;
        let out = &self.manifest.output;
        let raw = match out.decoder {
            Decoder::Picodet => {
                let views: Vec<TensorView> = outputs.iter().map(|o| item_view(o, item, batch)).collect();
                picodet::decode(&views, &out.strides, input.width, input.height, out.score_threshold, out.nms_iou)?
            }
            Decoder::Yolov8 => {
                let first = outputs.first().ok_or("yolov8: the model has no output")?;
                yolov8::decode(&item_view(first, item, batch), self.labels.len(), out.score_threshold, out.nms_iou)?
            }
            Decoder::Boxes => boxes::decode(outputs, out, item, input.width, input.height)?,
        };
        Ok(raw
            .into_iter()
            .map(|(class, score, b)| Detection {
                label: self.labels.get(class).cloned().unwrap_or_else(|| format!("class_{class}")),
                score,
                bbox: tr.to_page(b),
            })
            .collect())
    }
}

/// Batch item `item` of a tensor whose first axis is the batch.
fn item_view(t: &OutTensor, item: usize, batch: usize) -> TensorView<'_> {
    let per = t.data.len() / batch.max(1);
    TensorView { shape: &t.shape, data: &t.data[item * per..(item + 1) * per] }
}

fn ms(since: Instant) -> f32 {
    since.elapsed().as_secs_f32() * 1000.0
}

/// Labels from the manifest, else from a metadata key of the model: a list
/// (one per line, or comma separated) or a Python/JSON dict `{0: 'a', …}`
/// as Ultralytics writes under `names`.
fn resolve_labels(manifest: &Manifest, io: &ModelIo) -> Result<Vec<String>, String> {
    let out = &manifest.output;
    if !out.labels.is_empty() {
        return Ok(out.labels.clone());
    }
    let key = &out.labels_metadata_key;
    let text = io.metadata.get(key).ok_or_else(|| {
        let mut keys: Vec<&String> = io.metadata.keys().collect();
        keys.sort();
        format!("model {}: metadata has no key {key:?} for labels (keys: {keys:?})", manifest.name)
    })?;
    let labels = parse_labels(text).map_err(|e| format!("model {}: metadata key {key:?}: {e}", manifest.name))?;
    if labels.is_empty() {
        return Err(format!("model {}: metadata key {key:?} holds no labels", manifest.name));
    }
    Ok(labels)
}

fn parse_labels(text: &str) -> Result<Vec<String>, String> {
    let t = text.trim();
    let Some(body) = t.strip_prefix('{').and_then(|b| b.strip_suffix('}')) else {
        return Ok(t.split(['\n', ',']).map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect());
    };
    let mut pairs: Vec<(usize, String)> = Vec::new();
    for entry in body.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (k, v) = entry.split_once(':').ok_or_else(|| format!("entry {entry:?} is not `id: 'name'`"))?;
        let id: usize = k.trim().trim_matches(['"', '\'']).parse().map_err(|_| format!("id {k:?} is not a number"))?;
        pairs.push((id, v.trim().trim_matches(['"', '\'']).to_string()));
    }
    pairs.sort();
    if pairs.iter().enumerate().any(|(i, (id, _))| *id != i) {
        return Err("class ids are not 0..n".into());
    }
    Ok(pairs.into_iter().map(|(_, v)| v).collect())
}

fn check_io(manifest: &Manifest, io: &ModelIo, classes: usize) -> Result<(), String> {
    let name = &manifest.name;
    let input = &manifest.input;
    let (_, dims) = io.inputs.iter().find(|(n, _)| *n == input.name).ok_or_else(|| {
        let names: Vec<&str> = io.inputs.iter().map(|(n, _)| n.as_str()).collect();
        format!("model {name}: manifest input {:?} is not among the model's inputs {names:?}", input.name)
    })?;
    if io.inputs.len() != 1 {
        return Err(format!(
            "model {name}: the model has {} inputs; pagestream feeds exactly one image",
            io.inputs.len()
        ));
    }
    if !dims.is_empty() {
        let want = [1, 3, input.height as i64, input.width as i64];
        let ok = dims.len() == 4 && dims.iter().zip(want).all(|(d, w)| *d < 0 || *d == w);
        if !ok {
            return Err(format!(
                "model {name}: input {:?} has shape {dims:?}, the manifest describes [1, 3, {}, {}] (batch may be dynamic)",
                input.name, input.height, input.width
            ));
        }
    }
    let out = &manifest.output;
    let outputs = &io.outputs;
    match out.decoder {
        Decoder::Picodet if outputs.len() != 2 * out.strides.len() => Err(format!(
            "model {name}: the picodet decoder with {} strides needs {} outputs, the model has {}",
            out.strides.len(),
            2 * out.strides.len(),
            outputs.len()
        )),
        Decoder::Yolov8 => {
            let Some((oname, dims)) = outputs.first() else {
                return Err(format!("model {name}: the yolov8 decoder needs one output, the model has none"));
            };
            if outputs.len() != 1 {
                return Err(format!(
                    "model {name}: the yolov8 decoder needs one output, the model has {}",
                    outputs.len()
                ));
            }
            match dims.as_slice() {
                [] => Ok(()),
                [_, rows, _] if *rows < 0 || *rows as usize == 4 + classes => Ok(()),
                _ => Err(format!(
                    "model {name}: output {oname:?} has shape {dims:?}; the yolov8 decoder with {classes} labels expects [1, {}, anchors]",
                    4 + classes
                )),
            }
        }
        Decoder::Boxes => {
            let names = io.output_names();
            for (key, want) in [
                ("boxes_output", &out.boxes_output),
                ("scores_output", &out.scores_output),
                ("labels_output", &out.labels_output),
            ] {
                if !names.contains(&want.as_str()) {
                    return Err(format!(
                        "model {name}: output.{key} {want:?} is not among the model's outputs {names:?}"
                    ));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_from_lists_and_dicts() {
        assert_eq!(parse_labels("text\ntitle\n").unwrap(), vec!["text", "title"]);
        assert_eq!(parse_labels("a, b,c").unwrap(), vec!["a", "b", "c"]);
        let names = "{0: 'Caption', 1: 'Footnote', 10: 'Title', 2: 'Formula', 3: 'List-item', 4: 'Page-footer', \
                     5: 'Page-header', 6: 'Picture', 7: 'Section-header', 8: 'Table', 9: 'Text'}";
        let l = parse_labels(names).unwrap();
        assert_eq!(l.len(), 11);
        assert_eq!((l[0].as_str(), l[9].as_str(), l[10].as_str()), ("Caption", "Text", "Title"));
        assert_eq!(parse_labels(r#"{"0": "x", "1": "y"}"#).unwrap(), vec!["x", "y"]);
        assert!(parse_labels("{0: 'a', 2: 'b'}").unwrap_err().contains("0..n"));
    }
}
