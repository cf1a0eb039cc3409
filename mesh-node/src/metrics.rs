//! Prometheus metrics: Istio's standard TCP and request metrics, Nodemesh's node metrics
//! and the agent process's own.
//!
//! Istio's names and labels are kept exactly so Kiali and the stock Grafana dashboards
//! work unchanged. Node metrics carry the `nodemesh_` prefix; the process's CPU, memory,
//! threads and descriptors use the standard `process_*` names ([`process`]).
//!
//! # Label cardinality
//!
//! Every label value comes from the config or from a fixed set in this crate, never from
//! traffic (no addresses, ports, paths, hosts or header values), so the number of series
//! is bounded by the size of the mesh, not by what passes through it:
//!
//! * `istio_*`: workload, namespace, app, version, principal and service labels come from
//!   the state (the Pods and Services of the config); `unknown` stands for anything the
//!   state does not know. Requests add `response_code` (HTTP status codes), `grpc_response_status`
//!   (0–16), `response_flags` and `request_protocol` (small fixed sets). At most: workload
//!   pairs seen × services × codes.
//! * `nodemesh_*`: `direction` (`inbound`, `outbound`, `hbone`), `reason` (the proxy's error
//!   kinds), `event` (the eBPF counters), `map` (the agent's four maps) are fixed sets;
//!   `identity` is one per service account with a pod on this node (series of certificates
//!   no longer held are removed); `destination_service` is one per Service hostname.
//! * `process_*`: no labels.
mod departed;
mod http;
pub mod process;

use std::time::Duration;

pub use http::{HttpMetrics, RequestOutcome, SeriesCache};
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::{
    ebpf::{Counters, MapFill},
    identity::Identity,
    inventory::{Service, Workload},
    metrics::process::ProcessCollector,
};

/// Istio's label set for `istio_tcp_*`, in order.
const TCP_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

const UNKNOWN: &str = "unknown";

/// Buckets of `nodemesh_pod_enrollment_duration_seconds`: around the 5 ms a pod's start may
/// wait for its enrollment, up to the seconds a search for its netns can take.
const ENROLLMENT_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// What Istio reports as the cluster name when none is configured.
const CLUSTER: &str = "Kubernetes";

/// Which proxy reports: the client's (`source`) or the server's (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// The labels of one connection, computed once when it opens.
#[derive(Clone, Debug)]
pub struct ConnectionLabels {
    values: Vec<String>,
}

impl ConnectionLabels {
    /// `mutual_tls` holds the verified (source, destination) identities of an mTLS
    /// connection; `None` means plaintext.
    pub fn new(
        reporter: Reporter,
        source: Option<&Workload>,
        destination: Option<&Workload>,
        service: Option<&Service>,
        mutual_tls: Option<(&Identity, &Identity)>,
    ) -> Self {
        let (source_principal, destination_principal, security_policy) = match mutual_tls {
            Some((source, destination)) => {
                (source.to_string(), destination.to_string(), "mutual_tls")
            }
            None => (UNKNOWN.to_string(), UNKNOWN.to_string(), "none"),
        };
        let workload = |w: Option<&Workload>| {
            w.map_or([UNKNOWN.to_string(), UNKNOWN.to_string()], |w| {
                [w.workload_name.clone(), w.key.namespace.clone()]
            })
        };
        let app = |w: Option<&Workload>| {
            w.map_or([UNKNOWN.to_string(), UNKNOWN.to_string()], |w| {
                [w.app_label().to_string(), w.version_label().to_string()]
            })
        };
        let [source_workload, source_namespace] = workload(source);
        let [source_app, source_version] = app(source);
        let [destination_workload, destination_namespace] = workload(destination);
        let [destination_app, destination_version] = app(destination);
        let (service_host, service_name, service_namespace) = service.map_or_else(
            || {
                (
                    UNKNOWN.to_string(),
                    UNKNOWN.to_string(),
                    UNKNOWN.to_string(),
                )
            },
            |s| (s.hostname(), s.key.name.clone(), s.key.namespace.clone()),
        );
        Self {
            values: vec![
                reporter.as_str().to_string(),
                source_workload,
                source_namespace,
                source_principal,
                source_app,
                source_version,
                CLUSTER.to_string(),
                destination_workload,
                destination_namespace,
                destination_principal,
                destination_app,
                destination_version,
                service_host,
                service_name,
                service_namespace,
                CLUSTER.to_string(),
                "tcp".to_string(),
                "-".to_string(),
                security_policy.to_string(),
            ],
        }
    }

    fn as_strs(&self) -> Vec<&str> {
        self.values.iter().map(String::as_str).collect()
    }
}

/// Istio's TCP metrics.
#[derive(Clone)]
pub struct TcpMetrics {
    opened: IntCounterVec,
    closed: IntCounterVec,
    sent_bytes: IntCounterVec,
    received_bytes: IntCounterVec,
}

impl TcpMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let counter = IntCounterVec::new(Opts::new(name, help), TCP_LABELS)?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        Ok(Self {
            opened: counter(
                "istio_tcp_connections_opened_total",
                "TCP connections opened",
            )?,
            closed: counter(
                "istio_tcp_connections_closed_total",
                "TCP connections closed",
            )?,
            sent_bytes: counter(
                "istio_tcp_sent_bytes_total",
                "Bytes sent towards the client (the response direction)",
            )?,
            received_bytes: counter(
                "istio_tcp_received_bytes_total",
                "Bytes received from the client (the request direction)",
            )?,
        })
    }

    pub fn opened(&self, labels: &ConnectionLabels) {
        self.opened.with_label_values(&labels.as_strs()).inc();
    }

    /// Records a closed connection with the bytes that crossed it each way.
    pub fn closed(&self, labels: &ConnectionLabels, from_client: u64, to_client: u64) {
        let values = labels.as_strs();
        self.received_bytes
            .with_label_values(&values)
            .inc_by(from_client);
        self.sent_bytes.with_label_values(&values).inc_by(to_client);
        self.closed.with_label_values(&values).inc();
    }
}

/// Node-level metrics under the `nodemesh_` prefix.
#[derive(Clone)]
pub struct NodeMetrics {
    enrolled_pods: IntGauge,
    enrollment_duration: Histogram,
    config_rejections: IntGauge,
    config_loads: IntCounter,
    config_last_load: Gauge,
    captured_connections: IntCounterVec,
    capture_refusals: IntCounterVec,
    proxy_errors: IntCounterVec,
    bpf_counters: IntGaugeVec,
    bpf_map_entries: IntGaugeVec,
    bpf_map_capacity: IntGaugeVec,
    certificate_expiry: IntGaugeVec,
    tunnels_opened: IntCounter,
    pooled_tunnels: IntGauge,
    upstream_overflows: IntCounterVec,
    outlier_ejections: IntCounterVec,
    access_log_dropped: IntCounter,
    jwks_fetches: IntCounterVec,
}

impl NodeMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        fn registered<M>(registry: &Registry, metric: M) -> prometheus::Result<M>
        where
            M: prometheus::core::Collector + Clone + 'static,
        {
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        }
        let gauge = |name: &str, help: &str| registered(registry, IntGauge::new(name, help)?);
        let counter = |name: &str, help: &str| registered(registry, IntCounter::new(name, help)?);
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            registered(registry, IntGaugeVec::new(Opts::new(name, help), labels)?)
        };
        let counters = |name: &str, help: &str, labels: &[&str]| {
            registered(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        Ok(Self {
            enrolled_pods: gauge(
                "nodemesh_enrolled_pods",
                "Pods on this node whose traffic the mesh captures",
            )?,
            enrollment_duration: registered(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "nodemesh_pod_enrollment_duration_seconds",
                        "Time to enroll one pod: finding its netns, its inbound routing, its \
                         in-pod listeners and its capture entries (a CNI ADD waits for it)",
                    )
                    .buckets(ENROLLMENT_BUCKETS.to_vec()),
                )?,
            )?,
            config_rejections: gauge(
                "nodemesh_config_rejected_resources",
                "Config resources rejected in the last load (their last good version is in force)",
            )?,
            config_loads: counter(
                "nodemesh_config_loads_total",
                "Config snapshots published (one per change of the config)",
            )?,
            config_last_load: registered(
                registry,
                Gauge::new(
                    "nodemesh_config_last_load_seconds",
                    "Seconds the last config load took: reading what changed, translating it \
                     and publishing the snapshot",
                )?,
            )?,
            captured_connections: counters(
                "nodemesh_captured_connections_total",
                "Connections accepted by the in-pod listeners",
                &["direction"],
            )?,
            capture_refusals: counters(
                "nodemesh_capture_refused_connections_total",
                "Connections of enrolled pods the kernel side refused because it could not \
                 capture them (rather than let them past the mesh), by direction and reason",
                &["direction", "reason"],
            )?,
            proxy_errors: counters(
                "nodemesh_proxy_errors_total",
                "Connections the proxy could not serve, by reason",
                &["direction", "reason"],
            )?,
            bpf_counters: gauges(
                "nodemesh_bpf_events",
                "Events counted by the eBPF programs since the agent started",
                &["event"],
            )?,
            bpf_map_entries: gauges(
                "nodemesh_bpf_map_entries",
                "Entries in each eBPF map the agent owns (counted every few seconds)",
                &["map"],
            )?,
            bpf_map_capacity: gauges(
                "nodemesh_bpf_map_capacity",
                "Maximum entries of each eBPF map the agent owns",
                &["map"],
            )?,
            certificate_expiry: gauges(
                "nodemesh_certificate_expiration_timestamp_seconds",
                "When the workload certificate in use expires (Unix time), per identity",
                &["identity"],
            )?,
            tunnels_opened: counter(
                "nodemesh_hbone_tunnels_opened_total",
                "HBONE tunnels (mTLS connections) this node's proxy opened to other proxies",
            )?,
            pooled_tunnels: gauge(
                "nodemesh_hbone_pooled_tunnels",
                "HBONE tunnels currently in the pool",
            )?,
            upstream_overflows: counters(
                "nodemesh_upstream_overflow_total",
                "Requests or connections refused by a circuit breaker (connection pool limits)",
                &["destination_service"],
            )?,
            outlier_ejections: counters(
                "nodemesh_outlier_ejections_total",
                "Endpoints ejected from load balancing by outlier detection",
                &["destination_service"],
            )?,
            access_log_dropped: counter(
                "nodemesh_access_log_dropped_total",
                "Access log lines dropped because the output (stdout) could not keep up",
            )?,
            jwks_fetches: counters(
                "nodemesh_jwks_fetches_total",
                "Fetches of the JSON Web Key Sets RequestAuthentication rules name by URL, by \
                 result (ok, error)",
                &["result"],
            )?,
        })
    }

    pub fn pod_enrolled(&self, took: Duration) {
        self.enrollment_duration.observe(took.as_secs_f64());
    }

    pub fn set_enrolled_pods(&self, count: usize) {
        self.enrolled_pods.set(count as i64);
    }

    /// Records one published config snapshot and how many resources it refused.
    pub fn config_loaded(&self, rejections: usize, took: Duration) {
        self.config_rejections.set(rejections as i64);
        self.config_last_load.set(took.as_secs_f64());
        self.config_loads.inc();
    }

    pub fn captured(&self, direction: &str) {
        self.captured_connections
            .with_label_values(&[direction])
            .inc();
    }

    pub fn proxy_error(&self, direction: &str, reason: &str) {
        self.proxy_errors
            .with_label_values(&[direction, reason])
            .inc();
    }

    /// Replaces the certificate expiry series with `certificates` (identity, expiry), so
    /// identities no longer served disappear.
    pub fn set_certificate_expiries(&self, certificates: &[(String, std::time::SystemTime)]) {
        self.certificate_expiry.reset();
        for (identity, not_after) in certificates {
            let unix = not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.certificate_expiry
                .with_label_values(&[identity.as_str()])
                .set(i64::try_from(unix).unwrap_or(i64::MAX));
        }
    }

    /// The counter the access log bumps for each line it drops.
    pub fn access_log_dropped(&self) -> IntCounter {
        self.access_log_dropped.clone()
    }

    pub fn jwks_fetched(&self, result: &str) {
        self.jwks_fetches.with_label_values(&[result]).inc();
    }

    pub fn tunnel_opened(&self) {
        self.tunnels_opened.inc();
    }

    pub fn set_pooled_tunnels(&self, count: usize) {
        self.pooled_tunnels.set(count as i64);
    }

    /// A circuit breaker of `service` (its hostname, as in `destination_service`) refused
    /// a request or connection.
    pub fn upstream_overflow(&self, service: &str) {
        self.upstream_overflows.with_label_values(&[service]).inc();
    }

    /// Outlier detection ejected one endpoint of `service` (its hostname).
    pub fn outlier_ejected(&self, service: &str) {
        self.outlier_ejections.with_label_values(&[service]).inc();
    }

    /// Copies a snapshot of the kernel side's counters: all of them as
    /// `nodemesh_bpf_events`, and those that mean a connection could not be captured, and
    /// so was refused, as `nodemesh_capture_refused_connections_total`.
    ///
    /// What is refused: an enrolled pod's `connect()` whose original destination could not
    /// be recorded (`orig_dst_table_full`: it fails with EPERM; the kernel side counts a
    /// failed re-keying at establishment under the same index, after which the proxy
    /// refuses the connection for want of its destination), and a connection into an
    /// enrolled pod for an address with no inbound listener (`no_listener`: refused). The
    /// proxy's own sockets skipping the hooks (`outbound_proxy_bypass`) are expected.
    pub fn record_bpf_counters(&self, counters: &Counters) {
        let events = [
            ("outbound_redirected", counters.outbound_redirected),
            ("outbound_proxy_bypass", counters.outbound_proxy_bypass),
            ("inbound_steered", counters.inbound_steered),
            ("inbound_no_listener", counters.inbound_no_listener),
            ("orig_dst_table_full", counters.orig_dst_table_full),
            ("sockmap_entered", counters.sockmap_entered),
            ("sockmap_redirected", counters.sockmap_redirected),
            ("sockmap_fell_back", counters.sockmap_fell_back),
        ];
        for (event, value) in events {
            self.bpf_counters
                .with_label_values(&[event])
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        let refusals = [
            (
                "outbound",
                "orig_dst_table_full",
                counters.orig_dst_table_full,
            ),
            ("inbound", "no_listener", counters.inbound_no_listener),
        ];
        for (direction, reason, total) in refusals {
            let counter = self
                .capture_refusals
                .with_label_values(&[direction, reason]);
            // The kernel's counts only grow while the agent runs (it loads its own maps),
            // so the counter follows them by the difference.
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// Records how full each of the agent's eBPF maps is.
    pub fn set_bpf_map_fill(&self, maps: &[MapFill]) {
        for fill in maps {
            self.bpf_map_entries
                .with_label_values(&[fill.map])
                .set(i64::from(fill.entries));
            self.bpf_map_capacity
                .with_label_values(&[fill.map])
                .set(i64::from(fill.capacity));
        }
    }
}

/// Everything the agent exports, on one registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub tcp: TcpMetrics,
    pub http: HttpMetrics,
    pub node: NodeMetrics,
    departed: std::sync::Arc<departed::DepartedSeries>,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        registry.register(Box::new(ProcessCollector::new()?))?;
        Ok(Self {
            tcp: TcpMetrics::register(&registry)?,
            http: HttpMetrics::register(&registry)?,
            node: NodeMetrics::register(&registry)?,
            registry,
            departed: std::sync::Arc::default(),
        })
    }

    /// Removes the `istio_*` series of workloads gone for a minute (so scrapes in between
    /// still see their last counts). `present(workload, namespace)` says whether a workload
    /// is in the mesh now.
    pub fn forget_departed(&self, present: &dyn Fn(&str, &str) -> bool) {
        self.forget_departed_after(present, departed::GRACE);
    }

    fn forget_departed_after(&self, present: &dyn Fn(&str, &str) -> bool, grace: Duration) {
        let sweep = &self.departed;
        for vec in [
            &self.tcp.opened,
            &self.tcp.closed,
            &self.tcp.sent_bytes,
            &self.tcp.received_bytes,
        ] {
            sweep.sweep(vec, TCP_LABELS, present, grace);
        }
        self.http.forget_departed(sweep, present, grace);
    }
}

#[cfg(test)]
mod tests;
