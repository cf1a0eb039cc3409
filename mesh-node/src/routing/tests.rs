use std::{collections::BTreeMap, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde::Deserialize;

use super::{build::ROUTING_ORIGIN, *};
use crate::{
    config::{Object, routing_resources, validate},
    inventory::Rejection,
};

// === helpers ===

/// Routing objects from multi-document YAML, each checked as the config sources check it.
fn objects(yaml: &str) -> Vec<Object> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|document| {
            let value = serde_yaml::Value::deserialize(document).unwrap();
            match value["kind"].as_str().expect("a kind") {
                "VirtualService" => Object::VirtualService(std::sync::Arc::new(
                    serde_yaml::from_value(value).unwrap(),
                )),
                "DestinationRule" => Object::DestinationRule(std::sync::Arc::new(
                    serde_yaml::from_value(value).unwrap(),
                )),
                "HTTPRoute" => {
                    Object::HttpRoute(std::sync::Arc::new(serde_yaml::from_value(value).unwrap()))
                }
                kind => panic!("unexpected kind {kind}"),
            }
        })
        .collect()
}

/// Routes from valid objects; fails the test if one does not validate.
fn routes(yaml: &str) -> (Routes, Vec<Rejection>) {
    let objects = objects(yaml);
    for object in &objects {
        if let Err(error) = validate(object) {
            panic!("{} should be valid: {error}", object.id());
        }
    }
    Routes::build(&routing_resources(&objects))
}

fn routes_without_rejections(yaml: &str) -> Routes {
    let (routes, rejections) = routes(yaml);
    assert!(
        rejections.is_empty(),
        "unexpected rejections: {rejections:?}"
    );
    routes
}

/// Why the first object of `yaml` is invalid, as the config source reports it.
fn error_of(yaml: &str) -> String {
    let objects = objects(yaml);
    match validate(&objects[0]) {
        Ok(()) => panic!("{} should be rejected", objects[0].id()),
        Err(error) => error.to_string(),
    }
}

fn assert_rejected(yaml: &str, expected: &[&str]) {
    let error = error_of(yaml);
    for part in expected {
        assert!(
            error.contains(part),
            "error {error:?} should mention {part:?}"
        );
    }
}

fn shop(name: &str) -> ObjectKey {
    ObjectKey::new("shop", name)
}

/// A request to build [`RequestInfo`] from.
struct Request {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    port: u16,
    labels: crate::inventory::Labels,
}

impl Request {
    fn get(uri: &str) -> Self {
        Self {
            method: Method::GET,
            uri: uri.parse().unwrap(),
            headers: HeaderMap::new(),
            port: 9080,
            labels: crate::inventory::Labels::new(),
        }
    }

    fn method(mut self, method: &str) -> Self {
        self.method = method.parse().unwrap();
        self
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers
            .append(HeaderName::from_static(name), value.parse().unwrap());
        self
    }

    fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            method: &self.method,
            uri: &self.uri,
            headers: &self.headers,
            port: self.port,
            source_labels: &self.labels,
        }
    }
}

/// `default`, `none`, or the matched rule's action in short: `reviews:v1=80,reviews:v2=20`,
/// `redirect 301 /path`, `respond 503`.
fn describe(matched: RouteMatch<'_>) -> String {
    let rule = match matched {
        RouteMatch::Default => return "default".into(),
        RouteMatch::NoneMatched => return "none".into(),
        RouteMatch::Rule { rule, .. } => rule,
    };
    match &rule.action {
        HttpAction::Route(destinations) => destinations
            .iter()
            .map(|d| {
                let mut text = d.destination.service.name.clone();
                if let Some(subset) = &d.destination.subset {
                    text += &format!(":{subset}");
                }
                if destinations.len() > 1 {
                    text += &format!("={}", d.weight);
                }
                text
            })
            .collect::<Vec<_>>()
            .join(","),
        HttpAction::Redirect { status, path, .. } => {
            format!("redirect {status} {}", path.as_deref().unwrap_or("-"))
        }
        HttpAction::DirectResponse { status, .. } => format!("respond {status}"),
    }
}

fn route_for(routes: &Routes, service: &str, request: &Request) -> String {
    describe(routes.match_http(&shop(service), &request.info()))
}

fn rule<'a>(routes: &'a Routes, service: &str, request: &Request) -> &'a HttpRule {
    match routes.match_http(&shop(service), &request.info()) {
        RouteMatch::Rule { rule, .. } => rule,
        other => panic!("expected a rule, got {other:?}"),
    }
}

/// A VirtualService for `shop/reviews` with one rule under `match`, routing to `reviews`.
fn reviews_matching(match_yaml: &str) -> Routes {
    routes_without_rejections(&format!(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews]
  http:
  - match: [{match_yaml}]
    route: [{{destination: {{host: reviews}}}}]
"
    ))
}

const REVIEWS_SUBSETS: &str = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
";

// === Istio's documentation examples ===

/// The canary from Istio's traffic-shifting task.
const REVIEWS_CANARY: &str = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 80
    - destination:
        host: reviews
        subset: v2
      weight: 20
";

#[test]
fn the_reviews_canary_splits_80_20_by_subset() {
    let routes = routes_without_rejections(&format!("{REVIEWS_CANARY}---{REVIEWS_SUBSETS}"));
    let request = Request::get("/reviews/1");
    assert_eq!(
        route_for(&routes, "reviews", &request),
        "reviews:v1=80,reviews:v2=20"
    );
    let HttpAction::Route(destinations) = &rule(&routes, "reviews", &request).action else {
        panic!("a route");
    };
    let mut picked = BTreeMap::new();
    for roll in 0..total_weight(destinations) {
        let destination = pick_weighted(destinations, roll).expect("every roll picks");
        *picked
            .entry(destination.subset.clone().unwrap())
            .or_insert(0) += 1;
    }
    assert_eq!(
        picked,
        BTreeMap::from([("v1".into(), 80), ("v2".into(), 20)])
    );
    let v2 = routes.subset_labels(&shop("reviews"), "v2").unwrap();
    assert_eq!(v2, &BTreeMap::from([("version".into(), "v2".into())]));
    assert_eq!(routes.subset_labels(&shop("reviews"), "v9"), None);
    assert_eq!(routes.subset_labels(&shop("ratings"), "v1"), None);
}

#[test]
fn the_first_matching_rule_wins() {
    // Istio's request-routing task: jason sees v2, everyone else v1.
    let routes = routes_without_rejections(&format!(
        "
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination: {{host: reviews, subset: v2}}
  - match:
    - uri: {{prefix: /reviews}}
    route:
    - destination: {{host: reviews, subset: v3}}
  - route:
    - destination: {{host: reviews, subset: v1}}
---{REVIEWS_SUBSETS}"
    ));
    let jason = Request::get("/reviews/1").header("end-user", "jason");
    assert_eq!(route_for(&routes, "reviews", &jason), "reviews:v2");
    let other = Request::get("/reviews/1").header("end-user", "mary");
    assert_eq!(route_for(&routes, "reviews", &other), "reviews:v3");
    assert_eq!(
        route_for(&routes, "reviews", &Request::get("/health")),
        "reviews:v1"
    );
    assert_eq!(
        route_for(&routes, "ratings", &Request::get("/")),
        "default",
        "no VirtualService for ratings"
    );
}

#[test]
fn requests_no_rule_matches_get_none_unless_no_rule_is_for_their_port() {
    let routes = routes_without_rejections(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /api}, port: 9080}]
    route: [{destination: {host: reviews}}]
",
    );
    assert_eq!(
        route_for(&routes, "reviews", &Request::get("/api/x")),
        "reviews"
    );
    assert_eq!(
        route_for(&routes, "reviews", &Request::get("/other")),
        "none",
        "routes exist for port 9080 but none matched: 404"
    );
    assert_eq!(
        route_for(&routes, "reviews", &Request::get("/other").port(8080)),
        "default",
        "no rule is for port 8080"
    );
}

// === match kinds ===

#[test]
fn uri_matches_exact_prefix_and_anchored_regex_on_the_path_only() {
    let cases: [(&str, &str, bool); 12] = [
        ("{uri: {exact: /a}}", "/a", true),
        ("{uri: {exact: /a}}", "/a?x=1", true),
        ("{uri: {exact: /a}}", "/a/b", false),
        ("{uri: {prefix: /a}}", "/ab", true),
        ("{uri: {prefix: /a}}", "/b", false),
        ("{uri: {regex: '/a/[0-9]+'}}", "/a/12", true),
        ("{uri: {regex: '/a/[0-9]+'}}", "/a/12/x", false),
        ("{uri: {regex: '/a'}}", "/x/a", false),
        ("{uri: {exact: /A}, ignoreUriCase: true}", "/a", true),
        (
            "{uri: {prefix: /API}, ignoreUriCase: true}",
            "/api/v1",
            true,
        ),
        ("{uri: {exact: /A}}", "/a", false),
        ("{uri: {regex: '/A'}, ignoreUriCase: true}", "/a", false),
    ];
    for (condition, path, want) in cases {
        let routes = reviews_matching(condition);
        let matched = route_for(&routes, "reviews", &Request::get(path)) != "none";
        assert_eq!(matched, want, "{condition} on {path}");
    }
}

#[test]
fn header_method_query_port_label_authority_and_scheme_matches() {
    let get = || Request::get("/p?color=blue&size=");
    let cases: Vec<(&str, Request, bool)> = vec![
        (
            "{headers: {x-user: {exact: a}}}",
            get().header("x-user", "a"),
            true,
        ),
        (
            "{headers: {x-user: {exact: a}}}",
            get().header("x-user", "b"),
            false,
        ),
        ("{headers: {x-user: {exact: a}}}", get(), false),
        (
            "{headers: {X-User: {prefix: ad}}}",
            get().header("x-user", "admin"),
            true,
        ),
        (
            "{headers: {x-user: {regex: 'a.*n'}}}",
            get().header("x-user", "admin"),
            true,
        ),
        (
            "{headers: {x-user: {regex: 'a'}}}",
            get().header("x-user", "admin"),
            false,
        ),
        (
            "{headers: {x-user: {}}}",
            get().header("x-user", "anything"),
            true,
        ),
        ("{headers: {x-user: {}}}", get(), false),
        ("{withoutHeaders: {x-canary: {}}}", get(), true),
        (
            "{withoutHeaders: {x-canary: {}}}",
            get().header("x-canary", "1"),
            false,
        ),
        (
            "{withoutHeaders: {x-canary: {exact: '1'}}}",
            get().header("x-canary", "0"),
            true,
        ),
        ("{method: {exact: POST}}", get().method("POST"), true),
        ("{method: {exact: POST}}", get(), false),
        ("{method: {regex: 'GET|HEAD'}}", get().method("HEAD"), true),
        ("{method: {prefix: P}}", get().method("PUT"), true),
        ("{queryParams: {color: {exact: blue}}}", get(), true),
        ("{queryParams: {color: {exact: red}}}", get(), false),
        ("{queryParams: {color: {prefix: bl}}}", get(), true),
        ("{queryParams: {color: {regex: 'b.*'}}}", get(), true),
        ("{queryParams: {size: {exact: ''}}}", get(), true),
        ("{queryParams: {shape: {}}}", get(), false),
        ("{port: 9080}", get(), true),
        ("{port: 9080}", get().port(9081), false),
        (
            "{sourceLabels: {app: productpage}}",
            get().label("app", "productpage").label("version", "v1"),
            true,
        ),
        (
            "{sourceLabels: {app: productpage}}",
            get().label("app", "ratings"),
            false,
        ),
        (
            "{authority: {prefix: reviews}}",
            get().header("host", "reviews.shop:9080"),
            true,
        ),
        (
            "{authority: {exact: ratings}}",
            get().header("host", "reviews"),
            false,
        ),
        ("{scheme: {exact: http}}", get(), true),
        ("{gateways: [mesh], uri: {prefix: /p}}", get(), true),
    ];
    for (condition, request, want) in cases {
        let routes = reviews_matching(condition);
        let matched = route_for(&routes, "reviews", &request) == "reviews";
        assert_eq!(
            matched, want,
            "{condition} on {} {:?}",
            request.uri, request.headers
        );
    }
}

#[test]
fn conditions_within_a_match_all_apply_and_matches_are_alternatives() {
    let routes = reviews_matching(
        "{uri: {prefix: /api}, method: {exact: POST}}, {headers: {x-debug: {exact: '1'}}}",
    );
    let check = |request: Request, want: &str| {
        assert_eq!(
            route_for(&routes, "reviews", &request),
            want,
            "{}",
            request.uri
        );
    };
    check(Request::get("/api").method("POST"), "reviews");
    check(Request::get("/api"), "none");
    check(Request::get("/other").header("x-debug", "1"), "reviews");
}

#[test]
fn a_match_bound_to_gateways_only_never_matches_in_the_mesh() {
    let routes = routes_without_rejections(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{gateways: [ingress], uri: {prefix: /}}]
    route: [{destination: {host: ratings}}]
  - route: [{destination: {host: reviews}}]
",
    );
    assert_eq!(route_for(&routes, "reviews", &Request::get("/")), "reviews");
}

// === weights ===

#[test]
fn pick_weighted_covers_every_roll_in_proportion_and_skips_zero_weights() {
    let destination = |name: &str, weight| WeightedDestination {
        destination: Destination {
            service: shop(name),
            subset: None,
            port: None,
        },
        weight,
    };
    let split = [
        destination("a", 1),
        destination("b", 0),
        destination("c", 3),
    ];
    assert_eq!(total_weight(&split), 4);
    let picks: Vec<&str> = (0..4)
        .map(|roll| pick_weighted(&split, roll).unwrap().service.name.as_str())
        .collect();
    assert_eq!(picks, ["a", "c", "c", "c"]);
    assert_eq!(
        pick_weighted(&split, 4).unwrap().service.name,
        "a",
        "an out-of-range roll folds back in"
    );
    assert_eq!(pick_weighted(&[], 0), None);
    assert_eq!(pick_weighted(&[destination("z", 0)], 0), None);
}

// === validation ===

fn vs_with_rule(rule: &str) -> String {
    format!(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews]
  http:
  - {rule}
"
    )
}

#[test]
fn virtual_service_errors_name_the_field_and_why() {
    let cases: [(&str, &[&str]); 16] = [
        (
            "{match: [{uri: {regex: '(['}}], route: [{destination: {host: reviews}}]}",
            &[
                "spec.http[0].match[0].uri.regex",
                "\"([\"",
                "not a valid regular expression",
            ],
        ),
        (
            "{route: [{destination: {host: reviews, subset: v1}, weight: 70}, \
             {destination: {host: reviews, subset: v2}, weight: 20}]}",
            &["spec.http[0].route", "2 destinations sum to 90, not 100"],
        ),
        (
            "{route: [{destination: {host: reviews}, weight: -10}, \
             {destination: {host: ratings}, weight: 110}]}",
            &["spec.http[0].route[0].weight", "-10 is negative"],
        ),
        (
            "{route: [{destination: {host: reviews}}], timeout: 10 seconds}",
            &["spec.http[0].timeout", "\"10 seconds\" is not a duration"],
        ),
        (
            "{route: [{destination: {host: reviews}}], retries: {attempts: 3, perTryTimeout: 2x}}",
            &["spec.http[0].retries.perTryTimeout", "\"2x\""],
        ),
        (
            "{route: [{destination: {host: reviews}}], \
             fault: {delay: {fixedDelay: 5s, percentage: {value: 150}}}}",
            &[
                "spec.http[0].fault.delay.percentage.value",
                "150 is not a percentage",
            ],
        ),
        (
            "{route: [{destination: {host: reviews}}], mirror: {host: ratings}, \
             mirrorPercentage: {value: -1}}",
            &[
                "spec.http[0].mirrorPercentage.value",
                "-1 is not a percentage",
            ],
        ),
        (
            "{route: [{destination: {host: reviews}}], fault: {abort: {httpStatus: 600}}}",
            &[
                "spec.http[0].fault.abort.httpStatus",
                "600 is not an HTTP status",
            ],
        ),
        (
            "{directResponse: {status: 99}}",
            &[
                "spec.http[0].directResponse.status",
                "99 is not an HTTP status",
            ],
        ),
        (
            "{redirect: {uri: /x, redirectCode: 1000}}",
            &["spec.http[0].redirect.redirectCode", "1000"],
        ),
        (
            "{route: [{destination: {host: reviews}}], \
             retries: {attempts: 2, retryOn: '5xx,sometimes'}}",
            &[
                "spec.http[0].retries.retryOn",
                "unknown retry condition \"sometimes\"",
            ],
        ),
        (
            "{match: [{uri: {prefix: /}}]}",
            &[
                "spec.http[0]",
                "needs one of route, redirect or directResponse",
            ],
        ),
        (
            "{route: [{destination: {host: reviews}}], redirect: {uri: /x}}",
            &[
                "spec.http[0]",
                "only one of route, redirect and directResponse",
            ],
        ),
        (
            "{route: [{destination: {host: httpbin.example.com}}]}",
            &[
                "spec.http[0].route[0].destination.host",
                "not a Service of this cluster",
            ],
        ),
        (
            "{match: [{sourceNamespace: shop}], route: [{destination: {host: reviews}}]}",
            &["spec.http[0].match[0].sourceNamespace", "not supported"],
        ),
        (
            "{route: [{destination: {host: reviews}}], \
             headers: {request: {set: {'bad header': x}}}}",
            &[
                "spec.http[0].headers.request.set[bad header]",
                "not a valid HTTP header name",
            ],
        ),
    ];
    for (rule, expected) in cases {
        assert_rejected(&vs_with_rule(rule), expected);
    }
    assert_rejected(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - {name: canary, route: [{destination: {host: reviews}}]}
  - {name: canary, route: [{destination: {host: reviews}}]}
",
        &[
            "spec.http[1].name",
            "\"canary\" is used by more than one route",
        ],
    );
    assert_rejected(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  tcp:
  - route: [{destination: {host: reviews}, weight: 50}, {destination: {host: ratings}, weight: 40}]
",
        &["spec.tcp[0].route", "sum to 90"],
    );
}

#[test]
fn a_single_destination_takes_all_traffic_and_retry_on_accepts_istio_tokens() {
    let routes = routes_without_rejections(&vs_with_rule(
        "{route: [{destination: {host: reviews}, weight: 0}], \
         retries: {attempts: 3, retryOn: 'gateway-error,connect-failure,refused-stream,\
         unavailable,cancelled,retriable-status-codes,409,reset'}}",
    ));
    let rule = rule(&routes, "reviews", &Request::get("/"));
    let HttpAction::Route(destinations) = &rule.action else {
        panic!("a route");
    };
    assert_eq!(destinations[0].weight, 100);
    let retries = rule.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, 3);
    assert!(retries.retry_on.gateway_error && retries.retry_on.reset);
    assert_eq!(retries.retry_on.status_codes, [409]);
}

#[test]
fn destination_rule_errors_name_the_field_and_why() {
    let dr = |spec: &str| {
        format!(
            "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: shop}}
spec: {spec}
"
        )
    };
    let cases: [(&str, &[&str]); 7] = [
        (
            "{host: reviews, subsets: [{name: v1, labels: {version: v1}}, \
             {name: v1, labels: {version: v2}}]}",
            &["spec.subsets[1].name", "\"v1\" is defined more than once"],
        ),
        (
            "{host: reviews, trafficPolicy: {outlierDetection: {interval: soon}}}",
            &["spec.trafficPolicy.outlierDetection.interval", "\"soon\""],
        ),
        (
            "{host: reviews, trafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}}",
            &[
                "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
                "101 is not a percentage",
            ],
        ),
        (
            "{host: reviews, trafficPolicy: {connectionPool: {tcp: {connectTimeout: 1y}}}}",
            &[
                "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
                "\"1y\"",
            ],
        ),
        (
            "{host: reviews, trafficPolicy: {loadBalancer: {simple: FASTEST}}}",
            &["spec.trafficPolicy.loadBalancer.simple", "\"FASTEST\""],
        ),
        (
            "{host: reviews, subsets: [{name: v1, trafficPolicy: {portLevelSettings: \
             [{port: {number: 70000}}]}}]}",
            &[
                "spec.subsets[0].trafficPolicy.portLevelSettings[0].port.number",
                "70000",
            ],
        ),
        (
            "{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: \
             {httpHeaderName: x-user, useSourceIp: true}}}}",
            &[
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "exactly one of",
            ],
        ),
    ];
    for (spec, expected) in cases {
        assert_rejected(&dr(spec), expected);
    }
}

#[test]
fn http_route_errors_name_the_field_and_why() {
    let route = |spec: &str| {
        format!(
            "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews, namespace: shop}}
spec: {spec}
"
        )
    };
    let to_reviews = "parentRefs: [{group: '', kind: Service, name: reviews}]";
    let cases: Vec<(String, &[&str])> = vec![
        (
            "{parentRefs: [{group: apps, kind: Service, name: reviews}]}".into(),
            &[
                "spec.parentRefs[0]",
                "apps/Service reviews",
                "neither a Service",
            ],
        ),
        (
            "{parentRefs: [{name: web, sectionName: 'not a name'}]}".into(),
            &["spec.parentRefs[0].sectionName", "is not a listener name"],
        ),
        (
            "{parentRefs: [{kind: Service, group: '', name: reviews, namespace: other}]}".into(),
            &[
                "spec.parentRefs[0].namespace",
                "consumer route",
                "not supported",
            ],
        ),
        (
            format!(
                "{{{to_reviews}, rules: [{{matches: [{{path: {{type: RegularExpression, value: '(['}}}}]}}]}}"
            ),
            &[
                "spec.rules[0].matches[0].path.value",
                "not a valid regular expression",
            ],
        ),
        (
            format!(
                "{{{to_reviews}, rules: [{{backendRefs: [{{name: reviews, port: 9080, weight: -1}}]}}]}}"
            ),
            &["spec.rules[0].backendRefs[0].weight", "-1 is negative"],
        ),
        (
            format!("{{{to_reviews}, rules: [{{timeouts: {{request: 5 minutes}}}}]}}"),
            &["spec.rules[0].timeouts.request", "\"5 minutes\""],
        ),
        (
            format!(
                "{{{to_reviews}, rules: [{{matches: [{{path: {{type: Exact, value: /a}}}}], \
                 filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, \
                 replacePrefixMatch: /b}}}}}}]}}]}}"
            ),
            &[
                "spec.rules[0].matches[0].path",
                "ReplacePrefixMatch rewrite needs PathPrefix",
            ],
        ),
        (
            format!(
                "{{{to_reviews}, rules: [{{filters: [{{type: RequestMirror, requestMirror: \
                 {{backendRef: {{name: ratings, port: 9080}}, percent: 101}}}}]}}]}}"
            ),
            &[
                "spec.rules[0].filters[0].requestMirror.percent",
                "101 is not a percentage",
            ],
        ),
        (
            format!(
                "{{{to_reviews}, rules: [{{filters: [{{type: RequestRedirect, requestRedirect: \
                 {{statusCode: 99}}}}]}}]}}"
            ),
            &[
                "spec.rules[0].filters[0].requestRedirect.statusCode",
                "99 is not an HTTP status",
            ],
        ),
        (
            format!("{{{to_reviews}, rules: [{{filters: [{{type: ExtensionRef}}]}}]}}"),
            &[
                "spec.rules[0].filters[0].type",
                "\"ExtensionRef\"",
                "not supported",
            ],
        ),
    ];
    for (spec, expected) in cases {
        assert_rejected(&route(&spec), expected);
    }
}

// === references between resources ===

#[test]
fn a_route_to_an_undefined_subset_is_reported_with_the_vs_host_and_subset() {
    let objects = objects(&format!(
        "{REVIEWS_SUBSETS}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews-v4, namespace: shop}}
spec:
  hosts: [reviews]
  http:
  - route: [{{destination: {{host: reviews.shop.svc.cluster.local, subset: v4}}}}]
    mirror: {{host: reviews, subset: v1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: shop}}
spec:
  hosts: [ratings]
  http:
  - route: [{{destination: {{host: ratings}}}}]
    mirror: {{host: ratings, subset: shadow}}
"
    ));
    let offenders = check_references(&routing_resources(&objects));
    let ids: Vec<String> = offenders.iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(
        ids,
        [
            "VirtualService shop/reviews-v4",
            "VirtualService shop/ratings"
        ]
    );
    let reviews_error = &offenders[0].1;
    for part in [
        "VirtualService shop/reviews-v4",
        "http[0].route[0]",
        "subset \"v4\"",
        "host \"reviews.shop.svc.cluster.local\"",
    ] {
        assert!(
            reviews_error.contains(part),
            "{reviews_error:?} should mention {part:?}"
        );
    }
    assert!(offenders[1].1.contains("http[0].mirror"), "{offenders:?}");

    let (routes, rejections) = Routes::build(&routing_resources(&objects));
    assert_eq!(
        route_for(&routes, "reviews", &Request::get("/")),
        "default",
        "the offender is left out"
    );
    assert_eq!(rejections.len(), 2, "{rejections:?}");
    assert_eq!(rejections[0].origin, ROUTING_ORIGIN);
}

// === attaching to Services ===

#[test]
fn hosts_resolve_to_services_and_gateway_only_resources_are_ignored() {
    let routes = routes_without_rejections(
        "
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: many-hosts, namespace: shop}
spec:
  hosts: [reviews, ratings.shop.svc.cluster.local, details.other, '*.example.com', www.example.com]
  http:
  - route: [{destination: {host: reviews}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ingress-only, namespace: shop}
spec:
  hosts: [productpage]
  gateways: [shop-gateway]
  http:
  - route: [{destination: {host: productpage}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ingress-and-mesh, namespace: shop}
spec:
  hosts: [orders]
  gateways: [shop-gateway, mesh]
  http:
  - route: [{destination: {host: orders, port: {number: 8080}}}]
",
    );
    let hosts: Vec<String> = routes
        .summary()
        .into_iter()
        .map(|(service, _, _)| service.to_string())
        .collect();
    assert_eq!(
        hosts,
        [
            "other/details",
            "shop/orders",
            "shop/ratings",
            "shop/reviews"
        ]
    );
    let orders = rule(&routes, "orders", &Request::get("/"));
    let HttpAction::Route(destinations) = &orders.action else {
        panic!("a route");
    };
    assert_eq!(destinations[0].destination.port, Some(8080));
}

#[test]
fn gateway_tls_and_tcp_routes_match_sni_and_port_and_stay_out_of_the_mesh() {
    // Istio's "Ingress Gateway without TLS Termination" and TCP routing at a gateway.
    let routes = routes_without_rejections(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: nginx, namespace: shop}
spec:
  hosts: [nginx.example.com]
  gateways: [mygateway]
  tls:
  - match:
    - port: 443
      sniHosts: [nginx.example.com, '*.nginx.example.com']
    route:
    - destination: {host: my-nginx, port: {number: 443}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: shop}
spec:
  hosts: ['*']
  gateways: [mygateway, mesh]
  tcp:
  - match: [{port: 31400}]
    route:
    - destination: {host: tcp-echo, port: {number: 9000}}
  tls:
  - match: [{sniHosts: [db.example.com], gateways: [mesh]}]
    route: [{destination: {host: db}}]
",
    );
    let gateway = shop("mygateway");
    let every = |_: &str| true;
    let (vs, route) = routes
        .gateway_tls_route(&gateway, 443, "www.nginx.example.com", every)
        .expect("the SNI route");
    assert_eq!(vs.origin, "VirtualService shop/nginx");
    assert_eq!(route[0].destination.service, shop("my-nginx"));
    assert_eq!(route[0].destination.port, Some(443));
    assert!(
        routes
            .gateway_tls_route(&gateway, 8443, "nginx.example.com", every)
            .is_none()
    );
    assert!(
        routes
            .gateway_tls_route(&gateway, 443, "other.example.com", every)
            .is_none()
    );
    assert!(
        routes
            .gateway_tls_route(&gateway, 443, "nginx.example.com", |ns| ns != "shop")
            .is_none()
    );
    // A tls match bound to the mesh only is not the gateway's.
    assert!(
        routes
            .gateway_tls_route(&gateway, 443, "db.example.com", every)
            .is_none()
    );
    let (vs, route) = routes
        .gateway_tcp_route(&gateway, 31400, |_| true)
        .expect("the TCP route");
    assert_eq!(vs.origin, "VirtualService shop/tcp-echo");
    assert_eq!(route[0].destination.port, Some(9000));
    assert!(
        routes
            .gateway_tcp_route(&gateway, 31401, |_| true)
            .is_none()
    );
    assert!(
        routes
            .gateway_tcp_route(&shop("other-gateway"), 31400, |_| true)
            .is_none()
    );

    assert_rejected(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad-sni, namespace: shop}
spec:
  hosts: [nginx.example.com]
  gateways: [mygateway]
  tls:
  - match: [{port: 443, sniHosts: ['nginx example']}]
    route: [{destination: {host: my-nginx}}]
",
        &["spec.tls[0].match[0].sniHosts[0]", "is not a host name"],
    );
    assert_rejected(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: no-match, namespace: shop}
spec:
  hosts: [nginx.example.com]
  gateways: [mygateway]
  tls:
  - route: [{destination: {host: my-nginx}}]
",
        &["spec.tls[0].match", "needs a match with sniHosts"],
    );
}

#[test]
fn of_two_virtual_services_for_one_host_the_first_by_name_applies() {
    let vs = |name: &str, target: &str| {
        format!(
            "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [reviews, {name}]
  http:
  - route: [{{destination: {{host: {target}}}}}]
"
        )
    };
    // Listed in the "wrong" order on purpose: precedence is by name, not by position.
    let (routes, rejections) = routes(&format!(
        "{}---{}",
        vs("b-late", "ratings"),
        vs("a-early", "reviews")
    ));
    assert_eq!(route_for(&routes, "reviews", &Request::get("/")), "reviews");
    assert_eq!(
        route_for(&routes, "b-late", &Request::get("/")),
        "ratings",
        "the loser still applies to its other hosts"
    );
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(rejections[0].resource, "VirtualService shop/b-late");
    assert!(
        rejections[0]
            .error
            .contains("conflicts with VirtualService shop/a-early"),
        "{rejections:?}"
    );
}

// === HTTPRoute ===

#[test]
fn http_routes_of_a_service_merge_in_gateway_api_precedence_and_shadow_a_virtual_service() {
    let (routes, rejections) = routes(
        "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catch-all, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: reviews-api, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: specific, namespace: shop}
spec:
  parentRefs: [{group: core, kind: Service, name: reviews, namespace: shop}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-canary, value: 'true'}]
    - path: {type: Exact, value: /api/health}
    backendRefs: [{name: reviews-canary, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: reviews-writer, port: 9080}]
  - matches: [{path: {type: RegularExpression, value: '/v[0-9]+/.*'}}]
    backendRefs: [{name: reviews-versioned, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
",
    );
    let check = |request: Request, want: &str| {
        assert_eq!(
            route_for(&routes, "reviews", &request),
            want,
            "{} {}",
            request.method,
            request.uri
        );
    };
    check(Request::get("/api/health"), "reviews-canary");
    check(Request::get("/api/x").method("POST"), "reviews-writer");
    check(
        Request::get("/api/x").header("x-canary", "true"),
        "reviews-canary",
    );
    check(Request::get("/api/x"), "reviews-api");
    check(Request::get("/apix"), "reviews-v1");
    check(Request::get("/v2/x"), "reviews-versioned");
    check(Request::get("/"), "reviews-v1");
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(rejections[0].resource, "VirtualService shop/reviews");
    assert!(
        rejections[0]
            .error
            .contains("shadowed by HTTPRoute shop/catch-all, HTTPRoute shop/specific"),
        "{rejections:?}"
    );
    let rule = rule(&routes, "reviews", &Request::get("/"));
    assert_eq!(rule.origin, "HTTPRoute shop/catch-all");
    assert_eq!(
        routes.summary(),
        [(
            shop("reviews"),
            "HTTPRoute shop/catch-all, HTTPRoute shop/specific".into(),
            6
        )]
    );
}

#[test]
fn an_http_route_with_a_parent_port_applies_to_that_port_only() {
    let routes = routes_without_rejections(
        "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: reviews-v2, port: 9080}]
",
    );
    assert_eq!(
        route_for(&routes, "reviews", &Request::get("/api")),
        "reviews-v2"
    );
    assert_eq!(route_for(&routes, "reviews", &Request::get("/")), "none");
    assert_eq!(
        route_for(&routes, "reviews", &Request::get("/api").port(8080)),
        "default"
    );
}

#[test]
fn http_route_filters_timeouts_and_backends_compile() {
    let routes = routes_without_rejections(
        "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews}]
  rules:
  - name: rewrite-prefix
    matches: [{path: {type: PathPrefix, value: /old/}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: reviews.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new/}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-env, value: prod}]
        add: [{name: x-trace, value: '1'}]
        remove: [x-debug]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {remove: [server]}
    - type: RequestMirror
      requestMirror: {backendRef: {name: reviews-shadow, port: 9080}, fraction: {numerator: 1, denominator: 4}}
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 3}
    - {name: reviews-v2, namespace: canary, port: 9081}
    timeouts: {request: 10s, backendRequest: 2s}
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: Exact, value: /moved}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: shop.example.com, path: {type: ReplaceFullPath, replaceFullPath: /new-home}}
  - matches: [{path: {type: Exact, value: /nowhere}}]
    backendRefs: [{name: reviews, port: 9080, weight: 0}]
  - matches: [{path: {type: Exact, value: /retry}}]
    retry: {codes: [502, 503], attempts: 4, backoff: 100ms}
    backendRefs: [{name: reviews, port: 9080}]
",
    );
    let request = Request::get("/old/page?q=1");
    let RouteMatch::Rule {
        rule,
        matched_prefix,
    } = routes.match_http(&shop("reviews"), &request.info())
    else {
        panic!("a rule for /old");
    };
    assert_eq!(rule.name.as_deref(), Some("rewrite-prefix"));
    assert_eq!(matched_prefix, Some("/old"));
    let rewrite = rule.rewrite.as_ref().unwrap();
    assert_eq!(rewrite.authority.as_deref(), Some("reviews.internal"));
    assert_eq!(
        rewrite_uri(
            rewrite.uri.as_deref().unwrap(),
            matched_prefix,
            &request.uri
        ),
        "/new/page?q=1"
    );
    let HttpAction::Route(destinations) = &rule.action else {
        panic!("a route");
    };
    let weights: Vec<(String, Option<u16>, u32)> = destinations
        .iter()
        .map(|d| {
            (
                d.destination.service.to_string(),
                d.destination.port,
                d.weight,
            )
        })
        .collect();
    assert_eq!(
        weights,
        [
            ("shop/reviews-v1".into(), Some(9080), 3),
            ("canary/reviews-v2".into(), Some(9081), 1)
        ],
        "weights are relative, default 1"
    );
    assert_eq!(rule.timeout, Some(Duration::from_secs(10)));
    let retries = rule.retries.as_ref().unwrap();
    assert_eq!(
        (retries.attempts, retries.per_try_timeout),
        (0, Some(Duration::from_secs(2)))
    );
    assert_eq!(rule.request_headers.set.len(), 1);
    assert_eq!(rule.request_headers.add.len(), 1);
    assert_eq!(rule.request_headers.remove, ["x-debug"]);
    assert_eq!(rule.response_headers.remove, ["server"]);
    let mirror = rule.mirror.as_ref().unwrap();
    assert_eq!(mirror.destination.service, shop("reviews-shadow"));
    assert_eq!(mirror.percent, 25.0);

    let full = Request::get("/full/x");
    let RouteMatch::Rule {
        rule,
        matched_prefix,
    } = routes.match_http(&shop("reviews"), &full.info())
    else {
        panic!("a rule for /full");
    };
    assert_eq!(
        matched_prefix, None,
        "a full-path rewrite replaces the whole path"
    );
    assert_eq!(
        rewrite_uri(
            rule.rewrite.as_ref().unwrap().uri.as_deref().unwrap(),
            matched_prefix,
            &full.uri
        ),
        "/replaced"
    );
    assert_eq!(
        rule.retries, None,
        "no retry settings: the proxy applies its default"
    );

    let moved = rule_at(&routes, "/moved");
    assert_eq!(
        moved.action,
        HttpAction::Redirect {
            scheme: Some("https".into()),
            authority: Some("shop.example.com".into()),
            port: None,
            path: Some("/new-home".into()),
            status: 302,
        }
    );
    assert_eq!(
        rule_at(&routes, "/nowhere").action,
        HttpAction::DirectResponse {
            status: 500,
            body: None
        },
        "no backend can take traffic"
    );
    let retry = rule_at(&routes, "/retry").retries.clone().unwrap();
    assert_eq!(retry.attempts, 4);
    assert!(retry.retry_on.retries_status(502) && !retry.retry_on.retries_status(500));
    assert!(retry.retry_on.connect_failure);
}

fn rule_at<'a>(routes: &'a Routes, path: &str) -> &'a HttpRule {
    rule(routes, "reviews", &Request::get(path))
}

#[test]
fn an_http_route_without_rules_matches_everything() {
    let routes = routes_without_rejections(
        "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ratings, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: ratings}]
  rules: [{backendRefs: [{name: ratings-v2, port: 9080}]}]
",
    );
    assert_eq!(
        route_for(&routes, "reviews", &Request::get("/any")),
        "respond 500"
    );
    assert_eq!(
        route_for(&routes, "ratings", &Request::get("/any")),
        "ratings-v2"
    );
}

// === VirtualService actions ===

#[test]
fn virtual_service_rule_fields_compile_with_istio_defaults() {
    let routes = routes_without_rejections(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: faulty
    match: [{uri: {prefix: /faulty}}]
    route: [{destination: {host: reviews}}]
    timeout: 0.5s
    retries: {attempts: 3, perTryTimeout: 100ms}
    fault:
      delay: {fixedDelay: 7s}
      abort: {httpStatus: 503, percentage: {value: 12.5}}
    mirror: {host: reviews-shadow}
    rewrite: {uri: /v2, authority: reviews-v2}
    headers:
      request: {set: {x-env: prod}, add: {x-trace: '1'}, remove: [cookie]}
      response: {remove: [server]}
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: shop.example.com}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - match: [{uri: {exact: /no-timeout}}]
    route: [{destination: {host: reviews}}]
    timeout: 0s
    retries: {attempts: 0}
",
    );
    let faulty = rule_at(&routes, "/faulty/x");
    assert_eq!(faulty.name.as_deref(), Some("faulty"));
    assert_eq!(faulty.origin, "VirtualService shop/reviews");
    assert_eq!(faulty.timeout, Some(Duration::from_millis(500)));
    assert_eq!(
        faulty.retries,
        Some(RetryPolicy {
            attempts: 3,
            per_try_timeout: Some(Duration::from_millis(100)),
            retry_on: RetryOn::istio_default(),
        }),
        "retryOn defaults to Istio's"
    );
    let fault = faulty.fault.as_ref().unwrap();
    assert_eq!(
        fault.delay,
        Some(FaultDelay {
            fixed: Duration::from_secs(7),
            percent: 100.0
        })
    );
    assert_eq!(
        fault.abort,
        Some(FaultAbort {
            status: 503,
            percent: 12.5
        })
    );
    let mirror = faulty.mirror.as_ref().unwrap();
    assert_eq!(
        (mirror.destination.service.name.as_str(), mirror.percent),
        ("reviews-shadow", 100.0)
    );
    assert_eq!(
        faulty.rewrite,
        Some(Rewrite {
            uri: Some("/v2".into()),
            authority: Some("reviews-v2".into())
        })
    );
    let mut headers = HeaderMap::new();
    headers.insert("cookie", HeaderValue::from_static("a=b"));
    headers.insert("x-env", HeaderValue::from_static("dev"));
    faulty.request_headers.apply(&mut headers);
    assert_eq!(headers.get("cookie"), None);
    assert_eq!(headers["x-env"], "prod");
    assert_eq!(headers["x-trace"], "1");

    assert_eq!(
        rule_at(&routes, "/old").action,
        HttpAction::Redirect {
            scheme: None,
            authority: Some("shop.example.com".into()),
            port: None,
            path: Some("/new".into()),
            status: 301,
        }
    );
    assert_eq!(
        rule_at(&routes, "/teapot").action,
        HttpAction::DirectResponse {
            status: 418,
            body: Some("short and stout".into())
        }
    );
    let plain = rule_at(&routes, "/no-timeout");
    assert_eq!(plain.timeout, None, "0s disables the timeout");
    assert_eq!(plain.retries.as_ref().map(|r| r.attempts), Some(0));
    assert_eq!(
        rule_at(&routes, "/old").retries,
        None,
        "absent: the proxy's default"
    );
}

#[test]
fn tcp_routes_pick_the_first_rule_for_the_port() {
    let routes = routes_without_rejections(
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 5432}]
    route: [{destination: {host: db-primary, port: {number: 5432}}}]
  - route:
    - {destination: {host: db-a}, weight: 50}
    - {destination: {host: db-b}, weight: 50}
",
    );
    let names = |port| {
        routes
            .tcp_route(&shop("db"), port)
            .unwrap()
            .iter()
            .map(|d| d.destination.service.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(5432), ["db-primary"]);
    assert_eq!(names(6000), ["db-a", "db-b"]);
    assert_eq!(routes.tcp_route(&shop("reviews"), 5432), None);
    assert_eq!(
        route_for(&routes, "db", &Request::get("/")),
        "default",
        "no http rules"
    );
}

// === DestinationRule traffic policy ===

const LAYERED_POLICY: &str = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 2s}
    outlierDetection: {consecutive5xxErrors: 7}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: LEAST_CONN}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool:
        http: {maxRetries: 3, idleTimeout: 30s}
      portLevelSettings:
      - port: {number: 9080}
        loadBalancer: {consistentHash: {httpHeaderName: x-user}}
      - port: {number: 9443}
        loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: 0s}}}
        outlierDetection: {consecutiveGatewayErrors: 2, interval: 1m, baseEjectionTime: 5m, maxEjectionPercent: 50}
";

#[test]
fn traffic_policy_layers_replace_section_by_section() {
    let routes = routes_without_rejections(LAYERED_POLICY);
    let reviews = shop("reviews");
    let top_pool = ConnectionPool {
        max_connections: Some(100),
        connect_timeout: Some(Duration::from_secs(2)),
        ..ConnectionPool::default()
    };
    let top_outliers = Some(OutlierDetection {
        consecutive_5xx_errors: 7,
        ..OutlierDetection::default()
    });

    let top = routes.traffic_policy(&reviews, None, 8080);
    assert_eq!(top.load_balancer, LoadBalancer::Random);
    assert_eq!(top.connection_pool, top_pool);
    assert_eq!(top.outlier_detection, top_outliers);

    let top_port = routes.traffic_policy(&reviews, None, 9080);
    assert_eq!(
        top_port.load_balancer,
        LoadBalancer::LeastRequest,
        "port level beats top level"
    );
    assert_eq!(
        top_port.connection_pool, top_pool,
        "sections the port does not set stay"
    );

    assert_eq!(
        routes.traffic_policy(&reviews, Some("v1"), 9080),
        top_port,
        "a subset without a policy inherits"
    );

    let v2 = routes.traffic_policy(&reviews, Some("v2"), 8080);
    assert_eq!(
        v2.connection_pool,
        ConnectionPool {
            max_retries: Some(3),
            idle_timeout: Some(Duration::from_secs(30)),
            ..ConnectionPool::default()
        },
        "a subset's section replaces the whole section, not field by field"
    );
    assert_eq!(v2.load_balancer, LoadBalancer::Random);

    let v2_port = routes.traffic_policy(&reviews, Some("v2"), 9080);
    assert_eq!(
        v2_port.load_balancer,
        LoadBalancer::ConsistentHash(HashKey::Header(HeaderName::from_static("x-user"))),
        "subset port level is on top"
    );
    let v2_tls = routes.traffic_policy(&reviews, Some("v2"), 9443);
    assert_eq!(
        v2_tls.load_balancer,
        LoadBalancer::ConsistentHash(HashKey::Cookie("session".into()))
    );
    assert_eq!(
        v2_tls.outlier_detection,
        Some(OutlierDetection {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 2,
            interval: Duration::from_secs(60),
            base_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        })
    );

    assert_eq!(
        routes.traffic_policy(&shop("ratings"), Some("v1"), 9080),
        TrafficPolicy::default(),
        "no DestinationRule"
    );
    assert_eq!(
        TrafficPolicy::default().load_balancer,
        LoadBalancer::RoundRobin
    );
    assert_eq!(TrafficPolicy::default().outlier_detection, None);
}

#[test]
fn destination_rules_for_one_host_merge_subsets_and_keep_the_first_policy() {
    let (routes, rejections) = routes(
        "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: b-more-subsets, namespace: shop}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - {name: v2, labels: {version: v2-from-b}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a-base, namespace: shop}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
",
    );
    let labels = |subset| {
        routes
            .subset_labels(&shop("reviews"), subset)
            .map(|l| l["version"].clone())
    };
    assert_eq!(labels("v1").as_deref(), Some("v1"));
    assert_eq!(
        labels("v2").as_deref(),
        Some("v2"),
        "the first definition stays"
    );
    assert_eq!(labels("v3").as_deref(), Some("v3"), "subsets are pooled");
    assert_eq!(
        routes
            .traffic_policy(&shop("reviews"), None, 9080)
            .load_balancer,
        LoadBalancer::LeastRequest
    );
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(
        rejections[0].resource,
        "DestinationRule shop/b-more-subsets"
    );
    assert!(rejections[0].error.contains("\"v2\""), "{rejections:?}");
}

// === rewrite, headers, retries ===

#[test]
fn rewrite_uri_replaces_the_matched_prefix_or_the_whole_path_and_keeps_the_query() {
    let uri = |text: &str| text.parse::<Uri>().unwrap();
    let cases = [
        ("/v2", Some("/reviews"), "/reviews/1?x=y", "/v2/1?x=y"),
        ("/v2", None, "/reviews/1?x=y", "/v2?x=y"),
        ("/", Some("/api/"), "/api/items", "/items"),
        ("/new", Some("/OLD"), "/old/page", "/new/page"),
        ("", Some("/foo"), "/foo", "/"),
        ("/xyz", Some(""), "/foo", "/xyz/foo"),
        ("/whole", Some("/absent"), "/other/path", "/whole"),
    ];
    for (rewrite, prefix, before, after) in cases {
        assert_eq!(
            rewrite_uri(rewrite, prefix, &uri(before)),
            after,
            "{rewrite:?} over {prefix:?} on {before}"
        );
    }
}

#[test]
fn header_ops_remove_then_set_then_add() {
    let ops = HeaderOps {
        set: vec![(
            HeaderName::from_static("x-a"),
            HeaderValue::from_static("set"),
        )],
        add: vec![(
            HeaderName::from_static("x-a"),
            HeaderValue::from_static("added"),
        )],
        remove: vec![
            HeaderName::from_static("x-a"),
            HeaderName::from_static("x-b"),
        ],
    };
    assert!(!ops.is_empty());
    assert!(HeaderOps::default().is_empty());
    let mut headers = HeaderMap::new();
    headers.append("x-a", HeaderValue::from_static("old-1"));
    headers.append("x-a", HeaderValue::from_static("old-2"));
    headers.append("x-b", HeaderValue::from_static("gone"));
    headers.append("x-c", HeaderValue::from_static("kept"));
    ops.apply(&mut headers);
    let x_a: Vec<_> = headers.get_all("x-a").iter().collect();
    assert_eq!(x_a, ["set", "added"]);
    assert_eq!(headers.get("x-b"), None);
    assert_eq!(headers["x-c"], "kept");
}

#[test]
fn retry_conditions_cover_their_statuses() {
    let on = |text: &str| RetryOn::parse("retryOn", text).unwrap();
    assert!(on("5xx").retries_status(500) && on("5xx").retries_status(599));
    assert!(!on("5xx").retries_status(404));
    let gateway = on("gateway-error");
    assert!([502, 503, 504].iter().all(|s| gateway.retries_status(*s)));
    assert!(!gateway.retries_status(500));
    assert!(on("retriable-4xx").retries_status(409));
    assert!(on("429,503").retries_status(429));
    assert!(!on("connect-failure").retries_status(503));
    let default = RetryPolicy::istio_default();
    assert_eq!(default.attempts, 2);
    assert!(default.retry_on.connect_failure && default.retry_on.refused_stream);
    assert!(default.retry_on.retries_status(503) && !default.retry_on.retries_status(502));
    assert!(RetryOn::parse("retryOn", "5xx,600").is_err());
}

// === admin API ===

#[test]
fn routes_serialize_for_the_admin_api() {
    let routes = routes_without_rejections(&format!(
        "{REVIEWS_CANARY}---{LAYERED_POLICY}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: shop}}
spec:
  hosts: [ratings]
  http:
  - match: [{{uri: {{regex: '/r/.*'}}, headers: {{x-a: {{exact: b}}}}}}]
    route: [{{destination: {{host: ratings}}}}]
    headers: {{request: {{set: {{x-env: prod}}}}}}
    timeout: 1s
"
    ));
    let json = serde_json::to_value(&routes).expect("serializes to JSON");
    let ratings = &json["hosts"]["shop/ratings"]["http"][0];
    assert_eq!(ratings["matches"][0]["uri"]["regex"], "/r/.*");
    assert_eq!(ratings["timeout"], "1s");
    assert_eq!(ratings["request_headers"]["set"][0][0], "x-env");
    assert_eq!(
        json["destination_rules"]["shop/reviews"]["subsets"]["v2"]["labels"]["version"],
        "v2"
    );
    let summary = routes.summary();
    assert_eq!(
        summary,
        [
            (shop("ratings"), "VirtualService shop/ratings".into(), 1),
            (shop("reviews"), "DestinationRule shop/reviews".into(), 2),
            (shop("reviews"), "VirtualService shop/reviews".into(), 1),
        ]
    );
}

#[test]
fn tls_origination_applies_to_a_service_entry_host_per_port() {
    let routes = routes_without_rejections(
        "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cnn, namespace: shop}
spec:
  host: edition.cnn.com
  trafficPolicy:
    tls: {mode: SIMPLE}
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: SIMPLE, sni: www.cnn.com, caCertificates: /etc/certs/ca.pem}
    - port: {number: 8080}
      tls: {mode: DISABLE}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
",
    );
    let at = |port| {
        routes
            .external_traffic_policy("edition.cnn.com", port)
            .tls_origination
    };
    assert_eq!(
        at(80),
        Some(TlsOrigination {
            sni: Some("www.cnn.com".into()),
            ca_certificates: Some("/etc/certs/ca.pem".into())
        })
    );
    assert_eq!(
        at(443),
        Some(TlsOrigination {
            sni: None,
            ca_certificates: None
        }),
        "the rule's own level"
    );
    assert_eq!(at(8080), None, "DISABLE at the port wins");
    assert_eq!(
        routes
            .external_traffic_policy("other.example.com", 80)
            .tls_origination,
        None
    );
    // ISTIO_MUTUAL between pods of the mesh: HBONE is the TLS, nothing to originate.
    assert_eq!(
        routes
            .traffic_policy(&shop("reviews"), None, 9080)
            .tls_origination,
        None
    );
}

#[test]
fn tls_settings_that_would_change_what_is_trusted_are_refused() {
    let rule = |tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: x, namespace: shop}}
spec:
  host: api.example.com
  trafficPolicy: {{tls: {tls}}}
"
        )
    };
    assert_rejected(&rule("{mode: MUTUAL}"), &["tls.mode", "MUTUAL"]);
    assert_rejected(
        &rule("{mode: SIMPLE, credentialName: api-ca}"),
        &["credentialName", "not supported"],
    );
    assert_rejected(
        &rule("{mode: SIMPLE, subjectAltNames: [a.example.com]}"),
        &["subjectAltNames"],
    );
    assert_rejected(
        &rule("{mode: SIMPLE, insecureSkipVerify: true}"),
        &["insecureSkipVerify"],
    );
    assert_rejected(&rule("{mode: simple}"), &["tls.mode", "is not one of"]);
}
