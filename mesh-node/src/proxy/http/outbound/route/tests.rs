use http::{HeaderName, HeaderValue, Request, StatusCode, header};

use super::*;
use crate::routing::{HeaderOps, WeightedDestination};

fn reviews() -> ObjectKey {
    ObjectKey::new("shop", "reviews")
}

fn rule(action: HttpAction) -> HttpRule {
    HttpRule {
        name: None,
        origin: "shop/reviews-routes".into(),
        matches: Vec::new(),
        action,
        timeout: None,
        retries: None,
        fault: None,
        rewrite: None,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        mirror: None,
    }
}

fn request(uri: &str, host: &str) -> Request<()> {
    Request::builder()
        .uri(uri)
        .header(header::HOST, host)
        .body(())
        .expect("a valid request")
}

fn to(service: &str, weight: u32) -> WeightedDestination {
    WeightedDestination {
        destination: Destination {
            service: ObjectKey::new("shop", service),
            subset: None,
            port: None,
        },
        weight,
    }
}

#[test]
fn without_a_rule_the_request_goes_to_the_dialed_service() {
    let Action::Forward(destination) = action(None, &reviews(), &request("/", "reviews")) else {
        panic!("forwarded");
    };
    assert_eq!(destination.service, reviews());
    assert_eq!((destination.subset, destination.port), (None, None));
}

#[test]
fn a_route_forwards_by_weight_and_weights_of_zero_route_nowhere() {
    let only_v2 = rule(HttpAction::Route(vec![
        to("reviews-v1", 0),
        to("reviews-v2", 100),
    ]));
    for _ in 0..50 {
        let Action::Forward(destination) =
            action(Some(&only_v2), &reviews(), &request("/", "reviews"))
        else {
            panic!("forwarded");
        };
        assert_eq!(destination.service.name, "reviews-v2");
    }
    let nowhere = rule(HttpAction::Route(vec![to("reviews-v1", 0)]));
    assert!(matches!(
        action(Some(&nowhere), &reviews(), &request("/", "reviews")),
        Action::NoRoute
    ));
}

#[test]
fn a_direct_response_carries_its_status_body_and_response_headers() {
    let mut answer = rule(HttpAction::DirectResponse {
        status: 503,
        body: Some("down for maintenance".into()),
    });
    answer.response_headers.set.push((
        HeaderName::from_static("x-maintenance"),
        HeaderValue::from_static("yes"),
    ));
    let Action::Answer(response) = action(Some(&answer), &reviews(), &request("/", "reviews"))
    else {
        panic!("answered at the source");
    };
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["x-maintenance"], "yes");
}

#[test]
fn a_redirect_keeps_what_the_rule_does_not_set() {
    let location = |rule: &HttpRule, uri: &str, host: &str| {
        let Action::Answer(response) = action(Some(rule), &reviews(), &request(uri, host)) else {
            panic!("answered at the source");
        };
        (
            response.status(),
            response.headers()[header::LOCATION]
                .to_str()
                .unwrap()
                .to_string(),
        )
    };
    let path_only = rule(HttpAction::Redirect {
        scheme: None,
        authority: None,
        port: None,
        path: Some("/new".into()),
        status: 308,
    });
    assert_eq!(
        location(&path_only, "/old?x=1", "reviews:9080"),
        (
            StatusCode::PERMANENT_REDIRECT,
            "http://reviews:9080/new".into()
        )
    );
    let elsewhere = rule(HttpAction::Redirect {
        scheme: Some("https".into()),
        authority: Some("reviews.example".into()),
        port: Some(8443),
        path: None,
        status: 301,
    });
    assert_eq!(
        location(&elsewhere, "/old?x=1", "reviews:9080"),
        (
            StatusCode::MOVED_PERMANENTLY,
            "https://reviews.example:8443/old?x=1".into()
        )
    );
}
