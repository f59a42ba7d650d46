//! The inference engine on real models and real rendered pages: the three
//! decoders (picodet, yolov8, boxes), both backends (ONNX Runtime and
//! tract) and their parity, batching, manifest validation and device
//! selection.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use pagestream::Config;
use pagestream_e2e::{iou, render_pages, repo_root};
use pagestream_inferencer::backend::{BackendKind, Device, EngineOptions, OutTensor};
use pagestream_inferencer::engine::LoadError;
use pagestream_inferencer::Detector;
use pagestream_inferencer::InferencerConfig;
use pagestream_schemas::Detection;

fn opts(backend: BackendKind, threads: usize) -> EngineOptions {
    let cfg = Config::default().inferencer;
    EngineOptions {
        backend,
        device: Device::Cpu,
        threads,
        sessions: 1,
        onnxruntime_library: cfg.onnxruntime_library,
        cpu_arena: cfg.ort_cpu_arena,
    }
}

fn fixture_config() -> InferencerConfig {
    let mut cfg = Config::default().inferencer;
    cfg.models_dir = repo_root().join("tests/fixtures/models");
    cfg.weights_dir = repo_root().join("tests/fixtures/models/boxes_fixture");
    cfg
}

fn approx(a: f32, b: f32) -> bool {
    (a - b).abs() < 1e-3
}

fn assert_dets(got: &[Detection], want: &[(&str, f32, [f32; 4])]) {
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (g, (label, score, bbox)) in got.iter().zip(want) {
        assert_eq!(g.label, *label, "{got:?}");
        assert!(approx(g.score, *score), "score {} vs {score}: {got:?}", g.score);
        for k in 0..4 {
            assert!(approx(g.bbox[k], bbox[k]), "bbox {:?} vs {bbox:?}", g.bbox);
        }
    }
}

/// The `boxes` decoder on a graph with known outputs: a 200×200 page is
/// letterboxed to 64×64 at x = 16 inside the 96×64 input, so the model's
/// box [24, 8, 56, 40] is [25, 25, 125, 125] on the page; the third box
/// (score 0.3) falls under the threshold. Both backends, one answer.
#[test]
fn boxes_decoder_maps_known_boxes_back_to_the_page() {
    let cfg = fixture_config();
    let white = RgbImage::from_pixel(200, 200, Rgb([255, 255, 255]));
    for backend in [BackendKind::Ort, BackendKind::Tract] {
        let d = Detector::load_with(&cfg, "boxes_fixture", &opts(backend, 1)).unwrap();
        assert_eq!(d.labels, vec!["background", "heading", "paragraph"]);
        let (dets, _) = d.detect(&white).unwrap();
        assert_dets(
            &dets,
            &[("heading", 0.9, [25.0, 25.0, 125.0, 125.0]), ("paragraph", 0.6, [0.0, 0.0, 200.0, 200.0])],
        );
    }
}

/// A dynamic batch axis runs several pages in one ORT call, and each page
/// gets its own answer (scores follow each image's brightest value); tract
/// runs the same pages one by one and agrees.
#[test]
fn batches_keep_pages_apart() {
    let cfg = fixture_config();
    let white = RgbImage::from_pixel(200, 200, Rgb([255, 255, 255]));
    let grey = RgbImage::from_pixel(200, 200, Rgb([200, 200, 200]));
    let ort = Detector::load_with(&cfg, "boxes_fixture", &opts(BackendKind::Ort, 1)).unwrap();
    assert!(ort.max_batch() > 1, "the fixture's batch axis is dynamic");
    let tract = Detector::load_with(&cfg, "boxes_fixture", &opts(BackendKind::Tract, 1)).unwrap();
    assert_eq!(tract.max_batch(), 1);
    let g = 200.0 / 255.0;
    for d in [&ort, &tract] {
        let res = d.detect_batch(&[&white, &grey, &white]).unwrap();
        assert_eq!(res.len(), 3);
        assert_dets(
            &res[0].0,
            &[("heading", 0.9, [25.0, 25.0, 125.0, 125.0]), ("paragraph", 0.6, [0.0, 0.0, 200.0, 200.0])],
        );
        // 0.6 × 200/255 = 0.47 falls under the 0.5 threshold.
        assert_dets(&res[1].0, &[("heading", 0.9 * g, [25.0, 25.0, 125.0, 125.0])]);
        assert_dets(&res[2].0, &res[0].0.iter().map(|x| (x.label.as_str(), x.score, x.bbox)).collect::<Vec<_>>());
    }
}

/// The batcher groups pages that arrive together into one run (when the
/// model allows) and answers each page with its own detections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batcher_answers_each_page() {
    let cfg = fixture_config();
    let d = std::sync::Arc::new(Detector::load_with(&cfg, "boxes_fixture", &opts(BackendKind::Ort, 1)).unwrap());
    let batcher =
        std::sync::Arc::new(pagestream_inferencer::Batcher::spawn(d, 4, std::time::Duration::from_millis(50)));
    let mut tasks = Vec::new();
    for (i, v) in [255u8, 200, 255, 200, 255].into_iter().enumerate() {
        let b = batcher.clone();
        tasks.push(tokio::spawn(async move { (i, v, b.detect(RgbImage::from_pixel(200, 200, Rgb([v, v, v]))).await) }));
    }
    for t in tasks {
        let (i, v, res) = t.await.unwrap();
        let (dets, _) = res.unwrap();
        let want = if v == 255 { 2 } else { 1 };
        assert_eq!(dets.len(), want, "page {i} (value {v}): {dets:?}");
        assert!(approx(dets[0].score, 0.9 * v as f32 / 255.0), "page {i}: {dets:?}");
    }
}

/// Largest difference between two sets of outputs: absolute, and scaled by
/// the value's magnitude where it exceeds 1 (YOLO writes box coordinates in
/// input pixels, up to 1024, where float32 keeps ~7 significant digits).
fn max_diff(a: &[OutTensor], b: &[OutTensor]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let (mut abs, mut scaled) = (0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.name, &x.shape), (&y.name, &y.shape));
        for (p, q) in x.data.iter().zip(&y.data) {
            abs = abs.max((p - q).abs());
            scaled = scaled.max((p - q).abs() / p.abs().max(1.0));
        }
    }
    (abs, scaled)
}

/// Every ORT detection has a tract detection with the same label and
/// IoU ≥ 0.95, and the other way round.
fn assert_same_detections(a: &[Detection], b: &[Detection], what: &str) {
    let f = |d: &Detection| d.bbox.map(|v| v as f64);
    for (x, y, side) in [(a, b, "ort→tract"), (b, a, "tract→ort")] {
        for d in x {
            let best = y.iter().filter(|o| o.label == d.label).map(|o| iou(&f(d), &f(o))).fold(0.0, f64::max);
            assert!(best >= 0.95, "{what} {side}: {} {:?} best IoU {best:.3}", d.label, d.bbox);
        }
    }
}

/// ORT and tract on real rendered pages, for both real models: raw outputs
/// within 1e-3 (relative to the value where it exceeds 1), detections equal
/// up to IoU ≥ 0.95.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ort_and_tract_agree_on_real_pages() {
    let pages = render_pages("fig_dbscan-jss.pdf", 150.0, 4).await;
    let cfg = Config::default().inferencer;
    for model in ["layout_cdla", "yolov8n_doclaynet"] {
        let ort = Detector::load_with(&cfg, model, &opts(BackendKind::Ort, 2)).unwrap();
        let tract = Detector::load_with(&cfg, model, &opts(BackendKind::Tract, 2)).unwrap();
        assert_eq!(ort.labels, tract.labels);
        let mut boxes = 0;
        for (i, page) in pages.iter().enumerate() {
            let (abs, diff) = max_diff(&ort.raw_outputs(page).unwrap(), &tract.raw_outputs(page).unwrap());
            let (a, _) = ort.detect(page).unwrap();
            let (b, _) = tract.detect(page).unwrap();
            println!(
                "{model} page {}: max |ort - tract| = {abs:.2e} (scaled {diff:.2e}), {} vs {} detections",
                i + 1,
                a.len(),
                b.len()
            );
            assert!(diff <= 1e-3, "{model} page {}: raw outputs differ by {diff} (scaled)", i + 1);
            assert_same_detections(&a, &b, &format!("{model} page {}", i + 1));
            boxes += a.len();
        }
        assert!(boxes >= 4 * 3, "{model}: only {boxes} detections on 4 article pages");
    }
}

/// The YOLOv8 DocLayNet model (letterbox, labels from Ultralytics'
/// `names` metadata) finds the article's title at the top of page 1 and
/// text blocks, all inside the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yolov8_finds_the_layout_of_a_real_page() {
    let page = render_pages("fig_dbscan-jss.pdf", 150.0, 1).await.remove(0);
    let d = Detector::load(&Config::default().inferencer, "yolov8n_doclaynet").unwrap();
    assert_eq!(d.labels.len(), 11);
    assert_eq!((d.labels[0].as_str(), d.labels[10].as_str()), ("Caption", "Title"));
    let (dets, _) = d.detect(&page).unwrap();
    for x in &dets {
        println!("{:>16} {:.2} {:?}", x.label, x.score, x.bbox.map(|v| v.round()));
        let [x0, y0, x1, y1] = x.bbox;
        assert!(
            0.0 <= x0 && x0 < x1 && x1 <= page.width() as f32 && 0.0 <= y0 && y0 < y1 && y1 <= page.height() as f32
        );
        assert!(x.score > 0.25);
    }
    let title = dets.iter().find(|x| x.label == "Title").expect("a Title on page 1");
    assert!(title.bbox[3] < page.height() as f32 / 3.0, "title {:?} not in the top third", title.bbox);
    assert!(dets.iter().filter(|x| x.label == "Text").count() >= 3, "{dets:?}");
}

fn write_manifest(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join(name)).unwrap();
    std::fs::write(dir.join(name).join("model.toml"), text).unwrap();
    dir.to_path_buf()
}

/// A manifest that disagrees with the model fails at load, saying how.
#[test]
fn manifest_mismatches_fail_with_precise_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(repo_root().join("models/layout_cdla/model.toml")).unwrap();
    let yolo = std::fs::read_to_string(repo_root().join("models/yolov8n_doclaynet/model.toml")).unwrap();
    let cases = [
        (
            "wrong_input",
            base.replace("name = \"image\"", "name = \"img\""),
            "manifest input \"img\" is not among the model's inputs [\"image\"]",
        ),
        (
            "wrong_size",
            base.replace("width = 608", "width = 640"),
            "input \"image\" has shape [1, 3, 800, 608], the manifest describes [1, 3, 800, 640]",
        ),
        (
            "wrong_strides",
            base.replace("strides = [8, 16, 32, 64]", "strides = [8, 16, 32]"),
            "picodet decoder with 3 strides needs 6 outputs, the model has 8",
        ),
        (
            "wrong_key",
            base.replace("labels_metadata_key = \"character\"", "labels_metadata_key = \"names\""),
            "metadata has no key \"names\" for labels",
        ),
        (
            "wrong_labels",
            yolo.replace("labels_metadata_key = \"names\"", "labels = [\"a\", \"b\"]"),
            "output \"output0\" has shape [1, 15, 21504]; the yolov8 decoder with 2 labels expects [1, 6, anchors]",
        ),
        ("wrong_sha", base.replace("25b1f27e", "00000000"), "has sha256 25b1f27e"),
    ];
    let mut cfg = Config::default().inferencer;
    cfg.models_dir = tmp.path().to_path_buf();
    for (name, text, want) in cases {
        write_manifest(
            tmp.path(),
            name,
            &text.replacen(
                &format!(
                    "name = \"{}\"",
                    if text.contains("yolov8n_doclaynet") { "yolov8n_doclaynet" } else { "layout_cdla" }
                ),
                &format!("name = \"{name}\""),
                1,
            ),
        );
        for backend in [BackendKind::Ort, BackendKind::Tract] {
            let err =
                Detector::load_with(&cfg, name, &opts(backend, 1)).err().unwrap_or_else(|| panic!("{name} loaded"));
            assert!(err.to_string().contains(want), "{name} on {backend:?}: {err}");
        }
    }
}

/// `device = cuda` on a machine whose ONNX Runtime has no CUDA provider is
/// a start-up error naming what is missing; `auto` falls back to the CPU.
#[test]
fn cuda_is_required_or_falls_back() {
    let cfg = Config::default().inferencer;
    let mut o = opts(BackendKind::Ort, 1);
    o.device = Device::Cuda;
    let err = Detector::load_with(&cfg, "layout_cdla", &o).err().expect("the CPU build of libonnxruntime has no CUDA");
    assert!(matches!(err, LoadError::Backend(_)), "{err:?}");
    let err = err.to_string();
    assert!(err.contains("has no CUDA execution provider"), "{err}");
    assert!(err.contains("onnxruntime-gpu") && err.contains("cuDNN 9"), "{err}");
    o.device = Device::Auto;
    let d = Detector::load_with(&cfg, "layout_cdla", &o).unwrap();
    assert_eq!(d.device(), "cpu");
    // The config refuses CUDA on tract before anything loads.
    let err = Config::from_sources(
        None,
        [
            ("PAGESTREAM_INFERENCER_BACKEND".into(), "tract".into()),
            ("PAGESTREAM_INFERENCER_DEVICE".into(), "cuda".into()),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("tract backend runs on the CPU only"), "{err}");
}
