//! Tracing across stages: with `PAGESTREAM_OTLP_ENDPOINT` set, the four
//! stage processes export OTLP/HTTP protobuf to a receiver in this test, and
//! a document is one trace — the ingress's `submit` span at its root, a span
//! per page per stage below it, linked through the `traceparent` header of
//! each NATS message; with a `traceparent` on the upload, under the
//! client's span.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Request;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use pagestream_e2e::api::submit;
use pagestream_e2e::http::{answer, serve};
use pagestream_e2e::procs::{Stages, STAGES};
use pagestream_e2e::{corpus, init_logging, wait};
use pagestream_pipeline::embedded::free_port;
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
    serve(port, move |req: Request<Incoming>| {
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
            answer(200, "")
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_is_one_trace_from_ingress_to_uploader() {
    init_logging();
    let (spans, requests) = (Arc::new(Mutex::new(Vec::<Span>::new())), Arc::new(Mutex::new(Vec::new())));
    let otlp = free_port().unwrap();
    tokio::spawn(receiver(otlp, spans.clone(), requests.clone()));
    let span_log = spans.clone();

    let extra = [
        ("PAGESTREAM_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp}")),
        // Export every 200 ms instead of every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "200".into()),
    ];
    let s = Stages::start("traces", &STAGES, &extra, Duration::from_secs(90)).await;
    let (client, cluster) = (&s.client, &s.cluster);
    let id = submit(client, &corpus("scan_cardinal-rotated.pdf"), &[]).await;
    let st = pagestream_e2e::wait_terminal(client, &id, Duration::from_secs(180)).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    let pages = st["page_count"].as_u64().unwrap();

    // The uploader's span of every page reaches the receiver.
    let of_doc = |spans: &[Span]| -> Vec<Span> {
        spans.iter().filter(|s| s.attrs.get("doc_id") == Some(&id)).cloned().collect()
    };
    let received = async || {
        let all = spans.lock().unwrap().clone();
        let uploaded =
            of_doc(&all).iter().filter(|s| s.service == "pagestream-uploader" && s.attrs.contains_key("page")).count();
        if uploaded as u64 >= pages {
            return Ok(all);
        }
        Err(format!("{uploaded} of {pages} uploader page spans received; requests {:?}", requests.lock().unwrap()))
    };
    let spans =
        wait::until_with(Duration::from_secs(30), Duration::from_millis(200), received, || cluster.log_tails()).await;
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
    pagestream_e2e::wait_terminal(client, &traced, Duration::from_secs(180)).await.unwrap();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let joined = async || {
        let all = span_log.lock().unwrap().clone();
        let submit = all.iter().find(|s| s.name == "submit" && s.attrs.get("doc_id") == Some(&traced));
        let uploaded = all
            .iter()
            .filter(|s| s.service == "pagestream-uploader" && s.attrs.get("doc_id") == Some(&traced))
            .collect::<Vec<_>>();
        if let (Some(submit), false) = (submit, uploaded.is_empty()) {
            assert_eq!((hex(&submit.trace), hex(&submit.parent)), (client_trace.into(), client_span.into()));
            assert!(uploaded.iter().all(|s| hex(&s.trace) == client_trace), "uploader spans in the client's trace");
            return Ok(());
        }
        Err(format!("no submit and uploader spans of {traced}"))
    };
    wait::until_with(Duration::from_secs(30), Duration::from_millis(200), joined, || cluster.log_tails()).await;
}
