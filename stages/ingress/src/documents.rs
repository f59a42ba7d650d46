//! Documents: submit (with `Idempotency-Key`), list, status, cancel.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use futures::TryStreamExt;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pagestream_pipeline::blob::upload_key;
use pagestream_pipeline::progress::{list_documents, publish_message, DocState, DocStatus};
use pagestream_pipeline::records::DocRecords;
use pagestream_pipeline::registry::ModelChoice;
use pagestream_pipeline::tenants::ANONYMOUS;
use pagestream_pipeline::util::now_rfc3339;
use pagestream_results::layout::Keys;
use pagestream_schemas::{
    validate_doc_id, DocInfo, DocumentCancelled, DocumentSubmitted, EventState, FinalStatus, InvalidOption,
    OptionValue, Source, SourceRef, SubmitOptions, SubmitRequest, VERSION,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{json_response, ApiError, Resp};
use crate::upload::{self, form_budget, multipart_error, paced};
use crate::{url_query, Caller, Ingress, STAGE};

/// An `Idempotency-Key` whose document has not appeared after this long is
/// considered abandoned (the first request died) and may be claimed again.
const IDEMPOTENCY_STALE: Duration = Duration::from_secs(600);

/// Most documents one list page returns.
pub const MAX_LIMIT: usize = 100;
/// Most status reads one list page may make (documents filtered out by
/// state or owner cost one each); past it the page ends with a cursor.
pub const MAX_LIST_READS: usize = 1000;

/// Longest `title` and `filename`, in characters (the submission's rules,
/// `pagestream_schemas::SubmitRequest`).
pub use pagestream_schemas::{MAX_FILENAME_CHARS, MAX_TITLE_CHARS};

/// An option refused by the submission's rules: 422 `invalid_option`.
impl From<InvalidOption> for ApiError {
    fn from(e: InvalidOption) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_option", e.message)
    }
}

/// The outcome of presenting an `Idempotency-Key`.
enum Claim {
    /// No key sent.
    None,
    /// This request owns the key (stored under `kv_key`).
    Owned(String),
    /// An earlier request with the same key created this document.
    Replay(String),
}

#[derive(Serialize, serde::Deserialize)]
struct IdempotencyRecord {
    doc_id: String,
}

fn doc_urls(id: &str) -> serde_json::Value {
    serde_json::json!({
        "status_url": format!("/v1/documents/{id}"),
        "events_url": format!("/v1/documents/{id}/events"),
        "results_url": format!("/v1/documents/{id}/results"),
    })
}

/// The public JSON of a document's status.
pub fn status_json(s: &DocStatus) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": s.doc_id,
        "state": s.state,
        "title": s.info.title,
        "filename": s.info.filename,
        "bytes": s.info.bytes,
        "sha256": s.info.sha256,
        "model": s.info.model,
        "model_sha256": s.info.model_sha256,
        "page_count": s.page_count,
        "pages": s.pages,
        "failed_pages": s.failed_pages,
        "error": s.error,
        "queued_at": s.queued_at,
        "started_at": s.started_at,
        "finished_at": s.finished_at,
        "manifest": s.info.manifest,
    });
    if let (Some(obj), serde_json::Value::Object(urls)) = (v.as_object_mut(), doc_urls(&s.doc_id)) {
        obj.extend(urls);
    }
    v
}

/// Whether a document whose tenant index says `indexed` may now be in
/// state `want` (the index may lag the events, never lead them; the first
/// terminal state sticks).
fn may_become(indexed: DocState, want: DocState) -> bool {
    let rank = |s: DocState| if s.is_terminal() { 2 } else { u8::from(s == DocState::Running) };
    if indexed.is_terminal() {
        indexed == want
    } else {
        rank(want) >= rank(indexed)
    }
}

fn check_id(id: &str) -> Result<(), ApiError> {
    validate_doc_id(id).map_err(|e| ApiError::bad_request("invalid_id", e.to_string()))
}

fn unavailable<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> ApiError + '_ {
    move |e| ApiError::unavailable(format!("{what} failed: {e:#}"))
}

impl Ingress {
    /// A `callback_url` needs webhooks on (`notifier.secret`) and a URL the
    /// notifier may call: 422 `invalid_callback` otherwise.
    fn check_callback(&self, opts: &SubmitOptions) -> Result<(), ApiError> {
        let invalid = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_callback", m);
        let Some(url) = &opts.callback_url else {
            if opts.callback_events.is_some() {
                return Err(invalid("callback_events needs a callback_url".into()));
            }
            return Ok(());
        };
        let cfg = &self.cfg.webhooks;
        if !cfg.on() {
            return Err(invalid(
                "webhooks are off on this server (no notifier.secret): submit without callback_url, or ask its operator"
                    .into(),
            ));
        }
        cfg.policy().check_url(url).map_err(invalid)
    }

    /// [`status_json`], plus `waiting_for_model` (the model's name) while an
    /// unfinished document's model has no live replica: its pages wait.
    fn live_status_json(&self, s: &DocStatus) -> serde_json::Value {
        let mut json = status_json(s);
        if let Some(model) = s.info.model.as_deref().filter(|_| !s.state.is_terminal()) {
            if self.live.get(model).is_none() {
                json["waiting_for_model"] = serde_json::Value::String(model.to_string());
            }
        }
        json
    }

    /// The document's status, if `caller` may see it (404 otherwise, as
    /// for a document that does not exist: ids of others are not revealed).
    /// Ownership is the durable record's ([`Caller::sees`]), so a document
    /// whose `queued` event the events stream discarded stays private.
    pub(crate) async fn read_status(&self, caller: &Caller, id: &str, details: bool) -> Result<DocStatus, ApiError> {
        check_id(id)?;
        self.ctx
            .status_with_record(id, details)
            .await
            .map_err(unavailable("reading progress"))?
            .filter(|(st, record)| caller.sees(st, record.as_ref()))
            .map(|(st, _)| st)
            .ok_or_else(|| ApiError::not_found(format!("no document {id}")))
    }

    pub(crate) async fn status(&self, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
        let status = self.read_status(caller, id, true).await?;
        let mut json = self.live_status_json(&status);
        json["timings"] = serde_json::to_value(status.timings()).expect("timings serialise");
        if let (Some(cb), Some(store)) = (&status.info.callback, &self.callbacks) {
            let mut v = store.summary(id).await.map_err(unavailable("reading webhook deliveries"))?;
            v["url"] = cb.url.clone().into();
            v["events"] = cb.events.as_str().into();
            json["callback"] = v;
        }
        Ok(json_response(StatusCode::OK, &json))
    }

    /// `GET /v1/documents?status=&limit=&cursor=`: newest first (ids the
    /// ingress assigns are UUIDv7, so id order is submission order); the
    /// cursor is the last id of the previous page.
    pub(crate) async fn list(&self, caller: &Caller, query: &str) -> Result<Resp, ApiError> {
        let (mut want, mut limit, mut cursor) = (None, 20usize, None);
        for (k, v) in url_query(query) {
            match k.as_str() {
                "status" | "state" => {
                    want = Some(DocState::parse(&v).ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_status",
                            format!(
                                "status {v:?} is not one of queued, running, completed, completed_with_errors, failed, cancelled"
                            ),
                        )
                    })?)
                }
                "limit" => {
                    limit = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| ApiError::bad_request("invalid_limit", format!("limit must be 1..={MAX_LIMIT}")))?
                }
                "cursor" => {
                    check_id(&v).map_err(|_| ApiError::bad_request("invalid_cursor", "cursor is not a document id"))?;
                    cursor = Some(v)
                }
                _ => {}
            }
        }
        // doc id -> whether it may be in the wanted state (a pre-filter,
        // before its status is read). Admins list every document with
        // events; a token reads its tenant's index (and the anonymous
        // tenant's: documents published on NATS without an owner), never
        // other tenants' documents.
        let docs: std::collections::BTreeMap<String, bool> = if caller.admin {
            let docs = list_documents(&self.ctx.js, &self.ctx.names).await.map_err(unavailable("listing documents"))?;
            docs.into_iter().map(|(id, states)| (id, want.is_none_or(|w| w.could_be(&states)))).collect()
        } else {
            let records = DocRecords::new(&self.ctx.counters);
            let mut docs = records.documents_of(caller.tenant()).await.map_err(unavailable("listing documents"))?;
            if caller.tenant() != ANONYMOUS {
                let public = records.documents_of(ANONYMOUS).await.map_err(unavailable("listing documents"))?;
                docs.extend(public);
            }
            docs.into_iter().map(|(id, indexed)| (id, want.is_none_or(|w| may_become(indexed, w)))).collect()
        };
        let mut items = Vec::new();
        let mut next_cursor = None;
        let candidates = docs.iter().rev().filter(|(id, _)| cursor.as_ref().is_none_or(|c| id.as_str() < c.as_str()));
        // Status reads one page may cost, whatever the filter hides.
        let mut budget = MAX_LIST_READS;
        let mut examined: Option<&String> = None;
        for (id, possible) in candidates {
            if !possible {
                continue;
            }
            if items.len() == limit || budget == 0 {
                // With the budget spent, the page ends early: the cursor
                // resumes after the last document examined.
                next_cursor = if items.len() == limit {
                    items.last().and_then(|v: &serde_json::Value| v["id"].as_str().map(str::to_string))
                } else {
                    examined.cloned()
                };
                break;
            }
            budget -= 1;
            examined = Some(id);
            let Some((st, record)) =
                self.ctx.status_with_record(id, false).await.map_err(unavailable("reading progress"))?
            else {
                continue; // expired between the listing and the read
            };
            if want.is_none_or(|w| w == st.state) && caller.sees(&st, record.as_ref()) {
                items.push(self.live_status_json(&st));
            }
        }
        Ok(json_response(StatusCode::OK, &serde_json::json!({"documents": items, "next_cursor": next_cursor})))
    }

    /// `DELETE /v1/documents/{id}`: every stage skips the remaining pages;
    /// pages already finished keep their results.
    pub(crate) async fn cancel(&self, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
        let status = self.read_status(caller, id, false).await?;
        if status.state.is_terminal() {
            return Err(ApiError::conflict(
                "already_finished",
                format!("document {id} already finished ({}); nothing to cancel", status.state.as_str()),
            ));
        }
        let key = Keys::new(&self.cfg.results.prefix, id).manifest();
        let info = DocInfo {
            status: Some(FinalStatus::Cancelled),
            manifest: Some(self.results.location(&key)),
            ..DocInfo::default()
        };
        let publish_failed =
            |e: async_nats::Error| ApiError::unavailable(format!("recording the cancellation failed: {e}"));
        self.progress.doc(id, EventState::Cancelled, Some(info), None).await.map_err(publish_failed)?;
        let msg = DocumentCancelled {
            v: VERSION,
            doc_id: id.into(),
            reason: Some("cancelled through the API".into()),
            at: now_rfc3339(),
        };
        publish_message(&self.ctx.js, self.ctx.names.docs_cancelled(), &format!("{id}:cancelled"), &msg)
            .await
            .map_err(publish_failed)?;
        self.ctx.metrics.document(STAGE, "cancelled");
        tracing::info!(doc_id = id, "document cancelled");
        let status = self.read_status(caller, id, true).await?;
        Ok(json_response(StatusCode::ACCEPTED, &status_json(&status)))
    }

    /// Resolves the `Idempotency-Key` header for a new document `doc_id`.
    async fn claim(&self, req: &Request<Incoming>, token: &str, doc_id: &str) -> Result<Claim, ApiError> {
        let Some(raw) = req.headers().get("idempotency-key") else { return Ok(Claim::None) };
        let key = raw.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 255).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
        })?;
        // Keys are scoped per token: two clients cannot collide.
        let kv_key = hex::encode(Sha256::digest(format!("{token}\n{key}")));
        let record = serde_json::to_vec(&IdempotencyRecord { doc_id: doc_id.into() }).expect("record serialises");
        let kv_err = |e: &dyn std::fmt::Display| ApiError::unavailable(format!("idempotency store: {e}"));
        match self.idempotency.create(&kv_key, record.clone().into()).await {
            Ok(_) => return Ok(Claim::Owned(kv_key)),
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(kv_err(&e)),
        }
        let entry = self.idempotency.entry(&kv_key).await.map_err(|e| kv_err(&e))?;
        let Some(entry) = entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put) else {
            // Deleted in between: claim it now.
            return match self.idempotency.create(&kv_key, record.into()).await {
                Ok(_) => Ok(Claim::Owned(kv_key)),
                Err(_) => Err(in_progress()),
            };
        };
        let previous: IdempotencyRecord = serde_json::from_slice(&entry.value).map_err(|e| kv_err(&e))?;
        if self.ctx.status(&previous.doc_id, false).await.map_err(unavailable("reading progress"))?.is_some() {
            return Ok(Claim::Replay(previous.doc_id));
        }
        let age = time::OffsetDateTime::now_utc() - entry.created;
        if age < IDEMPOTENCY_STALE {
            return Err(in_progress());
        }
        // The first request died before queueing its document: take over.
        match self.idempotency.update(&kv_key, record.into(), entry.revision).await {
            Ok(_) => Ok(Claim::Owned(kv_key)),
            Err(_) => Err(in_progress()),
        }
    }

    /// `POST /v1/documents`: the tenant's quotas first (a refusal stores
    /// nothing: no claim, no blob, no event), then the submission.
    pub(crate) async fn submit(&self, req: Request<Incoming>, caller: &Caller) -> Result<Resp, ApiError> {
        let doc_id = uuid::Uuid::now_v7().simple().to_string();
        let reserved = match self.reserve(&req, caller, &doc_id).await {
            Ok(reserved) => reserved,
            Err(refusal) => {
                upload::drain(req.into_body(), self.cfg.ingress.max_upload_bytes, self.pace()).await;
                return Ok(refusal);
            }
        };
        let outcome = self.submit_as(req, caller, doc_id.clone()).await;
        let queued = matches!(&outcome, Ok(r) if r.status() == StatusCode::ACCEPTED && !r.headers().contains_key("idempotent-replayed"));
        if reserved && !queued {
            if let Err(e) = DocRecords::new(&self.ctx.counters).release(caller.tenant(), &doc_id).await {
                tracing::warn!(doc_id, error = %e, "could not withdraw a quota reservation");
            }
        }
        outcome
    }

    /// Checks the caller's tenant against `tenants.pages_per_hour` and
    /// reserves one of its `tenants.max_documents` places for `doc_id`:
    /// `Ok(true)` when a place was reserved (withdrawn unless the document
    /// is queued), `Ok(false)` when none was needed (a replay of an
    /// `Idempotency-Key` already used), else the 429 (or 503) to answer.
    async fn reserve(&self, req: &Request<Incoming>, caller: &Caller, doc_id: &str) -> Result<bool, Resp> {
        if let Some(kv_key) = idempotency_kv_key(req, &caller.token) {
            // A retry of a document already accepted is answered as such.
            if self.idempotency.get(&kv_key).await.ok().flatten().is_some() {
                return Ok(false);
            }
        }
        let tenant = caller.tenant();
        let limits = self.ctx.config.tenants.limits_for(caller.owner.as_deref());
        let records = DocRecords::new(&self.ctx.counters);
        let unavailable = |e: anyhow::Error| ApiError::unavailable(format!("reading quota usage: {e:#}")).response();
        if limits.pages_per_hour > 0 {
            let split = records.pages_within(tenant, HOUR).await.map_err(unavailable)?;
            let used: u64 = split.iter().map(|(_, n)| u64::from(*n)).sum();
            let max = u64::from(limits.pages_per_hour);
            if used >= max {
                // When enough of the oldest pages leave the hour.
                let now = time::OffsetDateTime::now_utc();
                let mut left = used;
                let mut retry = 1;
                for (at, n) in &split {
                    left -= u64::from(*n);
                    if left < max {
                        retry = ((*at + HOUR) - now).whole_seconds().max(1) as u64;
                        break;
                    }
                }
                return Err(quota_refusal(
                    "quota_pages_per_hour",
                    "tenants.pages_per_hour",
                    max,
                    used,
                    retry,
                    format!(
                        "this token's documents had {used} pages split in the last hour; its limit is {max} \
                         (tenants.pages_per_hour); retry in {retry} s"
                    ),
                ));
            }
        }
        let max = limits.max_documents;
        match records.reserve(tenant, doc_id, max).await.map_err(unavailable)? {
            None => Ok(true),
            Some(active) => Err(quota_refusal(
                "quota_documents",
                "tenants.max_documents",
                u64::from(max),
                active as u64,
                QUOTA_DOCUMENTS_RETRY_SECS,
                format!(
                    "this token has {active} documents queued or running; its limit is {max} \
                     (tenants.max_documents); retry when one finishes"
                ),
            )),
        }
    }

    async fn submit_as(&self, req: Request<Incoming>, caller: &Caller, doc_id: String) -> Result<Resp, ApiError> {
        let token = caller.token.as_str();
        let claim = match self.claim(&req, token, &doc_id).await {
            Ok(c) => c,
            Err(e) => {
                upload::drain(req.into_body(), self.cfg.ingress.max_upload_bytes, self.pace()).await;
                return Err(e);
            }
        };
        match claim {
            Claim::Replay(existing) => {
                upload::drain(req.into_body(), self.cfg.ingress.max_upload_bytes, self.pace()).await;
                let mut resp = accepted(&existing, "replayed");
                resp.headers_mut().insert("idempotent-replayed", http::HeaderValue::from_static("true"));
                Ok(resp)
            }
            Claim::Owned(kv_key) => {
                let outcome = self.accept(req, doc_id, caller).await;
                if outcome.is_err() {
                    // Nothing was queued: let the client retry with the same key.
                    let _ = self.idempotency.delete(&kv_key).await;
                }
                outcome
            }
            Claim::None => self.accept(req, doc_id, caller).await,
        }
    }

    /// Streams the upload to the blob store and queues the document, in the
    /// root span of the document's trace (every stage's span descends from
    /// it through the messages' trace context) — or a child of the client's
    /// span when the request carries a `traceparent`.
    async fn accept(&self, req: Request<Incoming>, doc_id: String, caller: &Caller) -> Result<Resp, ApiError> {
        let span = tracing::info_span!("document", otel.name = "submit", otel.kind = "server", doc_id = %doc_id);
        pagestream_pipeline::telemetry::continue_from_http(&span, req.headers());
        self.accept_in_span(req, doc_id, caller).instrument(span).await
    }

    async fn accept_in_span(&self, req: Request<Incoming>, doc_id: String, caller: &Caller) -> Result<Resp, ApiError> {
        let limit = self.cfg.ingress.max_upload_bytes;
        if let Some(len) =
            req.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        {
            // A multipart envelope adds a little; reject only what is clearly over.
            if len > limit + 64 * 1024 {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("upload of {len} bytes exceeds the limit of {limit} bytes (ingress.max_upload_bytes)"),
                ));
            }
        }
        let mut request = SubmitRequest::default();
        request.set_all(url_query(req.uri().query().unwrap_or("")))?;
        let ctype =
            req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let key = upload_key(&doc_id);
        let mime = ctype.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if mime != "multipart/form-data" {
            // Every option is known before the body: refuse before reading it.
            self.resolve_model(&request.options)?;
            self.check_callback(&request.options)?;
        }
        if mime == "application/json" {
            return self.accept_reference(req, doc_id, caller, request).await;
        }
        let pace = self.pace();
        let (stored, filename) = match mime.as_str() {
            "multipart/form-data" => {
                let boundary = multer::parse_boundary(&ctype)
                    .map_err(|e| ApiError::bad_request("bad_multipart", format!("invalid multipart content type: {e}")))?;
                let field_limit = self.cfg.ingress.max_field_bytes;
                let file_bytes = Arc::new(AtomicU64::new(0));
                let body = paced(req.into_body().into_data_stream(), pace);
                let body = form_budget(body, file_bytes.clone(), 16 * field_limit);
                let constraints = multer::Constraints::new().size_limit(
                    multer::SizeLimit::new()
                        .whole_stream(limit + 16 * field_limit)
                        .per_field(field_limit)
                        .for_field("file", limit + 1),
                );
                let mut multipart = multer::Multipart::with_constraints(body, boundary, constraints);
                let mut stored = None;
                // Any failure after the file was stored deletes it.
                let read = async {
                while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
                    match field.name().unwrap_or("") {
                        "file" if stored.is_none() => {
                            let filename = field.file_name().map(str::to_string);
                            if filename.as_ref().is_some_and(|f| f.chars().count() > MAX_FILENAME_CHARS) {
                                return Err(ApiError::new(
                                    StatusCode::UNPROCESSABLE_ENTITY,
                                    "invalid_option",
                                    format!("the file name is longer than {MAX_FILENAME_CHARS} characters"),
                                ));
                            }
                            let filename = filename.map(|f| f.chars().filter(|c| !c.is_control()).collect());
                            let field = field.map_err(multipart_error);
                            let s = upload::store_stream(&self.blobs, &key, field, limit, Some(file_bytes.clone())).await?;
                            stored = Some((s, filename));
                        }
                        "file" => {
                            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "too_many_files", "send one `file` per request"));
                        }
                        name => {
                            let name = name.to_string();
                            let text = field.text().await.map_err(multipart_error)?;
                            request.set(&name, OptionValue::Text(&text))?;
                        }
                    }
                }
                Ok::<_, ApiError>(())
                };
                if let Err(e) = read.await {
                    if stored.is_some() {
                        if let Err(err) = self.blobs.delete(&key).await {
                            tracing::warn!(key, error = %err, "could not delete a rejected upload");
                        }
                    }
                    return Err(e);
                }
                stored.ok_or_else(|| {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "missing_file", "multipart body has no `file` field")
                })?
            }
            "application/pdf" | "application/x-pdf" => {
                let body = paced(req.into_body().into_data_stream(), pace).map_err(ApiError::from);
                let filename = request.filename.clone().or_else(|| request.title.clone());
                (upload::store_stream(&self.blobs, &key, body, limit, None).await?, filename)
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_content_type",
                    format!(
                        "content type {:?} is not accepted: send multipart/form-data with a `file` field, an application/pdf body, or application/json with a \"url\"",
                        if other.is_empty() { "(none)" } else { other }
                    ),
                ))
            }
        };
        let model = match self.check_callback(&request.options).and_then(|()| self.resolve_model(&request.options)) {
            Ok(m) => m,
            Err(e) => {
                if let Err(err) = self.blobs.delete(&key).await {
                    tracing::warn!(key, error = %err, "could not delete a refused upload");
                }
                return Err(e);
            }
        };
        self.ctx.metrics.upload_bytes(stored.bytes);
        let source = Source {
            blob: Some(key),
            filename,
            bytes: Some(stored.bytes),
            sha256: Some(stored.sha256.clone()),
            ..Source::default()
        };
        self.queue(doc_id, request, source, model, caller).await
    }

    /// `POST /v1/documents` with `application/json`: a document by
    /// reference, `{"url": "s3://bucket/key" | "https://…", "title": …,
    /// "options": {dpi, model, priority, password, wait_for_model,
    /// callback_url, callback_events}}`. The splitter fetches it.
    async fn accept_reference(
        &self,
        req: Request<Incoming>,
        doc_id: String,
        caller: &Caller,
        mut request: SubmitRequest,
    ) -> Result<Resp, ApiError> {
        const MAX_JSON: u64 = 64 * 1024;
        let body = upload::read_small(req.into_body(), MAX_JSON, self.pace()).await?;
        let invalid = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_reference", m);
        let json: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("bad_json", format!("the body is not JSON: {e}")))?;
        let url = json["url"]
            .as_str()
            .ok_or_else(|| invalid("the JSON body needs \"url\": \"s3://bucket/key\" or \"https://…\"".into()))?;
        let source = SourceRef::parse(url).map_err(|e| invalid(format!("url: {e}")))?;
        let cfg = &self.cfg.sources;
        match &source {
            SourceRef::S3 { bucket, .. } if !cfg.source_s3_buckets.iter().any(|b| b == bucket) => {
                return Err(invalid(format!(
                    "bucket {bucket:?} is not one this deployment reads documents from (splitter.source_s3_buckets)"
                )))
            }
            SourceRef::Http(u) => cfg.policy().check_url(u).map_err(invalid)?,
            _ => {}
        }
        if let SourceRef::S3 { bucket, key } = &source {
            // With tokens, a bucket is not a grant: each tenant reads only
            // below its own prefixes (admins: the whole bucket list).
            if !caller.admin {
                let prefixes = self.ctx.config.tenants.limits_for(caller.owner.as_deref()).source_prefixes;
                let full = format!("s3://{bucket}/{key}");
                if !prefixes.iter().any(|p| full.starts_with(p.as_str())) {
                    return Err(invalid(format!(
                        "{full:?} is not below a location this token may read (tenants.source_prefixes, or its \
                         tenants.overrides entry: {})",
                        if prefixes.is_empty() { "none".to_string() } else { prefixes.join(", ") }
                    )));
                }
            }
        }
        set_json_options(&mut request, &json)?;
        self.check_callback(&request.options)?;
        let model = self.resolve_model(&request.options)?;
        let filename = request.filename.clone().or_else(|| source.file_name());
        let source = Source { url: Some(url.to_string()), filename, ..Source::default() };
        self.queue(doc_id, request, source, model, caller).await
    }

    /// Records the document (its `queued` event) and publishes its submission.
    async fn queue(
        &self,
        doc_id: String,
        request: SubmitRequest,
        source: Source,
        model: ModelChoice,
        caller: &Caller,
    ) -> Result<Resp, ApiError> {
        let callback = request.options.callback();
        let filename = source.filename.clone();
        let title = request.title.or_else(|| filename.clone());
        let (sha256, bytes) = (source.sha256.clone(), source.bytes);
        // The request's options, with the decision carried: the model, and
        // whether the document waits for it.
        let options = SubmitOptions {
            model: Some(model.model.clone()),
            wait_for_model: model.wait.then_some(true),
            callback_events: callback.as_ref().map(|c| c.events),
            ..request.options
        };
        let msg = DocumentSubmitted {
            v: VERSION,
            doc_id: doc_id.clone(),
            title: title.clone(),
            source,
            options,
            submitted_at: Some(now_rfc3339()),
            start_page: None,
            owner: caller.owner.clone(),
        };
        let info = DocInfo {
            title,
            filename,
            sha256,
            bytes,
            model: Some(model.model),
            model_sha256: model.sha256,
            owner: caller.owner.clone(),
            callback,
            ..DocInfo::default()
        };
        // The durable record first (owner: who may see it; the tenant's
        // index and active entry), then the queued event: the status
        // endpoint answers as soon as we reply.
        let records = DocRecords::new(&self.ctx.counters);
        records
            .create(&doc_id, caller.owner.as_deref(), info.callback.clone(), DocState::Queued)
            .await
            .map_err(|e| ApiError::unavailable(format!("recording the document failed: {e:#}")))?;
        let queued = async {
            self.progress
                .doc(&doc_id, EventState::Queued, Some(info), None)
                .await
                .map_err(|e| ApiError::unavailable(format!("recording the document failed: {e}")))?;
            publish_message(&self.ctx.js, self.ctx.names.docs_submitted(), &format!("{doc_id}:submitted"), &msg)
                .await
                .map_err(|e| ApiError::unavailable(format!("queueing the document failed: {e}")))
        };
        if let Err(e) = queued.await {
            if let Err(err) = records.forget(caller.tenant(), &doc_id).await {
                tracing::warn!(doc_id, error = %err, "could not forget the record of a document not queued");
            }
            return Err(e);
        }
        self.ctx.metrics.document(STAGE, "submitted");
        tracing::info!(doc_id, bytes = msg.source.bytes, "document accepted");
        Ok(accepted(&doc_id, "queued"))
    }
}

/// A rolling hour (`tenants.pages_per_hour`).
const HOUR: Duration = Duration::from_secs(3600);
/// `Retry-After` of a `quota_documents` refusal: when a document of the
/// tenant ends is not known in advance.
pub const QUOTA_DOCUMENTS_RETRY_SECS: u64 = 10;

/// A 429 naming the limit (`code`), its setting, the limit and the usage,
/// with `Retry-After`.
fn quota_refusal(code: &str, setting: &str, max: u64, used: u64, retry_secs: u64, message: String) -> Resp {
    let body = serde_json::json!({"error": {
        "code": code,
        "message": message,
        "setting": setting,
        "limit": max,
        "used": used,
        "retry_after_secs": retry_secs,
    }});
    let mut resp = json_response(StatusCode::TOO_MANY_REQUESTS, &body);
    resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(retry_secs));
    resp
}

/// The idempotency bucket's key for the request's `Idempotency-Key`
/// (scoped per token), if it has a valid one.
fn idempotency_kv_key(req: &Request<Incoming>, token: &str) -> Option<String> {
    let key = req.headers().get("idempotency-key")?.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 255)?;
    Some(hex::encode(Sha256::digest(format!("{token}\n{key}"))))
}

fn in_progress() -> ApiError {
    ApiError::conflict(
        "idempotency_in_progress",
        "a request with this Idempotency-Key is still being processed; retry shortly",
    )
}

fn accepted(id: &str, status: &str) -> Resp {
    let mut body = serde_json::json!({"id": id, "status": status});
    if let (Some(obj), serde_json::Value::Object(urls)) = (body.as_object_mut(), doc_urls(id)) {
        obj.extend(urls);
    }
    json_response(StatusCode::ACCEPTED, &body)
}

/// Sets a JSON body's `title` and `options` on `request`, each value as
/// JSON typed it (a number, a boolean, text); a body of the wrong shape is
/// 422 `invalid_reference`, a bad value 422 `invalid_option`.
fn set_json_options(request: &mut SubmitRequest, json: &serde_json::Value) -> Result<(), ApiError> {
    let invalid = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_reference", m);
    if let Some(title) = json.get("title").filter(|t| !t.is_null()) {
        let title = title.as_str().ok_or_else(|| invalid("title must be a string".into()))?;
        request.set("title", OptionValue::Text(title))?;
    }
    if let Some(options) = json.get("options").filter(|o| !o.is_null()) {
        let options = options.as_object().ok_or_else(|| invalid("options must be an object".into()))?;
        for (k, v) in options {
            let number; // a number's JSON text, for options that are text
            let value = match v {
                serde_json::Value::String(s) => OptionValue::Text(s),
                serde_json::Value::Number(n) => {
                    number = n.to_string();
                    OptionValue::Number { value: n.as_f64().unwrap_or(f64::NAN), text: &number }
                }
                serde_json::Value::Bool(b) => OptionValue::Bool(*b),
                _ => return Err(invalid(format!("options.{k} must be a string, number or boolean"))),
            };
            request.set(k, value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagestream_schemas::{CallbackEvents, Priority};

    fn code(e: ApiError) -> (u16, String) {
        (e.status.as_u16(), e.code.to_string())
    }

    #[test]
    fn a_json_body_and_a_query_string_give_the_same_request() {
        let mut query = SubmitRequest::default();
        query
            .set_all(crate::url_query(
                "title=Report&dpi=150&model=yolo_v8&priority=high&wait_for_model=true&callback_url=https%3A%2F%2Fexample.com%2Fh&callback_events=page",
            ))
            .unwrap();
        let mut body = SubmitRequest::default();
        let json = serde_json::json!({
            "url": "https://example.com/a.pdf",
            "title": "Report",
            "options": {"dpi": 150, "model": "yolo_v8", "priority": "high", "wait_for_model": true,
                        "callback_url": "https://example.com/h", "callback_events": "page"},
        });
        set_json_options(&mut body, &json).unwrap();
        assert_eq!(query, body);
        assert_eq!(body.options.priority, Some(Priority::High));
        assert_eq!(body.options.callback_events, Some(CallbackEvents::Page));
        assert_eq!(body.options.dpi, Some(150.0));
    }

    #[test]
    fn a_json_body_of_the_wrong_shape_or_with_a_bad_value_is_refused() {
        let refused =
            |json: serde_json::Value| code(set_json_options(&mut SubmitRequest::default(), &json).unwrap_err());
        let reference = (422, "invalid_reference".to_string());
        let option = (422, "invalid_option".to_string());
        assert_eq!(refused(serde_json::json!({"title": 5})), reference);
        assert_eq!(refused(serde_json::json!({"options": []})), reference);
        assert_eq!(refused(serde_json::json!({"options": {"whatever": null}})), reference);
        assert_eq!(refused(serde_json::json!({"options": {"dpi": 5000}})), option);
        assert_eq!(refused(serde_json::json!({"options": {"priority": "urgent"}})), option);
        let mut r = SubmitRequest::default();
        set_json_options(&mut r, &serde_json::json!({"title": null, "options": null})).unwrap();
        assert_eq!(r, SubmitRequest::default());
    }
}
