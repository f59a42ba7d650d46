//! A small HTTP client for the ingress API (submit a file, read status),
//! used by the CLI, the demo and the tests.

use std::path::Path;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Clone, Debug)]
pub struct ApiClient {
    base: String,
    http: Client<HttpConnector, Body>,
}

/// An HTTP answer: status and JSON body (or the raw text as a JSON string).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub json: Value,
}

impl ApiClient {
    pub fn new(base: impl Into<String>) -> Self {
        ApiClient {
            base: base.into().trim_end_matches('/').to_string(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn send(&self, method: Method, path: &str, content_type: Option<&str>, body: Body) -> Result<Answer> {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp =
            self.http.request(req.body(body)?).await.with_context(|| format!("request to {}{path}", self.base))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let json =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Ok(Answer { status, json })
    }

    pub async fn get(&self, path: &str) -> Result<Answer> {
        self.send(Method::GET, path, None, empty()).await
    }

    /// Uploads bytes with a content type (`application/pdf`, …).
    pub async fn post_bytes(&self, path: &str, content_type: &str, bytes: Vec<u8>) -> Result<Answer> {
        self.send(Method::POST, path, Some(content_type), full(bytes)).await
    }

    /// Streams a PDF file as a raw `application/pdf` body.
    pub async fn submit_file(&self, file: &Path, title: Option<&str>) -> Result<Answer> {
        let f = tokio::fs::File::open(file).await.with_context(|| format!("opening {}", file.display()))?;
        let stream = tokio_util::io::ReaderStream::new(f).map_ok(Frame::data);
        let body: Body = BodyExt::boxed(StreamBody::new(stream));
        let filename = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let title = title.map(str::to_string).unwrap_or_else(|| filename.clone());
        let path = format!("/v1/documents?title={}&filename={}", encode_query(&title), encode_query(&filename));
        self.send(Method::POST, &path, Some("application/pdf"), body).await
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

pub fn empty() -> Body {
    full(Vec::new())
}

pub fn full(bytes: Vec<u8>) -> Body {
    BodyExt::boxed(Full::new(Bytes::from(bytes)).map_err(|never| match never {}))
}

fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
