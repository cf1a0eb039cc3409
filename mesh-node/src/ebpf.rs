//! The kernel side as the rest of the agent sees it: typed, safe wrappers around the
//! eBPF object. Raw aya handles never leave this module.
mod addr;
mod loader;
mod pins;

pub use addr::{from_sock_addr, to_listener_key, to_sock_addr};
pub use loader::{Capture, CaptureError, Counters, MapFill};
pub use pins::Pins;
