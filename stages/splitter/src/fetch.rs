//! Documents by reference: `source.url` fetched into the splitter's local
//! copy, streamed (never whole in memory), with the same checks as an
//! upload — size (`splitter.source_max_bytes`), time
//! (`splitter.source_timeout_secs`), the `%PDF-` signature — plus where it
//! may come from: `s3://` only from `splitter.source_s3_buckets`,
//! `http(s)://` only from public addresses or
//! `splitter.source_allow_private_hosts` (no redirects followed).

use std::time::Duration;

use crate::SplitterConfig;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use pagestream_pipeline::consumer::StageError;
use pagestream_pipeline::outbound::{error_chain, Https};
use pagestream_results::store::SourceError;
use pagestream_schemas::SourceRef;
use tokio::fs::File;
use tokio::io::AsyncWriteExt as _;

/// The HTTP client for `http(s)://` sources.
pub type HttpClient = Client<Https, Empty<Bytes>>;

fn too_large(max: u64, got: Option<u64>) -> StageError {
    let size = got.map(|n| format!(" ({n} bytes)")).unwrap_or_default();
    StageError::permanent(
        "source_too_large",
        format!("the document is larger than splitter.source_max_bytes = {max} bytes{size}"),
    )
}

/// Streams `url` into `file`; returns the bytes written.
pub async fn fetch_url(cfg: &SplitterConfig, http: &HttpClient, url: &str, file: &mut File) -> Result<u64, StageError> {
    let source =
        SourceRef::parse(url).map_err(|e| StageError::permanent("source_refused", format!("source.url: {e}")))?;
    let timeout = Duration::from_secs(cfg.source_timeout_secs);
    let fetched = tokio::time::timeout(timeout, async {
        match source {
            SourceRef::S3 { bucket, key } => fetch_s3(cfg, &bucket, &key, file).await,
            SourceRef::Http(url) => fetch_http(cfg, http, &url, file).await,
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(StageError::transient(
            "source_timeout",
            format!("fetching {url} took longer than splitter.source_timeout_secs = {}", cfg.source_timeout_secs),
        ))
    })?;
    file.flush().await.map_err(pagestream_pipeline::consumer::transient("tempfile"))?;
    Ok(fetched)
}

/// Refuses a bucket this deployment does not read documents from
/// (`splitter.source_s3_buckets`).
fn check_bucket(allowed: &[String], bucket: &str) -> Result<(), StageError> {
    if allowed.iter().any(|b| b == bucket) {
        return Ok(());
    }
    Err(StageError::permanent(
        "source_refused",
        format!("bucket {bucket:?} is not one this deployment reads documents from (splitter.source_s3_buckets)"),
    ))
}

async fn fetch_s3(cfg: &SplitterConfig, bucket: &str, key: &str, file: &mut File) -> Result<u64, StageError> {
    check_bucket(&cfg.source_s3_buckets, bucket)?;
    pagestream_results::store::s3_fetch(&cfg.source_s3_connection(), bucket, key, cfg.source_max_bytes, file)
        .await
        .map_err(|e| match e {
            SourceError::Missing(m) => StageError::permanent("source_missing", m),
            SourceError::TooLarge(n) => too_large(cfg.source_max_bytes, Some(n)),
            SourceError::Unsupported(m) => StageError::permanent("source_unsupported", m),
            SourceError::Other(detail) => {
                // The SDK's chain names the service's endpoint: logged, not shown.
                let reference = pagestream_pipeline::consumer::error_reference();
                tracing::warn!(reference, %detail, "reading an s3:// source failed");
                StageError::transient(
                    "source_fetch",
                    format!("reading s3://{bucket}/{key} failed (reference {reference} in the pipeline's logs)"),
                )
            }
        })
}

async fn fetch_http(cfg: &SplitterConfig, http: &HttpClient, url: &str, file: &mut File) -> Result<u64, StageError> {
    cfg.source_policy().check_url(url).map_err(|e| StageError::permanent("source_refused", e))?;
    let uri: http::Uri =
        url.parse().map_err(|e| StageError::permanent("source_refused", format!("source.url is not a URL: {e}")))?;
    let req = http::Request::get(uri)
        .header(http::header::USER_AGENT, concat!("pagestream-splitter/", env!("CARGO_PKG_VERSION")))
        .header(http::header::ACCEPT, "application/pdf")
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let resp = http.request(req).await.map_err(|e| {
        let message = error_chain(&e);
        if message.contains("private, loopback or link-local") {
            StageError::permanent("source_refused", message)
        } else {
            StageError::transient("source_fetch", format!("GET {url}: {message}"))
        }
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(http_failure(status, url));
    }
    let declared = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > cfg.source_max_bytes) {
        return Err(too_large(cfg.source_max_bytes, Some(n)));
    }
    let mut body = resp.into_body();
    let mut written = 0u64;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| StageError::transient("source_fetch", format!("GET {url}: {}", error_chain(&e))))?;
        let Ok(data) = frame.into_data() else { continue };
        written += data.len() as u64;
        if written > cfg.source_max_bytes {
            return Err(too_large(cfg.source_max_bytes, None));
        }
        file.write_all(&data).await.map_err(pagestream_pipeline::consumer::transient("tempfile"))?;
    }
    Ok(written)
}

/// Why a source server's answer `status` (not a success) fails the fetch:
/// gone for good (permanent) or worth retrying (transient).
fn http_failure(status: http::StatusCode, url: &str) -> StageError {
    let what = format!("GET {url} answered HTTP {status}");
    match status.as_u16() {
        404 | 410 => StageError::permanent("source_missing", what),
        408 | 429 | 500..=599 => StageError::transient("source_fetch", what),
        300..=399 => StageError::permanent("source_unavailable", format!("{what} (redirects are not followed)")),
        _ => StageError::permanent("source_unavailable", what),
    }
}

/// The local copy must start like a PDF (`%PDF-` in its first 1024 bytes),
/// as an upload must.
pub fn check_pdf_head(head: &[u8], url: &str) -> Result<(), StageError> {
    if head.windows(5).any(|w| w == b"%PDF-") {
        return Ok(());
    }
    Err(StageError::permanent(
        "source_not_pdf",
        format!("{url} is not a PDF: no %PDF- signature in its first 1024 bytes"),
    ))
}

/// The splitter's fetch pool: documents by reference are fetched here,
/// apart from the rendering workers (its own per-tenant queues
/// `<p>.fetch.<tenant>`, `splitter.fetch_concurrency` at once,
/// `splitter.fetches_per_tenant` of one tenant; see [`crate::turns`]), into
/// the blob store as `uploads/<doc_id>`; the document then takes its turns
/// like an upload. One fetch, retries included, takes at most
/// `splitter.source_timeout_secs`; then the document fails.
pub struct Fetcher(pub std::sync::Arc<crate::Splitter>);

impl pagestream_pipeline::consumer::Handler for Fetcher {
    type Input = pagestream_schemas::DocumentSubmitted;

    async fn handle(
        &self,
        sub: pagestream_schemas::DocumentSubmitted,
        _: &pagestream_pipeline::consumer::Delivery,
    ) -> Result<(), StageError> {
        let s = &self.0;
        let doc_id = sub.doc_id.clone();
        if s.finished(&doc_id).await? || s.ctx.is_cancelled(&doc_id).await? {
            tracing::info!(doc_id, "document finished or cancelled before its fetch; skipped");
            return Ok(());
        }
        let Some(url) = sub.source.url.clone() else {
            return Err(StageError::permanent("source_missing", "source: none of inline, blob or url is set"));
        };
        match s.fetch_to_blob(&url, &doc_id).await {
            Ok(key) => {
                // Exactly one of inline, blob or url (the contract).
                let source = pagestream_schemas::Source { blob: Some(key), url: None, ..sub.source.clone() };
                let next = pagestream_schemas::DocumentSubmitted { source, ..sub };
                s.queue_turn(&next, &format!("{doc_id}:fetched")).await?;
                s.ctx.metrics.message(crate::STAGE, "fetched");
                Ok(())
            }
            Err(e) if e.kind == pagestream_pipeline::ErrorKind::Permanent => {
                s.fail_document(&sub, e.info()).await?;
                Err(e.doc(&doc_id))
            }
            Err(e) => Err(e),
        }
    }

    /// Retries exhausted (blob store or NATS down for good): the document fails.
    async fn give_up(
        &self,
        sub: pagestream_schemas::DocumentSubmitted,
        _: &pagestream_pipeline::consumer::Delivery,
        err: &StageError,
    ) -> Result<(), StageError> {
        self.0.fail_document(&sub, err.info()).await
    }
}

impl crate::Splitter {
    /// Fetches `url` (retrying transient failures within
    /// `splitter.source_timeout_secs` in all) into the blob store as
    /// `uploads/<doc_id>`; returns the key.
    async fn fetch_to_blob(&self, url: &str, doc_id: &str) -> Result<String, StageError> {
        use pagestream_pipeline::consumer::transient;
        let cfg = &self.cfg;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.source_timeout_secs);
        let mut delay = Duration::from_secs(1);
        let tmp = loop {
            let attempt = async {
                let (tmp, mut file) = crate::temp_pdf().await?;
                fetch_url(cfg, &self.http, url, &mut file).await?;
                drop(file);
                // Fetched, not uploaded: it must start like a PDF, as an upload must.
                use std::io::Read as _;
                let mut head = Vec::with_capacity(1024);
                std::fs::File::open(&tmp)
                    .and_then(|f| f.take(1024).read_to_end(&mut head))
                    .map_err(transient("tempfile"))?;
                check_pdf_head(&head, url)?;
                Ok::<_, StageError>(tmp)
            };
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    return Err(StageError::transient("shutting_down", format!("stopped while fetching {url}")));
                }
                r = tokio::time::timeout_at(deadline, attempt) => r,
            };
            match result {
                Err(_) => {
                    return Err(StageError::permanent(
                        "source_timeout",
                        format!(
                            "fetching {url} took longer than splitter.source_timeout_secs = {} s, retries included",
                            cfg.source_timeout_secs
                        ),
                    ))
                }
                Ok(Ok(tmp)) => break tmp,
                Ok(Err(e)) if e.kind == pagestream_pipeline::ErrorKind::Transient => {
                    if tokio::time::Instant::now() + delay >= deadline {
                        return Err(StageError::permanent(
                            e.code,
                            format!(
                                "{} (retried for splitter.source_timeout_secs = {} s)",
                                e.message, cfg.source_timeout_secs
                            ),
                        ));
                    }
                    tracing::warn!(doc_id, url, error = %e, ?delay, "fetch failed; retrying");
                    self.pause(&mut delay, Duration::from_secs(30), "retrying a fetch").await?;
                }
                Ok(Err(e)) => return Err(e),
            }
        };
        let key = pagestream_pipeline::blob::upload_key(doc_id);
        let mut file = tokio::fs::File::open(&tmp).await.map_err(transient("tempfile"))?;
        self.blobs.put_reader(&key, &mut file).await.map_err(|e| {
            if e.is_storage_full() {
                StageError::permanent(
                    "storage_full",
                    "the blob store is full (nats.max_blob_bytes); submit it again later",
                )
            } else {
                StageError::blob_store(e)
            }
        })?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagestream_pipeline::ErrorKind;

    #[test]
    fn a_source_servers_refusal_is_final_or_retried_by_its_status() {
        let kind = |status: u16| {
            let e = http_failure(http::StatusCode::from_u16(status).unwrap(), "http://h/a.pdf");
            (e.kind, e.code.to_string())
        };
        assert_eq!(kind(404), (ErrorKind::Permanent, "source_missing".into()));
        assert_eq!(kind(410), (ErrorKind::Permanent, "source_missing".into()));
        for status in [408, 429, 500, 503] {
            assert_eq!(kind(status), (ErrorKind::Transient, "source_fetch".into()), "{status}");
        }
        for status in [301, 403] {
            assert_eq!(kind(status), (ErrorKind::Permanent, "source_unavailable".into()), "{status}");
        }
        let redirect = http_failure(http::StatusCode::FOUND, "http://h/a.pdf");
        assert!(redirect.message.contains("redirects are not followed"), "{}", redirect.message);
    }

    #[test]
    fn only_listed_buckets_are_read_and_only_pdfs_kept() {
        let allowed = vec!["docs".to_string()];
        assert!(check_bucket(&allowed, "docs").is_ok());
        let refused = check_bucket(&allowed, "other").unwrap_err();
        assert_eq!((refused.kind, refused.code.to_string()), (ErrorKind::Permanent, "source_refused".into()));
        assert!(refused.message.contains("splitter.source_s3_buckets"), "{}", refused.message);
        assert!(check_pdf_head(b"\n\n%PDF-1.7\n", "u").is_ok());
        let not_pdf = check_pdf_head(b"<html>", "u").unwrap_err();
        assert_eq!(not_pdf.code.to_string(), "source_not_pdf");
    }
}
