//! The certificates a gateway serves: Kubernetes Secrets named by a server's
//! `tls.credentialName`, in Istio's layouts, turned into rustls server configurations.
//!
//! A Secret holds the certificate chain and key as `tls.crt` / `tls.key` (type
//! `kubernetes.io/tls`) or `cert` / `key`; for MUTUAL the CA client certificates must chain
//! to as `ca.crt` (or `cacert`) in the same Secret or in `<credentialName>-cacert`.
use std::{collections::BTreeMap, fmt, sync::Arc};

use bytes::Bytes;
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;

use crate::{
    config::core::Meta,
    gateway::resource::{ServerTls, TlsMode},
    inventory::ObjectKey,
    state::State,
};

/// The keys of a Secret a gateway reads; every other key is dropped as it is parsed.
const CERTIFICATE_KEYS: [&str; 2] = ["tls.crt", "cert"];
const PRIVATE_KEY_KEYS: [&str; 2] = ["tls.key", "key"];
const CA_KEYS: [&str; 2] = ["ca.crt", "cacert"];
/// The Secret beside a credential that holds its CA, by Istio's convention.
const CA_SECRET_SUFFIX: &str = "-cacert";

/// A Secret as the API server or a YAML file gives it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretDocument {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    data: Option<BTreeMap<String, k8s_openapi::ByteString>>,
    #[serde(default)]
    string_data: Option<BTreeMap<String, String>>,
}

/// What the mesh keeps of a Secret: only the entries a gateway's TLS reads.
#[derive(Clone)]
pub struct TlsSecret {
    pub key: ObjectKey,
    entries: BTreeMap<&'static str, Bytes>,
}

/// Never the key material, in logs or debug output.
impl fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSecret")
            .field("key", &self.key)
            .field("entries", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TlsSecret {
    pub fn from_document(document: SecretDocument) -> Self {
        let key = ObjectKey::new(
            document
                .metadata
                .namespace
                .unwrap_or_else(|| "default".into()),
            document.metadata.name.unwrap_or_default(),
        );
        let wanted = |name: &str| {
            CERTIFICATE_KEYS
                .iter()
                .chain(&PRIVATE_KEY_KEYS)
                .chain(&CA_KEYS)
                .find(|k| **k == name)
                .copied()
        };
        let mut entries = BTreeMap::new();
        for (name, value) in document.data.into_iter().flatten() {
            if let Some(name) = wanted(&name) {
                entries.insert(name, Bytes::from(value.0));
            }
        }
        // `stringData` wins, as the API server merges it over `data`.
        for (name, value) in document.string_data.into_iter().flatten() {
            if let Some(name) = wanted(&name) {
                entries.insert(name, Bytes::from(value));
            }
        }
        Self { key, entries }
    }

    fn first(&self, names: &[&'static str]) -> Option<&Bytes> {
        names.iter().find_map(|name| self.entries.get(name))
    }

    /// A fingerprint of what it holds: a server's TLS is built again only when it changes.
    fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.entries.hash(&mut hasher);
        hasher.finish()
    }
}

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
/// gateway pod's). `previous` is reused when the Secrets did not change.
pub fn load(
    state: &State,
    namespace: &str,
    tls: &ServerTls,
    mode: TlsMode,
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
    let digest = secret.digest() ^ ca_secret.map_or(0, |s| s.digest().rotate_left(1));
    if let Some(previous) = previous.filter(|p| p.digest == digest) {
        return Ok(previous.clone());
    }
    let certificate = secret
        .first(&CERTIFICATE_KEYS)
        .ok_or_else(|| format!("Secret {namespace}/{name} has no tls.crt (or cert)"))?;
    let key = secret
        .first(&PRIVATE_KEY_KEYS)
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
        TlsMode::Simple => builder.with_no_client_auth(),
        TlsMode::Mutual => {
            let ca = secret
                .first(&CA_KEYS)
                .or_else(|| ca_secret.and_then(|s| s.first(&CA_KEYS)))
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
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
