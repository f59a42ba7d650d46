//! The `pagestream` command line and the all-in-one local mode: every stage
//! in one process, sharing one NATS connection, against a configured NATS
//! server or a private one started on the fly. The demo and the end-to-end
//! tests use [`LocalPipeline`], so they run exactly the stages' `run`
//! functions the binaries run.

pub mod client;
pub mod config;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use pagestream_pipeline::embedded::NatsServer;
use pagestream_pipeline::health::Health;
use pagestream_pipeline::metrics::Metrics;
use pagestream_pipeline::StageContext;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use crate::config::Config;

/// One stage of the all-in-one mode.
struct Stage {
    name: &'static str,
    /// Whether this configuration runs it.
    enabled: fn(&Config) -> bool,
    /// Whether the pipeline is ready only once this stage is (every stage
    /// counts from the start, not only once it has begun loading: a stage
    /// still connecting to S3 is not ready).
    readiness: bool,
    /// Its `run`: the shared context, its settings (taken from the whole
    /// configuration as its binary takes them from the sources), the API
    /// listener (bound before any stage starts, so that its address is
    /// known; taken by the ingress) and the shutdown token.
    run: fn(StageContext, &Config, &mut Option<TcpListener>, CancellationToken) -> StageFuture,
}

type StageFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

fn always(_: &Config) -> bool {
    true
}

/// Every stage, in the order they start: the ingress accepts uploads only
/// once the others run, and the notifier runs when the deployment signs
/// webhooks.
const STAGES: [Stage; 5] = [
    Stage {
        name: pagestream_splitter::STAGE,
        enabled: always,
        readiness: true,
        run: |ctx, c, _, s| Box::pin(pagestream_splitter::run(ctx, c.splitter.clone(), s)),
    },
    Stage {
        name: pagestream_inferencer::STAGE,
        enabled: always,
        readiness: true,
        run: |ctx, c, _, s| Box::pin(pagestream_inferencer::run(ctx, c.inferencer.clone(), s)),
    },
    Stage {
        name: pagestream_uploader::STAGE,
        enabled: always,
        readiness: true,
        run: |ctx, c, _, s| Box::pin(pagestream_uploader::run(ctx, c.uploader.clone(), s)),
    },
    Stage {
        name: pagestream_ingress::STAGE,
        enabled: always,
        readiness: true,
        run: |ctx, c, listener, s| {
            let listener = listener.take().expect("the API listener is bound once, for the ingress");
            Box::pin(pagestream_ingress::serve(ctx, c.ingress_settings(), listener, s))
        },
    },
    Stage {
        name: pagestream_notifier::STAGE,
        enabled: |c| !c.notifier.secret.is_empty(),
        readiness: false,
        run: |ctx, c, _, s| Box::pin(pagestream_notifier::run(ctx, c.notifier.clone(), s)),
    },
];

/// Every stage ([`STAGES`]) running in this process.
#[derive(Debug)]
pub struct LocalPipeline {
    pub ingress_addr: SocketAddr,
    /// The configuration the stages run with.
    pub config: Config,
    pub ctx: StageContext,
    pub shutdown: CancellationToken,
    /// The private NATS server, when this pipeline started one.
    pub nats: Option<NatsServer>,
    tasks: JoinSet<(&'static str, Result<()>)>,
}

impl LocalPipeline {
    /// Starts every stage. With `embedded_nats`, a private nats-server is
    /// started first and `config.nats.url` points at it.
    pub async fn start(config: Config, embedded_nats: bool) -> Result<LocalPipeline> {
        let store = embedded_nats.then_some(None);
        Self::start_with_store(config, store).await
    }

    /// Like [`LocalPipeline::start`]; `Some(Some(dir))` starts the private
    /// nats-server with its storage in `dir`, so documents and progress
    /// survive a restart (`scripts/up`); `Some(None)` uses a temporary one.
    pub async fn start_with_store(mut config: Config, embedded: Option<Option<PathBuf>>) -> Result<LocalPipeline> {
        let nats = match embedded {
            None => None,
            Some(store) => {
                let server = tokio::task::spawn_blocking(move || match store {
                    Some(dir) => {
                        std::fs::create_dir_all(&dir)
                            .with_context(|| format!("creating the NATS store {}", dir.display()))?;
                        NatsServer::start_in(&dir, None)
                    }
                    None => NatsServer::start(),
                })
                .await??;
                config.nats.url = server.url();
                // A small disk lowers the stream limits instead of refusing
                // to start (remote servers get the error and its hint).
                if let Some(lowered) = server.fit_limits(&mut config.nats)? {
                    tracing::warn!("{lowered}");
                }
                Some(server)
            }
        };
        let metrics = Arc::new(Metrics::new());
        let health = Health::new(metrics.clone());
        let stages: Vec<&Stage> = STAGES.iter().filter(|stage| (stage.enabled)(&config)).collect();
        for stage in stages.iter().filter(|stage| stage.readiness) {
            health.register(stage.name);
        }
        let ctx = StageContext::connect(config.shared(), "pagestream-local", metrics, health).await?;
        let shutdown = CancellationToken::new();
        let listener = TcpListener::bind(&config.ingress.addr).await.with_context(|| {
            format!("ingress: cannot listen on {} (set PAGESTREAM_INGRESS_ADDR)", config.ingress.addr)
        })?;
        let ingress_addr = listener.local_addr()?;

        let mut tasks = JoinSet::new();
        let mut listener = Some(listener);
        for stage in stages {
            let run = (stage.run)(ctx.clone(), &config, &mut listener, shutdown.clone());
            let name = stage.name;
            tasks.spawn(async move { (name, run.await) });
        }

        let mut pipeline = LocalPipeline { ingress_addr, config, ctx, shutdown, nats, tasks };
        // Start-up errors (missing library, bad model, unreachable bucket)
        // surface here, before any upload is accepted.
        if let Err(e) = pipeline.wait_ready().await {
            let _ = pipeline.stop().await;
            return Err(e);
        }
        Ok(pipeline)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            match self.ctx.health.not_ready() {
                None => return Ok(()),
                Some(waiting) if tokio::time::Instant::now() > deadline => {
                    anyhow::bail!("pipeline not ready after 120 s; waiting for {waiting:?}")
                }
                Some(_) => {}
            }
            if let Some(res) = self.tasks.try_join_next() {
                let (stage, r) = res?;
                r.with_context(|| format!("{stage} failed to start"))?;
                anyhow::bail!("{stage} exited during start-up");
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.ingress_addr)
    }

    /// Waits until a stage exits (an error) or `shutdown` is cancelled.
    pub async fn wait(&mut self) -> Result<()> {
        tokio::select! {
            // Biased: once shutdown is requested, stages exit on their own;
            // one that wins the race to exit is not "unexpected".
            biased;
            _ = self.shutdown.cancelled() => Ok(()),
            Some(res) = self.tasks.join_next() => {
                let (stage, r) = res?;
                r.with_context(|| format!("stage {stage} stopped"))?;
                if self.shutdown.is_cancelled() {
                    return Ok(());
                }
                anyhow::bail!("stage {stage} exited unexpectedly")
            }
        }
    }

    /// Stops every stage (in-flight messages finish) and the private server.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        let mut first_err = None;
        while let Some(res) = self.tasks.join_next().await {
            match res {
                Ok((stage, Err(e))) => {
                    tracing::error!(stage, error = %format!("{e:#}"), "stage failed");
                    first_err.get_or_insert(e.context(stage));
                }
                Err(e) => {
                    first_err.get_or_insert(e.into());
                }
                Ok(_) => {}
            }
        }
        drop(self.nats.take());
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_runs_each_stage_once_and_the_notifier_when_webhooks_are_signed() {
        let names: Vec<&str> = STAGES.iter().map(|s| s.name).collect();
        assert_eq!(names, ["splitter", "inferencer", "uploader", "ingress", "notifier"]);
        let enabled =
            |config: &Config| -> Vec<&str> { STAGES.iter().filter(|s| (s.enabled)(config)).map(|s| s.name).collect() };
        let mut config = Config::default();
        assert_eq!(enabled(&config), ["splitter", "inferencer", "uploader", "ingress"]);
        config.notifier.secret = "whsec_c2VjcmV0".into();
        assert_eq!(enabled(&config), names);
        let ready: Vec<&str> = STAGES.iter().filter(|s| s.readiness).map(|s| s.name).collect();
        assert_eq!(ready, ["splitter", "inferencer", "uploader", "ingress"], "the notifier reports no readiness");
    }
}
