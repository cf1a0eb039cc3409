//! The inbound leg: the in-pod 15006 listener (plaintext, fed by `sk_lookup`) and the
//! in-pod 15008 listener (HBONE tunnels from other node proxies).
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::StatusCode;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::{
    PodContext, ProxyContext, ProxyError,
    hbone::{self, IncomingConnect},
    relay_counted,
    socket::{Dial, connect_from_pod},
};
use crate::{
    identity::Identity,
    metrics::{ConnectionLabels, Reporter},
    policy::{ConnectionAttributes, MtlsMode, Policies, Verdict},
    state::{State, Workload},
};

/// Applies PeerAuthentication (unless the connection is mutual TLS) and
/// AuthorizationPolicy to a connection for `workload`.
pub(super) fn check_policy(
    policies: &Policies,
    workload: &Workload,
    attributes: &ConnectionAttributes,
    mutual_tls: bool,
) -> Result<(), ProxyError> {
    if !mutual_tls && policies.mtls_mode(workload, attributes.destination_port) == MtlsMode::Strict
    {
        return Err(ProxyError::MtlsRequired);
    }
    match policies.authorize(workload, attributes) {
        Verdict::Allow { .. } => Ok(()),
        Verdict::Deny { policy, reason } => Err(ProxyError::Denied {
            policy: policy.map_or_else(|| "(no ALLOW policy matched)".into(), |p| p.to_string()),
            reason,
        }),
    }
}

pub(super) async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
    proxy: &ProxyContext,
) -> Result<(), ProxyError> {
    // sk_lookup keeps the packet's destination, so the accepted socket's local address is
    // the pod address and port the client asked for.
    let original = client
        .local_addr()
        .map_err(|e| ProxyError::Socket(e.to_string()))?;
    let state = proxy.state.borrow().clone();
    let caller = Caller {
        ip: peer.ip(),
        identities: None,
    };
    admit(&state, pod, &caller, original)?;
    let _ = client.set_nodelay(true);
    deliver(client, &caller, original, pod, proxy, &state).await
}

/// Serves one HBONE tunnel from another node proxy: mTLS as this pod's identity, then one
/// CONNECT stream per proxied connection, each to this pod only.
pub(super) async fn handle_hbone(
    stream: TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
    proxy: &ProxyContext,
) -> Result<(), ProxyError> {
    let mtls = proxy
        .mtls
        .clone()
        .ok_or_else(|| ProxyError::Certificate("this agent has no CA; HBONE is off".into()))?;
    let own = {
        let state = proxy.state.borrow();
        let workload = state
            .workloads
            .get(&pod.key)
            .ok_or_else(|| ProxyError::Certificate(format!("pod {} is gone", pod.key)))?;
        mtls.identity_of(workload)?
    };
    let _ = stream.set_nodelay(true);
    let (tls, peer_identity) = mtls.accept(&own, stream).await?;
    debug!(peer = %peer_identity, "HBONE tunnel accepted");
    let (pod, proxy) = (pod.clone(), proxy.clone());
    let identities = Arc::new((peer_identity, own));
    hbone::serve(tls, move |incoming: IncomingConnect| {
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
    identities: &(Identity, Identity),
) -> Result<(), ProxyError> {
    let target = incoming.target;
    let state = proxy.state.borrow().clone();
    let caller = Caller {
        ip: peer.ip(),
        identities: Some(identities),
    };
    let admitted = if pod.ips.contains(&target.ip()) {
        admit(&state, pod, &caller, target)
    } else {
        Err(ProxyError::NotLocal(target))
    };
    if let Err(error) = admitted {
        incoming.refuse(StatusCode::FORBIDDEN);
        return Err(error);
    }
    let stream = incoming.accept()?;
    deliver(stream, &caller, target, pod, proxy, &state).await
}

/// Who is calling, as far as the inbound side can tell.
struct Caller<'a> {
    ip: IpAddr,
    /// (caller, this pod) when the connection came over mTLS.
    identities: Option<&'a (Identity, Identity)>,
}

/// PeerAuthentication and AuthorizationPolicy for a connection to `original`.
fn admit(
    state: &State,
    pod: &PodContext,
    caller: &Caller,
    original: SocketAddr,
) -> Result<(), ProxyError> {
    let Some(workload) = state.workloads.get(&pod.key) else {
        return Ok(());
    };
    // Istio writes principals without the scheme: `<td>/ns/<ns>/sa/<sa>`.
    let principal = caller.identities.map(|(source, _)| {
        let id = source.to_string();
        id.trim_start_matches("spiffe://").to_string()
    });
    let attributes = ConnectionAttributes {
        source_ip: caller.ip,
        source_principal: principal.as_deref(),
        source_namespace: caller.identities.map(|(source, _)| source.namespace()),
        destination_ip: original.ip(),
        destination_port: original.port(),
    };
    check_policy(
        &state.policies,
        workload,
        &attributes,
        caller.identities.is_some(),
    )
}

/// Dials the app inside the pod as the caller and relays until both sides are done.
async fn deliver<S>(
    mut client: S,
    caller: &Caller<'_>,
    original: SocketAddr,
    pod: &PodContext,
    proxy: &ProxyContext,
    state: &State,
) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let source = state.workload_by_ip(caller.ip);
    let destination = state.workloads.get(&pod.key);
    let service = destination.and_then(|w| state.service_for(w, original.port()));
    let mutual_tls = caller.identities.map(|(source, own)| (source, own));
    let labels = ConnectionLabels::new(
        Reporter::Destination,
        source,
        destination,
        service,
        mutual_tls,
    );
    let mut app = connect_from_pod(
        pod,
        &proxy.home,
        original,
        Dial::Transparent { source: caller.ip },
    )
    .await?;
    debug!(%original, "inbound connected to app");
    relay_counted(&mut client, &mut app, &labels, proxy).await;
    Ok(())
}
