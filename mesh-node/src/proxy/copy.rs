//! Copying both ways between the two sides of a relayed connection, with buffers that an
//! idle connection does not hold.
//!
//! `tokio::io::copy_bidirectional` gives every connection two 8 KiB buffers for its whole
//! life: 16 KiB per idle connection, most of what a node proxy with thousands of them
//! spends. Here a direction takes a buffer from a per-thread pool only for a read, and
//! gives it back as soon as the read finds nothing or its bytes are written: an idle
//! connection holds none, and a busy one gets a larger buffer (fewer reads, writes and
//! TLS records per byte) for the same memory.
use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One read's worth: a full TLS record's payload.
pub const BUFFER_SIZE: usize = 16 * 1024;
/// Buffers a worker thread keeps for reuse; beyond that they are freed.
const POOL_SIZE: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Buffers taken and not given back on this thread.
    static TAKEN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn take_buffer() -> Box<[u8]> {
    #[cfg(test)]
    TAKEN.set(TAKEN.get() + 1);
    POOL.with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice())
}

fn give_back(buffer: Box<[u8]>) {
    #[cfg(test)]
    TAKEN.set(TAKEN.get() - 1);
    POOL.with_borrow_mut(|pool| {
        if pool.len() < POOL_SIZE {
            pool.push(buffer);
        }
    });
}

/// Copies `a` → `b` and `b` → `a` until both directions reach end of stream, shutting
/// each writer down when its reader ends (half-closes pass through). Returns the bytes
/// copied each way.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
    poll_fn(|cx| {
        let a_to_b = a_to_b.poll(cx, a, b)?;
        let b_to_a = b_to_a.poll(cx, b, a)?;
        match (a_to_b, b_to_a) {
            (Poll::Ready(sent), Poll::Ready(received)) => Poll::Ready(Ok((sent, received))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction: read, write, and at end of stream flush and shut the writer down.
#[derive(Default)]
struct Direction {
    /// Bytes read and not yet written (`buffer[written..filled]`); `None` between reads.
    buffer: Option<Box<[u8]>>,
    written: usize,
    filled: usize,
    /// Written since the last flush.
    unflushed: bool,
    read_done: bool,
    finished: bool,
    copied: u64,
}

impl Direction {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(self.copied));
        }
        loop {
            if self.buffer.is_none() && !self.read_done {
                let mut buffer = take_buffer();
                let mut read = ReadBuf::new(&mut buffer);
                match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                    Poll::Pending => {
                        give_back(buffer);
                        // Nothing more to read now: what was written must reach the peer.
                        if self.unflushed {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(error)) => {
                        give_back(buffer);
                        return Poll::Ready(Err(error));
                    }
                    Poll::Ready(Ok(())) => {
                        let filled = read.filled().len();
                        if filled == 0 {
                            give_back(buffer);
                            self.read_done = true;
                        } else {
                            (self.written, self.filled) = (0, filled);
                            self.buffer = Some(buffer);
                        }
                    }
                }
            }
            if let Some(buffer) = &self.buffer {
                while self.written < self.filled {
                    let chunk = &buffer[self.written..self.filled];
                    let written = ready!(Pin::new(&mut *writer).poll_write(cx, chunk))?;
                    if written == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.written += written;
                    self.copied += written as u64;
                    self.unflushed = true;
                }
                if let Some(buffer) = self.buffer.take() {
                    give_back(buffer);
                }
            }
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test]
    async fn bytes_cross_both_ways_intact_with_half_closes() {
        let (mut client, mut client_end) = duplex(64 * 1024);
        let (mut upstream, mut upstream_end) = duplex(64 * 1024);
        let relay =
            tokio::spawn(
                async move { copy_bidirectional(&mut client_end, &mut upstream_end).await },
            );
        let request: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let response: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let (req, resp) = (request.clone(), response.clone());
        let client_side = tokio::spawn(async move {
            client.write_all(&req).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert!(
            got == request,
            "the request arrives whole, then end of stream"
        );
        upstream.write_all(&resp).await.unwrap();
        upstream.shutdown().await.unwrap();
        assert!(client_side.await.unwrap() == response);
        assert_eq!(
            relay.await.unwrap().unwrap(),
            (request.len() as u64, response.len() as u64)
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_connection_holds_no_buffer_and_a_blocked_one_holds_one() {
        let (mut client, mut client_end) = duplex(64 * 1024);
        let (mut upstream, mut upstream_end) = duplex(1024);
        let relay =
            tokio::spawn(
                async move { copy_bidirectional(&mut client_end, &mut upstream_end).await },
            );
        client.write_all(b"ping").await.unwrap();
        let mut ping = [0; 4];
        upstream.read_exact(&mut ping).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(TAKEN.get(), 0, "an idle connection holds no buffer");
        // The upstream stops reading: what the relay read and cannot write stays with it.
        client.write_all(&[7; 4096]).await.unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(TAKEN.get(), 1, "one buffer, holding the bytes in flight");
        let mut rest = vec![0; 4096];
        upstream.read_exact(&mut rest).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(TAKEN.get(), 0);
        drop((client, upstream));
        relay.await.unwrap().unwrap();
    }
}
