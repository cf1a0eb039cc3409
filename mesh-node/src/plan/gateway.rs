//! Which route a request arriving at a gateway (`mesh-node gateway`) takes: the server of
//! its port that serves its host, then the VirtualService bound to that server's Gateway
//! for the host.
use std::{net::SocketAddr, sync::Arc};

use http::header;

use super::{admission::Caller, request::RequestHead};
use crate::{
    inventory::{Labels, ObjectKey},
    routing::{
        Destination, GatewayHost, RequestInfo, RouteMatch,
        gateway::{ServerHost, ServerProtocol, TlsMode},
        host, pick_at_random,
    },
    state::State,
};

/// The header a gateway puts the client's address in, as it trusts it (Envoy's
/// `x-envoy-external-address`): `remoteIpBlocks` at the gateway match it.
pub const EXTERNAL_ADDRESS: http::HeaderName =
    http::HeaderName::from_static("x-envoy-external-address");

/// What a connection arriving at the gateway is routed and admitted by.
pub struct GatewayScope {
    /// Every plain HTTP server of the port, or the one server the TLS handshake chose.
    pub servers: Vec<Arc<ServerPlan>>,
    /// The client, for the AuthorizationPolicies that select the gateway.
    pub client: Caller,
    /// The gateway's address the client connected to.
    pub local: SocketAddr,
}

/// One server of a Gateway, as the gateway serves it.
#[derive(Debug)]
pub struct ServerPlan {
    /// The Gateway that declares it.
    pub gateway: ObjectKey,
    /// Its place in the Gateway's `servers`, for messages.
    pub index: usize,
    pub port: u16,
    pub protocol: ServerProtocol,
    pub hosts: Vec<ServerHost>,
    pub https_redirect: bool,
    /// What it does with TLS; `None` for plain HTTP and TCP.
    pub tls: Option<TlsMode>,
}

impl ServerPlan {
    /// `Gateway ns/name servers[i]`.
    pub fn name(&self) -> String {
        format!("Gateway {} servers[{}]", self.gateway, self.index)
    }

    /// How specifically one of its hosts matches `name` (see
    /// [`host::host_match_specificity`]).
    pub fn host_specificity(&self, name: &str) -> Option<usize> {
        self.hosts
            .iter()
            .filter_map(|h| host::host_match_specificity(&h.host, name))
            .max()
    }

    /// Whether routes of `namespace` may bind to one of its hosts that matches `name`.
    fn admits(&self, namespace: &str, name: &str) -> bool {
        self.hosts.iter().any(|h| {
            host::host_match_specificity(&h.host, name).is_some()
                && h.admits(namespace, &self.gateway.namespace)
        })
    }

    /// Whether `route` may carry its connections: its namespace may bind to one of the
    /// server's hosts, and one of its hosts and that one cover each other (`*` covers all).
    fn admits_route(&self, route: &GatewayHost) -> bool {
        let overlap = |a: &str, b: &str| {
            host::host_match_specificity(a, b).is_some()
                || host::host_match_specificity(b, a).is_some()
        };
        self.hosts.iter().any(|h| {
            h.admits(&route.namespace, &self.gateway.namespace)
                && route.hosts.iter().any(|name| overlap(&h.host, name))
        })
    }

    /// Whether it takes connections that open with a TLS ClientHello.
    pub fn is_tls(&self) -> bool {
        self.protocol.is_tls()
    }
}

/// Where a connection (not HTTP requests) at the gateway goes.
#[derive(Debug)]
pub struct L4Route<'s> {
    /// The VirtualService that routes it, `VirtualService ns/name`.
    pub origin: &'s str,
    /// The destination picked by weight; `None` when every weight is 0.
    pub destination: Option<&'s Destination>,
}

/// Routes a connection on `port` of a TCP server (or of a TLS server, once the gateway
/// terminated its TLS): the first `tcp` rule for the port of a VirtualService bound to one
/// of `servers` (in order) that the server lets in.
pub fn select_tcp<'s>(
    state: &'s State,
    servers: &[Arc<ServerPlan>],
    port: u16,
) -> Option<L4Route<'s>> {
    servers.iter().find_map(|server| {
        let (host, route) = state
            .routes
            .gateway_tcp_route(&server.gateway, port, |r| server.admits_route(r))?;
        Some(L4Route {
            origin: &host.origin,
            destination: pick_at_random(route),
        })
    })
}

/// Routes a connection whose TLS `server` passes through, by the `sni` its ClientHello
/// asked for: the first `tls` rule for the port and name, of a VirtualService bound to the
/// server's Gateway whose namespace the server lets bind that name.
pub fn select_passthrough<'s>(
    state: &'s State,
    server: &ServerPlan,
    port: u16,
    sni: &str,
) -> Option<L4Route<'s>> {
    let (host, route) =
        state
            .routes
            .gateway_tls_route(&server.gateway, port, sni, |namespace| {
                server.admits(namespace, sni)
            })?;
    Some(L4Route {
        origin: &host.origin,
        destination: pick_at_random(route),
    })
}

/// The server among `servers` (each `plan`'s) that serves `name` (the most specific host;
/// the first of equals).
pub fn server_for<'a, T>(
    servers: &'a [T],
    plan: impl Fn(&T) -> &ServerPlan,
    name: &str,
) -> Option<&'a T> {
    let mut best: Option<(usize, &T)> = None;
    for server in servers {
        if let Some(specificity) = plan(server).host_specificity(name)
            && best.is_none_or(|(b, _)| specificity > b)
        {
            best = Some((specificity, server));
        }
    }
    best.map(|(_, server)| server)
}

/// Where a request at the gateway goes.
pub enum Selected<'s> {
    /// The server asks for HTTPS: the client is sent there (301 to this location).
    Redirect(String),
    /// The VirtualService for its host, and its rule for the request.
    Route {
        host: &'s GatewayHost,
        matched: RouteMatch<'s>,
    },
    /// No server of the port serves the host, or no VirtualService of its Gateway does.
    NoRoute,
}

/// Routes `request` that arrived on a connection served by `servers` (every plain HTTP
/// server of its port, or the one server its TLS handshake chose). `gateway_labels` are
/// the gateway pod's (a match's `sourceLabels` reads them).
pub fn select<'s>(
    state: &'s State,
    servers: &[Arc<ServerPlan>],
    port: u16,
    gateway_labels: &Labels,
    request: RequestHead<'_>,
) -> Selected<'s> {
    let authority = request
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            request
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default();
    let name = host::request_host_name(authority);
    let Some(server) = server_for(servers, |s| s, &name) else {
        return Selected::NoRoute;
    };
    if server.https_redirect {
        return Selected::Redirect(https_location(authority, request));
    }
    let Some(host) = state
        .routes
        .gateway_host(&server.gateway, &name, |namespace| {
            server.admits(namespace, &name)
        })
    else {
        return Selected::NoRoute;
    };
    let matched = host.match_request(&RequestInfo {
        method: request.method,
        uri: request.uri,
        headers: request.headers,
        port,
        source_labels: gateway_labels,
    });
    Selected::Route { host, matched }
}

/// The same host (without its port: HTTPS has its own) and path, over HTTPS.
fn https_location(authority: &str, request: RequestHead<'_>) -> String {
    let host_only = match authority.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => authority,
    };
    let path = request.uri.path_and_query().map_or("/", |pq| pq.as_str());
    format!("https://{host_only}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(gateway: &str, hosts: &[&str], redirect: bool) -> Arc<ServerPlan> {
        Arc::new(ServerPlan {
            gateway: ObjectKey::new("istio-system", gateway),
            index: 0,
            port: 80,
            protocol: ServerProtocol::Http,
            hosts: hosts
                .iter()
                .map(|h| ServerHost::parse(h).unwrap())
                .collect(),
            https_redirect: redirect,
            tls: None,
        })
    }

    #[test]
    fn the_most_specific_server_serves_a_host() {
        let servers = vec![
            server("any", &["*"], false),
            server("wild", &["*.example.com"], false),
            server("exact", &["bookinfo/api.example.com"], false),
        ];
        let gateway =
            |name: &str| server_for(&servers, |s| s, name).map(|s| s.gateway.name.clone());
        assert_eq!(gateway("api.example.com").as_deref(), Some("exact"));
        assert_eq!(gateway("www.example.com").as_deref(), Some("wild"));
        assert_eq!(gateway("example.org").as_deref(), Some("any"));
        assert!(servers[2].admits("bookinfo", "api.example.com"));
        assert!(!servers[2].admits("default", "api.example.com"));
    }

    #[test]
    fn an_https_redirect_keeps_host_and_path_and_drops_the_port() {
        let request = http::Request::get("/status/200?x=1")
            .header("host", "api.example.com:8080")
            .body(())
            .unwrap();
        let servers = vec![server("gw", &["*"], true)];
        let state = State::default();
        let Selected::Redirect(location) = select(
            &state,
            &servers,
            80,
            &Labels::new(),
            RequestHead::of(&request),
        ) else {
            panic!("no redirect");
        };
        assert_eq!(location, "https://api.example.com/status/200?x=1");
    }
}
