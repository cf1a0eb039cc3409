//! Real TLS handshakes over in-memory streams.

use std::{
    fs,
    net::Ipv4Addr,
    time::{Duration, SystemTime},
};

use rustls::ProtocolVersion;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::{
    CertificateAuthority,
    ca::ROOT_CERT_FILE,
    testutil::{fixture, id, new_ca, workload, workload_unchecked},
};

const TD: &str = "cluster.local";

/// Runs a handshake plus one ping/pong and returns what each side concluded: the peer's
/// identity, or the error (as text, for assertions on the reason).
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    trust_domain: &str,
) -> (Result<Identity, String>, Result<Identity, String>) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = async move {
        let mut tls = TlsAcceptor::from(server)
            .accept(server_io)
            .await
            .map_err(|e| e.to_string())?;
        let conn = tls.get_ref().1;
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2), "server negotiated h2");
        assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        let peer = peer_identity(conn, trust_domain).map_err(|e| e.to_string())?;
        let mut ping = [0u8; 4];
        tls.read_exact(&mut ping).await.map_err(|e| e.to_string())?;
        assert_eq!(&ping, b"ping");
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    };
    let client = async move {
        // HBONE dials the pod IP; the name is not what the server is checked against.
        let name = ServerName::IpAddress(Ipv4Addr::new(10, 1, 0, 7).into());
        let mut tls = TlsConnector::from(client)
            .connect(name, client_io)
            .await
            .map_err(|e| e.to_string())?;
        let conn = tls.get_ref().1;
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2), "client negotiated h2");
        let peer = peer_identity(conn, trust_domain).map_err(|e| e.to_string())?;
        // In TLS 1.3 the client finishes before the server has judged its certificate, so a
        // refusal only shows up on the first read.
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        let mut pong = [0u8; 4];
        tls.read_exact(&mut pong).await.map_err(|e| e.to_string())?;
        assert_eq!(&pong, b"pong");
        Ok::<_, String>(peer)
    };
    tokio::join!(server, client)
}

fn server_cfg(cert: &WorkloadCert, bundle: &[CertificateDer<'static>]) -> Arc<ServerConfig> {
    server_config(cert, bundle).expect("server config builds")
}

fn client_cfg(
    cert: &WorkloadCert,
    bundle: &[CertificateDer<'static>],
    expected: &Identity,
) -> Arc<ClientConfig> {
    client_config(cert, bundle, expected.clone()).expect("client config builds")
}

#[tokio::test]
async fn workloads_of_one_ca_see_each_others_identity() {
    let ca = new_ca(TD);
    let frontend = id(TD, "shop", "frontend");
    let reviews = id(TD, "bookinfo", "reviews");
    let client = workload(&ca, &frontend);
    let server = workload(&ca, &reviews);
    let bundle = ca.trust_bundle();
    let (s, c) = handshake(
        server_cfg(&server, &bundle),
        client_cfg(&client, &bundle, &reviews),
        TD,
    )
    .await;
    assert_eq!(s, Ok(frontend), "server sees the client's SPIFFE id");
    assert_eq!(c, Ok(reviews), "client sees the server's SPIFFE id");
}

#[tokio::test]
async fn refuses_a_client_certificate_from_another_ca() {
    let ca = new_ca(TD);
    let rogue = new_ca(TD);
    let reviews = id(TD, "bookinfo", "reviews");
    let server = workload(&ca, &reviews);
    let client = workload(&rogue, &id(TD, "shop", "frontend"));
    let (s, c) = handshake(
        server_cfg(&server, &ca.trust_bundle()),
        client_cfg(&client, &ca.trust_bundle(), &reviews),
        TD,
    )
    .await;
    let err = s.expect_err("server refuses an untrusted client chain");
    assert!(err.contains("UnknownIssuer"), "reason: {err}");
    assert!(c.is_err(), "client sees the refusal: {c:?}");
}

#[tokio::test]
async fn refuses_an_expired_client_certificate() {
    let ca = new_ca(TD);
    let reviews = id(TD, "bookinfo", "reviews");
    let server = workload(&ca, &reviews);
    let now = SystemTime::now();
    let client = workload_unchecked(
        &ca,
        &id(TD, "shop", "frontend"),
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    let (s, c) = handshake(
        server_cfg(&server, &ca.trust_bundle()),
        client_cfg(&client, &ca.trust_bundle(), &reviews),
        TD,
    )
    .await;
    let err = s.expect_err("server refuses an expired client certificate");
    assert!(err.to_lowercase().contains("expired"), "reason: {err}");
    assert!(c.is_err(), "client sees the refusal: {c:?}");
}

#[tokio::test]
async fn refuses_a_server_with_an_unexpected_identity() {
    let ca = new_ca(TD);
    let reviews = id(TD, "bookinfo", "reviews");
    let ratings = id(TD, "bookinfo", "ratings");
    let server = workload(&ca, &ratings);
    let client = workload(&ca, &id(TD, "shop", "frontend"));
    let (s, c) = handshake(
        server_cfg(&server, &ca.trust_bundle()),
        client_cfg(&client, &ca.trust_bundle(), &reviews),
        TD,
    )
    .await;
    let err = c.expect_err("client refuses a server that is not the expected workload");
    assert!(
        err.contains("UnexpectedServer")
            && err.contains("expected: Identity(spiffe://cluster.local/ns/bookinfo/sa/reviews)")
            && err.contains("actual: Identity(spiffe://cluster.local/ns/bookinfo/sa/ratings)"),
        "reason: {err}"
    );
    assert!(s.is_err(), "server sees the refusal: {s:?}");
}

#[tokio::test]
async fn refuses_a_server_from_another_ca() {
    let ca = new_ca(TD);
    let rogue = new_ca(TD);
    let reviews = id(TD, "bookinfo", "reviews");
    // Right identity, wrong issuer: only chain validation stops this one.
    let server = workload(&rogue, &reviews);
    let client = workload(&ca, &id(TD, "shop", "frontend"));
    let (s, c) = handshake(
        server_cfg(&server, &rogue.trust_bundle()),
        client_cfg(&client, &ca.trust_bundle(), &reviews),
        TD,
    )
    .await;
    let err = c.expect_err("client refuses an untrusted server chain");
    assert!(err.contains("UnknownIssuer"), "reason: {err}");
    assert!(s.is_err());
}

#[tokio::test]
async fn refuses_a_client_from_another_trust_domain_even_under_a_trusted_root() {
    let ca = new_ca(TD);
    let reviews = id(TD, "bookinfo", "reviews");
    let server = workload(&ca, &reviews);
    let now = SystemTime::now();
    // Our CA would never sign this; mint it directly to isolate the trust-domain check.
    let client = workload_unchecked(
        &ca,
        &id("other.mesh", "shop", "frontend"),
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let (s, c) = handshake(
        server_cfg(&server, &ca.trust_bundle()),
        client_cfg(&client, &ca.trust_bundle(), &reviews),
        TD,
    )
    .await;
    let err = s.expect_err("server refuses another trust domain");
    assert!(
        err.contains("ForeignTrustDomain")
            && err.contains("spiffe://other.mesh/ns/shop/sa/frontend"),
        "reason: {err}"
    );
    assert!(c.is_err());
}

#[tokio::test]
async fn peer_identity_refuses_another_trust_domain() {
    // Two workloads of a foreign trust domain under one root handshake fine with each other;
    // our `peer_identity` must still refuse them.
    let ca = new_ca(TD);
    let now = SystemTime::now();
    let (nb, na) = (
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let a = id("other.mesh", "ns", "a");
    let b = id("other.mesh", "ns", "b");
    let client = workload_unchecked(&ca, &a, nb, na);
    let server = workload_unchecked(&ca, &b, nb, na);
    let bundle = ca.trust_bundle();
    let (s, c) = handshake(
        server_cfg(&server, &bundle),
        client_cfg(&client, &bundle, &b),
        TD,
    )
    .await;
    for side in [s, c] {
        let err = side.expect_err("peer_identity refuses a foreign trust domain");
        assert!(err.contains("not in our trust domain"), "reason: {err}");
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = new_ca(TD);
    let reviews = id(TD, "bookinfo", "reviews");
    let server = workload(&ca, &reviews);
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots: Arc::new(root_store(&ca.trust_bundle()).expect("roots")),
        expected: reviews.clone(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut plain = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    plain.alpn_protocols = vec![ALPN_H2.to_vec()];
    let (s, c) = handshake(server_cfg(&server, &ca.trust_bundle()), Arc::new(plain), TD).await;
    let err = s.expect_err("client certificates are mandatory");
    assert!(err.contains("peer sent no certificates"), "reason: {err}");
    assert!(c.is_err());
}

#[tokio::test]
async fn old_and_new_roots_both_verify_during_a_rotation() {
    let old_dir = tempfile::tempdir().expect("temp dir");
    let new_dir = tempfile::tempdir().expect("temp dir");
    let old = CertificateAuthority::load_or_create(old_dir.path(), TD).expect("old root");
    CertificateAuthority::load_or_create(new_dir.path(), TD).expect("new root");
    // The new CA's bundle carries both roots, as an operator sets it up for the overlap.
    let both = [
        fs::read_to_string(new_dir.path().join(ROOT_CERT_FILE)).expect("read new root"),
        fs::read_to_string(old_dir.path().join(ROOT_CERT_FILE)).expect("read old root"),
    ]
    .concat();
    fs::write(new_dir.path().join(ROOT_CERT_FILE), both).expect("write bundle");
    let new = CertificateAuthority::load_or_create(new_dir.path(), TD).expect("new CA, 2 roots");
    let bundle = new.trust_bundle();
    assert_eq!(bundle.len(), 2);

    let a = id(TD, "ns", "not-yet-renewed");
    let b = id(TD, "ns", "renewed");
    let old_leaf = workload(&old, &a);
    let new_leaf = workload(&new, &b);
    let (s, c) = handshake(
        server_cfg(&new_leaf, &bundle),
        client_cfg(&old_leaf, &bundle, &b),
        TD,
    )
    .await;
    assert_eq!(
        (s, c),
        (Ok(a.clone()), Ok(b.clone())),
        "old client, new server"
    );
    let (s, c) = handshake(
        server_cfg(&old_leaf, &bundle),
        client_cfg(&new_leaf, &bundle, &a),
        TD,
    )
    .await;
    assert_eq!((s, c), (Ok(b), Ok(a)), "new client, old server");
}

#[tokio::test]
async fn leaves_from_an_rsa_intermediate_verify() {
    let ca = CertificateAuthority::load_or_create(&fixture("rsa-cacerts"), TD)
        .expect("Istio-style RSA cacerts load");
    let reviews = id(TD, "bookinfo", "reviews");
    let frontend = id(TD, "shop", "frontend");
    let server = workload(&ca, &reviews);
    let client = workload(&ca, &frontend);
    assert_eq!(server.chain.len(), 2, "leaf + RSA intermediate");
    let bundle = ca.trust_bundle();
    let (s, c) = handshake(
        server_cfg(&server, &bundle),
        client_cfg(&client, &bundle, &reviews),
        TD,
    )
    .await;
    assert_eq!((s, c), (Ok(frontend), Ok(reviews)));
}

#[tokio::test]
async fn leaves_from_a_sec1_ec_root_verify() {
    let ca =
        CertificateAuthority::load_or_create(&fixture("ec-cacerts"), TD).expect("EC cacerts load");
    let reviews = id(TD, "bookinfo", "reviews");
    let frontend = id(TD, "shop", "frontend");
    let bundle = ca.trust_bundle();
    let (s, c) = handshake(
        server_cfg(&workload(&ca, &reviews), &bundle),
        client_cfg(&workload(&ca, &frontend), &bundle, &reviews),
        TD,
    )
    .await;
    assert_eq!((s, c), (Ok(frontend), Ok(reviews)));
}

#[test]
fn an_empty_trust_bundle_is_an_error() {
    let ca = new_ca(TD);
    let cert = workload(&ca, &id(TD, "ns", "sa"));
    assert!(matches!(
        server_config(&cert, &[]),
        Err(TlsError::EmptyTrustBundle)
    ));
    assert!(matches!(
        client_config(&cert, &[], id(TD, "ns", "x")),
        Err(TlsError::EmptyTrustBundle)
    ));
}

#[test]
fn resumption_is_off() {
    let ca = new_ca(TD);
    let cert = workload(&ca, &id(TD, "ns", "sa"));
    let server = server_cfg(&cert, &ca.trust_bundle());
    assert_eq!(server.send_tls13_tickets, 0);
    let client = client_cfg(&cert, &ca.trust_bundle(), &id(TD, "ns", "x"));
    assert_eq!(
        format!("{:?}", client.resumption),
        format!("{:?}", Resumption::disabled())
    );
}
