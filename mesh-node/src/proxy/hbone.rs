//! HBONE: TCP streams carried as HTTP/2 `CONNECT` streams over one mTLS connection, wire
//! compatible with Istio's ztunnel. This module is the HTTP/2 half; TLS is set up by the
//! caller, so the same code serves whatever identity source provides the certificates.
mod stream;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use h2::{client::SendRequest, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
pub use stream::{H2Stream, StreamSlot};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// ALPN protocol HBONE negotiates.
pub const ALPN: &[u8] = b"h2";
/// Streams a peer may open at once on one tunnel; more wait for a free slot.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 windows sized for bulk TCP: the defaults (64 KiB) throttle a single stream.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// On the serving side (15008) the whole tunnel gets one stream's window: what a peer can
/// make the proxy buffer is at most 4 MiB per tunnel, whatever its number of streams, and a
/// single bulk stream still has all of it.
const SERVER_CONNECTION_WINDOW: u32 = STREAM_WINDOW;
const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// A CONNECT carries an authority and a few trace headers: 16 KiB is generous, and a peer
/// cannot make the proxy buffer megabytes of headers per stream.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// How long the HTTP/2 handshake and a CONNECT's answer may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("HTTP: {0}")]
    Http(#[from] http::Error),
    #[error("the peer answered CONNECT with {0}")]
    Refused(StatusCode),
    #[error("not a CONNECT to an address: {0}")]
    BadRequest(String),
    #[error("{0}: timed out")]
    Timeout(&'static str),
}

/// Opens the HTTP/2 client side of a tunnel over an established (TLS) connection. The
/// connection task is spawned; the returned sender multiplexes streams and can be cloned.
pub async fn client_handshake<IO>(io: IO) -> Result<SendRequest<Bytes>, HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .handshake(io);
    let (sender, mut connection) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| HboneError::Timeout("HTTP/2 handshake"))??;
    let ping_pong = connection.ping_pong();
    tokio::spawn(async move {
        let closed = match ping_pong {
            Some(ping_pong) => tokio::select! {
                closed = connection => closed,
                dead = keepalive(ping_pong) => Err(dead),
            },
            None => connection.await,
        };
        if let Err(error) = closed {
            debug!(%error, "HBONE tunnel closed");
        }
    });
    Ok(sender)
}

/// How often an HBONE client pings its tunnel, and how long the answer may take.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pings the tunnel's peer every [`KEEPALIVE_INTERVAL`]; returns when a ping goes
/// unanswered, so the tunnel is dropped (and its pool entry found dead) instead of holding
/// streams to a peer that vanished without a word.
async fn keepalive(mut ping_pong: h2::PingPong) -> h2::Error {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(error)) => return error,
            Err(_) => return h2::Error::from(h2::Reason::PROTOCOL_ERROR),
        }
    }
}

/// Opens one CONNECT stream to `target` over a tunnel.
pub async fn connect(
    sender: SendRequest<Bytes>,
    target: SocketAddr,
) -> Result<H2Stream, HboneError> {
    let mut sender = sender.ready().await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())?;
    let (response, send) = sender.send_request(request, false)?;
    // The peer's proxy answers once its own checks are done; a peer that never does (it
    // stalled, or its node went away without a reset) must not hold the caller forever.
    let response = tokio::time::timeout(HANDSHAKE_TIMEOUT, response)
        .await
        .map_err(|_| HboneError::Timeout("CONNECT response"))??;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Refused(response.status()));
    }
    Ok(H2Stream::new(send, response.into_body()))
}

/// A CONNECT request received on the server side of a tunnel.
pub struct IncomingConnect {
    pub target: SocketAddr,
    request: Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
}

impl IncomingConnect {
    /// Accepts the stream: answers 200 and hands back the byte stream.
    pub fn accept(mut self) -> Result<H2Stream, HboneError> {
        let response = Response::builder().status(StatusCode::OK).body(())?;
        let send = self.respond.send_response(response, false)?;
        Ok(H2Stream::new(send, self.request.into_body()))
    }

    /// Refuses the stream with `status`; the tunnel stays up for other streams.
    pub fn refuse(mut self, status: StatusCode) {
        if let Ok(response) = Response::builder().status(status).body(()) {
            let _ = self.respond.send_response(response, true);
        }
    }
}

/// Serves the HTTP/2 server side of a tunnel: `on_connect` is spawned for every CONNECT;
/// anything else is answered 405 without disturbing other streams. Once `drain` is
/// cancelled the peer is told GOAWAY: its open streams run to their end, new ones go to a
/// new tunnel.
pub async fn serve<IO, F, Fut>(
    io: IO,
    drain: CancellationToken,
    on_connect: F,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: Fn(IncomingConnect) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(SERVER_CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .handshake(io);
    let mut connection = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| HboneError::Timeout("HTTP/2 handshake"))??;
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            accepted = connection.accept() => accepted,
            () = drain.cancelled(), if !draining => {
                draining = true;
                connection.graceful_shutdown();
                continue;
            }
        };
        let Some(accepted) = accepted else { break };
        let (request, mut respond) = accepted?;
        let target = connect_target(request.method(), request.uri());
        match target {
            Some(target) => {
                tokio::spawn(on_connect(IncomingConnect {
                    target,
                    request,
                    respond,
                }));
            }
            None => {
                debug!(method = %request.method(), uri = %request.uri(), "not an HBONE CONNECT");
                let status = if request.method() == Method::CONNECT {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::METHOD_NOT_ALLOWED
                };
                if let Ok(response) = Response::builder().status(status).body(()) {
                    let _ = respond.send_response(response, true);
                }
            }
        }
    }
    Ok(())
}

/// Where a CONNECT asks to go: its authority, which must be an IP address and port (HBONE
/// names pods by address, never by name); `None` for anything else.
fn connect_target(method: &Method, uri: &http::Uri) -> Option<SocketAddr> {
    if method != Method::CONNECT {
        return None;
    }
    uri.authority()?.as_str().parse().ok()
}

#[cfg(test)]
mod tests;
