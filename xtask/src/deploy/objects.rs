//! The install's Kubernetes objects, built from k8s-openapi's types so a misspelt field is a
//! compile error rather than a surprise at `kubectl apply`.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{
            DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, Deployment, DeploymentSpec,
            RollingUpdateDaemonSet,
        },
        core::v1::{
            Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
            EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath, Namespace,
            ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
            ProjectedVolumeSource, SeccompProfile, SecurityContext, Service, ServiceAccount,
            ServiceAccountTokenProjection, ServicePort, ServiceSpec, Sysctl, TCPSocketAction,
            Volume, VolumeMount, VolumeProjection,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
        rbac::v1::{
            ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
        },
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinition, CustomResourceDefinitionNames, CustomResourceDefinitionSpec,
        CustomResourceDefinitionVersion, CustomResourceSubresourceStatus,
        CustomResourceSubresources, CustomResourceValidation, JSONSchemaProps,
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use serde::Serialize;
use serde_json::{Value, json};

use super::Values;

pub const NAMESPACE: &str = "nodemesh-system";
pub const AGENT: &str = "nodemesh-node";
pub const CA: &str = "nodemesh-ca";
/// The listener holder's DaemonSet.
pub const HOLDER: &str = "nodemesh-holder";
/// The ingress gateway's Deployment and ServiceAccount (`gateway.enabled`).
pub const GATEWAY: &str = "nodemesh-gateway";
/// Istio's name for a user-provided CA (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
/// `cert-chain.pem`).
const CACERTS: &str = "cacerts";
/// The root the CA creates when the user brings none.
const GENERATED_ROOT: &str = "nodemesh-ca-root";
/// Where the CA publishes the trust bundle (`root-cert.pem`) for the agents.
const TRUST_BUNDLE: &str = "nodemesh-ca-root-cert";
/// Audience of the agent's projected ServiceAccount token: only the CA accepts it.
const CA_TOKEN_AUDIENCE: &str = "nodemesh-ca";
const CA_PORT: i32 = 15012;
const HEALTH_PORT: i32 = 15021;
/// The node's directory of sockets, at the same path in the agent, the holder and on the
/// host (where the runtime runs the CNI plugin, which dials the agent there).
const SOCKET_DIR: &str = "/var/run/nodemesh";
/// The agent's pins: programs, links and maps that stay in force between two agents.
const BPFFS_PATH: &str = "/sys/fs/bpf/nodemesh";
/// The agent's grace period beyond `--drain-timeout`: time to exit once the drain ends.
/// The chart's `add … 5` says the same (`chart::substitutions`; a test compares them).
pub const DRAIN_MARGIN_SECONDS: i32 = 5;

/// One file of the install: its objects, in apply order, and comments for lines that need
/// a reason next to them (`(line, comment)`: the line, trimmed, must occur exactly once).
pub struct Manifest {
    pub file: &'static str,
    pub objects: Vec<Value>,
    pub comments: Vec<(&'static str, &'static str)>,
}

/// Every file of `deploy/manifests/`; `kustomize` applies them in this order.
pub fn manifests(values: &Values) -> Vec<Manifest> {
    vec![
        Manifest {
            file: "namespace.yaml",
            objects: vec![to_value(namespace())],
            comments: vec![(
                "pod-security.kubernetes.io/enforce: privileged",
                "the agent needs the node's network, PIDs and capabilities",
            )],
        },
        Manifest {
            file: "rbac.yaml",
            objects: rbac(),
            comments: RBAC_REASONS.to_vec(),
        },
        Manifest {
            file: "ca.yaml",
            objects: vec![
                to_value(ca_service()),
                to_value(ca_deployment(values)),
                to_value(ca_disruption_budget()),
            ],
            comments: vec![],
        },
        Manifest {
            file: "daemonset.yaml",
            objects: vec![to_value(agent_daemon_set(values))],
            comments: AGENT_REASONS.to_vec(),
        },
        Manifest {
            file: "holder.yaml",
            objects: vec![to_value(holder_daemon_set(values))],
            comments: HOLDER_REASONS.to_vec(),
        },
    ]
}

/// Not in the kustomization: the ingress gateway is off unless asked for
/// (`gateway.enabled`, or `kubectl apply -f deploy/manifests/gateway.yaml`).
pub fn gateway_manifest(values: &Values) -> Manifest {
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: GATEWAY.into(),
        namespace: Some(NAMESPACE.into()),
        ..Subject::default()
    };
    let role_ref = |kind: &str| RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: GATEWAY.into(),
    };
    Manifest {
        file: "gateway.yaml",
        objects: vec![
            to_value(ServiceAccount {
                metadata: meta(GATEWAY, "gateway"),
                ..ServiceAccount::default()
            }),
            to_value(ClusterRole {
                metadata: cluster_meta(GATEWAY, "gateway"),
                rules: Some(
                    mesh_config_rules(&["gateways"])
                        .into_iter()
                        .chain([
                            rule(
                                &["gateway.networking.k8s.io"],
                                &["gateways", "tlsroutes", "tcproutes"],
                                READ,
                            ),
                            // Accepted, Programmed, ResolvedRefs, attached routes.
                            rule(
                                &["gateway.networking.k8s.io"],
                                &[
                                    "gateways/status",
                                    "httproutes/status",
                                    "tlsroutes/status",
                                    "tcproutes/status",
                                ],
                                &["get", "patch"],
                            ),
                        ])
                        .collect(),
                ),
                ..ClusterRole::default()
            }),
            to_value(ClusterRoleBinding {
                metadata: cluster_meta(GATEWAY, "gateway"),
                role_ref: role_ref("ClusterRole"),
                subjects: Some(vec![subject.clone()]),
            }),
            to_value(Role {
                metadata: meta(GATEWAY, "gateway"),
                rules: Some(vec![rule(&[""], &["secrets"], READ)]),
            }),
            to_value(RoleBinding {
                metadata: meta(GATEWAY, "gateway"),
                role_ref: role_ref("Role"),
                subjects: Some(vec![subject]),
            }),
            to_value(gateway_deployment(values)),
            to_value(gateway_service(values)),
        ],
        comments: vec![
            (
                "- secrets",
                "the certificates Gateways name (credentialName), in the gateway's namespace only",
            ),
            (
                "value: '0'",
                "the gateway listens on the ports Gateways declare (80, 443) without root",
            ),
        ],
    }
}

/// `mesh-node gateway`: not enrolled (it does its own mutual TLS), labelled like Istio's
/// ingress gateway so Gateways written for Istio select it.
fn gateway_deployment(values: &Values) -> Deployment {
    let container = Container {
        name: "gateway".into(),
        image: Some(values.image.reference()),
        image_pull_policy: Some(values.image.pull_policy.clone()),
        args: args(&[
            "gateway",
            "--config-source=kube",
            "--root-namespace",
            NAMESPACE,
            "--ca-addr",
            &values.ca.address,
            "--ca-root-file=/etc/nodemesh/ca-root/root-cert.pem",
            "--ca-token-file=/var/run/secrets/nodemesh/ca-token/token",
            &format!(
                "--num-trusted-proxies={}",
                values.gateway.num_trusted_proxies
            ),
            &format!("--gateway-class={}", values.gateway.class_name),
        ]),
        env: Some(vec![
            field_env("NODE_NAME", "spec.nodeName"),
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            env("RUST_LOG", &values.log_level),
        ]),
        ports: Some(vec![port("http", 80), port("https", 443)]),
        readiness_probe: Some(http_probe("/healthz/ready", 5)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..http_probe("/healthz/live", 10)
        }),
        resources: Some(values.gateway.resources.clone()),
        security_context: Some(no_privileges()),
        volume_mounts: Some(vec![
            mount("ca-root", "/etc/nodemesh/ca-root", true),
            mount("ca-token", "/var/run/secrets/nodemesh/ca-token", true),
        ]),
        ..Container::default()
    };
    let mut pod_labels = labels("gateway", GATEWAY);
    pod_labels.insert("istio".into(), "ingressgateway".into());
    let security = PodSecurityContext {
        sysctls: Some(vec![Sysctl {
            name: "net.ipv4.ip_unprivileged_port_start".into(),
            value: "0".into(),
        }]),
        ..non_root()
    };
    let pod = PodSpec {
        service_account_name: Some(GATEWAY.into()),
        security_context: Some(security),
        // The drain delay (5 s, still accepting while unready) and the drain timeout (30 s).
        termination_grace_period_seconds: Some(5 + 30 + i64::from(DRAIN_MARGIN_SECONDS)),
        containers: vec![container],
        volumes: Some(ca_trust_volumes().to_vec()),
        ..PodSpec::default()
    };
    deployment(GATEWAY, "gateway", values.gateway.replicas, pod_labels, pod)
}

fn gateway_service(values: &Values) -> Service {
    Service {
        metadata: meta(GATEWAY, "gateway"),
        spec: Some(ServiceSpec {
            type_: Some(values.gateway.service_type.clone()),
            selector: Some(selector_labels(GATEWAY)),
            ports: Some(values.gateway.ports.clone()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The CA's trust bundle and a token only the CA accepts, for whoever asks it for
/// certificates (the agents, the gateway).
fn ca_trust_volumes() -> [Volume; 2] {
    [
        Volume {
            name: "ca-root".into(),
            // The trust bundle the CA publishes; optional, so a pod that starts first waits
            // for it (alive, not ready) instead of failing to start.
            config_map: Some(ConfigMapVolumeSource {
                name: TRUST_BUNDLE.into(),
                optional: Some(true),
                items: Some(vec![KeyToPath {
                    key: "root-cert.pem".into(),
                    path: "root-cert.pem".into(),
                    ..KeyToPath::default()
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "ca-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(CA_TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]
}

/// Not in the kustomization: it needs the Prometheus Operator's CRDs.
pub fn pod_monitor_manifest(values: &Values) -> Manifest {
    Manifest {
        file: "podmonitor.yaml",
        objects: vec![pod_monitor(values)],
        comments: vec![(
            "- __meta_kubernetes_pod_ip",
            "the agent declares no container port (see daemonset.yaml): scrape the pod's \
             address at the metrics port",
        )],
    }
}

/// `deploy/crds/`: only for clusters without Istio or the Gateway API.
pub fn crd_manifests() -> Vec<Manifest> {
    CRDS.iter()
        .map(|crd| Manifest {
            file: crd.file,
            objects: vec![to_value(crd.build())],
            comments: vec![],
        })
        .collect()
}

fn to_value(object: impl Serialize) -> Value {
    serde_json::to_value(object).expect("k8s-openapi objects serialize to JSON")
}

fn labels(component: &str, name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), name.into()),
        ("app.kubernetes.io/component".into(), component.into()),
        ("app.kubernetes.io/part-of".into(), "nodemesh".into()),
    ])
}

/// The one label the selectors use: selectors cannot change after creation, so keep them
/// to the name.
fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/name".into(), name.into())])
}

fn meta(name: &str, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NAMESPACE.into()),
        labels: Some(labels(component, name)),
        ..ObjectMeta::default()
    }
}

fn cluster_meta(name: &str, component: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: None,
        ..meta(name, component)
    }
}

fn namespace() -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/part-of".into(), "nodemesh".into()),
                (
                    "pod-security.kubernetes.io/enforce".into(),
                    "privileged".into(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

// === RBAC ===

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
    PolicyRule {
        api_groups: Some(strings(groups)),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        ..PolicyRule::default()
    }
}

const READ: &[&str] = &["get", "list", "watch"];

const RBAC_REASONS: &[(&str, &str)] = &[
    (
        "- virtualservices",
        "the Istio and Gateway API kinds the proxy routes and authorizes with",
    ),
    (
        "- tokenreviews",
        "the CA checks each agent's projected ServiceAccount token",
    ),
    (
        "- cacerts",
        "the CA reads the user's root, or its own; `create` (which cannot be limited by \
         name) writes its own when neither exists",
    ),
    (
        "- nodemesh-ca-root-cert",
        "the trust bundle the CA publishes for the agents",
    ),
];

/// Reading the mesh's config: what every agent watches, and `extra` Istio networking kinds.
fn mesh_config_rules(extra: &[&str]) -> Vec<PolicyRule> {
    let networking: Vec<&str> = ["virtualservices", "destinationrules", "serviceentries"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    vec![
        rule(&[""], &["namespaces", "pods", "services"], READ),
        rule(&["discovery.k8s.io"], &["endpointslices"], READ),
        rule(&["networking.istio.io"], &networking, READ),
        rule(
            &["security.istio.io"],
            &[
                "peerauthentications",
                "authorizationpolicies",
                "requestauthentications",
            ],
            READ,
        ),
        rule(&["gateway.networking.k8s.io"], &["httproutes"], READ),
    ]
}

fn rbac() -> Vec<Value> {
    let agent_cluster_role = ClusterRole {
        metadata: cluster_meta(AGENT, "agent"),
        rules: Some(mesh_config_rules(&[])),
        ..ClusterRole::default()
    };
    let agent_role = Role {
        metadata: meta(AGENT, "agent"),
        // When it stops: is its DaemonSet gone (uninstall: remove the CNI plugin) or not?
        rules: Some(vec![PolicyRule {
            resource_names: Some(vec![AGENT.into()]),
            ..rule(&["apps"], &["daemonsets"], &["get"])
        }]),
    };
    let ca_cluster_role = ClusterRole {
        metadata: cluster_meta(CA, "ca"),
        rules: Some(vec![
            rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
            // Node authorization: an agent gets certificates only for pods on its node (and
            // `get` finds an agent's node from its pod when the token does not say).
            rule(&[""], &["pods"], READ),
        ]),
        ..ClusterRole::default()
    };
    let ca_role = Role {
        metadata: meta(CA, "ca"),
        rules: Some(vec![
            PolicyRule {
                resource_names: Some(vec![CACERTS.into(), GENERATED_ROOT.into()]),
                ..rule(&[""], &["secrets"], &["get"])
            },
            rule(&[""], &["secrets"], &["create"]),
            PolicyRule {
                resource_names: Some(vec![TRUST_BUNDLE.into()]),
                ..rule(&[""], &["configmaps"], &["get", "update"])
            },
            rule(&[""], &["configmaps"], &["create"]),
        ]),
    };
    let subject = |name: &str| Subject {
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: Some(NAMESPACE.into()),
        ..Subject::default()
    };
    let role_ref = |kind: &str, name: &str| RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: name.into(),
    };
    let cluster_binding = |name: &str, component: &str| ClusterRoleBinding {
        metadata: cluster_meta(name, component),
        role_ref: role_ref("ClusterRole", name),
        subjects: Some(vec![subject(name)]),
    };
    vec![
        to_value(ServiceAccount {
            metadata: meta(AGENT, "agent"),
            ..ServiceAccount::default()
        }),
        to_value(ServiceAccount {
            metadata: meta(CA, "ca"),
            ..ServiceAccount::default()
        }),
        to_value(agent_cluster_role),
        to_value(cluster_binding(AGENT, "agent")),
        to_value(agent_role),
        to_value(RoleBinding {
            metadata: meta(AGENT, "agent"),
            role_ref: role_ref("Role", AGENT),
            subjects: Some(vec![subject(AGENT)]),
        }),
        to_value(ca_cluster_role),
        to_value(cluster_binding(CA, "ca")),
        to_value(ca_role),
        to_value(RoleBinding {
            metadata: meta(CA, "ca"),
            role_ref: role_ref("Role", CA),
            subjects: Some(vec![subject(CA)]),
        }),
    ]
}

// === the agent ===

/// Why the agent holds each privilege; the generated YAML carries these next to the lines.
const AGENT_REASONS: &[(&str, &str)] = &[
    (
        "privileged: false",
        "capabilities instead, each with its reason",
    ),
    (
        "--config-source=kube",
        "watches Namespaces, Pods, Services, EndpointSlices and the Istio/Gateway API kinds",
    ),
    (
        "--cgroup-path=/host/sys/fs/cgroup",
        "the node's cgroup v2 root, mounted below",
    ),
    (
        "hostNetwork: true",
        "the proxy serves the node: its listeners and upstream sockets live in the node's netns",
    ),
    (
        "hostPID: true",
        "pods' network namespaces are found through their processes (/proc/<pid>/ns/net)",
    ),
    (
        "- BPF",
        "load the capture programs and create their maps (kernel 5.8+)",
    ),
    (
        "- NET_ADMIN",
        "attach cgroup and sk_lookup programs; routing rules, IP_TRANSPARENT and SO_MARK in pods",
    ),
    (
        "- SYS_ADMIN",
        "setns() into pods' network namespaces (and bpf() on kernels without CAP_BPF)",
    ),
    (
        "- SYS_PTRACE",
        "read other processes' /proc/<pid>/ns links (ptrace access check)",
    ),
    (
        "- SYS_RESOURCE",
        "raise RLIMIT_MEMLOCK for BPF maps on kernels before 5.11",
    ),
    (
        "mountPath: /sys/fs/bpf",
        "the node's bpffs (systemd mounts it; required): the pins under it keep capture in force \
         between agents; HostToContainer shows one mounted after the agent started",
    ),
    (
        "mountPath: /host/sys/fs/cgroup",
        "the node's cgroup v2 root; the container's own /sys/fs/cgroup is its cgroup ns",
    ),
    (
        "mountPath: /host/proc",
        "the node's /proc (hostPID makes the container's /proc show the node's processes too)",
    ),
    (
        "mountPath: /var/run/netns",
        "named network namespaces; HostToContainer shows ones created after start",
    ),
    (
        "mountPath: /host/opt/cni/bin",
        "the agent copies itself here as the chained plugin nodemesh-cni",
    ),
    (
        "mountPath: /host/etc/cni/net.d",
        "the agent adds nodemesh-cni at the end of the node's chain",
    ),
    (
        "mountPath: /var/run/nodemesh",
        "the CNI socket, at the path the plugin (run by the runtime on the host) dials, and the \
         holder's socket",
    ),
    (
        "--cni-plugin-binary=/usr/local/lib/nodemesh/nodemesh-cni",
        "the image's static build: the runtime runs the plugin on the host, with its libc",
    ),
    (
        "--cni-uninstall-with=$(POD_NAMESPACE)/nodemesh-node",
        "when this DaemonSet is deleted the agent uninstalls the mesh from the node (plugin, \
         pods, programs, pins, held sockets); a rolling update keeps everything",
    ),
    (
        "--bpffs-path=/sys/fs/bpf/nodemesh",
        "capture programs, links and maps are pinned here: they outlive the agent, and the next \
         one adopts them",
    ),
    (
        "--holder-socket=/var/run/nodemesh/holder.sock",
        "the listening sockets are kept by nodemesh-holder: connections made while no agent \
         runs wait in their backlog",
    ),
    (
        "--drain-timeout=30s",
        "on SIGTERM: established connections get this long to finish (the grace period adds 5 s)",
    ),
    (
        "terminationGracePeriodSeconds: 35",
        "--drain-timeout + 5 s. No preStop hook: SIGTERM itself starts the drain, no Service \
         routes to the agent, and a sleep would only delay the hand-over",
    ),
    (
        "maxSurge: 1",
        "the new agent starts beside the old one, takes its listeners, turns ready; then the old \
         one drains. So no container ports: with hostNetwork each is a hostPort, which would \
         keep the new pod off the node",
    ),
    (
        "maxUnavailable: 0",
        "a node is never left without an agent by an update",
    ),
];

/// Why the holder is built the way it is; the generated YAML carries these next to the lines.
const HOLDER_REASONS: &[(&str, &str)] = &[
    (
        "holder",
        "keeps the agents' listening sockets (SCM_RIGHTS) beyond any agent pod. No liveness \
         probe: the kubelet restarts it if it exits; a probe-driven restart would close every \
         held socket",
    ),
    (
        "automountServiceAccountToken: false",
        "it never talks to the API server",
    ),
    ("- ALL", "it only receives and keeps descriptors"),
    (
        "runAsUser: 0",
        "the socket directory is root's, and without capabilities only its owner may create \
         the socket there",
    ),
    (
        "type: OnDelete",
        "it must outlive agent updates, so a chart upgrade does not restart it. A new version \
         takes over when its pod is deleted, starting empty: an agent restart on that node \
         before the agent has deposited its listeners again (within 5 s) is not hitless",
    ),
    (
        "mountPath: /var/run/nodemesh",
        "where it listens for the agents (the host's directory, shared with the agent)",
    ),
];

fn host_path(name: &str, path: &str, kind: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(kind.into()),
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// An environment variable from the pod's own fields (the downward API).
fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period_seconds: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(HEALTH_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        ..Probe::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn args(args: &[&str]) -> Option<Vec<String>> {
    Some(args.iter().map(|a| a.to_string()).collect())
}

fn agent_daemon_set(values: &Values) -> DaemonSet {
    let metrics_addr = format!("0.0.0.0:{}", values.agent.metrics_port);
    let health_addr = format!("0.0.0.0:{HEALTH_PORT}");
    let container = Container {
        name: "agent".into(),
        image: Some(values.image.reference()),
        image_pull_policy: Some(values.image.pull_policy.clone()),
        args: args(&[
            "run",
            "--node-name=$(NODE_NAME)",
            "--config-source=kube",
            "--cgroup-path=/host/sys/fs/cgroup",
            "--metrics-addr",
            &metrics_addr,
            "--health-addr",
            &health_addr,
            "--root-namespace",
            NAMESPACE,
            "--ca-addr",
            &values.ca.address,
            "--ca-root-file=/etc/nodemesh/ca-root/root-cert.pem",
            "--ca-token-file=/var/run/secrets/nodemesh/ca-token/token",
            &format!("--cni-socket={SOCKET_DIR}/cni.sock"),
            "--cni-bin-dir=/host/opt/cni/bin",
            "--cni-conf-dir=/host/etc/cni/net.d",
            "--cni-plugin-binary=/usr/local/lib/nodemesh/nodemesh-cni",
            &format!("--cni-uninstall-with=$(POD_NAMESPACE)/{AGENT}"),
            &format!("--bpffs-path={BPFFS_PATH}"),
            &format!("--holder-socket={}", holder_socket()),
            &format!("--drain-timeout={}s", values.agent.drain_timeout_seconds),
            &format!(
                "--outbound-traffic-policy={}",
                values.agent.outbound_traffic_policy
            ),
        ]),
        env: Some(vec![
            field_env("NODE_NAME", "spec.nodeName"),
            // Whatever namespace the install went to (Helm's release namespace).
            field_env("POD_NAMESPACE", "metadata.namespace"),
            env("RUST_LOG", &values.log_level),
        ]),
        // No `ports`: see the update strategy below. Probes and the Prometheus annotations
        // name the ports by number.
        readiness_probe: Some(http_probe("/healthz/ready", 5)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..http_probe("/healthz/live", 10)
        }),
        resources: Some(values.agent.resources.clone()),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: args(&[
                    "BPF",
                    "NET_ADMIN",
                    "SYS_ADMIN",
                    "SYS_PTRACE",
                    "SYS_RESOURCE",
                ]),
                drop: args(&["ALL"]),
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount("ca-root", "/etc/nodemesh/ca-root", true),
            mount("ca-token", "/var/run/secrets/nodemesh/ca-token", true),
            VolumeMount {
                mount_propagation: Some("HostToContainer".into()),
                ..mount("bpffs", "/sys/fs/bpf", false)
            },
            mount("cgroup", "/host/sys/fs/cgroup", false),
            mount("proc", "/host/proc", true),
            VolumeMount {
                mount_propagation: Some("HostToContainer".into()),
                ..mount("netns", "/var/run/netns", true)
            },
            mount("cni-bin", "/host/opt/cni/bin", false),
            mount("cni-conf", "/host/etc/cni/net.d", false),
            mount("sockets", SOCKET_DIR, false),
        ]),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(AGENT.into()),
        host_network: Some(true),
        host_pid: Some(true),
        // Resolve cluster names (the CA, the API server) from the node's network.
        dns_policy: Some("ClusterFirstWithHostNet".into()),
        priority_class_name: Some("system-node-critical".into()),
        tolerations: Some(values.agent.tolerations.clone()),
        // SIGTERM drains; capture and enrollment stay as they are for the next agent.
        termination_grace_period_seconds: Some(i64::from(
            values.agent.drain_timeout_seconds + DRAIN_MARGIN_SECONDS,
        )),
        containers: vec![container],
        volumes: Some(
            ca_trust_volumes()
                .into_iter()
                .chain([
                    host_path("bpffs", "/sys/fs/bpf", "DirectoryOrCreate"),
                    host_path("cgroup", "/sys/fs/cgroup", "Directory"),
                    host_path("proc", "/proc", "Directory"),
                    host_path("netns", "/var/run/netns", "DirectoryOrCreate"),
                    host_path("cni-bin", &values.agent.cni.bin_dir, "DirectoryOrCreate"),
                    host_path("cni-conf", &values.agent.cni.conf_dir, "DirectoryOrCreate"),
                    host_path("sockets", SOCKET_DIR, "DirectoryOrCreate"),
                ])
                .collect(),
        ),
        ..PodSpec::default()
    };
    let update = DaemonSetUpdateStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDaemonSet {
            max_surge: Some(IntOrString::Int(1)),
            max_unavailable: Some(IntOrString::Int(0)),
        }),
    };
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".into(), "true".into()),
        (
            "prometheus.io/port".into(),
            values.agent.metrics_port.to_string(),
        ),
        ("prometheus.io/path".into(), "/metrics".into()),
    ]);
    daemon_set(AGENT, "agent", update, Some(annotations), pod)
}

/// A DaemonSet of the pods `pod` describes, named `name`, of component `component`.
fn daemon_set(
    name: &str,
    component: &str,
    update_strategy: DaemonSetUpdateStrategy,
    annotations: Option<BTreeMap<String, String>>,
    pod: PodSpec,
) -> DaemonSet {
    DaemonSet {
        metadata: meta(name, component),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(name)),
                ..LabelSelector::default()
            },
            update_strategy: Some(update_strategy),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(component, name)),
                    annotations,
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    }
}

fn pod_monitor(values: &Values) -> Value {
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": meta(AGENT, "agent"),
        "spec": {
            "selector": {"matchLabels": selector_labels(AGENT)},
            "podMetricsEndpoints": [{
                "path": "/metrics",
                "interval": "15s",
                "relabelings": [{
                    "sourceLabels": ["__meta_kubernetes_pod_ip"],
                    "targetLabel": "__address__",
                    "replacement": format!("${{1}}:{}", values.agent.metrics_port),
                }],
            }],
        },
    })
}

// === the listener holder ===

fn holder_socket() -> String {
    format!("{SOCKET_DIR}/holder.sock")
}

fn holder_daemon_set(values: &Values) -> DaemonSet {
    let container = Container {
        name: "holder".into(),
        image: Some(values.image.reference()),
        image_pull_policy: Some(values.image.pull_policy.clone()),
        args: args(&["holder", &format!("--socket={}", holder_socket())]),
        env: Some(vec![env("RUST_LOG", &values.log_level)]),
        resources: Some(values.holder.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            ..no_privileges()
        }),
        volume_mounts: Some(vec![mount("sockets", SOCKET_DIR, false)]),
        ..Container::default()
    };
    let pod = PodSpec {
        automount_service_account_token: Some(false),
        priority_class_name: Some("system-node-critical".into()),
        tolerations: Some(values.agent.tolerations.clone()),
        security_context: Some(PodSecurityContext {
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: Some(vec![host_path("sockets", SOCKET_DIR, "DirectoryOrCreate")]),
        ..PodSpec::default()
    };
    let update = DaemonSetUpdateStrategy {
        type_: Some("OnDelete".into()),
        rolling_update: None,
    };
    daemon_set(HOLDER, "holder", update, None, pod)
}

/// No capability, no escalation, a read-only root: for the pods that need none of the
/// agent's powers (the holder, the CA).
fn no_privileges() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: args(&["ALL"]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

// === the CA ===

fn ca_service() -> Service {
    Service {
        metadata: meta(CA, "ca"),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(CA)),
            ports: Some(vec![ServicePort {
                name: Some("https".into()),
                port: CA_PORT,
                target_port: Some(IntOrString::String("https".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn ca_deployment(values: &Values) -> Deployment {
    let listen = format!("0.0.0.0:{CA_PORT}");
    let tcp_probe = |period_seconds: i32| Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("https".into()),
            ..TCPSocketAction::default()
        }),
        period_seconds: Some(period_seconds),
        ..Probe::default()
    };
    let container = Container {
        name: "ca".into(),
        image: Some(values.image.reference()),
        image_pull_policy: Some(values.image.pull_policy.clone()),
        args: args(&[
            "ca",
            "--listen",
            &listen,
            // Pods, for node authorization; the root from Secret `cacerts` (or its own);
            // agents' tokens checked with TokenReview.
            "--config-source=kube",
            "--root-namespace",
            NAMESPACE,
            "--agent-service-account",
            AGENT,
            "--token-audience",
            CA_TOKEN_AUDIENCE,
            // The ingress gateway (gateway.yaml) gets a certificate for its own identity.
            &format!("--gateway-service-account=$(POD_NAMESPACE)/{GATEWAY}"),
        ]),
        env: Some(vec![
            env("RUST_LOG", &values.log_level),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            // The root's key is written here for a moment while it loads (the root
            // filesystem is read-only).
            env("TMPDIR", "/tmp"),
        ]),
        ports: Some(vec![port("https", CA_PORT)]),
        readiness_probe: Some(tcp_probe(5)),
        liveness_probe: Some(tcp_probe(10)),
        resources: Some(values.ca.resources.clone()),
        security_context: Some(no_privileges()),
        volume_mounts: Some(vec![mount("tmp", "/tmp", false)]),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(CA.into()),
        security_context: Some(PodSecurityContext {
            fs_group: Some(NONROOT),
            ..non_root()
        }),
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("1Mi".into())),
            }),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    };
    deployment(CA, "ca", values.ca.replicas, labels("ca", CA), pod)
}

/// A Deployment named `name`, of component `component`, of `replicas` pods `pod`
/// describes, labelled `pod_labels`.
fn deployment(
    name: &str,
    component: &str,
    replicas: i32,
    pod_labels: BTreeMap<String, String>,
    pod: PodSpec,
) -> Deployment {
    Deployment {
        metadata: meta(name, component),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(name)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// distroless' `nonroot` user.
const NONROOT: i64 = 65532;

/// A pod that runs as distroless' `nonroot` user, with the runtime's seccomp profile.
fn non_root() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NONROOT),
        run_as_group: Some(NONROOT),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

fn ca_disruption_budget() -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(CA, "ca"),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(CA)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

// === CRDs ===

/// A CRD of a kind the proxy reads, with a structural but permissive schema: the agent
/// validates the fields it uses and reports the rest, and the project's real CRDs (Istio's,
/// the Gateway API's) win when the cluster has them.
struct Crd {
    file: &'static str,
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    short_names: &'static [&'static str],
    category: &'static str,
    /// Served versions; the first is stored.
    versions: &'static [&'static str],
}

const CRDS: &[Crd] = &[
    Crd {
        file: "virtualservices.networking.istio.io.yaml",
        group: "networking.istio.io",
        kind: "VirtualService",
        plural: "virtualservices",
        short_names: &["vs"],
        category: "istio-io",
        versions: &["v1", "v1beta1", "v1alpha3"],
    },
    Crd {
        file: "destinationrules.networking.istio.io.yaml",
        group: "networking.istio.io",
        kind: "DestinationRule",
        plural: "destinationrules",
        short_names: &["dr"],
        category: "istio-io",
        versions: &["v1", "v1beta1", "v1alpha3"],
    },
    Crd {
        file: "serviceentries.networking.istio.io.yaml",
        group: "networking.istio.io",
        kind: "ServiceEntry",
        plural: "serviceentries",
        short_names: &["se"],
        category: "istio-io",
        versions: &["v1", "v1beta1", "v1alpha3"],
    },
    Crd {
        file: "peerauthentications.security.istio.io.yaml",
        group: "security.istio.io",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        short_names: &["pa"],
        category: "istio-io",
        versions: &["v1", "v1beta1"],
    },
    Crd {
        file: "authorizationpolicies.security.istio.io.yaml",
        group: "security.istio.io",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        short_names: &["ap"],
        category: "istio-io",
        versions: &["v1", "v1beta1"],
    },
    Crd {
        file: "requestauthentications.security.istio.io.yaml",
        group: "security.istio.io",
        kind: "RequestAuthentication",
        plural: "requestauthentications",
        short_names: &["ra"],
        category: "istio-io",
        versions: &["v1", "v1beta1"],
    },
    Crd {
        file: "gateways.networking.istio.io.yaml",
        group: "networking.istio.io",
        kind: "Gateway",
        plural: "gateways",
        short_names: &["gw"],
        category: "istio-io",
        versions: &["v1", "v1beta1", "v1alpha3"],
    },
    Crd {
        file: "gateways.gateway.networking.k8s.io.yaml",
        group: "gateway.networking.k8s.io",
        kind: "Gateway",
        plural: "gateways",
        short_names: &["gtw"],
        category: "gateway-api",
        versions: &["v1", "v1beta1"],
    },
    Crd {
        file: "tlsroutes.gateway.networking.k8s.io.yaml",
        group: "gateway.networking.k8s.io",
        kind: "TLSRoute",
        plural: "tlsroutes",
        short_names: &[],
        category: "gateway-api",
        versions: &["v1alpha2"],
    },
    Crd {
        file: "tcproutes.gateway.networking.k8s.io.yaml",
        group: "gateway.networking.k8s.io",
        kind: "TCPRoute",
        plural: "tcproutes",
        short_names: &[],
        category: "gateway-api",
        versions: &["v1alpha2"],
    },
    Crd {
        file: "httproutes.gateway.networking.k8s.io.yaml",
        group: "gateway.networking.k8s.io",
        kind: "HTTPRoute",
        plural: "httproutes",
        short_names: &[],
        category: "gateway-api",
        versions: &["v1", "v1beta1"],
    },
];

impl Crd {
    fn build(&self) -> CustomResourceDefinition {
        let open_object = || JSONSchemaProps {
            type_: Some("object".into()),
            x_kubernetes_preserve_unknown_fields: Some(true),
            ..JSONSchemaProps::default()
        };
        let schema = JSONSchemaProps {
            type_: Some("object".into()),
            properties: Some(BTreeMap::from([
                ("spec".into(), open_object()),
                ("status".into(), open_object()),
            ])),
            ..JSONSchemaProps::default()
        };
        let versions = self
            .versions
            .iter()
            .enumerate()
            .map(|(index, version)| CustomResourceDefinitionVersion {
                name: version.to_string(),
                served: true,
                storage: index == 0,
                schema: Some(CustomResourceValidation {
                    open_api_v3_schema: Some(schema.clone()),
                }),
                subresources: Some(CustomResourceSubresources {
                    status: Some(CustomResourceSubresourceStatus(json!({}))),
                    ..CustomResourceSubresources::default()
                }),
                ..CustomResourceDefinitionVersion::default()
            })
            .collect();
        CustomResourceDefinition {
            metadata: ObjectMeta {
                name: Some(format!("{}.{}", self.plural, self.group)),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".into(),
                    "nodemesh".into(),
                )])),
                ..ObjectMeta::default()
            },
            spec: CustomResourceDefinitionSpec {
                group: self.group.into(),
                scope: "Namespaced".into(),
                names: CustomResourceDefinitionNames {
                    kind: self.kind.into(),
                    list_kind: Some(format!("{}List", self.kind)),
                    plural: self.plural.into(),
                    singular: Some(self.kind.to_lowercase()),
                    short_names: (!self.short_names.is_empty())
                        .then(|| self.short_names.iter().map(|s| s.to_string()).collect()),
                    categories: Some(vec![self.category.into()]),
                },
                versions,
                ..CustomResourceDefinitionSpec::default()
            },
            ..CustomResourceDefinition::default()
        }
    }
}
