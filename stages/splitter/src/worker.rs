//! pdfium in a supervised child process.
//!
//! The `render-worker` binary binds libpdfium and renders the requests it
//! reads on stdin, writing one frame per [`RenderEvent`] on stdout (a
//! little-endian `u32` length, then MessagePack), then `Done`. It limits its
//! own address space (`splitter.render_memory_mb`), so a PDF that makes
//! pdfium allocate without bound ends the worker, not the machine.
//!
//! The splitter's supervisor thread owns one worker. It forwards events to
//! the async side and watches it: no event for `splitter.render_timeout_secs`
//! (a hang) or the worker gone (a crash: segfault, abort, out of memory, a
//! panic) fails the page being rendered with `render_timeout` /
//! `render_crashed`, starts a new worker and goes on with the next page. A
//! crash before the document opened fails the document with the same code;
//! after [`MAX_FAULTS`] faults in one turn the turn's remaining pages fail
//! without being tried. A stalled or crashed renderer never takes the stage
//! with it, and `/readyz` stays true because a new worker is always one
//! spawn away.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::render::{Job, RenderEvent, RenderRequest, RenderedPage};

/// Faults (crash or timeout) in one turn before its remaining pages fail
/// untried.
pub const MAX_FAULTS: u32 = 3;

/// Test-only fault injection: `RENDER_WORKER_TEST_FAULT=crash:MARKER`
/// (or `hang:MARKER`; several, comma-separated) makes the worker abort (or
/// hang) on page 1 of any PDF whose bytes contain `MARKER`.
pub const FAULT_ENV: &str = "RENDER_WORKER_TEST_FAULT";

/// How the supervisor runs its worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The `render-worker` executable.
    pub program: PathBuf,
    pub library: PathBuf,
    /// Longest wait for the next event (open or one page).
    pub page_timeout: Duration,
    /// Address-space limit of the worker in bytes (0: none).
    pub memory_bytes: u64,
}

impl WorkerOptions {
    /// `program` as configured, or `render-worker` next to the running
    /// executable (or one directory up: test binaries live in `deps/`).
    pub fn locate(configured: &Path) -> Result<PathBuf, String> {
        if !configured.as_os_str().is_empty() {
            return if configured.exists() {
                Ok(configured.to_path_buf())
            } else {
                Err(format!("splitter.render_worker {} does not exist", configured.display()))
            };
        }
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the running executable: {e}"))?;
        let dirs = exe.ancestors().skip(1).take(2);
        let candidates: Vec<PathBuf> = dirs.map(|d| d.join("render-worker")).collect();
        candidates.iter().find(|p| p.exists()).cloned().ok_or_else(|| {
            format!(
                "the render-worker binary is not next to {} (build it with `cargo build --bins`, or set PAGESTREAM_SPLITTER_RENDER_WORKER)",
                exe.display()
            )
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct WireRequest {
    pdf: PathBuf,
    password: Option<String>,
    dpi: f32,
    max_pixels: u64,
    first: u32,
    last: u32,
    skip: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
enum WireEvent {
    Ready,
    Opened { page_count: u32 },
    OpenFailed { code: String, message: String },
    Page { page: u32, width: u32, height: u32, dpi: f32, png: ByteBuf, render_ms: f32 },
    PageFailed { page: u32, code: String, message: String },
    Done,
}

/// Codes the worker can send, as `'static` strings.
fn static_code(code: &str) -> &'static str {
    match code {
        "pdf_password" => "pdf_password",
        "pdf_unsupported_security" => "pdf_unsupported_security",
        "pdf_unreadable" => "pdf_unreadable",
        "render_crashed" => "render_crashed",
        "render_timeout" => "render_timeout",
        _ => "page_render_failed",
    }
}

fn write_frame<W: Write, T: Serialize>(w: &mut W, value: &T) -> std::io::Result<()> {
    let bytes = rmp_serde::to_vec_named(value).map_err(std::io::Error::other)?;
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(&bytes)?;
    w.flush()
}

fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> Option<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).ok()?;
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    r.read_exact(&mut buf).ok()?;
    rmp_serde::from_slice(&buf).ok()
}

/// Applies [`FAULT_ENV`] (tests only; without the variable this is one
/// environment lookup per page).
pub fn test_fault(pdf: &Path, page: u32) {
    let Ok(specs) = std::env::var(FAULT_ENV) else { return };
    if page != 1 {
        return;
    }
    let Ok(bytes) = std::fs::read(pdf) else { return };
    for spec in specs.split(',') {
        let Some((kind, marker)) = spec.split_once(':') else { continue };
        if marker.is_empty() || !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            continue;
        }
        match kind {
            "crash" => std::process::abort(),
            "hang" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            _ => {}
        }
    }
}

/// The `render-worker` process: `render-worker LIBPDFIUM [MEMORY_BYTES]`.
/// Returns the exit code.
pub fn worker_main() -> i32 {
    let args: Vec<String> = std::env::args().collect();
    let Some(library) = args.get(1) else {
        eprintln!(
            "usage: render-worker LIBPDFIUM [MEMORY_BYTES] (started by the splitter, speaks frames on stdin/stdout)"
        );
        return 64;
    };
    if let Some(limit) = args.get(2).and_then(|m| m.parse::<u64>().ok()).filter(|m| *m > 0) {
        if let Err(e) = rlimit::setrlimit(rlimit::Resource::AS, limit, limit) {
            eprintln!("render-worker: cannot limit memory to {limit} bytes: {e}");
        }
    }
    let pdfium = match crate::render::bind(Path::new(library)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("render-worker: {e}");
            return 69;
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if write_frame(&mut out, &WireEvent::Ready).is_err() {
        return 0;
    }
    let mut input = std::io::stdin().lock();
    while let Some(req) = read_frame::<_, WireRequest>(&mut input) {
        let request = RenderRequest {
            pdf: req.pdf,
            password: req.password,
            dpi: req.dpi,
            max_pixels: req.max_pixels,
            pages: req.first..=req.last,
            skip: req.skip.into_iter().collect(),
        };
        let mut alive = true;
        crate::render::render_document(&pdfium, &request, &mut |event| {
            let wire = match event {
                RenderEvent::Opened { page_count } => WireEvent::Opened { page_count },
                RenderEvent::OpenFailed { code, message } => WireEvent::OpenFailed { code: code.into(), message },
                RenderEvent::Page(p) => WireEvent::Page {
                    page: p.page,
                    width: p.width,
                    height: p.height,
                    dpi: p.dpi,
                    png: ByteBuf::from(p.png),
                    render_ms: p.render_ms,
                },
                RenderEvent::PageFailed { page, code, message } => {
                    WireEvent::PageFailed { page, code: code.into(), message }
                }
            };
            alive = write_frame(&mut out, &wire).is_ok();
            alive
        });
        if !alive || write_frame(&mut out, &WireEvent::Done).is_err() {
            return 0;
        }
    }
    0
}

/// One running worker: its stdin, and its frames (read by a thread; `None`
/// once it exits or breaks the protocol).
struct Worker {
    child: Child,
    stdin: ChildStdin,
    frames: mpsc::Receiver<Option<WireEvent>>,
}

impl Worker {
    fn spawn(options: &WorkerOptions) -> Result<Worker, String> {
        let mut child = Command::new(&options.program)
            .arg(&options.library)
            .arg(options.memory_bytes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", options.program.display()))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = child.stdout.take().expect("piped stdout");
        // Capacity 1: the worker blocks on its pipe while a page waits here,
        // so at most a few page images are in flight.
        let (tx, frames) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("render-worker-reader".into())
            .spawn(move || loop {
                let frame = read_frame::<_, WireEvent>(&mut stdout);
                let end = frame.is_none();
                if tx.send(frame).is_err() || end {
                    return;
                }
            })
            .map_err(|e| format!("cannot start the worker reader: {e}"))?;
        let mut worker = Worker { child, stdin, frames };
        match worker.frames.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(WireEvent::Ready)) => Ok(worker),
            _ => {
                worker.kill();
                Err(format!(
                    "{} did not start (its error is in this process's log; libpdfium at {})",
                    options.program.display(),
                    options.library.display()
                ))
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a worker (to fail early: a missing library or binary is a
/// start-up error) and the thread that supervises it; returns its job queue.
pub(crate) fn start_supervisor(options: WorkerOptions) -> Result<mpsc::Sender<Job>, String> {
    let first = Worker::spawn(&options)?;
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("render-supervisor".into())
        .spawn(move || {
            let mut worker = Some(first);
            for (req, out) in jobs_rx {
                supervise(&options, &mut worker, &req, &mut |event| out.blocking_send(event).is_ok());
            }
        })
        .map_err(|e| format!("cannot start the render supervisor: {e}"))?;
    Ok(jobs_tx)
}

enum Fault {
    Crashed,
    Timeout,
}

/// Runs one job on the worker, replacing it after a crash or a hang.
fn supervise(
    options: &WorkerOptions,
    slot: &mut Option<Worker>,
    req: &RenderRequest,
    emit: &mut dyn FnMut(RenderEvent) -> bool,
) {
    let mut next = *req.pages.start();
    let mut page_count: Option<u32> = None;
    let mut faults = 0u32;
    loop {
        let worker = match slot {
            Some(w) => w,
            None => match Worker::spawn(options) {
                Ok(w) => slot.insert(w),
                Err(message) => {
                    tracing::error!(%message, "render worker cannot start");
                    fail_rest(req, next, page_count, "renderer_unavailable", &message, emit);
                    return;
                }
            },
        };
        let wire = WireRequest {
            pdf: req.pdf.clone(),
            password: req.password.clone(),
            dpi: req.dpi,
            max_pixels: req.max_pixels,
            first: next,
            last: *req.pages.end(),
            skip: req.skip.iter().copied().collect(),
        };
        let fault = 'job: {
            if write_frame(&mut worker.stdin, &wire).is_err() {
                break 'job Fault::Crashed;
            }
            loop {
                let frame = match worker.frames.recv_timeout(options.page_timeout) {
                    Ok(Some(f)) => f,
                    Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => break 'job Fault::Crashed,
                    Err(mpsc::RecvTimeoutError::Timeout) => break 'job Fault::Timeout,
                };
                let event = match frame {
                    WireEvent::Done => return,
                    WireEvent::Ready => continue,
                    WireEvent::Opened { page_count: n } => {
                        if page_count.replace(n).is_some() {
                            continue; // reopened after a fault: already announced
                        }
                        RenderEvent::Opened { page_count: n }
                    }
                    WireEvent::OpenFailed { code, message } => {
                        RenderEvent::OpenFailed { code: static_code(&code), message }
                    }
                    WireEvent::Page { page, width, height, dpi, png, render_ms } => {
                        next = page + 1;
                        RenderEvent::Page(RenderedPage { page, width, height, dpi, png: png.into_vec(), render_ms })
                    }
                    WireEvent::PageFailed { page, code, message } => {
                        next = page + 1;
                        RenderEvent::PageFailed { page, code: static_code(&code), message }
                    }
                };
                if !emit(event) {
                    // Nobody listens (shutdown, cancel): stop the worker
                    // mid-job rather than read a stale job's frames later.
                    *slot = None;
                    return;
                }
            }
        };
        *slot = None; // kills the worker
        let (code, what) = match fault {
            Fault::Crashed => {
                ("render_crashed", "the renderer crashed (pdfium aborted, ran out of memory or panicked)")
            }
            Fault::Timeout => ("render_timeout", "the renderer did not finish within splitter.render_timeout_secs"),
        };
        faults += 1;
        let Some(n) = page_count else {
            tracing::warn!(pdf = %req.pdf.display(), code, "renderer fault while opening a document");
            emit(RenderEvent::OpenFailed { code, message: format!("{what} while opening the document") });
            return;
        };
        let Some(page) = pending(req, next, n).next() else { return };
        tracing::warn!(pdf = %req.pdf.display(), page, code, faults, "renderer fault; page failed, worker restarted");
        if !emit(RenderEvent::PageFailed { page, code, message: format!("{what} on this page") }) {
            return;
        }
        next = page + 1;
        if faults >= MAX_FAULTS {
            let message = format!("not rendered: the renderer failed {faults} times on this document");
            fail_rest(req, next, page_count, code, &message, emit);
            return;
        }
    }
}

/// Pages of `req` from `next` on that still need rendering.
fn pending(req: &RenderRequest, next: u32, page_count: u32) -> impl Iterator<Item = u32> + '_ {
    (next.max(1)..=(*req.pages.end()).min(page_count)).filter(|p| !req.skip.contains(p))
}

/// Fails every page still pending (or the document, before it opened).
fn fail_rest(
    req: &RenderRequest,
    next: u32,
    page_count: Option<u32>,
    code: &'static str,
    message: &str,
    emit: &mut dyn FnMut(RenderEvent) -> bool,
) {
    let Some(n) = page_count else {
        emit(RenderEvent::OpenFailed { code, message: message.to_string() });
        return;
    };
    let pages: Vec<u32> = pending(req, next, n).collect();
    for page in pages {
        if !emit(RenderEvent::PageFailed { page, code, message: message.to_string() }) {
            return;
        }
    }
}
