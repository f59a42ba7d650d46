//! Outbound HTTP(S) to addresses users give (webhooks, documents by URL):
//! one client whose resolver refuses names that resolve to private,
//! loopback or link-local addresses unless allowed, and connects only to
//! the addresses it checked; TLS through rustls with the system roots.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use crate::callbacks::is_public;

/// DNS resolution that refuses names resolving to non-public addresses
/// (unless allowed by name), so a webhook cannot reach internal hosts. The
/// checked addresses are the ones connected to (no second lookup).
#[derive(Clone)]
pub struct GuardedResolver {
    allow: Arc<HashSet<String>>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_ascii_lowercase();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow.contains(&host) {
                if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "{host} resolves to {}, a private, loopback or link-local address; allow it with notifier.allow_private_hosts",
                            bad.ip()
                        ),
                    ));
                }
            }
            Ok(addrs.into_iter())
        })
    }
}

/// The connector of [`guarded_client`].
pub type Https = hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>;

/// Lowercased host names / addresses of an allow-list setting.
pub fn allow_set(hosts: &[String]) -> Arc<HashSet<String>> {
    Arc::new(
        hosts.iter().map(|h| h.trim().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase()).collect(),
    )
}

/// An HTTP(S) client that reaches only public addresses, or hosts in
/// `allow`; no redirects are followed (hyper never does).
pub fn guarded_client<B>(allow: Arc<HashSet<String>>, connect_timeout: Duration) -> Client<Https, B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = HttpConnector::new_with_resolver(GuardedResolver { allow });
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone()) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "no system CA certificates: outbound https:// requests will fail");
            let empty = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("the default protocol versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(empty)
        }
    };
    let https = builder.https_or_http().enable_http1().wrap_connector(http);
    Client::builder(hyper_util::rt::TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https)
}

/// The whole error chain of `e`, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    message
}
