//! `PeerAuthentication`: which inbound connections must be mutual TLS.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Policies, Policy, WorkloadSelector, applies};
use crate::inventory::Workload;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the less specific policy.
    #[default]
    Unset,
    /// Plaintext only: HBONE is still accepted, as Istio's ztunnel does.
    Disable,
    /// mTLS and plaintext.
    Permissive,
    /// mTLS only: plaintext inbound is refused.
    Strict,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

/// `spec` of a PeerAuthentication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<Mtls>,
    /// Per-port overrides; Istio honours them only on policies with a selector.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<u16, Mtls>,
    /// Set on the stand-in for a policy that could not be read ([`Self::fail_closed`]):
    /// it makes its selection STRICT whatever any other policy says.
    #[serde(skip_deserializing, skip_serializing_if = "std::ops::Not::not")]
    pub fail_closed: bool,
}

impl PeerAuthenticationSpec {
    /// What a PeerAuthentication that cannot be read (`spec` failed to parse) is enforced
    /// as: STRICT for its selection, as Istio fails closed. A selector that cannot be read
    /// widens the selection to the policy's whole namespace.
    pub fn fail_closed(spec: &serde_yaml::Value) -> Self {
        let selector = spec
            .get("selector")
            .and_then(|s| serde_yaml::from_value::<WorkloadSelector>(s.clone()).ok());
        Self {
            selector,
            mtls: Some(Mtls {
                mode: MtlsMode::Strict,
            }),
            port_level_mtls: BTreeMap::new(),
            fail_closed: true,
        }
    }

    fn mode(&self) -> MtlsMode {
        self.mtls.map(|m| m.mode).unwrap_or_default()
    }
}

pub(super) fn resolve(policies: &Policies, workload: &Workload, port: u16) -> MtlsMode {
    let root = policies.root_namespace.as_str();
    let applicable = |p: &&Policy<PeerAuthenticationSpec>| {
        applies(&p.key.namespace, p.spec.selector.as_ref(), workload, root)
    };
    // Policies are kept in name order, so "the first" is deterministic when several
    // would tie (Istio picks the oldest; a file has no creation time).
    let mut with_selector = None;
    let mut namespace_wide = None;
    let mut mesh_wide = None;
    for policy in policies.peer_authentications.iter().filter(applicable) {
        let slot = match (&policy.spec.selector, policy.key.namespace == root) {
            (Some(_), _) if policy.key.namespace == workload.key.namespace => &mut with_selector,
            (Some(_), _) => continue, // selectors in the root namespace are not mesh-wide
            (None, false) => &mut namespace_wide,
            (None, true) => &mut mesh_wide,
        };
        if policy.spec.fail_closed {
            return MtlsMode::Strict;
        }
        slot.get_or_insert(policy);
    }
    let port_level = with_selector
        .and_then(|p| p.spec.port_level_mtls.get(&port))
        .map(|m| m.mode);
    [
        port_level,
        with_selector.map(|p| p.spec.mode()),
        namespace_wide.map(|p| p.spec.mode()),
        mesh_wide.map(|p| p.spec.mode()),
    ]
    .into_iter()
    .flatten()
    .find(|mode| *mode != MtlsMode::Unset)
    .unwrap_or(MtlsMode::Permissive)
}
