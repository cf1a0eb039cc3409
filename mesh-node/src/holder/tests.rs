use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::{
            fs::PermissionsExt,
            net::{UnixListener, UnixStream},
        },
    },
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use nix::{
    fcntl::{FcntlArg, FdFlag, fcntl},
    sys::{
        pthread::{pthread_kill, pthread_self},
        signal::Signal,
    },
};

use super::*;

/// A holder served on a thread of the test; stopped, and its result checked, on drop.
struct RunningHolder {
    stop: Option<UnixStream>,
    thread: Option<thread::JoinHandle<Result<(), HolderError>>>,
}

impl RunningHolder {
    fn start(socket: &Path) -> Self {
        let server = HolderServer::bind(socket)
            .unwrap_or_else(|error| panic!("binding a holder at {}: {error}", socket.display()));
        let (stop, stop_signal) = UnixStream::pair().expect("a socket pair to stop the holder");
        let thread = thread::spawn(move || server.serve_until(stop_signal.as_fd()));
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        // The other end closing makes the holder's end readable.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let served = thread.join();
            if !thread::panicking() {
                served
                    .expect("the holder thread panicked")
                    .expect("the holder ended with an error");
            }
        }
    }
}

impl Drop for RunningHolder {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn holder_path(dir: &tempfile::TempDir) -> PathBuf {
    // A directory the holder must create, as /run/nodemesh on a fresh node.
    dir.path().join("run").join("holder.sock")
}

fn tcp_listener() -> (TcpListener, HeldKey) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a TCP listener");
    let addr = listener.local_addr().expect("the listener's address");
    (listener, key(1, addr))
}

fn key(netns_inode: u64, addr: SocketAddr) -> HeldKey {
    HeldKey { netns_inode, addr }
}

fn connects(addr: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
}

fn assert_refused(addr: SocketAddr, why: &str) {
    match connects(addr) {
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!("expected a connect to {addr} to be refused ({why}), got {other:?}"),
    }
}

/// Accepts what is already queued, without hanging the test if nothing is.
fn accept_queued(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    listener
        .set_nonblocking(true)
        .expect("making the taken listener non-blocking");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok(accepted) => return accepted,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "expected a queued connection on the taken listener"
                );
                thread::sleep(Duration::from_millis(10));
            }
            Err(error) => panic!("accepting on the taken listener: {error}"),
        }
    }
}

fn sorted_keys(listeners: &[(HeldKey, OwnedFd)]) -> Vec<HeldKey> {
    let mut keys: Vec<_> = listeners.iter().map(|(key, _)| *key).collect();
    keys.sort();
    keys
}

#[test]
fn held_listener_queues_connections_and_take_all_hands_them_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = holder_path(&dir);
    let _holder = RunningHolder::start(&path);
    let (listener, key) = tcp_listener();
    {
        let agent = HolderClient::new(path.clone());
        agent
            .deposit(key, listener.as_fd())
            .expect("depositing a listening socket");
        // The agent exits: its listener and its client's registry close.
    }
    drop(listener);

    let mut waiting = connects(key.addr)
        .expect("the holder's copy keeps the socket listening, so the handshake completes");
    waiting
        .write_all(b"queued")
        .expect("writing into the queued connection");

    let next_agent = HolderClient::new(path);
    let mut taken = next_agent.take_all().expect("taking the held listeners");
    assert_eq!(sorted_keys(&taken), [key]);
    let (_, descriptor) = taken.pop().expect("one listener");
    let descriptor_flags = fcntl(&descriptor, FcntlArg::F_GETFD).expect("F_GETFD");
    assert!(
        FdFlag::from_bits_truncate(descriptor_flags).contains(FdFlag::FD_CLOEXEC),
        "a received descriptor must be close-on-exec"
    );
    let adopted = TcpListener::from(descriptor);
    let (mut accepted, peer) = accept_queued(&adopted);
    assert_eq!(
        peer,
        waiting.local_addr().expect("the waiting client's address"),
        "the taken listener accepts the very connection that queued"
    );
    accepted
        .set_nonblocking(false)
        .expect("blocking accepted stream");
    accepted
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut received = [0_u8; 6];
    accepted
        .read_exact(&mut received)
        .expect("reading what the client sent while no agent ran");
    assert_eq!(&received, b"queued");

    // The holder kept its own copy.
    assert_eq!(
        sorted_keys(&next_agent.take_all().expect("taking again")),
        [key]
    );
}

#[test]
fn release_and_retain_close_the_holders_copies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = holder_path(&dir);
    let _holder = RunningHolder::start(&path);
    let agent = HolderClient::new(path.clone());
    let mut addrs = Vec::new();
    for netns_inode in [1, 1, 2, 3] {
        let (listener, key) = tcp_listener();
        let key = HeldKey { netns_inode, ..key };
        agent.deposit(key, listener.as_fd()).expect("depositing");
        addrs.push(key);
    }
    // Only the holder and the agent's registry hold them now.

    agent.release_netns(1).expect("releasing netns 1");
    assert_refused(addrs[0].addr, "netns 1 was released");
    assert_refused(addrs[1].addr, "netns 1 was released");
    drop(connects(addrs[2].addr).expect("netns 2 is still held"));

    agent.retain_netns(&[3, 99]).expect("retaining netns 3");
    assert_refused(addrs[2].addr, "netns 2 was not retained");
    drop(connects(addrs[3].addr).expect("netns 3 was retained"));

    let other = HolderClient::new(path);
    assert_eq!(sorted_keys(&other.take_all().expect("listing")), [addrs[3]]);
}

#[test]
fn deposit_refuses_what_is_not_a_listening_tcp_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = holder_path(&dir);
    let _holder = RunningHolder::start(&path);
    let agent = HolderClient::new(path.clone());
    let expect_refused =
        |key: HeldKey, fd: BorrowedFd<'_>, reason: &str| match agent.deposit(key, fd) {
            Err(HolderError::Refused { message, .. }) => assert!(
                message.contains(reason),
                "expected the refusal to say {reason:?}, got {message:?}"
            ),
            other => panic!("expected a refusal ({reason}), got {other:?}"),
        };

    let bound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("a TCP socket");
    bound
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
        .expect("binding without listening");
    let bound_addr = bound
        .local_addr()
        .expect("address")
        .as_socket()
        .expect("inet");
    expect_refused(key(1, bound_addr), bound.as_fd(), "not listening");

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
    let udp_addr = udp.local_addr().expect("address");
    expect_refused(key(1, udp_addr), udp.as_fd(), "not a TCP one");

    let unix_listener = UnixListener::bind(dir.path().join("stream.sock")).expect("unix");
    let unix_key = key(1, "127.0.0.1:1".parse().expect("addr"));
    expect_refused(unix_key, unix_listener.as_fd(), "not a TCP one");

    let (listener, right_key) = tcp_listener();
    let wrong_key = key(1, "127.0.0.1:1".parse().expect("addr"));
    expect_refused(wrong_key, listener.as_fd(), "bound to");

    // The connection is still usable, and nothing refused was kept.
    agent
        .deposit(right_key, listener.as_fd())
        .expect("depositing a listening socket on the same connection");
    assert_eq!(
        sorted_keys(&agent.take_all().expect("listing")),
        [right_key]
    );
    // Nor does the client's registry keep what was refused.
    assert_eq!(agent.state.lock().deposited.len(), 1);
}

#[test]
fn malformed_requests_get_an_error_and_the_connection_stays_usable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = holder_path(&dir);
    let _holder = RunningHolder::start(&path);
    let connection = connect_seqpacket(&path).expect("connecting to the holder");
    let mut buffer = vec![0_u8; MAX_MESSAGE];
    let mut ask = |bytes: &[u8], descriptor: Option<BorrowedFd<'_>>| -> Reply {
        send_packet(connection.as_fd(), bytes, descriptor).expect("sending");
        let packet = recv_packet(connection.as_fd(), &mut buffer)
            .expect("receiving")
            .expect("a reply, not the end of the connection");
        assert!(packet.descriptors.is_empty(), "no descriptor expected");
        serde_json::from_slice(&buffer[..packet.len]).expect("a well-formed reply")
    };
    let (listener, key) = tcp_listener();

    let oversized = vec![b' '; MAX_MESSAGE + 1];
    let cases: [(&str, &[u8], Option<BorrowedFd<'_>>, &str); 5] = [
        ("not JSON", b"{nope", None, "malformed"),
        ("an unknown op", br#"{"op":"explode"}"#, None, "malformed"),
        ("oversized", &oversized, None, "over"),
        (
            "a hello with a descriptor",
            br#"{"op":"hello"}"#,
            Some(listener.as_fd()),
            "descriptor",
        ),
        (
            "a deposit without one",
            &serde_json::to_vec(&Request::Deposit { key }).expect("encoding"),
            None,
            "descriptor",
        ),
    ];
    for (what, bytes, descriptor, reason) in cases {
        match ask(bytes, descriptor) {
            Reply::Error { message } => assert!(
                message.contains(reason),
                "{what}: expected an error saying {reason:?}, got {message:?}"
            ),
            other => panic!("{what}: expected an error reply, got {other:?}"),
        }
        match ask(br#"{"op":"hello"}"#, None) {
            Reply::Hello { held: 0, .. } => {}
            other => panic!("after {what}: expected the connection to answer hello, got {other:?}"),
        }
    }
}

#[test]
fn resync_deposits_again_into_a_restarted_holder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = holder_path(&dir);
    let first = RunningHolder::start(&path);
    let agent = HolderClient::new(path.clone());
    let mut keys = Vec::new();
    for netns_inode in [7, 8] {
        let (listener, key) = tcp_listener();
        let key = HeldKey { netns_inode, ..key };
        agent.deposit(key, listener.as_fd()).expect("depositing");
        keys.push(key);
    }
    // A listener only the holder has: its agent went away.
    let (orphan, orphan_key) = tcp_listener();
    HolderClient::new(path.clone())
        .deposit(orphan_key, orphan.as_fd())
        .expect("depositing the orphan");
    drop(orphan);
    assert_eq!(agent.resync().expect("resync, same holder"), 0);

    first.stop();
    assert_refused(
        orphan_key.addr,
        "the stopped holder had the orphan's last copy",
    );
    assert!(!path.exists(), "a stopped holder removes its socket");

    let _second = RunningHolder::start(&path);
    let other = HolderClient::new(path);
    assert!(
        other.take_all().expect("listing").is_empty(),
        "a new holder starts with nothing"
    );
    // The agent's connection is to the stopped holder: resync reconnects by itself.
    assert_eq!(
        agent
            .resync()
            .expect("resync after the restart, on a new connection"),
        2
    );
    keys.sort();
    assert_eq!(sorted_keys(&other.take_all().expect("listing")), keys);
    assert_eq!(agent.resync().expect("resync, in step"), 0);

    // Released listeners are not deposited again after the next restart.
    agent.release_netns(7).expect("releasing netns 7");
    assert_eq!(agent.state.lock().deposited.len(), 1);
}

#[test]
fn a_deposit_the_holder_missed_is_made_by_the_next_resync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = holder_path(&dir);
    let agent = HolderClient::new(path.clone());
    let (listener, key) = tcp_listener();
    match agent.take_all() {
        Err(HolderError::Io { operation, .. }) => assert_eq!(operation, "connecting to"),
        other => panic!("expected no holder to reach, got {other:?}"),
    }
    assert!(
        agent.deposit(key, listener.as_fd()).is_err(),
        "expected the deposit to fail without a holder"
    );
    assert!(
        agent.resync().is_err(),
        "expected resync to fail without a holder"
    );

    let _holder = RunningHolder::start(&path);
    assert_eq!(agent.resync().expect("resync once the holder runs"), 1);
    assert_eq!(
        sorted_keys(&HolderClient::new(path).take_all().expect("listing")),
        [key]
    );
}

#[test]
fn two_clients_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = holder_path(&dir);
    let _holder = RunningHolder::start(&path);
    let old_agent = HolderClient::new(path.clone());
    let new_agent = HolderClient::new(path.clone());
    // Both connected before either deposits.
    assert_eq!(old_agent.resync().expect("old agent resync"), 0);
    assert_eq!(new_agent.resync().expect("new agent resync"), 0);

    let deposit_ten = |client: &HolderClient, netns_inode: u64| {
        let mut keys = Vec::new();
        for _ in 0..10 {
            let (listener, key) = tcp_listener();
            let key = HeldKey { netns_inode, ..key };
            client.deposit(key, listener.as_fd()).expect("depositing");
            keys.push(key);
        }
        keys
    };
    let (old_keys, new_keys) = thread::scope(|scope| {
        let old = scope.spawn(|| deposit_ten(&old_agent, 1));
        let new = scope.spawn(|| deposit_ten(&new_agent, 2));
        (
            old.join().expect("old agent thread"),
            new.join().expect("new agent thread"),
        )
    });
    let mut all: Vec<_> = old_keys.iter().chain(&new_keys).copied().collect();
    all.sort();
    assert_eq!(
        sorted_keys(&new_agent.take_all().expect("listing")),
        all,
        "both clients' deposits are held"
    );

    old_agent.release_netns(1).expect("releasing netns 1");
    let mut remaining = new_keys.clone();
    remaining.sort();
    assert_eq!(
        sorted_keys(&new_agent.take_all().expect("listing")),
        remaining
    );
    assert_eq!(
        new_agent
            .resync()
            .expect("the other connection still works"),
        0
    );
}

#[test]
fn the_socket_is_private_and_only_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = holder_path(&dir);
    {
        let _holder = RunningHolder::start(&path);
        let mode = fs::metadata(&path)
            .expect("socket metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the holder's socket must be 0600");
        match HolderServer::bind(&path) {
            Err(HolderError::AlreadyRunning(_)) => {}
            other => panic!(
                "expected a second holder on a live socket to refuse, got {:?}",
                other.map(|_| ())
            ),
        }
    }

    // A socket file nobody listens on: what a killed holder leaves.
    drop(UnixListener::bind(&path).expect("leaving a stale socket"));
    assert!(path.exists(), "std leaves the socket file behind");
    let holder = RunningHolder::start(&path);
    assert_eq!(
        HolderClient::new(path.clone())
            .resync()
            .expect("reaching the holder that replaced the stale socket"),
        0
    );
    holder.stop();

    fs::write(&path, "not a socket").expect("writing a regular file");
    match HolderServer::bind(&path) {
        Err(HolderError::NotASocket(_)) => {}
        other => panic!(
            "expected a regular file to be left alone, got {:?}",
            other.map(|_| ())
        ),
    }
    assert_eq!(
        fs::read_to_string(&path).expect("the file is still there"),
        "not a socket"
    );
}

#[test]
fn run_holder_stops_on_sigterm_and_removes_its_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = holder_path(&dir);
    let (thread_id_tx, thread_id_rx) = mpsc::channel();
    let holder = thread::spawn({
        let path = path.clone();
        move || {
            let _ = thread_id_tx.send(pthread_self());
            run_holder(&path)
        }
    });
    let holder_thread = thread_id_rx.recv().expect("the holder thread's id");
    // The socket appears only after SIGTERM is blocked on that thread: only then can the
    // signal be sent to it without killing the test process.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(
            !holder.is_finished() && Instant::now() < deadline,
            "expected run_holder to create {}",
            path.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        HolderClient::new(path.clone())
            .resync()
            .expect("reaching run_holder"),
        0
    );

    pthread_kill(holder_thread, Signal::SIGTERM).expect("signalling the holder thread");
    holder
        .join()
        .expect("the holder thread panicked")
        .expect("run_holder ended with an error");
    assert!(!path.exists(), "run_holder removes its socket on SIGTERM");
}

/// An agent asks whether a successor runs beside it: a client counts once it deposited or
/// listed, a mere hello (a tool) does not, only those that came after the asking one are
/// its successors, and a client that leaves stops counting.
#[test]
fn successors_are_the_agents_that_came_later_and_are_still_connected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = holder_path(&dir);
    let _holder = RunningHolder::start(&path);
    let old_agent = HolderClient::new(path.clone());
    let (listener, key) = tcp_listener();
    old_agent
        .deposit(key, listener.as_fd())
        .expect("depositing");
    assert_eq!(old_agent.successors().expect("hello"), 0, "alone");

    let tool = HolderClient::new(path.clone());
    assert_eq!(
        old_agent.successors().expect("hello"),
        0,
        "a client that only says hello is no agent"
    );
    assert_eq!(
        tool.successors().expect("hello"),
        1,
        "the tool sees the agent"
    );
    let new_agent = HolderClient::new(path.clone());
    assert_eq!(new_agent.take_all().expect("listing").len(), 1);
    assert_eq!(
        old_agent.successors().expect("hello"),
        1,
        "a successor took the listeners"
    );
    assert_eq!(
        new_agent.successors().expect("hello"),
        0,
        "the old agent is no successor of the new one"
    );

    drop(new_agent);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while old_agent.successors().expect("hello") != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a client that left stops counting"
        );
        thread::sleep(Duration::from_millis(10));
    }
}
