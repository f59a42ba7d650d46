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
use pagestream_e2e::api::{status_ok, submit};
use pagestream_e2e::procs::{signal, Stages, STAGES};
use pagestream_e2e::{corpus, read_json, stream_state, wait, wait_consumer_idle, Harness};
use pagestream_pipeline::counters::Counters;
use pagestream_pipeline::nats::Names;
use pagestream_pipeline::progress::publish_message;
use pagestream_schemas::{EventState, ImageRef, ModelRef, PageInferred, Timings, VERSION};
use serde_json::Value;

const PREFIX: &str = "counters";

async fn wait_uploaded(client: &ApiClient, id: &str, at_least: u64) {
    wait::until(Duration::from_secs(180), Duration::from_millis(50), async || {
        let st = status_ok(client, id).await;
        if st["pages"]["uploaded"].as_u64().unwrap_or(0) >= at_least {
            return Ok(());
        }
        Err(format!("no progress: {st}"))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploader_killed_mid_document_counts_every_page_exactly_once() {
    let extra = [
        ("PAGESTREAM_NATS_ACK_WAIT_SECS", "3".to_string()),
        ("PAGESTREAM_NATS_MAX_DELIVER", "20".into()),
        ("PAGESTREAM_UPLOADER_CONCURRENCY", "8".into()),
    ];
    let mut s = Stages::start(PREFIX, &STAGES, &extra, Duration::from_secs(60)).await;
    let (client, out) = (s.client.clone(), s.out.path().to_path_buf());
    let uploader = STAGES.iter().position(|stage| *stage == "uploader").unwrap();
    let cfg =
        pagestream_pipeline::config::NatsConfig { url: s.nats.url(), prefix: PREFIX.into(), ..Default::default() };
    let js = pagestream_pipeline::nats::connect(&cfg, "counters-check").await.unwrap();
    let names = Names::new(PREFIX);

    let id = submit(&client, &corpus("fig_dbscan-jss.pdf"), &[]).await;

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
    let pid = s.cluster.procs[uploader].child.id();
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
    s.cluster.kill_and_restart(uploader);
    // And once more at an arbitrary moment.
    wait_uploaded(&client, &id, 16).await;
    s.cluster.kill_and_restart(uploader);

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
    let manifest: Value = read_json(&out.join(&id).join("manifest.json"));
    assert_eq!(manifest["status"], "completed");
    assert_eq!(manifest["pages"].as_array().unwrap().len(), 28);
    let files = std::fs::read_dir(out.join(&id).join("pages")).unwrap().count();
    assert_eq!(files, 56, "one PNG and one JSON per page");
    assert_eq!(stream_state(&js, names.dlq_stream()).await.0, 0);
    let redelivered = s.cluster.count_in_logs("handling a redelivered message");
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
        text: None,
    };
    // Two deliveries of the same page (distinct message ids, as after the
    // deduplication window).
    for attempt in 0..2 {
        publish_message(&ctx.js, ctx.names.pages_inferred(), &format!("{doc}:1:inferred:{attempt}"), &page)
            .await
            .unwrap();
    }
    wait_consumer_idle(&ctx.js, ctx.names.inferred_stream(), "uploader", 2, Duration::from_secs(30)).await;
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
