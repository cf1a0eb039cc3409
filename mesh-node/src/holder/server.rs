//! The holder itself: keeps the listeners agents deposit and hands them back.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs,
    io::{self},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
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
            AddressFamily, Backlog, Shutdown, SockFlag, SockType, SockaddrLike, SockaddrStorage,
            UnixAddr, accept4, bind, getsockname, getsockopt, listen, shutdown, socket, sockopt,
        },
    },
};
use parking_lot::Mutex;
use tracing::{debug, debug_span, info, warn};

use super::{HeldKey, HolderError, wire::*};

/// Pending connections the holder's socket queues: two agents and a debug tool at most.
const ACCEPT_BACKLOG: i32 = 16;

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
pub(super) struct HolderServer {
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
    pub(super) fn bind(socket: &Path) -> Result<Self, HolderError> {
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
    pub(super) fn serve_until(self, stop: BorrowedFd<'_>) -> Result<(), HolderError> {
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
