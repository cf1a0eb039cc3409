//! Idempotent bootstrap of a fresh machine (only Rust toolchains, gcc and Python on it).
use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::run as run_command;

/// Debian packages the tests and benchmarks run. `prometheus` is the server the
/// end-to-end test starts itself, inside the test cluster; its package would also start a
/// system service, which `RUNLEVEL=1` on the install keeps from starting. `curl` is the
/// client outside the mesh that the gateway tests call it with.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "sockperf",
    "iperf3",
    "tcpdump",
    "prometheus",
    "curl",
];
/// The bpf-linker release known to build against nightly's LLVM here.
const BPF_LINKER_VERSION: &str = "^0.13";
/// The HTTP load generator of the bench's L7 rows (crates.io), pinned so its JSON report
/// keeps the shape the bench reads; this release builds with stable Rust 1.88 and later.
const OHA_VERSION: &str = "1.16.0";

pub fn run() -> anyhow::Result<()> {
    build_tools()?;
    debian_packages()?;
    oha()?;
    Ok(())
}

/// Only what building the agent needs (the image's build stage): no test or bench tools.
pub fn build_tools() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// PATH with `$CARGO_HOME/bin` on it (in front, when added), where `cargo install` puts
/// bpf-linker.
///
/// A PATH that has it already is returned unchanged: build scripts that watch PATH would
/// otherwise see a different one under `cargo xtask` than under a plain `cargo build`, and
/// each switch between the two rebuilt a good part of the dependencies.
pub fn path_with_cargo_bin() -> OsString {
    let cargo_bin = cargo_home().join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|dir| dir == cargo_bin) {
        return path;
    }
    let paths = std::iter::once(cargo_bin).chain(env::split_paths(&path));
    env::join_paths(paths).expect("PATH entries contain no separator")
}

/// Where `program` is: the first match on [`path_with_cargo_bin`], so also the tools
/// `cargo install` put in `$CARGO_HOME/bin` when that is not on the caller's PATH.
pub fn find_program(program: &str) -> Option<PathBuf> {
    env::split_paths(&path_with_cargo_bin())
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed: {}", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context("the nightly toolchain is needed for the eBPF side (rustup toolchain list)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run_command(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker() -> anyhow::Result<()> {
    // Through `rustup run nightly`, as aya-build runs it: bpf-linker loads the nightly
    // toolchain's libLLVM, which only that environment puts on the library path.
    let works = Command::new("rustup")
        .args(["run", "nightly", "bpf-linker", "--version"])
        .env("PATH", path_with_cargo_bin())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    // bpf-linker must use the same LLVM as the nightly rustc that emits the bitcode, and no
    // prebuilt LLVM can be downloaded here: link against the toolchain's own libLLVM.
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let major: String = name
        .trim_start_matches("libLLVM.so.")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let prefix = cargo_home().join("nodemesh-llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    eprintln!("setup: building bpf-linker against nightly's LLVM {major} (a minute or two)");
    run_command(
        Command::new("cargo")
            .args(["+nightly", "install", "bpf-linker", "-j2", "--version"])
            .arg(BPF_LINKER_VERSION)
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .arg("--root")
            .arg(cargo_home())
            .env("LLVM_PREFIX", &prefix),
    )
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", package])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {}", missing.join(" "));
    run_command(Command::new("apt-get").arg("update").arg("-qq"))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("RUNLEVEL", "1"),
    )
}

/// `oha` from crates.io, unless one already runs. (It does not build without its default
/// TLS feature, though the bench speaks plain HTTP.)
fn oha() -> anyhow::Result<()> {
    // Found the way the bench finds it.
    let works = find_program("oha").is_some_and(|oha| {
        Command::new(oha)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if works {
        return Ok(());
    }
    eprintln!(
        "setup: building the HTTP load generator oha {OHA_VERSION} from crates.io (several \
         minutes on 2 cores)"
    );
    run_command(
        Command::new("cargo")
            .args(["install", "oha", "--locked", "-j2"])
            .args(["--version", OHA_VERSION])
            .arg("--root")
            .arg(cargo_home()),
    )
}
