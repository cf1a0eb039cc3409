//! Workload identity: SPIFFE ids, the CA that signs them, the per-workload certificates the
//! agent holds in memory, and the rustls configurations HBONE uses to present and check them.
//!
//! * [`Identity`] is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, the URI
//!   SAN of every leaf certificate (as in Istio, so ztunnel peers understand ours).
//! * [`ca::CertificateAuthority`] signs CSRs, in-process or behind `mesh-node ca`.
//! * [`manager::CertificateManager`] owns the keys and renews certificates before expiry.
//! * [`tls`] builds the mTLS server and client configurations.

use std::{fmt, str::FromStr};

use rustls_pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

pub mod ca;
pub mod manager;
#[cfg(test)]
mod testutil;
pub mod tls;

pub use ca::{CaError, CertificateAuthority, IssuedCertificate};
pub use manager::{CertState, CertificateManager, CertificateSigner, ManagerConfig, WorkloadCert};

/// Trust domain used when none is configured (Istio's default too).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";
/// SPIFFE ids are capped at 2048 bytes by the spec; refusing longer input early keeps error
/// messages (which echo the input) bounded too.
const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a SPIFFE id or a certificate's identity was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IdentityError {
    #[error("SPIFFE id {input:?} does not start with \"spiffe://\"")]
    MissingScheme { input: String },
    #[error("SPIFFE id is {len} bytes long; the limit is {MAX_SPIFFE_ID_LEN}")]
    TooLong { len: usize },
    #[error("invalid trust domain {trust_domain:?}: {reason}")]
    InvalidTrustDomain {
        trust_domain: String,
        reason: &'static str,
    },
    #[error(
        "SPIFFE id {input:?} does not have the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    InvalidPath { input: String },
    #[error("invalid {what} {value:?} in a SPIFFE id: {reason}")]
    InvalidSegment {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("certificate could not be parsed: {reason}")]
    BadCertificate { reason: String },
    #[error("certificate has no URI SAN holding a SPIFFE id")]
    NoSpiffeId,
    #[error("certificate has {count} URI SANs; a SPIFFE certificate has exactly one")]
    MultipleUriSans { count: usize },
}

/// A workload identity: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
///
/// Fields are private so every value is valid: build one with [`Identity::new`] or parse one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

// === impl Identity ===

impl Identity {
    /// Validates the three parts with the same rules as [`FromStr`].
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let id = Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        validate_trust_domain(&id.trust_domain)?;
        validate_segment("namespace", &id.namespace)?;
        validate_segment("service account", &id.service_account)?;
        // The length of `Display`'s form, without formatting it (this runs per request).
        let len = SCHEME.len()
            + id.trust_domain.len()
            + "/ns/".len()
            + id.namespace.len()
            + "/sa/".len()
            + id.service_account.len();
        if len > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong { len });
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for Identity {
    // The SPIFFE id is what people grep logs for; rustls also prints our verifier errors
    // with Debug, so this keeps handshake failures readable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    /// Strict: exactly `spiffe://<td>/ns/<ns>/sa/<sa>`, no query, fragment, port, user info,
    /// trailing slash or extra segments. An identity is an authorization principal, so two
    /// spellings of "the same" id must never both be accepted.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong { len: input.len() });
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::MissingScheme {
                input: input.to_owned(),
            })?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        validate_trust_domain(trust_domain)?;
        let invalid_path = || IdentityError::InvalidPath {
            input: input.to_owned(),
        };
        let mut segments = path.split('/');
        let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(invalid_path());
        };
        validate_segment("namespace", namespace)?;
        validate_segment("service account", service_account)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }
}

/// SPIFFE trust domain rules: lowercase letters, digits, `.`, `-`, `_`. Uppercase is refused
/// rather than folded, because a folded id would not match the certificate byte for byte.
pub(crate) fn validate_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    let invalid = |reason| IdentityError::InvalidTrustDomain {
        trust_domain: trust_domain.to_owned(),
        reason,
    };
    if trust_domain.is_empty() {
        return Err(invalid("it is empty"));
    }
    if !trust_domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(invalid(
            "only lowercase letters, digits, '.', '-' and '_' are allowed",
        ));
    }
    Ok(())
}

/// SPIFFE path segment rules (letters, digits, `.`, `-`, `_`; not `.` or `..`). Kubernetes
/// names are a subset, so every real namespace and service account passes.
fn validate_segment(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let invalid = |reason| IdentityError::InvalidSegment {
        what,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(invalid("it is empty"));
    }
    if value == "." || value == ".." {
        return Err(invalid("'.' and '..' are not allowed"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(invalid(
            "only letters, digits, '.', '-' and '_' are allowed",
        ));
    }
    Ok(())
}

/// Reads the SPIFFE id of a leaf certificate (its only URI SAN, as X.509-SVIDs require).
///
/// This does not verify the certificate: call it on a chain that rustls or webpki verified.
pub fn identity_from_cert(der: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
        IdentityError::BadCertificate {
            reason: e.to_string(),
        }
    })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate {
            reason: e.to_string(),
        })?
        .ok_or(IdentityError::NoSpiffeId)?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    // A second URI SAN would make "the" identity ambiguous, so refuse rather than pick one.
    match (uris.next(), uris.next()) {
        (Some(uri), None) if uri.starts_with(SCHEME) => uri.parse(),
        (Some(_), None) | (None, _) => Err(IdentityError::NoSpiffeId),
        (Some(_), Some(_)) => Err(IdentityError::MultipleUriSans {
            count: 2 + uris.count(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn id(s: &str) -> Result<Identity, IdentityError> {
        s.parse()
    }

    #[test]
    fn parses_and_displays_round_trip() {
        let text = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";
        let identity = id(text).expect("a well-formed SPIFFE id parses");
        assert_eq!(identity.trust_domain(), "cluster.local");
        assert_eq!(identity.namespace(), "bookinfo");
        assert_eq!(identity.service_account(), "bookinfo-reviews");
        assert_eq!(identity.to_string(), text);
        assert_eq!(
            Identity::new(DEFAULT_TRUST_DOMAIN, "bookinfo", "bookinfo-reviews"),
            Ok(identity)
        );
    }

    #[test]
    fn refuses_malformed_ids() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://", "empty trust domain"),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            ("spiffe://Cluster.local/ns/a/sa/b", "uppercase trust domain"),
            ("spiffe://cluster.local:443/ns/a/sa/b", "port"),
            ("spiffe://user@cluster.local/ns/a/sa/b", "user info"),
            ("spiffe://cluster.local", "no path"),
            ("spiffe://cluster.local/", "empty path"),
            ("spiffe://cluster.local/ns/a", "no sa"),
            ("spiffe://cluster.local/ns/a/sa/", "empty sa"),
            ("spiffe://cluster.local/ns//sa/b", "empty ns"),
            ("spiffe://cluster.local/ns/a/sa/b/", "trailing slash"),
            ("spiffe://cluster.local/ns/a/sa/b/c", "extra segment"),
            ("spiffe://cluster.local/sa/b/ns/a", "swapped"),
            ("spiffe://cluster.local/ns/../sa/b", "dot dot"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
            ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
            ("spiffe://cluster.local/ns/a%2f/sa/b", "percent encoding"),
        ];
        for (input, why) in cases {
            assert!(
                id(input).is_err(),
                "{input:?} ({why}) should be refused, got {:?}",
                id(input)
            );
        }
        let long = format!("spiffe://cluster.local/ns/a/sa/{}", "b".repeat(3000));
        assert!(matches!(id(&long), Err(IdentityError::TooLong { .. })));
    }

    #[test]
    fn the_length_limit_is_the_spiffe_ids_exactly() {
        let prefix = "spiffe://cluster.local/ns/a/sa/".len();
        let service_account = |len: usize| "b".repeat(len - prefix);
        let at_limit = Identity::new("cluster.local", "a", service_account(MAX_SPIFFE_ID_LEN))
            .expect("2048 bytes are allowed");
        assert_eq!(at_limit.to_string().len(), MAX_SPIFFE_ID_LEN);
        assert!(matches!(
            Identity::new("cluster.local", "a", service_account(MAX_SPIFFE_ID_LEN + 1)),
            Err(IdentityError::TooLong { len }) if len == MAX_SPIFFE_ID_LEN + 1
        ));
    }

    #[test]
    fn errors_name_the_problem() {
        let err = id("spiffe://cluster.local/ns/a").expect_err("missing sa is refused");
        assert!(
            err.to_string()
                .contains("/ns/<namespace>/sa/<service-account>"),
            "error should show the expected form, got: {err}"
        );
        let err = Identity::new("cluster.local", "a/b", "c").expect_err("slash is refused");
        assert!(
            err.to_string().contains("namespace"),
            "error should name the bad part, got: {err}"
        );
    }

    fn cert_with_sans(sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().expect("P-256 key generation works");
        params
            .self_signed(&key)
            .expect("self-signing a test certificate works")
            .der()
            .clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("test URI is IA5"))
    }

    #[test]
    fn reads_identity_from_uri_san() {
        let der = cert_with_sans(vec![
            SanType::DnsName("ignored.example".try_into().expect("IA5")),
            uri("spiffe://td.example/ns/ns1/sa/sa1"),
        ]);
        assert_eq!(
            identity_from_cert(&der),
            Identity::new("td.example", "ns1", "sa1")
        );
    }

    #[test]
    fn refuses_certs_without_exactly_one_spiffe_uri() {
        let none = cert_with_sans(vec![SanType::DnsName("a.example".try_into().expect("IA5"))]);
        assert_eq!(identity_from_cert(&none), Err(IdentityError::NoSpiffeId));
        let other = cert_with_sans(vec![uri("https://a.example/")]);
        assert_eq!(identity_from_cert(&other), Err(IdentityError::NoSpiffeId));
        let two = cert_with_sans(vec![
            uri("spiffe://td/ns/a/sa/b"),
            uri("spiffe://td/ns/a/sa/c"),
        ]);
        assert_eq!(
            identity_from_cert(&two),
            Err(IdentityError::MultipleUriSans { count: 2 })
        );
        assert!(matches!(
            identity_from_cert(&CertificateDer::from(vec![1, 2, 3])),
            Err(IdentityError::BadCertificate { .. })
        ));
    }

    proptest::proptest! {
        /// Any text: no panic; what parses prints back the same (one spelling per id).
        #[test]
        fn fuzz_spiffe_ids(text in "spiffe://[a-z0-9.:/_-]{0,30}/ns/[a-z0-9._/-]{0,12}/sa/[a-z0-9._%/-]{0,12}|\\PC{0,60}") {
            if let Ok(identity) = id(&text) {
                proptest::prop_assert_eq!(identity.to_string(), text);
            }
        }

        /// Valid names make valid ids, read back from a real certificate.
        #[test]
        fn fuzz_identity_from_certificates(namespace in "[a-z0-9][a-z0-9-]{0,20}", account in "[a-z0-9][a-z0-9._-]{0,20}") {
            let text = format!("spiffe://cluster.local/ns/{namespace}/sa/{account}");
            let parsed = id(&text);
            let cert = cert_with_sans(vec![uri(&text)]);
            proptest::prop_assert_eq!(identity_from_cert(&cert), parsed);
        }

        /// Arbitrary bytes as a certificate: an error, never a panic.
        #[test]
        fn fuzz_certificate_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            proptest::prop_assert!(identity_from_cert(&CertificateDer::from(bytes)).is_err());
        }
    }
}
