use std::sync::atomic::{AtomicBool, Ordering};

use rcgen::CertificateSigningRequestParams;

use super::*;
use crate::identity::{
    CertificateAuthority,
    testutil::{id, new_ca},
};

/// A CA that can be told to fail or to answer for the wrong identity, and records when it was
/// asked (on Tokio's clock, so paused-time tests can check the schedule).
struct TestSigner {
    ca: CertificateAuthority,
    fail: AtomicBool,
    /// Accepts requests and never answers them.
    stall: AtomicBool,
    answer_for: Option<Identity>,
    delay: Duration,
    calls: Mutex<Vec<Instant>>,
}

impl TestSigner {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            ca: new_ca("cluster.local"),
            fail: AtomicBool::new(false),
            stall: AtomicBool::new(false),
            answer_for: None,
            delay: Duration::ZERO,
            calls: Mutex::new(Vec::new()),
        })
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().clone()
    }

    fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }
}

impl CertificateSigner for TestSigner {
    fn sign<'a>(
        &'a self,
        csr_der: CertificateSigningRequestDer<'static>,
        identity: &'a Identity,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<IssuedCertificate, CaError>> {
        Box::pin(async move {
            self.calls.lock().push(Instant::now());
            if !self.delay.is_zero() {
                sleep(self.delay).await;
            }
            if self.stall.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(CaError::Unavailable("test: CA is down".into()));
            }
            match &self.answer_for {
                None => self.ca.sign(&csr_der, identity, ttl),
                Some(other) => {
                    let csr = CertificateSigningRequestParams::from_der(&csr_der)
                        .expect("manager sends a valid CSR");
                    let now = SystemTime::now();
                    self.ca.issue(&csr.public_key, other, now, now + ttl)
                }
            }
        })
    }
}

fn manager(signer: &Arc<TestSigner>, ttl: Duration) -> CertificateManager {
    CertificateManager::new(
        signer.clone(),
        ManagerConfig {
            ttl,
            ..ManagerConfig::default()
        },
    )
}

async fn next_ready(rx: &mut watch::Receiver<CertState>) -> Arc<WorkloadCert> {
    rx.changed().await.expect("worker is alive");
    let state = rx
        .wait_for(|s| matches!(s, CertState::Ready(_)))
        .await
        .expect("worker is alive");
    match &*state {
        CertState::Ready(cert) => cert.clone(),
        other => panic!("expected Ready, got {other:?}"),
    }
}

fn ready(state: &CertState) -> Option<Arc<WorkloadCert>> {
    match state {
        CertState::Ready(cert) => Some(cert.clone()),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_fetches_share_one_request() {
    let signer = Arc::new(TestSigner {
        delay: Duration::from_millis(200),
        ..Arc::into_inner(TestSigner::new()).expect("sole owner")
    });
    let manager = manager(&signer, Duration::from_secs(3600));
    let identity = id("cluster.local", "bookinfo", "reviews");
    let (a, b, c) = tokio::join!(
        manager.fetch(&identity),
        manager.fetch(&identity),
        manager.fetch(&identity)
    );
    let a = a.expect("first fetch gets a certificate");
    let b = b.expect("second fetch gets a certificate");
    let c = c.expect("third fetch gets a certificate");
    assert!(
        Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&b, &c),
        "one certificate shared"
    );
    assert_eq!(signer.calls().len(), 1, "one CSR for concurrent first uses");
    assert_eq!(a.identity, identity);
    assert_eq!(
        identity_from_cert(&a.chain[0]).expect("leaf has a SPIFFE id"),
        identity
    );
    assert!(matches!(a.key, PrivateKeyDer::Pkcs8(_)));
    let ttl = a
        .not_after
        .duration_since(SystemTime::now())
        .expect("not expired");
    assert!(
        ttl > Duration::from_secs(3500),
        "requested TTL honoured: {ttl:?}"
    );

    let again = manager.fetch(&identity).await.expect("cached");
    assert!(
        Arc::ptr_eq(&a, &again),
        "later fetches reuse the certificate"
    );
    assert_eq!(signer.calls().len(), 1);
    assert_eq!(manager.identities(), vec![identity]);
}

#[tokio::test(start_paused = true)]
async fn renews_at_half_life_with_jitter_and_a_new_key() {
    let signer = TestSigner::new();
    let manager = manager(&signer, Duration::from_secs(100));
    let identity = id("cluster.local", "ns", "sa");
    let mut rx = manager.subscribe(&identity);
    let mut previous = next_ready(&mut rx).await;
    for round in 0..5 {
        let issued_at = Instant::now();
        let renewed = next_ready(&mut rx).await;
        let after = issued_at.elapsed();
        // Half of a 99-100 s lifetime (whole-second notAfter), ±10 %.
        assert!(
            after >= Duration::from_millis(44_500) && after <= Duration::from_secs(55),
            "round {round}: renewal after {after:?}, expected 50 s ±10 %"
        );
        assert_ne!(
            renewed.key.secret_der(),
            previous.key.secret_der(),
            "each renewal rotates the key"
        );
        assert_ne!(renewed.chain[0], previous.chain[0]);
        previous = renewed;
    }
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_back_off_and_keep_the_certificate_until_it_expires() {
    let signer = TestSigner::new();
    let manager = manager(&signer, Duration::from_secs(100));
    let identity = id("cluster.local", "ns", "sa");
    let first = manager.fetch(&identity).await.expect("first issuance");
    let start = Instant::now();
    signer.set_failing(true);
    let rx = manager.subscribe(&identity);

    sleep_until(start + Duration::from_secs(98)).await;
    let current = ready(&rx.borrow()).expect("still Ready while the certificate is valid");
    assert!(
        Arc::ptr_eq(&current, &first),
        "the working certificate stays in use"
    );
    let during = manager
        .fetch(&identity)
        .await
        .expect("fetch still succeeds");
    assert!(Arc::ptr_eq(&during, &first));

    let calls = signer.calls();
    assert!(
        calls.len() >= 6,
        "renewal was retried: {} calls",
        calls.len()
    );
    let first_renewal = calls[1] - start;
    assert!(
        first_renewal >= Duration::from_secs(44) && first_renewal <= Duration::from_secs(55),
        "first renewal attempt at half life, got {first_renewal:?}"
    );
    let gaps: Vec<Duration> = calls[1..].windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[0] >= Duration::from_millis(450) && gaps[0] <= Duration::from_millis(550),
        "first retry after ~500 ms, gaps {gaps:?}"
    );
    assert!(
        gaps[1] >= Duration::from_millis(900) && gaps[1] <= Duration::from_millis(1100),
        "second retry after ~1 s, gaps {gaps:?}"
    );
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_secs(30)),
        "retry delays are capped at 30 s, gaps {gaps:?}"
    );
    assert!(
        gaps.iter().any(|g| *g >= Duration::from_secs(14)),
        "delays grow exponentially, gaps {gaps:?}"
    );

    sleep_until(start + Duration::from_secs(101)).await;
    assert!(
        matches!(&*rx.borrow(), CertState::Unavailable(_)),
        "an expired certificate is withdrawn, got {:?}",
        rx.borrow()
    );
    let err = manager
        .fetch(&identity)
        .await
        .expect_err("no usable certificate");
    assert!(matches!(err, ManagerError::Unavailable { .. }), "got {err}");

    signer.set_failing(false);
    let recovered_from = Instant::now();
    let mut rx = rx;
    let recovered = next_ready(&mut rx).await;
    assert!(
        recovered_from.elapsed() <= Duration::from_secs(30),
        "the next retry (capped at 30 s) recovers"
    );
    assert!(!Arc::ptr_eq(&recovered, &first));
}

#[tokio::test(start_paused = true)]
async fn first_request_failure_is_reported_then_retried() {
    let signer = TestSigner::new();
    signer.set_failing(true);
    let manager = manager(&signer, Duration::from_secs(3600));
    let identity = id("cluster.local", "ns", "sa");
    let err = manager
        .fetch(&identity)
        .await
        .expect_err("an unreachable CA is reported, not waited for");
    assert!(
        err.to_string().contains("CA is down"),
        "error carries the cause: {err}"
    );
    signer.set_failing(false);
    let mut rx = manager.subscribe(&identity);
    let cert = next_ready(&mut rx).await;
    assert_eq!(cert.identity, identity);
    assert!(signer.calls().len() >= 2);
}

#[tokio::test(start_paused = true)]
async fn forget_stops_renewal_and_drops_the_certificate() {
    let signer = TestSigner::new();
    let manager = manager(&signer, Duration::from_secs(100));
    let identity = id("cluster.local", "ns", "sa");
    let first = manager.fetch(&identity).await.expect("issued");
    assert!(manager.forget(&identity));
    assert!(!manager.forget(&identity), "second forget is a no-op");
    assert!(manager.identities().is_empty());
    sleep(Duration::from_secs(300)).await;
    assert_eq!(signer.calls().len(), 1, "no renewal after forget");

    let second = manager.fetch(&identity).await.expect("issued again");
    assert!(
        !Arc::ptr_eq(&first, &second),
        "a new certificate after forget"
    );
    assert_eq!(signer.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_manager_stops_the_workers() {
    let signer = TestSigner::new();
    let manager = manager(&signer, Duration::from_secs(100));
    manager
        .fetch(&id("cluster.local", "ns", "sa"))
        .await
        .expect("issued");
    drop(manager);
    sleep(Duration::from_secs(300)).await;
    assert_eq!(
        signer.calls().len(),
        1,
        "no renewal once the manager is gone"
    );
}

#[tokio::test(start_paused = true)]
async fn refuses_a_certificate_for_another_identity() {
    let signer = Arc::new(TestSigner {
        answer_for: Some(id("cluster.local", "ns", "admin")),
        ..Arc::into_inner(TestSigner::new()).expect("sole owner")
    });
    let manager = manager(&signer, Duration::from_secs(3600));
    let err = manager
        .fetch(&id("cluster.local", "ns", "sa"))
        .await
        .expect_err("a certificate for another identity is not used");
    assert!(
        matches!(&err, ManagerError::Unavailable { source, .. } if matches!(**source, CaError::BadResponse { .. })),
        "got {err}"
    );
}

#[tokio::test(start_paused = true)]
async fn works_with_the_in_process_ca_as_signer() {
    let ca: Arc<dyn CertificateSigner> = Arc::new(new_ca("cluster.local"));
    let manager = CertificateManager::new(ca, ManagerConfig::default());
    let identity = id("cluster.local", "ns", "sa");
    let cert = manager.fetch(&identity).await.expect("in-process CA signs");
    assert_eq!(cert.identity, identity);
    let foreign = id("elsewhere", "ns", "sa");
    let err = manager
        .fetch(&foreign)
        .await
        .expect_err("foreign trust domain");
    assert!(
        matches!(&err, ManagerError::Unavailable { source, .. } if matches!(**source, CaError::WrongTrustDomain { .. })),
        "got {err}"
    );
    let snapshot = manager.snapshot();
    assert_eq!(snapshot.len(), 2);
    assert_eq!(snapshot[0].0, identity, "sorted by trust domain first");
    assert!(matches!(snapshot[0].1, CertState::Ready(_)));
    assert!(matches!(snapshot[1].1, CertState::Unavailable(_)));
}

#[test]
fn debug_output_never_shows_the_key() {
    let ca = new_ca("cluster.local");
    let cert = crate::identity::testutil::workload(&ca, &id("cluster.local", "ns", "sa"));
    let printed = format!("{cert:?} {:?}", cert.clone());
    assert!(!printed.contains("key"), "no key field in {printed}");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_ca_never_leaves_an_expired_certificate_in_service() {
    let signer = TestSigner::new();
    let manager = CertificateManager::new(
        signer.clone(),
        ManagerConfig {
            ttl: Duration::from_secs(120),
            ..ManagerConfig::default()
        },
    );
    let web = id("cluster.local", "shop", "web");
    manager.fetch(&web).await.expect("the first certificate");
    signer.stall.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut state = manager.subscribe(&web);
    // Renewals from half life on hang; at expiry the certificate must be withdrawn.
    tokio::time::timeout(
        Duration::from_secs(600),
        state.wait_for(|state| matches!(state, CertState::Unavailable(_))),
    )
    .await
    .expect("withdrawn, not served past its expiry")
    .expect("the worker runs");
    let withdrawn_after = started.elapsed();
    assert!(
        withdrawn_after <= Duration::from_secs(125),
        "withdrawn {withdrawn_after:?} after issuance, for a 120 s certificate"
    );
    assert!(
        signer.calls().len() >= 2,
        "renewals were attempted: {:?}",
        signer.calls()
    );
}
