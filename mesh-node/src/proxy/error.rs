//! Why a connection could not be proxied: one error type for the whole proxy, each failure
//! a variant that keeps its cause (`source()`), and the names metrics and access logs give it.
use std::{io, net::SocketAddr};

use super::{hbone, http::BoxError};
use crate::{
    access_log::Refusal,
    identity::{IdentityError, manager::ManagerError, tls::TlsError},
    inventory::ObjectKey,
    netns::NetnsError,
    plan::admission::Refused,
};

/// Why a connection could not be proxied; doubles as the metric label.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no original destination recorded for this connection")]
    NoOriginalDestination,
    #[error("service {service} has no ready endpoint for port {port}")]
    NoEndpoint { service: String, port: u16 },
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("creating a socket in the pod's netns: {0}")]
    Socket(#[from] SocketError),
    #[error("workload certificate: {0}")]
    Certificate(#[from] CertificateError),
    #[error("TLS: {0}")]
    Tls(#[from] HandshakeError),
    #[error("HBONE: {0}")]
    Hbone(#[from] hbone::HboneError),
    #[error("the pod has no address of the destination's family")]
    NoSourceAddress,
    #[error("CONNECT to {0}, which is not this pod (no open relay)")]
    NotLocal(SocketAddr),
    /// `outboundTrafficPolicy` REGISTRY_ONLY, and no Service, pod or ServiceEntry is there.
    #[error("{0} is not in the mesh's registry (outboundTrafficPolicy REGISTRY_ONLY)")]
    NotRegistered(SocketAddr),
    /// A gateway's TCP or passed through TLS connection that no VirtualService route takes
    /// (or whose route's weights are all 0).
    #[error("no route: no tcp or tls route of a VirtualService bound to the gateway takes it")]
    NoRoute,
    #[error("looking up {host}: {source}")]
    Lookup { host: String, source: io::Error },
    /// TLS origination (a DestinationRule's `tls.mode: SIMPLE`) could not be set up.
    #[error("TLS origination: {0}")]
    Originate(#[from] super::originate::OriginationError),
    /// Boxed: hyper's and hyper-util's connection errors differ.
    #[error("HTTP: {0}")]
    Http(#[source] BoxError),
    /// The planner refused it: the proxy's own port, PeerAuthentication or
    /// AuthorizationPolicy.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The dial of the tunnel this connection waited for failed (shared by every connection
    /// that waited for it; it speaks as that error).
    #[error(transparent)]
    SharedDial(std::sync::Arc<ProxyError>),
}

/// Why the proxy could not make or read a socket in a pod's network namespace.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Why the proxy has no certificate to speak for a pod.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Unavailable(#[from] ManagerError),
    #[error("this agent has no CA; HBONE is off")]
    NoCa,
    #[error("pod {0} is gone")]
    PodGone(ObjectKey),
}

/// Why a TLS session with a peer proxy did not come up.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Config(#[from] TlsError),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("no TLS handshake with {0} within the timeout")]
    TimedOutWith(SocketAddr),
    #[error("no TLS handshake within the timeout")]
    TimedOut,
}

impl From<NetnsError> for ProxyError {
    fn from(error: NetnsError) -> Self {
        ProxyError::Socket(error.into())
    }
}

impl ProxyError {
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoOriginalDestination => "no_original_destination",
            ProxyError::NoEndpoint { .. } => "no_endpoint",
            ProxyError::Connect { .. } => "connect_failed",
            ProxyError::ConnectTimeout(_) => "connect_timeout",
            ProxyError::Socket(_) => "socket",
            ProxyError::Certificate(_) => "certificate",
            ProxyError::Tls(_) => "tls",
            ProxyError::Hbone(_) => "hbone",
            ProxyError::NoSourceAddress => "no_source_address",
            ProxyError::NotLocal(_) => "not_local",
            ProxyError::NotRegistered(_) => "not_registered",
            ProxyError::NoRoute => "no_route",
            ProxyError::Lookup { .. } => "dns_lookup",
            ProxyError::Originate(_) => "tls_origination",
            ProxyError::Refused(Refused::OwnListener(_)) => "own_listener",
            ProxyError::Refused(Refused::MtlsRequired) => "mtls_required",
            ProxyError::Refused(Refused::Denied { .. }) => "authorization_denied",
            ProxyError::Http(_) => "http",
            ProxyError::SharedDial(error) => error.reason(),
        }
    }

    /// Envoy's response flag for a connection the proxy could not serve.
    pub fn response_flags(&self) -> &'static str {
        match self {
            ProxyError::NoOriginalDestination
            | ProxyError::NotLocal(_)
            | ProxyError::Refused(Refused::OwnListener(_))
            | ProxyError::NotRegistered(_)
            | ProxyError::NoRoute => "NR",
            ProxyError::NoEndpoint { .. } => "UH",
            ProxyError::Refused(Refused::Denied { .. } | Refused::MtlsRequired) => "RBAC",
            ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout(_)
            | ProxyError::Socket(_)
            | ProxyError::Certificate(_)
            | ProxyError::Tls(_)
            | ProxyError::Hbone(_)
            | ProxyError::NoSourceAddress
            | ProxyError::Lookup { .. }
            | ProxyError::Originate(_) => "UF",
            ProxyError::Http(_) => "-",
            ProxyError::SharedDial(error) => error.response_flags(),
        }
    }

    /// This error as the access log and the other telemetry sinks record it.
    pub fn refusal(&self) -> Refusal {
        if let ProxyError::SharedDial(error) = self {
            return error.refusal();
        }
        let policy = match self {
            ProxyError::Refused(Refused::Denied { policy, .. }) => Some(policy.clone()),
            ProxyError::Refused(Refused::MtlsRequired) => {
                Some("PeerAuthentication (mTLS STRICT)".into())
            }
            ProxyError::NotRegistered(_) => Some("outboundTrafficPolicy REGISTRY_ONLY".into()),
            _ => None,
        };
        Refusal {
            response_flags: self.response_flags(),
            policy,
            error: self.to_string(),
        }
    }
}
