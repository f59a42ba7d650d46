//! Tenants cannot hold or starve the splitter (issue #22), with real stage
//! processes, a real nats-server and real sockets:
//!
//! - 20 `wait_for_model=true` documents for a model nobody serves, and
//!   documents by reference from a server that trickles one byte every
//!   10 s, submitted by token A, while token B's 1-page document (uploaded,
//!   and one by reference) completes within 10 s, with the default
//!   `splitter.concurrency = 1`; the waiting documents complete once an
//!   inferencer of their model starts; a trickled fetch fails
//!   `source_timeout` after `splitter.source_timeout_secs` in all;
//! - fair share: token A submits 50 small documents, then token B one: B's
//!   completes while A's backlog runs, and all of A's complete;
//! - `tenants.max_pages_in_flight`: a tenant's documents together never
//!   have more pages waiting for inference than its limit.
//!
//! `cargo build --bins` first (scripts/test does it).

use std::time::{Duration, Instant};

use pagestream::client::ApiClient;
use pagestream_e2e::api::{self, is_terminal, status, upload};
use pagestream_e2e::procs::{wait_model_served, Stages};
use pagestream_e2e::{corpus, max_in_stream_until_done, wait_terminal, CDLA, YOLO};
use pagestream_pipeline::embedded::free_port;
use tokio::io::AsyncWriteExt as _;

const TOKEN_A: &str = "tenant-a-token";
const TOKEN_B: &str = "tenant-b-token";
/// A one-page corpus PDF.
const ONE_PAGE: &str = "stress_blank-no-content.pdf";

/// NATS, ingress (tokens A and B), splitter, uploader and a layout_cdla
/// inferencer, each a process.
struct Pipeline {
    s: Stages,
    a: ApiClient,
    b: ApiClient,
}

impl Pipeline {
    /// `extra` adds to the processes' environment.
    async fn start(prefix: &str, extra: &[(&str, &str)]) -> Pipeline {
        let mut env = vec![("PAGESTREAM_INGRESS_API_TOKENS", format!("{TOKEN_A},{TOKEN_B}"))];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let mut s = Stages::prepare(prefix, &env).await;
        if let Some(dir) = std::env::var_os("TENANTS_SPLIT_BINS") {
            // Measuring "before": binaries of another build.
            s.cluster.bins = dir.into();
        }
        s.cluster.spawn_stages(&["ingress", "splitter", "uploader"], 0, s.port);
        let p = s.cluster.spawn_inferencer(0, CDLA, &[]);
        s.cluster.procs.push(p);
        let a = s.client.clone().with_token(Some(TOKEN_A.into()));
        let b = s.client.clone().with_token(Some(TOKEN_B.into()));
        wait_model_served(&a, Duration::from_secs(90), &s.cluster).await;
        Pipeline { s, a, b }
    }
}

async fn by_url(client: &ApiClient, url: &str) -> String {
    let (status, json) = api::by_url(client, url, None).await;
    assert_eq!(status, 202, "{json}");
    json["id"].as_str().unwrap().to_string()
}

/// Serves `/slow.pdf` one byte every 10 s (a PDF that never arrives) and
/// `/ok.pdf` (a one-page PDF) at once.
async fn source_server(port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let pdf = std::fs::read(corpus(ONE_PAGE)).unwrap();
    loop {
        let (mut stream, _) = listener.accept().await.unwrap();
        let pdf = pdf.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                use tokio::io::AsyncReadExt as _;
                let Ok(n) = stream.read(&mut buf).await else { return };
                if n == 0 {
                    return;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let head = String::from_utf8_lossy(&got).to_string();
            if head.starts_with("GET /ok.pdf") {
                let h = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\nContent-Length: {}\r\n\r\n",
                    pdf.len()
                );
                let _ = stream.write_all(h.as_bytes()).await;
                let _ = stream.write_all(&pdf).await;
                return;
            }
            let body = b"%PDF-1.7\n".repeat(1000);
            let h =
                format!("HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\nContent-Length: {}\r\n\r\n", body.len());
            if stream.write_all(h.as_bytes()).await.is_err() {
                return;
            }
            for b in body {
                if stream.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_documents_and_trickled_fetches_do_not_hold_the_splitter() {
    let src = free_port().unwrap();
    tokio::spawn(source_server(src));
    let p = Pipeline::start(
        "tenants-hold",
        &[
            ("PAGESTREAM_SPLITTER_SOURCE_ALLOW_PRIVATE_HOSTS", "127.0.0.1"),
            ("PAGESTREAM_SPLITTER_SOURCE_TIMEOUT_SECS", "30"),
            // Three fetchers, two per tenant: A's three trickled sources
            // would hold all three without the per-tenant cap.
            ("PAGESTREAM_SPLITTER_FETCH_CONCURRENCY", "3"),
        ],
    )
    .await;

    // The attack, token A: 20 documents waiting for a model nobody serves,
    // and three sources that trickle a byte every 10 s.
    let mut waiting = Vec::new();
    for _ in 0..20 {
        waiting.push(upload(&p.a, ONE_PAGE, &[("model", YOLO), ("wait_for_model", "true")]).await);
    }
    let attack_started = Instant::now();
    let mut trickled = Vec::new();
    for _ in 0..3 {
        trickled.push(by_url(&p.a, &format!("http://127.0.0.1:{src}/slow.pdf")).await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The victim, token B: a one-page upload completes within 10 s…
    let started = Instant::now();
    let victim = upload(&p.b, ONE_PAGE, &[]).await;
    let st = wait_terminal(&p.b, &victim, Duration::from_secs(120)).await;
    let took = started.elapsed();
    let st = st.unwrap_or_else(|e| panic!("the victim's document did not finish: {e}\n{}", p.s.cluster.log_tails()));
    assert_eq!(st["state"], "completed", "{st}");
    println!("victim (upload, 1 page) completed in {:.1} s during the attack", took.as_secs_f64());
    assert!(took < Duration::from_secs(10), "the victim's document took {took:?}");

    // …and so does a one-page document by reference (the fetch pool is not
    // held by A's trickled sources).
    let started = Instant::now();
    let by_ref = by_url(&p.b, &format!("http://127.0.0.1:{src}/ok.pdf")).await;
    let st = wait_terminal(&p.b, &by_ref, Duration::from_secs(120)).await.unwrap();
    let took_ref = started.elapsed();
    assert_eq!(st["state"], "completed", "{st}");
    println!("victim (by reference, 1 page) completed in {:.1} s during the attack", took_ref.as_secs_f64());
    assert!(took_ref < Duration::from_secs(10), "the victim's document by reference took {took_ref:?}");

    // The waiting documents still wait, visibly.
    for id in &waiting {
        let st = status(&p.a, id).await;
        assert_eq!((st["state"].as_str(), st["waiting_for_model"].as_str()), (Some("queued"), Some(YOLO)), "{st}");
    }

    // A trickled fetch fails after source_timeout_secs (30 s) in all, not
    // once per delivery (5 × 30 s): two at once, then the third, ~60 s.
    for id in &trickled {
        let st = wait_terminal(&p.a, id, Duration::from_secs(150)).await.unwrap();
        assert_eq!(
            (st["state"].as_str(), st["error"]["code"].as_str()),
            (Some("failed"), Some("source_timeout")),
            "{st}"
        );
    }
    let fetch_failed = attack_started.elapsed();
    println!("trickled fetches failed {:.1} s after submission (timeout 30 s)", fetch_failed.as_secs_f64());
    assert!(fetch_failed < Duration::from_secs(100), "trickled fetches took {fetch_failed:?} to fail");

    // An inferencer of their model starts: every waiting document completes.
    let mut cluster = p.s.cluster;
    let yolo = cluster.spawn_inferencer(1, YOLO, &[]);
    cluster.procs.push(yolo);
    for id in &waiting {
        let st = wait_terminal(&p.a, id, Duration::from_secs(300)).await.unwrap();
        assert_eq!(st["state"], "completed", "{st}");
        assert_eq!(st["model"], YOLO, "{st}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_backlog_does_not_starve_another_and_is_not_starved() {
    let p = Pipeline::start("tenants-fair", &[]).await;
    // Token A: 50 small documents (1 and 4 pages, alternating).
    let mut a_docs = Vec::new();
    for i in 0..50 {
        let pdf = if i % 2 == 0 { ONE_PAGE } else { "scan_cardinal-rotated.pdf" };
        a_docs.push(upload(&p.a, pdf, &[]).await);
    }
    // Then token B: one.
    let submitted = Instant::now();
    let b_doc = upload(&p.b, "scan_cardinal-rotated.pdf", &[]).await;

    // When each document became terminal (polled).
    let mut done_at: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    while done_at.len() < 51 {
        for (client, id) in a_docs.iter().map(|id| (&p.a, id)).chain([(&p.b, &b_doc)]) {
            if done_at.contains_key(id) {
                continue;
            }
            let st = status(client, id).await;
            if is_terminal(&st) {
                assert_eq!(st["state"], "completed", "{st}");
                done_at.insert(id.clone(), Instant::now());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} of 51 documents finished in 900 s\n{}",
            done_at.len(),
            p.s.cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let b_at = done_at[&b_doc];
    let a_last = a_docs.iter().map(|id| done_at[id]).max().unwrap();
    let a_before_b = a_docs.iter().filter(|id| done_at[*id] < b_at).count();
    println!(
        "B's document completed {:.1} s after submission, after {a_before_b} of A's 50; A's last {:.1} s after B's submission",
        (b_at - submitted).as_secs_f64(),
        (a_last - submitted).as_secs_f64()
    );
    assert!(b_at < a_last, "B's document finished after A's whole backlog ({a_before_b} of A's before it)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_pages_in_flight_stay_within_its_limit() {
    let p = Pipeline::start("tenants-pages", &[("PAGESTREAM_TENANTS_MAX_PAGES_IN_FLIGHT", "3")]).await;
    let js = p.s.js().await;
    let pages = pagestream_pipeline::nats::Names::new("tenants-pages").pages_stream();
    // Six 4-page documents: 16 per document and 64 in all would let 24 wait.
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(upload(&p.a, "scan_cardinal-rotated.pdf", &[]).await);
    }
    let within = (Duration::from_secs(300), Duration::from_millis(500));
    let max = max_in_stream_until_done(&js, &pages, (&p.a, &ids), within, || p.s.cluster.log_tails()).await;
    for id in &ids {
        let st = status(&p.a, id).await;
        assert_eq!((st["state"].as_str(), st["pages"]["uploaded"].as_u64()), (Some("completed"), Some(4)), "{st}");
    }
    println!("tenant limit 3: at most {max} pages waiting for inference");
    assert!(max <= 3, "{max} pages of one tenant waited for inference; its limit is 3");
    assert!(max >= 1, "the sampler never saw a page in flight");
}
