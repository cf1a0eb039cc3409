//! Istio's `DestinationRule`: subsets (pods selected by label) and the traffic policy for a
//! Service, its ports and its subsets.
use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use super::{
    ConnectionPool, HashKey, LoadBalancer, OutlierDetection, PolicySection, RoutingError, Subset,
    fields,
    host::resolve_host,
    traffic_policy::{PolicyLayers, TlsOrigination, UpstreamTls},
    virtual_service::PortSelector,
};
use crate::inventory::ObjectKey;

/// `spec` of a DestinationRule.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicySpec>,
    pub subsets: Vec<SubsetSpec>,
    pub workload_selector: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SubsetSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicySpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficPolicySpec {
    pub load_balancer: Option<LoadBalancerSpec>,
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub tls: Option<TlsSettingsSpec>,
    pub port_level_settings: Vec<PortTrafficPolicySpec>,
}

/// `trafficPolicy.tls`: TLS from the proxy to the upstream.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsSettingsSpec {
    pub mode: Option<String>,
    pub sni: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub insecure_skip_verify: Option<bool>,
    pub ca_crl: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PortTrafficPolicySpec {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSpec>,
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub tls: Option<TlsSettingsSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadBalancerSpec {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHashSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConsistentHashSpec {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: bool,
    pub http_query_parameter_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpCookie {
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ConnectionPoolSpec {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpSettings {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<String>,
    pub idle_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpSettings {
    pub http1_max_pending_requests: Option<i64>,
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Option<i64>,
    pub idle_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OutlierDetectionSpec {
    pub consecutive_5xx_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
}

/// A DestinationRule as the mesh applies it.
#[derive(Debug)]
pub(super) struct CompiledDestinationRule {
    /// `None` when the host names no Service.
    pub(super) host: Option<ObjectKey>,
    /// The host when it names no Service and may be a ServiceEntry's (a name with a dot,
    /// no wildcard): its policy applies to traffic to that host.
    pub(super) external_host: Option<String>,
    pub(super) policy: PolicyLayers,
    pub(super) subsets: Vec<(String, Subset)>,
}

// === impl DestinationRuleSpec ===

impl DestinationRuleSpec {
    /// Checks everything the mesh would compile; `namespace` is the resource's own.
    pub fn validate(&self, namespace: &str) -> Result<(), RoutingError> {
        self.compile(namespace).map(|_| ())
    }

    /// The Service this rule is for, if its host names one.
    pub(super) fn service(&self, namespace: &str) -> Option<ObjectKey> {
        resolve_host(&self.host, namespace)
    }

    pub(super) fn compile(&self, namespace: &str) -> Result<CompiledDestinationRule, RoutingError> {
        if self.host.is_empty() {
            return Err(RoutingError::Invalid {
                field: "host".into(),
                reason: "a host is required".into(),
            });
        }
        // Istio applies such a rule only to the selected clients' sidecars; applying it to
        // every client would change traffic the rule does not mean to touch.
        if self.workload_selector.is_some() {
            return Err(RoutingError::Unsupported {
                field: "workloadSelector".into(),
                what: "a DestinationRule for selected clients only".into(),
            });
        }
        let policy = compile_policy("trafficPolicy", self.traffic_policy.as_ref())?;
        let mut names = HashSet::new();
        let mut subsets = Vec::new();
        for (i, subset) in self.subsets.iter().enumerate() {
            let field = format!("subsets[{i}]");
            if subset.name.is_empty() {
                return Err(RoutingError::Invalid {
                    field: format!("{field}.name"),
                    reason: "a subset needs a name".into(),
                });
            }
            if !names.insert(subset.name.as_str()) {
                return Err(RoutingError::DuplicateSubset {
                    field: format!("{field}.name"),
                    name: subset.name.clone(),
                });
            }
            subsets.push((
                subset.name.clone(),
                Subset {
                    labels: subset.labels.clone(),
                    policy: compile_policy(
                        &format!("{field}.trafficPolicy"),
                        subset.traffic_policy.as_ref(),
                    )?,
                },
            ));
        }
        let host = self.service(namespace);
        let external_host = (host.is_none() && self.host.contains('.') && !self.host.contains('*'))
            .then(|| self.host.trim_end_matches('.').to_owned());
        Ok(CompiledDestinationRule {
            host,
            external_host,
            policy,
            subsets,
        })
    }

    /// Names of the subsets this rule defines.
    pub(super) fn subset_names(&self) -> impl Iterator<Item = &str> {
        self.subsets.iter().map(|s| s.name.as_str())
    }
}

fn compile_policy(
    field: &str,
    spec: Option<&TrafficPolicySpec>,
) -> Result<PolicyLayers, RoutingError> {
    let Some(spec) = spec else {
        return Ok(PolicyLayers::default());
    };
    let mut ports = BTreeMap::new();
    for (i, setting) in spec.port_level_settings.iter().enumerate() {
        let at = format!("{field}.portLevelSettings[{i}]");
        let number = setting.port.as_ref().map_or(0, |p| p.number);
        let port = fields::port(&format!("{at}.port.number"), number)?;
        let section = compile_section(
            &at,
            setting.load_balancer.as_ref(),
            setting.connection_pool.as_ref(),
            setting.outlier_detection.as_ref(),
            setting.tls.as_ref(),
        )?;
        if ports.insert(port, section).is_some() {
            return Err(RoutingError::Invalid {
                field: format!("{at}.port.number"),
                reason: format!("port {port} has settings already"),
            });
        }
    }
    Ok(PolicyLayers {
        base: compile_section(
            field,
            spec.load_balancer.as_ref(),
            spec.connection_pool.as_ref(),
            spec.outlier_detection.as_ref(),
            spec.tls.as_ref(),
        )?,
        ports,
    })
}

fn compile_section(
    field: &str,
    load_balancer: Option<&LoadBalancerSpec>,
    connection_pool: Option<&ConnectionPoolSpec>,
    outlier_detection: Option<&OutlierDetectionSpec>,
    tls: Option<&TlsSettingsSpec>,
) -> Result<PolicySection, RoutingError> {
    Ok(PolicySection {
        tls: tls
            .map(|tls| tls.compile(&format!("{field}.tls")))
            .transpose()?,
        load_balancer: load_balancer
            .map(|lb| lb.compile(&format!("{field}.loadBalancer")))
            .transpose()?,
        connection_pool: connection_pool
            .map(|pool| pool.compile(&format!("{field}.connectionPool")))
            .transpose()?,
        outlier_detection: outlier_detection
            .map(|od| od.compile(&format!("{field}.outlierDetection")))
            .transpose()?,
    })
}

impl TlsSettingsSpec {
    fn compile(&self, field: &str) -> Result<UpstreamTls, RoutingError> {
        let unsupported = |at: &str, what: &str| RoutingError::Unsupported {
            field: format!("{field}.{at}"),
            what: what.to_string(),
        };
        let simple = match self.mode.as_deref() {
            None | Some("DISABLE" | "ISTIO_MUTUAL") => return Ok(UpstreamTls::Off),
            Some("SIMPLE") => UpstreamTls::Simple(TlsOrigination {
                sni: self.sni.clone().filter(|s| !s.is_empty()),
                ca_certificates: self.ca_certificates.clone().filter(|c| !c.is_empty()),
            }),
            Some("MUTUAL") => {
                return Err(unsupported(
                    "mode",
                    "MUTUAL (a client certificate to the upstream)",
                ));
            }
            Some(other) => {
                return Err(RoutingError::Invalid {
                    field: format!("{field}.mode"),
                    reason: format!(
                        "{other:?} is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL"
                    ),
                });
            }
        };
        // Each of these would change what the proxy trusts: refused rather than ignored.
        if self.credential_name.is_some() {
            return Err(unsupported("credentialName", "a CA from a Secret"));
        }
        if !self.subject_alt_names.is_empty() {
            return Err(unsupported(
                "subjectAltNames",
                "checking names other than the SNI",
            ));
        }
        if self.insecure_skip_verify == Some(true) {
            return Err(unsupported("insecureSkipVerify", "skipping verification"));
        }
        if self.ca_crl.is_some() {
            return Err(unsupported("caCrl", "a certificate revocation list"));
        }
        Ok(simple)
    }
}

impl LoadBalancerSpec {
    fn compile(&self, field: &str) -> Result<LoadBalancer, RoutingError> {
        let unsupported = |at: &str, what: &str| RoutingError::Unsupported {
            field: format!("{field}.{at}"),
            what: what.to_string(),
        };
        match (self.simple.as_deref(), &self.consistent_hash) {
            (Some(_), Some(_)) => Err(RoutingError::Invalid {
                field: field.to_string(),
                reason: "simple and consistentHash cannot both be set".into(),
            }),
            (None | Some("UNSPECIFIED" | "ROUND_ROBIN"), None) => Ok(LoadBalancer::RoundRobin),
            (Some("LEAST_REQUEST" | "LEAST_CONN"), None) => Ok(LoadBalancer::LeastRequest),
            (Some("RANDOM"), None) => Ok(LoadBalancer::Random),
            (Some("PASSTHROUGH"), None) => Err(unsupported(
                "simple",
                "PASSTHROUGH (the node proxy always picks an endpoint)",
            )),
            (Some(other), None) => Err(RoutingError::Invalid {
                field: format!("{field}.simple"),
                reason: format!(
                    "{other:?} is not one of ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM"
                ),
            }),
            (None, Some(hash)) => {
                let at = format!("{field}.consistentHash");
                let mut keys = Vec::new();
                if let Some(name) = &hash.http_header_name {
                    let header = fields::header_name(&format!("{at}.httpHeaderName"), name)?;
                    keys.push(HashKey::Header(header));
                }
                if let Some(cookie) = &hash.http_cookie {
                    if cookie.name.is_empty() {
                        return Err(RoutingError::Invalid {
                            field: format!("{at}.httpCookie.name"),
                            reason: "a cookie hash needs the cookie's name".into(),
                        });
                    }
                    keys.push(HashKey::Cookie(cookie.name.clone()));
                }
                if hash.use_source_ip {
                    keys.push(HashKey::SourceIp);
                }
                if hash.http_query_parameter_name.is_some() {
                    return Err(unsupported(
                        "consistentHash.httpQueryParameterName",
                        "hashing on a query parameter",
                    ));
                }
                match <[HashKey; 1]>::try_from(keys) {
                    Ok([key]) => Ok(LoadBalancer::ConsistentHash(key)),
                    Err(_) => Err(RoutingError::Invalid {
                        field: at,
                        reason: "exactly one of httpHeaderName, httpCookie and useSourceIp \
                                 must be set"
                            .into(),
                    }),
                }
            }
        }
    }
}

impl ConnectionPoolSpec {
    fn compile(&self, field: &str) -> Result<ConnectionPool, RoutingError> {
        let tcp = self.tcp.clone().unwrap_or_default();
        let http = self.http.clone().unwrap_or_default();
        let count = |at: &str, value: Option<i64>| {
            value
                .map(|v| fields::count(&format!("{field}.{at}"), v))
                .transpose()
        };
        let duration = |at: &str, value: Option<&String>| {
            fields::optional_duration(&format!("{field}.{at}"), value)
        };
        let http_idle = duration("http.idleTimeout", http.idle_timeout.as_ref())?;
        let tcp_idle = duration("tcp.idleTimeout", tcp.idle_timeout.as_ref())?;
        Ok(ConnectionPool {
            max_connections: count("tcp.maxConnections", tcp.max_connections)?,
            connect_timeout: duration("tcp.connectTimeout", tcp.connect_timeout.as_ref())?,
            http1_max_pending_requests: count(
                "http.http1MaxPendingRequests",
                http.http1_max_pending_requests,
            )?,
            http2_max_requests: count("http.http2MaxRequests", http.http2_max_requests)?,
            max_requests_per_connection: count(
                "http.maxRequestsPerConnection",
                http.max_requests_per_connection,
            )?,
            max_retries: count("http.maxRetries", http.max_retries)?,
            idle_timeout: http_idle.or(tcp_idle),
        })
    }
}

impl OutlierDetectionSpec {
    fn compile(&self, field: &str) -> Result<OutlierDetection, RoutingError> {
        let defaults = OutlierDetection::default();
        let count = |at: &str, value: Option<i64>, default: u32| {
            value.map_or(Ok(default), |v| fields::count(&format!("{field}.{at}"), v))
        };
        let duration = |at: &str, value: Option<&String>, default| {
            fields::optional_duration(&format!("{field}.{at}"), value).map(|d| d.unwrap_or(default))
        };
        let max_ejection_percent = match self.max_ejection_percent {
            Some(value) => {
                let at = format!("{field}.maxEjectionPercent");
                fields::percentage(&at, value as f64)?;
                fields::count(&at, value)?
            }
            None => defaults.max_ejection_percent,
        };
        Ok(OutlierDetection {
            consecutive_5xx_errors: count(
                "consecutive5xxErrors",
                self.consecutive_5xx_errors,
                defaults.consecutive_5xx_errors,
            )?,
            consecutive_gateway_errors: count(
                "consecutiveGatewayErrors",
                self.consecutive_gateway_errors,
                defaults.consecutive_gateway_errors,
            )?,
            interval: duration("interval", self.interval.as_ref(), defaults.interval)?,
            base_ejection_time: duration(
                "baseEjectionTime",
                self.base_ejection_time.as_ref(),
                defaults.base_ejection_time,
            )?,
            max_ejection_percent,
        })
    }
}
