//! `[inferencer]`: the inferencer's settings, owned and checked here.

use std::path::{Path, PathBuf};

use pagestream_pipeline::config::Section;
use pagestream_schemas::OcrMode;
use serde::{Deserialize, Serialize};

/// Inference backend (`inferencer.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// ONNX Runtime, CPU or CUDA.
    Ort,
    /// tract, pure Rust, CPU.
    Tract,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Ort => "ort",
            Backend::Tract => "tract",
        }
    }
}

/// Where the model runs (`inferencer.device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    /// CUDA, or fail at start saying what is missing.
    Cuda,
    /// CUDA when usable, else the CPU (with a warning).
    Auto,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
/// `[inferencer]`.
pub struct InferencerConfig {
    /// Model name: a manifest `models/<name>/model.toml`.
    pub model: String,
    /// Directory of model manifests (default: the repository's `models/`,
    /// else the manifests built into the binary).
    pub models_dir: PathBuf,
    /// Directory holding the ONNX weights (default: `<deps>/models`).
    pub weights_dir: PathBuf,
    /// Path to libonnxruntime.so (default: `<deps>/lib/libonnxruntime.so`).
    pub onnxruntime_library: PathBuf,
    /// Further models served besides `model` (a TOML list, or comma
    /// separated), so a document may pick one with its `model` option.
    #[serde(deserialize_with = "pagestream_pipeline::util::list")]
    pub models: Vec<String>,
    /// `ort` (ONNX Runtime) or `tract` (pure Rust).
    pub backend: Backend,
    /// `cpu`, `cuda` (fail at start if CUDA is unusable) or `auto` (CUDA
    /// when usable, else CPU). ONNX Runtime only.
    pub device: Device,
    /// CPU threads per model (0: one per core): ONNX Runtime uses them
    /// inside each run, tract runs that many pages side by side.
    pub threads: usize,
    /// ONNX Runtime on the CPU: sessions running pages side by side, the
    /// threads divided among them (0: one single-thread session per thread).
    pub ort_sessions: usize,
    /// ONNX Runtime on the CPU: keep each session's memory arena (freed
    /// tensors stay reserved for the next page) instead of the system
    /// allocator.
    pub ort_cpu_arena: bool,
    /// Pages run as one batch when the model has a dynamic batch axis.
    pub batch_size: usize,
    /// Longest wait for a batch to fill once its first page arrived.
    pub batch_wait_ms: u64,
    /// Most detections kept per page (highest scores first).
    pub max_detections: usize,
    /// Serve the models with weights that may differ from the other live
    /// replicas of the same model names (a canary); without it such a
    /// replica refuses to start.
    pub canary: bool,
    /// Which pages OCR reads when their document does not say (its `ocr`
    /// option): `auto` (pages without a text layer), `always`, `never`.
    pub ocr: OcrMode,
    /// OCR model set: a manifest `models/<name>/ocr.toml`, loaded at start
    /// (empty: no OCR; pages without a text layer then have no text).
    pub ocr_model: String,
    /// Address of /metrics, /livez, /readyz (empty: disabled).
    pub admin_addr: String,
}

impl InferencerConfig {
    /// Every model this inferencer serves: `model` first, then `models`.
    pub fn served_models(&self) -> Vec<String> {
        let mut names = vec![self.model.clone()];
        for name in &self.models {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }
}

impl Default for InferencerConfig {
    fn default() -> Self {
        InferencerConfig {
            model: pagestream_schemas::DEFAULT_MODEL.into(),
            models_dir: repo_models_dir(),
            weights_dir: pagestream_pipeline::config::deps_dir().join("models"),
            onnxruntime_library: pagestream_pipeline::config::deps_dir().join("lib/libonnxruntime.so"),
            models: Vec::new(),
            backend: Backend::Ort,
            device: Device::Cpu,
            threads: 0,
            ort_sessions: 0,
            ort_cpu_arena: true,
            batch_size: 1,
            batch_wait_ms: 20,
            max_detections: 500,
            canary: false,
            ocr: OcrMode::Auto,
            ocr_model: "ppocr_v4".into(),
            admin_addr: "127.0.0.1:9102".into(),
        }
    }
}

/// The repository's `models/` folder when one is found above the
/// executable or the working directory, else `models`.
fn repo_models_dir() -> PathBuf {
    pagestream_pipeline::config::find_upwards("models/layout_cdla/model.toml")
        .and_then(|p| p.parent().and_then(Path::parent).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("models"))
}

impl Section for InferencerConfig {
    const NAME: &'static str = "inferencer";

    fn check(&self, errors: &mut Vec<String>) {
        for name in self.served_models() {
            if let Err(e) = pagestream_schemas::validate_model_name(&name) {
                errors.push(format!("inferencer.model / inferencer.models: {e}"));
            }
        }
        if self.backend == Backend::Tract && self.device != Device::Cpu {
            errors.push(format!(
                "inferencer.device {:?}: the tract backend runs on the CPU only (use inferencer.backend = \"ort\" for CUDA)",
                self.device.as_str()
            ));
        }
        if !self.ocr_model.is_empty() {
            if let Err(e) = pagestream_schemas::validate_model_name(&self.ocr_model) {
                errors.push(format!("inferencer.ocr_model: {e}"));
            }
        }
        if !(1..=64).contains(&self.batch_size) {
            errors.push("inferencer.batch_size must be within 1..=64".into());
        }
        if self.batch_wait_ms > 10_000 {
            errors.push("inferencer.batch_wait_ms must be at most 10000".into());
        }
    }
}
