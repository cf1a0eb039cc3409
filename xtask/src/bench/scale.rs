//! The config at the scale of a real cluster: one agent given thousands of Services and
//! tens of thousands of pods (every one on other nodes, as most of a big cluster is), through
//! the file source. How long until it is ready, the CPU and memory that took, and what an
//! update to one object then costs (PERF.md: ready ≤ 1 s, ≤ 1 CPU-s, ≤ 100 MiB for 10,000
//! Services + 50,000 pods; an update in proportion to what it touches).
//!
//! The objects look like a real cluster's: Deployment pods with owner references, a
//! container with ports, env and resources, the status the kubelet writes; a Service per
//! Deployment, with its EndpointSlice when the shape has slices (without, the agent matches
//! selectors itself, as for a config directory of Services and Pods alone).

use std::{
    fmt::Write as _,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{AGENT_HEALTH_PORT, AGENT_METRICS_PORT, Cluster, ScriptedApiServer};
use serde::Deserialize as _;

use super::{
    Interrupt, agent,
    table::{Align, Table},
};

/// Pods behind each Service.
const PODS_PER_SERVICE: u32 = 5;
/// Services per namespace (one file per namespace).
const SERVICES_PER_NAMESPACE: u32 = 100;
/// Nodes the generated pods are spread over (none of them the agent's).
const OTHER_NODES: u32 = 50;
/// How long an agent may take to be ready on the largest shape before the row fails.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long after the last load the settled memory is read.
const SETTLE: Duration = Duration::from_secs(3);
/// How long a one-object update may take to be published before the row fails.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the agent reads the generated cluster from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A config directory, one file per namespace.
    Files,
    /// A scripted API server (`--config-source kube`), as in a cluster.
    Kube,
}

/// One generated cluster.
#[derive(Clone, Copy)]
pub struct Shape {
    pub services: u32,
    pub slices: bool,
    pub source: Source,
}

impl Shape {
    /// The shapes PERF.md names: the big cluster with and without EndpointSlices, and a
    /// small one without, from files; and the big one from the API server.
    pub const ALL: [Shape; 4] = [
        Shape {
            services: 10_000,
            slices: true,
            source: Source::Files,
        },
        Shape {
            services: 10_000,
            slices: false,
            source: Source::Files,
        },
        Shape {
            services: 1_000,
            slices: false,
            source: Source::Files,
        },
        Shape {
            services: 10_000,
            slices: true,
            source: Source::Kube,
        },
    ];

    fn pods(self) -> u32 {
        self.services * PODS_PER_SERVICE
    }

    fn namespaces(self) -> u32 {
        self.services.div_ceil(SERVICES_PER_NAMESPACE)
    }

    fn describe(self) -> String {
        format!(
            "{} Services + {} pods, {}, {}",
            thousands(self.services),
            thousands(self.pods()),
            if self.slices {
                "with EndpointSlices"
            } else {
                "no EndpointSlices"
            },
            match self.source {
                Source::Files => "files",
                Source::Kube => "API server",
            }
        )
    }
}

/// What one shape cost the agent.
pub struct Measured {
    shape: Shape,
    /// From the agent's start to its readiness (the config loaded and published).
    ready: Duration,
    /// The agent's own figure for its first load: reading, translating, publishing.
    first_load: Duration,
    cpu_seconds: f64,
    rss_mib: f64,
    /// The agent's figure for the load after one pod changed.
    update: Duration,
    update_cpu_seconds: f64,
    /// [`SETTLE`] after the update.
    settled_rss_mib: f64,
}

/// Measures every shape, each on a fresh one-node cluster and agent.
pub fn measure(interrupt: &Interrupt) -> anyhow::Result<Vec<Measured>> {
    let mut measured = Vec::new();
    for shape in Shape::ALL {
        interrupt.check()?;
        println!("bench: config scale: {}…", shape.describe());
        let one = measure_shape(shape, interrupt)?;
        println!(
            "bench:   ready after {:.2} s (load {:.2} s), {:.2} CPU-s, {:.0} MiB; one pod \
             changed: {:.0} ms, {:.2} CPU-s; {:.0} MiB settled",
            one.ready.as_secs_f64(),
            one.first_load.as_secs_f64(),
            one.cpu_seconds,
            one.rss_mib,
            one.update.as_secs_f64() * 1e3,
            one.update_cpu_seconds,
            one.settled_rss_mib,
        );
        measured.push(one);
    }
    Ok(measured)
}

fn measure_shape(shape: Shape, interrupt: &Interrupt) -> anyhow::Result<Measured> {
    let mut cluster = Cluster::new("bench-scale", 1);
    cluster.set_agent_log_filter("info");
    let api = match shape.source {
        Source::Files => {
            for namespace in 0..shape.namespaces() {
                cluster.write_config(
                    &format!("scale-{namespace:03}.yaml"),
                    &namespace_yaml(shape, namespace),
                );
            }
            None
        }
        Source::Kube => {
            let api = ScriptedApiServer::start(&cluster, 0);
            for namespace in 0..shape.namespaces() {
                interrupt.check()?;
                for object in json_objects(&namespace_yaml(shape, namespace))? {
                    api.apply(object);
                }
            }
            let kubeconfig = cluster.work_dir().join("kubeconfig");
            api.write_kubeconfig(&kubeconfig);
            cluster.use_kube_source(&kubeconfig);
            Some(api)
        }
    };
    let started = Instant::now();
    cluster.spawn_agent_unwaited(0, &[]);
    let pid = cluster.agent_pid(0).context("the agent's pid")?;
    wait_until(READY_TIMEOUT, "the agent to be ready", || {
        Ok(matches!(
            cluster.try_http_get(0, AGENT_HEALTH_PORT, "/healthz/ready"),
            Ok((200, _))
        ))
    })?;
    let ready = started.elapsed();
    let cpu_seconds = agent::cpu_seconds(pid)?;
    let rss_mib = agent::rss_mib(pid)?;
    let first_load = last_load(&cluster)?;

    // One pod changes: its file is rewritten with a new label value.
    let loads = config_loads(&cluster)?;
    let cpu_before = agent::cpu_seconds(pid)?;
    match &api {
        None => cluster.write_config("scale-update.yaml", &update_yaml()),
        Some(api) => {
            for object in json_objects(&update_yaml())? {
                api.apply(object);
            }
        }
    }
    wait_until(UPDATE_TIMEOUT, "the update to be published", || {
        Ok(config_loads(&cluster)? > loads)
    })?;
    let update = last_load(&cluster)?;
    let update_cpu_seconds = agent::cpu_seconds(pid)? - cpu_before;
    // What the agent holds once the allocator has given back what the loads freed.
    thread::sleep(SETTLE);
    let settled_rss_mib = agent::rss_mib(pid)?;
    Ok(Measured {
        shape,
        ready,
        first_load,
        cpu_seconds,
        rss_mib,
        update,
        update_cpu_seconds,
        settled_rss_mib,
    })
}

/// The documents of `yaml` as the API server's JSON.
fn json_objects(yaml: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|document| serde_json::Value::deserialize(document).context("generated YAML"))
        .collect()
}

pub(super) fn wait_until(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done()? {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Node 0's agent's metric `name` with `labels` (summed over the others); a busy agent's
/// metrics endpoint is asked again until it answers (for at most [`UPDATE_TIMEOUT`]).
pub(super) fn metric(
    cluster: &Cluster,
    name: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<f64> {
    let mut text = None;
    wait_until(UPDATE_TIMEOUT, "the agent's metrics", || {
        text = match cluster.try_http_get(0, AGENT_METRICS_PORT, "/metrics") {
            Ok((200, body)) => Some(body),
            _ => None,
        };
        Ok(text.is_some())
    })?;
    mesh_tests::metric_value(&text.unwrap_or_default(), name, labels)
        .with_context(|| format!("no {name} in the metrics"))
}

fn config_loads(cluster: &Cluster) -> anyhow::Result<f64> {
    metric(cluster, "nodemesh_config_loads_total", &[])
}

fn last_load(cluster: &Cluster) -> anyhow::Result<Duration> {
    let seconds = metric(cluster, "nodemesh_config_last_load_seconds", &[])?;
    Ok(Duration::from_secs_f64(seconds))
}

/// The rows of the report.
pub fn render(measured: &[Measured]) -> String {
    let mut table = Table::new(&[
        ("config (one agent, every pod on other nodes)", Align::Left),
        ("ready after", Align::Right),
        ("first load", Align::Right),
        ("CPU", Align::Right),
        ("RSS", Align::Right),
        ("one pod changed", Align::Right),
        ("RSS settled", Align::Right),
    ]);
    for m in measured {
        table.row(vec![
            m.shape.describe(),
            format!("{:.2} s", m.ready.as_secs_f64()),
            format!("{:.2} s", m.first_load.as_secs_f64()),
            format!("{:.2} CPU-s", m.cpu_seconds),
            format!("{:.0} MiB", m.rss_mib),
            format!(
                "{:.0} ms, {:.2} CPU-s",
                m.update.as_secs_f64() * 1e3,
                m.update_cpu_seconds
            ),
            format!("{:.0} MiB", m.settled_rss_mib),
        ]);
    }
    format!(
        "\nConfig scale (target for 10,000 Services + 50,000 pods: ready ≤ 1 s, ≤ 1 CPU-s, \
         ≤ 100 MiB):\n{}",
        table.render(2)
    )
}

fn thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// An IPv4 address in 10.0.0.0/8 numbered `n` from `base` (the second octet).
fn address(base: u32, n: u32) -> String {
    let n = (base << 16) + n;
    format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255)
}

/// One namespace's file: the namespace, its Services (with their EndpointSlices when the
/// shape has them) and their pods.
fn namespace_yaml(shape: Shape, namespace: u32) -> String {
    let ns = format!("scale-{namespace}");
    let mut out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    \
         nodemesh.io/enabled: \"true\"\n    kubernetes.io/metadata.name: {ns}\n"
    );
    let first = namespace * SERVICES_PER_NAMESPACE;
    let last = (first + SERVICES_PER_NAMESPACE).min(shape.services);
    for service in first..last {
        let app = format!("app-{service}");
        let pods: Vec<(String, String, u32)> = (0..PODS_PER_SERVICE)
            .map(|k| {
                let index = service * PODS_PER_SERVICE + k;
                (
                    format!("{app}-7d9f8c6b5-{k:05x}"),
                    // Pod IPs from 10.64.0.0 up (50,000 fit below 10.65.0.0).
                    address(64, index),
                    index % OTHER_NODES,
                )
            })
            .collect();
        write_service(&mut out, &ns, &app, service);
        if shape.slices {
            write_slice(&mut out, &ns, &app, &pods);
        }
        for (name, ip, node) in &pods {
            write_pod(&mut out, &ns, &app, name, ip, *node, "v1");
        }
    }
    out
}

fn write_service(out: &mut String, ns: &str, app: &str, index: u32) {
    let ip = address(96, index);
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {app}\n  namespace: {ns}\n  \
         labels:\n    app: {app}\n  uid: 5c1e{index:08x}-0000-4000-8000-000000000000\n  \
         creationTimestamp: \"2026-11-01T10:00:00Z\"\n  resourceVersion: \"{index}\"\n\
         spec:\n  type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs:\n  - {ip}\n  \
         ipFamilies:\n  - IPv4\n  ipFamilyPolicy: SingleStack\n  sessionAffinity: None\n  \
         internalTrafficPolicy: Cluster\n  selector:\n    app: {app}\n  ports:\n  - name: \
         http\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n  - name: grpc\n    \
         port: 9090\n    protocol: TCP\n    targetPort: grpc\nstatus:\n  loadBalancer: {{}}\n"
    );
}

fn write_slice(out: &mut String, ns: &str, app: &str, pods: &[(String, String, u32)]) {
    let _ = write!(
        out,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: \
         {app}-x7k2p\n  namespace: {ns}\n  labels:\n    kubernetes.io/service-name: {app}\n    \
         endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\n\
         addressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\n- name: \
         grpc\n  port: 9090\n  protocol: TCP\nendpoints:\n"
    );
    for (name, ip, node) in pods {
        let _ = write!(
            out,
            "- addresses:\n  - {ip}\n  conditions:\n    ready: true\n    serving: true\n    \
             terminating: false\n  nodeName: other-node-{node}\n  targetRef:\n    kind: Pod\n    \
             name: {name}\n    namespace: {ns}\n    uid: 0d5e-{name}\n"
        );
    }
}

fn write_pod(
    out: &mut String,
    ns: &str,
    app: &str,
    name: &str,
    ip: &str,
    node: u32,
    version: &str,
) {
    let host = address(200, node);
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
         uid: 0d5e-{name}\n  creationTimestamp: \"2026-11-01T10:00:00Z\"\n  labels:\n    app: \
         {app}\n    version: {version}\n    pod-template-hash: 7d9f8c6b5\n  annotations:\n    \
         kubectl.kubernetes.io/restartedAt: \"2026-11-01T10:00:00Z\"\n  ownerReferences:\n  - \
         apiVersion: apps/v1\n    kind: ReplicaSet\n    name: {app}-7d9f8c6b5\n    uid: \
         1a2b-{app}\n    controller: true\n    blockOwnerDeletion: true\nspec:\n  nodeName: \
         other-node-{node}\n  serviceAccountName: {app}\n  restartPolicy: Always\n  \
         terminationGracePeriodSeconds: 30\n  dnsPolicy: ClusterFirst\n  containers:\n  - name: \
         app\n    image: registry.example.com/shop/{app}:1.4.2\n    imagePullPolicy: \
         IfNotPresent\n    ports:\n    - name: http\n      containerPort: 8080\n      protocol: \
         TCP\n    - name: grpc\n      containerPort: 9090\n      protocol: TCP\n    env:\n    - \
         name: LOG_LEVEL\n      value: info\n    - name: POD_NAME\n      valueFrom:\n        \
         fieldRef:\n          fieldPath: metadata.name\n    resources:\n      requests:\n        \
         cpu: 100m\n        memory: 128Mi\n      limits:\n        memory: 256Mi\n    \
         readinessProbe:\n      httpGet:\n        path: /ready\n        port: http\n      \
         periodSeconds: 5\nstatus:\n  phase: Running\n  hostIP: {host}\n  podIP: {ip}\n  \
         podIPs:\n  - ip: {ip}\n  qosClass: Burstable\n  startTime: \"2026-11-01T10:00:01Z\"\n  \
         conditions:\n  - type: Initialized\n    status: \"True\"\n  - type: Ready\n    status: \
         \"True\"\n  - type: ContainersReady\n    status: \"True\"\n  - type: PodScheduled\n    \
         status: \"True\"\n  containerStatuses:\n  - name: app\n    ready: true\n    \
         restartCount: 0\n    image: registry.example.com/shop/{app}:1.4.2\n    imageID: \
         registry.example.com/shop/{app}@sha256:4f2a\n    containerID: containerd://{name}\n    \
         started: true\n    state:\n      running:\n        startedAt: \"2026-11-01T10:00:02Z\"\n"
    );
}

/// A file with one pod, which the update rewrites: a pod of the first Service.
fn update_yaml() -> String {
    let mut out = String::new();
    write_pod(
        &mut out,
        "scale-0",
        "app-0",
        "app-0-updated",
        &address(65, 1),
        0,
        "v2",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated files are objects the agent's own parser accepts, with every pod
    /// and Service the shape says.
    #[test]
    fn generated_namespace_parses() {
        let shape = Shape {
            services: 150,
            slices: true,
            source: Source::Files,
        };
        assert_eq!(shape.namespaces(), 2);
        let text = namespace_yaml(shape, 1);
        let mut kinds = std::collections::BTreeMap::<String, u32>::new();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(document).expect("YAML");
            *kinds
                .entry(value["kind"].as_str().expect("a kind").to_string())
                .or_default() += 1;
        }
        let expected = [
            ("EndpointSlice", 50),
            ("Namespace", 1),
            ("Pod", 250),
            ("Service", 50),
        ];
        assert_eq!(
            kinds,
            expected
                .into_iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect()
        );
        assert_eq!(address(64, 49_999), "10.64.195.79");
        assert_eq!(thousands(50_000), "50,000");
        assert_eq!(thousands(999), "999");
    }
}
