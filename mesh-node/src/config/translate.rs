//! Kubernetes objects → normalized [`State`].
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString};
use serde::Deserialize;

use super::core::{EndpointSlice, Namespace, Pod, Service as K8sService};
use crate::{
    egress::{ServiceEntryError, ServiceEntrySpec},
    inventory::{
        ENROLLMENT_LABEL, Labels, ObjectId, ObjectKey, Rejection, Service, ServicePort, TargetPort,
        TlsSecret, Workload,
    },
    policy::{
        AuthorizationPolicySpec, PeerAuthenticationSpec, Policies, Policy, PolicyError,
        RequestAuthenticationError, RequestAuthenticationSpec,
    },
    routing::{
        DestinationRuleSpec, HttpRouteSpec, Routes, RoutingError, RoutingSpec, VirtualServiceSpec,
        gateway::{GatewayError, GatewaySpec},
        gateway_api::{ApiGatewayError, ApiGatewaySpec, KIND as API_GATEWAY_KIND, RouteKind},
        l4_route::L4RouteSpec,
    },
    state::State,
};

/// A custom resource (Istio's APIs, the Gateway API): Kubernetes metadata and a typed `spec`.
#[derive(Clone, Debug, Deserialize)]
pub struct IstioObject<S> {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: S,
}

/// A Kubernetes object the mesh understands. Shared (`Arc`): a source, its last good
/// versions and each load's list hold the same object, not copies of it.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Arc<Namespace>),
    /// A pod, read into what the mesh knows of it as it arrives (the pod itself is not
    /// kept): `enrolled` is decided by [`translate`], from its namespace.
    Pod(Arc<Workload>),
    Service(Arc<K8sService>),
    /// A Service's endpoints as the API server lists them (`discovery.k8s.io/v1`).
    EndpointSlice(Arc<EndpointSlice>),
    PeerAuthentication(Arc<IstioObject<PeerAuthenticationSpec>>),
    AuthorizationPolicy(Arc<IstioObject<AuthorizationPolicySpec>>),
    RequestAuthentication(Arc<IstioObject<RequestAuthenticationSpec>>),
    VirtualService(Arc<IstioObject<VirtualServiceSpec>>),
    DestinationRule(Arc<IstioObject<DestinationRuleSpec>>),
    /// Destinations outside the cluster's Services, named.
    ServiceEntry(Arc<IstioObject<ServiceEntrySpec>>),
    /// Gateway API `HTTPRoute`; the mesh uses those bound to Services (GAMMA).
    HttpRoute(Arc<IstioObject<HttpRouteSpec>>),
    /// Istio's `Gateway`: what gateway pods listen on.
    Gateway(Arc<IstioObject<GatewaySpec>>),
    /// The Gateway API's `Gateway`: the listeners of a gateway of its class.
    ApiGateway(Arc<IstioObject<ApiGatewaySpec>>),
    /// The Gateway API's `TLSRoute` (v1alpha2): TLS a Gateway's listener passes through.
    TlsRoute(Arc<IstioObject<L4RouteSpec>>),
    /// The Gateway API's `TCPRoute` (v1alpha2).
    TcpRoute(Arc<IstioObject<L4RouteSpec>>),
    /// A Secret, of which only the certificate entries a gateway serves are kept.
    Secret(Arc<TlsSecret>),
}

/// Why an object cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    #[error("metadata.name is missing")]
    MissingName,
    #[error("{field}: {value:?} is not an IP address")]
    BadIp { field: &'static str, value: String },
    #[error("spec.ports[{index}]: {reason}")]
    BadPort { index: usize, reason: String },
    #[error("spec: {0}")]
    Policy(#[from] PolicyError),
    #[error("spec: {0}")]
    RequestAuthentication(#[from] RequestAuthenticationError),
    #[error("spec.{0}")]
    ServiceEntry(#[from] ServiceEntryError),
    #[error("spec.{0}")]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    ApiGateway(#[from] ApiGatewayError),
    #[error("spec.{0}")]
    Routing(#[from] RoutingError),
}

impl Object {
    pub fn id(&self) -> ObjectId {
        let full = |meta: &ObjectMeta| (meta.name.clone(), meta.namespace.clone());
        let core = |meta: &super::core::Meta| (meta.name.clone(), meta.namespace.clone());
        let (kind, (name, namespace)) = match self {
            Object::Namespace(o) => ("Namespace", core(&o.metadata)),
            Object::Pod(o) => (
                "Pod",
                (Some(o.key.name.clone()), Some(o.key.namespace.clone())),
            ),
            Object::Service(o) => ("Service", core(&o.metadata)),
            Object::EndpointSlice(o) => ("EndpointSlice", core(&o.metadata)),
            Object::PeerAuthentication(o) => ("PeerAuthentication", full(&o.metadata)),
            Object::AuthorizationPolicy(o) => ("AuthorizationPolicy", full(&o.metadata)),
            Object::RequestAuthentication(o) => ("RequestAuthentication", full(&o.metadata)),
            Object::VirtualService(o) => ("VirtualService", full(&o.metadata)),
            Object::DestinationRule(o) => ("DestinationRule", full(&o.metadata)),
            Object::ServiceEntry(o) => ("ServiceEntry", full(&o.metadata)),
            Object::HttpRoute(o) => ("HTTPRoute", full(&o.metadata)),
            Object::Gateway(o) => ("Gateway", full(&o.metadata)),
            Object::ApiGateway(o) => (API_GATEWAY_KIND, full(&o.metadata)),
            Object::TlsRoute(o) => ("TLSRoute", full(&o.metadata)),
            Object::TcpRoute(o) => ("TCPRoute", full(&o.metadata)),
            Object::Secret(o) => (
                "Secret",
                (Some(o.key.name.clone()), Some(o.key.namespace.clone())),
            ),
        };
        let namespace = match self {
            Object::Namespace(_) => String::new(),
            _ => namespace.unwrap_or_else(|| "default".into()),
        };
        ObjectId {
            kind,
            namespace,
            name: name.unwrap_or_default(),
        }
    }
}

impl Object {
    /// The typed spec of a routing resource (VirtualService, DestinationRule, HTTPRoute).
    pub fn routing_spec(&self) -> Option<RoutingSpec<'_>> {
        Some(match self {
            Object::VirtualService(o) => RoutingSpec::VirtualService(&o.spec),
            Object::DestinationRule(o) => RoutingSpec::DestinationRule(&o.spec),
            Object::HttpRoute(o) => RoutingSpec::HttpRoute {
                spec: &o.spec,
                created: o.metadata.creation_timestamp.as_ref(),
            },
            Object::TlsRoute(o) => RoutingSpec::L4Route {
                kind: RouteKind::Tls,
                spec: &o.spec,
                created: o.metadata.creation_timestamp.as_ref(),
            },
            Object::TcpRoute(o) => RoutingSpec::L4Route {
                kind: RouteKind::Tcp,
                spec: &o.spec,
                created: o.metadata.creation_timestamp.as_ref(),
            },
            _ => return None,
        })
    }
}

/// The routing resources among `objects`, as routing compiles them.
pub fn routing_resources(objects: &[Object]) -> Vec<(ObjectId, RoutingSpec<'_>)> {
    objects
        .iter()
        .filter_map(|object| Some((object.id(), object.routing_spec()?)))
        .collect()
}

/// Checks what the translation needs from one object, so a bad one can be rejected alone.
pub fn validate(object: &Object) -> Result<(), TranslateError> {
    let id = object.id();
    if id.name.is_empty() {
        return Err(TranslateError::MissingName);
    }
    match object {
        Object::Namespace(_) | Object::PeerAuthentication(_) | Object::EndpointSlice(_) => Ok(()),
        Object::AuthorizationPolicy(policy) => Ok(policy.spec.validate()?),
        Object::RequestAuthentication(policy) => Ok(policy.spec.validate()?),
        Object::ServiceEntry(entry) => Ok(entry.spec.validate()?),
        Object::VirtualService(vs) => Ok(vs.spec.validate(&id.namespace)?),
        Object::DestinationRule(rule) => Ok(rule.spec.validate(&id.namespace)?),
        Object::HttpRoute(route) => Ok(route.spec.validate(&id.namespace)?),
        Object::Gateway(gateway) => Ok(gateway.spec.validate()?),
        Object::ApiGateway(gateway) => Ok(gateway.spec.validate()?),
        Object::TlsRoute(route) => Ok(route.spec.validate(RouteKind::Tls, &id.namespace)?),
        Object::TcpRoute(route) => Ok(route.spec.validate(RouteKind::Tcp, &id.namespace)?),
        // Its certificates are read by the gateway that serves them, which reports them.
        Object::Secret(_) => Ok(()),
        // Checked when it was read (`pod`).
        Object::Pod(_) => Ok(()),
        Object::Service(service) => {
            service_cluster_ips(service)?;
            service_ports(service).map(|_| ())
        }
    }
}

/// Builds the state from objects that passed [`validate`]; objects that did not are skipped.
/// Selector-less policies in `root_namespace` apply mesh-wide. Routing resources that
/// conflict with others are reported in the state's rejections, after `rejections`.
pub fn translate(
    objects: &[Object],
    mut rejections: Vec<Rejection>,
    root_namespace: &str,
) -> State {
    let mut namespaces = BTreeMap::new();
    for object in objects {
        if let Object::Namespace(ns) = object {
            namespaces.insert(
                object.id().name,
                ns.metadata.labels.clone().unwrap_or_default(),
            );
        }
    }
    let mut workloads = BTreeMap::new();
    for object in objects {
        if let Object::Pod(pod) = object {
            let workload = Workload {
                enrolled: enrolled(pod, &namespaces),
                ..Workload::clone(pod)
            };
            workloads.insert(workload.key.clone(), workload);
        }
    }
    let slices = endpoint_slices_by_service(objects);
    let selectable = SelectorIndex::new(&workloads);
    let mut services = BTreeMap::new();
    for object in objects {
        if let Object::Service(svc) = object
            && let Ok(service) = service(object.id(), svc, &workloads, &slices, &selectable)
        {
            services.insert(service.key.clone(), service);
        }
    }
    for object in objects {
        if let Object::ServiceEntry(entry) = object {
            for service in entry.spec.services(&object.id().namespace) {
                services.entry(service.key.clone()).or_insert(service);
            }
        }
    }
    let mut policies = Policies {
        root_namespace: root_namespace.to_string(),
        ..Policies::default()
    };
    for object in objects {
        let key = || {
            let id = object.id();
            ObjectKey::new(id.namespace, id.name)
        };
        match object {
            Object::PeerAuthentication(p) => policies.peer_authentications.push(Policy {
                key: key(),
                spec: p.spec.clone(),
            }),
            Object::AuthorizationPolicy(p) => policies.authorization_policies.push(Policy {
                key: key(),
                spec: p.spec.clone(),
            }),
            Object::RequestAuthentication(p) => policies.request_authentications.push(Policy {
                key: key(),
                spec: p.spec.clone(),
            }),
            _ => {}
        }
    }
    // Name order makes "the first matching policy" the same on every node.
    policies
        .peer_authentications
        .sort_by(|a, b| a.key.cmp(&b.key));
    policies
        .authorization_policies
        .sort_by(|a, b| a.key.cmp(&b.key));
    policies
        .request_authentications
        .sort_by(|a, b| a.key.cmp(&b.key));
    let (routes, routing_rejections) = Routes::build(&routing_resources(objects));
    rejections.extend(routing_rejections);
    let mut state = State::new(
        namespaces, workloads, services, policies, routes, rejections,
    );
    GatewayObjects {
        gateways: state.gateways,
        api_gateways: state.api_gateways,
        secrets: state.secrets,
    } = gateways_and_credentials(objects);
    state
}

/// Istio's Gateways, the Gateway API's, and the Secrets their servers name
/// (`credentialName` and its `-cacert` companion, `certificateRefs`): key material nothing
/// uses is not kept.
fn gateways_and_credentials(objects: &[Object]) -> GatewayObjects {
    let mut gateways = BTreeMap::new();
    let mut api_gateways = BTreeMap::new();
    let mut credential_names = HashSet::new();
    for object in objects {
        if let Object::ApiGateway(gateway) = object {
            let id = object.id();
            for listener in &gateway.spec.listeners {
                if let Some(reference) = listener.certificate() {
                    credential_names.insert(reference.name.clone());
                }
            }
            api_gateways.insert(
                ObjectKey::new(id.namespace, id.name),
                Arc::new(gateway.spec.clone()),
            );
        }
        if let Object::Gateway(gateway) = object {
            let id = object.id();
            for tls in gateway.spec.servers.iter().filter_map(|s| s.tls.as_ref()) {
                if let Some(name) = &tls.credential_name {
                    credential_names.insert(name.clone());
                    credential_names.insert(format!("{name}-cacert"));
                }
            }
            gateways.insert(
                ObjectKey::new(id.namespace, id.name),
                Arc::new(gateway.spec.clone()),
            );
        }
    }
    let secrets = objects
        .iter()
        .filter_map(|object| match object {
            Object::Secret(secret) if credential_names.contains(&secret.key.name) => {
                Some((secret.key.clone(), secret.clone()))
            }
            _ => None,
        })
        .collect();
    GatewayObjects {
        gateways,
        api_gateways,
        secrets,
    }
}

/// What only gateways read.
struct GatewayObjects {
    gateways: BTreeMap<ObjectKey, Arc<GatewaySpec>>,
    api_gateways: BTreeMap<ObjectKey, Arc<ApiGatewaySpec>>,
    secrets: BTreeMap<ObjectKey, Arc<TlsSecret>>,
}

fn pod_ips(pod: &Pod) -> Result<Vec<IpAddr>, TranslateError> {
    let Some(status) = &pod.status else {
        return Ok(Vec::new());
    };
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    let mut ips = Vec::new();
    for value in status.pod_ip.as_deref().into_iter().chain(listed) {
        let ip = value.parse().map_err(|_| TranslateError::BadIp {
            field: "status.podIPs",
            value: value.to_string(),
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// Whether the mesh captures `pod`: its namespace enrolled and the pod not opted out.
fn enrolled(pod: &Workload, namespaces: &BTreeMap<String, Labels>) -> bool {
    let namespace_enrolled = namespaces
        .get(&pod.key.namespace)
        .and_then(|l| l.get(ENROLLMENT_LABEL))
        .is_some_and(|v| v == "true");
    let opted_out = pod
        .labels
        .get(ENROLLMENT_LABEL)
        .is_some_and(|v| v == "false");
    namespace_enrolled && !opted_out
}

/// What the mesh knows of a pod (not yet whether it is enrolled: that depends on its
/// namespace, see [`translate`]).
pub(super) fn pod(pod: &Pod) -> Result<Workload, TranslateError> {
    let name = pod
        .metadata
        .name
        .clone()
        .ok_or(TranslateError::MissingName)?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let ready = running
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_none_or(|conditions| {
                conditions
                    .iter()
                    .find(|c| c.type_ == "Ready")
                    .is_none_or(|c| c.status == "True")
            });
    let named_ports = spec
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = u16::try_from(p.container_port).ok()?;
            Some((p.name.clone()?, port))
        })
        .collect();
    Ok(Workload {
        workload_name: workload_name(pod, &name),
        key: ObjectKey::new(namespace, name),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        labels,
        ips: pod_ips(pod)?,
        named_ports,
        ready,
        enrolled: false,
    })
}

/// Istio names a pod's workload after its controller: a Deployment for a ReplicaSet's
/// pods (the ReplicaSet name minus its hash), else the owner, else the pod itself.
fn workload_name(pod: &Pod, pod_name: &str) -> String {
    let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return pod_name.to_string();
    };
    match (owner.kind.as_str(), owner.name.rsplit_once('-')) {
        ("ReplicaSet", Some((deployment, _hash))) => deployment.to_string(),
        _ => owner.name.clone(),
    }
}

fn service_cluster_ips(svc: &K8sService) -> Result<Vec<IpAddr>, TranslateError> {
    let Some(spec) = &svc.spec else {
        return Ok(Vec::new());
    };
    let listed = spec.cluster_ips.iter().flatten().map(String::as_str);
    let mut ips = Vec::new();
    for value in spec.cluster_ip.as_deref().into_iter().chain(listed) {
        if value.is_empty() || value == "None" {
            continue;
        }
        let ip = value.parse().map_err(|_| TranslateError::BadIp {
            field: "spec.clusterIPs",
            value: value.to_string(),
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

fn service_ports(svc: &K8sService) -> Result<Vec<ServicePort>, TranslateError> {
    let ports = svc.spec.iter().flat_map(|s| s.ports.iter().flatten());
    let mut seen = HashSet::new();
    ports
        .enumerate()
        .map(|(index, p)| {
            let bad = |reason: String| TranslateError::BadPort { index, reason };
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("port {} is out of range 1-65535", p.port)))?;
            if !seen.insert(port) {
                return Err(bad(format!("port {port} is listed twice")));
            }
            let target_port = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => TargetPort::Number(
                    u16::try_from(*n)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| bad(format!("targetPort {n} is out of range 1-65535")))?,
                ),
                Some(IntOrString::String(name)) => match name.parse::<u16>() {
                    Ok(n) if n != 0 => TargetPort::Number(n),
                    _ => TargetPort::Name(name.clone()),
                },
            };
            Ok(ServicePort {
                name: p.name.clone(),
                port,
                target_port,
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect()
}

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// EndpointSlices by the Service they belong to.
fn endpoint_slices_by_service(objects: &[Object]) -> BTreeMap<ObjectKey, Vec<&EndpointSlice>> {
    let mut slices: BTreeMap<ObjectKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for object in objects {
        if let Object::EndpointSlice(slice) = object
            && let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            let key = ObjectKey::new(object.id().namespace, service.clone());
            slices.entry(key).or_default().push(slice);
        }
    }
    slices
}

/// The pods a Service's EndpointSlices list as serving (`ready` unset counts as ready, as
/// kube-proxy reads it). Endpoints that are not pods (no `targetRef`) carry no identity for
/// the mesh and are left out.
fn endpoints_from_slices(
    namespace: &str,
    slices: &[&EndpointSlice],
    workloads: &BTreeMap<ObjectKey, Workload>,
) -> Vec<ObjectKey> {
    let mut endpoints: Vec<ObjectKey> = slices
        .iter()
        .flat_map(|slice| slice.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.target_ref.as_ref())
        .filter(|target| target.kind.as_deref() == Some("Pod"))
        .filter_map(|target| {
            let namespace = target.namespace.as_deref().unwrap_or(namespace);
            let key = ObjectKey::new(namespace, target.name.clone()?);
            workloads
                .get(&key)
                .filter(|w| !w.ips.is_empty())
                .map(|_| key)
        })
        .collect();
    endpoints.sort();
    endpoints.dedup();
    endpoints
}

/// The pods a selector can pick (ready, with an address) by `(namespace, label, value)`: a
/// Service's selector looks up its rarest pair and checks the others on those few pods,
/// rather than every pod of the cluster for every Service.
struct SelectorIndex<'a> {
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<&'a Workload>>,
}

impl<'a> SelectorIndex<'a> {
    fn new(workloads: &'a BTreeMap<ObjectKey, Workload>) -> Self {
        let mut by_label: HashMap<_, Vec<&Workload>> = HashMap::new();
        for workload in workloads.values() {
            if !workload.ready || workload.ips.is_empty() {
                continue;
            }
            for (label, value) in &workload.labels {
                by_label
                    .entry((
                        workload.key.namespace.as_str(),
                        label.as_str(),
                        value.as_str(),
                    ))
                    .or_default()
                    .push(workload);
            }
        }
        Self { by_label }
    }

    /// The pods of `namespace` that `selector` (not empty) matches, in key order.
    fn select(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<ObjectKey> {
        let candidates = selector
            .iter()
            .map(|(label, value)| {
                self.by_label
                    .get(&(namespace, label.as_str(), value.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|pods| pods.len())
            .unwrap_or_default();
        candidates
            .iter()
            .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .map(|w| w.key.clone())
            .collect()
    }
}

fn service(
    id: ObjectId,
    svc: &K8sService,
    workloads: &BTreeMap<ObjectKey, Workload>,
    slices: &BTreeMap<ObjectKey, Vec<&EndpointSlice>>,
    selectable: &SelectorIndex<'_>,
) -> Result<Service, TranslateError> {
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let key = ObjectKey::new(id.namespace.clone(), id.name.clone());
    // The API server's EndpointSlices say which pods serve, when there are any (always, in
    // a cluster). Without them (a config directory of Services and Pods alone) the selector
    // is matched here the way the EndpointSlice controller would.
    let endpoints = if let Some(slices) = slices.get(&key) {
        endpoints_from_slices(&id.namespace, slices, workloads)
    } else if selector.is_empty() {
        Vec::new()
    } else {
        selectable.select(&id.namespace, &selector)
    };
    Ok(Service {
        key,
        cluster_ips: service_cluster_ips(svc)?,
        ports: service_ports(svc)?,
        endpoints,
        external: None,
    })
}
