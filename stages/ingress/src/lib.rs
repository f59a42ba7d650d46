//! Ingress: the HTTP API (hyper 1), the web page and the OpenAPI document.
//!
//! Accepts uploads, streams them to the blob store, publishes
//! `DocumentSubmitted`, and answers everything about a document from the
//! events stream: status, a list, live server-sent events, results (read
//! from the result store: files served from a local results directory,
//! presigned URLs on S3) and cancellation. Serves `/livez`, `/readyz` and
//! `/metrics` on the same listener, without authentication.
//!
//! | route | module |
//! |---|---|
//! | `POST /v1/documents`, `GET /v1/documents`, `GET/DELETE /v1/documents/{id}` | [`documents`] |
//! | `GET /v1/documents/{id}/events` | [`events`] |
//! | `GET /v1/documents/{id}/results[/pages/{n}.{png,json}]` | [`results`] |
//! | `GET /`, `GET /openapi.json` | embedded files |
//!
//! Never loads a model or opens a PDF: it only checks the signature.

pub mod documents;
pub mod error;
pub mod events;
pub mod results;
pub mod upload;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::kv;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use pagestream_pipeline::admin::admin_response;
use pagestream_pipeline::blob::BlobStore;
use pagestream_pipeline::progress::Progress;
use pagestream_pipeline::StageContext;
use pagestream_uploader::ResultStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::{ApiError, Body, Resp};

pub const STAGE: &str = "ingress";

/// The OpenAPI 3 description of every route.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");
/// The web page served at `/`.
pub const INDEX_HTML: &str = include_str!("../web/index.html");

/// Shared state of the API.
pub struct Ingress {
    ctx: StageContext,
    blobs: BlobStore,
    progress: Progress,
    results: ResultStore,
    idempotency: kv::Store,
    tokens: Vec<String>,
    /// Ends live event streams when the server stops.
    shutdown: CancellationToken,
}

impl Ingress {
    pub async fn new(ctx: StageContext, shutdown: CancellationToken) -> Result<Self> {
        let blobs = ctx.blobs().await?;
        let progress = ctx.progress(STAGE);
        let results = ResultStore::open(&ctx.config.uploader).await;
        let idempotency = pagestream_pipeline::nats::idempotency_store(&ctx.js, &ctx.names).await?;
        let tokens = ctx.config.ingress.tokens();
        Ok(Ingress { ctx, blobs, progress, results, idempotency, tokens, shutdown })
    }

    fn read_timeout(&self) -> Duration {
        Duration::from_secs(self.ctx.config.ingress.read_timeout_secs)
    }

    /// `Ok(token)` when the request may use `/v1` (the token, or "" when
    /// authentication is off).
    fn authorize(&self, req: &Request<Incoming>) -> Result<String, ApiError> {
        if self.tokens.is_empty() {
            return Ok(String::new());
        }
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("this API requires `Authorization: Bearer <token>`"))?;
        let given = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
        // Compare against every token in constant time, so timing says nothing.
        let mut found = None;
        for t in &self.tokens {
            if bool::from(subtle::ConstantTimeEq::ct_eq(t.as_bytes(), given.as_bytes())) {
                found = Some(t.clone());
            }
        }
        found.ok_or_else(|| unauthorized("the bearer token is not valid"))
    }

    async fn route(&self, req: Request<Incoming>) -> (&'static str, Resp) {
        let path = req.uri().path().to_string();
        if let Some(resp) = admin_response(&path, &self.ctx.health, &self.ctx.metrics) {
            return ("admin", resp.map(|b| b.map_err(|never| match never {}).boxed()));
        }
        let method = req.method().clone();
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        // The caller's token ("" when authentication is off) scopes its
        // idempotency keys.
        let mut token = String::new();
        if segments.first() == Some(&"v1") {
            match self.authorize(&req) {
                Ok(t) => token = t,
                Err(e) => {
                    // Read a small body so the client gets the 401, not a reset.
                    upload::drain(req.into_body(), 1 << 20, self.read_timeout()).await;
                    return ("unauthorized", e.response());
                }
            }
        }
        let (route, outcome) = match (segments.as_slice(), &method) {
            ([] | [""], &Method::GET) => {
                ("index", Ok(error::bytes_response(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML)))
            }
            (["openapi.json"], &Method::GET) => {
                ("openapi", Ok(error::bytes_response(StatusCode::OK, "application/json", OPENAPI_JSON)))
            }
            (["v1", "documents"], &Method::POST) => ("submit", self.submit(req, &token).await),
            (["v1", "documents"], &Method::GET) => ("list", self.list(req.uri().query().unwrap_or("")).await),
            (["v1", "documents", id], &Method::GET) => ("status", self.status(id).await),
            (["v1", "documents", id], &Method::DELETE) => ("cancel", self.cancel(id).await),
            (["v1", "documents", id, "events"], &Method::GET) => ("events", self.events(id, &req).await),
            (["v1", "documents", id, "results"], &Method::GET) => ("results", self.results(id).await),
            (["v1", "documents", id, "results", "manifest.json"], &Method::GET) => {
                ("result_manifest", self.result_manifest(id).await)
            }
            (["v1", "documents", id, "results", "pages", file], &Method::GET) => {
                ("result_file", self.result_file(id, file).await)
            }
            (["v1", "documents"] | ["v1", "documents", _] | ["v1", "documents", _, "events" | "results"], _)
            | ([] | [""] | ["openapi.json"], _) => (
                "method_not_allowed",
                Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{method} is not allowed on {path}"),
                )),
            ),
            _ => ("not_found", Err(ApiError::not_found(format!("no route for {method} {path}")))),
        };
        (route, outcome.unwrap_or_else(|e| e.response()))
    }
}

/// Serves the API on `listener` until `shutdown`, then lets in-flight
/// requests finish (live event streams are ended).
pub async fn serve(ctx: StageContext, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    ctx.health.register(STAGE);
    let ingress = Arc::new(Ingress::new(ctx.clone(), shutdown.clone()).await?);
    ctx.health.set_ready(STAGE, true);
    tracing::info!(addr = %listener.local_addr()?, auth = !ingress.tokens.is_empty(), "ingress listening");
    let graceful = GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that does not finish sending its headers in time is dropped;
    // slow bodies are cut by `upload::idle_timeout`.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(ingress.read_timeout());
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
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => tracing::warn!("ingress: connections still open after 10 s"),
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

/// `key=value` pairs of a query string, percent-decoded.
pub fn url_query(q: &str) -> Vec<(String, String)> {
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

    #[test]
    fn openapi_is_valid_json_with_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        for path in [
            "/v1/documents",
            "/v1/documents/{id}",
            "/v1/documents/{id}/events",
            "/v1/documents/{id}/results",
            "/v1/documents/{id}/results/pages/{file}",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} is documented");
        }
    }
}
