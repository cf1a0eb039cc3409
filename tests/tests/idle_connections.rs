//! End to end: connections held open: what 10,000 idle mutual-TLS connections cost the
//! node proxies, that they give it back, and what ports they take from the client.
use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Stdio},
    time::Duration,
};

use mesh_tests::{
    Cluster, Pod, PodSpec, namespace_yaml, rss_bytes, run_in_netns,
    scenario::{ENROLLED, skip, wait_enrolled, wait_for_metric, wait_until},
};

const CONNECTIONS: usize = 10_000;
/// What one idle mutual-TLS connection may cost each proxy (PERF.md).
const MAX_BYTES_PER_CONNECTION: u64 = 30 * 1024;

/// An echo server that holds many connections cheaply: asyncio, one process.
const SERVER: &str = r#"
import asyncio, sys
async def handle(reader, writer):
    while await reader.readline():
        writer.write(b"ok\n")
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]), backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"#;

/// Opens `n` connections 200 at a time, each answered once, says `open`, holds them until
/// a line arrives on stdin, then closes them all and says `closed`. It runs in the client
/// pod (and its node's cgroup, where capture applies), as an app would.
const CLIENT: &str = r#"
import asyncio, sys
async def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    held = []
    while len(held) < n:
        batch = await asyncio.gather(
            *[asyncio.open_connection(host, port) for _ in range(min(200, n - len(held)))])
        for _, writer in batch:
            writer.write(b"hi\n")
        for reader, _ in batch:
            assert await reader.readline() == b"ok\n"
        held += batch
    print("open", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for _, writer in held:
        writer.close()
    await asyncio.gather(*[writer.wait_closed() for _, writer in held], return_exceptions=True)
    print("closed", flush=True)
asyncio.run(main())
"#;

/// Kills a helper process when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ten_thousand_idle_mtls_connections_cost_at_most_30_kib_each_and_are_given_back() {
    if skip() {
        return;
    }
    let mut cluster = Cluster::new("idle_10k", 2);
    let client = cluster.add_pod(PodSpec::new("client", 0).namespace("shop"));
    let web = cluster.add_pod(PodSpec::new("web", 1).namespace("shop"));
    cluster.write_config("ns.yaml", &namespace_yaml("shop", ENROLLED));
    let _server = serve(&cluster, &web, 8080);
    cluster.start_agents();
    wait_enrolled(&cluster, 0, 1);
    wait_enrolled(&cluster, 1, 1);

    let open = |count: usize| open(&cluster, &client, &web, 8080, count);
    // Warm up: certificates, the tunnel, the allocator's first arenas.
    open(200).close();
    wait_for_closed_over_mtls(&cluster, 200);
    let pids = [0, 1].map(|i| cluster.agent_pid(i).expect("agent"));
    let before = pids.map(rss_bytes);

    let connections = open(CONNECTIONS);
    std::thread::sleep(Duration::from_secs(1));
    let held = pids.map(rss_bytes);
    for (i, (held, before)) in held.iter().zip(before).enumerate() {
        let per_connection = held.saturating_sub(before) / CONNECTIONS as u64;
        eprintln!(
            "node{i}: RSS {} KiB idle → {} KiB with {CONNECTIONS} connections: {per_connection} B each",
            before / 1024,
            held / 1024
        );
        assert!(
            per_connection <= MAX_BYTES_PER_CONNECTION,
            "node{i}'s agent: {per_connection} bytes per idle connection"
        );
    }

    connections.close();
    wait_for_closed_over_mtls(&cluster, 200 + CONNECTIONS);
    // The agents prune and give memory back every 30 s.
    let given_back = wait_until(
        Duration::from_secs(45),
        "the agents to give memory back",
        || {
            let after = pids.map(rss_bytes);
            let returned = after
                .iter()
                .zip(held)
                .zip(before)
                .all(|((after, held), before)| *after <= before + (held - before) / 2);
            returned.then_some(after)
        },
    );
    for (i, after) in given_back.iter().enumerate() {
        eprintln!("node{i}: RSS {} KiB after they closed", after / 1024);
    }
}

/// The echo server on `port` of `pod`, once it listens.
fn serve(cluster: &Cluster, pod: &Pod, port: u16) -> Server {
    let mut child = pod
        .command(cluster, "python3")
        .args(["-c", SERVER, &pod.ip.to_string(), &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 in the server pod");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut ready)
        .expect("the server's first line");
    assert_eq!(ready.trim(), "ready");
    Server(child)
}

/// `count` connections from `client` to `server:port`, once each is established and
/// answered; they close when the returned guard is told to.
fn open(cluster: &Cluster, client: &Pod, server: &Pod, port: u16, count: usize) -> Clients {
    let mut child = client
        .command(cluster, "python3")
        .args([
            "-c",
            CLIENT,
            &server.ip.to_string(),
            &port.to_string(),
            &count.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 in the client pod");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let said = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(
        said, "open",
        "{count} connections to port {port} through the mesh"
    );
    Clients {
        child: Server(child),
        lines,
    }
}

/// The destination proxy connects to the app as the client (its address, a port the
/// kernel picks in the server pod's netns). Connections held to one port of a server
/// must not use up the client's ports for every other destination: with 8 ephemeral ports
/// in the server pod's netns, 8 connections held to :8080 leave :8081 reachable, as they
/// would without the mesh. (A bind to port 0 before the connect took a port for every
/// destination, and the search for a free one ran for seconds in the kernel once
/// thousands were taken.)
#[test]
fn connections_held_to_one_port_leave_the_clients_ports_free_for_another() {
    if skip() {
        return;
    }
    const EPHEMERAL_PORTS: usize = 8;
    let mut cluster = Cluster::new("port_share", 2);
    let client = cluster.add_pod(PodSpec::new("client", 0).namespace("shop"));
    let web = cluster.add_pod(PodSpec::new("web", 1).namespace("shop"));
    cluster.write_config("ns.yaml", &namespace_yaml("shop", ENROLLED));
    // The server pod's netns is this test's: its sysctls are its own.
    run_in_netns(&web.netns, || {
        std::fs::write(
            "/proc/sys/net/ipv4/ip_local_port_range",
            format!("40000 {}", 40000 + EPHEMERAL_PORTS - 1),
        )
    })
    .expect("narrowing the server pod's ephemeral ports");
    let _servers = [serve(&cluster, &web, 8080), serve(&cluster, &web, 8081)];
    cluster.start_agents();
    wait_enrolled(&cluster, 0, 1);
    wait_enrolled(&cluster, 1, 1);

    let held = open(&cluster, &client, &web, 8080, EPHEMERAL_PORTS);
    open(&cluster, &client, &web, 8081, 1).close();
    held.close();
    wait_for_closed_over_mtls(&cluster, EPHEMERAL_PORTS + 1);
}

/// Waits until node 1's destination proxy has counted `count` mutual-TLS connections
/// closed.
fn wait_for_closed_over_mtls(cluster: &Cluster, count: usize) {
    let mtls = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
    ];
    wait_for_metric(
        cluster,
        1,
        "istio_tcp_connections_closed_total",
        &mtls,
        count as f64,
    );
}

/// A client process holding its connections.
struct Clients {
    child: Server,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Clients {
    /// Closes every connection and waits until the client says they are closed.
    fn close(mut self) {
        let stdin = self.child.0.stdin.as_mut().expect("piped");
        stdin.write_all(b"close\n").expect("tell the client");
        stdin.flush().expect("flush");
        let said = self.lines.next().and_then(Result::ok).unwrap_or_default();
        assert_eq!(said, "closed");
    }
}
