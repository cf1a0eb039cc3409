//! Agents' projected ServiceAccount tokens, checked by the API server (TokenReview).
//!
//! kubelet projects a token with audience `nodemesh-ca` into each agent pod. The CA asks the
//! API server whose token it is and accepts only the agent ServiceAccount's; the requesting
//! node is the node of the pod the token is bound to: named in the token itself on recent
//! Kubernetes (1.30+, `ServiceAccountTokenPodNodeInfo`), else read from that pod, whose uid
//! must match the token's so a token of a deleted pod cannot speak for whatever pod took its
//! name.
use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use futures::future::BoxFuture;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, api::PostParams};
use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Authenticator, Caller, Refusal};

/// The bound pod's node, in tokens of Kubernetes 1.30+ (`ServiceAccountTokenPodNodeInfo`).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The bound pod, in every projected token: the fallback to find the node.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// How long a positive answer is reused, so a node renewing many certificates at once costs
/// one TokenReview. Short, because a deleted pod's token must stop working soon.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// How long a refusal (a token the API server did not accept, or not an agent's) is reused,
/// so that a client repeating a bad token cannot turn each request into a TokenReview.
/// Short, so a token that becomes valid (a pod just scheduled) is not refused for long.
pub const NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(10);
/// Answers kept at most: a few per node (tokens rotate hourly). When full, expired ones are
/// dropped; if none are, new answers are simply not cached.
const CACHE_CAPACITY: usize = 16_384;
/// TokenReviews (and pod reads) in flight at once: a flood of unknown tokens waits its turn
/// instead of becoming a flood of calls to the API server.
pub const MAX_CONCURRENT_REVIEWS: usize = 8;
/// How long a request waits for its turn before it is told to retry (503).
const REVIEW_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// Maps an agent's projected token to its node through TokenReview.
pub struct TokenReviewAuthenticator {
    reviews: Api<TokenReview>,
    /// For the pods of tokens that do not name their node.
    client: kube::Client,
    namespace: String,
    audience: String,
    /// `system:serviceaccount:<namespace>:<agent service account>`.
    agent_username: String,
    /// Gateways' ServiceAccounts (`namespace`, `name`), whose tokens get their own identity.
    gateways: Vec<(String, String)>,
    cache: Mutex<NodeCache>,
    /// Bounds the reviews in flight ([`MAX_CONCURRENT_REVIEWS`]).
    in_flight: tokio::sync::Semaphore,
}

impl TokenReviewAuthenticator {
    /// Gateways' ServiceAccounts (`namespace`, `name`) whose tokens get their own identity
    /// (`mesh-node ca --gateway-service-account`).
    pub fn with_gateways(mut self, gateways: Vec<(String, String)>) -> Self {
        self.gateways = gateways;
        self
    }

    /// Accepts tokens for `audience` of ServiceAccount `agent_service_account` in `namespace`
    /// (where the agents run).
    pub fn new(
        client: kube::Client,
        namespace: &str,
        agent_service_account: &str,
        audience: &str,
    ) -> Self {
        Self {
            reviews: Api::all(client.clone()),
            client,
            namespace: namespace.to_owned(),
            audience: audience.to_owned(),
            agent_username: format!("system:serviceaccount:{namespace}:{agent_service_account}"),
            gateways: Vec::new(),
            cache: Mutex::default(),
            in_flight: tokio::sync::Semaphore::new(MAX_CONCURRENT_REVIEWS),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = self
            .reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| {
                warn!(%error, "TokenReview failed: refusing certificate requests until it works");
                Refusal::Unavailable(format!("TokenReview: {error}"))
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::Unauthenticated(format!(
                "token not authenticated: {}",
                status.error.as_deref().unwrap_or("no reason given")
            )));
        }
        // The API server answers with the requested audiences the token is valid for; an
        // authenticator that ignores audiences may not, and such a token is not ours.
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(Refusal::Unauthenticated(format!(
                "token is not for audience {:?}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let workload = if username == self.agent_username {
            None
        } else {
            let gateway = username
                .strip_prefix("system:serviceaccount:")
                .and_then(|account| account.split_once(':'))
                .filter(|(namespace, name)| {
                    self.gateways
                        .iter()
                        .any(|(n, s)| n == namespace && s == name)
                });
            let Some((namespace, name)) = gateway else {
                return Err(Refusal::Forbidden(format!(
                    "token of {username:?}, not of the agents' ServiceAccount {:?} nor of a \
                     gateway's (--gateway-service-account)",
                    self.agent_username
                )));
            };
            Some((namespace.to_owned(), name.to_owned()))
        };
        let pod_namespace = workload
            .as_ref()
            .map_or(self.namespace.as_str(), |(namespace, _)| namespace);
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| {
            extra
                .get(key)
                .and_then(|values| values.first())
                .filter(|value| !value.is_empty())
        };
        let node = match (
            first(NODE_NAME_EXTRA),
            first(POD_NAME_EXTRA),
            first(POD_UID_EXTRA),
        ) {
            (Some(node), _, _) => node.clone(),
            (None, Some(pod), Some(uid)) => self.node_of_pod(pod_namespace, pod, uid).await?,
            _ => {
                return Err(Refusal::Forbidden(
                    "the token is bound to no pod: agents and gateways must present their \
                     projected ServiceAccount token"
                        .into(),
                ));
            }
        };
        Ok(Caller { node, workload })
    }

    async fn node_of_pod(&self, namespace: &str, name: &str, uid: &str) -> Result<String, Refusal> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = pods
            .get_opt(name)
            .await
            .map_err(|error| {
                warn!(%error, pod = name, namespace, "reading the token's pod failed");
                Refusal::Unavailable(format!("reading pod {namespace}/{name}: {error}"))
            })?
            .ok_or_else(|| {
                Refusal::Forbidden(format!("the token's pod {namespace}/{name} does not exist"))
            })?;
        if pod.metadata.uid.as_deref() != Some(uid) {
            return Err(Refusal::Forbidden(format!(
                "the token's pod {namespace}/{name} (uid {uid}) was replaced by another one"
            )));
        }
        pod.spec
            .and_then(|spec| spec.node_name)
            .filter(|node| !node.is_empty())
            .ok_or_else(|| {
                Refusal::Forbidden(format!(
                    "the token's pod {namespace}/{name} is not scheduled on a node"
                ))
            })
    }

    fn cached(&self, key: &TokenHash) -> Option<Result<Caller, Refusal>> {
        let cache = self.cache.lock();
        cache.get(key, Instant::now())
    }

    /// Keeps an answer for a while: an accepted token's node for [`cache_lifetime`], a
    /// refusal for [`NEGATIVE_CACHE_TTL`]. That the API server could not answer is not kept:
    /// the next request asks again.
    fn remember(&self, key: TokenHash, token: &str, answer: &Result<Caller, Refusal>) {
        let lifetime = match answer {
            Ok(_) => cache_lifetime(token, SystemTime::now()),
            Err(Refusal::Unavailable(_)) => None,
            Err(_) => Some(NEGATIVE_CACHE_TTL),
        };
        let Some(lifetime) = lifetime else {
            return;
        };
        let now = Instant::now();
        let mut cache = self.cache.lock();
        cache.insert(key, answer.clone(), now + lifetime, now);
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn caller_of<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Refusal>> {
        Box::pin(async move {
            let key = token_hash(token);
            if let Some(answer) = self.cached(&key) {
                debug!(
                    accepted = answer.is_ok(),
                    "token known from a recent TokenReview"
                );
                return answer;
            }
            let _turn = tokio::time::timeout(REVIEW_QUEUE_TIMEOUT, self.in_flight.acquire())
                .await
                .map_err(|_| {
                    Refusal::Unavailable("too many token reviews in flight; retry".into())
                })?
                .map_err(|_| Refusal::Unavailable("the CA is shutting down".into()))?;
            // Another request with the same token may have been answered while this waited.
            if let Some(answer) = self.cached(&key) {
                return answer;
            }
            let answer = self.review(token).await;
            self.remember(key, token, &answer);
            answer
        })
    }
}

/// Cache key: tokens are credentials, so the cache holds only their digest.
type TokenHash = [u8; 32];

fn token_hash(token: &str) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

/// How long an accepted token's node may be reused: [`CACHE_TTL`], but never past the
/// token's own `exp`; `None` when it has already expired. A token whose expiry cannot be
/// read (not a JWT, or a legacy token without `exp`, which never expires) gets the TTL: the
/// API server accepted it just now.
fn cache_lifetime(token: &str, now: SystemTime) -> Option<Duration> {
    match token_expiry(token) {
        Some(expiry) => expiry
            .duration_since(now)
            .ok()
            .map(|left| left.min(CACHE_TTL)),
        None => Some(CACHE_TTL),
    }
}

/// The `exp` claim of a JWT, read without checking the signature: only ever used to shorten
/// how long an answer of the API server, which did check it, is reused.
fn token_expiry(token: &str) -> Option<SystemTime> {
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Claims = serde_json::from_slice(&json).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(claims.exp?))
}

/// Recent answers by token digest: the node, or why the token was refused.
#[derive(Default)]
struct NodeCache {
    answers: HashMap<TokenHash, (Result<Caller, Refusal>, Instant)>,
}

impl NodeCache {
    fn get(&self, key: &TokenHash, now: Instant) -> Option<Result<Caller, Refusal>> {
        self.answers
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(answer, _)| answer.clone())
    }

    fn insert(
        &mut self,
        key: TokenHash,
        answer: Result<Caller, Refusal>,
        until: Instant,
        now: Instant,
    ) {
        if self.answers.len() >= CACHE_CAPACITY {
            self.answers.retain(|_, (_, until)| *until > now);
        }
        if self.answers.len() < CACHE_CAPACITY {
            self.answers.insert(key, (answer, until));
        }
    }
}

#[cfg(test)]
mod tests;
