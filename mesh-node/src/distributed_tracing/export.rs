//! The HTTP client the OTLP exporter posts span batches with.
//!
//! The SDK's batch processor exports from a thread of its own that has no tokio runtime,
//! which is why opentelemetry-otlp defaults to reqwest's blocking client (a second HTTP
//! stack with a runtime of its own). This client instead runs each post as a task on the
//! agent's runtime, with the hyper the proxy already uses, and the processor's thread
//! waits for the task. Plain HTTP only: the collector is normally a node-local or
//! in-cluster service, and the agent carries no TLS client stack for it.
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use opentelemetry_http::{HttpClient, HttpError};
use tokio::{net::TcpStream, runtime::Handle};

/// How long one post may take, connecting included.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Posts on the agent's tokio runtime; a new connection per batch (a batch leaves every
/// few seconds at most).
#[derive(Debug)]
pub struct RuntimeClient {
    runtime: Handle,
}

impl RuntimeClient {
    pub fn new(runtime: Handle) -> Self {
        Self { runtime }
    }
}

#[async_trait::async_trait]
impl HttpClient for RuntimeClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let posted = self.runtime.spawn(async move {
            match tokio::time::timeout(EXPORT_TIMEOUT, post(request)).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {EXPORT_TIMEOUT:?}").into()),
            }
        });
        posted.await?
    }
}

async fn post(request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{} has no host", parts.uri))?;
    if parts.uri.scheme_str() != Some("http") {
        return Err(format!("{}: only http:// collectors are supported", parts.uri).into());
    }
    // Bracketed IPv6 literals connect without their brackets.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream = TcpStream::connect((host, authority.port_u16().unwrap_or(80))).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    // HTTP/1.1 wants the origin form and the authority in Host.
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    parts.uri = Uri::try_from(path)?;
    parts
        .headers
        .insert(header::HOST, HeaderValue::from_str(authority.as_str())?);
    let response = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, body))
}
