//! Pooled upstream HTTP connections: HTTP/1.1 connections kept alive between requests,
//! one shared HTTP/2 connection per destination, all counted against their cluster's
//! connection-pool limits (Envoy's circuit breakers).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http::{Request, Response};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tracing::debug;

use super::{ProxyBody, cluster::Cluster};
use crate::{
    identity::Identity,
    proxy::{
        CONNECT_TIMEOUT, CertificateError, PodContext, ProxyContext, ProxyError,
        socket::{Dial, connect_from_pod},
    },
    routing::ConnectionPool,
};

/// Envoy keeps idle upstream connections for an hour; servers (hyper's among them) drop
/// idle keep-alive connections much sooner, and a request sent on a connection the server
/// is closing fails. Twenty seconds stays under the common server timeouts.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// How to reach an upstream: which netns and identity a new connection is opened from.
pub struct Connector<'a> {
    pub pod: &'a PodContext,
    pub proxy: &'a ProxyContext,
    pub endpoint: SocketAddr,
    pub via: Via,
}

pub enum Via {
    /// An HBONE stream from the source pod's identity to the destination's.
    Hbone {
        source: Identity,
        destination: Identity,
    },
    /// Plaintext from the source pod, as without a mesh.
    Plaintext,
    /// From the destination's proxy to the app in its pod, posing as the caller.
    ToApp { caller: IpAddr },
}

impl Connector<'_> {
    async fn connect(&self, timeout: Duration) -> Result<Box<dyn Io>, ProxyError> {
        let (pod, home, endpoint) = (self.pod, &self.proxy.home, self.endpoint);
        let connect = async {
            Ok::<Box<dyn Io>, ProxyError>(match &self.via {
                Via::Hbone {
                    source,
                    destination,
                } => {
                    let mtls = self
                        .proxy
                        .mtls
                        .as_ref()
                        .ok_or_else(|| ProxyError::from(CertificateError::NoCa))?;
                    Box::new(
                        mtls.open_stream(pod, home, source, destination, endpoint)
                            .await?,
                    )
                }
                Via::Plaintext => {
                    Box::new(connect_from_pod(pod, home, endpoint, Dial::Outbound).await?)
                }
                Via::ToApp { caller } => Box::new(
                    connect_from_pod(pod, home, endpoint, Dial::Transparent { source: *caller })
                        .await?,
                ),
            })
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ProxyError::ConnectTimeout(endpoint))?
    }

    /// The pool entry this connector's connections belong to.
    fn key(&self, cluster: &Cluster, http2: bool) -> PoolKey {
        let source = match &self.via {
            Via::ToApp { caller } => Some(*caller),
            _ => self.pod.ip_like(self.endpoint.ip()),
        };
        PoolKey {
            cluster: cluster.key.clone(),
            source,
            endpoint: self.endpoint,
            http2,
        }
    }
}

/// Why a request could not be sent (it did not reach the app, or its answer was lost).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("circuit breaker: connection pool overflow")]
    Overflow,
    #[error("{0}")]
    Connect(ProxyError),
    #[error("upstream reset: {0}")]
    Reset(hyper::Error),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    cluster: super::cluster::ClusterKey,
    /// The pod address the connection was opened from (its netns and source IP).
    source: Option<IpAddr>,
    endpoint: SocketAddr,
    http2: bool,
}

struct IdleConnection {
    sender: http1::SendRequest<ProxyBody>,
    idle_since: Instant,
    /// Its cluster's `idleTimeout` when it was parked: [`UpstreamPool::prune`] closes it
    /// after that even if no request for its key ever comes again.
    idle_timeout: Duration,
    served: u32,
}

struct SharedHttp2 {
    sender: http2::SendRequest<ProxyBody>,
    served: u32,
    /// When a stream was last opened on it, and its cluster's idle timeout: pruned after
    /// that (streams still open finish on it).
    last_used: Instant,
    idle_timeout: Duration,
}

#[derive(Default)]
pub struct UpstreamPool {
    idle: Mutex<HashMap<PoolKey, Vec<IdleConnection>>>,
    http2: Mutex<HashMap<PoolKey, SharedHttp2>>,
}

impl UpstreamPool {
    /// Sends `request` to the connector's endpoint over a pooled connection of the
    /// request's HTTP version, or a new one within the cluster's limits.
    pub async fn send(
        self: &Arc<Self>,
        cluster: &Arc<Cluster>,
        limits: &ConnectionPool,
        connector: &Connector<'_>,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        if request.version() == http::Version::HTTP_2 {
            let mut sender = self.checkout_http2(cluster, limits, connector).await?;
            return sender.send_request(request).await.map_err(SendError::Reset);
        }
        let upgrade = request.headers().contains_key(http::header::UPGRADE);
        let (mut sender, served) = self.checkout_http1(cluster, limits, connector).await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(SendError::Reset)?;
        let max_requests = limits.max_requests_per_connection.unwrap_or(u32::MAX);
        let idle_timeout = limits.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        // An upgraded connection belongs to its tunnel from now on.
        if !upgrade && served + 1 < max_requests {
            let (pool, key) = (self.clone(), connector.key(cluster, false));
            let cluster = cluster.clone();
            // The connection is reusable once its response body has been read.
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.idle
                        .lock()
                        .entry(key)
                        .or_default()
                        .push(IdleConnection {
                            sender,
                            idle_since: Instant::now(),
                            idle_timeout,
                            served: served + 1,
                        });
                    cluster.released.notify_one();
                }
            });
        }
        Ok(response)
    }

    /// An idle HTTP/1.1 connection, a new one, or a place in the pending queue until one
    /// frees up; with the number of requests the connection has served.
    async fn checkout_http1(
        &self,
        cluster: &Arc<Cluster>,
        limits: &ConnectionPool,
        connector: &Connector<'_>,
    ) -> Result<(http1::SendRequest<ProxyBody>, u32), SendError> {
        let key = connector.key(cluster, false);
        let idle_timeout = limits.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        let wait_limit = limits.connect_timeout.unwrap_or(CONNECT_TIMEOUT);
        loop {
            let released = cluster.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(idle) = self.take_idle(&key, idle_timeout) {
                return Ok((idle.sender, idle.served));
            }
            if cluster.try_open_connection(limits) {
                let sender = open(cluster, limits, connector, false).await?;
                let Sender::Http1(sender) = sender else {
                    unreachable!("asked for HTTP/1.1")
                };
                return Ok((sender, 0));
            }
            // At maxConnections: idle connections elsewhere in the cluster make way.
            self.evict_one_idle(&cluster.key);
            if !cluster.try_enter_pending(limits) {
                return Err(SendError::Overflow);
            }
            let waited = tokio::time::timeout(wait_limit, released).await;
            cluster.leave_pending();
            if waited.is_err() {
                return Err(SendError::Overflow);
            }
        }
    }

    /// Closes the idle HTTP/1.1 connections idle for longer than their cluster's idle
    /// timeout or closed by their peer, drops closed HTTP/2 connections, and forgets the
    /// pool keys left empty: inbound keys name the caller's address, so without this every
    /// caller that ever called would keep an entry (and its idle sockets).
    pub fn prune(&self) {
        self.idle.lock().retain(|_, list| {
            list.retain(|c| c.idle_since.elapsed() < c.idle_timeout && c.sender.is_ready());
            !list.is_empty()
        });
        self.http2.lock().retain(|_, shared| {
            !shared.sender.is_closed() && shared.last_used.elapsed() < shared.idle_timeout
        });
    }

    fn take_idle(&self, key: &PoolKey, idle_timeout: Duration) -> Option<IdleConnection> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(key)?;
        while let Some(connection) = list.pop() {
            if connection.idle_since.elapsed() < idle_timeout && connection.sender.is_ready() {
                return Some(connection);
            }
        }
        None
    }

    fn evict_one_idle(&self, cluster: &super::cluster::ClusterKey) {
        let mut idle = self.idle.lock();
        if let Some(list) = idle
            .iter_mut()
            .find(|(key, list)| &key.cluster == cluster && !list.is_empty())
            .map(|(_, list)| list)
        {
            // Dropping the sender closes the connection, which frees its slot.
            list.remove(0);
        }
    }

    async fn checkout_http2(
        &self,
        cluster: &Arc<Cluster>,
        limits: &ConnectionPool,
        connector: &Connector<'_>,
    ) -> Result<http2::SendRequest<ProxyBody>, SendError> {
        let key = connector.key(cluster, true);
        let max_requests = limits.max_requests_per_connection.unwrap_or(u32::MAX);
        {
            let mut shared = self.http2.lock();
            if let Some(connection) = shared.get_mut(&key) {
                if !connection.sender.is_closed() && connection.served < max_requests {
                    connection.served += 1;
                    connection.last_used = Instant::now();
                    return Ok(connection.sender.clone());
                }
                // Closed or used up: in-flight streams finish on it, new ones go elsewhere.
                shared.remove(&key);
            }
        }
        if !cluster.try_open_connection(limits) {
            return Err(SendError::Overflow);
        }
        let Sender::Http2(sender) = open(cluster, limits, connector, true).await? else {
            unreachable!("asked for HTTP/2")
        };
        self.http2.lock().insert(
            key,
            SharedHttp2 {
                sender: sender.clone(),
                served: 1,
                last_used: Instant::now(),
                idle_timeout: limits.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT),
            },
        );
        Ok(sender)
    }
}

enum Sender {
    Http1(http1::SendRequest<ProxyBody>),
    Http2(http2::SendRequest<ProxyBody>),
}

/// Dials and handshakes a connection whose slot was reserved in `cluster`; the slot is
/// released when the connection ends (or if it never opens).
async fn open(
    cluster: &Arc<Cluster>,
    limits: &ConnectionPool,
    connector: &Connector<'_>,
    http2: bool,
) -> Result<Sender, SendError> {
    let opened = async {
        let io = connector
            .connect(limits.connect_timeout.unwrap_or(CONNECT_TIMEOUT))
            .await
            .map_err(SendError::Connect)?;
        let io = TokioIo::new(io);
        let cluster = cluster.clone();
        let http_error = |e: hyper::Error| SendError::Connect(ProxyError::Http(e.into()));
        if http2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(http_error)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    debug!(%error, "upstream HTTP/2 connection ended");
                }
                cluster.connection_closed();
            });
            Ok(Sender::Http2(sender))
        } else {
            let (sender, connection) = http1::handshake(io).await.map_err(http_error)?;
            tokio::spawn(async move {
                if let Err(error) = connection.with_upgrades().await {
                    debug!(%error, "upstream HTTP/1.1 connection ended");
                }
                cluster.connection_closed();
            });
            Ok(Sender::Http1(sender))
        }
    };
    let result = opened.await;
    if result.is_err() {
        cluster.connection_closed();
    }
    result
}
