//! The plaintext relay: an enrolled pod's bulk stream to a server outside the mesh (a
//! database, a legacy service), which the node proxy captures and relays without TLS. The
//! proxy neither reads nor changes those bytes, so it moves them in the kernel (`splice`);
//! this row shows what that leaves of the stream's throughput, against the same stream from
//! a pod outside the mesh, interleaved in one run.

use anyhow::bail;
use mesh_tests::{Cluster, PodSpec, namespace_yaml};

use super::{
    Interrupt,
    report::median,
    scale::metric,
    table::{Align, Table},
    tools, wait_enrolled,
};

const INSIDE: &str = "relay-inside";
const OUTSIDE: &str = "relay-outside";
/// The source proxy's count of plaintext connections (`connection_security_policy="none"`):
/// what proves a relayed run went through it.
const OPENED: &str = "istio_tcp_connections_opened_total";
const PLAINTEXT: &[(&str, &str)] = &[
    ("reporter", "source"),
    ("connection_security_policy", "none"),
];

/// Bits per second of each round, each way of sending.
pub struct Measured {
    no_mesh: Vec<f64>,
    relayed: Vec<f64>,
}

/// Runs `rounds` × (a stream from a pod outside the mesh, one from an enrolled pod), each
/// `seconds` long, cross-node, to one server outside the mesh.
pub fn measure(interrupt: &Interrupt, rounds: u32, seconds: u32) -> anyhow::Result<Measured> {
    println!("bench: plaintext relay: an enrolled pod's bulk stream to a pod outside the mesh…");
    let mut cluster = Cluster::new("bench-relay", 2);
    cluster.set_agent_log_filter("info");
    let enrolled = [("nodemesh.io/enabled", "true")];
    cluster.write_config("namespace-inside.yaml", &namespace_yaml(INSIDE, &enrolled));
    cluster.write_config("namespace-outside.yaml", &namespace_yaml(OUTSIDE, &[]));
    let inside = cluster.add_pod(PodSpec::new("client", 0).namespace(INSIDE));
    let outside = cluster.add_pod(PodSpec::new("plain-client", 0).namespace(OUTSIDE));
    let server = cluster.add_pod(PodSpec::new("server", 1).namespace(OUTSIDE));
    cluster.start_agents();
    wait_enrolled(&cluster, &[1, 0])?;
    let mut iperf3 = tools::iperf3_server(&cluster, &server)?;
    let mut measured = Measured {
        no_mesh: Vec::new(),
        relayed: Vec::new(),
    };
    for round in 1..=rounds {
        interrupt.check()?;
        let opened = metric(&cluster, OPENED, PLAINTEXT).unwrap_or(0.0);
        let no_mesh = tools::iperf3_bulk(&cluster, &outside, server.ip, seconds)?;
        if metric(&cluster, OPENED, PLAINTEXT).unwrap_or(0.0) != opened {
            bail!("the stream from outside the mesh went through the proxy");
        }
        let relayed = tools::iperf3_bulk(&cluster, &inside, server.ip, seconds)?;
        if metric(&cluster, OPENED, PLAINTEXT).unwrap_or(0.0) <= opened {
            bail!("the enrolled pod's stream did not go through its node's proxy");
        }
        iperf3.check_running()?;
        println!(
            "bench:   round {round}/{rounds}: no mesh {:.2} Gbit/s, relayed {:.2} Gbit/s",
            no_mesh / 1e9,
            relayed / 1e9
        );
        measured.no_mesh.push(no_mesh);
        measured.relayed.push(relayed);
    }
    Ok(measured)
}

/// The row of the report.
pub fn render(measured: &Measured) -> String {
    let (no_mesh, relayed) = (median(&measured.no_mesh), median(&measured.relayed));
    let mut table = Table::new(&[
        ("plaintext relay (median of rounds)", Align::Left),
        ("no mesh", Align::Right),
        ("relayed by the proxy", Align::Right),
        ("× no mesh", Align::Right),
    ]);
    table.row(vec![
        "one bulk stream cross-node, enrolled pod → pod outside the mesh".into(),
        format!("{:.2} Gbit/s", no_mesh / 1e9),
        format!("{:.2} Gbit/s", relayed / 1e9),
        format!("{:.2}", relayed / no_mesh),
    ]);
    format!(
        "\nPlaintext relay (the source proxy captures it and moves its bytes in the kernel):\n{}",
        table.render(2)
    )
}
