//! The node proxy: one process serving the in-pod listeners of every enrolled pod.
mod inbound;
mod outbound;
mod resolve;
mod socket;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

pub use inbound::serve_inbound;
pub use outbound::serve_outbound;
pub use resolve::{Resolver, Upstream};
pub use socket::{ListenerSet, bind_pod_listeners};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::{ebpf::Capture, metrics::Metrics, netns::Netns, state::StateRx};

/// How long an upstream connect may take before the client's connection is closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection handler needs; cheap to clone.
#[derive(Clone)]
pub struct ProxyContext {
    pub state: StateRx,
    pub capture: Arc<Capture>,
    pub metrics: Metrics,
    pub resolver: Arc<Resolver>,
    /// The agent's own netns, to which threads return after opening a pod's socket.
    pub home: Arc<Netns>,
}

/// The pod a listener belongs to.
#[derive(Clone, Debug)]
pub struct PodContext {
    pub key: crate::state::ObjectKey,
    pub netns: Arc<Netns>,
    pub netns_cookie: u64,
}

/// Why a connection could not be proxied; doubles as the metric label.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no original destination recorded for this connection")]
    NoOriginalDestination,
    #[error("service {service} has no ready endpoint for port {port}")]
    NoEndpoint { service: String, port: u16 },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("creating a socket in the pod's netns: {0}")]
    Socket(String),
}

impl ProxyError {
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoOriginalDestination => "no_original_destination",
            ProxyError::NoEndpoint { .. } => "no_endpoint",
            ProxyError::Connect { .. } => "connect_failed",
            ProxyError::ConnectTimeout(_) => "connect_timeout",
            ProxyError::Socket(_) => "socket",
        }
    }
}

/// Copies both ways until both sides are done, passing half-closes on; returns the bytes
/// (client → upstream, upstream → client) even when the copy ends in an error, since those
/// bytes did cross.
pub async fn relay<C, U>(client: &mut C, upstream: &mut U) -> (u64, u64, Option<std::io::Error>)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match tokio::io::copy_bidirectional(client, upstream).await {
        Ok((up, down)) => (up, down, None),
        // copy_bidirectional does not report partial counts on error; a reset mid-stream
        // is the peer's business, and the metric then undercounts rather than lies.
        Err(error) => (0, 0, Some(error)),
    }
}

/// Accepts connections on one pod's listener until `stop`, one task (and span) each.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    pod: PodContext,
    proxy: ProxyContext,
    stop: CancellationToken,
    direction: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, PodContext, ProxyContext) -> Fut,
    Fut: Future<Output = Result<(), ProxyError>> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(pod = %pod.key, direction, %error, "accept failed");
                    continue;
                }
            },
        };
        proxy.metrics.node.captured(direction);
        let span = info_span!("connection", direction, pod = %pod.key, client = %peer);
        let metrics = proxy.metrics.clone();
        let connection = handle(stream, peer, pod.clone(), proxy.clone());
        tokio::spawn(
            async move {
                if let Err(error) = connection.await {
                    metrics.node.proxy_error(direction, error.reason());
                    warn!(%error, reason = error.reason(), "connection failed");
                }
            }
            .instrument(span),
        );
    }
}
