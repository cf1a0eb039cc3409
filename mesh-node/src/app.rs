//! Wires the agent together. Servers bind first and spawn later, so callers (and tests)
//! can bind port 0 and read the addresses back from [`Bound`].
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    access_log::AccessLog,
    admin::{Admin, LogControl},
    ca_server::{self, CaService, TokenFile},
    cli::{CaConfig, RunConfig},
    cni::{self, install::Installation, server::CniServer},
    config::file::FileSource,
    distributed_tracing::{TraceConfig, Tracing},
    ebpf::Capture,
    enroll::Enrollment,
    identity::{
        self, CertState, CertificateAuthority, CertificateManager, CertificateSigner, ManagerConfig,
    },
    metrics::{self, Metrics, NodeMetrics, server::Endpoints},
    netns::Netns,
    proxy::{Mtls, ProxyContext, Resolver, connections::Connections},
    readiness::Readiness,
    signal,
    signer::{NodeSigner, RemoteSigner},
    state::{State, StateRx},
};

/// How often the eBPF counters and certificate expiries are copied into the metrics.
const NODE_METRICS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the eBPF maps' entries are counted: a count walks every key, up to 65,536
/// system calls for the largest map.
const MAP_FILL_INTERVAL: Duration = Duration::from_secs(5);

/// The running agent.
pub struct Bound {
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub health_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// Flushed last, so spans of connections that drained still leave.
    tracing: Arc<Tracing>,
}

pub async fn build(config: RunConfig, log: Option<LogControl>) -> anyhow::Result<Bound> {
    info!(config = %serde_json::to_string(&config)?, "starting mesh-node");
    let readiness = Readiness::default();
    let config_ready = readiness.register("config");
    let pods_ready = readiness.register("pods");
    let metrics = Metrics::new().context("registering metrics")?;
    let shutdown = CancellationToken::new();

    let metrics_listener = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("binding metrics on {}", config.metrics_addr))?;
    let health_listener = TcpListener::bind(config.health_addr)
        .await
        .with_context(|| format!("binding health on {}", config.health_addr))?;
    let admin_listener = TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("binding admin on {}", config.admin_addr))?;
    let bound_admin = admin_listener.local_addr()?;
    let bound_metrics = metrics_listener.local_addr()?;
    let bound_health = health_listener.local_addr()?;

    let home = Arc::new(Netns::current().context("opening the agent's own netns")?);
    let capture = Arc::new(
        Capture::attach(&config.cgroup_path).context("loading and attaching eBPF capture")?,
    );

    let (state_tx, state_rx) = watch::channel(Arc::new(State::default()));
    let mut source = FileSource::new(&config.config_dir, config.root_namespace.clone());
    source
        .publish(&state_tx, &metrics.node)
        .with_context(|| format!("reading config dir {}", config.config_dir.display()))?;
    drop(config_ready);

    let mtls = match (&config.ca_dir, config.ca_addr) {
        (Some(dir), _) => Some(Arc::new(local_ca(
            &config,
            &metrics.node,
            dir,
            state_rx.clone(),
        )?)),
        (None, Some(addr)) => Some(Arc::new(remote_ca(&config, &metrics.node, addr)?)),
        (None, None) => {
            warn!("no --ca-dir or --ca-addr: mutual TLS is off; enrolled pods talk plaintext");
            None
        }
    };
    let proxy_mtls = mtls.clone();
    let tracing = Arc::new(
        Tracing::new(
            &TraceConfig {
                otlp_endpoint: config.observability.otlp_endpoint.clone(),
                sampling_percent: config.observability.trace_sampling,
                node: config.node_name.clone(),
            },
            tokio::runtime::Handle::current(),
        )
        .context("setting up tracing")?,
    );
    let connections = Arc::new(Connections::default());
    let proxy = ProxyContext {
        state: state_rx.clone(),
        capture: capture.clone(),
        metrics: metrics.clone(),
        resolver: Arc::new(Resolver::default()),
        home,
        mtls,
        clusters: Arc::default(),
        upstreams: Arc::default(),
        access_log: Arc::new(AccessLog::stdout(config.observability.access_log)),
        tracing: tracing.clone(),
        connections: connections.clone(),
    };

    let admin_state = state_rx.clone();
    let mut tasks = JoinSet::new();
    tasks.spawn(source.watch(state_tx, metrics.node.clone(), shutdown.clone()));
    let mut enrollment = Enrollment::new(config.node_name.clone(), proxy);
    if let Some(socket) = &config.cni.socket {
        let server = CniServer::bind(socket).context("binding the CNI socket")?;
        let (handle, requests) = cni::server::channel();
        tasks.spawn(server.serve(handle, shutdown.clone()));
        enrollment = enrollment.with_cni(requests);
    }
    if let Some(installation) = Installation::from_flags(&config.cni) {
        tasks.spawn(cni::install::keep_installed(installation, shutdown.clone()));
    }
    tasks.spawn(enrollment.run(state_rx, pods_ready, shutdown.clone()));
    tasks.spawn(metrics::serve(
        metrics_listener,
        Endpoints::Metrics(metrics.clone()),
        shutdown.clone(),
    ));
    let admin = Admin {
        node: config.node_name.clone(),
        state: admin_state,
        mtls: proxy_mtls.clone(),
        readiness: readiness.clone(),
        log,
        connections,
    };
    tasks.spawn(metrics::serve(
        admin_listener,
        Endpoints::Admin(Arc::new(admin)),
        shutdown.clone(),
    ));
    tasks.spawn(metrics::serve(
        health_listener,
        Endpoints::Health(readiness),
        shutdown.clone(),
    ));
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
        shutdown,
        tasks,
        tracing,
    })
}

/// The in-process CA (file-backed root in `dir`) and the certificate manager in front of it.
fn local_ca(
    config: &RunConfig,
    metrics: &NodeMetrics,
    dir: &Path,
    state: StateRx,
) -> anyhow::Result<Mtls> {
    let ca = CertificateAuthority::load_or_create(dir, &config.trust_domain)
        .with_context(|| format!("loading the CA in {}", dir.display()))?;
    let trust_bundle = ca.trust_bundle();
    let signer = NodeSigner {
        ca: Arc::new(ca),
        node: config.node_name.clone(),
        state,
    };
    info!(ca_dir = %dir.display(), trust_domain = %config.trust_domain, "mutual TLS on, in-process CA");
    Ok(mtls(config, metrics, Arc::new(signer), trust_bundle))
}

/// A `mesh-node ca` service behind the certificate manager.
fn remote_ca(config: &RunConfig, metrics: &NodeMetrics, addr: SocketAddr) -> anyhow::Result<Mtls> {
    let root_file = config
        .ca_root_file
        .as_deref()
        .context("--ca-root-file is required")?;
    let token_file = config
        .ca_token_file
        .as_deref()
        .context("--ca-token-file is required")?;
    let roots =
        std::fs::read(root_file).with_context(|| format!("reading {}", root_file.display()))?;
    let trust_bundle = ca_server::certificates_from_pem(&roots)
        .map_err(|e| anyhow::anyhow!("{}: {e}", root_file.display()))?;
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("reading {}", token_file.display()))?
        .trim()
        .to_string();
    let expected = ca_server::ca_identity(&config.trust_domain, &config.root_namespace)?;
    let tls = identity::tls::ca_client_config(&trust_bundle, expected)?;
    let signer = RemoteSigner { addr, tls, token };
    info!(ca = %addr, trust_domain = %config.trust_domain, "mutual TLS on, remote CA");
    Ok(mtls(config, metrics, Arc::new(signer), trust_bundle))
}

fn mtls(
    config: &RunConfig,
    metrics: &NodeMetrics,
    signer: Arc<dyn CertificateSigner>,
    trust_bundle: Vec<rustls_pki_types::CertificateDer<'static>>,
) -> Mtls {
    let manager = CertificateManager::new(
        signer,
        ManagerConfig {
            ttl: config.cert_ttl,
            ..ManagerConfig::default()
        },
    );
    Mtls::new(
        Arc::new(manager),
        trust_bundle,
        config.trust_domain.clone(),
        config.hbone_streams_per_tunnel,
        metrics.clone(),
    )
}

/// `mesh-node ca`: loads the CA, follows the config for node authorization, serves until
/// SIGTERM/SIGINT.
pub async fn run_ca(config: CaConfig) -> anyhow::Result<()> {
    info!(config = %serde_json::to_string(&config)?, "starting mesh-node ca");
    let ca = CertificateAuthority::load_or_create(&config.ca_dir, &config.trust_domain)
        .with_context(|| format!("loading the CA in {}", config.ca_dir.display()))?;
    let authenticator = TokenFile::load(&config.node_tokens)
        .with_context(|| format!("reading {}", config.node_tokens.display()))?;
    let identity = ca_server::ca_identity(&config.trust_domain, &config.root_namespace)?;
    let serving = ca_server::serving_certificate(&ca, &identity)?;
    let tls = identity::tls::ca_server_config(&serving)?;
    let metrics = Metrics::new().context("registering metrics")?;
    let (state_tx, state_rx) = watch::channel(Arc::new(State::default()));
    let mut source = FileSource::new(&config.config_dir, config.root_namespace.clone());
    source
        .publish(&state_tx, &metrics.node)
        .with_context(|| format!("reading config dir {}", config.config_dir.display()))?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let shutdown = CancellationToken::new();
    let service = Arc::new(CaService {
        ca: Arc::new(ca),
        authenticator: Arc::new(authenticator),
        state: state_rx,
    });
    let mut tasks = JoinSet::new();
    tasks.spawn(source.watch(state_tx, metrics.node.clone(), shutdown.clone()));
    tasks.spawn(service.serve(listener, tls, shutdown.clone()));
    info!(listen = %config.listen, %identity, "mesh-node ca running");
    signal::shutdown_requested().await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

impl Bound {
    /// Runs until SIGTERM/SIGINT, then drains: pods are un-enrolled and the eBPF programs
    /// detached (the `Capture` drops with the last task that holds it).
    pub async fn wait(self) -> anyhow::Result<()> {
        signal::shutdown_requested().await;
        self.stop().await;
        info!("mesh-node stopped");
        Ok(())
    }

    /// Stops the agent without a signal (embedding, tests).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        // The flush waits for posts that run on this runtime: not on one of its workers.
        let tracing = self.tracing;
        let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
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
