//! The node proxy: one process serving the in-pod listeners of every enrolled pod.
pub mod connections;
mod copy;
mod error;
pub mod hbone;
pub mod http;
mod inbound;
pub mod node_probes;
mod originate;
pub mod outbound;
mod resolve;
mod socket;
mod splice;
mod tunnel;

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

pub use error::{CertificateError, HandshakeError, ProxyError, SocketError};
pub use resolve::{Resolver, Upstream};
pub use socket::{Inherited, ListenerSet, bind_pod_listeners};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};
pub use tunnel::Mtls;

use crate::{
    access_log::{self, AccessLog},
    distributed_tracing::Tracing,
    ebpf::Capture,
    metrics::Metrics,
    netns::Netns,
    state::StateRx,
};

/// How long an upstream connect may take before the client's connection is closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection handler needs; cheap to clone.
#[derive(Clone)]
pub struct ProxyContext {
    pub state: StateRx,
    /// The node's eBPF capture; `None` in a gateway, whose own listeners take its clients.
    pub capture: Option<Arc<Capture>>,
    pub metrics: Metrics,
    pub resolver: Arc<Resolver>,
    /// The agent's own netns, to which threads return after opening a pod's socket.
    pub home: Arc<Netns>,
    /// mTLS (HBONE) between enrolled pods; `None` when the agent has no CA (plaintext).
    pub mtls: Option<Arc<Mtls>>,
    /// L7: the upstream clusters (limits, endpoint health) and their pooled connections.
    pub clusters: Arc<http::Clusters>,
    pub upstreams: Arc<http::UpstreamPool>,
    /// One JSON line per connection and request (`--access-log`).
    pub access_log: Arc<AccessLog>,
    /// Request spans and trace context propagation (`--trace-sampling`, `--otlp-endpoint`).
    pub tracing: Arc<Tracing>,
    /// The key sets of RequestAuthentication rules, as the agent last fetched them.
    pub jwks: Arc<crate::jwks::JwksCache>,
    /// The live connections, for the admin API.
    pub connections: Arc<connections::Connections>,
    /// The node's own addresses: plaintext from them that a node socket opened is kubelet
    /// probing its pods.
    pub node_addresses: Arc<node_probes::NodeAddresses>,
    /// Cancelled when the agent drains (SIGTERM): connections it serves finish what is in
    /// flight and close (HTTP/1 between requests, HTTP/2 and HBONE with GOAWAY).
    pub drain: CancellationToken,
}

impl ProxyContext {
    /// Whether sockmap carries the loopback leg between apps and their listeners (then
    /// `splice` cannot read it).
    pub fn loopback_accelerated(&self) -> bool {
        self.capture
            .as_ref()
            .is_some_and(|capture| capture.loopback_accelerated())
    }

    /// Drops what departed pods, Services and callers left behind (certificates, tunnels,
    /// clusters, pooled connections, round-robin positions), so that churn leaves memory
    /// and sockets flat. `node` is this agent's node: its enrolled pods' identities are the
    /// certificates it needs.
    pub fn prune(&self, node: &str) {
        let state = self.state.borrow().clone();
        let service_exists =
            |service: &crate::inventory::ObjectKey| state.services.contains_key(service);
        self.clusters.prune(service_exists);
        self.resolver.prune(service_exists);
        self.upstreams.prune();
        let workloads: std::collections::HashSet<(&str, &str)> = state
            .workloads
            .values()
            .map(|w| (w.workload_name.as_str(), w.key.namespace.as_str()))
            .collect();
        self.metrics
            .forget_departed(&|workload, namespace| workloads.contains(&(workload, namespace)));
        if let Some(mtls) = &self.mtls {
            let needed = state
                .workloads
                .values()
                .filter(|w| w.node == node && w.enrolled)
                .filter_map(|w| mtls.identity_of(w).ok())
                .collect();
            mtls.prune(&needed, |ip| state.workload_by_ip(ip).is_some());
        }
    }
}

/// The pod a listener belongs to.
#[derive(Clone, Debug)]
pub struct PodContext {
    pub key: crate::inventory::ObjectKey,
    pub ips: Vec<std::net::IpAddr>,
    pub netns: Arc<Netns>,
    pub netns_cookie: u64,
}

impl PodContext {
    /// The pod's address of the same family as `other`.
    pub fn ip_like(&self, other: std::net::IpAddr) -> Option<std::net::IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == other.is_ipv4())
    }
}

/// How long a relayed connection may carry nothing either way before the proxy closes it:
/// Envoy's (and so Istio's) TCP idle timeout. Without one, connections whose ends vanished
/// without a word would hold the node's sockets forever.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Copies both ways until both sides are done, passing half-closes on, or until nothing
/// has crossed for `idle_timeout`. Returns the bytes (client → upstream, upstream →
/// client) that crossed, also when the copy ends in an error (a reset mid-stream is the
/// peer's business, but its bytes did cross).
pub async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle_timeout: Duration,
) -> (u64, u64, Option<std::io::Error>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (from_client, from_upstream) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut client, mut upstream) = (
        Counted::new(client, &from_client),
        Counted::new(upstream, &from_upstream),
    );
    let copy = copy::copy_bidirectional(&mut client, &mut upstream);
    let error = until_idle(copy, &from_client, &from_upstream, idle_timeout).await;
    (
        from_client.load(Ordering::Relaxed),
        from_upstream.load(Ordering::Relaxed),
        error,
    )
}

/// [`relay`] between two plain TCP sockets, in the kernel (`splice`): what the client sent
/// before (the bytes read to tell HTTP from TCP) is written first.
pub async fn relay_plain(
    client: &mut http::Prefixed<TcpStream>,
    upstream: &mut TcpStream,
    idle_timeout: Duration,
) -> (u64, u64, Option<std::io::Error>) {
    let (sniffed, client) = client.take_prefix();
    let (from_client, from_upstream) = (AtomicU64::new(sniffed.len() as u64), AtomicU64::new(0));
    let moved = async {
        upstream.write_all(&sniffed).await?;
        splice::splice_bidirectional(client, upstream, &from_client, &from_upstream).await
    };
    let error = until_idle(moved, &from_client, &from_upstream, idle_timeout).await;
    (
        from_client.load(Ordering::Relaxed),
        from_upstream.load(Ordering::Relaxed),
        error,
    )
}

/// Runs `relay` until it ends (its error, if any) or until neither count moved for
/// `idle_timeout` (a timed-out error).
async fn until_idle(
    relay: impl Future<Output = std::io::Result<impl Sized>>,
    from_client: &AtomicU64,
    from_upstream: &AtomicU64,
    idle_timeout: Duration,
) -> Option<std::io::Error> {
    let crossed = || from_client.load(Ordering::Relaxed) + from_upstream.load(Ordering::Relaxed);
    let idle = async {
        let mut seen = crossed();
        loop {
            tokio::time::sleep(idle_timeout).await;
            let now = crossed();
            if now == seen {
                return;
            }
            seen = now;
        }
    };
    tokio::select! {
        result = relay => result.err(),
        () = idle => Some(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("nothing crossed for {idle_timeout:?}"),
        )),
    }
}

/// [`relay`] between the client side and the upstream side of a connection, recording it in
/// Istio's TCP metrics (opened now, closed with its bytes at the end) and, when it closes,
/// in the access log.
async fn relay_counted<C, U>(
    client: &mut C,
    upstream: &mut U,
    connection: &access_log::ConnectionRecord,
    proxy: &ProxyContext,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    recorded(relay(client, upstream, TCP_IDLE_TIMEOUT), connection, proxy).await;
}

/// [`relay_counted`] for two plain TCP sockets ([`relay_plain`]).
async fn relay_plain_counted(
    client: &mut http::Prefixed<TcpStream>,
    upstream: &mut TcpStream,
    connection: &access_log::ConnectionRecord,
    proxy: &ProxyContext,
) {
    recorded(
        relay_plain(client, upstream, TCP_IDLE_TIMEOUT),
        connection,
        proxy,
    )
    .await;
}

/// Records `relay` in Istio's TCP metrics (opened now, closed with its bytes at the end)
/// and, when it closes, in the access log.
async fn recorded(
    relay: impl Future<Output = (u64, u64, Option<std::io::Error>)>,
    connection: &access_log::ConnectionRecord,
    proxy: &ProxyContext,
) {
    let labels = &connection.parties.labels;
    proxy.metrics.tcp.opened(labels);
    let (from_client, to_client, error) = relay.await;
    proxy.metrics.tcp.closed(labels, from_client, to_client);
    tracing::debug!(from_client, to_client, error = ?error, "connection closed");
    if proxy.access_log.is_on() {
        proxy
            .access_log
            .log(&connection.closed(from_client, to_client));
    }
}

/// A stream that counts the bytes read from it.
struct Counted<'a, S> {
    inner: &'a mut S,
    read: &'a AtomicU64,
}

impl<'a, S> Counted<'a, S> {
    fn new(inner: &'a mut S, read: &'a AtomicU64) -> Self {
        Self { inner, read }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.read.fetch_add(read, Ordering::Relaxed);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Which in-pod listener a connection arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// 15001: the pod's own connects, captured by the connect hooks.
    Outbound,
    /// 15006: connections to the pod, steered by `sk_lookup`.
    Inbound,
    /// 15008: HBONE tunnels from other node proxies.
    Hbone,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Hbone => "hbone",
        }
    }
}

/// Serves one pod's listener until `stop`: one task (and span) per connection.
pub async fn serve(
    listener: TcpListener,
    pod: PodContext,
    proxy: ProxyContext,
    stop: CancellationToken,
    direction: Direction,
) {
    let name = direction.as_str();
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(pod = %pod.key, direction = name, %error, "accept failed");
                    crate::accept::back_off(&error).await;
                    continue;
                }
            },
        };
        proxy.metrics.node.captured(name);
        let connection = connections::accepted(direction, &pod, &proxy, &stream, peer);
        let registered = proxy.connections.register(connection);
        let span = info_span!("connection", direction = name, pod = %pod.key, client = %peer);
        let (pod, proxy) = (pod.clone(), proxy.clone());
        tokio::spawn(
            async move {
                let _registered = registered;
                let result = match direction {
                    Direction::Outbound => outbound::handle(stream, peer, &pod, &proxy).await,
                    Direction::Inbound => inbound::handle(stream, peer, &pod, &proxy).await,
                    Direction::Hbone => inbound::handle_hbone(stream, peer, &pod, &proxy).await,
                };
                if let Err(error) = result {
                    proxy.metrics.node.proxy_error(name, error.reason());
                    warn!(%error, reason = error.reason(), "connection failed");
                }
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_relay_ends_after_the_idle_timeout_and_not_while_bytes_flow() {
        let idle = Duration::from_secs(60);
        let (mut client, mut client_end) = duplex(1024);
        let (mut upstream, mut upstream_end) = duplex(1024);
        let relayed = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let (sent, _, error) = relay(&mut client_end, &mut upstream_end, idle).await;
            (started.elapsed(), sent, error)
        });
        // Traffic every 50 s for 200 s keeps it open.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            client.write_all(b"x").await.unwrap();
            let mut byte = [0; 1];
            upstream.read_exact(&mut byte).await.unwrap();
        }
        let (lasted, sent, error) = relayed.await.unwrap();
        assert_eq!(sent, 4);
        assert!(
            lasted >= Duration::from_secs(200) && lasted <= Duration::from_secs(200) + 2 * idle,
            "{lasted:?}"
        );
        assert_eq!(error.map(|e| e.kind()), Some(std::io::ErrorKind::TimedOut));
    }

    #[tokio::test]
    async fn a_plain_relay_sends_the_sniffed_bytes_first_and_ends_when_idle() {
        let pair = splice::tests::pair;
        let (mut client, proxy_client) = pair().await;
        let (mut upstream, mut server) = pair().await;
        // The proxy read "GET " to tell HTTP from TCP; the client sends the rest.
        let mut sniffed = http::Prefixed::new(bytes::Bytes::from_static(b"GET "), proxy_client);
        client.write_all(b"/ HTTP/1.0").await.unwrap();
        let relay = relay_plain(&mut sniffed, &mut upstream, Duration::from_millis(300));
        let read = async {
            let mut received = [0; 14];
            server.read_exact(&mut received).await.unwrap();
            received
        };
        let ((sent, received_back, error), received) = tokio::join!(relay, read);
        assert_eq!(&received, b"GET / HTTP/1.0");
        assert_eq!((sent, received_back), (14, 0));
        assert_eq!(error.map(|e| e.kind()), Some(std::io::ErrorKind::TimedOut));
    }
}
