//! The measuring tools, real and common so users can reproduce the figures (PERF.md):
//! `sockperf ping-pong` for warm round trips, `iperf3` for one bulk TCP stream, and the
//! harness's own `mesh-testapp connect` for new connections per second; the servers they
//! talk to, `mesh-testapp http-serve` included (oha, the HTTP client, has its own module).

use std::{
    fs::File,
    io::Read,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{Cluster, Pod};

/// Port of the `sockperf server` in every server pod.
pub const SOCKPERF_PORT: u16 = 11111;
/// Port of the `iperf3 -s` in every server pod.
pub const IPERF_PORT: u16 = 5201;
/// Port of the `mesh-testapp serve` in every server pod.
pub const TESTAPP_PORT: u16 = 8080;
/// Port of the `mesh-testapp http-serve` in the cross-node server pods (8080 is taken by
/// `mesh-testapp serve`).
pub const HTTP_PORT: u16 = 8081;
/// The line `mesh-testapp connect` sends on each connection.
const CONNECT_MESSAGE: &str = "x";
/// Fewer new connections per second than this and a `mesh-testapp connect` run counts as
/// hung (it sets its own timeout of 5 s per connect, read and write).
const SLOWEST_CONNECTION_RATE: u32 = 50;

const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than its own duration a client may take before it counts as hung.
const CLIENT_GRACE: Duration = Duration::from_secs(30);

/// A server tool running in a pod; killed on drop.
pub struct Server {
    child: Child,
    what: String,
    log: PathBuf,
}

impl Server {
    /// Fails when the server exited (a crashed server would make the next figure fail in
    /// a more confusing way).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); log {}:\n{}",
                self.what,
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `sockperf server --tcp` on the pod's address, once it listens.
pub fn sockperf_server(cluster: &Cluster, pod: &Pod) -> anyhow::Result<Server> {
    let ip = pod.ip.to_string();
    let port = SOCKPERF_PORT.to_string();
    spawn_server(
        cluster,
        pod,
        "sockperf",
        &["server", "--tcp", "-i", &ip, "-p", &port],
        SOCKPERF_PORT,
    )
}

/// `iperf3 -s` on the pod's address, once it listens.
pub fn iperf3_server(cluster: &Cluster, pod: &Pod) -> anyhow::Result<Server> {
    let ip = pod.ip.to_string();
    let port = IPERF_PORT.to_string();
    spawn_server(
        cluster,
        pod,
        "iperf3",
        &["-s", "-B", &ip, "-p", &port],
        IPERF_PORT,
    )
}

/// `mesh-testapp serve` on the pod's address, once it listens: replies to every line.
pub fn testapp_server(cluster: &Cluster, pod: &Pod) -> anyhow::Result<Server> {
    let listen = SocketAddrV4::new(pod.ip, TESTAPP_PORT).to_string();
    spawn_server(
        cluster,
        pod,
        mesh_tests::bin_path("mesh-testapp"),
        &["serve", "--listen", &listen, "--name", &pod.name],
        TESTAPP_PORT,
    )
}

/// `mesh-testapp http-serve` on the pod's address, once it listens: HTTP/1.1 answers, of
/// `size` bytes with `?size=<size>`.
pub fn testapp_http_server(cluster: &Cluster, pod: &Pod) -> anyhow::Result<Server> {
    let listen = SocketAddrV4::new(pod.ip, HTTP_PORT).to_string();
    spawn_server(
        cluster,
        pod,
        mesh_tests::bin_path("mesh-testapp"),
        &["http-serve", "--listen", &listen, "--name", &pod.name],
        HTTP_PORT,
    )
}

fn spawn_server(
    cluster: &Cluster,
    pod: &Pod,
    program: impl AsRef<Path>,
    args: &[&str],
    port: u16,
) -> anyhow::Result<Server> {
    let program = program.as_ref();
    let name = program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy();
    let what = format!(
        "{name} {} in pod {}/{}",
        args.join(" "),
        pod.namespace,
        pod.name
    );
    // The port tells apart two servers of one program in a pod (mesh-testapp's TCP and
    // HTTP servers).
    let log = cluster
        .logs_dir()
        .join(format!("{name}-{}-{}-{port}.log", pod.namespace, pod.name));
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    // Spawned from the main thread: pod processes die with the thread that started them.
    let child = pod
        .command(cluster, program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {what} (is it installed? cargo xtask setup)"))?;
    let mut server = Server { child, what, log };
    let deadline = Instant::now() + SERVER_READY_TIMEOUT;
    while !listening(&pod.netns, port)? {
        server.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{} does not listen on port {port} after {SERVER_READY_TIMEOUT:?}; log:\n{}",
                server.what,
                tail(&server.log)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

/// Whether something listens on TCP `port` in the netns (asked with iproute2's `ss`, which
/// switches namespace by itself).
fn listening(netns: &str, port: u16) -> anyhow::Result<bool> {
    let output = Command::new("ss")
        .args([
            "-H",
            "-l",
            "-t",
            "-n",
            "-N",
            netns,
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .stdin(Stdio::null())
        .output()
        .context("running ss (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ss -N {netns} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(!output.stdout.iter().all(u8::is_ascii_whitespace))
}

// === clients ===

/// Round-trip percentiles of one `sockperf ping-pong` run, in µs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundTrip {
    pub p50_us: f64,
    pub p99_us: f64,
    pub observations: u64,
}

/// `sockperf ping-pong --tcp --full-rtt` from `client` to `server` for `seconds` with
/// `size`-byte messages: warm round trips on one connection.
pub fn sockperf_ping_pong(
    cluster: &Cluster,
    client: &Pod,
    server: Ipv4Addr,
    seconds: u32,
    size: u32,
) -> anyhow::Result<RoundTrip> {
    let (ip, port) = (server.to_string(), SOCKPERF_PORT.to_string());
    let (time, size) = (seconds.to_string(), size.to_string());
    let args = [
        "ping-pong",
        "--tcp",
        "--full-rtt",
        "-i",
        &ip,
        "-p",
        &port,
        "-t",
        &time,
        "-m",
        &size,
    ];
    let what = format!("sockperf {} (pod {})", args.join(" "), client.name);
    let mut command = client.command(cluster, "sockperf");
    command.args(args);
    let output = run_to_end(command, &what, client_timeout(seconds))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    parse_sockperf(&stdout).with_context(|| {
        format!(
            "{what}: unexpected output:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// `iperf3 -c` from `client` to `server` for `seconds`: bits per second received by the
/// server over one bulk TCP stream.
pub fn iperf3_bulk(
    cluster: &Cluster,
    client: &Pod,
    server: Ipv4Addr,
    seconds: u32,
) -> anyhow::Result<f64> {
    let (ip, port, time) = (
        server.to_string(),
        IPERF_PORT.to_string(),
        seconds.to_string(),
    );
    let args = ["-c", &ip, "-p", &port, "-t", &time, "-J"];
    let what = format!("iperf3 {} (pod {})", args.join(" "), client.name);
    let mut command = client.command(cluster, "iperf3");
    command.args(args);
    let output = run_to_end(command, &what, client_timeout(seconds))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    parse_iperf3(&stdout).with_context(|| format!("{what}: unexpected output:\n{stdout}"))
}

/// New connections per second of `mesh-testapp connect --count <count>` from `client` to
/// the testapp server at `server`: sequential connections, each one line and its reply.
/// The whole run is timed, from spawning the client to the end of its output (its exit),
/// so its start-up counts too: a few ms, amortized over a large `count`.
pub fn connect_rate(
    cluster: &Cluster,
    client: &Pod,
    server: Ipv4Addr,
    count: u32,
) -> anyhow::Result<f64> {
    let (to, count_arg) = (
        SocketAddrV4::new(server, TESTAPP_PORT).to_string(),
        count.to_string(),
    );
    let args = [
        "connect",
        "--to",
        &to,
        "--count",
        &count_arg,
        "--message",
        CONNECT_MESSAGE,
    ];
    let what = format!("mesh-testapp {} (pod {})", args.join(" "), client.name);
    let mut command = client.testapp(cluster);
    command.args(args);
    let timeout = client_timeout(count.div_ceil(SLOWEST_CONNECTION_RATE));
    let (output, elapsed) = run_timed(command, &what, timeout)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    connection_rate(&stdout, count, elapsed).with_context(|| {
        format!(
            "{what}: unexpected output (first lines):\n{}",
            head(&stdout)
        )
    })
}

/// How long a client asked to run for `seconds` may take before it counts as hung.
pub(super) fn client_timeout(seconds: u32) -> Duration {
    Duration::from_secs(seconds.into()) + CLIENT_GRACE
}

/// Runs `command` to completion (killed after `timeout`); fails unless it exits 0.
pub(super) fn run_to_end(
    command: Command,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<Output> {
    run_timed(command, what, timeout).map(|(output, _)| output)
}

/// Like [`run_to_end`], also returning how long the command ran: from just before it was
/// spawned until its stdout closed (when it exited), measured by the thread reading that
/// pipe, so the timing does not depend on how often the exit is polled.
fn run_timed(
    mut command: Command,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<(Output, Duration)> {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what} (is it installed? cargo xtask setup)"))?;
    // Drained while waiting, so a chatty tool cannot block on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            (bytes, Instant::now())
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} still running after {timeout:?}: killed");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let (stdout, closed) = stdout
        .join()
        .unwrap_or_else(|_| (Vec::new(), Instant::now()));
    let output = Output {
        status,
        stdout,
        stderr: stderr.join().map(|(bytes, _)| bytes).unwrap_or_default(),
    };
    if !status.success() {
        bail!(
            "{what} failed ({status}):\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((output, closed.saturating_duration_since(started)))
}

/// Reads the summary of `sockperf ping-pong --full-rtt`:
///
/// ```text
/// sockperf: Summary: Round trip is 37.882 usec
/// sockperf: Total 63361 observations; each percentile contains 633.61 observations
/// sockperf: ---> percentile 99.000 =   58.120
/// sockperf: ---> percentile 50.000 =   36.377
/// ```
///
/// With `--full-rtt` the percentiles are whole round trips in µs (without it, sockperf
/// halves them and says "Latency is").
fn parse_sockperf(text: &str) -> anyhow::Result<RoundTrip> {
    if !text.contains("Round trip is") {
        bail!("no \"Round trip is\" summary: was --full-rtt ignored?");
    }
    let percentile = |which: &str| -> anyhow::Result<f64> {
        let needle = format!("percentile {which} =");
        let line = text
            .lines()
            .find(|l| l.contains(&needle))
            .with_context(|| format!("no line with {needle:?}"))?;
        let value = line[line.find('=').expect("the needle has '=' in it") + 1..].trim();
        value
            .parse()
            .with_context(|| format!("percentile {which}: {value:?} is not a number"))
    };
    let observations = text
        .lines()
        .find_map(|l| {
            let (count, after) = l.split("Total ").nth(1)?.split_once(' ')?;
            after
                .starts_with("observations")
                .then(|| count.parse::<u64>().ok())
                .flatten()
        })
        .context("no \"Total N observations\" line")?;
    if observations == 0 {
        bail!("sockperf made no observation");
    }
    Ok(RoundTrip {
        p50_us: percentile("50.000")?,
        p99_us: percentile("99.000")?,
        observations,
    })
}

/// `end.sum_received.bits_per_second` of `iperf3 -J` (errors are in `error`).
fn parse_iperf3(json: &str) -> anyhow::Result<f64> {
    let value: serde_json::Value = serde_json::from_str(json).context("not JSON")?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {error}");
    }
    let bps = value
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .context("no end.sum_received.bits_per_second")?;
    if bps <= 0.0 {
        bail!("iperf3 received nothing");
    }
    Ok(bps)
}

/// Connections per second of a `mesh-testapp connect --count <count>` run that printed
/// `stdout` (one reply line per connection) in `elapsed`.
fn connection_rate(stdout: &str, count: u32, elapsed: Duration) -> anyhow::Result<f64> {
    let echo = format!("\"echo\":\"{CONNECT_MESSAGE}\"");
    let replies = stdout.lines().filter(|l| l.contains(&echo)).count();
    if replies != count as usize {
        bail!("{replies} replies echoing {CONNECT_MESSAGE:?} for {count} connections");
    }
    if count == 0 || elapsed.is_zero() {
        bail!("no connection or no time to measure ({count} in {elapsed:?})");
    }
    Ok(f64::from(count) / elapsed.as_secs_f64())
}

fn head(text: &str) -> String {
    text.lines().take(5).collect::<Vec<_>>().join("\n")
}

fn tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_rate_counts_replies() {
        let reply =
            r#"{"echo":"x","local":"10.244.1.10:8080","peer":"10.244.0.10:40000","server":"s"}"#;
        let stdout = format!("{reply}\n{reply}\n{reply}\n{reply}\n");
        let rate = connection_rate(&stdout, 4, Duration::from_millis(2)).unwrap();
        assert!((rate - 2000.0).abs() < 1e-6, "{rate}");
        let short = connection_rate(&stdout, 5, Duration::from_millis(2)).unwrap_err();
        assert!(short.to_string().contains("4 replies"), "{short}");
        assert!(connection_rate("", 0, Duration::from_millis(2)).is_err());
        assert!(connection_rate(&stdout, 4, Duration::ZERO).is_err());
    }

    #[test]
    fn parses_iperf3_json() {
        let json = r#"{"start":{},"intervals":[],"end":{"sum_sent":{"bits_per_second":2.1e10},
            "sum_received":{"bits_per_second":2.0e10}}}"#;
        assert_eq!(parse_iperf3(json).unwrap(), 2.0e10);
        let error = r#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server"}"#;
        assert!(
            parse_iperf3(error)
                .unwrap_err()
                .to_string()
                .contains("unable to connect")
        );
    }
}
