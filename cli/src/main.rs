//! `pagestream` — run the whole pipeline locally, try it on PDFs, or use a
//! running service's API.
//!
//! ```text
//! pagestream demo [--out DIR] [FILE.pdf ...]   private NATS + all stages, submit, watch, stop
//! pagestream run [--config FILE] [--embedded-nats]   all stages in one process until Ctrl-C
//! pagestream submit FILE... [--watch]          API client commands (--url, --token)
//! pagestream status ID | list | results ID [--download DIR] | cancel ID
//! ```

mod commands;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result};
use pagestream::client::ApiClient;
use pagestream::LocalPipeline;
use pagestream_pipeline::config::{Config, EXIT_BAD_CONFIG};
use pagestream_pipeline::util::init_tracing;

const USAGE: &str = "usage:
  pagestream demo [--out DIR] [FILE.pdf ...]
      Starts a private nats-server and every stage, submits each PDF (default:
      the bundled sample), shows live progress, writes results to DIR
      (default ./out), stops everything. Exit 0 when every document reached a
      terminal state.
  pagestream run [--config FILE] [--embedded-nats] [--nats-store DIR]
      Runs every stage in this process until Ctrl-C (SIGINT/SIGTERM).
      --embedded-nats starts a private nats-server (temporary storage, or
      DIR with --nats-store, which keeps documents across restarts).
      Settings: defaults, then FILE, then PAGESTREAM_<SECTION>_<KEY>.

API client (a running service; scripts/up starts one):
  pagestream submit FILE... [--watch] [--title T] [--dpi N] [--model M] [--wait-for-model] [--priority high|normal|low] [--idempotency-key K]
      Uploads each PDF; with --watch, a live progress bar per document.
      A model no live inferencer serves is refused, unless --wait-for-model.
      Exit 0 when every document was accepted (and, with --watch, completed
      or completed_with_errors), 1 otherwise.
  pagestream status ID [--json]
  pagestream list [--status STATE] [--limit N] [--json]
  pagestream results ID [--download DIR] [--json]
  pagestream cancel ID
  pagestream models [--json]
      The models live inferencers serve, with replica counts and weights.
  Options for all of them: --url URL (default $PAGESTREAM_URL, else
  http://127.0.0.1:8080), --token TOKEN (default $PAGESTREAM_TOKEN).";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = runtime.block_on(async {
        match args.first().map(String::as_str) {
            Some("demo") => demo(&args[1..]).await,
            Some("run") => run(&args[1..]).await,
            Some(cmd @ ("submit" | "status" | "list" | "results" | "cancel" | "models")) => {
                commands::main(cmd, &args[1..], USAGE).await
            }
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
    let mut store = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-c" | "--config" => file = it.next().map(PathBuf::from),
            "--embedded-nats" => embedded = true,
            "--nats-store" => store = it.next().map(PathBuf::from),
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
    let embedded = (embedded || store.is_some()).then_some(store);
    let mut pipeline = LocalPipeline::start_with_store(config, embedded).await?;
    // Installed once every stage is up: a native library loaded during
    // start-up must not be able to replace our SIGTERM/SIGINT handlers.
    let signals = pagestream_pipeline::shutdown::on_signals(pagestream_pipeline::shutdown::DEFAULT_GRACE);
    eprintln!("pagestream running: web page and API at {} (Ctrl-C to stop)", pipeline.base_url());
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
    let statuses = commands::watch(&client, &docs).await;
    let elapsed = began.elapsed();
    pipeline.stop().await?;

    let mut pages = 0;
    let mut unfinished = 0;
    eprintln!();
    for (id, name) in &docs {
        let st = &statuses[id];
        let state = st["state"].as_str().unwrap_or("unknown");
        pages += st["pages"]["uploaded"].as_u64().unwrap_or(0);
        let terminal = pagestream::client::is_terminal(state);
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
