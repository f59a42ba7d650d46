//! Test harness for end-to-end tests: real nats-server (private, temp dir,
//! free port), real moto S3 server, real pdfium and ONNX Runtime, real PDFs.
//! Every server is started on free ports and killed on drop.

pub mod ingress;
pub mod nats_cluster;
pub mod procs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use pagestream::client::ApiClient;
use pagestream::LocalPipeline;
use pagestream_pipeline::config::deps_dir;
use pagestream_pipeline::embedded::{free_port, NatsServer};
use pagestream_pipeline::Config;
use serde_json::Value;

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A corpus PDF (fetched by `scripts/fetch-corpus`).
pub fn corpus(name: &str) -> PathBuf {
    let dir = std::env::var_os("PAGESTREAM_CORPUS").map(PathBuf::from).unwrap_or_else(|| deps_dir().join("corpus"));
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-corpus {name}", p.display());
    p
}

/// Logging for tests: `PAGESTREAM_LOG=debug cargo nextest run …` to see it.
pub fn init_logging() {
    let filter = std::env::var("PAGESTREAM_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// A moto S3 server on a free port.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    pub port: u16,
}

impl MotoServer {
    pub fn start() -> Result<MotoServer> {
        Self::start_on(free_port()?)
    }

    /// Starts on a given port (e.g. to bring a stopped server back).
    pub fn start_on(port: u16) -> Result<MotoServer> {
        let bin = deps_dir().join("venv/bin/moto_server");
        anyhow::ensure!(bin.exists(), "{} is missing: run scripts/setup --test", bin.display());
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = MotoServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("moto_server exited during start-up: {status}");
            }
            anyhow::ensure!(Instant::now() < deadline, "moto_server did not start within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Points `config.uploader` at this server and creates `bucket`.
    pub async fn configure(&self, config: &mut Config, bucket: &str) -> Result<aws_sdk_s3::Client> {
        let u = &mut config.uploader;
        u.target = pagestream_pipeline::config::Target::S3;
        u.s3_bucket = bucket.into();
        u.s3_endpoint = self.endpoint();
        u.s3_region = "us-east-1".into();
        u.s3_path_style = true;
        u.s3_access_key_id = "test".into();
        u.s3_secret_access_key = "test".into();
        let client = pagestream_results::store::s3_client(u).await;
        client.create_bucket().bucket(bucket).send().await.context("creating bucket")?;
        Ok(client)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config for tests: unique prefix, results in `out`, ingress on a free port.
pub fn test_config(nats: &NatsServer, out: &Path) -> Config {
    let mut c = Config::default();
    c.nats.url = nats.url();
    c.nats.prefix = format!("t{}", std::process::id());
    c.ingress.addr = "127.0.0.1:0".into();
    c.uploader.dir = out.to_path_buf();
    c.splitter.admin_addr = String::new();
    c.inferencer.admin_addr = String::new();
    c.uploader.admin_addr = String::new();
    // Tests store little: reserve little, so that many test servers fit on
    // a CI disk (JetStream reserves each limit against 75% of the free disk).
    c.nats.max_blob_bytes = 1 << 30;
    c.nats.max_event_bytes = 256 << 20;
    nats.fit_limits(&mut c.nats).expect("reading the test nats-server's storage limit");
    c
}

/// A private NATS server plus every stage in-process.
pub struct Harness {
    pub nats: NatsServer,
    pub pipeline: LocalPipeline,
    pub client: ApiClient,
    pub out: tempfile::TempDir,
}

impl Harness {
    /// Starts NATS and the pipeline; `tweak` adjusts the config first.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Result<Harness> {
        init_logging();
        let nats = tokio::task::spawn_blocking(NatsServer::start).await??;
        let out = tempfile::tempdir()?;
        let mut config = test_config(&nats, out.path());
        tweak(&mut config);
        let pipeline = LocalPipeline::start(config, false).await?;
        let client = ApiClient::new(pipeline.base_url());
        Ok(Harness { nats, pipeline, client, out })
    }

    /// Polls the status endpoint until the document is terminal.
    pub async fn wait_terminal(&self, id: &str, within: Duration) -> Result<Value> {
        wait_terminal(&self.client, id, within).await
    }

    pub async fn stop(self) -> Result<()> {
        self.pipeline.stop().await
    }
}

/// Polls `GET /v1/documents/{id}` until its state is terminal.
pub async fn wait_terminal(client: &ApiClient, id: &str, within: Duration) -> Result<Value> {
    let deadline = Instant::now() + within;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let ans = client.get(&format!("/v1/documents/{id}")).await?;
        if ans.status.is_success() {
            if let Some(state) = ans.json["state"].as_str() {
                if pagestream::client::is_terminal(state) {
                    return Ok(ans.json);
                }
            }
            last = ans.json;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("document {id} not terminal after {within:?}; last status: {last}")
}

/// Every record of the pipeline's dead-letter stream, oldest first.
pub async fn dead_letters(
    js: &async_nats::jetstream::Context,
    names: &pagestream_pipeline::nats::Names,
) -> Vec<pagestream_schemas::DeadLetter> {
    use futures::StreamExt;
    let stream = js.get_stream(names.dlq_stream()).await.unwrap();
    let n = stream.get_info().await.unwrap().state.messages;
    if n == 0 {
        return Vec::new();
    }
    let consumer =
        stream.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()).await.unwrap();
    let mut msgs = consumer.messages().await.unwrap().take(n as usize);
    let mut out = Vec::new();
    while let Some(m) = msgs.next().await {
        out.push(pagestream_schemas::decode(&m.unwrap().payload).expect("dead letters decode"));
    }
    out
}

/// Intersection over union of two `[x0, y0, x1, y1]` boxes.
pub fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let ix = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let iy = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    let area = |r: &[f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    inter / (area(a) + area(b) - inter)
}

/// A labelled box from JSON (`{label, score, bbox}`).
pub fn boxes(detections: &Value) -> Vec<(String, [f64; 4])> {
    detections
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    let b = &d["bbox"];
                    let f = |i: usize| b[i].as_f64().unwrap_or(f64::NAN);
                    (d["label"].as_str().unwrap_or("").to_string(), [f(0), f(1), f(2), f(3)])
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Of `reference` boxes, how many have a same-label box in `ours` with IoU ≥ `min_iou`.
pub fn matched(reference: &[(String, [f64; 4])], ours: &[(String, [f64; 4])], min_iou: f64) -> usize {
    reference.iter().filter(|(label, r)| ours.iter().any(|(l, o)| l == label && iou(r, o) >= min_iou)).count()
}

/// The first `n` pages of a corpus PDF, rendered by the splitter's pdfium
/// path at `dpi` and decoded as the inferencer sees them.
pub async fn render_pages(pdf: &str, dpi: f32, n: usize) -> Vec<image::RgbImage> {
    render_file(&corpus(pdf), dpi, n).await
}

/// The first `n` pages of any PDF, rendered and decoded like [`render_pages`].
pub async fn render_file(pdf: &Path, dpi: f32, n: usize) -> Vec<image::RgbImage> {
    use pagestream_splitter::render::{RenderEvent, RenderRequest, Renderer};
    let config = Config::default();
    let renderer = Renderer::in_process(&config.splitter.pdfium_library).expect("libpdfium loads (scripts/setup)");
    let mut events = renderer.render(RenderRequest {
        pdf: pdf.to_path_buf(),
        password: None,
        dpi,
        max_pixels: config.splitter.max_pixels,
        pages: 1..=u32::MAX,
        skip: std::collections::HashSet::new(),
    });
    let mut pages = Vec::new();
    if n == 0 {
        return pages;
    }
    while let Some(ev) = events.recv().await {
        match ev {
            RenderEvent::Page(p) => {
                pages.push(pagestream_inferencer::decode_image(&p.png).expect("the splitter's PNG decodes"));
                if pages.len() == n {
                    break;
                }
            }
            RenderEvent::Opened { .. } => {}
            other => panic!("rendering {} failed: {other:?}", pdf.display()),
        }
    }
    pages
}

/// Every file below `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A document's live progress as an SSE client saw it (`(kind, data)` per
/// event): counts never go backwards nor above the page count, exactly one
/// terminal state, `completed`, and it comes last with every page counted.
pub fn assert_live_progress(id: &str, events: &[(String, Value)]) {
    let mut last = [0u64; 3];
    let mut terminal = 0;
    for (kind, data) in events {
        let n = data["page_count"].as_u64().unwrap_or(u64::MAX);
        for (i, stage) in ["rendered", "inferred", "uploaded"].iter().enumerate() {
            let c = data["pages"][stage].as_u64().unwrap();
            assert!(c >= last[i] && c <= n, "{id}: {stage} went from {} to {c} (of {n})", last[i]);
            last[i] = c;
        }
        if kind == "state" && pagestream::client::is_terminal(data["state"].as_str().unwrap()) {
            terminal += 1;
            assert_eq!(data["state"], "completed", "{id}");
        }
    }
    assert_eq!(terminal, 1, "{id}: one terminal state event");
    assert_eq!(events.last().unwrap().0, "state", "{id}: the terminal state comes last");
    let n = events.last().unwrap().1["page_count"].as_u64().unwrap();
    assert_eq!(last, [n, n, n], "{id}: final counts");
}
