//! `RequestAuthentication`: which JWTs a workload accepts, and where the keys that sign
//! them are published.
//!
//! As in Istio, a request that carries no token passes unauthenticated (an
//! AuthorizationPolicy decides whether that is enough); a request whose token fails
//! validation is refused with 401. A valid token gives the request its principal
//! (`<iss>/<sub>`) and claims, which AuthorizationPolicy's `requestPrincipals` and
//! `request.auth.*` conditions match. The validation itself is in [`super::jwt`].
use std::{sync::Arc, time::Duration};

use http::HeaderName;
use jsonwebtoken::jwk::JwkSet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::WorkloadSelector;

/// How long a JWKS fetch may take when the rule does not say (Istio's default).
pub const DEFAULT_JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// `spec` of a RequestAuthentication.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
    /// Gateway API style targeting: not supported; present only to be refused clearly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<serde_json::Value>,
    /// Set only on the stand-in of a resource that cannot be applied ([`Self::fail_closed`]):
    /// no token its selection receives can be validated, so every token is refused.
    #[serde(skip_deserializing, skip_serializing_if = "std::ops::Not::not")]
    pub refuses_every_token: bool,
}

/// One issuer a workload accepts tokens from (`jwtRules[]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    pub issuer: String,
    /// A token must name one of these in `aud`; empty: `aud` is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// The key set inline, as JSON text; wins over `jwksUri` when both are given.
    #[serde(default)]
    pub jwks: Option<InlineJwks>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// How long fetching the key set may take (`5s`, Istio's duration form).
    #[serde(default)]
    pub timeout: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHeader {
    pub name: String,
    /// Stripped from the header's value before the token is read (`Bearer `).
    #[serde(default)]
    pub prefix: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

/// `jwks`: the text as written (what `debug` shows) and the key set read from it once.
#[derive(Clone, Debug)]
pub struct InlineJwks {
    pub text: String,
    pub keys: Arc<JwkSet>,
}

impl PartialEq for InlineJwks {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl<'de> Deserialize<'de> for InlineJwks {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let keys: JwkSet = serde_json::from_str(&text).map_err(|e| {
            serde::de::Error::custom(format!("jwks is not a JSON Web Key Set: {e}"))
        })?;
        Ok(Self {
            text,
            keys: Arc::new(keys),
        })
    }
}

impl Serialize for InlineJwks {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.text.serialize(serializer)
    }
}

/// Where a token is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenLocation {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

/// Where a rule's keys come from, for the agent to fetch.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteJwks {
    /// The JWKS, or with `discovery` the issuer's OpenID configuration that names it.
    pub uri: String,
    pub discovery: bool,
    pub timeout: Duration,
}

/// Why a RequestAuthentication cannot be used; reported when the resource is loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestAuthenticationError {
    #[error("targetRef/targetRefs are not supported; use a selector")]
    TargetRef,
    #[error("jwtRules[{0}]: issuer is required")]
    MissingIssuer(usize),
    #[error("jwtRules[{rule}].jwksUri: {uri:?} is not an http:// or https:// URL")]
    JwksUri { rule: usize, uri: String },
    #[error("jwtRules[{rule}].jwks: the key set has no key")]
    EmptyJwks { rule: usize },
    #[error("jwtRules[{rule}]: {name:?} is not a valid HTTP header name")]
    HeaderName { rule: usize, name: String },
    #[error("jwtRules[{rule}]: {field} must not be empty")]
    EmptyLocation { rule: usize, field: &'static str },
    #[error("jwtRules[{rule}].timeout: {value:?} is not a duration like 5s")]
    Timeout { rule: usize, value: String },
}

impl RequestAuthenticationSpec {
    /// Checks what validation relies on, so a bad resource is refused at load time with its
    /// reason rather than refusing (or accepting) tokens unexpectedly.
    pub fn validate(&self) -> Result<(), RequestAuthenticationError> {
        if self.target_ref.is_some() || self.target_refs.is_some() {
            return Err(RequestAuthenticationError::TargetRef);
        }
        self.jwt_rules
            .iter()
            .enumerate()
            .try_for_each(|(index, rule)| rule.validate(index))
    }

    /// What a resource that cannot be applied as written is enforced as: its selection
    /// refuses every token (no token can be validated against keys the mesh could not
    /// read), while requests without one pass as they would without the resource. So
    /// nothing reaches the app with a token the mesh did not check, and no request gains a
    /// principal. Tokens are looked for at Istio's default places and at every place its
    /// rules name that can still be read. A selector that cannot be read widens the
    /// selection to the namespace.
    pub fn fail_closed(spec: &serde_yaml::Value) -> Self {
        let selector = spec
            .get("selector")
            .filter(|_| spec.get("targetRef").is_none() && spec.get("targetRefs").is_none())
            .and_then(|s| serde_yaml::from_value::<WorkloadSelector>(s.clone()).ok());
        let rules = spec
            .get("jwtRules")
            .and_then(serde_yaml::Value::as_sequence)
            .into_iter()
            .flatten();
        let names = |rule: &serde_yaml::Value, field: &str| -> Vec<String> {
            let list = rule.get(field).and_then(serde_yaml::Value::as_sequence);
            list.into_iter()
                .flatten()
                .filter_map(|entry| {
                    entry
                        .get("name")
                        .unwrap_or(entry)
                        .as_str()
                        .filter(|name| !name.is_empty())
                        .map(str::to_owned)
                })
                .collect()
        };
        // Only where tokens are read: these stand-ins validate nothing.
        let places = rules
            .map(|rule| JwtRule {
                from_headers: names(rule, "fromHeaders")
                    .into_iter()
                    .map(|name| JwtHeader {
                        name,
                        prefix: String::new(),
                    })
                    .collect(),
                from_params: names(rule, "fromParams"),
                from_cookies: names(rule, "fromCookies"),
                ..JwtRule::default()
            })
            .collect();
        Self {
            selector,
            jwt_rules: places,
            refuses_every_token: true,
            ..Self::default()
        }
    }
}

impl JwtRule {
    fn validate(&self, rule: usize) -> Result<(), RequestAuthenticationError> {
        if self.issuer.is_empty() {
            return Err(RequestAuthenticationError::MissingIssuer(rule));
        }
        match (&self.jwks, &self.jwks_uri) {
            (Some(inline), _) if inline.keys.keys.is_empty() => {
                return Err(RequestAuthenticationError::EmptyJwks { rule });
            }
            (None, Some(uri)) if !is_http_url(uri) => {
                return Err(RequestAuthenticationError::JwksUri {
                    rule,
                    uri: uri.clone(),
                });
            }
            _ => {}
        }
        let header_names = self
            .from_headers
            .iter()
            .map(|h| &h.name)
            .chain(&self.output_payload_to_header)
            .chain(self.output_claim_to_headers.iter().map(|c| &c.header));
        for name in header_names {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(RequestAuthenticationError::HeaderName {
                    rule,
                    name: name.clone(),
                });
            }
        }
        if self.from_params.iter().any(String::is_empty) {
            return Err(RequestAuthenticationError::EmptyLocation {
                rule,
                field: "fromParams",
            });
        }
        if self.from_cookies.iter().any(String::is_empty) {
            return Err(RequestAuthenticationError::EmptyLocation {
                rule,
                field: "fromCookies",
            });
        }
        self.fetch_timeout()
            .map(drop)
            .map_err(|value| RequestAuthenticationError::Timeout { rule, value })
    }

    fn fetch_timeout(&self) -> Result<Duration, String> {
        match &self.timeout {
            None => Ok(DEFAULT_JWKS_FETCH_TIMEOUT),
            Some(text) => humantime::parse_duration(text).map_err(|_| text.clone()),
        }
    }

    /// Where this rule reads its token: the locations it names, or Istio's defaults, the
    /// `Authorization: Bearer` header and the `access_token` query parameter.
    pub fn locations(&self) -> Vec<TokenLocation> {
        let mut locations: Vec<TokenLocation> = self
            .from_headers
            .iter()
            .filter_map(|h| {
                Some(TokenLocation::Header {
                    name: HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                    prefix: h.prefix.clone(),
                })
            })
            .chain(self.from_params.iter().cloned().map(TokenLocation::Param))
            .chain(self.from_cookies.iter().cloned().map(TokenLocation::Cookie))
            .collect();
        if locations.is_empty() {
            locations = default_locations();
        }
        locations
    }

    /// The key set to fetch, when it is not inline: `jwksUri`, or else the issuer's OpenID
    /// discovery document, as Istio does. None for a rule without an issuer (the
    /// stand-ins of a refused resource).
    pub fn remote_jwks(&self) -> Option<RemoteJwks> {
        if self.jwks.is_some() || self.issuer.is_empty() {
            return None;
        }
        let timeout = self.fetch_timeout().unwrap_or(DEFAULT_JWKS_FETCH_TIMEOUT);
        Some(match &self.jwks_uri {
            Some(uri) => RemoteJwks {
                uri: uri.clone(),
                discovery: false,
                timeout,
            },
            None => RemoteJwks {
                uri: format!(
                    "{}/.well-known/openid-configuration",
                    self.issuer.trim_end_matches('/')
                ),
                discovery: true,
                timeout,
            },
        })
    }
}

/// Istio's token locations when a rule names none.
pub fn default_locations() -> Vec<TokenLocation> {
    vec![
        TokenLocation::Header {
            name: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
        },
        TokenLocation::Param("access_token".into()),
    ]
}

fn is_http_url(uri: &str) -> bool {
    uri.parse::<http::Uri>()
        .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some())
}
