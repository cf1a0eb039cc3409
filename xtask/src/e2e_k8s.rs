//! `cargo xtask e2e-k8s`: the install on a real cluster, end to end, with `kubectl`.
//!
//! Skipped (exit 0, with the reason) when `KUBECONFIG` is not set: no cluster can run on the
//! machines the project is built on, so this suite is for users' CI and for kind (see the
//! README, "Testing on a real cluster"). It installs `deploy/` with the image given, enrolls
//! a namespace, deploys a client and two versions of a server, and checks what a user would:
//! the pods were enrolled without restarts, traffic is mutual TLS with the workloads' SPIFFE
//! identities, a VirtualService moves requests, the node metrics count them; then it
//! uninstalls and checks nothing of the mesh is left.
use std::{
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use crate::deploy::{
    deploy_dir,
    objects::{AGENT, CA, HOLDER, NAMESPACE},
};

/// The namespace the suite enrolls; deleted at the end.
const TEST_NAMESPACE: &str = "nodemesh-e2e";
/// Kubernetes' own e2e test server: `netexec` answers `/hostname` and `/clientip`.
const SERVER_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";
const CLIENT_IMAGE: &str = "curlimages/curl:8.11.1";
const ROLLOUT_TIMEOUT: &str = "300s";

pub struct Options {
    /// The agent image, already loaded into the cluster (`kind load docker-image ...`).
    pub image: String,
    /// Leave the install and the test namespace in place (for debugging).
    pub keep: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if std::env::var_os("KUBECONFIG").is_none() {
        println!(
            "skipping e2e-k8s: KUBECONFIG is not set (it runs against a real cluster; see \
             README, \"Testing on a real cluster\", for kind)"
        );
        return Ok(());
    }
    kubectl(&["version", "--client"]).context("kubectl is needed on PATH")?;
    let started = Instant::now();
    install(&options.image)?;
    let outcome = check_mesh();
    if options.keep {
        println!("--keep: leaving the install and namespace {TEST_NAMESPACE} in place");
        return outcome;
    }
    let uninstalled = uninstall();
    outcome?;
    uninstalled?;
    println!("e2e-k8s passed in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn install(image: &str) -> anyhow::Result<()> {
    println!("installing deploy/ with image {image}");
    kubectl(&["apply", "-k", &deploy_dir().display().to_string()])?;
    for (object, container) in [
        (format!("daemonset/{AGENT}"), "agent"),
        (format!("daemonset/{HOLDER}"), "holder"),
        (format!("deployment/{CA}"), "ca"),
    ] {
        kubectl(&[
            "-n",
            NAMESPACE,
            "set",
            "image",
            &object,
            &format!("{container}={image}"),
        ])?;
    }
    // The holder updates only when its pods are deleted (OnDelete: it outlives agent
    // updates), so its pods are replaced by hand to run the image under test.
    let holder_pods = format!("app.kubernetes.io/name={HOLDER}");
    kubectl(&["-n", NAMESPACE, "delete", "pod", "-l", &holder_pods])?;
    kubectl(&[
        "-n",
        NAMESPACE,
        "wait",
        "--for=condition=Ready",
        "pod",
        "-l",
        &holder_pods,
        "--timeout",
        ROLLOUT_TIMEOUT,
    ])?;
    for object in [format!("deployment/{CA}"), format!("daemonset/{AGENT}")] {
        kubectl(&[
            "-n",
            NAMESPACE,
            "rollout",
            "status",
            &object,
            "--timeout",
            ROLLOUT_TIMEOUT,
        ])?;
    }
    Ok(())
}

fn sample_apps() -> String {
    let server = |version: &str| {
        format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: server-{version}, namespace: {TEST_NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: server, version: {version}}}}}
  template:
    metadata: {{labels: {{app: server, version: {version}}}}}
    spec:
      serviceAccountName: server
      containers:
      - name: server
        image: {SERVER_IMAGE}
        args: [netexec, --http-port=8080]
        ports: [{{name: http, containerPort: 8080}}]
"#
        )
    };
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {TEST_NAMESPACE}
  labels: {{nodemesh.io/enabled: "true"}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: server, namespace: {TEST_NAMESPACE}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: {TEST_NAMESPACE}}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {TEST_NAMESPACE}}}
spec:
  selector: {{app: server}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
{}---
{}---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: client, namespace: {TEST_NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: client}}}}
  template:
    metadata: {{labels: {{app: client}}}}
    spec:
      serviceAccountName: client
      containers:
      - name: client
        image: {CLIENT_IMAGE}
        command: [sleep, infinity]
"#,
        server("v1"),
        server("v2")
    )
}

fn check_mesh() -> anyhow::Result<()> {
    println!("deploying sample apps in {TEST_NAMESPACE}");
    kubectl_stdin(&["apply", "-f", "-"], &sample_apps())?;
    for deployment in ["server-v1", "server-v2", "client"] {
        kubectl(&[
            "-n",
            TEST_NAMESPACE,
            "rollout",
            "status",
            &format!("deployment/{deployment}"),
            "--timeout",
            ROLLOUT_TIMEOUT,
        ])?;
    }

    // Both versions answer through the mesh.
    let answers = requests(20)?;
    ensure!(
        answers.iter().any(|a| a.starts_with("server-v1"))
            && answers.iter().any(|a| a.starts_with("server-v2")),
        "both versions should answer before any routing: {answers:?}"
    );

    // A VirtualService sends everything to v2.
    kubectl_stdin(&["apply", "-f", "-"], &route_to_v2())?;
    let routed = wait_for("the VirtualService to route every request to v2", || {
        let answers = requests(10)?;
        Ok(answers.iter().all(|a| a.starts_with("server-v2")))
    })?;
    ensure!(routed, "requests still reach v1 after the VirtualService");

    // The destination's agent saw mutual TLS from the client's identity.
    let source = format!("spiffe://cluster.local/ns/{TEST_NAMESPACE}/sa/client");
    let counted = wait_for("mutual TLS request metrics at the destination", || {
        let metrics = agent_metrics()?;
        Ok(metrics.lines().any(|line| {
            line.starts_with("istio_requests_total{")
                && line.contains("reporter=\"destination\"")
                && line.contains("connection_security_policy=\"mutual_tls\"")
                && line.contains(&format!("source_principal=\"{source}\""))
                && line.contains("destination_version=\"v2\"")
        }))
    })?;
    ensure!(
        counted,
        "no mutual TLS request from {source} in the agents' metrics"
    );

    // Enrolling did not restart the apps.
    let restarts = kubectl(&[
        "-n",
        TEST_NAMESPACE,
        "get",
        "pods",
        "-o",
        "jsonpath={.items[*].status.containerStatuses[*].restartCount}",
    ])?;
    ensure!(
        restarts.split_whitespace().all(|n| n == "0"),
        "pods restarted: {restarts}"
    );
    println!("mesh checks passed: routing, mutual TLS identities, metrics");
    Ok(())
}

fn route_to_v2() -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: server, namespace: {TEST_NAMESPACE}}}
spec:
  host: server
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: server, namespace: {TEST_NAMESPACE}}}
spec:
  hosts: [server]
  http:
  - route:
    - destination: {{host: server, subset: v2}}
"#
    )
}

/// `count` requests from the client pod; each answer is the serving pod's name.
fn requests(count: usize) -> anyhow::Result<Vec<String>> {
    let args = [
        "-n",
        TEST_NAMESPACE,
        "exec",
        "deploy/client",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://server/hostname",
    ];
    (0..count)
        .map(|_| Ok(kubectl(&args)?.trim().to_string()))
        .collect()
}

/// Every agent's `/metrics`, through the API server's pod proxy.
fn agent_metrics() -> anyhow::Result<String> {
    let pods: Value = serde_json::from_str(&kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-l",
        &format!("app.kubernetes.io/name={AGENT}"),
        "-o",
        "json",
    ])?)?;
    let mut all = String::new();
    for pod in pods["items"].as_array().into_iter().flatten() {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        all.push_str(&kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{NAMESPACE}/pods/{name}:15020/proxy/metrics"),
        ])?);
    }
    Ok(all)
}

fn uninstall() -> anyhow::Result<()> {
    println!("uninstalling");
    kubectl(&["delete", "namespace", TEST_NAMESPACE, "--wait=true"])?;
    kubectl(&[
        "delete",
        "-k",
        &deploy_dir().display().to_string(),
        "--wait=true",
        "--ignore-not-found",
    ])?;
    let gone = wait_for("every nodemesh object to be deleted", || {
        let left = kubectl(&[
            "get",
            "all,configmaps,secrets,serviceaccounts,clusterroles,clusterrolebindings,roles,rolebindings",
            "-A",
            "-l",
            "app.kubernetes.io/part-of=nodemesh",
            "-o",
            "name",
        ])?;
        Ok(left.trim().is_empty())
    })?;
    ensure!(gone, "objects of the install were left behind");
    Ok(())
}

/// Polls `check` every 2 s for up to 2 minutes.
fn wait_for(what: &str, mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match check() {
            Ok(true) => return Ok(true),
            Ok(false) => {}
            Err(error) => println!("  waiting for {what}: {error:#}"),
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        sleep(Duration::from_secs(2));
    }
}

fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    kubectl_stdin(args, "")
}

fn kubectl_stdin(args: &[&str], stdin: &str) -> anyhow::Result<String> {
    use std::io::Write as _;

    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kubectl")?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(stdin.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
