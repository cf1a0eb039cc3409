//! Race-free enrollment of new pods: the chained CNI plugin and the agent's end of it.
//!
//! Enrolling a pod from the config watch alone leaves a window: the pod's containers start
//! as soon as the sandbox exists, long before the agent learns the pod's IP, so their first
//! connections would escape capture. Kubelet runs the CNI chain before any container
//! starts, so the agent installs `nodemesh-cni` as the last plugin of the node's chain
//! ([`install`]); for each new pod the plugin ([`plugin`]) hands the pod's netns path and
//! IPs to the agent over a unix socket ([`server`]) and returns only once the agent has
//! registered the capture, or decided that the pod is not to be enrolled. The runtime then
//! starts the containers into an already captured netns.
//!
//! The wire protocol between the two is one JSON line each way per connection:
//! an [`AgentRequest`] from the plugin, an [`AgentResponse`] from the agent.
use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::inventory::ObjectKey;

pub mod install;
pub mod owner;
pub mod plugin;
pub mod server;

/// Where the agent listens for the plugin unless configured otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/nodemesh/cni.sock";

/// The pod a CNI call is about, from the `K8S_POD_*` CNI arguments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`: runtimes older than containerd 1.5 do not pass it.
    #[serde(default)]
    pub uid: Option<String>,
}

impl PodRef {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

/// What the plugin asks the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AgentRequest {
    /// A new pod sandbox: enroll it (if it is to be) before answering.
    Add {
        pod: PodRef,
        container_id: String,
        /// The sandbox's netns (`CNI_NETNS`), as the runtime named it.
        netns: PathBuf,
        /// From the main plugin's result: the pod's IPs before the API server knows them.
        ips: Vec<IpAddr>,
    },
    /// The sandbox is going away: stop capturing it now.
    Del { pod: PodRef, container_id: String },
    /// Whether the agent takes requests (CNI `STATUS`).
    Status,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AgentResponse {
    /// The pod is captured: its connections go through the mesh from now on.
    Enrolled,
    /// The pod is not to be enrolled (namespace not enrolled, pod opted out, ...).
    NotEnrolled { reason: String },
    /// DEL done (whether or not the pod was enrolled).
    Removed,
    /// The agent has not reconciled its first config yet: ask again.
    NotReady,
    /// STATUS: ready for ADDs.
    Ready,
    /// The pod should be enrolled but could not be.
    Failed { error: String },
}
