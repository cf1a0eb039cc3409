//! The Nodemesh test cluster: nodes and pods made of Linux network namespaces.
//!
//! Every end-to-end test, the demo and the benches build their cluster with [`Cluster`]:
//! a fabric netns with a bridge, one netns per node (each running its own `mesh-node`
//! agent) and one netns per pod, routed like a CNI would. Nothing here touches the
//! machine's root network namespace: addresses, routes and sysctls are only ever set
//! inside namespaces the cluster created, and everything is torn down on drop, panics
//! included (see `DESIGN.md`, "Testing on one machine").
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use mesh_tests::{Cluster, PodSpec};
//!
//! if let Some(reason) = mesh_tests::skip_reason() {
//!     eprintln!("skipping: {reason}");
//!     return;
//! }
//! let mut cluster = Cluster::new("my_test", 2);
//! let server = cluster.add_pod(PodSpec::new("server", 1));
//! let client = cluster.add_pod(PodSpec::new("client", 0));
//! let mut serve = server.spawn(&cluster, &["serve", "--listen", "0.0.0.0:8080", "--name", "s"]);
//! serve.wait_for_output("ready", Duration::from_secs(5));
//! let to = format!("{}:8080", server.ip);
//! let out = client.run(&cluster, &["connect", "--to", &to], Duration::from_secs(10));
//! assert!(out.status.success());
//! ```

mod api_server;
pub mod bookinfo;
mod cgroup;
mod cleanup;
mod cluster;
mod http;
mod metrics;
mod netns;
mod pod;
mod process;
mod prometheus;
pub mod scenario;
mod yaml;

pub use api_server::ScriptedApiServer;
pub use cgroup::cgroup2_root;
pub use cleanup::cleanup_stale;
pub use cluster::{AGENT_HEALTH_PORT, AGENT_METRICS_PORT, Cluster};
pub use http::http_get_in_netns;
pub use metrics::{Sample, metric_value, parse_samples};
pub use netns::{ip_binary, run_in_netns};
pub use pod::{Pod, PodProcess, PodSpec};
pub use process::{bin_path, rss_bytes};
pub use prometheus::{PROMETHEUS_BINARY, PromSample, Prometheus};
pub use yaml::{namespace_yaml, service_yaml};

/// Why the cluster cannot be built on this machine, if it cannot.
///
/// Tests call this first and skip with the printed reason rather than pass silently
/// (STYLE.md, "Tests").
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, cgroups, eBPF)".into());
    }
    if ip_binary().is_none() {
        return Some("iproute2 `ip` not found".into());
    }
    if let Err(error) = cgroup::try_cgroup2_root() {
        return Some(format!("no cgroup2 mount: {error}"));
    }
    None
}
