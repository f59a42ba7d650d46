//! End to end through HTTP: a real 28-page PDF is uploaded to the ingress,
//! split by pdfium, inferred by ONNX Runtime, and written to a local
//! directory and to S3 (moto). Every page must have results and the
//! manifest must describe them.

use std::time::Duration;

use pagestream::client::ApiClient;
use pagestream_e2e::api::accepted;
use pagestream_e2e::{corpus, Harness, MotoServer, CDLA_SHA};
use pagestream_results::ResultStore;
use serde_json::Value;
use sha2::{Digest, Sha256};

const PDF: &str = "fig_dbscan-jss.pdf";
const PAGES: u64 = 28;

fn png_size(png: &[u8]) -> (u64, u64) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be = |s: &[u8]| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as u64;
    (be(&png[16..20]), be(&png[20..24]))
}

/// Checks the manifest and every page's JSON and image in `store`.
async fn check_results(store: &ResultStore, prefix: &str, id: &str, title: &str, pdf: &[u8]) {
    let base = if prefix.is_empty() { id.to_string() } else { format!("{prefix}/{id}") };
    let manifest: Value =
        serde_json::from_slice(&store.get(&format!("{base}/manifest.json")).await.unwrap().expect("manifest exists"))
            .unwrap();
    assert_eq!(manifest["doc_id"], id);
    assert_eq!(manifest["status"], "completed", "{manifest}");
    assert_eq!(manifest["page_count"], PAGES);
    assert_eq!(manifest["title"], title);
    assert_eq!(manifest["source"]["filename"], PDF);
    assert_eq!(manifest["source"]["bytes"], pdf.len() as u64);
    assert_eq!(manifest["source"]["sha256"], hex::encode(Sha256::digest(pdf)));
    assert_eq!(manifest["model"]["name"], "layout_cdla");
    assert_eq!(manifest["model"]["sha256"], CDLA_SHA);
    for key in ["queued_at", "started_at", "finished_at"] {
        assert!(manifest[key].as_str().is_some_and(|t| t.starts_with("20")), "{key}: {manifest}");
    }
    let pages = manifest["pages"].as_array().expect("pages array");
    assert_eq!(pages.len() as u64, PAGES);
    let mut total_detections = 0;
    let mut labels = std::collections::BTreeSet::new();
    for (i, p) in pages.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(p["page"], n);
        assert_eq!(p["status"], "ok");
        assert_eq!(p["detections"], format!("pages/{n}.json"));
        assert_eq!(p["image"], format!("pages/{n}.png"));
        let json: Value =
            serde_json::from_slice(&store.get(&format!("{base}/pages/{n}.json")).await.unwrap().expect("page json"))
                .unwrap();
        let png = store.get(&format!("{base}/pages/{n}.png")).await.unwrap().expect("page png");
        let (w, h) = png_size(&png);
        assert_eq!(json["page"], n);
        assert_eq!((json["width"].as_u64().unwrap(), json["height"].as_u64().unwrap()), (w, h), "page {n}");
        // A4 at 150 DPI.
        assert_eq!((w, h), (1241, 1754), "page {n}");
        assert_eq!(json["dpi"], 150.0);
        for d in json["detections"].as_array().unwrap() {
            let b: Vec<f64> = d["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[0] < b[2] && b[1] < b[3], "page {n}: bad box {d}");
            assert!(b[2] <= w as f64 + 0.01 && b[3] <= h as f64 + 0.01, "page {n}: box outside the image {d}");
            let score = d["score"].as_f64().unwrap();
            assert!((0.5..=1.0).contains(&score), "page {n}: score {score}");
            labels.insert(d["label"].as_str().unwrap().to_string());
            total_detections += 1;
        }
    }
    // A journal article: text on every page, and figures, titles, equations somewhere.
    assert!(total_detections >= 150, "only {total_detections} detections in {PAGES} pages");
    for label in ["text", "title", "figure"] {
        assert!(labels.contains(label), "no {label} detected; labels: {labels:?}");
    }
}

fn check_status(status: &Value, id: &str, title: &str) {
    assert_eq!(status["id"], id);
    assert_eq!(status["state"], "completed");
    assert_eq!(status["title"], title);
    assert_eq!(status["page_count"], PAGES);
    for stage in ["rendered", "inferred", "uploaded"] {
        assert_eq!(status["pages"][stage], PAGES, "{stage}: {status}");
    }
    assert_eq!(status["pages"]["failed"], 0);
    assert!(status["manifest"].as_str().unwrap().ends_with(&format!("{id}/manifest.json")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_to_local_directory() {
    let h = Harness::start(|_| {}).await.unwrap();
    let pdf = std::fs::read(corpus(PDF)).unwrap();
    let ans = h.client.submit_multipart(PDF, pdf.clone(), &[("title", "DBSCAN in R")]).await.unwrap();
    let id = accepted(&ans);
    assert_eq!(ans.json["status_url"], format!("/v1/documents/{id}"));

    let status = h.wait_terminal(&id, Duration::from_secs(300)).await.unwrap();
    check_status(&status, &id, "DBSCAN in R");
    let store = ResultStore::Local { root: h.out.path().to_path_buf() };
    check_results(&store, "", &id, "DBSCAN in R", &pdf).await;
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_pdf_upload_to_s3() {
    let moto = MotoServer::start().unwrap();
    let (h, client) =
        Harness::start_s3(&moto, "results", |c| c.uploader.results.prefix = "runs/e2e".into()).await.unwrap();
    let pdf = std::fs::read(corpus(PDF)).unwrap();
    // No title: it defaults to the file name.
    let id = accepted(&h.client.submit_file(&corpus(PDF), None).await.unwrap());

    let status = h.wait_terminal(&id, Duration::from_secs(300)).await.unwrap();
    check_status(&status, &id, PDF);
    assert_eq!(status["manifest"], format!("s3://results/runs/e2e/{id}/manifest.json"));
    let store = ResultStore::S3 { client: client.clone(), bucket: "results".into() };
    check_results(&store, "runs/e2e", &id, PDF, &pdf).await;

    // Exactly the documented objects: 28 × (png + json) + manifest, nothing else.
    let listed = client.list_objects_v2().bucket("results").prefix(format!("runs/e2e/{id}/")).send().await.unwrap();
    assert_eq!(listed.key_count(), Some(2 * PAGES as i32 + 1));

    // The results route hands out presigned links that work without credentials.
    let res = h.client.get(&format!("/v1/documents/{id}/results")).await.unwrap().json;
    assert_eq!(res["status"], "completed");
    let endpoint = moto.endpoint();
    for (field, check) in [("image_url", b"\x89PNG".as_slice()), ("detections_url", b"{".as_slice())] {
        let url = res["pages"][2][field].as_str().unwrap();
        assert!(url.starts_with(&endpoint) && url.contains("X-Amz-Signature"), "{url}");
        let (status, body) = ApiClient::new(&endpoint).get_bytes(&url[endpoint.len()..]).await.unwrap();
        assert_eq!(status, 200, "{url}");
        assert!(body.starts_with(check), "{field}");
    }
    // The ingress serves the same object through its own route.
    let (status, png) = h.client.get_bytes(&format!("/v1/documents/{id}/results/pages/3.png")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(png_size(&png), (1241, 1754));
    h.stop().await.unwrap();
}
