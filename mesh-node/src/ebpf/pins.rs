//! Where capture lives between agents: the bpffs directory (`--bpffs-path`).
//!
//! Every link that steers pods (the cgroup programs, each pod's `sk_lookup`) and every map
//! the programs share is pinned here, so it stays in force while no agent runs: a restart,
//! an upgrade or a crash never switches the mesh off for the node's pods. The next agent
//! adopts what it finds. Removing the pins (`mesh-node uninstall`) is what switches capture
//! off; an agent never does it on SIGTERM.
//!
//! Layout: `maps-v<N>/<MAP>` (N changes when a map's key or value layout does: an agent
//! never reads a map written with another layout), `links/<program>` (the cgroup links),
//! `netns/<cookie>` (each enrolled pod's `sk_lookup` link, by netns cookie).
use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::{
    ProgramError, ProgramInfo,
    links::{FdLink, PinnedLink},
    loaded_programs,
};
use tracing::{debug, warn};

use super::loader::CaptureError;

/// The layout of the pinned maps (`mesh_common`'s key and value types). Bump it with any
/// change to them: the next agent then starts on new maps instead of misreading old ones.
const MAP_LAYOUT_VERSION: u32 = 1;
/// `statfs` type of a bpffs (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory of one node's capture.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    /// Opens (creating it) the pin directory at `root`, mounting a bpffs there when `root`
    /// is not on one (a node whose `/sys/fs/bpf` is not mounted, a test's own directory).
    pub fn open(root: &Path) -> Result<Self, CaptureError> {
        let failed = |action: &'static str| {
            move |source| CaptureError::Pins {
                action,
                path: root.to_path_buf(),
                source,
            }
        };
        fs::create_dir_all(root).map_err(failed("creating"))?;
        if !is_bpffs(root).map_err(failed("statfs"))? {
            nix::mount::mount(
                Some("bpf"),
                root,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|errno| failed("mounting a bpffs on")(io::Error::from(errno)))?;
            // A bpffs of our own lives as long as its mount namespace: in a container whose
            // /sys/fs/bpf is not the node's bpffs, capture would go with the container.
            warn!(
                path = %root.display(),
                "no bpffs there: mounted one; capture outlives this agent only if this mount is the node's (mount the node's /sys/fs/bpf into the agent)"
            );
        }
        let pins = Self {
            root: root.to_path_buf(),
        };
        for dir in [pins.maps_dir(), pins.root.join("links"), pins.netns_dir()] {
            fs::create_dir_all(&dir).map_err(failed("creating"))?;
        }
        Ok(pins)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn maps_dir(&self) -> PathBuf {
        self.root.join(format!("maps-v{MAP_LAYOUT_VERSION}"))
    }

    fn netns_dir(&self) -> PathBuf {
        self.root.join("netns")
    }

    /// Where the map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Where the cgroup link of `program` is pinned.
    pub fn cgroup_link(&self, program: &str) -> PathBuf {
        self.root.join("links").join(program)
    }

    /// Where the `sk_lookup` link of the pod whose netns has `cookie` is pinned.
    pub fn netns_link(&self, cookie: u64) -> PathBuf {
        self.netns_dir().join(cookie.to_string())
    }

    /// The netns cookies that have a pinned `sk_lookup` link.
    pub fn pinned_netns(&self) -> Vec<u64> {
        let Ok(entries) = fs::read_dir(self.netns_dir()) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Removes every pin: what only the pins kept attached (links nobody else holds)
    /// detaches, the maps go with their last user. The directory itself stays (it may be a
    /// mount point).
    pub fn remove_all(&self) -> io::Result<()> {
        remove_contents(&self.root)
    }
}

/// Removes what `dir` holds, depth first, except the kernel's own entries (a bpffs root
/// holds `maps.debug` and `progs.debug`; a dot marks names only the kernel makes).
fn remove_contents(dir: &Path) -> io::Result<()> {
    let with_path = |path: &Path| {
        let path = path.display().to_string();
        move |error: io::Error| io::Error::new(error.kind(), format!("{path}: {error}"))
    };
    for entry in fs::read_dir(dir).map_err(with_path(dir))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().contains('.') {
            continue;
        }
        let path = entry.path();
        if fs::symlink_metadata(&path)
            .map_err(with_path(&path))?
            .is_dir()
        {
            remove_contents(&path)?;
            fs::remove_dir(&path).map_err(with_path(&path))?;
        } else {
            fs::remove_file(&path).map_err(with_path(&path))?;
        }
    }
    Ok(())
}

/// What makes a loaded program the same as another: the kernel's hash of its
/// instructions (its tag, which leaves out which maps they name) and the maps it uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramPrint {
    tag: u64,
    maps: Vec<u32>,
}

impl ProgramPrint {
    pub fn of(info: Result<ProgramInfo, ProgramError>) -> Result<Self, CaptureError> {
        let info = info?;
        let mut maps = info.map_ids()?.unwrap_or_default();
        maps.sort_unstable();
        Ok(Self {
            tag: info.tag(),
            maps,
        })
    }
}

/// Whether the pinned link at `path` runs a program like `print` (same instructions, same
/// maps): then the capture in force is this agent's own and is adopted as it is. A program
/// of another version, or one on maps of another layout, is replaced. `judged` remembers the
/// answer by program id: the links of every pod an earlier agent enrolled run one program,
/// looked up once rather than once per pod (a walk over every program of the machine).
pub fn pinned_link_runs(
    path: &Path,
    print: &ProgramPrint,
    judged: &mut HashMap<u32, bool>,
) -> bool {
    let Ok(link) = PinnedLink::from_pin(path) else {
        return false;
    };
    let Ok(info) = FdLink::from(link).info() else {
        return false;
    };
    let id = info.program_id();
    *judged.entry(id).or_insert_with(|| {
        loaded_programs()
            .filter_map(Result::ok)
            .find(|program| program.id() == id)
            .and_then(|program| ProgramPrint::of(Ok(program)).ok())
            .is_some_and(|pinned| pinned == *print)
    })
}

/// Pins `link` at `path`, replacing what was pinned there in one step: the new link is
/// attached before the old one's pin goes (make before break), so no connection is ever
/// made with neither in force. The old link detaches when its pin was its last holder.
pub fn pin_replacing(link: FdLink, path: &Path) -> Result<(), CaptureError> {
    // bpffs refuses names with a dot (reserved by the kernel).
    let mut staging = path.as_os_str().to_owned();
    staging.push("-new");
    let staging = PathBuf::from(staging);
    let _ = fs::remove_file(&staging);
    link.pin(&staging)
        .map_err(|error| CaptureError::Pin(path.to_path_buf(), error))?;
    fs::rename(&staging, path).map_err(|source| CaptureError::Pins {
        action: "renaming into place",
        path: path.to_path_buf(),
        source,
    })?;
    debug!(pin = %path.display(), "link pinned");
    Ok(())
}

/// Removes the pin at `path`: the link detaches (nothing else holds it).
pub fn unpin(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => debug!(pin = %path.display(), "link unpinned"),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => debug!(pin = %path.display(), %error, "unpinning failed"),
    }
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let stat = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    #[expect(clippy::useless_conversion, reason = "the type differs across libcs")]
    let kind = i64::from(stat.filesystem_type().0);
    Ok(kind == BPF_FS_MAGIC)
}
