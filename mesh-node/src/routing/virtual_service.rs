//! Istio's `VirtualService` (networking.istio.io v1, v1beta1 and v1alpha3 share the schema):
//! the spec as users write it, and its compilation into [`HttpRule`]s and [`TcpRule`]s.
use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use super::{
    CompiledRule, Destination, Fault, FaultAbort, FaultDelay, HeaderOps, HttpAction, HttpRule,
    Mirror, RequestMatch, RetryOn, RetryPolicy, Rewrite, RoutingError, StringMatch, TcpRule,
    TlsRule, WeightedDestination, fields, host::resolve_host, matching::Pattern,
};
use crate::inventory::ObjectKey;

/// The gateway name that stands for the mesh (sidecars, here the node proxy).
const MESH_GATEWAY: &str = "mesh";

/// `spec` of a VirtualService.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VirtualServiceSpec {
    pub hosts: Vec<String>,
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    /// Routes by SNI for TLS a gateway passes through; the mesh's node proxies do not
    /// route by SNI and leave them out.
    pub tls: Vec<TlsRoute>,
    pub tcp: Vec<TcpRoute>,
}

/// One entry of `http`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    pub route: Vec<RouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub delegate: Option<serde_json::Value>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<String>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFault>,
    pub mirror: Option<DestinationSpec>,
    pub mirror_percentage: Option<Percent>,
    pub mirrors: Vec<HttpMirrorPolicy>,
    pub headers: Option<Headers>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatchSpec>,
    pub scheme: Option<StringMatchSpec>,
    pub method: Option<StringMatchSpec>,
    pub authority: Option<StringMatchSpec>,
    pub headers: BTreeMap<String, StringMatchSpec>,
    pub without_headers: BTreeMap<String, StringMatchSpec>,
    pub query_params: BTreeMap<String, StringMatchSpec>,
    pub port: Option<i64>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
    pub ignore_uri_case: bool,
}

/// Istio's `StringMatch`: at most one of the three; none means "present".
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct StringMatchSpec {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

/// A weighted destination of `http[].route` or `tcp[].route`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RouteDestination {
    pub destination: DestinationSpec,
    pub weight: i64,
    pub headers: Option<Headers>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct DestinationSpec {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

/// `port: {number: N}`, in VirtualService destinations and DestinationRule port settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PortSelector {
    pub number: i64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<i64>,
    pub scheme: Option<String>,
    pub redirect_code: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpDirectResponse {
    pub status: i64,
    pub body: Option<HttpBody>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpBody {
    pub string: Option<String>,
    pub bytes: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRetry {
    pub attempts: i64,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpFault {
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Delay {
    pub fixed_delay: Option<String>,
    pub exponential_delay: Option<String>,
    pub percentage: Option<Percent>,
    /// Deprecated integer form of `percentage`.
    pub percent: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Abort {
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub http2_error: Option<String>,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Percent {
    pub value: f64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpMirrorPolicy {
    pub destination: DestinationSpec,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HeaderOperations {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

/// One entry of `tcp`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct TcpRoute {
    #[serde(rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    pub route: Vec<RouteDestination>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct L4MatchAttributes {
    pub port: Option<i64>,
    pub gateways: Vec<String>,
    pub destination_subnets: Vec<String>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

/// One entry of `tls`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct TlsRoute {
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatchAttributes>,
    pub route: Vec<RouteDestination>,
}

/// A `tcp` match's attributes, plus the names the ClientHello may ask for.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsMatchAttributes {
    pub sni_hosts: Vec<String>,
    #[serde(flatten)]
    pub l4: L4MatchAttributes,
}

/// A VirtualService as the mesh applies it.
#[derive(Debug)]
pub(super) struct CompiledVirtualService {
    /// The Services it routes, deduplicated; hosts that name no Service are left out.
    pub(super) hosts: Vec<ObjectKey>,
    pub(super) http: Vec<CompiledRule>,
    pub(super) tcp: Vec<TcpRule>,
    /// Only for a gateway binding: the mesh does not route by SNI.
    pub(super) tls: Vec<TlsRule>,
}

/// Which proxy a VirtualService is compiled for: the mesh's node proxies, or one gateway
/// (a `networking.istio.io` Gateway, by its key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding<'a> {
    Mesh,
    Gateway(&'a ObjectKey),
}

impl Binding<'_> {
    /// Whether a `gateways` list (of a VirtualService in `namespace`: `mesh`, `name` or
    /// `namespace/name`) names this binding.
    fn named_in(self, gateways: &[String], namespace: &str) -> bool {
        gateways.iter().any(|name| match self {
            Binding::Mesh => name == MESH_GATEWAY,
            Binding::Gateway(key) => gateway_key(name, namespace).as_ref() == Some(key),
        })
    }

    /// Whether a VirtualService with `gateways` applies here: an empty list means the mesh.
    fn applies(self, gateways: &[String], namespace: &str) -> bool {
        match self {
            Binding::Mesh if gateways.is_empty() => true,
            _ => self.named_in(gateways, namespace),
        }
    }

    /// Whether a match with `gateways` applies here: an empty list means wherever the
    /// VirtualService applies.
    fn admits_match(self, gateways: &[String], namespace: &str) -> bool {
        gateways.is_empty() || self.named_in(gateways, namespace)
    }
}

/// The Gateway a `gateways` entry names (`name` in the VirtualService's `namespace`, or
/// `namespace/name`); `None` for `mesh`.
fn gateway_key(name: &str, namespace: &str) -> Option<ObjectKey> {
    if name == MESH_GATEWAY {
        return None;
    }
    Some(match name.split_once('/') {
        Some((namespace, name)) => ObjectKey::new(namespace, name),
        None => ObjectKey::new(namespace, name),
    })
}

// === impl VirtualServiceSpec ===

impl VirtualServiceSpec {
    /// False for a VirtualService bound to gateways only, which the node proxies ignore.
    pub fn applies_to_mesh(&self) -> bool {
        Binding::Mesh.applies(&self.gateways, "")
    }

    /// The Gateways it binds to (`mesh` left out), for a VirtualService in `namespace`.
    pub fn bound_gateways(&self, namespace: &str) -> Vec<ObjectKey> {
        let mut keys: Vec<ObjectKey> = self
            .gateways
            .iter()
            .filter_map(|name| gateway_key(name, namespace))
            .collect();
        keys.dedup();
        keys
    }

    /// Checks everything the mesh and its gateways would compile; `namespace` is the
    /// resource's own.
    pub fn validate(&self, namespace: &str) -> Result<(), RoutingError> {
        for (i, name) in self.gateways.iter().enumerate() {
            let valid = name == MESH_GATEWAY
                || name
                    .split('/')
                    .all(|part| !part.is_empty() && !part.contains(char::is_whitespace))
                    && name.matches('/').count() <= 1;
            if !valid {
                return Err(RoutingError::Invalid {
                    field: format!("gateways[{i}]"),
                    reason: format!("{name:?} is not mesh, a Gateway name or namespace/name"),
                });
            }
        }
        self.compile(namespace, "", Binding::Mesh)?;
        for gateway in self.bound_gateways(namespace) {
            self.compile(namespace, "", Binding::Gateway(&gateway))?;
        }
        Ok(())
    }

    /// Every destination a route or mirror sends to, with its field path.
    pub(super) fn destinations(&self) -> Vec<(String, &DestinationSpec)> {
        let mut all = Vec::new();
        for (i, http) in self.http.iter().enumerate() {
            for (j, route) in http.route.iter().enumerate() {
                all.push((format!("http[{i}].route[{j}]"), &route.destination));
            }
            if let Some(mirror) = &http.mirror {
                all.push((format!("http[{i}].mirror"), mirror));
            }
            for (j, mirror) in http.mirrors.iter().enumerate() {
                all.push((format!("http[{i}].mirrors[{j}]"), &mirror.destination));
            }
        }
        for (i, tcp) in self.tcp.iter().enumerate() {
            for (j, route) in tcp.route.iter().enumerate() {
                all.push((format!("tcp[{i}].route[{j}]"), &route.destination));
            }
        }
        for (i, tls) in self.tls.iter().enumerate() {
            for (j, route) in tls.route.iter().enumerate() {
                all.push((format!("tls[{i}].route[{j}]"), &route.destination));
            }
        }
        all
    }

    /// `None` when the VirtualService does not apply to `binding`. For the mesh, `hosts`
    /// are the Services it routes; for a gateway they are left empty (its hosts are names
    /// requests carry, matched by the gateway).
    pub(super) fn compile(
        &self,
        namespace: &str,
        origin: &str,
        binding: Binding<'_>,
    ) -> Result<Option<CompiledVirtualService>, RoutingError> {
        if !binding.applies(&self.gateways, namespace) {
            return Ok(None);
        }
        if self.hosts.is_empty() {
            return Err(RoutingError::Invalid {
                field: "hosts".into(),
                reason: "at least one host is required".into(),
            });
        }
        let mut hosts = Vec::new();
        let services = self.hosts.iter().filter_map(|h| resolve_host(h, namespace));
        for key in services.filter(|_| binding == Binding::Mesh) {
            if !hosts.contains(&key) {
                hosts.push(key);
            }
        }
        let mut names = HashSet::new();
        let mut http = Vec::new();
        for (i, route) in self.http.iter().enumerate() {
            let field = format!("http[{i}]");
            if let Some(name) = route.name.as_deref().filter(|n| !n.is_empty())
                && !names.insert(name)
            {
                return Err(RoutingError::DuplicateRouteName {
                    field: format!("{field}.name"),
                    name: name.to_string(),
                });
            }
            if let Some(rule) = route.compile(&field, namespace, origin, binding)? {
                http.push(CompiledRule {
                    rule,
                    full_path_rewrite: false,
                });
            }
        }
        let mut tcp = Vec::new();
        for (i, route) in self.tcp.iter().enumerate() {
            if let Some(rule) = route.compile(&format!("tcp[{i}]"), namespace, binding)? {
                tcp.push(rule);
            }
        }
        let mut tls = Vec::new();
        if let Binding::Gateway(_) = binding {
            for (i, route) in self.tls.iter().enumerate() {
                if let Some(rule) = route.compile(&format!("tls[{i}]"), namespace, binding)? {
                    tls.push(rule);
                }
            }
        }
        Ok(Some(CompiledVirtualService {
            hosts,
            http,
            tcp,
            tls,
        }))
    }
}

impl HttpRoute {
    /// `None` when every match is bound elsewhere: the rule never sees `binding`'s traffic.
    fn compile(
        &self,
        field: &str,
        namespace: &str,
        origin: &str,
        binding: Binding<'_>,
    ) -> Result<Option<HttpRule>, RoutingError> {
        let unsupported = |what: &str, what_field: &str| RoutingError::Unsupported {
            field: format!("{field}.{what_field}"),
            what: what.to_string(),
        };
        if self.delegate.is_some() {
            return Err(unsupported(
                "delegation to another VirtualService",
                "delegate",
            ));
        }
        let mut matches = Vec::new();
        for (i, m) in self.matches.iter().enumerate() {
            if let Some(compiled) = m.compile(&format!("{field}.match[{i}]"), namespace, binding)? {
                matches.push(compiled);
            }
        }
        let action = self.action(field, namespace)?;
        let rewrite = match &self.rewrite {
            Some(rewrite) if rewrite.uri_regex_rewrite.is_some() => {
                return Err(unsupported("uriRegexRewrite", "rewrite.uriRegexRewrite"));
            }
            Some(HttpRewrite { uri, authority, .. }) if uri.is_some() || authority.is_some() => {
                Some(Rewrite {
                    uri: uri.clone(),
                    authority: authority.clone(),
                })
            }
            _ => None,
        };
        let timeout =
            fields::optional_duration(&format!("{field}.timeout"), self.timeout.as_ref())?
                .filter(|t| !t.is_zero());
        let retries = self
            .retries
            .as_ref()
            .map(|r| r.compile(&format!("{field}.retries")))
            .transpose()?;
        let fault = self
            .fault
            .as_ref()
            .map(|f| f.compile(&format!("{field}.fault")))
            .transpose()?;
        let headers = self.headers.clone().unwrap_or_default();
        let header_ops = |which: &str, ops: &Option<HeaderOperations>| {
            let ops = ops.clone().unwrap_or_default();
            ops.compile(&format!("{field}.headers.{which}"))
        };
        if self.matches.is_empty() || !matches.is_empty() {
            Ok(Some(HttpRule {
                name: self.name.clone(),
                origin: origin.to_string(),
                matches,
                action,
                timeout,
                retries,
                fault,
                rewrite,
                request_headers: header_ops("request", &headers.request)?,
                response_headers: header_ops("response", &headers.response)?,
                mirror: self.mirror(field, namespace)?,
            }))
        } else {
            Ok(None)
        }
    }

    fn action(&self, field: &str, namespace: &str) -> Result<HttpAction, RoutingError> {
        let set = [
            !self.route.is_empty(),
            self.redirect.is_some(),
            self.direct_response.is_some(),
        ];
        match set.iter().filter(|s| **s).count() {
            0 => {
                return Err(RoutingError::NoAction {
                    field: field.to_string(),
                });
            }
            1 => {}
            _ => {
                return Err(RoutingError::ConflictingActions {
                    field: field.to_string(),
                });
            }
        }
        if let Some(redirect) = &self.redirect {
            let at = format!("{field}.redirect");
            return Ok(HttpAction::Redirect {
                scheme: redirect.scheme.clone(),
                authority: redirect.authority.clone(),
                port: redirect
                    .port
                    .map(|p| fields::port(&format!("{at}.port"), p))
                    .transpose()?,
                path: redirect.uri.clone(),
                status: fields::status(
                    &format!("{at}.redirectCode"),
                    redirect.redirect_code.unwrap_or(301),
                )?,
            });
        }
        if let Some(response) = &self.direct_response {
            let at = format!("{field}.directResponse");
            let body = response.body.clone().unwrap_or_default();
            if body.bytes.is_some() {
                return Err(RoutingError::Unsupported {
                    field: format!("{at}.body.bytes"),
                    what: "a binary body (use body.string)".into(),
                });
            }
            return Ok(HttpAction::DirectResponse {
                status: fields::status(&format!("{at}.status"), response.status)?,
                body: body.string,
            });
        }
        Ok(HttpAction::Route(weighted(
            &format!("{field}.route"),
            &self.route,
            namespace,
        )?))
    }

    fn mirror(&self, field: &str, namespace: &str) -> Result<Option<Mirror>, RoutingError> {
        let percent = |at: &str, percentage: &Option<Percent>| {
            percentage
                .as_ref()
                .map_or(Ok(100.0), |p| fields::percentage(at, p.value))
        };
        match (&self.mirror, self.mirrors.as_slice()) {
            (None, []) => Ok(None),
            (Some(mirror), []) => Ok(Some(Mirror {
                destination: mirror.compile(&format!("{field}.mirror"), namespace)?,
                percent: percent(
                    &format!("{field}.mirrorPercentage.value"),
                    &self.mirror_percentage,
                )?,
            })),
            (None, [mirror]) => Ok(Some(Mirror {
                destination: mirror
                    .destination
                    .compile(&format!("{field}.mirrors[0].destination"), namespace)?,
                percent: percent(
                    &format!("{field}.mirrors[0].percentage.value"),
                    &mirror.percentage,
                )?,
            })),
            (Some(_), [_, ..]) => Err(RoutingError::Invalid {
                field: format!("{field}.mirrors"),
                reason: "mirror and mirrors cannot both be set".into(),
            }),
            (None, [_, _, ..]) => Err(RoutingError::Unsupported {
                field: format!("{field}.mirrors"),
                what: "more than one mirror".into(),
            }),
        }
    }
}

/// The destinations of one route with their weights: a single destination takes all
/// traffic; several must have weights summing to 100.
fn weighted(
    field: &str,
    routes: &[RouteDestination],
    namespace: &str,
) -> Result<Vec<WeightedDestination>, RoutingError> {
    let mut destinations = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        let at = format!("{field}[{i}]");
        if route.weight < 0 {
            return Err(RoutingError::NegativeWeight {
                field: format!("{at}.weight"),
                weight: route.weight,
            });
        }
        if route.headers.is_some() {
            return Err(RoutingError::Unsupported {
                field: format!("{at}.headers"),
                what: "per-destination header operations (set them on the http route)".into(),
            });
        }
        destinations.push(WeightedDestination {
            destination: route
                .destination
                .compile(&format!("{at}.destination"), namespace)?,
            weight: if routes.len() == 1 {
                100
            } else {
                fields::count(&format!("{at}.weight"), route.weight)?
            },
        });
    }
    if routes.len() > 1 {
        let total: i64 = routes.iter().map(|r| r.weight).sum();
        if total != 100 {
            return Err(RoutingError::WeightSum {
                field: field.to_string(),
                count: routes.len(),
                total,
            });
        }
    }
    Ok(destinations)
}

impl DestinationSpec {
    fn compile(&self, field: &str, namespace: &str) -> Result<Destination, RoutingError> {
        let service =
            resolve_host(&self.host, namespace).ok_or_else(|| RoutingError::UnresolvedHost {
                field: format!("{field}.host"),
                host: self.host.clone(),
            })?;
        Ok(Destination {
            service,
            subset: self.subset.clone().filter(|s| !s.is_empty()),
            port: self
                .port
                .as_ref()
                .map(|p| fields::port(&format!("{field}.port.number"), p.number))
                .transpose()?,
        })
    }
}

impl HttpMatchRequest {
    /// `None` when the match is bound elsewhere than `binding`.
    fn compile(
        &self,
        field: &str,
        namespace: &str,
        binding: Binding<'_>,
    ) -> Result<Option<RequestMatch>, RoutingError> {
        if !binding.admits_match(&self.gateways, namespace) {
            return Ok(None);
        }
        if self.source_namespace.is_some() {
            return Err(RoutingError::Unsupported {
                field: format!("{field}.sourceNamespace"),
                what: "matching on the source namespace".into(),
            });
        }
        let optional = |name: &str, spec: &Option<StringMatchSpec>| {
            spec.as_ref()
                .map(|s| s.compile(&format!("{field}.{name}")))
                .transpose()
        };
        let headers = |name: &str, specs: &BTreeMap<String, StringMatchSpec>| {
            specs
                .iter()
                .map(|(header, spec)| {
                    let at = format!("{field}.{name}[{header}]");
                    Ok((fields::header_name(&at, header)?, spec.compile(&at)?))
                })
                .collect::<Result<Vec<_>, RoutingError>>()
        };
        Ok(Some(RequestMatch {
            name: self.name.clone(),
            uri: optional("uri", &self.uri)?,
            ignore_uri_case: self.ignore_uri_case,
            scheme: optional("scheme", &self.scheme)?,
            method: optional("method", &self.method)?,
            authority: optional("authority", &self.authority)?,
            headers: headers("headers", &self.headers)?,
            without_headers: headers("withoutHeaders", &self.without_headers)?,
            query_params: self
                .query_params
                .iter()
                .map(|(name, spec)| {
                    Ok((
                        name.clone(),
                        spec.compile(&format!("{field}.queryParams[{name}]"))?,
                    ))
                })
                .collect::<Result<_, RoutingError>>()?,
            port: self
                .port
                .map(|p| fields::port(&format!("{field}.port"), p))
                .transpose()?,
            source_labels: self.source_labels.clone(),
        }))
    }
}

impl StringMatchSpec {
    fn compile(&self, field: &str) -> Result<StringMatch, RoutingError> {
        match (&self.exact, &self.prefix, &self.regex) {
            (None, None, None) => Ok(StringMatch::Present),
            (Some(exact), None, None) => Ok(StringMatch::Exact(exact.clone())),
            (None, Some(prefix), None) => Ok(StringMatch::Prefix(prefix.clone())),
            (None, None, Some(regex)) => Ok(StringMatch::Regex(Pattern::new(
                &format!("{field}.regex"),
                regex,
            )?)),
            _ => Err(RoutingError::Invalid {
                field: field.to_string(),
                reason: "only one of exact, prefix and regex may be set".into(),
            }),
        }
    }
}

impl HttpRetry {
    fn compile(&self, field: &str) -> Result<RetryPolicy, RoutingError> {
        Ok(RetryPolicy {
            attempts: fields::count(&format!("{field}.attempts"), self.attempts)?,
            per_try_timeout: fields::optional_duration(
                &format!("{field}.perTryTimeout"),
                self.per_try_timeout.as_ref(),
            )?,
            retry_on: match &self.retry_on {
                Some(text) if !text.trim().is_empty() => {
                    RetryOn::parse(&format!("{field}.retryOn"), text)?
                }
                _ => RetryOn::istio_default(),
            },
        })
    }
}

impl HttpFault {
    fn compile(&self, field: &str) -> Result<Fault, RoutingError> {
        let share = |at: String, percentage: &Option<Percent>| match percentage {
            Some(p) => fields::percentage(&format!("{at}.percentage.value"), p.value),
            None => Ok(100.0),
        };
        let delay = match &self.delay {
            None => None,
            Some(delay) => {
                let at = format!("{field}.delay");
                if delay.exponential_delay.is_some() {
                    return Err(RoutingError::Unsupported {
                        field: format!("{at}.exponentialDelay"),
                        what: "an exponential delay".into(),
                    });
                }
                let fixed = delay
                    .fixed_delay
                    .as_ref()
                    .ok_or_else(|| RoutingError::Invalid {
                        field: format!("{at}.fixedDelay"),
                        reason: "a delay needs fixedDelay".into(),
                    })?;
                let percent = match (delay.percentage.as_ref(), delay.percent) {
                    (None, Some(legacy)) => {
                        fields::percentage(&format!("{at}.percent"), legacy as f64)?
                    }
                    _ => share(at.clone(), &delay.percentage)?,
                };
                Some(FaultDelay {
                    fixed: fields::duration(&format!("{at}.fixedDelay"), fixed)?,
                    percent,
                })
            }
        };
        let abort = match &self.abort {
            None => None,
            Some(abort) => {
                let at = format!("{field}.abort");
                if abort.grpc_status.is_some() || abort.http2_error.is_some() {
                    return Err(RoutingError::Unsupported {
                        field: at,
                        what: "aborting with a gRPC status or an HTTP/2 error".into(),
                    });
                }
                let status = abort.http_status.ok_or_else(|| RoutingError::Invalid {
                    field: format!("{at}.httpStatus"),
                    reason: "an abort needs httpStatus".into(),
                })?;
                Some(FaultAbort {
                    status: fields::status(&format!("{at}.httpStatus"), status)?,
                    percent: share(at, &abort.percentage)?,
                })
            }
        };
        Ok(Fault { delay, abort })
    }
}

impl HeaderOperations {
    fn compile(&self, field: &str) -> Result<HeaderOps, RoutingError> {
        fields::header_ops(
            field,
            self.set.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            self.add.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            self.remove.iter().map(String::as_str),
        )
    }
}

impl TlsRoute {
    /// `None` when every match is bound elsewhere than `binding`.
    fn compile(
        &self,
        field: &str,
        namespace: &str,
        binding: Binding<'_>,
    ) -> Result<Option<TlsRule>, RoutingError> {
        if self.matches.is_empty() {
            return Err(RoutingError::Invalid {
                field: format!("{field}.match"),
                reason: "a tls route needs a match with sniHosts".into(),
            });
        }
        let mut ports = MatchedPorts::default();
        let mut sni_hosts = Vec::new();
        for (i, m) in self.matches.iter().enumerate() {
            let at = format!("{field}.match[{i}]");
            if m.sni_hosts.is_empty() {
                return Err(RoutingError::Invalid {
                    field: format!("{at}.sniHosts"),
                    reason: "at least one SNI host is required".into(),
                });
            }
            for (j, host) in m.sni_hosts.iter().enumerate() {
                if !super::host::is_host_pattern(host) {
                    return Err(RoutingError::Invalid {
                        field: format!("{at}.sniHosts[{j}]"),
                        reason: format!("{host:?} is not a host name (a DNS name or *.suffix)"),
                    });
                }
            }
            if let Some(port) = m.l4.compile(&at, namespace, binding, "TLS")? {
                ports.add(port);
                sni_hosts.extend(m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()));
            }
        }
        let route = l4_destinations(field, &self.route, namespace)?;
        Ok((!sni_hosts.is_empty()).then(|| TlsRule {
            ports: ports.finish(),
            sni_hosts,
            route,
        }))
    }
}

impl TcpRoute {
    /// `None` when every match is bound elsewhere than `binding`.
    fn compile(
        &self,
        field: &str,
        namespace: &str,
        binding: Binding<'_>,
    ) -> Result<Option<TcpRule>, RoutingError> {
        let mut ports = MatchedPorts::default();
        if self.matches.is_empty() {
            ports.add(None);
        }
        for (i, m) in self.matches.iter().enumerate() {
            if let Some(port) =
                m.compile(&format!("{field}.match[{i}]"), namespace, binding, "TCP")?
            {
                ports.add(port);
            }
        }
        let route = l4_destinations(field, &self.route, namespace)?;
        Ok(ports.matched.then(|| TcpRule {
            ports: ports.finish(),
            route,
        }))
    }
}

impl L4MatchAttributes {
    /// The port this match is for (`Some(None)`: any), or `None` when it is bound elsewhere
    /// than `binding`. `protocol` names the kind of match in messages.
    fn compile(
        &self,
        at: &str,
        namespace: &str,
        binding: Binding<'_>,
        protocol: &str,
    ) -> Result<Option<Option<u16>>, RoutingError> {
        let unsupported = |name: &str| RoutingError::Unsupported {
            field: format!("{at}.{name}"),
            what: format!("{name} in a {protocol} match"),
        };
        if !self.destination_subnets.is_empty() {
            return Err(unsupported("destinationSubnets"));
        }
        if !self.source_labels.is_empty() {
            return Err(unsupported("sourceLabels"));
        }
        if self.source_namespace.is_some() {
            return Err(unsupported("sourceNamespace"));
        }
        if !binding.admits_match(&self.gateways, namespace) {
            return Ok(None);
        }
        self.port
            .map(|port| fields::port(&format!("{at}.port"), port))
            .transpose()
            .map(Some)
    }
}

/// The ports of the matches of a `tcp` or `tls` route that apply here.
#[derive(Default)]
struct MatchedPorts {
    ports: Vec<u16>,
    /// A match that applies here names no port.
    any: bool,
    /// A match applies here.
    matched: bool,
}

impl MatchedPorts {
    fn add(&mut self, port: Option<u16>) {
        self.matched = true;
        match port {
            Some(port) => self.ports.push(port),
            None => self.any = true,
        }
    }

    /// The ports a rule is for; empty means any.
    fn finish(self) -> Vec<u16> {
        if self.any { Vec::new() } else { self.ports }
    }
}

/// The destinations of a `tcp` or `tls` route, which must have some.
fn l4_destinations(
    field: &str,
    route: &[RouteDestination],
    namespace: &str,
) -> Result<Vec<WeightedDestination>, RoutingError> {
    if route.is_empty() {
        return Err(RoutingError::NoAction {
            field: field.to_string(),
        });
    }
    weighted(&format!("{field}.route"), route, namespace)
}
