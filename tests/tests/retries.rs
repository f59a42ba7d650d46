//! Transient failures are retried with back-off; when `max_deliver` is
//! exhausted the message is dead-lettered with its original payload, stage,
//! error and attempt count, and the page is reported failed with the reason;
//! when the manifest cannot be written either, the document still ends
//! (`failed`, `manifest_unwritten`). Once the store is back, new documents
//! complete.

use std::time::{Duration, Instant};

use futures::StreamExt;
use pagestream_e2e::{corpus, wait_terminal, Harness, MotoServer};
use pagestream_schemas::{decode, DeadLetter, PageInferred};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_are_dead_lettered_and_reported() {
    let moto = MotoServer::start().unwrap();
    let (h, s3) = Harness::start_s3(&moto, "flaky", |c| c.nats.max_deliver = 3).await.unwrap();
    // The S3 server goes away after start-up: every PUT fails (connection
    // refused, a transient error).
    let port = moto.port;
    drop(moto);
    // A blank page: a small PUT body, so the failure is the missing bucket alone.
    let sample = corpus("stress_blank-no-content.pdf");
    let ans = h.client.submit_file(&sample, None).await.unwrap();
    let id = ans.json["id"].as_str().unwrap().to_string();

    let ctx = &h.pipeline.ctx;
    let deadline = Instant::now() + Duration::from_secs(180);
    let st = loop {
        let st = h.client.get(&format!("/v1/documents/{id}")).await.unwrap().json;
        if st["pages"]["failed"] == 1 {
            break st;
        }
        assert!(Instant::now() < deadline, "page never reported failed: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(st["failed_pages"][0]["page"], 1, "{st}");
    assert_eq!(st["failed_pages"][0]["error"]["code"], "result_store", "{st}");
    assert_eq!(st["failed_pages"][0]["stage"], "uploader", "{st}");

    let stream = ctx.js.get_stream(ctx.names.dlq_stream()).await.unwrap();
    let consumer =
        stream.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()).await.unwrap();
    let msg = consumer.messages().await.unwrap().next().await.unwrap().unwrap();
    let dl: DeadLetter = decode(&msg.payload).unwrap();
    assert_eq!((dl.stage.as_str(), dl.error.code.as_str(), dl.attempts), ("uploader", "result_store", 3));
    assert_eq!(dl.doc_id.as_deref(), Some(id.as_str()));
    let original: PageInferred = decode(&dl.payload).expect("the original payload is kept");
    assert_eq!((original.doc_id.as_str(), original.page), (id.as_str(), 1));
    assert!(dl.error.message.contains("flaky"), "{}", dl.error.message);

    // Its manifest cannot be written either (the store is still down): the
    // document still ends, `failed` with the reason, not `running` forever.
    let st = wait_terminal(&h.client, &id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        (st["state"].as_str(), st["error"]["code"].as_str()),
        (Some("failed"), Some("manifest_unwritten")),
        "{st}"
    );
    assert_eq!(st["pages"]["failed"], 1, "{st}");

    // The store comes back (same address, empty): the next document completes.
    let _moto = MotoServer::start_on(port).unwrap();
    s3.create_bucket().bucket("flaky").send().await.unwrap();
    let ans = h.client.submit_file(&sample, None).await.unwrap();
    let st = wait_terminal(&h.client, ans.json["id"].as_str().unwrap(), Duration::from_secs(60)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    h.stop().await.unwrap();
}
