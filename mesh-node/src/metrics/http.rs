//! Istio's standard request metrics, for the requests the proxy sees at L7.
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::{ConnectionLabels, TCP_LABELS};

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets for `istio_request_bytes` and `istio_response_bytes`.
const SIZE_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
    1000000000.0,
];

/// The labels Istio adds to the TCP set for requests.
const RESPONSE_LABELS: &[&str] = &["response_code", "grpc_response_status"];

/// The highest gRPC status code defined (`UNAUTHENTICATED`).
const GRPC_MAX_STATUS: u32 = 16;
/// `UNKNOWN`, which gRPC clients read any undefined code as.
const GRPC_UNKNOWN: u32 = 2;

/// How one request ended, as the proxy saw it.
#[derive(Clone, Debug)]
pub struct RequestOutcome<'a> {
    /// `"http"` or `"grpc"`.
    pub protocol: &'static str,
    /// `0` when no response was sent (Istio writes `"0"`).
    pub response_code: u16,
    /// `"-"`, or Envoy's response flags such as `"UO"`, `"NR"`, `"UF"`, `"URX"`, `"UT"`,
    /// `"DI"`, `"FI"`, `"UH"`: a fixed set, which keeps the label bounded.
    pub response_flags: &'a str,
    /// The `grpc-status` of a gRPC response; the label is empty when `None`, as Istio
    /// leaves it for plain HTTP.
    pub grpc_status: Option<u32>,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Istio's request metrics: `istio_requests_total` and the duration and size histograms.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
}

impl HttpMetrics {
    pub(super) fn register(registry: &Registry) -> prometheus::Result<Self> {
        let labels: Vec<&str> = TCP_LABELS.iter().chain(RESPONSE_LABELS).copied().collect();
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let histogram = HistogramVec::new(opts, &labels)?;
            registry.register(Box::new(histogram.clone()))?;
            Ok::<_, prometheus::Error>(histogram)
        };
        let requests = IntCounterVec::new(
            Opts::new("istio_requests_total", "Requests served, by response"),
            &labels,
        )?;
        registry.register(Box::new(requests.clone()))?;
        Ok(Self {
            requests,
            duration: histogram(
                "istio_request_duration_milliseconds",
                "Request durations, in milliseconds",
                DURATION_BUCKETS_MS,
            )?,
            request_bytes: histogram(
                "istio_request_bytes",
                "Request body sizes, in bytes",
                SIZE_BUCKETS,
            )?,
            response_bytes: histogram(
                "istio_response_bytes",
                "Response body sizes, in bytes",
                SIZE_BUCKETS,
            )?,
        })
    }

    /// See [`super::Metrics::forget_departed`].
    pub(super) fn forget_departed(
        &self,
        sweep: &super::departed::DepartedSeries,
        present: &dyn Fn(&str, &str) -> bool,
        grace: std::time::Duration,
    ) {
        let labels: Vec<&str> = TCP_LABELS.iter().chain(RESPONSE_LABELS).copied().collect();
        sweep.sweep(&self.requests, &labels, present, grace);
        for histogram in [&self.duration, &self.request_bytes, &self.response_bytes] {
            sweep.sweep(histogram, &labels, present, grace);
        }
    }

    /// Records one finished request on the connection labelled `labels`; the outcome's
    /// protocol and flags replace the connection's `tcp` and `-`.
    pub fn record(&self, labels: &ConnectionLabels, outcome: &RequestOutcome) {
        let response_code = outcome.response_code.to_string();
        let grpc_status = outcome.grpc_status.map_or_else(String::new, |status| {
            // A peer could send any number: undefined codes collapse into UNKNOWN, as
            // gRPC clients read them, so the label stays a bounded set.
            let status = if status > GRPC_MAX_STATUS {
                GRPC_UNKNOWN
            } else {
                status
            };
            status.to_string()
        });
        let values: Vec<&str> = TCP_LABELS
            .iter()
            .zip(labels.as_strs())
            .map(|(name, value)| match *name {
                "request_protocol" => outcome.protocol,
                "response_flags" => outcome.response_flags,
                _ => value,
            })
            .chain([response_code.as_str(), grpc_status.as_str()])
            .collect();
        self.requests.with_label_values(&values).inc();
        self.duration
            .with_label_values(&values)
            .observe(outcome.duration.as_nanos() as f64 / 1e6);
        // Histograms take f64; request sizes are far below 2^53, where it stays exact.
        self.request_bytes
            .with_label_values(&values)
            .observe(outcome.request_bytes as f64);
        self.response_bytes
            .with_label_values(&values)
            .observe(outcome.response_bytes as f64);
    }
}
