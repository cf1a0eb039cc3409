//! mTLS between node proxies: workload certificates, the pool of HBONE tunnels, and the
//! TLS configurations of both ends.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::FutureExt as _;
use h2::client::SendRequest;
use mesh_common::ports;
use parking_lot::Mutex;
use rustls::{ServerConfig, pki_types::ServerName};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tracing::debug;

use super::{
    CertificateError, HandshakeError, PodContext, ProxyError,
    hbone::{self, H2Stream, HboneError, StreamSlot},
    socket::{Dial, connect_from_pod},
};
use crate::{
    identity::{CertificateManager, Identity, WorkloadCert, tls},
    inventory::Workload,
    metrics::NodeMetrics,
    netns::Netns,
    plan::tunnel::workload_identity,
};

/// How long a TLS handshake may take on either end of a tunnel (the HTTP/2 one after it has
/// the same bound): a peer that connects and never speaks, or a blackholed one, costs a
/// socket for this long at most.
const HANDSHAKE_TIMEOUT: Duration = hbone::HANDSHAKE_TIMEOUT;

/// A pooled tunnel: one mTLS connection from one source pod (and identity) to one
/// destination pod, multiplexing HBONE streams. The source IP is part of the key because
/// the tunnel's socket was opened in that pod's netns and carries its address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    source_ip: IpAddr,
    source: Identity,
    destination: Identity,
    hbone: SocketAddr,
}

struct Pooled {
    /// The certificate the tunnel was opened with: a renewed certificate opens new tunnels
    /// while old ones drain.
    cert: Arc<WorkloadCert>,
    sender: SendRequest<Bytes>,
    /// Streams opened on it so far; at the limit a new tunnel replaces it in the pool.
    streams: usize,
    /// Streams open on it now. At the peer's concurrency limit a further stream would
    /// queue until one closes, and pooled HTTP connections keep theirs open for long: a
    /// full tunnel is replaced in the pool instead (it keeps serving its open streams).
    open: Arc<AtomicUsize>,
}

impl Pooled {
    fn has_room(&self, max_streams_per_tunnel: usize) -> bool {
        let concurrency = self
            .sender
            .current_max_send_streams()
            .min(hbone::MAX_CONCURRENT_STREAMS as usize);
        self.streams < max_streams_per_tunnel && self.open.load(Ordering::Acquire) < concurrency
    }
}

/// The pool: tunnels up, and tunnels being dialled (which connections wait for).
#[derive(Default)]
struct Tunnels {
    ready: HashMap<PoolKey, Pooled>,
    dialing: HashMap<PoolKey, watch::Receiver<DialOutcome>>,
}

/// How a dial went, once it has: `Ok` puts the tunnel in the pool; the error is shared by
/// every connection that waited for it.
type DialOutcome = Option<Result<(), Arc<ProxyError>>>;

/// What a connection does for its tunnel (`Mtls::next_step`).
enum NextStep {
    /// Open a stream on this pooled tunnel (the stream's slot already taken).
    Use(SendRequest<Bytes>, StreamSlot),
    /// Wait for another connection's dial.
    Wait(watch::Receiver<DialOutcome>),
    /// Dial; with a channel when other connections may wait for it.
    Dial(Option<watch::Sender<DialOutcome>>),
}

/// Certificates, trust and tunnels: present when the agent has a CA.
pub struct Mtls {
    pub manager: Arc<CertificateManager>,
    pub trust_bundle: Vec<CertificateDer<'static>>,
    pub trust_domain: String,
    /// Streams one tunnel carries before a new one is opened (1: a handshake per connection).
    max_streams_per_tunnel: usize,
    metrics: NodeMetrics,
    tunnels: Mutex<Tunnels>,
    server_configs: Mutex<HashMap<Identity, ServerConfigFor>>,
}

/// A server configuration and the certificate it was built from.
type ServerConfigFor = (Arc<WorkloadCert>, Arc<ServerConfig>);

impl Mtls {
    pub fn new(
        manager: Arc<CertificateManager>,
        trust_bundle: Vec<CertificateDer<'static>>,
        trust_domain: String,
        max_streams_per_tunnel: usize,
        metrics: NodeMetrics,
    ) -> Self {
        Self {
            manager,
            trust_bundle,
            trust_domain,
            max_streams_per_tunnel: max_streams_per_tunnel.max(1),
            metrics,
            tunnels: Mutex::default(),
            server_configs: Mutex::default(),
        }
    }

    /// The SPIFFE identity of a pod: its namespace and service account.
    pub fn identity_of(&self, workload: &Workload) -> Result<Identity, ProxyError> {
        workload_identity(&self.trust_domain, workload)
            .map_err(|e| CertificateError::from(e).into())
    }

    async fn certificate(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, ProxyError> {
        self.manager
            .fetch(identity)
            .await
            .map_err(|e| CertificateError::from(e).into())
    }

    /// Opens an HBONE stream to `target` (a pod address and port) as `source`, reusing a
    /// pooled tunnel to the destination pod when one is alive. Connections that find no
    /// tunnel while one is being dialled for them wait for it rather than each dialling
    /// their own: a burst of new connections to a pod costs one handshake, not one each.
    pub async fn open_stream(
        &self,
        pod: &PodContext,
        home: &Netns,
        source: &Identity,
        destination: &Identity,
        target: SocketAddr,
    ) -> Result<H2Stream, ProxyError> {
        let cert = self.certificate(source).await?;
        let key = PoolKey {
            source_ip: pod
                .ip_like(target.ip())
                .ok_or(ProxyError::NoSourceAddress)?,
            source: source.clone(),
            destination: destination.clone(),
            hbone: SocketAddr::new(target.ip(), ports::HBONE),
        };
        loop {
            match self.next_step(&key, &cert) {
                NextStep::Use(sender, slot) => match hbone::connect(sender, target).await {
                    Ok(stream) => return Ok(stream.with_slot(slot)),
                    // A refusal is the peer's answer, not a dead tunnel.
                    Err(error @ HboneError::Refused(_)) => return Err(error.into()),
                    Err(error) => {
                        debug!(%error, hbone = %key.hbone, "pooled tunnel is dead; reconnecting");
                        self.tunnels.lock().ready.remove(&key);
                    }
                },
                NextStep::Wait(mut dial) => {
                    // On success the tunnel is in the pool: the next step takes a stream on
                    // it (or dials again if it is already full). A dial abandoned by its
                    // connection closes the channel: this one dials instead.
                    if let Ok(outcome) = dial.wait_for(Option::is_some).await
                        && let Some(Err(error)) = &*outcome
                    {
                        return Err(ProxyError::SharedDial(error.clone()));
                    }
                }
                NextStep::Dial(flight) => {
                    return self
                        .dial_for_pool(pod, home, cert, destination, key, target, flight)
                        .await;
                }
            }
        }
    }

    /// Under the pool's lock: a stream on a pooled tunnel with room, else the dial in flight
    /// to wait for, else a dial of this connection's own (registered, when tunnels are
    /// shared, so the next connections wait for it).
    fn next_step(&self, key: &PoolKey, cert: &Arc<WorkloadCert>) -> NextStep {
        let mut tunnels = self.tunnels.lock();
        if let Some(pooled) = tunnels
            .ready
            .get_mut(key)
            .filter(|p| Arc::ptr_eq(&p.cert, cert) && p.has_room(self.max_streams_per_tunnel))
        {
            pooled.streams += 1;
            return NextStep::Use(pooled.sender.clone(), StreamSlot::take(&pooled.open));
        }
        if self.max_streams_per_tunnel == 1 {
            return NextStep::Dial(None);
        }
        if let Some(dial) = tunnels.dialing.get(key)
            && dial.has_changed().is_ok()
        {
            return NextStep::Wait(dial.clone());
        }
        let (flight, dial) = watch::channel(None);
        tunnels.dialing.insert(key.clone(), dial);
        NextStep::Dial(Some(flight))
    }

    /// Dials a tunnel, pools it, opens this connection's stream on it and tells the
    /// connections waiting on `flight` how it went.
    #[expect(
        clippy::too_many_arguments,
        reason = "the parts of one open_stream call"
    )]
    async fn dial_for_pool(
        &self,
        pod: &PodContext,
        home: &Netns,
        cert: Arc<WorkloadCert>,
        destination: &Identity,
        key: PoolKey,
        target: SocketAddr,
        flight: Option<watch::Sender<DialOutcome>>,
    ) -> Result<H2Stream, ProxyError> {
        let dialed = self
            .dial(pod, home, &cert, destination, key.hbone)
            .await
            .map(|sender| {
                let open = Arc::new(AtomicUsize::new(0));
                let slot = StreamSlot::take(&open);
                (sender, open, slot)
            });
        {
            // One lock for both: a connection arriving now finds the tunnel or the dial.
            let mut tunnels = self.tunnels.lock();
            if flight.is_some() {
                tunnels.dialing.remove(&key);
            }
            if let Ok((sender, open, _)) = &dialed {
                let pooled = Pooled {
                    cert,
                    sender: sender.clone(),
                    streams: 1,
                    open: open.clone(),
                };
                tunnels.ready.insert(key, pooled);
            }
        }
        match dialed {
            Ok((sender, _, slot)) => {
                if let Some(flight) = flight {
                    flight.send_replace(Some(Ok(())));
                }
                Ok(hbone::connect(sender, target).await?.with_slot(slot))
            }
            Err(error) => match flight.filter(|flight| flight.receiver_count() > 0) {
                Some(flight) => {
                    let error = Arc::new(error);
                    flight.send_replace(Some(Err(error.clone())));
                    Err(ProxyError::SharedDial(error))
                }
                None => Err(error),
            },
        }
    }

    /// A new tunnel: TCP from inside the source pod, TLS 1.3 as the source identity
    /// (verifying the destination's), then HTTP/2.
    async fn dial(
        &self,
        pod: &PodContext,
        home: &Netns,
        cert: &WorkloadCert,
        destination: &Identity,
        hbone: SocketAddr,
    ) -> Result<SendRequest<Bytes>, ProxyError> {
        let config = tls::client_config(cert, &self.trust_bundle, destination.clone())
            .map_err(HandshakeError::from)?;
        let tcp = connect_from_pod(pod, home, hbone, Dial::Outbound).await?;
        let connecting =
            TlsConnector::from(config).connect(ServerName::IpAddress(hbone.ip().into()), tcp);
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| HandshakeError::TimedOutWith(hbone))?
            .map_err(HandshakeError::from)?;
        debug!(%hbone, %destination, "HBONE tunnel established");
        self.metrics.tunnel_opened();
        Ok(hbone::client_handshake(tls).await?)
    }

    /// Forgets what departed pods left behind: the certificates (and their renewals) and
    /// server configurations of identities no local pod has any more (`needed`), and the
    /// pooled tunnels from or to an address that is no pod's now (`is_pod`), or whose
    /// connection is gone (an evicted dead tunnel is redialled on next use).
    pub fn prune(&self, needed: &HashSet<Identity>, is_pod: impl Fn(IpAddr) -> bool) {
        for identity in self.manager.identities() {
            if !needed.contains(&identity) {
                self.manager.forget(&identity);
            }
        }
        self.server_configs
            .lock()
            .retain(|identity, _| needed.contains(identity));
        let mut tunnels = self.tunnels.lock();
        tunnels.ready.retain(|key, pooled| {
            let alive = !matches!(pooled.sender.clone().ready().now_or_never(), Some(Err(_)));
            alive && needed.contains(&key.source) && is_pod(key.source_ip) && is_pod(key.hbone.ip())
        });
        // Dials whose connection gave up on them (the channel closed).
        tunnels.dialing.retain(|_, dial| dial.has_changed().is_ok());
    }

    /// Tunnels in the pool (some may be draining towards their replacement).
    pub fn pooled_tunnels(&self) -> usize {
        self.tunnels.lock().ready.len()
    }

    /// Accepts the TLS side of an inbound tunnel as `identity`; returns the stream and the
    /// verified identity of the peer.
    pub async fn accept(
        &self,
        identity: &Identity,
        stream: tokio::net::TcpStream,
    ) -> Result<(TlsStream<tokio::net::TcpStream>, Identity), ProxyError> {
        let config = self.server_config(identity).await?;
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(stream))
            .await
            .map_err(|_| HandshakeError::TimedOut)?
            .map_err(HandshakeError::from)?;
        let peer = tls::peer_identity(tls.get_ref().1, &self.trust_domain)
            .map_err(HandshakeError::from)?;
        Ok((tls, peer))
    }

    /// The server configuration for `identity`, rebuilt only when its certificate changed.
    async fn server_config(&self, identity: &Identity) -> Result<Arc<ServerConfig>, ProxyError> {
        let cert = self.certificate(identity).await?;
        let mut configs = self.server_configs.lock();
        if let Some((cached, config)) = configs.get(identity)
            && Arc::ptr_eq(cached, &cert)
        {
            return Ok(config.clone());
        }
        let config = tls::server_config(&cert, &self.trust_bundle).map_err(HandshakeError::from)?;
        configs.insert(identity.clone(), (cert, config.clone()));
        Ok(config)
    }
}
