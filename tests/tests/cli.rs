//! `scripts/up` and the `pagestream` command line, as a user runs them:
//! the service starts on embedded defaults, the CLI submits and watches a
//! real PDF, reads its status, lists, downloads results, refuses to cancel a
//! finished document; Ctrl-C (SIGINT) stops everything with exit 0.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pagestream_e2e::procs::{bin_dir, signal};
use pagestream_e2e::{corpus, read_json, repo_root};
use pagestream_pipeline::embedded::free_port;

fn cli(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_dir().join("pagestream"))
        .args(args)
        .env("PAGESTREAM_URL", url)
        .env_remove("PAGESTREAM_TOKEN")
        .output()
        .unwrap();
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), s(&out.stdout), s(&out.stderr))
}

fn children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep").args(["-P", &pid.to_string()]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[test]
fn scripts_up_serves_the_cli_and_stops_on_ctrl_c() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let mut up = Command::new(repo_root().join("scripts/up"));
    // Run it as a user would: without the variables the test runner sets
    // (LD_LIBRARY_PATH, CARGO_*), which would make its `cargo build`
    // rebuild the dependencies.
    for (k, _) in std::env::vars() {
        let runner = k.starts_with("CARGO") && k != "CARGO_HOME";
        if runner || k.starts_with("NEXTEST") || k == "LD_LIBRARY_PATH" || k == "RUST_RECURSION_COUNT" {
            up.env_remove(k);
        }
    }
    // Built as scripts/test builds the binaries the other tests run (with
    // the render worker's test faults): otherwise this build would swap them
    // for ones without, under the tests running beside it.
    up.env("UP_CARGO_FEATURES", "pagestream-splitter/test-faults");
    let mut up = up
        .args(["--nats-store", tmp.path().join("nats").to_str().unwrap()])
        .env("PAGESTREAM_INGRESS_ADDR", format!("127.0.0.1:{port}"))
        .env("PAGESTREAM_UPLOADER_DIR", tmp.path().join("out"))
        .env("PAGESTREAM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the line that gives the URL.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = up.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut log = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) if line.contains(&format!("web page and API at {url}")) => break,
            Ok(line) => log.push(line),
            Err(_) => {}
        }
        assert!(up.try_wait().unwrap().is_none(), "scripts/up exited: {log:#?}");
        assert!(Instant::now() < deadline, "scripts/up printed no URL: {log:#?}");
    }

    let pdf = corpus("fig_dbscan-jss.pdf");
    let (code, out, err) = cli(&url, &["submit", "--watch", "--title", "DBSCAN", pdf.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    let id = out.split_whitespace().next().unwrap().to_string();
    assert_eq!(id.len(), 32, "{out}");
    assert!(err.contains("28/28") && err.contains("completed"), "progress bars: {err}");

    let (code, out, _) = cli(&url, &["status", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("state:    completed") && out.contains("uploaded 28"), "{out}");
    let (code, out, _) = cli(&url, &["status", &id, "--json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["title"], "DBSCAN");

    let (code, out, _) = cli(&url, &["list"]);
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with(&id) && l.contains("completed")), "{out}");

    let dl = tmp.path().join("dl");
    let (code, out, err) = cli(&url, &["results", &id, "--download", dl.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let doc = dl.join(&id);
    let manifest: serde_json::Value = read_json(&doc.join("manifest.json"));
    assert_eq!(manifest["page_count"], 28);
    for n in 1..=28 {
        assert!(std::fs::metadata(doc.join(format!("pages/{n}.png"))).unwrap().len() > 1000);
        let page: serde_json::Value = read_json(&doc.join(format!("pages/{n}.json")));
        assert_eq!(page["page"], n);
    }

    let (code, _, err) = cli(&url, &["cancel", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("already_finished"), "{err}");
    let (code, _, err) = cli(&url, &["status", "does-not-exist"]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = cli(&url, &["submit", "/nonexistent.pdf"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a file"), "{err}");

    // Ctrl-C: everything stops, the private nats-server included, exit 0.
    let kids = children(up.id());
    assert!(!kids.is_empty(), "the private nats-server runs as a child");
    signal(up.id(), "-INT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "scripts/up still running 30 s after SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(status.code(), Some(0), "clean exit; scripts/up said: {rest:#?}");
    for k in kids {
        assert!(!alive(k), "child {k} survived");
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the port is released");
}

#[test]
fn help_per_command_completions_and_usage_errors() {
    let url = "http://127.0.0.1:1";
    let (code, out, _) = cli(url, &["--help"]);
    assert_eq!(code, 0);
    for cmd in ["demo", "run", "submit", "status", "list", "results", "cancel", "models", "completions"] {
        assert!(out.contains(cmd), "--help lists {cmd}: {out}");
    }
    let (code, out, _) = cli(url, &["submit", "--help"]);
    assert_eq!(code, 0);
    for opt in
        ["--watch", "--dpi", "--model", "--wait-for-model", "--priority", "--idempotency-key", "--url", "--token"]
    {
        assert!(out.contains(opt), "submit --help describes {opt}: {out}");
    }
    assert!(out.contains("[env: PAGESTREAM_URL="), "{out}");
    let (code, out, _) = cli(url, &["help", "results"]);
    assert_eq!(code, 0);
    assert!(out.contains("--download"), "{out}");

    let (code, out, _) = cli(url, &["completions", "bash"]);
    assert_eq!(code, 0);
    assert!(out.contains("complete -F") && out.contains("pagestream") && out.contains("--wait-for-model"), "{out}");
    let (code, out, _) = cli(url, &["completions", "zsh"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("#compdef pagestream"), "{out}");

    // Usage errors: exit 64 (EX_USAGE) with the reason, nothing sent.
    for args in [&["submit"][..], &["submit", "--priority", "urgent", "a.pdf"], &["status"], &["frobnicate"]] {
        let (code, _, err) = cli(url, args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains("error:") && err.contains("--help"), "{args:?}: {err}");
    }
    // A service that is not there: exit 1, naming it.
    let (code, _, err) = cli(url, &["status", "0123456789abcdef0123456789abcdef"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("talking to http://127.0.0.1:1"), "{err}");
}

/// The container image has one executable: each stage's name is a link to
/// `pagestream` (Dockerfile, docs/deploy.md#images). Called by a stage's
/// name it is that stage, exactly as the stage's own executable: same usage,
/// same refusal of a bad argument; called anything else it is the CLI.
#[test]
fn pagestream_called_by_a_stage_name_is_that_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |exe: &Path, arg: &str| {
        let out = Command::new(exe).arg(arg).env_remove("PAGESTREAM_CONFIG").output().unwrap();
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), s(&out.stdout), s(&out.stderr))
    };
    for stage in ["ingress", "splitter", "inferencer", "uploader", "notifier"] {
        let link = tmp.path().join(stage);
        std::os::unix::fs::symlink(bin_dir().join("pagestream"), &link).unwrap();
        let own = bin_dir().join(stage);
        let (code, usage, _) = run(&link, "--help");
        assert_eq!(code, Some(0), "{stage} --help through the link");
        assert!(usage.starts_with(&format!("{stage} — ")), "{stage}: {usage}");
        assert_eq!(
            (code, usage),
            {
                let (c, u, _) = run(&own, "--help");
                (c, u)
            },
            "{stage}: the link's usage is the stage's own"
        );
        assert_eq!(run(&link, "--bogus"), run(&own, "--bogus"), "{stage}: a bad argument");
    }
    let other = tmp.path().join("pagestream-cli");
    std::os::unix::fs::symlink(bin_dir().join("pagestream"), &other).unwrap();
    let (code, help, _) = run(&other, "--help");
    assert_eq!(code, Some(0));
    assert!(help.contains("Run the whole pipeline locally"), "{help}");
}

/// A stage caps glibc's malloc arenas (`MALLOC_ARENA_MAX=2`) by executing
/// itself again at start, keeping its pid; a cap the user set is kept.
#[test]
fn stages_cap_glibc_malloc_arenas_unless_told_otherwise() {
    for (given, want) in [(None, "MALLOC_ARENA_MAX=2"), (Some("4"), "MALLOC_ARENA_MAX=4")] {
        let mut cmd = Command::new(bin_dir().join("ingress"));
        // No NATS there: the ingress keeps trying for 10 s, long enough to look.
        cmd.env("PAGESTREAM_NATS_URL", "nats://127.0.0.1:1")
            .env_remove("MALLOC_ARENA_MAX")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(v) = given {
            cmd.env("MALLOC_ARENA_MAX", v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut seen = Vec::new();
        for _ in 0..50 {
            let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap_or_default();
            seen = environ.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
            if seen.iter().any(|v| v.starts_with("MALLOC_ARENA_MAX=")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap_or_default();
        child.kill().unwrap();
        child.wait().unwrap();
        let caps: Vec<&String> = seen.iter().filter(|v| v.starts_with("MALLOC_ARENA_MAX=")).collect();
        assert_eq!(caps, [want], "given {given:?}");
        assert_eq!(comm.trim(), "ingress", "the same process, still the ingress");
    }
}
