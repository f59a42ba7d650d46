//! PDF rendering with pdfium, off the async runtime.
//!
//! pdfium allows one binding per process and is not thread-safe, so one
//! dedicated thread owns it and renders jobs one page at a time. Each page is
//! encoded to PNG on that thread and handed to the async side through a
//! channel of capacity 1: at most two page images exist at once, whatever
//! the page count. Scale out with processes, not threads.
//!
//! The splitter does not load pdfium itself: [`Renderer::isolated`] runs it
//! in a supervised child process (the `render-worker` binary, see
//! [`crate::worker`]), so a PDF that crashes pdfium, hangs it or exhausts
//! memory fails that page (`render_crashed`, `render_timeout`) instead of
//! the stage. [`Renderer::in_process`] keeps the thread in this process
//! (fuzzing, tests that compare pixels).

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Instant;

use image::{DynamicImage, RgbImage};
use pdfium_render::prelude::*;

/// What to render.
#[derive(Debug, Clone)]
pub struct RenderRequest {
    pub pdf: PathBuf,
    pub password: Option<String>,
    pub dpi: f32,
    pub max_pixels: u64,
    /// 1-based pages to render this turn (clipped to the page count).
    pub pages: RangeInclusive<u32>,
    /// 1-based pages already rendered (skipped after a redelivery).
    pub skip: HashSet<u32>,
    /// Read each page's text layer (`splitter.text_layer`).
    pub text: bool,
}

/// One page, ready to publish.
#[derive(Debug)]
pub struct RenderedPage {
    pub page: u32,
    pub width: u32,
    pub height: u32,
    /// Effective DPI (lower than requested when the pixel cap applied).
    pub dpi: f32,
    pub png: Vec<u8>,
    pub render_ms: f32,
    /// The words of its text layer (`None`: the page has none).
    pub text: Option<pagestream_schemas::PageText>,
}

/// Messages from the render thread, in order: `Opened` (or `OpenFailed`),
/// then one `Page`/`PageFailed` per page not skipped.
#[derive(Debug)]
pub enum RenderEvent {
    Opened { page_count: u32 },
    OpenFailed { code: &'static str, message: String },
    Page(RenderedPage),
    PageFailed { page: u32, code: &'static str, message: String },
}

pub(crate) type Job = (RenderRequest, tokio::sync::mpsc::Sender<RenderEvent>);

/// Handle to the process's render thread.
#[derive(Debug, Clone)]
pub struct Renderer {
    jobs: mpsc::Sender<Job>,
}

/// Why the renderer could not start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RenderError {
    #[error("libpdfium not found at {} (set PAGESTREAM_SPLITTER_PDFIUM_LIBRARY, or run scripts/setup to install it)", .0.display())]
    LibraryMissing(PathBuf),
    #[error("cannot load libpdfium from {}: {reason}", path.display())]
    LibraryUnusable { path: PathBuf, reason: String },
    /// The render thread or the render-worker process could not start.
    #[error("{0}")]
    Start(String),
}

static RENDERER: OnceLock<Mutex<Option<Result<Renderer, RenderError>>>> = OnceLock::new();

impl Renderer {
    /// Renders in a supervised worker process (see [`crate::worker`]); fails
    /// when the worker cannot start (library or binary missing).
    pub fn isolated(options: crate::worker::WorkerOptions) -> Result<Renderer, RenderError> {
        crate::worker::start_supervisor(options).map(|jobs| Renderer { jobs }).map_err(RenderError::Start)
    }

    /// Binds libpdfium in this process (once) and starts the render thread.
    /// Fails with a message naming the library and how to install it.
    pub fn in_process(library: &Path) -> Result<Renderer, RenderError> {
        let cell = RENDERER.get_or_init(|| Mutex::new(None));
        let mut slot = cell.lock().expect("renderer lock");
        if let Some(r) = slot.as_ref() {
            return r.clone();
        }
        let r = Self::start(library);
        *slot = Some(r.clone());
        r
    }

    fn start(library: &Path) -> Result<Renderer, RenderError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let lib = library.to_path_buf();
        std::thread::Builder::new()
            .name("pdfium-render".into())
            .spawn(move || {
                let pdfium = match bind(&lib) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                for (req, out) in jobs_rx {
                    render_document(&pdfium, &req, &mut |event| out.blocking_send(event).is_ok());
                }
            })
            .map_err(|e| RenderError::Start(format!("cannot start render thread: {e}")))?;
        ready_rx.recv().map_err(|_| RenderError::Start("render thread exited during start-up".into()))??;
        Ok(Renderer { jobs: jobs_tx })
    }

    /// Queues a document; events arrive on the returned receiver.
    pub fn render(&self, req: RenderRequest) -> tokio::sync::mpsc::Receiver<RenderEvent> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        if self.jobs.send((req, tx.clone())).is_err() {
            let _ = tx.try_send(RenderEvent::OpenFailed {
                code: "renderer_unavailable",
                message: "the render thread has stopped".into(),
            });
        }
        rx
    }
}

/// Binds libpdfium; the error names the library and how to install it.
pub fn bind(library: &Path) -> Result<Pdfium, RenderError> {
    if !library.exists() {
        return Err(RenderError::LibraryMissing(library.to_path_buf()));
    }
    Pdfium::bind_to_library(library)
        .map(Pdfium::new)
        .map_err(|e| RenderError::LibraryUnusable { path: library.to_path_buf(), reason: e.to_string() })
}

/// Pixel size and effective DPI for a page of `width_pt × height_pt` at
/// `dpi`, reduced so the bitmap stays within `max_pixels`. Sizes round up,
/// as pypdfium2 does, so our bitmaps match the reference implementation's.
pub fn fit_size(width_pt: f32, height_pt: f32, dpi: f32, max_pixels: u64) -> (u32, u32, f32) {
    let size = |scale: f32| {
        let w = (width_pt as f64 * scale as f64).ceil().max(1.0);
        let h = (height_pt as f64 * scale as f64).ceil().max(1.0);
        (w, h)
    };
    let mut scale = dpi / 72.0;
    let (w, h) = size(scale);
    if w * h > max_pixels as f64 {
        scale *= (max_pixels as f64 / (w * h)).sqrt() as f32;
        while size(scale).0 * size(scale).1 > max_pixels as f64 {
            scale *= 0.999;
        }
    }
    let (w, h) = size(scale);
    (w as u32, h as u32, scale * 72.0)
}

/// Renders `req`, handing each event to `emit` (which returns `false` when
/// nobody listens any more: rendering stops).
pub fn render_document(pdfium: &Pdfium, req: &RenderRequest, emit: &mut dyn FnMut(RenderEvent) -> bool) {
    let doc = match pdfium.load_pdf_from_file(&req.pdf, req.password.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            let (code, message) = open_error(e);
            emit(RenderEvent::OpenFailed { code, message });
            return;
        }
    };
    let pages = doc.pages();
    let page_count = pages.len().max(0) as u32;
    if !emit(RenderEvent::Opened { page_count }) {
        return;
    }
    let (first, last) = ((*req.pages.start()).max(1), (*req.pages.end()).min(page_count));
    for number in first..=last {
        let index = number - 1;
        if req.skip.contains(&number) {
            continue;
        }
        crate::worker::test_fault(&req.pdf, number);
        let started = Instant::now();
        let failed = |message| RenderEvent::PageFailed { page: number, code: "page_render_failed", message };
        let event = match render_page(pages, index, req) {
            Ok((img, dpi, text)) => match encode_png(&img) {
                Ok(png) => RenderEvent::Page(RenderedPage {
                    page: number,
                    width: img.width(),
                    height: img.height(),
                    dpi,
                    png,
                    render_ms: started.elapsed().as_secs_f32() * 1000.0,
                    text,
                }),
                Err(message) => failed(message),
            },
            Err(message) => failed(message),
        };
        // Nobody listens when the handler gave up (shutdown, error).
        if !emit(event) {
            return;
        }
    }
}

/// A precise, user-facing reason for a PDF pdfium could not open.
fn open_error(e: PdfiumError) -> (&'static str, String) {
    use PdfiumInternalError as I;
    match e {
        PdfiumError::PdfiumLibraryInternalError(I::PasswordError) => {
            ("pdf_password", "the PDF is encrypted and no (or a wrong) password was given".into())
        }
        PdfiumError::PdfiumLibraryInternalError(I::FormatError) => (
            "pdf_unreadable",
            "pdfium cannot open the document: it is not a valid PDF (corrupt, truncated or not a PDF at all)".into(),
        ),
        PdfiumError::PdfiumLibraryInternalError(I::SecurityError) => {
            ("pdf_unsupported_security", "the PDF uses a security handler pdfium does not support".into())
        }
        PdfiumError::PdfiumLibraryInternalError(I::FileError) => {
            ("pdf_unreadable", "pdfium cannot read the document file (empty or unreadable)".into())
        }
        other => ("pdf_unreadable", format!("pdfium cannot open the document: {other:?}")),
    }
}

/// Renders one page, and reads its text layer with the same transform (a
/// text layer that cannot be read leaves the page without text; it does
/// not fail it).
fn render_page(
    pages: &PdfPages,
    index: u32,
    req: &RenderRequest,
) -> Result<(RgbImage, f32, Option<pagestream_schemas::PageText>), String> {
    let page = pages.get(index as PdfPageIndex).map_err(|e| format!("cannot load page: {e:?}"))?;
    let (w, h, dpi) = fit_size(page.width().value, page.height().value, req.dpi, req.max_pixels);
    let config =
        PdfRenderConfig::new().set_fixed_size(w as Pixels, h as Pixels).render_form_data(true).render_annotations(true);
    let bitmap = page.render_with_config(&config).map_err(|e| format!("render failed: {e:?}"))?;
    let img = bitmap.as_image().map_err(|e| format!("bitmap conversion failed: {e:?}"))?;
    let rgb = match img {
        DynamicImage::ImageRgb8(i) => i,
        other => other.to_rgb8(),
    };
    let text = if req.text { crate::text::page_text(&page, rgb.width(), rgb.height()).unwrap_or(None) } else { None };
    Ok((rgb, dpi, text))
}

/// PNG with fast compression: pages are large and mostly flat, the default
/// level costs several times more CPU for a few percent of size.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>, String> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let mut buf = Vec::with_capacity((img.width() * img.height() / 4) as usize);
    PngEncoder::new_with_quality(&mut buf, CompressionType::Fast, FilterType::Adaptive)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .map_err(|e| format!("PNG encoding failed: {e}"))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_size_keeps_small_pages_and_caps_huge_ones() {
        // A4 at 150 DPI: 1240.2 × 1753.9 pixels, rounded up.
        assert_eq!(fit_size(595.276, 841.89, 150.0, 16_777_216), (1241, 1754, 150.0));
        let (w, h, dpi) = fit_size(8400.0, 8400.0, 150.0, 16_777_216);
        assert!(w as u64 * h as u64 <= 16_777_216, "{w}×{h}");
        assert!(w >= 4090, "{w}");
        assert!((35.0..35.2).contains(&dpi), "{dpi}");
    }
}
