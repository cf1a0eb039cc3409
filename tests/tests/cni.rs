//! End to end: the chained CNI plugin (`mesh-node cni`) driven as a container runtime
//! drives it, against a real agent and real pod netns, and the pod-UID netns lookup.
//!
//! The pods of the enrollment tests are written Pending, without IPs, as the API server
//! reports them while the CNI chain runs: the agent's own search by IP cannot find them, so
//! whatever capture they get, they get from the plugin.
use std::{
    io::Write,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use mesh_node::netns::{Netns, NetnsSurvey};
use mesh_tests::{
    Cluster, Pod, PodProcess, PodSpec, bin_path,
    scenario::{
        SHOP_SERVICE_IP, connect, metric, replies, skip, wait_enrolled, wait_for_metric,
        wait_until, write_shop,
    },
};
use serde_json::{Value, json};

const SERVICE_IP: &str = SHOP_SERVICE_IP;
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's CNI socket in the cluster's work dir.
fn cni_socket(cluster: &Cluster) -> PathBuf {
    cluster.work_dir().join("cni.sock")
}

/// What the main plugin would have returned for `pod`.
fn prev_result(pod: &Pod) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{ "name": "eth0", "sandbox": pod.netns_path() }],
        "ips": [{ "address": format!("{}/32", pod.ip), "interface": 0 }],
    })
}

/// The network config the runtime passes to the plugin: the chain's name and version,
/// the plugin's entry, the main plugin's result.
fn network_config(socket: &Path, pod: &Pod, entry: Value) -> Value {
    let mut config = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "nodemesh-cni",
        "agentSocket": socket,
        "prevResult": prev_result(pod),
    });
    for (key, value) in entry.as_object().expect("an object") {
        config[key] = value.clone();
    }
    config
}

/// Runs `binary` as the runtime runs a CNI plugin: `CNI_*` variables, config on stdin.
fn run_plugin(binary: &Path, args: &[&str], command: &str, pod: &Pod, config: &Value) -> Output {
    let mut child = Command::new(binary)
        .args(args)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{}", pod.uid))
        .env("CNI_NETNS", pod.netns_path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
                 K8S_POD_INFRA_CONTAINER_ID=sandbox;K8S_POD_UID={}",
                pod.namespace, pod.name, pod.uid
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(config.to_string().as_bytes())
        .expect("writing the config");
    child.wait_with_output().expect("waiting for the plugin")
}

/// `mesh-node cni <command>` in node `node`'s netns, where the runtime runs plugins.
fn cni(cluster: &Cluster, node: usize, command: &str, pod: &Pod, config: &Value) -> Output {
    let binary = bin_path("mesh-node");
    cluster.run_in_node(node, || run_plugin(&binary, &["cni"], command, pod, config))
}

fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "plugin stdout {:?} is not JSON ({e}); stderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: plugin exited {}; stdout: {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether a connection from `client` to the Service is captured: only the mesh can route
/// a ClusterIP.
fn reaches_service(cluster: &Cluster, client: &Pod) -> bool {
    connect(cluster, client, &format!("{SERVICE_IP}:80"), 1)
        .status
        .success()
}

/// Namespace `shop` (enrolled or not), Service `web` (80 → 8080) and its serving backend
/// `web-1`, plus the pending pod `client`; one node, agent not started.
fn shop(test: &str, enrolled: bool) -> (Cluster, Pod, PodProcess) {
    let mut cluster = Cluster::new(test, 1);
    let web = cluster.add_pod(
        PodSpec::new("web-1", 0)
            .namespace("shop")
            .label("app", "web"),
    );
    let client = cluster.add_pod(PodSpec::new("client", 0).namespace("shop").pending());
    write_shop(&cluster, enrolled);
    let listen = format!("{}:8080", web.ip);
    let mut server = web.spawn(&cluster, &["serve", "--listen", &listen, "--name", "web-1"]);
    server.wait_for_output("ready", READY_TIMEOUT);
    (cluster, client, server)
}

#[test]
fn add_enrolls_a_pending_pod_before_it_returns_and_del_releases_it() {
    if skip() {
        return;
    }
    let (mut cluster, client, _server) = shop("cni_add", true);
    let socket = cni_socket(&cluster);
    // A Calico-like chain for the agent to install itself into.
    let bin_dir = cluster.work_dir().join("cni-bin");
    let conf_dir = cluster.work_dir().join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conflist = conf_dir.join("10-calico.conflist");
    std::fs::write(
        &conflist,
        json!({ "name": "k8s-pod-network", "cniVersion": "1.0.0",
                "plugins": [{ "type": "calico" }, { "type": "portmap" }] })
        .to_string(),
    )
    .unwrap();
    cluster.start_agent(
        0,
        &[
            "--cni-socket",
            socket.to_str().unwrap(),
            "--cni-bin-dir",
            bin_dir.to_str().unwrap(),
            "--cni-conf-dir",
            conf_dir.to_str().unwrap(),
        ],
    );
    wait_enrolled(&cluster, 0, 1); // web-1; the pending client cannot be found by IP
    assert!(
        !reaches_service(&cluster, &client),
        "before ADD the client must not be captured"
    );

    let config = network_config(&socket, &client, json!({ "agentTimeout": "5s" }));
    let add = cni(&cluster, 0, "ADD", &client, &config);
    assert_success(&add, "ADD");
    assert_eq!(
        stdout_json(&add),
        prev_result(&client),
        "prevResult passes through"
    );
    // No waiting: the plugin returned only once the capture was registered.
    assert_eq!(metric(&cluster, 0, "nodemesh_enrolled_pods", &[]), 2.0);
    let replies = replies(&connect(&cluster, &client, &format!("{SERVICE_IP}:80"), 2));
    assert_eq!(replies.len(), 2);
    assert!(
        replies.iter().all(|r| r["server"] == "web-1"),
        "{replies:?}"
    );

    let del = cni(&cluster, 0, "DEL", &client, &config);
    assert_success(&del, "DEL");
    assert_eq!(metric(&cluster, 0, "nodemesh_enrolled_pods", &[]), 1.0);
    assert!(
        !reaches_service(&cluster, &client),
        "after DEL new connections are not captured"
    );
    // A new sandbox for the pod (the runtime recreated it): captured again.
    assert_success(&cni(&cluster, 0, "ADD", &client, &config), "second ADD");
    assert_eq!(metric(&cluster, 0, "nodemesh_enrolled_pods", &[]), 2.0);
    assert!(reaches_service(&cluster, &client));
    assert_success(&cni(&cluster, 0, "STATUS", &client, &config), "STATUS");

    // The agent installed itself at the end of the chain; `cni uninstall` takes it out.
    let plugins = wait_until(READY_TIMEOUT, "the chain entry", || {
        let config: Value = serde_json::from_slice(&std::fs::read(&conflist).ok()?).ok()?;
        let plugins = config["plugins"].as_array()?.clone();
        (plugins.len() == 3).then_some(plugins)
    });
    assert_eq!(plugins[2]["type"], "nodemesh-cni");
    assert_eq!(plugins[2]["agentSocket"], socket.to_str().unwrap());
    assert!(bin_dir.join("nodemesh-cni").is_file());
    let uninstall = Command::new(bin_path("mesh-node"))
        .args(["cni", "uninstall", "--cni-bin-dir"])
        .arg(&bin_dir)
        .arg("--cni-conf-dir")
        .arg(&conf_dir)
        .output()
        .expect("running cni uninstall");
    assert_success(&uninstall, "cni uninstall");
    let config: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    assert_eq!(config["plugins"].as_array().unwrap().len(), 2);
    assert!(!bin_dir.join("nodemesh-cni").exists());
}

#[test]
fn add_for_a_pod_of_a_namespace_not_enrolled_succeeds_without_capture() {
    if skip() {
        return;
    }
    let (mut cluster, client, _server) = shop("cni_plain", false);
    let socket = cni_socket(&cluster);
    cluster.start_agent(0, &["--cni-socket", socket.to_str().unwrap()]);
    let config = network_config(&socket, &client, json!({}));
    let add = cni(&cluster, 0, "ADD", &client, &config);
    assert_success(&add, "ADD");
    assert_eq!(stdout_json(&add), prev_result(&client));
    assert_eq!(metric(&cluster, 0, "nodemesh_enrolled_pods", &[]), 0.0);
    assert!(
        !reaches_service(&cluster, &client),
        "not enrolled, not captured"
    );
}

#[test]
fn without_an_agent_add_fails_or_passes_through_by_policy() {
    if skip() {
        return;
    }
    let mut cluster = Cluster::new("cni_noagent", 1);
    let client = cluster.add_pod(PodSpec::new("client", 0).pending());
    let socket = cni_socket(&cluster); // nobody listens there

    let fail = network_config(&socket, &client, json!({ "agentTimeout": "500ms" }));
    let add = cni(&cluster, 0, "ADD", &client, &fail);
    assert!(!add.status.success(), "onAgentUnavailable defaults to fail");
    let error = stdout_json(&add);
    assert_eq!(error["code"], 11, "try again later: {error}");
    assert_eq!(error["cniVersion"], "1.0.0");
    assert!(
        error["msg"].as_str().unwrap().contains("cni.sock"),
        "{error}"
    );

    let allow = network_config(
        &socket,
        &client,
        json!({ "agentTimeout": "500ms", "onAgentUnavailable": "allow" }),
    );
    let add = cni(&cluster, 0, "ADD", &client, &allow);
    assert_success(&add, "ADD with allow");
    assert_eq!(stdout_json(&add), prev_result(&client));

    let del = cni(&cluster, 0, "DEL", &client, &fail);
    assert_success(&del, "DEL never fails");
}

#[test]
fn version_answers_also_when_run_as_nodemesh_cni() {
    let binary = bin_path("mesh-node");
    let dir = std::env::temp_dir().join(format!("nodemesh-cni-version-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("nodemesh-cni");
    let _ = std::fs::remove_file(&plugin);
    std::os::unix::fs::symlink(&binary, &plugin).unwrap();
    let expected = json!({
        "cniVersion": "1.0.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    });
    for (program, args) in [(&binary, &["cni"][..]), (&plugin, &[][..])] {
        let output = Command::new(program)
            .args(args)
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::null())
            .output()
            .expect("running the plugin");
        assert_success(&output, "VERSION");
        assert_eq!(stdout_json(&output), expected, "{}", program.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_pod_netns_is_found_by_its_uid_in_a_kubelet_like_cgroup() {
    if skip() {
        return;
    }
    let mut cluster = Cluster::new("cni_uid", 1);
    let pod = cluster.add_pod(PodSpec::new("client", 0).pending());
    let home = Netns::current().expect("own netns");
    assert!(
        NetnsSurvey::default()
            .find_by_uid(&pod.uid, &home)
            .is_none(),
        "no process of the pod yet"
    );
    // Kubelet's cgroupfs layout: .../kubepods/burstable/pod<uid>/<container>.
    let cgroup = cluster.add_cgroup(0, &format!("kubepods/burstable/pod{}/pause", pod.uid));
    let mut pause = pod
        .command_in_cgroup(&cgroup, "sleep")
        .arg("60")
        .spawn()
        .expect("starting a process in the pod");
    let found = wait_until(READY_TIMEOUT, "the pod's netns by UID", || {
        NetnsSurvey::default().find_by_uid(&pod.uid, &home)
    });
    let expected = std::fs::metadata(pod.netns_path()).unwrap().ino();
    assert_eq!(found.inode(), expected, "found {}", found.path().display());
    assert!(
        NetnsSurvey::default()
            .find_by_uid("not-a-pod", &home)
            .is_none()
    );
    let _ = pause.kill();
    let _ = pause.wait();
}

/// How often node 0's agent (logging JSON) logged `pod` enrolled.
fn enrollments(cluster: &Cluster, pod: &Pod) -> usize {
    let log = std::fs::read_to_string(cluster.agent_log(0)).expect("agent log");
    let key = format!("{}/{}", pod.namespace, pod.name);
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["fields"]["message"] == "pod enrolled" && line["fields"]["pod"] == key)
        .count()
}

#[test]
fn a_pod_the_config_does_not_know_yet_is_enrolled_by_its_namespace_and_kept() {
    if skip() {
        return;
    }
    let (mut cluster, client, _server) = shop("cni_lag", true);
    // The watch has not delivered the pod yet when the runtime sets up its sandbox.
    cluster.remove_config(&client.manifest_file_name());
    let socket = cni_socket(&cluster);
    cluster.start_agent(
        0,
        &[
            "--cni-socket",
            socket.to_str().unwrap(),
            "--log-format",
            "json",
        ],
    );
    wait_enrolled(&cluster, 0, 1);

    let config = network_config(&socket, &client, json!({}));
    let add = cni(&cluster, 0, "ADD", &client, &config);
    assert_success(&add, "ADD");
    assert_eq!(
        metric(&cluster, 0, "nodemesh_enrolled_pods", &[]),
        2.0,
        "namespace shop is enrolled: so is the pod it does not know yet"
    );
    assert!(reaches_service(&cluster, &client));

    // The config catches up with the same IPs: the pod stays as it is, no second search.
    cluster.write_pod_manifest(&client, false);
    std::thread::sleep(Duration::from_secs(1));
    assert!(reaches_service(&cluster, &client));
    assert_eq!(enrollments(&cluster, &client), 1, "enrolled once");

    // The pod turns out opted out: the reconcile takes it out.
    let mut opted_out = client.clone();
    opted_out
        .labels
        .push(("nodemesh.io/enabled".into(), "false".into()));
    cluster.write_pod_manifest(&opted_out, false);
    wait_enrolled(&cluster, 0, 1);
    assert!(!reaches_service(&cluster, &client));
}

#[test]
fn a_pod_the_config_does_not_know_yet_gets_its_namespace_policies_at_once() {
    if skip() {
        return;
    }
    let (mut cluster, client, _server) = shop("cni_lag_strict", true);
    cluster.remove_config(&client.manifest_file_name());
    let outsider = cluster.add_pod(PodSpec::new("outsider", 0).namespace("plain"));
    cluster.write_config(
        "strict.yaml",
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
",
    );
    let socket = cni_socket(&cluster);
    cluster.start_agent(0, &["--cni-socket", socket.to_str().unwrap()]);
    wait_enrolled(&cluster, 0, 1);
    assert_success(
        &cni(
            &cluster,
            0,
            "ADD",
            &client,
            &network_config(&socket, &client, json!({})),
        ),
        "ADD",
    );
    assert_eq!(metric(&cluster, 0, "nodemesh_enrolled_pods", &[]), 2.0);
    let listen = format!("{}:9090", client.ip);
    let mut server = client.spawn(
        &cluster,
        &["serve", "--listen", &listen, "--name", "client"],
    );
    server.wait_for_output("ready", READY_TIMEOUT);
    // The pod is still unknown to the config: namespace shop's STRICT applies all the same.
    let plaintext = connect(&cluster, &outsider, &listen, 1);
    assert!(
        !plaintext.status.success(),
        "plaintext to a STRICT pod the config does not know yet must be refused: {}",
        String::from_utf8_lossy(&plaintext.stdout)
    );
    // Refused by the mesh, for its policy.
    let refused = [("direction", "inbound"), ("reason", "mtls_required")];
    wait_for_metric(&cluster, 0, "nodemesh_proxy_errors_total", &refused, 1.0);
}
