//! Where an agent's certificates come from: the in-process CA ([`NodeSigner`]) behind node
//! authorization (it signs only identities of pods scheduled on this node, exactly as the
//! cluster CA checks a remote agent's requests), or `mesh-node ca` over HTTPS
//! ([`RemoteSigner`]).
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::future::BoxFuture;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use tracing::{info, warn};

use crate::{
    identity::{CaError, CertificateAuthority, CertificateSigner, Identity, IssuedCertificate},
    state::StateRx,
};

pub struct NodeSigner {
    pub ca: Arc<CertificateAuthority>,
    /// The requesting node: this agent's.
    pub node: String,
    /// Where pods are scheduled, from the config source.
    pub state: StateRx,
}

impl CertificateSigner for NodeSigner {
    fn sign<'a>(
        &'a self,
        csr_der: CertificateSigningRequestDer<'static>,
        identity: &'a Identity,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<IssuedCertificate, CaError>> {
        Box::pin(async move {
            let state = self.state.borrow().clone();
            CertificateAuthority::authorize(
                &self.ca,
                &self.node,
                identity,
                state.scheduled_pods(),
            )?;
            CertificateAuthority::sign(&self.ca, &csr_der, identity, ttl)
        })
    }
}

/// Where `mesh-node ca` listens: an IP address or a DNS name (resolved at every connection,
/// so a Service whose address changes is followed), and a port. The name only finds the CA:
/// it is authenticated by its SPIFFE identity, never by the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaAddress {
    pub host: String,
    pub port: u16,
}

impl CaAddress {
    /// `https://<host>:<port>[/]` or `<host>:<port>`; IPv6 hosts in brackets.
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.starts_with("http://") {
            return Err("the CA is only spoken to over https".into());
        }
        let bare = value
            .strip_prefix("https://")
            .unwrap_or(value)
            .trim_end_matches('/');
        let invalid = || format!("{value:?} is not https://<host>:<port>");
        if let Ok(addr) = bare.parse::<std::net::SocketAddr>() {
            return Ok(Self {
                host: addr.ip().to_string(),
                port: addr.port(),
            });
        }
        let (host, port) = bare.rsplit_once(':').ok_or_else(invalid)?;
        let port = port.parse().map_err(|_| invalid())?;
        // A DNS name: letters, digits, dots and dashes (what `ServerName` accepts too).
        rustls_pki_types::DnsName::try_from(host).map_err(|_| invalid())?;
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }

    fn server_name(&self) -> Result<rustls_pki_types::ServerName<'static>, CaError> {
        rustls_pki_types::ServerName::try_from(self.host.clone()).map_err(unavailable)
    }
}

impl std::fmt::Display for CaAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// A client of `mesh-node ca` (`--ca-addr`): the same requests, over HTTPS, with this
/// node's token; the CA applies node authorization on its side.
pub struct RemoteSigner {
    pub addr: CaAddress,
    pub tls: Arc<rustls::ClientConfig>,
    /// Read for every request: kubelet rotates projected ServiceAccount tokens in place.
    pub token_file: PathBuf,
}

fn unavailable(error: impl std::fmt::Display) -> CaError {
    CaError::Unavailable(error.to_string().into())
}

impl RemoteSigner {
    fn token(&self) -> Result<String, CaError> {
        // A token of a few hundred bytes on a local volume: not worth a blocking-pool hop.
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| unavailable(format!("reading {}: {e}", self.token_file.display())))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(unavailable(format!(
                "{} is empty",
                self.token_file.display()
            )));
        }
        Ok(token.to_owned())
    }

    async fn request(&self, body: Vec<u8>) -> Result<(hyper::StatusCode, bytes::Bytes), CaError> {
        use http_body_util::BodyExt;

        let token = self.token()?;
        let tcp = tokio::net::TcpStream::connect((self.addr.host.as_str(), self.addr.port))
            .await
            .map_err(|e| unavailable(format!("connecting to {}: {e}", self.addr)))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.addr.server_name()?, tcp)
            .await
            .map_err(unavailable)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(unavailable)?;
        tokio::spawn(connection);
        let request = hyper::Request::post(crate::ca_server::CERTIFICATES_PATH)
            .header(hyper::header::HOST, self.addr.to_string())
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(unavailable)?;
        let response = sender.send_request(request).await.map_err(unavailable)?;
        let status = response.status();
        // A certificate chain is a few KiB: a CA that sends more is not answering.
        let body = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(unavailable)?
            .to_bytes();
        Ok((status, body))
    }
}

impl CertificateSigner for RemoteSigner {
    fn sign<'a>(
        &'a self,
        csr_der: CertificateSigningRequestDer<'static>,
        identity: &'a Identity,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<IssuedCertificate, CaError>> {
        use crate::ca_server::{
            CertificateRequest, CertificateResponse, ErrorResponse, certificates_from_pem,
        };

        Box::pin(async move {
            let csr_pem = pem::encode(&pem::Pem::new(
                "CERTIFICATE REQUEST",
                csr_der.as_ref().to_vec(),
            ));
            let body = serde_json::to_vec(&CertificateRequest {
                identity: identity.to_string(),
                csr_pem,
                ttl_seconds: ttl.as_secs().max(1),
            })
            .map_err(unavailable)?;
            let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, self.request(body))
                .await
                .map_err(|_| {
                    unavailable(format!(
                        "no answer from {} within {REQUEST_TIMEOUT:?}",
                        self.addr
                    ))
                })??;
            if !status.is_success() {
                let reason = serde_json::from_slice::<ErrorResponse>(&body)
                    .map_or_else(|_| String::from_utf8_lossy(&body).into_owned(), |e| e.error);
                return Err(CaError::BadResponse {
                    reason: format!("the CA refused ({status}): {reason}"),
                });
            }
            let answer: CertificateResponse =
                serde_json::from_slice(&body).map_err(|e| CaError::BadResponse {
                    reason: e.to_string(),
                })?;
            let chain_der = certificates_from_pem(answer.chain_pem.as_bytes())
                .map_err(|reason| CaError::BadResponse { reason })?;
            Ok(IssuedCertificate {
                chain_der,
                chain_pem: answer.chain_pem,
                not_after: std::time::UNIX_EPOCH + Duration::from_secs(answer.not_after_unix),
            })
        })
    }
}

/// How long one request to the CA may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read from the CA.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Longest pause between two looks for the CA's root file.
const ROOT_FILE_MAX_DELAY: Duration = Duration::from_secs(30);

/// The CA's roots from `path`, waiting for the file to appear and hold certificates: in
/// Kubernetes it is the CA's ConfigMap, which the CA may publish after the agents start
/// (kubelet then fills the mounted volume). Waits as long as it takes, with backoff; the
/// caller keeps the agent unready meanwhile rather than crash-looping.
pub async fn wait_for_trust_bundle(path: &Path) -> Vec<CertificateDer<'static>> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(ROOT_FILE_MAX_DELAY)
        .without_max_times()
        .build();
    loop {
        // A small file on a local volume, as the token: read in place.
        let problem = match std::fs::read(path) {
            Ok(pem) => match crate::ca_server::certificates_from_pem(&pem) {
                Ok(roots) => {
                    info!(path = %path.display(), roots = roots.len(), "CA root loaded");
                    return roots;
                }
                Err(reason) => reason,
            },
            Err(error) => error.to_string(),
        };
        let delay = delays.next().unwrap_or(ROOT_FILE_MAX_DELAY);
        warn!(path = %path.display(), %problem, retry_in = ?delay, "waiting for the CA's root certificate");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};

    use super::*;
    use crate::{inventory::Workload, state::State};

    /// The CA signs for node A only identities of pods scheduled on node A.
    #[tokio::test]
    async fn identities_of_pods_on_other_nodes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let state = State::with_workloads([
            Workload::for_test("node-a", "shop", "web", &[]),
            Workload::for_test("node-b", "shop", "db", &[]),
        ]);
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(state));
        let signer = NodeSigner {
            ca: Arc::new(ca),
            node: "node-a".into(),
            state: rx,
        };
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let csr = CertificateSigningRequestDer::from(csr.der().to_vec());
        let ttl = Duration::from_secs(3600);

        let web = Identity::new("cluster.local", "shop", "web").unwrap();
        let issued = signer.sign(csr.clone(), &web, ttl).await;
        assert!(issued.is_ok(), "a pod of this node: {:?}", issued.err());
        let db = Identity::new("cluster.local", "shop", "db").unwrap();
        let refused = signer.sign(csr, &db, ttl).await;
        assert!(
            matches!(refused, Err(CaError::NotOnNode { ref node, .. }) if node == "node-a"),
            "a pod of another node: {:?}",
            refused.err()
        );
    }

    /// The agent may start before the CA has published its ConfigMap: it picks the root up
    /// when the file appears, and not before it holds a certificate.
    #[tokio::test(start_paused = true)]
    async fn waits_for_the_root_file_to_appear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root-cert.pem");
        let waiting = tokio::spawn({
            let path = path.clone();
            async move { wait_for_trust_bundle(&path).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished(), "no file yet");
        std::fs::write(&path, "").unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiting.is_finished(), "an empty file holds no root");

        let ca =
            CertificateAuthority::load_or_create(&dir.path().join("ca"), "cluster.local").unwrap();
        let root = std::fs::read(dir.path().join("ca/root-cert.pem")).unwrap();
        std::fs::write(&path, root).unwrap();
        let roots = tokio::time::timeout(ROOT_FILE_MAX_DELAY * 2, waiting)
            .await
            .expect("picked up within one backoff step")
            .unwrap();
        assert_eq!(roots, ca.trust_bundle());
    }
}
