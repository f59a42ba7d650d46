//! OCR (#24): pages without a text layer are read by PP-OCR on the
//! inferencer's backends, as rapidocr-onnxruntime 1.4.4 reads them.
//!
//! - Quality against rapidocr itself, same models, same pages: the
//!   order-free line CER of ours against the transcriptions in
//!   `tests/reference/ocr/gt/` is within 1 percentage point of rapidocr's
//!   (recorded in `tests/reference/ocr/rapidocr_ref.json`), upright and
//!   rotated pages.
//! - End to end with real servers: a scanned page's regions say what they
//!   say (`text_source: ocr`, known words), `ocr=never` leaves them empty
//!   without failing, `ocr=always` reads a born-digital page by OCR too.
//! - A corrupt OCR model file: the inferencer refuses to start, saying which.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use pagestream_e2e::api::{metric, metrics_text, upload};
use pagestream_e2e::cer::line_cer_pct;
use pagestream_e2e::procs::{bin_dir, stage_env, with_vars};
use pagestream_e2e::Harness;
use pagestream_inferencer::backend::EngineOptions;
use pagestream_inferencer::ocr::Ocr;
use pagestream_inferencer::InferencerConfig;
use pagestream_pipeline::embedded::NatsServer;
use serde_json::Value;

fn reference() -> (PathBuf, Value) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reference/ocr");
    let json = serde_json::from_slice(&std::fs::read(root.join("rapidocr_ref.json")).unwrap()).unwrap();
    (root, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_read_within_a_point_of_rapidocr() {
    let cfg = InferencerConfig::default();
    let ocr = Ocr::load(&cfg.models_dir, &cfg.weights_dir, "ppocr_v4", &EngineOptions::from_config(&cfg)).unwrap();
    let (root, reference) = reference();
    // An upright scan, and the brochure upright and turned by 270°.
    for (file, n) in [("scan_c03-29.pdf", 1), ("scan_cardinal-rotated.pdf", 1), ("scan_cardinal-rotated.pdf", 4)] {
        let theirs = reference["pages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["file"] == file && p["page"] == n)
            .unwrap_or_else(|| panic!("{file} p{n} is in rapidocr_ref.json"));
        let theirs: Vec<&str> =
            theirs["lines"].as_array().unwrap().iter().map(|l| l["text"].as_str().unwrap()).collect();
        let page = pagestream_e2e::render_pages(file, 150.0, n).await.pop().unwrap();
        let read = ocr.recognize(&page).unwrap();
        let ours: Vec<&str> = read.lines.iter().map(|l| l.text.as_str()).collect();
        let gt = std::fs::read_to_string(root.join(format!("gt/{}_p{n}.txt", file.trim_end_matches(".pdf")))).unwrap();
        let gt: Vec<&str> = gt.lines().collect();
        let ((ours_ws, _), (theirs_ws, _)) = (line_cer_pct(&ours, &gt), line_cer_pct(&theirs, &gt));
        eprintln!("{file} p{n}: {} lines, CER {ours_ws:.2} % (rapidocr {theirs_ws:.2} %)", ours.len());
        assert!(
            ours_ws <= theirs_ws + 1.0,
            "{file} p{n}: line CER {ours_ws:.2} % is more than 1 point above rapidocr's {theirs_ws:.2} %"
        );
        // Words: boxed inside the page, on the lines they came from.
        assert_eq!(read.text.source, pagestream_schemas::TextSource::Ocr);
        assert!(read.text.words.len() >= read.lines.len(), "{} words, {} lines", read.text.words.len(), ours.len());
        for w in &read.text.words {
            let b = w.bbox;
            assert!(
                b[0] <= b[2] && b[1] <= b[3] && b[2] <= page.width() as f32 && b[3] <= page.height() as f32,
                "{w:?}"
            );
            assert!(read.lines[w.line as usize].text.contains(&w.text), "{w:?}");
        }
    }
}

/// Every text of a page JSON (detections, then unassigned blocks), with
/// its source.
fn texts(page: &Value) -> Vec<(String, String)> {
    page["detections"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page["unassigned_text"].as_array().into_iter().flatten())
        .map(|d| (d["text"].as_str().unwrap().to_string(), d["text_source"].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_say_what_they_say_end_to_end() {
    let h = Harness::start(|c| c.inferencer.ocr_model = "ppocr_v4".into()).await.unwrap();
    // Checked at start, not held until a page is to be read.
    let loaded = |text: &str| metric(text, r#"pagestream_ocr_models_loaded{model="ppocr_v4"}"#);
    assert_eq!(loaded(&metrics_text(&h.client).await), Some(0.0));
    let auto = upload(&h.client, "scan_c03-29.pdf", &[]).await;
    let never = upload(&h.client, "scan_c03-29.pdf", &[("ocr", "never")]).await;
    // A born-digital page: its text layer by default, OCR when asked.
    let pdf = pagestream_e2e::text_pdf(&["Pagestream reads", "WHAT EACH BOX SAYS"]);
    let submit = |fields: &'static [(&'static str, &'static str)]| {
        let (client, pdf) = (&h.client, pdf.clone());
        async move {
            let ans = client.submit_multipart("typed.pdf", pdf, fields).await.unwrap();
            assert_eq!(ans.status, 202, "{}", ans.json);
            ans.json["id"].as_str().unwrap().to_string()
        }
    };
    let layer = submit(&[]).await;
    let always = submit(&[("ocr", "always")]).await;
    for id in [&auto, &never, &layer, &always] {
        let st = h.wait_terminal(id, Duration::from_secs(300)).await.unwrap();
        assert_eq!(st["state"], "completed", "{st}");
    }

    let page = h.result(&auto, "pages/1.json");
    let all: String = texts(&page).iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(" ");
    for known in ["WELL", "morning", "spiritual", "LECTURE"] {
        assert!(all.contains(known), "{known:?} not read on the scan: {all}");
    }
    assert!(texts(&page).iter().all(|(t, s)| s == "ocr" || (s == "none" && t.is_empty())), "{page}");
    assert!(page["timings"]["ocr_ms"].as_f64().unwrap() > 0.0, "{}", page["timings"]);
    // The Markdown export carries it.
    let (status, md) = h.client.get_bytes(&format!("/v1/documents/{auto}/results?format=markdown")).await.unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&md).contains("morning"));
    assert_eq!(loaded(&metrics_text(&h.client).await), Some(1.0));

    // ocr=never: the same scan completes, every region empty, "none".
    let page = h.result(&never, "pages/1.json");
    let texts_never = texts(&page);
    assert!(!texts_never.is_empty());
    assert!(texts_never.iter().all(|(t, s)| t.is_empty() && s == "none"), "{page}");
    assert!(page["timings"].get("ocr_ms").is_none(), "{}", page["timings"]);

    // The typed page: its text layer, or with ocr=always what OCR reads
    // (PP-OCRv4 may drop the spaces between Latin words).
    let squeeze = |page: &Value, source: &str| -> String {
        let t = texts(page);
        assert!(t.iter().all(|(text, s)| s == source || text.is_empty()), "{source}: {page}");
        t.iter().map(|(text, _)| text.as_str()).collect::<String>().split_whitespace().collect()
    };
    let from_layer = squeeze(&h.result(&layer, "pages/1.json"), "text_layer");
    assert_eq!(from_layer, "PagestreamreadsWHATEACHBOXSAYS");
    let page = h.result(&always, "pages/1.json");
    let from_ocr = squeeze(&page, "ocr");
    assert!(from_ocr.contains("Pagestream") && from_ocr.contains("WHATEACHBOXSAYS"), "{from_ocr:?}");
    assert!(page["timings"]["ocr_ms"].as_f64().unwrap() > 0.0);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_ocr_model_stops_the_inferencer_at_start() {
    let nats = tokio::task::spawn_blocking(NatsServer::start).await.unwrap().unwrap();
    let cfg = InferencerConfig::default();
    let weights = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&cfg.weights_dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "onnx") {
            std::fs::copy(&p, weights.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    // The recogniser's file cut short, as an interrupted copy leaves it.
    let rec = weights.path().join("ch_PP-OCRv4_rec_infer.onnx");
    let bytes = std::fs::read(&rec).unwrap();
    std::fs::write(&rec, &bytes[..bytes.len() / 2]).unwrap();
    let env = with_vars(
        stage_env(&nats.url(), "ocrbad"),
        &[
            ("PAGESTREAM_INFERENCER_OCR_MODEL", "ppocr_v4".into()),
            ("PAGESTREAM_INFERENCER_WEIGHTS_DIR", weights.path().display().to_string()),
        ],
    );
    let child = Command::new(bin_dir().join("inferencer"))
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out =
        tokio::time::timeout(Duration::from_secs(120), tokio::task::spawn_blocking(move || child.wait_with_output()))
            .await
            .expect("the inferencer exits instead of serving")
            .unwrap()
            .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("OCR model ppocr_v4 (rec)") && log.contains("corrupt"), "{log}");
    assert!(log.contains("ch_PP-OCRv4_rec_infer.onnx"), "{log}");
}
