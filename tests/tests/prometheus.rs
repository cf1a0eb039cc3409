//! A real Prometheus (Debian's `prometheus` server) scrapes both agents of the netns
//! cluster and answers PromQL about known traffic exactly; and the Grafana dashboard in
//! `deploy/grafana/` queries only metrics the agent exports.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use mesh_node::{
    ebpf::{Counters, MapFill},
    metrics::{ConnectionLabels, Metrics, Reporter, RequestOutcome},
};
use mesh_tests::{
    Cluster, PodSpec, Prometheus, namespace_yaml,
    scenario::{connect, replies, skip, wait_enrolled},
    service_yaml,
};
use serde_json::Value;

const ENROLLED: &[(&str, &str)] = &[("nodemesh.io/enabled", "true")];
const REVIEWS_V2_IP: &str = "10.96.0.22";
const ECHO_IP: &str = "10.96.0.30";
const APP_PORT: u16 = 8080;
/// An odd number that no retry, probe or doubling could produce by accident.
const REQUESTS: usize = 37;
const CONNECTIONS: usize = 5;
/// Scrapes every second; the agents count map entries every 5 s.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
const CONVERGE: Duration = Duration::from_secs(30);
/// How long the `mesh-testapp http` run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn prometheus_counts_requests_connections_and_node_state_from_both_agents() {
    if skip() {
        return;
    }
    if let Some(reason) = Prometheus::skip_reason() {
        eprintln!("skipping: {reason}");
        return;
    }
    // productpage (node0) calls reviews-v2 (node1) over HTTP and echo (node1) over TCP,
    // so each reporter's series come from a different agent.
    let mut cluster = Cluster::new("prometheus", 2);
    let productpage = cluster.add_pod(
        PodSpec::new("productpage", 0)
            .label("app", "productpage")
            .service_account("bookinfo-productpage"),
    );
    let reviews = cluster.add_pod(
        PodSpec::new("reviews-v2", 1)
            .label("app", "reviews")
            .label("version", "v2")
            .service_account("bookinfo-reviews"),
    );
    let echo = cluster.add_pod(PodSpec::new("echo", 1).label("app", "echo"));
    cluster.write_config("ns.yaml", &namespace_yaml("default", ENROLLED));
    let services = [
        service_yaml(
            "reviews-v2",
            "default",
            REVIEWS_V2_IP,
            &[("http", 9080, APP_PORT)],
            &[("app", "reviews")],
        ),
        service_yaml(
            "echo",
            "default",
            ECHO_IP,
            &[("tcp", 9000, APP_PORT)],
            &[("app", "echo")],
        ),
    ];
    cluster.write_config("services.yaml", &services.join("---\n"));
    let listen = |pod: &mesh_tests::Pod| format!("{}:{APP_PORT}", pod.ip);
    let mut http_server = reviews.spawn(
        &cluster,
        &[
            "http-serve",
            "--listen",
            &listen(&reviews),
            "--name",
            "reviews-v2",
        ],
    );
    let mut tcp_server = echo.spawn(
        &cluster,
        &["serve", "--listen", &listen(&echo), "--name", "echo"],
    );
    for server in [&mut http_server, &mut tcp_server] {
        server.wait_for_output("ready", Duration::from_secs(10));
    }
    cluster.start_agents();
    wait_enrolled(&cluster, 0, 1);
    wait_enrolled(&cluster, 1, 2);

    // Started after the cluster, so dropped (stopped by PID) before it.
    let prometheus = Prometheus::start(&cluster, 0, SCRAPE_INTERVAL);
    eprintln!(
        "prometheus pid {} scraping both agents; log {}",
        prometheus.pid(),
        prometheus.log_path().display()
    );
    let up = prometheus.wait_for(
        r#"up{job="nodemesh"} == 1"#,
        CONVERGE,
        "both agents to be scraped",
        |samples| (samples.len() == 2).then(|| nodes_of(samples)),
    );
    assert_eq!(up, ["node0", "node1"]);

    let url = format!("http://{REVIEWS_V2_IP}:9080/reviews");
    let count = REQUESTS.to_string();
    let output = productpage.run(
        &cluster,
        &["http", "--url", &url, "--count", &count, "--summary"],
        CLIENT_TIMEOUT,
    );
    assert!(
        output.status.success(),
        "mesh-testapp http: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_slice(&output.stdout).expect("a JSON summary");
    assert_eq!(
        summary["status"]["200"].as_u64(),
        Some(REQUESTS as u64),
        "{summary}"
    );
    let echoed = replies(&connect(
        &cluster,
        &productpage,
        &format!("{ECHO_IP}:9000"),
        CONNECTIONS,
    ));
    assert_eq!(echoed.len(), CONNECTIONS, "{echoed:?}");

    // Istio's own query, at the destination: exactly what was sent.
    prometheus.wait_for_value(
        r#"sum(istio_requests_total{destination_workload="reviews-v2",reporter="destination"})"#,
        REQUESTS as f64,
        CONVERGE,
    );
    // Both reporters, each from its own node, with the labels dashboards group by.
    let by_reporter = prometheus.wait_for(
        r#"sum by (node, reporter, response_code, connection_security_policy) (istio_requests_total{destination_workload="reviews-v2",source_workload="productpage"})"#,
        CONVERGE,
        "both reporters",
        |samples| {
            let total: f64 = samples.iter().map(|s| s.value).sum();
            (total == 2.0 * REQUESTS as f64).then(|| samples.to_vec())
        },
    );
    let reported: BTreeMap<(String, String), f64> = by_reporter
        .iter()
        .map(|sample| {
            assert_eq!(sample.labels["response_code"], "200", "{sample:?}");
            assert_eq!(
                sample.labels["connection_security_policy"], "mutual_tls",
                "{sample:?}"
            );
            let key = (
                sample.labels["node"].clone(),
                sample.labels["reporter"].clone(),
            );
            (key, sample.value)
        })
        .collect();
    let expected = BTreeMap::from([
        (("node0".into(), "source".into()), REQUESTS as f64),
        (("node1".into(), "destination".into()), REQUESTS as f64),
    ]);
    assert_eq!(reported, expected);
    prometheus.wait_for_value(
        r#"sum(istio_tcp_connections_opened_total{destination_workload="echo",reporter="destination",connection_security_policy="mutual_tls"})"#,
        CONNECTIONS as f64,
        CONVERGE,
    );

    // Node metrics: three pods enrolled across the nodes, each with its netns in the
    // agent's map (counted every 5 s), nothing escaped capture, both agents measured.
    prometheus.wait_for_value("sum(nodemesh_enrolled_pods)", 3.0, CONVERGE);
    prometheus.wait_for_value(
        r#"sum(nodemesh_bpf_map_entries{map="ENROLLED_NETNS"})"#,
        3.0,
        CONVERGE,
    );
    prometheus.wait_for_value(
        r#"min(nodemesh_bpf_map_capacity{map="ENROLLED_NETNS"})"#,
        4096.0,
        CONVERGE,
    );
    prometheus.wait_for_value(
        "sum(nodemesh_capture_refused_connections_total)",
        0.0,
        CONVERGE,
    );
    let measured = prometheus.wait_for(
        r#"process_resident_memory_bytes{job="nodemesh"} > 1e6 and on (node) process_cpu_seconds_total > 0"#,
        CONVERGE,
        "the agents' memory and CPU",
        |samples| (samples.len() == 2).then(|| nodes_of(samples)),
    );
    assert_eq!(measured, ["node0", "node1"]);
    drop(prometheus);
}

fn nodes_of(samples: &[mesh_tests::PromSample]) -> Vec<String> {
    let nodes: BTreeSet<String> = samples
        .iter()
        .map(|sample| sample.labels.get("node").cloned().unwrap_or_default())
        .collect();
    nodes.into_iter().collect()
}

// === the Grafana dashboard ===

const DASHBOARD: &str = include_str!("../../deploy/grafana/nodemesh-node.json");

/// Aggregations, functions and keywords that look like identifiers in PromQL.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
];

/// The metric names `expr` selects: identifiers outside label matchers, ranges and
/// strings that are neither functions (followed by `(`), keywords, label lists of
/// `by (...)`-like clauses, nor Grafana variables (`$x`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut plain = String::new();
    let mut nesting: Vec<char> = Vec::new();
    for c in expr.chars() {
        match (nesting.last(), c) {
            (Some('"'), '"') => drop(nesting.pop()),
            (Some('"'), _) => {}
            (_, '"') => nesting.push('"'),
            (_, '{' | '[') => nesting.push(c),
            (Some('{'), '}') | (Some('['), ']') => drop(nesting.pop()),
            (Some(_), _) => {}
            (None, _) => plain.push(c),
        }
    }
    let chars: Vec<char> = plain.chars().collect();
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$';
    let mut names = Vec::new();
    let mut i = 0;
    let mut skip_label_list = false;
    while i < chars.len() {
        if !is_name(chars[i]) {
            if chars[i] == '(' && skip_label_list {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                skip_label_list = false;
            }
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_name(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let next = chars[i..].iter().find(|c| !c.is_whitespace());
        if matches!(
            word.as_str(),
            "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
        ) {
            skip_label_list = true;
        } else if word.starts_with('$')
            || word.starts_with(|c: char| c.is_ascii_digit())
            || PROMQL_WORDS.contains(&word.as_str())
            || next == Some(&'(')
        {
            // A variable, a number, a keyword or a function.
        } else {
            names.push(word);
        }
    }
    names
}

/// Every series name the agent exports, with a histogram's `_bucket`, `_sum` and `_count`.
///
/// A registry only gathers families that have a series, so one of everything is recorded
/// first through the same calls the agent makes.
fn exported_names() -> BTreeSet<String> {
    let metrics = Metrics::new().expect("the agent's metrics register");
    let labels = ConnectionLabels::new(Reporter::Source, None, None, None, None);
    metrics.tcp.opened(&labels);
    metrics.tcp.closed(&labels, 1, 1);
    metrics.http.record(
        &labels,
        &RequestOutcome {
            protocol: "http",
            response_code: 200,
            response_flags: "-",
            grpc_status: None,
            duration: Duration::from_millis(1),
            request_bytes: 1,
            response_bytes: 1,
        },
    );
    let node = &metrics.node;
    node.captured("outbound");
    node.proxy_error("outbound", "no_endpoint");
    node.record_bpf_counters(&Counters::default());
    node.set_bpf_map_fill(&[MapFill {
        map: "ENROLLED_NETNS",
        entries: 0,
        capacity: 1,
    }]);
    node.set_certificate_expiries(&[(
        "spiffe://cluster.local/ns/a/sa/b".into(),
        SystemTime::now(),
    )]);
    node.upstream_overflow("web.shop.svc.cluster.local");
    node.outlier_ejected("web.shop.svc.cluster.local");
    let mut names = BTreeSet::new();
    for family in metrics.registry.gather() {
        let name = family.name().to_owned();
        let is_histogram = family
            .get_metric()
            .iter()
            .any(|metric| !metric.get_histogram().get_bucket().is_empty());
        if is_histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name);
    }
    names
}

#[test]
fn promql_metric_names_are_found_outside_matchers_and_clauses() {
    let expr = r#"sum by (instance, map) (rate(a_total{x=~"$y",z="b{c}"}[$__rate_interval])) / on (instance) group_left b_bytes{q="w"} - time() > 0.5"#;
    assert_eq!(metric_names(expr), ["a_total", "b_bytes"]);
    assert_eq!(
        metric_names("max(nodemesh_bpf_map_entries / nodemesh_bpf_map_capacity)"),
        ["nodemesh_bpf_map_entries", "nodemesh_bpf_map_capacity"]
    );
}

#[test]
fn grafana_dashboard_queries_only_metrics_the_agent_exports() {
    let exported = exported_names();
    assert!(
        exported.contains("nodemesh_capture_refused_connections_total")
            && exported.contains("istio_request_duration_milliseconds_bucket")
            && exported.contains("process_cpu_seconds_total"),
        "every family is gathered: {exported:?}"
    );
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    assert!(
        dashboard["schemaVersion"].as_u64() >= Some(39),
        "schemaVersion {}",
        dashboard["schemaVersion"]
    );
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables");
    let instance = variables
        .iter()
        .find(|v| v["name"] == "instance")
        .expect("an `instance` (node) variable");
    let definition = instance["definition"].as_str().expect("a definition");
    let metric = definition
        .strip_prefix("label_values(")
        .and_then(|rest| rest.split(',').next())
        .expect("label_values(metric, instance)");
    assert!(exported.contains(metric.trim()), "{definition}");

    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(ids.insert(panel["id"].as_u64()), "duplicate id in {title}");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} queries nothing");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{title}: no metric in {expr}");
            for name in names {
                assert!(
                    exported.contains(&name),
                    "{title}: `{expr}` reads {name}, which the agent does not export"
                );
                assert!(
                    expr.contains(&format!("{name}{{instance=~\"$instance\"}}")),
                    "{title}: {name} is not filtered by the node variable in `{expr}`"
                );
                used.insert(name);
            }
        }
    }
    for wanted in [
        "nodemesh_enrolled_pods",
        "nodemesh_captured_connections_total",
        "nodemesh_proxy_errors_total",
        "nodemesh_capture_refused_connections_total",
        "nodemesh_bpf_map_entries",
        "nodemesh_bpf_map_capacity",
        "nodemesh_certificate_expiration_timestamp_seconds",
        "nodemesh_hbone_pooled_tunnels",
        "nodemesh_hbone_tunnels_opened_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "nodemesh_config_rejected_resources",
        "nodemesh_upstream_overflow_total",
        "nodemesh_outlier_ejections_total",
    ] {
        assert!(used.contains(wanted), "no panel shows {wanted}");
    }
}
