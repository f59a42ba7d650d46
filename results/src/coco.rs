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
            detections: dets.iter().map(|(l, b)| Detection { label: l.to_string(), score: 0.5, bbox: *b }).collect(),
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
}
