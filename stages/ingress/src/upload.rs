//! Streaming an upload into the blob store: the body is never held whole.
//! While it streams, the first bytes are checked for the PDF signature, the
//! size is capped and the sha256 computed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::StatusCode;
use pagestream_pipeline::blob::BlobStore;
use sha2::{Digest, Sha256};
use tokio_util::io::StreamReader;

use crate::error::ApiError;

/// The PDF signature must appear within the first KiB (PDF 1.7 §7.5.2 tolerance).
const SIGNATURE_WINDOW: usize = 1024;

/// What was stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Default)]
struct Check {
    bytes: u64,
    head: Vec<u8>,
    signature_ok: bool,
    hasher: Sha256,
    failure: Option<ApiError>,
}

impl Check {
    fn feed(&mut self, chunk: &[u8], limit: u64) -> Result<(), ApiError> {
        self.bytes += chunk.len() as u64;
        if self.bytes > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("upload exceeds the limit of {limit} bytes (ingress.max_upload_bytes)"),
            ));
        }
        if !self.signature_ok {
            let take = SIGNATURE_WINDOW.saturating_sub(self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
            if self.head.windows(5).any(|w| w == b"%PDF-") {
                self.signature_ok = true;
            } else if self.head.len() >= SIGNATURE_WINDOW {
                return Err(not_a_pdf(&self.head));
            }
        }
        self.hasher.update(chunk);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ApiError> {
        if self.bytes == 0 {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "empty_upload", "the uploaded file is empty"));
        }
        if !self.signature_ok {
            return Err(not_a_pdf(&self.head));
        }
        Ok(())
    }
}

fn not_a_pdf(head: &[u8]) -> ApiError {
    let kind = if head.starts_with(b"\x89PNG") {
        " (it is a PNG image)"
    } else if head.starts_with(b"\xff\xd8\xff") {
        " (it is a JPEG image)"
    } else if head.starts_with(b"PK\x03\x04") {
        " (it is a ZIP archive)"
    } else {
        ""
    };
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "not_a_pdf",
        format!("the uploaded file is not a PDF: no %PDF- signature in its first 1024 bytes{kind}"),
    )
}

/// Why reading a request body stopped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    #[error("no data from the client for {0} s")]
    Idle(u64),
    #[error("the upload averaged {rate} bytes/s, below the minimum of {min} bytes/s")]
    TooSlow { rate: u64, min: u64 },
    #[error("the request took longer than {0} s")]
    Deadline(u64),
    #[error("the form's non-file parts exceed {0} bytes")]
    FormTooLarge(u64),
    #[error("{0}")]
    Read(String),
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::Idle(_) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "upload_timeout",
                format!("{e} (ingress.read_timeout_secs); the upload was discarded"),
            ),
            BodyError::TooSlow { .. } => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "upload_too_slow",
                format!("{e} (ingress.min_upload_bytes_per_sec); the upload was discarded"),
            ),
            BodyError::Deadline(_) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("{e} (ingress.request_timeout_secs); the upload was discarded"),
            ),
            BodyError::FormTooLarge(_) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "field_too_large",
                format!("{e} (16 × ingress.max_field_bytes)"),
            ),
            BodyError::Read(m) => {
                ApiError::bad_request("upload_interrupted", format!("reading the upload failed: {m}"))
            }
        }
    }
}

/// The API error for a multipart parsing failure: a timeout or read error of
/// the underlying body keeps its own status.
pub fn multipart_error(e: multer::Error) -> ApiError {
    match &e {
        multer::Error::StreamReadFailed(inner) => {
            if let Some(body) = inner.downcast_ref::<BodyError>() {
                return body.clone().into();
            }
        }
        multer::Error::FieldSizeExceeded { limit, field_name } if field_name.as_deref() == Some("file") => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("upload exceeds the limit of {} bytes (ingress.max_upload_bytes)", limit.saturating_sub(1)),
            )
        }
        multer::Error::FieldSizeExceeded { limit, field_name } => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "field_too_large",
                format!(
                    "form field {:?} exceeds {limit} bytes (ingress.max_field_bytes)",
                    field_name.as_deref().unwrap_or("")
                ),
            )
        }
        multer::Error::StreamSizeExceeded { limit } => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body exceeds {limit} bytes (ingress.max_upload_bytes plus the form's fields)"),
            )
        }
        _ => {}
    }
    ApiError::bad_request("bad_multipart", format!("malformed multipart body: {e}"))
}

/// How fast a client must send its body.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Longest gap between two chunks.
    pub idle: Duration,
    /// Slowest average rate accepted once `idle` has passed (0: any).
    pub min_bytes_per_sec: u64,
    /// When the whole request must be over.
    pub deadline: tokio::time::Instant,
    /// Seconds from the request's start to `deadline` (for the message).
    pub deadline_secs: u64,
}

/// Ends a body stream with a [`BodyError`] when the client sends nothing
/// for `pace.idle`, averages less than `pace.min_bytes_per_sec` (after a
/// first `pace.idle` of grace) or passes the request deadline: a slow or
/// stalled client cannot hold a request open.
pub fn paced<S, E>(body: S, pace: Pace) -> impl Stream<Item = Result<Bytes, BodyError>> + Send + Unpin + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display,
{
    let started = tokio::time::Instant::now();
    Box::pin(futures::stream::unfold((body, false, 0u64), move |(mut b, done, total)| async move {
        if done {
            return None;
        }
        let wait = pace.idle.min(pace.deadline.saturating_duration_since(tokio::time::Instant::now()));
        let step = match tokio::time::timeout(wait, b.next()).await {
            Ok(Some(Ok(chunk))) => {
                let total = total + chunk.len() as u64;
                let elapsed = started.elapsed();
                let rate = (total as f64 / elapsed.as_secs_f64().max(1e-3)) as u64;
                if pace.min_bytes_per_sec > 0 && elapsed > pace.idle && rate < pace.min_bytes_per_sec {
                    Err((BodyError::TooSlow { rate, min: pace.min_bytes_per_sec }, total))
                } else {
                    Ok(Some((chunk, total)))
                }
            }
            Ok(Some(Err(e))) => Err((BodyError::Read(e.to_string()), total)),
            Ok(None) => Ok(None),
            Err(_) if tokio::time::Instant::now() >= pace.deadline => {
                Err((BodyError::Deadline(pace.deadline_secs), total))
            }
            Err(_) => Err((BodyError::Idle(pace.idle.as_secs()), total)),
        };
        match step {
            Ok(Some((chunk, total))) => Some((Ok(chunk), (b, false, total))),
            Ok(None) => None,
            Err((e, total)) => Some((Err(e), (b, true, total))),
        }
    }))
}

/// Caps the bytes of a multipart body that are not the file: `file_bytes`
/// counts what the file field has consumed; the rest (preamble, part
/// headers, text fields, bytes the parser buffered ahead) may not exceed
/// `budget`, so a part header that never ends cannot fill memory.
pub fn form_budget<S>(
    body: S,
    file_bytes: Arc<AtomicU64>,
    budget: u64,
) -> impl Stream<Item = Result<Bytes, BodyError>> + Send + Unpin + 'static
where
    S: Stream<Item = Result<Bytes, BodyError>> + Send + Unpin + 'static,
{
    let mut fed = 0u64;
    body.map(move |chunk| {
        let chunk = chunk?;
        fed += chunk.len() as u64;
        let file = file_bytes.load(Ordering::Relaxed);
        if fed.saturating_sub(file) > budget {
            return Err(BodyError::FormTooLarge(budget));
        }
        Ok(chunk)
    })
}

/// Reads and discards up to `limit` bytes of a request body we answer
/// without using (an idempotent replay), so the client, still sending,
/// receives the answer instead of a reset connection.
pub async fn drain(body: hyper::body::Incoming, limit: u64, pace: Pace) {
    use http_body_util::BodyExt;
    let mut stream = paced(body.into_data_stream(), pace);
    let mut read = 0u64;
    while let Some(Ok(chunk)) = stream.next().await {
        read += chunk.len() as u64;
        if read > limit {
            break;
        }
    }
}

/// Reads a small body (a JSON request) whole, at most `limit` bytes (413
/// `too_large` above), at the upload pace.
pub async fn read_small(body: hyper::body::Incoming, limit: u64, pace: Pace) -> Result<Vec<u8>, ApiError> {
    use http_body_util::BodyExt;
    let mut stream = paced(body.into_data_stream(), pace);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(ApiError::from)?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::new(
                http::StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("a JSON request body may have at most {limit} bytes"),
            ));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Streams `body` into the blob store at `key`, enforcing `limit`; adds
/// the bytes taken to `consumed` as they pass. On any failure the partial
/// object is deleted and the precise error returned (a rejected body ends
/// the stream; the failure recorded here says why).
pub async fn store_stream<S>(
    blobs: &BlobStore,
    key: &str,
    body: S,
    limit: u64,
    consumed: Option<Arc<AtomicU64>>,
) -> Result<Stored, ApiError>
where
    S: Stream<Item = Result<Bytes, ApiError>> + Send + Unpin,
{
    let check = Arc::new(Mutex::new(Check::default()));
    let c = check.clone();
    let checked = body.scan((), move |(), chunk| {
        let mut state = c.lock().expect("upload check lock");
        let out = match chunk {
            Err(err) => {
                state.failure = Some(err);
                None
            }
            Ok(chunk) => match state.feed(&chunk, limit) {
                Err(e) => {
                    state.failure = Some(e);
                    None
                }
                Ok(()) => {
                    if let Some(n) = &consumed {
                        n.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                    Some(Ok::<_, std::io::Error>(chunk))
                }
            },
        };
        futures::future::ready(out)
    });
    let mut reader = StreamReader::new(Box::pin(checked));
    let put = blobs.put_reader(key, &mut reader).await;
    let outcome = {
        let mut state = check.lock().expect("upload check lock");
        match (put, state.failure.take()) {
            (_, Some(err)) => Err(err),
            (Err(e), None) if e.is_storage_full() => Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage_full",
                "the blob store is full (nats.max_blob_bytes); documents already accepted go on, retry later",
            )),
            (Err(e), None) => Err(ApiError::unavailable(format!("storing the upload failed: {e:#}"))),
            (Ok(_), None) => state.finish().map(|()| Stored {
                bytes: state.bytes,
                sha256: hex::encode(std::mem::take(&mut state.hasher).finalize()),
            }),
        }
    };
    if outcome.is_err() {
        if let Err(e) = blobs.delete(key).await {
            tracing::warn!(key, error = %e, "could not delete a rejected upload");
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_check() {
        let mut c = Check::default();
        c.feed(b"%PDF-1.7\n", 100).unwrap();
        c.finish().unwrap();

        let mut c = Check::default();
        c.feed(b"\x89PNG\r\n", 100).unwrap();
        let e = c.finish().unwrap_err();
        assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(e.message.contains("PNG"), "{e}");

        let mut c = Check::default();
        assert_eq!(c.finish().unwrap_err().code, "empty_upload");

        let mut c = Check::default();
        assert_eq!(c.feed(&[b'x'; 2000], 10_000).unwrap_err().code, "not_a_pdf");

        let mut c = Check::default();
        assert_eq!(c.feed(b"%PDF-1.7 and more", 5).unwrap_err().code, "too_large");
    }
}
