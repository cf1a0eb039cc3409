//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, both sides presenting SPIFFE
//! certificates, as Istio's ztunnel does (so the two interoperate during a migration).
//!
//! * The server requires a client chain that verifies against the trust bundle and whose
//!   SPIFFE id is in our trust domain; policy on *which* identity comes later, from
//!   [`peer_identity`].
//! * The client verifies the server's chain against the trust bundle and that its SPIFFE id is
//!   exactly the one expected for the destination workload. SPIFFE certificates carry no DNS
//!   name, so rustls' hostname-based `WebPkiServerVerifier` cannot be used.
//! * Session resumption is off on both sides: a resumed session skips certificate
//!   verification, and the client's session cache is keyed by server name (the pod IP), not
//!   by the identity we expect there. Tunnels are pooled, so full handshakes are rare anyway.

use std::{fmt, sync::Arc};

use rustls::{
    CertificateError, ClientConfig, CommonState, ConfigBuilder, DigitallySignedStruct,
    DistinguishedName, OtherError, RootCertStore, ServerConfig, SignatureScheme,
    client::{
        Resumption, WantsClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::{
        NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    version::TLS13,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{Identity, IdentityError, WorkloadCert, identity_from_cert};

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built or a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error("unusable trust bundle: {0}")]
    TrustBundle(#[from] rustls::server::VerifierBuilderError),
    #[error("trust bundle holds no usable root certificate")]
    EmptyTrustBundle,
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate: {0}")]
    PeerIdentity(#[from] IdentityError),
    #[error("peer {identity} is not in our trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: String,
    },
    // Boxed: two inline identities would make every `Result<_, TlsError>` large.
    #[error("server is {actual}, expected {expected}")]
    UnexpectedServer {
        expected: Box<Identity>,
        actual: Box<Identity>,
    },
}

/// ring, TLS 1.3 suites only (the `tls12` feature is off, so the provider has no others).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(trust_bundle: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(trust_bundle.iter().cloned());
    if added == 0 {
        return Err(TlsError::EmptyTrustBundle);
    }
    Ok(roots)
}

/// Wraps one of our errors so rustls reports it (and sends `bad_certificate`).
fn refuse(error: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// Server side of HBONE (the in-pod 15008 listener): presents `cert`, requires a client
/// certificate that chains to `trust_bundle` and carries a SPIFFE id in `cert`'s trust domain.
pub fn server_config(
    cert: &WorkloadCert,
    trust_bundle: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(trust_bundle)?),
        provider.clone(),
    )
    .build()?;
    let verifier = SpiffeClientVerifier {
        inner: webpki,
        trust_domain: cert.identity.trust_domain().to_owned(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of HBONE: presents `cert` and accepts only a server whose chain verifies
/// against `trust_bundle` and whose SPIFFE id is `expected_server`.
///
/// The server name given to the connector is not checked (pass the destination IP).
pub fn client_config(
    cert: &WorkloadCert,
    trust_bundle: &[CertificateDer<'static>],
    expected_server: Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = spiffe_client(trust_bundle, expected_server)?
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// A TLS 1.3 client that accepts only a server chaining to `trust_bundle` with the SPIFFE
/// id `expected`; the caller chooses whether to present a certificate.
fn spiffe_client(
    trust_bundle: &[CertificateDer<'static>],
    expected: Identity,
) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, TlsError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots: Arc::new(root_store(trust_bundle)?),
        expected,
        algorithms: provider.signature_verification_algorithms,
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier)))
}

/// ALPN of the CA's certificate API (`mesh-node ca`).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Server side of the CA's certificate API: presents the CA service's own certificate.
/// Agents asking for their first certificate have none to present, so no client
/// certificate is requested: they authenticate with a token instead.
pub fn ca_server_config(cert: &WorkloadCert) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_no_client_auth()
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// Client side of the CA's certificate API: accepts only a server whose chain verifies
/// against the pinned `trust_bundle` and whose SPIFFE id is `expected_ca`.
pub fn ca_client_config(
    trust_bundle: &[CertificateDer<'static>],
    expected_ca: Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = spiffe_client(trust_bundle, expected_ca)?.with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// The system's root certificates (empty when it has none), for servers outside the mesh.
pub fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    roots
}

/// A client for servers outside the mesh (JWKS endpoints, TLS origination): ring, TLS 1.3,
/// the server checked against `roots` for the name it is dialed by.
pub fn external_client_config(roots: RootCertStore) -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .expect("ring supports TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The SPIFFE id of the verified peer of an established connection (either side), refused
/// unless it is in `trust_domain`.
pub fn peer_identity(conn: &CommonState, trust_domain: &str) -> Result<Identity, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(<[_]>::first)
        .ok_or(TlsError::NoPeerCertificate)?;
    let identity = identity_from_cert(leaf)?;
    check_trust_domain(identity, trust_domain)
}

fn check_trust_domain(identity: Identity, trust_domain: &str) -> Result<Identity, TlsError> {
    if identity.trust_domain() == trust_domain {
        Ok(identity)
    } else {
        Err(TlsError::ForeignTrustDomain {
            identity,
            trust_domain: trust_domain.to_owned(),
        })
    }
}

/// webpki chain validation (with the clientAuth usage), plus: the leaf must hold a SPIFFE id
/// in our trust domain. A root shared by two meshes must not let one impersonate the other.
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

// === impl SpiffeClientVerifier ===

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity = identity_from_cert(end_entity).map_err(|e| refuse(e.into()))?;
        check_trust_domain(identity, &self.trust_domain).map_err(refuse)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Chain validation against the trust bundle (serverAuth usage, validity, signatures), then an
/// exact match of the leaf's SPIFFE id instead of a hostname check.
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Identity,
    algorithms: WebPkiSupportedAlgorithms,
}

// === impl SpiffeServerVerifier ===

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let actual = identity_from_cert(end_entity).map_err(|e| refuse(e.into()))?;
        if actual != self.expected {
            return Err(refuse(TlsError::UnexpectedServer {
                expected: Box::new(self.expected.clone()),
                actual: Box::new(actual),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
