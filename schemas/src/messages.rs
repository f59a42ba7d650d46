//! The message types. Field names are the wire names; see the crate docs for
//! the encoding rules and `messages.schema.json` for other languages.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::{validate_doc_id, Message};

/// Where a PDF to process can be read from. Exactly one of `inline`, `blob`
/// or `url` is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// The PDF bytes themselves (small documents; NATS payload limit applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<ByteBuf>,
    /// Key of the PDF in the pipeline's blob store (JetStream Object Store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    /// Where the splitter fetches the PDF: `s3://bucket/key` (a bucket the
    /// deployment allows) or `https://…` (`http://` too; public addresses,
    /// or hosts the deployment allows). See [`SourceRef`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Original file name, shown in the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// Size in bytes, when known to the publisher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Hex sha256 of the PDF, when known to the publisher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Per-document processing options.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubmitOptions {
    /// Rendering resolution; the splitter's configured default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpi: Option<f32>,
    /// Model name from the installed set; the deployment's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Password of an encrypted PDF. Only the splitter reads it; it is never
    /// logged, forwarded to later stages, written to results or dead letters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Scheduling weight against other documents; `normal` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// When no live inferencer serves `model`: wait for one (`true`) instead
    /// of failing the document with `model_unavailable` (absent: `false`).
    /// A document without `model` always waits for the default model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_model: Option<bool>,
    /// Webhook for this document (`http(s)://…`, no credentials): the
    /// notifier POSTs signed events to it. Absent: the deployment's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// Which events the webhook gets: `document` (its terminal state only,
    /// the default) or `page` (each page's outcome too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_events: Option<CallbackEvents>,
    /// Which pages are read by OCR: `auto` (those without a text layer),
    /// `always` or `never`. Absent: the inferencer's `inferencer.ocr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ocr: Option<crate::OcrMode>,
}

/// Which events a document's webhook receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallbackEvents {
    /// The document's terminal state only.
    #[default]
    Document,
    /// Each page's outcome (`page.uploaded`, `page.failed`), then the terminal state.
    Page,
}

impl CallbackEvents {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackEvents::Document => "document",
            CallbackEvents::Page => "page",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "document" => Some(CallbackEvents::Document),
            "page" => Some(CallbackEvents::Page),
            _ => None,
        }
    }
}

/// A document's webhook, as recorded in its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Callback {
    pub url: String,
    #[serde(default)]
    pub events: CallbackEvents,
}

/// A document by reference, parsed from `source.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    S3 { bucket: String, key: String },
    Http(String),
}

impl SourceRef {
    pub fn parse(url: &str) -> Result<SourceRef, String> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').ok_or("s3:// URL without a key: use s3://bucket/key")?;
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
            if !bucket_ok {
                return Err(format!("{bucket:?} is not an S3 bucket name"));
            }
            if key.is_empty() || key.len() > 1024 || key.chars().any(char::is_control) {
                return Err("s3:// URL with an empty, too long or unprintable key".into());
            }
            return Ok(SourceRef::S3 { bucket: bucket.into(), key: key.into() });
        }
        validate_callback_url(url).map_err(|e| e.replace("http:// or https://", "s3://, https:// or http://"))?;
        Ok(SourceRef::Http(url.to_string()))
    }

    /// The last path segment (a file name for the manifest), if any.
    pub fn file_name(&self) -> Option<String> {
        let path = match self {
            SourceRef::S3 { key, .. } => key.as_str(),
            SourceRef::Http(url) => url.split(['?', '#']).next().unwrap_or(""),
        };
        let name = path.rsplit('/').next().unwrap_or("");
        Some(name.to_string()).filter(|n| !n.is_empty() && !n.contains(':'))
    }
}

/// The longest callback URL accepted.
pub const CALLBACK_URL_MAX: usize = 2048;

/// Syntax of a webhook URL: `http://` or `https://`, a host, no
/// credentials, no whitespace or control characters. (Where it may point —
/// no private addresses unless allowed — is the notifier's check.)
pub fn validate_callback_url(url: &str) -> Result<(), String> {
    if url.len() > CALLBACK_URL_MAX {
        return Err(format!("is longer than {CALLBACK_URL_MAX} characters"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters".into());
    }
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .ok_or("must start with http:// or https://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err("must not contain credentials (user:password@)".into());
    }
    let host = if authority.starts_with('[') {
        authority.split_inclusive(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    if host.is_empty() || host == "[]" {
        return Err("has no host".into());
    }
    if let Some(port) = authority.strip_prefix(host).and_then(|p| p.strip_prefix(':')) {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("has an invalid port {port:?}"));
        }
    }
    Ok(())
}

/// How large a share of the pipeline a document gets while others run.
/// Documents take turns; per turn a document renders pages in proportion to
/// its weight, and keeps as many pages in flight (see ARCHITECTURE.md,
/// "Scheduling"). No document starves.
///
/// That is its only effect ([`Priority::scale`], in the splitter): a
/// tenant's turns come in arrival order whatever their priority, and no
/// subject or page carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// `base` scaled by the weight: high ×2, normal ×1, low ×½ (at least 1).
    pub fn scale(self, base: u32) -> u32 {
        match self {
            Priority::High => base.saturating_mul(2),
            Priority::Normal => base,
            Priority::Low => (base / 2).max(1),
        }
    }
}

impl SubmitOptions {
    /// The webhook these options ask for (`callback_url`, with
    /// `callback_events` or its default).
    pub fn callback(&self) -> Option<Callback> {
        let url = self.callback_url.clone()?;
        Some(Callback { url, events: self.callback_events.unwrap_or_default() })
    }
}

impl std::fmt::Debug for SubmitOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubmitOptions")
            .field("dpi", &self.dpi)
            .field("model", &self.model)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("priority", &self.priority)
            .field("wait_for_model", &self.wait_for_model)
            .finish()
    }
}

/// A document to process: subject `<prefix>.docs.submitted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentSubmitted {
    pub v: u32,
    pub doc_id: String,
    /// Human title; defaults to the source file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub source: Source,
    #[serde(default)]
    pub options: SubmitOptions,
    /// RFC 3339 time of submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<String>,
    /// Set by the splitter only, on its turn queues
    /// (`<prefix>.turns.<tenant>`): the page this turn starts at
    /// (the document's previous turns rendered the pages before it).
    /// Publishers leave it unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_page: Option<u32>,
    /// Opaque id of the API token that submitted the document (16 hex
    /// characters of its sha256, as in [`DocInfo::owner`]); set by the
    /// ingress, absent for documents published on NATS without one. The
    /// splitter schedules and caps work per owner (fair share between
    /// tenants); visibility is decided by the durable document record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl DocumentSubmitted {
    /// The submission's title, else its source's file name.
    pub fn title_or_filename(&self) -> Option<String> {
        self.title.clone().or_else(|| self.source.filename.clone())
    }
}

/// An image carried by a message: inline bytes or a blob-store key (claim
/// check, for images above the inline limit). Exactly one is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Encoding of the bytes: `png`.
    pub format: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<ByteBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
}

/// One rendered page: subject `<prefix>.pages.rendered.<model>`; the
/// subject's model is the document's (decided by the splitter), the only
/// option a later stage needs. (Pages once carried the whole submission's
/// options; such pages still decode, the field ignored.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageRendered {
    pub v: u32,
    pub doc_id: String,
    /// 1-based page number.
    pub page: u32,
    pub page_count: u32,
    /// Pixel size of the image.
    pub width: u32,
    pub height: u32,
    /// Effective resolution (lower than requested when the pixel cap applied).
    pub dpi: f32,
    pub image: ImageRef,
    /// Milliseconds spent rendering and encoding this page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub render_ms: Option<f32>,
    /// The page's words from the PDF's text layer (absent: none read, e.g.
    /// a scan, or a splitter from before text was read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<crate::PageText>,
    /// The document's `ocr` option (absent: the inferencer's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ocr: Option<crate::OcrMode>,
}

/// A detected region, in pixels of the page image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub label: String,
    pub score: f32,
    /// `[x0, y0, x1, y1]`, top-left origin.
    pub bbox: [f32; 4],
}

/// The model that produced detections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    /// Hex sha256 of the ONNX weights.
    pub sha256: String,
}

/// Per-page timings in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub render_ms: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infer_ms: Option<f32>,
    /// Milliseconds OCR took on this page (absent: not OCR'd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ocr_ms: Option<f32>,
}

/// Detections for one page: subject `<prefix>.pages.inferred`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageInferred {
    pub v: u32,
    pub doc_id: String,
    pub page: u32,
    pub page_count: u32,
    pub width: u32,
    pub height: u32,
    pub dpi: f32,
    pub model: ModelRef,
    pub detections: Vec<Detection>,
    /// The page image, passed through for the uploader; absent when `error` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    #[serde(default)]
    pub timings: Timings,
    /// Set when the page failed permanently in an earlier stage (render or
    /// inference): the uploader records it as a failed page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// The page's words, passed through from [`PageRendered::text`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<crate::PageText>,
}

/// A machine-readable error code and a message for people.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
    /// The stage where it happened, when it is not the one reporting it
    /// (a page that failed to render, reported by the uploader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

impl ErrorInfo {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorInfo { code: code.into(), message: message.into(), stage: None }
    }

    /// The same error, attributed to `stage`.
    pub fn at_stage(mut self, stage: &str) -> Self {
        self.stage = Some(stage.to_string());
        self
    }
}

/// A document that failed as a whole (cannot be fetched or opened): subject
/// `<prefix>.docs.failed`, consumed by the uploader, which writes a manifest
/// with `status: failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentFailed {
    pub v: u32,
    pub doc_id: String,
    /// Stage that gave up: `splitter`, `inferencer`, …
    pub stage: String,
    pub error: ErrorInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default)]
    pub source: Source,
    pub at: String,
}

/// A document cancelled by a user: subject `<prefix>.docs.cancelled`,
/// consumed by the uploader, which records the `cancelled` event (if the
/// ingress has not already) and writes a manifest with `status: cancelled`
/// listing the pages finished so far. Every stage skips the document's
/// remaining pages once its `cancelled` event exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentCancelled {
    pub v: u32,
    pub doc_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: String,
}

/// Progress states, as they appear in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventState {
    /// Document accepted by the ingress.
    Queued,
    /// Splitter opened the document; `info` carries page count and metadata.
    Split,
    /// A page was rendered / inferred / uploaded.
    Rendered,
    Inferred,
    Uploaded,
    /// A page or the whole document failed; `error` says why.
    Failed,
    /// All pages have a terminal outcome and the manifest is written.
    Completed,
    /// The document was cancelled: stages skip its remaining pages.
    Cancelled,
}

impl EventState {
    pub const ALL: [EventState; 8] = [
        EventState::Queued,
        EventState::Split,
        EventState::Rendered,
        EventState::Inferred,
        EventState::Uploaded,
        EventState::Failed,
        EventState::Completed,
        EventState::Cancelled,
    ];

    /// The state named by a subject token ([`EventState::as_str`]).
    pub fn parse(token: &str) -> Option<EventState> {
        EventState::ALL.into_iter().find(|s| s.as_str() == token)
    }

    /// The token used in event subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Queued => "queued",
            EventState::Split => "split",
            EventState::Rendered => "rendered",
            EventState::Inferred => "inferred",
            EventState::Uploaded => "uploaded",
            EventState::Failed => "failed",
            EventState::Completed => "completed",
            EventState::Cancelled => "cancelled",
        }
    }
}

/// How a document ended: the manifest's `status` and the `status` of the
/// uploader's `completed` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalStatus {
    /// Every page has its results.
    Completed,
    /// Some pages failed (each with its reason); the others have results.
    CompletedWithErrors,
    /// The document failed as a whole, or every page failed.
    Failed,
    /// A user cancelled it; pages finished before that keep their results.
    Cancelled,
}

impl FinalStatus {
    pub const ALL: [FinalStatus; 4] =
        [FinalStatus::Completed, FinalStatus::CompletedWithErrors, FinalStatus::Failed, FinalStatus::Cancelled];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Completed => "completed",
            FinalStatus::CompletedWithErrors => "completed_with_errors",
            FinalStatus::Failed => "failed",
            FinalStatus::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for FinalStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Document metadata carried by `queued`, `split` and `completed` events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DocInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_count: Option<u32>,
    /// Final document status, on the uploader's `completed` event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<FinalStatus>,
    /// Where the manifest was written (`file://…` or `s3://…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// The model every page of the document is inferred with, decided once
    /// when the document is accepted (its `model` option, else the
    /// deployment's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// sha256 of the weights the live (non-canary) replicas of `model`
    /// served when the document was accepted; each page's result names the
    /// weights that really processed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
    /// Opaque id of the API token that submitted the document (16 hex
    /// characters of its sha256); absent when submitted without a token or
    /// on NATS. With tokens, only that token (and admin tokens) see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The document's webhook (from its submission), on `queued` and
    /// `split` events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
}

impl DocInfo {
    /// The document's title, else its file name (what lists and manifests show).
    pub fn title_or_filename(&self) -> Option<String> {
        self.title.clone().or_else(|| self.filename.clone())
    }
}

/// A progress event: subject `<prefix>.events.<doc_id>.doc.<state>` or
/// `<prefix>.events.<doc_id>.page.<state>.<page>`. The events stream keeps
/// one message per subject, so counting subjects counts pages exactly once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub v: u32,
    pub doc_id: String,
    /// Stage that emitted it.
    pub stage: String,
    pub state: EventState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<DocInfo>,
    /// Page events: milliseconds the stage spent on the page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<f32>,
    pub at: String,
}

/// A message a stage gave up on: subject `<prefix>.dlq.<stage>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub v: u32,
    pub stage: String,
    /// Subject the original message was received on.
    pub subject: String,
    /// Document id, when the payload could be decoded far enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_id: Option<String>,
    pub error: ErrorInfo,
    /// Deliveries made before giving up.
    pub attempts: u64,
    /// The original payload, minus any `password`; its first
    /// [`DEAD_LETTER_PAYLOAD_MAX`] bytes when it was larger (see
    /// `payload_bytes`).
    pub payload: ByteBuf,
    pub at: String,
    /// Size of the original payload when `payload` was truncated to fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_bytes: Option<u64>,
}

/// Largest payload a dead-letter record keeps whole: the record must fit in
/// a NATS message (1 MiB by default) with room to spare.
pub const DEAD_LETTER_PAYLOAD_MAX: usize = 256 * 1024;

/// The document id of a payload that does not decode as its message type
/// (wrong version, a field out of range), when it has a valid `doc_id`: the
/// refusal can then be reported on that document.
pub fn peek_doc_id(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct DocIdOnly {
        doc_id: String,
    }
    let id = rmp_serde::from_slice::<DocIdOnly>(bytes).ok()?.doc_id;
    validate_doc_id(&id).is_ok().then_some(id)
}

/// `bytes` with every map entry named `password` removed, at any depth,
/// for records kept where operators read them (dead letters). A payload
/// that is not MessagePack comes back unchanged (it cannot hold a field).
pub fn without_passwords(bytes: &[u8]) -> Vec<u8> {
    fn strip(v: &mut rmpv::Value) -> bool {
        let mut changed = false;
        match v {
            rmpv::Value::Map(entries) => {
                let before = entries.len();
                entries.retain(|(k, _)| k.as_str() != Some("password"));
                changed |= entries.len() != before;
                for (_, v) in entries.iter_mut() {
                    changed |= strip(v);
                }
            }
            rmpv::Value::Array(items) => {
                for v in items.iter_mut() {
                    changed |= strip(v);
                }
            }
            _ => {}
        }
        changed
    }
    let mut reader = bytes;
    let Ok(mut value) = rmpv::decode::read_value(&mut reader) else { return bytes.to_vec() };
    if !strip(&mut value) {
        return bytes.to_vec();
    }
    let mut out = Vec::with_capacity(bytes.len());
    match rmpv::encode::write_value(&mut out, &value) {
        Ok(()) => {
            out.extend_from_slice(reader); // trailing bytes, if any, unchanged
            out
        }
        Err(_) => bytes.to_vec(),
    }
}

/// Longest model name.
pub const MAX_MODEL_NAME: usize = 64;

/// A model name is one NATS subject token and one consumer name: 1 to 64
/// of `A-Z a-z 0-9 _ -`, optionally followed by `@` and a variant of it of
/// the same characters (`layout_cdla@int8`: the manifest's `int8` variant).
pub fn validate_model_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_MODEL_NAME {
        return Err(format!("model name {name:?} must have 1 to {MAX_MODEL_NAME} characters"));
    }
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let ok = match name.split_once('@') {
        Some((base, variant)) => plain(base) && plain(variant),
        None => plain(name),
    };
    if !ok {
        return Err(format!(
            "model name {name:?} may contain only A-Z, a-z, 0-9, `_` and `-`, and one `@` before a variant (layout_cdla@int8)"
        ));
    }
    Ok(())
}

fn check_doc_id(id: &str) -> Result<(), String> {
    validate_doc_id(id).map_err(|e| e.to_string())
}

fn check_page(page: u32, page_count: u32) -> Result<(), String> {
    if page == 0 || page > page_count {
        return Err(format!("page {page} is outside 1..={page_count}"));
    }
    Ok(())
}

impl ImageRef {
    /// Exactly one of inline/blob; a blob key must be this page's own
    /// (`pages/<doc_id>/<page>.<format>`): stages read and then delete it,
    /// so a message may not point them at any other object.
    fn validate(&self, doc_id: &str, page: u32) -> Result<(), String> {
        match (&self.inline, &self.blob) {
            (Some(_), None) => Ok(()),
            (None, Some(key)) => {
                let want = format!("pages/{doc_id}/{page}.{}", self.format);
                if *key == want {
                    Ok(())
                } else {
                    Err(format!("image.blob {key:?} is not this page's key {want:?}"))
                }
            }
            _ => Err("image: exactly one of `inline` or `blob` must be set".into()),
        }
    }
}

/// `KIND` and `doc_id` of a message that always names its document.
macro_rules! names_its_document {
    ($kind:literal) => {
        const KIND: &'static str = $kind;
        fn doc_id(&self) -> Option<&str> {
            Some(&self.doc_id)
        }
    };
}

impl Message for DocumentSubmitted {
    names_its_document!("DocumentSubmitted");
    fn validate(&self) -> Result<(), String> {
        check_doc_id(&self.doc_id)?;
        let set = [self.source.inline.is_some(), self.source.blob.is_some(), self.source.url.is_some()];
        if set.iter().filter(|s| **s).count() != 1 {
            return Err("source: exactly one of `inline`, `blob` or `url` must be set".into());
        }
        // The submission rules on options (dpi, model name, webhook URL),
        // as the HTTP API applies them.
        self.options.validate().map_err(|e| e.in_options())?;
        if self.start_page == Some(0) {
            return Err("start_page is 1-based".into());
        }
        if let Some(owner) = &self.owner {
            if owner.len() != 16 || !owner.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(format!("owner {owner:?} is not 16 lowercase hex characters"));
            }
        }
        if let Some(url) = &self.source.url {
            SourceRef::parse(url).map_err(|e| format!("source.url: {e}"))?;
        }
        // Page images are the pipeline's own; `uploads/` keys belong to one
        // document each (the pipeline deletes `uploads/<doc_id>` when the
        // document finishes). Other keys are the publisher's and stay.
        if let Some(key) = &self.source.blob {
            let own = format!("uploads/{}", self.doc_id);
            if key.starts_with("pages/") || (key.starts_with("uploads/") && *key != own) {
                return Err(format!(
                    "source.blob {key:?} is not allowed: use {own:?} (or a key outside uploads/ and pages/)"
                ));
            }
        }
        Ok(())
    }
}

impl Message for PageRendered {
    names_its_document!("PageRendered");
    fn page(&self) -> Option<u32> {
        Some(self.page)
    }
    fn validate(&self) -> Result<(), String> {
        check_doc_id(&self.doc_id)?;
        check_page(self.page, self.page_count)?;
        self.text.as_ref().map_or(Ok(()), crate::PageText::validate)?;
        self.image.validate(&self.doc_id, self.page)
    }
}

impl Message for PageInferred {
    names_its_document!("PageInferred");
    fn page(&self) -> Option<u32> {
        Some(self.page)
    }
    fn validate(&self) -> Result<(), String> {
        check_doc_id(&self.doc_id)?;
        check_page(self.page, self.page_count)?;
        self.text.as_ref().map_or(Ok(()), crate::PageText::validate)?;
        match (&self.image, &self.error) {
            (Some(image), None) => image.validate(&self.doc_id, self.page),
            (_, Some(_)) => Ok(()),
            (None, None) => Err("image is required unless error is set".into()),
        }
    }
}

impl Message for DocumentFailed {
    names_its_document!("DocumentFailed");
    fn validate(&self) -> Result<(), String> {
        check_doc_id(&self.doc_id)
    }
}

impl Message for DocumentCancelled {
    names_its_document!("DocumentCancelled");
    fn validate(&self) -> Result<(), String> {
        check_doc_id(&self.doc_id)
    }
}

impl Message for Event {
    names_its_document!("Event");
    fn validate(&self) -> Result<(), String> {
        check_doc_id(&self.doc_id)
    }
}

impl Message for DeadLetter {
    const KIND: &'static str = "DeadLetter";
    fn doc_id(&self) -> Option<&str> {
        self.doc_id.as_deref()
    }
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// One inferencer replica's advertisement of a model it serves: the value
/// (JSON) of key `<model>.<replica>` in the key-value bucket
/// `<prefix>_models`. Each replica rewrites it every few seconds; the bucket
/// expires entries that are not rewritten (`max_age`), so the bucket lists
/// exactly the live replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelReplica {
    pub model: String,
    /// Hex sha256 of the ONNX weights.
    pub sha256: String,
    pub labels: Vec<String>,
    /// `ort` or `tract`.
    pub backend: String,
    /// `cpu` or `cuda`.
    pub device: String,
    pub batch_size: usize,
    /// A canary may serve the model with other weights than the fleet.
    #[serde(default)]
    pub canary: bool,
    /// Unique id of the inferencer process.
    pub replica: String,
    #[serde(default)]
    pub host: String,
    /// RFC 3339 time the replica started serving.
    pub started_at: String,
}
