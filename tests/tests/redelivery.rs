//! A message redelivered after its work was done but its ack was lost (seen
//! in the chaos test during a NATS restart): the uploader had already
//! written the page and released its claim-check image, so the redelivered
//! message finds no image. That must be acknowledged as done, not
//! dead-lettered as `image_missing` (which would also mark a finished page
//! failed). A page whose image is missing and that was *not* done still is
//! dead-lettered, so the check discriminates.

use std::time::Duration;

use pagestream_e2e::{wait_consumer_idle, Harness};
use pagestream_pipeline::progress::publish_message;
use pagestream_schemas::{EventState, ImageRef, ModelRef, PageInferred, PageRendered, Timings, VERSION};

fn missing(doc: &str, page: u32) -> ImageRef {
    ImageRef { format: "png".into(), inline: None, blob: Some(format!("pages/{doc}/{page}.png")) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_pages_whose_work_is_done_are_acknowledged_not_dead_lettered() {
    let h = Harness::start(|_| {}).await.unwrap();
    let ctx = h.pipeline.ctx.clone();
    let doc = "redelivered-doc";
    // Page 1 was inferred and uploaded; page 2 was not.
    ctx.progress("inferencer").page(doc, 1, EventState::Inferred, None, None).await.unwrap();
    ctx.progress("uploader").page(doc, 1, EventState::Uploaded, None, None).await.unwrap();

    for page in [1, 2] {
        let rendered = PageRendered {
            v: VERSION,
            doc_id: doc.into(),
            page,
            page_count: 3,
            width: 10,
            height: 10,
            dpi: 150.0,
            image: missing(doc, page),
            render_ms: None,
            text: None,
            ocr: None,
        };
        // Its inference, as the inferencer would have published it.
        let inferred = PageInferred {
            v: VERSION,
            doc_id: rendered.doc_id.clone(),
            page,
            page_count: rendered.page_count,
            width: rendered.width,
            height: rendered.height,
            dpi: rendered.dpi,
            model: ModelRef::default(),
            detections: Vec::new(),
            image: Some(rendered.image.clone()),
            timings: Timings::default(),
            error: None,
            text: None,
        };
        let id = format!("{doc}:{page}:inferred");
        publish_message(&ctx.js, ctx.names.pages_inferred(), &id, &inferred).await.unwrap();
        let id = format!("{doc}:{page}:rendered");
        publish_message(&ctx.js, ctx.names.pages_rendered("layout_cdla"), &id, &rendered).await.unwrap();
    }
    let within = Duration::from_secs(30);
    wait_consumer_idle(&ctx.js, ctx.names.inferred_stream(), "uploader", 0, within).await;
    wait_consumer_idle(&ctx.js, ctx.names.pages_stream(), "inferencer_layout_cdla", 0, within).await;

    // Only page 2's messages are dead letters: one from each stage.
    assert_eq!(
        h.stream_messages(ctx.names.dlq_stream()).await,
        2,
        "page 1's redeliveries were acknowledged, page 2's dead-lettered"
    );
    // This synthetic document has no document-level event; its counters are
    // what status and completion read.
    let c = ctx.counters.doc(doc).await.unwrap();
    assert_eq!(c.uploaded.pages().collect::<Vec<_>>(), vec![1]);
    assert!(!c.failed.contains(1), "page 1 is not marked failed: {:?}", c.failed.pages().collect::<Vec<_>>());
    h.stop().await.unwrap();
}
