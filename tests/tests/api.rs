//! The REST API v1 end to end, on a real pipeline (NATS, pdfium, ONNX
//! Runtime, a local results directory or moto S3): every route documented
//! in `openapi.json` answers as documented, API tokens, `Idempotency-Key`,
//! the paginated list, server-sent events with resume, cancellation and the
//! read timeout. Presigned S3 result links are checked in `e2e_http.rs`.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use http::Method;
use pagestream::client::{empty, full, ApiClient, SseEvent};
use pagestream_e2e::api::{self, metrics_text};
use pagestream_e2e::{corpus, repo_root, Harness};
use serde_json::Value;

const SMALL: &str = "scan_cardinal-rotated.pdf";

async fn submit(client: &ApiClient, name: &str) -> String {
    api::submit(client, &corpus(name), &[]).await
}

fn assert_error(json: &Value, code: &str) {
    assert_eq!(json["error"]["code"], code, "{json}");
    assert!(json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{json}");
}

/// Every event of a document's stream, from the start (or after `last_id`).
async fn events(client: &ApiClient, id: &str, last_id: Option<&str>) -> Vec<SseEvent> {
    let headers: Vec<(&str, &str)> = last_id.map(|l| ("last-event-id", l)).into_iter().collect();
    let resp = client.raw(Method::GET, &format!("/v1/documents/{id}/events"), &headers, empty()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut out = Vec::new();
    let read = async {
        use http_body_util::BodyExt;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                buf.push_str(&String::from_utf8_lossy(&data));
                out.extend(pagestream::client::parse_sse(&mut buf));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(240), read).await.expect("the event stream ends at a terminal state");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_answers_as_documented() {
    let h = Harness::start(|_| {}).await.unwrap();
    let id = submit(&h.client, SMALL).await;
    h.wait_terminal(&id, Duration::from_secs(120)).await.unwrap();
    let pdf = std::fs::read(corpus(SMALL)).unwrap();

    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("stages/ingress/openapi.json")).unwrap())
            .unwrap();
    let mut exercised = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Ok(m) = method.to_uppercase().parse::<Method>() else { continue };
            if !["GET", "POST", "DELETE"].contains(&m.as_str()) {
                continue;
            }
            let url = path.replace("{id}", &id).replace("{file}", "1.png");
            let (ct, body) =
                if m == Method::POST { (Some("application/pdf"), full(pdf.clone())) } else { (None, empty()) };
            let headers: Vec<(&str, &str)> = ct.map(|c| ("content-type", c)).into_iter().collect();
            let resp = h.client.raw(m.clone(), &url, &headers, body).await.unwrap();
            let status = resp.status().as_u16().to_string();
            let ctype = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            let responses = &op["responses"];
            assert!(responses.get(&status).is_some(), "{method} {path} answered {status}, not documented: {responses}");
            let documented = &responses[&status];
            let documented = if let Some(r) = documented["$ref"].as_str() {
                &spec["components"]["responses"][r.rsplit('/').next().unwrap()]
            } else {
                documented
            };
            if let Some(content) = documented["content"].as_object() {
                let mime = ctype.split(';').next().unwrap().trim();
                assert!(content.contains_key(mime), "{method} {path}: content type {ctype} not in {content:?}");
            }
            use http_body_util::BodyExt;
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            if ctype.starts_with("application/json") {
                let json: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                if status.starts_with('4') || status.starts_with('5') {
                    assert!(json["error"]["code"].is_string(), "{method} {path}: {json}");
                }
            }
            exercised += 1;
        }
    }
    assert!(exercised >= 12, "only {exercised} routes exercised");

    // A few answers in detail.
    let st = h.client.get(&format!("/v1/documents/{id}")).await.unwrap().json;
    assert_eq!(st["state"], "completed", "{st}");
    let t = &st["timings"];
    for stage in ["render", "infer", "upload"] {
        assert_eq!(t["per_page_ms"][stage]["pages"], st["page_count"], "{t}");
        assert!(t["per_page_ms"][stage]["mean_ms"].as_f64().unwrap() > 0.0, "{t}");
    }
    assert!(t["wall_ms"].as_f64().unwrap() > 0.0);
    assert_error(&h.client.get("/v1/documents/nope").await.unwrap().json, "not_found");
    assert_error(&h.client.get("/v1/documents/a.b").await.unwrap().json, "invalid_id");
    assert_error(&h.client.get("/v2/anything").await.unwrap().json, "not_found");
    let ans = h.client.send(Method::PUT, "/v1/documents", None, empty()).await.unwrap();
    assert_eq!(ans.status, 405);
    assert_error(&ans.json, "method_not_allowed");
    let (status, html) = h.client.get_bytes("/").await.unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&html).contains("id=\"drop\""));
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_guard_every_v1_route_but_not_probes() {
    let h = Harness::start(|c| c.ingress.api_tokens = vec!["first-token".into(), "second-token".into()]).await.unwrap();
    let anon = &h.client;
    for path in ["/v1/documents", "/v1/documents/x", "/v1/documents/x/events", "/v1/documents/x/results", "/v1/models"]
    {
        let ans = anon.get(path).await.unwrap();
        assert_eq!(ans.status, 401, "{path}");
        assert_error(&ans.json, "unauthorized");
    }
    let resp = anon.raw(Method::GET, "/v1/documents", &[], empty()).await.unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let ans = anon.post_bytes("/v1/documents", "application/pdf", b"%PDF-1.4".to_vec()).await.unwrap();
    assert_eq!(ans.status, 401, "uploads need a token too");
    let wrong = ApiClient::new(anon.base()).with_token(Some("third-token".into()));
    assert_eq!(wrong.get("/v1/documents").await.unwrap().status, 401);
    for path in ["/livez", "/readyz", "/metrics", "/openapi.json", "/"] {
        assert_eq!(anon.get_bytes(path).await.unwrap().0, 200, "{path} stays open");
    }
    let ok = ApiClient::new(anon.base()).with_token(Some("second-token".into()));
    let id = submit(&ok, SMALL).await;
    assert_eq!(ok.get(&format!("/v1/documents/{id}")).await.unwrap().status, 200);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_same_document() {
    let h = Harness::start(|_| {}).await.unwrap();
    let pdf = corpus(SMALL);
    let first = h.client.submit_file_with(&pdf, None, &[], Some("order-42")).await.unwrap();
    assert_eq!(first.status, 202);
    let again = h.client.submit_file_with(&pdf, None, &[], Some("order-42")).await.unwrap();
    assert_eq!(again.status, 202);
    assert_eq!(again.json["id"], first.json["id"], "a retry returns the first document");
    assert_eq!(again.json["status"], "replayed");
    let other = h.client.submit_file_with(&pdf, None, &[], Some("order-43")).await.unwrap();
    assert_ne!(other.json["id"], first.json["id"]);

    // Concurrent retries: one document, every answer names it or says "retry".
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (c, p) = (h.client.clone(), pdf.clone());
        tasks.spawn(async move { c.submit_file_with(&p, None, &[], Some("burst")).await.unwrap() });
    }
    let mut ids = BTreeSet::new();
    while let Some(ans) = tasks.join_next().await {
        let ans = ans.unwrap();
        match ans.status.as_u16() {
            202 => {
                ids.insert(ans.json["id"].as_str().unwrap().to_string());
            }
            409 => assert_error(&ans.json, "idempotency_in_progress"),
            s => panic!("unexpected {s}: {}", ans.json),
        }
    }
    assert_eq!(ids.len(), 1, "one document for one key: {ids:?}");

    // A rejected upload does not burn its key.
    let bad = h.client.submit_file_with(&corpus("bad_invalid-header-eof.pdf"), None, &[], Some("fix-and-retry")).await;
    let bad = bad.unwrap();
    assert_eq!(bad.status, 202, "the header check passes; pdfium fails it later: {}", bad.json);
    let rejected = h.client.send(Method::POST, "/v1/documents", Some("image/png"), full(b"\x89PNG".to_vec())).await;
    assert_eq!(rejected.unwrap().status, 415);
    let resp = h
        .client
        .raw(
            Method::POST,
            "/v1/documents",
            &[("content-type", "text/plain"), ("idempotency-key", "k-415")],
            full(b"hi".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let retry = h.client.submit_file_with(&pdf, None, &[], Some("k-415")).await.unwrap();
    assert_eq!(retry.status, 202, "the key was released after the 415: {}", retry.json);
    assert_eq!(retry.json["status"], "queued");
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_is_newest_first_paginated_and_filtered() {
    let h = Harness::start(|_| {}).await.unwrap();
    let mut ids = Vec::new();
    for name in [SMALL, "bad_invalid-header-eof.pdf", SMALL] {
        let id = submit(&h.client, name).await;
        h.wait_terminal(&id, Duration::from_secs(120)).await.unwrap();
        ids.push(id);
    }
    let page1 = h.client.get("/v1/documents?limit=2").await.unwrap().json;
    let got: Vec<&str> = page1["documents"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str()], "newest first");
    let cursor = page1["next_cursor"].as_str().expect("a next page");
    let page2 = h.client.get(&format!("/v1/documents?limit=2&cursor={cursor}")).await.unwrap().json;
    let got: Vec<&str> = page2["documents"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(got, [ids[0].as_str()]);
    assert!(page2["next_cursor"].is_null());
    let failed = h.client.get("/v1/documents?status=failed").await.unwrap().json;
    let got: Vec<&str> = failed["documents"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(got, [ids[1].as_str()]);
    assert_eq!(failed["documents"][0]["state"], "failed");
    let done = h.client.get("/v1/documents?status=completed").await.unwrap().json;
    assert_eq!(done["documents"].as_array().unwrap().len(), 2);
    assert_error(&h.client.get("/v1/documents?status=bogus").await.unwrap().json, "invalid_status");
    assert_error(&h.client.get("/v1/documents?limit=0").await.unwrap().json, "invalid_limit");
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_cover_every_page_and_resume_after_last_event_id() {
    let h = Harness::start(|_| {}).await.unwrap();
    let id = submit(&h.client, "fig_dbscan-jss.pdf").await;
    let all = events(&h.client, &id, None).await;
    let pages: Vec<&SseEvent> = all.iter().filter(|e| e.kind == "page").collect();
    assert_eq!(pages.len(), 28 * 3, "rendered + inferred + uploaded per page");
    let mut seen = BTreeSet::new();
    for e in &pages {
        assert!(seen.insert((e.data["page"].as_u64().unwrap(), e.data["page_state"].as_str().unwrap().to_string())));
    }
    // Ids strictly increase; counts never go backwards nor exceed page_count.
    let mut last_id = 0u64;
    let mut last_done = 0;
    for e in &all {
        let n: u64 = e.id.as_deref().unwrap().parse().unwrap();
        assert!(n > last_id);
        last_id = n;
        let done = e.data["pages"]["uploaded"].as_u64().unwrap();
        assert!(done >= last_done && done <= 28, "{}", e.data);
        last_done = done;
    }
    let states: Vec<&str> =
        all.iter().filter(|e| e.kind == "state").map(|e| e.data["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["queued", "running", "completed"], "exactly one terminal state, last");
    assert_eq!(all.last().unwrap().kind, "state");

    // Resume after the 40th event: exactly the rest, with the same ids and
    // counts as the first time.
    let resume_at = all[39].id.clone().unwrap();
    let rest = events(&h.client, &id, Some(&resume_at)).await;
    assert_eq!(rest.len(), all.len() - 40);
    for (a, b) in rest.iter().zip(&all[40..]) {
        assert_eq!((&a.id, &a.kind, &a.data["pages"]), (&b.id, &b.kind, &b.data["pages"]));
    }
    let path = format!("/v1/documents/{id}/events");
    let resp = h.client.raw(Method::GET, &path, &[("last-event-id", "x")], empty()).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(h.client.get("/v1/documents/missing/events").await.unwrap().status, 404);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_skips_the_remaining_pages_and_keeps_finished_ones() {
    let h = Harness::start(|_| {}).await.unwrap();
    let id = submit(&h.client, "text_R-intro.pdf").await;
    // Wait until a few pages are done.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = h.client.get(&format!("/v1/documents/{id}")).await.unwrap().json;
        if st["pages"]["uploaded"].as_u64().unwrap_or(0) >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ans = h.client.delete(&format!("/v1/documents/{id}")).await.unwrap();
    assert_eq!(ans.status, 202, "{}", ans.json);
    assert_eq!(ans.json["state"], "cancelled");
    let uploaded_at_cancel = ans.json["pages"]["uploaded"].as_u64().unwrap();
    let page_count = ans.json["page_count"].as_u64().unwrap();

    // The uploader writes a `cancelled` manifest with the finished pages.
    let deadline = Instant::now() + Duration::from_secs(60);
    let results = loop {
        let ans = h.client.get(&format!("/v1/documents/{id}/results")).await.unwrap();
        assert_eq!(ans.status, 200, "{}", ans.json);
        if ans.json["complete"] == true {
            break ans.json;
        }
        assert!(Instant::now() < deadline, "no manifest: {}", ans.json);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = h.client.get(&format!("/v1/documents/{id}")).await.unwrap().json;
    assert_eq!(st["state"], "cancelled");
    let uploaded = st["pages"]["uploaded"].as_u64().unwrap();
    // Pages in flight at the cancel may finish (uploader concurrency); no more.
    let in_flight = h.pipeline.config.uploader.concurrency as u64 + 1;
    assert!(uploaded <= uploaded_at_cancel + in_flight, "{uploaded} uploaded, {uploaded_at_cancel} at the cancel");
    assert!(uploaded < page_count, "pages were skipped");
    assert_eq!(results["status"], "cancelled");
    let ok: Vec<&Value> = results["pages"].as_array().unwrap().iter().filter(|p| p["status"] == "ok").collect();
    assert!(ok.len() as u64 >= uploaded_at_cancel && ok.len() as u64 <= uploaded, "{} ok pages", ok.len());
    for p in &ok {
        let (status, _) = h.client.get_bytes(p["image_url"].as_str().unwrap()).await.unwrap();
        assert_eq!(status, 200, "kept page {}", p["page"]);
    }
    assert!(results["pages"].as_array().unwrap().iter().any(|p| p["status"] == "cancelled"));
    let again = h.client.delete(&format!("/v1/documents/{id}")).await.unwrap();
    assert_eq!(again.status, 409);
    assert_error(&again.json, "already_finished");
    let listed = h.client.get("/v1/documents?status=cancelled").await.unwrap().json;
    assert_eq!(listed["documents"][0]["id"], id.as_str());
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_gets_408_and_loses_nothing() {
    let h = Harness::start(|c| c.ingress.read_timeout_secs = 1).await.unwrap();
    let addr = h.pipeline.ingress_addr;
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"POST /v1/documents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/pdf\r\nContent-Length: 100000\r\n\r\n%PDF-1.4\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"upload_timeout\""), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // A client that never finishes its headers is disconnected.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /v1/documents HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"), "the request never completed");
    // The service still works and has no document from the stalled upload.
    let list = h.client.get("/v1/documents").await.unwrap().json;
    assert_eq!(list["documents"].as_array().unwrap().len(), 0, "{list}");
    let id = submit(&h.client, SMALL).await;
    assert_eq!(h.wait_terminal(&id, Duration::from_secs(120)).await.unwrap()["state"], "completed");
    h.stop().await.unwrap();
}

/// After one document, every metric of the catalog is exported with its
/// type (those that need a failed page or a webhook aside), and the live-stream gauge
/// follows the streams that are open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_the_catalog_and_follow_live_streams() {
    use pagestream_pipeline::metrics::CATALOG;
    let h = Harness::start(|_| {}).await.unwrap();
    let id = submit(&h.client, SMALL).await;
    let stream = h.client.raw(Method::GET, &format!("/v1/documents/{id}/events"), &[], empty()).await.unwrap();
    assert_eq!(stream.status(), 200);
    let open = metrics_text(&h.client).await;
    assert!(open.contains("\npagestream_sse_clients 1\n"), "one stream open:\n{open}");
    drop(stream);
    h.wait_terminal(&id, Duration::from_secs(120)).await.unwrap();
    // The stream's task notices the closed connection at its next event or keepalive.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = metrics_text(&h.client).await;
        if text.contains("\npagestream_sse_clients 0\n") {
            break text;
        }
        assert!(Instant::now() < deadline, "the closed stream is still counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A failed page, webhooks and OCR models are what other tests make
    // (hostile, webhooks, ocr: this harness runs without OCR).
    let here = |name: &str| {
        !["pagestream_page_failures_total", "pagestream_ocr_models_loaded"].contains(&name)
            && !name.starts_with("pagestream_webhook_")
    };
    for def in CATALOG.iter().filter(|d| here(d.name)) {
        let typ = format!("# TYPE {} {}\n", def.name, def.kind.as_str());
        assert!(text.contains(&typ), "{} is not exported as a {}:\n{text}", def.name, def.kind.as_str());
        let sample = if def.kind.as_str() == "histogram" { format!("{}_bucket", def.name) } else { def.name.into() };
        let series: Vec<&str> = text.lines().filter(|l| l.starts_with(&sample)).collect();
        assert!(!series.is_empty(), "no {sample} series");
        for label in def.labels {
            assert!(
                series.iter().all(|l| l.contains(&format!("{label}=\""))),
                "{sample} lacks label {label}: {series:?}"
            );
        }
    }
    // Each page went through each stage once, and a run per page was timed.
    for stage in ["splitter", "inferencer", "uploader"] {
        assert!(text.contains(&format!("pagestream_pages_in_flight{{stage=\"{stage}\"}} 0\n")), "{stage} in flight");
    }
    let pages: u64 = h.wait_terminal(&id, Duration::from_secs(5)).await.unwrap()["page_count"].as_u64().unwrap();
    // Pages run = sum over batch sizes of size × runs: each page once, plus
    // the one-image warm-up run at start-up.
    let ran: u64 = text
        .lines()
        .filter_map(|l| l.strip_prefix("pagestream_model_run_seconds_count{"))
        .map(|l| {
            let batch: u64 = l.split("batch=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
            batch * l.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(ran, pages + 1, "pages in timed model runs:\n{text}");
    h.stop().await.unwrap();
}
