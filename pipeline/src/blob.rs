//! Blob store for intermediate data (uploaded PDFs, page images above the
//! inline limit): the JetStream Object Store bucket `<prefix>_blobs`, so no
//! extra service is needed. Objects are streamed in chunks, never held whole.

use anyhow::{Context as _, Result};
use pagestream_schemas::ImageRef;

use crate::consumer::StageError;
use async_nats::jetstream::object_store::ObjectStore;
use tokio::io::{AsyncRead, AsyncWrite};

/// Key of an uploaded document.
pub fn upload_key(doc_id: &str) -> String {
    format!("uploads/{doc_id}")
}

/// Key of a page image sent by claim check.
pub fn page_image_key(doc_id: &str, page: u32, format: &str) -> String {
    format!("pages/{doc_id}/{page}.{format}")
}

/// Bytes per chunk message (the object store's default).
const CHUNK: usize = 128 * 1024;

#[derive(Clone)]
pub struct BlobStore {
    store: ObjectStore,
    js: async_nats::jetstream::Context,
    /// The bucket's backing stream (`OBJ_<bucket>`), to purge what the
    /// object store API leaves behind.
    stream: async_nats::jetstream::stream::Stream,
    bucket: String,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlobStore")
    }
}

impl BlobStore {
    pub fn new(
        store: ObjectStore,
        js: async_nats::jetstream::Context,
        stream: async_nats::jetstream::stream::Stream,
        bucket: String,
    ) -> Self {
        BlobStore { store, js, stream, bucket }
    }

    /// Streams `reader` into `key` (overwriting); returns the bytes written.
    ///
    /// The object store's protocol (chunks on `$O.<bucket>.C.<nuid>`, then
    /// the metadata with a roll-up), written here rather than by the client
    /// library so that a put that fails halfway (the reader fails, the
    /// bucket is full, NATS goes away) purges the chunks it wrote: the
    /// library's put leaves them under a name nobody knows.
    pub async fn put_reader<R: AsyncRead + Unpin>(&self, key: &str, reader: &mut R) -> Result<u64> {
        use sha2::Digest as _;
        use tokio::io::AsyncReadExt as _;
        let previous = self.store.info(key).await.ok();
        let nuid = next_nuid();
        let chunks_subject = format!("$O.{}.C.{nuid}", self.bucket);
        let mut hasher = sha2::Sha256::new();
        let (mut size, mut chunks) = (0usize, 0usize);
        let written: Result<()> = async {
            loop {
                let mut buf = bytes::BytesMut::with_capacity(CHUNK);
                while buf.len() < CHUNK {
                    if reader.read_buf(&mut buf).await.with_context(|| format!("reading data for blob {key}"))? == 0 {
                        break;
                    }
                }
                if buf.is_empty() {
                    return Ok(());
                }
                hasher.update(&buf);
                size += buf.len();
                chunks += 1;
                let last = buf.len() < CHUNK;
                self.js
                    .publish(chunks_subject.clone(), buf.freeze())
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .with_context(|| format!("writing a chunk of blob {key}"))?;
                if last {
                    return Ok(());
                }
            }
        }
        .await;
        let info = async_nats::jetstream::object_store::ObjectInfo {
            name: key.to_string(),
            description: None,
            metadata: Default::default(),
            headers: None,
            options: Some(async_nats::jetstream::object_store::ObjectOptions {
                link: None,
                max_chunk_size: Some(CHUNK),
            }),
            bucket: self.bucket.clone(),
            nuid: nuid.clone(),
            size,
            chunks,
            modified: None,
            digest: Some(format!("SHA-256={}", crate::util::base64(&hasher.finalize(), true))),
            deleted: false,
        };
        let meta = async {
            written?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Rollup", "sub");
            let subject = format!("$O.{}.M.{}", self.bucket, crate::util::base64(key.as_bytes(), true));
            let body = serde_json::to_vec(&info).context("encoding blob metadata")?;
            self.js
                .publish_with_headers(subject, headers, body.into())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("writing the metadata of blob {key}"))
        }
        .await;
        if let Err(e) = meta {
            if let Err(purge) = self.stream.purge().filter(&chunks_subject).await {
                tracing::warn!(key, error = %purge, "could not purge the chunks of a failed put");
            }
            return Err(e);
        }
        if let Some(old) = previous.filter(|p| p.nuid != nuid) {
            let old_chunks = format!("$O.{}.C.{}", self.bucket, old.nuid);
            if let Err(e) = self.stream.purge().filter(&old_chunks).await {
                tracing::warn!(key, error = %e, "could not purge the chunks of a replaced blob");
            }
        }
        Ok(size as u64)
    }

    pub async fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<u64> {
        let mut reader = bytes;
        self.put_reader(key, &mut reader).await
    }

    /// Streams `key` into `writer`; returns the bytes copied.
    pub async fn copy_to<W: AsyncWrite + Unpin>(&self, key: &str, writer: &mut W) -> Result<u64> {
        let mut obj = self
            .store
            .get(key)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("opening blob {key}"))?;
        tokio::io::copy(&mut obj, writer).await.with_context(|| format!("reading blob {key}"))
    }

    pub async fn get_bytes(&self, key: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.copy_to(key, &mut out).await?;
        Ok(out)
    }

    /// Deletes `key` with its chunks and its metadata record (the object
    /// store API would keep a tombstone per deleted name: nothing a request
    /// leaves behind outlives it); a missing key is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) => {}
            Err(e) if e.kind() == async_nats::jetstream::object_store::DeleteErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::anyhow!("{e}")).with_context(|| format!("deleting blob {key}")),
        }
        let meta = format!("$O.{}.M.{}", self.bucket, crate::util::base64(key.as_bytes(), true));
        self.stream
            .purge()
            .filter(&meta)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("purging the metadata of blob {key}"))?;
        Ok(())
    }

    /// Whether the error chain says the object does not exist.
    pub fn is_not_found(err: &anyhow::Error) -> bool {
        let text = format!("{err:#}").to_ascii_lowercase();
        text.contains("not found")
    }
}

/// A unique object id for chunk subjects (time, process, counter).
fn next_nuid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{nanos:x}{:x}{:x}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Page image bytes from a message: inline, or fetched by claim check. A
/// missing blob is permanent (it will not appear later); other store errors
/// are transient.
pub async fn read_image(blobs: &BlobStore, image: &ImageRef) -> Result<Vec<u8>, StageError> {
    if let Some(bytes) = &image.inline {
        return Ok(bytes.to_vec());
    }
    let key = image.blob.as_deref().unwrap_or_default();
    blobs.get_bytes(key).await.map_err(|e| {
        if BlobStore::is_not_found(&e) {
            StageError::permanent("image_missing", format!("page image {key:?} is not in the blob store"))
        } else {
            StageError::transient("blob_store", format!("{e:#}"))
        }
    })
}
