use std::{os::unix::fs::PermissionsExt, sync::Barrier, thread};

use rcgen::PKCS_ECDSA_P384_SHA384;
use x509_parser::extensions::ParsedExtension;

use super::*;
use crate::identity::{
    identity_from_cert,
    testutil::{csr_for, fixture, id, new_ca},
};

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn creates_a_root_with_private_key_files() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("ca");
    let ca = CertificateAuthority::load_or_create(&dir, "cluster.local")
        .expect("a missing dir gets a new root");
    assert_eq!(mode(&dir), 0o700, "the CA dir is private");
    assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600, "the key file is 0600");
    for name in LAYOUT {
        assert!(dir.join(name).is_file(), "{name} should be written");
    }
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .expect("list CA dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temp files left behind: {leftovers:?}"
    );

    let bundle = ca.trust_bundle();
    assert_eq!(bundle.len(), 1, "one root");
    let (_, root) = X509Certificate::from_der(&bundle[0]).expect("root parses");
    assert!(root.is_ca(), "root is a CA");
    let years = (root.validity().not_after.timestamp() - root.validity().not_before.timestamp())
        / (365 * 24 * 3600);
    assert_eq!(years, 10, "root is valid for 10 years");
    assert!(
        ca.intermediates.is_empty(),
        "a self-signed root sends no intermediates"
    );
}

#[test]
fn reloading_gives_the_same_root() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let first = CertificateAuthority::load_or_create(tmp.path(), "cluster.local").expect("create");
    let second = CertificateAuthority::load_or_create(tmp.path(), "cluster.local").expect("load");
    assert_eq!(first.trust_bundle(), second.trust_bundle());
}

#[test]
fn concurrent_creators_agree_on_one_root() {
    // flock locks belong to the open file description, so threads that each open the lock
    // file contend exactly like separate processes.
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("shared");
    let barrier = Barrier::new(6);
    let bundles: Vec<_> = thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    CertificateAuthority::load_or_create(&dir, "cluster.local")
                        .expect("every concurrent creator succeeds")
                        .trust_bundle()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("creator thread did not panic"))
            .collect()
    });
    assert!(
        bundles.windows(2).all(|w| w[0] == w[1]),
        "all creators must end up with the same root"
    );
}

#[test]
fn refuses_a_partial_layout_without_touching_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cert = tmp.path().join(CA_CERT_FILE);
    fs::write(&cert, "not really").expect("write partial layout");
    let err = CertificateAuthority::load_or_create(tmp.path(), "cluster.local")
        .expect_err("a partial CA dir is an error");
    assert!(
        matches!(&err, CaError::IncompleteLayout { missing, .. } if missing.contains(&CA_KEY_FILE)),
        "expected IncompleteLayout naming {CA_KEY_FILE}, got {err}"
    );
    assert_eq!(
        fs::read_to_string(&cert).expect("still there"),
        "not really"
    );
    assert!(
        !tmp.path().join(CA_KEY_FILE).exists(),
        "nothing was created"
    );
}

#[test]
fn refuses_a_key_that_does_not_match_the_cert() {
    let a = tempfile::tempdir().expect("temp dir");
    let b = tempfile::tempdir().expect("temp dir");
    CertificateAuthority::load_or_create(a.path(), "cluster.local").expect("create a");
    CertificateAuthority::load_or_create(b.path(), "cluster.local").expect("create b");
    fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).expect("swap key");
    let err = CertificateAuthority::load_or_create(a.path(), "cluster.local")
        .expect_err("mismatched key is refused");
    assert!(matches!(err, CaError::KeyMismatch { .. }), "got {err}");
}

#[test]
fn refuses_a_ca_whose_chain_misses_the_bundle() {
    let a = tempfile::tempdir().expect("temp dir");
    let b = tempfile::tempdir().expect("temp dir");
    CertificateAuthority::load_or_create(a.path(), "cluster.local").expect("create a");
    CertificateAuthority::load_or_create(b.path(), "cluster.local").expect("create b");
    fs::copy(b.path().join(ROOT_CERT_FILE), a.path().join(ROOT_CERT_FILE)).expect("swap bundle");
    let err = CertificateAuthority::load_or_create(a.path(), "cluster.local")
        .expect_err("a CA that does not chain to root-cert.pem is refused");
    assert!(matches!(err, CaError::SelfCheck { .. }), "got {err}");
}

#[test]
fn loads_istio_rsa_cacerts_with_an_intermediate() {
    let ca = CertificateAuthority::load_or_create(&fixture("rsa-cacerts"), "cluster.local")
        .expect("Istio-style RSA cacerts (PKCS#1 key, intermediate) load");
    assert_eq!(ca.trust_bundle().len(), 1);
    assert_eq!(
        ca.intermediates.len(),
        1,
        "the intermediate is sent, the root is not"
    );

    let identity = id("cluster.local", "bookinfo", "reviews");
    let (_, csr) = csr_for(&identity);
    let issued = ca
        .sign(&csr, &identity, Duration::from_secs(3600))
        .expect("RSA CA signs");
    assert_eq!(issued.chain_der.len(), 2, "leaf + intermediate");
    let (_, leaf) = X509Certificate::from_der(&issued.chain_der[0]).expect("leaf parses");
    assert_eq!(
        leaf.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY,
        "leaves stay ECDSA even when the CA key is RSA"
    );
    assert_eq!(
        leaf.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_PKCS1_SHA256WITHRSA,
        "and are signed with the CA's RSA key"
    );
}

#[test]
fn loads_a_sec1_ec_key() {
    CertificateAuthority::load_or_create(&fixture("ec-cacerts"), "cluster.local")
        .expect("a self-signed root with an `EC PRIVATE KEY` (SEC1) loads");
}

#[test]
fn several_roots_form_the_trust_bundle() {
    let old = tempfile::tempdir().expect("temp dir");
    let new = tempfile::tempdir().expect("temp dir");
    CertificateAuthority::load_or_create(old.path(), "cluster.local").expect("create old");
    CertificateAuthority::load_or_create(new.path(), "cluster.local").expect("create new");
    let both = [
        fs::read_to_string(new.path().join(ROOT_CERT_FILE)).expect("read"),
        fs::read_to_string(old.path().join(ROOT_CERT_FILE)).expect("read"),
    ]
    .concat();
    fs::write(new.path().join(ROOT_CERT_FILE), both).expect("write bundle");
    let ca = CertificateAuthority::load_or_create(new.path(), "cluster.local")
        .expect("a bundle with two roots loads");
    assert_eq!(ca.trust_bundle().len(), 2);
}

#[test]
fn issues_spiffe_leaves() {
    let ca = new_ca("cluster.local");
    let identity = id("cluster.local", "bookinfo", "reviews");
    let (key, csr) = csr_for(&identity);
    let before = SystemTime::now();
    let issued = ca
        .sign(&csr, &identity, Duration::from_secs(3600))
        .expect("sign");
    assert_eq!(
        issued.chain_der.len(),
        1,
        "root-signed leaf needs no intermediates"
    );
    assert!(issued.chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let leaf_der = issued.leaf().expect("chain has a leaf");
    assert_eq!(identity_from_cert(leaf_der), Ok(identity.clone()));

    let (_, leaf) = X509Certificate::from_der(leaf_der).expect("leaf parses");
    assert_eq!(
        leaf.subject().iter().count(),
        0,
        "SPIFFE leaves have an empty subject"
    );
    assert!(!leaf.is_ca());
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the leaf certifies the CSR's key"
    );
    let mut saw = (false, false, false);
    for ext in leaf.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(_) => {
                assert!(ext.critical, "SAN is critical with an empty subject");
                saw.0 = true;
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(ku.digital_signature() && ku.key_encipherment());
                assert!(!ku.key_cert_sign());
                saw.1 = true;
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.server_auth && eku.client_auth);
                saw.2 = true;
            }
            _ => {}
        }
    }
    assert_eq!(saw, (true, true, true), "SAN, KU and EKU present");

    let validity = leaf.validity();
    let nb = unix_to_system(validity.not_before.timestamp());
    let na = unix_to_system(validity.not_after.timestamp());
    assert!(
        nb < before - Duration::from_secs(60),
        "not-before is backdated for skew"
    );
    assert_eq!(
        na, issued.not_after,
        "reported not_after matches the certificate"
    );
    let ttl = na
        .duration_since(before)
        .expect("not_after is in the future");
    assert!(
        ttl <= Duration::from_secs(3600) && ttl >= Duration::from_secs(3590),
        "not_after is now + ttl, got {ttl:?}"
    );
}

#[test]
fn refuses_foreign_trust_domains() {
    let ca = new_ca("cluster.local");
    let identity = id("other.domain", "ns", "sa");
    let (_, csr) = csr_for(&identity);
    let err = ca
        .sign(&csr, &identity, Duration::from_secs(60))
        .expect_err("another trust domain is refused");
    assert!(matches!(err, CaError::WrongTrustDomain { .. }), "got {err}");
}

#[test]
fn refuses_a_csr_for_another_identity() {
    let ca = new_ca("cluster.local");
    let asked = id("cluster.local", "ns", "sa");
    let (_, csr) = csr_for(&id("cluster.local", "ns", "admin"));
    let err = ca
        .sign(&csr, &asked, Duration::from_secs(60))
        .expect_err("CSR SAN must match the identity");
    assert!(
        matches!(err, CaError::CsrIdentityMismatch { .. }),
        "got {err}"
    );
}

#[test]
fn accepts_a_csr_without_sans() {
    // CSR SANs are optional: the CA sets the SAN itself.
    let ca = new_ca("cluster.local");
    let identity = id("cluster.local", "ns", "sa");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .expect("CSR without SANs");
    let issued = ca
        .sign(csr.der(), &identity, Duration::from_secs(60))
        .expect("sign");
    assert_eq!(identity_from_cert(&issued.chain_der[0]), Ok(identity));
}

#[test]
fn refuses_a_tampered_csr() {
    let ca = new_ca("cluster.local");
    let identity = id("cluster.local", "ns", "sa");
    let (_, csr) = csr_for(&identity);
    let mut bytes = csr.as_ref().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01; // inside the signature
    let err = ca
        .sign(&bytes.into(), &identity, Duration::from_secs(60))
        .expect_err("a CSR whose signature does not verify is refused");
    assert!(matches!(err, CaError::InvalidCsr { .. }), "got {err}");
}

#[test]
fn refuses_non_p256_csr_keys() {
    let ca = new_ca("cluster.local");
    let identity = id("cluster.local", "ns", "sa");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).expect("P-384 key");
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .expect("CSR");
    let err = ca
        .sign(csr.der(), &identity, Duration::from_secs(60))
        .expect_err("leaves are P-256 only");
    assert!(matches!(err, CaError::UnsupportedLeafKey), "got {err}");
}

#[test]
fn refuses_zero_ttl() {
    let ca = new_ca("cluster.local");
    let identity = id("cluster.local", "ns", "sa");
    let (_, csr) = csr_for(&identity);
    assert!(matches!(
        ca.sign(&csr, &identity, Duration::ZERO),
        Err(CaError::ZeroTtl)
    ));
}

#[test]
fn node_authorization_needs_a_pod_on_the_requesting_node() {
    let ca = new_ca("cluster.local");
    let reviews = id("cluster.local", "bookinfo", "reviews");
    let pods = [
        ("node-a", "bookinfo", "productpage"),
        ("node-b", "bookinfo", "reviews"),
        ("node-a", "other", "reviews"),
    ];
    ca.authorize("node-b", &reviews, pods)
        .expect("a reviews pod runs on node-b");
    let err = ca
        .authorize("node-a", &reviews, pods)
        .expect_err("node-a runs no bookinfo/reviews pod");
    assert!(
        matches!(&err, CaError::NotOnNode { identity, node } if *identity == reviews && node == "node-a"),
        "got {err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("spiffe://cluster.local/ns/bookinfo/sa/reviews")
            && message.contains("node-a"),
        "the error names identity and node: {message}"
    );
    let err = ca
        .authorize("node-a", &reviews, std::iter::empty::<ScheduledPod<'_>>())
        .expect_err("no pods at all");
    assert!(matches!(err, CaError::NotOnNode { .. }), "got {err}");
    let foreign = id("other.domain", "bookinfo", "reviews");
    let err = ca
        .authorize("node-b", &foreign, pods)
        .expect_err("another trust domain is refused even with a pod on the node");
    assert!(matches!(err, CaError::WrongTrustDomain { .. }), "got {err}");
}

#[test]
fn refuses_invalid_trust_domain() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let err = CertificateAuthority::load_or_create(tmp.path(), "Not A Domain")
        .expect_err("trust domain is validated");
    assert!(matches!(err, CaError::Identity(_)), "got {err}");
    assert!(!tmp.path().join(CA_KEY_FILE).exists());
}

#[test]
fn pkcs8_wrapping_handles_long_lengths() {
    // version (3) + AlgorithmIdentifier (15) + OCTET STRING header and content: 221 and 322
    // bytes, i.e. the one- and two-octet long forms of the length.
    assert_eq!(&pkcs8::wrap_rsa(&[0u8; 200])[..3], &[0x30, 0x81, 0xdd]);
    let wrapped = pkcs8::wrap_rsa(&[0u8; 300]);
    assert_eq!(&wrapped[..4], &[0x30, 0x82, 0x01, 0x42]);
    assert_eq!(wrapped.len(), 4 + 0x142);
}
