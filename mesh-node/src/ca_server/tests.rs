use std::{net::SocketAddr, path::PathBuf};

use serde_json::json;

use super::*;
use crate::{
    ca_server::{
        scripted_api::{self, AGENT_USERNAME},
        token_review::{NODE_NAME_EXTRA, TokenReviewAuthenticator},
    },
    identity::{CertificateSigner, identity_from_cert, tls},
    inventory::Workload,
    signer::{CaAddress, RemoteSigner},
    state::State,
};

/// The services' `--max-cert-ttl`.
const MAX_CERT_TTL: Duration = Duration::from_secs(3600);

/// A CA service on loopback that knows `web` runs on node-a and `db` on node-b.
struct Running {
    addr: SocketAddr,
    roots: Vec<CertificateDer<'static>>,
    shutdown: CancellationToken,
    /// Keeps the state alive while the service runs.
    _state: tokio::sync::watch::Sender<Arc<State>>,
}

async fn service(dir: &Path) -> Running {
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "# node token\nnode-a token-a\nnode-b token-b\n").unwrap();
    service_with(dir, Arc::new(TokenFile::load(&tokens).unwrap())).await
}

async fn service_with(dir: &Path, authenticator: Arc<dyn Authenticator>) -> Running {
    let ca = CertificateAuthority::load_or_create(&dir.join("ca"), "cluster.local").unwrap();
    let roots = ca.trust_bundle();
    let state = State::with_workloads([
        Workload::for_test("node-a", "shop", "web", &[]),
        Workload::for_test("node-b", "shop", "db", &[]),
    ]);
    let (state_tx, rx) = tokio::sync::watch::channel(Arc::new(state));
    let identity = ca_identity("cluster.local", "nodemesh-system").unwrap();
    let tls = tls::ca_server_config(&serving_certificate(&ca, &identity).unwrap()).unwrap();
    let service = Arc::new(CaService {
        ca: Arc::new(ca),
        authenticator,
        state: rx,
        max_cert_ttl: MAX_CERT_TTL,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(service.serve(listener, tls, shutdown.clone()));
    Running {
        addr,
        roots,
        shutdown,
        _state: state_tx,
    }
}

/// A client of the service whose token file (in `dir`) holds `token`.
fn signer(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    dir: &Path,
    token: &str,
) -> RemoteSigner {
    let expected = ca_identity("cluster.local", "nodemesh-system").unwrap();
    let token_file = token_file(dir, token);
    RemoteSigner {
        addr: CaAddress {
            host: addr.ip().to_string(),
            port: addr.port(),
        },
        tls: tls::ca_client_config(roots, expected).unwrap(),
        token_file,
    }
}

fn token_file(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join(format!("token-{token}"));
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

fn csr() -> CertificateSigningRequestDer<'static> {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    CertificateSigningRequestDer::from(csr.der().to_vec())
}

#[tokio::test]
async fn signs_for_pods_of_the_token_s_node_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let Running {
        addr,
        roots,
        shutdown,
        ..
    } = service(dir.path()).await;
    let ttl = Duration::from_secs(600);
    let web = Identity::new("cluster.local", "shop", "web").unwrap();
    let db = Identity::new("cluster.local", "shop", "db").unwrap();

    let node_a = signer(addr, &roots, dir.path(), "token-a");
    let issued = node_a
        .sign(csr(), &web, ttl)
        .await
        .expect("web runs on node-a");
    let leaf = issued.leaf().expect("a leaf");
    assert_eq!(identity_from_cert(leaf).unwrap(), web);
    assert!(issued.not_after > SystemTime::now());

    let refused = node_a.sign(csr(), &db, ttl).await.unwrap_err().to_string();
    assert!(
        refused.contains("403") && refused.contains("node-a"),
        "{refused}"
    );

    let stranger = signer(addr, &roots, dir.path(), "no-such-token");
    let refused = stranger
        .sign(csr(), &web, ttl)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("401"), "{refused}");
    shutdown.cancel();
}

#[tokio::test]
async fn the_ca_caps_the_lifetime_an_agent_asks_for() {
    let dir = tempfile::tempdir().unwrap();
    let Running {
        addr,
        roots,
        shutdown,
        ..
    } = service(dir.path()).await;
    let web = Identity::new("cluster.local", "shop", "web").unwrap();
    let node_a = signer(addr, &roots, dir.path(), "token-a");
    let ten_years = Duration::from_secs(10 * 365 * 24 * 3600);
    let issued = node_a.sign(csr(), &web, ten_years).await.expect("signed");
    let lifetime = issued
        .not_after
        .duration_since(SystemTime::now())
        .expect("not yet expired");
    assert!(
        lifetime <= MAX_CERT_TTL,
        "asked for ten years, got {lifetime:?}: more than --max-cert-ttl {MAX_CERT_TTL:?}"
    );
    assert!(
        lifetime > MAX_CERT_TTL / 2,
        "but the cap itself: {lifetime:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn agents_reach_the_ca_by_dns_name() {
    let dir = tempfile::tempdir().unwrap();
    let Running {
        addr,
        roots,
        shutdown,
        ..
    } = service(dir.path()).await;
    let mut by_name = signer(addr, &roots, dir.path(), "token-a");
    // The name is resolved at connection time; the CA is still checked by its SPIFFE id.
    by_name.addr = CaAddress::parse(&format!("https://localhost:{}", addr.port())).unwrap();
    let web = Identity::new("cluster.local", "shop", "web").unwrap();
    by_name
        .sign(csr(), &web, Duration::from_secs(600))
        .await
        .expect("signed through the name");
    shutdown.cancel();
}

#[tokio::test]
async fn agents_refuse_a_ca_that_is_not_the_pinned_one() {
    let dir = tempfile::tempdir().unwrap();
    let Running { addr, shutdown, .. } = service(dir.path()).await;
    let other = tempfile::tempdir().unwrap();
    let other_roots = CertificateAuthority::load_or_create(other.path(), "cluster.local")
        .unwrap()
        .trust_bundle();
    let web = Identity::new("cluster.local", "shop", "web").unwrap();
    let error = signer(addr, &other_roots, dir.path(), "token-a")
        .sign(csr(), &web, Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(matches!(error, CaError::Unavailable(_)), "{error}");
    shutdown.cancel();
}

/// kubelet rotates the projected token in place: the next request carries the new one.
#[tokio::test]
async fn agents_send_the_token_the_file_holds_now() {
    let dir = tempfile::tempdir().unwrap();
    let Running {
        addr,
        roots,
        shutdown,
        ..
    } = service(dir.path()).await;
    let web = Identity::new("cluster.local", "shop", "web").unwrap();
    let ttl = Duration::from_secs(600);
    let node_a = signer(addr, &roots, dir.path(), "expired-token");

    let refused = node_a.sign(csr(), &web, ttl).await.unwrap_err().to_string();
    assert!(refused.contains("401"), "{refused}");
    std::fs::write(&node_a.token_file, "token-a\n").unwrap();
    node_a
        .sign(csr(), &web, ttl)
        .await
        .expect("the rotated token is read and accepted");
    shutdown.cancel();
}

/// The Kubernetes path end to end: the API server says the token is node-a's agent; the CA
/// signs node-a's pod identities and refuses node-b's.
#[tokio::test]
async fn with_token_review_only_pods_of_the_agents_node_are_signed() {
    let dir = tempfile::tempdir().unwrap();
    let (client, requests) = scripted_api::client(|_| {
        (
            201,
            scripted_api::token_review(
                true,
                &["nodemesh-ca"],
                AGENT_USERNAME,
                json!({ NODE_NAME_EXTRA: ["node-a"] }),
            ),
        )
    });
    let authenticator =
        TokenReviewAuthenticator::new(client, "nodemesh-system", "nodemesh-agent", "nodemesh-ca");
    let Running {
        addr,
        roots,
        shutdown,
        ..
    } = service_with(dir.path(), Arc::new(authenticator)).await;
    let ttl = Duration::from_secs(600);
    let node_a = signer(addr, &roots, dir.path(), "projected-token-of-node-a");

    let web = Identity::new("cluster.local", "shop", "web").unwrap();
    let issued = node_a
        .sign(csr(), &web, ttl)
        .await
        .expect("web runs on node-a");
    assert_eq!(identity_from_cert(issued.leaf().unwrap()).unwrap(), web);

    let db = Identity::new("cluster.local", "shop", "db").unwrap();
    let refused = node_a.sign(csr(), &db, ttl).await.unwrap_err().to_string();
    assert!(
        refused.contains("403") && refused.contains("node-a"),
        "db runs on node-b: {refused}"
    );
    let reviewed: Vec<_> = requests
        .all()
        .into_iter()
        .map(|r| r.body["spec"]["token"].clone())
        .collect();
    assert_eq!(
        reviewed,
        [json!("projected-token-of-node-a")],
        "the agent's token was reviewed, once for both requests"
    );
    shutdown.cancel();
}

#[test]
fn token_files_are_parsed_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens");
    std::fs::write(&path, "node-a token-a extra\n").unwrap();
    let error = TokenFile::load(&path).err().expect("three words on a line");
    assert!(error.to_string().contains(":1:"), "{error}");
}
