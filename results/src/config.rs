//! Where results are written and read: the store keys of the uploader's
//! section (`[uploader]`, which owns them) that the ingress reads too, as a
//! [`Section`] view.

use std::path::PathBuf;

use pagestream_pipeline::config::{S3Connection, Section};
use serde::{Deserialize, Serialize};

/// Where results are written (`uploader.target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A local directory (`uploader.dir`).
    Local,
    /// An S3 bucket (`uploader.s3_*`).
    S3,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Local => "local",
            Target::S3 => "s3",
        }
    }
}

/// The result store's settings: keys of `[uploader]` (the uploader's section
/// embeds them; the ingress reads them as a view).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ResultsConfig {
    /// `local` (a directory) or `s3`.
    pub target: Target,
    /// Results directory for `target = "local"`.
    pub dir: PathBuf,
    /// Key prefix under which `<doc_id>/…` is written (both targets).
    pub prefix: String,
    pub s3_bucket: String,
    /// Custom endpoint (MinIO, moto, …); empty for AWS.
    pub s3_endpoint: String,
    pub s3_region: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3 servers other than AWS.
    pub s3_path_style: bool,
    /// Static credentials; empty: the standard AWS chain (env, profile, IMDS).
    pub s3_access_key_id: String,
    pub s3_secret_access_key: String,
}

impl Default for ResultsConfig {
    fn default() -> Self {
        ResultsConfig {
            target: Target::Local,
            dir: PathBuf::from("out"),
            prefix: String::new(),
            s3_bucket: String::new(),
            s3_endpoint: String::new(),
            s3_region: "us-east-1".into(),
            s3_path_style: false,
            s3_access_key_id: String::new(),
            s3_secret_access_key: String::new(),
        }
    }
}

impl Section for ResultsConfig {
    const NAME: &'static str = "uploader";
}

impl ResultsConfig {
    /// The connection results are written and read with.
    pub fn s3_connection(&self) -> S3Connection {
        S3Connection {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            access_key_id: self.s3_access_key_id.clone(),
            secret_access_key: self.s3_secret_access_key.clone(),
        }
    }

    /// Every problem with these settings (the owner's check runs them).
    pub fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.target == Target::S3 {
            if self.s3_bucket.is_empty() {
                errors.push("uploader.s3_bucket is required when uploader.target = \"s3\"".into());
            }
            if self.s3_access_key_id.is_empty() != self.s3_secret_access_key.is_empty() {
                errors.push("uploader.s3_access_key_id and uploader.s3_secret_access_key go together".into());
            }
        }
        if self.prefix.starts_with('/') || self.prefix.contains("..") {
            errors.push("uploader.prefix must be relative and must not contain '..'".into());
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagestream_pipeline::config::Sources;

    #[test]
    fn a_view_reads_its_keys_and_leaves_the_owners_to_the_owner() {
        let file = "[uploader]\ntarget = \"s3\"\ns3_bucket = \"b\"\nconcurrency = 9\n";
        let mut sources = Sources::from_parts(Some(file), [("PAGESTREAM_UPLOADER_S3_PATH_STYLE".into(), "1".into())]);
        let results: ResultsConfig = sources.view();
        sources.finish().expect("uploader.concurrency is the uploader's to check");
        assert_eq!((results.target, results.s3_bucket.as_str(), results.s3_path_style), (Target::S3, "b", true));
        assert!(ResultsConfig { target: Target::S3, ..ResultsConfig::default() }.problems()[0].contains("s3_bucket"));
        let mut sources = Sources::from_parts(Some("[uploader]\ntarget = \"gcs\"\n"), []);
        let _: ResultsConfig = sources.view();
        let err = sources.finish().unwrap_err().to_string();
        assert!(err.contains("[uploader]") && err.contains("gcs"), "{err}");
    }
}
