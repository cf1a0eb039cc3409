//! The compiled route: what the proxy does with a request once a rule matched it.
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::{Serialize, Serializer};

use super::{
    RequestMatch, RoutingError,
    fields::{self, serialize_duration, serialize_optional_duration},
};
use crate::inventory::ObjectKey;

/// One HTTP rule, from a VirtualService `http` entry or an HTTPRoute rule.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpRule {
    pub name: Option<String>,
    /// `VirtualService ns/name` or `HTTPRoute ns/name`.
    pub origin: String,
    /// Empty matches everything; any one must match; fields within one all must.
    pub matches: Vec<RequestMatch>,
    pub action: HttpAction,
    /// `None`: no timeout (Istio's default for HTTP routes; `0s` means the same).
    #[serde(serialize_with = "serialize_optional_duration")]
    pub timeout: Option<Duration>,
    /// `None`: the field is absent and the proxy applies [`RetryPolicy::istio_default`].
    pub retries: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    pub rewrite: Option<Rewrite>,
    #[serde(skip_serializing_if = "HeaderOps::is_empty")]
    pub request_headers: HeaderOps,
    #[serde(skip_serializing_if = "HeaderOps::is_empty")]
    pub response_headers: HeaderOps,
    pub mirror: Option<Mirror>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpAction {
    Route(Vec<WeightedDestination>),
    Redirect {
        scheme: Option<String>,
        authority: Option<String>,
        port: Option<u16>,
        /// Replaces the whole path.
        path: Option<String>,
        status: u16,
    },
    DirectResponse {
        status: u16,
        body: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WeightedDestination {
    pub destination: Destination,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Destination {
    pub service: ObjectKey,
    /// A DestinationRule subset; see `Routes::subset_labels`.
    pub subset: Option<String>,
    /// `None`: the port the client dialed.
    pub port: Option<u16>,
}

/// Picks by weight with a uniform random roll. None when empty/zero total.
pub fn pick_at_random(destinations: &[WeightedDestination]) -> Option<&Destination> {
    match total_weight(destinations) {
        0 => None,
        total => pick_weighted(destinations, rand::random_range(0..total)),
    }
}

/// Picks by weight; `roll` is uniform in 0..total weight. None when empty/zero total.
pub fn pick_weighted(destinations: &[WeightedDestination], roll: u32) -> Option<&Destination> {
    let total = total_weight(destinations);
    if total == 0 {
        return None;
    }
    // A roll out of range is folded back in rather than failing the request.
    let mut remaining = roll % total;
    destinations.iter().find_map(|d| {
        if remaining < d.weight {
            Some(&d.destination)
        } else {
            remaining -= d.weight;
            None
        }
    })
}

pub fn total_weight(destinations: &[WeightedDestination]) -> u32 {
    destinations
        .iter()
        .fold(0u32, |total, d| total.saturating_add(d.weight))
}

/// The `tcp` routes of a VirtualService: the first whose ports fit takes the connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TcpRule {
    /// Service ports this rule is for; empty means any.
    pub ports: Vec<u16>,
    pub route: Vec<WeightedDestination>,
}

impl TcpRule {
    pub fn applies_to_port(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }
}

/// A `tls` route of a VirtualService bound to a gateway: a connection whose TLS the gateway
/// passes through (PASSTHROUGH) is routed by the name its ClientHello asks for (SNI).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TlsRule {
    /// Gateway ports this rule is for; empty means any.
    pub ports: Vec<u16>,
    /// `sniHosts`, lower case: exact names or `*.suffix`.
    pub sni_hosts: Vec<String>,
    pub route: Vec<WeightedDestination>,
}

impl TlsRule {
    pub fn applies(&self, port: u16, sni: &str) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port))
            && self
                .sni_hosts
                .iter()
                .any(|pattern| super::host::host_match_specificity(pattern, sni).is_some())
    }
}

// === retries ===

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first try; 0 disables retrying.
    pub attempts: u32,
    #[serde(serialize_with = "serialize_optional_duration")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
}

impl RetryPolicy {
    /// Istio's default when a route sets none: 2 attempts on connect-failure, refused-stream, 503.
    pub fn istio_default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn::istio_default(),
        }
    }
}

/// Conditions under which a request is retried (Envoy's `retry_on`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub reset: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    pub status_codes: Vec<u16>,
}

/// gRPC status conditions: valid in Istio, but this proxy does not read gRPC trailers, so
/// they are accepted and have no effect.
const GRPC_RETRY_ON: [&str; 5] = [
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

impl RetryOn {
    /// Istio's `retryOn` when a route sets retries without one.
    pub fn istio_default() -> Self {
        Self {
            connect_failure: true,
            refused_stream: true,
            status_codes: vec![503],
            ..Self::default()
        }
    }

    /// Parses Istio's comma-separated `retryOn`; bare status codes retry on that status.
    pub fn parse(field: &str, text: &str) -> Result<Self, RoutingError> {
        let mut on = Self::default();
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match token {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                // Only enables the listed codes, which the numeric tokens already do.
                "retriable-status-codes" => {}
                grpc if GRPC_RETRY_ON.contains(&grpc) => {}
                code => {
                    let status = code
                        .parse::<i64>()
                        .map_err(|_| RoutingError::UnknownRetryOn {
                            field: field.to_string(),
                            token: token.to_string(),
                        })?;
                    on.status_codes.push(fields::status(field, status)?);
                }
            }
        }
        Ok(on)
    }

    /// 5xx; gateway-error=502/503/504; retriable-4xx=409; codes.
    pub fn retries_status(&self, status: u16) -> bool {
        (self.five_xx && (500..=599).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
            || (self.retriable_4xx && status == 409)
            || self.status_codes.contains(&status)
    }
}

// === fault injection ===

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultDelay {
    #[serde(serialize_with = "serialize_duration")]
    pub fixed: Duration,
    /// Share of requests delayed, 0-100 (`percentage.value`, default 100).
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultAbort {
    pub status: u16,
    /// Share of requests aborted, 0-100 (`percentage.value`, default 100).
    pub percent: f64,
}

// === rewrite ===

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rewrite {
    pub uri: Option<String>,
    /// Replaces the `Host`/`:authority`.
    pub authority: Option<String>,
}

/// Istio rewrite: with a prefix match the matched prefix is replaced, else the whole path; query kept.
/// The result always starts with `/`.
pub fn rewrite_uri(rewrite: &str, matched_prefix: Option<&str>, uri: &http::Uri) -> String {
    let path = uri.path();
    let replaced_len = matched_prefix
        .filter(|prefix| {
            // Case-insensitively, since `ignoreUriCase` prefixes match that way.
            path.get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
        })
        .map_or(path.len(), str::len);
    let mut rewritten = format!("{rewrite}{}", &path[replaced_len..]);
    if !rewritten.starts_with('/') {
        rewritten.insert(0, '/');
    }
    if let Some(query) = uri.query() {
        rewritten.push('?');
        rewritten.push_str(query);
    }
    rewritten
}

// === headers ===

/// Header changes, applied as Envoy applies them: removals, then `set` (replacing), then
/// `add` (appending).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderOps {
    #[serde(serialize_with = "serialize_pairs")]
    pub set: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "serialize_pairs")]
    pub add: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "serialize_names")]
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

fn serialize_pairs<S: Serializer>(
    pairs: &[(HeaderName, HeaderValue)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(
        pairs
            .iter()
            .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes()))),
    )
}

fn serialize_names<S: Serializer>(names: &[HeaderName], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(names.iter().map(HeaderName::as_str))
}

// === mirror ===

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mirror {
    pub destination: Destination,
    /// Share of requests mirrored, 0-100 (default 100).
    pub percent: f64,
}
