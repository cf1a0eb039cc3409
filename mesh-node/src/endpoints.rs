//! The agent's own HTTP endpoints (`/metrics`, health, the admin API), plain HTTP/1.1 over
//! hyper. Above the metrics and the admin API, so neither imports the other.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{admin::Admin, metrics::Metrics, readiness::Readiness};

/// What one server answers.
#[derive(Clone)]
pub enum Endpoints {
    /// `GET /metrics`.
    /// Boxed: the metric handles are large beside the other variants.
    Metrics(Box<Metrics>),
    /// `GET /healthz/ready` (200 once every readiness guard dropped) and `/healthz/live`.
    Health(Readiness),
    /// The admin API (JSON).
    Admin(Arc<Admin>),
}

/// Binds `addr` with `SO_REUSEPORT`: an agent replacing another on the same node (a
/// DaemonSet's surge pod) binds the same ports while the old one still serves; the old one
/// closes its sockets when it stops. Needs a runtime.
pub fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Serves `endpoints` on an already bound listener until `shutdown`.
/// The metrics, health and admin listeners, bound with [`bind_shared`].
pub struct Listeners {
    pub metrics: TcpListener,
    pub health: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub fn bind(addrs: &crate::cli::EndpointAddrs) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let bind = |what: &str, addr| {
            bind_shared(addr).with_context(|| format!("binding {what} on {addr}"))
        };
        Ok(Self {
            metrics: bind("metrics", addrs.metrics_addr)?,
            health: bind("health", addrs.health_addr)?,
            admin: bind("admin", addrs.admin_addr)?,
        })
    }
}

pub async fn serve(listener: TcpListener, endpoints: Endpoints, shutdown: CancellationToken) {
    let endpoints = Arc::new(endpoints);
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    debug!(%error, "accept failed");
                    crate::accept::back_off(&error).await;
                    continue;
                }
            },
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let endpoints = endpoints.clone();
                async move { Ok::<_, Infallible>(answer(&endpoints, &request)) }
            });
            // A scraper or a curl that never sends its request is let go.
            if let Err(error) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(crate::accept::HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, "metrics connection failed");
            }
        });
    }
}

fn answer(endpoints: &Endpoints, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if let Endpoints::Admin(admin) = endpoints {
        let (status, body) = admin.answer(
            request.method(),
            request.uri().path(),
            request.uri().query(),
        );
        let body = serde_json::to_vec_pretty(&body).unwrap_or_default();
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return reply(status, "application/json", body);
    }
    match (endpoints, request.uri().path()) {
        (Endpoints::Metrics(metrics), "/metrics") => {
            let encoder = TextEncoder::new();
            let mut body = Vec::new();
            match encoder.encode(&metrics.registry.gather(), &mut body) {
                Ok(()) => reply(StatusCode::OK, encoder.format_type(), body),
                Err(error) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    error.to_string().into_bytes(),
                ),
            }
        }
        (Endpoints::Health(readiness), "/healthz/ready") => {
            let pending = readiness.pending();
            if pending.is_empty() {
                reply(StatusCode::OK, "text/plain", b"ready\n".to_vec())
            } else {
                let body = format!("not ready: waiting for {}\n", pending.join(", "));
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    body.into_bytes(),
                )
            }
        }
        (Endpoints::Health(_), "/healthz/live") => {
            reply(StatusCode::OK, "text/plain", b"live\n".to_vec())
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    }
}
