//! What API clients get (issue #22, finding 7), with real servers:
//!
//! - the COCO export of a 2,415-page document (a synthetic result set of
//!   120,750 detections, written as the uploader writes it) is streamed:
//!   the ingress process's peak RSS stays small, and the file is complete
//!   and well-formed;
//! - a document that fails because a dependency failed (the result store,
//!   an `s3://` source's endpoint) shows its clients a clear reason with a
//!   reference, never the internal error chain: no local path, no endpoint,
//!   no bucket of the service's own in status JSON.
//!
//! The COCO test runs the ingress binary: `cargo build --bins` first.

use std::time::{Duration, Instant};

use pagestream_e2e::ingress::{peak_rss_mib, IngressProc};
use pagestream_e2e::{corpus, wait_terminal, Harness};
use pagestream_pipeline::counters::Counters;
use pagestream_pipeline::embedded::free_port;
use pagestream_pipeline::nats::Names;
use pagestream_pipeline::progress::Progress;
use pagestream_results::layout::{Keys, Manifest, ManifestPage, PageResult, SourceInfo, MANIFEST_SCHEMA};
use pagestream_schemas::{Detection, DocInfo, EventState, FinalStatus, ModelRef};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAGES: u32 = 2415;
const DETECTIONS: usize = 50;
const LABELS: [&str; 5] = ["text", "title", "figure", "table", "list"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coco_export_of_thousands_of_pages_streams_in_bounded_memory() {
    let prefix = "coco-mem";
    let api = IngressProc::start(prefix, &[]).await;
    let (port, out) = (api.port, &api.dirs.0);

    // The document's history, as the stages record it, and its results,
    // as the uploader writes them.
    let id = "coco-big";
    let js = api.js.clone();
    let names = Names::new(prefix);
    let counters = Counters::open(&js, &names, 1).await.unwrap();
    let progress = Progress::new(js.clone(), names, counters, "test");
    let info = DocInfo {
        title: Some("big".into()),
        page_count: Some(PAGES),
        model: Some("layout_cdla".into()),
        ..DocInfo::default()
    };
    for state in [EventState::Queued, EventState::Split, EventState::Completed] {
        progress.doc(id, state, Some(info.clone()), None).await.unwrap();
    }
    let keys = Keys::new(&pagestream::Config::default().uploader.results.prefix, id);
    let model = ModelRef { name: "layout_cdla".into(), sha256: "ab".repeat(32) };
    for n in 1..=PAGES {
        let detections = (0..DETECTIONS)
            .map(|i| {
                let x = (i * 13 + n as usize % 7) as f32 + 0.3;
                Detection {
                    label: LABELS[(i + n as usize) % 5].into(),
                    score: 0.31 + i as f32 / 100.0,
                    bbox: [x, x * 1.5, x + 40.7, x * 1.5 + 20.1],
                }
                .into()
            })
            .collect();
        let page = PageResult {
            page: n,
            width: 1240,
            height: 1754,
            dpi: 150.0,
            model: model.clone(),
            detections,
            unassigned_text: Vec::new(),
            timings: Default::default(),
        };
        let path = out.path().join(keys.page_json(n));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, serde_json::to_vec(&page).unwrap()).unwrap();
    }
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA.into(),
        doc_id: id.into(),
        title: Some("big".into()),
        source: SourceInfo { filename: None, sha256: None, bytes: None },
        page_count: Some(PAGES),
        status: FinalStatus::Completed,
        error: None,
        model: Some(model),
        pages: (1..=PAGES).map(ManifestPage::ok).collect(),
        queued_at: None,
        started_at: None,
        finished_at: "2026-01-01T00:00:00Z".into(),
    };
    std::fs::write(out.path().join(keys.manifest()), serde_json::to_vec(&manifest).unwrap()).unwrap();

    let pid = api.cluster.procs[0].child.id();
    let before = peak_rss_mib(pid);
    // Read the export over a raw socket as it comes.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "GET /v1/documents/{id}/results?format=coco HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(300), s.read_to_end(&mut answer)).await.unwrap().unwrap();
    let took = started.elapsed();
    let peak = peak_rss_mib(pid);
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer");
    let head = String::from_utf8_lossy(&answer[..end]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = answer[end + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    println!(
        "COCO export of {PAGES} pages x {DETECTIONS} detections: {} MiB in {took:.1?}; ingress peak RSS {before} MiB before, {peak} MiB after",
        body.len() >> 20
    );
    let coco: Value = serde_json::from_slice(&body).expect("the export is complete JSON");
    assert_eq!(coco["images"].as_array().unwrap().len(), PAGES as usize);
    assert_eq!(coco["annotations"].as_array().unwrap().len(), PAGES as usize * DETECTIONS);
    assert_eq!(coco["categories"].as_array().unwrap().len(), LABELS.len());
    let last = &coco["annotations"][PAGES as usize * DETECTIONS - 1];
    assert_eq!(
        (last["id"].as_u64(), last["image_id"].as_u64()),
        (Some(u64::from(PAGES) * DETECTIONS as u64), Some(u64::from(PAGES)))
    );
    assert_eq!(coco["info"]["model"], format!("layout_cdla@{}", "ab".repeat(6)));
    // 120,750 annotations held as JSON values took ~130 MiB (issue #22);
    // streamed, the ingress holds a few pages at a time.
    assert!(peak < 96, "ingress peak RSS {peak} MiB during the COCO export (before it: {before} MiB)");
}

/// The body of a `Transfer-Encoding: chunked` answer.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16).unwrap();
        raw = &raw[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// True when `text` holds none of `secrets` (and says which one it holds).
fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "{what} shows {s:?} to API clients: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_show_clients_a_reason_and_a_reference_not_the_internals() {
    // An `s3://` source whose endpoint is down: the chain names the endpoint.
    let dead = free_port().unwrap();
    let endpoint = format!("127.0.0.1:{dead}");
    let h = Harness::start(|c| {
        c.nats.max_deliver = 2;
        c.splitter.source_timeout_secs = 6;
        c.splitter.source_s3_buckets = vec!["private-docs".into()];
        c.splitter.source_s3_endpoint = format!("http://{endpoint}");
        c.splitter.source_s3_path_style = true;
        c.splitter.source_s3_region = "us-east-1".into();
        c.splitter.source_s3_access_key_id = "test".into();
        c.splitter.source_s3_secret_access_key = "test".into();
    })
    .await
    .unwrap();
    let ans =
        h.client.post_json("/v1/documents", &json!({"url": "s3://private-docs/a/report.pdf"}), None).await.unwrap();
    assert_eq!(ans.status, 202, "{}", ans.json);
    let by_ref = ans.json["id"].as_str().unwrap().to_string();
    let st = wait_terminal(&h.client, &by_ref, Duration::from_secs(180)).await.unwrap();
    println!("by reference, endpoint down: {}", st["error"]);
    assert_eq!(st["state"], "failed", "{st}");
    let message = st["error"]["message"].as_str().unwrap();
    assert_clean(
        "a by-reference failure",
        &st.to_string(),
        &[&endpoint, &dead.to_string(), "dispatch failure", "os error"],
    );
    assert!(message.contains("s3://private-docs/a/report.pdf"), "the client's own URL is named: {message}");

    // The result store fails: a local directory that became a file. The
    // chain names the path it could not create.
    let out = h.out.path().to_path_buf();
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::write(&out, b"not a directory").unwrap();
    let ans = h.client.submit_file(&corpus("stress_blank-no-content.pdf"), None).await.unwrap();
    let id = ans.json["id"].as_str().unwrap().to_string();
    let st = wait_terminal(&h.client, &id, Duration::from_secs(180)).await.unwrap();
    println!("result store failing: {} / page: {}", st["error"], st["failed_pages"][0]["error"]);
    assert_eq!(
        (st["state"].as_str(), st["error"]["code"].as_str()),
        (Some("failed"), Some("manifest_unwritten")),
        "{st}"
    );
    assert_eq!(st["failed_pages"][0]["error"]["code"], "result_store", "{st}");
    let out_text = out.display().to_string();
    assert_clean("a result store failure", &st.to_string(), &[&out_text, "os error", "Not a directory"]);
    for m in [&st["error"]["message"], &st["failed_pages"][0]["error"]["message"]] {
        assert!(m.as_str().unwrap().contains("reference"), "{m}");
    }
    // The detail is in the dead letter, for operators.
    let dl = pagestream_e2e::dead_letters(&h.pipeline.ctx.js, &h.pipeline.ctx.names).await;
    assert!(dl.iter().any(|d| d.error.message.contains(&out_text)), "the dead letter keeps the detail");
    std::fs::remove_file(&out).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    h.stop().await.unwrap();
}
