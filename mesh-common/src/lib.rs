//! Types and constants shared by the eBPF programs (kernel side) and the agent (user space).
//!
//! Every map key and value is `#[repr(C)]`, `Copy` and free of implicit padding, so the
//! kernel and user space agree on the bytes without any serialization.
#![no_std]

/// Ports the agent listens on, as in Istio's ambient mode.
pub mod ports {
    /// Admin API, loopback only.
    pub const ADMIN: u16 = 15000;
    /// In-pod outbound listener: captured `connect()`s land here.
    pub const OUTBOUND: u16 = 15001;
    /// In-pod inbound listener for plaintext connections steered by `sk_lookup`.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// In-pod HBONE (mTLS tunnel) listener.
    pub const HBONE: u16 = 15008;
    /// Prometheus metrics.
    pub const METRICS: u16 = 15020;
    /// Readiness and liveness.
    pub const HEALTH: u16 = 15021;
}

/// Socket marks. They must differ: the inbound mark routes replies to `lo` in the pod's
/// netns, so an outbound socket carrying it would be swallowed locally.
pub mod marks {
    /// Set on every socket the proxy opens towards an upstream; the connect hooks let
    /// sockets with a proxy mark through untouched, which is what prevents capture loops.
    pub const PROXY_OUTBOUND: u32 = 0x0053_9000;
    /// Set on the proxy's transparent sockets towards the app inside a pod; the pod's
    /// policy routing sends the app's replies (which inherit it) back to the proxy.
    pub const INBOUND_TRANSPARENT: u32 = 0x0053_9001;
    /// Every socket the proxy opens carries a mark in this range (`mark & PROXY_MASK ==
    /// PROXY_OUTBOUND`); the connect hooks let all of them through.
    pub const PROXY_MASK: u32 = 0xffff_f000;
    /// Routing table, inside each enrolled pod's netns, that delivers marked replies locally.
    pub const INBOUND_ROUTE_TABLE: u32 = 15006;
}

/// Names of the maps in the eBPF object, used by the loader.
pub mod maps {
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    pub const ORIG_DST_BY_TUPLE: &str = "ORIG_DST_BY_TUPLE";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const NODE_CONNECTIONS: &str = "NODE_CONNECTIONS";
    pub const HOST_NETNS: &str = "HOST_NETNS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SETTINGS: &str = "SETTINGS";
    pub const LOOPBACK_SOCKETS: &str = "LOOPBACK_SOCKETS";
    pub const LOOPBACK_FELL_BACK: &str = "LOOPBACK_FELL_BACK";
    /// Every map: all are pinned, so capture outlives the agent.
    pub const ALL: [&str; 10] = [
        ENROLLED_NETNS,
        ORIG_DST_BY_COOKIE,
        ORIG_DST_BY_TUPLE,
        INBOUND_LISTENERS,
        NODE_CONNECTIONS,
        HOST_NETNS,
        COUNTERS,
        SETTINGS,
        LOOPBACK_SOCKETS,
        LOOPBACK_FELL_BACK,
    ];
}

/// Names of the programs in the eBPF object.
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    pub const SK_MSG: &str = "mesh_sk_msg";
}

/// The agent's settings the programs read, as indices of the `SETTINGS` array.
pub mod settings {
    /// Non-zero: captured app ↔ in-pod listener connections enter the loopback sockhash,
    /// and `sk_msg` moves their data socket to socket (`--sockmap`).
    pub const SOCKMAP: u32 = 0;
    pub const LEN: u32 = 4;
}

/// Capacities of the maps; also reported as node metrics.
pub mod capacity {
    pub const ENROLLED_NETNS: u32 = 4096;
    pub const ORIG_DST: u32 = 65536;
    pub const INBOUND_LISTENERS: u32 = 8192;
    pub const NODE_CONNECTIONS: u32 = 16384;
    /// Two entries per accelerated connection (both ends).
    pub const LOOPBACK_SOCKETS: u32 = 65536;
    /// Connections whose first bytes went through TCP (their peer end was not in the
    /// sockhash yet); rare, and an entry that ages out costs only that connection's speed-up.
    pub const LOOPBACK_FELL_BACK: u32 = 4096;
}

/// `AF_INET` and `AF_INET6` as the kernel numbers them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// An IPv4 or IPv6 socket address as the kernel hands it to the hooks.
///
/// `addr` holds the address bytes in network order (IPv4 in the first word, the rest zero);
/// `port` is in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub family: u32,
    pub port: u32,
    pub addr: [u32; 4],
}

/// Key of the original-destination table: the client end of a captured connection as the
/// in-pod listener sees it (its peer address), qualified by the pod's netns, because every
/// pod uses the same loopback addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDstKey {
    pub netns_cookie: u64,
    pub client: SockAddr,
}

/// Key of the loopback sockhash: one end of a captured app ↔ in-pod outbound listener
/// connection, as that end sees it; its peer's key swaps `local` and `remote`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LoopbackKey {
    pub netns_cookie: u64,
    pub local: SockAddr,
    pub remote: SockAddr,
}

/// Value of the enrolled-netns table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledNetns {
    /// Bit set of `ENROLLED_*` flags.
    pub flags: u32,
    pub reserved: u32,
}

/// Key of the inbound listener sockhash: a local pod address (port 0), so the single
/// `sk_lookup` program can find the right pod's 15006 socket from the destination address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub family: u32,
    pub reserved: u32,
    pub addr: [u32; 4],
}

/// Indices of the per-CPU counter array, exported as node metrics.
pub mod counters {
    pub const OUTBOUND_REDIRECTED: u32 = 0;
    pub const OUTBOUND_PROXY_BYPASS: u32 = 1;
    pub const INBOUND_STEERED: u32 = 2;
    pub const INBOUND_NO_LISTENER: u32 = 3;
    pub const ORIG_DST_TABLE_FULL: u32 = 4;
    /// Connection ends entered into the loopback sockhash.
    pub const SOCKMAP_ENTERED: u32 = 5;
    /// Messages `sk_msg` moved straight into the peer socket.
    pub const SOCKMAP_REDIRECTED: u32 = 6;
    /// Connection ends that sent through TCP because their peer was not in the sockhash
    /// (or it was full), and keep doing so.
    pub const SOCKMAP_FELL_BACK: u32 = 7;
    pub const LEN: u32 = 8;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers without padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::OrigDstKey {}
    unsafe impl aya::Pod for super::EnrolledNetns {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::LoopbackKey {}
}
