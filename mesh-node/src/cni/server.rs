//! The agent's end of the CNI plugin: a unix socket taking one JSON request per connection
//! and answering once the enrollment loop has acted on it.
//!
//! The server only parses and forwards: every decision (which pod, enroll or not) is the
//! enrollment loop's, which owns the enrolled pods ([`crate::enroll`]).
use std::{
    fs, io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{AgentRequest, AgentResponse};

/// A request no plugin sends is this long; a longer one is cut off and refused.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// The plugin writes its request at once; a connection that stays silent is dropped.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests waiting for the enrollment loop; the plugin retries when the agent is slow.
const QUEUE_DEPTH: usize = 64;

/// A plugin's request and where its answer goes.
pub type CniCall = (AgentRequest, oneshot::Sender<AgentResponse>);

/// The enrollment loop's end of the channel.
pub struct CniRequests {
    pub calls: mpsc::Receiver<CniCall>,
    /// Set once the first config state has been reconciled: until then ADDs are answered
    /// "not ready", since the loop could not tell whether the pod is to be enrolled.
    pub ready: watch::Sender<bool>,
}

/// The server's end of the channel.
pub struct CniHandle {
    calls: mpsc::Sender<CniCall>,
    ready: watch::Receiver<bool>,
}

/// A connected pair: the server forwards through the handle, the loop takes from the
/// requests.
pub fn channel() -> (CniHandle, CniRequests) {
    let (calls_tx, calls_rx) = mpsc::channel(QUEUE_DEPTH);
    let (ready_tx, ready_rx) = watch::channel(false);
    (
        CniHandle {
            calls: calls_tx,
            ready: ready_rx,
        },
        CniRequests {
            calls: calls_rx,
            ready: ready_tx,
        },
    )
}

/// The bound socket; the file is removed when the server stops.
pub struct CniServer {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's inode, so an agent stopping late never removes its successor's.
    inode: u64,
}

impl CniServer {
    /// Binds `path` with mode 0600 (only root, as the runtime runs the plugin, may enroll
    /// pods), creating its directory and replacing a stale socket file. Needs a runtime.
    ///
    /// The socket is bound under a temporary name, restricted, then renamed into place: it
    /// is never reachable with the default mode, and a stale file is replaced atomically.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            fs::create_dir_all(dir).map_err(with_path)?;
        }
        let mut temp_name = path.file_name().unwrap_or_default().to_os_string();
        temp_name.push(format!(".{}.tmp", std::process::id()));
        let temp = path.with_file_name(temp_name);
        let _ = fs::remove_file(&temp);
        let listener = UnixListener::bind(&temp).map_err(with_path)?;
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o600)).map_err(with_path)?;
        fs::rename(&temp, path).map_err(with_path)?;
        let inode = fs::metadata(path).map_err(with_path)?.ino();
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            inode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts plugin connections until `shutdown`.
    pub async fn serve(self, handle: CniHandle, shutdown: CancellationToken) {
        info!(socket = %self.path.display(), "CNI socket listening");
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        warn!(%error, "accepting a CNI connection");
                        crate::accept::back_off(&error).await;
                        continue;
                    }
                },
            };
            // Detached: each ends with its answer, or when the enrollment loop drops the
            // reply at shutdown.
            tokio::spawn(answer(stream, handle.calls.clone(), handle.ready.clone()));
        }
    }
}

impl Drop for CniServer {
    fn drop(&mut self) {
        if fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

async fn answer(stream: UnixStream, calls: mpsc::Sender<CniCall>, ready: watch::Receiver<bool>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    let reading = reader.read_line(&mut line);
    let response = match tokio::time::timeout(REQUEST_READ_TIMEOUT, reading).await {
        Err(_) => AgentResponse::Failed {
            error: format!("no request within {REQUEST_READ_TIMEOUT:?}"),
        },
        Ok(Err(error)) => AgentResponse::Failed {
            error: format!("reading the request: {error}"),
        },
        Ok(Ok(_)) => match serde_json::from_str::<AgentRequest>(&line) {
            Err(error) => AgentResponse::Failed {
                error: format!("bad request: {error}"),
            },
            Ok(request) => {
                let ready = *ready.borrow();
                forward(request, &calls, ready).await
            }
        },
    };
    debug!(?response, "CNI request answered");
    let mut bytes = serde_json::to_vec(&response).expect("responses always serialize");
    bytes.push(b'\n');
    if let Err(error) = write.write_all(&bytes).await {
        // The plugin timed out and left; it retries or follows its policy.
        debug!(%error, "writing the CNI answer");
    }
}

async fn forward(
    request: AgentRequest,
    calls: &mpsc::Sender<CniCall>,
    ready: bool,
) -> AgentResponse {
    match request {
        AgentRequest::Status if ready => AgentResponse::Ready,
        _ if !ready => AgentResponse::NotReady,
        request => {
            let (reply_tx, reply_rx) = oneshot::channel();
            if calls.send((request, reply_tx)).await.is_err() {
                return AgentResponse::NotReady; // the loop is gone: shutting down
            }
            reply_rx.await.unwrap_or(AgentResponse::NotReady)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt;

    use super::*;
    use crate::cni::PodRef;

    async fn ask(path: &Path, request: &str) -> AgentResponse {
        let mut stream = UnixStream::connect(path).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .await
            .expect("read");
        serde_json::from_str(&line).expect("an answer")
    }

    #[tokio::test]
    async fn answers_not_ready_then_forwards_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/nodemesh/cni.sock");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "stale").unwrap();
        let server = CniServer::bind(&path).expect("bind over a stale file");
        let metadata = fs::metadata(&path).unwrap();
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);

        let (handle, mut requests) = channel();
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(server.serve(handle, shutdown.clone()));
        let del = AgentRequest::Del {
            pod: PodRef {
                namespace: "shop".into(),
                name: "web".into(),
                uid: None,
            },
            container_id: "c1".into(),
        };
        let del_line = format!("{}\n", serde_json::to_string(&del).unwrap());
        assert_eq!(ask(&path, &del_line).await, AgentResponse::NotReady);
        assert_eq!(
            ask(&path, "{\"command\":\"STATUS\"}\n").await,
            AgentResponse::NotReady
        );

        requests.ready.send_replace(true);
        let answering = tokio::spawn(async move {
            let (request, reply) = requests.calls.recv().await.expect("a call");
            reply.send(AgentResponse::Removed).unwrap();
            request
        });
        assert_eq!(ask(&path, &del_line).await, AgentResponse::Removed);
        assert_eq!(answering.await.unwrap(), del);
        assert!(matches!(
            ask(&path, "not json\n").await,
            AgentResponse::Failed { error } if error.contains("bad request")
        ));

        shutdown.cancel();
        serving.await.unwrap();
        assert!(!path.exists(), "the socket file is removed on exit");
    }
}
