//! Removing the plugin when the mesh is uninstalled, and only then.
//!
//! An agent stops for two reasons: a rolling update (another agent follows at once, and the
//! plugin must stay so new pods keep waiting for it) or the DaemonSet's deletion (nothing
//! follows, and a plugin left in the chain would hold every new pod of the node for
//! `agentTimeout`, or fail it). The agent asks the API server which it is when it stops.
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{Api, Client};
use tracing::{info, warn};

use super::install::{Installation, uninstall};

/// The DaemonSet whose agents installed the plugin on this node.
pub struct CniOwner {
    pub client: Client,
    pub namespace: String,
    pub daemon_set: String,
    pub installation: Installation,
}

impl CniOwner {
    /// Removes the plugin from the node if the DaemonSet is gone or being deleted; keeps it
    /// otherwise, and when the API server cannot say (the safe side: pods wait, not escape).
    /// Says whether it removed the plugin.
    pub async fn uninstall_if_removed(&self) -> bool {
        let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), &self.namespace);
        let removed = match api.get_opt(&self.daemon_set).await {
            Ok(None) => true,
            Ok(Some(daemon_set)) => daemon_set.metadata.deletion_timestamp.is_some(),
            Err(error) => {
                warn!(%error, daemon_set = %self.daemon_set,
                      "cannot tell whether the mesh is being uninstalled; the CNI plugin stays");
                false
            }
        };
        if !removed {
            return false;
        }
        let Installation {
            bin_dir, conf_dir, ..
        } = &self.installation;
        match uninstall(bin_dir, conf_dir) {
            Ok(()) => {
                info!(daemon_set = %self.daemon_set, "DaemonSet deleted: CNI plugin removed from the node");
                true
            }
            Err(error) => {
                warn!(%error, "removing the CNI plugin failed; remove it with `mesh-node cni uninstall`");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
