//! `GET /v1/documents/{id}/events`: Server-Sent Events.
//!
//! One ordered JetStream consumer per client replays the document's events
//! from the events stream and follows it live. Every SSE event carries the
//! stream sequence as its `id`, so a client that reconnects with
//! `Last-Event-ID` resumes after it; the replay before that point still
//! runs (silently), so the counts in every event are exact. Event types:
//!
//! - `page`: a page reached `rendered`, `inferred`, `uploaded` or `failed`;
//!   an `uploaded` one carries `results` (`image_url`, `detections_url`)
//!   and, with `?detections=1`, the page's `detections`;
//! - `state`: the document changed state (`queued`, `running`, then one
//!   terminal state), after which the stream ends.
//!
//! A subject seen twice (a republish after the deduplication window) is
//! ignored, so counts never exceed `page_count` and never go backwards.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use pagestream_pipeline::progress::{DocState, PageCounts};
use pagestream_schemas::{decode, Event, EventState};
use tokio::sync::mpsc;

use crate::error::{ApiError, Resp};
use crate::{Caller, Ingress};

/// A comment line this often keeps proxies and clients from timing out.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// A client that reads nothing for this long (its buffer full) is dropped,
/// with its consumer and task.
const STALLED: Duration = Duration::from_secs(60);

/// Queues one frame for the client; `false` when the client is gone or has
/// stopped reading for [`STALLED`].
async fn send(tx: &mpsc::Sender<Bytes>, frame: Bytes) -> bool {
    matches!(tokio::time::timeout(STALLED, tx.send(frame)).await, Ok(Ok(())))
}

/// What the stream has seen so far.
#[derive(Debug, Default)]
pub struct Tally {
    pub state: Option<DocState>,
    pub page_count: Option<u32>,
    pub pages: PageCounts,
    seen: HashSet<String>,
}

impl Tally {
    /// Folds one event in; returns the SSE event type and JSON to send, or
    /// `None` when it changes nothing a client can see.
    pub fn apply(&mut self, subject: &str, seq: u64, ev: &Event) -> Option<(&'static str, serde_json::Value)> {
        if !self.seen.insert(subject.to_string()) {
            return None;
        }
        let kind = if ev.page.is_some() {
            match ev.state {
                EventState::Rendered => self.pages.rendered += 1,
                EventState::Inferred => self.pages.inferred += 1,
                EventState::Uploaded => self.pages.uploaded += 1,
                EventState::Failed => self.pages.failed += 1,
                _ => return None,
            }
            "page"
        } else {
            if let Some(n) = ev.info.as_ref().and_then(|i| i.page_count) {
                self.page_count = Some(n);
            }
            let before = self.state.unwrap_or(DocState::Queued);
            let after = before.after(ev.state, ev.info.as_ref().and_then(|i| i.status));
            if self.state == Some(after) {
                return None;
            }
            self.state = Some(after);
            "state"
        };
        let mut data = serde_json::json!({
            "seq": seq,
            "doc_id": ev.doc_id,
            "state": self.state.unwrap_or(DocState::Queued),
            "page_count": self.page_count,
            "pages": self.pages,
            "stage": ev.stage,
            "at": ev.at,
        });
        if let Some(page) = ev.page {
            data["page"] = page.into();
            data["page_state"] = ev.state.as_str().into();
            if let Some(ms) = ev.ms {
                data["ms"] = ms.into();
            }
        }
        if let Some(err) = &ev.error {
            data["error"] = serde_json::json!(err);
        }
        if kind == "state" {
            if let Some(m) = ev.info.as_ref().and_then(|i| i.manifest.as_ref()) {
                data["manifest"] = m.clone().into();
            }
        }
        Some((kind, data))
    }

    pub fn finished(&self) -> bool {
        self.state.is_some_and(DocState::is_terminal)
    }
}

fn sse_frame(id: u64, kind: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("id: {id}\nevent: {kind}\ndata: {data}\n\n"))
}

impl Ingress {
    pub(crate) async fn events(&self, caller: &Caller, id: &str, req: &Request<Incoming>) -> Result<Resp, ApiError> {
        // Exists, and this caller may see it.
        self.read_status(caller, id, false).await?;
        let last_id = match req.headers().get("last-event-id").map(|v| v.to_str().map(str::parse::<u64>)) {
            None => 0,
            Some(Ok(Ok(n))) => n,
            Some(_) => return Err(ApiError::bad_request("invalid_last_event_id", "Last-Event-ID must be an event id")),
        };
        // A slot first: at most `ingress.max_event_streams` streams (each a
        // consumer and a task) exist at once.
        let slot = self.event_streams.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                format!(
                    "{} live event streams are open (ingress.max_event_streams); poll GET /v1/documents/{id} or retry later",
                    self.cfg.ingress.max_event_streams
                ),
            )
        })?;
        // …and one of this token's: a single client cannot take them all.
        let token_slot = self.token_streams.acquire(caller.owner.as_deref()).map_err(|max| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!(
                    "this token has {max} live event streams open (ingress.max_event_streams_per_token); close one, or poll GET /v1/documents/{id}"
                ),
            )
        })?;
        let with_detections = crate::url_query(req.uri().query().unwrap_or(""))
            .iter()
            .any(|(k, v)| k == "detections" && matches!(v.as_str(), "1" | "true"));
        let results = self.results.clone();
        let keys = self.keys(id);
        let names = &self.ctx.names;
        let stream = self
            .ctx
            .js
            .get_stream(names.events_stream())
            .await
            .map_err(|e| ApiError::unavailable(format!("events stream: {e}")))?;
        let filter = names.doc_events(id);
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                ..Default::default()
            })
            .await
            .map_err(|e| ApiError::unavailable(format!("following events failed: {e}")))?;
        let mut messages =
            consumer.messages().await.map_err(|e| ApiError::unavailable(format!("following events failed: {e}")))?;

        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let shutdown = self.shutdown.clone();
        let doc_id = id.to_string();
        let open = self.ctx.metrics.sse_client();
        tokio::spawn(async move {
            let _slots = (slot, token_slot, open);
            let mut tally = Tally::default();
            let mut keepalive = tokio::time::interval(KEEPALIVE);
            keepalive.tick().await;
            if !send(&tx, Bytes::from_static(b"retry: 2000\n\n")).await {
                return;
            }
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tx.closed() => break,
                    _ = keepalive.tick() => {
                        if !send(&tx, Bytes::from_static(b": keepalive\n\n")).await { break }
                        continue;
                    }
                    m = messages.next() => m,
                };
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::warn!(doc_id, error = %e, "event stream interrupted");
                        break;
                    }
                    None => break,
                };
                let Ok(info) = msg.info() else { continue };
                let seq = info.stream_sequence;
                let Ok(ev) = decode::<Event>(&msg.payload) else { continue };
                let fresh = tally.apply(msg.subject.as_str(), seq, &ev).filter(|_| seq > last_id);
                if let Some((kind, mut data)) = fresh {
                    if let (Some(page), EventState::Uploaded) = (ev.page, ev.state) {
                        // The page's files are written: where to get them.
                        data["results"] = serde_json::json!({
                            "image_url": format!("/v1/documents/{doc_id}/results/pages/{page}.png"),
                            "detections_url": format!("/v1/documents/{doc_id}/results/pages/{page}.json"),
                        });
                        if with_detections {
                            data["detections"] = match results.get(&keys.page_json(page)).await {
                                Ok(Some(bytes)) => serde_json::from_slice::<serde_json::Value>(&bytes)
                                    .map(|mut v| v["detections"].take())
                                    .unwrap_or_default(),
                                _ => serde_json::Value::Null,
                            };
                        }
                    }
                    if !send(&tx, sse_frame(seq, kind, &data)).await {
                        break;
                    }
                }
                if tally.finished() {
                    break;
                }
            }
        });
        let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
        }));
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "text/event-stream")
            .header(http::header::CACHE_CONTROL, "no-cache")
            .header("x-accel-buffering", "no")
            .body(BodyExt::boxed(body))
            .expect("valid response"))
    }
}

#[cfg(test)]
mod tests {
    use pagestream_schemas::{DocInfo, VERSION};

    use super::*;

    fn ev(state: EventState, page: Option<u32>, info: Option<DocInfo>) -> Event {
        Event {
            v: VERSION,
            doc_id: "d".into(),
            stage: "s".into(),
            state,
            page,
            error: None,
            info,
            ms: Some(3.0),
            at: "t".into(),
        }
    }

    #[test]
    fn tally_counts_each_subject_once_and_ends_at_the_first_terminal_state() {
        let mut t = Tally::default();
        assert_eq!(t.apply("q", 1, &ev(EventState::Queued, None, None)).unwrap().0, "state");
        let split = DocInfo { page_count: Some(2), ..DocInfo::default() };
        let (kind, data) = t.apply("s", 2, &ev(EventState::Split, None, Some(split))).unwrap();
        assert_eq!((kind, data["state"].as_str()), ("state", Some("running")));
        assert_eq!(t.apply("r1", 3, &ev(EventState::Rendered, Some(1), None)).unwrap().0, "page");
        assert!(t.apply("r1", 9, &ev(EventState::Rendered, Some(1), None)).is_none(), "a republished subject");
        assert_eq!(t.pages.rendered, 1);
        let (_, data) = t.apply("u1", 4, &ev(EventState::Uploaded, Some(1), None)).unwrap();
        assert_eq!(data["pages"]["uploaded"], 1);
        assert_eq!(data["ms"], 3.0);
        assert!(!t.finished());
        let done = DocInfo { status: Some(pagestream_schemas::FinalStatus::CompletedWithErrors), ..DocInfo::default() };
        let (_, data) = t.apply("c", 5, &ev(EventState::Completed, None, Some(done))).unwrap();
        assert_eq!(data["state"], "completed_with_errors");
        assert!(t.finished());
    }
}
