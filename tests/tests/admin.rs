//! End to end: the admin API and `mesh-node debug`.
use std::{net::SocketAddr, time::Duration};

use mesh_tests::{
    Cluster, Pod, PodSpec, bookinfo, namespace_yaml,
    scenario::{metric, skip, wait_enrolled, wait_until},
    service_yaml,
};

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

    let workloads = cluster.debug(0, &["workloads"]);
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
            let out = cluster.debug(0, &["certs"]);
            out.contains("spiffe://cluster.local/ns/shop/sa/default")
                .then_some(out)
        });
    assert!(certs.contains("ready"), "{certs}");

    let json = cluster.debug(0, &["config", "-o", "json"]);
    let dump: serde_json::Value = serde_json::from_str(&json).expect("JSON config dump");
    assert_eq!(dump["node"], "node0");
    let web_origin = dump["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .find(|w| w["key"]["name"] == "web-1")
        .map(|w| w["origin"].clone())
        .expect("web-1 in the dump");
    let expected = cluster.config_dir().join("pod-shop-web-1.yaml");
    assert_eq!(
        web_origin,
        expected.display().to_string(),
        "the dump says which file each object came from"
    );

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
    assert!(cluster.debug(0, &["log", "off"]).contains("off"));
    let before = reloads_logged();
    reload(1);
    assert_eq!(reloads_logged(), before, "nothing logged with level off");
    cluster.debug(0, &["log", "info"]);
    reload(2);
    assert_eq!(reloads_logged(), before + 1, "logged again at info");

    // Loopback only: not on the node's own address, whether asked from the node itself,
    // from a pod (through its gateway, the node) or from the other node; and a pod's own
    // loopback is the pod's, not the node's.
    let admin_on_node_ip = SocketAddr::from((cluster.node_ip(0), 15000));
    let reachable_from = |netns: &str, addr: SocketAddr| {
        Cluster::run_in_netns(netns, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
        })
    };
    assert!(
        !reachable_from(cluster.node_netns(0), admin_on_node_ip),
        "the admin API must not listen on the node's address"
    );
    assert!(
        !reachable_from(cluster.node_netns(1), admin_on_node_ip),
        "the admin API must not be reachable from another node"
    );
    assert!(
        !reachable_from(&web.netns, admin_on_node_ip),
        "the admin API must not be reachable from a pod at the node's address"
    );
    let loopback = SocketAddr::from(([127, 0, 0, 1], 15000));
    assert!(
        !reachable_from(&web.netns, loopback),
        "the admin API must not be reachable on a pod's loopback"
    );
    assert!(
        reachable_from(cluster.node_netns(0), loopback),
        "the admin API answers on the node's loopback (the checks above mean something)"
    );
}

const REVIEWS_IP: &str = "10.96.0.20";
const RATINGS_IP: &str = "10.96.0.30";

/// Istio's request-level example: only `GET /public...` reaches reviews.
const REVIEWS_VIEWER: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: [GET]
        paths: [/public, /public/*]
";

/// `mesh-testapp http` from `client` to `url` with `args`: the response's JSON line.
fn http_request(cluster: &Cluster, client: &Pod, url: &str, args: &[&str]) -> serde_json::Value {
    bookinfo::http(cluster, client, url, args).remove(0)
}

/// The `verdict:` line of `mesh-node debug explain <args>` on node `i`.
fn explain_verdict(cluster: &Cluster, i: usize, args: &[&str]) -> String {
    let mut all = vec!["explain"];
    all.extend_from_slice(args);
    let out = cluster.debug(i, &all);
    out.lines()
        .find_map(|line| line.strip_prefix("verdict: "))
        .unwrap_or_else(|| panic!("no verdict line in:\n{out}"))
        .to_string()
}

#[test]
fn explain_gives_the_verdict_the_proxy_then_enforces() {
    if skip() {
        return;
    }
    let mut cluster = Cluster::new("explain", 2);
    let productpage = bookinfo::add_productpage(&mut cluster, 0);
    let reviews = bookinfo::add_reviews(&mut cluster, "v1", 1);
    cluster.write_config(
        "ns.yaml",
        &namespace_yaml("default", &[("nodemesh.io/enabled", "true")]),
    );
    let port = [("http", 9080, 8080)];
    let services = [
        service_yaml(
            "reviews",
            "default",
            REVIEWS_IP,
            &port,
            &[("app", "reviews")],
        ),
        // No pod carries app=ratings: no endpoint.
        service_yaml(
            "ratings",
            "default",
            RATINGS_IP,
            &port,
            &[("app", "ratings")],
        ),
    ];
    cluster.write_config("services.yaml", &services.join("---\n"));
    cluster.write_config("authz.yaml", REVIEWS_VIEWER);
    let _server = bookinfo::serve_http(&cluster, &reviews);
    cluster.start_agents();
    wait_enrolled(&cluster, 0, 1);
    wait_enrolled(&cluster, 1, 1);
    let reviews_url = |path: &str| format!("http://{REVIEWS_IP}:9080{path}");

    // Allowed: explain says so, and the request gets through.
    let verdict = explain_verdict(
        &cluster,
        0,
        &[
            "productpage",
            "reviews.default",
            "--port",
            "9080",
            "--path",
            "/public/page",
        ],
    );
    assert_eq!(verdict, "ALLOWED");
    let allowed = http_request(&cluster, &productpage, &reviews_url("/public/page"), &[]);
    assert_eq!(allowed["status"], 200, "{allowed}");

    // Denied by the AuthorizationPolicy, named; the proxy answers 403.
    let verdict = explain_verdict(
        &cluster,
        0,
        &[
            "default/productpage",
            "reviews.default.svc.cluster.local",
            "--port",
            "9080",
            "--path",
            "/admin",
            "--method",
            "POST",
        ],
    );
    assert_eq!(
        verdict,
        "DENIED by AuthorizationPolicy default/reviews-viewer: no ALLOW policy matched"
    );
    let denied = http_request(
        &cluster,
        &productpage,
        &reviews_url("/admin"),
        &["--method", "POST"],
    );
    assert_eq!(denied["status"], 403, "{denied}");

    // No endpoint: unroutable, and the source proxy answers 503.
    let verdict = explain_verdict(&cluster, 0, &["productpage", RATINGS_IP, "--path", "/"]);
    assert!(
        verdict.starts_with("UNROUTABLE: Service default/ratings has no ready endpoint"),
        "{verdict}"
    );
    let unroutable = http_request(
        &cluster,
        &productpage,
        &format!("http://{RATINGS_IP}:9080/"),
        &[],
    );
    assert_eq!(unroutable["status"], 503, "{unroutable}");

    // The same question from the other node's agent, as JSON: the identity pair and mTLS.
    let json = cluster.debug(
        1,
        &[
            "explain",
            "productpage",
            "reviews",
            "--path",
            "/public",
            "-o",
            "json",
        ],
    );
    let explanation: serde_json::Value = serde_json::from_str(&json).expect("JSON explanation");
    assert_eq!(
        explanation["verdict"]["verdict"], "ALLOWED",
        "{explanation}"
    );
    let endpoint = &explanation["backends"][0]["endpoints"][0];
    assert_eq!(endpoint["pod"], "default/reviews-v1");
    assert_eq!(endpoint["mutual_tls"], true);
    assert_eq!(
        endpoint["identity"],
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    );
    assert_eq!(
        explanation["source"]["identity"],
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    );

    // A slow request holds its connection: both agents list it while it is open.
    let slow_url = reviews_url("/public/slow?delay_ms=4000");
    let mut slow = productpage.spawn(
        &cluster,
        &["http", "--url", &slow_url, "--timeout-ms", "20000"],
    );
    let outbound = wait_until(
        Duration::from_secs(10),
        "the outbound connection listed",
        || {
            let table = cluster.debug(0, &["connections"]);
            table
                .lines()
                .find(|l| {
                    l.contains("outbound")
                        && l.contains("default/productpage")
                        && l.contains(&format!("{REVIEWS_IP}:9080"))
                })
                .map(str::to_string)
        },
    );
    assert!(outbound.contains("Service default/reviews"), "{outbound}");
    let hbone = wait_until(Duration::from_secs(10), "the HBONE tunnel listed", || {
        let rows: serde_json::Value =
            serde_json::from_str(&cluster.debug(1, &["connections", "-o", "json"]))
                .expect("JSON connections");
        rows.as_array()?
            .iter()
            .find(|row| row["direction"] == "hbone" && row["pod"]["name"] == "reviews-v1")
            .cloned()
    });
    assert_eq!(
        hbone["original_destination"],
        format!("{}:15008", reviews.ip),
        "{hbone}"
    );
    slow.wait_for_output("status", Duration::from_secs(15));
    wait_until(
        Duration::from_secs(10),
        "the outbound connection gone",
        || {
            let table = cluster.debug(0, &["connections"]);
            (!table.contains("default/productpage")).then_some(())
        },
    );
}
