//! The live registry of served models: key-value bucket `<prefix>_models`,
//! one key `<model>.<replica>` per inferencer replica and model it serves
//! (a variant's `@` written `=`: `layout_cdla=int8.<replica>`),
//! value a [`ModelReplica`] (JSON).
//!
//! A replica rewrites its keys every [`HEARTBEAT`] ([`advertise`]) and
//! deletes them when it stops cleanly; the bucket's `max_age` ([`TTL`])
//! expires the keys of a replica that died. Readers ([`LiveModels`]) keep a
//! local view from a watch on the bucket and drop entries not rewritten
//! within the TTL, so a killed replica disappears within [`TTL`] even
//! before the server expires its key.
//!
//! Generic: this module knows model names, weights hashes and replica ids,
//! not how a model runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, kv};
use futures::{StreamExt, TryStreamExt};
use pagestream_schemas::ModelReplica;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::nats::Names;

/// How often a replica rewrites its entries.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// An entry not rewritten for this long is a dead replica.
pub const TTL: Duration = Duration::from_secs(8);

/// The bucket, created on first use (every process provisions it).
pub async fn bucket(js: &jetstream::Context, names: &Names, replicas: usize) -> Result<kv::Store> {
    crate::nats::kv_bucket(
        js,
        kv::Config {
            bucket: names.models_bucket(),
            description: "pagestream: live inferencer replicas, key <model>.<replica>".into(),
            history: 1,
            max_age: TTL,
            storage: jetstream::stream::StorageType::Memory,
            num_replicas: replicas,
            ..Default::default()
        },
    )
    .await
}

/// A unique, readable id for this process: `<host>-<pid>-<random>`, in the
/// characters a key-value key allows.
pub fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect();
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{}-{}-{:05x}", if host.is_empty() { "host" } else { &host }, std::process::id(), nanos & 0xfffff)
}

/// This process's host name, for registry entries.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

fn key(entry: &ModelReplica) -> String {
    format!("{}.{}", key_model(&entry.model), entry.replica)
}

/// A model name as a key-value key token: keys allow `=` but not `@`, so
/// a variant (`layout_cdla@int8`) is written `layout_cdla=int8`; the entry's
/// value keeps the name as is.
fn key_model(model: &str) -> String {
    model.replace('@', "=")
}

/// Writes `entries` now, then every [`HEARTBEAT`] until `shutdown`, then
/// deletes them. Returns once the first write succeeded (the replica is
/// visible), with the task that keeps them alive.
pub async fn advertise(
    store: kv::Store,
    entries: Vec<ModelReplica>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let encoded: Vec<(String, bytes::Bytes)> =
        entries.iter().map(|e| (key(e), serde_json::to_vec(e).expect("ModelReplica serialises").into())).collect();
    for (k, v) in &encoded {
        store.put(k, v.clone()).await.with_context(|| format!("advertising {k} in the model registry"))?;
    }
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
            for (k, v) in &encoded {
                if let Err(e) = store.put(k, v.clone()).await {
                    tracing::warn!(key = %k, error = %e, "model registry heartbeat failed; retrying");
                }
            }
        }
        for (k, _) in &encoded {
            let _ = store.delete(k).await;
        }
    }))
}

/// One model's live replicas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServedModel {
    pub name: String,
    pub replicas: Vec<ModelReplica>,
}

impl ServedModel {
    /// Distinct weights of the non-canary replicas (one, in a consistent fleet).
    pub fn weights(&self) -> Vec<&str> {
        let mut w: Vec<&str> = self.replicas.iter().filter(|r| !r.canary).map(|r| r.sha256.as_str()).collect();
        w.sort_unstable();
        w.dedup();
        w
    }

    /// The weights the non-canary replicas agree on (`None`: they serve
    /// different weights, or only canaries are live).
    pub fn agreed_weights(&self) -> Option<&str> {
        match self.weights()[..] {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// A document's model, decided once ([`resolve_model`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChoice {
    /// The model it asked for, else the deployment's default.
    pub model: String,
    /// Whether the document waits while no live replica serves the model:
    /// it asked to (`wait_for_model`), or the model is the default (the
    /// deployment's own promise: it waits while its fleet starts, say).
    pub wait: bool,
    /// Whether a live replica serves the model now.
    pub live: bool,
    /// sha256 of the weights its live non-canary replicas agree on.
    pub sha256: Option<String>,
}

impl ModelChoice {
    /// No live replica serves the model and the document does not wait:
    /// it is refused (`model_unavailable`).
    pub fn unavailable(&self) -> bool {
        !self.live && !self.wait
    }
}

/// The model a document gets, against the `live` models (by name): the
/// ingress decides it when it accepts a document, the splitter for a
/// document published on NATS without one; later turns carry it. What a
/// refusal says is the caller's.
pub fn resolve_model(
    asked: Option<&str>,
    wait_for_model: bool,
    default: &str,
    live: &BTreeMap<String, ServedModel>,
) -> ModelChoice {
    let model = asked.unwrap_or(default).to_string();
    let fleet = live.get(&model);
    ModelChoice {
        wait: wait_for_model || asked.is_none(),
        live: fleet.is_some(),
        sha256: fleet.and_then(ServedModel::agreed_weights).map(str::to_string),
        model,
    }
}

#[derive(Default)]
struct View {
    entries: HashMap<String, (ModelReplica, Instant)>,
    /// Whether the initial contents of the bucket have been read.
    synced: bool,
}

/// A live view of the registry, kept up to date by a watch.
#[derive(Clone)]
pub struct LiveModels {
    view: Arc<Mutex<View>>,
}

impl LiveModels {
    /// Starts watching the registry; the view is complete once the first
    /// pass over the bucket is done (this returns after it, or after 5 s).
    pub async fn watch(js: &jetstream::Context, names: &Names, shutdown: CancellationToken) -> Result<Self> {
        // Provisioned (with `nats.replicas`) when the stage connected.
        let store = js
            .get_key_value(names.models_bucket())
            .await
            .map_err(|e| anyhow::anyhow!("opening the model registry {}: {e}", names.models_bucket()))?;
        let view = Arc::new(Mutex::new(View::default()));
        let live = LiveModels { view: view.clone() };
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut synced_tx = Some(synced_tx);
            loop {
                let watch = match store.watch_all().await {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!(error = %e, "model registry watch failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                };
                // An empty bucket sends nothing: count it as read at once.
                let pending = store.status().await.map(|s| s.values()).unwrap_or(0);
                if pending == 0 {
                    view.lock().expect("registry view").synced = true;
                    if let Some(tx) = synced_tx.take() {
                        let _ = tx.send(());
                    }
                }
                let mut watch = watch;
                loop {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        n = watch.next() => n,
                    };
                    let Some(Ok(entry)) = next else { break };
                    let mut v = view.lock().expect("registry view");
                    match entry.operation {
                        kv::Operation::Put => match serde_json::from_slice::<ModelReplica>(&entry.value) {
                            Ok(r) => {
                                v.entries.insert(entry.key.clone(), (r, Instant::now()));
                            }
                            Err(e) => {
                                tracing::warn!(key = %entry.key, error = %e, "ignoring a malformed registry entry")
                            }
                        },
                        kv::Operation::Delete | kv::Operation::Purge => {
                            v.entries.remove(&entry.key);
                        }
                    }
                    if entry.delta == 0 && !v.synced {
                        v.synced = true;
                        if let Some(tx) = synced_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                tracing::warn!("model registry watch ended; restarting it");
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(5), synced_rx).await;
        Ok(live)
    }

    /// The live models, by name, with their replicas.
    pub fn models(&self) -> BTreeMap<String, ServedModel> {
        let v = self.view.lock().expect("registry view");
        let mut out: BTreeMap<String, ServedModel> = BTreeMap::new();
        for (r, seen) in v.entries.values() {
            if seen.elapsed() > TTL {
                continue;
            }
            let m = out
                .entry(r.model.clone())
                .or_insert_with(|| ServedModel { name: r.model.clone(), ..Default::default() });
            m.replicas.push(r.clone());
        }
        for m in out.values_mut() {
            m.replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
        }
        out
    }

    /// [`resolve_model`] against the live models now.
    pub fn resolve(&self, asked: Option<&str>, wait_for_model: bool, default: &str) -> ModelChoice {
        resolve_model(asked, wait_for_model, default, &self.models())
    }

    /// `model`'s live replicas (`None`: no replica serves it now).
    pub fn get(&self, model: &str) -> Option<ServedModel> {
        self.models().remove(model)
    }

    /// Whether the view reflects the bucket (the first pass is done).
    pub fn synced(&self) -> bool {
        self.view.lock().expect("registry view").synced
    }
}

/// `model`'s replicas as the bucket holds them now (one read per key: for
/// start-up checks, not per request). Entries of a replica that died less
/// than [`TTL`] ago are still there.
pub async fn read_model(store: &kv::Store, model: &str) -> Result<Option<ServedModel>> {
    let prefix = format!("{}.", key_model(model));
    let keys: Vec<String> = store.keys().await.context("listing the model registry")?.try_collect().await?;
    let mut replicas = Vec::new();
    for key in keys.into_iter().filter(|k| k.starts_with(&prefix)) {
        if let Some(value) = store.get(&key).await.with_context(|| format!("reading registry entry {key}"))? {
            if let Ok(r) = serde_json::from_slice::<ModelReplica>(&value) {
                replicas.push(r);
            }
        }
    }
    replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
    Ok((!replicas.is_empty()).then(|| ServedModel { name: model.to_string(), replicas }))
}

/// Checks a newcomer's weights against the live fleet of the same model:
/// a non-canary replica must serve the weights the other non-canary
/// replicas serve. Returns the precise refusal otherwise.
pub fn check_weights(me: &ModelReplica, fleet: Option<&ServedModel>) -> Result<(), String> {
    if me.canary {
        return Ok(());
    }
    let Some(fleet) = fleet else { return Ok(()) };
    for other in fleet.replicas.iter().filter(|r| !r.canary && r.replica != me.replica) {
        if other.sha256 != me.sha256 {
            return Err(format!(
                "model {:?}: this replica's weights (sha256 {}) differ from those of live replica {} (sha256 {}); \
                 serve the same weights, give the model another name, or set inferencer.canary = true to run them as a canary",
                me.model, me.sha256, other.replica, other.sha256
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, sha: &str, canary: bool) -> ModelReplica {
        ModelReplica {
            model: "m".into(),
            sha256: sha.into(),
            labels: vec![],
            backend: "ort".into(),
            device: "cpu".into(),
            batch_size: 1,
            canary,
            replica: id.into(),
            host: String::new(),
            started_at: String::new(),
        }
    }

    #[test]
    fn weights_conflicts() {
        let fleet =
            ServedModel { name: "m".into(), replicas: vec![replica("a", "aaa", false), replica("c", "ccc", true)] };
        assert!(check_weights(&replica("b", "aaa", false), Some(&fleet)).is_ok());
        assert!(check_weights(&replica("b", "bbb", false), None).is_ok());
        let err = check_weights(&replica("b", "bbb", false), Some(&fleet)).unwrap_err();
        assert!(err.contains("aaa") && err.contains("bbb") && err.contains("canary"), "{err}");
        assert!(check_weights(&replica("b", "bbb", true), Some(&fleet)).is_ok());
        assert_eq!(fleet.weights(), vec!["aaa"]);
    }

    #[test]
    fn a_document_gets_its_model_once_with_the_fleets_weights() {
        let fleet =
            |name: &str, replicas: Vec<ModelReplica>| (name.to_string(), ServedModel { name: name.into(), replicas });
        let live: BTreeMap<String, ServedModel> = [
            fleet("m", vec![replica("a", "aaa", false), replica("c", "ccc", true)]),
            fleet("split", vec![replica("a", "aaa", false), replica("b", "bbb", false)]),
            fleet("canaries", vec![replica("c", "ccc", true)]),
        ]
        .into();
        // Asked for and live: its weights (the canary's are not the fleet's).
        let got = resolve_model(Some("m"), false, "dflt", &live);
        assert_eq!(got, ModelChoice { model: "m".into(), wait: false, live: true, sha256: Some("aaa".into()) });
        assert!(!got.unavailable());
        // Weights the fleet disagrees on, or only canaries: none recorded.
        assert_eq!(resolve_model(Some("split"), false, "dflt", &live).sha256, None);
        assert_eq!(resolve_model(Some("canaries"), false, "dflt", &live).sha256, None);
        // Asked for, nobody serves it: refused unless it waits.
        let gone = resolve_model(Some("gone"), false, "dflt", &live);
        assert!(gone.unavailable() && !gone.live && gone.sha256.is_none(), "{gone:?}");
        assert!(!resolve_model(Some("gone"), true, "dflt", &live).unavailable());
        // Not asked: the default, which always waits.
        let default = resolve_model(None, false, "dflt", &live);
        assert_eq!(default, ModelChoice { model: "dflt".into(), wait: true, live: false, sha256: None });
        assert!(!default.unavailable());
        assert!(resolve_model(None, false, "m", &live).live);
    }
}
