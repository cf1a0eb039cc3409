//! Per-CPU event counters, summed by the agent and exported as node metrics.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use mesh_common::counters::LEN;

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LEN, 0);

/// Adds one to counter `index` (one of `mesh_common::counters`).
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *slot += 1 };
    }
}
