//! The agent's end: deposits, takes back, and deposits again into a restarted holder.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use parking_lot::Mutex;
use tracing::{debug, info, warn};

use super::{HeldKey, HolderError, wire::*};

/// The agent's end. Blocking calls (each a few local syscalls): the agent calls them from
/// its enrollment loop.
///
/// Every request is idempotent (a deposit replaces, a release of nothing is fine), so a
/// call that finds its connection broken sends again once on a new one.
#[derive(Debug)]
pub struct HolderClient {
    socket: PathBuf,
    pub(super) state: Mutex<ClientState>,
}

#[derive(Debug, Default)]
pub(super) struct ClientState {
    connection: Option<Connection>,
    /// What this client deposited and has not released, as its own duplicates: what it
    /// deposits again into a holder that restarted.
    pub(super) deposited: BTreeMap<HeldKey, OwnedFd>,
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
