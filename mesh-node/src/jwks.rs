//! The key sets (JWKS) of RequestAuthentication rules that publish them at a URL (`jwksUri`,
//! or the issuer's OpenID discovery document): fetched by the agent, refreshed on an
//! interval, and held for the proxy, which never waits on a fetch.
//!
//! Fails closed, as Istio does: until a key set has been fetched its tokens are refused
//! (401), while requests without a token pass as before. A refresh that fails keeps the
//! keys last fetched and is retried with backoff.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use jsonwebtoken::jwk::JwkSet;
use parking_lot::RwLock;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    identity::tls,
    metrics::NodeMetrics,
    policy::{RemoteJwks, jwt::FetchedKeys},
    state::StateRx,
};

/// Istio's default interval between two fetches of one key set.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(20 * 60);
/// A key set (or discovery document) larger than this is refused: a JWKS is a few KiB.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// The first retry of a failed fetch; later ones double up to the refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0} is not a valid URL")]
    Url(String),
    #[error("request failed: {0}")]
    Request(#[from] hyper_util::client::legacy::Error),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("reading the answer: {0}")]
    Body(String),
    #[error("the answer is not a JSON Web Key Set: {0}")]
    NotJwks(serde_json::Error),
    #[error("the OpenID configuration has no jwks_uri")]
    NoJwksUri,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The key sets the agent holds, by where they are fetched from.
#[derive(Default)]
pub struct JwksCache {
    sets: RwLock<BTreeMap<RemoteJwks, Entry>>,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sets = self.sets.read();
        let uris: Vec<(&str, bool)> = sets
            .iter()
            .map(|(source, entry)| (source.uri.as_str(), entry.keys.is_some()))
            .collect();
        f.debug_struct("JwksCache").field("fetched", &uris).finish()
    }
}

struct Entry {
    keys: Option<Arc<JwkSet>>,
    next_fetch: Instant,
    retries: Option<ExponentialBackoff>,
}

impl FetchedKeys for JwksCache {
    fn keys(&self, source: &RemoteJwks) -> Option<Arc<JwkSet>> {
        self.sets.read().get(source).and_then(|e| e.keys.clone())
    }
}

impl JwksCache {
    /// Keeps the entries of `wanted` (new ones due now) and drops the others.
    fn track(&self, wanted: BTreeSet<RemoteJwks>, now: Instant) {
        let mut sets = self.sets.write();
        sets.retain(|source, _| wanted.contains(source));
        for source in wanted {
            sets.entry(source).or_insert_with(|| Entry {
                keys: None,
                next_fetch: now,
                retries: None,
            });
        }
    }

    fn due(&self, now: Instant) -> Vec<RemoteJwks> {
        self.sets
            .read()
            .iter()
            .filter(|(_, e)| e.next_fetch <= now)
            .map(|(source, _)| source.clone())
            .collect()
    }

    fn next_fetch(&self) -> Option<Instant> {
        self.sets.read().values().map(|e| e.next_fetch).min()
    }

    fn record(&self, source: &RemoteJwks, fetched: Result<JwkSet, FetchError>, refresh: Duration) {
        let now = Instant::now();
        let mut sets = self.sets.write();
        let Some(entry) = sets.get_mut(source) else {
            return; // no longer wanted
        };
        match fetched {
            Ok(keys) => {
                info!(uri = %source.uri, keys = keys.keys.len(), "JWKS fetched");
                entry.keys = Some(Arc::new(keys));
                entry.next_fetch = now + refresh;
                entry.retries = None;
            }
            Err(error) => {
                let retry = entry
                    .retries
                    .get_or_insert_with(|| retries(refresh))
                    .next()
                    .unwrap_or(refresh);
                warn!(
                    uri = %source.uri,
                    %error,
                    retry_in = ?retry,
                    keeping_last = entry.keys.is_some(),
                    "JWKS fetch failed"
                );
                entry.next_fetch = now + retry;
            }
        }
    }
}

fn retries(refresh: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(FIRST_RETRY.min(refresh))
        .with_max_delay(refresh)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// The workloads whose requests a proxy authenticates: an agent's are its node's enrolled
/// pods (other nodes' pods are validated by their own agents), a gateway's its own pod.
#[derive(Clone, Debug)]
pub enum Served {
    EnrolledOn(String),
    Pod(crate::inventory::ObjectKey),
}

impl Served {
    fn serves(&self, workload: &crate::inventory::Workload) -> bool {
        match self {
            Served::EnrolledOn(node) => workload.node == *node && workload.enrolled,
            Served::Pod(key) => workload.key == *key,
        }
    }
}

/// Fetches the key sets that the RequestAuthentications of the `served` workloads name, when
/// they appear and every `refresh` after, until `shutdown`.
pub async fn keep_fresh(
    cache: Arc<JwksCache>,
    mut state: StateRx,
    served: Served,
    refresh: Duration,
    metrics: NodeMetrics,
    shutdown: CancellationToken,
) {
    let client = client();
    loop {
        let wanted = {
            let state = state.borrow_and_update();
            let local = state.workloads.values().filter(|w| served.serves(w));
            state.policies.remote_jwks(local)
        };
        cache.track(wanted, Instant::now());
        let due = cache.due(Instant::now());
        let fetches = due.iter().map(|source| fetch(&client, source));
        for (source, fetched) in due.iter().zip(futures::future::join_all(fetches).await) {
            metrics.jwks_fetched(if fetched.is_ok() { "ok" } else { "error" });
            cache.record(source, fetched, refresh);
        }
        let wake = cache
            .next_fetch()
            .unwrap_or_else(|| Instant::now() + refresh);
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = state.changed() => if changed.is_err() { return },
            () = sleep_until(wake) => {}
        }
    }
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// HTTP and HTTPS (TLS 1.3, the system's root certificates).
fn client() -> HttpsClient {
    let roots = tls::system_roots();
    if roots.is_empty() {
        warn!("no system root certificates: JWKS can be fetched over http:// only");
    }
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls::external_client_config(roots))
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// One key set: from its URL, or through the issuer's discovery document.
async fn fetch(client: &HttpsClient, source: &RemoteJwks) -> Result<JwkSet, FetchError> {
    let work = async {
        let uri = if source.discovery {
            let document: serde_json::Value =
                serde_json::from_slice(&get(client, &source.uri).await?)
                    .map_err(FetchError::NotJwks)?;
            document
                .get("jwks_uri")
                .and_then(|u| u.as_str())
                .ok_or(FetchError::NoJwksUri)?
                .to_owned()
        } else {
            source.uri.clone()
        };
        serde_json::from_slice(&get(client, &uri).await?).map_err(FetchError::NotJwks)
    };
    timeout(source.timeout, work)
        .await
        .map_err(|_| FetchError::Timeout(source.timeout))?
}

async fn get(client: &HttpsClient, uri: &str) -> Result<Bytes, FetchError> {
    let parsed: http::Uri = uri.parse().map_err(|_| FetchError::Url(uri.to_owned()))?;
    let response = client.get(parsed).await?;
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status()));
    }
    Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
        .collect()
        .await
        .map(|body| body.to_bytes())
        .map_err(|e| FetchError::Body(e.to_string()))
}

#[cfg(test)]
mod tests;
