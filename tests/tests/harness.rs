//! The harness's own tests: the namespace cluster works and leaves nothing behind.
//! No mesh agent is involved.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_tests::{
    Cluster, PodSpec,
    scenario::{addr_field, connect, replies},
    skip_reason,
};

fn skip() -> bool {
    match skip_reason() {
        Some(reason) => {
            eprintln!("skipping: {reason}");
            true
        }
        None => false,
    }
}

/// What must be gone once a cluster is dropped.
struct Footprint {
    netns_prefix: String,
    cgroup_dir: PathBuf,
    work_dir: PathBuf,
}

impl Footprint {
    fn of(cluster: &Cluster) -> Self {
        Self {
            netns_prefix: format!("nm-{}-", cluster.unique()),
            cgroup_dir: cluster.cgroup_dir().to_owned(),
            work_dir: cluster.work_dir().to_owned(),
        }
    }

    fn leftover_netns(&self) -> Vec<String> {
        fs::read_dir("/var/run/netns")
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.starts_with(&self.netns_prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn assert_gone(&self, work_dir_too: bool) {
        assert_eq!(
            self.leftover_netns(),
            Vec::<String>::new(),
            "netns left after drop"
        );
        assert!(
            !self.cgroup_dir.exists(),
            "cgroup {} left after drop",
            self.cgroup_dir.display()
        );
        if work_dir_too {
            assert!(
                !self.work_dir.exists(),
                "work dir {} left after drop",
                self.work_dir.display()
            );
        }
    }
}

#[test]
fn two_nodes_pod_to_pod_v4_v6_and_teardown() {
    if skip() {
        return;
    }
    // The root namespace must never be touched: compare its forwarding settings after.
    let root_sysctls = [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ]
    .map(|path| fs::read_to_string(path).unwrap_or_default());

    let mut cluster = Cluster::new("harness_two_nodes", 2);
    let footprint = Footprint::of(&cluster);
    let server = cluster.add_pod(PodSpec::new("server", 1).label("app", "echo").ipv6(true));
    let client = cluster.add_pod(PodSpec::new("client", 0).ipv6(true));
    let server_ip6 = server.ip6.expect("server asked for IPv6");
    let client_ip6 = client.ip6.expect("client asked for IPv6");
    assert_eq!(server.ip.to_string(), "10.244.1.10");
    assert_eq!(client.ip.to_string(), "10.244.0.10");
    assert_eq!(server_ip6.to_string(), "fd00:244:1::10");

    let manifest = fs::read_to_string(cluster.config_dir().join("pod-default-server.yaml"))
        .expect("add_pod writes the Pod manifest");
    let manifest: serde_yaml::Value = serde_yaml::from_str(&manifest).expect("valid YAML");
    assert_eq!(manifest["spec"]["nodeName"], "node1");
    assert_eq!(manifest["status"]["podIP"], "10.244.1.10");
    assert_eq!(manifest["status"]["podIPs"][1]["ip"], "fd00:244:1::10");
    assert_eq!(manifest["metadata"]["labels"]["app"], "echo");

    let mut serve = server.spawn(
        &cluster,
        &[
            "serve",
            "--listen",
            "0.0.0.0:8080",
            "--listen",
            "[::]:8080",
            "--name",
            "echo-1",
        ],
    );
    serve.wait_for_output("ready", Duration::from_secs(10));
    let procs = fs::read_to_string(cluster.node_cgroup(1).join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|pid| pid == serve.pid().to_string()),
        "the server must run in node1's cgroup, which holds {procs:?}"
    );

    for (to, client_ip) in [
        (SocketAddr::from((server.ip, 8080)), IpAddr::from(client.ip)),
        (
            SocketAddr::from((server_ip6, 8080)),
            IpAddr::from(client_ip6),
        ),
    ] {
        let replies = replies(&connect(&cluster, &client, &to.to_string(), 2));
        assert_eq!(replies.len(), 2, "one reply per connection to {to}");
        for reply in &replies {
            assert_eq!(reply["server"], "echo-1");
            assert_eq!(reply["echo"], "hello");
            assert_eq!(
                addr_field(reply, "local"),
                to,
                "the server accepted on {to}"
            );
            assert_eq!(
                addr_field(reply, "peer").ip(),
                client_ip,
                "the server sees the client pod"
            );
        }
    }

    // Without a mesh, Service IPs lead nowhere: the nodes have no default route.
    let output = connect(&cluster, &client, "10.96.0.10:80", 1);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "10.96.0.10 must be unroutable, got {output:?}"
    );
    assert!(
        stderr.contains("network unreachable") || stderr.contains("no route to host"),
        "unexpected failure: {stderr}"
    );

    // A plain thread in a node netns is outside every cgroup and reaches pods directly,
    // from the node's own address.
    let peer = Cluster::run_in_netns(cluster.node_netns(0), || {
        let mut stream = TcpStream::connect_timeout(
            &SocketAddr::from((server.ip, 8080)),
            Duration::from_secs(3),
        )
        .expect("node0 reaches the server pod");
        stream.write_all(b"from-node\n").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
        addr_field(&reply, "peer").ip()
    });
    assert_eq!(peer, IpAddr::from(cluster.node_ip(0)));

    // A process nobody waits for is still killed by the teardown (it is in a node cgroup).
    let mut orphan = server
        .command(&cluster, "sleep")
        .arg("600")
        .spawn()
        .expect("spawn sleep");

    cluster.remove_pod("client");
    assert!(!Path::new("/var/run/netns").join(&client.netns).exists());
    assert!(
        !cluster
            .config_dir()
            .join("pod-default-client.yaml")
            .exists()
    );
    assert_eq!(cluster.pods().len(), 1);

    drop(serve);
    drop(cluster);
    footprint.assert_gone(true);
    let status = orphan
        .try_wait()
        .expect("try_wait")
        .expect("the cluster killed the orphan");
    assert!(!status.success());
    let after = [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ]
    .map(|path| fs::read_to_string(path).unwrap_or_default());
    assert_eq!(root_sysctls, after, "the root namespace's sysctls changed");
}

#[test]
fn same_node_pods_and_cgroup_membership() {
    if skip() {
        return;
    }
    let mut cluster = Cluster::new("harness_same_node", 1);
    let footprint = Footprint::of(&cluster);
    let a = cluster.add_pod(PodSpec::new("a", 0).namespace("prod").ipv6(true));
    let b = cluster.add_pod(PodSpec::new("b", 0).namespace("prod").ipv6(true));
    assert_eq!(b.ip.to_string(), "10.244.0.11");

    let mut serve = a.spawn(&cluster, &["serve", "--listen", "[::]:9000", "--name", "a"]);
    serve.wait_for_output("ready", Duration::from_secs(10));
    let to = SocketAddr::from((a.ip6.unwrap(), 9000)).to_string();
    let reply = &replies(&connect(&cluster, &b, &to, 1))[0];
    assert_eq!(addr_field(reply, "peer").ip(), IpAddr::from(b.ip6.unwrap()));

    // The IPv6 listener takes IPv6 only: IPv4 is refused, and says so.
    let output = connect(&cluster, &b, &format!("{}:9000", a.ip), 1);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("connection refused"),
        "expected a refusal, got {output:?}"
    );

    // Pod processes sit in the node cgroup, which the agent's eBPF programs watch.
    let output = b
        .command(&cluster, "cat")
        .arg("/proc/self/cgroup")
        .output()
        .expect("cat");
    let node_cgroup = cluster.node_cgroup(0);
    let relative = node_cgroup
        .strip_prefix(mesh_tests::cgroup2_root())
        .unwrap();
    let expected = format!("0::/{}", relative.display());
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .any(|line| line == expected),
        "expected {expected} in {}",
        String::from_utf8_lossy(&output.stdout)
    );
    drop(serve);
    drop(cluster);
    footprint.assert_gone(true);
}

#[test]
fn teardown_happens_when_the_test_panics() {
    if skip() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let mut cluster = Cluster::new("harness_panics", 2);
        cluster.add_pod(PodSpec::new("p", 1));
        tx.send(Footprint::of(&cluster)).unwrap();
        panic!("deliberate panic with a live cluster");
    })
    .join();
    assert!(result.is_err(), "the thread was meant to panic");
    let footprint = rx.recv().unwrap();
    // The work dir is kept for the logs when panicking; everything else is gone.
    footprint.assert_gone(false);
    assert!(
        footprint.work_dir.join("logs").is_dir(),
        "logs are kept after a panic"
    );
    fs::remove_dir_all(&footprint.work_dir).unwrap();
}

#[test]
fn config_files_are_written_and_removed() {
    if skip() {
        return;
    }
    let cluster = Cluster::new("harness_config", 1);
    cluster.write_config(
        "svc.yaml",
        &mesh_tests::service_yaml(
            "echo",
            "default",
            "10.96.0.10",
            &[("tcp", 80, 8080)],
            &[("app", "echo")],
        ),
    );
    cluster.write_config(
        "ns.yaml",
        &mesh_tests::namespace_yaml("prod", &[("a", "b")]),
    );
    let mut names: Vec<String> = fs::read_dir(cluster.config_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // No temporary file is left next to them.
    assert_eq!(names, ["ns.yaml", "svc.yaml"]);
    cluster.remove_config("svc.yaml");
    cluster.remove_config("svc.yaml");
    assert!(!cluster.config_dir().join("svc.yaml").exists());
}
