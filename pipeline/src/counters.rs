//! Per-document page counters: O(1) progress.
//!
//! One key per document and page state in the key-value bucket
//! `<prefix>_progress`: `<doc>.<state>` (state = rendered, inferred,
//! uploaded, failed). Its value is a [`PageSet`]: a bitmap with one bit per
//! page plus the sum, count and maximum of the stage's per-page times.
//! A stage marks a page with a compare-and-set loop (read the entry, set the
//! bit, write it back with the revision it read); a bit already set changes
//! nothing, so a redelivered page never counts twice and its time is never
//! added twice. Reading a document's counts is one `get` per state whatever
//! its page count (a 10,000-page document's bitmap is 1.25 KB), so status
//! reads, completion checks and flow control cost the same at 5 pages and at
//! 10,000.
//!
//! Replicas of one stage contend only on their own state's key; a conflict
//! costs one more read and write. The events stream stays the history (SSE,
//! failure reasons); the counters are its index.

use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use pagestream_schemas::EventState;

use crate::nats::Names;

/// Value layout, little endian: `[version=1][timed u32][sum_ms f64][max_ms f32][bitmap…]`,
/// bit `p-1` of the bitmap (byte `(p-1)/8`, bit `(p-1)%8`) is page `p`.
const HEADER: usize = 1 + 4 + 8 + 4;
const FORMAT_VERSION: u8 = 1;

/// The pages of one document that reached one state, with their timing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PageSet {
    bits: Vec<u8>,
    /// Pages whose time was recorded.
    pub timed: u32,
    pub sum_ms: f64,
    pub max_ms: f32,
}

impl PageSet {
    pub fn contains(&self, page: u32) -> bool {
        if page == 0 {
            return false;
        }
        let i = (page - 1) as usize;
        self.bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Adds `page` (1-based); false when it was already there (nothing changes).
    pub fn insert(&mut self, page: u32, ms: Option<f32>) -> bool {
        if page == 0 || self.contains(page) {
            return false;
        }
        let i = (page - 1) as usize;
        if self.bits.len() <= i / 8 {
            self.bits.resize(i / 8 + 1, 0);
        }
        self.bits[i / 8] |= 1 << (i % 8);
        if let Some(ms) = ms.filter(|m| m.is_finite() && *m >= 0.0) {
            self.timed += 1;
            self.sum_ms += ms as f64;
            self.max_ms = self.max_ms.max(ms);
        }
        true
    }

    pub fn len(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|b| *b == 0)
    }

    /// Pages in ascending order.
    pub fn pages(&self) -> impl Iterator<Item = u32> + '_ {
        self.bits.iter().enumerate().flat_map(|(byte, b)| {
            (0..8).filter(move |bit| b & (1 << bit) != 0).map(move |bit| (byte * 8 + bit) as u32 + 1)
        })
    }

    /// Pages in either set.
    pub fn union_len(&self, other: &PageSet) -> u32 {
        let n = self.bits.len().max(other.bits.len());
        (0..n)
            .map(|i| (self.bits.get(i).copied().unwrap_or(0) | other.bits.get(i).copied().unwrap_or(0)).count_ones())
            .sum()
    }

    /// Pages in `self` but not in `other`.
    pub fn minus_len(&self, other: &PageSet) -> u32 {
        self.bits.iter().enumerate().map(|(i, b)| (b & !other.bits.get(i).copied().unwrap_or(0)).count_ones()).sum()
    }

    pub fn mean_ms(&self) -> Option<f64> {
        (self.timed > 0).then(|| self.sum_ms / self.timed as f64)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.bits.len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.timed.to_le_bytes());
        out.extend_from_slice(&self.sum_ms.to_le_bytes());
        out.extend_from_slice(&self.max_ms.to_le_bytes());
        out.extend_from_slice(&self.bits);
        out
    }

    pub fn decode(raw: &[u8]) -> Result<PageSet> {
        if raw.len() < HEADER || raw[0] != FORMAT_VERSION {
            anyhow::bail!("page counter: unknown format ({} bytes, version {:?})", raw.len(), raw.first());
        }
        let u32_at = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
        Ok(PageSet {
            timed: u32_at(1),
            sum_ms: f64::from_le_bytes(raw[5..13].try_into().expect("8 bytes")),
            max_ms: f32::from_le_bytes(raw[13..17].try_into().expect("4 bytes")),
            bits: raw[HEADER..].to_vec(),
        })
    }
}

/// The four page sets of a document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DocCounters {
    pub rendered: PageSet,
    pub inferred: PageSet,
    pub uploaded: PageSet,
    pub failed: PageSet,
}

impl DocCounters {
    /// Pages with an outcome (uploaded or failed; a page in both counts once).
    pub fn done(&self) -> u32 {
        self.uploaded.union_len(&self.failed)
    }
}

/// Page states that have a counter.
pub const COUNTED: [EventState; 4] =
    [EventState::Rendered, EventState::Inferred, EventState::Uploaded, EventState::Failed];

/// Compare-and-set attempts before a mark gives up (a transient error).
const MAX_ATTEMPTS: u32 = 64;

/// The counters bucket.
#[derive(Debug, Clone)]
pub struct Counters {
    kv: kv::Store,
}

impl Counters {
    /// Opens the bucket `<prefix>_progress`, creating it with `replicas`
    /// copies when missing.
    pub async fn open(js: &jetstream::Context, names: &Names, replicas: usize) -> Result<Self> {
        let description = "pagestream: per-document page counters (bitmaps), see pipeline/src/counters.rs";
        Self::open_bucket(js, names.progress_bucket(), description, replicas).await
    }

    /// Another bucket of page sets, `bucket`, created with `replicas`
    /// copies when missing (the notifier's delivered pages).
    pub async fn open_bucket(
        js: &jetstream::Context,
        bucket: String,
        description: &str,
        replicas: usize,
    ) -> Result<Self> {
        let kv = crate::nats::kv_bucket(
            js,
            kv::Config {
                bucket,
                description: description.into(),
                history: 1,
                // Same lifetime as the events they index.
                max_age: Duration::from_secs(7 * 24 * 3600),
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(Counters { kv })
    }

    /// The bucket itself, for records beside the page sets.
    pub fn store(&self) -> &kv::Store {
        &self.kv
    }

    /// [`Counters::mark`] for any key of the bucket.
    pub async fn mark_key(&self, key: &str, page: u32) -> Result<bool> {
        self.mark_raw(key.to_string(), page, None).await
    }

    /// The page set under any key (empty when none).
    pub async fn get_key(&self, key: &str) -> Result<PageSet> {
        Ok(self.read(key).await?.map(|(set, _)| set).unwrap_or_default())
    }

    fn key(doc_id: &str, state: EventState) -> String {
        format!("{doc_id}.{}", state.as_str())
    }

    /// The current value of `key` and its revision, read at the bucket's
    /// stream leader.
    ///
    /// Never a direct get: JetStream creates key-value streams with
    /// `allow_direct`, so any replica may answer `kv.get`, and a follower a
    /// few milliseconds behind answers with the value before the last
    /// write. The uploader of a document's last page then counts one page
    /// short, never writes the manifest, and the document stays `running`
    /// with every page uploaded — seen in the 3-node cluster test. A
    /// completion check needs read-after-write, which the leader gives (one
    /// round trip to the leader instead of the nearest replica; on one
    /// server they are the same).
    async fn read(&self, key: &str) -> Result<Option<(PageSet, u64)>> {
        use jetstream::stream::LastRawMessageErrorKind;
        let subject = format!("{}{key}", self.kv.prefix);
        match self.kv.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(msg) => {
                // A delete or purge marker (never written by us) reads as empty.
                let marker = msg.headers.get("KV-Operation").is_some();
                let set = if marker { PageSet::default() } else { PageSet::decode(&msg.payload)? };
                Ok(Some((set, msg.sequence)))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("reading counter {key}: {e}")),
        }
    }

    /// Records that `page` of `doc_id` reached `state` (with the stage's time
    /// for it). Idempotent: returns false when it was already recorded.
    pub async fn mark(&self, doc_id: &str, state: EventState, page: u32, ms: Option<f32>) -> Result<bool> {
        self.mark_raw(Self::key(doc_id, state), page, ms).await
    }

    async fn mark_raw(&self, key: String, page: u32, ms: Option<f32>) -> Result<bool> {
        let started = std::time::Instant::now();
        let mut outage_delay = Duration::from_millis(100);
        let mut attempt = 0;
        while attempt < MAX_ATTEMPTS {
            let written = match self.try_mark(&key, page, ms).await {
                Ok(Some(written)) => written,
                Ok(None) => return Ok(false),
                // The bucket's stream has no leader for a moment (a cluster
                // node restarts): ride it out here, like `publish_durable`,
                // rather than use up the message's deliveries.
                Err(e) if started.elapsed() + outage_delay <= crate::nats::OUTAGE_RIDE => {
                    tracing::debug!(key, error = %e, delay = ?outage_delay, "counter unavailable; trying again");
                    tokio::time::sleep(outage_delay).await;
                    outage_delay = (outage_delay * 2).min(Duration::from_secs(2));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if written {
                return Ok(true);
            }
            attempt += 1;
            // Another replica wrote in between: read again. A short, growing
            // pause keeps many contenders from colliding in lockstep.
            tokio::time::sleep(Duration::from_micros(200 * u64::from(attempt.min(20)) + jitter_us())).await;
        }
        anyhow::bail!("counter {key}: {MAX_ATTEMPTS} conflicting updates in a row")
    }

    /// One read and compare-and-set: `None` when `page` was already in the
    /// set, `Some(false)` when another writer came first.
    async fn try_mark(&self, key: &str, page: u32, ms: Option<f32>) -> Result<Option<bool>> {
        let (mut set, revision) = match self.read(key).await? {
            Some((set, revision)) => (set, Some(revision)),
            None => (PageSet::default(), None),
        };
        if !set.insert(page, ms) {
            return Ok(None);
        }
        let value = Bytes::from(set.encode());
        Ok(Some(match revision {
            Some(rev) => match self.kv.update(key, value, rev).await {
                Ok(_) => true,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                Err(e) => return Err(anyhow::anyhow!("updating counter {key}: {e}")),
            },
            None => match self.kv.create(key, value).await {
                Ok(_) => true,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                Err(e) => return Err(anyhow::anyhow!("creating counter {key}: {e}")),
            },
        }))
    }

    /// The pages of `doc_id` in `state` (empty when none).
    pub async fn get(&self, doc_id: &str, state: EventState) -> Result<PageSet> {
        Ok(self.read(&Self::key(doc_id, state)).await?.map(|(set, _)| set).unwrap_or_default())
    }

    /// All four sets of `doc_id`: four reads, whatever the page count.
    pub async fn doc(&self, doc_id: &str) -> Result<DocCounters> {
        let (rendered, inferred, uploaded, failed) = tokio::try_join!(
            self.get(doc_id, EventState::Rendered),
            self.get(doc_id, EventState::Inferred),
            self.get(doc_id, EventState::Uploaded),
            self.get(doc_id, EventState::Failed),
        )?;
        Ok(DocCounters { rendered, inferred, uploaded, failed })
    }
}

fn jitter_us() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    u64::from(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) % 500)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_is_idempotent_and_times_count_once() {
        let mut s = PageSet::default();
        assert!(s.insert(3, Some(10.0)));
        assert!(!s.insert(3, Some(99.0)), "a second mark of the same page changes nothing");
        assert!(s.insert(1, None));
        assert!(s.insert(10_000, Some(30.0)));
        assert!(!s.insert(0, Some(1.0)), "pages are 1-based");
        assert_eq!(s.len(), 3);
        assert_eq!(s.timed, 2);
        assert_eq!(s.mean_ms(), Some(20.0));
        assert_eq!(s.max_ms, 30.0);
        assert_eq!(s.pages().collect::<Vec<_>>(), vec![1, 3, 10_000]);
        assert!(s.contains(10_000) && !s.contains(2) && !s.contains(20_000));
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let mut s = PageSet::default();
        for p in (1..=2415).step_by(7) {
            s.insert(p, Some(p as f32));
        }
        let raw = s.encode();
        assert!(raw.len() <= HEADER + 2415 / 8 + 1);
        assert_eq!(PageSet::decode(&raw).unwrap(), s);
        assert!(PageSet::decode(b"").is_err());
        assert!(PageSet::decode(&[2; 40]).is_err());
    }

    #[test]
    fn union_and_difference_count_each_page_once() {
        let (mut a, mut b) = (PageSet::default(), PageSet::default());
        for p in [1, 2, 3, 9] {
            a.insert(p, None);
        }
        for p in [3, 4, 17] {
            b.insert(p, None);
        }
        assert_eq!(a.union_len(&b), 6);
        assert_eq!(b.union_len(&a), 6);
        assert_eq!(a.minus_len(&b), 3);
        assert_eq!(b.minus_len(&a), 2);
        let c = DocCounters { uploaded: a, failed: b, ..Default::default() };
        assert_eq!(c.done(), 6);
    }
}
