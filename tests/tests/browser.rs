//! The web page at `/`, driven in real headless Chromium (Debian's
//! `chromium` through `chromedriver`, W3C WebDriver over HTTP): a PDF is
//! uploaded through the page's file input, the page's live list (fed by
//! server-sent events) shows it completed, and the viewer draws the
//! detections over the page image. Four other documents run at the same
//! time: more than the page follows live (3, since browsers allow ~6
//! connections per host), so the rest are refreshed from the list, and
//! every row must still reach `completed`. Then: a deep link
//! (`/#/documents/{id}`) opens a document on a fresh load, with its time,
//! pages/s and download links; a failed document shows its reason in its
//! row and viewer; a long document's first pages show while it runs. A
//! screenshot is left in the temp directory for people to look at.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use pagestream::client::{full, ApiClient};
use pagestream_e2e::{corpus, Harness};
use pagestream_pipeline::embedded::free_port;
use serde_json::{json, Value};

struct Driver {
    child: Child,
    http: ApiClient,
    session: String,
}

impl Driver {
    async fn start(profile: &std::path::Path) -> Driver {
        let port = free_port().unwrap();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed by scripts/setup --test");
        let http = ApiClient::new(format!("http://127.0.0.1:{port}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while http.get("/status").await.map(|a| a.json["value"]["ready"] != true).unwrap_or(true) {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-quic", "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let mut driver = Driver { child, http, session: String::new() };
        let created = driver.call(Method::POST, "/session", caps).await;
        driver.session = created["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}")).to_string();
        driver
    }

    async fn call(&self, method: Method, path: &str, body: Value) -> Value {
        let body = if body.is_null() { full(Vec::new()) } else { full(serde_json::to_vec(&body).unwrap()) };
        let ans = self.http.send(method.clone(), path, Some("application/json"), body).await.unwrap();
        assert!(ans.status.is_success(), "WebDriver {method} {path}: {}", ans.json);
        ans.json["value"].clone()
    }

    async fn cmd(&self, method: Method, path: &str, body: Value) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body).await
    }

    async fn script(&self, js: &str) -> Value {
        self.cmd(Method::POST, "/execute/sync", json!({"script": js, "args": []})).await
    }

    async fn element(&self, css: &str) -> String {
        let found = self.cmd(Method::POST, "/element", json!({"using": "css selector", "value": css})).await;
        // The W3C element reference: {"element-6066-…": "<id>"}.
        let reference = found.as_object().and_then(|o| o.iter().find(|(k, _)| k.starts_with("element-")));
        reference.and_then(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no element {css}: {found}")).to_string()
    }

    /// Waits until the list's row of document `id` shows a state
    /// (`state`: that one); returns it.
    async fn wait_row(&self, id: &str, state: Option<&str>, within: Duration, what: &str) -> Value {
        let test = state.map(|s| format!(" === '{s}'")).unwrap_or_default();
        let js =
            format!("const r = document.querySelector('[data-doc-id=\"{id}\"]'); return r && r.dataset.state{test}");
        self.wait_for(&js, within, what).await
    }

    /// Polls `js` until it returns something truthy.
    async fn wait_for(&self, js: &str, within: Duration, what: &str) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.script(js).await;
            if !(v.is_null() || v == false || v == 0 || v == "") {
                return v;
            }
            if Instant::now() > deadline {
                let page = self.script("return document.body.innerText").await;
                panic!("timed out waiting for {what}; the page shows:\n{}", page.as_str().unwrap_or(""));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_through_the_page_and_see_it_complete_with_detections() {
    let h = Harness::start(|_| {}).await.unwrap();
    let profile = tempfile::tempdir().unwrap();
    let driver = Driver::start(profile.path()).await;
    driver.cmd(Method::POST, "/url", json!({"url": h.pipeline.base_url()})).await;
    assert_eq!(driver.script("return document.title").await, "pagestream");
    driver
        .wait_for(
            "return document.getElementById('docs').innerText.includes('No documents')",
            Duration::from_secs(20),
            "the empty list",
        )
        .await;
    let mut others = Vec::new();
    for _ in 0..4 {
        let ans = h.client.submit_file(&corpus("fig_dbscan-jss.pdf"), Some("background")).await.unwrap();
        others.push(ans.json["id"].as_str().unwrap().to_string());
    }
    driver
        .wait_for(
            "return document.querySelectorAll('[data-doc-id]').length === 4",
            Duration::from_secs(30),
            "the four running documents",
        )
        .await;

    // Upload through the page's file input (what the picker and drop zone feed).
    let input = driver.element("#file").await;
    let pdf = corpus("fig_dbscan-jss.pdf");
    driver.cmd(Method::POST, &format!("/element/{input}/value"), json!({"text": pdf.to_str().unwrap()})).await;

    // The live list shows the document finishing, fed by its event stream.
    let id = driver
        .wait_for(
            "const r = [...document.querySelectorAll('[data-doc-id]')].find(r => r.innerText.includes('fig_dbscan-jss.pdf')); return r && r.dataset.docId",
            Duration::from_secs(30),
            "the uploaded document in the list",
        )
        .await;
    let id = id.as_str().unwrap().to_string();
    let seen_running = driver.wait_row(&id, None, Duration::from_secs(30), "a state").await;
    assert!(["queued", "running", "completed"].contains(&seen_running.as_str().unwrap()), "{seen_running}");
    driver.wait_row(&id, Some("completed"), Duration::from_secs(240), "the document to complete").await;
    let bars = driver
        .script(&format!(
            "return [...document.querySelectorAll('[data-doc-id=\"{id}\"] progress')].map(p => p.value + '/' + p.max)"
        ))
        .await;
    assert_eq!(bars, json!(["28/28", "28/28", "28/28"]), "progress bars full");
    for other in &others {
        driver.wait_row(other, Some("completed"), Duration::from_secs(240), "every other document to complete").await;
    }
    // The API agrees.
    let st = h.client.get(&format!("/v1/documents/{id}")).await.unwrap().json;
    assert_eq!(st["state"], "completed");
    assert_eq!(st["title"], "fig_dbscan-jss.pdf");

    // Open it: the viewer draws page 1 with its detections.
    driver.script(&format!("document.querySelector('[data-doc-id=\"{id}\"]').click()")).await;
    let drawn = driver
        .wait_for(
            "const img = document.querySelector('#canvas img'); const n = document.querySelectorAll('#canvas svg g').length; return img && img.complete && img.naturalWidth > 0 && n",
            Duration::from_secs(30),
            "the page image with detections",
        )
        .await;
    let (status, json1) = h.client.get_bytes(&format!("/v1/documents/{id}/results/pages/1.json")).await.unwrap();
    assert_eq!(status, 200);
    let page1: Value = serde_json::from_slice(&json1).unwrap();
    assert_eq!(drawn, json!(page1["detections"].as_array().unwrap().len()), "one box per detection");
    let labels =
        driver.script("return [...document.querySelectorAll('#canvas svg g')].map(g => g.dataset.label)").await;
    assert_eq!(labels[0], page1["detections"][0]["label"]);
    let width = driver.script("return document.querySelector('#canvas img').naturalWidth").await;
    assert_eq!(width, page1["width"]);
    // Beside the boxes, what the page says: the first region with text, in
    // reading order, and its source.
    let first_text = page1["detections"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page1["unassigned_text"].as_array().into_iter().flatten())
        .filter(|d| !d["text"].as_str().unwrap_or("").is_empty())
        .min_by_key(|d| d["order"].as_u64().unwrap())
        .expect("page 1 of the article has text")
        .clone();
    let shown = driver
        .script("const p = document.querySelector('#pagetext .item'); return p && [p.dataset.source, p.lastChild.textContent]")
        .await;
    assert_eq!(
        shown,
        json!(["text_layer", first_text["text"]]),
        "the text panel starts with the first text in reading order"
    );
    // Another page.
    driver.script("document.querySelector('#pages [data-page=\"5\"]').click()").await;
    driver
        .wait_for(
            "return document.querySelector('#canvas svg[data-page=\"5\"]') !== null",
            Duration::from_secs(30),
            "page 5",
        )
        .await;

    // A deep link opens the document's viewer on a fresh load.
    driver.cmd(Method::POST, "/url", json!({"url": "about:blank"})).await;
    driver.cmd(Method::POST, "/url", json!({"url": format!("{}/#/documents/{id}", h.pipeline.base_url())})).await;
    driver
        .wait_for(
            "const s = document.querySelector('[data-viewer-state]'); const img = document.querySelector('#canvas img'); \
             return s && s.textContent === 'completed' && img && img.complete && img.naturalWidth > 0 && document.querySelector('#vhead h2').textContent",
            Duration::from_secs(30),
            "the deep-linked document's viewer",
        )
        .await;
    let meta = driver.script("return document.querySelector('#viewer .meta').innerText").await;
    let meta = meta.as_str().unwrap();
    assert!(meta.contains("28 of 28 pages done") && meta.contains("pages/s"), "viewer header: {meta}");
    let links = driver.script("return [...document.querySelectorAll('[data-download]')].map(a => a.textContent)").await;
    assert_eq!(
        links,
        json!(["manifest.json", "COCO (all pages)", "Markdown", "chunks (JSON Lines)", "page 1 JSON"]),
        "download links"
    );
    let hrefs = driver
        .script("return [...document.querySelectorAll('[data-download]')].map(a => a.getAttribute('href'))")
        .await;
    let hrefs: Vec<&str> = hrefs.as_array().unwrap().iter().map(|h| h.as_str().unwrap_or("")).collect();
    assert!(
        hrefs[2].ends_with("/results?format=markdown") && hrefs[3].ends_with("/results?format=chunks"),
        "export links: {hrefs:?}"
    );

    // A failed document says why, in its row and in its viewer.
    let bad = h.client.submit_file(&corpus("enc_aes256_pw-asdfzxcv.pdf"), Some("locked")).await.unwrap();
    let bad = bad.json["id"].as_str().unwrap().to_string();
    h.wait_terminal(&bad, Duration::from_secs(60)).await.unwrap();
    driver.cmd(Method::POST, "/url", json!({"url": format!("{}/#/documents/{bad}", h.pipeline.base_url())})).await;
    let row_reason = driver
        .wait_for(
            &format!(
                "const r = document.querySelector('[data-doc-id=\"{bad}\"] [data-reason]'); return r && r.textContent"
            ),
            Duration::from_secs(30),
            "the failed document's reason in its row",
        )
        .await;
    assert!(row_reason.as_str().unwrap().starts_with("pdf_password: "), "{row_reason}");
    let row = driver.script(&format!("return document.querySelector('[data-doc-id=\"{bad}\"]').innerText")).await;
    assert!(!row.as_str().unwrap().contains("? pages"), "no unknown page count shown: {row}");
    let viewer_reason = driver
        .wait_for(
            "const r = document.querySelector('[data-viewer-reason]'); return r && r.textContent",
            Duration::from_secs(30),
            "the failed document's reason in the viewer",
        )
        .await;
    assert_eq!(viewer_reason, row_reason);

    // A long document: its first pages show while it still runs.
    let long = h.client.submit_file(&corpus("text_R-intro.pdf"), Some("long")).await.unwrap();
    let long = long.json["id"].as_str().unwrap().to_string();
    driver.cmd(Method::POST, "/url", json!({"url": format!("{}/#/documents/{long}", h.pipeline.base_url())})).await;
    let early = driver
        .wait_for(
            "const s = document.querySelector('[data-viewer-state]'); const img = document.querySelector('#canvas img'); \
             return s && s.textContent === 'running' && img && img.complete && img.naturalWidth > 0 \
               && document.querySelectorAll('#pages button.pending').length",
            Duration::from_secs(60),
            "a page of the running document in the viewer",
        )
        .await;
    assert!(early.as_u64().unwrap() > 0, "pages still pending while one is shown");
    let st = h.client.get(&format!("/v1/documents/{long}")).await.unwrap().json;
    assert!(st["pages"]["uploaded"].as_u64().unwrap() < 113, "shown before the document finished: {st}");
    // One page: singular.
    let legend = driver.script("return document.getElementById('legend').textContent").await;
    assert!(!legend.as_str().unwrap().contains(" 1 detections"), "{legend}");

    let shot = driver.cmd(Method::GET, "/screenshot", Value::Null).await;
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD.decode(shot.as_str().unwrap()).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let out = std::env::temp_dir().join("pagestream-browser-test.png");
    std::fs::write(&out, &png).unwrap();
    eprintln!("screenshot: {}", out.display());
    driver.call(Method::DELETE, &format!("/session/{}", driver.session), Value::Null).await;
    h.client.delete(&format!("/v1/documents/{long}")).await.unwrap();
    h.stop().await.unwrap();
}
