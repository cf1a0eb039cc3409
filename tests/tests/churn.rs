//! End to end: pods and Services coming and going leave the agents as they were: memory,
//! eBPF maps, certificates and tunnels stay flat.
use std::time::Duration;

use mesh_tests::{
    Cluster, PodSpec, metric_value, namespace_yaml, rss_bytes,
    scenario::{ENROLLED, connect, replies, skip, wait_enrolled, wait_for_metric, wait_until},
    service_yaml,
};

/// About two minutes of churn: long enough for the agent to forget the metric series of
/// departed workloads (after a minute) while new ones keep coming.
const ROUNDS: usize = 90;

/// Entries of every eBPF map on node `i`, as the agent last counted them.
fn map_entries(cluster: &Cluster, i: usize) -> f64 {
    ["ENROLLED_NETNS", "INBOUND_LISTENERS"]
        .iter()
        .map(|map| {
            metric_value(
                &cluster.metrics(i),
                "nodemesh_bpf_map_entries",
                &[("map", map)],
            )
            .unwrap_or(0.0)
        })
        .sum()
}

#[test]
fn pods_and_services_coming_and_going_leave_the_agents_flat() {
    if skip() {
        return;
    }
    let mut cluster = Cluster::new("churn", 2);
    let web = cluster.add_pod(PodSpec::new("web", 1).namespace("shop").label("app", "web"));
    cluster.write_config("ns.yaml", &namespace_yaml("shop", ENROLLED));
    let listen = format!("{}:8080", web.ip);
    let mut server = web.spawn(&cluster, &["serve", "--listen", &listen, "--name", "web"]);
    server.wait_for_output("ready", Duration::from_secs(10));
    cluster.start_agents();
    wait_enrolled(&cluster, 1, 1);
    let pid = cluster.agent_pid(0).expect("node0's agent");
    let mut rss = Vec::new();
    for round in 0..ROUNDS {
        // A client with an identity of its own and a Service of its own, used, then gone.
        let name = format!("client-{round}");
        let client = cluster.add_pod(
            PodSpec::new(&name, 0)
                .namespace("shop")
                .service_account(&name),
        );
        let service_ip = format!("10.96.1.{}", round + 1);
        cluster.write_config(
            "svc.yaml",
            &service_yaml(
                &name,
                "shop",
                &service_ip,
                &[("tcp", 80, 8080)],
                &[("app", "web")],
            ),
        );
        wait_enrolled(&cluster, 0, 1);
        wait_until(
            Duration::from_secs(20),
            "the new Service to be routed",
            || {
                connect(&cluster, &client, &format!("{service_ip}:80"), 1)
                    .status
                    .success()
                    .then_some(())
            },
        );
        replies(&connect(&cluster, &client, &listen, 3));
        cluster.remove_pod(&name);
        cluster.remove_config("svc.yaml");
        wait_enrolled(&cluster, 0, 0);
        wait_for_metric(&cluster, 0, "nodemesh_hbone_pooled_tunnels", &[], 0.0);
        // The agent counts its maps every few seconds; node0 has no pod in the mesh now.
        wait_until(
            Duration::from_secs(20),
            "node0's eBPF maps to empty",
            || (map_entries(&cluster, 0) == 0.0).then_some(()),
        );
        rss.push(rss_bytes(pid) / 1024);
    }
    let (_, certs) = cluster.http_get(0, 15000, "/certs");
    assert_eq!(
        certs.trim(),
        "[]",
        "no certificate outlives its pods: {certs}"
    );
    // The first rounds warm the allocator and the runtime up, and fill the minute during
    // which departed workloads keep their series; after that, flat.
    let (warm, last) = (rss[2 * ROUNDS / 3], rss[ROUNDS - 1]);
    eprintln!("node0 RSS over {ROUNDS} rounds (KiB): {rss:?}");
    assert!(
        last <= warm + 1024,
        "node0's agent grew from {warm} KiB to {last} KiB over {} rounds of churn",
        ROUNDS - 1 - 2 * ROUNDS / 3
    );
}
