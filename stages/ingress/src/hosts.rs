//! The `Host` allowlist (`ingress.allowed_hosts`): the defence against DNS
//! rebinding.
//!
//! A web page on `evil.test` can make its name resolve to `127.0.0.1` and
//! then drive the local API from the user's browser: the browser sends
//! `Host: evil.test:8080` and `Origin: http://evil.test:8080`, so comparing
//! the two (the cross-origin check) proves nothing. What the attacker cannot
//! choose is a host name it does not own: a request whose `Host` is not one
//! this server answers to is refused with 421 `misdirected_request`, before
//! any route runs (the probes `/livez`, `/readyz` and `/metrics` excepted:
//! orchestrators and scrapers reach them by whatever address they see).
//!
//! Entries are `host` (any port) or `host:port`, `[v6]` / `[v6]:port`,
//! `*.example.com` (any subdomain) or `*` (any host). An empty list means
//! the default for the bound address: on a loopback address `localhost`,
//! `127.0.0.1`, `[::1]` and the bound address, any port (a tunnel such as
//! `ssh -L 9000:localhost:8080` keeps working; the port is not what a
//! rebinding page controls); on any other address every host, since such a
//! deployment is reachable directly and must use API tokens anyway (a
//! rebinding page does not have the token: browsers keep what the web page
//! stores per origin).

use std::net::{IpAddr, SocketAddr};

use http::{Request, StatusCode};

use crate::error::ApiError;

/// Hosts this server answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHosts {
    /// `None`: any host.
    entries: Option<Vec<Entry>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A host name or address (lower case, IPv6 in brackets), with a port or any.
    Exact(String, Option<u16>),
    /// `*.suffix`: `.suffix` (lower case), any port.
    Subdomains(String),
}

/// A `Host` value split into host (lower case, without a trailing dot,
/// IPv6 in brackets) and port; `None` when it is not `host[:port]`.
fn split_host(value: &str) -> Option<(String, Option<u16>)> {
    if value.is_empty() || value.bytes().any(|b| b <= b' ' || matches!(b, b'@' | b'/' | b'\\' | b'?' | b'#')) {
        return None;
    }
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        inside.parse::<std::net::Ipv6Addr>().ok()?;
        (&value[..inside.len() + 2], after)
    } else {
        match value.find(':') {
            Some(i) => (&value[..i], &value[i..]),
            None => (value, ""),
        }
    };
    let port = match port {
        "" => None,
        p => Some(p.strip_prefix(':')?.parse::<u16>().ok()?),
    };
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host).to_string();
    (!host.is_empty()).then_some((host, port))
}

impl AllowedHosts {
    /// Any host (a deployment reachable directly, or `*` configured).
    pub fn any() -> Self {
        AllowedHosts { entries: None }
    }

    /// The allowlist for `configured` (`ingress.allowed_hosts`) on a server
    /// bound to `bound`; see the module documentation for the default.
    /// Entries that are not `host[:port]` are an error (the configuration
    /// check reports them before the server starts).
    pub fn new(configured: &[String], bound: SocketAddr) -> Result<Self, String> {
        if configured.is_empty() {
            return Ok(Self::default_for(bound.ip()));
        }
        let mut entries = Vec::new();
        for raw in configured {
            match Self::entry(raw)? {
                Some(e) => entries.push(e),
                None => return Ok(Self::any()),
            }
        }
        Ok(AllowedHosts { entries: Some(entries) })
    }

    /// One configured entry (`None`: `*`, any host).
    fn entry(raw: &str) -> Result<Option<Entry>, String> {
        let raw = raw.trim();
        if raw == "*" {
            return Ok(None);
        }
        if let Some(suffix) = raw.strip_prefix("*.") {
            return match split_host(suffix) {
                Some((host, None)) => Ok(Some(Entry::Subdomains(format!(".{host}")))),
                _ => Err(format!("ingress.allowed_hosts: {raw:?} is not *.<domain>")),
            };
        }
        // A bare IPv6 address is accepted without its brackets.
        let bracketed;
        let raw = match raw.parse::<std::net::Ipv6Addr>() {
            Ok(_) => {
                bracketed = format!("[{raw}]");
                &bracketed
            }
            Err(_) => raw,
        };
        match split_host(raw) {
            Some((host, port)) => Ok(Some(Entry::Exact(host, port))),
            None => Err(format!("ingress.allowed_hosts: {raw:?} is not host, host:port, [v6]:port, *.domain or *")),
        }
    }

    /// The default: loopback names and the bound address on a loopback
    /// address, any host elsewhere.
    pub fn default_for(ip: IpAddr) -> Self {
        if !ip.is_loopback() {
            return Self::any();
        }
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()];
        let bound = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        if !names.contains(&bound) {
            names.push(bound);
        }
        AllowedHosts { entries: Some(names.into_iter().map(|n| Entry::Exact(n, None)).collect()) }
    }

    /// Whether requests naming `host` (a `Host` header value) are answered.
    pub fn allows(&self, host: &str) -> bool {
        let Some(entries) = &self.entries else { return true };
        let Some((name, port)) = split_host(host) else { return false };
        entries.iter().any(|e| match e {
            Entry::Exact(h, p) => *h == name && (p.is_none() || *p == port),
            Entry::Subdomains(suffix) => name.ends_with(suffix.as_str()),
        })
    }

    /// 421 `misdirected_request` unless the request names an allowed host:
    /// the authority of an absolute-form target, else the `Host` header. A
    /// request without either (HTTP/1.0) is answered: a browser always sends
    /// `Host`, so such a request is not a rebinding page's.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), ApiError> {
        if self.entries.is_none() {
            return Ok(());
        }
        let host = match req.uri().authority() {
            Some(a) => Some(a.as_str()),
            None => match req.headers().get(http::header::HOST) {
                Some(v) => Some(v.to_str().unwrap_or("\u{fffd}")),
                None => None,
            },
        };
        match host {
            Some(h) if !self.allows(h) => {
                let shown: String = h.chars().take(100).collect();
                Err(ApiError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "misdirected_request",
                    format!(
                        "this server does not answer to host {shown:?}: use the address it listens on, or add the \
                         name to ingress.allowed_hosts"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// For the start-up log line.
    pub fn describe(&self) -> String {
        match &self.entries {
            None => "*".into(),
            Some(entries) => entries
                .iter()
                .map(|e| match e {
                    Entry::Exact(h, Some(p)) => format!("{h}:{p}"),
                    Entry::Exact(h, None) => h.clone(),
                    Entry::Subdomains(s) => format!("*{s}"),
                })
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(addr: &str, configured: &[&str]) -> AllowedHosts {
        let configured: Vec<String> = configured.iter().map(|s| s.to_string()).collect();
        AllowedHosts::new(&configured, addr.parse().unwrap()).unwrap()
    }

    #[test]
    fn loopback_default_allows_loopback_names_on_any_port_only() {
        let hosts = on("127.0.0.1:8080", &[]);
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "localhost:8080",
            "LocalHost:9000",
            "localhost",
            "localhost.:8080",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(hosts.allows(ok), "{ok}");
        }
        for bad in [
            "evil.test:8080",
            "evil.test",
            "localhost.evil.test:8080",
            "127.0.0.1.evil.test",
            "127.0.0.2:8080",
            "user@localhost:8080",
            "localhost:8080/x",
            "localhost:99999",
            "localhost:x",
            "[::2]:8080",
            "[::1",
            "",
            " localhost",
        ] {
            assert!(!hosts.allows(bad), "{bad}");
        }
        // Another loopback address: it is allowed too.
        assert!(on("127.0.0.5:1", &[]).allows("127.0.0.5:1"));
        assert!(on("[::1]:1", &[]).allows("[::1]:1") && on("[::1]:1", &[]).allows("localhost:1"));
    }

    #[test]
    fn any_other_address_allows_any_host_by_default() {
        for addr in ["0.0.0.0:8080", "[::]:8080", "10.0.0.5:80"] {
            let hosts = on(addr, &[]);
            assert!(hosts.allows("evil.test:8080") && hosts.allows("anything"), "{addr}");
            assert_eq!(hosts.describe(), "*");
        }
    }

    #[test]
    fn configured_entries_replace_the_default() {
        let hosts = on("127.0.0.1:8080", &["pagestream.example:443", "*.corp.example", "::1", "LOCALHOST"]);
        assert!(hosts.allows("pagestream.example:443"));
        assert!(!hosts.allows("pagestream.example:8080") && !hosts.allows("pagestream.example"));
        assert!(hosts.allows("a.corp.example") && hosts.allows("b.a.corp.example:8080"));
        assert!(!hosts.allows("corp.example") && !hosts.allows("evilcorp.example"));
        assert!(hosts.allows("[::1]:8080") && hosts.allows("localhost:1"));
        assert!(!hosts.allows("127.0.0.1:8080"), "the default is replaced, not extended");
        assert_eq!(hosts.describe(), "pagestream.example:443, *.corp.example, [::1], localhost");
        assert_eq!(on("127.0.0.1:8080", &["localhost", "*"]), AllowedHosts::any());
        for bad in ["http://x", "x/y", "*.", "*.x:80", "a@b", "x:port"] {
            assert!(AllowedHosts::new(&[bad.to_string()], "127.0.0.1:1".parse().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_check_reads_the_target_authority_then_host() {
        let hosts = on("127.0.0.1:8080", &[]);
        let req = |uri: &str, host: Option<&str>| {
            let mut b = Request::get(uri);
            if let Some(h) = host {
                b = b.header("host", h);
            }
            b.body(()).unwrap()
        };
        let err = hosts.check(&req("/v1/documents", Some("evil.test:8080"))).unwrap_err();
        assert_eq!((err.status.as_u16(), err.code), (421, "misdirected_request"));
        assert!(hosts.check(&req("/v1/documents", Some("127.0.0.1:8080"))).is_ok());
        assert!(hosts.check(&req("http://evil.test/v1/documents", Some("127.0.0.1:8080"))).is_err());
        assert!(hosts.check(&req("/v1/documents", None)).is_ok(), "HTTP/1.0 without Host");
        let mut bad = req("/", None);
        bad.headers_mut().insert("host", http::HeaderValue::from_bytes(b"\xfflocalhost").unwrap());
        assert!(hosts.check(&bad).is_err());
    }
}
