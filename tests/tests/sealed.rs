//! The render worker is sealed (issue #22, finding 6) and stage logs keep
//! the NATS password out (finding 7): a real splitter process with secrets
//! in its environment, its real `render-worker` child, real PDFs.
//!
//! - the worker's environment holds none of the splitter's variables, its
//!   limits and seccomp mode are set, and it dies with the splitter;
//! - a PDF that takes over pdfium (test-only fault `escape`) can neither
//!   connect, write a file, run a program nor read the splitter's
//!   environment, and the page still renders;
//! - rendering in the sealed worker is byte-identical to rendering in
//!   process;
//! - a NATS URL's password never reaches a stage's output.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pagestream::Config;
use pagestream_e2e::api::submit;
use pagestream_e2e::procs::{bin_dir, wait_ready, Stages, STAGES};
use pagestream_e2e::{corpus, init_logging, repo_root, with_marker};
use pagestream_splitter::render::{RenderEvent, RenderRequest, Renderer};
use pagestream_splitter::worker::{WorkerOptions, FAULT_ENV};

/// Children of `pid` running `render-worker`.
fn render_workers(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let status = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap_or_default();
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).map(|p| p.trim().parse::<u32>().ok());
        let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
        if ppid == Some(Some(pid)) && comm.trim() == "render-worker" {
            found.push(child);
        }
    }
    found
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s.rsplit_once(") ").map(|(_, rest)| rest.chars().next()).unwrap_or_default();
        state != Some('Z')
    })
}

/// The value of line `name` of `/proc/<pid>/<file>`.
fn proc_line(pid: u32, file: &str, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines().find(|l| l.starts_with(name)).map(|l| l[name.len()..].trim().to_string()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_render_worker_holds_no_secret_and_dies_with_the_splitter() {
    let deadline = Instant::now() + Duration::from_secs(120);
    let extra = [
        ("PAGESTREAM_INGRESS_API_TOKENS", "API-SECRET-TOKEN".to_string()),
        ("PAGESTREAM_NOTIFIER_SECRET", "whsec_V0VCSE9PSy1TRUNSRVQtS0VZ".to_string()),
        ("PAGESTREAM_SPLITTER_SOURCE_S3_ACCESS_KEY_ID", "S3-KEY-ID".to_string()),
        ("PAGESTREAM_SPLITTER_SOURCE_S3_SECRET_ACCESS_KEY", "S3-SECRET-KEY".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "AWS-SECRET-KEY".to_string()),
        // A worker that hangs in "pdfium" (test-only fault) is never
        // replaced during the test.
        (FAULT_ENV, "hang:%PAGESTREAM-HANG".to_string()),
        ("PAGESTREAM_SPLITTER_RENDER_TIMEOUT_SECS", "600".to_string()),
    ];
    let mut s = Stages::prepare("sealed", &extra).await;
    // nats-server without authorization accepts any user and password: the
    // stages really connect with this URL.
    s.cluster.set_var("PAGESTREAM_NATS_URL", s.nats.url().replacen("nats://", "nats://svc:NATS-SECRETPW@", 1));
    s.cluster.spawn_stages(&STAGES, 0, s.port);
    let pid = s.cluster.proc("splitter").child.id();
    let client = s.client.clone().with_token(Some("API-SECRET-TOKEN".into()));
    wait_ready(&client, Duration::from_secs(120), &s.cluster).await;
    let pdfs = tempfile::tempdir().unwrap();
    let worker = loop {
        if let Some(w) = render_workers(pid).first() {
            break *w;
        }
        assert!(Instant::now() < deadline, "no render worker under the splitter: {}", s.cluster.log("splitter", 0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Its environment: none of the splitter's settings or secrets.
    let environ = std::fs::read(format!("/proc/{worker}/environ")).unwrap();
    let vars: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).split('=').next().unwrap_or("").to_string())
        .collect();
    println!("the render worker's environment: {vars:?}");
    let text = String::from_utf8_lossy(&environ);
    for secret in
        ["PAGESTREAM_", "NATS-SECRETPW", "API-SECRET-TOKEN", "V0VCSE9PSy1TRUNSRVQtS0VZ", "S3-SECRET-KEY", "AWS"]
    {
        assert!(!text.contains(secret), "the worker's environment holds {secret}: {vars:?}");
    }
    for var in &vars {
        assert!(pagestream_splitter::worker::KEPT_ENV.contains(&var.as_str()), "unexpected variable {var}");
    }

    // Its limits and seal.
    let limits = |name: &str| {
        let line = proc_line(worker, "limits", name);
        line.split_whitespace().take(2).map(str::to_string).collect::<Vec<_>>()
    };
    let files = pagestream_splitter::worker::MAX_OPEN_FILES.to_string();
    assert_eq!(limits("Max open files"), [files.as_str(), files.as_str()]);
    assert_eq!(limits("Max file size"), ["0", "0"]);
    assert_eq!(limits("Max core file size"), ["0", "0"]);
    assert_eq!(proc_line(worker, "status", "NoNewPrivs:"), "1");
    assert_eq!(proc_line(worker, "status", "Seccomp:"), "2", "a seccomp filter is on");
    let log = s.cluster.log("splitter", 0);
    assert!(log.contains("landlock: fully enforced") && log.contains("seccomp: on"), "{log}");

    // The worker stuck in pdfium on a page (a PDF that hangs it)...
    let hang = with_marker(&repo_root().join("samples/c03-29.pdf"), "%PAGESTREAM-HANG", pdfs.path(), "hang.pdf");
    let id = submit(&client, &hang, &[]).await;
    let stuck = |w: u32| std::fs::read_to_string(format!("/proc/{w}/wchan")).unwrap_or_default().contains("nanosleep");
    let mut running_since = None;
    loop {
        let st = client.get(&format!("/v1/documents/{id}")).await.unwrap().json;
        if st["state"] == "running" && running_since.is_none() {
            running_since = Some(Instant::now());
        }
        // Sleeping in the hang (or, where wchan is hidden, 5 s into it).
        if stuck(worker) || running_since.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never started the page: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(render_workers(pid), [worker], "the same worker, busy");

    // ... and the splitter SIGKILLed: the worker ends with it.
    let killed = Instant::now();
    let p = s.cluster.proc("splitter");
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    while alive(worker) && killed.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let survived = alive(worker);
    if survived {
        let _ = Command::new("kill").args(["-KILL", &worker.to_string()]).status();
    }
    assert!(!survived, "the render worker {worker} outlived the splitter by 10 s");
    println!("the render worker (stuck in a page) ended {:?} after SIGKILL of the splitter", killed.elapsed());
}

fn isolated() -> Renderer {
    let config = Config::default();
    Renderer::isolated(WorkerOptions {
        program: bin_dir().join("render-worker"),
        library: config.splitter.pdfium_library.clone(),
        page_timeout: Duration::from_secs(60),
        memory_bytes: config.splitter.render_memory_mb * 1024 * 1024,
    })
    .expect("the render worker starts (cargo build --bins, scripts/setup)")
}

fn request(pdf: &Path, password: Option<&str>, pages: std::ops::RangeInclusive<u32>) -> RenderRequest {
    RenderRequest {
        pdf: pdf.to_path_buf(),
        password: password.map(str::to_string),
        dpi: 100.0,
        max_pixels: Config::default().splitter.max_pixels,
        pages,
        skip: HashSet::new(),
        text: true,
    }
}

/// Every event of one request, pages as (number, PNG bytes).
async fn render_all(renderer: &Renderer, req: RenderRequest) -> (Vec<(u32, Vec<u8>)>, Vec<String>) {
    let mut events = renderer.render(req);
    let (mut pages, mut failures) = (Vec::new(), Vec::new());
    while let Some(ev) = events.recv().await {
        match ev {
            RenderEvent::Page(p) => pages.push((p.page, p.png)),
            RenderEvent::Opened { .. } => {}
            RenderEvent::PageFailed { page, code, message } => failures.push(format!("page {page}: {code}: {message}")),
            RenderEvent::OpenFailed { code, message } => failures.push(format!("open: {code}: {message}")),
        }
    }
    (pages, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdf_that_takes_over_pdfium_reaches_nothing_and_rendering_is_unchanged() {
    init_logging();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let pdfs = tempfile::tempdir().unwrap();
    let drop = tempfile::tempdir().unwrap();
    // The worker inherits FAULT_ENV (a test-only variable) from this
    // process, whose environment also holds a setting it must not read.
    std::env::set_var(FAULT_ENV, format!("escape@127.0.0.1:{port}@{}:%PAGESTREAM-ESCAPE", drop.path().display()));
    std::env::set_var("PAGESTREAM_NOTIFIER_SECRET", "whsec_bm90LWZvci10aGUtd29ya2Vy");
    let renderer = isolated();

    let sample = repo_root().join("samples/c03-29.pdf");
    let marked = with_marker(&sample, "%PAGESTREAM-ESCAPE", pdfs.path(), "marked.pdf");
    let (pages, failures) = render_all(&renderer, request(&marked, None, 1..=1)).await;
    let connected = listener.accept().is_ok();
    let written = drop.path().join("written").exists();
    let executed = drop.path().join("executed").exists();
    println!(
        "escape attempt: connected {connected}, file written {written}, program run {executed}, page: {:?}",
        failures.first().map_or("rendered", String::as_str)
    );
    assert!(!connected, "the worker connected to 127.0.0.1:{port}");
    assert!(!written, "the worker wrote a file");
    assert!(!executed, "the worker ran a program");
    // The escape aborts the worker when it could read the splitter's
    // environment: the page rendered, so it could not.
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(pages.len(), 1);

    // Sealed, the worker renders exactly what pdfium renders in process:
    // text, figures, a rotated scan, an encrypted PDF.
    let in_process = Renderer::in_process(&Config::default().splitter.pdfium_library).unwrap();
    for (name, password, pages) in [
        ("text_R-intro.pdf", None, 1..=3),
        ("fig_dbscan-jss.pdf", None, 1..=2),
        ("scan_cardinal-rotated.pdf", None, 1..=2),
        ("enc_aes256_pw-asdfzxcv.pdf", Some("asdfzxcv"), 1..=1),
    ] {
        let pdf = pdfs.path().join(name);
        std::fs::copy(corpus(name), &pdf).unwrap();
        let (sealed, failures) = render_all(&renderer, request(&pdf, password, pages.clone())).await;
        assert!(failures.is_empty(), "{name}: {failures:?}");
        let (reference, _) = render_all(&in_process, request(&pdf, password, pages.clone())).await;
        assert_eq!(sealed.len(), pages.count(), "{name}");
        assert!(sealed == reference, "{name}: the sealed worker rendered different pixels");
    }
}

/// Output of a stage binary started with `env`, after it exits (it
/// cannot connect) or 30 s.
fn stage_output(stage: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin_dir().join(stage));
    for (k, _) in std::env::vars() {
        if k.starts_with("PAGESTREAM_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .envs(env.iter().copied())
        .env("PAGESTREAM_NATS_CONNECT_TIMEOUT_SECS", "2")
        .env("PAGESTREAM_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[test]
fn a_nats_password_never_reaches_a_stage_output() {
    let admin = [("PAGESTREAM_SPLITTER_ADMIN_ADDR", ""), ("PAGESTREAM_INGRESS_ADDR", "127.0.0.1:0")];
    for url in [
        "nats://u:SECRETPW@127.0.0.1:1",
        "nats://SECRETPW@127.0.0.1:1",
        "nats://127.0.0.1:2,nats://u:SECRETPW@127.0.0.1:1",
    ] {
        for stage in ["splitter", "ingress"] {
            let mut env = vec![("PAGESTREAM_NATS_URL", url)];
            env.extend(admin);
            let (code, text) = stage_output(stage, &env);
            assert_ne!(code, Some(0), "{stage} cannot connect: {text}");
            assert!(text.contains("127.0.0.1:1"), "{stage} names the server: {text}");
            assert!(!text.contains("SECRETPW"), "{stage} printed the NATS password: {text}");
        }
    }
}
