//! The certificates a gateway serves: Kubernetes Secrets named by a server's
//! `tls.credentialName`, in Istio's layouts, turned into rustls server configurations.
//!
//! A Secret holds the certificate chain and key as `tls.crt` / `tls.key` (type
//! `kubernetes.io/tls`) or `cert` / `key`; for MUTUAL the CA client certificates must chain
//! to as `ca.crt` (or `cacert`) in the same Secret or in `<credentialName>-cacert`.
use std::sync::Arc;

use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::{
    inventory::{ObjectKey, TlsSecret},
    routing::gateway::{ServerTls, TlsMode},
    state::State,
};

/// The Secret beside a credential that holds its CA, by Istio's convention.
const CA_SECRET_SUFFIX: &str = "-cacert";

/// One server's TLS, ready for handshakes.
#[derive(Debug)]
pub struct ServerCredential {
    pub config: Arc<ServerConfig>,
    /// The leaf's subject and expiry, for `debug gateways`.
    pub summary: String,
    /// Of the Secrets it was built from: the same Secrets give the same configuration.
    digest: u64,
}

/// Why a server's certificate cannot be served: the server then refuses handshakes.
pub type CredentialError = String;

/// Builds the TLS of a server (`tls`, with its `mode`) from its Secret in `namespace` (the
/// gateway pod's); a server that carries `http` offers h2 and http/1.1 by ALPN. `previous`
/// is reused when neither the Secrets nor that changed.
pub fn load(
    state: &State,
    namespace: &str,
    tls: &ServerTls,
    mode: TlsMode,
    http: bool,
    previous: Option<&Arc<ServerCredential>>,
) -> Result<Arc<ServerCredential>, CredentialError> {
    let name = tls.credential_name.as_deref().unwrap_or_default();
    let secret = state
        .secrets
        .get(&ObjectKey::new(namespace, name))
        .ok_or_else(|| format!("Secret {namespace}/{name} not found"))?;
    let ca_secret = state.secrets.get(&ObjectKey::new(
        namespace,
        format!("{name}{CA_SECRET_SUFFIX}"),
    ));
    let digest =
        secret.digest() ^ ca_secret.map_or(0, |s| s.digest().rotate_left(1)) ^ u64::from(http);
    if let Some(previous) = previous.filter(|p| p.digest == digest) {
        return Ok(previous.clone());
    }
    let certificate = secret
        .first(&TlsSecret::CERTIFICATE)
        .ok_or_else(|| format!("Secret {namespace}/{name} has no tls.crt (or cert)"))?;
    let key = secret
        .first(&TlsSecret::PRIVATE_KEY)
        .ok_or_else(|| format!("Secret {namespace}/{name} has no tls.key (or key)"))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(certificate)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("Secret {namespace}/{name}: tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "Secret {namespace}/{name}: tls.crt holds no certificate"
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| format!("Secret {namespace}/{name}: tls.key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("Secret {namespace}/{name}: tls.key: {e}"))?;
    let summary = summarize(&chain[0]);
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| {
        format!("Secret {namespace}/{name}: tls.key does not belong to tls.crt: {e}")
    })?;
    let versions: &[&rustls::SupportedProtocolVersion] = if tls.tls13_only() {
        &[&rustls::version::TLS13]
    } else if tls.tls12_only() {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match mode {
        TlsMode::Passthrough => {
            return Err("a PASSTHROUGH server serves no certificate of its own".into());
        }
        TlsMode::Simple => builder.with_no_client_auth(),
        TlsMode::Mutual => {
            let ca = secret
                .first(&TlsSecret::CA)
                .or_else(|| ca_secret.and_then(|s| s.first(&TlsSecret::CA)))
                .ok_or_else(|| {
                    format!(
                        "MUTUAL needs the client CA: ca.crt in Secret {namespace}/{name} or in \
                         {namespace}/{name}{CA_SECRET_SUFFIX}"
                    )
                })?;
            let mut roots = rustls::RootCertStore::empty();
            for certificate in CertificateDer::pem_slice_iter(ca) {
                let certificate =
                    certificate.map_err(|e| format!("Secret {namespace}/{name}: ca.crt: {e}"))?;
                roots
                    .add(certificate)
                    .map_err(|e| format!("Secret {namespace}/{name}: ca.crt: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("Secret {namespace}/{name}: ca.crt: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(Single(Arc::new(certified))));
    if http {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Ok(Arc::new(ServerCredential {
        config: Arc::new(config),
        summary,
        digest,
    }))
}

/// The certificate of a server: the same whatever the client asks (the server was chosen
/// by SNI before).
#[derive(Debug)]
struct Single(Arc<CertifiedKey>);

impl ResolvesServerCert for Single {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// `CN=… (DNS names), expires …` of a certificate, or what could be read of it.
fn summarize(certificate: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(certificate) {
        Ok((_, parsed)) => {
            let names: Vec<String> = parsed
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|san| {
                    san.value
                        .general_names
                        .iter()
                        .filter_map(|name| match name {
                            x509_parser::extensions::GeneralName::DNSName(dns) => {
                                Some((*dns).to_string())
                            }
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "{} [{}], expires {}",
                parsed.subject(),
                names.join(", "),
                parsed.validity().not_after
            )
        }
        Err(error) => format!("unreadable certificate: {error}"),
    }
}
