use http::Method;
use serde_json::{Value, json};

use super::*;
use crate::ca_server::scripted_api::{self, AGENT_USERNAME, Recorded, Requests, token_review};

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const AGENT_POD: &str = "/api/v1/namespaces/nodemesh-system/pods/nodemesh-agent-x7k2p";

fn authenticator<F>(answer: F) -> (TokenReviewAuthenticator, Requests)
where
    F: Fn(&Recorded) -> (u16, Value) + Send + 'static,
{
    let (client, requests) = scripted_api::client(answer);
    let authenticator =
        TokenReviewAuthenticator::new(client, "nodemesh-system", "nodemesh-agent", "nodemesh-ca");
    (authenticator, requests)
}

/// A JWT-shaped token (unsigned: only the API server checks tokens) expiring after `valid`.
fn token(valid: Duration) -> String {
    let exp = (SystemTime::now() + valid)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({ "exp": exp, "sub": AGENT_USERNAME }).to_string());
    format!("eyJhbGciOiJSUzI1NiJ9.{claims}.c2lnbmF0dXJl")
}

fn agent_on(node: &str) -> (u16, Value) {
    (
        201,
        token_review(
            true,
            &["nodemesh-ca"],
            AGENT_USERNAME,
            json!({ NODE_NAME_EXTRA: [node] }),
        ),
    )
}

fn bound_to_pod(uid: &str) -> Value {
    json!({ POD_NAME_EXTRA: ["nodemesh-agent-x7k2p"], POD_UID_EXTRA: [uid] })
}

fn agent_pod(uid: &str, node: &str) -> (u16, Value) {
    (
        200,
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "nodemesh-agent-x7k2p", "namespace": "nodemesh-system", "uid": uid },
            "spec": { "nodeName": node, "containers": [] },
        }),
    )
}

#[tokio::test]
async fn the_node_named_in_the_token_is_the_requester() {
    let (authenticator, requests) = authenticator(|_| agent_on("node-a"));
    let token = token(Duration::from_secs(3600));

    assert_eq!(authenticator.caller_of(&token).await, Ok("node-a".into()));
    let sent = requests.all();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].method, Method::POST);
    assert!(sent[0].path.starts_with(TOKEN_REVIEWS), "{}", sent[0].path);
    assert_eq!(sent[0].body["spec"]["token"], token.as_str());
    assert_eq!(sent[0].body["spec"]["audiences"], json!(["nodemesh-ca"]));
}

#[tokio::test]
async fn unauthenticated_tokens_are_refused() {
    let (authenticator, _) = authenticator(|_| {
        let mut review = token_review(false, &[], "", json!({}));
        review["status"]["error"] = json!("token has expired");
        (201, review)
    });
    let refusal = authenticator.caller_of("stale").await.unwrap_err();
    assert!(
        matches!(&refusal, Refusal::Unauthenticated(reason) if reason.contains("token has expired")),
        "{refusal:?}"
    );
    assert_eq!(refusal.status(), 401);
}

#[tokio::test]
async fn tokens_of_other_service_accounts_are_refused() {
    let (authenticator, _) = authenticator(|_| {
        (
            201,
            token_review(
                true,
                &["nodemesh-ca"],
                "system:serviceaccount:shop:web",
                json!({ NODE_NAME_EXTRA: ["node-a"] }),
            ),
        )
    });
    let refusal = authenticator.caller_of("web's token").await.unwrap_err();
    assert!(
        matches!(&refusal, Refusal::Forbidden(reason) if reason.contains("system:serviceaccount:shop:web")),
        "{refusal:?}"
    );
    assert_eq!(refusal.status(), 403);
}

#[tokio::test]
async fn tokens_for_another_audience_are_refused() {
    let (authenticator, _) = authenticator(|_| {
        (
            201,
            token_review(
                true,
                &["https://kubernetes.default.svc"],
                AGENT_USERNAME,
                json!({ NODE_NAME_EXTRA: ["node-a"] }),
            ),
        )
    });
    let refusal = authenticator.caller_of("api token").await.unwrap_err();
    assert!(
        matches!(&refusal, Refusal::Unauthenticated(reason) if reason.contains("nodemesh-ca")),
        "{refusal:?}"
    );
}

#[tokio::test]
async fn the_node_is_read_from_the_bound_pod_when_the_token_does_not_name_it() {
    let (authenticator, requests) = authenticator(|request| match request.method {
        Method::POST => (
            201,
            token_review(
                true,
                &["nodemesh-ca"],
                AGENT_USERNAME,
                bound_to_pod("uid-1"),
            ),
        ),
        _ => agent_pod("uid-1", "node-b"),
    });
    assert_eq!(authenticator.caller_of("bound").await, Ok("node-b".into()));
    assert_eq!(requests.count(&Method::GET, AGENT_POD), 1);
}

#[tokio::test]
async fn a_token_of_a_replaced_or_missing_pod_is_refused() {
    let (replaced, _) = authenticator(|request| match request.method {
        Method::POST => (
            201,
            token_review(
                true,
                &["nodemesh-ca"],
                AGENT_USERNAME,
                bound_to_pod("uid-old"),
            ),
        ),
        _ => agent_pod("uid-new", "node-b"),
    });
    let refusal = replaced.caller_of("old pod's token").await.unwrap_err();
    assert!(
        matches!(&refusal, Refusal::Forbidden(reason) if reason.contains("replaced")),
        "{refusal:?}"
    );

    let (missing, _) = authenticator(|request| match request.method {
        Method::POST => (
            201,
            token_review(
                true,
                &["nodemesh-ca"],
                AGENT_USERNAME,
                bound_to_pod("uid-1"),
            ),
        ),
        _ => scripted_api::status(404, "NotFound"),
    });
    let refusal = missing.caller_of("deleted pod's token").await.unwrap_err();
    assert!(
        matches!(&refusal, Refusal::Forbidden(reason) if reason.contains("does not exist")),
        "{refusal:?}"
    );
}

#[tokio::test]
async fn tokens_bound_to_no_pod_are_refused() {
    let (authenticator, _) = authenticator(|_| {
        (
            201,
            token_review(true, &["nodemesh-ca"], AGENT_USERNAME, json!({})),
        )
    });
    let refusal = authenticator.caller_of("legacy").await.unwrap_err();
    assert!(matches!(refusal, Refusal::Forbidden(_)), "{refusal:?}");
}

#[tokio::test]
async fn api_errors_refuse_and_are_not_cached() {
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let answer_failing = failing.clone();
    let (authenticator, requests) = authenticator(move |_| {
        if answer_failing.load(std::sync::atomic::Ordering::SeqCst) {
            scripted_api::status(500, "InternalError")
        } else {
            agent_on("node-a")
        }
    });
    let token = token(Duration::from_secs(3600));
    let refusal = authenticator.caller_of(&token).await.unwrap_err();
    assert!(matches!(refusal, Refusal::Unavailable(_)), "{refusal:?}");
    assert_eq!(refusal.status(), 503);

    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(authenticator.caller_of(&token).await, Ok("node-a".into()));
    assert_eq!(requests.count(&Method::POST, TOKEN_REVIEWS), 2);
}

#[tokio::test(start_paused = true)]
async fn accepted_tokens_are_reviewed_once_per_ttl() {
    let (authenticator, requests) = authenticator(|_| agent_on("node-a"));
    let token = token(Duration::from_secs(3600));

    for _ in 0..3 {
        assert_eq!(authenticator.caller_of(&token).await, Ok("node-a".into()));
    }
    assert_eq!(
        requests.count(&Method::POST, TOKEN_REVIEWS),
        1,
        "answers within the TTL come from the cache"
    );

    tokio::time::advance(CACHE_TTL + Duration::from_secs(1)).await;
    assert_eq!(authenticator.caller_of(&token).await, Ok("node-a".into()));
    assert_eq!(
        requests.count(&Method::POST, TOKEN_REVIEWS),
        2,
        "an expired answer is asked again"
    );

    let other = format!("{token}x");
    assert_eq!(authenticator.caller_of(&other).await, Ok("node-a".into()));
    assert_eq!(
        requests.count(&Method::POST, TOKEN_REVIEWS),
        3,
        "another token is another entry"
    );
}

#[tokio::test(start_paused = true)]
async fn the_cache_never_outlives_the_token() {
    let (authenticator, requests) = authenticator(|_| agent_on("node-a"));
    let token = token(Duration::from_secs(10));
    authenticator.caller_of(&token).await.unwrap();
    tokio::time::advance(Duration::from_secs(11)).await;
    authenticator.caller_of(&token).await.unwrap();
    assert_eq!(
        requests.count(&Method::POST, TOKEN_REVIEWS),
        2,
        "a token expiring in 10 s is cached at most 10 s"
    );
}

#[test]
fn token_expiry_is_read_from_jwts_only() {
    let now = SystemTime::now();
    let lifetime = cache_lifetime(&token(Duration::from_secs(30)), now).unwrap();
    assert!(lifetime <= Duration::from_secs(30) && lifetime > Duration::from_secs(25));
    assert_eq!(
        cache_lifetime(&token(Duration::from_secs(7200)), now),
        Some(CACHE_TTL)
    );
    assert_eq!(
        cache_lifetime(&token(Duration::ZERO), now + Duration::from_secs(5)),
        None,
        "an expired token is not cached"
    );
    assert_eq!(cache_lifetime("opaque-token", now), Some(CACHE_TTL));
}

#[tokio::test]
async fn a_refused_token_is_remembered_briefly_and_not_reviewed_again() {
    let (authenticator, requests) = authenticator(|_| {
        let mut review = token_review(false, &[], "", json!({}));
        review["status"]["error"] = json!("invalid bearer token");
        (201, review)
    });
    for _ in 0..5 {
        let refusal = authenticator.caller_of("forged").await.unwrap_err();
        assert_eq!(refusal.status(), 401, "{refusal:?}");
    }
    assert_eq!(
        requests.count(&Method::POST, TOKEN_REVIEWS),
        1,
        "one TokenReview for a token refused five times"
    );
}

#[tokio::test]
async fn an_api_server_that_cannot_answer_is_asked_again() {
    let (authenticator, requests) = authenticator(|_| scripted_api::status(500, "InternalError"));
    for _ in 0..2 {
        let refusal = authenticator.caller_of("token").await.unwrap_err();
        assert_eq!(refusal.status(), 503, "{refusal:?}");
    }
    assert_eq!(
        requests.count(&Method::POST, TOKEN_REVIEWS),
        2,
        "not cached"
    );
}

type ApiHandle =
    tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;
type Received = (
    http::Request<kube::client::Body>,
    tower_test::mock::SendResponse<http::Response<kube::client::Body>>,
);

/// The next request the client sends, if one comes within 300 ms.
async fn next(handle: &mut ApiHandle) -> Result<Option<Received>, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await
}

#[tokio::test]
async fn token_reviews_in_flight_are_bounded() {
    use std::sync::Arc;

    use http::{Request, Response};
    use kube::client::Body;

    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let authenticator = Arc::new(TokenReviewAuthenticator::new(
        client,
        "nodemesh-system",
        "nodemesh-agent",
        "nodemesh-ca",
    ));
    let calls: Vec<_> = (0..3 * MAX_CONCURRENT_REVIEWS)
        .map(|i| {
            let authenticator = authenticator.clone();
            tokio::spawn(async move { authenticator.caller_of(&format!("token-{i}")).await })
        })
        .collect();
    // Hold every request that arrives without answering: only the bound may arrive.
    let mut held = Vec::new();
    while let Ok(Some(request)) = next(&mut handle).await {
        held.push(request);
    }
    assert_eq!(
        held.len(),
        MAX_CONCURRENT_REVIEWS,
        "reviews in flight at once"
    );
    let answer = |respond: tower_test::mock::SendResponse<Response<Body>>| {
        let (status, body) = agent_on("node-a");
        respond.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    };
    for (_, respond) in held {
        answer(respond);
    }
    // The others get their turn as the first ones finish.
    let mut answered = MAX_CONCURRENT_REVIEWS;
    while answered < calls.len() {
        let (_, respond) = next(&mut handle)
            .await
            .expect("the queued reviews follow")
            .expect("the client is alive");
        answer(respond);
        answered += 1;
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), Ok("node-a".into()));
    }
}

#[tokio::test]
async fn a_gateways_token_gets_its_own_identity_from_its_pods_node() {
    let gateway_pod = "/api/v1/namespaces/istio-system/pods/istio-ingressgateway-5d8f";
    let (client, requests) = scripted_api::client(move |request| {
        if request.path.starts_with(TOKEN_REVIEWS) {
            let extra =
                json!({ POD_NAME_EXTRA: ["istio-ingressgateway-5d8f"], POD_UID_EXTRA: ["u1"] });
            let username = "system:serviceaccount:istio-system:istio-ingressgateway";
            return (201, token_review(true, &["nodemesh-ca"], username, extra));
        }
        assert_eq!(request.path, gateway_pod);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "istio-ingressgateway-5d8f", "namespace": "istio-system", "uid": "u1" },
            "spec": { "nodeName": "node-c", "containers": [] },
        });
        (200, pod)
    });
    let gateways = vec![("istio-system".to_owned(), "istio-ingressgateway".to_owned())];
    let authenticator =
        TokenReviewAuthenticator::new(client, "nodemesh-system", "nodemesh-agent", "nodemesh-ca")
            .with_gateways(gateways);
    let caller = authenticator.caller_of("gateway token").await.unwrap();
    assert_eq!(caller.node, "node-c");
    assert_eq!(
        caller.workload,
        Some(("istio-system".to_owned(), "istio-ingressgateway".to_owned()))
    );
    assert_eq!(requests.all().len(), 2, "a review and the pod's read");
    let own: crate::identity::Identity =
        "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"
            .parse()
            .unwrap();
    let other: crate::identity::Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    assert_eq!(caller.may_ask_for(&own), Ok(()));
    let refused = caller.may_ask_for(&other).unwrap_err();
    assert!(refused.contains("gets only its own identity"), "{refused}");
    // An agent may ask for any identity (the CA then checks the node).
    assert_eq!(Caller::agent("node-a").may_ask_for(&other), Ok(()));
}
