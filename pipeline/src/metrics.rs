//! Metric names, defined once. Every stage records into one [`Metrics`]
//! registry, served in Prometheus text format by [`crate::admin`].

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub stage: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub status: u16,
}

/// A stage's durable consumer (the inferencer has one per served model).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub stage: String,
    pub consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
    pub backend: String,
    /// The device asked for in the config (`cpu`, `cuda`, `auto`)…
    pub requested: String,
    /// …and the one in use (`auto` falls back to `cpu`).
    pub device: String,
}

/// All of pagestream's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// `pagestream_messages_total{stage,outcome}`: ack, nak, dead_letter, …
    pub messages: Family<OutcomeLabels, Counter>,
    /// `pagestream_pages_total{stage}`: pages rendered / inferred / uploaded.
    pub pages: Family<StageLabel, Counter>,
    /// `pagestream_page_failures_total{stage}`.
    pub page_failures: Family<StageLabel, Counter>,
    /// `pagestream_handle_seconds{stage}`: time to handle one message.
    pub handle_seconds: Family<StageLabel, Histogram>,
    /// `pagestream_documents_total{stage,outcome}`: submitted, completed, failed, …
    pub documents: Family<OutcomeLabels, Counter>,
    /// `pagestream_upload_bytes_total`: PDF bytes accepted by the ingress.
    pub upload_bytes: Counter,
    /// `pagestream_http_requests_total{route,status}`.
    pub http_requests: Family<HttpLabels, Counter>,
    /// `pagestream_ready`: 1 when every component of this process is ready.
    pub ready: Gauge,
    /// `pagestream_model_info{model,backend,requested,device}`: 1 per loaded model.
    pub model_info: Family<ModelLabels, Gauge>,
    /// `pagestream_model_pages_total{model}`: pages this inferencer inferred, per model.
    pub model_pages: Family<ModelLabel, Counter>,
    /// `pagestream_model_pages_pending{model}`: pages of the model waiting in
    /// its queue (not yet delivered to any replica).
    pub model_pending: Family<ModelLabel, Gauge>,
    /// `pagestream_model_pages_in_flight{model}`: pages delivered to a
    /// replica of the model and not yet acknowledged.
    pub model_in_flight: Family<ModelLabel, Gauge>,
    pub queue_pending: Family<QueueLabels, Gauge>,
    pub queue_ack_pending: Family<QueueLabels, Gauge>,
    pub queue_redelivered: Family<QueueLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pagestream");
        let messages = Family::<OutcomeLabels, Counter>::default();
        let pages = Family::<StageLabel, Counter>::default();
        let page_failures = Family::<StageLabel, Counter>::default();
        let handle_seconds = Family::<StageLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let documents = Family::<OutcomeLabels, Counter>::default();
        let upload_bytes = Counter::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        let ready = Gauge::default();
        let model_info = Family::<ModelLabels, Gauge>::default();
        let model_pages = Family::<ModelLabel, Counter>::default();
        let model_pending = Family::<ModelLabel, Gauge>::default();
        let model_in_flight = Family::<ModelLabel, Gauge>::default();
        let queue_pending = Family::<QueueLabels, Gauge>::default();
        let queue_ack_pending = Family::<QueueLabels, Gauge>::default();
        let queue_redelivered = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_pending",
            "Messages waiting for a stage's consumer, not yet delivered (its queue lag: scale the stage on it)",
            queue_pending.clone(),
        );
        registry.register(
            "queue_ack_pending",
            "Messages delivered to a stage's workers and not yet acknowledged",
            queue_ack_pending.clone(),
        );
        registry.register(
            "queue_redelivered",
            "Messages of a stage's consumer delivered more than once and not yet acknowledged",
            queue_redelivered.clone(),
        );
        registry.register("messages", "Messages handled, by stage and outcome", messages.clone());
        registry.register("pages", "Pages processed, by stage", pages.clone());
        registry.register("page_failures", "Pages that failed permanently, by stage", page_failures.clone());
        registry.register("handle_seconds", "Time to handle one message, by stage", handle_seconds.clone());
        registry.register("documents", "Documents, by stage and outcome", documents.clone());
        registry.register("upload_bytes", "PDF bytes accepted by the ingress", upload_bytes.clone());
        registry.register("http_requests", "HTTP requests, by route and status", http_requests.clone());
        registry.register("ready", "1 when this process is ready", ready.clone());
        registry.register(
            "model_info",
            "Models loaded by this inferencer: backend, requested and actual device",
            model_info.clone(),
        );
        registry.register("model_pages", "Pages inferred by this inferencer, by model", model_pages.clone());
        registry.register(
            "model_pages_pending",
            "Pages waiting in a model's queue, not yet delivered (scale that model's fleet on it)",
            model_pending.clone(),
        );
        registry.register(
            "model_pages_in_flight",
            "Pages of a model delivered to a replica and not yet acknowledged",
            model_in_flight.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            messages,
            pages,
            page_failures,
            handle_seconds,
            documents,
            upload_bytes,
            http_requests,
            ready,
            model_info,
            model_pages,
            model_pending,
            model_in_flight,
            queue_pending,
            queue_ack_pending,
            queue_redelivered,
        }
    }

    pub fn message(&self, stage: &str, outcome: &str) {
        self.messages.get_or_create(&OutcomeLabels { stage: stage.into(), outcome: outcome.into() }).inc();
    }

    pub fn page(&self, stage: &str) {
        self.pages.get_or_create(&StageLabel { stage: stage.into() }).inc();
    }

    pub fn page_failure(&self, stage: &str) {
        self.page_failures.get_or_create(&StageLabel { stage: stage.into() }).inc();
    }

    pub fn document(&self, stage: &str, outcome: &str) {
        self.documents.get_or_create(&OutcomeLabels { stage: stage.into(), outcome: outcome.into() }).inc();
    }

    pub fn observe_handling(&self, stage: &str, took: Duration) {
        self.handle_seconds.get_or_create(&StageLabel { stage: stage.into() }).observe(took.as_secs_f64());
    }

    pub fn http(&self, route: &str, status: u16) {
        self.http_requests.get_or_create(&HttpLabels { route: route.into(), status }).inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics registry lock");
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
        out
    }
}
