//! The kube config source: watches the API server and publishes the same [`State`] the file
//! source would for the same objects.
//!
//! One kube-rs watcher per kind the mesh understands, all cluster-wide. Each object is
//! classified exactly as a document of the file source is ([`classify`]), so a bad resource is
//! refused alone with its reason and its last good version stays ([`LastGood`]). A relist (a
//! watch that expired, the API server restarting) is buffered and swapped in whole when it
//! completes, so pods never flap out of the state while the list is in flight. Watch errors
//! back off (kube-rs' default backoff) and resume; nothing known is dropped meanwhile. The
//! first state is published once every kind has listed, which is when the agent turns ready.
//!
//! Pods are watched on every node, not just this one: a pod's service account (the identity
//! its peers must present) and labels (DestinationRule subsets, metrics) are needed wherever
//! its callers run, and no EndpointSlice carries them. The pods kept in memory hold only the
//! fields the mesh reads (`config::core`).
use std::{
    borrow::Cow,
    collections::{BTreeMap, HashSet},
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, GroupVersionKind, ObjectMeta},
    core::DynamicResourceScope,
    runtime::{WatchStreamExt, watcher},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, value::RawValue};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    LastGood, Object,
    document::{Document, Tree, TypeMeta, classify},
    publish, without_blocking_the_runtime,
};
use crate::{
    inventory::Rejection, metrics::NodeMetrics, readiness::ReadinessGuard, state::StateTx,
};

/// Changes arriving this close together are published as one state.
const PUBLISH_DELAY: Duration = Duration::from_millis(50);
/// What a rejection names as the origin of an object from the API server.
pub const ORIGIN: &str = "kubernetes API";

/// A kind the mesh watches: `apiVersion`, `kind`, plural resource name.
pub struct WatchedKind {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

/// Every kind the translation understands, at the version the source asks the API server for.
pub const WATCHED_KINDS: [WatchedKind; 16] = [
    watched("v1", "Namespace", "namespaces"),
    watched("v1", "Pod", "pods"),
    watched("v1", "Service", "services"),
    watched("discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
    watched(
        "security.istio.io/v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    watched(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    watched(
        "security.istio.io/v1",
        "RequestAuthentication",
        "requestauthentications",
    ),
    watched(
        "networking.istio.io/v1",
        "VirtualService",
        "virtualservices",
    ),
    watched(
        "networking.istio.io/v1",
        "DestinationRule",
        "destinationrules",
    ),
    watched("networking.istio.io/v1", "ServiceEntry", "serviceentries"),
    watched("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes"),
    // Watched by gateways only ([`KubeSource::for_gateway`]); Secrets in their namespace.
    watched("networking.istio.io/v1", "Gateway", "gateways"),
    watched("gateway.networking.k8s.io/v1", "Gateway", "gateways"),
    watched(
        "gateway.networking.k8s.io/v1alpha2",
        "TLSRoute",
        "tlsroutes",
    ),
    watched(
        "gateway.networking.k8s.io/v1alpha2",
        "TCPRoute",
        "tcproutes",
    ),
    watched("v1", "Secret", "secrets"),
];

/// The kinds only a gateway reads: agents neither need them nor may read Secrets.
const GATEWAY_KINDS: [&str; 4] = ["Gateway", "TLSRoute", "TCPRoute", SECRET];
/// Watched in one namespace only: a gateway's certificates.
const SECRET: &str = "Secret";

const fn watched(
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
) -> WatchedKind {
    WatchedKind {
        api_version,
        kind,
        plural,
    }
}

impl WatchedKind {
    fn api_resource(&self) -> ApiResource {
        let (group, version) = self
            .api_version
            .rsplit_once('/')
            .unwrap_or(("", self.api_version));
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, self.kind),
            self.plural,
        )
    }

    /// Whether the cluster may lack this kind (a CRD that was never installed).
    fn is_optional(&self) -> bool {
        self.api_version.contains(".istio.io/") || self.api_version.starts_with("gateway.")
    }
}

/// An object as a list or watch delivers it: its metadata, and the other top-level fields
/// the mesh reads (`spec`, `status`, an EndpointSlice's `endpoints`) as the JSON text they
/// came as. kube-rs' `DynamicObject` builds a JSON tree of every field of every object (and
/// through `#[serde(flatten)]`, twice); listing a big cluster spent most of its CPU there.
/// The typed objects are read from the text directly ([`JsonDocument`]).
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct WatchedObject {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: Option<Box<RawValue>>,
    status: Option<Box<RawValue>>,
    endpoints: Option<Box<RawValue>>,
    /// A Secret's entries.
    data: Option<Box<RawValue>>,
}

impl Resource for WatchedObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn group(resource: &ApiResource) -> Cow<'_, str> {
        resource.group.as_str().into()
    }

    fn version(resource: &ApiResource) -> Cow<'_, str> {
        resource.version.as_str().into()
    }

    fn kind(resource: &ApiResource) -> Cow<'_, str> {
        resource.kind.as_str().into()
    }

    fn api_version(resource: &ApiResource) -> Cow<'_, str> {
        resource.api_version.as_str().into()
    }

    fn plural(resource: &ApiResource) -> Cow<'_, str> {
        resource.plural.as_str().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The objects of one kind, as last listed and watched.
#[derive(Default)]
struct KindCache {
    /// By `(namespace, name)`.
    objects: BTreeMap<(String, String), Document>,
    /// A relist in progress: replaces `objects` whole when it completes.
    relist: Option<BTreeMap<(String, String), Document>>,
    synced: bool,
}

impl KindCache {
    /// Applies one watch event; says whether the visible objects changed.
    fn apply(&mut self, kind: &WatchedKind, event: watcher::Event<WatchedObject>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                let (key, document) = classify_object(kind, object);
                self.relist.get_or_insert_default().insert(key, document);
                false
            }
            watcher::Event::InitDone => {
                self.objects = self.relist.take().unwrap_or_default();
                self.synced = true;
                true
            }
            watcher::Event::Apply(object) => {
                let (key, document) = classify_object(kind, object);
                self.objects.insert(key, document);
                true
            }
            watcher::Event::Delete(object) => {
                let key = object_key(&object);
                self.objects.remove(&key).is_some()
            }
        }
    }
}

/// One object of the API server as JSON text, which the typed objects are read from.
pub(crate) struct JsonDocument(String);

impl JsonDocument {
    fn of(kind: &WatchedKind, object: &WatchedObject) -> Self {
        let metadata = serde_json::to_string(&object.metadata).unwrap_or_else(|_| "{}".into());
        let fields = [
            ("spec", &object.spec),
            ("status", &object.status),
            ("endpoints", &object.endpoints),
            ("data", &object.data),
        ];
        // Sized once: a pod's spec and status are most of a big cluster's bytes.
        let raw_len: usize = fields
            .iter()
            .filter_map(|(field, raw)| raw.as_ref().map(|raw| field.len() + raw.get().len() + 4))
            .sum();
        let mut text = String::with_capacity(metadata.len() + raw_len + 96);
        text.push_str(&format!(
            r#"{{"apiVersion":{},"kind":{},"metadata":{metadata}"#,
            Value::from(kind.api_version),
            Value::from(kind.kind),
        ));
        for (field, raw) in fields {
            if let Some(raw) = raw {
                for piece in [r#",""#, field, r#"":"#, raw.get()] {
                    text.push_str(piece);
                }
            }
        }
        text.push('}');
        Self(text)
    }
}

impl Tree for JsonDocument {
    fn read<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.0).map_err(|error| {
            // As a file's would read: where in this one-line text is no help to anyone.
            let text = error.to_string();
            match text.rsplit_once(" at line ") {
                Some((message, _)) if error.line() > 0 => message.to_owned(),
                _ => text,
            }
        })
    }

    fn spec(&self) -> serde_yaml::Value {
        serde_json::from_str::<Value>(&self.0)
            .ok()
            .and_then(|document| {
                document
                    .get("spec")
                    .and_then(|s| serde_yaml::to_value(s).ok())
            })
            .unwrap_or_default()
    }
}

fn object_key(object: &WatchedObject) -> (String, String) {
    (
        object.metadata.namespace.clone().unwrap_or_default(),
        object.metadata.name.clone().unwrap_or_default(),
    )
}

/// Classifies an object from the API server the way the file source classifies a document.
fn classify_object(kind: &WatchedKind, mut object: WatchedObject) -> ((String, String), Document) {
    let key = object_key(&object);
    // Dropped before the object is read: `managedFields` and annotations (one
    // `last-applied-configuration` can be larger than the rest of the object) are never
    // read, and the core kinds' types ignore every other field the mesh does not read.
    object.metadata.managed_fields = None;
    object.metadata.annotations = None;
    // The kind and names are known already: the text is read once, as the typed object.
    let meta = TypeMeta::known(
        kind.api_version,
        kind.kind,
        object.metadata.namespace.clone(),
        object.metadata.name.clone(),
    );
    let document = classify(meta, &JsonDocument::of(kind, &object));
    (key, document)
}

type EventStream = Pin<
    Box<dyn Stream<Item = (usize, Result<watcher::Event<WatchedObject>, watcher::Error>)> + Send>,
>;

/// Watches the API server and publishes states until `shutdown`.
pub struct KubeSource {
    client: Client,
    root_namespace: String,
    caches: Vec<KindCache>,
    /// Indexes into [`WATCHED_KINDS`] of the kinds this source watches.
    watching: Vec<usize>,
    /// Where Secrets are watched, if anywhere (a gateway's namespace).
    secrets_namespace: Option<String>,
    last_good: LastGood,
}

impl KubeSource {
    pub fn new(client: Client, root_namespace: impl Into<String>) -> Self {
        Self {
            client,
            root_namespace: root_namespace.into(),
            caches: WATCHED_KINDS.iter().map(|_| KindCache::default()).collect(),
            watching: Vec::new(),
            secrets_namespace: None,
            last_good: LastGood::default(),
        }
        .only(
            &WATCHED_KINDS
                .map(|k| k.kind)
                .into_iter()
                .filter(|k| !GATEWAY_KINDS.contains(k))
                .collect::<Vec<_>>(),
        )
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A gateway's source: Gateways too, and the Secrets of its own `namespace`, whose
    /// certificates its servers name.
    pub fn for_gateway(mut self, namespace: impl Into<String>) -> Self {
        self.secrets_namespace = Some(namespace.into());
        for (index, kind) in WATCHED_KINDS.iter().enumerate() {
            if GATEWAY_KINDS.contains(&kind.kind) {
                self.watching.push(index);
                self.caches[index].synced = false;
            }
        }
        self
    }

    /// Watches only `kinds` (the CA needs pods, not routes): the others stay empty, and
    /// need no RBAC.
    pub fn only(mut self, kinds: &[&str]) -> Self {
        self.watching = (0..WATCHED_KINDS.len())
            .filter(|index| kinds.contains(&WATCHED_KINDS[*index].kind))
            .collect();
        for (index, cache) in self.caches.iter_mut().enumerate() {
            cache.synced = !self.watching.contains(&index);
        }
        self
    }

    fn streams(&self) -> Vec<EventStream> {
        self.watching
            .iter()
            .map(|&index| {
                let kind = &WATCHED_KINDS[index];
                let api: Api<WatchedObject> = match &self.secrets_namespace {
                    Some(namespace) if kind.kind == SECRET => {
                        Api::namespaced_with(self.client.clone(), namespace, &kind.api_resource())
                    }
                    _ => Api::all_with(self.client.clone(), &kind.api_resource()),
                };
                // `any_semantic`: lists may be served from the API server's watch cache, as
                // for every informer; the watch that follows brings anything newer.
                let config = watcher::Config::default().any_semantic();
                let stream = watcher(api, config)
                    .default_backoff()
                    .map(move |event| (index, event));
                Box::pin(stream) as EventStream
            })
            .collect()
    }

    /// Runs until `shutdown`. `ready` is dropped when the first state is published, after
    /// every kind has been listed.
    pub async fn run(
        mut self,
        tx: StateTx,
        metrics: NodeMetrics,
        ready: ReadinessGuard,
        shutdown: CancellationToken,
    ) {
        let mut events = futures::stream::select_all(self.streams());
        let mut ready = Some(ready);
        let mut missing_kinds_logged = HashSet::new();
        let mut dirty = false;
        loop {
            let all_synced = self.caches.iter().all(|c| c.synced);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(PUBLISH_DELAY), if dirty && all_synced => {
                    dirty = false;
                    without_blocking_the_runtime(|| self.publish(&tx, &metrics));
                    if ready.take().is_some() {
                        info!("kube source synced: every kind listed");
                    }
                }
                next = events.next() => {
                    let Some((index, event)) = next else { return };
                    let kind = &WATCHED_KINDS[index];
                    match event {
                        Ok(event) => dirty |= self.caches[index].apply(kind, event),
                        Err(error) if kind.is_optional() && is_not_found(&error) => {
                            // A CRD that is not installed: nothing of that kind exists. The
                            // watcher keeps retrying, so installing it later is picked up.
                            if missing_kinds_logged.insert(index) {
                                info!(kind = kind.kind, api_version = kind.api_version,
                                      "kind not served by this cluster (CRD not installed); watching for it");
                            }
                            let cache = &mut self.caches[index];
                            dirty |= !cache.synced;
                            cache.synced = true;
                        }
                        Err(error) => {
                            warn!(kind = kind.kind, %error, "watch failed; backing off and resuming, the last state stays");
                        }
                    }
                }
            }
        }
    }

    /// Every accepted object (a refused one replaced by its last good version) and every
    /// refusal, in a stable order.
    fn accepted(&mut self) -> (Vec<Object>, Vec<Rejection>) {
        let mut objects = Vec::new();
        let mut rejections = Vec::new();
        for document in self.caches.iter().flat_map(|c| c.objects.values()) {
            match document {
                Document::Object(object) => objects.push(object.clone()),
                Document::Invalid {
                    resource,
                    error,
                    fail_closed,
                } => {
                    rejections.push(Rejection {
                        origin: ORIGIN.into(),
                        resource: resource.to_string(),
                        error: error.clone(),
                    });
                    objects.extend(self.last_good.stand_in(resource, fail_closed.as_ref()));
                }
                Document::Ignored { kind } => debug!(kind, "ignoring unsupported kind"),
            }
        }
        self.last_good
            .enforce_references(&mut objects, |_| ORIGIN.into(), &mut rejections);
        self.last_good.remember(&objects);
        (objects, rejections)
    }

    fn publish(&mut self, tx: &StateTx, metrics: &NodeMetrics) {
        let started = Instant::now();
        let (objects, rejections) = self.accepted();
        // The config dump says where each object came from, as for files.
        let origin: Arc<str> = ORIGIN.into();
        let origins = objects
            .iter()
            .map(|o| (o.id().to_string(), origin.clone()))
            .collect();
        publish(
            started,
            &objects,
            rejections,
            Arc::new(origins),
            &self.root_namespace,
            tx,
            metrics,
        );
    }
}

fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
