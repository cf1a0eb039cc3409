//! Sockets opened inside pods' network namespaces.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    time::Duration,
};

use mesh_common::{marks, ports};
use nix::sys::socket::sockopt;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::{CONNECT_TIMEOUT, PodContext, ProxyError};
use crate::netns::{Netns, NetnsError};

/// Connections made while no agent runs wait here for the next one (the holder keeps the
/// sockets open): at 1,000 new connections a second that is four seconds of gap. The
/// kernel caps it at the pod's `net.core.somaxconn` (4096 by default).
const BACKLOG: i32 = 4096;

/// Listening sockets an earlier agent opened in one pod (kept by the holder), by address:
/// the pod's listeners are taken from here rather than bound again, so connections waiting
/// in their backlogs are served.
pub type Inherited = BTreeMap<SocketAddr, OwnedFd>;

/// The listeners of one enrolled pod, opened inside its netns.
pub struct ListenerSet {
    /// 127.0.0.1:15001 and, where the pod has IPv6, [::1]:15001.
    pub outbound: Vec<TcpListener>,
    /// 0.0.0.0:15006 and [::]:15006 (v6-only), each paired with the pod addresses of its
    /// family that `sk_lookup` steers to it.
    pub inbound: Vec<(TcpListener, Vec<IpAddr>)>,
    /// 0.0.0.0:15008 and [::]:15008 (v6-only) for HBONE, when mTLS is on.
    pub hbone: Vec<TcpListener>,
    /// The netns cookie, read from one of the sockets (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
}

/// Opens the pod's listeners (HBONE's too when `hbone`), taking those it finds in
/// `inherited`. Must run inside a tokio runtime.
pub fn bind_pod_listeners(
    netns: &Netns,
    home: &Netns,
    pod_ips: &[IpAddr],
    hbone: bool,
    inherited: Inherited,
) -> Result<ListenerSet, NetnsError> {
    let has_v6 = pod_ips.iter().any(IpAddr::is_ipv6);
    let mut inherited = inherited;
    let mut listen = |addr| listen_or_adopt(addr, &mut inherited);
    let bound = netns.run(home, || bind_sockets(has_v6, hbone, &mut listen))?;
    let bound = bound.map_err(|source| NetnsError::Io {
        action: "binding listeners in",
        path: netns.path().to_path_buf(),
        source,
    })?;
    let to_tokio = |socket: Socket| TcpListener::from_std(socket.into());
    let io_error = |source| NetnsError::Io {
        action: "registering listeners of",
        path: netns.path().to_path_buf(),
        source,
    };
    Ok(ListenerSet {
        outbound: bound
            .outbound
            .into_iter()
            .map(to_tokio)
            .collect::<Result<_, _>>()
            .map_err(io_error)?,
        inbound: bound
            .inbound
            .into_iter()
            .map(|socket| {
                let v6 = socket
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .is_some_and(|a| a.is_ipv6());
                let ips = pod_ips
                    .iter()
                    .copied()
                    .filter(|ip| ip.is_ipv6() == v6)
                    .collect();
                to_tokio(socket).map(|listener| (listener, ips))
            })
            .collect::<Result<_, _>>()
            .map_err(io_error)?,
        hbone: bound
            .hbone
            .into_iter()
            .map(to_tokio)
            .collect::<Result<_, _>>()
            .map_err(io_error)?,
        netns_cookie: bound.netns_cookie,
    })
}

/// A pod's listening sockets, bound in its netns and not yet registered with tokio (which
/// happens back in the agent's thread).
struct BoundSockets {
    outbound: Vec<Socket>,
    inbound: Vec<Socket>,
    hbone: Vec<Socket>,
    netns_cookie: u64,
}

/// Binds the pod's listeners in the current netns with `open`: IPv6 ones too when
/// `has_v6`, HBONE's when `hbone`.
fn bind_sockets(
    has_v6: bool,
    hbone: bool,
    open: &mut dyn FnMut(SocketAddr) -> std::io::Result<Socket>,
) -> std::io::Result<BoundSockets> {
    let mut outbound = vec![open(SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        ports::OUTBOUND,
    )))?];
    let mut inbound = vec![open(SocketAddr::from((
        Ipv4Addr::UNSPECIFIED,
        ports::INBOUND_PLAINTEXT,
    )))?];
    if has_v6 {
        outbound.push(open(SocketAddr::from((
            Ipv6Addr::LOCALHOST,
            ports::OUTBOUND,
        )))?);
        inbound.push(open(SocketAddr::from((
            Ipv6Addr::UNSPECIFIED,
            ports::INBOUND_PLAINTEXT,
        )))?);
    }
    let unspecified: &[IpAddr] = if has_v6 {
        &[
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ]
    } else {
        &[IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
    };
    let hbone = if hbone {
        unspecified
            .iter()
            .map(|ip| open(SocketAddr::new(*ip, ports::HBONE)))
            .collect::<std::io::Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let netns_cookie = crate::netns::netns_cookie(&outbound[0])?;
    Ok(BoundSockets {
        outbound,
        inbound,
        hbone,
        netns_cookie,
    })
}

/// The inherited listener on `addr`, else a new one.
fn listen_or_adopt(addr: SocketAddr, inherited: &mut Inherited) -> std::io::Result<Socket> {
    match inherited.remove(&addr) {
        Some(fd) => {
            let socket = Socket::from(fd);
            socket.set_nonblocking(true)?;
            Ok(socket)
        }
        None => listen(addr),
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

/// How an upstream socket identifies itself to the kernel.
pub enum Dial {
    /// The proxy's outbound leg: the connect hooks let this mark through.
    Outbound,
    /// The inbound leg to the app, posing as the original client.
    Transparent { source: IpAddr },
}

/// Connects to `addr` from a socket created inside `pod`'s netns.
pub async fn connect_from_pod(
    pod: &PodContext,
    home: &Netns,
    addr: SocketAddr,
    dial: Dial,
) -> Result<TcpStream, ProxyError> {
    let socket = pod
        .netns
        .run(home, || new_upstream_socket(addr, &dial))
        .map_err(|e| ProxyError::Socket(e.into()))?
        .map_err(|e| ProxyError::Socket(e.into()))?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
        Err(_) => Err(ProxyError::ConnectTimeout(addr)),
    }
}

fn new_upstream_socket(addr: SocketAddr, dial: &Dial) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    match dial {
        Dial::Outbound => {
            socket.set_mark(marks::PROXY_OUTBOUND)?;
            // A peer that vanishes without a reset (its node went away) is found out within
            // about a minute instead of holding the connection, or a pooled tunnel, forever.
            socket.set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(30))
                    .with_interval(Duration::from_secs(10))
                    .with_retries(3),
            )?;
        }
        Dial::Transparent { source } => {
            socket.set_mark(marks::INBOUND_TRANSPARENT)?;
            if source.is_ipv6() {
                socket.set_ip_transparent_v6(true)?;
            } else {
                socket.set_ip_transparent_v4(true)?;
            }
            // The port is chosen at connect, by the whole 4-tuple, not here: a bind to port
            // 0 must find a port free for every destination, so each client IP had one
            // range of ports in all (TIME_WAIT included), and as the range filled with
            // earlier connections that search ran for seconds in the kernel, stalling the
            // worker thread it ran on.
            nix::sys::socket::setsockopt(&socket, sockopt::IpBindAddressNoPort, &true)?;
            socket.bind(&SockAddr::from(SocketAddr::new(*source, 0)))?;
            // The dial goes through `lo` anyway (the mark's route, `install_inbound_routing`);
            // bound to it, the kernel may reuse this leg's TIME_WAIT 4-tuples after a second
            // (`tcp_tw_reuse`'s default is "loopback only"). This socket is the one that
            // closes first when the client does, so it, not the client, ends in TIME_WAIT:
            // without reuse, ~14,000 connections from one client to one port within a minute
            // made every connect walk all of them in the kernel (perf: __inet_hash_connect,
            // __inet_check_established), milliseconds of system time each.
            socket.bind_device(Some(b"lo"))?;
        }
    }
    Ok(socket)
}
