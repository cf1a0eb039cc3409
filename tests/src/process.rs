//! Starting processes inside the cluster and stopping them.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

/// Where a binary of this workspace is: `$NODEMESH_BIN_DIR/<name>` if that variable is
/// set, else next to the running executable (`target/<profile>/`, with the trailing
/// `deps/` of a test binary or `examples/` of an example stripped).
///
/// # Panics
/// When the file does not exist, saying how to build it.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("NODEMESH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            let mut dir = exe
                .parent()
                .expect("an executable has a directory")
                .to_path_buf();
            if dir.ends_with("deps") || dir.ends_with("examples") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        let package = if name == "mesh-testapp" {
            "mesh-tests"
        } else {
            name
        };
        panic!(
            "{} not found: build it first: cargo build -p {package} (or run cargo xtask test)",
            path.display()
        );
    }
    path
}

/// Makes `command`'s child enter the network namespace `netns` and, when given, the
/// cgroup whose `cgroup.procs` is open as `cgroup_procs`, before it executes.
///
/// The files are opened by the parent: between fork and exec only async-signal-safe
/// calls are allowed. The child also asks for SIGKILL when the thread that spawned it
/// exits, so that a test process killed mid-run does not leave agents or servers behind.
pub(crate) fn place(command: &mut Command, netns: File, cgroup_procs: Option<File>) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe system calls on descriptors it
    // owns, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(procs) = &cgroup_procs {
                // "0" moves the writing process: the child, before it runs anything.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Sends `signal` to a child (by its PID, which stays reserved until it is reaped).
pub(crate) fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the PID is our unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

/// Waits up to `timeout` for `child` to exit.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let waited = started.elapsed();
        if waited >= timeout {
            return Ok(None);
        }
        // Short-lived children are the common case: poll tightly at first.
        let pause = if waited < Duration::from_millis(100) {
            1
        } else {
            10
        };
        thread::sleep(Duration::from_millis(pause));
    }
}

/// SIGTERM, then SIGKILL if the child has not exited after `grace`; returns its status.
pub(crate) fn terminate(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    signal(child, libc::SIGTERM);
    if let Some(status) = wait_timeout(child, grace)? {
        return Ok(status);
    }
    signal(child, libc::SIGKILL);
    child.wait()
}

/// The last `lines` lines of a log file, for panic messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Resident memory of process `pid`, in bytes (`VmRSS`).
///
/// # Panics
/// When the process is gone.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for {pid}"));
    kib * 1024
}
