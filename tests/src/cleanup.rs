//! Removal of what crashed test processes left behind.
//!
//! Every name the harness creates embeds the creating process id
//! (`nm-<test>-<pid>-<n>-…` for namespaces, `nodemesh-<test>-<pid>-<n>` for cgroups), so
//! leftovers of a dead process can be told from a live test's, even in another process.

use std::{fs, path::Path, time::Duration};

use crate::{cgroup, netns};

/// Prefix of every network namespace the harness creates.
pub(crate) const NETNS_PREFIX: &str = "nm-";
/// Prefix of the cluster cgroup directories below the cgroup2 root.
pub(crate) const CGROUP_PREFIX: &str = "nodemesh-";

/// Deletes namespaces `nm-*` and cgroups `nodemesh-*` whose creating process is gone.
///
/// Processes that may still run inside them are left alone (they were not started by
/// this process); a cgroup still holding some is left with a warning. Called by
/// [`Cluster::new`](crate::Cluster::new).
pub fn cleanup_stale() {
    if let Ok(entries) = fs::read_dir(netns::NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = netns_owner(&name)
                && is_dead(pid)
            {
                eprintln!("mesh-tests: removing stale netns {name}");
                if let Err(e) = netns::netns_del(&name) {
                    eprintln!("mesh-tests: {e}");
                }
            }
        }
    }
    for mount in bpffs_mounts() {
        // <target>/nodemesh-tests/<unique>/bpffs/node<i>
        let owner = mount
            .iter()
            .skip_while(|part| part.to_str() != Some("nodemesh-tests"))
            .nth(1)
            .and_then(|unique| unique_owner(&unique.to_str()?.split('-').collect::<Vec<_>>()));
        if let Some(pid) = owner
            && is_dead(pid)
        {
            eprintln!("mesh-tests: unmounting stale bpffs {}", mount.display());
            unmount(&mount);
        }
    }
    let Ok(root) = cgroup::try_cgroup2_root() else {
        return;
    };
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = cgroup_owner(&name)
                && is_dead(pid)
                && entry.path().is_dir()
            {
                eprintln!(
                    "mesh-tests: removing stale cgroup {}",
                    entry.path().display()
                );
                remove_cgroup_tree(&entry.path());
            }
        }
    }
}

/// Unmounts every bpffs mounted below `dir` (the agents' `--bpffs-path`): the capture
/// they pinned detaches.
pub(crate) fn unmount_bpffs_under(dir: &Path) {
    for mount in bpffs_mounts() {
        if mount.starts_with(dir) {
            unmount(&mount);
        }
    }
}

/// Mount points of bpffs mounts below a `nodemesh-tests` work directory.
fn bpffs_mounts() -> Vec<std::path::PathBuf> {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == "bpf" && point.contains("/nodemesh-tests/")).then(|| point.into())
        })
        .collect()
}

fn unmount(point: &Path) {
    let Ok(path) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: a valid NUL-terminated path; MNT_DETACH never blocks on users of the mount.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        eprintln!(
            "mesh-tests: unmounting {}: {}",
            point.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// Removes a cgroup and its children, deepest first, without killing anything.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    if let Err(e) = cgroup::remove(dir, Duration::ZERO) {
        eprintln!(
            "mesh-tests: cannot remove stale cgroup {} ({e}); processes still in it: {:?}",
            dir.display(),
            cgroup::procs(dir)
        );
    }
}

fn is_dead(pid: i32) -> bool {
    if pid == std::process::id() as i32 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    !alive
}

/// The creator's pid if `name` is exactly `nm-<test>-<pid>-<n>-<fab|n<i>|n<i>p<j>>`:
/// names of the same prefix made by anyone else are not ours to delete.
fn netns_owner(name: &str) -> Option<i32> {
    let parts: Vec<&str> = name.strip_prefix(NETNS_PREFIX)?.split('-').collect();
    let pid = unique_owner(parts.get(..3)?)?;
    let is_node = |part: &str| part.strip_prefix('n').is_some_and(all_digits);
    let is_pod = |part: &str| {
        part.strip_prefix('n')
            .and_then(|rest| rest.split_once('p'))
            .is_some_and(|(i, j)| all_digits(i) && all_digits(j))
    };
    match parts[3..] {
        ["fab"] => Some(pid),
        [node] if is_node(node) => Some(pid),
        [pod] if is_pod(pod) => Some(pid),
        _ => None,
    }
}

/// The creator's pid if `name` is exactly `nodemesh-<test>-<pid>-<n>`.
fn cgroup_owner(name: &str) -> Option<i32> {
    let parts: Vec<&str> = name.strip_prefix(CGROUP_PREFIX)?.split('-').collect();
    if parts.len() != 3 {
        return None;
    }
    unique_owner(&parts)
}

/// `[<test>, <pid>, <n>]` → pid.
fn unique_owner(parts: &[&str]) -> Option<i32> {
    let [test, pid, n] = parts else { return None };
    if test.is_empty() || !test.chars().all(|c| c.is_ascii_alphanumeric()) || !all_digits(n) {
        return None;
    }
    pid.parse().ok().filter(|pid| *pid > 0)
}

fn all_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_only_harness_names() {
        assert_eq!(netns_owner("nm-harness-1234-0-fab"), Some(1234));
        assert_eq!(netns_owner("nm-harness-1234-7-n1"), Some(1234));
        assert_eq!(netns_owner("nm-harness-1234-7-n1p12"), Some(1234));
        assert_eq!(netns_owner("nm-harness-1234-7-n1-n1p12"), None);
        assert_eq!(netns_owner("nm-harness-1234-7"), None);
        assert_eq!(netns_owner("nm-harness-1234-7-other"), None);
        assert_eq!(netns_owner("nm-my-test-1234-7-fab"), None);
        assert_eq!(netns_owner("nmx-node"), None);
        assert_eq!(cgroup_owner("nodemesh-harness-1234-0"), Some(1234));
        assert_eq!(cgroup_owner("nodemesh-smoke"), None);
        assert_eq!(cgroup_owner("nodemesh-harness-1234-0-x"), None);
        assert_eq!(cgroup_owner("nodemesh-harness-abc-0"), None);
    }
}
