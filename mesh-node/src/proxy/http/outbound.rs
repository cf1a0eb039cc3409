//! The client side of L7: each request of an enrolled pod to an HTTP Service port is
//! routed here, at the source node — VirtualService or HTTPRoute rules, the
//! DestinationRule's subsets, load balancer, limits and outlier detection, then retries,
//! timeouts, faults and mirroring — before it leaves for the chosen endpoint.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header, request::Parts};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use tracing::debug;

use super::{
    ProxyBody,
    cluster::{AttemptResult, Cluster, ClusterKey, HashInput},
    full, incoming, is_upgrade, local_response,
    metered::{CountedRequest, REQUEST_ID, Record, meter},
    splice_upgrade, strip_hop_by_hop, strip_hop_by_hop_for_forwarding,
    upstream::{Connector, SendError, Via},
};
use crate::{
    access_log::Parties,
    distributed_tracing::SpanKind,
    identity::Identity,
    inventory::{ObjectKey, Workload},
    metrics::Reporter,
    plan::{endpoints::service_endpoints, request::rewrite_request},
    proxy::{PodContext, ProxyContext, ProxyError},
    routing::{
        Destination, HashKey, HttpAction, LoadBalancer, RequestInfo, RetryOn, RetryPolicy,
        RouteMatch, TrafficPolicy, pick_weighted, total_weight,
    },
    state::State,
};

/// Request bodies up to this size are buffered so a retry or a mirror can replay them;
/// larger or streaming bodies (gRPC, chunked uploads) go through once, without retries.
const MAX_REPLAY_BODY: u64 = 64 * 1024;
/// Envoy's retry back-off: 25 ms base, doubling, with jitter, at most ten times the base.
const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(25);
const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// One client connection of a pod to a Service port that carries HTTP.
pub struct Outbound {
    pub pod: PodContext,
    pub proxy: ProxyContext,
    pub service: ObjectKey,
    /// The Service port the client dialed.
    pub port: u16,
    /// The ClusterIP the client dialed: its family decides the endpoints' family.
    pub dialed: IpAddr,
}

/// The request's body, replayable when buffered.
enum RequestBody {
    Buffered(Bytes),
    Streaming(Option<ProxyBody>),
}

/// Everything decided about a request before its attempts.
struct Plan {
    destination: Destination,
    policy: TrafficPolicy,
    cluster: Arc<Cluster>,
    candidates: Vec<(ObjectKey, SocketAddr)>,
}

/// How the proxy ended a request, in Envoy's response flags.
struct Local {
    status: StatusCode,
    body: &'static str,
    flags: &'static str,
}

const NO_ROUTE: Local = Local {
    status: StatusCode::NOT_FOUND,
    body: "route not found",
    flags: "NR",
};
const NO_HEALTHY_UPSTREAM: Local = Local {
    status: StatusCode::SERVICE_UNAVAILABLE,
    body: "no healthy upstream",
    flags: "UH",
};
const OVERFLOW: Local = Local {
    status: StatusCode::SERVICE_UNAVAILABLE,
    body: "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    flags: "UO",
};
const CONNECT_FAILURE: Local = Local {
    status: StatusCode::SERVICE_UNAVAILABLE,
    body: "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
    flags: "UF",
};
const RESET: Local = Local {
    status: StatusCode::SERVICE_UNAVAILABLE,
    body: "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
    flags: "UC",
};
const TIMEOUT: Local = Local {
    status: StatusCode::GATEWAY_TIMEOUT,
    body: "upstream request timeout",
    flags: "UT",
};

/// How one attempt on an endpoint ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Status(u16),
    ConnectFailure,
    Reset,
    /// `perTryTimeout` elapsed.
    Timeout,
}

impl Ended {
    fn outlier_result(self) -> AttemptResult {
        match self {
            Ended::Status(status) => AttemptResult::Status(status),
            _ => AttemptResult::LocalFailure,
        }
    }

    /// The proxy's own answer when the last attempt ended without a response.
    fn local(self) -> Local {
        match self {
            Ended::ConnectFailure => CONNECT_FAILURE,
            Ended::Reset => RESET,
            Ended::Timeout | Ended::Status(_) => TIMEOUT,
        }
    }
}

/// Whether `retryOn` retries an attempt that ended so. As in Envoy, `5xx` and
/// `gateway-error` include the failures that never produced a status.
fn retriable(ended: Ended, on: &RetryOn) -> bool {
    let no_status = on.five_xx || on.gateway_error;
    match ended {
        Ended::Status(status) => on.retries_status(status),
        Ended::ConnectFailure => on.connect_failure || no_status,
        Ended::Reset => on.reset || no_status,
        Ended::Timeout => on.reset || no_status,
    }
}

/// The upper bound of the jittered pause before retry number `retry` (1-based).
fn backoff_ceiling(retry: u32) -> Duration {
    RETRY_BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)))
        .min(RETRY_BACKOFF_MAX)
}

/// Rolls a percentage (0–100) the way Envoy's runtime fractions do.
fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rand::random_range(0.0..100.0) < percent)
}

impl Outbound {
    pub async fn handle(self: Arc<Self>, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let state = self.proxy.state.borrow().clone();
        // Envoy's rule: the first proxy gives the request an id, which both ends log.
        if !request.headers().contains_key(REQUEST_ID) {
            let id = format!("{:032x}", rand::random::<u128>());
            if let Ok(value) = HeaderValue::from_str(&id) {
                request.headers_mut().insert(REQUEST_ID, value);
            }
        }
        let target = state
            .services
            .get(&self.service)
            .map_or_else(|| self.service.to_string(), |s| s.hostname());
        let mut record = Record::traced(&self.proxy, SpanKind::Client, &target, &request);
        let source = state.workloads.get(&self.pod.key);
        let no_labels = BTreeMap::new();
        let matched = state.routes.match_http(
            &self.service,
            &RequestInfo {
                method: request.method(),
                uri: request.uri(),
                headers: request.headers(),
                port: self.port,
                source_labels: source.map_or(&no_labels, |w| &w.labels),
            },
        );
        let (rule, matched_prefix) = match matched {
            RouteMatch::Default => (None, None),
            RouteMatch::Rule {
                rule,
                matched_prefix,
            } => (Some(rule), matched_prefix.map(str::to_string)),
            RouteMatch::NoneMatched => {
                return self.local(&state, None, record, NO_ROUTE);
            }
        };
        record.facts.route = rule.map(|r| r.name.clone().unwrap_or_else(|| r.origin.clone()));
        if let Some(fault) = rule.and_then(|r| r.fault.as_ref()) {
            if let Some(delay) = fault.delay.as_ref().filter(|d| chance(d.percent)) {
                tokio::time::sleep(delay.fixed).await;
                record.flags.push("DI");
            }
            if let Some(abort) = fault.abort.as_ref().filter(|a| chance(a.percent)) {
                let status =
                    StatusCode::from_u16(abort.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                record.flags.push("FI");
                let response = local_response(status, "fault filter abort");
                return self.finish(&state, None, record, response);
            }
        }
        let destination = match rule.map(|r| &r.action) {
            None => Destination {
                service: self.service.clone(),
                subset: None,
                port: None,
            },
            Some(HttpAction::Route(destinations)) => {
                let total = total_weight(destinations);
                let roll = if total > 0 {
                    rand::random_range(0..total)
                } else {
                    0
                };
                match pick_weighted(destinations, roll) {
                    Some(destination) => destination.clone(),
                    None => return self.local(&state, None, record, NO_ROUTE),
                }
            }
            Some(HttpAction::DirectResponse { status, body }) => {
                let mut response = local_response(
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
                    body.as_deref().unwrap_or(""),
                );
                if let Some(rule) = rule {
                    rule.response_headers.apply(response.headers_mut());
                }
                return self.finish(&state, None, record, response);
            }
            Some(HttpAction::Redirect {
                scheme,
                authority,
                port,
                path,
                status,
            }) => {
                let response = redirect(
                    &request,
                    scheme.as_deref(),
                    authority.as_deref(),
                    *port,
                    path.as_deref(),
                    *status,
                );
                return self.finish(&state, None, record, response);
            }
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
        let replayable = record.protocol == "http"
            && downstream_upgrade.is_none()
            && (body.is_end_stream()
                || body
                    .size_hint()
                    .upper()
                    .is_some_and(|n| n <= MAX_REPLAY_BODY));
        let body = if replayable {
            match body.collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    record
                        .request_bytes
                        .store(bytes.len() as u64, Ordering::Relaxed);
                    RequestBody::Buffered(bytes)
                }
                Err(error) => {
                    debug!(%error, "client request body failed");
                    let response = local_response(StatusCode::BAD_REQUEST, "bad request body");
                    return self.finish(&state, None, record, response);
                }
            }
        } else {
            RequestBody::Streaming(Some(
                CountedRequest::new(incoming(body), record.request_bytes.clone()).boxed(),
            ))
        };
        if let (Some(mirror), RequestBody::Buffered(bytes)) =
            (rule.and_then(|r| r.mirror.as_ref()), &body)
            && chance(mirror.percent)
        {
            self.clone().mirror(
                state.clone(),
                mirror.destination.clone(),
                &parts,
                bytes.clone(),
            );
        }

        let retries = rule
            .and_then(|r| r.retries.clone())
            .unwrap_or_else(RetryPolicy::istio_default);
        let attempts = self.attempts(&state, &plan, &retries, &parts, body, &mut record);
        let outcome = match rule.and_then(|r| r.timeout) {
            Some(limit) => match tokio::time::timeout(limit, attempts).await {
                Ok(outcome) => outcome,
                Err(_) => Err(TIMEOUT),
            },
            None => attempts.await,
        };
        match outcome {
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

    /// Resolves the destination to its cluster and candidate endpoints.
    fn plan(&self, state: &State, destination: Destination) -> Option<Plan> {
        let port = destination.port.unwrap_or(self.port);
        let service = state.services.get(&destination.service)?;
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

    /// Tries the request up to the retry policy's limit; returns the response to give the
    /// client and the endpoint that gave it, or how the proxy ends the request itself.
    async fn attempts(
        &self,
        state: &State,
        plan: &Plan,
        retries: &RetryPolicy,
        parts: &Parts,
        mut body: RequestBody,
        record: &mut Record,
    ) -> Result<(Response<Incoming>, ObjectKey), Local> {
        let max_attempts = match body {
            RequestBody::Buffered(_) => 1 + retries.attempts,
            RequestBody::Streaming(_) => 1,
        };
        let addresses: Vec<SocketAddr> = plan.candidates.iter().map(|(_, a)| *a).collect();
        let limits = &plan.policy.connection_pool;
        let detection = plan.policy.outlier_detection.as_ref();
        let hash = self.hash_input(&plan.policy.load_balancer, parts);
        let mut tried = Vec::new();
        let mut _retry_slot = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > 1 {
                match plan.cluster.start_retry(limits) {
                    Some(slot) => _retry_slot = Some(slot),
                    None => return Err(OVERFLOW),
                }
                let ceiling = backoff_ceiling(attempt - 1);
                let jitter = rand::random_range(0..=ceiling.as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            let last = attempt >= max_attempts;
            let Some(endpoint) =
                plan.cluster
                    .pick(&addresses, &plan.policy.load_balancer, hash, &tried)
            else {
                return Err(NO_HEALTHY_UPSTREAM);
            };
            tried.push(endpoint);
            record.upstream = Some(endpoint);
            let endpoint_key = plan
                .candidates
                .iter()
                .find(|(_, a)| *a == endpoint)
                .map(|(k, _)| k.clone())
                .expect("picked from the candidates");
            let Some(_active) = plan.cluster.start_request(endpoint, limits) else {
                self.proxy
                    .metrics
                    .node
                    .upstream_overflow(&plan.destination.service.to_string());
                return Err(OVERFLOW);
            };
            let mut upstream_request = Request::from_parts(
                parts.clone(),
                match &mut body {
                    RequestBody::Buffered(bytes) => full(bytes.clone()),
                    RequestBody::Streaming(body) => body.take().unwrap_or_else(super::empty),
                },
            );
            upstream_request
                .headers_mut()
                .insert("x-envoy-attempt-count", HeaderValue::from(attempt));
            if upstream_request.version() == http::Version::HTTP_2 {
                absolute_uri(&mut upstream_request);
            }
            let via = match self.via(state, endpoint) {
                Ok(via) => via,
                Err(error) => {
                    debug!(%error, %endpoint, "no identity for the upstream");
                    return Err(CONNECT_FAILURE);
                }
            };
            let connector = Connector {
                pod: &self.pod,
                proxy: &self.proxy,
                endpoint,
                via,
            };
            let send =
                self.proxy
                    .upstreams
                    .send(&plan.cluster, limits, &connector, upstream_request);
            let sent = match retries.per_try_timeout {
                Some(limit) => tokio::time::timeout(limit, send).await.ok(),
                None => Some(send.await),
            };
            let (ended, response) = match sent {
                Some(Ok(response)) => (Ended::Status(response.status().as_u16()), Some(response)),
                Some(Err(SendError::Overflow)) => {
                    self.proxy
                        .metrics
                        .node
                        .upstream_overflow(&plan.destination.service.to_string());
                    return Err(OVERFLOW);
                }
                Some(Err(SendError::Connect(error))) => {
                    debug!(%error, %endpoint, "upstream connect failed");
                    (Ended::ConnectFailure, None)
                }
                Some(Err(SendError::Reset(error))) => {
                    debug!(%error, %endpoint, "upstream reset");
                    (Ended::Reset, None)
                }
                None => (Ended::Timeout, None),
            };
            if plan
                .cluster
                .report(endpoint, ended.outlier_result(), detection, addresses.len())
            {
                self.proxy
                    .metrics
                    .node
                    .outlier_ejected(&plan.destination.service.to_string());
            }
            let retry = retriable(ended, &retries.retry_on);
            if last || !retry {
                if attempt > 1 && retry {
                    record.flags.push("URX");
                }
                return match response {
                    Some(response) => Ok((response, endpoint_key)),
                    None => Err(ended.local()),
                };
            }
        }
    }

    /// HBONE when both ends are enrolled and the agent has a CA, else plaintext.
    fn via(&self, state: &State, endpoint: SocketAddr) -> Result<Via, ProxyError> {
        let source = state.workloads.get(&self.pod.key);
        let destination = state.workload_by_ip(endpoint.ip());
        Ok(match (&self.proxy.mtls, source, destination) {
            (Some(mtls), Some(source), Some(destination)) if destination.enrolled => Via::Hbone {
                source: mtls.identity_of(source)?,
                destination: mtls.identity_of(destination)?,
            },
            _ => Via::Plaintext,
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

    /// Sends a copy to the mirror destination and ignores its answer (Envoy's shadowing:
    /// the copy's authority gets `-shadow` appended).
    fn mirror(
        self: Arc<Self>,
        state: Arc<State>,
        destination: Destination,
        parts: &Parts,
        body: Bytes,
    ) {
        let mut parts = parts.clone();
        let authority = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()));
        if let Some(authority) = authority
            && let Ok(value) = HeaderValue::from_str(&format!("{authority}-shadow"))
        {
            parts.headers.insert(header::HOST, value);
        }
        tokio::spawn(async move {
            let Some(plan) = self.plan(&state, destination) else {
                return;
            };
            let no_retries = RetryPolicy {
                attempts: 0,
                ..RetryPolicy::istio_default()
            };
            let mut record = Record::new(&parts.method, &parts.uri, &parts.headers, None);
            let outcome = self
                .attempts(
                    &state,
                    &plan,
                    &no_retries,
                    &parts,
                    RequestBody::Buffered(body),
                    &mut record,
                )
                .await;
            if let Ok((response, _)) = outcome {
                // Read the answer to the end so the connection returns to the pool.
                let _ = response.into_body().collect().await;
            }
        });
    }

    fn local(
        &self,
        state: &State,
        plan: Option<&Plan>,
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
        state: &State,
        destination: Option<&Workload>,
        record: Record,
        response: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let service = state.services.get(&self.service);
        self.metered(state, destination, service, None, record, response)
    }

    fn finish_with(
        &self,
        state: &State,
        destination: Option<&Workload>,
        plan: &Plan,
        record: Record,
        response: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let service = state.services.get(&plan.destination.service);
        let identities = destination.and_then(|d| self.identities(state, d));
        self.metered(state, destination, service, identities, record, response)
    }

    fn identities(&self, state: &State, destination: &Workload) -> Option<(Identity, Identity)> {
        let mtls = self.proxy.mtls.as_ref()?;
        let source = state.workloads.get(&self.pod.key)?;
        if !destination.enrolled {
            return None;
        }
        Some((
            mtls.identity_of(source).ok()?,
            mtls.identity_of(destination).ok()?,
        ))
    }

    /// Wraps the response so the request's metrics are recorded when its body ends.
    fn metered(
        &self,
        state: &State,
        destination: Option<&Workload>,
        service: Option<&crate::inventory::Service>,
        identities: Option<(Identity, Identity)>,
        record: Record,
        response: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let source = state.workloads.get(&self.pod.key);
        let parties = Parties::new(
            Reporter::Source,
            source,
            destination,
            service,
            identities.as_ref().map(|(s, d)| (s, d)),
            self.pod.ip_like(self.dialed),
        );
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

/// A redirect answer: each part of the location that the rule does not set is the
/// request's own.
fn redirect(
    request: &Request<Incoming>,
    scheme: Option<&str>,
    authority: Option<&str>,
    port: Option<u16>,
    path: Option<&str>,
    status: u16,
) -> Response<ProxyBody> {
    let host = authority
        .map(str::to_string)
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let host = match port {
        Some(port) => format!("{}:{port}", host.split(':').next().unwrap_or_default()),
        None => host,
    };
    let path = path.map(str::to_string).unwrap_or_else(|| {
        request
            .uri()
            .path_and_query()
            .map_or("/".into(), |pq| pq.to_string())
    });
    let location = format!("{}://{host}{path}", scheme.unwrap_or("http"));
    let mut response = local_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::MOVED_PERMANENTLY),
        "",
    );
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

#[cfg(test)]
mod tests;
