//! Models and backends through the whole pipeline: a document picks one of
//! the served models with its `model` option, and the tract backend gives
//! the same detections as ONNX Runtime on a real article.

use std::time::Duration;

use pagestream_e2e::api::upload;
use pagestream_e2e::{boxes, matched, Harness, YOLO_SHA};
use serde_json::Value;

/// Submits `pdf` with `fields`, waits until it completes, returns
/// (id, manifest).
async fn run_one(h: &Harness, pdf: &str, fields: &[(&str, &str)]) -> (String, Value) {
    let id = upload(&h.client, pdf, fields).await;
    let st = h.wait_terminal(&id, Duration::from_secs(240)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    let manifest = h.result(&id, "manifest.json");
    (id, manifest)
}

fn page_detections(h: &Harness, id: &str, n: u64) -> Value {
    h.result(id, &format!("pages/{n}.json"))["detections"].clone()
}

/// One inferencer serves both installed models; each document gets the
/// one it asked for (default: `inferencer.model`), with its labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_document_gets_the_model_it_asks_for() {
    let h = Harness::start(|c| c.inferencer.models = vec!["yolov8n_doclaynet".into()]).await.unwrap();
    let (yolo_id, yolo) = run_one(&h, "scan_cardinal-rotated.pdf", &[("model", "yolov8n_doclaynet")]).await;
    let (cdla_id, cdla) = run_one(&h, "scan_cardinal-rotated.pdf", &[]).await;
    assert_eq!(yolo["model"]["name"], "yolov8n_doclaynet", "{yolo}");
    assert_eq!(yolo["model"]["sha256"], YOLO_SHA);
    assert_eq!(cdla["model"]["name"], "layout_cdla", "{cdla}");
    let doclaynet = [
        "Caption",
        "Footnote",
        "Formula",
        "List-item",
        "Page-footer",
        "Page-header",
        "Picture",
        "Section-header",
        "Table",
        "Text",
        "Title",
    ];
    let cdla_labels = [
        "text",
        "title",
        "figure",
        "figure_caption",
        "table",
        "table_caption",
        "header",
        "footer",
        "reference",
        "equation",
    ];
    let (mut n_yolo, mut n_cdla) = (0, 0);
    for n in 1..=4 {
        for (id, allowed, count) in [(&yolo_id, &doclaynet[..], &mut n_yolo), (&cdla_id, &cdla_labels[..], &mut n_cdla)]
        {
            for d in page_detections(&h, id, n).as_array().unwrap() {
                let label = d["label"].as_str().unwrap();
                assert!(allowed.contains(&label), "document {id} page {n}: label {label} from the wrong model");
                *count += 1;
            }
        }
    }
    assert!(n_yolo > 0 && n_cdla > 0, "yolo {n_yolo}, cdla {n_cdla} detections");
    h.stop().await.unwrap();
}

/// `inferencer.backend = "tract"` through the pipeline matches the ONNX
/// Runtime default on every page of a real article (same labels, IoU ≥ 0.95).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tract_pipeline_matches_ort() {
    let pdf = "fig_dbscan-jss.pdf";
    let ort = Harness::start(|_| {}).await.unwrap();
    let (ort_id, ort_manifest) = run_one(&ort, pdf, &[]).await;
    let tract = Harness::start(|c| c.inferencer.backend = pagestream_inferencer::Backend::Tract).await.unwrap();
    let (tract_id, tract_manifest) = run_one(&tract, pdf, &[]).await;
    assert_eq!(ort_manifest["model"], tract_manifest["model"]);
    let pages = ort_manifest["page_count"].as_u64().unwrap();
    let (mut total, mut same) = (0, 0);
    for n in 1..=pages {
        let a = boxes(&page_detections(&ort, &ort_id, n));
        let b = boxes(&page_detections(&tract, &tract_id, n));
        assert_eq!(a.len(), b.len(), "page {n}: ort {a:?} vs tract {b:?}");
        total += a.len();
        same += matched(&a, &b, 0.95);
    }
    println!("{pdf}: {same}/{total} ORT detections matched by tract at IoU ≥ 0.95");
    assert!(total > 150);
    assert_eq!(same, total);
    ort.stop().await.unwrap();
    tract.stop().await.unwrap();
}
