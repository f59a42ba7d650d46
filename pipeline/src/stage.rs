//! What a stage needs from its process: the JetStream context, names,
//! metrics, readiness and config. Binaries build one with [`StageContext::connect`];
//! the all-in-one mode and the tests share one between every stage.

use std::sync::Arc;

use anyhow::Result;
use async_nats::jetstream;

use crate::blob::BlobStore;
use crate::config::Config;
use crate::counters::Counters;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::nats::{self, Names};
use crate::progress::{read_status_with_record, DocStatus, EventLookup, Progress, ProgressError};
use crate::records::DocRecord;

#[derive(Debug, Clone)]
pub struct StageContext {
    pub js: jetstream::Context,
    pub names: Names,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub health: Health,
    /// Cheap per-page questions to the events stream: cancelled? done?
    pub events: Arc<EventLookup>,
    /// Per-document page counters (O(1) progress, flow control).
    pub counters: Counters,
}

impl StageContext {
    /// Connects to NATS and provisions streams, consumers and the blob bucket
    /// (idempotent). `name` is the client name shown by the server.
    pub async fn connect(config: Config, name: &str, metrics: Arc<Metrics>, health: Health) -> Result<Self> {
        health.register("nats");
        let js = nats::connect(&config.nats, name).await?;
        let names = Names::new(config.nats.prefix.clone());
        crate::provision::provision(&js, &names, &config.nats).await?;
        health.set_ready("nats", true);
        let events = Arc::new(EventLookup::new(js.clone(), names.clone()));
        let counters = Counters::open(&js, &names, config.nats.replicas).await?;
        Ok(StageContext { js, names, config: Arc::new(config), metrics, health, events, counters })
    }

    pub async fn blobs(&self) -> Result<BlobStore> {
        let bucket = self.names.blob_bucket();
        let (store, stream) =
            nats::retry_transient("the blob store", || nats::blob_store(&self.js, &self.names, &self.config.nats))
                .await?;
        Ok(BlobStore::new(store, self.js.clone(), stream, bucket))
    }

    /// Whether `doc_id` was cancelled; a failed check is a transient error.
    pub async fn is_cancelled(&self, doc_id: &str) -> Result<bool, crate::error::StageError> {
        self.events.is_cancelled(doc_id).await.map_err(|e| crate::error::StageError::nats(e).doc(doc_id))
    }

    /// Whether page `page` of `doc_id` already reached `state`.
    pub async fn page_reached(
        &self,
        doc_id: &str,
        page: u32,
        state: pagestream_schemas::EventState,
    ) -> Result<bool, crate::error::StageError> {
        let err = |e: &dyn std::fmt::Display| crate::error::StageError::nats(e).doc(doc_id);
        let reached = self.events.page_reached(doc_id, page, state).await.map_err(|e| err(&e))?;
        if reached {
            // A crash between the event and its counter leaves the page
            // unmarked: mark it now (idempotent).
            self.counters.mark(doc_id, state, page, None).await.map_err(|e| err(&e))?;
        }
        Ok(reached)
    }

    /// `doc_id`'s status ([`read_status`](crate::progress::read_status));
    /// `None` when neither an event nor a record exists for it. With
    /// `page_details`, failed pages' reasons too.
    pub async fn status(&self, doc_id: &str, page_details: bool) -> Result<Option<DocStatus>, ProgressError> {
        Ok(self.status_with_record(doc_id, page_details).await?.map(|(status, _)| status))
    }

    /// [`StageContext::status`], with the document's durable record
    /// ([`read_status_with_record`]).
    pub async fn status_with_record(
        &self,
        doc_id: &str,
        page_details: bool,
    ) -> Result<Option<(DocStatus, Option<DocRecord>)>, ProgressError> {
        read_status_with_record(&self.js, &self.names, &self.counters, doc_id, page_details).await
    }

    pub fn progress(&self, stage: &'static str) -> Progress {
        Progress::new(self.js.clone(), self.names.clone(), self.counters.clone(), stage)
    }
}
