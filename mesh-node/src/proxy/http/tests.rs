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

/// A draining agent closes an HTTP/1.1 keep-alive connection between requests: the request
/// in flight gets its whole response, and the connection ends instead of waiting for the
/// client's next request (which goes on a new connection, to the agent that took over).
#[tokio::test]
async fn a_draining_http1_connection_answers_the_request_in_flight_then_closes() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let drain = CancellationToken::new();
    let (answered_tx, answered_rx) = tokio::sync::oneshot::channel::<()>();
    let answered_rx = std::sync::Arc::new(parking_lot::Mutex::new(Some(answered_rx)));
    let served = tokio::spawn({
        let drain = drain.clone();
        async move {
            serve_connection(server, &drain, move |_request| {
                let answered_rx = answered_rx.clone();
                async move {
                    // The response waits until the test has started the drain.
                    let waiting = answered_rx.lock().take();
                    if let Some(waiting) = waiting {
                        let _ = waiting.await;
                    }
                    Response::new(full("done"))
                }
            })
            .await
        }
    });
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drain.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = answered_tx.send(());
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut response))
        .await
        .expect("the connection closes after the response")
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("done"), "the whole response: {response}");
    let ended = tokio::time::timeout(Duration::from_secs(5), served).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "served cleanly: {ended:?}");
}

#[test]
fn a_connection_reuses_its_parties_until_the_config_or_the_peer_changes() {
    use std::sync::Arc;

    use crate::{access_log::Parties, inventory::ObjectKey, metrics::Reporter, state::State};
    let memo = metered::PartiesMemo::default();
    let builds = std::cell::Cell::new(0);
    let build = || {
        builds.set(builds.get() + 1);
        Parties::new(Reporter::Source, None, None, None, None, None)
    };
    let (web, api) = (
        ObjectKey::new("shop", "web-1"),
        ObjectKey::new("shop", "api-1"),
    );
    let service = ObjectKey::new("shop", "web");
    let state = Arc::new(State::default());
    let first = memo.get(&state, (Some(&web), Some(&service)), build);
    let again = memo.get(&state, (Some(&web), Some(&service)), build);
    assert!(Arc::ptr_eq(&first, &again), "same config and peers: reused");
    assert_eq!(builds.get(), 1);

    memo.get(&state, (Some(&api), Some(&service)), build);
    assert_eq!(builds.get(), 2, "another destination pod");
    memo.get(&state, (Some(&api), None), build);
    assert_eq!(builds.get(), 3, "no Service");

    // A new config, even one equal to the old: the parties may have changed with it.
    let newer = Arc::new(State::default());
    drop(state);
    memo.get(&newer, (Some(&api), None), build);
    assert_eq!(builds.get(), 4, "a new config");
    memo.get(&newer, (Some(&api), None), build);
    assert_eq!(builds.get(), 4);
}
