//! Where results go: a local directory or an S3 bucket, behind one type with
//! the same keys. Writes are atomic — temp file + rename on disk, a single
//! PUT on S3 — so no half-written object is ever visible, and a rewrite of
//! the same key replaces, never duplicates.
//!
//! S3 support is the cargo feature `s3` (the AWS SDK is the largest part of
//! a first build): builds of the whole workspace include it, `scripts/demo`
//! (results in a local directory) does not. Without it `target = "s3"` is
//! refused at start with that explanation.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
#[cfg(feature = "s3")]
use aws_sdk_s3::primitives::ByteStream;
use pagestream_pipeline::config::S3Connection;

use crate::config::{ResultsConfig, Target};

#[derive(Debug, Clone)]
pub enum ResultStore {
    Local {
        root: PathBuf,
    },
    #[cfg(feature = "s3")]
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
    },
}

/// The refusal of `target = "s3"` by a build without the `s3` feature.
#[cfg(not(feature = "s3"))]
fn no_s3() -> anyhow::Error {
    anyhow::anyhow!(
        "uploader.target = \"s3\", but this binary was built without S3 support (cargo feature `s3` of \
         pagestream-results): build the workspace (`cargo build --release --bins`) or add \
         `--features pagestream-results/s3`"
    )
}

impl ResultStore {
    /// Builds the store from config and checks it is usable (directory
    /// writable, bucket reachable), failing with a precise message.
    pub async fn from_config(cfg: &ResultsConfig) -> Result<ResultStore> {
        match cfg.target {
            #[cfg(not(feature = "s3"))]
            Target::S3 => Err(no_s3()),
            #[cfg(feature = "s3")]
            Target::S3 => {
                let client = s3_client(&cfg.s3_connection()).await;
                client
                    .head_bucket()
                    .bucket(&cfg.s3_bucket)
                    .send()
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
                    .with_context(|| {
                        format!(
                            "S3 bucket {:?} is not reachable at {} (check uploader.s3_* settings and credentials)",
                            cfg.s3_bucket,
                            if cfg.s3_endpoint.is_empty() { "AWS" } else { &cfg.s3_endpoint }
                        )
                    })?;
                Ok(ResultStore::S3 { client, bucket: cfg.s3_bucket.clone() })
            }
            Target::Local => {
                tokio::fs::create_dir_all(&cfg.dir)
                    .await
                    .with_context(|| format!("cannot create results directory {}", cfg.dir.display()))?;
                let root = tokio::fs::canonicalize(&cfg.dir).await?;
                Ok(ResultStore::Local { root })
            }
        }
    }

    /// The store for reading results (the ingress): no reachability check,
    /// so a result store that is down does not keep the API from starting
    /// (a build without S3 support refuses `target = "s3"`).
    pub async fn open(cfg: &ResultsConfig) -> Result<ResultStore> {
        match cfg.target {
            #[cfg(not(feature = "s3"))]
            Target::S3 => Err(no_s3()),
            #[cfg(feature = "s3")]
            Target::S3 => {
                Ok(ResultStore::S3 { client: s3_client(&cfg.s3_connection()).await, bucket: cfg.s3_bucket.clone() })
            }
            Target::Local => {
                Ok(ResultStore::Local { root: std::fs::canonicalize(&cfg.dir).unwrap_or_else(|_| cfg.dir.clone()) })
            }
        }
    }

    /// A time-limited URL anyone can GET `key` with (S3 only).
    pub async fn presign_get(&self, key: &str, ttl: std::time::Duration) -> Result<Option<String>> {
        match self {
            ResultStore::Local { .. } => {
                let _ = (key, ttl);
                Ok(None)
            }
            #[cfg(feature = "s3")]
            ResultStore::S3 { client, bucket } => {
                let conf = aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl).context("presigning TTL")?;
                let req = client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .presigned(conf)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
                    .with_context(|| format!("presigning s3://{bucket}/{key}"))?;
                Ok(Some(req.uri().to_string()))
            }
        }
    }

    /// Writes `bytes` at `key` atomically, replacing any previous object.
    pub async fn put(&self, key: &str, bytes: Vec<u8>, content_type: &str) -> Result<()> {
        match self {
            ResultStore::Local { root } => {
                let _ = content_type;
                write_atomic(&root.join(key), &bytes).await
            }
            #[cfg(feature = "s3")]
            ResultStore::S3 { client, bucket } => {
                client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .content_type(content_type)
                    .body(ByteStream::from(bytes))
                    .send()
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
                    .with_context(|| format!("PUT s3://{bucket}/{key}"))?;
                Ok(())
            }
        }
    }

    /// Reads `key`, `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self {
            ResultStore::Local { root } => match tokio::fs::read(root.join(key)).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("reading {key}")),
            },
            #[cfg(feature = "s3")]
            ResultStore::S3 { client, bucket } => match client.get_object().bucket(bucket).key(key).send().await {
                Ok(out) => Ok(Some(out.body.collect().await.context("reading S3 body")?.to_vec())),
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                Err(e) => Err(anyhow::anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
                    .with_context(|| format!("GET s3://{bucket}/{key}")),
            },
        }
    }

    /// A URL users can read: `file:///…` or `s3://bucket/key`.
    pub fn location(&self, key: &str) -> String {
        match self {
            ResultStore::Local { root } => format!("file://{}", root.join(key).display()),
            #[cfg(feature = "s3")]
            ResultStore::S3 { bucket, .. } => format!("s3://{bucket}/{key}"),
        }
    }
}

/// An S3 client for `conn` (the uploader's, a source's; tests and tools too).
#[cfg(feature = "s3")]
pub async fn s3_client(conn: &S3Connection) -> aws_sdk_s3::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(conn.region.clone()));
    if !conn.access_key_id.is_empty() {
        loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
            conn.access_key_id.clone(),
            conn.secret_access_key.clone(),
            None,
            None,
            "pagestream-config",
        ));
    }
    if !conn.endpoint.is_empty() {
        loader = loader.endpoint_url(conn.endpoint.clone());
    }
    // A hung connection must become a (retried) error, never a stuck worker.
    loader = loader.timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .operation_attempt_timeout(std::time::Duration::from_secs(30))
            .operation_timeout(std::time::Duration::from_secs(90))
            .build(),
    );
    let shared = loader.load().await;
    let conf = aws_sdk_s3::config::Builder::from(&shared).force_path_style(conn.path_style).build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Writes `bytes` to `path` whole: into a temporary file beside it, then
/// renamed over it, so a reader sees the old file or the new one, never
/// half of one.
pub async fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("result key without a directory")?;
    tokio::fs::create_dir_all(dir).await.with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("part"),
        std::process::id(),
        rand_suffix()
    ));
    tokio::fs::write(&tmp, bytes).await.with_context(|| format!("writing {}", tmp.display()))?;
    if let Err(e) = tokio::fs::rename(&tmp, path).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e).with_context(|| format!("renaming into {}", path.display()));
    }
    Ok(())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_writes_are_atomic_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultStore::Local { root: dir.path().to_path_buf() };
        store.put("d/pages/1.json", b"{\"a\":1}".to_vec(), "application/json").await.unwrap();
        store.put("d/pages/1.json", b"{\"a\":2}".to_vec(), "application/json").await.unwrap();
        assert_eq!(store.get("d/pages/1.json").await.unwrap().unwrap(), b"{\"a\":2}");
        assert_eq!(store.get("d/missing").await.unwrap(), None);
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("d/pages")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("1.json")], "no temp files left behind");
        assert!(store.location("d/x").starts_with("file:///"));
    }
}

/// Why fetching a document by reference from S3 failed.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceError {
    /// No such bucket or key.
    Missing(String),
    /// Larger than the limit (the size, when known).
    TooLarge(u64),
    /// This build cannot read S3.
    Unsupported(String),
    /// Anything else (network, credentials, throttling): worth a retry.
    Other(String),
}

/// Streams `s3://bucket/key` into `to`, at most `max` bytes, with a client
/// for `conn` (endpoint, region, path style, credentials); returns
/// the bytes written. Never holds the object in memory.
#[cfg(feature = "s3")]
pub async fn s3_fetch(
    conn: &S3Connection,
    bucket: &str,
    key: &str,
    max: u64,
    to: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
) -> Result<u64, SourceError> {
    use tokio::io::AsyncWriteExt as _;
    let client = s3_client(conn).await;
    let resp = match client.get_object().bucket(bucket).key(key).send().await {
        Ok(r) => r,
        Err(e) => {
            let status = e.raw_response().map(|r| r.status().as_u16());
            let text = format!("{}", aws_sdk_s3::error::DisplayErrorContext(&e));
            return Err(match e.as_service_error() {
                Some(s) if s.is_no_such_key() => SourceError::Missing(format!("s3://{bucket}/{key} does not exist")),
                _ if status == Some(404) => SourceError::Missing(format!("s3://{bucket}/{key}: not found ({text})")),
                _ => SourceError::Other(format!("reading s3://{bucket}/{key}: {text}")),
            });
        }
    };
    if let Some(len) = resp.content_length().filter(|l| *l as u64 > max) {
        return Err(SourceError::TooLarge(len as u64));
    }
    let mut body = resp.body;
    let mut written = 0u64;
    while let Some(chunk) =
        body.try_next().await.map_err(|e| SourceError::Other(format!("reading s3://{bucket}/{key}: {e}")))?
    {
        written += chunk.len() as u64;
        if written > max {
            return Err(SourceError::TooLarge(written));
        }
        to.write_all(&chunk).await.map_err(|e| SourceError::Other(format!("writing the local copy: {e}")))?;
    }
    Ok(written)
}

/// Without the `s3` feature: `s3://` sources are refused.
#[cfg(not(feature = "s3"))]
pub async fn s3_fetch(
    _: &S3Connection,
    _: &str,
    _: &str,
    _: u64,
    _: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
) -> Result<u64, SourceError> {
    Err(SourceError::Unsupported(
        "this build has no S3 support (cargo feature `s3` of pagestream-results); build the workspace".into(),
    ))
}
