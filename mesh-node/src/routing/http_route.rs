//! The Gateway API's `HTTPRoute` (gateway.networking.k8s.io v1) bound to Services, as the
//! GAMMA initiative defines mesh routing, compiled into the same [`HttpRule`]s as a
//! VirtualService.
//!
//! Each match of each rule becomes its own rule, so that the rules of every HTTPRoute of a
//! Service can be ordered by the Gateway API's precedence, match by match: an exact path
//! first, then the longest prefix, then regular expressions, then the prefix `/` (as Istio
//! orders them; the Gateway API leaves regular expressions to implementations); then a
//! method match, the most
//! header matches, the most query parameter matches; ties keep the oldest route
//! (`creationTimestamp`), then the route's `namespace/name`, then the rule and match order.
//! `hostnames` is ignored: a mesh route is bound by its `parentRefs`. Cross-namespace
//! backends are allowed without a ReferenceGrant.
use serde::{Deserialize, Serialize};

use super::{
    CompiledRule, Destination, HeaderOps, HttpAction, HttpRule, Mirror, RequestMatch, RetryOn,
    RetryPolicy, Rewrite, RoutingError, StringMatch, WeightedDestination, fields,
    gateway_api::GROUP, matching::Pattern,
};
use crate::inventory::ObjectKey;

/// `spec` of an HTTPRoute.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentReference>,
    pub hostnames: Vec<String>,
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ParentReference {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteRule {
    pub name: Option<String>,
    pub matches: Vec<HttpRouteMatch>,
    pub filters: Vec<HttpRouteFilter>,
    pub backend_refs: Vec<HttpBackendRef>,
    pub timeouts: Option<HttpRouteTimeouts>,
    pub retry: Option<HttpRouteRetry>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<ValueMatch>,
    pub query_params: Vec<ValueMatch>,
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ValueMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_mirror: Option<RequestMirror>,
    pub request_redirect: Option<RequestRedirect>,
    pub url_rewrite: Option<UrlRewrite>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HeaderModifier {
    pub set: Vec<HttpHeader>,
    pub add: Vec<HttpHeader>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RequestMirror {
    pub backend_ref: BackendRef,
    pub percent: Option<i64>,
    pub fraction: Option<Fraction>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Fraction {
    pub numerator: i64,
    pub denominator: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RequestRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<i64>,
    pub status_code: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpBackendRef {
    #[serde(flatten)]
    pub backend: BackendRef,
    /// Relative; default 1.
    pub weight: Option<i64>,
    pub filters: Vec<HttpRouteFilter>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteTimeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

/// The experimental `retry` (GEP-1731).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpRouteRetry {
    pub codes: Vec<i64>,
    pub attempts: Option<i64>,
    pub backoff: Option<String>,
}

/// An HTTPRoute as the mesh applies it.
#[derive(Debug)]
pub(super) struct CompiledHttpRoute {
    /// The Services it attaches to, each limited to a port or not.
    pub(super) parents: Vec<(ObjectKey, Option<u16>)>,
    /// The Gateway API Gateways it asks to attach to.
    pub(super) gateways: Vec<GatewayParent>,
    /// `hostnames`, lower case: the hosts it serves at a Gateway (none: the listener's).
    pub(super) hostnames: Vec<String>,
    /// One rule per match, in the route's order.
    pub(super) rules: Vec<CompiledRule>,
}

/// A `parentRefs` entry naming a Gateway API Gateway: the route attaches to its listeners
/// that `section_name` and `port` name (any when unset), if they allow it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayParent {
    pub gateway: ObjectKey,
    pub section_name: Option<String>,
    pub port: Option<u16>,
}

impl GatewayParent {
    /// Whether it names the listener `name` on `port`.
    pub fn names_listener(&self, name: &str, port: u16) -> bool {
        self.section_name.as_deref().is_none_or(|s| s == name)
            && self.port.is_none_or(|p| p == port)
    }
}

impl ParentReference {
    /// The Gateway it names, if it names one (kind and group default to the Gateway API's
    /// Gateway); `namespace` is the route's.
    pub fn gateway(&self, field: &str, namespace: &str) -> Result<GatewayParent, RoutingError> {
        if let Some(section) = &self.section_name
            && !section.split('.').all(super::host::is_dns_label)
        {
            return Err(RoutingError::Invalid {
                field: format!("{field}.sectionName"),
                reason: format!("{section:?} is not a listener name"),
            });
        }
        let port = self
            .port
            .map(|p| fields::port(&format!("{field}.port"), p))
            .transpose()?;
        Ok(GatewayParent {
            gateway: ObjectKey::new(
                self.namespace.as_deref().unwrap_or(namespace),
                self.name.as_str(),
            ),
            section_name: self.section_name.clone(),
            port,
        })
    }

    /// Whether it names a Gateway API Gateway (the default kind).
    pub fn is_gateway(&self) -> bool {
        self.kind.as_deref().unwrap_or("Gateway") == "Gateway"
            && self.group.as_deref().unwrap_or(GROUP) == GROUP
    }
}

/// Where a rule ranks among all the HTTPRoute rules of a Service: greater goes first.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Precedence {
    /// Exact 3, prefix 2, regular expression 1, the catch-all prefix `/` 0.
    path_kind: u8,
    path_len: usize,
    has_method: bool,
    headers: usize,
    query_params: usize,
}

pub(super) fn precedence(rule: &HttpRule) -> Precedence {
    let Some(m) = rule.matches.first() else {
        return Precedence {
            path_kind: 0,
            path_len: 0,
            has_method: false,
            headers: 0,
            query_params: 0,
        };
    };
    let (path_kind, path_len) = match &m.uri {
        Some(StringMatch::Exact(path)) => (3, path.len()),
        // "/" matches everything, so it goes last (as in Istio), behind regular expressions.
        Some(StringMatch::PathPrefix(path) | StringMatch::Prefix(path)) if path.is_empty() => {
            (0, 0)
        }
        Some(StringMatch::PathPrefix(path) | StringMatch::Prefix(path)) => (2, path.len()),
        Some(StringMatch::Regex(pattern)) => (1, pattern.as_str().len()),
        Some(StringMatch::Present) | None => (0, 0),
    };
    Precedence {
        path_kind,
        path_len,
        has_method: m.method.is_some(),
        headers: m.headers.len(),
        query_params: m.query_params.len(),
    }
}

/// Gateway API's group for core resources, spelled either way.
fn is_core_group(group: Option<&str>) -> bool {
    matches!(group, None | Some("" | "core"))
}

// === impl HttpRouteSpec ===

impl HttpRouteSpec {
    /// Checks everything the mesh would compile; `namespace` is the route's own.
    pub fn validate(&self, namespace: &str) -> Result<(), RoutingError> {
        self.compile(namespace, "").map(|_| ())
    }

    pub(super) fn compile(
        &self,
        namespace: &str,
        origin: &str,
    ) -> Result<CompiledHttpRoute, RoutingError> {
        let mut parents = Vec::new();
        let mut gateways = Vec::new();
        for (i, parent) in self.parent_refs.iter().enumerate() {
            let field = format!("parentRefs[{i}]");
            if parent.is_gateway() {
                gateways.push(parent.gateway(&field, namespace)?);
                continue;
            }
            let kind = parent.kind.as_deref().unwrap_or("Gateway");
            if kind != "Service" || !is_core_group(parent.group.as_deref()) {
                let group = parent.group.as_deref().unwrap_or(GROUP);
                return Err(RoutingError::UnknownParent {
                    field,
                    reference: format!("{group}/{kind} {}", parent.name),
                });
            }
            if parent.section_name.is_some() {
                return Err(RoutingError::Unsupported {
                    field: format!("{field}.sectionName"),
                    what: "a Service parentRef by section name (use port)".into(),
                });
            }
            // A consumer route applies only to clients in the route's own namespace; this
            // proxy does not tell clients apart by namespace, so it would apply to all.
            if parent
                .namespace
                .as_deref()
                .is_some_and(|ns| ns != namespace)
            {
                return Err(RoutingError::Unsupported {
                    field: format!("{field}.namespace"),
                    what: "a route for another namespace's Service (a GAMMA consumer route)".into(),
                });
            }
            let port = parent
                .port
                .map(|p| fields::port(&format!("{field}.port"), p))
                .transpose()?;
            let service = ObjectKey::new(namespace, parent.name.as_str());
            if !parents.contains(&(service.clone(), port)) {
                parents.push((service, port));
            }
        }
        let mut rules = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            rules.extend(rule.compile(&format!("rules[{i}]"), namespace, origin)?);
        }
        // "If no rules are specified, a default rule is used that matches everything and
        // has no backends": the rule answers 500.
        if self.rules.is_empty() {
            rules.extend(HttpRouteRule::default().compile("rules", namespace, origin)?);
        }
        Ok(CompiledHttpRoute {
            parents,
            gateways,
            hostnames: route_hostnames(&self.hostnames)?,
            rules,
        })
    }
}

/// What a rule's filters ask for, at most one of each kind but mirrors.
#[derive(Default)]
struct Filters {
    request_headers: Option<HeaderOps>,
    response_headers: Option<HeaderOps>,
    rewrite: Option<(Rewrite, PathRewrite)>,
    redirect: Option<HttpAction>,
    mirror: Option<Mirror>,
}

impl HttpRouteRule {
    fn compile(
        &self,
        field: &str,
        namespace: &str,
        origin: &str,
    ) -> Result<Vec<CompiledRule>, RoutingError> {
        let matches = if self.matches.is_empty() {
            vec![HttpRouteMatch::default().compile(&format!("{field}.matches"))?]
        } else {
            self.matches
                .iter()
                .enumerate()
                .map(|(i, m)| m.compile(&format!("{field}.matches[{i}]")))
                .collect::<Result<_, _>>()?
        };
        let filters = Filters::compile(field, &self.filters, namespace)?;
        if let Some((_, PathRewrite::MatchedPrefix)) = &filters.rewrite
            && let Some(i) = matches
                .iter()
                .position(|m| !matches!(m.uri, Some(StringMatch::PathPrefix(_))))
        {
            return Err(RoutingError::Invalid {
                field: format!("{field}.matches[{i}].path"),
                reason: "a ReplacePrefixMatch rewrite needs PathPrefix matches".into(),
            });
        }
        let action = match filters.redirect {
            Some(redirect) => redirect,
            None => self.backends(field, namespace)?,
        };
        let timeouts = self.timeouts.clone().unwrap_or_default();
        let timeout = |name: &str, value: Option<&String>| {
            fields::optional_duration(&format!("{field}.timeouts.{name}"), value)
                .map(|d| d.filter(|d| !d.is_zero()))
        };
        let request_timeout = timeout("request", timeouts.request.as_ref())?;
        let backend_timeout = timeout("backendRequest", timeouts.backend_request.as_ref())?;
        let retries = self.retries(field, backend_timeout)?;
        let (rewrite, path_rewrite) = filters.rewrite.unzip();
        let rule = HttpRule {
            name: self.name.clone(),
            origin: origin.to_string(),
            matches: Vec::new(),
            action,
            timeout: request_timeout,
            retries,
            fault: None,
            rewrite,
            request_headers: filters.request_headers.unwrap_or_default(),
            response_headers: filters.response_headers.unwrap_or_default(),
            mirror: filters.mirror,
        };
        Ok(matches
            .into_iter()
            .map(|m| CompiledRule {
                rule: HttpRule {
                    matches: vec![m],
                    ..rule.clone()
                },
                full_path_rewrite: path_rewrite == Some(PathRewrite::FullPath),
            })
            .collect())
    }

    fn backends(&self, field: &str, namespace: &str) -> Result<HttpAction, RoutingError> {
        let mut destinations = Vec::new();
        for (i, backend) in self.backend_refs.iter().enumerate() {
            let at = format!("{field}.backendRefs[{i}]");
            if !backend.filters.is_empty() {
                return Err(RoutingError::Unsupported {
                    field: format!("{at}.filters"),
                    what: "per-backend filters (set them on the rule)".into(),
                });
            }
            destinations.push(weighted_backend(
                &at,
                &backend.backend,
                backend.weight,
                namespace,
            )?);
        }
        // The Gateway API answers 500 when a rule has no backend that can take traffic.
        if super::total_weight(&destinations) == 0 {
            return Ok(HttpAction::DirectResponse {
                status: 500,
                body: None,
            });
        }
        Ok(HttpAction::Route(destinations))
    }

    /// `retry` and `timeouts.backendRequest`, which bounds each try.
    fn retries(
        &self,
        field: &str,
        per_try_timeout: Option<std::time::Duration>,
    ) -> Result<Option<RetryPolicy>, RoutingError> {
        let Some(retry) = &self.retry else {
            return Ok(per_try_timeout.map(|per_try_timeout| RetryPolicy {
                attempts: 0,
                per_try_timeout: Some(per_try_timeout),
                retry_on: RetryOn::istio_default(),
            }));
        };
        let at = format!("{field}.retry");
        fields::optional_duration(&format!("{at}.backoff"), retry.backoff.as_ref())?;
        let status_codes = retry
            .codes
            .iter()
            .enumerate()
            .map(|(i, code)| fields::status(&format!("{at}.codes[{i}]"), *code))
            .collect::<Result<_, _>>()?;
        Ok(Some(RetryPolicy {
            attempts: match retry.attempts {
                Some(attempts) => fields::count(&format!("{at}.attempts"), attempts)?,
                None => RetryPolicy::istio_default().attempts,
            },
            per_try_timeout,
            // GEP-1731: retry on the listed codes and on connection errors.
            retry_on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                status_codes,
                ..RetryOn::default()
            },
        }))
    }
}

impl HttpRouteMatch {
    fn compile(&self, field: &str) -> Result<RequestMatch, RoutingError> {
        let path = self.path.clone().unwrap_or_default();
        let value = path.value.as_deref().unwrap_or("/");
        let at = format!("{field}.path");
        let must_be_absolute = |value: &str| {
            if value.starts_with('/') {
                Ok(())
            } else {
                Err(RoutingError::Invalid {
                    field: format!("{at}.value"),
                    reason: format!("{value:?} does not start with /"),
                })
            }
        };
        let uri = match path.kind.as_deref().unwrap_or("PathPrefix") {
            "Exact" => {
                must_be_absolute(value)?;
                StringMatch::Exact(value.to_string())
            }
            "PathPrefix" => {
                must_be_absolute(value)?;
                StringMatch::PathPrefix(value.trim_end_matches('/').to_string())
            }
            "RegularExpression" => StringMatch::Regex(Pattern::new(&format!("{at}.value"), value)?),
            other => return Err(unknown_type(&format!("{at}.type"), other)),
        };
        let headers = self
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let at = format!("{field}.headers[{i}]");
                Ok((
                    fields::header_name(&format!("{at}.name"), &h.name)?,
                    h.compile(&at)?,
                ))
            })
            .collect::<Result<_, RoutingError>>()?;
        let query_params = self
            .query_params
            .iter()
            .enumerate()
            .map(|(i, q)| {
                Ok((
                    q.name.clone(),
                    q.compile(&format!("{field}.queryParams[{i}]"))?,
                ))
            })
            .collect::<Result<_, RoutingError>>()?;
        Ok(RequestMatch {
            uri: Some(uri),
            method: self.method.clone().map(StringMatch::Exact),
            headers,
            query_params,
            ..RequestMatch::default()
        })
    }
}

impl ValueMatch {
    fn compile(&self, field: &str) -> Result<StringMatch, RoutingError> {
        match self.kind.as_deref().unwrap_or("Exact") {
            "Exact" => Ok(StringMatch::Exact(self.value.clone())),
            "RegularExpression" => Ok(StringMatch::Regex(Pattern::new(
                &format!("{field}.value"),
                &self.value,
            )?)),
            other => Err(unknown_type(&format!("{field}.type"), other)),
        }
    }
}

fn unknown_type(field: &str, kind: &str) -> RoutingError {
    RoutingError::Invalid {
        field: field.to_string(),
        reason: format!("unknown type {kind:?}"),
    }
}

/// A route's `hostnames`, checked and in lower case.
pub(super) fn route_hostnames(hostnames: &[String]) -> Result<Vec<String>, RoutingError> {
    let mut checked = Vec::new();
    for (i, hostname) in hostnames.iter().enumerate() {
        if hostname == "*" || !super::host::is_host_pattern(hostname) {
            return Err(RoutingError::Invalid {
                field: format!("hostnames[{i}]"),
                reason: format!("{hostname:?} is not a host name (a DNS name or *.suffix)"),
            });
        }
        checked.push(hostname.to_ascii_lowercase());
    }
    Ok(checked)
}

/// A `backendRefs` entry at `field`, with its relative `weight` (default 1).
pub(super) fn weighted_backend(
    field: &str,
    backend: &BackendRef,
    weight: Option<i64>,
    namespace: &str,
) -> Result<WeightedDestination, RoutingError> {
    let weight = weight.unwrap_or(1);
    if weight < 0 {
        return Err(RoutingError::NegativeWeight {
            field: format!("{field}.weight"),
            weight,
        });
    }
    Ok(WeightedDestination {
        destination: backend.compile(field, namespace)?,
        weight: fields::count(&format!("{field}.weight"), weight)?,
    })
}

impl BackendRef {
    fn compile(&self, field: &str, namespace: &str) -> Result<Destination, RoutingError> {
        let kind = self.kind.as_deref().unwrap_or("Service");
        if kind != "Service" || !is_core_group(self.group.as_deref()) {
            return Err(RoutingError::Unsupported {
                field: field.to_string(),
                what: format!(
                    "backend kind {kind} of group {:?} (only Services)",
                    self.group.as_deref().unwrap_or("")
                ),
            });
        }
        if self.name.is_empty() {
            return Err(RoutingError::Invalid {
                field: format!("{field}.name"),
                reason: "a backend needs the Service's name".into(),
            });
        }
        Ok(Destination {
            service: ObjectKey::new(
                self.namespace.as_deref().unwrap_or(namespace),
                self.name.as_str(),
            ),
            subset: None,
            port: self
                .port
                .map(|p| fields::port(&format!("{field}.port"), p))
                .transpose()?,
        })
    }
}

impl Filters {
    fn compile(
        field: &str,
        filters: &[HttpRouteFilter],
        namespace: &str,
    ) -> Result<Self, RoutingError> {
        let mut compiled = Self::default();
        for (i, filter) in filters.iter().enumerate() {
            let at = format!("{field}.filters[{i}]");
            let kind = filter.kind.as_str();
            let missing = |config: &str| RoutingError::Invalid {
                field: format!("{at}.{config}"),
                reason: format!("a {kind} filter needs {config}"),
            };
            let twice = || RoutingError::Invalid {
                field: at.clone(),
                reason: format!("a rule may have only one {kind} filter"),
            };
            match kind {
                "RequestHeaderModifier" | "ResponseHeaderModifier" => {
                    let (config, name, slot) = if kind == "RequestHeaderModifier" {
                        (
                            &filter.request_header_modifier,
                            "requestHeaderModifier",
                            &mut compiled.request_headers,
                        )
                    } else {
                        (
                            &filter.response_header_modifier,
                            "responseHeaderModifier",
                            &mut compiled.response_headers,
                        )
                    };
                    let config = config.as_ref().ok_or_else(|| missing(name))?;
                    if slot.is_some() {
                        return Err(twice());
                    }
                    *slot = Some(config.compile(&format!("{at}.{name}"))?);
                }
                "URLRewrite" => {
                    let config = filter
                        .url_rewrite
                        .as_ref()
                        .ok_or_else(|| missing("urlRewrite"))?;
                    if compiled.rewrite.is_some() {
                        return Err(twice());
                    }
                    compiled.rewrite = Some(config.compile(&format!("{at}.urlRewrite"))?);
                }
                "RequestRedirect" => {
                    let config = filter
                        .request_redirect
                        .as_ref()
                        .ok_or_else(|| missing("requestRedirect"))?;
                    if compiled.redirect.is_some() {
                        return Err(twice());
                    }
                    compiled.redirect = Some(config.compile(&format!("{at}.requestRedirect"))?);
                }
                "RequestMirror" => {
                    let config = filter
                        .request_mirror
                        .as_ref()
                        .ok_or_else(|| missing("requestMirror"))?;
                    if compiled.mirror.is_some() {
                        return Err(RoutingError::Unsupported {
                            field: at,
                            what: "more than one RequestMirror filter".into(),
                        });
                    }
                    compiled.mirror =
                        Some(config.compile(&format!("{at}.requestMirror"), namespace)?);
                }
                other => {
                    return Err(RoutingError::Unsupported {
                        field: format!("{at}.type"),
                        what: format!("filter type {other:?}"),
                    });
                }
            }
        }
        if compiled.rewrite.is_some() && compiled.redirect.is_some() {
            return Err(RoutingError::Invalid {
                field: format!("{field}.filters"),
                reason: "URLRewrite and RequestRedirect cannot both be set".into(),
            });
        }
        Ok(compiled)
    }
}

impl HeaderModifier {
    fn compile(&self, field: &str) -> Result<HeaderOps, RoutingError> {
        fn pairs(headers: &[HttpHeader]) -> impl Iterator<Item = (&str, &str)> {
            headers.iter().map(|h| (h.name.as_str(), h.value.as_str()))
        }
        fields::header_ops(
            field,
            pairs(&self.set),
            pairs(&self.add),
            self.remove.iter().map(String::as_str),
        )
    }
}

/// What a URLRewrite does to the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathRewrite {
    Untouched,
    FullPath,
    MatchedPrefix,
}

impl UrlRewrite {
    fn compile(&self, field: &str) -> Result<(Rewrite, PathRewrite), RoutingError> {
        let (uri, path_rewrite) = match &self.path {
            None => (None, PathRewrite::Untouched),
            Some(path) => match path.replacement(&format!("{field}.path"))? {
                PathReplacement::Full(path) => (Some(path), PathRewrite::FullPath),
                // Held without a trailing slash, like the PathPrefix it replaces, so that
                // "/foo" → "/xyz/" turns "/foo/bar" into "/xyz/bar".
                PathReplacement::Prefix(prefix) => (
                    Some(prefix.trim_end_matches('/').to_string()),
                    PathRewrite::MatchedPrefix,
                ),
            },
        };
        Ok((
            Rewrite {
                uri,
                authority: self.hostname.clone(),
            },
            path_rewrite,
        ))
    }
}

enum PathReplacement {
    Full(String),
    Prefix(String),
}

impl PathModifier {
    fn replacement(&self, field: &str) -> Result<PathReplacement, RoutingError> {
        let value = |name: &str, value: &Option<String>| {
            value.clone().ok_or_else(|| RoutingError::Invalid {
                field: format!("{field}.{name}"),
                reason: format!("type {} needs {name}", self.kind),
            })
        };
        match self.kind.as_str() {
            "ReplaceFullPath" => Ok(PathReplacement::Full(value(
                "replaceFullPath",
                &self.replace_full_path,
            )?)),
            "ReplacePrefixMatch" => Ok(PathReplacement::Prefix(value(
                "replacePrefixMatch",
                &self.replace_prefix_match,
            )?)),
            other => Err(unknown_type(&format!("{field}.type"), other)),
        }
    }
}

impl RequestRedirect {
    fn compile(&self, field: &str) -> Result<HttpAction, RoutingError> {
        let path = match &self.path {
            None => None,
            Some(path) => match path.replacement(&format!("{field}.path"))? {
                PathReplacement::Full(path) => Some(path),
                PathReplacement::Prefix(_) => {
                    return Err(RoutingError::Unsupported {
                        field: format!("{field}.path"),
                        what: "a redirect with ReplacePrefixMatch (use ReplaceFullPath)".into(),
                    });
                }
            },
        };
        Ok(HttpAction::Redirect {
            scheme: self.scheme.clone(),
            authority: self.hostname.clone(),
            port: self
                .port
                .map(|p| fields::port(&format!("{field}.port"), p))
                .transpose()?,
            path,
            status: fields::status(
                &format!("{field}.statusCode"),
                self.status_code.unwrap_or(302),
            )?,
        })
    }
}

impl RequestMirror {
    fn compile(&self, field: &str, namespace: &str) -> Result<Mirror, RoutingError> {
        let percent = match (self.percent, &self.fraction) {
            (Some(_), Some(_)) => {
                return Err(RoutingError::Invalid {
                    field: field.to_string(),
                    reason: "percent and fraction cannot both be set".into(),
                });
            }
            (Some(percent), None) => {
                fields::percentage(&format!("{field}.percent"), percent as f64)?
            }
            (None, Some(fraction)) => {
                let denominator = fraction.denominator.unwrap_or(100);
                if denominator <= 0 {
                    return Err(RoutingError::Invalid {
                        field: format!("{field}.fraction.denominator"),
                        reason: format!("{denominator} is not positive"),
                    });
                }
                fields::percentage(
                    &format!("{field}.fraction"),
                    fraction.numerator as f64 * 100.0 / denominator as f64,
                )?
            }
            (None, None) => 100.0,
        };
        Ok(Mirror {
            destination: self
                .backend_ref
                .compile(&format!("{field}.backendRef"), namespace)?,
            percent,
        })
    }
}
