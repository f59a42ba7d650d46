//! One webhook delivery: the Standard Webhooks headers and signature, the
//! address checks (no private, loopback or link-local targets unless
//! allowed), and retries with exponential back-off on network errors,
//! timeouts, 408, 429 and 5xx for at most `notifier.retry_for_secs`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use hmac::{KeyInit as _, Mac as _};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use pagestream_pipeline::callbacks::check_callback_url;
use pagestream_pipeline::config::NotifierConfig;
use pagestream_pipeline::outbound::Https;
use pagestream_schemas::ErrorInfo;

/// First pause after a failed attempt; doubled each time up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(60);

/// A webhook to deliver: its stable id and JSON body.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: String,
    /// `document` or `page`: the `kind` label of the webhook metrics.
    pub kind: &'static str,
    pub body: Bytes,
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered { attempts: u32, status: u16 },
    Failed { attempts: u32, error: ErrorInfo },
}

/// One delivery attempt, by result: `delivered` or the error code
/// (`callback_status`, `callback_unreachable`, `callback_timeout`,
/// `callback_rejected`, `callback_url_refused`).
fn count_attempt(result: &str) {
    metrics::counter!("pagestream_webhook_attempts_total", "result" => result.to_string()).increment(1);
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
pub fn check_url(url: &str, allow: &HashSet<String>) -> Result<http::Uri, String> {
    let allow: Vec<String> = allow.iter().cloned().collect();
    check_callback_url(url, &allow)?;
    url.parse().map_err(|e| format!("callback_url is not a valid URL: {e}"))
}

/// Delivers webhooks: one HTTP client (connection reuse, TLS) per process.
#[derive(Clone)]
pub struct Sender {
    client: Client<Https, Full<Bytes>>,
    key: Arc<Vec<u8>>,
    allow: Arc<HashSet<String>>,
    attempt_timeout: Duration,
    retry_for: Duration,
}

impl Sender {
    /// `None` when webhooks are off (no `notifier.secret`).
    pub fn new(cfg: &NotifierConfig) -> Option<Sender> {
        let key = cfg.signing_key()?;
        let allow = pagestream_pipeline::outbound::allow_set(&cfg.allow_private_hosts);
        let client =
            pagestream_pipeline::outbound::guarded_client(allow.clone(), Duration::from_secs(cfg.attempt_timeout_secs));
        Some(Sender {
            client,
            key: Arc::new(key),
            allow,
            attempt_timeout: Duration::from_secs(cfg.attempt_timeout_secs),
            retry_for: Duration::from_secs(cfg.retry_for_secs),
        })
    }

    /// Checks `url` (syntax, literal addresses) without sending anything.
    pub fn check(&self, url: &str) -> Result<http::Uri, String> {
        check_url(url, &self.allow)
    }

    /// Delivers `hook` to `url`, retrying transient failures with back-off
    /// for at most `retry_for` (a `Retry-After` of up to a minute is
    /// honoured). Never follows redirects. Counted in
    /// `pagestream_webhook_deliveries_total` / `_delivery_seconds` (how it
    /// ended) and `pagestream_webhook_attempts_total` (each attempt).
    pub async fn deliver(&self, url: &str, hook: &Webhook) -> Outcome {
        let started = Instant::now();
        let outcome = self.attempt_until_done(url, hook).await;
        let ended = match outcome {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Failed { .. } => "failed",
        };
        metrics::counter!("pagestream_webhook_deliveries_total", "kind" => hook.kind, "outcome" => ended).increment(1);
        metrics::histogram!("pagestream_webhook_delivery_seconds", "kind" => hook.kind, "outcome" => ended)
            .record(started.elapsed().as_secs_f64());
        outcome
    }

    async fn attempt_until_done(&self, url: &str, hook: &Webhook) -> Outcome {
        let uri = match self.check(url) {
            Ok(u) => u,
            Err(e) => return Outcome::Failed { attempts: 0, error: ErrorInfo::new("callback_url_refused", e) },
        };
        let started = Instant::now();
        let mut delay = FIRST_DELAY;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let req = http::Request::post(uri.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::USER_AGENT, concat!("pagestream-notifier/", env!("CARGO_PKG_VERSION")))
                .header("webhook-id", &hook.id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", sign(&self.key, &hook.id, timestamp, &hook.body))
                .body(Full::new(hook.body.clone()))
                .expect("a valid request");
            let (code, message, retry_after) =
                match tokio::time::timeout(self.attempt_timeout, self.client.request(req)).await {
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        if status.is_success() {
                            count_attempt("delivered");
                            return Outcome::Delivered { attempts, status: status.as_u16() };
                        }
                        let retry_after = resp
                            .headers()
                            .get(http::header::RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .map(Duration::from_secs);
                        let retryable = status.is_server_error()
                            || status == http::StatusCode::TOO_MANY_REQUESTS
                            || status == http::StatusCode::REQUEST_TIMEOUT;
                        if !retryable {
                            let error = ErrorInfo::new(
                                "callback_rejected",
                                format!("the receiver answered HTTP {status} (not retried: only 408, 429 and 5xx are)"),
                            );
                            count_attempt(error.code.as_str());
                            return Outcome::Failed { attempts, error };
                        }
                        ("callback_status", format!("the receiver answered HTTP {status}"), retry_after)
                    }
                    Ok(Err(e)) => {
                        let message = pagestream_pipeline::outbound::error_chain(&e);
                        if message.contains("private, loopback or link-local") {
                            count_attempt("callback_url_refused");
                            return Outcome::Failed {
                                attempts,
                                error: ErrorInfo::new("callback_url_refused", message),
                            };
                        }
                        ("callback_unreachable", message, None)
                    }
                    Err(_) => ("callback_timeout", format!("no answer within {:?}", self.attempt_timeout), None),
                };
            count_attempt(code);
            let wait = retry_after.unwrap_or(delay).min(MAX_DELAY);
            if started.elapsed() + wait > self.retry_for {
                let error = ErrorInfo::new(
                    code,
                    format!("{message}; gave up after {attempts} attempts in {:.0} s", started.elapsed().as_secs_f32()),
                );
                return Outcome::Failed { attempts, error };
            }
            tracing::debug!(
                url,
                webhook_id = hook.id,
                attempts,
                error = message,
                ?wait,
                "webhook delivery failed; retrying"
            );
            tokio::time::sleep(wait).await;
            delay = (delay * 2).min(MAX_DELAY);
        }
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
        let none = HashSet::new();
        assert!(check_url("http://10.0.0.1/hook", &none).unwrap_err().contains("allow_private_hosts"));
        let allowed: HashSet<String> = ["127.0.0.1".to_string()].into();
        assert_eq!(check_url("http://127.0.0.1:9000/hook", &allowed).unwrap().port_u16(), Some(9000));
    }
}
