//! Bodies that count what crosses them, so a request's metrics, access log line and span
//! are recorded when its response has really ended (Istio's semantics), with its bytes
//! and gRPC status.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, Uri, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;

use super::{BoxError, ProxyBody, is_grpc};
use crate::{
    access_log::{AccessLog, Entry, Parties, RequestEnd, RequestFacts, Started},
    distributed_tracing::{RequestSpan, SpanKind, span_name},
    inventory::ObjectKey,
    metrics::{HttpMetrics, RequestOutcome, SeriesCache},
    proxy::ProxyContext,
    state::State,
};

/// Envoy's request id header: set at the source proxy when the client sent none, logged
/// at both ends, so one request's two access log lines share it.
pub const REQUEST_ID: &str = "x-request-id";

/// What one request's metrics, access log line and span need, gathered as it goes.
pub struct Record {
    pub started: Started,
    pub protocol: &'static str,
    pub request_bytes: Arc<AtomicU64>,
    pub flags: Vec<&'static str>,
    /// What the access log says beyond the metrics' labels; the request head's part is
    /// filled in from `head` only when the request is logged or traced.
    pub facts: RequestFacts,
    head: Head,
    /// The endpoint of the last attempt.
    pub upstream: Option<SocketAddr>,
    /// This proxy's span for the request, ended with it.
    pub span: Option<RequestSpan>,
}

impl Record {
    /// Starts the record of `request` with a span of `kind` named after `target`, which
    /// continues the trace context the request carries.
    pub fn traced<B>(
        proxy: &ProxyContext,
        kind: SpanKind,
        target: &str,
        request: &http::Request<B>,
    ) -> Self {
        let span =
            proxy
                .tracing
                .start(kind, span_name(request.method(), target), request.headers());
        Self::new(
            request.method(),
            request.uri(),
            request.headers(),
            Some(span),
        )
    }

    /// Starts the record of a request with this head, traced by `span`.
    pub fn new(method: &Method, uri: &Uri, headers: &HeaderMap, span: Option<RequestSpan>) -> Self {
        Self {
            started: Started::now(),
            protocol: if is_grpc(headers) { "grpc" } else { "http" },
            request_bytes: Arc::new(AtomicU64::new(0)),
            flags: Vec::new(),
            facts: RequestFacts {
                trace_id: span.as_ref().and_then(RequestSpan::trace_id),
                ..RequestFacts::default()
            },
            // Shared buffers, not copies: most requests are neither logged nor traced.
            head: Head {
                method: method.clone(),
                uri: uri.clone(),
                host: headers.get(header::HOST).cloned(),
                request_id: headers.get(REQUEST_ID).cloned(),
            },
            upstream: None,
            span,
        }
    }

    fn flags(&self) -> String {
        if self.flags.is_empty() {
            "-".into()
        } else {
            self.flags.join(",")
        }
    }

    /// Records the ended request in Istio's metrics, the access log and its span.
    fn finish(
        self,
        metered: &MeteredParties,
        proxy: &Outputs,
        response_code: u16,
        response_bytes: u64,
        grpc_status: Option<u32>,
    ) {
        let flags = self.flags();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let parties = &metered.parties;
        metered.series.record(
            &proxy.metrics,
            &parties.labels,
            &RequestOutcome {
                protocol: self.protocol,
                response_code,
                response_flags: &flags,
                grpc_status,
                duration: self.started.elapsed(),
                request_bytes,
                response_bytes,
            },
        );
        // Most requests are neither logged nor sampled: skip building their line.
        let span = self.span.filter(RequestSpan::is_recording);
        if !proxy.access_log.is_on() && span.is_none() {
            return;
        }
        let end = RequestEnd {
            protocol: self.protocol,
            response_code,
            grpc_status,
            response_flags: &flags,
            upstream: self.upstream,
            bytes_received: request_bytes,
            bytes_sent: response_bytes,
        };
        let facts = self.head.into_facts(self.facts);
        let entry = Entry::request(parties, &self.started, facts, &end);
        proxy.access_log.log(&entry);
        if let Some(span) = span {
            span.finish(&entry);
        }
    }
}

/// The request's head as the access log and the span describe it.
struct Head {
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
}

impl Head {
    fn into_facts(self, facts: RequestFacts) -> RequestFacts {
        let text = |value: HeaderValue| String::from_utf8_lossy(value.as_bytes()).into_owned();
        RequestFacts {
            method: Some(self.method.to_string()),
            path: Some(
                self.uri
                    .path_and_query()
                    .map_or("/", |pq| pq.as_str())
                    .to_string(),
            ),
            authority: self
                .host
                .map(text)
                .or_else(|| self.uri.authority().map(ToString::to_string)),
            request_id: self.request_id.map(text),
            ..facts
        }
    }
}

/// Where an ended request is recorded.
struct Outputs {
    metrics: HttpMetrics,
    access_log: Arc<AccessLog>,
}

/// The parties of a connection's requests and the metric series they were recorded in.
pub struct MeteredParties {
    pub parties: Parties,
    series: SeriesCache,
}

impl MeteredParties {
    pub fn new(parties: Parties) -> Arc<Self> {
        Arc::new(Self {
            parties,
            series: SeriesCache::default(),
        })
    }
}

/// A connection's last [`MeteredParties`], kept while the config and what it was built
/// for (the destination pod and Service) stay the same: the requests of a keep-alive
/// connection mostly share them, and building them (labels, identities, the metric series'
/// lookups) costs more than forwarding a small request.
#[derive(Default)]
pub struct PartiesMemo {
    last: Mutex<Option<Memo>>,
}

struct Memo {
    /// Weak: an idle connection must not keep an old config alive. It still keeps the
    /// allocation, so no later config can take its address and pass for it.
    state: Weak<State>,
    built_for: PartiesKey,
    parties: Arc<MeteredParties>,
}

/// What parties were built for, besides the config: the destination pod and Service.
type PartiesKey = (Option<ObjectKey>, Option<ObjectKey>);

impl PartiesMemo {
    /// The memo's parties when they were built for `state`, `destination` and `service`,
    /// else `build`'s (which become the memo's).
    pub fn get(
        &self,
        state: &Arc<State>,
        (destination, service): (Option<&ObjectKey>, Option<&ObjectKey>),
        build: impl FnOnce() -> Parties,
    ) -> Arc<MeteredParties> {
        let mut last = self.last.lock();
        if let Some(memo) = last.as_ref()
            && std::ptr::eq(memo.state.as_ptr(), Arc::as_ptr(state))
            && memo.built_for.0.as_ref() == destination
            && memo.built_for.1.as_ref() == service
        {
            return memo.parties.clone();
        }
        let parties = MeteredParties::new(build());
        *last = Some(Memo {
            state: Arc::downgrade(state),
            built_for: (destination.cloned(), service.cloned()),
            parties: parties.clone(),
        });
        parties
    }
}

/// Records the request in Istio's metrics, the access log and its span once the response
/// body is done.
pub fn meter(
    proxy: &ProxyContext,
    parties: Arc<MeteredParties>,
    record: Record,
    response: Response<ProxyBody>,
) -> Response<ProxyBody> {
    let status = response.status().as_u16();
    let outputs = Outputs {
        metrics: proxy.metrics.http.clone(),
        access_log: proxy.access_log.clone(),
    };
    let header_status = grpc_status(response.headers());
    response.map(move |body| {
        let on_done = Box::new(move |response_bytes: u64, grpc: Option<u32>| {
            record.finish(&parties, &outputs, status, response_bytes, grpc);
        });
        MeteredResponse::new(body, header_status, on_done).boxed()
    })
}

/// Called once when a response body ends, fails or is dropped: (bytes, gRPC status).
pub type OnDone = Box<dyn FnOnce(u64, Option<u32>) + Send + Sync>;

/// A response body that reports its size and gRPC status when it is done.
pub struct MeteredResponse {
    inner: ProxyBody,
    bytes: u64,
    grpc_status: Option<u32>,
    on_done: Option<OnDone>,
}

impl MeteredResponse {
    /// `grpc_status` is the status already known from the headers (a trailers-only reply).
    pub fn new(inner: ProxyBody, grpc_status: Option<u32>, on_done: OnDone) -> Self {
        Self {
            inner,
            bytes: 0,
            grpc_status,
            on_done: Some(on_done),
        }
    }

    fn finish(&mut self) {
        if let Some(on_done) = self.on_done.take() {
            on_done(self.bytes, self.grpc_status);
        }
    }
}

pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

impl Body for MeteredResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
                    self.grpc_status = Some(status);
                }
            }
            Poll::Ready(_) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredResponse {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A request body that adds its bytes to a shared counter as they pass.
pub struct CountedRequest {
    inner: ProxyBody,
    bytes: Arc<AtomicU64>,
}

impl CountedRequest {
    pub fn new(inner: ProxyBody, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl Body for CountedRequest {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
