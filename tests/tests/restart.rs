//! End to end on the netns cluster: restarting, replacing or killing an agent never
//! switches the mesh off for its node's pods, and never lets plaintext past it.
//!
//! Every test runs a steady load of new connections (`mesh-testapp load`) from an
//! enrolled client on node 0 through Service `web` to a backend on node 1 (mutual TLS,
//! cross-node) while an agent goes away, and counts every connection: none may fail, and
//! the agent that stayed counts each one as mutual TLS from the client's identity, so none
//! went past the mesh.
use std::{
    process::{Command, Output},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use mesh_tests::{
    Cluster, Pod, PodProcess, PodSpec, ScriptedApiServer, bin_path, namespace_yaml,
    scenario::{
        CONNECT_TIMEOUT, SHOP_SERVICE_IP, connect, metric, replies, skip, wait_enrolled,
        wait_for_metric, wait_until, write_shop,
    },
};

/// New connections per second during a restart. The issue's figure, 1,000/s, is what
/// `cargo xtask bench` replaces agents under (release builds, 0 failed); on debug builds it
/// leaves the two cores no headroom, and anything else running (a build) turns the test's
/// queues into timeouts that say nothing about restarts.
const LOAD_RATE: &str = "500";
/// The load runs this long; the restart happens in its middle.
const LOAD_MS: u64 = 6_000;
/// When into the load the agent goes away.
const RESTART_AFTER: Duration = Duration::from_millis(1_500);
/// The clients' patience (connect, then reply): the new agent must be serving within it.
const CLIENT_TIMEOUT_MS: &str = "5000";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Where node 1's web pod is reached through.
const SERVICE: &str = "10.96.0.10:80";

/// One load at a time: two at 1,000 connections/s each would measure the machine's two
/// cores, not the restart.
static LOAD_SLOT: Mutex<()> = Mutex::new(());

fn load_slot() -> MutexGuard<'static, ()> {
    LOAD_SLOT.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Client `client` (node 0) and backend `web-1` (node 1) in enrolled namespace `shop`, a
/// non-mesh pod `legacy` on node 0, namespace `shop` STRICT; agents running.
struct Scene {
    cluster: Cluster,
    client: Pod,
    web: Pod,
    legacy: Pod,
    _server: PodProcess,
}

impl Scene {
    fn new(test: &str, agent_args: &[&str]) -> Self {
        Self::build(test, agent_args, true)
    }

    /// Agents without a CA: the mesh carries plaintext (and no STRICT policy applies).
    fn without_mtls(test: &str) -> Self {
        Self::build(test, &[], false)
    }

    fn build(test: &str, agent_args: &[&str], mtls: bool) -> Self {
        let mut cluster = Cluster::new(test, 2);
        if !mtls {
            cluster.without_mtls();
        }
        let client = cluster.add_pod(PodSpec::new("client", 0).namespace("shop"));
        let web = cluster.add_pod(
            PodSpec::new("web-1", 1)
                .namespace("shop")
                .label("app", "web"),
        );
        let legacy = cluster.add_pod(PodSpec::new("legacy", 0).namespace("legacy"));
        write_shop(&cluster, true);
        assert_eq!(SERVICE, format!("{SHOP_SERVICE_IP}:80"));
        cluster.write_config("ns-legacy.yaml", &namespace_yaml("legacy", &[]));
        if mtls {
            cluster.write_config(
                "strict.yaml",
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  \
             name: strict\n  namespace: shop\nspec:\n  mtls: {mode: STRICT}\n",
            );
        }
        let listen = format!("{}:8080", web.ip);
        let mut server = web.spawn(&cluster, &["serve", "--listen", &listen, "--name", "web-1"]);
        server.wait_for_output("ready", READY_TIMEOUT);
        for i in 0..2 {
            cluster.start_agent(i, agent_args);
        }
        wait_enrolled(&cluster, 0, 1);
        wait_enrolled(&cluster, 1, 1);
        Self {
            cluster,
            client,
            web,
            legacy,
            _server: server,
        }
    }

    /// Starts the load from the client through the Service.
    fn start_load(&self) -> PodProcess {
        let duration = LOAD_MS.to_string();
        let mut load = self.client.spawn(
            &self.cluster,
            &[
                "load",
                "--to",
                SERVICE,
                "--rate",
                LOAD_RATE,
                "--duration-ms",
                &duration,
                "--timeout-ms",
                CLIENT_TIMEOUT_MS,
            ],
        );
        load.wait_for_output("started", READY_TIMEOUT);
        load
    }

    /// Connections node `i`'s agent counted as mutual TLS from the client's identity, as
    /// `reporter` (`source` on node 0, `destination` on node 1).
    fn mutual_tls_from_client(&self, i: usize, reporter: &str) -> f64 {
        metric(
            &self.cluster,
            i,
            "istio_tcp_connections_opened_total",
            &mutual_tls_labels(reporter),
        )
    }
}

fn mutual_tls_labels(reporter: &str) -> [(&'static str, &str); 4] {
    [
        ("reporter", reporter),
        ("source_workload", "client"),
        ("connection_security_policy", "mutual_tls"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/default",
        ),
    ]
}

impl Scene {
    /// Restarts node `i`'s agent in place (as a DaemonSet with `maxUnavailable` does: the
    /// old one ends, then the new one starts) under the load; asserts every connection was
    /// answered and returns how many were made.
    fn restart_in_place_under_load(&mut self, i: usize) -> u64 {
        let load = self.start_load();
        std::thread::sleep(RESTART_AFTER);
        let status = self.cluster.stop_agent(i);
        assert!(status.success(), "clean exit on SIGTERM: {status}");
        self.cluster.start_agent(i, &[]);
        every_connection_answered(load)
    }

    fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.cluster.agent_log(i)).expect("agent log")
    }
}

/// Waits for the load to end and returns its summary, asserting every connection was
/// answered.
fn every_connection_answered(mut load: PodProcess) -> u64 {
    let deadline = Instant::now() + Duration::from_millis(LOAD_MS) + CONNECT_TIMEOUT;
    while load.try_wait().is_none() {
        assert!(Instant::now() < deadline, "the load did not end");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stdout = load.stdout();
    let summary: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no summary from the load: {stdout}"));
    let sent = summary["sent"].as_u64().expect("sent");
    eprintln!("load summary: {summary}");
    assert!(sent > 2_000, "the load ran: {summary}");
    assert_eq!(summary["failed"], 0, "every connection answered: {summary}");
    assert_eq!(summary["ok"], sent, "{summary}");
    sent
}

/// How many times node `i`'s agents logged `needle` (all runs share one log).
fn logged(cluster: &Cluster, i: usize, needle: &str) -> usize {
    std::fs::read_to_string(cluster.agent_log(i))
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// Logged by an agent once it reconciled the pinned enrollment against a published config:
/// from then on it serves every enrolled pod.
const ADOPTED: &str = "pinned enrollment reconciled";

#[test]
fn an_in_place_restart_of_the_client_side_agent_fails_no_connection() {
    if skip() {
        return;
    }
    let _slot = load_slot();
    let mut scene = Scene::new("inplace_src", &[]);
    // Connections made between the two agents wait in the held listeners' backlogs.
    let sent = scene.restart_in_place_under_load(0);
    // Node 1's agent, which stayed, saw every one as mutual TLS from the client: none was
    // made while capture was off.
    wait_for_metric(
        &scene.cluster,
        1,
        "istio_tcp_connections_opened_total",
        &mutual_tls_labels("destination"),
        sent as f64,
    );
    let log = scene.agent_log(0);
    assert!(
        log.contains("took over the listeners of an earlier agent"),
        "the new agent adopted the held listeners"
    );
    assert_eq!(
        log.matches("adopted the pinned link").count(),
        2,
        "the new agent adopted the pinned connect4 and connect6 links as they were"
    );
    assert!(
        !log.contains("all pods un-enrolled"),
        "SIGTERM un-enrolls nothing"
    );
}

#[test]
fn an_in_place_restart_of_the_server_side_agent_fails_no_connection() {
    if skip() {
        return;
    }
    let _slot = load_slot();
    let mut scene = Scene::new("inplace_dst", &[]);
    let sent = scene.restart_in_place_under_load(1);
    // The client's agent, which stayed, opened every one as mutual TLS to the backend.
    wait_for_metric(
        &scene.cluster,
        0,
        "istio_tcp_connections_opened_total",
        &mutual_tls_labels("source"),
        sent as f64,
    );
}

#[test]
fn an_in_place_restart_without_mutual_tls_fails_no_connection() {
    if skip() {
        return;
    }
    let _slot = load_slot();
    let mut scene = Scene::without_mtls("inplace_plain");
    // The server side: plaintext arrives on the pod's held inbound (15006) listener.
    let sent = scene.restart_in_place_under_load(1);
    wait_for_metric(
        &scene.cluster,
        0,
        "istio_tcp_connections_opened_total",
        &[("reporter", "source"), ("source_workload", "client")],
        sent as f64,
    );
    assert!(
        scene
            .agent_log(1)
            .contains("took over the listeners of an earlier agent"),
        "the new agent adopted the held inbound listener"
    );
}

#[test]
fn an_overlapping_replacement_fails_no_connection_and_a_long_stream_survives() {
    if skip() {
        return;
    }
    let _slot = load_slot();
    // Long enough for the stream to end on its own while the old agent drains, and within
    // the harness's 10 s stop grace.
    let cni_socket =
        std::env::temp_dir().join(format!("nodemesh-overlap-{}.sock", std::process::id()));
    let cni_socket = cni_socket.to_str().expect("UTF-8 path").to_owned();
    let agent_args = ["--drain-timeout", "8s", "--cni-socket", &cni_socket];
    let mut scene = Scene::new("overlap", &agent_args);
    let load = scene.start_load();
    // One long-lived connection through the agent about to be replaced: 40 lines, 100 ms
    // apart, all answered on the same connection.
    let mut stream = scene.client.spawn(
        &scene.cluster,
        &[
            "connect",
            "--to",
            SERVICE,
            "--lines",
            "40",
            "--interval-ms",
            "100",
        ],
    );
    stream.wait_for_output("web-1", READY_TIMEOUT);
    std::thread::sleep(RESTART_AFTER);
    // As a DaemonSet with maxSurge does it: the new agent starts beside the old one (same
    // ports, same CNI socket, same pins), takes the listeners, becomes ready; then the old
    // one is told to stop and drains.
    let adopted_before = logged(&scene.cluster, 0, ADOPTED);
    let old = scene.cluster.spawn_overlapping_agent(0, &agent_args);
    wait_until(READY_TIMEOUT, "the new agent to take over", || {
        (logged(&scene.cluster, 0, ADOPTED) > adopted_before).then_some(())
    });
    // The old agent no longer vouches for readiness on the shared health port.
    wait_until(READY_TIMEOUT, "the old agent to answer not ready", || {
        (logged(&scene.cluster, 0, "answering not ready") > 0).then_some(())
    });
    let status = scene.cluster.stop_process(old);
    assert!(
        status.success(),
        "the old agent drained and exited: {status}"
    );
    // The CNI socket is the new agent's: the old one, stopping, left it in place.
    std::os::unix::net::UnixStream::connect(&cni_socket)
        .expect("the CNI socket answers after the old agent left");
    let sent = every_connection_answered(load);
    wait_for_metric(
        &scene.cluster,
        1,
        "istio_tcp_connections_opened_total",
        &mutual_tls_labels("destination"),
        // The load's, and the long stream's.
        sent as f64 + 1.0,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = stream.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "the long stream did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "the long stream ended normally: {status}");
    assert_eq!(
        stream.stdout().lines().count(),
        40,
        "every line of the long stream answered"
    );
    let log = std::fs::read_to_string(scene.cluster.agent_log(0)).expect("agent log");
    assert!(
        log.contains("drained: every connection finished"),
        "the old agent drained"
    );
}

#[test]
fn after_a_crash_capture_holds_nothing_passes_in_plaintext_and_the_next_agent_serves() {
    if skip() {
        return;
    }
    let mut scene = Scene::new("sigkill", &[]);
    let web_addr = format!("{}:8080", scene.web.ip);
    replies(&connect(&scene.cluster, &scene.client, SERVICE, 1));
    let before = scene.mutual_tls_from_client(0, "source");

    scene.cluster.kill_agent(1);
    // No agent on node 1 now. Plaintext from outside the mesh to the STRICT pod: never
    // answered (it waits in the held inbound listener, unserved).
    let plaintext = scene.legacy.run(
        &scene.cluster,
        &["connect", "--to", &web_addr, "--timeout-ms", "1500"],
        CONNECT_TIMEOUT,
    );
    assert!(
        !plaintext.status.success() && plaintext.stdout.is_empty(),
        "plaintext answered while no agent ran: {}",
        String::from_utf8_lossy(&plaintext.stdout)
    );
    // The enrolled client's connection made in the gap waits for the next agent...
    let waiting = scene.client.spawn(
        &scene.cluster,
        &["connect", "--to", SERVICE, "--timeout-ms", "10000"],
    );
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    scene.cluster.spawn_agent_unwaited(1, &[]);
    // ... and is served by it, as mutual TLS, within 2 s of its start.
    let served = finish(waiting, Duration::from_secs(15));
    let took = started.elapsed();
    assert_eq!(replies(&served)[0]["server"], "web-1");
    assert!(
        took <= Duration::from_secs(2),
        "the new agent served the waiting connection {took:?} after its start"
    );
    wait_for_metric(
        &scene.cluster,
        1,
        "istio_tcp_connections_opened_total",
        &mutual_tls_labels("destination"),
        1.0,
    );
    assert_eq!(
        scene.mutual_tls_from_client(0, "source"),
        before + 1.0,
        "the source counted it as mutual TLS"
    );
    let plaintext_seen = metric(
        &scene.cluster,
        1,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_workload", "client"),
            ("connection_security_policy", "none"),
        ],
    );
    assert_eq!(
        plaintext_seen, 0.0,
        "no connection reached the pod in plaintext"
    );
}

#[test]
fn a_connection_made_under_sockmap_is_relayed_by_a_next_agent_without_it() {
    if skip() {
        return;
    }
    let mut scene = Scene::new("sockmap_handover", &["--sockmap"]);
    let legacy_addr = format!("{}:8080", scene.legacy.ip);
    let mut legacy_server = scene.legacy.spawn(
        &scene.cluster,
        &["serve", "--listen", &legacy_addr, "--name", "legacy"],
    );
    legacy_server.wait_for_output("ready", READY_TIMEOUT);
    let status = scene.cluster.stop_agent(0);
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    // Made while no agent runs: its ends enter the sockhash under the old agent's setting,
    // so its bytes reach the held listener's socket by sk_msg, where splice cannot read.
    let waiting = scene.client.spawn(
        &scene.cluster,
        &["connect", "--to", &legacy_addr, "--timeout-ms", "10000"],
    );
    std::thread::sleep(Duration::from_millis(500));
    scene.cluster.start_agent(0, &[]);
    let served = finish(waiting, Duration::from_secs(15));
    assert_eq!(replies(&served)[0]["server"], "legacy");
    let entered = [("event", "sockmap_entered")];
    wait_until(CONNECT_TIMEOUT, "the gap's connection counted", || {
        (metric(&scene.cluster, 0, "nodemesh_bpf_events", &entered) >= 2.0).then_some(())
    });
}

#[test]
fn without_a_holder_connections_in_the_gap_are_refused_never_passed_through() {
    if skip() {
        return;
    }
    let mut node = OneNode::new("noholder");
    node.cluster.without_holder();
    node.start(&[]);
    let OneNode {
        cluster,
        legacy,
        listen,
        ..
    } = &mut node;
    // Permissive: plaintext from outside the mesh is served, through the proxy.
    replies(&connect(cluster, legacy, listen, 1));

    cluster.kill_agent(0);
    let refused = connect(cluster, legacy, listen, 1);
    assert!(
        !refused.status.success() && refused.stdout.is_empty(),
        "delivered past the mesh while no agent ran: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused"),
        "refused at once rather than left hanging: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn uninstall_restores_the_pods_exactly_as_before() {
    if skip() {
        return;
    }
    let mut node = OneNode::new("uninstall");
    let rules_before = ip_rules(&node.web);
    node.start(&[]);
    let OneNode {
        cluster,
        client,
        web,
        ..
    } = &mut node;
    assert_ne!(
        ip_rules(web),
        rules_before,
        "enrolling installs inbound routing"
    );
    replies(&connect(cluster, client, SERVICE, 1));

    let status = cluster.stop_agent(0);
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert_ne!(
        ip_rules(web),
        rules_before,
        "SIGTERM leaves the pods enrolled"
    );
    assert!(
        cluster
            .bpffs_path(0)
            .join("links")
            .read_dir()
            .expect("pins")
            .next()
            .is_some(),
        "the capture stays pinned"
    );

    let uninstall = cluster
        .node_command(0, bin_path("mesh-node"))
        .args(["uninstall", "--bpffs-path"])
        .arg(cluster.bpffs_path(0))
        .arg("--holder-socket")
        .arg(cluster.holder_socket(0))
        .output()
        .expect("running mesh-node uninstall");
    assert!(
        uninstall.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&uninstall.stderr)
    );
    node.assert_mesh_off(&rules_before);
}

#[test]
fn a_pinned_link_running_another_program_is_replaced_and_the_others_adopted() {
    if skip() {
        return;
    }
    let mut node = OneNode::new("upgrade");
    node.start(&[]);
    let OneNode {
        cluster, client, ..
    } = &mut node;
    replies(&connect(cluster, client, SERVICE, 1));
    let status = cluster.stop_agent(0);
    assert!(status.success(), "clean exit on SIGTERM: {status}");

    // What an older agent would leave: the connect4 pin holding a link of another program
    // (here the sockops link, moved over it; the connect4 link it held detaches).
    let links = cluster.bpffs_path(0).join("links");
    std::fs::rename(links.join("mesh_sockops"), links.join("mesh_connect4")).expect("moving a pin");
    assert!(
        !connect(cluster, client, SERVICE, 1).status.success(),
        "without the connect4 link nothing is captured (the Service IP leads nowhere)"
    );
    let adopted_before = logged(cluster, 0, "adopted the pinned link");
    cluster.start_agent(0, &[]);
    wait_enrolled(cluster, 0, 2);
    assert_eq!(
        replies(&connect(cluster, client, SERVICE, 1))[0]["server"],
        "web-1",
        "the link of another program was replaced by this agent's connect4"
    );
    assert_eq!(
        logged(cluster, 0, "adopted the pinned link") - adopted_before,
        1,
        "connect6, untouched, was adopted; connect4 was not"
    );
    assert!(links.join("mesh_sockops").exists(), "sockops pinned again");
}

#[test]
fn deleting_the_daemon_set_switches_the_mesh_off_on_the_node() {
    if skip() {
        return;
    }
    let mut node = OneNode::new("dsdelete");
    let rules_before = ip_rules(&node.web);
    let cluster = &mut node.cluster;
    // The API server, as the agent sees it when its DaemonSet is gone: the DaemonSet is 404
    // (the scripted server serves no apps/v1 objects).
    let api = ScriptedApiServer::start(cluster, 0);
    let kubeconfig = cluster.work_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    cluster.set_agent_env("KUBECONFIG", kubeconfig.to_str().expect("UTF-8 path"));
    let bin_dir = cluster.work_dir().join("cni-bin");
    let conf_dir = cluster.work_dir().join("net.d");
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    let conflist = conf_dir.join("10-calico.conflist");
    std::fs::write(
        &conflist,
        r#"{"name":"k8s-pod-network","cniVersion":"1.0.0","plugins":[{"type":"calico"}]}"#,
    )
    .expect("a chain");
    let socket = cluster.work_dir().join("cni.sock");
    node.start(&[
        "--cni-socket",
        socket.to_str().expect("UTF-8 path"),
        "--cni-bin-dir",
        bin_dir.to_str().expect("UTF-8 path"),
        "--cni-conf-dir",
        conf_dir.to_str().expect("UTF-8 path"),
        "--cni-uninstall-with",
        "nodemesh-system/nodemesh-node",
    ]);
    replies(&connect(&node.cluster, &node.client, SERVICE, 1));
    wait_until(READY_TIMEOUT, "the plugin installed", || {
        bin_dir.join("nodemesh-cni").exists().then_some(())
    });

    let status = node.cluster.stop_agent(0);
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(
        !bin_dir.join("nodemesh-cni").exists(),
        "the plugin left the node"
    );
    node.assert_mesh_off(&rules_before);
}

/// One node: `client` and `web-1` (serving on `listen`) in enrolled namespace `shop`, and
/// `legacy` outside the mesh; the agent not started yet.
struct OneNode {
    cluster: Cluster,
    client: Pod,
    web: Pod,
    legacy: Pod,
    /// `web-1`'s own address and port.
    listen: String,
    _server: PodProcess,
}

impl OneNode {
    fn new(test: &str) -> Self {
        let mut cluster = Cluster::new(test, 1);
        let client = cluster.add_pod(PodSpec::new("client", 0).namespace("shop"));
        let web = cluster.add_pod(
            PodSpec::new("web-1", 0)
                .namespace("shop")
                .label("app", "web"),
        );
        let legacy = cluster.add_pod(PodSpec::new("legacy", 0).namespace("legacy"));
        write_shop(&cluster, true);
        cluster.write_config("ns-legacy.yaml", &namespace_yaml("legacy", &[]));
        let listen = format!("{}:8080", web.ip);
        let mut server = web.spawn(&cluster, &["serve", "--listen", &listen, "--name", "web-1"]);
        server.wait_for_output("ready", READY_TIMEOUT);
        Self {
            cluster,
            client,
            web,
            legacy,
            listen,
            _server: server,
        }
    }

    /// Starts the agent (with `extra_args`) and waits until both shop pods are enrolled.
    fn start(&mut self, extra_args: &[&str]) {
        self.cluster.start_agent(0, extra_args);
        wait_enrolled(&self.cluster, 0, 2);
    }

    /// Asserts the node is as before the mesh: `rules_before` in the web pod, the pods
    /// reach each other directly, the Service IP leads nowhere, nothing pinned.
    fn assert_mesh_off(&self, rules_before: &str) {
        assert_eq!(ip_rules(&self.web), rules_before, "pod routing restored");
        let direct = replies(&connect(&self.cluster, &self.client, &self.listen, 1));
        assert_eq!(direct[0]["server"], "web-1", "pods work without the mesh");
        assert!(
            !connect(&self.cluster, &self.client, SERVICE, 1)
                .status
                .success(),
            "capture is off: the Service IP means nothing without the mesh"
        );
        assert!(
            !self.cluster.bpffs_path(0).join("links").exists(),
            "the pins are gone"
        );
    }
}

/// Waits for a spawned `mesh-testapp` to exit and returns its output.
fn finish(mut process: PodProcess, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = process.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "the client did not finish");
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: process.stdout().into_bytes(),
        stderr: std::fs::read(process.log_path()).unwrap_or_default(),
    }
}

fn ip_rules(pod: &Pod) -> String {
    let output = Command::new("ip")
        .args(["-n", &pod.netns, "rule", "show"])
        .output()
        .expect("ip rule");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
