//! The agent's allocator, and giving memory back to the system.
//!
//! The agent runs on mimalloc (`main.rs`): a big config load makes and frees millions of
//! small objects, and glibc's malloc spent half of that load in its own free-list upkeep
//! (`malloc_consolidate`, `unlink_chunk`, measured with `perf`), then kept what it freed
//! in per-thread arenas. A DaemonSet pays every MiB it keeps on every node, so after a
//! config load and when it prunes what departed pods and connections left behind the agent
//! asks mimalloc to return its free pages now rather than when the thread next allocates.
//! glibc's `malloc_trim` is called too, for code that runs on the C library's allocator
//! (the library's tests, a build without the global allocator).

/// Returns the allocators' free memory to the system.
#[expect(
    unsafe_code,
    reason = "mi_collect and malloc_trim have no safe wrappers"
)]
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers; it frees the calling thread's empty pages and,
    // forced, purges the pages every thread abandoned or freed.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only walks the allocator's own free lists,
    // under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
