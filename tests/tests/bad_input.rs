//! Bad input gets a precise error and loses nothing: a corrupt PDF, a PNG,
//! an empty body, a wrong content type and malformed MessagePack published
//! straight on a subject — while a good document submitted at the same time
//! completes.

use std::time::Duration;

use pagestream_e2e::{corpus, publish, read_json, Harness};
use pagestream_schemas::decode;
use serde_json::Value;

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x02\0\0\0\x90wS\xde";

fn assert_json_error(ans: &pagestream::client::Answer, status: u16, code: &str) {
    assert_eq!(ans.status.as_u16(), status, "{}", ans.json);
    assert_eq!(ans.json["error"]["code"], code, "{}", ans.json);
    assert!(ans.json["error"]["message"].as_str().is_some_and(|m| m.len() > 10), "{}", ans.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_rejected_and_a_good_document_still_completes() {
    let h = Harness::start(|c| c.ingress.max_upload_bytes = 300_000).await.unwrap();
    let good =
        h.client.submit_file(&pagestream_e2e::repo_root().join("samples/c03-29.pdf"), Some("good")).await.unwrap();
    assert_eq!(good.status, 202, "{}", good.json);
    let corrupt = h.client.submit_file(&corpus("bad_invalid-header-eof.pdf"), None).await.unwrap();
    assert_eq!(corrupt.status, 202, "signature is fine, so it is accepted: {}", corrupt.json);

    // Rejected at the door, with JSON errors.
    assert_json_error(
        &h.client.post_bytes("/v1/documents", "application/pdf", PNG.to_vec()).await.unwrap(),
        415,
        "not_a_pdf",
    );
    assert_json_error(&h.client.submit_multipart("x.pdf", PNG.to_vec(), &[]).await.unwrap(), 415, "not_a_pdf");
    assert_json_error(
        &h.client.post_bytes("/v1/documents", "application/pdf", Vec::new()).await.unwrap(),
        422,
        "empty_upload",
    );
    assert_json_error(
        &h.client.post_bytes("/v1/documents", "text/plain", b"%PDF-1.4".to_vec()).await.unwrap(),
        415,
        "unsupported_content_type",
    );
    let mut big = b"%PDF-1.7\n".to_vec();
    big.resize(400_000, b' ');
    assert_json_error(&h.client.post_bytes("/v1/documents", "application/pdf", big).await.unwrap(), 413, "too_large");
    assert_json_error(
        &h.client.submit_multipart("x.pdf", b"%PDF-1.4".to_vec(), &[("dpi", "5000")]).await.unwrap(),
        422,
        "invalid_option",
    );
    let bad_priority = h.client.submit_multipart("x.pdf", b"%PDF-1.4".to_vec(), &[("priority", "urgent")]).await;
    assert_json_error(&bad_priority.unwrap(), 422, "invalid_option");
    assert_json_error(&h.client.get("/v1/documents/no-such-doc").await.unwrap(), 404, "not_found");
    assert_json_error(&h.client.get("/v1/documents/bad.id").await.unwrap(), 400, "invalid_id");
    assert_json_error(&h.client.get("/nope").await.unwrap(), 404, "not_found");

    let mut random = vec![0u8; 4096];
    let mut x: u32 = 0x9e37_79b9;
    for b in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    assert_json_error(
        &h.client.post_bytes("/v1/documents", "application/pdf", random).await.unwrap(),
        415,
        "not_a_pdf",
    );
    // A PDF cut in half: accepted (the signature is there); pdfium either
    // repairs it or the document fails — either way it ends, with a record.
    let pdf = std::fs::read(corpus("fig_dbscan-jss.pdf")).unwrap();
    let truncated = h
        .client
        .post_bytes("/v1/documents?filename=half.pdf", "application/pdf", pdf[..pdf.len() / 2].to_vec())
        .await
        .unwrap();
    assert_eq!(truncated.status, 202, "{}", truncated.json);
    let rotated = h.client.submit_file(&corpus("scan_cardinal-rotated.pdf"), None).await.unwrap();
    assert_eq!(rotated.status, 202, "{}", rotated.json);

    // Malformed messages published directly on each input subject, and a
    // well-formed one from a future schema version.
    let ctx = &h.pipeline.ctx;
    for subject in [ctx.names.docs_submitted(), ctx.names.pages_rendered("layout_cdla"), ctx.names.pages_inferred()] {
        publish(&ctx.js, subject, &b"\x93not a map"[..]).await;
    }
    // `start_page` belongs to the splitter's own continuations (docs.split.*).
    let resumed = serde_json::json!({"v": 1, "doc_id": "resumed", "source": {"blob": "x"}, "start_page": 9});
    publish(&ctx.js, ctx.names.docs_submitted(), rmp_serde::to_vec_named(&resumed).unwrap()).await;
    let future = serde_json::json!({"v": 2, "doc_id": "from-the-future", "source": {"blob": "x"}});
    publish(&ctx.js, ctx.names.docs_submitted(), rmp_serde::to_vec_named(&future).unwrap()).await;

    // The corrupt PDF fails as a document, with the reason in status and manifest.
    let id = corrupt.json["id"].as_str().unwrap();
    let status = h.wait_terminal(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(status["state"], "failed", "{status}");
    assert_eq!(status["error"]["code"], "pdf_unreadable", "{status}");
    let manifest_path = h.out.path().join(id).join("manifest.json");
    let manifest: Value = read_json(&manifest_path);
    assert_eq!(manifest["status"], "failed");
    assert_eq!(manifest["error"]["code"], "pdf_unreadable");
    assert!(manifest["error"]["message"].as_str().unwrap().contains("cannot open"), "{manifest}");
    assert_eq!(manifest["source"]["filename"], "bad_invalid-header-eof.pdf");
    assert_eq!(manifest["pages"], serde_json::json!([]));

    // The good document completes beside all of that.
    let gid = good.json["id"].as_str().unwrap();
    let status = h.wait_terminal(gid, Duration::from_secs(120)).await.unwrap();
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["pages"]["uploaded"], 1);

    let st = h.wait_terminal(rotated.json["id"].as_str().unwrap(), Duration::from_secs(120)).await.unwrap();
    assert_eq!((st["state"].as_str(), st["pages"]["uploaded"].as_u64()), (Some("completed"), Some(4)), "{st}");
    let tid = truncated.json["id"].as_str().unwrap();
    let st = h.wait_terminal(tid, Duration::from_secs(120)).await.unwrap();
    let truncated_failed = st["state"] == "failed";
    if truncated_failed {
        assert_eq!(st["error"]["code"], "pdf_unreadable", "{st}");
    } else {
        let n = st["page_count"].as_u64().unwrap();
        assert!(
            n >= 1 && st["pages"]["uploaded"].as_u64().unwrap() + st["pages"]["failed"].as_u64().unwrap() == n,
            "{st}"
        );
    }
    println!("truncated PDF ended {}", st["state"]);

    // Dead letters: the corrupt PDF, the three malformed messages, the
    // submission with `start_page` and the future version, each with its
    // reason (and the truncated PDF if it failed).
    let expected = 6 + usize::from(truncated_failed);
    let dl = h.dead_letters_at_least(expected, Duration::from_secs(30)).await;
    assert_eq!(dl.len(), expected, "{dl:#?}");
    let future = dl
        .iter()
        .find(|d| d.error.message.contains("unsupported schema version v=2"))
        .expect("future version dead-lettered");
    assert_eq!((future.stage.as_str(), future.error.code.as_str()), ("splitter", "bad_message"));
    let resumed = dl.iter().find(|d| d.doc_id.as_deref() == Some("resumed")).expect("start_page dead-lettered");
    assert!(resumed.error.message.contains("start_page"), "{resumed:?}");
    let pdf = dl.iter().find(|d| d.doc_id.as_deref() == Some(id)).expect("dead letter for the corrupt PDF");
    assert_eq!((pdf.stage.as_str(), pdf.error.code.as_str()), ("splitter", "pdf_unreadable"));
    let malformed: Vec<_> = dl.iter().filter(|d| d.payload.as_ref() == b"\x93not a map").collect();
    assert_eq!(malformed.len(), 3, "{dl:#?}");
    let mut stages: Vec<&str> = malformed.iter().map(|d| d.stage.as_str()).collect();
    stages.sort();
    assert_eq!(stages, ["inferencer", "splitter", "uploader"]);
    assert!(malformed.iter().all(|d| d.error.code == "bad_message" && d.attempts == 1));
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_pdf_opens_with_its_password_and_fails_clearly_without() {
    let h = Harness::start(|_| {}).await.unwrap();
    let pdf = std::fs::read(corpus("enc_aes256_pw-asdfzxcv.pdf")).unwrap();
    let with = h.client.submit_multipart("enc.pdf", pdf.clone(), &[("password", "asdfzxcv")]).await.unwrap();
    let without = h.client.submit_multipart("enc.pdf", pdf.clone(), &[]).await.unwrap();
    let wrong = h.client.submit_multipart("enc.pdf", pdf, &[("password", "wrong-pass")]).await.unwrap();
    for a in [&with, &without, &wrong] {
        assert_eq!(a.status, 202, "{}", a.json);
    }
    let ok = h.wait_terminal(with.json["id"].as_str().unwrap(), Duration::from_secs(60)).await.unwrap();
    assert_eq!(ok["state"], "completed", "{ok}");
    assert_eq!(ok["pages"]["uploaded"], 1);
    for a in [&without, &wrong] {
        let st = h.wait_terminal(a.json["id"].as_str().unwrap(), Duration::from_secs(60)).await.unwrap();
        assert_eq!(st["state"], "failed", "{st}");
        assert_eq!(st["error"]["code"], "pdf_password", "{st}");
    }
    // The password never reaches a dead letter or the results.
    let dl = h.dead_letters_at_least(2, Duration::from_secs(30)).await;
    assert_eq!(dl.len(), 2, "{dl:#?}");
    for d in &dl {
        let sub: pagestream_schemas::DocumentSubmitted = decode(&d.payload).unwrap();
        assert_eq!(sub.options.password, None);
        assert!(!d.payload.windows(10).any(|w| w == b"wrong-pass"));
    }
    // The document itself prints its password ("password: asdfzxcv"), so
    // its page text holds it: that is content, read with the password. No
    // other byte of the results may.
    let mut in_text = false;
    for entry in pagestream_e2e::files_under(h.out.path()) {
        let mut bytes = std::fs::read(&entry).unwrap();
        if entry.extension().is_some_and(|e| e == "json") && entry.parent().is_some_and(|d| d.ends_with("pages")) {
            let mut page: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            for item in page["detections"].as_array_mut().into_iter().flatten() {
                in_text |= item["text"].as_str().is_some_and(|t| t.contains("password: asdfzxcv"));
                item["text"] = serde_json::Value::Null;
            }
            for item in page["unassigned_text"].as_array_mut().into_iter().flatten() {
                in_text |= item["text"].as_str().is_some_and(|t| t.contains("password: asdfzxcv"));
                item["text"] = serde_json::Value::Null;
            }
            bytes = serde_json::to_vec(&page).unwrap();
        }
        assert!(!bytes.windows(8).any(|w| w == b"asdfzxcv"), "password found in {}", entry.display());
    }
    assert!(in_text, "the decrypted page's text layer was read");
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_fail_or_downscale_with_a_clear_record() {
    let h = Harness::start(|c| c.splitter.max_pages = 3).await.unwrap();
    let many = h.client.submit_file(&corpus("fig_dbscan-jss.pdf"), None).await.unwrap();
    let huge = h.client.submit_file(&corpus("stress_hugemono-8400pt.pdf"), None).await.unwrap();
    let blank = h.client.submit_file(&corpus("stress_blank-no-content.pdf"), None).await.unwrap();

    let st = h.wait_terminal(many.json["id"].as_str().unwrap(), Duration::from_secs(60)).await.unwrap();
    assert_eq!(st["state"], "failed", "{st}");
    assert_eq!(st["error"]["code"], "too_many_pages");
    assert!(st["error"]["message"].as_str().unwrap().contains("28 pages"), "{st}");

    // An 8400 × 8400 pt page is rendered within max_pixels, at a lower DPI, recorded.
    let id = huge.json["id"].as_str().unwrap();
    let st = h.wait_terminal(id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    let page: Value = h.result(id, "pages/1.json");
    let (w, hgt) = (page["width"].as_u64().unwrap(), page["height"].as_u64().unwrap());
    assert!(w * hgt <= 16_777_216 && w >= 4000, "{w}×{hgt}");
    let dpi = page["dpi"].as_f64().unwrap();
    assert!(dpi > 30.0 && dpi < 40.0, "effective dpi {dpi}");

    // A page without content still gets its (empty) results.
    let id = blank.json["id"].as_str().unwrap();
    let st = h.wait_terminal(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    assert!(h.out.path().join(id).join("pages/1.png").exists());
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pages_reach_status_and_manifest_with_their_reason() {
    // The render worker (a child process, which inherits this variable)
    // aborts on page 1 of a PDF holding the marker: a real crash, in a real
    // worker, of one page. nextest runs each test in its own process.
    std::env::set_var(pagestream_splitter::worker::FAULT_ENV, "crash:%PAGESTREAM-FAILED-PAGE");
    let h = Harness::start(|_| {}).await.unwrap();
    let mut pdf = std::fs::read(corpus("scan_cardinal-rotated.pdf")).unwrap();
    pdf.extend_from_slice(b"\n%PAGESTREAM-FAILED-PAGE\n");
    let ans = h.client.submit_multipart("scan.pdf", pdf, &[]).await.unwrap();
    assert_eq!(ans.status, 202, "{}", ans.json);
    let id = ans.json["id"].as_str().unwrap();
    let st = h.wait_terminal(id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(st["state"], "completed_with_errors", "{st}");
    assert_eq!((st["pages"]["failed"].as_u64(), st["pages"]["uploaded"].as_u64()), (Some(1), Some(3)), "{st}");
    let reasons = st["failed_pages"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "{st}");
    assert_eq!((reasons[0]["page"].as_u64(), reasons[0]["error"]["code"].as_str()), (Some(1), Some("render_crashed")));
    assert_eq!(reasons[0]["stage"], "splitter", "the stage that failed, not the uploader: {st}");
    let manifest: Value = h.result(id, "manifest.json");
    assert_eq!(manifest["status"], "completed_with_errors");
    assert!(manifest.get("error").is_none(), "pages failed, not the document: {manifest}");
    let pages = manifest["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 4);
    assert_eq!(pages[0]["status"], "failed");
    assert_eq!(pages[0]["error"]["code"], "render_crashed");
    assert!(pages[0].get("image").is_none() && pages[0].get("detections").is_none(), "{}", pages[0]);
    for p in &pages[1..] {
        assert_eq!(p["status"], "ok", "{p}");
        assert!(h.out.path().join(id).join(p["detections"].as_str().unwrap()).exists(), "{p}");
    }
    assert!(!h.out.path().join(id).join("pages/1.json").exists(), "no page result for the failed page");
    h.stop().await.unwrap();
}
