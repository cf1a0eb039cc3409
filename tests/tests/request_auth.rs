//! End to end: end-user authentication with JWTs (RequestAuthentication) and the
//! AuthorizationPolicy rules that read them, with the YAML of Istio's "JWT authorization"
//! task; the keys served by an issuer over HTTP inside the destination node, rotated while
//! the test runs.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mesh_tests::{
    Cluster, Pod, PodProcess, bookinfo,
    scenario::{
        CONVERGE_TIMEOUT, apply_config, metric, skip, wait_enrolled, wait_for_metric, wait_until,
    },
};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::{Value, json};

const REVIEWS_IP: &str = "10.96.0.30";
/// Istio's sample issuer, as in its task.
const ISSUER: &str = "testing@secure.istio.io";

/// The issuer: signs tokens with its current key and publishes its key set.
struct Issuer {
    keys: Vec<(String, KeyPair)>,
}

impl Issuer {
    fn new() -> Self {
        Self { keys: Vec::new() }
    }

    /// A new key, signing from now on.
    fn rotate(&mut self, kid: &str) {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
        self.keys.push((kid.into(), pair));
    }

    /// The key set publishing the newest key only (the old ones retired).
    fn jwks(&self) -> String {
        let (kid, pair) = self.keys.last().expect("a key");
        let point = pair.public_key_raw();
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string()
    }

    /// A token for `claims`, signed with the key `kid`.
    fn sign_with(&self, kid: &str, claims: &Value) -> String {
        let (_, pair) = self
            .keys
            .iter()
            .find(|(k, _)| k == kid)
            .expect("a key of that id");
        let header = Header {
            kid: Some(kid.into()),
            ..Header::new(Algorithm::ES256)
        };
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_ec_der(&pair.serialize_der()),
        )
        .expect("a signed token")
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Claims as Istio's sample token carries them (`iss` = `sub`, a `groups` claim).
fn claims(issuer: &str, expires_in: i64, groups: &[&str]) -> Value {
    json!({
        "iss": issuer, "sub": ISSUER, "groups": groups,
        "exp": now().saturating_add_signed(expires_in), "iat": now(),
    })
}

/// A key server on one node's loopback: answers every request with the key set of the
/// moment, until dropped.
struct KeyServer {
    address: SocketAddr,
    jwks: Arc<Mutex<String>>,
    hits: Arc<Mutex<u32>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KeyServer {
    fn start(cluster: &Cluster, node: usize, jwks: String) -> Self {
        let listener = cluster.run_in_node(node, || TcpListener::bind("127.0.0.1:0"));
        let listener = listener.expect("a listener in the node");
        listener.set_nonblocking(true).expect("non-blocking");
        let address = listener.local_addr().expect("its address");
        let jwks = Arc::new(Mutex::new(jwks));
        let hits = Arc::new(Mutex::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (jwks, hits, stop) = (jwks.clone(), hits.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    stream.set_nonblocking(false).expect("blocking");
                    stream
                        .set_read_timeout(Some(Duration::from_secs(2)))
                        .expect("a timeout");
                    let mut request = [0; 4096];
                    let _ = stream.read(&mut request);
                    *hits.lock().unwrap() += 1;
                    let body = jwks.lock().unwrap().clone();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes());
                }
            }
        });
        Self {
            address,
            jwks,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    fn publish(&self, jwks: String) {
        *self.jwks.lock().unwrap() = jwks;
    }

    fn hits(&self) -> u32 {
        *self.hits.lock().unwrap()
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Scene {
    cluster: Cluster,
    client: Pod,
    _server: PodProcess,
}

impl Scene {
    /// `productpage` on node0 calls `reviews` on node1; the agents refresh key sets every
    /// second so that the rotation shows within the test.
    fn new(test: &str) -> Self {
        let mut cluster = Cluster::new(test, 2);
        let client = bookinfo::add_productpage(&mut cluster, 0);
        let reviews = bookinfo::add_reviews(&mut cluster, "v1", 1);
        bookinfo::write_reviews_service(&cluster, REVIEWS_IP);
        let server = bookinfo::serve_http(&cluster, &reviews);
        for i in 0..2 {
            cluster.start_agent(i, &["--jwks-refresh-interval", "1s"]);
        }
        wait_enrolled(&cluster, 0, 1);
        wait_enrolled(&cluster, 1, 1);
        Self {
            cluster,
            client,
            _server: server,
        }
    }

    fn apply(&self, file: &str, yaml: &str, rejected: f64) {
        apply_config(&self.cluster, file, yaml, rejected);
    }

    /// One GET to reviews, with `token` as a bearer token when given: the response line.
    fn get(&self, token: Option<&str>) -> Value {
        let url = format!("http://{REVIEWS_IP}:9080/headers");
        let header = token.map(|t| format!("authorization: Bearer {t}"));
        let args: Vec<&str> = header
            .iter()
            .flat_map(|h| ["--header", h.as_str()])
            .collect();
        bookinfo::http(&self.cluster, &self.client, &url, &args).remove(0)
    }

    /// What the app saw of a request that reached it.
    fn seen_by_app(response: &Value) -> Value {
        serde_json::from_str(response["body"].as_str().expect("a body")).expect("the app's JSON")
    }
}

fn request_authentication(jwks_uri: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt-example
  namespace: default
spec:
  selector:
    matchLabels:
      app: reviews
  jwtRules:
  - issuer: \"{ISSUER}\"
    jwksUri: \"{jwks_uri}\"
    outputClaimToHeaders:
    - header: x-jwt-sub
      claim: sub
"
    )
}

/// Istio's task: only requests with a token of the sample issuer, in group `group1`.
const REQUIRE_JWT: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: require-jwt
  namespace: default
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
  - from:
    - source:
       requestPrincipals: [\"testing@secure.istio.io/testing@secure.istio.io\"]
    when:
    - key: request.auth.claims[groups]
      values: [\"group1\"]
";

#[test]
fn jwts_are_validated_against_fetched_rotated_keys_and_policies_require_them() {
    if skip() {
        return;
    }
    let scene = Scene::new("request_auth_jwt");
    let mut issuer = Issuer::new();
    issuer.rotate("first");
    let keys = KeyServer::start(&scene.cluster, 1, issuer.jwks());
    let uri = format!("http://{}/jwks.json", keys.address);
    scene.apply("ra.yaml", &request_authentication(&uri), 0.0);
    wait_until(CONVERGE_TIMEOUT, "the agent to fetch the key set", || {
        let fetched = metric(
            &scene.cluster,
            1,
            "nodemesh_jwks_fetches_total",
            &[("result", "ok")],
        );
        (fetched >= 1.0).then_some(())
    });
    let valid = issuer.sign_with("first", &claims(ISSUER, 600, &["group1"]));

    let policies = scene.cluster.debug(1, &["policies"]);
    assert!(
        policies.contains("RequestAuthentication") && policies.contains(ISSUER),
        "{policies}"
    );

    // Without a policy: a valid token passes, is not forwarded, and its claim is; no token
    // passes too; a bad one is refused at the destination with Envoy's reasons.
    let ok = scene.get(Some(&valid));
    assert_eq!(ok["status"], 200, "{ok}");
    let seen = Scene::seen_by_app(&ok);
    assert_eq!(seen["headers"]["x-jwt-sub"], ISSUER, "{seen}");
    assert!(
        seen["headers"].get("authorization").is_none(),
        "the token is not forwarded: {seen}"
    );
    assert_eq!(scene.get(None)["status"], 200);
    let expired_token = issuer.sign_with("first", &claims(ISSUER, -3600, &["group1"]));
    let expired = scene.get(Some(&expired_token));
    assert_eq!(expired["status"], 401, "{expired}");
    assert_eq!(expired["body"], "Jwt is expired");
    // `debug explain`, asked of the destination's agent (which holds the keys), agrees.
    let header = format!("authorization:Bearer {expired_token}");
    let explained = scene.cluster.debug(
        1,
        &["explain", "productpage", "reviews", "--header", &header],
    );
    assert!(
        explained.contains("DENIED by RequestAuthentication: Jwt is expired (401)"),
        "{explained}"
    );
    let stranger = scene.get(Some(
        &issuer.sign_with("first", &claims("someone@else.example", 600, &["group1"])),
    ));
    assert_eq!(stranger["status"], 401, "{stranger}");
    assert_eq!(stranger["body"], "Jwt issuer is not configured");
    let mut forged = Issuer::new();
    forged.rotate("first");
    let unsigned = scene.get(Some(
        &forged.sign_with("first", &claims(ISSUER, 600, &["group1"])),
    ));
    assert_eq!(unsigned["status"], 401, "another key, same kid: {unsigned}");
    assert_eq!(unsigned["body"], "Jwt verification fails");
    wait_for_metric(
        &scene.cluster,
        1,
        "istio_requests_total",
        &[("reporter", "destination"), ("response_code", "401")],
        3.0,
    );

    // The policy requires a principal and a group: no token is denied (403), a token
    // without the group too; the valid one passes.
    scene.apply("authz.yaml", REQUIRE_JWT, 0.0);
    let missing = scene.get(None);
    assert_eq!(missing["status"], 403, "{missing}");
    assert_eq!(missing["body"], "RBAC: access denied");
    let other_group = scene.get(Some(
        &issuer.sign_with("first", &claims(ISSUER, 600, &["group2"])),
    ));
    assert_eq!(other_group["status"], 403, "{other_group}");
    assert_eq!(scene.get(Some(&valid))["status"], 200);

    // The issuer rotates its key: once the agent refreshed, the new key's tokens pass and
    // the retired key's are refused.
    issuer.rotate("second");
    keys.publish(issuer.jwks());
    let rotated = issuer.sign_with("second", &claims(ISSUER, 600, &["group1"]));
    wait_until(CONVERGE_TIMEOUT, "the rotated key to be fetched", || {
        (scene.get(Some(&rotated))["status"] == 200).then_some(())
    });
    let retired = scene.get(Some(&valid));
    assert_eq!(retired["status"], 401, "the retired key: {retired}");

    // A bad RequestAuthentication is refused alone, with its reason; until fixed its
    // workload refuses every token (fail closed) and the rest of the config stays.
    let before = keys.hits();
    scene.apply(
        "ra.yaml",
        &request_authentication("ftp://nowhere/keys"),
        1.0,
    );
    let refused = scene.get(Some(&rotated));
    assert_eq!(refused["status"], 401, "{refused}");
    let policies = scene.cluster.debug(1, &["policies"]);
    assert!(policies.contains("refuses every token"), "{policies}");
    assert_eq!(
        scene.get(None)["status"],
        403,
        "the AuthorizationPolicy still applies"
    );
    scene.apply("ra.yaml", &request_authentication(&uri), 0.0);
    wait_until(CONVERGE_TIMEOUT, "the fixed resource to apply", || {
        (scene.get(Some(&rotated))["status"] == 200).then_some(())
    });
    assert!(keys.hits() > before, "the agent fetched the keys again");
}
