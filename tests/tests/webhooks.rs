//! Webhooks through the notifier stage, to a real HTTP receiver in the test
//! that answers 503 to the first attempt of every webhook: each event is
//! retried and delivered exactly once per `webhook-id`, signed (checked in
//! Python with docs/webhooks.md's verification code), a page-mode document's
//! pages all come before its terminal event, a document-mode one gets only
//! its terminal event, a failed document says why, a receiver that never
//! answers ends in a dead letter and `callback.state: failed`, and bad
//! callback URLs are refused at upload.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Request;
use pagestream_e2e::api::{accepted, metric, metrics_text, status};
use pagestream_e2e::http::{answer, serve};
use pagestream_e2e::{corpus, repo_root, wait, Harness};
use pagestream_pipeline::embedded::free_port;
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    /// What the receiver answered.
    status: u16,
    at: Instant,
}

/// A webhook receiver on `port`: 503 to the first attempt of each id, 204 after.
async fn receiver(port: u16, log: Arc<Mutex<Vec<Received>>>) {
    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    serve(port, move |req: Request<Incoming>| {
        let (log, attempts) = (log.clone(), attempts.clone());
        async move {
            let header =
                |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            let (id, timestamp, signature) =
                (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
            let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
            let n = {
                let mut a = attempts.lock().unwrap();
                let n = a.entry(id.clone()).or_default();
                *n += 1;
                *n
            };
            let status = if n == 1 { 503 } else { 204 };
            log.lock().unwrap().push(Received { id, timestamp, signature, body, status, at: Instant::now() });
            answer(status, "")
        }
    })
    .await
}

/// docs/webhooks.md's Python verification, run on every received request.
const VERIFY_PY: &str = r#"
import base64, hashlib, hmac, json, sys, time

def verify(secret, headers, body, tolerance=300):
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, ts = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(ts)) > tolerance:
        return False
    signed = f"{msg_id}.{ts}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, s.split(",", 1)[1])
               for s in headers["webhook-signature"].split() if s.startswith("v1,"))

secret, path = sys.argv[1], sys.argv[2]
good = 0
for r in json.load(open(path)):
    body = base64.b64decode(r["body"])
    assert verify(secret, r["headers"], body), r["headers"]
    assert not verify(secret, r["headers"], body + b" "), "a changed body must not verify"
    good += 1
print("verified", good)
"#;

/// Waits until the document's webhook is finished (delivered or failed).
async fn callback_finished(h: &Harness, id: &str, within: Duration) -> Value {
    wait::until(within, Duration::from_millis(200), async || {
        let st = status(&h.client, id).await;
        if st["callback"]["state"] != "pending" && st["callback"]["state"].is_string() {
            return Ok(st);
        }
        Err(format!("webhook of {id} still pending: {st}"))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_ordered_and_delivered_once_per_id() {
    let port = free_port().unwrap();
    let h = Harness::start(|c| {
        c.notifier.secret = SECRET.into();
        c.notifier.allow_private_hosts = vec!["127.0.0.1".into()];
        c.notifier.retry_for_secs = 8;
    })
    .await
    .unwrap();
    let log: Arc<Mutex<Vec<Received>>> = Arc::default();
    tokio::spawn(receiver(port, log.clone()));
    let hook = |doc: &str| format!("http://127.0.0.1:{port}/hooks?doc={doc}");

    // Refused at upload: private targets, other schemes, credentials, events without a URL.
    let pdf = std::fs::read(corpus("fig_dbscan-jss.pdf")).unwrap();
    for (fields, why) in [
        (vec![("callback_url", "http://10.0.0.1/hook")], "allow_private_hosts"),
        (vec![("callback_url", "http://169.254.169.254/latest")], "allow_private_hosts"),
        (vec![("callback_url", "ftp://example.com/x")], "http:// or https://"),
        (vec![("callback_url", "https://user:pw@example.com/x")], "credentials"),
        (vec![("callback_events", "page")], "needs a callback_url"),
        (vec![("callback_url", "https://example.com/x"), ("callback_events", "all")], "document, page"),
    ] {
        let ans = h.client.submit_multipart("a.pdf", pdf.clone(), &fields).await.unwrap();
        let code = if why == "document, page" { "invalid_option" } else { "invalid_callback" };
        assert_eq!(
            (ans.status.as_u16(), ans.json["error"]["code"].as_str()),
            (422, Some(code)),
            "{fields:?}: {}",
            ans.json
        );
        assert!(ans.json["error"]["message"].as_str().unwrap().contains(why), "{fields:?}: {}", ans.json);
    }

    // A: every page, then the document. B: the document only. C: fails.
    let url_a = hook("a");
    let a = accepted(
        &h.client
            .submit_multipart("a.pdf", pdf.clone(), &[("callback_url", &url_a), ("callback_events", "page")])
            .await
            .unwrap(),
    );
    let url_b = hook("b");
    let b = h.client.submit_multipart("b.pdf", pdf.clone(), &[("callback_url", &url_b)]).await.unwrap();
    let b = b.json["id"].as_str().unwrap().to_string();
    let locked = std::fs::read(corpus("enc_aes256_pw-asdfzxcv.pdf")).unwrap();
    let url_c = hook("c");
    let c = h.client.submit_multipart("c.pdf", locked, &[("callback_url", &url_c)]).await.unwrap();
    let c = c.json["id"].as_str().unwrap().to_string();
    // D: nobody listens there; given up after notifier.retry_for_secs.
    let dead_port = free_port().unwrap();
    let url_d = format!("http://127.0.0.1:{dead_port}/hook");
    let d = h.client.submit_multipart("d.pdf", pdf.clone(), &[("callback_url", &url_d)]).await.unwrap();
    let d = d.json["id"].as_str().unwrap().to_string();

    for id in [&a, &b, &c, &d] {
        h.wait_terminal(id, Duration::from_secs(300)).await.unwrap();
    }
    let st_a = callback_finished(&h, &a, Duration::from_secs(60)).await;
    assert_eq!(st_a["callback"]["state"], "delivered", "{st_a}");
    assert_eq!(st_a["callback"]["attempts"], 2, "the first attempt got 503: {st_a}");
    assert_eq!(
        (st_a["callback"]["url"].as_str(), st_a["callback"]["events"].as_str()),
        (Some(url_a.as_str()), Some("page"))
    );
    let st_b = callback_finished(&h, &b, Duration::from_secs(60)).await;
    assert_eq!(st_b["callback"]["state"], "delivered");
    let st_c = callback_finished(&h, &c, Duration::from_secs(60)).await;
    assert_eq!(st_c["callback"]["state"], "delivered");
    let st_d = callback_finished(&h, &d, Duration::from_secs(60)).await;
    assert_eq!(st_d["callback"]["state"], "failed", "{st_d}");
    assert_eq!(st_d["callback"]["error"]["code"], "callback_unreachable", "{st_d}");
    assert!(st_d["callback"]["error"]["message"].as_str().unwrap().contains("gave up after"), "{st_d}");

    let received = log.lock().unwrap().clone();
    let of = |doc: &str| -> Vec<(Received, Value)> {
        received
            .iter()
            .filter(|r| r.id.starts_with(&format!("msg_{doc}_")))
            .map(|r| (r.clone(), serde_json::from_slice(&r.body).unwrap()))
            .collect()
    };
    // Every attempt of an id carries the same body; each id delivered once.
    let mut by_id: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for r in &received {
        by_id.entry(r.id.clone()).or_default().push(r);
    }
    for (id, attempts) in &by_id {
        let statuses: Vec<u16> = attempts.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [503, 204], "{id}: one retry after the 503, then never again");
        assert_eq!(attempts[0].body, attempts[1].body, "{id}: same event each attempt");
        assert_ne!(attempts[0].signature, "", "{id} is signed");
    }

    // The notifier's metrics count each delivery and attempt (the harness
    // runs every stage in this process, so the ingress serves them).
    let text = metrics_text(&h.client).await;
    let sample = |series: &str| metric(&text, series).map_or(0, |v| v as u64);
    let pages_delivered = by_id.keys().filter(|id| id.contains("_p")).count() as u64;
    let docs_delivered = by_id.len() as u64 - pages_delivered;
    assert_eq!((pages_delivered, docs_delivered), (28, 3), "{:?}", by_id.keys());
    assert_eq!(
        sample(r#"pagestream_webhook_deliveries_total{kind="page",outcome="delivered"}"#),
        pages_delivered,
        "{text}"
    );
    assert_eq!(sample(r#"pagestream_webhook_deliveries_total{kind="document",outcome="delivered"}"#), docs_delivered);
    assert_eq!(sample(r#"pagestream_webhook_deliveries_total{kind="document",outcome="failed"}"#), 1, "D");
    assert_eq!(sample(r#"pagestream_webhook_attempts_total{result="delivered"}"#), by_id.len() as u64);
    assert_eq!(sample(r#"pagestream_webhook_attempts_total{result="callback_status"}"#), by_id.len() as u64, "503s");
    assert!(sample(r#"pagestream_webhook_attempts_total{result="callback_unreachable"}"#) >= 2, "D's attempts");
    assert_eq!(
        sample(r#"pagestream_webhook_delivery_seconds_count{kind="page",outcome="delivered"}"#),
        pages_delivered
    );
    assert!(text.contains("# TYPE pagestream_webhook_delivery_seconds histogram\n"), "{text}");

    // A: 28 page.uploaded events, then document.completed, last.
    let events_a = of(&a);
    let delivered_a: Vec<&(Received, Value)> = events_a.iter().filter(|(r, _)| r.status == 204).collect();
    let pages: BTreeSet<u64> = delivered_a
        .iter()
        .filter(|(_, v)| v["type"] == "page.uploaded")
        .map(|(_, v)| v["data"]["page"].as_u64().unwrap())
        .collect();
    assert_eq!(pages, (1..=28).collect::<BTreeSet<u64>>(), "one page.uploaded per page");
    assert_eq!(delivered_a.len(), 29, "28 pages and the document");
    let last = delivered_a.iter().max_by_key(|(r, _)| r.at).unwrap();
    assert_eq!(last.1["type"], "document.completed", "the document's event comes last");
    let first_doc_attempt =
        events_a.iter().filter(|(_, v)| v["type"] == "document.completed").map(|(r, _)| r.at).min().unwrap();
    let last_page = delivered_a.iter().filter(|(_, v)| v["type"] == "page.uploaded").map(|(r, _)| r.at).max().unwrap();
    assert!(first_doc_attempt > last_page, "no attempt of the document's event before every page was delivered");
    assert_eq!(last.1["data"]["pages"]["uploaded"], 28);
    assert_eq!(last.1["data"]["links"]["results"], format!("/v1/documents/{a}/results"));
    assert_eq!(last.1["data"]["links"]["markdown"], format!("/v1/documents/{a}/results?format=markdown"));
    assert_eq!(last.1["data"]["links"]["chunks"], format!("/v1/documents/{a}/results?format=chunks"));
    let page3 = delivered_a.iter().find(|(_, v)| v["data"]["page"] == 3).unwrap();
    assert_eq!(page3.1["data"]["links"]["detections"], format!("/v1/documents/{a}/results/pages/3.json"));
    assert_eq!(page3.0.id, format!("msg_{a}_p3_uploaded"));

    // B: the document only. C: failed, with the reason.
    let types_b: Vec<String> =
        of(&b).iter().filter(|(r, _)| r.status == 204).map(|(_, v)| v["type"].as_str().unwrap().to_string()).collect();
    assert_eq!(types_b, ["document.completed"]);
    let c_events = of(&c);
    let (_, c_event) = c_events.iter().find(|(r, _)| r.status == 204).unwrap();
    assert_eq!(
        (c_event["type"].as_str(), c_event["data"]["error"]["code"].as_str()),
        (Some("document.failed"), Some("pdf_password"))
    );

    // D: a dead letter of the notifier names the webhook and why.
    let dlq = h.dead_letters().await;
    let d_letter = dlq
        .iter()
        .find(|l| l.stage == "notifier" && l.doc_id.as_deref() == Some(d.as_str()))
        .expect("a dead letter for D");
    assert_eq!(d_letter.error.code, "callback_failed");
    assert!(d_letter.error.message.contains(&format!("msg_{d}_completed")), "{}", d_letter.error.message);
    assert_eq!(dlq.iter().filter(|l| l.stage == "notifier").count(), 1, "only D's webhook failed: {dlq:?}");

    // Signatures, checked independently with Python's hmac (docs/webhooks.md's code).
    let dump: Vec<Value> = received
        .iter()
        .map(|r| {
            json!({
                "headers": {"webhook-id": r.id, "webhook-timestamp": r.timestamp, "webhook-signature": r.signature},
                "body": base64::engine::general_purpose::STANDARD.encode(&r.body),
            })
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("received.json");
    std::fs::write(&path, serde_json::to_vec(&dump).unwrap()).unwrap();
    let out = Command::new(repo_root().join(".deps/venv/bin/python"))
        .args(["-c", VERIFY_PY, SECRET, path.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains(&format!("verified {}", received.len())), "{said}");
    h.stop().await.unwrap();
}
