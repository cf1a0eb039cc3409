use std::{io, sync::Arc};

use parking_lot::Mutex;

use super::*;
use crate::{inventory::ObjectKey, plan::admission::Refused, proxy::ProxyError};

/// A sink the test reads back.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().clone())
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect()
    }
}

/// The fields docs/observability.md promises on every line.
const FIELDS: &[&str] = &[
    "time",
    "kind",
    "direction",
    "reporter",
    "source_workload",
    "source_namespace",
    "source_principal",
    "source_ip",
    "destination_workload",
    "destination_namespace",
    "destination_principal",
    "service",
    "route",
    "upstream",
    "method",
    "path",
    "authority",
    "protocol",
    "response_code",
    "grpc_status",
    "response_flags",
    "duration_ms",
    "bytes_received",
    "bytes_sent",
    "trace_id",
    "request_id",
    "policy",
    "error",
];

fn reviews_parties() -> Parties {
    let productpage = Workload::for_test("node0", "default", "productpage", &[]);
    let reviews = Workload::for_test("node1", "default", "reviews", &[]);
    let service = Service {
        key: ObjectKey::new("default", "reviews"),
        cluster_ips: Vec::new(),
        ports: Vec::new(),
        endpoints: Vec::new(),
        external: None,
    };
    let source_id = Identity::new("cluster.local", "default", "productpage").unwrap();
    let destination_id = Identity::new("cluster.local", "default", "reviews").unwrap();
    Parties::new(
        Reporter::Source,
        Some(&productpage),
        Some(&reviews),
        Some(&service),
        Some((&source_id, &destination_id)),
        Some("10.244.0.10".parse().unwrap()),
    )
}

fn request(response_code: u16, response_flags: &str) -> Entry {
    let facts = RequestFacts {
        method: Some("GET".into()),
        path: Some("/reviews/1?x=y".into()),
        authority: Some("reviews:9080".into()),
        route: Some("v2-api".into()),
        request_id: Some("abc".into()),
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        policy: None,
    };
    let end = RequestEnd {
        protocol: "http",
        response_code,
        grpc_status: None,
        response_flags,
        upstream: Some("10.244.1.10:8080".parse().unwrap()),
        bytes_received: 3,
        bytes_sent: 120,
    };
    Entry::request(&reviews_parties(), &Started::now(), facts, &end)
}

#[test]
fn a_request_line_has_every_field_and_names_both_ends() {
    let buffer = Buffer::default();
    let log = AccessLog::new(AccessLogMode::Full, Box::new(buffer.clone()));
    log.log(&request(200, "-"));
    log.sync();
    let lines = buffer.lines();
    assert_eq!(lines.len(), 1);
    let line = &lines[0];
    for field in FIELDS {
        assert!(line.get(field).is_some(), "{field} missing from {line}");
    }
    assert_eq!(line.as_object().unwrap().len(), FIELDS.len(), "{line}");
    assert_eq!(line["kind"], "request");
    assert_eq!(line["direction"], "outbound");
    assert_eq!(line["reporter"], "source");
    assert_eq!(line["source_workload"], "productpage");
    assert_eq!(
        line["source_principal"],
        "spiffe://cluster.local/ns/default/sa/productpage"
    );
    assert_eq!(line["source_ip"], "10.244.0.10");
    assert_eq!(line["destination_workload"], "reviews");
    assert_eq!(
        line["destination_principal"],
        "spiffe://cluster.local/ns/default/sa/reviews"
    );
    assert_eq!(line["service"], "reviews.default.svc.cluster.local");
    assert_eq!(line["upstream"], "10.244.1.10:8080");
    assert_eq!(line["response_code"], 200);
    assert_eq!(line["response_flags"], "-");
    assert_eq!(line["bytes_received"], 3);
    assert_eq!(line["bytes_sent"], 120);
    assert_eq!(line["policy"], serde_json::Value::Null);
    // RFC 3339 in UTC, to the millisecond.
    let time = line["time"].as_str().unwrap();
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{time}"
    );
}

#[test]
fn sampling_keeps_every_failure() {
    let ok = request(200, "-");
    let server_error = request(503, "UF");
    let denied = Entry {
        policy: Some("default/deny-all".into()),
        ..request(403, "RBAC")
    };
    let never = || 0.99;
    let always = || 0.0;
    for failure in [&server_error, &denied] {
        assert!(failure.is_failure());
        assert!(AccessLogMode::Sampled(0.0).keeps(failure, never));
        assert!(!AccessLogMode::Off.keeps(failure, always));
    }
    assert!(!ok.is_failure());
    assert!(!AccessLogMode::Sampled(0.5).keeps(&ok, never));
    assert!(AccessLogMode::Sampled(0.5).keeps(&ok, always));
    assert!(AccessLogMode::Full.keeps(&ok, never));
    assert!(!AccessLogMode::Off.keeps(&ok, always));

    let buffer = Buffer::default();
    let log = AccessLog::new(AccessLogMode::Sampled(0.0), Box::new(buffer.clone()));
    for _ in 0..10 {
        log.log(&ok);
    }
    log.log(&server_error);
    log.sync();
    let lines = buffer.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["response_flags"], "UF");
}

#[test]
fn refused_connections_carry_the_flag_the_policy_and_the_error() {
    let denied = ProxyError::Refused(Refused::Denied {
        policy: "default/reviews-viewer".into(),
        reason: "no rule matched",
    });
    let entry = Entry::refused_connection(
        &reviews_parties(),
        &Started::now(),
        Some("10.244.1.10:8080".parse().unwrap()),
        denied.refusal(),
    );
    assert_eq!(entry.kind, Kind::Connection);
    assert_eq!(entry.protocol, "tcp");
    assert_eq!(entry.response_flags, "RBAC");
    assert_eq!(entry.policy.as_deref(), Some("default/reviews-viewer"));
    assert!(entry.error.as_deref().unwrap().contains("no rule matched"));
    assert_eq!(entry.response_code, None);
    assert!(entry.is_failure());

    let unroutable = ProxyError::NoEndpoint {
        service: "default/reviews".into(),
        port: 9080,
    };
    assert_eq!(unroutable.response_flags(), "UH");
    assert_eq!(
        ProxyError::ConnectTimeout("10.0.0.1:80".parse().unwrap()).response_flags(),
        "UF"
    );
    assert_eq!(
        ProxyError::Refused(Refused::MtlsRequired).response_flags(),
        "RBAC"
    );
    // Connections that waited for a failed tunnel dial report it as the dialler does.
    let timed_out = ProxyError::ConnectTimeout("10.0.0.1:15008".parse().unwrap());
    let shared = ProxyError::SharedDial(std::sync::Arc::new(timed_out));
    assert_eq!(shared.response_flags(), "UF");
    assert_eq!(shared.reason(), "connect_timeout");
    assert_eq!(
        shared.refusal().error,
        "connecting to 10.0.0.1:15008: timed out"
    );
}

#[test]
fn a_closed_connection_counts_bytes_from_the_clients_side() {
    let connection = ConnectionRecord {
        parties: reviews_parties(),
        started: Started::now(),
        upstream: "10.244.1.10:8080".parse().unwrap(),
    };
    let entry = connection.closed(10, 2000);
    assert_eq!(entry.kind, Kind::Connection);
    assert_eq!((entry.bytes_received, entry.bytes_sent), (10, 2000));
    assert_eq!(entry.response_flags, "-");
    assert!(!entry.is_failure());
    let line = serde_json::to_value(&entry).unwrap();
    assert_eq!(line["kind"], "connection");
    assert_eq!(line["method"], serde_json::Value::Null);
}

#[test]
fn unknown_peers_are_null_not_unknown() {
    let parties = Parties::new(Reporter::Destination, None, None, None, None, None);
    let line = serde_json::to_value(Entry::connection(
        &parties,
        &Started::now(),
        "10.0.0.1:80".parse().unwrap(),
        0,
        0,
    ))
    .unwrap();
    assert_eq!(line["direction"], "inbound");
    assert_eq!(line["reporter"], "destination");
    for field in ["source_workload", "source_principal", "service"] {
        assert_eq!(line[field], serde_json::Value::Null, "{field}");
    }
}

#[test]
fn modes_parse_and_print_back() {
    for text in ["off", "full", "sampled:0.1", "sampled:0", "sampled:1"] {
        let mode: AccessLogMode = text.parse().unwrap();
        assert_eq!(mode.to_string(), text);
        assert_eq!(serde_json::to_value(mode).unwrap(), text);
    }
    for bad in [
        "on",
        "sampled",
        "sampled:",
        "sampled:1.5",
        "sampled:-0.1",
        "Full",
    ] {
        let error = bad.parse::<AccessLogMode>().unwrap_err();
        assert!(error.contains("sampled:<ratio>"), "{bad}: {error}");
    }
}

/// A sink whose writes block until the test opens the gate, like a stdout nobody reads.
struct Blocked(std::sync::mpsc::Receiver<()>);

impl Write for Blocked {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let _ = self.0.recv();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_blocked_output_drops_lines_and_never_blocks_the_proxy() {
    let (gate, blocked) = std::sync::mpsc::channel();
    let log = Arc::new(AccessLog::new(
        AccessLogMode::Full,
        Box::new(Blocked(blocked)),
    ));
    let lines = super::QUEUE_LINES + 100;
    let (done, finished) = std::sync::mpsc::channel();
    let logger = log.clone();
    std::thread::spawn(move || {
        for _ in 0..lines {
            logger.log(&request(200, "-"));
        }
        let _ = done.send(());
    });
    assert!(
        finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .is_ok(),
        "logging waited for an output that never drains"
    );
    assert!(log.dropped() >= 99, "dropped {} of {lines}", log.dropped());
    drop(gate);
}
