//! The config source `mesh-node run` and `mesh-node ca` read.
use std::path::Path;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    cli::{ConfigSourceKind, resolve_config_source},
    config::{file::FileSource, kube::KubeSource, without_blocking_the_runtime},
    metrics::NodeMetrics,
    readiness::ReadinessGuard,
    state::StateTx,
};

/// The config source `mesh-node run` or `mesh-node ca` reads, once its first state is in.
pub(super) enum ConfigSource {
    File(FileSource),
    Kube(KubeSource),
}

impl ConfigSource {
    /// Opens the source. A directory is read at once (a broken one fails start-up); the API
    /// server is listed by [`run`](Self::run), which drops `ready` when the first state is in.
    pub(super) async fn start(
        asked: Option<ConfigSourceKind>,
        dir: Option<&Path>,
        root_namespace: &str,
        tx: &StateTx,
        metrics: &NodeMetrics,
    ) -> anyhow::Result<Self> {
        match resolve_config_source(asked, dir).map_err(anyhow::Error::msg)? {
            ConfigSourceKind::File => {
                let dir = dir.context("--config-dir is required")?;
                let mut source = FileSource::new(dir, root_namespace);
                without_blocking_the_runtime(|| source.publish(tx, metrics))
                    .with_context(|| format!("reading config dir {}", dir.display()))?;
                info!(dir = %dir.display(), "config source: files");
                Ok(Self::File(source))
            }
            ConfigSourceKind::Kube => {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API server")?;
                info!("config source: the Kubernetes API server");
                Ok(Self::Kube(KubeSource::new(client, root_namespace)))
            }
        }
    }

    /// The CA needs pods only: watching nothing else keeps its RBAC to pods.
    pub(super) fn pods_only(self) -> Self {
        match self {
            Self::Kube(source) => Self::Kube(source.only(&["Pod"])),
            file => file,
        }
    }

    /// A gateway reads Gateways, and the Secrets of its own namespace (its servers'
    /// certificates).
    pub(super) fn for_gateway(self, namespace: &str) -> Self {
        match self {
            Self::Kube(source) => Self::Kube(source.for_gateway(namespace)),
            file => file,
        }
    }

    /// The API server's client, when the config comes from it (a gateway writes the
    /// Gateway API's status with it).
    pub(super) fn kube_client(&self) -> Option<kube::Client> {
        match self {
            Self::Kube(source) => Some(source.client()),
            _ => None,
        }
    }

    pub(super) async fn run(
        self,
        tx: StateTx,
        metrics: NodeMetrics,
        ready: ReadinessGuard,
        shutdown: CancellationToken,
    ) {
        match self {
            Self::File(source) => {
                drop(ready);
                source.watch(tx, metrics, shutdown).await;
            }
            Self::Kube(source) => source.run(tx, metrics, ready, shutdown).await,
        }
    }
}
