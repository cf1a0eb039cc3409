//! The wire protocol: one JSON message per `SOCK_SEQPACKET` packet, at most one descriptor.
use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::{
        socket::{
            AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
            UnixAddr, connect, recvmsg, sendmsg, setsockopt, socket, sockopt,
        },
        time::TimeVal,
    },
};
use serde::{Deserialize, Serialize};

use super::HeldKey;

/// The largest message either end sends or accepts: a `retain` of some 3,000 netns.
/// How long the client waits for the holder to take or answer a message. The holder answers
/// in microseconds; this only bounds how long a stopped or wedged holder can stall the
/// agent's enrollment loop.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) const MAX_MESSAGE: usize = 64 * 1024;

/// Room for as many descriptors as the kernel puts in one message (`SCM_MAX_FD`). The
/// protocol allows one, but a control buffer too small for what a peer sent would leave the
/// descriptors that did fit installed in this process, where nix cannot hand them back.
const MAX_DESCRIPTORS: usize = 253;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Request {
    Hello,
    List,
    Deposit { key: HeldKey },
    Release { netns_inode: u64 },
    Retain { keep: Vec<u64> },
}

impl Request {
    pub(super) fn name(&self) -> &'static str {
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
pub(super) enum Reply {
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
pub(super) struct Packet {
    pub(super) len: usize,
    /// Longer than the buffer, or with more descriptors than fit: the rest was discarded.
    pub(super) truncated: bool,
    pub(super) descriptors: Vec<OwnedFd>,
}

/// Takes ownership of a descriptor the kernel has just installed in this process.
#[expect(
    unsafe_code,
    reason = "nix hands out accepted and received descriptors as RawFd"
)]
pub(super) fn adopt(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` was returned by accept4 or arrived in an SCM_RIGHTS message a moment
    // ago: it is open, and nothing else in this process knows it.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

pub(super) fn send_packet(
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
pub(super) fn recv_packet(
    connection: BorrowedFd<'_>,
    buffer: &mut [u8],
) -> io::Result<Option<Packet>> {
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
pub(super) fn connect_seqpacket(path: &Path) -> io::Result<OwnedFd> {
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
