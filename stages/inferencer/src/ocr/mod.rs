//! OCR for pages without a text layer: PP-OCR text detection, angle
//! classification and recognition, run on the inferencer's backends, with
//! the pipeline around the models ported from rapidocr-onnxruntime 1.4.4
//! (its defaults: the detector's input scaled to a 736-pixel short side,
//! DB post-processing, lines cut out bicubically, classified and turned in
//! batches of 6, recognised in batches of 6 sorted by width, greedy CTC
//! decoding, lines under 0.5 confidence dropped), so that its output can
//! be checked against rapidocr's on the same pages (`tests/reference/ocr`).
//!
//! The models and their settings come from an OCR manifest,
//! `models/<name>/ocr.toml` ([`OcrManifest`]), so a deployment may bring
//! other PP-OCR-style models. Each recognised line becomes words (split at
//! the recogniser's spaces), each word boxed by the time steps of its
//! characters along the line.

pub mod db;
pub mod image_ops;

use std::path::Path;
use std::time::Instant;

use pagestream_schemas::{PageText, TextSource, Word, MAX_PAGE_TEXT_BYTES, MAX_PAGE_WORDS};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::backend::{self, Backend, EngineOptions};
use crate::engine::{self, LoadError};
use db::{DbParams, Pt, Quad};
use image_ops::{perspective_transform, resize_linear, warp_perspective_cubic, Bgr};

/// Manifests compiled into the binary, used when no `models/` folder has one.
const BUILTIN: &[(&str, &str)] = &[("ppocr_v4", include_str!("../../../../models/ppocr_v4/ocr.toml"))];

/// An OCR model set: `models/<name>/ocr.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OcrManifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub license: String,
    pub det: DetSpec,
    /// The angle classifier (lines upside down are turned): optional.
    #[serde(default)]
    pub cls: Option<ClsSpec>,
    pub rec: RecSpec,
}

/// The text detector (DB).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DetSpec {
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub source: String,
    pub limit_side_len: u32,
    pub thresh: f32,
    pub box_thresh: f32,
    pub unclip_ratio: f32,
    pub max_candidates: usize,
}

/// The text-line angle classifier (0° / 180°).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClsSpec {
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub source: String,
    pub height: u32,
    pub width: u32,
    pub batch: usize,
    pub thresh: f32,
}

/// The text recogniser (CTC).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecSpec {
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub source: String,
    pub height: u32,
    pub width: u32,
    pub batch: usize,
    /// The character list: this metadata key of the model…
    #[serde(default)]
    pub characters_metadata_key: String,
    /// …or this file beside the manifest, one character a line.
    #[serde(default)]
    pub characters_file: String,
    pub text_score: f32,
}

impl OcrManifest {
    pub fn parse(text: &str, origin: &str) -> Result<OcrManifest, String> {
        let m: OcrManifest = toml::from_str(text).map_err(|e| format!("OCR manifest {origin}: {e}"))?;
        m.validate().map_err(|e| format!("OCR manifest {origin}: {e}"))?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        let mut hashes = vec![("det", &self.det.sha256), ("rec", &self.rec.sha256)];
        if let Some(cls) = &self.cls {
            hashes.push(("cls", &cls.sha256));
            if cls.height == 0 || cls.width == 0 || cls.batch == 0 {
                return Err("cls.height, cls.width and cls.batch must be positive".into());
            }
        }
        for (part, sha) in hashes {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{part}.sha256 must be 64 hex characters"));
            }
        }
        if self.rec.height == 0 || self.rec.width == 0 || self.rec.batch == 0 || self.det.limit_side_len == 0 {
            return Err("rec.height, rec.width, rec.batch and det.limit_side_len must be positive".into());
        }
        if self.rec.characters_metadata_key.is_empty() == self.rec.characters_file.is_empty() {
            return Err("set one of rec.characters_metadata_key and rec.characters_file".into());
        }
        for (k, v) in [
            ("det.thresh", self.det.thresh),
            ("det.box_thresh", self.det.box_thresh),
            ("rec.text_score", self.rec.text_score),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{k} must be within 0..=1"));
            }
        }
        Ok(())
    }

    /// `<models_dir>/<name>/ocr.toml`, else the built-in manifest of that
    /// name; with the folder its relative files are read from.
    pub fn load(models_dir: &Path, name: &str) -> Result<(OcrManifest, Option<std::path::PathBuf>), String> {
        let dir = models_dir.join(name);
        let path = dir.join("ocr.toml");
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            return Ok((OcrManifest::parse(&text, &path.display().to_string())?, Some(dir)));
        }
        match BUILTIN.iter().find(|(n, _)| *n == name) {
            Some((n, text)) => Ok((OcrManifest::parse(text, &format!("(built in) {n}"))?, None)),
            None => {
                Err(format!("unknown OCR model {name:?}: no {} and no built-in manifest of that name", path.display()))
            }
        }
    }
}

/// A loaded OCR model set.
pub struct Ocr {
    pub manifest: OcrManifest,
    /// sha256 of the detector, classifier and recogniser weights, in that
    /// order, hashed together (what the results name).
    pub sha256: String,
    det: Box<dyn Backend>,
    cls: Option<Box<dyn Backend>>,
    rec: Box<dyn Backend>,
    /// The recogniser's classes: blank, the characters, space.
    chars: Vec<String>,
}

/// One recognised line, in pixels of the page image.
#[derive(Debug, Clone, PartialEq)]
pub struct OcrLine {
    /// Corners, clockwise from the line's top-left as the detector saw it.
    pub quad: Quad,
    pub text: String,
    /// Mean confidence of its characters.
    pub score: f32,
}

/// What OCR read on a page.
#[derive(Debug, Clone, Default)]
pub struct OcrPage {
    pub lines: Vec<OcrLine>,
    pub text: PageText,
    pub det_ms: f32,
    pub cls_ms: f32,
    pub rec_ms: f32,
}

/// A text line cut out of the page, and how it was turned.
struct Crop {
    img: Bgr,
    quad: Quad,
    /// Turned by 90° counter-clockwise (a line taller than wide).
    rot90: bool,
    /// Turned by 180° (the classifier said upside down).
    flipped: bool,
}

fn read_weights(name: &str, part: &str, file: &str, sha256: &str, dir: &Path) -> Result<(Vec<u8>, String), LoadError> {
    engine::read_weights(&format!("OCR model {name} ({part})"), &dir.join(file), sha256)
}

impl Ocr {
    /// Loads the OCR model set `name` (manifest from `models_dir`, weights
    /// from `weights_dir`), checks every file's sha256 and the recogniser's
    /// classes against its character list, and runs each model once.
    pub fn load(models_dir: &Path, weights_dir: &Path, name: &str, opts: &EngineOptions) -> Result<Ocr, LoadError> {
        let (manifest, dir) = OcrManifest::load(models_dir, name).map_err(LoadError::Manifest)?;
        let m = &manifest;
        let (det_bytes, det_sha) = read_weights(name, "det", &m.det.file, &m.det.sha256, weights_dir)?;
        let (rec_bytes, rec_sha) = read_weights(name, "rec", &m.rec.file, &m.rec.sha256, weights_dir)?;
        let mut hasher = Sha256::new();
        hasher.update(det_sha.as_bytes());
        let load = |part: &str, bytes: &[u8]| {
            backend::load_any_shape(opts, &format!("{name} ({part})"), bytes).map_err(LoadError::Backend)
        };
        let det = load("det", &det_bytes)?;
        let cls = match &m.cls {
            Some(c) => {
                let (bytes, sha) = read_weights(name, "cls", &c.file, &c.sha256, weights_dir)?;
                hasher.update(sha.as_bytes());
                Some(load("cls", &bytes)?)
            }
            None => None,
        };
        hasher.update(rec_sha.as_bytes());
        let rec = load("rec", &rec_bytes)?;
        let keys: Vec<String> = if m.rec.characters_file.is_empty() {
            let key = &m.rec.characters_metadata_key;
            let text = rec.io().metadata.get(key).ok_or_else(|| {
                LoadError::Mismatch(format!("OCR model {name} (rec): no metadata key {key:?} with its characters"))
            })?;
            text.lines().map(str::to_string).collect()
        } else {
            let path = dir.as_deref().unwrap_or(models_dir).join(&m.rec.characters_file);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| LoadError::Manifest(format!("OCR model {name}: reading {}: {e}", path.display())))?;
            text.lines().map(str::to_string).collect()
        };
        let mut chars = Vec::with_capacity(keys.len() + 2);
        chars.push(String::new());
        chars.extend(keys);
        chars.push(" ".into());
        let ocr = Ocr { sha256: hex::encode(hasher.finalize()), manifest: manifest.clone(), det, cls, rec, chars };
        ocr.check().map_err(|e| LoadError::Mismatch(format!("OCR model {name}: {e}")))?;
        Ok(ocr)
    }

    /// Runs each model once on a blank input: the shapes, and the
    /// recogniser's classes against the character list.
    fn check(&self) -> Result<(), String> {
        let blank = Bgr::new(64, 64);
        self.det_map(&blank).map_err(|e| format!("det: {e}"))?;
        let line = Crop { img: Bgr::new(96, 32), quad: [[0.0; 2]; 4], rot90: false, flipped: false };
        let mut crops = vec![line];
        if self.cls.is_some() {
            self.classify(&mut crops).map_err(|e| format!("cls: {e}"))?;
        }
        let rec = &self.manifest.rec;
        let out = self.rec_batch(&crops, &[0], rec.height as usize)?;
        let classes = *out.shape.last().unwrap_or(&0) as usize;
        if classes != self.chars.len() {
            return Err(format!(
                "rec: the model has {classes} classes, its character list gives {} (blank + {} characters + space)",
                self.chars.len(),
                self.chars.len() - 2
            ));
        }
        Ok(())
    }

    /// Reads the text of a page image.
    pub fn recognize(&self, rgb: &image::RgbImage) -> Result<OcrPage, String> {
        let (w0, h0) = (rgb.width() as usize, rgb.height() as usize);
        let img = Bgr::from_rgb(rgb);
        let (img, ratio_w, ratio_h) = fit_sides(img);
        let (img, pad) = letterbox(img);
        let started = Instant::now();
        let quads = self.detect(&img)?;
        let det_ms = started.elapsed().as_secs_f32() * 1000.0;
        let mut crops: Vec<Crop> = quads.iter().filter_map(|q| crop(&img, q)).collect();
        let started = Instant::now();
        if self.cls.is_some() {
            self.classify(&mut crops)?;
        }
        let cls_ms = started.elapsed().as_secs_f32() * 1000.0;
        let started = Instant::now();
        let read = self.recognize_lines(&crops)?;
        let rec_ms = started.elapsed().as_secs_f32() * 1000.0;
        // Back to the page image's pixels.
        let to_page = |p: Pt| -> Pt {
            [(p[0] * ratio_w).clamp(0.0, w0 as f32), ((p[1] - pad as f32) * ratio_h).clamp(0.0, h0 as f32)]
        };
        let mut page = OcrPage { det_ms, cls_ms, rec_ms, ..Default::default() };
        page.text.source = TextSource::Ocr;
        let mut bytes = 0usize;
        for (crop, line) in crops.iter().zip(read) {
            if line.score < self.manifest.rec.text_score || line.text.trim().is_empty() {
                continue;
            }
            let index = page.lines.len() as u32;
            for (text, f0, f1) in line.words {
                if bytes + text.len() > MAX_PAGE_TEXT_BYTES || page.text.words.len() >= MAX_PAGE_WORDS {
                    page.text.truncated = true;
                    break;
                }
                bytes += text.len();
                let corners = crop.span(f0, f1).map(to_page);
                let bbox = [
                    corners.iter().map(|p| p[0]).fold(f32::MAX, f32::min),
                    corners.iter().map(|p| p[1]).fold(f32::MAX, f32::min),
                    corners.iter().map(|p| p[0]).fold(f32::MIN, f32::max),
                    corners.iter().map(|p| p[1]).fold(f32::MIN, f32::max),
                ];
                page.text.words.push(Word { text, bbox, line: index });
            }
            page.lines.push(OcrLine { quad: crop.quad.map(to_page), text: line.text, score: line.score });
        }
        Ok(page)
    }

    /// The detector's probability map of `img`: `(map, width, height)`.
    fn det_map(&self, img: &Bgr) -> Result<(Vec<f32>, usize, usize), String> {
        let limit = self.manifest.det.limit_side_len as f64;
        let (h, w) = (img.h as f64, img.w as f64);
        let ratio = if h.min(w) < limit { limit / h.min(w) } else { 1.0 };
        let round32 = |v: f64| (((v * ratio).trunc() / 32.0).round_ties_even() * 32.0).max(32.0) as usize;
        let (rw, rh) = (round32(w), round32(h));
        let resized = resize_linear(img, rw, rh);
        let mut input = vec![0f32; 3 * rw * rh];
        resized.normalize_into(&mut input, rw, rh);
        let out = self.det.run(input, [1, 3, rh, rw])?;
        let map = out.into_iter().next().ok_or("no output")?;
        if map.data.len() != rw * rh {
            return Err(format!("the probability map has shape {:?}, expected [1, 1, {rh}, {rw}]", map.shape));
        }
        Ok((map.data, rw, rh))
    }

    /// Text-line boxes of `img`, in its pixels, in PaddleOCR's order.
    fn detect(&self, img: &Bgr) -> Result<Vec<Quad>, String> {
        let (map, w, h) = self.det_map(img)?;
        let d = &self.manifest.det;
        let params = DbParams {
            thresh: d.thresh,
            box_thresh: d.box_thresh,
            unclip_ratio: d.unclip_ratio,
            max_candidates: d.max_candidates,
        };
        Ok(db::boxes(&map, w, h, img.w, img.h, &params))
    }

    /// Turns upside-down lines (batches of lines sorted by width / height).
    fn classify(&self, crops: &mut [Crop]) -> Result<(), String> {
        let (Some(cls), Some(spec)) = (&self.cls, &self.manifest.cls) else { return Ok(()) };
        let (ch, cw) = (spec.height as usize, spec.width as usize);
        for batch in by_aspect(crops).chunks(spec.batch) {
            let mut input = vec![0f32; batch.len() * 3 * ch * cw];
            for (k, &i) in batch.iter().enumerate() {
                let img = fit_height(&crops[i].img, ch, cw);
                img.normalize_into(&mut input[k * 3 * ch * cw..], cw, ch);
            }
            let out = cls.run(input, [batch.len(), 3, ch, cw])?.into_iter().next().ok_or("no output")?;
            let labels = out.data.len() / batch.len().max(1);
            if labels < 2 {
                return Err(format!("the classifier's output has shape {:?}, expected [n, 2]", out.shape));
            }
            for (k, &i) in batch.iter().enumerate() {
                let p = &out.data[k * labels..(k + 1) * labels];
                // Label 1 is "180°"; argmax takes the first of equal scores.
                if p[1] > p[0] && p[1] > spec.thresh {
                    let c = &mut crops[i];
                    c.img = c.img.rot180();
                    c.flipped = !c.flipped;
                }
            }
        }
        Ok(())
    }

    /// The recogniser's input width for a batch: its widest line at the
    /// recogniser's height, at least `rec.width`.
    fn batch_width(&self, crops: &[Crop], batch: &[usize]) -> usize {
        let spec = &self.manifest.rec;
        let mut max_ratio = spec.width as f64 / spec.height as f64;
        for &i in batch {
            max_ratio = max_ratio.max(crops[i].img.w as f64 / crops[i].img.h as f64);
        }
        (spec.height as f64 * max_ratio) as usize
    }

    /// One batch of lines through the recogniser, padded to the widest.
    fn rec_batch(&self, crops: &[Crop], batch: &[usize], height: usize) -> Result<backend::OutTensor, String> {
        let width = self.batch_width(crops, batch);
        let mut input = vec![0f32; batch.len() * 3 * height * width];
        for (k, &i) in batch.iter().enumerate() {
            let img = fit_height(&crops[i].img, height, width);
            img.normalize_into(&mut input[k * 3 * height * width..], width, height);
        }
        let out = self.rec.run(input, [batch.len(), 3, height, width])?.into_iter().next().ok_or("no output")?;
        if out.shape.len() != 3 || out.shape[0] as usize != batch.len() {
            return Err(format!("the recogniser's output has shape {:?}, expected [n, steps, classes]", out.shape));
        }
        Ok(out)
    }

    /// Each line's text, confidence and words (with the fraction of the
    /// line each spans), in `crops`' order.
    fn recognize_lines(&self, crops: &[Crop]) -> Result<Vec<ReadLine>, String> {
        let spec = &self.manifest.rec;
        let height = spec.height as usize;
        let mut out: Vec<Option<ReadLine>> = (0..crops.len()).map(|_| None).collect();
        for batch in by_aspect(crops).chunks(spec.batch) {
            let probs = self.rec_batch(crops, batch, height)?;
            let (steps, classes) = (probs.shape[1] as usize, probs.shape[2] as usize);
            if classes != self.chars.len() {
                return Err(format!("the recogniser has {classes} classes, the character list {}", self.chars.len()));
            }
            let stride = steps * classes;
            let input_w = self.batch_width(crops, batch);
            for (k, &i) in batch.iter().enumerate() {
                let p = &probs.data[k * stride..(k + 1) * stride];
                let resized_w = fitted_width(&crops[i].img, height, input_w) as f32;
                let px_per_step = input_w as f32 / steps.max(1) as f32;
                out[i] = Some(ctc_decode(p, steps, classes, &self.chars, px_per_step / resized_w));
            }
        }
        Ok(out.into_iter().map(|l| l.unwrap_or_default()).collect())
    }
}

/// What the recogniser read on one line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadLine {
    pub text: String,
    pub score: f32,
    /// Each word and the span of the line it covers, as fractions `0..=1`.
    pub words: Vec<(String, f32, f32)>,
}

/// Greedy CTC decoding of `steps × classes` probabilities: the best class
/// of each step, repeats merged, blanks (class 0) dropped; the confidence
/// is the mean probability of the characters kept. `step_frac` is the
/// fraction of the line one time step covers.
pub fn ctc_decode(p: &[f32], steps: usize, classes: usize, chars: &[String], step_frac: f32) -> ReadLine {
    let mut best = Vec::with_capacity(steps);
    for t in 0..steps {
        let row = &p[t * classes..(t + 1) * classes];
        let (mut idx, mut max) = (0usize, f32::MIN);
        for (c, &v) in row.iter().enumerate() {
            if v > max {
                (idx, max) = (c, v);
            }
        }
        best.push((idx, max));
    }
    let mut line = ReadLine::default();
    let (mut sum, mut kept) = (0f64, 0usize);
    // The word being read: text, first step, last step.
    let mut word: Option<(String, usize, usize)> = None;
    let finish = |word: &mut Option<(String, usize, usize)>, line: &mut ReadLine| {
        if let Some((text, a, b)) = word.take() {
            let f0 = (a as f32 * step_frac).clamp(0.0, 1.0);
            let f1 = ((b + 1) as f32 * step_frac).clamp(0.0, 1.0);
            line.words.push((text, f0, f1.max(f0)));
        }
    };
    for t in 0..steps {
        let (idx, prob) = best[t];
        if idx == 0 || (t > 0 && best[t - 1].0 == idx) {
            // A repeat extends the character (and its word) it repeats.
            if idx != 0 {
                if let Some(w) = word.as_mut() {
                    w.2 = t;
                }
            }
            continue;
        }
        sum += f64::from(prob);
        kept += 1;
        let ch = chars.get(idx).map(String::as_str).unwrap_or("");
        line.text.push_str(ch);
        if ch.trim().is_empty() {
            finish(&mut word, &mut line);
        } else {
            match word.as_mut() {
                Some(w) => {
                    w.0.push_str(ch);
                    w.2 = t;
                }
                None => word = Some((ch.to_string(), t, t)),
            }
        }
    }
    finish(&mut word, &mut line);
    line.score = if kept == 0 { 0.0 } else { (sum / kept as f64) as f32 };
    line
}

impl Crop {
    /// The corners of the part of the line between fractions `f0` and
    /// `f1` of its reading direction, in the page image's pixels.
    fn span(&self, f0: f32, f1: f32) -> [Pt; 4] {
        let [p0, p1, p2, p3] = self.quad;
        // Reading direction: along the top edge, or down the left edge for
        // a line turned by 90°; backwards when turned by 180°.
        let (a, b, c, d) = if self.rot90 { (p0, p3, p1, p2) } else { (p0, p1, p3, p2) };
        let (f0, f1) = if self.flipped { (1.0 - f1, 1.0 - f0) } else { (f0, f1) };
        let lerp = |u: Pt, v: Pt, f: f32| [u[0] + (v[0] - u[0]) * f, u[1] + (v[1] - u[1]) * f];
        [lerp(a, b, f0), lerp(a, b, f1), lerp(c, d, f1), lerp(c, d, f0)]
    }
}

/// Indices of `crops` by width / height, narrowest first.
fn by_aspect(crops: &[Crop]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..crops.len()).collect();
    idx.sort_by(|&a, &b| {
        let r = |i: usize| crops[i].img.w as f64 / crops[i].img.h as f64;
        r(a).total_cmp(&r(b))
    });
    idx
}

/// The width a line is resized to at `height`, at most `max_w`.
fn fitted_width(img: &Bgr, height: usize, max_w: usize) -> usize {
    let w = (height as f64 * (img.w as f64 / img.h as f64)).ceil() as usize;
    w.clamp(1, max_w)
}

/// The line resized to `height`, keeping its aspect up to `max_w`.
fn fit_height(img: &Bgr, height: usize, max_w: usize) -> Bgr {
    resize_linear(img, fitted_width(img, height, max_w), height)
}

/// The line under `quad` cut out straight (`get_rotate_crop_image`).
fn crop(img: &Bgr, quad: &Quad) -> Option<Crop> {
    let dist = |a: Pt, b: Pt| (a[0] - b[0]).hypot(a[1] - b[1]);
    let [p0, p1, p2, p3] = *quad;
    let cw = dist(p0, p1).max(dist(p2, p3)) as usize;
    let ch = dist(p0, p3).max(dist(p1, p2)) as usize;
    if cw == 0 || ch == 0 {
        return None;
    }
    let (fw, fh) = (cw as f32, ch as f32);
    let m = perspective_transform(*quad, [[0.0, 0.0], [fw, 0.0], [fw, fh], [0.0, fh]])?;
    let mut out = warp_perspective_cubic(img, &m, cw, ch)?;
    let rot90 = ch as f64 / cw as f64 >= 1.5;
    if rot90 {
        out = out.rot90();
    }
    Some(Crop { img: out, quad: *quad, rot90, flipped: false })
}

/// rapidocr's first step: the longer side brought down to 2000 pixels, the
/// shorter up to 30, both to multiples of 32; with the ratios back.
fn fit_sides(img: Bgr) -> (Bgr, f32, f32) {
    const MAX: f64 = 2000.0;
    const MIN: f64 = 30.0;
    let resize = |img: Bgr, ratio: f64| -> (Bgr, f32, f32) {
        let round32 = |v: usize| (((v as f64 * ratio).trunc() / 32.0).round_ties_even() * 32.0).max(32.0) as usize;
        let (rw, rh) = (round32(img.w), round32(img.h));
        let (fw, fh) = (img.w as f32 / rw as f32, img.h as f32 / rh as f32);
        (resize_linear(&img, rw, rh), fw, fh)
    };
    let (mut img, mut fw, mut fh) = (img, 1.0f32, 1.0f32);
    let longest = img.w.max(img.h) as f64;
    if longest > MAX {
        (img, fw, fh) = resize(img, MAX / longest);
    }
    let shortest = img.w.min(img.h) as f64;
    if shortest < MIN {
        let (i, gw, gh) = resize(img, MIN / shortest);
        (img, fw, fh) = (i, fw * gw, fh * gh);
    }
    (img, fw, fh)
}

/// rapidocr's letterbox of very flat images (height ≤ 30 or wider than 8
/// heights): black rows above and below; with the rows added on top.
fn letterbox(img: Bgr) -> (Bgr, usize) {
    let (w, h) = (img.w, img.h);
    if h <= 30 || w as f64 / h as f64 > 8.0 {
        let pad = ((w / 8).max(30) * 2).abs_diff(h) / 2;
        return (img.pad_vertical(pad, pad), pad);
    }
    (img, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_manifest_parses_and_bad_ones_say_why() {
        let (m, dir) = OcrManifest::load(Path::new("/nonexistent"), "ppocr_v4").unwrap();
        assert!(dir.is_none());
        assert_eq!((m.det.limit_side_len, m.rec.batch, m.cls.as_ref().map(|c| c.width)), (736, 6, Some(192)));
        let text = BUILTIN[0].1;
        let err = OcrManifest::parse(&text.replace("text_score = 0.5", "text_score = 1.5"), "t").unwrap_err();
        assert!(err.contains("rec.text_score"), "{err}");
        let err = OcrManifest::parse(&text.replace("characters_metadata_key = \"character\"", ""), "t").unwrap_err();
        assert!(err.contains("characters"), "{err}");
        let err = OcrManifest::load(Path::new("/nonexistent"), "nope").unwrap_err();
        assert!(err.contains("unknown OCR model \"nope\""), "{err}");
    }

    fn chars() -> Vec<String> {
        ["", "a", "b", "c", " "].iter().map(|s| s.to_string()).collect()
    }

    /// Probabilities with `best` winning at each step (0.9).
    fn probs(best: &[usize]) -> Vec<f32> {
        let mut p = vec![0.025f32; best.len() * 5];
        for (t, &c) in best.iter().enumerate() {
            p[t * 5 + c] = 0.9;
        }
        p
    }

    #[test]
    fn ctc_merges_repeats_drops_blanks_and_boxes_words() {
        // "ab" then a space then "ca", over 10 steps.
        let steps = [1, 1, 0, 2, 4, 0, 3, 0, 1, 0];
        let line = ctc_decode(&probs(&steps), 10, 5, &chars(), 0.1);
        assert_eq!(line.text, "ab ca");
        assert!((line.score - 0.9).abs() < 1e-6);
        assert_eq!(line.words.len(), 2);
        assert_eq!(line.words[0].0, "ab");
        assert!((line.words[0].1 - 0.0).abs() < 1e-6 && (line.words[0].2 - 0.4).abs() < 1e-6, "{:?}", line.words);
        assert_eq!(line.words[1].0, "ca");
        assert!((line.words[1].1 - 0.6).abs() < 1e-6 && (line.words[1].2 - 0.9).abs() < 1e-6, "{:?}", line.words);
        // A blank between equal characters keeps both.
        assert_eq!(ctc_decode(&probs(&[1, 0, 1]), 3, 5, &chars(), 0.3).text, "aa");
        // Nothing read: confidence 0.
        let empty = ctc_decode(&probs(&[0, 0]), 2, 5, &chars(), 0.5);
        assert_eq!((empty.text.as_str(), empty.score, empty.words.len()), ("", 0.0, 0));
    }

    #[test]
    fn word_spans_follow_the_reading_direction() {
        let quad = [[10.0, 20.0], [110.0, 20.0], [110.0, 40.0], [10.0, 40.0]];
        let c = Crop { img: Bgr::new(1, 1), quad, rot90: false, flipped: false };
        let s = c.span(0.5, 1.0);
        assert_eq!(s[0], [60.0, 20.0]);
        assert_eq!(s[2], [110.0, 40.0]);
        // Upside down: the first half of the reading is the right half of the box.
        let c = Crop { flipped: true, ..c };
        assert_eq!(c.span(0.0, 0.5)[0], [60.0, 20.0]);
        // A vertical line read top to bottom.
        let tall = [[0.0, 0.0], [20.0, 0.0], [20.0, 100.0], [0.0, 100.0]];
        let c = Crop { img: Bgr::new(1, 1), quad: tall, rot90: true, flipped: false };
        let s = c.span(0.0, 0.25);
        assert_eq!((s[0], s[1]), ([0.0, 0.0], [0.0, 25.0]));
    }

    #[test]
    fn page_sizes_are_fitted_like_rapidocr() {
        // Letter at 150 dpi: untouched.
        let (img, fw, fh) = fit_sides(Bgr::new(1275, 1651));
        assert_eq!((img.w, img.h, fw, fh), (1275, 1651, 1.0, 1.0));
        // 300 dpi: the long side to 2000, both to multiples of 32.
        let (img, fw, fh) = fit_sides(Bgr::new(2550, 3300));
        assert_eq!((img.w, img.h), (1536, 1984));
        assert!((fw - 2550.0 / 1536.0).abs() < 1e-6 && (fh - 3300.0 / 1984.0).abs() < 1e-6);
        // A strip 800×50 is letterboxed: 75 rows above and below.
        let (img, pad) = letterbox(Bgr::new(800, 50));
        assert_eq!((img.h, pad), (200, 75));
        assert_eq!(letterbox(Bgr::new(771, 996)).1, 0);
    }
}
