//! One Kubernetes object (YAML or the API server's JSON) → an [`Object`] or the reason it
//! cannot be one. The file source and the kube source both classify through here, so a
//! resource is accepted or refused alike whichever way it arrives.
use serde::{Deserialize, de::DeserializeOwned};

use super::{Object, ObjectId, validate};

/// One YAML document, classified.
pub(crate) enum Document {
    Object(Object),
    Invalid { resource: ObjectId, error: String },
    Ignored { kind: String },
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

#[derive(Deserialize, Default)]
pub(crate) struct MetaNames {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// Reads a document as one kind of [`Object`].
type Parse = fn(serde_yaml::Value) -> Result<Object, serde_yaml::Error>;

fn parse_as<T: DeserializeOwned>(
    value: serde_yaml::Value,
    wrap: fn(Box<T>) -> Object,
) -> Result<Object, serde_yaml::Error> {
    serde_yaml::from_value(value).map(|o| wrap(Box::new(o)))
}

pub(crate) fn classify(meta: TypeMeta, value: serde_yaml::Value) -> Document {
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
    let api = meta.api_version.as_str();
    let (kind, parse): (&'static str, Parse) = match meta.kind.as_str() {
        "Namespace" if api == "v1" => ("Namespace", |v| parse_as(v, Object::Namespace)),
        "Pod" if api == "v1" => ("Pod", |v| parse_as(v, Object::Pod)),
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
        "VirtualService" if NETWORKING.contains(&api) => {
            ("VirtualService", |v| parse_as(v, Object::VirtualService))
        }
        "DestinationRule" if NETWORKING.contains(&api) => {
            ("DestinationRule", |v| parse_as(v, Object::DestinationRule))
        }
        "HTTPRoute" if GATEWAY.contains(&api) => ("HTTPRoute", |v| parse_as(v, Object::HttpRoute)),
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
    let object = match parse(value) {
        Ok(object) => object,
        Err(error) => {
            return Document::Invalid {
                resource,
                error: error.to_string(),
            };
        }
    };
    match validate(&object) {
        Ok(()) => Document::Object(object),
        Err(error) => Document::Invalid {
            resource,
            error: error.to_string(),
        },
    }
}
