//! The capture programs and their maps.
use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, bpf_sock_addr,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use mesh_common::{
    AF_INET, AF_INET6, EnrolledNetns, ListenerKey, OrigDstKey, SockAddr, capacity, counters, marks,
    ports,
};

use crate::{counters::bump, loopback};

/// Verdict of cgroup sock_addr programs that lets the `connect()` proceed.
const ALLOW: i32 = 1;
/// Verdict that fails the `connect()` with EPERM.
const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;
/// `lo` is always interface 1 in a network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Enrolled pods' network namespaces, by netns cookie. Written by the agent.
#[map(name = "ENROLLED_NETNS")]
pub(crate) static ENROLLED_NETNS: HashMap<u64, EnrolledNetns> =
    HashMap::with_max_entries(capacity::ENROLLED_NETNS, 0);

/// Original destination of a captured socket, by socket cookie, until it is established.
/// LRU, so records of connects that never complete age out.
#[map(name = "ORIG_DST_BY_COOKIE")]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, SockAddr> =
    LruHashMap::with_max_entries(capacity::ORIG_DST, 0);

/// Original destination by (netns, client address), read and deleted by the proxy on accept.
#[map(name = "ORIG_DST_BY_TUPLE")]
static ORIG_DST_BY_TUPLE: LruHashMap<OrigDstKey, SockAddr> =
    LruHashMap::with_max_entries(capacity::ORIG_DST, 0);

/// Connections opened by sockets of the node itself (its own network namespace: kubelet's
/// probes, host-network processes), by the node socket's address, for the proxy to tell
/// them from connections that only carry a node address (kube-proxy's SNAT). LRU: the
/// proxy takes the entries it needs, the rest age out.
#[map(name = "NODE_CONNECTIONS")]
static NODE_CONNECTIONS: LruHashMap<SockAddr, u32> =
    LruHashMap::with_max_entries(capacity::NODE_CONNECTIONS, 0);

/// The node's own netns cookie (the agent's), written by the agent at start.
#[map(name = "HOST_NETNS")]
pub(crate) static HOST_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// Each enrolled pod's in-pod inbound (15006) listener, by pod address.
#[map(name = "INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockHash<ListenerKey> =
    SockHash::with_max_entries(capacity::INBOUND_LISTENERS, 0);

// === outbound: connect4 / connect6 ===

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, AF_INET)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, AF_INET6)
}

/// Refuses a `connect()` only when it cannot be captured (its original destination cannot
/// be recorded): going direct would carry it past the mesh, in plaintext and past every
/// policy, so it fails closed (EPERM, counted) and the app retries.
#[inline(always)]
fn try_connect(ctx: &SockAddrContext, family: u32) -> i32 {
    // SAFETY: the kernel hands us a valid context for the duration of the program.
    let sock_addr = unsafe { &mut *ctx.sock_addr };
    if sock_addr.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    // SAFETY: helper available to cgroup sock_addr programs since 5.7.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { ENROLLED_NETNS.get(&netns_cookie) }.is_none() {
        return ALLOW;
    }
    // SAFETY: `sk` is always set for connect hooks.
    let mark = unsafe { (*sock_addr.__bindgen_anon_1.sk).mark };
    // Both the outbound leg and the transparent inbound leg to the app are the proxy's.
    if mark & marks::PROXY_MASK == marks::PROXY_OUTBOUND {
        bump(counters::OUTBOUND_PROXY_BYPASS);
        return ALLOW;
    }
    let original = if family == AF_INET {
        let ip = sock_addr.user_ip4;
        // Loopback stays inside the pod: it is the pod talking to itself.
        if ip.to_ne_bytes()[0] == 127 {
            return ALLOW;
        }
        SockAddr {
            family,
            port: u32::from(u16::from_be(sock_addr.user_port as u16)),
            addr: [ip, 0, 0, 0],
        }
    } else {
        // SAFETY: as in `try_sockops`, one constant-offset load per context field.
        let ip = unsafe {
            [
                read_volatile(&raw const sock_addr.user_ip6[0]),
                read_volatile(&raw const sock_addr.user_ip6[1]),
                read_volatile(&raw const sock_addr.user_ip6[2]),
                read_volatile(&raw const sock_addr.user_ip6[3]),
            ]
        };
        if ip == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])] {
            return ALLOW;
        }
        let port = u32::from(u16::from_be(sock_addr.user_port as u16));
        if is_v4_mapped(&ip) {
            // A dual-stack socket (Java's default) connecting to an IPv4 address: it is an
            // IPv4 connection, so it goes to the IPv4 listener (as ::ffff:127.0.0.1, which
            // every pod has; [::1] exists only in pods with IPv6) and its original
            // destination is recorded as IPv4, which is how the listener sees it.
            if ip[3].to_ne_bytes()[0] == 127 {
                return ALLOW;
            }
            return redirect(
                ctx,
                sock_addr,
                SockAddr {
                    family: AF_INET,
                    port,
                    addr: [ip[3], 0, 0, 0],
                },
                [0, 0, V4_MAPPED_PREFIX, u32::from_ne_bytes([127, 0, 0, 1])],
            );
        }
        SockAddr {
            family,
            port,
            addr: ip,
        }
    };
    if family == AF_INET {
        return redirect_v4(ctx, sock_addr, original);
    }
    redirect(
        ctx,
        sock_addr,
        original,
        [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
    )
}

/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), as stored.
const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[inline(always)]
fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX
}

/// Records `original` for this socket and sends an IPv4 connect to the in-pod listener.
#[inline(always)]
fn redirect_v4(ctx: &SockAddrContext, sock_addr: &mut bpf_sock_addr, original: SockAddr) -> i32 {
    if !remember(ctx, &original) {
        return REFUSE;
    }
    sock_addr.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    sock_addr.user_port = u32::from(ports::OUTBOUND.to_be());
    bump(counters::OUTBOUND_REDIRECTED);
    ALLOW
}

/// Records `original` for this socket and sends an IPv6 connect to `listener` (the in-pod
/// listener's address: `[::1]`, or `::ffff:127.0.0.1` for an IPv4 connection).
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    sock_addr: &mut bpf_sock_addr,
    original: SockAddr,
    listener: [u32; 4],
) -> i32 {
    if !remember(ctx, &original) {
        return REFUSE;
    }
    // The verifier wants one 32-bit store per word of user_ip6.
    sock_addr.user_ip6[0] = listener[0];
    sock_addr.user_ip6[1] = listener[1];
    sock_addr.user_ip6[2] = listener[2];
    sock_addr.user_ip6[3] = listener[3];
    sock_addr.user_port = u32::from(ports::OUTBOUND.to_be());
    bump(counters::OUTBOUND_REDIRECTED);
    ALLOW
}

/// Keeps the original destination of this socket until `sockops` re-keys it; false (and
/// counted) when it cannot.
#[inline(always)]
fn remember(ctx: &SockAddrContext, original: &SockAddr) -> bool {
    // SAFETY: helper available to cgroup sock_addr programs since 4.12.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_DST_BY_COOKIE
        .insert(&socket_cookie, original, 0)
        .is_err()
    {
        bump(counters::ORIG_DST_TABLE_FULL);
        return false;
    }
    true
}

// === outbound: sockops ===

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx)
}

/// When a socket is established: a captured one's original destination is re-keyed by the
/// client address the in-pod listener will see as its peer, and one of the node's own is
/// recorded as the node's. This runs while the SYN-ACK is being processed, before the
/// final ACK leaves, so the record exists before `accept()` returns. Both ends of a
/// captured connection also enter the loopback sockhash (`loopback`): the app's here, the
/// listener's when the final ACK reaches it.
#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        loopback::listener_end_established(ctx);
        return 1;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let ops_ptr: *mut c_void = ctx.as_ptr();
    // SAFETY: helper available to sock_ops programs since 5.15.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ops_ptr) };
    if HOST_NETNS
        .get(0)
        .is_some_and(|host| *host != 0 && *host == netns_cookie)
    {
        if NODE_CONNECTIONS.insert(&local_addr(ctx), &1, 0).is_err() {
            bump(counters::ORIG_DST_TABLE_FULL);
        }
        return 1;
    }
    // SAFETY: helper available to sock_ops programs since 4.12.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ops_ptr) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(original) = (unsafe { ORIG_DST_BY_COOKIE.get(&socket_cookie) }).copied() else {
        return 1;
    };
    let _ = ORIG_DST_BY_COOKIE.remove(&socket_cookie);
    let client = local_addr(ctx);
    let key = OrigDstKey {
        netns_cookie,
        client,
    };
    if ORIG_DST_BY_TUPLE.insert(&key, &original, 0).is_err() {
        bump(counters::ORIG_DST_TABLE_FULL);
    }
    loopback::app_end_established(ctx, netns_cookie, client, remote_addr(ctx));
    1
}

/// The socket's own end (address and port), as its peer sees it: a dual-stack socket's
/// IPv4 connection as IPv4.
#[inline(always)]
pub(crate) fn local_addr(ctx: &SockOpsContext) -> SockAddr {
    let ops = ctx.ops;
    // SAFETY: `ops` is the valid context.
    let ip = unsafe { ip_words(&raw const (*ops).local_ip4, &raw const (*ops).local_ip6) };
    unmapped(ctx.family(), ip, ctx.local_port())
}

/// The socket's peer end, as `local_addr` reads its own.
#[inline(always)]
pub(crate) fn remote_addr(ctx: &SockOpsContext) -> SockAddr {
    let ops = ctx.ops;
    // SAFETY: `ops` is the valid context.
    let ip = unsafe { ip_words(&raw const (*ops).remote_ip4, &raw const (*ops).remote_ip6) };
    unmapped(ctx.family(), ip, port_from_network(ctx.remote_port()))
}

/// A context's IPv4 address field, then its four IPv6 words, each read with its own load
/// at a constant offset from the context: the verifier refuses a context pointer the
/// compiler offset.
///
/// # Safety
/// Both point into the program's valid context.
#[inline(always)]
pub(crate) unsafe fn ip_words(ip4: *const u32, ip6: *const [u32; 4]) -> [u32; 5] {
    // SAFETY: the caller's.
    unsafe {
        [
            read_volatile(ip4),
            read_volatile(&raw const (*ip6)[0]),
            read_volatile(&raw const (*ip6)[1]),
            read_volatile(&raw const (*ip6)[2]),
            read_volatile(&raw const (*ip6)[3]),
        ]
    }
}

/// A context's `remote_port`: the port in network order in the upper half of the word on
/// little-endian machines, as the kernel presents it to sock_ops and sk_msg programs.
#[inline(always)]
pub(crate) fn port_from_network(remote_port: u32) -> u32 {
    u32::from(u16::from_be((remote_port >> 16) as u16))
}

/// A socket address from a context's fields (`ip` is the IPv4 word, then the IPv6 words):
/// a dual-stack socket's IPv4 connection (`::ffff:a.b.c.d`) as IPv4, as its peer sees it.
#[inline(always)]
pub(crate) fn unmapped(family: u32, ip: [u32; 5], port: u32) -> SockAddr {
    let v6 = [ip[1], ip[2], ip[3], ip[4]];
    let (family, addr) = if family == AF_INET {
        (AF_INET, [ip[0], 0, 0, 0])
    } else if is_v4_mapped(&v6) {
        (AF_INET, [v6[3], 0, 0, 0])
    } else {
        (family, v6)
    };
    SockAddr { family, port, addr }
}

// === inbound: sk_lookup ===

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

/// Steers new TCP connections that arrive from outside the pod to the pod's inbound
/// listener. What arrives on `lo` is the proxy itself delivering to the app (or the app
/// talking to itself) and must go where it asked, or the proxy would capture itself. A
/// connection for an address with no listener (one the agent does not know the pod by) is
/// refused (the lookup fails: TCP answers with a reset), never delivered past the proxy.
#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the kernel hands us a valid context for the duration of the program.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP || lookup.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    // local_port is in host order for sk_lookup.
    let port = lookup.local_port;
    if port == u32::from(ports::HBONE) || port == u32::from(ports::INBOUND_PLAINTEXT) {
        return SK_PASS;
    }
    let family = lookup.family;
    // SAFETY: as in `try_sockops`, one constant-offset load per context field.
    let addr = unsafe {
        if family == AF_INET {
            [read_volatile(&raw const lookup.local_ip4), 0, 0, 0]
        } else {
            [
                read_volatile(&raw const lookup.local_ip6[0]),
                read_volatile(&raw const lookup.local_ip6[1]),
                read_volatile(&raw const lookup.local_ip6[2]),
                read_volatile(&raw const lookup.local_ip6[3]),
            ]
        }
    };
    let key = ListenerKey {
        family,
        reserved: 0,
        addr,
    };
    match INBOUND_LISTENERS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => {
            bump(counters::INBOUND_STEERED);
            SK_PASS
        }
        Err(_) => {
            bump(counters::INBOUND_NO_LISTENER);
            SK_DROP
        }
    }
}
