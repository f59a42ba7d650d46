//! What the notifier records about webhooks, and what the ingress reads
//! back for a document's status (`callback: {state, …}`); plus the
//! address rules both apply to a callback URL.
//!
//! Bucket `<prefix>_callbacks`, per document:
//! - `<doc>.pages`: pages whose page event is finished (delivered or given up);
//! - `<doc>.page_failures`: pages whose page event was given up;
//! - `<doc>.pages_seen`: pages whose page event the notifier read and scheduled;
//! - `<doc>.pages_lost`: pages with an outcome whose page event the notifier
//!   never read (evicted from the events stream first): recorded as failed too;
//! - `<doc>.scheduled`: the terminal event's delivery is scheduled (by the
//!   events consumer, or by the sweep for an event evicted unread);
//! - `<doc>.document`: the terminal event's delivery ([`CallbackRecord`]).

use std::net::IpAddr;

use anyhow::Result;
use async_nats::jetstream;
use bytes::Bytes;
use pagestream_schemas::ErrorInfo;
use serde::{Deserialize, Serialize};

use crate::counters::{Counters, PageSet};
use crate::nats::Names;

/// The delivery of a document's terminal event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackRecord {
    /// `delivered` or `failed`.
    pub state: String,
    /// The webhook's `type` (`document.completed`, …) and `webhook-id`.
    pub event: String,
    pub webhook_id: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    pub at: String,
}

/// The callbacks bucket.
#[derive(Debug, Clone)]
pub struct CallbackStore {
    sets: Counters,
}

impl CallbackStore {
    pub async fn open(js: &jetstream::Context, names: &Names, replicas: usize) -> Result<Self> {
        let sets = Counters::open_bucket(
            js,
            names.callbacks_bucket(),
            "pagestream: webhook deliveries per document, see pipeline/src/callbacks.rs",
            replicas,
        )
        .await?;
        Ok(CallbackStore { sets })
    }

    pub async fn pages_done(&self, doc_id: &str) -> Result<PageSet> {
        self.sets.get_key(&format!("{doc_id}.pages")).await
    }

    pub async fn page_failures(&self, doc_id: &str) -> Result<PageSet> {
        self.sets.get_key(&format!("{doc_id}.page_failures")).await
    }

    /// Page `page`'s event is finished; `failed`: it was given up.
    pub async fn page_done(&self, doc_id: &str, page: u32, failed: bool) -> Result<()> {
        if failed {
            self.sets.mark_key(&format!("{doc_id}.page_failures"), page).await?;
        }
        self.sets.mark_key(&format!("{doc_id}.pages"), page).await?;
        Ok(())
    }

    /// Page `page`'s event was read and its delivery scheduled.
    pub async fn page_seen(&self, doc_id: &str, page: u32) -> Result<()> {
        self.sets.mark_key(&format!("{doc_id}.pages_seen"), page).await?;
        Ok(())
    }

    pub async fn pages_seen(&self, doc_id: &str) -> Result<PageSet> {
        self.sets.get_key(&format!("{doc_id}.pages_seen")).await
    }

    /// Page `page` has an outcome but its event never reached the notifier
    /// (evicted unread): finished, failed and lost.
    pub async fn page_lost(&self, doc_id: &str, page: u32) -> Result<()> {
        self.sets.mark_key(&format!("{doc_id}.pages_lost"), page).await?;
        self.page_done(doc_id, page, true).await
    }

    pub async fn pages_lost(&self, doc_id: &str) -> Result<PageSet> {
        self.sets.get_key(&format!("{doc_id}.pages_lost")).await
    }

    /// The document's terminal webhook is scheduled (on the webhooks stream).
    pub async fn document_scheduled(&self, doc_id: &str) -> Result<()> {
        let key = format!("{doc_id}.scheduled");
        self.sets
            .store()
            .put(&key, Bytes::from_static(b"1"))
            .await
            .map_err(|e| anyhow::anyhow!("writing {key}: {e}"))?;
        Ok(())
    }

    pub async fn is_document_scheduled(&self, doc_id: &str) -> Result<bool> {
        let key = format!("{doc_id}.scheduled");
        match self.sets.store().get(&key).await {
            Ok(v) => Ok(v.is_some()),
            Err(e) => Err(anyhow::anyhow!("reading {key}: {e}")),
        }
    }

    pub async fn record(&self, doc_id: &str) -> Result<Option<CallbackRecord>> {
        let key = format!("{doc_id}.document");
        match self.sets.store().get(&key).await {
            Ok(Some(bytes)) => Ok(serde_json::from_slice(&bytes).ok()),
            Ok(None) => Ok(None),
            Err(e) => Err(anyhow::anyhow!("reading {key}: {e}")),
        }
    }

    pub async fn set_record(&self, doc_id: &str, record: &CallbackRecord) -> Result<()> {
        let key = format!("{doc_id}.document");
        let bytes = Bytes::from(serde_json::to_vec(record)?);
        self.sets.store().put(&key, bytes).await.map_err(|e| anyhow::anyhow!("writing {key}: {e}"))?;
        Ok(())
    }

    /// `{state: pending|delivered|failed, error?, failed_pages?,
    /// lost_pages?}` for a document's status: `failed` when its terminal
    /// event or any page event was given up (or lost: never read).
    pub async fn summary(&self, doc_id: &str) -> Result<serde_json::Value> {
        let (record, failures, lost) =
            tokio::try_join!(self.record(doc_id), self.page_failures(doc_id), self.pages_lost(doc_id))?;
        let failed_pages: Vec<u32> = failures.pages().collect();
        let mut v = match &record {
            None => serde_json::json!({"state": "pending"}),
            Some(r) => serde_json::json!({
                "state": r.state, "event": r.event, "webhook_id": r.webhook_id, "attempts": r.attempts, "at": r.at,
            }),
        };
        if let Some(e) = record.as_ref().and_then(|r| r.error.as_ref()) {
            v["error"] = serde_json::json!(e);
        }
        if !failed_pages.is_empty() {
            v["state"] = "failed".into();
            v["failed_pages"] = serde_json::json!(failed_pages);
        }
        if !lost.is_empty() {
            v["lost_pages"] = serde_json::json!(lost.pages().collect::<Vec<u32>>());
        }
        Ok(v)
    }
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

/// A callback URL's syntax and, when its host is a literal IP address,
/// that the address is public or in `allow` (names are checked by the
/// notifier when it resolves them).
pub fn check_callback_url(url: &str, allow: &[String]) -> Result<(), String> {
    pagestream_schemas::validate_callback_url(url).map_err(|e| format!("callback_url {e}"))?;
    let host = url_host(url).ok_or("callback_url has no host")?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        let allowed =
            allow.iter().any(|a| a.trim().trim_start_matches('[').trim_end_matches(']').eq_ignore_ascii_case(&host));
        if !is_public(ip) && !allowed {
            return Err(format!(
                "callback_url points at {ip}, a private, loopback or link-local address; allow it with notifier.allow_private_hosts"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert!(check_callback_url(&format!("http://[{ip}]/hook"), &[]).is_err(), "{ip}");
        }
        // The same forms around a public IPv4 address are public.
        for ip in ["64:ff9b::8.8.8.8", "2002:808:808::1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        let err = check_callback_url("http://169.254.169.254/latest/meta-data", &[]).unwrap_err();
        assert!(err.contains("notifier.allow_private_hosts"), "{err}");
        assert!(check_callback_url("http://[::1]:8080/hook", &[]).is_err());
        let allowed = ["127.0.0.1".to_string(), "::1".to_string()];
        assert!(check_callback_url("http://127.0.0.1:9000/hook", &allowed).is_ok());
        assert!(check_callback_url("http://[::1]:8080/hook", &allowed).is_ok());
        assert!(check_callback_url("https://hooks.example.com/x", &[]).is_ok(), "names are checked when resolved");
        for bad in
            ["ftp://x/y", "http://user:pw@example.com/", "http:///nohost", "http://example.com:0/", "http://a b/"]
        {
            assert!(check_callback_url(bad, &[]).is_err(), "{bad}");
        }
        assert_eq!(url_host("https://Hooks.Example.com:8443/a?b").as_deref(), Some("hooks.example.com"));
    }
}
