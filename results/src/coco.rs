//! COCO export: one document's detections as a COCO "instances" file
//! (`GET /v1/documents/{id}/results?format=coco`), the format detection
//! tooling reads (pycocotools, FiftyOne, CVAT, Label Studio).
//!
//! - `images`: one per page with results; `id` is the page number,
//!   `file_name` the page image relative to the document
//!   (`pages/<n>.png`, as in the manifest), `width`/`height` in pixels;
//! - `categories`: the model's labels in the model's order, `id` from 1 (a
//!   label found in the detections but not in the given list is appended,
//!   so every annotation has a category);
//! - `annotations`: one per detection, `bbox` as COCO `[x, y, width,
//!   height]` in pixels of the page image (our `[x0, y0, x1, y1]`
//!   converted), `area` = width × height, `iscrowd` 0, and `score`.
//!
//! [`CocoWriter`] writes the file page by page (what the API serves: memory
//! stays bounded by one page, whatever the page count); [`export`] builds
//! it whole, and the two give the same bytes.

use serde::{Deserialize, Serialize};

use crate::layout::{rel_page_image, PageResult};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coco {
    pub info: Info,
    pub images: Vec<Image>,
    pub categories: Vec<Category>,
    pub annotations: Vec<Annotation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    pub description: String,
    pub version: String,
    /// The model that produced the detections (`name@sha256-prefix`).
    pub model: Option<String>,
    pub date_created: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub id: u32,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Category {
    pub id: u32,
    pub name: String,
    pub supercategory: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Annotation {
    pub id: u64,
    pub image_id: u32,
    pub category_id: u32,
    /// `[x, y, width, height]` in pixels, top-left origin.
    pub bbox: [f32; 4],
    pub area: f32,
    pub iscrowd: u8,
    pub score: f32,
}

/// The COCO file of one document from its pages' results (any order;
/// pages are sorted by number) and the model's labels.
pub fn export(doc_id: &str, mut pages: Vec<PageResult>, labels: &[String], finished_at: Option<&str>) -> Coco {
    pages.sort_by_key(|p| p.page);
    let mut names: Vec<String> = labels.to_vec();
    for d in pages.iter().flat_map(|p| &p.detections) {
        if !names.contains(&d.label) {
            names.push(d.label.clone());
        }
    }
    let category = |label: &str| names.iter().position(|n| n == label).expect("every label is named") as u32 + 1;
    let mut annotations = Vec::new();
    for p in &pages {
        for d in &p.detections {
            let [x0, y0, x1, y1] = d.bbox;
            let (w, h) = ((x1 - x0).max(0.0), (y1 - y0).max(0.0));
            annotations.push(Annotation {
                id: annotations.len() as u64 + 1,
                image_id: p.page,
                category_id: category(&d.label),
                bbox: [x0, y0, w, h],
                area: w * h,
                iscrowd: 0,
                score: d.score,
            });
        }
    }
    let model =
        pages.first().map(|p| format!("{}@{}", p.model.name, p.model.sha256.chars().take(12).collect::<String>()));
    Coco {
        info: Info {
            description: format!("pagestream detections of document {doc_id}"),
            version: "1.0".into(),
            model,
            date_created: finished_at.map(str::to_string),
        },
        images: pages
            .iter()
            .map(|p| Image { id: p.page, file_name: rel_page_image(p.page), width: p.width, height: p.height })
            .collect(),
        categories: names
            .iter()
            .enumerate()
            .map(|(i, n)| Category { id: i as u32 + 1, name: n.clone(), supercategory: "layout".into() })
            .collect(),
        annotations,
    }
}

/// Writes the COCO file incrementally, with memory independent of the
/// number of detections: [`CocoWriter::start`], then [`CocoWriter::page`]
/// for each page with results **in page order** (annotations are written
/// as they come; a label outside the model's list gets the next category
/// id when first seen, as [`export`] assigns them), then
/// [`CocoWriter::finish`] (categories, images — 12 bytes kept per page —
/// and info). The bytes are those of `serde_json::to_vec` of [`export`]'s
/// value (keys in sorted order, numbers as a `serde_json::Value` holds
/// them), so the streamed file is the one clients always got.
#[derive(Debug)]
pub struct CocoWriter {
    doc_id: String,
    finished_at: Option<String>,
    names: Vec<String>,
    /// `(page, width, height)` of each page written.
    images: Vec<(u32, u32, u32)>,
    annotations: u64,
    /// `name@sha256-prefix` of the first page's model.
    model: Option<String>,
}

// Field order is the serialised key order: alphabetical, as serde_json's
// map (what the export was serialised through) orders keys; floats are
// written as f64, as a `serde_json::Value` holds an f32.
#[derive(Serialize)]
struct AnnotationOut {
    area: f64,
    bbox: [f64; 4],
    category_id: u32,
    id: u64,
    image_id: u32,
    iscrowd: u8,
    score: f64,
}

#[derive(Serialize)]
struct CategoryOut<'a> {
    id: u32,
    name: &'a str,
    supercategory: &'a str,
}

#[derive(Serialize)]
struct ImageOut {
    file_name: String,
    height: u32,
    id: u32,
    width: u32,
}

#[derive(Serialize)]
struct InfoOut<'a> {
    date_created: Option<&'a str>,
    description: String,
    model: Option<&'a str>,
    version: &'a str,
}

fn write_json(out: &mut Vec<u8>, value: &impl Serialize) {
    serde_json::to_writer(out, value).expect("COCO parts serialise");
}

impl CocoWriter {
    /// `labels`: the model's labels in its order (category ids from 1).
    pub fn new(doc_id: &str, labels: &[String], finished_at: Option<&str>) -> Self {
        CocoWriter {
            doc_id: doc_id.to_string(),
            finished_at: finished_at.map(str::to_string),
            names: labels.to_vec(),
            images: Vec::new(),
            annotations: 0,
            model: None,
        }
    }

    /// The opening bytes.
    pub fn start(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"annotations\":[");
    }

    /// One page's annotations; pages must come in increasing page order.
    pub fn page(&mut self, p: &PageResult, out: &mut Vec<u8>) {
        if self.model.is_none() && self.images.is_empty() {
            self.model = Some(format!("{}@{}", p.model.name, p.model.sha256.chars().take(12).collect::<String>()));
        }
        debug_assert!(self.images.last().is_none_or(|(last, _, _)| *last < p.page), "pages in order");
        self.images.push((p.page, p.width, p.height));
        for d in &p.detections {
            let category_id = match self.names.iter().position(|n| *n == d.label) {
                Some(i) => i as u32 + 1,
                None => {
                    self.names.push(d.label.clone());
                    self.names.len() as u32
                }
            };
            let [x0, y0, x1, y1] = d.bbox;
            let (w, h) = ((x1 - x0).max(0.0), (y1 - y0).max(0.0));
            if self.annotations > 0 {
                out.push(b',');
            }
            self.annotations += 1;
            write_json(
                out,
                &AnnotationOut {
                    area: f64::from(w * h),
                    bbox: [x0, y0, w, h].map(f64::from),
                    category_id,
                    id: self.annotations,
                    image_id: p.page,
                    iscrowd: 0,
                    score: f64::from(d.score),
                },
            );
        }
    }

    /// The closing bytes: categories, images and info.
    pub fn finish(self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"],\"categories\":[");
        for (i, name) in self.names.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json(out, &CategoryOut { id: i as u32 + 1, name, supercategory: "layout" });
        }
        out.extend_from_slice(b"],\"images\":[");
        for (i, (page, width, height)) in self.images.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json(out, &ImageOut { file_name: rel_page_image(*page), height: *height, id: *page, width: *width });
        }
        out.extend_from_slice(b"],\"info\":");
        write_json(
            out,
            &InfoOut {
                date_created: self.finished_at.as_deref(),
                description: format!("pagestream detections of document {}", self.doc_id),
                model: self.model.as_deref(),
                version: "1.0",
            },
        );
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use pagestream_schemas::{Detection, ModelRef};

    use super::*;

    fn page(n: u32, dets: &[(&str, [f32; 4])]) -> PageResult {
        PageResult {
            page: n,
            width: 100,
            height: 200,
            dpi: 72.0,
            model: ModelRef { name: "m".into(), sha256: "abcdef0123456789".into() },
            detections: dets
                .iter()
                .map(|(l, b)| Detection { label: l.to_string(), score: 0.5, bbox: *b }.into())
                .collect(),
            unassigned_text: Vec::new(),
            timings: Default::default(),
        }
    }

    #[test]
    fn boxes_become_xywh_and_labels_keep_the_models_order() {
        let labels = vec!["text".to_string(), "figure".to_string()];
        let coco = export(
            "d",
            vec![page(2, &[("figure", [10.0, 20.0, 30.0, 60.0])]), page(1, &[("other", [0.0, 0.0, 5.0, 5.0])])],
            &labels,
            Some("t"),
        );
        let ids: Vec<u32> = coco.images.iter().map(|i| i.id).collect();
        assert_eq!(ids, [1, 2], "images in page order");
        assert_eq!(coco.images[1].file_name, "pages/2.png");
        let cats: Vec<(u32, &str)> = coco.categories.iter().map(|c| (c.id, c.name.as_str())).collect();
        assert_eq!(cats, [(1, "text"), (2, "figure"), (3, "other")]);
        let a = &coco.annotations[1];
        assert_eq!((a.id, a.image_id, a.category_id), (2, 2, 2));
        assert_eq!((a.bbox, a.area), ([10.0, 20.0, 20.0, 40.0], 800.0));
        assert_eq!(coco.annotations[0].category_id, 3);
        assert_eq!(coco.info.model.as_deref(), Some("m@abcdef012345"));
    }

    /// The streamed bytes are exactly those of the whole export serialised
    /// as a JSON value (what the API served before it streamed).
    #[test]
    fn the_writer_gives_the_exports_bytes() {
        let labels = ["text".to_string(), "figure".to_string(), "unused".to_string()];
        let odd = [0.1f32, 1.0 / 3.0, 1e-7, 123456.79, f32::NAN];
        let mut pages = Vec::new();
        for n in 1..=40u32 {
            let dets: Vec<(&str, [f32; 4])> = (0..(n % 5))
                .map(|i| {
                    let label = ["figure", "other", "text", "table"][(n as usize + i as usize) % 4];
                    let v = odd[(n + i) as usize % odd.len()] * (i + 1) as f32;
                    (label, [v, v * 2.0, v * 3.0 + 10.0, v * 4.0 + 7.5])
                })
                .collect();
            let mut p = page(n, &dets);
            p.width = 1000 + n;
            for (j, d) in p.detections.iter_mut().enumerate() {
                d.score = odd[j % 4] / 2.0;
            }
            pages.push(p);
        }
        pages.remove(7); // a page without results
        for (labels, finished) in [(&labels[..], Some("2026-01-01T00:00:00Z")), (&[][..], None)] {
            for pages in [pages.clone(), Vec::new()] {
                let want = serde_json::to_vec(
                    &serde_json::to_value(export("doc-1", pages.clone(), labels, finished)).unwrap(),
                )
                .unwrap();
                let mut w = CocoWriter::new("doc-1", labels, finished);
                let mut got = Vec::new();
                w.start(&mut got);
                for p in &pages {
                    w.page(p, &mut got);
                }
                w.finish(&mut got);
                assert_eq!(String::from_utf8(got).unwrap(), String::from_utf8(want).unwrap());
            }
        }
    }
}
