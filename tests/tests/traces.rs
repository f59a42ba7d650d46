//! Tracing across stages: with `PAGESTREAM_OTLP_ENDPOINT` set, the four
//! stage processes export OTLP/HTTP protobuf to a receiver in this test, and
//! a document is one trace — the ingress's `submit` span at its root, a span
//! per page per stage below it, linked through the `traceparent` header of
//! each NATS message; with a `traceparent` on the upload, under the
//! client's span.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use pagestream::client::ApiClient;
use pagestream_e2e::procs::{base_env, Cluster};
use pagestream_e2e::{corpus, init_logging};
use pagestream_pipeline::embedded::{free_port, NatsServer};
use prost::Message as _;

#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    attrs: HashMap<String, String>,
}

fn text(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => s.clone(),
                AnyValue::IntValue(i) => i.to_string(),
                AnyValue::DoubleValue(d) => d.to_string(),
                AnyValue::BoolValue(b) => b.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

/// An OTLP/HTTP receiver: decodes each export request and keeps its spans.
async fn receiver(port: u16, spans: Arc<Mutex<Vec<Span>>>, requests: Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let (spans, requests) = (spans.clone(), requests.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (spans, requests) = (spans.clone(), requests.clone());
                async move {
                    let what = format!(
                        "{} {} {:?}",
                        req.method(),
                        req.uri().path(),
                        req.headers().get("content-type").map(|v| v.to_str().unwrap_or("").to_string())
                    );
                    requests.lock().unwrap().push(what);
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let export = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export request");
                    for rs in export.resource_spans {
                        let res = text(&rs.resource.map(|r| r.attributes).unwrap_or_default());
                        let service = res.get("service.name").cloned().unwrap_or_default();
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                spans.lock().unwrap().push(Span {
                                    service: service.clone(),
                                    name: s.name.clone(),
                                    trace: s.trace_id.clone(),
                                    id: s.span_id.clone(),
                                    parent: s.parent_span_id.clone(),
                                    attrs: text(&s.attributes),
                                });
                            }
                        }
                    }
                    Ok::<_, Infallible>(Response::new(http_body_util::Full::new(bytes::Bytes::new())))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_is_one_trace_from_ingress_to_uploader() {
    init_logging();
    let (spans, requests) = (Arc::new(Mutex::new(Vec::<Span>::new())), Arc::new(Mutex::new(Vec::new())));
    let otlp = free_port().unwrap();
    tokio::spawn(receiver(otlp, spans.clone(), requests.clone()));
    let span_log = spans.clone();

    let nats = NatsServer::start().unwrap();
    let out = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut env = base_env(&nats.url(), "traces", out.path());
    env.push(("PAGESTREAM_OTLP_ENDPOINT".into(), format!("http://127.0.0.1:{otlp}")));
    // Export every 200 ms instead of every 5 s.
    env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()));
    let mut cluster = Cluster::new(env, logs.path());
    let port = free_port().unwrap();
    for (stage, p) in [("ingress", Some(port)), ("splitter", None), ("inferencer", None), ("uploader", None)] {
        let proc = cluster.spawn(stage, 0, p);
        cluster.procs.push(proc);
    }
    let client = ApiClient::new(format!("http://127.0.0.1:{port}"));
    let deadline = Instant::now() + Duration::from_secs(90);
    while !client.get("/readyz").await.map(|a| a.status.is_success()).unwrap_or(false) {
        assert!(Instant::now() < deadline, "ingress not ready: {}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ans = client.submit_file(&corpus("scan_cardinal-rotated.pdf"), None).await.unwrap();
    assert_eq!(ans.status, 202, "{}", ans.json);
    let id = ans.json["id"].as_str().unwrap().to_string();
    let st = pagestream_e2e::wait_terminal(&client, &id, Duration::from_secs(180)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    let pages = st["page_count"].as_u64().unwrap();

    // The uploader's span of every page reaches the receiver.
    let of_doc = |spans: &[Span]| -> Vec<Span> {
        spans.iter().filter(|s| s.attrs.get("doc_id") == Some(&id)).cloned().collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let all = spans.lock().unwrap().clone();
        let uploaded =
            of_doc(&all).iter().filter(|s| s.service == "pagestream-uploader" && s.attrs.contains_key("page")).count();
        if uploaded as u64 >= pages {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "{uploaded} of {pages} uploader page spans received; requests {:?}; logs {}",
            requests.lock().unwrap(),
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(requests
        .lock()
        .unwrap()
        .iter()
        .all(|r| r.starts_with("POST /v1/traces") && r.contains("application/x-protobuf")));

    // One root: the ingress's submit span.
    let roots: Vec<&Span> = spans.iter().filter(|s| s.name == "submit" && s.attrs.get("doc_id") == Some(&id)).collect();
    let ingress: Vec<&Span> = spans.iter().filter(|s| s.service == "pagestream-ingress").collect();
    assert_eq!(roots.len(), 1, "{roots:?}; the ingress exported {ingress:?}");
    let root = roots[0];
    assert_eq!(root.service, "pagestream-ingress");
    assert!(root.parent.is_empty(), "submit is a root span");
    // Every span naming the document is in its trace.
    for s in of_doc(&spans) {
        assert_eq!(s.trace, root.trace, "{} span {} is in another trace", s.service, s.name);
    }
    let trace: Vec<&Span> = spans.iter().filter(|s| s.trace == root.trace).collect();
    let services: HashSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    for want in ["pagestream-ingress", "pagestream-splitter", "pagestream-inferencer", "pagestream-uploader"] {
        assert!(services.contains(want), "no {want} span in the trace: {services:?}");
    }
    // A span per page per stage after the splitter, each one descending from the root.
    let by_id: HashMap<&[u8], &Span> = trace.iter().map(|s| (s.id.as_slice(), *s)).collect();
    for (service, name) in [("pagestream-inferencer", "inferencer"), ("pagestream-uploader", "uploader")] {
        let mut seen: Vec<u64> = trace
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .filter_map(|s| s.attrs.get("page")?.parse().ok())
            .collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, (1..=pages).collect::<Vec<_>>(), "{service} page spans");
    }
    for s in trace.iter().filter(|s| s.service == "pagestream-uploader") {
        let mut at = *s;
        let mut path = vec![format!("{}:{}", at.service, at.name)];
        while !at.parent.is_empty() {
            at = by_id.get(at.parent.as_slice()).unwrap_or_else(|| panic!("a parent of {path:?} was not exported"));
            path.push(format!("{}:{}", at.service, at.name));
            assert!(path.len() < 20, "{path:?}");
        }
        assert_eq!(at.id, root.id, "uploader span not under the document's root: {path:?}");
        // uploader ← inferencer ← splitter page ← splitter ← ingress.
        assert!(path.iter().any(|p| p == "pagestream-inferencer:inferencer"), "{path:?}");
        assert!(path.iter().any(|p| p == "pagestream-splitter:render"), "{path:?}");
    }

    // A client that traces its own work sends `traceparent` with the upload:
    // the document's spans join the client's trace, under the client's span.
    let (client_trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{client_trace}-{client_span}-01");
    let pdf = std::fs::read(corpus("scan_cardinal-rotated.pdf")).unwrap();
    let resp = client
        .raw(
            http::Method::POST,
            "/v1/documents",
            &[("content-type", "application/pdf"), ("traceparent", &traceparent)],
            pagestream::client::full(pdf),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let traced: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let traced = traced["id"].as_str().unwrap().to_string();
    pagestream_e2e::wait_terminal(&client, &traced, Duration::from_secs(180)).await.unwrap();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = span_log.lock().unwrap().clone();
        let submit = all.iter().find(|s| s.name == "submit" && s.attrs.get("doc_id") == Some(&traced));
        let uploaded = all
            .iter()
            .filter(|s| s.service == "pagestream-uploader" && s.attrs.get("doc_id") == Some(&traced))
            .collect::<Vec<_>>();
        if let (Some(submit), false) = (submit, uploaded.is_empty()) {
            assert_eq!((hex(&submit.trace), hex(&submit.parent)), (client_trace.into(), client_span.into()));
            assert!(uploaded.iter().all(|s| hex(&s.trace) == client_trace), "uploader spans in the client's trace");
            break;
        }
        assert!(Instant::now() < deadline, "no submit and uploader spans of {traced}: {}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
