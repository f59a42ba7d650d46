//! Durable document records and per-tenant indexes: who owns a document,
//! its page count, and what each tenant has queued, running and split.
//!
//! The events stream is a history that forgets (it discards its oldest
//! events at `nats.max_event_bytes`), so nothing that decides *who may see
//! a document* or *what a tenant may still submit* lives only there. These
//! keys sit in the counters' key-value bucket `<prefix>_progress` (same
//! 7-day lifetime), beside the page bitmaps (`<doc>.<state>`):
//!
//! | key | value | written by |
//! |---|---|---|
//! | `<doc>.record` | [`DocRecord`] (JSON): owner, page count, state | the ingress at submission ([`DocRecords::create`]), the splitter for documents published on NATS ([`DocRecords::adopt`]), then every document-level event ([`DocRecords::note_event`], called by `Progress::doc`) |
//! | `owner.<tenant>.<doc>` | `{"state": …}` | with the record: the tenant's documents, what a token's list reads |
//! | `active.<tenant>.<doc>` | `1` | while the document is queued or running: `tenants.max_documents` counts these; purged (no marker left) when it ends |
//! | `pages.<tenant>.<doc>` | the page count | once, when the splitter records the count: `tenants.pages_per_hour` sums these messages of the last hour |
//! | `ended.<tenant>.<doc>` | `{"state": …}` | when the document reaches its terminal state; purged by the notifier once the terminal webhook is scheduled (or none is due), so a terminal event evicted from the events stream before the notifier read it is still delivered ([`DocRecords::ended`]) |
//!
//! A tenant is an owner id or `anonymous` ([`crate::tenants::tenant_of`]).
//! Document ids never contain `.`, so these keys never collide with the
//! two-token page-set keys. Side effects are written before the record
//! itself and are idempotent, so a failure (the caller's message is
//! retried) never leaves the record ahead of its indexes.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, kv};
use futures::TryStreamExt;
use pagestream_schemas::{Callback, DocInfo, DocumentSubmitted, EventState};
use serde::{Deserialize, Serialize};

use crate::counters::Counters;
use crate::doc_state::DocState;
use crate::tenants::tenant_of;

/// A document's durable record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocRecord {
    /// The owner id of the token that submitted it; `None`: published on
    /// NATS without one (visible to every token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Pages, once the splitter opened it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_count: Option<u32>,
    /// The document's own webhook (its submission's `callback_url`), kept
    /// here so that the terminal webhook goes out even when the events
    /// that named it are gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
    /// The state as of the last document-level event (the first terminal
    /// state sticks, as in [`DocState::after`]).
    pub state: DocState,
    /// When the record was created (RFC 3339).
    pub created_at: String,
}

impl DocRecord {
    /// The tenant the document counts against.
    pub fn tenant(&self) -> &str {
        tenant_of(self.owner.as_deref())
    }
}

/// One entry of a tenant's index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct IndexEntry {
    state: DocState,
}

/// A key read by [`DocRecords::scan`].
struct Scanned {
    /// The key (without the bucket's subject prefix).
    key: String,
    payload: bytes::Bytes,
    sequence: u64,
    published: time::OffsetDateTime,
}

/// How long a scan waits for a message it was told is pending before it
/// looks again (the message may have been purged meanwhile).
const SCAN_SILENCE: Duration = Duration::from_millis(500);

/// Compare-and-set attempts before an update gives up.
const MAX_ATTEMPTS: u32 = 32;

/// Records, tenant indexes and quota usage, in the `<prefix>_progress` bucket.
#[derive(Debug, Clone)]
pub struct DocRecords {
    kv: kv::Store,
}

fn record_key(doc_id: &str) -> String {
    format!("{doc_id}.record")
}
fn index_key(tenant: &str, doc_id: &str) -> String {
    format!("owner.{tenant}.{doc_id}")
}
fn active_key(tenant: &str, doc_id: &str) -> String {
    format!("active.{tenant}.{doc_id}")
}
fn pages_key(tenant: &str, doc_id: &str) -> String {
    format!("pages.{tenant}.{doc_id}")
}
fn ended_key(tenant: &str, doc_id: &str) -> String {
    format!("ended.{tenant}.{doc_id}")
}

/// A document that reached its terminal state and whose terminal webhook
/// the notifier has not scheduled yet ([`DocRecords::ended`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    pub doc_id: String,
    pub tenant: String,
    pub state: DocState,
}

impl DocRecords {
    /// The records beside `counters`' page sets.
    pub fn new(counters: &Counters) -> Self {
        DocRecords { kv: counters.store().clone() }
    }

    /// The records of an already opened `<prefix>_progress` bucket.
    pub fn from_store(kv: kv::Store) -> Self {
        DocRecords { kv }
    }

    /// The document's record (`None`: never recorded, or expired), read at
    /// the bucket's stream leader (read-after-write, as the counters).
    pub async fn get(&self, doc_id: &str) -> Result<Option<DocRecord>> {
        Ok(self.read(doc_id).await?.map(|(r, _)| r))
    }

    async fn read(&self, doc_id: &str) -> Result<Option<(DocRecord, u64)>> {
        use jetstream::stream::LastRawMessageErrorKind;
        let key = record_key(doc_id);
        let subject = format!("{}{key}", self.kv.prefix);
        match self.kv.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(msg) if msg.headers.get("KV-Operation").is_some() => Ok(None),
            Ok(msg) => {
                let record = serde_json::from_slice(&msg.payload).with_context(|| format!("decoding record {key}"))?;
                Ok(Some((record, msg.sequence)))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("reading record {key}: {e}")),
        }
    }

    /// Creates the record of a new document (with its index entry and,
    /// unless `state` is terminal, its active entry); false when it already
    /// had one (nothing changes).
    pub async fn create(
        &self,
        doc_id: &str,
        owner: Option<&str>,
        callback: Option<Callback>,
        state: DocState,
    ) -> Result<bool> {
        let record = DocRecord {
            owner: owner.map(str::to_string),
            page_count: None,
            callback,
            state,
            created_at: crate::util::now_rfc3339(),
        };
        self.create_record(doc_id, record).await
    }

    async fn create_record(&self, doc_id: &str, record: DocRecord) -> Result<bool> {
        let key = record_key(doc_id);
        if self.read(doc_id).await?.is_some() {
            return Ok(false);
        }
        self.follow(doc_id, None, &record).await?;
        let value = serde_json::to_vec(&record).expect("record serialises");
        match self.kv.create(&key, value.into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(anyhow::anyhow!("creating record {key}: {e}")),
        }
    }

    /// Records a document published on NATS (for the splitter, on a
    /// submission's first turn): its owner is `sub.owner` (none: every
    /// token sees it) and it counts against that tenant's documents. A
    /// document that already has a record (the ingress wrote it) is left
    /// alone, so a message cannot take over another tenant's document.
    pub async fn adopt(&self, sub: &DocumentSubmitted) -> Result<()> {
        self.create(&sub.doc_id, sub.owner.as_deref(), sub.options.callback(), DocState::Queued).await.map(|_| ())
    }

    /// Forgets a document that was never queued (a refused submission):
    /// its record, index, active and pages entries are purged.
    pub async fn forget(&self, tenant: &str, doc_id: &str) -> Result<()> {
        for key in [
            active_key(tenant, doc_id),
            index_key(tenant, doc_id),
            pages_key(tenant, doc_id),
            ended_key(tenant, doc_id),
            record_key(doc_id),
        ] {
            self.purge(&key).await?;
        }
        Ok(())
    }

    /// Folds a document-level event into the record (state, page count),
    /// keeping the tenant's index, active and pages entries in step.
    /// Without a record (a document published on NATS that no splitter
    /// adopted, or one older than records), one is created with the owner
    /// from `info`, else `queued_owner` (the owner its `queued` event
    /// names, if that is still stored).
    pub async fn note_event(
        &self,
        doc_id: &str,
        event: EventState,
        info: Option<&DocInfo>,
        queued_owner: impl std::future::Future<Output = Option<String>>,
    ) -> Result<()> {
        let final_status = info.and_then(|i| i.status);
        let page_count = info.and_then(|i| i.page_count);
        let mut queued_owner = Some(queued_owner);
        for _ in 0..MAX_ATTEMPTS {
            let Some((before, revision)) = self.read(doc_id).await? else {
                let owner = match info.and_then(|i| i.owner.clone()) {
                    Some(o) => Some(o),
                    None => match queued_owner.take() {
                        Some(f) => f.await,
                        None => None,
                    },
                };
                let record = DocRecord {
                    owner,
                    page_count,
                    callback: info.and_then(|i| i.callback.clone()),
                    state: DocState::Queued.after(event, final_status),
                    created_at: crate::util::now_rfc3339(),
                };
                if self.create_record(doc_id, record).await? {
                    return Ok(());
                }
                continue;
            };
            let mut after = before.clone();
            after.state = before.state.after(event, final_status);
            if after.page_count.is_none() {
                after.page_count = page_count;
            }
            if after.callback.is_none() {
                after.callback = info.and_then(|i| i.callback.clone());
            }
            if after == before {
                return Ok(());
            }
            self.follow(doc_id, Some(&before), &after).await?;
            let key = record_key(doc_id);
            let value = serde_json::to_vec(&after).expect("record serialises");
            match self.kv.update(&key, value.into(), revision).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("updating record {key}: {e}")),
            }
        }
        anyhow::bail!("record of {doc_id}: {MAX_ATTEMPTS} conflicting updates in a row")
    }

    /// The tenant's entries that follow a record going from `before` to
    /// `after` (idempotent: written again after a failure).
    async fn follow(&self, doc_id: &str, before: Option<&DocRecord>, after: &DocRecord) -> Result<()> {
        let tenant = after.tenant();
        if before.is_none_or(|b| b.state != after.state) {
            let entry = serde_json::to_vec(&IndexEntry { state: after.state }).expect("entry serialises");
            self.kv.put(index_key(tenant, doc_id), entry.into()).await.context("writing a tenant index entry")?;
        }
        if after.state.is_terminal() {
            if before.is_none_or(|b| !b.state.is_terminal()) {
                let entry = serde_json::to_vec(&IndexEntry { state: after.state }).expect("entry serialises");
                self.kv.put(ended_key(tenant, doc_id), entry.into()).await.context("marking a document ended")?;
                self.purge(&active_key(tenant, doc_id)).await?;
            }
        } else if before.is_none() {
            // `create`: a reservation already there keeps its place in line.
            match self.kv.create(active_key(tenant, doc_id), "1".into()).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(anyhow::anyhow!("writing the active entry of {doc_id}: {e}")),
            }
        }
        if let (Some(n), None) = (after.page_count, before.and_then(|b| b.page_count)) {
            match self.kv.create(pages_key(tenant, doc_id), n.to_string().into()).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(anyhow::anyhow!("counting the pages of {doc_id}: {e}")),
            }
        }
        Ok(())
    }

    /// Removes every message of `key` (no delete marker is left, so subject
    /// listings count only live entries).
    async fn purge(&self, key: &str) -> Result<()> {
        let subject = format!("{}{key}", self.kv.prefix);
        self.kv.stream.purge().filter(subject).await.map_err(|e| anyhow::anyhow!("purging {key}: {e}"))?;
        Ok(())
    }

    /// Reserves a place among `tenant`'s queued and running documents for
    /// a new document `doc_id`, before anything else of it is stored:
    /// `Ok(None)` when admitted, `Ok(Some(active))` when `max` (> 0)
    /// documents submitted before it are still queued or running (the
    /// reservation is then withdrawn). Concurrent submissions of one tenant
    /// (any number of ingress replicas) are ordered by their reservation's
    /// position in the stream, so exactly `max` are admitted.
    pub async fn reserve(&self, tenant: &str, doc_id: &str, max: u32) -> Result<Option<usize>> {
        let key = active_key(tenant, doc_id);
        let mine = self.kv.put(&key, "1".into()).await.context("reserving a document")?;
        if max == 0 {
            return Ok(None);
        }
        let active =
            self.scan(&format!("active.{tenant}.*"), jetstream::consumer::DeliverPolicy::LastPerSubject).await?;
        let ahead = active.iter().filter(|s| s.sequence < mine && s.key != key).count();
        if ahead >= max as usize {
            self.purge(&key).await?;
            return Ok(Some(ahead));
        }
        Ok(None)
    }

    /// Withdraws a reservation whose document was not queued.
    pub async fn release(&self, tenant: &str, doc_id: &str) -> Result<()> {
        self.purge(&active_key(tenant, doc_id)).await
    }

    /// Queued or running documents per tenant (every tenant with one): one
    /// subject listing, no value read.
    pub async fn active_by_tenant(&self) -> Result<BTreeMap<String, usize>> {
        self.count_by_tenant("active.>").await
    }

    /// Queued or running documents of `tenant`.
    pub async fn active(&self, tenant: &str) -> Result<usize> {
        Ok(self.count_by_tenant(&format!("active.{tenant}.*")).await?.get(tenant).copied().unwrap_or(0))
    }

    async fn count_by_tenant(&self, filter: &str) -> Result<BTreeMap<String, usize>> {
        let subjects = crate::nats::subject_counts(&self.kv.stream, &format!("{}{filter}", self.kv.prefix))
            .await
            .context("listing active documents")?;
        let mut out = BTreeMap::new();
        for subject in subjects.keys() {
            let key = subject.strip_prefix(self.kv.prefix.as_str()).unwrap_or(subject);
            if let Some(tenant) = key.split('.').nth(1) {
                *out.entry(tenant.to_string()).or_default() += 1;
            }
        }
        Ok(out)
    }

    /// Pages of `tenant`'s documents split within the last `window`, as
    /// `(when, pages)`, oldest first: the messages of the window only.
    pub async fn pages_within(&self, tenant: &str, window: Duration) -> Result<Vec<(time::OffsetDateTime, u32)>> {
        let start_time = time::OffsetDateTime::now_utc() - window;
        let scanned = self
            .scan(&format!("pages.{tenant}.*"), jetstream::consumer::DeliverPolicy::ByStartTime { start_time })
            .await?;
        let mut out: Vec<(time::OffsetDateTime, u32)> = scanned
            .iter()
            .filter_map(|s| Some((s.published, std::str::from_utf8(&s.payload).ok()?.parse().ok()?)))
            .collect();
        out.sort_by_key(|(t, _)| *t);
        Ok(out)
    }

    /// Every document of `tenant` (the last 7 days) with its state, in id
    /// order: one read per document of the tenant, none of anyone else's.
    pub async fn documents_of(&self, tenant: &str) -> Result<BTreeMap<String, DocState>> {
        let scanned =
            self.scan(&format!("owner.{tenant}.*"), jetstream::consumer::DeliverPolicy::LastPerSubject).await?;
        Ok(scanned
            .into_iter()
            .filter_map(|s| {
                let doc = s.key.rsplit('.').next()?.to_string();
                let entry: IndexEntry = serde_json::from_slice(&s.payload).ok()?;
                Some((doc, entry.state))
            })
            .collect())
    }

    /// Documents that reached their terminal state and whose terminal
    /// webhook is not scheduled yet (the notifier's sweep), oldest first.
    pub async fn ended(&self) -> Result<Vec<Ended>> {
        let scanned = self.scan("ended.*.*", jetstream::consumer::DeliverPolicy::LastPerSubject).await?;
        Ok(scanned
            .into_iter()
            .filter_map(|s| {
                let mut parts = s.key.splitn(3, '.').skip(1);
                let (tenant, doc_id) = (parts.next()?.to_string(), parts.next()?.to_string());
                let entry: IndexEntry = serde_json::from_slice(&s.payload).ok()?;
                Some(Ended { doc_id, tenant, state: entry.state })
            })
            .collect())
    }

    /// The document's terminal webhook is scheduled, or none is due.
    pub async fn clear_ended(&self, tenant: &str, doc_id: &str) -> Result<()> {
        self.purge(&ended_key(tenant, doc_id)).await
    }

    /// The messages of the keys matching `filter`, from `policy` on, read
    /// with one ordered consumer until nothing is pending; delete and purge
    /// markers are left out.
    async fn scan(&self, filter: &str, policy: jetstream::consumer::DeliverPolicy) -> Result<Vec<Scanned>> {
        use jetstream::consumer::DeliverPolicy;
        let mut out: BTreeMap<String, Scanned> = BTreeMap::new();
        let mut policy = policy;
        loop {
            let consumer = self
                .kv
                .stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    filter_subject: format!("{}{filter}", self.kv.prefix),
                    deliver_policy: policy,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("reading {filter}"))?;
            if consumer.cached_info().num_pending == 0 {
                break;
            }
            let mut messages = consumer.messages().await.with_context(|| format!("reading {filter}"))?;
            let mut last = None;
            let mut finished = false;
            // A key purged after the consumer counted it (a reservation
            // withdrawn, a marker cleared) is never delivered: silence, then
            // a new consumer from the last message read says what is left.
            while let Ok(next) = tokio::time::timeout(SCAN_SILENCE, messages.try_next()).await {
                let Some(msg) = next.with_context(|| format!("reading {filter}"))? else {
                    finished = true;
                    break;
                };
                let info = msg.info().map_err(|e| anyhow::anyhow!("reading {filter}: {e}"))?;
                let (sequence, pending, published) = (info.stream_sequence, info.pending, info.published);
                last = Some(sequence);
                let marker = msg.headers.as_ref().is_some_and(|h| h.get("KV-Operation").is_some());
                let key = msg.subject.strip_prefix(self.kv.prefix.as_str()).unwrap_or(&msg.subject).to_string();
                // The newest message of a key read again replaces the older.
                if marker {
                    out.remove(&key);
                } else {
                    out.insert(key.clone(), Scanned { key, payload: msg.payload.clone(), sequence, published });
                }
                if pending == 0 {
                    finished = true;
                    break;
                }
            }
            if finished {
                break;
            }
            if let Some(seq) = last {
                policy = DeliverPolicy::ByStartSequence { start_sequence: seq + 1 };
            }
        }
        let mut out: Vec<Scanned> = out.into_values().collect();
        out.sort_by_key(|s| s.sequence);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_collide_with_page_sets() {
        // Page sets are `<doc>.<state>`: two tokens. Ours have two with a
        // fixed suffix, or three.
        assert_eq!(record_key("d1"), "d1.record");
        assert_eq!(index_key("anonymous", "d1"), "owner.anonymous.d1");
        assert_eq!(active_key("0123456789abcdef", "d1").split('.').count(), 3);
        assert_eq!(pages_key("t", "d").split('.').count(), 3);
        assert_eq!(ended_key("t", "d").split('.').count(), 3);
    }

    #[test]
    fn records_round_trip_and_name_their_tenant() {
        let r = DocRecord {
            owner: Some("0123456789abcdef".into()),
            page_count: Some(3),
            callback: None,
            state: DocState::Running,
            created_at: "2026-01-01T00:00:00Z".into(),
        };
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(serde_json::from_slice::<DocRecord>(&json).unwrap(), r);
        assert_eq!(r.tenant(), "0123456789abcdef");
        let public = DocRecord { owner: None, ..r };
        assert_eq!(public.tenant(), crate::tenants::ANONYMOUS);
        assert!(!String::from_utf8(serde_json::to_vec(&public).unwrap()).unwrap().contains("owner"));
    }
}
