//! The server side of L7: each request arriving for an enrolled pod on an HTTP port is
//! authorized here, at the destination node (AuthorizationPolicy with request
//! attributes), then handed to the app over a pooled connection that carries the
//! caller's address.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

use super::{
    ProxyBody,
    cluster::ClusterKey,
    incoming, is_grpc, is_upgrade, local_response,
    metered::{CountedRequest, MeteredResponse, grpc_status},
    normalize_path, splice_upgrade, strip_hop_by_hop,
    upstream::{Connector, SendError, Via},
};
use crate::{
    metrics::{ConnectionLabels, Reporter, RequestOutcome},
    policy::{RequestAttributes, Verdict},
    proxy::{PodContext, ProxyContext, inbound::Caller},
    routing::ConnectionPool,
};

/// Envoy's body for a request denied by RBAC; clients and tests match on it.
pub const ACCESS_DENIED: &str = "RBAC: access denied";

/// One connection (or HBONE stream) to a pod's HTTP port.
pub struct Inbound {
    pub pod: PodContext,
    pub proxy: ProxyContext,
    pub caller: Caller,
    /// The pod address and port the client asked for: where the app listens.
    pub original: SocketAddr,
}

impl Inbound {
    pub async fn handle(self: Arc<Self>, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        let state = self.proxy.state.borrow().clone();
        let workload = state.workloads.get(&self.pod.key);
        let protocol = if is_grpc(request.headers()) {
            "grpc"
        } else {
            "http"
        };
        let source = state.workload_by_ip(self.caller.ip);
        let service = workload.and_then(|w| state.service_for(w, self.original.port()));
        let identities = self.caller.identities.as_deref().map(|(s, d)| (s, d));
        let labels =
            ConnectionLabels::new(Reporter::Destination, source, workload, service, identities);
        let request_bytes = Arc::new(AtomicU64::new(0));
        let record = |response: Response<ProxyBody>, flags: &'static str| {
            let status = response.status().as_u16();
            let metrics = self.proxy.metrics.http.clone();
            let header_status = grpc_status(response.headers());
            let (labels, request_bytes) = (labels.clone(), request_bytes.clone());
            response.map(move |body| {
                let on_done = Box::new(move |response_bytes: u64, grpc: Option<u32>| {
                    metrics.record(
                        &labels,
                        &RequestOutcome {
                            protocol,
                            response_code: status,
                            response_flags: flags,
                            grpc_status: grpc,
                            duration: start.elapsed(),
                            request_bytes: request_bytes.load(Ordering::Relaxed),
                            response_bytes,
                        },
                    );
                });
                MeteredResponse::new(body, header_status, on_done).boxed()
            })
        };

        if let Some(normalized) = normalize_path(request.uri().path()) {
            let mut parts = request.uri().clone().into_parts();
            let query = request
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            match format!("{normalized}{query}").parse() {
                Ok(path_and_query) => {
                    parts.path_and_query = Some(path_and_query);
                    match http::Uri::from_parts(parts) {
                        Ok(uri) => *request.uri_mut() = uri,
                        Err(_) => return record(bad_path(), "-"),
                    }
                }
                Err(_) => return record(bad_path(), "-"),
            }
        }
        if let Some(workload) = workload {
            let host = request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| request.uri().authority().map(|a| a.as_str()))
                .unwrap_or_default();
            let attributes = RequestAttributes {
                method: request.method().as_str(),
                path: request.uri().path(),
                host,
                headers: request.headers(),
            };
            let connection = self.caller.attributes(self.original);
            if let Verdict::Deny { policy, reason } =
                state
                    .policies
                    .authorize_request(workload, &connection, &attributes)
            {
                debug!(
                    ?policy,
                    reason,
                    path = request.uri().path(),
                    "request denied"
                );
                self.proxy
                    .metrics
                    .node
                    .proxy_error("inbound", "authorization_denied");
                let denied = local_response(StatusCode::FORBIDDEN, ACCESS_DENIED);
                return record(denied, "RBAC");
            }
        }

        let downstream_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let upgrade_headers = downstream_upgrade.is_some().then(|| {
            (
                parts.headers.get(header::CONNECTION).cloned(),
                parts.headers.get(header::UPGRADE).cloned(),
            )
        });
        strip_hop_by_hop(&mut parts.headers);
        if let Some((connection, upgrade)) = upgrade_headers {
            for (name, value) in [(header::CONNECTION, connection), (header::UPGRADE, upgrade)] {
                if let Some(value) = value {
                    parts.headers.insert(name, value);
                }
            }
        }
        let body = CountedRequest::new(incoming(body), request_bytes.clone()).boxed();
        let upstream_request = Request::from_parts(parts, body);
        // One cluster per app port of the pod: the pool's key, with no limits of its own.
        let cluster = self.proxy.clusters.get(&ClusterKey {
            service: self.pod.key.clone(),
            subset: None,
            port: self.original.port(),
        });
        let connector = Connector {
            pod: &self.pod,
            proxy: &self.proxy,
            endpoint: self.original,
            via: Via::ToApp {
                caller: self.caller.ip,
            },
        };
        let sent = self
            .proxy
            .upstreams
            .send(
                &cluster,
                &ConnectionPool::default(),
                &connector,
                upstream_request,
            )
            .await;
        match sent {
            Ok(mut response) => {
                if response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(downstream) = downstream_upgrade
                {
                    splice_upgrade(downstream, hyper::upgrade::on(&mut response));
                } else {
                    strip_hop_by_hop(response.headers_mut());
                }
                record(response.map(incoming), "-")
            }
            Err(error) => {
                debug!(%error, app = %self.original, "app did not answer");
                let flags = match error {
                    SendError::Reset(_) => "UC",
                    _ => "UF",
                };
                let failed = local_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers",
                );
                record(failed, flags)
            }
        }
    }
}

fn bad_path() -> Response<ProxyBody> {
    local_response(StatusCode::BAD_REQUEST, "bad request path")
}
