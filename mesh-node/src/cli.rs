//! The command line: a contract other tools script against, so names stay stable.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use serde::{Serialize, Serializer};

use crate::{access_log::AccessLogMode, egress::OutboundTrafficPolicy, signer::CaAddress};

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
    /// Run an ingress gateway (in its own pod, not enrolled): listen on the ports of the
    /// Istio Gateways that select the pod and route into the mesh with their
    /// VirtualServices, as the pod's own identity.
    Gateway(GatewayConfig),
    /// Show what a running agent knows, as tables (or JSON), from its admin API.
    Debug(DebugArgs),
    /// The chained CNI plugin (also installed as `nodemesh-cni`): without a subcommand it
    /// runs one CNI call as the container runtime drives it (`CNI_*` environment variables,
    /// network config on stdin).
    Cni(CniArgs),
    /// Keep the in-pod listening sockets of the node's agents, so they outlive any agent:
    /// connections made while no agent runs wait in their backlogs for the next one.
    Holder(HolderArgs),
    /// Switch the mesh off on this node: un-enroll every pod, detach the capture programs,
    /// remove the pins, and let the holder close its listeners. Run it with the agent
    /// stopped; nothing else (not SIGTERM, not a crash) switches capture off.
    Uninstall(UninstallArgs),
}

/// `mesh-node holder`.
#[derive(Clone, Debug, clap::Args)]
pub struct HolderArgs {
    /// The unix socket agents deposit their listeners on (`mesh-node run --holder-socket`).
    #[arg(long, default_value = DEFAULT_HOLDER_SOCKET)]
    pub socket: PathBuf,
}

/// `mesh-node uninstall`.
#[derive(Clone, Debug, clap::Args)]
pub struct UninstallArgs {
    /// The pinned capture to remove (`mesh-node run --bpffs-path`).
    #[arg(long, default_value = DEFAULT_BPFFS_PATH)]
    pub bpffs_path: PathBuf,

    /// The holder whose listeners to close (`mesh-node run --holder-socket`).
    #[arg(long)]
    pub holder_socket: Option<PathBuf>,
}

/// Where capture is pinned unless `--bpffs-path` says otherwise.
pub const DEFAULT_BPFFS_PATH: &str = "/sys/fs/bpf/nodemesh";
/// The holder's socket in the DaemonSet.
pub const DEFAULT_HOLDER_SOCKET: &str = "/var/run/nodemesh/holder.sock";

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
    /// PeerAuthentication, AuthorizationPolicy and RequestAuthentication resources in force.
    Policies,
    /// VirtualService, HTTPRoute and DestinationRule resources in force, per Service.
    Routes,
    /// Workload certificates held by the agent.
    Certs,
    /// Connections the node proxy holds now: direction, pod, client, original destination.
    Connections,
    /// A gateway's listeners (ask `mesh-node gateway`'s admin API): each server's port,
    /// protocol, hosts, certificate (or why it is not served) and the VirtualServices
    /// bound to its Gateway.
    Gateways,
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
    /// The client pod: `namespace/name`, or `name` in namespace `default`. Asked of a
    /// gateway (`--admin-addr` of `mesh-node gateway`): the client's IP address.
    pub source: String,

    /// A Service (`name`, `name.namespace`, `name.namespace.svc.cluster.local`), a
    /// ClusterIP, a pod (`namespace/name`), a pod IP, a ServiceEntry host or any address.
    /// Asked of a gateway: the host the client asks for (Host, SNI).
    pub destination: String,

    /// Destination port (default: the Service's only port; at a gateway, its only port).
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

/// Where `mesh-node run` reads Kubernetes objects from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigSourceKind {
    /// A directory of YAML (`--config-dir`).
    File,
    /// The Kubernetes API server (in-cluster service account, or `KUBECONFIG`).
    Kube,
}

/// The config source a command asked for: `--config-source`, else `file` when a directory was
/// given, else `kube` when a cluster is reachable by the usual means.
pub fn resolve_config_source(
    asked: Option<ConfigSourceKind>,
    config_dir: Option<&std::path::Path>,
) -> Result<ConfigSourceKind, String> {
    let cluster_reachable = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some();
    choose_config_source(asked, config_dir.is_some(), cluster_reachable)
}

fn choose_config_source(
    asked: Option<ConfigSourceKind>,
    has_dir: bool,
    cluster_reachable: bool,
) -> Result<ConfigSourceKind, String> {
    match (asked, has_dir) {
        (Some(ConfigSourceKind::File), false) => {
            Err("--config-source file needs --config-dir".into())
        }
        (Some(ConfigSourceKind::Kube), true) => {
            Err("--config-dir is for --config-source file, not kube".into())
        }
        (Some(kind), _) => Ok(kind),
        (None, true) => Ok(ConfigSourceKind::File),
        (None, false) if cluster_reachable => Ok(ConfigSourceKind::Kube),
        (None, false) => Err(
            "no config source: give --config-dir, or run in a cluster (KUBERNETES_SERVICE_HOST) \
             or with KUBECONFIG for --config-source kube"
                .into(),
        ),
    }
}

/// Everything `mesh-node run` is configured with; parsed once and logged at start-up.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct RunConfig {
    /// This node's name: pods whose `spec.nodeName` matches are served here.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Where the mesh's view of the cluster comes from: `kube` (watch the API server; the
    /// default inside a cluster, found through `KUBERNETES_SERVICE_HOST` or `KUBECONFIG`) or
    /// `file` (a directory of YAML, `--config-dir`; the default elsewhere).
    #[arg(long, value_enum)]
    pub config_source: Option<ConfigSourceKind>,

    /// Directory of Kubernetes YAML (Namespaces, Pods, Services, EndpointSlices, Istio and
    /// Gateway API resources), reloaded on change. Implies `--config-source file`.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,

    /// cgroup v2 directory the capture programs attach to (the node's root cgroup).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_path: PathBuf,

    /// Accelerate the loopback leg between an app and its in-pod outbound listener with
    /// sockmap (`sockops` + `sk_msg`): data moves socket to socket, past the TCP/IP stack,
    /// which takes a few µs off each round trip. Off by default, because on current kernels
    /// (6.18 measured) data moved this way has no backpressure: a sender faster than the
    /// proxy queues without bound, up to the node's TCP memory limit, and then its writes
    /// fail with ENOMEM; and `splice()` cannot read it (Go 1.22+ `io.Copy` between TCP
    /// connections, HAProxy's splice), so such an app would wait forever. Turn it on only
    /// for nodes whose pods exchange small requests and replies. Applies to connections
    /// made after start.
    #[arg(
        long,
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub sockmap: bool,

    /// bpffs directory where the capture programs' links and maps are pinned, so capture
    /// stays in force while no agent runs; the next agent adopts them. A bpffs is mounted
    /// there when the path is not on one. `mesh-node uninstall` removes them.
    #[arg(long, default_value = DEFAULT_BPFFS_PATH)]
    pub bpffs_path: PathBuf,

    /// The listener holder (`mesh-node holder`) to deposit every in-pod listening socket
    /// with and to take them back from at start: with it, connections made while no agent
    /// runs wait for the next one instead of being refused.
    #[arg(long)]
    pub holder_socket: Option<PathBuf>,

    /// On SIGTERM, how long established connections may take to finish (HTTP/1 closed
    /// between requests, HTTP/2 and HBONE told GOAWAY, L4 streams left to run) before the
    /// agent exits, when a successor runs beside it (an overlapping replacement); alone, at
    /// most 2 s, since nobody accepts while it drains. Keep it below the pod's termination
    /// grace period.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: std::time::Duration,

    /// What becomes of a connection of an enrolled pod to a destination that is no
    /// Service, pod or ServiceEntry: `ALLOW_ANY` lets it through as the pod asked (Istio's
    /// default), `REGISTRY_ONLY` refuses it (the pod sees its connection reset).
    #[arg(long, value_enum, default_value_t = OutboundTrafficPolicy::AllowAny)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,

    /// How often the JSON Web Key Sets that RequestAuthentication rules name by URL
    /// (`jwksUri`, or the issuer's OpenID discovery) are fetched again (Istio's default). A
    /// failed fetch is retried sooner, with backoff, keeping the keys last fetched.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    pub jwks_refresh_interval: std::time::Duration,

    /// Where its metrics, admin API and health checks listen.
    #[command(flatten)]
    #[serde(flatten)]
    pub endpoints: EndpointAddrs,

    /// Namespace whose selector-less PeerAuthentication, AuthorizationPolicy and
    /// RequestAuthentication resources apply to the whole mesh (Istio's root namespace).
    #[arg(long, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// Where workload certificates come from, and how they are used.
    #[command(flatten)]
    #[serde(flatten)]
    pub identity: IdentityConfig,

    /// Threads the proxy runs on (the async runtime's workers); default: half the CPUs the
    /// agent may use (its cgroup's quota counts), at least one. The node's pods need the
    /// rest, on both ends of every request, and fewer threads wake each other less: on 2
    /// CPUs, one worker instead of two took a third off the agents' CPU per request
    /// (docs/benchmarks.md).
    #[arg(long, env = "NODEMESH_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,

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

/// Everything `mesh-node gateway` is configured with.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct GatewayConfig {
    /// The gateway pod's name (the downward API's `metadata.name`): Gateways select it by
    /// its labels, and its service account is its identity.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: String,

    /// The gateway pod's namespace; Secrets that servers name (`credentialName`) are read
    /// from it.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: String,

    /// The node the gateway pod runs on (`spec.nodeName`): an in-process CA (`--ca-dir`)
    /// signs only identities of pods on it.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Where the mesh's view of the cluster comes from, as for `mesh-node run`.
    #[arg(long, value_enum)]
    pub config_source: Option<ConfigSourceKind>,

    /// Directory of Kubernetes YAML, as for `mesh-node run`; Secrets that Gateways name
    /// are read from it too.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,

    /// Where its metrics, admin API and health checks listen.
    #[command(flatten)]
    #[serde(flatten)]
    pub endpoints: EndpointAddrs,

    /// Istio's root namespace, as for `mesh-node run`.
    #[arg(long, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// The `gatewayClassName` of the Gateway API Gateways it serves (those in its own
    /// namespace); set `istio` to take over Gateways written for Istio.
    #[arg(long, default_value = "nodemesh")]
    pub gateway_class: String,

    /// Proxies in front of the gateway that are trusted to append the address they saw to
    /// `X-Forwarded-For` (Istio's `numTrustedProxies`): with N, the client is the Nth
    /// address from the right of the header a request arrives with, and is passed on as
    /// `X-Envoy-External-Address`; with 0 (default), the address the gateway sees.
    #[arg(long, default_value_t = 0)]
    pub num_trusted_proxies: usize,

    /// How often the key sets of the RequestAuthentications that select the gateway are
    /// fetched again, as for `mesh-node run`.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    pub jwks_refresh_interval: std::time::Duration,

    /// On SIGTERM, how long the gateway still accepts new connections while it reports
    /// unready, so that load balancers and kube-proxy stop sending to it before it stops
    /// listening (Istio's `terminationDrainDuration`).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_delay: std::time::Duration,

    /// On SIGTERM, how long requests in flight may take to finish before the gateway exits
    /// (counted from when it stops listening).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: std::time::Duration,

    /// Where the gateway's certificate comes from.
    #[command(flatten)]
    #[serde(flatten)]
    pub identity: IdentityConfig,

    /// Log format; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Access logs and tracing.
    #[command(flatten)]
    #[serde(flatten)]
    pub observability: Box<ObservabilityConfig>,
}

/// The listeners of `mesh-node run` and `mesh-node gateway` besides the proxy's.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct EndpointAddrs {
    /// Prometheus metrics listener (`/metrics`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Admin API listener (JSON: config dump, workloads, certificates, gateways, log level;
    /// `mesh-node debug` reads it). Keep it on loopback: it tells everything about the
    /// node's pods and changes the log level.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Readiness and liveness listener (`/healthz/ready`, `/healthz/live`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub health_addr: SocketAddr,
}

/// Workload certificates: from an in-process CA or a `mesh-node ca` service. Shared by
/// `mesh-node run` and `mesh-node gateway`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct IdentityConfig {
    /// The CA's directory (Istio's `cacerts` layout: `ca-cert.pem`, `ca-key.pem`,
    /// `root-cert.pem`, `cert-chain.pem`; a new root is created there when it is empty). With
    /// it the agent (or gateway) runs the CA in-process and enrolled pods talk mutual TLS (HBONE)
    /// to each other; agents given the same directory trust each other. Without it,
    /// plaintext.
    #[arg(long, conflicts_with = "ca_addr")]
    pub ca_dir: Option<PathBuf>,

    /// URL (`https://<host>:<port>`, or just `<host>:<port>`; the host an IP address or a
    /// DNS name such as `nodemesh-ca.nodemesh-system.svc`) of a `mesh-node ca` service to get
    /// certificates from, instead of an in-process CA. Needs `--ca-root-file` and
    /// `--ca-token-file`.
    #[arg(long, requires_all = ["ca_root_file", "ca_token_file"], value_parser = CaAddress::parse)]
    #[serde(serialize_with = "serialize_optional_display")]
    pub ca_addr: Option<CaAddress>,

    /// The CA's root certificate(s), PEM (`root-cert.pem`): pinned to check the CA service,
    /// and the trust bundle for mutual TLS.
    #[arg(long)]
    pub ca_root_file: Option<PathBuf>,

    /// File holding this node's (or gateway's) token for the CA service.
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
}

fn parse_service_account(value: &str) -> Result<(String, String), String> {
    match value.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
            Ok((namespace.to_owned(), name.to_owned()))
        }
        _ => Err(format!("{value:?} is not namespace/name")),
    }
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

    /// The executable installed as the plugin (default: this one). The image ships a static
    /// build for it: the runtime runs the plugin on the host, with the host's C library.
    #[arg(
        long = "cni-plugin-binary",
        id = "cni_plugin_binary",
        requires = "cni_bin_dir"
    )]
    #[serde(rename = "cni_plugin_binary")]
    pub plugin_binary: Option<PathBuf>,

    /// The DaemonSet (`namespace/name`) that runs this agent: when the agent stops and finds
    /// it deleted (the mesh is being uninstalled, not updated), it removes the plugin from
    /// the node. Asks the API server; without this flag the plugin always stays.
    #[arg(long = "cni-uninstall-with", id = "cni_uninstall_with",
          requires = "cni_bin_dir", value_parser = parse_object_key)]
    #[serde(rename = "cni_uninstall_with")]
    pub uninstall_with: Option<crate::inventory::ObjectKey>,
}

/// `namespace/name`.
fn parse_object_key(value: &str) -> Result<crate::inventory::ObjectKey, String> {
    match value.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
            Ok(crate::inventory::ObjectKey::new(namespace, name))
        }
        _ => Err(format!("{value:?} is not namespace/name")),
    }
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
///
/// Outside Kubernetes: `--ca-dir` and `--node-tokens`. In a cluster, leave both out: the root
/// comes from Secret `cacerts` (or a generated `nodemesh-ca-root`) in `--namespace`, and
/// agents present projected ServiceAccount tokens checked with TokenReview.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct CaConfig {
    /// Where the certificate API listens (HTTPS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,

    /// The CA's directory, as for `mesh-node run --ca-dir` (Istio's `cacerts` layout; a new
    /// root is created when it is empty). Without it the CA runs in-cluster: Secret
    /// `cacerts` in `--namespace` if present, else `nodemesh-ca-root` (created when absent).
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,

    /// Where the CA learns which pods run on which node (node authorization): `kube`
    /// (watches Pods; the default in a cluster) or `file` (`--config-dir`).
    #[arg(long, value_enum)]
    pub config_source: Option<ConfigSourceKind>,

    /// Directory of Kubernetes YAML saying where pods are scheduled. Implies
    /// `--config-source file`.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,

    /// Agents' tokens: one `<node-name> <token>` per line. Without it, agents' projected
    /// ServiceAccount tokens are checked with the API server (TokenReview).
    #[arg(long)]
    pub node_tokens: Option<PathBuf>,

    /// The namespace the CA and the agents run in: its Secrets hold the root, its ConfigMap
    /// `nodemesh-ca-root-cert` the trust bundle, and agents' tokens must be of its
    /// `--agent-service-account`.
    #[arg(long, env = "POD_NAMESPACE", default_value = "nodemesh-system")]
    pub namespace: String,

    /// The agents' ServiceAccount: only its tokens get certificates (with TokenReview).
    #[arg(long, default_value = "nodemesh-node")]
    pub agent_service_account: String,

    /// A gateway's ServiceAccount (`namespace/name`, repeatable): tokens of it get a
    /// certificate for its own identity (`mesh-node gateway`), while a pod of it runs on
    /// the node its token names. Tokens of any other ServiceAccount than the agents' are
    /// refused.
    #[arg(long = "gateway-service-account", value_name = "NAMESPACE/NAME", value_parser = parse_service_account)]
    pub gateway_service_accounts: Vec<(String, String)>,

    /// The audience agents' projected tokens are issued for (with TokenReview).
    #[arg(long, default_value = "nodemesh-ca")]
    pub token_audience: String,

    /// SPIFFE trust domain.
    #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// The mesh's root namespace; the CA's own identity is `<root-ns>/sa/nodemesh-ca`.
    #[arg(long, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// The longest lifetime of a workload certificate; agents asking for more get this.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_cert_ttl: std::time::Duration,

    /// Log format; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
    fn ca_addresses_accept_urls_names_and_bare_addresses() {
        let ip = CaAddress {
            host: "10.0.0.5".into(),
            port: 15012,
        };
        for value in [
            "https://10.0.0.5:15012",
            "https://10.0.0.5:15012/",
            "10.0.0.5:15012",
        ] {
            assert_eq!(CaAddress::parse(value), Ok(ip.clone()), "{value}");
        }
        let name = CaAddress::parse("https://nodemesh-ca.nodemesh-system.svc:15012").unwrap();
        assert_eq!(name.host, "nodemesh-ca.nodemesh-system.svc");
        assert_eq!(name.to_string(), "nodemesh-ca.nodemesh-system.svc:15012");
        let v6 = CaAddress::parse("https://[fd00::5]:15012").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.to_string()),
            ("fd00::5", "[fd00::5]:15012".into())
        );
        assert!(CaAddress::parse("http://10.0.0.5:15012").is_err());
        assert!(
            CaAddress::parse("https://ca.example").is_err(),
            "a port is needed"
        );
        assert!(CaAddress::parse("https://ca example:15012").is_err());
    }

    #[test]
    fn the_config_source_is_the_one_asked_for_else_the_one_at_hand() {
        use ConfigSourceKind::{File, Kube};
        assert_eq!(choose_config_source(None, true, true), Ok(File));
        assert_eq!(choose_config_source(None, false, true), Ok(Kube));
        assert_eq!(choose_config_source(Some(Kube), false, false), Ok(Kube));
        assert_eq!(choose_config_source(Some(File), true, true), Ok(File));
        let nothing = choose_config_source(None, false, false).unwrap_err();
        assert!(nothing.contains("--config-dir"), "{nothing}");
        assert!(choose_config_source(Some(File), false, true).is_err());
        assert!(choose_config_source(Some(Kube), true, true).is_err());
    }

    #[test]
    fn the_daemon_set_to_uninstall_with_is_namespace_slash_name() {
        assert_eq!(
            parse_object_key("nodemesh-system/nodemesh-node"),
            Ok(crate::inventory::ObjectKey::new(
                "nodemesh-system",
                "nodemesh-node"
            ))
        );
        for bad in ["nodemesh-node", "/nodemesh-node", "nodemesh-system/"] {
            assert!(parse_object_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_ca_runs_in_cluster_mode_without_a_dir_or_token_file() {
        let cli = Cli::try_parse_from(["mesh-node", "ca", "--config-dir", "/c"])
            .expect("--ca-dir and --node-tokens are optional");
        let Command::Ca(config) = cli.command else {
            panic!("not ca");
        };
        assert_eq!(config.ca_dir, None);
        assert_eq!(config.node_tokens, None);
        assert_eq!(config.agent_service_account, "nodemesh-node");
        assert_eq!(config.token_audience, "nodemesh-ca");
        let expected_namespace =
            std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "nodemesh-system".into());
        assert_eq!(config.namespace, expected_namespace);

        let cli = Cli::try_parse_from([
            "mesh-node",
            "ca",
            "--config-dir",
            "/c",
            "--namespace",
            "mesh",
            "--agent-service-account",
            "nodemesh-node",
            "--token-audience",
            "ca.mesh",
        ])
        .expect("valid flags");
        let Command::Ca(config) = cli.command else {
            panic!("not ca");
        };
        assert_eq!(
            (
                config.namespace.as_str(),
                config.agent_service_account.as_str(),
                config.token_audience.as_str()
            ),
            ("mesh", "nodemesh-node", "ca.mesh")
        );
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

    /// `docs/cli.md`: every command's flags, as `--help` prints them.
    fn cli_reference() -> String {
        use clap::CommandFactory;

        let mut cli = Cli::command().term_width(100);
        let mut out = String::from(
            "# Command-line reference\n\nEvery flag of every `mesh-node` command, as `--help` \
             prints it. Generated: a unit test fails when this file and the code disagree \
             (`NODEMESH_UPDATE_DOCS=1 cargo test -p mesh-node cli_reference` rewrites it).\n",
        );
        let mut sections = vec![(String::from("mesh-node"), cli.render_long_help())];
        for sub in cli.get_subcommands_mut() {
            let name = format!("mesh-node {}", sub.get_name());
            for nested in sub.get_subcommands_mut() {
                let nested_name = format!("{name} {}", nested.get_name());
                sections.push((nested_name, nested.render_long_help()));
            }
            sections.push((name, sub.render_long_help()));
        }
        sections.sort_by(|a, b| a.0.cmp(&b.0));
        // Values from this machine's environment (`[env: X=value]`) are not reference.
        let env_value = regex::Regex::new(r"\[env: ([A-Z_]+)=[^\]]*\]").expect("a regex");
        for (name, help) in sections {
            let help = env_value
                .replace_all(&help.to_string(), "[env: $1]")
                .into_owned();
            out.push_str(&format!(
                "\n## `{name}`\n\n```text\n{}\n```\n",
                help.trim_end()
            ));
        }
        out
    }

    #[test]
    fn cli_reference_is_up_to_date() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md");
        let expected = cli_reference();
        if std::env::var_os("NODEMESH_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &expected).expect("writing docs/cli.md");
        }
        let actual = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            actual == expected,
            "docs/cli.md is stale: run NODEMESH_UPDATE_DOCS=1 cargo test -p mesh-node \
             cli_reference"
        );
    }
}
