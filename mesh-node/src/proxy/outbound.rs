//! The outbound leg: the in-pod 15001 listener, fed by the connect hooks.
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::debug;

use super::{
    PodContext, ProxyContext, ProxyError, Upstream, relay,
    socket::{Dial, connect_from_pod},
};
use crate::metrics::{ConnectionLabels, Reporter};

pub(super) async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
    proxy: &ProxyContext,
) -> Result<(), ProxyError> {
    let original = proxy
        .capture
        .take_original_destination(pod.netns_cookie, peer)
        .ok_or(ProxyError::NoOriginalDestination)?;
    let state = proxy.state.borrow().clone();
    let upstream = proxy.resolver.resolve(&state, original)?;
    let source = state.workloads.get(&pod.key);
    let (destination, service) = match &upstream {
        Upstream::Service {
            service, endpoint, ..
        } => (state.workloads.get(endpoint), state.services.get(service)),
        Upstream::Workload { workload, .. } => (state.workloads.get(workload), None),
        Upstream::Passthrough(_) => (None, None),
    };
    let labels = ConnectionLabels::new(Reporter::Source, source, destination, service, "none");
    let mut upstream_stream =
        connect_from_pod(pod, &proxy.home, upstream.addr(), Dial::Outbound).await?;
    let _ = client.set_nodelay(true);
    debug!(%original, upstream = %upstream.addr(), "outbound connected");
    proxy.metrics.tcp.opened(&labels);
    let (sent, received, error) = relay(&mut client, &mut upstream_stream).await;
    proxy.metrics.tcp.closed(&labels, sent, received);
    debug!(%original, sent, received, error = ?error, "outbound closed");
    Ok(())
}
