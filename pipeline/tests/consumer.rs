//! The consumer contract on a real nats-server: a handler gets each message
//! decoded once as its declared `Input` with its delivery, errors carry the
//! message's document, an undecodable payload is dead-lettered with
//! `bad_message` without reaching the handler, and the consumer's queue lag
//! is exported (`pagestream_queue_pending` / `…_ack_pending`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagestream_pipeline::consumer::{ConsumerSpec, Delivery, Handler, StageError};
use pagestream_pipeline::embedded::NatsServer;
use pagestream_pipeline::health::Health;
use pagestream_pipeline::metrics::Metrics;
use pagestream_pipeline::progress::publish_message;
use pagestream_pipeline::{Config, StageContext};
use pagestream_schemas::{decode, DeadLetter, DocumentSubmitted, Source, SubmitOptions, VERSION};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Records what it was handed; waits for a permit per message, so the test
/// decides when messages finish; `fail-*` documents fail permanently.
struct Recorder {
    seen: Mutex<Vec<(String, String, i64)>>,
    gate: Arc<Semaphore>,
}

impl Handler for Recorder {
    type Input = DocumentSubmitted;

    async fn handle(&self, sub: DocumentSubmitted, delivery: &Delivery) -> Result<(), StageError> {
        self.seen.lock().unwrap().push((sub.doc_id.clone(), delivery.subject.clone(), delivery.delivered));
        self.gate.acquire().await.unwrap().forget();
        if sub.doc_id.starts_with("fail-") {
            // No `.doc(…)`: the loop names the document itself.
            return Err(StageError::permanent("refused", "a test refusal"));
        }
        Ok(())
    }
}

fn submission(doc_id: &str) -> DocumentSubmitted {
    DocumentSubmitted {
        v: VERSION,
        doc_id: doc_id.into(),
        title: None,
        source: Source { blob: Some(format!("uploads/{doc_id}")), ..Source::default() },
        options: SubmitOptions::default(),
        submitted_at: None,
        start_page: None,
        owner: None,
    }
}

fn gauge(text: &str, name: &str) -> Option<i64> {
    let prefix = format!("{name}{{stage=\"splitter\",consumer=\"splitter\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

async fn wait_for(metrics: &Metrics, name: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = gauge(&metrics.encode(), name);
        if got == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {got:?}, expected {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_get_typed_messages_and_the_queue_lag_is_exported() {
    let nats = NatsServer::start().unwrap();
    let mut config = Config::default();
    config.nats.url = nats.url();
    config.nats.prefix = "consumer-test".into();
    config.nats.max_blob_bytes = 64 << 20;
    let metrics = Arc::new(Metrics::new());
    let ctx =
        StageContext::connect(config, "consumer-test", metrics.clone(), Health::new(metrics.clone())).await.unwrap();
    let names = ctx.names.clone();
    // Five submissions wait before the loop starts; it handles two at a time.
    for id in ["doc-1", "doc-2", "doc-3", "fail-4", "doc-5"] {
        publish_message(&ctx.js, names.docs_submitted(), &format!("{id}:submitted"), &submission(id)).await.unwrap();
    }
    // A payload that is not a DocumentSubmitted: never reaches the handler.
    ctx.js.publish(names.docs_submitted(), "not msgpack".into()).await.unwrap().await.unwrap();

    let gate = Arc::new(Semaphore::new(0));
    let handler = Arc::new(Recorder { seen: Mutex::default(), gate: gate.clone() });
    let shutdown = CancellationToken::new();
    let spec = ConsumerSpec::new(&ctx, "splitter", names.docs_stream(), "splitter".into(), 2);
    let run = tokio::spawn({
        let (ctx, handler, shutdown) = (ctx.clone(), handler.clone(), shutdown.clone());
        async move { spec.run(&ctx, handler, shutdown).await }
    });

    // Two delivered and held, four waiting: the lag as an autoscaler sees it
    // (reported every 5 s).
    wait_for(&metrics, "pagestream_queue_ack_pending", 2).await;
    wait_for(&metrics, "pagestream_queue_pending", 4).await;

    gate.add_permits(100);
    let deadline = Instant::now() + Duration::from_secs(20);
    while handler.seen.lock().unwrap().len() < 5 {
        assert!(Instant::now() < deadline, "handled: {:?}", handler.seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for(&metrics, "pagestream_queue_pending", 0).await;
    wait_for(&metrics, "pagestream_queue_ack_pending", 0).await;
    shutdown.cancel();
    run.await.unwrap().unwrap();

    let seen = handler.seen.lock().unwrap().clone();
    let mut ids: Vec<&str> = seen.iter().map(|(id, _, _)| id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["doc-1", "doc-2", "doc-3", "doc-5", "fail-4"], "each message once, typed");
    assert!(
        seen.iter().all(|(_, subject, delivered)| *subject == names.docs_submitted() && *delivered == 1),
        "{seen:?}"
    );

    // Two dead letters: the refusal (tagged with its document by the loop)
    // and the undecodable payload.
    let mut dlq = ctx.js.get_stream(names.dlq_stream()).await.unwrap();
    assert_eq!(dlq.info().await.unwrap().state.messages, 2);
    let mut letters = Vec::new();
    for seq in 1..=2 {
        let raw = dlq.get_raw_message(seq).await.unwrap();
        letters.push(decode::<DeadLetter>(&raw.payload).unwrap());
    }
    letters.sort_by(|a, b| a.error.code.cmp(&b.error.code));
    assert_eq!((letters[0].error.code.as_str(), letters[0].doc_id.as_deref()), ("bad_message", None));
    assert_eq!(letters[0].payload.as_ref(), b"not msgpack");
    assert_eq!((letters[1].error.code.as_str(), letters[1].doc_id.as_deref()), ("refused", Some("fail-4")));
}
