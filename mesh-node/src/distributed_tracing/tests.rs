use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, any_value},
    trace::v1::span::SpanKind as ProtoKind,
};
use prost::Message;
use tokio::{net::TcpListener, sync::mpsc};

use super::{propagation::*, *};
use crate::{
    access_log::{Parties, RequestEnd, RequestFacts, Started},
    inventory::Workload,
    metrics::Reporter,
};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.insert(*name, HeaderValue::from_str(value).unwrap());
    }
    headers
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

fn tracing(sampling_percent: f64) -> Tracing {
    let config = TraceConfig {
        otlp_endpoint: None,
        sampling_percent,
        node: "node0".into(),
    };
    Tracing::new(&config, tokio::runtime::Handle::current()).unwrap()
}

/// The traceparent a proxy hands on: (trace id, span id, flags).
fn traceparent(headers: &HeaderMap) -> (String, String, String) {
    let value = header(headers, TRACEPARENT).expect("a traceparent");
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!((parts.len(), parts[0]), (4, "00"), "{value}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

// === propagation ===

#[test]
fn w3c_context_is_read_with_its_state() {
    let extracted = extract(&headers(&[
        (TRACEPARENT, &format!("00-{TRACE}-{CALLER_SPAN}-01")),
        (TRACESTATE, "vendor=abc,other=1"),
    ]));
    let parent = extracted.parent.expect("a parent");
    assert_eq!(parent.trace_id.to_string(), TRACE);
    assert_eq!(parent.span_id.to_string(), CALLER_SPAN);
    assert_eq!(parent.sampled, Some(true));
    assert_eq!(parent.trace_state.header(), "vendor=abc,other=1");
    assert_eq!(
        extracted.formats,
        Formats {
            w3c: true,
            ..Formats::default()
        }
    );
}

#[test]
fn b3_is_read_in_both_forms_and_short_trace_ids_widen() {
    let multi = extract(&headers(&[
        (B3_TRACE_ID, "a3ce929d0e0e4736"),
        (B3_SPAN_ID, CALLER_SPAN),
    ]))
    .parent
    .unwrap();
    assert_eq!(
        multi.trace_id.to_string(),
        "0000000000000000a3ce929d0e0e4736"
    );
    assert_eq!(
        multi.sampled, None,
        "no x-b3-sampled: the decision is deferred"
    );

    let debug = extract(&headers(&[
        (B3_TRACE_ID, TRACE),
        (B3_SPAN_ID, CALLER_SPAN),
        (B3_SAMPLED, "0"),
        (B3_FLAGS, "1"),
    ]))
    .parent
    .unwrap();
    assert_eq!(debug.sampled, Some(true), "debug implies sampled");

    for (value, sampled) in [
        (format!("{TRACE}-{CALLER_SPAN}"), None),
        (format!("{TRACE}-{CALLER_SPAN}-1"), Some(true)),
        (format!("{TRACE}-{CALLER_SPAN}-d"), Some(true)),
        (
            format!("{TRACE}-{CALLER_SPAN}-0-e457b5a2e4d86bd1"),
            Some(false),
        ),
    ] {
        let parent = extract(&headers(&[(B3_SINGLE, &value)]))
            .parent
            .unwrap_or_else(|| panic!("{value} has a parent"));
        assert_eq!(parent.trace_id.to_string(), TRACE, "{value}");
        assert_eq!(parent.sampled, sampled, "{value}");
    }
}

#[test]
fn malformed_contexts_are_no_context_and_w3c_wins() {
    for bad in [
        vec![(
            TRACEPARENT,
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        )],
        vec![(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        )],
        vec![(TRACEPARENT, "garbage")],
        vec![(B3_SINGLE, "1")],
        vec![(B3_SINGLE, "4bf92f3577b34da6-00f067aa0ba902b7-x")],
        vec![(B3_TRACE_ID, "xyz"), (B3_SPAN_ID, CALLER_SPAN)],
        vec![(B3_TRACE_ID, TRACE)],
    ] {
        assert_eq!(extract(&headers(&bad)).parent, None, "{bad:?}");
    }
    let both = extract(&headers(&[
        (TRACEPARENT, &format!("00-{TRACE}-{CALLER_SPAN}-00")),
        (B3_TRACE_ID, "1111111111111111"),
        (B3_SPAN_ID, "2222222222222222"),
    ]));
    assert_eq!(both.parent.unwrap().trace_id.to_string(), TRACE);
    assert!(both.formats.w3c && both.formats.b3_multi);
}

// === spans and what they hand on ===

#[tokio::test]
async fn a_sampled_caller_gets_a_child_span_in_its_own_formats() {
    let tracing = tracing(0.0);
    let incoming = headers(&[
        (TRACEPARENT, &format!("00-{TRACE}-{CALLER_SPAN}-01")),
        (TRACESTATE, "vendor=abc"),
        (B3_SINGLE, &format!("{TRACE}-{CALLER_SPAN}-1")),
    ]);
    let span = tracing.start(SpanKind::Client, "GET reviews".into(), &incoming);
    assert_eq!(span.trace_id().as_deref(), Some(TRACE));
    let mut forwarded = incoming.clone();
    span.inject(&mut forwarded);
    let (trace, span_id, flags) = traceparent(&forwarded);
    assert_eq!(trace, TRACE, "the trace id is kept");
    assert_ne!(span_id, CALLER_SPAN, "the proxy's span is the new parent");
    assert_eq!(flags, "01", "the caller's decision is kept at 0% sampling");
    assert_eq!(header(&forwarded, TRACESTATE), Some("vendor=abc"));
    assert_eq!(
        header(&forwarded, B3_SINGLE),
        Some(format!("{TRACE}-{span_id}-1-{CALLER_SPAN}").as_str())
    );
    assert_eq!(
        header(&forwarded, B3_TRACE_ID),
        None,
        "not a format it came in"
    );
}

#[tokio::test]
async fn an_unsampled_caller_stays_unsampled() {
    let tracing = tracing(100.0);
    let incoming = headers(&[
        (B3_TRACE_ID, TRACE),
        (B3_SPAN_ID, CALLER_SPAN),
        (B3_SAMPLED, "0"),
    ]);
    let span = tracing.start(SpanKind::Server, "GET reviews".into(), &incoming);
    let mut forwarded = incoming.clone();
    span.inject(&mut forwarded);
    assert_eq!(traceparent(&forwarded).2, "00");
    assert_eq!(header(&forwarded, B3_SAMPLED), Some("0"));
    assert_eq!(header(&forwarded, B3_TRACE_ID), Some(TRACE));
    assert_eq!(header(&forwarded, B3_PARENT_SPAN_ID), Some(CALLER_SPAN));
    assert_ne!(header(&forwarded, B3_SPAN_ID), Some(CALLER_SPAN));
}

#[tokio::test]
async fn without_a_context_a_trace_starts_at_the_sampling_rate() {
    for (percent, flags) in [(100.0, "01"), (0.0, "00")] {
        let span = tracing(percent).start(SpanKind::Client, "GET x".into(), &HeaderMap::new());
        let mut forwarded = HeaderMap::new();
        span.inject(&mut forwarded);
        let (trace, span_id, sampled) = traceparent(&forwarded);
        assert_eq!(sampled, flags, "at {percent}%");
        assert_eq!(span.trace_id(), Some(trace.clone()));
        // A new trace is announced in B3 too, without a parent.
        assert_eq!(header(&forwarded, B3_TRACE_ID), Some(trace.as_str()));
        assert_eq!(header(&forwarded, B3_SPAN_ID), Some(span_id.as_str()));
        assert_eq!(header(&forwarded, B3_PARENT_SPAN_ID), None);
    }
}

#[tokio::test]
async fn a_deferred_b3_decision_is_made_at_the_sampling_rate() {
    let incoming = headers(&[(B3_TRACE_ID, TRACE), (B3_SPAN_ID, CALLER_SPAN)]);
    for (percent, sampled) in [(100.0, "1"), (0.0, "0")] {
        let span = tracing(percent).start(SpanKind::Client, "GET x".into(), &incoming);
        let mut forwarded = incoming.clone();
        span.inject(&mut forwarded);
        assert_eq!(
            header(&forwarded, B3_SAMPLED),
            Some(sampled),
            "at {percent}%"
        );
        assert_eq!(traceparent(&forwarded).0, TRACE);
    }
}

#[test]
fn the_traces_path_is_added_unless_given() {
    let url = |s: &str| traces_url(&s.parse().unwrap());
    assert_eq!(url("http://c:4318"), "http://c:4318/v1/traces");
    assert_eq!(url("http://c:4318/"), "http://c:4318/v1/traces");
    assert_eq!(url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
    assert_eq!(url("http://c:4318/custom"), "http://c:4318/custom");
}

// === export ===

/// An OTLP/HTTP collector on loopback that decodes what it is sent.
async fn collector() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sender, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sender = sender.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let sender = sender.clone();
                async move {
                    assert_eq!(request.uri().path(), "/v1/traces");
                    assert_eq!(request.headers()["content-type"], "application/x-protobuf");
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    let decoded = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let _ = sender.send(decoded);
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, received)
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_as_protobuf() {
    let (addr, mut received) = collector().await;
    let config = TraceConfig {
        otlp_endpoint: Some(format!("http://{addr}").parse().unwrap()),
        sampling_percent: 0.0,
        node: "node0".into(),
    };
    let tracing = Arc::new(Tracing::new(&config, tokio::runtime::Handle::current()).unwrap());
    let incoming = headers(&[(TRACEPARENT, &format!("00-{TRACE}-{CALLER_SPAN}-01"))]);
    let span = tracing.start(
        SpanKind::Client,
        "GET reviews.default.svc.cluster.local".into(),
        &incoming,
    );
    let mut forwarded = incoming.clone();
    span.inject(&mut forwarded);
    let (_, span_id, _) = traceparent(&forwarded);

    let productpage = Workload::for_test("node0", "default", "productpage", &[]);
    let parties = Parties::new(Reporter::Source, Some(&productpage), None, None, None, None);
    let facts = RequestFacts {
        method: Some("GET".into()),
        path: Some("/reviews/1".into()),
        ..RequestFacts::default()
    };
    let end = RequestEnd {
        protocol: "http",
        response_code: 503,
        grpc_status: None,
        response_flags: "UF",
        upstream: Some("10.244.1.10:8080".parse().unwrap()),
        bytes_received: 0,
        bytes_sent: 19,
    };
    span.finish(&Entry::request(&parties, &Started::now(), facts, &end));
    let flushing = tracing.clone();
    tokio::task::spawn_blocking(move || flushing.shutdown())
        .await
        .unwrap();

    let export = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .expect("an export within 10 s")
        .unwrap();
    let resource = export.resource_spans[0].resource.as_ref().unwrap();
    assert!(
        resource
            .attributes
            .iter()
            .any(|kv| kv.key == "service.name" && text(kv.value.as_ref().unwrap()) == "nodemesh")
    );
    let spans: Vec<_> = export
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .collect();
    assert_eq!(spans.len(), 1, "{spans:?}");
    let exported = spans[0];
    assert_eq!(exported.name, "GET reviews.default.svc.cluster.local");
    assert_eq!(exported.kind, ProtoKind::Client as i32);
    assert_eq!(hex(&exported.trace_id), TRACE);
    assert_eq!(hex(&exported.span_id), span_id);
    assert_eq!(hex(&exported.parent_span_id), CALLER_SPAN);
    let attribute = |key: &str| {
        exported
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .map(|kv| text(kv.value.as_ref().unwrap()))
    };
    assert_eq!(attribute("http.method").as_deref(), Some("GET"));
    assert_eq!(attribute("http.status_code").as_deref(), Some("503"));
    assert_eq!(attribute("url.path").as_deref(), Some("/reviews/1"));
    assert_eq!(attribute("response_flags").as_deref(), Some("UF"));
    assert_eq!(
        attribute("upstream.address").as_deref(),
        Some("10.244.1.10:8080")
    );
    assert_eq!(attribute("source.workload").as_deref(), Some("productpage"));
    assert_eq!(attribute("destination.workload"), None);
    // A 5xx fails the span.
    assert_eq!(exported.status.as_ref().map(|s| s.code), Some(2));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
