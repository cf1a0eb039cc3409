//! `mesh-node debug explain`: what the mesh would do with one request from a pod, and why.
//!
//! The agent computes it (admin API `/explain`) from its live [`State`] with the planner
//! ([`crate::plan`]) whose decisions the proxy carries out: Istio's port protocol rule
//! ([`port_protocol`]), route selection ([`select_route`], a VirtualService's `tcp`
//! routes), the DestinationRule subsets and the endpoint set ([`service_endpoints`]), the
//! source proxy's request rewrite ([`rewrite_request`]), mutual TLS or plaintext, and at
//! each endpoint the destination proxy's admission ([`check_policy`]) and request
//! authorization ([`normalize_path`], [`authorize_request`]). It imports nothing of the
//! proxy (`tests/architecture.rs` checks it), so it cannot replay anything else.
//!
//! What it cannot know, and so does not claim: which endpoint the load balancer picks
//! (every candidate is judged), endpoints ejected by outlier detection, circuit breaker
//! limits, faults rolled by percentage, and whether the app listens.
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use comfy_table::{Table, presets::NOTHING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, header, request::Parts};
use serde::{Deserialize, Serialize};

use crate::{
    egress::OutboundTrafficPolicy,
    identity::Identity,
    inventory::{ObjectKey, Resolution, Service, ServicePort, TargetPort, Workload},
    plan::{
        admission::{
            ACCESS_DENIED, Admission, Caller, Refused, admission_for, authorize_request,
            check_policy, refuse_own_listeners, request_host,
        },
        endpoints::{service_endpoints, tcp_target},
        path::normalize_path,
        protocol::{self, PortProtocol, port_protocol},
        request::{RequestHead, rewrite_request, select_route},
        tunnel::{tunnel_identities, workload_identity},
    },
    policy::{
        Action, MtlsMode, Policies, RequestAttributes, Verdict,
        jwt::{self, FetchedKeys, TokenSources},
    },
    routing::{Destination, HttpAction, HttpRule, RouteMatch, host::resolve_host, total_weight},
    state::State,
};

/// The namespace of a pod named without one, as kubectl assumes.
const DEFAULT_NAMESPACE: &str = "default";

/// The request to explain, as `mesh-node debug explain` takes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExplainRequest {
    /// The client pod: `namespace/name`, or `name` in namespace `default`.
    pub source: String,
    /// A Service (`name`, `name.namespace`, `name.namespace.svc.cluster.local`), a
    /// ClusterIP, a pod (`namespace/name`) or a pod IP.
    pub destination: String,
    /// Needed unless the destination is a Service with a single port.
    pub port: Option<u16>,
    /// Path and query; `/` by default.
    pub path: Option<String>,
    /// `GET` by default.
    pub method: Option<String>,
    /// `(name, value)` pairs the request carries.
    pub headers: Vec<(String, String)>,
}

/// Why a request cannot be explained (the question, not the answer, is wrong).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error(
        "missing {0}: ask /explain?source=<pod>&destination=<service, pod or IP>\
         [&port=<port>&path=<path>&method=<method>&header=<name>:<value>]"
    )]
    Missing(&'static str),
    #[error("{parameter} {value:?}: {reason}")]
    Invalid {
        parameter: &'static str,
        value: String,
        reason: String,
    },
    #[error("no pod {0} in the agent's state (see `mesh-node debug workloads`)")]
    UnknownSource(ObjectKey),
    #[error("{destination} has {ports}: pick one with --port")]
    PortNeeded { destination: String, ports: String },
}

impl ExplainError {
    fn invalid(parameter: &'static str, value: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            parameter,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

// === impl ExplainRequest ===

impl ExplainRequest {
    /// The admin API query string (percent-encoded) that asks for this explanation.
    pub fn to_query(&self) -> String {
        let mut pairs = vec![
            ("source", self.source.clone()),
            ("destination", self.destination.clone()),
        ];
        pairs.extend(self.port.map(|port| ("port", port.to_string())));
        pairs.extend(self.path.clone().map(|path| ("path", path)));
        pairs.extend(self.method.clone().map(|method| ("method", method)));
        pairs.extend(
            self.headers
                .iter()
                .map(|(name, value)| ("header", format!("{name}:{value}"))),
        );
        pairs
            .iter()
            .map(|(key, value)| format!("{key}={}", percent_encode(value)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// Reads [`to_query`](Self::to_query)'s output (or what a person typed into curl).
    pub fn from_query(query: &str) -> Result<Self, ExplainError> {
        let mut request = ExplainRequest::default();
        let (mut source, mut destination) = (None, None);
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(raw).ok_or_else(|| {
                ExplainError::invalid("query", raw, "is not percent-encoded UTF-8")
            })?;
            match key {
                "source" => source = Some(value),
                "destination" => destination = Some(value),
                "port" => {
                    let port = value
                        .parse::<u16>()
                        .ok()
                        .filter(|port| *port != 0)
                        .ok_or_else(|| {
                            ExplainError::invalid("port", &value, "is not a port number (1-65535)")
                        })?;
                    request.port = Some(port);
                }
                "path" => request.path = Some(value),
                "method" => request.method = Some(value),
                "header" => {
                    let (name, header_value) = value.split_once(':').ok_or_else(|| {
                        ExplainError::invalid("header", &value, "is not <name>:<value>")
                    })?;
                    request
                        .headers
                        .push((name.trim().to_string(), header_value.trim().to_string()));
                }
                _ => {
                    return Err(ExplainError::invalid(
                        "parameter",
                        key,
                        "is not one of source, destination, port, path, method, header",
                    ));
                }
            }
        }
        request.source = source
            .filter(|s| !s.is_empty())
            .ok_or(ExplainError::Missing("source"))?;
        request.destination = destination
            .filter(|d| !d.is_empty())
            .ok_or(ExplainError::Missing("destination"))?;
        Ok(request)
    }

    /// Whether the request says anything only HTTP carries: then a port that declares no
    /// protocol is explained as HTTP (the proxy sniffs an HTTP request as HTTP).
    fn speaks_http(&self) -> bool {
        self.path.is_some() || self.method.is_some() || !self.headers.is_empty()
    }
}

/// Everything but RFC 3986's unreserved characters and the `/` and `:` that paths, pods
/// and headers are full of.
fn percent_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/:".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

// === The answer ===

/// What the mesh does with the request, from source to every endpoint it may reach.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub source: SourcePod,
    /// The destination as resolved: `Service ns/name`, `Pod ns/name`, `outside the mesh`
    /// or what could not be resolved.
    pub destination: String,
    /// The address the client dials, when there is one.
    pub address: Option<SocketAddr>,
    /// How the source's proxy reads the connection, and why: `HTTP: ...` or `TCP: ...`.
    pub protocol: String,
    /// The request as the source sends it (`GET /path`), when it is HTTP.
    pub request: Option<String>,
    /// The route that applies, or why none does.
    pub route: String,
    /// Where the route sends requests, with their share.
    pub backends: Vec<Backend>,
    pub notes: Vec<String>,
    pub verdict: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePod {
    /// `namespace/name`.
    pub pod: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// Whether its connections are captured by the mesh.
    pub enrolled: bool,
    /// Its SPIFFE identity, when it talks mutual TLS.
    pub identity: Option<String>,
}

/// One destination of the route: a Service (subset, port) or the pod addressed directly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    /// `Service ns/name` or `Pod ns/name`.
    pub target: String,
    pub subset: Option<String>,
    pub port: u16,
    /// Share of the requests (or connections) the route sends here, in percent.
    pub share_percent: f64,
    pub endpoints: Vec<EndpointCheck>,
    /// Why this backend reaches nothing, if it does not.
    pub unroutable: Option<String>,
}

/// One endpoint the request may reach, and what its node's proxy decides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointCheck {
    /// `namespace/name`.
    pub pod: String,
    pub node: String,
    pub address: SocketAddr,
    /// HBONE (mutual TLS) from the source's identity to this one, else plaintext.
    pub mutual_tls: bool,
    pub identity: Option<String>,
    /// `HTTP` or `TCP` as the destination's proxy reads it; `-` when not captured there.
    pub protocol: String,
    /// The PeerAuthentication mode at this pod and port (enrolled pods only).
    pub peer_authentication: Option<MtlsMode>,
    pub outcome: Outcome,
    /// Which policy decided, or why none applied.
    pub detail: String,
}

/// The final line: `ALLOWED`, `DENIED by <policy>: <reason>` or `UNROUTABLE: <why>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Allowed,
    Denied { by: String, reason: String },
    Unroutable { why: String },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Allowed => write!(f, "ALLOWED"),
            Outcome::Denied { by, reason } => write!(f, "DENIED by {by}: {reason}"),
            Outcome::Unroutable { why } => write!(f, "UNROUTABLE: {why}"),
        }
    }
}

/// What the agent knows besides its state.
#[derive(Clone, Copy, Debug)]
pub struct Agent<'a> {
    /// This agent's node.
    pub node: &'a str,
    /// The trust domain when the agent has a CA (enrolled pods talk mutual TLS); `None`
    /// when it runs plaintext.
    pub trust_domain: Option<&'a str>,
    /// What becomes of connections to destinations the mesh does not know.
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// The key sets the agent fetched for RequestAuthentication, to validate a token the
    /// request carries as the destination's proxy would.
    pub jwt_keys: &'a dyn FetchedKeys,
}

/// Explains `request` against `state`.
pub fn explain(
    state: &State,
    agent: Agent<'_>,
    request: &ExplainRequest,
) -> Result<Explanation, ExplainError> {
    let source_key = pod_key(&request.source);
    let source = state
        .workloads
        .get(&source_key)
        .ok_or(ExplainError::UnknownSource(source_key))?;
    let target = Target::resolve(state, source, &request.destination)?;
    let port = target.port(request)?;
    let client = Client::new(source, agent, request, port)?;
    let mut explainer = Explainer::new(state, source, agent, client);
    let (destination, address) = target.describe(port);
    let path = explainer.follow(&target, port);
    if source.node != agent.node {
        explainer.notes.push(format!(
            "{} runs on {}: that node's agent routes its requests (from the same config)",
            source.key, source.node
        ));
    }
    Ok(Explanation {
        source: SourcePod {
            pod: source.key.to_string(),
            node: source.node.clone(),
            ips: source.ips.clone(),
            enrolled: source.enrolled,
            identity: explainer.client.identity.as_ref().map(ToString::to_string),
        },
        destination,
        address,
        protocol: path.protocol,
        request: path.request,
        route: path.route,
        backends: path.backends,
        notes: explainer.notes,
        verdict: path.verdict,
    })
}

/// `namespace/name`, or `name` in the default namespace.
fn pod_key(reference: &str) -> ObjectKey {
    match reference.split_once('/') {
        Some((namespace, name)) => ObjectKey::new(namespace, name),
        None => ObjectKey::new(DEFAULT_NAMESPACE, reference),
    }
}

/// The destination, resolved as the client's DNS and the proxy would.
enum Target<'a> {
    Service {
        service: &'a Service,
        /// The ClusterIP the client dials: its family picks the endpoints' family.
        dialed: IpAddr,
    },
    Pod {
        workload: &'a Workload,
        ip: IpAddr,
    },
    /// An address the mesh knows nothing about.
    Outside(IpAddr),
    /// A name that resolves to nothing, and why.
    Nothing(String),
}

impl<'a> Target<'a> {
    fn resolve(
        state: &'a State,
        source: &Workload,
        destination: &str,
    ) -> Result<Self, ExplainError> {
        let namespace = &source.key.namespace;
        if let Ok(ip) = destination.parse::<IpAddr>() {
            let service = state.service_by_ip(ip).filter(|s| s.visible_to(namespace));
            return Ok(if let Some(service) = service {
                Target::Service {
                    service,
                    dialed: ip,
                }
            } else if let Some(workload) = state.workload_by_ip(ip) {
                Target::Pod { workload, ip }
            } else {
                Target::Outside(ip)
            });
        }
        // A ServiceEntry's host, as the pod's DNS would answer with its address.
        let entry = state
            .services
            .values()
            .find(|s| s.external.is_some() && s.key.name == destination && s.visible_to(namespace));
        if let Some(service) = entry {
            // Without addresses the pod dials what its DNS answers, which the mesh does not
            // know: the request's Host names the entry.
            let dialed = service
                .cluster_ips
                .first()
                .copied()
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            return Ok(Target::Service { service, dialed });
        }
        if destination.contains('/') {
            let key = pod_key(destination);
            let Some(workload) = state.workloads.get(&key) else {
                return Ok(Target::Nothing(format!("no pod {key}")));
            };
            let ip = source
                .ips
                .iter()
                .find_map(|ip| workload.ip_like(*ip))
                .or_else(|| workload.ips.first().copied());
            return Ok(match ip {
                Some(ip) => Target::Pod { workload, ip },
                None => Target::Nothing(format!("pod {key} has no address yet")),
            });
        }
        let key = resolve_host(destination, &source.key.namespace).ok_or_else(|| {
            ExplainError::invalid(
                "destination",
                destination,
                "is not a Service name (name.namespace), a pod (namespace/name) or an IP",
            )
        })?;
        let Some(service) = state.services.get(&key) else {
            return Ok(Target::Nothing(format!(
                "no Service {key}: the name does not resolve"
            )));
        };
        let dialed = source
            .ips
            .iter()
            .find_map(|ip| {
                service
                    .cluster_ips
                    .iter()
                    .find(|c| c.is_ipv4() == ip.is_ipv4())
            })
            .or_else(|| service.cluster_ips.first());
        Ok(match dialed {
            Some(dialed) => Target::Service {
                service,
                dialed: *dialed,
            },
            None => Target::Nothing(format!(
                "Service {key} has no ClusterIP (headless): clients connect to its pods; \
                 explain one of them"
            )),
        })
    }

    /// The port asked for, or the Service's only one.
    fn port(&self, request: &ExplainRequest) -> Result<Option<u16>, ExplainError> {
        if let Some(port) = request.port {
            return Ok(Some(port));
        }
        let needed = |ports: String| ExplainError::PortNeeded {
            destination: request.destination.clone(),
            ports,
        };
        match self {
            Target::Service { service, .. } => match service.ports.as_slice() {
                [only] => Ok(Some(only.port)),
                ports => Err(needed(format!(
                    "ports {}",
                    ports
                        .iter()
                        .map(|p| p.port.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            },
            Target::Pod { .. } | Target::Outside(_) => Err(needed("no default port".into())),
            Target::Nothing(_) => Ok(None),
        }
    }

    fn describe(&self, port: Option<u16>) -> (String, Option<SocketAddr>) {
        let address = |ip: IpAddr| port.map(|port| SocketAddr::new(ip, port));
        match self {
            Target::Service { service, dialed } if service.external.is_some() => (
                format!("ServiceEntry host {}", service.key),
                address(*dialed),
            ),
            Target::Service { service, dialed } => {
                (format!("Service {}", service.key), address(*dialed))
            }
            Target::Pod { workload, ip } => (format!("Pod {}", workload.key), address(*ip)),
            Target::Outside(ip) => ("outside the mesh".into(), address(*ip)),
            Target::Nothing(why) => (why.clone(), None),
        }
    }
}

/// The client side of the request: who sends it and what it sends.
struct Client {
    /// Whether the source's connections are captured (and so routed by the mesh).
    captured: bool,
    identity: Option<Identity>,
    speaks_http: bool,
    /// The request as the client sends it.
    parts: Parts,
}

impl Client {
    fn new(
        source: &Workload,
        agent: Agent<'_>,
        request: &ExplainRequest,
        port: Option<u16>,
    ) -> Result<Self, ExplainError> {
        let method_text = request
            .method
            .as_deref()
            .unwrap_or("GET")
            .to_ascii_uppercase();
        let method = Method::from_bytes(method_text.as_bytes())
            .map_err(|_| ExplainError::invalid("method", &method_text, "is not an HTTP method"))?;
        let path = request.path.as_deref().unwrap_or("/");
        let uri = path
            .parse::<Uri>()
            .ok()
            .filter(|uri| uri.scheme().is_none() && path.starts_with('/'))
            .ok_or_else(|| {
                ExplainError::invalid("path", path, "is not a path such as /reviews?id=1")
            })?;
        let mut headers = HeaderMap::new();
        for (name, value) in &request.headers {
            let header_name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|_| ExplainError::invalid("header", name, "is not a header name"))?;
            let header_value = HeaderValue::from_str(value)
                .map_err(|_| ExplainError::invalid("header", value, "is not a header value"))?;
            headers.append(header_name, header_value);
        }
        if !headers.contains_key(header::HOST) {
            // What an HTTP client puts there: the name or address it was given.
            let host = match port {
                Some(80) | None => request.destination.clone(),
                Some(port) if request.destination.contains(':') => {
                    format!("[{}]:{port}", request.destination)
                }
                Some(port) => format!("{}:{port}", request.destination),
            };
            if let Ok(value) = HeaderValue::from_str(&host) {
                headers.insert(header::HOST, value);
            }
        }
        let (mut parts, ()) = Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .expect("method and URI are valid")
            .into_parts();
        parts.headers = headers;
        let identity = agent
            .trust_domain
            .filter(|_| source.enrolled)
            .and_then(|td| workload_identity(td, source).ok());
        Ok(Self {
            captured: source.enrolled,
            identity,
            speaks_http: request.speaks_http(),
            parts,
        })
    }

    fn request_line(&self) -> String {
        format!("{} {}", self.parts.method, self.parts.uri)
    }
}

/// What the source's proxy does with the request: how it reads it, the route, where it
/// sends it, and the verdict over all of that.
struct Path {
    protocol: String,
    /// The request line, when the source proxy reads HTTP.
    request: Option<String>,
    route: String,
    backends: Vec<Backend>,
    verdict: Outcome,
}

impl Path {
    /// Through `backends`: the verdict is theirs.
    fn through(
        protocol: String,
        request: Option<String>,
        route: String,
        backends: Vec<Backend>,
    ) -> Self {
        let verdict = overall(&backends);
        Self {
            protocol,
            request,
            route,
            backends,
            verdict,
        }
    }

    /// Ends before any backend is chosen.
    fn ends(protocol: String, route: String, verdict: Outcome) -> Self {
        Self {
            protocol,
            request: None,
            route,
            backends: Vec::new(),
            verdict,
        }
    }
}

/// Where a route sends the request, or how it ends at the source.
type Routed = (String, Result<Vec<Backend>, Outcome>);

struct Explainer<'a> {
    state: &'a State,
    source: &'a Workload,
    agent: Agent<'a>,
    client: Client,
    notes: Vec<String>,
}

impl<'a> Explainer<'a> {
    fn new(state: &'a State, source: &'a Workload, agent: Agent<'a>, client: Client) -> Self {
        Self {
            state,
            source,
            agent,
            client,
            notes: Vec::new(),
        }
    }

    fn follow(&mut self, target: &Target<'_>, port: Option<u16>) -> Path {
        let port = match (target, port) {
            (Target::Nothing(why), _) => {
                let verdict = Outcome::Unroutable { why: why.clone() };
                return Path::ends("-".into(), "-".into(), verdict);
            }
            (_, None) => {
                let verdict = Outcome::Unroutable {
                    why: "no port to connect to".into(),
                };
                return Path::ends("-".into(), "-".into(), verdict);
            }
            (_, Some(port)) => port,
        };
        if !self.client.captured {
            self.notes.push(format!(
                "{} is not enrolled: its connections are not captured, so no route applies and \
                 they leave in plaintext; a Service is balanced by Kubernetes (kube-proxy)",
                self.source.key
            ));
        }
        match target {
            Target::Service { service, dialed } => self.service(service, *dialed, port),
            Target::Pod { workload, ip } => {
                let protocol = "TCP: a pod addressed directly is relayed as bytes by the \
                                source proxy; routes apply to Services";
                // The destination's proxy may still read HTTP, if the client speaks it.
                let request = self.client.speaks_http.then_some(&self.client.parts);
                let endpoint = self.endpoint(&workload.key, SocketAddr::new(*ip, port), request);
                let backend = Backend {
                    target: format!("Pod {}", workload.key),
                    subset: None,
                    port,
                    share_percent: 100.0,
                    endpoints: vec![endpoint],
                    unroutable: None,
                };
                let request_line = request.map(|_| self.client.request_line());
                Path::through(protocol.into(), request_line, "none".into(), vec![backend])
            }
            Target::Outside(_) => self.outside(),
            Target::Nothing(_) => unreachable!("handled above"),
        }
    }

    /// A destination the mesh does not know: passed through, unless the mesh allows only
    /// what it knows.
    fn outside(&mut self) -> Path {
        let protocol = "TCP: passthrough".to_string();
        if self.client.captured
            && self.agent.outbound_traffic_policy == OutboundTrafficPolicy::RegistryOnly
        {
            let verdict = Outcome::Denied {
                by: "outboundTrafficPolicy REGISTRY_ONLY".into(),
                reason: "not a Service, pod or ServiceEntry the mesh knows: the source's proxy \
                         resets the connection (not_registered)"
                    .into(),
            };
            return Path::ends(protocol, "none".into(), verdict);
        }
        self.notes.push(
            "not a Service or pod the mesh knows: the proxy passes the connection through to \
             where the app asked, in plaintext; no mesh policy applies"
                .into(),
        );
        Path::ends(protocol, "none".into(), Outcome::Allowed)
    }

    /// A destination a ServiceEntry names: relayed as bytes where its resolution says.
    fn service_entry(&mut self, service: &Service, dialed: IpAddr, port: u16) -> Path {
        let external = service.external.as_ref().expect("a ServiceEntry's Service");
        let Some(service_port) = service.port(port) else {
            self.notes.push(format!(
                "ServiceEntry host {} does not list port {port}: the connection is as unknown \
                 as any address",
                service.key
            ));
            return self.outside();
        };
        let target_port = match &service_port.target_port {
            TargetPort::Number(number) => *number,
            TargetPort::Name(_) => port,
        };
        let port_of = |endpoint: &crate::inventory::ExternalEndpoint| {
            service_port
                .name
                .as_ref()
                .and_then(|name| endpoint.ports.get(name).copied())
                .unwrap_or(target_port)
        };
        if service.cluster_ips.is_empty() {
            self.notes.push(format!(
                "ServiceEntry host {} has no addresses: a connection to an address the mesh \
                 does not know on port {port} is matched to it by the Host of its first \
                 HTTP/1 request",
                service.key
            ));
        }
        let route = match external.resolution {
            Resolution::None if dialed.is_unspecified() => "to where the app asked".to_string(),
            Resolution::None => {
                format!("to where the app asked, {}", SocketAddr::new(dialed, port))
            }
            Resolution::Static | Resolution::Dns | Resolution::DnsRoundRobin
                if !external.endpoints.is_empty() =>
            {
                let endpoints: Vec<String> = external
                    .endpoints
                    .iter()
                    .map(|e| format!("{}:{}", e.address, port_of(e)))
                    .collect();
                format!(
                    "to its endpoints in turn ({:?}): {}",
                    external.resolution,
                    endpoints.join(", ")
                )
            }
            _ => format!(
                "to {}:{target_port}, looked up when the connection opens",
                service.key.name
            ),
        };
        self.notes.push(format!(
            "ServiceEntry host {}: relayed as bytes, in plaintext, and named in metrics",
            service.key
        ));
        Path::ends(
            format!("TCP: ServiceEntry port {}", service_port.port),
            route,
            Outcome::Allowed,
        )
    }

    fn service(&mut self, service: &Service, dialed: IpAddr, port: u16) -> Path {
        if service.external.is_some() {
            return self.service_entry(service, dialed, port);
        }
        let Some(service_port) = service.port(port) else {
            // The proxy takes the L4 path, where the resolver finds no such port.
            let ports: Vec<String> = service.ports.iter().map(|p| p.port.to_string()).collect();
            let why = format!(
                "Service {} has no port {port} (its ports: {}): the connection is closed \
                 (no_endpoint)",
                service.key,
                ports.join(", ")
            );
            let protocol = "TCP: not a port of the Service".into();
            return Path::ends(protocol, "-".into(), Outcome::Unroutable { why });
        };
        let declared = port_protocol(service_port);
        let is_http = match declared {
            PortProtocol::Http => true,
            PortProtocol::Tcp => false,
            PortProtocol::Undeclared => self.client.speaks_http,
        };
        let protocol = describe_protocol(service_port, declared, is_http);
        let request_line = is_http.then(|| self.client.request_line());
        let (route, routed) = if !self.client.captured {
            let request = is_http.then_some(&self.client.parts);
            let backend = self.backend(service, None, port, 100.0, dialed, request);
            ("none (not captured)".to_string(), Ok(vec![backend]))
        } else if is_http {
            self.http_route(service, dialed, port)
        } else {
            self.tcp_route(service, dialed, port)
        };
        match routed {
            Ok(backends) => Path::through(protocol, request_line, route, backends),
            Err(verdict) => Path {
                request: request_line,
                ..Path::ends(protocol, route, verdict)
            },
        }
    }

    /// The source proxy's per-request routing (`http::outbound`).
    fn http_route(&mut self, service: &Service, dialed: IpAddr, port: u16) -> Routed {
        let parts = &self.client.parts;
        let matched = select_route(
            self.state,
            &service.key,
            port,
            Some(self.source),
            RequestHead::of_parts(parts),
        );
        let (rule, matched_prefix) = match matched {
            RouteMatch::Default => {
                let route = "none applies: the Service itself, default policies".to_string();
                let backend = self.backend(service, None, port, 100.0, dialed, Some(parts));
                return (route, Ok(vec![backend]));
            }
            RouteMatch::NoneMatched => {
                let why = format!(
                    "routes for Service {} exist but none matches {}: the source proxy \
                     answers 404 (NR)",
                    service.key,
                    self.client.request_line()
                );
                return ("none matches".into(), Err(Outcome::Unroutable { why }));
            }
            RouteMatch::Rule {
                rule,
                matched_prefix,
            } => (rule, matched_prefix),
        };
        self.follow_rule(rule, matched_prefix, port, dialed)
    }

    /// Where `rule` (matched with `matched_prefix`) sends the request, as the proxy that
    /// routes it does: its rewrite, its own answers, its destinations by weight.
    fn follow_rule(
        &mut self,
        rule: &HttpRule,
        matched_prefix: Option<&str>,
        port: u16,
        dialed: IpAddr,
    ) -> Routed {
        let route = describe_rule(rule);
        self.fault_notes(rule);
        // The request as it leaves the source: the rule's rewrite and header changes.
        let mut forwarded = self.client.parts.clone();
        rewrite_request(&mut forwarded, rule, matched_prefix);
        if forwarded.uri != self.client.parts.uri {
            self.notes.push(format!(
                "the route rewrites the request to {}",
                forwarded.uri
            ));
        }
        let destinations = match &rule.action {
            HttpAction::Route(destinations) => destinations,
            HttpAction::DirectResponse { status, .. } => {
                self.notes.push(format!(
                    "the source proxy answers itself (direct response {status}); nothing is sent on"
                ));
                return (route, Err(Outcome::Allowed));
            }
            HttpAction::Redirect { status, .. } => {
                self.notes.push(format!(
                    "the source proxy answers with a redirect ({status})"
                ));
                return (route, Err(Outcome::Allowed));
            }
        };
        let total = total_weight(destinations);
        if total == 0 {
            let why = "every destination of the route has weight 0: the source proxy answers \
                       404 (NR)"
                .to_string();
            return (route, Err(Outcome::Unroutable { why }));
        }
        let backends = destinations
            .iter()
            .filter(|d| d.weight > 0)
            .map(|d| {
                self.http_backend(
                    &d.destination,
                    share(d.weight, total),
                    port,
                    dialed,
                    &forwarded,
                )
            })
            .collect();
        (route, Ok(backends))
    }

    /// One route destination, resolved as `Outbound::plan` does: a missing Service, subset
    /// or port, or no endpoint, is answered 503 (UH) by the source proxy.
    fn http_backend(
        &self,
        destination: &Destination,
        share: f64,
        port: u16,
        dialed: IpAddr,
        forwarded: &Parts,
    ) -> Backend {
        let port = destination.port.unwrap_or(port);
        let unroutable = |why: String| Backend {
            target: format!("Service {}", destination.service),
            subset: destination.subset.clone(),
            port,
            share_percent: share,
            endpoints: Vec::new(),
            unroutable: Some(format!("{why}: the source proxy answers 503 (UH)")),
        };
        let Some(service) = self.state.services.get(&destination.service) else {
            return unroutable(format!("no Service {}", destination.service));
        };
        let subset = match &destination.subset {
            None => None,
            Some(subset) => match self.state.routes.subset_labels(&service.key, subset) {
                Some(labels) => Some((subset.as_str(), labels)),
                None => {
                    return unroutable(format!(
                        "no DestinationRule defines subset {subset} of {}",
                        service.key
                    ));
                }
            },
        };
        self.backend(service, subset, port, share, dialed, Some(forwarded))
    }

    /// A VirtualService's `tcp` route, as the resolver follows it (an unknown destination
    /// Service falls back to the dialed one; an undefined subset does not filter).
    fn tcp_route(&mut self, service: &Service, dialed: IpAddr, port: u16) -> Routed {
        let routes = self
            .state
            .routes
            .tcp_route(&service.key, port)
            .filter(|destinations| total_weight(destinations) > 0);
        let Some(destinations) = routes else {
            let backend = self.backend(service, None, port, 100.0, dialed, None);
            return ("none applies: the Service itself".into(), Ok(vec![backend]));
        };
        let total = total_weight(destinations);
        let backends = destinations
            .iter()
            .filter(|d| d.weight > 0)
            .map(|d| {
                let target = tcp_target(self.state, service, port, Some(&d.destination));
                let share = share(d.weight, total);
                self.backend(
                    target.service,
                    target.subset,
                    target.port,
                    share,
                    dialed,
                    None,
                )
            })
            .collect();
        let origin = self
            .state
            .routes
            .summary()
            .into_iter()
            .find(|(key, _, _)| *key == service.key)
            .map_or_else(String::new, |(_, origin, _)| origin);
        (format!("{origin}: tcp route"), Ok(backends))
    }

    /// The endpoints of `service` on `port` (those of `subset` when given), each judged.
    /// `request` is the HTTP request as it leaves the source; `None` for bytes.
    fn backend(
        &self,
        service: &Service,
        subset: Option<(&str, &BTreeMap<String, String>)>,
        port: u16,
        share: f64,
        dialed: IpAddr,
        request: Option<&Parts>,
    ) -> Backend {
        let candidates = service_endpoints(
            self.state,
            service,
            port,
            dialed,
            subset.map(|(_, labels)| labels),
        );
        let unroutable = match &candidates {
            None => Some(format!("Service {} has no port {port}", service.key)),
            Some(found) if found.is_empty() => Some(format!(
                "Service {} has no ready endpoint for port {port}{}",
                service.key,
                subset.map_or_else(String::new, |(name, labels)| format!(
                    " in subset {name} ({})",
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                ))
            )),
            Some(_) => None,
        }
        .map(|why| match (self.client.captured, request.is_some()) {
            (false, _) => format!("{why}: connections are refused"),
            (true, true) => format!("{why}: the source proxy answers 503 (UH)"),
            (true, false) => format!("{why}: the connection is closed (no_endpoint)"),
        });
        let endpoints = candidates
            .unwrap_or_default()
            .into_iter()
            .map(|(key, address)| self.endpoint(key, address, request))
            .collect();
        Backend {
            target: format!("Service {}", service.key),
            subset: subset.map(|(name, _)| name.to_string()),
            port,
            share_percent: share,
            endpoints,
            unroutable,
        }
    }

    /// What the hop to `address` looks like and what the destination's proxy decides, with
    /// the planner's admission and protocol rules (`plan::admission`, `plan::protocol`).
    fn endpoint(
        &self,
        key: &ObjectKey,
        address: SocketAddr,
        request: Option<&Parts>,
    ) -> EndpointCheck {
        let policies = &self.state.policies;
        let destination = self
            .state
            .workload_by_ip(address.ip())
            .or_else(|| self.state.workloads.get(key));
        let mut check = EndpointCheck {
            pod: key.to_string(),
            node: destination.map_or_else(String::new, |w| w.node.clone()),
            address,
            mutual_tls: false,
            identity: None,
            protocol: "-".into(),
            peer_authentication: None,
            outcome: Outcome::Allowed,
            detail: String::new(),
        };
        let Some(destination) = destination.filter(|w| w.enrolled) else {
            check.detail = "not enrolled: no policy applies there".into();
            return check;
        };
        // HBONE when both ends are in the mesh and the agent has a CA, as the source proxy
        // decides it.
        let trust_domain = self.agent.trust_domain.filter(|_| self.client.captured);
        let identities = match tunnel_identities(trust_domain, self.source, destination) {
            Ok(pair) => pair.map(Arc::new),
            Err(error) => {
                check.outcome = Outcome::Unroutable {
                    why: format!("no identity for {}: {error}", destination.key),
                };
                return check;
            }
        };
        check.mutual_tls = identities.is_some();
        check.identity = identities.as_ref().map(|pair| pair.1.to_string());
        let Some(source_ip) = self.source.ip_like(address.ip()) else {
            check.outcome = Outcome::Unroutable {
                why: format!(
                    "{} has no address of the family of {}",
                    self.source.key,
                    address.ip()
                ),
            };
            return check;
        };
        let declared = protocol::declared_inbound(self.state, Some(destination), address.port());
        let is_http = match declared {
            PortProtocol::Http => true,
            PortProtocol::Tcp => false,
            PortProtocol::Undeclared => request.is_some(),
        };
        check.protocol = if is_http { "HTTP" } else { "TCP" }.into();
        check.peer_authentication = Some(policies.mtls_mode(destination, address.port()));
        if let Err(error) = refuse_own_listeners(address) {
            check.outcome = Outcome::Denied {
                by: "the destination's proxy".into(),
                reason: error.to_string(),
            };
            check.detail = "the connection is refused".into();
            return check;
        }

        let caller = Caller::new(source_ip, identities);
        let attributes = caller.attributes(address);
        let mutual_tls = check.mutual_tls;
        let admission = admission_for(policies, destination);
        let admitted = check_policy(policies, destination, &attributes, mutual_tls, admission)
            .and_then(|()| {
                // Not HTTP after all: request-level policies are decided at L4 now.
                if !is_http && admission == Admission::MtlsOnly {
                    check_policy(
                        policies,
                        destination,
                        &attributes,
                        mutual_tls,
                        Admission::Full,
                    )
                } else {
                    Ok(())
                }
            });
        let l4_verdict = || policies.authorize(destination, &attributes);
        match admitted {
            Err(Refused::MtlsRequired) => {
                check.outcome = Outcome::Denied {
                    by: "PeerAuthentication (mode STRICT)".into(),
                    reason: "plaintext refused: mutual TLS required".into(),
                };
                check.detail = "the connection is closed".into();
                return check;
            }
            Err(_) => {
                check.outcome = denial(policies, destination, l4_verdict(), &attributes, None);
                check.detail = "the connection is refused".into();
                return check;
            }
            Ok(()) => {}
        }
        if !is_http {
            check.detail = allowed_by(&l4_verdict());
            return check;
        }
        let request = request.unwrap_or(&self.client.parts);
        match self.judge_request(destination, &caller, address, request) {
            Ok(allowed) => check.detail = allowed,
            Err((outcome, detail)) => (check.outcome, check.detail) = (outcome, detail),
        }
        check
    }

    /// The RequestAuthentications and AuthorizationPolicies of `workload` for `request` of
    /// `caller` to `address`, as its proxy applies them: what allows it, or the outcome and
    /// what the client gets.
    fn judge_request(
        &self,
        workload: &Workload,
        caller: &Caller,
        address: SocketAddr,
        request: &Parts,
    ) -> Result<String, (Outcome, String)> {
        let policies = &self.state.policies;
        let path =
            normalize_path(request.uri.path()).unwrap_or_else(|| request.uri.path().to_string());
        let tokens = TokenSources {
            headers: &request.headers,
            query: request.uri.query(),
        };
        let specs = policies.request_authentications(workload);
        let auth = match jwt::authenticate(&specs, tokens, self.agent.jwt_keys) {
            Ok(authenticated) => authenticated.auth,
            Err(error) => {
                let outcome = Outcome::Denied {
                    by: "RequestAuthentication".into(),
                    reason: format!("{error} (401)"),
                };
                return Err((outcome, "the request's token is refused".into()));
            }
        };
        let attributes_l7 = RequestAttributes {
            method: request.method.as_str(),
            path: &path,
            host: request_host(&request.uri, &request.headers),
            headers: &request.headers,
            auth: auth.as_ref(),
        };
        let verdict = authorize_request(policies, workload, caller, address, &attributes_l7);
        if verdict.is_allowed() {
            return Ok(allowed_by(&verdict));
        }
        let attributes = caller.attributes(address);
        let outcome = denial(
            policies,
            workload,
            verdict,
            &attributes,
            Some(&attributes_l7),
        );
        let detail = format!(
            "{} {path} is answered 403 ({})",
            request.method, ACCESS_DENIED
        );
        Err((outcome, detail))
    }

    fn fault_notes(&mut self, rule: &HttpRule) {
        let Some(fault) = &rule.fault else { return };
        if let Some(delay) = &fault.delay {
            self.notes.push(format!(
                "the route delays {}% of requests by {}",
                delay.percent,
                humantime::format_duration(delay.fixed)
            ));
        }
        if let Some(abort) = &fault.abort {
            self.notes.push(format!(
                "the route aborts {}% of requests with {} before they leave the source",
                abort.percent, abort.status
            ));
        }
    }
}

fn share(weight: u32, total: u32) -> f64 {
    (f64::from(weight) * 1000.0 / f64::from(total)).round() / 10.0
}

fn describe_protocol(port: &ServicePort, declared: PortProtocol, is_http: bool) -> String {
    let why = match (&port.app_protocol, &port.name, declared) {
        (Some(app_protocol), _, _) => format!("appProtocol {app_protocol:?}"),
        (None, Some(name), PortProtocol::Http | PortProtocol::Tcp) => {
            format!("port {} is named {name:?}", port.port)
        }
        (None, _, _) if is_http => {
            format!(
                "port {} declares no protocol; an HTTP request is sniffed as HTTP",
                port.port
            )
        }
        (None, _, _) => format!(
            "port {} declares no protocol; without --path, --method or --header the \
             connection is explained as bytes",
            port.port
        ),
    };
    format!("{}: {why}", if is_http { "HTTP" } else { "TCP" })
}

fn describe_rule(rule: &HttpRule) -> String {
    match &rule.name {
        Some(name) => format!("{}, rule {name:?}", rule.origin),
        None => rule.origin.clone(),
    }
}

fn allowed_by(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Allow {
            policy: Some(policy),
        } => format!("allowed by AuthorizationPolicy {policy}"),
        _ => "allowed: no ALLOW policy applies and no DENY policy matches".into(),
    }
}

/// A denial, naming the policy: the DENY policy that matched, or the ALLOW policies that
/// apply and all failed to match.
fn denial(
    policies: &Policies,
    workload: &Workload,
    verdict: Verdict,
    connection: &crate::policy::ConnectionAttributes,
    request: Option<&RequestAttributes>,
) -> Outcome {
    let Verdict::Deny { policy, reason } = verdict else {
        return Outcome::Allowed;
    };
    let by = match policy {
        Some(policy) => policy.to_string(),
        None => {
            // Judged alone, an ALLOW policy that applies denies what it does not match,
            // and one that does not apply allows everything without naming itself.
            let applying: Vec<String> = policies
                .authorization_policies
                .iter()
                .filter(|p| p.spec.action == Action::Allow)
                .filter(|p| {
                    let alone = Policies {
                        root_namespace: policies.root_namespace.clone(),
                        authorization_policies: vec![(*p).clone()],
                        ..Policies::default()
                    };
                    let verdict = match request {
                        Some(request) => alone.authorize_request(workload, connection, request),
                        None => alone.authorize(workload, connection),
                    };
                    verdict != Verdict::Allow { policy: None }
                })
                .map(|p| p.key.to_string())
                .collect();
            applying.join(", ")
        }
    };
    Outcome::Denied {
        by: format!("AuthorizationPolicy {by}"),
        reason: reason.to_string(),
    }
}

/// The verdict over every way the request can go: allowed only when every endpoint of
/// every backend allows it; otherwise the first refusal, saying when it is partial.
fn overall(backends: &[Backend]) -> Outcome {
    let mut paths = 0usize;
    let mut refusals: Vec<(Outcome, String)> = Vec::new();
    for backend in backends {
        if let Some(why) = &backend.unroutable {
            paths += 1;
            refusals.push((
                Outcome::Unroutable { why: why.clone() },
                format!("{}% of requests", backend.share_percent),
            ));
            continue;
        }
        for endpoint in &backend.endpoints {
            paths += 1;
            if endpoint.outcome != Outcome::Allowed {
                refusals.push((
                    endpoint.outcome.clone(),
                    format!("endpoint {}", endpoint.pod),
                ));
            }
        }
    }
    let Some((first, _)) = refusals.first().cloned() else {
        return Outcome::Allowed;
    };
    if refusals.len() == paths {
        return first;
    }
    let only = format!(
        " (only for {})",
        refusals
            .iter()
            .filter(|(outcome, _)| *outcome == first)
            .map(|(_, r#where)| r#where.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    match first {
        Outcome::Denied { by, reason } => Outcome::Denied {
            by,
            reason: reason + &only,
        },
        Outcome::Unroutable { why } => Outcome::Unroutable { why: why + &only },
        Outcome::Allowed => Outcome::Allowed,
    }
}

// === Rendering ===

impl Explanation {
    /// The explanation as `mesh-node debug explain` prints it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |label: &str, text: &str| out.push_str(&format!("{label:<12} {text}\n"));
        let source = &self.source;
        let ips: Vec<String> = source.ips.iter().map(ToString::to_string).collect();
        line(
            "source",
            &format!(
                "{} on {} ({}), {}{}",
                source.pod,
                source.node,
                ips.join(", "),
                if source.enrolled {
                    "enrolled"
                } else {
                    "not enrolled"
                },
                source
                    .identity
                    .as_ref()
                    .map_or_else(String::new, |id| format!(", as {id}"))
            ),
        );
        let address = self
            .address
            .map_or_else(String::new, |a| format!(" at {a}"));
        line("destination", &format!("{}{address}", self.destination));
        line("protocol", &self.protocol);
        if let Some(request) = &self.request {
            line("request", request);
        }
        line("route", &self.route);
        for (i, backend) in self.backends.iter().enumerate() {
            let subset = backend
                .subset
                .as_ref()
                .map_or_else(String::new, |s| format!(" subset {s}"));
            let reach = match &backend.unroutable {
                Some(why) => why.clone(),
                None => format!("{} endpoint(s)", backend.endpoints.len()),
            };
            line(
                if i == 0 { "backends" } else { "" },
                &format!(
                    "{}{subset} port {}, {}%: {reach}",
                    backend.target, backend.port, backend.share_percent
                ),
            );
        }
        let endpoints: Vec<&EndpointCheck> =
            self.backends.iter().flat_map(|b| &b.endpoints).collect();
        if !endpoints.is_empty() {
            let mut table = Table::new();
            table.load_style(NOTHING);
            table.set_header([
                "ENDPOINT",
                "ADDRESS",
                "NODE",
                "IDENTITY",
                "MTLS",
                "PEER AUTH",
                "PROTOCOL",
                "DECISION",
            ]);
            for endpoint in endpoints {
                let decision = match &endpoint.outcome {
                    Outcome::Allowed => endpoint.detail.clone(),
                    refused => format!("{refused}; {}", endpoint.detail),
                };
                table.add_row([
                    endpoint.pod.clone(),
                    endpoint.address.to_string(),
                    endpoint.node.clone(),
                    endpoint.identity.clone().unwrap_or_else(|| "-".into()),
                    if endpoint.mutual_tls { "yes" } else { "no" }.to_string(),
                    endpoint
                        .peer_authentication
                        .map_or_else(|| "-".into(), |mode| format!("{mode:?}").to_uppercase()),
                    endpoint.protocol.clone(),
                    decision,
                ]);
            }
            out.push('\n');
            out.push_str(&table.to_string());
            out.push('\n');
        }
        out.push('\n');
        for note in &self.notes {
            out.push_str(&format!("note: {note}\n"));
        }
        out.push_str(&format!("verdict: {}", self.verdict));
        out
    }
}

mod gateway;
pub use gateway::{GatewayPorts, explain_at_gateway};

#[cfg(test)]
mod tests;
