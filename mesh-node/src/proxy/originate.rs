//! TLS the proxy opens to a destination outside the mesh when a DestinationRule for its
//! ServiceEntry host says `tls.mode: SIMPLE` (Istio's egress TLS origination): the app
//! speaks plaintext, the proxy encrypts and checks the server's certificate.
use std::{io, sync::Arc};

use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{CONNECT_TIMEOUT, ProxyError, error::HandshakeError};
use crate::{identity::tls, routing::TlsOrigination};

/// Why TLS to the upstream could not be set up; the connection is closed, never sent in
/// plaintext instead.
#[derive(Debug, thiserror::Error)]
pub enum OriginationError {
    #[error("caCertificates {path}: {source}")]
    CaFile { path: String, source: io::Error },
    #[error("caCertificates {0}: no certificate in it")]
    NoCertificate(String),
    #[error("{0:?} is not a name or address to send as SNI")]
    ServerName(String),
}

/// Opens TLS over `stream` to `host` as `tls` says: the SNI (default `host`) is the name
/// the server's certificate must carry, and the chain must end in `caCertificates` (read
/// when the connection opens, so a rotated file applies at once) or the system's roots.
pub async fn originate<S>(
    stream: S,
    host: &str,
    tls: &TlsOrigination,
) -> Result<TlsStream<S>, ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = tls.sni.as_deref().unwrap_or(host);
    let server_name = ServerName::try_from(name.to_owned())
        .map_err(|_| OriginationError::ServerName(name.to_owned()))?;
    let config = client_config(tls.ca_certificates.as_deref())?;
    let handshake = TlsConnector::from(Arc::new(config)).connect(server_name, stream);
    tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| HandshakeError::TimedOut)?
        .map_err(HandshakeError::Io)
        .map_err(ProxyError::from)
}

fn client_config(ca_file: Option<&str>) -> Result<ClientConfig, OriginationError> {
    let roots = match ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let bytes = std::fs::read(path).map_err(|source| OriginationError::CaFile {
                path: path.to_owned(),
                source,
            })?;
            let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
                .filter_map(Result::ok)
                .collect();
            let (added, _) = roots.add_parsable_certificates(certificates);
            if added == 0 {
                return Err(OriginationError::NoCertificate(path.to_owned()));
            }
            roots
        }
        None => tls::system_roots(),
    };
    Ok(tls::external_client_config(roots))
}
