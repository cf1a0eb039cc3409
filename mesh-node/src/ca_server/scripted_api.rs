//! A scripted Kubernetes API server for tests (kube-rs' `tower-test` pattern): a closure
//! answers each request, and every request is recorded so tests can count and inspect them.
use std::sync::Arc;

use http::{Method, Request, Response};
use kube::client::Body;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// One request the client made.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    /// Path and query, e.g. `/api/v1/namespaces/ns/secrets/cacerts`.
    pub path: String,
    /// The JSON body (`Null` when empty).
    pub body: Value,
}

/// What the scripted server was asked, in order.
#[derive(Clone, Default)]
pub struct Requests(Arc<Mutex<Vec<Recorded>>>);

impl Requests {
    pub fn all(&self) -> Vec<Recorded> {
        self.0.lock().clone()
    }

    /// How many requests had this method and a path starting with `prefix`.
    pub fn count(&self, method: &Method, prefix: &str) -> usize {
        self.all()
            .iter()
            .filter(|r| r.method == method && r.path.starts_with(prefix))
            .count()
    }
}

/// A client whose requests `answer` turns into `(status, JSON body)` responses.
pub fn client<F>(answer: F) -> (kube::Client, Requests)
where
    F: Fn(&Recorded) -> (u16, Value) + Send + 'static,
{
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let requests = Requests::default();
    let recorded = requests.clone();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.expect("request body");
            let request = Recorded {
                method: parts.method,
                path: parts
                    .uri
                    .path_and_query()
                    .map_or_else(String::new, ToString::to_string),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (status, body) = answer(&request);
            recorded.0.lock().push(request);
            respond.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).expect("JSON")))
                    .expect("response"),
            );
        }
    });
    (kube::Client::new(service, "default"), requests)
}

/// A `Status` failure body as the API server sends it.
pub fn status(code: u16, reason: &str) -> (u16, Value) {
    (
        code,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": reason,
            "code": code,
            "message": format!("scripted {reason}"),
        }),
    )
}

/// The API server's answer to a TokenReview: `authenticated` as given, for `audiences`, of
/// `username`, with `extra` (e.g. the bound pod's node) in the user info.
pub fn token_review(
    authenticated: bool,
    audiences: &[&str],
    username: &str,
    extra: Value,
) -> Value {
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {},
        "status": {
            "authenticated": authenticated,
            "audiences": audiences,
            "user": { "username": username, "extra": extra },
        },
    })
}

/// The agents' ServiceAccount as TokenReview names it, with the CLI's defaults.
pub const AGENT_USERNAME: &str = "system:serviceaccount:nodemesh-system:nodemesh-agent";
