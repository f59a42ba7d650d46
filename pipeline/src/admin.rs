//! The admin endpoints every process serves: `/livez`, `/readyz` (503 with
//! the components still starting), `/metrics` (Prometheus text).
//! The ingress mounts the same routes on its API listener.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Metrics;

/// Answers an admin route, or `None` when `path` is not one. Only `GET`
/// and `HEAD` are allowed (405 with `Allow` otherwise).
pub fn admin_response(
    method: &http::Method,
    path: &str,
    health: &Health,
    metrics: &Metrics,
) -> Option<Response<Full<Bytes>>> {
    if !matches!(path, "/livez" | "/readyz" | "/metrics") {
        return None;
    }
    if method != http::Method::GET && method != http::Method::HEAD {
        return Some(
            Response::builder()
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .header("content-type", "application/json")
                .header("allow", "GET, HEAD")
                .body(Full::new(Bytes::from(
                    serde_json::json!({"error": {"code": "method_not_allowed", "message": format!("{method} is not allowed on {path}; use GET")}})
                        .to_string(),
                )))
                .expect("static response"),
        );
    }
    let (status, ctype, body) = match path {
        "/livez" => (StatusCode::OK, "application/json", r#"{"status":"alive"}"#.to_string()),
        "/readyz" => match health.not_ready() {
            None => (StatusCode::OK, "application/json", r#"{"status":"ready"}"#.to_string()),
            Some(waiting) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                serde_json::json!({"status": "not_ready", "waiting_for": waiting}).to_string(),
            ),
        },
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics.encode()),
        _ => return None,
    };
    Some(
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("static response"),
    )
}

/// Serves the admin routes on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, health: Health, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff.reset();
                    a
                }
                Err(e) => {
                    backoff.wait("admin", &e).await;
                    continue;
                }
            },
        };
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = admin_response(req.method(), req.uri().path(), &health, &metrics).unwrap_or_else(|| {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(
                            br#"{"error":{"code":"not_found","message":"admin routes: /livez /readyz /metrics"}}"#,
                        )))
                        .expect("static response")
                });
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Sleeps after a failed `accept` (EMFILE, ENFILE, ENOBUFS…): 10 ms,
/// doubling to 1 s, so a process out of descriptors does not spin.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    delay_ms: u64,
}

impl AcceptBackoff {
    pub async fn wait(&mut self, what: &str, err: &std::io::Error) {
        self.delay_ms = (self.delay_ms * 2).clamp(10, 1000);
        tracing::warn!(listener = what, error = %err, delay_ms = self.delay_ms, "accept failed; backing off");
        tokio::time::sleep(std::time::Duration::from_millis(self.delay_ms)).await;
    }

    pub fn reset(&mut self) {
        self.delay_ms = 0;
    }
}
