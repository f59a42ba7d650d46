//! Metric names, defined once ([`CATALOG`]), recorded through the
//! [`metrics`] facade and exposed in Prometheus text format by
//! [`crate::admin`] (`metrics-exporter-prometheus`).
//!
//! The recorder is process-wide: the first [`Metrics::new`] installs a
//! Prometheus recorder as the global one. An application that embeds the
//! stages and installed its own recorder first (another exporter: StatsD,
//! OpenTelemetry, …) keeps it and receives every pagestream metric; the
//! `/metrics` endpoint of the stages then says so instead of listing them.
//! `pagestream run` (every stage in one process) reports each stage's
//! series under its own `stage` label, as separate processes would.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric: its full name, kind, labels and help text.
#[derive(Debug, Clone, Copy)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn def(name: &'static str, kind: Kind, labels: &'static [&'static str], help: &'static str) -> Def {
    Def { name, kind, labels, help }
}

use Kind::{Counter, Gauge, Histogram};

/// Every metric pagestream records: docs/operations.md's metrics table and the
/// Grafana dashboard are checked against this list (`scripts/check-deploy`).
pub const CATALOG: &[Def] = &[
    def("pagestream_messages_total", Counter, &["stage", "outcome"], "Messages handled, by stage and outcome"),
    def("pagestream_pages_total", Counter, &["stage"], "Pages processed, by stage"),
    def("pagestream_page_failures_total", Counter, &["stage"], "Pages that failed permanently, by stage"),
    def("pagestream_handle_seconds", Histogram, &["stage"], "Time to handle one message, by stage"),
    def(
        "pagestream_queue_wait_seconds",
        Histogram,
        &["stage"],
        "Time a message waited in its stream before this stage received it (first delivery)",
    ),
    def("pagestream_pages_in_flight", Gauge, &["stage"], "Messages this process is handling now, by stage"),
    def("pagestream_documents_total", Counter, &["stage", "outcome"], "Documents, by stage and outcome"),
    def("pagestream_upload_bytes_total", Counter, &[], "PDF bytes accepted by the ingress"),
    def("pagestream_result_bytes_total", Counter, &["kind"], "Result bytes written by the uploader (image, json, manifest)"),
    def("pagestream_http_requests_total", Counter, &["route", "status"], "HTTP requests, by route and status"),
    def(
        "pagestream_http_request_seconds",
        Histogram,
        &["route"],
        "Time from a request to its response head, by route (a live event stream: until it opens)",
    ),
    def("pagestream_sse_clients", Gauge, &[], "Live progress streams (SSE) open now"),
    def("pagestream_ready", Gauge, &[], "1 when every component of this process is ready"),
    def(
        "pagestream_ocr_models_loaded",
        Gauge,
        &["model"],
        "1 once this inferencer holds the OCR models in memory (loaded by the first page to read), 0 before",
    ),
    def(
        "pagestream_model_info",
        Gauge,
        &["model", "backend", "requested", "device"],
        "Models loaded by this inferencer: backend, requested and actual device",
    ),
    def("pagestream_model_pages_total", Counter, &["model"], "Pages inferred by this inferencer, by model"),
    def(
        "pagestream_model_run_seconds",
        Histogram,
        &["model", "batch"],
        "Time of one model run (preprocess, run, decode), by model and batch size (the warm-up run at start-up included)",
    ),
    def(
        "pagestream_model_pages_pending",
        Gauge,
        &["model"],
        "Pages waiting in a model's queue, not yet delivered (scale that model's fleet on it)",
    ),
    def(
        "pagestream_model_pages_in_flight",
        Gauge,
        &["model"],
        "Pages of a model delivered to a replica and not yet acknowledged",
    ),
    def(
        "pagestream_queue_pending",
        Gauge,
        &["stage", "consumer"],
        "Messages waiting for a stage's consumer, not yet delivered (its queue lag: scale the stage on it)",
    ),
    def(
        "pagestream_queue_ack_pending",
        Gauge,
        &["stage", "consumer"],
        "Messages delivered to a stage's workers and not yet acknowledged",
    ),
    def(
        "pagestream_queue_redelivered",
        Gauge,
        &["stage", "consumer"],
        "Messages of a stage's consumer delivered more than once and not yet acknowledged",
    ),
    def(
        "pagestream_webhook_deliveries_total",
        Counter,
        &["kind", "outcome"],
        "Webhooks the notifier finished, by kind (document, page) and outcome (delivered, failed: given up or refused)",
    ),
    def(
        "pagestream_webhook_delivery_seconds",
        Histogram,
        &["kind", "outcome"],
        "Time from a webhook's first attempt to its end, retries included, by kind and outcome",
    ),
    def(
        "pagestream_webhook_attempts_total",
        Counter,
        &["result"],
        "Webhook delivery attempts, by result: delivered, or the error code (callback_status, callback_unreachable, callback_timeout, callback_rejected, callback_url_refused)",
    ),
    def(
        "pagestream_webhook_retries_scheduled_total",
        Counter,
        &["reason"],
        "Webhook deliveries put off to a later time instead of held, by reason: failed (an attempt failed), circuit_open (the endpoint's circuit is open: not attempted), endpoint_busy (the endpoint's or tenant's concurrency is full), pages_pending (a terminal event waits for its page events)",
    ),
    def(
        "pagestream_webhook_circuit_opened_total",
        Counter,
        &[],
        "Times an endpoint's circuit opened (consecutive failed attempts): its deliveries are scheduled for after the cool-down instead of attempted",
    ),
    def(
        "pagestream_webhook_circuits_open",
        Gauge,
        &[],
        "Endpoints whose circuit is open or half-open (one probe) in this notifier process",
    ),
    def(
        "pagestream_webhook_events_lost_total",
        Counter,
        &[],
        "Page events with an outcome that the notifier never read (evicted from the events stream first): recorded as lost and failed, with a dead letter",
    ),
    def(
        "pagestream_webhook_events_recovered_total",
        Counter,
        &[],
        "Terminal document events evicted from the events stream before the notifier read them, whose webhook the sweep scheduled from the durable record",
    ),
];

/// Buckets of every `_seconds` histogram: 1 ms to 32 s, doubling (a page
/// takes milliseconds to render and up to seconds to infer on a CPU).
pub fn seconds_buckets() -> Vec<f64> {
    (0..16).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

/// The process's Prometheus handle; `None` when another recorder was
/// installed first.
fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds_buckets())
                .expect("non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::info!(
                    "a metrics recorder is already installed: pagestream's metrics go to it, /metrics is empty"
                );
                return None;
            }
            for d in CATALOG {
                match d.kind {
                    Kind::Counter => metrics::describe_counter!(d.name, d.help),
                    Kind::Gauge => metrics::describe_gauge!(d.name, d.help),
                    Kind::Histogram => metrics::describe_histogram!(d.name, d.help),
                }
            }
            // Histogram samples wait in a buffer until upkeep folds them into
            // buckets: without a scrape, that buffer would only grow.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .expect("spawning the metrics upkeep thread");
            Some(handle)
        })
        .as_ref()
}

/// The metrics of a process (see the module documentation): cheap to create,
/// every instance records into the one process-wide recorder.
#[derive(Debug)]
pub struct Metrics {
    handle: Option<&'static PrometheusHandle>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics { handle: handle() }
    }

    /// Prometheus text exposition of every series recorded so far.
    pub fn encode(&self) -> String {
        match self.handle {
            Some(h) => h.render(),
            None => "# pagestream's metrics go to the recorder the embedding application installed\n".into(),
        }
    }

    pub fn message(&self, stage: &'static str, outcome: &'static str) {
        counter!("pagestream_messages_total", "stage" => stage, "outcome" => outcome).increment(1);
    }

    pub fn page(&self, stage: &'static str) {
        counter!("pagestream_pages_total", "stage" => stage).increment(1);
    }

    pub fn page_failure(&self, stage: &'static str) {
        counter!("pagestream_page_failures_total", "stage" => stage).increment(1);
    }

    pub fn document(&self, stage: &'static str, outcome: &'static str) {
        counter!("pagestream_documents_total", "stage" => stage, "outcome" => outcome).increment(1);
    }

    pub fn observe_handling(&self, stage: &'static str, took: Duration) {
        histogram!("pagestream_handle_seconds", "stage" => stage).record(took.as_secs_f64());
    }

    pub fn observe_queue_wait(&self, stage: &'static str, waited: Duration) {
        histogram!("pagestream_queue_wait_seconds", "stage" => stage).record(waited.as_secs_f64());
    }

    /// Counts a message in `pagestream_pages_in_flight` until the guard drops.
    pub fn in_flight(&self, stage: &'static str) -> Held {
        Held::new(gauge!("pagestream_pages_in_flight", "stage" => stage))
    }

    pub fn upload_bytes(&self, bytes: u64) {
        counter!("pagestream_upload_bytes_total").increment(bytes);
    }

    pub fn result_bytes(&self, kind: &'static str, bytes: usize) {
        counter!("pagestream_result_bytes_total", "kind" => kind).increment(bytes as u64);
    }

    pub fn http(&self, route: &'static str, status: u16, took: Duration) {
        counter!("pagestream_http_requests_total", "route" => route, "status" => status.to_string()).increment(1);
        histogram!("pagestream_http_request_seconds", "route" => route).record(took.as_secs_f64());
    }

    /// Counts a live progress stream in `pagestream_sse_clients` until the guard drops.
    pub fn sse_client(&self) -> Held {
        Held::new(gauge!("pagestream_sse_clients"))
    }

    pub fn set_ready(&self, ready: bool) {
        gauge!("pagestream_ready").set(if ready { 1.0 } else { 0.0 });
    }

    /// A model this inferencer loaded: `requested` is the configured
    /// device (`cpu`, `cuda`, `auto`), `device` the one in use.
    pub fn model_loaded(&self, model: &str, backend: &'static str, requested: &'static str, device: &'static str) {
        gauge!("pagestream_model_info", "model" => model.to_string(), "backend" => backend, "requested" => requested, "device" => device)
            .set(1.0);
    }

    /// Whether the inferencer holds the OCR models `model` in memory
    /// (checked at start, loaded by the first page to read: 0 until then).
    pub fn ocr_models_loaded(&self, model: &str, loaded: bool) {
        gauge!("pagestream_ocr_models_loaded", "model" => model.to_string()).set(if loaded { 1.0 } else { 0.0 });
    }

    pub fn model_page(&self, model: &str) {
        counter!("pagestream_model_pages_total", "model" => model.to_string()).increment(1);
    }

    /// A model's queue lag, shared by every replica serving it.
    pub fn model_queue(&self, model: &str, pending: u64, in_flight: usize) {
        gauge!("pagestream_model_pages_pending", "model" => model.to_string()).set(pending as f64);
        gauge!("pagestream_model_pages_in_flight", "model" => model.to_string()).set(in_flight as f64);
    }

    /// A stage consumer's queue lag, read from its consumer info.
    pub fn queue(&self, stage: &'static str, consumer: &str, pending: u64, ack_pending: usize, redelivered: usize) {
        let labels = [("stage", stage.to_string()), ("consumer", consumer.to_string())];
        gauge!("pagestream_queue_pending", &labels).set(pending as f64);
        gauge!("pagestream_queue_ack_pending", &labels).set(ack_pending as f64);
        gauge!("pagestream_queue_redelivered", &labels).set(redelivered as f64);
    }
}

/// A gauge raised by one while this guard lives (whichever way its holder
/// ends: return, error or panic).
#[must_use = "the gauge goes down again when the guard is dropped"]
pub struct Held(metrics::Gauge);

impl Held {
    fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Held(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Held")
    }
}

/// One model run of `batch` pages (recorded by the inferencer's engine,
/// which has no [`Metrics`] at hand: the recorder is process-wide).
pub fn model_run(model: &str, batch: usize, took: Duration) {
    histogram!("pagestream_model_run_seconds", "model" => model.to_string(), "batch" => batch.to_string())
        .record(took.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_names_are_unique_and_conventional() {
        let mut names: Vec<&str> = CATALOG.iter().map(|d| d.name).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "a metric is listed twice");
        for d in CATALOG {
            assert!(d.name.starts_with("pagestream_"), "{}", d.name);
            assert_eq!(
                d.kind == Kind::Counter,
                d.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                d.name
            );
            if d.kind == Kind::Histogram {
                assert!(d.name.ends_with("_seconds"), "{}: histograms are times in seconds (their buckets)", d.name);
            }
        }
    }

    #[test]
    fn the_exposition_has_help_types_labels_and_buckets() {
        let m = Metrics::new();
        m.page("splitter");
        m.page("splitter");
        m.http("documents.create", 202, Duration::from_millis(30));
        m.queue("uploader", "uploader", 4, 2, 1);
        m.set_ready(true);
        {
            let _a = m.sse_client();
            let _b = m.sse_client();
            assert!(m.encode().contains("pagestream_sse_clients 2"), "{}", m.encode());
        }
        assert!(m.encode().contains("pagestream_sse_clients 0"), "a dropped guard lowers the gauge");
        model_run("layout", 4, Duration::from_millis(300));
        let text = m.encode();
        for want in [
            "# HELP pagestream_pages_total Pages processed, by stage",
            "# TYPE pagestream_pages_total counter",
            "pagestream_pages_total{stage=\"splitter\"} 2",
            "pagestream_http_requests_total{route=\"documents.create\",status=\"202\"} 1",
            "# TYPE pagestream_http_request_seconds histogram",
            "pagestream_http_request_seconds_bucket{route=\"documents.create\",le=\"0.032\"} 1",
            "pagestream_http_request_seconds_bucket{route=\"documents.create\",le=\"0.016\"} 0",
            "pagestream_queue_pending{stage=\"uploader\",consumer=\"uploader\"} 4",
            "pagestream_queue_redelivered{stage=\"uploader\",consumer=\"uploader\"} 1",
            "pagestream_ready 1",
            "pagestream_model_run_seconds_count{model=\"layout\",batch=\"4\"} 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
