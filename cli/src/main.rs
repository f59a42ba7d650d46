//! `pagestream` — run the whole pipeline locally, or try it on PDFs.
//!
//! ```text
//! pagestream demo [--out DIR] [FILE.pdf ...]   private NATS + all stages, submit, watch, stop
//! pagestream run [--config FILE] [--embedded-nats]   all stages in one process until Ctrl-C
//! ```

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use pagestream::client::ApiClient;
use pagestream::LocalPipeline;
use pagestream_pipeline::config::{Config, EXIT_BAD_CONFIG};
use pagestream_pipeline::util::init_tracing;
use serde_json::Value;

const USAGE: &str = "usage:
  pagestream demo [--out DIR] [FILE.pdf ...]
      Starts a private nats-server and every stage, submits each PDF (default:
      the bundled sample), shows live progress, writes results to DIR
      (default ./out), stops everything. Exit 0 when every document reached a
      terminal state.
  pagestream run [--config FILE] [--embedded-nats]
      Runs every stage in this process until Ctrl-C (SIGINT/SIGTERM).
      Settings: defaults, then FILE, then PAGESTREAM_<SECTION>_<KEY>.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = runtime.block_on(async {
        match args.first().map(String::as_str) {
            Some("demo") => demo(&args[1..]).await,
            Some("run") => run(&args[1..]).await,
            Some("-h" | "--help") | None => {
                println!("{USAGE}");
                Ok(0)
            }
            Some(other) => {
                eprintln!("unknown command {other:?}\n\n{USAGE}");
                Ok(EXIT_BAD_CONFIG)
            }
        }
    });
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn load_config(file: Option<PathBuf>) -> Result<Config, i32> {
    Config::load(file.as_deref()).map_err(|e| {
        eprintln!("{e}");
        EXIT_BAD_CONFIG
    })
}

async fn run(args: &[String]) -> Result<i32> {
    let mut file = None;
    let mut embedded = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-c" | "--config" => file = it.next().map(PathBuf::from),
            "--embedded-nats" => embedded = true,
            other => {
                eprintln!("unknown argument {other:?}\n\n{USAGE}");
                return Ok(EXIT_BAD_CONFIG);
            }
        }
    }
    let config = match load_config(file) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    init_tracing();
    let mut pipeline = LocalPipeline::start(config, embedded).await?;
    // Installed once every stage is up: a native library loaded during
    // start-up must not be able to replace our SIGTERM/SIGINT handlers.
    let signals = pagestream_pipeline::shutdown::on_signals(pagestream_pipeline::shutdown::DEFAULT_GRACE);
    eprintln!("pagestream running: API at {} (Ctrl-C to stop)", pipeline.base_url());
    let stop = pipeline.shutdown.clone();
    tokio::spawn(async move {
        signals.cancelled().await;
        stop.cancel();
    });
    let outcome = pipeline.wait().await;
    pipeline.stop().await?;
    outcome.map(|()| 0)
}

fn default_sample() -> Option<PathBuf> {
    let rel = "samples/c03-29.pdf";
    let starts = [std::env::current_dir().ok(), std::env::current_exe().ok()];
    starts
        .into_iter()
        .flatten()
        .flat_map(|s| s.ancestors().map(|a| a.join(rel)).collect::<Vec<_>>())
        .find(|p| p.exists())
}

async fn demo(args: &[String]) -> Result<i32> {
    let mut out = PathBuf::from("out");
    let mut files = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(it.next().context("--out needs a directory")?),
            s if s.starts_with('-') => {
                eprintln!("unknown option {s:?}\n\n{USAGE}");
                return Ok(EXIT_BAD_CONFIG);
            }
            f => files.push(PathBuf::from(f)),
        }
    }
    if files.is_empty() {
        files.push(default_sample().context("the bundled sample samples/c03-29.pdf was not found; pass a PDF")?);
    }
    for f in &files {
        if !f.is_file() {
            eprintln!("error: {} is not a file", f.display());
            return Ok(66);
        }
    }
    let mut config = match load_config(None) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    config.uploader.target = "local".into();
    config.uploader.dir = out.clone();
    config.ingress.addr = "127.0.0.1:0".into();
    if std::env::var_os("PAGESTREAM_LOG").is_none() {
        std::env::set_var("PAGESTREAM_LOG", "error");
    }
    init_tracing();

    eprintln!("starting a private nats-server and the four stages…");
    let started = Instant::now();
    let pipeline = LocalPipeline::start(config, true).await?;
    eprintln!("ready in {:.1} s; API at {}", started.elapsed().as_secs_f32(), pipeline.base_url());
    let client = ApiClient::new(pipeline.base_url());

    let began = Instant::now();
    let mut docs: Vec<(String, String)> = Vec::new();
    for f in &files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let ans = client.submit_file(f, Some(&name)).await?;
        if ans.status.as_u16() == 202 {
            docs.push((ans.json["id"].as_str().unwrap_or_default().to_string(), name));
        } else {
            eprintln!("✗ {name}: rejected with HTTP {}: {}", ans.status, ans.json["error"]["message"]);
        }
    }
    let rejected = files.len() - docs.len();
    let statuses = watch(&client, &docs).await;
    let elapsed = began.elapsed();
    pipeline.stop().await?;

    let mut pages = 0;
    let mut unfinished = 0;
    eprintln!();
    for (id, name) in &docs {
        let st = &statuses[id];
        let state = st["state"].as_str().unwrap_or("unknown");
        pages += st["pages"]["uploaded"].as_u64().unwrap_or(0);
        let terminal = matches!(state, "completed" | "completed_with_errors" | "failed");
        unfinished += usize::from(!terminal);
        let mark = match state {
            "completed" => "✓",
            "completed_with_errors" => "!",
            _ => "✗",
        };
        let mut line = format!("{mark} {name}: {state}, {} pages", st["page_count"].as_u64().unwrap_or(0));
        if let Some(err) = st["error"]["message"].as_str() {
            line += &format!(" — {err}");
        }
        if let Some(m) = st["manifest"].as_str() {
            line += &format!("\n    manifest: {m}");
        }
        eprintln!("{line}");
    }
    eprintln!(
        "{pages} pages in {:.1} s ({:.2} pages/s); results in {}",
        elapsed.as_secs_f32(),
        pages as f32 / elapsed.as_secs_f32(),
        out.display()
    );
    if unfinished > 0 {
        eprintln!("error: {unfinished} document(s) did not reach a terminal state");
        return Ok(1);
    }
    if rejected > 0 {
        eprintln!("error: {rejected} file(s) were rejected by the ingress");
        return Ok(1);
    }
    Ok(0)
}

/// Polls each document until all are terminal (or stalled for 10 minutes),
/// drawing one progress line per document.
async fn watch(client: &ApiClient, docs: &[(String, String)]) -> BTreeMap<String, Value> {
    let tty = std::io::stderr().is_terminal();
    let mut last: BTreeMap<String, Value> = BTreeMap::new();
    let mut last_change = Instant::now();
    let mut drawn = 0;
    loop {
        let mut changed = false;
        for (id, _) in docs {
            if let Ok(ans) = client.get(&format!("/v1/documents/{id}")).await {
                if ans.status.is_success() && last.get(id) != Some(&ans.json) {
                    last.insert(id.clone(), ans.json);
                    changed = true;
                }
            }
        }
        let lines: Vec<String> = docs.iter().map(|(id, name)| progress_line(name, last.get(id))).collect();
        if changed {
            last_change = Instant::now();
            let mut err = std::io::stderr().lock();
            if tty && drawn > 0 {
                let _ = write!(err, "\x1b[{drawn}A");
            }
            if tty || changed {
                for l in &lines {
                    let _ = writeln!(err, "{}{l}", if tty { "\x1b[2K" } else { "" });
                }
                drawn = lines.len();
            }
        }
        let all_done = docs.iter().all(|(id, _)| {
            last.get(id)
                .and_then(|s| s["state"].as_str())
                .is_some_and(|s| matches!(s, "completed" | "completed_with_errors" | "failed"))
        });
        if all_done || last_change.elapsed() > Duration::from_secs(600) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(if tty { 200 } else { 1000 })).await;
    }
}

fn progress_line(name: &str, st: Option<&Value>) -> String {
    let Some(st) = st else {
        return format!("{name}: submitted");
    };
    let total = st["page_count"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "?".into());
    let p = &st["pages"];
    let mut line = format!(
        "{name}: {:<22} rendered {}/{total} · inferred {}/{total} · uploaded {}/{total}",
        st["state"].as_str().unwrap_or("?"),
        p["rendered"],
        p["inferred"],
        p["uploaded"]
    );
    if p["failed"].as_u64().unwrap_or(0) > 0 {
        line += &format!(" · failed {}", p["failed"]);
    }
    line
}
