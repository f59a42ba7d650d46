//! `GET /v1/documents/{id}/results` and the page files.
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
use pagestream_results::layout::Keys;

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
    fn keys(&self, id: &str) -> Keys {
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

    pub(crate) async fn results(&self, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
        let status = self.read_status(caller, id, false).await?;
        let keys = self.keys(id);
        let manifest_key = keys.manifest();
        let bytes = self
            .results
            .get(&manifest_key)
            .await
            .map_err(|e| ApiError::unavailable(format!("reading the manifest failed: {e:#}")))?;
        let Some(bytes) = bytes else {
            let done = status.pages.uploaded + status.pages.failed;
            let total = status.page_count.map(|n| n.to_string()).unwrap_or_else(|| "?".into());
            return Err(if status.state.is_terminal() {
                ApiError::conflict(
                    "results_pending",
                    format!("document {id} is {}; its manifest is being written, retry shortly", status.state.as_str()),
                )
            } else {
                ApiError::conflict(
                    "not_finished",
                    format!(
                        "document {id} is {} ({done}/{total} pages done); results are available once it finishes",
                        status.state.as_str()
                    ),
                )
            });
        };
        let mut manifest: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::unavailable(format!("the manifest at {manifest_key} is not valid JSON: {e}")))?;
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
        manifest["manifest_url"] = self.result_url(id, &manifest_key, "manifest.json").await?.into();
        manifest["state"] = status.state.as_str().into();
        Ok(json_response(StatusCode::OK, &manifest))
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
