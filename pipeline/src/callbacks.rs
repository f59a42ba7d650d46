//! What the notifier records about webhooks, and what the ingress reads
//! back for a document's status (`callback: {state, …}`). The address
//! rules of a callback URL are [`crate::outbound::AddressPolicy`]'s.
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
