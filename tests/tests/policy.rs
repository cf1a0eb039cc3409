//! End to end: PeerAuthentication and AuthorizationPolicy on the inbound (plaintext) path.
use std::time::Duration;

use mesh_tests::{
    Cluster, Pod, PodProcess, PodSpec, namespace_yaml,
    scenario::{
        CONVERGE_TIMEOUT, connect, metric, replies, skip, wait_enrolled, wait_for_metric,
        wait_until,
    },
};

const ENROLLED: &[(&str, &str)] = &[("nodemesh.io/enabled", "true")];

/// An enrolled `web` pod on node1 serving on 8080 and 8081, and two clients outside the
/// mesh on node0. Policies are written by each test.
struct Scene {
    cluster: Cluster,
    web: Pod,
    alice: Pod,
    bob: Pod,
    _server: PodProcess,
}

fn scene(test: &str) -> Scene {
    let mut cluster = Cluster::new(test, 2);
    let web = cluster.add_pod(PodSpec::new("web", 1).namespace("shop").label("app", "web"));
    let alice = cluster.add_pod(PodSpec::new("alice", 0).namespace("plain"));
    let bob = cluster.add_pod(PodSpec::new("bob", 0).namespace("plain"));
    cluster.write_config("ns.yaml", &namespace_yaml("shop", ENROLLED));
    let (a, b) = (format!("{}:8080", web.ip), format!("{}:8081", web.ip));
    let mut server = web.spawn(
        &cluster,
        &["serve", "--listen", &a, "--listen", &b, "--name", "web"],
    );
    server.wait_for_output("ready", Duration::from_secs(10));
    cluster.start_agents();
    wait_enrolled(&cluster, 1, 1);
    Scene {
        cluster,
        web,
        alice,
        bob,
        _server: server,
    }
}

impl Scene {
    fn reaches(&self, client: &Pod, port: u16) -> bool {
        connect(&self.cluster, client, &format!("{}:{port}", self.web.ip), 1)
            .status
            .success()
    }

    /// Applies `yaml` and waits until node1 has loaded it, without rejections.
    fn apply(&self, yaml: &str) {
        let loads = metric(&self.cluster, 1, "nodemesh_config_loads_total", &[]);
        self.cluster.write_config("policy.yaml", yaml);
        wait_until(CONVERGE_TIMEOUT, "node1 to reload its config", || {
            (metric(&self.cluster, 1, "nodemesh_config_loads_total", &[]) > loads).then_some(())
        });
        assert_eq!(
            metric(&self.cluster, 1, "nodemesh_config_rejected_resources", &[]),
            0.0,
            "policy rejected; see {}",
            self.cluster.agent_log(1).display()
        );
    }
}

#[test]
fn strict_refuses_plaintext_permissive_allows_it_and_disable_works_per_port() {
    if skip() {
        return;
    }
    let scene = scene("peer_authn");
    assert!(
        scene.reaches(&scene.alice, 8080),
        "PERMISSIVE is the default"
    );

    scene.apply(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: nodemesh-system}
spec:
  mtls: {mode: STRICT}
",
    );
    assert!(
        !scene.reaches(&scene.alice, 8080),
        "mesh-wide STRICT refuses plaintext"
    );
    let refused = [("direction", "inbound"), ("reason", "mtls_required")];
    wait_for_metric(
        &scene.cluster,
        1,
        "nodemesh_proxy_errors_total",
        &refused,
        1.0,
    );
    // From the node's netns but not by one of its processes (the test's own thread, outside
    // the node's cgroup): a node address the kernel saw no node socket open, as kube-proxy's
    // SNAT makes. Refused like any plaintext.
    let snat_like = from_node(&scene, 1, format!("{}:8080", scene.web.ip)).unwrap_or_default();
    assert!(
        snat_like.is_empty(),
        "a node address alone passed STRICT: {snat_like:?}"
    );

    scene.apply(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: nodemesh-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8081: {mode: DISABLE}
",
    );
    assert!(!scene.reaches(&scene.alice, 8080), "still STRICT on 8080");
    assert!(scene.reaches(&scene.alice, 8081), "DISABLE on port 8081");

    scene.apply(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: shop, namespace: shop}
spec:
  mtls: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: nodemesh-system}
spec:
  mtls: {mode: STRICT}
",
    );
    assert!(
        scene.reaches(&scene.alice, 8080),
        "namespace PERMISSIVE beats mesh STRICT"
    );
}

#[test]
fn authorization_by_ip_block_and_port_and_deny_first() {
    if skip() {
        return;
    }
    let scene = scene("authz_l4");
    let alice_only = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: alice-8080, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{ipBlocks: [\"{}/32\"]}}
    to:
    - operation: {{ports: [\"8080\"]}}
",
        scene.alice.ip
    );
    scene.apply(&alice_only);
    assert!(scene.reaches(&scene.alice, 8080), "alice's block and port");
    assert!(!scene.reaches(&scene.bob, 8080), "bob is outside the block");
    assert!(!scene.reaches(&scene.alice, 8081), "8081 is not allowed");
    let denied = [("direction", "inbound"), ("reason", "authorization_denied")];
    wait_for_metric(
        &scene.cluster,
        1,
        "nodemesh_proxy_errors_total",
        &denied,
        2.0,
    );

    let deny_alice = format!(
        "{alice_only}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-node0, namespace: nodemesh-system}}
spec:
  action: DENY
  rules:
  - from:
    - source: {{ipBlocks: [10.244.0.0/24]}}
"
    );
    scene.apply(&deny_alice);
    assert!(
        !scene.reaches(&scene.alice, 8080),
        "a mesh-wide DENY wins over the ALLOW"
    );

    scene.apply("# no policies\n");
    let reply = replies(&connect(
        &scene.cluster,
        &scene.bob,
        &format!("{}:8081", scene.web.ip),
        1,
    ));
    assert_eq!(
        reply[0]["server"], "web",
        "no policy: everything allowed again"
    );
}

/// The open file descriptors of node `i`'s agent.
fn agent_fds(scene: &Scene, i: usize) -> usize {
    let pid = scene.cluster.agent_pid(i).expect("the agent runs");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the agent's fd table")
        .count()
}

#[test]
fn the_proxy_never_delivers_to_its_own_listeners() {
    if skip() {
        return;
    }
    let scene = scene("own_listener");
    let before = agent_fds(&scene, 1);
    // From outside the mesh straight at the inbound listener (it listens on every address),
    // and from the app itself over loopback: each would be accepted, then dialled again to
    // the same listener, without end.
    let attempts = [
        (&scene.alice, format!("{}:15006", scene.web.ip)),
        (&scene.web, "127.0.0.1:15006".to_string()),
        (&scene.alice, format!("{}:15001", scene.web.ip)),
    ];
    for (client, to) in &attempts {
        let output = connect(&scene.cluster, client, to, 1);
        assert!(
            !output.status.success(),
            "{} → {to} must be refused, got {}",
            client.name,
            String::from_utf8_lossy(&output.stdout)
        );
    }
    let own = [("direction", "inbound"), ("reason", "own_listener")];
    // The third is steered to 15006 like any port of the pod, and refused for naming one.
    wait_for_metric(&scene.cluster, 1, "nodemesh_proxy_errors_total", &own, 3.0);
    std::thread::sleep(Duration::from_millis(500));
    let after = agent_fds(&scene, 1);
    assert!(
        after <= before + 8,
        "the agent's fds must stay flat: {before} before, {after} after"
    );
    assert!(scene.reaches(&scene.alice, 8080), "the app is still served");
}

#[test]
fn a_policy_the_mesh_cannot_apply_never_widens_access() {
    if skip() {
        return;
    }
    let scene = scene("fail_closed");
    assert!(
        scene.reaches(&scene.alice, 8080),
        "PERMISSIVE is the default"
    );
    // `strict` is not a mode Istio knows (it wants STRICT): unreadable, so enforced STRICT.
    scene.cluster.write_config(
        "policy.yaml",
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: strict}
",
    );
    wait_for_metric(
        &scene.cluster,
        1,
        "nodemesh_config_rejected_resources",
        &[],
        1.0,
    );
    assert!(
        !scene.reaches(&scene.alice, 8080),
        "an unreadable PeerAuthentication counts as STRICT"
    );

    // An ALLOW policy whose only rule is unsupported (a path template) allows nothing.
    scene.cluster.write_config(
        "policy.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - to:
    - operation: {paths: ['/api/{*}']}
",
    );
    wait_until(CONVERGE_TIMEOUT, "the ALLOW policy to be enforced", || {
        (!scene.reaches(&scene.bob, 8081)).then_some(())
    });
    assert_eq!(
        metric(&scene.cluster, 1, "nodemesh_config_rejected_resources", &[]),
        1.0,
        "still reported as rejected"
    );
}

/// One line sent to `to` from node `i`'s own netns, as kubelet's probes come, and the
/// first line of the answer.
fn from_node(scene: &Scene, i: usize, to: String) -> std::io::Result<String> {
    scene.cluster.run_in_node(i, move || {
        use std::io::{BufRead, BufReader, Write};
        let addr: std::net::SocketAddr = to.parse().expect("an address");
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"probe\n")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line)
    })
}

#[test]
fn the_node_s_own_probes_pass_strict_and_allow_policies_and_only_they_do() {
    if skip() {
        return;
    }
    let scene = scene("probes");
    scene.apply(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: nodemesh-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nobody, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
",
    );
    let web = format!("{}:8080", scene.web.ip);
    assert!(
        !scene.reaches(&scene.alice, 8080),
        "plaintext from a pod is refused"
    );
    // A process of node1 itself, as kubelet is: its connection passes.
    let probe = scene
        .cluster
        .node_command(1, mesh_tests::bin_path("mesh-testapp"))
        .args([
            "connect",
            "--to",
            &web,
            "--count",
            "1",
            "--message",
            "probe",
        ])
        .args(["--timeout-ms", "5000"])
        .output()
        .expect("running a probe on node1");
    let answer = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.status.success() && answer.contains("\"echo\":\"probe\""),
        "node1's own probe must be answered: {answer} {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    // The node's address without a node socket behind it (as kube-proxy's SNAT gives
    // forwarded traffic): refused.
    let snat_like = from_node(&scene, 1, web.clone()).unwrap_or_default();
    assert!(
        snat_like.is_empty(),
        "a node address alone passed: {snat_like:?}"
    );
    // Another node is not this node: its plaintext is refused like any other.
    let answer = from_node(&scene, 0, web).unwrap_or_default();
    assert!(answer.is_empty(), "another node's plaintext got {answer:?}");
}
