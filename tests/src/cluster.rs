//! The cluster: fabric, nodes, pods, config directory and agents.

use std::{
    fs::{self, OpenOptions},
    io::{self, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Pod, PodSpec, cgroup,
    cleanup::{self, CGROUP_PREFIX, NETNS_PREFIX},
    http, netns,
    netns::{ip_batch, netns_add},
    process, yaml,
};

/// Port of the agents' Prometheus endpoint (`--metrics-addr`).
pub const AGENT_METRICS_PORT: u16 = 15020;
/// Port of the agents' health endpoint (`--health-addr`).
pub const AGENT_HEALTH_PORT: u16 = 15021;

const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);
/// The agents' `--drain-timeout` unless a test gives its own: well inside the stop grace.
const AGENT_DRAIN_TIMEOUT: &str = "3s";
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Pods of one node in its first pod range: pod j gets `10.244.<node>.<10+j>`, then
/// `10.245.<node>.<10+j-240>`.
const PODS_PER_RANGE: u32 = 240;
/// Most pods one node can hold (two ranges).
const MAX_PODS_PER_NODE: u32 = 2 * PODS_PER_RANGE;

/// A multi-node cluster made of network namespaces; everything it created is removed
/// when it is dropped, also while a test panics.
///
/// Layout (node i, its pod j):
/// * fabric netns `nm-<unique>-fab` with bridge `br0`; node i's veth `n<i>` is a port;
/// * node netns `nm-<unique>-n<i>`: `eth0` = `10.99.0.<10+i>/24`, `fd00:99::<10+i>/64`,
///   forwarding on, routes to the other nodes' pod CIDRs `10.244.<k>.0/24`,
///   `10.245.<k>.0/24` and `fd00:244:<k>::/64`, and no default route (Service IPs are unroutable without the
///   mesh);
/// * pod netns `nm-<unique>-n<i>p<j>`: `eth0` = `10.244.<i>.<10+j>/32` (from the 241st
///   pod of a node `10.245.<i>.<10+j-240>`) (+
///   `fd00:244:<i>::<10+j>/128`), default route via `10.244.<i>.1` (`fd00:244:<i>::1`),
///   which the node-side veth `vp<j>` holds;
/// * cgroup `<cgroup2 root>/nodemesh-<unique>/node<i>` holding node i's pod processes;
/// * work dir `<target>/nodemesh-tests/<unique>/` with `config/` and `logs/`.
pub struct Cluster {
    unique: String,
    nodes: usize,
    fabric_netns: String,
    node_netns: Vec<String>,
    /// Every namespace created so far, in creation order, deleted in reverse.
    owned_netns: Vec<String>,
    cgroup_dir: PathBuf,
    node_cgroups: Vec<PathBuf>,
    /// Every cgroup created so far, parents first, removed in reverse.
    owned_cgroups: Vec<PathBuf>,
    work_dir: PathBuf,
    work_dir_created: bool,
    pods: Vec<Pod>,
    next_pod_index: Vec<u32>,
    agents: Vec<Option<Child>>,
    /// Each node's listener holder (`mesh-node holder`), started with its first agent.
    holders: Vec<Option<Child>>,
    /// Whether agents get a holder (as the DaemonSet install does); see [`Cluster::without_holder`].
    use_holder: bool,
    /// Whether agents get the cluster's CA (mutual TLS); see [`Cluster::without_mtls`].
    use_mtls: bool,
    /// The API server agents read their config from (`--config-source kube` with this
    /// kubeconfig) instead of the config directory.
    kubeconfig: Option<PathBuf>,
    /// The agents' `RUST_LOG` when the environment sets none.
    agent_log_filter: String,
    /// More environment for agents started from now on.
    agent_env: Vec<(String, String)>,
}

/// Tests want every connection in the agent logs.
const DEFAULT_AGENT_LOG_FILTER: &str = "info,mesh_node=debug";

// === impl Cluster: construction ===

impl Cluster {
    /// Builds a cluster of `nodes` nodes for the test `test_name` (names stay unique
    /// across threads and processes: test name, process id and a counter).
    ///
    /// Removes leftovers of dead test processes first ([`cleanup_stale`]).
    ///
    /// # Panics
    /// When the machine cannot host it (check [`skip_reason`] first) or a step fails.
    ///
    /// [`cleanup_stale`]: crate::cleanup_stale
    /// [`skip_reason`]: crate::skip_reason
    pub fn new(test_name: &str, nodes: usize) -> Cluster {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        assert!(
            (1..=200).contains(&nodes),
            "a cluster has 1 to 200 nodes, not {nodes}"
        );
        if let Some(reason) = crate::skip_reason() {
            panic!("cannot build a test cluster on this machine: {reason}");
        }
        cleanup::cleanup_stale();
        let started = Instant::now();
        // Names must not contain '-' before the pid: cleanup_stale parses it back.
        let mut short: String = test_name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .take(10)
            .collect();
        if short.is_empty() {
            short.push('t');
        }
        let unique = format!(
            "{short}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let prefix = format!("{NETNS_PREFIX}{unique}");
        let cgroup_dir = cgroup::cgroup2_root().join(format!("{CGROUP_PREFIX}{unique}"));
        let mut cluster = Cluster {
            fabric_netns: format!("{prefix}-fab"),
            node_netns: (0..nodes).map(|i| format!("{prefix}-n{i}")).collect(),
            owned_netns: Vec::new(),
            node_cgroups: (0..nodes)
                .map(|i| cgroup_dir.join(format!("node{i}")))
                .collect(),
            cgroup_dir,
            owned_cgroups: Vec::new(),
            work_dir: target_dir().join("nodemesh-tests").join(&unique),
            work_dir_created: false,
            pods: Vec::new(),
            next_pod_index: vec![0; nodes],
            agents: (0..nodes).map(|_| None).collect(),
            holders: (0..nodes).map(|_| None).collect(),
            use_holder: true,
            use_mtls: true,
            kubeconfig: None,
            agent_log_filter: DEFAULT_AGENT_LOG_FILTER.to_string(),
            agent_env: Vec::new(),
            unique,
            nodes,
        };
        // From here on, a panic drops `cluster`, which removes what was created so far.
        cluster.build();
        eprintln!(
            "mesh-tests: cluster {} ({nodes} nodes) built in {:?}; work dir {}",
            cluster.unique,
            started.elapsed(),
            cluster.work_dir.display()
        );
        cluster
    }

    fn build(&mut self) {
        if self.work_dir.exists() {
            // A previous process with the same pid kept its logs here.
            let _ = fs::remove_dir_all(&self.work_dir);
        }
        self.work_dir_created = true;
        for dir in [self.config_dir(), self.logs_dir()] {
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        }

        for dir in std::iter::once(self.cgroup_dir.clone()).chain(self.node_cgroups.clone()) {
            fs::create_dir(&dir)
                .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
            self.owned_cgroups.push(dir);
        }

        let fabric = self.fabric_netns.clone();
        self.add_netns(&fabric);
        // Without a multicast querier a snooping bridge may drop the neighbour
        // solicitations IPv6 needs; the fabric is small, flooding is fine.
        ip_batch(
            &fabric,
            &[
                "link set lo up".into(),
                "link add br0 type bridge mcast_snooping 0".into(),
                "link set br0 up".into(),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));

        for i in 0..self.nodes {
            self.build_node(i);
        }
    }

    fn build_node(&mut self, i: usize) {
        let node = self.node_netns[i].clone();
        self.add_netns(&node);
        // A new netns copies its IPv4 settings from the root one, where forwarding is off.
        // DAD is off before any interface exists: until an interface's link-local address
        // passes DAD (1-2 s) the kernel sends no neighbour solicitation for packets it
        // forwards out of it, which stalls the first IPv6 connections by seconds.
        netns::sysctls(
            &node,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // The veth is created in the fabric netns with its peer directly in the node
        // netns: nothing ever appears in the root namespace, even briefly.
        ip_batch(
            &self.fabric_netns,
            &[
                format!("link add n{i} type veth peer name eth0 netns {node}"),
                format!("link set n{i} master br0"),
                format!("link set n{i} up"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut lines = vec![
            "link set lo up".to_owned(),
            format!("addr add {}/24 dev eth0", self.node_ip(i)),
            format!("addr add {}/64 dev eth0 nodad", self.node_ip6(i)),
            "link set eth0 up".to_owned(),
        ];
        for k in (0..self.nodes).filter(|k| *k != i) {
            lines.push(format!("route add 10.244.{k}.0/24 via {}", self.node_ip(k)));
            lines.push(format!("route add 10.245.{k}.0/24 via {}", self.node_ip(k)));
            lines.push(format!(
                "route add fd00:244:{k}::/64 via {}",
                self.node_ip6(k)
            ));
        }
        ip_batch(&node, &lines).unwrap_or_else(|e| panic!("{e}"));
    }

    fn add_netns(&mut self, name: &str) {
        netns_add(name).unwrap_or_else(|e| panic!("{e}"));
        self.owned_netns.push(name.to_owned());
    }
}

// === impl Cluster: accessors ===

impl Cluster {
    /// The unique part of every name this cluster uses (`<test>-<pid>-<n>`).
    pub fn unique(&self) -> &str {
        &self.unique
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Kubernetes node name of node `i`: `node<i>`.
    pub fn node_name(&self, i: usize) -> String {
        self.check_node(i);
        format!("node{i}")
    }

    /// Network namespace of node `i`.
    pub fn node_netns(&self, i: usize) -> &str {
        self.check_node(i);
        &self.node_netns[i]
    }

    /// Network namespace of the fabric (the bridge joining the nodes).
    pub fn fabric_netns(&self) -> &str {
        &self.fabric_netns
    }

    /// Node `i`'s address: `10.99.0.<10+i>`.
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.check_node(i);
        format!("10.99.0.{}", 10 + i).parse().expect("valid IPv4")
    }

    /// Node `i`'s IPv6 address: `fd00:99::<10+i>`.
    pub fn node_ip6(&self, i: usize) -> Ipv6Addr {
        self.check_node(i);
        format!("fd00:99::{}", 10 + i).parse().expect("valid IPv6")
    }

    /// Node `i`'s cgroup: pod processes run in it, the agent attaches its programs to it.
    pub fn node_cgroup(&self, i: usize) -> PathBuf {
        self.check_node(i);
        self.node_cgroups[i].clone()
    }

    /// Creates the cgroup `<node i's cgroup>/<relative>` (and its parents), removed with the
    /// cluster; processes in it are the node's as much as those in the node cgroup.
    pub fn add_cgroup(&mut self, i: usize, relative: &str) -> PathBuf {
        let mut dir = self.node_cgroup(i);
        for segment in Path::new(relative).components() {
            dir.push(segment);
            if !self.owned_cgroups.contains(&dir) {
                fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
                self.owned_cgroups.push(dir.clone());
            }
        }
        dir
    }

    /// The cluster's cgroup, parent of the node cgroups.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// The cluster's work directory (`<target>/nodemesh-tests/<unique>/`).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The agents' `--config-dir`.
    pub fn config_dir(&self) -> PathBuf {
        self.work_dir.join("config")
    }

    /// Where agent and pod process logs go.
    pub fn logs_dir(&self) -> PathBuf {
        self.work_dir.join("logs")
    }

    /// The pods that exist, in creation order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod named `name`.
    ///
    /// # Panics
    /// When there is none, or one in several namespaces.
    pub fn pod(&self, name: &str) -> &Pod {
        &self.pods[self.pod_index(name)]
    }

    fn pod_index(&self, name: &str) -> usize {
        let matching: Vec<usize> = (0..self.pods.len())
            .filter(|&k| self.pods[k].name == name)
            .collect();
        match matching[..] {
            [k] => k,
            [] => panic!("no pod named {name} in cluster {}", self.unique),
            _ => panic!("pod name {name} is used in several namespaces"),
        }
    }

    fn check_node(&self, i: usize) {
        assert!(
            i < self.nodes,
            "node {i} does not exist: the cluster has {} nodes",
            self.nodes
        );
    }
}

// === impl Cluster: pods and config ===

impl Cluster {
    /// Creates a pod: its netns, veth, addresses and routes, and its Pod manifest
    /// `pod-<namespace>-<name>.yaml` in the config dir.
    pub fn add_pod(&mut self, spec: PodSpec) -> Pod {
        let i = spec.node;
        self.check_node(i);
        assert!(
            !self
                .pods
                .iter()
                .any(|p| p.name == spec.name && p.namespace == spec.namespace),
            "pod {}/{} already exists",
            spec.namespace,
            spec.name
        );
        let j = self.next_pod_index[i];
        assert!(
            j < MAX_PODS_PER_NODE,
            "node {i} cannot hold more than {MAX_PODS_PER_NODE} pods"
        );
        // Indices are never reused, so a removed pod's address or veth name cannot clash
        // with state the kernel (or an agent) still holds for it.
        self.next_pod_index[i] += 1;

        let pod_netns = format!("{NETNS_PREFIX}{}-n{i}p{j}", self.unique);
        let host_veth = format!("vp{j}");
        let ip: Ipv4Addr = format!(
            "10.{}.{i}.{}",
            244 + j / PODS_PER_RANGE,
            10 + j % PODS_PER_RANGE
        )
        .parse()
        .expect("valid IPv4");
        let ip6: Option<Ipv6Addr> = spec.ipv6.then(|| {
            format!("fd00:244:{i}::{}", 10 + j)
                .parse()
                .expect("valid IPv6")
        });
        let gateway = format!("10.244.{i}.1");
        let gateway6 = format!("fd00:244:{i}::1");

        self.add_netns(&pod_netns);
        // As on nodes: no DAD, so the pod's link-local address is usable at once.
        netns::sysctls(
            &pod_netns,
            &[
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // Point-to-point routing as CNIs do it: the node side holds the pod's gateway
        // address and a host route per pod; no shared subnet, no bridge on the node.
        let mut node_lines = vec![
            format!("link add {host_veth} type veth peer name eth0 netns {pod_netns}"),
            format!("addr add {gateway}/32 dev {host_veth}"),
        ];
        if ip6.is_some() {
            node_lines.push(format!("addr add {gateway6}/128 dev {host_veth} nodad"));
        }
        node_lines.push(format!("link set {host_veth} up"));
        node_lines.push(format!("route add {ip}/32 dev {host_veth}"));
        if let Some(ip6) = ip6 {
            node_lines.push(format!("route add {ip6}/128 dev {host_veth}"));
        }
        ip_batch(&self.node_netns[i], &node_lines).unwrap_or_else(|e| panic!("{e}"));

        let mut pod_lines = vec![
            "link set lo up".to_owned(),
            format!("addr add {ip}/32 dev eth0"),
        ];
        if let Some(ip6) = ip6 {
            pod_lines.push(format!("addr add {ip6}/128 dev eth0 nodad"));
        }
        pod_lines.push("link set eth0 up".to_owned());
        pod_lines.push(format!("route add {gateway} dev eth0 scope link"));
        pod_lines.push(format!("route add default via {gateway} dev eth0"));
        if ip6.is_some() {
            pod_lines.push(format!("route add {gateway6}/128 dev eth0"));
            pod_lines.push(format!("route add ::/0 via {gateway6} dev eth0"));
        }
        ip_batch(&pod_netns, &pod_lines).unwrap_or_else(|e| panic!("{e}"));

        let pod = Pod {
            uid: format!("{}-n{i}p{j}", self.unique),
            name: spec.name,
            namespace: spec.namespace,
            node: i,
            ip,
            ip6,
            netns: pod_netns,
            host_veth,
            labels: spec.labels,
            service_account: spec.service_account,
        };
        self.write_pod_manifest(&pod, spec.pending);
        self.pods.push(pod.clone());
        pod
    }

    /// (Re)writes `pod`'s manifest from its fields: Running with its IPs, or Pending
    /// without them (see [`PodSpec::pending`]).
    pub fn write_pod_manifest(&self, pod: &Pod, pending: bool) {
        let mut pod_ips = Vec::new();
        if !pending {
            pod_ips.push(pod.ip.to_string());
            pod_ips.extend(pod.ip6.map(|ip6| ip6.to_string()));
        }
        let manifest = yaml::pod_yaml(&yaml::PodYaml {
            name: &pod.name,
            namespace: &pod.namespace,
            uid: &pod.uid,
            labels: &pod.labels,
            node_name: &self.node_name(pod.node),
            service_account: &pod.service_account,
            host_ip: &self.node_ip(pod.node).to_string(),
            pod_ips: &pod_ips,
        });
        self.write_config(&pod.manifest_file_name(), &manifest);
    }

    /// Deletes the pod named `name`: its processes, manifest, veth, routes and netns.
    pub fn remove_pod(&mut self, name: &str) {
        let pod = self.pods.remove(self.pod_index(name));
        // The manifest goes first, as when Kubernetes deletes a pod.
        self.remove_config(&pod.manifest_file_name());
        self.kill_pod_processes(&pod);
        // Deleting the node end removes both ends and the host routes right away; the
        // netns itself is torn down asynchronously by the kernel.
        if let Err(e) = netns::ip(&[
            "-n",
            &self.node_netns[pod.node],
            "link",
            "del",
            &pod.host_veth,
        ]) {
            eprintln!("mesh-tests: {e}");
        }
        netns::netns_del(&pod.netns).unwrap_or_else(|e| panic!("{e}"));
        self.owned_netns.retain(|ns| *ns != pod.netns);
    }

    /// Kills the processes of the node cgroup that live in the pod's netns.
    fn kill_pod_processes(&self, pod: &Pod) {
        let Some(inode) = netns::netns_inode(&pod.netns) else {
            return;
        };
        let cgroup = &self.node_cgroups[pod.node];
        let in_pod = |pid: &i32| {
            fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == inode)
        };
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let pids: Vec<i32> = cgroup::procs(cgroup).into_iter().filter(in_pod).collect();
            if pids.is_empty() || Instant::now() > deadline {
                return;
            }
            for pid in pids {
                // SAFETY: kill has no memory-safety preconditions; only processes this
                // harness put in the cgroup are there.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes `yaml` to `<config dir>/<file_name>` atomically (a hidden temporary file,
    /// which the agents ignore, then a rename), so an agent never reads half a file.
    pub fn write_config(&self, file_name: &str, yaml: &str) {
        check_file_name(file_name);
        let dir = self.config_dir();
        let temp = dir.join(format!(".{file_name}.tmp"));
        fs::write(&temp, yaml).unwrap_or_else(|e| panic!("{}: {e}", temp.display()));
        let path = dir.join(file_name);
        fs::rename(&temp, &path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// Removes `<config dir>/<file_name>` (no error when it does not exist).
    pub fn remove_config(&self, file_name: &str) {
        check_file_name(file_name);
        let path = self.config_dir().join(file_name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => panic!("{}: {e}", path.display()),
            _ => {}
        }
    }
}

fn check_file_name(file_name: &str) {
    assert!(
        !file_name.is_empty() && !file_name.contains('/') && !file_name.starts_with('.'),
        "config file name {file_name:?} must be a plain, non-hidden file name"
    );
}

// === impl Cluster: agents ===

impl Cluster {
    /// The `RUST_LOG` filter of agents started from now on (unless the environment sets
    /// one); benchmarks use `info`, as production does, not the tests' debug logging.
    pub fn set_agent_log_filter(&mut self, filter: &str) {
        self.agent_log_filter = filter.to_string();
    }

    /// Sets `key` in the environment of the agents started from now on (`KUBECONFIG`).
    pub fn set_agent_env(&mut self, key: &str, value: &str) {
        self.agent_env.push((key.to_owned(), value.to_owned()));
    }
}

impl Cluster {
    /// Agents started from now on run without a listener holder: while none runs, new
    /// connections to enrolled pods are refused instead of waiting.
    pub fn without_holder(&mut self) {
        self.use_holder = false;
    }

    /// Agents started from now on read their config from the API server `kubeconfig` names
    /// (`--config-source kube`), not from the config directory.
    pub fn use_kube_source(&mut self, kubeconfig: &Path) {
        self.kubeconfig = Some(kubeconfig.to_owned());
    }

    /// Agents started from now on get no CA (unless a test passes its own): enrolled pods
    /// talk plaintext through the mesh.
    pub fn without_mtls(&mut self) {
        self.use_mtls = false;
    }

    /// Where node `i`'s agent pins its capture (`--bpffs-path`; the agent mounts a bpffs
    /// there, which the cluster unmounts when dropped).
    pub fn bpffs_path(&self, i: usize) -> PathBuf {
        self.work_dir.join("bpffs").join(format!("node{i}"))
    }

    /// Node `i`'s listener holder socket (`--holder-socket`).
    pub fn holder_socket(&self, i: usize) -> PathBuf {
        self.work_dir.join(format!("holder-node{i}.sock"))
    }

    /// Starts node `i`'s listener holder unless it runs, and waits for its socket.
    fn ensure_holder(&mut self, i: usize) {
        if let Some(child) = &mut self.holders[i]
            && child.try_wait().ok().flatten().is_none()
        {
            return;
        }
        let socket = self.holder_socket(i);
        let _ = fs::remove_file(&socket);
        let log_path = self.logs_dir().join(format!("holder-node{i}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
        let child = self
            .node_command(i, process::bin_path("mesh-node"))
            .args(["holder", "--socket", socket.to_str().expect("UTF-8 path")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("starting the listener holder");
        self.holders[i] = Some(child);
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the holder of node{i} did not create {}",
                socket.display()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent of every node and waits until all are ready.
    pub fn start_agents(&mut self) {
        // Started together, waited for together: they initialize in parallel.
        for i in 0..self.nodes {
            self.spawn_agent(i, &[]);
        }
        for i in 0..self.nodes {
            self.wait_agent_ready(i);
        }
    }

    /// Starts node `i`'s agent (inside the node netns and the node cgroup) with
    /// `extra_args` appended, and waits until `/healthz/ready` answers 200.
    ///
    /// The agent gets SIGKILL if the thread that started it exits, so a killed test
    /// leaves no agent behind.
    ///
    /// # Panics
    /// When it is already running, exits early or is not ready within 30 s (with the
    /// tail of its log).
    pub fn start_agent(&mut self, i: usize, extra_args: &[&str]) {
        self.spawn_agent(i, extra_args);
        self.wait_agent_ready(i);
    }

    fn spawn_agent(&mut self, i: usize, extra_args: &[&str]) {
        self.check_node(i);
        if let Some(child) = &mut self.agents[i]
            && child.try_wait().ok().flatten().is_none()
        {
            panic!(
                "the agent of node{i} is already running (pid {})",
                child.id()
            );
        }
        if self.use_holder {
            self.ensure_holder(i);
        }
        let binary = process::bin_path("mesh-node");
        let config_dir = self.config_dir();
        let bpffs = self.bpffs_path(i);
        let holder_socket = self.holder_socket(i);
        let cgroup = self.node_cgroup(i);
        let metrics_addr = format!("0.0.0.0:{AGENT_METRICS_PORT}");
        let health_addr = format!("0.0.0.0:{AGENT_HEALTH_PORT}");
        let node_name = self.node_name(i);
        // One CA directory per cluster (unless the test passes its own CA options): the
        // agents share its root, so they trust each other and enrolled pods talk mutual TLS.
        let ca_dir = self.work_dir.join("ca");
        let mut args: Vec<&str> = vec!["run", "--node-name", &node_name];
        if self.kubeconfig.is_some() {
            args.extend(["--config-source", "kube"]);
        } else {
            args.extend(["--config-dir", config_dir.to_str().expect("UTF-8 path")]);
        }
        args.extend([
            "--cgroup-path",
            cgroup.to_str().expect("UTF-8 path"),
            "--metrics-addr",
            &metrics_addr,
            "--health-addr",
            &health_addr,
        ]);
        if self.use_mtls
            && !extra_args
                .iter()
                .any(|a| *a == "--ca-dir" || *a == "--ca-addr")
        {
            args.extend(["--ca-dir", ca_dir.to_str().expect("UTF-8 path")]);
        }
        let has = |flag: &str| extra_args.iter().any(|a| a.starts_with(flag));
        if !has("--bpffs-path") {
            args.extend(["--bpffs-path", bpffs.to_str().expect("UTF-8 path")]);
        }
        if self.use_holder && !has("--holder-socket") {
            args.extend([
                "--holder-socket",
                holder_socket.to_str().expect("UTF-8 path"),
            ]);
        }
        if !has("--drain-timeout") {
            args.extend(["--drain-timeout", AGENT_DRAIN_TIMEOUT]);
        }
        args.extend_from_slice(extra_args);

        let log_path = self.agent_log(i);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
        // Restarts append to the same log; the marker tells the runs apart.
        let _ = writeln!(
            log,
            "=== mesh-tests: {} {}",
            binary.display(),
            args.join(" ")
        );

        // Not `ip netns exec`: it remounts /sys for the new netns, which hides the cgroup2
        // mount the agent attaches to. setns alone changes only the network namespace.
        let ns = netns::open_netns(&self.node_netns[i]).unwrap_or_else(|e| panic!("{e}"));
        let mut command = std::process::Command::new(&binary);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", &self.agent_log_filter);
        }
        command.envs(self.agent_env.iter().map(|(k, v)| (k, v)));
        if let Some(kubeconfig) = &self.kubeconfig {
            command.env("KUBECONFIG", kubeconfig);
        }
        // Inside the node cgroup, as on a real node (where the capture programs sit on the
        // root cgroup above the agent's own): the agent's own sockets then pass through
        // the hooks, which is what proves they are never captured.
        let procs_path = cgroup.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .unwrap_or_else(|e| panic!("{}: {e}", procs_path.display()));
        process::place(&mut command, ns, Some(procs));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        self.agents[i] = Some(child);
    }

    fn wait_agent_ready(&mut self, i: usize) {
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            let child = self.agents[i].as_mut().expect("agent spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.agents[i] = None;
                panic!(
                    "the agent of node{i} exited ({status}) before it was ready; log tail:\n{}",
                    process::tail(&self.agent_log(i), 60)
                );
            }
            let last = match self.try_http_get(i, AGENT_HEALTH_PORT, "/healthz/ready") {
                Ok((200, _)) => return,
                Ok((status, body)) => format!("{status} {}", body.trim()),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                panic!(
                    "the agent of node{i} was not ready within {AGENT_READY_TIMEOUT:?} \
                     (last answer: {last}); log tail:\n{}",
                    process::tail(&self.agent_log(i), 60)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops node `i`'s agent: SIGTERM, SIGKILL after 10 s; returns its exit status.
    ///
    /// # Panics
    /// When it is not running.
    pub fn stop_agent(&mut self, i: usize) -> ExitStatus {
        self.check_node(i);
        let mut child = self.agents[i]
            .take()
            .unwrap_or_else(|| panic!("the agent of node{i} is not running"));
        process::terminate(&mut child, AGENT_STOP_GRACE).expect("waiting for the agent")
    }

    /// Kills node `i`'s agent with SIGKILL (a crash: nothing of its own clean-up runs).
    ///
    /// # Panics
    /// When it is not running.
    pub fn kill_agent(&mut self, i: usize) {
        self.check_node(i);
        let mut child = self.agents[i]
            .take()
            .unwrap_or_else(|| panic!("the agent of node{i} is not running"));
        child.kill().expect("SIGKILL to the agent");
        child.wait().expect("reaping the agent");
    }

    /// Starts node `i`'s agent and returns at once, without waiting for it to be ready.
    pub fn spawn_agent_unwaited(&mut self, i: usize, extra_args: &[&str]) {
        self.spawn_agent(i, extra_args);
    }

    /// Starts a second agent on node `i` beside the running one (a DaemonSet's surge pod:
    /// same ports, pins, holder and CNI socket) and returns the old one, which the caller
    /// stops ([`Cluster::stop_process`]) once the new one took over. The new one is not
    /// waited for: its health port is shared with the old one.
    ///
    /// # Panics
    /// When no agent runs on node `i`.
    pub fn spawn_overlapping_agent(&mut self, i: usize, extra_args: &[&str]) -> Child {
        self.check_node(i);
        let old = self.agents[i]
            .take()
            .unwrap_or_else(|| panic!("the agent of node{i} is not running"));
        self.spawn_agent(i, extra_args);
        old
    }

    /// Stops a process this cluster started (an agent [`Cluster::spawn_overlapping_agent`]
    /// handed back): SIGTERM, SIGKILL after the agents' grace period.
    pub fn stop_process(&mut self, mut child: Child) -> ExitStatus {
        process::terminate(&mut child, AGENT_STOP_GRACE).expect("waiting for the process")
    }

    /// A command that runs `program` as a process of node `i` itself: in the node's netns
    /// and its cgroup (where the capture programs see its sockets), like kubelet.
    pub fn node_command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.check_node(i);
        let ns = netns::open_netns(&self.node_netns[i]).unwrap_or_else(|e| panic!("{e}"));
        let procs_path = self.node_cgroups[i].join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .unwrap_or_else(|e| panic!("{}: {e}", procs_path.display()));
        let mut command = Command::new(program);
        process::place(&mut command, ns, Some(procs));
        command
    }

    /// PID of node `i`'s agent, if it was started and not stopped.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.check_node(i);
        self.agents[i].as_ref().map(Child::id)
    }

    /// The log file of node `i`'s agent (stdout and stderr, all runs).
    pub fn agent_log(&self, i: usize) -> PathBuf {
        self.logs_dir().join(format!("node{i}.log"))
    }
}

// === impl Cluster: talking to nodes ===

impl Cluster {
    /// Runs `f` on a fresh thread inside the network namespace `netns` (see
    /// [`run_in_netns`](crate::run_in_netns)); such a thread is never captured by the mesh.
    pub fn run_in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
        netns::run_in_netns(netns, f)
    }

    /// Runs `f` on a fresh thread inside node `i`'s netns.
    pub fn run_in_node<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> T {
        netns::run_in_netns(self.node_netns(i), f)
    }

    /// The access log lines node `i`'s agent wrote so far (`--access-log`): its log's JSON
    /// lines with a `kind` (the agent's own log lines are text).
    pub fn access_log(&self, i: usize) -> Vec<serde_json::Value> {
        let log = fs::read_to_string(self.agent_log(i)).expect("agent log");
        log.lines()
            .filter(|line| line.starts_with('{'))
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line.get("kind").is_some())
            .collect()
    }

    /// `mesh-node debug <args>` inside node `i`'s netns (against its agent): what it printed.
    ///
    /// # Panics
    /// When it fails, with what it wrote to stderr.
    pub fn debug(&self, i: usize, args: &[&str]) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", self.node_netns(i)])
            .arg(process::bin_path("mesh-node"))
            .arg("debug")
            .args(args)
            .output()
            .expect("running mesh-node debug");
        assert!(
            output.status.success(),
            "mesh-node debug {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `GET path` on `127.0.0.1:<port>` inside node `i`'s netns: (status, body).
    ///
    /// # Panics
    /// When the request fails (connection refused, timeout, garbage).
    pub fn http_get(&self, i: usize, port: u16, path: &str) -> (u16, String) {
        self.try_http_get(i, port, path)
            .unwrap_or_else(|e| panic!("GET 127.0.0.1:{port}{path} on node{i}: {e}"))
    }

    /// Like [`Cluster::http_get`], returning the error instead of panicking.
    pub fn try_http_get(&self, i: usize, port: u16, path: &str) -> io::Result<(u16, String)> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        http::http_get_in_netns(self.node_netns(i), addr, path)
    }

    /// Node `i`'s agent's Prometheus metrics (read with [`metric_value`]).
    ///
    /// [`metric_value`]: crate::metric_value
    pub fn metrics(&self, i: usize) -> String {
        let (status, body) = self.http_get(i, AGENT_METRICS_PORT, "/metrics");
        assert_eq!(
            status, 200,
            "GET /metrics on node{i} answered {status}: {body}"
        );
        body
    }
}

// === impl Cluster: teardown ===

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes first: a cgroup can only be removed once empty, and a netns only goes
        // away once no process uses it. Agents get SIGTERM and a grace period first.
        let panicking = thread::panicking();
        for i in 0..self.agents.len() {
            if let Some(mut child) = self.agents[i].take() {
                match process::terminate(&mut child, AGENT_STOP_GRACE) {
                    Ok(status) if panicking => eprintln!(
                        "mesh-tests: agent node{i} exited ({status}); log tail:\n{}",
                        process::tail(&self.agent_log(i), 20)
                    ),
                    Ok(_) => {}
                    Err(e) => eprintln!("mesh-tests: stopping agent node{i}: {e}"),
                }
            }
        }
        for holder in self.holders.iter_mut().filter_map(Option::take) {
            let mut holder = holder;
            let _ = process::terminate(&mut holder, AGENT_STOP_GRACE);
        }
        // The pinned capture goes with its bpffs mounts (what only the pins held detaches).
        cleanup::unmount_bpffs_under(&self.work_dir);
        // Agents first (they live in the node cgroups too, and deserve a graceful stop).
        for cgroup in self.owned_cgroups.iter().rev() {
            if !cgroup::kill_all(cgroup, DRAIN_TIMEOUT) {
                eprintln!("mesh-tests: processes left in {}", cgroup.display());
            }
        }
        for ns in self.owned_netns.drain(..).rev() {
            if let Err(e) = netns::netns_del(&ns) {
                eprintln!("mesh-tests: {e}");
            }
        }
        for cgroup in self.owned_cgroups.drain(..).rev() {
            if let Err(e) = cgroup::remove(&cgroup, DRAIN_TIMEOUT) {
                eprintln!(
                    "mesh-tests: cannot remove cgroup {}: {e} (processes: {:?})",
                    cgroup.display(),
                    cgroup::procs(&cgroup)
                );
            }
        }
        if self.work_dir_created {
            if panicking || std::env::var_os("NODEMESH_KEEP").is_some() {
                eprintln!(
                    "mesh-tests: cluster {}: logs and config kept in {}",
                    self.unique,
                    self.work_dir.display()
                );
            } else if let Err(e) = fs::remove_dir_all(&self.work_dir) {
                eprintln!("mesh-tests: removing {}: {e}", self.work_dir.display());
            }
        }
    }
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (at run time, else at build time),
/// else the workspace's `target/`.
fn target_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf();
    let configured = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_DIR").map(PathBuf::from));
    match configured {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}
