//! A small HTTP client for the ingress API (submit, status, list, results,
//! cancel, server-sent events), used by the CLI, the demo and the tests.
//! `http://` and `https://` (rustls: the system's roots, plus a private CA
//! with [`ApiClient::with_ca_cert`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use pagestream_pipeline::progress::DocState;
use serde_json::Value;

type Body = BoxBody<Bytes, std::io::Error>;
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

#[derive(Clone, Debug)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: Client<Connector, Body>,
}

/// TLS for `https://` URLs: the system's root certificates, and those of
/// the PEM file `ca_cert` (a private CA) when given.
pub fn tls_config(ca_cert: Option<&Path>) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_cert {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .with_context(|| format!("reading the CA certificates in {}", path.display()))?;
        anyhow::ensure!(!certs.is_empty(), "{} holds no PEM certificate", path.display());
        for cert in certs {
            roots.add(cert).with_context(|| format!("a certificate in {} is not a usable CA", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn http_client(tls: rustls::ClientConfig) -> Client<Connector, Body> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub kind: String,
    pub data: Value,
}

/// Splits complete `\n\n`-terminated SSE blocks off `buf`.
pub fn parse_sse(buf: &mut String) -> Vec<SseEvent> {
    let mut out = Vec::new();
    while let Some(cut) = buf.find("\n\n") {
        let block: String = buf.drain(..cut + 2).collect();
        let (mut id, mut kind, mut data) = (None, "message".to_string(), String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("event: ") {
                kind = v.to_string();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            }
        }
        if !data.is_empty() {
            let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
            out.push(SseEvent { id, kind, data });
        }
    }
    out
}

/// An HTTP answer: status and JSON body (or the raw text as a JSON string).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub json: Value,
}

impl ApiClient {
    /// A client of the API at `base` (`http://` or `https://`, verified
    /// against the system's roots).
    pub fn new(base: impl Into<String>) -> Self {
        let tls = tls_config(None).expect("TLS without a CA file cannot fail");
        ApiClient { base: base.into().trim_end_matches('/').to_string(), token: None, http: http_client(tls) }
    }

    /// Also trusts the CA certificates of the PEM file `ca_cert` (a private
    /// CA: `--ca-cert`, `PAGESTREAM_CA_CERT`).
    pub fn with_ca_cert(mut self, ca_cert: Option<&Path>) -> Result<Self> {
        if ca_cert.is_some() {
            self.http = http_client(tls_config(ca_cert)?);
        }
        Ok(self)
    }

    /// The same connections and TLS settings for another base URL, without
    /// the token (a presigned link on the result store's host).
    pub fn at(&self, base: impl Into<String>) -> Self {
        ApiClient { base: base.into().trim_end_matches('/').to_string(), token: None, http: self.http.clone() }
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> http::request::Builder {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        req
    }

    /// Sends a request with extra headers; the raw response.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<http::Response<hyper::body::Incoming>> {
        let mut req = self.request(method, path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.http.request(req.body(body)?).await.with_context(|| format!("request to {}{path}", self.base))
    }

    pub async fn send(&self, method: Method, path: &str, content_type: Option<&str>, body: Body) -> Result<Answer> {
        let headers: Vec<(&str, &str)> = content_type.map(|ct| ("content-type", ct)).into_iter().collect();
        let resp = self.raw(method, path, &headers, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let json =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Ok(Answer { status, json })
    }

    pub async fn get(&self, path: &str) -> Result<Answer> {
        self.send(Method::GET, path, None, empty()).await
    }

    pub async fn delete(&self, path: &str) -> Result<Answer> {
        self.send(Method::DELETE, path, None, empty()).await
    }

    /// GETs raw bytes (page images, JSON files).
    pub async fn get_bytes(&self, path: &str) -> Result<(StatusCode, Bytes)> {
        let resp = self.raw(Method::GET, path, &[], empty()).await?;
        let status = resp.status();
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    }

    /// Follows a document's server-sent events, calling `on_event` for each,
    /// until the stream ends at a terminal state. A dropped connection is
    /// resumed with `Last-Event-ID`. Returns the last event's data.
    pub async fn follow_events(&self, id: &str, on_event: impl FnMut(&SseEvent)) -> Result<Option<Value>> {
        self.follow_events_with(id, "", on_event).await
    }

    /// [`ApiClient::follow_events`] with a query string for the events
    /// route (`detections=1`: uploaded pages carry their detections).
    pub async fn follow_events_with(
        &self,
        id: &str,
        query: &str,
        mut on_event: impl FnMut(&SseEvent),
    ) -> Result<Option<Value>> {
        let path = if query.is_empty() {
            format!("/v1/documents/{id}/events")
        } else {
            format!("/v1/documents/{id}/events?{query}")
        };
        let mut last_id: Option<String> = None;
        let mut last: Option<Value> = None;
        let mut failures = 0;
        loop {
            let headers: Vec<(&str, &str)> = last_id.as_deref().map(|l| ("last-event-id", l)).into_iter().collect();
            let attempt = self.raw(Method::GET, &path, &headers, empty()).await;
            let mut resp = match attempt {
                Ok(r) if r.status().is_success() => r,
                // The server is restarting or NATS is briefly away: retry.
                Ok(r) if r.status().is_server_error() && failures < 10 => {
                    failures += 1;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
                Ok(r) => {
                    let status = r.status();
                    let body = r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    anyhow::bail!("events of {id}: HTTP {status}: {}", String::from_utf8_lossy(&body));
                }
                Err(e) if failures < 10 => {
                    failures += 1;
                    tracing::debug!(error = %e, "event stream connect failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut buf = String::new();
            let mut terminal = false;
            while let Some(frame) = resp.body_mut().frame().await {
                let Ok(frame) = frame else { break };
                let Ok(data) = frame.into_data() else { continue };
                buf.push_str(&String::from_utf8_lossy(&data));
                for ev in parse_sse(&mut buf) {
                    failures = 0;
                    if ev.id.is_some() {
                        last_id = ev.id.clone();
                    }
                    terminal |= ev.kind == "state" && is_terminal(ev.data["state"].as_str().unwrap_or(""));
                    on_event(&ev);
                    last = Some(ev.data);
                }
            }
            if terminal {
                return Ok(last);
            }
            failures += 1;
            if failures > 10 {
                anyhow::bail!("events of {id}: the stream kept ending before the document finished");
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// POSTs a JSON body (a document by reference), with an optional
    /// `Idempotency-Key`.
    pub async fn post_json(&self, path: &str, body: &Value, idempotency_key: Option<&str>) -> Result<Answer> {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(k) = idempotency_key {
            headers.push(("idempotency-key", k));
        }
        let resp = self.raw(Method::POST, path, &headers, full(serde_json::to_vec(body)?)).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let json =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Ok(Answer { status, json })
    }

    /// Uploads bytes with a content type (`application/pdf`, …).
    pub async fn post_bytes(&self, path: &str, content_type: &str, bytes: Vec<u8>) -> Result<Answer> {
        self.send(Method::POST, path, Some(content_type), full(bytes)).await
    }

    /// Streams a PDF file as a raw `application/pdf` body.
    pub async fn submit_file(&self, file: &Path, title: Option<&str>) -> Result<Answer> {
        self.submit_file_with(file, title, &[], None).await
    }

    /// Streams a PDF with extra query options (`dpi`, `model`, …) and an
    /// optional `Idempotency-Key`.
    pub async fn submit_file_with(
        &self,
        file: &Path,
        title: Option<&str>,
        options: &[(&str, String)],
        idempotency_key: Option<&str>,
    ) -> Result<Answer> {
        let f = tokio::fs::File::open(file).await.with_context(|| format!("opening {}", file.display()))?;
        let stream = tokio_util::io::ReaderStream::new(f).map_ok(Frame::data);
        let body: Body = BodyExt::boxed(StreamBody::new(stream));
        let filename = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let title = title.map(str::to_string).unwrap_or_else(|| filename.clone());
        let mut path = format!("/v1/documents?title={}&filename={}", encode_query(&title), encode_query(&filename));
        for (k, v) in options {
            path += &format!("&{k}={}", encode_query(v));
        }
        let mut headers = vec![("content-type", "application/pdf")];
        if let Some(key) = idempotency_key {
            headers.push(("idempotency-key", key));
        }
        let resp = self.raw(Method::POST, &path, &headers, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let json =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Ok(Answer { status, json })
    }

    /// Uploads as `multipart/form-data` with a `file` part and text fields.
    pub async fn submit_multipart(&self, filename: &str, bytes: Vec<u8>, fields: &[(&str, &str)]) -> Result<Answer> {
        let boundary = "pagestream-boundary-7d9f";
        let mut body = Vec::new();
        for (k, v) in fields {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").as_bytes(),
            );
        }
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/pdf\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(&bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let ct = format!("multipart/form-data; boundary={boundary}");
        self.send(Method::POST, "/v1/documents", Some(&ct), full(body)).await
    }
}

/// A state (as the API writes it) after which nothing changes.
pub fn is_terminal(state: &str) -> bool {
    DocState::parse(state).is_some_and(DocState::is_terminal)
}

/// The `state` of a document's status JSON.
pub fn doc_state(status: &serde_json::Value) -> Option<DocState> {
    status["state"].as_str().and_then(DocState::parse)
}

pub fn empty() -> Body {
    full(Vec::new())
}

pub fn full(bytes: Vec<u8>) -> Body {
    BodyExt::boxed(Full::new(Bytes::from(bytes)).map_err(|never| match never {}))
}

pub fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parsing_keeps_partial_blocks() {
        let mut buf = "retry: 2000\n\nid: 4\nevent: page\ndata: {\"page\":1}\n\nid: 5\nevent: st".to_string();
        let evs = parse_sse(&mut buf);
        assert_eq!(evs.len(), 1, "the retry-only block carries no data");
        assert_eq!(
            evs[0],
            SseEvent { id: Some("4".into()), kind: "page".into(), data: serde_json::json!({"page": 1}) }
        );
        assert_eq!(buf, "id: 5\nevent: st");
        buf.push_str("ate\ndata: {\"state\":\"completed\"}\n\n");
        let evs = parse_sse(&mut buf);
        assert_eq!((evs[0].kind.as_str(), evs[0].data["state"].as_str()), ("state", Some("completed")));
        assert!(buf.is_empty());
    }
}
