use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

use super::*;

/// A tunnel over an in-memory pipe: the server echoes every stream it accepts, except to
/// port 1, which it refuses.
async fn tunnel() -> SendRequest<Bytes> {
    tunnel_draining_on(CancellationToken::new()).await.0
}

/// [`tunnel`], whose server drains once `drain` is cancelled; also the server's task.
async fn tunnel_draining_on(
    drain: CancellationToken,
) -> (
    SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), HboneError>>,
) {
    let (client_io, server_io) = duplex(1 << 20);
    let server = tokio::spawn(serve(
        server_io,
        drain,
        |incoming: IncomingConnect| async move {
            if incoming.target.port() == 1 {
                incoming.refuse(StatusCode::FORBIDDEN);
                return;
            }
            let mut stream = incoming.accept().expect("accept");
            let mut buf = Vec::new();
            stream
                .read_to_end(&mut buf)
                .await
                .expect("read until half-close");
            stream.write_all(&buf).await.expect("echo");
            stream.shutdown().await.expect("half-close back");
        },
    ));
    let sender = client_handshake(client_io).await.expect("handshake");
    (sender, server)
}

/// A draining agent tells the tunnel's peer GOAWAY: the stream open on it runs to its end,
/// a new stream is refused (the client opens a new tunnel, to the agent that took over),
/// and the tunnel closes once the last stream is done.
#[tokio::test]
async fn a_draining_server_finishes_open_streams_and_refuses_new_ones() {
    let drain = CancellationToken::new();
    let (sender, server) = tunnel_draining_on(drain.clone()).await;
    let mut open = connect(sender.clone(), "10.0.0.1:8080".parse().unwrap())
        .await
        .unwrap();
    open.write_all(b"before").await.unwrap();

    drain.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = connect(sender, "10.0.0.1:8081".parse().unwrap()).await;
    assert!(refused.is_err(), "a new stream after GOAWAY must fail");
    assert!(!server.is_finished(), "the open stream keeps the tunnel up");

    open.write_all(b" and after").await.unwrap();
    open.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    open.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(
        echoed, b"before and after",
        "the open stream ran to its end"
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), server).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the tunnel closed cleanly once drained: {ended:?}"
    );
}

#[tokio::test]
async fn streams_carry_bytes_both_ways_with_half_close() {
    let sender = tunnel().await;
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
    let mut stream = connect(sender, "10.0.0.1:8080".parse().unwrap())
        .await
        .unwrap();
    let (mut read, mut write) = tokio::io::split(&mut stream);
    let writer = async {
        write.write_all(&payload).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut echoed = Vec::new();
    let reader = read.read_to_end(&mut echoed);
    let ((), read_result) = tokio::join!(writer, reader);
    read_result.unwrap();
    assert_eq!(
        echoed.len(),
        payload.len(),
        "larger than every flow-control window"
    );
    assert!(echoed == payload, "bytes intact");
}

#[tokio::test]
async fn many_streams_share_one_tunnel() {
    let sender = tunnel().await;
    let mut tasks = Vec::new();
    for i in 0..20u16 {
        let sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let target = SocketAddr::from(([10, 0, 0, 1], 1000 + i));
            let mut stream = connect(sender, target).await.unwrap();
            let message = format!("stream {i}");
            stream.write_all(message.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await.unwrap();
            assert_eq!(reply, message);
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn a_refused_stream_reports_the_status_and_the_tunnel_lives_on() {
    let sender = tunnel().await;
    let refused = connect(sender.clone(), "10.0.0.1:1".parse().unwrap()).await;
    assert!(
        matches!(refused, Err(HboneError::Refused(StatusCode::FORBIDDEN))),
        "{:?}",
        refused.err()
    );
    let mut stream = connect(sender, "10.0.0.1:2".parse().unwrap())
        .await
        .unwrap();
    stream.write_all(b"still up").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "still up");
}

/// The server side of a tunnel to a peer that went silent after the handshake: it reads
/// (so windows and pings are no help) and never answers anything.
async fn silent_peer() -> (SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let (client_io, server_io) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut connection = h2::server::handshake(server_io).await.expect("handshake");
        // Take the request and never answer it.
        let _held = connection.accept().await;
        std::future::pending::<()>().await;
    });
    (
        client_handshake(client_io).await.expect("handshake"),
        server,
    )
}

#[tokio::test(start_paused = true)]
async fn a_connect_to_a_peer_that_never_answers_times_out() {
    let (sender, server) = silent_peer().await;
    let started = tokio::time::Instant::now();
    let refused = connect(sender, "10.0.0.1:8080".parse().unwrap()).await;
    assert!(
        matches!(refused, Err(HboneError::Timeout(_))),
        "{:?}",
        refused.map(|_| ())
    );
    assert_eq!(started.elapsed(), HANDSHAKE_TIMEOUT);
    server.abort();
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_whose_peer_stops_answering_pings_is_dropped() {
    // The peer's connection task is parked: nothing on its side reads or answers at all.
    let (client_io, server_io) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut connection = h2::server::handshake(server_io).await.expect("handshake");
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Stop polling the connection: pings are never answered from here on.
        let _frozen = &mut connection;
        std::future::pending::<()>().await;
    });
    let mut sender = client_handshake(client_io).await.expect("handshake");
    tokio::time::sleep(KEEPALIVE_INTERVAL * 3).await;
    let ready = std::future::poll_fn(|cx| sender.poll_ready(cx)).await;
    assert!(
        ready.is_err(),
        "the tunnel must be closed after an unanswered ping"
    );
    server.abort();
}

proptest::proptest! {
    /// Any authority a peer can put in a request: no panic; only `ip:port` is a target.
    #[test]
    fn fuzz_connect_targets(authority in "\\PC{0,40}|\\[[0-9a-f:]{0,40}\\]:[0-9]{0,6}|[0-9.]{0,16}:[0-9]{0,6}") {
        let Ok(uri) = authority.parse::<http::Uri>() else {
            return Ok(());
        };
        if let Some(target) = connect_target(&Method::CONNECT, &uri) {
            proptest::prop_assert!(target.port() == uri.port_u16().unwrap_or(0), "{target} from {uri}");
        }
        proptest::prop_assert_eq!(connect_target(&Method::GET, &uri), None);
    }

    /// Whatever a peer sends after the HTTP/2 preface on a tunnel: the server ends (with an
    /// error or cleanly) and never panics, and never hands a stream over.
    #[test]
    fn fuzz_hbone_server_frames(frames in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let (mut client, server_io) = duplex(1 << 16);
            let served = tokio::spawn(serve(server_io, CancellationToken::new(), |_incoming: IncomingConnect| async move {}));
            client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
            let _ = client.write_all(&frames).await;
            drop(client);
            let ended = tokio::time::timeout(Duration::from_secs(5), served).await;
            assert!(matches!(ended, Ok(Ok(_))), "the server must end, not panic or hang: {ended:?}");
        });
    }
}
