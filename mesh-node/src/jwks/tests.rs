use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::{net::TcpListener, sync::watch};

use super::*;
use crate::{
    metrics::Metrics,
    policy::{
        DEFAULT_JWKS_FETCH_TIMEOUT, Policies, Policy, RequestAuthenticationSpec,
        jwt::tests::{SigningKey, jwks},
    },
    state::State,
};

/// A key server on loopback: what it answers on each path, changeable while it runs.
#[derive(Clone, Default)]
struct KeyServer {
    answers: Arc<Mutex<BTreeMap<String, (StatusCode, String)>>>,
    hits: Arc<Mutex<u32>>,
}

impl KeyServer {
    async fn start(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = self.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let server = server.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        *server.hits.lock() += 1;
                        let (status, body) = server
                            .answers
                            .lock()
                            .get(request.uri().path())
                            .cloned()
                            .unwrap_or((StatusCode::NOT_FOUND, String::new()));
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = status;
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        address
    }

    fn answer(&self, path: &str, status: StatusCode, body: String) {
        self.answers.lock().insert(path.into(), (status, body));
    }
}

fn source(uri: String, discovery: bool) -> RemoteJwks {
    RemoteJwks {
        uri,
        discovery,
        timeout: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn fetches_from_the_uri_or_through_discovery_and_refuses_what_is_not_a_key_set() {
    let server = KeyServer::default();
    let address = server.start().await;
    let key = SigningKey::new("k1");
    server.answer("/keys", StatusCode::OK, jwks(&[&key]));
    server.answer(
        "/.well-known/openid-configuration",
        StatusCode::OK,
        format!(r#"{{"issuer": "http://{address}", "jwks_uri": "http://{address}/keys"}}"#),
    );
    server.answer("/html", StatusCode::OK, "<html></html>".into());
    server.answer("/big", StatusCode::OK, " ".repeat(MAX_DOCUMENT_BYTES + 1));
    let client = client();
    let direct = fetch(&client, &source(format!("http://{address}/keys"), false))
        .await
        .expect("the key set");
    assert_eq!(direct.keys.len(), 1);
    assert!(direct.find("k1").is_some());
    let discovered = fetch(
        &client,
        &source(
            format!("http://{address}/.well-known/openid-configuration"),
            true,
        ),
    )
    .await
    .expect("the key set, through discovery");
    assert!(discovered.find("k1").is_some());
    let error = |path: &str| {
        let client = client.clone();
        let source = source(format!("http://{address}{path}"), false);
        let path = path.to_owned();
        async move { fetch(&client, &source).await.expect_err(&path).to_string() }
    };
    assert!(error("/missing").await.contains("404"));
    assert!(error("/html").await.contains("not a JSON Web Key Set"));
    assert!(error("/big").await.contains("reading the answer"));
}

/// A RequestAuthentication of namespace `shop` naming `uri`, and one pod of `shop` on `node`.
fn state_with(uri: &str, node: &str) -> Arc<State> {
    let pod = crate::inventory::Workload::for_test(node, "shop", "web", &[]);
    let spec: RequestAuthenticationSpec =
        serde_yaml::from_str(&format!("jwtRules:\n- issuer: me\n  jwksUri: {uri}")).unwrap();
    let policies = Policies {
        request_authentications: vec![Policy {
            key: crate::inventory::ObjectKey::new("shop", "jwt"),
            spec,
        }],
        ..Policies::default()
    };
    Arc::new(State::new(
        BTreeMap::new(),
        BTreeMap::from([(pod.key.clone(), pod)]),
        BTreeMap::new(),
        policies,
        Default::default(),
        Vec::new(),
    ))
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn keys_are_refreshed_kept_when_a_refresh_fails_and_dropped_with_their_rule() {
    let server = KeyServer::default();
    let address = server.start().await;
    let (first, second) = (SigningKey::new("k1"), SigningKey::new("k2"));
    server.answer("/keys", StatusCode::OK, jwks(&[&first]));
    let uri = format!("http://{address}/keys");
    // The rule's pods run on another node: that node's agent fetches, not this one.
    let (state_tx, state_rx) = watch::channel(state_with(&uri, "node1"));
    let cache = Arc::new(JwksCache::default());
    let metrics = Metrics::new().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(keep_fresh(
        cache.clone(),
        state_rx,
        Served::EnrolledOn("node0".into()),
        Duration::from_millis(200),
        metrics.node.clone(),
        shutdown.clone(),
    ));
    let remote = source(uri.clone(), false);
    let has = |kid: &'static str| {
        let cache = cache.clone();
        let remote = RemoteJwks {
            timeout: DEFAULT_JWKS_FETCH_TIMEOUT,
            ..remote.clone()
        };
        move || cache.keys(&remote).is_some_and(|k| k.find(kid).is_some())
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*server.hits.lock(), 0, "no pod of this node needs the keys");
    state_tx.send(state_with(&uri, "node0")).unwrap();
    wait_for("the first key set", has("k1")).await;
    // Rotated at the issuer: the next refresh brings the new key.
    server.answer("/keys", StatusCode::OK, jwks(&[&second]));
    wait_for("the rotated key set", has("k2")).await;
    assert!(!has("k1")(), "the old key is gone with the refresh");
    // The server fails: the keys last fetched stay in use.
    server.answer("/keys", StatusCode::INTERNAL_SERVER_ERROR, String::new());
    let hits = *server.hits.lock();
    wait_for("a failed refresh", || *server.hits.lock() > hits + 1).await;
    assert!(has("k2")(), "kept through failed refreshes");
    // The rule goes: so do its keys, and the fetches.
    state_tx.send(Arc::new(State::default())).unwrap();
    wait_for("the keys dropped", || cache.sets.read().is_empty()).await;
    shutdown.cancel();
    task.await.unwrap();
}
