//! Streaming an upload into the blob store: the body is never held whole.
//! While it streams, the first bytes are checked for the PDF signature, the
//! size is capped and the sha256 computed.

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
            BodyError::Read(m) => {
                ApiError::bad_request("upload_interrupted", format!("reading the upload failed: {m}"))
            }
        }
    }
}

/// The API error for a multipart parsing failure: a timeout or read error of
/// the underlying body keeps its own status.
pub fn multipart_error(e: multer::Error) -> ApiError {
    if let multer::Error::StreamReadFailed(inner) = &e {
        if let Some(body) = inner.downcast_ref::<BodyError>() {
            return body.clone().into();
        }
    }
    ApiError::bad_request("bad_multipart", format!("malformed multipart body: {e}"))
}

/// Ends a body stream with [`BodyError::Idle`] when the client sends nothing
/// for `idle`: a slow or stalled client cannot hold a request open.
pub fn idle_timeout<S, E>(
    body: S,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, BodyError>> + Send + Unpin + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display,
{
    Box::pin(futures::stream::unfold((body, false), move |(mut b, done)| async move {
        if done {
            return None;
        }
        match tokio::time::timeout(idle, b.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), (b, false))),
            Ok(Some(Err(e))) => Some((Err(BodyError::Read(e.to_string())), (b, true))),
            Ok(None) => None,
            Err(_) => Some((Err(BodyError::Idle(idle.as_secs())), (b, true))),
        }
    }))
}

/// Reads and discards up to `limit` bytes of a request body we answer
/// without using (an idempotent replay), so the client, still sending,
/// receives the answer instead of a reset connection.
pub async fn drain(body: hyper::body::Incoming, limit: u64, idle: Duration) {
    use http_body_util::BodyExt;
    let mut stream = idle_timeout(body.into_data_stream(), idle);
    let mut read = 0u64;
    while let Some(Ok(chunk)) = stream.next().await {
        read += chunk.len() as u64;
        if read > limit {
            break;
        }
    }
}

/// Streams `body` into the blob store at `key`, enforcing `limit`. On any
/// failure the partial object is deleted and the precise error returned.
pub async fn store_stream<S>(blobs: &BlobStore, key: &str, body: S, limit: u64) -> Result<Stored, ApiError>
where
    S: Stream<Item = Result<Bytes, ApiError>> + Send + Unpin,
{
    let check = Arc::new(Mutex::new(Check::default()));
    let c = check.clone();
    let checked = body.map(move |chunk| {
        let mut state = c.lock().expect("upload check lock");
        let chunk = chunk.map_err(|err| {
            state.failure = Some(err);
            std::io::Error::other("upload body error")
        })?;
        if let Err(e) = state.feed(&chunk, limit) {
            state.failure = Some(e);
            return Err(std::io::Error::other("upload rejected"));
        }
        Ok::<_, std::io::Error>(chunk)
    });
    let mut reader = StreamReader::new(checked);
    let put = blobs.put_reader(key, &mut reader).await;
    let outcome = {
        let mut state = check.lock().expect("upload check lock");
        match (put, state.failure.take()) {
            (_, Some(err)) => Err(err),
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
