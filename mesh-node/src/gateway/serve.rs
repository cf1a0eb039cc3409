//! The gateway's listeners: one per port its Gateways declare, opened and closed as the
//! Gateways change; TLS terminated with the certificate of the server the client's SNI
//! names; each request routed by [`Outbound`], as the node proxy routes a pod's.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ::http::{HeaderName, HeaderValue, Request};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    credential,
    resource::{ServerProtocol, TlsMode},
    route::{ServerPlan, server_for},
};
use crate::{
    inventory::ObjectKey,
    proxy::{
        PodContext, ProxyContext,
        http::{self, outbound::Outbound},
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

/// The servers of one port: all plain HTTP, or all terminating TLS.
#[derive(Debug)]
pub struct PortPlan {
    pub tls: bool,
    pub servers: Vec<Arc<ServerPlan>>,
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
        let earlier: HashMap<(&ObjectKey, usize), &Arc<credential::ServerCredential>> = previous
            .ports
            .values()
            .flat_map(|port| &port.servers)
            .filter_map(|server| match &server.tls {
                Some((_, Ok(credential))) => Some(((&server.gateway, server.index), credential)),
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
                let tls = server
                    .tls_mode()
                    .zip(server.tls.as_ref())
                    .map(|(mode, tls)| {
                        let loaded = credential::load(
                            state,
                            &gateway.namespace,
                            tls,
                            mode,
                            earlier.get(&(key, index)).copied(),
                        );
                        (mode, loaded)
                    });
                let planned = Arc::new(ServerPlan {
                    gateway: key.clone(),
                    index,
                    port,
                    hosts: server.server_hosts(),
                    https_redirect: server.tls.as_ref().is_some_and(|t| t.https_redirect),
                    tls,
                });
                if let Some((_, Err(error))) = &planned.tls {
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
                        port_plan.servers[0].name()
                    ));
                    continue;
                }
                port_plan.servers.push(planned);
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
    if !port_plan.tls {
        return serve_http(
            stream,
            peer,
            port,
            port_plan.servers.clone(),
            false,
            gateway,
        )
        .await;
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
        Some(name) => server_for(&port_plan.servers, name),
        None => port_plan
            .servers
            .iter()
            .find(|s| s.hosts.iter().any(|h| h.host == "*")),
    };
    let Some(server) = server else {
        return Err(format!("no server of port {port} serves SNI {sni:?}").into());
    };
    let Some((mode, Ok(credential))) = &server.tls else {
        // Never a certificate it could not load, nor another server's.
        return Err(format!("{} has no certificate to serve", server.name()).into());
    };
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        start.into_stream(credential.config.clone()),
    )
    .await??;
    debug!(%peer, server = %server.name(), mutual = *mode == TlsMode::Mutual, "gateway TLS accepted");
    serve_http(tls, peer, port, vec![server.clone()], true, gateway).await
}

async fn serve_http<S>(
    io: S,
    peer: SocketAddr,
    port: u16,
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
        port,
        dialed,
        parties: Default::default(),
        gateway: Some(servers),
    });
    let client = HeaderValue::from_str(&peer.ip().to_canonical().to_string())
        .expect("an IP address is a header value");
    let proto = HeaderValue::from_static(if over_tls { "https" } else { "http" });
    http::serve_connection(io, &gateway.proxy.drain, move |request| {
        let outbound = outbound.clone();
        let request = forwarded(request, &client, &proto);
        async move { outbound.handle(request).await }
    })
    .await
}

/// The request as the mesh gets it from the edge: the client's address appended to
/// `X-Forwarded-For` (the gateway is the first proxy the mesh trusts: what the client
/// claimed stays, and the last entry is the address the gateway saw), and the scheme the
/// client used in `X-Forwarded-Proto`.
fn forwarded(
    mut request: Request<Incoming>,
    client: &HeaderValue,
    proto: &HeaderValue,
) -> Request<Incoming> {
    let headers = request.headers_mut();
    let chain = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(earlier) if !earlier.is_empty() => {
            let mut chain = earlier.to_vec();
            chain.extend_from_slice(b", ");
            chain.extend_from_slice(client.as_bytes());
            HeaderValue::from_bytes(&chain).unwrap_or_else(|_| client.clone())
        }
        _ => client.clone(),
    };
    headers.insert(X_FORWARDED_FOR, chain);
    headers.insert(X_FORWARDED_PROTO, proto.clone());
    request
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
            for server in &port_plan.servers {
                let routes = state
                    .routes
                    .gateway_hosts()
                    .filter(|(gateway, _)| **gateway == server.gateway)
                    .map(|(_, host)| format!("{} ({})", host.origin, host.hosts.join(", ")))
                    .collect();
                listeners.push(ListenerSummary {
                    port: *port,
                    server: server.name(),
                    protocol: match (&server.tls, server.https_redirect) {
                        (Some((TlsMode::Mutual, _)), _) => "HTTPS (MUTUAL)",
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
                    certificate: server.tls.as_ref().map(|(_, c)| match c {
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
