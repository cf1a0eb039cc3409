//! The normalized state: what every other part of the agent reads.
//!
//! Config sources translate Kubernetes objects into one immutable [`State`] snapshot and
//! publish it through `tokio::sync::watch`; readers take a cheap `Arc` clone. The snapshot
//! holds the cluster's facts ([`inventory`](crate::inventory)) beside the routes and
//! policies compiled from them; it is read, never changed, by the planner and the proxy.
use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    inventory::{Labels, ObjectKey, Rejection, Service, TargetPort, Workload},
    policy::Policies,
    routing::Routes,
};

/// One immutable snapshot of everything the mesh knows.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub namespaces: BTreeMap<String, Labels>,
    pub workloads: BTreeMap<ObjectKey, Workload>,
    pub services: BTreeMap<ObjectKey, Service>,
    pub policies: Policies,
    /// VirtualServices, HTTPRoutes and DestinationRules, compiled for the proxy.
    pub routes: Routes,
    pub rejections: Vec<Rejection>,
    /// Istio Gateways: what gateway pods listen on and which certificates they serve.
    pub gateways: BTreeMap<ObjectKey, Arc<crate::routing::gateway::GatewaySpec>>,
    /// The Gateway API's Gateways (of every class).
    pub api_gateways: BTreeMap<ObjectKey, Arc<crate::routing::gateway_api::ApiGatewaySpec>>,
    /// The Secrets Gateways name, with only their certificate entries.
    pub secrets: BTreeMap<ObjectKey, Arc<crate::inventory::TlsSecret>>,
    /// Where each object came from (a file path for the file source), by `Kind
    /// namespace/name` (`Kind name` for namespaces); empty when the source does not say.
    /// Shared with the source that built it, and each file's path is one string.
    pub origins: Arc<BTreeMap<String, Arc<str>>>,
    workload_by_ip: HashMap<IpAddr, ObjectKey>,
    service_by_ip: HashMap<IpAddr, ObjectKey>,
    /// ServiceEntry hosts without addresses, by the ports they list: matched by the Host
    /// of the HTTP a pod sends to an address the mesh does not know.
    hosts_by_port: HashMap<u16, Vec<ObjectKey>>,
}

impl State {
    /// Builds the snapshot and its indexes from translated parts.
    pub fn new(
        namespaces: BTreeMap<String, Labels>,
        workloads: BTreeMap<ObjectKey, Workload>,
        services: BTreeMap<ObjectKey, Service>,
        policies: Policies,
        routes: Routes,
        rejections: Vec<Rejection>,
    ) -> Self {
        let workload_by_ip = workloads
            .values()
            .flat_map(|w| w.ips.iter().map(|ip| (*ip, w.key.clone())))
            .collect();
        // A Kubernetes Service's address wins over a ServiceEntry's that claims it too
        // (later entries overwrite earlier ones).
        let (declared, kubernetes): (Vec<&Service>, Vec<&Service>) =
            services.values().partition(|s| s.external.is_some());
        let service_by_ip = declared
            .into_iter()
            .chain(kubernetes)
            .flat_map(|s| s.cluster_ips.iter().map(|ip| (*ip, s.key.clone())))
            .collect();
        let mut hosts_by_port: HashMap<u16, Vec<ObjectKey>> = HashMap::new();
        for service in services
            .values()
            .filter(|s| s.external.is_some() && s.cluster_ips.is_empty())
        {
            for port in &service.ports {
                hosts_by_port
                    .entry(port.port)
                    .or_default()
                    .push(service.key.clone());
            }
        }
        Self {
            namespaces,
            workloads,
            services,
            policies,
            routes,
            rejections,
            gateways: BTreeMap::new(),
            api_gateways: BTreeMap::new(),
            secrets: BTreeMap::new(),
            origins: Arc::default(),
            workload_by_ip,
            service_by_ip,
            hosts_by_port,
        }
    }

    /// The ServiceEntry hosts without addresses that list `port`, as pods of `namespace`
    /// see them.
    pub fn hosts_on_port<'s>(
        &'s self,
        port: u16,
        namespace: &'s str,
    ) -> impl Iterator<Item = &'s Service> + 's {
        self.hosts_by_port
            .get(&port)
            .into_iter()
            .flatten()
            .filter_map(|key| self.services.get(key))
            .filter(move |service| service.visible_to(namespace))
    }

    /// The ServiceEntry host without addresses that `host` (a Host header, its port
    /// ignored) names on `port` for pods of `namespace`: an exact host first, then the
    /// longest wildcard (`*.example.com`).
    pub fn host_on_port(&self, host: &str, port: u16, namespace: &str) -> Option<&Service> {
        let name = crate::routing::host::request_host_name(host);
        self.hosts_by_port
            .get(&port)?
            .iter()
            .filter_map(|key| self.services.get(key))
            .filter(|service| service.visible_to(namespace))
            .filter_map(|service| {
                crate::routing::host::host_match_specificity(&service.key.name, &name)
                    .map(|specificity| (specificity, service))
            })
            // The first of the most specific, as before: `max_by_key` keeps the last.
            .fold(
                None,
                |best: Option<(usize, &Service)>, candidate| match best {
                    Some(b) if b.0 >= candidate.0 => Some(b),
                    _ => Some(candidate),
                },
            )
            .map(|(_, service)| service)
    }

    /// The pod `key` as the state knows it or, for a pod it does not know yet (the CNI
    /// enrolls pods before the config source reports them), a stand-in with its namespace
    /// and no labels: enough for its namespace's and the mesh's policies to apply at once.
    pub fn workload_or_unknown(&self, key: &ObjectKey) -> Cow<'_, Workload> {
        self.workloads.get(key).map_or_else(
            || {
                Cow::Owned(Workload {
                    key: key.clone(),
                    uid: String::new(),
                    workload_name: key.name.clone(),
                    node: String::new(),
                    service_account: String::new(),
                    labels: Labels::new(),
                    ips: Vec::new(),
                    named_ports: litemap::LiteMap::new(),
                    ready: false,
                    enrolled: true,
                })
            },
            Cow::Borrowed,
        )
    }

    /// Where the object `kind` `key` came from, if the config source said.
    pub fn origin_of(&self, kind: &str, key: &ObjectKey) -> Option<&str> {
        self.origins
            .get(&format!("{kind} {key}"))
            .map(|origin| &**origin)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.workload_by_ip
            .get(&ip)
            .and_then(|key| self.workloads.get(key))
    }

    pub fn service_by_ip(&self, ip: IpAddr) -> Option<&Service> {
        self.service_by_ip
            .get(&ip)
            .and_then(|key| self.services.get(key))
    }

    /// A Service that sends its traffic for `port` to `workload`. The destination side only
    /// sees the pod address, yet Istio's metrics name the service there too. A Service only
    /// selects pods of its own namespace, so only that namespace's Services are looked at
    /// (every inbound connection asks; a big cluster has thousands of Services).
    pub fn service_for(&self, workload: &Workload, port: u16) -> Option<&Service> {
        self.services_in(&workload.key.namespace).find(|service| {
            service.endpoints.contains(&workload.key)
                && service.ports.iter().any(|p| match &p.target_port {
                    TargetPort::Number(n) => *n == port,
                    TargetPort::Name(name) => workload.named_ports.get(name) == Some(&port),
                })
        })
    }

    /// The Services of `namespace`: a range of the map, which is ordered by namespace first.
    fn services_in<'s>(&'s self, namespace: &str) -> impl Iterator<Item = &'s Service> + use<'s> {
        let first = ObjectKey {
            namespace: namespace.to_owned(),
            name: String::new(),
        };
        let service_namespace = first.namespace.clone();
        self.services
            .range(first..)
            .map(|(_, service)| service)
            .take_while(move |service| service.key.namespace == service_namespace)
    }

    /// Every pod as (node, namespace, service account): what node authorization checks.
    pub fn scheduled_pods(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.workloads.values().map(|w| {
            (
                w.node.as_str(),
                w.key.namespace.as_str(),
                w.service_account.as_str(),
            )
        })
    }

    /// A state holding just `workloads`, for tests.
    #[cfg(test)]
    pub fn with_workloads(workloads: impl IntoIterator<Item = Workload>) -> Self {
        let workloads = workloads.into_iter().map(|w| (w.key.clone(), w)).collect();
        Self::new(
            BTreeMap::new(),
            workloads,
            BTreeMap::new(),
            Policies::default(),
            Routes::default(),
            Vec::new(),
        )
    }

    /// Enrolled pods scheduled on `node`.
    pub fn enrolled_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads
            .values()
            .filter(move |w| w.node == node && w.enrolled && !w.ips.is_empty())
    }
}

/// The shared, swappable snapshot.
pub type StateRx = tokio::sync::watch::Receiver<Arc<State>>;
pub type StateTx = tokio::sync::watch::Sender<Arc<State>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::ServicePort;

    fn service(
        namespace: &str,
        name: &str,
        target_port: TargetPort,
        endpoints: &[&ObjectKey],
    ) -> Service {
        Service {
            key: ObjectKey::new(namespace, name),
            cluster_ips: Vec::new(),
            ports: vec![ServicePort {
                name: None,
                port: 80,
                target_port,
                app_protocol: None,
            }],
            endpoints: endpoints.iter().map(|key| (*key).clone()).collect(),
            external: None,
        }
    }

    #[test]
    fn service_for_finds_the_pods_service_among_its_namespaces_neighbours() {
        let mut pod = Workload::for_test("node0", "shop", "reviews", &[]);
        pod.named_ports.insert("http".into(), 9080);
        let services = [
            service("default", "reviews", TargetPort::Number(9080), &[&pod.key]),
            service("shop", "other", TargetPort::Number(9080), &[]),
            service(
                "shop",
                "reviews",
                TargetPort::Name("http".into()),
                &[&pod.key],
            ),
            service("shop-two", "reviews", TargetPort::Number(9080), &[&pod.key]),
        ];
        let state = State::new(
            BTreeMap::new(),
            BTreeMap::new(),
            services.into_iter().map(|s| (s.key.clone(), s)).collect(),
            Policies::default(),
            Routes::default(),
            Vec::new(),
        );
        let found = state.service_for(&pod, 9080).expect("the pod's Service");
        assert_eq!(found.key, ObjectKey::new("shop", "reviews"));
        assert!(
            state.service_for(&pod, 8080).is_none(),
            "no Service targets 8080"
        );
    }
}
