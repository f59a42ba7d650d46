//! `pagestream` — run the whole pipeline locally, try it on PDFs, or use a
//! running service's API.
//!
//! ```text
//! pagestream demo [--out DIR] [FILE.pdf ...]   private NATS + all stages, submit, watch, stop
//! pagestream run [--config FILE] [--embedded-nats]   all stages in one process until Ctrl-C
//! pagestream submit FILE... [--watch]          API client commands (--url, --token)
//! pagestream status ID | list | results ID [--follow] [--download DIR] [--format coco] | cancel ID | models
//! pagestream gate MODEL@VARIANT FILE.pdf...    accuracy gate of a quantized variant
//! pagestream completions bash|zsh|fish|…
//! ```
//!
//! Arguments are parsed by `clap` (`pagestream help <command>`).

mod commands;
mod gate;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use pagestream::client::ApiClient;
use pagestream::Config;
use pagestream::LocalPipeline;
use pagestream_pipeline::config::EXIT_BAD_CONFIG;
use pagestream_pipeline::progress::DocState;
use pagestream_pipeline::util::init_tracing;

/// Run the whole pipeline locally, try it on PDFs, or use a running
/// service's API.
#[derive(Parser, Debug)]
#[command(name = "pagestream", version)]
#[command(after_help = "Settings of `run` and `demo`: defaults, then --config FILE (or PAGESTREAM_CONFIG), then \
    PAGESTREAM_<SECTION>_<KEY> variables (docs/configuration.md). Logs: PAGESTREAM_LOG (filter), \
    PAGESTREAM_LOG_FORMAT=json.")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a private nats-server and every stage, submit PDFs, show live
    /// progress, write results, stop everything
    ///
    /// Submits each PDF (default: the bundled sample), writes results to DIR
    /// and exits 0 when every document reached a terminal state.
    Demo {
        /// Where results are written
        #[arg(long, value_name = "DIR", default_value = "out")]
        out: PathBuf,
        /// PDFs to process (default: the bundled sample)
        #[arg(value_name = "FILE.pdf")]
        files: Vec<PathBuf>,
    },
    /// Run every stage in this process until Ctrl-C (SIGINT/SIGTERM)
    // A later option replaces an earlier one: `scripts/up` passes a default
    // --nats-store before the user's arguments.
    #[command(args_override_self = true)]
    Run {
        /// TOML configuration file
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Start a private nats-server (temporary storage unless --nats-store)
        #[arg(long)]
        embedded_nats: bool,
        /// Storage of the private nats-server: documents survive restarts
        /// (implies --embedded-nats)
        #[arg(long, value_name = "DIR")]
        nats_store: Option<PathBuf>,
    },
    /// Upload PDFs; with --watch, follow each to its end
    ///
    /// Exit 0 when every document was accepted (and, with --watch, completed
    /// or completed_with_errors), 1 otherwise. A model no live inferencer
    /// serves is refused, unless --wait-for-model.
    Submit(commands::SubmitArgs),
    /// A document's state, page counts, errors and timings
    Status(commands::IdArgs),
    /// Documents, newest first
    List(commands::ListArgs),
    /// A document's results (links) at any time, as COCO, followed live, or downloaded
    Results(commands::ResultsArgs),
    /// Cancel a document (pages already uploaded are kept)
    Cancel(commands::IdArgs),
    /// The models live inferencers serve, with replica counts and weights
    Models(commands::ApiArgs),
    /// The accuracy gate of a model variant (`layout_cdla@int8`): its
    /// detections against its model's on the pages of PDFs
    ///
    /// Per-label F1 (same label, IoU ≥ 0.7). F1 ≥ 0.98 on at least 100 of
    /// the model's boxes passes and writes the record inferencers need to
    /// serve the variant (`<file>.gate.json` beside its weights); otherwise
    /// exits 1 and removes any earlier record. Exits 2 when it cannot judge
    /// (a model that does not load, a PDF that does not open).
    Gate(gate::GateArgs),
    /// Print a shell completion script
    ///
    /// bash: `pagestream completions bash > ~/.local/share/bash-completion/completions/pagestream`;
    /// zsh: `pagestream completions zsh > "${fpath[1]}/_pagestream"`;
    /// fish: `pagestream completions fish > ~/.config/fish/completions/pagestream.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The stage this executable is when called by that stage's name: the
/// container image has one executable, `pagestream`, and links each stage's
/// name to it (docs/deploy.md#images). Called `pagestream` (or anything
/// else) it is the CLI.
type StageBinary = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>;

fn stage_called(argv0: &std::ffi::OsStr) -> Option<StageBinary> {
    let name = std::path::Path::new(argv0).file_name()?.to_str()?;
    Some(match name {
        "ingress" => || Box::pin(pagestream_ingress::binary()),
        "splitter" => || Box::pin(pagestream_splitter::binary()),
        "inferencer" => || Box::pin(pagestream_inferencer::binary()),
        "uploader" => || Box::pin(pagestream_uploader::binary()),
        "notifier" => || Box::pin(pagestream_notifier::binary()),
        _ => return None,
    })
}

fn main() {
    pagestream_pipeline::util::cap_malloc_arenas();
    if let Some(stage) = std::env::args_os().next().as_deref().and_then(stage_called) {
        // As the stage's own executable does (`#[tokio::main]`, an error
        // returned from main).
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        let outcome = runtime.block_on(stage());
        drop(runtime);
        if let Err(e) = outcome {
            eprintln!("Error: {e:?}");
            std::process::exit(1);
        }
        return;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and exit 0; a usage error exits 64
            // (EX_USAGE), like a bad configuration.
            let _ = e.print();
            std::process::exit(if e.use_stderr() { EXIT_BAD_CONFIG } else { 0 });
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = runtime.block_on(async {
        match cli.command {
            Cmd::Demo { out, files } => demo(out, files).await,
            Cmd::Run { config, embedded_nats, nats_store } => run(config, embedded_nats, nats_store).await,
            Cmd::Submit(a) => commands::submit(&a).await,
            Cmd::Status(a) => commands::status(&a).await,
            Cmd::List(a) => commands::list(&a).await,
            Cmd::Results(a) => commands::results(&a).await,
            Cmd::Cancel(a) => commands::cancel(&a).await,
            Cmd::Models(a) => commands::models(&a).await,
            Cmd::Gate(a) => gate::gate(&a).await,
            Cmd::Completions { shell } => {
                clap_complete::generate(shell, &mut Cli::command(), "pagestream", &mut std::io::stdout());
                Ok(0)
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

async fn run(file: Option<PathBuf>, embedded: bool, store: Option<PathBuf>) -> Result<i32> {
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
    pagestream_pipeline::telemetry::shutdown();
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

async fn demo(out: PathBuf, mut files: Vec<PathBuf>) -> Result<i32> {
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
    config.uploader.results.target = pagestream_results::Target::Local;
    config.uploader.results.dir = out.clone();
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
        let doc_state = pagestream::client::doc_state(st);
        unfinished += usize::from(!doc_state.is_some_and(DocState::is_terminal));
        let mark = match doc_state {
            Some(DocState::Completed) => "✓",
            Some(DocState::CompletedWithErrors) => "!",
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
