//! The listener holder ("fd store") and the agent's client for it.
//!
//! The agent opens every enrolled pod's listening sockets inside the pod's netns. Were they
//! to close with the agent, each restart (an upgrade, a crash) would have the pods' peers
//! refused until the next agent re-enrolled every pod. The holder bridges that gap: the
//! agent gives it a duplicate of each listener it opens, so the listening socket outlives
//! the agent. While no agent runs, the kernel keeps completing handshakes into the
//! listeners' backlogs (up to each backlog's length; beyond it, SYNs are dropped and the
//! peers retransmit); the next agent takes the listeners back ([`HolderClient::take_all`])
//! and accepts what queued.
//!
//! The holder is a process of its own, not a thread of the agent, because the agent runs in
//! a Kubernetes pod and every process of a pod dies with it, which is the very event to
//! bridge. The holder runs in a pod (or as a host service) that is not rolled with the
//! agent and does next to nothing, so it rarely needs replacing; the two meet on a unix
//! socket in a host directory both mount.
//!
//! A descriptor crosses into another process only through a unix socket's `SCM_RIGHTS`
//! message (`pidfd_getfd` would need ptrace rights over the agent, and a live agent to take
//! from): the kernel installs in the receiver a new descriptor for the same socket. One
//! JSON message per `SOCK_SEQPACKET` packet keeps the framing trivial and ties each
//! descriptor to the message it belongs to.
//!
//! The holder holds references, not sockets: a listener stays open while the agent or the
//! holder has it. When the holder goes away (a crash, an upgrade) a running agent notices
//! nothing; its client sees the new holder's instance id on the next
//! [`HolderClient::resync`] and deposits everything again. Only when the agent and the
//! holder are both gone do the listeners close: queued connections are reset, new ones
//! refused, until the next agent has re-enrolled the pods and opened fresh listeners
//! ([`HolderClient::take_all`] fails or returns nothing, and the agent starts as it would
//! without a holder).
//!
//! Wire protocol, one JSON message per packet, at most one descriptor per packet:
//! * `{"op":"hello"}` → `{"reply":"hello","instance":u64,"held":n,"successors":n}`
//!   (`successors`: agents, connections that deposited or listed listeners, that did so
//!   after the asking one and are still connected: a successor runs beside it)
//! * `{"op":"deposit","key":{..}}` + a listening TCP socket → `ok` | `error`
//! * `{"op":"release","netns_inode":u64}`, `{"op":"retain","keep":[u64,..]}` → `ok` | `error`
//! * `{"op":"list"}` → one `{"reply":"entry","key":{..}}` + descriptor per listener, then
//!   `{"reply":"end"}`
//! * anything malformed → `{"reply":"error","message":".."}`; the connection stays usable.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt, fs,
    io::{self, IoSlice, IoSliceMut},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::{SigSet, Signal},
        signalfd::{SfdFlags, SignalFd},
        socket::{
            AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, Shutdown,
            SockFlag, SockType, SockaddrLike, SockaddrStorage, UnixAddr, accept4, bind, connect,
            getsockname, getsockopt, listen, recvmsg, sendmsg, setsockopt, shutdown, socket,
            sockopt,
        },
        time::TimeVal,
    },
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::{debug, debug_span, info, warn};

/// The largest message either end sends or accepts: a `retain` of some 3,000 netns.
const MAX_MESSAGE: usize = 64 * 1024;

/// Room for as many descriptors as the kernel puts in one message (`SCM_MAX_FD`). The
/// protocol allows one, but a control buffer too small for what a peer sent would leave the
/// descriptors that did fit installed in this process, where nix cannot hand them back.
const MAX_DESCRIPTORS: usize = 253;

/// How long the client waits for the holder to take or answer a message. The holder answers
/// in microseconds; this only bounds how long a stopped or wedged holder can stall the
/// agent's enrollment loop.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Pending connections the holder's socket queues: two agents and a debug tool at most.
const ACCEPT_BACKLOG: i32 = 16;

/// Identifies a held listener: its network namespace (the inode of its nsfs file, as
/// `crate::netns::Netns::inode()` returns) and its local address.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct HeldKey {
    pub netns_inode: u64,
    pub addr: SocketAddr,
}

impl fmt::Display for HeldKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in netns {}", self.addr, self.netns_inode)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    /// A system call on the holder's socket, or on a connection to it, failed.
    #[error("{operation} {socket}: {source}")]
    Io {
        operation: &'static str,
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Replacing the socket of a live holder would orphan it and everything it holds.
    #[error("another holder is serving {0}")]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    #[error("routing SIGTERM and SIGINT to the holder: {0}")]
    Signals(#[source] io::Error),
    /// The holder answered with an error: the connection stays usable.
    #[error("the holder at {socket} refused {request}: {message}")]
    Refused {
        socket: PathBuf,
        request: &'static str,
        message: String,
    },
    #[error(
        "{request} for the holder at {socket} is {size} bytes, over the {MAX_MESSAGE}-byte limit"
    )]
    TooLarge {
        socket: PathBuf,
        request: &'static str,
        size: usize,
    },
    #[error("the holder at {socket} closed the connection during {request}")]
    Closed {
        socket: PathBuf,
        request: &'static str,
    },
    #[error("the holder at {socket} answered {request} with {detail}")]
    UnexpectedReply {
        socket: PathBuf,
        request: &'static str,
        detail: String,
    },
    #[error("the holder at {socket} sent a malformed reply to {request}: {source}")]
    MalformedReply {
        socket: PathBuf,
        request: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding {request}: {source}")]
    Encode {
        request: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl HolderError {
    fn io(operation: &'static str, socket: &Path) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io {
            operation,
            socket: socket.to_path_buf(),
            source,
        }
    }

    /// Whether the connection this came from went away (the holder restarted, most likely),
    /// so that the same request on a new connection may well succeed.
    fn is_broken_connection(&self) -> bool {
        match self {
            Self::Closed { .. } => true,
            Self::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::NotConnected
            ),
            _ => false,
        }
    }

    /// Whether the exchange ended in step (a whole reply read, or nothing sent), so the next
    /// request on the same connection is not answered by this one's leftovers.
    fn leaves_connection_in_step(&self) -> bool {
        matches!(
            self,
            Self::Refused { .. } | Self::TooLarge { .. } | Self::Encode { .. }
        )
    }
}

// === wire protocol ===

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Hello,
    List,
    Deposit { key: HeldKey },
    Release { netns_inode: u64 },
    Retain { keep: Vec<u64> },
}

impl Request {
    fn name(&self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::List => "list",
            Self::Deposit { .. } => "deposit",
            Self::Release { .. } => "release",
            Self::Retain { .. } => "retain",
        }
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
enum Reply {
    Hello {
        instance: u64,
        held: usize,
        /// Absent from holders older than the field: none counted.
        #[serde(default)]
        successors: usize,
    },
    Entry {
        key: HeldKey,
    },
    End,
    Ok,
    Error {
        message: String,
    },
}

/// One packet as received; its bytes are in the caller's buffer.
struct Packet {
    len: usize,
    /// Longer than the buffer, or with more descriptors than fit: the rest was discarded.
    truncated: bool,
    descriptors: Vec<OwnedFd>,
}

/// Takes ownership of a descriptor the kernel has just installed in this process.
#[expect(
    unsafe_code,
    reason = "nix hands out accepted and received descriptors as RawFd"
)]
fn adopt(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` was returned by accept4 or arrived in an SCM_RIGHTS message a moment
    // ago: it is open, and nothing else in this process knows it.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn send_packet(
    connection: BorrowedFd<'_>,
    bytes: &[u8],
    descriptor: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let raw = descriptor.map(|fd| [fd.as_raw_fd()]);
    let rights = raw.as_ref().map(|raw| [ControlMessage::ScmRights(raw)]);
    let control = rights.as_ref().map_or(&[][..], |rights| &rights[..]);
    loop {
        // A seqpacket send is all or nothing; MSG_NOSIGNAL: a vanished peer is an EPIPE,
        // not a SIGPIPE that would kill the process.
        match sendmsg::<UnixAddr>(
            connection.as_raw_fd(),
            &[IoSlice::new(bytes)],
            control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// The next packet, or `None` when the peer has closed the connection.
fn recv_packet(connection: BorrowedFd<'_>, buffer: &mut [u8]) -> io::Result<Option<Packet>> {
    let mut control = nix::cmsg_space!([RawFd; MAX_DESCRIPTORS]);
    loop {
        let mut iov = [IoSliceMut::new(buffer)];
        let message = match recvmsg::<()>(
            connection.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            // Received descriptors must not leak into anything the process executes.
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(message) => message,
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        };
        let mut descriptors = Vec::new();
        // Fails only on MSG_CTRUNC, which MAX_DESCRIPTORS rules out for SCM_RIGHTS.
        if let Ok(control_messages) = message.cmsgs() {
            for control_message in control_messages {
                if let ControlMessageOwned::ScmRights(raw) = control_message {
                    descriptors.extend(raw.into_iter().map(adopt));
                }
            }
        }
        let truncated = message
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        // An empty packet cannot be told from the end of the connection: the protocol has
        // none, so both end it.
        if message.bytes == 0 && descriptors.is_empty() && !truncated {
            return Ok(None);
        }
        return Ok(Some(Packet {
            len: message.bytes,
            truncated,
            descriptors,
        }));
    }
}

/// A blocking seqpacket connection to `path`, with [`CALL_TIMEOUT`] on every send, receive
/// and the connect itself (which waits while the holder's accept queue is full).
fn connect_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let timeout = TimeVal::new(i64::try_from(CALL_TIMEOUT.as_secs()).unwrap_or(i64::MAX), 0);
    setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

// === holder ===

/// Runs the holder on `socket` (creating its parent directory, replacing a stale socket
/// file, mode 0600) until SIGTERM or SIGINT. Blocking.
///
/// It blocks SIGTERM and SIGINT on the calling thread and reads them from a signalfd; call
/// it before the process starts other threads (main, with no async runtime), so that no
/// thread is left where the default action would kill the process before the socket file
/// is removed. The threads it starts inherit the mask.
pub fn run_holder(socket: &Path) -> Result<(), HolderError> {
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGTERM);
    stop_signals.add(Signal::SIGINT);
    stop_signals
        .thread_block()
        .map_err(|errno| HolderError::Signals(errno.into()))?;
    let signals = SignalFd::with_flags(&stop_signals, SfdFlags::SFD_CLOEXEC)
        .map_err(|errno| HolderError::Signals(errno.into()))?;
    HolderServer::bind(socket)?.serve_until(signals.as_fd())?;
    let signal = signals
        .read_signal()
        .ok()
        .flatten()
        .and_then(|info| i32::try_from(info.ssi_signo).ok())
        .and_then(|signo| Signal::try_from(signo).ok());
    info!(signal = ?signal, "holder stopped");
    Ok(())
}

/// A bound holder socket, ready to serve. Binding is separate from serving so that a test
/// can connect as soon as `bind` returns, before the serving thread has run.
struct HolderServer {
    listener: OwnedFd,
    socket: PathBuf,
    /// The socket file's (device, inode): removed at exit only while it is still ours.
    socket_file: (u64, u64),
    shared: Arc<Held>,
}

/// What every connection of one holder instance shares.
struct Held {
    /// Chosen at start: a client that deposited into another instance knows this one has
    /// lost its listeners.
    instance: u64,
    listeners: Mutex<BTreeMap<HeldKey, OwnedFd>>,
    /// The agents using this holder (open connections that deposited or listed
    /// listeners), by the order in which they first did.
    agents: Mutex<BTreeSet<u64>>,
    next_agent: AtomicU64,
}

/// Counts a connection among the agents from its first deposit or list until it ends.
struct AgentMark<'a> {
    held: &'a Held,
    /// Its place in the order of agents, once it is one.
    order: Option<u64>,
}

impl AgentMark<'_> {
    fn mark(&mut self) {
        if self.order.is_none() {
            let order = self.held.next_agent.fetch_add(1, Ordering::SeqCst);
            self.held.agents.lock().insert(order);
            self.order = Some(order);
        }
    }

    /// The agents that came after this connection (all of them, for one that is none).
    fn successors(&self) -> usize {
        let agents = self.held.agents.lock();
        match self.order {
            Some(order) => agents.range(order + 1..).count(),
            None => agents.len(),
        }
    }
}

impl Drop for AgentMark<'_> {
    fn drop(&mut self) {
        if let Some(order) = self.order {
            self.held.agents.lock().remove(&order);
        }
    }
}

impl HolderServer {
    fn bind(socket: &Path) -> Result<Self, HolderError> {
        if let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(HolderError::io("creating the directory of", socket))?;
        }
        match fs::symlink_metadata(socket) {
            Ok(metadata) if !metadata.file_type().is_socket() => {
                return Err(HolderError::NotASocket(socket.to_path_buf()));
            }
            Ok(_) => match connect_seqpacket(socket) {
                Ok(_) => return Err(HolderError::AlreadyRunning(socket.to_path_buf())),
                Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                    debug!(socket = %socket.display(), "replacing a stale holder socket");
                }
                Err(error) => {
                    return Err(HolderError::io("probing the existing socket", socket)(
                        error,
                    ));
                }
            },
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(HolderError::io("inspecting", socket)(error)),
        }

        // Bound under a staging name, restricted to 0600, then renamed over `socket`: no
        // client can connect while the mode is still the umask's, and a stale socket is
        // replaced in one step. (The socket's own address keeps the staging name; clients
        // never see it.)
        let mut staging = socket.as_os_str().to_owned();
        staging.push(format!(".staging-{}", std::process::id()));
        let staging = PathBuf::from(staging);
        match fs::remove_file(&staging) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                return Err(HolderError::io("removing a leftover of", &staging)(error));
            }
            _ => {}
        }
        let listener = socket_listening_at(&staging, socket)?;
        let placed = fs::set_permissions(&staging, fs::Permissions::from_mode(0o600))
            .map_err(HolderError::io("restricting", &staging))
            .and_then(|()| {
                fs::rename(&staging, socket).map_err(HolderError::io("renaming into", socket))
            })
            .and_then(|()| fs::metadata(socket).map_err(HolderError::io("inspecting", socket)));
        let metadata = match placed {
            Ok(metadata) => metadata,
            Err(error) => {
                let _ = fs::remove_file(&staging);
                return Err(error);
            }
        };
        Ok(Self {
            listener,
            socket: socket.to_path_buf(),
            socket_file: (metadata.dev(), metadata.ino()),
            shared: Arc::new(Held {
                instance: rand::random(),
                listeners: Mutex::new(BTreeMap::new()),
                agents: Mutex::default(),
                next_agent: AtomicU64::new(0),
            }),
        })
    }

    /// Serves until `stop` is readable (a signalfd, or in tests one end of a socket pair),
    /// then closes every connection and every held listener and removes the socket file.
    fn serve_until(self, stop: BorrowedFd<'_>) -> Result<(), HolderError> {
        info!(
            socket = %self.socket.display(),
            instance = self.shared.instance,
            "holder listening"
        );
        // Weak: a connection closes as soon as its thread ends; the server only needs to
        // reach the live ones to shut them down at exit.
        let mut connections: Vec<(thread::JoinHandle<()>, Weak<OwnedFd>)> = Vec::new();
        let mut next_connection_id = 0_u64;
        let served = loop {
            let mut ready = [
                PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop, PollFlags::POLLIN),
            ];
            match poll(&mut ready, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(errno) => break Err(HolderError::io("waiting on", &self.socket)(errno.into())),
            }
            if ready[1].revents().is_some_and(|events| !events.is_empty()) {
                break Ok(());
            }
            if !ready[0].any().unwrap_or(false) {
                continue;
            }
            // The listener is non-blocking: a connection gone by now must not stall the
            // loop; the accepted socket is blocking (accept4 does not inherit the flag).
            let connection = match accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(raw) => Arc::new(adopt(raw)),
                Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => continue,
                Err(errno) => {
                    // Out of descriptors, most likely: pause rather than spin on a backlog
                    // that stays readable.
                    warn!(socket = %self.socket.display(), error = %errno, "accepting a holder connection");
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            connections.retain(|(thread, _)| !thread.is_finished());
            next_connection_id += 1;
            let id = next_connection_id;
            let weak = Arc::downgrade(&connection);
            let shared = Arc::clone(&self.shared);
            let spawned = thread::Builder::new()
                .name(format!("holder-conn-{id}"))
                .spawn(move || shared.serve_connection(&connection, id));
            match spawned {
                Ok(thread) => connections.push((thread, weak)),
                Err(error) => warn!(%error, "starting a holder connection thread"),
            }
        };

        // A blocked receive or send returns once its socket is shut down; the join then
        // guarantees no thread still holds a duplicate of a listener.
        for (_, connection) in &connections {
            if let Some(connection) = connection.upgrade() {
                let _ = shutdown(connection.as_raw_fd(), Shutdown::Both);
            }
        }
        for (thread, _) in connections {
            if thread.join().is_err() {
                warn!("a holder connection thread panicked");
            }
        }
        let released = {
            let mut listeners = self.shared.listeners.lock();
            let count = listeners.len();
            listeners.clear();
            count
        };
        self.remove_socket_file();
        info!(socket = %self.socket.display(), released, "holder closed its listeners");
        served
    }

    /// Leaves a socket file that another holder has put in place since.
    fn remove_socket_file(&self) {
        let ours = fs::symlink_metadata(&self.socket)
            .is_ok_and(|metadata| (metadata.dev(), metadata.ino()) == self.socket_file);
        if ours && let Err(error) = fs::remove_file(&self.socket) {
            warn!(socket = %self.socket.display(), %error, "removing the holder socket");
        }
    }
}

fn socket_listening_at(staging: &Path, holder_socket: &Path) -> Result<OwnedFd, HolderError> {
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|errno| HolderError::io("creating a socket for", holder_socket)(errno.into()))?;
    let address = UnixAddr::new(staging)
        .map_err(|errno| HolderError::io("binding", staging)(errno.into()))?;
    bind(listener.as_raw_fd(), &address)
        .map_err(|errno| HolderError::io("binding", staging)(errno.into()))?;
    let listening = Backlog::new(ACCEPT_BACKLOG)
        .and_then(|backlog| listen(&listener, backlog))
        .map_err(|errno| HolderError::io("listening on", staging)(errno.into()));
    if let Err(error) = listening {
        let _ = fs::remove_file(staging);
        return Err(error);
    }
    Ok(listener)
}

impl Held {
    /// One client connection: requests in, replies out, until the client leaves. Nothing a
    /// client sends or fails to read affects the store beyond its own requests.
    fn serve_connection(&self, connection: &OwnedFd, id: u64) {
        let peer_pid = getsockopt(connection, sockopt::PeerCredentials)
            .ok()
            .map(|credentials| credentials.pid());
        let _span = debug_span!("holder_connection", id, peer_pid).entered();
        debug!("client connected");
        let mut buffer = vec![0_u8; MAX_MESSAGE];
        let mut agent = AgentMark {
            held: self,
            order: None,
        };
        loop {
            let packet = match recv_packet(connection.as_fd(), &mut buffer) {
                Ok(Some(packet)) => packet,
                Ok(None) => {
                    debug!("client disconnected");
                    return;
                }
                Err(error) => {
                    debug!(%error, "receiving from a client");
                    return;
                }
            };
            let len = packet.len.min(buffer.len());
            for (reply, descriptor) in self.answer(&buffer[..len], packet, &mut agent) {
                let bytes = match serde_json::to_vec(&reply) {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        warn!(%error, "encoding a holder reply");
                        return;
                    }
                };
                if let Err(error) = send_packet(
                    connection.as_fd(),
                    &bytes,
                    descriptor.as_ref().map(AsFd::as_fd),
                ) {
                    debug!(%error, "sending to a client");
                    return;
                }
            }
        }
    }

    /// The replies to one packet, each with the descriptor it carries.
    fn answer(
        &self,
        bytes: &[u8],
        packet: Packet,
        agent: &mut AgentMark<'_>,
    ) -> Vec<(Reply, Option<OwnedFd>)> {
        let refuse = |message: String| {
            debug!(message, "refused a request");
            vec![(Reply::Error { message }, None)]
        };
        if packet.truncated {
            return refuse(format!(
                "message over {MAX_MESSAGE} bytes or with too many descriptors"
            ));
        }
        let request: Request = match serde_json::from_slice(bytes) {
            Ok(request) => request,
            Err(error) => return refuse(format!("malformed request: {error}")),
        };
        let mut descriptors = packet.descriptors;
        let expected = usize::from(matches!(request, Request::Deposit { .. }));
        if descriptors.len() != expected {
            return refuse(format!(
                "{} carries {expected} descriptor(s), this one {}",
                request.name(),
                descriptors.len()
            ));
        }
        if matches!(request, Request::List | Request::Deposit { .. }) {
            agent.mark();
        }
        match request {
            Request::Hello => {
                let held = self.listeners.lock().len();
                let successors = agent.successors();
                debug!(held, successors, "hello");
                vec![(
                    Reply::Hello {
                        instance: self.instance,
                        held,
                        successors,
                    },
                    None,
                )]
            }
            Request::List => {
                // Duplicated under the lock, sent without it: a client slow to read must
                // not hold up the others.
                let copies: io::Result<Vec<_>> = self
                    .listeners
                    .lock()
                    .iter()
                    .map(|(key, listener)| Ok((*key, listener.try_clone()?)))
                    .collect();
                match copies {
                    Ok(copies) => {
                        debug!(count = copies.len(), "list");
                        copies
                            .into_iter()
                            .map(|(key, listener)| (Reply::Entry { key }, Some(listener)))
                            .chain([(Reply::End, None)])
                            .collect()
                    }
                    Err(error) => refuse(format!("duplicating a listener: {error}")),
                }
            }
            Request::Deposit { key } => {
                let Some(listener) = descriptors.pop() else {
                    return refuse("deposit carries no descriptor".to_owned());
                };
                if let Err(reason) = check_listener(&listener, key.addr) {
                    return refuse(format!("not holding {key}: {reason}"));
                }
                let replaced = self.listeners.lock().insert(key, listener).is_some();
                debug!(%key, replaced, "deposit");
                vec![(Reply::Ok, None)]
            }
            Request::Release { netns_inode } => {
                let released = self.remove_where(|key| key.netns_inode == netns_inode);
                debug!(netns_inode, released, "release");
                vec![(Reply::Ok, None)]
            }
            Request::Retain { keep } => {
                let keep: HashSet<u64> = keep.into_iter().collect();
                let released = self.remove_where(|key| !keep.contains(&key.netns_inode));
                debug!(kept_netns = keep.len(), released, "retain");
                vec![(Reply::Ok, None)]
            }
        }
    }

    /// Closes the held listeners `condition` picks; returns how many.
    fn remove_where(&self, condition: impl Fn(&HeldKey) -> bool) -> usize {
        let mut listeners = self.listeners.lock();
        let before = listeners.len();
        listeners.retain(|key, _| !condition(key));
        before - listeners.len()
    }
}

/// Why `fd` is not a TCP socket listening on `addr`, if it is not. Holding anything else
/// would keep a descriptor alive for nothing, and hand the next agent something it would
/// `accept()` on in vain.
fn check_listener(fd: &OwnedFd, addr: SocketAddr) -> Result<(), String> {
    let socket_type =
        getsockopt(fd, sockopt::SockType).map_err(|errno| format!("not a socket ({errno})"))?;
    if socket_type != SockType::Stream {
        return Err(format!("a {socket_type:?} socket, not a TCP one"));
    }
    let local: SockaddrStorage = getsockname(fd.as_raw_fd())
        .map_err(|errno| format!("reading its local address: {errno}"))?;
    let local = match (local.as_sockaddr_in(), local.as_sockaddr_in6()) {
        (Some(v4), _) => SocketAddr::from(*v4),
        (_, Some(v6)) => SocketAddr::from(*v6),
        _ => return Err(format!("a {:?} socket, not a TCP one", local.family())),
    };
    if !getsockopt(fd, sockopt::AcceptConn)
        .map_err(|errno| format!("reading SO_ACCEPTCONN: {errno}"))?
    {
        return Err("the socket is not listening".to_owned());
    }
    if local != addr {
        return Err(format!("the socket is bound to {local}"));
    }
    Ok(())
}

// === client ===

/// The agent's end. Blocking calls (each a few local syscalls): the agent calls them from
/// its enrollment loop.
///
/// Every request is idempotent (a deposit replaces, a release of nothing is fine), so a
/// call that finds its connection broken sends again once on a new one.
#[derive(Debug)]
pub struct HolderClient {
    socket: PathBuf,
    state: Mutex<ClientState>,
}

#[derive(Debug, Default)]
struct ClientState {
    connection: Option<Connection>,
    /// What this client deposited and has not released, as its own duplicates: what it
    /// deposits again into a holder that restarted.
    deposited: BTreeMap<HeldKey, OwnedFd>,
    /// The holder instance known to hold everything in `deposited`; `None` when none is
    /// (a deposit failed, or a holder changed since), so that `resync` deposits again.
    synced_instance: Option<u64>,
}

/// One connection, to one holder instance: a restarted holder closes it.
#[derive(Debug)]
struct Connection {
    fd: OwnedFd,
    socket: PathBuf,
    instance: u64,
    buffer: Vec<u8>,
}

impl HolderClient {
    /// A client for the holder at `socket`; connects lazily.
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            state: Mutex::new(ClientState::default()),
        }
    }

    /// Every listener the holder keeps, as new descriptors (the holder keeps its own). Err
    /// when the holder cannot be reached.
    ///
    /// They are not added to what [`Self::resync`] deposits again: the agent deposits the
    /// listeners it adopts itself.
    pub fn take_all(&self) -> Result<Vec<(HeldKey, OwnedFd)>, HolderError> {
        let mut state = self.state.lock();
        let listeners = self.exchange(&mut state.connection, Connection::list)?;
        debug!(socket = %self.socket.display(), count = listeners.len(), "took the held listeners");
        Ok(listeners)
    }

    /// Gives the holder a duplicate of `listener` under `key` (replacing what it held under
    /// that key).
    ///
    /// When the holder cannot be reached, the error is returned but the listener is
    /// remembered: the next [`Self::resync`] that reaches a holder deposits it. A listener
    /// the holder refuses (not a listening TCP socket, or not bound to `key.addr`) is not.
    pub fn deposit(&self, key: HeldKey, listener: BorrowedFd<'_>) -> Result<(), HolderError> {
        let copy = listener
            .try_clone_to_owned()
            .map_err(HolderError::io("duplicating a listener for", &self.socket))?;
        let mut guard = self.state.lock();
        let ClientState {
            connection,
            deposited,
            synced_instance,
        } = &mut *guard;
        let deposited_into = self.exchange(connection, |c| {
            c.deposit(key, copy.as_fd()).map(|()| c.instance)
        });
        match deposited_into {
            Ok(instance) => {
                let holder_has_the_rest =
                    deposited.keys().all(|held| *held == key) || *synced_instance == Some(instance);
                *synced_instance = holder_has_the_rest.then_some(instance);
                deposited.insert(key, copy);
                debug!(socket = %self.socket.display(), %key, instance, "deposited a listener");
                Ok(())
            }
            Err(error @ HolderError::Refused { .. }) => Err(error),
            Err(error) => {
                deposited.insert(key, copy);
                *synced_instance = None;
                Err(error)
            }
        }
    }

    /// The holder closes its copies of every listener of that netns (a pod left the mesh).
    ///
    /// This client forgets them even when the holder cannot be reached: a holder that comes
    /// back has lost them anyway, and one that only missed this call keeps them until the
    /// call is retried or a [`Self::retain_netns`] leaves the netns out.
    pub fn release_netns(&self, netns_inode: u64) -> Result<(), HolderError> {
        let mut state = self.state.lock();
        state
            .deposited
            .retain(|key, _| key.netns_inode != netns_inode);
        let request = Request::Release { netns_inode };
        self.exchange(&mut state.connection, |c| c.expect_ok(&request, None))?;
        debug!(socket = %self.socket.display(), netns_inode, "released a netns");
        Ok(())
    }

    /// The holder closes its copies of every listener whose netns is not in `keep` (after
    /// the agent's first reconcile: pods that left while no agent ran). This client forgets
    /// its own the same way, reachable holder or not, as [`Self::release_netns`] does.
    pub fn retain_netns(&self, keep: &[u64]) -> Result<(), HolderError> {
        let mut state = self.state.lock();
        state
            .deposited
            .retain(|key, _| keep.contains(&key.netns_inode));
        let request = Request::Retain {
            keep: keep.to_vec(),
        };
        self.exchange(&mut state.connection, |c| c.expect_ok(&request, None))?;
        debug!(socket = %self.socket.display(), kept_netns = keep.len(), "retained netns");
        Ok(())
    }

    /// Checks the holder is the one this client deposited into; when the holder was
    /// restarted (it lost everything), deposits again everything this client deposited and
    /// did not release. Called every few seconds by the agent. Returns how many listeners
    /// were re-deposited.
    ///
    /// A listener the new holder refuses (the agent has since shut it down) is forgotten.
    pub fn resync(&self) -> Result<usize, HolderError> {
        let mut guard = self.state.lock();
        let ClientState {
            connection,
            deposited,
            synced_instance,
        } = &mut *guard;
        let (instance, held, _) = self.exchange(connection, Connection::hello)?;
        if *synced_instance == Some(instance) {
            return Ok(0);
        }
        let mut redeposited = 0;
        let mut refused = Vec::new();
        for (key, listener) in deposited.iter() {
            // No reconnecting here: the connection has just answered, so a break is a
            // holder gone again, and the next resync starts over with the next one.
            match self.attempt(connection, |c| c.deposit(*key, listener.as_fd())) {
                Ok(()) => redeposited += 1,
                Err(HolderError::Refused { message, .. }) => {
                    warn!(socket = %self.socket.display(), %key, message, "the holder refused a listener again; forgetting it");
                    refused.push(*key);
                }
                Err(error) => return Err(error),
            }
        }
        for key in refused {
            deposited.remove(&key);
        }
        *synced_instance = Some(instance);
        if redeposited > 0 {
            info!(
                socket = %self.socket.display(),
                instance,
                already_held = held,
                redeposited,
                "the holder restarted; deposited the listeners again"
            );
        }
        Ok(redeposited)
    }

    /// How many agents started using the holder after this one (which deposited or took
    /// listeners) and still do: a successor beside it (an overlapping replacement), which
    /// serves what this one stops accepting.
    pub fn successors(&self) -> Result<usize, HolderError> {
        let mut guard = self.state.lock();
        let (_, _, successors) = self.exchange(&mut guard.connection, Connection::hello)?;
        Ok(successors)
    }

    /// Runs `exchange` on the connection; when an existing connection turns out broken,
    /// once more on a new one.
    fn exchange<T>(
        &self,
        connection: &mut Option<Connection>,
        mut exchange: impl FnMut(&mut Connection) -> Result<T, HolderError>,
    ) -> Result<T, HolderError> {
        let reused = connection.is_some();
        match self.attempt(connection, &mut exchange) {
            Err(error) if reused && error.is_broken_connection() => {
                debug!(socket = %self.socket.display(), %error, "holder connection broken; reconnecting");
                self.attempt(connection, exchange)
            }
            result => result,
        }
    }

    /// Runs `exchange` on the connection, connecting first if there is none; drops a
    /// connection the exchange left out of step.
    fn attempt<T>(
        &self,
        connection: &mut Option<Connection>,
        exchange: impl FnOnce(&mut Connection) -> Result<T, HolderError>,
    ) -> Result<T, HolderError> {
        let open = match connection {
            Some(open) => open,
            None => connection.insert(Connection::open(&self.socket)?),
        };
        let result = exchange(open);
        if let Err(error) = &result
            && !error.leaves_connection_in_step()
        {
            *connection = None;
        }
        result
    }
}

impl Connection {
    fn open(socket: &Path) -> Result<Self, HolderError> {
        let fd = connect_seqpacket(socket).map_err(HolderError::io("connecting to", socket))?;
        let mut connection = Self {
            fd,
            socket: socket.to_path_buf(),
            instance: 0,
            buffer: vec![0; MAX_MESSAGE],
        };
        (connection.instance, _, _) = connection.hello()?;
        debug!(socket = %socket.display(), instance = connection.instance, "connected to the holder");
        Ok(connection)
    }

    /// The holder's instance id, how many listeners it holds and how many agents came after
    /// this connection's.
    fn hello(&mut self) -> Result<(u64, usize, usize), HolderError> {
        match self.call(&Request::Hello, None)? {
            Reply::Hello {
                instance,
                held,
                successors,
            } => Ok((instance, held, successors)),
            other => Err(self.unexpected("hello", &other)),
        }
    }

    fn list(&mut self) -> Result<Vec<(HeldKey, OwnedFd)>, HolderError> {
        self.send(&Request::List, None)?;
        let mut listeners = Vec::new();
        loop {
            match self.receive("list")? {
                (Reply::Entry { key }, Some(listener)) => listeners.push((key, listener)),
                (Reply::End, None) => return Ok(listeners),
                (Reply::Error { message }, None) => return Err(self.refused("list", message)),
                (reply, descriptor) => {
                    return Err(HolderError::UnexpectedReply {
                        socket: self.socket.clone(),
                        request: "list",
                        detail: format!(
                            "{reply:?} {} a descriptor",
                            if descriptor.is_some() {
                                "with"
                            } else {
                                "without"
                            }
                        ),
                    });
                }
            }
        }
    }

    fn deposit(&mut self, key: HeldKey, listener: BorrowedFd<'_>) -> Result<(), HolderError> {
        self.expect_ok(&Request::Deposit { key }, Some(listener))
    }

    fn expect_ok(
        &mut self,
        request: &Request,
        descriptor: Option<BorrowedFd<'_>>,
    ) -> Result<(), HolderError> {
        match self.call(request, descriptor)? {
            Reply::Ok => Ok(()),
            other => Err(self.unexpected(request.name(), &other)),
        }
    }

    /// A request with a single reply without a descriptor; an `Error` reply is `Refused`.
    fn call(
        &mut self,
        request: &Request,
        descriptor: Option<BorrowedFd<'_>>,
    ) -> Result<Reply, HolderError> {
        self.send(request, descriptor)?;
        match self.receive(request.name())? {
            (Reply::Error { message }, None) => Err(self.refused(request.name(), message)),
            (reply, None) => Ok(reply),
            (reply, Some(_)) => Err(HolderError::UnexpectedReply {
                socket: self.socket.clone(),
                request: request.name(),
                detail: format!("{reply:?} with a descriptor"),
            }),
        }
    }

    fn send(
        &self,
        request: &Request,
        descriptor: Option<BorrowedFd<'_>>,
    ) -> Result<(), HolderError> {
        let bytes = serde_json::to_vec(request).map_err(|source| HolderError::Encode {
            request: request.name(),
            source,
        })?;
        if bytes.len() > MAX_MESSAGE {
            return Err(HolderError::TooLarge {
                socket: self.socket.clone(),
                request: request.name(),
                size: bytes.len(),
            });
        }
        send_packet(self.fd.as_fd(), &bytes, descriptor)
            .map_err(HolderError::io("sending to", &self.socket))
    }

    fn receive(&mut self, request: &'static str) -> Result<(Reply, Option<OwnedFd>), HolderError> {
        let packet = recv_packet(self.fd.as_fd(), &mut self.buffer)
            .map_err(HolderError::io("receiving from", &self.socket))?
            .ok_or_else(|| HolderError::Closed {
                socket: self.socket.clone(),
                request,
            })?;
        let unexpected = |detail: String| HolderError::UnexpectedReply {
            socket: self.socket.clone(),
            request,
            detail,
        };
        if packet.truncated {
            return Err(unexpected(format!(
                "a message over {MAX_MESSAGE} bytes or with too many descriptors"
            )));
        }
        let mut descriptors = packet.descriptors;
        if descriptors.len() > 1 {
            return Err(unexpected(format!("{} descriptors", descriptors.len())));
        }
        let len = packet.len.min(self.buffer.len());
        let reply = serde_json::from_slice(&self.buffer[..len]).map_err(|source| {
            HolderError::MalformedReply {
                socket: self.socket.clone(),
                request,
                source,
            }
        })?;
        Ok((reply, descriptors.pop()))
    }

    fn refused(&self, request: &'static str, message: String) -> HolderError {
        HolderError::Refused {
            socket: self.socket.clone(),
            request,
            message,
        }
    }

    fn unexpected(&self, request: &'static str, reply: &Reply) -> HolderError {
        HolderError::UnexpectedReply {
            socket: self.socket.clone(),
            request,
            detail: format!("{reply:?}"),
        }
    }
}

#[cfg(test)]
mod tests;
