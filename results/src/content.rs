//! What each box says: a page's words assigned to its detected regions,
//! and every region (and every block of text outside them) put in reading
//! order. Pure functions ([`assign`]); these rules are part of the results
//! contract:
//!
//! - **Word → region.** A word belongs to the region whose box covers the
//!   largest share of the word's box area, if that share is at least 0.5;
//!   a tie goes to the smaller region (the more specific one), then to the
//!   higher score, then to the earlier detection. A word covered less than
//!   half by every region is *unassigned*. (A word box without area counts
//!   as fully inside a region that contains its corner, else outside.)
//! - **A region's text**: its words in the text layer's order (the order
//!   the words came in), a line (the text layer's `line`) at a time: words
//!   of a line joined by one space, lines by a newline (`"\n"`). Nothing is
//!   rewritten: in particular a line ending in a hyphen keeps it, even when
//!   the next line starts with a lowercase letter (no dehyphenation:
//!   `"well-"` + `"known"` and `"a-"` + `"mong"` cannot be told apart
//!   without a dictionary). A region without words has the text `""`.
//! - **Unassigned words** form lines (words with the same `line`, in
//!   order), and consecutive lines merge into one block ([`TextBlock`])
//!   while the next line overlaps the previous one horizontally, does not
//!   lie above it, and starts less than 1.0× the previous line's height
//!   below its bottom. A block's box is the union of its words' boxes, its
//!   text is made as a region's.
//! - **Reading order** numbers regions and blocks together, `order` 0, 1,
//!   …, n−1 (a consumer merges `detections` and `unassigned_text` by it):
//!   1. page headers first (labels `header`, `page_header`), top to
//!      bottom (by top edge, then left edge);
//!   2. then the body — every region that is neither a header nor a footer,
//!      and every block — by recursive XY-cut: a group is split at its
//!      widest vertical band of white space (a gap in the projection of its
//!      boxes on the x axis: columns), left part first, if it has one;
//!      otherwise at its widest horizontal band (a gap in the projection on
//!      the y axis), top part first; each part is ordered the same way. A
//!      group without either gap is read by top edge, then left edge. Boxes
//!      are shrunk by 2 px on each side when projected, so regions that
//!      overlap or touch by a pixel or two do not hide a gap;
//!   3. then footers (`footer`, `page_footer`, `footnote`), top to bottom;
//!   4. then each caption (`caption`, `figure_caption`, `table_caption`)
//!      moves next to its object: the nearest figure or table (`figure`,
//!      `picture`, `table`) whose horizontal extent overlaps the caption's
//!      and that lies above or below it within 1.5× the caption's height
//!      (edge to edge; between equally near ones, the one read last). It
//!      goes right after the object (after captions already placed there),
//!      except a caption above a table, which goes right before it. A
//!      caption without such an object stays where it is.
//! - **Labels** are read through [`role`]: lowercased, `-` and spaces read
//!   as `_`, so the CDLA model's labels (`figure_caption`, `header`, …) and
//!   DocLayNet's (`Caption`, `Page-header`, `Section-header`, …) both work.
//!
//! Why columns before rows: in a two-column body the gaps between
//! paragraphs of the left and right columns often line up; a horizontal
//! cut there would read the top halves of both columns before the bottom
//! halves. A full-width item (a title, a wide figure) has no vertical gap
//! across it, so such a page is still cut into horizontal bands first.

use pagestream_schemas::{Detection, PageText, TextSource, Word};

use crate::layout::{DetectionResult, TextBlock};

/// What a region is, for the reading order and the exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Title,
    Heading,
    Text,
    ListItem,
    Caption,
    Figure,
    Table,
    /// A page header: read first, left out of the exports.
    Header,
    /// A page footer or a footnote: read last, left out of the exports.
    Footer,
    Equation,
    Reference,
    Other,
}

/// The role of a detection label (the one place labels are interpreted):
/// lowercased, `-` and spaces read as `_`. CDLA's labels (`text`, `title`,
/// `figure`, `figure_caption`, `table`, `table_caption`, `header`,
/// `footer`, `reference`, `equation`) and DocLayNet's (`Caption`,
/// `Footnote`, `Formula`, `List-item`, `Page-footer`, `Page-header`,
/// `Picture`, `Section-header`, `Table`, `Text`, `Title`) all have one; a
/// few common synonyms (PubLayNet's `list`, `paragraph`, …) too.
impl Role {
    /// The roles `uploader.crops` may name.
    pub const CROPPABLE: [(&'static str, Role); 3] =
        [("figure", Role::Figure), ("table", Role::Table), ("equation", Role::Equation)];
}

pub fn role(label: &str) -> Role {
    match normalise(label).as_str() {
        "title" | "doc_title" | "document_title" => Role::Title,
        "section_header" | "heading" | "section_heading" | "subtitle" | "sub_title" => Role::Heading,
        "text" | "paragraph" | "plain_text" | "abstract" => Role::Text,
        "list_item" | "list" => Role::ListItem,
        "caption" | "figure_caption" | "table_caption" => Role::Caption,
        "figure" | "picture" | "image" => Role::Figure,
        "table" => Role::Table,
        "header" | "page_header" => Role::Header,
        "footer" | "page_footer" | "footnote" => Role::Footer,
        "equation" | "formula" => Role::Equation,
        "reference" | "references" => Role::Reference,
        _ => Role::Other,
    }
}

/// `Page-header` → `page_header`.
fn normalise(label: &str) -> String {
    label.trim().to_lowercase().replace(['-', ' '], "_")
}

fn area(b: &[f32; 4]) -> f32 {
    (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
}

fn intersection(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    area(&[a[0].max(b[0]), a[1].max(b[1]), a[2].min(b[2]), a[3].min(b[3])])
}

fn union(a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
    [a[0].min(b[0]), a[1].min(b[1]), a[2].max(b[2]), a[3].max(b[3])]
}

/// Horizontal extents overlap.
fn overlaps_x(a: &[f32; 4], b: &[f32; 4]) -> bool {
    a[0] < b[2] && b[0] < a[2]
}

/// The share of `word` that `region` covers.
fn share(word: &[f32; 4], region: &[f32; 4]) -> f32 {
    let word_area = area(word);
    if word_area > 0.0 {
        intersection(word, region) / word_area
    } else if (region[0]..=region[2]).contains(&word[0]) && (region[1]..=region[3]).contains(&word[1]) {
        1.0
    } else {
        0.0
    }
}

/// The region a word belongs to (an index into `detections`), if any.
fn region_of(word: &[f32; 4], detections: &[Detection]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, d) in detections.iter().enumerate() {
        let s = share(word, &d.bbox);
        if s.is_nan() || s < 0.5 {
            continue;
        }
        let better = match best {
            None => true,
            Some((j, t)) => {
                let other = &detections[j];
                let (a, b) = (area(&d.bbox), area(&other.bbox));
                s > t || (s == t && (a < b || (a == b && d.score > other.score)))
            }
        };
        if better {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// Words as text: one space between the words of a line, a newline between
/// lines.
fn join(words: &[&Word]) -> String {
    let mut out = String::new();
    let mut line = None;
    for w in words {
        match line {
            None => {}
            Some(l) if l == w.line => out.push(' '),
            Some(_) => out.push('\n'),
        }
        out.push_str(&w.text);
        line = Some(w.line);
    }
    out
}

/// Unassigned words as blocks of lines (text and box), not yet ordered.
fn blocks(words: &[&Word]) -> Vec<(String, [f32; 4])> {
    let mut lines: Vec<(Vec<&Word>, [f32; 4])> = Vec::new();
    for &w in words {
        match lines.last_mut() {
            Some((ws, b)) if ws.last().is_some_and(|last| last.line == w.line) => {
                ws.push(w);
                *b = union(*b, w.bbox);
            }
            _ => lines.push((vec![w], w.bbox)),
        }
    }
    // (words, block box, box of its last line)
    let mut out: Vec<(Vec<&Word>, [f32; 4], [f32; 4])> = Vec::new();
    for (ws, b) in lines {
        if let Some((block_words, block_box, prev)) = out.last_mut() {
            let height = prev[3] - prev[1];
            let gap = b[1] - prev[3];
            let not_above = b[3] > prev[1];
            if overlaps_x(&b, prev) && not_above && gap < height {
                block_words.extend(ws);
                *block_box = union(*block_box, b);
                *prev = b;
                continue;
            }
        }
        out.push((ws, b, b));
    }
    out.into_iter().map(|(ws, b, _)| (join(&ws), b)).collect()
}

/// One thing to order: a region or a block.
#[derive(Debug, Clone, Copy)]
struct Item {
    bbox: [f32; 4],
    role: Role,
}

/// Assigns `text`'s words to `detections` and puts everything in reading
/// order, by the rules of the module doc. The detections keep their number
/// and order (result `i` is detection `i`); each gets `text` (`""` when it
/// has no words), `order`, and `text_source`: the page text's source when
/// it got a word, else [`TextSource::None`]. Without `text` every region
/// is `none` with empty text, still ordered, and there are no blocks. The
/// blocks come in the text layer's order; `order` runs 0..n over the
/// regions and the blocks together.
pub fn assign(detections: &[Detection], text: Option<&PageText>) -> (Vec<DetectionResult>, Vec<TextBlock>) {
    let mut per_region: Vec<Vec<&Word>> = vec![Vec::new(); detections.len()];
    let mut loose: Vec<&Word> = Vec::new();
    for w in text.map(|t| t.words.as_slice()).unwrap_or_default() {
        match region_of(&w.bbox, detections) {
            Some(i) => per_region[i].push(w),
            None => loose.push(w),
        }
    }
    let source = text.map_or(TextSource::None, |t| t.source);
    let blocks = blocks(&loose);
    let items: Vec<Item> = detections
        .iter()
        .map(|d| Item { bbox: d.bbox, role: role(&d.label) })
        .chain(blocks.iter().map(|(_, b)| Item { bbox: *b, role: Role::Text }))
        .collect();
    let mut rank = vec![0u32; items.len()];
    for (n, i) in reading_order(&items).into_iter().enumerate() {
        rank[i] = n as u32;
    }
    let results = detections
        .iter()
        .zip(&per_region)
        .zip(&rank)
        .map(|((d, words), &order)| DetectionResult {
            label: d.label.clone(),
            score: d.score,
            bbox: d.bbox,
            text: Some(join(words)),
            order: Some(order),
            text_source: Some(if words.is_empty() { TextSource::None } else { source }),
            crop: None,
        })
        .collect();
    let blocks = blocks
        .into_iter()
        .zip(&rank[detections.len()..])
        .map(|((text, bbox), &order)| TextBlock { text, bbox, order, text_source: source })
        .collect();
    (results, blocks)
}

/// By top edge, then left edge.
fn top_to_bottom(items: &[Item], group: &mut [usize]) {
    group.sort_by(|&a, &b| {
        let (p, q) = (&items[a].bbox, &items[b].bbox);
        p[1].total_cmp(&q[1]).then(p[0].total_cmp(&q[0]))
    });
}

/// The reading order of `items` (their indices), by the module doc's rules.
fn reading_order(items: &[Item]) -> Vec<usize> {
    let all = 0..items.len();
    let mut headers: Vec<usize> = all.clone().filter(|&i| items[i].role == Role::Header).collect();
    let mut footers: Vec<usize> = all.clone().filter(|&i| items[i].role == Role::Footer).collect();
    let body: Vec<usize> = all.filter(|&i| !matches!(items[i].role, Role::Header | Role::Footer)).collect();
    top_to_bottom(items, &mut headers);
    top_to_bottom(items, &mut footers);
    let mut order = headers;
    order.extend(xy_cut(items, body));
    order.extend(footers);
    place_captions(items, &mut order);
    order
}

/// How far boxes are shrunk on each side when projected.
const SHRINK: f32 = 2.0;

/// The middle of the widest gap in the projection of `group`'s boxes on the
/// x axis (`x`) or the y axis, if there is a gap.
fn widest_gap(items: &[Item], group: &[usize], x: bool) -> Option<f32> {
    let mut spans: Vec<(f32, f32)> = group
        .iter()
        .map(|&i| {
            let b = items[i].bbox;
            let (lo, hi) = if x { (b[0], b[2]) } else { (b[1], b[3]) };
            let (lo, hi) = (lo + SHRINK, hi - SHRINK);
            if lo <= hi {
                (lo, hi)
            } else {
                let mid = (lo + hi) / 2.0;
                (mid, mid)
            }
        })
        .collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (first, rest) = spans.split_first()?;
    let mut reach = first.1;
    let mut best: Option<(f32, f32)> = None; // (width, middle)
    for &(lo, hi) in rest {
        if lo > reach && best.is_none_or(|(width, _)| lo - reach > width) {
            best = Some((lo - reach, (lo + reach) / 2.0));
        }
        reach = reach.max(hi);
    }
    best.map(|(_, middle)| middle)
}

/// Recursive XY-cut of `group`: columns first, then rows, else by position.
fn xy_cut(items: &[Item], mut group: Vec<usize>) -> Vec<usize> {
    if group.len() > 1 {
        for x in [true, false] {
            let Some(cut) = widest_gap(items, &group, x) else { continue };
            // A box's shrunk span lies wholly on one side of the gap, and
            // so does its centre.
            let centre = |i: usize| {
                let b = items[i].bbox;
                if x {
                    (b[0] + b[2]) / 2.0
                } else {
                    (b[1] + b[3]) / 2.0
                }
            };
            let (first, second): (Vec<usize>, Vec<usize>) = group.iter().partition(|&&i| centre(i) < cut);
            if first.is_empty() || second.is_empty() {
                continue;
            }
            let mut out = xy_cut(items, first);
            out.extend(xy_cut(items, second));
            return out;
        }
    }
    top_to_bottom(items, &mut group);
    group
}

/// The object of caption `c`: the nearest figure or table overlapping it
/// horizontally within 1.5 caption heights above or below (a tie: the one
/// read last), and whether it lies below the caption.
fn object_of(items: &[Item], order: &[usize], c: usize) -> Option<(usize, bool)> {
    let position = |i: usize| order.iter().position(|&j| j == i);
    let cb = items[c].bbox;
    let reach = 1.5 * (cb[3] - cb[1]).max(0.0);
    let mut best: Option<(f32, usize, bool)> = None; // (distance, object, below)
    for (o, item) in items.iter().enumerate() {
        let ob = item.bbox;
        if !matches!(item.role, Role::Figure | Role::Table) || !overlaps_x(&cb, &ob) {
            continue;
        }
        let below = ob[1] + ob[3] > cb[1] + cb[3]; // by centre
        let gap = if below { ob[1] - cb[3] } else { cb[1] - ob[3] };
        if gap > reach || gap.is_nan() {
            continue;
        }
        let distance = gap.max(0.0);
        // A tie (one caption under two objects side by side): the later one.
        if best.is_none_or(|(d, b, _)| distance < d || (distance == d && position(b) < position(o))) {
            best = Some((distance, o, below));
        }
    }
    best.map(|(_, o, below)| (o, below))
}

/// Moves each caption next to its object (the module doc's rule 4).
fn place_captions(items: &[Item], order: &mut Vec<usize>) {
    let captions: Vec<usize> = order.iter().copied().filter(|&i| items[i].role == Role::Caption).collect();
    // Captions already placed after each object.
    let mut after: Vec<usize> = vec![0; items.len()];
    for c in captions {
        let Some((object, below)) = object_of(items, order, c) else { continue };
        order.retain(|&i| i != c);
        let at = order.iter().position(|&i| i == object).expect("every object is ordered");
        if below && items[object].role == Role::Table {
            order.insert(at, c);
        } else {
            order.insert(at + 1 + after[object], c);
            after[object] += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(label: &str, bbox: [f32; 4]) -> Detection {
        Detection { label: label.into(), score: 0.9, bbox }
    }

    fn word(text: &str, bbox: [f32; 4], line: u32) -> Word {
        Word { text: text.into(), bbox, line }
    }

    fn layer(words: Vec<Word>) -> PageText {
        PageText { source: TextSource::TextLayer, words, truncated: false }
    }

    /// `names[i]` of each detection (and `block:<text>` of each block), in
    /// reading order; checks that `order` is 0..n over both.
    fn read(dets: &[Detection], names: &[&str], text: Option<&PageText>) -> Vec<String> {
        let (results, blocks) = assign(dets, text);
        assert_eq!(results.len(), dets.len());
        let mut all: Vec<(u32, String)> =
            results.iter().zip(names).map(|(r, n)| (r.order.expect("ordered"), n.to_string())).collect();
        all.extend(blocks.iter().map(|b| (b.order, format!("block:{}", b.text))));
        all.sort();
        let orders: Vec<u32> = all.iter().map(|(o, _)| *o).collect();
        assert_eq!(orders, (0..all.len() as u32).collect::<Vec<_>>(), "order is 0..n, each once");
        all.into_iter().map(|(_, n)| n).collect()
    }

    /// Each detection named by its label.
    fn read_labels(dets: &[Detection]) -> Vec<String> {
        let names: Vec<&str> = dets.iter().map(|d| d.label.as_str()).collect();
        read(dets, &names, None)
    }

    #[test]
    fn a_two_column_page_reads_header_title_left_column_right_column_footer() {
        let dets = vec![
            det("Page-footer", [50.0, 950.0, 550.0, 980.0]),
            det("r2", [320.0, 400.0, 550.0, 600.0]),
            det("l1", [50.0, 100.0, 280.0, 300.0]),
            det("Page-header", [50.0, 10.0, 550.0, 30.0]),
            det("Title", [50.0, 40.0, 550.0, 80.0]),
            det("r1", [320.0, 100.0, 550.0, 390.0]),
            // The gap between l1 and l2 lines up with the one between r1
            // and r2: a cut across the columns would read l1, r1, l2, r2.
            det("l2", [50.0, 395.0, 280.0, 700.0]),
            // A footnote at the bottom of the left column: with the footers.
            det("Footnote", [50.0, 900.0, 280.0, 930.0]),
            det("l3", [50.0, 710.0, 280.0, 890.0]),
            det("r3", [320.0, 610.0, 550.0, 930.0]),
        ];
        let names = ["footer", "r2", "l1", "header", "title", "r1", "l2", "footnote", "l3", "r3"];
        assert_eq!(
            read(&dets, &names, None),
            ["header", "title", "l1", "l2", "l3", "r1", "r2", "r3", "footnote", "footer"]
        );
        // CDLA's labels order the same.
        let mut cdla = dets.clone();
        for (d, l) in cdla.iter_mut().zip(["footer", "text", "text", "header", "title", "text", "text", "footer"]) {
            d.label = l.into();
        }
        assert_eq!(
            read(&cdla, &names, None),
            ["header", "title", "l1", "l2", "l3", "r1", "r2", "r3", "footnote", "footer"]
        );
    }

    #[test]
    fn boxes_touching_by_a_pixel_or_two_do_not_hide_a_gap() {
        // The columns' boxes reach 1 px into the gutter of the other (the
        // detector's boxes are loose); the title's 2 px under the columns.
        let dets = vec![
            det("l1", [50.0, 98.0, 301.0, 300.0]),
            det("r1", [299.0, 98.0, 550.0, 200.0]),
            det("l2", [50.0, 310.0, 301.0, 400.0]),
            det("r2", [299.0, 210.0, 550.0, 400.0]),
            det("title", [50.0, 40.0, 550.0, 100.0]),
        ];
        assert_eq!(read_labels(&dets), ["title", "l1", "l2", "r1", "r2"]);
        // Without any gap: top to bottom, then left to right.
        let dets = vec![
            det("c", [0.0, 50.0, 100.0, 200.0]),
            det("b", [60.0, 10.0, 200.0, 100.0]),
            det("a", [0.0, 10.0, 80.0, 100.0]),
        ];
        assert_eq!(read_labels(&dets), ["a", "b", "c"]);
    }

    /// Two figures side by side, each with its caption below; the captions
    /// are a little wider than the figures and overlap under the gutter, so
    /// XY-cut reads both figures (one band) and then both captions.
    #[test]
    fn a_caption_below_a_figure_comes_right_after_it() {
        let dets = vec![
            det("Picture", [50.0, 100.0, 280.0, 300.0]),
            det("Picture", [320.0, 100.0, 550.0, 300.0]),
            det("Caption", [50.0, 306.0, 310.0, 326.0]),
            det("Caption", [300.0, 306.0, 550.0, 326.0]),
            det("Text", [50.0, 360.0, 550.0, 500.0]),
            // Too far below the text's figure (more than 1.5 heights): stays.
            det("Caption", [50.0, 560.0, 550.0, 580.0]),
            det("Picture", [50.0, 600.0, 550.0, 700.0]),
        ];
        let names = ["fig_a", "fig_b", "cap_a", "cap_b", "text", "cap_far", "fig_c"];
        let items: Vec<Item> = dets.iter().map(|d| Item { bbox: d.bbox, role: role(&d.label) }).collect();
        let by_xy_cut: Vec<&str> = xy_cut(&items, (0..items.len()).collect()).into_iter().map(|i| names[i]).collect();
        assert_eq!(by_xy_cut, ["fig_a", "fig_b", "cap_a", "cap_b", "text", "cap_far", "fig_c"]);
        // cap_far is 20 px above fig_c, within 1.5 × 20: a caption above a
        // figure goes after it too.
        assert_eq!(read(&dets, &names, None), ["fig_a", "cap_a", "fig_b", "cap_b", "text", "fig_c", "cap_far"]);
        // 31 px above it (more than 1.5 × 20): it stays.
        let mut far = dets.clone();
        far[5].bbox = [50.0, 549.0, 550.0, 569.0];
        assert_eq!(read(&far, &names, None), ["fig_a", "cap_a", "fig_b", "cap_b", "text", "cap_far", "fig_c"]);
    }

    #[test]
    fn a_caption_above_a_table_comes_right_before_it() {
        // Two tables side by side with their captions above them, the
        // captions overlapping under the gutter: XY-cut reads both captions
        // and then both tables.
        let dets = vec![
            det("table", [50.0, 130.0, 280.0, 300.0]),
            det("table_caption", [50.0, 100.0, 310.0, 120.0]),
            det("table", [320.0, 130.0, 550.0, 300.0]),
            det("table_caption", [300.0, 100.0, 550.0, 120.0]),
            det("text", [50.0, 10.0, 550.0, 80.0]),
            // Below a table: after it (a table's notes).
            det("table_caption", [320.0, 305.0, 550.0, 320.0]),
        ];
        let names = ["table_a", "cap_a", "table_b", "cap_b", "text", "notes_b"];
        assert_eq!(read(&dets, &names, None), ["text", "cap_a", "table_a", "cap_b", "table_b", "notes_b"]);
    }

    #[test]
    fn two_captions_of_one_figure_keep_their_order() {
        let dets = vec![
            det("figure", [50.0, 100.0, 550.0, 300.0]),
            det("text", [50.0, 310.0, 550.0, 400.0]),
            det("figure_caption", [320.0, 72.0, 550.0, 92.0]),
            det("figure_caption", [50.0, 70.0, 280.0, 90.0]),
        ];
        assert_eq!(read(&dets, &["fig", "text", "cap_r", "cap_l"], None), ["fig", "cap_l", "cap_r", "text"]);
    }

    #[test]
    fn words_go_to_the_region_covering_at_least_half_of_them_the_smaller_on_a_tie() {
        let dets = vec![
            det("text", [0.0, 0.0, 100.0, 100.0]),
            det("table", [10.0, 10.0, 60.0, 60.0]),
            det("figure", [200.0, 200.0, 300.0, 300.0]),
            Detection { label: "figure".into(), score: 0.95, bbox: [200.0, 200.0, 300.0, 300.0] },
        ];
        let words = vec![
            word("inner", [20.0, 20.0, 40.0, 30.0], 0), // wholly in both: the smaller region
            word("outer", [70.0, 20.0, 90.0, 30.0], 0), // in the text only
            word("half", [90.0, 40.0, 110.0, 50.0], 1), // exactly half in: assigned
            word("a-", [10.0, 70.0, 30.0, 80.0], 2),    // a hyphen at a line end stays
            word("mong", [10.0, 82.0, 40.0, 92.0], 3),
            word("most", [55.0, 20.0, 65.0, 30.0], 4), // half in the table, all in the text: the text
            word("dup", [210.0, 210.0, 230.0, 220.0], 5), // two equal regions: the higher score
            word("out", [95.0, 95.0, 125.0, 105.0], 6), // a sixth in: unassigned
        ];
        let text = layer(words);
        let (results, blocks) = assign(&dets, Some(&text));
        let texts: Vec<Option<&str>> = results.iter().map(|r| r.text.as_deref()).collect();
        assert_eq!(texts, [Some("outer\nhalf\na-\nmong\nmost"), Some("inner"), Some(""), Some("dup")]);
        let sources: Vec<Option<TextSource>> = results.iter().map(|r| r.text_source).collect();
        let (layer, none) = (Some(TextSource::TextLayer), Some(TextSource::None));
        assert_eq!(sources, [layer, layer, none, layer]);
        assert_eq!(blocks.iter().map(|b| b.text.as_str()).collect::<Vec<_>>(), ["out"]);
        assert_eq!(blocks[0].text_source, TextSource::TextLayer);
    }

    #[test]
    fn unassigned_lines_form_blocks_ordered_with_the_regions() {
        let dets = vec![det("title", [100.0, 20.0, 500.0, 60.0]), det("text", [100.0, 300.0, 500.0, 400.0])];
        let words = vec![
            word("Title", [110.0, 30.0, 200.0, 50.0], 0),
            // Two lines 2 px apart (< one line height): one block, its box
            // the union of theirs.
            word("first", [100.0, 100.0, 150.0, 110.0], 1),
            word("para", [155.0, 100.0, 190.0, 110.0], 1),
            word("goes", [120.0, 112.0, 170.0, 122.0], 2),
            word("on", [175.0, 112.0, 185.0, 122.0], 2),
            // 10 px below the last one (not less than its 10 px height):
            // another block.
            word("second", [100.0, 132.0, 160.0, 142.0], 3),
            // Right below, but not overlapping horizontally: another block.
            word("aside", [300.0, 143.0, 340.0, 153.0], 4),
            // A line above the previous one (the text layer goes back up):
            // another block.
            word("margin", [290.0, 80.0, 350.0, 90.0], 5),
            word("Body", [110.0, 310.0, 150.0, 320.0], 6),
        ];
        let text = layer(words);
        let (_, blocks) = assign(&dets, Some(&text));
        let got: Vec<(&str, [f32; 4])> = blocks.iter().map(|b| (b.text.as_str(), b.bbox)).collect();
        assert_eq!(
            got,
            [
                ("first para\ngoes on", [100.0, 100.0, 190.0, 122.0]),
                ("second", [100.0, 132.0, 160.0, 142.0]),
                ("aside", [300.0, 143.0, 340.0, 153.0]),
                ("margin", [290.0, 80.0, 350.0, 90.0]),
            ]
        );
        // "margin" spans the x range of "aside"; the blocks at x 100..190
        // form a column left of them (a vertical gap at 190..290).
        assert_eq!(
            read(&dets, &["title", "text"], Some(&text)),
            ["title", "block:first para\ngoes on", "block:second", "block:margin", "block:aside", "text"]
        );
    }

    #[test]
    fn without_text_every_region_says_none_and_is_still_ordered() {
        let dets = vec![det("Text", [0.0, 50.0, 10.0, 60.0]), det("Section-header", [0.0, 0.0, 10.0, 10.0])];
        let (results, blocks) = assign(&dets, None);
        assert!(blocks.is_empty());
        assert_eq!(
            results.iter().map(|r| (r.text.as_deref(), r.order, r.text_source)).collect::<Vec<_>>(),
            [(Some(""), Some(1), Some(TextSource::None)), (Some(""), Some(0), Some(TextSource::None))]
        );
        assert_eq!((results[0].label.as_str(), results[0].score, results[0].bbox), ("Text", 0.9, dets[0].bbox));
        // OCR text is said to be OCR.
        let ocr =
            PageText { source: TextSource::Ocr, words: vec![word("x", [0.0, 0.0, 5.0, 5.0], 0)], truncated: false };
        let (results, _) = assign(&dets, Some(&ocr));
        assert_eq!((results[0].text_source, results[1].text_source), (Some(TextSource::None), Some(TextSource::Ocr)));
        // No detections: the text is all blocks.
        let (results, blocks) = assign(&[], Some(&ocr));
        assert!(results.is_empty());
        assert_eq!((blocks[0].text.as_str(), blocks[0].order), ("x", 0));
    }

    #[test]
    fn cdla_and_doclaynet_labels_have_roles() {
        let cdla = [
            ("text", Role::Text),
            ("title", Role::Title),
            ("figure", Role::Figure),
            ("figure_caption", Role::Caption),
            ("table", Role::Table),
            ("table_caption", Role::Caption),
            ("header", Role::Header),
            ("footer", Role::Footer),
            ("reference", Role::Reference),
            ("equation", Role::Equation),
        ];
        let doclaynet = [
            ("Caption", Role::Caption),
            ("Footnote", Role::Footer),
            ("Formula", Role::Equation),
            ("List-item", Role::ListItem),
            ("Page-footer", Role::Footer),
            ("Page-header", Role::Header),
            ("Picture", Role::Figure),
            ("Section-header", Role::Heading),
            ("Table", Role::Table),
            ("Text", Role::Text),
            ("Title", Role::Title),
        ];
        for (label, r) in cdla.into_iter().chain(doclaynet).chain([
            ("page header", Role::Header),
            ("FIGURE_CAPTION", Role::Caption),
            ("something", Role::Other),
        ]) {
            assert_eq!(role(label), r, "{label}");
        }
    }
}
