//! End to end: the admin API and `mesh-node debug`.
use std::{net::SocketAddr, process::Command, time::Duration};

use mesh_tests::{
    Cluster, PodSpec, bin_path, namespace_yaml,
    scenario::{metric, skip, wait_enrolled, wait_until},
};

fn debug(cluster: &Cluster, node: usize, args: &[&str]) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", cluster.node_netns(node)])
        .arg(bin_path("mesh-node"))
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

#[test]
fn debug_shows_the_agent_state_and_the_admin_api_stays_on_loopback() {
    if skip() {
        return;
    }
    let mut cluster = Cluster::new("admin", 2);
    let web = cluster.add_pod(
        PodSpec::new("web-1", 0)
            .namespace("shop")
            .label("app", "web"),
    );
    cluster.add_pod(PodSpec::new("client", 1).namespace("shop"));
    cluster.write_config(
        "ns.yaml",
        &namespace_yaml("shop", &[("nodemesh.io/enabled", "true")]),
    );
    cluster.start_agents();
    wait_enrolled(&cluster, 0, 1);

    let workloads = debug(&cluster, 0, &["workloads"]);
    let row = workloads
        .lines()
        .find(|l| l.contains("web-1"))
        .unwrap_or_else(|| panic!("web-1 listed:\n{workloads}"));
    assert!(
        row.contains("node0") && row.contains(&web.ip.to_string()) && row.contains("true"),
        "{row}"
    );

    // The certificate of the enrolled pod, asked for at enrollment.
    let certs =
        mesh_tests::scenario::wait_until(Duration::from_secs(10), "a ready certificate", || {
            let out = debug(&cluster, 0, &["certs"]);
            out.contains("spiffe://cluster.local/ns/shop/sa/default")
                .then_some(out)
        });
    assert!(certs.contains("ready"), "{certs}");

    let json = debug(&cluster, 0, &["config", "-o", "json"]);
    let dump: serde_json::Value = serde_json::from_str(&json).expect("JSON config dump");
    assert_eq!(dump["node"], "node0");

    // The log level changes at run time: with `off`, a reload logs nothing; back to
    // `info`, it logs again.
    let reloads_logged = || {
        std::fs::read_to_string(cluster.agent_log(0))
            .expect("agent log")
            .matches("config loaded")
            .count()
    };
    let reload = |n: usize| {
        let loads = metric(&cluster, 0, "nodemesh_config_loads_total", &[]);
        cluster.write_config("extra.yaml", &namespace_yaml(&format!("extra-{n}"), &[]));
        wait_until(Duration::from_secs(10), "a reload", || {
            (metric(&cluster, 0, "nodemesh_config_loads_total", &[]) > loads).then_some(())
        });
    };
    assert!(debug(&cluster, 0, &["log", "off"]).contains("off"));
    let before = reloads_logged();
    reload(1);
    assert_eq!(reloads_logged(), before, "nothing logged with level off");
    debug(&cluster, 0, &["log", "info"]);
    reload(2);
    assert_eq!(reloads_logged(), before + 1, "logged again at info");

    // Loopback only: not from the node's own address, not from a pod.
    let admin_on_node_ip = SocketAddr::from((cluster.node_ip(0), 15000));
    let from_node = Cluster::run_in_netns(cluster.node_netns(0), move || {
        std::net::TcpStream::connect_timeout(&admin_on_node_ip, Duration::from_secs(2)).is_ok()
    });
    assert!(
        !from_node,
        "the admin API must not listen on the node's address"
    );
    let pod_netns = web.netns.clone();
    let from_pod = Cluster::run_in_netns(&pod_netns, || {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 15000));
        std::net::TcpStream::connect_timeout(&loopback, Duration::from_secs(2)).is_ok()
    });
    assert!(!from_pod, "the admin API must not be reachable from a pod");
}
