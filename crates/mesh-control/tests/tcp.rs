#![allow(clippy::unwrap_used)]
//! The TCP transport over real TCP on loopback: TLS, the HTTP upgrade, an HTTP CONNECT proxy,
//! the Noise channel and relay frames on one connection.

use bytes::Bytes;
use mesh_control::channel::{accept, initiate, ChannelError};
use mesh_control::tcp::{self, Dialer, Listener, Proxy};
use mesh_control::Link;
use mesh_proto::PublicKey;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

fn keypair(seed: u8) -> ([u8; 32], PublicKey) {
    let s = [seed; 32];
    (
        s,
        PublicKey(XPublic::from(&StaticSecret::from(s)).to_bytes()),
    )
}

/// A server that upgrades every connection and hands the links out.
async fn server() -> (SocketAddr, tokio::sync::mpsc::Receiver<Link>) {
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let (s, remote) = listener.accept().await.unwrap();
            let up = listener.upgrader();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(link) = up.upgrade(s, remote).await {
                    let _ = tx.send(Link::Tcp(link)).await;
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn noise_channel_and_relay_frames_over_tls() {
    let (addr, mut links) = server().await;
    let (ctrl_secret, ctrl_public) = keypair(1);
    let (node_secret, node_public) = keypair(2);
    let srv = tokio::spawn(async move {
        let link = links.recv().await.unwrap();
        let (mut tx, mut rx, who) = accept(&link, &ctrl_secret).await.unwrap();
        rx.set_limit(mesh_proto::control::MAX_MESSAGE_LEN);
        let msg = rx.recv().await.unwrap();
        tx.send(&msg).await.unwrap();
        // Echo relay frames.
        let frame = link.read_datagram().await.unwrap();
        link.send_datagram(frame).unwrap();
        link.closed().await;
        who
    });
    let link: Link = tcp::connect(&Dialer::default(), &addr.to_string())
        .await
        .unwrap()
        .into();
    assert_eq!(link.transport(), mesh_control::Transport::Tcp);
    assert_eq!(link.observed_udp(), None, "a TCP source is no UDP mapping");
    let (mut tx, mut rx) = initiate(&link, &node_secret, &ctrl_public).await.unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    tx.send(&big).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), big, "multi-chunk message echoed");
    let frame = Bytes::from(vec![7u8; tcp::MAX_DATAGRAM]);
    link.send_datagram(frame.clone()).unwrap();
    assert_eq!(link.read_datagram().await.unwrap(), frame);
    assert!(
        link.send_datagram(Bytes::from(vec![0u8; tcp::MAX_DATAGRAM + 1]))
            .is_err(),
        "over the bound"
    );
    link.close(9, b"done");
    assert_eq!(srv.await.unwrap(), node_public);
}

#[tokio::test]
async fn a_wrong_pinned_key_is_a_key_mismatch_over_tcp_too() {
    let (addr, mut links) = server().await;
    let (ctrl_secret, _) = keypair(1);
    let (node_secret, _) = keypair(2);
    let (_, other_public) = keypair(3);
    tokio::spawn(async move {
        let link = links.recv().await.unwrap();
        let _ = accept(&link, &ctrl_secret).await;
        link.closed().await;
    });
    let link: Link = tcp::connect(&Dialer::default(), &addr.to_string())
        .await
        .unwrap()
        .into();
    let err = initiate(&link, &node_secret, &other_public).await.err();
    assert!(matches!(err, Some(ChannelError::KeyMismatch)), "{err:?}");
}

#[tokio::test]
async fn a_plain_https_request_gets_a_404() {
    let (addr, _links) = server().await;
    // What a browser or a scanner does: TLS, then GET /.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = rustls_client();
    let name = rustls::pki_types::ServerName::try_from("example.org").unwrap();
    let mut s = tls.connect(name, stream).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer:?}");
}

fn rustls_client() -> tokio_rustls::TlsConnector {
    // What a browser would do, minus the certificate check (the certificate is throwaway).
    let config = mesh_control::quic::tls_client(tcp::ALPN).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// A minimal HTTP CONNECT proxy: counts the CONNECTs it served and checks credentials.
async fn proxy(
    credentials: Option<&'static str>,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    head.push(client.read_u8().await.unwrap());
                }
                let head = String::from_utf8(head).unwrap();
                let target = head.split_whitespace().nth(1).unwrap().to_owned();
                if let Some(c) = credentials {
                    use base64::Engine as _;
                    let want = format!(
                        "Proxy-Authorization: Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(c)
                    );
                    if !head.contains(&want) {
                        let _ = client
                            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                            .await;
                        return;
                    }
                }
                let mut server = tokio::net::TcpStream::connect(&target).await.unwrap();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (addr, served)
}

#[tokio::test]
async fn through_an_http_connect_proxy_with_credentials() {
    let (addr, mut links) = server().await;
    let (ctrl_secret, ctrl_public) = keypair(1);
    let (node_secret, _) = keypair(2);
    tokio::spawn(async move {
        let link = links.recv().await.unwrap();
        let (mut tx, mut rx, _) = accept(&link, &ctrl_secret).await.unwrap();
        let msg = rx.recv().await.unwrap();
        tx.send(&msg).await.unwrap();
        link.closed().await;
    });
    let (proxy_addr, served) = proxy(Some("user:pw")).await;

    // Wrong credentials: the proxy's refusal is what the error says.
    let dialer = Dialer {
        mark: None,
        proxy: Some(Proxy::parse(&format!("http://user:nope@{proxy_addr}")).unwrap()),
    };
    let err = tcp::connect(&dialer, &addr.to_string())
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("407"), "{err}");

    let dialer = Dialer {
        mark: None,
        proxy: Some(Proxy::parse(&format!("http://user:pw@{proxy_addr}")).unwrap()),
    };
    let link: Link = tcp::connect(&dialer, &addr.to_string())
        .await
        .unwrap()
        .into();
    let (mut tx, mut rx) = initiate(&link, &node_secret, &ctrl_public).await.unwrap();
    tx.send(b"through the proxy").await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), b"through the proxy");
    assert_eq!(served.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn control_messages_pass_a_flood_of_relay_frames() {
    let (addr, mut links) = server().await;
    let (ctrl_secret, ctrl_public) = keypair(1);
    let (node_secret, _) = keypair(2);
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let link = links.recv().await.unwrap();
        let (_tx, mut rx, _) = accept(&link, &ctrl_secret).await.unwrap();
        // The server reads control messages but never reads relay frames: they pile up in
        // its bounded inbox and the oldest are dropped.
        let msg = rx.recv().await.unwrap();
        let _ = got_tx.send((msg, link.datagrams_dropped()));
        link.closed().await;
    });
    let link: Link = tcp::connect(&Dialer::default(), &addr.to_string())
        .await
        .unwrap()
        .into();
    let (mut tx, _rx) = initiate(&link, &node_secret, &ctrl_public).await.unwrap();
    // 8 MiB of relay frames queued at once (the queue keeps the newest 512 KiB).
    let frame = Bytes::from(vec![1u8; 4000]);
    for _ in 0..2000 {
        link.send_datagram(frame.clone()).unwrap();
    }
    assert!(
        link.datagrams_dropped() > 1000,
        "the sender's queue is bounded"
    );
    let started = std::time::Instant::now();
    tx.send(b"heartbeat").await.unwrap();
    let (msg, _) = tokio::time::timeout(Duration::from_secs(5), got_rx)
        .await
        .expect("the control message is not stuck behind the frames")
        .unwrap();
    assert_eq!(msg, b"heartbeat");
    eprintln!(
        "control message through a full relay queue in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_closed_link_tells_the_other_side_its_code() {
    let (addr, mut links) = server().await;
    let client: Link = tcp::connect(&Dialer::default(), &addr.to_string())
        .await
        .unwrap()
        .into();
    let server_side = links.recv().await.unwrap();
    server_side.close(0x4d04, b"replaced by a newer connection");
    let closed = tokio::time::timeout(Duration::from_secs(5), client.closed())
        .await
        .unwrap();
    assert_eq!(closed.code, Some(0x4d04));
    assert!(closed.reason.contains("replaced"), "{closed}");
    assert!(client.read_datagram().await.is_err());
}

#[tokio::test]
async fn nothing_listening_is_a_clear_error() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let err = tcp::connect(&Dialer::default(), &addr.to_string())
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("refused"), "{err}");
}

#[tokio::test]
async fn dropping_every_handle_closes_the_connection() {
    // A server task that ends (a refused node, a finished session) drops its link; the
    // connection must not live on in the link's own reader and writer tasks.
    let (addr, mut links) = server().await;
    let client: Link = tcp::connect(&Dialer::default(), &addr.to_string())
        .await
        .unwrap()
        .into();
    let server_side = links.recv().await.unwrap();
    let copy = server_side.clone();
    drop(server_side);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(client.close_reason().is_none(), "a clone still holds it");
    drop(copy);
    let closed = tokio::time::timeout(Duration::from_secs(5), client.closed())
        .await
        .expect("the other side sees the close");
    assert_eq!(closed.code, Some(0), "{closed}");
}
