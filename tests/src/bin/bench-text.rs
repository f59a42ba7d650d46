//! What reading the text layer costs next to rendering a page.
//!
//! `bench-text FILE.pdf [DPI] [ROUNDS]` alternates, ROUNDS times (default
//! 3), two passes over every page of FILE, each in a process of its own
//! (pdfium binds once per process): the splitter's in-process renderer
//! (render + PNG + text, as the worker does; its `render_ms` per page) and
//! the text layer read alone (`text::page_text`). Prints the medians in
//! ms/page and the text layer's share of the render.

use std::path::PathBuf;
use std::time::Instant;

use pagestream_splitter::render::{bind, fit_size, RenderEvent, RenderRequest, Renderer};
use pagestream_splitter::SplitterConfig;

/// One pass in this process: ms/page, and the words read (text pass).
async fn pass(mode: &str, pdf: &PathBuf, dpi: f32) -> (f64, usize) {
    let cfg = SplitterConfig::default();
    if mode == "render" {
        let renderer = Renderer::in_process(&cfg.pdfium_library).expect("libpdfium loads (scripts/setup)");
        let mut events = renderer.render(RenderRequest {
            pdf: pdf.clone(),
            password: None,
            dpi,
            max_pixels: cfg.max_pixels,
            pages: 1..=u32::MAX,
            skip: Default::default(),
            text: true,
        });
        let (mut total, mut pages) = (0.0f64, 0u32);
        while let Some(ev) = events.recv().await {
            if let RenderEvent::Page(p) = ev {
                total += f64::from(p.render_ms);
                pages += 1;
            }
        }
        return (total / f64::from(pages.max(1)), 0);
    }
    let pdfium = bind(&cfg.pdfium_library).expect("libpdfium binds");
    let doc = pdfium.load_pdf_from_file(pdf, None).expect("the PDF opens");
    let started = Instant::now();
    let (mut pages, mut words) = (0u32, 0usize);
    for page in doc.pages().iter() {
        let (w, h, _) = fit_size(page.width().value, page.height().value, dpi, cfg.max_pixels);
        let text = pagestream_splitter::text::page_text(&page, w, h).expect("the text layer reads");
        words += text.map_or(0, |t| t.words.len());
        pages += 1;
    }
    (started.elapsed().as_secs_f64() * 1000.0 / f64::from(pages.max(1)), words)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pdf = PathBuf::from(args.first().expect("usage: bench-text FILE.pdf [DPI] [ROUNDS]"));
    let dpi: f32 = args.get(1).map_or(150.0, |d| d.parse().expect("DPI is a number"));
    if let Some(mode) = args.get(3).filter(|m| *m == "render" || *m == "text") {
        let (ms, words) = pass(mode, &pdf, dpi).await;
        println!("{ms} {words}");
        return;
    }
    let rounds: usize = args.get(2).map_or(3, |r| r.parse().expect("ROUNDS is a number"));
    let me = std::env::current_exe().unwrap();
    let (mut render, mut text, mut words) = (Vec::new(), Vec::new(), 0);
    for _ in 0..rounds {
        for (mode, into) in [("render", &mut render), ("text", &mut text)] {
            let out = std::process::Command::new(&me)
                .args([pdf.to_str().unwrap(), &dpi.to_string(), "1", mode])
                .output()
                .expect("the pass runs");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let line = String::from_utf8(out.stdout).unwrap();
            let mut it = line.split_whitespace();
            into.push(it.next().unwrap().parse::<f64>().unwrap());
            words = words.max(it.next().unwrap().parse::<usize>().unwrap());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (r, t) = (median(&mut render), median(&mut text));
    println!(
        "{}: {dpi} dpi, {words} words; median of {rounds}: render+PNG+text {r:.1} ms/page, text layer alone \
         {t:.2} ms/page ({:.1}% of the render)",
        pdf.display(),
        100.0 * t / r
    );
}
