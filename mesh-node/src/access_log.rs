//! Access logs: one JSON object per line on stdout for each proxied connection (when it
//! closes) and each HTTP request (when its response has ended).
//!
//! The lines are written straight to stdout, not through `tracing`, so they stay one JSON
//! object per line whatever `--log-format` the agent's own logs use; a line is written
//! with one call under stdout's lock, so it never interleaves with a log line. A thread of
//! its own writes them from a bounded queue, so a blocked stdout drops lines (counted) and
//! never stalls the proxy. Every line
//! has every field (`null` when the proxy does not know it), so `jq` filters need no
//! guards.
//!
//! How many lines: `--access-log off|full|sampled:<ratio>`. One agent logs for every pod
//! of its node, so `full` writes as many lines as the node serves requests; `sampled`
//! keeps every failure (what people search the logs for) and a share of the rest.
use std::{
    fmt,
    io::Write,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError},
    },
    time::{Duration, SystemTime},
};

use serde::{Serialize, Serializer};
use tokio::time::Instant;

use crate::{
    identity::Identity,
    inventory::{Service, Workload},
    metrics::{ConnectionLabels, Reporter},
};

/// Which connections and requests get a line.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum AccessLogMode {
    /// No access log (the default: see docs/observability.md).
    #[default]
    Off,
    /// A line for every connection and request.
    Full,
    /// A line for every failure and for this share (0–1) of the rest.
    Sampled(f64),
}

impl AccessLogMode {
    /// Whether `entry` gets a line; `roll` is a uniform draw from [0, 1).
    fn keeps(self, entry: &Entry, roll: impl FnOnce() -> f64) -> bool {
        match self {
            AccessLogMode::Off => false,
            AccessLogMode::Full => true,
            AccessLogMode::Sampled(ratio) => entry.is_failure() || roll() < ratio,
        }
    }
}

impl FromStr for AccessLogMode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "off" => Ok(AccessLogMode::Off),
            "full" => Ok(AccessLogMode::Full),
            _ => {
                let ratio = value
                    .strip_prefix("sampled:")
                    .and_then(|ratio| ratio.parse::<f64>().ok())
                    .filter(|ratio| (0.0..=1.0).contains(ratio))
                    .ok_or_else(|| {
                        format!(
                            "{value:?} is not off, full or sampled:<ratio> with a ratio \
                             from 0 to 1 (sampled:0.1 logs every failure and 10% of the rest)"
                        )
                    })?;
                Ok(AccessLogMode::Sampled(ratio))
            }
        }
    }
}

impl fmt::Display for AccessLogMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessLogMode::Off => f.write_str("off"),
            AccessLogMode::Full => f.write_str("full"),
            AccessLogMode::Sampled(ratio) => write!(f, "sampled:{ratio}"),
        }
    }
}

impl Serialize for AccessLogMode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Lines waiting for the writer thread at most: beyond that, new lines are dropped (and
/// counted) rather than stall the proxy.
const QUEUE_LINES: usize = 8192;

/// Where the lines go: stdout, or a buffer in tests. Lines are written by a thread of their
/// own through a bounded queue: a stdout that blocks (a slow log collector, a full pipe)
/// then costs dropped lines, never a stalled proxy worker.
pub struct AccessLog {
    mode: AccessLogMode,
    /// `None` when the mode is `off`: no thread at all.
    queue: Option<SyncSender<Queued>>,
    dropped: AtomicU64,
    /// `nodemesh_access_log_dropped_total`, when the agent exports it.
    dropped_metric: Option<prometheus::IntCounter>,
}

enum Queued {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written ([`AccessLog::sync`]).
    Sync(std::sync::mpsc::Sender<()>),
}

impl AccessLog {
    pub fn stdout(mode: AccessLogMode) -> Self {
        Self::new(mode, Box::new(std::io::stdout()))
    }

    pub fn new(mode: AccessLogMode, sink: Box<dyn Write + Send>) -> Self {
        let queue = (mode != AccessLogMode::Off).then(|| {
            let (queue, lines) = std::sync::mpsc::sync_channel(QUEUE_LINES);
            // Detached: it ends when the log (the queue's only sender) is dropped.
            let spawned = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_lines(&lines, sink));
            if let Err(error) = spawned {
                tracing::warn!(%error, "cannot start the access log writer; no access log");
            }
            queue
        });
        Self {
            mode,
            queue,
            dropped: AtomicU64::new(0),
            dropped_metric: None,
        }
    }

    /// Counts dropped lines in `metric` too.
    pub fn counting_drops_in(mut self, metric: prometheus::IntCounter) -> Self {
        self.dropped_metric = Some(metric);
        self
    }

    /// Whether any line can be written, so callers skip building entries for nothing.
    pub fn is_on(&self) -> bool {
        self.mode != AccessLogMode::Off
    }

    /// Queues `entry` as one line if the mode keeps it. Never blocks.
    pub fn log(&self, entry: &Entry) {
        let Some(queue) = &self.queue else {
            return;
        };
        if !self.mode.keeps(entry, || rand::random_range(0.0..1.0)) {
            return;
        }
        let mut line = match serde_json::to_vec(entry) {
            Ok(line) => line,
            Err(error) => {
                tracing::warn!(%error, "access log entry does not serialize");
                return;
            }
        };
        line.push(b'\n');
        if let Err(TrySendError::Full(_)) = queue.try_send(Queued::Line(line)) {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some(metric) = &self.dropped_metric {
                metric.inc();
            }
            // Said once, then at every power of two: the agent's log must not flood either.
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "access log output is blocked; dropping lines");
            }
        }
    }

    /// Lines dropped because the output could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line queued so far is written (tests, shutdown).
    pub fn sync(&self) {
        let Some(queue) = &self.queue else {
            return;
        };
        let (done, written) = std::sync::mpsc::channel();
        if queue.send(Queued::Sync(done)).is_ok() {
            let _ = written.recv();
        }
    }
}

/// The writer thread: writes lines as they come, flushing whenever the queue runs dry.
fn write_lines(lines: &Receiver<Queued>, mut sink: Box<dyn Write + Send>) {
    let mut next = lines.recv().ok();
    while let Some(queued) = next {
        match queued {
            // A closed stdout is no reason to stop; the agent's own log says why.
            Queued::Line(line) => {
                if let Err(error) = sink.write_all(&line) {
                    tracing::debug!(%error, "writing the access log");
                }
            }
            Queued::Sync(done) => {
                let _ = sink.flush();
                let _ = done.send(());
            }
        }
        next = match lines.try_recv() {
            Ok(queued) => Some(queued),
            Err(_) => {
                let _ = sink.flush();
                lines.recv().ok()
            }
        };
    }
}

/// When something started: the wall clock for the line's `time`, the monotonic clock for
/// its `duration_ms`.
#[derive(Clone, Copy, Debug)]
pub struct Started {
    wall: SystemTime,
    at: Instant,
}

impl Started {
    pub fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            at: Instant::now(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.at.elapsed()
    }

    fn rfc3339(&self) -> String {
        humantime::format_rfc3339_millis(self.wall).to_string()
    }
}

/// The two ends of a connection or request, as the access log names them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Peers {
    pub source_workload: Option<String>,
    pub source_namespace: Option<String>,
    /// The SPIFFE identity the source proved (mutual TLS only).
    pub source_principal: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub destination_workload: Option<String>,
    pub destination_namespace: Option<String>,
    pub destination_principal: Option<String>,
    /// The Service's hostname (`reviews.default.svc.cluster.local`).
    pub service: Option<String>,
}

/// One connection or request's metric labels and access-log peers, built from the same
/// facts at once so the two never disagree.
#[derive(Clone, Debug)]
pub struct Parties {
    pub reporter: Reporter,
    pub labels: ConnectionLabels,
    pub peers: Peers,
}

impl Parties {
    /// As [`ConnectionLabels::new`], plus the source's address.
    pub fn new(
        reporter: Reporter,
        source: Option<&Workload>,
        destination: Option<&Workload>,
        service: Option<&Service>,
        mutual_tls: Option<(&Identity, &Identity)>,
        source_ip: Option<IpAddr>,
    ) -> Self {
        let peers = Peers {
            source_workload: source.map(|w| w.workload_name.clone()),
            source_namespace: source.map(|w| w.key.namespace.clone()),
            source_principal: mutual_tls.map(|(source, _)| source.to_string()),
            source_ip,
            destination_workload: destination.map(|w| w.workload_name.clone()),
            destination_namespace: destination.map(|w| w.key.namespace.clone()),
            destination_principal: mutual_tls.map(|(_, destination)| destination.to_string()),
            service: service.map(Service::hostname),
        };
        Self {
            reporter,
            labels: ConnectionLabels::new(reporter, source, destination, service, mutual_tls),
            peers,
        }
    }
}

/// One relayed L4 connection, as its metrics and access log line see it.
#[derive(Clone, Debug)]
pub struct ConnectionRecord {
    pub parties: Parties,
    pub started: Started,
    pub upstream: SocketAddr,
}

impl ConnectionRecord {
    /// Its line once closed, with the bytes received from the client and sent to it.
    pub fn closed(&self, bytes_received: u64, bytes_sent: u64) -> Entry {
        Entry::connection(
            &self.parties,
            &self.started,
            self.upstream,
            bytes_received,
            bytes_sent,
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An L4 connection, logged when it closes (or fails to open).
    Connection,
    /// One HTTP request, logged when its response has ended.
    Request,
}

/// One access log line. Field names follow what Istio's users search for; bytes are as
/// Envoy counts them: `bytes_received` from the client, `bytes_sent` to it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    /// When the connection or request started (RFC 3339, UTC).
    pub time: String,
    pub kind: Kind,
    /// `outbound` (the client's node proxy) or `inbound` (the server's).
    pub direction: &'static str,
    /// Istio's name for the same: `source` or `destination`.
    pub reporter: &'static str,
    #[serde(flatten)]
    pub peers: Peers,
    /// The VirtualService or HTTPRoute rule that routed the request: its name, else the
    /// resource (`VirtualService default/reviews`).
    pub route: Option<String>,
    /// The endpoint the proxy sent it to (the last one tried).
    pub upstream: Option<SocketAddr>,
    pub method: Option<String>,
    /// Path and query as the client sent them.
    pub path: Option<String>,
    pub authority: Option<String>,
    /// `tcp`, `http` or `grpc`.
    pub protocol: &'static str,
    pub response_code: Option<u16>,
    pub grpc_status: Option<u32>,
    /// Envoy's response flags (`UF`, `UH`, `NR`, `RBAC`, ...), `-` for none.
    pub response_flags: String,
    pub duration_ms: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub trace_id: Option<String>,
    pub request_id: Option<String>,
    /// For a denial, the policy that denied (or why none allowed).
    pub policy: Option<String>,
    /// Why the proxy ended a connection it could not serve.
    pub error: Option<String>,
}

/// What an HTTP request adds to its line.
#[derive(Clone, Debug, Default)]
pub struct RequestFacts {
    pub method: Option<String>,
    pub path: Option<String>,
    pub authority: Option<String>,
    pub route: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub policy: Option<String>,
}

/// Why the proxy refused a connection or could not serve it, as telemetry records it. The
/// proxy describes its own errors this way, so the sinks need not know them.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// Envoy's response flag (`NR`, `UH`, `RBAC`, `UF`...).
    pub response_flags: &'static str,
    /// The policy that refused it, if a policy did.
    pub policy: Option<String>,
    pub error: String,
}

/// How a request ended.
#[derive(Clone, Copy, Debug)]
pub struct RequestEnd<'a> {
    pub protocol: &'static str,
    pub response_code: u16,
    pub grpc_status: Option<u32>,
    pub response_flags: &'a str,
    pub upstream: Option<SocketAddr>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl Entry {
    fn new(parties: &Parties, kind: Kind, started: &Started, protocol: &'static str) -> Self {
        let (reporter, direction) = match parties.reporter {
            Reporter::Source => ("source", "outbound"),
            Reporter::Destination => ("destination", "inbound"),
        };
        Self {
            time: started.rfc3339(),
            kind,
            direction,
            reporter,
            peers: parties.peers.clone(),
            route: None,
            upstream: None,
            method: None,
            path: None,
            authority: None,
            protocol,
            response_code: None,
            grpc_status: None,
            response_flags: "-".into(),
            duration_ms: millis(started.elapsed()),
            bytes_received: 0,
            bytes_sent: 0,
            trace_id: None,
            request_id: None,
            policy: None,
            error: None,
        }
    }

    /// A connection that was relayed until it closed.
    pub fn connection(
        parties: &Parties,
        started: &Started,
        upstream: SocketAddr,
        bytes_received: u64,
        bytes_sent: u64,
    ) -> Self {
        Self {
            upstream: Some(upstream),
            bytes_received,
            bytes_sent,
            ..Self::new(parties, Kind::Connection, started, "tcp")
        }
    }

    /// A connection the proxy refused or could not serve.
    pub fn refused_connection(
        parties: &Parties,
        started: &Started,
        upstream: Option<SocketAddr>,
        refusal: Refusal,
    ) -> Self {
        let Refusal {
            response_flags,
            policy,
            error,
        } = refusal;
        Self {
            upstream,
            response_flags: response_flags.into(),
            policy,
            error: Some(error),
            ..Self::new(parties, Kind::Connection, started, "tcp")
        }
    }

    /// An HTTP request whose response has ended.
    pub fn request(
        parties: &Parties,
        started: &Started,
        facts: RequestFacts,
        end: &RequestEnd<'_>,
    ) -> Self {
        let RequestFacts {
            method,
            path,
            authority,
            route,
            request_id,
            trace_id,
            policy,
        } = facts;
        Self {
            route,
            upstream: end.upstream,
            method,
            path,
            authority,
            response_code: Some(end.response_code),
            grpc_status: end.grpc_status,
            response_flags: end.response_flags.to_string(),
            bytes_received: end.bytes_received,
            bytes_sent: end.bytes_sent,
            trace_id,
            request_id,
            policy,
            ..Self::new(parties, Kind::Request, started, end.protocol)
        }
    }

    /// A failure is what people look for in access logs: an error status, a response flag
    /// (the proxy ended it), a denial or a connection that could not be served.
    pub fn is_failure(&self) -> bool {
        self.response_code.is_some_and(|code| code >= 400)
            || self.response_flags != "-"
            || self.policy.is_some()
            || self.error.is_some()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
