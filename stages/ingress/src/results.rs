//! `GET /v1/documents/{id}/results` (at any time: the pages finished so
//! far while the document runs, the manifest once it finished; or an
//! export of the pages so far: `?format=coco` (COCO detections),
//! `markdown` (the text in reading order), `chunks` (JSON Lines for
//! retrieval)) and the page files.
//!
//! The manifest is read from the result store the uploader writes to (the
//! `[uploader]` settings). Each page gets `image_url` and `detections_url`:
//! on S3, presigned GET URLs valid for `ingress.results_url_ttl_secs`; in a
//! local directory, `/v1/documents/{id}/results/pages/<n>.<ext>`. That
//! route works for both stores (the ingress reads the object and serves it
//! with the API's authentication); with a local directory the ingress must
//! see the uploader's directory.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use pagestream_pipeline::progress::DocStatus;
use pagestream_results::coco::CocoWriter;
use pagestream_results::layout::{pages_so_far, Keys, PageResult, MANIFEST_SCHEMA};
use pagestream_results::ResultStore;

use crate::error::{bytes_response, json_response, ApiError, Resp};
use crate::{Caller, Ingress};

/// A page's result file: its image, its JSON, or a region's crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageFile {
    Image(u32),
    Json(u32),
    /// Page, and the region's `order`.
    Crop(u32, u32),
}

/// `<n>.png`, `<n>.json` or `<n>-<order>.png`, nothing else (no path can
/// escape the document).
fn parse_page_file(file: &str) -> Option<PageFile> {
    let digits = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    let (stem, ext) = file.split_once('.')?;
    let (n, order) = match stem.split_once('-') {
        Some((n, o)) if digits(o) => (n, Some(o.parse::<u32>().ok()?)),
        Some(_) => return None,
        None => (stem, None),
    };
    if !digits(n) {
        return None;
    }
    let page: u32 = n.parse().ok().filter(|p| *p > 0)?;
    match (ext, order) {
        ("png", None) => Some(PageFile::Image(page)),
        ("json", None) => Some(PageFile::Json(page)),
        ("png", Some(o)) => Some(PageFile::Crop(page, o)),
        _ => None,
    }
}

/// One page's result file (`rel` under the document, at `key`); the error
/// is the detail for the log.
async fn read_page(store: &ResultStore, key: &str, rel: &str) -> Result<PageResult, String> {
    let bytes = store
        .get(key)
        .await
        .map_err(|e| format!("reading {rel} failed: {e:#}"))?
        .ok_or_else(|| format!("{rel} is listed but missing"))?;
    serde_json::from_slice::<PageResult>(&bytes).map_err(|e| format!("{rel} is not a page result: {e}"))
}

impl Ingress {
    pub(crate) fn keys(&self, id: &str) -> Keys {
        Keys::new(&self.cfg.results.prefix, id)
    }

    fn url_ttl(&self) -> Duration {
        Duration::from_secs(self.cfg.ingress.results_url_ttl_secs)
    }

    /// A URL for a result key: presigned on S3, else the ingress's own route.
    async fn result_url(&self, id: &str, key: &str, rel: &str) -> Result<String, ApiError> {
        let presigned = self
            .results
            .presign_get(key, self.url_ttl())
            .await
            .map_err(|e| ApiError::unavailable(format!("presigning results failed: {e:#}")))?;
        Ok(presigned.unwrap_or_else(|| format!("/v1/documents/{id}/results/{rel}")))
    }

    /// `GET /v1/documents/{id}/results[?format=json|coco|markdown|chunks]`,
    /// at any time: the manifest once the document finished (`complete:
    /// true`), before that the pages with an outcome so far (`complete:
    /// false`, the document's `state`), each with its links; or one of the
    /// exports of the pages so far ([`Export`]), streamed.
    pub(crate) async fn results(&self, caller: &Caller, id: &str, query: &str) -> Result<Resp, ApiError> {
        let mut format = "json".to_string();
        for (k, v) in crate::url_query(query) {
            if k == "format" {
                if !["json", "coco", "markdown", "chunks"].contains(&v.as_str()) {
                    return Err(ApiError::bad_request(
                        "invalid_format",
                        format!("format {v:?} is not one of json, coco, markdown, chunks"),
                    ));
                }
                format = v;
            }
        }
        let status = self.read_status(caller, id, true).await?;
        let keys = self.keys(id);
        let manifest_key = keys.manifest();
        let bytes = self
            .results
            .get(&manifest_key)
            .await
            .map_err(|e| ApiError::unavailable(format!("reading the manifest failed: {e:#}")))?;
        let complete = bytes.is_some();
        let mut manifest: serde_json::Value = match bytes {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::unavailable(format!("the manifest at {manifest_key} is not valid JSON: {e}")))?,
            // Still running (or finishing: the manifest is written last).
            None => serde_json::json!({
                "schema": MANIFEST_SCHEMA,
                "doc_id": id,
                "title": status.info.title_or_filename(),
                "page_count": status.page_count,
                "status": null,
                "model": status.info.model.as_ref().map(|name| serde_json::json!({
                    "name": name,
                    "sha256": status.info.model_sha256,
                })),
                "pages": pages_so_far(&status),
                "queued_at": status.queued_at,
                "started_at": status.started_at,
            }),
        };
        if format != "json" {
            return self.export(id, &status, &manifest, &format).await;
        }
        let mut urls = Vec::new();
        if let Some(pages) = manifest["pages"].as_array() {
            for (i, page) in pages.iter().enumerate() {
                for (field, url_field) in [("image", "image_url"), ("detections", "detections_url")] {
                    if let Some(rel) = page[field].as_str() {
                        let key = keys.file(rel);
                        urls.push((i, url_field, self.result_url(id, &key, rel).await?));
                    }
                }
            }
        }
        for (i, field, url) in urls {
            manifest["pages"][i][field] = url.into();
        }
        manifest["manifest_url"] = if complete {
            self.result_url(id, &manifest_key, "manifest.json").await?.into()
        } else {
            serde_json::Value::Null
        };
        manifest["coco_url"] = format!("/v1/documents/{id}/results?format=coco").into();
        manifest["markdown_url"] = format!("/v1/documents/{id}/results?format=markdown").into();
        manifest["chunks_url"] = format!("/v1/documents/{id}/results?format=chunks").into();
        manifest["state"] = status.state.as_str().into();
        manifest["complete"] = complete.into();
        manifest["pages_done"] = manifest["pages"].as_array().map_or(0, Vec::len).into();
        Ok(json_response(StatusCode::OK, &manifest))
    }

    /// An export of the pages with results so far (all of them once
    /// complete), streamed: each page's JSON is read from the result store
    /// (8 at a time, in page order) and written at once, so the ingress
    /// holds a few pages whatever the document's size (COCO: 12 bytes a
    /// page more, see [`CocoWriter`]). The first page is read before
    /// answering, so a store that is down gets a 503; a failure later cuts
    /// the body (the client sees an incomplete transfer) and is logged.
    async fn export(
        &self,
        id: &str,
        status: &DocStatus,
        manifest: &serde_json::Value,
        format: &str,
    ) -> Result<Resp, ApiError> {
        use futures::StreamExt as _;
        let keys = self.keys(id);
        let mut rels: Vec<(u64, String)> = manifest["pages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["page"].as_u64()?, p["detections"].as_str()?.to_string())))
            .collect();
        rels.sort_by_key(|(page, _)| *page);
        rels.dedup_by_key(|(page, _)| *page);
        let store = self.results.clone();
        let mut pages = futures::stream::iter(rels)
            .map(move |(_, rel)| {
                let (store, key) = (store.clone(), keys.file(&rel));
                async move { read_page(&store, &key, &rel).await }
            })
            .buffered(8);
        let first = pages.next().await.transpose().map_err(ApiError::unavailable)?;
        let mut writer = match format {
            "coco" => {
                // Category ids follow the model's label order when a live
                // replica serves it (stable across documents); else first seen.
                let model = first.as_ref().map(|p| p.model.name.clone()).or_else(|| status.info.model.clone());
                let labels = model
                    .and_then(|m| self.live.get(&m))
                    .and_then(|fleet| {
                        fleet.replicas.iter().find(|r| !r.canary).or(fleet.replicas.first()).map(|r| r.labels.clone())
                    })
                    .unwrap_or_default();
                Export::Coco(CocoWriter::new(id, &labels, manifest["finished_at"].as_str()))
            }
            "markdown" => Export::Markdown { title: status.info.title_or_filename() },
            _ => Export::Chunks { doc_id: id.to_string() },
        };
        let (content_type, file_name) = writer.file(id);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(2);
        let doc_id = id.to_string();
        let what = format.to_string();
        tokio::spawn(async move {
            const CHUNK: usize = 64 * 1024;
            let mut buf = Vec::with_capacity(2 * CHUNK);
            writer.start(&mut buf);
            if let Some(p) = first {
                writer.page(&p, &mut buf);
            }
            while let Some(next) = pages.next().await {
                match next {
                    Ok(p) => writer.page(&p, &mut buf),
                    Err(detail) => {
                        tracing::warn!(doc_id, %detail, format = what, "export cut: a page result could not be read");
                        let _ = tx.send(Err(std::io::Error::other("a page result could not be read"))).await;
                        return;
                    }
                }
                if buf.len() >= CHUNK {
                    let chunk = Bytes::from(std::mem::replace(&mut buf, Vec::with_capacity(2 * CHUNK)));
                    if tx.send(Ok(chunk)).await.is_err() {
                        return; // the client went away
                    }
                }
            }
            writer.finish(&mut buf);
            let _ = tx.send(Ok(Bytes::from(buf))).await;
        });
        let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk.map(Frame::data), rx))
        }));
        let mut resp = http::Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(BodyExt::boxed(body))
            .expect("valid response");
        let disposition = format!("attachment; filename=\"{file_name}\"");
        if let Ok(v) = http::HeaderValue::from_str(&disposition) {
            resp.headers_mut().insert(http::header::CONTENT_DISPOSITION, v);
        }
        Ok(resp)
    }

    /// The manifest exactly as the uploader wrote it.
    pub(crate) async fn result_manifest(&self, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
        self.read_status(caller, id, false).await?;
        let bytes = self
            .results
            .get(&self.keys(id).manifest())
            .await
            .map_err(|e| ApiError::unavailable(format!("reading the manifest failed: {e:#}")))?
            .ok_or_else(|| ApiError::not_found(format!("document {id} has no manifest (yet)")))?;
        Ok(bytes_response(StatusCode::OK, "application/json", bytes))
    }

    /// One page's image or JSON, read from the result store (a local
    /// directory or S3) and served with the API's own authentication: the
    /// web page uses this route, so it needs no CORS rules on the bucket.
    pub(crate) async fn result_file(&self, caller: &Caller, id: &str, file: &str) -> Result<Resp, ApiError> {
        self.read_status(caller, id, false).await?;
        let which = parse_page_file(file).ok_or_else(|| {
            ApiError::not_found(format!("no result file {file:?}: use <page>.png, <page>.json or <page>-<order>.png"))
        })?;
        let keys = self.keys(id);
        let (key, ext) = match which {
            PageFile::Image(p) => (keys.page_image(p), "png"),
            PageFile::Json(p) => (keys.page_json(p), "json"),
            PageFile::Crop(p, o) => (keys.crop(p, o), "png"),
        };
        let rel = format!("pages/{file}");
        let bytes = self
            .results
            .get(&key)
            .await
            .map_err(|e| ApiError::unavailable(format!("reading {rel} failed: {e:#}")))?
            .ok_or_else(|| ApiError::not_found(format!("document {id} has no {rel} (yet)")))?;
        let ctype = if ext == "png" { "image/png" } else { "application/json" };
        let mut resp = bytes_response(StatusCode::OK, ctype, bytes);
        // Results never change once written.
        resp.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("private, max-age=3600"));
        Ok(resp)
    }
}

/// A streamed export of a document's pages, in page order: a start, each
/// page, an end.
enum Export {
    Coco(CocoWriter),
    /// Markdown ([`pagestream_results::export::markdown_page`]).
    Markdown {
        title: Option<String>,
    },
    /// JSON Lines, one retrieval chunk per region
    /// ([`pagestream_results::export::chunks_page`]).
    Chunks {
        doc_id: String,
    },
}

impl Export {
    /// Content type and download file name.
    fn file(&self, id: &str) -> (&'static str, String) {
        match self {
            Export::Coco(_) => ("application/json", format!("{id}.coco.json")),
            Export::Markdown { .. } => ("text/markdown; charset=utf-8", format!("{id}.md")),
            Export::Chunks { .. } => ("application/jsonl", format!("{id}.chunks.jsonl")),
        }
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        match self {
            Export::Coco(w) => w.start(out),
            Export::Markdown { title } => {
                out.extend_from_slice(pagestream_results::export::markdown_document_header(title.as_deref()).as_bytes())
            }
            Export::Chunks { .. } => {}
        }
    }

    fn page(&mut self, p: &PageResult, out: &mut Vec<u8>) {
        match self {
            Export::Coco(w) => w.page(p, out),
            Export::Markdown { .. } => out.extend_from_slice(pagestream_results::export::markdown_page(p).as_bytes()),
            Export::Chunks { doc_id } => {
                for chunk in pagestream_results::export::chunks_page(doc_id, p) {
                    serde_json::to_writer(&mut *out, &chunk).expect("a chunk serialises");
                    out.push(b'\n');
                }
            }
        }
    }

    fn finish(self, out: &mut Vec<u8>) {
        if let Export::Coco(w) = self {
            w.finish(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_file_names() {
        assert_eq!(parse_page_file("12.png"), Some(PageFile::Image(12)));
        assert_eq!(parse_page_file("3.json"), Some(PageFile::Json(3)));
        assert_eq!(parse_page_file("3-0.png"), Some(PageFile::Crop(3, 0)));
        assert_eq!(parse_page_file("12-17.png"), Some(PageFile::Crop(12, 17)));
        for bad in [
            "0.png",
            "../1.png",
            "1.png/..",
            "x.png",
            "1.pdf",
            ".png",
            "1",
            "-1.json",
            "1-.png",
            "1-x.png",
            "1-2.json",
            "1-2-3.png",
            "0-1.png",
            "1-99999999999.png",
        ] {
            assert_eq!(parse_page_file(bad), None, "{bad}");
        }
    }
}
