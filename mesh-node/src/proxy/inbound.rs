//! The inbound leg: the in-pod 15006 listener, fed by `sk_lookup`.
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::debug;

use super::{
    PodContext, ProxyContext, ProxyError, relay,
    socket::{Dial, connect_from_pod},
};
use crate::metrics::{ConnectionLabels, Reporter};

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
