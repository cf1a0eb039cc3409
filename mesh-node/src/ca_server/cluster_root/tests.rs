use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use http::Method;
use rcgen::{CertificateParams, KeyPair};
use rustls::{
    RootCertStore, client::verify_server_cert_signed_by_trust_anchor, server::ParsedCertificate,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, UnixTime};
use serde_json::{Value, json};

use super::*;
use crate::{
    ca_server::{
        certificates_from_pem,
        scripted_api::{self, Recorded},
    },
    identity::{
        Identity,
        ca::{CA_KEY_FILE, CERT_CHAIN_FILE},
    },
};

const SECRETS: &str = "/api/v1/namespaces/nodemesh-system/secrets";
const CONFIG_MAPS: &str = "/api/v1/namespaces/nodemesh-system/configmaps";

/// Istio's sample-style RSA `cacerts` (root + intermediate), committed for the CA's tests.
fn rsa_cacerts() -> Vec<(&'static str, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/identity/testdata/rsa-cacerts");
    LAYOUT
        .iter()
        .map(|key| (*key, std::fs::read(dir.join(key)).expect("fixture")))
        .collect()
}

/// What another replica would have created: a fresh root in the Secret layout.
fn another_root() -> Vec<(&'static str, Vec<u8>)> {
    let secret = generate_root_secret("nodemesh-system", "cluster.local").expect("a root");
    let data = secret.data.expect("data");
    LAYOUT
        .iter()
        .map(|key| (*key, data[*key].0.clone()))
        .collect()
}

fn secret_json(name: &str, files: &[(&str, Vec<u8>)]) -> (u16, Value) {
    let data: serde_json::Map<String, Value> = files
        .iter()
        .map(|(key, value)| ((*key).to_owned(), json!(STANDARD.encode(value))))
        .collect();
    (
        200,
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": { "name": name, "namespace": "nodemesh-system" },
            "type": "Opaque",
            "data": data,
        }),
    )
}

fn decoded(secret: &Value, key: &str) -> Vec<u8> {
    let value = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("the Secret has key {key}: {secret}"));
    STANDARD.decode(value).expect("base64")
}

fn not_found() -> (u16, Value) {
    scripted_api::status(404, "NotFound")
}

/// Echoes what was created, as the API server does.
fn created(request: &Recorded) -> (u16, Value) {
    (201, request.body.clone())
}

/// Signs a leaf with `ca` and checks it verifies up to `root_pem` and nothing else.
fn assert_signs_leaves_chaining_to(ca: &CertificateAuthority, root_pem: &[u8]) {
    let identity = Identity::new("cluster.local", "shop", "web").unwrap();
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let csr = CertificateSigningRequestDer::from(csr.der().to_vec());
    let issued = ca
        .sign(&csr, &identity, Duration::from_secs(600))
        .expect("the CA signs");
    let (leaf, intermediates) = issued.chain_der.split_first().expect("a leaf");
    let mut roots = RootCertStore::empty();
    for root in certificates_from_pem(root_pem).expect("root PEM") {
        roots.add(root).expect("a usable root");
    }
    verify_server_cert_signed_by_trust_anchor(
        &ParsedCertificate::try_from(leaf).expect("leaf parses"),
        &roots,
        intermediates,
        UnixTime::now(),
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
    )
    .expect("the leaf chains to the root in the Secret");
}

fn pem_roots(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    certificates_from_pem(pem).expect("PEM")
}

#[tokio::test]
async fn without_a_secret_a_root_is_created_with_the_four_keys_and_used() {
    let (client, requests) = scripted_api::client(|request| match request.method {
        Method::POST => created(request),
        _ => not_found(),
    });
    let (ca, source) = load_ca(client, "nodemesh-system", "cluster.local")
        .await
        .expect("a root is created");
    assert_eq!(source, RootSource::CreatedNow);

    let gets: Vec<String> = requests
        .all()
        .iter()
        .filter(|r| r.method == Method::GET)
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        gets,
        [
            format!("{SECRETS}/{USER_CA_SECRET}"),
            format!("{SECRETS}/{GENERATED_ROOT_SECRET}")
        ],
        "the user's cacerts is looked for first"
    );
    let posted = requests
        .all()
        .into_iter()
        .find(|r| r.method == Method::POST)
        .expect("the Secret was created");
    assert!(posted.path.starts_with(SECRETS), "{}", posted.path);
    assert_eq!(posted.body["metadata"]["name"], GENERATED_ROOT_SECRET);
    let mut keys: Vec<&str> = posted.body["data"]
        .as_object()
        .expect("data")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let mut expected = LAYOUT.to_vec();
    expected.sort_unstable();
    assert_eq!(keys, expected);

    let root_pem = decoded(&posted.body, ROOT_CERT_FILE);
    assert_eq!(ca.trust_bundle(), pem_roots(&root_pem));
    assert_signs_leaves_chaining_to(&ca, &root_pem);
}

#[tokio::test]
async fn the_users_cacerts_is_used_when_present() {
    let user_ca = rsa_cacerts();
    let answer = user_ca.clone();
    let (client, requests) = scripted_api::client(move |request| {
        if request
            .path
            .ends_with(&format!("/secrets/{USER_CA_SECRET}"))
        {
            secret_json(USER_CA_SECRET, &answer)
        } else {
            not_found()
        }
    });
    let (ca, source) = load_ca(client, "nodemesh-system", "cluster.local")
        .await
        .expect("cacerts loads");
    assert_eq!(source, RootSource::UserCa);
    assert_eq!(requests.all().len(), 1, "nothing else read or written");
    let root_pem = &user_ca
        .iter()
        .find(|(key, _)| *key == ROOT_CERT_FILE)
        .unwrap()
        .1;
    assert_eq!(ca.trust_bundle(), pem_roots(root_pem));
    assert_signs_leaves_chaining_to(&ca, root_pem);
}

#[tokio::test]
async fn a_malformed_cacerts_is_an_error_naming_the_key() {
    let without_chain: Vec<_> = rsa_cacerts()
        .into_iter()
        .filter(|(key, _)| *key != CERT_CHAIN_FILE)
        .collect();
    let (client, requests) =
        scripted_api::client(move |_| secret_json(USER_CA_SECRET, &without_chain));
    let error = load_ca(client, "nodemesh-system", "cluster.local")
        .await
        .expect_err("a key is missing");
    assert!(
        matches!(error, ClusterRootError::MissingKey { key, .. } if key == CERT_CHAIN_FILE),
        "{error}"
    );
    assert_eq!(
        requests.count(&Method::POST, SECRETS),
        0,
        "no other root is made"
    );

    let bad_key: Vec<_> = rsa_cacerts()
        .into_iter()
        .map(|(key, value)| {
            let value = if key == CA_KEY_FILE {
                b"not a key".to_vec()
            } else {
                value
            };
            (key, value)
        })
        .collect();
    let (client, requests) = scripted_api::client(move |_| secret_json(USER_CA_SECRET, &bad_key));
    let error = load_ca(client, "nodemesh-system", "cluster.local")
        .await
        .expect_err("the key is garbage");
    let message = format!("{error}");
    assert!(
        matches!(error, ClusterRootError::BadCa { .. })
            && message.contains(CA_KEY_FILE)
            && message.contains("nodemesh-system/cacerts"),
        "{message}"
    );
    assert_eq!(requests.count(&Method::POST, SECRETS), 0);
}

#[tokio::test]
async fn when_another_replica_creates_the_root_first_theirs_is_used() {
    let theirs = another_root();
    let answer = theirs.clone();
    let generated_reads = Arc::new(AtomicUsize::new(0));
    let (client, requests) = scripted_api::client(move |request| {
        let generated = request
            .path
            .ends_with(&format!("/secrets/{GENERATED_ROOT_SECRET}"));
        match request.method {
            Method::POST => scripted_api::status(409, "AlreadyExists"),
            // Absent when first read, there once the create has lost the race.
            Method::GET if generated && generated_reads.fetch_add(1, Ordering::SeqCst) > 0 => {
                secret_json(GENERATED_ROOT_SECRET, &answer)
            }
            _ => not_found(),
        }
    });
    let (ca, source) = load_ca(client, "nodemesh-system", "cluster.local")
        .await
        .expect("the other replica's root loads");
    assert_eq!(source, RootSource::CreatedByAnotherReplica);
    assert_eq!(requests.count(&Method::POST, SECRETS), 1);
    let their_root = &theirs
        .iter()
        .find(|(key, _)| *key == ROOT_CERT_FILE)
        .unwrap()
        .1;
    assert_eq!(ca.trust_bundle(), pem_roots(their_root));
    assert_signs_leaves_chaining_to(&ca, their_root);
}

#[tokio::test]
async fn the_trust_bundle_is_published_created_replaced_or_left_alone() {
    let ca =
        CertificateAuthority::load_or_create(tempfile::tempdir().unwrap().path(), "cluster.local")
            .unwrap();
    let name_path = format!("{CONFIG_MAPS}/{TRUST_BUNDLE_CONFIG_MAP}");

    // Absent: created.
    let (client, requests) = scripted_api::client(|request| match request.method {
        Method::POST => created(request),
        _ => not_found(),
    });
    let outcome = publish_trust_bundle(client, "nodemesh-system", &ca)
        .await
        .expect("published");
    assert_eq!(outcome, Published::Created);
    let posted = requests
        .all()
        .into_iter()
        .find(|r| r.method == Method::POST)
        .expect("created");
    assert!(posted.path.starts_with(CONFIG_MAPS), "{}", posted.path);
    assert_eq!(posted.body["metadata"]["name"], TRUST_BUNDLE_CONFIG_MAP);
    let published = posted.body["data"][ROOT_CERT_FILE]
        .as_str()
        .expect("root-cert.pem");
    assert_eq!(pem_roots(published.as_bytes()), ca.trust_bundle());

    // Holding an old root: replaced, with the version read (no blind overwrite).
    let published = published.to_owned();
    let (client, requests) = scripted_api::client(|request| match request.method {
        Method::PUT => (200, request.body.clone()),
        _ => (
            200,
            json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": { "name": TRUST_BUNDLE_CONFIG_MAP, "resourceVersion": "41" },
                "data": { ROOT_CERT_FILE: "an old root" },
            }),
        ),
    });
    let outcome = publish_trust_bundle(client, "nodemesh-system", &ca)
        .await
        .expect("published");
    assert_eq!(outcome, Published::Replaced);
    let put = requests
        .all()
        .into_iter()
        .find(|r| r.method == Method::PUT)
        .expect("replaced");
    assert!(put.path.starts_with(&name_path), "{}", put.path);
    assert_eq!(put.body["metadata"]["resourceVersion"], "41");
    assert_eq!(put.body["data"][ROOT_CERT_FILE], published.as_str());

    // Already right: nothing written.
    let (client, requests) = scripted_api::client(move |_| {
        (
            200,
            json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": { "name": TRUST_BUNDLE_CONFIG_MAP, "resourceVersion": "42" },
                "data": { ROOT_CERT_FILE: published },
            }),
        )
    });
    let outcome = publish_trust_bundle(client, "nodemesh-system", &ca)
        .await
        .expect("published");
    assert_eq!(outcome, Published::Unchanged);
    assert_eq!(requests.all().len(), 1, "only the read");
}
