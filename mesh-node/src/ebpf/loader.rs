//! Loads the embedded eBPF object, attaches it, and owns its maps.
use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, IterableMap, Map, MapData, MapError, MapKeys, PerCpuArray, SockHash},
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SkMsg, SockOps,
        links::{FdLink, LinkError},
    },
};
use mesh_common::{
    EnrolledNetns, ListenerKey, LoopbackKey, OrigDstKey, SockAddr, capacity, counters, maps,
    programs, settings,
};
use parking_lot::Mutex;
use tracing::{debug, info};

use super::{
    addr::{from_sock_addr, to_listener_key, to_sock_addr},
    pins::{self, Pins, ProgramPrint},
};

/// The object built by `build.rs` from the mesh-ebpf crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program: {0}")]
    Program(#[from] ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] MapError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("duplicating the descriptor of map {map} to count its entries: {source}")]
    DuplicateMap {
        map: &'static str,
        source: std::io::Error,
    },
    #[error("reading the agent's own netns cookie: {0}")]
    OwnNetns(#[source] std::io::Error),
    #[error("{action} {path}: {source}")]
    Pins {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning {0}: {1}")]
    Pin(PathBuf, #[source] PinError),
    #[error("eBPF link: {0}")]
    Link(#[from] LinkError),
}

/// Snapshot of the kernel-side event counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub outbound_redirected: u64,
    pub outbound_proxy_bypass: u64,
    pub inbound_steered: u64,
    pub inbound_no_listener: u64,
    pub orig_dst_table_full: u64,
    pub sockmap_entered: u64,
    pub sockmap_redirected: u64,
    pub sockmap_fell_back: u64,
}

/// How full one of the agent's maps is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// The map's name in the eBPF object (one of `mesh_common::maps`).
    pub map: &'static str,
    pub entries: u32,
    /// Its `max_entries` (one of `mesh_common::capacity`).
    pub capacity: u32,
}

/// The loaded, attached capture programs. Links and maps are pinned ([`Pins`]): dropping
/// it (the agent stopping) leaves capture in force for the next agent, which adopts it.
pub struct Capture {
    control: Mutex<Control>,
    /// Separate lock: read on every accepted connection.
    orig_dst: Mutex<HashMap<MapData, OrigDstKey, SockAddr>>,
    /// Connections the node's own sockets opened, read for plaintext from a node address.
    node_connections: Mutex<HashMap<MapData, SockAddr, u32>>,
    counters: PerCpuArray<MapData, u64>,
    census: Vec<Census>,
    /// Captured connections' in-pod ends may be in the loopback sockhash: this agent's
    /// `--sockmap`, or the one before it (connections it accepted, or that were made while
    /// no agent ran, followed its setting).
    loopback_accelerated: bool,
}

/// Counts the keys of one map through a descriptor of its own, so a count (up to 65,536
/// lookups) never holds the locks the data path takes.
struct Census {
    map: &'static str,
    capacity: u32,
    count: Box<dyn Fn(u32) -> u32 + Send + Sync>,
}

struct Control {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, EnrolledNetns>,
    listeners: SockHash<MapData, ListenerKey>,
    /// Which pod (netns cookie) each listener entry was last written for. A pod's address
    /// can be reused by a new pod before the old one is un-enrolled: the old pod's
    /// un-enrollment must then leave the new pod's entry alone (the kernel cannot say whose
    /// socket an entry holds).
    listener_owners: StdHashMap<ListenerKey, u64>,
    pins: Pins,
    /// This agent's `sk_lookup` program: a pod's pinned link running it is adopted as it is.
    sk_lookup_print: ProgramPrint,
    /// Whether the programs of pods' pinned links (by id) are like this agent's.
    sk_lookup_judged: StdHashMap<u32, bool>,
}

impl Capture {
    /// Loads the programs and attaches the cgroup ones to `cgroup_path`, adopting the
    /// links and maps an earlier agent pinned under `pins` (replacing a link that runs
    /// another version of its program, make before break). With `sockmap`, new captured
    /// connections' loopback leg is accelerated (`sk_msg`); without, it goes through TCP.
    pub fn attach(cgroup_path: &Path, pins: Pins, sockmap: bool) -> Result<Self, CaptureError> {
        let mut loader = EbpfLoader::new();
        let map_pins: Vec<(&str, PathBuf)> = maps::ALL
            .iter()
            .map(|name| (*name, pins.map(name)))
            .collect();
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let cgroup = File::open(cgroup_path).map_err(|source| CaptureError::Cgroup {
            path: cgroup_path.to_path_buf(),
            source,
        })?;
        for name in [programs::CONNECT4, programs::CONNECT6] {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(CaptureError::Missing(name))?
                .try_into()?;
            program.load()?;
            let pin = pins.cgroup_link(name);
            if pins::pinned_link_runs(
                &pin,
                &ProgramPrint::of(program.info())?,
                &mut StdHashMap::new(),
            ) {
                debug!(program = name, "adopted the pinned link");
                continue;
            }
            // aya attaches through a bpf_link (5.7+), which always coexists with other
            // programs on the cgroup (other CNIs, meshes, the link it replaces); the kernel
            // refuses link flags.
            let link = program.attach(&cgroup, CgroupAttachMode::Single)?;
            pins::pin_replacing(FdLink::try_from(program.take_link(link)?)?, &pin)?;
        }
        let sockops: &mut SockOps = ebpf
            .program_mut(programs::SOCKOPS)
            .ok_or(CaptureError::Missing(programs::SOCKOPS))?
            .try_into()?;
        sockops.load()?;
        let pin = pins.cgroup_link(programs::SOCKOPS);
        if !pins::pinned_link_runs(
            &pin,
            &ProgramPrint::of(sockops.info())?,
            &mut StdHashMap::new(),
        ) {
            let link = sockops.attach(&cgroup, CgroupAttachMode::Single)?;
            pins::pin_replacing(FdLink::try_from(sockops.take_link(link)?)?, &pin)?;
        }
        let sk_lookup: &mut SkLookup = ebpf
            .program_mut(programs::SK_LOOKUP)
            .ok_or(CaptureError::Missing(programs::SK_LOOKUP))?
            .try_into()?;
        sk_lookup.load()?;
        let sk_lookup_print = ProgramPrint::of(sk_lookup.info())?;

        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(CaptureError::Missing(name));
        let enrolled: HashMap<_, u64, EnrolledNetns> =
            HashMap::try_from(take(maps::ENROLLED_NETNS)?)?;
        let orig_dst: HashMap<_, OrigDstKey, SockAddr> =
            HashMap::try_from(take(maps::ORIG_DST_BY_TUPLE)?)?;
        let listeners: SockHash<_, ListenerKey> =
            SockHash::try_from(take(maps::INBOUND_LISTENERS)?)?;
        let counters = PerCpuArray::try_from(take(maps::COUNTERS)?)?;
        // Only the kernel side uses it; the agent holds it just to count its entries.
        let by_cookie: HashMap<_, u64, SockAddr> =
            HashMap::try_from(take(maps::ORIG_DST_BY_COOKIE)?)?;
        let node_connections: HashMap<_, SockAddr, u32> =
            HashMap::try_from(take(maps::NODE_CONNECTIONS)?)?;
        // The node's netns is the agent's own: its sockets' connections are the node's.
        let mut host_netns: Array<_, u64> = Array::try_from(take(maps::HOST_NETNS)?)?;
        host_netns.set(0, own_netns_cookie()?, 0)?;
        let loopback_sockets: SockHash<_, LoopbackKey> =
            SockHash::try_from(take(maps::LOOPBACK_SOCKETS)?)?;
        let fell_back: HashMap<_, LoopbackKey, u32> =
            HashMap::try_from(take(maps::LOOPBACK_FELL_BACK)?)?;
        let mut settings_map: Array<_, u32> = Array::try_from(take(maps::SETTINGS)?)?;
        // The verdict program before the switch: a socket takes its sockhash's programs
        // when it enters, so one entered without it would never be accelerated.
        let sk_msg: &mut SkMsg = ebpf
            .program_mut(programs::SK_MSG)
            .ok_or(CaptureError::Missing(programs::SK_MSG))?
            .try_into()?;
        sk_msg.load()?;
        let link = sk_msg.attach(loopback_sockets.fd())?;
        // The attachment belongs to the pinned map, not to this process: kept when the
        // agent exits, so connections entered meanwhile are still accelerated; the next
        // agent's attachment replaces it.
        std::mem::forget(sk_msg.take_link(link)?);
        let was_on = settings_map.get(&settings::SOCKMAP, 0)? != 0;
        settings_map.set(settings::SOCKMAP, u32::from(sockmap), 0)?;
        let census = vec![
            Census::of_hash(maps::ENROLLED_NETNS, capacity::ENROLLED_NETNS, &enrolled)?,
            Census::of_hash(maps::ORIG_DST_BY_COOKIE, capacity::ORIG_DST, &by_cookie)?,
            Census::of_hash(maps::ORIG_DST_BY_TUPLE, capacity::ORIG_DST, &orig_dst)?,
            Census::of_hash(
                maps::NODE_CONNECTIONS,
                capacity::NODE_CONNECTIONS,
                &node_connections,
            )?,
            Census::of_sock_hash(
                maps::INBOUND_LISTENERS,
                capacity::INBOUND_LISTENERS,
                &listeners,
            )?,
            Census::of_sock_hash(
                maps::LOOPBACK_SOCKETS,
                capacity::LOOPBACK_SOCKETS,
                &loopback_sockets,
            )?,
            Census::of_hash(
                maps::LOOPBACK_FELL_BACK,
                capacity::LOOPBACK_FELL_BACK,
                &fell_back,
            )?,
        ];
        info!(
            cgroup = %cgroup_path.display(),
            pins = %pins.root().display(),
            enrolled = pins.pinned_netns().len(),
            sockmap,
            "eBPF capture attached"
        );
        Ok(Self {
            control: Mutex::new(Control {
                ebpf,
                enrolled,
                listeners,
                listener_owners: StdHashMap::new(),
                pins,
                sk_lookup_print,
                sk_lookup_judged: StdHashMap::new(),
            }),
            orig_dst: Mutex::new(orig_dst),
            node_connections: Mutex::new(node_connections),
            counters,
            census,
            loopback_accelerated: sockmap || was_on,
        })
    }

    /// Whether a captured connection's socket accepted by an in-pod outbound listener may
    /// receive its bytes through the loopback sockhash. Then `splice` must not read it: the
    /// kernel's splice reads only what came through TCP, and would wait forever.
    pub fn loopback_accelerated(&self) -> bool {
        self.loopback_accelerated
    }

    /// Starts capturing a pod: its outbound connects (by netns cookie) and its inbound
    /// connections to `inbound` (pod address → that family's 15006 listener).
    pub fn enroll(
        &self,
        netns_cookie: u64,
        netns: impl AsFd,
        inbound: &[(IpAddr, &dyn AsRawFd)],
    ) -> Result<(), CaptureError> {
        let mut control = self.control.lock();
        for (ip, listener) in inbound {
            let key = to_listener_key(*ip);
            control.listeners.insert(key, listener.as_raw_fd(), 0)?;
            control.listener_owners.insert(key, netns_cookie);
        }
        let pin = control.pins.netns_link(netns_cookie);
        let Control {
            sk_lookup_print,
            sk_lookup_judged,
            ..
        } = &mut *control;
        if !pins::pinned_link_runs(&pin, sk_lookup_print, sk_lookup_judged) {
            let program: &mut SkLookup = control
                .ebpf
                .program_mut(programs::SK_LOOKUP)
                .ok_or(CaptureError::Missing(programs::SK_LOOKUP))?
                .try_into()?;
            let link = program.attach(netns)?;
            pins::pin_replacing(FdLink::from(program.take_link(link)?), &pin)?;
        }
        control
            .enrolled
            .insert(netns_cookie, EnrolledNetns::default(), 0)?;
        debug!(netns_cookie, "netns enrolled in eBPF maps");
        Ok(())
    }

    /// Stops capturing a pod. Best effort: every step runs even when one fails.
    pub fn unenroll(&self, netns_cookie: u64, inbound_ips: &[IpAddr]) {
        let mut control = self.control.lock();
        if let Err(error) = control.enrolled.remove(&netns_cookie) {
            debug!(netns_cookie, %error, "netns was not in the enrolled map");
        }
        for ip in inbound_ips {
            let key = to_listener_key(*ip);
            if control.listener_owners.get(&key) == Some(&netns_cookie) {
                control.listener_owners.remove(&key);
                let _ = control.listeners.remove(&key);
            } else {
                debug!(netns_cookie, %ip, "address now belongs to another pod; its listener stays");
            }
        }
        pins::unpin(&control.pins.netns_link(netns_cookie));
        debug!(netns_cookie, "netns removed from eBPF maps");
    }

    /// Forgets every pod an earlier agent enrolled that is not in `enrolled` (the pods
    /// this agent enrolled or adopted): pods that left the node while no agent ran. Call it
    /// once the first reconcile against a published config is done.
    pub fn retain(&self, enrolled: &[u64]) {
        let mut control = self.control.lock();
        let stale: Vec<u64> = control
            .enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|cookie| !enrolled.contains(cookie))
            .collect();
        for cookie in &stale {
            let _ = control.enrolled.remove(cookie);
        }
        for cookie in control.pins.pinned_netns() {
            if !enrolled.contains(&cookie) {
                pins::unpin(&control.pins.netns_link(cookie));
            }
        }
        let orphaned: Vec<ListenerKey> = control
            .listeners
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !control.listener_owners.contains_key(key))
            .collect();
        for key in &orphaned {
            let _ = control.listeners.remove(key);
        }
        info!(
            forgotten = stale.len(),
            orphaned_listeners = orphaned.len(),
            "pinned enrollment reconciled"
        );
    }

    /// The pods (netns cookies) a pinned capture has enrolled, read without loading
    /// anything: what `mesh-node uninstall` restores.
    pub fn pinned_enrollment(pins: &Pins) -> Result<Vec<u64>, CaptureError> {
        let path = pins.map(maps::ENROLLED_NETNS);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let map = Map::HashMap(MapData::from_pin(&path)?);
        let enrolled: HashMap<MapData, u64, EnrolledNetns> = HashMap::try_from(map)?;
        Ok(enrolled.keys().filter_map(Result::ok).collect())
    }

    /// The destination a captured connection asked for, given the in-pod listener's view
    /// of it (its netns and the peer address). Consumes the record.
    pub fn take_original_destination(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
    ) -> Option<SocketAddr> {
        let key = orig_dst_key(netns_cookie, client);
        let mut table = self.orig_dst.lock();
        let original = table.get(&key, 0).ok()?;
        let _ = table.remove(&key);
        from_sock_addr(&original)
    }

    /// Like [`take_original_destination`](Self::take_original_destination), leaving the
    /// record for the handler that takes it (the connection registry looks first).
    pub fn original_destination(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
    ) -> Option<SocketAddr> {
        let key = orig_dst_key(netns_cookie, client);
        let table = self.orig_dst.lock();
        from_sock_addr(&table.get(&key, 0).ok()?)
    }

    /// Whether the connection whose client end is `client` was opened by one of the node's
    /// own sockets (the kernel saw it established in the node's netns), rather than merely
    /// carrying a node address, as traffic kube-proxy forwards with SNAT does. Consumes
    /// the record.
    pub fn take_node_connection(&self, client: SocketAddr) -> bool {
        let key = to_sock_addr(client);
        let mut table = self.node_connections.lock();
        let found = table.get(&key, 0).is_ok();
        if found {
            let _ = table.remove(&key);
        }
        found
    }

    pub fn counters(&self) -> Counters {
        let read = |index: u32| -> u64 {
            self.counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        Counters {
            outbound_redirected: read(counters::OUTBOUND_REDIRECTED),
            outbound_proxy_bypass: read(counters::OUTBOUND_PROXY_BYPASS),
            inbound_steered: read(counters::INBOUND_STEERED),
            inbound_no_listener: read(counters::INBOUND_NO_LISTENER),
            orig_dst_table_full: read(counters::ORIG_DST_TABLE_FULL),
            sockmap_entered: read(counters::SOCKMAP_ENTERED),
            sockmap_redirected: read(counters::SOCKMAP_REDIRECTED),
            sockmap_fell_back: read(counters::SOCKMAP_FELL_BACK),
        }
    }

    /// How many entries each map the agent owns holds, against its capacity. Walks every
    /// key (blocking system calls): call it from a blocking thread, every few seconds.
    pub fn map_fill(&self) -> Vec<MapFill> {
        self.census
            .iter()
            .map(|census| MapFill {
                map: census.map,
                entries: (census.count)(census.capacity),
                capacity: census.capacity,
            })
            .collect()
    }
}

// === impl Census ===

impl Census {
    fn of_hash<K: Pod + Send + Sync, V: Pod + Send + Sync>(
        map: &'static str,
        capacity: u32,
        owner: &HashMap<MapData, K, V>,
    ) -> Result<Self, CaptureError> {
        let handle: HashMap<MapData, K, V> = HashMap::try_from(Self::reopen(map, owner.map())?)?;
        Ok(Self {
            map,
            capacity,
            count: Box::new(move |limit| count_keys(handle.keys(), limit)),
        })
    }

    fn of_sock_hash<K: Pod + Send + Sync>(
        map: &'static str,
        capacity: u32,
        owner: &SockHash<MapData, K>,
    ) -> Result<Self, CaptureError> {
        let handle: SockHash<MapData, K> = SockHash::try_from(Self::reopen(map, owner.map())?)?;
        Ok(Self {
            map,
            capacity,
            count: Box::new(move |limit| count_keys(handle.keys(), limit)),
        })
    }

    /// A second handle on the same kernel map, through a duplicated descriptor.
    fn reopen(map: &'static str, data: &MapData) -> Result<Map, CaptureError> {
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| CaptureError::DuplicateMap { map, source })?;
        Ok(Map::from_map_data(MapData::from_fd(fd)?)?)
    }
}

/// Counts keys, at most `limit`. A hash map's key walk restarts from the first bucket when
/// the key it stands on is deleted under it, so under churn the count is approximate; the
/// limit keeps that walk finite.
fn count_keys<K: Pod>(keys: MapKeys<'_, K>, limit: u32) -> u32 {
    let walked = keys.take(limit as usize).take_while(Result::is_ok).count();
    u32::try_from(walked).unwrap_or(limit)
}

fn orig_dst_key(netns_cookie: u64, client: SocketAddr) -> OrigDstKey {
    OrigDstKey {
        netns_cookie,
        client: to_sock_addr(client),
    }
}

/// The cookie of the calling thread's netns (the agent's own), read from a socket made for
/// the purpose.
fn own_netns_cookie() -> Result<u64, CaptureError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(CaptureError::OwnNetns)?;
    crate::netns::netns_cookie(&socket).map_err(CaptureError::OwnNetns)
}
