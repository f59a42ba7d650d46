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
//! | `GET /v1/models`, `GET /v1/capacity` | [`models`] |
//! | `GET /`, `GET /openapi.json` | embedded files |
//!
//! Never loads a model or opens a PDF: it only checks the signature.

mod config;
pub mod documents;
pub mod error;
pub mod events;
pub mod hosts;
pub mod models;
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
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use pagestream_pipeline::admin::{admin_response, AcceptBackoff};
use pagestream_pipeline::blob::BlobStore;
use pagestream_pipeline::progress::Progress;
use pagestream_pipeline::registry::LiveModels;
use pagestream_pipeline::StageContext;
use pagestream_results::ResultStore;
use sha2::Digest as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{IngressConfig, Settings, SourceView, WebhookView};
pub use error::{ApiError, Body, Resp};

pub const STAGE: &str = "ingress";

/// The OpenAPI 3 description of every route.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");
/// The web page served at `/`.
pub const INDEX_HTML: &str = include_str!("../web/index.html");

/// Shared state of the API.
pub struct Ingress {
    ctx: StageContext,
    /// `[ingress]` and the views it needs.
    cfg: Settings,
    blobs: BlobStore,
    progress: Progress,
    results: ResultStore,
    idempotency: kv::Store,
    tokens: Vec<String>,
    admin_tokens: Vec<String>,
    /// Models live inferencers serve.
    live: LiveModels,
    /// Slots for live event streams (`ingress.max_event_streams`).
    event_streams: Arc<tokio::sync::Semaphore>,
    /// Live event streams per token (`ingress.max_event_streams_per_token`).
    token_streams: TokenSlots,
    /// Ends live event streams when the server stops.
    shutdown: CancellationToken,
    /// Webhook deliveries (when webhooks are on): shown in status.
    callbacks: Option<pagestream_pipeline::callbacks::CallbackStore>,
    /// Host names answered (`ingress.allowed_hosts`): 421 for others.
    hosts: hosts::AllowedHosts,
}

impl Ingress {
    pub async fn new(
        ctx: StageContext,
        cfg: Settings,
        shutdown: CancellationToken,
        hosts: hosts::AllowedHosts,
    ) -> Result<Self> {
        let blobs = ctx.blobs().await?;
        let progress = ctx.progress(STAGE);
        let results = ResultStore::open(&cfg.results).await?;
        let idempotency =
            pagestream_pipeline::nats::idempotency_store(&ctx.js, &ctx.names, ctx.config.nats.replicas).await?;
        let tokens = cfg.ingress.api_tokens.clone();
        let admin_tokens = cfg.ingress.admin_tokens.clone();
        let event_streams = Arc::new(tokio::sync::Semaphore::new(cfg.ingress.max_event_streams));
        let live = LiveModels::watch(&ctx.js, &ctx.names, shutdown.child_token()).await?;
        let token_streams = TokenSlots::new(cfg.ingress.max_event_streams_per_token);
        let callbacks = if !cfg.webhooks.on() {
            None
        } else {
            Some(
                pagestream_pipeline::callbacks::CallbackStore::open(&ctx.js, &ctx.names, ctx.config.nats.replicas)
                    .await?,
            )
        };
        Ok(Ingress {
            cfg,
            hosts,
            callbacks,
            ctx,
            blobs,
            progress,
            results,
            idempotency,
            tokens,
            admin_tokens,
            live,
            event_streams,
            token_streams,
            shutdown,
        })
    }

    fn read_timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.ingress.read_timeout_secs)
    }

    /// How fast a request that starts now must send its body.
    fn pace(&self) -> upload::Pace {
        let c = &self.cfg.ingress;
        upload::Pace {
            idle: self.read_timeout(),
            min_bytes_per_sec: c.min_upload_bytes_per_sec,
            deadline: tokio::time::Instant::now() + Duration::from_secs(c.request_timeout_secs),
            deadline_secs: c.request_timeout_secs,
        }
    }

    /// Who is calling `/v1`: open access when no token is configured,
    /// else the bearer token's identity (401 without a valid one).
    fn authorize(&self, req: &Request<Incoming>) -> Result<Caller, ApiError> {
        if self.tokens.is_empty() && self.admin_tokens.is_empty() {
            return Ok(Caller { token: String::new(), owner: None, admin: true });
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
        for (list, admin) in [(&self.tokens, false), (&self.admin_tokens, true)] {
            for t in list {
                if bool::from(subtle::ConstantTimeEq::ct_eq(t.as_bytes(), given.as_bytes())) {
                    found = Some((t.clone(), admin));
                }
            }
        }
        let (token, admin) = found.ok_or_else(|| unauthorized("the bearer token is not valid"))?;
        let owner = Some(pagestream_pipeline::tenants::owner_id(&token));
        Ok(Caller { token, owner, admin })
    }

    async fn route(&self, req: Request<Incoming>) -> (&'static str, Resp) {
        let path = req.uri().path().to_string();
        if let Some(resp) = admin_response(req.method(), &path, &self.ctx.health, &self.ctx.metrics) {
            return ("admin", resp.map(|b| b.map_err(|never| match never {}).boxed()));
        }
        // Every route but the probes: a name this server does not answer
        // to is a DNS-rebinding page's (see `hosts`).
        if let Err(e) = self.hosts.check(&req) {
            upload::drain(req.into_body(), 1 << 20, self.pace()).await;
            return ("misdirected_request", e.response());
        }
        let method = req.method().clone();
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        // Who calls: scopes idempotency keys and which documents it sees.
        let mut caller = Caller::default();
        if segments.first() == Some(&"v1") {
            let checked = self.authorize(&req).and_then(|c| {
                if method == Method::GET || method == Method::HEAD {
                    Ok(c)
                } else {
                    same_origin(&req).map(|()| c)
                }
            });
            match checked {
                Ok(c) => caller = c,
                Err(e) => {
                    // Read a small body so the client gets the answer, not a reset.
                    upload::drain(req.into_body(), 1 << 20, self.pace()).await;
                    let route = if e.status == StatusCode::FORBIDDEN { "cross_origin" } else { "unauthorized" };
                    return (route, e.response());
                }
            }
        }
        let (route, outcome) = match (segments.as_slice(), &method) {
            ([] | [""], &Method::GET) => ("index", Ok(index_response())),
            (["openapi.json"], &Method::GET) => {
                ("openapi", Ok(error::bytes_response(StatusCode::OK, "application/json", OPENAPI_JSON)))
            }
            (["v1", "documents"], &Method::POST) => ("submit", self.submit(req, &caller).await),
            (["v1", "documents"], &Method::GET) => ("list", self.list(&caller, req.uri().query().unwrap_or("")).await),
            (["v1", "models"], &Method::GET) => ("models", self.models()),
            (["v1", "capacity"], &Method::GET) => ("capacity", self.capacity(&caller).await),
            (["v1", "documents", id], &Method::GET) => ("status", self.status(&caller, id).await),
            (["v1", "documents", id], &Method::DELETE) => ("cancel", self.cancel(&caller, id).await),
            (["v1", "documents", id, "events"], &Method::GET) => ("events", self.events(&caller, id, &req).await),
            (["v1", "documents", id, "results"], &Method::GET) => {
                ("results", self.results(&caller, id, req.uri().query().unwrap_or("")).await)
            }
            (["v1", "documents", id, "results", "manifest.json"], &Method::GET) => {
                ("result_manifest", self.result_manifest(&caller, id).await)
            }
            (["v1", "documents", id, "results", "pages", file], &Method::GET) => {
                ("result_file", self.result_file(&caller, id, file).await)
            }
            (segments, _) => match allowed_methods(segments) {
                Some(allow) => {
                    let e = ApiError::new(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "method_not_allowed",
                        format!("{method} is not allowed on {path}; allowed: {allow}"),
                    );
                    let mut resp = e.response();
                    resp.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
                    return ("method_not_allowed", resp);
                }
                None => ("not_found", Err(ApiError::not_found(format!("no route for {method} {path}")))),
            },
        };
        (route, outcome.unwrap_or_else(|e| e.response()))
    }
}

/// Counted slots per token: one token cannot take every live event stream.
#[derive(Clone)]
pub(crate) struct TokenSlots {
    max: usize,
    held: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// One token's slot, given back when dropped.
pub(crate) struct TokenSlot {
    slots: TokenSlots,
    owner: String,
}

impl TokenSlots {
    fn new(max: usize) -> Self {
        TokenSlots { max, held: Arc::default() }
    }

    /// A slot for `owner` (`None`: no tokens configured, or no limit), or
    /// `Err(max)` when the token already holds `max`.
    pub(crate) fn acquire(&self, owner: Option<&str>) -> Result<Option<TokenSlot>, usize> {
        let Some(owner) = owner.filter(|_| self.max > 0) else { return Ok(None) };
        let mut held = self.held.lock().expect("token slots");
        let n = held.entry(owner.to_string()).or_default();
        if *n >= self.max {
            return Err(self.max);
        }
        *n += 1;
        Ok(Some(TokenSlot { slots: self.clone(), owner: owner.to_string() }))
    }
}

impl Drop for TokenSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().expect("token slots");
        if let Some(n) = held.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.owner);
            }
        }
    }
}

/// Who calls `/v1`.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The bearer token ("" when authentication is off): scopes idempotency keys.
    pub token: String,
    /// The token's opaque id, recorded as the owner of what it submits.
    pub owner: Option<String>,
    /// Sees every document (an admin token, or authentication off).
    pub admin: bool,
}

impl Caller {
    /// Whether this caller may see a document, decided by its durable
    /// record (never by its events, which the events stream may discard):
    /// admins see all; a token sees what its record names it the owner of,
    /// and documents whose record has no owner (published on NATS without
    /// one). A document without a record is shown to admins only, or to
    /// the owner its `queued` event still names (documents older than
    /// records): an unknown owner fails closed.
    pub fn sees(
        &self,
        status: &pagestream_pipeline::progress::DocStatus,
        record: Option<&pagestream_pipeline::records::DocRecord>,
    ) -> bool {
        if self.admin {
            return true;
        }
        match record {
            Some(r) => r.owner.is_none() || r.owner == self.owner,
            None => status.info.owner.is_some() && status.info.owner == self.owner,
        }
    }

    /// The tenant this caller submits as (its owner id, or `anonymous`).
    pub fn tenant(&self) -> &str {
        pagestream_pipeline::tenants::tenant_of(self.owner.as_deref())
    }
}

/// The methods a route answers (the `Allow` header of a 405), or `None`
/// when the path is no route at all.
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    match segments {
        [] | [""] | ["openapi.json"] | ["v1", "models"] | ["v1", "capacity"] => Some("GET"),
        ["v1", "documents"] => Some("GET, POST"),
        ["v1", "documents", _] => Some("GET, DELETE"),
        ["v1", "documents", _, "events" | "results"]
        | ["v1", "documents", _, "results", "manifest.json"]
        | ["v1", "documents", _, "results", "pages", _] => Some("GET"),
        _ => None,
    }
}

/// A state-changing request sent by a browser from another site is refused
/// (403 `cross_origin`): without it any page the user visits could post
/// documents to a local API. Browsers send `Origin` (and `Sec-Fetch-Site`)
/// on such requests; clients that are not browsers send neither.
fn same_origin(req: &Request<Incoming>) -> Result<(), ApiError> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let refuse = |why: String| Err(ApiError::new(StatusCode::FORBIDDEN, "cross_origin", why));
    if header("sec-fetch-site") == Some("cross-site") {
        return refuse("cross-site requests may not change documents (Sec-Fetch-Site: cross-site)".into());
    }
    let Some(origin) = header("origin") else { return Ok(()) };
    let origin_host = origin.split_once("://").map(|(_, rest)| rest.trim_end_matches('/'));
    match (origin_host, header("host")) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => refuse(format!(
            "Origin {origin:?} is not this server ({}); cross-origin requests may not change documents",
            header("host").unwrap_or("no Host header")
        )),
    }
}

/// The web page, with a Content-Security-Policy that allows only its own
/// inline script (by hash) and same-origin requests.
fn index_response() -> Resp {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let csp = CSP.get_or_init(|| {
        let script = INDEX_HTML
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map(|(body, _)| body)
            .unwrap_or_default();
        let hash = pagestream_pipeline::util::base64(&sha2::Sha256::digest(script.as_bytes()), false);
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
             img-src 'self' data: blob: http: https:; connect-src 'self'; \
             base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        )
    });
    let mut resp = error::bytes_response(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML);
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_SECURITY_POLICY, http::HeaderValue::from_str(csp).expect("ASCII policy"));
    h.insert(http::header::X_FRAME_OPTIONS, http::HeaderValue::from_static("DENY"));
    h.insert(http::header::REFERRER_POLICY, http::HeaderValue::from_static("no-referrer"));
    resp
}

/// Answers a connection over `ingress.max_connections` with 503 and closes
/// it, without reading its request.
async fn refuse_connection(mut stream: tokio::net::TcpStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::json!({"error": {
        "code": "too_many_connections",
        "message": format!("the server has {max} open connections (ingress.max_connections); retry shortly"),
    }})
    .to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Serves the API on `listener` until `shutdown`, then lets in-flight
/// requests finish (live event streams are ended).
pub async fn serve(ctx: StageContext, cfg: Settings, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    ctx.health.register(STAGE);
    let hosts =
        hosts::AllowedHosts::new(&cfg.ingress.allowed_hosts, listener.local_addr()?).map_err(anyhow::Error::msg)?;
    tracing::info!(allowed_hosts = %hosts.describe(), "ingress answers these host names");
    let ingress = Arc::new(Ingress::new(ctx.clone(), cfg, shutdown.clone(), hosts).await?);
    ctx.health.set_ready(STAGE, true);
    tracing::info!(addr = %listener.local_addr()?, auth = !(ingress.tokens.is_empty() && ingress.admin_tokens.is_empty()), "ingress listening");
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // HTTP/1.1 only (no HTTP/2 is served). The header timer starts when the
    // connection is accepted: a client that sends nothing is dropped after
    // `read_timeout_secs`; slow bodies are cut by `upload::paced`.
    builder.timer(TokioTimer::new()).header_read_timeout(ingress.read_timeout()).max_buf_size(64 * 1024);
    let max_connections = ingress.cfg.ingress.max_connections;
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut backoff = AcceptBackoff::default();
    loop {
        let (stream, _) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff.reset();
                    a
                }
                Err(e) => {
                    backoff.wait(STAGE, &e).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            ingress.ctx.metrics.http("too_many_connections", 503, Duration::ZERO);
            tokio::spawn(refuse_connection(stream, max_connections));
            continue;
        };
        let ingress = ingress.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let ingress = ingress.clone();
            async move {
                let started = std::time::Instant::now();
                let (route, mut resp) = ingress.route(req).await;
                ingress.ctx.metrics.http(route, resp.status().as_u16(), started.elapsed());
                resp.headers_mut()
                    .insert(http::header::X_CONTENT_TYPE_OPTIONS, http::HeaderValue::from_static("nosniff"));
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => tracing::warn!("ingress: connections still open after 10 s"),
    }
    Ok(())
}

/// Binds `ingress.addr` and serves.
pub async fn run(ctx: StageContext, cfg: Settings, shutdown: CancellationToken) -> Result<()> {
    let addr = cfg.ingress.addr.clone();
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("ingress: cannot listen on {addr}: {e} (set PAGESTREAM_INGRESS_ADDR)"))?;
    serve(ctx, cfg, listener, shutdown).await
}

/// The `ingress` executable: its settings from the configuration sources,
/// its admin endpoints, [`run`] until SIGTERM. `pagestream` runs this
/// too when it is called `ingress` (a link to it, as in the container image).
pub async fn binary() -> Result<()> {
    pagestream_pipeline::bin::run_stage(
        STAGE,
        "ingress — HTTP API: upload PDFs, follow their progress",
        Settings::read,
        // The API listener serves /livez, /readyz and /metrics itself.
        |_| String::new(),
        run,
    )
    .await
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
