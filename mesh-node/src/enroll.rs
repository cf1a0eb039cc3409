//! Enrollment: keeps the set of captured pods equal to the enrolled pods of this node.
//!
//! Pods join and leave while running: enrolling opens the pod's in-pod listeners, installs
//! its inbound routing and registers its netns with the eBPF programs; leaving undoes that.
//! Connections already open when a pod leaves run to their end.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    netns::{self, Netns, NetnsError},
    proxy::{self, Direction, PodContext, ProxyContext, bind_pod_listeners},
    readiness::ReadinessGuard,
    state::{ObjectKey, State, StateRx, Workload},
};

/// How often pods whose netns was not found yet are looked for again.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no network namespace on this node holds {0:?}")]
    NetnsNotFound(Vec<IpAddr>),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Capture(#[from] crate::ebpf::CaptureError),
}

struct EnrolledPod {
    ips: Vec<IpAddr>,
    netns: Arc<Netns>,
    netns_cookie: u64,
    stop: CancellationToken,
}

/// Reconciles the node's enrolled pods with the state.
pub struct Enrollment {
    node: String,
    proxy: ProxyContext,
    pods: BTreeMap<ObjectKey, EnrolledPod>,
    /// Pods that should be enrolled but are not (yet): their netns is missing, or enrolling
    /// failed. Retried every [`RETRY_INTERVAL`].
    pending: BTreeSet<ObjectKey>,
}

impl Enrollment {
    pub fn new(node: String, proxy: ProxyContext) -> Self {
        Self {
            node,
            proxy,
            pods: BTreeMap::new(),
            pending: BTreeSet::new(),
        }
    }

    /// Runs until `shutdown`, then un-enrolls every pod. `ready` drops after the first pass.
    pub async fn run(
        mut self,
        mut state: StateRx,
        ready: ReadinessGuard,
        shutdown: CancellationToken,
    ) {
        let mut ready = Some(ready);
        loop {
            let snapshot = state.borrow_and_update().clone();
            self.reconcile(&snapshot).await;
            drop(ready.take());
            let retry = !self.pending.is_empty();
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = state.changed() => if changed.is_err() { break },
                () = tokio::time::sleep(RETRY_INTERVAL), if retry => {}
            }
        }
        let keys: Vec<ObjectKey> = self.pods.keys().cloned().collect();
        for key in keys {
            self.unenroll(&key).await;
        }
        info!("all pods un-enrolled");
    }

    async fn reconcile(&mut self, state: &State) {
        let node = self.node.clone();
        let desired: BTreeMap<ObjectKey, &Workload> = state
            .enrolled_on(&node)
            .map(|w| (w.key.clone(), w))
            .collect();
        let stale: Vec<ObjectKey> = self
            .pods
            .iter()
            .filter(|(key, pod)| desired.get(*key).is_none_or(|w| w.ips != pod.ips))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.unenroll(&key).await;
        }
        self.pending.clear();
        for (key, workload) in desired {
            if self.pods.contains_key(&key) {
                continue;
            }
            match self.enroll(workload).await {
                Ok(pod) => {
                    info!(
                        pod = %key,
                        netns = %pod.netns.path().display(),
                        netns_cookie = pod.netns_cookie,
                        ips = ?pod.ips,
                        "pod enrolled"
                    );
                    self.pods.insert(key, pod);
                }
                Err(error @ EnrollError::NetnsNotFound(_)) => {
                    debug!(pod = %key, %error, "pod not enrolled yet; will retry");
                    self.pending.insert(key);
                }
                Err(error) => {
                    warn!(pod = %key, %error, "enrolling pod failed; will retry");
                    self.pending.insert(key);
                }
            }
        }
        self.proxy.metrics.node.set_enrolled_pods(self.pods.len());
    }

    async fn enroll(&self, workload: &Workload) -> Result<EnrolledPod, EnrollError> {
        let home = &self.proxy.home;
        let netns = netns::find_pod_netns(&workload.ips, home)
            .await?
            .ok_or_else(|| EnrollError::NetnsNotFound(workload.ips.clone()))?;
        let netns = Arc::new(netns);
        netns::install_inbound_routing(&netns, home).await?;
        let mtls = self.proxy.mtls.is_some();
        let listeners = bind_pod_listeners(&netns, home, &workload.ips, mtls)?;
        if let Some(mtls) = &self.proxy.mtls
            && let Ok(identity) = mtls.identity_of(workload)
        {
            // Ask for the certificate now, so the first connection does not wait for it.
            let manager = mtls.manager.clone();
            tokio::spawn(async move {
                if let Err(error) = manager.fetch(&identity).await {
                    warn!(%identity, %error, "workload certificate not issued yet");
                }
            });
        }
        let inbound: Vec<(IpAddr, &dyn std::os::fd::AsRawFd)> = listeners
            .inbound
            .iter()
            .flat_map(|(listener, ips)| {
                ips.iter()
                    .map(move |ip| (*ip, listener as &dyn std::os::fd::AsRawFd))
            })
            .collect();
        self.proxy
            .capture
            .enroll(listeners.netns_cookie, netns.as_ref(), &inbound)?;
        let stop = CancellationToken::new();
        let pod = PodContext {
            key: workload.key.clone(),
            ips: workload.ips.clone(),
            netns: netns.clone(),
            netns_cookie: listeners.netns_cookie,
        };
        let outbound = listeners
            .outbound
            .into_iter()
            .map(|l| (l, Direction::Outbound));
        let inbound = listeners
            .inbound
            .into_iter()
            .map(|(l, _)| (l, Direction::Inbound));
        let hbone = listeners.hbone.into_iter().map(|l| (l, Direction::Hbone));
        for (listener, direction) in outbound.chain(inbound).chain(hbone) {
            tokio::spawn(proxy::serve(
                listener,
                pod.clone(),
                self.proxy.clone(),
                stop.clone(),
                direction,
            ));
        }
        Ok(EnrolledPod {
            ips: workload.ips.clone(),
            netns,
            netns_cookie: listeners.netns_cookie,
            stop,
        })
    }

    async fn unenroll(&mut self, key: &ObjectKey) {
        let Some(pod) = self.pods.remove(key) else {
            return;
        };
        // Stop capture first, so nothing new is steered to listeners about to close.
        self.proxy.capture.unenroll(pod.netns_cookie, &pod.ips);
        pod.stop.cancel();
        netns::remove_inbound_routing(&pod.netns, &self.proxy.home).await;
        self.proxy.metrics.node.set_enrolled_pods(self.pods.len());
        info!(pod = %key, "pod un-enrolled");
    }
}
