//! `mesh-testapp`: the workload the end-to-end tests run inside pods.
//!
//! `serve` answers every line with a JSON line saying who served it and which addresses
//! it saw, so a test can tell where a connection really went and from where it came
//! (after the mesh redirected it). `connect` is the matching client.
//!
//! `http-serve` is the L7 counterpart: HTTP/1.1, h2c, a gRPC echo service and an upgrade
//! echo on the same ports, with knobs for failures and delays; `http`, `grpc` and `upgrade`
//! are its clients. Those modes run on tokio (hyper); the TCP modes stay blocking.

#[path = "testapp/client.rs"]
mod client;
#[path = "testapp/grpc.rs"]
mod grpc;
#[path = "testapp/http_client.rs"]
mod http_client;
#[path = "testapp/http_server.rs"]
mod http_server;
#[path = "testapp/load.rs"]
mod load;
#[path = "testapp/message.rs"]
mod message;
#[path = "testapp/upgrade.rs"]
mod upgrade;

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

use clap::{Parser, Subcommand};
use socket2::{Domain, Socket, Type};

#[derive(Parser)]
#[command(
    name = "mesh-testapp",
    about = "Echo server and client for Nodemesh tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve TCP: reply to each line with a JSON line; prints "ready" once listening.
    Serve {
        /// Address to listen on, e.g. 0.0.0.0:8080 or [::]:8080 (IPv6 only); repeatable.
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        /// Name reported in every reply ("server").
        #[arg(long)]
        name: String,
    },
    /// Open sequential connections, send one line on each and print the reply line.
    Connect {
        /// Server address.
        #[arg(long)]
        to: SocketAddr,
        /// Number of sequential connections.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Line to send (without the newline).
        #[arg(long, default_value = "hello")]
        message: String,
        /// Timeout for connecting and for each read and write, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Lines to exchange on each connection (a reply printed for each), to hold a
        /// connection open across time.
        #[arg(long, default_value_t = 1)]
        lines: u32,
        /// Pause between two lines of one connection, in milliseconds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// Serve HTTP/1.1 and h2c on the same ports: a JSON description of each request,
    /// query knobs (status, fail+key, delay_ms, size), GET /__stats, a gRPC echo service
    /// and an upgrade echo; prints "ready" once listening.
    HttpServe(http_server::Args),
    /// Send HTTP requests over keep-alive connections; prints a JSON line per response
    /// (or {"error":..}), or one summary with --summary.
    Http(http_client::Args),
    /// Make one gRPC call over h2c; prints each reply message, then {"grpc_status":..}.
    Grpc(grpc::Args),
    /// Open new connections at a steady rate (one line and its reply each) and print one
    /// JSON summary counting every one: {"sent":..,"ok":..,"failed":..,"errors":{..}}.
    Load(load::Args),
    /// Upgrade an HTTP/1.1 connection to nodemesh-echo, send a message and print
    /// {"status":101,"echo":..}.
    Upgrade(upgrade::Args),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve { listen, name } => serve(&listen, &name),
        Command::Connect {
            to,
            count,
            lines,
            interval_ms,
            message,
            timeout_ms,
        } => connect(
            to,
            count,
            &message,
            Exchange {
                lines,
                interval: Duration::from_millis(interval_ms),
                timeout: Duration::from_millis(timeout_ms),
            },
        ),
        // Two workers so that a benchmark measures the mesh, not one busy server thread.
        Command::HttpServe(args) => run_async(Some(2), http_server::serve(args)),
        Command::Http(args) => run_async(None, http_client::run(args)),
        Command::Grpc(args) => run_async(None, grpc::run(args)),
        Command::Load(args) => run_async(None, load::run(args)),
        Command::Upgrade(args) => run_async(None, upgrade::run(args)),
    }
}

/// Runs an async mode on its own runtime: `worker_threads` workers, or the calling thread.
fn run_async(worker_threads: Option<usize>, mode: impl Future<Output = ExitCode>) -> ExitCode {
    let mut builder = match worker_threads {
        Some(workers) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            builder
        }
        None => tokio::runtime::Builder::new_current_thread(),
    };
    match builder.enable_all().build() {
        Ok(runtime) => runtime.block_on(mode),
        Err(e) => {
            eprintln!("mesh-testapp: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

// === serve ===

fn serve(addrs: &[SocketAddr], name: &str) -> ExitCode {
    let mut listeners = Vec::new();
    for addr in addrs {
        match bind(*addr) {
            Ok(listener) => listeners.push(listener),
            Err(e) => {
                eprintln!("mesh-testapp serve: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // Tests wait for this line before connecting.
    println!("ready");
    let _ = io::stdout().flush();
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let name = name.to_owned();
            thread::spawn(move || accept_loop(&listener, &name))
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    ExitCode::FAILURE
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // A restarted server must be able to listen again while old connections linger.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // So that 0.0.0.0:p and [::]:p can both be listened on; an IPv6 listener takes
        // only IPv6 here, whatever net.ipv6.bindv6only says.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn accept_loop(listener: &TcpListener, name: &str) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let name = name.to_owned();
                thread::spawn(move || {
                    if let Err(e) = handle(stream, peer, &name) {
                        eprintln!("mesh-testapp serve: connection from {peer}: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("mesh-testapp serve: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn handle(stream: TcpStream, peer: SocketAddr, name: &str) -> io::Result<()> {
    let local = stream.local_addr()?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            // The client closed its side: close ours.
            let _ = writer.shutdown(Shutdown::Both);
            return Ok(());
        }
        let echo = line.trim_end_matches(['\n', '\r']);
        let reply = serde_json::json!({
            "server": name,
            "peer": peer.to_string(),
            "local": local.to_string(),
            "echo": echo,
        });
        writer.write_all(format!("{reply}\n").as_bytes())?;
    }
}

// === connect ===

/// How one connection talks.
struct Exchange {
    lines: u32,
    interval: Duration,
    timeout: Duration,
}

fn connect(to: SocketAddr, count: u32, message: &str, how: Exchange) -> ExitCode {
    let stdout = io::stdout();
    for n in 0..count {
        let print = |reply: &str| {
            let mut out = stdout.lock();
            let _ = writeln!(out, "{reply}");
            let _ = out.flush();
        };
        match exchange(to, message, &how, print) {
            Ok(()) => {}
            Err((phase, e)) => {
                eprintln!(
                    "mesh-testapp connect: connection {} of {count} to {to}: {phase}: {}: {e}",
                    n + 1,
                    describe(&e)
                );
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

fn exchange(
    to: SocketAddr,
    message: &str,
    how: &Exchange,
    mut on_reply: impl FnMut(&str),
) -> Result<(), (&'static str, io::Error)> {
    let stream = TcpStream::connect_timeout(&to, how.timeout).map_err(|e| ("connect", e))?;
    stream
        .set_read_timeout(Some(how.timeout))
        .and_then(|()| stream.set_write_timeout(Some(how.timeout)))
        .map_err(|e| ("connect", e))?;
    let mut reader = BufReader::new(&stream);
    for line in 0..how.lines {
        if line > 0 {
            std::thread::sleep(how.interval);
        }
        (&stream)
            .write_all(format!("{message}\n").as_bytes())
            .map_err(|e| ("send", e))?;
        let mut reply = String::new();
        let read = reader
            .read_line(&mut reply)
            .map_err(|e| ("read reply", e))?;
        if read == 0 {
            return Err((
                "read reply",
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed by the peer before replying",
                ),
            ));
        }
        on_reply(reply.trim_end_matches(['\n', '\r']));
    }
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// A short, greppable name for the failure, so tests can assert on the kind.
fn describe(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused",
        // A socket read timeout surfaces as EAGAIN.
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out",
        io::ErrorKind::HostUnreachable => "no route to host",
        io::ErrorKind::NetworkUnreachable => "network unreachable",
        io::ErrorKind::ConnectionReset => "connection reset",
        io::ErrorKind::UnexpectedEof => "connection closed",
        _ => "error",
    }
}
