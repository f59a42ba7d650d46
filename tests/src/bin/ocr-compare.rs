//! pagestream's OCR against rapidocr-onnxruntime 1.4.4 on the scanned
//! corpus pages of `tests/reference/ocr/rapidocr_ref.json` (same models,
//! same 150 dpi renders: the RGB pixels' sha256 is checked against the
//! ones rapidocr read).
//!
//! `ocr-compare [--backend ort|tract] [--rounds N] [--json OUT]` prints,
//! per page, the lines found, the order-free line CER (with and without
//! spaces) of ours and of rapidocr against the transcriptions in
//! `tests/reference/ocr/gt/`, and our time per page (median of N rounds:
//! det, cls, rec, total). `--json` writes our lines in the reference's
//! layout.

use std::path::PathBuf;

use pagestream_e2e::cer::line_cer_pct;
use pagestream_inferencer::backend::EngineOptions;
use pagestream_inferencer::ocr::Ocr;
use pagestream_inferencer::{Backend, InferencerConfig};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let mut cfg = InferencerConfig::default();
    if let Some(b) = arg("--backend") {
        cfg.backend = if b == "tract" { Backend::Tract } else { Backend::Ort };
    }
    let rounds: usize = arg("--rounds").map_or(1, |r| r.parse().expect("--rounds N"));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reference/ocr");
    let reference: Value = serde_json::from_slice(&std::fs::read(root.join("rapidocr_ref.json")).unwrap()).unwrap();
    let opts = EngineOptions::from_config(&cfg);
    let started = std::time::Instant::now();
    let ocr = Ocr::load(&cfg.models_dir, &cfg.weights_dir, "ppocr_v4", &opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("loaded {} on {} in {:.2} s", ocr.manifest.name, cfg.backend.as_str(), started.elapsed().as_secs_f32());
    let mut out_pages = Vec::new();
    println!("| page | px | lines ours / rapidocr | line CER ws ours / rapidocr | nows ours / rapidocr | ours s/page (det, cls, rec) |");
    println!("|---|---|---|---|---|---|");
    for page in reference["pages"].as_array().unwrap() {
        let file = page["file"].as_str().unwrap();
        let n = page["page"].as_u64().unwrap() as u32;
        let rendered = pagestream_e2e::rendered(&pagestream_e2e::corpus(file), 150.0, n..=n).await;
        let img = pagestream_inferencer::decode_image(&rendered[0].png).unwrap();
        let sha = hex::encode(Sha256::digest(img.as_raw()));
        if sha != page["png_rgb_sha256"].as_str().unwrap() {
            eprintln!("warning: {file} p{n}: our render differs from rapidocr's input (sha256 {sha})");
        }
        let mut times = Vec::new();
        let mut result = None;
        for _ in 0..rounds.max(1) {
            let t = std::time::Instant::now();
            let r = ocr.recognize(&img).unwrap_or_else(|e| panic!("{file} p{n}: {e}"));
            times.push((t.elapsed().as_secs_f32(), r.det_ms / 1000.0, r.cls_ms / 1000.0, r.rec_ms / 1000.0));
            result = Some(r);
        }
        times.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (total, det, cls, rec) = times[times.len() / 2];
        let result = result.unwrap();
        let ours: Vec<&str> = result.lines.iter().map(|l| l.text.as_str()).collect();
        let theirs: Vec<&str> = page["lines"].as_array().unwrap().iter().map(|l| l["text"].as_str().unwrap()).collect();
        let stem = file.trim_end_matches(".pdf");
        let gt_path = root.join(format!("gt/{stem}_p{n}.txt"));
        let cer = std::fs::read_to_string(&gt_path).ok().map(|gt| {
            let gt: Vec<&str> = gt.lines().collect();
            (line_cer_pct(&ours, &gt), line_cer_pct(&theirs, &gt))
        });
        let (ws, nows) = match cer {
            Some(((ows, onows), (tws, tnows))) => {
                (format!("{ows:.2} % / {tws:.2} %"), format!("{onows:.2} % / {tnows:.2} %"))
            }
            None => ("no transcription".into(), String::new()),
        };
        println!(
            "| {file} p{n} | {}×{} | {} / {} | {ws} | {nows} | {total:.2} ({det:.2}, {cls:.2}, {rec:.2}) |",
            img.width(),
            img.height(),
            ours.len(),
            theirs.len()
        );
        out_pages.push(json!({
            "file": file, "page": n, "width": img.width(), "height": img.height(),
            "n_lines": ours.len(), "wall_s": total, "det_s": det, "cls_s": cls, "rec_s": rec,
            "text": ours.join("\n"),
            "lines": result.lines.iter().map(|l| json!({"box": l.quad, "text": l.text, "score": l.score})).collect::<Vec<_>>(),
        }));
    }
    if let Some(path) = arg("--json") {
        let doc = json!({"tool": format!("pagestream ocr ({})", cfg.backend.as_str()), "pages": out_pages});
        std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    }
}
