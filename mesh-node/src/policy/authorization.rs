//! `AuthorizationPolicy` at L4.
//!
//! The node proxy sees connections, not requests. Like Istio's ztunnel, a rule that needs
//! request attributes (methods, paths, hosts, request principals, headers) cannot match at
//! L4: in an ALLOW policy such a rule never matches (fail closed); in a DENY or AUDIT policy
//! its request attributes are ignored and its L4 part alone decides (also fail closed).
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{ConnectionAttributes, Policies, Policy, Verdict, WorkloadSelector, applies};
use crate::state::Workload;

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
#[serde(rename_all = "camelCase")]
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
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
pub struct RuleTo {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
#[serde(rename_all = "camelCase")]
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
    #[error("when: key {0:?} is not an attribute Istio defines")]
    UnknownKey(String),
}

/// Condition keys known at L4.
const L4_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.principal",
    "source.namespace",
    "destination.ip",
    "destination.port",
];

/// Request-level condition keys (valid, but not evaluable at L4).
fn is_request_key(key: &str) -> bool {
    key.starts_with("request.")
        || key.starts_with("experimental.")
        || key == "connection.sni"
        || key.starts_with("destination.")
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
        for rule in &self.rules {
            for from in &rule.from {
                let s = &from.source;
                for (field, blocks) in [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ] {
                    for block in blocks {
                        parse_block(block).ok_or_else(|| PolicyError::IpBlock {
                            field,
                            value: block.clone(),
                        })?;
                    }
                }
            }
            for to in &rule.to {
                for (field, ports) in [
                    ("ports", &to.operation.ports),
                    ("notPorts", &to.operation.not_ports),
                ] {
                    for port in ports {
                        port.parse::<u16>().map_err(|_| PolicyError::Port {
                            field,
                            value: port.clone(),
                        })?;
                    }
                }
            }
            for condition in &rule.when {
                if !L4_KEYS.contains(&condition.key.as_str()) && !is_request_key(&condition.key) {
                    return Err(PolicyError::UnknownKey(condition.key.clone()));
                }
            }
        }
        Ok(())
    }
}

fn parse_block(block: &str) -> Option<IpNet> {
    block
        .parse::<IpNet>()
        .ok()
        .or_else(|| block.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Istio's string match: exact, `*` (anything present), `prefix*` or `*suffix`.
fn string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

/// `positive` must match (when given) and `negative` must not. A missing value (no
/// identity on a plaintext connection) matches no pattern.
fn field_matches(positive: &[String], negative: &[String], value: Option<&str>) -> bool {
    let any =
        |patterns: &[String]| value.is_some_and(|v| patterns.iter().any(|p| string_match(p, v)));
    (positive.is_empty() || any(positive)) && !any(negative)
}

fn ip_matches(positive: &[String], negative: &[String], ip: IpAddr) -> bool {
    let any = |blocks: &[String]| {
        blocks
            .iter()
            .filter_map(|b| parse_block(b))
            .any(|net| net.contains(&ip))
    };
    (positive.is_empty() || any(positive)) && !any(negative)
}

fn port_matches(positive: &[String], negative: &[String], port: u16) -> bool {
    let any = |ports: &[String]| ports.iter().any(|p| p.parse() == Ok(port));
    (positive.is_empty() || any(positive)) && !any(negative)
}

impl Source {
    fn has_request_attributes(&self) -> bool {
        !self.request_principals.is_empty() || !self.not_request_principals.is_empty()
    }

    fn matches(&self, c: &ConnectionAttributes) -> bool {
        field_matches(&self.principals, &self.not_principals, c.source_principal)
            && field_matches(&self.namespaces, &self.not_namespaces, c.source_namespace)
            && ip_matches(&self.ip_blocks, &self.not_ip_blocks, c.source_ip)
            && ip_matches(
                &self.remote_ip_blocks,
                &self.not_remote_ip_blocks,
                c.source_ip,
            )
    }
}

impl Operation {
    fn has_request_attributes(&self) -> bool {
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

    fn matches(&self, c: &ConnectionAttributes) -> bool {
        port_matches(&self.ports, &self.not_ports, c.destination_port)
    }
}

impl Condition {
    fn is_request_level(&self) -> bool {
        !L4_KEYS.contains(&self.key.as_str())
    }

    fn matches(&self, c: &ConnectionAttributes) -> bool {
        let ip = |ip: IpAddr| ip_matches(&self.values, &self.not_values, ip);
        let text = |value: Option<&str>| field_matches(&self.values, &self.not_values, value);
        match self.key.as_str() {
            "source.ip" | "remote.ip" => ip(c.source_ip),
            "destination.ip" => ip(c.destination_ip),
            "source.principal" => text(c.source_principal),
            "source.namespace" => text(c.source_namespace),
            "destination.port" => port_matches(&self.values, &self.not_values, c.destination_port),
            // Request-level keys: see the module comment.
            _ => true,
        }
    }
}

impl Rule {
    fn has_request_attributes(&self) -> bool {
        self.from.iter().any(|f| f.source.has_request_attributes())
            || self.to.iter().any(|t| t.operation.has_request_attributes())
            || self.when.iter().any(Condition::is_request_level)
    }

    fn matches(&self, c: &ConnectionAttributes) -> bool {
        (self.from.is_empty() || self.from.iter().any(|f| f.source.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.operation.matches(c)))
            && self.when.iter().all(|w| w.matches(c))
    }
}

impl AuthorizationPolicySpec {
    fn matches(&self, c: &ConnectionAttributes) -> bool {
        self.rules.iter().any(|rule| {
            let l4_only = !rule.has_request_attributes();
            // ALLOW: a rule that needs the request cannot allow a bare connection.
            (l4_only || self.action != Action::Allow) && rule.matches(c)
        })
    }
}

pub(super) fn evaluate(
    policies: &Policies,
    workload: &Workload,
    connection: &ConnectionAttributes,
) -> Verdict {
    let applicable: Vec<&Policy<AuthorizationPolicySpec>> = policies
        .authorization_policies
        .iter()
        .filter(|p| {
            applies(
                &p.key.namespace,
                p.spec.selector.as_ref(),
                workload,
                &policies.root_namespace,
            )
        })
        .collect();
    let matching = |action: Action| {
        applicable
            .iter()
            .filter(move |p| p.spec.action == action)
            .filter(|p| p.spec.matches(connection))
    };
    for audited in matching(Action::Audit) {
        tracing::info!(policy = %audited.key, source = %connection.source_ip, "AUDIT policy matched");
    }
    if let Some(deny) = matching(Action::Deny).next() {
        return Verdict::Deny {
            policy: Some(deny.key.clone()),
            reason: "denied by a DENY policy",
        };
    }
    let mut allow_policies = applicable
        .iter()
        .filter(|p| p.spec.action == Action::Allow)
        .peekable();
    if allow_policies.peek().is_none() {
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
