//! The API client commands: submit, status, list, results, cancel, and the
//! live progress display shared with `pagestream demo`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use pagestream::client::{is_terminal, Answer, ApiClient};
use pagestream_pipeline::progress::DocState;
use pagestream_schemas::{OcrMode, Priority, SubmitOptions, SubmitRequest};
use serde_json::Value;

const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// Where the API is and how to talk to it: every client command takes these.
#[derive(clap::Args, Debug)]
pub struct ApiArgs {
    /// Base URL of the service
    #[arg(long, env = "PAGESTREAM_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// API token (sent as a Bearer token)
    #[arg(long, env = "PAGESTREAM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of a CA to trust for an https:// URL (and presigned links),
    /// besides the system's roots
    #[arg(long, env = "PAGESTREAM_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
    /// Print the API's JSON instead of text
    #[arg(long)]
    pub json: bool,
}

impl ApiArgs {
    fn client(&self) -> Result<ApiClient> {
        ApiClient::new(self.url.clone()).with_token(self.token.clone()).with_ca_cert(self.ca_cert.as_deref())
    }
}

/// A command on one document.
#[derive(clap::Args, Debug)]
pub struct IdArgs {
    /// The document id (as `submit` printed it)
    pub id: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `--priority`: the names `schemas::Priority` defines (listed in help and
/// completions).
fn priority_parser() -> impl clap::builder::TypedValueParser<Value = Priority> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(Priority::ALL.map(Priority::as_str))
        .map(|s| Priority::parse(&s).expect("one of Priority::ALL"))
}

/// `--ocr`: the modes `schemas::OcrMode` defines.
fn ocr_parser() -> impl clap::builder::TypedValueParser<Value = OcrMode> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(["auto", "always", "never"])
        .map(|s| OcrMode::parse(&s).expect("one of OcrMode's names"))
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// PDF files to upload, or documents by reference for the service to
    /// fetch (`s3://bucket/key`, `https://…`)
    #[arg(required = true, value_name = "FILE|URL")]
    pub files: Vec<PathBuf>,
    /// Follow each document to its end with a live progress bar (plain
    /// lines, one per change, when stderr is not a terminal)
    #[arg(long)]
    pub watch: bool,
    /// Title (default: the file name)
    #[arg(long)]
    pub title: Option<String>,
    /// Rendering resolution (10..=1200; default: the service's)
    #[arg(long)]
    pub dpi: Option<f32>,
    /// Model (default: the service's default model)
    #[arg(long)]
    pub model: Option<String>,
    /// Accept the document even when no live inferencer serves the model
    /// now; it waits for one
    #[arg(long)]
    pub wait_for_model: bool,
    /// Scheduling priority
    #[arg(long, value_parser = priority_parser())]
    pub priority: Option<Priority>,
    /// Which pages OCR reads: auto (those without a text layer), always,
    /// never (default: the service's, auto unless configured)
    #[arg(long, value_parser = ocr_parser())]
    pub ocr: Option<OcrMode>,
    /// Idempotency-Key: a retried submission with the same key returns the
    /// same document
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    #[command(flatten)]
    pub api: ApiArgs,
}

impl SubmitArgs {
    /// The submission the flags describe, typed as clap parsed them (the
    /// title goes apart: an upload's defaults to its file name).
    pub fn request(&self) -> SubmitRequest {
        SubmitRequest {
            title: None,
            filename: None,
            options: SubmitOptions {
                dpi: self.dpi,
                model: self.model.clone(),
                priority: self.priority,
                wait_for_model: self.wait_for_model.then_some(true),
                ocr: self.ocr,
                ..SubmitOptions::default()
            },
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only documents in this state (queued, running, completed, …)
    #[arg(long, value_name = "STATE")]
    pub status: Option<String>,
    /// At most this many documents
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(clap::Args, Debug)]
pub struct ResultsArgs {
    /// The document id
    pub id: String,
    /// Download the manifest, page images and detections into DIR/<id>/
    #[arg(long, value_name = "DIR")]
    pub download: Option<PathBuf>,
    /// Follow a running document until it finishes: print one JSON line per
    /// page as it lands (with its detections), or with --download write
    /// each page's files as they land
    #[arg(long)]
    pub follow: bool,
    /// `json`: the results listing; `coco`: one COCO detection file (with
    /// --download, written as DIR/<id>/coco.json); `markdown`: the text in
    /// reading order; `chunks`: JSON Lines for retrieval, one chunk per
    /// region (with --follow, both print each page as soon as the pages
    /// before it are done)
    #[arg(long, value_enum, default_value_t = ResultsFormat::Json)]
    pub format: ResultsFormat,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultsFormat {
    Json,
    Coco,
    Markdown,
    Chunks,
}

impl ResultsFormat {
    /// The text exports (printed as they come, in page order).
    fn is_text(self) -> bool {
        matches!(self, ResultsFormat::Markdown | ResultsFormat::Chunks)
    }

    fn name(self) -> &'static str {
        match self {
            ResultsFormat::Json => "json",
            ResultsFormat::Coco => "coco",
            ResultsFormat::Markdown => "markdown",
            ResultsFormat::Chunks => "chunks",
        }
    }
}

/// Runs `f` and says which service it was talking to when it fails.
async fn talking<F: std::future::Future<Output = Result<i32>>>(api: &ApiArgs, f: F) -> Result<i32> {
    f.await.with_context(|| format!("talking to {}", api.url))
}

pub async fn status(a: &IdArgs) -> Result<i32> {
    talking(&a.api, show(&a.api, &format!("/v1/documents/{}", a.id), print_status)).await
}

pub async fn models(a: &ApiArgs) -> Result<i32> {
    talking(a, show(a, "/v1/models", print_models)).await
}

pub async fn list(a: &ListArgs) -> Result<i32> {
    talking(&a.api, list_documents(a)).await
}

pub async fn cancel(a: &IdArgs) -> Result<i32> {
    talking(&a.api, cancel_document(&a.api, &a.id)).await
}

pub async fn results(a: &ResultsArgs) -> Result<i32> {
    talking(&a.api, document_results(a)).await
}

pub async fn submit(a: &SubmitArgs) -> Result<i32> {
    talking(&a.api, submit_files(a)).await
}

/// The API's error, as one line.
fn api_error(ans: &Answer) -> String {
    match ans.json["error"]["message"].as_str() {
        Some(m) => format!("HTTP {} {}: {m}", ans.status.as_u16(), ans.json["error"]["code"].as_str().unwrap_or("")),
        None => format!("HTTP {}: {}", ans.status.as_u16(), ans.json),
    }
}

/// Prints the API's error when `ans` is not a success; true then.
fn report_error(ans: &Answer) -> bool {
    if ans.status.is_success() {
        return false;
    }
    eprintln!("error: {}", api_error(ans));
    true
}

async fn show(a: &ApiArgs, path: &str, print: fn(&Value)) -> Result<i32> {
    let ans = a.client()?.get(path).await?;
    if report_error(&ans) {
        return Ok(1);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ans.json)?);
    } else {
        print(&ans.json);
    }
    Ok(0)
}

/// One line per live model: name (default marked), replicas, backends,
/// devices, weights.
fn print_models(v: &Value) {
    let default = v["default"].as_str().unwrap_or("");
    let models = v["models"].as_array().cloned().unwrap_or_default();
    if models.is_empty() {
        println!("no model is served right now (no live inferencer); default model: {default}");
        return;
    }
    println!("{:<24} {:>8}  {:<10} {:<8} weights", "MODEL", "REPLICAS", "BACKENDS", "DEVICES");
    let join = |x: &Value| {
        x.as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(",")).unwrap_or_default()
    };
    for m in &models {
        let name = m["name"].as_str().unwrap_or("?");
        let mark = if name == default { " (default)" } else { "" };
        let canary = m["canary_replicas"].as_u64().unwrap_or(0);
        let replicas =
            if canary > 0 { format!("{} ({canary} canary)", m["replicas"]) } else { m["replicas"].to_string() };
        let weights: Vec<String> = m["sha256"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(|s| s.chars().take(12).collect()).collect())
            .unwrap_or_default();
        println!(
            "{:<24} {:>8}  {:<10} {:<8} {}",
            format!("{name}{mark}"),
            replicas,
            join(&m["backends"]),
            join(&m["devices"]),
            weights.join(",")
        );
    }
    if !models.iter().any(|m| m["name"] == default) {
        println!("default model {default} is not served right now");
    }
}

fn print_status(st: &Value) {
    let p = &st["pages"];
    println!("{}  {}", clean(st["id"].as_str().unwrap_or("?")), clean(st["title"].as_str().unwrap_or("")));
    println!("  state:    {}", st["state"].as_str().unwrap_or("?"));
    if let Some(m) = st["waiting_for_model"].as_str() {
        println!("  waiting:  for an inferencer serving model {m}");
    }
    println!(
        "  pages:    {} total · rendered {} · inferred {} · uploaded {} · failed {}",
        st["page_count"], p["rendered"], p["inferred"], p["uploaded"], p["failed"]
    );
    for f in st["failed_pages"].as_array().into_iter().flatten() {
        println!(
            "  failed page {}: {} ({})",
            f["page"],
            clean(f["error"]["message"].as_str().unwrap_or("")),
            clean(f["error"]["code"].as_str().unwrap_or(""))
        );
    }
    if let Some(e) = st["error"]["message"].as_str() {
        println!("  error:    {}", clean(e));
    }
    for (k, label) in [("queued_at", "queued"), ("started_at", "started"), ("finished_at", "finished")] {
        if let Some(t) = st[k].as_str() {
            println!("  {label:<9} {t}");
        }
    }
    if let Some(stages) = st["timings"]["per_page_ms"].as_object() {
        let parts: Vec<String> =
            stages.iter().map(|(stage, t)| format!("{stage} {:.0} ms", t["mean_ms"].as_f64().unwrap_or(0.0))).collect();
        if !parts.is_empty() {
            println!("  per page: {}", parts.join(" · "));
        }
    }
    if let Some(m) = st["manifest"].as_str() {
        println!("  manifest: {m}");
    }
}

async fn list_documents(a: &ListArgs) -> Result<i32> {
    let mut query = Vec::new();
    if let Some(v) = &a.status {
        query.push(format!("status={}", pagestream::client::encode_query(v)));
    }
    if let Some(n) = a.limit {
        query.push(format!("limit={n}"));
    }
    let ans = a.api.client()?.get(&format!("/v1/documents?{}", query.join("&"))).await?;
    if report_error(&ans) {
        return Ok(1);
    }
    if a.api.json {
        println!("{}", serde_json::to_string_pretty(&ans.json)?);
        return Ok(0);
    }
    println!("{:<32}  {:<21}  {:>5}  {:>5}  title", "id", "state", "pages", "done");
    for d in ans.json["documents"].as_array().into_iter().flatten() {
        let done = d["pages"]["uploaded"].as_u64().unwrap_or(0) + d["pages"]["failed"].as_u64().unwrap_or(0);
        println!(
            "{:<32}  {:<21}  {:>5}  {:>5}  {}",
            clean(d["id"].as_str().unwrap_or("?")),
            clean(d["state"].as_str().unwrap_or("?")),
            d["page_count"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
            done,
            clean(d["title"].as_str().unwrap_or(""))
        );
    }
    if let Some(c) = ans.json["next_cursor"].as_str() {
        println!("(more: the API's ?cursor={c})");
    }
    Ok(0)
}

async fn cancel_document(a: &ApiArgs, id: &str) -> Result<i32> {
    let ans = a.client()?.delete(&format!("/v1/documents/{id}")).await?;
    if report_error(&ans) {
        return Ok(1);
    }
    let p = &ans.json["pages"];
    println!("{id}: cancelled ({} pages uploaded before the cancellation are kept)", p["uploaded"]);
    Ok(0)
}

async fn document_results(a: &ResultsArgs) -> Result<i32> {
    let (id, client) = (&a.id, a.api.client()?);
    let path = format!("/v1/documents/{id}/results");
    if a.follow {
        return follow_results(a, &client, &path).await;
    }
    if a.format == ResultsFormat::Coco {
        let ans = client.get(&format!("{path}?format=coco")).await?;
        if report_error(&ans) {
            return Ok(1);
        }
        return write_coco(a, &ans.json).await;
    }
    if a.format.is_text() {
        return write_export(a, &client, &path).await;
    }
    let ans = client.get(&path).await?;
    if report_error(&ans) {
        return Ok(1);
    }
    let m = &ans.json;
    let Some(dir) = &a.download else {
        if a.api.json {
            println!("{}", serde_json::to_string_pretty(m)?);
        } else {
            let state = m["status"].as_str().or(m["state"].as_str()).unwrap_or("?");
            let total = m["page_count"].as_u64().map_or("?".to_string(), |n| n.to_string());
            println!("{id}: {} · {}/{total} pages done", clean(state), m["pages_done"]);
            for p in m["pages"].as_array().into_iter().flatten() {
                let detail = p["detections_url"].as_str().or(p["error"]["message"].as_str()).unwrap_or("");
                println!(
                    "  page {:>4}  {:<9} {}",
                    p["page"],
                    clean(p["status"].as_str().unwrap_or("?")),
                    clean(detail)
                );
            }
            if m["complete"] == false {
                println!("(still running: `pagestream results {id} --follow` prints pages as they land)");
            }
        }
        return Ok(0);
    };
    let dir = dir.join(id);
    tokio::fs::create_dir_all(dir.join("pages")).await.with_context(|| format!("creating {}", dir.display()))?;
    let mut files = 0;
    for p in m["pages"].as_array().into_iter().flatten() {
        files += download_page(&client, p, &dir).await?;
    }
    if m["complete"] == false {
        println!("{id}: still running; {files} files of the pages done so far written to {}", dir.display());
        return Ok(0);
    }
    // The manifest as written, with relative links that match the download.
    download(&client, &format!("{path}/manifest.json"), &dir.join("manifest.json")).await?;
    println!("{id}: {} files and manifest.json written to {}", files, dir.display());
    Ok(0)
}

/// Prints the Markdown or chunks export of the pages so far, or writes it
/// as DIR/<id>/<id>.md / <id>.chunks.jsonl.
async fn write_export(a: &ResultsArgs, client: &ApiClient, path: &str) -> Result<i32> {
    let (status, body) = client.get_bytes(&format!("{path}?format={}", a.format.name())).await?;
    if !status.is_success() {
        let json: Value = serde_json::from_slice(&body).unwrap_or_default();
        report_error(&pagestream::client::Answer { status, json });
        return Ok(1);
    }
    let Some(dir) = &a.download else {
        use std::io::Write as _;
        std::io::stdout().lock().write_all(&body)?;
        return Ok(0);
    };
    let dir = dir.join(&a.id);
    tokio::fs::create_dir_all(&dir).await.with_context(|| format!("creating {}", dir.display()))?;
    let ext = if a.format == ResultsFormat::Markdown { "md" } else { "chunks.jsonl" };
    let to = dir.join(format!("{}.{ext}", a.id));
    tokio::fs::write(&to, &body).await.with_context(|| format!("writing {}", to.display()))?;
    println!("{}: {} written to {}", a.id, a.format.name(), to.display());
    Ok(0)
}

/// `results --follow --format markdown|chunks`: pages are printed in page
/// order, each as soon as every page before it is done (a failed page is
/// a Markdown comment, no chunk).
#[derive(Default)]
struct InOrder {
    /// Finished pages not printed yet: `None` for a page without results.
    waiting: std::collections::BTreeMap<u64, Option<pagestream_results::PageResult>>,
    next: u64,
    started: bool,
}

impl InOrder {
    /// Prints what can be printed; with `all`, every page still waiting.
    fn flush(&mut self, format: ResultsFormat, doc_id: &str, title: Option<&str>, all: bool) -> Result<()> {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if !self.started && format == ResultsFormat::Markdown {
            out.write_all(pagestream_results::export::markdown_document_header(title).as_bytes())?;
        }
        self.started = true;
        self.next = self.next.max(1);
        while let Some(entry) = self.waiting.first_entry() {
            if *entry.key() != self.next && !all {
                break;
            }
            let (n, page) = entry.remove_entry();
            self.next = n + 1;
            match (format, page) {
                (ResultsFormat::Markdown, Some(p)) => {
                    out.write_all(pagestream_results::export::markdown_page(&p).as_bytes())?
                }
                (ResultsFormat::Markdown, None) => writeln!(out, "<!-- page {n}: no results -->\n")?,
                (_, Some(p)) => {
                    for chunk in pagestream_results::export::chunks_page(doc_id, &p) {
                        writeln!(out, "{}", serde_json::to_string(&chunk)?)?;
                    }
                }
                (_, None) => {}
            }
        }
        out.flush()?;
        Ok(())
    }
}

/// Prints the COCO file, or writes it as DIR/<id>/coco.json.
async fn write_coco(a: &ResultsArgs, coco: &Value) -> Result<i32> {
    let Some(dir) = &a.download else {
        println!("{}", serde_json::to_string_pretty(coco)?);
        return Ok(0);
    };
    let dir = dir.join(&a.id);
    tokio::fs::create_dir_all(&dir).await.with_context(|| format!("creating {}", dir.display()))?;
    let to = dir.join("coco.json");
    tokio::fs::write(&to, serde_json::to_vec_pretty(coco)?)
        .await
        .with_context(|| format!("writing {}", to.display()))?;
    println!("{}: COCO file written to {}", a.id, to.display());
    Ok(0)
}

/// Downloads a listed page's image and detections into `dir`; the number
/// of files written.
async fn download_page(client: &ApiClient, p: &Value, dir: &Path) -> Result<usize> {
    let mut files = 0;
    for (rel, url) in [("image", "image_url"), ("detections", "detections_url")] {
        if let (Some(rel), Some(url)) = (p[rel].as_str(), p[url].as_str()) {
            download(client, url, &dir.join(inside(rel)?)).await?;
            files += 1;
        }
    }
    Ok(files)
}

/// How often `results --follow` asks for new pages.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Polls `results --follow` waits for the manifest once the document has
/// ended (the uploader writes it last), before it says there is none.
const FOLLOW_MANIFEST_GRACE: u32 = 10;

/// Server errors in a row `results --follow` waits through (30 s).
const FOLLOW_SERVER_ERRORS: u32 = 60;

/// `results ID --follow`: until the document finishes (its manifest is
/// written), each newly finished page once, in the order they land: a JSON
/// line on stdout (the page's entry with `doc_id` and, for a page with
/// results, its `width`, `height`, `model` and `detections`), or its files
/// with `--download`. The summary goes to stderr, so stdout stays JSONL.
/// Exits 1 with the reason when the document ended `failed` or `cancelled`
/// (with or without a manifest: `manifest_unwritten`, a document that
/// failed before it was split).
async fn follow_results(a: &ResultsArgs, client: &ApiClient, path: &str) -> Result<i32> {
    use std::io::Write as _;
    let id = &a.id;
    let dir = a.download.as_ref().map(|d| d.join(id));
    if let Some(dir) = &dir {
        tokio::fs::create_dir_all(dir.join("pages")).await.with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut seen = std::collections::HashSet::new();
    let mut in_order = InOrder::default();
    let (mut files, mut failures, mut ended_polls, mut server_errors) = (0, 0, 0, 0);
    loop {
        let ans = client.get(path).await?;
        if ans.status.is_server_error() && server_errors < FOLLOW_SERVER_ERRORS {
            // The result store may be down; the document's status says
            // whether it has ended anyway.
            server_errors += 1;
            let st = client.get(&format!("/v1/documents/{id}")).await?;
            let state = st.json["state"].as_str().unwrap_or("");
            if DocState::parse(state).is_some_and(|s| s.is_terminal() && !s.succeeded()) {
                return ended_without_results(client, id, state, seen.len(), failures).await;
            }
            tokio::time::sleep(FOLLOW_EVERY).await;
            continue;
        }
        if report_error(&ans) {
            return Ok(1);
        }
        server_errors = 0;
        let m = &ans.json;
        for p in m["pages"].as_array().into_iter().flatten() {
            let Some(n) = p["page"].as_u64() else { continue };
            if !seen.insert(n) {
                continue;
            }
            if p["status"] != "ok" {
                failures += 1;
            }
            if a.format == ResultsFormat::Coco {
                continue;
            }
            if a.format.is_text() && dir.is_none() {
                let page = match p["detections_url"].as_str() {
                    Some(url) => Some(
                        serde_json::from_value::<pagestream_results::PageResult>(fetch_json(client, url).await?)
                            .context("a page result")?,
                    ),
                    None => None,
                };
                in_order.waiting.insert(n, page);
                continue;
            }
            match &dir {
                Some(dir) => files += download_page(client, p, dir).await?,
                None => {
                    let mut line = p.clone();
                    line["doc_id"] = id.as_str().into();
                    if let Some(url) = p["detections_url"].as_str() {
                        let page = fetch_json(client, url).await?;
                        for field in ["width", "height", "dpi", "model", "detections"] {
                            line[field] = page[field].clone();
                        }
                    }
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{line}")?;
                    out.flush()?;
                }
            }
        }
        if a.format.is_text() && dir.is_none() {
            in_order.flush(a.format, id, m["title"].as_str(), m["complete"] == true)?;
        }
        let state = m["state"].as_str().unwrap_or("");
        if m["complete"] != true && is_terminal(state) {
            ended_polls += 1;
            if ended_polls > FOLLOW_MANIFEST_GRACE {
                return ended_without_results(client, id, state, seen.len(), failures).await;
            }
        }
        if m["complete"] == true {
            let status = m["status"].as_str().unwrap_or("?");
            let (ended, failed) = how_it_ended(state, status);
            let state = status;
            if a.format == ResultsFormat::Coco {
                let ans = client.get(&format!("{path}?format=coco")).await?;
                if report_error(&ans) {
                    return Ok(1);
                }
                let code = write_coco(a, &ans.json).await?;
                if failed {
                    return ended_without_results(client, id, ended, seen.len(), failures).await;
                }
                return Ok(code);
            }
            if let Some(dir) = &dir {
                download(client, &format!("{path}/manifest.json"), &dir.join("manifest.json")).await?;
                eprintln!("{id}: {state}; {files} files and manifest.json written to {}", dir.display());
            } else if !failed {
                eprintln!("{id}: {ended}; {} pages ({failures} without results)", seen.len());
            }
            if failed {
                return ended_without_results(client, id, ended, seen.len(), failures).await;
            }
            return Ok(0);
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// How a document whose manifest is complete ended, and whether without
/// results (`failed`, `cancelled`): its status's `state` once terminal, else
/// the manifest's own `status` — the manifest can be written a moment before
/// the document's status records the end (`state` still `running`).
fn how_it_ended<'a>(state: &'a str, manifest_status: &'a str) -> (&'a str, bool) {
    let ended = match DocState::parse(state) {
        Some(s) if s.is_terminal() => state,
        _ => manifest_status,
    };
    (ended, DocState::parse(ended).is_some_and(|s| !s.succeeded()))
}

/// `results --follow` of a document that ended `failed` or `cancelled`:
/// the reason (from its status) on stderr, exit code 1.
async fn ended_without_results(
    client: &ApiClient,
    id: &str,
    state: &str,
    pages: usize,
    failures: usize,
) -> Result<i32> {
    let st = client.get(&format!("/v1/documents/{id}")).await?;
    let error = &st.json["error"];
    let reason = match (error["code"].as_str(), error["message"].as_str()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_string(),
        _ => "no reason given".to_string(),
    };
    eprintln!("{id}: {} ({}); {pages} pages ({failures} without results)", clean(state), clean(&reason));
    Ok(1)
}

/// A JSON document at `url` (an API path, or an absolute presigned URL).
async fn fetch_json(client: &ApiClient, url: &str) -> Result<Value> {
    let bytes = get_url(client, url).await?;
    serde_json::from_slice(&bytes).with_context(|| format!("{url} is not JSON"))
}

/// Text from the server made safe for a terminal: control characters
/// (escape sequences among them) become `\u{fffd}`.
fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect()
}

/// A relative path from a manifest, checked to stay inside the download
/// directory (no absolute path, no `..`, no prefix).
fn inside(rel: &str) -> Result<PathBuf> {
    let path = Path::new(rel);
    let plain = path.components().all(|c| matches!(c, std::path::Component::Normal(_)));
    anyhow::ensure!(plain && !rel.is_empty(), "the manifest names a file outside the download directory: {rel:?}");
    Ok(path.to_path_buf())
}

/// The body at `url` (an API path, or an absolute presigned URL).
async fn get_url(client: &ApiClient, url: &str) -> Result<bytes::Bytes> {
    let (status, bytes) = if url.starts_with('/') {
        client.get_bytes(url).await?
    } else {
        // A presigned S3 URL: no API token, its own host.
        let (base, path) = split_url(url).with_context(|| format!("unsupported result URL {url}"))?;
        client.at(base).get_bytes(&path).await?
    };
    anyhow::ensure!(status.is_success(), "downloading {url}: HTTP {status}");
    Ok(bytes)
}

/// Downloads `url` (an API path, or an absolute presigned URL) to `to`.
async fn download(client: &ApiClient, url: &str, to: &Path) -> Result<()> {
    let bytes = get_url(client, url).await?;
    let tmp = to.with_extension("part");
    tokio::fs::write(&tmp, &bytes).await.with_context(|| format!("writing {}", tmp.display()))?;
    tokio::fs::rename(&tmp, to).await.with_context(|| format!("writing {}", to.display()))?;
    Ok(())
}

/// `http(s)://host:port/path?q` → (`http(s)://host:port`, `/path?q`).
fn split_url(url: &str) -> Option<(String, String)> {
    let scheme = ["http://", "https://"].into_iter().find(|s| url.starts_with(s))?;
    let rest = &url[scheme.len()..];
    let slash = rest.find(['/', '?']).unwrap_or(rest.len());
    let path = &rest[slash..];
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    Some((format!("{scheme}{}", &rest[..slash]), path))
}

async fn submit_files(a: &SubmitArgs) -> Result<i32> {
    let client = a.api.client()?;
    let request = a.request();
    // Sent as the API reads them back: query parameters for an upload, a
    // JSON object (typed values) for a document by reference.
    let options = request.option_fields();
    let json_options = serde_json::to_value(&request.options).context("encoding the options")?;
    let mut docs = Vec::new();
    let mut rejected = 0;
    for path in &a.files {
        let shown = path.display().to_string();
        let by_reference = ["s3://", "https://", "http://"].iter().any(|p| shown.starts_with(p));
        let name = if by_reference {
            shown.clone()
        } else {
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| shown.clone())
        };
        if !by_reference && !path.is_file() {
            eprintln!("✗ {shown}: not a file (or a s3:// / https:// URL)");
            rejected += 1;
            continue;
        }
        let ans = if by_reference {
            let body = serde_json::json!({"url": shown, "title": a.title, "options": json_options});
            client.post_json("/v1/documents", &body, a.idempotency_key.as_deref()).await?
        } else {
            client.submit_file_with(path, a.title.as_deref(), &options, a.idempotency_key.as_deref()).await?
        };
        if ans.status.as_u16() == 202 {
            let id = ans.json["id"].as_str().unwrap_or_default().to_string();
            if a.api.json {
                println!("{}", ans.json);
            } else {
                println!("{id}  {name}");
            }
            docs.push((id, name));
        } else {
            eprintln!("✗ {name}: {}", api_error(&ans));
            rejected += 1;
        }
    }
    if !a.watch || docs.is_empty() {
        return Ok(i32::from(rejected > 0));
    }
    let statuses = watch(&client, &docs).await;
    let mut bad = rejected;
    for (id, name) in &docs {
        let st = &statuses[id];
        let state = st["state"].as_str().unwrap_or("unknown");
        bad += usize::from(!pagestream::client::doc_state(st).is_some_and(DocState::succeeded));
        let mut line = format!("{name}: {state}, {} pages", st["page_count"].as_u64().unwrap_or(0));
        if let Some(err) = st["error"]["message"].as_str() {
            line += &format!(" — {err}");
        }
        eprintln!("{line}");
    }
    Ok(i32::from(bad > 0))
}

/// Follows every document's event stream until each is terminal, drawing
/// one progress bar per document (redrawn in place on a terminal, one line
/// per state change otherwise). Returns each document's final status.
pub async fn watch(client: &ApiClient, docs: &[(String, String)]) -> BTreeMap<String, Value> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Value)>();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (id, _)) in docs.iter().enumerate() {
        let (client, id, tx) = (client.clone(), id.clone(), tx.clone());
        tasks.spawn(async move {
            let outcome = client
                .follow_events(&id, |ev| {
                    let _ = tx.send((i, ev.data.clone()));
                })
                .await;
            if let Err(e) = outcome {
                let _ = tx.send((i, serde_json::json!({"state": "unknown", "error": {"message": format!("{e:#}")}})));
            }
        });
    }
    drop(tx);
    // On a terminal, one live bar per document (indicatif); otherwise one
    // plain line per state change, readable in a log or through `| cat`.
    let bars = std::io::stderr().is_terminal().then(|| progress_bars(docs));
    let mut latest: Vec<Option<Value>> = vec![None; docs.len()];
    while let Some((i, data)) = rx.recv().await {
        let state_changed = latest[i].as_ref().map(|v| &v["state"]) != Some(&data["state"]);
        match &bars {
            Some(bars) => {
                let (done, total) = page_progress(&data);
                if let Some(n) = total {
                    bars[i].set_length(n);
                }
                bars[i].set_position(done);
                bars[i].set_message(state_detail(&data));
            }
            None if state_changed => eprintln!("{}", progress_line(&docs[i].1, Some(&data))),
            None => {}
        }
        latest[i] = Some(data);
    }
    for bar in bars.iter().flatten() {
        bar.finish();
    }
    while tasks.join_next().await.is_some() {}
    let mut out = BTreeMap::new();
    for (i, (id, _)) in docs.iter().enumerate() {
        let status = match client.get(&format!("/v1/documents/{id}")).await {
            Ok(ans) if ans.status.is_success() => ans.json,
            _ => latest[i].clone().unwrap_or(Value::Null),
        };
        out.insert(id.clone(), status);
    }
    out
}

fn progress_bars(docs: &[(String, String)]) -> Vec<indicatif::ProgressBar> {
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:<28} {bar:24} {pos:>4}/{len:<4} {wide_msg}")
        .expect("progress template")
        .progress_chars("█░");
    docs.iter()
        .map(|(_, name)| {
            let bar = multi.add(indicatif::ProgressBar::new(0).with_style(style.clone()));
            bar.set_prefix(clean(name));
            bar.set_message("submitted");
            bar
        })
        .collect()
}

/// Pages with an outcome (uploaded or failed), and the page count if known.
fn page_progress(st: &Value) -> (u64, Option<u64>) {
    let p = &st["pages"];
    (p["uploaded"].as_u64().unwrap_or(0) + p["failed"].as_u64().unwrap_or(0), st["page_count"].as_u64())
}

/// `running · rendered 20 · inferred 18 · failed 1 — reason`
fn state_detail(st: &Value) -> String {
    let p = &st["pages"];
    let state = st["state"].as_str().unwrap_or("?");
    let mut line = clean(state);
    if !is_terminal(state) {
        line += &format!(" · rendered {} · inferred {}", p["rendered"], p["inferred"]);
    }
    if p["failed"].as_u64().unwrap_or(0) > 0 {
        line += &format!(" · failed {}", p["failed"]);
    }
    if let Some(e) = st["error"]["message"].as_str() {
        line += &format!(" — {}", clean(e));
    }
    line
}

/// `name  ██████░░░░░░  17/28  running · failed 1` (one line of the plain,
/// non-terminal progress output).
pub fn progress_line(name: &str, st: Option<&Value>) -> String {
    let Some(st) = st else {
        return format!("{name}: submitted");
    };
    let (done, total) = page_progress(st);
    const WIDTH: u64 = 24;
    let filled = match total {
        Some(n) if n > 0 => (done * WIDTH / n).min(WIDTH),
        _ => 0,
    };
    let bar: String = (0..WIDTH).map(|i| if i < filled { '█' } else { '░' }).collect();
    let total = total.map(|n| n.to_string()).unwrap_or_else(|| "?".into());
    format!("{:<28} {bar} {done:>4}/{total:<4} {}", clean(name), state_detail(st))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_and_urls() {
        let st = serde_json::json!({"state": "running", "page_count": 4, "pages": {"rendered": 4, "inferred": 3, "uploaded": 2, "failed": 0}});
        let line = progress_line("a.pdf", Some(&st));
        assert!(line.contains("2/4"), "{line}");
        assert_eq!(line.matches('█').count(), 12, "{line}");
        assert_eq!(
            split_url("http://127.0.0.1:9000/b/k.png?X-Amz=1"),
            Some(("http://127.0.0.1:9000".into(), "/b/k.png?X-Amz=1".into()))
        );
        assert_eq!(
            split_url("https://s3.example.com/b/k.png?X-Amz=1"),
            Some(("https://s3.example.com".into(), "/b/k.png?X-Amz=1".into()))
        );
        assert_eq!(split_url("https://h:8443?x=1"), Some(("https://h:8443".into(), "/?x=1".into())));
        assert_eq!(split_url("ftp://h/x"), None);
    }

    #[test]
    fn submit_flags_reach_the_api_as_one_typed_request() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            submit: SubmitArgs,
        }
        let parse = |args: &[&str]| <Cli as clap::Parser>::try_parse_from(args).map(|c| c.submit);
        let a = parse(&[
            "x",
            "--dpi",
            "150",
            "--model",
            "yolo_v8",
            "--priority",
            "low",
            "--wait-for-model",
            "--ocr",
            "never",
            "a.pdf",
        ])
        .unwrap();
        let request = a.request();
        assert_eq!(request.options.priority, Some(Priority::Low));
        assert_eq!(request.options.dpi, Some(150.0));
        // The API reads back what the CLI sends, as query fields or JSON.
        let mut back = SubmitRequest::default();
        back.set_all(request.option_fields()).unwrap();
        assert_eq!(back, request);
        let json = serde_json::to_value(&request.options).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"dpi": 150.0, "model": "yolo_v8", "priority": "low", "wait_for_model": true, "ocr": "never"})
        );
        // No flags: no options.
        assert_eq!(parse(&["x", "a.pdf"]).unwrap().request(), SubmitRequest::default());
        assert!(parse(&["x", "--priority", "urgent", "a.pdf"]).is_err());
        assert!(parse(&["x", "--ocr", "sometimes", "a.pdf"]).is_err());
    }

    #[test]
    fn a_complete_manifest_ahead_of_the_status_says_how_it_ended() {
        // The status still says running: the manifest decides.
        assert_eq!(how_it_ended("running", "completed"), ("completed", false));
        assert_eq!(how_it_ended("running", "completed_with_errors"), ("completed_with_errors", false));
        assert_eq!(how_it_ended("running", "failed"), ("failed", true));
        assert_eq!(how_it_ended("", "cancelled"), ("cancelled", true));
        // A terminal state sticks (a cancellation the manifest raced).
        assert_eq!(how_it_ended("cancelled", "completed"), ("cancelled", true));
        assert_eq!(how_it_ended("completed", "completed"), ("completed", false));
        // Neither known: not called a failure.
        assert_eq!(how_it_ended("running", "?"), ("?", false));
    }
}

#[cfg(test)]
mod safety_tests {
    use super::*;

    #[test]
    fn manifest_paths_stay_inside_and_text_is_cleaned() {
        assert_eq!(inside("pages/1.png").unwrap(), PathBuf::from("pages/1.png"));
        for bad in ["/etc/passwd", "../x", "pages/../../x", "", "./../x"] {
            assert!(inside(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(clean("a\u{1b}[31mb\n"), "a\u{fffd}[31mb\u{fffd}");
    }
}
