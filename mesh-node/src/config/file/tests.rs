use super::*;
use crate::{config::translate, inventory::ObjectKey};

const NAMESPACE: &str = "
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    nodemesh.io/enabled: \"true\"
";

fn pod(name: &str, ip: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: shop
  labels: {{app: web}}
spec:
  nodeName: node0
  containers: [{{name: app, image: web}}]
status:
  phase: Running
  podIP: {ip}
"
    )
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

fn load(source: &mut FileSource) -> (State, Vec<Rejection>) {
    let Load {
        objects,
        rejections,
    } = source.load().unwrap();
    (
        translate(
            &objects,
            rejections.clone(),
            crate::policy::DEFAULT_ROOT_NAMESPACE,
        ),
        rejections,
    )
}

#[test]
fn multi_document_files_and_lists_load() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ns.yaml", NAMESPACE);
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n",
        serde_json::to_string(
            &serde_yaml::from_str::<serde_json::Value>(&pod("b", "10.0.0.2")).unwrap()
        )
        .unwrap()
    );
    write(
        dir.path(),
        "pods.yaml",
        &format!("{}---\n{}", pod("a", "10.0.0.1"), list),
    );
    let (state, rejections) = load(&mut FileSource::new(dir.path(), "nodemesh-system"));
    assert!(
        rejections.is_empty(),
        "unexpected rejections: {rejections:?}"
    );
    assert_eq!(state.workloads.len(), 2, "both pods, one from a List");
    assert!(
        state.workloads.values().all(|w| w.enrolled),
        "namespace label enrolls"
    );
}

#[test]
fn a_bad_resource_is_rejected_alone_and_its_last_good_version_stays() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ns.yaml", NAMESPACE);
    write(
        dir.path(),
        "pods.yaml",
        &format!("{}---\n{}", pod("a", "10.0.0.1"), pod("b", "10.0.0.2")),
    );
    let mut source = FileSource::new(dir.path(), "nodemesh-system");
    let (state, _) = load(&mut source);
    assert_eq!(state.workloads.len(), 2);

    // Pod b gets an invalid IP; pod a changes its IP. a's change applies, b keeps 10.0.0.2.
    write(
        dir.path(),
        "pods.yaml",
        &format!("{}---\n{}", pod("a", "10.0.0.9"), pod("b", "not-an-ip")),
    );
    let (state, rejections) = load(&mut source);
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    let rejection = &rejections[0];
    assert!(
        rejection.origin.ends_with("pods.yaml"),
        "names the file: {rejection:?}"
    );
    assert_eq!(rejection.resource, "Pod shop/b", "names the resource");
    assert!(
        rejection.error.contains("not-an-ip"),
        "says why: {rejection:?}"
    );
    let ip = |name: &str| state.workloads[&ObjectKey::new("shop", name)].ips[0].to_string();
    assert_eq!(ip("a"), "10.0.0.9", "the good change applies");
    assert_eq!(
        ip("b"),
        "10.0.0.2",
        "the last good version of the bad one stays"
    );
}

#[test]
fn a_file_that_is_not_yaml_keeps_what_it_last_gave() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ns.yaml", NAMESPACE);
    write(dir.path(), "pods.yaml", &pod("a", "10.0.0.1"));
    let mut source = FileSource::new(dir.path(), "nodemesh-system");
    load(&mut source);
    write(
        dir.path(),
        "pods.yaml",
        "kind: Pod\n  metadata: [unclosed\n",
    );
    write(dir.path(), "more.yaml", &pod("c", "10.0.0.3"));
    let (state, rejections) = load(&mut source);
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(rejections[0].resource, "(whole file)");
    assert!(
        state.workloads.contains_key(&ObjectKey::new("shop", "a")),
        "kept"
    );
    assert!(
        state.workloads.contains_key(&ObjectKey::new("shop", "c")),
        "other files apply"
    );
}

#[test]
fn duplicates_and_missing_fields_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &pod("a", "10.0.0.1"));
    write(dir.path(), "b.yaml", &pod("a", "10.0.0.2"));
    // A field of the wrong type makes the whole object unusable.
    write(
        dir.path(),
        "c.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: shop}\nspec: {nodeName: [n]}\n",
    );
    let (state, rejections) = load(&mut FileSource::new(dir.path(), "nodemesh-system"));
    let resources: Vec<&str> = rejections.iter().map(|r| r.resource.as_str()).collect();
    assert_eq!(resources, ["Pod shop/a", "Pod shop/c"], "{rejections:?}");
    assert!(
        rejections[0].error.contains("a.yaml"),
        "points at the first definition"
    );
    assert_eq!(
        state.workloads[&ObjectKey::new("shop", "a")].ips[0].to_string(),
        "10.0.0.1",
        "first definition wins"
    );
}

#[test]
fn unknown_kinds_are_ignored_not_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n",
    );
    let (_, rejections) = load(&mut FileSource::new(dir.path(), "nodemesh-system"));
    assert!(rejections.is_empty(), "{rejections:?}");
}

#[test]
fn the_shipped_examples_load_without_rejections() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let (state, rejections) = load(&mut FileSource::new(&dir, "nodemesh-system"));
    assert!(rejections.is_empty(), "{rejections:?}");
    let reviews = &state.services[&ObjectKey::new("shop", "reviews")];
    assert_eq!(reviews.endpoints.len(), 2, "both replicas back the Service");
    let enrolled: Vec<&str> = state
        .workloads
        .values()
        .filter(|w| w.enrolled)
        .map(|w| w.key.name.as_str())
        .collect();
    assert_eq!(enrolled, ["productpage", "reviews-v1", "reviews-v2"]);
    let routed: Vec<String> = state
        .routes
        .summary()
        .into_iter()
        .map(|(service, origin, _)| format!("{service} {origin}"))
        .collect();
    assert_eq!(
        routed,
        [
            "shop/reviews DestinationRule shop/reviews",
            "shop/reviews VirtualService shop/reviews"
        ],
        "the canary example routes reviews"
    );
}

#[test]
fn istio_security_policies_load_and_a_bad_one_is_rejected_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "security.yaml",
        "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: nodemesh-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/sleep/sa/sleep]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-block, namespace: shop}
spec:
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/40]}
",
    );
    let (state, rejections) = load(&mut FileSource::new(dir.path(), "nodemesh-system"));
    assert_eq!(state.policies.peer_authentications.len(), 1);
    let names: Vec<&str> = state
        .policies
        .authorization_policies
        .iter()
        .map(|p| p.key.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["allow-sleep", "bad-block"],
        "the bad ALLOW policy stays, fail closed"
    );
    let bad = &state.policies.authorization_policies[1].spec;
    assert!(
        bad.rules.is_empty(),
        "with none of its invalid rules: {bad:?}"
    );
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(rejections[0].resource, "AuthorizationPolicy shop/bad-block");
    assert!(
        rejections[0].error.contains("10.0.0.0/40"),
        "{rejections:?}"
    );
}

const REVIEWS_DESTINATION_RULE: &str = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

fn reviews_split(name: &str, second_subset: &str, second_weight: u32) -> String {
    format!(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: {}
    - destination: {{host: reviews, subset: {second_subset}}}
      weight: {second_weight}
",
        100 - second_weight
    )
}

/// The subsets and weights the route for `shop/reviews` sends to, `default` if none.
fn reviews_route(state: &State) -> String {
    use crate::routing::{HttpAction, RequestInfo, RouteMatch};
    let (method, uri, headers, labels) = (
        http::Method::GET,
        http::Uri::from_static("/"),
        http::HeaderMap::new(),
        crate::inventory::Labels::new(),
    );
    let request = RequestInfo {
        method: &method,
        uri: &uri,
        headers: &headers,
        port: 9080,
        source_labels: &labels,
    };
    match state
        .routes
        .match_http(&ObjectKey::new("shop", "reviews"), &request)
    {
        RouteMatch::Rule { rule, .. } => match &rule.action {
            HttpAction::Route(destinations) => destinations
                .iter()
                .map(|d| {
                    format!(
                        "{}={}",
                        d.destination.subset.as_deref().unwrap_or("-"),
                        d.weight
                    )
                })
                .collect::<Vec<_>>()
                .join(","),
            other => format!("{other:?}"),
        },
        other => format!("{other:?}"),
    }
}

#[test]
fn a_virtual_service_routing_to_an_unknown_subset_keeps_its_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "dr.yaml", REVIEWS_DESTINATION_RULE);
    write(dir.path(), "vs.yaml", &reviews_split("reviews", "v2", 20));
    let mut source = FileSource::new(dir.path(), "nodemesh-system");
    let (state, rejections) = load(&mut source);
    assert!(rejections.is_empty(), "{rejections:?}");
    assert_eq!(reviews_route(&state), "v1=80,v2=20");

    // Valid on its own, but no DestinationRule defines v3.
    write(dir.path(), "vs.yaml", &reviews_split("reviews", "v3", 50));
    let (state, rejections) = load(&mut source);
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    let rejection = &rejections[0];
    assert!(
        rejection.origin.ends_with("vs.yaml"),
        "names the file: {rejection:?}"
    );
    assert_eq!(rejection.resource, "VirtualService shop/reviews");
    assert!(
        rejection.error.contains("subset \"v3\"") && rejection.error.contains("host \"reviews\""),
        "says which subset of which host: {rejection:?}"
    );
    assert_eq!(
        reviews_route(&state),
        "v1=80,v2=20",
        "the last good version stays in force"
    );

    // Once the subset exists, the new version applies.
    write(
        dir.path(),
        "dr.yaml",
        &format!("{REVIEWS_DESTINATION_RULE}  - {{name: v3, labels: {{version: v3}}}}\n"),
    );
    let (state, rejections) = load(&mut source);
    assert!(rejections.is_empty(), "{rejections:?}");
    assert_eq!(reviews_route(&state), "v1=50,v3=50");
}

#[test]
fn a_new_virtual_service_routing_to_an_unknown_subset_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "dr.yaml", REVIEWS_DESTINATION_RULE);
    write(dir.path(), "vs.yaml", &reviews_split("reviews", "v3", 50));
    let (state, rejections) = load(&mut FileSource::new(dir.path(), "nodemesh-system"));
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(rejections[0].resource, "VirtualService shop/reviews");
    assert_eq!(reviews_route(&state), "Default", "no version was ever good");
}

#[test]
fn routing_resources_load_by_kind_and_a_bad_one_is_rejected_with_its_field() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "dr.yaml", REVIEWS_DESTINATION_RULE);
    write(
        dir.path(),
        "routes.yaml",
        &format!(
            "{}---{}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: ratings, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: ratings}}]
  rules: [{{backendRefs: [{{name: ratings-v2, port: 9080}}]}}]
",
            reviews_split("reviews", "v2", 10),
            reviews_split("bad-weights", "v2", 10).replace("weight: 10", "weight: 30")
        ),
    );
    let (state, rejections) = load(&mut FileSource::new(dir.path(), "nodemesh-system"));
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(rejections[0].resource, "VirtualService shop/bad-weights");
    assert!(
        rejections[0].error.contains("spec.http[0].route")
            && rejections[0].error.contains("sum to 120"),
        "{rejections:?}"
    );
    assert_eq!(reviews_route(&state), "v1=90,v2=10");
    let origins: Vec<String> = state
        .routes
        .summary()
        .into_iter()
        .map(|(_, o, _)| o)
        .collect();
    assert_eq!(
        origins,
        [
            "HTTPRoute shop/ratings",
            "DestinationRule shop/reviews",
            "VirtualService shop/reviews"
        ]
    );
}

#[test]
fn the_published_state_says_which_file_each_object_came_from() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ns.yaml", NAMESPACE);
    write(dir.path(), "pods.yaml", &pod("a", "10.0.0.1"));
    let mut source = FileSource::new(dir.path(), "nodemesh-system");
    let (tx, _rx) = tokio::sync::watch::channel(Arc::new(State::default()));
    let metrics = crate::metrics::Metrics::new().unwrap();
    let state = source.publish(&tx, &metrics.node).unwrap();
    let file = |name: &str| dir.path().join(name).display().to_string();
    assert_eq!(
        state.origin_of("Pod", &ObjectKey::new("shop", "a")),
        Some(file("pods.yaml").as_str())
    );
    assert_eq!(
        state.origins.get("Namespace shop").map(|o| o.to_string()),
        Some(file("ns.yaml")),
        "{:?}",
        state.origins
    );
}

// === Security resources that cannot be applied fail closed ===

/// The state a fresh source (no last good version, as after a restart) builds from `yaml`.
fn load_fresh(yaml: &str) -> (State, Vec<Rejection>) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "security.yaml", yaml);
    load(&mut FileSource::new(dir.path(), "nodemesh-system"))
}

fn shop_workload(app: &str) -> crate::inventory::Workload {
    crate::inventory::Workload::for_test("node0", "shop", app, &[("app", app)])
}

/// A plaintext connection (no identity) or an mTLS one from `principal`, to port 8080.
fn caller(principal: Option<&str>) -> crate::policy::ConnectionAttributes<'_> {
    crate::policy::ConnectionAttributes {
        source_ip: "10.0.0.7".parse().unwrap(),
        remote_ip: "10.0.0.7".parse().unwrap(),
        source_principal: principal,
        source_namespace: principal.and_then(|p| p.split('/').nth(2)),
        destination_ip: "10.0.0.1".parse().unwrap(),
        destination_port: 8080,
    }
}

const SLEEP: &str = "cluster.local/ns/sleep/sa/sleep";

#[test]
fn an_unreadable_peer_authentication_makes_its_selection_strict_even_after_a_restart() {
    use crate::policy::MtlsMode;
    let (state, rejections) = load_fresh(
        "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-strict, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: strict}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db-strict, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT, extra: field}
",
    );
    assert_eq!(
        rejections.len(),
        2,
        "both bad policies are reported: {rejections:?}"
    );
    assert!(
        rejections.iter().all(|r| r.error.contains("STRICT")),
        "the rejection says how it is enforced: {rejections:?}"
    );
    let policies = &state.policies;
    assert_eq!(
        policies.mtls_mode(&shop_workload("web"), 8080),
        MtlsMode::Strict,
        "`mode: strict` does not parse: STRICT, not the namespace's PERMISSIVE"
    );
    assert_eq!(
        policies.mtls_mode(&shop_workload("db"), 8080),
        MtlsMode::Strict,
        "an unknown field is an error: STRICT"
    );
    assert_eq!(
        policies.mtls_mode(&shop_workload("cart"), 8080),
        MtlsMode::Permissive,
        "outside their selections the namespace's policy holds"
    );
}

#[test]
fn an_allow_policy_with_an_unsupported_rule_keeps_only_its_valid_rules() {
    let (state, rejections) = load_fresh(&format!(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - from:
    - source: {{principals: [{SLEEP}]}}
  - to:
    - operation: {{paths: ['/api/{{*}}/admin']}}
  - from:
    - source: {{namespaces: [shop], unknownField: x}}
"
    ));
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert!(
        rejections[0].error.contains("1 valid rule"),
        "{rejections:?}"
    );
    let (policies, web) = (&state.policies, shop_workload("web"));
    assert!(policies.authorize(&web, &caller(Some(SLEEP))).is_allowed());
    assert!(
        !policies
            .authorize(&web, &caller(Some("cluster.local/ns/shop/sa/cart")))
            .is_allowed(),
        "the rule with an unknown field must not allow namespace shop"
    );
    assert!(!policies.authorize(&web, &caller(None)).is_allowed());
    assert!(
        policies
            .authorize(&shop_workload("db"), &caller(None))
            .is_allowed(),
        "outside the selection nothing changes"
    );
}

#[test]
fn an_allow_policy_whose_selection_cannot_be_read_allows_nothing_anywhere() {
    // web allows only sleep. The second policy targets a Service by `targetRef` (not
    // supported) and the third has a selector that does not parse: each is widened to the
    // whole namespace, and there its rules must not add to what web allows.
    let (state, rejections) = load_fresh(&format!(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - from:
    - source: {{principals: [{SLEEP}]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: cart-by-service, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: cart}}]
  rules:
  - from:
    - source: {{namespaces: [shop]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: db-typo, namespace: shop}}
spec:
  selector: {{matchLabel: {{app: db}}}}
  rules:
  - {{}}
"
    ));
    assert_eq!(rejections.len(), 2, "{rejections:?}");
    let policies = &state.policies;
    let web = shop_workload("web");
    assert!(policies.authorize(&web, &caller(Some(SLEEP))).is_allowed());
    for (who, principal) in [
        ("namespace shop", Some("cluster.local/ns/shop/sa/cart")),
        (
            "anyone (db-typo's empty rule)",
            Some("cluster.local/ns/other/sa/x"),
        ),
        ("plaintext", None),
    ] {
        assert!(
            !policies.authorize(&web, &caller(principal)).is_allowed(),
            "{who} must not reach web through a widened policy's rules"
        );
    }
    for app in ["cart", "db", "api"] {
        assert!(
            !policies
                .authorize(&shop_workload(app), &caller(Some(SLEEP)))
                .is_allowed(),
            "{app}: inside the widened selection, denied"
        );
    }
    assert!(
        rejections
            .iter()
            .all(|r| r.error.contains("matches nothing")),
        "the rejections say how they are enforced: {rejections:?}"
    );
}

#[test]
fn a_deny_or_custom_policy_that_cannot_be_applied_denies_its_whole_selection() {
    let (state, rejections) = load_fresh(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ['/admin/{**}']}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: CUSTOM
  provider: {name: opa}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-typo, namespace: shop}
spec:
  action: AUDIT
  rulez: []
",
    );
    assert_eq!(rejections.len(), 3, "{rejections:?}");
    let custom = rejections
        .iter()
        .find(|r| r.resource.contains("ext-authz"))
        .unwrap();
    assert!(
        custom.error.contains("CUSTOM"),
        "the real reason: {custom:?}"
    );
    let policies = &state.policies;
    for app in ["web", "db"] {
        let verdict = policies.authorize(&shop_workload(app), &caller(Some(SLEEP)));
        assert!(!verdict.is_allowed(), "{app}: {verdict:?}");
    }
    assert!(
        policies
            .authorize(&shop_workload("cart"), &caller(None))
            .is_allowed(),
        "a broken AUDIT policy never decides access"
    );
}

#[test]
fn a_policy_targeting_by_ref_or_with_an_unreadable_selector_covers_its_namespace() {
    let (state, rejections) = load_fresh(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-ref, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: web}]
  action: DENY
  rules:
  - from:
    - source: {notNamespaces: [shop]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: odd-selector, namespace: other}
spec:
  selector: {matchExpressions: [{key: app, operator: In, values: [web]}]}
  action: DENY
",
    );
    assert_eq!(rejections.len(), 2, "{rejections:?}");
    let other = crate::inventory::Workload::for_test("node0", "other", "api", &[]);
    for workload in [shop_workload("web"), shop_workload("cart"), other] {
        let verdict = state.policies.authorize(&workload, &caller(Some(SLEEP)));
        assert!(!verdict.is_allowed(), "{}: {verdict:?}", workload.key);
    }
}
