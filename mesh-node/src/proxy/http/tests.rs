use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

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
fn sniffing_tells_http_from_other_protocols() {
    assert_eq!(looks_like_http(b"GET / HTTP/1.1\r\n"), Some(true));
    assert_eq!(looks_like_http(b"DELETE /x"), Some(true));
    assert_eq!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(true));
    assert_eq!(looks_like_http(b"hello\n"), Some(false));
    assert_eq!(looks_like_http(b"\x16\x03\x01\x02"), Some(false), "TLS");
    assert_eq!(looks_like_http(b"GETX"), Some(false));
    // Too short to tell yet.
    assert_eq!(looks_like_http(b""), None);
    assert_eq!(looks_like_http(b"PO"), None);
    assert_eq!(looks_like_http(b"PRI * HT"), None);
}

#[tokio::test]
async fn sniffed_bytes_are_replayed_in_front_of_the_stream() {
    let (mut client, server) = tokio::io::duplex(64);
    // Split over two writes: the sniffer must wait for enough bytes to decide.
    client.write_all(b"PO").await.unwrap();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"ST /x HTTP/1.1\r\n").await.unwrap();
        client
    });
    let (mut stream, is_http) = sniff(server).await;
    assert!(is_http);
    let _client = writer.await.unwrap();
    let mut read = vec![0; 18];
    stream.read_exact(&mut read).await.unwrap();
    assert_eq!(&read, b"POST /x HTTP/1.1\r\n");
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_not_http() {
    let (_client, server) = tokio::io::duplex(64);
    let (_, is_http) = sniff(server).await;
    assert!(!is_http, "server-first protocols fall back to L4");
}

#[test]
fn hop_by_hop_headers_are_dropped_and_te_trailers_kept() {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONNECTION,
        HeaderValue::from_static("close, x-secret"),
    );
    headers.insert("x-secret", HeaderValue::from_static("1"));
    headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert("x-kept", HeaderValue::from_static("yes"));
    strip_hop_by_hop(&mut headers);
    let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["te", "x-kept"]);
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
