//! A real Prometheus server (Debian's `prometheus` package, installed by `cargo xtask
//! setup`) scraping the agents of a test cluster, and its HTTP query API.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{AGENT_METRICS_PORT, Cluster, http, netns, process};

/// Where Debian's `prometheus` package puts the server.
pub const PROMETHEUS_BINARY: &str = "/usr/bin/prometheus";
/// Where the server listens, inside the netns it runs in.
const LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
/// Start-up includes replaying an (empty) write-ahead log and loading the web assets.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// One sample of a PromQL instant vector: its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct PromSample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A running Prometheus server; stopped (SIGTERM, then SIGKILL, by its PID) on drop.
pub struct Prometheus {
    child: Child,
    netns: String,
    log_path: PathBuf,
}

impl Prometheus {
    /// Why no Prometheus can run here, if none can.
    pub fn skip_reason() -> Option<String> {
        (!Path::new(PROMETHEUS_BINARY).is_file()).then(|| {
            format!("{PROMETHEUS_BINARY} not found (Debian package `prometheus`; cargo xtask setup installs it)")
        })
    }

    /// Starts Prometheus inside node `node`'s netns, scraping every agent of `cluster` on
    /// its node address every `interval` (each target labelled `node="node<i>"`), with its
    /// config, data and log under `<work dir>/prometheus/`; waits until it is ready.
    ///
    /// # Panics
    /// When it cannot start or is not ready within a minute (with the tail of its log).
    pub fn start(cluster: &Cluster, node: usize, interval: Duration) -> Prometheus {
        let dir = cluster.work_dir().join("prometheus");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let config_path = dir.join("prometheus.yml");
        let targets: Vec<(String, SocketAddr)> = (0..cluster.nodes())
            .map(|i| {
                let addr = SocketAddr::from((cluster.node_ip(i), AGENT_METRICS_PORT));
                (cluster.node_name(i), addr)
            })
            .collect();
        fs::write(&config_path, scrape_config(interval, &targets))
            .unwrap_or_else(|e| panic!("{}: {e}", config_path.display()));
        let log_path = dir.join("prometheus.log");
        let log =
            fs::File::create(&log_path).unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
        let netns_name = cluster.node_netns(node).to_owned();
        let ns = netns::open_netns(&netns_name).unwrap_or_else(|e| panic!("{e}"));
        let mut command = Command::new(PROMETHEUS_BINARY);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        // Outside the node cgroups: Prometheus is the observer, not a workload.
        process::place(&mut command, ns, None);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {PROMETHEUS_BINARY}: {e}"));
        let mut prometheus = Prometheus {
            child,
            netns: netns_name,
            log_path,
        };
        prometheus.wait_ready();
        prometheus
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "prometheus exited ({status}) before it was ready; log tail:\n{}",
                    process::tail(&self.log_path, 30)
                );
            }
            let last = match self.get("/-/ready") {
                Ok((200, _)) => return,
                Ok((status, body)) => format!("{status} {}", body.trim()),
                Err(error) => error,
            };
            assert!(
                Instant::now() < deadline,
                "prometheus was not ready within {READY_TIMEOUT:?} (last answer: {last}); \
                 log tail:\n{}",
                process::tail(&self.log_path, 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Evaluates `promql` now (`/api/v1/query`); its instant vector (a scalar reads as one
    /// sample without labels).
    pub fn query(&self, promql: &str) -> Result<Vec<PromSample>, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = self.get(&path)?;
        parse_query_response(&body).map_err(|error| format!("{promql}: HTTP {status}: {error}"))
    }

    /// Polls `promql` until `check` accepts its answer, which it returns; panics after
    /// `timeout` with the last answer (or error) and what was awaited.
    pub fn wait_for<T>(
        &self,
        promql: &str,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&[PromSample]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.query(promql) {
                Ok(samples) => match check(&samples) {
                    Some(value) => return value,
                    None => format!("{samples:?}"),
                },
                Err(error) => error,
            };
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what} from `{promql}`; last answer: \
                 {last}; prometheus log: {}",
                self.log_path.display()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Polls `promql` until it answers exactly one sample equal to `expected`.
    pub fn wait_for_value(&self, promql: &str, expected: f64, timeout: Duration) {
        self.wait_for(
            promql,
            timeout,
            &format!("the value {expected}"),
            |samples| matches!(samples, [only] if only.value == expected).then_some(()),
        );
    }

    fn get(&self, path: &str) -> Result<(u16, String), String> {
        netns::run_in_netns(&self.netns, || http::http_get(LISTEN, path))
            .map_err(|error| format!("GET {LISTEN}{path}: {error}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Err(error) = process::terminate(&mut self.child, STOP_GRACE) {
            eprintln!(
                "mesh-tests: stopping prometheus (pid {}): {error}",
                self.child.id()
            );
        }
    }
}

/// The scrape config: every `(node name, address)` target is one job, labelled with its
/// node, scraped every `interval`.
fn scrape_config(interval: Duration, targets: &[(String, SocketAddr)]) -> String {
    let seconds = interval.as_secs_f64();
    let mut yaml = format!(
        "global:\n  scrape_interval: {seconds}s\n  scrape_timeout: {seconds}s\n  \
         evaluation_interval: {seconds}s\nscrape_configs:\n  - job_name: nodemesh\n    \
         static_configs:\n"
    );
    for (node, addr) in targets {
        let _ = writeln!(
            yaml,
            "      - targets: ['{addr}']\n        labels:\n          node: {node}"
        );
    }
    yaml
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for a query string.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// The samples of an `/api/v1/query` answer, or Prometheus' error.
fn parse_query_response(body: &str) -> Result<Vec<PromSample>, String> {
    let answer: Value = serde_json::from_str(body).map_err(|e| format!("{e} in {body:?}"))?;
    if answer["status"] != "success" {
        return Err(format!(
            "{}: {}",
            answer["errorType"].as_str().unwrap_or("error"),
            answer["error"].as_str().unwrap_or(body)
        ));
    }
    let value_of = |pair: &Value| -> Result<f64, String> {
        pair[1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no [time, \"value\"] pair in {pair}"))
    };
    let data = &answer["data"];
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .ok_or_else(|| format!("no result array in {body}"))?
            .iter()
            .map(|sample| {
                let labels = sample["metric"]
                    .as_object()
                    .map(|labels| {
                        labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(PromSample {
                    labels,
                    value: value_of(&sample["value"])?,
                })
            })
            .collect(),
        Some("scalar") => Ok(vec![PromSample {
            labels: BTreeMap::new(),
            value: value_of(&data["result"])?,
        }]),
        other => Err(format!("unexpected result type {other:?} in {body}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promql_is_percent_encoded() {
        assert_eq!(
            percent_encode(r#"sum(up{job="x"}) > 1"#),
            "sum%28up%7Bjob%3D%22x%22%7D%29%20%3E%201"
        );
    }

    #[test]
    fn config_scrapes_every_node_with_its_name() {
        let yaml = scrape_config(
            Duration::from_secs(1),
            &[("node0".into(), "10.99.0.10:15020".parse().unwrap())],
        );
        assert!(yaml.contains("scrape_interval: 1s"), "{yaml}");
        assert!(
            yaml.contains(
                "- targets: ['10.99.0.10:15020']\n        labels:\n          node: node0"
            ),
            "{yaml}"
        );
    }

    #[test]
    fn vectors_scalars_and_errors_are_read() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"node":"node0"},"value":[1700000000.5,"37"]}]}}"#;
        let samples = parse_query_response(vector).unwrap();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].value, 37.0);
        assert_eq!(samples[0].labels["node"], "node0");
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_query_response(empty).unwrap(), vec![]);
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"2"]}}"#;
        assert_eq!(parse_query_response(scalar).unwrap()[0].value, 2.0);
        let error = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert_eq!(
            parse_query_response(error).unwrap_err(),
            "bad_data: parse error"
        );
    }
}
