//! The outbound leg: the in-pod 15001 listener, fed by the connect hooks.
use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;
use tracing::debug;

use super::{
    CertificateError, PodContext, ProxyContext, ProxyError, Upstream,
    hbone::H2Stream,
    http::{self, Prefixed},
    originate::originate,
    relay_counted, relay_plain_counted,
    socket::{Dial, connect_from_pod},
};
use crate::{
    access_log::{ConnectionRecord, Entry, Parties, Started},
    metrics::Reporter,
    plan::{
        protocol::{PortProtocol, port_protocol},
        tunnel::tunnel_identities,
    },
    routing::Destination,
    state::State,
};

pub(super) async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
    proxy: &ProxyContext,
) -> Result<(), ProxyError> {
    let started = Started::now();
    let original = proxy
        .capture
        .as_ref()
        .and_then(|capture| capture.take_original_destination(pod.netns_cookie, peer));
    let result = match original {
        Some(original) => proxy_to(client, original, started, pod, proxy).await,
        None => Err(ProxyError::NoOriginalDestination),
    };
    if let Err(error) = &result {
        log_refused(proxy, pod, original, started, error);
    }
    result
}

/// Logs a connection of this pod (or gateway) that the proxy could not serve. An HTTP
/// connection's failures are its requests' business: each has a line of its own.
pub fn log_refused(
    proxy: &ProxyContext,
    pod: &PodContext,
    original: Option<SocketAddr>,
    started: Started,
    error: &ProxyError,
) {
    if !proxy.access_log.is_on() || matches!(error, ProxyError::Http(_)) {
        return;
    }
    let state = proxy.state.borrow().clone();
    let parties = Parties::new(
        Reporter::Source,
        state.workloads.get(&pod.key),
        None,
        original.and_then(|o| state.service_by_ip(o.ip())),
        None,
        original.and_then(|o| pod.ip_like(o.ip())),
    );
    proxy.access_log.log(&Entry::refused_connection(
        &parties,
        &started,
        original,
        error.refusal(),
    ));
}

/// Serves a connection of the pod to `original`, the address it dialed.
async fn proxy_to(
    client: TcpStream,
    original: SocketAddr,
    started: Started,
    pod: &PodContext,
    proxy: &ProxyContext,
) -> Result<(), ProxyError> {
    let state = proxy.state.borrow().clone();
    let _ = client.set_nodelay(true);
    // A Service port that carries HTTP is routed request by request. (A ServiceEntry's
    // destinations are relayed as bytes.)
    let client = if let Some(service) = state.service_by_ip(original.ip())
        && service.external.is_none()
        && let Some(port) = service.port(original.port())
    {
        let (client, is_http) = match port_protocol(port) {
            PortProtocol::Http => (Prefixed::new(Bytes::new(), client), true),
            PortProtocol::Tcp => (Prefixed::new(Bytes::new(), client), false),
            PortProtocol::Undeclared => http::sniff(client).await,
        };
        if is_http {
            debug!(%original, service = %service.key, "outbound HTTP");
            let outbound = Arc::new(http::outbound::Outbound {
                pod: pod.clone(),
                proxy: proxy.clone(),
                service: service.key.clone(),
                port: original.port(),
                dialed: original.ip(),
                parties: Default::default(),
                gateway: None,
            });
            return http::serve_connection(client, &proxy.drain, move |request| {
                outbound.clone().handle(request)
            })
            .await
            .map_err(ProxyError::Http);
        }
        client
    } else if state.service_by_ip(original.ip()).is_none()
        && state.workload_by_ip(original.ip()).is_none()
        && state
            .hosts_on_port(original.port(), &pod.key.namespace)
            .filter_map(|entry| entry.port(original.port()))
            .any(|port| port_protocol(port) == PortProtocol::Http)
    {
        // An address the mesh does not know, on a port ServiceEntry hosts without addresses
        // list as HTTP: the request's Host names the entry (the first request's, for the
        // whole connection). Only then is the client waited for: a protocol where the server
        // speaks first must not wait out the peek.
        let (client, host) = http::peek_host(client).await;
        let entry =
            host.and_then(|host| state.host_on_port(&host, original.port(), &pod.key.namespace));
        if let Some(entry) = entry {
            debug!(%original, host = %entry.key.name, "outbound to a ServiceEntry host");
            let upstream = proxy.resolver.resolve_entry(entry, original)?;
            return relay_l4(client, original, upstream, started, pod, proxy, &state).await;
        }
        client
    } else {
        Prefixed::new(Bytes::new(), client)
    };
    let upstream = proxy
        .resolver
        .resolve(&state, &pod.key.namespace, original)?;
    relay_l4(client, original, upstream, started, pod, proxy, &state).await
}

/// Relays a connection that is not HTTP (or not on an HTTP port) as bytes: to the
/// resolved upstream, through an HBONE tunnel when both ends are in the mesh.
async fn relay_l4(
    mut client: Prefixed<TcpStream>,
    original: SocketAddr,
    upstream: Upstream,
    started: Started,
    pod: &PodContext,
    proxy: &ProxyContext,
    state: &State,
) -> Result<(), ProxyError> {
    let (upstream, connection) =
        open_upstream(original, upstream, started, pod, proxy, state).await?;
    match upstream {
        // Two plain sockets: the kernel moves the bytes (unless the loopback leg is
        // accelerated, which splice would bypass).
        UpstreamStream::Plain(mut stream) if !proxy.loopback_accelerated() => {
            relay_plain_counted(&mut client, &mut stream, &connection, proxy).await;
        }
        upstream => upstream.relay(&mut client, &connection, proxy).await,
    }
    Ok(())
}

/// Relays `client`, a connection a gateway accepted at `local` and routed to
/// `destination`: through an HBONE tunnel as the gateway's identity (`pod`) when the
/// endpoint is in the mesh.
pub async fn relay_routed<C>(
    mut client: C,
    local: SocketAddr,
    destination: &Destination,
    pod: &PodContext,
    proxy: &ProxyContext,
) -> Result<(), ProxyError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let started = Started::now();
    let state = proxy.state.borrow().clone();
    let upstream = proxy
        .resolver
        .resolve_routed(&state, destination, local.port(), local.ip())?;
    let (upstream, connection) =
        open_upstream(local, upstream, started, pod, proxy, &state).await?;
    upstream.relay(&mut client, &connection, proxy).await;
    Ok(())
}

/// The upstream side of a relayed connection, open.
enum UpstreamStream {
    /// An HBONE stream to the destination's node proxy.
    Tunnel(H2Stream),
    Plain(TcpStream),
    /// TLS the proxy originated (a DestinationRule's `tls.mode: SIMPLE` for a ServiceEntry).
    Originated(Box<TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// Copies between `client` and it until both are done, counted in the TCP metrics and
    /// the access log as `connection`.
    async fn relay<C>(self, client: &mut C, connection: &ConnectionRecord, proxy: &ProxyContext)
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        match self {
            UpstreamStream::Tunnel(mut stream) => {
                relay_counted(client, &mut stream, connection, proxy).await;
            }
            UpstreamStream::Plain(mut stream) => {
                relay_counted(client, &mut stream, connection, proxy).await;
            }
            UpstreamStream::Originated(mut stream) => {
                relay_counted(client, &mut stream, connection, proxy).await;
            }
        }
    }
}

/// Opens the connection to `upstream` for a connection to `original` (what the app dialed,
/// or the gateway's own address): an HBONE stream as the pod's identity when both ends are
/// enrolled and a CA is at hand, else plaintext as without a mesh (with TLS originated where
/// a DestinationRule asks). Returns it with the record the connection is counted as.
async fn open_upstream(
    original: SocketAddr,
    upstream: Upstream,
    started: Started,
    pod: &PodContext,
    proxy: &ProxyContext,
    state: &State,
) -> Result<(UpstreamStream, ConnectionRecord), ProxyError> {
    let upstream = upstream.looked_up().await?;
    let source = state.workloads.get(&pod.key);
    let destination = match &upstream {
        Upstream::Service { endpoint, .. } => state.workloads.get(endpoint),
        Upstream::Workload { workload, .. } => state.workloads.get(workload),
        Upstream::External { .. } | Upstream::Lookup { .. } | Upstream::Passthrough(_) => None,
    };
    let service = upstream.service().and_then(|key| state.services.get(key));
    let tunnel = match (&proxy.mtls, source, destination) {
        (Some(mtls), Some(source), Some(destination)) => {
            tunnel_identities(Some(&mtls.trust_domain), source, destination)
                .map_err(CertificateError::from)?
                .map(|(source, destination)| (mtls, source, destination))
        }
        _ => None,
    };
    let connection = |mutual_tls| ConnectionRecord {
        parties: Parties::new(
            Reporter::Source,
            source,
            destination,
            service,
            mutual_tls,
            pod.ip_like(original.ip()),
        ),
        started,
        upstream: upstream.addr(),
    };
    if let Some((mtls, source_id, destination_id)) = tunnel {
        let stream = mtls
            .open_stream(
                pod,
                &proxy.home,
                &source_id,
                &destination_id,
                upstream.addr(),
            )
            .await?;
        debug!(%original, upstream = %upstream.addr(), "outbound HBONE stream open");
        let connection = connection(Some((&source_id, &destination_id)));
        return Ok((UpstreamStream::Tunnel(stream), connection));
    }
    let connection = connection(None);
    let stream = connect_from_pod(pod, &proxy.home, upstream.addr(), Dial::Outbound).await?;
    debug!(%original, upstream = %upstream.addr(), "outbound connected");
    if let Upstream::External { service, .. } = &upstream
        && let Some(tls) = state
            .routes
            .external_traffic_policy(&service.name, original.port())
            .tls_origination
    {
        let stream = originate(stream, &service.name, &tls).await?;
        debug!(%original, host = %service.name, "outbound TLS originated");
        return Ok((UpstreamStream::Originated(Box::new(stream)), connection));
    }
    Ok((UpstreamStream::Plain(stream), connection))
}
