//! Prometheus metrics: Istio's standard TCP and request metrics and Nodemesh's node
//! metrics.
//!
//! Istio's names and labels are kept exactly so Kiali and the stock Grafana dashboards
//! work unchanged. Label values come from the state (bounded by the number of workloads and
//! services), never from request data; the request metrics add only response codes, gRPC
//! statuses and response flags, which are small fixed sets. That keeps cardinality bounded.
mod http;
pub mod server;

pub use http::{HttpMetrics, RequestOutcome};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
pub use server::serve;

use crate::{
    identity::Identity,
    state::{Service, Workload},
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
    config_rejections: IntGauge,
    config_loads: prometheus::IntCounter,
    captured_connections: IntCounterVec,
    proxy_errors: IntCounterVec,
    bpf_counters: IntGaugeVec,
    certificate_expiry: IntGaugeVec,
    tunnels_opened: prometheus::IntCounter,
    pooled_tunnels: IntGauge,
    upstream_overflows: IntCounterVec,
    outlier_ejections: IntCounterVec,
}

impl NodeMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let enrolled_pods = IntGauge::new(
            "nodemesh_enrolled_pods",
            "Pods on this node whose traffic the mesh captures",
        )?;
        let config_rejections = IntGauge::new(
            "nodemesh_config_rejected_resources",
            "Config resources rejected in the last load (their last good version is in force)",
        )?;
        let config_loads = prometheus::IntCounter::new(
            "nodemesh_config_loads_total",
            "Config snapshots published (one per change of the config)",
        )?;
        let captured_connections = IntCounterVec::new(
            Opts::new(
                "nodemesh_captured_connections_total",
                "Connections accepted by the in-pod listeners",
            ),
            &["direction"],
        )?;
        let proxy_errors = IntCounterVec::new(
            Opts::new(
                "nodemesh_proxy_errors_total",
                "Connections the proxy could not serve, by reason",
            ),
            &["direction", "reason"],
        )?;
        let bpf_counters = IntGaugeVec::new(
            Opts::new(
                "nodemesh_bpf_events",
                "Events counted by the eBPF programs since the agent started",
            ),
            &["event"],
        )?;
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "nodemesh_certificate_expiration_timestamp_seconds",
                "When the workload certificate in use expires (Unix time), per identity",
            ),
            &["identity"],
        )?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        let tunnels_opened = prometheus::IntCounter::new(
            "nodemesh_hbone_tunnels_opened_total",
            "HBONE tunnels (mTLS connections) this node's proxy opened to other proxies",
        )?;
        registry.register(Box::new(tunnels_opened.clone()))?;
        let pooled_tunnels = IntGauge::new(
            "nodemesh_hbone_pooled_tunnels",
            "HBONE tunnels currently in the pool",
        )?;
        registry.register(Box::new(pooled_tunnels.clone()))?;
        let per_service = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let counter = IntCounterVec::new(Opts::new(name, help), &["destination_service"])?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        let upstream_overflows = per_service(
            "nodemesh_upstream_overflow_total",
            "Requests or connections refused by a circuit breaker (connection pool limits)",
        )?;
        let outlier_ejections = per_service(
            "nodemesh_outlier_ejections_total",
            "Endpoints ejected from load balancing by outlier detection",
        )?;
        registry.register(Box::new(enrolled_pods.clone()))?;
        registry.register(Box::new(config_rejections.clone()))?;
        registry.register(Box::new(config_loads.clone()))?;
        registry.register(Box::new(captured_connections.clone()))?;
        registry.register(Box::new(proxy_errors.clone()))?;
        registry.register(Box::new(bpf_counters.clone()))?;
        Ok(Self {
            enrolled_pods,
            config_rejections,
            config_loads,
            captured_connections,
            proxy_errors,
            bpf_counters,
            certificate_expiry,
            tunnels_opened,
            pooled_tunnels,
            upstream_overflows,
            outlier_ejections,
        })
    }

    pub fn set_enrolled_pods(&self, count: usize) {
        self.enrolled_pods.set(count as i64);
    }

    /// Records one published config snapshot and how many resources it refused.
    pub fn config_loaded(&self, rejections: usize) {
        self.config_rejections.set(rejections as i64);
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

    pub fn set_bpf_event(&self, event: &str, value: u64) {
        self.bpf_counters
            .with_label_values(&[event])
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    }
}

/// Everything the agent exports, on one registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub tcp: TcpMetrics,
    pub http: HttpMetrics,
    pub node: NodeMetrics,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        Ok(Self {
            tcp: TcpMetrics::register(&registry)?,
            http: HttpMetrics::register(&registry)?,
            node: NodeMetrics::register(&registry)?,
            registry,
        })
    }
}

#[cfg(test)]
mod tests;
