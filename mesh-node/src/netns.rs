//! Network namespaces: entering them, finding a pod's, and preparing it for the proxy.
//!
//! The agent serves every pod of its node from one process. It opens each pod's listeners
//! and upstream sockets *inside* that pod's netns by switching the calling thread into it
//! for the duration of a `socket()` call ([`Netns::run`]); a socket keeps the netns it was
//! created in, whatever thread uses it afterwards.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    net::IpAddr,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use mesh_common::marks;
use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::LinkAttribute,
    nsid::{NsidAttribute, NsidMessage},
    route::{RouteScope, RouteType},
    rule::{RuleAction, RuleMessage},
};
use nix::sched::{CloneFlags, setns};
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("setns: {0}")]
    Setns(#[from] nix::Error),
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink connection: {0}")]
    NetlinkSocket(io::Error),
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    inode: u64,
    /// Where it was found, for logs.
    path: PathBuf,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let io_error = |action| {
            move |source| NetnsError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        let file = File::open(path).map_err(io_error("opening"))?;
        let inode = file.metadata().map_err(io_error("stat"))?.ino();
        Ok(Self {
            file,
            inode,
            path: path.to_path_buf(),
        })
    }

    /// The calling thread's netns: the agent's own ("home") when called at start-up.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside this netns, then returns it to `home`.
    ///
    /// `f` must not block or yield: the thread is a shared runtime worker.
    pub fn run<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)?;
        let result = f();
        // Failing to return would leave a runtime thread in a pod's netns: nothing sane can
        // continue from there.
        setns(home.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("returning the thread to the agent's own netns");
        Ok(result)
    }

    /// An rtnetlink handle bound to this netns. Needs a tokio runtime.
    fn netlink(&self, home: &Netns) -> Result<Handle, NetnsError> {
        let (connection, handle, _) = self
            .run(home, rtnetlink::new_connection)?
            .map_err(NetnsError::NetlinkSocket)?;
        tokio::spawn(connection);
        Ok(handle)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Every netns on the machine that a pod could live in: the named ones
/// (`/var/run/netns`, as CNIs and `ip netns` create them) and those of running processes.
fn candidate_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
        paths.extend(entries.filter_map(Result::ok).map(|e| e.path()));
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        paths.extend(
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .map(|e| e.path().join("ns/net")),
        );
    }
    paths
}

/// The network namespaces on the machine whose netns cookie is one of `cookies` (the pods
/// a pinned enrollment names), each once.
pub fn find_by_cookies(cookies: &[u64], home: &Netns) -> Vec<Netns> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for path in candidate_paths() {
        let Ok(netns) = Netns::open(&path) else {
            continue;
        };
        if !seen.insert(netns.inode()) {
            continue;
        }
        let cookie = netns.run(home, || {
            let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
            netns_cookie(&probe)
        });
        if let Ok(Ok(cookie)) = cookie
            && cookies.contains(&cookie)
        {
            found.push(netns);
        }
    }
    found
}

/// The machine's network namespaces as one look saw them, for finding pods' netns: which
/// pod (by UID) each process's cgroup names, and which addresses each netns holds. Each part
/// is read the first time it is asked for, so a round of enrollments (an agent starting on
/// a full node, a node filling up) reads `/proc` and enters every netns once, not once per
/// pod: with 250 pods that was 250 scans of 250 namespaces.
///
/// Processes and namespaces come and go: what it found is checked again when opened (the
/// same inode, still a veth of this node), and a pod it does not find is looked for in a
/// fresh survey on the next round.
#[derive(Default)]
pub struct NetnsSurvey {
    /// Namespaces not to look into (by inode): those of pods enrolled already.
    skip: HashSet<u64>,
    /// Pod UID → `/proc/<pid>/ns/net` of a process in that pod's cgroup, and its inode.
    pods: Option<HashMap<String, (PathBuf, u64)>>,
    /// Address → the namespaces (other than the agent's) holding it, and on which interface.
    addresses: Option<HashMap<IpAddr, Vec<AddressHolder>>>,
}

/// A netns holding an address.
struct AddressHolder {
    path: PathBuf,
    inode: u64,
    ifindex: u32,
}

impl NetnsSurvey {
    /// A survey that does not look into the namespaces `inodes`.
    pub fn skipping(inodes: impl IntoIterator<Item = u64>) -> Self {
        Self {
            skip: inodes.into_iter().collect(),
            ..Self::default()
        }
    }

    /// The netns of the pod with UID `uid`, found through its processes' cgroups: kubelet
    /// puts every container of a pod (the sandbox's pause process included) under a cgroup
    /// named after the pod's UID, whatever the runtime. Unlike the address search this works
    /// before the API server reports the pod's IP, and cannot be fooled by another netns
    /// holding the same IP.
    ///
    /// Processes of the agent's own netns (`home`) are skipped: a host-network pod has no
    /// netns of its own to enroll.
    pub fn find_by_uid(&mut self, uid: &str, home: &Netns) -> Option<Netns> {
        if uid.is_empty() {
            return None;
        }
        let skip = &self.skip;
        let pods = self.pods.get_or_insert_with(|| pods_by_cgroup(home, skip));
        let (path, inode) = pods.get(uid)?;
        // The process may have exited, and its PID gone to another, since the survey.
        let netns = Netns::open(path)
            .ok()
            .filter(|netns| netns.inode() == *inode)?;
        debug!(netns = %netns.path().display(), uid, "found pod netns by UID");
        Some(netns)
    }

    /// The netns that holds one of `ips` on an interface whose veth peer lives in the
    /// agent's own netns (`home`). The peer check is what keeps an agent to its own node's
    /// pods when several nodes share one machine (tests), and is harmless on a real node.
    pub async fn find_by_ips(
        &mut self,
        ips: &[IpAddr],
        home: &Netns,
    ) -> Result<Option<Netns>, NetnsError> {
        let skip = &self.skip;
        let addresses = self
            .addresses
            .get_or_insert_with(|| addresses_by_netns(home, skip));
        // Plain loops: an iterator adapter's closure held across the await makes the
        // enrollment task's future not `Send`.
        for ip in ips {
            let Some(holders) = addresses.get(ip) else {
                continue;
            };
            for holder in holders {
                let Ok(netns) = Netns::open(&holder.path) else {
                    continue; // the process exited meanwhile
                };
                if netns.inode() == holder.inode
                    && peer_lives_in(&netns, holder.ifindex, home).await?
                {
                    debug!(netns = %holder.path.display(), holder.ifindex, "found pod netns");
                    return Ok(Some(netns));
                }
            }
        }
        Ok(None)
    }
}

/// Pod UID → the netns path of one of its processes (outside `home` and `skip`), from every
/// process's cgroup.
fn pods_by_cgroup(home: &Netns, skip: &HashSet<u64>) -> HashMap<String, (PathBuf, u64)> {
    let mut pods = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pods;
    };
    for entry in entries.filter_map(Result::ok) {
        let pid = entry.path();
        let path = pid.join("ns/net");
        // The netns first (a stat): most processes of a full node are the agent's own
        // netns's or enrolled pods', whose cgroups need not be read.
        let Ok(inode) = std::fs::metadata(&path).map(|netns| netns.ino()) else {
            continue; // not a process, or it exited meanwhile
        };
        if inode == home.inode() || skip.contains(&inode) {
            continue;
        }
        let Ok(cgroups) = std::fs::read_to_string(pid.join("cgroup")) else {
            continue;
        };
        for uid in cgroups.lines().flat_map(pod_uids_of_cgroup_line) {
            pods.entry(uid).or_insert_with(|| (path.clone(), inode));
        }
    }
    pods
}

/// Every address of every netns on the machine but `home` and `skip`, with who holds it.
fn addresses_by_netns(home: &Netns, skip: &HashSet<u64>) -> HashMap<IpAddr, Vec<AddressHolder>> {
    let mut seen = skip.clone();
    seen.insert(home.inode());
    let mut addresses: HashMap<IpAddr, Vec<AddressHolder>> = HashMap::new();
    for path in candidate_paths() {
        // A stat first: most paths are namespaces seen already or skipped.
        let Ok(inode) = std::fs::metadata(&path).map(|netns| netns.ino()) else {
            continue; // the process exited meanwhile
        };
        if !seen.insert(inode) {
            continue;
        }
        let Ok(netns) = Netns::open(&path) else {
            continue;
        };
        let Ok(held) = netns.run(home, || {
            local_addresses()
                .into_iter()
                .filter_map(|(interface, ip)| {
                    let ifindex = nix::net::if_::if_nametoindex(interface.as_str()).ok()?;
                    Some((ip, ifindex))
                })
                .collect::<Vec<_>>()
        }) else {
            continue;
        };
        for (ip, ifindex) in held {
            addresses.entry(ip).or_default().push(AddressHolder {
                path: path.clone(),
                inode: netns.inode(),
                ifindex,
            });
        }
    }
    addresses
}

/// The pod UIDs a `/proc/<pid>/cgroup` line (`<id>:<controllers>:<path>`) may put the
/// process under, as kubelet names pod cgroups with either driver:
/// * cgroupfs: `/kubepods/burstable/pod<uid>/<container>`;
/// * systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with
///   '-' replaced by '_'>.slice/cri-containerd-<container>.scope`.
///
/// Whole path segments are read, so one UID never matches inside another; a segment that
/// merely looks like a pod's yields a UID no pod has.
fn pod_uids_of_cgroup_line(line: &str) -> impl Iterator<Item = String> + '_ {
    let path = line.splitn(3, ':').nth(2).unwrap_or_default();
    path.split('/').filter_map(|segment| {
        if let Some(uid) = segment.strip_prefix("pod") {
            return Some(uid.to_owned());
        }
        let slice = segment.strip_suffix(".slice")?;
        let (_, uid) = slice.rsplit_once("-pod")?;
        Some(uid.replace('_', "-"))
    })
}

/// Every IP address of the calling thread's netns, with the interface that holds it; empty
/// when they cannot be listed.
pub fn local_addresses() -> Vec<(String, IpAddr)> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addresses
        .filter_map(|address| {
            let storage = address.address?;
            let ip = if let Some(v4) = storage.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(storage.as_sockaddr_in6()?.ip())
            };
            Some((address.interface_name, ip))
        })
        .collect()
}

/// Whether interface `ifindex` of `netns` is a veth whose other end is in `home`.
async fn peer_lives_in(netns: &Netns, ifindex: u32, home: &Netns) -> Result<bool, NetnsError> {
    let mut handle = netns.netlink(home)?;
    let Some(link) = handle
        .link()
        .get()
        .match_index(ifindex)
        .execute()
        .try_next()
        .await?
    else {
        return Ok(false);
    };
    let Some(peer_nsid) = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkNetNsId(id) => Some(*id),
        _ => None,
    }) else {
        return Ok(false);
    };
    // Ask the pod's netns which id it gives the agent's netns.
    let mut request = NsidMessage::default();
    request
        .attributes
        .push(NsidAttribute::Fd(home.as_fd().as_raw_fd() as u32));
    let mut message = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(request));
    message.header.flags = NLM_F_REQUEST;
    let mut replies = handle.request(message)?;
    while let Some(reply) = futures::StreamExt::next(&mut replies).await {
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(nsid)) = reply.payload {
            let home_nsid = nsid.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) => Some(*id),
                _ => None,
            });
            return Ok(home_nsid == Some(peer_nsid) && peer_nsid >= 0);
        }
    }
    Ok(false)
}

/// Kernel id of the `local` routing table.
const LOCAL_TABLE: u32 = 255;
/// Where the `local` table's rule moves to, so the mark rule can come before it.
const LOCAL_RULE_PRIORITY: u32 = 100;
/// The mark rule's priority: before the `local` table.
const MARK_RULE_PRIORITY: u32 = 50;

/// Policy routing that lets the proxy dial the app with the caller's address as source:
/// the app's replies carry [`marks::INBOUND_TRANSPARENT`] (accepted sockets inherit the
/// SYN's mark with `tcp_fwmark_accept`) and are routed to `lo`, back to the proxy. No
/// iptables involved.
///
/// The mark rule must come *before* the `local` table (which is moved from priority 0 to
/// [`LOCAL_RULE_PRIORITY`], as Cilium does): a marked packet to the pod's own address then
/// resolves to `lo` instead of the pod's interface, and the kernel reports `lo` as its
/// ingress interface to `sk_lookup`, which is how the proxy's own dial escapes re-capture.
pub async fn install_inbound_routing(netns: &Netns, home: &Netns) -> Result<(), NetnsError> {
    netns.run(home, || {
        // The app's replies to the proxy's transparent connections carry the mark back
        // (accepted sockets: tcp_fwmark_accept; resets and ICMP errors when nothing listens:
        // fwmark_reflect), so they route to the proxy rather than out to the caller's real
        // address, and a dead app is refused at once instead of timing out.
        for (path, required) in [
            ("/proc/sys/net/ipv4/tcp_fwmark_accept", true),
            ("/proc/sys/net/ipv4/fwmark_reflect", true),
            ("/proc/sys/net/ipv6/fwmark_reflect", false),
        ] {
            match std::fs::write(path, "1") {
                Ok(()) => {}
                // A pod without IPv6 has no IPv6 sysctls.
                Err(_) if !required => {}
                Err(source) => {
                    return Err(NetnsError::Io {
                        action: "writing",
                        path: path.into(),
                        source,
                    });
                }
            }
        }
        Ok(())
    })??;
    let handle = netns.netlink(home)?;
    for v6 in [false, true] {
        match add_inbound_rules(&handle, v6).await {
            Ok(()) => {}
            // A pod without IPv6 support cannot route v6 at all; v4 is what matters.
            Err(error) if v6 => debug!(%error, "no IPv6 inbound routing in pod"),
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Treats "already there" as success: a restarted agent finds its own earlier work.
fn ignore_exists(result: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match result {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other,
    }
}

fn rule_message(
    handle: &Handle,
    v6: bool,
    priority: u32,
    mark: Option<u32>,
    table: u32,
) -> RuleMessage {
    let mut rule = handle
        .rule()
        .add()
        .table_id(table)
        .action(RuleAction::ToTable)
        .priority(priority);
    if let Some(mark) = mark {
        rule = rule.fw_mark(mark);
    }
    if v6 {
        rule.v6().message_mut().clone()
    } else {
        rule.v4().message_mut().clone()
    }
}

async fn add_rule(handle: &Handle, message: RuleMessage) -> Result<(), rtnetlink::Error> {
    let mut request = handle.rule().add();
    *request.message_mut() = message;
    ignore_exists(request.execute().await)
}

async fn add_inbound_rules(handle: &Handle, v6: bool) -> Result<(), rtnetlink::Error> {
    let lo = 1; // `lo` is always interface 1 in a netns
    let route = if v6 {
        RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(std::net::Ipv6Addr::UNSPECIFIED, 0)
            .output_interface(lo)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(marks::INBOUND_ROUTE_TABLE)
            .build()
    } else {
        RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(std::net::Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(lo)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(marks::INBOUND_ROUTE_TABLE)
            .build()
    };
    ignore_exists(handle.route().add(route).execute().await)?;
    // Order matters: the local table is never unreachable while the rules move.
    add_rule(
        handle,
        rule_message(handle, v6, LOCAL_RULE_PRIORITY, None, LOCAL_TABLE),
    )
    .await?;
    add_rule(
        handle,
        rule_message(
            handle,
            v6,
            MARK_RULE_PRIORITY,
            Some(marks::INBOUND_TRANSPARENT),
            marks::INBOUND_ROUTE_TABLE,
        ),
    )
    .await?;
    if let Err(error) = handle
        .rule()
        .del(rule_message(handle, v6, 0, None, LOCAL_TABLE))
        .execute()
        .await
    {
        debug!(%error, v6, "local rule at priority 0 already moved");
    }
    Ok(())
}

/// Restores the pod's routing rules. Best effort: the pod may be gone.
pub async fn remove_inbound_routing(netns: &Netns, home: &Netns) {
    let Ok(handle) = netns.netlink(home) else {
        return;
    };
    for v6 in [false, true] {
        let restore = add_rule(&handle, rule_message(&handle, v6, 0, None, LOCAL_TABLE)).await;
        if let Err(error) = restore {
            debug!(%error, v6, "restoring the local rule");
            continue; // keep the moved rule rather than leave no local table at all
        }
        for message in [
            rule_message(
                &handle,
                v6,
                MARK_RULE_PRIORITY,
                Some(marks::INBOUND_TRANSPARENT),
                marks::INBOUND_ROUTE_TABLE,
            ),
            rule_message(&handle, v6, LOCAL_RULE_PRIORITY, None, LOCAL_TABLE),
        ] {
            if let Err(error) = handle.rule().del(message).execute().await {
                debug!(%error, v6, "removing inbound rule");
            }
        }
    }
}

/// The cookie of the netns a socket was created in (`SO_NETNS_COOKIE`, kernel 5.14+): the
/// key the eBPF programs know a pod's netns by.
#[expect(
    unsafe_code,
    reason = "getsockopt(SO_NETNS_COOKIE) has no safe wrapper in nix"
)]
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b6f1f6e-3a7c-4d2e-9f1a-2c3d4e5f6a7b";

    #[test]
    fn cgroup_lines_of_both_kubelet_drivers_name_the_pod() {
        for line in [
            // cgroupfs driver, cgroup v2 and a v1 controller line.
            "0::/kubepods/burstable/pod0b6f1f6e-3a7c-4d2e-9f1a-2c3d4e5f6a7b/4f3c2b1a",
            "4:memory:/kubepods/besteffort/pod0b6f1f6e-3a7c-4d2e-9f1a-2c3d4e5f6a7b/4f3c2b1a",
            // Guaranteed pods sit directly under kubepods.
            "0::/kubepods/pod0b6f1f6e-3a7c-4d2e-9f1a-2c3d4e5f6a7b",
            // systemd driver.
            "0::/kubepods.slice/kubepods-burstable.slice/             kubepods-burstable-pod0b6f1f6e_3a7c_4d2e_9f1a_2c3d4e5f6a7b.slice/             cri-containerd-4f3c2b1a.scope",
            "0::/kubepods.slice/kubepods-pod0b6f1f6e_3a7c_4d2e_9f1a_2c3d4e5f6a7b.slice",
            // Seen from an agent in its own cgroup namespace.
            "0::/../../kubepods/burstable/pod0b6f1f6e-3a7c-4d2e-9f1a-2c3d4e5f6a7b/4f3c2b1a",
        ] {
            assert!(
                pod_uids_of_cgroup_line(line).any(|uid| uid == UID),
                "{line}"
            );
        }
    }

    #[test]
    fn other_pods_and_prefixes_do_not_match() {
        for line in [
            "0::/kubepods/burstable/pod1b6f1f6e-3a7c-4d2e-9f1a-2c3d4e5f6a7b/4f3c2b1a",
            // The UID as a prefix of a longer one.
            "0::/kubepods/burstable/pod0b6f1f6e-3a7c-4d2e-9f1a-2c3d4e5f6a7b0/4f3c2b1a",
            "0::/kubepods.slice/kubepods-burstable.slice/             kubepods-burstable-podx0b6f1f6e_3a7c_4d2e_9f1a_2c3d4e5f6a7b.slice",
            "0::/system.slice/containerd.service",
            "garbage",
        ] {
            assert!(
                !pod_uids_of_cgroup_line(line).any(|uid| uid == UID),
                "{line}"
            );
        }
    }
}
