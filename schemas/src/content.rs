//! What a page says: its words, with boxes in the page image's pixels
//! (top-left origin, like [`crate::Detection`]). The splitter reads them
//! from the PDF's text layer while it has the page open; they travel with
//! the page ([`crate::PageRendered::text`], [`crate::PageInferred::text`])
//! to the uploader, which assigns them to the detected regions.

use serde::{Deserialize, Serialize};

/// Longest text of one page carried by a message, in bytes of word text;
/// the words past it (or past [`MAX_PAGE_WORDS`]) are dropped and
/// [`PageText::truncated`] is set. A page of running text holds 3–10 KB in
/// 500–1,500 words; the bounds keep a page message (words, boxes and an
/// inline image) under NATS's 1 MiB payload limit.
pub const MAX_PAGE_TEXT_BYTES: usize = 128 * 1024;

/// Most words of one page carried by a message.
pub const MAX_PAGE_WORDS: usize = 10_000;

/// Where a text came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextSource {
    /// The PDF's own text layer (exact, no recognition).
    TextLayer,
    /// Optical character recognition of the page image.
    Ocr,
    /// No text: a page or region without a text layer and not recognised.
    #[default]
    None,
}

impl TextSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TextSource::TextLayer => "text_layer",
            TextSource::Ocr => "ocr",
            TextSource::None => "none",
        }
    }
}

/// When the inferencer reads a page's text by OCR (the `ocr` option).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OcrMode {
    /// Pages without a text layer (scans, images of text) only.
    #[default]
    Auto,
    /// Every page, its text layer (if any) replaced by what OCR reads.
    Always,
    /// No page: pages without a text layer have no text.
    Never,
}

impl OcrMode {
    pub fn as_str(self) -> &'static str {
        match self {
            OcrMode::Auto => "auto",
            OcrMode::Always => "always",
            OcrMode::Never => "never",
        }
    }

    pub fn parse(s: &str) -> Option<OcrMode> {
        match s {
            "auto" => Some(OcrMode::Auto),
            "always" => Some(OcrMode::Always),
            "never" => Some(OcrMode::Never),
            _ => None,
        }
    }

    /// Whether a page with `text` (its text layer, if read) is OCR'd.
    pub fn wants_ocr(self, text: Option<&PageText>) -> bool {
        match self {
            OcrMode::Always => true,
            OcrMode::Never => false,
            OcrMode::Auto => text.is_none_or(|t| t.words.is_empty()),
        }
    }
}

/// One word: its text and its box `[x0, y0, x1, y1]` in pixels of the page
/// image, top-left origin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Word {
    pub text: String,
    pub bbox: [f32; 4],
    /// The text line it belongs to: 0, 1, … in the text layer's order
    /// (words of one line share it).
    pub line: u32,
}

/// A page's words, in the text layer's order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PageText {
    pub source: TextSource,
    pub words: Vec<Word>,
    /// Words past [`MAX_PAGE_TEXT_BYTES`] were dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl PageText {
    /// Bytes of word text (what [`MAX_PAGE_TEXT_BYTES`] bounds).
    pub fn text_bytes(&self) -> usize {
        self.words.iter().map(|w| w.text.len()).sum()
    }

    /// Checks what a message may carry: finite boxes, the size bound.
    pub fn validate(&self) -> Result<(), String> {
        let mut bytes = 0usize;
        for w in &self.words {
            bytes += w.text.len();
            if !w.bbox.iter().all(|v| v.is_finite()) || w.bbox[0] > w.bbox[2] || w.bbox[1] > w.bbox[3] {
                return Err(format!("text: word {:?} has an invalid bbox {:?}", w.text, w.bbox));
            }
        }
        if bytes > MAX_PAGE_TEXT_BYTES || self.words.len() > MAX_PAGE_WORDS {
            return Err(format!(
                "text: {} words, {bytes} bytes: more than {MAX_PAGE_WORDS} words or {MAX_PAGE_TEXT_BYTES} bytes",
                self.words.len()
            ));
        }
        Ok(())
    }
}
