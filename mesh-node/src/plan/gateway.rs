//! Which route a request arriving at a gateway (`mesh-node gateway`) takes: the server of
//! its port that serves its host, then the VirtualService bound to that server's Gateway
//! for the host, or the HTTPRoutes attached to that Gateway API listener.
//!
//! A route attaches to a Gateway API listener as the Gateway API says: a `parentRefs`
//! entry names the Gateway (and the listener by `sectionName` or `port`, or none), the
//! listener allows the route's kind and namespace (`allowedRoutes`), and their host names
//! intersect. Each route's `parentRefs` entry that does not attach gets the reason the
//! Gateway API names, for its status.
use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use http::header;

use super::{admission::Caller, request::RequestHead};
use crate::{
    inventory::{Labels, ObjectKey, Service},
    routing::{
        ApiRoute, Destination, GatewayHost, RequestInfo, RouteMatch, WeightedDestination,
        gateway::{ServerHost, ServerProtocol, TlsMode},
        gateway_api::Listener,
        host,
        http_route::GatewayParent,
        most_specific_host, pick_at_random,
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

/// One server of a Gateway (or listener of a Gateway API Gateway), as the gateway serves it.
#[derive(Debug)]
pub struct ServerPlan {
    /// The Gateway that declares it.
    pub gateway: ObjectKey,
    /// Its place in the Gateway's `servers` or `listeners`, for messages.
    pub index: usize,
    /// A Gateway API listener's name, and the routes attached to it by host name; `None`
    /// for an Istio server, which VirtualServices bind to.
    pub listener: Option<(String, Vec<GatewayHost>)>,
    pub port: u16,
    pub protocol: ServerProtocol,
    pub hosts: Vec<ServerHost>,
    pub https_redirect: bool,
    /// What it does with TLS; `None` for plain HTTP and TCP.
    pub tls: Option<TlsMode>,
}

impl ServerPlan {
    /// `Gateway ns/name servers[i]`, or `gateway.networking.k8s.io/Gateway ns/name listener
    /// <name>`.
    pub fn name(&self) -> String {
        match &self.listener {
            None => format!("Gateway {} servers[{}]", self.gateway, self.index),
            Some((name, _)) => format!(
                "{} {} listener {name}",
                crate::routing::gateway_api::KIND,
                self.gateway
            ),
        }
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
pub struct L4Route {
    /// What routes it, `VirtualService ns/name` or the routes attached to a listener.
    pub origin: String,
    /// Its destinations, by weight.
    pub route: Vec<WeightedDestination>,
}

impl L4Route {
    fn of(host: &GatewayHost, route: &[WeightedDestination]) -> Self {
        Self {
            origin: host.origin.clone(),
            route: route.to_vec(),
        }
    }

    /// One destination, picked by weight; `None` when every weight is 0.
    pub fn pick(&self) -> Option<&Destination> {
        pick_at_random(&self.route)
    }
}

/// Routes a connection on `port` of a TCP server (or of a TLS server, once the gateway
/// terminated its TLS): the first `tcp` rule for the port of a VirtualService bound to one
/// of `servers` (in order) that the server lets in.
pub fn select_tcp(state: &State, servers: &[Arc<ServerPlan>], port: u16) -> Option<L4Route> {
    servers.iter().find_map(|server| {
        let (host, route) = match &server.listener {
            Some((_, attached)) => attached
                .iter()
                .find_map(|host| Some((host, host.tcp_route(port)?)))?,
            None => state
                .routes
                .gateway_tcp_route(&server.gateway, port, |r| server.admits_route(r))?,
        };
        Some(L4Route::of(host, route))
    })
}

/// Routes a connection whose TLS `server` passes through, by the `sni` its ClientHello
/// asked for: the first `tls` rule for the port and name, of a VirtualService bound to the
/// server's Gateway whose namespace the server lets bind that name.
pub fn select_passthrough(
    state: &State,
    server: &ServerPlan,
    port: u16,
    sni: &str,
) -> Option<L4Route> {
    let (host, route) = match &server.listener {
        Some((_, attached)) => {
            let host = most_specific_host(attached, sni)?;
            (host, host.tls_route(port, sni)?)
        }
        None => state
            .routes
            .gateway_tls_route(&server.gateway, port, sni, |namespace| {
                server.admits(namespace, sni)
            })?,
    };
    Some(L4Route::of(host, route))
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
    servers: &'s [Arc<ServerPlan>],
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
    let host = match &server.listener {
        Some((_, attached)) => most_specific_host(attached, &name),
        None => state
            .routes
            .gateway_host(&server.gateway, &name, |namespace| {
                server.admits(namespace, &name)
            }),
    };
    let Some(host) = host else {
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

/// The port a gateway's route sends a connection to: the destination's, else its
/// Service's only port (Istio's rule: a gateway dialed no port of the Service), else the
/// gateway's own `port`.
pub fn destination_port(service: &Service, destination: &Destination, port: u16) -> u16 {
    match (destination.port, service.ports.as_slice()) {
        (Some(port), _) => port,
        (None, [only]) => only.port,
        (None, _) => port,
    }
}

/// Why a route's `parentRefs` entry did not attach to the Gateway it names (the Gateway API's
/// condition reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotAttached {
    /// No listener of the Gateway has the `sectionName` or `port` it names.
    NoMatchingParent,
    /// The listeners it names do not allow the route's kind or namespace.
    NotAllowedByListeners,
    /// The listeners it names serve none of the route's host names.
    NoMatchingListenerHostname,
}

impl NotAttached {
    pub fn reason(self) -> &'static str {
        match self {
            NotAttached::NoMatchingParent => "NoMatchingParent",
            NotAttached::NotAllowedByListeners => "NotAllowedByListeners",
            NotAttached::NoMatchingListenerHostname => "NoMatchingListenerHostname",
        }
    }
}

/// The host names `route` serves on `listener` (of a Gateway in `gateway_namespace`) through
/// `parent`, or why it does not attach there.
pub fn attachment(
    state: &State,
    route: &ApiRoute,
    parent: &GatewayParent,
    gateway_namespace: &str,
    listener: &Listener,
) -> Result<Vec<String>, NotAttached> {
    let port = u16::try_from(listener.port).unwrap_or_default();
    if !parent.names_listener(&listener.name, port) {
        return Err(NotAttached::NoMatchingParent);
    }
    let allowed = listener.route_kinds().contains(&route.kind)
        && listener.allowed_namespaces().admits(
            &route.namespace,
            state.namespaces.get(&route.namespace),
            gateway_namespace,
        );
    if !allowed {
        return Err(NotAttached::NotAllowedByListeners);
    }
    let listener_host = listener.hostname.as_deref().unwrap_or("*");
    if route.hostnames.is_empty() {
        return Ok(vec![listener_host.to_ascii_lowercase()]);
    }
    let served: Vec<String> = route
        .hostnames
        .iter()
        .filter_map(|name| intersect(listener_host, name))
        .collect();
    if served.is_empty() {
        return Err(NotAttached::NoMatchingListenerHostname);
    }
    Ok(served)
}

/// The host names both patterns cover (the narrower of the two), if any.
fn intersect(listener: &str, route: &str) -> Option<String> {
    let listener = listener.to_ascii_lowercase();
    if host::host_match_specificity(&listener, route).is_some() || listener == route {
        Some(route.to_string())
    } else if host::host_match_specificity(route, &listener).is_some() {
        Some(listener)
    } else {
        None
    }
}

/// Why each `parentRefs` entry of a route that names `gateway` attached or not: the number
/// of its listeners it attached to, or the reason (the closest miss of all listeners).
pub fn parent_attachments<'s>(
    state: &'s State,
    gateway: &ObjectKey,
    listeners: &[Listener],
) -> Vec<(&'s ApiRoute, &'s GatewayParent, Result<usize, NotAttached>)> {
    let mut found = Vec::new();
    for route in state.routes.api_routes() {
        for parent in route.parents.iter().filter(|p| p.gateway == *gateway) {
            let mut attached = 0;
            let mut closest = NotAttached::NoMatchingParent;
            for listener in listeners {
                match attachment(state, route, parent, &gateway.namespace, listener) {
                    Ok(_) => attached += 1,
                    // The later a check fails, the closer the miss.
                    Err(miss) => closest = closest.max_by_progress(miss),
                }
            }
            let result = if attached > 0 {
                Ok(attached)
            } else {
                Err(closest)
            };
            found.push((route, parent, result));
        }
    }
    found
}

impl NotAttached {
    fn max_by_progress(self, other: Self) -> Self {
        let rank = |n: Self| match n {
            NotAttached::NoMatchingParent => 0,
            NotAttached::NotAllowedByListeners => 1,
            NotAttached::NoMatchingListenerHostname => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// The routes attached to `listener` of `gateway`, merged into one [`GatewayHost`] per host
/// name they serve (routes oldest first, their rules in the Gateway API's precedence).
pub fn attached_routes(
    state: &State,
    gateway: &ObjectKey,
    listener: &Listener,
) -> Vec<GatewayHost> {
    let mut by_host: BTreeMap<String, Vec<&ApiRoute>> = BTreeMap::new();
    for route in state.routes.api_routes() {
        let served = route
            .parents
            .iter()
            .filter(|p| p.gateway == *gateway)
            .filter_map(|p| attachment(state, route, p, &gateway.namespace, listener).ok())
            .flatten();
        for host in served {
            let routes = by_host.entry(host).or_default();
            if !routes.iter().any(|r| std::ptr::eq(*r, route)) {
                routes.push(route);
            }
        }
    }
    by_host
        .iter()
        .map(|(host, routes)| GatewayHost::merged(host, routes))
        .collect()
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
            listener: None,
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
