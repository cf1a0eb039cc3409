//! gRPC without protobuf: the `nodemesh.test.Echo` service of `http-serve` and the `grpc`
//! client. Payloads are raw bytes in gRPC's length-prefixed messages, which is all a mesh
//! sees of gRPC besides HTTP/2 streams and the `grpc-status` trailer.

use std::process::ExitCode;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode,
    header::{CONTENT_TYPE, TE},
};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde_json::json;
use tokio::sync::mpsc;

use crate::{
    client::{ClientError, Protocol, Target, within},
    message::{self, Body},
};

/// Answers one message and ends the call.
pub const UNARY: &str = "/nodemesh.test.Echo/Unary";
/// Answers every message as it arrives; ends when the client ends.
pub const STREAM: &str = "/nodemesh.test.Echo/Stream";

const CONTENT_TYPE_GRPC: &str = "application/grpc";
/// The header before each message: a compressed flag and a big-endian length.
const PREFIX_LEN: usize = 5;

// gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
const OK: u32 = 0;
const UNKNOWN: u32 = 2;
const PERMISSION_DENIED: u32 = 7;
const UNIMPLEMENTED: u32 = 12;
const INTERNAL: u32 = 13;
const UNAVAILABLE: u32 = 14;
const UNAUTHENTICATED: u32 = 16;

// === framing ===

/// `payload` as one uncompressed gRPC message.
pub fn encode(payload: &[u8]) -> Bytes {
    let mut message = BytesMut::with_capacity(PREFIX_LEN + payload.len());
    message.put_u8(0);
    message.put_u32(u32::try_from(payload.len()).expect("a test message is below 4 GiB"));
    message.put_slice(payload);
    message.freeze()
}

/// Cuts gRPC messages out of DATA frames, which split and join them anywhere.
#[derive(Default)]
pub struct Decoder {
    buffered: BytesMut,
}

/// A message this binary cannot read.
#[derive(Debug, PartialEq)]
pub struct CompressedMessage;

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buffered.extend_from_slice(data);
    }

    /// The next complete message, if one has arrived in full.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, CompressedMessage> {
        let Some(prefix) = self.buffered.get(..PREFIX_LEN) else {
            return Ok(None);
        };
        if prefix[0] != 0 {
            return Err(CompressedMessage);
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if self.buffered.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        self.buffered.advance(PREFIX_LEN);
        Ok(Some(self.buffered.split_to(len).freeze()))
    }

    /// Whether a message was left half received.
    pub fn has_partial(&self) -> bool {
        !self.buffered.is_empty()
    }
}

// === status ===

/// The outcome of a call, as the `grpc-status` and `grpc-message` trailers carry it.
#[derive(Debug, PartialEq)]
pub struct Status {
    pub code: u32,
    pub message: String,
}

impl Status {
    fn new(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The status in trailers, or in the headers of a trailers-only response.
    fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
        let message = headers
            .get("grpc-message")
            .map(|value| percent_decode(value.as_bytes()))
            .unwrap_or_default();
        Some(Self { code, message })
    }

    /// What a gRPC client makes of an HTTP error without a grpc-status, e.g. a proxy's 503
    /// (https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md).
    fn from_http(status: StatusCode) -> Self {
        let code = match status.as_u16() {
            400 => INTERNAL,
            401 => UNAUTHENTICATED,
            403 => PERMISSION_DENIED,
            404 => UNIMPLEMENTED,
            429 | 502 | 503 | 504 => UNAVAILABLE,
            _ => UNKNOWN,
        };
        Self::new(code, format!("HTTP status {}", status.as_u16()))
    }

    fn to_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from(self.code));
        if !self.message.is_empty() {
            let encoded = percent_encode(&self.message);
            headers.insert(
                "grpc-message",
                HeaderValue::from_str(&encoded).expect("percent-encoded text is a header value"),
            );
        }
        headers
    }
}

/// grpc-message is percent-encoded: bytes outside printable ASCII, and '%' itself.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b' '..=b'~' if byte != b'%' => char::from(byte).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

fn percent_decode(encoded: &[u8]) -> String {
    let mut decoded = Vec::with_capacity(encoded.len());
    let mut rest = encoded;
    while let Some((&byte, tail)) = rest.split_first() {
        let escaped = tail
            .get(..2)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (byte, escaped) {
            (b'%', Some(value)) => {
                decoded.push(value);
                rest = &tail[2..];
            }
            _ => {
                decoded.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

// === server ===

/// Whether `http-serve` should answer this request as gRPC.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with(CONTENT_TYPE_GRPC))
}

/// Answers a call to the Echo service: each message comes back as `<name>:<payload>`.
pub fn serve(name: &str, request: Request<Incoming>) -> Response<Body> {
    let calls = match request.uri().path() {
        UNARY => Calls::One,
        STREAM => Calls::Each,
        path => {
            // Trailers-only: the status rides in the headers and the body is empty.
            let status = Status::new(UNIMPLEMENTED, format!("no method {path}"));
            let mut response = grpc_response(message::full(Bytes::new()));
            response.headers_mut().extend(status.to_headers());
            return response;
        }
    };
    let (replies, body) = message::channel(16);
    // Detached: it ends with the call, when either side goes away.
    tokio::spawn(echo(
        format!("{name}:"),
        request.into_body(),
        replies,
        calls,
    ));
    grpc_response(body)
}

/// How many messages a method answers.
#[derive(Clone, Copy)]
enum Calls {
    One,
    Each,
}

fn grpc_response(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_GRPC));
    response
}

async fn echo(
    prefix: String,
    mut requests: Incoming,
    replies: mpsc::Sender<Frame<Bytes>>,
    calls: Calls,
) {
    let mut decoder = Decoder::default();
    let status = 'call: loop {
        let data = match requests.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Request trailers mean nothing to the Echo service.
                Err(_) => continue,
            },
            // The client reset the stream or the connection went away: nobody to answer.
            Some(Err(_)) => return,
            None if decoder.has_partial() => {
                break Status::new(INTERNAL, "the request ended inside a message");
            }
            // A unary call that got its message has already ended (below).
            None if matches!(calls, Calls::One) => {
                break Status::new(INTERNAL, "a unary call needs one request message");
            }
            None => break Status::new(OK, ""),
        };
        decoder.push(&data);
        loop {
            match decoder.next_message() {
                Ok(Some(payload)) => {
                    let reply = encode(&[prefix.as_bytes(), &payload].concat());
                    if replies.send(Frame::data(reply)).await.is_err() {
                        return;
                    }
                    if matches!(calls, Calls::One) {
                        break 'call Status::new(OK, "");
                    }
                }
                Ok(None) => break,
                Err(CompressedMessage) => {
                    break 'call Status::new(INTERNAL, "compressed messages are not supported");
                }
            }
        }
    };
    let _ = replies.send(Frame::trailers(status.to_headers())).await;
}

// === client ===

/// `mesh-testapp grpc`: one call over h2c.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// Full method path, e.g. /nodemesh.test.Echo/Unary or /nodemesh.test.Echo/Stream.
    #[arg(long, value_parser = parse_method)]
    method: String,
    /// A request message (raw text); repeatable. Each after the first is sent once the
    /// previous one is answered, so a stream exercises both directions at once.
    #[arg(long = "message")]
    messages: Vec<String>,
}

fn parse_method(text: &str) -> Result<String, String> {
    match text.strip_prefix('/').and_then(|rest| rest.split_once('/')) {
        Some((service, method)) if !service.is_empty() && !method.is_empty() => Ok(text.to_owned()),
        _ => Err(format!("{text}: expected /package.Service/Method")),
    }
}

/// Prints each reply message as a line of text, then `{"grpc_status":N,"grpc_message":".."}`,
/// or `{"error":".."}` when the call failed below gRPC (connection, HTTP/2, timeout).
pub async fn run(args: Args) -> ExitCode {
    let last_line = match within(args.target.timeout(), call(&args)).await {
        Ok(status) => json!({ "grpc_status": status.code, "grpc_message": status.message }),
        Err(e) => json!({ "error": e.to_string() }),
    };
    println!("{last_line}");
    ExitCode::SUCCESS
}

async fn call(args: &Args) -> Result<Status, ClientError> {
    let mut connection = args.target.connect(Protocol::Http2).await?;
    let (requests, body) = message::channel(args.messages.len().max(1));
    let mut unsent = args.messages.iter().peekable();
    // Queued before the call starts, for a server that answers the headers only once the
    // first message is in.
    let mut requests = send_next(Some(requests), &mut unsent).await;
    let request = args
        .target
        .request(Protocol::Http2, Method::POST, &args.method)
        .header(CONTENT_TYPE, CONTENT_TYPE_GRPC)
        .header(TE, "trailers")
        .body(body)
        .expect("a gRPC request from valid parts");
    let response = connection.send(request).await?;
    if let Some(status) = Status::from_headers(response.headers()) {
        return Ok(status);
    }
    if response.status() != StatusCode::OK {
        return Ok(Status::from_http(response.status()));
    }
    let mut replies = response.into_body();
    let mut decoder = Decoder::default();
    while let Some(frame) = replies.frame().await {
        let data = match frame?.into_data() {
            Ok(data) => data,
            Err(frame) => {
                let trailers = frame.trailers_ref();
                return Ok(trailers
                    .and_then(Status::from_headers)
                    .unwrap_or_else(|| Status::new(INTERNAL, "trailers without grpc-status")));
            }
        };
        decoder.push(&data);
        loop {
            match decoder.next_message() {
                Ok(Some(payload)) => {
                    println!("{}", String::from_utf8_lossy(&payload));
                    requests = send_next(requests, &mut unsent).await;
                }
                Ok(None) => break,
                Err(CompressedMessage) => {
                    return Ok(Status::new(INTERNAL, "compressed reply message"));
                }
            }
        }
    }
    Ok(Status::new(
        INTERNAL,
        "the response ended without grpc-status",
    ))
}

/// Sends the next message, if any; the sender comes back only while more are to come, so
/// the request stream ends right after the last message.
async fn send_next<'a>(
    requests: Option<mpsc::Sender<Frame<Bytes>>>,
    unsent: &mut std::iter::Peekable<impl Iterator<Item = &'a String>>,
) -> Option<mpsc::Sender<Frame<Bytes>>> {
    let requests = requests?;
    let message = unsent.next()?;
    // A failed send means the server ended the call; its status follows in the response.
    requests
        .send(Frame::data(encode(message.as_bytes())))
        .await
        .ok()?;
    unsent.peek().is_some().then_some(requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_and_joined_across_frames() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode(b"one"));
        wire.extend_from_slice(&encode(b""));
        wire.extend_from_slice(&encode(b"three"));
        let mut decoder = Decoder::default();
        let mut messages = Vec::new();
        // Every split point, including inside the 5-byte prefixes.
        for chunk in wire.chunks(3) {
            decoder.push(chunk);
            while let Some(message) = decoder.next_message().unwrap() {
                messages.push(message);
            }
        }
        assert_eq!(messages, [&b"one"[..], b"", b"three"]);
        assert!(!decoder.has_partial());
    }

    #[test]
    fn prefix_is_flag_and_big_endian_length() {
        assert_eq!(&encode(b"hey")[..], b"\0\0\0\0\x03hey");
    }

    #[test]
    fn partial_and_compressed_messages() {
        let mut decoder = Decoder::default();
        decoder.push(&encode(b"hello")[..7]);
        assert_eq!(decoder.next_message(), Ok(None));
        assert!(decoder.has_partial());

        let mut decoder = Decoder::default();
        decoder.push(b"\x01\0\0\0\x01z");
        assert_eq!(decoder.next_message(), Err(CompressedMessage));
    }

    #[test]
    fn status_round_trips_through_headers() {
        let status = Status::new(UNIMPLEMENTED, "no method /a/b: 100% \u{e9}");
        let headers = status.to_headers();
        assert_eq!(headers["grpc-status"], "12");
        assert_eq!(headers["grpc-message"], "no method /a/b: 100%25 %C3%A9");
        assert_eq!(Status::from_headers(&headers), Some(status));
        assert_eq!(Status::from_headers(&HeaderMap::new()), None);
    }

    #[test]
    fn http_errors_map_to_grpc_codes() {
        assert_eq!(
            Status::from_http(StatusCode::SERVICE_UNAVAILABLE).code,
            UNAVAILABLE
        );
        assert_eq!(Status::from_http(StatusCode::NOT_FOUND).code, UNIMPLEMENTED);
        assert_eq!(Status::from_http(StatusCode::IM_A_TEAPOT).code, UNKNOWN);
    }

    #[test]
    fn method_must_be_a_path() {
        assert!(parse_method(UNARY).is_ok());
        assert!(parse_method("nodemesh.test.Echo/Unary").is_err());
        assert!(parse_method("/Unary").is_err());
    }
}
