//! The compiled `trafficPolicy` of a DestinationRule and how its levels merge.
use std::{collections::BTreeMap, time::Duration};

use serde::{Serialize, Serializer};

use super::fields::{serialize_duration, serialize_optional_duration};

/// The policy for traffic to one Service (and subset, and port).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrafficPolicy {
    pub load_balancer: LoadBalancer,
    pub connection_pool: ConnectionPool,
    /// `None`: no outlier detection.
    pub outlier_detection: Option<OutlierDetection>,
    /// `tls.mode: SIMPLE`: the proxy opens TLS to the upstream (ServiceEntry hosts only;
    /// between pods of the mesh, HBONE is the TLS).
    pub tls_origination: Option<TlsOrigination>,
}

/// TLS the proxy opens to an upstream outside the mesh (a DestinationRule's
/// `tls.mode: SIMPLE`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TlsOrigination {
    /// The name sent (SNI) and checked in the server's certificate; default: the host.
    pub sni: Option<String>,
    /// PEM file of the CA certificates the server's chain must end in; default: the
    /// system's roots.
    pub ca_certificates: Option<String>,
}

/// A level's `tls`: originate, or not (`DISABLE`, `ISTIO_MUTUAL`: the mesh decides).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(super) enum UpstreamTls {
    Off,
    Simple(TlsOrigination),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    /// Also Istio's `LEAST_CONN`.
    LeastRequest,
    Random,
    ConsistentHash(HashKey),
}

/// What a consistent hash is computed over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    #[serde(serialize_with = "serialize_header_name")]
    Header(http::HeaderName),
    Cookie(String),
    SourceIp,
}

fn serialize_header_name<S: Serializer>(
    name: &http::HeaderName,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(name.as_str())
}

/// Connection pool limits; `None` leaves the proxy's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    #[serde(serialize_with = "serialize_optional_duration")]
    pub connect_timeout: Option<Duration>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    /// `http.idleTimeout`, else `tcp.idleTimeout`.
    #[serde(serialize_with = "serialize_optional_duration")]
    pub idle_timeout: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// Default 5; 0 disables.
    pub consecutive_5xx_errors: u32,
    /// Default 0 = off.
    pub consecutive_gateway_errors: u32,
    /// Default 10s.
    #[serde(serialize_with = "serialize_duration")]
    pub interval: Duration,
    /// Default 30s.
    #[serde(serialize_with = "serialize_duration")]
    pub base_ejection_time: Duration,
    /// Default 10.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// The sections one level of a DestinationRule sets; an absent section (`None`) leaves the
/// level below in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(super) struct PolicySection {
    pub(super) load_balancer: Option<LoadBalancer>,
    pub(super) connection_pool: Option<ConnectionPool>,
    pub(super) outlier_detection: Option<OutlierDetection>,
    pub(super) tls: Option<UpstreamTls>,
}

impl PolicySection {
    /// Each section `upper` sets replaces this one's.
    fn overlay(&mut self, upper: &PolicySection) {
        if upper.load_balancer.is_some() {
            self.load_balancer.clone_from(&upper.load_balancer);
        }
        if upper.connection_pool.is_some() {
            self.connection_pool.clone_from(&upper.connection_pool);
        }
        if upper.outlier_detection.is_some() {
            self.outlier_detection.clone_from(&upper.outlier_detection);
        }
        if upper.tls.is_some() {
            self.tls.clone_from(&upper.tls);
        }
    }

    pub(super) fn into_policy(self) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: self.load_balancer.unwrap_or_default(),
            connection_pool: self.connection_pool.unwrap_or_default(),
            outlier_detection: self.outlier_detection,
            tls_origination: match self.tls {
                Some(UpstreamTls::Simple(origination)) => Some(origination),
                Some(UpstreamTls::Off) | None => None,
            },
        }
    }
}

/// One `trafficPolicy`: its own sections and its `portLevelSettings`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(super) struct PolicyLayers {
    pub(super) base: PolicySection,
    pub(super) ports: BTreeMap<u16, PolicySection>,
}

impl PolicyLayers {
    /// Lays this policy, then its settings for `port`, over `merged`.
    pub(super) fn overlay_onto(&self, merged: &mut PolicySection, port: u16) {
        merged.overlay(&self.base);
        if let Some(port_level) = self.ports.get(&port) {
            merged.overlay(port_level);
        }
    }
}
