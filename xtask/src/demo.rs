//! `cargo xtask demo`: a small shop on a two-node cluster, showing what the mesh does and
//! where to see it. It checks what it shows, so it doubles as a smoke test.
//!
//! * `shop` (enrolled): `productpage` (node0) calls Service `reviews` (10.96.0.20:9080),
//!   backed by `reviews-v1` (node0) and `reviews-v2` (node1);
//! * `legacy` (not enrolled): `legacy-client` (node1) calls reviews-v1 directly (captured
//!   inbound, as reviews-v1 is enrolled) and the ClusterIP (unroutable without the mesh).
//! * L7: Service `reviews-http` (10.96.0.21:80, port named `http`) over the same pods, split
//!   80/20 between versions by Istio's own canary VirtualService and DestinationRule.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail};
use mesh_tests::{AGENT_METRICS_PORT, Cluster, Pod, PodProcess, PodSpec, scenario};
use serde_json::Value;

use crate::bench::{
    Counters, Interrupt, require_root,
    table::{Align, Table},
    wait_enrolled,
};

const REVIEWS_IP: &str = "10.96.0.20";
const REVIEWS_PORT: u16 = 9080;
const REVIEWS_HTTP_IP: &str = "10.96.0.21";
const HTTP_APP_PORT: u16 = 8080;
/// Requests of the L7 canary step, and the share of them v2 may get (80/20, with room for
/// chance: four standard deviations).
const CANARY_REQUESTS: u64 = 200;
const CANARY_V2_RANGE: std::ops::RangeInclusive<u64> = 17..=63;
const CANARY_YAML: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-http, namespace: shop}
spec:
  host: reviews-http
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-http, namespace: shop}
spec:
  hosts: [reviews-http]
  http:
  - route:
    - destination: {host: reviews-http, subset: v1}
      weight: 80
    - destination: {host: reviews-http, subset: v2}
      weight: 20
";
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// One line of the demo's table: who called what and what happened.
struct Row {
    client: String,
    target: String,
    attempted: u32,
    /// Backend name → replies.
    answered_by: BTreeMap<String, u32>,
    /// Source addresses the backends saw.
    peers: BTreeMap<Ipv4Addr, u32>,
    /// Why the client failed, if it did (mesh-testapp's short error kind).
    error: Option<String>,
    /// Connections the proxies opened for this row (all nodes).
    captured: Counters,
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    require_root("cargo xtask demo")?;
    println!("demo: checking prerequisites (cargo xtask setup)…");
    crate::setup::run()?;
    println!("demo: building mesh-node and mesh-testapp (debug)…");
    crate::build(false)?;
    if let Some(reason) = mesh_tests::skip_reason() {
        bail!("cannot build a test cluster on this machine: {reason}");
    }
    let interrupt = Interrupt::install()?;

    println!("demo: creating a 2-node cluster…");
    let mut cluster = Cluster::new("demo", 2);
    println!("demo: namespace shop (enrolled: nodemesh.io/enabled=true), namespace legacy (not)");
    cluster.write_config(
        "namespace-shop.yaml",
        &mesh_tests::namespace_yaml("shop", &[("nodemesh.io/enabled", "true")]),
    );
    cluster.write_config(
        "namespace-legacy.yaml",
        &mesh_tests::namespace_yaml("legacy", &[]),
    );
    println!(
        "demo: Service shop/reviews {REVIEWS_IP}:{REVIEWS_PORT} → pods app=reviews, port 9080"
    );
    cluster.write_config(
        "service-shop-reviews.yaml",
        &mesh_tests::service_yaml(
            "reviews",
            "shop",
            REVIEWS_IP,
            &[("tcp", REVIEWS_PORT, REVIEWS_PORT)],
            &[("app", "reviews")],
        ),
    );
    let productpage = cluster.add_pod(
        PodSpec::new("productpage", 0)
            .namespace("shop")
            .label("app", "productpage")
            .label("version", "v1"),
    );
    let reviews =
        [("reviews-v1", 0, "v1"), ("reviews-v2", 1, "v2")].map(|(name, node, version)| {
            cluster.add_pod(
                PodSpec::new(name, node)
                    .namespace("shop")
                    .label("app", "reviews")
                    .label("version", version),
            )
        });
    let legacy = cluster.add_pod(
        PodSpec::new("legacy-client", 1)
            .namespace("legacy")
            .label("app", "legacy-client"),
    );
    for pod in std::iter::once(&productpage)
        .chain(&reviews)
        .chain([&legacy])
    {
        println!(
            "demo: pod {}/{} on node{}, {}",
            pod.namespace, pod.name, pod.node, pod.ip
        );
    }

    println!("demo: starting a mesh-node agent on each node…");
    cluster.start_agents();
    // productpage and reviews-v1 on node0, reviews-v2 on node1; legacy-client is not.
    wait_enrolled(&cluster, &[2, 1])?;
    println!("demo: agents ready; node0 enrolled 2 pods, node1 enrolled 1");
    interrupt.check()?;

    println!("demo: starting the reviews backends (mesh-testapp serve on <pod ip>:9080)…");
    let backends: Vec<PodProcess> = reviews
        .iter()
        .map(|pod| {
            let listen = format!("{}:{REVIEWS_PORT}", pod.ip);
            let mut server = pod.spawn(
                &cluster,
                &["serve", "--listen", &listen, "--name", &pod.name],
            );
            server.wait_for_output("ready", SERVER_READY_TIMEOUT);
            server
        })
        .collect();

    let service = format!("{REVIEWS_IP}:{REVIEWS_PORT}");
    let direct = format!("{}:{REVIEWS_PORT}", reviews[0].ip);
    let plan = [
        (
            &productpage,
            format!("reviews {service}"),
            service.as_str(),
            20,
        ),
        (&legacy, format!("reviews-v1 {direct}"), direct.as_str(), 5),
        (&legacy, format!("reviews {service}"), service.as_str(), 1),
    ];
    let mut rows = Vec::new();
    for (client, target_name, to, count) in plan {
        interrupt.check()?;
        println!(
            "demo: {}/{} → {target_name}: {count} connection(s)…",
            client.namespace, client.name
        );
        rows.push(send(&cluster, client, target_name, to, count)?);
    }

    interrupt.check()?;
    let (canary, canary_servers) = l7_canary(&cluster, &productpage, &reviews)?;

    let names = pod_names(&cluster);
    println!();
    print_table(&rows, &names);
    println!();
    print_metrics(&cluster)?;
    let mut problems = check(&rows, &productpage, &legacy, &reviews);
    problems.extend(canary);

    for problem in &problems {
        println!("demo: PROBLEM: {problem}");
    }
    if keep {
        print_keep_help(&cluster, &productpage, &legacy);
        interrupt.wait();
        println!("\ndemo: Ctrl-C: stopping the agents and removing the cluster…");
    } else {
        println!("demo: removing the cluster…");
    }
    drop(backends);
    drop(canary_servers);
    let logs = cluster.logs_dir();
    drop(cluster);
    if !problems.is_empty() {
        bail!(
            "the mesh did not behave as the demo expects:\n  - {}\n(set NODEMESH_KEEP=1 to keep \
             the agent logs, in {})",
            problems.join("\n  - "),
            logs.display()
        );
    }
    println!("demo: done, nothing left behind");
    Ok(())
}

/// The L7 step: HTTP backends on the reviews pods, Istio's 80/20 canary YAML, and
/// `CANARY_REQUESTS` requests from productpage. Returns what went wrong, if anything, and
/// the servers (stopped when dropped).
fn l7_canary(
    cluster: &Cluster,
    productpage: &Pod,
    reviews: &[Pod; 2],
) -> anyhow::Result<(Vec<String>, Vec<PodProcess>)> {
    println!(
        "demo: L7: Service shop/reviews-http {REVIEWS_HTTP_IP}:80 (port named http) → \
         mesh-testapp http-serve on :{HTTP_APP_PORT}, VirtualService 80/20 v1/v2…"
    );
    cluster.write_config(
        "service-shop-reviews-http.yaml",
        &mesh_tests::service_yaml(
            "reviews-http",
            "shop",
            REVIEWS_HTTP_IP,
            &[("http", 80, HTTP_APP_PORT)],
            &[("app", "reviews")],
        ),
    );
    cluster.write_config("canary-shop-reviews-http.yaml", CANARY_YAML);
    let servers: Vec<PodProcess> = reviews
        .iter()
        .map(|pod| {
            let listen = format!("{}:{HTTP_APP_PORT}", pod.ip);
            let mut server = pod.spawn(
                cluster,
                &["http-serve", "--listen", &listen, "--name", &pod.name],
            );
            server.wait_for_output("ready", SERVER_READY_TIMEOUT);
            server
        })
        .collect();
    // The agents re-read the config within half a second.
    std::thread::sleep(Duration::from_secs(2));
    let url = format!("http://{REVIEWS_HTTP_IP}/reviews");
    let count = CANARY_REQUESTS.to_string();
    let output = productpage.run(
        cluster,
        &[
            "http",
            "--url",
            &url,
            "--count",
            &count,
            "--concurrency",
            "4",
            "--summary",
        ],
        Duration::from_secs(60),
    );
    let summary: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "mesh-testapp http: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let served = |name: &str| summary["served_by"][name].as_u64().unwrap_or(0);
    let ok = summary["status"]["200"].as_u64().unwrap_or(0);
    println!(
        "demo: L7 canary: {ok}/{CANARY_REQUESTS} answered 200; reviews-v1 {}, reviews-v2 {}",
        served("reviews-v1"),
        served("reviews-v2")
    );
    let mut problems = Vec::new();
    if ok != CANARY_REQUESTS {
        problems.push(format!(
            "L7 canary: only {ok} of {CANARY_REQUESTS} requests answered 200: {summary}"
        ));
    }
    if !CANARY_V2_RANGE.contains(&served("reviews-v2")) {
        problems.push(format!(
            "L7 canary: reviews-v2 got {} of {CANARY_REQUESTS}, expected about 20%",
            served("reviews-v2")
        ));
    }
    Ok((problems, servers))
}

/// `count` connections from `client` to `to`, each sending one line; reads the replies
/// and what the proxies counted meanwhile.
fn send(
    cluster: &Cluster,
    client: &Pod,
    target: String,
    to: &str,
    count: u32,
) -> anyhow::Result<Row> {
    let before = Counters::read(cluster);
    let output = scenario::connect(cluster, client, to, count as usize);
    let captured = Counters::read(cluster).since(&before);
    let mut row = Row {
        client: format!("{}/{}", client.namespace, client.name),
        target,
        attempted: count,
        answered_by: BTreeMap::new(),
        peers: BTreeMap::new(),
        error: None,
        captured,
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let reply: Value =
            serde_json::from_str(line).with_context(|| format!("reply {line:?} is not JSON"))?;
        let server = reply["server"].as_str().context("reply without server")?;
        let peer: std::net::SocketAddr = reply["peer"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .context("reply without a peer address")?;
        *row.answered_by.entry(server.to_owned()).or_default() += 1;
        if let std::net::IpAddr::V4(ip) = peer.ip() {
            *row.peers.entry(ip).or_default() += 1;
        }
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        // "mesh-testapp connect: connection 1 of 1 to …: connect: network unreachable: …"
        let kind = [
            "network unreachable",
            "no route to host",
            "connection refused",
            "timed out",
            "connection reset",
            "connection closed",
        ]
        .into_iter()
        .find(|kind| stderr.contains(kind))
        .unwrap_or("error");
        row.error = Some(format!("{kind} ({})", stderr.trim()));
    }
    Ok(row)
}

fn pod_names(cluster: &Cluster) -> BTreeMap<Ipv4Addr, String> {
    cluster
        .pods()
        .iter()
        .map(|p| (p.ip, p.name.clone()))
        .collect()
}

fn print_table(rows: &[Row], names: &BTreeMap<Ipv4Addr, String>) {
    println!("what happened:");
    let mut table = Table::new(&[
        ("client → target", Align::Left),
        ("connections", Align::Right),
        ("answered by", Align::Left),
        ("source IP the backend saw", Align::Left),
        ("captured by the mesh", Align::Left),
    ]);
    for row in rows {
        let made: u32 = row.answered_by.values().sum();
        let answered = if row.answered_by.is_empty() {
            "—".to_owned()
        } else {
            row.answered_by
                .iter()
                .map(|(name, n)| format!("{name} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let peers = if row.peers.is_empty() {
            "—".to_owned()
        } else {
            row.peers
                .keys()
                .map(|ip| match names.get(ip) {
                    Some(name) => format!("{ip} ({name})"),
                    None => ip.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let source: f64 = row.captured.source.iter().sum();
        let destination: f64 = row.captured.destination.iter().sum();
        let captured = match (source > 0.0, destination > 0.0, &row.error) {
            (true, true, _) => format!("yes, by both node proxies ({source} / {destination})"),
            (false, true, _) => format!("yes, inbound: server's node proxy ({destination})"),
            (true, false, _) => format!("outbound only: client's node proxy ({source})"),
            (false, false, Some(error)) => format!(
                "not captured: {}",
                error.split(" (").next().unwrap_or(error)
            ),
            (false, false, None) => "not captured".to_owned(),
        };
        table.row(vec![
            format!("{} → {}", row.client, row.target),
            format!("{made}/{}", row.attempted),
            answered,
            peers,
            captured,
        ]);
    }
    print!("{}", table.render(2));
    println!(
        "  (captured: connections opened by the client's / server's node proxy, from \
         istio_tcp_connections_opened_total{{reporter=\"source\" / \"destination\"}})"
    );
}

/// Where the metrics are, and the lines that matter, abridged.
fn print_metrics(cluster: &Cluster) -> anyhow::Result<()> {
    println!(
        "where the metrics are: each agent serves Prometheus metrics on port \
         {AGENT_METRICS_PORT} in its node's netns:"
    );
    for i in 0..cluster.nodes() {
        println!(
            "  ip netns exec {} curl -s localhost:{AGENT_METRICS_PORT}/metrics | grep istio_",
            cluster.node_netns(i)
        );
    }
    println!("key lines now (labels abridged; the full set is Istio's standard one):");
    const KEPT: &[&str] = &[
        "reporter",
        "source_workload",
        "destination_workload",
        "destination_service",
        "destination_version",
        "response_code",
        "direction",
    ];
    for i in 0..cluster.nodes() {
        println!("  node{i}:");
        for sample in mesh_tests::parse_samples(&cluster.metrics(i)) {
            if !matches!(
                sample.name.as_str(),
                "istio_tcp_connections_opened_total"
                    | "istio_requests_total"
                    | "nodemesh_enrolled_pods"
                    | "nodemesh_captured_connections_total"
            ) {
                continue;
            }
            let labels: Vec<String> = sample
                .labels
                .iter()
                .filter(|(k, _)| KEPT.contains(&k.as_str()))
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            let labels = if labels.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", labels.join(","))
            };
            println!("    {}{labels} {}", sample.name, sample.value);
        }
    }
    println!();
    Ok(())
}

/// What should have happened; each miss is a line of the error.
fn check(rows: &[Row], productpage: &Pod, legacy: &Pod, reviews: &[Pod; 2]) -> Vec<String> {
    let mut problems = Vec::new();
    let [via_service, direct, unrouted] = rows else {
        return vec!["the demo sent traffic for an unexpected number of rows".into()];
    };
    let source = |row: &Row| row.captured.source.iter().sum::<f64>();
    let destination = |row: &Row| row.captured.destination.iter().sum::<f64>();

    // productpage → Service: spread over both backends, client IP kept, both proxies.
    let made: u32 = via_service.answered_by.values().sum();
    if let Some(error) = &via_service.error {
        problems.push(format!("productpage → reviews failed: {error}"));
    }
    if made != via_service.attempted {
        problems.push(format!(
            "productpage → reviews: {made} of {} connections answered",
            via_service.attempted
        ));
    }
    for backend in reviews {
        if !via_service.answered_by.contains_key(&backend.name) {
            problems.push(format!(
                "{} got no traffic through Service reviews",
                backend.name
            ));
        }
    }
    if via_service.peers.keys().any(|ip| *ip != productpage.ip) {
        problems.push(format!(
            "the reviews backends saw {:?}, not productpage's own address {} (client IP not \
             preserved)",
            via_service.peers.keys().collect::<Vec<_>>(),
            productpage.ip
        ));
    }
    if source(via_service) < f64::from(made) || destination(via_service) < f64::from(made) {
        problems.push(format!(
            "productpage → reviews: the proxies opened {} (source) / {} (destination) \
             connections for {made} made",
            source(via_service),
            destination(via_service)
        ));
    }

    // legacy-client → reviews-v1 directly: captured inbound only, client IP kept.
    let made: u32 = direct.answered_by.values().sum();
    if let Some(error) = &direct.error {
        problems.push(format!("legacy-client → reviews-v1 failed: {error}"));
    }
    if made != direct.attempted
        || direct
            .answered_by
            .keys()
            .any(|name| *name != reviews[0].name)
    {
        problems.push(format!(
            "legacy-client → reviews-v1: answered by {:?}",
            direct.answered_by
        ));
    }
    if direct.peers.keys().any(|ip| *ip != legacy.ip) {
        problems.push(format!(
            "reviews-v1 saw {:?}, not legacy-client's address {}",
            direct.peers.keys().collect::<Vec<_>>(),
            legacy.ip
        ));
    }
    if source(direct) != 0.0 || destination(direct) < f64::from(made) {
        problems.push(format!(
            "legacy-client → reviews-v1: expected only the destination proxy to see it, got \
             {} (source) / {} (destination)",
            source(direct),
            destination(direct)
        ));
    }

    // legacy-client → ClusterIP: nothing routes it without the mesh.
    match &unrouted.error {
        Some(error) if error.starts_with("network unreachable") => {}
        Some(error) => problems.push(format!(
            "legacy-client → the ClusterIP failed, but not as unreachable: {error}"
        )),
        None => problems.push("legacy-client reached the ClusterIP without the mesh".into()),
    }
    if source(unrouted) + destination(unrouted) != 0.0 {
        problems.push("legacy-client → the ClusterIP was counted by a proxy".into());
    }
    problems
}

fn print_keep_help(cluster: &Cluster, productpage: &Pod, legacy: &Pod) {
    println!("the cluster stays up (--keep); press Ctrl-C to stop the agents and remove it.");
    println!("  network namespaces (ip netns list):");
    println!("    fabric (bridge br0):  {}", cluster.fabric_netns());
    for i in 0..cluster.nodes() {
        println!("    node{i} (agent):        {}", cluster.node_netns(i));
    }
    for pod in cluster.pods() {
        println!(
            "    pod {:<22} {} ({})",
            format!("{}/{}:", pod.namespace, pod.name),
            pod.netns,
            pod.ip
        );
    }
    for i in 0..cluster.nodes() {
        println!("  node{i} cgroup:   {}", cluster.node_cgroup(i).display());
    }
    println!(
        "  config dir:     {}  (Kubernetes YAML the agents watch; edit it live)",
        cluster.config_dir().display()
    );
    println!("  logs:           {}", cluster.logs_dir().display());
    for i in 0..cluster.nodes() {
        println!(
            "  node{i} agent:    pid {}, log {}",
            cluster.agent_pid(i).unwrap_or(0),
            cluster.agent_log(i).display()
        );
    }
    let testapp = mesh_tests::bin_path("mesh-testapp");
    println!("how to poke at it:");
    println!(
        "  A process is captured only if it runs in the pod's netns AND in its node's cgroup \
         (the agent's eBPF programs hang off the cgroup). Join the cgroup first, then the netns \
         (`ip netns exec` remounts /sys, which hides the cgroup2 mount; nsenter does not):"
    );
    println!(
        "    sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net=/var/run/netns/{} {} \
         connect --to {REVIEWS_IP}:{REVIEWS_PORT} --count 5'",
        cluster.node_cgroup(productpage.node).display(),
        productpage.netns,
        testapp.display()
    );
    println!(
        "  Without the cgroup, the same call from productpage's netns is not captured \
         (network unreachable):"
    );
    println!(
        "    ip netns exec {} {} connect --to {REVIEWS_IP}:{REVIEWS_PORT}",
        productpage.netns,
        testapp.display()
    );
    println!(
        "  legacy-client is not enrolled, so no cgroup needed: its call to reviews-v1 is \
         captured inbound, on reviews-v1's node:"
    );
    println!(
        "    ip netns exec {} {} connect --to {}:{REVIEWS_PORT} --count 2",
        legacy.netns,
        testapp.display(),
        cluster.pod("reviews-v1").ip
    );
    println!(
        "  Metrics: ip netns exec {} curl -s localhost:{AGENT_METRICS_PORT}/metrics \
         | grep -E 'istio_tcp|nodemesh_'",
        cluster.node_netns(0)
    );
    println!("  Agent log: tail -f {}", cluster.agent_log(0).display());
}
