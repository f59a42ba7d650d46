//! `[notifier]`: the notifier's settings, owned and checked here.

use pagestream_pipeline::config::Section;
use pagestream_pipeline::outbound::AddressPolicy;
use serde::{Deserialize, Serialize};

/// `[notifier]`. Webhooks: the notifier stage delivers signed document and page events
/// (Standard Webhooks) to each document's `callback_url`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
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
    #[serde(deserialize_with = "pagestream_pipeline::util::list")]
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
    /// Where webhooks may be delivered.
    pub fn policy(&self) -> AddressPolicy {
        AddressPolicy::webhooks(&self.allow_private_hosts)
    }

    /// The HMAC key of `secret` (the bytes after `whsec_`, base64-decoded).
    pub fn signing_key(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        let b64 = self.secret.strip_prefix("whsec_")?;
        base64::engine::general_purpose::STANDARD.decode(b64).ok().filter(|k| !k.is_empty())
    }
}

impl Section for NotifierConfig {
    const NAME: &'static str = "notifier";

    fn check(&self, errors: &mut Vec<String>) {
        if !self.secret.is_empty() && self.signing_key().is_none() {
            errors.push(
                "notifier.secret must be whsec_ followed by base64 (e.g. echo \"whsec_$(openssl rand -base64 32)\")"
                    .into(),
            );
        }
        if !self.callback_url.is_empty() {
            if let Err(e) = pagestream_schemas::validate_callback_url(&self.callback_url) {
                errors.push(format!("notifier.callback_url {e}"));
            }
            if self.secret.is_empty() {
                errors.push("notifier.callback_url needs notifier.secret (webhooks are signed)".into());
            }
        }
        if self.retry_for_secs == 0 || self.attempt_timeout_secs == 0 || self.concurrency == 0 {
            errors.push(
                "notifier.retry_for_secs, notifier.attempt_timeout_secs and notifier.concurrency must be at least 1"
                    .into(),
            );
        }
        if self.per_endpoint_concurrency == 0 || self.breaker_failures == 0 || self.breaker_cooldown_secs == 0 {
            errors.push(
                "notifier.per_endpoint_concurrency, notifier.breaker_failures and notifier.breaker_cooldown_secs must be at least 1"
                    .into(),
            );
        }
    }
}
