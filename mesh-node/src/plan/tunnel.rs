//! Whether a connection between two pods goes through an HBONE tunnel (mutual TLS between the
//! node proxies), and as which identities.
use crate::{
    identity::{Identity, IdentityError},
    inventory::Workload,
};

/// The SPIFFE identity of `workload` in `trust_domain`: its namespace and service account.
pub fn workload_identity(
    trust_domain: &str,
    workload: &Workload,
) -> Result<Identity, IdentityError> {
    Identity::new(
        trust_domain,
        &workload.key.namespace,
        &workload.service_account,
    )
}

/// The (source, destination) identities of a connection from the enrolled pod `source` to
/// `destination` when it goes through an HBONE tunnel: the agent has a CA (`trust_domain`)
/// and the destination is in the mesh too. `None`: it leaves in plaintext, as without a
/// mesh.
pub fn tunnel_identities(
    trust_domain: Option<&str>,
    source: &Workload,
    destination: &Workload,
) -> Result<Option<(Identity, Identity)>, IdentityError> {
    let Some(trust_domain) = trust_domain.filter(|_| destination.enrolled) else {
        return Ok(None);
    };
    Ok(Some((
        workload_identity(trust_domain, source)?,
        workload_identity(trust_domain, destination)?,
    )))
}
