//! The whole configuration: every section, each defined and checked by its
//! owner (`pagestream_pipeline::config` for the shared ones, each stage's
//! crate for its own). The all-in-one mode (`pagestream run`, the demo and
//! the tests) owns every section, so it checks the whole file; it hands each
//! stage what that stage's binary would read from the same sources.

use std::path::Path;

use pagestream_inferencer::InferencerConfig;
use pagestream_ingress::IngressConfig;
use pagestream_notifier::NotifierConfig;
use pagestream_pipeline::config::{ConfigError, NatsConfig, PipelineConfig, Sources};
use pagestream_pipeline::tenants::TenantsConfig;
use pagestream_splitter::SplitterConfig;
use pagestream_uploader::UploaderConfig;
use serde::{Deserialize, Serialize};

/// Every section of the configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    pub pipeline: PipelineConfig,
    pub nats: NatsConfig,
    pub tenants: TenantsConfig,
    pub ingress: IngressConfig,
    pub splitter: SplitterConfig,
    pub inferencer: InferencerConfig,
    pub uploader: UploaderConfig,
    pub notifier: NotifierConfig,
}

impl Config {
    /// Defaults, then `file` (or `$PAGESTREAM_CONFIG`), then the process
    /// environment; every problem reported at once.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::read(Sources::load(file))
    }

    /// From a TOML text and `(name, value)` environment pairs.
    pub fn from_sources(
        toml_text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::read(Sources::from_parts(toml_text, env))
    }

    fn read(mut sources: Sources) -> Result<Config, ConfigError> {
        let config = Config {
            pipeline: sources.section(),
            nats: sources.section(),
            tenants: sources.section(),
            ingress: sources.section(),
            splitter: sources.section(),
            inferencer: sources.section(),
            uploader: sources.section(),
            notifier: sources.section(),
        };
        sources.finish()?;
        Ok(config)
    }

    /// Checks every section (after editing one in code).
    pub fn validate(&self) -> Result<(), ConfigError> {
        Self::read(self.sources()).map(drop)
    }

    /// These settings as configuration sources.
    pub fn sources(&self) -> Sources {
        Sources::from_config(self)
    }

    /// The shared settings every stage gets in its context.
    pub fn shared(&self) -> pagestream_pipeline::Config {
        pagestream_pipeline::Config::read(&mut self.sources())
    }

    /// The ingress's settings: its section and its views of others'.
    pub fn ingress_settings(&self) -> pagestream_ingress::Settings {
        pagestream_ingress::Settings::read(&mut self.sources())
    }
}

#[cfg(test)]
mod tests {
    use pagestream_inferencer::{Backend, Device};
    use pagestream_results::Target;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn each_stage_hands_out_its_own_s3_connection_and_never_prints_the_secret() {
        let mut c = Config::default();
        c.uploader.results.s3_endpoint = "http://results:9000".into();
        c.uploader.results.s3_secret_access_key = "results-secret".into();
        c.splitter.source_s3_endpoint = "http://sources:9000".into();
        c.splitter.source_s3_path_style = true;
        c.splitter.source_s3_secret_access_key = "sources-secret".into();
        let (results, sources) = (c.uploader.results.s3_connection(), c.splitter.source_s3_connection());
        assert_eq!((results.endpoint.as_str(), results.path_style), ("http://results:9000", false));
        assert_eq!((sources.endpoint.as_str(), sources.path_style), ("http://sources:9000", true));
        assert_eq!(sources.secret_access_key, "sources-secret");
        for conn in [results, sources] {
            assert!(!format!("{conn:?}").contains("-secret"), "{conn:?}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_sources(None, env(&[])).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.splitter.dpi, 150.0);
        assert_eq!(c.uploader.results.target, Target::Local);
        assert_eq!(c.shared().default_model(), "layout_cdla");
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let file = "[splitter]\ndpi = 200.0\n[uploader]\nconcurrency = 2\ndir = \"res\"\n";
        let c = Config::from_sources(
            Some(file),
            env(&[("PAGESTREAM_SPLITTER_DPI", "300"), ("PAGESTREAM_UPLOADER_S3_PATH_STYLE", "true"), ("OTHER", "x")]),
        )
        .unwrap();
        assert_eq!(c.splitter.dpi, 300.0);
        assert_eq!(c.uploader.concurrency, 2);
        assert!(c.uploader.results.s3_path_style);
        assert_eq!(c.uploader.results.dir, Path::new("res"));
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let file = "[splitter]\ndpi = \"high\"\nbogus = 1\n[nope]\nx = 1\n";
        let err = Config::from_sources(
            Some(file),
            env(&[
                ("PAGESTREAM_UPLOADER_CONCURRENCY", "many"),
                ("PAGESTREAM_INGRESS_NOPE", "1"),
                ("PAGESTREAM_DEPS", "/ignored"),
            ]),
        )
        .unwrap_err();
        let all = err.to_string();
        for needle in ["splitter.bogus", "[nope]", "PAGESTREAM_UPLOADER_CONCURRENCY", "ingress.nope"] {
            assert!(all.contains(needle), "{needle} missing from: {all}");
        }
        assert_eq!(err.errors.len(), 4, "{all}");
    }

    #[test]
    fn type_and_semantic_errors_are_listed() {
        let err = Config::from_sources(Some("[splitter]\ndpi = \"high\"\n"), env(&[])).unwrap_err();
        assert!(err.to_string().contains("[splitter]"), "{err}");
        let err = Config::from_sources(
            None,
            env(&[("PAGESTREAM_UPLOADER_TARGET", "s3"), ("PAGESTREAM_NATS_PREFIX", "Bad.Prefix")]),
        )
        .unwrap_err();
        assert_eq!(err.errors.len(), 2, "{err}");
    }

    #[test]
    fn choices_are_enums_and_lists_take_toml_arrays_or_commas() {
        let c = Config::from_sources(
            Some("[ingress]\napi_tokens = [\"a\", \" b \"]\n[inferencer]\nmodels = \"x, y,,\"\nbackend = \"tract\"\n"),
            env(&[("PAGESTREAM_INGRESS_ADMIN_TOKENS", "root, ops"), ("PAGESTREAM_UPLOADER_TARGET", "local")]),
        )
        .unwrap();
        assert_eq!(c.ingress.api_tokens, ["a", "b"]);
        assert_eq!(c.ingress.admin_tokens, ["root", "ops"]);
        assert_eq!(c.inferencer.models, ["x", "y"]);
        assert_eq!(c.inferencer.served_models(), ["layout_cdla", "x", "y"]);
        assert_eq!(
            (c.inferencer.backend, c.inferencer.device, c.uploader.results.target),
            (Backend::Tract, Device::Cpu, Target::Local)
        );
        // An unknown choice names the setting, the value and the choices.
        let err =
            Config::from_sources(None, env(&[("PAGESTREAM_INFERENCER_BACKEND", "onnx")])).unwrap_err().to_string();
        assert!(
            err.contains("[inferencer]") && err.contains("onnx") && err.contains("ort") && err.contains("tract"),
            "{err}"
        );
        let err = Config::from_sources(None, env(&[("PAGESTREAM_UPLOADER_TARGET", "gcs")])).unwrap_err().to_string();
        assert!(err.contains("[uploader]") && err.contains("gcs") && err.contains("s3"), "{err}");
        // tract runs on the CPU only.
        let err = Config::from_sources(
            None,
            env(&[("PAGESTREAM_INFERENCER_BACKEND", "tract"), ("PAGESTREAM_INFERENCER_DEVICE", "cuda")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tract backend runs on the CPU only"), "{err}");
    }

    #[test]
    fn the_default_model_is_the_inferencers_unless_the_pipeline_names_one() {
        let c = Config::from_sources(None, env(&[("PAGESTREAM_INFERENCER_MODEL", "yolov8n")])).unwrap();
        assert_eq!(c.shared().default_model(), "yolov8n");
        let c = Config::from_sources(
            None,
            env(&[("PAGESTREAM_INFERENCER_MODEL", "yolov8n"), ("PAGESTREAM_PIPELINE_DEFAULT_MODEL", "layout_cdla")]),
        )
        .unwrap();
        assert_eq!(c.shared().default_model(), "layout_cdla");
    }

    /// What a stage binary reads from a file equals what the all-in-one
    /// mode hands that stage: its own section, and the views of others'
    /// sections with the owners' values (a view's defaults are its owner's).
    #[test]
    fn each_stage_reads_what_the_all_in_one_mode_hands_it() {
        let file = "[splitter]\nsource_s3_buckets = [\"in\"]\nsource_allow_private_hosts = \"minio\"\ndpi = 99.0\n\
                    [notifier]\nsecret = \"whsec_c2VjcmV0\"\nallow_private_hosts = [\"hooks\"]\n\
                    [uploader]\ntarget = \"local\"\ndir = \"elsewhere\"\nconcurrency = 3\n";
        let all = Config::from_sources(Some(file), env(&[])).unwrap();
        // The ingress binary: a strict [ingress], views of the rest; the
        // other sections' own keys (dpi, concurrency) are not its business.
        let mut sources = Sources::from_parts(Some(file), env(&[]));
        let alone = pagestream_ingress::Settings::read(&mut sources);
        sources.finish().expect("the ingress leaves other sections' keys to their owners");
        let handed = all.ingress_settings();
        assert_eq!(alone.results, handed.results);
        assert_eq!(alone.webhooks, handed.webhooks);
        assert_eq!(alone.sources, handed.sources);
        assert_eq!(handed.results, all.uploader.results);
        assert_eq!(handed.sources.source_s3_buckets, ["in"]);
        assert_eq!(handed.webhooks.allow_private_hosts, ["hooks"]);
        // Views of defaults are the owners' defaults.
        let d = Config::default().ingress_settings();
        assert_eq!(d.results, Config::default().uploader.results);
        assert_eq!(d.webhooks.secret, Config::default().notifier.secret);
        assert_eq!(d.sources.source_s3_buckets, Config::default().splitter.source_s3_buckets);
        // A stage binary still refuses an unknown key of its own section.
        let mut sources = Sources::from_parts(Some("[ingress]\nadr = \"x\"\n"), env(&[]));
        let _ = pagestream_ingress::Settings::read(&mut sources);
        assert!(sources.finish().unwrap_err().to_string().contains("ingress.adr"));
    }
}
