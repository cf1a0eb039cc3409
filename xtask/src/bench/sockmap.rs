//! Socket acceleration (`--sockmap`): what moving the app ↔ in-pod listener leg socket to
//! socket (`sk_msg`) takes off what the mesh adds to a warm round trip, against the same
//! leg through TCP on `lo` (the default). Same node, mutual TLS, so the mesh's own share is
//! smallest and the leg's share largest; the agent is restarted between the two settings,
//! and each setting's runs sit beside no-mesh runs of the same round.
//!
//! No bulk stream with sockmap on: data moved by `sk_msg` has no backpressure on this
//! kernel, so a bulk sender fills the node's TCP memory (`net.ipv4.tcp_mem`, every socket
//! of the machine then under memory pressure) until its writes fail with ENOMEM. That is
//! why it is off by default (docs/benchmarks.md).

use std::{thread, time::Duration};

use anyhow::bail;
use mesh_tests::{Cluster, Pod, PodSpec, namespace_yaml};

use super::{
    Interrupt, MUTUAL_TLS,
    report::median,
    restart_agents,
    scale::metric,
    table::{Align, Table},
    tools::{self, RoundTrip},
    wait_enrolled,
};

const MESH: &str = "sockmap-mesh";
const PLAIN: &str = "sockmap-plain";
/// The message size of the round trips: PERF.md's small request.
const SIZE: u32 = 16;
const BPF_EVENTS: &str = "nodemesh_bpf_events";
const REDIRECTED: &[(&str, &str)] = &[("event", "sockmap_redirected")];
const OPENED: &str = "istio_tcp_connections_opened_total";
/// The agent copies the kernel's counters into its metrics every second.
const COUNTERS_SETTLE: Duration = Duration::from_millis(1200);

/// Round trips without the mesh, and through it with sockmap on and off, one per round.
#[derive(Default)]
pub struct Measured {
    no_mesh: Vec<RoundTrip>,
    on: Vec<RoundTrip>,
    off: Vec<RoundTrip>,
}

/// A client and a server pod on node0, in `namespace`.
fn pair(cluster: &mut Cluster, namespace: &str) -> (Pod, Pod) {
    let pod = |name: &str| PodSpec::new(name, 0).namespace(namespace);
    (
        cluster.add_pod(pod("client")),
        cluster.add_pod(pod("server")),
    )
}

/// Runs `rounds` × (sockmap on, sockmap off), each a round trip of `seconds` through the
/// mesh and one without it.
pub fn measure(interrupt: &Interrupt, rounds: u32, seconds: u32) -> anyhow::Result<Measured> {
    println!("bench: sockmap: the app ↔ in-pod listener leg, socket to socket or through lo…");
    let mut cluster = Cluster::new("bench-sockmap", 1);
    cluster.set_agent_log_filter("info");
    let enrolled = [("nodemesh.io/enabled", "true")];
    cluster.write_config("namespace-mesh.yaml", &namespace_yaml(MESH, &enrolled));
    cluster.write_config("namespace-plain.yaml", &namespace_yaml(PLAIN, &[]));
    let (mesh_client, mesh_server) = pair(&mut cluster, MESH);
    let (plain_client, plain_server) = pair(&mut cluster, PLAIN);
    cluster.start_agents();
    wait_enrolled(&cluster, &[2])?;
    let mut servers = Vec::new();
    for server in [&mesh_server, &plain_server] {
        servers.push(tools::sockperf_server(&cluster, server)?);
    }
    let mut measured = Measured::default();
    for round in 1..=rounds {
        for sockmap in [true, false] {
            interrupt.check()?;
            let args: &[&str] = if sockmap { &["--sockmap"] } else { &[] };
            restart_agents(&mut cluster, args)?;
            let mesh = Run {
                cluster: &cluster,
                client: &mesh_client,
                server: &mesh_server,
                sockmap: Some(sockmap),
            };
            let plain = Run {
                cluster: &cluster,
                client: &plain_client,
                server: &plain_server,
                sockmap: None,
            };
            let base = plain.round_trip(seconds)?;
            let with_mesh = mesh.round_trip(seconds)?;
            for server in &mut servers {
                server.check_running()?;
            }
            println!(
                "bench:   round {round}/{rounds}, sockmap {}: p50 {:.1} µs (no mesh {:.1})",
                if sockmap { "on" } else { "off" },
                with_mesh.p50_us,
                base.p50_us,
            );
            measured.no_mesh.push(base);
            if sockmap {
                measured.on.push(with_mesh);
            } else {
                measured.off.push(with_mesh);
            }
        }
    }
    Ok(measured)
}

/// One client and server, with what the agent must have counted of their runs:
/// `sockmap` is `None` for the pods outside the mesh.
struct Run<'a> {
    cluster: &'a Cluster,
    client: &'a Pod,
    server: &'a Pod,
    sockmap: Option<bool>,
}

impl Run<'_> {
    fn round_trip(&self, seconds: u32) -> anyhow::Result<RoundTrip> {
        self.proven(|| {
            tools::sockperf_ping_pong(self.cluster, self.client, self.server.ip, seconds, SIZE)
        })
    }

    /// Runs `measure` and checks the agent's counts moved as they must: a mesh run over
    /// mutual TLS, its messages moved by sk_msg exactly when sockmap is on; a no-mesh run
    /// not through the proxy at all.
    fn proven<T>(&self, measure: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let counts = || -> anyhow::Result<(f64, f64)> {
            thread::sleep(COUNTERS_SETTLE);
            Ok((
                metric(self.cluster, BPF_EVENTS, REDIRECTED).unwrap_or(0.0),
                metric(self.cluster, OPENED, MUTUAL_TLS).unwrap_or(0.0),
            ))
        };
        let (redirected, opened) = counts()?;
        let measured = measure()?;
        let (redirected_after, opened_after) = counts()?;
        let (moved, proxied) = (redirected_after > redirected, opened_after > opened);
        match self.sockmap {
            None if proxied => bail!("a run outside the mesh went through the proxy"),
            Some(_) if !proxied => bail!("a mesh run was not carried over mutual TLS"),
            Some(true) if !moved => bail!("with sockmap on, sk_msg moved no message"),
            Some(false) if moved => bail!("without --sockmap, sk_msg moved messages"),
            _ => Ok(measured),
        }
    }
}

/// The row of the report.
pub fn render(measured: &Measured) -> String {
    let p50 = |runs: &[RoundTrip]| median_of(runs, |r| r.p50_us);
    let p99 = |runs: &[RoundTrip]| median_of(runs, |r| r.p99_us);
    let (base50, base99) = (p50(&measured.no_mesh), p99(&measured.no_mesh));
    let (on50, on99) = (p50(&measured.on) - base50, p99(&measured.on) - base99);
    let (off50, off99) = (p50(&measured.off) - base50, p99(&measured.off) - base99);
    let mut table = Table::new(&[
        ("sockmap, same node, mTLS (median of rounds)", Align::Left),
        ("no mesh", Align::Right),
        ("--sockmap", Align::Right),
        ("default (lo)", Align::Right),
        ("sockmap vs lo", Align::Right),
    ]);
    table.row(vec![
        format!("warm RR {SIZE} B, p50 / p99 (mesh: added)"),
        format!("{base50:.1} / {base99:.1} µs"),
        format!("+{on50:.1} / +{on99:.1} µs"),
        format!("+{off50:.1} / +{off99:.1} µs"),
        format!(
            "{:+.0} % / {:+.0} % added",
            (on50 / off50 - 1.0) * 100.0,
            (on99 / off99 - 1.0) * 100.0
        ),
    ]);
    format!(
        "\nSocket acceleration (sk_msg on the app ↔ in-pod listener leg; PERF.md: ≥ 15 % less \
         added latency; off by default, see docs/benchmarks.md):\n{}",
        table.render(2)
    )
}

fn median_of(round_trips: &[RoundTrip], value: impl Fn(&RoundTrip) -> f64) -> f64 {
    median(&round_trips.iter().map(value).collect::<Vec<_>>())
}
