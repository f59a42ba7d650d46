//! Page webhooks of one tenant cannot hold the notifier (issue #22, finding
//! 4), with real stage processes (ingress with two API tokens, splitter,
//! uploader, inferencer, notifier), a real nats-server and real HTTP
//! receivers:
//!
//! token A submits two 28-page documents with `callback_events=page` to a
//! receiver that always answers 503; once they are done (56 page events and
//! two terminal events for the notifier), token B submits a one-page
//! document with a document webhook to a healthy receiver. B's webhook
//! arrives within 5 s of B's document completing, with the default
//! `notifier.concurrency`; A's endpoint's circuit opens (metric), the
//! breaker spares A's receiver most attempts, and every one of A's events
//! is given up with a record: a dead letter per event and
//! `callback.state: failed` with every page listed.
//!
//! And page events evicted from the events stream before the notifier read
//! them (deleted from the stream while no notifier runs) are not lost
//! silently: when the document's terminal event is due, those pages are
//! recorded as lost (`callback.lost_pages`, a dead letter `callback_lost`).
//! A terminal event evicted unread — with every other document-level event,
//! so that only the durable record still names the callback — is delivered
//! all the same (the notifier's sweep).
//!
//! `cargo build --bins` first (scripts/test does it). Measuring "before":
//! `WEBHOOKS_TENANTS_NOTIFIER=<path of an older notifier binary>`.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use pagestream::client::ApiClient;
use pagestream_e2e::procs::{base_env, Cluster};
use pagestream_e2e::{corpus, dead_letters, init_logging, wait_terminal};
use pagestream_pipeline::embedded::{free_port, NatsServer};
use pagestream_pipeline::nats::Names;
use pagestream_pipeline::records::DocRecords;
use serde_json::Value;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const TOKEN_A: &str = "webhook-tenant-a";
const TOKEN_B: &str = "webhook-tenant-b";
/// How long one event is retried here (default 600 s): long enough that the
/// old notifier, which retried inside its 32 slots, still held them all when
/// B's document completed; short enough for A's give-up to come in the test.
const RETRY_FOR_SECS: u64 = 90;

/// What a receiver saw: the webhook id and when.
type Log = Arc<Mutex<Vec<(String, Instant)>>>;

/// A webhook receiver on `port` answering `status` to everything.
async fn receiver(port: u16, status: u16, log: Log) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let log = log.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let log = log.clone();
                async move {
                    let id =
                        req.headers().get("webhook-id").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
                    let _ = req.into_body().collect().await;
                    log.lock().unwrap().push((id, Instant::now()));
                    let resp = Response::builder()
                        .status(status)
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn upload(client: &ApiClient, pdf: &str, fields: &[(&str, &str)]) -> String {
    let bytes = std::fs::read(corpus(pdf)).unwrap();
    let ans = client.submit_multipart(pdf, bytes, fields).await.unwrap();
    assert_eq!(ans.status, 202, "{}", ans.json);
    ans.json["id"].as_str().unwrap().to_string()
}

async fn status(client: &ApiClient, id: &str) -> Value {
    client.get(&format!("/v1/documents/{id}")).await.unwrap().json
}

/// One sample of the notifier's `/metrics` (0 when absent).
async fn metric(admin: &str, series: &str) -> f64 {
    let client = ApiClient::new(admin);
    let Ok((_, body)) = client.get_bytes("/metrics").await else { return 0.0 };
    let text = String::from_utf8_lossy(&body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
}

struct Pipeline {
    nats: NatsServer,
    cluster: Cluster,
    prefix: String,
    a: ApiClient,
    b: ApiClient,
    /// The notifier's admin address (`/metrics`).
    admin: String,
    _out: tempfile::TempDir,
    _logs: tempfile::TempDir,
}

impl Pipeline {
    /// NATS, then ingress (tokens A and B), splitter, uploader and an
    /// inferencer, each a process; the notifier too when `notifier`.
    async fn start(notifier: bool) -> Pipeline {
        init_logging();
        let nats = tokio::task::spawn_blocking(NatsServer::start).await.unwrap().unwrap();
        let (out, logs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let prefix = format!("wt{}", std::process::id());
        let mut env = base_env(&nats.url(), &prefix, out.path());
        let admin_port = free_port().unwrap();
        for (k, v) in [
            ("PAGESTREAM_INGRESS_API_TOKENS", format!("{TOKEN_A},{TOKEN_B}")),
            ("PAGESTREAM_NOTIFIER_SECRET", SECRET.into()),
            ("PAGESTREAM_NOTIFIER_ALLOW_PRIVATE_HOSTS", "127.0.0.1".into()),
            ("PAGESTREAM_NOTIFIER_RETRY_FOR_SECS", RETRY_FOR_SECS.to_string()),
            ("PAGESTREAM_NOTIFIER_ADMIN_ADDR", format!("127.0.0.1:{admin_port}")),
        ] {
            env.push((k.into(), v));
        }
        let mut cluster = Cluster::new(env, logs.path());
        let port = free_port().unwrap();
        for stage in ["ingress", "splitter", "uploader", "inferencer"] {
            let p = cluster.spawn(stage, 0, (stage == "ingress").then_some(port));
            cluster.procs.push(p);
        }
        let base = format!("http://127.0.0.1:{port}");
        let a = ApiClient::new(&base).with_token(Some(TOKEN_A.into()));
        let b = ApiClient::new(&base).with_token(Some(TOKEN_B.into()));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let models = a.get("/v1/models").await.ok().filter(|m| m.status == 200);
            if models.is_some_and(|m| m.json["models"].as_array().is_some_and(|l| !l.is_empty())) {
                break;
            }
            assert!(Instant::now() < deadline, "pipeline not ready:\n{}", cluster.log_tails());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let admin = format!("http://127.0.0.1:{admin_port}");
        let mut p = Pipeline { nats, cluster, prefix, a, b, admin, _out: out, _logs: logs };
        if notifier {
            p.start_notifier();
        }
        p
    }

    /// The notifier process: this build's, or the one named to measure "before".
    fn start_notifier(&mut self) {
        let default_bins = self.cluster.bins.clone();
        if let Some(bin) = std::env::var_os("WEBHOOKS_TENANTS_NOTIFIER") {
            self.cluster.bins = PathBuf::from(bin).parent().unwrap().to_path_buf();
        }
        let p = self.cluster.spawn("notifier", 0, None);
        self.cluster.procs.push(p);
        self.cluster.bins = default_bins;
    }

    async fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(async_nats::connect(self.nats.url()).await.unwrap())
    }
}

/// Waits until the document's terminal webhook is finished (its record exists).
async fn callback_record(client: &ApiClient, id: &str, within: Duration, cluster: &Cluster) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let st = status(client, id).await;
        if st["callback"]["event"].is_string() {
            return st;
        }
        assert!(Instant::now() < deadline, "{id}'s webhook still pending: {st}\n{}", cluster.log_tails());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_page_receiver_does_not_hold_another_tenants_webhook() {
    let p = Pipeline::start(true).await;
    let (a, b, cluster, admin) = (&p.a, &p.b, &p.cluster, &p.admin);

    let (port_a, port_b) = (free_port().unwrap(), free_port().unwrap());
    let (log_a, log_b): (Log, Log) = Default::default();
    tokio::spawn(receiver(port_a, 503, log_a.clone()));
    tokio::spawn(receiver(port_b, 204, log_b.clone()));

    // A: 56 page events and two terminal events to a receiver that always fails.
    let url_a = format!("http://127.0.0.1:{port_a}/hooks");
    let mut docs_a = Vec::new();
    for _ in 0..2 {
        let fields = [("callback_url", url_a.as_str()), ("callback_events", "page")];
        docs_a.push(upload(a, "fig_dbscan-jss.pdf", &fields).await);
    }
    for id in &docs_a {
        let st = wait_terminal(a, id, Duration::from_secs(600)).await.unwrap();
        assert_eq!(st["state"], "completed", "{st}");
    }

    // B: one page, a document webhook to a healthy receiver.
    let url_b = format!("http://127.0.0.1:{port_b}/hooks");
    let doc_b = upload(b, "stress_blank-no-content.pdf", &[("callback_url", url_b.as_str())]).await;
    let mut completed_b = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    let webhook_b = loop {
        if completed_b.is_none() {
            let st = status(b, &doc_b).await;
            if st["state"] == "completed" {
                completed_b = Some(Instant::now());
            }
        }
        let got = log_b.lock().unwrap().iter().find(|(id, _)| id == &format!("msg_{doc_b}_completed")).map(|r| r.1);
        if let (Some(at), Some(_)) = (got, completed_b) {
            break at;
        }
        assert!(Instant::now() < deadline, "B's webhook never came:\n{}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let completed_b = completed_b.unwrap();
    let late = webhook_b.saturating_duration_since(completed_b);
    eprintln!("B's webhook arrived {:.1} s after B's document completed", late.as_secs_f64());
    assert!(late <= Duration::from_secs(5), "B's webhook came {late:?} after its document completed");
    let st_b = status(b, &doc_b).await;
    assert_eq!(st_b["callback"]["attempts"], 1, "{st_b}");

    // A's endpoint's circuit opened.
    let opened = metric(admin, "pagestream_webhook_circuit_opened_total").await;
    assert!(opened >= 1.0, "A's circuit never opened");

    // Every one of A's events ends given up, with a record.
    let deadline = Instant::now() + Duration::from_secs(RETRY_FOR_SECS + 300);
    for id in &docs_a {
        let st = callback_record(a, id, deadline.saturating_duration_since(Instant::now()), cluster).await;
        assert_eq!(st["callback"]["state"], "failed", "{st}");
        assert_eq!(st["callback"]["event"], "document.completed", "{st}");
        let pages: BTreeSet<u64> =
            st["callback"]["failed_pages"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
        assert_eq!(pages, (1..=28).collect::<BTreeSet<u64>>(), "every page event recorded as given up: {st}");
    }
    let letters = dead_letters(&p.js().await, &Names::new(p.prefix.as_str())).await;
    for id in &docs_a {
        let mine: Vec<_> =
            letters.iter().filter(|l| l.stage == "notifier" && l.doc_id.as_deref() == Some(id.as_str())).collect();
        assert_eq!(mine.len(), 29, "a dead letter per page event and the document's: {mine:?}");
        assert!(mine.iter().all(|l| l.error.code == "callback_failed"), "{mine:?}");
    }
    // The breaker spared A's receiver: fewer attempts than events.
    let attempts_a = log_a.lock().unwrap().len();
    eprintln!("A's receiver got {attempts_a} attempts for 58 events");
    assert!(attempts_a < 58, "{attempts_a} attempts: the open circuit should have held A's events back");
    assert!(log_b.lock().unwrap().len() == 1, "B's webhook once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_events_evicted_before_the_notifier_read_them_are_recorded_lost() {
    // No notifier yet: the events wait in the stream for it.
    let mut p = Pipeline::start(false).await;
    let port = free_port().unwrap();
    let log: Log = Default::default();
    tokio::spawn(receiver(port, 204, log.clone()));
    let url = format!("http://127.0.0.1:{port}/hooks");
    let id = upload(&p.a, "fig_dbscan-jss.pdf", &[("callback_url", url.as_str()), ("callback_events", "page")]).await;
    let st = wait_terminal(&p.a, &id, Duration::from_secs(600)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");

    // Pages 3 and 7's events leave the events stream unread.
    let js = p.js().await;
    let names = Names::new(p.prefix.as_str());
    let events = js.get_stream(names.events_stream()).await.unwrap();
    for page in [3, 7] {
        let subject = format!("{}.events.{id}.page.uploaded.{page}", p.prefix);
        let seq = events.get_last_raw_message_by_subject(&subject).await.unwrap().sequence;
        assert!(events.delete_message(seq).await.unwrap(), "{subject}");
    }

    p.start_notifier();
    let st = callback_record(&p.a, &id, Duration::from_secs(180), &p.cluster).await;
    let pages = |key: &str| -> Vec<u64> {
        st["callback"][key].as_array().map(|l| l.iter().map(|p| p.as_u64().unwrap()).collect()).unwrap_or_default()
    };
    assert_eq!(pages("lost_pages"), [3, 7], "{st}");
    assert_eq!(pages("failed_pages"), [3, 7], "{st}");
    assert_eq!(st["callback"]["state"], "failed", "{st}");
    // Every other page event, then the document's, was delivered.
    let got: Vec<String> = log.lock().unwrap().iter().map(|r| r.0.clone()).collect();
    let expected: BTreeSet<String> =
        (1..=28).filter(|p| ![3, 7].contains(p)).map(|p| format!("msg_{id}_p{p}_uploaded")).collect();
    assert_eq!(got.iter().filter(|g| g.contains("_p")).cloned().collect::<BTreeSet<String>>(), expected);
    assert_eq!(got.last().map(String::as_str), Some(format!("msg_{id}_completed").as_str()), "{got:?}");
    let letters = dead_letters(&js, &names).await;
    let lost: Vec<_> = letters.iter().filter(|l| l.error.code == "callback_lost").collect();
    assert_eq!(lost.len(), 1, "{letters:?}");
    assert_eq!(lost[0].doc_id.as_deref(), Some(id.as_str()));
    assert!(lost[0].error.message.contains("[3, 7]"), "{}", lost[0].error.message);
    assert_eq!(metric(&p.admin, "pagestream_webhook_events_lost_total").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_event_evicted_before_the_notifier_read_it_is_still_delivered() {
    // No notifier yet: the events wait in the stream for it.
    let mut p = Pipeline::start(false).await;
    let port = free_port().unwrap();
    let log: Log = Default::default();
    tokio::spawn(receiver(port, 204, log.clone()));
    let url = format!("http://127.0.0.1:{port}/hooks");
    let id = upload(&p.b, "stress_blank-no-content.pdf", &[("callback_url", url.as_str())]).await;
    let st = wait_terminal(&p.b, &id, Duration::from_secs(300)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");

    // Every document-level event (queued: it named the callback; split;
    // completed) leaves the events stream unread.
    let js = p.js().await;
    let names = Names::new(p.prefix.as_str());
    let events = js.get_stream(names.events_stream()).await.unwrap();
    let purged = events.purge().filter(format!("{}.events.{id}.doc.>", p.prefix)).await.unwrap();
    assert!(purged.purged >= 3, "queued, split and completed events purged: {purged:?}");
    let st = status(&p.b, &id).await;
    assert_eq!(st["state"], "completed", "the durable record still knows the document: {st}");

    p.start_notifier();
    let st = callback_record(&p.b, &id, Duration::from_secs(120), &p.cluster).await;
    assert_eq!(st["callback"]["state"], "delivered", "{st}");
    assert_eq!(st["callback"]["event"], "document.completed", "{st}");
    let got: Vec<String> = log.lock().unwrap().iter().map(|r| r.0.clone()).collect();
    assert_eq!(got, [format!("msg_{id}_completed")], "the terminal webhook, once");
    assert_eq!(metric(&p.admin, "pagestream_webhook_events_recovered_total").await, 1.0);
    // Its marker is gone: no later sweep schedules it again.
    let kv = js.get_key_value(names.progress_bucket()).await.unwrap();
    let ended = DocRecords::from_store(kv).ended().await.unwrap();
    assert!(ended.iter().all(|e| e.doc_id != id), "{ended:?}");
    assert_eq!(log.lock().unwrap().len(), 1, "delivered once");
}
