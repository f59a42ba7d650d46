//! Tenants: the API tokens sharing one pipeline, their limits and weights.
//!
//! A tenant is identified by its *owner id*, 16 hex characters of the
//! sha256 of its API token ([`owner_id`]): what documents record as their
//! owner (`DocInfo::owner`, `DocumentSubmitted::owner`), what `/v1/capacity`
//! shows, and what `tenants.overrides` names, so the configuration never
//! needs a token twice. Documents published on NATS without an owner, and
//! every document of an API without tokens, belong to the anonymous tenant
//! ([`ANONYMOUS`]), which gets the defaults.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// The tenant of documents without an owner.
pub const ANONYMOUS: &str = "anonymous";

/// The owner id of an API token: 16 hex characters of its sha256.
pub fn owner_id(token: &str) -> String {
    hex::encode(&sha2::Sha256::digest(token.as_bytes())[..8])
}

/// The tenant key of an owner (`None`: [`ANONYMOUS`]).
pub fn tenant_of(owner: Option<&str>) -> &str {
    owner.unwrap_or(ANONYMOUS)
}

/// One tenant's limits and scheduling weight. 0 means "no limit" for each
/// limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantLimits {
    /// Documents queued or running at once; one more is refused 429.
    pub max_documents: u32,
    /// Pages rendered and not yet finished, all the tenant's documents
    /// together; the splitter waits above it.
    pub max_pages_in_flight: u32,
    /// Pages accepted per rolling hour; a submission over it is refused 429.
    pub pages_per_hour: u32,
    /// Share of the pipeline against other tenants with work waiting
    /// (1..=1000).
    pub weight: u32,
    /// `s3://bucket/prefix` locations the tenant may submit by reference
    /// (empty: the default's; see `tenants.source_prefixes`).
    pub source_prefixes: Vec<String>,
}

/// `[tenants]`: limits of every tenant, and per-tenant overrides.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsConfig {
    /// Default for every tenant: documents queued or running at once (0: no limit).
    pub max_documents: u32,
    /// Default: pages rendered and not yet finished across a tenant's documents (0: no limit).
    pub max_pages_in_flight: u32,
    /// Default: pages accepted per rolling hour (0: no limit).
    pub pages_per_hour: u32,
    /// Default scheduling weight.
    pub weight: u32,
    /// Default `s3://bucket/prefix` locations a tenant may submit by
    /// reference. With API tokens configured, an `s3://` source must start
    /// with one of the tenant's prefixes; without tokens, any key of
    /// `splitter.source_s3_buckets` may be read.
    #[serde(deserialize_with = "crate::util::list")]
    pub source_prefixes: Vec<String>,
    /// Per-tenant overrides, one string each: the owner id, then
    /// `key=value` pairs separated by spaces, e.g.
    /// `"3f2a9c0d1e4b5a67 weight=4 max_documents=500 source_prefixes=s3://in/a/|s3://in/b/"`.
    #[serde(deserialize_with = "crate::util::list")]
    pub overrides: Vec<String>,
}

impl Default for TenantsConfig {
    fn default() -> Self {
        TenantsConfig {
            max_documents: 1000,
            max_pages_in_flight: 0,
            pages_per_hour: 0,
            weight: 1,
            source_prefixes: Vec::new(),
            overrides: Vec::new(),
        }
    }
}

impl TenantsConfig {
    /// The defaults, before any override.
    pub fn defaults(&self) -> TenantLimits {
        TenantLimits {
            max_documents: self.max_documents,
            max_pages_in_flight: self.max_pages_in_flight,
            pages_per_hour: self.pages_per_hour,
            weight: self.weight,
            source_prefixes: self.source_prefixes.clone(),
        }
    }

    /// The limits of `owner` (`None`: the anonymous tenant): the defaults
    /// with the owner's override applied. Overrides were checked at load
    /// ([`TenantsConfig::check`]).
    pub fn limits_for(&self, owner: Option<&str>) -> TenantLimits {
        let mut limits = self.defaults();
        let key = tenant_of(owner);
        for o in &self.overrides {
            if let Ok((id, apply)) = parse_override(o) {
                if id == key {
                    apply(&mut limits);
                }
            }
        }
        limits
    }

    /// Every problem with the section ([`crate::config::Section::check`]).
    pub fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !(1..=1000).contains(&self.weight) {
            errors.push("tenants.weight must be within 1..=1000".into());
        }
        for p in &self.source_prefixes {
            if let Err(e) = check_prefix(p) {
                errors.push(format!("tenants.source_prefixes: {e}"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for o in &self.overrides {
            match parse_override(o) {
                Ok((id, apply)) => {
                    if !seen.insert(id.to_string()) {
                        errors.push(format!("tenants.overrides: {id} is given twice"));
                    }
                    let mut l = self.defaults();
                    apply(&mut l);
                    if !(1..=1000).contains(&l.weight) {
                        errors.push(format!("tenants.overrides {id}: weight must be within 1..=1000"));
                    }
                }
                Err(e) => errors.push(format!("tenants.overrides {o:?}: {e}")),
            }
        }
        errors
    }
}

/// Checks an `s3://bucket/prefix` grant.
fn check_prefix(p: &str) -> Result<(), String> {
    let rest = p.strip_prefix("s3://").ok_or_else(|| format!("{p:?} must start with s3://"))?;
    let bucket = rest.split('/').next().unwrap_or_default();
    if bucket.is_empty() {
        return Err(format!("{p:?} names no bucket"));
    }
    Ok(())
}

type Apply = Box<dyn Fn(&mut TenantLimits)>;

/// `"<owner id> key=value …"` → the owner id and what it changes.
fn parse_override(text: &str) -> Result<(&str, Apply), String> {
    let mut parts = text.split_whitespace();
    let id = parts.next().ok_or("empty override")?;
    let valid_id = id == ANONYMOUS || (id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    if !valid_id {
        return Err(format!(
            "{id:?} is not an owner id (16 lowercase hex characters: `printf %s TOKEN | sha256sum | cut -c1-16`) or {ANONYMOUS:?}"
        ));
    }
    let mut changes: Vec<Apply> = Vec::new();
    for kv in parts {
        let (k, v) = kv.split_once('=').ok_or_else(|| format!("{kv:?}: expected key=value"))?;
        let num = || v.parse::<u32>().map_err(|_| format!("{k}: {v:?} is not a whole number"));
        match k {
            "max_documents" => {
                let n = num()?;
                changes.push(Box::new(move |l| l.max_documents = n));
            }
            "max_pages_in_flight" => {
                let n = num()?;
                changes.push(Box::new(move |l| l.max_pages_in_flight = n));
            }
            "pages_per_hour" => {
                let n = num()?;
                changes.push(Box::new(move |l| l.pages_per_hour = n));
            }
            "weight" => {
                let n = num()?;
                changes.push(Box::new(move |l| l.weight = n));
            }
            "source_prefixes" => {
                let list: Vec<String> = v.split('|').filter(|p| !p.is_empty()).map(str::to_string).collect();
                for p in &list {
                    check_prefix(p)?;
                }
                changes.push(Box::new(move |l| l.source_prefixes = list.clone()));
            }
            _ => {
                return Err(format!(
                    "unknown key {k:?} (max_documents, max_pages_in_flight, pages_per_hour, weight, source_prefixes)"
                ))
            }
        }
    }
    Ok((id, Box::new(move |l| changes.iter().for_each(|c| c(l)))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_id_is_16_hex_of_sha256() {
        // printf %s secret | sha256sum → 2bb80d537b1da3e3…
        assert_eq!(owner_id("secret"), "2bb80d537b1da3e3");
    }

    #[test]
    fn overrides_apply_to_their_owner_only() {
        let c = TenantsConfig {
            overrides: vec![
                "2bb80d537b1da3e3 weight=4 max_documents=7 source_prefixes=s3://in/a/|s3://in/b/".into(),
                "anonymous pages_per_hour=100".into(),
            ],
            ..TenantsConfig::default()
        };
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let a = c.limits_for(Some("2bb80d537b1da3e3"));
        assert_eq!((a.weight, a.max_documents, a.pages_per_hour), (4, 7, 0));
        assert_eq!(a.source_prefixes, ["s3://in/a/", "s3://in/b/"]);
        let other = c.limits_for(Some("0000000000000000"));
        assert_eq!(other, c.defaults());
        assert_eq!(c.limits_for(None).pages_per_hour, 100);
    }

    #[test]
    fn bad_overrides_are_reported() {
        let c = TenantsConfig {
            weight: 0,
            overrides: vec![
                "nothex weight=2".into(),
                "2bb80d537b1da3e3 colour=blue".into(),
                "2bb80d537b1da3e3 weight=x".into(),
                "0000000000000000 weight=5000".into(),
                "0000000000000001 source_prefixes=http://x/".into(),
            ],
            ..TenantsConfig::default()
        };
        let errors = c.problems();
        assert_eq!(errors.len(), 6, "{errors:#?}");
    }
}
