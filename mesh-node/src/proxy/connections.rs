//! The connections the proxy holds right now, for the admin API's `/connections` and
//! `mesh-node debug connections`.
//!
//! `serve` registers each accepted connection with what is known when it is accepted and
//! keeps the returned [`Registered`] guard in the connection's task, so the entry leaves
//! the registry however the connection ends (closed, failed, or its task dropped on
//! shutdown). Bytes are not tracked here: they are counted where the data is copied and
//! reported in the `istio_tcp_*` metrics when the connection closes.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use parking_lot::Mutex;
use serde::{Serialize, Serializer};
use tokio::net::TcpStream;

use super::{Direction, PodContext, ProxyContext};
use crate::inventory::ObjectKey;

/// One live connection, as the proxy accepted it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Connection {
    /// `outbound`, `inbound` or `hbone` (the listener it arrived on).
    pub direction: &'static str,
    /// The enrolled pod whose listener accepted it.
    pub pod: ObjectKey,
    /// The accepted socket's peer: the pod's own socket for outbound (on loopback: the
    /// connect hooks send it to the in-pod listener), the caller for inbound, the calling
    /// pod (its node proxy dials from inside it) for HBONE.
    pub client: SocketAddr,
    /// Where the client was going: recorded by the connect hooks for outbound, the
    /// address `sk_lookup` kept for inbound, the pod's HBONE port for a tunnel.
    pub original_destination: Option<SocketAddr>,
    /// What the original destination names, when known: `Service ns/name`, `Pod
    /// ns/name` or `passthrough` (outbound), `app` (inbound), `HBONE tunnel`.
    pub upstream: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub opened_at: SystemTime,
}

fn rfc3339<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_rfc3339_millis(*time))
}

/// The registry: cheap to share, one short lock per connection opened or closed.
#[derive(Debug, Default)]
pub struct Connections {
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Connection>>,
}

impl Connections {
    /// Adds `connection` until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, connection: Connection) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.live.lock().insert(id, connection);
        Registered {
            registry: self.clone(),
            id,
        }
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.lock().is_empty()
    }

    /// The live connections, oldest first.
    pub fn snapshot(&self) -> Vec<Connection> {
        self.live.lock().values().cloned().collect()
    }
}

/// Keeps its connection in the registry while it lives.
#[must_use = "the connection leaves the registry as soon as the guard is dropped"]
#[derive(Debug)]
pub struct Registered {
    registry: Arc<Connections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.live.lock().remove(&self.id);
    }
}

/// What `serve` knows of a connection it just accepted from `client`.
pub(super) fn accepted(
    direction: Direction,
    pod: &PodContext,
    proxy: &ProxyContext,
    stream: &TcpStream,
    client: SocketAddr,
) -> Connection {
    // For inbound, `sk_lookup` kept the address the client asked for as the socket's own.
    let local = || stream.local_addr().ok();
    let (original_destination, upstream) = match direction {
        Direction::Outbound => {
            // Looked at, not taken: the outbound handler takes it.
            let original = proxy
                .capture
                .as_ref()
                .and_then(|capture| capture.original_destination(pod.netns_cookie, client));
            let upstream = original.map(|original| {
                let state = proxy.state.borrow();
                if let Some(service) = state.service_by_ip(original.ip()) {
                    format!("Service {}", service.key)
                } else if let Some(workload) = state.workload_by_ip(original.ip()) {
                    format!("Pod {}", workload.key)
                } else {
                    "passthrough".to_string()
                }
            });
            (original, upstream)
        }
        Direction::Inbound => (local(), Some("app".to_string())),
        Direction::Hbone => (local(), Some("HBONE tunnel".to_string())),
    };
    Connection {
        direction: direction.as_str(),
        pod: pod.key.clone(),
        client,
        original_destination,
        upstream,
        opened_at: SystemTime::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(client: &str) -> Connection {
        Connection {
            direction: "inbound",
            pod: ObjectKey::new("shop", "web-1"),
            client: client.parse().unwrap(),
            original_destination: Some("10.0.0.1:8080".parse().unwrap()),
            upstream: Some("app".into()),
            opened_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn entries_live_as_long_as_their_guard() {
        let registry = Arc::new(Connections::default());
        let first = registry.register(connection("10.0.0.9:40000"));
        let second = registry.register(connection("10.0.0.9:40001"));
        let clients = |r: &Connections| -> Vec<String> {
            r.snapshot().iter().map(|c| c.client.to_string()).collect()
        };
        assert_eq!(
            clients(&registry),
            ["10.0.0.9:40000", "10.0.0.9:40001"],
            "oldest first"
        );
        drop(first);
        assert_eq!(clients(&registry), ["10.0.0.9:40001"]);
        drop(second);
        assert!(registry.snapshot().is_empty());
    }

    #[test]
    fn opening_time_serializes_as_rfc3339() {
        let json = serde_json::to_value(connection("10.0.0.9:40000")).unwrap();
        assert_eq!(json["opened_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(json["original_destination"], "10.0.0.1:8080");
        assert_eq!(json["pod"]["name"], "web-1");
    }
}
