//! `mesh-node uninstall`: the one act that switches capture off on a node.
//!
//! Capture is pinned so that it outlives every agent (restarts, upgrades, crashes); taking
//! it away is therefore explicit: this command, or the agent itself when it finds its
//! DaemonSet deleted. Every enrolled pod gets its routing back as before enrollment, the
//! pins go (which detaches the programs), and the holder closes the pods' listeners.
use std::path::Path;

use anyhow::Context as _;
use tracing::{info, warn};

use crate::{
    cli::UninstallArgs,
    ebpf::{Capture, Pins},
    holder::HolderClient,
    netns::{self, Netns},
};

/// `mesh-node uninstall`.
pub async fn run(args: &UninstallArgs) -> anyhow::Result<()> {
    let holder = args.holder_socket.clone().map(HolderClient::new);
    uninstall(&args.bpffs_path, holder.as_ref()).await
}

/// Un-enrolls every pod the capture pinned at `bpffs` enrolled, removes the pins, and tells
/// `holder` (if any) to close every listener it keeps.
pub async fn uninstall(bpffs: &Path, holder: Option<&HolderClient>) -> anyhow::Result<()> {
    if let Some(holder) = holder
        && let Err(error) = holder.retain_netns(&[])
    {
        warn!(%error, "the holder could not be told to close its listeners");
    }
    if !bpffs.exists() {
        info!(path = %bpffs.display(), "nothing pinned: capture is not installed");
        return Ok(());
    }
    let pins = Pins::open(bpffs).context("opening the pinned capture")?;
    let cookies = Capture::pinned_enrollment(&pins).context("reading the pinned enrollment")?;
    let home = Netns::current().context("opening the own netns")?;
    let pods = netns::find_by_cookies(&cookies, &home);
    for pod in &pods {
        netns::remove_inbound_routing(pod, &home).await;
    }
    pins.remove_all()
        .with_context(|| format!("removing the pins under {}", bpffs.display()))?;
    info!(
        enrolled = cookies.len(),
        restored = pods.len(),
        path = %bpffs.display(),
        "capture uninstalled: every pod un-enrolled, programs detached"
    );
    Ok(())
}
