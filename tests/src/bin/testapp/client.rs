//! What the `http`, `grpc` and `upgrade` clients share: the target URL and its Host, opening
//! an HTTP/1.1 or h2c (prior knowledge) connection, building requests, and failures.

use std::{error::Error, fmt, io, time::Duration};

use http::{
    HeaderValue, Method, Request, Response, Uri, Version,
    header::HOST,
    request,
    uri::{Authority, PathAndQuery},
};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::message::Body;

/// Where a client sends its requests.
#[derive(clap::Args)]
pub struct Target {
    /// http://HOST:PORT[/path?query]; HOST is an IP (service names do not resolve in the
    /// test pods, see --host-header).
    #[arg(long, value_parser = parse_url)]
    pub url: Url,
    /// Host header (the :authority with HTTP/2) to send instead of the URL's HOST:PORT.
    #[arg(long)]
    pub host_header: Option<Authority>,
    /// Timeout per request (per call for grpc, per exchange for upgrade), in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// An `http://` URL taken apart the way a client needs it.
#[derive(Clone, Debug)]
pub struct Url {
    authority: Authority,
    /// The host without IPv6 brackets, for connecting.
    host: String,
    port: u16,
    pub path_and_query: PathAndQuery,
}

fn parse_url(text: &str) -> Result<Url, String> {
    let uri: Uri = text.parse().map_err(|e| format!("{text}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{text}: only http:// URLs are supported (plaintext HTTP/1.1 or h2c)"
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{text}: no HOST:PORT"))?;
    Ok(Url {
        host: authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port: authority.port_u16().unwrap_or(80),
        authority,
        path_and_query: uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    })
}

/// The HTTP version a client speaks; HTTP/2 only as h2c with prior knowledge, as the mesh
/// sees it between pods.
#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Target {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Opens a connection and spawns its driver; the driver's errors are knowingly dropped,
    /// since they surface on the requests too.
    pub async fn connect(&self, protocol: Protocol) -> Result<Connection, ClientError> {
        let Url { host, port, .. } = &self.url;
        let stream = TcpStream::connect((host.as_str(), *port))
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.url.authority.to_string(),
                source,
            })?;
        // Requests are small and latency is measured: do not wait to fill segments.
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        match protocol {
            Protocol::Http1 => {
                let (sender, driver) = http1::handshake(io).await?;
                tokio::spawn(driver.with_upgrades());
                Ok(Connection::Http1(sender))
            }
            Protocol::Http2 => {
                let (sender, driver) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(driver);
                Ok(Connection::Http2(sender))
            }
        }
    }

    /// A request for `path_and_query` on this target: HTTP/1.1 in origin form with a Host
    /// header, HTTP/2 with the authority in the URI (hyper turns it into :authority).
    pub fn request(
        &self,
        protocol: Protocol,
        method: Method,
        path_and_query: &str,
    ) -> request::Builder {
        let authority = self.host_header.as_ref().unwrap_or(&self.url.authority);
        let builder = Request::builder().method(method);
        match protocol {
            Protocol::Http1 => builder.uri(path_and_query).header(
                HOST,
                HeaderValue::from_str(authority.as_str()).expect("an authority is a header value"),
            ),
            Protocol::Http2 => builder
                .version(Version::HTTP_2)
                .uri(format!("http://{authority}{path_and_query}")),
        }
    }
}

/// One open client connection.
pub enum Connection {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

impl Connection {
    /// Sends `request` once the connection can take it; resolves with the response head.
    pub async fn send(
        &mut self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, ClientError> {
        let response = match self {
            Self::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
            Self::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
        };
        Ok(response)
    }

    /// Whether the peer closed it (e.g. the end of an HTTP/1.1 keep-alive).
    pub fn is_closed(&self) -> bool {
        match self {
            Self::Http1(sender) => sender.is_closed(),
            Self::Http2(sender) => sender.is_closed(),
        }
    }
}

/// Runs `exchange`, failing with [`ClientError::TimedOut`] once `limit` has passed.
pub async fn within<T>(
    limit: Duration,
    exchange: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or(Err(ClientError::TimedOut(limit)))
}

/// Why a client exchange failed; printed as `{"error": "<this>"}` for the test to judge.
#[derive(Debug)]
pub enum ClientError {
    Connect { addr: String, source: io::Error },
    Http(hyper::Error),
    Io(io::Error),
    TimedOut(Duration),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect { addr, source } => write!(f, "connect {addr}: {}", io_reason(source)),
            // hyper's own message is terse ("connection closed before message completed");
            // the cause underneath (a reset, an h2 GOAWAY reason) is what a test needs.
            Self::Http(e) => write_with_causes(f, e),
            Self::Io(e) => write!(f, "{}", io_reason(e)),
            Self::TimedOut(limit) => write!(f, "timed out after {} ms", limit.as_millis()),
        }
    }
}

/// The short names `connect` prints (e.g. "connection refused"), so tests grep one
/// wording across modes; the OS's own text when there is no short name.
fn io_reason(e: &io::Error) -> String {
    match crate::describe(e) {
        "error" => e.to_string(),
        reason => reason.to_owned(),
    }
}

fn write_with_causes(f: &mut fmt::Formatter<'_>, error: &dyn Error) -> fmt::Result {
    write!(f, "{error}")?;
    let mut cause = error.source();
    while let Some(e) = cause {
        write!(f, ": {e}")?;
        cause = e.source();
    }
    Ok(())
}

impl Error for ClientError {}

impl From<hyper::Error> for ClientError {
    fn from(e: hyper::Error) -> Self {
        Self::Http(e)
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts() {
        let url = parse_url("http://10.0.0.7:8080/api?x=1").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("10.0.0.7", 8080));
        assert_eq!(url.path_and_query.as_str(), "/api?x=1");

        let url = parse_url("http://[fd00::7]").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("fd00::7", 80));
        assert_eq!(url.path_and_query.as_str(), "/");

        assert!(parse_url("https://10.0.0.7/").is_err());
        assert!(parse_url("/just/a/path").is_err());
    }

    #[test]
    fn host_header_replaces_the_authority() {
        let target = Target {
            url: parse_url("http://10.0.0.7:8080/").unwrap(),
            host_header: Some(Authority::from_static("web.shop")),
            timeout_ms: 5000,
        };
        let http1 = target
            .request(Protocol::Http1, Method::GET, "/a?b=c")
            .body(())
            .unwrap();
        assert_eq!(http1.uri(), "/a?b=c");
        assert_eq!(http1.headers()[HOST], "web.shop");
        let http2 = target
            .request(Protocol::Http2, Method::GET, "/a?b=c")
            .body(())
            .unwrap();
        assert_eq!(http2.uri(), "http://web.shop/a?b=c");
        assert!(!http2.headers().contains_key(HOST));
    }
}
