//! The Gateway API's `Gateway` (gateway.networking.k8s.io v1): the listeners a gateway of
//! its class (`gatewayClassName`) opens, and which routes may attach to each
//! (`allowedRoutes`). `mesh-node gateway` serves those of its class in its own namespace;
//! HTTPRoutes attach to them by `parentRefs`.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{gateway::ServerProtocol, host};
use crate::inventory::Labels;

/// The API group of the Gateway API's resources.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// How the Gateway API's `Gateway` is named in messages, beside Istio's `Gateway`.
pub const KIND: &str = "gateway.networking.k8s.io/Gateway";

/// `spec` of a Gateway API Gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiGatewaySpec {
    pub gateway_class_name: String,
    pub listeners: Vec<Listener>,
    /// Addresses the implementation should use: not supported (the gateway's Service has
    /// its own); present to be refused clearly.
    #[serde(default)]
    pub addresses: Vec<serde_json::Value>,
    /// Labels and annotations for generated resources: none are generated, so ignored.
    #[serde(default)]
    pub infrastructure: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    /// The host names it serves: a DNS name or `*.suffix`; none: every name.
    #[serde(default)]
    pub hostname: Option<String>,
    pub port: i64,
    pub protocol: String,
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTls {
    /// `Terminate` (default) or `Passthrough`.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub certificate_refs: Vec<SecretReference>,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Client certificate validation (experimental): refused, not implemented.
    #[serde(default)]
    pub frontend_validation: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretReference {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowedRoutes {
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
    #[serde(default)]
    pub kinds: Vec<RouteGroupKind>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteNamespaces {
    /// `Same` (default), `All` or `Selector`.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Refused: a selector the gateway would apply only in part would attach routes the
    /// owner did not allow.
    #[serde(default)]
    pub match_expressions: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteGroupKind {
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
}

/// The route kinds a listener takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum RouteKind {
    #[serde(rename = "HTTPRoute")]
    Http,
    #[serde(rename = "TLSRoute")]
    Tls,
    #[serde(rename = "TCPRoute")]
    Tcp,
}

impl RouteKind {
    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Tls => "TLSRoute",
            RouteKind::Tcp => "TCPRoute",
        }
    }

    fn parse(kind: &str) -> Option<Self> {
        match kind {
            "HTTPRoute" => Some(RouteKind::Http),
            "TLSRoute" => Some(RouteKind::Tls),
            "TCPRoute" => Some(RouteKind::Tcp),
            _ => None,
        }
    }
}

/// Which namespaces' routes may attach to a listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedNamespaces {
    Same,
    All,
    Selector(BTreeMap<String, String>),
}

impl AllowedNamespaces {
    /// Whether a route in `namespace` (with `labels`) may attach to a listener of a Gateway
    /// in `gateway_namespace`.
    pub fn admits(
        &self,
        namespace: &str,
        labels: Option<&Labels>,
        gateway_namespace: &str,
    ) -> bool {
        match self {
            AllowedNamespaces::Same => namespace == gateway_namespace,
            AllowedNamespaces::All => true,
            AllowedNamespaces::Selector(wanted) => labels.is_some_and(|labels| {
                wanted
                    .iter()
                    .all(|(key, value)| labels.get(key) == Some(value))
            }),
        }
    }
}

/// Why a Gateway cannot be used; `field` is the path inside `spec`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiGatewayError {
    #[error("listeners: at least one listener is required")]
    NoListeners,
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{field}: {what} is not supported")]
    Unsupported { field: String, what: String },
}

impl ApiGatewaySpec {
    /// Checks every listener; each refusal names its field.
    pub fn validate(&self) -> Result<(), ApiGatewayError> {
        if self.gateway_class_name.is_empty() {
            return Err(ApiGatewayError::Invalid {
                field: "gatewayClassName".into(),
                reason: "a GatewayClass name is required".into(),
            });
        }
        if !self.addresses.is_empty() {
            return Err(ApiGatewayError::Unsupported {
                field: "addresses".into(),
                what: "asking for addresses (the gateway's Service has them)".into(),
            });
        }
        if self.listeners.is_empty() {
            return Err(ApiGatewayError::NoListeners);
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            let field = format!("listeners[{i}]");
            listener.validate(&field)?;
            if self.listeners[..i].iter().any(|l| l.name == listener.name) {
                return Err(ApiGatewayError::Invalid {
                    field: format!("{field}.name"),
                    reason: format!("{:?} names another listener too", listener.name),
                });
            }
        }
        Ok(())
    }
}

impl Listener {
    fn validate(&self, field: &str) -> Result<(), ApiGatewayError> {
        let invalid = |what: &str, reason: String| ApiGatewayError::Invalid {
            field: format!("{field}.{what}"),
            reason,
        };
        let unsupported = |what: &str, description: &str| ApiGatewayError::Unsupported {
            field: format!("{field}.{what}"),
            what: description.to_string(),
        };
        if self.name.is_empty() {
            return Err(invalid("name", "a listener name is required".into()));
        }
        if !(1..=65535).contains(&self.port) {
            return Err(invalid(
                "port",
                format!("{} is not a port number (1-65535)", self.port),
            ));
        }
        if let Some(hostname) = &self.hostname
            && (hostname == "*" || !host::is_host_pattern(hostname))
        {
            return Err(invalid(
                "hostname",
                format!("{hostname:?} is not a host name (a DNS name or *.suffix)"),
            ));
        }
        let protocol = self
            .protocol()
            .map_err(|reason| invalid("protocol", reason))?;
        match (protocol, &self.tls) {
            (ServerProtocol::Http | ServerProtocol::Tcp, Some(_)) => {
                return Err(invalid(
                    "tls",
                    format!("a {} listener has no TLS", self.protocol),
                ));
            }
            (ServerProtocol::Https, None) => {
                return Err(invalid(
                    "tls",
                    "an HTTPS listener needs tls.certificateRefs".into(),
                ));
            }
            (ServerProtocol::Tls, None) => {
                return Err(invalid(
                    "tls",
                    "a TLS listener needs tls (mode Passthrough, or certificateRefs)".into(),
                ));
            }
            (_, Some(tls)) => {
                if tls.frontend_validation.is_some() {
                    return Err(unsupported(
                        "tls.frontendValidation",
                        "checking client certificates",
                    ));
                }
                if !tls.options.is_empty() {
                    return Err(unsupported("tls.options", "implementation options"));
                }
                match (tls.mode.as_deref().unwrap_or("Terminate"), protocol) {
                    ("Terminate", _) => {
                        let Some(reference) = tls.certificate_refs.first() else {
                            return Err(invalid(
                                "tls.certificateRefs",
                                "Terminate needs a certificate (a Secret)".into(),
                            ));
                        };
                        if tls.certificate_refs.len() > 1 {
                            return Err(unsupported(
                                "tls.certificateRefs",
                                "more than one certificate",
                            ));
                        }
                        if !matches!(reference.group.as_deref(), None | Some(""))
                            || reference.kind.as_deref().is_some_and(|k| k != "Secret")
                        {
                            return Err(unsupported(
                                "tls.certificateRefs[0]",
                                "a certificate that is not a core Secret",
                            ));
                        }
                    }
                    ("Passthrough", ServerProtocol::Tls) => {
                        if !tls.certificate_refs.is_empty() {
                            return Err(invalid(
                                "tls.certificateRefs",
                                "Passthrough does not terminate TLS: the backend's own \
                                 certificate is served"
                                    .into(),
                            ));
                        }
                    }
                    ("Passthrough", _) => {
                        return Err(invalid(
                            "tls.mode",
                            "Passthrough is for TLS listeners (protocol TLS)".into(),
                        ));
                    }
                    (other, _) => {
                        return Err(invalid(
                            "tls.mode",
                            format!("{other:?} is not a TLS mode (Terminate or Passthrough)"),
                        ));
                    }
                }
            }
            (ServerProtocol::Http | ServerProtocol::Tcp, None) => {}
        }
        if let Some(allowed) = &self.allowed_routes {
            allowed.validate(&format!("{field}.allowedRoutes"))?;
        }
        Ok(())
    }

    /// The protocol of the listener's port.
    pub fn protocol(&self) -> Result<ServerProtocol, String> {
        match self.protocol.as_str() {
            "HTTP" => Ok(ServerProtocol::Http),
            "HTTPS" => Ok(ServerProtocol::Https),
            "TLS" => Ok(ServerProtocol::Tls),
            "TCP" => Ok(ServerProtocol::Tcp),
            other => Err(format!(
                "{other:?} is not served (HTTP, HTTPS, TLS and TCP are)"
            )),
        }
    }

    /// Whether its TLS is passed through (`Passthrough`).
    pub fn passthrough(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|tls| tls.mode.as_deref() == Some("Passthrough"))
    }

    /// The Secret its TLS is terminated with (validated: one core Secret).
    pub fn certificate(&self) -> Option<&SecretReference> {
        self.tls
            .as_ref()
            .filter(|_| !self.passthrough())
            .and_then(|tls| tls.certificate_refs.first())
    }

    /// The route kinds it takes: those `allowedRoutes.kinds` lists, or its protocol's.
    pub fn route_kinds(&self) -> Vec<RouteKind> {
        let listed = self
            .allowed_routes
            .iter()
            .flat_map(|allowed| &allowed.kinds)
            .filter_map(|kind| RouteKind::parse(&kind.kind))
            .collect::<Vec<_>>();
        if !listed.is_empty() {
            return listed;
        }
        match self.protocol() {
            Ok(ServerProtocol::Http | ServerProtocol::Https) => vec![RouteKind::Http],
            Ok(ServerProtocol::Tls) if self.passthrough() => vec![RouteKind::Tls],
            Ok(ServerProtocol::Tls | ServerProtocol::Tcp) => vec![RouteKind::Tcp],
            Err(_) => Vec::new(),
        }
    }

    /// Which namespaces' routes may attach (`Same` by default).
    pub fn allowed_namespaces(&self) -> AllowedNamespaces {
        let namespaces = self
            .allowed_routes
            .as_ref()
            .and_then(|allowed| allowed.namespaces.as_ref());
        match namespaces.and_then(|n| n.from.as_deref()) {
            Some("All") => AllowedNamespaces::All,
            Some("Selector") => AllowedNamespaces::Selector(
                namespaces
                    .and_then(|n| n.selector.as_ref())
                    .map(|s| s.match_labels.clone())
                    .unwrap_or_default(),
            ),
            _ => AllowedNamespaces::Same,
        }
    }
}

impl AllowedRoutes {
    fn validate(&self, field: &str) -> Result<(), ApiGatewayError> {
        if let Some(namespaces) = &self.namespaces {
            match (namespaces.from.as_deref(), &namespaces.selector) {
                (None | Some("Same" | "All"), _) => {}
                (Some("Selector"), Some(selector)) if selector.match_expressions.is_empty() => {}
                (Some("Selector"), Some(_)) => {
                    return Err(ApiGatewayError::Unsupported {
                        field: format!("{field}.namespaces.selector.matchExpressions"),
                        what: "a namespace selector with expressions (matchLabels is)".into(),
                    });
                }
                (Some("Selector"), None) => {
                    return Err(ApiGatewayError::Invalid {
                        field: format!("{field}.namespaces.selector"),
                        reason: "from: Selector needs a selector".into(),
                    });
                }
                (Some(other), _) => {
                    return Err(ApiGatewayError::Invalid {
                        field: format!("{field}.namespaces.from"),
                        reason: format!("{other:?} is not Same, All or Selector"),
                    });
                }
            }
        }
        for (i, kind) in self.kinds.iter().enumerate() {
            let known = matches!(kind.group.as_deref(), None | Some(GROUP))
                && RouteKind::parse(&kind.kind).is_some();
            if !known {
                return Err(ApiGatewayError::Unsupported {
                    field: format!("{field}.kinds[{i}]"),
                    what: format!(
                        "route kind {:?} (HTTPRoute, TLSRoute and TCPRoute are)",
                        kind.kind
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(yaml: &str) -> ApiGatewaySpec {
        serde_yaml::from_str(yaml).expect("a Gateway spec")
    }

    #[test]
    fn listeners_of_each_protocol_are_accepted_with_their_route_kinds() {
        let spec = gateway(
            "gatewayClassName: nodemesh
listeners:
- {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
- name: https
  hostname: '*.example.com'
  port: 443
  protocol: HTTPS
  tls: {certificateRefs: [{name: example-credential}]}
  allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {shared-gateway: 'true'}}}}
- {name: tls, port: 8443, protocol: TLS, tls: {mode: Passthrough}}
- {name: tcp, port: 31400, protocol: TCP}
",
        );
        assert_eq!(spec.validate(), Ok(()));
        let kinds: Vec<_> = spec.listeners.iter().map(Listener::route_kinds).collect();
        assert_eq!(
            kinds,
            [
                vec![RouteKind::Http],
                vec![RouteKind::Http],
                vec![RouteKind::Tls],
                vec![RouteKind::Tcp]
            ]
        );
        assert_eq!(
            spec.listeners[0].allowed_namespaces(),
            AllowedNamespaces::All
        );
        assert_eq!(
            spec.listeners[2].allowed_namespaces(),
            AllowedNamespaces::Same
        );
        let selector = spec.listeners[1].allowed_namespaces();
        let mut labels = Labels::new();
        assert!(!selector.admits("shop", Some(&labels), "gw"));
        labels.insert("shared-gateway".into(), "true".into());
        assert!(selector.admits("shop", Some(&labels), "gw"));
        assert!(AllowedNamespaces::Same.admits("gw", None, "gw"));
        assert!(!AllowedNamespaces::Same.admits("shop", None, "gw"));
        assert_eq!(
            spec.listeners[1].certificate().map(|r| r.name.as_str()),
            Some("example-credential")
        );
        assert!(spec.listeners[2].certificate().is_none());
    }

    #[test]
    fn listeners_the_gateway_cannot_serve_as_written_are_refused_with_their_field() {
        for (yaml, expected) in [
            (
                "gatewayClassName: nodemesh\nlisteners: []",
                "listeners: at least one listener is required",
            ),
            (
                "gatewayClassName: nodemesh\nlisteners: [{name: a, port: 80, protocol: UDP}]",
                "listeners[0].protocol: \"UDP\" is not served",
            ),
            (
                "gatewayClassName: nodemesh\nlisteners: [{name: a, port: 443, protocol: HTTPS}]",
                "listeners[0].tls: an HTTPS listener needs tls.certificateRefs",
            ),
            (
                "gatewayClassName: nodemesh\nlisteners: [{name: a, port: 443, protocol: HTTPS, tls: {mode: Passthrough}}]",
                "listeners[0].tls.mode: Passthrough is for TLS listeners",
            ),
            (
                "gatewayClassName: nodemesh\nlisteners: [{name: a, port: 80, protocol: HTTP}, {name: a, port: 81, protocol: HTTP}]",
                "listeners[1].name: \"a\" names another listener too",
            ),
            (
                "gatewayClassName: nodemesh\nlisteners: [{name: a, port: 80, protocol: HTTP, hostname: '*'}]",
                "listeners[0].hostname: \"*\" is not a host name",
            ),
            (
                "gatewayClassName: nodemesh\nlisteners: [{name: a, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector, selector: {matchExpressions: [{key: a, operator: Exists}]}}}}]",
                "listeners[0].allowedRoutes.namespaces.selector.matchExpressions: a namespace selector with expressions",
            ),
            (
                "gatewayClassName: nodemesh\nlisteners: [{name: a, port: 80, protocol: HTTP, allowedRoutes: {kinds: [{kind: GRPCRoute}]}}]",
                "listeners[0].allowedRoutes.kinds[0]: route kind \"GRPCRoute\"",
            ),
            (
                "gatewayClassName: nodemesh\naddresses: [{value: 10.0.0.1}]\nlisteners: [{name: a, port: 80, protocol: HTTP}]",
                "addresses: asking for addresses",
            ),
        ] {
            let error = gateway(yaml).validate().expect_err(yaml).to_string();
            assert!(error.starts_with(expected), "{yaml}: {error}");
        }
    }
}
