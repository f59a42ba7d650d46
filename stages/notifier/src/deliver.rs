//! One webhook delivery attempt: the Standard Webhooks headers and
//! signature, the address checks (no private, loopback or link-local
//! targets unless allowed), and what the answer means: delivered, worth a
//! retry (network errors, timeouts, 408, 429, 5xx; the retry is scheduled
//! by the caller, see `crate::jobs`, never waited for here), or failed for
//! good.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::NotifierConfig;
use base64::Engine as _;
use bytes::Bytes;
use hmac::{KeyInit as _, Mac as _};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use pagestream_pipeline::outbound::AddressPolicy;
use pagestream_pipeline::outbound::Https;
use pagestream_schemas::ErrorInfo;

/// First pause after a failed attempt; doubled each time up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest pause between two attempts (a longer `Retry-After` is cut to it).
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// The pause after `attempts` failed attempts: 1 s, 2 s, 4 s, … 60 s.
pub fn backoff(attempts: u32) -> Duration {
    (FIRST_DELAY * 2u32.saturating_pow(attempts.saturating_sub(1).min(6))).min(MAX_DELAY)
}

/// A webhook to deliver: its stable id and JSON body.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: String,
    /// `document` or `page`: the `kind` label of the webhook metrics.
    pub kind: &'static str,
    pub body: Bytes,
}

/// What one attempt got.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// A 2xx answer.
    Delivered { status: u16 },
    /// Worth another attempt (network error, timeout, 408, 429, 5xx), not
    /// before `retry_after` when the receiver said so.
    Retry { error: ErrorInfo, retry_after: Option<Duration> },
    /// Never worth another attempt (another 4xx or redirect, a refused URL).
    Failed { error: ErrorInfo },
}

/// One delivery attempt, by result: `delivered` or the error code
/// (`callback_status`, `callback_unreachable`, `callback_timeout`,
/// `callback_rejected`, `callback_url_refused`).
fn count_attempt(result: &str) {
    metrics::counter!("pagestream_webhook_attempts_total", "result" => result.to_string()).increment(1);
}

/// Counts a finished webhook in `pagestream_webhook_deliveries_total` and
/// `_delivery_seconds` (`took`: from its first attempt to its end).
pub fn count_delivery(kind: &str, delivered: bool, took: Duration) {
    let kind = if kind == "page" { "page" } else { "document" };
    let ended = if delivered { "delivered" } else { "failed" };
    metrics::counter!("pagestream_webhook_deliveries_total", "kind" => kind, "outcome" => ended).increment(1);
    metrics::histogram!("pagestream_webhook_delivery_seconds", "kind" => kind, "outcome" => ended)
        .record(took.as_secs_f64());
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, the Standard
/// Webhooks signature.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2_011::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// Parses and checks a webhook URL before any connection: the syntax and,
/// for a literal IP address, that it is public or allowed. Names are
/// checked when they are resolved ([`GuardedResolver`]).
pub fn check_url(url: &str, policy: &AddressPolicy) -> Result<http::Uri, String> {
    policy.check_url(url)?;
    url.parse().map_err(|e| format!("callback_url is not a valid URL: {e}"))
}

/// Delivers webhooks: one HTTP client (connection reuse, TLS) per process.
#[derive(Clone)]
pub struct Sender {
    client: Client<Https, Full<Bytes>>,
    key: Arc<Vec<u8>>,
    policy: AddressPolicy,
    attempt_timeout: Duration,
}

impl Sender {
    /// `None` when webhooks are off (no `notifier.secret`).
    pub fn new(cfg: &NotifierConfig) -> Option<Sender> {
        let key = cfg.signing_key()?;
        let policy = cfg.policy();
        let client = policy.client(Duration::from_secs(cfg.attempt_timeout_secs));
        Some(Sender {
            client,
            key: Arc::new(key),
            policy,
            attempt_timeout: Duration::from_secs(cfg.attempt_timeout_secs),
        })
    }

    /// Checks `url` (syntax, literal addresses) without sending anything.
    pub fn check(&self, url: &str) -> Result<http::Uri, String> {
        check_url(url, &self.policy)
    }

    /// One attempt to deliver `hook` to `url`, at most
    /// `notifier.attempt_timeout_secs`. Never follows redirects. Counted in
    /// `pagestream_webhook_attempts_total` (by result).
    pub async fn attempt(&self, url: &str, hook: &Webhook) -> Attempt {
        let uri = match self.check(url) {
            Ok(u) => u,
            Err(e) => {
                count_attempt("callback_url_refused");
                return Attempt::Failed { error: ErrorInfo::new("callback_url_refused", e) };
            }
        };
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let req = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, concat!("pagestream-notifier/", env!("CARGO_PKG_VERSION")))
            .header("webhook-id", &hook.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sign(&self.key, &hook.id, timestamp, &hook.body))
            .body(Full::new(hook.body.clone()))
            .expect("a valid request");
        let answer = tokio::time::timeout(self.attempt_timeout, self.client.request(req)).await;
        let (code, message, retry_after) = match answer {
            Ok(Ok(resp)) => {
                let status = resp.status();
                if status.is_success() {
                    count_attempt("delivered");
                    return Attempt::Delivered { status: status.as_u16() };
                }
                let retry_after = resp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s).min(MAX_DELAY));
                let retryable = status.is_server_error()
                    || status == http::StatusCode::TOO_MANY_REQUESTS
                    || status == http::StatusCode::REQUEST_TIMEOUT;
                if !retryable {
                    let error = ErrorInfo::new(
                        "callback_rejected",
                        format!("the receiver answered HTTP {status} (not retried: only 408, 429 and 5xx are)"),
                    );
                    count_attempt(error.code.as_str());
                    return Attempt::Failed { error };
                }
                ("callback_status", format!("the receiver answered HTTP {status}"), retry_after)
            }
            Ok(Err(e)) => {
                let message = pagestream_pipeline::outbound::error_chain(&e);
                if message.contains("private, loopback or link-local") {
                    count_attempt("callback_url_refused");
                    return Attempt::Failed { error: ErrorInfo::new("callback_url_refused", message) };
                }
                ("callback_unreachable", message, None)
            }
            Err(_) => ("callback_timeout", format!("no answer within {:?}", self.attempt_timeout), None),
        };
        count_attempt(code);
        Attempt::Retry { error: ErrorInfo::new(code, message), retry_after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification (and its
        // reference libraries' tests).
        let key = base64::engine::general_purpose::STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn literal_private_addresses_are_refused_before_connecting() {
        let none = AddressPolicy::webhooks(&[]);
        assert!(check_url("http://10.0.0.1/hook", &none).unwrap_err().contains("notifier.allow_private_hosts"));
        let allowed = AddressPolicy::webhooks(&["127.0.0.1".to_string()]);
        assert_eq!(check_url("http://127.0.0.1:9000/hook", &allowed).unwrap().port_u16(), Some(9000));
    }

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(0).as_secs(), 1);
        assert_eq!(backoff(u32::MAX).as_secs(), 60);
    }
}
