use super::*;
use crate::{plan::gateway::ServerPlan, policy::jwt::NothingFetched};

// === helpers ===

/// Bookinfo's reviews in `default`: productpage on node0, reviews-v1 on node1, reviews-v2
/// on node0, a Service for them on 9080 (named `http`) and one on 5432 (`tcp-db`), and
/// `ratings`, whose selector matches no pod.
const BOOKINFO: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {nodemesh.io/enabled: 'true'}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: productpage, namespace: default, labels: {app: productpage}}
spec: {nodeName: node0, serviceAccountName: bookinfo-productpage, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: default, labels: {app: reviews, version: v1}}
spec: {nodeName: node1, serviceAccountName: bookinfo-reviews, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: default, labels: {app: reviews, version: v2}}
spec: {nodeName: node0, serviceAccountName: bookinfo-reviews, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.244.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: legacy}
spec: {nodeName: node0, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.244.0.12}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.20
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080, targetPort: 8080}
  - {name: tcp-db, port: 5432}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  clusterIP: 10.96.0.30
  selector: {app: ratings}
  ports: [{name: http, port: 9080}]
";

const SUBSETS: &str = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

/// The state the agent would publish for `yaml` (every object must validate).
fn state(yaml: &str) -> State {
    let state = crate::config::state_from_yaml(yaml);
    assert!(state.rejections.is_empty(), "{:?}", state.rejections);
    state
}

fn bookinfo_with(extra: &str) -> State {
    state(&format!("{BOOKINFO}---\n{extra}"))
}

const MTLS: Agent<'static> = Agent {
    node: "node0",
    trust_domain: Some("cluster.local"),
    outbound_traffic_policy: OutboundTrafficPolicy::AllowAny,
    jwt_keys: &NothingFetched,
};

fn ask(source: &str, destination: &str, port: Option<u16>) -> ExplainRequest {
    ExplainRequest {
        source: source.into(),
        destination: destination.into(),
        port,
        ..ExplainRequest::default()
    }
}

fn http(method: &str, path: &str, destination: &str) -> ExplainRequest {
    ExplainRequest {
        method: Some(method.into()),
        path: Some(path.into()),
        ..ask("productpage", destination, Some(9080))
    }
}

fn explained(state: &State, request: &ExplainRequest) -> Explanation {
    explain(state, MTLS, request).unwrap_or_else(|e| panic!("{request:?}: {e}"))
}

fn endpoint<'e>(explanation: &'e Explanation, pod: &str) -> &'e EndpointCheck {
    explanation
        .backends
        .iter()
        .flat_map(|b| &b.endpoints)
        .find(|e| e.pod == pod)
        .unwrap_or_else(|| panic!("no endpoint {pod} in {explanation:#?}"))
}

fn denied(by: &str, reason: &str) -> Outcome {
    Outcome::Denied {
        by: by.into(),
        reason: reason.into(),
    }
}

// === tests ===

#[test]
fn an_allowed_request_shows_protocol_endpoints_and_identities() {
    let state = state(BOOKINFO);
    let explanation = explained(&state, &http("GET", "/reviews", "reviews.default"));
    assert_eq!(explanation.verdict, Outcome::Allowed);
    assert_eq!(explanation.destination, "Service default/reviews");
    assert_eq!(
        explanation.address,
        Some("10.96.0.20:9080".parse().unwrap())
    );
    assert_eq!(explanation.protocol, "HTTP: port 9080 is named \"http\"");
    assert_eq!(explanation.request.as_deref(), Some("GET /reviews"));
    assert!(
        explanation.route.starts_with("none applies"),
        "{}",
        explanation.route
    );
    assert_eq!(
        explanation.source.identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/bookinfo-productpage")
    );
    let v1 = endpoint(&explanation, "default/reviews-v1");
    assert_eq!(
        v1.address,
        "10.244.1.10:8080".parse().unwrap(),
        "targetPort mapped"
    );
    assert_eq!(v1.node, "node1");
    assert!(v1.mutual_tls);
    assert_eq!(
        v1.identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/bookinfo-reviews")
    );
    assert_eq!(v1.peer_authentication, Some(MtlsMode::Permissive));
    assert_eq!(v1.protocol, "HTTP");
    assert_eq!(explanation.backends[0].endpoints.len(), 2);
}

#[test]
fn every_form_of_destination_resolves() {
    let state = state(BOOKINFO);
    for destination in [
        "reviews",
        "reviews.default",
        "reviews.default.svc.cluster.local",
        "10.96.0.20",
    ] {
        let explanation = explained(&state, &ask("default/productpage", destination, Some(9080)));
        assert_eq!(
            explanation.destination, "Service default/reviews",
            "{destination}"
        );
    }
    for destination in ["default/reviews-v1", "10.244.1.10"] {
        let explanation = explained(&state, &ask("productpage", destination, Some(8080)));
        assert_eq!(
            explanation.destination, "Pod default/reviews-v1",
            "{destination}"
        );
        assert_eq!(explanation.route, "none");
        assert_eq!(explanation.verdict, Outcome::Allowed);
        assert!(endpoint(&explanation, "default/reviews-v1").mutual_tls);
    }
    let outside = explained(&state, &ask("productpage", "192.0.2.7", Some(443)));
    assert_eq!(outside.destination, "outside the mesh");
    assert_eq!(outside.verdict, Outcome::Allowed);
    assert!(
        outside.notes[0].contains("passes the connection through"),
        "{outside:?}"
    );
}

#[test]
fn a_request_denied_by_an_allow_policy_names_it() {
    let state = bookinfo_with(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - to:
    - operation: {methods: [GET], paths: [/public, /public/*]}
",
    );
    let refused = explained(&state, &http("POST", "/admin", "reviews"));
    assert_eq!(
        refused.verdict,
        denied(
            "AuthorizationPolicy default/reviews-viewer",
            "no ALLOW policy matched"
        )
    );
    let v1 = endpoint(&refused, "default/reviews-v1");
    assert!(v1.detail.contains("POST /admin is answered 403"), "{v1:?}");

    let allowed = explained(&state, &http("GET", "/public/page", "reviews"));
    assert_eq!(allowed.verdict, Outcome::Allowed);
    assert_eq!(
        endpoint(&allowed, "default/reviews-v2").detail,
        "allowed by AuthorizationPolicy default/reviews-viewer"
    );
    // The destination resolves `..` before authorization, as the proxy does.
    let sneaky = explained(&state, &http("GET", "/public/../admin", "reviews"));
    assert!(
        matches!(sneaky.verdict, Outcome::Denied { .. }),
        "{sneaky:?}"
    );
}

#[test]
fn a_deny_policy_and_strict_mtls_are_named() {
    let state = bookinfo_with(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-legacy, namespace: default}
spec:
  action: DENY
  rules:
  - from:
    - source: {notPrincipals: ['cluster.local/ns/default/*']}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: default}
spec:
  mtls: {mode: STRICT}
",
    );
    // An enrolled client has an identity in `default`: allowed.
    let inside = explained(&state, &http("GET", "/", "reviews.default"));
    assert_eq!(inside.verdict, Outcome::Allowed);
    assert_eq!(
        endpoint(&inside, "default/reviews-v1").peer_authentication,
        Some(MtlsMode::Strict)
    );
    // A pod outside the mesh comes in plaintext: STRICT refuses it first.
    let legacy = explained(&state, &ask("legacy/client", "reviews.default", Some(9080)));
    assert_eq!(
        legacy.verdict,
        denied(
            "PeerAuthentication (mode STRICT)",
            "plaintext refused: mutual TLS required"
        )
    );
    assert!(legacy.notes[0].contains("not enrolled"), "{legacy:?}");
    // Without a CA nobody has an identity: the DENY policy matches the plaintext caller
    // too (no principal is not a principal in default/*), after STRICT.
    let plaintext = explain(
        &state,
        Agent {
            node: "node0",
            trust_domain: None,
            ..MTLS
        },
        &http("GET", "/", "reviews"),
    )
    .unwrap();
    assert!(
        !endpoint(&plaintext, "default/reviews-v1").mutual_tls,
        "{plaintext:?}"
    );
    assert!(
        matches!(&plaintext.verdict, Outcome::Denied { by, .. } if by.starts_with("PeerAuthentication")),
        "{plaintext:?}"
    );
}

#[test]
fn a_service_without_endpoints_is_unroutable() {
    let state = state(BOOKINFO);
    let explanation = explained(&state, &http("GET", "/", "ratings"));
    let Outcome::Unroutable { why } = &explanation.verdict else {
        panic!("{explanation:?}");
    };
    assert!(
        why.contains("no ready endpoint for port 9080") && why.contains("503 (UH)"),
        "{why}"
    );
    let nothing = explained(&state, &ask("productpage", "details", Some(9080)));
    assert_eq!(
        nothing.verdict,
        Outcome::Unroutable {
            why: "no Service default/details: the name does not resolve".into()
        }
    );
    let no_port = explained(&state, &ask("productpage", "reviews", Some(1234)));
    assert!(
        matches!(&no_port.verdict, Outcome::Unroutable { why } if why.contains("no port 1234")),
        "{no_port:?}"
    );
}

#[test]
fn a_canary_route_judges_each_subset_and_says_when_only_some_requests_fail() {
    let state = bookinfo_with(&format!(
        "{SUBSETS}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - name: canary
    route:
    - destination: {{host: reviews, subset: v1}}
      weight: 80
    - destination: {{host: reviews, subset: v2}}
      weight: 20
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: v2-closed, namespace: default}}
spec:
  selector: {{matchLabels: {{version: v2}}}}
  action: DENY
  rules: [{{}}]
"
    ));
    let explanation = explained(&state, &http("GET", "/", "reviews"));
    assert_eq!(
        explanation.route,
        "VirtualService default/reviews, rule \"canary\""
    );
    let shares: Vec<(Option<&str>, f64, usize)> = explanation
        .backends
        .iter()
        .map(|b| (b.subset.as_deref(), b.share_percent, b.endpoints.len()))
        .collect();
    assert_eq!(shares, [(Some("v1"), 80.0, 1), (Some("v2"), 20.0, 1)]);
    assert_eq!(
        explanation.verdict,
        denied(
            "AuthorizationPolicy default/v2-closed",
            "denied by a DENY policy (only for endpoint default/reviews-v2)"
        )
    );
    let rendered = explanation.render();
    assert!(
        rendered.contains("Service default/reviews subset v2 port 9080, 20%: 1 endpoint(s)"),
        "{rendered}"
    );
    assert!(
        rendered.ends_with(
            "verdict: DENIED by AuthorizationPolicy default/v2-closed: denied by a DENY \
             policy (only for endpoint default/reviews-v2)"
        ),
        "{rendered}"
    );
}

#[test]
fn matches_rewrites_and_unmatched_requests_follow_the_proxy() {
    let state = bookinfo_with(&format!(
        "{SUBSETS}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: api
    match: [{{uri: {{prefix: /v2/}}}}]
    rewrite: {{uri: /api/}}
    route: [{{destination: {{host: reviews, subset: v1}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-only, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  rules: [{{to: [{{operation: {{paths: [/api/*]}}}}]}}]
"
    ));
    let jason = explained(
        &state,
        &ExplainRequest {
            headers: vec![("end-user".into(), "jason".into())],
            ..http("GET", "/api/x", "reviews")
        },
    );
    assert_eq!(
        jason.route,
        "VirtualService default/reviews, rule \"jason\""
    );
    assert_eq!(jason.backends[0].subset.as_deref(), Some("v2"));
    assert_eq!(jason.verdict, Outcome::Allowed);

    // The destination sees the rewritten path, which the policy allows.
    let api = explained(&state, &http("GET", "/v2/books", "reviews"));
    assert_eq!(api.route, "VirtualService default/reviews, rule \"api\"");
    assert_eq!(api.verdict, Outcome::Allowed, "{api:#?}");
    assert!(
        api.notes.iter().any(|n| n.contains("/api/books")),
        "{:?}",
        api.notes
    );

    let unmatched = explained(&state, &http("GET", "/other", "reviews"));
    assert!(
        matches!(&unmatched.verdict, Outcome::Unroutable { why } if why.contains("404 (NR)")),
        "{unmatched:?}"
    );
}

#[test]
fn tcp_ports_are_judged_at_the_connection() {
    let state = bookinfo_with(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: paths-only, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{to: [{operation: {paths: [/public]}}]}]
",
    );
    let explanation = explained(&state, &ask("productpage", "reviews", Some(5432)));
    assert_eq!(explanation.protocol, "TCP: port 5432 is named \"tcp-db\"");
    assert_eq!(explanation.request, None);
    assert_eq!(endpoint(&explanation, "default/reviews-v1").protocol, "TCP");
    // A rule that needs the request cannot allow a bare connection (fail closed).
    assert_eq!(
        explanation.verdict,
        denied(
            "AuthorizationPolicy default/paths-only",
            "no ALLOW policy matched"
        )
    );
}

#[test]
fn questions_that_cannot_be_answered_say_why() {
    let state = state(BOOKINFO);
    assert_eq!(
        explain(&state, MTLS, &ask("nobody", "reviews", Some(9080))).unwrap_err(),
        ExplainError::UnknownSource(ObjectKey::new("default", "nobody"))
    );
    assert_eq!(
        explain(&state, MTLS, &ask("productpage", "reviews", None)).unwrap_err(),
        ExplainError::PortNeeded {
            destination: "reviews".into(),
            ports: "ports 9080, 5432".into()
        }
    );
    let single = explained(&state, &ask("productpage", "ratings", None));
    assert_eq!(single.address, Some("10.96.0.30:9080".parse().unwrap()));
    let bad_path = explain(
        &state,
        MTLS,
        &ExplainRequest {
            path: Some("reviews".into()),
            ..ask("productpage", "reviews", Some(9080))
        },
    );
    assert!(matches!(
        bad_path,
        Err(ExplainError::Invalid {
            parameter: "path",
            ..
        })
    ));
}

#[test]
fn requests_travel_as_query_strings() {
    let request = ExplainRequest {
        source: "default/productpage".into(),
        destination: "reviews.default.svc.cluster.local".into(),
        port: Some(9080),
        path: Some("/a b?x=1&y=2".into()),
        method: Some("POST".into()),
        headers: vec![("end-user".into(), "jason & co".into())],
    };
    let query = request.to_query();
    assert_eq!(
        query,
        "source=default/productpage&destination=reviews.default.svc.cluster.local&port=9080\
         &path=/a%20b%3Fx%3D1%26y%3D2&method=POST&header=end-user:jason%20%26%20co"
    );
    assert_eq!(ExplainRequest::from_query(&query), Ok(request));
    assert_eq!(
        ExplainRequest::from_query("destination=reviews"),
        Err(ExplainError::Missing("source"))
    );
    assert!(ExplainRequest::from_query("source=a&destination=b&port=x").is_err());
    assert!(ExplainRequest::from_query("source=%zz&destination=b").is_err());
}

#[test]
fn a_connection_to_the_proxy_s_own_port_is_explained_as_refused() {
    let state = state(BOOKINFO);
    let explanation = explained(
        &state,
        &ask("productpage", "default/reviews-v1", Some(15006)),
    );
    let check = endpoint(&explanation, "default/reviews-v1");
    assert!(
        matches!(&check.outcome, Outcome::Denied { reason, .. } if reason.contains("own listener")),
        "{check:?}"
    );
}

const ENTRIES: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: default}
spec:
  hosts: [api.payments.example]
  addresses: [203.0.113.10]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: default}
spec:
  hosts: [db.legacy.example]
  addresses: [240.240.0.1]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.20}, {address: 192.0.2.21, ports: {tcp-pg: 6432}}]
";

#[test]
fn a_service_entry_destination_is_explained_where_it_goes() {
    let state = bookinfo_with(ENTRIES);
    let by_name = explain(
        &state,
        MTLS,
        &ask("productpage", "api.payments.example", Some(443)),
    )
    .unwrap();
    assert_eq!(
        by_name.destination,
        "ServiceEntry host default/api.payments.example"
    );
    assert_eq!(by_name.verdict, Outcome::Allowed);
    assert!(
        by_name
            .route
            .contains("where the app asked, 203.0.113.10:443"),
        "{}",
        by_name.route
    );
    let pinned = explain(&state, MTLS, &ask("productpage", "240.240.0.1", Some(5432))).unwrap();
    assert!(
        pinned.route.contains("192.0.2.20:5432") && pinned.route.contains("192.0.2.21:6432"),
        "{}",
        pinned.route
    );
    // A port the entry does not list is unknown, as is any address nobody names.
    let registry_only = Agent {
        outbound_traffic_policy: OutboundTrafficPolicy::RegistryOnly,
        ..MTLS
    };
    let other_port = explain(
        &state,
        registry_only,
        &ask("productpage", "203.0.113.10", Some(80)),
    );
    assert!(matches!(
        other_port.unwrap().verdict,
        Outcome::Denied { .. }
    ));
    let unknown = explain(
        &state,
        registry_only,
        &ask("productpage", "198.51.100.1", Some(443)),
    )
    .unwrap();
    assert_eq!(
        unknown.verdict.to_string(),
        "DENIED by outboundTrafficPolicy REGISTRY_ONLY: not a Service, pod or ServiceEntry the \
         mesh knows: the source's proxy resets the connection (not_registered)"
    );
    let declared = explain(
        &state,
        registry_only,
        &ask("productpage", "203.0.113.10", Some(443)),
    );
    assert_eq!(declared.unwrap().verdict, Outcome::Allowed);
    let hosted = bookinfo_with(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cnn, namespace: default}
spec:
  hosts: [edition.cnn.com]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: DNS
",
    );
    let cnn = explain(
        &hosted,
        MTLS,
        &ask("productpage", "edition.cnn.com", Some(80)),
    )
    .unwrap();
    assert_eq!(
        cnn.route,
        "to edition.cnn.com:443, looked up when the connection opens"
    );
    assert!(
        cnn.notes.iter().any(|n| n.contains("by the Host")),
        "{:?}",
        cnn.notes
    );
    let allow_any = explain(&state, MTLS, &ask("productpage", "198.51.100.1", Some(443))).unwrap();
    assert_eq!(allow_any.verdict, Outcome::Allowed);
}

#[test]
fn a_request_s_token_is_validated_as_the_destination_would() {
    use crate::policy::jwt::tests::{SigningKey, jwks, now};
    let key = SigningKey::new("k1");
    let state = bookinfo_with(&format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  jwtRules: [{{issuer: me, jwks: '{}'}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  rules: [{{from: [{{source: {{requestPrincipals: [me/alice]}}}}]}}]
",
        jwks(&[&key])
    ));
    let with_token = |claims: serde_json::Value| ExplainRequest {
        headers: vec![(
            "authorization".into(),
            format!("Bearer {}", key.sign(&claims)),
        )],
        ..http("GET", "/", "reviews")
    };
    let alice = explained(
        &state,
        &with_token(serde_json::json!({"iss": "me", "sub": "alice", "exp": now() + 600})),
    );
    assert_eq!(alice.verdict, Outcome::Allowed, "{alice:?}");
    let expired = explained(
        &state,
        &with_token(serde_json::json!({"iss": "me", "sub": "alice", "exp": now() - 3600})),
    );
    assert_eq!(
        expired.verdict.to_string(),
        "DENIED by RequestAuthentication: Jwt is expired (401)"
    );
    let bob = explained(
        &state,
        &with_token(serde_json::json!({"iss": "me", "sub": "bob", "exp": now() + 600})),
    );
    assert_eq!(
        bob.verdict.to_string(),
        "DENIED by AuthorizationPolicy default/require-jwt: no ALLOW policy matched"
    );
    let anonymous = explained(&state, &http("GET", "/", "reviews"));
    assert!(matches!(anonymous.verdict, Outcome::Denied { .. }));
}

// === at a gateway ===

/// Bookinfo's reviews, an ingress gateway pod in `istio-system`, a Gateway for
/// `bookinfo.example.com` on 80 with its VirtualService, and a DENY of `/admin` at the
/// gateway.
fn at_the_gateway() -> (State, GatewayPorts) {
    let state = bookinfo_with(
        "
apiVersion: v1
kind: Pod
metadata: {name: ingress-0, namespace: istio-system, labels: {istio: ingressgateway}}
spec: {nodeName: node1, serviceAccountName: ingress, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.244.1.20}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [bookinfo.example.com]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo, namespace: default}
spec:
  hosts: [bookinfo.example.com]
  gateways: [bookinfo]
  http:
  - match: [{uri: {prefix: /reviews}}, {uri: {prefix: /admin}}]
    route: [{destination: {host: reviews, port: {number: 9080}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
",
    );
    let server = Arc::new(ServerPlan {
        gateway: ObjectKey::new("default", "bookinfo"),
        index: 0,
        listener: None,
        port: 80,
        protocol: crate::routing::gateway::ServerProtocol::Http,
        hosts: vec![crate::routing::gateway::ServerHost::parse("bookinfo.example.com").unwrap()],
        https_redirect: false,
        tls: None,
    });
    (state, GatewayPorts::from([(80, vec![server])]))
}

fn at_gateway(state: &State, ports: &GatewayPorts, request: &ExplainRequest) -> Explanation {
    let gateway = ObjectKey::new("istio-system", "ingress-0");
    explain_at_gateway(state, MTLS, request, &gateway, ports)
        .unwrap_or_else(|e| panic!("{request:?}: {e}"))
}

#[test]
fn at_a_gateway_the_request_is_explained_from_its_server_route_and_policies() {
    let (state, ports) = at_the_gateway();
    let ask_from = ask;
    let ask = |host: &str, port: Option<u16>, path: &str| ExplainRequest {
        path: Some(path.into()),
        ..ask_from("203.0.113.7", host, port)
    };
    let routed = at_gateway(
        &state,
        &ports,
        &ask("bookinfo.example.com", None, "/reviews/1"),
    );
    assert_eq!(routed.verdict, Outcome::Allowed, "{}", routed.render());
    assert_eq!(routed.route, "VirtualService default/bookinfo");
    assert_eq!(routed.backends[0].target, "Service default/reviews");
    let check = endpoint(&routed, "default/reviews-v1");
    assert!(check.mutual_tls, "{check:?}");
    assert_eq!(
        routed.source.identity.as_deref(),
        Some("spiffe://cluster.local/ns/istio-system/sa/ingress")
    );
    let denied = at_gateway(
        &state,
        &ports,
        &ask("bookinfo.example.com", Some(80), "/admin"),
    );
    let Outcome::Denied { by, .. } = &denied.verdict else {
        panic!("{}", denied.render());
    };
    assert!(by.contains("istio-system/no-admin"), "{by}");
    let unknown = at_gateway(
        &state,
        &ports,
        &ask("shop.example.com", Some(80), "/reviews"),
    );
    let Outcome::Unroutable { why } = &unknown.verdict else {
        panic!("{}", unknown.render());
    };
    assert!(why.contains("404 (NR)"), "{why}");
    let closed = at_gateway(
        &state,
        &ports,
        &ask("bookinfo.example.com", Some(8080), "/"),
    );
    assert!(
        matches!(&closed.verdict, Outcome::Unroutable { why } if why.contains("does not listen on port 8080")),
        "{}",
        closed.render()
    );
    let gateway = ObjectKey::new("istio-system", "ingress-0");
    let pod_as_source = ExplainRequest {
        source: "default/productpage".into(),
        ..ask("bookinfo.example.com", None, "/")
    };
    let error = explain_at_gateway(&state, MTLS, &pod_as_source, &gateway, &ports).unwrap_err();
    assert!(
        error.to_string().contains("the client's IP address"),
        "{error}"
    );
}
