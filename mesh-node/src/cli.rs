//! The command line: a contract other tools script against, so names stay stable.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use serde::{Serialize, Serializer};

use crate::access_log::AccessLogMode;

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
    /// Run the cluster CA as a service, for agents started with `--ca-addr`.
    Ca(CaConfig),
    /// Show what a running agent knows, as tables (or JSON), from its admin API.
    Debug(DebugArgs),
    /// The chained CNI plugin (also installed as `nodemesh-cni`): without a subcommand it
    /// runs one CNI call as the container runtime drives it (`CNI_*` environment variables,
    /// network config on stdin).
    Cni(CniArgs),
}

/// `mesh-node cni`.
#[derive(Clone, Debug, clap::Args)]
pub struct CniArgs {
    #[command(subcommand)]
    pub action: Option<CniAction>,
}

#[derive(Clone, Debug, Subcommand)]
pub enum CniAction {
    /// Remove the plugin's chain entry and binary from the node (what the agent installed
    /// with `--cni-bin-dir` and `--cni-conf-dir`).
    Uninstall {
        /// The CNI bin dir the plugin binary was copied to.
        #[arg(long)]
        cni_bin_dir: PathBuf,
        /// The CNI conf dir whose chain holds the entry.
        #[arg(long)]
        cni_conf_dir: PathBuf,
    },
}

/// `mesh-node debug`.
#[derive(Clone, Debug, clap::Args)]
pub struct DebugArgs {
    #[command(subcommand)]
    pub what: DebugWhat,

    /// The agent's admin API.
    #[arg(long, global = true, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Clone, Debug, Subcommand)]
pub enum DebugWhat {
    /// Pods the agent knows, with their node, addresses and enrollment.
    Workloads,
    /// Services with their cluster IPs, ports and endpoints.
    Services,
    /// PeerAuthentication and AuthorizationPolicy resources in force.
    Policies,
    /// VirtualService, HTTPRoute and DestinationRule resources in force, per Service.
    Routes,
    /// Workload certificates held by the agent.
    Certs,
    /// Connections the node proxy holds now: direction, pod, client, original destination.
    Connections,
    /// Why a request from a pod would be allowed, denied or unroutable: the route, the
    /// endpoints, the identities, mutual TLS and the policies that decide, computed by the
    /// agent from its live state with the proxy's own code.
    Explain(ExplainArgs),
    /// Everything: the normalized state with rejected resources.
    Config,
    /// Change the agent's log filter at run time, e.g. `info,mesh_node=debug`.
    Log { level: String },
}

/// `mesh-node debug explain <source> <destination>`.
#[derive(Clone, Debug, clap::Args)]
pub struct ExplainArgs {
    /// The client pod: `namespace/name`, or `name` in namespace `default`.
    pub source: String,

    /// A Service (`name`, `name.namespace`, `name.namespace.svc.cluster.local`), a
    /// ClusterIP, a pod (`namespace/name`) or a pod IP.
    pub destination: String,

    /// Destination port (default: the Service's only port).
    #[arg(long)]
    pub port: Option<u16>,

    /// Request path, with its query if any (default `/`). Path, method or header make a
    /// port that declares no protocol count as HTTP.
    #[arg(long)]
    pub path: Option<String>,

    /// Request method (default `GET`).
    #[arg(long)]
    pub method: Option<String>,

    /// A request header, `name:value`; repeatable.
    #[arg(long = "header", value_name = "NAME:VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
}

/// `end-user: jason` → (`end-user`, `jason`).
fn parse_header(value: &str) -> Result<(String, String), String> {
    let (name, value) = value
        .split_once(':')
        .ok_or_else(|| format!("{value:?} is not NAME:VALUE"))?;
    Ok((name.trim().to_string(), value.trim().to_string()))
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
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

    /// Admin API listener (JSON: config dump, workloads, certificates, log level). Keep it
    /// on loopback: it tells everything about the node's pods and changes the log level.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

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
    #[arg(long, conflicts_with = "ca_addr")]
    pub ca_dir: Option<PathBuf>,

    /// URL (`https://<ip>:<port>`, or just `<ip>:<port>`) of a `mesh-node ca` service to
    /// get certificates from, instead of an in-process CA. Needs `--ca-root-file` and
    /// `--ca-token-file`.
    #[arg(long, requires_all = ["ca_root_file", "ca_token_file"], value_parser = parse_ca_addr)]
    pub ca_addr: Option<SocketAddr>,

    /// The CA's root certificate(s), PEM (`root-cert.pem`): pinned to check the CA service,
    /// and the trust bundle for mutual TLS.
    #[arg(long)]
    pub ca_root_file: Option<PathBuf>,

    /// File holding this node's token for the CA service.
    #[arg(long)]
    #[serde(skip)]
    pub ca_token_file: Option<PathBuf>,

    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Lifetime of workload certificates (renewed at half life), e.g. `24h`, `90s`.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: std::time::Duration,

    /// Connections one pooled HBONE tunnel carries before a new tunnel (a new TLS
    /// handshake) replaces it; 1 disables pooling.
    #[arg(long, default_value_t = 1000)]
    pub hbone_streams_per_tunnel: usize,

    /// Log format; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The CNI plugin's socket and installation. Boxed, as `observability`.
    #[command(flatten)]
    #[serde(flatten)]
    pub cni: Box<CniConfig>,

    /// Access logs and tracing. Boxed: `Command` stays small for the subcommands that
    /// do not run the agent.
    #[command(flatten)]
    #[serde(flatten)]
    pub observability: Box<ObservabilityConfig>,
}

/// `mesh-node run`'s CNI flags: where the plugin reaches the agent, and where the agent
/// installs the plugin.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct CniConfig {
    /// Unix socket the CNI plugin hands new pods over (e.g. `/var/run/nodemesh/cni.sock`):
    /// pods are then enrolled before their containers start. Off without it.
    #[arg(long = "cni-socket", id = "cni_socket")]
    #[serde(rename = "cni_socket")]
    pub socket: Option<PathBuf>,

    /// CNI bin dir (e.g. `/opt/cni/bin`) to install the plugin binary into at start, as
    /// `nodemesh-cni`. Needs `--cni-conf-dir` and `--cni-socket`.
    #[arg(long = "cni-bin-dir", id = "cni_bin_dir", requires_all = ["cni_conf_dir", "cni_socket"])]
    #[serde(rename = "cni_bin_dir")]
    pub bin_dir: Option<PathBuf>,

    /// CNI conf dir (e.g. `/etc/cni/net.d`) whose chain (the first config file, as kubelet
    /// picks it) gets the plugin's entry at its end, at start and whenever it goes missing.
    #[arg(long = "cni-conf-dir", id = "cni_conf_dir", requires_all = ["cni_bin_dir", "cni_socket"])]
    #[serde(rename = "cni_conf_dir")]
    pub conf_dir: Option<PathBuf>,
}

/// `mesh-node run`'s access log and tracing flags.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct ObservabilityConfig {
    /// Access log on stdout, one JSON object per line (whatever `--log-format` says):
    /// `off`, `full` (every connection and request) or `sampled:<ratio>` (every failure
    /// and that share of the rest; `sampled:0` logs failures only). Off by default: one
    /// agent logs for all its node's pods, a line per request.
    #[arg(long, default_value = "off")]
    pub access_log: AccessLogMode,

    /// Percentage (0-100) of requests arriving without a trace context that start a
    /// sampled trace. A caller's own decision (a sampled `traceparent`) is always kept.
    #[arg(long, default_value_t = crate::distributed_tracing::DEFAULT_SAMPLING_PERCENT,
          value_parser = parse_percent)]
    pub trace_sampling: f64,

    /// OTLP/HTTP collector the request spans are exported to, e.g.
    /// `http://otel-collector.observability:4318` (posted to `/v1/traces` as protobuf;
    /// plain http only). Without it, trace context is still propagated.
    #[arg(long, value_parser = parse_otlp_endpoint)]
    #[serde(serialize_with = "serialize_optional_display")]
    pub otlp_endpoint: Option<http::Uri>,
}

/// Everything `mesh-node ca` is configured with.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct CaConfig {
    /// Where the certificate API listens (HTTPS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,

    /// The CA's directory, as for `mesh-node run --ca-dir` (Istio's `cacerts` layout; a new
    /// root is created when it is empty).
    #[arg(long)]
    pub ca_dir: PathBuf,

    /// Directory of Kubernetes YAML saying where pods are scheduled (node authorization).
    #[arg(long)]
    pub config_dir: PathBuf,

    /// Agents' tokens: one `<node-name> <token>` per line.
    #[arg(long)]
    pub node_tokens: PathBuf,

    /// SPIFFE trust domain.
    #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// The mesh's root namespace; the CA's own identity is `<root-ns>/sa/nodemesh-ca`.
    #[arg(long, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// Log format; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `https://10.0.0.5:15012`, `https://10.0.0.5:15012/` or `10.0.0.5:15012`. The CA is
/// addressed by IP: its certificate carries a SPIFFE id, not a DNS name.
fn parse_ca_addr(value: &str) -> Result<SocketAddr, String> {
    let bare = value
        .strip_prefix("https://")
        .unwrap_or(value)
        .trim_end_matches('/');
    if value.starts_with("http://") {
        return Err("the CA is only spoken to over https".into());
    }
    bare.parse()
        .map_err(|_| format!("{value:?} is not https://<ip>:<port>"))
}

/// A percentage from 0 to 100.
fn parse_percent(value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|percent| (0.0..=100.0).contains(percent))
        .ok_or_else(|| format!("{value:?} is not a percentage from 0 to 100"))
}

/// `http://<host>:<port>`, optionally with the full `/v1/traces` path.
fn parse_otlp_endpoint(value: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = value
        .parse()
        .map_err(|e| format!("{value:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => Ok(uri),
        (Some("https"), _) => Err(format!(
            "{value:?}: the agent exports over plain http only; point it at the \
             collector's OTLP/HTTP port (4318) or a node-local collector"
        )),
        _ => Err(format!("{value:?} is not http://<host>:<port>")),
    }
}

fn serialize_optional_display<T: std::fmt::Display, S: Serializer>(
    value: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => serializer.collect_str(value),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn ca_addresses_accept_urls_and_bare_addresses() {
        let addr: SocketAddr = "10.0.0.5:15012".parse().unwrap();
        for value in [
            "https://10.0.0.5:15012",
            "https://10.0.0.5:15012/",
            "10.0.0.5:15012",
        ] {
            assert_eq!(parse_ca_addr(value), Ok(addr), "{value}");
        }
        assert!(parse_ca_addr("http://10.0.0.5:15012").is_err());
        assert!(parse_ca_addr("https://ca.example:15012").is_err());
    }

    #[test]
    fn cni_flags_install_only_with_the_socket_and_both_dirs() {
        let base = ["mesh-node", "run", "--node-name", "n", "--config-dir", "/c"];
        let parse = |extra: &[&str]| {
            Cli::try_parse_from(base.iter().chain(extra)).map(|cli| match cli.command {
                Command::Run(config) => config.cni,
                _ => unreachable!(),
            })
        };
        let cni = parse(&[
            "--cni-socket",
            "/run/nodemesh/cni.sock",
            "--cni-bin-dir",
            "/opt/cni/bin",
            "--cni-conf-dir",
            "/etc/cni/net.d",
        ])
        .expect("all three");
        assert_eq!(
            cni.socket.as_deref(),
            Some(Path::new("/run/nodemesh/cni.sock"))
        );
        assert_eq!(cni.conf_dir.as_deref(), Some(Path::new("/etc/cni/net.d")));
        assert!(
            parse(&["--cni-socket", "/s"]).is_ok(),
            "socket alone: no install"
        );
        assert!(parse(&["--cni-bin-dir", "/b", "--cni-socket", "/s"]).is_err());
        assert!(parse(&["--cni-bin-dir", "/b", "--cni-conf-dir", "/c"]).is_err());
        assert!(
            Cli::try_parse_from(["mesh-node", "cni", "uninstall", "--cni-bin-dir", "/b"]).is_err(),
            "uninstall needs both dirs"
        );
    }

    #[test]
    fn observability_flags_parse_and_reject_with_a_reason() {
        let cli = Cli::try_parse_from([
            "mesh-node",
            "run",
            "--node-name",
            "n",
            "--config-dir",
            "/c",
            "--access-log",
            "sampled:0.25",
            "--trace-sampling",
            "12.5",
            "--otlp-endpoint",
            "http://10.0.0.1:4318",
        ])
        .expect("valid flags");
        let Command::Run(config) = cli.command else {
            panic!("not run");
        };
        let config = config.observability;
        assert_eq!(config.access_log, AccessLogMode::Sampled(0.25));
        assert_eq!(config.trace_sampling, 12.5);
        assert_eq!(
            config.otlp_endpoint.map(|u| u.to_string()).as_deref(),
            Some("http://10.0.0.1:4318/")
        );
        let json = serde_json::to_value(
            Cli::try_parse_from(["mesh-node", "run", "--node-name", "n", "--config-dir", "/c"])
                .map(|c| match c.command {
                    Command::Run(config) => config,
                    _ => unreachable!(),
                })
                .unwrap(),
        )
        .unwrap();
        assert_eq!(json["access_log"], "off");
        assert_eq!(json["trace_sampling"], 1.0);
        assert_eq!(json["otlp_endpoint"], serde_json::Value::Null);

        assert!(parse_percent("101").is_err());
        assert!(parse_percent("-1").is_err());
        assert!(
            parse_otlp_endpoint("https://collector:4318")
                .unwrap_err()
                .contains("plain http")
        );
        assert!(parse_otlp_endpoint("collector:4318").is_err());
        assert!("sampled:2".parse::<AccessLogMode>().is_err());
        assert!("sometimes".parse::<AccessLogMode>().is_err());
    }
}
