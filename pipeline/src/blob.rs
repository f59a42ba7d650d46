//! Blob store for intermediate data (uploaded PDFs, page images above the
//! inline limit): the JetStream Object Store bucket `<prefix>_blobs`, so no
//! extra service is needed. Objects are streamed in chunks, never held whole.

use anyhow::{Context as _, Result};
use pagestream_schemas::ImageRef;

use crate::consumer::StageError;
use async_nats::jetstream::object_store::{ObjectMetadata, ObjectStore};
use tokio::io::{AsyncRead, AsyncWrite};

/// Key of an uploaded document.
pub fn upload_key(doc_id: &str) -> String {
    format!("uploads/{doc_id}")
}

/// Key of a page image sent by claim check.
pub fn page_image_key(doc_id: &str, page: u32, format: &str) -> String {
    format!("pages/{doc_id}/{page}.{format}")
}

#[derive(Clone)]
pub struct BlobStore {
    store: ObjectStore,
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
    pub fn new(store: ObjectStore, stream: async_nats::jetstream::stream::Stream, bucket: String) -> Self {
        BlobStore { store, stream, bucket }
    }

    /// Streams `reader` into `key` (overwriting); returns the bytes written.
    pub async fn put_reader<R: AsyncRead + Unpin>(&self, key: &str, reader: &mut R) -> Result<u64> {
        let meta = ObjectMetadata { name: key.to_string(), ..Default::default() };
        let info = self
            .store
            .put(meta, reader)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("writing blob {key}"))?;
        Ok(info.size as u64)
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
