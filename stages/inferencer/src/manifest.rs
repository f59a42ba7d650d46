//! Model manifests: `models/<name>/model.toml`. A manifest says where the
//! weights are, how to prepare the input and how to decode the outputs;
//! [`crate::engine`] checks it against the ONNX model's declared I/O at load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Manifests compiled into the binary, used when no `models/` folder is found.
const BUILTIN: &[(&str, &str)] = &[
    ("layout_cdla", include_str!("../../../models/layout_cdla/model.toml")),
    ("yolov8n_doclaynet", include_str!("../../../models/yolov8n_doclaynet/model.toml")),
];

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub license: String,
    pub weights: Weights,
    /// The weights' arithmetic: `fp32` unless said (a quantized model of
    /// one's own says `int8`).
    #[serde(default)]
    pub precision: Precision,
    pub input: Input,
    pub output: Output,
    /// Variants of these weights that `scripts/quantize` makes, selected
    /// as `<name>@<variant>` (`layout_cdla@int8`).
    #[serde(default)]
    pub variants: BTreeMap<String, Variant>,
    /// Set when loaded as a variant: the accuracy-gate record its weights
    /// must have (their sha256 is the record's, not the manifest's).
    #[serde(skip)]
    pub gate: Option<GateRequirement>,
}

/// Numeric precision of a model's weights and arithmetic.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Bf16,
    Int8,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }
}

/// `[variants.<name>]`: weights derived from the model's own by
/// `scripts/quantize`, served only with a passing accuracy-gate record.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// The variant's file in the weights directory.
    pub file: String,
    pub precision: Precision,
    /// How `scripts/quantize` makes it, for people.
    #[serde(default)]
    pub recipe: String,
    /// The pages it is calibrated on, for people.
    #[serde(default)]
    pub calibration: String,
    /// The recipe `scripts/quantize` follows (read there only).
    #[serde(default)]
    pub quantize: toml::Table,
}

/// Least F1 a variant's detections must reach against its model's own
/// (same label, IoU ≥ [`GATE_IOU`]) on the gate's pages.
pub const GATE_F1: f64 = 0.98;
/// IoU at which a variant's box matches its model's.
pub const GATE_IOU: f32 = 0.7;

/// What a variant's gate record must show.
#[derive(Debug, Clone, PartialEq)]
pub struct GateRequirement {
    /// The model's own weights, the variant's source.
    pub source_sha256: String,
    pub min_f1: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub source: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Scale each axis independently to the input size.
    Stretch,
    /// Keep the aspect ratio, centre on a canvas of `pad_value` (YOLO style).
    Letterbox,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Input {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub channel_order: ChannelOrder,
    pub resize: ResizeMode,
    /// Canvas colour around a letterboxed page (0–255, all channels).
    #[serde(default = "default_pad")]
    pub pad_value: u8,
    /// Multiplier applied to 0–255 values before mean/std.
    pub scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Decoder {
    /// PP-PicoDet: per stride, class scores and box distributions.
    Picodet,
    /// Ultralytics YOLOv8: one `[1, 4 + classes, anchors]` tensor.
    Yolov8,
    /// Models that output final boxes, scores and labels (Detectron2,
    /// torchvision and most "end-to-end" exports).
    Boxes,
}

/// How a `boxes` model writes a box.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BoxFormat {
    /// Corners: x0, y0, x1, y1.
    #[default]
    Xyxy,
    /// Top-left corner and size: x, y, w, h.
    Xywh,
    /// Centre and size: cx, cy, w, h.
    Cxcywh,
}

fn default_pad() -> u8 {
    114
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Output {
    pub decoder: Decoder,
    #[serde(default)]
    pub strides: Vec<u32>,
    /// Labels listed in the manifest…
    #[serde(default)]
    pub labels: Vec<String>,
    /// …or read from this metadata key of the model (newline or comma separated).
    #[serde(default)]
    pub labels_metadata_key: String,
    pub score_threshold: f32,
    pub nms_iou: f32,
    /// `boxes` decoder: output names of the boxes `[(1,) N, 4]`, scores
    /// `[(1,) N]` and class ids `[(1,) N]`.
    #[serde(default)]
    pub boxes_output: String,
    #[serde(default)]
    pub scores_output: String,
    #[serde(default)]
    pub labels_output: String,
    #[serde(default)]
    pub box_format: BoxFormat,
    /// `boxes` decoder: coordinates are fractions of the input size.
    #[serde(default)]
    pub normalized: bool,
}

impl Manifest {
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, String> {
        let m: Manifest = toml::from_str(text).map_err(|e| format!("model manifest {origin}: {e}"))?;
        m.validate().map_err(|e| format!("model manifest {origin}: {e}"))?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        if self.input.width == 0 || self.input.height == 0 {
            return Err("input.width and input.height must be positive".into());
        }
        if self.input.std.contains(&0.0) {
            return Err("input.std must not contain 0".into());
        }
        if self.output.labels.is_empty() && self.output.labels_metadata_key.is_empty() {
            return Err("set output.labels or output.labels_metadata_key".into());
        }
        if self.output.decoder == Decoder::Picodet && self.output.strides.is_empty() {
            return Err("the picodet decoder needs output.strides".into());
        }
        if self.output.decoder == Decoder::Boxes {
            let o = &self.output;
            for (key, v) in [
                ("boxes_output", &o.boxes_output),
                ("scores_output", &o.scores_output),
                ("labels_output", &o.labels_output),
            ] {
                if v.is_empty() {
                    return Err(format!("the boxes decoder needs output.{key} (the output's name in the model)"));
                }
            }
        }
        if !(0.0..=1.0).contains(&self.output.score_threshold) || !(0.0..=1.0).contains(&self.output.nms_iou) {
            return Err("output.score_threshold and output.nms_iou must be within 0..=1".into());
        }
        if self.weights.sha256.len() != 64 {
            return Err("weights.sha256 must be 64 hex characters".into());
        }
        for (name, v) in &self.variants {
            pagestream_schemas::validate_model_name(name).map_err(|e| format!("variants.{name}: {e}"))?;
            if name.contains('@') {
                return Err(format!("variants.{name}: a variant's name has no `@`"));
            }
            if v.file == self.weights.file {
                return Err(format!("variants.{name}.file must differ from weights.file"));
            }
        }
        Ok(())
    }

    /// Loads `<models_dir>/<name>/model.toml`, else the built-in manifest of
    /// that name; `<name>@<variant>` is that manifest's variant.
    pub fn load(models_dir: &Path, name: &str) -> Result<Manifest, String> {
        match name.split_once('@') {
            Some((base, variant)) => Manifest::load_base(models_dir, base)?.variant(variant),
            None => Manifest::load_base(models_dir, name),
        }
    }

    /// This model's `variant`, as a manifest of its own named
    /// `<name>@<variant>`: the same input and output, the variant's file
    /// and precision, and the gate record it needs.
    pub fn variant(&self, variant: &str) -> Result<Manifest, String> {
        let name = format!("{}@{variant}", self.name);
        let Some(v) = self.variants.get(variant) else {
            let known: Vec<&str> = self.variants.keys().map(String::as_str).collect();
            return Err(format!(
                "unknown model {name:?}: model {} has no variant {variant:?} (its variants: {})",
                self.name,
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ));
        };
        Ok(Manifest {
            name,
            description: format!("{} ({} variant)", self.description, v.precision.as_str()),
            license: self.license.clone(),
            weights: Weights {
                file: v.file.clone(),
                sha256: String::new(),
                source: format!("scripts/quantize from {} ({})", self.weights.file, v.recipe),
            },
            precision: v.precision,
            input: self.input.clone(),
            output: self.output.clone(),
            variants: BTreeMap::new(),
            gate: Some(GateRequirement { source_sha256: self.weights.sha256.clone(), min_f1: GATE_F1 }),
        })
    }

    fn load_base(models_dir: &Path, name: &str) -> Result<Manifest, String> {
        let path = models_dir.join(name).join("model.toml");
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            return Manifest::parse(&text, &path.display().to_string());
        }
        match BUILTIN.iter().find(|(n, _)| *n == name) {
            Some((n, text)) => Manifest::parse(text, &format!("(built in) {n}")),
            None => Err(format!("unknown model {name:?}: no {} and no built-in manifest of that name", path.display())),
        }
    }

    pub fn weights_path(&self, weights_dir: &Path) -> PathBuf {
        weights_dir.join(&self.weights.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_manifest_parses() {
        let m = Manifest::load(Path::new("/nonexistent"), "layout_cdla").unwrap();
        assert_eq!(m.input.name, "image");
        assert_eq!(m.output.strides, vec![8, 16, 32, 64]);
        assert_eq!(m.input.channel_order, ChannelOrder::Bgr);
    }

    #[test]
    fn bad_manifests_say_why() {
        let err = Manifest::load(Path::new("/nonexistent"), "nope").unwrap_err();
        assert!(err.contains("unknown model \"nope\""), "{err}");
        let text = BUILTIN[0].1.replace("std = [0.229, 0.224, 0.225]", "std = [0.0, 0.224, 0.225]");
        assert!(Manifest::parse(&text, "t").unwrap_err().contains("input.std"));
        let text = BUILTIN[0].1.replace("decoder = \"picodet\"", "decoder = \"unknown\"");
        assert!(Manifest::parse(&text, "t").unwrap_err().contains("unknown variant"));
    }
}
