//! Kubelet's probes: plaintext from the node itself reaches its pods past the policies.
//!
//! kubelet probes pods from the node's own network namespace, in plaintext and without an
//! identity. Under a STRICT PeerAuthentication (or an ALLOW-only AuthorizationPolicy) a
//! probed pod would never become ready. Istio ambient lets such traffic through: its CNI
//! SNATs every connection that a socket of the node opens (iptables `--socket-exists`) to a
//! link-local source, and ztunnel lets that source pass. Nodemesh needs no iptables: the
//! capture's `sockops` program records every connection a socket in the node's netns
//! establishes, and the proxy lets plaintext pass when its source is one of the node's
//! addresses (checked first: cheap) and the kernel recorded it. That covers kubelet and the
//! node's host-network processes, as in Istio. It does not cover traffic that kube-proxy
//! forwards with SNAT to a node address (a NodePort with `externalTrafficPolicy: Cluster`):
//! no node socket opened it, so it is judged like any client, and so is a pod on the node
//! or anything on another node.
use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

/// How long a listing of the node's addresses is reused: addresses change rarely (a new
/// pod's veth gateway), and a probe that misses one is retried by kubelet.
const REFRESH: Duration = Duration::from_secs(5);

/// The node's own addresses (the agent's network namespace), listed at most every
/// [`REFRESH`].
#[derive(Default)]
pub struct NodeAddresses {
    listed: Mutex<Option<(Instant, Arc<[IpAddr]>)>>,
}

impl NodeAddresses {
    /// Whether `ip` is one of the node's own addresses. Must be called outside any pod's
    /// netns (as every proxy task is).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let addresses = {
            let mut listed = self.listed.lock();
            match &*listed {
                Some((at, addresses)) if at.elapsed() < REFRESH => addresses.clone(),
                _ => {
                    let addresses: Arc<[IpAddr]> = crate::netns::local_addresses()
                        .into_iter()
                        .map(|(_, ip)| ip)
                        .filter(|ip| !ip.is_loopback())
                        .collect();
                    *listed = Some((Instant::now(), addresses.clone()));
                    addresses
                }
            }
        };
        addresses.contains(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_s_addresses_are_its_own_and_nothing_else() {
        let nodes = NodeAddresses::default();
        let own: Vec<IpAddr> = crate::netns::local_addresses()
            .into_iter()
            .map(|(_, ip)| ip)
            .filter(|ip| !ip.is_loopback())
            .collect();
        for ip in &own {
            assert!(nodes.contains(*ip), "{ip} is an address of this netns");
        }
        assert!(
            !nodes.contains("127.0.0.1".parse().unwrap()),
            "loopback is the pod talking to itself, never the node"
        );
        assert!(!nodes.contains("192.0.2.77".parse().unwrap()));
    }
}
