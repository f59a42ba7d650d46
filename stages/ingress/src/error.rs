//! API errors: always JSON, `{"error": {"code", "message"}}`, with the HTTP
//! status that says who must act. Also the response body type every route
//! returns (a whole buffer or a stream, for server-sent events).

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// Every response body: a buffer or a stream of frames.
pub type Body = BoxBody<Bytes, std::io::Error>;
pub type Resp = Response<Body>;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// A dependency (NATS, the blob or result store) failed. The detail —
    /// internal names, addresses, error chains — goes to the log under a
    /// reference; the client gets the reference and a retry hint, also as
    /// `Retry-After` (a NATS cluster elects a new stream leader within a few
    /// seconds of losing a node: scripts/compose-check saw one such 503).
    pub fn unavailable(detail: impl Into<String>) -> Self {
        let reference = next_reference();
        tracing::warn!(reference, detail = %detail.into(), "answering 503 unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "a service the API depends on is unavailable; retry shortly (reference {reference} in the server log)"
            ),
        )
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    pub fn response(&self) -> Resp {
        let mut resp =
            json_response(self.status, &serde_json::json!({"error": {"code": self.code, "message": self.message}}));
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
        }
        if self.code == "unavailable" {
            resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(RETRY_UNAVAILABLE_SECS));
        }
        resp
    }
}

/// `Retry-After` of a 503 `unavailable`.
pub const RETRY_UNAVAILABLE_SECS: u32 = 2;

/// A short id tying a client-visible error to its log line.
fn next_reference() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{:x}-{:x}", secs & 0xffff_ffff, COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Resp {
    bytes_response(status, "application/json", serde_json::to_vec(body).expect("JSON value serialises"))
}

pub fn bytes_response(status: StatusCode, content_type: &str, bytes: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(full(bytes))
        .expect("valid response")
}
