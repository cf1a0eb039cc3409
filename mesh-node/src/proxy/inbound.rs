//! The inbound leg: the in-pod 15006 listener (plaintext, fed by `sk_lookup`) and the
//! in-pod 15008 listener (HBONE tunnels from other node proxies).
use std::{any::Any, net::SocketAddr, sync::Arc};

use ::http::StatusCode;
use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::{
    CertificateError, PodContext, ProxyContext, ProxyError,
    hbone::{self, IncomingConnect},
    http, relay_counted, relay_plain_counted,
    socket::{Dial, connect_from_pod},
};
use crate::{
    access_log::{ConnectionRecord, Entry, Parties, Started},
    identity::Identity,
    metrics::Reporter,
    plan::{
        admission::{self, Admission, Caller, Refused, refuse_own_listeners},
        protocol::{self, PortProtocol},
    },
    state::State,
};

pub(super) async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
    proxy: &ProxyContext,
) -> Result<(), ProxyError> {
    let started = Started::now();
    // sk_lookup keeps the packet's destination, so the accepted socket's local address is
    // the pod address and port the client asked for.
    let original = client
        .local_addr()
        .map_err(|e| ProxyError::Socket(e.into()))?;
    let state = proxy.state.borrow().clone();
    let mut caller = Caller::new(peer.ip(), None);
    // A node address is not enough (kube-proxy's SNAT gives forwarded traffic one): the
    // kernel must also have seen a node socket open this connection.
    caller.from_node = proxy.node_addresses.contains(peer.ip())
        && proxy
            .capture
            .as_ref()
            .is_some_and(|capture| capture.take_node_connection(peer));
    let result = match refuse_own_listeners(original)
        .and_then(|()| admit(&state, pod, &caller, original, None))
    {
        Ok(admission) => {
            let _ = client.set_nodelay(true);
            let delivery = Delivery {
                caller: &caller,
                original,
                started,
            };
            deliver(client, &delivery, pod, proxy, &state, admission).await
        }
        Err(refused) => Err(refused.into()),
    };
    if let Err(error) = &result {
        log_refused(proxy, pod, &caller, original, started, error);
    }
    result
}

/// Serves one HBONE tunnel from another node proxy: mTLS as this pod's identity, then one
/// CONNECT stream per proxied connection, each to this pod only.
pub(super) async fn handle_hbone(
    stream: TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
    proxy: &ProxyContext,
) -> Result<(), ProxyError> {
    let mtls = proxy.mtls.clone().ok_or(CertificateError::NoCa)?;
    let own = {
        let state = proxy.state.borrow();
        let workload = state
            .workloads
            .get(&pod.key)
            .ok_or_else(|| CertificateError::PodGone(pod.key.clone()))?;
        mtls.identity_of(workload)?
    };
    let _ = stream.set_nodelay(true);
    let (tls, peer_identity) = mtls.accept(&own, stream).await?;
    debug!(peer = %peer_identity, "HBONE tunnel accepted");
    let drain = proxy.drain.clone();
    let (pod, proxy) = (pod.clone(), proxy.clone());
    let identities = Arc::new((peer_identity, own));
    hbone::serve(tls, drain, move |incoming: IncomingConnect| {
        let (pod, proxy, identities) = (pod.clone(), proxy.clone(), identities.clone());
        async move {
            let target = incoming.target;
            if let Err(error) = serve_connect(incoming, peer, &pod, &proxy, &identities).await {
                proxy.metrics.node.proxy_error("hbone", error.reason());
                warn!(%error, reason = error.reason(), %target, "HBONE stream refused or failed");
            }
        }
    })
    .await?;
    Ok(())
}

async fn serve_connect(
    incoming: IncomingConnect,
    peer: SocketAddr,
    pod: &PodContext,
    proxy: &ProxyContext,
    identities: &Arc<(Identity, Identity)>,
) -> Result<(), ProxyError> {
    let started = Started::now();
    let target = incoming.target;
    let state = proxy.state.borrow().clone();
    let caller = Caller::new(peer.ip(), Some(identities.clone()));
    let admitted = if pod.ips.contains(&target.ip()) {
        refuse_own_listeners(target)
            .and_then(|()| admit(&state, pod, &caller, target, None))
            .map_err(ProxyError::from)
    } else {
        Err(ProxyError::NotLocal(target))
    };
    let result = match admitted {
        Ok(admission) => match incoming.accept() {
            Ok(stream) => {
                let delivery = Delivery {
                    caller: &caller,
                    original: target,
                    started,
                };
                deliver(stream, &delivery, pod, proxy, &state, admission).await
            }
            Err(error) => Err(error.into()),
        },
        Err(error) => {
            incoming.refuse(StatusCode::FORBIDDEN);
            Err(error)
        }
    };
    if let Err(error) = &result {
        log_refused(proxy, pod, &caller, target, started, error);
    }
    result
}

/// Logs a connection to this pod that the proxy refused or could not hand to the app. An
/// HTTP connection's failures are its requests' business: each has a line of its own.
fn log_refused(
    proxy: &ProxyContext,
    pod: &PodContext,
    caller: &Caller,
    original: SocketAddr,
    started: Started,
    error: &ProxyError,
) {
    if !proxy.access_log.is_on() || matches!(error, ProxyError::Http(_)) {
        return;
    }
    let state = proxy.state.borrow().clone();
    let parties = parties(caller, &state, pod, original);
    proxy.access_log.log(&Entry::refused_connection(
        &parties,
        &started,
        Some(original),
        error.refusal(),
    ));
}

/// The caller and this pod, as the metrics and the access log name them, for a connection
/// to `original`.
pub(super) fn parties(
    caller: &Caller,
    state: &State,
    pod: &PodContext,
    original: SocketAddr,
) -> Parties {
    let destination = state.workloads.get(&pod.key);
    let service = destination.and_then(|w| state.service_for(w, original.port()));
    Parties::new(
        Reporter::Destination,
        state.workload_by_ip(caller.ip),
        destination,
        service,
        caller
            .identities
            .as_deref()
            .map(|(source, own)| (source, own)),
        Some(caller.ip),
    )
}

/// PeerAuthentication and AuthorizationPolicy for a connection to `original`, as the
/// planner decides them for this pod.
fn admit(
    state: &State,
    pod: &PodContext,
    caller: &Caller,
    original: SocketAddr,
    admission: Option<Admission>,
) -> Result<Admission, Refused> {
    let workload = state.workload_or_unknown(&pod.key);
    admission::admit(
        &state.policies,
        workload.as_ref(),
        caller,
        original,
        admission,
    )
}

/// An admitted connection on its way to the app.
#[derive(Clone, Copy)]
struct Delivery<'a> {
    caller: &'a Caller,
    /// The pod address and port the client asked for.
    original: SocketAddr,
    started: Started,
}

/// Hands the connection to the app inside the pod as the caller: request by request when
/// it carries HTTP, else relayed as bytes until both sides are done.
async fn deliver<S>(
    client: S,
    delivery: &Delivery<'_>,
    pod: &PodContext,
    proxy: &ProxyContext,
    state: &State,
    admission: Admission,
) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Delivery {
        caller,
        original,
        started,
    } = *delivery;
    let declared =
        protocol::declared_inbound(state, state.workloads.get(&pod.key), original.port());
    let (mut client, is_http) = match declared {
        PortProtocol::Http => (http::Prefixed::new(Bytes::new(), client), true),
        PortProtocol::Tcp => (http::Prefixed::new(Bytes::new(), client), false),
        PortProtocol::Undeclared => http::sniff(client).await,
    };
    if is_http {
        debug!(%original, "inbound HTTP");
        let inbound = Arc::new(http::inbound::Inbound {
            pod: pod.clone(),
            proxy: proxy.clone(),
            caller: caller.clone(),
            original,
            parties: Default::default(),
        });
        http::serve_connection(client, &proxy.drain, move |request| {
            inbound.clone().handle(request)
        })
        .await
        .map_err(ProxyError::Http)?;
        return Ok(());
    }
    if admission == Admission::MtlsOnly {
        // Not HTTP after all: the request-level rules cannot match; decide at L4 now.
        admit(state, pod, caller, original, Some(Admission::Full))?;
    }
    let connection = ConnectionRecord {
        parties: parties(caller, state, pod, original),
        started,
        upstream: original,
    };
    let mut app = connect_from_pod(
        pod,
        &proxy.home,
        original,
        Dial::Transparent { source: caller.ip },
    )
    .await?;
    debug!(%original, "inbound connected to app");
    // A caller outside the mesh came in on a plain socket: the bytes can move in the
    // kernel. (Through HBONE they come out of a TLS stream and must be copied.)
    match (&mut client as &mut dyn Any).downcast_mut::<http::Prefixed<TcpStream>>() {
        Some(plain) => relay_plain_counted(plain, &mut app, &connection, proxy).await,
        None => relay_counted(&mut client, &mut app, &connection, proxy).await,
    }
    Ok(())
}
