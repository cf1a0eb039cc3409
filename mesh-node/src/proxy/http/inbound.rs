//! The server side of L7: each request arriving for an enrolled pod on an HTTP port is
//! authenticated (RequestAuthentication's JWTs) and authorized here, at the destination
//! node (AuthorizationPolicy with request attributes), then handed to the app over a
//! pooled connection that carries the caller's address.
use std::{net::SocketAddr, sync::Arc};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::debug;

use super::{
    ProxyBody,
    cluster::ClusterKey,
    incoming, is_upgrade, local_response,
    metered::{CountedRequest, PartiesMemo, Record, meter},
    splice_upgrade, strip_hop_by_hop, strip_hop_by_hop_for_forwarding,
    upstream::{Connector, SendError, Via},
};
use crate::{
    distributed_tracing::SpanKind,
    inventory::Workload,
    plan::{
        admission::{ACCESS_DENIED, Caller, authorize_request, policy_name, request_host},
        path::normalize_path,
    },
    policy::{
        Policies, RequestAttributes, Verdict,
        jwt::{self, JwtError, RequestAuth, TokenSources},
    },
    proxy::{PodContext, ProxyContext, inbound::parties},
    routing::ConnectionPool,
};

/// One connection (or HBONE stream) to a pod's HTTP port.
pub struct Inbound {
    pub pod: PodContext,
    pub proxy: ProxyContext,
    pub caller: Caller,
    /// The pod address and port the client asked for: where the app listens.
    pub original: SocketAddr,
    /// The parties of the connection's last request, for the next one.
    pub parties: PartiesMemo,
}

impl Inbound {
    /// Serves one request: its path normalized, authorized, then handed to the app.
    pub async fn handle(self: Arc<Self>, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let state = self.proxy.state.borrow().clone();
        let workload = state.workload_or_unknown(&self.pod.key);
        // Everything the parties depend on but the config is the connection's.
        let parties = self.parties.get(&state, (None, None), || {
            parties(&self.caller, &state, &self.pod, self.original)
        });
        let target = parties
            .parties
            .peers
            .service
            .clone()
            .unwrap_or_else(|| self.original.to_string());
        let mut record = Record::traced(&self.proxy, SpanKind::Server, &target, &request);
        record.upstream = Some(self.original);
        let (response, flag) = if normalize_request_path(&mut request).is_err() {
            (bad_path(), "-")
        } else {
            match admit(
                &self.proxy,
                &state,
                &workload,
                &self.caller,
                self.original,
                &mut request,
            ) {
                Err(refused) => {
                    record.facts.policy = Some(refused.policy);
                    (refused.response, refused.flag)
                }
                Ok(()) => self.forward(request, &mut record).await,
            }
        };
        if flag != "-" {
            record.flags.push(flag);
        }
        meter(&self.proxy, parties, record, response)
    }

    /// Hands the request to the app over the pod's pooled connection; the app's response,
    /// or the proxy's own when the app did not answer, with its response flag.
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        record: &mut Record,
    ) -> (Response<ProxyBody>, &'static str) {
        let downstream_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop_for_forwarding(&mut parts.headers, downstream_upgrade.is_some());
        if let Some(span) = &record.span {
            span.inject(&mut parts.headers);
        }
        let body = CountedRequest::new(incoming(body), record.request_bytes.clone()).boxed();
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
                (response.map(incoming), "-")
            }
            Err(error) => {
                debug!(%error, app = %self.original, "app did not answer");
                let flag = match error {
                    SendError::Reset(_) => "UC",
                    _ => "UF",
                };
                let failed = local_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers",
                );
                (failed, flag)
            }
        }
    }
}

/// Rewrites the request's path to its normal form ([`normalize_path`]), the form both
/// authorization and the app see; `Err` when the result is no valid URI.
fn normalize_request_path<B>(request: &mut Request<B>) -> Result<(), ()> {
    let Some(normalized) = normalize_path(request.uri().path()) else {
        return Ok(());
    };
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(format!("{normalized}{query}").parse().map_err(drop)?);
    *request.uri_mut() = http::Uri::from_parts(parts).map_err(drop)?;
    Ok(())
}

/// Envoy's answer to a bad token: 401 with the reason, and a challenge naming the URL.
/// Why a request was refused where it arrived: the proxy's answer, its response flag (`-`
/// for none) and the policy that refused it, for the access log.
pub(super) struct Refused {
    pub response: Response<ProxyBody>,
    pub flag: &'static str,
    pub policy: String,
}

/// Authenticates (RequestAuthentication) and authorizes (AuthorizationPolicy) a request
/// arriving for `workload` from `caller` at `original`, as the proxy where it arrives does:
/// the destination's for a pod, the gateway for requests from outside.
pub(super) fn admit(
    proxy: &ProxyContext,
    state: &crate::state::State,
    workload: &Workload,
    caller: &Caller,
    original: SocketAddr,
    request: &mut Request<Incoming>,
) -> Result<(), Box<Refused>> {
    let policies = &state.policies;
    let auth = authenticate(proxy, policies, workload, request).map_err(|refused| {
        Box::new(Refused {
            response: unauthorized(&refused, request),
            flag: "-",
            policy: format!("RequestAuthentication: {refused}"),
        })
    })?;
    let auth = auth.as_ref();
    authorize(proxy, policies, workload, caller, original, request, auth).map_err(|denied| {
        Box::new(Refused {
            response: local_response(StatusCode::FORBIDDEN, ACCESS_DENIED),
            flag: "RBAC",
            policy: denied,
        })
    })
}

/// The request's JWTs, validated against the RequestAuthentications of its workload; what a
/// valid token asks of the headers (the token removed, claims added) is done. `Ok(None)`: no
/// token where the rules look, or no rules.
fn authenticate(
    proxy: &ProxyContext,
    policies: &Policies,
    workload: &Workload,
    request: &mut Request<Incoming>,
) -> Result<Option<RequestAuth>, JwtError> {
    let specs = policies.request_authentications(workload);
    if specs.is_empty() {
        return Ok(None);
    }
    let sources = TokenSources {
        headers: request.headers(),
        query: request.uri().query(),
    };
    match jwt::authenticate(&specs, sources, proxy.jwks.as_ref()) {
        Ok(authenticated) => {
            authenticated.apply(request.headers_mut());
            Ok(authenticated.auth)
        }
        Err(error) => {
            debug!(%error, path = request.uri().path(), "request's JWT refused");
            proxy.metrics.node.proxy_error("inbound", error.reason());
            Err(error)
        }
    }
}

/// AuthorizationPolicy for the request, as the planner decides it; a denial names its
/// policy.
fn authorize(
    proxy: &ProxyContext,
    policies: &Policies,
    workload: &Workload,
    caller: &Caller,
    original: SocketAddr,
    request: &Request<Incoming>,
    auth: Option<&RequestAuth>,
) -> Result<(), String> {
    let attributes = RequestAttributes {
        method: request.method().as_str(),
        path: request.uri().path(),
        host: request_host(request.uri(), request.headers()),
        headers: request.headers(),
        auth,
    };
    let verdict = authorize_request(policies, workload, caller, original, &attributes);
    let Verdict::Deny { policy, reason } = verdict else {
        return Ok(());
    };
    debug!(?policy, reason, path = attributes.path, "request denied");
    proxy
        .metrics
        .node
        .proxy_error("inbound", "authorization_denied");
    Err(policy_name(policy.as_ref()))
}

fn unauthorized<B>(error: &JwtError, request: &Request<B>) -> Response<ProxyBody> {
    let mut response = local_response(StatusCode::UNAUTHORIZED, &error.to_string());
    let realm = format!(
        "Bearer realm=\"http://{}{}\", error=\"invalid_token\"",
        request_host(request.uri(), request.headers()),
        request.uri().path()
    );
    if let Ok(challenge) = HeaderValue::from_str(&realm) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
    }
    response
}

fn bad_path() -> Response<ProxyBody> {
    local_response(StatusCode::BAD_REQUEST, "bad request path")
}
