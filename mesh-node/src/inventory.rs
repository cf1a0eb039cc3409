//! The facts of the cluster as the mesh reads them: pods, Services, the keys that name
//! objects, and the objects a source refused. The ground floor: every other part of the
//! agent may use these types, and they use nothing of the mesh.
use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// A pod's labels. A sorted vector rather than a `BTreeMap`: the agent holds the labels of
/// every pod of the cluster, and a map node costs about 0.5 KiB where three labels take 150 B.
pub type Labels = litemap::LiteMap<String, String>;

/// Label that enrolls a namespace (`true`) or opts a pod out (`false`).
pub const ENROLLMENT_LABEL: &str = "nodemesh.io/enabled";

/// `namespace/name` of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One pod, as the mesh sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub key: ObjectKey,
    pub uid: String,
    /// The workload name used in metrics (the Deployment for a ReplicaSet's pods).
    pub workload_name: String,
    pub node: String,
    pub service_account: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    /// Named container ports, for Services whose `targetPort` is a name.
    pub named_ports: litemap::LiteMap<String, u16>,
    pub ready: bool,
    /// Namespace enrolled and the pod not opted out.
    pub enrolled: bool,
}

impl Workload {
    /// An enrolled, ready pod `<service_account>-0` at 10.0.0.1, for tests.
    #[cfg(test)]
    pub fn for_test(
        node: &str,
        namespace: &str,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> Self {
        Self {
            key: ObjectKey::new(namespace, format!("{service_account}-0")),
            uid: String::new(),
            workload_name: service_account.into(),
            node: node.into(),
            service_account: service_account.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ips: vec!["10.0.0.1".parse().expect("an IP")],
            named_ports: litemap::LiteMap::new(),
            ready: true,
            enrolled: true,
        }
    }

    /// The address of the family of `want`, if the pod has one.
    pub fn ip_like(&self, want: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == want.is_ipv4())
    }

    pub fn app_label(&self) -> &str {
        self.labels
            .get("app.kubernetes.io/name")
            .or_else(|| self.labels.get("app"))
            .map_or("unknown", String::as_str)
    }

    pub fn version_label(&self) -> &str {
        self.labels
            .get("app.kubernetes.io/version")
            .or_else(|| self.labels.get("version"))
            .map_or("unknown", String::as_str)
    }
}

/// The port a Service forwards to on its endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub key: ObjectKey,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Pods behind the Service (selector match, ready), in a stable order.
    pub endpoints: Vec<ObjectKey>,
    /// Set when a ServiceEntry declared it (its key's name is then the host).
    pub external: Option<Box<External>>,
}

/// What a ServiceEntry says of a destination beyond its ports and addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct External {
    pub location: Location,
    pub resolution: Resolution,
    /// Where its traffic goes, for resolution STATIC (IP addresses) and DNS (names);
    /// empty with DNS: the host itself is resolved.
    pub endpoints: Vec<ExternalEndpoint>,
    /// The namespaces that may use it (`exportTo`); `None`: every namespace.
    pub visible_to: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExternalEndpoint {
    /// An IP address, or with resolution DNS a name.
    pub address: String,
    /// The endpoint's own port for each of the entry's ports, by port name.
    pub ports: litemap::LiteMap<String, u16>,
}

/// ServiceEntry `location`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    #[default]
    MeshExternal,
    MeshInternal,
}

/// ServiceEntry `resolution`: how the proxy finds where a connection goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Where the app asked: the entry only names the destination.
    #[default]
    None,
    /// The endpoints' IP addresses.
    Static,
    /// The endpoints' names (or the host) looked up when a connection opens.
    Dns,
    /// As DNS.
    DnsRoundRobin,
}

impl Service {
    /// `name.namespace.svc.cluster.local`, as Istio labels it; a ServiceEntry's host.
    pub fn hostname(&self) -> String {
        if self.external.is_some() {
            return self.key.name.clone();
        }
        format!("{}.{}.svc.cluster.local", self.key.name, self.key.namespace)
    }

    /// Whether pods of `namespace` may use it (a ServiceEntry's `exportTo`).
    pub fn visible_to(&self, namespace: &str) -> bool {
        self.external
            .as_ref()
            .and_then(|e| e.visible_to.as_ref())
            .is_none_or(|namespaces| namespaces.iter().any(|n| n == namespace))
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// A resource the translation refused, with why; kept for logs, metrics and the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// Where it came from (a file path for the file source).
    pub origin: String,
    /// `Kind namespace/name`, or what could be read of it.
    pub resource: String,
    pub error: String,
}

/// `Kind namespace/name`: what makes two objects the same object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// The entries of a Secret a gateway's TLS reads (`credentialName`): the certificate chain
/// and key as `tls.crt` / `tls.key` (type `kubernetes.io/tls`) or Istio's `cert` / `key`,
/// and the CA client certificates must chain to as `ca.crt` (or `cacert`). Nothing else of
/// a Secret is kept.
#[derive(Clone)]
pub struct TlsSecret {
    pub key: ObjectKey,
    entries: BTreeMap<&'static str, bytes::Bytes>,
}

impl TlsSecret {
    pub const CERTIFICATE: [&'static str; 2] = ["tls.crt", "cert"];
    pub const PRIVATE_KEY: [&'static str; 2] = ["tls.key", "key"];
    pub const CA: [&'static str; 2] = ["ca.crt", "cacert"];

    /// The Secret `key` with the `entries` a gateway reads; the others are dropped.
    pub fn new(key: ObjectKey, entries: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        let wanted = |name: &str| {
            Self::CERTIFICATE
                .iter()
                .chain(&Self::PRIVATE_KEY)
                .chain(&Self::CA)
                .find(|known| **known == name)
                .copied()
        };
        let entries = entries
            .into_iter()
            .filter_map(|(name, value)| Some((wanted(&name)?, bytes::Bytes::from(value))))
            .collect();
        Self { key, entries }
    }

    /// The first of `names` the Secret holds.
    pub fn first(&self, names: &[&'static str]) -> Option<&bytes::Bytes> {
        names.iter().find_map(|name| self.entries.get(name))
    }

    /// A fingerprint of what it holds: what is built from it is built again only when it
    /// changes.
    pub fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.entries.hash(&mut hasher);
        hasher.finish()
    }
}

/// Never the key material, in logs or debug output.
impl std::fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSecret")
            .field("key", &self.key)
            .field("entries", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}
