//! Which endpoints serve a Service port.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use crate::{
    inventory::{ObjectKey, Service, TargetPort},
    routing::Destination,
    state::State,
};

/// Where a connection to a Service port goes at L4.
pub struct TcpTarget<'s> {
    pub service: &'s Service,
    pub port: u16,
    /// The DestinationRule subset, by name and labels, when the route names one that exists.
    pub subset: Option<(&'s str, &'s BTreeMap<String, String>)>,
}

/// Where a connection to `dialed`'s `port` goes when a VirtualService's `tcp` route picked
/// `routed` (`None`: no route, or all weights 0). A route to a Service the state does not
/// know falls back to the dialed Service and port; a subset no DestinationRule defines does
/// not filter.
pub fn tcp_target<'s>(
    state: &'s State,
    dialed: &'s Service,
    port: u16,
    routed: Option<&'s Destination>,
) -> TcpTarget<'s> {
    let Some((destination, service)) =
        routed.and_then(|d| Some((d, state.services.get(&d.service)?)))
    else {
        return TcpTarget {
            service: dialed,
            port,
            subset: None,
        };
    };
    let subset = destination.subset.as_deref().and_then(|name| {
        let labels = state.routes.subset_labels(&service.key, name)?;
        Some((name, labels))
    });
    TcpTarget {
        service,
        port: destination.port.unwrap_or(port),
        subset,
    }
}

/// The ready endpoints of `service` that serve its `port` in the address family of
/// `family`, with `port` mapped to each endpoint's target port; only those carrying every
/// label of `subset` when given. `None` when the Service has no such port.
pub fn service_endpoints<'s>(
    state: &'s State,
    service: &Service,
    port: u16,
    family: IpAddr,
    subset: Option<&BTreeMap<String, String>>,
) -> Option<Vec<(&'s ObjectKey, SocketAddr)>> {
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
                Some((&w.key, SocketAddr::new(ip, target)))
            })
            .collect(),
    )
}
