//! `load`: new connections at a steady rate, one line and its reply on each, every one
//! counted: what a test needs to say that a restart failed no connection.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::ExitCode,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    time::{MissedTickBehavior, timeout},
};

#[derive(clap::Args)]
pub struct Args {
    /// Server address.
    #[arg(long)]
    to: SocketAddr,
    /// New connections per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// How long to keep opening connections, in milliseconds.
    #[arg(long)]
    duration_ms: u64,
    /// The client's patience, in milliseconds: for the connect, and then for the reply.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    /// Failures by what went wrong.
    errors: BTreeMap<String, u64>,
    /// Answers by the server that gave them.
    servers: BTreeMap<String, u64>,
    slowest: Duration,
    /// When the slowest connection started, from the load's start.
    slowest_started: Duration,
    /// Connections that took longer than [`SLOW`].
    slow: u64,
}

/// What counts as a slow connection in the summary: far beyond a round trip through two
/// proxies, well below a TCP retransmission.
const SLOW: Duration = Duration::from_millis(100);

/// Prints `started`, runs, then prints one JSON summary:
/// `{"sent":..,"ok":..,"failed":..,"errors":{..},"servers":{..},"slowest_ms":..,
/// "slowest_started_ms":..,"slow":..}` (`slow`: connections over 100 ms).
pub async fn run(args: Args) -> ExitCode {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let patience = Duration::from_millis(args.timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.rate.max(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let load_started = Instant::now();
    let end = load_started + Duration::from_millis(args.duration_ms);
    let mut connections = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    println!("started");
    while Instant::now() < end {
        tick.tick().await;
        sent += 1;
        let tally = tally.clone();
        connections.spawn(async move {
            let started = Instant::now();
            let outcome = exchange(args.to, patience).await;
            let took = started.elapsed();
            let mut tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
            if took > tally.slowest {
                tally.slowest = took;
                tally.slowest_started = started - load_started;
            }
            tally.slow += u64::from(took > SLOW);
            match outcome {
                Ok(server) => {
                    tally.ok += 1;
                    *tally.servers.entry(server).or_default() += 1;
                }
                Err(error) => {
                    tally.failed += 1;
                    *tally.errors.entry(error).or_default() += 1;
                }
            }
        });
        // Reap finished ones as we go: the set stays as large as what is in flight.
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
    let tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
    let summary = serde_json::json!({
        "sent": sent,
        "ok": tally.ok,
        "failed": tally.failed,
        "errors": tally.errors,
        "servers": tally.servers,
        "slowest_ms": tally.slowest.as_millis() as u64,
        "slowest_started_ms": tally.slowest_started.as_millis() as u64,
        "slow": tally.slow,
    });
    println!("{summary}");
    if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One connection: connect, send a line, read the reply; the server's name, or what
/// failed.
async fn exchange(to: SocketAddr, patience: Duration) -> Result<String, String> {
    let mut stream = match timeout(patience, TcpStream::connect(to)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(format!("connect: {:?}", error.kind())),
        Err(_) => return Err("connect: timed out".into()),
    };
    let exchanged = timeout(patience, async {
        stream.write_all(b"hello\n").await?;
        let mut line = String::new();
        BufReader::new(&mut stream).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line)
    })
    .await;
    let line = match exchanged {
        Ok(Ok(line)) if !line.is_empty() => line,
        Ok(Ok(_)) => return Err("reply: closed without one".into()),
        Ok(Err(error)) => return Err(format!("reply: {:?}", error.kind())),
        Err(_) => return Err("reply: timed out".into()),
    };
    let reply: serde_json::Value =
        serde_json::from_str(&line).map_err(|_| format!("reply: not JSON: {}", line.trim()))?;
    Ok(reply["server"].as_str().unwrap_or("?").to_owned())
}
