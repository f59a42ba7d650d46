//! Traces across stages: one trace per document, a span per message per
//! stage, the W3C trace context (`traceparent`) carried in NATS message
//! headers, exported with OpenTelemetry OTLP/HTTP (protobuf) when
//! `PAGESTREAM_OTLP_ENDPOINT` is set — off otherwise (no exporter, no
//! headers, nothing to pay).
//!
//! The ingress opens the root span of a document's trace (`submit`); every
//! message published inside a span carries its context
//! ([`crate::progress::publish_durable`] injects it); the consumer loop
//! opens each message's span as a child of the context the message carries
//! ([`crate::consumer`]). A publisher from another language that sends a
//! `traceparent` header on its `DocumentSubmitted` gets the document's
//! spans in its own trace; so does an HTTP client sending `traceparent`
//! with its upload ([`continue_from_http`]).

use std::time::Duration;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The OTLP/HTTP endpoint (`http://collector:4318`; `/v1/traces` is added
/// unless the URL already ends with it). Unset or empty: no tracing export.
pub const OTLP_ENV: &str = "PAGESTREAM_OTLP_ENDPOINT";

/// The exporter's pipeline, flushed when [`shutdown`] is called (or at exit,
/// best effort).
static PROVIDER: std::sync::OnceLock<SdkTracerProvider> = std::sync::OnceLock::new();

/// `endpoint` as the traces URL.
pub fn traces_url(endpoint: &str) -> String {
    let e = endpoint.trim().trim_end_matches('/');
    if e.ends_with("/v1/traces") {
        e.to_string()
    } else {
        format!("{e}/v1/traces")
    }
}

/// Builds the OpenTelemetry layer for `service` (`pagestream-splitter`, …)
/// when [`OTLP_ENV`] is set. Needs a Tokio runtime (the batch exporter is a
/// task on it).
pub fn otlp_layer<S>(service: &str) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let endpoint = std::env::var(OTLP_ENV).ok().filter(|e| !e.trim().is_empty())?;
    if tokio::runtime::Handle::try_current().is_err() {
        eprintln!("{OTLP_ENV} is set but tracing starts outside a Tokio runtime: no traces exported");
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(opentelemetry_http::hyper::HyperClient::with_default_connector(Duration::from_secs(10), None))
        .with_endpoint(traces_url(&endpoint))
        .with_timeout(Duration::from_secs(10))
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{OTLP_ENV}={endpoint}: no traces exported: {e}");
            return None;
        }
    };
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service.to_string()).build())
        .build();
    let tracer = provider.tracer("pagestream");
    let _ = PROVIDER.set(provider);
    Some(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// Exports the spans still buffered (call before the process exits).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        if let Err(e) = p.force_flush() {
            tracing::debug!(error = %e, "flushing traces failed");
        }
    }
}

/// Whether spans are exported (the trace context is worth carrying).
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        // Only `get` is used by the W3C propagator.
        Vec::new()
    }
}

/// Adds the current span's context (`traceparent`, `tracestate`) to
/// `headers`; nothing when tracing is off or no span is current.
pub fn inject(headers: &mut HeaderMap) {
    if !enabled() {
        return;
    }
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// Makes `span` a child of the context `headers` carry (a message's
/// publisher), when they carry one.
pub fn continue_from(span: &tracing::Span, headers: Option<&HeaderMap>) {
    let Some(headers) = headers.filter(|_| enabled()) else { return };
    if headers.get("traceparent").is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(cx);
}

struct HttpExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the W3C trace context of an HTTP request
/// (`traceparent`, `tracestate`), when it carries one: a client that traces
/// its own work gets the document's spans in its trace (and its sampling
/// decision is honoured). Nothing when tracing is off.
pub fn continue_from_http(span: &tracing::Span, headers: &http::HeaderMap) {
    if !enabled() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HttpExtractor(headers));
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(traces_url(" http://c:4318/v1/traces "), "http://c:4318/v1/traces");
    }

    #[test]
    fn headers_carry_a_w3c_context_both_ways() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        let mut headers = HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut headers));
        assert_eq!(
            headers.get("traceparent").map(|v| v.as_str()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let back = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
        assert_eq!(back.span().span_context().trace_id(), cx.span().span_context().trace_id());
        assert!(back.span().span_context().is_remote());
    }
}
