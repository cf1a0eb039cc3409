//! HTTP/1.1 upgrade to a raw byte echo (`nodemesh-echo`): what a mesh must pass through
//! untouched after the 101, like WebSocket. The server side for `http-serve` and the
//! `upgrade` client.

use std::process::ExitCode;

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode,
    header::{CONNECTION, UPGRADE},
};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    client::{ClientError, Protocol, Target, within},
    message::{self, Body},
};

/// The protocol name in the `upgrade` header.
const PROTOCOL: &str = "nodemesh-echo";

// === server ===

/// Whether the request asks to switch to the echo protocol.
pub fn is_request(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers.get_all(CONNECTION).iter().any(|value| {
        value.to_str().is_ok_and(|options| {
            options
                .split(',')
                .any(|option| option.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    let echo = headers
        .get(UPGRADE)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(PROTOCOL.as_bytes()));
    connection_upgrade && echo
}

/// Answers 101 and echoes every byte on the upgraded connection until the client closes.
pub fn accept(request: Request<Incoming>) -> Response<Body> {
    // Detached: the upgraded connection lives until the client closes it.
    tokio::spawn(async move {
        match hyper::upgrade::on(request).await {
            Ok(upgraded) => {
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            }
            Err(e) => eprintln!("mesh-testapp http-serve: upgrade: {e}"),
        }
    });
    let mut response = Response::new(message::full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    set_upgrade_headers(response.headers_mut());
    response
}

fn set_upgrade_headers(headers: &mut HeaderMap) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static(PROTOCOL));
}

// === client ===

/// `mesh-testapp upgrade`: one upgrade, one message echoed.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// Text to send after the 101 and expect back.
    #[arg(long)]
    message: String,
}

/// Prints `{"status":101,"echo":".."}`, `{"status":N,"echo":null}` when the upgrade was
/// refused, or `{"error":".."}`.
pub async fn run(args: Args) -> ExitCode {
    let line = within(args.target.timeout(), exchange(&args))
        .await
        .unwrap_or_else(|e| json!({ "error": e.to_string() }));
    println!("{line}");
    ExitCode::SUCCESS
}

async fn exchange(args: &Args) -> Result<Value, ClientError> {
    let mut connection = args.target.connect(Protocol::Http1).await?;
    let mut request = args
        .target
        .request(
            Protocol::Http1,
            Method::GET,
            args.target.url.path_and_query.as_str(),
        )
        .body(message::full(Bytes::new()))
        .expect("an upgrade request from valid parts");
    set_upgrade_headers(request.headers_mut());
    let response = connection.send(request).await?;
    let status = response.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(json!({ "status": status.as_u16(), "echo": null }));
    }
    let mut upgraded = TokioIo::new(hyper::upgrade::on(response).await?);
    upgraded.write_all(args.message.as_bytes()).await?;
    // Read until the whole message is back or the server closes, whichever comes first:
    // a short echo is for the test to see, not an error.
    let mut echo = vec![0; args.message.len()];
    let mut received = 0;
    while received < echo.len() {
        match upgraded.read(&mut echo[received..]).await? {
            0 => break,
            read => received += read,
        }
    }
    echo.truncate(received);
    Ok(json!({ "status": status.as_u16(), "echo": String::from_utf8_lossy(&echo) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    http::HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn recognises_the_echo_upgrade() {
        assert!(is_request(&headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "Nodemesh-Echo"),
        ])));
        assert!(!is_request(&headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
        ])));
        assert!(!is_request(&headers(&[("upgrade", PROTOCOL)])));
    }
}
