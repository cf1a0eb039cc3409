use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

use super::*;

/// A tunnel over an in-memory pipe: the server echoes every stream it accepts, except to
/// port 1, which it refuses.
async fn tunnel() -> SendRequest<Bytes> {
    let (client_io, server_io) = duplex(1 << 20);
    tokio::spawn(serve(server_io, |incoming: IncomingConnect| async move {
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
    }));
    client_handshake(client_io).await.expect("handshake")
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
