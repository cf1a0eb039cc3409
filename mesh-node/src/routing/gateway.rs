//! Istio's `Gateway` (networking.istio.io): which gateway pods it configures (`selector`),
//! and the servers they listen with (port, protocol, hosts, TLS): what VirtualServices bound
//! to it (`spec.gateways`) route, as `mesh-node gateway` serves them.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `spec` of an Istio Gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// The gateway pods it configures, by label (`istio: ingressgateway`); empty: every
    /// gateway pod.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<Server>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    pub port: ServerPort,
    /// `[namespace/]host`: the hosts served, and which namespaces' VirtualServices may bind
    /// to them (`*/` or none: any, `./`: the Gateway's own).
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Listen on this address only: not supported (the gateway listens on every address of
    /// its pod); present to be refused clearly.
    #[serde(default)]
    pub bind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub default_endpoint: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerPort {
    pub number: u32,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub target_port: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTls {
    /// Answer plain HTTP with a redirect to HTTPS.
    #[serde(default)]
    pub https_redirect: bool,
    #[serde(default)]
    pub mode: Option<String>,
    /// The Secret (in the gateway pod's namespace) holding the certificate and key, and for
    /// MUTUAL the CA that client certificates must chain to.
    #[serde(default)]
    pub credential_name: Option<String>,
    #[serde(default)]
    pub min_protocol_version: Option<String>,
    #[serde(default)]
    pub max_protocol_version: Option<String>,
    // Refused when set: each changes what is served or trusted in a way not implemented.
    #[serde(default)]
    pub credential_names: Vec<String>,
    #[serde(default)]
    pub server_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub ca_crl: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub verify_certificate_spki: Vec<String>,
    #[serde(default)]
    pub verify_certificate_hash: Vec<String>,
    #[serde(default)]
    pub cipher_suites: Vec<String>,
    #[serde(default)]
    pub tls_certificates: Vec<serde_json::Value>,
}

/// What a server's port carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerProtocol {
    /// HTTP/1.1 or HTTP/2 in the clear (`HTTP`, `HTTP2`, `GRPC`).
    Http,
    /// HTTP over TLS: terminated by the gateway (routed by `http`), or passed through
    /// (routed by `tls`, by SNI).
    Https,
    /// TLS around any protocol: terminated (routed by `tcp`) or passed through (by `tls`).
    Tls,
    /// Bytes in the clear (`TCP`, and `MONGO`, `MYSQL`, `REDIS`, which Istio also relays
    /// as TCP), routed by `tcp`.
    Tcp,
}

impl ServerProtocol {
    /// Whether its connections open with a TLS ClientHello.
    pub fn is_tls(self) -> bool {
        matches!(self, ServerProtocol::Https | ServerProtocol::Tls)
    }
}

/// What a server does with TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    /// Terminated with the gateway's certificate only.
    Simple,
    /// Terminated; the client must present a certificate that chains to the credential's CA.
    Mutual,
    /// Not terminated: routed by the ClientHello's SNI to a backend that terminates it.
    Passthrough,
}

impl TlsMode {
    /// Whether the gateway terminates the TLS (with a certificate from `credentialName`).
    pub fn terminates(self) -> bool {
        !matches!(self, TlsMode::Passthrough)
    }
}

/// Why a Gateway cannot be used; `field` is the path inside `spec`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GatewayError {
    #[error("servers: at least one server is required")]
    NoServers,
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{field}: {what} is not supported")]
    Unsupported { field: String, what: String },
}

impl GatewaySpec {
    /// Checks every server; each refusal names its field.
    pub fn validate(&self) -> Result<(), GatewayError> {
        if self.servers.is_empty() {
            return Err(GatewayError::NoServers);
        }
        for (i, server) in self.servers.iter().enumerate() {
            server.validate(&format!("servers[{i}]"))?;
        }
        Ok(())
    }

    /// Whether it configures a gateway pod with `labels`.
    pub fn selects(&self, labels: &crate::inventory::Labels) -> bool {
        self.selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

impl Server {
    fn validate(&self, field: &str) -> Result<(), GatewayError> {
        let invalid = |what: &str, reason: String| GatewayError::Invalid {
            field: format!("{field}.{what}"),
            reason,
        };
        let unsupported = |what: &str, description: &str| GatewayError::Unsupported {
            field: format!("{field}.{what}"),
            what: description.to_string(),
        };
        if !(1..=65535).contains(&self.port.number) {
            return Err(invalid(
                "port.number",
                format!("{} is not a port number (1-65535)", self.port.number),
            ));
        }
        if self.port.target_port.is_some() {
            return Err(unsupported("port.targetPort", "a target port"));
        }
        if self.bind.is_some() {
            return Err(unsupported("bind", "binding to one address"));
        }
        if self.default_endpoint.is_some() {
            return Err(unsupported("defaultEndpoint", "a default endpoint"));
        }
        if self.hosts.is_empty() {
            return Err(invalid("hosts", "at least one host is required".into()));
        }
        for (j, host) in self.hosts.iter().enumerate() {
            ServerHost::parse(host).map_err(|reason| invalid(&format!("hosts[{j}]"), reason))?;
        }
        let protocol = self
            .protocol()
            .map_err(|reason| invalid("port.protocol", reason))?;
        match (protocol, &self.tls) {
            (ServerProtocol::Https | ServerProtocol::Tls, None) => {
                return Err(invalid(
                    "tls",
                    format!(
                        "protocol {} needs tls (mode, and credentialName unless PASSTHROUGH)",
                        self.port.protocol.to_ascii_uppercase()
                    ),
                ));
            }
            (ServerProtocol::Http, Some(tls)) if !tls.https_redirect || tls.mode.is_some() => {
                return Err(invalid(
                    "tls",
                    "on an HTTP server only httpsRedirect may be set".into(),
                ));
            }
            (ServerProtocol::Tcp, Some(_)) => {
                return Err(invalid(
                    "tls",
                    "a TCP server carries no TLS the gateway sees (protocol TLS does)".into(),
                ));
            }
            (ServerProtocol::Https | ServerProtocol::Tls, Some(tls)) => {
                tls.validate(&format!("{field}.tls"))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The protocol the server's port carries.
    pub fn protocol(&self) -> Result<ServerProtocol, String> {
        match self.port.protocol.to_ascii_uppercase().as_str() {
            "HTTP" | "HTTP2" | "GRPC" => Ok(ServerProtocol::Http),
            "HTTPS" => Ok(ServerProtocol::Https),
            "TLS" => Ok(ServerProtocol::Tls),
            "TCP" | "MONGO" | "REDIS" | "MYSQL" => Ok(ServerProtocol::Tcp),
            "" => Err("a protocol is required (HTTP, HTTP2, GRPC, HTTPS, TLS or TCP)".into()),
            other => Err(format!("{other:?} is not a protocol")),
        }
    }

    /// The server's TLS mode; `None` for plain HTTP.
    pub fn tls_mode(&self) -> Option<TlsMode> {
        let tls = self.tls.as_ref()?;
        match tls.mode.as_deref() {
            Some("SIMPLE") => Some(TlsMode::Simple),
            Some("MUTUAL") => Some(TlsMode::Mutual),
            Some("PASSTHROUGH") => Some(TlsMode::Passthrough),
            _ => None,
        }
    }

    /// The hosts, parsed (validated: unparsable ones are dropped).
    pub fn server_hosts(&self) -> Vec<ServerHost> {
        self.hosts
            .iter()
            .filter_map(|h| ServerHost::parse(h).ok())
            .collect()
    }
}

impl ServerTls {
    fn validate(&self, field: &str) -> Result<(), GatewayError> {
        let unsupported = |what: &str, description: &str| GatewayError::Unsupported {
            field: format!("{field}.{what}"),
            what: description.to_string(),
        };
        let terminates = match self.mode.as_deref() {
            Some("SIMPLE" | "MUTUAL") => true,
            Some("PASSTHROUGH") => false,
            Some("AUTO_PASSTHROUGH" | "ISTIO_MUTUAL" | "OPTIONAL_MUTUAL") => {
                return Err(unsupported(
                    "mode",
                    &format!(
                        "{:?} (SIMPLE, MUTUAL and PASSTHROUGH are)",
                        self.mode.as_deref().unwrap_or("")
                    ),
                ));
            }
            Some(other) => {
                return Err(GatewayError::Invalid {
                    field: format!("{field}.mode"),
                    reason: format!("{other:?} is not a TLS mode"),
                });
            }
            None => {
                return Err(GatewayError::Invalid {
                    field: format!("{field}.mode"),
                    reason: "a TLS mode is required (SIMPLE, MUTUAL or PASSTHROUGH)".into(),
                });
            }
        };
        if !terminates {
            // Nothing of the handshake is the gateway's: a setting for it would be ignored.
            return match self.credential_name {
                Some(_) => Err(GatewayError::Invalid {
                    field: format!("{field}.credentialName"),
                    reason: "PASSTHROUGH does not terminate TLS: the backend's own \
                             certificate is served"
                        .into(),
                }),
                None => Ok(()),
            };
        }
        if self.credential_name.as_deref().is_none_or(str::is_empty) {
            return Err(GatewayError::Invalid {
                field: format!("{field}.credentialName"),
                reason: "the Secret holding the certificate is required".into(),
            });
        }
        for (set, what, description) in [
            (
                !self.credential_names.is_empty(),
                "credentialNames",
                "more than one credential",
            ),
            (
                self.server_certificate.is_some(),
                "serverCertificate",
                "a certificate file (use credentialName)",
            ),
            (
                self.private_key.is_some(),
                "privateKey",
                "a key file (use credentialName)",
            ),
            (
                self.ca_certificates.is_some(),
                "caCertificates",
                "a CA file (use credentialName)",
            ),
            (
                self.ca_crl.is_some(),
                "caCrl",
                "a certificate revocation list",
            ),
            (
                !self.subject_alt_names.is_empty(),
                "subjectAltNames",
                "checking client SANs",
            ),
            (
                !self.verify_certificate_spki.is_empty(),
                "verifyCertificateSpki",
                "pinning client keys",
            ),
            (
                !self.verify_certificate_hash.is_empty(),
                "verifyCertificateHash",
                "pinning client certificates",
            ),
            (
                !self.cipher_suites.is_empty(),
                "cipherSuites",
                "choosing cipher suites",
            ),
            (
                !self.tls_certificates.is_empty(),
                "tlsCertificates",
                "certificate files",
            ),
        ] {
            if set {
                return Err(unsupported(what, description));
            }
        }
        for (what, version) in [
            ("minProtocolVersion", &self.min_protocol_version),
            ("maxProtocolVersion", &self.max_protocol_version),
        ] {
            if let Some(version) = version
                && !matches!(version.as_str(), "TLS_AUTO" | "TLSV1_2" | "TLSV1_3")
            {
                return Err(GatewayError::Invalid {
                    field: format!("{field}.{what}"),
                    reason: format!(
                        "{version:?} is not offered (TLS_AUTO, TLSV1_2 or TLSV1_3; older \
                         versions are not safe)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether only TLS 1.3 may be negotiated.
    pub fn tls13_only(&self) -> bool {
        self.min_protocol_version.as_deref() == Some("TLSV1_3")
    }

    /// Whether only TLS 1.2 may be negotiated.
    pub fn tls12_only(&self) -> bool {
        self.max_protocol_version.as_deref() == Some("TLSV1_2")
    }
}

/// One `hosts` entry of a server: the host pattern and which namespaces may bind routes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerHost {
    /// `None`: any namespace; `Some(".")`: the Gateway's own.
    pub namespace: Option<String>,
    /// `api.example.com`, `*.example.com` or `*`.
    pub host: String,
}

impl ServerHost {
    pub fn parse(value: &str) -> Result<Self, String> {
        let (namespace, host) = match value.split_once('/') {
            Some(("*", host)) => (None, host),
            Some((namespace, host)) if !namespace.is_empty() => (Some(namespace.to_string()), host),
            Some(_) => return Err(format!("{value:?}: the namespace before '/' is empty")),
            None => (None, value),
        };
        if !super::host::is_host_pattern(host) {
            return Err(format!(
                "{value:?} is not a host (a DNS name, *.suffix or *, optionally after \
                 \"namespace/\")"
            ));
        }
        Ok(Self {
            namespace,
            host: host.to_ascii_lowercase(),
        })
    }

    /// Whether routes of `route_namespace` may bind to this host of a Gateway in
    /// `gateway_namespace`.
    pub fn admits(&self, route_namespace: &str, gateway_namespace: &str) -> bool {
        match self.namespace.as_deref() {
            None => true,
            Some(".") => route_namespace == gateway_namespace,
            Some(namespace) => route_namespace == namespace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(yaml: &str) -> GatewaySpec {
        serde_yaml::from_str(yaml).expect("a Gateway spec")
    }

    #[test]
    fn istio_task_gateways_are_accepted() {
        let spec = gateway(
            "selector: {istio: ingressgateway}
servers:
- port: {number: 80, name: http, protocol: HTTP}
  hosts: ['*']
  tls: {httpsRedirect: true}
- port: {number: 443, name: https, protocol: HTTPS}
  hosts: [bookinfo/httpbin.example.com, ./helloworld.example.com]
  tls: {mode: SIMPLE, credentialName: httpbin-credential, minProtocolVersion: TLSV1_2}
- port: {number: 8443, name: https-mutual, protocol: HTTPS}
  hosts: ['*.example.com']
  tls: {mode: MUTUAL, credentialName: mutual-credential}
- port: {number: 9443, name: https-passthrough, protocol: HTTPS}
  hosts: [nginx.example.com]
  tls: {mode: PASSTHROUGH}
- port: {number: 31400, name: tcp, protocol: TCP}
  hosts: ['*']
- port: {number: 31443, name: tls-terminated, protocol: TLS}
  hosts: [db.example.com]
  tls: {mode: SIMPLE, credentialName: db-credential}
",
        );
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(spec.servers[3].tls_mode(), Some(TlsMode::Passthrough));
        assert_eq!(spec.servers[4].protocol(), Ok(ServerProtocol::Tcp));
        assert_eq!(spec.servers[5].protocol(), Ok(ServerProtocol::Tls));
        let mut labels = crate::inventory::Labels::new();
        labels.insert("istio".to_string(), "ingressgateway".to_string());
        assert!(spec.selects(&labels));
        assert!(!spec.selects(&crate::inventory::Labels::new()));
        assert_eq!(spec.servers[1].tls_mode(), Some(TlsMode::Simple));
        assert_eq!(spec.servers[2].tls_mode(), Some(TlsMode::Mutual));
        let hosts = spec.servers[1].server_hosts();
        assert!(hosts[0].admits("bookinfo", "istio-system"));
        assert!(!hosts[0].admits("default", "istio-system"));
        assert!(hosts[1].admits("istio-system", "istio-system"));
        assert!(!hosts[1].admits("bookinfo", "istio-system"));
    }

    #[test]
    fn servers_the_gateway_cannot_serve_as_written_are_refused_with_their_field() {
        for (yaml, expected) in [
            ("servers: []", "servers: at least one server is required"),
            (
                "servers: [{port: {number: 0, protocol: HTTP}, hosts: ['*']}]",
                "servers[0].port.number: 0 is not a port number",
            ),
            (
                "servers: [{port: {number: 443, protocol: HTTPS}, hosts: ['*']}]",
                "servers[0].tls: protocol HTTPS needs tls",
            ),
            (
                "servers: [{port: {number: 443, protocol: HTTPS}, hosts: ['*'], tls: {mode: SIMPLE}}]",
                "servers[0].tls.credentialName: the Secret holding the certificate is required",
            ),
            (
                "servers: [{port: {number: 443, protocol: TLS}, hosts: ['*'], tls: {mode: AUTO_PASSTHROUGH}}]",
                "servers[0].tls.mode: \"AUTO_PASSTHROUGH\" (SIMPLE, MUTUAL and PASSTHROUGH are) is not supported",
            ),
            (
                "servers: [{port: {number: 443, protocol: TLS}, hosts: ['*'], tls: {mode: PASSTHROUGH, credentialName: c}}]",
                "servers[0].tls.credentialName: PASSTHROUGH does not terminate TLS",
            ),
            (
                "servers: [{port: {number: 31400, protocol: TCP}, hosts: ['*'], tls: {mode: SIMPLE, credentialName: c}}]",
                "servers[0].tls: a TCP server carries no TLS",
            ),
            (
                "servers: [{port: {number: 31400, protocol: UDP}, hosts: ['*']}]",
                "servers[0].port.protocol: \"UDP\" is not a protocol",
            ),
            (
                "servers: [{port: {number: 443, protocol: HTTPS}, hosts: ['*'], tls: {mode: SIMPLE, credentialName: c, minProtocolVersion: TLSV1_0}}]",
                "servers[0].tls.minProtocolVersion: \"TLSV1_0\" is not offered",
            ),
            (
                "servers: [{port: {number: 443, protocol: HTTPS}, hosts: ['*'], tls: {mode: MUTUAL, credentialName: c, subjectAltNames: [a]}}]",
                "servers[0].tls.subjectAltNames: checking client SANs is not supported",
            ),
            (
                "servers: [{port: {number: 80, protocol: HTTP}, hosts: ['a b']}]",
                "servers[0].hosts[0]: \"a b\" is not a host",
            ),
            (
                "servers: [{port: {number: 80, protocol: HTTP}, hosts: []}]",
                "servers[0].hosts: at least one host is required",
            ),
        ] {
            let error = gateway(yaml).validate().expect_err(yaml).to_string();
            assert!(error.starts_with(expected), "{yaml}: {error}");
        }
        let unknown = serde_yaml::from_str::<GatewaySpec>(
            "servers: [{port: {number: 80, protocol: HTTP}, hosts: ['*'], bogus: 1}]",
        );
        assert!(unknown.is_err(), "an unknown field passed");
    }
}
