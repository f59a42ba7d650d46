//! Page counters stay exact under redelivery.
//!
//! 1. The uploader process is frozen (SIGSTOP) until JetStream has delivered
//!    pages to it, then SIGKILLed: those pages come back after the ack wait
//!    and are handled by its replacement. It is killed once more at an
//!    arbitrary moment. Every count ends at exactly the page count, each
//!    counter holds exactly pages 1..=n, and every page has one result set.
//! 2. The same page delivered twice to a live uploader (work done, ack lost)
//!    is counted once, its time aggregated once.
//!
//! Needs the stage binaries: `cargo build --bins` (scripts/test does it).

use std::time::{Duration, Instant};

use pagestream::client::ApiClient;
use pagestream_e2e::procs::{signal, Cluster, STAGES};
use pagestream_e2e::{corpus, init_logging, Harness};
use pagestream_pipeline::counters::Counters;
use pagestream_pipeline::embedded::{free_port, NatsServer};
use pagestream_pipeline::nats::Names;
use pagestream_pipeline::progress::publish_message;
use pagestream_schemas::{EventState, ImageRef, ModelRef, PageInferred, Timings, VERSION};
use serde_json::Value;

const PREFIX: &str = "counters";

async fn status(client: &ApiClient, id: &str) -> Value {
    let ans = client.get(&format!("/v1/documents/{id}")).await.unwrap();
    assert!(ans.status.is_success(), "{}", ans.json);
    ans.json
}

async fn wait_uploaded(client: &ApiClient, id: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let st = status(client, id).await;
        if st["pages"]["uploaded"].as_u64().unwrap_or(0) >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "no progress: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploader_killed_mid_document_counts_every_page_exactly_once() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let out = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let env: Vec<(String, String)> = [
        ("PAGESTREAM_NATS_URL", nats.url()),
        ("PAGESTREAM_NATS_PREFIX", PREFIX.into()),
        ("PAGESTREAM_NATS_ACK_WAIT_SECS", "3".into()),
        ("PAGESTREAM_NATS_MAX_DELIVER", "20".into()),
        ("PAGESTREAM_UPLOADER_DIR", out.path().display().to_string()),
        ("PAGESTREAM_UPLOADER_CONCURRENCY", "8".into()),
        ("PAGESTREAM_SPLITTER_ADMIN_ADDR", String::new()),
        ("PAGESTREAM_INFERENCER_ADMIN_ADDR", String::new()),
        ("PAGESTREAM_UPLOADER_ADMIN_ADDR", String::new()),
        ("PAGESTREAM_INFERENCER_THREADS", "1".into()),
        ("PAGESTREAM_LOG", "info,async_nats=error".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut cluster = Cluster::new(env, logs.path());
    let port = free_port().unwrap();
    for stage in STAGES {
        let p = cluster.spawn(stage, 0, (stage == "ingress").then_some(port));
        cluster.procs.push(p);
    }
    let uploader = STAGES.iter().position(|s| *s == "uploader").unwrap();
    let client = ApiClient::new(format!("http://127.0.0.1:{port}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client.get("/readyz").await.map(|a| a.status.is_success()).unwrap_or(false) {
        assert!(Instant::now() < deadline, "ingress not ready; logs in {}", logs.path().display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cfg = pagestream_pipeline::config::NatsConfig { url: nats.url(), prefix: PREFIX.into(), ..Default::default() };
    let js = pagestream_pipeline::nats::connect(&cfg, "counters-check").await.unwrap();
    let names = Names::new(PREFIX);

    let ans = client.submit_file(&corpus("fig_dbscan-jss.pdf"), None).await.unwrap();
    assert_eq!(ans.status, 202, "{}", ans.json);
    let id = ans.json["id"].as_str().unwrap().to_string();

    // Freeze the uploader until pages were delivered to it, then kill it:
    // those deliveries are never acked and come back to its replacement.
    wait_uploaded(&client, &id, 4).await;
    let pending = || async {
        let mut c: async_nats::jetstream::consumer::PullConsumer =
            js.get_stream(names.inferred_stream()).await.unwrap().get_consumer("uploader").await.unwrap();
        c.info().await.unwrap().num_ack_pending
    };
    // A frozen process cannot ask for more: pages reach it only while the
    // pull request it had open lasts (2 s). Freeze, look, thaw, retry.
    let pid = cluster.procs[uploader].child.id();
    let mut caught = false;
    for _ in 0..40 {
        signal(pid, "-STOP");
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until && !caught {
            caught = pending().await >= 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if caught {
            break;
        }
        signal(pid, "-CONT");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(caught, "no page was delivered to the frozen uploader");
    cluster.kill_and_restart(uploader);
    // And once more at an arbitrary moment.
    wait_uploaded(&client, &id, 16).await;
    cluster.kill_and_restart(uploader);

    let st = pagestream_e2e::wait_terminal(&client, &id, Duration::from_secs(240)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    for stage in ["rendered", "inferred", "uploaded"] {
        assert_eq!(st["pages"][stage], 28, "{stage}: {st}");
    }
    assert_eq!(st["pages"]["failed"], 0, "{st}");
    let counters = Counters::open(&js, &names, 1).await.unwrap();
    let c = counters.doc(&id).await.unwrap();
    let all: Vec<u32> = (1..=28).collect();
    for (state, set) in [("rendered", &c.rendered), ("inferred", &c.inferred), ("uploaded", &c.uploaded)] {
        assert_eq!(set.pages().collect::<Vec<_>>(), all, "{state} pages");
        assert!(set.timed <= 28, "{state}: {} timed pages", set.timed);
    }
    assert!(c.failed.is_empty());
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.path().join(&id).join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["status"], "completed");
    assert_eq!(manifest["pages"].as_array().unwrap().len(), 28);
    let files = std::fs::read_dir(out.path().join(&id).join("pages")).unwrap().count();
    assert_eq!(files, 56, "one PNG and one JSON per page");
    let dlq = js.get_stream(names.dlq_stream()).await.unwrap().get_info().await.unwrap();
    assert_eq!(dlq.state.messages, 0);
    let redelivered = cluster.count_in_logs("handling a redelivered message");
    assert!(redelivered >= 1, "the frozen uploader's pages were redelivered ({redelivered})");
    println!("uploader killed twice; {redelivered} redeliveries; every counter exact at 28");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_delivered_twice_counts_once() {
    let h = Harness::start(|_| {}).await.unwrap();
    let ctx = h.pipeline.ctx.clone();
    let doc = "twice-doc";
    let png = {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([255, 255, 255]));
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    };
    let page = PageInferred {
        v: VERSION,
        doc_id: doc.into(),
        page: 1,
        page_count: 2,
        width: 8,
        height: 8,
        dpi: 150.0,
        model: ModelRef { name: "m".into(), ..ModelRef::default() },
        detections: Vec::new(),
        image: Some(ImageRef { format: "png".into(), inline: Some(png.into()), blob: None }),
        timings: Timings::default(),
        error: None,
    };
    // Two deliveries of the same page (distinct message ids, as after the
    // deduplication window).
    for attempt in 0..2 {
        publish_message(&ctx.js, ctx.names.pages_inferred(), &format!("{doc}:1:inferred:{attempt}"), &page)
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c: async_nats::jetstream::consumer::PullConsumer =
            ctx.js.get_stream(ctx.names.inferred_stream()).await.unwrap().get_consumer("uploader").await.unwrap();
        let info = c.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "uploader did not finish: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let uploaded = ctx.counters.get(doc, EventState::Uploaded).await.unwrap();
    assert_eq!(uploaded.len(), 1);
    assert!(uploaded.timed <= 1, "its time is aggregated once: {uploaded:?}");
    let st = pagestream_pipeline::progress::read_status(&ctx.js, &ctx.names, &ctx.counters, doc, false).await;
    // No document-level event exists for this synthetic document; the counter is the truth.
    assert!(st.unwrap().is_none());
    // A mark of a page already marked reports it.
    assert!(!ctx.counters.mark(doc, EventState::Uploaded, 1, Some(5.0)).await.unwrap());
    assert!(ctx.counters.mark(doc, EventState::Uploaded, 2, Some(5.0)).await.unwrap());
    assert_eq!(ctx.counters.get(doc, EventState::Uploaded).await.unwrap().len(), 2);

    // Compare-and-set under contention: 3 × 40 concurrent marks of 40 pages
    // (each page marked three times, as by three replicas) count 40.
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..3 {
        for p in 1..=40u32 {
            let counters = ctx.counters.clone();
            tasks.spawn(async move { counters.mark("contended", EventState::Inferred, p, Some(round as f32)).await });
        }
    }
    let mut new = 0;
    while let Some(r) = tasks.join_next().await {
        new += u32::from(r.unwrap().unwrap());
    }
    assert_eq!(new, 40, "each page is new exactly once");
    let set = ctx.counters.get("contended", EventState::Inferred).await.unwrap();
    assert_eq!(set.len(), 40);
    assert_eq!(set.timed, 40);
    h.stop().await.unwrap();
}
