//! The gateway's listeners: one per port its Gateways declare, opened and closed as the
//! Gateways change; TLS terminated with the certificate of the server the client's SNI
//! names; each request routed by [`Outbound`], as the node proxy routes a pod's.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ::http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::credential::{self, CredentialError, ServerCredential};
use crate::{
    inventory::ObjectKey,
    plan::{
        admission::Caller,
        gateway::{
            EXTERNAL_ADDRESS as X_ENVOY_EXTERNAL_ADDRESS, GatewayScope, ServerPlan, server_for,
        },
    },
    proxy::{
        PodContext, ProxyContext,
        http::{self, outbound::Outbound},
    },
    routing::gateway::{ServerProtocol, TlsMode},
    state::State,
};

/// How long a client may take to send its TLS ClientHello and finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// What the gateway serves, from the Gateways that select its pod.
#[derive(Debug, Default)]
pub struct Plan {
    pub ports: BTreeMap<u16, PortPlan>,
    /// Servers that cannot be served as written, with why (a missing Secret, a port both
    /// plain and TLS): logged, and shown by `debug gateways`.
    pub problems: Vec<String>,
}

/// The servers of one port: all plain HTTP, or all terminating TLS.
#[derive(Debug)]
pub struct PortPlan {
    pub tls: bool,
    pub servers: Vec<Server>,
}

/// A server and, for HTTPS, its certificate or why it cannot be served.
#[derive(Debug)]
pub struct Server {
    pub plan: Arc<ServerPlan>,
    pub credential: Option<Result<Arc<ServerCredential>, CredentialError>>,
}

impl Plan {
    /// The servers of the Gateways that select `gateway` (the gateway's own pod), with
    /// their certificates from Secrets in its namespace. Certificates whose Secrets did not
    /// change since `previous` are kept as they were.
    pub fn build(state: &State, gateway: &ObjectKey, previous: &Plan) -> Plan {
        let mut plan = Plan::default();
        let Some(pod) = state.workloads.get(gateway) else {
            plan.problems
                .push(format!("the gateway's own pod {gateway} is not known yet"));
            return plan;
        };
        let earlier: HashMap<(&ObjectKey, usize), &Arc<ServerCredential>> = previous
            .ports
            .values()
            .flat_map(|port| &port.servers)
            .filter_map(|server| match &server.credential {
                Some(Ok(credential)) => {
                    Some(((&server.plan.gateway, server.plan.index), credential))
                }
                _ => None,
            })
            .collect();
        for (key, spec) in &state.gateways {
            if !spec.selects(&pod.labels) {
                continue;
            }
            for (index, server) in spec.servers.iter().enumerate() {
                let Ok(protocol) = server.protocol() else {
                    continue;
                };
                let port = u16::try_from(server.port.number).unwrap_or_default();
                let credential = server
                    .tls_mode()
                    .zip(server.tls.as_ref())
                    .map(|(mode, tls)| {
                        let previous = earlier.get(&(key, index)).copied();
                        credential::load(state, &gateway.namespace, tls, mode, previous)
                    });
                let planned = Arc::new(ServerPlan {
                    gateway: key.clone(),
                    index,
                    port,
                    hosts: server.server_hosts(),
                    https_redirect: server.tls.as_ref().is_some_and(|t| t.https_redirect),
                    tls: server.tls_mode(),
                });
                if let Some(Err(error)) = &credential {
                    plan.problems.push(format!(
                        "{}: {error}; its hosts get no TLS handshake until fixed",
                        planned.name()
                    ));
                }
                let is_tls = protocol == ServerProtocol::Https;
                let port_plan = plan.ports.entry(port).or_insert_with(|| PortPlan {
                    tls: is_tls,
                    servers: Vec::new(),
                });
                if port_plan.tls != is_tls {
                    plan.problems.push(format!(
                        "{}: port {port} already serves {} (from {}); this server is not \
                         served",
                        planned.name(),
                        if port_plan.tls { "HTTPS" } else { "plain HTTP" },
                        port_plan.servers[0].plan.name()
                    ));
                    continue;
                }
                port_plan.servers.push(Server {
                    plan: planned,
                    credential,
                });
            }
        }
        plan
    }
}

/// What every connection the gateway serves needs.
#[derive(Clone)]
pub struct Gateway {
    /// The gateway's own pod: its identity, labels and network namespace.
    pub pod: PodContext,
    pub proxy: ProxyContext,
    /// Cloned by each connection being served, so a drain can wait for them.
    pub in_flight: Arc<()>,
    /// `--num-trusted-proxies`.
    pub trusted_proxies: usize,
}

/// Keeps a listener open for each port of the latest plan until `shutdown`.
pub async fn run(gateway: Gateway, plans: watch::Receiver<Arc<Plan>>, shutdown: CancellationToken) {
    let mut open: BTreeMap<u16, CancellationToken> = BTreeMap::new();
    let mut plans_changed = plans.clone();
    loop {
        let plan = plans_changed.borrow_and_update().clone();
        open.retain(|port, stop| {
            let keep = plan.ports.contains_key(port);
            if !keep {
                info!(port, "gateway port closed: no server uses it any more");
                stop.cancel();
            }
            keep
        });
        for port in plan.ports.keys() {
            if open.contains_key(port) {
                continue;
            }
            match bind(*port) {
                Ok(listener) => {
                    info!(port, "gateway listening");
                    let stop = shutdown.child_token();
                    open.insert(*port, stop.clone());
                    tokio::spawn(accept(
                        listener,
                        *port,
                        gateway.clone(),
                        plans.clone(),
                        stop,
                    ));
                }
                // Tried again at the next change of the plan.
                Err(error) => warn!(port, %error, "gateway port cannot be opened"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = plans_changed.changed() => if changed.is_err() { return },
        }
    }
}

/// Every address of the pod: IPv6 and IPv4 on one socket, IPv4 alone in a pod without IPv6.
fn bind(port: u16) -> std::io::Result<TcpListener> {
    let listen = |socket: tokio::net::TcpSocket, any: IpAddr| {
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(any, port))?;
        socket.listen(1024)
    };
    tokio::net::TcpSocket::new_v6()
        .and_then(|socket| listen(socket, Ipv6Addr::UNSPECIFIED.into()))
        .or_else(|_| {
            listen(
                tokio::net::TcpSocket::new_v4()?,
                Ipv4Addr::UNSPECIFIED.into(),
            )
        })
}

async fn accept(
    listener: TcpListener,
    port: u16,
    gateway: Gateway,
    plans: watch::Receiver<Arc<Plan>>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "gateway accept failed");
                    crate::accept::back_off(&error).await;
                    continue;
                }
            },
        };
        let plan = plans.borrow().clone();
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let _in_flight = gateway.in_flight.clone();
            if let Err(error) = serve(stream, peer, port, &plan, gateway).await {
                debug!(%peer, port, %error, "gateway connection ended");
            }
        });
    }
}

/// Serves one client connection on `port`: TLS first where the port's servers terminate it.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    plan: &Plan,
    gateway: Gateway,
) -> Result<(), http::BoxError> {
    let Some(port_plan) = plan.ports.get(&port) else {
        return Ok(());
    };
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr()?;
    let scope = |servers: Vec<Arc<ServerPlan>>| GatewayScope {
        servers,
        client: Caller::new(peer.ip().to_canonical(), None),
        local,
    };
    if !port_plan.tls {
        let servers = port_plan.servers.iter().map(|s| s.plan.clone()).collect();
        return serve_http(stream, peer, port, scope(servers), false, gateway).await;
    }
    let start = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream),
    )
    .await??;
    let sni = start
        .client_hello()
        .server_name()
        .map(str::to_ascii_lowercase);
    // Without SNI only a server for every host (`*`) may answer, as Envoy's filter chains.
    let server = match &sni {
        Some(name) => server_for(&port_plan.servers, |s| &s.plan, name),
        None => port_plan
            .servers
            .iter()
            .find(|s| s.plan.hosts.iter().any(|h| h.host == "*")),
    };
    let Some(server) = server else {
        return Err(format!("no server of port {port} serves SNI {sni:?}").into());
    };
    let Some(Ok(credential)) = &server.credential else {
        // Never a certificate it could not load, nor another server's.
        return Err(format!("{} has no certificate to serve", server.plan.name()).into());
    };
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        start.into_stream(credential.config.clone()),
    )
    .await??;
    debug!(%peer, server = %server.plan.name(), "gateway TLS accepted");
    serve_http(
        tls,
        peer,
        port,
        scope(vec![server.plan.clone()]),
        true,
        gateway,
    )
    .await
}

async fn serve_http<S>(
    io: S,
    peer: SocketAddr,
    port: u16,
    scope: GatewayScope,
    over_tls: bool,
    gateway: Gateway,
) -> Result<(), http::BoxError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let dialed = gateway
        .pod
        .ips
        .first()
        .copied()
        .unwrap_or(Ipv4Addr::UNSPECIFIED.into());
    let outbound = Arc::new(Outbound {
        pod: gateway.pod.clone(),
        proxy: gateway.proxy.clone(),
        service: gateway.pod.key.clone(),
        port,
        dialed,
        parties: Default::default(),
        gateway: Some(scope),
    });
    let peer = HeaderValue::from_str(&peer.ip().to_canonical().to_string())
        .expect("an IP address is a header value");
    let proto = HeaderValue::from_static(if over_tls { "https" } else { "http" });
    let trusted_proxies = gateway.trusted_proxies;
    http::serve_connection(io, &gateway.proxy.drain, move |mut request| {
        let outbound = outbound.clone();
        forwarded(request.headers_mut(), &peer, &proto, trusted_proxies);
        async move { outbound.handle(request).await }
    })
    .await
}

/// The request's headers as the mesh gets them from the edge, as Envoy sets them at
/// Istio's gateways: `peer` (the address the gateway saw) appended to `X-Forwarded-For`,
/// the client as the gateway trusts it in `X-Envoy-External-Address` (the `trusted_proxies`th
/// address from the right of the `X-Forwarded-For` that arrived, or `peer` when there are no
/// trusted proxies or too few addresses), and the scheme the client used in
/// `X-Forwarded-Proto`.
fn forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    proto: &HeaderValue,
    trusted_proxies: usize,
) {
    let arrived: Vec<String> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    let client = trusted_proxies
        .checked_sub(1)
        .and_then(|hops| arrived.iter().rev().nth(hops))
        .and_then(|address| HeaderValue::from_str(address).ok())
        .unwrap_or_else(|| peer.clone());
    let chain = arrived
        .iter()
        .map(String::as_str)
        .chain(peer.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    headers.insert(
        X_FORWARDED_FOR,
        HeaderValue::from_str(&chain).unwrap_or_else(|_| peer.clone()),
    );
    headers.insert(X_ENVOY_EXTERNAL_ADDRESS, client);
    headers.insert(X_FORWARDED_PROTO, proto.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded_with(arrived: Option<&str>, trusted_proxies: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(arrived) = arrived {
            headers.insert(X_FORWARDED_FOR, HeaderValue::from_str(arrived).unwrap());
        }
        let peer = HeaderValue::from_static("192.0.2.9");
        forwarded(
            &mut headers,
            &peer,
            &HeaderValue::from_static("https"),
            trusted_proxies,
        );
        headers
    }

    #[test]
    fn the_client_is_the_peer_unless_proxies_in_front_are_trusted() {
        let direct = forwarded_with(Some("203.0.113.7"), 0);
        assert_eq!(direct[&X_FORWARDED_FOR], "203.0.113.7, 192.0.2.9");
        assert_eq!(
            direct[&X_ENVOY_EXTERNAL_ADDRESS], "192.0.2.9",
            "a claim is not trusted"
        );
        assert_eq!(direct[&X_FORWARDED_PROTO], "https");
        // One load balancer in front: the address it saw is the client.
        let behind_one = forwarded_with(Some("10.9.9.9, 203.0.113.7"), 1);
        assert_eq!(behind_one[&X_ENVOY_EXTERNAL_ADDRESS], "203.0.113.7");
        let behind_two = forwarded_with(Some("10.9.9.9, 203.0.113.7"), 2);
        assert_eq!(behind_two[&X_ENVOY_EXTERNAL_ADDRESS], "10.9.9.9");
        // Fewer addresses than trusted proxies: nothing to trust but the peer.
        let short = forwarded_with(Some("203.0.113.7"), 3);
        assert_eq!(short[&X_ENVOY_EXTERNAL_ADDRESS], "192.0.2.9");
        let none = forwarded_with(None, 1);
        assert_eq!(none[&X_FORWARDED_FOR], "192.0.2.9");
        assert_eq!(none[&X_ENVOY_EXTERNAL_ADDRESS], "192.0.2.9");
    }
}

/// The plan as `debug gateways` shows it.
#[derive(Debug, Serialize)]
pub struct PlanSummary {
    pub listeners: Vec<ListenerSummary>,
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ListenerSummary {
    pub port: u16,
    pub server: String,
    pub protocol: &'static str,
    pub hosts: Vec<String>,
    pub certificate: Option<String>,
    pub routes: Vec<String>,
}

impl Plan {
    pub fn summary(&self, state: &State) -> PlanSummary {
        let mut listeners = Vec::new();
        for (port, port_plan) in &self.ports {
            for Server {
                plan: server,
                credential,
            } in &port_plan.servers
            {
                let routes = state
                    .routes
                    .gateway_hosts()
                    .filter(|(gateway, _)| **gateway == server.gateway)
                    .map(|(_, host)| format!("{} ({})", host.origin, host.hosts.join(", ")))
                    .collect();
                listeners.push(ListenerSummary {
                    port: *port,
                    server: server.name(),
                    protocol: match (server.tls, server.https_redirect) {
                        (Some(TlsMode::Mutual), _) => "HTTPS (MUTUAL)",
                        (Some(_), _) => "HTTPS",
                        (None, true) => "HTTP (redirect to HTTPS)",
                        (None, false) => "HTTP",
                    },
                    hosts: server
                        .hosts
                        .iter()
                        .map(|h| match &h.namespace {
                            Some(ns) => format!("{ns}/{}", h.host),
                            None => h.host.clone(),
                        })
                        .collect(),
                    certificate: credential.as_ref().map(|c| match c {
                        Ok(credential) => credential.summary.clone(),
                        Err(error) => format!("NOT SERVED: {error}"),
                    }),
                    routes,
                });
            }
        }
        PlanSummary {
            listeners,
            problems: self.problems.clone(),
        }
    }
}
