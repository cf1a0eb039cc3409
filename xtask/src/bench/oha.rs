//! `oha`, the HTTP load generator of the L7 rows: a well-kept Rust tool from crates.io
//! (installed by `cargo xtask setup`) whose JSON report gives latency percentiles and
//! counts of answers and failures, so users can reproduce the figures with it.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context as _, bail};
use mesh_tests::{Cluster, Pod};
use serde_json::Value;

use super::tools::{client_timeout, run_to_end};

/// What oha is asked to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// Requests per second for all connections together (`-q`); `None` sends each next
    /// request as soon as the last one was answered.
    pub rate: Option<u32>,
    /// Keep-alive connections (`-c`).
    pub connections: u32,
}

/// What one oha run measured. Latencies are oha's request durations: from sending a
/// request to the end of its response body, without latency correction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HttpRun {
    /// Responses with status 200.
    pub answered: u64,
    /// oha's whole run, from its first request to its last answer.
    pub seconds: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
}

impl HttpRun {
    pub fn requests_per_second(&self) -> f64 {
        self.answered as f64 / self.seconds
    }
}

/// Runs oha in `client` against `url` for `seconds` (with `extra` arguments, e.g. TLS
/// options), and fails unless every request was answered with 200.
///
/// Keep-alive stays on (no `--disable-keepalive`) and latency correction off (no
/// `--latency-correction`), as PERF.md's shape wants; `-w` lets the requests under way at
/// the deadline finish rather than be cancelled, so that every request oha sent has an
/// answer the proxies counted too.
pub fn run(
    cluster: &Cluster,
    client: &Pod,
    url: &str,
    load: Load,
    seconds: u32,
    extra: &[&str],
) -> anyhow::Result<HttpRun> {
    let program = program()?;
    let mut args = args(url, load, seconds);
    args.splice(
        args.len() - 1..args.len() - 1,
        extra.iter().map(|a| a.to_string()),
    );
    let what = format!("oha {} (pod {})", args.join(" "), client.name);
    let mut command = client.command(cluster, &program);
    command.args(&args);
    let output = run_to_end(command, &what, client_timeout(seconds))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    parse(&stdout).with_context(|| {
        format!(
            "{what}: {}",
            String::from_utf8_lossy(&output.stderr).trim_end()
        )
    })
}

/// Where `cargo xtask setup` put oha.
fn program() -> anyhow::Result<PathBuf> {
    crate::setup::find_program("oha")
        .context("oha (the HTTP load generator) is not installed: run cargo xtask setup")
}

fn args(url: &str, load: Load, seconds: u32) -> Vec<String> {
    let mut args: Vec<String> = [
        "--no-tui",
        "--output-format",
        "json",
        "-w",
        "-z",
        &format!("{seconds}s"),
        "-c",
        &load.connections.to_string(),
    ]
    .map(str::to_owned)
    .into();
    if let Some(rate) = load.rate {
        args.extend(["-q".to_owned(), rate.to_string()]);
    }
    args.push(url.to_owned());
    args
}

/// Reads oha's JSON report (`--output-format json`): `latencyPercentiles` in seconds,
/// `statusCodeDistribution` and `errorDistribution` as counts, `summary.total` the run's
/// seconds.
fn parse(json: &str) -> anyhow::Result<HttpRun> {
    let report: Value = serde_json::from_str(json)
        .with_context(|| format!("oha's report is not JSON: {}", head(json)))?;
    let counts = |field: &str| -> anyhow::Result<BTreeMap<String, u64>> {
        match report.get(field) {
            None => bail!("oha's report has no {field}"),
            Some(value) => serde_json::from_value(value.clone())
                .with_context(|| format!("oha's {field} is not a map of counts: {value}")),
        }
    };
    let statuses = counts("statusCodeDistribution")?;
    let errors = counts("errorDistribution")?;
    let answered = statuses.get("200").copied().unwrap_or(0);
    let failed: u64 = errors.values().sum::<u64>() + statuses.values().sum::<u64>() - answered;
    if failed > 0 || answered == 0 {
        bail!(
            "{failed} requests failed and {answered} were answered with 200: status codes \
             {statuses:?}, errors {errors:?}"
        );
    }
    let number = |pointer: &str| {
        report
            .pointer(pointer)
            .and_then(Value::as_f64)
            .with_context(|| format!("oha's report has no number at {pointer}"))
    };
    let micros =
        |percentile: &str| number(&format!("/latencyPercentiles/{percentile}")).map(|s| s * 1e6);
    let seconds = number("/summary/total")?;
    if seconds <= 0.0 {
        bail!("oha ran for {seconds} s");
    }
    Ok(HttpRun {
        answered,
        seconds,
        p50_us: micros("p50")?,
        p90_us: micros("p90")?,
        p99_us: micros("p99")?,
    })
}

fn head(text: &str) -> String {
    text.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parts of a real `oha --output-format json` report (oha 1.16) the bench reads.
    const REPORT: &str = r#"{
      "summary": {"successRate": 1.0, "total": 3.0012, "slowest": 0.0041, "fastest": 0.0002,
        "average": 0.0004, "requestsPerSec": 999.6, "totalData": 3072000,
        "sizePerRequest": 1024, "sizePerSec": 1023590.4},
      "responseTimeHistogram": {"0.0002": 10},
      "latencyPercentiles": {"p10": 0.00021, "p25": 0.00025, "p50": 0.0003, "p75": 0.00035,
        "p90": 0.0004, "p95": 0.00045, "p99": 0.0009, "p99.9": 0.002, "p99.99": 0.004},
      "statusCodeDistribution": {"200": 3000},
      "errorDistribution": {}
    }"#;

    #[test]
    fn reads_percentiles_and_counts() {
        let run = parse(REPORT).unwrap();
        assert_eq!(run.answered, 3000);
        assert_eq!(run.seconds, 3.0012);
        assert!((run.p50_us - 300.0).abs() < 1e-6, "{run:?}");
        assert!((run.p90_us - 400.0).abs() < 1e-6, "{run:?}");
        assert!((run.p99_us - 900.0).abs() < 1e-6, "{run:?}");
        assert!((run.requests_per_second() - 3000.0 / 3.0012).abs() < 1e-9);
    }

    #[test]
    fn failed_requests_fail_the_run() {
        let errors = REPORT.replace(
            r#""errorDistribution": {}"#,
            r#""errorDistribution": {"connection closed": 2}"#,
        );
        let error = parse(&errors).unwrap_err().to_string();
        assert!(error.contains("2 requests failed"), "{error}");
        let statuses = REPORT.replace(r#"{"200": 3000}"#, r#"{"200": 2999, "503": 1}"#);
        let error = parse(&statuses).unwrap_err().to_string();
        assert!(error.contains("1 requests failed"), "{error}");
        assert!(parse("Error: connection refused").is_err());
    }

    #[test]
    fn fixed_rate_and_saturation_arguments() {
        let fixed = Load {
            rate: Some(1000),
            connections: 16,
        };
        assert_eq!(
            args("http://10.244.1.10:8081/?size=1024", fixed, 3).join(" "),
            "--no-tui --output-format json -w -z 3s -c 16 -q 1000 \
             http://10.244.1.10:8081/?size=1024"
        );
        let flat_out = Load {
            rate: None,
            connections: 64,
        };
        assert!(!args("http://x/", flat_out, 3).contains(&"-q".to_owned()));
    }
}
