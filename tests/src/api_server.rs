//! A scripted Kubernetes API server for agents run with `--config-source kube`: it serves
//! the lists and watches of the objects it was given, over plain HTTP on a node's loopback,
//! and answers `404` for every other kind (as a cluster without Istio's CRDs does). Only the
//! API server may be a stand-in (the agent, its sockets and the kernel are real).
//!
//! Lists return every item in one page with the server's resourceVersion; a watch is held
//! open (chunked) and gets a `MODIFIED` event for each object changed after it began.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    thread,
};

use serde_json::{Value, json};

use crate::Cluster;

/// The core kinds the agent watches, by collection path: listed even when empty.
const CORE_COLLECTIONS: [&str; 4] = [
    "/api/v1/namespaces",
    "/api/v1/pods",
    "/api/v1/services",
    "/apis/discovery.k8s.io/v1/endpointslices",
];

#[derive(Default)]
struct Store {
    revision: u64,
    /// Collection path → its objects.
    collections: HashMap<String, Collection>,
    /// Collection path → the open watches on it.
    watches: HashMap<String, Vec<TcpStream>>,
}

/// The server; it runs until the process ends (its threads only block on its sockets).
pub struct ScriptedApiServer {
    addr: SocketAddr,
    store: Arc<Mutex<Store>>,
}

impl ScriptedApiServer {
    /// Listens on node `node`'s loopback, where that node's agent reaches it.
    ///
    /// # Panics
    /// When it cannot bind.
    pub fn start(cluster: &Cluster, node: usize) -> Self {
        let listener = cluster
            .run_in_node(node, || TcpListener::bind("127.0.0.1:0"))
            .expect("a port for the API server");
        let addr = listener.local_addr().expect("its address");
        let store = Arc::new(Mutex::new(Store {
            collections: CORE_COLLECTIONS
                .iter()
                .map(|path| ((*path).to_owned(), Collection::default()))
                .collect(),
            ..Store::default()
        }));
        let serving = store.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let store = serving.clone();
                thread::spawn(move || serve(&store, stream));
            }
        });
        Self { addr, store }
    }

    /// A kubeconfig for this server (no credentials: it asks for none).
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: scripted\n  cluster: {{server: \
             \"http://{}\"}}\nusers:\n- name: anonymous\n  user: {{}}\ncontexts:\n- name: \
             scripted\n  context: {{cluster: scripted, user: anonymous}}\ncurrent-context: \
             scripted\n",
            self.addr
        );
        std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// Adds `object` (or replaces the one of the same kind, namespace and name) and tells
    /// the watches of its kind.
    pub fn apply(&self, mut object: Value) {
        let path = collection_path(&object);
        let mut store = lock(&self.store);
        store.revision += 1;
        object["metadata"]["resourceVersion"] = json!(store.revision.to_string());
        let collection = store.collections.entry(path.clone()).or_default();
        let name = |field: &str| object["metadata"][field].as_str().unwrap_or("").to_owned();
        let key = (name("namespace"), name("name"));
        let text = object.to_string();
        let event = match collection.index.get(&key) {
            Some(&at) => {
                collection.objects[at] = text;
                "MODIFIED"
            }
            None => {
                collection.index.insert(key, collection.objects.len());
                collection.objects.push(text);
                "ADDED"
            }
        };
        let line = format!("{}\n", json!({"type": event, "object": object}));
        let chunk = format!("{:x}\r\n{line}\r\n", line.len());
        if let Some(watches) = store.watches.get_mut(&path) {
            watches.retain_mut(|stream| stream.write_all(chunk.as_bytes()).is_ok());
        }
    }
}

/// The objects of one kind, in the order they came (as JSON text: a list of 50,000 pods is
/// then joined, not serialized, per request), with where each is by namespace/name.
#[derive(Default)]
struct Collection {
    objects: Vec<String>,
    index: HashMap<(String, String), usize>,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `/api/v1/pods`, `/apis/discovery.k8s.io/v1/endpointslices`: where the agent lists the
/// object's kind cluster-wide.
fn collection_path(object: &Value) -> String {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let plural = format!(
        "{}s",
        object["kind"].as_str().unwrap_or_default().to_lowercase()
    );
    if api_version.contains('/') {
        format!("/apis/{api_version}/{plural}")
    } else {
        format!("/api/{api_version}/{plural}")
    }
}

fn serve(store: &Mutex<Store>, stream: TcpStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut header = String::new();
    while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
        header.clear();
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let watch = query.split('&').any(|pair| pair == "watch=true");
    let mut store = lock(store);
    if !store.collections.contains_key(path) {
        drop(store);
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": "NotFound", "code": 404})
        .to_string();
        respond(&stream, "404 Not Found", &body);
        return;
    }
    if watch {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                    transfer-encoding: chunked\r\n\r\n";
        if (&stream).write_all(head.as_bytes()).is_ok() {
            store
                .watches
                .entry(path.to_owned())
                .or_default()
                .push(stream);
        }
        return;
    }
    let list = format!(
        r#"{{"apiVersion":"v1","kind":"List","metadata":{{"resourceVersion":"{}"}},"items":[{}]}}"#,
        store.revision,
        store.collections[path].objects.join(",")
    );
    drop(store);
    respond(&stream, "200 OK", &list);
}

fn respond(mut stream: &TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
}
