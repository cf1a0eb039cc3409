//! Where a captured connection goes: a Service's endpoint, a pod, or where it asked.
use std::{collections::HashMap, net::SocketAddr};

use parking_lot::Mutex;

use super::ProxyError;
use crate::{
    inventory::ObjectKey,
    plan::endpoints::{TcpTarget, service_endpoints, tcp_target},
    routing::pick_at_random,
    state::State,
};

/// The chosen upstream of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// A ready endpoint of a Service, picked by round robin, with port → targetPort mapped.
    Service {
        service: ObjectKey,
        endpoint: ObjectKey,
        addr: SocketAddr,
    },
    /// A pod addressed directly.
    Workload {
        workload: ObjectKey,
        addr: SocketAddr,
    },
    /// Outside the mesh's knowledge: go where the app asked.
    Passthrough(SocketAddr),
}

impl Upstream {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Upstream::Service { addr, .. }
            | Upstream::Workload { addr, .. }
            | Upstream::Passthrough(addr) => *addr,
        }
    }
}

/// Picks upstreams; holds the round-robin positions.
#[derive(Default)]
pub struct Resolver {
    next: Mutex<HashMap<(ObjectKey, u16), usize>>,
}

impl Resolver {
    /// Forgets the round-robin positions of Services that `service_exists` no longer knows.
    pub fn prune(&self, service_exists: impl Fn(&ObjectKey) -> bool) {
        self.next
            .lock()
            .retain(|(service, _), _| service_exists(service));
    }

    pub fn resolve(&self, state: &State, dst: SocketAddr) -> Result<Upstream, ProxyError> {
        if let Some(service) = state.service_by_ip(dst.ip()) {
            // A VirtualService's `tcp` route may send the connection elsewhere, by weight.
            let routed = state
                .routes
                .tcp_route(&service.key, dst.port())
                .and_then(pick_at_random);
            let TcpTarget {
                service,
                port,
                subset,
            } = tcp_target(state, service, dst.port(), routed);
            let subset = subset.map(|(_, labels)| labels);
            let no_endpoint = || ProxyError::NoEndpoint {
                service: service.key.to_string(),
                port,
            };
            let candidates = service_endpoints(state, service, port, dst.ip(), subset)
                .ok_or_else(no_endpoint)?;
            if candidates.is_empty() {
                return Err(no_endpoint());
            }
            let index = {
                let mut next = self.next.lock();
                let slot = next.entry((service.key.clone(), port)).or_default();
                let index = *slot % candidates.len();
                *slot = slot.wrapping_add(1);
                index
            };
            let (endpoint, addr) = candidates[index];
            return Ok(Upstream::Service {
                service: service.key.clone(),
                endpoint: endpoint.clone(),
                addr,
            });
        }
        if let Some(workload) = state.workload_by_ip(dst.ip()) {
            return Ok(Upstream::Workload {
                workload: workload.key.clone(),
                addr: dst,
            });
        }
        Ok(Upstream::Passthrough(dst))
    }
}

#[cfg(test)]
mod tests;
