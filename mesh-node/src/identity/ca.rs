//! The certificate authority: a signing certificate and key, loaded from (or created in) a
//! directory laid out like Istio's `cacerts` Secret, that turns CSRs into SPIFFE leaves.
//!
//! Layout (one layout for users' plugged-in CAs and for the root Nodemesh creates itself):
//!
//! | file             | holds                                                              |
//! |------------------|--------------------------------------------------------------------|
//! | `ca-cert.pem`    | the signing certificate (a root, or an intermediate)               |
//! | `ca-key.pem`     | its key: PKCS#8, PKCS#1 RSA or SEC1 EC                             |
//! | `cert-chain.pem` | `ca-cert.pem` and its issuers, sent with every leaf                |
//! | `root-cert.pem`  | the trust bundle: one root, or old and new root during a rotation  |

use std::{
    fmt,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nix::fcntl::{Flock, FlockArg};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls::{
    RootCertStore, client::verify_server_cert_signed_by_trust_anchor, server::ParsedCertificate,
};
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime,
    pem::PemObject,
};
use tracing::{info, warn};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::{Identity, IdentityError, validate_trust_domain};

/// The signing certificate.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The signing key. Written 0600.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The trust bundle (all roots).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The signing certificate and its issuers.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Every file of a CA directory (and every key of a CA Secret).
pub const LAYOUT: [&str; 4] = [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE];
/// Serializes creation between processes sharing a directory; flock is released by the
/// kernel when a process dies, so a crash never leaves a stale lock behind.
const LOCK_FILE: &str = ".nodemesh-ca.lock";

/// Lifetime of a root Nodemesh creates itself.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Leaves are backdated by this much so a peer whose clock runs a little behind ours does not
/// see a certificate that is "not yet valid".
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Length of an uncompressed P-256 point (0x04 || X || Y).
const P256_POINT_LEN: usize = 65;

/// Why the CA could not load, create, sign or authorize.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{} holds {present:?} but not {missing:?}: a CA directory needs all of {LAYOUT:?} (refusing to overwrite a partial CA)",
        dir.display()
    )]
    IncompleteLayout {
        dir: PathBuf,
        present: Vec<&'static str>,
        missing: Vec<&'static str>,
    },
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("{}: the key does not match the public key of {CA_CERT_FILE}", path.display())]
    KeyMismatch { path: PathBuf },
    #[error("the CA's chain does not verify against {ROOT_CERT_FILE}: {reason}")]
    SelfCheck { reason: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid CSR: {reason}")]
    InvalidCsr { reason: String },
    #[error("CSR key must be ECDSA P-256 (leaves are P-256 whatever the CA key is)")]
    UnsupportedLeafKey,
    #[error("CSR asks for {in_csr:?} but the request is for {requested}")]
    CsrIdentityMismatch { requested: Identity, in_csr: String },
    #[error("{identity} is not in this CA's trust domain {trust_domain:?}")]
    WrongTrustDomain {
        identity: Identity,
        trust_domain: String,
    },
    #[error("the CA certificate expired at {not_after:?}; plug in a renewed one")]
    CaExpired { not_after: SystemTime },
    #[error("requested certificate lifetime must be positive")]
    ZeroTtl,
    #[error("no pod with identity {identity} is scheduled on node {node:?}")]
    NotOnNode { identity: Identity, node: String },
    /// The signer returned a certificate that is not what was asked for.
    #[error("bad certificate from the CA: {reason}")]
    BadResponse { reason: String },
    /// A remote signer could not be reached; retried with backoff.
    #[error("CA unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A signed leaf, as returned to the requester.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    /// Leaf first, then the intermediates up to (not including) a trusted root.
    pub chain_der: Vec<CertificateDer<'static>>,
    /// `chain_der` as concatenated PEM, for the wire and for files.
    pub chain_pem: String,
    /// The leaf's notAfter (whole seconds, as encoded in the certificate).
    pub not_after: SystemTime,
}

impl IssuedCertificate {
    /// The leaf certificate.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.chain_der.first()
    }
}

/// Where a pod runs and under which identity; what node authorization needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduledPod<'a> {
    pub node: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
}

impl<'a> From<(&'a str, &'a str, &'a str)> for ScheduledPod<'a> {
    /// `(node, namespace, service_account)`.
    fn from((node, namespace, service_account): (&'a str, &'a str, &'a str)) -> Self {
        Self {
            node,
            namespace,
            service_account,
        }
    }
}

/// A CA that signs SPIFFE leaves for one trust domain.
pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// notAfter of the signing certificate: leaves never outlive it.
    ca_not_after: SystemTime,
    /// Sent after each leaf: `ca-cert.pem` and `cert-chain.pem` minus trusted roots.
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

// === impl CertificateAuthority ===

impl fmt::Debug for CertificateAuthority {
    // Hand-written so the signing key can never end up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("ca_not_after", &self.ca_not_after)
            .field("intermediates", &self.intermediates.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the CA in `dir` (Istio `cacerts` layout), or creates a self-signed ECDSA P-256
    /// root there if the directory holds none of the files.
    ///
    /// Several processes may call this on one directory at once: they all end up with the same
    /// root. This blocks on file I/O (and possibly on another process creating the root); call
    /// it at start-up or from `spawn_blocking`.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain)?;
        // Fast path without the lock: a user's `cacerts` is often a read-only Secret mount
        // where the lock file cannot be created. Files only ever appear whole (rename), so
        // seeing all four means the layout is complete.
        let (present, missing) = layout_state(dir)?;
        if missing.is_empty() {
            return Self::load(dir, trust_domain);
        }

        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
        {
            Ok(file) => file,
            Err(_) if !present.is_empty() => {
                return Err(CaError::IncompleteLayout {
                    dir: dir.to_owned(),
                    present,
                    missing,
                });
            }
            Err(e) => return Err(io_err(&lock_path)(e)),
        };
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_err(&lock_path)(io::Error::from(errno)))?;

        // Another process may have created the CA while we waited for the lock.
        let (present, missing) = layout_state(dir)?;
        if missing.is_empty() {
            return Self::load(dir, trust_domain);
        }
        if !present.is_empty() {
            return Err(CaError::IncompleteLayout {
                dir: dir.to_owned(),
                present,
                missing,
            });
        }
        Self::create(dir, trust_domain)?;
        Self::load(dir, trust_domain)
    }

    /// Loads a complete layout and checks it hangs together before it signs anything. Never
    /// creates anything: for roots that must exist (a Secret staged into a directory).
    pub(crate) fn load(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let roots = read_certs(&dir.join(ROOT_CERT_FILE))?;
        let ca_cert_path = dir.join(CA_CERT_FILE);
        // read_certs never returns an empty list; the extra `ok_or_else` keeps that
        // invariant from turning into a panic if it ever changes.
        let ca_cert = read_certs(&ca_cert_path)?
            .into_iter()
            .next()
            .ok_or_else(|| CaError::BadFile {
                path: ca_cert_path.clone(),
                reason: "no CERTIFICATE block".into(),
            })?;
        let chain = read_certs(&dir.join(CERT_CHAIN_FILE))?;
        let key_path = dir.join(CA_KEY_FILE);
        let key = read_key(&key_path)?;

        let bad_cert = |reason: String| CaError::BadFile {
            path: ca_cert_path.clone(),
            reason,
        };
        let (_, parsed) =
            X509Certificate::from_der(&ca_cert).map_err(|e| bad_cert(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(bad_cert(
                "not a CA certificate (basicConstraints CA:FALSE or absent)".into(),
            ));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(CaError::KeyMismatch { path: key_path });
        }
        let ca_not_after = unix_to_system(parsed.validity().not_after.timestamp());

        // Intermediates to send with each leaf. Roots are left out: the peer has them, and
        // sending them would only grow every handshake. `ca-cert.pem` goes first even when a
        // user's `cert-chain.pem` omits it, or chain building would fail at the peer.
        let mut intermediates: Vec<CertificateDer<'static>> = Vec::new();
        for cert in std::iter::once(ca_cert.clone()).chain(chain) {
            if !roots.contains(&cert) && !intermediates.contains(&cert) {
                intermediates.push(cert);
            }
        }

        let issuer =
            Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| bad_cert(e.to_string()))?;
        let ca = Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            ca_not_after,
            intermediates,
            roots,
        };
        ca.self_check()?;
        info!(
            dir = %dir.display(),
            trust_domain,
            roots = ca.roots.len(),
            intermediates = ca.intermediates.len(),
            "certificate authority loaded"
        );
        Ok(ca)
    }

    /// Issues a throwaway leaf and verifies it the way a peer will. This catches a CA whose
    /// chain does not reach `root-cert.pem`, an expired CA, or an issuer name rcgen re-encodes
    /// differently from the CA certificate (webpki matches names byte for byte) at start-up,
    /// instead of as handshake failures later.
    fn self_check(&self) -> Result<(), CaError> {
        let self_check = |reason: String| CaError::SelfCheck { reason };
        let probe_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let probe_id = Identity::new(&self.trust_domain, "nodemesh-ca-self-check", "probe")?;
        let now = SystemTime::now();
        let issued = self.issue(
            &probe_key,
            &probe_id,
            now - CLOCK_SKEW_ALLOWANCE,
            now + Duration::from_secs(60),
        )?;
        let (leaf, intermediates) = issued
            .chain_der
            .split_first()
            .ok_or_else(|| self_check("empty chain".into()))?;
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store
                .add(root.clone())
                .map_err(|e| self_check(format!("unusable root: {e}")))?;
        }
        let parsed = ParsedCertificate::try_from(leaf).map_err(|e| self_check(e.to_string()))?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &store,
            intermediates,
            UnixTime::now(),
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
        )
        .map_err(|e| self_check(e.to_string()))
    }

    /// Creates a new self-signed root and writes the layout, each file atomically.
    fn create(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        // O = trust domain, as istiod's self-signed root does; it tells operators which mesh a
        // root belongs to.
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        // A random tag tells roots apart in `openssl x509` output during a rotation, and keeps
        // verifiers from mistaking one mesh's root for another's issuer (a shared name makes
        // webpki report "bad signature" instead of "unknown issuer").
        let tag: [u8; 4] = rand::random();
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Nodemesh root CA {tag}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
        params.not_after = (now + ROOT_VALIDITY).into();
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();

        // The key goes first and ca-cert.pem last: a reader that does not take the lock only
        // trusts a directory holding all four files, so it can never see a cert without key.
        write_atomic(dir, CA_KEY_FILE, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(dir, ROOT_CERT_FILE, cert_pem.as_bytes(), 0o644)?;
        write_atomic(dir, CERT_CHAIN_FILE, cert_pem.as_bytes(), 0o644)?;
        write_atomic(dir, CA_CERT_FILE, cert_pem.as_bytes(), 0o644)?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
        info!(dir = %dir.display(), trust_domain, "created a new self-signed root CA");
        Ok(())
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// All trusted roots (`root-cert.pem`): more than one while a root rotation overlaps.
    pub fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }

    /// Node authorization, as Istio's CA does for ztunnel: a node agent may only obtain
    /// certificates for identities of pods scheduled on its own node. `pods` is every pod the
    /// CA knows of (from the file source now, a kube reflector later).
    pub fn authorize<'a, I>(
        &self,
        requester_node: &str,
        identity: &Identity,
        pods: I,
    ) -> Result<(), CaError>
    where
        I: IntoIterator,
        I::Item: Into<ScheduledPod<'a>>,
    {
        self.check_trust_domain(identity)?;
        let on_node = pods
            .into_iter()
            .map(Into::into)
            .any(|pod: ScheduledPod<'_>| {
                pod.node == requester_node
                    && pod.namespace == identity.namespace()
                    && pod.service_account == identity.service_account()
            });
        if on_node {
            Ok(())
        } else {
            Err(CaError::NotOnNode {
                identity: identity.clone(),
                node: requester_node.to_owned(),
            })
        }
    }

    /// Signs a leaf for `identity` valid for `ttl` (capped at the CA's own expiry).
    ///
    /// The CSR proves the requester holds the private key (its signature is verified); its
    /// subject and extensions are otherwise ignored and we set our own, because what a leaf
    /// may say is decided by the CA (trust domain here, node authorization in
    /// [`authorize`](Self::authorize)), never by the requester. A CSR that does carry URI SANs
    /// must name exactly `identity`, so an agent asking for one thing while meaning another
    /// fails loudly instead of getting a surprising certificate.
    pub fn sign(
        &self,
        csr_der: &CertificateSigningRequestDer<'_>,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        self.check_trust_domain(identity)?;
        if ttl.is_zero() {
            return Err(CaError::ZeroTtl);
        }
        // rcgen refuses CSRs with extensions it does not model (anything but SAN, key usage,
        // EKU and basic constraints) with `UnsupportedExtension`; Istio's and ztunnel's CSRs
        // carry only a SAN, so that is fine for peers we know.
        let csr = CertificateSigningRequestParams::from_der(csr_der).map_err(|e| {
            CaError::InvalidCsr {
                reason: e.to_string(),
            }
        })?;
        // rcgen derives the key algorithm from the CSR's *signature* algorithm, so a P-384 key
        // signing with SHA-256 would pass as "P-256"; the point length tells them apart.
        let raw = csr.public_key.der_bytes();
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256
            || raw.len() != P256_POINT_LEN
            || raw.first() != Some(&0x04)
        {
            return Err(CaError::UnsupportedLeafKey);
        }
        let expected = identity.to_string();
        for san in &csr.params.subject_alt_names {
            if let SanType::URI(uri) = san
                && uri.as_str() != expected
            {
                return Err(CaError::CsrIdentityMismatch {
                    requested: identity.clone(),
                    in_csr: uri.as_str().to_owned(),
                });
            }
        }
        let now = SystemTime::now();
        // An expired CA would hand out leaves that are dead on arrival (they are capped at
        // its notAfter); say so instead.
        if self.ca_not_after <= now {
            return Err(CaError::CaExpired {
                not_after: self.ca_not_after,
            });
        }
        let not_after = now.checked_add(ttl).unwrap_or(self.ca_not_after);
        self.issue(
            &csr.public_key,
            identity,
            now - CLOCK_SKEW_ALLOWANCE,
            not_after,
        )
    }

    fn check_trust_domain(&self, identity: &Identity) -> Result<(), CaError> {
        if identity.trust_domain() == self.trust_domain {
            Ok(())
        } else {
            Err(CaError::WrongTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
            })
        }
    }

    /// Builds and signs the leaf. No policy checks: callers do them (tests use this directly
    /// to mint expired or foreign-trust-domain leaves).
    pub(crate) fn issue(
        &self,
        public_key: &impl PublicKeyData,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        // X.509 times have whole seconds; truncate here so `not_after` reports exactly what the
        // certificate says.
        let not_after = truncate_to_secs(not_after.min(self.ca_not_after));
        let mut params = CertificateParams::default();
        // SPIFFE leaves carry no subject (rcgen's default has a CN); with an empty subject
        // rcgen marks the SAN critical, as RFC 5280 requires.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // Lets verifiers pick the right issuer when old and new roots share a name.
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let leaf = params.signed_by(public_key, &self.issuer)?;

        let mut chain_pem = leaf.pem();
        let mut chain_der = vec![leaf.der().clone()];
        for cert in &self.intermediates {
            chain_pem.push_str(&to_pem(cert));
            chain_der.push(cert.clone());
        }
        Ok(IssuedCertificate {
            chain_der,
            chain_pem,
            not_after,
        })
    }
}

/// Which layout files exist in `dir` (a missing dir has none).
fn layout_state(dir: &Path) -> Result<(Vec<&'static str>, Vec<&'static str>), CaError> {
    let mut present = Vec::new();
    let mut missing = Vec::new();
    for name in LAYOUT {
        let path = dir.join(name);
        match fs::metadata(&path) {
            Ok(_) => present.push(name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(name),
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Ok((present, missing))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::BadFile {
            path: path.to_owned(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CaError::BadFile {
            path: path.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Reads a CA key in any of the encodings `openssl` and Istio's tooling write.
///
/// rcgen with the ring backend only loads PKCS#8, while Istio's sample `ca-key.pem` is PKCS#1
/// ("RSA PRIVATE KEY") and `openssl ecparam` writes SEC1 ("EC PRIVATE KEY"), so those are
/// re-wrapped into PKCS#8 first.
fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let bad = |reason: String| CaError::BadFile {
        path: path.to_owned(),
        reason,
    };
    let bytes = fs::read(path).map_err(io_err(path))?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| bad(format!("bad PEM: {e}")))?;
    let candidates: Vec<Vec<u8>> = match &key {
        PrivateKeyDer::Pkcs8(der) => vec![der.secret_pkcs8_der().to_vec()],
        PrivateKeyDer::Pkcs1(der) => vec![pkcs8::wrap_rsa(der.secret_pkcs1_der())],
        // SEC1 does not always name its curve in a way ring reads back, so try the curves
        // ring can sign with; ring checks the inner curve and rejects a wrong guess.
        PrivateKeyDer::Sec1(der) => pkcs8::EC_CURVES
            .iter()
            .map(|curve| pkcs8::wrap_ec(curve, der.secret_sec1_der()))
            .collect(),
        _ => return Err(bad("unsupported private key encoding".into())),
    };
    candidates
        .into_iter()
        .find_map(|der| {
            KeyPair::try_from(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))).ok()
        })
        .ok_or_else(|| bad("key is not RSA (2048-8192 bits), ECDSA P-256/P-384 or Ed25519".into()))
}

/// Writes `name` in `dir` so that it appears whole or not at all: a temp file, fsync, rename.
fn write_atomic(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    // A leftover from a crashed run may have other permissions; `mode` applies only on
    // creation, so remove it rather than reuse it.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

fn to_pem(cert: &CertificateDer<'_>) -> String {
    // LF line endings like rcgen's leaf PEM (the pem crate defaults to CRLF), so the chain is
    // uniform.
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", cert.as_ref()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn random_serial() -> SerialNumber {
    // 128 random bits (RFC 5280 allows up to 20 octets); the top bit is cleared so the
    // INTEGER stays positive without a padding byte.
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn truncate_to_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => UNIX_EPOCH,
    }
}

fn unix_to_system(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    }
}

// === impl CertificateSigner for the in-process CA ===

impl super::CertificateSigner for CertificateAuthority {
    fn sign<'a>(
        &'a self,
        csr_der: CertificateSigningRequestDer<'static>,
        identity: &'a Identity,
        ttl: Duration,
    ) -> futures::future::BoxFuture<'a, Result<IssuedCertificate, CaError>> {
        // Signing is CPU work of a millisecond or so (more for a 4096-bit RSA CA key), done
        // once per identity per half-life: not worth a blocking-pool hop.
        let result = CertificateAuthority::sign(self, &csr_der, identity, ttl);
        if let Err(e) = &result {
            warn!(%identity, error = %e, "in-process CA refused to sign");
        }
        Box::pin(std::future::ready(result))
    }
}

/// Just enough DER to wrap PKCS#1 and SEC1 keys into PKCS#8 (RFC 5208) for ring.
mod pkcs8 {
    /// rsaEncryption (1.2.840.113549.1.1.1).
    const RSA_OID: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
    ];
    const NULL: &[u8] = &[0x05, 0x00];
    /// id-ecPublicKey (1.2.840.10045.2.1).
    const EC_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    /// prime256v1 (1.2.840.10045.3.1.7) and secp384r1 (1.3.132.0.34): the curves ring signs with.
    pub(super) const EC_CURVES: [&[u8]; 2] = [
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
        &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
    ];

    pub(super) fn wrap_rsa(pkcs1: &[u8]) -> Vec<u8> {
        wrap(&[RSA_OID, NULL].concat(), pkcs1)
    }

    pub(super) fn wrap_ec(curve: &[u8], sec1: &[u8]) -> Vec<u8> {
        wrap(&[EC_OID, curve].concat(), sec1)
    }

    /// PrivateKeyInfo ::= SEQUENCE { version INTEGER 0, AlgorithmIdentifier, OCTET STRING }
    fn wrap(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
        let body = [
            &[0x02, 0x01, 0x00][..],
            &tlv(0x30, algorithm),
            &tlv(0x04, key),
        ]
        .concat();
        tlv(0x30, &body)
    }

    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let len = content.len();
        let mut out = vec![tag];
        if let Ok(short) = u8::try_from(len)
            && short < 0x80
        {
            out.push(short);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            let long = &bytes[skip..];
            // At most size_of::<usize>() = 8 length octets, so this never truncates.
            out.push(0x80 | u8::try_from(long.len()).unwrap_or(8));
            out.extend_from_slice(long);
        }
        out.extend_from_slice(content);
        out
    }
}

#[cfg(test)]
mod tests;
