//! One Kubernetes object (YAML or the API server's JSON) → an [`Object`] or the reason it
//! cannot be one. The file source and the kube source both classify through here, so a
//! resource is accepted or refused alike whichever way it arrives.
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, de::DeserializeOwned};

use super::{Object, translate::IstioObject, validate};
use crate::{
    inventory::ObjectId,
    policy::{Action, AuthorizationPolicySpec, PeerAuthenticationSpec, RequestAuthenticationSpec},
};

/// One YAML document, classified.
#[derive(Clone)]
pub(crate) enum Document {
    Object(Object),
    /// Refused. A security resource is still enforced, as `fail_closed`: the form that
    /// denies at least what the resource meant to deny (see [`fail_closed`]); other kinds
    /// fall back to their last good version.
    Invalid {
        resource: ObjectId,
        error: String,
        fail_closed: Option<Object>,
    },
    Ignored {
        kind: String,
    },
}

#[derive(Deserialize)]
pub(crate) struct TypeMeta {
    #[serde(rename = "apiVersion", default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: MetaNames,
    #[serde(default)]
    pub items: Vec<serde_yaml::Value>,
}

impl TypeMeta {
    /// What an object of the API server is, known before its text is read: its watch
    /// says the kind, its parsed metadata the names.
    pub(crate) fn known(
        api_version: &str,
        kind: &str,
        namespace: Option<String>,
        name: Option<String>,
    ) -> Self {
        Self {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            metadata: MetaNames {
                name: name.unwrap_or_default(),
                namespace,
            },
            items: Vec::new(),
        }
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct MetaNames {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// A document the typed objects are read from: YAML from a file, or the API server's JSON
/// text (`kube::JsonDocument`; converting it to YAML first cost the kube source a second
/// copy of every object).
pub(crate) trait Tree {
    fn read<T: DeserializeOwned>(&self) -> Result<T, String>;
    /// The document's `spec` as YAML, which the fail-closed forms read.
    fn spec(&self) -> serde_yaml::Value;
}

impl Tree for serde_yaml::Value {
    fn read<T: DeserializeOwned>(&self) -> Result<T, String> {
        T::deserialize(self).map_err(|e| e.to_string())
    }

    fn spec(&self) -> serde_yaml::Value {
        self.get("spec").cloned().unwrap_or_default()
    }
}

fn parse_as<V: Tree, T: DeserializeOwned>(
    value: &V,
    wrap: fn(Arc<T>) -> Object,
) -> Result<Object, String> {
    value.read().map(|o| wrap(Arc::new(o)))
}

/// A pod is read into what the mesh knows of it at once: the pod itself is not kept.
fn parse_pod<V: Tree>(value: &V) -> Result<Object, String> {
    let pod: super::core::Pod = value.read()?;
    let workload = super::translate::pod(&pod).map_err(|e| e.to_string())?;
    Ok(Object::Pod(Arc::new(workload)))
}

/// A Secret is read into the certificate entries a gateway may serve: nothing else of it
/// is kept.
fn parse_secret<V: Tree>(value: &V) -> Result<Object, String> {
    let secret: super::core::Secret = value.read()?;
    let key = crate::inventory::ObjectKey::new(
        secret
            .metadata
            .namespace
            .unwrap_or_else(|| "default".into()),
        secret.metadata.name.unwrap_or_default(),
    );
    let data = secret.data.into_iter().flatten().map(|(k, v)| (k, v.0));
    let string_data = secret
        .string_data
        .into_iter()
        .flatten()
        .map(|(k, v)| (k, v.into_bytes()));
    // `stringData` last: it wins, as the API server merges it over `data`.
    Ok(Object::Secret(Arc::new(crate::inventory::TlsSecret::new(
        key,
        data.chain(string_data),
    ))))
}

pub(crate) fn classify<V: Tree>(meta: TypeMeta, value: &V) -> Document {
    const SECURITY: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
    // The three versions Istio serves share one schema.
    const NETWORKING: [&str; 3] = [
        "networking.istio.io/v1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
    ];
    const GATEWAY: [&str; 2] = [
        "gateway.networking.k8s.io/v1",
        "gateway.networking.k8s.io/v1beta1",
    ];
    // TLSRoute and TCPRoute are in the Gateway API's experimental channel.
    const GATEWAY_ALPHA: [&str; 2] = [
        "gateway.networking.k8s.io/v1alpha2",
        "gateway.networking.k8s.io/v1alpha3",
    ];
    let api = meta.api_version.as_str();
    // Reads a document as one kind of [`Object`].
    type Parse<V> = fn(&V) -> Result<Object, String>;
    let (kind, parse): (&'static str, Parse<V>) = match meta.kind.as_str() {
        "Namespace" if api == "v1" => ("Namespace", |v| parse_as(v, Object::Namespace)),
        "Pod" if api == "v1" => ("Pod", parse_pod),
        "Service" if api == "v1" => ("Service", |v| parse_as(v, Object::Service)),
        "EndpointSlice" if api == "discovery.k8s.io/v1" => {
            ("EndpointSlice", |v| parse_as(v, Object::EndpointSlice))
        }
        "PeerAuthentication" if SECURITY.contains(&api) => ("PeerAuthentication", |v| {
            parse_as(v, Object::PeerAuthentication)
        }),
        "AuthorizationPolicy" if SECURITY.contains(&api) => ("AuthorizationPolicy", |v| {
            parse_as(v, Object::AuthorizationPolicy)
        }),
        "RequestAuthentication" if SECURITY.contains(&api) => ("RequestAuthentication", |v| {
            parse_as(v, Object::RequestAuthentication)
        }),
        "VirtualService" if NETWORKING.contains(&api) => {
            ("VirtualService", |v| parse_as(v, Object::VirtualService))
        }
        "DestinationRule" if NETWORKING.contains(&api) => {
            ("DestinationRule", |v| parse_as(v, Object::DestinationRule))
        }
        "ServiceEntry" if NETWORKING.contains(&api) => {
            ("ServiceEntry", |v| parse_as(v, Object::ServiceEntry))
        }
        "HTTPRoute" if GATEWAY.contains(&api) => ("HTTPRoute", |v| parse_as(v, Object::HttpRoute)),
        "Gateway" if NETWORKING.contains(&api) => ("Gateway", |v| parse_as(v, Object::Gateway)),
        "Gateway" if GATEWAY.contains(&api) => (crate::routing::gateway_api::KIND, |v| {
            parse_as(v, Object::ApiGateway)
        }),
        "TLSRoute" if GATEWAY_ALPHA.contains(&api) => {
            ("TLSRoute", |v| parse_as(v, Object::TlsRoute))
        }
        "TCPRoute" if GATEWAY_ALPHA.contains(&api) => {
            ("TCPRoute", |v| parse_as(v, Object::TcpRoute))
        }
        "Secret" if api == "v1" => ("Secret", parse_secret),
        _ => return Document::Ignored { kind: meta.kind },
    };
    let resource = ObjectId {
        kind,
        namespace: if kind == "Namespace" {
            String::new()
        } else {
            meta.metadata.namespace.unwrap_or_else(|| "default".into())
        },
        name: meta.metadata.name,
    };
    let error = match parse(value).and_then(|object| {
        validate(&object)
            .map(|()| object)
            .map_err(|e| e.to_string())
    }) {
        Ok(object) => return Document::Object(object),
        Err(error) => error,
    };
    let fail_closed = fail_closed(&resource, &value.spec());
    let error = match &fail_closed {
        Some(Object::PeerAuthentication(_)) => {
            format!("{error}; enforced as STRICT for its selection until fixed")
        }
        Some(Object::AuthorizationPolicy(policy)) => match policy.spec.action {
            Action::Allow if policy.spec.rules.is_empty() => format!(
                "{error}; enforced as an ALLOW that matches nothing (its selection gets only \
                 what other ALLOW policies allow) until fixed"
            ),
            Action::Allow => format!(
                "{error}; enforced with its {} valid rule(s) only until fixed",
                policy.spec.rules.len()
            ),
            _ => format!("{error}; enforced as DENY of its whole selection until fixed"),
        },
        Some(Object::RequestAuthentication(_)) => {
            format!("{error}; its selection refuses every token (401) until fixed")
        }
        _ => error,
    };
    Document::Invalid {
        resource,
        error,
        fail_closed,
    }
}

/// The stand-in for a security resource that cannot be applied as written: a security
/// resource that is refused must never widen access (DESIGN.md, "Fail closed"), and a last
/// good version would not survive a restart. `None` for every other kind.
fn fail_closed(resource: &ObjectId, spec: &serde_yaml::Value) -> Option<Object> {
    let metadata = ObjectMeta {
        name: Some(resource.name.clone()),
        namespace: Some(resource.namespace.clone()),
        ..ObjectMeta::default()
    };
    match resource.kind {
        "PeerAuthentication" => Some(Object::PeerAuthentication(Arc::new(IstioObject {
            metadata,
            spec: PeerAuthenticationSpec::fail_closed(spec),
        }))),
        "AuthorizationPolicy" => AuthorizationPolicySpec::fail_closed(spec)
            .map(|spec| Object::AuthorizationPolicy(Arc::new(IstioObject { metadata, spec }))),
        "RequestAuthentication" => Some(Object::RequestAuthentication(Arc::new(IstioObject {
            metadata,
            spec: RequestAuthenticationSpec::fail_closed(spec),
        }))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_yaml::Value;

    use super::*;
    use crate::config::translate;

    /// Field names the mesh reads, and some it does not, so random specs reach deep.
    fn field() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(vec![
                "selector",
                "matchLabels",
                "rules",
                "from",
                "to",
                "source",
                "operation",
                "paths",
                "notPaths",
                "methods",
                "ports",
                "principals",
                "namespaces",
                "ipBlocks",
                "when",
                "key",
                "values",
                "action",
                "mtls",
                "mode",
                "portLevelMtls",
                "hosts",
                "http",
                "tcp",
                "route",
                "destination",
                "host",
                "subset",
                "subsets",
                "weight",
                "timeout",
                "retries",
                "attempts",
                "perTryTimeout",
                "fault",
                "delay",
                "abort",
                "match",
                "uri",
                "prefix",
                "exact",
                "regex",
                "headers",
                "trafficPolicy",
                "outlierDetection",
                "baseEjectionTime",
                "connectionPool",
                "parentRefs",
                "backendRefs",
                "matches",
                "labels",
                "name",
                "namespace",
                "port",
                "targetPort",
                "clusterIP",
                "clusterIPs",
                "containers",
                "podIP",
                "podIPs",
                "nodeName",
                "endpoints",
                "addresses",
                "targetRef",
                "targetRefs",
                "provider",
                "jwtRules",
                "issuer",
                "jwksUri",
                "jwks",
                "audiences",
                "fromHeaders",
                "outputClaimToHeaders",
                "resolution",
                "location",
                "exportTo",
                "number",
                "protocol",
            ])
            .prop_map(str::to_string),
            "[a-zA-Z]{1,8}",
        ]
    }

    fn yaml() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            any::<f64>().prop_map(|n| Value::Number(n.into())),
            "[a-zA-Z0-9*/{}.:%-]{0,16}".prop_map(Value::String),
            proptest::sample::select(vec![
                "ALLOW",
                "DENY",
                "AUDIT",
                "CUSTOM",
                "STRICT",
                "PERMISSIVE",
                "DISABLE",
                "strict",
                "10s",
                "1h",
                "100000000000000000000s",
                "10.0.0.0/8",
                "::1",
                "*",
                "/a/{*}",
            ])
            .prop_map(|s| Value::String(s.to_string())),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Sequence),
                proptest::collection::vec((field(), inner), 0..6).prop_map(|fields| {
                    Value::Mapping(
                        fields
                            .into_iter()
                            .map(|(key, value)| (Value::String(key), value))
                            .collect(),
                    )
                }),
            ]
        })
    }

    fn document() -> impl Strategy<Value = Value> {
        let kinds = vec![
            ("v1", "Namespace"),
            ("v1", "Pod"),
            ("v1", "Service"),
            ("discovery.k8s.io/v1", "EndpointSlice"),
            ("security.istio.io/v1", "PeerAuthentication"),
            ("security.istio.io/v1beta1", "AuthorizationPolicy"),
            ("security.istio.io/v1", "RequestAuthentication"),
            ("networking.istio.io/v1", "VirtualService"),
            ("networking.istio.io/v1beta1", "DestinationRule"),
            ("networking.istio.io/v1", "ServiceEntry"),
            ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        ];
        (proptest::sample::select(kinds), "[a-z]{0,6}", yaml(), yaml()).prop_map(
            |((api, kind), name, spec, status)| {
                let text = format!(
                    "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: '{name}', namespace: shop}}\n"
                );
                let mut value: Value = serde_yaml::from_str(&text).expect("a header");
                if let Value::Mapping(fields) = &mut value {
                    fields.insert("spec".into(), spec);
                    fields.insert("status".into(), status);
                }
                value
            },
        )
    }

    proptest! {
        /// Any object of any kind the mesh reads: classified without a panic, the state
        /// built from whatever is accepted, and a refused security policy always has its
        /// fail-closed stand-in (an AUDIT policy excepted).
        #[test]
        fn fuzz_object_classification(documents in proptest::collection::vec(document(), 1..6)) {
            let mut objects = Vec::new();
            for value in documents {
                let meta = TypeMeta::deserialize(&value).expect("the header");
                match classify(meta, &value) {
                    Document::Object(object) => objects.push(object),
                    Document::Invalid { resource, fail_closed, .. } => {
                        if matches!(resource.kind, "PeerAuthentication" | "RequestAuthentication") {
                            prop_assert!(fail_closed.is_some(), "{resource}");
                        }
                        objects.extend(fail_closed);
                    }
                    Document::Ignored { .. } => {}
                }
            }
            translate(&objects, Vec::new(), "nodemesh-system");
        }
    }
}
