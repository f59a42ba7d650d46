//! The results layout — a public contract, identical on S3 and on disk:
//!
//! ```text
//! <prefix>/<doc_id>/manifest.json
//! <prefix>/<doc_id>/pages/<n>.json   {page, width, height, dpi, model,
//!                                      detections: [{label, score, bbox, text?, order?, text_source?, crop?}],
//!                                      unassigned_text?: [{text, bbox, order, text_source}], timings}
//! <prefix>/<doc_id>/pages/<n>.png    the page image the boxes refer to
//! <prefix>/<doc_id>/pages/<n>-<order>.png  a region's crop (`uploader.crops`)
//! ```
//!
//! Boxes are `[x0, y0, x1, y1]` in pixels of the page image, top-left
//! origin. What each box says ([`crate::content`]): a detection's `text`
//! (its words; `""` when it has none), its `order` in the page's reading
//! order and its `text_source` (`text_layer`, `ocr` or `none`);
//! `unassigned_text` holds the text outside every region, in blocks
//! ordered with the detections (one `order` sequence 0, 1, … over both).
//! Fields marked `?` are absent from results written before pages carried
//! text (and `unassigned_text` when it is empty): readers treat them as
//! optional, and such files still read.

use pagestream_pipeline::progress::{DocStatus, FailedPage};
use pagestream_schemas::{Detection, ErrorInfo, FinalStatus, ModelRef, TextSource, Timings};
use serde::{Deserialize, Serialize};

/// Identifies the manifest format.
pub const MANIFEST_SCHEMA: &str = "pagestream.manifest/v1";

/// Keys of one document's results.
#[derive(Debug, Clone)]
pub struct Keys {
    base: String,
}

impl Keys {
    pub fn new(prefix: &str, doc_id: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        let base = if prefix.is_empty() { doc_id.to_string() } else { format!("{prefix}/{doc_id}") };
        Keys { base }
    }
    /// `rel` (as the manifest writes it, e.g. `pages/3.png`) under the document.
    pub fn file(&self, rel: &str) -> String {
        format!("{}/{rel}", self.base)
    }
    pub fn manifest(&self) -> String {
        format!("{}/manifest.json", self.base)
    }
    pub fn page_json(&self, page: u32) -> String {
        format!("{}/{}", self.base, rel_page_json(page))
    }
    pub fn page_image(&self, page: u32) -> String {
        format!("{}/{}", self.base, rel_page_image(page))
    }
    pub fn crop(&self, page: u32, order: u32) -> String {
        format!("{}/{}", self.base, rel_crop(page, order))
    }
}

pub fn rel_page_json(page: u32) -> String {
    format!("pages/{page}.json")
}

pub fn rel_page_image(page: u32) -> String {
    format!("pages/{page}.png")
}

/// The crop of the region at `order` in page `page`'s reading order
/// (`uploader.crops`).
pub fn rel_crop(page: u32, order: u32) -> String {
    format!("pages/{page}-{order}.png")
}

/// `pages/<n>.json`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageResult {
    pub page: u32,
    pub width: u32,
    pub height: u32,
    pub dpi: f32,
    pub model: ModelRef,
    pub detections: Vec<DetectionResult>,
    /// Text outside every detected region, in blocks of lines, ordered
    /// with the detections (see [`crate::content`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unassigned_text: Vec<TextBlock>,
    /// Milliseconds spent rendering and inferring this page.
    #[serde(default)]
    pub timings: Timings,
}

/// A detected region and what it says. `text`, `order` and `text_source`
/// are absent from results written before pages carried text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectionResult {
    pub label: String,
    pub score: f32,
    /// `[x0, y0, x1, y1]` in pixels of the page image, top-left origin.
    pub bbox: [f32; 4],
    /// Its words in the text layer's order: words of a line joined by a
    /// space, lines by a newline; empty when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Its place in the page's reading order (shared with `unassigned_text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_source: Option<TextSource>,
    /// The region's image, cut from the page image (`pages/<n>-<order>.png`,
    /// relative to the document), when `uploader.crops` names its role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<String>,
}

impl From<Detection> for DetectionResult {
    fn from(d: Detection) -> Self {
        DetectionResult {
            label: d.label,
            score: d.score,
            bbox: d.bbox,
            text: None,
            order: None,
            text_source: None,
            crop: None,
        }
    }
}

/// Text outside every detected region: a block of consecutive lines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextBlock {
    pub text: String,
    pub bbox: [f32; 4],
    pub order: u32,
    pub text_source: TextSource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub filename: Option<String>,
    pub sha256: Option<String>,
    pub bytes: Option<u64>,
}

/// A page's outcome in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageOutcome {
    /// Its detections and image were written.
    Ok,
    /// It has no results; `error` says why.
    Failed,
    /// The document was cancelled before this page finished.
    Cancelled,
}

impl PageOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            PageOutcome::Ok => "ok",
            PageOutcome::Failed => "failed",
            PageOutcome::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestPage {
    pub page: u32,
    pub status: PageOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detections: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

impl ManifestPage {
    /// A page whose image and detections were written.
    pub fn ok(page: u32) -> Self {
        ManifestPage {
            page,
            status: PageOutcome::Ok,
            detections: Some(rel_page_json(page)),
            image: Some(rel_page_image(page)),
            error: None,
        }
    }

    /// A page without results, and why.
    pub fn failed(page: u32, error: ErrorInfo) -> Self {
        ManifestPage { page, status: PageOutcome::Failed, detections: None, image: None, error: Some(error) }
    }
}

/// The pages of a document that have an outcome so far, in page order: the
/// uploaded ones (their files are written) and the failed ones. What
/// `GET …/results` lists while a document runs, before its manifest exists.
pub fn pages_so_far(st: &DocStatus) -> Vec<ManifestPage> {
    let uploaded = &st.counters.uploaded;
    let mut pages: Vec<ManifestPage> = uploaded.pages().map(ManifestPage::ok).collect();
    pages.extend(
        st.failed_pages
            .iter()
            .filter(|f| !uploaded.contains(f.page))
            .map(|f| ManifestPage::failed(f.page, f.error.clone())),
    );
    pages.sort_by_key(|p| p.page);
    pages.dedup_by_key(|p| p.page);
    pages
}

/// `manifest.json`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    pub doc_id: String,
    pub title: Option<String>,
    pub source: SourceInfo,
    pub page_count: Option<u32>,
    pub status: FinalStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    pub model: Option<ModelRef>,
    pub pages: Vec<ManifestPage>,
    pub queued_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: String,
}

impl Manifest {
    /// The manifest of a document whose pages all have an outcome.
    pub fn from_status(st: &DocStatus, model: Option<ModelRef>, finished_at: String) -> Manifest {
        let page_count = st.page_count.unwrap_or(0);
        let failed = |n: u32| -> Option<&FailedPage> { st.failed_pages.iter().find(|f| f.page == n) };
        let pages: Vec<ManifestPage> = (1..=page_count)
            .map(|n| match failed(n) {
                Some(f) => ManifestPage::failed(n, f.error.clone()),
                None => ManifestPage::ok(n),
            })
            .collect();
        let failures = pages.iter().filter(|p| p.status == PageOutcome::Failed).count();
        let (status, error) = if failures == 0 {
            (FinalStatus::Completed, None)
        } else if failures as u32 == page_count {
            // One cause for every page (an unknown model, say): name it.
            let first = st.failed_pages.first().map(|f| &f.error);
            let error = match first {
                Some(e) if st.failed_pages.iter().all(|f| f.error.code == e.code) => {
                    ErrorInfo { message: format!("all {page_count} pages failed: {}", e.message), ..e.clone() }
                }
                _ => ErrorInfo::new("all_pages_failed", format!("all {page_count} pages failed")),
            };
            (FinalStatus::Failed, Some(error))
        } else {
            (FinalStatus::CompletedWithErrors, None)
        };
        Manifest {
            schema: MANIFEST_SCHEMA.into(),
            doc_id: st.doc_id.clone(),
            title: st.info.title_or_filename(),
            source: SourceInfo {
                filename: st.info.filename.clone(),
                sha256: st.info.sha256.clone(),
                bytes: st.info.bytes,
            },
            page_count: st.page_count,
            status,
            error,
            model,
            pages,
            queued_at: st.queued_at.clone(),
            started_at: st.started_at.clone(),
            finished_at,
        }
    }
}

impl Manifest {
    /// The manifest of a cancelled document: the pages finished before the
    /// cancellation keep their results, the others are marked `cancelled`.
    pub fn cancelled(st: &DocStatus, uploaded: &[u32], model: Option<ModelRef>, finished_at: String) -> Manifest {
        let mut m = Manifest::from_status(st, model, finished_at);
        for p in &mut m.pages {
            if p.status == PageOutcome::Ok && !uploaded.contains(&p.page) {
                *p = ManifestPage {
                    page: p.page,
                    status: PageOutcome::Cancelled,
                    detections: None,
                    image: None,
                    error: None,
                };
            }
        }
        m.status = FinalStatus::Cancelled;
        m.error = Some(ErrorInfo::new("cancelled", "the document was cancelled"));
        m
    }
}

#[cfg(test)]
mod tests {
    use pagestream_pipeline::progress::{DocState, PageCounts};
    use pagestream_schemas::DocInfo;

    use super::*;

    /// A page JSON written before pages carried text still reads (no
    /// `text`, `order`, `text_source`, `unassigned_text`) and writes back
    /// as it was; the new fields serialise as documented.
    #[test]
    fn page_json_old_and_new() {
        let old = r#"{"page":2,"width":10,"height":20,"dpi":72.0,"model":{"name":"m","sha256":"s"},"detections":[{"label":"text","score":0.5,"bbox":[1.0,2.0,3.0,4.0]}],"timings":{"render_ms":1,"infer_ms":2}}"#;
        let p: PageResult = serde_json::from_str(old).unwrap();
        assert_eq!(
            p.detections[0],
            DetectionResult::from(Detection { label: "text".into(), score: 0.5, bbox: [1.0, 2.0, 3.0, 4.0] })
        );
        assert!(p.unassigned_text.is_empty());
        let back: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(back["detections"][0].as_object().unwrap().len(), 3, "{back}");
        assert!(back.get("unassigned_text").is_none(), "{back}");

        let mut p = p;
        p.detections[0].text = Some("a b\nc".into());
        p.detections[0].order = Some(1);
        p.detections[0].text_source = Some(TextSource::TextLayer);
        p.unassigned_text.push(TextBlock { text: "x".into(), bbox: [0.0; 4], order: 0, text_source: TextSource::Ocr });
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["detections"][0]["text_source"], "text_layer");
        assert_eq!(
            (json["detections"][0]["order"].as_u64(), json["detections"][0]["text"].as_str()),
            (Some(1), Some("a b\nc"))
        );
        assert_eq!(json["unassigned_text"][0]["text_source"], "ocr");
        assert_eq!(serde_json::from_value::<PageResult>(json).unwrap(), p);
    }

    fn status(page_count: u32, failed: &[u32]) -> DocStatus {
        DocStatus {
            doc_id: "d".into(),
            state: DocState::Running,
            page_count: Some(page_count),
            pages: PageCounts::default(),
            info: DocInfo { filename: Some("a.pdf".into()), ..DocInfo::default() },
            error: None,
            failed_pages: failed
                .iter()
                .map(|&page| FailedPage { page, stage: "inferencer".into(), error: ErrorInfo::new("x", "why") })
                .collect(),
            queued_at: None,
            started_at: None,
            finished_at: None,
            counters: Default::default(),
        }
    }

    #[test]
    fn status_follows_page_outcomes() {
        let m = Manifest::from_status(&status(3, &[]), None, "t".into());
        assert_eq!((m.status.as_str(), m.error.is_none()), ("completed", true));
        assert_eq!(m.title.as_deref(), Some("a.pdf"), "title defaults to the file name");

        let m = Manifest::from_status(&status(3, &[2]), None, "t".into());
        assert_eq!(m.status.as_str(), "completed_with_errors");
        assert_eq!(m.pages[1].status.as_str(), "failed");
        assert_eq!(m.pages[1].error.as_ref().unwrap().message, "why");
        assert_eq!(m.pages[0].detections.as_deref(), Some("pages/1.json"));
        assert_eq!(m.pages[2].image.as_deref(), Some("pages/3.png"));

        // Every page failed for one reason: the document names it.
        let m = Manifest::from_status(&status(2, &[1, 2]), None, "t".into());
        assert_eq!(m.status.as_str(), "failed");
        let e = m.error.unwrap();
        assert_eq!((e.code.as_str(), e.message.as_str()), ("x", "all 2 pages failed: why"));
        // Different reasons: a summary.
        let mut st = status(2, &[1, 2]);
        st.failed_pages[1].error = ErrorInfo::new("y", "other");
        let m = Manifest::from_status(&st, None, "t".into());
        assert_eq!(m.error.unwrap().code, "all_pages_failed");
    }

    #[test]
    fn pages_so_far_lists_uploaded_and_failed_pages_in_order() {
        let mut st = status(6, &[4, 2]);
        for p in [5, 1] {
            st.counters.uploaded.insert(p, None);
        }
        // A page both uploaded and reported failed (a late failure event) counts once, as uploaded.
        st.counters.uploaded.insert(2, None);
        let pages = pages_so_far(&st);
        let got: Vec<(u32, &str)> = pages.iter().map(|p| (p.page, p.status.as_str())).collect();
        assert_eq!(got, [(1, "ok"), (2, "ok"), (4, "failed"), (5, "ok")]);
        assert_eq!(pages[0].detections.as_deref(), Some("pages/1.json"));
        assert_eq!(pages[2].error.as_ref().unwrap().message, "why");
        assert!(pages_so_far(&status(3, &[])).is_empty());
    }

    #[test]
    fn cancelled_keeps_finished_pages() {
        let m = Manifest::cancelled(&status(4, &[2]), &[1], None, "t".into());
        assert_eq!(m.status.as_str(), "cancelled");
        let states: Vec<&str> = m.pages.iter().map(|p| p.status.as_str()).collect();
        assert_eq!(states, ["ok", "failed", "cancelled", "cancelled"]);
        assert_eq!(m.pages[0].image.as_deref(), Some("pages/1.png"));
        assert!(m.pages[2].image.is_none());
    }

    #[test]
    fn statuses_serialise_as_their_names() {
        let m = Manifest::cancelled(&status(3, &[2]), &[1], None, "t".into());
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["status"], "cancelled");
        let pages: Vec<&str> =
            json["pages"].as_array().unwrap().iter().map(|p| p["status"].as_str().unwrap()).collect();
        assert_eq!(pages, ["ok", "failed", "cancelled"]);
        let back: Manifest = serde_json::from_value(json).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn keys_are_deterministic_with_or_without_prefix() {
        assert_eq!(Keys::new("", "d").page_json(3), "d/pages/3.json");
        assert_eq!(Keys::new("/runs/x/", "d").manifest(), "runs/x/d/manifest.json");
    }
}
