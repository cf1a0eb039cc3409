//! From the whole object set to [`Routes`]: the cross-resource check, which resource wins
//! a Service, and how DestinationRules merge.
use std::collections::{BTreeMap, HashMap, HashSet, btree_map::Entry};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Serialize, Serializer};

use super::{
    ApiRoute, CompiledRule, DestinationPolicy, GatewayHost, HostRoutes, Routes, RoutingSpec,
    gateway_api::RouteKind,
    host::resolve_host,
    http_route::{CompiledHttpRoute, precedence},
    virtual_service::Binding,
};
use crate::inventory::{ObjectId, ObjectKey, Rejection};

/// `Rejection::origin` of what [`Routes::build`] refuses: it is about how resources
/// combine, not about one file.
pub const ROUTING_ORIGIN: &str = "(routing)";

/// VirtualService routes and mirrors to a `subset` that no DestinationRule for the
/// destination's Service defines: each offending VirtualService with why. Usable by any
/// config source, which can then fall back to the offender's last good version.
pub fn check_references(resources: &[(ObjectId, RoutingSpec<'_>)]) -> Vec<(ObjectId, String)> {
    let mut subsets: HashMap<ObjectKey, HashSet<&str>> = HashMap::new();
    for (id, spec) in resources {
        if let RoutingSpec::DestinationRule(rule) = spec
            && let Some(service) = rule.service(&id.namespace)
        {
            subsets
                .entry(service)
                .or_default()
                .extend(rule.subset_names());
        }
    }
    let mut offenders = Vec::new();
    for (id, spec) in resources {
        let RoutingSpec::VirtualService(vs) = spec else {
            continue;
        };
        let missing: Vec<String> = vs
            .destinations()
            .into_iter()
            .filter_map(|(field, destination)| {
                let subset = destination.subset.as_deref().filter(|s| !s.is_empty())?;
                // A host that names no Service is the per-resource validation's to report.
                let service = resolve_host(&destination.host, &id.namespace)?;
                let defined = subsets.get(&service).is_some_and(|s| s.contains(subset));
                (!defined).then(|| {
                    format!(
                        "{field}: subset {subset:?} of host {:?} is not defined by any \
                         DestinationRule for {service}",
                        destination.host
                    )
                })
            })
            .collect();
        if !missing.is_empty() {
            let error = format!("{id}: {}", missing.join("; "));
            offenders.push((id.clone(), error));
        }
    }
    offenders
}

impl Routes {
    /// Compiles the routing resources. Resources that fail validation or
    /// [`check_references`] are skipped (a config source normally filtered them already);
    /// conflicts between resources are returned as rejections (see the module doc).
    pub fn build(resources: &[(ObjectId, RoutingSpec<'_>)]) -> (Routes, Vec<Rejection>) {
        let mut rejections = Vec::new();
        let mut reject = |id: &ObjectId, error: String| {
            rejections.push(Rejection {
                origin: ROUTING_ORIGIN.to_string(),
                resource: id.to_string(),
                error,
            });
        };
        let broken: HashMap<ObjectId, String> = check_references(resources).into_iter().collect();
        for (id, error) in &broken {
            reject(id, error.clone());
        }
        let mut sorted: Vec<&(ObjectId, RoutingSpec<'_>)> = resources
            .iter()
            .filter(|(id, _)| !broken.contains_key(id))
            .collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));

        let mut routes = Routes {
            api_routes: api_routes(&sorted),
            ..Routes::default()
        };
        let http_routes = http_routes_by_service(&sorted);
        for (service, (origins, rules)) in http_routes {
            routes.hosts.insert(
                service,
                HostRoutes {
                    origin: origins.join(", "),
                    http: rules,
                    tcp: Vec::new(),
                },
            );
        }
        let mut claimed_by: HashMap<ObjectKey, ObjectId> = HashMap::new();
        for (id, spec) in &sorted {
            let RoutingSpec::VirtualService(vs) = spec else {
                continue;
            };
            for gateway in vs.bound_gateways(&id.namespace) {
                let binding = Binding::Gateway(&gateway);
                if let Ok(Some(compiled)) = vs.compile(&id.namespace, &id.to_string(), binding) {
                    routes
                        .gateways
                        .entry(gateway.clone())
                        .or_default()
                        .push(GatewayHost {
                            origin: id.to_string(),
                            namespace: id.namespace.clone(),
                            hosts: vs.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                            http: compiled.http,
                            tcp: compiled.tcp,
                            tls: compiled.tls,
                        });
                }
            }
            let Ok(Some(compiled)) = vs.compile(&id.namespace, &id.to_string(), Binding::Mesh)
            else {
                continue;
            };
            for service in compiled.hosts {
                if let Some(winner) = claimed_by.get(&service) {
                    reject(
                        id,
                        format!("host {service}: conflicts with {winner}, which applies"),
                    );
                    continue;
                }
                if let Some(host) = routes.hosts.get(&service) {
                    reject(
                        id,
                        format!(
                            "host {service}: shadowed by {}; an HTTPRoute takes precedence \
                             over a VirtualService for the same Service",
                            host.origin
                        ),
                    );
                    continue;
                }
                claimed_by.insert(service.clone(), id.clone());
                routes.hosts.insert(
                    service,
                    HostRoutes {
                        origin: id.to_string(),
                        http: compiled.http.clone(),
                        tcp: compiled.tcp.clone(),
                    },
                );
            }
        }
        for (id, spec) in &sorted {
            // A rule for a ServiceEntry's host: the first one's policy, as for a Service.
            if let RoutingSpec::DestinationRule(rule) = spec
                && let Ok(compiled) = rule.compile(&id.namespace)
                && let Some(host) = compiled.external_host
            {
                routes
                    .external_destination_rules
                    .entry(host)
                    .or_insert_with(|| DestinationPolicy {
                        origin: id.to_string(),
                        policy: compiled.policy,
                        subsets: BTreeMap::new(),
                    });
            }
        }
        for (id, spec) in &sorted {
            if let RoutingSpec::DestinationRule(rule) = spec
                && let Ok(compiled) = rule.compile(&id.namespace)
                && let Some(service) = compiled.host
            {
                let merged = match routes.destination_rules.entry(service.clone()) {
                    Entry::Vacant(entry) => entry.insert(DestinationPolicy {
                        origin: id.to_string(),
                        policy: compiled.policy,
                        subsets: BTreeMap::new(),
                    }),
                    Entry::Occupied(entry) => {
                        let merged = entry.into_mut();
                        merged.origin = format!("{}, {id}", merged.origin);
                        // Istio keeps the first top-level policy among rules for a host.
                        if merged.policy == Default::default() {
                            merged.policy = compiled.policy;
                        }
                        merged
                    }
                };
                for (name, subset) in compiled.subsets {
                    match merged.subsets.entry(name) {
                        Entry::Vacant(entry) => {
                            entry.insert(subset);
                        }
                        Entry::Occupied(entry) => reject(
                            id,
                            format!(
                                "subsets: {:?} of {service} is already defined by an earlier \
                                 DestinationRule ({}); this definition is ignored",
                                entry.key(),
                                merged.origin
                            ),
                        ),
                    }
                }
            }
        }
        (routes, rejections)
    }
}

/// The rules of all HTTPRoutes by Service in Gateway API precedence, with the routes'
/// names. `sorted` is in (namespace, name) order.
fn http_routes_by_service(
    sorted: &[&(ObjectId, RoutingSpec<'_>)],
) -> BTreeMap<ObjectKey, (Vec<String>, Vec<CompiledRule>)> {
    let mut by_service: BTreeMap<ObjectKey, (Vec<String>, Vec<CompiledRule>)> = BTreeMap::new();
    for (id, compiled) in compiled_http_routes(sorted) {
        for (service, port) in &compiled.parents {
            let (origins, rules) = by_service.entry(service.clone()).or_default();
            if !origins.contains(&id.to_string()) {
                origins.push(id.to_string());
            }
            rules.extend(compiled.rules.iter().cloned().map(|mut compiled| {
                for m in &mut compiled.rule.matches {
                    m.port = *port;
                }
                compiled
            }));
        }
    }
    for (_, rules) in by_service.values_mut() {
        // Stable: equal precedence keeps route, rule and match order.
        rules.sort_by_key(|compiled| std::cmp::Reverse(precedence(&compiled.rule)));
    }
    by_service
}

/// The HTTPRoutes that compile, oldest first, then by name: the Gateway API's tie-break
/// between routes.
fn compiled_http_routes<'a>(
    sorted: &[&'a (ObjectId, RoutingSpec<'_>)],
) -> Vec<(&'a ObjectId, CompiledHttpRoute)> {
    let mut routes: Vec<_> = sorted
        .iter()
        .filter_map(|(id, spec)| match spec {
            RoutingSpec::HttpRoute { spec, created } => Some((id, *spec, *created)),
            _ => None,
        })
        .collect();
    routes.sort_by(|a, b| (a.2, a.0).cmp(&(b.2, b.0)));
    routes
        .into_iter()
        .filter_map(|(id, route, _)| {
            Some((id, route.compile(&id.namespace, &id.to_string()).ok()?))
        })
        .collect()
}

/// The HTTPRoutes, TLSRoutes and TCPRoutes that ask to attach to Gateway API Gateways,
/// oldest first, then by name.
fn api_routes(sorted: &[&(ObjectId, RoutingSpec<'_>)]) -> Vec<ApiRoute> {
    let mut routes: Vec<(Option<&Time>, &ObjectId, ApiRoute)> = Vec::new();
    for (id, spec) in sorted {
        let (created, route) = match spec {
            RoutingSpec::HttpRoute { spec, created } => {
                let Ok(compiled) = spec.compile(&id.namespace, &id.to_string()) else {
                    continue;
                };
                let route = ApiRoute {
                    origin: id.to_string(),
                    namespace: id.namespace.clone(),
                    kind: RouteKind::Http,
                    hostnames: compiled.hostnames,
                    parents: compiled.gateways,
                    http: compiled.rules,
                    l4: Vec::new(),
                };
                (*created, route)
            }
            RoutingSpec::L4Route {
                kind,
                spec,
                created,
            } => {
                let Ok(compiled) = spec.compile(*kind, &id.namespace) else {
                    continue;
                };
                let route = ApiRoute {
                    origin: id.to_string(),
                    namespace: id.namespace.clone(),
                    kind: *kind,
                    hostnames: compiled.hostnames,
                    parents: compiled.gateways,
                    http: Vec::new(),
                    l4: compiled.route,
                };
                (*created, route)
            }
            RoutingSpec::VirtualService(_) | RoutingSpec::DestinationRule(_) => continue,
        };
        if !route.parents.is_empty() {
            routes.push((created, id, route));
        }
    }
    routes.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    routes.into_iter().map(|(_, _, route)| route).collect()
}

/// Maps keyed by Service, serialized with `namespace/name` keys (JSON keys are strings).
pub(super) fn by_name<V: Serialize, S: Serializer>(
    map: &BTreeMap<ObjectKey, V>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(map.iter().map(|(key, value)| (key.to_string(), value)))
}
