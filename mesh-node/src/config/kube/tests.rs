//! The kube source against a scripted API server (kube-rs' `tower-test` pattern): the client
//! talks to a mock service, and [`FakeApiServer`] answers its lists and watches the way the
//! API server does (lists with a resourceVersion, watches as newline-delimited events after
//! it, `410 Gone` when a watch expired, `404` for a CRD that is not installed).
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
    sync::Arc,
    time::Duration,
};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::*;
use crate::{
    config::file::FileSource,
    inventory::ObjectKey,
    metrics::Metrics,
    readiness::Readiness,
    state::{State, StateRx},
};

/// How long a watch is held open with nothing to say before it ends (the client re-watches).
const WATCH_HOLD: Duration = Duration::from_millis(500);
const WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Store {
    revision: u64,
    /// plural → (namespace, name) → object.
    objects: HashMap<&'static str, BTreeMap<(String, String), Value>>,
    /// plural → (revision, event type, object), for watches.
    events: HashMap<&'static str, Vec<(u64, &'static str, Value)>>,
    /// Plurals whose next watch answers `410 Gone` (the client must relist).
    expire_next_watch: HashSet<&'static str>,
    /// Plurals the server does not serve (a CRD not installed).
    missing: HashSet<&'static str>,
    /// How long a list takes to answer, to make a relist observable.
    list_delay: Duration,
    lists_served: HashMap<&'static str, usize>,
    /// Every plural a request asked for.
    requested: HashSet<&'static str>,
    /// Every path a request asked for.
    paths: HashSet<String>,
}

#[derive(Clone, Default)]
struct FakeApiServer {
    store: Arc<Mutex<Store>>,
}

fn kind_of(object: &Value) -> &'static WatchedKind {
    let kind = object["kind"].as_str().expect("objects have a kind");
    WATCHED_KINDS
        .iter()
        .find(|k| k.kind == kind)
        .unwrap_or_else(|| panic!("{kind} is not watched"))
}

fn key_of(object: &Value) -> (String, String) {
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().expect("a name");
    (namespace.to_string(), name.to_string())
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("JSON")))
        .expect("a response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
           "code": code, "reason": reason, "message": message})
}

impl FakeApiServer {
    /// A client whose requests this server answers, for as long as the test runs.
    fn start(&self) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let server = server.clone();
                tokio::spawn(async move { send.send_response(server.respond(request).await) });
            }
        });
        kube::Client::new(service, "default")
    }

    fn seed(&self, objects: impl IntoIterator<Item = Value>) {
        for object in objects {
            self.apply(object);
        }
    }

    fn apply(&self, mut object: Value) {
        let mut store = self.store.lock();
        store.revision += 1;
        let revision = store.revision;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        let plural = kind_of(&object).plural;
        let previous = store
            .objects
            .entry(plural)
            .or_default()
            .insert(key_of(&object), object.clone());
        let event = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store
            .events
            .entry(plural)
            .or_default()
            .push((revision, event, object));
    }

    fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let mut store = self.store.lock();
        store.revision += 1;
        let revision = store.revision;
        let plural = WATCHED_KINDS
            .iter()
            .find(|k| k.kind == kind)
            .unwrap()
            .plural;
        let key = (namespace.to_string(), name.to_string());
        let mut object = store
            .objects
            .get_mut(plural)
            .and_then(|o| o.remove(&key))
            .expect("deleting an object that exists");
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        store
            .events
            .entry(plural)
            .or_default()
            .push((revision, "DELETED", object));
    }

    fn lists_served(&self, plural: &str) -> usize {
        let store = self.store.lock();
        store.lists_served.get(plural).copied().unwrap_or(0)
    }

    async fn respond(&self, request: Request<Body>) -> Response<Body> {
        let path = request.uri().path().to_string();
        let query: HashMap<String, String> = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let Some(kind) = WATCHED_KINDS
            .iter()
            .find(|k| path.ends_with(&format!("/{}", k.plural)))
        else {
            return json_response(StatusCode::NOT_FOUND, &status(404, "NotFound", &path));
        };
        self.store.lock().requested.insert(kind.plural);
        self.store.lock().paths.insert(path.clone());
        if self.store.lock().missing.contains(kind.plural) {
            let message = "the server could not find the requested resource";
            return json_response(StatusCode::NOT_FOUND, &status(404, "NotFound", message));
        }
        if query.get("watch").map(String::as_str) == Some("true") {
            let since = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            self.watch(kind, since).await
        } else {
            self.list(kind).await
        }
    }

    async fn list(&self, kind: &WatchedKind) -> Response<Body> {
        let delay = self.store.lock().list_delay;
        tokio::time::sleep(delay).await;
        let mut store = self.store.lock();
        *store.lists_served.entry(kind.plural).or_default() += 1;
        let items: Vec<Value> = store
            .objects
            .get(kind.plural)
            .map(|o| o.values().cloned().collect())
            .unwrap_or_default();
        let list = json!({
            "apiVersion": kind.api_version,
            "kind": format!("{}List", kind.kind),
            "metadata": {"resourceVersion": store.revision.to_string()},
            "items": items,
        });
        json_response(StatusCode::OK, &list)
    }

    /// Events after `since`, as soon as there are any; an empty answer after [`WATCH_HOLD`].
    async fn watch(&self, kind: &WatchedKind, since: u64) -> Response<Body> {
        let deadline = tokio::time::Instant::now() + WATCH_HOLD;
        let mut lines = Vec::new();
        while tokio::time::Instant::now() < deadline {
            {
                let mut store = self.store.lock();
                if store.expire_next_watch.remove(kind.plural) {
                    let gone = status(410, "Expired", "too old resource version");
                    lines.push(json!({"type": "ERROR", "object": gone}));
                    break;
                }
                let events = store.events.get(kind.plural).into_iter().flatten();
                lines.extend(
                    events
                        .filter(|(revision, ..)| *revision > since)
                        .map(|(_, event, object)| json!({"type": event, "object": object})),
                );
            }
            if !lines.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut body = Vec::new();
        for line in lines {
            serde_json::to_writer(&mut body, &line).expect("JSON");
            body.push(b'\n');
        }
        Response::new(Body::from(body))
    }
}

/// A running kube source fed by `api`.
struct Running {
    state: StateRx,
    readiness: Readiness,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn start(api: &FakeApiServer) -> Running {
    start_with(api, |source| source)
}

/// A running kube source fed by `api`, set up by `configure`.
fn start_with(api: &FakeApiServer, configure: impl FnOnce(KubeSource) -> KubeSource) -> Running {
    let (tx, state) = watch::channel(Arc::new(State::default()));
    let readiness = Readiness::default();
    let ready = readiness.register("config");
    let shutdown = CancellationToken::new();
    let source = configure(KubeSource::new(
        api.start(),
        crate::policy::DEFAULT_ROOT_NAMESPACE,
    ));
    let metrics = Metrics::new().expect("metrics").node;
    tokio::spawn(source.run(tx, metrics, ready, shutdown.clone()));
    Running {
        state,
        readiness,
        shutdown,
    }
}

impl Running {
    /// Waits until the published state satisfies `check`; panics with `what` after [`WAIT`].
    async fn wait_for(&mut self, what: &str, check: impl Fn(&State) -> bool) -> Arc<State> {
        let waited = tokio::time::timeout(WAIT, async {
            loop {
                let state = self.state.borrow_and_update().clone();
                if self.readiness.pending().is_empty() && check(&state) {
                    return state;
                }
                self.state.changed().await.expect("the source is running");
            }
        })
        .await;
        waited.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }
}

fn namespace(name: &str, enrolled: bool) -> Value {
    let labels = if enrolled {
        json!({"nodemesh.io/enabled": "true"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(namespace: &str, name: &str, ip: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                     "labels": {"app": "web"},
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "spec": {"nodeName": node, "serviceAccountName": "web",
                 "containers": [{"name": "app", "image": "web:1", "env": [{"name": "A", "value": "b"}],
                                 "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

fn service(namespace: &str, name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": cluster_ip, "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

/// An EndpointSlice of `service` listing `(pod, ready)`.
fn slice(namespace: &str, service: &str, pods: &[(&str, &str, bool)]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(pod, ip, ready)| {
            json!({"addresses": [ip], "conditions": {"ready": ready},
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080}],
    })
}

fn virtual_service(namespace: &str, host: &str, timeout: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": host, "namespace": namespace},
        "spec": {"hosts": [host], "http": [{"timeout": timeout, "route": [{"destination": {"host": host}}]}]},
    })
}

fn enrolled(state: &State, namespace: &str, name: &str) -> Option<bool> {
    state
        .workloads
        .get(&ObjectKey::new(namespace, name))
        .map(|w| w.enrolled)
}

fn endpoints(state: &State, namespace: &str, name: &str) -> Vec<String> {
    state
        .services
        .get(&ObjectKey::new(namespace, name))
        .map(|s| s.endpoints.iter().map(|e| e.name.clone()).collect())
        .unwrap_or_default()
}

/// The `timeout` the route for `host` carries, as the routes summary shows it.
fn route_summary(state: &State) -> String {
    serde_json::to_string(&state.routes.summary()).expect("JSON")
}

#[tokio::test]
async fn the_initial_list_becomes_the_state_and_readiness_waits_for_it() {
    let api = FakeApiServer::default();
    api.store.lock().list_delay = Duration::from_millis(300);
    api.seed([
        namespace("shop", true),
        pod("shop", "web-1", "10.0.0.1", "node-a"),
        pod("shop", "web-2", "10.0.1.1", "node-b"),
        service("shop", "web", "10.96.0.10"),
        slice(
            "shop",
            "web",
            &[("web-1", "10.0.0.1", true), ("web-2", "10.0.1.1", true)],
        ),
    ]);
    let mut running = start(&api);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        running.readiness.pending(),
        ["config"],
        "not ready before every kind has listed"
    );
    let state = running
        .wait_for("the initial state", |s| s.workloads.len() == 2)
        .await;
    assert_eq!(enrolled(&state, "shop", "web-1"), Some(true));
    let web = &state.workloads[&ObjectKey::new("shop", "web-2")];
    assert_eq!(web.node, "node-b");
    assert_eq!(web.service_account, "web");
    assert_eq!(web.named_ports.get("http"), Some(&8080));
    assert_eq!(endpoints(&state, "shop", "web"), ["web-1", "web-2"]);
    assert!(state.service_by_ip("10.96.0.10".parse().unwrap()).is_some());
    assert_eq!(
        state.origin_of("Pod", &ObjectKey::new("shop", "web-1")),
        Some(ORIGIN)
    );
    assert!(state.rejections.is_empty(), "{:?}", state.rejections);
}

#[tokio::test]
async fn a_namespace_label_enrolls_and_unenrolls_its_pods_and_a_deleted_pod_is_gone() {
    let api = FakeApiServer::default();
    api.seed([
        namespace("shop", false),
        pod("shop", "web-1", "10.0.0.1", "node-a"),
        pod("shop", "web-2", "10.0.0.2", "node-a"),
    ]);
    let mut running = start(&api);
    running
        .wait_for("pods, not enrolled", |s| {
            enrolled(s, "shop", "web-1") == Some(false)
        })
        .await;

    api.apply(namespace("shop", true));
    let state = running
        .wait_for("the label to enroll the pods", |s| {
            enrolled(s, "shop", "web-1") == Some(true)
        })
        .await;
    assert_eq!(state.enrolled_on("node-a").count(), 2);

    api.apply(namespace("shop", false));
    running
        .wait_for("the label's removal to un-enroll them", |s| {
            s.enrolled_on("node-a").count() == 0 && s.workloads.len() == 2
        })
        .await;

    api.delete("Pod", "shop", "web-2");
    let state = running
        .wait_for("the deleted pod to go", |s| {
            enrolled(s, "shop", "web-2").is_none()
        })
        .await;
    assert_eq!(enrolled(&state, "shop", "web-1"), Some(false));
}

#[tokio::test]
async fn an_expired_watch_relists_without_losing_or_flapping_the_state() {
    let api = FakeApiServer::default();
    api.seed([
        namespace("shop", true),
        pod("shop", "web-1", "10.0.0.1", "node-a"),
    ]);
    let mut running = start(&api);
    running
        .wait_for("the pod", |s| enrolled(s, "shop", "web-1") == Some(true))
        .await;

    // Record every state published from now on: none may lack the pod while the relist
    // (slowed down, so a state published mid-relist would show) is in flight.
    let mut observer = running.state.clone();
    let flapped = Arc::new(Mutex::new(Vec::new()));
    let seen = flapped.clone();
    tokio::spawn(async move {
        while observer.changed().await.is_ok() {
            let state = observer.borrow_and_update().clone();
            if enrolled(&state, "shop", "web-1").is_none() {
                seen.lock().push(state.workloads.len());
            }
        }
    });
    let lists_before = api.lists_served("pods");
    {
        let mut store = api.store.lock();
        store.list_delay = Duration::from_millis(300);
        store.expire_next_watch.insert("pods");
    }
    // A change made while the watch is gone arrives with the relist.
    api.apply(pod("shop", "web-2", "10.0.0.2", "node-a"));
    running
        .wait_for("the relisted state with the new pod", |s| {
            enrolled(s, "shop", "web-2") == Some(true)
        })
        .await;
    assert!(
        api.lists_served("pods") > lists_before,
        "the source relisted"
    );
    // Later changes still arrive: the watch resumed.
    api.delete("Pod", "shop", "web-2");
    running
        .wait_for("a change after the relist", |s| {
            enrolled(s, "shop", "web-2").is_none()
        })
        .await;
    assert!(
        flapped.lock().is_empty(),
        "states without the pod were published: {:?}",
        flapped.lock()
    );
}

#[tokio::test]
async fn endpoint_slice_changes_update_the_service_endpoints() {
    let api = FakeApiServer::default();
    api.seed([
        namespace("shop", true),
        pod("shop", "web-1", "10.0.0.1", "node-a"),
        pod("shop", "web-2", "10.0.1.1", "node-b"),
        service("shop", "web", "10.96.0.10"),
        slice("shop", "web", &[("web-1", "10.0.0.1", true)]),
    ]);
    let mut running = start(&api);
    running
        .wait_for("one endpoint", |s| endpoints(s, "shop", "web") == ["web-1"])
        .await;
    // Both pods match the selector; the slice, not the selector, says who serves.
    api.apply(slice(
        "shop",
        "web",
        &[("web-1", "10.0.0.1", false), ("web-2", "10.0.1.1", true)],
    ));
    running
        .wait_for("web-1 not ready, web-2 added", |s| {
            endpoints(s, "shop", "web") == ["web-2"]
        })
        .await;
    api.delete("EndpointSlice", "shop", "web-abcde");
    // Without slices the selector decides, as for the file source.
    running
        .wait_for("the selector's endpoints", |s| {
            endpoints(s, "shop", "web") == ["web-1", "web-2"]
        })
        .await;
}

#[tokio::test]
async fn an_invalid_virtual_service_is_rejected_and_the_old_one_kept() {
    let api = FakeApiServer::default();
    let host = "web.shop.svc.cluster.local";
    api.seed([
        namespace("shop", true),
        service("shop", "web", "10.96.0.10"),
        virtual_service("shop", host, "3s"),
    ]);
    let mut running = start(&api);
    let before = running
        .wait_for("the route", |s| !s.routes.summary().is_empty())
        .await;
    let good = route_summary(&before);

    api.apply(virtual_service("shop", host, "soon"));
    let state = running
        .wait_for("the rejection", |s| !s.rejections.is_empty())
        .await;
    let rejection = &state.rejections[0];
    assert_eq!(rejection.resource, format!("VirtualService shop/{host}"));
    assert_eq!(rejection.origin, ORIGIN);
    assert!(rejection.error.contains("timeout"), "{}", rejection.error);
    assert_eq!(route_summary(&state), good, "the last good route stays");

    // Other changes still apply while the bad one stays refused.
    api.apply(pod("shop", "web-1", "10.0.0.1", "node-a"));
    let state = running
        .wait_for("the new pod", |s| enrolled(s, "shop", "web-1").is_some())
        .await;
    assert_eq!(route_summary(&state), good);
    assert_eq!(state.rejections.len(), 1);
}

#[tokio::test]
async fn a_cluster_without_the_istio_and_gateway_crds_still_syncs() {
    let api = FakeApiServer::default();
    {
        let mut store = api.store.lock();
        store.missing.extend(
            WATCHED_KINDS
                .iter()
                .filter(|k| k.is_optional())
                .map(|k| k.plural),
        );
    }
    api.seed([
        namespace("shop", true),
        pod("shop", "web-1", "10.0.0.1", "node-a"),
    ]);
    let mut running = start(&api);
    running
        .wait_for("readiness without the CRDs", |s| s.workloads.len() == 1)
        .await;
}

#[tokio::test]
async fn a_source_for_pods_only_asks_for_nothing_else() {
    let api = FakeApiServer::default();
    api.seed([
        namespace("shop", true),
        pod("shop", "web-1", "10.0.0.1", "node-a"),
        service("shop", "web", "10.96.0.10"),
    ]);
    let mut running = start_with(&api, |source| source.only(&["Pod"]));
    let state = running
        .wait_for("the pods", |s| s.workloads.len() == 1)
        .await;
    assert!(state.services.is_empty() && state.namespaces.is_empty());
    assert_eq!(api.store.lock().requested, HashSet::from(["pods"]));
}

#[tokio::test]
async fn agents_never_ask_for_secrets_and_a_gateway_only_for_those_of_its_namespace() {
    use base64::Engine as _;
    let encode = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let api = FakeApiServer::default();
    api.seed([
        namespace("shop", true),
        pod("shop", "web-1", "10.0.0.1", "node-a"),
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "Gateway",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"istio": "ingressgateway"}, "servers": [{
                "port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                "hosts": ["web.example.com"],
                "tls": {"mode": "SIMPLE", "credentialName": "web-credential"},
            }]},
        }),
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "web-credential", "namespace": "istio-system"},
            "data": {"tls.crt": encode("certificate"), "tls.key": encode("key"), "other": encode("x")},
        }),
    ]);
    let mut agent = start(&api);
    agent
        .wait_for("the agent's state", |s| s.workloads.len() == 1)
        .await;
    let requested = api.store.lock().requested.clone();
    assert!(
        !requested.contains("secrets") && !requested.contains("gateways"),
        "{requested:?}"
    );

    let mut gateway = start_with(&api, |source| source.for_gateway("istio-system"));
    let state = gateway
        .wait_for("the Gateway and its Secret", |s| {
            s.gateways.len() == 1 && s.secrets.len() == 1
        })
        .await;
    let secret = &state.secrets[&ObjectKey::new("istio-system", "web-credential")];
    let shown = format!("{secret:?}");
    assert!(
        shown.contains(r#"entries: ["tls.crt", "tls.key"]"#) && !shown.contains("certificate"),
        "only the entries a gateway reads are kept, and never shown: {shown}"
    );
    let paths = api.store.lock().paths.clone();
    assert!(
        paths.contains("/api/v1/namespaces/istio-system/secrets"),
        "{paths:?}"
    );
    assert!(!paths.contains("/api/v1/secrets"), "{paths:?}");
}

#[test]
fn pods_are_kept_as_what_the_mesh_reads_of_them() {
    let object: WatchedObject =
        serde_json::from_value(pod("shop", "web-1", "10.0.0.1", "n")).unwrap();
    let (_, document) = classify_object(&WATCHED_KINDS[1], object);
    let Document::Object(Object::Pod(pod)) = document else {
        panic!("a pod");
    };
    assert_eq!(pod.key, ObjectKey::new("shop", "web-1"));
    assert_eq!(pod.named_ports.get("http"), Some(&8080));
    assert_eq!(
        (pod.node.as_str(), pod.ips.len(), pod.ready),
        ("n", 1, true)
    );
}

/// Every YAML document in the shared fixture set, as the API server would hold it.
fn fixture_objects(dir: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(document).unwrap();
            if !value.is_null() {
                objects.push(value);
            }
        }
    }
    objects
}

/// What two sources must agree on: everything the agent reads, origins of refusals aside.
fn normalized(state: &State) -> Value {
    let rejections: Vec<(String, String)> = state
        .rejections
        .iter()
        .map(|r| (r.resource.clone(), r.error.clone()))
        .collect();
    json!({
        "namespaces": state.namespaces,
        "workloads": state.workloads.values().collect::<Vec<_>>(),
        "services": state.services.values().collect::<Vec<_>>(),
        "policies": format!("{:?}", state.policies),
        "routes": state.routes.summary(),
        "rejections": rejections,
    })
}

#[tokio::test]
async fn the_file_source_and_the_kube_source_agree_on_the_shared_fixtures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/cluster");
    let (tx, rx) = watch::channel(Arc::new(State::default()));
    let metrics = Metrics::new().unwrap().node;
    FileSource::new(&dir, crate::policy::DEFAULT_ROOT_NAMESPACE)
        .publish(&tx, &metrics)
        .unwrap();
    let from_files = rx.borrow().clone();
    assert!(
        from_files.workloads.len() >= 4 && !from_files.routes.summary().is_empty(),
        "the fixtures exercise pods and routes"
    );
    assert_eq!(
        from_files.rejections.len(),
        1,
        "the fixtures hold exactly one bad resource: {:?}",
        from_files.rejections
    );

    let api = FakeApiServer::default();
    api.seed(fixture_objects(&dir));
    let mut running = start(&api);
    let expected = normalized(&from_files);
    let from_api = running
        .wait_for("the fixtures", |s| {
            s.workloads.len() == from_files.workloads.len()
        })
        .await;
    assert_eq!(normalized(&from_api), expected);
}
