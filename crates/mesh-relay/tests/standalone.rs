//! The standalone relay over real QUIC on loopback: admission by ticket, forwarding within a
//! network only, full-size packets, expiry and renewal.
#![allow(clippy::unwrap_used)]

use mesh_control::quic;
use mesh_proto::control::{ErrorCode, Ticket};
use mesh_proto::relay::{self, Reassembly};
use mesh_proto::relay_session::{RelayClientMsg, RelayServerMsg};
use mesh_proto::PublicKey;
use mesh_relay::client::{connect, ClientError, RelaySession};
use mesh_relay::server::{Relay, CLOSE_TICKET_EXPIRED};
use mesh_relay::TicketKey;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const T: Duration = Duration::from_secs(5);

fn keypair() -> ([u8; 32], PublicKey) {
    let secret: [u8; 32] = rand::random();
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret));
    (secret, PublicKey(public.to_bytes()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct Setup {
    relay_addr: SocketAddr,
    relay_key: PublicKey,
    issuer: TicketKey,
    forwarder: Arc<mesh_relay::Forwarder>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Setup {
    let (controller, controller_pub) = keypair();
    let (relay_secret, relay_key) = keypair();
    let relay = Relay::bind(
        "127.0.0.1:0".parse().unwrap(),
        relay_secret,
        &controller_pub,
    )
    .expect("bind relay");
    let relay_addr = relay.local_addr().expect("addr");
    let forwarder = relay.forwarder();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    Setup {
        relay_addr,
        relay_key,
        issuer: TicketKey::new(&controller, &relay_key),
        forwarder,
        _stop: stop,
    }
}

struct Node {
    secret: [u8; 32],
    key: PublicKey,
    endpoint: quinn::Endpoint,
}

fn node() -> Node {
    let (secret, key) = keypair();
    let endpoint = quic::bind_client("127.0.0.1:0".parse().unwrap()).expect("bind node");
    Node {
        secret,
        key,
        endpoint,
    }
}

async fn join(s: &Setup, n: &Node, ticket: Ticket) -> Result<RelaySession, ClientError> {
    connect(
        &n.endpoint,
        s.relay_addr,
        &s.relay_key,
        &n.secret,
        ticket,
        T,
    )
    .await
}

async fn admitted(s: &Setup, n: &Node, network: &str) -> RelaySession {
    let ticket = s.issuer.issue(network, &n.key, now() + 3600);
    join(s, n, ticket).await.expect("admitted")
}

fn send(session: &RelaySession, to: &PublicKey, id: u16, msg: &[u8]) {
    let max = session.conn.max_datagram_size().expect("datagrams enabled");
    for f in relay::encode(to, id, msg, max).expect("encode") {
        session.conn.send_datagram(f.into()).expect("send");
    }
}

/// The next whole message, or None after `wait`.
async fn receive(session: &RelaySession, wait: Duration) -> Option<(PublicKey, Vec<u8>)> {
    let mut reassembly = Reassembly::default();
    tokio::time::timeout(wait, async {
        loop {
            let d = session.conn.read_datagram().await.ok()?;
            let frame = relay::decode(&d).ok()?;
            if let Some(m) = reassembly.push(frame, Instant::now()) {
                return Some(m);
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test]
async fn forwards_within_a_network_only_with_the_sender_key() {
    let s = start().await;
    let (a, b, c) = (node(), node(), node());
    let sa = admitted(&s, &a, "prod").await;
    let sb = admitted(&s, &b, "prod").await;
    let sc = admitted(&s, &c, "dev").await;
    assert_eq!(sa.observed, a.endpoint.local_addr().expect("addr"));
    assert_eq!(s.forwarder.connected(), 3);

    // A full 1420-byte inner packet is a 1452-byte WireGuard message: more than one datagram.
    let big: Vec<u8> = (0..1452u32).map(|i| (i % 251) as u8).collect();
    send(&sa, &b.key, 1, &big);
    let (from, got) = receive(&sb, T).await.expect("B gets A's message");
    assert_eq!(from, a.key, "the relay names the real sender");
    assert_eq!(got, big);

    // Another network is out of reach, both ways.
    send(&sa, &c.key, 2, b"to another network");
    send(&sc, &a.key, 3, b"from another network");
    assert!(receive(&sc, Duration::from_millis(500)).await.is_none());
    assert!(receive(&sa, Duration::from_millis(500)).await.is_none());
    let counters = s.forwarder.counters();
    assert!(counters.forwarded >= 2, "{counters:?}");
    assert_eq!(counters.dropped, 2, "{counters:?}");

    // A cannot claim to be someone else: the key B sees is always A's.
    send(&sa, &b.key, 4, b"hello");
    assert_eq!(receive(&sb, T).await.expect("delivered").0, a.key);
}

#[tokio::test]
async fn refuses_bad_tickets_with_a_reason() {
    let s = start().await;
    let (a, b) = (node(), node());
    // A ticket made for another node.
    let stolen = s.issuer.issue("prod", &b.key, now() + 3600);
    match join(&s, &a, stolen).await {
        Err(ClientError::Refused { code, message, .. }) => {
            assert_eq!(code, ErrorCode::TicketInvalid);
            assert!(message.contains("does not verify"), "{message}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // An expired ticket.
    let old = s.issuer.issue("prod", &a.key, now() - 10);
    match join(&s, &a, old).await {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, ErrorCode::TicketExpired),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // A ticket from another controller.
    let (other_controller, _) = keypair();
    let forged = TicketKey::new(&other_controller, &s.relay_key).issue("prod", &a.key, now() + 60);
    assert!(matches!(
        join(&s, &a, forged).await,
        Err(ClientError::Refused {
            code: ErrorCode::TicketInvalid,
            ..
        })
    ));
    // A relay that is not the one announced.
    let (_, wrong_key) = keypair();
    let ticket = s.issuer.issue("prod", &a.key, now() + 60);
    let r = connect(&a.endpoint, s.relay_addr, &wrong_key, &a.secret, ticket, T).await;
    assert!(
        matches!(r, Err(ClientError::KeyMismatch { .. })),
        "{:?}",
        r.map(|_| ())
    );
    assert_eq!(s.forwarder.connected(), 0, "nobody got in");
}

#[tokio::test]
async fn closes_at_expiry_unless_renewed() {
    let s = start().await;
    let (a, b) = (node(), node());
    let sa = join(&s, &a, s.issuer.issue("prod", &a.key, now() + 2))
        .await
        .expect("admitted");
    let mut sb = join(&s, &b, s.issuer.issue("prod", &b.key, now() + 2))
        .await
        .expect("admitted");
    // B renews; A does not.
    sb.tx
        .send(
            &RelayClientMsg::Renew {
                ticket: s.issuer.issue("prod", &b.key, now() + 3600),
            }
            .encode(),
        )
        .await
        .expect("renew");
    let answer = sb.rx.recv().await.expect("answer");
    assert!(matches!(
        RelayServerMsg::decode(&answer),
        Ok(RelayServerMsg::Welcome { expires, .. }) if expires > now() + 3000
    ));
    let closed = tokio::time::timeout(Duration::from_secs(6), sa.conn.closed())
        .await
        .expect("A's connection closes at expiry");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(CLOSE_TICKET_EXPIRED))
        }
        other => panic!("unexpected close {other}"),
    }
    assert!(sb.conn.close_reason().is_none(), "B renewed and stays");
    assert!(s.forwarder.is_connected("prod", &b.key));
    assert!(!s.forwarder.is_connected("prod", &a.key));
}
