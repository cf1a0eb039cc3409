//! Installing the plugin on the node: the binary into the CNI bin dir, an entry at the end
//! of the chain kubelet uses.
//!
//! Kubelet (libcni) uses the first file of the CNI conf dir in lexical order among
//! `*.conf`, `*.conflist` and `*.json`; the entry goes into that one. A single-plugin
//! `.conf` is turned into a `.conflist` (a chain needs a list), and turned back on
//! uninstall. Every write is atomic (a hidden temporary file, then a rename), so the
//! runtime never reads half a config, and the rest of the file is kept as it was, key
//! order included.
//!
//! The agent installs at start and keeps the entry there ([`keep_installed`]): main plugins
//! such as Calico rewrite their conflist when they restart. It never uninstalls on exit: a
//! rolling update of the agent would let pods start uncaptured in between.
use std::{
    ffi::OsStr,
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cli::CniConfig;

/// The plugin's `type` in the chain, and its binary's name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "nodemesh-cni";
/// How often the entry is checked (and put back if a main plugin rewrote its config).
const RECHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Where a converted `.conf` came from, kept in the entry so uninstall can turn it back.
const CONVERTED_FROM_KEY: &str = "convertedFrom";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("no CNI network config (*.conf, *.conflist, *.json) in {0} yet")]
    NoNetworkConfig(PathBuf),
    #[error("{path}: {reason}")]
    BadNetworkConfig { path: PathBuf, reason: String },
}

/// What to install and where.
#[derive(Clone, Debug)]
pub struct Installation {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The `agentSocket` the entry points the plugin at.
    pub agent_socket: PathBuf,
    /// The executable copied in as the plugin; `None`: the running agent's own. The image
    /// ships a static build for this, since the runtime runs the plugin on the host, with
    /// the host's C library.
    pub plugin_binary: Option<PathBuf>,
}

impl Installation {
    /// What `mesh-node run --cni-bin-dir .. --cni-conf-dir .. --cni-socket ..` asks for;
    /// `None` when not installing (clap requires the three together).
    pub fn from_flags(flags: &CniConfig) -> Option<Self> {
        Some(Self {
            bin_dir: flags.bin_dir.clone()?,
            conf_dir: flags.conf_dir.clone()?,
            agent_socket: flags.socket.clone()?,
            plugin_binary: flags.plugin_binary.clone(),
        })
    }

    /// The chain entry this agent wants.
    fn entry(&self) -> Map<String, Value> {
        let entry = json!({
            "type": PLUGIN_TYPE,
            "agentSocket": self.agent_socket,
            "agentTimeout": "10s",
            "onAgentUnavailable": "fail",
        });
        match entry {
            Value::Object(map) => map,
            _ => unreachable!("a JSON object literal"),
        }
    }
}

/// Copies the running executable to `<bin_dir>/nodemesh-cni` and adds the entry to the
/// chain; returns the config file holding it. Idempotent.
pub fn install(installation: &Installation) -> Result<PathBuf, InstallError> {
    install_binary(installation)?;
    install_entry(installation)
}

/// Removes the entry (turning a converted `.conf` back) and the binary. Idempotent.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<(), InstallError> {
    for path in config_files(conf_dir)? {
        let mut config = read_config(&path)?;
        let Some(plugins) = config.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let Some(position) = plugins.iter().position(is_our_entry) else {
            continue;
        };
        let ours = plugins.remove(position);
        let converted_from = ours.get(CONVERTED_FROM_KEY).and_then(Value::as_str);
        match (converted_from, plugins.as_slice()) {
            (Some(file_name), [only]) => {
                // Back to the single-plugin file it was.
                let mut single = only.as_object().cloned().unwrap_or_default();
                for key in ["name", "cniVersion"] {
                    if let Some(value) = config.get(key) {
                        single.insert(key.into(), value.clone());
                    }
                }
                write_atomically(&conf_dir.join(file_name), &Value::Object(single))?;
                remove_file(&path)?;
            }
            _ => write_atomically(&path, &Value::Object(config))?,
        }
        info!(config = %path.display(), "CNI chain entry removed");
    }
    remove_file(&bin_dir.join(PLUGIN_TYPE))
}

/// Installs, then checks the entry every few seconds until `shutdown`: the main plugin may
/// write its config only after the agent started, or rewrite it without the entry.
pub async fn keep_installed(installation: Installation, shutdown: CancellationToken) {
    let mut binary_installed = false;
    loop {
        let result = if binary_installed {
            install_entry(&installation)
        } else {
            install(&installation)
        };
        match result {
            Ok(path) => {
                binary_installed = true;
                debug!(config = %path.display(), "CNI chain entry in place");
            }
            Err(error) => warn!(%error, "CNI plugin not installed; will retry"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RECHECK_INTERVAL) => {}
        }
    }
}

fn install_binary(installation: &Installation) -> Result<(), InstallError> {
    let bin_dir = &installation.bin_dir;
    let source = match &installation.plugin_binary {
        Some(binary) => binary.clone(),
        None => std::env::current_exe().map_err(|source| InstallError::Io {
            action: "finding",
            path: "the running executable".into(),
            source,
        })?,
    };
    let target = bin_dir.join(PLUGIN_TYPE);
    let temp = bin_dir.join(format!(".{PLUGIN_TYPE}.{}.tmp", std::process::id()));
    fs::create_dir_all(bin_dir).map_err(io_error("creating", bin_dir))?;
    fs::copy(&source, &temp).map_err(io_error("copying the agent to", &temp))?;
    fs::set_permissions(&temp, fs::Permissions::from_mode(0o755))
        .map_err(io_error("chmod", &temp))?;
    fs::rename(&temp, &target).map_err(io_error("renaming into", &target))?;
    info!(binary = %target.display(), "CNI plugin binary installed");
    Ok(())
}

/// Adds (or updates, or moves to the end) the entry in the config kubelet uses.
fn install_entry(installation: &Installation) -> Result<PathBuf, InstallError> {
    let conf_dir = &installation.conf_dir;
    let path = config_files(conf_dir)?
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoNetworkConfig(conf_dir.clone()))?;
    let mut config = read_config(&path)?;
    let mut entry = installation.entry();
    let (target, converted) = if config.contains_key("plugins") {
        (path.clone(), false)
    } else {
        // A single plugin: the same config as a one-element chain, under the same stem so
        // it keeps its place in the lexical order.
        let file_name = path.file_name().unwrap_or_default().to_string_lossy();
        entry.insert(CONVERTED_FROM_KEY.into(), file_name.into_owned().into());
        config = to_conflist(config);
        (path.with_extension("conflist"), true)
    };
    let plugins = config
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| InstallError::BadNetworkConfig {
            path: path.clone(),
            reason: "\"plugins\" is not a list".into(),
        })?;
    if let Some(position) = plugins.iter().position(is_our_entry) {
        let ours = plugins.remove(position);
        // Keep what a converted file remembered.
        if let Some(from) = ours.get(CONVERTED_FROM_KEY) {
            entry.insert(CONVERTED_FROM_KEY.into(), from.clone());
        }
        if position == plugins.len() && ours == Value::Object(entry.clone()) {
            return Ok(path); // already last and current: nothing to write
        }
    }
    plugins.push(Value::Object(entry));
    write_atomically(&target, &Value::Object(config))?;
    if converted {
        remove_file(&path)?;
    }
    info!(config = %target.display(), "CNI chain entry installed");
    Ok(target)
}

/// `{cniVersion, name, plugins: [the rest]}` from a single-plugin config.
fn to_conflist(mut single: Map<String, Value>) -> Map<String, Value> {
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = single.remove(key) {
            list.insert(key.into(), value);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(single)]));
    list
}

fn is_our_entry(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// The network config files of `conf_dir`, in the order libcni considers them.
fn config_files(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let entries = match fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(io_error("listing", conf_dir)(source)),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let extension = p.extension().and_then(OsStr::to_str);
            matches!(extension, Some("conf" | "conflist" | "json")) && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

fn read_config(path: &Path) -> Result<Map<String, Value>, InstallError> {
    let text = fs::read(path).map_err(io_error("reading", path))?;
    match serde_json::from_slice(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(InstallError::BadNetworkConfig {
            path: path.into(),
            reason: "not a JSON object".into(),
        }),
        Err(error) => Err(InstallError::BadNetworkConfig {
            path: path.into(),
            reason: error.to_string(),
        }),
    }
}

/// Writes under a hidden name libcni ignores, then renames over `path`.
fn write_atomically(path: &Path, config: &Value) -> Result<(), InstallError> {
    let mut text = serde_json::to_vec_pretty(config).expect("JSON values always serialize");
    text.push(b'\n');
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = path.with_file_name(format!(".{file_name}.nodemesh.tmp"));
    fs::write(&temp, text).map_err(io_error("writing", &temp))?;
    fs::rename(&temp, path).map_err(io_error("renaming into", path))
}

fn remove_file(path: &Path) -> Result<(), InstallError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error("removing", path)(e)),
        _ => Ok(()),
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests;
