//! The accuracy gate of model variants (`layout_cdla@int8`): a variant's
//! detections are matched to its model's own on the same pages (same
//! label, IoU ≥ [`GATE_IOU`]), and it is served only when F1 ≥ [`GATE_F1`].
//! `pagestream gate` runs the comparison and, on a pass, writes the record
//! (`<variant file>.gate.json` beside the weights) the inferencer checks
//! before it loads the variant: no record, another file, or weights made
//! from other source weights, and the variant is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pagestream_schemas::Detection;
use serde::{Deserialize, Serialize};

use crate::manifest::{GateRequirement, Manifest};
pub use crate::manifest::{GATE_F1, GATE_IOU};
use crate::nms::iou;

/// Matches of one label, counted over every page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// The model's boxes the variant found (same label, IoU ≥ the gate's).
    pub matched: u64,
    /// The model's boxes the variant missed.
    pub missed: u64,
    /// The variant's boxes the model does not have.
    pub extra: u64,
}

impl Counts {
    /// F1 of the variant against the model (1 when neither has a box).
    pub fn f1(&self) -> f64 {
        let denominator = 2 * self.matched + self.missed + self.extra;
        if denominator == 0 {
            1.0
        } else {
            2.0 * self.matched as f64 / denominator as f64
        }
    }

    fn add(&mut self, other: Counts) {
        self.matched += other.matched;
        self.missed += other.missed;
        self.extra += other.extra;
    }
}

/// The variant against its model on a set of pages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Comparison {
    pub pages: usize,
    pub per_label: BTreeMap<String, Counts>,
}

/// The machine a gate record's figures were measured on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgedOn {
    /// ONNX Runtime's build info (its git commit and build type).
    pub onnxruntime: String,
    /// The CPU's vector and matrix features ONNX Runtime's kernels pick
    /// from ([`CPU_FEATURES`]), as `/proc/cpuinfo` names them.
    pub cpu: Vec<String>,
}

/// The CPU features that decide which 8-bit and 16-bit kernels ONNX
/// Runtime runs.
pub const CPU_FEATURES: [&str; 8] =
    ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"];

/// The features with 8-bit dot products: without one, ONNX Runtime's
/// u8×s8 products can saturate.
const INT8_DOT: [&str; 3] = ["avx512_vnni", "avx_vnni", "amx_int8"];

/// [`CPU_FEATURES`] this machine has (from `/proc/cpuinfo`; none known
/// elsewhere).
pub fn cpu_features() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    features_in(&info)
}

fn features_in(cpuinfo: &str) -> Vec<String> {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags").and_then(|rest| rest.trim_start().strip_prefix(':')))
        .map(|f| f.split_whitespace().collect())
        .unwrap_or_default();
    CPU_FEATURES.iter().filter(|f| flags.contains(f)).map(|f| f.to_string()).collect()
}

/// A warning when an INT8 variant judged on a CPU with 8-bit dot products
/// is served on one without: its detections may differ from what the
/// gate measured.
pub fn cpu_warning(record: &GateRecord, here: &[String]) -> Option<String> {
    let judged = record.judged_on.as_ref()?;
    let dot = |f: &[String]| f.iter().any(|x| INT8_DOT.contains(&x.as_str()));
    (record.precision == "int8" && dot(&judged.cpu) && !dot(here)).then(|| {
        format!(
            "model {}: its accuracy gate ran on a CPU with {} and this one has none of {}: ONNX Runtime's \
             8-bit kernels differ here and can saturate, so F1 {:.4} may not hold; run `pagestream gate {}` on this machine",
            record.model,
            judged.cpu.iter().filter(|x| INT8_DOT.contains(&x.as_str())).cloned().collect::<Vec<_>>().join(", "),
            INT8_DOT.join(", "),
            record.f1,
            record.model
        )
    })
}

impl Comparison {
    /// Adds one page: each of the model's boxes, highest score first, takes
    /// the variant's unmatched box of the same label with the largest IoU,
    /// if that IoU reaches `min_iou`.
    pub fn add_page(&mut self, reference: &[Detection], variant: &[Detection], min_iou: f32) {
        self.pages += 1;
        let mut order: Vec<&Detection> = reference.iter().collect();
        order.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut taken = vec![false; variant.len()];
        for r in order {
            let best = variant
                .iter()
                .enumerate()
                .filter(|(j, v)| !taken[*j] && v.label == r.label)
                .map(|(j, v)| (j, iou(&r.bbox, &v.bbox)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            let counts = self.per_label.entry(r.label.clone()).or_default();
            match best {
                Some((j, overlap)) if overlap >= min_iou => {
                    taken[j] = true;
                    counts.matched += 1;
                }
                _ => counts.missed += 1,
            }
        }
        for (v, taken) in variant.iter().zip(taken) {
            if !taken {
                self.per_label.entry(v.label.clone()).or_default().extra += 1;
            }
        }
    }

    /// Every label together.
    pub fn total(&self) -> Counts {
        let mut all = Counts::default();
        for c in self.per_label.values() {
            all.add(*c);
        }
        all
    }

    pub fn f1(&self) -> f64 {
        self.total().f1()
    }
}

/// Fewest boxes of the model's own the gate needs to judge a variant: on
/// pages where the model finds (almost) nothing, any variant would score F1 1.
pub const GATE_MIN_BOXES: u64 = 100;

/// `<variant file>.gate.json`: what the gate measured when it passed the
/// variant (written only on a pass).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateRecord {
    /// `<model>@<variant>`.
    pub model: String,
    pub precision: String,
    /// The variant file the gate passed.
    pub sha256: String,
    /// The model's own weights it was compared with (and made from).
    pub source_sha256: String,
    pub f1: f64,
    pub min_f1: f64,
    pub min_iou: f32,
    pub pages: usize,
    /// The documents the pages came from.
    pub documents: Vec<String>,
    pub per_label: BTreeMap<String, Counts>,
    /// Where it was judged: INT8 products run on other kernels on a CPU
    /// without VNNI (and may saturate there), so the figures hold for
    /// that kind of CPU. Absent in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged_on: Option<JudgedOn>,
}

/// Where the gate record of weights at `weights` is.
pub fn record_path(weights: &Path) -> PathBuf {
    let mut name = weights.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".gate.json");
    weights.with_file_name(name)
}

/// Checks that the variant `manifest` (loaded as `<model>@<variant>`),
/// whose weights at `weights` have `sha256`, passed the gate.
pub fn check(manifest: &Manifest, need: &GateRequirement, weights: &Path, sha256: &str) -> Result<GateRecord, String> {
    let name = &manifest.name;
    let path = record_path(weights);
    let remake = "make it with scripts/quantize (scripts/setup --int8), which keeps a variant only if it passes";
    let text = std::fs::read(&path).map_err(|e| {
        format!("model {name}: no accuracy-gate record for {} ({}: {e}): {remake}", weights.display(), path.display())
    })?;
    let record: GateRecord = serde_json::from_slice(&text)
        .map_err(|e| format!("model {name}: the accuracy-gate record {} is unreadable: {e}", path.display()))?;
    if record.sha256 != sha256 {
        return Err(format!(
            "model {name}: {} (sha256 {sha256}) is not the file the accuracy gate passed (sha256 {}): {remake}",
            weights.display(),
            record.sha256
        ));
    }
    if record.source_sha256 != need.source_sha256 {
        return Err(format!(
            "model {name}: the accuracy gate compared it with weights sha256 {}, the model's are {}: {remake}",
            record.source_sha256, need.source_sha256
        ));
    }
    if record.model != manifest.name || record.min_iou < GATE_IOU {
        return Err(format!(
            "model {name}: the accuracy-gate record {} is for {} at IoU {}, not for this variant at IoU {GATE_IOU}: {remake}",
            path.display(),
            record.model,
            record.min_iou
        ));
    }
    let boxes: u64 = record.per_label.values().map(|c| c.matched + c.missed).sum();
    if boxes < GATE_MIN_BOXES {
        return Err(format!(
            "model {name}: its accuracy-gate record judged it on {boxes} boxes of the model's own, under \
             {GATE_MIN_BOXES}: too few to judge; {remake}"
        ));
    }
    if record.f1.is_nan() || record.f1 < need.min_f1 {
        return Err(format!(
            "model {name}: refused by the accuracy gate: F1 {:.4} against the model's own detections, under {}",
            record.f1, need.min_f1
        ));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(label: &str, bbox: [f32; 4], score: f32) -> Detection {
        Detection { label: label.into(), score, bbox }
    }

    #[test]
    fn boxes_match_by_label_and_iou() {
        let mut c = Comparison::default();
        let reference = [det("text", [0.0, 0.0, 10.0, 10.0], 0.9), det("title", [20.0, 0.0, 30.0, 10.0], 0.8)];
        // Same text box a little off (IoU 0.81), the title labelled text.
        let variant = [det("text", [0.0, 0.0, 10.0, 9.0], 0.9), det("text", [20.0, 0.0, 30.0, 10.0], 0.8)];
        c.add_page(&reference, &variant, 0.7);
        assert_eq!(c.per_label["text"], Counts { matched: 1, missed: 0, extra: 1 });
        assert_eq!(c.per_label["title"], Counts { matched: 0, missed: 1, extra: 0 });
        assert!((c.f1() - 0.5).abs() < 1e-9, "{}", c.f1());
        // Under the IoU: a miss and an extra box.
        let mut c = Comparison::default();
        c.add_page(&reference[..1], &[det("text", [0.0, 0.0, 10.0, 5.0], 0.9)], 0.7);
        assert_eq!(c.per_label["text"], Counts { matched: 0, missed: 1, extra: 1 });
        // Identical pages, and empty ones: F1 1.
        let mut c = Comparison::default();
        c.add_page(&reference, &reference, 0.7);
        c.add_page(&[], &[], 0.7);
        assert_eq!((c.pages, c.f1()), (2, 1.0));
    }

    #[test]
    fn a_record_judged_with_int8_dot_products_warns_on_a_cpu_without() {
        let cpuinfo = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni amx_int8 amx_tile\n\nprocessor\t: 1\n";
        let here = features_in(cpuinfo);
        assert_eq!(here, ["avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"]);
        assert_eq!(features_in("no flags here"), Vec::<String>::new());
        let mut record = GateRecord {
            model: "m@int8".into(),
            precision: "int8".into(),
            sha256: "a".into(),
            source_sha256: "b".into(),
            f1: 0.99,
            min_f1: GATE_F1,
            min_iou: GATE_IOU,
            pages: 1,
            documents: vec![],
            per_label: BTreeMap::new(),
            judged_on: Some(JudgedOn { onnxruntime: "ORT".into(), cpu: here.clone() }),
        };
        let avx2 = vec!["avx2".to_string()];
        let w = cpu_warning(&record, &avx2).expect("a warning without VNNI");
        assert!(w.contains("avx512_vnni, amx_int8") && w.contains("pagestream gate m@int8"), "{w}");
        assert_eq!(cpu_warning(&record, &here), None, "the same CPU");
        assert_eq!(cpu_warning(&record, &["avx_vnni".to_string()]), None, "another CPU with VNNI");
        record.judged_on = None;
        assert_eq!(cpu_warning(&record, &avx2), None, "an older record says nothing");
        // An older record (no judged_on) still reads.
        let old = r#"{"model":"m@int8","precision":"int8","sha256":"a","source_sha256":"b","f1":0.99,"min_f1":0.98,
            "min_iou":0.7,"pages":1,"documents":[],"per_label":{}}"#;
        assert_eq!(serde_json::from_str::<GateRecord>(old).unwrap().judged_on, None);
    }
}
