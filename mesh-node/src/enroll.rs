//! Enrollment: keeps the set of captured pods equal to the enrolled pods of this node.
//!
//! Pods join and leave while running: enrolling opens the pod's in-pod listeners, installs
//! its inbound routing and registers its netns with the eBPF programs; leaving undoes that.
//! Connections already open when a pod leaves run to their end.
//!
//! Two inputs drive it. The config state says which pods should be enrolled; their netns
//! is found by the pod's UID (its cgroup) or IP. The CNI plugin ([`crate::cni`]) reports new
//! pod sandboxes before their containers start, with the netns and IPs the API server does
//! not know yet: the loop enrolls such a pod at once and answers the plugin only then, so
//! no connection of the pod escapes capture. The sandbox's netns is remembered, so the
//! state learning the pod's IPs later changes nothing (unless they differ: re-enrolled).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::fd::AsFd,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::{sync::oneshot, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    cni::{
        AgentRequest, AgentResponse, PodRef,
        server::{CniCall, CniRequests},
    },
    ebpf::Capture,
    holder::{HeldKey, HolderClient},
    inventory::{ENROLLMENT_LABEL, ObjectKey, Workload},
    netns::{self, Netns, NetnsError, NetnsSurvey},
    proxy::{self, Direction, Inherited, PodContext, ProxyContext, bind_pod_listeners},
    readiness::ReadinessGuard,
    state::{State, StateRx},
};

/// How often pods whose netns was not found yet are looked for again.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long a CNI ADD for a pod the config does not know yet (watch lag) waits for it,
/// before the namespace's label alone decides.
const UNKNOWN_POD_WAIT: Duration = Duration::from_secs(3);
/// How often the holder is checked for a restart (which lost the listeners it kept).
const HOLDER_RESYNC_INTERVAL: Duration = Duration::from_secs(5);

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

/// What the CNI plugin said about a pod's sandbox.
#[derive(Clone, Debug)]
struct Sandbox {
    /// `None` once the path is gone (see [`Enrollment::reconcile`]).
    netns: Option<PathBuf>,
    /// From the main plugin's result.
    ips: Vec<IpAddr>,
    uid: Option<String>,
}

/// A CNI ADD for a pod the config does not know yet.
struct WaitingAdd {
    key: ObjectKey,
    sandbox: Sandbox,
    deadline: Instant,
    /// Its sandbox is in [`Enrollment::sandboxes`] now: answered after the next reconcile.
    resolved: bool,
    reply: oneshot::Sender<AgentResponse>,
}

/// A pod that should be enrolled now, and where to find it.
struct DesiredPod<'a> {
    ips: Vec<IpAddr>,
    /// `None` for a pod only the CNI plugin told about (the config lags behind).
    workload: Option<&'a Workload>,
    uid: Option<String>,
    /// From the CNI plugin: no search needed.
    netns: Option<PathBuf>,
}

/// Reconciles the node's enrolled pods with the state and the CNI plugin's reports.
pub struct Enrollment {
    node: String,
    proxy: ProxyContext,
    /// The node's eBPF capture, which enrolling and leaving change.
    capture: Arc<Capture>,
    pods: BTreeMap<ObjectKey, EnrolledPod>,
    /// Pods that should be enrolled but are not (yet), with why: their netns is missing, or
    /// enrolling failed. Retried every [`RETRY_INTERVAL`].
    pending: BTreeMap<ObjectKey, String>,
    /// Sandboxes the CNI plugin reported (ADD), until their DEL.
    sandboxes: BTreeMap<ObjectKey, Sandbox>,
    /// Pods whose sandbox the CNI plugin reported gone (DEL): not enrolled from the config
    /// (whose IPs may still name them) until a new ADD, or until they leave the config.
    deleted_sandboxes: BTreeSet<ObjectKey>,
    waiting: Vec<WaitingAdd>,
    cni: Option<CniRequests>,
    /// Keeps the pods' listeners across agents (`--holder-socket`).
    holder: Option<Arc<HolderClient>>,
    /// Listeners an earlier agent left with the holder, by netns inode, until the pod they
    /// belong to is enrolled again (or found gone after the first reconcile).
    inherited: BTreeMap<u64, Inherited>,
    /// Whether the pinned enrollment and the holder were reconciled against a published
    /// config (once: what an earlier agent left that is not wanted is then let go).
    adopted: bool,
}

impl Enrollment {
    pub fn new(node: String, proxy: ProxyContext, capture: Arc<Capture>) -> Self {
        Self {
            node,
            proxy,
            capture,
            pods: BTreeMap::new(),
            pending: BTreeMap::new(),
            sandboxes: BTreeMap::new(),
            deleted_sandboxes: BTreeSet::new(),
            waiting: Vec::new(),
            cni: None,
            holder: None,
            inherited: BTreeMap::new(),
            adopted: false,
        }
    }

    /// Keeps the pods' listeners with the holder, and takes those an earlier agent left
    /// there (`mesh-node run --holder-socket`).
    pub fn with_holder(mut self, holder: Arc<HolderClient>) -> Self {
        match holder.take_all() {
            Ok(held) => {
                info!(
                    listeners = held.len(),
                    "took the listeners the holder keeps"
                );
                for (key, fd) in held {
                    self.inherited
                        .entry(key.netns_inode)
                        .or_default()
                        .insert(key.addr, fd);
                }
            }
            Err(error) => {
                warn!(%error, "the listener holder cannot be reached; pods' listeners are bound anew")
            }
        }
        self.holder = Some(holder);
        self
    }

    /// Takes the CNI plugin's requests (`mesh-node run --cni-socket`).
    pub fn with_cni(mut self, requests: CniRequests) -> Self {
        self.cni = Some(requests);
        self
    }

    /// Runs until `shutdown`, then stops serving the pods and leaves them enrolled: capture
    /// stays pinned, the listeners stay with the holder, for the next agent (un-enrolling
    /// is `mesh-node uninstall`'s). `ready` drops after the first pass; the CNI plugin's
    /// requests are answered from the first pass over a published state.
    pub async fn run(
        mut self,
        mut state: StateRx,
        ready: ReadinessGuard,
        shutdown: CancellationToken,
    ) {
        let mut cni = self.cni.take();
        // The channel starts with an empty placeholder. The plugin is answered only once a
        // state the config source published has been reconciled: an ADD racing the first
        // sync would otherwise be decided against an empty config.
        let mut config_published = state.has_changed().unwrap_or(false);
        let mut snapshot = state.borrow_and_update().clone();
        self.reconcile(&snapshot).await;
        drop(ready);
        let answer_cni = |cni: &Option<CniRequests>| {
            if let Some(cni) = cni {
                cni.ready.send_replace(true);
            }
        };
        if config_published {
            answer_cni(&cni);
        }
        self.let_go_of_the_unwanted(config_published);
        let mut resync = tokio::time::interval(HOLDER_RESYNC_INTERVAL);
        loop {
            let retry = !self.pending.is_empty();
            let next_deadline = self
                .waiting
                .iter()
                .filter(|w| !w.resolved)
                .map(|w| w.deadline)
                .min();
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    snapshot = state.borrow_and_update().clone();
                    self.take_known_waiting(&snapshot);
                    self.reconcile(&snapshot).await;
                    if !config_published {
                        config_published = true;
                        answer_cni(&cni);
                    }
                }
                () = tokio::time::sleep(RETRY_INTERVAL), if retry => {
                    self.reconcile(&snapshot).await;
                }
                () = tokio::time::sleep_until(next_deadline.unwrap_or_else(Instant::now)),
                    if next_deadline.is_some() => {
                    self.take_expired_waiting();
                    self.reconcile(&snapshot).await;
                }
                Some((request, reply)) = next_call(&mut cni) => {
                    self.handle_cni(request, reply, &snapshot).await;
                }
                _ = resync.tick(), if self.holder.is_some() => self.resync_holder(),
            }
            self.answer_resolved_waiting(&snapshot);
            self.let_go_of_the_unwanted(config_published);
        }
        for waiting in self.waiting.drain(..) {
            let _ = waiting.reply.send(AgentResponse::NotReady);
        }
        for pod in self.pods.values() {
            pod.stop.cancel();
        }
        info!(
            pods = self.pods.len(),
            "stopped accepting; the pods stay enrolled for the next agent"
        );
    }

    /// Once a published config was reconciled and every pod it wants is enrolled: what an
    /// earlier agent left (pinned enrollment, held listeners) for pods that are not enrolled
    /// now is let go. Once. Not before: a pod whose netns this agent has not found yet keeps
    /// the capture an earlier agent gave it (its connections wait, never pass), however long
    /// it stays pending.
    fn let_go_of_the_unwanted(&mut self, config_published: bool) {
        if self.adopted || !config_published || !self.pending.is_empty() {
            return;
        }
        self.adopted = true;
        let cookies: Vec<u64> = self.pods.values().map(|pod| pod.netns_cookie).collect();
        self.capture.retain(&cookies);
        let inodes: Vec<u64> = self.pods.values().map(|pod| pod.netns.inode()).collect();
        if let Some(holder) = &self.holder
            && let Err(error) = holder.retain_netns(&inodes)
        {
            warn!(%error, "the holder could not let go of departed pods' listeners");
        }
        let unclaimed: usize = self.inherited.values().map(BTreeMap::len).sum();
        if unclaimed > 0 {
            info!(
                listeners = unclaimed,
                "closed inherited listeners of pods not enrolled now"
            );
        }
        self.inherited.clear();
    }

    /// Deposits the listeners again when the holder restarted (it lost them).
    fn resync_holder(&self) {
        let Some(holder) = &self.holder else {
            return;
        };
        match holder.resync() {
            Ok(0) => {}
            Ok(deposited) => info!(
                listeners = deposited,
                "the holder restarted; listeners deposited again"
            ),
            Err(error) => debug!(%error, "the listener holder cannot be reached"),
        }
    }

    async fn reconcile(&mut self, state: &State) {
        // A sandbox netns path that is gone: the sandbox was deleted without its DEL
        // reaching the agent, or the agent does not see the runtime's netns mounts. A pod
        // the config knows is searched for instead; one it does not know is forgotten.
        self.sandboxes.retain(|key, sandbox| {
            let Some(path) = sandbox.netns.take_if(|path| !path.exists()) else {
                return true;
            };
            debug!(pod = %key, netns = %path.display(), "sandbox netns gone");
            state.workloads.contains_key(key)
        });
        let desired = self.desired(state);
        let stale: Vec<ObjectKey> = self
            .pods
            .iter()
            .filter(|(key, pod)| desired.get(*key).is_none_or(|d| d.ips != pod.ips))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.unenroll(&key).await;
        }
        let mut pending = BTreeMap::new();
        let mut enrolled = Vec::new();
        // Enrolled pods' namespaces cannot be a new pod's: a node filling up looks only at
        // the others.
        let mut survey = NetnsSurvey::skipping(self.pods.values().map(|pod| pod.netns.inode()));
        for (key, wanted) in desired {
            if self.pods.contains_key(&key) {
                continue;
            }
            let started = Instant::now();
            match self.enroll(&key, &wanted, &mut survey).await {
                Ok(pod) => {
                    self.proxy.metrics.node.pod_enrolled(started.elapsed());
                    info!(
                        pod = %key,
                        netns = %pod.netns.path().display(),
                        netns_cookie = pod.netns_cookie,
                        ips = ?pod.ips,
                        "pod enrolled"
                    );
                    enrolled.push((key, pod));
                }
                Err(error @ EnrollError::NetnsNotFound(_)) => {
                    debug!(pod = %key, %error, "pod not enrolled yet; will retry");
                    pending.insert(key, error.to_string());
                }
                Err(error) => {
                    warn!(pod = %key, %error, "enrolling pod failed; will retry");
                    pending.insert(key, error.to_string());
                }
            }
        }
        self.pods.extend(enrolled);
        self.pending = pending;
        // A DEL is forgotten once the pod leaves the config: a pod of that name later is
        // another pod.
        self.deleted_sandboxes
            .retain(|key| state.workloads.contains_key(key));
        self.proxy.metrics.node.set_enrolled_pods(self.pods.len());
    }

    /// The pods that should be enrolled now: the config's enrolled pods of this node (with
    /// the CNI plugin's IPs while the config has none), and pods only the plugin reported,
    /// by their namespace's label.
    fn desired<'a>(&self, state: &'a State) -> BTreeMap<ObjectKey, DesiredPod<'a>> {
        let mut desired = BTreeMap::new();
        for workload in state.workloads.values() {
            let sandbox = self.sandboxes.get(&workload.key);
            // The plugin ran here: the pod is here, whatever a lagging config says.
            let here = workload.node == self.node || sandbox.is_some();
            if !here || !workload.enrolled || self.deleted_sandboxes.contains(&workload.key) {
                continue;
            }
            let ips = match (workload.ips.is_empty(), sandbox) {
                (false, _) => workload.ips.clone(),
                (true, Some(sandbox)) => sandbox.ips.clone(),
                (true, None) => continue,
            };
            desired.insert(
                workload.key.clone(),
                DesiredPod {
                    ips,
                    workload: Some(workload),
                    uid: Some(workload.uid.clone()),
                    netns: sandbox.and_then(|s| s.netns.clone()),
                },
            );
        }
        for (key, sandbox) in &self.sandboxes {
            if state.workloads.contains_key(key) || !namespace_enrolled(state, &key.namespace) {
                continue;
            }
            desired.insert(
                key.clone(),
                DesiredPod {
                    ips: sandbox.ips.clone(),
                    workload: None,
                    uid: sandbox.uid.clone(),
                    netns: sandbox.netns.clone(),
                },
            );
        }
        desired.retain(|_, pod| !pod.ips.is_empty());
        desired
    }

    async fn handle_cni(
        &mut self,
        request: AgentRequest,
        reply: oneshot::Sender<AgentResponse>,
        state: &State,
    ) {
        debug!(?request, "CNI request");
        let response = match request {
            AgentRequest::Add {
                pod, netns, ips, ..
            } => {
                let key = pod.key();
                let sandbox = Sandbox {
                    netns: Some(netns),
                    ips,
                    uid: pod.uid,
                };
                self.deleted_sandboxes.remove(&key);
                self.replace_other_sandbox(&key, &sandbox).await;
                if !state.workloads.contains_key(&key) {
                    debug!(pod = %key, "CNI ADD for a pod the config does not know yet");
                    self.sandboxes.remove(&key);
                    self.waiting.push(WaitingAdd {
                        key,
                        sandbox,
                        deadline: Instant::now() + UNKNOWN_POD_WAIT,
                        resolved: false,
                        reply,
                    });
                    return;
                }
                self.sandboxes.insert(key.clone(), sandbox);
                self.reconcile(state).await;
                self.outcome(&key, state)
            }
            AgentRequest::Del { pod, .. } => self.handle_del(&pod).await,
            AgentRequest::Status => AgentResponse::Ready,
        };
        let _ = reply.send(response);
    }

    /// A new sandbox for an enrolled pod (the old one died): the capture moves to it.
    async fn replace_other_sandbox(&mut self, key: &ObjectKey, sandbox: &Sandbox) {
        let Some(enrolled) = self.pods.get(key) else {
            return;
        };
        let same = sandbox
            .netns
            .as_deref()
            .and_then(|path| Netns::open(path).ok())
            .is_some_and(|netns| netns.inode() == enrolled.netns.inode());
        if !same {
            self.unenroll(key).await;
        }
    }

    async fn handle_del(&mut self, pod: &PodRef) -> AgentResponse {
        let key = pod.key();
        self.sandboxes.remove(&key);
        self.deleted_sandboxes.insert(key.clone());
        let (gone, waiting) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.key == key);
        self.waiting = waiting;
        for waiting in gone {
            let _ = waiting.reply.send(AgentResponse::NotEnrolled {
                reason: "the sandbox was deleted".into(),
            });
        }
        self.unenroll(&key).await;
        AgentResponse::Removed
    }

    /// Waiting ADDs whose pod the config now knows: their sandboxes join the reconcile.
    fn take_known_waiting(&mut self, state: &State) {
        self.resolve_waiting(|waiting| state.workloads.contains_key(&waiting.key));
    }

    /// Waiting ADDs past their deadline: decided by the namespace label in the reconcile.
    fn take_expired_waiting(&mut self) {
        let now = Instant::now();
        self.resolve_waiting(|waiting| waiting.deadline <= now);
    }

    fn resolve_waiting(&mut self, done: impl Fn(&WaitingAdd) -> bool) {
        for waiting in self.waiting.iter_mut().filter(|w| !w.resolved) {
            if done(waiting) {
                waiting.resolved = true;
                self.sandboxes
                    .insert(waiting.key.clone(), waiting.sandbox.clone());
            }
        }
    }

    /// Answers the waiting ADDs whose sandbox the last reconcile considered.
    fn answer_resolved_waiting(&mut self, state: &State) {
        let (resolved, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.resolved);
        self.waiting = waiting;
        for waiting in resolved {
            let _ = waiting.reply.send(self.outcome(&waiting.key, state));
        }
    }

    /// The answer for an ADD of `key`, after a reconcile that considered its sandbox.
    fn outcome(&self, key: &ObjectKey, state: &State) -> AgentResponse {
        if self.pods.contains_key(key) {
            return AgentResponse::Enrolled;
        }
        if let Some(error) = self.pending.get(key) {
            return AgentResponse::Failed {
                error: error.clone(),
            };
        }
        let reason = match state.workloads.get(key) {
            Some(workload) if workload.enrolled => "the pod has no IP".to_owned(),
            Some(_) if namespace_enrolled(state, &key.namespace) => {
                format!("the pod is labelled {ENROLLMENT_LABEL}=false")
            }
            _ => format!("namespace {} is not enrolled", key.namespace),
        };
        AgentResponse::NotEnrolled { reason }
    }

    /// Gives the holder a copy of every listener of the pod.
    fn deposit(&self, netns: &Netns, listeners: &proxy::ListenerSet) {
        let Some(holder) = &self.holder else {
            return;
        };
        let all = listeners
            .outbound
            .iter()
            .chain(listeners.inbound.iter().map(|(listener, _)| listener))
            .chain(&listeners.hbone);
        for listener in all {
            let Ok(addr) = listener.local_addr() else {
                continue;
            };
            let key = HeldKey {
                netns_inode: netns.inode(),
                addr,
            };
            if let Err(error) = holder.deposit(key, listener.as_fd()) {
                warn!(netns = %netns.path().display(), %addr, %error, "the holder did not take a listener");
            }
        }
    }

    async fn enroll(
        &mut self,
        key: &ObjectKey,
        wanted: &DesiredPod<'_>,
        survey: &mut NetnsSurvey,
    ) -> Result<EnrolledPod, EnrollError> {
        let home = &self.proxy.home;
        let ips = &wanted.ips;
        let netns = Arc::new(self.find_netns(wanted, survey).await?);
        netns::install_inbound_routing(&netns, home).await?;
        let mtls = self.proxy.mtls.is_some();
        let inherited = self.inherited.remove(&netns.inode()).unwrap_or_default();
        let adopted = inherited.len();
        let listeners = bind_pod_listeners(&netns, home, ips, mtls, inherited)?;
        if adopted > 0 {
            info!(pod = %key, listeners = adopted, "took over the listeners of an earlier agent");
        }
        self.deposit(&netns, &listeners);
        if let Some(mtls) = &self.proxy.mtls
            && let Some(workload) = wanted.workload
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
        self.capture
            .enroll(listeners.netns_cookie, netns.as_ref(), &inbound)?;
        let stop = CancellationToken::new();
        let pod = PodContext {
            key: key.clone(),
            ips: ips.clone(),
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
            ips: ips.clone(),
            netns,
            netns_cookie: listeners.netns_cookie,
            stop,
        })
    }

    /// The pod's netns: the one the CNI plugin named, else found by the pod's UID (its
    /// cgroup), else by its IPs, in `survey` (one per round of enrollments).
    async fn find_netns(
        &self,
        wanted: &DesiredPod<'_>,
        survey: &mut NetnsSurvey,
    ) -> Result<Netns, EnrollError> {
        let home = &self.proxy.home;
        if let Some(path) = &wanted.netns {
            return Ok(Netns::open(path)?);
        }
        if let Some(netns) = wanted
            .uid
            .as_deref()
            .and_then(|uid| survey.find_by_uid(uid, home))
        {
            return Ok(netns);
        }
        survey
            .find_by_ips(&wanted.ips, home)
            .await?
            .ok_or_else(|| EnrollError::NetnsNotFound(wanted.ips.clone()))
    }

    async fn unenroll(&mut self, key: &ObjectKey) {
        let Some(pod) = self.pods.remove(key) else {
            return;
        };
        // Stop capture first, so nothing new is steered to listeners about to close.
        self.capture.unenroll(pod.netns_cookie, &pod.ips);
        if let Some(holder) = &self.holder
            && let Err(error) = holder.release_netns(pod.netns.inode())
        {
            warn!(pod = %key, %error, "the holder could not let go of the pod's listeners");
        }
        pod.stop.cancel();
        netns::remove_inbound_routing(&pod.netns, &self.proxy.home).await;
        self.proxy.metrics.node.set_enrolled_pods(self.pods.len());
        info!(pod = %key, "pod un-enrolled");
    }
}

/// The next CNI request; never, without the CNI socket or once the server is gone.
async fn next_call(cni: &mut Option<CniRequests>) -> Option<CniCall> {
    match cni {
        Some(cni) => cni.calls.recv().await,
        None => std::future::pending().await,
    }
}

fn namespace_enrolled(state: &State, namespace: &str) -> bool {
    state
        .namespaces
        .get(namespace)
        .and_then(|labels| labels.get(ENROLLMENT_LABEL))
        .is_some_and(|value| value == "true")
}
