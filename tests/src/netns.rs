//! Network namespaces: `ip` invocations and running code inside a named netns.
//!
//! A network namespace belongs to a thread, so code that must run "in" a namespace gets
//! a fresh thread that `setns`'d into it; the calling thread never changes namespace.

use std::{
    fs::{self, File},
    io::{self, Write},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, OnceLock},
};

/// Where `ip netns add` mounts named namespaces.
pub(crate) const NETNS_DIR: &str = "/var/run/netns";

/// The iproute2 `ip` binary, if the machine has one.
pub fn ip_binary() -> Option<PathBuf> {
    static IP: OnceLock<Option<PathBuf>> = OnceLock::new();
    IP.get_or_init(|| {
        ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    })
    .clone()
}

fn ip_command() -> Command {
    Command::new(
        ip_binary().expect("iproute2 `ip` not found (check mesh_tests::skip_reason first)"),
    )
}

/// Runs `ip <args>`; the error carries the command line and `ip`'s stderr.
pub(crate) fn ip(args: &[&str]) -> Result<(), String> {
    let output = ip_command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Runs `ip -n <netns> -batch -` with one command per line: one process instead of one
/// per command keeps cluster setup fast. `ip` stops at the first failing line.
pub(crate) fn ip_batch(netns: &str, lines: &[String]) -> Result<(), String> {
    let mut child = ip_command()
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("ip -n {netns} -batch: {e}"))?;
    let script = lines.join("\n") + "\n";
    // `ip` reads all of stdin before it exits, and the script is small, so writing it
    // before reading the outputs cannot deadlock.
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(|e| format!("ip -n {netns} -batch: writing the script: {e}"))?;
    let output = child
        .wait_with_output()
        .map_err(|e| format!("ip -n {netns} -batch: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip -n {netns} -batch failed ({}): {}\nscript:\n{script}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `ip netns add`, serialized within the process: the first `ip netns add` on a machine
/// creates and bind-mounts /run/netns, and concurrent first calls race on that.
pub(crate) fn netns_add(name: &str) -> Result<(), String> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ip(&["netns", "add", name])
}

/// `ip netns del`; a namespace still used by a process lives on until that process exits.
pub(crate) fn netns_del(name: &str) -> Result<(), String> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name])
}

/// The bind mount that names a namespace.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Opens a named namespace, for `setns`.
pub(crate) fn open_netns(name: &str) -> io::Result<File> {
    File::open(netns_path(name))
        .map_err(|e| io::Error::new(e.kind(), format!("opening netns {name}: {e}")))
}

/// Moves the calling thread into the namespace `ns` refers to.
pub(crate) fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: `ns` is an open file; setns only reads the descriptor.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread that entered the named network namespace, and returns its
/// result; a panic in `f` is propagated.
///
/// The thread is not moved into any cgroup, so sockets it opens are never captured by a
/// mesh agent: use it as a "non-mesh" client or to probe a namespace.
pub fn run_in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let ns = open_netns(netns).unwrap_or_else(|e| panic!("{e}"));
    let name = netns.to_owned();
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn_scoped(scope, move || {
                enter(&ns).unwrap_or_else(|e| panic!("setns into {name}: {e}"));
                f()
            })
            .expect("spawning a thread");
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Writes sysctls (`(key, value)`, dotted keys) inside the named namespace, never in the
/// root one.
///
/// /proc/sys/net resolves to the namespace of the thread that opens it, so the writes
/// happen on a thread that entered `netns`; before writing, that thread checks it really
/// is in `netns`, because writing the root namespace's sysctls is forbidden here.
pub(crate) fn sysctls(netns: &str, settings: &[(&str, &str)]) -> Result<(), String> {
    let target = fs::metadata(netns_path(netns)).map_err(|e| format!("netns {netns}: {e}"))?;
    run_in_netns(netns, || {
        let own = fs::metadata("/proc/thread-self/ns/net")
            .map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?;
        if (own.dev(), own.ino()) != (target.dev(), target.ino()) {
            return Err(format!("not in netns {netns}: refusing to set sysctls"));
        }
        for (key, value) in settings {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            fs::write(&path, value).map_err(|e| format!("{netns}: {path} = {value}: {e}"))?;
        }
        Ok(())
    })
}

/// The namespace inode of a named netns (to compare with /proc/<pid>/ns/net).
pub(crate) fn netns_inode(name: &str) -> Option<(u64, u64)> {
    fs::metadata(netns_path(name))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}
