//! The words of a page's text layer, read from pdfium while the page is
//! open for rendering (no OCR, no extra model).
//!
//! pdfium's generated spaces and line breaks are the word boundaries (PDFs
//! written by LaTeX hold no space glyphs at all): a word is a run of
//! characters outside Unicode White_Space; a line break (`\n`, or a `\r`
//! not followed by one) ends a line. A line-end hyphen, which pdfium reports
//! as U+0002, is written as `-` and ends its word and line (words never span
//! two lines; joining hyphenated halves is left to the Markdown export).
//! Characters outside the Basic Multilingual Plane arrive as surrogate
//! pairs and are combined; ligatures are already spelled out by the PDF's
//! ToUnicode map (the rare U+FB00–U+FB06 code points are spelled out here).
//! A word's box is the union of its characters' loose boxes (their height
//! follows the font size, not the glyph's ink), mapped into the rendered
//! image's pixels with floating-point arithmetic: the page's crop box, its
//! `/Rotate` and the bitmap's per-axis scale, exactly as the bitmap was
//! drawn. A page without characters has no text layer (`None`).

use pagestream_schemas::{PageText, TextSource, Word, MAX_PAGE_TEXT_BYTES, MAX_PAGE_WORDS};
use pdfium_render::prelude::*;

/// pdfium's code for a line-end hyphen (and its text form).
const HYPHEN_MARKS: [char; 2] = ['\u{2}', '\u{fffe}'];

/// One character as the grouping needs it: its Unicode, whether pdfium
/// generated it (a space or line break it inferred), and its box in image
/// pixels (`None`: no usable box).
#[derive(Debug, Clone, PartialEq)]
pub struct Glyph {
    pub ch: char,
    pub generated: bool,
    pub bbox: Option<[f32; 4]>,
}

/// Maps page points to image pixels for a page drawn upright into a
/// `width` × `height` bitmap (top-left origin).
#[derive(Debug, Clone, Copy)]
pub struct PageToImage {
    /// The page box `[left, bottom, right, top]`, unrotated, in points.
    pub bounds: [f32; 4],
    /// `/Rotate`, clockwise: 0, 90, 180 or 270.
    pub rotation: u16,
    pub width: f32,
    pub height: f32,
}

impl PageToImage {
    /// The image position of page point `(x, y)`.
    pub fn point(&self, x: f32, y: f32) -> (f32, f32) {
        let [l, b, r, t] = self.bounds;
        let (pw, ph) = ((r - l).max(f32::MIN_POSITIVE), (t - b).max(f32::MIN_POSITIVE));
        let (w, h) = (self.width, self.height);
        match self.rotation {
            90 => ((y - b) / ph * w, (x - l) / pw * h),
            180 => ((r - x) / pw * w, (y - b) / ph * h),
            270 => ((t - y) / ph * w, (r - x) / pw * h),
            _ => ((x - l) / pw * w, (t - y) / ph * h),
        }
    }

    /// The image box of page rectangle `[left, bottom, right, top]`, clipped
    /// to the image (`None` when nothing of it is on the image).
    pub fn rect(&self, r: [f32; 4]) -> Option<[f32; 4]> {
        let (ax, ay) = self.point(r[0], r[1]);
        let (bx, by) = self.point(r[2], r[3]);
        let b = [ax.min(bx).max(0.0), ay.min(by).max(0.0), ax.max(bx).min(self.width), ay.max(by).min(self.height)];
        (b[0] < b[2] && b[1] < b[3]).then_some(b)
    }
}

/// The words of `page`, drawn into a `width` × `height` bitmap, or `None`
/// when the page has no text layer.
pub fn page_text(page: &PdfPage, width: u32, height: u32) -> Result<Option<PageText>, String> {
    let text = page.text().map_err(|e| format!("cannot read the text layer: {e:?}"))?;
    let chars = text.chars();
    if chars.is_empty() {
        return Ok(None);
    }
    let bounds = page.boundaries().bounding().map_err(|e| format!("no page box: {e:?}"))?.bounds;
    let rotation = match page.rotation() {
        Ok(PdfPageRenderRotation::Degrees90) => 90,
        Ok(PdfPageRenderRotation::Degrees180) => 180,
        Ok(PdfPageRenderRotation::Degrees270) => 270,
        _ => 0,
    };
    let map = PageToImage {
        bounds: [bounds.left().value, bounds.bottom().value, bounds.right().value, bounds.top().value],
        rotation,
        width: width as f32,
        height: height as f32,
    };
    let boxed = |c: &PdfPageTextChar| {
        c.loose_bounds().ok().and_then(|r| map.rect([r.left().value, r.bottom().value, r.right().value, r.top().value]))
    };
    let mut glyphs = Vec::with_capacity(chars.len());
    let mut pending_high: Option<(u32, Option<[f32; 4]>)> = None;
    for c in chars.iter() {
        let unit = c.unicode_value();
        let generated = c.is_generated().unwrap_or(false);
        if (0xD800..0xDC00).contains(&unit) {
            pending_high = Some((unit, boxed(&c)));
            continue;
        }
        let (ch, bbox) = match pending_high.take() {
            Some((high, high_box)) if (0xDC00..0xE000).contains(&unit) => {
                let cp = 0x10000 + ((high - 0xD800) << 10) + (unit - 0xDC00);
                (char::from_u32(cp), union(high_box, boxed(&c)))
            }
            _ => (char::from_u32(unit), None),
        };
        let Some(ch) = ch else { continue };
        let bbox = if generated || ch.is_whitespace() { None } else { bbox.or_else(|| boxed(&c)) };
        glyphs.push(Glyph { ch, generated, bbox });
    }
    Ok(Some(words(&glyphs)))
}

fn union(a: Option<[f32; 4]>, b: Option<[f32; 4]>) -> Option<[f32; 4]> {
    match (a, b) {
        (Some(a), Some(b)) => Some([a[0].min(b[0]), a[1].min(b[1]), a[2].max(b[2]), a[3].max(b[3])]),
        (a, b) => a.or(b),
    }
}

/// The words being built and the bounds they are kept within.
struct Builder {
    out: PageText,
    bytes: usize,
    line: u32,
    /// Whether the current line has a word yet.
    line_used: bool,
    word: String,
    bbox: Option<[f32; 4]>,
}

impl Builder {
    /// Ends the current word (a word without any box is dropped).
    fn end_word(&mut self) {
        if self.word.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.word);
        let Some(bbox) = self.bbox.take() else { return };
        if self.out.truncated || self.bytes + text.len() > MAX_PAGE_TEXT_BYTES || self.out.words.len() >= MAX_PAGE_WORDS
        {
            self.out.truncated = true;
            return;
        }
        self.bytes += text.len();
        self.out.words.push(Word { text, bbox, line: self.line });
        self.line_used = true;
    }

    fn end_line(&mut self) {
        self.end_word();
        if self.line_used {
            self.line += 1;
            self.line_used = false;
        }
    }
}

/// Groups glyphs into words and lines (pure; the rules of the module doc).
pub fn words(glyphs: &[Glyph]) -> PageText {
    let mut b = Builder {
        out: PageText { source: TextSource::TextLayer, words: Vec::new(), truncated: false },
        bytes: 0,
        line: 0,
        line_used: false,
        word: String::new(),
        bbox: None,
    };
    for (i, g) in glyphs.iter().enumerate() {
        match g.ch {
            '\n' => b.end_line(),
            '\r' if glyphs.get(i + 1).is_some_and(|n| n.ch == '\n') => b.end_word(),
            '\r' => b.end_line(),
            c if c.is_whitespace() => b.end_word(),
            c if HYPHEN_MARKS.contains(&c) => {
                b.word.push('-');
                b.bbox = union(b.bbox, g.bbox);
                b.end_line();
            }
            c if c.is_control() || c == '\u{ffff}' => {}
            c => {
                push_normalised(&mut b.word, c);
                b.bbox = union(b.bbox, g.bbox);
            }
        }
    }
    b.end_word();
    b.out
}

/// Appends `ch`, spelling out the Latin ligatures.
fn push_normalised(s: &mut String, ch: char) {
    match ch {
        '\u{fb00}' => s.push_str("ff"),
        '\u{fb01}' => s.push_str("fi"),
        '\u{fb02}' => s.push_str("fl"),
        '\u{fb03}' => s.push_str("ffi"),
        '\u{fb04}' => s.push_str("ffl"),
        '\u{fb05}' | '\u{fb06}' => s.push_str("st"),
        other => s.push(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(ch: char, x: f32, y: f32) -> Glyph {
        Glyph { ch, generated: false, bbox: Some([x, y, x + 5.0, y + 10.0]) }
    }

    fn space() -> Glyph {
        Glyph { ch: ' ', generated: true, bbox: None }
    }

    fn newline() -> Glyph {
        Glyph { ch: '\n', generated: true, bbox: None }
    }

    fn text_of(t: &PageText) -> Vec<(&str, u32)> {
        t.words.iter().map(|w| (w.text.as_str(), w.line)).collect()
    }

    #[test]
    fn words_split_at_spaces_and_lines_at_breaks_and_hyphens() {
        let mut glyphs = vec![g('H', 0.0, 0.0), g('i', 5.0, 0.0), space(), g('y', 15.0, 0.0), g('o', 20.0, 0.0)];
        glyphs.extend([Glyph { ch: '\r', generated: true, bbox: None }, newline()]);
        glyphs.extend([g('\u{fb01}', 0.0, 20.0), g('x', 5.0, 20.0), space()]);
        // A line-end hyphen (pdfium's U+0002): kept, ends the word and the line.
        glyphs.extend([g('p', 10.0, 20.0), g('r', 15.0, 20.0), g('\u{2}', 20.0, 20.0), g('o', 0.0, 40.0)]);
        let t = words(&glyphs);
        assert_eq!(text_of(&t), [("Hi", 0), ("yo", 0), ("fix", 1), ("pr-", 1), ("o", 2)]);
        assert_eq!(t.words[0].bbox, [0.0, 0.0, 10.0, 10.0]);
        assert_eq!(t.words[3].bbox, [10.0, 20.0, 25.0, 30.0]);
        assert_eq!(t.source, TextSource::TextLayer);
        assert!(!t.truncated);
    }

    #[test]
    fn glyphs_without_a_box_and_control_characters_are_dropped() {
        let glyphs = vec![
            g('a', 0.0, 0.0),
            Glyph { ch: 'b', generated: false, bbox: None },
            Glyph { ch: '\u{1}', generated: false, bbox: Some([0.0; 4]) },
            g('c', 10.0, 0.0),
            newline(),
            newline(),
            g('d', 0.0, 20.0),
            space(),
            Glyph { ch: 'e', generated: false, bbox: None },
        ];
        // Two breaks in a row start one line, not two; a word with no box at all is dropped.
        assert_eq!(text_of(&words(&glyphs)), [("abc", 0), ("d", 1)]);
    }

    #[test]
    fn page_points_map_to_image_pixels_for_every_rotation() {
        // A 100 × 200 pt page with its box at (10, 20), drawn at 2 px/pt.
        let page =
            |rotation, (width, height)| PageToImage { bounds: [10.0, 20.0, 110.0, 220.0], rotation, width, height };
        let upright = page(0, (200.0, 400.0));
        assert_eq!(upright.point(10.0, 220.0), (0.0, 0.0), "top-left corner");
        assert_eq!(upright.rect([20.0, 200.0, 30.0, 210.0]), Some([20.0, 20.0, 40.0, 40.0]));
        // Rotated 90° clockwise: the image is 400 × 200, the page's top-left is at the image's top-right.
        let turned = page(90, (400.0, 200.0));
        assert_eq!(turned.point(10.0, 220.0), (400.0, 0.0));
        assert_eq!(page(180, (200.0, 400.0)).point(10.0, 220.0), (200.0, 400.0));
        assert_eq!(page(270, (400.0, 200.0)).point(10.0, 220.0), (0.0, 200.0));
        // Off the page: clipped, or nothing.
        assert_eq!(upright.rect([0.0, 210.0, 20.0, 230.0]), Some([0.0, 0.0, 20.0, 20.0]));
        assert_eq!(upright.rect([200.0, 0.0, 210.0, 10.0]), None);
    }

    #[test]
    fn a_page_past_the_bounds_is_truncated_not_refused() {
        let mut glyphs = Vec::new();
        for i in 0..(MAX_PAGE_WORDS + 5) {
            glyphs.push(g('w', (i % 100) as f32 * 10.0, (i / 100) as f32 * 12.0));
            glyphs.push(space());
        }
        let t = words(&glyphs);
        assert_eq!(t.words.len(), MAX_PAGE_WORDS);
        assert!(t.truncated);
        t.validate().expect("what is kept passes the message's own check");
    }
}
