//! The gateway's listeners: one per port its Gateways declare, opened and closed as the
//! Gateways change. On a TLS port the ClientHello's SNI picks the server: its TLS is
//! terminated with that server's certificate, or passed through untouched. HTTP requests are
//! routed by [`Outbound`], as the node proxy routes a pod's; TCP connections and passed
//! through TLS by the VirtualServices' `tcp` and `tls` routes, relayed as bytes.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::credential::{self, CredentialError, ServerCredential};
use crate::{
    access_log::Started,
    inventory::ObjectKey,
    plan::{
        admission::{Admission, Caller, check_policy},
        gateway::{
            EXTERNAL_ADDRESS as X_ENVOY_EXTERNAL_ADDRESS, GatewayScope, L4Route, ServerPlan,
            attached_routes, select_passthrough, select_tcp, server_for,
        },
    },
    proxy::{
        PodContext, ProxyContext, ProxyError,
        http::{self, Prefixed, outbound::Outbound},
        outbound::{log_refused, relay_routed},
    },
    routing::{
        GatewayHost,
        gateway::{ServerHost, ServerProtocol, ServerTls, TlsMode},
        gateway_api::KIND as API_GATEWAY_KIND,
    },
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

/// The servers of one port, all of one kind.
#[derive(Debug)]
pub struct PortPlan {
    pub kind: PortKind,
    pub servers: Vec<Server>,
}

/// What a port's connections open with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// Plain HTTP requests.
    Http,
    /// Bytes the gateway cannot read into (plain TCP).
    Tcp,
    /// A TLS ClientHello, whose SNI picks the server (HTTPS and TLS servers).
    Tls,
}

impl PortKind {
    fn of(protocol: ServerProtocol) -> Self {
        match protocol {
            ServerProtocol::Http => PortKind::Http,
            ServerProtocol::Tcp => PortKind::Tcp,
            ServerProtocol::Https | ServerProtocol::Tls => PortKind::Tls,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            PortKind::Http => "plain HTTP",
            PortKind::Tcp => "TCP",
            PortKind::Tls => "TLS",
        }
    }
}

/// A server and, for HTTPS, its certificate or why it cannot be served.
#[derive(Debug)]
pub struct Server {
    pub plan: Arc<ServerPlan>,
    pub credential: Option<Result<Arc<ServerCredential>, CredentialError>>,
}

impl Plan {
    /// The servers of the Istio Gateways that select `gateway` (the gateway's own pod) and
    /// the listeners of the Gateway API Gateways of class `class` in its namespace, with
    /// their certificates from Secrets in that namespace. Certificates whose Secrets did not
    /// change since `previous` are kept as they were.
    pub fn build(state: &State, gateway: &ObjectKey, class: &str, previous: &Plan) -> Plan {
        let mut plan = Plan::default();
        let Some(pod) = state.workloads.get(gateway) else {
            plan.problems
                .push(format!("the gateway's own pod {gateway} is not known yet"));
            return plan;
        };
        let earlier: HashMap<String, &Arc<ServerCredential>> = previous
            .ports
            .values()
            .flat_map(|port| &port.servers)
            .filter_map(|server| match &server.credential {
                Some(Ok(credential)) => Some((server.plan.name(), credential)),
                _ => None,
            })
            .collect();
        let load = |planned: &ServerPlan, tls: &ServerTls, mode: TlsMode| {
            let previous = earlier.get(&planned.name()).copied();
            let http = planned.protocol == ServerProtocol::Https;
            credential::load(state, &gateway.namespace, tls, mode, http, previous)
        };
        for (key, spec) in &state.gateways {
            if !spec.selects(&pod.labels) {
                continue;
            }
            for (index, server) in spec.servers.iter().enumerate() {
                let Ok(protocol) = server.protocol() else {
                    continue;
                };
                let planned = ServerPlan {
                    gateway: key.clone(),
                    index,
                    listener: None,
                    port: u16::try_from(server.port.number).unwrap_or_default(),
                    protocol,
                    hosts: server.server_hosts(),
                    https_redirect: server.tls.as_ref().is_some_and(|t| t.https_redirect),
                    tls: server.tls_mode(),
                };
                let credential = server
                    .tls_mode()
                    .filter(|mode| mode.terminates())
                    .zip(server.tls.as_ref())
                    .map(|(mode, tls)| load(&planned, tls, mode));
                plan.add(planned, credential);
            }
        }
        for (key, spec) in &state.api_gateways {
            if spec.gateway_class_name != class {
                continue;
            }
            if key.namespace != gateway.namespace {
                plan.problems.push(format!(
                    "{API_GATEWAY_KIND} {key}: in namespace {}; this gateway serves those of \
                     its own namespace, {}",
                    key.namespace, gateway.namespace
                ));
                continue;
            }
            for (index, listener) in spec.listeners.iter().enumerate() {
                let Ok(protocol) = listener.protocol() else {
                    continue;
                };
                let hostname = listener.hostname.as_deref().unwrap_or("*");
                let planned = ServerPlan {
                    gateway: key.clone(),
                    index,
                    listener: Some((listener.name.clone(), attached_routes(state, key, listener))),
                    port: u16::try_from(listener.port).unwrap_or_default(),
                    protocol,
                    hosts: ServerHost::parse(hostname).into_iter().collect(),
                    https_redirect: false,
                    tls: protocol.is_tls().then(|| {
                        if listener.passthrough() {
                            TlsMode::Passthrough
                        } else {
                            TlsMode::Simple
                        }
                    }),
                };
                let credential = listener.certificate().map(|reference| {
                    if reference
                        .namespace
                        .as_deref()
                        .is_some_and(|ns| ns != key.namespace)
                    {
                        return Err(format!(
                            "certificateRefs to Secret {}/{}: another namespace's Secret \
                             needs a ReferenceGrant, which is not supported",
                            reference.namespace.as_deref().unwrap_or_default(),
                            reference.name
                        ));
                    }
                    let tls = ServerTls {
                        credential_name: Some(reference.name.clone()),
                        ..ServerTls::default()
                    };
                    load(&planned, &tls, TlsMode::Simple)
                });
                plan.add(planned, credential);
            }
        }
        plan
    }

    /// Adds a server to its port, unless the port serves another kind of connection.
    fn add(
        &mut self,
        planned: ServerPlan,
        credential: Option<Result<Arc<ServerCredential>, CredentialError>>,
    ) {
        if let Some(Err(error)) = &credential {
            self.problems.push(format!(
                "{}: {error}; its hosts get no TLS handshake until fixed",
                planned.name()
            ));
        }
        let (port, kind) = (planned.port, PortKind::of(planned.protocol));
        let port_plan = self.ports.entry(port).or_insert_with(|| PortPlan {
            kind,
            servers: Vec::new(),
        });
        if port_plan.kind != kind {
            self.problems.push(format!(
                "{}: port {port} already serves {} (from {}); this server is not served",
                planned.name(),
                port_plan.kind.describe(),
                port_plan.servers[0].plan.name()
            ));
            return;
        }
        port_plan.servers.push(Server {
            plan: Arc::new(planned),
            credential,
        });
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

/// Serves one client connection on `port`, as the kind of its port says.
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
    // A dual-stack listener reports IPv4 as IPv4-mapped IPv6: the endpoints and the policies
    // know the IPv4 address.
    let local = stream.local_addr()?;
    let connection = Connection {
        peer,
        local: SocketAddr::new(local.ip().to_canonical(), local.port()),
        port,
        started: Started::now(),
    };
    let plans = || port_plan.servers.iter().map(|s| s.plan.clone()).collect();
    match port_plan.kind {
        PortKind::Http => serve_http(stream, &connection, plans(), false, gateway).await,
        PortKind::Tcp => Ok(serve_tcp(stream, &connection, &plans(), &gateway).await?),
        PortKind::Tls => serve_tls(stream, &connection, port_plan, gateway).await,
    }
}

/// One connection the gateway accepted.
struct Connection {
    peer: SocketAddr,
    /// The gateway's address the client connected to.
    local: SocketAddr,
    port: u16,
    started: Started,
}

impl Connection {
    /// What the connection is routed and admitted by, when `servers` serve it.
    fn scope(&self, servers: Vec<Arc<ServerPlan>>) -> GatewayScope {
        GatewayScope {
            servers,
            client: self.client(),
            local: self.local,
        }
    }

    fn client(&self) -> Caller {
        Caller::new(self.peer.ip().to_canonical(), None)
    }
}

/// A connection on a TLS port: the server its SNI names passes it through, or terminates
/// its TLS and serves what is inside.
async fn serve_tls(
    stream: TcpStream,
    connection: &Connection,
    port_plan: &PortPlan,
    gateway: Gateway,
) -> Result<(), http::BoxError> {
    let (stream, sni) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, read_client_hello(stream)).await??;
    // Without SNI only a server for every host (`*`) may answer, as Envoy's filter chains.
    let server = match &sni {
        Some(name) => server_for(&port_plan.servers, |s| &s.plan, name),
        None => port_plan
            .servers
            .iter()
            .find(|s| s.plan.hosts.iter().any(|h| h.host == "*")),
    };
    let Some(server) = server else {
        let port = connection.port;
        return Err(format!("no server of port {port} serves SNI {sni:?}").into());
    };
    if server.plan.tls == Some(TlsMode::Passthrough) {
        let Some(sni) = sni else {
            return Err(format!(
                "{}: PASSTHROUGH routes by SNI; none sent",
                server.plan.name()
            )
            .into());
        };
        return Ok(relay(stream, connection, &gateway, |state| {
            select_passthrough(state, &server.plan, connection.port, &sni)
        })
        .await?);
    }
    let Some(Ok(credential)) = &server.credential else {
        // Never a certificate it could not load, nor another server's.
        return Err(format!("{} has no certificate to serve", server.plan.name()).into());
    };
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
            .await?
            .into_stream(credential.config.clone())
            .await
    })
    .await??;
    debug!(peer = %connection.peer, server = %server.plan.name(), "gateway TLS accepted");
    let servers = vec![server.plan.clone()];
    if server.plan.protocol == ServerProtocol::Https {
        serve_http(tls, connection, servers, true, gateway).await
    } else {
        Ok(serve_tcp(tls, connection, &servers, &gateway).await?)
    }
}

/// Reads from `stream` until a whole TLS ClientHello has arrived: the stream with what was
/// read put back in front (to be terminated or passed on untouched), and the name it asks
/// for (SNI), lower case.
async fn read_client_hello(
    mut stream: TcpStream,
) -> Result<(Prefixed<TcpStream>, Option<String>), http::BoxError> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err("the client closed before its ClientHello".into());
        }
        seen.extend_from_slice(&chunk[..read]);
        let mut unread = &chunk[..read];
        while !unread.is_empty() {
            acceptor.read_tls(&mut unread)?;
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let sni = accepted
                    .client_hello()
                    .server_name()
                    .map(str::to_ascii_lowercase);
                return Ok((Prefixed::new(Bytes::from(seen), stream), sni));
            }
            Err((error, _)) => return Err(format!("not a TLS ClientHello: {error}").into()),
        }
    }
}

/// A connection on a TCP port, or inside TLS the gateway terminated for a TLS server:
/// routed by the `tcp` routes bound to `servers`.
async fn serve_tcp<S>(
    io: S,
    connection: &Connection,
    servers: &[Arc<ServerPlan>],
    gateway: &Gateway,
) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    relay(io, connection, gateway, |state| {
        select_tcp(state, servers, connection.port)
    })
    .await
}

/// Admits a connection by the gateway's AuthorizationPolicies and relays it where `route`
/// sends it; a refusal is logged as the node proxy logs its own.
async fn relay<S>(
    io: S,
    connection: &Connection,
    gateway: &Gateway,
    route: impl FnOnce(&State) -> Option<L4Route>,
) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let state = gateway.proxy.state.borrow().clone();
    let routed = admit_connection(&state, gateway, connection).and_then(|()| {
        let route = route(&state).ok_or(ProxyError::NoRoute)?;
        debug!(peer = %connection.peer, route = route.origin, "gateway connection routed");
        route.pick().cloned().ok_or(ProxyError::NoRoute)
    });
    let result = match routed {
        Ok(destination) => {
            relay_routed(
                io,
                connection.local,
                &destination,
                &gateway.pod,
                &gateway.proxy,
            )
            .await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = &result {
        log_refused(
            &gateway.proxy,
            &gateway.pod,
            Some(connection.local),
            connection.started,
            error,
        );
    }
    result
}

/// The AuthorizationPolicies that select the gateway, for a connection it cannot read
/// requests from: judged when it opens, so rules that need request attributes fail closed.
/// (PeerAuthentication is not asked: the gateway's clients are outside the mesh.)
fn admit_connection(
    state: &State,
    gateway: &Gateway,
    connection: &Connection,
) -> Result<(), ProxyError> {
    let workload = state.workload_or_unknown(&gateway.pod.key);
    let client = connection.client();
    Ok(check_policy(
        &state.policies,
        &workload,
        &client.attributes(connection.local),
        true,
        Admission::Full,
    )?)
}

async fn serve_http<S>(
    io: S,
    connection: &Connection,
    servers: Vec<Arc<ServerPlan>>,
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
        port: connection.port,
        dialed,
        parties: Default::default(),
        gateway: Some(connection.scope(servers)),
    });
    let peer = HeaderValue::from_str(&connection.peer.ip().to_canonical().to_string())
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

/// `HTTPS (MUTUAL)`, `TLS (PASSTHROUGH)`, `HTTP (redirect to HTTPS)`, `TCP`...
fn describe_server(server: &ServerPlan) -> String {
    let protocol = match server.protocol {
        ServerProtocol::Http => "HTTP",
        ServerProtocol::Https => "HTTPS",
        ServerProtocol::Tls => "TLS",
        ServerProtocol::Tcp => "TCP",
    };
    match (server.tls, server.https_redirect) {
        (Some(TlsMode::Simple), _) if server.protocol == ServerProtocol::Https => {
            protocol.to_string()
        }
        (Some(mode), _) => {
            let mode = match mode {
                TlsMode::Simple => "SIMPLE",
                TlsMode::Mutual => "MUTUAL",
                TlsMode::Passthrough => "PASSTHROUGH",
            };
            format!("{protocol} ({mode})")
        }
        (None, true) => format!("{protocol} (redirect to HTTPS)"),
        (None, false) => protocol.to_string(),
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
    pub protocol: String,
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
                let describe =
                    |host: &GatewayHost| format!("{} ({})", host.origin, host.hosts.join(", "));
                let routes = match &server.listener {
                    Some((_, attached)) => attached.iter().map(describe).collect(),
                    None => state
                        .routes
                        .gateway_hosts()
                        .filter(|(gateway, _)| **gateway == server.gateway)
                        .map(|(_, host)| describe(host))
                        .collect(),
                };
                listeners.push(ListenerSummary {
                    port: *port,
                    server: server.name(),
                    protocol: describe_server(server),
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
