//! Istio's security policies as the node proxy enforces them: `PeerAuthentication` (is
//! plaintext allowed?), `RequestAuthentication` (which end-user JWTs does a workload
//! accept?) and `AuthorizationPolicy` (may this peer connect, and, where the proxy sees
//! HTTP, may it make this request?).
//!
//! The resources are the ones Istio users already have (security.istio.io v1 and v1beta1);
//! their semantics follow Istio's: the most specific PeerAuthentication wins; DENY
//! policies are checked first, then ALLOW; with no ALLOW policy everything is allowed, and
//! with ALLOW policies a connection (or request) must match one of them.
mod authorization;
pub mod jwt;
mod peer_authentication;
mod request_authentication;

use std::collections::BTreeMap;

pub use authorization::{
    Action, AuthorizationPolicySpec, Condition, Operation, PolicyError, Rule, RuleFrom, RuleTo,
    Source,
};
pub use peer_authentication::{Mtls, MtlsMode, PeerAuthenticationSpec};
pub use request_authentication::{
    ClaimToHeader, DEFAULT_JWKS_FETCH_TIMEOUT, JwtHeader, JwtRule, RemoteJwks,
    RequestAuthenticationError, RequestAuthenticationSpec,
};
use serde::{Deserialize, Serialize};

use crate::inventory::{ObjectKey, Workload};

/// Namespace whose selector-less policies apply to the whole mesh (Istio's root namespace).
pub const DEFAULT_ROOT_NAMESPACE: &str = "nodemesh-system";

/// `selector.matchLabels`, as Istio's policies carry it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    fn matches(&self, workload: &Workload) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| workload.labels.get(k) == Some(v))
    }
}

/// A named policy resource of kind `S`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Policy<S> {
    pub key: ObjectKey,
    pub spec: S,
}

/// Whether a policy in `namespace` with `selector` applies to `workload`: policies in the
/// workload's own namespace, or in the root namespace (mesh-wide).
fn applies(
    namespace: &str,
    selector: Option<&WorkloadSelector>,
    workload: &Workload,
    root_namespace: &str,
) -> bool {
    (namespace == workload.key.namespace || namespace == root_namespace)
        && selector.is_none_or(|s| s.matches(workload))
}

/// Everything the policies may look at for one connection.
#[derive(Clone, Debug)]
pub struct ConnectionAttributes<'a> {
    pub source_ip: std::net::IpAddr,
    /// The client as the proxy trusts it (`remoteIpBlocks`): the source, except at a gateway
    /// behind trusted proxies (`--num-trusted-proxies`), where it is the address they saw.
    pub remote_ip: std::net::IpAddr,
    /// The verified peer identity as Istio writes principals: `<td>/ns/<ns>/sa/<sa>`;
    /// `None` for plaintext.
    pub source_principal: Option<&'a str>,
    /// The source namespace, known only from a verified identity.
    pub source_namespace: Option<&'a str>,
    pub destination_ip: std::net::IpAddr,
    pub destination_port: u16,
}

/// What the policies may look at for one HTTP request (at the destination's proxy).
#[derive(Clone, Copy, Debug)]
pub struct RequestAttributes<'a> {
    pub method: &'a str,
    /// The path only, without the query, as sent: Istio normalizes nothing here.
    pub path: &'a str,
    /// The Host header, or `:authority` in HTTP/2.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
    /// What the request's validated JWT tells (RequestAuthentication); `None` without one.
    pub auth: Option<&'a jwt::RequestAuth>,
}

/// The outcome of authorization, with the policy that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow {
        policy: Option<ObjectKey>,
    },
    Deny {
        policy: Option<ObjectKey>,
        reason: &'static str,
    },
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
}

/// The policies of the mesh, as the translation hands them to the proxy.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Policies {
    pub root_namespace: String,
    pub peer_authentications: Vec<Policy<PeerAuthenticationSpec>>,
    pub authorization_policies: Vec<Policy<AuthorizationPolicySpec>>,
    pub request_authentications: Vec<Policy<RequestAuthenticationSpec>>,
}

impl Policies {
    /// The mTLS mode in force for `workload` on `port`. Istio's precedence: workload
    /// selector (port level first), then namespace, then mesh; `PERMISSIVE` by default.
    pub fn mtls_mode(&self, workload: &Workload, port: u16) -> MtlsMode {
        peer_authentication::resolve(self, workload, port)
    }

    /// Whether a connection to `workload` is allowed, and by which policy.
    /// Judged when the connection opens, before any request: rules that need request
    /// attributes fail closed (see `authorization`).
    pub fn authorize(&self, workload: &Workload, connection: &ConnectionAttributes) -> Verdict {
        authorization::evaluate(self, workload, connection, None)
    }

    /// Full evaluation (L4 + request attributes, the validated JWT among them) for one
    /// request; same DENY-then-ALLOW order as [`authorize`](Self::authorize).
    pub fn authorize_request(
        &self,
        workload: &Workload,
        connection: &ConnectionAttributes,
        request: &RequestAttributes,
    ) -> Verdict {
        authorization::evaluate(self, workload, connection, Some(request))
    }

    /// Whether any AuthorizationPolicy applying to `workload` has rules needing request
    /// attributes: then a connection's verdict must wait for its requests, since at L4
    /// such rules can only fail closed.
    pub fn needs_request_attributes(&self, workload: &Workload) -> bool {
        authorization::needs_request(self, workload)
    }

    /// The RequestAuthentications that apply to `workload`: their rules together say which
    /// tokens its requests may carry.
    pub fn request_authentications(&self, workload: &Workload) -> Vec<&RequestAuthenticationSpec> {
        self.request_authentications
            .iter()
            .filter(|p| {
                applies(
                    &p.key.namespace,
                    p.spec.selector.as_ref(),
                    workload,
                    &self.root_namespace,
                )
            })
            .map(|p| &p.spec)
            .collect()
    }

    /// The key sets the RequestAuthentications of `workloads` fetch: what an agent keeps
    /// fresh for the pods of its node, whose requests its proxy validates.
    pub fn remote_jwks<'w>(
        &self,
        workloads: impl IntoIterator<Item = &'w Workload>,
    ) -> std::collections::BTreeSet<RemoteJwks> {
        workloads
            .into_iter()
            .flat_map(|workload| self.request_authentications(workload))
            .flat_map(|spec| &spec.jwt_rules)
            .filter_map(JwtRule::remote_jwks)
            .collect()
    }
}

#[cfg(test)]
mod tests;
