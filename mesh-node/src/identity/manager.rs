//! Per-workload certificates held by the agent: the key pair is generated here and never
//! leaves memory; the CA only ever sees a CSR. Each identity has one background worker that
//! issues the first certificate, renews it at half life (±10 % jitter so a node's identities,
//! and all nodes after a CA restart, do not renew in lockstep) and retries failures with
//! capped exponential backoff, keeping the current certificate in service until it expires.

use std::{
    collections::HashMap,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, UnixTime};
use tokio::{
    sync::watch,
    task::AbortHandle,
    time::{Instant, sleep, sleep_until},
};
use tracing::{debug, info, warn};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::{CaError, Identity, IssuedCertificate, identity_from_cert};

/// Anything that turns a CSR into a certificate: the in-process [`super::CertificateAuthority`]
/// now, a client of `mesh-node ca` later.
///
/// Boxed futures keep the trait object-safe (`Arc<dyn CertificateSigner>`).
pub trait CertificateSigner: Send + Sync + 'static {
    /// Signs `csr_der` for `identity`, asking for `ttl` (the CA may cap it). Transport
    /// failures of a remote signer map to [`CaError::Unavailable`].
    fn sign<'a>(
        &'a self,
        csr_der: CertificateSigningRequestDer<'static>,
        identity: &'a Identity,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<IssuedCertificate, CaError>>;
}

/// How certificates are requested and retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagerConfig {
    /// Requested leaf lifetime (`--cert-ttl`; Istio's default is 24 h too).
    pub ttl: Duration,
    /// First retry delay after a failed issuance or renewal.
    pub retry_min: Duration,
    /// Retry delays double up to this cap.
    pub retry_max: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 60 * 60),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// A workload's certificate chain and private key, ready for rustls.
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
}

// === impl WorkloadCert ===

impl Clone for WorkloadCert {
    // PrivateKeyDer is deliberately not Clone (copies of secrets should be visible in code).
    fn clone(&self) -> Self {
        Self {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for WorkloadCert {
    // Never print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// What a subscriber sees for one identity.
#[derive(Clone, Debug)]
pub enum CertState {
    /// The first certificate is being requested.
    Pending,
    /// The certificate to use. A renewal may be failing behind it, but it has not expired.
    Ready(Arc<WorkloadCert>),
    /// No usable certificate: the first request failed, or renewals kept failing until the
    /// last certificate expired. The worker keeps retrying.
    Unavailable(Arc<CaError>),
}

/// Why [`CertificateManager::fetch`] returned no certificate.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("no certificate for {identity}: {source}")]
    Unavailable {
        identity: Identity,
        #[source]
        source: Arc<CaError>,
    },
    #[error("certificate worker for {identity} stopped (identity forgotten)")]
    Stopped { identity: Identity },
}

/// Issues, holds and renews the certificates of the identities of this node's pods.
///
/// Cheap to clone; the background workers stop when the last clone is dropped.
#[derive(Clone)]
pub struct CertificateManager {
    inner: Arc<Inner>,
}

struct Inner {
    signer: Arc<dyn CertificateSigner>,
    config: ManagerConfig,
    // Never held across an await, only to look up, insert or remove a worker.
    workers: Mutex<HashMap<Identity, Worker>>,
}

struct Worker {
    state: watch::Receiver<CertState>,
    task: AbortHandle,
}

// === impl CertificateManager ===

impl fmt::Debug for CertificateManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateManager")
            .field("config", &self.inner.config)
            .field("identities", &self.identities())
            .finish_non_exhaustive()
    }
}

impl CertificateManager {
    pub fn new(signer: Arc<dyn CertificateSigner>, config: ManagerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                signer,
                config,
                workers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The current certificate for `identity`, requesting it first if this is the first use.
    ///
    /// Concurrent first calls share one request. If the CA cannot be reached this returns the
    /// error at once (the worker keeps retrying in the background) rather than stalling the
    /// connection that asked.
    pub async fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, ManagerError> {
        let mut rx = self.subscribe(identity);
        let state = rx
            .wait_for(|state| !matches!(state, CertState::Pending))
            .await
            .map_err(|_| ManagerError::Stopped {
                identity: identity.clone(),
            })?;
        match &*state {
            // Never hand out a certificate past its notAfter, whatever the worker is doing.
            CertState::Ready(cert) if cert.not_after <= SystemTime::now() => {
                Err(ManagerError::Unavailable {
                    identity: identity.clone(),
                    source: Arc::new(CaError::Unavailable(
                        "the certificate expired and no renewal arrived".into(),
                    )),
                })
            }
            CertState::Ready(cert) => Ok(cert.clone()),
            CertState::Unavailable(source) => Err(ManagerError::Unavailable {
                identity: identity.clone(),
                source: source.clone(),
            }),
            CertState::Pending => Err(ManagerError::Stopped {
                identity: identity.clone(),
            }),
        }
    }

    /// A watch of `identity`'s certificate, starting its worker if needed. Long-lived
    /// listeners use this to swap in renewed certificates (`changed()`), and must be spawned
    /// on a Tokio runtime.
    pub fn subscribe(&self, identity: &Identity) -> watch::Receiver<CertState> {
        let mut workers = self.inner.workers.lock();
        if let Some(worker) = workers.get(identity) {
            return worker.state.clone();
        }
        let (tx, rx) = watch::channel(CertState::Pending);
        let task = tokio::spawn(run_worker(
            self.inner.signer.clone(),
            identity.clone(),
            self.inner.config.clone(),
            tx,
        ))
        .abort_handle();
        debug!(%identity, "started certificate worker");
        workers.insert(
            identity.clone(),
            Worker {
                state: rx.clone(),
                task,
            },
        );
        rx
    }

    /// Drops `identity`'s certificate and key and stops renewing it (no pod needs it any
    /// more). Returns whether it was known.
    pub fn forget(&self, identity: &Identity) -> bool {
        let removed = self.inner.workers.lock().remove(identity);
        match removed {
            Some(worker) => {
                worker.task.abort();
                debug!(%identity, "forgot certificate");
                true
            }
            None => false,
        }
    }

    /// Identities with a worker, sorted (for the admin endpoint and tests).
    pub fn identities(&self) -> Vec<Identity> {
        let mut ids: Vec<_> = self.inner.workers.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The state of every identity, sorted: for the admin dump and the expiry gauge.
    pub fn snapshot(&self) -> Vec<(Identity, CertState)> {
        let mut states: Vec<_> = self
            .inner
            .workers
            .lock()
            .iter()
            .map(|(id, worker)| (id.clone(), worker.state.borrow().clone()))
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Workers hold no reference back to Inner, so this runs when the last manager clone
        // goes; without it they would keep renewing certificates nobody can read.
        let workers = self.workers.get_mut();
        for worker in workers.values() {
            worker.task.abort();
        }
    }
}

/// One identity's lifecycle: issue, sleep to half life, renew; on failure back off, keeping
/// the current certificate until it expires.
async fn run_worker(
    signer: Arc<dyn CertificateSigner>,
    identity: Identity,
    config: ManagerConfig,
    tx: watch::Sender<CertState>,
) {
    // Expiry on Tokio's clock (so paused-time tests drive it), derived from the certificate's
    // wall-clock notAfter at the moment it arrived.
    let mut expires_at: Option<Instant> = None;
    let mut backoff: Option<ExponentialBackoff> = None;
    loop {
        // A CA that accepts the request and answers late, or never, must not keep an
        // expired certificate in service: the attempt is bounded, and the certificate is
        // withdrawn at its expiry even while the attempt is still pending.
        let attempt = tokio::time::timeout(ISSUE_TIMEOUT, issue(&*signer, &identity, config.ttl));
        tokio::pin!(attempt);
        let attempted = loop {
            let Some(expiry) = expires_at else {
                break attempt.await;
            };
            tokio::select! {
                attempted = &mut attempt => break attempted,
                () = sleep_until(expiry) => {
                    warn!(%identity, "certificate expired while its renewal was pending");
                    expires_at = None;
                    tx.send_replace(CertState::Unavailable(Arc::new(CaError::Unavailable(
                        "the certificate expired while its renewal was pending".into(),
                    ))));
                }
            }
        };
        let issued = attempted.unwrap_or_else(|_| {
            Err(CaError::Unavailable(
                format!("no answer from the CA within {ISSUE_TIMEOUT:?}").into(),
            ))
        });
        match issued {
            Ok((cert, lifetime)) => {
                backoff = None;
                let renew_in = jitter(lifetime / 2);
                expires_at = Some(Instant::now() + lifetime);
                info!(
                    %identity,
                    valid_for_s = lifetime.as_secs(),
                    renew_in_s = renew_in.as_secs(),
                    "certificate issued"
                );
                tx.send_replace(CertState::Ready(Arc::new(cert)));
                sleep(renew_in).await;
            }
            Err(error) => {
                let error = Arc::new(error);
                let delay = backoff
                    .get_or_insert_with(|| new_backoff(&config))
                    .next()
                    .unwrap_or(config.retry_max);
                // Jitter, but never beyond the advertised cap.
                let delay = jitter(delay).min(config.retry_max);
                let now = Instant::now();
                let retry_at = now + delay;
                match expires_at {
                    Some(expiry) if expiry > now => {
                        warn!(
                            %identity,
                            %error,
                            retry_in_ms = delay.as_millis(),
                            expires_in_s = (expiry - now).as_secs(),
                            "certificate renewal failed; keeping the current certificate"
                        );
                        if expiry <= retry_at {
                            sleep_until(expiry).await;
                            warn!(%identity, %error, "certificate expired before it could be renewed");
                            expires_at = None;
                            tx.send_replace(CertState::Unavailable(error));
                        }
                    }
                    _ => {
                        warn!(
                            %identity,
                            %error,
                            retry_in_ms = delay.as_millis(),
                            "certificate request failed"
                        );
                        expires_at = None;
                        tx.send_replace(CertState::Unavailable(error));
                    }
                }
                sleep_until(retry_at).await;
            }
        }
    }
}

/// How long one certificate request may take, whatever the signer.
pub const ISSUE_TIMEOUT: Duration = Duration::from_secs(15);

fn new_backoff(config: &ManagerConfig) -> ExponentialBackoff {
    // backon's own jitter adds up to +100 %, which would blow through the cap; ours is ±10 %.
    ExponentialBuilder::default()
        .with_min_delay(config.retry_min)
        .with_max_delay(config.retry_max)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// ±10 %.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.9..=1.1))
}

/// One request: fresh key pair, CSR, sign, and a check that the answer is what we asked for
/// (a remote CA is trusted to sign, not to be right). Returns the certificate and how long it
/// is valid from now.
async fn issue(
    signer: &dyn CertificateSigner,
    identity: &Identity,
    ttl: Duration,
) -> Result<(WorkloadCert, Duration), CaError> {
    // A new key for every certificate, as ztunnel does: a renewal also rotates the key, so a
    // key that leaked is useless after one lifetime.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    let issued = signer.sign(csr.der().clone(), identity, ttl).await?;

    let bad = |reason: String| CaError::BadResponse { reason };
    let leaf = issued.leaf().ok_or_else(|| bad("empty chain".into()))?;
    let got = identity_from_cert(leaf).map_err(|e| bad(e.to_string()))?;
    if got != *identity {
        return Err(bad(format!("issued for {got}, asked for {identity}")));
    }
    let (_, parsed) = X509Certificate::from_der(leaf).map_err(|e| bad(e.to_string()))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad("certificate is not for our key".into()));
    }
    // The leaf's own notAfter, not what the signer claims it is.
    let not_after_secs = parsed.validity().not_after.timestamp();
    let now_secs = i64::try_from(UnixTime::now().as_secs()).unwrap_or(i64::MAX);
    let lifetime = not_after_secs
        .checked_sub(now_secs)
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| bad("certificate is already expired".into()))?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(not_after_secs).unwrap_or_default());
    Ok((
        WorkloadCert {
            identity: identity.clone(),
            chain: issued.chain_der,
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            not_after,
        },
        lifetime,
    ))
}

#[cfg(test)]
mod tests;
