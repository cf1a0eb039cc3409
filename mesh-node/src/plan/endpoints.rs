//! Which endpoints serve a Service port.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use crate::{
    inventory::{ObjectKey, Service, TargetPort},
    state::State,
};

/// The ready endpoints of `service` that serve its `port` in the address family of
/// `family`, with `port` mapped to each endpoint's target port; only those carrying every
/// label of `subset` when given. `None` when the Service has no such port.
pub fn service_endpoints(
    state: &State,
    service: &Service,
    port: u16,
    family: IpAddr,
    subset: Option<&BTreeMap<String, String>>,
) -> Option<Vec<(ObjectKey, SocketAddr)>> {
    let port = service.port(port)?;
    Some(
        service
            .endpoints
            .iter()
            .filter_map(|key| state.workloads.get(key))
            .filter(|w| {
                subset.is_none_or(|labels| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            })
            .filter_map(|w| {
                let ip = w.ip_like(family)?;
                let target = match &port.target_port {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => *w.named_ports.get(name)?,
                };
                Some((w.key.clone(), SocketAddr::new(ip, target)))
            })
            .collect(),
    )
}
