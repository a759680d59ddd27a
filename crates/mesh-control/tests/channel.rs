#![allow(clippy::unwrap_used)]
//! The Noise channel over real QUIC on loopback.

use mesh_control::channel::{accept, initiate, ChannelError};
use mesh_control::quic;
use mesh_control::Link;
use mesh_proto::PublicKey;
use std::net::SocketAddr;
use std::sync::Arc;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

fn keypair(seed: u8) -> ([u8; 32], PublicKey) {
    let s = [seed; 32];
    (
        s,
        PublicKey(XPublic::from(&StaticSecret::from(s)).to_bytes()),
    )
}

fn endpoints() -> (quinn::Endpoint, quinn::Endpoint, SocketAddr) {
    let server_sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let server_addr = server_sock.local_addr().unwrap();
    let server = quinn::Endpoint::new(
        quic::endpoint_config(),
        Some(quic::server_config().unwrap()),
        server_sock,
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let client = quic::bind_client("127.0.0.1:0".parse().unwrap()).unwrap();
    (server, client, server_addr)
}

#[tokio::test]
async fn handshake_proves_both_keys_and_carries_large_messages() {
    let (server, client, addr) = endpoints();
    let (ctrl_secret, ctrl_public) = keypair(1);
    let (node_secret, node_public) = keypair(2);
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut tx, mut rx, who) = accept(&Link::from(conn.clone()), &ctrl_secret)
            .await
            .unwrap();
        // What a server does once it has admitted the node.
        rx.set_limit(mesh_proto::control::MAX_MESSAGE_LEN);
        let msg = rx.recv().await.unwrap();
        tx.send(&msg).await.unwrap();
        // Keep the connection until the client is done with it.
        conn.closed().await;
        (who, msg.len())
    });
    let conn = client.connect(addr, "mesh").unwrap().await.unwrap();
    let (mut tx, mut rx) = initiate(&Link::from(conn.clone()), &node_secret, &ctrl_public)
        .await
        .unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    tx.send(&big).await.unwrap();
    assert_eq!(
        rx.recv().await.unwrap(),
        big,
        "echo of a multi-chunk message"
    );
    conn.close(0u32.into(), b"done");
    let (who, len) = srv.await.unwrap();
    assert_eq!(who, node_public, "controller learned the node's key");
    assert_eq!(len, big.len());
}

#[tokio::test]
async fn wrong_controller_key_is_refused() {
    let (server, client, addr) = endpoints();
    let (ctrl_secret, _) = keypair(1);
    let (_, other_public) = keypair(9);
    let (node_secret, _) = keypair(2);
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        accept(&Link::from(conn.clone()), &ctrl_secret).await.err()
    });
    let conn = client.connect(addr, "mesh").unwrap().await.unwrap();
    let err = initiate(&Link::from(conn.clone()), &node_secret, &other_public)
        .await
        .err()
        .expect("handshake must fail");
    assert!(matches!(err, ChannelError::KeyMismatch), "{err:?}");
    assert!(srv.await.unwrap().is_some());
}

#[tokio::test]
async fn large_message_before_admission_is_refused_and_closes() {
    let (server, client, addr) = endpoints();
    let (ctrl_secret, ctrl_public) = keypair(1);
    let (node_secret, _) = keypair(2);
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (_tx, mut rx, _) = accept(&Link::from(conn.clone()), &ctrl_secret)
            .await
            .unwrap();
        // A small first message is fine...
        let small = rx.recv().await.unwrap();
        // ...a large second one before admission is not.
        let err = rx.recv().await.err();
        (small.len(), err, conn)
    });
    let conn = client.connect(addr, "mesh").unwrap().await.unwrap();
    let (mut tx, _rx) = initiate(&Link::from(conn.clone()), &node_secret, &ctrl_public)
        .await
        .unwrap();
    tx.send(&[b'x'; 300]).await.unwrap();
    tx.send(&vec![b'y'; 10_000]).await.unwrap();
    let (small, err, _server_conn) = srv.await.unwrap();
    assert_eq!(small, 300);
    match err {
        Some(ChannelError::TooLarge { limit, .. }) => {
            assert_eq!(limit, mesh_control::channel::MAX_UNADMITTED_LEN)
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed())
        .await
        .expect("the server closes the connection");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(mesh_control::channel::CLOSE_MESSAGE_TOO_LARGE)
            );
            let reason = String::from_utf8_lossy(&c.reason).to_string();
            assert!(reason.contains("over the limit"), "{reason}");
        }
        other => panic!("unexpected close {other}"),
    }
}

#[tokio::test]
async fn raised_limit_admits_large_messages() {
    let (server, client, addr) = endpoints();
    let (ctrl_secret, ctrl_public) = keypair(1);
    let (node_secret, _) = keypair(2);
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (_tx, mut rx, _) = accept(&Link::from(conn.clone()), &ctrl_secret)
            .await
            .unwrap();
        rx.set_limit(mesh_proto::control::MAX_MESSAGE_LEN);
        let n = rx.recv().await.unwrap().len();
        (n, conn)
    });
    let conn = client.connect(addr, "mesh").unwrap().await.unwrap();
    let (mut tx, _rx) = initiate(&Link::from(conn.clone()), &node_secret, &ctrl_public)
        .await
        .unwrap();
    tx.send(&vec![b'y'; 100_000]).await.unwrap();
    assert_eq!(srv.await.unwrap().0, 100_000);
}

#[tokio::test]
async fn oversized_handshake_frame_is_refused_before_it_is_read() {
    let (server, client, addr) = endpoints();
    let (ctrl_secret, _) = keypair(1);
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        accept(&Link::from(conn.clone()), &ctrl_secret).await.err()
    });
    let conn = client.connect(addr, "mesh").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // Announce a 65535-byte Noise message and send only part of it.
    let mut frame = vec![0xff, 0xff];
    frame.extend_from_slice(&[0u8; 2000]);
    send.write_all(&frame).await.unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(5), srv)
        .await
        .expect("refused without waiting for the rest")
        .unwrap();
    assert!(
        matches!(err, Some(ChannelError::TooLarge { len: 65535, .. })),
        "{err:?}"
    );
}

#[tokio::test]
async fn servers_allow_one_stream_and_no_unidirectional_ones() {
    let (server, client, addr) = endpoints();
    let (ctrl_secret, ctrl_public) = keypair(1);
    let (node_secret, _) = keypair(2);
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let _channel = accept(&Link::from(conn.clone()), &ctrl_secret)
            .await
            .unwrap();
        conn.closed().await;
    });
    let conn = client.connect(addr, "mesh").unwrap().await.unwrap();
    let _channel = initiate(&Link::from(conn.clone()), &node_secret, &ctrl_public)
        .await
        .unwrap();
    let wait = std::time::Duration::from_millis(500);
    assert!(
        tokio::time::timeout(wait, conn.open_bi()).await.is_err(),
        "a second bidirectional stream must not be granted"
    );
    assert!(
        tokio::time::timeout(wait, conn.open_uni()).await.is_err(),
        "unidirectional streams must not be granted"
    );
    conn.close(0u32.into(), b"done");
    srv.await.unwrap();
}

/// Forwards UDP between one client and `server` until `cut` is set; then drops everything,
/// as a dead controller (or a cut path) would.
async fn lossy_proxy(server: SocketAddr, cut: Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    client = Some(from);
                    if !cut.load(std::sync::atomic::Ordering::SeqCst) {
                        let _ = back.send(&a[..n]).await;
                    }
                }
                r = back.recv(&mut b) => {
                    let Ok(n) = r else { return };
                    if let (Some(c), false) = (client, cut.load(std::sync::atomic::Ordering::SeqCst)) {
                        let _ = front.send_to(&b[..n], c).await;
                    }
                }
            }
        }
    });
    addr
}

#[tokio::test]
async fn a_dead_controller_is_noticed_within_ten_seconds() {
    let (server, client, addr) = endpoints();
    let (ctrl_secret, ctrl_public) = keypair(1);
    let (node_secret, _) = keypair(2);
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = lossy_proxy(addr, cut.clone()).await;
    tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let _channel = accept(&Link::from(conn.clone()), &ctrl_secret)
            .await
            .unwrap();
        conn.closed().await;
    });
    let conn = client.connect(proxy, "mesh").unwrap().await.unwrap();
    let link = Link::from(conn.clone());
    let _channel = initiate(&link, &node_secret, &ctrl_public).await.unwrap();
    // Idle but alive: keepalives hold the connection well past the idle timeout, and the
    // server answers every one, so the node's watch does not give up on it.
    let idle = quic::IDLE_TIMEOUT + std::time::Duration::from_secs(1);
    assert!(
        tokio::time::timeout(idle, link.unanswered(quic::ANSWER_WITHIN))
            .await
            .is_err(),
        "an idle link whose server answers must be kept"
    );
    assert!(conn.close_reason().is_none(), "keepalives keep it open");
    cut.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    // The node's own watch: the next keepalive goes unanswered.
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        link.unanswered(quic::ANSWER_WITHIN),
    )
    .await
    .expect("a server that answers nothing is given up");
    let given_up = started.elapsed();
    eprintln!("silent server given up after {given_up:?}");
    // The promise: a dead controller noticed within 4 s (a keepalive, the wait, and a
    // sample), so that the node is on another one within 5 s; before QUIC's idle timeout.
    assert!(
        given_up <= std::time::Duration::from_millis(4500),
        "{given_up:?}"
    );
    assert!(
        conn.close_reason().is_none(),
        "well before QUIC's idle timeout"
    );
    // And QUIC's own idle timer, what tells a server that a node is gone.
    let reason = tokio::time::timeout(std::time::Duration::from_secs(15), conn.closed())
        .await
        .expect("the node notices");
    let took = started.elapsed();
    eprintln!("dead controller noticed after {took:?} ({reason})");
    assert!(
        matches!(reason, quinn::ConnectionError::TimedOut),
        "{reason}"
    );
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
}
