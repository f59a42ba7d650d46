//! Outbound HTTP(S) to addresses users give (webhooks, documents by URL):
//! one client whose resolver refuses names that resolve to private,
//! loopback or link-local addresses unless allowed, and connects only to
//! the addresses it checked; TLS through rustls with the system roots.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

/// DNS resolution that refuses names resolving to non-public addresses
/// (unless allowed by name), so a webhook cannot reach internal hosts. The
/// checked addresses are the ones connected to (no second lookup).
#[derive(Clone)]
pub struct GuardedResolver {
    allow: Arc<HashSet<String>>,
    /// The allow-list setting named in refusals.
    setting: &'static str,
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
        let setting = self.setting;
        Box::pin(async move {
            let host = name.as_str().to_ascii_lowercase();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow.contains(&host) {
                if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "{host} resolves to {}, a private, loopback or link-local address; allow it with {setting}",
                            bad.ip()
                        ),
                    ));
                }
            }
            Ok(addrs.into_iter())
        })
    }
}

/// The connector of [`AddressPolicy::client`].
pub type Https = hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>;

/// Where requests to URLs users give may go: public addresses, and the
/// hosts of one allow-list setting. Each use (webhooks, documents by URL)
/// has its own policy, so every refusal names the request's field and the
/// setting that would allow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPolicy {
    /// What the URL is called in errors (`callback_url`, `source.url`).
    pub field: &'static str,
    /// The setting allowing private hosts (`notifier.allow_private_hosts`).
    pub setting: &'static str,
    /// Host names / addresses of that setting, lowercased, no brackets.
    pub allow: Arc<HashSet<String>>,
}

impl AddressPolicy {
    pub fn new(field: &'static str, setting: &'static str, hosts: &[String]) -> AddressPolicy {
        let allow =
            hosts.iter().map(|h| h.trim().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase()).collect();
        AddressPolicy { field, setting, allow: Arc::new(allow) }
    }

    /// Webhooks' policy: `callback_url`, `notifier.allow_private_hosts`.
    pub fn webhooks(allow_private_hosts: &[String]) -> AddressPolicy {
        AddressPolicy::new("callback_url", "notifier.allow_private_hosts", allow_private_hosts)
    }

    /// Documents by reference: `source.url`, `splitter.source_allow_private_hosts`.
    pub fn sources(source_allow_private_hosts: &[String]) -> AddressPolicy {
        AddressPolicy::new("source.url", "splitter.source_allow_private_hosts", source_allow_private_hosts)
    }

    /// The same policy for a URL called `field` in errors.
    pub fn for_field(&self, field: &'static str) -> AddressPolicy {
        AddressPolicy { field, ..self.clone() }
    }

    /// A URL's syntax and, when its host is a literal IP address, that the
    /// address is public or allowed (names are checked when resolved, by
    /// [`AddressPolicy::client`]'s resolver).
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let field = self.field;
        pagestream_schemas::validate_callback_url(url).map_err(|e| format!("{field} {e}"))?;
        let host = url_host(url).ok_or_else(|| format!("{field} has no host"))?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            if !is_public(ip) && !self.allow.contains(&host) {
                return Err(format!(
                    "{field} points at {ip}, a private, loopback or link-local address; allow it with {}",
                    self.setting
                ));
            }
        }
        Ok(())
    }

    /// An HTTP(S) client that reaches only public addresses, or allowed
    /// hosts; no redirects are followed (hyper never does).
    pub fn client<B>(&self, connect_timeout: Duration) -> Client<Https, B>
    where
        B: hyper::body::Body + Send + 'static + Unpin,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let resolver = GuardedResolver { allow: self.allow.clone(), setting: self.setting };
        let mut http = HttpConnector::new_with_resolver(resolver);
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone())
        {
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

/// Whether `ip` is on the public internet (not loopback, private,
/// link-local, shared, documentation, multicast or reserved).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            let o = v6.octets();
            let embedded = |at: usize| IpAddr::V4(std::net::Ipv4Addr::new(o[at], o[at + 1], o[at + 2], o[at + 3]));
            // Forms that carry an IPv4 address the network may route to:
            // public only when that address is.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(embedded(12)); // NAT64, well-known prefix 64:ff9b::/96
            }
            if seg[0] == 0x2002 {
                return is_public(embedded(2)); // 6to4 2002:a.b.c.d::/48
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || seg[..6] == [0; 6] // IPv4-compatible ::a.b.c.d (deprecated)
                || seg[..6] == [0, 0, 0, 0, 0xffff, 0] // IPv4-translated ::ffff:0:a.b.c.d
                || (seg[0] == 0x64 && seg[1] == 0xff9b) // NAT64 local use 64:ff9b:1::/48, unassigned rest
                || seg[..4] == [0x100, 0, 0, 0] // discard-only 100::/64
                || (seg[0] == 0x2001 && seg[1] < 0x200) // IETF special purpose 2001::/23 (Teredo, benchmarking, ORCHID)
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link-local
                || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
                || seg[0] == 0x3fff) // documentation 3fff::/20 (inside 3fff::/16)
        }
    }
}

/// The host of an `http(s)://` URL, lowercased, IPv6 without brackets.
pub fn url_host(url: &str) -> Option<String> {
    let lower = url.to_ascii_lowercase();
    let rest = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    Some(host.to_string()).filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhooks(allow: &[String]) -> AddressPolicy {
        AddressPolicy::webhooks(allow)
    }

    #[test]
    fn private_addresses_are_refused_unless_allowed() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        // IPv6 forms that carry (or route to) an internal IPv4 address, and
        // deprecated local ranges: all refused.
        for ip in [
            "::127.0.0.1",        // IPv4-compatible
            "::10.0.0.1",         // IPv4-compatible
            "::8.8.8.8",          // IPv4-compatible (deprecated: never public)
            "::ffff:0:127.0.0.1", // IPv4-translated
            "::ffff:0:8.8.8.8",   // IPv4-translated
            "2002:7f00:1::",      // 6to4 of 127.0.0.1
            "2002:a9fe:a9fe::1",  // 6to4 of 169.254.169.254
            "2002:c0a8:101::",    // 6to4 of 192.168.1.1
            "64:ff9b::10.0.0.1",  // NAT64 of a private address
            "64:ff9b::169.254.169.254",
            "64:ff9b::127.0.0.1",
            "64:ff9b:1::8.8.8.8", // local-use NAT64 64:ff9b:1::/48
            "64:ff9b:1:ffff::1",
            "fec0::1",   // site-local
            "feff::1",   // site-local
            "100::1",    // discard-only
            "2001::1",   // Teredo
            "2001:2::1", // benchmarking
            "3fff::1",   // documentation
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
            assert!(webhooks(&[]).check_url(&format!("http://[{ip}]/hook")).is_err(), "{ip}");
        }
        // The same forms around a public IPv4 address are public.
        for ip in ["64:ff9b::8.8.8.8", "2002:808:808::1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        let err = webhooks(&[]).check_url("http://169.254.169.254/latest/meta-data").unwrap_err();
        assert!(
            err.starts_with("callback_url points at 169.254.169.254") && err.contains("notifier.allow_private_hosts"),
            "{err}"
        );
        // Another policy names its own field and setting: no caller rewrites the message.
        let sources = AddressPolicy::sources(&[]);
        let err = sources.check_url("http://10.0.0.1/doc.pdf").unwrap_err();
        assert!(
            err.starts_with("source.url points at 10.0.0.1") && err.ends_with("splitter.source_allow_private_hosts"),
            "{err}"
        );
        assert!(sources.for_field("url").check_url("ftp://x").unwrap_err().starts_with("url "));
        assert!(webhooks(&[]).check_url("http://[::1]:8080/hook").is_err());
        let allowed = webhooks(&["127.0.0.1".to_string(), "::1".to_string()]);
        assert!(allowed.check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(allowed.check_url("http://[::1]:8080/hook").is_ok());
        assert!(webhooks(&[]).check_url("https://hooks.example.com/x").is_ok(), "names are checked when resolved");
        for bad in
            ["ftp://x/y", "http://user:pw@example.com/", "http:///nohost", "http://example.com:0/", "http://a b/"]
        {
            assert!(webhooks(&[]).check_url(bad).is_err(), "{bad}");
        }
        assert_eq!(url_host("https://Hooks.Example.com:8443/a?b").as_deref(), Some("hooks.example.com"));
    }
}
