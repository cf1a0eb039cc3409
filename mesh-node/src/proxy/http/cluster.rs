//! Upstream clusters as Envoy has them: one per (Service, subset, port), each with its
//! load-balancing position, its circuit-breaker counters and the outlier-detection state
//! of its endpoints. Shared by every source pod on the node, like a DestinationRule's
//! limits are shared by every client of one Envoy.
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{sync::Notify, time::Instant};

use crate::{
    inventory::ObjectKey,
    routing::{ConnectionPool, LoadBalancer, OutlierDetection},
};

/// What makes two requests share limits and endpoint health.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    /// A Service, or for [`ClusterKey::app`] the pod.
    pub service: ObjectKey,
    pub subset: Option<String>,
    pub port: u16,
    /// The destination side's own connections to an app: kept apart from any Service of
    /// the same name, so a DestinationRule's limits never count them.
    pub to_app: bool,
}

impl ClusterKey {
    /// The cluster of a Service (subset) port, which DestinationRules configure.
    pub fn service(service: ObjectKey, subset: Option<String>, port: u16) -> Self {
        Self {
            service,
            subset,
            port,
            to_app: false,
        }
    }

    /// The destination proxy's pool of connections to the app of `pod` on `port`.
    pub fn app(pod: ObjectKey, port: u16) -> Self {
        Self {
            service: pod,
            subset: None,
            port,
            to_app: true,
        }
    }
}

/// Every cluster the node's proxy has sent to.
#[derive(Default)]
pub struct Clusters {
    clusters: Mutex<HashMap<ClusterKey, Arc<Cluster>>>,
}

impl Clusters {
    pub fn get(&self, key: &ClusterKey) -> Arc<Cluster> {
        let mut clusters = self.clusters.lock();
        if let Some(cluster) = clusters.get(key) {
            return cluster.clone();
        }
        let cluster = Arc::new(Cluster::new(key.clone()));
        clusters.insert(key.clone(), cluster.clone());
        cluster
    }

    /// Forgets the clusters nothing uses now (no request holds them) that are not worth
    /// keeping: every destination-side cluster (one per app port a caller picked: they
    /// hold nothing but counters) and those of Services that `service_exists` no longer
    /// knows. A Service's cluster stays while the Service does, with its outlier-detection
    /// state and load-balancing position.
    pub fn prune(&self, service_exists: impl Fn(&ObjectKey) -> bool) {
        self.clusters.lock().retain(|key, cluster| {
            let in_use = Arc::strong_count(cluster) > 1;
            in_use || (!key.to_app && service_exists(&key.service))
        });
    }
}

/// Envoy's circuit-breaker defaults are effectively unlimited; so are ours.
const UNLIMITED: u32 = u32::MAX;

pub struct Cluster {
    pub key: ClusterKey,
    round_robin: AtomicUsize,
    endpoints: Mutex<HashMap<SocketAddr, EndpointHealth>>,
    /// Open upstream connections (`tcp.maxConnections`).
    connections: AtomicU32,
    /// Requests waiting for a connection (`http.http1MaxPendingRequests`).
    pending: AtomicU32,
    /// Requests in flight (`http.http2MaxRequests`, which Istio applies to every protocol).
    active_requests: AtomicU32,
    /// Retries in flight (`http.maxRetries`).
    active_retries: AtomicU32,
    /// Signalled when a connection is returned idle or closed: a pending request may go.
    pub released: Notify,
}

#[derive(Debug, Default)]
struct EndpointHealth {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    active_requests: u32,
}

impl EndpointHealth {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }
}

/// How an attempt on an endpoint ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    Status(u16),
    /// Connect failure, reset or timeout: Envoy counts these as gateway errors (and 5xx).
    LocalFailure,
}

impl AttemptResult {
    fn is_5xx(self) -> bool {
        match self {
            AttemptResult::Status(status) => status >= 500,
            AttemptResult::LocalFailure => true,
        }
    }

    fn is_gateway_error(self) -> bool {
        match self {
            AttemptResult::Status(status) => matches!(status, 502..=504),
            AttemptResult::LocalFailure => true,
        }
    }
}

/// Picks by the policy's load balancer: what the request offers to hash on.
#[derive(Clone, Copy, Debug, Default)]
pub struct HashInput(pub Option<u64>);

impl HashInput {
    pub fn of(value: impl Hash) -> Self {
        let mut hasher = std::hash::DefaultHasher::new();
        value.hash(&mut hasher);
        Self(Some(hasher.finish()))
    }
}

impl Cluster {
    fn new(key: ClusterKey) -> Self {
        Self {
            key,
            round_robin: AtomicUsize::new(0),
            endpoints: Mutex::default(),
            connections: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            active_requests: AtomicU32::new(0),
            active_retries: AtomicU32::new(0),
            released: Notify::new(),
        }
    }

    /// Chooses among `candidates`: ejected endpoints and `tried` ones are avoided while
    /// others remain (Envoy's panic mode sends to all when every endpoint is ejected).
    pub fn pick(
        &self,
        candidates: &[SocketAddr],
        load_balancer: &LoadBalancer,
        hash: HashInput,
        tried: &[SocketAddr],
    ) -> Option<SocketAddr> {
        let now = Instant::now();
        let endpoints = self.endpoints.lock();
        let healthy = |addr: &&SocketAddr| !endpoints.get(addr).is_some_and(|h| h.is_ejected(now));
        let fresh: Vec<SocketAddr> = candidates
            .iter()
            .filter(healthy)
            .filter(|addr| !tried.contains(addr))
            .copied()
            .collect();
        let pool: Vec<SocketAddr> = if !fresh.is_empty() {
            fresh
        } else {
            let healthy: Vec<SocketAddr> = candidates.iter().filter(healthy).copied().collect();
            if healthy.is_empty() {
                candidates.to_vec()
            } else {
                healthy
            }
        };
        if pool.is_empty() {
            return None;
        }
        let index = match (load_balancer, hash.0) {
            (LoadBalancer::ConsistentHash(_), Some(hash)) => rendezvous(&pool, hash),
            (LoadBalancer::Random, _) => rand::random_range(0..pool.len()),
            (LoadBalancer::LeastRequest, _) if pool.len() > 1 => {
                // Power of two choices: two distinct random endpoints, the less busy wins.
                let first = rand::random_range(0..pool.len());
                let second = (first + rand::random_range(1..pool.len())) % pool.len();
                let active = |i: usize| endpoints.get(&pool[i]).map_or(0, |h| h.active_requests);
                if active(second) < active(first) {
                    second
                } else {
                    first
                }
            }
            _ => self.round_robin.fetch_add(1, Ordering::Relaxed) % pool.len(),
        };
        Some(pool[index])
    }

    /// Counts a request in flight on `endpoint` until the guard drops; `None` when the
    /// cluster is at `http2MaxRequests` (the caller answers 503 with flag `UO`).
    pub fn start_request(
        self: &Arc<Self>,
        endpoint: SocketAddr,
        pool: &ConnectionPool,
    ) -> Option<ActiveRequest> {
        let limit = pool.http2_max_requests.unwrap_or(UNLIMITED);
        if !try_increment(&self.active_requests, limit) {
            return None;
        }
        let mut endpoints = self.endpoints.lock();
        endpoints.entry(endpoint).or_default().active_requests += 1;
        Some(ActiveRequest {
            cluster: self.clone(),
            endpoint,
        })
    }

    /// Takes one of the cluster's retry slots (`http.maxRetries`); `None` when all are busy.
    pub fn start_retry(self: &Arc<Self>, pool: &ConnectionPool) -> Option<RetrySlot> {
        let limit = pool.max_retries.unwrap_or(UNLIMITED);
        try_increment(&self.active_retries, limit).then(|| RetrySlot {
            cluster: self.clone(),
        })
    }

    /// Reserves a new connection's place under `tcp.maxConnections`.
    pub fn try_open_connection(&self, pool: &ConnectionPool) -> bool {
        try_increment(&self.connections, pool.max_connections.unwrap_or(UNLIMITED))
    }

    /// A connection reserved with [`Self::try_open_connection`] closed (or never opened).
    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
        self.released.notify_one();
    }

    /// Enters the queue of requests waiting for a connection; `false` when it is full.
    pub fn try_enter_pending(&self, pool: &ConnectionPool) -> bool {
        try_increment(
            &self.pending,
            pool.http1_max_pending_requests.unwrap_or(UNLIMITED),
        )
    }

    pub fn leave_pending(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }

    /// Records how an attempt on `endpoint` ended; returns whether it got the endpoint
    /// ejected.
    pub fn report(
        &self,
        endpoint: SocketAddr,
        result: AttemptResult,
        detection: Option<&OutlierDetection>,
        endpoint_count: usize,
    ) -> bool {
        let now = Instant::now();
        let mut endpoints = self.endpoints.lock();
        let ejected_now = endpoints.values().filter(|h| h.is_ejected(now)).count();
        let health = endpoints.entry(endpoint).or_default();
        if !result.is_5xx() {
            health.consecutive_5xx = 0;
            health.consecutive_gateway = 0;
            return false;
        }
        health.consecutive_5xx += 1;
        if result.is_gateway_error() {
            health.consecutive_gateway += 1;
        }
        let Some(detection) = detection else {
            return false;
        };
        let tripped = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        if health.is_ejected(now)
            || !(tripped(health.consecutive_5xx, detection.consecutive_5xx_errors)
                || tripped(
                    health.consecutive_gateway,
                    detection.consecutive_gateway_errors,
                ))
        {
            return false;
        }
        // Envoy ejects while the ejected share stays under the cap, and always allows one.
        let cap = endpoint_count * detection.max_ejection_percent as usize / 100;
        if ejected_now > 0 && ejected_now >= cap {
            return false;
        }
        health.times_ejected = health.times_ejected.saturating_add(1);
        health.ejected_until = Some(ejection_end(
            now,
            detection.base_ejection_time,
            health.times_ejected,
        ));
        health.consecutive_5xx = 0;
        health.consecutive_gateway = 0;
        true
    }

    /// Endpoints ejected right now, for the admin API and tests.
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let endpoints = self.endpoints.lock();
        let mut ejected: Vec<SocketAddr> = endpoints
            .iter()
            .filter(|(_, h)| h.is_ejected(now))
            .map(|(addr, _)| *addr)
            .collect();
        ejected.sort();
        ejected
    }
}

/// When an endpoint ejected for the `times`th time comes back: each ejection lasts longer,
/// base time × times ejected, up to Envoy's `max_ejection_time` default (the greater of
/// 300 s and the base time). Saturating: no configured time can overflow the clock.
fn ejection_end(now: Instant, base: Duration, times: u32) -> Instant {
    let longest = base.max(Duration::from_secs(300));
    let lasts = base.saturating_mul(times).min(longest);
    now.checked_add(lasts)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Increments `counter` unless it is at `limit`.
fn try_increment(counter: &AtomicU32, limit: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok()
}

/// Rendezvous (highest random weight) hashing: a key keeps its endpoint while the set
/// changes around it, and only the keys of a removed endpoint move.
fn rendezvous(pool: &[SocketAddr], hash: u64) -> usize {
    let score = |addr: &SocketAddr| {
        let mut hasher = std::hash::DefaultHasher::new();
        (hash, addr).hash(&mut hasher);
        hasher.finish()
    };
    (0..pool.len())
        .max_by_key(|&i| score(&pool[i]))
        .unwrap_or(0)
}

/// A request counted against its cluster and endpoint while alive.
pub struct ActiveRequest {
    cluster: Arc<Cluster>,
    endpoint: SocketAddr,
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.cluster.active_requests.fetch_sub(1, Ordering::AcqRel);
        let mut endpoints = self.cluster.endpoints.lock();
        if let Some(health) = endpoints.get_mut(&self.endpoint) {
            health.active_requests = health.active_requests.saturating_sub(1);
        }
    }
}

/// A retry counted against `http.maxRetries` while alive.
pub struct RetrySlot {
    cluster: Arc<Cluster>,
}

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.cluster.active_retries.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests;
