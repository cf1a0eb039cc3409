//! Relaying between two plain TCP sockets without copying through the proxy: `splice(2)`
//! moves each direction's bytes from one socket into a pipe and from the pipe into the
//! other socket, inside the kernel. A plaintext connection (to a pod outside the mesh, or a
//! port with mTLS off) is the one case where the proxy neither reads nor changes the bytes,
//! so it need not see them: no user-space buffer, no two copies per byte.
//!
//! A direction opens its pipe when its first bytes arrive and keeps it (two file
//! descriptors, and kernel pages only while bytes are in it) for the connection's life: a
//! connection on which nothing was sent holds none.
use std::{
    io,
    net::Shutdown,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, ready},
};

use nix::{
    fcntl::{OFlag, SpliceFFlags, splice},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

/// Bytes asked for per `splice` into the pipe: the pipe's default capacity (16 pages).
const PIPE_CAPACITY: usize = 64 * 1024;

/// Moves `a` → `b` and `b` → `a` until both directions reach end of stream, shutting each
/// writer down when its reader ends (half-closes pass through), and counts the bytes each
/// way in `a_to_b` and `b_to_a` as they cross (the caller watches them for idleness).
pub async fn splice_bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &AtomicU64,
    b_to_a: &AtomicU64,
) -> io::Result<()> {
    let (mut forward, mut backward) = (Direction::default(), Direction::default());
    std::future::poll_fn(|cx| {
        let forward = forward.poll(cx, a, b, a_to_b)?;
        let backward = backward.poll(cx, b, a, b_to_a)?;
        match (forward, backward) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction: its pipe, and what the pipe holds.
#[derive(Default)]
struct Direction {
    /// Opened when the first bytes arrive.
    pipe: Option<Pipe>,
    /// Bytes in the pipe, not yet written to the destination.
    held: usize,
    /// The source reached end of stream.
    ended: bool,
    /// The destination's writing side was shut down: this direction is done.
    done: bool,
}

/// The two ends of a pipe.
struct Pipe {
    out: OwnedFd,
    into: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (out, into) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Self { out, into })
    }
}

impl Direction {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        counted: &AtomicU64,
    ) -> Poll<io::Result<()>> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        while !self.done {
            if let Some(pipe) = self.pipe.as_ref().filter(|_| self.held > 0) {
                ready!(to.poll_write_ready(cx))?;
                // WouldBlock (the socket's send buffer is full) clears the readiness: the
                // next poll waits for it.
                match to.try_io(Interest::WRITABLE, || {
                    Ok(splice(&pipe.out, None, to.as_fd(), None, self.held, flags)?)
                }) {
                    Ok(written) => self.held -= written,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => return Poll::Ready(Err(error)),
                }
            } else if self.ended {
                // Done also when the peer is gone already: there is nothing left to tell it.
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                self.done = true;
            } else {
                ready!(from.poll_read_ready(cx))?;
                let pipe = match &mut self.pipe {
                    Some(pipe) => pipe,
                    none => none.insert(Pipe::new()?),
                };
                // The pipe is empty here, so WouldBlock means the socket has nothing to read.
                match from.try_io(Interest::READABLE, || {
                    Ok(splice(
                        from.as_fd(),
                        None,
                        &pipe.into,
                        None,
                        PIPE_CAPACITY,
                        flags,
                    )?)
                }) {
                    Ok(0) => self.ended = true,
                    Ok(read) => {
                        self.held = read;
                        counted.fetch_add(read as u64, Ordering::Relaxed);
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => return Poll::Ready(Err(error)),
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of loopback sockets.
    pub(in crate::proxy) async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connecting = TcpStream::connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connecting, listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn moves_both_ways_counts_and_passes_half_closes_on() {
        // client ⇄ [proxy_client | proxy_upstream] ⇄ server
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let relay = splice_bidirectional(&proxy_client, &proxy_upstream, &up, &down);
        // More than a pipe holds, so the pipe fills and drains many times.
        let request: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let peers = async {
            let (sent, received) = tokio::join!(
                async {
                    client.write_all(&request).await.unwrap();
                    client.shutdown().await.unwrap();
                },
                async {
                    let mut received = Vec::new();
                    server.read_to_end(&mut received).await.unwrap();
                    // The server answers after the client's half-close reached it.
                    server.write_all(b"done").await.unwrap();
                    server.shutdown().await.unwrap();
                    received
                }
            );
            let () = sent;
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            (received, reply)
        };
        let (relayed, (received, reply)) = tokio::join!(relay, peers);
        relayed.unwrap();
        assert!(
            received == request,
            "the server got the client's bytes, in order"
        );
        assert_eq!(reply, b"done");
        assert_eq!(up.load(Ordering::Relaxed), request.len() as u64);
        assert_eq!(down.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_reset_peer_ends_the_relay_with_an_error() {
        let (client, proxy_client) = pair().await;
        let (proxy_upstream, server) = pair().await;
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        // SO_LINGER 0 makes the close a reset.
        socket2::SockRef::from(&server)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(server);
        let mut client = client;
        client.write_all(b"hello").await.unwrap();
        let relayed = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            splice_bidirectional(&proxy_client, &proxy_upstream, &up, &down),
        )
        .await
        .expect("the relay ends");
        assert!(relayed.is_err(), "a reset is an error: {relayed:?}");
    }
}
