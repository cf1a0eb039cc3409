//! Whether a connection carries HTTP, as its Service port declares (Istio's protocol
//! selection); the proxy sniffs the first bytes only when nothing is declared.
use crate::{
    inventory::{Service, ServicePort, TargetPort, Workload},
    state::State,
};

/// What a Service port declares it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortProtocol {
    /// HTTP, HTTP/2 or gRPC: parsed without sniffing.
    Http,
    /// Declared as something else (TCP, TLS, a database protocol): relayed at L4.
    Tcp,
    /// Nothing declared: the first bytes decide.
    Undeclared,
}

/// Istio's rule: `appProtocol` first, then the port name's prefix (`http-web`, `grpc`).
pub fn port_protocol(port: &ServicePort) -> PortProtocol {
    const HTTP: &[&str] = &["http", "http2", "grpc", "grpc-web", "kubernetes.io/h2c"];
    const OTHER: &[&str] = &[
        "tcp", "tls", "https", "mongo", "mysql", "redis", "udp", "sctp",
    ];
    if let Some(protocol) = &port.app_protocol {
        return if HTTP.contains(&protocol.to_ascii_lowercase().as_str()) {
            PortProtocol::Http
        } else {
            PortProtocol::Tcp
        };
    }
    let Some(name) = port.name.as_deref().map(str::to_ascii_lowercase) else {
        return PortProtocol::Undeclared;
    };
    let has_prefix = |prefixes: &[&str]| {
        prefixes
            .iter()
            .any(|p| name == *p || name.starts_with(&format!("{p}-")))
    };
    if has_prefix(HTTP) {
        PortProtocol::Http
    } else if has_prefix(OTHER) {
        PortProtocol::Tcp
    } else {
        PortProtocol::Undeclared
    }
}

/// The port of `service` that forwards to `target_port` on `workload`.
pub fn service_port_for_target<'a>(
    service: &'a Service,
    workload: &Workload,
    target_port: u16,
) -> Option<&'a ServicePort> {
    service.ports.iter().find(|p| match &p.target_port {
        TargetPort::Number(n) => *n == target_port,
        TargetPort::Name(name) => workload.named_ports.get(name) == Some(&target_port),
    })
}

/// What the port a connection to `destination` arrived on declares, as the destination's
/// proxy reads it: the port of the Service that forwards to it, if any.
pub fn declared_inbound(state: &State, destination: Option<&Workload>, port: u16) -> PortProtocol {
    destination
        .and_then(|w| state.service_for(w, port).zip(Some(w)))
        .and_then(|(service, workload)| service_port_for_target(service, workload, port))
        .map_or(PortProtocol::Undeclared, port_protocol)
}
