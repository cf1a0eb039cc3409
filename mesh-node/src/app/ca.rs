//! `mesh-node ca`, wired: the cluster CA service.
use std::sync::Arc;

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::source::ConfigSource;
use crate::{
    ca_server::{
        self, Authenticator, CaService, TokenFile, cluster_root,
        token_review::TokenReviewAuthenticator,
    },
    cli::CaConfig,
    identity::{self, CertificateAuthority},
    metrics::Metrics,
    readiness::Readiness,
    signal,
    state::{State, StateRx},
};

/// `mesh-node ca`: loads the CA (from `--ca-dir`, or the cluster's Secret), checks agents'
/// tokens (from `--node-tokens`, or with TokenReview), follows where pods run for node
/// authorization, serves until SIGTERM/SIGINT.
pub async fn run_ca(config: CaConfig) -> anyhow::Result<()> {
    info!(config = %serde_json::to_string(&config)?, "starting mesh-node ca");
    let in_cluster = config.ca_dir.is_none() || config.node_tokens.is_none();
    let kube = if in_cluster {
        Some(kube::Client::try_default().await.context(
            "connecting to the Kubernetes API (needed without --ca-dir or --node-tokens)",
        )?)
    } else {
        None
    };
    let in_cluster_client = || {
        kube.clone()
            .context("no Kubernetes client: give --ca-dir and --node-tokens outside a cluster")
    };

    let ca = match &config.ca_dir {
        Some(dir) => CertificateAuthority::load_or_create(dir, &config.trust_domain)
            .with_context(|| format!("loading the CA in {}", dir.display()))?,
        None => {
            let (ca, source) = cluster_root::load_ca(
                in_cluster_client()?,
                &config.namespace,
                &config.trust_domain,
            )
            .await
            .context("loading the CA from its Secret")?;
            info!(namespace = %config.namespace, ?source, "CA root from a Secret");
            ca
        }
    };
    if let Some(client) = &kube {
        cluster_root::publish_trust_bundle(client.clone(), &config.namespace, &ca)
            .await
            .context("publishing the trust bundle for agents")?;
    }
    let authenticator: Arc<dyn Authenticator> = match &config.node_tokens {
        Some(path) => {
            Arc::new(TokenFile::load(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => Arc::new(
            TokenReviewAuthenticator::new(
                in_cluster_client()?,
                &config.namespace,
                &config.agent_service_account,
                &config.token_audience,
            )
            .with_gateways(config.gateway_service_accounts.clone()),
        ),
    };
    let identity = ca_server::ca_identity(&config.trust_domain, &config.root_namespace)?;
    let serving = ca_server::serving_certificate(&ca, &identity)?;
    let tls = identity::tls::ca_server_config(&serving)?;
    let metrics = Metrics::new().context("registering metrics")?;
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let pods = follow_pods_for_node_authorization(&config, &metrics, &mut tasks, &shutdown).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let service = Arc::new(CaService {
        ca: Arc::new(ca),
        authenticator,
        state: pods,
        max_cert_ttl: config.max_cert_ttl,
    });
    tasks.spawn(service.serve(listener, tls, shutdown.clone()));
    info!(listen = %config.listen, %identity, "mesh-node ca running");
    signal::shutdown_requested().await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Where pods are scheduled, for the CA's node authorization: Pods from the API server, or
/// the YAML in `--config-dir`, followed until `shutdown`. Returns once the first state is in,
/// so the CA never judges a request against an empty view.
async fn follow_pods_for_node_authorization(
    config: &CaConfig,
    metrics: &Metrics,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) -> anyhow::Result<StateRx> {
    let (state_tx, mut state_rx) = watch::channel(Arc::new(State::default()));
    let source = ConfigSource::start(
        config.config_source,
        config.config_dir.as_deref(),
        &config.root_namespace,
        &state_tx,
        &metrics.node,
    )
    .await?
    .pods_only();
    let readiness = Readiness::default();
    tasks.spawn(source.run(
        state_tx,
        metrics.node.clone(),
        readiness.register("pods"),
        shutdown.clone(),
    ));
    state_rx
        .changed()
        .await
        .context("the config source stopped before its first state")?;
    info!(
        pods = state_rx.borrow().workloads.len(),
        "following where pods run"
    );
    Ok(state_rx)
}
