//! Tenants (API tokens sharing one pipeline) cannot read each other's
//! documents or take each other's share, with real servers:
//!
//! - a document whose `queued` event (the one naming its owner) the events
//!   stream discarded stays private: another token gets 404 on status,
//!   results, events and cancel and does not list it; its owner still
//!   sees it (issue #22, finding 2);
//! - a document whose whole history is gone mid-run still completes, for
//!   its owner only (stage processes: the uploader starts after the
//!   events are deleted);
//! - quotas: `tenants.max_documents` and `tenants.pages_per_hour` refuse
//!   with 429, `Retry-After` and the setting's name, and a refusal stores
//!   nothing (blob store at its baseline, no idempotency claim); concurrent
//!   submissions over the limit admit exactly the limit;
//! - `GET /v1/capacity` shows each token its usage against its limits (an
//!   admin token every tenant), the queue and the measured throughput;
//! - `s3://` sources are granted per token by prefix
//!   (`tenants.source_prefixes`, finding 5).
//!
//! The second test runs stage processes: `cargo build --bins` first.

use std::time::Duration;

use pagestream::client::ApiClient;
use pagestream::Config;
use pagestream_e2e::api::{self, status, submit};
use pagestream_e2e::procs::Stages;
use pagestream_e2e::{corpus, stream_state, wait, wait_terminal, Harness, MotoServer};
use pagestream_pipeline::nats::Names;
use pagestream_pipeline::progress::subject_counts;
use pagestream_pipeline::tenants::owner_id;
use pagestream_schemas::{decode, Event, EventState};
use serde_json::Value;

const A: &str = "token-of-tenant-a";
const B: &str = "token-of-tenant-b";
const ADMIN: &str = "token-of-the-operator";
/// A small real PDF (4 pages).
const SMALL: &str = "scan_cardinal-rotated.pdf";

fn tokens(c: &mut Config) {
    c.ingress.api_tokens = vec![A.into(), B.into()];
    c.ingress.admin_tokens = vec![ADMIN.into()];
}

fn client(base: &str, token: &str) -> ApiClient {
    ApiClient::new(base).with_token(Some(token.into()))
}

/// Ids in a token's list of documents.
async fn listed(c: &ApiClient) -> Vec<String> {
    let ans = c.get("/v1/documents?limit=100").await.unwrap();
    assert_eq!(ans.status, 200, "{}", ans.json);
    ans.json["documents"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect()
}

/// What `token` gets for each read and for cancel of `id`.
async fn answers(c: &ApiClient, id: &str) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for path in [
        format!("/v1/documents/{id}"),
        format!("/v1/documents/{id}/results"),
        format!("/v1/documents/{id}/results/manifest.json"),
        format!("/v1/documents/{id}/results/pages/1.json"),
        format!("/v1/documents/{id}/events"),
    ] {
        let status = c.get(&path).await.unwrap().status.as_u16();
        out.push((format!("GET {path}"), status));
    }
    out.push((
        format!("DELETE /v1/documents/{id}"),
        c.delete(&format!("/v1/documents/{id}")).await.unwrap().status.as_u16(),
    ));
    out
}

/// Deletes the document-level events of `id` in `states` (as the events
/// stream does when it discards its oldest messages); returns how many.
async fn evict(js: &async_nats::jetstream::Context, names: &Names, id: &str, states: &[EventState]) -> usize {
    let stream = js.get_stream(names.events_stream()).await.unwrap();
    let mut n = 0;
    for state in states {
        if let Ok(msg) = stream.get_last_raw_message_by_subject(&names.doc_event(id, *state)).await {
            assert!(stream.delete_message(msg.sequence).await.unwrap());
            n += 1;
        }
    }
    n
}

/// The owners the document-level events still stored name.
async fn owners_in_events(js: &async_nats::jetstream::Context, names: &Names, id: &str) -> Vec<Option<String>> {
    let stream = js.get_stream(names.events_stream()).await.unwrap();
    let mut out = Vec::new();
    for subject in subject_counts(&stream, &names.doc_events_only(id)).await.unwrap().keys() {
        let raw = stream.get_last_raw_message_by_subject(subject).await.unwrap();
        let ev: Event = decode(&raw.payload).unwrap();
        out.push(ev.info.and_then(|i| i.owner));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_whose_queued_event_is_gone_stays_private() {
    let h = Harness::start(tokens).await.unwrap();
    let base = h.client.base().to_string();
    let (a, b, admin) = (client(&base, A), client(&base, B), client(&base, ADMIN));
    let id = submit(&a, &corpus(SMALL), &[]).await;
    let done = wait_terminal(&a, &id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    let whole = answers(&b, &id).await;
    assert!(whole.iter().all(|(_, s)| *s == 404), "B reads A's document while its history is whole: {whole:?}");

    let (js, names) = (&h.pipeline.ctx.js, &h.pipeline.ctx.names);
    assert_eq!(evict(js, names, &id, &[EventState::Queued]).await, 1);
    let left = owners_in_events(js, names, &id).await;
    assert!(!left.is_empty() && left.iter().all(Option::is_none), "no stored event names the owner now: {left:?}");
    let after = answers(&b, &id).await;
    println!("token B on A's document, its queued event discarded: {after:?}");
    assert!(after.iter().all(|(_, s)| *s == 404), "B reads A's evicted document: {after:?}");
    assert!(!listed(&b).await.contains(&id), "B lists A's evicted document");

    // Its owner and the operator still see it, finished.
    let st = a.get(&format!("/v1/documents/{id}")).await.unwrap();
    assert_eq!((st.status.as_u16(), st.json["state"].as_str()), (200, Some("completed")), "{}", st.json);
    assert!(listed(&a).await.contains(&id));
    assert_eq!(admin.get(&format!("/v1/documents/{id}")).await.unwrap().status, 200);
    assert!(listed(&admin).await.contains(&id));
    let results = a.get(&format!("/v1/documents/{id}/results")).await.unwrap();
    assert_eq!(results.status, 200, "{}", results.json);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_whose_whole_history_is_gone_mid_run_completes_for_its_owner_only() {
    let prefix = "tenantsgone";
    let tokens = [("PAGESTREAM_INGRESS_API_TOKENS", format!("{A},{B}"))];
    // No uploader yet: the pages wait, inferred, in their stream.
    let mut s = Stages::start(prefix, &["ingress", "splitter", "inferencer"], &tokens, Duration::from_secs(60)).await;
    let (a, b) = (client(s.client.base(), A), client(s.client.base(), B));
    let id = submit(&a, &corpus(SMALL), &[]).await;
    let pages = wait::until(Duration::from_secs(180), Duration::from_millis(200), async || {
        let st = status(&a, &id).await;
        if let Some(n) = st["page_count"].as_u64().filter(|n| st["pages"]["inferred"].as_u64() == Some(*n)) {
            return Ok(n);
        }
        Err(format!("pages not inferred: {st}"))
    })
    .await;

    let js = s.js().await;
    let names = Names::new(prefix);
    let gone = evict(&js, &names, &id, &[EventState::Queued, EventState::Split]).await;
    assert_eq!(gone, 2);
    assert!(owners_in_events(&js, &names, &id).await.is_empty(), "no document-level event is left");
    let st = a.get(&format!("/v1/documents/{id}")).await.unwrap();
    println!("owner, history gone: {} {}", st.status, st.json["state"]);
    assert_eq!(st.status, 200, "the owner still sees its document: {}", st.json);
    let other = answers(&b, &id).await;
    assert!(other.iter().all(|(_, s)| *s == 404), "B reads A's document without history: {other:?}");

    s.cluster.procs.push(s.cluster.spawn("uploader", 0, None));
    let done = wait_terminal(&a, &id, Duration::from_secs(120)).await.unwrap();
    println!("after the uploader started: {done}");
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["page_count"].as_u64(), Some(pages));
    assert_eq!(done["pages"]["uploaded"].as_u64(), Some(pages));
    assert!(answers(&b, &id).await.iter().all(|(_, s)| *s == 404));
    assert!(!listed(&b).await.contains(&id) && listed(&a).await.contains(&id));
}

/// Messages and bytes in the blob store's stream.
async fn blob_store(h: &Harness) -> (u64, u64) {
    stream_state(&h.pipeline.ctx.js, format!("OBJ_{}", h.pipeline.ctx.names.blob_bucket())).await
}

/// Submits SMALL waiting for a model nobody serves: it stays queued.
async fn submit_waiting(c: &ApiClient, key: Option<&str>) -> (u16, Value, Option<String>) {
    let pdf = corpus(SMALL);
    let opts = [("model", "nobody_serves_this"), ("wait_for_model", "true")];
    let resp = c
        .raw(
            http::Method::POST,
            &format!("/v1/documents?model={}&wait_for_model={}", opts[0].1, opts[1].1),
            &[("content-type", "application/pdf")]
                .into_iter()
                .chain(key.map(|k| ("idempotency-key", k)))
                .collect::<Vec<_>>(),
            pagestream::client::full(std::fs::read(pdf).unwrap()),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), retry)
}

fn tenant_row<'a>(capacity: &'a Value, tenant: &str) -> &'a Value {
    capacity["tenants"].as_array().unwrap().iter().find(|t| t["tenant"] == tenant).unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_with_429_store_nothing_and_capacity_shows_usage() {
    let (ta, tb) = (owner_id(A), owner_id(B));
    let h = Harness::start(|c| {
        tokens(c);
        c.tenants.overrides = vec![format!("{ta} max_documents=2"), format!("{tb} pages_per_hour=1")];
    })
    .await
    .unwrap();
    let base = h.client.base().to_string();
    let (a, b, admin) = (client(&base, A), client(&base, B), client(&base, ADMIN));

    // max_documents: two documents that wait, then a third.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let (status, body, _) = submit_waiting(&a, None).await;
        assert_eq!(status, 202, "{body}");
        waiting.push(body["id"].as_str().unwrap().to_string());
    }
    let cap = a.get("/v1/capacity").await.unwrap();
    assert_eq!(cap.status, 200, "{}", cap.json);
    println!("A's capacity at its limit: {}", cap.json);
    assert_eq!(cap.json["tenant"], ta.as_str());
    assert_eq!(cap.json["tenants"].as_array().unwrap().len(), 1, "a token sees its own tenant only");
    let row = tenant_row(&cap.json, &ta);
    assert_eq!(row["limits"]["max_documents"], 2, "{row}");
    assert_eq!(row["usage"]["documents"], 2, "{row}");
    assert!(cap.json["queue"]["documents"].as_u64().unwrap() >= 2, "{}", cap.json);

    let baseline = blob_store(&h).await;
    let (status, body, retry) = submit_waiting(&a, Some("third")).await;
    println!("A's third document: {status} {body} Retry-After {retry:?}");
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "quota_documents", "{body}");
    assert_eq!(body["error"]["setting"], "tenants.max_documents", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("tenants.max_documents"));
    assert!(retry.and_then(|r| r.parse::<u64>().ok()).is_some_and(|r| r >= 1), "Retry-After in seconds");
    assert_eq!(blob_store(&h).await, baseline, "a refused upload left data in the blob store");
    // Another tenant is not affected by A's quota.
    let (status, body, _) = submit_waiting(&client(&base, ADMIN), None).await;
    assert_eq!(status, 202, "{body}");
    let admin_doc = body["id"].as_str().unwrap().to_string();

    // A document that ends frees its place; the refused key was never claimed.
    let cancelled = a.delete(&format!("/v1/documents/{}", waiting[0])).await.unwrap();
    assert_eq!(cancelled.status, 202, "{}", cancelled.json);
    let row = tenant_row(&a.get("/v1/capacity").await.unwrap().json, &ta).clone();
    assert_eq!(row["usage"]["documents"], 1, "{row}");
    let (status, body, _) = submit_waiting(&a, Some("third")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "queued", "a fresh document, not a replay: {body}");
    waiting.push(body["id"].as_str().unwrap().to_string());

    // Concurrent submissions over the limit: exactly the free places.
    for id in &waiting[1..] {
        assert_eq!(a.delete(&format!("/v1/documents/{id}")).await.unwrap().status, 202);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let a = a.clone();
        tasks.spawn(async move { submit_waiting(&a, None).await });
    }
    let mut admitted = Vec::new();
    let mut refused = 0;
    while let Some(r) = tasks.join_next().await {
        let (status, body, _) = r.unwrap();
        match status {
            202 => admitted.push(body["id"].as_str().unwrap().to_string()),
            429 => refused += 1,
            other => panic!("unexpected {other}: {body}"),
        }
    }
    println!("6 concurrent submissions against max_documents=2: {} admitted, {refused} refused", admitted.len());
    assert_eq!((admitted.len(), refused), (2, 4));
    for id in admitted.iter().chain([&admin_doc]) {
        let c = if *id == admin_doc { &admin } else { &a };
        assert_eq!(c.delete(&format!("/v1/documents/{id}")).await.unwrap().status, 202);
    }

    // pages_per_hour: B's first document is counted when split.
    let first = b.submit_file(&corpus(SMALL), None).await.unwrap();
    assert_eq!(first.status, 202, "{}", first.json);
    let done = wait_terminal(&b, first.json["id"].as_str().unwrap(), Duration::from_secs(120)).await.unwrap();
    let pages = done["page_count"].as_u64().unwrap();
    let baseline = blob_store(&h).await;
    let over = b.submit_file(&corpus(SMALL), None).await.unwrap();
    println!("B's second document after {pages} pages within the hour: {} {}", over.status, over.json);
    assert_eq!(over.status, 429, "{}", over.json);
    assert_eq!(over.json["error"]["code"], "quota_pages_per_hour");
    assert_eq!(over.json["error"]["setting"], "tenants.pages_per_hour");
    assert_eq!(over.json["error"]["used"].as_u64(), Some(pages));
    let retry = over.json["error"]["retry_after_secs"].as_u64().unwrap();
    assert!((3000..=3600).contains(&retry), "the first pages leave the hour in about an hour: {retry}");
    assert_eq!(blob_store(&h).await, baseline);

    let cap = b.get("/v1/capacity").await.unwrap().json;
    println!("B's capacity: {cap}");
    let row = tenant_row(&cap, &tb);
    assert_eq!(
        (row["limits"]["pages_per_hour"].as_u64(), row["usage"]["pages_last_hour"].as_u64()),
        (Some(1), Some(pages))
    );
    assert!(cap["throughput"]["pages"].as_u64().unwrap() >= pages, "{cap}");
    assert!(cap["throughput"]["pages_per_sec"].as_f64().unwrap() > 0.0, "{cap}");
    assert!(cap["estimated_wait_secs"].is_number(), "{cap}");
    // The operator sees every tenant with a limit or work.
    let all = admin.get("/v1/capacity").await.unwrap().json;
    assert!(tenant_row(&all, &ta).is_object() && tenant_row(&all, &tb).is_object(), "{all}");
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_sources_are_granted_per_token_by_prefix() {
    let moto = MotoServer::start().unwrap();
    let s3 = moto.bucket("docs").await.unwrap();
    let pdf = std::fs::read(corpus(SMALL)).unwrap();
    for key in ["a/paper.pdf", "b/paper.pdf"] {
        s3.put_object()
            .bucket("docs")
            .key(key)
            .body(aws_sdk_s3::primitives::ByteStream::from(pdf.clone()))
            .send()
            .await
            .unwrap();
    }
    let ta = owner_id(A);
    let h = Harness::start(|c| {
        tokens(c);
        moto.source_for(c, "docs");
        c.tenants.overrides = vec![format!("{ta} source_prefixes=s3://docs/a/")];
    })
    .await
    .unwrap();
    let base = h.client.base().to_string();
    let by_url = async |token: &str, url: &str| api::by_url(&client(&base, token), url, None).await;
    let (status, body) = by_url(A, "s3://docs/a/paper.pdf").await;
    assert_eq!(status, 202, "A reads below its prefix: {body}");
    let id = body["id"].as_str().unwrap().to_string();
    for (token, url) in [(A, "s3://docs/b/paper.pdf"), (A, "s3://docs/a-sibling.pdf"), (B, "s3://docs/a/paper.pdf")] {
        let (status, body) = by_url(token, url).await;
        println!("{token} → {url}: {status} {body}");
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["code"], "invalid_reference", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("tenants.source_prefixes"), "{body}");
    }
    // The operator's token reads the whole bucket list.
    let (status, body) = by_url(ADMIN, "s3://docs/b/paper.pdf").await;
    assert_eq!(status, 202, "{body}");
    let done = wait_terminal(&client(&base, A), &id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    h.stop().await.unwrap();
}
