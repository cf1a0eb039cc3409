//! The request body as the attempts send it: buffered when it is small enough that a retry
//! or a mirror can replay it, else streamed through once.
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};

use super::super::{
    ProxyBody, empty, full, incoming,
    metered::{CountedRequest, Record},
};
use crate::routing::RetryPolicy;

/// Request bodies up to this size are buffered so a retry or a mirror can replay them;
/// larger or streaming bodies (gRPC, chunked uploads) go through once, without retries.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// The request's body, replayable when buffered.
pub(super) enum RequestBody {
    Buffered(Bytes),
    Streaming(Option<ProxyBody>),
}

impl RequestBody {
    /// Buffers `body` when it may be replayed (plain HTTP, no upgrade, a known size up to
    /// [`MAX_REPLAY_BODY`]), counting its bytes in `record`; else wraps it to stream.
    pub(super) async fn read(
        body: Incoming,
        record: &Record,
        upgrading: bool,
    ) -> Result<Self, hyper::Error> {
        let replayable = record.protocol == "http"
            && !upgrading
            && (body.is_end_stream()
                || body
                    .size_hint()
                    .upper()
                    .is_some_and(|n| n <= MAX_REPLAY_BODY));
        if !replayable {
            let counted = CountedRequest::new(incoming(body), record.request_bytes.clone());
            return Ok(RequestBody::Streaming(Some(counted.boxed())));
        }
        let bytes = body.collect().await?.to_bytes();
        record
            .request_bytes
            .store(bytes.len() as u64, Ordering::Relaxed);
        Ok(RequestBody::Buffered(bytes))
    }

    /// How many attempts the body allows: a streamed body can be sent only once.
    pub(super) fn max_attempts(&self, retries: &RetryPolicy) -> u32 {
        match self {
            RequestBody::Buffered(_) => 1 + retries.attempts,
            RequestBody::Streaming(_) => 1,
        }
    }

    /// The body for the next attempt: a copy of the buffered one, or the stream (once).
    pub(super) fn for_attempt(&mut self) -> ProxyBody {
        match self {
            RequestBody::Buffered(bytes) => full(bytes.clone()),
            RequestBody::Streaming(body) => body.take().unwrap_or_else(empty),
        }
    }
}
