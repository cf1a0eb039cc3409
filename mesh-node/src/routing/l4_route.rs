//! The Gateway API's `TLSRoute` and `TCPRoute` (gateway.networking.k8s.io v1alpha2): the
//! connections a Gateway's TLS and TCP listeners take, relayed whole to their backends by
//! weight. A TLSRoute's `hostnames` are the names a passed through ClientHello asks for (SNI).
use serde::Deserialize;

use super::{
    RoutingError, WeightedDestination,
    gateway_api::RouteKind,
    http_route::{GatewayParent, ParentReference, route_hostnames, weighted_backend},
};

/// `spec` of a TLSRoute or a TCPRoute (which has no `hostnames`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct L4RouteSpec {
    pub parent_refs: Vec<ParentReference>,
    pub hostnames: Vec<String>,
    pub rules: Vec<L4RouteRule>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct L4RouteRule {
    pub name: Option<String>,
    pub backend_refs: Vec<L4BackendRef>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct L4BackendRef {
    #[serde(flatten)]
    pub backend: super::http_route::BackendRef,
    /// Relative; default 1.
    pub weight: Option<i64>,
}

/// A TLSRoute or TCPRoute as a gateway applies it.
#[derive(Debug)]
pub(super) struct CompiledL4Route {
    pub(super) gateways: Vec<GatewayParent>,
    /// Lower case; empty for a TCPRoute, or a TLSRoute for every name its listener serves.
    pub(super) hostnames: Vec<String>,
    pub(super) route: Vec<WeightedDestination>,
}

impl L4RouteSpec {
    /// Checks everything a gateway would compile; `namespace` is the route's own.
    pub fn validate(&self, kind: RouteKind, namespace: &str) -> Result<(), RoutingError> {
        self.compile(kind, namespace).map(|_| ())
    }

    pub(super) fn compile(
        &self,
        kind: RouteKind,
        namespace: &str,
    ) -> Result<CompiledL4Route, RoutingError> {
        let mut gateways = Vec::new();
        for (i, parent) in self.parent_refs.iter().enumerate() {
            let field = format!("parentRefs[{i}]");
            if !parent.is_gateway() {
                return Err(RoutingError::Unsupported {
                    field,
                    what: format!(
                        "a {} parent that is not a Gateway (the mesh routes TCP by \
                         VirtualService)",
                        kind.name()
                    ),
                });
            }
            gateways.push(parent.gateway(&field, namespace)?);
        }
        if kind == RouteKind::Tcp && !self.hostnames.is_empty() {
            return Err(RoutingError::Invalid {
                field: "hostnames".into(),
                reason: "a TCPRoute has no host names (a TLSRoute does)".into(),
            });
        }
        let hostnames = route_hostnames(&self.hostnames)?;
        let rule = match self.rules.as_slice() {
            [rule] => rule,
            [] => {
                return Err(RoutingError::Invalid {
                    field: "rules".into(),
                    reason: "a rule with backendRefs is required".into(),
                });
            }
            _ => {
                return Err(RoutingError::Unsupported {
                    field: "rules[1]".into(),
                    what: "more than one rule (a connection carries nothing to choose one by)"
                        .into(),
                });
            }
        };
        let mut route = Vec::new();
        for (i, backend) in rule.backend_refs.iter().enumerate() {
            let at = format!("rules[0].backendRefs[{i}]");
            route.push(weighted_backend(
                &at,
                &backend.backend,
                backend.weight,
                namespace,
            )?);
        }
        if route.is_empty() {
            return Err(RoutingError::Invalid {
                field: "rules[0].backendRefs".into(),
                reason: "at least one backend is required".into(),
            });
        }
        Ok(CompiledL4Route {
            gateways,
            hostnames,
            route,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(kind: RouteKind, yaml: &str) -> Result<CompiledL4Route, String> {
        let spec: L4RouteSpec = serde_yaml::from_str(yaml).expect("a route spec");
        spec.compile(kind, "shop").map_err(|e| e.to_string())
    }

    #[test]
    fn tls_and_tcp_routes_compile_to_weighted_backends_of_their_gateways() {
        let tls = compile(
            RouteKind::Tls,
            "parentRefs: [{name: web, namespace: edge, sectionName: tls}]
hostnames: [DB.example.com]
rules: [{backendRefs: [{name: db, port: 5432, weight: 3}, {name: db-2, port: 5432}]}]",
        )
        .expect("a TLSRoute");
        assert_eq!(tls.hostnames, ["db.example.com"]);
        assert_eq!(tls.gateways[0].gateway.to_string(), "edge/web");
        assert_eq!(tls.route.len(), 2);
        assert_eq!((tls.route[0].weight, tls.route[1].weight), (3, 1));
        assert_eq!(tls.route[1].destination.service.to_string(), "shop/db-2");
        for (kind, yaml, expected) in [
            (
                RouteKind::Tcp,
                "parentRefs: [{name: web}]\nhostnames: [a.example.com]\nrules: [{backendRefs: [{name: db, port: 1}]}]",
                "hostnames: a TCPRoute has no host names",
            ),
            (
                RouteKind::Tcp,
                "parentRefs: [{name: db, kind: Service, group: ''}]\nrules: [{backendRefs: [{name: db, port: 1}]}]",
                "parentRefs[0]: a TCPRoute parent that is not a Gateway",
            ),
            (
                RouteKind::Tcp,
                "parentRefs: [{name: web}]\nrules: [{backendRefs: [{name: a, port: 1}]}, {backendRefs: [{name: b, port: 1}]}]",
                "rules[1]: more than one rule",
            ),
            (
                RouteKind::Tls,
                "parentRefs: [{name: web}]\nrules: [{}]",
                "rules[0].backendRefs: at least one backend is required",
            ),
            (
                RouteKind::Tls,
                "parentRefs: [{name: web}]\nrules: [{backendRefs: [{name: a, port: 1, weight: -1}]}]",
                "rules[0].backendRefs[0].weight: weight -1 is negative",
            ),
        ] {
            let error = compile(kind, yaml).expect_err(yaml);
            assert!(error.starts_with(expected), "{yaml}: {error}");
        }
    }
}
