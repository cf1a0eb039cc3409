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
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

mod client;
mod server;
mod wire;

pub use client::HolderClient;
pub use server::run_holder;
use wire::MAX_MESSAGE;
#[cfg(test)]
use {server::HolderServer, wire::*};

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

#[cfg(test)]
mod tests;
