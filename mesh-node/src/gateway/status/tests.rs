use std::collections::BTreeMap;

use http::{Method, Request, Response};
use kube::client::Body;
use parking_lot::Mutex;

use super::*;

/// The gateway's pod in `istio-system`, a Gateway of its class there with a plain listener
/// open to every namespace and an HTTPS one (whose Secret is missing) open to labelled
/// namespaces, one of its class elsewhere, one of another class, and HTTPRoutes that attach,
/// miss for each reason, or name a Service that does not exist.
const CLUSTER: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system, labels: {shared: 'true'}}
---
apiVersion: v1
kind: Pod
metadata: {name: gateway-0, namespace: istio-system, labels: {istio: ingressgateway}}
spec: {nodeName: node0, serviceAccountName: gateway, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.244.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: default}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 8000}], selector: {app: httpbin}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: istio-system}
spec:
  gatewayClassName: nodemesh
  listeners:
  - {name: http, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
  - name: https
    hostname: api.example.com
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: missing-credential}]}
    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {shared: 'true'}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: elsewhere, namespace: default}
spec:
  gatewayClassName: nodemesh
  listeners: [{name: http, port: 8081, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: istios, namespace: istio-system}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 8082, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: attached, namespace: default}
spec:
  parentRefs: [{name: web, namespace: istio-system}]
  rules: [{backendRefs: [{name: httpbin, port: 8000}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: no-such-listener, namespace: default}
spec:
  parentRefs: [{name: web, namespace: istio-system, sectionName: grpc}]
  rules: [{backendRefs: [{name: httpbin, port: 8000}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: not-allowed, namespace: default}
spec:
  parentRefs: [{name: web, namespace: istio-system, sectionName: https}]
  rules: [{backendRefs: [{name: httpbin, port: 8000}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: other-host, namespace: istio-system}
spec:
  parentRefs: [{name: web, sectionName: https}]
  hostnames: [www.example.org]
  rules: [{backendRefs: [{name: httpbin, namespace: default, port: 8000}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: missing-backend, namespace: default}
spec:
  parentRefs: [{name: web, namespace: istio-system, port: 8080}]
  rules: [{backendRefs: [{name: nothing, port: 80}]}]
";

fn state(yaml: &str) -> State {
    crate::config::state_from_yaml(yaml)
}

fn statuses() -> BTreeMap<String, Value> {
    let state = state(CLUSTER);
    let gateway = ObjectKey::new("istio-system", "gateway-0");
    let plan = Plan::build(&state, &gateway, "nodemesh", &Plan::default());
    desired(&state, &plan, "nodemesh", "istio-system")
        .into_iter()
        .map(|d| (format!("{:?} {}", d.kind, d.key), d.status))
        .collect()
}

/// `type=status reason` of each condition.
fn conditions(conditions: &Value) -> Vec<String> {
    conditions
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| {
            format!(
                "{}={} {}",
                c["type"].as_str().unwrap(),
                c["status"].as_str().unwrap(),
                c["reason"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn gateways_of_the_class_and_their_listeners_report_what_is_served() {
    let statuses = statuses();
    assert!(
        !statuses.contains_key("Gateway istio-system/istios"),
        "another class's Gateway is not ours to report"
    );
    let web = &statuses["Gateway istio-system/web"];
    assert_eq!(
        conditions(&web["conditions"]),
        ["Accepted=True Accepted", "Programmed=False Invalid"]
    );
    let http = &web["listeners"][0];
    assert_eq!(http["name"], "http");
    assert_eq!(http["attachedRoutes"], 2, "{http}");
    assert_eq!(http["supportedKinds"][0]["kind"], "HTTPRoute");
    assert_eq!(
        conditions(&http["conditions"]),
        [
            "Accepted=True Accepted",
            "ResolvedRefs=True ResolvedRefs",
            "Programmed=True Programmed"
        ]
    );
    let https = &web["listeners"][1];
    assert_eq!(https["attachedRoutes"], 0, "{https}");
    assert_eq!(
        conditions(&https["conditions"]),
        [
            "Accepted=True Accepted",
            "ResolvedRefs=False InvalidCertificateRef",
            "Programmed=False Invalid"
        ]
    );
    assert!(
        https["conditions"][1]["message"]
            .as_str()
            .unwrap()
            .contains("Secret istio-system/missing-credential not found"),
        "{https}"
    );
    let elsewhere = &statuses["Gateway default/elsewhere"];
    assert_eq!(
        conditions(&elsewhere["conditions"]),
        ["Accepted=False Invalid", "Programmed=False Invalid"]
    );
}

#[test]
fn each_parent_ref_of_a_route_says_whether_it_attached_and_why_not() {
    let statuses = statuses();
    let parent = |route: &str| {
        let status = &statuses[&format!("Route(Http) {route}")];
        assert_eq!(status["parents"][0]["controllerName"], CONTROLLER_NAME);
        conditions(&status["parents"][0]["conditions"])
    };
    assert_eq!(
        parent("default/attached"),
        ["Accepted=True Accepted", "ResolvedRefs=True ResolvedRefs"]
    );
    assert_eq!(
        parent("default/no-such-listener")[0],
        "Accepted=False NoMatchingParent"
    );
    assert_eq!(
        parent("default/not-allowed")[0],
        "Accepted=False NotAllowedByListeners"
    );
    assert_eq!(
        parent("istio-system/other-host")[0],
        "Accepted=False NoMatchingListenerHostname"
    );
    assert_eq!(
        parent("default/missing-backend"),
        [
            "Accepted=True Accepted",
            "ResolvedRefs=False BackendNotFound"
        ]
    );
    let reference = &statuses["Route(Http) default/no-such-listener"]["parents"][0]["parentRef"];
    assert_eq!(
        *reference,
        json!({"group": GROUP, "kind": "Gateway", "namespace": "istio-system", "name": "web",
               "sectionName": "grpc"})
    );
}

/// The API server, scripted: `GET .../httproutes/<name>/status` answers with a route whose
/// status already has a parent of another controller; every `PATCH` is recorded.
#[derive(Clone, Default)]
struct ScriptedApi {
    patches: Arc<Mutex<Vec<(String, Value)>>>,
}

impl ScriptedApi {
    fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let patches = self.patches.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let body = body.collect_bytes().await.expect("a body");
                let path = parts.uri.path().to_owned();
                let answer = if parts.method == Method::PATCH {
                    let patch: Value = serde_json::from_slice(&body).expect("JSON");
                    patches.lock().push((path.clone(), patch));
                    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                           "metadata": {"name": "x"}})
                } else {
                    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                           "metadata": {"name": "x"},
                           "status": {"parents": [{"controllerName": "istio.io/gateway-controller",
                                                   "parentRef": {"name": "other"}}]}})
                };
                send.send_response(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        });
        Client::new(service, "default")
    }
}

#[tokio::test]
async fn statuses_are_patched_once_per_change_keeping_other_controllers_parents() {
    let api = ScriptedApi::default();
    let current = state(CLUSTER);
    let gateway = ObjectKey::new("istio-system", "gateway-0");
    let plan = Plan::build(&current, &gateway, "nodemesh", &Plan::default());
    let (state_tx, state_rx) = watch::channel(Arc::new(current));
    let (plan_tx, plan_rx) = watch::channel(Arc::new(plan));
    let shutdown = CancellationToken::new();
    let writer = tokio::spawn(keep_written(
        api.client(),
        state_rx,
        plan_rx,
        "nodemesh".into(),
        "istio-system".into(),
        shutdown.clone(),
    ));
    let wait_for = |count: usize| {
        let patches = api.patches.clone();
        async move {
            for _ in 0..200 {
                if patches.lock().len() >= count {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{} patches, not {count}", patches.lock().len());
        }
    };
    // Two Gateways and five routes.
    wait_for(7).await;
    let first: Vec<(String, Value)> = api.patches.lock().clone();
    let (path, patch) = first
        .iter()
        .find(|(path, _)| path.ends_with("/httproutes/attached/status"))
        .expect("the attached route's status");
    assert_eq!(
        path,
        "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes/attached/status"
    );
    let parents = patch["status"]["parents"].as_array().expect("parents");
    assert_eq!(parents.len(), 2, "{patch}");
    assert_eq!(parents[0]["controllerName"], "istio.io/gateway-controller");
    assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
    assert!(
        parents[1]["conditions"][0]["lastTransitionTime"].is_string(),
        "{patch}"
    );

    // The same state again writes nothing; a change writes what it changed.
    state_tx.send_modify(|_| {});
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        api.patches.lock().len(),
        7,
        "an unchanged status was written again"
    );
    let mut labelled = CLUSTER.replace(
        "metadata: {name: default}",
        "metadata: {name: default, labels: {shared: 'true'}}",
    );
    labelled.push('\n');
    state_tx.send_replace(Arc::new(state(&labelled)));
    wait_for(8).await;
    let patches = api.patches.lock().clone();
    let changed: Vec<&str> = patches[7..].iter().map(|(path, _)| path.as_str()).collect();
    assert!(
        changed
            .iter()
            .any(|p| p.ends_with("/httproutes/not-allowed/status")),
        "{changed:?}"
    );
    drop(plan_tx);
    shutdown.cancel();
    writer.await.expect("the writer ends");
}
