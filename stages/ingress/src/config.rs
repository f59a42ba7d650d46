//! The ingress's settings: `[ingress]`, owned and checked here, and views
//! of the keys of other sections it must know — where results are read
//! (the uploader's store keys), whether webhooks are on and where they may
//! go (the notifier's), which documents by reference are allowed (the
//! splitter's). Each view names only the keys it reads; their owners check
//! them.

use pagestream_pipeline::config::{Section, Sources};
use pagestream_pipeline::outbound::AddressPolicy;
use pagestream_results::ResultsConfig;
use serde::{Deserialize, Serialize};

/// Everything the ingress reads from the configuration.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub ingress: IngressConfig,
    /// Where results are read (keys of `[uploader]`).
    pub results: ResultsConfig,
    /// Keys of `[notifier]`.
    pub webhooks: WebhookView,
    /// Keys of `[splitter]`.
    pub sources: SourceView,
}

impl Settings {
    pub fn read(sources: &mut Sources) -> Settings {
        Settings {
            ingress: sources.section(),
            results: sources.view(),
            webhooks: sources.view(),
            sources: sources.view(),
        }
    }
}

/// `notifier.secret` (webhooks are on when set) and
/// `notifier.allow_private_hosts` (callback URLs checked at submission).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct WebhookView {
    pub secret: String,
    #[serde(deserialize_with = "pagestream_pipeline::util::list")]
    pub allow_private_hosts: Vec<String>,
}

impl Section for WebhookView {
    const NAME: &'static str = "notifier";
}

impl WebhookView {
    pub fn on(&self) -> bool {
        !self.secret.is_empty()
    }

    pub fn policy(&self) -> AddressPolicy {
        AddressPolicy::webhooks(&self.allow_private_hosts)
    }
}

/// `splitter.source_s3_buckets` and `splitter.source_allow_private_hosts`:
/// which documents by reference a submission may name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SourceView {
    #[serde(deserialize_with = "pagestream_pipeline::util::list")]
    pub source_s3_buckets: Vec<String>,
    #[serde(deserialize_with = "pagestream_pipeline::util::list")]
    pub source_allow_private_hosts: Vec<String>,
}

impl Section for SourceView {
    const NAME: &'static str = "splitter";
}

impl SourceView {
    /// The policy for the `url` of a JSON submission by reference.
    pub fn policy(&self) -> AddressPolicy {
        AddressPolicy::sources(&self.source_allow_private_hosts).for_field("url")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
/// `[ingress]`.
pub struct IngressConfig {
    /// Address the HTTP API listens on.
    pub addr: String,
    /// Largest accepted upload, in bytes (HTTP 413 above).
    pub max_upload_bytes: u64,
    /// API tokens (a TOML list, or comma separated). When set, every `/v1`
    /// route requires `Authorization: Bearer <token>`; empty leaves the API open.
    #[serde(deserialize_with = "pagestream_pipeline::util::list")]
    pub api_tokens: Vec<String>,
    /// Admin tokens: like `api_tokens`, and they see every document (an API
    /// token sees only the documents it submitted, and those submitted on NATS).
    #[serde(deserialize_with = "pagestream_pipeline::util::list")]
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
    #[serde(deserialize_with = "pagestream_pipeline::util::list")]
    pub allowed_hosts: Vec<String>,
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

impl Section for IngressConfig {
    const NAME: &'static str = "ingress";

    fn check(&self, errors: &mut Vec<String>) {
        if self.read_timeout_secs == 0 {
            errors.push("ingress.read_timeout_secs must be at least 1".into());
        }
        if self.request_timeout_secs < self.read_timeout_secs {
            errors.push("ingress.request_timeout_secs must be at least ingress.read_timeout_secs".into());
        }
        if self.max_field_bytes < 1024 {
            errors.push("ingress.max_field_bytes must be at least 1024".into());
        }
        if self.max_connections == 0 || self.max_event_streams == 0 {
            errors.push("ingress.max_connections and ingress.max_event_streams must be at least 1".into());
        }
        for host in &self.allowed_hosts {
            if host.contains(['/', '@', ' ']) {
                errors.push(format!(
                    "ingress.allowed_hosts: {host:?} is not a host name (host, host:port, *.domain or *)"
                ));
            }
        }
        if !(1..=7 * 24 * 3600).contains(&self.results_url_ttl_secs) {
            errors.push("ingress.results_url_ttl_secs must be within 1..=604800 (S3's presigning limit)".into());
        }
    }
}
