//! Blob store for intermediate data (uploaded PDFs, page images above the
//! inline limit): the JetStream Object Store bucket `<prefix>_blobs`, so no
//! extra service is needed. Objects are streamed in chunks, never held whole.

use pagestream_schemas::ImageRef;

use crate::error::StageError;
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

/// A blob store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The key does not exist (it will not appear by retrying).
    #[error("blob {key:?} does not exist")]
    NotFound { key: String },
    /// The data being stored could not be read (the upload failed).
    #[error("reading the data for blob {key}: {source}")]
    Input {
        key: String,
        #[source]
        source: std::io::Error,
    },
    /// NATS refused or did not answer (`op`: "writing", "reading", …).
    #[error("{op} blob {key}: {source}")]
    Nats {
        op: &'static str,
        key: String,
        #[source]
        source: async_nats::Error,
    },
    /// Copying the blob out failed.
    #[error("reading blob {key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
}

impl BlobError {
    fn nats<'k>(op: &'static str, key: &'k str) -> impl FnOnce(async_nats::Error) -> BlobError + 'k {
        move |source| BlobError::Nats { op, key: key.to_string(), source }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, BlobError::NotFound { .. })
    }

    /// The bucket is at its `nats.max_blob_bytes` (or the server out of storage).
    pub fn is_storage_full(&self) -> bool {
        matches!(self, BlobError::Nats { source, .. } if crate::nats::is_storage_full(&source.to_string()))
    }
}

type Result<T, E = BlobError> = std::result::Result<T, E>;

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
                    let read = reader.read_buf(&mut buf).await;
                    if read.map_err(|source| BlobError::Input { key: key.to_string(), source })? == 0 {
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
                let ack = self.js.publish(chunks_subject.clone(), buf.freeze()).await;
                ack.map_err(|e| BlobError::nats("writing a chunk of", key)(e.into()))?
                    .await
                    .map_err(|e| BlobError::nats("writing a chunk of", key)(e.into()))?;
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
            let body = serde_json::to_vec(&info).expect("object metadata serialises");
            let ack = self.js.publish_with_headers(subject, headers, body.into()).await;
            ack.map_err(|e| BlobError::nats("writing the metadata of", key)(e.into()))?
                .await
                .map(|_| ())
                .map_err(|e| BlobError::nats("writing the metadata of", key)(e.into()))
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
        let mut obj = match self.store.get(key).await {
            Ok(obj) => obj,
            Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
                return Err(BlobError::NotFound { key: key.to_string() })
            }
            Err(e) => return Err(BlobError::nats("opening", key)(e.into())),
        };
        tokio::io::copy(&mut obj, writer).await.map_err(|source| BlobError::Io { key: key.to_string(), source })
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
            Err(e) => return Err(BlobError::nats("deleting", key)(e.into())),
        }
        let meta = format!("$O.{}.M.{}", self.bucket, crate::util::base64(key.as_bytes(), true));
        self.stream
            .purge()
            .filter(&meta)
            .await
            .map_err(|e| BlobError::nats("purging the metadata of", key)(e.into()))?;
        Ok(())
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
        if e.is_not_found() {
            StageError::permanent("image_missing", format!("page image {key:?} is not in the blob store"))
        } else {
            StageError::blob_store(e)
        }
    })
}
