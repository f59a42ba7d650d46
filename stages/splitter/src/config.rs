//! `[splitter]`: the splitter's settings, owned and checked here.

use std::path::PathBuf;

use pagestream_pipeline::config::{S3Connection, Section};
use pagestream_pipeline::outbound::AddressPolicy;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
/// `[splitter]`.
pub struct SplitterConfig {
    /// Rendering resolution when the submission does not set one.
    pub dpi: f32,
    /// Largest page bitmap in pixels; larger pages are rendered downscaled.
    pub max_pixels: u64,
    /// Read each page's words from the PDF's text layer (about 5 % of a
    /// page's render time). Off: pages carry no text, and with
    /// `inferencer.ocr = auto` every page is read by OCR.
    pub text_layer: bool,
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
    #[serde(deserialize_with = "pagestream_pipeline::util::list")]
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
    #[serde(deserialize_with = "pagestream_pipeline::util::list")]
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

impl Default for SplitterConfig {
    fn default() -> Self {
        SplitterConfig {
            dpi: 150.0,
            max_pixels: 4096 * 4096,
            text_layer: true,
            max_pages: 10_000,
            inline_image_max_bytes: 512 * 1024,
            pdfium_library: pagestream_pipeline::config::deps_dir().join("lib/libpdfium.so"),
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

impl SplitterConfig {
    /// Where `http(s)://` sources may be fetched from.
    pub fn source_policy(&self) -> AddressPolicy {
        AddressPolicy::sources(&self.source_allow_private_hosts)
    }

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

impl Section for SplitterConfig {
    const NAME: &'static str = "splitter";

    fn check(&self, errors: &mut Vec<String>) {
        if self.chunk_pages < 2 || self.doc_pages_in_flight < 2 {
            errors.push("splitter.chunk_pages and splitter.doc_pages_in_flight must be at least 2".into());
        }
        if !pagestream_schemas::DPI_RANGE.contains(&self.dpi) {
            errors.push(format!("splitter.dpi {} is outside {}", self.dpi, pagestream_schemas::dpi_range_text()));
        }
        if self.source_max_bytes == 0 || self.source_timeout_secs == 0 {
            errors.push("splitter.source_max_bytes and splitter.source_timeout_secs must be at least 1".into());
        }
        if self.render_timeout_secs == 0 {
            errors.push("splitter.render_timeout_secs must be at least 1".into());
        }
        if self.render_memory_mb != 0 && self.render_memory_mb < 256 {
            errors.push("splitter.render_memory_mb must be 0 (no limit) or at least 256".into());
        }
        if self.max_pages == 0 {
            errors.push("splitter.max_pages must be at least 1".into());
        }
        if self.max_pixels < 64 * 64 {
            errors.push("splitter.max_pixels must be at least 4096".into());
        }
        if self.inline_image_max_bytes > 900 * 1024 {
            errors
                .push("splitter.inline_image_max_bytes must stay below NATS's 1 MiB payload limit (max 921600)".into());
        }
        for (name, n) in
            [("splitter.concurrency", self.concurrency), ("splitter.fetch_concurrency", self.fetch_concurrency)]
        {
            if n == 0 {
                errors.push(format!("{name} must be at least 1"));
            }
        }
    }
}
