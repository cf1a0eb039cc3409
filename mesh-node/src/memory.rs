//! Giving memory back to the system.
//!
//! glibc's malloc keeps what it freed in its per-thread arenas: after 10,000 connections
//! close, the agent would stay at its high-water mark, and a DaemonSet pays that on every
//! node until the pod restarts. `malloc_trim` returns the free pages (also those in the
//! middle of an arena, since glibc 2.8); the agent calls it when it prunes what departed
//! pods and connections left behind. Other C libraries (musl, for the CNI plugin's static
//! build) have no such call and need none.

/// Returns the allocator's free memory to the system.
#[cfg_attr(
    target_env = "gnu",
    expect(unsafe_code, reason = "malloc_trim has no safe wrapper")
)]
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only walks the allocator's own free lists,
    // under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
