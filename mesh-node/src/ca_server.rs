//! `mesh-node ca`: the cluster CA as a service, for agents started with `--ca-addr`.
//!
//! HTTPS (TLS 1.3, the CA presenting the SPIFFE identity `<root-ns>/sa/nodemesh-ca`), one
//! endpoint: `POST /v1/certificates` with a JSON [`CertificateRequest`] and the agent's token
//! as `Authorization: Bearer`. The token says which node asks; the CA signs only identities
//! of pods scheduled on that node (node authorization). Tokens come from a file
//! ([`TokenFile`]) or, in Kubernetes, are the agents' projected ServiceAccount tokens checked
//! with TokenReview ([`token_review`]); both are an [`Authenticator`]. In Kubernetes the root
//! lives in a Secret and the trust bundle is published for agents ([`cluster_root`]).
use std::{
    collections::HashMap,
    convert::Infallible,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use rcgen::{CertificateParams, KeyPair};
use rustls::ServerConfig;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    identity::{CaError, CertificateAuthority, Identity, WorkloadCert},
    state::StateRx,
};

/// The CA's port, as Istio's (istiod serves certificates on 15012).
pub const DEFAULT_PORT: u16 = 15012;
/// The service account the CA's serving certificate names.
pub const SERVICE_ACCOUNT: &str = "nodemesh-ca";
pub const CERTIFICATES_PATH: &str = "/v1/certificates";
/// How long a client of the CA may take to complete TLS, and then to send a request's
/// headers: agents send theirs at once, so anything slower is not an agent.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of the CA service's own serving certificate (capped at the CA's expiry).
const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Requests are a CSR and a name: anything larger is not one.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What an agent asks for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub identity: String,
    /// PKCS#10, PEM. The key never leaves the agent.
    pub csr_pem: String,
    pub ttl_seconds: u64,
}

/// What the CA answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// Leaf first, then intermediates, PEM.
    pub chain_pem: String,
    pub not_after_unix: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

pub mod cluster_root;
#[cfg(test)]
mod scripted_api;
pub mod token_review;

/// Who a bearer token belongs to.
pub trait Authenticator: Send + Sync + 'static {
    fn caller_of<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Refusal>>;
}

/// Who asks the CA for certificates, as its token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The node the caller runs on.
    pub node: String,
    /// `None`: a node agent, which may ask for every identity with a pod on its node.
    /// `Some((namespace, service account))`: a workload that runs its own proxy (a gateway),
    /// which may ask for its own identity only, while a pod of it runs on its node.
    pub workload: Option<(String, String)>,
}

impl Caller {
    /// The agent of `node`.
    pub fn agent(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            workload: None,
        }
    }

    /// Whether this caller may ask for `identity` (the CA then checks its pod's node).
    pub(crate) fn may_ask_for(&self, identity: &Identity) -> Result<(), String> {
        match &self.workload {
            Some((namespace, service_account))
                if identity.namespace() != namespace
                    || identity.service_account() != service_account =>
            {
                Err(format!(
                    "a token of {namespace}/{service_account} gets only its own identity, \
                     not {identity}"
                ))
            }
            _ => Ok(()),
        }
    }
}

impl From<&str> for Caller {
    fn from(node: &str) -> Self {
        Self::agent(node)
    }
}

/// Why a token gets no certificate; each maps to the status the CA answers with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a valid token for us (unknown, expired, wrong audience): 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token, but not an agent's, or its node cannot be established: 403.
    #[error("{0}")]
    Forbidden(String),
    /// The token could not be checked now (API server unreachable): 503, the agent retries.
    #[error("cannot check the token now: {0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Self::Unauthenticated(_) => 401,
            Self::Forbidden(_) => 403,
            Self::Unavailable(_) => 503,
        }
    }
}

/// Static tokens from a file: one `<node-name> <token>` per line, `#` comments.
pub struct TokenFile {
    nodes_by_token: HashMap<String, String>,
}

impl TokenFile {
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let mut nodes_by_token = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(node), Some(token), None) => {
                    nodes_by_token.insert(token.to_string(), node.to_string());
                }
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{}:{}: expected `<node-name> <token>`",
                            path.display(),
                            number + 1
                        ),
                    ));
                }
            }
        }
        Ok(Self { nodes_by_token })
    }
}

impl Authenticator for TokenFile {
    fn caller_of<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Refusal>> {
        Box::pin(async move {
            self.nodes_by_token
                .get(token)
                .map(|node| Caller::agent(node.as_str()))
                .ok_or_else(|| Refusal::Unauthenticated("unknown token".into()))
        })
    }
}

/// The identity the CA service presents, which agents pin.
pub fn ca_identity(trust_domain: &str, root_namespace: &str) -> Result<Identity, CaError> {
    Ok(Identity::new(
        trust_domain,
        root_namespace,
        SERVICE_ACCOUNT,
    )?)
}

/// A serving certificate for the CA service itself, signed by the CA.
pub fn serving_certificate(
    ca: &CertificateAuthority,
    identity: &Identity,
) -> Result<WorkloadCert, CaError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    let csr = CertificateSigningRequestDer::from(csr.der().to_vec());
    let issued = ca.sign(&csr, identity, SERVING_CERT_TTL)?;
    Ok(WorkloadCert {
        identity: identity.clone(),
        chain: issued.chain_der,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_after: issued.not_after,
    })
}

/// The CA service: signs what node authorization allows.
pub struct CaService {
    pub ca: Arc<CertificateAuthority>,
    pub authenticator: Arc<dyn Authenticator>,
    /// Where pods are scheduled.
    pub state: StateRx,
    /// The longest lifetime a certificate gets, whatever its requester asks for: a stolen
    /// agent token must not mint certificates that outlive its revocation.
    pub max_cert_ttl: Duration,
}

impl CaService {
    /// Serves on an already bound listener until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<ServerConfig>,
        shutdown: CancellationToken,
    ) {
        let acceptor = TlsAcceptor::from(tls);
        loop {
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "CA accept failed");
                        crate::accept::back_off(&error).await;
                        continue;
                    }
                },
            };
            let (service, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                let tls = match handshake.await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        debug!(%peer, %error, "CA TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "CA TLS handshake timed out");
                        return;
                    }
                };
                let handler = service_fn(move |request| {
                    let service = service.clone();
                    async move { Ok::<_, Infallible>(service.handle(request).await) }
                });
                if let Err(error) = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), handler)
                    .await
                {
                    debug!(%peer, %error, "CA connection failed");
                }
            });
        }
    }

    /// The lifetime a request for `asked` seconds gets: at most `max_cert_ttl`.
    fn ttl_for(&self, asked: u64) -> Duration {
        Duration::from_secs(asked).min(self.max_cert_ttl)
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.sign(request).await {
            Ok(response) => json(StatusCode::OK, &response),
            Err((status, error)) => {
                warn!(%status, %error, "certificate request refused");
                json(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                    &ErrorResponse { error },
                )
            }
        }
    }

    async fn sign(&self, request: Request<Incoming>) -> Result<CertificateResponse, (u16, String)> {
        if request.method() != Method::POST || request.uri().path() != CERTIFICATES_PATH {
            return Err((404, format!("only POST {CERTIFICATES_PATH}")));
        }
        let token = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
            .ok_or((401, "missing bearer token".to_string()))?;
        let caller = self
            .authenticator
            .caller_of(&token)
            .await
            .map_err(|refusal| (refusal.status(), refusal.to_string()))?;
        let node = &caller.node;
        let body = Limited::new(request.into_body(), MAX_REQUEST_BYTES)
            .collect()
            .await
            .map_err(|e| (400, format!("reading the request: {e}")))?
            .to_bytes();
        let asked: CertificateRequest = serde_json::from_slice(&body)
            .map_err(|e| (400, format!("not a certificate request: {e}")))?;
        let identity: Identity = asked.identity.parse().map_err(|e| (400, format!("{e}")))?;
        let csr = CertificateSigningRequestDer::from_pem_slice(asked.csr_pem.as_bytes())
            .map_err(|e| (400, format!("CSR: {e}")))?;
        caller.may_ask_for(&identity).map_err(|e| (403, e))?;
        let state = self.state.borrow().clone();
        self.ca
            .authorize(node, &identity, state.scheduled_pods())
            .map_err(|e| (403, e.to_string()))?;
        let issued = self
            .ca
            .sign(&csr, &identity, self.ttl_for(asked.ttl_seconds))
            .map_err(|e| (400, e.to_string()))?;
        info!(%identity, node, "certificate issued");
        Ok(CertificateResponse {
            chain_pem: issued.chain_pem,
            not_after_unix: issued
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Parses PEM certificates (a chain or a bundle).
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if certificates.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests;
