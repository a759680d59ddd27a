#![allow(clippy::unwrap_used)]
//! The Noise channel over real QUIC on loopback.

use mesh_control::channel::{accept, initiate, ChannelError};
use mesh_control::quic;
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
        let (mut tx, mut rx, who) = accept(&conn, &ctrl_secret).await.unwrap();
        let msg = rx.recv().await.unwrap();
        tx.send(&msg).await.unwrap();
        // Keep the connection until the client is done with it.
        conn.closed().await;
        (who, msg.len())
    });
    let conn = client.connect(addr, "mesh").unwrap().await.unwrap();
    let (mut tx, mut rx) = initiate(&conn, &node_secret, &ctrl_public).await.unwrap();
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
        accept(&conn, &ctrl_secret).await.err()
    });
    let conn = client.connect(addr, "mesh").unwrap().await.unwrap();
    let err = initiate(&conn, &node_secret, &other_public)
        .await
        .err()
        .expect("handshake must fail");
    assert!(matches!(err, ChannelError::KeyMismatch), "{err:?}");
    assert!(srv.await.unwrap().is_some());
}
