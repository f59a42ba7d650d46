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
//!
//! The worker is sealed ([`sandbox`]): an empty environment, resource
//! limits, the parent-death signal, Landlock and a seccomp filter. The
//! splitter trusts nothing it sends: a frame longer than a PNG of the
//! largest page allowed ([`max_frame_bytes`]) is refused before anything is
//! allocated for it, and ends the worker as a crash would.

mod sandbox;

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

pub use sandbox::{KEPT_ENV, MAX_OPEN_FILES};

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::render::{Job, RenderEvent, RenderRequest, RenderedPage};

/// Faults (crash or timeout) in one turn before its remaining pages fail
/// untried.
pub const MAX_FAULTS: u32 = 3;

/// Test-only fault injection, compiled in only with the crate's
/// `test-faults` feature (off by default; the tests' dev-dependency turns it
/// on): `RENDER_WORKER_TEST_FAULT=crash:MARKER` (or `hang:MARKER`; several,
/// comma-separated) makes the worker abort (or hang) on page 1 of any PDF
/// whose bytes contain `MARKER`. `escape@HOST:PORT@DIR:MARKER` plays a PDF
/// that took over pdfium: it connects to `HOST:PORT`, writes
/// `DIR/written`, runs `/bin/sh -c 'echo > DIR/executed'`, then aborts if
/// it can read the splitter's `/proc/<pid>/environ` (each attempt the seal
/// must stop), and otherwise renders the page. A worker built without the
/// feature never reads the variable.
pub const FAULT_ENV: &str = "RENDER_WORKER_TEST_FAULT";

/// Whether this build has the test-only faults of [`FAULT_ENV`].
pub const TEST_FAULTS: bool = cfg!(feature = "test-faults");

/// Longest frame the splitter sends a worker (a request: a path, a password
/// and the pages to skip).
const REQUEST_FRAME_BYTES: u64 = 16 << 20;

/// Longest frame a worker may send before its first request (`Ready`).
const START_FRAME_BYTES: u64 = 64 << 10;

/// Longest frame a worker may send for pages of at most `max_pixels`: the
/// PNG of the largest page, stored uncompressed (the encoder falls back to
/// stored blocks when compression does not pay: 3 bytes a pixel and a
/// filter byte a row, rows ≤ pixels), deflate and chunk framing
/// (< 1/1024), and 2 MiB for the other fields, the page's words (at most
/// `MAX_PAGE_WORDS` with their boxes, under 1 MiB) and error messages.
pub fn max_frame_bytes(max_pixels: u64) -> u64 {
    let raw = max_pixels.saturating_mul(4);
    raw.saturating_add(raw / 1024).saturating_add(2 << 20).min(u32::MAX as u64)
}

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
    text: bool,
}

#[derive(Debug, Serialize, Deserialize)]
enum WireEvent {
    /// The worker is sealed and bound pdfium; `sandbox` says what holds.
    Ready {
        sandbox: String,
    },
    Opened {
        page_count: u32,
    },
    OpenFailed {
        code: String,
        message: String,
    },
    Page {
        page: u32,
        width: u32,
        height: u32,
        dpi: f32,
        png: ByteBuf,
        render_ms: f32,
        #[serde(default)]
        text: Option<pagestream_schemas::PageText>,
    },
    PageFailed {
        page: u32,
        code: String,
        message: String,
    },
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

/// Why no frame was read.
#[derive(Debug, PartialEq, Eq)]
enum FrameError {
    /// End of stream, a read error or undecodable bytes.
    Broken,
    /// The peer announced `len` bytes, over `max`: refused unread.
    TooLong { len: u64, max: u64 },
}

/// Reads one frame of at most `max` bytes; a longer announced length is
/// refused before anything is allocated for it.
fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R, max: u64) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|_| FrameError::Broken)?;
    let len = u64::from(u32::from_le_bytes(len));
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).map_err(|_| FrameError::Broken)?;
    rmp_serde::from_slice(&buf).map_err(|_| FrameError::Broken)
}

/// Applies [`FAULT_ENV`] (a build with the `test-faults` feature only;
/// without the variable this is one environment lookup per page).
#[cfg(feature = "test-faults")]
pub fn test_fault(pdf: &Path, page: u32) {
    let Ok(specs) = std::env::var(FAULT_ENV) else { return };
    if page != 1 {
        return;
    }
    let Ok(bytes) = std::fs::read(pdf) else { return };
    for spec in specs.split(',') {
        let Some((kind, marker)) = spec.rsplit_once(':') else { continue };
        if marker.is_empty() || !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            continue;
        }
        let mut parts = kind.split('@');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("crash"), None, None) => std::process::abort(),
            (Some("hang"), None, None) => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            (Some("escape"), Some(addr), Some(dir)) => try_escape(addr, Path::new(dir)),
            _ => {}
        }
    }
}

/// The `escape` test fault (see [`FAULT_ENV`]).
#[cfg(feature = "test-faults")]
fn try_escape(addr: &str, dir: &Path) {
    if let Ok(addr) = addr.parse() {
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            let _ = s.write_all(b"escaped");
        }
    }
    let _ = std::fs::write(dir.join("written"), b"escaped");
    let script = format!("echo escaped > '{}'", dir.join("executed").display());
    let _ = Command::new("/bin/sh").arg("-c").arg(script).env_clear().status();
    let environ = rustix::process::getppid()
        .and_then(|p| std::fs::read(format!("/proc/{}/environ", p.as_raw_nonzero())).ok())
        .unwrap_or_default();
    if environ.windows(11).any(|w| w == b"PAGESTREAM_") {
        std::process::abort();
    }
}

/// Without the `test-faults` feature (every production build): nothing,
/// and no environment lookup.
#[cfg(not(feature = "test-faults"))]
#[inline(always)]
pub fn test_fault(_pdf: &Path, _page: u32) {}

/// The `render-worker` process:
/// `render-worker LIBPDFIUM [MEMORY_BYTES [PARENT_PID [READABLE_DIR...]]]`
/// (the splitter passes all of them: the worker dies with `PARENT_PID` and
/// reads files only under the library's directory, the `READABLE_DIR`s and
/// the font directories). Returns the exit code.
pub fn worker_main() -> i32 {
    let args: Vec<String> = std::env::args().collect();
    let Some(library) = args.get(1) else {
        eprintln!(
            "usage: render-worker LIBPDFIUM [MEMORY_BYTES [PARENT_PID [READABLE_DIR...]]] (started by the splitter, speaks frames on stdin/stdout)"
        );
        return 64;
    };
    if !sandbox::die_with_parent(args.get(3).and_then(|p| p.parse().ok())) {
        return 0; // the splitter is gone already
    }
    let memory = args.get(2).and_then(|m| m.parse::<u64>().ok()).unwrap_or(0);
    for failed in sandbox::limit_resources(memory) {
        eprintln!("render-worker: cannot set the resource limit {failed}");
    }
    let library = Path::new(library);
    let pdfium = match crate::render::bind(library) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("render-worker: {e}");
            return 69;
        }
    };
    let mut readable: Vec<PathBuf> = args.iter().skip(4).map(PathBuf::from).collect();
    readable.extend(library.parent().map(Path::to_path_buf));
    let sandbox = sandbox::seal(&readable);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if write_frame(&mut out, &WireEvent::Ready { sandbox }).is_err() {
        return 0;
    }
    let mut input = std::io::stdin().lock();
    while let Ok(req) = read_frame::<_, WireRequest>(&mut input, REQUEST_FRAME_BYTES) {
        let request = RenderRequest {
            pdf: req.pdf,
            password: req.password,
            dpi: req.dpi,
            max_pixels: req.max_pixels,
            pages: req.first..=req.last,
            skip: req.skip.into_iter().collect(),
            text: req.text,
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
                    text: p.text,
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
    /// Longest frame the reader accepts now (set per request from its
    /// `max_pixels`).
    max_frame: Arc<AtomicU64>,
    /// What the worker's seal holds (from its `Ready`).
    sandbox: String,
}

/// Lines of a worker's stderr logged per worker (the rest is read and
/// dropped), and the longest line logged.
const STDERR_LINES: usize = 100;
const STDERR_LINE_CHARS: usize = 1000;

impl Worker {
    /// Starts a worker. Called only from the supervisor thread, which lives
    /// as long as the process: the parent-death signal fires when the
    /// thread that started the worker ends, not only the process.
    fn spawn(options: &WorkerOptions) -> Result<Worker, String> {
        let mut command = Command::new(&options.program);
        command
            .arg(&options.library)
            .arg(options.memory_bytes.to_string())
            .arg(std::process::id().to_string())
            .arg(std::env::temp_dir())
            .env_clear()
            .envs(KEPT_ENV.iter().filter_map(|k| std::env::var_os(k).map(|v| (k, v))))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| format!("cannot start {}: {e}", options.program.display()))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let pid = child.id();
        // Its stderr goes to this process's log (the worker writes no file:
        // RLIMIT_FSIZE is 0), line by line, bounded.
        let _ = std::thread::Builder::new().name("render-worker-stderr".into()).spawn(move || {
            let mut lines = std::io::BufReader::new(stderr);
            let mut line = Vec::new();
            let mut logged = 0;
            loop {
                line.clear();
                match (&mut lines).take(64 << 10).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if logged < STDERR_LINES => {
                        logged += 1;
                        let text = String::from_utf8_lossy(&line);
                        let text: String = text.trim_end().chars().take(STDERR_LINE_CHARS).collect();
                        tracing::warn!(worker = pid, "render worker: {text}");
                    }
                    Ok(_) => {}
                }
            }
        });
        // Capacity 1: the worker blocks on its pipe while a page waits here,
        // so at most a few page images are in flight.
        let (tx, frames) = mpsc::sync_channel(1);
        let max_frame = Arc::new(AtomicU64::new(START_FRAME_BYTES));
        let max = max_frame.clone();
        std::thread::Builder::new()
            .name("render-worker-reader".into())
            .spawn(move || loop {
                let frame = match read_frame::<_, WireEvent>(&mut stdout, max.load(Ordering::Relaxed)) {
                    Ok(frame) => Some(frame),
                    Err(FrameError::Broken) => None,
                    Err(FrameError::TooLong { len, max }) => {
                        tracing::warn!(worker = pid, len, max, "render worker sent a frame over the limit; stopped");
                        None
                    }
                };
                let end = frame.is_none();
                if tx.send(frame).is_err() || end {
                    return;
                }
            })
            .map_err(|e| format!("cannot start the worker reader: {e}"))?;
        let mut worker = Worker { child, stdin, frames, max_frame, sandbox: String::new() };
        match worker.frames.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(WireEvent::Ready { sandbox })) => {
                worker.sandbox = sandbox;
                Ok(worker)
            }
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
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    let (started_tx, started_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("render-supervisor".into())
        .spawn(move || {
            // Every worker is started on this thread (see `Worker::spawn`).
            let mut worker = match Worker::spawn(&options) {
                Ok(w) => {
                    tracing::info!(worker = w.child.id(), sandbox = %w.sandbox, "render worker started");
                    let _ = started_tx.send(Ok(()));
                    Some(w)
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            for (req, out) in jobs_rx {
                supervise(&options, &mut worker, &req, &mut |event| out.blocking_send(event).is_ok());
            }
        })
        .map_err(|e| format!("cannot start the render supervisor: {e}"))?;
    started_rx.recv().map_err(|_| "the render supervisor exited during start-up".to_string())??;
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
                Ok(w) => {
                    tracing::debug!(worker = w.child.id(), sandbox = %w.sandbox, "render worker started");
                    slot.insert(w)
                }
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
            text: req.text,
        };
        worker.max_frame.store(max_frame_bytes(req.max_pixels), Ordering::Relaxed);
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
                    WireEvent::Ready { .. } => continue,
                    WireEvent::Opened { page_count: n } => {
                        if page_count.replace(n).is_some() {
                            continue; // reopened after a fault: already announced
                        }
                        RenderEvent::Opened { page_count: n }
                    }
                    WireEvent::OpenFailed { code, message } => {
                        RenderEvent::OpenFailed { code: static_code(&code), message }
                    }
                    WireEvent::Page { page, width, height, dpi, png, render_ms, text } => {
                        next = page + 1;
                        // Words past the message bounds (or with broken
                        // boxes) are a worker gone wrong: the page keeps its
                        // image, not the text.
                        let text = text.filter(|t| match t.validate() {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::warn!(page, error = %e, "render worker sent text out of bounds; dropped");
                                false
                            }
                        });
                        RenderEvent::Page(RenderedPage {
                            page,
                            width,
                            height,
                            dpi,
                            png: png.into_vec(),
                            render_ms,
                            text,
                        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that fails the test if more than its header is read: the
    /// body of a refused frame is never touched.
    struct Announces(Vec<u8>, usize);

    impl Read for Announces {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let rest = &self.0[self.1..];
            assert!(!rest.is_empty(), "read past the announced length");
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            self.1 += n;
            Ok(n)
        }
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_unread() {
        // A worker announcing 4 GiB - 1 (the most a u32 says): refused
        // before the body is read or a buffer allocated for it.
        let mut r = Announces(u32::MAX.to_le_bytes().to_vec(), 0);
        let max = max_frame_bytes(4096 * 4096);
        assert_eq!(
            read_frame::<_, WireEvent>(&mut r, max).unwrap_err(),
            FrameError::TooLong { len: u64::from(u32::MAX), max }
        );
        assert_eq!(r.1, 4, "only the length was read");
        // At the limit: read and decoded.
        let mut frame = Vec::new();
        write_frame(&mut frame, &WireEvent::Done).unwrap();
        let len = frame.len() as u64 - 4;
        assert!(matches!(read_frame::<_, WireEvent>(&mut frame.as_slice(), len), Ok(WireEvent::Done)));
        assert!(matches!(read_frame::<_, WireEvent>(&mut frame.as_slice(), len - 1), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn the_frame_limit_holds_the_largest_page_of_incompressible_pixels() {
        // Noise (the worst case for PNG) at exactly max_pixels, wide and
        // one pixel wide (a filter byte per pixel row): the page frame fits.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut noise = |w: u32, h: u32| {
            image::RgbImage::from_fn(w, h, |_, _| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                image::Rgb([seed as u8, (seed >> 8) as u8, (seed >> 16) as u8])
            })
        };
        let max_pixels = 600 * 400;
        for (w, h) in [(600, 400), (1, max_pixels as u32)] {
            let png = crate::render::encode_png(&noise(w, h)).unwrap();
            // The PNG alone fits the bound without the 2 MiB of slack.
            let png_bound = max_frame_bytes(max_pixels) - (2 << 20);
            assert!(png.len() as u64 <= png_bound, "{w}×{h}: PNG {} > {png_bound}", png.len());
            let wire = WireEvent::Page {
                page: 1,
                width: w,
                height: h,
                dpi: 150.0,
                png: ByteBuf::from(png),
                render_ms: 1.0,
                text: None,
            };
            let mut frame = Vec::new();
            write_frame(&mut frame, &wire).unwrap();
            let len = frame.len() as u64 - 4;
            assert!(len <= max_frame_bytes(max_pixels), "{w}×{h}: {len} > {}", max_frame_bytes(max_pixels));
            assert!(len > max_pixels * 3, "{w}×{h}: noise should not compress ({len})");
            assert!(read_frame::<_, WireEvent>(&mut frame.as_slice(), max_frame_bytes(max_pixels)).is_ok());
        }
        // The most text a page may carry fits the slack beside its PNG, and
        // a page message beside a claim-checked image stays under NATS's 1 MiB.
        let words = (0..pagestream_schemas::MAX_PAGE_WORDS)
            .map(|i| pagestream_schemas::Word {
                text: "x".repeat(pagestream_schemas::MAX_PAGE_TEXT_BYTES / pagestream_schemas::MAX_PAGE_WORDS),
                bbox: [1234.567, 2345.678, 3456.789, 4567.891],
                line: i as u32 * 1000,
            })
            .collect();
        let text = pagestream_schemas::PageText { words, ..Default::default() };
        text.validate().unwrap();
        let bare = |text| WireEvent::Page {
            page: 1,
            width: 1,
            height: 1,
            dpi: 150.0,
            png: ByteBuf::new(),
            render_ms: 1.0,
            text,
        };
        let (mut with, mut without) = (Vec::new(), Vec::new());
        write_frame(&mut with, &bare(Some(text))).unwrap();
        write_frame(&mut without, &bare(None)).unwrap();
        assert!(with.len() - without.len() < 900 << 10, "the most text takes {} bytes", with.len() - without.len());
        // The default max_pixels (16.7 Mpx): about 66 MiB, not 4 GiB.
        assert_eq!(max_frame_bytes(4096 * 4096) >> 20, 66);
    }
}
