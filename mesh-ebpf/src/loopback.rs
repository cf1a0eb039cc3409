//! Socket acceleration of the loopback leg between an app and its in-pod outbound
//! listener: both ends of a captured connection enter a sockhash, and `sk_msg` hands each
//! message straight to the peer socket's receive queue, past the TCP/IP stack and `lo`.
//!
//! Bytes must never be reordered. The app's end enters the sockhash when its connect
//! completes, the listener's end a moment later, when the final ACK reaches it; what the
//! app sends in between goes through TCP into the listener's receive queue, and a message
//! moved later would be read before it. So an end whose peer is missing falls back to TCP
//! for good (`LOOPBACK_FELL_BACK`). The listener's end always finds the app's.
use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::bpf_get_netns_cookie,
    macros::{map, sk_msg},
    maps::{Array, LruHashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{LoopbackKey, SockAddr, capacity, counters, ports, settings};

use crate::{
    capture::{
        ENROLLED_NETNS, HOST_NETNS, ip_words, local_addr, port_from_network, remote_addr, unmapped,
    },
    counters::bump,
};

/// The agent's settings (`mesh_common::settings`), written at start.
#[map(name = "SETTINGS")]
static SETTINGS: Array<u32> = Array::with_max_entries(settings::LEN, 0);

/// Both ends of each accelerated connection; the kernel removes an end when it closes.
#[map(name = "LOOPBACK_SOCKETS")]
static LOOPBACK_SOCKETS: SockHash<LoopbackKey> =
    SockHash::with_max_entries(capacity::LOOPBACK_SOCKETS, 0);

/// Ends that sent through TCP once and so must keep doing so.
#[map(name = "LOOPBACK_FELL_BACK")]
static LOOPBACK_FELL_BACK: LruHashMap<LoopbackKey, u32> =
    LruHashMap::with_max_entries(capacity::LOOPBACK_FELL_BACK, 0);

#[inline(always)]
fn sockmap_on() -> bool {
    SETTINGS.get(settings::SOCKMAP).is_some_and(|on| *on != 0)
}

/// The app's end of a captured connection, just connected to its in-pod listener.
#[inline(always)]
pub fn app_end_established(
    ctx: &SockOpsContext,
    netns_cookie: u64,
    local: SockAddr,
    remote: SockAddr,
) {
    if !sockmap_on() {
        return;
    }
    let key = LoopbackKey {
        netns_cookie,
        local,
        remote,
    };
    // A connection that reused this tuple may have fallen back; this one starts afresh.
    let _ = LOOPBACK_FELL_BACK.remove(&key);
    enter(ctx, key);
}

/// A connection accepted by a socket of a pod's netns: the listener's end when it is the
/// in-pod outbound listener's.
#[inline(always)]
pub fn listener_end_established(ctx: &SockOpsContext) {
    if ctx.local_port() != u32::from(ports::OUTBOUND) || !sockmap_on() {
        return;
    }
    // SAFETY: helper available to sock_ops programs since 5.15.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast::<c_void>()) };
    let on_host = HOST_NETNS
        .get(0)
        .is_some_and(|host| *host != 0 && *host == netns_cookie);
    // SAFETY: read-only lookup of a plain value.
    if on_host || unsafe { ENROLLED_NETNS.get(&netns_cookie) }.is_none() {
        return;
    }
    enter(
        ctx,
        LoopbackKey {
            netns_cookie,
            local: local_addr(ctx),
            remote: remote_addr(ctx),
        },
    );
}

#[inline(always)]
fn enter(ctx: &SockOpsContext, key: LoopbackKey) {
    // SAFETY: `ops` is the valid context of this sock_ops invocation.
    let ops = unsafe { &mut *ctx.ops };
    if LOOPBACK_SOCKETS.update(key, ops, 0).is_ok() {
        bump(counters::SOCKMAP_ENTERED);
    } else {
        // Full: this end stays out, so its peer falls back to TCP on its first message.
        bump(counters::SOCKMAP_FELL_BACK);
    }
}

// === sk_msg ===

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx)
}

/// Moves a message into the peer end's receive queue; lets it through TCP when the peer is
/// not in the sockhash, or this end already fell back. Never drops.
#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) -> u32 {
    let msg = ctx.msg;
    // SAFETY: helper available to sk_msg programs since 5.15.
    let netns_cookie = unsafe { bpf_get_netns_cookie(msg.cast::<c_void>()) };
    // SAFETY: `msg` is the valid context.
    let (family, local, remote, local_port, remote_port) = unsafe {
        (
            read_volatile(&raw const (*msg).family),
            ip_words(&raw const (*msg).local_ip4, &raw const (*msg).local_ip6),
            ip_words(&raw const (*msg).remote_ip4, &raw const (*msg).remote_ip6),
            read_volatile(&raw const (*msg).local_port),
            read_volatile(&raw const (*msg).remote_port),
        )
    };
    let own = LoopbackKey {
        netns_cookie,
        local: unmapped(family, local, local_port),
        remote: unmapped(family, remote, port_from_network(remote_port)),
    };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { LOOPBACK_FELL_BACK.get(&own) }.is_some() {
        return SK_PASS;
    }
    let mut peer = LoopbackKey {
        netns_cookie,
        local: own.remote,
        remote: own.local,
    };
    if LOOPBACK_SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS)
    {
        bump(counters::SOCKMAP_REDIRECTED);
    } else {
        let _ = LOOPBACK_FELL_BACK.insert(&own, &1, 0);
        bump(counters::SOCKMAP_FELL_BACK);
    }
    SK_PASS
}
