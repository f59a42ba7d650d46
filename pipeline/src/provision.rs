//! What one pipeline provisions at start-up: the streams and consumers of
//! the data files `nats/streams.json` and `nats/consumers.json`, the blob
//! bucket, and the buckets of the page counters ([`crate::counters`]), the
//! model registry ([`crate::registry`]) and `Idempotency-Key`s.
//!
//! Above [`crate::nats`], which holds the tools used here and by the
//! stages for definitions of their own (templates, retries of unanswered
//! requests, creation races): those know nothing of the stores built on
//! them.

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, consumer, stream};

use crate::config::NatsConfig;
use crate::counters::Counters;
use crate::nats::{
    blob_store, idempotency_store, provision_stream, provisioning, render_template, retry_transient, ConsumerDef, Names,
};
use crate::registry;

const STREAMS_JSON: &str = include_str!("../../nats/streams.json");
const CONSUMERS_JSON: &str = include_str!("../../nats/consumers.json");

/// The stream definitions of `nats/streams.json` for this prefix.
pub fn stream_configs(names: &Names, cfg: &NatsConfig) -> Result<Vec<stream::Config>> {
    serde_json::from_str(&render_template(STREAMS_JSON, names, cfg)).context("nats/streams.json is invalid")
}

/// `(stream, consumer config)` pairs of `nats/consumers.json`.
pub fn consumer_configs(names: &Names, cfg: &NatsConfig) -> Result<Vec<(String, consumer::pull::Config)>> {
    let defs: Vec<ConsumerDef> =
        serde_json::from_str(&render_template(CONSUMERS_JSON, names, cfg)).context("nats/consumers.json is invalid")?;
    Ok(defs.into_iter().map(|d| (d.stream, d.config)).collect())
}

/// Creates or updates every stream and consumer of `nats/streams.json` and
/// `nats/consumers.json`, the blob bucket and the counters, model registry
/// and idempotency buckets. Safe to run concurrently from every stage at
/// start-up.
pub async fn provision(js: &jetstream::Context, names: &Names, cfg: &NatsConfig) -> Result<()> {
    let js = &provisioning(js);
    for cfg in stream_configs(names, cfg)? {
        let name = cfg.name.clone();
        retry_transient(&format!("stream {name}"), || provision_stream(js, names, cfg.clone())).await?;
    }
    for (stream_name, consumer_cfg) in consumer_configs(names, cfg)? {
        let durable = consumer_cfg.durable_name.clone().unwrap_or_default();
        let what = format!("creating or updating consumer {durable} on {stream_name}");
        retry_transient(&what, || async {
            let stream = js.get_stream(&stream_name).await.with_context(|| format!("stream {stream_name}"))?;
            // Creating a durable consumer with an identical config is a no-op;
            // a changed config is applied as an update.
            stream.create_consumer(consumer_cfg.clone()).await.with_context(|| what.clone())?;
            Ok(())
        })
        .await?;
    }
    retry_transient("the blob store", || blob_store(js, names, cfg)).await?;
    retry_transient("the counters bucket", || Counters::open(js, names, cfg.replicas)).await?;
    retry_transient("the model registry bucket", || registry::bucket(js, names, cfg.replicas)).await?;
    retry_transient("the idempotency bucket", || idempotency_store(js, names, cfg.replicas)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn data_files_parse_for_any_prefix() {
        let names = Names::new("t-42");
        let cfg = NatsConfig { max_deliver: 7, ack_wait_secs: 9, max_pages_in_flight: 11, ..NatsConfig::default() };
        let streams = stream_configs(&names, &cfg).unwrap();
        assert_eq!(streams.len(), 5);
        assert_eq!(streams[0].name, "T_42_DOCS");
        assert_eq!(streams[0].subjects, vec!["t-42.docs.submitted", "t-42.docs.split.*"]);
        assert_eq!(streams[1].subjects, vec!["t-42.pages.rendered.*"]);
        assert_eq!(streams[1].max_messages_per_subject, 11);
        assert_eq!(streams[1].discard, stream::DiscardPolicy::New);
        assert!(streams[1].discard_new_per_subject);
        assert_eq!((streams[3].max_bytes, streams[3].discard), (1 << 30, stream::DiscardPolicy::Old));
        assert_eq!((streams[4].max_bytes, streams[4].discard), (256 << 20, stream::DiscardPolicy::Old));
        let unbounded = NatsConfig { max_event_bytes: 0, ..cfg.clone() };
        assert_eq!(stream_configs(&names, &unbounded).unwrap()[3].max_bytes, -1);
        assert_eq!(streams[3].max_messages_per_subject, 1);
        let consumers = consumer_configs(&names, &cfg).unwrap();
        assert_eq!(consumers.len(), 3);
        assert_eq!(
            consumers[2].1.filter_subjects,
            ["t-42.events.*.doc.*", "t-42.events.*.page.uploaded.*", "t-42.events.*.page.failed.*"]
        );
        assert!(consumers.iter().all(|(_, c)| c.max_deliver == 7 && c.ack_wait == Duration::from_secs(9)));
        assert_eq!(consumers[0].0, names.docs_stream());
    }
}
