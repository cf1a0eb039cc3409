//! `mesh-testapp http-serve`: HTTP/1.1 and h2c on the same ports, answering with a JSON
//! description of the request as it arrived (after the mesh), with knobs in the query
//! string for the failures and delays that L7 tests need. gRPC and upgrade requests go to
//! their own modules.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io::{self, Write},
    net::SocketAddr,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{
    HeaderValue, Request, Response, StatusCode,
    header::{CONTENT_TYPE, HOST},
};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde::Serialize;
use serde_json::json;
use tokio::{net::TcpListener, task::JoinSet};

use crate::{
    grpc,
    message::{self, Body, headers_json},
    upgrade,
};

/// Answers the request counts instead of a request description; not counted itself.
const STATS_PATH: &str = "/__stats";

/// `mesh-testapp http-serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on, e.g. 0.0.0.0:8080 or [::]:8080 (IPv6 only); repeatable.
    #[arg(long = "listen", required = true)]
    listen: Vec<SocketAddr>,
    /// Name reported in the x-served-by header and in every reply.
    #[arg(long, value_parser = parse_name)]
    name: String,
}

fn parse_name(text: &str) -> Result<String, String> {
    HeaderValue::from_str(text)
        .map(|_| text.to_owned())
        .map_err(|_| format!("{text:?} cannot be a header value"))
}

/// Prints "ready" once listening on every address, then serves until killed.
pub async fn serve(args: Args) -> ExitCode {
    let mut listeners = Vec::new();
    for addr in &args.listen {
        match listen(*addr) {
            Ok(listener) => listeners.push(listener),
            Err(e) => {
                eprintln!("mesh-testapp http-serve: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // Tests wait for this line before connecting.
    println!("ready");
    let _ = io::stdout().flush();
    let server = Arc::new(Server::new(args.name));
    let mut accept_loops = JoinSet::new();
    for listener in listeners {
        accept_loops.spawn(accept_loop(listener, Arc::clone(&server)));
    }
    accept_loops.join_all().await;
    ExitCode::FAILURE
}

/// Binds like `serve` does, then hands the socket to tokio.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = crate::bind(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

async fn accept_loop(listener: TcpListener, server: Arc<Server>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("mesh-testapp http-serve: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let server = Arc::clone(&server);
        // Detached: one task per connection, for as long as the client keeps it.
        tokio::spawn(async move {
            let service = service_fn(|request| {
                let server = Arc::clone(&server);
                async move { Ok::<_, Infallible>(server.handle(peer, request).await) }
            });
            // `auto` tells HTTP/1.1 from the h2c preface, so one port serves both.
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                eprintln!("mesh-testapp http-serve: connection from {peer}: {e}");
            }
        });
    }
}

// === impl Server ===

struct Server {
    name: String,
    served_by: HeaderValue,
    stats: Mutex<Stats>,
}

impl Server {
    fn new(name: String) -> Self {
        Self {
            served_by: HeaderValue::from_str(&name).expect("checked when parsing --name"),
            name,
            stats: Mutex::default(),
        }
    }

    async fn handle(&self, peer: SocketAddr, request: Request<Incoming>) -> Response<Body> {
        let mut response = self.respond(peer, request).await;
        response
            .headers_mut()
            .insert("x-served-by", self.served_by.clone());
        response
    }

    async fn respond(&self, peer: SocketAddr, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        if path == STATS_PATH {
            let stats = serde_json::to_vec(&*self.stats.lock().expect("stats lock"));
            return json_response(StatusCode::OK, stats.expect("stats serialize"));
        }
        let query = request.uri().query().unwrap_or_default().to_owned();
        let knobs = Knobs::parse(&query);
        let key = knobs.as_ref().ok().and_then(|knobs| knobs.key.as_deref());
        let attempt = self.stats.lock().expect("stats lock").record(&path, key);
        let knobs = match knobs {
            Ok(knobs) => knobs,
            Err(e) => return text_response(StatusCode::BAD_REQUEST, e),
        };
        if grpc::is_grpc(request.headers()) {
            return grpc::serve(&self.name, request);
        }
        if upgrade::is_request(request.headers()) {
            return upgrade::accept(request);
        }
        // Even a zero sleep waits for the timer's next millisecond tick: skip it.
        if !knobs.delay.is_zero() {
            tokio::time::sleep(knobs.delay).await;
        }
        let status = knobs.status(attempt);
        if let Some(size) = knobs.size {
            let _ = request.into_body().collect().await;
            return with_content_type(status, "text/plain", vec![b'x'; size].into());
        }
        // HTTP/1.1 names the authority in Host, HTTP/2 in :authority (the URI).
        let authority = request
            .uri()
            .authority()
            .map(|authority| authority.to_string())
            .or_else(|| {
                let host = request.headers().get(HOST)?;
                Some(String::from_utf8_lossy(host.as_bytes()).into_owned())
            });
        let mut description = json!({
            "served_by": self.name,
            "method": request.method().as_str(),
            "path": path,
            "query": query,
            "version": format!("{:?}", request.version()),
            "authority": authority,
            "headers": headers_json(request.headers()),
            "peer": peer.to_string(),
        });
        let request_bytes = match request.into_body().collect().await {
            Ok(body) => body.to_bytes().len(),
            Err(e) => {
                return text_response(StatusCode::BAD_REQUEST, format!("reading the body: {e}"));
            }
        };
        description["request_bytes"] = request_bytes.into();
        json_response(status, description.to_string())
    }
}

fn json_response(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    with_content_type(status, "application/json", body.into())
}

fn text_response(status: StatusCode, text: String) -> Response<Body> {
    with_content_type(status, "text/plain; charset=utf-8", text.into())
}

fn with_content_type(
    status: StatusCode,
    content_type: &'static str,
    body: bytes::Bytes,
) -> Response<Body> {
    let mut response = Response::new(message::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

// === impl Stats ===

/// What `GET /__stats` answers: whether and how often requests reached this backend.
#[derive(Default, Serialize)]
struct Stats {
    requests: u64,
    by_path: BTreeMap<String, u64>,
    by_key: BTreeMap<String, u64>,
}

impl Stats {
    /// Counts a request; returns how many requests carried `key` so far, this one included
    /// (0 without a key), which decides the `fail` knob.
    fn record(&mut self, path: &str, key: Option<&str>) -> u64 {
        self.requests += 1;
        *self.by_path.entry(path.to_owned()).or_default() += 1;
        key.map_or(0, |key| {
            let seen = self.by_key.entry(key.to_owned()).or_default();
            *seen += 1;
            *seen
        })
    }
}

// === impl Knobs ===

/// How the query string asks a request to be answered. Other parameters are ignored, so
/// tests may add their own (e.g. for route matching).
#[derive(Debug, Default, PartialEq)]
struct Knobs {
    /// `status=N`: answer N instead of 200.
    status: Option<StatusCode>,
    /// `fail=N`: the first N requests with the same `key` answer `fail_status`.
    fail: u64,
    /// `fail_status=N` (503 when absent).
    fail_status: Option<StatusCode>,
    /// `key=K`: counted per key in /__stats; `fail` needs one.
    key: Option<String>,
    /// `delay_ms=N`: sleep before answering.
    delay: Duration,
    /// `size=N`: a body of exactly N bytes of 'x' instead of JSON, for benchmarks.
    size: Option<usize>,
}

impl Knobs {
    fn parse(query: &str) -> Result<Self, String> {
        let mut knobs = Self::default();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || -> Result<u64, String> {
                value
                    .parse()
                    .map_err(|e| format!("query parameter {name}={value}: {e}"))
            };
            let status = || -> Result<StatusCode, String> {
                StatusCode::from_bytes(value.as_bytes())
                    .map_err(|e| format!("query parameter {name}={value}: {e}"))
            };
            match name {
                "status" => knobs.status = Some(status()?),
                "fail" => knobs.fail = number()?,
                "fail_status" => knobs.fail_status = Some(status()?),
                "key" => knobs.key = Some(value.to_owned()),
                "delay_ms" => knobs.delay = Duration::from_millis(number()?),
                "size" => {
                    let size =
                        usize::try_from(number()?).map_err(|e| format!("size={value}: {e}"))?;
                    knobs.size = Some(size);
                }
                _ => {}
            }
        }
        if knobs.fail > 0 && knobs.key.is_none() {
            return Err(format!(
                "query {query}: fail=N needs key=K, the failures are counted per key"
            ));
        }
        Ok(knobs)
    }

    /// The status for the `attempt`-th request carrying this key.
    fn status(&self, attempt: u64) -> StatusCode {
        if attempt <= self.fail && self.fail > 0 {
            self.fail_status.unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
        } else {
            self.status.unwrap_or(StatusCode::OK)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_from_the_query() {
        let knobs = Knobs::parse("status=418&delay_ms=20&size=3&route=a&flag").unwrap();
        assert_eq!(
            knobs,
            Knobs {
                status: Some(StatusCode::IM_A_TEAPOT),
                delay: Duration::from_millis(20),
                size: Some(3),
                ..Knobs::default()
            }
        );
        assert_eq!(Knobs::parse("").unwrap(), Knobs::default());
        assert!(Knobs::parse("status=abc").is_err());
        assert!(Knobs::parse("status=99").is_err());
        assert!(Knobs::parse("delay_ms=-1").is_err());
        assert!(Knobs::parse("fail=2").is_err(), "fail without key");
    }

    #[test]
    fn first_attempts_fail_then_the_status_holds() {
        let knobs = Knobs::parse("fail=2&key=a&status=201").unwrap();
        let statuses: Vec<_> = (1..=3)
            .map(|attempt| knobs.status(attempt).as_u16())
            .collect();
        assert_eq!(statuses, [503, 503, 201]);

        let knobs = Knobs::parse("fail=1&key=a&fail_status=500").unwrap();
        assert_eq!(knobs.status(1), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(knobs.status(2), StatusCode::OK);
    }

    #[test]
    fn stats_count_per_path_and_key() {
        let mut stats = Stats::default();
        assert_eq!(stats.record("/a", Some("k")), 1);
        assert_eq!(stats.record("/a", Some("k")), 2);
        assert_eq!(stats.record("/b", None), 0);
        assert_eq!(stats.record("/b", Some("j")), 1);
        assert_eq!(
            serde_json::to_value(&stats).unwrap(),
            json!({ "requests": 4, "by_path": { "/a": 2, "/b": 2 }, "by_key": { "k": 2, "j": 1 } })
        );
    }
}
