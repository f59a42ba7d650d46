//! `GET /v1/documents/{id}/results` (at any time: the pages finished so
//! far while the document runs, the manifest once it finished; or the COCO
//! file with `?format=coco`) and the page files.
//!
//! The manifest is read from the result store the uploader writes to (the
//! `[uploader]` settings). Each page gets `image_url` and `detections_url`:
//! on S3, presigned GET URLs valid for `ingress.results_url_ttl_secs`; in a
//! local directory, `/v1/documents/{id}/results/pages/<n>.<ext>`. That
//! route works for both stores (the ingress reads the object and serves it
//! with the API's authentication); with a local directory the ingress must
//! see the uploader's directory.

use std::time::Duration;

use http::StatusCode;
use pagestream_pipeline::progress::DocStatus;
use pagestream_results::layout::{pages_so_far, Keys, PageResult, MANIFEST_SCHEMA};

use crate::error::{bytes_response, json_response, ApiError, Resp};
use crate::{Caller, Ingress};

/// `<n>.png` or `<n>.json`, nothing else (no path can escape the document).
fn parse_page_file(file: &str) -> Option<(u32, &'static str)> {
    let (n, ext) = file.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let page: u32 = n.parse().ok().filter(|p| *p > 0)?;
    match ext {
        "png" => Some((page, "png")),
        "json" => Some((page, "json")),
        _ => None,
    }
}

impl Ingress {
    pub(crate) fn keys(&self, id: &str) -> Keys {
        Keys::new(&self.ctx.config.uploader.prefix, id)
    }

    fn url_ttl(&self) -> Duration {
        Duration::from_secs(self.ctx.config.ingress.results_url_ttl_secs)
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

    /// `GET /v1/documents/{id}/results[?format=json|coco]`, at any time:
    /// the manifest once the document finished (`complete: true`), before
    /// that the pages with an outcome so far (`complete: false`, the
    /// document's `state`), each with its links.
    pub(crate) async fn results(&self, caller: &Caller, id: &str, query: &str) -> Result<Resp, ApiError> {
        let mut coco = false;
        for (k, v) in crate::url_query(query) {
            match (k.as_str(), v.as_str()) {
                ("format", "json") => coco = false,
                ("format", "coco") => coco = true,
                ("format", other) => {
                    return Err(ApiError::bad_request(
                        "invalid_format",
                        format!("format {other:?} is not one of json, coco"),
                    ))
                }
                _ => {}
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
                "title": status.info.title.clone().or_else(|| status.info.filename.clone()),
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
        if coco {
            return self.coco(id, &status, &manifest).await;
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
        manifest["state"] = status.state.as_str().into();
        manifest["complete"] = complete.into();
        manifest["pages_done"] = manifest["pages"].as_array().map_or(0, Vec::len).into();
        Ok(json_response(StatusCode::OK, &manifest))
    }

    /// The COCO file of the pages with results so far (all of them once
    /// complete): each page's JSON read from the result store.
    async fn coco(&self, id: &str, status: &DocStatus, manifest: &serde_json::Value) -> Result<Resp, ApiError> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let keys = self.keys(id);
        let rels: Vec<String> = manifest["pages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["detections"].as_str().map(str::to_string))
            .collect();
        let pages: Vec<PageResult> = futures::stream::iter(rels)
            .map(|rel| {
                let key = keys.file(&rel);
                async move {
                    let bytes = self
                        .results
                        .get(&key)
                        .await
                        .map_err(|e| ApiError::unavailable(format!("reading {rel} failed: {e:#}")))?
                        .ok_or_else(|| ApiError::unavailable(format!("{rel} is listed but missing")))?;
                    serde_json::from_slice::<PageResult>(&bytes)
                        .map_err(|e| ApiError::unavailable(format!("{rel} is not a page result: {e}")))
                }
            })
            .buffered(8)
            .try_collect()
            .await?;
        // Category ids follow the model's label order when a live replica
        // serves it (stable across documents); else first seen.
        let model = pages.first().map(|p| p.model.name.clone()).or_else(|| status.info.model.clone());
        let labels = model
            .and_then(|m| self.live.get(&m))
            .and_then(|fleet| {
                fleet.replicas.iter().find(|r| !r.canary).or(fleet.replicas.first()).map(|r| r.labels.clone())
            })
            .unwrap_or_default();
        let coco = pagestream_results::coco::export(id, pages, &labels, manifest["finished_at"].as_str());
        let mut resp = json_response(StatusCode::OK, &serde_json::to_value(&coco).expect("COCO serialises"));
        let disposition = format!("attachment; filename=\"{id}.coco.json\"");
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
        let (page, ext) = parse_page_file(file)
            .ok_or_else(|| ApiError::not_found(format!("no result file {file:?}: use <page>.png or <page>.json")))?;
        let keys = self.keys(id);
        let key = if ext == "png" { keys.page_image(page) } else { keys.page_json(page) };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_file_names() {
        assert_eq!(parse_page_file("12.png"), Some((12, "png")));
        assert_eq!(parse_page_file("3.json"), Some((3, "json")));
        for bad in ["0.png", "../1.png", "1.png/..", "x.png", "1.pdf", ".png", "1", "-1.json"] {
            assert_eq!(parse_page_file(bad), None, "{bad}");
        }
    }
}
