//! JWT validation for one request, as Envoy's `jwt_authn` filter does it for Istio's
//! RequestAuthentication: tokens are looked for where the workload's rules say, each found
//! token must be valid for a rule of its issuer, and the first one gives the request its
//! identity. A pure function of the request, the rules and the keys the agent holds.
use std::sync::Arc;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{
    DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{Jwk, JwkSet},
};
use serde_json::Value;

use super::request_authentication::{
    JwtRule, RemoteJwks, RequestAuthenticationSpec, TokenLocation, default_locations,
};

/// Envoy's allowance for clocks that disagree, on `exp` and `nbf`.
const CLOCK_SKEW_SECONDS: u64 = 60;

/// The keys the agent fetched for remote key sets; `None` while a key set has not been
/// fetched (or could not be): its tokens are then refused.
pub trait FetchedKeys: std::fmt::Debug + Send + Sync {
    fn keys(&self, source: &RemoteJwks) -> Option<Arc<JwkSet>>;
}

/// No key set fetched (yet): only inline keys validate.
#[derive(Debug)]
pub struct NothingFetched;

impl FetchedKeys for NothingFetched {
    fn keys(&self, _: &RemoteJwks) -> Option<Arc<JwkSet>> {
        None
    }
}

/// What a validated token tells about the request (`request.auth.*`).
#[derive(Clone, Debug, PartialEq)]
pub struct RequestAuth {
    /// `<iss>/<sub>`, as `requestPrincipals` match it.
    pub principal: String,
    pub audiences: Vec<String>,
    /// `azp`, the party the token was issued to.
    pub presenter: Option<String>,
    pub claims: Value,
}

impl RequestAuth {
    /// A claim's values, `request.auth.claims[a][b]` as `["a", "b"]`: a string or a
    /// number or boolean as text, or each of a list's; `None` when absent.
    pub fn claim(&self, path: &[&str]) -> Option<Vec<String>> {
        let value = path
            .iter()
            .try_fold(&self.claims, |value, name| value.get(name))?;
        let text = |value: &Value| match value {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        match value {
            Value::Array(items) => Some(items.iter().filter_map(text).collect()),
            other => text(other).map(|t| vec![t]),
        }
    }
}

/// A change to the request a validated token asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderEdit {
    /// The token itself, unless `forwardOriginalToken`.
    Remove(HeaderName),
    /// `outputPayloadToHeader`, `outputClaimToHeaders`.
    Set(HeaderName, HeaderValue),
}

/// The outcome for a request whose tokens (if any) are valid.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Authenticated {
    /// `None`: the request carried no token.
    pub auth: Option<RequestAuth>,
    pub edits: Vec<HeaderEdit>,
}

impl Authenticated {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for edit in &self.edits {
            match edit {
                HeaderEdit::Remove(name) => {
                    headers.remove(name);
                }
                HeaderEdit::Set(name, value) => {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
    }
}

/// Why a request's token is refused; the texts are Envoy's, which clients of Istio see.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    Malformed,
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Jwks remote fetch is failed")]
    KeysUnavailable,
    #[error("Jwt verification fails")]
    Signature,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Audiences in Jwt are not allowed")]
    Audience,
    #[error("Jwt verification fails: the RequestAuthentication for this workload was refused")]
    Refused,
}

impl JwtError {
    /// A label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "jwt_malformed",
            Self::UnknownIssuer => "jwt_unknown_issuer",
            Self::KeysUnavailable => "jwt_keys_unavailable",
            Self::Signature => "jwt_signature",
            Self::Expired => "jwt_expired",
            Self::NotYetValid => "jwt_not_yet_valid",
            Self::Audience => "jwt_audience",
            Self::Refused => "jwt_refused_resource",
        }
    }
}

/// The request parts tokens are read from.
#[derive(Clone, Copy, Debug)]
pub struct TokenSources<'a> {
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
}

/// Validates the tokens of one request against the RequestAuthentications that apply to
/// its workload (`specs`). No spec, or no token where they look: nothing to validate.
pub fn authenticate(
    specs: &[&RequestAuthenticationSpec],
    request: TokenSources,
    fetched: &dyn FetchedKeys,
) -> Result<Authenticated, JwtError> {
    if specs.is_empty() {
        return Ok(Authenticated::default());
    }
    let rules: Vec<&JwtRule> = specs.iter().flat_map(|s| &s.jwt_rules).collect();
    let ruled: Vec<(&JwtRule, Vec<TokenLocation>)> =
        rules.iter().map(|rule| (*rule, rule.locations())).collect();
    let mut locations: Vec<&TokenLocation> = ruled.iter().flat_map(|(_, l)| l).collect();
    let defaults = default_locations();
    let refused = specs.iter().any(|s| s.refuses_every_token);
    if refused {
        locations.extend(&defaults);
    }
    let mut seen: Vec<&TokenLocation> = Vec::new();
    locations.retain(|location| {
        let first = !seen.contains(location);
        seen.push(location);
        first
    });
    let mut outcome = Authenticated::default();
    for location in locations {
        let Some(token) = find_token(location, request) else {
            continue;
        };
        if refused {
            return Err(JwtError::Refused);
        }
        let issuer = unverified_issuer(token)?;
        let mut result = Err(JwtError::UnknownIssuer);
        for (rule, _) in ruled
            .iter()
            .filter(|(rule, at)| rule.issuer == issuer && at.contains(location))
        {
            result = verify(token, rule, fetched).map(|auth| (*rule, auth));
            if result.is_ok() {
                break;
            }
        }
        let (rule, auth) = result?;
        if outcome.auth.is_none() {
            outcome.edits = edits(rule, location, token, &auth);
            outcome.auth = Some(auth);
        }
    }
    Ok(outcome)
}

fn find_token<'r>(location: &TokenLocation, request: TokenSources<'r>) -> Option<&'r str> {
    match location {
        TokenLocation::Header { name, prefix } => request
            .headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find_map(|value| value.strip_prefix(prefix.as_str()))
            .map(str::trim),
        TokenLocation::Param(name) => request
            .query?
            .split('&')
            .find_map(|pair| pair.strip_prefix(name.as_str())?.strip_prefix('=')),
        TokenLocation::Cookie(name) => request
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|cookies| cookies.split(';'))
            .find_map(|pair| pair.trim().strip_prefix(name.as_str())?.strip_prefix('=')),
    }
    .filter(|token| !token.is_empty())
}

/// The payload of a token not yet verified: only its issuer is read, to pick the rule.
fn payload(token: &str) -> Result<Value, JwtError> {
    let mut sections = token.split('.');
    let (Some(_), Some(payload), Some(_), None) = (
        sections.next(),
        sections.next(),
        sections.next(),
        sections.next(),
    ) else {
        return Err(JwtError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
}

fn unverified_issuer(token: &str) -> Result<String, JwtError> {
    match payload(token)?.get("iss") {
        Some(Value::String(issuer)) => Ok(issuer.clone()),
        _ => Err(JwtError::UnknownIssuer),
    }
}

/// Checks `token` against one rule: signed by one of its keys, in its validity window,
/// for one of its audiences.
fn verify(token: &str, rule: &JwtRule, fetched: &dyn FetchedKeys) -> Result<RequestAuth, JwtError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
    let keys = match (&rule.jwks, rule.remote_jwks()) {
        (Some(inline), _) => inline.keys.clone(),
        (None, Some(remote)) => fetched.keys(&remote).ok_or(JwtError::KeysUnavailable)?,
        (None, None) => return Err(JwtError::KeysUnavailable),
    };
    let mut validation = Validation::new(header.alg);
    validation.leeway = CLOCK_SKEW_SECONDS;
    validation.required_spec_claims.clear();
    validation.validate_aud = false;
    validation.validate_nbf = true;
    validation.set_issuer(&[&rule.issuer]);
    let candidates: Vec<&Jwk> = match &header.kid {
        Some(kid) => keys.find(kid).into_iter().collect(),
        None => keys.keys.iter().collect(),
    };
    let mut error = JwtError::Signature;
    for jwk in candidates {
        // A key published for one algorithm is used for no other.
        if jwk
            .common
            .key_algorithm
            .is_some_and(|alg| alg.to_string() != format!("{:?}", header.alg))
        {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<Value>(token, &key, &validation) {
            Ok(data) => return request_auth(rule, data.claims),
            Err(e) => {
                error = match e.kind() {
                    ErrorKind::ExpiredSignature => JwtError::Expired,
                    ErrorKind::ImmatureSignature => JwtError::NotYetValid,
                    _ => JwtError::Signature,
                };
            }
        }
    }
    Err(error)
}

fn request_auth(rule: &JwtRule, claims: Value) -> Result<RequestAuth, JwtError> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
    let audiences: Vec<String> = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.clone()],
        Some(Value::Array(auds)) => auds
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    if !rule.audiences.is_empty() && !audiences.iter().any(|a| rule.audiences.contains(a)) {
        return Err(JwtError::Audience);
    }
    Ok(RequestAuth {
        principal: format!("{}/{}", rule.issuer, text("sub").unwrap_or_default()),
        audiences,
        presenter: text("azp"),
        claims,
    })
}

/// What the rule that validated the token asks of the request on its way to the app.
fn edits(
    rule: &JwtRule,
    location: &TokenLocation,
    token: &str,
    auth: &RequestAuth,
) -> Vec<HeaderEdit> {
    let header = |name: &str| HeaderName::from_bytes(name.as_bytes()).ok();
    let mut edits = Vec::new();
    if !rule.forward_original_token
        && let TokenLocation::Header { name, .. } = location
    {
        edits.push(HeaderEdit::Remove(name.clone()));
    }
    if let Some(name) = rule.output_payload_to_header.as_deref().and_then(header)
        && let Some(payload) = token.split('.').nth(1)
        && let Ok(value) = HeaderValue::from_str(payload)
    {
        edits.push(HeaderEdit::Set(name, value));
    }
    for output in &rule.output_claim_to_headers {
        let value = auth
            .claim(&[output.claim.as_str()])
            .filter(|values| values.len() == 1)
            .and_then(|mut values| HeaderValue::from_str(&values.remove(0)).ok());
        if let (Some(name), Some(value)) = (header(&output.header), value) {
            edits.push(HeaderEdit::Set(name, value));
        }
    }
    edits
}

#[cfg(test)]
pub(crate) mod tests;
