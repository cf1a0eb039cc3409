//! L7 routing: Istio's `VirtualService` and `DestinationRule` and the Gateway API's
//! `HTTPRoute` bound to Services (GAMMA), compiled into [`Routes`], which the proxy asks
//! per request where to send it and how.
//!
//! # How resources attach to Services
//! * A host names a Kubernetes Service: `reviews` (in the resource's own namespace),
//!   `reviews.shop`, `reviews.shop.svc` or `reviews.shop.svc.cluster.local` all mean the
//!   Service `shop/reviews`. A two-label host is read as `name.namespace`, as the cluster's
//!   DNS search path would; if no such Service exists it is simply never looked up. Any
//!   other host (wildcards, external names) does not resolve: as a VirtualService or
//!   DestinationRule host it is ignored, as a route destination it is an error.
//! * A VirtualService whose `gateways` list is non-empty and lacks `mesh` configures
//!   gateways only (`mesh-node gateway`): the node proxies ignore it, and each Gateway it
//!   names gets its rules, matched by the request's host ([`Routes::gateway_host`]).
//!   Likewise a `match` bound to gateways only never matches mesh traffic, and one bound to
//!   other gateways never matches a gateway's.
//! * When several VirtualServices name the same Service, the first by (namespace, name)
//!   applies to it; each other one is reported as a [`Rejection`] ("conflicts with ...")
//!   for that Service and still applies to its other hosts.
//! * An HTTPRoute attaches to the Services in its `parentRefs` (the namespace defaults to
//!   the route's own); a parentRef `port` limits it to that Service port. A parentRef to
//!   another namespace's Service (a GAMMA consumer route, meant for the route's namespace's
//!   clients only) is rejected, since here it would apply to every client.
//! * **An HTTPRoute beats a VirtualService.** When both target the same Service, the
//!   HTTPRoutes apply, as in Istio's ambient mode, and the VirtualService is reported as
//!   shadowed for that Service. All HTTPRoutes of one Service merge into one rule list in
//!   the Gateway API's precedence order (see [`http_route`]).
//! * DestinationRules for one Service merge the way Istio merges them: in (namespace, name)
//!   order, the first top-level `trafficPolicy` applies and subsets are pooled; a subset
//!   name defined again is reported and the first definition kept.
//!
//! # Validation
//! Each resource is checked alone by [`config::validate`](crate::config::validate), which
//! compiles it here; errors name the field and say why. References between resources (a
//! route to a `subset` that no DestinationRule defines) are checked over the whole object
//! set by [`check_references`], so a config source can fall back to the last good version
//! of the offender. [`Routes::build`] skips anything that fails either check.
//!
//! Fields this proxy cannot honour are rejected rather than ignored when ignoring them
//! would widen a match or silently drop behaviour (`sourceNamespace` matches, delegation,
//! per-destination header operations, gRPC aborts, more than one mirror, ...). Fields
//! that only tune what Envoy would do (`corsPolicy`, `tls`, locality settings, exportTo)
//! are ignored.
mod build;
pub mod destination_rule;
mod fields;
pub mod gateway;
pub mod gateway_api;
pub mod host;
pub mod http_route;
pub mod l4_route;
mod matching;
mod rule;
mod traffic_policy;
pub mod virtual_service;

use std::collections::BTreeMap;

pub use build::check_references;
pub use destination_rule::DestinationRuleSpec;
pub use http_route::HttpRouteSpec;
pub use matching::{Pattern, RequestMatch, StringMatch};
pub use rule::{
    Destination, Fault, FaultAbort, FaultDelay, HeaderOps, HttpAction, HttpRule, Mirror, RetryOn,
    RetryPolicy, Rewrite, TcpRule, TlsRule, WeightedDestination, pick_at_random, pick_weighted,
    rewrite_uri, total_weight,
};
use serde::Serialize;
use traffic_policy::PolicySection;
pub use traffic_policy::{
    ConnectionPool, HashKey, LoadBalancer, OutlierDetection, TlsOrigination, TrafficPolicy,
};
pub use virtual_service::VirtualServiceSpec;

#[cfg(doc)]
use crate::inventory::Rejection;
use crate::inventory::{Labels, ObjectKey};

/// One routing resource's typed spec, as a config source hands it to [`Routes::build`]
/// beside its [`ObjectId`](crate::inventory::ObjectId).
#[derive(Clone, Copy, Debug)]
pub enum RoutingSpec<'a> {
    VirtualService(&'a VirtualServiceSpec),
    DestinationRule(&'a DestinationRuleSpec),
    /// `created` (metadata.creationTimestamp) is the Gateway API's tie-break between routes.
    HttpRoute {
        spec: &'a HttpRouteSpec,
        created: Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    },
    /// A TLSRoute or TCPRoute (`kind`).
    L4Route {
        kind: gateway_api::RouteKind,
        spec: &'a l4_route::L4RouteSpec,
        created: Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    },
}

/// Why a routing resource cannot be used. `field` is the path inside `spec`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutingError {
    #[error("{field}: {pattern:?} is not a valid regular expression: {reason}")]
    BadRegex {
        field: String,
        pattern: String,
        reason: String,
    },
    #[error("{field}: weight {weight} is negative")]
    NegativeWeight { field: String, weight: i64 },
    #[error("{field}: the weights of {count} destinations sum to {total}, not 100")]
    WeightSum {
        field: String,
        count: usize,
        total: i64,
    },
    #[error("{field}: route name {name:?} is used by more than one route")]
    DuplicateRouteName { field: String, name: String },
    #[error("{field}: subset name {name:?} is defined more than once")]
    DuplicateSubset { field: String, name: String },
    #[error(
        "{field}: {value:?} is not a duration such as \"10s\", \"0.5s\" or \"100ms\", of at \
         most 87600h (ten years)"
    )]
    BadDuration { field: String, value: String },
    #[error("{field}: {value} is not a percentage between 0 and 100")]
    BadPercentage { field: String, value: String },
    #[error("{field}: {value} is not an HTTP status code (100-599)")]
    BadStatus { field: String, value: i64 },
    #[error("{field}: {value} is not a port number (1-65535)")]
    BadPort { field: String, value: i64 },
    #[error(
        "{field}: unknown retry condition {token:?} (known: 5xx, gateway-error, \
         connect-failure, reset, retriable-4xx, refused-stream, retriable-status-codes, \
         the gRPC conditions and status codes)"
    )]
    UnknownRetryOn { field: String, token: String },
    #[error("{field}: a route needs one of route, redirect or directResponse")]
    NoAction { field: String },
    #[error("{field}: only one of route, redirect and directResponse may be set")]
    ConflictingActions { field: String },
    #[error(
        "{field}: parentRef {reference:?} is neither a Service (group \"\" or \"core\", kind \
         Service: GAMMA mesh routing) nor a Gateway (group gateway.networking.k8s.io, kind \
         Gateway)"
    )]
    UnknownParent { field: String, reference: String },
    #[error(
        "{field}: {host:?} is not a Service of this cluster (name, name.namespace or \
         name.namespace.svc.cluster.local)"
    )]
    UnresolvedHost { field: String, host: String },
    #[error("{field}: {what} is not supported")]
    Unsupported { field: String, what: String },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// What the data path knows about one request when it picks a route.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo<'a> {
    pub method: &'a http::Method,
    /// Path and query (origin-form); the authority may be absent.
    pub uri: &'a http::Uri,
    pub headers: &'a http::HeaderMap,
    /// The Service port the client dialed.
    pub port: u16,
    pub source_labels: &'a Labels,
}

/// The outcome of [`Routes::match_http`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteMatch<'a> {
    /// No VirtualService / HTTPRoute applies: route to the Service itself, same port, defaults.
    Default,
    /// A rule matched. `matched_prefix` is the prefix of the match that selected it (for rewrite).
    Rule {
        rule: &'a HttpRule,
        matched_prefix: Option<&'a str>,
    },
    /// Routes exist for this host but none matched: the proxy answers 404 (flag NR).
    NoneMatched,
}

/// Every route and destination policy of the mesh, compiled; part of the `State`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Routes {
    /// VirtualService or HTTPRoute rules by the Service they apply to.
    #[serde(serialize_with = "build::by_name")]
    hosts: BTreeMap<ObjectKey, HostRoutes>,
    /// Merged DestinationRules by Service.
    #[serde(serialize_with = "build::by_name")]
    destination_rules: BTreeMap<ObjectKey, DestinationPolicy>,
    /// DestinationRules for hosts outside the cluster's Services (ServiceEntry hosts), by
    /// host: their policy (TLS origination) applies to traffic to that host.
    external_destination_rules: BTreeMap<String, DestinationPolicy>,
    /// VirtualServices bound to each Gateway (`spec.gateways`), in (namespace, name) order.
    #[serde(serialize_with = "build::by_name")]
    gateways: BTreeMap<ObjectKey, Vec<GatewayHost>>,
    /// Routes that ask to attach to Gateway API Gateways, oldest first: the gateway that
    /// serves a Gateway decides which attach to which listener.
    api_routes: Vec<ApiRoute>,
}

/// A route whose `parentRefs` name Gateway API Gateways.
#[derive(Clone, Debug, Serialize)]
pub struct ApiRoute {
    /// `HTTPRoute namespace/name`.
    pub origin: String,
    pub namespace: String,
    pub kind: gateway_api::RouteKind,
    /// `hostnames`, lower case; empty: every host of the listener.
    pub hostnames: Vec<String>,
    pub parents: Vec<http_route::GatewayParent>,
    http: Vec<CompiledRule>,
    /// A TLSRoute's or TCPRoute's backends.
    l4: Vec<WeightedDestination>,
}

/// One VirtualService as a gateway applies it: to requests whose host matches `hosts`.
#[derive(Clone, Debug, Serialize)]
pub struct GatewayHost {
    /// `VirtualService namespace/name`.
    pub origin: String,
    /// The VirtualService's namespace: a server's `namespace/host` may admit only some.
    pub namespace: String,
    /// Request hosts (`api.example.com`, `*.example.com`, `*`), lower case.
    pub hosts: Vec<String>,
    http: Vec<CompiledRule>,
    /// For TCP servers and TLS the gateway terminates.
    tcp: Vec<TcpRule>,
    /// For TLS the gateway passes through, by SNI.
    tls: Vec<TlsRule>,
}

/// The rules that apply to one Service.
#[derive(Clone, Debug, Default, Serialize)]
struct HostRoutes {
    /// The resources the rules came from, e.g. `VirtualService shop/reviews`.
    origin: String,
    http: Vec<CompiledRule>,
    tcp: Vec<TcpRule>,
}

/// An HTTP rule and how a rewrite treats its match.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct CompiledRule {
    #[serde(flatten)]
    rule: HttpRule,
    /// An HTTPRoute `ReplaceFullPath` rewrite: the rule reports no matched prefix, so
    /// [`rewrite_uri`] replaces the whole path even after a `PathPrefix` match. Every other
    /// rewrite follows Istio's rule.
    full_path_rewrite: bool,
}

/// The merged DestinationRules of one Service.
#[derive(Clone, Debug, Default, Serialize)]
struct DestinationPolicy {
    origin: String,
    policy: traffic_policy::PolicyLayers,
    subsets: BTreeMap<String, Subset>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
struct Subset {
    labels: BTreeMap<String, String>,
    policy: traffic_policy::PolicyLayers,
}

// === impl Routes ===

impl Routes {
    /// The rule for an HTTP request to `service`. Rules whose every match names another
    /// port do not apply; if no rule applies, the Service is routed by default.
    pub fn match_http(&self, service: &ObjectKey, request: &RequestInfo<'_>) -> RouteMatch<'_> {
        match self.hosts.get(service) {
            Some(host) => match_rules(&host.http, request),
            None => RouteMatch::Default,
        }
    }

    /// The VirtualService of `gateway` for a request to `host` (as
    /// [`host::request_host_name`] gives it) among those `admitted` (by their namespace):
    /// the one with the most specific matching host, the first of equals.
    pub fn gateway_host(
        &self,
        gateway: &ObjectKey,
        host: &str,
        admitted: impl Fn(&str) -> bool,
    ) -> Option<&GatewayHost> {
        let candidates = self.gateways.get(gateway).into_iter().flatten();
        most_specific_host(candidates.filter(|c| admitted(&c.namespace)), host)
    }

    /// The first `tcp` rule for `port` of the VirtualServices bound to `gateway` that
    /// `admitted` lets in, with the VirtualService it is in.
    pub fn gateway_tcp_route(
        &self,
        gateway: &ObjectKey,
        port: u16,
        admitted: impl Fn(&GatewayHost) -> bool,
    ) -> Option<(&GatewayHost, &[WeightedDestination])> {
        self.gateways
            .get(gateway)?
            .iter()
            .filter(|candidate| admitted(candidate))
            .find_map(|candidate| Some((candidate, candidate.tcp_route(port)?)))
    }

    /// The first `tls` rule for `port` and `sni` of the VirtualServices bound to `gateway`
    /// whose namespace `admitted` lets in, with the VirtualService it is in.
    pub fn gateway_tls_route(
        &self,
        gateway: &ObjectKey,
        port: u16,
        sni: &str,
        admitted: impl Fn(&str) -> bool,
    ) -> Option<(&GatewayHost, &[WeightedDestination])> {
        self.gateways
            .get(gateway)?
            .iter()
            .filter(|candidate| admitted(&candidate.namespace))
            .find_map(|candidate| Some((candidate, candidate.tls_route(port, sni)?)))
    }

    /// Whether any VirtualService binds to `gateway`.
    pub fn gateway_bound(&self, gateway: &ObjectKey) -> bool {
        self.gateways.contains_key(gateway)
    }

    /// The routes that ask to attach to Gateway API Gateways, oldest first.
    pub fn api_routes(&self) -> &[ApiRoute] {
        &self.api_routes
    }

    /// The gateways' VirtualServices, for `debug`.
    pub fn gateway_hosts(&self) -> impl Iterator<Item = (&ObjectKey, &GatewayHost)> {
        self.gateways
            .iter()
            .flat_map(|(gateway, hosts)| hosts.iter().map(move |host| (gateway, host)))
    }

    /// `tcp` routes of a VirtualService for L4 ports (first rule whose `match.port` fits or has no match).
    pub fn tcp_route(&self, service: &ObjectKey, port: u16) -> Option<&[WeightedDestination]> {
        self.hosts
            .get(service)?
            .tcp
            .iter()
            .find(|rule| rule.applies_to_port(port))
            .map(|rule| rule.route.as_slice())
    }

    /// The pod labels that select `subset` of `service`, from its DestinationRules.
    pub fn subset_labels(
        &self,
        service: &ObjectKey,
        subset: &str,
    ) -> Option<&BTreeMap<String, String>> {
        self.destination_rules
            .get(service)?
            .subsets
            .get(subset)
            .map(|s| &s.labels)
    }

    /// Merged policy: DR top level < top-level portLevelSettings for `port` < subset < subset portLevelSettings
    /// (each present section replaces the one below it). Default when no DR.
    /// The policy for traffic to a ServiceEntry's `host` on `port` (no subsets: the
    /// entry's endpoints carry no labels the mesh reads).
    pub fn external_traffic_policy(&self, host: &str, port: u16) -> TrafficPolicy {
        let Some(rule) = self.external_destination_rules.get(host) else {
            return TrafficPolicy::default();
        };
        let mut merged = PolicySection::default();
        rule.policy.overlay_onto(&mut merged, port);
        merged.into_policy()
    }

    pub fn traffic_policy(
        &self,
        service: &ObjectKey,
        subset: Option<&str>,
        port: u16,
    ) -> TrafficPolicy {
        let Some(rule) = self.destination_rules.get(service) else {
            return TrafficPolicy::default();
        };
        let mut merged = PolicySection::default();
        rule.policy.overlay_onto(&mut merged, port);
        if let Some(subset) = subset.and_then(|name| rule.subsets.get(name)) {
            subset.policy.overlay_onto(&mut merged, port);
        }
        merged.into_policy()
    }

    /// Every compiled host for the admin API / `debug routes`: (service, origin, rule count).
    /// Routed Services count their HTTP and TCP rules; Services with only DestinationRules
    /// are listed too, counting their subsets.
    pub fn summary(&self) -> Vec<(ObjectKey, String, usize)> {
        let routed = self.hosts.iter().map(|(service, host)| {
            (
                service.clone(),
                host.origin.clone(),
                host.http.len() + host.tcp.len(),
            )
        });
        let policies = self
            .destination_rules
            .iter()
            .map(|(service, rule)| (service.clone(), rule.origin.clone(), rule.subsets.len()));
        let mut summary: Vec<_> = routed.chain(policies).collect();
        summary.sort();
        summary
    }
}

/// The first of `rules` that matches `request`. `Default` when no rule applies to the
/// request's port (every match names another), `NoneMatched` when some apply but none
/// matches.
fn match_rules<'a>(rules: &'a [CompiledRule], request: &RequestInfo<'_>) -> RouteMatch<'a> {
    let mut any_applies = false;
    for compiled in rules {
        let rule = &compiled.rule;
        if rule.matches.is_empty() {
            return RouteMatch::Rule {
                rule,
                matched_prefix: None,
            };
        }
        any_applies |= rule.matches.iter().any(|m| m.applies_to_port(request.port));
        if let Some(matched) = rule.matches.iter().find(|m| m.matches(request)) {
            return RouteMatch::Rule {
                rule,
                matched_prefix: matched.uri_prefix().filter(|_| !compiled.full_path_rewrite),
            };
        }
    }
    if any_applies {
        RouteMatch::NoneMatched
    } else {
        RouteMatch::Default
    }
}

impl ApiRoute {
    /// The Services its rules send to (and mirror to), each once.
    pub fn backends(&self) -> Vec<&ObjectKey> {
        let mut backends: Vec<&ObjectKey> = Vec::new();
        let l4 = self.l4.iter().map(|d| &d.destination.service);
        for service in l4 {
            if !backends.contains(&service) {
                backends.push(service);
            }
        }
        for compiled in &self.http {
            let routed = match &compiled.rule.action {
                HttpAction::Route(destinations) => destinations.as_slice(),
                _ => &[],
            };
            let sent_to = routed
                .iter()
                .map(|d| &d.destination.service)
                .chain(compiled.rule.mirror.iter().map(|m| &m.destination.service));
            for service in sent_to {
                if !backends.contains(&service) {
                    backends.push(service);
                }
            }
        }
        backends
    }
}

/// Of `candidates`, the one whose `hosts` match `host` most specifically; the first of equals.
pub fn most_specific_host<'a>(
    candidates: impl IntoIterator<Item = &'a GatewayHost>,
    host: &str,
) -> Option<&'a GatewayHost> {
    let mut best: Option<(usize, &GatewayHost)> = None;
    for candidate in candidates {
        let specificity = candidate
            .hosts
            .iter()
            .filter_map(|pattern| host::host_match_specificity(pattern, host))
            .max();
        if let Some(specificity) = specificity
            && best.is_none_or(|(b, _)| specificity > b)
        {
            best = Some((specificity, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

impl GatewayHost {
    /// The rules of `routes` (attached to one listener, oldest first) for requests to
    /// `hostname`, in the Gateway API's precedence.
    pub fn merged(hostname: &str, routes: &[&ApiRoute]) -> Self {
        let l4 = |kind| {
            routes
                .iter()
                .filter(move |r| r.kind == kind)
                .map(|r| r.l4.clone())
        };
        let tcp = l4(gateway_api::RouteKind::Tcp)
            .map(|route| TcpRule {
                ports: Vec::new(),
                route,
            })
            .collect();
        let tls = l4(gateway_api::RouteKind::Tls)
            .map(|route| TlsRule {
                ports: Vec::new(),
                sni_hosts: vec![hostname.to_string()],
                route,
            })
            .collect();
        let mut http: Vec<CompiledRule> = routes.iter().flat_map(|r| r.http.clone()).collect();
        // Stable: equal precedence keeps route, rule and match order.
        http.sort_by_key(|compiled| std::cmp::Reverse(http_route::precedence(&compiled.rule)));
        Self {
            origin: routes
                .iter()
                .map(|r| r.origin.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            namespace: String::new(),
            hosts: vec![hostname.to_string()],
            http,
            tcp,
            tls,
        }
    }

    /// Its first `tcp` rule for `port`.
    pub fn tcp_route(&self, port: u16) -> Option<&[WeightedDestination]> {
        let rule = self.tcp.iter().find(|r| r.applies_to_port(port))?;
        Some(&rule.route)
    }

    /// Its first `tls` rule for `port` and `sni`.
    pub fn tls_route(&self, port: u16, sni: &str) -> Option<&[WeightedDestination]> {
        let rule = self.tls.iter().find(|r| r.applies(port, sni))?;
        Some(&rule.route)
    }

    /// The rule for a request arriving at the gateway; a request no rule matches has no
    /// route (404), as a gateway has no Service to fall back to.
    pub fn match_request(&self, request: &RequestInfo<'_>) -> RouteMatch<'_> {
        match match_rules(&self.http, request) {
            RouteMatch::Default => RouteMatch::NoneMatched,
            matched => matched,
        }
    }
}

#[cfg(test)]
mod tests;
