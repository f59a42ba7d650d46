//! The text exports of a document, page by page, so they stream while the
//! document runs (like [`crate::coco::CocoWriter`]): the caller writes
//! [`markdown_document_header`] once, then [`markdown_page`] (or
//! [`chunks_page`]) of each page with results, in page order.
//!
//! A page's items are its detections and its `unassigned_text` blocks,
//! merged by `order` (results written before pages carried text have no
//! `order`: by top edge, then left edge). Labels are read through
//! [`crate::content::role`].
//!
//! **Markdown** ([`markdown_page`]): `<!-- page N -->`, then each item, one
//! blank line apart, the page ending with a newline:
//!
//! | role | Markdown |
//! |------|----------|
//! | title | `# text` |
//! | heading | `## text` |
//! | text, reference, other, a block of unassigned text | a paragraph: the lines joined by a space |
//! | list item | `- text` (a leading bullet `•·-–*▪◦` dropped); a numbered one (`1.`, `1)`) as `1. text` |
//! | caption | `*text*` |
//! | figure | `<!-- figure: label, [x0, y0, x1, y1] -->` (its box in pixels, no text) |
//! | table | its lines as rows of a fenced `text` block (plain text rows for now) |
//! | equation | `$$ text $$` |
//! | page header, page footer, footnote | left out (not content) |
//!
//! Items without text are left out, except figures. Titles, headings and
//! equations are put on one line. In a paragraph, a line ending in a
//! hyphen after a letter, before a line starting with a lowercase letter,
//! is joined to it without the space, the hyphen kept (`well-` + `known` → `well-known`;
//! `a-` + `mong` → `a-mong`): the text is not dehyphenated, as in the page
//! JSON.
//!
//! **Chunks** ([`chunks_page`]): one [`Chunk`] per item with text, for
//! retrieval, in reading order, page headers and footers left out; the
//! caller writes each as a line of JSON (JSON Lines). A chunk's `id`,
//! `<doc_id>:<page>:<order>`, is the same for the same results.

use pagestream_schemas::TextSource;
use serde::{Deserialize, Serialize};

use crate::content::{role, Role};
use crate::layout::PageResult;

/// The heading of a document's Markdown (`# title`), or nothing.
pub fn markdown_document_header(title: Option<&str>) -> String {
    match title.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => format!("# {}\n\n", one_line(t)),
        None => String::new(),
    }
}

/// One thing of a page, in reading order.
struct Piece<'a> {
    order: Option<u32>,
    bbox: [f32; 4],
    label: &'a str,
    text: &'a str,
    text_source: TextSource,
}

/// A page's regions and blocks in reading order (results written before
/// pages carried text have no `order`: top to bottom, left to right).
fn pieces(page: &PageResult) -> Vec<Piece<'_>> {
    let mut all: Vec<Piece> = page
        .detections
        .iter()
        .map(|d| Piece {
            order: d.order,
            bbox: d.bbox,
            label: &d.label,
            text: d.text.as_deref().unwrap_or(""),
            text_source: d.text_source.unwrap_or_default(),
        })
        .chain(page.unassigned_text.iter().map(|b| Piece {
            order: Some(b.order),
            bbox: b.bbox,
            label: "text",
            text: &b.text,
            text_source: b.text_source,
        }))
        .collect();
    all.sort_by(|a, b| {
        a.order
            .unwrap_or(u32::MAX)
            .cmp(&b.order.unwrap_or(u32::MAX))
            .then(a.bbox[1].total_cmp(&b.bbox[1]))
            .then(a.bbox[0].total_cmp(&b.bbox[0]))
    });
    all
}

/// Lines joined into one paragraph by a space; a line ending in a letter
/// and a hyphen is joined to a next line starting with a lowercase letter
/// without the space (the hyphen kept).
fn paragraph(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut end = out.chars().rev();
        let hyphenated = end.next() == Some('-')
            && end.next().is_some_and(char::is_alphabetic)
            && line.starts_with(char::is_lowercase);
        if !out.is_empty() && !hyphenated {
            out.push(' ');
        }
        out.push_str(line);
    }
    out
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A list item: a leading bullet dropped, a leading number (`1.`, `1)`)
/// kept as `1.`; nothing if only a bullet is left.
fn list_item(text: &str) -> Option<String> {
    let p = paragraph(text);
    let digits = p.chars().take_while(char::is_ascii_digit).count();
    let rest = &p[digits..];
    if digits > 0 && rest.starts_with(['.', ')']) && rest[1..].starts_with(char::is_whitespace) {
        return Some(format!("{}. {}", &p[..digits], rest[1..].trim_start()));
    }
    let item = p.trim_start_matches(['•', '·', '-', '–', '*', '▪', '◦']).trim_start();
    (!item.is_empty()).then(|| format!("- {item}"))
}

/// The Markdown of one page (the rules of the module doc): `<!-- page N
/// -->`, a blank line, then its items, each followed by a blank line.
pub fn markdown_page(page: &PageResult) -> String {
    let mut blocks = Vec::new();
    for p in pieces(page) {
        let text = p.text.trim();
        let r = role(p.label);
        if text.is_empty() && r != Role::Figure {
            continue;
        }
        let block = match r {
            Role::Header | Role::Footer => continue,
            Role::Title => format!("# {}", one_line(text)),
            Role::Heading => format!("## {}", one_line(text)),
            Role::ListItem => match list_item(text) {
                Some(item) => item,
                None => continue,
            },
            Role::Caption => format!("*{}*", paragraph(text)),
            Role::Table => {
                let rows: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                format!("```text\n{}\n```", rows.join("\n"))
            }
            Role::Equation => format!("$$ {} $$", one_line(text)),
            Role::Figure => {
                let b = p.bbox;
                format!("<!-- figure: {}, [{:.0}, {:.0}, {:.0}, {:.0}] -->", one_line(p.label), b[0], b[1], b[2], b[3])
            }
            Role::Text | Role::Reference | Role::Other => paragraph(text),
        };
        blocks.push(block);
    }
    let mut out = format!("<!-- page {} -->\n\n", page.page);
    for b in blocks {
        out.push_str(&b);
        out.push_str("\n\n");
    }
    out
}

/// One retrieval chunk: a region or block of a page with its text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// `<doc_id>:<page>:<order>`: stable for the same results.
    pub id: String,
    pub doc_id: String,
    pub page: u32,
    pub order: u32,
    pub label: String,
    /// `[x0, y0, x1, y1]` in pixels of the page image.
    pub bbox: [f32; 4],
    pub text: String,
    pub text_source: TextSource,
}

/// A page's chunks in reading order: every region or block with text,
/// page headers and footers left out.
pub fn chunks_page(doc_id: &str, page: &PageResult) -> Vec<Chunk> {
    pieces(page)
        .into_iter()
        .enumerate()
        .filter(|(_, p)| !p.text.trim().is_empty() && !matches!(role(p.label), Role::Header | Role::Footer))
        .map(|(i, p)| {
            let order = p.order.unwrap_or(i as u32);
            Chunk {
                id: format!("{doc_id}:{}:{order}", page.page),
                doc_id: doc_id.to_string(),
                page: page.page,
                order,
                label: p.label.to_string(),
                bbox: p.bbox,
                text: p.text.to_string(),
                text_source: p.text_source,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{DetectionResult, TextBlock};
    use pagestream_schemas::ModelRef;

    fn region(label: &str, order: u32, text: &str, bbox: [f32; 4]) -> DetectionResult {
        DetectionResult {
            label: label.into(),
            score: 0.9,
            bbox,
            text: Some(text.into()),
            order: Some(order),
            text_source: Some(if text.is_empty() { TextSource::None } else { TextSource::TextLayer }),
            crop: None,
        }
    }

    fn block(order: u32, text: &str, bbox: [f32; 4]) -> TextBlock {
        TextBlock { text: text.into(), bbox, order, text_source: TextSource::TextLayer }
    }

    fn page(detections: Vec<DetectionResult>, unassigned_text: Vec<TextBlock>) -> PageResult {
        PageResult {
            page: 3,
            width: 600,
            height: 800,
            dpi: 72.0,
            model: ModelRef::default(),
            detections,
            unassigned_text,
            timings: Default::default(),
        }
    }

    #[test]
    fn a_page_in_markdown() {
        let p = page(
            vec![
                region("text", 2, "Density-\nbased clustering is well-\nknown -\nand old -\nvery old.", [0.0; 4]),
                region("Title", 1, "A  Title\nin two lines", [0.0, 40.0, 300.0, 60.0]),
                region("Page-header", 0, "Journal of X", [0.0, 0.0, 300.0, 20.0]),
                region("Section-header", 3, "1 Introduction", [0.0; 4]),
                region("Picture", 4, "", [0.4, 210.0, 300.6, 399.5]),
                region("Caption", 5, "Figure 1: Points\nin a plane.", [0.0; 4]),
                region("table_caption", 6, "Table 1: Sizes.", [0.0; 4]),
                region("table", 7, "  a 1\n\nb 2  ", [0.0; 4]),
                region("List-item", 8, "• first\nitem", [0.0; 4]),
                region("List-item", 9, "2) second", [0.0; 4]),
                region("List-item", 10, "1.5 mm thick", [0.0; 4]),
                region("List-item", 11, "•", [0.0; 4]),
                region("Formula", 12, "x =\ny", [0.0; 4]),
                region("Formula", 13, "", [0.0; 4]),
                region("Text", 14, "", [0.0; 4]),
                region("reference", 16, "[1] Ester, M.", [0.0; 4]),
                region("Footnote", 17, "1 A note.", [0.0; 4]),
                region("Page-footer", 18, "3", [0.0; 4]),
            ],
            vec![block(15, "loose\ntext", [0.0; 4])],
        );
        assert_eq!(
            markdown_page(&p),
            "<!-- page 3 -->\n\n\
             # A Title in two lines\n\n\
             Density-based clustering is well-known - and old - very old.\n\n\
             ## 1 Introduction\n\n\
             <!-- figure: Picture, [0, 210, 301, 400] -->\n\n\
             *Figure 1: Points in a plane.*\n\n\
             *Table 1: Sizes.*\n\n\
             ```text\na 1\nb 2\n```\n\n\
             - first item\n\n\
             2. second\n\n\
             - 1.5 mm thick\n\n\
             $$ x = y $$\n\n\
             loose text\n\n\
             [1] Ester, M.\n\n"
        );
        assert_eq!(markdown_document_header(Some(" DBSCAN\n paper ")), "# DBSCAN paper\n\n");
        assert_eq!(markdown_document_header(Some("  ")), "");
        assert_eq!(markdown_document_header(None), "");
        // Without items: the page mark alone.
        assert_eq!(markdown_page(&page(vec![], vec![])), "<!-- page 3 -->\n\n");
    }

    #[test]
    fn chunks_have_stable_ids_in_reading_order_without_headers_footers_or_empty_items() {
        let p = page(
            vec![
                region("text", 2, "second\nline", [0.0, 100.0, 10.0, 110.0]),
                region("Page-header", 0, "running head", [0.0, 0.0, 10.0, 10.0]),
                region("Caption", 1, "first", [0.0, 50.0, 10.0, 60.0]),
                region("figure", 3, "", [0.0, 200.0, 10.0, 210.0]),
                region("footer", 5, "page 3", [0.0, 790.0, 10.0, 800.0]),
            ],
            vec![block(4, "outside", [1.0, 2.0, 3.0, 4.0])],
        );
        let chunks = chunks_page("doc1", &p);
        let got: Vec<(&str, u32, &str, &str)> =
            chunks.iter().map(|c| (c.id.as_str(), c.order, c.label.as_str(), c.text.as_str())).collect();
        assert_eq!(
            got,
            [
                ("doc1:3:1", 1, "Caption", "first"),
                ("doc1:3:2", 2, "text", "second\nline"),
                ("doc1:3:4", 4, "text", "outside")
            ]
        );
        assert_eq!(chunks[2].bbox, [1.0, 2.0, 3.0, 4.0]);
        assert!(chunks.iter().all(|c| c.doc_id == "doc1" && c.page == 3));
        // The same results give the same chunks.
        assert_eq!(chunks_page("doc1", &p.clone()), chunks);
        let line = serde_json::to_string(&chunks[1]).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&line).unwrap(),
            serde_json::json!({"id": "doc1:3:2", "doc_id": "doc1", "page": 3, "order": 2, "label": "text",
                               "bbox": [0.0, 100.0, 10.0, 110.0], "text": "second\nline", "text_source": "text_layer"})
        );
        assert!(!line.contains('\n'), "one line of JSON Lines");
    }

    #[test]
    fn results_written_before_text_still_read_and_export() {
        let old = r#"{"page": 1, "width": 10, "height": 10, "dpi": 72.0, "model": {"name": "m", "sha256": ""},
                      "detections": [{"label": "text", "score": 0.9, "bbox": [0, 5, 10, 9]},
                                     {"label": "figure", "score": 0.8, "bbox": [5, 0, 10, 4]},
                                     {"label": "figure", "score": 0.8, "bbox": [0, 0, 4, 4]}],
                      "timings": {}}"#;
        let p: PageResult = serde_json::from_str(old).unwrap();
        assert!(p.unassigned_text.is_empty() && p.detections.iter().all(|d| d.text.is_none() && d.order.is_none()));
        // No text: only the figures, top to bottom then left to right.
        assert_eq!(
            markdown_page(&p),
            "<!-- page 1 -->\n\n<!-- figure: figure, [0, 0, 4, 4] -->\n\n<!-- figure: figure, [5, 0, 10, 4] -->\n\n"
        );
        assert!(chunks_page("d", &p).is_empty());
        // It serialises back without the new fields.
        let back = serde_json::to_string(&p).unwrap();
        assert!(
            !back.contains("unassigned_text") && !back.contains("order") && !back.contains("text_source"),
            "{back}"
        );
    }
}
