//! Traffic to destinations outside the cluster's Services: Istio's `ServiceEntry`, which
//! names them (and so gives them metrics, and a place in the registry), and the mesh's
//! `outboundTrafficPolicy`, which says whether a destination nobody named is reachable.
//!
//! A ServiceEntry becomes one [`Service`] per host, keyed `<namespace>/<host>` (a
//! Kubernetes Service name cannot hold a dot, so the two never collide), so the proxy
//! resolves, meters and logs it like any Service.
use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::inventory::{
    External, ExternalEndpoint, Location, ObjectKey, Resolution, Service, ServicePort, TargetPort,
};

/// Whether pods may reach destinations the mesh does not know (Istio's MeshConfig
/// `outboundTrafficPolicy.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[clap(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficPolicy {
    /// Unknown destinations are reached as the pod asked (Istio's PassthroughCluster).
    #[default]
    AllowAny,
    /// Only Services, pods and ServiceEntries: anything else is refused (BlackHoleCluster).
    RegistryOnly,
}

/// `spec` of a ServiceEntry (networking.istio.io).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    #[serde(default)]
    pub location: Location,
    #[serde(default)]
    pub resolution: Resolution,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    /// Namespaces that see it: `*` (default) all, `.` its own, or names.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Endpoints picked from pods: not supported; present only to be refused clearly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<serde_json::Value>,
    /// For mutual TLS to MESH_INTERNAL endpoints outside the cluster: not used (those are
    /// reached in plaintext, as any destination outside the mesh).
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntryPort {
    pub number: u32,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// One endpoint of a ServiceEntry (a `WorkloadEntry` spec).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    #[serde(default)]
    pub address: String,
    /// The port of each of the entry's ports (by name) on this endpoint.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub service_account: Option<String>,
}

/// Why a ServiceEntry cannot be used; reported when the resource is loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceEntryError {
    #[error("hosts must name at least one host")]
    NoHosts,
    #[error("hosts: {0:?} is not a host name")]
    BadHost(String),
    #[error("hosts: {0:?} is a wildcard, which needs resolution NONE")]
    WildcardNeedsNone(String),
    #[error("addresses: {0:?} is not an IP address or CIDR block")]
    BadAddress(String),
    #[error(
        "addresses: {0:?} is a range of addresses, which is not supported yet; list the addresses"
    )]
    Range(String),
    #[error("ports must list at least one port")]
    NoPorts,
    #[error("ports: {0} is not a port number")]
    BadPort(u32),
    #[error("ports: the name of port {0} is missing or used twice")]
    PortName(u32),
    #[error("resolution STATIC needs endpoints with IP addresses")]
    StaticWithoutEndpoints,
    #[error("endpoints: {0:?} is not an IP address (resolution STATIC)")]
    EndpointNotIp(String),
    #[error("endpoints: resolution NONE takes no endpoints")]
    EndpointsWithNone,
    #[error("endpoints: an endpoint has no address")]
    EndpointWithoutAddress,
    #[error("endpoints: port {0} of an endpoint is not a port number")]
    EndpointPort(u32),
    #[error("workloadSelector is not supported; list the endpoints")]
    WorkloadSelector,
}

impl ServiceEntrySpec {
    /// Checks what the proxy relies on, so a bad entry is refused with its reason.
    pub fn validate(&self) -> Result<(), ServiceEntryError> {
        if self.workload_selector.is_some() {
            return Err(ServiceEntryError::WorkloadSelector);
        }
        if self.hosts.is_empty() {
            return Err(ServiceEntryError::NoHosts);
        }
        for host in &self.hosts {
            let name = host.strip_prefix("*.").unwrap_or(host);
            if name.is_empty() || host.contains('/') || host.contains(':') || name.contains('*') {
                return Err(ServiceEntryError::BadHost(host.clone()));
            }
            if host.starts_with('*') && self.resolution != Resolution::None {
                return Err(ServiceEntryError::WildcardNeedsNone(host.clone()));
            }
        }
        for address in &self.addresses {
            parse_address(address)?;
        }
        if self.ports.is_empty() {
            return Err(ServiceEntryError::NoPorts);
        }
        for (index, port) in self.ports.iter().enumerate() {
            for number in [Some(port.number), port.target_port].into_iter().flatten() {
                if !(1..=u32::from(u16::MAX)).contains(&number) {
                    return Err(ServiceEntryError::BadPort(number));
                }
            }
            let duplicate = self.ports[..index].iter().any(|p| p.name == port.name);
            if port.name.is_empty() || duplicate {
                return Err(ServiceEntryError::PortName(port.number));
            }
        }
        self.validate_endpoints()
    }

    fn validate_endpoints(&self) -> Result<(), ServiceEntryError> {
        match self.resolution {
            Resolution::None if !self.endpoints.is_empty() => {
                return Err(ServiceEntryError::EndpointsWithNone);
            }
            Resolution::Static if self.endpoints.is_empty() => {
                return Err(ServiceEntryError::StaticWithoutEndpoints);
            }
            _ => {}
        }
        for endpoint in &self.endpoints {
            if endpoint.address.is_empty() {
                return Err(ServiceEntryError::EndpointWithoutAddress);
            }
            if self.resolution == Resolution::Static && endpoint.address.parse::<IpAddr>().is_err()
            {
                return Err(ServiceEntryError::EndpointNotIp(endpoint.address.clone()));
            }
            if let Some(bad) = endpoint
                .ports
                .values()
                .find(|p| u16::try_from(**p).is_err())
            {
                return Err(ServiceEntryError::EndpointPort(*bad));
            }
        }
        Ok(())
    }

    /// The Services this entry gives the mesh, one per host (the spec passed [`validate`]).
    pub fn services(&self, namespace: &str) -> Vec<Service> {
        let cluster_ips: Vec<IpAddr> = self
            .addresses
            .iter()
            .filter_map(|a| parse_address(a).ok())
            .collect();
        let ports: Vec<ServicePort> = self
            .ports
            .iter()
            .map(|p| ServicePort {
                name: Some(p.name.clone()),
                port: p.number as u16,
                target_port: TargetPort::Number(p.target_port.unwrap_or(p.number) as u16),
                app_protocol: p.protocol.as_deref().map(str::to_ascii_lowercase),
            })
            .collect();
        let endpoints: Vec<ExternalEndpoint> = self
            .endpoints
            .iter()
            .map(|e| ExternalEndpoint {
                address: e.address.clone(),
                ports: e
                    .ports
                    .iter()
                    .map(|(name, port)| (name.clone(), *port as u16))
                    .collect(),
            })
            .collect();
        let visible_to = visibility(&self.export_to, namespace);
        self.hosts
            .iter()
            .map(|host| Service {
                key: ObjectKey::new(namespace, host.as_str()),
                cluster_ips: cluster_ips.clone(),
                ports: ports.clone(),
                endpoints: Vec::new(),
                external: Some(Box::new(External {
                    location: self.location,
                    resolution: self.resolution,
                    endpoints: endpoints.clone(),
                    visible_to: visible_to.clone(),
                })),
            })
            .collect()
    }
}

/// `exportTo` as the namespaces that see an entry of `namespace`; `None`: all of them.
fn visibility(export_to: &[String], namespace: &str) -> Option<Vec<String>> {
    if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
        return None;
    }
    Some(
        export_to
            .iter()
            .map(|e| if e == "." { namespace } else { e.as_str() }.to_owned())
            .collect(),
    )
}

/// An address of `addresses`: an IP, or a CIDR block of one address.
fn parse_address(address: &str) -> Result<IpAddr, ServiceEntryError> {
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Ok(ip);
    }
    let block: IpNet = address
        .parse()
        .map_err(|_| ServiceEntryError::BadAddress(address.to_owned()))?;
    if block.prefix_len() != block.max_prefix_len() {
        return Err(ServiceEntryError::Range(address.to_owned()));
    }
    Ok(block.addr())
}

#[cfg(test)]
mod tests;
