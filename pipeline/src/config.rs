//! Layered, typed configuration: embedded defaults → optional TOML file
//! (`--config FILE` or `PAGESTREAM_CONFIG`) → environment variables
//! `PAGESTREAM_<SECTION>_<KEY>` (e.g. `PAGESTREAM_SPLITTER_DPI=200`).
//!
//! Every problem is collected and reported at once ([`ConfigError`]); the
//! binaries exit with code 64 on it, before binding any port.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::util::list;

/// Exit code for invalid configuration (EX_USAGE).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Environment variables with the `PAGESTREAM_` prefix that are not
/// `<SECTION>_<KEY>` settings: tools and the CLI read them.
const RESERVED_ENV: &[&str] = &[
    "PAGESTREAM_CONFIG",
    "PAGESTREAM_DEPS",
    "PAGESTREAM_LOG",
    "PAGESTREAM_LOG_FORMAT",
    "PAGESTREAM_OTLP_ENDPOINT",
    "PAGESTREAM_BLESS",
    "PAGESTREAM_CORPUS",
    "PAGESTREAM_NATS_SERVER",
    "PAGESTREAM_URL",
    "PAGESTREAM_TOKEN",
    "PAGESTREAM_CA_CERT",
];

/// The whole configuration; each binary reads the sections it needs, so one
/// file can configure every stage.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub pipeline: PipelineConfig,
    pub nats: NatsConfig,
    pub ingress: IngressConfig,
    pub splitter: SplitterConfig,
    pub inferencer: InferencerConfig,
    pub uploader: UploaderConfig,
    pub notifier: NotifierConfig,
    /// Per-tenant (API token) limits and weights.
    pub tenants: crate::tenants::TenantsConfig,
}

/// Webhooks: the notifier stage delivers signed document and page events
/// (Standard Webhooks) to each document's `callback_url`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NotifierConfig {
    /// Signing secret, `whsec_<base64>` (Standard Webhooks). Empty:
    /// webhooks are off, and submissions with a `callback_url` are refused.
    pub secret: String,
    /// Webhook of documents submitted without `callback_url` (empty: none).
    pub callback_url: String,
    /// Events the default webhook gets: `document` or `page`.
    pub callback_events: pagestream_schemas::CallbackEvents,
    /// How long one event is retried (network errors, 5xx, 429) before it is given up.
    pub retry_for_secs: u64,
    /// Timeout of one delivery attempt.
    pub attempt_timeout_secs: u64,
    /// Deliveries in flight at once per notifier process.
    pub concurrency: usize,
    /// Deliveries in flight at once to one endpoint (scheme, host and
    /// port of the callback URL) per notifier process; more wait, scheduled.
    pub per_endpoint_concurrency: usize,
    /// Deliveries in flight at once for one tenant (the document's owner),
    /// all its endpoints together, per notifier process (0: no limit).
    pub per_owner_concurrency: usize,
    /// Consecutive failed attempts (one of them a retry, or over at least
    /// 5 s) that open an endpoint's circuit: its deliveries are then not attempted but
    /// scheduled for after `breaker_cooldown_secs`, when one probe is sent.
    pub breaker_failures: u32,
    /// How long an open circuit stays open before its probe.
    pub breaker_cooldown_secs: u64,
    /// Hosts (names or IP addresses) webhooks may reach although they are
    /// or resolve to private, loopback or link-local addresses.
    pub allow_private_hosts: Vec<String>,
    /// Base URL of the public API, making result links in webhooks
    /// absolute (empty: links are API paths).
    pub public_url: String,
    /// Address of /metrics, /livez, /readyz (empty: disabled).
    pub admin_addr: String,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        NotifierConfig {
            secret: String::new(),
            callback_url: String::new(),
            callback_events: pagestream_schemas::CallbackEvents::Document,
            retry_for_secs: 600,
            attempt_timeout_secs: 10,
            concurrency: 32,
            per_endpoint_concurrency: 4,
            per_owner_concurrency: 16,
            breaker_failures: 5,
            breaker_cooldown_secs: 30,
            allow_private_hosts: Vec::new(),
            public_url: String::new(),
            admin_addr: "127.0.0.1:9104".into(),
        }
    }
}

impl NotifierConfig {
    /// The HMAC key of `secret` (the bytes after `whsec_`, base64-decoded).
    pub fn signing_key(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        let b64 = self.secret.strip_prefix("whsec_")?;
        base64::engine::general_purpose::STANDARD.decode(b64).ok().filter(|k| !k.is_empty())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// NATS server URL, or the URLs of a cluster's nodes, comma separated
    /// (the client connects to one and fails over to the others).
    pub url: String,
    /// Copies JetStream keeps of every stream, consumer, key-value bucket and
    /// object store the pipeline creates: 1 on a single server, 3 on a
    /// 3-node cluster (it then survives the loss of one node). Streams and
    /// the object store follow a change at the next start; key-value
    /// buckets keep the count they were created with.
    pub replicas: usize,
    /// Prefix of every subject, stream and bucket (`[a-z0-9_-]`), so several
    /// pipelines can share one server.
    pub prefix: String,
    /// Deliveries of one message before it is dead-lettered.
    pub max_deliver: i64,
    /// Seconds a delivered message may stay unacknowledged before it is
    /// redelivered (a crashed worker's messages come back after this; busy
    /// workers extend it with in-progress acks).
    pub ack_wait_secs: u64,
    /// Seconds to wait for a connection at start-up.
    pub connect_timeout_secs: u64,
    /// Rendered pages waiting for or in inference per model, all documents
    /// together: the model's subject of the `<P>_PAGES` stream holds at most
    /// this many (JetStream refuses more; the splitter waits), so storage
    /// does not grow with page count.
    pub max_pages_in_flight: i64,
    /// Bytes the blob bucket (uploads waiting to be split, page images
    /// between stages) may hold, set when the bucket is created (0: no
    /// limit). Uploads that do not fit are refused with 507 `storage_full`
    /// instead of filling the disk under every stage.
    pub max_blob_bytes: u64,
    /// Bytes the events stream may hold (0: no limit); beyond it the oldest
    /// events go first (`discard: old`): the history of the oldest
    /// documents, never the pipeline's work.
    pub max_event_bytes: u64,
    /// Bytes the dead-letter stream may hold (0: no limit); oldest first.
    pub max_dead_letter_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// Address the HTTP API listens on.
    pub addr: String,
    /// Largest accepted upload, in bytes (HTTP 413 above).
    pub max_upload_bytes: u64,
    /// API tokens (a TOML list, or comma separated). When set, every `/v1`
    /// route requires `Authorization: Bearer <token>`; empty leaves the API open.
    #[serde(deserialize_with = "list")]
    pub api_tokens: Vec<String>,
    /// Admin tokens: like `api_tokens`, and they see every document (an API
    /// token sees only the documents it submitted, and those submitted on NATS).
    #[serde(deserialize_with = "list")]
    pub admin_tokens: Vec<String>,
    /// Longest wait for a client's request headers or next body chunk
    /// before the request is answered 408 and the connection closed.
    pub read_timeout_secs: u64,
    /// Lifetime of the presigned S3 URLs the results route hands out.
    pub results_url_ttl_secs: u64,
    /// Longest a multipart text field (title, options) may be, in bytes
    /// (HTTP 413 `field_too_large` above); the whole non-file part of a
    /// form (preamble, part headers, fields) may use at most 16 times this.
    pub max_field_bytes: u64,
    /// Open client connections at most; one more is answered
    /// 503 `too_many_connections` and closed.
    pub max_connections: usize,
    /// Longest a whole request may take, headers to last body byte
    /// (408 `request_timeout` after).
    pub request_timeout_secs: u64,
    /// An upload slower than this on average (after its first
    /// `read_timeout_secs`) is cut with 408 `upload_too_slow`; 0 turns the
    /// check off.
    pub min_upload_bytes_per_sec: u64,
    /// Live event streams (`/events`) open at once, all clients together
    /// (503 `too_many_streams` above).
    pub max_event_streams: usize,
    /// Live event streams one API token may hold open at once (0: only the
    /// global cap); without tokens, only the global cap applies.
    pub max_event_streams_per_token: usize,
    /// Host names the API answers to (`Host` header; 421
    /// `misdirected_request` otherwise, probes excepted): `host` (any
    /// port), `host:port`, `*.domain` or `*` (any). Empty: on a loopback
    /// address `localhost`, `127.0.0.1`, `[::1]` and the bound address;
    /// on any other address, any host. Defends against DNS rebinding.
    #[serde(deserialize_with = "list")]
    pub allowed_hosts: Vec<String>,
}

/// Parses one of a setting's choices (e.g. [`Device`]) from its name, as
/// the configuration would; the error lists the choices.
pub fn parse_choice<T: serde::de::DeserializeOwned>(name: &str) -> Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name)).map_err(|e| e.to_string())
}

/// Inference backend (`inferencer.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// ONNX Runtime, CPU or CUDA.
    Ort,
    /// tract, pure Rust, CPU.
    Tract,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Ort => "ort",
            Backend::Tract => "tract",
        }
    }
}

/// Where the model runs (`inferencer.device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    /// CUDA, or fail at start saying what is missing.
    Cuda,
    /// CUDA when usable, else the CPU (with a warning).
    Auto,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Auto => "auto",
        }
    }
}

/// Where results are written (`uploader.target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A local directory (`uploader.dir`).
    Local,
    /// An S3 bucket (`uploader.s3_*`).
    S3,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Local => "local",
            Target::S3 => "s3",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SplitterConfig {
    /// Rendering resolution when the submission does not set one.
    pub dpi: f32,
    /// Largest page bitmap in pixels; larger pages are rendered downscaled.
    pub max_pixels: u64,
    /// Documents with more pages fail with `too_many_pages`.
    pub max_pages: u32,
    /// Largest page image sent inline in a message; larger ones go to the blob store.
    pub inline_image_max_bytes: usize,
    /// Path to libpdfium.so (default: `<deps>/lib/libpdfium.so`).
    pub pdfium_library: PathBuf,
    /// Documents split at the same time by one process.
    pub concurrency: usize,
    /// Pages a normal-priority document renders per turn before it goes to
    /// the back of the queue (high: twice as many, low: half).
    pub chunk_pages: u32,
    /// Pages of one normal-priority document rendered and not yet uploaded
    /// (high: twice as many, low: half); its splitting waits above this.
    pub doc_pages_in_flight: u32,
    /// The `render-worker` executable that runs pdfium (empty: next to the
    /// running executable).
    pub render_worker: PathBuf,
    /// Longest the renderer may take to open a document or render one page;
    /// past it the worker is killed and the page fails `render_timeout`.
    pub render_timeout_secs: u64,
    /// Documents by reference (`source.url`): the largest one fetched.
    pub source_max_bytes: u64,
    /// Time to fetch one document by reference, first byte to last.
    pub source_timeout_secs: u64,
    /// Buckets an `s3://` source may name (empty: `s3://` sources are refused).
    pub source_s3_buckets: Vec<String>,
    /// S3 endpoint of `s3://` sources (MinIO, moto, …); empty for AWS.
    pub source_s3_endpoint: String,
    pub source_s3_region: String,
    pub source_s3_path_style: bool,
    /// Static credentials for `s3://` sources; empty: the standard AWS chain.
    pub source_s3_access_key_id: String,
    pub source_s3_secret_access_key: String,
    /// Hosts `http(s)://` sources may reach although they are (or resolve
    /// to) private, loopback or link-local addresses.
    pub source_allow_private_hosts: Vec<String>,
    /// Address-space limit of the render worker, in MiB (0: none); a PDF
    /// that needs more fails its page `render_crashed`.
    pub render_memory_mb: u64,
    /// Documents by reference fetched at once per process, in their own
    /// pool (never in a rendering worker).
    pub fetch_concurrency: usize,
    /// Fetches of one tenant (document owner) at once per process (0: only
    /// `fetch_concurrency`); its further ones wait.
    pub fetches_per_tenant: usize,
    /// Address of /metrics, /livez, /readyz (empty: disabled).
    pub admin_addr: String,
}

/// Settings of the whole pipeline, read where documents are accepted (the
/// ingress, and the splitter for documents published on NATS).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// The model of a document submitted without a `model` option (empty:
    /// `inferencer.model`). Decided once, when the document is accepted.
    pub default_model: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InferencerConfig {
    /// Model name: a manifest `models/<name>/model.toml`.
    pub model: String,
    /// Directory of model manifests (default: the repository's `models/`,
    /// else the manifests built into the binary).
    pub models_dir: PathBuf,
    /// Directory holding the ONNX weights (default: `<deps>/models`).
    pub weights_dir: PathBuf,
    /// Path to libonnxruntime.so (default: `<deps>/lib/libonnxruntime.so`).
    pub onnxruntime_library: PathBuf,
    /// Further models served besides `model` (a TOML list, or comma
    /// separated), so a document may pick one with its `model` option.
    #[serde(deserialize_with = "list")]
    pub models: Vec<String>,
    /// `ort` (ONNX Runtime) or `tract` (pure Rust).
    pub backend: Backend,
    /// `cpu`, `cuda` (fail at start if CUDA is unusable) or `auto` (CUDA
    /// when usable, else CPU). ONNX Runtime only.
    pub device: Device,
    /// CPU threads per model (0: one per core): ONNX Runtime uses them
    /// inside each run, tract runs that many pages side by side.
    pub threads: usize,
    /// ONNX Runtime on the CPU: sessions running pages side by side, the
    /// threads divided among them (0: one single-thread session per thread).
    pub ort_sessions: usize,
    /// Pages run as one batch when the model has a dynamic batch axis.
    pub batch_size: usize,
    /// Longest wait for a batch to fill once its first page arrived.
    pub batch_wait_ms: u64,
    /// Most detections kept per page (highest scores first).
    pub max_detections: usize,
    /// Serve the models with weights that may differ from the other live
    /// replicas of the same model names (a canary); without it such a
    /// replica refuses to start.
    pub canary: bool,
    /// Address of /metrics, /livez, /readyz (empty: disabled).
    pub admin_addr: String,
}

impl InferencerConfig {
    /// Every model this inferencer serves: `model` first, then `models`.
    pub fn served_models(&self) -> Vec<String> {
        let mut names = vec![self.model.clone()];
        for name in &self.models {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }
}

/// How to reach an S3-compatible service: what the uploader writes results
/// with (`uploader.s3_*`) and what the splitter reads `s3://` sources with
/// (`splitter.source_s3_*`). Not a config section of its own: each stage's
/// section keeps its flat keys (their environment variables are a
/// contract), and hands this out.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Connection {
    /// Custom endpoint (MinIO, moto, …); empty for AWS.
    pub endpoint: String,
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`).
    pub path_style: bool,
    /// Static credentials; empty: the standard AWS chain.
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Connection")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl UploaderConfig {
    /// The connection results are written with.
    pub fn s3_connection(&self) -> S3Connection {
        S3Connection {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            access_key_id: self.s3_access_key_id.clone(),
            secret_access_key: self.s3_secret_access_key.clone(),
        }
    }
}

impl SplitterConfig {
    /// The connection `s3://` sources are read with.
    pub fn source_s3_connection(&self) -> S3Connection {
        S3Connection {
            endpoint: self.source_s3_endpoint.clone(),
            region: self.source_s3_region.clone(),
            path_style: self.source_s3_path_style,
            access_key_id: self.source_s3_access_key_id.clone(),
            secret_access_key: self.source_s3_secret_access_key.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UploaderConfig {
    /// `local` (a directory) or `s3`.
    pub target: Target,
    /// Results directory for `target = "local"`.
    pub dir: PathBuf,
    /// Key prefix under which `<doc_id>/…` is written (both targets).
    pub prefix: String,
    pub s3_bucket: String,
    /// Custom endpoint (MinIO, moto, …); empty for AWS.
    pub s3_endpoint: String,
    pub s3_region: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3 servers other than AWS.
    pub s3_path_style: bool,
    /// Static credentials; empty: the standard AWS chain (env, profile, IMDS).
    pub s3_access_key_id: String,
    pub s3_secret_access_key: String,
    /// Pages written at the same time by one process.
    pub concurrency: usize,
    /// Address of /metrics, /livez, /readyz (empty: disabled).
    pub admin_addr: String,
}

impl NatsConfig {
    /// The server URLs of `url` (one, or a cluster's, comma separated).
    pub fn urls(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            replicas: 1,
            prefix: "pagestream".into(),
            max_deliver: 5,
            ack_wait_secs: 60,
            connect_timeout_secs: 10,
            max_pages_in_flight: 64,
            max_blob_bytes: 8 * 1024 * 1024 * 1024,
            max_event_bytes: 1024 * 1024 * 1024,
            max_dead_letter_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            addr: "127.0.0.1:8080".into(),
            max_upload_bytes: 256 * 1024 * 1024,
            api_tokens: Vec::new(),
            admin_tokens: Vec::new(),
            read_timeout_secs: 30,
            results_url_ttl_secs: 3600,
            max_field_bytes: 64 * 1024,
            max_connections: 1024,
            request_timeout_secs: 3600,
            min_upload_bytes_per_sec: 16 * 1024,
            max_event_streams: 256,
            max_event_streams_per_token: 32,
            allowed_hosts: Vec::new(),
        }
    }
}

impl Default for SplitterConfig {
    fn default() -> Self {
        SplitterConfig {
            dpi: 150.0,
            max_pixels: 4096 * 4096,
            max_pages: 10_000,
            inline_image_max_bytes: 512 * 1024,
            pdfium_library: deps_dir().join("lib/libpdfium.so"),
            concurrency: 1,
            chunk_pages: 8,
            doc_pages_in_flight: 16,
            render_worker: PathBuf::new(),
            render_timeout_secs: 120,
            source_max_bytes: 256 * 1024 * 1024,
            source_timeout_secs: 300,
            source_s3_buckets: Vec::new(),
            source_s3_endpoint: String::new(),
            source_s3_region: "us-east-1".into(),
            source_s3_path_style: false,
            source_s3_access_key_id: String::new(),
            source_s3_secret_access_key: String::new(),
            source_allow_private_hosts: Vec::new(),
            render_memory_mb: 2048,
            fetch_concurrency: 4,
            fetches_per_tenant: 2,
            admin_addr: "127.0.0.1:9101".into(),
        }
    }
}

impl Default for InferencerConfig {
    fn default() -> Self {
        InferencerConfig {
            model: "layout_cdla".into(),
            models_dir: repo_models_dir(),
            weights_dir: deps_dir().join("models"),
            onnxruntime_library: deps_dir().join("lib/libonnxruntime.so"),
            models: Vec::new(),
            backend: Backend::Ort,
            device: Device::Cpu,
            threads: 0,
            ort_sessions: 0,
            batch_size: 1,
            batch_wait_ms: 20,
            max_detections: 500,
            canary: false,
            admin_addr: "127.0.0.1:9102".into(),
        }
    }
}

impl Default for UploaderConfig {
    fn default() -> Self {
        UploaderConfig {
            target: Target::Local,
            dir: PathBuf::from("out"),
            prefix: String::new(),
            s3_bucket: String::new(),
            s3_endpoint: String::new(),
            s3_region: "us-east-1".into(),
            s3_path_style: false,
            s3_access_key_id: String::new(),
            s3_secret_access_key: String::new(),
            concurrency: 4,
            admin_addr: "127.0.0.1:9103".into(),
        }
    }
}

/// Every problem found in the configuration sources.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.errors.len())?;
        for e in &self.errors {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The project-local dependency folder: `$PAGESTREAM_DEPS`, else the first
/// `.deps` found walking up from the executable, then from the working
/// directory, else `.deps`.
pub fn deps_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PAGESTREAM_DEPS") {
        return PathBuf::from(d);
    }
    find_upwards(".deps").unwrap_or_else(|| PathBuf::from(".deps"))
}

fn repo_models_dir() -> PathBuf {
    find_upwards("models/layout_cdla/model.toml")
        .and_then(|p| p.parent().and_then(Path::parent).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("models"))
}

fn find_upwards(rel: &str) -> Option<PathBuf> {
    let starts =
        [std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)), std::env::current_dir().ok()];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            let candidate = dir.join(rel);
            if candidate.exists() {
                return Some(candidate);
            }
        }
    }
    None
}

impl Config {
    /// The model of a document submitted without one: `pipeline.default_model`,
    /// else `inferencer.model`.
    pub fn default_model(&self) -> &str {
        if self.pipeline.default_model.is_empty() {
            &self.inferencer.model
        } else {
            &self.pipeline.default_model
        }
    }

    /// Loads defaults, then `file` (or `$PAGESTREAM_CONFIG`), then the process
    /// environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env_file = std::env::var_os("PAGESTREAM_CONFIG").map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let text = match &file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| ConfigError {
                errors: vec![format!("cannot read config file {}: {e}", path.display())],
            })?),
            None => None,
        };
        Self::from_sources(text.as_deref(), std::env::vars())
    }

    /// Builds a config from a TOML text and `(name, value)` environment
    /// pairs; the testable core of [`Config::load`].
    pub fn from_sources(
        toml_text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let defaults = to_table(&Config::default());
        let mut errors = Vec::new();
        let mut merged = defaults.clone();

        if let Some(text) = toml_text {
            match text.parse::<Table>() {
                Ok(file) => overlay_file(&defaults, &mut merged, file, &mut errors),
                Err(e) => errors.push(format!("config file is not valid TOML: {e}")),
            }
        }
        let env: BTreeMap<String, String> = env.into_iter().collect();
        for (name, raw) in &env {
            let Some(rest) = name.strip_prefix("PAGESTREAM_") else {
                continue;
            };
            if RESERVED_ENV.contains(&name.as_str()) {
                continue;
            }
            let lower = rest.to_ascii_lowercase();
            let Some((section, key)) = lower.split_once('_') else {
                errors.push(format!("{name}: expected PAGESTREAM_<SECTION>_<KEY>"));
                continue;
            };
            match defaults.get(section).and_then(Value::as_table).and_then(|t| t.get(key)) {
                None => errors.push(format!("{name}: unknown setting {section}.{key}")),
                Some(default) => match parse_like(default, raw) {
                    Ok(v) => {
                        merged[section].as_table_mut().expect("section").insert(key.into(), v);
                    }
                    Err(e) => errors.push(format!("{name}={raw:?}: {e}")),
                },
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError { errors });
        }
        // Every key is known and typed like its default by now; deserialise
        // section by section so each type error is reported.
        for (section, value) in &merged {
            let mut probe = defaults.clone();
            probe.insert(section.clone(), value.clone());
            if let Err(e) = Value::Table(probe).try_into::<Config>() {
                errors.push(format!("[{section}]: {}", e.message().trim()));
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError { errors });
        }
        let config: Config = Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError { errors: vec![e.to_string()] })?;
        config.validate()?;
        Ok(config)
    }

    /// Semantic checks serde cannot express; all reported together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let p = &self.nats.prefix;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
            errors.push(format!("nats.prefix {p:?}: use 1+ characters of [a-z0-9_-]"));
        }
        if !self.pipeline.default_model.is_empty() {
            if let Err(e) = pagestream_schemas::validate_model_name(&self.pipeline.default_model) {
                errors.push(format!("pipeline.default_model: {e}"));
            }
        }
        for name in self.inferencer.served_models() {
            if let Err(e) = pagestream_schemas::validate_model_name(&name) {
                errors.push(format!("inferencer.model / inferencer.models: {e}"));
            }
        }
        if !(1..=5).contains(&self.nats.replicas) {
            errors.push("nats.replicas must be within 1..=5 (JetStream's limit; 3 on a 3-node cluster)".into());
        }
        if self.nats.urls().is_empty() {
            errors.push("nats.url: give at least one NATS URL".into());
        }
        if self.nats.max_deliver < 1 {
            errors.push("nats.max_deliver must be at least 1".into());
        }
        if self.ingress.read_timeout_secs == 0 {
            errors.push("ingress.read_timeout_secs must be at least 1".into());
        }
        if self.ingress.request_timeout_secs < self.ingress.read_timeout_secs {
            errors.push("ingress.request_timeout_secs must be at least ingress.read_timeout_secs".into());
        }
        if self.ingress.max_field_bytes < 1024 {
            errors.push("ingress.max_field_bytes must be at least 1024".into());
        }
        if self.ingress.max_connections == 0 || self.ingress.max_event_streams == 0 {
            errors.push("ingress.max_connections and ingress.max_event_streams must be at least 1".into());
        }
        for host in &self.ingress.allowed_hosts {
            if host.contains(['/', '@', ' ']) {
                errors.push(format!(
                    "ingress.allowed_hosts: {host:?} is not a host name (host, host:port, *.domain or *)"
                ));
            }
        }
        if !(1..=7 * 24 * 3600).contains(&self.ingress.results_url_ttl_secs) {
            errors.push("ingress.results_url_ttl_secs must be within 1..=604800 (S3's presigning limit)".into());
        }
        if self.nats.max_pages_in_flight < 2 {
            errors.push("nats.max_pages_in_flight must be at least 2".into());
        }
        if self.splitter.chunk_pages < 2 || self.splitter.doc_pages_in_flight < 2 {
            errors.push("splitter.chunk_pages and splitter.doc_pages_in_flight must be at least 2".into());
        }
        if self.nats.ack_wait_secs < 2 {
            errors.push("nats.ack_wait_secs must be at least 2".into());
        }
        if !pagestream_schemas::DPI_RANGE.contains(&self.splitter.dpi) {
            errors.push(format!(
                "splitter.dpi {} is outside {}",
                self.splitter.dpi,
                pagestream_schemas::dpi_range_text()
            ));
        }
        if !self.notifier.secret.is_empty() && self.notifier.signing_key().is_none() {
            errors.push(
                "notifier.secret must be whsec_ followed by base64 (e.g. echo \"whsec_$(openssl rand -base64 32)\")"
                    .into(),
            );
        }
        if !self.notifier.callback_url.is_empty() {
            if let Err(e) = pagestream_schemas::validate_callback_url(&self.notifier.callback_url) {
                errors.push(format!("notifier.callback_url {e}"));
            }
            if self.notifier.secret.is_empty() {
                errors.push("notifier.callback_url needs notifier.secret (webhooks are signed)".into());
            }
        }
        if self.notifier.retry_for_secs == 0
            || self.notifier.attempt_timeout_secs == 0
            || self.notifier.concurrency == 0
        {
            errors.push(
                "notifier.retry_for_secs, notifier.attempt_timeout_secs and notifier.concurrency must be at least 1"
                    .into(),
            );
        }
        if self.notifier.per_endpoint_concurrency == 0
            || self.notifier.breaker_failures == 0
            || self.notifier.breaker_cooldown_secs == 0
        {
            errors.push(
                "notifier.per_endpoint_concurrency, notifier.breaker_failures and notifier.breaker_cooldown_secs must be at least 1"
                    .into(),
            );
        }
        if self.splitter.source_max_bytes == 0 || self.splitter.source_timeout_secs == 0 {
            errors.push("splitter.source_max_bytes and splitter.source_timeout_secs must be at least 1".into());
        }
        if self.splitter.render_timeout_secs == 0 {
            errors.push("splitter.render_timeout_secs must be at least 1".into());
        }
        if self.splitter.render_memory_mb != 0 && self.splitter.render_memory_mb < 256 {
            errors.push("splitter.render_memory_mb must be 0 (no limit) or at least 256".into());
        }
        if self.splitter.max_pages == 0 {
            errors.push("splitter.max_pages must be at least 1".into());
        }
        if self.splitter.max_pixels < 64 * 64 {
            errors.push("splitter.max_pixels must be at least 4096".into());
        }
        if self.splitter.inline_image_max_bytes > 900 * 1024 {
            errors
                .push("splitter.inline_image_max_bytes must stay below NATS's 1 MiB payload limit (max 921600)".into());
        }
        for (name, n) in [
            ("splitter.concurrency", self.splitter.concurrency),
            ("uploader.concurrency", self.uploader.concurrency),
            ("splitter.fetch_concurrency", self.splitter.fetch_concurrency),
        ] {
            if n == 0 {
                errors.push(format!("{name} must be at least 1"));
            }
        }
        let inf = &self.inferencer;
        if inf.backend == Backend::Tract && inf.device != Device::Cpu {
            errors.push(format!(
                "inferencer.device {:?}: the tract backend runs on the CPU only (use inferencer.backend = \"ort\" for CUDA)",
                inf.device.as_str()
            ));
        }
        if !(1..=64).contains(&inf.batch_size) {
            errors.push("inferencer.batch_size must be within 1..=64".into());
        }
        if inf.batch_wait_ms > 10_000 {
            errors.push("inferencer.batch_wait_ms must be at most 10000".into());
        }
        if self.uploader.target == Target::S3 {
            if self.uploader.s3_bucket.is_empty() {
                errors.push("uploader.s3_bucket is required when uploader.target = \"s3\"".into());
            }
            if self.uploader.s3_access_key_id.is_empty() != self.uploader.s3_secret_access_key.is_empty() {
                errors.push("uploader.s3_access_key_id and uploader.s3_secret_access_key go together".into());
            }
        }
        if self.uploader.prefix.starts_with('/') || self.uploader.prefix.contains("..") {
            errors.push("uploader.prefix must be relative and must not contain '..'".into());
        }
        errors.extend(self.tenants.check());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { errors })
        }
    }
}

fn to_table(config: &Config) -> Table {
    match Value::try_from(config).expect("config serialises") {
        Value::Table(t) => t,
        _ => unreachable!("a struct serialises to a table"),
    }
}

fn overlay_file(defaults: &Table, merged: &mut Table, file: Table, errors: &mut Vec<String>) {
    for (section, value) in file {
        let Some(known) = defaults.get(&section).and_then(Value::as_table) else {
            errors.push(format!("config file: unknown section [{section}]"));
            continue;
        };
        let Value::Table(entries) = value else {
            errors.push(format!("config file: [{section}] must be a table"));
            continue;
        };
        for (key, v) in entries {
            if known.contains_key(&key) {
                merged[&section].as_table_mut().expect("section").insert(key, v);
            } else {
                errors.push(format!("config file: unknown setting {section}.{key}"));
            }
        }
    }
}

/// Parses an environment value with the type of the setting's default.
fn parse_like(default: &Value, raw: &str) -> Result<Value, String> {
    let raw = raw.trim();
    match default {
        Value::String(_) => Ok(Value::String(raw.to_string())),
        Value::Integer(_) => raw.parse::<i64>().map(Value::Integer).map_err(|_| "expected an integer".into()),
        Value::Float(_) => raw.parse::<f64>().map(Value::Float).map_err(|_| "expected a number".into()),
        Value::Boolean(_) => match raw.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Value::Boolean(true)),
            "0" | "false" | "no" | "off" => Ok(Value::Boolean(false)),
            _ => Err("expected true or false".into()),
        },
        // Lists: comma separated.
        Value::Array(_) => Ok(Value::Array(
            raw.split(',').map(str::trim).filter(|t| !t.is_empty()).map(|t| Value::String(t.to_string())).collect(),
        )),
        _ => Err("this setting cannot be set from the environment".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stage_hands_out_its_own_s3_connection_and_never_prints_the_secret() {
        let mut c = Config::default();
        c.uploader.s3_endpoint = "http://results:9000".into();
        c.uploader.s3_secret_access_key = "results-secret".into();
        c.splitter.source_s3_endpoint = "http://sources:9000".into();
        c.splitter.source_s3_path_style = true;
        c.splitter.source_s3_secret_access_key = "sources-secret".into();
        let (results, sources) = (c.uploader.s3_connection(), c.splitter.source_s3_connection());
        assert_eq!((results.endpoint.as_str(), results.path_style), ("http://results:9000", false));
        assert_eq!((sources.endpoint.as_str(), sources.path_style), ("http://sources:9000", true));
        assert_eq!(sources.secret_access_key, "sources-secret");
        for conn in [results, sources] {
            assert!(!format!("{conn:?}").contains("-secret"), "{conn:?}");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_sources(None, env(&[])).unwrap();
        assert_eq!(c.splitter.dpi, 150.0);
        assert_eq!(c.uploader.target, Target::Local);
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let file = "[splitter]\ndpi = 200.0\n[uploader]\nconcurrency = 2\n";
        let c = Config::from_sources(
            Some(file),
            env(&[("PAGESTREAM_SPLITTER_DPI", "300"), ("PAGESTREAM_UPLOADER_S3_PATH_STYLE", "true"), ("OTHER", "x")]),
        )
        .unwrap();
        assert_eq!(c.splitter.dpi, 300.0);
        assert_eq!(c.uploader.concurrency, 2);
        assert!(c.uploader.s3_path_style);
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let file = "[splitter]\ndpi = \"high\"\nbogus = 1\n[nope]\nx = 1\n";
        let err = Config::from_sources(
            Some(file),
            env(&[
                ("PAGESTREAM_UPLOADER_CONCURRENCY", "many"),
                ("PAGESTREAM_INGRESS_NOPE", "1"),
                ("PAGESTREAM_DEPS", "/ignored"),
            ]),
        )
        .unwrap_err();
        let all = err.to_string();
        for needle in ["splitter.bogus", "[nope]", "PAGESTREAM_UPLOADER_CONCURRENCY", "ingress.nope"] {
            assert!(all.contains(needle), "{needle} missing from: {all}");
        }
        assert_eq!(err.errors.len(), 4, "{all}");
    }

    #[test]
    fn type_and_semantic_errors_are_listed() {
        let err = Config::from_sources(Some("[splitter]\ndpi = \"high\"\n"), env(&[])).unwrap_err();
        assert!(err.to_string().contains("[splitter]"), "{err}");
        let err = Config::from_sources(
            None,
            env(&[("PAGESTREAM_UPLOADER_TARGET", "s3"), ("PAGESTREAM_NATS_PREFIX", "Bad.Prefix")]),
        )
        .unwrap_err();
        assert_eq!(err.errors.len(), 2, "{err}");
    }

    #[test]
    fn choices_are_enums_and_lists_take_toml_arrays_or_commas() {
        let c = Config::from_sources(
            Some("[ingress]\napi_tokens = [\"a\", \" b \"]\n[inferencer]\nmodels = \"x, y,,\"\nbackend = \"tract\"\n"),
            env(&[("PAGESTREAM_INGRESS_ADMIN_TOKENS", "root, ops"), ("PAGESTREAM_UPLOADER_TARGET", "local")]),
        )
        .unwrap();
        assert_eq!(c.ingress.api_tokens, ["a", "b"]);
        assert_eq!(c.ingress.admin_tokens, ["root", "ops"]);
        assert_eq!(c.inferencer.models, ["x", "y"]);
        assert_eq!(c.inferencer.served_models(), ["layout_cdla", "x", "y"]);
        assert_eq!(
            (c.inferencer.backend, c.inferencer.device, c.uploader.target),
            (Backend::Tract, Device::Cpu, Target::Local)
        );
        // An unknown choice names the setting, the value and the choices.
        let err =
            Config::from_sources(None, env(&[("PAGESTREAM_INFERENCER_BACKEND", "onnx")])).unwrap_err().to_string();
        assert!(
            err.contains("[inferencer]") && err.contains("onnx") && err.contains("ort") && err.contains("tract"),
            "{err}"
        );
        let err = Config::from_sources(None, env(&[("PAGESTREAM_UPLOADER_TARGET", "gcs")])).unwrap_err().to_string();
        assert!(err.contains("[uploader]") && err.contains("gcs") && err.contains("s3"), "{err}");
        // tract runs on the CPU only.
        let err = Config::from_sources(
            None,
            env(&[("PAGESTREAM_INFERENCER_BACKEND", "tract"), ("PAGESTREAM_INFERENCER_DEVICE", "cuda")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tract backend runs on the CPU only"), "{err}");
    }
}
