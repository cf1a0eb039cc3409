//! The uninstall decision against a scripted API server (kube-rs' `tower-test` pattern).
use std::fs;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

use super::*;
use crate::cni::install::{PLUGIN_TYPE, install};

const DAEMON_SET_PATH: &str = "/apis/apps/v1/namespaces/nodemesh-system/daemonsets/nodemesh-node";

/// A client whose one request (the DaemonSet's GET) gets `status` and `body`.
fn api_answering(status: StatusCode, body: Value) -> Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        let (request, send) = handle.next_request().await.expect("a request");
        assert_eq!(request.method(), http::Method::GET);
        assert_eq!(request.uri().path(), DAEMON_SET_PATH);
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        send.send_response(response);
    });
    Client::new(service, "default")
}

fn daemon_set(deleting: bool) -> Value {
    let mut metadata = json!({"name": "nodemesh-node", "namespace": "nodemesh-system"});
    if deleting {
        metadata["deletionTimestamp"] = json!("2026-11-30T01:00:00Z");
    }
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": metadata,
           "spec": {"selector": {}, "template": {}}})
}

/// A node with the plugin installed into a one-plugin chain.
struct Node {
    _root: tempfile::TempDir,
    installation: Installation,
}

impl Node {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let conf_dir = root.path().join("net.d");
        fs::create_dir_all(&conf_dir).unwrap();
        let chain = json!({"name": "k8s-pod-network", "cniVersion": "1.0.0",
                           "plugins": [{"type": "ptp"}]});
        fs::write(conf_dir.join("10-net.conflist"), chain.to_string()).unwrap();
        let installation = Installation {
            bin_dir: root.path().join("bin"),
            conf_dir,
            agent_socket: "/var/run/nodemesh/cni.sock".into(),
            plugin_binary: None,
        };
        install(&installation).unwrap();
        Self {
            _root: root,
            installation,
        }
    }

    fn installed(&self) -> bool {
        let chain = fs::read_to_string(self.installation.conf_dir.join("10-net.conflist")).unwrap();
        let binary = self.installation.bin_dir.join(PLUGIN_TYPE).exists();
        assert_eq!(
            chain.contains(PLUGIN_TYPE),
            binary,
            "entry and binary go together"
        );
        binary
    }

    fn owner(&self, client: Client) -> CniOwner {
        CniOwner {
            client,
            namespace: "nodemesh-system".into(),
            daemon_set: "nodemesh-node".into(),
            installation: self.installation.clone(),
        }
    }
}

#[tokio::test]
async fn a_rolling_update_keeps_the_plugin() {
    let node = Node::new();
    let owner = node.owner(api_answering(StatusCode::OK, daemon_set(false)));
    assert!(!owner.uninstall_if_removed().await);
    assert!(node.installed());
}

#[tokio::test]
async fn a_deleted_daemon_set_takes_the_plugin_with_it() {
    let node = Node::new();
    let gone = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                      "reason": "NotFound", "code": 404, "message": "not found"});
    let owner = node.owner(api_answering(StatusCode::NOT_FOUND, gone));
    assert!(owner.uninstall_if_removed().await);
    assert!(!node.installed());
}

#[tokio::test]
async fn a_daemon_set_being_deleted_takes_the_plugin_with_it() {
    let node = Node::new();
    let owner = node.owner(api_answering(StatusCode::OK, daemon_set(true)));
    assert!(owner.uninstall_if_removed().await);
    assert!(!node.installed());
}

#[tokio::test]
async fn when_the_api_server_cannot_say_the_plugin_stays() {
    let node = Node::new();
    let error = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                       "reason": "InternalError", "code": 500, "message": "etcd is sad"});
    let owner = node.owner(api_answering(StatusCode::INTERNAL_SERVER_ERROR, error));
    assert!(!owner.uninstall_if_removed().await);
    assert!(node.installed());
}
