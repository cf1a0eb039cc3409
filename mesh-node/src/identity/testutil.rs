//! Helpers shared by the identity tests: throwaway CAs and workload certificates.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::PrivateKeyDer;

use super::{CertificateAuthority, Identity, WorkloadCert};

/// A fresh self-signed CA for `trust_domain` (its directory is deleted once loaded: the CA
/// lives in memory).
pub(crate) fn new_ca(trust_domain: &str) -> CertificateAuthority {
    let dir = tempfile::tempdir().expect("create a temp dir for the CA");
    CertificateAuthority::load_or_create(dir.path(), trust_domain)
        .expect("create a self-signed CA in an empty dir")
}

/// One of the committed `cacerts` fixtures (see `testdata/gen.sh`).
pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/identity/testdata")
        .join(name)
}

pub(crate) fn id(trust_domain: &str, namespace: &str, service_account: &str) -> Identity {
    Identity::new(trust_domain, namespace, service_account).expect("test identity is valid")
}

/// A CSR for `identity` (URI SAN set, as the manager sends it) and its key.
pub(crate) fn csr_for(
    identity: &Identity,
) -> (
    KeyPair,
    rustls_pki_types::CertificateSigningRequestDer<'static>,
) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate P-256 key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity.to_string().try_into().expect("SPIFFE id is IA5"),
    )];
    let csr = params.serialize_request(&key).expect("serialize CSR");
    (key, csr.der().clone())
}

/// A workload certificate through the real CSR path, valid for an hour.
pub(crate) fn workload(ca: &CertificateAuthority, identity: &Identity) -> WorkloadCert {
    let (key, csr) = csr_for(identity);
    let issued = ca
        .sign(&csr, identity, Duration::from_secs(3600))
        .expect("CA signs a CSR for its own trust domain");
    WorkloadCert {
        identity: identity.clone(),
        chain: issued.chain_der,
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        not_after: issued.not_after,
    }
}

/// A workload certificate with an arbitrary validity window and no policy checks (to mint
/// expired or foreign-trust-domain leaves from a real CA).
pub(crate) fn workload_unchecked(
    ca: &CertificateAuthority,
    identity: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> WorkloadCert {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate P-256 key");
    let issued = ca
        .issue(&key, identity, not_before, not_after)
        .expect("CA issues an unchecked leaf");
    WorkloadCert {
        identity: identity.clone(),
        chain: issued.chain_der,
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        not_after: issued.not_after,
    }
}
