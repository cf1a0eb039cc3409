//! Request matching: the compiled form of Istio's `HTTPMatchRequest` and the Gateway API's
//! `HTTPRouteMatch`.
use std::collections::BTreeMap;

use http::HeaderName;
use serde::{Serialize, Serializer};

use super::{RequestInfo, RoutingError};

/// A compiled regular expression that must match the whole value, as Envoy's
/// `safe_regex` does. Compares, prints and serializes as the pattern it was written as.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    anchored: regex::Regex,
}

impl Pattern {
    pub fn new(field: &str, pattern: &str) -> Result<Self, RoutingError> {
        let anchored = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|error| {
            RoutingError::BadRegex {
                field: field.to_string(),
                pattern: pattern.to_string(),
                reason: error.to_string(),
            }
        })?;
        Ok(Self {
            source: pattern.to_string(),
            anchored,
        })
    }

    /// The pattern as written in the resource.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.anchored.is_match(value)
    }
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// How one request attribute is compared.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    /// Plain string prefix (Istio).
    Prefix(String),
    /// Whole path segments (Gateway API `PathPrefix`): `/foo` matches `/foo` and `/foo/bar`,
    /// not `/foobar`. Held without a trailing slash, so `/` is the empty prefix.
    PathPrefix(String),
    Regex(Pattern),
    /// The attribute is present, whatever its value (an Istio match with no condition).
    Present,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(exact) => value == exact,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::PathPrefix(prefix) => value
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            StringMatch::Regex(pattern) => pattern.is_match(value),
            StringMatch::Present => true,
        }
    }

    /// ASCII case-insensitive comparison for exact and prefix matches (Istio's
    /// `ignoreUriCase`); a regex decides case itself.
    fn matches_ignoring_case(&self, value: &str) -> bool {
        let starts_with = |prefix: &str| {
            value
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
        };
        match self {
            StringMatch::Exact(exact) => value.eq_ignore_ascii_case(exact),
            StringMatch::Prefix(prefix) => starts_with(prefix),
            StringMatch::PathPrefix(prefix) => {
                starts_with(prefix)
                    && matches!(value.as_bytes().get(prefix.len()), None | Some(b'/'))
            }
            StringMatch::Regex(_) | StringMatch::Present => self.matches(value),
        }
    }
}

/// One match condition; every field that is set must match (all-of). A rule lists several
/// and matches when any one does.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RequestMatch {
    /// Istio's match `name`, for logs.
    pub name: Option<String>,
    /// On the path, without the query.
    pub uri: Option<StringMatch>,
    pub ignore_uri_case: bool,
    /// `http` unless the request URI says otherwise.
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    /// The URI authority (HTTP/2) or the `Host` header.
    pub authority: Option<StringMatch>,
    #[serde(serialize_with = "serialize_named")]
    pub headers: Vec<(HeaderName, StringMatch)>,
    /// Headers that must not match (Istio's `withoutHeaders`); an absent header passes.
    #[serde(serialize_with = "serialize_named")]
    pub without_headers: Vec<(HeaderName, StringMatch)>,
    pub query_params: Vec<(String, StringMatch)>,
    /// The Service port the client dialed.
    pub port: Option<u16>,
    /// Labels the client workload must carry.
    pub source_labels: BTreeMap<String, String>,
}

impl RequestMatch {
    pub fn matches(&self, request: &RequestInfo<'_>) -> bool {
        if self.port.is_some_and(|port| port != request.port) {
            return false;
        }
        let path = request.uri.path();
        let uri_matches = self.uri.as_ref().is_none_or(|uri| {
            if self.ignore_uri_case {
                uri.matches_ignoring_case(path)
            } else {
                uri.matches(path)
            }
        });
        let scheme = request.uri.scheme_str().unwrap_or("http");
        let authority = request
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| request.headers.get(http::header::HOST)?.to_str().ok());
        uri_matches
            && self.scheme.as_ref().is_none_or(|m| m.matches(scheme))
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.matches(request.method.as_str()))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| authority.is_some_and(|a| m.matches(a)))
            && self.headers.iter().all(|(name, m)| {
                header_value(request.headers, name).is_some_and(|value| m.matches(&value))
            })
            && !self.without_headers.iter().any(|(name, m)| {
                header_value(request.headers, name).is_some_and(|value| m.matches(&value))
            })
            && self.query_params.iter().all(|(name, m)| {
                query_param(request.uri, name).is_some_and(|value| m.matches(value))
            })
            && self
                .source_labels
                .iter()
                .all(|(key, value)| request.source_labels.get(key) == Some(value))
    }

    /// Whether this match can select requests on `port`.
    pub fn applies_to_port(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    /// The URI prefix this match selects on, which a prefix rewrite replaces.
    pub fn uri_prefix(&self) -> Option<&str> {
        match self.uri.as_ref()? {
            StringMatch::Prefix(prefix) | StringMatch::PathPrefix(prefix) => Some(prefix),
            _ => None,
        }
    }
}

/// All values of a header joined with `,`, as Envoy compares repeated headers.
fn header_value(headers: &http::HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let joined: Vec<String> = values
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    Some(joined.join(","))
}

/// The first value of query parameter `name`, undecoded; a bare `name` has the empty value.
fn query_param<'u>(uri: &'u http::Uri, name: &str) -> Option<&'u str> {
    uri.query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

fn serialize_named<S: Serializer>(
    pairs: &[(HeaderName, StringMatch)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(pairs.iter().map(|(name, m)| (name.as_str(), m)))
}
