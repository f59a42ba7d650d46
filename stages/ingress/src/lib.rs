//! Ingress: the HTTP API (hyper 1). Accepts uploads, streams them to the
//! blob store, publishes `DocumentSubmitted`, and answers per-document
//! status from the events stream. Serves `/livez`, `/readyz`, `/metrics` on
//! the same listener.
//!
//! Routes: `POST /v1/documents` (multipart `file` + optional `title`, or a
//! raw `application/pdf` body with `?title=`), `GET /v1/documents/{id}`.
//!
//! Never loads a model or opens a PDF: it only checks the signature.

pub mod error;
pub mod upload;

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use futures::TryStreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use pagestream_pipeline::admin::admin_response;
use pagestream_pipeline::blob::{upload_key, BlobStore};
use pagestream_pipeline::progress::{publish_message, read_status, DocStatus, Progress};
use pagestream_pipeline::util::now_rfc3339;
use pagestream_pipeline::StageContext;
use pagestream_schemas::{validate_doc_id, DocInfo, DocumentSubmitted, EventState, Source, SubmitOptions, VERSION};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use error::{json_response, ApiError};

pub const STAGE: &str = "ingress";

/// Shared state of the API.
pub struct Ingress {
    ctx: StageContext,
    blobs: BlobStore,
    progress: Progress,
}

type Resp = Response<Full<Bytes>>;

/// Submission options from the query string or multipart text fields.
#[derive(Default)]
struct Options {
    title: Option<String>,
    filename: Option<String>,
    password: Option<String>,
    dpi: Option<f32>,
    model: Option<String>,
}

impl Options {
    fn set(&mut self, key: &str, value: String) -> Result<(), ApiError> {
        let invalid = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_option", m);
        match key {
            "title" => self.title = Some(value).filter(|t| !t.trim().is_empty()),
            "dpi" => {
                let dpi: f32 = value.parse().map_err(|_| invalid(format!("dpi {value:?} is not a number")))?;
                if !(10.0..=1200.0).contains(&dpi) {
                    return Err(invalid(format!("dpi {dpi} is outside 10..=1200")));
                }
                self.dpi = Some(dpi);
            }
            "model" => self.model = Some(value).filter(|m| !m.is_empty()),
            "filename" => self.filename = Some(value).filter(|f| !f.trim().is_empty()),
            "password" => self.password = Some(value).filter(|p| !p.is_empty()),
            _ => {}
        }
        Ok(())
    }
}

impl Ingress {
    pub async fn new(ctx: StageContext) -> Result<Self> {
        let blobs = ctx.blobs().await?;
        let progress = ctx.progress(STAGE);
        Ok(Ingress { ctx, blobs, progress })
    }

    async fn route(&self, req: Request<Incoming>) -> (&'static str, Resp) {
        let path = req.uri().path().to_string();
        if let Some(resp) = admin_response(&path, &self.ctx.health, &self.ctx.metrics) {
            return ("admin", resp);
        }
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let method = req.method().clone();
        let result = match (segments.as_slice(), &method) {
            (["v1", "documents"], &Method::POST) => ("submit", self.submit(req).await),
            (["v1", "documents", id], &Method::GET) => ("status", self.status(id).await),
            (["v1", "documents"], _) | (["v1", "documents", _], _) => (
                "method_not_allowed",
                Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{method} is not allowed on {path}"),
                )),
            ),
            _ => ("not_found", Err(ApiError::not_found(format!("no route for {method} {path}")))),
        };
        let (route, outcome) = result;
        (route, outcome.unwrap_or_else(|e| e.response()))
    }

    async fn submit(&self, req: Request<Incoming>) -> Result<Resp, ApiError> {
        let limit = self.ctx.config.ingress.max_upload_bytes;
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
        let mut opts = Options::default();
        for (k, v) in url_query(req.uri().query().unwrap_or("")) {
            opts.set(&k, v)?;
        }
        let ctype =
            req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let doc_id = uuid::Uuid::now_v7().simple().to_string();
        let key = upload_key(&doc_id);
        let mime = ctype.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let (stored, filename) = match mime.as_str() {
            "multipart/form-data" => {
                let boundary = multer::parse_boundary(&ctype)
                    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_multipart", format!("invalid multipart content type: {e}")))?;
                let mut multipart = multer::Multipart::new(req.into_body().into_data_stream(), boundary);
                let mut stored = None;
                loop {
                    let field = multipart
                        .next_field()
                        .await
                        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_multipart", format!("malformed multipart body: {e}")))?;
                    let Some(field) = field else { break };
                    match field.name().unwrap_or("") {
                        "file" if stored.is_none() => {
                            let filename = field.file_name().map(str::to_string);
                            let s = upload::store_stream(&self.blobs, &key, field, limit).await?;
                            stored = Some((s, filename));
                        }
                        "file" => {
                            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "too_many_files", "send one `file` per request"));
                        }
                        name => {
                            let name = name.to_string();
                            let text = field.text().await.map_err(|e| {
                                ApiError::new(StatusCode::BAD_REQUEST, "bad_multipart", format!("reading field {name}: {e}"))
                            })?;
                            opts.set(&name, text)?;
                        }
                    }
                }
                stored.ok_or_else(|| {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "missing_file", "multipart body has no `file` field")
                })?
            }
            "application/pdf" | "application/x-pdf" => {
                let body = req.into_body().into_data_stream().map_err(|e| e.to_string());
                let filename = opts.filename.clone().or_else(|| opts.title.clone());
                (upload::store_stream(&self.blobs, &key, body, limit).await?, filename)
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_content_type",
                    format!(
                        "content type {:?} is not accepted: send multipart/form-data with a `file` field, or an application/pdf body",
                        if other.is_empty() { "(none)" } else { other }
                    ),
                ))
            }
        };
        self.ctx.metrics.upload_bytes.inc_by(stored.bytes);
        let title = opts.title.clone().or_else(|| filename.clone());
        let msg = DocumentSubmitted {
            v: VERSION,
            doc_id: doc_id.clone(),
            title: title.clone(),
            source: Source {
                blob: Some(key),
                filename: filename.clone(),
                bytes: Some(stored.bytes),
                sha256: Some(stored.sha256.clone()),
                ..Source::default()
            },
            options: SubmitOptions { dpi: opts.dpi, model: opts.model.clone(), password: opts.password.take() },
            submitted_at: Some(now_rfc3339()),
        };
        let info = DocInfo {
            title,
            filename,
            sha256: Some(stored.sha256),
            bytes: Some(stored.bytes),
            model: opts.model,
            ..DocInfo::default()
        };
        // Queued event first: the status endpoint answers as soon as we reply.
        self.progress
            .doc(&doc_id, EventState::Queued, Some(info), None)
            .await
            .map_err(|e| ApiError::unavailable(format!("recording the document failed: {e}")))?;
        publish_message(&self.ctx.js, self.ctx.names.docs_submitted(), &format!("{doc_id}:submitted"), &msg)
            .await
            .map_err(|e| ApiError::unavailable(format!("queueing the document failed: {e}")))?;
        self.ctx.metrics.document(STAGE, "submitted");
        tracing::info!(doc_id, bytes = msg.source.bytes, "document accepted");
        Ok(json_response(
            StatusCode::ACCEPTED,
            &serde_json::json!({
                "id": doc_id,
                "status": "queued",
                "status_url": format!("/v1/documents/{doc_id}"),
            }),
        ))
    }

    async fn status(&self, id: &str) -> Result<Resp, ApiError> {
        validate_doc_id(id).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_id", e.to_string()))?;
        let status = read_status(&self.ctx.js, &self.ctx.names, id, true)
            .await
            .map_err(|e| ApiError::unavailable(format!("reading progress failed: {e:#}")))?
            .ok_or_else(|| ApiError::not_found(format!("no document {id}")))?;
        Ok(json_response(StatusCode::OK, &status_json(&status)))
    }
}

/// The public JSON of a document's status.
pub fn status_json(s: &DocStatus) -> serde_json::Value {
    serde_json::json!({
        "id": s.doc_id,
        "state": s.state,
        "title": s.info.title,
        "filename": s.info.filename,
        "bytes": s.info.bytes,
        "sha256": s.info.sha256,
        "page_count": s.page_count,
        "pages": s.pages,
        "failed_pages": s.failed_pages,
        "error": s.error,
        "queued_at": s.queued_at,
        "started_at": s.started_at,
        "finished_at": s.finished_at,
        "manifest": s.info.manifest,
    })
}

fn url_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves the API on `listener` until `shutdown`, then lets in-flight
/// requests finish.
pub async fn serve(ctx: StageContext, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    ctx.health.register(STAGE);
    let ingress = Arc::new(Ingress::new(ctx.clone()).await?);
    ctx.health.set_ready(STAGE, true);
    tracing::info!(addr = %listener.local_addr()?, "ingress listening");
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let ingress = ingress.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let ingress = ingress.clone();
            async move {
                let (route, resp) = ingress.route(req).await;
                ingress.ctx.metrics.http(route, resp.status().as_u16());
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => tracing::warn!("ingress: connections still open after 10 s"),
    }
    Ok(())
}

/// Binds `ctx.config.ingress.addr` and serves.
pub async fn run(ctx: StageContext, shutdown: CancellationToken) -> Result<()> {
    let addr = ctx.config.ingress.addr.clone();
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("ingress: cannot listen on {addr}: {e} (set PAGESTREAM_INGRESS_ADDR)"))?;
    serve(ctx, listener, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            url_query("title=Annual%20report+2024&dpi=200&x"),
            vec![("title".into(), "Annual report 2024".into()), ("dpi".into(), "200".into()), ("x".into(), "".into())]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
