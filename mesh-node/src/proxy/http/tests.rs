use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

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
