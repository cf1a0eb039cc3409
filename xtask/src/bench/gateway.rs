//! The ingress gateway row: HTTPS from a client outside the mesh through `mesh-node
//! gateway` (TLS terminated, the request routed by a VirtualService bound to its Gateway,
//! HBONE to the backend's node) against the same requests in plain HTTP straight to a
//! server outside the mesh, interleaved in one run: what the gateway adds to a request, and
//! the requests it and both agents carry per CPU-second.

use std::{
    fs::File,
    net::SocketAddr,
    process::{Child, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use mesh_tests::{Cluster, Pod, PodSpec, namespace_yaml, service_yaml};

use super::{
    Interrupt, cpu_seconds,
    http::{COUNT_SETTLE, HttpLoad, MIN_SECONDS},
    oha::{self, HttpRun},
    report::median,
    running_agents,
    table::{Align, Table},
    tools::{self, HTTP_PORT},
    wait_enrolled,
};

const MESH: &str = "gateway-mesh";
const OUTSIDE: &str = "gateway-outside";
const GATEWAY_NAMESPACE: &str = "gateway-system";
const HOST: &str = "web.example.com";
const SERVICE_IP: &str = "10.96.0.90";
const GATEWAY_HEALTH: &str = "127.0.0.1:15021";
/// The answers' size, as the L7 rows': PERF.md's 1 KiB.
const QUERY: &str = "/?size=1024";

/// Each round's two runs.
pub struct Measured {
    no_mesh: Vec<HttpRun>,
    via_gateway: Vec<HttpRun>,
    /// Requests answered through the gateway per CPU-second of the gateway and both agents.
    requests_per_cpu_second: Vec<f64>,
}

/// `mesh-node gateway` in its pod, killed (by PID) when dropped.
struct GatewayProcess(Child);

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `rounds` × (plain HTTP to a server outside the mesh, HTTPS through the gateway to
/// the same kind of server in the mesh), each `seconds` long at PERF.md's fixed rate.
pub fn measure(interrupt: &Interrupt, rounds: u32, seconds: u32) -> anyhow::Result<Measured> {
    println!("bench: ingress gateway: HTTPS through mesh-node gateway into the mesh…");
    let seconds = seconds.max(MIN_SECONDS);
    let mut cluster = Cluster::new("bench-gateway", 2);
    cluster.set_agent_log_filter("info");
    let enrolled = [("nodemesh.io/enabled", "true")];
    cluster.write_config("ns-mesh.yaml", &namespace_yaml(MESH, &enrolled));
    cluster.write_config("ns-outside.yaml", &namespace_yaml(OUTSIDE, &[]));
    cluster.write_config("ns-gateway.yaml", &namespace_yaml(GATEWAY_NAMESPACE, &[]));
    let web = cluster.add_pod(PodSpec::new("web", 1).namespace(MESH).label("app", "web"));
    let plain = cluster.add_pod(PodSpec::new("plain-web", 1).namespace(OUTSIDE));
    let client = cluster.add_pod(PodSpec::new("client", 0).namespace(OUTSIDE));
    let gateway = cluster.add_pod(
        PodSpec::new("gateway", 0)
            .namespace(GATEWAY_NAMESPACE)
            .label("istio", "ingressgateway"),
    );
    cluster.write_config(
        "web.yaml",
        &service_yaml(
            "web",
            MESH,
            SERVICE_IP,
            &[("http", 80, HTTP_PORT)],
            &[("app", "web")],
        ),
    );
    cluster.write_config("gateway.yaml", &gateway_config()?);
    cluster.start_agents();
    wait_enrolled(&cluster, &[0, 1])?;
    let mut servers = [
        tools::testapp_http_server(&cluster, &web)?,
        tools::testapp_http_server(&cluster, &plain)?,
    ];
    let process = start_gateway(&cluster, &gateway)?;
    let gateway_pid = process.0.id();
    let no_mesh_url = format!("http://{}:{HTTP_PORT}{QUERY}", plain.ip);
    let gateway_url = format!("https://{HOST}{QUERY}");
    let connect_to = format!("{HOST}:443:{}:443", gateway.ip);
    let through_gateway = ["--insecure", "--connect-to", connect_to.as_str()];
    let load = HttpLoad::FixedRate.oha();
    let mut measured = Measured {
        no_mesh: Vec::new(),
        via_gateway: Vec::new(),
        requests_per_cpu_second: Vec::new(),
    };
    for round in 1..=rounds {
        interrupt.check()?;
        let no_mesh = oha::run(&cluster, &client, &no_mesh_url, load, seconds, &[])?;
        let mut pids = running_agents(&cluster)?;
        pids.push(gateway_pid);
        let before = cpu_seconds(&pids)?;
        let proven = proven_requests(&cluster)?;
        let via_gateway = oha::run(
            &cluster,
            &client,
            &gateway_url,
            load,
            seconds,
            &through_gateway,
        )?;
        std::thread::sleep(COUNT_SETTLE);
        let cpu: f64 = cpu_seconds(&pids)?
            .iter()
            .zip(&before)
            .map(|(after, before)| after - before)
            .sum();
        let counted = proven_requests(&cluster)? - proven;
        if counted < via_gateway.answered as f64 {
            bail!(
                "{} requests through the gateway were answered, but the backend's agent \
                 counted {counted} over mutual TLS from the gateway: the path is not the \
                 mesh's",
                via_gateway.answered
            );
        }
        for server in &mut servers {
            server.check_running()?;
        }
        let per_cpu = via_gateway.answered as f64 / cpu;
        println!(
            "bench:   round {round}/{rounds}: no mesh p50 {:.0} µs, via the gateway p50 {:.0} \
             µs, {per_cpu:.0} requests per CPU-second",
            no_mesh.p50_us, via_gateway.p50_us
        );
        measured.no_mesh.push(no_mesh);
        measured.via_gateway.push(via_gateway);
        measured.requests_per_cpu_second.push(per_cpu);
    }
    drop(process);
    Ok(measured)
}

/// The destination agent's count of requests that came over mutual TLS from the gateway:
/// what proves a run took the gateway's path into the mesh.
fn proven_requests(cluster: &Cluster) -> anyhow::Result<f64> {
    let (status, text) = cluster
        .try_http_get(1, mesh_tests::AGENT_METRICS_PORT, "/metrics")
        .context("node1's agent metrics")?;
    if status != 200 {
        bail!("node1's agent metrics answered {status}");
    }
    Ok(mesh_tests::metric_value(
        &text,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("source_workload", "gateway"),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
    .unwrap_or(0.0))
}

/// A self-signed certificate for [`HOST`] (oha is told not to check it), the Gateway
/// serving it on 443, and the VirtualService routing every request to the `web` Service.
fn gateway_config() -> anyhow::Result<String> {
    let certified = rcgen::generate_simple_self_signed(vec![HOST.to_owned()])?;
    let indent = |pem: String| pem.trim_end().replace('\n', "\n    ");
    Ok(format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: bench-credential, namespace: {GATEWAY_NAMESPACE}}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
    {}
  tls.key: |
    {}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bench, namespace: {GATEWAY_NAMESPACE}}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    tls: {{mode: SIMPLE, credentialName: bench-credential}}
    hosts: [{HOST}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: {MESH}}}
spec:
  hosts: [{HOST}]
  gateways: [{GATEWAY_NAMESPACE}/bench]
  http:
  - route:
    - destination: {{host: web, port: {{number: 80}}}}
",
        indent(certified.cert.pem()),
        indent(certified.signing_key.serialize_pem())
    ))
}

/// Starts `mesh-node gateway` in `pod` and waits until it is ready.
fn start_gateway(cluster: &Cluster, pod: &Pod) -> anyhow::Result<GatewayProcess> {
    let log_path = cluster.logs_dir().join("gateway.log");
    let log = File::create(&log_path).context("the gateway's log")?;
    let config_dir = cluster.config_dir();
    let ca_dir = cluster.work_dir().join("ca");
    let node = cluster.node_name(pod.node);
    let child = pod
        .command(cluster, mesh_tests::bin_path("mesh-node"))
        .args([
            "gateway",
            "--pod-name",
            &pod.name,
            "--pod-namespace",
            &pod.namespace,
        ])
        .args(["--node-name", &node, "--health-addr", GATEWAY_HEALTH])
        .args(["--config-dir", &config_dir.display().to_string()])
        .args(["--ca-dir", &ca_dir.display().to_string()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting mesh-node gateway")?;
    let process = GatewayProcess(child);
    let health: SocketAddr = GATEWAY_HEALTH.parse()?;
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ready = mesh_tests::http_get_in_netns(&pod.netns, health, "/healthz/ready")
            .is_ok_and(|(status, _)| status == 200);
        if ready {
            return Ok(process);
        }
        if Instant::now() > deadline {
            bail!(
                "the gateway was not ready within 30 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The row of the report.
pub fn render(measured: &Measured) -> String {
    let p50 = |runs: &[HttpRun]| median(&runs.iter().map(|r| r.p50_us).collect::<Vec<_>>());
    let p99 = |runs: &[HttpRun]| median(&runs.iter().map(|r| r.p99_us).collect::<Vec<_>>());
    let mut table = Table::new(&[
        (
            "HTTP 1 KiB at 1,000 req/s × 16 conns (median of rounds)",
            Align::Left,
        ),
        ("p50", Align::Right),
        ("p99", Align::Right),
        ("requests per CPU-second", Align::Right),
    ]);
    table.row(vec![
        "no mesh: plain HTTP to a server outside the mesh".into(),
        format!("{:.0} µs", p50(&measured.no_mesh)),
        format!("{:.0} µs", p99(&measured.no_mesh)),
        "-".into(),
    ]);
    table.row(vec![
        "HTTPS through mesh-node gateway → HBONE → a mesh Service".into(),
        format!("{:.0} µs", p50(&measured.via_gateway)),
        format!("{:.0} µs", p99(&measured.via_gateway)),
        format!("{:.0}", median(&measured.requests_per_cpu_second)),
    ]);
    table.row(vec![
        "added by the gateway's path (TLS in, L7, HBONE, destination proxy)".into(),
        format!(
            "+{:.0} µs",
            p50(&measured.via_gateway) - p50(&measured.no_mesh)
        ),
        format!(
            "+{:.0} µs",
            p99(&measured.via_gateway) - p99(&measured.no_mesh)
        ),
        "(gateway + both agents)".into(),
    ]);
    format!(
        "\nIngress gateway (client outside the mesh on node0, gateway on node0, server on \
         node1):\n{}",
        table.render(2)
    )
}
