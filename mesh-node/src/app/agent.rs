//! `mesh-node run`, wired: the agent. Servers bind first and spawn later, so callers (and
//! tests) can bind port 0 and read the addresses back from [`Bound`].
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{sync::watch, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::source::ConfigSource;
use crate::{
    access_log::AccessLog,
    admin::{Admin, LogControl},
    ca_server,
    cli::{IdentityConfig, ObservabilityConfig, RunConfig},
    cni::{self, install::Installation, owner::CniOwner, server::CniServer},
    distributed_tracing::{TraceConfig, Tracing},
    ebpf::{Capture, Pins},
    endpoints::{self, Endpoints},
    enroll::Enrollment,
    holder::HolderClient,
    identity::{
        self, CertState, CertificateAuthority, CertificateManager, CertificateSigner, ManagerConfig,
    },
    inventory::ObjectKey,
    jwks::{self, JwksCache},
    metrics::{Metrics, NodeMetrics},
    netns::Netns,
    proxy::{Mtls, ProxyContext, Resolver, connections::Connections},
    readiness::{Readiness, ReadinessGuard},
    signal,
    signer::{self, CaAddress, NodeSigner, RemoteSigner},
    state::{State, StateRx},
};

/// How often the eBPF counters and certificate expiries are copied into the metrics.
const NODE_METRICS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the eBPF maps' entries are counted: a count walks every key, up to 65,536
/// system calls for the largest map.
const MAP_FILL_INTERVAL: Duration = Duration::from_secs(5);

/// How often a draining agent looks whether its connections have finished.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often an agent asks the holder whether a successor runs beside it.
const SUCCESSOR_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// The drain of an agent no successor runs beside (a restart in place): while it drains
/// nobody accepts, so new connections wait for its end and the next agent's start. The
/// connections still open then are cut rather than hold every new one off.
const ALONE_DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// The running agent.
pub struct Bound {
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub health_addr: SocketAddr,
    /// Stops the pods' accept loops and the enrollment: the first step of a drain.
    accepting: CancellationToken,
    /// Tells the connections being served to finish (GOAWAY, close between requests).
    drain: CancellationToken,
    drain_timeout: Duration,
    connections: Arc<Connections>,
    readiness: Readiness,
    /// Where capture is pinned, for the uninstall when the DaemonSet goes.
    bpffs_path: PathBuf,
    /// Tells whether a successor runs beside this agent when it drains; closes the held
    /// listeners at the uninstall.
    holder: Option<Arc<HolderClient>>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// Flushed last, so spans of connections that drained still leave.
    tracing: Arc<Tracing>,
    /// The DaemonSet whose deletion takes the CNI plugin off the node, and what to remove.
    cni_owner: Option<(ObjectKey, Installation)>,
}

pub async fn build(config: RunConfig, log: Option<LogControl>) -> anyhow::Result<Bound> {
    info!(config = %serde_json::to_string(&config)?, "starting mesh-node");
    let readiness = Readiness::default();
    let config_ready = readiness.register("config");
    let pods_ready = readiness.register("pods");
    let metrics = Metrics::new().context("registering metrics")?;
    let shutdown = CancellationToken::new();

    // Shared ports (SO_REUSEPORT): a new agent starts beside the old one it replaces.
    let endpoints::Listeners {
        metrics: metrics_listener,
        health: health_listener,
        admin: admin_listener,
    } = endpoints::Listeners::bind(&config.endpoints)?;
    let bound_admin = admin_listener.local_addr()?;
    let bound_metrics = metrics_listener.local_addr()?;
    let bound_health = health_listener.local_addr()?;
    // Health first: while the agent waits for what it needs (the CA's root), it answers
    // "alive, not ready" instead of being restarted for not answering.
    let mut tasks = JoinSet::new();
    tasks.spawn(endpoints::serve(
        health_listener,
        Endpoints::Health(readiness.clone()),
        shutdown.clone(),
    ));

    let home = Arc::new(Netns::current().context("opening the agent's own netns")?);
    let pins =
        Pins::open(&config.bpffs_path).context("opening the pin directory (--bpffs-path)")?;
    let capture = Arc::new(
        Capture::attach(&config.cgroup_path, pins, config.sockmap)
            .context("loading and attaching eBPF capture")?,
    );

    let (state_tx, state_rx) = watch::channel(Arc::new(State::default()));
    let source = ConfigSource::start(
        config.config_source,
        config.config_dir.as_deref(),
        &config.root_namespace,
        &state_tx,
        &metrics.node,
    )
    .await?;

    let mtls = workload_mtls(
        &config.identity,
        &config.node_name,
        &config.root_namespace,
        &metrics.node,
        state_rx.clone(),
        &readiness,
    )
    .await?;
    let proxy_mtls = mtls.clone();
    let proxy = ProxyParts {
        observability: &config.observability,
        node: &config.node_name,
        metrics: &metrics,
        state: &state_rx,
        capture: Some(capture.clone()),
        resolver: Resolver::new(config.outbound_traffic_policy),
        home,
        mtls,
        keys_for: jwks::Served::EnrolledOn(config.node_name.clone()),
        jwks_refresh_interval: config.jwks_refresh_interval,
    }
    .build(&mut tasks, &shutdown)?;
    let (tracing, connections, drain) = (
        proxy.tracing.clone(),
        proxy.connections.clone(),
        proxy.drain.clone(),
    );
    let jwks_for_admin = proxy.jwks.clone();

    let admin_state = state_rx.clone();
    tasks.spawn(source.run(
        state_tx,
        metrics.node.clone(),
        config_ready,
        shutdown.clone(),
    ));
    tasks.spawn(prune_departed(
        proxy.clone(),
        config.node_name.clone(),
        state_rx.clone(),
        shutdown.clone(),
    ));
    let mut enrollment = Enrollment::new(config.node_name.clone(), proxy, capture.clone());
    let holder = config
        .holder_socket
        .as_ref()
        .map(|socket| Arc::new(HolderClient::new(socket.clone())));
    if let Some(holder) = &holder {
        enrollment = enrollment.with_holder(holder.clone());
    }
    if let Some(socket) = &config.cni.socket {
        let server = CniServer::bind(socket).context("binding the CNI socket")?;
        let (handle, requests) = cni::server::channel();
        tasks.spawn(server.serve(handle, shutdown.clone()));
        enrollment = enrollment.with_cni(requests);
    }
    let installation = Installation::from_flags(&config.cni);
    if let Some(installation) = installation.clone() {
        tasks.spawn(cni::install::keep_installed(installation, shutdown.clone()));
    }
    let cni_owner = config.cni.uninstall_with.clone().zip(installation);
    let accepting = CancellationToken::new();
    tasks.spawn(enrollment.run(state_rx, pods_ready, accepting.clone()));
    tasks.spawn(endpoints::serve(
        metrics_listener,
        Endpoints::Metrics(Box::new(metrics.clone())),
        shutdown.clone(),
    ));
    let admin = Admin {
        node: config.node_name.clone(),
        state: admin_state,
        mtls: proxy_mtls.clone(),
        readiness: readiness.clone(),
        log,
        connections: connections.clone(),
        outbound_traffic_policy: config.outbound_traffic_policy,
        jwt_keys: jwks_for_admin,
        gateway: None,
    };
    tasks.spawn(endpoints::serve(
        admin_listener,
        Endpoints::Admin(Arc::new(admin)),
        shutdown.clone(),
    ));
    if let Some(holder) = &holder {
        tasks.spawn(unready_once_replaced(
            holder.clone(),
            readiness.clone(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(export_map_fill(
        capture.clone(),
        metrics.node.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(export_node_metrics(
        capture,
        proxy_mtls,
        metrics,
        shutdown.clone(),
    ));
    info!(
        metrics = %bound_metrics,
        health = %bound_health,
        admin = %bound_admin,
        node = %config.node_name,
        "mesh-node running"
    );
    Ok(Bound {
        admin_addr: bound_admin,
        metrics_addr: bound_metrics,
        health_addr: bound_health,
        accepting,
        drain,
        drain_timeout: config.drain_timeout,
        connections,
        readiness,
        bpffs_path: config.bpffs_path.clone(),
        holder,
        shutdown,
        tasks,
        tracing,
        cni_owner,
    })
}

/// What a proxy's context is built from: the node agent's and a gateway's differ only in
/// these.
pub(super) struct ProxyParts<'a> {
    pub observability: &'a ObservabilityConfig,
    /// The node, as spans name it.
    pub node: &'a str,
    pub metrics: &'a Metrics,
    pub state: &'a StateRx,
    pub capture: Option<Arc<Capture>>,
    pub resolver: Resolver,
    pub home: Arc<Netns>,
    pub mtls: Option<Arc<Mtls>>,
    /// Whose RequestAuthentications' key sets to fetch.
    pub keys_for: jwks::Served,
    pub jwks_refresh_interval: Duration,
}

impl ProxyParts<'_> {
    /// The context, with its tracer, access log and connection table, and the task that
    /// keeps its JWT key sets fresh spawned on `tasks` until `shutdown`.
    pub(super) fn build(
        self,
        tasks: &mut JoinSet<()>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<ProxyContext> {
        let tracing = Tracing::new(
            &TraceConfig {
                otlp_endpoint: self.observability.otlp_endpoint.clone(),
                sampling_percent: self.observability.trace_sampling,
                node: self.node.to_owned(),
            },
            tokio::runtime::Handle::current(),
        )
        .context("setting up tracing")?;
        let jwks = Arc::new(JwksCache::default());
        tasks.spawn(jwks::keep_fresh(
            jwks.clone(),
            self.state.clone(),
            self.keys_for,
            self.jwks_refresh_interval,
            self.metrics.node.clone(),
            shutdown.clone(),
        ));
        Ok(ProxyContext {
            state: self.state.clone(),
            capture: self.capture,
            metrics: self.metrics.clone(),
            resolver: Arc::new(self.resolver),
            home: self.home,
            mtls: self.mtls,
            clusters: Arc::default(),
            upstreams: Arc::default(),
            access_log: Arc::new(
                AccessLog::stdout(self.observability.access_log)
                    .counting_drops_in(self.metrics.node.access_log_dropped()),
            ),
            tracing: Arc::new(tracing),
            jwks,
            connections: Arc::new(Connections::default()),
            node_addresses: Arc::default(),
            drain: CancellationToken::new(),
        })
    }
}

/// Mutual TLS with workload certificates from the CA the flags name (in-process with
/// `--ca-dir`, a `mesh-node ca` service with `--ca-addr`); `None` (plaintext) without
/// either. `node` is whose pods' identities may be asked for.
pub(super) async fn workload_mtls(
    config: &IdentityConfig,
    node: &str,
    root_namespace: &str,
    metrics: &NodeMetrics,
    state: StateRx,
    readiness: &Readiness,
) -> anyhow::Result<Option<Arc<Mtls>>> {
    let (signer, trust_bundle): (Arc<dyn CertificateSigner>, _) = match (
        &config.ca_dir,
        config.ca_addr.clone(),
    ) {
        (Some(dir), _) => {
            let ca = CertificateAuthority::load_or_create(dir, &config.trust_domain)
                .with_context(|| format!("loading the CA in {}", dir.display()))?;
            let trust_bundle = ca.trust_bundle();
            info!(ca_dir = %dir.display(), trust_domain = %config.trust_domain, "mutual TLS on, in-process CA");
            let signer = NodeSigner {
                ca: Arc::new(ca),
                node: node.to_owned(),
                state,
            };
            (Arc::new(signer), trust_bundle)
        }
        (None, Some(addr)) => {
            let (signer, trust_bundle) = remote_ca(config, root_namespace, addr, readiness).await?;
            (Arc::new(signer), trust_bundle)
        }
        (None, None) => {
            warn!("no --ca-dir or --ca-addr: mutual TLS is off; enrolled pods talk plaintext");
            return Ok(None);
        }
    };
    let manager = CertificateManager::new(
        signer,
        ManagerConfig {
            ttl: config.cert_ttl,
            ..ManagerConfig::default()
        },
    );
    Ok(Some(Arc::new(Mtls::new(
        Arc::new(manager),
        trust_bundle,
        config.trust_domain.clone(),
        config.hbone_streams_per_tunnel,
        metrics.clone(),
    ))))
}

/// A `mesh-node ca` service to ask for certificates. Waits (unready) for the CA's root
/// file, which in Kubernetes appears once the CA has published it.
async fn remote_ca(
    config: &IdentityConfig,
    root_namespace: &str,
    addr: CaAddress,
    readiness: &Readiness,
) -> anyhow::Result<(RemoteSigner, Vec<rustls_pki_types::CertificateDer<'static>>)> {
    let root_file = config
        .ca_root_file
        .as_deref()
        .context("--ca-root-file is required")?;
    let token_file = config
        .ca_token_file
        .clone()
        .context("--ca-token-file is required")?;
    let trust_bundle = {
        let _waiting = readiness.register("ca-root");
        signer::wait_for_trust_bundle(root_file).await
    };
    let expected = ca_server::ca_identity(&config.trust_domain, root_namespace)?;
    let tls = identity::tls::ca_client_config(&trust_bundle, expected)?;
    info!(ca = %addr, trust_domain = %config.trust_domain, "mutual TLS on, remote CA");
    let signer = RemoteSigner {
        addr,
        tls,
        token_file,
    };
    Ok((signer, trust_bundle))
}

impl Bound {
    /// Runs until SIGTERM/SIGINT, then drains ([`stop`](Self::stop)).
    pub async fn wait(self) -> anyhow::Result<()> {
        signal::shutdown_requested().await;
        self.stop().await;
        info!("mesh-node stopped");
        Ok(())
    }

    /// Stops the agent and leaves the mesh on: unready, it stops accepting (the listeners
    /// stay open in the holder and pinned capture keeps steering to them, so new
    /// connections go to the successor beside it, or wait for the next agent), lets its
    /// connections finish up to `--drain-timeout` (with a successor) or
    /// [`ALONE_DRAIN_LIMIT`] (without), then ends. Only when its DaemonSet is deleted does
    /// it switch capture off. Also for embedding and tests, without a signal.
    pub async fn stop(mut self) {
        let _draining: ReadinessGuard = self.readiness.register("draining");
        self.accepting.cancel();
        self.drain.cancel();
        let timeout = if self.successor().await {
            self.drain_timeout
        } else {
            self.drain_timeout.min(ALONE_DRAIN_LIMIT)
        };
        info!(?timeout, "draining");
        let open = self.drained_within(timeout).await;
        if open == 0 {
            info!("drained: every connection finished");
        } else {
            warn!(
                open,
                ?timeout,
                "drain deadline passed; closing the connections left"
            );
        }
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        // The flush waits for posts that run on this runtime: not on one of its workers.
        let tracing = self.tracing;
        let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
        if let Some((daemon_set, installation)) = self.cni_owner {
            match kube::Client::try_default().await {
                Ok(client) => {
                    let owner = CniOwner {
                        client,
                        namespace: daemon_set.namespace,
                        daemon_set: daemon_set.name,
                        installation,
                    };
                    if owner.uninstall_if_removed().await
                        && let Err(error) =
                            super::uninstall::uninstall(&self.bpffs_path, self.holder.as_deref())
                                .await
                    {
                        warn!(%error, "DaemonSet deleted, but capture could not be removed; run `mesh-node uninstall`");
                    }
                }
                Err(error) => {
                    warn!(%error, "no Kubernetes client: the CNI plugin and capture stay")
                }
            }
        }
    }

    /// Whether a successor took over the listeners beside this agent.
    async fn successor(&self) -> bool {
        let Some(holder) = self.holder.clone() else {
            return false;
        };
        match tokio::task::spawn_blocking(move || holder.successors()).await {
            Ok(Ok(successors)) => successors > 0,
            Ok(Err(error)) => {
                warn!(%error, "the holder cannot say whether a successor runs; draining as if alone");
                false
            }
            Err(_) => false,
        }
    }

    /// Waits until no connection is open or `timeout` passed; how many are still open.
    async fn drained_within(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let open = self.connections.len();
            if open == 0 || Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
        }
    }
}

/// Copies what the kernel counted and the certificates' expiries into the metrics.
async fn export_node_metrics(
    capture: Arc<Capture>,
    mtls: Option<Arc<Mtls>>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        let node = &metrics.node;
        node.record_bpf_counters(&capture.counters());
        if let Some(mtls) = &mtls {
            let expiries: Vec<_> = mtls
                .manager
                .snapshot()
                .into_iter()
                .filter_map(|(identity, state)| match state {
                    CertState::Ready(cert) => Some((identity.to_string(), cert.not_after)),
                    _ => None,
                })
                .collect();
            node.set_certificate_expiries(&expiries);
            node.set_pooled_tunnels(mtls.pooled_tunnels());
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(NODE_METRICS_INTERVAL) => {}
        }
    }
}

/// How often the proxy forgets what departed pods and callers left behind, besides after
/// every config change.
const PRUNE_INTERVAL: Duration = Duration::from_secs(30);

/// Keeps the proxy's memory flat under churn: prunes after each config change (pods and
/// Services leave with one) and every [`PRUNE_INTERVAL`] (idle pooled connections expire),
/// then gives the freed memory back to the system.
async fn prune_departed(
    proxy: ProxyContext,
    node: String,
    mut state: StateRx,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = state.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(PRUNE_INTERVAL) => {}
        }
        proxy.prune(&node);
        crate::memory::release_free_memory();
    }
}

/// Answers "not ready" while a successor runs beside this agent (an overlapping
/// replacement). The two share the node's health port (`SO_REUSEPORT`), so a probe of the
/// new pod may reach the old agent: it must not vouch for the new one, which is ready only
/// when it says so itself.
async fn unready_once_replaced(
    holder: Arc<HolderClient>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let mut replaced: Option<ReadinessGuard> = None;
    loop {
        let asking = holder.clone();
        let successors = tokio::task::spawn_blocking(move || asking.successors()).await;
        match (successors, replaced.is_some()) {
            (Ok(Ok(0)), true) => {
                info!("the successor left; ready again");
                replaced = None;
            }
            (Ok(Ok(n)), false) if n > 0 => {
                info!("a successor took over the listeners; answering not ready");
                replaced = Some(readiness.register("replaced"));
            }
            _ => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SUCCESSOR_CHECK_INTERVAL) => {}
        }
    }
}

/// Counts the entries of the agent's eBPF maps into the metrics, on a blocking thread.
async fn export_map_fill(capture: Arc<Capture>, node: NodeMetrics, shutdown: CancellationToken) {
    loop {
        let counting = capture.clone();
        match tokio::task::spawn_blocking(move || counting.map_fill()).await {
            Ok(fill) => node.set_bpf_map_fill(&fill),
            Err(error) => warn!(%error, "counting eBPF map entries failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(MAP_FILL_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    /// An agent started before the CA published its root stays alive and unready
    /// ("ca-root" pending) until the root file appears, then becomes ready.
    #[tokio::test(start_paused = true)]
    async fn a_remote_ca_agent_waits_unready_for_the_root_file() {
        let dir = tempfile::tempdir().unwrap();
        let root_file = dir.path().join("root-cert.pem");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "projected-token\n").unwrap();
        let cli = Cli::try_parse_from([
            "mesh-node",
            "run",
            "--node-name",
            "node-a",
            "--config-dir",
            "/unused",
            "--ca-addr",
            "127.0.0.1:15012",
            "--ca-root-file",
            root_file.to_str().unwrap(),
            "--ca-token-file",
            token_file.to_str().unwrap(),
        ])
        .unwrap();
        let Command::Run(config) = cli.command else {
            panic!("not run");
        };
        let readiness = Readiness::default();
        let addr = config.identity.ca_addr.clone().unwrap();
        let starting = tokio::spawn({
            let readiness = readiness.clone();
            async move { remote_ca(&config.identity, &config.root_namespace, addr, &readiness).await }
        });

        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!starting.is_finished(), "still waiting for the root file");
        assert_eq!(readiness.pending(), ["ca-root"]);

        CertificateAuthority::load_or_create(&dir.path().join("ca"), "cluster.local").unwrap();
        std::fs::copy(dir.path().join("ca/root-cert.pem"), &root_file).unwrap();
        tokio::time::timeout(Duration::from_secs(60), starting)
            .await
            .expect("the root file is picked up")
            .unwrap()
            .expect("the remote CA is set up");
        assert!(
            readiness.pending().is_empty(),
            "ready once the root is read"
        );
    }
}
