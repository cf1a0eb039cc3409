//! Distributed tracing: a span per HTTP request at each node proxy it crosses, the trace
//! context propagated in the request's headers, and the spans exported over OTLP.
//!
//! The source proxy's span is a CLIENT span, the destination proxy's a SERVER span; each
//! is a child of the span the request arrived with (the app's, then the source proxy's),
//! and each proxy hands its own span on as the parent, so the app behind the destination
//! sees the same trace id with the destination proxy's span as parent. A request without
//! a trace context starts a trace, sampled at `--trace-sampling` percent; a caller's
//! decision, when it made one, is kept (so a sampled request is traced end to end).
//!
//! Propagation works without an exporter: apps still get their trace ids. With
//! `--otlp-endpoint`, sampled spans are batched and posted to the collector's
//! `/v1/traces` as protobuf (OTLP/HTTP).
mod export;
pub mod propagation;

use std::time::Duration;

use http::{HeaderMap, Uri};
pub use opentelemetry::trace::SpanKind;
use opentelemetry::{
    Context, KeyValue,
    trace::{
        Span as _, SpanBuilder, SpanId, Status, TraceContextExt, TraceId, Tracer as _,
        TracerProvider as _,
    },
};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{
        Sampler, SamplingDecision, SdkTracer, SdkTracerProvider, ShouldSample, Span as SdkSpan,
    },
};
use propagation::Formats;

use crate::access_log::Entry;

/// Istio's default: one request in a hundred starts a sampled trace.
pub const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;
/// How long shutting down waits for the last batch to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// What `mesh-node run` says about tracing.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// The collector's base URL (`http://host:4318`); `None`: propagate only.
    pub otlp_endpoint: Option<Uri>,
    /// Share of new traces that are sampled, 0–100.
    pub sampling_percent: f64,
    /// This node's name, the spans' `k8s.node.name`.
    pub node: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Starts request spans; cheap to share.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// Decides new traces, and B3 requests whose caller deferred the decision.
    new_traces: Sampler,
}

impl Tracing {
    /// `runtime` carries the exporter's posts (see [`export`]).
    pub fn new(
        config: &TraceConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, TracingError> {
        let ratio = config.sampling_percent / 100.0;
        let resource = Resource::builder_empty()
            .with_service_name("nodemesh")
            .with_attribute(KeyValue::new("k8s.node.name", config.node.clone()))
            .build();
        let mut builder = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))));
        if let Some(endpoint) = &config.otlp_endpoint {
            let traces = traces_url(endpoint);
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(traces.clone())
                .with_timeout(export::EXPORT_TIMEOUT)
                .with_http_client(export::RuntimeClient::new(runtime))
                .build()
                .map_err(|source| TracingError::Exporter {
                    endpoint: traces.clone(),
                    source,
                })?;
            tracing::info!(endpoint = %traces, "exporting spans over OTLP/HTTP");
            builder = builder.with_batch_exporter(exporter);
        }
        let provider = builder.build();
        Ok(Self {
            tracer: provider.tracer("nodemesh"),
            provider,
            new_traces: Sampler::TraceIdRatioBased(ratio),
        })
    }

    /// Starts the proxy's span for a request with `headers`: a child of the caller's span
    /// when the request carries one, else the root of a new trace.
    pub fn start(&self, kind: SpanKind, name: String, headers: &HeaderMap) -> RequestSpan {
        let extracted = propagation::extract(headers);
        let parent = match &extracted.parent {
            Some(parent) => {
                let sampled = parent
                    .sampled
                    .unwrap_or_else(|| self.samples_new_trace(parent.trace_id));
                Context::new().with_remote_span_context(parent.span_context(sampled))
            }
            None => Context::new(),
        };
        let span = self.tracer.build_with_context(
            SpanBuilder::from_name(name).with_kind(kind.clone()),
            &parent,
        );
        RequestSpan {
            span,
            kind,
            parent: extracted.parent.map(|p| p.span_id),
            came: extracted.formats,
        }
    }

    fn samples_new_trace(&self, trace_id: TraceId) -> bool {
        let result = self
            .new_traces
            .should_sample(None, trace_id, "", &SpanKind::Server, &[], &[]);
        result.decision == SamplingDecision::RecordAndSample
    }

    /// Exports what is still batched. Blocks: call it off the runtime's workers.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            tracing::warn!(%error, "flushing the last spans");
        }
    }
}

/// `<base>/v1/traces`, unless the URL already names a path (OTLP's rule for a
/// signal-specific endpoint).
fn traces_url(endpoint: &Uri) -> String {
    let base = endpoint.to_string();
    if endpoint.path().trim_end_matches('/').is_empty() {
        format!("{}/v1/traces", base.trim_end_matches('/'))
    } else {
        base
    }
}

/// One request's span at this proxy, ended when the response has.
pub struct RequestSpan {
    span: SdkSpan,
    kind: SpanKind,
    parent: Option<SpanId>,
    came: Formats,
}

impl RequestSpan {
    /// The trace id as logs write it (32 hex digits), if the span has one.
    pub fn trace_id(&self) -> Option<String> {
        let context = self.span.span_context();
        context.is_valid().then(|| context.trace_id().to_string())
    }

    /// Whether the span is sampled here, so its end is worth describing.
    pub fn is_recording(&self) -> bool {
        self.span.is_recording()
    }

    /// Makes this span the parent of whatever the request leads to next.
    pub fn inject(&self, headers: &mut HeaderMap) {
        propagation::inject(headers, self.span.span_context(), self.parent, self.came);
    }

    /// Ends the span with what the access log says about the request.
    pub fn finish(mut self, entry: &Entry) {
        if !self.is_recording() {
            return;
        }
        let text = |key: &'static str, value: &Option<String>| {
            value.as_ref().map(|v| KeyValue::new(key, v.clone()))
        };
        let peers = &entry.peers;
        let attributes = [
            text("http.method", &entry.method),
            text("url.path", &entry.path),
            entry
                .response_code
                .map(|code| KeyValue::new("http.status_code", i64::from(code))),
            Some(KeyValue::new("http.protocol", entry.protocol)),
            Some(KeyValue::new(
                "response_flags",
                entry.response_flags.clone(),
            )),
            entry
                .upstream
                .map(|addr| KeyValue::new("upstream.address", addr.to_string())),
            text("route", &entry.route),
            text("source.workload", &peers.source_workload),
            text("source.namespace", &peers.source_namespace),
            text("source.principal", &peers.source_principal),
            text("destination.workload", &peers.destination_workload),
            text("destination.namespace", &peers.destination_namespace),
            text("destination.principal", &peers.destination_principal),
            text("destination.service", &peers.service),
            text("request_id", &entry.request_id),
            text("policy", &entry.policy),
        ];
        self.span.set_attributes(attributes.into_iter().flatten());
        // OpenTelemetry's HTTP conventions: a 4xx is the client's failure, not the server's.
        let failed_from = if self.kind == SpanKind::Client {
            400
        } else {
            500
        };
        if entry.response_code.is_some_and(|code| code >= failed_from) {
            self.span.set_status(Status::error(format!(
                "HTTP {} ({})",
                entry.response_code.unwrap_or_default(),
                entry.response_flags
            )));
        }
        self.span.end();
    }
}

/// The span's name: `<METHOD> <service host>`, as Envoy names its spans.
pub fn span_name(method: &http::Method, target: &str) -> String {
    format!("{method} {target}")
}

#[cfg(test)]
mod tests;
