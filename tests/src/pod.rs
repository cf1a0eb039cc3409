//! Pods: specs, their addresses, and processes running inside them.

use std::{
    ffi::OsStr,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{Cluster, netns, process};

/// What [`Cluster::add_pod`] creates.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// Pod name (`metadata.name`), unique within the cluster.
    pub name: String,
    /// Kubernetes namespace; "default" by default.
    pub namespace: String,
    /// Index of the node the pod runs on.
    pub node: usize,
    /// `metadata.labels`.
    pub labels: Vec<(String, String)>,
    /// `spec.serviceAccountName`; "default" by default.
    pub service_account: String,
    /// Whether the pod also gets an IPv6 address (dual stack).
    pub ipv6: bool,
    /// Whether its manifest says Pending, without IPs, as at CNI time (the netns has its
    /// addresses all the same).
    pub pending: bool,
}

impl Default for PodSpec {
    fn default() -> Self {
        Self {
            name: "pod".into(),
            namespace: "default".into(),
            node: 0,
            labels: Vec::new(),
            service_account: "default".into(),
            ipv6: false,
            pending: false,
        }
    }
}

impl PodSpec {
    /// A pod named `name` on node `node`, in namespace "default".
    pub fn new(name: &str, node: usize) -> Self {
        Self {
            name: name.into(),
            node,
            ..Self::default()
        }
    }

    /// Sets the Kubernetes namespace.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// Sets the service account.
    pub fn service_account(mut self, service_account: &str) -> Self {
        self.service_account = service_account.into();
        self
    }

    /// Gives the pod an IPv6 address too.
    pub fn ipv6(mut self, ipv6: bool) -> Self {
        self.ipv6 = ipv6;
        self
    }

    /// Writes the manifest as Pending, without IPs: the agent cannot find the pod by IP
    /// until something (the CNI plugin) tells it.
    pub fn pending(mut self) -> Self {
        self.pending = true;
        self
    }
}

/// A pod that exists: its addresses and network namespace.
#[derive(Clone, Debug)]
pub struct Pod {
    /// `metadata.name`.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Index of its node.
    pub node: usize,
    /// `10.244.<node>.<10+j>`.
    pub ip: Ipv4Addr,
    /// `fd00:244:<node>::<10+j>` when the spec asked for IPv6.
    pub ip6: Option<Ipv6Addr>,
    /// Name of the pod's network namespace (under /var/run/netns).
    pub netns: String,
    /// `metadata.uid`.
    pub uid: String,
    /// Name of the node-side end of the pod's veth, in the node netns.
    pub host_veth: String,
    /// `metadata.labels`.
    pub labels: Vec<(String, String)>,
    /// `spec.serviceAccountName`.
    pub service_account: String,
}

impl Pod {
    /// Its manifest's file name in the config dir.
    pub fn manifest_file_name(&self) -> String {
        format!("pod-{}-{}.yaml", self.namespace, self.name)
    }

    /// Its network namespace's path, as a container runtime passes it to CNI plugins.
    pub fn netns_path(&self) -> PathBuf {
        netns::netns_path(&self.netns)
    }

    /// A command for `program` that runs inside this pod: in its netns and in its node's
    /// cgroup, so the node agent's cgroup eBPF programs see its sockets.
    ///
    /// The child gets SIGKILL when the thread that spawns it exits (so that a killed test
    /// leaves nothing running): spawn from a thread that outlives the process, not from a
    /// short-lived helper thread. The cluster kills everything left in its cgroups when
    /// dropped.
    pub fn command(&self, cluster: &Cluster, program: impl AsRef<OsStr>) -> Command {
        self.command_in_cgroup(&cluster.node_cgroup(self.node), program)
    }

    /// Like [`Pod::command`], in the cgroup `cgroup` (e.g. one named like kubelet's, from
    /// [`Cluster::add_cgroup`]).
    pub fn command_in_cgroup(&self, cgroup: &Path, program: impl AsRef<OsStr>) -> Command {
        let ns =
            netns::open_netns(&self.netns).unwrap_or_else(|e| panic!("pod {}: {e}", self.name));
        let procs_path = cgroup.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .unwrap_or_else(|e| panic!("{}: {e}", procs_path.display()));
        let mut command = Command::new(program);
        process::place(&mut command, ns, Some(procs));
        command
    }

    /// A command running `mesh-testapp` inside this pod (see [`Pod::command`]).
    pub fn testapp(&self, cluster: &Cluster) -> Command {
        self.command(cluster, process::bin_path("mesh-testapp"))
    }

    /// Starts a long-running `mesh-testapp <args>` in this pod; killed when the returned
    /// [`PodProcess`] is dropped. Its stdout is kept (see [`PodProcess::wait_for_output`])
    /// and, with stderr, logged to `logs/pod-<namespace>-<name>-<n>.log`.
    pub fn spawn(&self, cluster: &Cluster, args: &[&str]) -> PodProcess {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let log_path = cluster
            .logs_dir()
            .join(format!("pod-{}-{}-{seq}.log", self.namespace, self.name));
        let log = File::create(&log_path).unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
        let stderr = log.try_clone().expect("dup log file");
        let mut child = self
            .testapp(cluster)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting mesh-testapp {args:?} in pod {}: {e}", self.name));
        let stdout = child.stdout.take().expect("stdout is piped");
        let captured = Arc::new(Mutex::new(String::new()));
        let reader = {
            let captured = Arc::clone(&captured);
            let mut log = log;
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log, "{line}");
                    let mut captured = captured.lock().unwrap_or_else(|e| e.into_inner());
                    captured.push_str(&line);
                    captured.push('\n');
                }
            })
        };
        PodProcess {
            child,
            stdout: captured,
            reader: Some(reader),
            log_path,
            what: format!(
                "mesh-testapp {} in pod {}/{}",
                args.join(" "),
                self.namespace,
                self.name
            ),
        }
    }

    /// Runs `mesh-testapp <args>` in this pod to completion and returns its output.
    ///
    /// # Panics
    /// When it has not exited after `timeout` (it is killed first).
    pub fn run(&self, cluster: &Cluster, args: &[&str], timeout: Duration) -> Output {
        let mut child = self
            .testapp(cluster)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting mesh-testapp {args:?} in pod {}: {e}", self.name));
        // Both pipes are drained while waiting, so a chatty child cannot block on a full pipe.
        let stdout = drain(child.stdout.take().expect("piped"));
        let stderr = drain(child.stderr.take().expect("piped"));
        let status = process::wait_timeout(&mut child, timeout).expect("waiting for mesh-testapp");
        let Some(status) = status else {
            process::signal(&child, libc::SIGKILL);
            let _ = child.wait();
            panic!(
                "mesh-testapp {} in pod {} still running after {timeout:?}; stdout: {}; stderr: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&stdout.join().unwrap_or_default()),
                String::from_utf8_lossy(&stderr.join().unwrap_or_default()),
            );
        };
        Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        }
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// A long-running process in a pod; SIGKILLed (by PID) and reaped on drop.
pub struct PodProcess {
    child: Child,
    stdout: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    log_path: PathBuf,
    what: String,
}

impl PodProcess {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Where its stdout and stderr are logged.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log_path
    }

    /// Waits until its stdout contains `needle` (`mesh-testapp serve` prints "ready" once
    /// it listens).
    ///
    /// # Panics
    /// After `timeout`, or when the process exits first, with its log.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader catch up with what was printed before the exit.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                if self.stdout().contains(needle) {
                    return;
                }
                panic!(
                    "{} exited ({status}) before printing {needle:?}; log:\n{}",
                    self.what,
                    process::tail(&self.log_path, 40)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not print {needle:?} within {timeout:?}; log:\n{}",
                    self.what,
                    process::tail(&self.log_path, 40)
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether it exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Stops it: SIGTERM, then SIGKILL after `grace`; returns its exit status.
    pub fn stop(mut self, grace: Duration) -> ExitStatus {
        process::terminate(&mut self.child, grace).expect("stopping a pod process")
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            process::signal(&self.child, libc::SIGKILL);
            let _ = self.child.wait();
        }
        // The reader is left to finish on its own: a grandchild holding the pipe open
        // would block a join here.
        drop(self.reader.take());
    }
}
