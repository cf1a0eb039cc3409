//! Where a captured connection goes: a Service's endpoint, a pod, or where it asked.
use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

use super::ProxyError;
use crate::state::{ObjectKey, State, TargetPort};

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
    pub fn resolve(&self, state: &State, dst: SocketAddr) -> Result<Upstream, ProxyError> {
        if let Some(service) = state.service_by_ip(dst.ip()) {
            let no_endpoint = || ProxyError::NoEndpoint {
                service: service.key.to_string(),
                port: dst.port(),
            };
            let port = service.port(dst.port()).ok_or_else(no_endpoint)?;
            // Endpoints that can serve this port in the destination's address family.
            let candidates: Vec<(ObjectKey, SocketAddr)> = service
                .endpoints
                .iter()
                .filter_map(|key| state.workloads.get(key))
                .filter_map(|w| {
                    let ip = w.ip_like(dst.ip())?;
                    let target = match &port.target_port {
                        TargetPort::Number(n) => *n,
                        TargetPort::Name(name) => *w.named_ports.get(name)?,
                    };
                    Some((w.key.clone(), SocketAddr::new(ip, target)))
                })
                .collect();
            if candidates.is_empty() {
                return Err(no_endpoint());
            }
            let index = {
                let mut next = self.next.lock().expect("round robin lock");
                let slot = next.entry((service.key.clone(), dst.port())).or_default();
                let index = *slot % candidates.len();
                *slot = slot.wrapping_add(1);
                index
            };
            let (endpoint, addr) = candidates[index].clone();
            return Ok(Upstream::Service {
                service: service.key.clone(),
                endpoint,
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
