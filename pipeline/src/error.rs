//! What a stage's handler returns when it fails: a [`StageError`] with its
//! [`ErrorKind`] (retry, give up, or wait), the stable code records and
//! metrics use, and what users are shown of it. The consumer loop
//! ([`crate::consumer`]) acts on the kind; everything below it (the blob
//! store, the stage context) returns these.

use pagestream_schemas::ErrorInfo;

/// Is retrying worth it?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// May succeed later (network, store unavailable): nak with back-off.
    Transient,
    /// Will never succeed for this message: dead-letter and terminate.
    Permanent,
    /// Not now, and not a failure (the work waits for something, e.g. a
    /// model no live replica serves): nak with
    /// [`DEFER_DELAY`](crate::consumer::DEFER_DELAY). A handler that defers
    /// must re-queue the work itself before the message reaches
    /// `max_deliver` (see `delivered` in the message info).
    Deferred,
}

/// A handler failure, with a stable code for records and metrics.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct StageError {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: String,
    pub doc_id: Option<String>,
}

impl StageError {
    pub fn transient(code: &'static str, message: impl std::fmt::Display) -> Self {
        StageError { kind: ErrorKind::Transient, code, message: message.to_string(), doc_id: None }
    }
    pub fn permanent(code: &'static str, message: impl std::fmt::Display) -> Self {
        StageError { kind: ErrorKind::Permanent, code, message: message.to_string(), doc_id: None }
    }
    pub fn deferred(code: &'static str, message: impl std::fmt::Display) -> Self {
        StageError { kind: ErrorKind::Deferred, code, message: message.to_string(), doc_id: None }
    }
    pub fn doc(mut self, doc_id: &str) -> Self {
        self.doc_id = Some(doc_id.to_string());
        self
    }
    /// Attaches the document id unless one is already set.
    pub fn or_doc(mut self, doc_id: &str) -> Self {
        self.doc_id.get_or_insert_with(|| doc_id.to_string());
        self
    }
    /// What users see of this error (status, manifests, webhooks). An
    /// error about the document itself (permanent: a PDF that does not
    /// open, a refused source; or a source fetch, whose message names only
    /// the client's own URL) keeps its message. A dependency that failed
    /// until retries ran out (NATS, the blob or result store, a local file)
    /// gets a plain reason and a reference instead: its chain names
    /// endpoints, buckets and paths, which are logged under the reference.
    /// Dead letters keep the whole message ([`StageError::detail`]).
    pub fn info(&self) -> ErrorInfo {
        if self.kind != ErrorKind::Transient || matches!(self.code, "source_fetch" | "source_timeout") {
            return self.detail();
        }
        let reference = error_reference();
        tracing::warn!(reference, code = self.code, doc_id = ?self.doc_id, detail = %self.message, "error shown to clients by reference");
        let reason = match self.code {
            "nats" | "nats_publish" => "the pipeline's message broker failed",
            "blob_store" => "the blob store (uploads and page images) failed",
            "result_store" => "the result store failed",
            "tempfile" => "a temporary file could not be written",
            "renderer" => "the renderer failed",
            _ => "an internal error occurred",
        };
        ErrorInfo::new(self.code, format!("{reason}, retries exhausted (reference {reference} in the pipeline's logs)"))
    }

    /// The whole error, internal detail included: for dead letters and logs.
    pub fn detail(&self) -> ErrorInfo {
        ErrorInfo::new(self.code, self.message.clone())
    }

    /// A payload that is not the message the stage consumes (permanent).
    pub fn bad_message(e: impl std::fmt::Display) -> Self {
        StageError::permanent("bad_message", e)
    }

    /// A publish that got no PubAck (`nats_publish`, transient).
    pub fn publish(e: impl std::fmt::Display) -> Self {
        StageError::transient("nats_publish", e)
    }

    /// A read from NATS (status, counters, events) that failed (`nats`, transient).
    pub fn nats(e: impl std::fmt::Display) -> Self {
        StageError::transient("nats", format!("{e:#}"))
    }

    /// The blob store failed (`blob_store`, transient).
    pub fn blob_store(e: impl std::fmt::Display) -> Self {
        StageError::transient("blob_store", format!("{e:#}"))
    }
}

/// A short id tying an error a client sees to the log line with its
/// detail: seconds, process id and a counter, in hex.
pub fn error_reference() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{:x}-{:x}-{:x}", secs & 0xffff_ffff, std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Anything async that failed talking to NATS or a store is worth a retry.
pub fn transient<E: std::fmt::Display>(code: &'static str) -> impl Fn(E) -> StageError {
    move |e| StageError::transient(code, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_see_a_reference_for_exhausted_dependencies_and_the_message_otherwise() {
        let store = StageError::blob_store("bucket pagestream_blobs at nats://10.0.0.3:4222: timed out").doc("d1");
        assert_eq!((store.kind, store.code, store.doc_id.as_deref()), (ErrorKind::Transient, "blob_store", Some("d1")));
        let shown = store.info();
        assert_eq!(shown.code, "blob_store");
        assert!(shown.message.starts_with("the blob store (uploads and page images) failed"), "{}", shown.message);
        assert!(shown.message.contains("reference ") && !shown.message.contains("10.0.0.3"), "{}", shown.message);
        assert!(store.detail().message.contains("10.0.0.3"), "dead letters keep the detail");
        for kept in [StageError::permanent("pdf_invalid", "not a PDF"), StageError::transient("source_fetch", "404")] {
            assert_eq!(kept.info().message, kept.message, "{kept}");
        }
        let tagged = transient::<&str>("tempfile")("disk full").or_doc("d2").or_doc("d3");
        assert_eq!((tagged.code, tagged.doc_id.as_deref()), ("tempfile", Some("d2")));
        assert_ne!(error_reference(), error_reference());
    }
}
