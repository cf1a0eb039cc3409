use std::time::Duration;

use prometheus::{Encoder, TextEncoder};

use super::*;
use crate::{
    ebpf::{Counters, MapFill},
    inventory::ObjectKey,
};

/// What `/metrics` serves.
fn exposition(metrics: &Metrics) -> String {
    let mut body = Vec::new();
    TextEncoder::new()
        .encode(&metrics.registry.gather(), &mut body)
        .expect("the registry encodes");
    String::from_utf8(body).expect("the exposition is UTF-8")
}

/// The value of the one sample of `name` whose labels include `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| {
            labels.iter().all(|(key, value)| {
                let pair = format!("{key}=\"{value}\"");
                line.contains(&format!("{{{pair}")) || line.contains(&format!(",{pair}"))
            })
        })
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "expected one {name} sample with {labels:?}, found {matching:#?} in\n{text}"
    );
    let value = matching[0]
        .rsplit(' ')
        .next()
        .expect("a sample has a value");
    value.parse().expect("a sample value is a number")
}

/// A mutual TLS connection from `sleep/sleep` to the `web` Service in `shop`, reported by
/// the destination.
fn sleep_to_web() -> ConnectionLabels {
    let sleep = Workload::for_test(
        "node0",
        "sleep",
        "sleep",
        &[("app", "sleep"), ("version", "v1")],
    );
    let web = Workload::for_test("node1", "shop", "web", &[("app", "web")]);
    let service = Service {
        key: ObjectKey::new("shop", "web"),
        cluster_ips: vec!["10.96.0.10".parse().expect("an IP")],
        ports: Vec::new(),
        endpoints: vec![web.key.clone()],
        external: None,
    };
    let identity =
        |ns: &str, sa: &str| Identity::new("cluster.local", ns, sa).expect("an identity");
    ConnectionLabels::new(
        Reporter::Destination,
        Some(&sleep),
        Some(&web),
        Some(&service),
        Some((&identity("sleep", "sleep"), &identity("shop", "web"))),
    )
}

#[test]
fn a_connection_records_through_its_series_cache_like_a_lookup_each_time() {
    let (cached, looked_up) = (
        Metrics::new().expect("metrics register"),
        Metrics::new().expect("metrics register"),
    );
    let labels = sleep_to_web();
    let cache = SeriesCache::default();
    let outcome = |response_code: u16, response_flags, grpc_status: Option<u32>| RequestOutcome {
        protocol: if grpc_status.is_some() {
            "grpc"
        } else {
            "http"
        },
        response_code,
        response_flags,
        grpc_status,
        duration: Duration::from_millis(u64::from(response_code) / 100),
        request_bytes: 10,
        response_bytes: u64::from(response_code),
    };
    // More distinct outcomes than a connection caches, and repeats of each.
    let mut outcomes = Vec::new();
    for code in [200, 201, 204, 301, 302, 400, 404, 500, 502, 503] {
        outcomes.extend([outcome(code, "-", None), outcome(code, "UF", None)]);
    }
    outcomes.extend([outcome(200, "-", Some(0)), outcome(200, "-", Some(99))]);
    for round in 0..3 {
        for outcome in outcomes.iter().skip(round) {
            cache.record(&cached.http, &labels, outcome);
            looked_up.http.record(&labels, outcome);
        }
    }
    // Only the request series: the process metrics differ between two reads.
    let istio = |metrics: &Metrics| -> String {
        exposition(metrics)
            .lines()
            .filter(|line| line.starts_with("istio_"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (cached, looked_up) = (istio(&cached), istio(&looked_up));
    let requests = |code: &str, flags: &str| {
        let labels = [
            ("response_code", code),
            ("response_flags", flags),
            ("grpc_response_status", ""),
        ];
        sample(&cached, "istio_requests_total", &labels)
    };
    // Round r skips the first r outcomes: the first counts once, the second twice.
    assert_eq!(requests("200", "-"), 1.0);
    assert_eq!(requests("200", "UF"), 2.0);
    assert_eq!(requests("503", "UF"), 3.0);
    assert!(
        cached == looked_up,
        "the same series and values, whether cached or looked up"
    );
}

#[test]
fn requests_are_counted_with_istio_labels_and_buckets() {
    let metrics = Metrics::new().expect("metrics register");
    let labels = sleep_to_web();
    let ok = RequestOutcome {
        protocol: "http",
        response_code: 200,
        response_flags: "-",
        grpc_status: None,
        duration: Duration::from_micros(12_500),
        request_bytes: 100,
        response_bytes: 2_000,
    };
    metrics.http.record(&labels, &ok);
    metrics.http.record(
        &labels,
        &RequestOutcome {
            duration: Duration::from_millis(30),
            ..ok.clone()
        },
    );
    let no_upstream = RequestOutcome {
        protocol: "grpc",
        response_code: 503,
        response_flags: "UF",
        grpc_status: Some(14),
        duration: Duration::from_millis(2),
        request_bytes: 7,
        response_bytes: 0,
    };
    metrics.http.record(&labels, &no_upstream);
    let text = exposition(&metrics);

    // Every label of Istio's request set, in the encoder's (alphabetical) order.
    let ok_series = concat!(
        "connection_security_policy=\"mutual_tls\",destination_app=\"web\",",
        "destination_cluster=\"Kubernetes\",",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/web\",",
        "destination_service=\"web.shop.svc.cluster.local\",destination_service_name=\"web\",",
        "destination_service_namespace=\"shop\",destination_version=\"unknown\",",
        "destination_workload=\"web\",destination_workload_namespace=\"shop\",",
        "grpc_response_status=\"\",reporter=\"destination\",request_protocol=\"http\",",
        "response_code=\"200\",response_flags=\"-\",source_app=\"sleep\",",
        "source_cluster=\"Kubernetes\",",
        "source_principal=\"spiffe://cluster.local/ns/sleep/sa/sleep\",",
        "source_version=\"v1\",source_workload=\"sleep\",source_workload_namespace=\"sleep\"",
    );
    assert!(
        text.lines()
            .any(|line| line == format!("istio_requests_total{{{ok_series}}} 2")),
        "two successful requests under the full label set in\n{text}"
    );

    let ok = [("response_code", "200"), ("request_protocol", "http")];
    let failed = [
        ("response_code", "503"),
        ("request_protocol", "grpc"),
        ("response_flags", "UF"),
        ("grpc_response_status", "14"),
    ];
    assert_eq!(sample(&text, "istio_requests_total", &failed), 1.0);
    let duration = "istio_request_duration_milliseconds";
    assert_eq!(sample(&text, &format!("{duration}_count"), &ok), 2.0);
    assert_eq!(sample(&text, &format!("{duration}_sum"), &ok), 42.5);
    let bucket = |le: &'static str| {
        let labels = [ok[0], ok[1], ("le", le)];
        sample(&text, &format!("{duration}_bucket"), &labels)
    };
    assert_eq!(bucket("10"), 0.0);
    assert_eq!(bucket("25"), 1.0, "12.5 ms");
    assert_eq!(bucket("50"), 2.0, "30 ms");
    assert_eq!(bucket("3600000"), 2.0, "Istio's largest bucket");
    assert_eq!(sample(&text, &format!("{duration}_sum"), &failed), 2.0);
    assert_eq!(sample(&text, "istio_request_bytes_sum", &ok), 200.0);
    assert_eq!(sample(&text, "istio_response_bytes_sum", &ok), 4000.0);
    assert_eq!(sample(&text, "istio_request_bytes_sum", &failed), 7.0);
    assert_eq!(
        sample(
            &text,
            "istio_response_bytes_bucket",
            &[failed[0], ("le", "1")]
        ),
        1.0,
        "an empty response is in the first bucket"
    );
    assert!(
        !text.contains("request_protocol=\"tcp\""),
        "requests replace the connection's protocol"
    );
}

#[test]
fn undefined_grpc_statuses_are_recorded_as_unknown() {
    let metrics = Metrics::new().expect("metrics register");
    metrics.http.record(
        &sleep_to_web(),
        &RequestOutcome {
            protocol: "grpc",
            response_code: 200,
            response_flags: "-",
            grpc_status: Some(4_000_000),
            duration: Duration::ZERO,
            request_bytes: 0,
            response_bytes: 0,
        },
    );
    let text = exposition(&metrics);
    assert_eq!(
        sample(
            &text,
            "istio_requests_total",
            &[("grpc_response_status", "2")]
        ),
        1.0
    );
}

#[test]
fn circuit_breaker_and_outlier_counters_are_per_service() {
    let metrics = Metrics::new().expect("metrics register");
    let web = "web.shop.svc.cluster.local";
    metrics.node.upstream_overflow(web);
    metrics.node.upstream_overflow(web);
    metrics.node.outlier_ejected(web);
    let text = exposition(&metrics);
    let service = [("destination_service", web)];
    assert_eq!(
        sample(&text, "nodemesh_upstream_overflow_total", &service),
        2.0
    );
    assert_eq!(
        sample(&text, "nodemesh_outlier_ejections_total", &service),
        1.0
    );
}

#[test]
fn capture_refusals_follow_the_kernel_counters() {
    let metrics = Metrics::new().expect("metrics register");
    let counters = |inbound_no_listener, orig_dst_table_full| Counters {
        outbound_redirected: 40,
        outbound_proxy_bypass: 12,
        inbound_steered: 30,
        inbound_no_listener,
        orig_dst_table_full,
        ..Counters::default()
    };
    metrics.node.record_bpf_counters(&counters(0, 0));
    let text = exposition(&metrics);
    let refused = "nodemesh_capture_refused_connections_total";
    let inbound = [("direction", "inbound"), ("reason", "no_listener")];
    let outbound = [("direction", "outbound"), ("reason", "orig_dst_table_full")];
    assert_eq!(
        sample(&text, refused, &inbound),
        0.0,
        "both series exist from the first snapshot, so rate() has a start"
    );
    assert!(
        text.contains(&format!("# TYPE {refused} counter")),
        "{text}"
    );

    metrics.node.record_bpf_counters(&counters(3, 1));
    metrics.node.record_bpf_counters(&counters(5, 1));
    let text = exposition(&metrics);
    assert_eq!(sample(&text, refused, &inbound), 5.0);
    assert_eq!(sample(&text, refused, &outbound), 1.0);
    let event = |name| sample(&text, "nodemesh_bpf_events", &[("event", name)]);
    assert_eq!(
        event("outbound_proxy_bypass"),
        12.0,
        "expected, not a bypass"
    );
    assert_eq!(event("inbound_no_listener"), 5.0);
    assert!(
        !text.contains(&format!("{refused}{{direction=\"outbound\",reason=\"proxy")),
        "the proxy's own sockets are not refusals:\n{text}"
    );
}

#[test]
fn map_fill_is_exported_per_map() {
    let metrics = Metrics::new().expect("metrics register");
    metrics.node.set_bpf_map_fill(&[
        MapFill {
            map: "ENROLLED_NETNS",
            entries: 3,
            capacity: 4096,
        },
        MapFill {
            map: "ORIG_DST_BY_TUPLE",
            entries: 0,
            capacity: 65536,
        },
    ]);
    let text = exposition(&metrics);
    let enrolled = [("map", "ENROLLED_NETNS")];
    assert_eq!(sample(&text, "nodemesh_bpf_map_entries", &enrolled), 3.0);
    assert_eq!(
        sample(&text, "nodemesh_bpf_map_capacity", &enrolled),
        4096.0
    );
    let tuple = [("map", "ORIG_DST_BY_TUPLE")];
    assert_eq!(sample(&text, "nodemesh_bpf_map_entries", &tuple), 0.0);
}

#[test]
fn the_agent_process_is_exported_without_labels() {
    let text = exposition(&Metrics::new().expect("metrics register"));
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_threads",
        "process_start_time_seconds",
    ] {
        assert!(
            text.lines()
                .any(|line| line.starts_with(&format!("{name} "))),
            "{name} in\n{text}"
        );
    }
}

#[test]
fn series_of_departed_workloads_go_after_a_grace_period() {
    let metrics = Metrics::new().expect("metrics register");
    let labels = sleep_to_web();
    metrics.tcp.opened(&labels);
    metrics.tcp.closed(&labels, 10, 20);
    let opened = "istio_tcp_connections_opened_total";
    let has_series = |metrics: &Metrics| exposition(metrics).contains(&format!("{opened}{{"));
    let everyone = |_: &str, _: &str| true;
    let without_sleep = |workload: &str, _: &str| workload != "sleep";
    let (long, none) = (Duration::from_secs(3600), Duration::ZERO);
    metrics.forget_departed_after(&everyone, none);
    assert!(has_series(&metrics), "both workloads are here");
    metrics.forget_departed_after(&without_sleep, long);
    assert!(
        has_series(&metrics),
        "kept through the grace period, for a last scrape"
    );
    // Back within the grace period: kept, and no longer marked.
    metrics.forget_departed_after(&everyone, none);
    metrics.forget_departed_after(&without_sleep, long);
    assert!(has_series(&metrics));
    metrics.forget_departed_after(&without_sleep, none);
    assert!(!has_series(&metrics), "gone once the grace period is over");
    // A workload that comes back gets its series again, from zero.
    metrics.tcp.opened(&labels);
    assert_eq!(
        sample(
            &exposition(&metrics),
            opened,
            &[("source_workload", "sleep")]
        ),
        1.0
    );
}
