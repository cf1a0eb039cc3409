//! Admit or refuse a connection at the destination: the proxy's own ports, PeerAuthentication
//! (mutual TLS or plaintext) and AuthorizationPolicy, decided from the state and who calls.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::{HeaderMap, Uri, header};
use mesh_common::ports;

use crate::{
    identity::Identity,
    inventory::{ObjectKey, Workload},
    policy::{ConnectionAttributes, MtlsMode, Policies, RequestAttributes, Verdict},
};

/// The body of the 403 a denied request gets, as Envoy's RBAC filter answers.
pub const ACCESS_DENIED: &str = "RBAC: access denied";

/// How much of the policy a connection is checked against when it opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// PeerAuthentication and AuthorizationPolicy: the connection's verdict is final.
    Full,
    /// PeerAuthentication only: some policy needs request attributes, so the verdict
    /// waits for the requests (or for the protocol to turn out not to be HTTP).
    MtlsOnly,
}

/// Why a connection is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} is the proxy's own listener or loopback: refused, delivering it would loop")]
    OwnListener(SocketAddr),
    #[error("plaintext refused: PeerAuthentication requires mutual TLS")]
    MtlsRequired,
    #[error("denied by authorization policy {policy}: {reason}")]
    Denied {
        policy: String,
        reason: &'static str,
    },
}

/// Who is calling, as far as the destination's side can tell.
#[derive(Clone)]
pub struct Caller {
    pub ip: IpAddr,
    /// (caller, this pod) when the connection came over mTLS.
    pub identities: Option<Arc<(Identity, Identity)>>,
    /// The caller's identity as Istio writes principals: `<td>/ns/<ns>/sa/<sa>`.
    principal: Option<String>,
    /// Plaintext that a socket of the node itself opened: kubelet's probes (and the node's
    /// host-network processes), which pass the policies as in Istio ambient
    /// (`proxy::node_probes`).
    pub from_node: bool,
    /// The client behind the proxies a gateway trusts (`--num-trusted-proxies`), when it is
    /// not `ip`: what `remoteIpBlocks` match.
    pub remote_ip: Option<IpAddr>,
}

impl Caller {
    pub fn new(ip: IpAddr, identities: Option<Arc<(Identity, Identity)>>) -> Self {
        let principal = identities.as_ref().map(|pair| {
            let id = pair.0.to_string();
            id.trim_start_matches("spiffe://").to_string()
        });
        Self {
            ip,
            identities,
            principal,
            from_node: false,
            remote_ip: None,
        }
    }

    /// The connection as the policies see it.
    pub fn attributes(&self, original: SocketAddr) -> ConnectionAttributes<'_> {
        ConnectionAttributes {
            source_ip: self.ip,
            remote_ip: self.remote_ip.unwrap_or(self.ip),
            source_principal: self.principal.as_deref(),
            source_namespace: self.identities.as_ref().map(|pair| pair.0.namespace()),
            destination_ip: original.ip(),
            destination_port: original.port(),
        }
    }
}

/// Refuses a destination that is one of the proxy's own in-pod listeners, or loopback (where
/// only the app itself can have reached the 15006 listener). Delivering there would land the
/// connection on the proxy again, which would deliver it again, until the node ran out of
/// sockets: plaintext to `<pod IP>:15006` arrives on the listener directly, and an HBONE
/// CONNECT may name any port.
pub fn refuse_own_listeners(original: SocketAddr) -> Result<(), Refused> {
    const OWN_PORTS: [u16; 3] = [ports::OUTBOUND, ports::INBOUND_PLAINTEXT, ports::HBONE];
    let ip = original.ip();
    if ip.is_loopback() || ip.is_unspecified() || OWN_PORTS.contains(&original.port()) {
        return Err(Refused::OwnListener(original));
    }
    Ok(())
}

/// Applies PeerAuthentication (unless the connection is mutual TLS) and, for a full
/// admission, AuthorizationPolicy to a connection for `workload`.
pub fn check_policy(
    policies: &Policies,
    workload: &Workload,
    attributes: &ConnectionAttributes,
    mutual_tls: bool,
    admission: Admission,
) -> Result<(), Refused> {
    if !mutual_tls && policies.mtls_mode(workload, attributes.destination_port) == MtlsMode::Strict
    {
        return Err(Refused::MtlsRequired);
    }
    if admission == Admission::MtlsOnly {
        return Ok(());
    }
    match policies.authorize(workload, attributes) {
        Verdict::Allow { .. } => Ok(()),
        Verdict::Deny { policy, reason } => Err(Refused::Denied {
            policy: policy_name(policy.as_ref()),
            reason,
        }),
    }
}

/// The policy a denial names; a default deny (ALLOW policies exist, none matched) has none.
pub fn policy_name(policy: Option<&ObjectKey>) -> String {
    policy.map_or_else(|| "(no ALLOW policy matched)".into(), ToString::to_string)
}

/// How much a connection to `workload` is checked when it opens: a workload with
/// request-level policies is admitted on its mTLS mode alone and authorized per request.
pub fn admission_for(policies: &Policies, workload: &Workload) -> Admission {
    if policies.needs_request_attributes(workload) {
        Admission::MtlsOnly
    } else {
        Admission::Full
    }
}

/// PeerAuthentication and AuthorizationPolicy for a connection of `caller` to `original` on
/// `workload`, checked as much as `admission` says ([`admission_for`] when `None`). The node's
/// own plaintext (kubelet's probes) passes, as in Istio ambient.
pub fn admit(
    policies: &Policies,
    workload: &Workload,
    caller: &Caller,
    original: SocketAddr,
    admission: Option<Admission>,
) -> Result<Admission, Refused> {
    if caller.from_node && caller.identities.is_none() {
        return Ok(Admission::Full);
    }
    let admission = admission.unwrap_or_else(|| admission_for(policies, workload));
    check_policy(
        policies,
        workload,
        &caller.attributes(original),
        caller.identities.is_some(),
        admission,
    )?;
    Ok(admission)
}

/// The Host header, or `:authority` in HTTP/2, as request policies match it.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> &'a str {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or_default()
}

/// AuthorizationPolicy for one request of `caller` to `original` on `workload`. `request`
/// carries the path as normalized ([`crate::plan::path::normalize_path`]). The node's own
/// plaintext (kubelet's probes) passes, as its connection did.
pub fn authorize_request(
    policies: &Policies,
    workload: &Workload,
    caller: &Caller,
    original: SocketAddr,
    request: &RequestAttributes,
) -> Verdict {
    if caller.from_node && caller.identities.is_none() {
        return Verdict::Allow { policy: None };
    }
    policies.authorize_request(workload, &caller.attributes(original), request)
}
