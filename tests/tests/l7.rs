//! End to end: L7 traffic management in the node proxy — VirtualService, DestinationRule,
//! HTTPRoute and request-level AuthorizationPolicy — with Istio's own YAML where it has
//! some, on real sockets between real network namespaces.
use std::{collections::BTreeMap, time::Duration};

use mesh_tests::{
    Cluster, Pod, PodProcess,
    bookinfo::{self, APP_PORT},
    http_get_in_netns, namespace_yaml,
    scenario::{
        CONVERGE_TIMEOUT, apply_config, connect, metric, replies, skip, wait_enrolled,
        wait_for_metric, wait_until,
    },
    service_yaml,
};
use serde_json::Value;

const ENROLLED: &[(&str, &str)] = &[("nodemesh.io/enabled", "true")];
const REVIEWS_IP: &str = "10.96.0.20";
const REVIEWS_V1_IP: &str = "10.96.0.21";
const REVIEWS_V2_IP: &str = "10.96.0.22";
/// A Service whose ports declare no protocol: the proxy sniffs.
const REVIEWS_UNDECLARED_IP: &str = "10.96.0.23";
/// How long one `mesh-testapp http` run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Istio's bookinfo subsets for reviews (samples/bookinfo/networking/destination-rule-all.yaml).
const REVIEWS_SUBSETS: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
  - name: v3
    labels:
      version: v3
";

/// Istio's canary example, unchanged (samples/bookinfo/networking/virtual-service-reviews-80-20.yaml).
const REVIEWS_80_20: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 80
    - destination:
        host: reviews
        subset: v2
      weight: 20
";

/// Bookinfo's reviews in namespace `default` (so Istio's samples apply as they are): the
/// client `productpage` on node0, `reviews-v1` on node1, `reviews-v2` on node0, Service
/// `reviews` on port 9080 (named `http`) plus one Service per version.
struct Bookinfo {
    cluster: Cluster,
    productpage: Pod,
    v1: Pod,
    v2: Pod,
    _servers: Vec<PodProcess>,
}

fn bookinfo(test: &str) -> Bookinfo {
    let mut cluster = Cluster::new(test, 2);
    let productpage = bookinfo::add_productpage(&mut cluster, 0);
    let v1 = bookinfo::add_reviews(&mut cluster, "v1", 1);
    let v2 = bookinfo::add_reviews(&mut cluster, "v2", 0);
    cluster.write_config("ns.yaml", &namespace_yaml("default", ENROLLED));
    let port = [("http", 9080, APP_PORT)];
    let services = [
        service_yaml(
            "reviews",
            "default",
            REVIEWS_IP,
            &port,
            &[("app", "reviews")],
        ),
        service_yaml(
            "reviews-v1",
            "default",
            REVIEWS_V1_IP,
            &port,
            &[("app", "reviews"), ("version", "v1")],
        ),
        service_yaml(
            "reviews-v2",
            "default",
            REVIEWS_V2_IP,
            &port,
            &[("app", "reviews"), ("version", "v2")],
        ),
    ];
    cluster.write_config("services.yaml", &services.join("---\n"));
    let servers = [&v1, &v2]
        .into_iter()
        .map(|pod| bookinfo::serve_http(&cluster, pod))
        .collect();
    cluster.start_agents();
    wait_enrolled(&cluster, 0, 2);
    wait_enrolled(&cluster, 1, 1);
    Bookinfo {
        cluster,
        productpage,
        v1,
        v2,
        _servers: servers,
    }
}

/// [`bookinfo`] with Istio's reviews subsets and 80/20 canary applied.
fn bookinfo_canary(test: &str) -> Bookinfo {
    let scene = bookinfo(test);
    scene.apply("subsets.yaml", REVIEWS_SUBSETS);
    scene.apply("vs.yaml", REVIEWS_80_20);
    scene
}

impl Bookinfo {
    /// Writes `yaml` as `file` and waits until both agents have loaded it, without
    /// rejections.
    fn apply(&self, file: &str, yaml: &str) {
        self.apply_expecting(file, yaml, 0.0);
    }

    fn apply_expecting(&self, file: &str, yaml: &str, rejected: f64) {
        apply_config(&self.cluster, file, yaml, rejected);
    }

    /// `mesh-testapp http` from productpage with `args`; the JSON lines it printed.
    fn http(&self, path: &str, args: &[&str]) -> Vec<Value> {
        self.http_to(REVIEWS_IP, path, args)
    }

    fn http_to(&self, ip: &str, path: &str, args: &[&str]) -> Vec<Value> {
        let url = format!("http://{ip}:9080{path}");
        bookinfo::http(&self.cluster, &self.productpage, &url, args)
    }

    /// `count` requests; the summary (status and backend counts).
    fn summary(&self, path: &str, count: usize, args: &[&str]) -> Value {
        self.summary_to(REVIEWS_IP, path, count, args)
    }

    /// The same to another Service IP on port 9080.
    fn summary_to(&self, ip: &str, path: &str, count: usize, args: &[&str]) -> Value {
        let count = count.to_string();
        let mut all = vec!["--count", &count, "--summary"];
        all.extend_from_slice(args);
        self.http_to(ip, path, &all).remove(0)
    }

    /// One request; its response line.
    fn one(&self, path: &str, args: &[&str]) -> Value {
        self.http(path, args).remove(0)
    }

    /// What a backend counted (`/__stats`), read from inside its pod without the mesh.
    fn stats(&self, pod: &Pod) -> Value {
        let addr = format!("{}:{APP_PORT}", pod.ip)
            .parse()
            .expect("an address");
        let (status, body) =
            http_get_in_netns(&pod.netns, addr, "/__stats").expect("backend stats");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("stats JSON")
    }
}

fn count(summary: &Value, field: &str, key: &str) -> u64 {
    summary[field][key].as_u64().unwrap_or(0)
}

fn served_by(response: &Value) -> &str {
    response["served_by"].as_str().unwrap_or("(none)")
}

#[test]
fn canary_split_header_and_path_matches_and_request_metrics() {
    if skip() {
        return;
    }
    let scene = bookinfo_canary("l7_canary");

    // 80/20 over 1,000 requests: v2's share within ±5 points (four standard deviations
    // of a binomial with p = 0.2, n = 1,000).
    let split = scene.summary("/reviews", 1000, &["--concurrency", "8"]);
    assert_eq!(count(&split, "status", "200"), 1000, "{split}");
    let to_v2 = count(&split, "served_by", "reviews-v2");
    assert_eq!(
        count(&split, "served_by", "reviews-v1") + to_v2,
        1000,
        "{split}"
    );
    assert!(
        (150..=250).contains(&to_v2),
        "v2 got {to_v2} of 1000: {split}"
    );

    // Request metrics count exactly what was sent, per version, at both ends.
    let source = |version: &str| {
        metric(
            &scene.cluster,
            0,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "productpage"),
                ("destination_version", version),
                ("destination_service", "reviews.default.svc.cluster.local"),
                ("response_code", "200"),
                ("request_protocol", "http"),
                ("response_flags", "-"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    // A request is counted when its response body has ended, which may be a moment after
    // the client has read it.
    wait_until(
        CONVERGE_TIMEOUT,
        "1000 requests counted at the source",
        || (source("v1") + source("v2") == 1000.0).then_some(()),
    );
    assert_eq!(source("v2"), to_v2 as f64);
    wait_for_metric(
        &scene.cluster,
        1,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("destination_workload", "reviews-v1"),
            ("destination_version", "v1"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
            ),
            ("response_code", "200"),
        ],
        (1000 - to_v2) as f64,
    );
    let durations = metric(
        &scene.cluster,
        0,
        "istio_request_duration_milliseconds_count",
        &[("reporter", "source"), ("destination_version", "v2")],
    );
    assert_eq!(durations, to_v2 as f64);

    // 100/0: nothing reaches v2.
    scene.apply(
        "vs.yaml",
        &REVIEWS_80_20.replace("80", "100").replace("20", "0"),
    );
    let all_v1 = scene.summary("/reviews", 200, &["--concurrency", "4"]);
    assert_eq!(count(&all_v1, "served_by", "reviews-v1"), 200, "{all_v1}");

    // Header, path and method matches; the first matching rule wins.
    scene.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  http:
  - name: jason
    match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - name: v2-api
    match:
    - uri: {prefix: /v2/}
      method: {exact: GET}
    rewrite: {uri: /api/}
    headers:
      request:
        set: {x-route: v2-api}
      response:
        add: {x-answered-by-route: v2-api}
    route:
    - destination: {host: reviews, subset: v2}
  - name: regex
    match:
    - uri: {regex: '/item/[0-9]+'}
    route:
    - destination: {host: reviews, subset: v2}
  - name: default
    route:
    - destination: {host: reviews, subset: v1}
",
    );
    let jason = scene.one("/v2/anything", &["--header", "end-user: jason"]);
    assert_eq!(served_by(&jason), "reviews-v2");
    let body: Value = serde_json::from_str(jason["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        body["path"], "/v2/anything",
        "the first rule has no rewrite"
    );

    let api = scene.one("/v2/books?id=7", &[]);
    assert_eq!(served_by(&api), "reviews-v2");
    let body: Value = serde_json::from_str(api["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["path"], "/api/books", "prefix rewritten: {body}");
    assert_eq!(body["query"], "id=7");
    assert_eq!(body["headers"]["x-route"], "v2-api");
    assert_eq!(api["headers"]["x-answered-by-route"], "v2-api");

    let posted = scene.one("/v2/books", &["--method", "POST", "--body", "x"]);
    assert_eq!(
        served_by(&posted),
        "reviews-v1",
        "method match is part of the rule"
    );
    assert_eq!(served_by(&scene.one("/item/42", &[])), "reviews-v2");
    assert_eq!(served_by(&scene.one("/item/abc", &[])), "reviews-v1");
    assert_eq!(served_by(&scene.one("/", &[])), "reviews-v1");

    // A VirtualService naming an unknown subset is rejected; the last good one stays.
    scene.apply_expecting(
        "vs.yaml",
        &REVIEWS_80_20.replace("subset: v2", "subset: v9"),
        1.0,
    );
    assert_eq!(served_by(&scene.one("/item/42", &[])), "reviews-v2");
}

#[test]
fn retries_timeouts_and_fault_injection() {
    if skip() {
        return;
    }
    let scene = bookinfo("l7_retries");
    scene.apply("subsets.yaml", REVIEWS_SUBSETS);
    scene.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /three}}]
    retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /one}}]
    retries: {attempts: 1, retryOn: 5xx}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /slow}}]
    timeout: 500ms
    retries: {attempts: 2, perTryTimeout: 200ms, retryOn: 5xx}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /abort}}]
    fault:
      abort: {httpStatus: 418, percentage: {value: 100}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /delay}}]
    fault:
      delay: {fixedDelay: 400ms, percentage: {value: 100}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: reviews.example, redirectCode: 308}
  - match: [{uri: {prefix: /maintenance}}]
    directResponse: {status: 503, body: {string: down for maintenance}}
",
    );

    // redirect and directResponse are answered by the proxy itself.
    let before_local = scene.stats(&scene.v1)["requests"].as_u64().unwrap();
    let moved = scene.one("/old", &[]);
    assert_eq!(moved["status"], 308, "{moved}");
    assert_eq!(moved["headers"]["location"], "http://reviews.example/new");
    let direct = scene.one("/maintenance/now", &[]);
    assert_eq!(direct["status"], 503);
    assert_eq!(direct["body"], "down for maintenance");
    assert_eq!(
        scene.stats(&scene.v1)["requests"].as_u64().unwrap(),
        before_local,
        "neither reached the backend"
    );

    // Fails twice, then succeeds: three retries are enough, one is not.
    let retried = scene.one("/three?fail=2&key=a", &[]);
    assert_eq!(retried["status"], 200, "{retried}");
    let body: Value = serde_json::from_str(retried["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["headers"]["x-envoy-attempt-count"], "3");
    assert_eq!(scene.stats(&scene.v1)["by_key"]["a"], 3);
    let failed = scene.one("/one?fail=2&key=b", &[]);
    assert_eq!(failed["status"], 503, "the backend's own status: {failed}");
    assert_eq!(scene.stats(&scene.v1)["by_key"]["b"], 2);

    // perTryTimeout cuts each try; `timeout` bounds the whole request: 504.
    let slow = scene.one("/slow?delay_ms=3000&key=slow", &[]);
    assert_eq!(slow["status"], 504, "{slow}");
    let elapsed = slow["elapsed_ms"].as_f64().unwrap();
    assert!((450.0..1500.0).contains(&elapsed), "took {elapsed} ms");
    assert_eq!(
        scene.stats(&scene.v1)["by_key"]["slow"],
        3,
        "three tries of 200 ms fit in 500 ms"
    );

    // abort answers without touching the backend; delay holds the request.
    let before = scene.stats(&scene.v1)["requests"].as_u64().unwrap();
    let aborted = scene.one("/abort", &[]);
    assert_eq!(aborted["status"], 418);
    assert_eq!(scene.stats(&scene.v1)["requests"].as_u64().unwrap(), before);
    let delayed = scene.one("/delay", &[]);
    assert_eq!(delayed["status"], 200);
    assert!(
        delayed["elapsed_ms"].as_f64().unwrap() >= 400.0,
        "{delayed}"
    );
    wait_for_metric(
        &scene.cluster,
        0,
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("response_code", "418"),
            ("response_flags", "FI"),
        ],
        1.0,
    );
}

#[test]
fn outlier_detection_circuit_breaking_and_consistent_hash() {
    if skip() {
        return;
    }
    let mut scene = bookinfo("l7_resilience");
    scene.apply(
        "dr.yaml",
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 3s
      maxEjectionPercent: 100
",
    );
    scene.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - retries: {attempts: 0}
    route: [{destination: {host: reviews}}]
",
    );
    // v2 stops answering: two failures eject it, then everything goes to v1.
    let v2_server = scene._servers.remove(1);
    v2_server.stop(Duration::from_secs(2));
    let during = scene.summary("/", 20, &[]);
    let failures = 20 - count(&during, "status", "200");
    assert!(
        failures <= 2,
        "at most two failures before ejection: {during}"
    );
    let after = scene.summary("/", 20, &[]);
    assert_eq!(count(&after, "served_by", "reviews-v1"), 20, "{after}");
    // Back after baseEjectionTime.
    scene
        ._servers
        .push(bookinfo::serve_http(&scene.cluster, &scene.v2));
    std::thread::sleep(Duration::from_secs(4));
    let back = scene.summary("/", 20, &[]);
    assert!(count(&back, "served_by", "reviews-v2") > 0, "{back}");

    // Circuit breaking: one connection, one pending request; the rest overflow fast.
    scene.apply(
        "dr.yaml",
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 100}
",
    );
    let overloaded = scene.summary("/?delay_ms=300", 16, &["--concurrency", "8"]);
    let overflowed = count(&overloaded, "status", "503");
    assert!(overflowed >= 4, "overflow answered 503: {overloaded}");
    assert!(count(&overloaded, "status", "200") >= 2, "{overloaded}");
    assert!(
        metric(&scene.cluster, 0, "nodemesh_upstream_overflow_total", &[]) >= overflowed as f64
    );
    let recovered = scene.summary("/", 10, &[]);
    assert_eq!(count(&recovered, "status", "200"), 10, "{recovered}");

    // Consistent hash on a header keeps a user on one endpoint.
    scene.apply(
        "dr.yaml",
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user}
",
    );
    let mut homes = BTreeMap::new();
    for user in ["ana", "ben", "cho", "dee", "eve", "fay"] {
        let header = format!("x-user: {user}");
        let pinned = scene.summary("/", 10, &["--header", &header]);
        let backends = pinned["served_by"].as_object().unwrap();
        assert_eq!(backends.len(), 1, "{user} moved: {pinned}");
        homes.insert(user, backends.keys().next().unwrap().clone());
    }
    let distinct: std::collections::BTreeSet<&String> = homes.values().collect();
    assert_eq!(
        distinct.len(),
        2,
        "keys spread over both endpoints: {homes:?}"
    );
}

#[test]
fn sniffing_grpc_http2_upgrades_mirroring_and_l7_authorization() {
    if skip() {
        return;
    }
    let mut scene = bookinfo("l7_protocols");
    scene.apply("subsets.yaml", REVIEWS_SUBSETS);

    // Undeclared ports are sniffed: HTTP gets L7 (request metrics), other bytes stay L4.
    scene.apply(
        "undeclared.yaml",
        &service_yaml(
            "reviews-undeclared",
            "default",
            REVIEWS_UNDECLARED_IP,
            &[("web", 9080, APP_PORT), ("echo", 9081, 8081)],
            &[("app", "reviews"), ("version", "v1")],
        ),
    );
    let tcp_server = bookinfo::serve_tcp(&scene.cluster, &scene.v1, 8081, "reviews-v1-tcp");
    scene._servers.push(tcp_server);
    let sniffed = scene.summary_to(REVIEWS_UNDECLARED_IP, "/sniffed", 3, &[]);
    assert_eq!(count(&sniffed, "status", "200"), 3, "{sniffed}");
    let undeclared = [
        ("reporter", "source"),
        (
            "destination_service",
            "reviews-undeclared.default.svc.cluster.local",
        ),
    ];
    wait_for_metric(&scene.cluster, 0, "istio_requests_total", &undeclared, 3.0);
    let tcp = replies(&connect(
        &scene.cluster,
        &scene.productpage,
        &format!("{REVIEWS_UNDECLARED_IP}:9081"),
        2,
    ));
    assert_eq!(tcp.len(), 2);
    assert_eq!(tcp[0]["server"], "reviews-v1-tcp");
    // L4 metrics for the bytes that were not HTTP (a close is counted once both sides
    // are done, just after the client returns).
    wait_for_metric(
        &scene.cluster,
        0,
        "istio_tcp_connections_closed_total",
        &undeclared,
        2.0,
    );
    assert_eq!(
        metric(&scene.cluster, 0, "istio_requests_total", &undeclared),
        3.0,
        "no request counted for them"
    );

    // HTTP/2 (h2c) end to end: the backend sees HTTP/2 too.
    let h2 = scene.one("/h2", &["--http2"]);
    assert_eq!(h2["status"], 200, "{h2}");
    let body: Value = serde_json::from_str(h2["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["version"], "HTTP/2.0");

    // gRPC unary and bidirectional streaming.
    let grpc = |method: &str, messages: &[&str]| -> Vec<String> {
        let url = format!("http://{REVIEWS_IP}:9080");
        let mut args = vec!["grpc", "--url", &url, "--method", method];
        for message in messages {
            args.extend(["--message", message]);
        }
        let output = scene.productpage.run(&scene.cluster, &args, CLIENT_TIMEOUT);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let unary = grpc("/nodemesh.test.Echo/Unary", &["ping"]);
    assert!(unary[0].ends_with(":ping"), "{unary:?}");
    assert!(
        unary.last().unwrap().contains("\"grpc_status\":0"),
        "{unary:?}"
    );
    let stream = grpc("/nodemesh.test.Echo/Stream", &["a", "b", "c"]);
    assert_eq!(stream.len(), 4, "{stream:?}");
    assert!(stream[2].ends_with(":c"), "{stream:?}");
    wait_for_metric(
        &scene.cluster,
        0,
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("request_protocol", "grpc"),
            ("grpc_response_status", "0"),
        ],
        2.0,
    );

    // An upgraded connection (as WebSocket does) passes through.
    let url = format!("http://{REVIEWS_IP}:9080/ws");
    let upgraded = scene.productpage.run(
        &scene.cluster,
        &["upgrade", "--url", &url, "--message", "over the upgrade"],
        CLIENT_TIMEOUT,
    );
    let upgraded: Value = serde_json::from_slice(&upgraded.stdout).expect("upgrade JSON");
    assert_eq!(upgraded["status"], 101);
    assert_eq!(upgraded["echo"], "over the upgrade");

    // Mirroring: v1 answers, v2 gets a copy whose answer is ignored.
    scene.apply(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100.0}
",
    );
    let mirrored = scene.summary("/mirrored?status=500&key=m", 5, &[]);
    assert_eq!(count(&mirrored, "served_by", "reviews-v1"), 5, "{mirrored}");
    wait_until(CONVERGE_TIMEOUT, "the mirror copies", || {
        (scene.stats(&scene.v2)["by_key"]["m"] == 5).then_some(())
    });

    // Request-level authorization at the destination.
    scene.apply(
        "authz.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: [GET]
        paths: [/public, /public/*]
",
    );
    let direct = |path: &str, method: &str| {
        scene
            .http_to(REVIEWS_V1_IP, path, &["--method", method])
            .remove(0)
    };
    assert_eq!(direct("/public/page", "GET")["status"], 200);
    let denied = direct("/admin", "POST");
    assert_eq!(denied["status"], 403, "{denied}");
    assert_eq!(denied["body"], "RBAC: access denied");
    assert_eq!(
        direct("/public", "POST")["status"],
        403,
        "method not allowed"
    );
    wait_for_metric(
        &scene.cluster,
        1,
        "istio_requests_total",
        &[("reporter", "destination"), ("response_code", "403")],
        2.0,
    );
}

#[test]
fn http_route_gamma_splits_by_weight_and_wins_over_a_virtual_service() {
    if skip() {
        return;
    }
    let scene = bookinfo_canary("l7_httproute");
    // HTTPRoute (Gateway API, GAMMA): attached to the Service, weights between Services.
    scene.apply_expecting(
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs:
  - {group: '', kind: Service, name: reviews, port: 9080}
  rules:
  - matches:
    - headers: [{name: x-canary, value: 'yes'}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        add: [{name: x-via, value: httproute}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 1}
",
        1.0,
    );
    let canary = scene.one("/", &["--header", "x-canary: yes"]);
    assert_eq!(served_by(&canary), "reviews-v2");
    let body: Value = serde_json::from_str(canary["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["headers"]["x-via"], "httproute");
    let rest = scene.summary("/", 50, &[]);
    assert_eq!(
        count(&rest, "served_by", "reviews-v1"),
        50,
        "the HTTPRoute, not the 80/20 VirtualService: {rest}"
    );
}
