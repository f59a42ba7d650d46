//! Documents by reference: `POST /v1/documents` with `{"url": …}` (and
//! `pagestream submit s3://…`), fetched by the splitter from a real S3
//! server (moto) and a local HTTP server — a real PDF completes with the
//! same page count as an upload; a missing object, one above
//! `splitter.source_max_bytes` and a non-PDF fail with their reasons; a
//! bucket or host the deployment does not allow is refused at once.

use std::process::Command;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use pagestream_e2e::api;
use pagestream_e2e::http::{answer, serve};
use pagestream_e2e::procs::bin_dir;
use pagestream_e2e::{corpus, Harness, MotoServer};
use pagestream_pipeline::embedded::free_port;
use serde_json::{json, Value};

const PDF: &str = "fig_dbscan-jss.pdf";

/// Serves `/paper.pdf` (the PDF), `/notes.txt` (not a PDF); 404 otherwise.
async fn http_server(port: u16, pdf: Vec<u8>) {
    serve(port, move |req: Request<Incoming>| {
        let pdf = pdf.clone();
        async move {
            match req.uri().path() {
                "/paper.pdf" => answer(200, pdf),
                "/notes.txt" => answer(200, b"just some text, certainly not a PDF".repeat(100)),
                _ => answer(404, "not here"),
            }
        }
    })
    .await
}

async fn by_url(h: &Harness, url: &str, options: Value) -> (u16, Value) {
    api::by_url(&h.client, url, Some(options)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_by_reference_are_fetched_checked_and_refused_with_reasons() {
    let moto = MotoServer::start().unwrap();
    let s3 = moto.bucket("docs").await.unwrap();
    let pdf = std::fs::read(corpus(PDF)).unwrap();
    let put = |key: &str, body: Vec<u8>| {
        s3.put_object().bucket("docs").key(key).body(aws_sdk_s3::primitives::ByteStream::from(body)).send()
    };
    put("in/paper.pdf", pdf.clone()).await.unwrap();
    put("in/notes.pdf", b"plain text pretending to be a PDF".repeat(50)).await.unwrap();
    let mut big = pdf.clone();
    big.resize(3 << 20, b' ');
    put("in/big.pdf", big).await.unwrap();
    let port = free_port().unwrap();
    tokio::spawn(http_server(port, pdf.clone()));

    let h = Harness::start(|c| {
        moto.source_for(c, "docs");
        c.splitter.source_max_bytes = 2 << 20;
        c.splitter.source_allow_private_hosts = vec!["127.0.0.1".into()];
    })
    .await
    .unwrap();

    // Refused at once: buckets and hosts the deployment does not allow, bad URLs.
    for (url, why) in [
        ("s3://other-bucket/x.pdf", "splitter.source_s3_buckets"),
        ("http://10.1.2.3/x.pdf", "splitter.source_allow_private_hosts"),
        ("ftp://example.com/x.pdf", "s3://, https:// or http://"),
        ("s3://docs", "without a key"),
    ] {
        let (status, body) = by_url(&h, url, json!({})).await;
        assert_eq!((status, body["error"]["code"].as_str()), (422, Some("invalid_reference")), "{url}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(why), "{url}: {body}");
    }
    let ans = h.client.post_json("/v1/documents", &json!({"title": "no url"}), None).await.unwrap();
    assert_eq!(ans.status, 422, "{}", ans.json);

    // Fetched and processed: S3 (through the CLI) and HTTP.
    let out = Command::new(bin_dir().join("pagestream"))
        .args(["submit", "s3://docs/in/paper.pdf", "--json", "--url", h.client.base()])
        .env_remove("PAGESTREAM_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let from_s3: Value = serde_json::from_slice(&out.stdout).unwrap();
    let from_s3 = from_s3["id"].as_str().unwrap().to_string();
    let (status, body) = by_url(&h, &format!("http://127.0.0.1:{port}/paper.pdf"), json!({"dpi": 100})).await;
    assert_eq!(status, 202, "{body}");
    let from_http = body["id"].as_str().unwrap().to_string();
    // Failures, each with its reason.
    let mut failing = Vec::new();
    for (url, code) in [
        ("s3://docs/in/missing.pdf".to_string(), "source_missing"),
        ("s3://docs/in/big.pdf".to_string(), "source_too_large"),
        ("s3://docs/in/notes.pdf".to_string(), "source_not_pdf"),
        (format!("http://127.0.0.1:{port}/gone.pdf"), "source_missing"),
        (format!("http://127.0.0.1:{port}/notes.txt"), "source_not_pdf"),
    ] {
        let (status, body) = by_url(&h, &url, json!({})).await;
        assert_eq!(status, 202, "{url}: {body}");
        failing.push((url, code, body["id"].as_str().unwrap().to_string()));
    }

    for id in [&from_s3, &from_http] {
        let st = h.wait_terminal(id, Duration::from_secs(300)).await.unwrap();
        assert_eq!(st["state"], "completed", "{st}");
        assert_eq!((st["page_count"].as_u64(), st["pages"]["uploaded"].as_u64()), (Some(28), Some(28)), "{st}");
        assert_eq!(st["bytes"], pdf.len() as u64, "size of the fetched copy: {st}");
        assert_eq!(st["filename"], "paper.pdf", "{st}");
    }
    let manifest: Value = h.result(&from_http, "manifest.json");
    assert_eq!(manifest["pages"].as_array().unwrap().len(), 28);
    let page: Value = h.result(&from_http, "pages/1.json");
    assert_eq!(page["dpi"], 100.0, "options travel with the reference");
    for (url, code, id) in &failing {
        let st = h.wait_terminal(id, Duration::from_secs(120)).await.unwrap();
        assert_eq!((st["state"].as_str(), st["error"]["code"].as_str()), (Some("failed"), Some(*code)), "{url}: {st}");
    }
    h.stop().await.unwrap();
}
