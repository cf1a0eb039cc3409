use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::JwkSet};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::{Value, json};

use super::*;
use crate::policy::RequestAuthenticationSpec;

/// An issuer's signing key, as a test plays the issuer.
pub(crate) struct SigningKey {
    pub kid: String,
    pair: KeyPair,
}

impl SigningKey {
    pub fn new(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            pair: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("a P-256 key"),
        }
    }

    /// The public key as one JWK (ES256).
    pub fn jwk(&self) -> Value {
        let point = self.pair.public_key_raw();
        json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        })
    }

    pub fn sign(&self, claims: &Value) -> String {
        let header = Header {
            kid: Some(self.kid.clone()),
            ..Header::new(Algorithm::ES256)
        };
        let key = EncodingKey::from_ec_der(&self.pair.serialize_der());
        jsonwebtoken::encode(&header, claims, &key).expect("a signed token")
    }
}

/// The text of a key set holding `keys`.
pub(crate) fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

const ISSUER: &str = "https://issuer.example";

fn claims(sub: &str) -> Value {
    json!({"iss": ISSUER, "sub": sub, "exp": now() + 600, "aud": "shop", "groups": ["admins", "devs"], "tier": {"level": 3}})
}

fn spec(yaml: &str) -> RequestAuthenticationSpec {
    let spec: RequestAuthenticationSpec = serde_yaml::from_str(yaml).expect("a spec");
    spec.validate().expect("a valid spec");
    spec
}

fn inline(key: &SigningKey) -> RequestAuthenticationSpec {
    spec(&format!(
        "jwtRules:\n- issuer: {ISSUER}\n  jwks: '{}'",
        jwks(&[key])
    ))
}

/// A store whose remote key sets were all fetched as `keys` (or never, with `None`).
#[derive(Debug)]
struct Fetched(Option<Arc<JwkSet>>);

impl FetchedKeys for Fetched {
    fn keys(&self, _: &RemoteJwks) -> Option<Arc<JwkSet>> {
        self.0.clone()
    }
}

const NOTHING_FETCHED: Fetched = Fetched(None);

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("a header"),
    );
    headers
}

fn run(
    spec: &RequestAuthenticationSpec,
    headers: &HeaderMap,
    query: Option<&str>,
    fetched: &dyn FetchedKeys,
) -> Result<Authenticated, JwtError> {
    authenticate(&[spec], TokenSources { headers, query }, fetched)
}

#[test]
fn a_valid_token_gives_the_request_its_principal_and_claims() {
    let key = SigningKey::new("k1");
    let spec = inline(&key);
    let authenticated = run(
        &spec,
        &bearer(&key.sign(&claims("alice"))),
        None,
        &NOTHING_FETCHED,
    )
    .expect("a valid token");
    let auth = authenticated.auth.expect("authenticated");
    assert_eq!(auth.principal, "https://issuer.example/alice");
    assert_eq!(auth.audiences, ["shop"]);
    assert_eq!(auth.claim(&["groups"]).unwrap(), ["admins", "devs"]);
    assert_eq!(auth.claim(&["tier", "level"]).unwrap(), ["3"]);
    assert_eq!(auth.claim(&["missing"]), None);
    // Not forwarded by default: the token is removed before the app sees the request.
    assert_eq!(
        authenticated.edits,
        [HeaderEdit::Remove(http::header::AUTHORIZATION)]
    );
}

#[test]
fn no_token_passes_without_a_principal() {
    let key = SigningKey::new("k1");
    let outcome = run(&inline(&key), &HeaderMap::new(), None, &NOTHING_FETCHED);
    assert_eq!(outcome, Ok(Authenticated::default()));
}

#[test]
fn bad_tokens_are_refused_with_envoys_reasons() {
    let key = SigningKey::new("k1");
    let other = SigningKey::new("k1");
    let spec = inline(&key);
    let refused = |token: String| run(&spec, &bearer(&token), None, &NOTHING_FETCHED);
    let expired = json!({"iss": ISSUER, "sub": "a", "exp": now() - 3600});
    assert_eq!(refused(key.sign(&expired)), Err(JwtError::Expired));
    let early = json!({"iss": ISSUER, "sub": "a", "nbf": now() + 3600});
    assert_eq!(refused(key.sign(&early)), Err(JwtError::NotYetValid));
    let stranger = json!({"iss": "https://other.example", "sub": "a"});
    assert_eq!(refused(key.sign(&stranger)), Err(JwtError::UnknownIssuer));
    // Same kid, another key: the signature does not verify.
    assert_eq!(refused(other.sign(&claims("a"))), Err(JwtError::Signature));
    assert_eq!(refused("not-a-jwt".into()), Err(JwtError::Malformed));
    // A token whose payload was changed after signing.
    let token = key.sign(&claims("alice"));
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged = URL_SAFE_NO_PAD.encode(claims("root").to_string());
    parts[1] = &forged;
    assert_eq!(refused(parts.join(".")), Err(JwtError::Signature));
    // An unsigned token (`alg: none`) is never accepted.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(claims("a").to_string())
    );
    assert!(refused(none).is_err());
}

#[test]
fn audiences_are_checked_when_given() {
    let key = SigningKey::new("k1");
    let spec = spec(&format!(
        "jwtRules:\n- issuer: {ISSUER}\n  audiences: [orders]\n  jwks: '{}'",
        jwks(&[&key])
    ));
    let refused = run(
        &spec,
        &bearer(&key.sign(&claims("a"))),
        None,
        &NOTHING_FETCHED,
    );
    assert_eq!(refused, Err(JwtError::Audience));
    let mut for_orders = claims("a");
    for_orders["aud"] = json!(["web", "orders"]);
    assert!(
        run(
            &spec,
            &bearer(&key.sign(&for_orders)),
            None,
            &NOTHING_FETCHED
        )
        .is_ok()
    );
    let mut without = claims("a");
    without.as_object_mut().unwrap().remove("aud");
    let refused = run(&spec, &bearer(&key.sign(&without)), None, &NOTHING_FETCHED);
    assert_eq!(refused, Err(JwtError::Audience), "no aud at all");
}

#[test]
fn remote_keys_are_used_once_fetched_and_refuse_until_then() {
    let key = SigningKey::new("k1");
    let spec = spec(&format!(
        "jwtRules:\n- issuer: {ISSUER}\n  jwksUri: http://127.0.0.1:1/jwks"
    ));
    let token = key.sign(&claims("a"));
    assert_eq!(
        run(&spec, &bearer(&token), None, &NOTHING_FETCHED),
        Err(JwtError::KeysUnavailable)
    );
    let fetched = Fetched(Some(Arc::new(
        serde_json::from_str(&jwks(&[&key])).unwrap(),
    )));
    assert!(run(&spec, &bearer(&token), None, &fetched).is_ok());
    // Without jwks or jwksUri, the issuer's discovery document names the keys.
    let discovered = self::spec(&format!("jwtRules:\n- issuer: {ISSUER}/"));
    assert_eq!(
        discovered.jwt_rules[0].remote_jwks().unwrap().uri,
        "https://issuer.example/.well-known/openid-configuration"
    );
}

#[test]
fn tokens_are_read_where_the_rules_say_and_outputs_are_written() {
    let key = SigningKey::new("k1");
    let spec = spec(&format!(
        "jwtRules:
- issuer: {ISSUER}
  jwks: '{}'
  fromHeaders: [{{name: x-jwt-assertion, prefix: 'Token '}}]
  fromParams: [token]
  fromCookies: [session]
  forwardOriginalToken: true
  outputPayloadToHeader: x-jwt-payload
  outputClaimToHeaders: [{{header: x-sub, claim: sub}}, {{header: x-groups, claim: groups}}]",
        jwks(&[&key])
    ));
    let token = key.sign(&claims("bob"));
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-jwt-assertion",
        HeaderValue::from_str(&format!("Token {token}")).unwrap(),
    );
    let authenticated = run(&spec, &headers, None, &NOTHING_FETCHED).unwrap();
    assert_eq!(
        authenticated.auth.as_ref().unwrap().principal,
        "https://issuer.example/bob"
    );
    authenticated.apply(&mut headers);
    assert!(headers.contains_key("x-jwt-assertion"), "forwarded");
    let payload = URL_SAFE_NO_PAD
        .decode(headers["x-jwt-payload"].as_bytes())
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap()["sub"],
        "bob"
    );
    assert_eq!(headers["x-sub"], "bob");
    assert!(!headers.contains_key("x-groups"), "a list is not one value");

    let from_param = run(
        &spec,
        &HeaderMap::new(),
        Some(&format!("a=1&token={token}")),
        &NOTHING_FETCHED,
    );
    assert!(from_param.unwrap().auth.is_some());
    let mut cookies = HeaderMap::new();
    cookies.insert(
        http::header::COOKIE,
        HeaderValue::from_str(&format!("theme=dark; session={token}")).unwrap(),
    );
    assert!(
        run(&spec, &cookies, None, &NOTHING_FETCHED)
            .unwrap()
            .auth
            .is_some()
    );
    // The default locations are not read when a rule names its own.
    let default = run(&spec, &bearer("garbage"), None, &NOTHING_FETCHED);
    assert_eq!(default, Ok(Authenticated::default()));
}

#[test]
fn a_refused_resource_refuses_every_token_but_not_requests_without_one() {
    let refused = RequestAuthenticationSpec::fail_closed(
        &serde_yaml::from_str("{selector: {matchLabels: {app: web}}, jwtRules: 3}").unwrap(),
    );
    assert!(refused.refuses_every_token);
    assert!(refused.selector.is_some());
    // Where its rules read tokens is still honoured, when it can be read.
    let custom = RequestAuthenticationSpec::fail_closed(
        &serde_yaml::from_str(
            "jwtRules: [{issuer: '', jwksUri: 'ftp://x', fromHeaders: [{name: x-jwt}], \
             fromParams: [token], fromCookies: [session]}]",
        )
        .unwrap(),
    );
    assert!(
        custom.jwt_rules[0].remote_jwks().is_none(),
        "nothing to fetch"
    );
    let mut in_header = HeaderMap::new();
    in_header.insert("x-jwt", HeaderValue::from_static("a.b.c"));
    assert_eq!(
        run(&custom, &in_header, None, &NOTHING_FETCHED),
        Err(JwtError::Refused)
    );
    assert_eq!(
        run(
            &custom,
            &HeaderMap::new(),
            Some("token=a.b.c"),
            &NOTHING_FETCHED
        ),
        Err(JwtError::Refused)
    );
    let key = SigningKey::new("k1");
    let token = key.sign(&claims("a"));
    assert_eq!(
        run(&refused, &bearer(&token), None, &NOTHING_FETCHED),
        Err(JwtError::Refused)
    );
    assert_eq!(
        run(
            &refused,
            &HeaderMap::new(),
            Some(&format!("access_token={token}")),
            &NOTHING_FETCHED
        ),
        Err(JwtError::Refused)
    );
    assert_eq!(
        run(&refused, &HeaderMap::new(), None, &NOTHING_FETCHED),
        Ok(Authenticated::default())
    );
}

#[test]
fn bad_resources_are_refused_with_their_reason() {
    let refused = |yaml: &str| {
        serde_yaml::from_str::<RequestAuthenticationSpec>(yaml)
            .map_err(|e| e.to_string())
            .and_then(|spec| spec.validate().map_err(|e| e.to_string()))
            .expect_err(yaml)
    };
    assert!(refused("jwtRules: [{issuer: ''}]").contains("issuer is required"));
    assert!(refused("jwtRules: [{issuer: a, jwksUri: 'ftp://x/keys'}]").contains("jwksUri"));
    assert!(refused("jwtRules: [{issuer: a, jwks: 'not json'}]").contains("JSON Web Key Set"));
    assert!(refused("jwtRules: [{issuer: a, jwks: '{\"keys\": []}'}]").contains("no key"));
    assert!(
        refused("jwtRules: [{issuer: a, fromHeaders: [{name: 'bad header'}]}]")
            .contains("header name")
    );
    assert!(refused("jwtRules: [{issuer: a, timeout: soon}]").contains("duration"));
    assert!(refused("targetRef: {kind: Gateway, name: g}").contains("targetRef"));
    assert!(refused("jwtRules: [{issuer: a, unknownField: 1}]").contains("unknown field"));
}
