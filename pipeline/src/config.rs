//! Layered, typed configuration: embedded defaults → optional TOML file
//! (`--config FILE` or `PAGESTREAM_CONFIG`) → environment variables
//! `PAGESTREAM_<SECTION>_<KEY>` (e.g. `PAGESTREAM_SPLITTER_DPI=200`).
//!
//! Each section has one owner ([`Section`]): the shared ones (`[pipeline]`,
//! `[nats]`, `[tenants]`) are defined here, in [`Config`]; every stage's
//! section is defined in its own crate (`pagestream_splitter::SplitterConfig`,
//! …), which also checks it. A binary reads the sources once ([`Sources`]),
//! takes the sections it owns with [`Sources::section`] (every key checked)
//! and, where it must know one setting of another stage, a small typed
//! [`Sources::view`] of it (only the keys it names). The all-in-one binary
//! owns every section, so it checks the whole file.
//!
//! Every problem is collected and reported at once ([`ConfigError`]); the
//! binaries exit with code 64 on it, before binding any port.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::tenants::TenantsConfig;

/// Exit code for invalid configuration (EX_USAGE).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Environment variables with the `PAGESTREAM_` prefix that are not
/// `<SECTION>_<KEY>` settings: tools and the CLI read them.
const RESERVED_ENV: &[&str] = &[
    "PAGESTREAM_CONFIG",
    "PAGESTREAM_DEPS",
    "PAGESTREAM_LOG",
    "PAGESTREAM_LOG_FORMAT",
    "PAGESTREAM_OTLP_ENDPOINT",
    "PAGESTREAM_BLESS",
    "PAGESTREAM_CORPUS",
    "PAGESTREAM_NATS_SERVER",
    "PAGESTREAM_URL",
    "PAGESTREAM_TOKEN",
    "PAGESTREAM_CA_CERT",
];

/// Every section a config file may hold. One file configures every stage:
/// a binary checks the sections it owns and leaves the others to theirs.
pub const SECTIONS: &[&str] =
    &["pipeline", "nats", "tenants", "ingress", "splitter", "inferencer", "uploader", "notifier"];

/// One `[NAME]` section (or a view of some of its keys): a struct whose
/// `Default` holds the embedded defaults and whose fields are the keys.
pub trait Section: Serialize + DeserializeOwned + Default {
    /// The section's name: `[NAME]` in the file, `PAGESTREAM_<NAME>_<KEY>`.
    const NAME: &'static str;

    /// Semantic checks serde cannot express, each error naming its
    /// setting (`section.key …`). Run for owned sections, not for views.
    fn check(&self, _errors: &mut Vec<String>) {}
}

/// The settings every stage shares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    pub pipeline: PipelineConfig,
    pub nats: NatsConfig,
    /// Per-tenant (API token) limits and weights.
    pub tenants: TenantsConfig,
}

impl Config {
    /// The shared sections of `sources`, with `pipeline.default_model`
    /// decided (an empty one is `inferencer.model`'s value).
    pub fn read(sources: &mut Sources) -> Config {
        let mut pipeline: PipelineConfig = sources.section();
        if pipeline.default_model.is_empty() {
            pipeline.default_model = sources.view::<InferencerModel>().model;
        }
        Config { pipeline, nats: sources.section(), tenants: sources.section() }
    }

    /// The model of a document submitted without one.
    pub fn default_model(&self) -> &str {
        if self.pipeline.default_model.is_empty() {
            pagestream_schemas::DEFAULT_MODEL
        } else {
            &self.pipeline.default_model
        }
    }
}

/// `inferencer.model`, the default of `pipeline.default_model` (the
/// inferencer's crate owns the section).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
struct InferencerModel {
    model: String,
}

impl Default for InferencerModel {
    fn default() -> Self {
        InferencerModel { model: pagestream_schemas::DEFAULT_MODEL.into() }
    }
}

impl Section for InferencerModel {
    const NAME: &'static str = "inferencer";
}

impl Section for PipelineConfig {
    const NAME: &'static str = "pipeline";

    fn check(&self, errors: &mut Vec<String>) {
        if !self.default_model.is_empty() {
            if let Err(e) = pagestream_schemas::validate_model_name(&self.default_model) {
                errors.push(format!("pipeline.default_model: {e}"));
            }
        }
    }
}

impl Section for NatsConfig {
    const NAME: &'static str = "nats";

    fn check(&self, errors: &mut Vec<String>) {
        let p = &self.prefix;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
            errors.push(format!("nats.prefix {p:?}: use 1+ characters of [a-z0-9_-]"));
        }
        if !(1..=5).contains(&self.replicas) {
            errors.push("nats.replicas must be within 1..=5 (JetStream's limit; 3 on a 3-node cluster)".into());
        }
        if self.urls().is_empty() {
            errors.push("nats.url: give at least one NATS URL".into());
        }
        if self.max_deliver < 1 {
            errors.push("nats.max_deliver must be at least 1".into());
        }
        if self.max_pages_in_flight < 2 {
            errors.push("nats.max_pages_in_flight must be at least 2".into());
        }
        if self.ack_wait_secs < 2 {
            errors.push("nats.ack_wait_secs must be at least 2".into());
        }
    }
}

impl Section for TenantsConfig {
    const NAME: &'static str = "tenants";

    fn check(&self, errors: &mut Vec<String>) {
        errors.extend(self.problems());
    }
}

/// The configuration sources of one process, read once: the file's
/// sections and the `PAGESTREAM_*` environment, and the problems found so
/// far. Take sections with [`Sources::section`] / [`Sources::view`], then
/// [`Sources::finish`] reports every problem at once.
#[derive(Debug, Default)]
pub struct Sources {
    file: Table,
    /// `(section, key) -> (variable name, raw value)`.
    env: BTreeMap<(String, String), (String, String)>,
    errors: Vec<String>,
}

impl Sources {
    /// `file` (or `$PAGESTREAM_CONFIG`), then the process environment.
    pub fn load(file: Option<&Path>) -> Sources {
        let env_file = std::env::var_os("PAGESTREAM_CONFIG").map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let mut errors = Vec::new();
        let text = file.as_ref().and_then(|path| match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) => {
                errors.push(format!("cannot read config file {}: {e}", path.display()));
                None
            }
        });
        let mut sources = Self::from_parts(text.as_deref(), std::env::vars());
        sources.errors.splice(0..0, errors);
        sources
    }

    /// Sources from a TOML text and `(name, value)` environment pairs; the
    /// testable core of [`Sources::load`].
    pub fn from_parts(toml_text: Option<&str>, env: impl IntoIterator<Item = (String, String)>) -> Sources {
        let mut sources = Sources::default();
        if let Some(text) = toml_text {
            match text.parse::<Table>() {
                Ok(file) => {
                    for (section, value) in file {
                        if !SECTIONS.contains(&section.as_str()) {
                            sources.errors.push(format!("config file: unknown section [{section}]"));
                        } else if !value.is_table() {
                            sources.errors.push(format!("config file: [{section}] must be a table"));
                        } else {
                            sources.file.insert(section, value);
                        }
                    }
                }
                Err(e) => sources.errors.push(format!("config file is not valid TOML: {e}")),
            }
        }
        let env: BTreeMap<String, String> = env.into_iter().collect();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix("PAGESTREAM_") else {
                continue;
            };
            if RESERVED_ENV.contains(&name.as_str()) {
                continue;
            }
            let lower = rest.to_ascii_lowercase();
            match lower.split_once('_') {
                Some((section, key)) if SECTIONS.contains(&section) => {
                    sources.env.insert((section.into(), key.into()), (name, raw));
                }
                Some((section, key)) => sources.errors.push(format!("{name}: unknown setting {section}.{key}")),
                None => sources.errors.push(format!("{name}: expected PAGESTREAM_<SECTION>_<KEY>")),
            }
        }
        sources
    }

    /// The sources a typed configuration is (every section of `config`,
    /// no environment): how the all-in-one mode hands each stage the same
    /// settings, and views, a stage binary would read.
    pub fn from_config<T: Serialize>(config: &T) -> Sources {
        let mut sources = Sources::default();
        match Value::try_from(config) {
            Ok(Value::Table(file)) => sources.file = file,
            Ok(_) => sources.errors.push("a configuration must serialise to a table".into()),
            Err(e) => sources.errors.push(format!("the configuration does not serialise: {e}")),
        }
        sources
    }

    /// A section this process owns: every key of the file and the
    /// environment must be one of its settings, typed like its default,
    /// and the section must pass [`Section::check`].
    pub fn section<S: Section>(&mut self) -> S {
        let section = self.take::<S>(true);
        section.check(&mut self.errors);
        section
    }

    /// Some settings of another owner's section (the fields of `S`, a
    /// subset of the section's keys): the other keys are left to their
    /// owner, the named ones must be typed right.
    pub fn view<S: Section>(&mut self) -> S {
        self.take::<S>(false)
    }

    fn take<S: Section>(&mut self, owned: bool) -> S {
        let name = S::NAME;
        let defaults = match Value::try_from(S::default()).expect("a section serialises") {
            Value::Table(t) => t,
            _ => unreachable!("a section serialises to a table"),
        };
        let mut merged = defaults.clone();
        let mut errors = Vec::new();
        if let Some(Value::Table(entries)) = self.file.get(name) {
            for (key, v) in entries {
                if defaults.contains_key(key) {
                    merged.insert(key.clone(), v.clone());
                } else if owned {
                    errors.push(format!("config file: unknown setting {name}.{key}"));
                }
            }
        }
        for ((section, key), (var, raw)) in self.env.range((name.to_string(), String::new())..) {
            if section != name {
                break;
            }
            match defaults.get(key) {
                None if owned => errors.push(format!("{var}: unknown setting {section}.{key}")),
                None => {}
                Some(default) => match parse_like(default, raw) {
                    Ok(v) => {
                        merged.insert(key.clone(), v);
                    }
                    Err(e) => errors.push(format!("{var}={raw:?}: {e}")),
                },
            }
        }
        let typed = if errors.is_empty() {
            Value::Table(merged)
                .try_into::<S>()
                .map_err(|e| errors.push(format!("[{name}]: {}", e.message().trim())))
                .ok()
        } else {
            None
        };
        self.errors.extend(errors);
        typed.unwrap_or_default()
    }

    /// Every problem found, or `Ok` when there was none.
    pub fn finish(self) -> Result<(), ConfigError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { errors: self.errors })
        }
    }
}

/// Parses one of a setting's choices (e.g. the inferencer's `device`) from
/// its name, as the configuration would; the error lists the choices.
pub fn parse_choice<T: serde::de::DeserializeOwned>(name: &str) -> Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name)).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// NATS server URL, or the URLs of a cluster's nodes, comma separated
    /// (the client connects to one and fails over to the others).
    pub url: String,
    /// Copies JetStream keeps of every stream, consumer, key-value bucket and
    /// object store the pipeline creates: 1 on a single server, 3 on a
    /// 3-node cluster (it then survives the loss of one node). Streams and
    /// the object store follow a change at the next start; key-value
    /// buckets keep the count they were created with.
    pub replicas: usize,
    /// Prefix of every subject, stream and bucket (`[a-z0-9_-]`), so several
    /// pipelines can share one server.
    pub prefix: String,
    /// Deliveries of one message before it is dead-lettered.
    pub max_deliver: i64,
    /// Seconds a delivered message may stay unacknowledged before it is
    /// redelivered (a crashed worker's messages come back after this; busy
    /// workers extend it with in-progress acks).
    pub ack_wait_secs: u64,
    /// Seconds to wait for a connection at start-up.
    pub connect_timeout_secs: u64,
    /// Rendered pages waiting for or in inference per model, all documents
    /// together: the model's subject of the `<P>_PAGES` stream holds at most
    /// this many (JetStream refuses more; the splitter waits), so storage
    /// does not grow with page count.
    pub max_pages_in_flight: i64,
    /// Bytes the blob bucket (uploads waiting to be split, page images
    /// between stages) may hold, set when the bucket is created (0: no
    /// limit). Uploads that do not fit are refused with 507 `storage_full`
    /// instead of filling the disk under every stage.
    pub max_blob_bytes: u64,
    /// Bytes the events stream may hold (0: no limit); beyond it the oldest
    /// events go first (`discard: old`): the history of the oldest
    /// documents, never the pipeline's work.
    pub max_event_bytes: u64,
    /// Bytes the dead-letter stream may hold (0: no limit); oldest first.
    pub max_dead_letter_bytes: u64,
}

/// Settings of the whole pipeline, read where documents are accepted (the
/// ingress, and the splitter for documents published on NATS).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// The model of a document submitted without a `model` option (empty:
    /// `inferencer.model`). Decided once, when the document is accepted.
    pub default_model: String,
}

/// How to reach an S3-compatible service: what the uploader writes results
/// with (`uploader.s3_*`) and what the splitter reads `s3://` sources with
/// (`splitter.source_s3_*`). Not a config section of its own: each stage's
/// section keeps its flat keys (their environment variables are a
/// contract), and hands this out.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Connection {
    /// Custom endpoint (MinIO, moto, …); empty for AWS.
    pub endpoint: String,
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`).
    pub path_style: bool,
    /// Static credentials; empty: the standard AWS chain.
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Connection")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl NatsConfig {
    /// The server URLs of `url` (one, or a cluster's, comma separated).
    pub fn urls(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            replicas: 1,
            prefix: "pagestream".into(),
            max_deliver: 5,
            ack_wait_secs: 60,
            connect_timeout_secs: 10,
            max_pages_in_flight: 64,
            max_blob_bytes: 8 * 1024 * 1024 * 1024,
            max_event_bytes: 1024 * 1024 * 1024,
            max_dead_letter_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Every problem found in the configuration sources.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.errors.len())?;
        for e in &self.errors {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The project-local dependency folder: `$PAGESTREAM_DEPS`, else the first
/// `.deps` found walking up from the executable, then from the working
/// directory, else `.deps`.
pub fn deps_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PAGESTREAM_DEPS") {
        return PathBuf::from(d);
    }
    find_upwards(".deps").unwrap_or_else(|| PathBuf::from(".deps"))
}

/// The first `rel` found walking up from the executable's folder, then
/// from the working directory.
pub fn find_upwards(rel: &str) -> Option<PathBuf> {
    let starts =
        [std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)), std::env::current_dir().ok()];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            let candidate = dir.join(rel);
            if candidate.exists() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Parses an environment value with the type of the setting's default.
fn parse_like(default: &Value, raw: &str) -> Result<Value, String> {
    let raw = raw.trim();
    match default {
        Value::String(_) => Ok(Value::String(raw.to_string())),
        Value::Integer(_) => raw.parse::<i64>().map(Value::Integer).map_err(|_| "expected an integer".into()),
        Value::Float(_) => raw.parse::<f64>().map(Value::Float).map_err(|_| "expected a number".into()),
        Value::Boolean(_) => match raw.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Value::Boolean(true)),
            "0" | "false" | "no" | "off" => Ok(Value::Boolean(false)),
            _ => Err("expected true or false".into()),
        },
        // Lists: comma separated.
        Value::Array(_) => Ok(Value::Array(
            raw.split(',').map(str::trim).filter(|t| !t.is_empty()).map(|t| Value::String(t.to_string())).collect(),
        )),
        _ => Err("this setting cannot be set from the environment".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A section of two keys, and a view of one of them.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    struct Owned {
        dpi: f32,
        #[serde(deserialize_with = "crate::util::list")]
        hosts: Vec<String>,
    }

    impl Default for Owned {
        fn default() -> Self {
            Owned { dpi: 150.0, hosts: Vec::new() }
        }
    }

    impl Section for Owned {
        const NAME: &'static str = "splitter";

        fn check(&self, errors: &mut Vec<String>) {
            if self.dpi > 1000.0 {
                errors.push("splitter.dpi too high".into());
            }
        }
    }

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    struct HostsView {
        #[serde(deserialize_with = "crate::util::list")]
        hosts: Vec<String>,
    }

    impl Section for HostsView {
        const NAME: &'static str = "splitter";
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn env_overrides_the_file_which_overrides_the_defaults() {
        let mut s = Sources::from_parts(Some("[splitter]\ndpi = 200.0\nhosts = [\"a\"]\n"), env(&[]));
        assert_eq!(s.section::<Owned>(), Owned { dpi: 200.0, hosts: vec!["a".into()] });
        let mut s = Sources::from_parts(
            Some("[splitter]\ndpi = 200.0\n"),
            env(&[("PAGESTREAM_SPLITTER_DPI", "300"), ("PAGESTREAM_SPLITTER_HOSTS", "x, y,,"), ("HOME", "/")]),
        );
        assert_eq!(s.section::<Owned>(), Owned { dpi: 300.0, hosts: vec!["x".into(), "y".into()] });
        s.finish().unwrap();
    }

    #[test]
    fn an_owner_refuses_unknown_keys_a_view_leaves_them_to_the_owner() {
        let file = "[splitter]\ndpi = 90.0\nbogus = 1\nhosts = \"h\"\n";
        let vars = env(&[("PAGESTREAM_SPLITTER_NOPE", "1")]);
        let mut s = Sources::from_parts(Some(file), vars.clone());
        assert_eq!(s.view::<HostsView>().hosts, ["h"]);
        s.finish().expect("a view checks only its keys");
        let mut s = Sources::from_parts(Some(file), vars);
        let _ = s.section::<Owned>();
        let err = s.finish().unwrap_err().to_string();
        assert!(err.contains("splitter.bogus") && err.contains("PAGESTREAM_SPLITTER_NOPE"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_source() {
        let mut s = Sources::from_parts(
            Some("[splitter]\ndpi = \"high\"\n[nope]\nx = 1\n[nats]\n"),
            env(&[("PAGESTREAM_TYPO_X", "1"), ("PAGESTREAM_NOSECTION", "1"), ("PAGESTREAM_DEPS", "/reserved")]),
        );
        let _ = s.section::<Owned>();
        let err = s.finish().unwrap_err();
        let all = err.to_string();
        for needle in ["[nope]", "[splitter]", "typo.x", "PAGESTREAM_NOSECTION"] {
            assert!(all.contains(needle), "{needle} missing from: {all}");
        }
        assert_eq!(err.errors.len(), 4, "{all}");
        // A type error from the environment names the variable; the
        // section's own check runs on what parsed.
        let mut s = Sources::from_parts(None, env(&[("PAGESTREAM_SPLITTER_DPI", "many")]));
        let _ = s.section::<Owned>();
        assert!(s.finish().unwrap_err().to_string().contains("PAGESTREAM_SPLITTER_DPI=\"many\": expected a number"));
        let mut s = Sources::from_parts(None, env(&[("PAGESTREAM_SPLITTER_DPI", "5000")]));
        let _ = s.section::<Owned>();
        assert!(s.finish().unwrap_err().to_string().contains("splitter.dpi too high"));
        // A view does not run the owner's check.
        let mut s = Sources::from_parts(None, env(&[("PAGESTREAM_SPLITTER_DPI", "5000")]));
        let _ = s.view::<HostsView>();
        s.finish().unwrap();
    }

    #[test]
    fn a_typed_configuration_reads_back_as_the_same_sources() {
        #[derive(Serialize)]
        struct All {
            splitter: Owned,
        }
        let all = All { splitter: Owned { dpi: 72.0, hosts: vec!["minio".into()] } };
        let mut s = Sources::from_config(&all);
        assert_eq!(s.section::<Owned>(), all.splitter);
        assert_eq!(s.view::<HostsView>().hosts, ["minio"]);
        s.finish().unwrap();
    }

    #[test]
    fn the_default_model_is_decided_once_from_the_inferencers_model() {
        let mut s = Sources::from_parts(Some("[inferencer]\nmodel = \"yolov8n\"\nthreads = 2\n"), env(&[]));
        let shared = Config::read(&mut s);
        s.finish().unwrap();
        assert_eq!(shared.default_model(), "yolov8n");
        let mut s = Sources::from_parts(None, env(&[("PAGESTREAM_PIPELINE_DEFAULT_MODEL", "picodet")]));
        assert_eq!(Config::read(&mut s).default_model(), "picodet");
        assert_eq!(Config::read(&mut Sources::default()).default_model(), pagestream_schemas::DEFAULT_MODEL);
    }
}
