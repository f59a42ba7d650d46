//! Model variants (`<model>@<variant>`, docs/models.md#variants): the
//! accuracy gate refuses a broken variant and passes a faithful one, an
//! inferencer serves a variant only with a passing gate record of that very
//! file, tract refuses quantized variants naming itself, and a document picks
//! a variant by name over HTTP and straight on NATS. And `scripts/gpu-check`
//! without a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pagestream_e2e::api::upload;
use pagestream_e2e::procs::bin_dir;
use pagestream_e2e::{boxes, corpus, matched, publish, Harness, CDLA_SHA};
use pagestream_inferencer::backend::BackendKind;
use pagestream_inferencer::{Backend, Detector};
use pagestream_pipeline::config::deps_dir;
use pagestream_schemas::{encode, DocumentSubmitted, Source, SubmitOptions, VERSION};
use serde_json::Value;

/// A models directory whose `layout_cdla` manifest has two more variants —
/// `zeroed` (int8 by its manifest; every weight zero: it finds nothing) and
/// `same` (a byte copy of the fp32 weights) — and a weights directory with
/// the three files.
struct Variants {
    _dir: tempfile::TempDir,
    models: PathBuf,
    weights: PathBuf,
}

fn variants() -> Variants {
    let dir = tempfile::tempdir().unwrap();
    let (models, weights) = (dir.path().join("models"), dir.path().join("weights"));
    std::fs::create_dir_all(models.join("layout_cdla")).unwrap();
    std::fs::create_dir_all(&weights).unwrap();
    let manifest = std::fs::read_to_string(pagestream_e2e::repo_root().join("models/layout_cdla/model.toml")).unwrap();
    let extra = "\n[variants.zeroed]\nfile = \"layout_cdla.zeroed.onnx\"\nprecision = \"int8\"\n\
                 \n[variants.same]\nfile = \"layout_cdla.same.onnx\"\nprecision = \"fp32\"\n";
    std::fs::write(models.join("layout_cdla/model.toml"), manifest + extra).unwrap();
    let fp32 = deps_dir().join("models/layout_cdla.onnx");
    std::fs::copy(&fp32, weights.join("layout_cdla.onnx")).unwrap();
    std::fs::copy(&fp32, weights.join("layout_cdla.same.onnx")).unwrap();
    // Every weight tensor (float, 2 axes or more; initializers or Constant
    // nodes) set to zero, with the onnx package scripts/setup installs for
    // scripts/quantize.
    let zero = "import sys, onnx, numpy as np\n\
                from onnx import numpy_helper\n\
                m = onnx.load(sys.argv[1])\n\
                zeroed = 0\n\
                def zero(t):\n\
                \x20   global zeroed\n\
                \x20   a = numpy_helper.to_array(t)\n\
                \x20   if a.dtype.kind == 'f' and a.ndim >= 2:\n\
                \x20       t.CopyFrom(numpy_helper.from_array(np.zeros_like(a), t.name)); zeroed += 1\n\
                for t in m.graph.initializer: zero(t)\n\
                for n in m.graph.node:\n\
                \x20   for at in n.attribute:\n\
                \x20       if n.op_type == 'Constant' and at.name == 'value': zero(at.t)\n\
                assert zeroed > 50, zeroed\n\
                onnx.save(m, sys.argv[2])\n";
    let out = Command::new(deps_dir().join("venv/bin/python"))
        .args(["-c", zero])
        .arg(&fp32)
        .arg(weights.join("layout_cdla.zeroed.onnx"))
        .output()
        .unwrap();
    assert!(out.status.success(), "zeroing the weights: {}", String::from_utf8_lossy(&out.stderr));
    Variants { _dir: dir, models, weights }
}

impl Variants {
    fn config(&self) -> pagestream::Config {
        let mut c = pagestream::Config::default();
        c.inferencer.models_dir = self.models.clone();
        c.inferencer.weights_dir = self.weights.clone();
        c
    }

    /// `pagestream gate MODEL@VARIANT fig_dbscan-jss.pdf`: (exit code, stdout).
    fn gate(&self, model: &str) -> (i32, String) {
        self.gate_on(model, "fig_dbscan-jss.pdf")
    }

    fn gate_on(&self, model: &str, pdf: &str) -> (i32, String) {
        let out = Command::new(bin_dir().join("pagestream"))
            .args(["gate", model])
            .arg(corpus(pdf))
            .env("PAGESTREAM_INFERENCER_MODELS_DIR", &self.models)
            .env("PAGESTREAM_INFERENCER_WEIGHTS_DIR", &self.weights)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), stdout)
    }

    fn record(&self, file: &str) -> PathBuf {
        self.weights.join(format!("{file}.gate.json"))
    }

    fn load(&self, model: &str) -> Result<Detector, String> {
        Detector::load(&self.config().inferencer, model).map_err(|e| e.to_string())
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn the_gate_refuses_a_broken_variant_and_only_a_passed_file_is_served() {
    let v = variants();
    // Zeroed weights: no detection matches; refused, no record.
    let (code, out) = v.gate("layout_cdla@zeroed");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused: F1 0.0000 < 0.98"), "{out}");
    assert!(out.contains("28 pages of 1 PDFs"), "{out}");
    assert!(out.contains("| text |") && out.contains("| all |"), "per-label rows: {out}");
    assert!(!v.record("layout_cdla.zeroed.onnx").exists());
    let err = v.load("layout_cdla@zeroed").err().expect("a variant without a record is refused");
    assert!(err.contains("no accuracy-gate record") && err.contains("scripts/quantize"), "{err}");

    // A byte copy of the model: F1 1, passed, recorded, served under its name.
    let (code, out) = v.gate("layout_cdla@same");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("passed: F1 1.0000"), "{out}");
    let record = v.record("layout_cdla.same.onnx");
    let r: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(
        (r["model"].as_str(), r["sha256"].as_str(), r["source_sha256"].as_str()),
        (Some("layout_cdla@same"), Some(CDLA_SHA), Some(CDLA_SHA))
    );
    assert_eq!((r["pages"].as_u64(), r["f1"].as_f64()), (Some(28), Some(1.0)));
    assert!(r["per_label"]["text"]["matched"].as_u64().unwrap() > 50, "{r}");
    // Where it was judged: the ONNX Runtime that ran it, this CPU's features.
    let judged = &r["judged_on"];
    assert!(judged["onnxruntime"].as_str().unwrap().contains("git-commit-id="), "{r}");
    let cpu: Vec<&str> = judged["cpu"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    assert_eq!(cpu.contains(&"avx2"), flags.contains(" avx2"), "{r}");
    assert!(out.contains("judged with ONNX Runtime [git-branch=") && out.contains("; CPU features: "), "{out}");
    let d = v.load("layout_cdla@same").unwrap();
    assert_eq!((d.model.name.as_str(), d.model.sha256.as_str()), ("layout_cdla@same", CDLA_SHA));

    // The passed record moved onto the zeroed file: not that file's.
    std::fs::copy(&record, v.record("layout_cdla.zeroed.onnx")).unwrap();
    let err = v.load("layout_cdla@zeroed").err().unwrap();
    assert!(err.contains("is not the file the accuracy gate passed"), "{err}");
    // A record of that file under the threshold (hand-edited): refused.
    // The same file's bytes under the zeroed name, with the record of the
    // `same` variant: a record of another variant is refused.
    std::fs::copy(v.weights.join("layout_cdla.same.onnx"), v.weights.join("layout_cdla.zeroed.onnx")).unwrap();
    let err = v.load("layout_cdla@zeroed").err().unwrap();
    assert!(err.contains("is for layout_cdla@same at IoU 0.7, not for this variant"), "{err}");
    edit_json(&v.record("layout_cdla.zeroed.onnx"), |r| {
        r["model"] = "layout_cdla@zeroed".into();
        r["f1"] = 0.5.into();
    });
    let err = v.load("layout_cdla@zeroed").err().unwrap();
    assert!(err.contains("refused by the accuracy gate: F1 0.5000"), "{err}");
    // Made from other weights than the model's own: refused.
    edit_json(&record, |r| r["source_sha256"] = "0".repeat(64).into());
    let err = v.load("layout_cdla@same").err().unwrap();
    assert!(err.contains("the model's are 25b1f27e"), "{err}");
    // A variant the manifest does not declare, and a gate asked of a plain model.
    let err = v.load("layout_cdla@int4").err().unwrap();
    assert!(err.contains("has no variant \"int4\" (its variants: int8, same, zeroed)"), "{err}");
    // On pages where the model finds nothing every variant would score F1 1:
    // the gate refuses to judge (a blank page), and says so.
    let (code, out) = v.gate_on("layout_cdla@zeroed", "stress_blank-no-content.pdf");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the model found 0 boxes on these pages, under 100: too few to judge"), "{out}");
    assert!(out.contains("(the earlier record") && !v.record("layout_cdla.zeroed.onnx").exists(), "{out}");
    // What the gate cannot judge at all exits 2, not 1 (a refusal): a plain
    // model, a PDF that does not open.
    assert_eq!(v.gate("layout_cdla").0, 2);
    assert_eq!(v.gate_on("layout_cdla@same", "bad_invalid-header-eof.pdf").0, 2);
}

#[test]
fn tract_refuses_a_quantized_variant_naming_itself() {
    let v = variants();
    let mut cfg = v.config().inferencer;
    cfg.backend = Backend::Tract;
    let err = Detector::load(&cfg, "layout_cdla@zeroed").err().unwrap().to_string();
    assert!(
        err.contains("model layout_cdla@zeroed: the tract backend does not serve int8 models")
            && err.contains("inferencer.backend = \"ort\""),
        "{err}"
    );
    // The same inferencer config serves the fp32 model with tract.
    let d = Detector::load(&cfg, "layout_cdla").unwrap();
    assert_eq!(d.backend, BackendKind::Tract);
}

/// One inferencer serves the model and its variant; a document names the
/// variant in its `model` option, over HTTP or in a job published straight
/// on NATS, and its pages are the variant's (its name in every result); a
/// variant no inferencer serves is refused like any unserved model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_picks_a_variant_over_http_and_on_nats() {
    let v = variants();
    assert_eq!(v.gate("layout_cdla@same").0, 0);
    let (models, weights) = (v.models.clone(), v.weights.clone());
    let h = Harness::start(move |c| {
        c.inferencer.models_dir = models;
        c.inferencer.weights_dir = weights;
        c.inferencer.models = vec!["layout_cdla@same".into()];
    })
    .await
    .unwrap();
    let pdf = "scan_cardinal-rotated.pdf";
    let over_http = upload(&h.client, pdf, &[("model", "layout_cdla@same")]).await;
    let plain = upload(&h.client, pdf, &[]).await;
    let ctx = &h.pipeline.ctx;
    let direct = DocumentSubmitted {
        v: VERSION,
        doc_id: "variant-on-nats".into(),
        title: None,
        source: Source { inline: Some(std::fs::read(corpus(pdf)).unwrap().into()), ..Default::default() },
        options: SubmitOptions { model: Some("layout_cdla@same".into()), ..Default::default() },
        submitted_at: None,
        start_page: None,
        owner: None,
    };
    publish(&ctx.js, ctx.names.docs_submitted(), encode(&direct)).await;
    for id in [over_http.as_str(), plain.as_str(), "variant-on-nats"] {
        let st = h.wait_terminal(id, Duration::from_secs(240)).await.unwrap();
        assert_eq!(st["state"], "completed", "{id}: {st}");
    }
    let model_of = |id: &str| h.result(id, "manifest.json")["model"]["name"].clone();
    assert_eq!(model_of(&over_http), "layout_cdla@same");
    assert_eq!(model_of("variant-on-nats"), "layout_cdla@same");
    assert_eq!(model_of(&plain), "layout_cdla");
    // The same weights: the same boxes on every page, whichever way it came.
    for n in 1..=4 {
        let want = boxes(&h.result(&plain, &format!("pages/{n}.json"))["detections"]);
        for id in [over_http.as_str(), "variant-on-nats"] {
            let page = h.result(id, &format!("pages/{n}.json"));
            assert_eq!(page["model"]["name"], "layout_cdla@same", "{id} page {n}");
            let got = boxes(&page["detections"]);
            assert_eq!((got.len(), matched(&want, &got, 0.99)), (want.len(), want.len()), "{id} page {n}");
        }
    }
    // A variant nobody serves: refused as an unserved model, at the door.
    let (status, json) = pagestream_e2e::api::upload_answer(&h.client, pdf, &[("model", "layout_cdla@int8")]).await;
    assert_eq!((status, json["error"]["code"].as_str()), (422, Some("model_unavailable")), "{json}");
    h.stop().await.unwrap();
}

/// `scripts/gpu-check` on a machine without an NVIDIA GPU (this one; or a
/// GPU machine whose nvidia-smi is replaced by one that lists none): it says
/// so, exits 2, and installs nothing (no GPU runtime in the deps).
#[test]
fn gpu_check_without_a_gpu_says_so_and_installs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // An nvidia-smi that finds no GPU, first on PATH: the same answer on a
    // GPU machine as here.
    let smi = dir.path().join("nvidia-smi");
    std::fs::write(&smi, "#!/bin/sh\necho 'No devices were found'\nexit 6\n").unwrap();
    let mut perms = std::fs::metadata(&smi).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&smi, perms).unwrap();
    let deps = dir.path().join("deps");
    let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new(pagestream_e2e::repo_root().join("scripts/gpu-check"))
        .env("PATH", path)
        .env("PAGESTREAM_DEPS", &deps)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("gpu-check: no NVIDIA GPU found (nvidia-smi -L lists no GPU")
            && stderr.contains("nothing installed, nothing measured"),
        "{stderr}"
    );
    assert!(!deps.exists(), "gpu-check installed something without a GPU");
}

/// The INT8 variant `scripts/quantize` made and the gate passed
/// (`scripts/test` runs it first) through the whole pipeline: a document
/// that asks for it is inferred by it — its name and the gated file's
/// sha256 in the results — and its boxes are the fp32 model's on a real
/// article, as the gate measured over its 146 pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gated_int8_variant_serves_the_documents_that_ask_for_it() {
    let record_path = deps_dir().join("models/yolov8n-doclaynet.int8.onnx.gate.json");
    let record: Value = serde_json::from_slice(&std::fs::read(&record_path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: scripts/quantize yolov8n_doclaynet@int8 did not make it, or the gate refused it",
            record_path.display()
        )
    }))
    .unwrap();
    assert!(record["f1"].as_f64().unwrap() >= 0.98, "{record}");
    let h = Harness::start(|c| {
        c.inferencer.models = vec!["yolov8n_doclaynet".into(), "yolov8n_doclaynet@int8".into()];
    })
    .await
    .unwrap();
    let pdf = "fig_dbscan-jss.pdf";
    let int8 = upload(&h.client, pdf, &[("model", "yolov8n_doclaynet@int8")]).await;
    let fp32 = upload(&h.client, pdf, &[("model", "yolov8n_doclaynet")]).await;
    for id in [&int8, &fp32] {
        let st = h.wait_terminal(id, Duration::from_secs(300)).await.unwrap();
        assert_eq!(st["state"], "completed", "{st}");
    }
    let manifest = h.result(&int8, "manifest.json");
    assert_eq!(manifest["model"]["name"], "yolov8n_doclaynet@int8");
    assert_eq!(manifest["model"]["sha256"], record["sha256"], "the file the gate passed");
    let pages = manifest["page_count"].as_u64().unwrap();
    let (mut want, mut got, mut same) = (0, 0, 0);
    for n in 1..=pages {
        let a = boxes(&h.result(&fp32, &format!("pages/{n}.json"))["detections"]);
        let b = boxes(&h.result(&int8, &format!("pages/{n}.json"))["detections"]);
        want += a.len();
        got += b.len();
        same += matched(&a, &b, 0.7);
    }
    let f1 = 2.0 * same as f64 / (want + got) as f64;
    println!("{pdf}: {same} of {want} fp32 boxes matched by {got} INT8 boxes (IoU ≥ 0.7): F1 {f1:.3}");
    assert!(want > 200, "{want} boxes");
    assert!(f1 >= 0.95, "F1 {f1:.3} of the INT8 variant against fp32 on {pdf}");
    h.stop().await.unwrap();
}
