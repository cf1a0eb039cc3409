//! Wires the agent together. Servers bind first and spawn later, so callers (and tests)
//! can bind port 0 and read the addresses back from [`Bound`].
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    cli::RunConfig,
    config::file::FileSource,
    ebpf::Capture,
    enroll::Enrollment,
    identity::{CertState, CertificateAuthority, CertificateManager, ManagerConfig},
    metrics::{self, Metrics, server::Endpoints},
    netns::Netns,
    proxy::{Mtls, ProxyContext, Resolver},
    readiness::Readiness,
    signal,
    signer::NodeSigner,
    state::{State, StateRx},
};

/// How often the eBPF counters and certificate expiries are copied into the metrics.
const NODE_METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// The running agent.
pub struct Bound {
    pub metrics_addr: SocketAddr,
    pub health_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

pub async fn build(config: RunConfig) -> anyhow::Result<Bound> {
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

    let mtls = match &config.ca_dir {
        Some(dir) => Some(Arc::new(mtls(&config, dir, state_rx.clone())?)),
        None => {
            warn!("no --ca-dir: mutual TLS is off and enrolled pods talk plaintext");
            None
        }
    };
    let proxy_mtls = mtls.clone();
    let proxy = ProxyContext {
        state: state_rx.clone(),
        capture: capture.clone(),
        metrics: metrics.clone(),
        resolver: Arc::new(Resolver::default()),
        home,
        mtls,
    };

    let mut tasks = JoinSet::new();
    tasks.spawn(source.watch(state_tx, metrics.node.clone(), shutdown.clone()));
    tasks.spawn(Enrollment::new(config.node_name.clone(), proxy).run(
        state_rx,
        pods_ready,
        shutdown.clone(),
    ));
    tasks.spawn(metrics::serve(
        metrics_listener,
        Endpoints::Metrics(metrics.clone()),
        shutdown.clone(),
    ));
    tasks.spawn(metrics::serve(
        health_listener,
        Endpoints::Health(readiness),
        shutdown.clone(),
    ));
    tasks.spawn(export_node_metrics(
        capture,
        proxy_mtls,
        metrics,
        shutdown.clone(),
    ));
    info!(metrics = %bound_metrics, health = %bound_health, node = %config.node_name, "mesh-node running");
    Ok(Bound {
        metrics_addr: bound_metrics,
        health_addr: bound_health,
        shutdown,
        tasks,
    })
}

/// The in-process CA (file-backed root in `dir`) and the certificate manager in front of it.
fn mtls(config: &RunConfig, dir: &std::path::Path, state: StateRx) -> anyhow::Result<Mtls> {
    let ca = CertificateAuthority::load_or_create(dir, &config.trust_domain)
        .with_context(|| format!("loading the CA in {}", dir.display()))?;
    let trust_bundle = ca.trust_bundle();
    let signer = NodeSigner {
        ca: Arc::new(ca),
        node: config.node_name.clone(),
        state,
    };
    let manager = CertificateManager::new(
        Arc::new(signer),
        ManagerConfig {
            ttl: config.cert_ttl,
            ..ManagerConfig::default()
        },
    );
    info!(ca_dir = %dir.display(), trust_domain = %config.trust_domain, "mutual TLS on");
    Ok(Mtls::new(
        Arc::new(manager),
        trust_bundle,
        config.trust_domain.clone(),
    ))
}

impl Bound {
    /// Runs until SIGTERM/SIGINT, then drains: pods are un-enrolled and the eBPF programs
    /// detached (the `Capture` drops with the last task that holds it).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        signal::shutdown_requested().await;
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        info!("mesh-node stopped");
        Ok(())
    }

    /// Stops the agent without a signal (embedding, tests).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
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
        let counters = capture.counters();
        let node = &metrics.node;
        node.set_bpf_event("outbound_redirected", counters.outbound_redirected);
        node.set_bpf_event("outbound_proxy_bypass", counters.outbound_proxy_bypass);
        node.set_bpf_event("inbound_steered", counters.inbound_steered);
        node.set_bpf_event("inbound_no_listener", counters.inbound_no_listener);
        node.set_bpf_event("orig_dst_table_full", counters.orig_dst_table_full);
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
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(NODE_METRICS_INTERVAL) => {}
        }
    }
}
