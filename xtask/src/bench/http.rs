//! The L7 rows: HTTP/1.1 requests with 1 KiB answers from the client pod on node0 to the
//! server pod on node1, at PERF.md's fixed 1,000 requests/s over 16 connections and
//! flat out over 64 (what the proxies can carry per core).
//!
//! The mesh rows go to a Service whose port is named `http`, so the proxies handle every
//! request at L7, through a VirtualService with one route, a timeout and retries:
//! "L7 routing on". The route also sets a response header, which [`check_route`] looks
//! for before any figure counts, so the rows are known to have taken the route. The
//! no-mesh rows go to the server pod's own address: without the mesh nothing turns a
//! ClusterIP into an endpoint here (there is no kube-proxy).

use std::{fmt, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail};
use mesh_tests::{Cluster, Pod};
use serde_json::json;

use super::{
    Mode,
    oha::{self, HttpRun},
    tools::{self, HTTP_PORT},
};

/// The Service (and VirtualService) in front of the mesh namespace's cross-node server.
const SERVICE: &str = "bench-http";
/// Its ClusterIP, in the cluster's service range.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const SERVICE_PORT: u16 = 80;
/// The response header the VirtualService's route sets, and its value.
const ROUTE_HEADER: (&str, &str) = ("x-nodemesh-bench-route", "bench-http");
/// The size of every answer: PERF.md's 1 KiB.
const BODY_BYTES: u32 = 1024;

/// How long the route check's one request may take, in seconds.
const ROUTE_CHECK_SECONDS: u32 = 5;
/// How long the proxies may take to count the last answers after oha has them: they
/// count a request when its answer has been sent.
pub const COUNT_SETTLE: Duration = Duration::from_secs(2);

/// Fewest seconds of an HTTP run, `--quick` included: the first request of each
/// connection also pays for opening it, and at 1,000 requests/s for 3 s those 16 are
/// 0.5 % of the samples, so they stay out of the p99.
pub const MIN_SECONDS: u32 = 3;

/// How hard oha drives the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HttpLoad {
    /// PERF.md's shape: a fixed 1,000 requests/s over 16 keep-alive connections.
    FixedRate,
    /// As fast as 64 keep-alive connections get answers: the proxies' capacity.
    Saturation,
}

impl HttpLoad {
    pub const ALL: [HttpLoad; 2] = [HttpLoad::FixedRate, HttpLoad::Saturation];

    pub fn oha(self) -> oha::Load {
        match self {
            HttpLoad::FixedRate => oha::Load {
                rate: Some(1000),
                connections: 16,
            },
            HttpLoad::Saturation => oha::Load {
                rate: None,
                connections: 64,
            },
        }
    }
}

impl fmt::Display for HttpLoad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = self.oha();
        let rate = match load.rate {
            Some(rate) => format!("@{rate} rps"),
            None => "flat out".to_owned(),
        };
        write!(f, "HTTP/1.1 1 KiB {rate} ×{} conns", load.connections)
    }
}

/// One HTTP run and what the agents spent on it.
#[derive(Clone, Debug)]
pub struct HttpSample {
    pub run: HttpRun,
    /// Wall time from just before oha started to just after it ended.
    pub wall_seconds: f64,
    /// CPU seconds each node's agent used meanwhile.
    pub agent_cpu_seconds: Vec<f64>,
    /// Each node's agent's resident memory after the run, MiB.
    pub agent_rss_mib: Vec<f64>,
}

impl HttpSample {
    /// Cores the agents of all nodes used together while the run lasted.
    pub fn agent_cores(&self) -> f64 {
        self.agent_cpu_seconds.iter().sum::<f64>() / self.wall_seconds
    }

    /// Cores the agents used together per 1,000 requests/s.
    pub fn agent_cores_per_thousand(&self) -> f64 {
        self.agent_cores() / (self.run.requests_per_second() / 1000.0)
    }

    /// Requests answered per CPU second of all agents together.
    pub fn requests_per_agent_cpu_second(&self) -> f64 {
        self.run.answered as f64 / self.agent_cpu_seconds.iter().sum::<f64>()
    }
}

/// The Service and VirtualService of the mesh rows, in `namespace`, in front of the pods
/// labelled `app: <server_app>`, as one file of two documents.
pub fn config_yaml(namespace: &str, server_app: &str) -> String {
    let service = mesh_tests::service_yaml(
        SERVICE,
        namespace,
        &SERVICE_IP.to_string(),
        &[("http", SERVICE_PORT, HTTP_PORT)],
        &[("app", server_app)],
    );
    // JSON is YAML: one line of it keeps xtask free of a YAML printer.
    format!("{service}---\n{}\n", virtual_service(namespace))
}

/// One route to the Service, with a timeout and retries, that sets [`ROUTE_HEADER`] on
/// the answers.
fn virtual_service(namespace: &str) -> serde_json::Value {
    let (header, value) = ROUTE_HEADER;
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": { "name": SERVICE, "namespace": namespace },
        "spec": {
            "hosts": [SERVICE],
            "http": [{
                "name": "bench",
                "timeout": "10s",
                "retries": { "attempts": 2, "retryOn": "connect-failure,refused-stream,5xx" },
                "headers": { "response": { "set": { header: value } } },
                "route": [{ "destination": { "host": SERVICE } }],
            }],
        },
    })
}

/// The URL `mode`'s client asks: the Service for the mesh, the server pod (at `server`)
/// without it.
pub fn url(mode: Mode, server: Ipv4Addr) -> String {
    let target = match mode {
        Mode::NoMesh => format!("{server}:{HTTP_PORT}"),
        Mode::MeshMtls => format!("{SERVICE_IP}:{SERVICE_PORT}"),
    };
    format!("http://{target}/?size={BODY_BYTES}")
}

/// One request from the mesh namespace's `client` through the Service: fails unless
/// `server` answers it with the header the VirtualService's route sets, that is unless
/// the mesh routes it at L7.
pub fn check_route(cluster: &Cluster, client: &Pod, server: &Pod) -> anyhow::Result<()> {
    let url = url(Mode::MeshMtls, server.ip);
    let args = ["http", "--url", &url];
    let what = format!("mesh-testapp {} (pod {})", args.join(" "), client.name);
    let mut command = client.testapp(cluster);
    command.args(args);
    let output = tools::run_to_end(command, &what, tools::client_timeout(ROUTE_CHECK_SECONDS))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let reply: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("{what}: not one JSON line: {stdout}"))?;
    let (header, value) = ROUTE_HEADER;
    if reply["status"] != 200
        || reply["served_by"] != server.name.as_str()
        || reply["headers"][header] != value
    {
        bail!(
            "{what}: the mesh did not route the request with the VirtualService {SERVICE}: \
             expected status 200 from {} with {header}: {value}, got {reply}; agent logs: {}",
            server.name,
            cluster.logs_dir().display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_are_named_like_the_rows() {
        assert_eq!(
            HttpLoad::FixedRate.to_string(),
            "HTTP/1.1 1 KiB @1000 rps ×16 conns"
        );
        assert_eq!(
            HttpLoad::Saturation.to_string(),
            "HTTP/1.1 1 KiB flat out ×64 conns"
        );
    }

    #[test]
    fn the_service_port_is_http_and_the_route_has_a_timeout_and_retries() {
        let yaml = config_yaml("bench-mesh", "bench-server-node1");
        let (service, vs) = yaml.split_once("---\n").expect("two documents");
        assert!(service.contains("name: http\n"), "{service}");
        assert!(service.contains("targetPort: 8081\n"), "{service}");
        assert!(service.contains("app: bench-server-node1\n"), "{service}");
        let vs: serde_json::Value = serde_json::from_str(vs).expect("one line of JSON");
        assert_eq!(vs["metadata"]["namespace"], "bench-mesh");
        let route = &vs["spec"]["http"][0];
        assert_eq!(route["retries"]["attempts"], 2);
        assert_eq!(route["timeout"], "10s");
        assert_eq!(
            route["headers"]["response"]["set"][ROUTE_HEADER.0],
            ROUTE_HEADER.1
        );
        assert_eq!(route["route"][0]["destination"]["host"], SERVICE);
    }

    #[test]
    fn the_mesh_asks_the_service_and_no_mesh_the_pod() {
        let pod = Ipv4Addr::new(10, 244, 1, 11);
        assert_eq!(url(Mode::MeshMtls, pod), "http://10.96.0.80:80/?size=1024");
        assert_eq!(url(Mode::NoMesh, pod), "http://10.244.1.11:8081/?size=1024");
    }

    #[test]
    fn cost_per_thousand_requests() {
        let sample = HttpSample {
            run: HttpRun {
                answered: 3000,
                seconds: 3.0,
                p50_us: 300.0,
                p90_us: 400.0,
                p99_us: 900.0,
            },
            wall_seconds: 3.0,
            agent_cpu_seconds: vec![0.09, 0.06],
            agent_rss_mib: vec![10.0, 9.0],
        };
        assert!((sample.agent_cores() - 0.05).abs() < 1e-9);
        assert!((sample.agent_cores_per_thousand() - 0.05).abs() < 1e-9);
        assert!((sample.requests_per_agent_cpu_second() - 20_000.0).abs() < 1e-6);
    }
}
