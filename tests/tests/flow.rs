//! Flow control and fairness, against a real nats-server, pdfium and model:
//!
//! - pages in flight stay within the per-document bound
//!   (`splitter.doc_pages_in_flight`) and the pipeline bound
//!   (`nats.max_pages_in_flight`), asserted on the pages stream's state
//!   sampled while documents run (without flow control the splitter runs far
//!   ahead of the model: ~20 of a 28-page document's pages wait in the stream);
//! - a small document submitted while a 2415-page one runs completes first
//!   (turns: the big one goes to the back of the queue after each chunk);
//! - a `high` document submitted after a `low` one completes first.
//!
//! Order of completion is asserted, never wall time.

use std::time::{Duration, Instant};

use pagestream_e2e::api::{self, is_terminal, status_ok};
use pagestream_e2e::{corpus, max_in_stream_until_done, wait, Harness};
use serde_json::Value;

async fn status(h: &Harness, id: &str) -> Value {
    status_ok(&h.client, id).await
}

async fn submit(h: &Harness, file: &std::path::Path, options: &[(&str, String)]) -> String {
    api::submit(&h.client, file, options).await
}

/// Samples the pages stream every 10 ms until every document is terminal;
/// returns the largest number of pages seen waiting in it.
async fn max_waiting_until_done(h: &Harness, ids: &[String], within: Duration) -> u64 {
    let (ctx, poll) = (&h.pipeline.ctx, Duration::from_millis(300));
    max_in_stream_until_done(&ctx.js, &ctx.names.pages_stream(), (&h.client, ids), (within, poll), String::new).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_in_flight_stay_within_the_document_and_pipeline_bounds() {
    let h = Harness::start(|c| {
        c.splitter.doc_pages_in_flight = 3;
        c.splitter.chunk_pages = 4;
        c.nats.max_pages_in_flight = 4;
        c.inferencer.threads = 1;
    })
    .await
    .unwrap();
    // The bound is the stream's own limit, per model: JetStream refuses a
    // fifth page of the model.
    let info = h.pipeline.ctx.js.get_stream(h.pipeline.ctx.names.pages_stream()).await.unwrap().get_info().await;
    let cfg = info.unwrap().config;
    assert_eq!(cfg.max_messages_per_subject, 4);
    assert!(cfg.discard_new_per_subject);
    assert_eq!(cfg.discard, async_nats::jetstream::stream::DiscardPolicy::New);

    // One document: its own bound (3) is the tighter one.
    let one = submit(&h, &corpus("fig_dbscan-jss.pdf"), &[]).await;
    let max_one = max_waiting_until_done(&h, std::slice::from_ref(&one), Duration::from_secs(240)).await;
    let st = status(&h, &one).await;
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(st["pages"]["uploaded"], 28, "{st}");
    assert!(max_one <= 3, "one document had {max_one} pages waiting; its bound is 3");
    assert!(max_one >= 1, "the sampler never saw a page in flight");

    // Two documents at once (3 + 3 allowed by their own bounds): the
    // pipeline bound (4) holds, and both complete.
    let a = submit(&h, &corpus("fig_dbscan-jss.pdf"), &[]).await;
    let b = submit(&h, &corpus("scan_cardinal-rotated.pdf"), &[]).await;
    let max_two = max_waiting_until_done(&h, &[a.clone(), b.clone()], Duration::from_secs(240)).await;
    assert!(max_two <= 4, "{max_two} pages waiting; the pipeline bound is 4");
    for (id, n) in [(&a, 28), (&b, 4)] {
        let st = status(&h, id).await;
        assert_eq!(st["state"], "completed", "{st}");
        assert_eq!(st["pages"]["uploaded"], n, "{st}");
    }
    assert_eq!(h.stream_messages(h.pipeline.ctx.names.dlq_stream()).await, 0);
    println!("pages waiting at most: one document {max_one} (bound 3), two documents {max_two} (bound 4)");
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_documents_and_high_priority_ones_do_not_wait_behind_a_big_one() {
    let h = Harness::start(|c| {
        c.inferencer.threads = 1;
    })
    .await
    .unwrap();
    let big = submit(&h, &corpus("huge_R-fullrefman.pdf"), &[]).await;
    // Let the big one fill the pipeline first.
    wait::until(Duration::from_secs(120), Duration::from_millis(200), async || {
        let started = status(&h, &big).await["pages"]["uploaded"].as_u64().unwrap_or(0) >= 5;
        started.then_some(()).ok_or("the big document did not start")
    })
    .await;

    // A 4-page document submitted now completes while the big one runs.
    let submitted = Instant::now();
    let small = submit(&h, &corpus("scan_cardinal-rotated.pdf"), &[]).await;
    let st = h.wait_terminal(&small, Duration::from_secs(180)).await.unwrap();
    let small_took = submitted.elapsed();
    assert_eq!(st["state"], "completed", "{st}");
    let big_st = status(&h, &big).await;
    assert!(!is_terminal(&big_st), "the big document finished first: {big_st}");
    let big_done = big_st["pages"]["uploaded"].as_u64().unwrap();
    assert!(big_done < 2415, "{big_st}");

    // Low first, then high: the high one completes first, the big one still runs.
    let low = submit(&h, &corpus("fig_dbscan-jss.pdf"), &[("priority", "low".into())]).await;
    let high = submit(&h, &corpus("fig_dbscan-jss.pdf"), &[("priority", "high".into())]).await;
    let st_high = h.wait_terminal(&high, Duration::from_secs(300)).await.unwrap();
    assert_eq!(st_high["state"], "completed", "{st_high}");
    let st_low = status(&h, &low).await;
    assert!(!is_terminal(&st_low), "the low-priority document finished before the high one: {st_low}");
    let low_done = st_low["pages"]["uploaded"].as_u64().unwrap();
    assert!(low_done < 28, "{st_low}");
    assert!(!is_terminal(&status(&h, &big).await), "the big document finished before the high one");

    for id in [&low, &big] {
        assert_eq!(h.client.delete(&format!("/v1/documents/{id}")).await.unwrap().status, 202);
    }
    for id in [&low, &big] {
        let st = h.wait_terminal(id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(st["state"], "cancelled", "{st}");
    }
    println!(
        "4-page document behind a 2415-page one: completed in {:.1} s (big: {big_done} pages done); \
         high completed while low had {low_done}/28 pages",
        small_took.as_secs_f64()
    );
    h.stop().await.unwrap();
}

/// Turns an older splitter queued with the priority token in their subject
/// (`<p>.turns.<tenant>.<priority>`) are still taken after an upgrade: the
/// tenant's consumer reads both subjects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_queued_by_an_older_splitter_still_run() {
    use pagestream_schemas::{encode, DocumentSubmitted, Source, VERSION};
    let h = Harness::start(|_| {}).await.unwrap();
    let ctx = &h.pipeline.ctx;
    let sub = DocumentSubmitted {
        v: VERSION,
        doc_id: "older-turn".into(),
        title: None,
        source: Source {
            inline: Some(std::fs::read(corpus("scan_cardinal-rotated.pdf")).unwrap().into()),
            ..Default::default()
        },
        options: Default::default(),
        submitted_at: None,
        start_page: None,
        owner: None,
    };
    // What the older splitter's admission did: the record, then the turn.
    pagestream_pipeline::records::DocRecords::new(&ctx.counters).adopt(&sub).await.unwrap();
    let legacy = format!("{}.turns.anonymous.normal", ctx.names.prefix);
    pagestream_e2e::publish(&ctx.js, legacy, encode(&sub)).await;
    let st = pagestream_e2e::wait_terminal(&h.client, "older-turn", Duration::from_secs(120)).await.unwrap();
    assert_eq!((st["state"].as_str(), st["pages"]["uploaded"].as_u64()), (Some("completed"), Some(4)), "{st}");
    // New turns go on the tenant's subject without the token.
    assert_eq!(ctx.names.turns("anonymous"), format!("{}.turns.anonymous", ctx.names.prefix));
    h.stop().await.unwrap();
}
