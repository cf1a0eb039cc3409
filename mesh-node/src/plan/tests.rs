use super::{
    path::normalize_path,
    protocol::{PortProtocol, port_protocol},
    tunnel::tunnel_identities,
};
use crate::inventory::{ServicePort, TargetPort, Workload};

fn port(name: Option<&str>, app_protocol: Option<&str>) -> ServicePort {
    ServicePort {
        name: name.map(str::to_string),
        port: 80,
        target_port: TargetPort::Number(8080),
        app_protocol: app_protocol.map(str::to_string),
    }
}

#[test]
fn ports_follow_istios_protocol_selection() {
    for (name, app_protocol, expected) in [
        (Some("http"), None, PortProtocol::Http),
        (Some("http-web"), None, PortProtocol::Http),
        (Some("http2-api"), None, PortProtocol::Http),
        (Some("grpc-echo"), None, PortProtocol::Http),
        (Some("HTTP-upper"), None, PortProtocol::Http),
        (Some("web"), Some("http"), PortProtocol::Http),
        (None, Some("kubernetes.io/h2c"), PortProtocol::Http),
        (Some("http-web"), Some("tcp"), PortProtocol::Tcp),
        (Some("tcp-db"), None, PortProtocol::Tcp),
        (Some("https"), None, PortProtocol::Tcp),
        (Some("httpish"), None, PortProtocol::Undeclared),
        (Some("web"), None, PortProtocol::Undeclared),
        (None, None, PortProtocol::Undeclared),
    ] {
        assert_eq!(
            port_protocol(&port(name, app_protocol)),
            expected,
            "{name:?} / {app_protocol:?}"
        );
    }
}

#[test]
fn dot_segments_are_resolved_before_authorization() {
    assert_eq!(normalize_path("/public/page"), None);
    assert_eq!(
        normalize_path("/public/../admin").as_deref(),
        Some("/admin")
    );
    assert_eq!(normalize_path("/a/./b/../c").as_deref(), Some("/a/c"));
    assert_eq!(normalize_path("/../../etc").as_deref(), Some("/etc"));
    assert_eq!(normalize_path("/a/b/..").as_deref(), Some("/a/"));
    assert_eq!(normalize_path("/a/.").as_deref(), Some("/a/"));
    assert_eq!(
        normalize_path("/a..b/c").as_deref(),
        None,
        "dots inside a segment stay"
    );
}

#[test]
fn paths_that_dodge_a_policy_on_admin_all_normalize_to_it() {
    for dodge in [
        "//admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public%2F..%2Fadmin",
        "/public%2f..%2fadmin",
        "\\admin",
        "/%5Cadmin",
        "/public/..\\admin",
        "/%61dmin",
        "/./admin",
        "///admin",
    ] {
        assert_eq!(
            normalize_path(dodge).as_deref(),
            Some("/admin"),
            "{dodge:?} must be judged as /admin"
        );
    }
}

#[test]
fn normalization_decodes_once_and_keeps_what_it_must_not_touch() {
    assert_eq!(
        normalize_path("/a/%252e%252e/b").as_deref(),
        None,
        "one decoding pass"
    );
    assert_eq!(
        normalize_path("/a%20b/c").as_deref(),
        None,
        "reserved escapes stay"
    );
    assert_eq!(
        normalize_path("/a%zz").as_deref(),
        Some("/a%25zz"),
        "a stray % is escaped"
    );
    assert_eq!(
        normalize_path("/%%32e%%32e/admin").as_deref(),
        Some("/%252e%252e/admin"),
        "decoding never completes a new escape"
    );
    assert_eq!(
        normalize_path("/caf\u{e9}/%7euser").as_deref(),
        Some("/caf\u{e9}/~user")
    );
    assert_eq!(normalize_path("/a//b/").as_deref(), Some("/a/b/"));
    assert_eq!(normalize_path("/"), None);
}

proptest::proptest! {
    /// Whatever a client sends as a path: no panic, and the normalized path is normal: it
    /// starts with `/`, has no empty, `.` or `..` segment, nothing left to decode, and
    /// normalizing it again changes nothing.
    #[test]
    fn fuzz_path_normalization(path in "[/\\\\%.a-zA-Z0-9~_-]{0,40}|/(%[0-9a-fA-F]{2}|[./\\\\a-z])*") {
        if let Some(normal) = normalize_path(&path) {
            proptest::prop_assert!(normal.starts_with('/'), "{normal:?}");
            let inner = normal.trim_end_matches('/');
            for segment in inner.split('/').skip(1) {
                proptest::prop_assert!(!matches!(segment, "" | "." | ".."), "{path:?} -> {normal:?}");
            }
            proptest::prop_assert!(!normal.contains('\\'), "{normal:?}");
            proptest::prop_assert_eq!(normalize_path(&normal), None, "not idempotent: {:?}", path);
        }
    }
}

#[test]
fn a_tunnel_needs_a_ca_and_a_destination_in_the_mesh() {
    let source = Workload::for_test("node0", "shop", "web", &[]);
    let mut destination = Workload::for_test("node1", "shop", "reviews", &[]);
    let (from, to) = tunnel_identities(Some("cluster.local"), &source, &destination)
        .expect("valid identities")
        .expect("both ends in the mesh, a CA: HBONE");
    assert_eq!(from.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(to.to_string(), "spiffe://cluster.local/ns/shop/sa/reviews");

    assert_eq!(
        tunnel_identities(None, &source, &destination).expect("no error"),
        None,
        "no CA: plaintext"
    );
    destination.enrolled = false;
    assert_eq!(
        tunnel_identities(Some("cluster.local"), &source, &destination).expect("no error"),
        None,
        "a destination outside the mesh gets plaintext"
    );
    destination.enrolled = true;
    destination.service_account = "Not/Valid".into();
    assert!(tunnel_identities(Some("cluster.local"), &source, &destination).is_err());
}
