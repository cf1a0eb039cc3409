//! Where a captured connection goes: a Service's endpoint, a pod, a destination a
//! ServiceEntry names, or where it asked (unless the mesh allows only what it knows).
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use parking_lot::Mutex;

use super::ProxyError;
use crate::{
    egress::OutboundTrafficPolicy,
    inventory::{ObjectKey, Resolution, Service},
    plan::endpoints::{TcpTarget, service_endpoints, tcp_target},
    routing::{Destination, pick_at_random},
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
    /// A destination a ServiceEntry names: where the app asked (resolution NONE), or one
    /// of the entry's endpoints.
    External {
        service: ObjectKey,
        addr: SocketAddr,
    },
    /// A ServiceEntry endpoint (or host) to look up by name first (resolution DNS): see
    /// [`Upstream::looked_up`].
    Lookup {
        service: ObjectKey,
        host: String,
        port: u16,
        /// The family the app dialed, which the answer should have.
        ipv4: bool,
    },
    /// Outside the mesh's knowledge: go where the app asked.
    Passthrough(SocketAddr),
}

impl Upstream {
    /// Where the connection goes; a [`Upstream::Lookup`] not looked up yet has only its port.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Upstream::Service { addr, .. }
            | Upstream::Workload { addr, .. }
            | Upstream::External { addr, .. }
            | Upstream::Passthrough(addr) => *addr,
            Upstream::Lookup { port, ipv4, .. } => {
                let unspecified = if *ipv4 {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                };
                SocketAddr::new(unspecified, *port)
            }
        }
    }

    /// The Service (or ServiceEntry host) it belongs to.
    pub fn service(&self) -> Option<&ObjectKey> {
        match self {
            Upstream::Service { service, .. }
            | Upstream::External { service, .. }
            | Upstream::Lookup { service, .. } => Some(service),
            Upstream::Workload { .. } | Upstream::Passthrough(_) => None,
        }
    }

    /// A [`Upstream::Lookup`] resolved into an address of the family the app dialed (the
    /// first one the system resolver gives); any other upstream as it is.
    pub async fn looked_up(self) -> Result<Upstream, ProxyError> {
        let Upstream::Lookup {
            service,
            host,
            port,
            ipv4,
        } = self
        else {
            return Ok(self);
        };
        let addresses = tokio::net::lookup_host((host.clone(), port))
            .await
            .map_err(|source| ProxyError::Lookup {
                host: host.clone(),
                source,
            })?;
        let mut addresses = addresses.peekable();
        let first = addresses.peek().copied();
        let addr = addresses
            .find(|a| a.is_ipv4() == ipv4)
            .or(first)
            .ok_or_else(|| ProxyError::Lookup {
                host,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            })?;
        Ok(Upstream::External { service, addr })
    }
}

/// Picks upstreams; holds the round-robin positions.
#[derive(Default)]
pub struct Resolver {
    next: Mutex<HashMap<(ObjectKey, u16), usize>>,
    /// What becomes of a connection to a destination the mesh does not know.
    outbound_traffic_policy: OutboundTrafficPolicy,
}

impl Resolver {
    /// Forgets the round-robin positions of Services that `service_exists` no longer knows.
    pub fn prune(&self, service_exists: impl Fn(&ObjectKey) -> bool) {
        self.next
            .lock()
            .retain(|(service, _), _| service_exists(service));
    }

    pub fn new(outbound_traffic_policy: OutboundTrafficPolicy) -> Self {
        Self {
            outbound_traffic_policy,
            ..Self::default()
        }
    }

    /// Where a connection of a pod of `source_namespace` to `dst` goes.
    pub fn resolve(
        &self,
        state: &State,
        source_namespace: &str,
        dst: SocketAddr,
    ) -> Result<Upstream, ProxyError> {
        let service = state
            .service_by_ip(dst.ip())
            .filter(|s| s.visible_to(source_namespace));
        // A ServiceEntry names only the ports it lists; another port of its address is as
        // unknown as any other destination.
        if let Some(service) = service
            && service.external.is_some()
        {
            if service.port(dst.port()).is_some() {
                return self.external(service, dst);
            }
        } else if let Some(service) = service {
            // A VirtualService's `tcp` route may send the connection elsewhere, by weight.
            let routed = state
                .routes
                .tcp_route(&service.key, dst.port())
                .and_then(pick_at_random);
            let target = tcp_target(state, service, dst.port(), routed);
            return self.endpoint(state, target, dst.ip());
        }
        if let Some(workload) = state.workload_by_ip(dst.ip()) {
            return Ok(Upstream::Workload {
                workload: workload.key.clone(),
                addr: dst,
            });
        }
        match self.outbound_traffic_policy {
            OutboundTrafficPolicy::AllowAny => Ok(Upstream::Passthrough(dst)),
            OutboundTrafficPolicy::RegistryOnly => Err(ProxyError::NotRegistered(dst)),
        }
    }

    /// Where a connection a gateway (listening on `port`) routed to `destination` goes, in
    /// the family of `family`.
    pub fn resolve_routed(
        &self,
        state: &State,
        destination: &Destination,
        port: u16,
        family: IpAddr,
    ) -> Result<Upstream, ProxyError> {
        let service = state
            .services
            .get(&destination.service)
            .filter(|s| s.external.is_none())
            .ok_or_else(|| ProxyError::NoEndpoint {
                service: destination.service.to_string(),
                port: destination.port.unwrap_or(port),
            })?;
        let port = crate::plan::gateway::destination_port(service, destination, port);
        let target = tcp_target(state, service, port, Some(destination));
        self.endpoint(state, target, family)
    }

    /// A ready endpoint of `target` in the family of `family`, in turn.
    fn endpoint(
        &self,
        state: &State,
        target: TcpTarget<'_>,
        family: IpAddr,
    ) -> Result<Upstream, ProxyError> {
        let TcpTarget {
            service,
            port,
            subset,
        } = target;
        let subset = subset.map(|(_, labels)| labels);
        let no_endpoint = || ProxyError::NoEndpoint {
            service: service.key.to_string(),
            port,
        };
        let candidates =
            service_endpoints(state, service, port, family, subset).ok_or_else(no_endpoint)?;
        if candidates.is_empty() {
            return Err(no_endpoint());
        }
        let index = self.next_index(&service.key, port, candidates.len());
        let (endpoint, addr) = candidates[index];
        Ok(Upstream::Service {
            service: service.key.clone(),
            endpoint: endpoint.clone(),
            addr,
        })
    }

    /// Where a connection to `dst` that a ServiceEntry host without addresses claimed (by
    /// the request's Host) goes.
    pub fn resolve_entry(&self, entry: &Service, dst: SocketAddr) -> Result<Upstream, ProxyError> {
        self.external(entry, dst)
    }

    /// A destination of a ServiceEntry: where the app asked, or its endpoints in turn.
    fn external(&self, service: &Service, dst: SocketAddr) -> Result<Upstream, ProxyError> {
        let external = service.external.as_ref().expect("a ServiceEntry's Service");
        let port = service.port(dst.port()).ok_or(ProxyError::NoEndpoint {
            service: service.key.to_string(),
            port: dst.port(),
        })?;
        let target_port = match port.target_port {
            crate::inventory::TargetPort::Number(n) => n,
            crate::inventory::TargetPort::Name(_) => port.port,
        };
        let key = service.key.clone();
        let endpoints = &external.endpoints;
        let lookup = |host: &str, port: u16| Upstream::Lookup {
            service: key.clone(),
            host: host.to_owned(),
            port,
            ipv4: dst.is_ipv4(),
        };
        match external.resolution {
            Resolution::None => Ok(Upstream::External {
                service: key,
                addr: dst,
            }),
            Resolution::Dns | Resolution::DnsRoundRobin if endpoints.is_empty() => {
                Ok(lookup(&service.key.name, target_port))
            }
            Resolution::Static | Resolution::Dns | Resolution::DnsRoundRobin => {
                let index = self.next_index(&service.key, dst.port(), endpoints.len());
                let endpoint = &endpoints[index];
                let port = port
                    .name
                    .as_ref()
                    .and_then(|name| endpoint.ports.get(name).copied())
                    .unwrap_or(target_port);
                Ok(match endpoint.address.parse::<IpAddr>() {
                    Ok(ip) => Upstream::External {
                        service: key,
                        addr: SocketAddr::new(ip, port),
                    },
                    Err(_) => lookup(&endpoint.address, port),
                })
            }
        }
    }

    /// The round-robin position of `service`'s `port` among `count` endpoints.
    fn next_index(&self, service: &ObjectKey, port: u16, count: usize) -> usize {
        let mut next = self.next.lock();
        let slot = next.entry((service.clone(), port)).or_default();
        let index = *slot % count;
        *slot = slot.wrapping_add(1);
        index
    }
}

#[cfg(test)]
mod tests;
