//! The common `main` of every stage binary: config (exit 64 when invalid,
//! before any port is bound), logging, signals, NATS, admin endpoints.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, EXIT_BAD_CONFIG};
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

/// Loads the config or exits 64 listing every problem.
pub fn load_config_or_exit(usage: &str) -> Config {
    let path = config_path_from_args(usage);
    match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    }
}

/// Runs one stage as a process: `admin_addr` (may be empty) serves the admin
/// endpoints; `body` gets the connected context and the shutdown token.
pub async fn run_stage<F, Fut>(
    name: &'static str,
    usage: &str,
    admin_addr: impl Fn(&Config) -> String,
    body: F,
) -> Result<()>
where
    F: FnOnce(StageContext, CancellationToken) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let config = load_config_or_exit(usage);
    crate::util::init_tracing_for(&format!("pagestream-{name}"));
    let metrics = Arc::new(Metrics::new());
    let health = Health::new(metrics.clone());
    health.register(name);
    let shutdown = shutdown::on_signals(shutdown::DEFAULT_GRACE);
    let addr = admin_addr(&config);
    if !addr.is_empty() {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("{name}: cannot listen on admin address {addr}: {e}"))?;
        tracing::info!(stage = name, addr = %listener.local_addr()?, "admin endpoints: /livez /readyz /metrics");
        tokio::spawn(crate::admin::serve(listener, health.clone(), metrics.clone(), shutdown.clone()));
    }
    let ctx = StageContext::connect(config, name, metrics, health).await?;
    let outcome = body(ctx, shutdown).await;
    crate::telemetry::shutdown();
    outcome
}
