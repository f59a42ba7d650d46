//! Streaming an upload into the blob store: the body is never held whole.
//! While it streams, the first bytes are checked for the PDF signature, the
//! size is capped and the sha256 computed.

use std::sync::{Arc, Mutex};

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

/// Streams `body` into the blob store at `key`, enforcing `limit`. On any
/// failure the partial object is deleted and the precise error returned.
pub async fn store_stream<S, E>(blobs: &BlobStore, key: &str, body: S, limit: u64) -> Result<Stored, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    let check = Arc::new(Mutex::new(Check::default()));
    let c = check.clone();
    let checked = body.map(move |chunk| {
        let mut state = c.lock().expect("upload check lock");
        let chunk = chunk.map_err(|e| {
            let err =
                ApiError::new(StatusCode::BAD_REQUEST, "upload_interrupted", format!("reading the upload failed: {e}"));
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
