//! Model manifests: `models/<name>/model.toml`. A manifest says where the
//! weights are, how to prepare the input and how to decode the outputs;
//! [`crate::engine`] checks it against the ONNX model's declared I/O at load.

use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    pub input: Input,
    pub output: Output,
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
        Ok(())
    }

    /// Loads `<models_dir>/<name>/model.toml`, else the built-in manifest of
    /// that name.
    pub fn load(models_dir: &Path, name: &str) -> Result<Manifest, String> {
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
