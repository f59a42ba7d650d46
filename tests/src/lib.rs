//! Test harness for end-to-end tests: real nats-server (private, temp dir,
//! free port), real moto S3 server, real pdfium and ONNX Runtime, real PDFs.
//! Every server is started on free ports and killed on drop.

pub mod api;
pub mod cer;
pub mod http;
pub mod ingress;
pub mod nats_cluster;
pub mod procs;
pub mod wait;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use pagestream::client::ApiClient;
use pagestream::Config;
use pagestream::LocalPipeline;
use pagestream_pipeline::config::deps_dir;
use pagestream_pipeline::embedded::{free_port, NatsServer};
use serde_json::Value;

/// The deployment's default model (ONNX Runtime).
pub const CDLA: &str = "layout_cdla";
/// The other installed model (the tract backend in the process tests).
pub const YOLO: &str = "yolov8n_doclaynet";
/// The sha256 of each model's weights.
pub const CDLA_SHA: &str = "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c";
pub const YOLO_SHA: &str = "7259c856bb6dae572c9385587049a08065548bbfae8360634b5a576b04248957";

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
        self.results_to(config, bucket);
        let client = pagestream_results::store::s3_client(&config.uploader.results.s3_connection()).await;
        client.create_bucket().bucket(bucket).send().await.context("creating bucket")?;
        Ok(client)
    }

    /// Creates `bucket`; a client of this server.
    pub async fn bucket(&self, bucket: &str) -> Result<aws_sdk_s3::Client> {
        self.configure(&mut Config::default(), bucket).await
    }

    /// Points `config.uploader` at `bucket` on this server.
    pub fn results_to(&self, config: &mut Config, bucket: &str) {
        let u = &mut config.uploader.results;
        u.target = pagestream_results::Target::S3;
        u.s3_bucket = bucket.into();
        u.s3_endpoint = self.endpoint();
        u.s3_region = "us-east-1".into();
        u.s3_path_style = true;
        u.s3_access_key_id = "test".into();
        u.s3_secret_access_key = "test".into();
    }

    /// Lets the splitter read documents by reference from `bucket` on this
    /// server (`splitter.source_s3_*`).
    pub fn source_for(&self, config: &mut Config, bucket: &str) {
        let s = &mut config.splitter;
        s.source_s3_buckets = vec![bucket.into()];
        s.source_s3_endpoint = self.endpoint();
        s.source_s3_path_style = true;
        s.source_s3_access_key_id = "test".into();
        s.source_s3_secret_access_key = "test".into();
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
    c.uploader.results.dir = out.to_path_buf();
    c.splitter.admin_addr = String::new();
    c.inferencer.admin_addr = String::new();
    c.uploader.admin_addr = String::new();
    // OCR takes seconds a page on these 2 cores, and the corpus's small
    // scans are what most tests submit: the tests of OCR turn it on.
    c.inferencer.ocr_model = String::new();
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

    /// `path` (`manifest.json`, `pages/3.json`) of document `id`'s results.
    pub fn result(&self, id: &str, path: &str) -> Value {
        read_json(&self.out.path().join(id).join(path))
    }

    /// Every record of the pipeline's dead-letter stream, oldest first.
    pub async fn dead_letters(&self) -> Vec<pagestream_schemas::DeadLetter> {
        dead_letters(&self.pipeline.ctx.js, &self.pipeline.ctx.names).await
    }

    /// [`Harness::dead_letters`] once there are at least `n`, or after
    /// `within` whatever there are (the caller asserts on them).
    pub async fn dead_letters_at_least(&self, n: usize, within: Duration) -> Vec<pagestream_schemas::DeadLetter> {
        wait::settle(within, Duration::from_millis(200), async || self.dead_letters().await, |dl| dl.len() >= n).await
    }

    /// Messages in the pipeline's stream `stream`.
    pub async fn stream_messages(&self, stream: String) -> u64 {
        stream_state(&self.pipeline.ctx.js, stream).await.0
    }

    /// [`Harness::start`] with its results in `bucket` (created) on `moto`;
    /// a client of that server too.
    pub async fn start_s3(
        moto: &MotoServer,
        bucket: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> Result<(Harness, aws_sdk_s3::Client)> {
        let s3 = moto.bucket(bucket).await?;
        let h = Harness::start(|c| {
            moto.results_to(c, bucket);
            tweak(c);
        })
        .await?;
        Ok((h, s3))
    }

    pub async fn stop(self) -> Result<()> {
        self.pipeline.stop().await
    }
}

/// Messages and bytes in `stream`.
pub async fn stream_state(js: &async_nats::jetstream::Context, stream: String) -> (u64, u64) {
    let mut stream = js.get_stream(stream).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    (state.messages, state.bytes)
}

/// Samples the messages in `stream` every 10 ms until every document of
/// `ids` is terminal (their status read every `poll`, at most `within`);
/// returns the largest number seen. A failure shows `context()`.
pub async fn max_in_stream_until_done(
    js: &async_nats::jetstream::Context,
    stream: &str,
    (client, ids): (&ApiClient, &[String]),
    (within, poll): (Duration, Duration),
    context: impl Fn() -> String,
) -> u64 {
    let deadline = Instant::now() + within;
    let mut max = 0;
    let mut last_poll: Option<Instant> = None;
    loop {
        max = max.max(stream_state(js, stream.to_string()).await.0);
        if last_poll.is_none_or(|t| t.elapsed() > poll) {
            last_poll = Some(Instant::now());
            let mut all = true;
            for id in ids {
                all &= api::is_terminal(&api::status_ok(client, id).await);
            }
            if all {
                return max;
            }
        }
        assert!(Instant::now() < deadline, "documents not finished within {within:?}\n{}", context());
        tokio::time::sleep(Duration::from_millis(10)).await;
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

/// Publishes `payload` on `subject` and waits for JetStream's ack.
pub async fn publish(js: &async_nats::jetstream::Context, subject: String, payload: impl Into<bytes::Bytes>) {
    js.publish(subject, payload.into()).await.unwrap().await.unwrap();
}

/// Waits (at most `within`) until consumer `durable` of `stream` was
/// delivered at least `delivered` messages and has none pending or
/// unacknowledged.
pub async fn wait_consumer_idle(
    js: &async_nats::jetstream::Context,
    stream: String,
    durable: &str,
    delivered: u64,
    within: Duration,
) {
    wait::until(within, Duration::from_millis(50), async || {
        let mut c: async_nats::jetstream::consumer::PullConsumer =
            js.get_stream(&stream).await.unwrap().get_consumer(durable).await.unwrap();
        let info = c.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence >= delivered {
            return Ok(());
        }
        Err(format!("{durable} did not finish: {info:?}"))
    })
    .await
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
    if n == 0 {
        return Vec::new();
    }
    rendered(pdf, dpi, 1..=n as u32)
        .await
        .iter()
        .map(|p| pagestream_inferencer::decode_image(&p.png).expect("the splitter's PNG decodes"))
        .collect()
}

/// `pages` of `pdf` as the splitter's pdfium path renders them (image,
/// text layer, sizes), in page order; a page that fails panics.
pub async fn rendered(
    pdf: &Path,
    dpi: f32,
    pages: std::ops::RangeInclusive<u32>,
) -> Vec<pagestream_splitter::render::RenderedPage> {
    use pagestream_splitter::render::{RenderEvent, RenderRequest, Renderer};
    let config = Config::default();
    let renderer = Renderer::in_process(&config.splitter.pdfium_library).expect("libpdfium loads (scripts/setup)");
    let mut events = renderer.render(RenderRequest {
        pdf: pdf.to_path_buf(),
        password: None,
        dpi,
        max_pixels: config.splitter.max_pixels,
        pages,
        skip: std::collections::HashSet::new(),
        text: true,
    });
    let mut out = Vec::new();
    while let Some(ev) = events.recv().await {
        match ev {
            RenderEvent::Page(p) => out.push(p),
            RenderEvent::Opened { .. } => {}
            other => panic!("rendering {} failed: {other:?}", pdf.display()),
        }
    }
    out
}

/// A copy of the PDF `src` with the line `marker` appended (what the render
/// worker's test-only faults look for), as `dir/name`.
pub fn with_marker(src: &Path, marker: &str, dir: &Path, name: &str) -> PathBuf {
    let mut bytes = std::fs::read(src).unwrap();
    bytes.extend_from_slice(format!("\n{marker}\n").as_bytes());
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A JSON file (a result, a manifest), its path named if it cannot be read.
pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
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

/// A one-page born-digital PDF (US Letter width, 4 inches high) with
/// `lines` in 28-point Helvetica: a text layer, and glyphs OCR can read.
pub fn text_pdf(lines: &[&str]) -> Vec<u8> {
    let mut content = String::from("BT /F1 28 Tf 36 240 Td 34 TL\n");
    for l in lines {
        let escaped = l.replace('\\', "\\\\").replace('(', "\\(").replace(')', "\\)");
        content.push_str(&format!("({escaped}) Tj T*\n"));
    }
    content.push_str("ET\n");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 288] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_string(),
        format!("<< /Length {} >>\nstream\n{content}endstream", content.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".to_string(),
    ];
    let mut pdf = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
    }
    let xref = pdf.len();
    pdf.extend_from_slice(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for o in offsets {
        pdf.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
    }
    pdf.extend_from_slice(
        format!("trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n", objects.len() + 1).as_bytes(),
    );
    pdf
}

/// For each of `pdfs`, the words of each page's text layer as the
/// splitter reads them at `dpi` (0 for a page without one), without
/// rendering. pdfium binds once per process: one call per test.
pub fn text_layer_word_counts(pdfs: &[PathBuf], dpi: f32) -> Vec<Vec<usize>> {
    use pagestream_splitter::render::{bind, fit_size};
    let cfg = pagestream_splitter::SplitterConfig::default();
    let pdfium = bind(&cfg.pdfium_library).expect("libpdfium binds (scripts/setup)");
    pdfs.iter()
        .map(|pdf| {
            let doc = pdfium.load_pdf_from_file(pdf, None).expect("the PDF opens");
            doc.pages()
                .iter()
                .map(|page| {
                    let (w, h, _) = fit_size(page.width().value, page.height().value, dpi, cfg.max_pixels);
                    let text = pagestream_splitter::text::page_text(&page, w, h).expect("the text layer reads");
                    text.map_or(0, |t| t.words.len())
                })
                .collect()
        })
        .collect()
}
