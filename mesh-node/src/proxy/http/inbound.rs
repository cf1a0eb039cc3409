//! The server side of L7: each request arriving for an enrolled pod on an HTTP port is
//! authorized here, at the destination node (AuthorizationPolicy with request
//! attributes), then handed to the app over a pooled connection that carries the
//! caller's address.
use std::{net::SocketAddr, sync::Arc};

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::debug;

use super::{
    ProxyBody,
    cluster::ClusterKey,
    incoming, is_upgrade, local_response,
    metered::{CountedRequest, Record, meter},
    normalize_path, splice_upgrade, strip_hop_by_hop, strip_hop_by_hop_for_forwarding,
    upstream::{Connector, SendError, Via},
};
use crate::{
    distributed_tracing::SpanKind,
    policy::{RequestAttributes, Verdict},
    proxy::{
        PodContext, ProxyContext,
        inbound::{Caller, policy_name},
    },
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
        let state = self.proxy.state.borrow().clone();
        let workload = state.workload_or_unknown(&self.pod.key);
        let parties = self.caller.parties(&state, &self.pod, self.original);
        let target = parties
            .peers
            .service
            .clone()
            .unwrap_or_else(|| self.original.to_string());
        let mut record = Record::traced(&self.proxy, SpanKind::Server, &target, &request);
        record.upstream = Some(self.original);
        let request_bytes = record.request_bytes.clone();
        let finish = |mut record: Record, response: Response<ProxyBody>, flag: &'static str| {
            if flag != "-" {
                record.flags.push(flag);
            }
            meter(&self.proxy, parties, record, response)
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
                        Err(_) => return finish(record, bad_path(), "-"),
                    }
                }
                Err(_) => return finish(record, bad_path(), "-"),
            }
        }
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
        let verdict = if self.caller.from_node {
            Verdict::Allow { policy: None }
        } else {
            state
                .policies
                .authorize_request(&workload, &connection, &attributes)
        };
        if let Verdict::Deny { policy, reason } = verdict {
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
            record.facts.policy = Some(policy_name(policy.as_ref()));
            let denied = local_response(StatusCode::FORBIDDEN, ACCESS_DENIED);
            return finish(record, denied, "RBAC");
        }

        let downstream_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop_for_forwarding(&mut parts.headers, downstream_upgrade.is_some());
        if let Some(span) = &record.span {
            span.inject(&mut parts.headers);
        }
        let body = CountedRequest::new(incoming(body), request_bytes).boxed();
        let upstream_request = Request::from_parts(parts, body);
        // One cluster per app port of the pod: the pool's key, with no limits of its own.
        let cluster = self
            .proxy
            .clusters
            .get(&ClusterKey::app(self.pod.key.clone(), self.original.port()));
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
                finish(record, response.map(incoming), "-")
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
                finish(record, failed, flags)
            }
        }
    }
}

fn bad_path() -> Response<ProxyBody> {
    local_response(StatusCode::BAD_REQUEST, "bad request path")
}
