//! `cargo xtask`: runs things (setup, tests, demo, benchmarks, the install's manifests). It does not own the build:
//! the eBPF object is built by `mesh-node/build.rs`.
mod bench;
mod demo;
mod deploy;
mod e2e_k8s;
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
    Setup {
        /// Only what building needs (rust-src, bpf-linker), as the image's build stage.
        #[arg(long)]
        build_only: bool,
    },
    /// Build the agent and the test binaries.
    Build {
        /// Build with optimizations.
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit tests, the end-to-end tests on real network namespaces, and
    /// deploy-check.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Show the mesh at work: a two-node cluster with an enrolled and a legacy namespace,
    /// some traffic, who answered, what the proxies counted and where the metrics are.
    /// Fails when the mesh does not behave, so it doubles as a smoke test (needs root).
    Demo {
        /// Keep the cluster up until Ctrl-C, and print how to poke at it.
        #[arg(long)]
        keep: bool,
    },
    /// Measure what the mesh adds over no mesh (round trips with sockperf, one bulk stream
    /// with iperf3) and what the agents cost, modes interleaved in one run (needs root).
    Bench {
        /// One short round (1 round × 1 s) that proves the benches run, for CI; the
        /// figures are not judged.
        #[arg(long)]
        quick: bool,
        /// Rounds (each runs every figure once per mode) [default: 3, --quick: 1].
        #[arg(long, value_name = "N")]
        rounds: Option<u32>,
        /// Seconds per measurement [default: 5, --quick: 1].
        #[arg(long, value_name = "S")]
        seconds: Option<u32>,
        /// Run only these rows (repeatable): `scale` (the config at the size of a big
        /// cluster), `enrollment` (250 pods enrolled on one node), `relay` (an enrolled pod's
        /// bulk stream to a pod outside the mesh), `sockmap`, `restart` (an agent replaced
        /// under load), `gateway` (HTTPS through the ingress gateway into the mesh).
        #[arg(long, value_name = "ROWS")]
        only: Vec<bench::Only>,
    },
    /// Write the cluster install in deploy/ (manifests, CRDs, kustomizations, Helm
    /// templates) from its typed objects and deploy/helm/nodemesh/values.yaml.
    Manifests,
    /// Validate every manifest in deploy/ (and `kubectl kustomize`, `helm template` output
    /// when those tools are installed) against the Kubernetes API schemas.
    DeployCheck,
    /// Install deploy/ on the cluster KUBECONFIG points at, enroll a namespace, check
    /// routing, mutual TLS identities and metrics, then uninstall and check nothing is
    /// left. Skipped (exit 0) when KUBECONFIG is not set.
    E2eK8s {
        /// The agent image, already available to the cluster's nodes (for kind:
        /// `docker build -t nodemesh:e2e . && kind load docker-image nodemesh:e2e`).
        #[arg(long, default_value = "nodemesh:e2e")]
        image: String,
        /// Leave the install and the test namespace in place afterwards.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup { build_only: true } => setup::build_tools(),
        Task::Setup { build_only: false } => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            build(release)
        }
        Task::Test { cargo_args } => {
            setup::run()?;
            build(false)?;
            let mut test = cargo();
            test.args(["test", "-j2"]).args(&cargo_args);
            run(&mut test)?;
            deploy::check()
        }
        Task::Demo { keep } => demo::run(keep),
        Task::Bench {
            quick,
            rounds,
            seconds,
            only,
        } => bench::run(bench::Options {
            quick,
            rounds,
            seconds,
            only,
        }),
        Task::Manifests => deploy::write_manifests(),
        Task::DeployCheck => deploy::check(),
        Task::E2eK8s { image, keep } => e2e_k8s::run(&e2e_k8s::Options { image, keep }),
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
