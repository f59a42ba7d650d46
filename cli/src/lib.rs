//! The `pagestream` command line and the all-in-one local mode: every stage
//! in one process, sharing one NATS connection, against a configured NATS
//! server or a private one started on the fly. The demo and the end-to-end
//! tests use [`LocalPipeline`], so they run exactly the stages' `run`
//! functions the binaries run.

pub mod client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use pagestream_pipeline::embedded::NatsServer;
use pagestream_pipeline::health::Health;
use pagestream_pipeline::metrics::Metrics;
use pagestream_pipeline::{Config, StageContext};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// All four stages running in this process.
#[derive(Debug)]
pub struct LocalPipeline {
    pub ingress_addr: SocketAddr,
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
        // Every stage counts for readiness from the start, not only once it
        // has begun loading (a stage still connecting to S3 is not ready).
        for stage in [
            pagestream_ingress::STAGE,
            pagestream_splitter::STAGE,
            pagestream_inferencer::STAGE,
            pagestream_uploader::STAGE,
        ] {
            health.register(stage);
        }
        let ctx = StageContext::connect(config, "pagestream-local", metrics, health).await?;
        let shutdown = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind(&ctx.config.ingress.addr).await.with_context(|| {
            format!("ingress: cannot listen on {} (set PAGESTREAM_INGRESS_ADDR)", ctx.config.ingress.addr)
        })?;
        let ingress_addr = listener.local_addr()?;

        let mut tasks = JoinSet::new();
        let (c, s) = (ctx.clone(), shutdown.clone());
        tasks.spawn(async move { ("splitter", pagestream_splitter::run(c, s).await) });
        let (c, s) = (ctx.clone(), shutdown.clone());
        tasks.spawn(async move { ("inferencer", pagestream_inferencer::run(c, s).await) });
        let (c, s) = (ctx.clone(), shutdown.clone());
        tasks.spawn(async move { ("uploader", pagestream_uploader::run(c, s).await) });
        let (c, s) = (ctx.clone(), shutdown.clone());
        tasks.spawn(async move { ("ingress", pagestream_ingress::serve(c, listener, s).await) });
        // Webhooks, when the deployment signs them.
        if !ctx.config.notifier.secret.is_empty() {
            let (c, s) = (ctx.clone(), shutdown.clone());
            tasks.spawn(async move { ("notifier", pagestream_notifier::run(c, s).await) });
        }

        let mut pipeline = LocalPipeline { ingress_addr, ctx, shutdown, nats, tasks };
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
