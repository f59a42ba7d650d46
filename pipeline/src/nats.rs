//! NATS connection, subject and stream names, and the tools of idempotent
//! provisioning: definitions from the data files in `nats/` (JetStream's
//! own JSON format, with `{prefix}`, `{PREFIX}` and `{max_deliver}`
//! placeholders) created or updated through races and unanswered requests,
//! key-value and object store buckets. What a pipeline provisions at
//! start-up with them is [`crate::provision`]'s.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, consumer, object_store, stream};
use futures::TryStreamExt;
use pagestream_schemas::EventState;
use serde::Deserialize;

use crate::config::NatsConfig;

const MODEL_CONSUMER_JSON: &str = include_str!("../../nats/model_consumer.json");

/// How long a write keeps trying through a JetStream outage (a leader
/// election takes a few seconds) before the caller sees the error:
/// [`publish_durable`](crate::progress::publish_durable) and the page
/// counters ([`crate::counters`]).
pub const OUTAGE_RIDE: Duration = Duration::from_secs(20);

/// Every subject, stream, consumer and bucket name, derived from the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn new(prefix: impl Into<String>) -> Self {
        Names { prefix: prefix.into() }
    }
    fn upper(&self) -> String {
        self.prefix.to_ascii_uppercase().replace('-', "_")
    }
    pub fn docs_submitted(&self) -> String {
        format!("{}.docs.submitted", self.prefix)
    }
    pub fn docs_failed(&self) -> String {
        format!("{}.docs.failed", self.prefix)
    }
    pub fn docs_cancelled(&self) -> String {
        format!("{}.docs.cancelled", self.prefix)
    }
    /// Every document's document-level events: `<p>.events.*.doc.*`
    pub fn all_doc_events(&self) -> String {
        format!("{}.events.*.doc.*", self.prefix)
    }
    /// `<p>.pages.rendered.<model>`: pages for the inferencers serving `model`.
    pub fn pages_rendered(&self, model: &str) -> String {
        format!("{}.pages.rendered.{model}", self.prefix)
    }
    /// Every model's rendered pages: `<p>.pages.rendered.*`.
    pub fn all_pages_rendered(&self) -> String {
        format!("{}.pages.rendered.*", self.prefix)
    }
    /// The durable consumer shared by every replica serving `model`.
    pub fn model_consumer(&self, model: &str) -> String {
        format!("inferencer_{model}")
    }
    /// Key-value bucket of live model replicas ([`crate::registry`]).
    pub fn models_bucket(&self) -> String {
        format!("{}_models", self.prefix)
    }
    pub fn pages_inferred(&self) -> String {
        format!("{}.pages.inferred", self.prefix)
    }
    /// `<p>.events.<doc>.doc.<state>`
    pub fn doc_event(&self, doc_id: &str, state: EventState) -> String {
        format!("{}.events.{doc_id}.doc.{}", self.prefix, state.as_str())
    }
    /// `<p>.events.<doc>.page.<state>.<page>`
    pub fn page_event(&self, doc_id: &str, state: EventState, page: u32) -> String {
        format!("{}.events.{doc_id}.page.{}.{page}", self.prefix, state.as_str())
    }
    /// Filter for one page state of a document: `<p>.events.<doc>.page.<state>.*`
    pub fn page_events(&self, doc_id: &str, state: EventState) -> String {
        format!("{}.events.{doc_id}.page.{}.*", self.prefix, state.as_str())
    }
    /// Filter for a document's document-level events: `<p>.events.<doc>.doc.*`
    pub fn doc_events_only(&self, doc_id: &str) -> String {
        format!("{}.events.{doc_id}.doc.*", self.prefix)
    }
    /// Filter for every event of a document.
    pub fn doc_events(&self, doc_id: &str) -> String {
        format!("{}.events.{doc_id}.>", self.prefix)
    }
    pub fn dlq(&self, stage: &str) -> String {
        format!("{}.dlq.{stage}", self.prefix)
    }
    pub fn docs_stream(&self) -> String {
        format!("{}_DOCS", self.upper())
    }
    pub fn pages_stream(&self) -> String {
        format!("{}_PAGES", self.upper())
    }
    pub fn inferred_stream(&self) -> String {
        format!("{}_INFERRED", self.upper())
    }
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.upper())
    }
    pub fn dlq_stream(&self) -> String {
        format!("{}_DLQ", self.upper())
    }
    /// Key-value bucket mapping `Idempotency-Key`s to documents.
    pub fn idempotency_bucket(&self) -> String {
        format!("{}_idempotency", self.prefix)
    }
    /// Key-value bucket of webhook deliveries (the notifier's records).
    pub fn callbacks_bucket(&self) -> String {
        format!("{}_callbacks", self.prefix)
    }
    /// Key-value bucket of per-document page counters ([`crate::counters`]).
    pub fn progress_bucket(&self) -> String {
        format!("{}_progress", self.prefix)
    }
    /// `<p>.docs.split.<priority>`: the rest of a document, after a chunk.
    pub fn docs_split(&self, priority: &str) -> String {
        format!("{}.docs.split.{priority}", self.prefix)
    }
    /// Object Store bucket for uploads and large page images.
    pub fn blob_bucket(&self) -> String {
        format!("{}_blobs", self.prefix)
    }
    /// `<P>_TURNS`: splitter turns, one subject per tenant.
    pub fn turns_stream(&self) -> String {
        format!("{}_TURNS", self.upper())
    }
    /// `<p>.turns.<tenant>`: a turn of a document of `tenant` (turns queued
    /// by an older splitter are on `<p>.turns.<tenant>.<priority>`; the
    /// tenant's consumer takes both).
    pub fn turns(&self, tenant: &str) -> String {
        format!("{}.turns.{tenant}", self.prefix)
    }
    /// Every turn: `<p>.turns.>`.
    pub fn all_turns(&self) -> String {
        format!("{}.turns.>", self.prefix)
    }
    /// The durable consumer of one tenant's turns (shared by splitter replicas).
    pub fn tenant_consumer(&self, tenant: &str) -> String {
        format!("turns_{tenant}")
    }
    /// `<P>_PARKED`: documents waiting for a model, one message per document.
    pub fn parked_stream(&self) -> String {
        format!("{}_PARKED", self.upper())
    }
    /// `<p>.parked.<model>.<doc>`: the turn a document waits with.
    pub fn parked(&self, model: &str, doc_id: &str) -> String {
        format!("{}.parked.{model}.{doc_id}", self.prefix)
    }
    /// Every parked document: `<p>.parked.>`.
    pub fn all_parked(&self) -> String {
        format!("{}.parked.>", self.prefix)
    }
    /// `<P>_ACTIVE`: each tenant's documents with pages possibly in flight.
    pub fn active_stream(&self) -> String {
        format!("{}_ACTIVE", self.upper())
    }
    /// `<p>.active.<tenant>.<doc>.<page_count>`: a document of `tenant` being split.
    pub fn active(&self, tenant: &str, doc_id: &str, page_count: u32) -> String {
        format!("{}.active.{tenant}.{doc_id}.{page_count}", self.prefix)
    }
    /// One tenant's documents being split: `<p>.active.<tenant>.>`.
    pub fn tenant_active(&self, tenant: &str) -> String {
        format!("{}.active.{tenant}.>", self.prefix)
    }
    /// `<P>_FETCH`: documents by reference waiting to be fetched.
    pub fn fetch_stream(&self) -> String {
        format!("{}_FETCH", self.upper())
    }
    /// `<p>.fetch.<tenant>`: a document of `tenant` to fetch.
    pub fn fetch(&self, tenant: &str) -> String {
        format!("{}.fetch.{tenant}", self.prefix)
    }
    /// `<P>_WEBHOOKS`: webhook deliveries the notifier scheduled (one
    /// message per delivery and attempt, see `nats/notifier.json`).
    pub fn webhooks_stream(&self) -> String {
        format!("{}_WEBHOOKS", self.upper())
    }
    /// `<p>.webhooks.<doc>`: a webhook delivery of a document's event.
    pub fn webhooks(&self, doc_id: &str) -> String {
        format!("{}.webhooks.{doc_id}", self.prefix)
    }
}

/// A definition file of `nats/` with this deployment's placeholders filled
/// in (for stages that provision definitions of their own).
pub fn render_definitions(text: &str, names: &Names, cfg: &NatsConfig) -> String {
    render_template(text, names, cfg)
}

/// `nats.url` (one URL or several, comma-separated) with the credentials
/// of each replaced by `***` (`nats://u:***@host`, `nats://***@host` for a
/// token): the form to log or return, never the URL itself.
pub fn redact_url(url: &str) -> String {
    let one = |u: &str| -> String {
        let u = u.trim();
        let (scheme, rest) = u.split_once("://").map_or(("", u), |(s, r)| (s, r));
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let Some((userinfo, host)) = authority.rsplit_once('@') else { return u.to_string() };
        let user = match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***"),
            None => "***".to_string(),
        };
        let scheme = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
        format!("{scheme}{user}@{host}{tail}")
    };
    url.split(',').map(one).collect::<Vec<_>>().join(",")
}

/// Credentials given in `nats.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsCredentials {
    /// `nats://user:password@host`
    UserPassword(String, String),
    /// `nats://token@host`
    Token(String),
}

/// `nats.url` split into its URLs without credentials, and the credentials
/// they carried (percent-decoded; the same on every URL that has some).
/// The NATS client is given the credentials as options: it does not read
/// them from a URL, and it logs the URLs it tries.
pub fn split_credentials(url: &str) -> Result<(Vec<String>, Option<NatsCredentials>)> {
    let mut urls = Vec::new();
    let mut found: Option<NatsCredentials> = None;
    for u in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (scheme, rest) = u.split_once("://").map_or(("", u), |(s, r)| (s, r));
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let Some((userinfo, host)) = authority.rsplit_once('@') else {
            urls.push(u.to_string());
            continue;
        };
        let credentials = match userinfo.split_once(':') {
            Some((user, password)) => NatsCredentials::UserPassword(percent_decode(user), percent_decode(password)),
            None => NatsCredentials::Token(percent_decode(userinfo)),
        };
        if found.as_ref().is_some_and(|f| *f != credentials) {
            anyhow::bail!(
                "nats.url: the URLs carry different credentials ({}); give every server the same",
                redact_url(url)
            );
        }
        found = Some(credentials);
        let scheme = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
        urls.push(format!("{scheme}{host}{tail}"));
    }
    Ok((urls, found))
}

/// `%XX` escapes decoded (invalid ones kept as written).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Connects to NATS, retrying until `connect_timeout_secs` elapses, and
/// returns a JetStream context. Credentials in `nats.url` are handed to the
/// client as options ([`split_credentials`]); errors and logs name the
/// servers without them ([`redact_url`]).
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<jetstream::Context> {
    let timeout = Duration::from_secs(cfg.connect_timeout_secs);
    let deadline = tokio::time::Instant::now() + timeout;
    let shown = redact_url(&cfg.url);
    let (urls, credentials) = split_credentials(&cfg.url)?;
    // The client's last error (an authorization violation, a TLS failure),
    // for the message when it never connects.
    let last_error = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let unreachable = |last: Option<String>| {
        let why = last.map(|e| format!("; last error: {e}")).unwrap_or_default();
        anyhow::anyhow!(
            "cannot connect to NATS at {shown} within {} s{why} (is nats-server running, are the credentials in nats.url right? `pagestream run --embedded-nats` and scripts/demo start one)",
            cfg.connect_timeout_secs
        )
    };
    let mut options = async_nats::ConnectOptions::new();
    match credentials {
        Some(NatsCredentials::UserPassword(user, password)) => options = options.user_and_password(user, password),
        Some(NatsCredentials::Token(token)) => options = options.token(token),
        None => {}
    }
    let recorder = last_error.clone();
    let attempt = options
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .event_callback(move |event| {
            let recorder = recorder.clone();
            async move {
                if let async_nats::Event::ClientError(e) = &event {
                    *recorder.lock().expect("last NATS error") = Some(e.to_string());
                }
            }
        })
        .connect(urls.iter().map(String::as_str).collect::<Vec<_>>());
    let last = || last_error.lock().expect("last NATS error").clone();
    let client = match tokio::time::timeout_at(deadline, attempt).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return Err(anyhow::anyhow!("connecting to NATS at {shown}: {e}")),
        Err(_) => return Err(unreachable(last())),
    };
    // retry_on_initial_connect returns before the first connection; wait
    // until it is really up so start-up errors are precise.
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() > deadline {
            return Err(unreachable(last()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(jetstream::new(client))
}

pub(crate) fn render_template(text: &str, names: &Names, cfg: &NatsConfig) -> String {
    render_model_template(text, names, cfg, "")
}

fn render_model_template(text: &str, names: &Names, cfg: &NatsConfig, model: &str) -> String {
    let bytes = |b: u64| if b == 0 { "-1".to_string() } else { b.min(i64::MAX as u64).to_string() };
    text.replace("\"{max_deliver}\"", &cfg.max_deliver.to_string())
        .replace("\"{replicas}\"", &cfg.replicas.to_string())
        .replace("\"{max_event_bytes}\"", &bytes(cfg.max_event_bytes))
        .replace("\"{max_dead_letter_bytes}\"", &bytes(cfg.max_dead_letter_bytes))
        .replace("\"{max_pages_in_flight}\"", &cfg.max_pages_in_flight.to_string())
        .replace("\"{ack_wait}\"", &Duration::from_secs(cfg.ack_wait_secs).as_nanos().to_string())
        .replace("{PREFIX}", &names.upper())
        .replace("{prefix}", &names.prefix)
        .replace("{model}", model)
}

/// One consumer of a data file, with its stream.
#[derive(Deserialize)]
pub(crate) struct ConsumerDef {
    pub(crate) stream: String,
    pub(crate) config: consumer::pull::Config,
}

/// The consumer of `nats/model_consumer.json` for `model`: one durable per
/// served model on the pages stream, filtered on its subject, shared by
/// every replica serving it.
pub fn model_consumer_config(names: &Names, cfg: &NatsConfig, model: &str) -> Result<(String, consumer::pull::Config)> {
    let def: ConsumerDef = serde_json::from_str(&render_model_template(MODEL_CONSUMER_JSON, names, cfg, model))
        .context("nats/model_consumer.json is invalid")?;
    Ok((def.stream, def.config))
}

/// Creates or updates the consumer of `model` (idempotent; its pages stay
/// in the stream, for the next replica, when every replica is gone).
pub async fn provision_model_consumer(
    js: &jetstream::Context,
    names: &Names,
    cfg: &NatsConfig,
    model: &str,
) -> Result<()> {
    let (stream_name, config) = model_consumer_config(names, cfg, model)?;
    let js = provisioning(js);
    let what = format!("creating or updating consumer {} on {stream_name}", names.model_consumer(model));
    retry_transient(&what, || async {
        let stream = js.get_stream(&stream_name).await.with_context(|| format!("stream {stream_name}"))?;
        stream.create_consumer(config.clone()).await.with_context(|| what.clone())?;
        Ok(())
    })
    .await
}

/// How long one provisioning request waits for JetStream's answer.
const PROVISION_TIMEOUT: Duration = Duration::from_secs(2);
/// Provisioning requests that time out are asked again this many times.
const PROVISION_ATTEMPTS: u32 = 8;

/// A context for provisioning requests: a short timeout, see [`retry_transient`].
pub(crate) fn provisioning(js: &jetstream::Context) -> jetstream::Context {
    let mut js = js.clone();
    js.set_timeout(PROVISION_TIMEOUT);
    js
}

/// Runs `op` again while it fails in a way that passes (see [`transient`]).
///
/// Every stage provisions at start-up. In a cluster JetStream answers only
/// the first of several identical concurrent create requests; the others
/// get no answer although the stream or consumer now exists (nats-server
/// #3677, nats.go #949), and a stage waited for the client's 10 s request
/// timeout at each contested step — 50 s before a 3-node cluster test's
/// stages were ready — or failed to start when the timeout hit a step
/// without a fallback. Asked again, the request finds the resource and
/// returns at once.
///
/// A stream or consumer just created in a cluster can also be "not found"
/// for a moment: until its replicas elect a leader, a replica that has not
/// made it yet answers the info request (a clean-clone CI's ingress failed to start,
/// "opening stream OBJ_…_blobs: stream not found", while another stage had
/// just created the bucket). That answer is asked again after a pause
/// (0.25 s, doubling to 2 s: under 10 s in all), as is JetStream's
/// "temporarily unavailable" during a leader election. Other errors are
/// returned as they are.
pub(crate) async fn retry_transient<T, F, Fut>(what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 1;
    let mut pause = Duration::from_millis(250);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < PROVISION_ATTEMPTS => match transient(&e) {
                Some(Transient::Timeout) => {
                    tracing::info!(what, attempt, "JetStream did not answer in time; asking again");
                }
                Some(Transient::NotYet) => {
                    tracing::info!(what, attempt, error = %e, "JetStream is not ready with it yet; asking again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
        attempt += 1;
    }
}

/// A provisioning error that passes when asked again.
#[derive(Debug, PartialEq, Eq)]
enum Transient {
    /// A request without an answer (the client reports the kinds as "timed
    /// out" in every error type it has): asked again at once.
    Timeout,
    /// A stream or consumer not found (JetStream errors 10059, 10014) or
    /// JetStream temporarily unavailable (10008) in a cluster settling:
    /// asked again after a pause.
    NotYet,
}

/// JetStream's codes for [`Transient::NotYet`], as async-nats words them.
const NOT_YET: [&str; 3] = ["error code 10059", "error code 10014", "error code 10008"];

fn transient(e: &anyhow::Error) -> Option<Transient> {
    let text: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    if text.iter().any(|t| t.contains("timed out")) {
        Some(Transient::Timeout)
    } else if text.iter().any(|t| NOT_YET.iter().any(|code| t.contains(code))) {
        Some(Transient::NotYet)
    } else {
        None
    }
}

/// A stage's own definitions file (`nats/splitter.json`,
/// `nats/notifier.json`): streams, and consumers with their stream.
#[derive(serde::Deserialize)]
struct StageDefinitions {
    #[serde(default)]
    streams: Vec<stream::Config>,
    #[serde(default)]
    consumers: Vec<StageConsumer>,
}

#[derive(serde::Deserialize)]
struct StageConsumer {
    stream: String,
    config: jetstream::consumer::pull::Config,
}

/// Creates or updates the streams and consumers of a stage's own
/// definitions (the JSON text, rendered with [`render_definitions`]), as
/// [`provision`](crate::provision::provision) does for the shared ones: races and unanswered requests
/// on a fresh cluster are ridden out. Other keys of the file are the
/// stage's own (e.g. per-tenant consumer templates).
pub async fn provision_definitions(js: &jetstream::Context, names: &Names, file: &str, text: &str) -> Result<()> {
    let defs: StageDefinitions = serde_json::from_str(text).with_context(|| format!("{file} is invalid"))?;
    let js = &provisioning(js);
    for cfg in defs.streams {
        let name = cfg.name.clone();
        retry_transient(&format!("stream {name}"), || provision_stream(js, names, cfg.clone())).await?;
    }
    for def in defs.consumers {
        let durable = def.config.durable_name.clone().unwrap_or_default();
        let what = format!("creating or updating consumer {durable} on {}", def.stream);
        retry_transient(&what, || async {
            let stream = js.get_stream(&def.stream).await.with_context(|| format!("stream {}", def.stream))?;
            stream.create_consumer(def.config.clone()).await.with_context(|| what.clone())?;
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// Creates or updates one stream (several stages may race on it).
pub(crate) async fn provision_stream(js: &jetstream::Context, names: &Names, cfg: stream::Config) -> Result<()> {
    let name = cfg.name.clone();
    if name == names.pages_stream() {
        // Before model fleets one unfiltered `inferencer` consumer read
        // every page; it would overlap the per-model ones (a work-queue
        // stream refuses that).
        if let Ok(stream) = js.get_stream(&name).await {
            if stream.consumer_info("inferencer").await.is_ok() {
                tracing::info!(stream = %name, "removing the pre-fleet consumer `inferencer`");
                let _ = stream.delete_consumer("inferencer").await;
            }
        }
    }
    if let Err(e) = js.create_or_update_stream(cfg.clone()).await {
        // Lost a creation race (see [`kv_bucket`]): the stream exists
        // now, and a second pass updates it if its config differs.
        if js.get_stream(&name).await.is_err() {
            let hint = reservation_hint(&e.to_string());
            return Err(e).with_context(|| format!("creating or updating stream {name}{hint}"));
        }
        js.create_or_update_stream(cfg).await.with_context(|| format!("creating or updating stream {name}"))?;
    }
    Ok(())
}

/// Subject → message count for every subject of `stream` matching
/// `filter` (one stream info request; no message is read).
pub async fn subject_counts(stream: &stream::Stream, filter: &str) -> Result<BTreeMap<String, usize>> {
    let info = stream.info_with_subjects(filter).await.context("stream info with subjects")?;
    info.try_collect().await.context("listing subjects")
}

/// Opens key-value bucket `config.bucket`, creating it when missing.
///
/// Every stage provisions at start-up, so several processes may create the
/// same bucket at once. The server can refuse all but one of them
/// (checking the storage reservation before it notices the duplicate:
/// "insufficient storage resources available"); whoever lost the race
/// opens what the winner created instead of failing.
pub async fn kv_bucket(js: &jetstream::Context, config: jetstream::kv::Config) -> Result<jetstream::kv::Store> {
    let bucket = config.bucket.clone();
    if let Ok(store) = js.get_key_value(&bucket).await {
        return Ok(store);
    }
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(e) => match js.get_key_value(&bucket).await {
            Ok(store) => Ok(store),
            Err(_) => Err(e).with_context(|| format!("creating key-value bucket {bucket}")),
        },
    }
}

/// The key-value bucket of `Idempotency-Key`s: entries expire after 24 h.
pub async fn idempotency_store(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
) -> Result<jetstream::kv::Store> {
    kv_bucket(
        js,
        jetstream::kv::Config {
            bucket: names.idempotency_bucket(),
            description: "pagestream: Idempotency-Key -> document".into(),
            history: 1,
            max_age: Duration::from_secs(24 * 3600),
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        },
    )
    .await
}

/// The Object Store bucket used for uploads and large page images, holding
/// at most `nats.max_blob_bytes` (0: no limit) in `nats.replicas` copies
/// (both applied to an existing bucket too).
pub async fn blob_store(
    js: &jetstream::Context,
    names: &Names,
    cfg: &NatsConfig,
) -> Result<(object_store::ObjectStore, stream::Stream)> {
    let (max_bytes, replicas) = (cfg.max_blob_bytes, cfg.replicas);
    let bucket = names.blob_bucket();
    let limit = if max_bytes == 0 { -1 } else { i64::try_from(max_bytes).unwrap_or(i64::MAX) };
    let store = match js.get_object_store(&bucket).await {
        Ok(store) => store,
        Err(_) => {
            let created = js
                .create_object_store(object_store::Config {
                    bucket: bucket.clone(),
                    description: Some("pagestream uploads and large page images".into()),
                    max_age: Duration::from_secs(7 * 24 * 3600),
                    max_bytes: limit,
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(store) => store,
                // Lost a creation race (see [`kv_bucket`]).
                Err(e) => match js.get_object_store(&bucket).await {
                    Ok(store) => store,
                    Err(_) => {
                        let hint = reservation_hint(&e.to_string());
                        return Err(e).with_context(|| format!("creating object store bucket {bucket}{hint}"));
                    }
                },
            }
        }
    };
    let stream_name = format!("OBJ_{bucket}");
    let mut stream = js.get_stream(&stream_name).await.with_context(|| format!("opening stream {stream_name}"))?;
    let config = stream.info().await.with_context(|| format!("reading stream {stream_name}"))?.config.clone();
    if config.max_bytes != limit || config.num_replicas != replicas {
        js.update_stream(stream::Config { max_bytes: limit, num_replicas: replicas, ..config })
            .await
            .with_context(|| format!("setting max_bytes and replicas of {stream_name}"))?;
    }
    Ok((store, stream))
}

/// What to do when JetStream refuses to reserve a stream's `max_bytes`
/// (error 10047): the server's storage limit — by default 75% of the disk
/// free where it keeps its data — is smaller than the reservations.
fn reservation_hint(error: &str) -> &'static str {
    if error.contains("insufficient storage resources") {
        " (the NATS server cannot reserve this stream's max_bytes: free disk space where it stores JetStream \
         data, raise its max_file_store, or lower nats.max_blob_bytes / nats.max_event_bytes / \
         nats.max_dead_letter_bytes)"
    } else {
        ""
    }
}

/// Whether an error chain says the blob store is full (`max_bytes`, or the
/// server out of storage).
pub fn is_storage_full(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("maximum bytes exceeded") || t.contains("insufficient resources") || t.contains("storage full")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_nats_urls_are_redacted() {
        for (url, shown) in [
            ("nats://u:SECRETPW@127.0.0.1:4222", "nats://u:***@127.0.0.1:4222"),
            ("nats://SECRETTOKEN@h:4222", "nats://***@h:4222"),
            ("tls://u:p%40SECRET@h/x", "tls://u:***@h/x"),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("u:SECRETPW@h:4222", "u:***@h:4222"),
            ("nats://a:SECRET1@h1:1, nats://b:SECRET2@h2:2", "nats://a:***@h1:1,nats://b:***@h2:2"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
            assert!(!redact_url(url).contains("SECRET"), "{url}");
        }
        let (urls, creds) = split_credentials("nats://u:p%40ss@h1:1, nats://u:p%40ss@h2:2,nats://h3:3").unwrap();
        assert_eq!(urls, ["nats://h1:1", "nats://h2:2", "nats://h3:3"]);
        assert_eq!(creds, Some(NatsCredentials::UserPassword("u".into(), "p@ss".into())));
        let (urls, creds) = split_credentials("tls://T0KEN@h:4222/x").unwrap();
        assert_eq!((urls, creds), (vec!["tls://h:4222/x".to_string()], Some(NatsCredentials::Token("T0KEN".into()))));
        assert_eq!(split_credentials("nats://h:1").unwrap(), (vec!["nats://h:1".to_string()], None));
        let err = split_credentials("nats://a:SECRET1@h1:1,nats://b:SECRET2@h2:2").unwrap_err().to_string();
        assert!(err.contains("different credentials") && !err.contains("SECRET"), "{err}");
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }

    #[tokio::test]
    async fn provisioning_asks_again_after_a_timeout_and_only_then() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let got = retry_transient("x", || async {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n < 2 {
                Err(anyhow::anyhow!("jetstream request timed out")).context("creating stream X")
            } else {
                Ok(n)
            }
        })
        .await
        .unwrap();
        assert_eq!(got, 2, "two timeouts, then the answer");
        let calls = std::sync::atomic::AtomicU32::new(0);
        let err = retry_transient("x", || async {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err::<(), _>(anyhow::anyhow!("insufficient storage resources available"))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "{err}: not a timeout, not retried");
        let calls = std::sync::atomic::AtomicU32::new(0);
        retry_transient("x", || async {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err::<(), _>(anyhow::anyhow!("timed out"))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), PROVISION_ATTEMPTS, "bounded");
    }

    #[tokio::test]
    async fn provisioning_asks_again_for_a_stream_a_cluster_has_not_settled_yet() {
        // As async-nats words it, under the context the caller adds.
        let not_found = || {
            Err::<u32, _>(anyhow::anyhow!("jetstream error: stream not found (code 404, error code 10059)"))
                .context("opening stream OBJ_clus_blobs")
        };
        let calls = std::sync::atomic::AtomicU32::new(0);
        let started = std::time::Instant::now();
        let got = retry_transient("x", || async {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n < 2 {
                not_found()
            } else {
                Ok(n)
            }
        })
        .await
        .unwrap();
        assert_eq!(got, 2, "not found twice, then found");
        assert!(started.elapsed() >= Duration::from_millis(750), "asked again after 0.25 s, then 0.5 s");
        let unavailable =
            anyhow::anyhow!("jetstream error: JetStream system temporarily unavailable (code 503, error code 10008)");
        assert_eq!(transient(&unavailable), Some(Transient::NotYet));
        assert_eq!(transient(&not_found().unwrap_err()), Some(Transient::NotYet));
        let no_consumer = anyhow::anyhow!("jetstream error: consumer not found (code 404, error code 10014)");
        assert_eq!(transient(&no_consumer), Some(Transient::NotYet));
        let other = anyhow::anyhow!(
            "jetstream error: stream name already in use with a different configuration (code 400, error code 10058)"
        );
        assert_eq!(transient(&other), None, "any other refusal is final");
    }

    #[test]
    fn a_refused_reservation_says_what_to_change() {
        let hint = reservation_hint("insufficient storage resources available (code 500, error code 10047)");
        assert!(hint.contains("nats.max_blob_bytes") && hint.contains("free disk"), "{hint}");
        assert_eq!(reservation_hint("stream name already in use"), "");
    }

    #[test]
    fn the_model_consumer_file_parses_for_any_prefix() {
        let names = Names::new("t-42");
        let cfg = NatsConfig { max_deliver: 7, ack_wait_secs: 9, max_pages_in_flight: 11, ..NatsConfig::default() };
        let (stream, model) = model_consumer_config(&names, &cfg, "layout_cdla").unwrap();
        assert_eq!(stream, names.pages_stream());
        assert_eq!(model.durable_name.as_deref(), Some("inferencer_layout_cdla"));
        assert_eq!(model.filter_subject, "t-42.pages.rendered.layout_cdla");
        assert_eq!((model.max_deliver, model.ack_wait), (7, Duration::from_secs(9)));
    }
}
