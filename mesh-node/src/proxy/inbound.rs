//! The inbound leg: the in-pod 15006 listener, fed by `sk_lookup`.
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::debug;

use super::{
    PodContext, ProxyContext, ProxyError, relay,
    socket::{Dial, connect_from_pod},
};
use crate::{
    metrics::{ConnectionLabels, Reporter},
    policy::{ConnectionAttributes, MtlsMode, Policies, Verdict},
    state::Workload,
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
    mut client: TcpStream,
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
    let source = state.workload_by_ip(peer.ip());
    let destination = state.workloads.get(&pod.key);
    if let Some(workload) = destination {
        // Plaintext: no verified identity, so principals and namespaces cannot match.
        let attributes = ConnectionAttributes {
            source_ip: peer.ip(),
            source_principal: None,
            source_namespace: None,
            destination_ip: original.ip(),
            destination_port: original.port(),
        };
        check_policy(&state.policies, workload, &attributes, false)?;
    }
    let service = destination.and_then(|w| state.service_for(w, original.port()));
    let labels = ConnectionLabels::new(Reporter::Destination, source, destination, service, "none");
    let mut app = connect_from_pod(
        pod,
        &proxy.home,
        original,
        Dial::Transparent { source: peer.ip() },
    )
    .await?;
    let _ = client.set_nodelay(true);
    debug!(%original, "inbound connected to app");
    proxy.metrics.tcp.opened(&labels);
    let (received, sent, error) = relay(&mut client, &mut app).await;
    proxy.metrics.tcp.closed(&labels, received, sent);
    debug!(%original, received, sent, error = ?error, "inbound closed");
    Ok(())
}
