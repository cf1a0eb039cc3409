//! L7: HTTP/1.1, HTTP/2 and gRPC (h2c) through the node proxy.
//!
//! A connection is HTTP when its Service port says so (Istio's rule: `appProtocol` or a
//! port name prefix) or when its first bytes are an HTTP/1 request line or the HTTP/2
//! preface; anything else stays L4. The source node routes each request (VirtualService,
//! HTTPRoute, DestinationRule); the destination node authorizes each request. Both count
//! Istio's request metrics.
mod cluster;
pub mod inbound;
mod metered;
pub mod outbound;
mod upstream;

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
pub use cluster::Clusters;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
pub use upstream::UpstreamPool;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy hands on: the client's or upstream's, streamed, or a local one.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// How long the proxy waits for a client's first bytes before deciding the connection
/// is not HTTP (a server-first protocol) and relaying it at L4.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(200);
/// Bytes that tell HTTP/1 from anything else: the longest method plus a space.
const SNIFF_BYTES: usize = 16;
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
const HTTP1_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Whether `prefix` (the first bytes a client sent) starts an HTTP/1 request or the
/// HTTP/2 preface; `None` while too few bytes have arrived to tell.
fn looks_like_http(prefix: &[u8]) -> Option<bool> {
    if HTTP2_PREFACE.starts_with(prefix) && prefix.len() < HTTP2_PREFACE.len() {
        return None;
    }
    if prefix.starts_with(HTTP2_PREFACE) {
        return Some(true);
    }
    for method in HTTP1_METHODS {
        let request_line = format!("{method} ");
        let request_line = request_line.as_bytes();
        if prefix.starts_with(request_line) {
            return Some(true);
        }
        if request_line.starts_with(prefix) {
            return None;
        }
    }
    Some(false)
}

/// Reads the client's first bytes (up to [`SNIFF_TIMEOUT`]) and says whether they are
/// HTTP; the bytes are kept in front of the stream either way.
pub async fn sniff<S: AsyncRead + Unpin>(mut stream: S) -> (Prefixed<S>, bool) {
    let mut prefix = Vec::with_capacity(SNIFF_BYTES);
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let is_http = loop {
        if let Some(verdict) = looks_like_http(&prefix) {
            break verdict;
        }
        let mut chunk = [0u8; SNIFF_BYTES];
        let want = SNIFF_BYTES - prefix.len();
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Ok(Ok(n)) if n > 0 => prefix.extend_from_slice(&chunk[..n]),
            // Closed, failed or silent: not something to parse as HTTP.
            _ => break false,
        }
    };
    (Prefixed::new(Bytes::from(prefix), stream), is_http)
}

/// The most of a request's head [`peek_host`] reads for its Host.
const HOST_PEEK_BYTES: usize = 16 * 1024;

/// Reads the first HTTP/1 request's head, within the sniffing time and at most 16 KiB, and
/// returns its `Host`, every byte read put back in front of the stream. `None`: not HTTP/1,
/// no Host, or too slow or too long to tell.
pub async fn peek_host<S: AsyncRead + Unpin>(mut stream: S) -> (Prefixed<S>, Option<String>) {
    let mut head = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let host = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                break request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("host"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(|h| h.trim().to_owned());
            }
            Ok(httparse::Status::Partial) if head.len() < HOST_PEEK_BYTES => {}
            _ => break None,
        }
        let mut chunk = [0u8; 4096];
        let want = chunk.len().min(HOST_PEEK_BYTES - head.len());
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
            _ => break None,
        }
    };
    (Prefixed::new(Bytes::from(head), stream), host)
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// The bytes not read yet (which the stream then no longer has), and the stream they
    /// came from.
    pub fn take_prefix(&mut self) -> (Bytes, &mut S) {
        (std::mem::take(&mut self.prefix), &mut self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves HTTP/1.1 or HTTP/2 (whichever the client speaks) on `io`, one `handler` call
/// per request, upgrades allowed. Once `drain` is cancelled the connection finishes the
/// request in flight and closes (HTTP/2: GOAWAY), so the client's next request goes on a
/// new connection, to the agent that took over.
pub async fn serve_connection<S, H, F>(
    io: S,
    drain: &CancellationToken,
    handler: H,
) -> Result<(), BoxError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(request).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that never finishes its headers, or keeps an HTTP/1.1 connection idle, is
    // let go after a while (hyper times from when the connection waits for a request), and
    // an HTTP/2 peer that stops answering pings is dropped: one pod cannot hold the node's
    // sockets with silent connections.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(crate::accept::HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .max_header_list_size(MAX_HEADER_LIST_SIZE);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => return served,
        () = drain.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    connection.await
}

/// HTTP/2 pings on connections the proxy serves, and how long an answer may take.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Envoy's default limit on a request's headers (60 KiB), so a peer cannot make the proxy
/// buffer megabytes of them.
const MAX_HEADER_LIST_SIZE: u32 = 60 * 1024;

pub fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn incoming(body: Incoming) -> ProxyBody {
    body.map_err(BoxError::from).boxed()
}

/// A response the proxy makes itself, as Envoy does: a short text body.
pub fn local_response(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Headers that belong to one hop and must not be forwarded (RFC 9110 §7.6.1); `te:
/// trailers` stays, gRPC needs it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// Drops the hop-by-hop headers of a request about to be forwarded; an upgrade keeps the
/// two that ask the next hop to switch protocols.
pub fn strip_hop_by_hop_for_forwarding(headers: &mut HeaderMap, upgrade: bool) {
    let kept = upgrade.then(|| {
        [header::CONNECTION, header::UPGRADE]
            .map(|name| (name.clone(), headers.get(&name).cloned()))
    });
    strip_hop_by_hop(headers);
    for (name, value) in kept.into_iter().flatten() {
        if let Some(value) = value {
            headers.insert(name, value);
        }
    }
}

/// Whether the request asks to switch protocols (WebSocket and friends), which the proxy
/// passes through on a connection of its own.
pub fn is_upgrade(request: &Request<Incoming>) -> bool {
    request.version() <= http::Version::HTTP_11 && request.headers().contains_key(header::UPGRADE)
}

/// Relays the two upgraded halves of a switched connection until both are done.
pub fn splice_upgrade(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match (downstream.await, upstream.await) {
            (Ok(downstream), Ok(upstream)) => {
                let (mut downstream, mut upstream) =
                    (TokioIo::new(downstream), TokioIo::new(upstream));
                let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
            }
            (downstream, upstream) => tracing::debug!(
                downstream = ?downstream.err(),
                upstream = ?upstream.err(),
                "protocol upgrade failed"
            ),
        }
    });
}

/// gRPC: `application/grpc` and its `+proto`/`+json` variants.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests;
