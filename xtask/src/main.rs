//! `cargo xtask`: runs things (setup, tests, demo, benchmarks). It does not own the build:
//! the eBPF object is built by `mesh-node/build.rs`.
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Nodemesh project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent): rust-src for nightly,
    /// bpf-linker built against nightly's LLVM, Debian packages used by tests and benches.
    Setup,
    /// Build the agent and the test binaries.
    Build {
        /// Build with optimizations.
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit tests and the end-to-end tests on real network namespaces.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            build(release)
        }
        Task::Test { cargo_args } => {
            setup::run()?;
            build(false)?;
            let mut test = cargo();
            test.args(["test", "-j2"]).args(&cargo_args);
            run(&mut test)
        }
    }
}

/// `cargo`, with `~/.cargo/bin` (where setup puts bpf-linker) on PATH.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.env("PATH", setup::path_with_cargo_bin());
    command
}

/// Builds the agent and the helper binaries the end-to-end tests start.
pub fn build(release: bool) -> anyhow::Result<()> {
    let mut command = cargo();
    command.args([
        "build",
        "-j2",
        "-p",
        "mesh-node",
        "-p",
        "mesh-tests",
        "--bins",
    ]);
    if release {
        command.arg("--release");
    }
    run(&mut command)
}

pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}
