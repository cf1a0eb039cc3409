//! The command line: a contract other tools script against, so names stay stable.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(name = "mesh-node", version, about = "Nodemesh node agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the current network namespace.
    Run(RunConfig),
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Everything `mesh-node run` is configured with; parsed once and logged at start-up.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct RunConfig {
    /// This node's name: pods whose `spec.nodeName` matches are served here.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Directory of Kubernetes YAML (Namespaces, Pods, Services), reloaded on change.
    #[arg(long)]
    pub config_dir: PathBuf,

    /// cgroup v2 directory the capture programs attach to (the node's root cgroup).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_path: PathBuf,

    /// Prometheus metrics listener (`/metrics`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness and liveness listener (`/healthz/ready`, `/healthz/live`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub health_addr: SocketAddr,

    /// Namespace whose selector-less PeerAuthentication and AuthorizationPolicy resources
    /// apply to the whole mesh (Istio's root namespace).
    #[arg(long, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// The CA's directory (Istio's `cacerts` layout: `ca-cert.pem`, `ca-key.pem`,
    /// `root-cert.pem`, `cert-chain.pem`; a new root is created there when it is empty). With
    /// it the agent runs the CA in-process and enrolled pods talk mutual TLS (HBONE) to each
    /// other; agents given the same directory trust each other. Without it, plaintext.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,

    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Lifetime of workload certificates (renewed at half life), e.g. `24h`, `90s`.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: std::time::Duration,

    /// Log format; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
