//! `AuthorizationPolicy`: for connections (L4) and for HTTP requests (L7).
//!
//! A connection is judged when it opens, before any request is seen. Like Istio's ztunnel,
//! a rule that needs request attributes (methods, paths, hosts, request principals,
//! headers) cannot match a bare connection: in an ALLOW policy such a rule never matches
//! (fail closed); in a DENY or AUDIT policy its request attributes are ignored and its L4
//! part alone decides (also fail closed). When the proxy sees the requests it judges each
//! one with every attribute, as Istio's sidecars and waypoints do.
//!
//! Matching follows the Envoy RBAC config Istio generates: values are exact, `prefix*`,
//! `*suffix` or `*`. Methods and paths are case-sensitive and compared as sent (the path
//! without its query; nothing is normalized). Hosts are case-insensitive, and a pattern
//! without a port also matches a Host header that has one. Header names are
//! case-insensitive; a header sent several times is matched on its values joined with `,`
//! as Envoy does; a missing header matches no pattern, so only `notValues` can hold.
//!
//! What the proxy cannot know:
//! * JWTs are seen only in requests: a request validated by a `RequestAuthentication` has
//!   a request principal (`<iss>/<sub>`) and `request.auth.*` claims; a request without a
//!   token has none, so `requestPrincipals` and `request.auth.*` values do not match it
//!   and their `not` forms do (`notRequestPrincipals: ["*"]` in a DENY policy denies every
//!   request without a valid token).
//! * `connection.sni` and `experimental.envoy.filters.*`: these count as not matching in
//!   ALLOW policies and as matching in DENY and AUDIT ones, so not knowing them never lets
//!   more traffic through.
use std::{borrow::Cow, net::IpAddr};

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    ConnectionAttributes, Policies, Policy, RequestAttributes, Verdict, WorkloadSelector, applies,
    jwt::RequestAuth,
};
use crate::inventory::Workload;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Matches are logged; the decision is left to the other policies.
    Audit,
    /// External authorization: not supported, rejected at load time.
    Custom,
}

/// `spec` of an AuthorizationPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: Action,
    /// `None` (no `rules` field) and `[]` both match nothing: an ALLOW policy without
    /// rules denies everything, as in Istio.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Gateway API style targeting: not supported; present only to be refused clearly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<serde_json::Value>,
    /// CUSTOM's external authorizer: present only so that such a policy is refused for its
    /// action, the real reason, rather than for an unknown field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Without proxies in front (no X-Forwarded-For at L4) the remote IP is the source IP.
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// Why a policy cannot be used; reported when the resource is loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("action CUSTOM (external authorization) is not supported")]
    Custom,
    #[error("targetRef/targetRefs are not supported; use a selector")]
    TargetRef,
    #[error("{field}: {value:?} is not an IP address or CIDR block")]
    IpBlock { field: &'static str, value: String },
    #[error("{field}: {value:?} is not a port number")]
    Port { field: &'static str, value: String },
    #[error("{field}: {value:?} is a path template ({{*}} or {{**}}), which is not supported")]
    PathTemplate { field: &'static str, value: String },
    #[error("when: key {0:?} is not an attribute Istio defines for AuthorizationPolicy")]
    UnknownKey(String),
    #[error("when: key {0:?} must name its entry in brackets, like request.headers[x-user]")]
    MissingEntry(String),
    #[error("when: key {key:?}: {name:?} is not a valid HTTP header name")]
    HeaderName { key: String, name: String },
}

/// A `when` key, parsed: what it reads, and whether the proxy can see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConditionKey<'k> {
    SourceIp,
    RemoteIp,
    SourcePrincipal,
    SourceNamespace,
    DestinationIp,
    DestinationPort,
    /// `request.headers[<name>]`.
    RequestHeader(&'k str),
    /// `request.auth.principal`: `<iss>/<sub>` of the request's validated JWT.
    RequestPrincipal,
    /// `request.auth.audiences`: the token's `aud`, any of which may match.
    Audiences,
    /// `request.auth.presenter`: the token's `azp`.
    Presenter,
    /// `request.auth.claims[<name>]` (nested: `[<a>][<b>]`): what is between the outer
    /// brackets.
    Claim(&'k str),
    /// `connection.sni`, `experimental.envoy.filters.*`: not visible to this proxy.
    Unseen,
}

impl<'k> ConditionKey<'k> {
    /// The keys Istio accepts (its `ValidateAttribute`); those it has retired
    /// (`destination.labels[...]`, `destination.namespace`, ...) are unknown here too.
    fn parse(key: &'k str) -> Result<Self, PolicyError> {
        let (attribute, rest) = match key.split_once('[') {
            Some((attribute, rest)) => (attribute, Some(rest)),
            None => (key, None),
        };
        let entry = || {
            rest.and_then(|rest| rest.strip_suffix(']'))
                .filter(|entry| !entry.is_empty())
                .ok_or_else(|| PolicyError::MissingEntry(key.to_string()))
        };
        Ok(match (attribute, rest.is_some()) {
            ("source.ip", false) => Self::SourceIp,
            ("remote.ip", false) => Self::RemoteIp,
            ("source.principal", false) => Self::SourcePrincipal,
            ("source.namespace", false) => Self::SourceNamespace,
            ("destination.ip", false) => Self::DestinationIp,
            ("destination.port", false) => Self::DestinationPort,
            ("request.auth.principal", false) => Self::RequestPrincipal,
            ("request.auth.audiences", false) => Self::Audiences,
            ("request.auth.presenter", false) => Self::Presenter,
            ("connection.sni", false) => Self::Unseen,
            ("request.headers", _) => {
                let name = entry()?;
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| PolicyError::HeaderName {
                    key: key.to_string(),
                    name: name.to_string(),
                })?;
                Self::RequestHeader(name)
            }
            ("request.auth.claims", _) => Self::Claim(entry()?),
            (experimental, _) if experimental.starts_with("experimental.envoy.filters.") => {
                entry()?;
                Self::Unseen
            }
            _ => return Err(PolicyError::UnknownKey(key.to_string())),
        })
    }

    /// Whether the connection alone tells its value.
    fn is_l4(self) -> bool {
        matches!(
            self,
            Self::SourceIp
                | Self::RemoteIp
                | Self::SourcePrincipal
                | Self::SourceNamespace
                | Self::DestinationIp
                | Self::DestinationPort
        )
    }

    /// Whether a request tells more about it than the bare connection.
    fn reads_request(self) -> bool {
        matches!(
            self,
            Self::RequestHeader(_)
                | Self::RequestPrincipal
                | Self::Audiences
                | Self::Presenter
                | Self::Claim(_)
        )
    }
}

impl AuthorizationPolicySpec {
    /// Checks what evaluation relies on, so a bad policy is rejected at load time rather
    /// than silently matching nothing (or everything).
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.action == Action::Custom {
            return Err(PolicyError::Custom);
        }
        if self.target_ref.is_some() || self.target_refs.is_some() {
            return Err(PolicyError::TargetRef);
        }
        self.rules.iter().try_for_each(Rule::validate)
    }

    /// What a policy that cannot be applied as written (`spec` failed to parse or to
    /// validate) is enforced as, so that it never widens access; Istio's own rules:
    /// * ALLOW: only its valid rules, so its selection stays denied except by them;
    /// * DENY, CUSTOM, or an action that cannot be read: deny its whole selection;
    /// * AUDIT: nothing (it never decides access), so `None`.
    ///
    /// A selector that cannot be read, or targeting by `targetRef` (not supported),
    /// widens the selection to the policy's whole namespace: more is denied, never less.
    /// Such an ALLOW policy keeps none of its rules: on the workloads it was not meant for,
    /// its rules would add to what their own ALLOW policies allow.
    pub fn fail_closed(spec: &serde_yaml::Value) -> Option<Self> {
        let field = |name: &str| spec.get(name).cloned();
        let targeted = field("targetRef").is_some() || field("targetRefs").is_some();
        let selector = field("selector")
            .filter(|_| !targeted)
            .and_then(|s| serde_yaml::from_value::<WorkloadSelector>(s).ok());
        let widened = targeted || (field("selector").is_some() && selector.is_none());
        let action = match field("action") {
            None => Some(Action::Allow),
            Some(action) => serde_yaml::from_value(action).ok(),
        };
        let rules = match action {
            Some(Action::Audit) => return None,
            Some(Action::Allow) if widened => Vec::new(),
            Some(Action::Allow) => field("rules")
                .and_then(|rules| serde_yaml::from_value::<Vec<serde_yaml::Value>>(rules).ok())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|rule| serde_yaml::from_value::<Rule>(rule).ok())
                .filter(|rule| rule.validate().is_ok())
                .collect(),
            // A rule without conditions matches everything.
            Some(Action::Deny | Action::Custom) | None => vec![Rule::default()],
        };
        let action = if action == Some(Action::Allow) {
            Action::Allow
        } else {
            Action::Deny
        };
        Some(Self {
            selector,
            action,
            rules,
            ..Self::default()
        })
    }
}

impl Rule {
    fn validate(&self) -> Result<(), PolicyError> {
        for from in &self.from {
            let s = &from.source;
            check_blocks("ipBlocks", &s.ip_blocks)?;
            check_blocks("notIpBlocks", &s.not_ip_blocks)?;
            check_blocks("remoteIpBlocks", &s.remote_ip_blocks)?;
            check_blocks("notRemoteIpBlocks", &s.not_remote_ip_blocks)?;
        }
        for to in &self.to {
            let o = &to.operation;
            check_ports("ports", &o.ports)?;
            check_ports("notPorts", &o.not_ports)?;
            check_paths("paths", &o.paths)?;
            check_paths("notPaths", &o.not_paths)?;
        }
        for condition in &self.when {
            let values = condition.values.iter().chain(&condition.not_values);
            match ConditionKey::parse(&condition.key)? {
                ConditionKey::SourceIp => check_blocks("when source.ip", values)?,
                ConditionKey::RemoteIp => check_blocks("when remote.ip", values)?,
                ConditionKey::DestinationIp => check_blocks("when destination.ip", values)?,
                ConditionKey::DestinationPort => check_ports("when destination.port", values)?,
                _ => {}
            }
        }
        Ok(())
    }
}

fn check_blocks<'v>(
    field: &'static str,
    blocks: impl IntoIterator<Item = &'v String>,
) -> Result<(), PolicyError> {
    match blocks.into_iter().find(|b| parse_block(b).is_none()) {
        Some(bad) => Err(PolicyError::IpBlock {
            field,
            value: bad.clone(),
        }),
        None => Ok(()),
    }
}

fn check_ports<'v>(
    field: &'static str,
    ports: impl IntoIterator<Item = &'v String>,
) -> Result<(), PolicyError> {
    match ports.into_iter().find(|p| p.parse::<u16>().is_err()) {
        Some(bad) => Err(PolicyError::Port {
            field,
            value: bad.clone(),
        }),
        None => Ok(()),
    }
}

/// Istio's path templates would be compared literally here and so never match: refused,
/// since in a DENY policy that would let the traffic through.
fn check_paths(field: &'static str, paths: &[String]) -> Result<(), PolicyError> {
    match paths
        .iter()
        .find(|p| p.contains("{*}") || p.contains("{**}"))
    {
        Some(template) => Err(PolicyError::PathTemplate {
            field,
            value: template.clone(),
        }),
        None => Ok(()),
    }
}

fn parse_block(block: &str) -> Option<IpNet> {
    block
        .parse::<IpNet>()
        .ok()
        .or_else(|| block.parse::<IpAddr>().ok().map(IpNet::from))
}

// === Matching ===

/// Istio's string match: exact, `*` (anything not empty), `prefix*` or `*suffix`, with
/// `eq` comparing the bytes.
fn wildcard_match(pattern: &str, value: &str, eq: impl Fn(&[u8], &[u8]) -> bool) -> bool {
    let (pattern, value) = (pattern.as_bytes(), value.as_bytes());
    if pattern == b"*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix(b"*") {
        return value.len() >= prefix.len() && eq(&value[..prefix.len()], prefix);
    }
    if let Some(suffix) = pattern.strip_prefix(b"*") {
        return value.len() >= suffix.len() && eq(&value[value.len() - suffix.len()..], suffix);
    }
    eq(pattern, value)
}

fn string_match(pattern: &str, value: &str) -> bool {
    wildcard_match(pattern, value, <[u8]>::eq)
}

/// A list-valued attribute (audiences, a list claim) matches when one of its values does.
fn any_match(pattern: &str, values: &[String]) -> bool {
    values.iter().any(|value| string_match(pattern, value))
}

/// Headers and hosts: `*` means present, even with an empty value (Envoy's `present_match`).
fn header_match(pattern: &str, value: &str) -> bool {
    pattern == "*" || string_match(pattern, value)
}

/// Case-insensitive; a pattern without a port matches the host with or without one.
fn host_match(pattern: &str, host: &str) -> bool {
    let matches = |host: &str| wildcard_match(pattern, host, <[u8]>::eq_ignore_ascii_case);
    pattern == "*" || matches(host) || matches(without_port(host))
}

/// `host` without a trailing `:port`; an IPv6 literal keeps its brackets.
fn without_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            name
        }
        _ => host,
    }
}

fn ip_match(block: &str, ip: &IpAddr) -> bool {
    parse_block(block).is_some_and(|net| net.contains(ip))
}

fn port_match(pattern: &str, port: &u16) -> bool {
    pattern.parse() == Ok(*port)
}

/// A header as Envoy's matchers see it: its values joined with `,`; `None` when absent.
fn header_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<Cow<'h, str>> {
    let mut values = headers
        .get_all(name)
        .iter()
        .map(|value| String::from_utf8_lossy(value.as_bytes()));
    let first = values.next()?;
    Some(values.fold(first, |joined, next| Cow::Owned(format!("{joined},{next}"))))
}

/// One attribute as an evaluation sees it.
#[derive(Clone, Copy)]
enum Seen<T> {
    Value(T),
    /// Known to be absent (no identity on plaintext, no such header): matches no pattern.
    Absent,
    /// Not visible (request attributes at L4, the SNI): see `Subject::unseen_matches`.
    Unseen,
}

impl<T> From<Option<T>> for Seen<T> {
    fn from(value: Option<T>) -> Self {
        value.map_or(Seen::Absent, Seen::Value)
    }
}

impl<T> Seen<T> {
    /// A part of a seen value, which may itself be absent.
    fn and_then<U>(self, part: impl FnOnce(T) -> Option<U>) -> Seen<U> {
        match self {
            Seen::Value(value) => part(value).into(),
            Seen::Absent => Seen::Absent,
            Seen::Unseen => Seen::Unseen,
        }
    }
}

/// What one evaluation can see, for one policy.
#[derive(Clone, Copy)]
struct Subject<'a> {
    connection: &'a ConnectionAttributes<'a>,
    /// `None` when a connection is judged before its requests (L4).
    request: Option<&'a RequestAttributes<'a>>,
    /// What an attribute the proxy cannot see counts as: a match in DENY and AUDIT
    /// policies, not in ALLOW ones, so not knowing never lets more traffic through.
    unseen_matches: bool,
}

impl<'a> Subject<'a> {
    /// Istio's rule for a field and its `not` form: `positive` must match (when given) and
    /// `negative` must not. A rule without either holds whatever the proxy can see.
    fn matches<T: ?Sized>(
        &self,
        positive: &[String],
        negative: &[String],
        seen: Seen<&T>,
        pattern_matches: impl Fn(&str, &T) -> bool,
    ) -> bool {
        if positive.is_empty() && negative.is_empty() {
            return true;
        }
        let value = match seen {
            Seen::Value(value) => Some(value),
            Seen::Absent => None,
            Seen::Unseen => return self.unseen_matches,
        };
        let any = |patterns: &[String]| {
            value.is_some_and(|v| patterns.iter().any(|p| pattern_matches(p, v)))
        };
        (positive.is_empty() || any(positive)) && !any(negative)
    }

    /// An attribute of the request, which the proxy sees only at L7.
    fn request_attribute<T: ?Sized>(
        &self,
        attribute: impl FnOnce(&'a RequestAttributes<'a>) -> &'a T,
    ) -> Seen<&'a T> {
        self.request
            .map_or(Seen::Unseen, |r| Seen::Value(attribute(r)))
    }

    /// The request's validated JWT: unseen at L4, absent from a request without one.
    fn jwt(&self) -> Seen<&'a RequestAuth> {
        match self.request {
            Some(request) => request.auth.into(),
            None => Seen::Unseen,
        }
    }

    fn request_principal(&self) -> Seen<&'a str> {
        self.jwt().and_then(|auth| Some(auth.principal.as_str()))
    }
}

impl Source {
    fn reads_request(&self) -> bool {
        !self.request_principals.is_empty() || !self.not_request_principals.is_empty()
    }

    fn matches(&self, s: &Subject) -> bool {
        let c = s.connection;
        let source_ip = Seen::Value(&c.source_ip);
        let remote_ip = Seen::Value(&c.remote_ip);
        s.matches(
            &self.principals,
            &self.not_principals,
            c.source_principal.into(),
            string_match,
        ) && s.matches(
            &self.namespaces,
            &self.not_namespaces,
            c.source_namespace.into(),
            string_match,
        ) && s.matches(&self.ip_blocks, &self.not_ip_blocks, source_ip, ip_match)
            && s.matches(
                &self.remote_ip_blocks,
                &self.not_remote_ip_blocks,
                remote_ip,
                ip_match,
            )
            && s.matches(
                &self.request_principals,
                &self.not_request_principals,
                s.request_principal(),
                string_match,
            )
    }
}

impl Operation {
    fn reads_request(&self) -> bool {
        [
            &self.hosts,
            &self.not_hosts,
            &self.methods,
            &self.not_methods,
            &self.paths,
            &self.not_paths,
        ]
        .iter()
        .any(|list| !list.is_empty())
    }

    fn matches(&self, s: &Subject) -> bool {
        let port = Seen::Value(&s.connection.destination_port);
        s.matches(&self.ports, &self.not_ports, port, port_match)
            && s.matches(
                &self.methods,
                &self.not_methods,
                s.request_attribute(|r| r.method),
                string_match,
            )
            && s.matches(
                &self.paths,
                &self.not_paths,
                s.request_attribute(|r| r.path),
                string_match,
            )
            && s.matches(
                &self.hosts,
                &self.not_hosts,
                s.request_attribute(|r| r.host),
                host_match,
            )
    }
}

impl Condition {
    /// An invalid key (a policy that skipped `validate`) counts as unseen: fail closed.
    fn parsed_key(&self) -> ConditionKey<'_> {
        ConditionKey::parse(&self.key).unwrap_or(ConditionKey::Unseen)
    }

    fn matches(&self, s: &Subject) -> bool {
        let c = s.connection;
        let (values, not_values) = (&self.values, &self.not_values);
        let ip = |ip: &IpAddr| s.matches(values, not_values, Seen::Value(ip), ip_match);
        let text = |seen: Seen<&str>| s.matches(values, not_values, seen, string_match);
        match self.parsed_key() {
            ConditionKey::SourceIp | ConditionKey::RemoteIp => ip(&c.source_ip),
            ConditionKey::DestinationIp => ip(&c.destination_ip),
            ConditionKey::SourcePrincipal => text(c.source_principal.into()),
            ConditionKey::SourceNamespace => text(c.source_namespace.into()),
            ConditionKey::DestinationPort => s.matches(
                values,
                not_values,
                Seen::Value(&c.destination_port),
                port_match,
            ),
            ConditionKey::RequestHeader(name) => {
                let header = s.request.map(|r| header_value(r.headers, name));
                let seen = match &header {
                    None => Seen::Unseen,
                    Some(value) => value.as_deref().into(),
                };
                s.matches(values, not_values, seen, header_match)
            }
            ConditionKey::RequestPrincipal => text(s.request_principal()),
            ConditionKey::Presenter => text(s.jwt().and_then(|auth| auth.presenter.as_deref())),
            ConditionKey::Audiences => {
                let audiences = s.jwt().and_then(|auth| Some(auth.audiences.as_slice()));
                s.matches(values, not_values, audiences, any_match)
            }
            ConditionKey::Claim(entry) => {
                let path: Vec<&str> = entry.split("][").collect();
                let claim = s.jwt().and_then(|auth| auth.claim(&path));
                let claim = match &claim {
                    Seen::Value(values) => Seen::Value(values.as_slice()),
                    Seen::Absent => Seen::Absent,
                    Seen::Unseen => Seen::Unseen,
                };
                s.matches(values, not_values, claim, any_match)
            }
            ConditionKey::Unseen => text(Seen::Unseen),
        }
    }
}

impl Rule {
    /// Whether a request can tell more than its connection (see `needs_request_attributes`).
    fn reads_request(&self) -> bool {
        self.from.iter().any(|f| f.source.reads_request())
            || self.to.iter().any(|t| t.operation.reads_request())
            || self.when.iter().any(|w| w.parsed_key().reads_request())
    }

    /// Whether the connection alone decides the rule.
    fn is_l4(&self) -> bool {
        !self.reads_request() && self.when.iter().all(|w| w.parsed_key().is_l4())
    }

    fn matches(&self, s: &Subject) -> bool {
        (self.from.is_empty() || self.from.iter().any(|f| f.source.matches(s)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.operation.matches(s)))
            && self.when.iter().all(|w| w.matches(s))
    }
}

impl AuthorizationPolicySpec {
    fn matches(
        &self,
        connection: &ConnectionAttributes,
        request: Option<&RequestAttributes>,
    ) -> bool {
        let subject = Subject {
            connection,
            request,
            unseen_matches: self.action != Action::Allow,
        };
        self.rules.iter().any(|rule| {
            // At L4 an ALLOW rule that needs the request cannot allow a bare connection, even
            // through another of its `from`/`to` entries: ztunnel's rule (module doc).
            let decidable = request.is_some() || self.action != Action::Allow || rule.is_l4();
            decidable && rule.matches(&subject)
        })
    }
}

fn applicable<'p>(
    policies: &'p Policies,
    workload: &'p Workload,
) -> impl Iterator<Item = &'p Policy<AuthorizationPolicySpec>> {
    policies.authorization_policies.iter().filter(|p| {
        applies(
            &p.key.namespace,
            p.spec.selector.as_ref(),
            workload,
            &policies.root_namespace,
        )
    })
}

pub(super) fn needs_request(policies: &Policies, workload: &Workload) -> bool {
    applicable(policies, workload).any(|p| p.spec.rules.iter().any(Rule::reads_request))
}

/// DENY first, then ALLOW; AUDIT matches are only logged. `request` is `None` at L4.
pub(super) fn evaluate(
    policies: &Policies,
    workload: &Workload,
    connection: &ConnectionAttributes,
    request: Option<&RequestAttributes>,
) -> Verdict {
    let applicable: Vec<&Policy<AuthorizationPolicySpec>> =
        applicable(policies, workload).collect();
    let matching = |action: Action| {
        applicable
            .iter()
            .filter(move |p| p.spec.action == action)
            .filter(|p| p.spec.matches(connection, request))
    };
    for audited in matching(Action::Audit) {
        tracing::info!(
            policy = %audited.key,
            source = %connection.source_ip,
            method = request.map(|r| r.method),
            path = request.map(|r| r.path),
            "AUDIT policy matched"
        );
    }
    if let Some(deny) = matching(Action::Deny).next() {
        return Verdict::Deny {
            policy: Some(deny.key.clone()),
            reason: "denied by a DENY policy",
        };
    }
    if !applicable.iter().any(|p| p.spec.action == Action::Allow) {
        return Verdict::Allow { policy: None };
    }
    match matching(Action::Allow).next() {
        Some(allow) => Verdict::Allow {
            policy: Some(allow.key.clone()),
        },
        None => Verdict::Deny {
            policy: None,
            reason: "no ALLOW policy matched",
        },
    }
}
