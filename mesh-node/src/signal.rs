//! Shutdown on SIGTERM (Kubernetes) or SIGINT (a terminal).
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// Resolves when the process is asked to stop.
pub async fn shutdown_requested() {
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "shutting down");
}
