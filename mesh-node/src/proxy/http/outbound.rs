//! The client side of L7: each request of an enrolled pod to an HTTP Service port is
//! routed here, at the source node — VirtualService or HTTPRoute rules, the
//! DestinationRule's subsets, load balancer, limits and outlier detection, then retries,
//! timeouts, faults and mirroring — before it leaves for the chosen endpoint.
//!
//! Each stage has its file: [`fault`], [`route`] (what the matched rule does), [`body`]
//! (buffered for replay or streamed), [`mirror`], [`retry`] (attempts, back-off, timeouts),
//! and [`replies`] (the proxy's own answers); [`Outbound::handle`] composes them in order,
//! and the request is metered when its response ends (`metered`).
mod body;
mod fault;
mod mirror;
mod replies;
mod retry;
mod route;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::{HeaderValue, Request, Response, StatusCode, Uri, header, request::Parts};
use hyper::body::Incoming;
use tracing::debug;

use self::{
    body::RequestBody,
    replies::{Local, NO_HEALTHY_UPSTREAM, NO_ROUTE},
    route::Action,
};
use super::{
    ProxyBody,
    cluster::{Cluster, ClusterKey, HashInput},
    inbound, incoming, is_upgrade, local_response,
    metered::{PartiesMemo, REQUEST_ID, Record, meter},
    splice_upgrade, strip_hop_by_hop, strip_hop_by_hop_for_forwarding,
    upstream::Via,
};
use crate::{
    access_log::Parties,
    distributed_tracing::SpanKind,
    identity::Identity,
    inventory::{Labels, ObjectKey, Workload},
    metrics::Reporter,
    plan::{
        endpoints::service_endpoints,
        gateway::{self, GatewayScope, Selected},
        request::{RequestHead, rewrite_request, select_route},
        tunnel::tunnel_identities,
    },
    proxy::{CertificateError, PodContext, ProxyContext, ProxyError},
    routing::{Destination, HashKey, LoadBalancer, RetryPolicy, RouteMatch, TrafficPolicy},
    state::State,
};

/// One client connection of a pod to a Service port that carries HTTP.
pub struct Outbound {
    pub pod: PodContext,
    pub proxy: ProxyContext,
    pub service: ObjectKey,
    /// The Service port the client dialed.
    pub port: u16,
    /// The ClusterIP the client dialed: its family decides the endpoints' family.
    pub dialed: IpAddr,
    /// The parties of the connection's last request, for the next one.
    pub parties: PartiesMemo,
    /// At a gateway: the servers the connection is served by, whose Gateways'
    /// VirtualServices route it, and the client, whom the gateway's own policies admit
    /// (then `service` is the gateway pod, and `port` the gateway's). `None` in the node
    /// proxy: the dialed Service's routes apply, and the destination admits.
    pub gateway: Option<GatewayScope>,
}

/// Everything decided about a request before its attempts, borrowing from the config
/// (`'s`): the candidates are the Service's endpoints, which a request must not copy.
struct Plan<'s> {
    destination: Destination,
    policy: TrafficPolicy,
    cluster: Arc<Cluster>,
    candidates: Vec<(&'s ObjectKey, SocketAddr)>,
}

impl Plan<'_> {
    /// The pod behind a candidate address the load balancer picked.
    fn endpoint_key(&self, endpoint: SocketAddr) -> ObjectKey {
        self.candidates
            .iter()
            .find(|(_, a)| *a == endpoint)
            .map(|(k, _)| (*k).clone())
            .expect("picked from the candidates")
    }
}

/// Envoy's rule: the first proxy gives the request an id, which both ends log.
fn ensure_request_id<B>(request: &mut Request<B>) {
    if !request.headers().contains_key(REQUEST_ID) {
        let id = format!("{:032x}", rand::random::<u128>());
        if let Ok(value) = HeaderValue::from_str(&id) {
            request.headers_mut().insert(REQUEST_ID, value);
        }
    }
}

impl Outbound {
    /// Serves one request: matched to a route, faults injected, sent on to the chosen
    /// destination (mirrored, retried, within the route's timeout) or answered at the source.
    pub async fn handle(self: Arc<Self>, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let state = self.proxy.state.borrow().clone();
        ensure_request_id(&mut request);
        let target = state
            .services
            .get(&self.service)
            .map_or_else(|| self.service.to_string(), |s| s.hostname());
        let mut record = Record::traced(&self.proxy, SpanKind::Client, &target, &request);
        if let Err(refused) = self.admit_at_gateway(&state, &mut request) {
            return self.refused(&state, record, *refused);
        }
        let (rule, matched_prefix) = match self.select(&state, &request) {
            Ok(RouteMatch::Default) => (None, None),
            Ok(RouteMatch::Rule {
                rule,
                matched_prefix,
            }) => (Some(rule), matched_prefix.map(str::to_string)),
            Ok(RouteMatch::NoneMatched) => return self.local(&state, None, record, NO_ROUTE),
            Err(redirect) => return self.finish(&state, None, record, *redirect),
        };
        record.facts.route = rule.map(|r| r.name.clone().unwrap_or_else(|| r.origin.clone()));
        if let Some(fault) = rule.and_then(|r| r.fault.as_ref())
            && let Some(aborted) = fault::inject(fault, &mut record).await
        {
            return self.finish(&state, None, record, aborted);
        }
        let destination = match route::action(rule, &self.service, &request) {
            Action::Forward(destination) => destination,
            Action::Answer(response) => return self.finish(&state, None, record, response),
            Action::NoRoute => return self.local(&state, None, record, NO_ROUTE),
        };
        let Some(plan) = self.plan(&state, destination) else {
            return self.local(&state, None, record, NO_HEALTHY_UPSTREAM);
        };

        // The request as it will leave: rewritten, with the route's header changes.
        let downstream_upgrade = is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        if let Some(rule) = rule {
            rewrite_request(&mut parts, rule, matched_prefix.as_deref());
        }
        strip_hop_by_hop_for_forwarding(&mut parts.headers, downstream_upgrade.is_some());
        if let Some(span) = &record.span {
            span.inject(&mut parts.headers);
        }
        let body = match RequestBody::read(body, &record, downstream_upgrade.is_some()).await {
            Ok(body) => body,
            Err(error) => {
                debug!(%error, "client request body failed");
                let response = local_response(StatusCode::BAD_REQUEST, "bad request body");
                return self.finish(&state, None, record, response);
            }
        };
        self.mirror_if_asked(&state, rule, &parts, &body);
        let retries = rule
            .and_then(|r| r.retries.clone())
            .unwrap_or_else(RetryPolicy::istio_default);
        let attempts = self.attempts(&state, &plan, &retries, &parts, body, &mut record);
        match retry::within_timeout(rule.and_then(|r| r.timeout), attempts).await {
            Ok((mut response, endpoint)) => {
                if let Some(rule) = rule {
                    rule.response_headers.apply(response.headers_mut());
                }
                if response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(downstream) = downstream_upgrade
                {
                    splice_upgrade(downstream, hyper::upgrade::on(&mut response));
                } else {
                    strip_hop_by_hop(response.headers_mut());
                }
                let response = response.map(incoming);
                let destination = state.workloads.get(&endpoint);
                self.finish_with(&state, destination, &plan, record, response)
            }
            Err(local) => self.local(&state, Some(&plan), record, local),
        }
    }

    /// A gateway is where requests from outside arrive: the RequestAuthentications and
    /// AuthorizationPolicies that select it apply there, before any routing. Nothing to do
    /// in the node proxy (the destination admits).
    fn admit_at_gateway(
        &self,
        state: &State,
        request: &mut Request<Incoming>,
    ) -> Result<(), Box<inbound::Refused>> {
        let Some(scope) = &self.gateway else {
            return Ok(());
        };
        let gateway = state.workload_or_unknown(&self.pod.key);
        // The gateway itself set this header (any copy the client sent was replaced): the
        // client behind the proxies it trusts.
        let mut client = scope.client.clone();
        client.remote_ip = request
            .headers()
            .get(gateway::EXTERNAL_ADDRESS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        inbound::admit(&self.proxy, state, &gateway, &client, scope.local, request)
    }

    /// The gateway's answer to a request its policies refused, with why.
    fn refused(
        &self,
        state: &Arc<State>,
        mut record: Record,
        refused: inbound::Refused,
    ) -> Response<ProxyBody> {
        record.facts.policy = Some(refused.policy);
        record
            .flags
            .extend(Some(refused.flag).filter(|f| *f != "-"));
        self.finish(state, None, record, refused.response)
    }

    /// The route of `request`: the dialed Service's, or at a gateway its servers' (`Err`:
    /// the gateway's own answer, a redirect to HTTPS).
    fn select<'s>(
        &'s self,
        state: &'s State,
        request: &Request<Incoming>,
    ) -> Result<RouteMatch<'s>, Box<Response<ProxyBody>>> {
        let source = state.workloads.get(&self.pod.key);
        let head = RequestHead::of(request);
        let Some(scope) = &self.gateway else {
            return Ok(select_route(state, &self.service, self.port, source, head));
        };
        let no_labels = Labels::new();
        let labels = source.map_or(&no_labels, |w| &w.labels);
        match gateway::select(state, &scope.servers, self.port, labels, head) {
            Selected::Redirect(location) => {
                let mut response = Response::new(super::empty());
                *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
                if let Ok(location) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, location);
                }
                Err(Box::new(response))
            }
            Selected::Route { matched, .. } => Ok(matched),
            Selected::NoRoute => Ok(RouteMatch::NoneMatched),
        }
    }

    /// Resolves the destination to its cluster and candidate endpoints.
    fn plan<'s>(&self, state: &'s State, destination: Destination) -> Option<Plan<'s>> {
        let service = state.services.get(&destination.service)?;
        let port = match destination.port {
            Some(port) => port,
            // A gateway dialed no Service port: a destination without one is its Service's
            // only port (Istio's rule).
            None if self.gateway.is_some() => match service.ports.as_slice() {
                [only] => only.port,
                _ => return None,
            },
            None => self.port,
        };
        let subset_labels = match &destination.subset {
            Some(subset) => Some(state.routes.subset_labels(&service.key, subset)?),
            None => None,
        };
        let candidates = service_endpoints(state, service, port, self.dialed, subset_labels)?;
        let policy = state
            .routes
            .traffic_policy(&service.key, destination.subset.as_deref(), port);
        let cluster = self.proxy.clusters.get(&ClusterKey::service(
            service.key.clone(),
            destination.subset.clone(),
            port,
        ));
        Some(Plan {
            destination,
            policy,
            cluster,
            candidates,
        })
    }

    /// HBONE when both ends are enrolled and the agent has a CA, else plaintext.
    fn via(&self, state: &State, endpoint: SocketAddr) -> Result<Via, ProxyError> {
        let source = state.workloads.get(&self.pod.key);
        let destination = state.workload_by_ip(endpoint.ip());
        let (Some(source), Some(destination)) = (source, destination) else {
            return Ok(Via::Plaintext);
        };
        let trust_domain = self.proxy.mtls.as_ref().map(|m| m.trust_domain.as_str());
        let identities =
            tunnel_identities(trust_domain, source, destination).map_err(CertificateError::from)?;
        Ok(match identities {
            Some((source, destination)) => Via::Hbone {
                source,
                destination,
            },
            None => Via::Plaintext,
        })
    }

    fn hash_input(&self, load_balancer: &LoadBalancer, parts: &Parts) -> HashInput {
        let LoadBalancer::ConsistentHash(key) = load_balancer else {
            return HashInput::default();
        };
        match key {
            HashKey::Header(name) => parts
                .headers
                .get(name)
                .map_or_else(HashInput::default, |v| HashInput::of(v.as_bytes())),
            HashKey::Cookie(name) => {
                cookie(parts, name).map_or_else(HashInput::default, HashInput::of)
            }
            HashKey::SourceIp => self
                .pod
                .ip_like(self.dialed)
                .map_or_else(HashInput::default, HashInput::of),
        }
    }

    fn local(
        &self,
        state: &Arc<State>,
        plan: Option<&Plan<'_>>,
        mut record: Record,
        local: Local,
    ) -> Response<ProxyBody> {
        record.flags.push(local.flags);
        let response = local_response(local.status, local.body);
        match plan {
            Some(plan) => self.finish_with(state, None, plan, record, response),
            None => self.finish(state, None, record, response),
        }
    }

    fn finish(
        &self,
        state: &Arc<State>,
        destination: Option<&Workload>,
        record: Record,
        response: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let service = state.services.get(&self.service);
        self.metered(state, destination, service, record, response)
    }

    fn finish_with(
        &self,
        state: &Arc<State>,
        destination: Option<&Workload>,
        plan: &Plan<'_>,
        record: Record,
        response: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let service = state.services.get(&plan.destination.service);
        self.metered(state, destination, service, record, response)
    }

    fn identities(&self, state: &State, destination: &Workload) -> Option<(Identity, Identity)> {
        let trust_domain = self.proxy.mtls.as_ref()?.trust_domain.as_str();
        let source = state.workloads.get(&self.pod.key)?;
        tunnel_identities(Some(trust_domain), source, destination)
            .ok()
            .flatten()
    }

    /// Wraps the response so the request's metrics are recorded when its body ends. The
    /// parties (labels, identities) are the connection's last request's when it went to
    /// the same pod and Service under the same config.
    fn metered(
        &self,
        state: &Arc<State>,
        destination: Option<&Workload>,
        service: Option<&crate::inventory::Service>,
        record: Record,
        response: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let built_for = (destination.map(|d| &d.key), service.map(|s| &s.key));
        let parties = self.parties.get(state, built_for, || {
            let identities = destination.and_then(|d| self.identities(state, d));
            Parties::new(
                Reporter::Source,
                state.workloads.get(&self.pod.key),
                destination,
                service,
                identities.as_ref().map(|(s, d)| (s, d)),
                self.pod.ip_like(self.dialed),
            )
        });
        meter(&self.proxy, parties, record, response)
    }
}

/// HTTP/2 upstream requests carry scheme and authority (`:scheme`, `:authority`).
fn absolute_uri(request: &mut Request<ProxyBody>) {
    if request.uri().authority().is_some() {
        return;
    }
    let authority = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    if let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
    {
        *request.uri_mut() = uri;
    }
}

fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests;
