//! `mesh-testapp http`: N requests over C keep-alive connections, reported one JSON line
//! per response or as one summary (status and backend counts, latency percentiles).

use std::{collections::BTreeMap, process::ExitCode, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::json;
use tokio::task::JoinSet;

use crate::{
    client::{ClientError, Connection, Protocol, Target, within},
    message::{self, headers_json},
};

/// How much of a response body a JSON line carries, in characters.
const BODY_PREVIEW_CHARS: usize = 2000;

/// `mesh-testapp http`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// Request method.
    #[arg(long, default_value = "GET")]
    method: Method,
    /// A request header, 'name: value'; repeatable.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Number of requests in all.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Keep-alive connections the requests are split over; each sends one at a time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// Speak h2c (HTTP/2 with prior knowledge) instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// Request body.
    #[arg(long)]
    body: Option<String>,
    /// Print one summary object instead of a line per response.
    #[arg(long)]
    summary: bool,
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: expected 'name: value'"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| format!("{text:?}: header name: {e}"))?;
    let value =
        HeaderValue::from_str(value.trim()).map_err(|e| format!("{text:?}: header value: {e}"))?;
    Ok((name, value))
}

/// Sends the requests; failures are reported, not fatal: the test judges them.
pub async fn run(args: Args) -> ExitCode {
    let args = Arc::new(args);
    let mut connections = JoinSet::new();
    for index in 0..args.concurrency {
        let share =
            args.count / args.concurrency + u64::from(index < args.count % args.concurrency);
        connections.spawn(send_on_one_connection(Arc::clone(&args), share));
    }
    let outcomes: Vec<Outcome> = connections.join_all().await.into_iter().flatten().collect();
    if args.summary {
        println!(
            "{}",
            serde_json::to_string(&Summary::of(&outcomes)).expect("summary serializes")
        );
    }
    ExitCode::SUCCESS
}

/// Sends `count` requests one after the other on one keep-alive connection, reconnecting
/// when the server closed it or an exchange failed. Prints each response unless a summary
/// is wanted, in which case it returns the outcomes.
async fn send_on_one_connection(args: Arc<Args>, count: u64) -> Vec<Outcome> {
    let mut connection = None;
    let mut outcomes = Vec::new();
    for _ in 0..count {
        let started = Instant::now();
        let result = within(args.target.timeout(), exchange(&args, &mut connection)).await;
        // Microseconds are plenty, and keep the JSON short.
        let elapsed_ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        if result.is_err() {
            // A failed or timed out exchange leaves the connection in no known state.
            connection = None;
        }
        if !args.summary {
            println!("{}", line(&result, elapsed_ms));
        }
        outcomes.push(match result {
            Ok(reply) => Outcome::Reply {
                status: reply.status,
                served_by: reply.served_by(),
                elapsed_ms,
            },
            Err(_) => Outcome::Error,
        });
    }
    outcomes
}

/// A response read in full.
struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn served_by(&self) -> Option<String> {
        let served_by = self.headers.get("x-served-by")?;
        Some(String::from_utf8_lossy(served_by.as_bytes()).into_owned())
    }
}

async fn exchange(args: &Args, connection: &mut Option<Connection>) -> Result<Reply, ClientError> {
    let protocol = if args.http2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let connection = match connection.take() {
        Some(open) if !open.is_closed() => connection.insert(open),
        _ => connection.insert(args.target.connect(protocol).await?),
    };
    let mut request = args
        .target
        .request(
            protocol,
            args.method.clone(),
            args.target.url.path_and_query.as_str(),
        )
        .body(message::full(args.body.clone().unwrap_or_default()))
        .expect("a request from valid parts");
    // A --header replaces a default of the same name (e.g. host); repeated ones all go.
    for (name, _) in &args.headers {
        request.headers_mut().remove(name);
    }
    for (name, value) in &args.headers {
        request.headers_mut().append(name, value.clone());
    }
    let response = connection.send(request).await?;
    let (head, body) = response.into_parts();
    Ok(Reply {
        status: head.status,
        headers: head.headers,
        body: body.collect().await?.to_bytes(),
    })
}

/// The JSON line for one exchange.
fn line(result: &Result<Reply, ClientError>, elapsed_ms: f64) -> serde_json::Value {
    match result {
        Ok(reply) => {
            let body: String = String::from_utf8_lossy(&reply.body)
                .chars()
                .take(BODY_PREVIEW_CHARS)
                .collect();
            json!({
                "status": reply.status.as_u16(),
                "served_by": reply.served_by(),
                "elapsed_ms": elapsed_ms,
                "body": body,
                "headers": headers_json(&reply.headers),
            })
        }
        Err(e) => json!({ "error": e.to_string() }),
    }
}

// === summary ===

/// What the summary keeps of one exchange.
enum Outcome {
    Reply {
        status: StatusCode,
        served_by: Option<String>,
        elapsed_ms: f64,
    },
    Error,
}

/// Latencies are of the replies only; errors (timeouts included) are counted apart.
#[derive(Debug, Default, PartialEq, Serialize)]
struct Summary {
    sent: u64,
    status: BTreeMap<String, u64>,
    /// Replies without x-served-by are not counted here.
    served_by: BTreeMap<String, u64>,
    errors: u64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
}

impl Summary {
    fn of(outcomes: &[Outcome]) -> Self {
        let mut summary = Self {
            sent: outcomes.len() as u64,
            ..Self::default()
        };
        let mut latencies = Vec::new();
        for outcome in outcomes {
            match outcome {
                Outcome::Reply {
                    status,
                    served_by,
                    elapsed_ms,
                } => {
                    *summary
                        .status
                        .entry(status.as_str().to_owned())
                        .or_default() += 1;
                    if let Some(served_by) = served_by {
                        *summary.served_by.entry(served_by.clone()).or_default() += 1;
                    }
                    latencies.push(*elapsed_ms);
                }
                Outcome::Error => summary.errors += 1,
            }
        }
        latencies.sort_by(f64::total_cmp);
        summary.p50_ms = percentile(&latencies, 50.0);
        summary.p99_ms = percentile(&latencies, 99.0);
        summary.max_ms = latencies.last().copied();
        summary
    }
}

/// The nearest-rank percentile of `sorted`: the smallest value with at least `p` percent
/// of the values at or below it.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 50.0), Some(50.0));
        assert_eq!(percentile(&hundred, 99.0), Some(99.0));
        assert_eq!(percentile(&hundred, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_counts_statuses_backends_and_errors() {
        let reply = |status: u16, served_by: Option<&str>, elapsed_ms| Outcome::Reply {
            status: StatusCode::from_u16(status).unwrap(),
            served_by: served_by.map(str::to_owned),
            elapsed_ms,
        };
        let outcomes = [
            reply(200, Some("v1"), 3.0),
            reply(200, Some("v2"), 1.0),
            reply(503, None, 2.0),
            Outcome::Error,
        ];
        let summary = serde_json::to_value(Summary::of(&outcomes)).unwrap();
        assert_eq!(
            summary,
            json!({
                "sent": 4,
                "status": { "200": 2, "503": 1 },
                "served_by": { "v1": 1, "v2": 1 },
                "errors": 1,
                "p50_ms": 2.0,
                "p99_ms": 3.0,
                "max_ms": 3.0,
            })
        );
        let empty = serde_json::to_value(Summary::of(&[Outcome::Error])).unwrap();
        assert_eq!(empty["p50_ms"], serde_json::Value::Null);
    }

    #[test]
    fn header_arguments() {
        let (name, value) = parse_header("X-Canary:  yes ").unwrap();
        assert_eq!(
            (name.as_str(), value.to_str().unwrap()),
            ("x-canary", "yes")
        );
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: v").is_err());
    }
}
