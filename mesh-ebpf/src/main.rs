//! Kernel side of Nodemesh: capture of enrolled pods' connections.
//!
//! * `connect4`/`connect6` (cgroup) rewrite the destination of TCP sockets created in an
//!   enrolled netns to the in-pod outbound listener and remember the original destination
//!   by socket cookie.
//! * `sockops` moves that record to a key the proxy can compute from the accepted socket:
//!   (netns cookie, client address).
//! * `sk_lookup` (per pod netns) steers new inbound connections to the pod's own addresses
//!   to the in-pod inbound listener.
//! * `sk_msg` (on the loopback sockhash) moves data between an app and its in-pod outbound
//!   listener socket to socket (`--sockmap`).
#![no_std]
#![no_main]

mod capture;
mod counters;
mod loopback;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach a panic, so this is never called.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
