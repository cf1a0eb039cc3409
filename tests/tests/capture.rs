//! End to end on the netns cluster: eBPF capture, enrollment and the L4 proxy.
use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use mesh_tests::{
    Cluster, Pod, PodProcess, PodSpec, namespace_yaml,
    scenario::{
        CONNECT_TIMEOUT, CONVERGE_TIMEOUT, SHOP_SERVICE_IP, addr_field, connect, metric, replies,
        skip, wait_enrolled, wait_for_metric, wait_until, write_shop,
    },
    service_yaml,
};

const SERVICE_IP: &str = SHOP_SERVICE_IP;
const SERVICE_IP6: &str = "fd00:10:96::10";
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `mesh-testapp serve` on the pod's addresses, port 8080.
fn serve(cluster: &Cluster, pod: &Pod) -> PodProcess {
    let v4 = format!("{}:8080", pod.ip);
    let mut args = vec!["serve", "--listen", &v4, "--name", &pod.name];
    let v6 = pod.ip6.map(|ip| format!("[{ip}]:8080"));
    if let Some(v6) = &v6 {
        args.extend(["--listen", v6]);
    }
    let mut process = pod.spawn(cluster, &args);
    process.wait_for_output("ready", READY_TIMEOUT);
    process
}

/// Counts replies per answering server.
fn by_server(replies: &[serde_json::Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for reply in replies {
        *counts
            .entry(reply["server"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    counts
}

/// The usual scene: a client pod and `web-N` backends (label app=web, serving on 8080) in
/// namespace `shop`, with Service `web`; agents not started yet.
struct Shop {
    cluster: Cluster,
    client: Pod,
    webs: Vec<Pod>,
    servers: Vec<PodProcess>,
}

impl Shop {
    /// `client` is placed as given (namespace `shop` unless set); one backend per entry of
    /// `web_nodes`, dual-stack when the client is.
    fn new(test: &str, nodes: usize, client: PodSpec, web_nodes: &[usize], enrolled: bool) -> Self {
        let mut cluster = Cluster::new(test, nodes);
        let ipv6 = client.ipv6;
        let client = cluster.add_pod(if client.namespace == "default" {
            client.namespace("shop")
        } else {
            client
        });
        let webs: Vec<Pod> = web_nodes
            .iter()
            .enumerate()
            .map(|(k, node)| {
                cluster.add_pod(
                    PodSpec::new(&format!("web-{}", k + 1), *node)
                        .namespace("shop")
                        .label("app", "web")
                        .ipv6(ipv6),
                )
            })
            .collect();
        write_shop(&cluster, enrolled);
        let servers = webs.iter().map(|web| serve(&cluster, web)).collect();
        Self {
            cluster,
            client,
            webs,
            servers,
        }
    }

    /// Starts the agents and waits until node i has `enrolled[i]` pods.
    fn start(&mut self, enrolled: &[usize]) {
        self.cluster.start_agents();
        for (node, count) in enrolled.iter().enumerate() {
            wait_enrolled(&self.cluster, node, *count);
        }
    }
}

fn assert_unreachable(cluster: &Cluster, client: &Pod, to: &str, why: &str) {
    let output = connect(cluster, client, to, 1);
    assert!(
        !output.status.success(),
        "{why}: expected {to} to be unreachable from {}, got {:?}",
        client.name,
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn enrolled_pod_reaches_a_service_and_the_backend_sees_its_ip() {
    if skip() {
        return;
    }
    let mut shop = Shop::new("svc_rr", 2, PodSpec::new("client", 0), &[0, 1], true);
    shop.start(&[2, 1]);
    let Shop {
        cluster, client, ..
    } = &shop;

    let replies = replies(&connect(cluster, client, &format!("{SERVICE_IP}:80"), 10));
    assert_eq!(
        by_server(&replies),
        BTreeMap::from([("web-1".into(), 5), ("web-2".into(), 5)]),
        "round robin over both replicas, on both nodes"
    );
    for reply in &replies {
        assert_eq!(
            addr_field(reply, "peer").ip(),
            IpAddr::from(client.ip),
            "the backend sees the client pod's IP: {reply}"
        );
        assert_eq!(addr_field(reply, "local").port(), 8080, "port → targetPort");
    }
    // The proxy's own sockets (tunnels from the client's netns, transparent dials to
    // web-1's app) went through the connect hook, since the agent runs in the node cgroup,
    // and were let through by their mark: exactly the client's 10 connects were redirected.
    let bpf = |event| [("event", event)];
    wait_for_metric(
        cluster,
        0,
        "nodemesh_bpf_events",
        &bpf("outbound_redirected"),
        10.0,
    );
    wait_until(CONVERGE_TIMEOUT, "proxy sockets seen by the hook", || {
        let bypassed = metric(
            cluster,
            0,
            "nodemesh_bpf_events",
            &bpf("outbound_proxy_bypass"),
        );
        // 5 dials to web-1's app, at least one tunnel to each backend pod.
        (bypassed >= 7.0).then_some(())
    });
}

#[test]
fn a_pod_in_a_namespace_that_is_not_enrolled_is_not_captured() {
    if skip() {
        return;
    }
    let mut shop = Shop::new("not_enrolled", 2, PodSpec::new("client", 0), &[1], false);
    shop.start(&[0, 0]);
    let Shop {
        cluster,
        client,
        webs,
        ..
    } = &shop;

    let to = format!("{}:8080", webs[0].ip);
    let replies = replies(&connect(cluster, client, &to, 3));
    assert!(
        replies
            .iter()
            .all(|r| addr_field(r, "local").to_string() == to)
    );
    // Only the mesh can route a ClusterIP: without capture the connect fails.
    assert_unreachable(cluster, client, &format!("{SERVICE_IP}:80"), "not enrolled");
    for node in 0..2 {
        assert_eq!(
            metric(cluster, node, "nodemesh_captured_connections_total", &[]),
            0.0
        );
        assert_eq!(
            metric(cluster, node, "istio_tcp_connections_opened_total", &[]),
            0.0
        );
    }
}

#[test]
fn labels_enroll_and_unenroll_running_pods_and_opt_out_is_respected() {
    if skip() {
        return;
    }
    let mut shop = Shop::new("enroll_labels", 2, PodSpec::new("client", 0), &[1], false);
    let opted_out = shop.cluster.add_pod(
        PodSpec::new("batch", 0)
            .namespace("shop")
            .label("nodemesh.io/enabled", "false"),
    );
    shop.start(&[0, 0]);
    let Shop {
        cluster,
        client,
        webs,
        servers,
    } = &mut shop;
    let service = format!("{SERVICE_IP}:80");
    assert_unreachable(cluster, client, &service, "before the label");

    write_shop(cluster, true);
    wait_enrolled(cluster, 0, 1); // the client, not the opted-out pod
    wait_enrolled(cluster, 1, 1);
    let enrolled = replies(&connect(cluster, client, &service, 2));
    assert_eq!(by_server(&enrolled), BTreeMap::from([("web-1".into(), 2)]));
    assert_unreachable(cluster, &opted_out, &service, "opted out");

    write_shop(cluster, false);
    wait_enrolled(cluster, 0, 0);
    wait_enrolled(cluster, 1, 0);
    assert_unreachable(cluster, client, &service, "after the label was removed");
    // Nobody restarted: the same server process served throughout.
    assert!(servers[0].try_wait().is_none(), "the app must keep running");
    let after = replies(&connect(
        cluster,
        client,
        &format!("{}:8080", webs[0].ip),
        1,
    ));
    assert_eq!(addr_field(&after[0], "peer").ip(), IpAddr::from(client.ip));
}

#[test]
fn inbound_from_a_non_mesh_client_is_captured_and_reaches_the_app_on_its_port() {
    if skip() {
        return;
    }
    let outsider = PodSpec::new("outsider", 0).namespace("plain");
    let mut shop = Shop::new("inbound", 2, outsider, &[1], true);
    shop.cluster
        .write_config("ns-plain.yaml", &namespace_yaml("plain", &[]));
    shop.start(&[0, 1]);
    let Shop {
        cluster,
        client: outsider,
        webs,
        ..
    } = &shop;

    let to = format!("{}:8080", webs[0].ip);
    for reply in &replies(&connect(cluster, outsider, &to, 3)) {
        assert_eq!(
            addr_field(reply, "local").to_string(),
            to,
            "original port kept"
        );
        assert_eq!(
            addr_field(reply, "peer").ip(),
            IpAddr::from(outsider.ip),
            "client IP kept"
        );
    }
    let destination = [
        ("reporter", "destination"),
        ("destination_workload", "web-1"),
    ];
    wait_for_metric(
        cluster,
        1,
        "istio_tcp_connections_opened_total",
        &destination,
        3.0,
    );
    let inbound = [("direction", "inbound")];
    wait_for_metric(
        cluster,
        1,
        "nodemesh_captured_connections_total",
        &inbound,
        3.0,
    );
}

#[test]
fn ipv6_service_and_pod_addresses_work_like_ipv4() {
    if skip() {
        return;
    }
    let client = PodSpec::new("client", 0).ipv6(true);
    let mut shop = Shop::new("ipv6", 2, client, &[1], true);
    let dual_stack = service_yaml(
        "web",
        "shop",
        SERVICE_IP,
        &[("tcp", 80, 8080)],
        &[("app", "web")],
    )
    .replace(
        &format!("- {SERVICE_IP}\n"),
        &format!("- {SERVICE_IP}\n  - \"{SERVICE_IP6}\"\n"),
    );
    assert!(
        dual_stack.contains(SERVICE_IP6),
        "clusterIPs list in:\n{dual_stack}"
    );
    shop.cluster.write_config("svc-web.yaml", &dual_stack);
    shop.start(&[1, 1]);
    let Shop {
        cluster,
        client,
        webs,
        ..
    } = &shop;
    let client_ip6 = IpAddr::from(client.ip6.expect("dual-stack client"));
    let web_ip6 = webs[0].ip6.expect("dual-stack server");

    let via_service = replies(&connect(cluster, client, &format!("[{SERVICE_IP6}]:80"), 2));
    let direct = replies(&connect(cluster, client, &format!("[{web_ip6}]:8080"), 2));
    for reply in via_service.iter().chain(&direct) {
        assert_eq!(addr_field(reply, "peer").ip(), client_ip6, "{reply}");
        assert_eq!(
            addr_field(reply, "local").ip(),
            IpAddr::from(web_ip6),
            "{reply}"
        );
    }
    let source = [("reporter", "source")];
    wait_for_metric(
        cluster,
        0,
        "istio_tcp_connections_opened_total",
        &source,
        4.0,
    );
}

#[test]
fn a_dual_stack_socket_to_an_ipv4_address_is_captured_in_an_ipv4_only_pod() {
    if skip() {
        return;
    }
    let mut shop = Shop::new("v4mapped", 2, PodSpec::new("client", 0), &[1], true);
    shop.start(&[1, 1]);
    let Shop {
        cluster, client, ..
    } = &shop;
    // An AF_INET6 socket (not v6-only, as Java opens them) connecting to ::ffff:<IPv4>: the
    // pod has no IPv6 at all, so no [::1] listener either.
    let mapped = format!("[::ffff:{SERVICE_IP}]:80");
    let replies = replies(&connect(cluster, client, &mapped, 2));
    for reply in &replies {
        assert_eq!(reply["server"], "web-1", "{reply}");
        assert_eq!(
            addr_field(reply, "peer").ip(),
            IpAddr::from(client.ip),
            "the backend sees the client's IPv4 address: {reply}"
        );
    }
    let captured = [("event", "outbound_redirected")];
    wait_for_metric(cluster, 0, "nodemesh_bpf_events", &captured, 2.0);
}

#[test]
fn unenrolling_a_pod_keeps_the_listener_of_a_new_pod_that_took_its_address() {
    use mesh_node::{
        ebpf::{Capture, Pins},
        netns::Netns,
    };
    if skip() {
        return;
    }
    let mut cluster = Cluster::new("ip_reuse", 1);
    let (old, new) = (
        cluster.add_pod(PodSpec::new("old", 0)),
        cluster.add_pod(PodSpec::new("new", 0)),
    );
    // The test drives the agent's capture itself, on the node's cgroup (never the root's).
    let pins = Pins::open(&cluster.bpffs_path(0)).expect("a bpffs in the work dir");
    let capture = Capture::attach(&cluster.node_cgroup(0), pins, true).expect("eBPF capture");
    let listener = |pod: &Pod| {
        Cluster::run_in_netns(&pod.netns, || std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a listener in the pod")
    };
    let (old_listener, new_listener) = (listener(&old), listener(&new));
    let reused = IpAddr::from(old.ip);
    let netns = |pod: &Pod| Netns::open(&pod.netns_path()).expect("pod netns");
    let (old_cookie, new_cookie) = (1, 2);
    capture
        .enroll(old_cookie, netns(&old), &[(reused, &old_listener)])
        .expect("enroll the old pod");
    // The old pod's address is given to the new pod before the old one is un-enrolled.
    capture
        .enroll(new_cookie, netns(&new), &[(reused, &new_listener)])
        .expect("enroll the new pod");
    capture.unenroll(old_cookie, &[reused]);
    let listeners = |capture: &Capture| {
        capture
            .map_fill()
            .into_iter()
            .find(|fill| fill.map == "INBOUND_LISTENERS")
            .expect("the listener map")
            .entries
    };
    assert_eq!(
        listeners(&capture),
        1,
        "the new pod's inbound listener must survive the old pod's un-enrollment"
    );

    // The new pod is enrolled, but not at its own address: a connection to that address
    // finds no listener and is refused, never delivered to the app past the proxy.
    let own = std::net::SocketAddr::from((new.ip, 9000));
    let app = Cluster::run_in_netns(&new.netns, || std::net::TcpListener::bind(own))
        .expect("an app in the new pod");
    let reached = Cluster::run_in_netns(&old.netns, || {
        std::net::TcpStream::connect_timeout(&own, Duration::from_secs(2))
    });
    assert!(
        reached.is_err(),
        "delivered to the app uncaptured: {reached:?}"
    );
    assert!(capture.counters().inbound_no_listener >= 1);
    drop(app);
    capture.unenroll(new_cookie, &[reused]);
    assert_eq!(listeners(&capture), 0, "and go with its own");
}

#[test]
fn a_broken_file_or_resource_is_rejected_alone_and_the_rest_applies() {
    if skip() {
        return;
    }
    let mut shop = Shop::new("bad_config", 2, PodSpec::new("client", 0), &[1], true);
    shop.start(&[1, 1]);
    let Shop {
        cluster, client, ..
    } = &shop;

    cluster.write_config(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [oops\n",
    );
    // The existing Service turns invalid: its last good version must stay in force.
    let bad_ip = service_yaml(
        "web",
        "shop",
        "10.96.0.300",
        &[("tcp-web", 80, 8080)],
        &[("app", "web")],
    );
    cluster.write_config("svc-web.yaml", &bad_ip);
    // A new, valid Service in the same change applies.
    let api = service_yaml(
        "api",
        "shop",
        "10.96.0.11",
        &[("tcp", 81, 8080)],
        &[("app", "web")],
    );
    cluster.write_config("svc-api.yaml", &api);
    wait_for_metric(cluster, 0, "nodemesh_config_rejected_resources", &[], 2.0);
    let log = std::fs::read_to_string(cluster.agent_log(0)).expect("agent log");
    assert!(
        log.lines()
            .any(|l| l.contains("broken.yaml") && l.contains("rejected")),
        "the log names the broken file"
    );
    assert!(
        log.lines().any(|l| l.contains("svc-web.yaml")
            && l.contains("Service shop/web")
            && l.contains("10.96.0.300")),
        "the log names the file, the resource and the bad value"
    );
    for to in [format!("{SERVICE_IP}:80"), "10.96.0.11:81".to_string()] {
        let replies = replies(&connect(cluster, client, &to, 1));
        assert_eq!(replies[0]["server"], "web-1", "{to} still routes");
    }
}

#[test]
fn metrics_count_exactly_the_connections_made() {
    if skip() {
        return;
    }
    const N: usize = 7;
    let client = PodSpec::new("client", 0).label("app", "shop-ui");
    let mut shop = Shop::new("tcp_metrics", 2, client, &[1], true);
    shop.start(&[1, 1]);
    let Shop {
        cluster, client, ..
    } = &shop;

    let replies = replies(&connect(cluster, client, &format!("{SERVICE_IP}:80"), N));
    assert_eq!(replies.len(), N);
    let n = N as f64;
    let source = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("source_app", "shop-ui"),
        ("destination_workload", "web-1"),
        ("destination_workload_namespace", "shop"),
        ("destination_service", "web.shop.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/default",
        ),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/shop/sa/default",
        ),
    ];
    let destination = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("destination_workload", "web-1"),
        ("destination_service", "web.shop.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/default",
        ),
    ];
    // "hello\n" up, one JSON line per connection down.
    let down: usize = replies.iter().map(|r| r.to_string().len() + 1).sum();
    for (node, labels) in [(0, &source[..]), (1, &destination[..])] {
        wait_for_metric(
            cluster,
            node,
            "istio_tcp_connections_opened_total",
            labels,
            n,
        );
        wait_for_metric(
            cluster,
            node,
            "istio_tcp_connections_closed_total",
            labels,
            n,
        );
        wait_for_metric(
            cluster,
            node,
            "istio_tcp_received_bytes_total",
            labels,
            n * 6.0,
        );
        wait_for_metric(
            cluster,
            node,
            "istio_tcp_sent_bytes_total",
            labels,
            down as f64,
        );
    }
}

/// A 100 KB line whose every 8 bytes number themselves, so a byte lost, repeated or moved
/// shows in its echo.
fn numbered_line() -> String {
    (0..12_500).map(|i| format!("{i:07}.")).collect()
}

/// `connections` connections from `client` to `to`, each exchanging three long lines, every
/// echo checked byte for byte; panics on any difference.
fn exchange_long_lines(cluster: &Cluster, client: &Pod, to: &str, connections: usize) {
    let line = numbered_line();
    let output = client.run(
        cluster,
        &[
            "connect",
            "--to",
            to,
            "--count",
            &connections.to_string(),
            "--lines",
            "3",
            "--message",
            &line,
            "--timeout-ms",
            "10000",
        ],
        CONNECT_TIMEOUT,
    );
    let replies = replies(&output);
    assert_eq!(replies.len(), connections * 3, "one echo per line to {to}");
    for reply in &replies {
        assert!(
            reply["echo"].as_str() == Some(line.as_str()),
            "the echo from {to} differs from the line sent ({} bytes back)",
            reply["echo"].as_str().map_or(0, str::len)
        );
    }
}

/// With web-1 on the client's node and web-2 on the other, and `outside` on the other node
/// in a namespace outside the mesh: starts the agents (node 0's with `node0_args`), then
/// exchanges long lines over `hbone` connections to the Service (mutual TLS, both backends)
/// and `relayed` connections to `outside` (a plaintext relay).
fn long_lines_through_both_paths(
    test: &str,
    node0_args: &[&str],
    hbone: usize,
    relayed: usize,
) -> Shop {
    let mut shop = Shop::new(test, 2, PodSpec::new("client", 0), &[0, 1], true);
    let outside = shop
        .cluster
        .add_pod(PodSpec::new("outside", 1).namespace("outside"));
    shop.cluster
        .write_config("ns-outside.yaml", &namespace_yaml("outside", &[]));
    let _server = serve(&shop.cluster, &outside);
    shop.cluster.start_agent(0, node0_args);
    shop.cluster.start_agent(1, &[]);
    wait_enrolled(&shop.cluster, 0, 2);
    wait_enrolled(&shop.cluster, 1, 1);
    let (cluster, client) = (&shop.cluster, &shop.client);
    exchange_long_lines(cluster, client, &format!("{SERVICE_IP}:80"), hbone);
    exchange_long_lines(cluster, client, &format!("{}:8080", outside.ip), relayed);
    shop
}

#[test]
fn sockmap_moves_the_app_to_listener_leg_and_keeps_every_byte_in_order() {
    if skip() {
        return;
    }
    let shop = long_lines_through_both_paths("sockmap_on", &["--sockmap"], 4, 2);
    let cluster = &shop.cluster;
    let event = |name| metric(cluster, 0, "nodemesh_bpf_events", &[("event", name)]);
    // The app's end and the listener's end of each of the client's 6 connections. Only
    // captured connects and the outbound listener's accepts enter: not the proxy's dial
    // to web-1's app on this node, nor the HBONE connections.
    let entered = [("event", "sockmap_entered")];
    wait_for_metric(cluster, 0, "nodemesh_bpf_events", &entered, 12.0);
    // Each 100 KB line crosses in several messages; the echoes come back the same way.
    let redirected = event("sockmap_redirected");
    assert!(
        redirected >= 36.0,
        "at least one message each way per line moved socket to socket, got {redirected}"
    );
    let fell_back = event("sockmap_fell_back");
    assert!(
        fell_back <= 6.0,
        "at most the app's end of each connection falls back, got {fell_back}"
    );
}

#[test]
fn by_default_the_app_to_listener_leg_goes_through_tcp() {
    if skip() {
        return;
    }
    let shop = long_lines_through_both_paths("sockmap_off", &[], 2, 1);
    let cluster = &shop.cluster;
    let captured = [("event", "outbound_redirected")];
    wait_for_metric(cluster, 0, "nodemesh_bpf_events", &captured, 3.0);
    for name in ["sockmap_entered", "sockmap_redirected", "sockmap_fell_back"] {
        let count = metric(cluster, 0, "nodemesh_bpf_events", &[("event", name)]);
        assert_eq!(count, 0.0, "{name} without --sockmap");
    }
}
