//! Rebuild the eBPF object when `bpf-linker` changes: cargo cannot see that dependency.
use which::which;

fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (it builds bpf-linker against \
         the nightly toolchain's LLVM)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
