//! cgroup v2: finding the hierarchy, emptying and removing the cluster's cgroups.
//!
//! The cluster only ever creates cgroups under `<cgroup2 root>/nodemesh-<unique>/`.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

/// The cgroup2 mount point: `NODEMESH_CGROUP_ROOT` if set, else the first cgroup2 mount
/// in /proc/self/mountinfo (`/sys/fs/cgroup` on most machines, `/sys/fs/cgroup/unified`
/// on hybrid v1/v2 ones).
///
/// # Panics
/// When there is no cgroup2 mount.
pub fn cgroup2_root() -> PathBuf {
    try_cgroup2_root().unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) fn try_cgroup2_root() -> Result<PathBuf, String> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        if let Some(root) = std::env::var_os("NODEMESH_CGROUP_ROOT") {
            let root = PathBuf::from(root);
            return if root.join("cgroup.procs").is_file() {
                Ok(root)
            } else {
                Err(format!(
                    "NODEMESH_CGROUP_ROOT={} is not a cgroup2 directory",
                    root.display()
                ))
            };
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
        let mounts = cgroup2_mounts(&mountinfo);
        // Prefer the conventional place when several cgroup2 mounts exist.
        mounts
            .iter()
            .find(|m| m.as_path() == Path::new("/sys/fs/cgroup"))
            .or_else(|| mounts.first())
            .cloned()
            .ok_or_else(|| "no cgroup2 mount in /proc/self/mountinfo".to_owned())
    })
    .clone()
}

/// Mount points of cgroup2 file systems in mountinfo text.
fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(unescape_mountinfo))
                .flatten()
        })
        .map(PathBuf::from)
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// PIDs currently in a cgroup (not its descendants).
pub(crate) fn procs(cgroup: &Path) -> Vec<i32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// SIGKILLs every process in `cgroup` and waits (up to `timeout`) until it is empty.
///
/// Only the harness puts processes into the cluster's cgroups (pod processes and their
/// children), so everything listed there was started by this test.
pub(crate) fn kill_all(cgroup: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = procs(cgroup);
        if pids.is_empty() {
            return true;
        }
        for pid in pids {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Removes a cgroup directory, retrying while it still drains (exiting tasks keep a
/// cgroup busy for a moment after they are gone from cgroup.procs).
pub(crate) fn remove(cgroup: &Path, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mounts() {
        let text = "\
25 1 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
36 25 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev shared:10 - cgroup2 cgroup2 rw,nsdelegate
37 25 0:32 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
99 1 0:40 / /mnt/my\\040cg rw - cgroup2 none rw
";
        assert_eq!(
            cgroup2_mounts(text),
            vec![
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/mnt/my cg")
            ]
        );
    }
}
