//! The restart row: new connections at a steady rate through the mesh while node 0's
//! agent is restarted in place (old ends, then new starts) and then replaced with overlap
//! (new starts beside old, old drains), every connection counted.
use std::{
    fmt::Write as _,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{Cluster, Pod, PodProcess, PodSpec, namespace_yaml};

use super::{
    Counters, Interrupt, MUTUAL_TLS,
    table::{Align, Table},
    tools::{self, TESTAPP_PORT},
    wait_enrolled,
};

/// New connections per second across the restart: the figure.
const RATE: u32 = 1_000;
/// How long the load runs; the restart starts [`RESTART_AFTER`] into it.
const LOAD: Duration = Duration::from_secs(6);
const RESTART_AFTER: Duration = Duration::from_secs(2);
/// The clients' patience (connect, then reply).
const CLIENT_TIMEOUT_MS: &str = "5000";
/// Logged by an agent when it stops accepting, when it took a pod's held listeners, and
/// once it serves every pod of the node (its first reconcile against the config is done).
const STOPPED_ACCEPTING: &str = "stopped accepting";
const TOOK_OVER: &str = "took over the listeners of an earlier agent";
const SERVES_EVERY_POD: &str = "pinned enrollment reconciled";

/// How an agent is replaced.
#[derive(Clone, Copy, Debug)]
pub enum Replacement {
    /// SIGTERM, then a new agent (a DaemonSet with `maxUnavailable`).
    InPlace,
    /// A new agent beside the old one, then SIGTERM to the old (`maxSurge`).
    Overlap,
}

impl Replacement {
    pub const ALL: [Replacement; 2] = [Replacement::InPlace, Replacement::Overlap];

    fn label(self) -> &'static str {
        match self {
            Replacement::InPlace => "in place",
            Replacement::Overlap => "with overlap",
        }
    }
}

/// What one replacement under load measured.
pub struct RestartFigure {
    pub replacement: Replacement,
    pub sent: u64,
    pub failed: u64,
    /// From the old agent's last accept to the new one's first: 0 when they overlapped.
    pub gap_ms: f64,
    /// The slowest connection's connect-to-reply time.
    pub slowest_ms: u64,
    /// Connections that took over 100 ms.
    pub slow: u64,
}

/// Replaces node 0's agent under load, once per [`Replacement`]; `client` (on node 0)
/// opens the connections to `server`'s `mesh-testapp serve`.
pub fn measure(
    cluster: &mut Cluster,
    client: &Pod,
    server: &Pod,
    interrupt: &Interrupt,
) -> anyhow::Result<Vec<RestartFigure>> {
    let target = SocketAddrV4::new(server.ip, TESTAPP_PORT).to_string();
    let mut figures = Vec::new();
    for replacement in Replacement::ALL {
        interrupt.check()?;
        println!(
            "bench: restart {}: {RATE} new connections/s to {target} for {} s…",
            replacement.label(),
            LOAD.as_secs()
        );
        let log_before = agent_log(cluster)?.len();
        // The server's node keeps its agent: its count proves the row went through the mesh.
        let counted_before = mutual_tls_accepted(cluster, server);
        let load = start_load(cluster, client, &target)?;
        std::thread::sleep(RESTART_AFTER);
        replace(cluster, replacement)?;
        let summary = finish(load)?;
        let log = agent_log(cluster)?;
        let gap_ms = accept_gap_ms(&log[log_before..])
            .context("the agents' log does not show the hand-over")?;
        let count = |field: &str| summary[field].as_u64().unwrap_or(0);
        let counted = mutual_tls_accepted(cluster, server) - counted_before;
        if counted < count("ok") as f64 {
            bail!(
                "node {}'s proxy counted {counted} mutual-TLS connections for {} answered: \
                 the restart row did not go through the mesh",
                server.node,
                count("ok")
            );
        }
        figures.push(RestartFigure {
            replacement,
            sent: count("sent"),
            failed: count("failed"),
            gap_ms,
            slowest_ms: count("slowest_ms"),
            slow: count("slow"),
        });
        println!(
            "bench: the slowest connection started {} ms into the load",
            count("slowest_started_ms")
        );
        if count("failed") > 0 {
            println!("bench: note: failed connections: {}", summary["errors"]);
        }
    }
    Ok(figures)
}

/// The restart row on a cluster of its own (`--only restart`): an enrolled client on node
/// 0, an enrolled server on node 1.
pub fn measure_alone(interrupt: &Interrupt) -> anyhow::Result<Vec<RestartFigure>> {
    const NAMESPACE: &str = "bench-restart";
    println!("bench: restart: an agent replaced under load, on a 2-node cluster…");
    let mut cluster = Cluster::new("bench-restart", 2);
    cluster.set_agent_log_filter("info");
    cluster.write_config(
        "namespace.yaml",
        &namespace_yaml(NAMESPACE, &[("nodemesh.io/enabled", "true")]),
    );
    let client = cluster.add_pod(PodSpec::new("client", 0).namespace(NAMESPACE));
    let server = cluster.add_pod(PodSpec::new("server", 1).namespace(NAMESPACE));
    cluster.start_agents();
    wait_enrolled(&cluster, &[1, 1])?;
    let _serving = tools::testapp_server(&cluster, &server)?;
    measure(&mut cluster, &client, &server, interrupt)
}

/// Connections the destination proxy of `server`'s node opened over mutual TLS so far.
fn mutual_tls_accepted(cluster: &Cluster, server: &Pod) -> f64 {
    Counters::read_matching(cluster, MUTUAL_TLS).destination[server.node]
}

fn start_load(cluster: &Cluster, client: &Pod, target: &str) -> anyhow::Result<PodProcess> {
    let rate = RATE.to_string();
    let duration = LOAD.as_millis().to_string();
    let mut load = client.spawn(
        cluster,
        &[
            "load",
            "--to",
            target,
            "--rate",
            &rate,
            "--duration-ms",
            &duration,
            "--timeout-ms",
            CLIENT_TIMEOUT_MS,
        ],
    );
    load.wait_for_output("started", Duration::from_secs(10));
    Ok(load)
}

fn replace(cluster: &mut Cluster, replacement: Replacement) -> anyhow::Result<()> {
    match replacement {
        Replacement::InPlace => {
            let status = cluster.stop_agent(0);
            if !status.success() {
                bail!("the old agent exited with {status}");
            }
            cluster.start_agent(0, &[]);
        }
        Replacement::Overlap => {
            let serving_before = agent_log(cluster)?.matches(SERVES_EVERY_POD).count();
            let old = cluster.spawn_overlapping_agent(0, &[]);
            let took_over = wait_for_take_over(cluster, serving_before);
            // Stopped whatever happened, so no agent is left behind.
            let status = cluster.stop_process(old);
            took_over?;
            if !status.success() {
                bail!("the old agent exited with {status}");
            }
        }
    }
    Ok(())
}

/// Waits until the new agent serves every pod (the log shows one more
/// [`SERVES_EVERY_POD`] than `before`), as the DaemonSet waits for its readiness.
fn wait_for_take_over(cluster: &Cluster, before: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent_log(cluster)?.matches(SERVES_EVERY_POD).count() == before {
        if Instant::now() > deadline {
            bail!("the new agent did not take over within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits for the load to end; its JSON summary.
fn finish(mut load: PodProcess) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + LOAD + Duration::from_secs(30);
    while load.try_wait().is_none() {
        if Instant::now() > deadline {
            bail!("the load did not end");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stdout = load.stdout();
    stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .with_context(|| format!("no summary from the load: {stdout}"))
}

fn agent_log(cluster: &Cluster) -> anyhow::Result<String> {
    let path = cluster.agent_log(0);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Milliseconds from the old agent's "stopped accepting" to the new agent's first
/// "took over", in the log written during one replacement; 0 when the new one took over
/// first (they overlapped).
fn accept_gap_ms(log: &str) -> Option<f64> {
    let stamp = |needle: &str| {
        log.lines()
            .find(|line| line.contains(needle))
            .and_then(timestamp)
    };
    let stopped = stamp(STOPPED_ACCEPTING)?;
    let took_over = stamp(TOOK_OVER)?;
    // An error: the new agent took over before the old one stopped.
    let gap = took_over.duration_since(stopped).unwrap_or_default();
    Some(gap.as_secs_f64() * 1000.0)
}

/// The RFC 3339 time a log line starts with (after the colour codes of a terminal log).
fn timestamp(line: &str) -> Option<std::time::SystemTime> {
    let mut plain = String::with_capacity(line.len());
    let mut in_escape = false;
    for c in line.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (false, c) => plain.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    humantime::parse_rfc3339(plain.split_whitespace().next()?).ok()
}

/// The restart section of the report.
pub fn render(figures: &[RestartFigure]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nAgent replaced under load ({RATE} new connections/s, mutual TLS cross-node, node 0's \
         agent; every answered connection counted over mutual TLS by the server's proxy; the \
         targets: 0 failed)"
    );
    let mut table = Table::new(&[
        ("replacement", Align::Left),
        ("sent", Align::Right),
        ("failed", Align::Right),
        ("no agent accepting", Align::Right),
        ("slowest connection", Align::Right),
        ("over 100 ms", Align::Right),
    ]);
    for figure in figures {
        table.row(vec![
            figure.replacement.label().to_owned(),
            figure.sent.to_string(),
            figure.failed.to_string(),
            format!("{:.0} ms", figure.gap_ms),
            format!("{} ms", figure.slowest_ms),
            figure.slow.to_string(),
        ]);
    }
    out.push_str(&table.render(2));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_runs_from_the_old_agents_last_accept_to_the_new_ones_first() {
        let in_place = "\u{1b}[2m2026-12-06T23:09:43.401187Z\u{1b}[0m INFO stopped accepting; the pods stay\n\
             2026-12-06T23:09:43.606204Z INFO took over the listeners of an earlier agent pod=a\n\
             2026-12-06T23:09:43.706204Z INFO took over the listeners of an earlier agent pod=b\n";
        let gap = accept_gap_ms(in_place).expect("a gap");
        assert!((gap - 205.017).abs() < 0.01, "{gap}");
        let overlap = "2026-12-06T23:09:43.606204Z INFO took over the listeners of an earlier agent\n\
             2026-12-06T23:09:44.401187Z INFO stopped accepting; the pods stay\n";
        assert_eq!(accept_gap_ms(overlap), Some(0.0));
        assert_eq!(accept_gap_ms("nothing here"), None);
    }
}
