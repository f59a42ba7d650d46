//! The admin endpoints every process serves: `/livez`, `/readyz` (503 with
//! the components still starting), `/metrics` (Prometheus text).
//! The ingress mounts the same routes on its API listener.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Metrics;

/// Answers an admin route, or `None` when `path` is not one.
pub fn admin_response(path: &str, health: &Health, metrics: &Metrics) -> Option<Response<Full<Bytes>>> {
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
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = admin_response(req.uri().path(), &health, &metrics).unwrap_or_else(|| {
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
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
