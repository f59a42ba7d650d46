//! `pagestream gate MODEL@VARIANT FILE.pdf…`: the accuracy gate of a model
//! variant. Renders every page as the splitter does, runs the model and the
//! variant on each, matches the variant's boxes to the model's (same label,
//! IoU ≥ 0.7) and prints per-label F1. F1 ≥ 0.98 on at least 100 of the
//! model's boxes passes: the record that lets inferencers serve the variant
//! is written beside its weights (exit 0). Under it, the variant is refused
//! (exit 1) and any earlier record removed. Any other failure (a model that
//! does not load, a PDF that does not open) exits 2.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use pagestream::Config;
use pagestream_inferencer::backend::EngineOptions;
use pagestream_inferencer::gate::{self, Comparison, GateRecord, GATE_F1, GATE_IOU, GATE_MIN_BOXES};
use pagestream_inferencer::{decode_image, Detector};
use pagestream_splitter::render::{RenderEvent, RenderRequest, Renderer};

#[derive(clap::Args, Debug)]
pub struct GateArgs {
    /// The variant, `<model>@<variant>` (a `[variants.<variant>]` of the
    /// model's manifest), e.g. `yolov8n_doclaynet@int8`
    #[arg(value_name = "MODEL@VARIANT")]
    pub model: String,
    /// PDFs whose pages are compared (keep them apart from the pages the
    /// variant was calibrated on)
    #[arg(value_name = "FILE.pdf", required = true)]
    pub files: Vec<PathBuf>,
    /// Compare and print only: write or remove no record
    #[arg(long)]
    pub dry_run: bool,
    /// TOML configuration file (models_dir, weights_dir, threads, DPI)
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Exit code 0: passed; 1: refused; 2: the gate could not judge it.
pub async fn gate(a: &GateArgs) -> Result<i32> {
    match judge(a).await {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(2)
        }
    }
}

async fn judge(a: &GateArgs) -> Result<i32> {
    let mut config = Config::load(a.config.as_deref()).map_err(anyhow::Error::msg)?;
    // Variants are served by ONNX Runtime only: judged with it.
    config.inferencer.backend = pagestream_inferencer::Backend::Ort;
    let Some((base, _)) = a.model.split_once('@') else {
        bail!("{:?} is not a variant: name one as <model>@<variant>, e.g. yolov8n_doclaynet@int8", a.model);
    };
    let cfg = &config.inferencer;
    let opts = EngineOptions::from_config(cfg);
    let reference = Detector::load(cfg, base).with_context(|| format!("loading model {base}"))?;
    let variant = Detector::load_for_gate(cfg, &a.model, &opts).with_context(|| format!("loading {}", a.model))?;
    let renderer = Renderer::in_process(&config.splitter.pdfium_library)?;
    let mut cmp = Comparison::default();
    let (mut reference_s, mut variant_s) = (0.0, 0.0);
    let mut documents = Vec::new();
    for file in &a.files {
        documents.push(file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let mut events = renderer.render(RenderRequest {
            pdf: file.clone(),
            password: None,
            dpi: config.splitter.dpi,
            max_pixels: config.splitter.max_pixels,
            pages: 1..=u32::MAX,
            skip: Default::default(),
            text: false,
        });
        while let Some(ev) = events.recv().await {
            let page = match ev {
                RenderEvent::Page(p) => p,
                RenderEvent::Opened { .. } => continue,
                RenderEvent::OpenFailed { code, message } => bail!("{}: {code}: {message}", file.display()),
                RenderEvent::PageFailed { page, code, message } => {
                    bail!("{} page {page}: {code}: {message}", file.display())
                }
            };
            let img = decode_image(&page.png).map_err(anyhow::Error::msg)?;
            let t = Instant::now();
            let (want, _) = reference.detect(&img).with_context(|| format!("model {base}"))?;
            reference_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let (got, _) = variant.detect(&img).with_context(|| format!("model {}", a.model))?;
            variant_s += t.elapsed().as_secs_f64();
            cmp.add_page(&want, &got, GATE_IOU);
        }
    }
    let pages = cmp.pages.max(1) as f64;
    println!(
        "accuracy gate of {} ({}) against {base}: {} pages of {} PDFs, a box matches when its label is the same and IoU ≥ {GATE_IOU}",
        a.model,
        variant.manifest.precision.as_str(),
        cmp.pages,
        a.files.len()
    );
    println!("\n| label | {base} boxes | variant boxes | matched | F1 |\n|---|---:|---:|---:|---:|");
    let total = cmp.total();
    for (label, c) in cmp.per_label.iter().chain([(&"all".to_string(), &total)]) {
        println!("| {label} | {} | {} | {} | {:.4} |", c.matched + c.missed, c.matched + c.extra, c.matched, c.f1());
    }
    println!(
        "\nmodel time per page, one page at a time: {base} {:.0} ms, {} {:.0} ms ({:.2}×)",
        reference_s * 1000.0 / pages,
        a.model,
        variant_s * 1000.0 / pages,
        reference_s / variant_s.max(1e-9)
    );
    let judged_on = gate::JudgedOn {
        onnxruntime: pagestream_inferencer::backend::onnxruntime_build().unwrap_or_default(),
        cpu: gate::cpu_features(),
    };
    println!(
        "judged with ONNX Runtime [{}]; CPU features: {}",
        judged_on.onnxruntime.trim_start_matches("ORT Build Info:").trim(),
        if judged_on.cpu.is_empty() { "none known".to_string() } else { judged_on.cpu.join(" ") }
    );
    let f1 = cmp.f1();
    let weights = variant.manifest.weights_path(&cfg.weights_dir);
    let record_path = gate::record_path(&weights);
    let boxes = total.matched + total.missed;
    if boxes < GATE_MIN_BOXES {
        return refuse(
            format!(
                "refused: the model found {boxes} boxes on these pages, under {GATE_MIN_BOXES}: too few to judge {} (F1 {f1:.4}); give the gate more pages",
                a.model
            ),
            &record_path,
            a.dry_run,
        );
    }
    if f1 >= GATE_F1 {
        let record = GateRecord {
            model: a.model.clone(),
            precision: variant.manifest.precision.as_str().into(),
            sha256: variant.model.sha256.clone(),
            source_sha256: reference.model.sha256.clone(),
            f1,
            min_f1: GATE_F1,
            min_iou: GATE_IOU,
            pages: cmp.pages,
            documents,
            per_label: cmp.per_label.clone(),
            judged_on: Some(judged_on),
        };
        if a.dry_run {
            println!("passed: F1 {f1:.4} ≥ {GATE_F1} (dry run: no record written)");
        } else {
            // Written whole: an inferencer starting now reads the old record
            // or the new one, never half of it.
            pagestream_results::store::write_atomic(&record_path, &serde_json::to_vec_pretty(&record)?).await?;
            println!("passed: F1 {f1:.4} ≥ {GATE_F1}; inferencers may serve it: {} written", record_path.display());
        }
        Ok(0)
    } else {
        refuse(
            format!("refused: F1 {f1:.4} < {GATE_F1}; inferencers will not serve {}", a.model),
            &record_path,
            a.dry_run,
        )
    }
}

/// A refusal (exit 1): says why, and removes the variant's earlier record
/// (not in a dry run) so that no inferencer serves it.
fn refuse(mut said: String, record_path: &std::path::Path, dry_run: bool) -> Result<i32> {
    if !dry_run && record_path.exists() {
        std::fs::remove_file(record_path).with_context(|| format!("removing {}", record_path.display()))?;
        said.push_str(&format!(" (the earlier record {} removed)", record_path.display()));
    }
    println!("{said}");
    Ok(1)
}
