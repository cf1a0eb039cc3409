//! `debug explain` at a gateway (`mesh-node gateway`): what it does with a request (or a
//! connection) from a client outside the mesh, at one of its ports, for a host. The
//! gateway's own policies, then the server of the port that serves the host, its route
//! (VirtualService or Gateway API route), and every endpoint, judged as for a pod's request.
use std::net::Ipv4Addr;

use super::*;
use crate::{
    plan::gateway::{self, L4Route, Selected, ServerPlan, select_passthrough, select_tcp},
    routing::{
        gateway::{ServerProtocol, TlsMode},
        host::request_host_name,
    },
};

/// The servers of each port of the gateway, as it serves them.
pub type GatewayPorts = BTreeMap<u16, Vec<Arc<ServerPlan>>>;

/// Explains `request` arriving at the gateway pod `gateway`, which serves `ports`. Its
/// `source` is the client's IP address and its `destination` the host it asks for.
pub fn explain_at_gateway(
    state: &State,
    agent: Agent<'_>,
    request: &ExplainRequest,
    gateway: &ObjectKey,
    ports: &GatewayPorts,
) -> Result<Explanation, ExplainError> {
    let source = state
        .workloads
        .get(gateway)
        .ok_or_else(|| ExplainError::UnknownSource(gateway.clone()))?;
    let client_ip: IpAddr = request.source.parse().map_err(|_| {
        ExplainError::invalid(
            "source",
            &request.source,
            "at a gateway, the source is the client's IP address",
        )
    })?;
    let port = match (request.port, ports.keys().collect::<Vec<_>>().as_slice()) {
        (Some(port), _) => port,
        (None, [only]) => **only,
        (None, listening) => {
            return Err(ExplainError::PortNeeded {
                destination: "the gateway".into(),
                ports: format!(
                    "ports {}",
                    listening
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    };
    let mut client = Client::new(source, agent, request, Some(port))?;
    // The gateway does its own mutual TLS: its requests leave as its identity.
    client.captured = true;
    client.identity = agent
        .trust_domain
        .and_then(|td| workload_identity(td, source).ok());
    let mut explainer = Explainer::new(state, source, agent, client);
    let local = SocketAddr::new(
        source
            .ips
            .first()
            .copied()
            .unwrap_or(Ipv4Addr::UNSPECIFIED.into()),
        port,
    );
    let caller = Caller::new(client_ip, None);
    let path = explainer.at_gateway(ports.get(&port), &caller, local, &request.destination);
    Ok(Explanation {
        source: SourcePod {
            pod: format!("client {client_ip} via gateway {gateway}"),
            node: source.node.clone(),
            ips: source.ips.clone(),
            enrolled: source.enrolled,
            identity: explainer.client.identity.as_ref().map(ToString::to_string),
        },
        destination: format!("host {} at the gateway", request.destination),
        address: Some(local),
        protocol: path.protocol,
        request: path.request,
        route: path.route,
        backends: path.backends,
        notes: explainer.notes,
        verdict: path.verdict,
    })
}

impl Explainer<'_> {
    /// The port's servers (`None`: it listens on no such port) for a request to `host` of
    /// `caller`, arriving at `local`.
    fn at_gateway(
        &mut self,
        servers: Option<&Vec<Arc<ServerPlan>>>,
        caller: &Caller,
        local: SocketAddr,
        host: &str,
    ) -> Path {
        let port = local.port();
        let Some(first) = servers.and_then(|s| s.first()) else {
            let why = format!(
                "the gateway does not listen on port {port}: no Gateway server or listener of \
                 it declares the port"
            );
            return Path::ends("-".into(), "-".into(), Outcome::Unroutable { why });
        };
        let servers = servers.map(Vec::as_slice).unwrap_or_default();
        if first.protocol == ServerProtocol::Tcp {
            let routed = select_tcp(self.state, servers, port);
            return self.gateway_l4("TCP: a TCP server".into(), routed, caller, local);
        }
        if !first.is_tls() {
            return self.gateway_http("HTTP: a plain HTTP server".into(), servers, caller, local);
        }
        let name = request_host_name(host);
        let Some(server) = gateway::server_for(servers, |s| s, &name) else {
            let why = format!(
                "no server of port {port} serves SNI {name}: the gateway completes no TLS \
                 handshake"
            );
            return Path::ends("TLS".into(), "-".into(), Outcome::Unroutable { why });
        };
        self.notes
            .push(format!("SNI {name} picks {}", server.name()));
        match (server.tls, server.protocol) {
            (Some(TlsMode::Passthrough), _) => {
                let routed = select_passthrough(self.state, server, port, &name);
                let protocol = "TLS passed through, routed by SNI".to_string();
                self.gateway_l4(protocol, routed, caller, local)
            }
            (_, ServerProtocol::Https) => {
                let protocol = "HTTP: HTTPS the gateway terminates".to_string();
                self.gateway_http(protocol, std::slice::from_ref(server), caller, local)
            }
            _ => {
                let routed = select_tcp(self.state, std::slice::from_ref(server), port);
                let protocol = "TCP: TLS the gateway terminates".to_string();
                self.gateway_l4(protocol, routed, caller, local)
            }
        }
    }

    /// A request at an HTTP server: the gateway's RequestAuthentications and
    /// AuthorizationPolicies, then its route.
    fn gateway_http(
        &mut self,
        protocol: String,
        servers: &[Arc<ServerPlan>],
        caller: &Caller,
        local: SocketAddr,
    ) -> Path {
        let request = Some(self.client.request_line());
        let ends = |route: &str, verdict| Path {
            request: request.clone(),
            ..Path::ends(protocol.clone(), route.into(), verdict)
        };
        if let Err((outcome, detail)) =
            self.judge_request(self.source, caller, local, &self.client.parts)
        {
            self.notes.push(format!("at the gateway: {detail}"));
            return ends("-", outcome);
        }
        let head = RequestHead::of_parts(&self.client.parts);
        let selected =
            gateway::select(self.state, servers, local.port(), &self.source.labels, head);
        let (rule, matched_prefix) = match selected {
            Selected::Redirect(location) => {
                self.notes
                    .push(format!("the gateway answers 301, to {location}"));
                return ends("httpsRedirect", Outcome::Allowed);
            }
            Selected::Route {
                matched:
                    RouteMatch::Rule {
                        rule,
                        matched_prefix,
                    },
                ..
            } => (rule, matched_prefix),
            Selected::Route { .. } | Selected::NoRoute => {
                let why = format!(
                    "no VirtualService or route bound to the server that serves this host \
                     matches {}: the gateway answers 404 (NR)",
                    self.client.request_line()
                );
                return ends("none matches", Outcome::Unroutable { why });
            }
        };
        let (route, routed) = self.follow_rule(rule, matched_prefix, local.port(), local.ip());
        match routed {
            Ok(backends) => Path::through(protocol, request, route, backends),
            Err(verdict) => ends(&route, verdict),
        }
    }

    /// A connection relayed whole (TCP, TLS passed through or terminated): the gateway's
    /// AuthorizationPolicies when it opens, then its `tcp` or `tls` route.
    fn gateway_l4(
        &mut self,
        protocol: String,
        routed: Option<L4Route>,
        caller: &Caller,
        local: SocketAddr,
    ) -> Path {
        let policies = &self.state.policies;
        let attributes = caller.attributes(local);
        // As at the gateway: its clients are outside the mesh, so no PeerAuthentication.
        if check_policy(policies, self.source, &attributes, true, Admission::Full).is_err() {
            let verdict = policies.authorize(self.source, &attributes);
            let outcome = denial(policies, self.source, verdict, &attributes, None);
            self.notes
                .push("at the gateway: the connection is closed".into());
            return Path::ends(protocol, "-".into(), outcome);
        }
        let Some(routed) = routed.filter(|r| total_weight(&r.route) > 0) else {
            let why = "no tcp or tls route bound to the server takes the connection: the \
                       gateway closes it (NR)"
                .to_string();
            return Path::ends(protocol, "none".into(), Outcome::Unroutable { why });
        };
        let total = total_weight(&routed.route);
        let backends = routed
            .route
            .iter()
            .filter(|d| d.weight > 0)
            .map(|d| {
                let share = share(d.weight, total);
                match self.state.services.get(&d.destination.service) {
                    Some(service) => {
                        let port = gateway::destination_port(service, &d.destination, local.port());
                        let target = tcp_target(self.state, service, port, Some(&d.destination));
                        self.backend(
                            target.service,
                            target.subset,
                            target.port,
                            share,
                            local.ip(),
                            None,
                        )
                    }
                    None => Backend {
                        target: format!("Service {}", d.destination.service),
                        subset: d.destination.subset.clone(),
                        port: d.destination.port.unwrap_or(local.port()),
                        share_percent: share,
                        endpoints: Vec::new(),
                        unroutable: Some(format!(
                            "no Service {}: the connection is closed (no_endpoint)",
                            d.destination.service
                        )),
                    },
                }
            })
            .collect();
        Path::through(protocol, None, routed.origin, backends)
    }
}
