//! The common `main` of every stage binary: config (exit 64 when invalid,
//! before any port is bound), logging, signals, NATS, admin endpoints.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Sources, EXIT_BAD_CONFIG};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown;
use crate::stage::StageContext;

/// Parses `--config FILE` (or `-c FILE`) and `--help` from the command line.
pub fn config_path_from_args(usage: &str) -> Option<PathBuf> {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "-c" | "--config" => path = args.next().map(PathBuf::from),
            "-h" | "--help" => {
                println!("{usage}\n\nOptions:\n  -c, --config FILE   TOML config file (also PAGESTREAM_CONFIG)\n\nEvery setting can be set as PAGESTREAM_<SECTION>_<KEY>; see docs/configuration.md.");
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other:?}\n\n{usage}");
                std::process::exit(EXIT_BAD_CONFIG);
            }
        }
    }
    path
}

/// Reads the configuration with `read` (the shared sections, then the
/// stage's own), or exits 64 listing every problem.
pub fn load_config_or_exit<S>(usage: &str, read: impl FnOnce(&mut Sources) -> S) -> (Config, S) {
    let path = config_path_from_args(usage);
    let mut sources = Sources::load(path.as_deref());
    let shared = Config::read(&mut sources);
    let own = read(&mut sources);
    match sources.finish() {
        Ok(()) => (shared, own),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    }
}

/// Runs one stage as a process: `read` takes the stage's settings from the
/// configuration sources, `admin_addr` (may be empty) serves the admin
/// endpoints; `body` gets the connected context, the settings and the
/// shutdown token.
pub async fn run_stage<S, F, Fut>(
    name: &'static str,
    usage: &str,
    read: impl FnOnce(&mut Sources) -> S,
    admin_addr: impl Fn(&S) -> String,
    body: F,
) -> Result<()>
where
    F: FnOnce(StageContext, S, CancellationToken) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    crate::util::cap_malloc_arenas();
    let (config, settings) = load_config_or_exit(usage, read);
    crate::util::init_tracing_for(&format!("pagestream-{name}"));
    let metrics = Arc::new(Metrics::new());
    let health = Health::new(metrics.clone());
    health.register(name);
    let shutdown = shutdown::on_signals(shutdown::DEFAULT_GRACE);
    let addr = admin_addr(&settings);
    if !addr.is_empty() {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("{name}: cannot listen on admin address {addr}: {e}"))?;
        tracing::info!(stage = name, addr = %listener.local_addr()?, "admin endpoints: /livez /readyz /metrics");
        tokio::spawn(crate::admin::serve(listener, health.clone(), metrics.clone(), shutdown.clone()));
    }
    let ctx = StageContext::connect(config, name, metrics, health).await?;
    let outcome = body(ctx, settings, shutdown).await;
    crate::telemetry::shutdown();
    outcome
}
