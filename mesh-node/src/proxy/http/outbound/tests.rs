use super::*;

#[test]
fn cookies_are_found_by_name() {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.headers.insert(
        header::COOKIE,
        HeaderValue::from_static("theme=dark; session=abc123"),
    );
    assert_eq!(cookie(&parts, "session"), Some("abc123"));
    assert_eq!(cookie(&parts, "theme"), Some("dark"));
    assert_eq!(cookie(&parts, "user"), None);
}

#[test]
fn http2_upstream_requests_get_scheme_and_authority() {
    let mut request = Request::builder()
        .uri("/echo?x=1")
        .header(header::HOST, "reviews:9080")
        .body(super::super::empty())
        .unwrap();
    absolute_uri(&mut request);
    assert_eq!(request.uri().to_string(), "http://reviews:9080/echo?x=1");
}
