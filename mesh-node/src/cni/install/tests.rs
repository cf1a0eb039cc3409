use std::os::unix::fs::PermissionsExt;

use super::*;

/// A Calico-like chain, keys deliberately not in alphabetical order.
const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "datastore_type": "kubernetes",
      "ipam": { "type": "calico-ipam" },
      "policy": { "type": "k8s" },
      "kubernetes": { "kubeconfig": "/etc/cni/net.d/calico-kubeconfig" }
    },
    { "type": "bandwidth", "capabilities": { "bandwidth": true } },
    { "type": "portmap", "snat": true, "capabilities": { "portMappings": true } }
  ]
}
"#;

const FLANNEL_CONF: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "type": "flannel",
  "delegate": { "hairpinMode": true, "isDefaultGateway": true }
}
"#;

struct Dirs {
    _root: tempfile::TempDir,
    installation: Installation,
}

fn dirs(files: &[(&str, &str)]) -> Dirs {
    let root = tempfile::tempdir().unwrap();
    let conf_dir = root.path().join("net.d");
    fs::create_dir_all(&conf_dir).unwrap();
    for (name, text) in files {
        fs::write(conf_dir.join(name), text).unwrap();
    }
    Dirs {
        installation: Installation {
            bin_dir: root.path().join("bin"),
            conf_dir,
            agent_socket: "/var/run/nodemesh/cni.sock".into(),
            plugin_binary: None,
        },
        _root: root,
    }
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// Key order matters to people diffing the file: compare as text.
fn same_text(a: &Value, b: &Value) -> bool {
    serde_json::to_string(a).unwrap() == serde_json::to_string(b).unwrap()
}

#[test]
fn installs_last_in_the_first_conflist_keeping_the_rest() {
    let dirs = dirs(&[
        ("10-calico.conflist", CALICO),
        ("99-other.conflist", CALICO),
        ("README", "not a config"),
    ]);
    let installed = install(&dirs.installation).expect("install");
    let conf_dir = &dirs.installation.conf_dir;
    assert_eq!(installed, conf_dir.join("10-calico.conflist"));

    let config = read(&installed);
    let plugins = config["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 4);
    assert_eq!(plugins[3]["type"], PLUGIN_TYPE);
    assert_eq!(plugins[3]["agentSocket"], "/var/run/nodemesh/cni.sock");
    // Everything else as it was, in its order.
    let mut without_ours = config.clone();
    without_ours["plugins"].as_array_mut().unwrap().pop();
    assert!(same_text(
        &without_ours,
        &serde_json::from_str(CALICO).unwrap()
    ));
    assert_eq!(
        fs::read_to_string(conf_dir.join("99-other.conflist")).unwrap(),
        CALICO,
        "only the file kubelet uses changes"
    );

    let binary = dirs.installation.bin_dir.join(PLUGIN_TYPE);
    assert_eq!(
        fs::metadata(&binary).unwrap().len(),
        fs::metadata(std::env::current_exe().unwrap())
            .unwrap()
            .len()
    );
    assert_eq!(
        fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let leftovers: Vec<_> = fs::read_dir(conf_dir)
        .unwrap()
        .chain(fs::read_dir(&dirs.installation.bin_dir).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn installing_twice_changes_nothing_and_an_outdated_entry_is_replaced_at_the_end() {
    let dirs = dirs(&[("10-calico.conflist", CALICO)]);
    let path = install(&dirs.installation).unwrap();
    let first = fs::read(&path).unwrap();
    install(&dirs.installation).unwrap();
    assert_eq!(fs::read(&path).unwrap(), first, "idempotent");

    // The main plugin appended after us, and the socket moved: one current entry, last.
    let mut config = read(&path);
    config["plugins"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "type": "tuning" }));
    fs::write(&path, config.to_string()).unwrap();
    let moved = Installation {
        agent_socket: "/run/other.sock".into(),
        ..dirs.installation.clone()
    };
    install(&moved).unwrap();
    let plugins = read(&path)["plugins"].as_array().unwrap().clone();
    let types: Vec<&str> = plugins
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["calico", "bandwidth", "portmap", "tuning", PLUGIN_TYPE]
    );
    assert_eq!(plugins[4]["agentSocket"], "/run/other.sock");
}

#[test]
fn uninstall_restores_the_conflist_and_removes_the_binary() {
    let dirs = dirs(&[("10-calico.conflist", CALICO)]);
    let path = install(&dirs.installation).unwrap();
    let Installation {
        bin_dir, conf_dir, ..
    } = &dirs.installation;
    uninstall(bin_dir, conf_dir).expect("uninstall");
    assert!(same_text(
        &read(&path),
        &serde_json::from_str(CALICO).unwrap()
    ));
    assert!(!bin_dir.join(PLUGIN_TYPE).exists());
    uninstall(bin_dir, conf_dir).expect("uninstalling again is fine");
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist_and_comes_back() {
    let dirs = dirs(&[("10-flannel.conf", FLANNEL_CONF)]);
    let conf_dir = dirs.installation.conf_dir.clone();
    let path = install(&dirs.installation).unwrap();
    assert_eq!(path, conf_dir.join("10-flannel.conflist"));
    assert!(!conf_dir.join("10-flannel.conf").exists());
    let config = read(&path);
    assert_eq!(config["name"], "cbr0");
    assert_eq!(config["cniVersion"], "0.3.1");
    let plugins = config["plugins"].as_array().unwrap();
    assert_eq!(
        plugins[0],
        json!({ "type": "flannel", "delegate": { "hairpinMode": true, "isDefaultGateway": true } })
    );
    assert_eq!(plugins[1]["type"], PLUGIN_TYPE);
    assert_eq!(install(&dirs.installation).unwrap(), path, "idempotent");

    uninstall(&dirs.installation.bin_dir, &conf_dir).unwrap();
    assert!(!path.exists());
    assert_eq!(
        read(&conf_dir.join("10-flannel.conf")),
        serde_json::from_str::<Value>(FLANNEL_CONF).unwrap()
    );
}

#[test]
fn no_network_config_yet_is_an_error_that_says_so() {
    let dirs = dirs(&[]);
    let error = install(&dirs.installation).unwrap_err();
    assert!(matches!(error, InstallError::NoNetworkConfig(_)), "{error}");
    let dirs = self::dirs(&[("10-bad.conflist", "{ not json")]);
    let error = install(&dirs.installation).unwrap_err().to_string();
    assert!(error.contains("10-bad.conflist"), "{error}");
}

#[test]
fn a_given_plugin_binary_is_installed_instead_of_the_agent() {
    let dirs = dirs(&[("10-calico.conflist", CALICO)]);
    let static_build = dirs
        .installation
        .conf_dir
        .with_file_name("static-mesh-node");
    fs::write(&static_build, b"\x7fELF a static build").unwrap();
    let installation = Installation {
        plugin_binary: Some(static_build),
        ..dirs.installation.clone()
    };
    install(&installation).unwrap();
    let installed = installation.bin_dir.join(PLUGIN_TYPE);
    assert_eq!(fs::read(&installed).unwrap(), b"\x7fELF a static build");
    assert_eq!(
        fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
}
