//! Helpers the end-to-end tests share: talking through `mesh-testapp` and waiting for
//! the agents to converge.
use std::{
    net::SocketAddr,
    process::Output,
    time::{Duration, Instant},
};

use crate::{Cluster, Pod, metric_value, namespace_yaml, service_yaml};

/// Labels that enroll a namespace.
pub const ENROLLED: &[(&str, &str)] = &[("nodemesh.io/enabled", "true")];
/// The cluster IP of [`write_shop`]'s Service `web`.
pub const SHOP_SERVICE_IP: &str = "10.96.0.10";

/// Namespace `shop` (enrolled unless `enrolled` is false), Service `web` at
/// [`SHOP_SERVICE_IP`] on port 80 → 8080 over pods labelled app=web.
pub fn write_shop(cluster: &Cluster, enrolled: bool) {
    let labels = if enrolled { ENROLLED } else { &[] };
    cluster.write_config("ns-shop.yaml", &namespace_yaml("shop", labels));
    cluster.write_config(
        "svc-web.yaml",
        &service_yaml(
            "web",
            "shop",
            SHOP_SERVICE_IP,
            &[("tcp-web", 80, 8080)],
            &[("app", "web")],
        ),
    );
}

/// How long one `mesh-testapp connect` may run.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agents get to apply a config change.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `mesh-testapp connect` in `client`: `count` connections to `to`, one line each.
pub fn connect(cluster: &Cluster, client: &Pod, to: &str, count: usize) -> Output {
    client.run(
        cluster,
        &[
            "connect",
            "--to",
            to,
            "--count",
            &count.to_string(),
            "--message",
            "hello",
            "--timeout-ms",
            "5000",
        ],
        CONNECT_TIMEOUT,
    )
}

/// The JSON replies of a successful `connect`; panics with its stderr otherwise.
pub fn replies(output: &Output) -> Vec<serde_json::Value> {
    assert!(
        output.status.success(),
        "connect failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("reply {line:?}: {e}")))
        .collect()
}

/// A socket address field (`peer`, `local`) of a reply.
pub fn addr_field(reply: &serde_json::Value, field: &str) -> SocketAddr {
    reply[field]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("reply {reply} has no socket address in {field:?}"))
}

/// Polls `check` until it returns `Some`, or panics after `timeout` saying what was awaited.
pub fn wait_until<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of a metric on node `i` (summed over matching series; 0 when absent).
pub fn metric(cluster: &Cluster, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&cluster.metrics(i), name, labels).unwrap_or(0.0)
}

/// Waits until a metric on node `i` reads `expected`, panicking with the last value.
pub fn wait_for_metric(
    cluster: &Cluster,
    i: usize,
    name: &str,
    labels: &[(&str, &str)],
    expected: f64,
) {
    let mut last = f64::NAN;
    let what = format!("{name}{labels:?} on node{i} to read {expected}");
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    while Instant::now() < deadline {
        last = metric(cluster, i, name, labels);
        if last == expected {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}; it reads {last}");
}

/// Writes `yaml` as the config file `file` and waits until every agent has loaded it, with
/// `rejected` resources refused in that load.
pub fn apply_config(cluster: &Cluster, file: &str, yaml: &str, rejected: f64) {
    let loads: Vec<f64> = (0..cluster.nodes())
        .map(|i| metric(cluster, i, "nodemesh_config_loads_total", &[]))
        .collect();
    cluster.write_config(file, yaml);
    for (i, before) in loads.into_iter().enumerate() {
        wait_until(CONVERGE_TIMEOUT, "the agents to reload", || {
            (metric(cluster, i, "nodemesh_config_loads_total", &[]) > before).then_some(())
        });
        assert_eq!(
            metric(cluster, i, "nodemesh_config_rejected_resources", &[]),
            rejected,
            "rejections on node{i}; see {}",
            cluster.agent_log(i).display()
        );
    }
}

/// Waits until node `i`'s agent has exactly `expected` enrolled pods.
pub fn wait_enrolled(cluster: &Cluster, i: usize, expected: usize) {
    wait_for_metric(cluster, i, "nodemesh_enrolled_pods", &[], expected as f64);
}

/// True (after printing why) when this machine cannot run the cluster: the test returns.
pub fn skip() -> bool {
    match crate::skip_reason() {
        Some(reason) => {
            eprintln!("skipping: {reason}");
            true
        }
        None => false,
    }
}
