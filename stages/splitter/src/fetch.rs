//! Documents by reference: `source.url` fetched into the splitter's local
//! copy, streamed (never whole in memory), with the same checks as an
//! upload — size (`splitter.source_max_bytes`), time
//! (`splitter.source_timeout_secs`), the `%PDF-` signature — plus where it
//! may come from: `s3://` only from `splitter.source_s3_buckets`,
//! `http(s)://` only from public addresses or
//! `splitter.source_allow_private_hosts` (no redirects followed).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use pagestream_pipeline::config::{SplitterConfig, Target, UploaderConfig};
use pagestream_pipeline::consumer::StageError;
use pagestream_pipeline::outbound::{error_chain, Https};
use pagestream_results::store::SourceError;
use pagestream_schemas::SourceRef;
use tokio::io::AsyncWriteExt as _;

/// The HTTP client for `http(s)://` sources.
pub type HttpClient = Client<Https, Empty<Bytes>>;

pub fn http_client(cfg: &SplitterConfig) -> HttpClient {
    let allow = pagestream_pipeline::outbound::allow_set(&cfg.source_allow_private_hosts);
    pagestream_pipeline::outbound::guarded_client(allow, Duration::from_secs(30))
}

fn too_large(max: u64, got: Option<u64>) -> StageError {
    let size = got.map(|n| format!(" ({n} bytes)")).unwrap_or_default();
    StageError::permanent(
        "source_too_large",
        format!("the document is larger than splitter.source_max_bytes = {max} bytes{size}"),
    )
}

/// Streams `url` into `file`; returns the bytes written.
pub async fn fetch_url(
    cfg: &SplitterConfig,
    http: &HttpClient,
    url: &str,
    file: &mut tokio::fs::File,
) -> Result<u64, StageError> {
    let source =
        SourceRef::parse(url).map_err(|e| StageError::permanent("source_refused", format!("source.url: {e}")))?;
    let timeout = Duration::from_secs(cfg.source_timeout_secs);
    let fetched = tokio::time::timeout(timeout, async {
        match source {
            SourceRef::S3 { bucket, key } => fetch_s3(cfg, &bucket, &key, file).await,
            SourceRef::Http(url) => fetch_http(cfg, http, &url, file).await,
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(StageError::transient(
            "source_timeout",
            format!("fetching {url} took longer than splitter.source_timeout_secs = {}", cfg.source_timeout_secs),
        ))
    })?;
    file.flush().await.map_err(pagestream_pipeline::consumer::transient("tempfile"))?;
    Ok(fetched)
}

async fn fetch_s3(
    cfg: &SplitterConfig,
    bucket: &str,
    key: &str,
    file: &mut tokio::fs::File,
) -> Result<u64, StageError> {
    if !cfg.source_s3_buckets.iter().any(|b| b == bucket) {
        return Err(StageError::permanent(
            "source_refused",
            format!("bucket {bucket:?} is not one this deployment reads documents from (splitter.source_s3_buckets)"),
        ));
    }
    let s3 = UploaderConfig {
        target: Target::S3,
        s3_bucket: bucket.into(),
        s3_endpoint: cfg.source_s3_endpoint.clone(),
        s3_region: cfg.source_s3_region.clone(),
        s3_path_style: cfg.source_s3_path_style,
        s3_access_key_id: cfg.source_s3_access_key_id.clone(),
        s3_secret_access_key: cfg.source_s3_secret_access_key.clone(),
        ..UploaderConfig::default()
    };
    pagestream_results::store::s3_fetch(&s3, bucket, key, cfg.source_max_bytes, file).await.map_err(|e| match e {
        SourceError::Missing(m) => StageError::permanent("source_missing", m),
        SourceError::TooLarge(n) => too_large(cfg.source_max_bytes, Some(n)),
        SourceError::Unsupported(m) => StageError::permanent("source_unsupported", m),
        SourceError::Other(m) => StageError::transient("source_fetch", m),
    })
}

async fn fetch_http(
    cfg: &SplitterConfig,
    http: &HttpClient,
    url: &str,
    file: &mut tokio::fs::File,
) -> Result<u64, StageError> {
    pagestream_pipeline::callbacks::check_callback_url(url, &cfg.source_allow_private_hosts).map_err(|e| {
        StageError::permanent(
            "source_refused",
            e.replace("callback_url", "source.url")
                .replace("notifier.allow_private_hosts", "splitter.source_allow_private_hosts"),
        )
    })?;
    let uri: http::Uri =
        url.parse().map_err(|e| StageError::permanent("source_refused", format!("source.url is not a URL: {e}")))?;
    let req = http::Request::get(uri)
        .header(http::header::USER_AGENT, concat!("pagestream-splitter/", env!("CARGO_PKG_VERSION")))
        .header(http::header::ACCEPT, "application/pdf")
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let resp = http.request(req).await.map_err(|e| {
        let message = error_chain(&e);
        if message.contains("private, loopback or link-local") {
            StageError::permanent(
                "source_refused",
                message.replace("notifier.allow_private_hosts", "splitter.source_allow_private_hosts"),
            )
        } else {
            StageError::transient("source_fetch", format!("GET {url}: {message}"))
        }
    })?;
    let status = resp.status();
    if !status.is_success() {
        let what = format!("GET {url} answered HTTP {status}");
        return Err(match status.as_u16() {
            404 | 410 => StageError::permanent("source_missing", what),
            408 | 429 | 500..=599 => StageError::transient("source_fetch", what),
            300..=399 => StageError::permanent("source_unavailable", format!("{what} (redirects are not followed)")),
            _ => StageError::permanent("source_unavailable", what),
        });
    }
    let declared = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > cfg.source_max_bytes) {
        return Err(too_large(cfg.source_max_bytes, Some(n)));
    }
    let mut body = resp.into_body();
    let mut written = 0u64;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| StageError::transient("source_fetch", format!("GET {url}: {}", error_chain(&e))))?;
        let Ok(data) = frame.into_data() else { continue };
        written += data.len() as u64;
        if written > cfg.source_max_bytes {
            return Err(too_large(cfg.source_max_bytes, None));
        }
        file.write_all(&data).await.map_err(pagestream_pipeline::consumer::transient("tempfile"))?;
    }
    Ok(written)
}

/// The local copy must start like a PDF (`%PDF-` in its first 1024 bytes),
/// as an upload must.
pub fn check_pdf_head(head: &[u8], url: &str) -> Result<(), StageError> {
    if head.windows(5).any(|w| w == b"%PDF-") {
        return Ok(());
    }
    Err(StageError::permanent(
        "source_not_pdf",
        format!("{url} is not a PDF: no %PDF- signature in its first 1024 bytes"),
    ))
}
