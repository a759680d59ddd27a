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
    gate: Arc<quic::Gate>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Setup {
    start_with(quic::ServerLimits::default()).await
}

async fn start_with(limits: quic::ServerLimits) -> Setup {
    let (controller, controller_pub) = keypair();
    let (relay_secret, relay_key) = keypair();
    let relay = Relay::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        relay_secret,
        &controller_pub,
        limits,
    )
    .expect("bind relay");
    let relay_addr = relay.local_addr().expect("addr");
    let forwarder = relay.forwarder();
    let gate = relay.gate();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    Setup {
        relay_addr,
        relay_key,
        issuer: TicketKey::new(&controller, &relay_key),
        forwarder,
        gate,
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
    assert_eq!(sa.observed, Some(a.endpoint.local_addr().expect("addr")));
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
    assert_eq!(closed.code, Some(CLOSE_TICKET_EXPIRED), "{closed}");
    assert!(sb.conn.close_reason().is_none(), "B renewed and stays");
    assert!(s.forwarder.is_connected("prod", &b.key));
    assert!(!s.forwarder.is_connected("prod", &a.key));
}

fn close_code(e: mesh_control::LinkClosed) -> Option<u32> {
    e.code
}

#[tokio::test]
async fn a_revoked_node_is_disconnected_and_its_old_tickets_refused() {
    let s = start().await;
    let (a, b, c) = (node(), node(), node());
    let old_ticket = s.issuer.issue("prod", &a.key, now() + 3600);
    let sa = join(&s, &a, old_ticket.clone()).await.expect("admitted");
    assert!(sa.revocations, "the relay says it takes revocations");
    let mut sb = admitted(&s, &b, "prod").await;
    let sc = admitted(&s, &c, "prod").await;

    // The controller revokes A (its tickets up to the latest it could have issued); B, a
    // member in good standing, carries the revocation to the relay.
    let revocation = s.issuer.revoke("prod", &a.key, now() + 3600);
    // A forged one (for another node, wrong MAC) is ignored.
    let mut forged = s.issuer.revoke("prod", &c.key, now() + 3600);
    forged.mac = "00".repeat(32);
    sb.tx
        .send(
            &RelayClientMsg::Revoke {
                network: "prod".into(),
                revoked: vec![forged, revocation],
            }
            .encode(),
        )
        .await
        .expect("send revocation");
    let closed = tokio::time::timeout(T, sa.conn.closed())
        .await
        .expect("A is disconnected at once");
    assert_eq!(close_code(closed), Some(mesh_relay::forward::CLOSE_REVOKED));
    assert!(!s.forwarder.is_connected("prod", &a.key));

    // A cannot come back with the ticket it still holds...
    match join(&s, &a, old_ticket).await {
        Err(ClientError::Refused { code, message, .. }) => {
            assert_eq!(code, ErrorCode::TicketInvalid);
            assert!(message.contains("revoked"), "{message}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }

    // ...others are unaffected and still reach each other...
    assert!(sb.conn.close_reason().is_none() && sc.conn.close_reason().is_none());
    send(&sb, &c.key, 1, b"still here");
    assert_eq!(receive(&sc, T).await.expect("B to C").1, b"still here");

    // ...and after joining again, A's new (later) ticket admits it.
    let fresh = s.issuer.issue("prod", &a.key, now() + 3700);
    join(&s, &a, fresh)
        .await
        .expect("a ticket issued after the removal is valid");
}

#[tokio::test]
async fn a_second_connection_of_the_same_node_replaces_the_first() {
    let s = start().await;
    let (a, b) = (node(), node());
    let first = admitted(&s, &a, "prod").await;
    let sb = admitted(&s, &b, "prod").await;
    // Same key, another socket (the node restarted).
    let a2 = Node {
        secret: a.secret,
        key: a.key,
        endpoint: quic::bind_client("127.0.0.1:0".parse().unwrap()).unwrap(),
    };
    let second = admitted(&s, &a2, "prod").await;
    let closed = tokio::time::timeout(T, first.conn.closed())
        .await
        .expect("the older connection is closed");
    assert_eq!(close_code(closed), Some(quic::CLOSE_REPLACED));
    assert_eq!(s.forwarder.connected(), 2);
    assert_eq!(s.forwarder.counters().replaced, 1);
    // Traffic for A reaches the new connection.
    send(&sb, &a.key, 9, b"to the new one");
    assert_eq!(
        receive(&second, T).await.expect("delivered").1,
        b"to the new one"
    );
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused() {
    let s = start_with(quic::ServerLimits {
        max_connections: 2,
        ..Default::default()
    })
    .await;
    let (a, b, c) = (node(), node(), node());
    let _sa = admitted(&s, &a, "prod").await;
    let _sb = admitted(&s, &b, "prod").await;
    let ticket = s.issuer.issue("prod", &c.key, now() + 3600);
    let r = connect(
        &c.endpoint,
        s.relay_addr,
        &s.relay_key,
        &c.secret,
        ticket,
        Duration::from_secs(2),
    )
    .await;
    assert!(
        matches!(r, Err(ClientError::Unreachable { .. })),
        "{:?}",
        r.map(|_| ())
    );
    let counters = s.gate.counters();
    assert_eq!(counters.connections, 2, "{counters:?}");
    assert!(counters.refused >= 1, "{counters:?}");
}

#[tokio::test]
async fn addresses_are_validated_when_handshakes_pile_up() {
    // With no room for unvalidated handshakes, every attempt must answer a Retry first.
    let s = start_with(quic::ServerLimits {
        max_unvalidated_handshakes: 0,
        ..Default::default()
    })
    .await;
    let a = node();
    let _sa = admitted(&s, &a, "prod").await;
    assert!(s.gate.counters().retried >= 1, "{:?}", s.gate.counters());
    assert_eq!(
        s.gate.counters().handshakes,
        0,
        "admitted: no longer a handshake"
    );
}

#[tokio::test]
async fn streams_beyond_the_control_channel_are_not_granted() {
    let s = start().await;
    let a = node();
    let sa = admitted(&s, &a, "prod").await;
    let wait = Duration::from_millis(500);
    let mesh_control::Link::Quic(conn) = &sa.conn else {
        panic!("a QUIC session")
    };
    assert!(tokio::time::timeout(wait, conn.open_bi()).await.is_err());
    assert!(tokio::time::timeout(wait, conn.open_uni()).await.is_err());
}
