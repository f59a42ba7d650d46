//! `[uploader]`: the uploader's settings, owned and checked here. The
//! result store's keys are [`ResultsConfig`] (the results crate's, as the
//! ingress reads them too), embedded flat.

use pagestream_pipeline::config::Section;
use pagestream_results::content::Role;
use pagestream_results::ResultsConfig;
use serde::{Deserialize, Serialize};

/// `[uploader]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct UploaderConfig {
    /// Where results go (`target`, `dir`, `prefix`, `s3_*`).
    #[serde(flatten)]
    pub results: ResultsConfig,
    /// Pages written at the same time by one process.
    pub concurrency: usize,
    /// Regions whose image is cut out of the page and written beside it
    /// (`pages/<n>-<order>.png`), by role: `figure`, `table`, `equation`
    /// (a TOML list, or comma separated; empty: none).
    #[serde(deserialize_with = "pagestream_pipeline::util::list")]
    pub crops: Vec<String>,
    /// Address of /metrics, /livez, /readyz (empty: disabled).
    pub admin_addr: String,
}

impl Default for UploaderConfig {
    fn default() -> Self {
        UploaderConfig {
            results: ResultsConfig::default(),
            concurrency: 4,
            crops: Vec::new(),
            admin_addr: "127.0.0.1:9103".into(),
        }
    }
}

impl UploaderConfig {
    /// The roles named by `crops`.
    pub fn crop_roles(&self) -> Vec<Role> {
        Role::CROPPABLE.iter().filter(|(n, _)| self.crops.iter().any(|c| c == n)).map(|(_, r)| *r).collect()
    }
}

impl Section for UploaderConfig {
    const NAME: &'static str = "uploader";

    fn check(&self, errors: &mut Vec<String>) {
        errors.extend(self.results.problems());
        if self.concurrency == 0 {
            errors.push("uploader.concurrency must be at least 1".into());
        }
        for c in &self.crops {
            if !Role::CROPPABLE.iter().any(|(name, _)| name == c) {
                let names: Vec<&str> = Role::CROPPABLE.iter().map(|(n, _)| *n).collect();
                errors.push(format!("uploader.crops: {c:?} is not one of {}", names.join(", ")));
            }
        }
    }
}
