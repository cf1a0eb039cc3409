//! Istio's standard request metrics, for the requests the proxy sees at L7.
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

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
        self.series(labels, &SeriesKey::of(outcome))
            .observe(outcome);
    }

    /// The handles of one series: looking them up hashes every label value, so a
    /// connection keeps the ones its requests use ([`SeriesCache`]).
    fn series(&self, labels: &ConnectionLabels, key: &SeriesKey) -> RequestSeries {
        let response_code = key.response_code.to_string();
        let grpc_status = key.grpc_status.map_or_else(String::new, |status| {
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
                "request_protocol" => key.protocol,
                "response_flags" => key.response_flags.as_str(),
                _ => value,
            })
            .chain([response_code.as_str(), grpc_status.as_str()])
            .collect();
        RequestSeries {
            requests: self.requests.with_label_values(&values),
            duration: self.duration.with_label_values(&values),
            request_bytes: self.request_bytes.with_label_values(&values),
            response_bytes: self.response_bytes.with_label_values(&values),
        }
    }
}

/// What varies from one request of a connection to the next in its series' labels.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SeriesKey {
    protocol: &'static str,
    response_flags: String,
    response_code: u16,
    grpc_status: Option<u32>,
}

impl SeriesKey {
    fn matches(&self, outcome: &RequestOutcome) -> bool {
        self.protocol == outcome.protocol
            && self.response_flags == outcome.response_flags
            && self.response_code == outcome.response_code
            && self.grpc_status == outcome.grpc_status
    }

    fn of(outcome: &RequestOutcome) -> Self {
        Self {
            protocol: outcome.protocol,
            response_flags: outcome.response_flags.to_owned(),
            response_code: outcome.response_code,
            grpc_status: outcome.grpc_status,
        }
    }
}

/// The request metrics of one series, found once.
struct RequestSeries {
    requests: IntCounter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestSeries {
    fn observe(&self, outcome: &RequestOutcome) {
        self.requests.inc();
        self.duration
            .observe(outcome.duration.as_nanos() as f64 / 1e6);
        // Histograms take f64; request sizes are far below 2^53, where it stays exact.
        self.request_bytes.observe(outcome.request_bytes as f64);
        self.response_bytes.observe(outcome.response_bytes as f64);
    }
}

/// The series one connection's requests were recorded in (most use one or two: a 200 and
/// the odd error), so the next request with the same outcome skips the label lookups.
#[derive(Default)]
pub struct SeriesCache {
    series: Mutex<Vec<(SeriesKey, RequestSeries)>>,
}

/// Series a connection keeps at most: a client that sees every status code still costs
/// a bounded cache (the rest are looked up each time).
const CACHED_SERIES: usize = 8;

impl SeriesCache {
    /// [`HttpMetrics::record`], through the cache.
    pub fn record(
        &self,
        metrics: &HttpMetrics,
        labels: &ConnectionLabels,
        outcome: &RequestOutcome,
    ) {
        // Per connection, so hardly ever contended.
        let mut cached = self.series.lock();
        if let Some((_, series)) = cached.iter().find(|(key, _)| key.matches(outcome)) {
            series.observe(outcome);
            return;
        }
        let key = SeriesKey::of(outcome);
        let series = metrics.series(labels, &key);
        series.observe(outcome);
        if cached.len() < CACHED_SERIES {
            cached.push((key, series));
        }
    }
}
