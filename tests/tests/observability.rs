//! End to end: access logs and distributed tracing. One request allowed and one denied by
//! an AuthorizationPolicy leave an access log line at each node proxy, with the fields
//! users search for; a request with a `traceparent` keeps its trace id across both
//! proxies, and both proxies' spans reach an OTLP collector stand-in that decodes the real
//! protobuf.
use std::{
    convert::Infallible,
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use mesh_tests::{
    Cluster, Pod, PodProcess,
    bookinfo::{self, APP_PORT},
    scenario::{CONVERGE_TIMEOUT, connect, skip, wait_enrolled, wait_until},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    trace::v1::{Span, span::SpanKind},
};
use prost::Message;
use serde_json::Value;

const REVIEWS_IP: &str = "10.96.0.20";
const TCP_PORT: u16 = 7000;
/// Spans leave in batches every 5 s (the SDK's default schedule).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// The trace the client's request belongs to, and the client's own span.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// Only GET on /public: POST /admin is denied at the destination, and so is a plain TCP
/// connection (no request to match the rule against).
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

/// A named route, so the source's lines say which rule routed the request.
const REVIEWS_ROUTE: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: reviews-all
    route:
    - destination: {host: reviews}
";

/// Every access log line has these (`null` when unknown).
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
    "protocol",
    "response_code",
    "response_flags",
    "duration_ms",
    "bytes_sent",
    "bytes_received",
    "trace_id",
    "request_id",
    "policy",
];

/// `productpage` on node0 calls `reviews-v1` on node1 (Service `reviews`, port 9080
/// named `http`); the agents log every connection and request and export spans.
struct Scene {
    cluster: Cluster,
    productpage: Pod,
    reviews: Pod,
    collector: Collector,
    _servers: Vec<PodProcess>,
}

fn scene(test: &str) -> Scene {
    let mut cluster = Cluster::new(test, 2);
    let productpage = bookinfo::add_productpage(&mut cluster, 0);
    let reviews = bookinfo::add_reviews(&mut cluster, "v1", 1);
    bookinfo::write_reviews_service(&cluster, REVIEWS_IP);
    cluster.write_config("authz.yaml", REVIEWS_VIEWER);
    cluster.write_config("vs.yaml", REVIEWS_ROUTE);
    let http = bookinfo::serve_http(&cluster, &reviews);
    let tcp = bookinfo::serve_tcp(&cluster, &reviews, TCP_PORT, "reviews-tcp");

    // The collector listens on node0's address, which node1 reaches over the fabric.
    let collector = Collector::start(&cluster, SocketAddr::from((cluster.node_ip(0), 0)));
    let endpoint = format!("http://{}", collector.addr);
    for i in 0..2 {
        cluster.start_agent(i, &["--access-log", "full", "--otlp-endpoint", &endpoint]);
    }
    wait_enrolled(&cluster, 0, 1);
    wait_enrolled(&cluster, 1, 1);
    Scene {
        cluster,
        productpage,
        reviews,
        collector,
        _servers: vec![http, tcp],
    }
}

impl Scene {
    /// One request from productpage to the reviews Service; its response line.
    fn request(&self, method: &str, path: &str, headers: &[&str]) -> Value {
        let url = format!("http://{REVIEWS_IP}:9080{path}");
        let mut args = vec!["--method", method];
        for header in headers {
            args.extend(["--header", header]);
        }
        bookinfo::http(&self.cluster, &self.productpage, &url, &args).remove(0)
    }

    /// The access log lines node `i`'s agent wrote so far (its log's JSON lines with a
    /// `kind`; the agent's own log lines are text).
    fn access_log(&self, i: usize) -> Vec<Value> {
        self.cluster.access_log(i)
    }

    /// Waits for node `i`'s line that `matches`.
    fn line(&self, i: usize, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        wait_until(CONVERGE_TIMEOUT, &format!("{what} on node{i}"), || {
            self.access_log(i).into_iter().find(&matches)
        })
    }
}

fn request_line(reporter: &'static str, path: &'static str) -> impl Fn(&Value) -> bool {
    move |line| line["kind"] == "request" && line["reporter"] == reporter && line["path"] == path
}

fn assert_fields(line: &Value) {
    for field in FIELDS {
        assert!(line.get(field).is_some(), "no {field:?} in {line}");
    }
    let time = line["time"].as_str().expect("time is a string");
    assert!(
        time.contains('T') && time.ends_with('Z'),
        "time {time} is not RFC 3339 UTC"
    );
    assert!(line["duration_ms"].is_u64(), "{line}");
}

/// The source and destination lines of one request agree on who talked to whom.
fn assert_both_ends(source: &Value, destination: &Value, scene: &Scene) {
    for line in [source, destination] {
        assert_fields(line);
        assert_eq!(line["source_workload"], "productpage", "{line}");
        assert_eq!(line["source_namespace"], "default", "{line}");
        assert_eq!(
            line["source_principal"], "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
            "{line}"
        );
        assert_eq!(
            line["source_ip"],
            scene.productpage.ip.to_string(),
            "{line}"
        );
        assert_eq!(line["destination_workload"], "reviews-v1", "{line}");
        assert_eq!(line["destination_namespace"], "default", "{line}");
        assert_eq!(
            line["destination_principal"], "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
            "{line}"
        );
        assert_eq!(
            line["service"], "reviews.default.svc.cluster.local",
            "{line}"
        );
        assert_eq!(
            line["upstream"],
            format!("{}:{APP_PORT}", scene.reviews.ip),
            "{line}"
        );
        assert_eq!(line["protocol"], "http", "{line}");
        assert!(line["request_id"].is_string(), "{line}");
        assert!(
            line["trace_id"].as_str().is_some_and(|t| t.len() == 32),
            "{line}"
        );
    }
    assert_eq!(source["direction"], "outbound");
    assert_eq!(destination["direction"], "inbound");
    assert_eq!(
        source["request_id"], destination["request_id"],
        "one request id at both ends"
    );
    assert_eq!(source["trace_id"], destination["trace_id"]);
    assert_eq!(source["route"], "reviews-all", "the source names the rule");
}

#[test]
fn access_logs_and_traces_follow_a_request_across_both_proxies() {
    if skip() {
        return;
    }
    let scene = scene("observability");

    // Allowed, with a sampled trace context from the client.
    let traceparent = format!("traceparent: 00-{TRACE}-{CLIENT_SPAN}-01");
    let allowed = scene.request("GET", "/public/page", &[&traceparent]);
    assert_eq!(allowed["status"], 200, "{allowed}");
    let echoed: Value = serde_json::from_str(allowed["body"].as_str().expect("a body"))
        .expect("the backend describes the request");
    let seen = echoed["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("the backend got no traceparent: {echoed}"));
    let seen: Vec<&str> = seen.split('-').collect();
    assert_eq!(seen[1], TRACE, "the trace id survives both proxies");
    assert_ne!(
        seen[2], CLIENT_SPAN,
        "the backend's parent is the destination's span"
    );
    assert_eq!(seen[3], "01", "the client's sampling decision is kept");
    let backend_parent = seen[2].to_string();

    // Denied at the destination by the AuthorizationPolicy.
    let denied = scene.request("POST", "/admin", &[]);
    assert_eq!(denied["status"], 403, "{denied}");

    // Access logs: both requests, at both ends.
    let source = scene.line(
        0,
        "the allowed request's source line",
        request_line("source", "/public/page"),
    );
    let destination = scene.line(
        1,
        "the allowed request's destination line",
        request_line("destination", "/public/page"),
    );
    assert_both_ends(&source, &destination, &scene);
    for line in [&source, &destination] {
        assert_eq!(line["method"], "GET");
        assert_eq!(line["response_code"], 200);
        assert_eq!(line["response_flags"], "-");
        assert_eq!(line["trace_id"], TRACE);
        assert_eq!(line["policy"], Value::Null);
        assert!(line["bytes_sent"].as_u64().unwrap() > 0, "{line}");
    }
    let source = scene.line(
        0,
        "the denied request's source line",
        request_line("source", "/admin"),
    );
    let destination = scene.line(
        1,
        "the denied request's destination line",
        request_line("destination", "/admin"),
    );
    assert_both_ends(&source, &destination, &scene);
    for line in [&source, &destination] {
        assert_eq!(line["method"], "POST");
        assert_eq!(line["response_code"], 403, "{line}");
    }
    assert_eq!(destination["response_flags"], "RBAC");
    assert!(destination["policy"].is_string(), "{destination}");

    // A plain TCP connection: no request to match, so the destination denies it at L4.
    let tcp_target = format!("{}:{TCP_PORT}", scene.reviews.ip);
    let refused = connect(&scene.cluster, &scene.productpage, &tcp_target, 1);
    assert!(!refused.status.success(), "the connection should be denied");
    let connection = |reporter: &'static str| {
        let tcp_target = tcp_target.clone();
        move |line: &Value| {
            line["kind"] == "connection"
                && line["reporter"] == reporter
                && line["upstream"] == tcp_target.as_str()
        }
    };
    let source = scene.line(0, "the TCP connection's source line", connection("source"));
    let destination = scene.line(1, "the TCP connection's denial", connection("destination"));
    for line in [&source, &destination] {
        assert_fields(line);
        assert_eq!(line["protocol"], "tcp", "{line}");
        assert_eq!(line["source_workload"], "productpage", "{line}");
    }
    assert_eq!(destination["response_flags"], "RBAC", "{destination}");
    assert!(destination["policy"].is_string(), "{destination}");
    assert!(destination["error"].is_string(), "{destination}");

    // Spans: the source proxy's CLIENT span under the client's span, the destination
    // proxy's SERVER span under it, and the backend's parent is the SERVER span.
    let spans = wait_until(
        EXPORT_TIMEOUT,
        "both proxies' spans at the collector",
        || {
            let spans = scene.collector.spans_of(TRACE);
            let has = |kind: SpanKind| spans.iter().any(|s| s.kind == kind as i32);
            (has(SpanKind::Client) && has(SpanKind::Server)).then_some(spans)
        },
    );
    let one = |kind: SpanKind| -> &Span {
        let found: Vec<&Span> = spans.iter().filter(|s| s.kind == kind as i32).collect();
        assert_eq!(found.len(), 1, "one {kind:?} span: {spans:?}");
        found[0]
    };
    let (client, server) = (one(SpanKind::Client), one(SpanKind::Server));
    assert_eq!(hex(&client.parent_span_id), CLIENT_SPAN);
    assert_eq!(hex(&server.parent_span_id), hex(&client.span_id));
    assert_eq!(hex(&server.span_id), backend_parent);
    for span in [client, server] {
        assert_eq!(
            span.name, "GET reviews.default.svc.cluster.local",
            "{span:?}"
        );
        let status = attribute(span, "http.status_code");
        assert_eq!(status.as_deref(), Some("200"), "{span:?}");
        assert_eq!(attribute(span, "url.path").as_deref(), Some("/public/page"));
        assert_eq!(
            attribute(span, "destination.workload").as_deref(),
            Some("reviews-v1")
        );
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        Any::StringValue(s) => Some(s.clone()),
        Any::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// === the OTLP collector stand-in ===

/// Accepts OTLP/HTTP posts (`POST /v1/traces`, protobuf) and keeps the spans.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    /// Listens on `addr` inside node0's netns (a socket stays in the netns it was made
    /// in), served from a thread of its own.
    fn start(cluster: &Cluster, addr: SocketAddr) -> Self {
        let listener = cluster
            .run_in_node(0, || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("collector on {addr}: {e}"));
        let addr = listener.local_addr().expect("bound");
        listener.set_nonblocking(true).expect("nonblocking");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        // Detached: it ends with the test process.
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(serve(listener, kept));
        });
        Self { addr, spans }
    }

    fn spans_of(&self, trace: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|span| hex(&span.trace_id) == trace)
            .cloned()
            .collect()
    }
}

async fn serve(listener: TcpListener, spans: Arc<Mutex<Vec<Span>>>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
    while let Ok((stream, _)) = listener.accept().await {
        let spans = spans.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let spans = spans.clone();
            async move { Ok::<_, Infallible>(export(request, &spans).await) }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}

/// One export: the decoded spans are kept; anything else is answered 400 so the agent
/// logs it.
async fn export(request: Request<Incoming>, spans: &Mutex<Vec<Span>>) -> Response<Full<Bytes>> {
    let answer = |status: u16, body: &str| {
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = status.try_into().expect("a status");
        response
    };
    let protobuf = request
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/x-protobuf");
    if request.method() != "POST" || request.uri().path() != "/v1/traces" || !protobuf {
        return answer(400, "want POST /v1/traces with application/x-protobuf");
    }
    let Ok(body) = request.into_body().collect().await else {
        return answer(400, "body");
    };
    match ExportTraceServiceRequest::decode(body.to_bytes()) {
        Ok(export) => {
            let received = export
                .resource_spans
                .into_iter()
                .flat_map(|r| r.scope_spans)
                .flat_map(|s| s.spans);
            spans.lock().unwrap().extend(received);
            let mut response = answer(200, "");
            response.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/x-protobuf"),
            );
            response
        }
        Err(error) => answer(400, &format!("not an ExportTraceServiceRequest: {error}")),
    }
}
