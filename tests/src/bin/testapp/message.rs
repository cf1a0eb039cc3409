//! What the HTTP server and the clients share about a message: one body type for requests
//! and responses, buffered or fed frame by frame, and headers rendered as JSON.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use tokio::sync::mpsc;

/// The body of every request and response this binary sends. hyper wants one body type per
/// connection, and gRPC streams need a body that keeps growing while the call runs.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A body sent in one piece, with a content-length.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// A body fed frame by frame (data, then optionally trailers) through the returned sender;
/// it ends when the sender is dropped.
pub fn channel(capacity: usize) -> (mpsc::Sender<Frame<Bytes>>, Body) {
    let (frames, receiver) = mpsc::channel(capacity);
    (frames, FrameReceiver(receiver).boxed_unsync())
}

struct FrameReceiver(mpsc::Receiver<Frame<Bytes>>);

impl hyper::body::Body for FrameReceiver {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut().0.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

/// Header names (lower case, as `http` stores them) to their values, a repeated header's
/// values joined with "," so that tests compare one string per name.
pub fn headers_json(headers: &HeaderMap) -> serde_json::Map<String, serde_json::Value> {
    headers
        .keys()
        .map(|name| {
            let values: Vec<_> = headers
                .get_all(name)
                .iter()
                .map(|value| String::from_utf8_lossy(value.as_bytes()))
                .collect();
            (name.as_str().to_owned(), values.join(",").into())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn repeated_headers_are_joined() {
        let mut headers = HeaderMap::new();
        headers.append("X-Tag", HeaderValue::from_static("a"));
        headers.append("x-tag", HeaderValue::from_static("b"));
        headers.append("host", HeaderValue::from_static("web"));
        let json = headers_json(&headers);
        assert_eq!(json["x-tag"], "a,b");
        assert_eq!(json["host"], "web");
    }

    #[tokio::test]
    async fn channel_body_yields_frames_then_ends() {
        let (frames, body) = channel(2);
        frames.send(Frame::data(Bytes::from("hi"))).await.unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        frames.send(Frame::trailers(trailers)).await.unwrap();
        drop(frames);
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "hi");
    }
}
