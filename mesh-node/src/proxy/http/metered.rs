//! Bodies that count what crosses them, so a request's metrics are recorded when its
//! response has really ended (Istio's semantics), with its bytes and gRPC status.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::{BoxError, ProxyBody};

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
