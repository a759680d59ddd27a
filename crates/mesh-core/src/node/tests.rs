//! Unit tests of the node: two nodes wired back to back on an injected clock.

use super::*;
use crate::outbox::PRIMER_TTL;
use crate::BirthdayStats;
use mesh_proto::control::NatKind;

/// A UDP datagram the node sent.
#[derive(Debug)]
pub(super) struct Sent {
    pub(super) socket: SocketId,
    pub(super) dst: SocketAddr,
    pub(super) payload: Vec<u8>,
    /// The IP TTL it was to be sent with (`None`: the system's).
    pub(super) ttl: Option<u8>,
}

/// A message the node sent through the relay.
#[derive(Debug)]
pub(super) struct RelaySent {
    pub(super) to: PublicKey,
    pub(super) payload: Vec<u8>,
}
use crate::birthday::{spray_targets, Attempt};

fn key(seed: u8) -> ([u8; 32], PublicKey) {
    let secret = [seed; 32];
    let public = XPublic::from(&StaticSecret::from(secret));
    (secret, PublicKey(public.to_bytes()))
}

fn icmp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20 + payload.len()];
    p[0] = 0x45;
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..].copy_from_slice(payload);
    p
}

struct Pair {
    a: Node,
    b: Node,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
    now: Instant,
}

impl Pair {
    /// A pair whose proactive handshake went through.
    fn new() -> Pair {
        let mut p = Pair::quiet();
        p.drive();
        p
    }

    /// A pair whose proactive handshake was lost on the wire.
    fn lossy_start() -> Pair {
        let mut p = Pair::quiet();
        while p.a.poll_udp().is_some() {}
        while p.b.poll_udp().is_some() {}
        p
    }

    fn quiet() -> Pair {
        let now = Instant::now();
        let (ska, pka) = key(1);
        let (skb, pkb) = key(2);
        let a_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let b_addr: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let ip_a = Ipv4Addr::new(100, 64, 0, 1);
        let ip_b = Ipv4Addr::new(100, 64, 0, 2);
        let mut a = Node::new(
            NodeConfig {
                private_key: ska,
                address: ip_a,
                keepalive: None,
                mtu: 1420,
            },
            1,
            now,
        );
        let mut b = Node::new(
            NodeConfig {
                private_key: skb,
                address: ip_b,
                keepalive: None,
                mtu: 1420,
            },
            1000,
            now,
        );
        a.set_peers(
            &[PeerConfig {
                routes: Vec::new(),
                key: pkb,
                name: "b".into(),
                address: ip_b,
                address6: None,
                endpoints: vec![b_addr],
                observed: None,
                nat: None,
            }],
            now,
        );
        b.set_peers(
            &[PeerConfig {
                routes: Vec::new(),
                key: pka,
                name: "a".into(),
                address: ip_a,
                address6: None,
                endpoints: vec![a_addr],
                observed: None,
                nat: None,
            }],
            now,
        );
        Pair {
            a,
            b,
            a_addr,
            b_addr,
            now,
        }
    }

    /// Like `drive`, over a link that drops datagrams larger than `limit` bytes.
    fn drive_limited(&mut self, limit: usize) {
        for _ in 0..100 {
            let mut moved = false;
            while let Some(t) = self.a.poll_udp() {
                if t.payload.len() <= limit {
                    self.b
                        .handle_datagram(Source::main(self.a_addr), &t.payload, self.now);
                }
                moved = true;
            }
            while let Some(t) = self.b.poll_udp() {
                if t.payload.len() <= limit {
                    self.a
                        .handle_datagram(Source::main(self.b_addr), &t.payload, self.now);
                }
                moved = true;
            }
            if !moved {
                return;
            }
        }
        panic!("pair did not settle");
    }

    /// Moves datagrams between the two until both are quiet, bounded in steps.
    fn drive(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            while let Some(t) = self.a.poll_udp() {
                assert_eq!(t.dst, self.b_addr);
                self.b
                    .handle_datagram(Source::main(self.a_addr), &t.payload, self.now);
                moved = true;
            }
            while let Some(t) = self.b.poll_udp() {
                assert_eq!(t.dst, self.a_addr);
                self.a
                    .handle_datagram(Source::main(self.b_addr), &t.payload, self.now);
                moved = true;
            }
            if !moved {
                return;
            }
        }
        panic!("pair did not settle");
    }
}

#[test]
fn packet_crosses_after_handshake() {
    let mut p = Pair::new();
    let pkt = icmp(p.a.address(), p.b.address(), b"hello");
    p.a.handle_tun_packet(&pkt, p.now);
    p.drive();
    assert_eq!(p.b.poll_tun_packet(), Some(pkt.clone()));
    assert_eq!(p.b.poll_tun_packet(), None);
    let back = icmp(p.b.address(), p.a.address(), b"world");
    p.b.handle_tun_packet(&back, p.now);
    p.drive();
    assert_eq!(p.a.poll_tun_packet(), Some(back));
    let st = p.a.peer_status(p.now);
    assert_eq!(st[0].endpoint, Some(p.b_addr));
    assert!(st[0].tx_bytes > 0 && st[0].rx_bytes > 0);
}

#[test]
fn deferred_sealing_hands_out_bursts_unsealed_and_they_cross_in_order_once_sealed() {
    let mut p = Pair::new();
    p.a.set_deferred_sealing(true);
    // A lone packet: sealed by the node itself, as before.
    let one = icmp(p.a.address(), p.b.address(), b"lone");
    p.a.handle_tun_packet(&one, p.now);
    let sends = |n: &mut Node| -> Vec<Output> {
        std::iter::from_fn(|| n.poll_output())
            .filter(|o| !matches!(o, Output::Event(_)))
            .collect()
    };
    let [Output::Transmit(t)] = &sends(&mut p.a)[..] else {
        panic!("a lone packet is sealed in place");
    };
    p.b.handle_datagram(Source::main(p.a_addr), &t.contents, p.now);
    assert_eq!(p.b.poll_tun_packet(), Some(one));
    // A burst of one size: one batch, left unsealed, its bytes not the packets in clear.
    let burst: Vec<Vec<u8>> = (0..40u8)
        .map(|i| icmp(p.a.address(), p.b.address(), &[i; 1000]))
        .collect();
    for pkt in &burst {
        p.a.handle_tun_packet(pkt, p.now);
    }
    let Ok::<[Output; 1], _>([Output::Unsealed(u)]) = sends(&mut p.a).try_into() else {
        panic!("a burst is handed out unsealed, as one batch");
    };
    assert_eq!(u.datagrams(), 40);
    assert_eq!(
        u.destination(),
        Destination::Udp {
            socket: SocketId::MAIN,
            dst: p.b_addr
        }
    );
    // Sealed later (on another thread, in the agent), it is what the peer opens, in order.
    let t = std::thread::spawn(move || u.seal()).join().unwrap();
    assert!(
        !t.contents.windows(1000).any(|w| w == [7u8; 1000]),
        "nothing in clear"
    );
    for d in t.segments() {
        p.b.handle_datagram(Source::main(p.a_addr), d, p.now);
    }
    for pkt in &burst {
        assert_eq!(p.b.poll_tun_packet().as_ref(), Some(pkt));
    }
    assert_eq!(p.b.counters().rejected_packets, 0);
    // `poll_transmit` never hands out anything unsealed.
    for pkt in &burst {
        p.a.handle_tun_packet(pkt, p.now);
    }
    let t = p.a.poll_transmit().unwrap();
    for d in t.segments() {
        p.b.handle_datagram(Source::main(p.a_addr), d, p.now);
    }
    assert_eq!(p.b.poll_tun_packet().as_ref(), Some(&burst[0]));
}

#[test]
fn deferred_opening_hands_out_bursts_and_keeps_their_order_and_whatever_came_behind() {
    let mut p = Pair::new();
    p.b.set_deferred_opening(true);
    let outputs = |n: &mut Node| -> Vec<Output> {
        std::iter::from_fn(|| n.poll_output())
            .filter(|o| !matches!(o, Output::Event(_)))
            .collect()
    };
    let datagrams = |p: &mut Pair, pkts: &[Vec<u8>]| -> Vec<Vec<u8>> {
        for pkt in pkts {
            p.a.handle_tun_packet(pkt, p.now);
        }
        let mut out = Vec::new();
        while let Some(t) = p.a.poll_transmit() {
            out.extend(t.segments().map(<[u8]>::to_vec));
        }
        out
    };
    // Sealed by A, into B's main socket.
    let feed = |p: &mut Pair, pkts: &[Vec<u8>]| {
        for d in datagrams(p, pkts) {
            p.b.handle_datagram(Source::main(p.a_addr), &d, p.now);
        }
    };
    // What B hands out after that: exactly one batch to open.
    let handed_out = |p: &mut Pair, why: &str| -> crate::Unopened {
        let Ok::<[Output; 1], _>([Output::Unopened(u)]) = outputs(&mut p.b).try_into() else {
            panic!("{why}");
        };
        u
    };
    // The packets among outputs, in order.
    let packets = |outs: Vec<Output>| -> Vec<Vec<u8>> {
        outs.into_iter()
            .filter_map(|o| match o {
                Output::Tun(pkt) => Some(pkt),
                _ => None,
            })
            .collect()
    };
    // A lone packet: opened by the node itself, as before.
    let one = icmp(p.a.address(), p.b.address(), b"lone");
    feed(&mut p, std::slice::from_ref(&one));
    let [Output::Tun(got)] = &outputs(&mut p.b)[..] else {
        panic!("a lone message is opened in place");
    };
    assert_eq!(got, &one);
    // A run of small ones (ACK-sized, under 4 KB together): opened by the node too, in order.
    let small: Vec<Vec<u8>> = (0..5u8)
        .map(|i| icmp(p.a.address(), p.b.address(), &[i; 40]))
        .collect();
    feed(&mut p, &small);
    let got: Vec<Vec<u8>> = outputs(&mut p.b)
        .into_iter()
        .map(|o| match o {
            Output::Tun(pkt) => pkt,
            other => panic!("small runs are opened in place: {other:?}"),
        })
        .collect();
    assert_eq!(got, small);
    // A burst: handed out as one batch; nothing reaches the TUN side before it comes back.
    let burst: Vec<Vec<u8>> = (0..40u8)
        .map(|i| icmp(p.a.address(), p.b.address(), &[i; 1000]))
        .collect();
    feed(&mut p, &burst);
    let u = handed_out(&mut p, "a burst is handed out to open, as one batch");
    assert_eq!(u.datagrams(), 40);
    // Meanwhile a second burst (handed out behind it) and a lone packet, which waits.
    let second: Vec<Vec<u8>> = (40..80u8)
        .map(|i| icmp(p.a.address(), p.b.address(), &[i; 500]))
        .collect();
    feed(&mut p, &second);
    let u2 = handed_out(&mut p, "the second burst goes out behind the first");
    let last = icmp(p.a.address(), p.b.address(), b"last");
    feed(&mut p, std::slice::from_ref(&last));
    // (Not opened here ahead of those at the driver: it follows them out.)
    let u3 = handed_out(&mut p, "the lone one goes out behind the batches");
    // A message that came another way (through the relay) waits for all three.
    let relayed = icmp(p.a.address(), p.b.address(), b"relayed");
    let from = p.a.public_key();
    for d in datagrams(&mut p, std::slice::from_ref(&relayed)) {
        p.b.handle_datagram(Source::Relay { from }, &d, p.now);
    }
    assert!(outputs(&mut p.b).is_empty(), "the relayed one waits");
    // Opened on other threads, given back in order: every packet, in the order sent.
    let opened: Vec<_> = [u, u2, u3]
        .map(|u| std::thread::spawn(move || u.open()))
        .map(|h| h.join().unwrap())
        .into();
    for o in opened {
        p.b.handle_opened(o);
    }
    let delivered = packets(outputs(&mut p.b));
    let expected: Vec<Vec<u8>> = burst
        .iter()
        .chain(&second)
        .chain([&last, &relayed])
        .cloned()
        .collect();
    assert_eq!(delivered, expected);
    assert_eq!(p.b.counters().rejected_packets, 0);
    // A replay of the burst: opened again (the tag is good) but refused by the window.
    let replay = datagrams(&mut p, &burst[..3]);
    for d in replay.iter().chain(&replay) {
        p.b.handle_datagram(Source::main(p.a_addr), d, p.now);
    }
    let u = handed_out(&mut p, "six messages go out as a batch");
    p.b.handle_opened(u.open());
    assert_eq!(outputs(&mut p.b).len(), 3, "each message once");
    assert_eq!(p.b.counters().rejected_packets, 3);
    // A batch given back before the one handed out ahead of it: the older is forgotten, the
    // later taken; the older, come late, is dropped and counted.
    feed(&mut p, &burst[..5]);
    let older = handed_out(&mut p, "a batch");
    feed(&mut p, &second[..5]);
    let newer = handed_out(&mut p, "a second batch");
    p.b.handle_opened(newer.open());
    p.b.handle_opened(older.open());
    assert_eq!(packets(outputs(&mut p.b)), second[..5].to_vec());
    assert_eq!(p.b.counters().rejected_packets, 3 + 5);
}

#[test]
fn spoofed_inner_source_is_dropped() {
    let mut p = Pair::new();
    // B sends a packet claiming to come from an address that is not B's.
    let pkt = icmp(Ipv4Addr::new(100, 64, 0, 9), p.a.address(), b"x");
    p.b.handle_tun_packet(&pkt, p.now);
    p.drive();
    assert_eq!(p.a.poll_tun_packet(), None);
    assert_eq!(p.a.counters().spoofed_packets, 1);
}

/// `inner` encrypted by `from` for peer `to` on their session, as a member that crafts its
/// own packets would send it.
fn sealed(from: &mut Node, to: PublicKey, inner: &[u8]) -> Vec<u8> {
    let peer = from.peers.get_mut(&to).expect("peer");
    match peer.session.encapsulate(inner, &mut from.buf, from.now) {
        Sealed::Network(b) => b.to_vec(),
        other => panic!("no session: {other:?}"),
    }
}

/// An ICMPv6 echo-like packet (the checksum does not matter to mesh).
fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40 + payload.len()];
    p[0] = 0x60;
    let len = payload.len() as u16;
    p[4..6].copy_from_slice(&len.to_be_bytes());
    p[6] = 58;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..].copy_from_slice(payload);
    p
}

/// Gives both nodes of the pair an IPv6 overlay address, and each the other's.
fn dual_stack(p: &mut Pair) -> (Ipv6Addr, Ipv6Addr) {
    let a6: Ipv6Addr = "fd12:3456:789a::a".parse().unwrap();
    let b6: Ipv6Addr = "fd12:3456:789a::b".parse().unwrap();
    p.a.set_address6(Some(a6));
    p.b.set_address6(Some(b6));
    let (ka, kb) = (p.a.public_key(), p.b.public_key());
    let mut b_at_a = p.a.peers.get(&kb).unwrap().config.clone();
    b_at_a.address6 = Some(b6);
    p.a.upsert_peer(b_at_a, p.now);
    let mut a_at_b = p.b.peers.get(&ka).unwrap().config.clone();
    a_at_b.address6 = Some(a6);
    p.b.upsert_peer(a_at_b, p.now);
    (a6, b6)
}

/// The IPv6 overlay (issue 17): a packet to a peer's address6 goes to that peer and is
/// delivered there, both ways; other IPv6 destinations have no route, and the kernel's
/// link-scoped chatter (router solicitations) never leaves the node.
#[test]
fn ipv6_packets_go_to_the_peer_whose_address6_they_are_for() {
    let mut p = Pair::new();
    let (a6, b6) = dual_stack(&mut p);
    assert_eq!(p.a.address6(), Some(a6));
    assert_eq!(p.a.peer_status(p.now)[0].address6, Some(b6));
    let ping = icmp6(a6, b6, b"ping over the ULA");
    p.a.handle_tun_packet(&ping, p.now);
    p.drive();
    assert_eq!(p.b.poll_tun_packet().as_ref(), Some(&ping));
    let pong = icmp6(b6, a6, b"pong");
    p.b.handle_tun_packet(&pong, p.now);
    p.drive();
    assert_eq!(p.a.poll_tun_packet(), Some(pong));
    // IPv4 still goes its way beside it.
    let v4 = icmp(p.a.address(), p.b.address(), b"v4");
    p.a.handle_tun_packet(&v4, p.now);
    p.drive();
    assert_eq!(p.b.poll_tun_packet(), Some(v4));

    let nobody: Ipv6Addr = "fd12:3456:789a::c".parse().unwrap();
    p.a.handle_tun_packet(&icmp6(a6, nobody, b"x"), p.now);
    assert_eq!(p.a.counters().no_route_packets, 1);
    let link_local: Ipv6Addr = "fe80::1".parse().unwrap();
    let solicitation = icmp6(link_local, "ff02::2".parse().unwrap(), &[133, 0, 0, 0]);
    p.a.handle_tun_packet(&solicitation, p.now);
    p.a.handle_tun_packet(&icmp6(a6, link_local, b"x"), p.now);
    p.a.handle_tun_packet(&ping[..39], p.now);
    assert_eq!(p.a.counters().non_ipv4_packets, 3);
    assert!(p.a.poll_udp().is_none(), "nothing of that leaves a");
    // The peer's IPv6 address moves with its configuration.
    let kb = p.b.public_key();
    let mut moved = p.a.peers.get(&kb).unwrap().config.clone();
    moved.address6 = Some(nobody);
    p.a.upsert_peer(moved, p.now);
    p.a.handle_tun_packet(&icmp6(a6, b6, b"x"), p.now);
    assert_eq!(p.a.counters().no_route_packets, 2);
    let to_new = icmp6(a6, nobody, b"x");
    p.a.handle_tun_packet(&to_new, p.now);
    assert_eq!(
        p.a.counters().no_route_packets,
        2,
        "routed to b's new address6"
    );
}

/// A decrypted IPv6 packet is checked like an IPv4 one: its source must be the peer's
/// address6 or inside a prefix the peer routes (never another node's address6), and its
/// destination this node's address6 or a prefix it routes.
#[test]
fn spoofed_or_misdirected_ipv6_is_dropped_and_counted() {
    let mut p = Pair::new();
    let (a6, b6) = dual_stack(&mut p);
    let (ka, kb) = (p.a.public_key(), p.b.public_key());
    // A third node, c, known to b with its own address6.
    let c6: Ipv6Addr = "fd12:3456:789a::c".parse().unwrap();
    p.b.upsert_peer(
        PeerConfig {
            key: PublicKey([0xcc; 32]),
            name: "c".into(),
            address: Ipv4Addr::new(100, 64, 0, 3),
            address6: Some(c6),
            endpoints: vec![],
            observed: None,
            nat: None,
            routes: vec!["fd00:244:3::/64".parse().unwrap()],
        },
        p.now,
    );
    for spoofed in [
        c6,
        "fd12:3456:789a::99".parse().unwrap(),
        "fd00:244:3::5".parse().unwrap(),
        "2001:db8::1".parse().unwrap(),
    ] {
        let bytes = sealed(&mut p.a, kb, &icmp6(spoofed, b6, b"x"));
        p.b.handle_datagram(Source::main(p.a_addr), &bytes, p.now);
        assert_eq!(p.b.poll_tun_packet(), None, "{spoofed}");
    }
    assert_eq!(p.b.counters().spoofed_packets, 4);
    // Right source, but not for b (a's LAN over IPv6, another node): misdirected.
    for dst in ["2001:db8:1::1".parse().unwrap(), c6] {
        let bytes = sealed(&mut p.a, kb, &icmp6(a6, dst, b"x"));
        p.b.handle_datagram(Source::main(p.a_addr), &bytes, p.now);
        assert_eq!(p.b.poll_tun_packet(), None, "{dst}");
    }
    assert_eq!(p.b.counters().misdirected_packets, 2);
    // An IPv6 prefix a routes (its pods) is a's to send from, and b's to receive into once b
    // routes one.
    let pods_a: IpNet = "fd00:244:1::/64".parse().unwrap();
    let mut a_at_b = p.b.peers.get(&ka).unwrap().config.clone();
    a_at_b.routes = vec![pods_a];
    p.b.upsert_peer(a_at_b, p.now);
    let from_pod = icmp6("fd00:244:1::5".parse().unwrap(), b6, b"from a pod");
    let bytes = sealed(&mut p.a, kb, &from_pod);
    p.b.handle_datagram(Source::main(p.a_addr), &bytes, p.now);
    assert_eq!(p.b.poll_tun_packet(), Some(from_pod));
    // Nothing changed for IPv4 on the way.
    assert_eq!(p.b.counters().spoofed_packets, 4);
    let v4 = icmp(p.a.address(), p.b.address(), b"v4");
    let bytes = sealed(&mut p.a, kb, &v4);
    p.b.handle_datagram(Source::main(p.a_addr), &bytes, p.now);
    assert_eq!(p.b.poll_tun_packet(), Some(v4));
}

#[test]
fn a_member_cannot_use_a_node_as_a_router() {
    let mut p = Pair::new();
    let ka = p.a.public_key();
    let b = p.b.address();
    // Addressed to a's LAN, the cloud metadata service and a pod network: a with
    // ip_forward=1 would route them on.
    for dst in [
        Ipv4Addr::new(192, 168, 1, 1),
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(10, 244, 3, 7),
    ] {
        let bytes = sealed(&mut p.b, ka, &icmp(b, dst, b"x"));
        p.a.handle_datagram(Source::main(p.b_addr), &bytes, p.now);
    }
    assert_eq!(p.a.poll_tun_packet(), None, "nothing reaches a's kernel");
    assert_eq!(p.a.counters().misdirected_packets, 3);
    // What is addressed to a still arrives.
    let ok = icmp(b, p.a.address(), b"y");
    let bytes = sealed(&mut p.b, ka, &ok);
    p.a.handle_datagram(Source::main(p.b_addr), &bytes, p.now);
    assert_eq!(p.a.poll_tun_packet(), Some(ok));
}

/// An exit (issue 16): b uses a as its exit for everything (0.0.0.0/0 among a's prefixes at
/// b): b's packets to the world go to a, a delivers them (its kernel forwards and masquerades),
/// and the world's answers come back from any address. But a still cannot send from another
/// node's overlay address or from a prefix another node routes: the longest prefix decides.
#[test]
fn an_exit_carries_the_world_but_cannot_speak_for_other_nodes() {
    let mut p = Pair::new();
    let (ka, kb) = (p.a.public_key(), p.b.public_key());
    let (ip_a, ip_b) = (p.a.address(), p.b.address());
    let everything: IpNet = "0.0.0.0/0".parse().unwrap();
    let peer_a = PeerConfig {
        key: ka,
        name: "a".into(),
        address: ip_a,
        address6: None,
        endpoints: vec![p.a_addr],
        observed: None,
        nat: None,
        routes: vec![everything],
    };
    p.b.upsert_peer(peer_a, p.now);
    // A third node, c, with its pods; b knows it (no session needed for the check).
    let kc = PublicKey([0xcc; 32]);
    let ip_c = Ipv4Addr::new(100, 64, 0, 3);
    p.b.upsert_peer(
        PeerConfig {
            key: kc,
            name: "c".into(),
            address: ip_c,
            address6: None,
            endpoints: vec![],
            observed: None,
            nat: None,
            routes: vec!["10.244.3.0/24".parse().unwrap()],
        },
        p.now,
    );
    p.a.set_routes(vec![everything]);
    let registry = Ipv4Addr::new(203, 0, 113, 80);
    let out = icmp(ip_b, registry, b"GET /v2/");
    p.b.handle_tun_packet(&out, p.now);
    p.drive();
    assert_eq!(
        p.a.poll_tun_packet(),
        Some(out),
        "a takes b's packet to the world"
    );
    let back = icmp(registry, ip_b, b"200 OK");
    let bytes = sealed(&mut p.a, kb, &back);
    p.b.handle_datagram(Source::main(p.a_addr), &bytes, p.now);
    assert_eq!(
        p.b.poll_tun_packet(),
        Some(back),
        "the answer from the world arrives"
    );
    for spoofed in [ip_c, Ipv4Addr::new(10, 244, 3, 9)] {
        let bytes = sealed(&mut p.a, kb, &icmp(spoofed, ip_b, b"x"));
        p.b.handle_datagram(Source::main(p.a_addr), &bytes, p.now);
        assert_eq!(p.b.poll_tun_packet(), None, "{spoofed}");
    }
    assert_eq!(p.b.counters().spoofed_packets, 2);
}

/// Subnet routes (issue 16): a prefix the controller approved for a routes to it, b sends
/// packets for it to a, a delivers them (its kernel routes them to the pods), and the pods'
/// answers come back from inside the prefix. Other sources stay spoofed, other destinations
/// stay misdirected or unrouted.
#[test]
fn a_routed_prefix_goes_to_its_peer_both_ways_and_nothing_else_does() {
    let mut p = Pair::new();
    let (ka, kb) = (p.a.public_key(), p.b.public_key());
    let pods_a: IpNet = "10.244.1.0/24".parse().unwrap();
    let pod = Ipv4Addr::new(10, 244, 1, 5);
    let (ip_a, ip_b) = (p.a.address(), p.b.address());
    let peer_a = PeerConfig {
        key: ka,
        name: "a".into(),
        address: ip_a,
        address6: None,
        endpoints: vec![p.a_addr],
        observed: None,
        nat: None,
        routes: vec![pods_a],
    };
    p.b.upsert_peer(peer_a, p.now);
    p.a.set_routes(vec![pods_a]);

    // b → a pod: routed to a by the prefix, delivered there.
    let to_pod = icmp(ip_b, pod, b"to the pod");
    p.b.handle_tun_packet(&to_pod, p.now);
    p.drive();
    assert_eq!(p.a.poll_tun_packet(), Some(to_pod));
    // The pod answers from inside a's prefix: b takes it.
    let from_pod = icmp(pod, ip_b, b"from the pod");
    p.a.handle_tun_packet(&from_pod, p.now);
    p.drive();
    assert_eq!(p.b.poll_tun_packet(), Some(from_pod));

    // a claims a source in a prefix that is not its own: dropped and counted at b.
    let spoofed = icmp(Ipv4Addr::new(10, 244, 2, 9), ip_b, b"x");
    let bytes = sealed(&mut p.a, kb, &spoofed);
    p.b.handle_datagram(Source::main(p.a_addr), &bytes, p.now);
    assert_eq!(p.b.poll_tun_packet(), None);
    assert_eq!(p.b.counters().spoofed_packets, 1);
    // b sends into a prefix a does not route (not approved): a refuses it.
    let misdirected = icmp(ip_b, Ipv4Addr::new(10, 244, 9, 1), b"x");
    let bytes = sealed(&mut p.b, ka, &misdirected);
    p.a.handle_datagram(Source::main(p.b_addr), &bytes, p.now);
    assert_eq!(p.a.poll_tun_packet(), None);
    assert_eq!(p.a.counters().misdirected_packets, 1);
    // And b has no route there at all.
    p.b.handle_tun_packet(&icmp(ip_b, Ipv4Addr::new(10, 244, 9, 1), b"x"), p.now);
    assert_eq!(p.b.counters().no_route_packets, 1);

    // The route is withdrawn: b stops routing to it, a stops delivering into it.
    let mut withdrawn = p.b.peers.get(&ka).unwrap().config.clone();
    withdrawn.routes.clear();
    p.b.upsert_peer(withdrawn, p.now);
    p.a.set_routes(Vec::new());
    p.b.handle_tun_packet(&icmp(ip_b, pod, b"x"), p.now);
    assert_eq!(p.b.counters().no_route_packets, 2);
    let bytes = sealed(&mut p.b, ka, &icmp(ip_b, pod, b"x"));
    p.a.handle_datagram(Source::main(p.b_addr), &bytes, p.now);
    assert_eq!(p.a.counters().misdirected_packets, 2);
}

#[test]
fn the_longest_routed_prefix_wins_and_an_address_beats_any_prefix() {
    let mut table = crate::peers::PeerTable::new(1);
    let mut p = Pair::new();
    let (ka, kb) = (p.a.public_key(), p.b.public_key());
    let wide: IpNet = "10.0.0.0/8".parse().unwrap();
    let narrow: IpNet = "10.244.1.0/24".parse().unwrap();
    for (key, address, routes) in [
        (ka, p.a.address(), vec![wide]),
        (
            kb,
            p.b.address(),
            vec![narrow, "100.64.0.0/16".parse().unwrap()],
        ),
    ] {
        let peer = p.b.peers.remove(&ka).or_else(|| p.a.peers.remove(&kb));
        let mut peer = peer.expect("a peer to reuse");
        peer.config.key = key;
        peer.config.address = address;
        peer.config.routes = routes;
        table.insert(peer);
    }
    fn key_of(table: &crate::peers::PeerTable, ip: [u8; 4]) -> Option<PublicKey> {
        table.route(&IpAddr::from(ip)).map(|s| table.key_at(s))
    }
    assert_eq!(
        key_of(&table, [10, 244, 1, 7]),
        Some(kb),
        "the /24 beats the /8"
    );
    assert_eq!(key_of(&table, [10, 9, 9, 9]), Some(ka));
    // a's overlay address lies inside b's (odd) 100.64/16: the address owner wins.
    assert_eq!(key_of(&table, p.a.address().octets()), Some(ka));
    assert_eq!(key_of(&table, [192, 0, 2, 1]), None);
    table.remove(&kb);
    assert_eq!(
        key_of(&table, [10, 244, 1, 7]),
        Some(ka),
        "b's routes left with it"
    );
}

#[test]
fn candidates_and_sources_the_overlay_reaches_are_refused() {
    let mut p = Pair::new();
    let kb = p.b.public_key();
    // a's view: the overlay range, and b's flannel.1 subnet routed over a vxlan device
    // stacked on the overlay.
    let excluded: Vec<IpNet> = vec![
        "100.64.0.0/16".parse().unwrap(),
        "10.244.0.0/16".parse().unwrap(),
    ];
    p.a.set_excluded(excluded);
    let vxlan: SocketAddr = "10.244.2.0:51820".parse().unwrap();
    let overlay: SocketAddr = "100.64.0.2:51820".parse().unwrap();
    p.a.upsert_peer(
        PeerConfig {
            routes: Vec::new(),
            key: kb,
            name: "b".into(),
            address: p.b.address(),
            address6: None,
            endpoints: vec![p.b_addr, vxlan, overlay],
            observed: None,
            nat: None,
        },
        p.now,
    );
    assert_eq!(p.a.counters().refused_candidates, 2);
    assert_eq!(p.a.peer_status(p.now)[0].candidates, vec![p.b_addr]);
    // b's traffic arriving from its vxlan address (it went through the overlay) is dropped,
    // and the path stays where it was.
    let ka = p.a.public_key();
    let bytes = sealed(&mut p.b, ka, &[]);
    p.a.handle_datagram(Source::main(vxlan), &bytes, p.now);
    assert_eq!(p.a.counters().overlay_sources, 1);
    assert_eq!(p.a.peer_status(p.now)[0].endpoint, Some(p.b_addr));
    // A path that turns out to run through the overlay is dropped at once.
    p.a.set_excluded(vec!["192.0.2.0/24".parse().unwrap()]);
    assert_eq!(p.a.peer_status(p.now)[0].endpoint, None);
}

#[test]
fn garbage_is_counted_not_fatal() {
    let mut p = Pair::new();
    let from: SocketAddr = "198.51.100.7:1234".parse().unwrap();
    for bad in [
        &b""[..],
        &[1, 0, 0, 0][..],
        &[4, 0, 0, 0, 1, 2, 3][..],
        &[9u8; 200][..],
    ] {
        p.a.handle_datagram(Source::main(from), bad, p.now);
    }
    // A data packet for an index nobody has.
    let mut data = vec![4u8, 0, 0, 0];
    data.extend_from_slice(&[0xff; 28]);
    p.a.handle_datagram(Source::main(from), &data, p.now);
    let c = p.a.counters();
    assert_eq!(c.malformed_packets + c.unknown_peer_packets, 5);
    assert!(p.a.poll_udp().is_none());
}

#[test]
fn link_scoped_ipv6_and_unrouted_from_tun_are_dropped() {
    let mut p = Pair::new();
    // The kernel's router solicitation on a fresh mesh0.
    let rs = icmp6(
        "fe80::1".parse().unwrap(),
        "ff02::2".parse().unwrap(),
        &[133; 8],
    );
    p.a.handle_tun_packet(&rs, p.now);
    p.a.handle_tun_packet(
        &icmp(p.a.address(), Ipv4Addr::new(100, 64, 9, 9), b"x"),
        p.now,
    );
    // IPv6 to an address no peer has (b has no address6 here).
    let mut junk = vec![0x60u8; 48];
    junk[6] = 58;
    p.a.handle_tun_packet(&junk, p.now);
    assert_eq!(p.a.counters().non_ipv4_packets, 1);
    assert_eq!(p.a.counters().no_route_packets, 2);
    assert!(p.a.poll_udp().is_none());
}

#[test]
fn lost_initiation_is_retransmitted_on_injected_clock() {
    let mut p = Pair::lossy_start();
    p.a.handle_tun_packet(&icmp(p.a.address(), p.b.address(), b"1"), p.now);
    // Lose the first initiation.
    while p.a.poll_udp().is_some() {}
    p.now += REKEY_TIMEOUT + Duration::from_millis(334); // WireGuard's REKEY_TIMEOUT + jitter
    p.a.handle_timeout(p.now);
    p.drive();
    assert!(p.b.poll_tun_packet().is_some(), "queued packet delivered");
}

#[test]
fn crossed_handshakes_converge() {
    let mut p = Pair::lossy_start();
    let to_b = icmp(p.a.address(), p.b.address(), b"ab");
    let to_a = icmp(p.b.address(), p.a.address(), b"ba");
    p.a.handle_tun_packet(&to_b, p.now);
    p.b.handle_tun_packet(&to_a, p.now);
    // Both initiations are on the wire before either arrives.
    let from_a: Vec<Sent> = std::iter::from_fn(|| p.a.poll_udp()).collect();
    let from_b: Vec<Sent> = std::iter::from_fn(|| p.b.poll_udp()).collect();
    for t in from_a {
        p.b.handle_datagram(Source::main(p.a_addr), &t.payload, p.now);
    }
    for t in from_b {
        p.a.handle_datagram(Source::main(p.b_addr), &t.payload, p.now);
    }
    p.drive();
    // Whatever got through, fresh traffic in both directions must now flow without waiting
    // for any timer.
    while p.a.poll_tun_packet().is_some() {}
    while p.b.poll_tun_packet().is_some() {}
    for _ in 0..2 {
        p.a.handle_tun_packet(&to_b, p.now);
        p.b.handle_tun_packet(&to_a, p.now);
        p.drive();
    }
    assert!(p.b.poll_tun_packet().is_some(), "a -> b flows");
    assert!(p.a.poll_tun_packet().is_some(), "b -> a flows");
}

#[test]
fn new_peer_is_handshaken_proactively_by_the_lower_key() {
    let mut p = Pair::quiet();
    let a_lower = p.a.public_key() < p.b.public_key();
    let (lower, higher, from) = if a_lower {
        (&mut p.a, &mut p.b, p.a_addr)
    } else {
        (&mut p.b, &mut p.a, p.b_addr)
    };
    let t = lower.poll_udp().expect("lower key initiates");
    assert_eq!(t.payload.len(), 148, "a handshake initiation");
    assert!(lower.poll_udp().is_none());
    assert!(higher.poll_udp().is_none(), "higher key waits");
    higher.handle_datagram(Source::main(from), &t.payload, p.now);
    p.drive();
    let st = p.a.peer_status(p.now);
    assert!(st[0].since_handshake.is_some() && st[0].endpoint.is_some());
}

#[test]
fn higher_key_starts_the_handshake_when_the_lower_keys_was_lost() {
    let mut p = Pair::lossy_start();
    p.now += PROACTIVE_FALLBACK;
    p.a.handle_timeout(p.now);
    p.b.handle_timeout(p.now);
    p.drive();
    let st = p.a.peer_status(p.now);
    assert!(
        st[0].since_handshake.is_some(),
        "session up after 1 s, not 5"
    );
}

fn path_mtu_events(node: &mut Node) -> Vec<u16> {
    std::iter::from_fn(|| node.poll_event())
        .filter_map(|e| match e {
            Event::PathMtu { mtu, .. } => Some(mtu),
            _ => None,
        })
        .collect()
}

#[test]
fn full_path_is_confirmed_at_the_interface_mtu() {
    let mut p = Pair::new();
    for _ in 0..8 {
        p.now += TICK;
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        p.drive();
    }
    assert_eq!(path_mtu_events(&mut p.a), vec![1420]);
    assert_eq!(p.a.peer_status(p.now)[0].path_mtu, Some(1420));
}

/// Lets a find its path MTU to b over an underlay that carries UDP payloads up to `limit`
/// bytes, and returns it.
fn learn_path_mtu(p: &mut Pair, limit: usize) -> u16 {
    for _ in 0..400 {
        p.now += TICK;
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        p.drive_limited(limit);
    }
    let found = path_mtu_events(&mut p.a);
    *found.last().expect("a result")
}

#[test]
fn small_path_is_found_and_big_packets_get_icmp_not_silence() {
    let mut p = Pair::new();
    // An underlay hop with MTU 1400: UDP payload at most 1372, inner packets at most 1340.
    let limit = 1400 - 28;
    let mtu = learn_path_mtu(&mut p, limit);
    assert!((1332..=1340).contains(&mtu), "found {mtu}");
    // A full-size packet with DF set is answered with "fragmentation needed".
    let mut big = icmp(p.a.address(), p.b.address(), &[0u8; 1400 - 20]);
    big[6] = 0x40;
    p.a.handle_tun_packet(&big, p.now);
    assert!(p.a.poll_udp().is_none(), "not sent to die on the path");
    let reply = p.a.poll_tun_packet().expect("ICMP back to the sender");
    assert_eq!((reply[20], reply[21]), (3, 4));
    assert_eq!(u16::from_be_bytes([reply[26], reply[27]]), mtu);
    assert_eq!(p.a.counters().too_big_packets, 1);
    // Packets that fit still flow.
    let small = icmp(p.a.address(), p.b.address(), &[0u8; 1000]);
    p.a.handle_tun_packet(&small, p.now);
    p.drive_limited(limit);
    assert_eq!(p.b.poll_tun_packet(), Some(small));
}

/// IPv6 routers never fragment: an IPv6 packet the path cannot carry, here forwarded from a
/// pod behind a, is answered with ICMPv6 "packet too big" from a's IPv6 overlay address, so
/// the pod lowers its path MTU at once; a without an IPv6 address only counts it.
#[test]
fn big_forwarded_ipv6_gets_packet_too_big_not_silence() {
    let mut p = Pair::new();
    let (a6, b6) = dual_stack(&mut p);
    let limit = 1400 - 28;
    let mtu = learn_path_mtu(&mut p, limit);
    assert!((1332..=1340).contains(&mtu), "found {mtu}");
    let pod: Ipv6Addr = "fd00:10:244:1::5".parse().unwrap();
    let mut echo = vec![0u8; 1400 - 40];
    echo[0] = 128; // an echo request, not an ICMPv6 error
    let big = icmp6(pod, b6, &echo);
    p.a.handle_tun_packet(&big, p.now);
    assert!(p.a.poll_udp().is_none(), "not sent to die on the path");
    let reply =
        p.a.poll_tun_packet()
            .expect("packet too big back to the pod");
    assert_eq!(reply.len(), 1280, "no larger than IPv6's minimum MTU");
    assert_eq!((reply[0] >> 4, reply[6]), (6, 58));
    assert_eq!(&reply[8..24], &a6.octets(), "from a's IPv6 overlay address");
    assert_eq!(&reply[24..40], &pod.octets(), "to the forwarded sender");
    assert_eq!((reply[40], reply[41]), (2, 0));
    assert_eq!(&reply[44..48], &u32::from(mtu).to_be_bytes());
    assert_eq!(&reply[48..], &big[..1280 - 48], "quotes the packet");
    assert_eq!(p.a.counters().too_big_packets, 1);

    p.a.set_address6(None);
    p.a.handle_tun_packet(&big, p.now);
    assert_eq!(p.a.counters().too_big_packets, 2);
    assert_eq!(p.a.poll_tun_packet(), None, "no address to answer from");
    assert!(p.a.poll_udp().is_none());
    // Packets that fit still flow.
    let small = icmp6(a6, b6, &echo[..1000]);
    p.a.handle_tun_packet(&small, p.now);
    p.drive_limited(limit);
    assert_eq!(p.b.poll_tun_packet(), Some(small));
}

/// A pair with a relay between them; the direct UDP path can be cut and restored.
struct Relayed {
    p: Pair,
    udp: bool,
    /// Largest UDP datagram the direct path carries.
    udp_limit: usize,
    /// UDP datagrams a has sent (delivered or not).
    a_udp_sent: usize,
    /// Where each of them went, and with what TTL.
    fired_by_a: Vec<(SocketAddr, Option<u8>)>,
    /// While `Some`, b is stalled (a process starved of CPU): what reaches it waits here, by
    /// either path, and its timers do not run.
    b_stalled: Option<Vec<(Source, Vec<u8>)>>,
}

impl Relayed {
    fn new(udp: bool) -> Relayed {
        Relayed::limited(udp, usize::MAX)
    }

    fn limited(udp: bool, udp_limit: usize) -> Relayed {
        let mut p = Pair::quiet();
        let now = p.now;
        p.a.set_relay(true, now);
        p.b.set_relay(true, now);
        let mut r = Relayed {
            p,
            udp,
            udp_limit,
            a_udp_sent: 0,
            fired_by_a: Vec::new(),
            b_stalled: None,
        };
        r.drive();
        // The higher key's fallback handshake is due after PROACTIVE_FALLBACK at the latest.
        for _ in 0..5 {
            r.tick();
        }
        r
    }

    fn drive(&mut self) {
        let (ka, kb) = (self.p.a.public_key(), self.p.b.public_key());
        for _ in 0..100 {
            let mut moved = false;
            while let Some(t) = self.p.a.poll_udp() {
                moved = true;
                self.a_udp_sent += 1;
                self.fired_by_a.push((t.dst, t.ttl));
                if self.udp && t.payload.len() <= self.udp_limit {
                    self.deliver_to_b(Source::main(self.p.a_addr), t.payload);
                }
            }
            while let Some(t) = self.p.b.poll_udp() {
                moved = true;
                if self.udp && t.payload.len() <= self.udp_limit {
                    self.p
                        .a
                        .handle_datagram(Source::main(self.p.b_addr), &t.payload, self.p.now);
                }
            }
            while let Some(t) = self.p.a.poll_relayed() {
                moved = true;
                assert_eq!(t.to, kb);
                self.deliver_to_b(Source::Relay { from: ka }, t.payload);
            }
            while let Some(t) = self.p.b.poll_relayed() {
                moved = true;
                // b may have a third peer (no node behind it): that traffic goes nowhere.
                if t.to != ka && self.p.b.peers.contains(&t.to) {
                    continue;
                }
                assert_eq!(t.to, ka);
                self.p
                    .a
                    .handle_datagram(Source::Relay { from: kb }, &t.payload, self.p.now);
            }
            if !moved {
                return;
            }
        }
        panic!("did not settle");
    }

    fn deliver_to_b(&mut self, source: Source, bytes: Vec<u8>) {
        match self.b_stalled.as_mut() {
            Some(waiting) => waiting.push((source, bytes)),
            None => self.p.b.handle_datagram(source, &bytes, self.p.now),
        }
    }

    /// b wakes from a stall: its timers run late, then it reads what waited (as the agent's
    /// loop does), and answers.
    fn wake_b(&mut self) {
        let waiting = self.b_stalled.take().unwrap_or_default();
        self.p.b.handle_timeout(self.p.now);
        for (source, bytes) in waiting {
            self.p.b.handle_datagram(source, &bytes, self.p.now);
        }
        self.drive();
    }

    fn tick(&mut self) {
        self.p.now += TICK;
        self.p.a.handle_timeout(self.p.now);
        if self.b_stalled.is_none() {
            self.p.b.handle_timeout(self.p.now);
        }
        self.drive();
    }

    fn path_a(&self) -> Path {
        self.p.a.peer_status(self.p.now)[0].path
    }

    fn path_b(&self) -> Path {
        self.p.b.peer_status(self.p.now)[0].path
    }

    /// Sends one packet a -> b and tells whether it arrived.
    fn send_a_to_b(&mut self, tag: u8) -> bool {
        let pkt = icmp(self.p.a.address(), self.p.b.address(), &[tag; 64]);
        self.p.a.handle_tun_packet(&pkt, self.p.now);
        self.drive();
        std::iter::from_fn(|| self.p.b.poll_tun_packet()).any(|x| x == pkt)
    }
}

#[test]
fn an_idle_direct_path_stays_when_traffic_starts_again() {
    let mut r = Relayed::new(true);
    assert!(r.send_a_to_b(1));
    assert!(matches!(r.path_a(), Path::Direct(_)));
    // Half a minute with nothing to send either way.
    for _ in 0..120 {
        r.tick();
    }
    while r.p.a.poll_event().is_some() {}
    // A packet goes out, and a's next timer runs before anything could come back (the tick
    // came 250 ms later, the answer takes longer). The path owes an answer only since this
    // packet: nothing moves, and later the answer (or the probe's) arrives.
    let pkt = icmp(r.p.a.address(), r.p.b.address(), &[2; 64]);
    r.p.a.handle_tun_packet(&pkt, r.p.now);
    r.p.now += TICK;
    r.p.a.handle_timeout(r.p.now);
    r.drive();
    for _ in 0..8 {
        r.tick();
    }
    let events: Vec<Event> = std::iter::from_fn(|| r.p.a.poll_event()).collect();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::PathChanged { .. })),
        "{events:?}"
    );
    assert!(matches!(r.path_a(), Path::Direct(_)));
}

#[test]
fn two_live_paths_do_not_take_turns_and_a_dead_one_gives_way() {
    let mut p = Pair::new();
    let (ka, kb) = (p.a.public_key(), p.b.public_key());
    while p.a.poll_event().is_some() {}
    // b's packets reach a both straight and by a second route (another of its addresses).
    let other: SocketAddr = "198.51.100.20:40000".parse().unwrap();
    for i in 0..20 {
        let from = if i % 2 == 0 { other } else { p.b_addr };
        let bytes = sealed(&mut p.b, ka, &[]);
        p.a.handle_datagram(Source::main(from), &bytes, p.now);
        p.now += Duration::from_millis(10);
    }
    let flips: Vec<Event> = std::iter::from_fn(|| p.a.poll_event())
        .filter(|e| matches!(e, Event::PathChanged { .. }))
        .collect();
    assert!(flips.is_empty(), "{flips:?}");
    assert_eq!(p.a.peer_status(p.now)[0].endpoint, Some(p.b_addr));
    // The first path goes quiet: the second takes over.
    p.now += PATH_PROBE_INTERVAL;
    let bytes = sealed(&mut p.b, ka, &[]);
    p.a.handle_datagram(Source::main(other), &bytes, p.now);
    assert_eq!(p.a.peer_status(p.now)[0].endpoint, Some(other));
    assert!(std::iter::from_fn(|| p.a.poll_event()).any(|e| e
        == Event::PathChanged {
            key: kb,
            path: Path::Direct(other)
        }));
}

#[test]
fn relay_carries_traffic_when_no_direct_path_exists() {
    let mut r = Relayed::new(false);
    assert!(
        r.send_a_to_b(1),
        "first packet goes through the relay at once"
    );
    assert_eq!(r.path_a(), Path::Relay);
    assert_eq!(r.path_b(), Path::Relay);
    for _ in 0..40 {
        r.tick();
    }
    assert!(r.send_a_to_b(2));
    assert_eq!(
        r.path_a(),
        Path::Relay,
        "no direct path appears from nowhere"
    );
}

#[test]
fn forged_relay_sender_is_refused() {
    let mut r = Relayed::new(false);
    let pkt = icmp(r.p.a.address(), r.p.b.address(), b"x");
    r.p.a.handle_tun_packet(&pkt, r.p.now);
    let t = r.p.a.poll_relayed().expect("relayed");
    // The relay claims the message came from someone else: refused, counted.
    let before = r.p.b.counters().rejected_packets;
    r.p.b.handle_datagram(
        Source::Relay {
            from: PublicKey([9; 32]),
        },
        &t.payload,
        r.p.now,
    );
    assert_eq!(r.p.b.counters().rejected_packets, before + 1);
    assert!(r.p.b.poll_tun_packet().is_none());
}

#[test]
fn upgrades_to_direct_when_a_probe_gets_through() {
    let mut r = Relayed::new(false);
    assert!(r.send_a_to_b(1));
    r.udp = true;
    let mut ticks = 0;
    while !(matches!(r.path_a(), Path::Direct(_)) && matches!(r.path_b(), Path::Direct(_))) {
        r.tick();
        ticks += 1;
        assert!(ticks < 40, "no upgrade within 10 s");
    }
    assert!(
        ticks as u32 * TICK.as_millis() as u32 <= CANDIDATE_PROBE_INTERVAL.as_millis() as u32 + 500,
        "upgrade took {ticks} ticks"
    );
    assert_eq!(r.path_a(), Path::Direct(r.p.b_addr));
    assert_eq!(r.path_b(), Path::Direct(r.p.a_addr));
    // The same session carries on: no new handshake was needed.
    assert!(r.send_a_to_b(2));
    assert!(r.p.a.poll_relayed().is_none());
}

#[test]
fn falls_back_to_the_relay_within_three_seconds_when_direct_dies() {
    let mut r = Relayed::new(true);
    assert!(r.send_a_to_b(1));
    assert!(matches!(r.path_a(), Path::Direct(_)));
    r.udp = false;
    let cut = r.p.now;
    let mut delivered_again = None;
    for i in 0..40u8 {
        // Steady traffic, as an open TCP connection would send.
        if r.send_a_to_b(10 + i) && delivered_again.is_none() && r.path_a() == Path::Relay {
            delivered_again = Some(r.p.now);
        }
        r.tick();
    }
    let at = delivered_again.expect("traffic resumed through the relay");
    // The goal: traffic flows on the relay less than 3 s after the path dies.
    assert!(
        at.duration_since(cut) < Duration::from_secs(3),
        "took {:?}",
        at.duration_since(cut)
    );
    // ...and back to direct well within 15 s of the path's return, while traffic flows.
    r.udp = true;
    let healed = r.p.now;
    let mut tag = 100u8;
    while !matches!(r.path_a(), Path::Direct(_)) {
        assert!(
            r.p.now.duration_since(healed) < Duration::from_secs(15),
            "still on the relay 15 s after the path came back"
        );
        r.send_a_to_b(tag);
        tag = tag.wrapping_add(1);
        r.tick();
    }
    assert!(r.send_a_to_b(99));
}

/// A driver that writes TUN packets behind a virtio-net header asks for room: each decrypted
/// packet comes that far into its buffer, the room zeroed even in a reused buffer (a buffer
/// given back, not a new one: the writer grows the buffers it coalesces into itself).
#[test]
fn packets_for_tun_come_behind_the_headroom_the_driver_asked_for() {
    let mut r = Relayed::new(true);
    assert!(r.send_a_to_b(1));
    r.p.b.set_tun_headroom(10);
    for tag in 2..6u8 {
        r.p.b.recycle(vec![0xff; 2000]);
        let pkt = icmp(r.p.a.address(), r.p.b.address(), &[tag; 64]);
        r.p.a.handle_tun_packet(&pkt, r.p.now);
        r.drive();
        let got = r.p.b.poll_tun_packet().expect("delivered");
        assert_eq!(got[..10], [0; 10]);
        assert_eq!(got[10..], pkt[..]);
        assert_eq!(got.capacity(), 2000);
        assert!(r.p.b.poll_tun_packet().is_none());
    }
}

/// A peer that stops answering on every path at once (its process starved of CPU on a node
/// at 100 %, its socket buffer overflowing) has not lost its direct path: the relay would not
/// reach it either. The path stays through a 3 s stall, nothing changes when the peer catches
/// up, and the peer's own late timers do not drop its paths before it reads what waited. A
/// peer silent for good is still given up, after `SILENT_PEER_TIMEOUT`.
#[test]
fn a_stalled_peer_keeps_its_direct_path_and_a_gone_one_loses_it_later() {
    let mut r = Relayed::new(true);
    assert!(r.send_a_to_b(1));
    assert!(matches!(r.path_a(), Path::Direct(_)));
    while r.p.a.poll_event().is_some() {}
    while r.p.b.poll_event().is_some() {}
    let stall = |r: &mut Relayed, d: Duration| {
        r.b_stalled = Some(Vec::new());
        let until = r.p.now + d;
        let mut tag = 10u8;
        while r.p.now < until {
            // Steady traffic toward the stalled peer, as an open TCP connection sends.
            let pkt = icmp(r.p.a.address(), r.p.b.address(), &[tag; 64]);
            r.p.a.handle_tun_packet(&pkt, r.p.now);
            tag = tag.wrapping_add(1);
            r.tick();
        }
    };
    stall(&mut r, Duration::from_secs(3));
    assert!(matches!(r.path_a(), Path::Direct(_)));
    r.wake_b();
    for _ in 0..4 {
        r.tick();
    }
    assert!(r.send_a_to_b(2));
    let moved: Vec<Event> = [&mut r.p.a, &mut r.p.b]
        .into_iter()
        .flat_map(|n| std::iter::from_fn(|| n.poll_event()).collect::<Vec<_>>())
        .filter(|e| matches!(e, Event::PathChanged { .. }))
        .collect();
    assert!(moved.is_empty(), "a stall moved paths: {moved:?}");
    assert!(matches!(r.path_a(), Path::Direct(_)));
    assert!(matches!(r.path_b(), Path::Direct(_)));

    // Gone for good: the relay takes the traffic once SILENT_PEER_TIMEOUT has passed.
    let gone = r.p.now;
    stall(&mut r, crate::peer::path::SILENT_PEER_TIMEOUT + TICK * 2);
    assert_eq!(r.path_a(), Path::Relay);
    let fell = std::iter::from_fn(|| r.p.a.poll_event()).any(|e| {
        matches!(
            e,
            Event::PathChanged {
                path: Path::Relay,
                ..
            }
        )
    });
    assert!(
        fell,
        "no fallback {:?} after the peer went silent",
        r.p.now - gone
    );
}

/// On the relay, `a` learns that `b` moved to `moved` (with `b`'s NAT kind `nat`) and runs its
/// next tick: the UDP datagrams that tick sent.
fn probes_after_move(nat: Option<NatKind>, moved: SocketAddr) -> (Relayed, Vec<Sent>) {
    let mut r = Relayed::new(false);
    assert!(r.send_a_to_b(1));
    r.tick();
    while r.p.a.poll_udp().is_some() {}
    r.fired_by_a.clear();
    r.p.a.out.counters = Counters::default();
    r.p.b.out.counters = Counters::default();
    let kb = r.p.b.public_key();
    r.p.a.upsert_peer(
        PeerConfig {
            routes: Vec::new(),
            key: kb,
            name: "b".into(),
            address: r.p.b.address(),
            address6: None,
            endpoints: vec![moved],
            observed: None,
            nat,
        },
        r.p.now,
    );
    r.p.now += TICK;
    r.p.a.handle_timeout(r.p.now);
    let sent = std::iter::from_fn(|| r.p.a.poll_udp()).collect();
    (r, sent)
}

#[test]
fn new_candidates_are_probed_at_the_next_tick_with_predicted_ports() {
    // A peer that is not behind a NAT has no gateway a probe could spoil: probed at once.
    let moved: SocketAddr = "203.0.113.9:40000".parse().unwrap();
    let (_, sent) = probes_after_move(Some(NatKind::Public), moved);
    let sent: Vec<SocketAddr> = sent.iter().map(|t| t.dst).collect();
    let mut want = vec![moved];
    want.extend((1..=PREDICTED_PORTS).map(|i| SocketAddr::new(moved.ip(), 40000 + i)));
    assert_eq!(
        sent, want,
        "probes go to the new candidate and the ports just above it"
    );
}

#[test]
fn a_round_toward_a_natted_peer_primes_then_probes_only_after_the_peers_answer() {
    let moved: SocketAddr = "198.51.100.9:40000".parse().unwrap();
    let (mut r, sent) = probes_after_move(Some(NatKind::EndpointIndependent), moved);
    // Only a primer leaves at once: to the candidate, with a TTL that dies past our gateway.
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!((sent[0].dst, sent[0].ttl), (moved, Some(PRIMER_TTL)));
    assert_eq!(r.p.a.counters().punch_rounds, 1);
    // The punch goes through the relay; b answers it (b probes a's candidates: a has none
    // here) and acknowledges; only then does a probe b's candidate at full TTL.
    r.drive();
    assert_eq!(r.p.b.counters().punch_answers, 1);
    let fired = r.fired_by_a.clone();
    let mut want = vec![(moved, None)];
    want.extend((1..=PREDICTED_PORTS).map(|i| (SocketAddr::new(moved.ip(), 40000 + i), None)));
    assert_eq!(fired, want);
}

#[test]
fn small_direct_path_stays_direct_with_a_smaller_mtu_not_relayed() {
    // Lost path MTU probes must not look like a dead path.
    let mut r = Relayed::limited(true, 1400 - 28);
    for i in 0..200u8 {
        assert!(r.send_a_to_b(i), "small packets keep flowing");
        r.tick();
    }
    assert!(matches!(r.path_a(), Path::Direct(_)), "{:?}", r.path_a());
    let mtu = r.p.a.peer_status(r.p.now)[0].path_mtu.expect("a path MTU");
    assert!((1332..=1340).contains(&mtu), "{mtu}");
}

#[test]
fn probing_backs_off_when_no_direct_path_exists_and_restarts_on_new_candidates() {
    let mut r = Relayed::new(false);
    // Regular candidate rounds only (birthday attempts have their own test).
    r.p.a.set_birthday(None);
    let probe_rounds = |r: &mut Relayed, secs: u64| {
        let mut rounds = 0;
        for _ in 0..secs * 4 {
            let before = r.a_udp_sent;
            r.tick();
            // A round: one keepalive per candidate plus the predicted ports.
            if r.a_udp_sent > before {
                rounds += 1;
            }
        }
        rounds
    };
    let early = probe_rounds(&mut r, 20);
    let late = probe_rounds(&mut r, 120);
    assert!(early >= 3, "probes at first: {early}");
    assert!(
        late <= 5,
        "backed off to at most one round per 32 s: {late} rounds in 2 min"
    );
    // New candidates from the controller: probing starts over at once.
    let kb = r.p.b.public_key();
    let cfg = PeerConfig {
        routes: Vec::new(),
        key: kb,
        name: "b".into(),
        address: r.p.b.address(),
        address6: None,
        endpoints: vec!["203.0.113.9:51820".parse().unwrap()],
        observed: None,
        nat: None,
    };
    r.p.a.upsert_peer(cfg, r.p.now);
    assert!(probe_rounds(&mut r, 7) >= 3);
}

#[test]
fn ping_reports_path_and_rtt() {
    let mut r = Relayed::new(false);
    assert!(r.send_a_to_b(1));
    let kb = r.p.b.public_key();
    assert!(r.p.a.ping(&kb, r.p.now));
    r.p.now += Duration::from_millis(30);
    r.drive();
    let pong = std::iter::from_fn(|| r.p.a.poll_event()).find_map(|e| match e {
        Event::Pong { rtt, path, .. } => Some((rtt, path)),
        _ => None,
    });
    // The answer was produced at the same virtual instant it was delivered.
    assert_eq!(pong, Some((Duration::from_millis(30), Path::Relay)));
    assert!(!r.p.a.ping(&PublicKey([7; 32]), r.p.now));
}

#[test]
fn removed_peer_gets_nothing() {
    let mut p = Pair::new();
    let b_key = p.b.public_key();
    p.a.remove_peer(&b_key);
    p.a.handle_tun_packet(&icmp(p.a.address(), p.b.address(), b"x"), p.now);
    assert!(p.a.poll_udp().is_none());
    assert_eq!(p.a.counters().no_route_packets, 1);
    assert_eq!(p.a.poll_timeout(), None);
}

// --- birthday hole punching -----------------------------------------------------------

const SMALL: BirthdayConfig = BirthdayConfig {
    sockets: 4,
    probes: 64,
    probes_per_tick: 32,
    attempts: birthday::ATTEMPT_BUDGET,
};

fn socket_events(node: &mut Node) -> (Vec<SocketId>, Vec<SocketId>, Vec<Event>) {
    let (mut opened, mut closed, mut other) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(e) = node.poll_event() {
        match e {
            Event::OpenSocket(id) => opened.push(id),
            Event::CloseSocket(id) => closed.push(id),
            e => other.push(e),
        }
    }
    (opened, closed, other)
}

/// A relayed pair without UDP where only `a` punches (with [`SMALL`]), ticked until `a`
/// opens its sockets. Returns them; their probes are still queued in `a`.
fn punching_pair() -> (Relayed, Vec<SocketId>) {
    let mut r = Relayed::new(false);
    r.p.a.set_birthday(Some(SMALL));
    r.p.b.set_birthday(None);
    assert!(r.send_a_to_b(1));
    let _ = socket_events(&mut r.p.a);
    for _ in 0..40 {
        r.tick();
        // Transmits on a socket wait for its OpenSocket to be polled.
        let (opened, closed, _) = socket_events(&mut r.p.a);
        if !opened.is_empty() {
            assert!(closed.is_empty());
            return (r, opened);
        }
    }
    panic!("no attempt within 10 s on the relay");
}

/// An authenticated keepalive from `from` to `to`, as a spray probe would be.
fn keepalive(from: &mut Node, to: PublicKey) -> Vec<u8> {
    let peer = from.peers.get_mut(&to).expect("peer");
    match peer.session.encapsulate(&[], &mut from.buf, from.now) {
        Sealed::Network(b) => b.to_vec(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn attempt_opens_sockets_and_probes_the_public_candidate_from_each() {
    let (mut r, opened) = punching_pair();
    assert_eq!(opened.len(), 4);
    assert!(opened.iter().all(|id| *id != SocketId::MAIN));
    let mut distinct = opened.clone();
    distinct.dedup();
    assert_eq!(distinct, opened);
    let probes: Vec<Sent> = std::iter::from_fn(|| r.p.a.poll_udp()).collect();
    let from: Vec<SocketId> = probes.iter().map(|t| t.socket).collect();
    assert_eq!(from, opened, "one probe per socket, after its OpenSocket");
    assert!(probes.iter().all(|t| t.dst == r.p.b_addr));
    assert_eq!(r.p.a.status(Instant::now()).extra_sockets, 4);
    assert_eq!(r.p.a.status(Instant::now()).birthday.birthday_attempts, 1);
}

#[test]
fn probe_on_an_extra_socket_makes_it_the_peers_and_closes_the_others() {
    let (mut r, opened) = punching_pair();
    while r.p.a.poll_udp().is_some() {}
    let (ka, kb) = (r.p.a.public_key(), r.p.b.public_key());
    // One of b's spray probes lands on a's third socket, from b's mapping M.
    let won = opened[2];
    let m: SocketAddr = "198.51.100.9:40001".parse().unwrap();
    let probe = keepalive(&mut r.p.b, ka);
    r.p.a.handle_datagram(
        Source::Udp {
            socket: won,
            from: m,
        },
        &probe,
        r.p.now,
    );
    let (newly, closed, other) = socket_events(&mut r.p.a);
    assert!(newly.is_empty());
    let mut others = opened.clone();
    others.retain(|id| *id != won);
    assert_eq!(closed, others, "the attempt's other sockets close at once");
    assert!(other.contains(&Event::PathChanged {
        key: kb,
        path: Path::Direct(m)
    }));
    assert_eq!(r.p.a.local_socket(&kb), Some(won));
    assert_eq!(r.p.a.status(Instant::now()).extra_sockets, 1);
    assert_eq!(r.p.a.status(Instant::now()).birthday.birthday_succeeded, 1);
    // The answer goes back at once from the winning socket, so b upgrades too ...
    let answer = r.p.a.poll_udp().expect("answer");
    assert_eq!((answer.socket, answer.dst), (won, m));
    // ... and so does everything else for b: data, keepalives, probes.
    let pkt = icmp(r.p.a.address(), r.p.b.address(), b"x");
    r.p.a.handle_tun_packet(&pkt, r.p.now);
    let data = r.p.a.poll_udp().expect("data");
    assert_eq!((data.socket, data.dst), (won, m));
    assert!(r.p.a.poll_relayed().is_none());
    // Liveness probes follow the data while b stays silent (short of the path timeout).
    for _ in 0..3 {
        r.p.now += TICK;
        r.p.a.handle_timeout(r.p.now);
    }
    let sent: Vec<Sent> = std::iter::from_fn(|| r.p.a.poll_udp()).collect();
    assert!(!sent.is_empty());
    assert!(
        sent.iter().all(|t| (t.socket, t.dst) == (won, m)),
        "{sent:?}"
    );
    // Later sprays landing on a closed socket are counted and dropped.
    r.p.a.handle_datagram(
        Source::Udp {
            socket: opened[0],
            from: m,
        },
        &probe,
        r.p.now,
    );
    assert_eq!(r.p.a.counters().unknown_socket_packets, 1);
    assert_eq!(r.p.a.local_socket(&kb), Some(won));
}

#[test]
fn kept_socket_closes_once_its_path_dies_and_punching_starts_over() {
    let (mut r, opened) = punching_pair();
    let (ka, kb) = (r.p.a.public_key(), r.p.b.public_key());
    let won = opened[0];
    let m: SocketAddr = "198.51.100.9:40001".parse().unwrap();
    let probe = keepalive(&mut r.p.b, ka);
    r.p.a.handle_datagram(
        Source::Udp {
            socket: won,
            from: m,
        },
        &probe,
        r.p.now,
    );
    let _ = socket_events(&mut r.p.a);
    // b never answers on the direct path; a keeps sending.
    let cut = r.p.now;
    let mut closed_at = None;
    for i in 0..60u8 {
        r.send_a_to_b(i);
        r.tick();
        let (_, closed, _) = socket_events(&mut r.p.a);
        if closed.contains(&won) {
            closed_at = Some(r.p.now.duration_since(cut));
            break;
        }
    }
    let closed_at = closed_at.expect("socket closed");
    assert!(
        closed_at <= PATH_TIMEOUT + birthday::KEPT_SOCKET_GRACE + TICK * 2,
        "{closed_at:?}"
    );
    assert_eq!(r.path_a(), Path::Relay);
    assert_eq!(r.p.a.local_socket(&kb), None);
    assert_eq!(r.p.a.status(Instant::now()).extra_sockets, 0);
    // Punching starts over: regular rounds first, then a new attempt on new sockets.
    let mut again = None;
    for _ in 0..40 {
        r.tick();
        let (opened_again, _, _) = socket_events(&mut r.p.a);
        if !opened_again.is_empty() {
            again = Some(opened_again);
            break;
        }
    }
    let again = again.expect("a new attempt after the fallback");
    assert!(again.iter().all(|id| !opened.contains(id)), "fresh ids");
}

#[test]
fn failed_attempt_closes_every_socket_and_the_retry_backs_off_on_fresh_ports() {
    let (mut r, first_sockets) = punching_pair();
    let b_ip = r.p.b_addr.ip();
    let candidate_ports = r.p.b_addr.port()..=r.p.b_addr.port() + PREDICTED_PORTS;
    let started = r.p.now;
    // Each attempt: (start, sockets, closed, sprayed ports).
    let mut attempts = vec![(started, first_sockets, Vec::new(), Vec::new())];
    for _ in 0..4 * 60 {
        let sprays: Vec<u16> = std::iter::from_fn(|| r.p.a.poll_udp())
            .filter(|t| t.socket == SocketId::MAIN && t.dst.ip() == b_ip)
            .map(|t| t.dst.port())
            .filter(|p| !candidate_ports.contains(p))
            .collect();
        if let Some(a) = attempts.last_mut() {
            a.3.extend(sprays);
        }
        let (opened, closed, _) = socket_events(&mut r.p.a);
        if let Some(a) = attempts.last_mut() {
            a.2.extend(closed);
        }
        if !opened.is_empty() {
            attempts.push((r.p.now, opened, Vec::new(), Vec::new()));
        }
        r.p.now += TICK;
        r.p.a.handle_timeout(r.p.now);
        r.p.b.handle_timeout(r.p.now);
        while r.p.a.poll_relayed().is_some() {}
        while r.p.b.poll_relayed().is_some() {}
        while r.p.b.poll_udp().is_some() {}
    }
    assert_eq!(attempts.len(), 2, "one retry in 60 s");
    let (first, second) = (&attempts[0], &attempts[1]);
    let gap = second.0.duration_since(first.0);
    assert!(
        gap >= birthday::FIRST_RETRY && gap <= birthday::FIRST_RETRY + TICK,
        "{gap:?}"
    );
    for (_, opened, closed, sprayed) in &attempts {
        assert_eq!(closed, opened, "a failed attempt closes every socket");
        assert_eq!(sprayed.len(), usize::from(SMALL.probes));
        let mut distinct = sprayed.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), sprayed.len(), "each port once");
        assert!(sprayed.iter().all(|p| *p >= birthday::LOWEST_PORT));
    }
    let overlap = second.3.iter().filter(|p| first.3.contains(p)).count();
    assert!(
        overlap <= 2,
        "the retry sprays fresh ports: {overlap} reused"
    );
    assert_eq!(r.p.a.status(Instant::now()).extra_sockets, 0);
    let s = r.p.a.status(Instant::now()).birthday;
    assert_eq!((s.birthday_attempts, s.birthday_succeeded), (2, 0));
    assert_eq!(
        s.birthday_probes_sent,
        2 * (u64::from(SMALL.sockets) + u64::from(SMALL.probes))
    );
}

/// A relayed pair, both punching with [`SMALL`], where b never starts an attempt on its
/// own. `prepare` runs before traffic starts; returns once a started its attempt (and
/// asked b to join).
fn pair_where_a_starts(prepare: impl FnOnce(&mut Relayed)) -> Relayed {
    let mut r = Relayed::new(false);
    r.p.a.set_birthday(Some(SMALL));
    r.p.b.set_birthday(Some(SMALL));
    let ka = r.p.a.public_key();
    let hold = r.p.now + Duration::from_secs(3600);
    if let Some(p) = r.p.b.peers.get_mut(&ka) {
        p.punch.schedule.hold_off(hold);
    }
    prepare(&mut r);
    assert!(r.send_a_to_b(1));
    for _ in 0..40 {
        r.tick();
        if r.p.a.status(Instant::now()).birthday.birthday_attempts > 0 {
            break;
        }
    }
    assert_eq!(r.p.a.status(Instant::now()).birthday.birthday_attempts, 1);
    r
}

#[test]
fn the_peer_joins_an_attempt_at_once() {
    let r = pair_where_a_starts(|_| {});
    // The relay delivered a's signal within the same drive: b runs its attempt too.
    let s = r.p.b.status(Instant::now()).birthday;
    assert_eq!((s.birthday_attempts, s.birthday_joined), (0, 1));
    assert_eq!(
        r.p.b.status(Instant::now()).extra_sockets,
        usize::from(SMALL.sockets)
    );
}

#[test]
fn a_busy_peer_answers_a_join_by_spraying_only() {
    let mut r = pair_where_a_starts(|r| {
        // b is in an attempt toward a third node c, with its sockets taken.
        let kc = PublicKey(XPublic::from(&StaticSecret::from([9u8; 32])).to_bytes());
        r.p.b.upsert_peer(
            PeerConfig {
                routes: Vec::new(),
                key: kc,
                name: "c".into(),
                address: Ipv4Addr::new(100, 64, 0, 9),
                address6: None,
                endpoints: vec!["203.0.113.9:51820".parse().unwrap()],
                observed: None,
                nat: None,
            },
            r.p.now,
        );
        let far = r.p.now + Duration::from_secs(3600);
        let mut busy = Attempt::new(kc, Vec::new(), Ipv4Addr::new(203, 0, 113, 9), r.p.now);
        busy.ends = far;
        busy.spray_from = far;
        r.p.b.punching.set_attempt(busy);
    });
    // b cannot open sockets for a, but sprays a's public address from its main socket.
    for _ in 0..8 {
        r.tick();
    }
    let s = r.p.b.status(Instant::now()).birthday;
    assert_eq!((s.birthday_joined, s.birthday_side_sprays), (0, 1), "{s:?}");
    assert_eq!(s.birthday_probes_sent, u64::from(SMALL.probes));
    assert_eq!(r.p.b.status(Instant::now()).extra_sockets, 0);
    // A second join within the spacing is not answered again.
    let before = r.p.b.status(Instant::now()).birthday;
    for _ in 0..8 {
        r.tick();
    }
    assert_eq!(
        r.p.b.status(Instant::now()).birthday.birthday_side_sprays,
        before.birthday_side_sprays
    );
}

#[test]
fn a_reported_stranger_gets_a_bounded_number_of_probes() {
    // b "reports" a third party's address; a, with birthday punching at the largest sizes
    // allowed, is told to punch toward it for ten minutes.
    let mut r = Relayed::new(false);
    r.p.a.set_birthday(Some(BirthdayConfig {
        sockets: birthday::MAX_SOCKETS,
        probes: 8192,
        probes_per_tick: birthday::MAX_PROBES_PER_TICK,
        attempts: birthday::ATTEMPT_BUDGET,
    }));
    let kb = r.p.b.public_key();
    let victim: SocketAddr = "203.0.113.66:443".parse().unwrap();
    r.p.a.upsert_peer(
        PeerConfig {
            routes: Vec::new(),
            key: kb,
            name: "b".into(),
            address: r.p.b.address(),
            address6: None,
            endpoints: vec![victim],
            observed: None,
            nat: None,
        },
        r.p.now,
    );
    let start = r.p.now;
    let mut per_minute = [0u32; 10];
    let mut tag = 0u8;
    while r.p.now.duration_since(start) < Duration::from_secs(600) {
        r.send_a_to_b(tag);
        tag = tag.wrapping_add(1);
        r.p.now += TICK;
        r.p.a.handle_timeout(r.p.now);
        while let Some(e) = r.p.a.poll_event() {
            let _ = e;
        }
        while let Some(t) = r.p.a.poll_udp() {
            if t.dst.ip() == victim.ip() {
                let minute = (r.p.now.duration_since(start).as_secs() / 60) as usize;
                per_minute[minute.min(9)] += 1;
            }
        }
        while r.p.a.poll_relayed().is_some() {}
    }
    // At most 4,096 a minute to one address, whatever the node is told.
    assert!(per_minute.iter().all(|n| *n <= 4096), "{per_minute:?}");
    assert!(per_minute[0] > 0, "some probes do go out");
}

#[test]
fn birthday_sprays_only_the_ip_the_controller_observed() {
    let observed: SocketAddr = "198.51.100.9:40000".parse().unwrap();
    let peer = PeerConfig {
        routes: Vec::new(),
        key: PublicKey([9; 32]),
        name: "b".into(),
        address: Ipv4Addr::new(100, 64, 0, 2),
        address6: None,
        endpoints: vec!["203.0.113.66:51820".parse().unwrap(), observed],
        observed: Some(observed),
        nat: None,
    };
    assert_eq!(
        spray_targets(&peer.endpoints, peer.observed),
        vec![observed]
    );
}

#[test]
fn no_attempt_toward_a_peer_with_only_private_candidates() {
    let mut r = Relayed::new(false);
    r.p.a.set_birthday(Some(SMALL));
    let kb = r.p.b.public_key();
    r.p.a.upsert_peer(
        PeerConfig {
            routes: Vec::new(),
            key: kb,
            name: "b".into(),
            address: r.p.b.address(),
            address6: None,
            endpoints: vec![
                "192.168.1.2:51820".parse().unwrap(),
                "10.0.0.2:51820".parse().unwrap(),
            ],
            observed: None,
            nat: None,
        },
        r.p.now,
    );
    assert!(r.send_a_to_b(1));
    for _ in 0..4 * 60 {
        r.tick();
    }
    let (opened, _, _) = socket_events(&mut r.p.a);
    assert!(opened.is_empty());
    assert_eq!(
        r.p.a.status(Instant::now()).birthday,
        BirthdayStats::default()
    );
}

#[test]
fn a_peers_socket_carries_no_other_peer() {
    let (mut r, opened) = punching_pair();
    let ka = r.p.a.public_key();
    // A third node c with a session to a (straight over UDP).
    let (skc, kc) = key(3);
    let c_addr: SocketAddr = "192.0.2.3:51820".parse().unwrap();
    let ip_c = Ipv4Addr::new(100, 64, 0, 3);
    let mut c = Node::new(
        NodeConfig {
            private_key: skc,
            address: ip_c,
            keepalive: None,
            mtu: 1420,
        },
        7,
        r.p.now,
    );
    let peer = |key, address, endpoint| PeerConfig {
        routes: Vec::new(),
        key,
        name: "x".into(),
        address,
        address6: None,
        endpoints: vec![endpoint],
        observed: None,
        nat: None,
    };
    c.upsert_peer(peer(ka, r.p.a.address(), r.p.a_addr), r.p.now);
    r.p.a.upsert_peer(peer(kc, ip_c, c_addr), r.p.now);
    c.handle_tun_packet(&icmp(ip_c, r.p.a.address(), b"hi"), r.p.now);
    for _ in 0..4 {
        while let Some(t) = c.poll_udp() {
            r.p.a
                .handle_datagram(Source::main(c_addr), &t.payload, r.p.now);
        }
        while let Some(t) = r.p.a.poll_udp() {
            if t.dst == c_addr {
                c.handle_datagram(Source::main(r.p.a_addr), &t.payload, r.p.now);
            }
        }
    }
    assert_eq!(
        r.p.a.local_socket(&kc),
        Some(SocketId::MAIN),
        "a and c are up"
    );
    // c's message arrives on a socket of a's attempt toward b: refused, no path change.
    let before = r.p.a.counters().unknown_socket_packets;
    let from_c = keepalive(&mut c, ka);
    r.p.a.handle_datagram(
        Source::Udp {
            socket: opened[1],
            from: c_addr,
        },
        &from_c,
        r.p.now,
    );
    assert_eq!(r.p.a.counters().unknown_socket_packets, before + 1);
    assert_eq!(r.p.a.local_socket(&kc), Some(SocketId::MAIN));
    assert_eq!(
        r.p.a.status(Instant::now()).extra_sockets,
        4,
        "the attempt goes on"
    );
}

#[test]
fn datagram_on_a_socket_the_node_never_opened_is_counted() {
    let mut p = Pair::new();
    let from: SocketAddr = "198.51.100.7:1234".parse().unwrap();
    let kb = p.b.public_key();
    let ka = p.a.public_key();
    let bytes = keepalive(&mut p.b, ka);
    p.a.handle_datagram(
        Source::Udp {
            socket: SocketId(77),
            from,
        },
        &bytes,
        p.now,
    );
    assert_eq!(p.a.counters().unknown_socket_packets, 1);
    assert_ne!(p.a.peer_status(p.now)[0].endpoint, Some(from));
    assert_eq!(p.a.local_socket(&kb), Some(SocketId::MAIN));
    assert!(p.a.poll_udp().is_none());
}

#[test]
fn disabling_stops_the_attempt_and_closes_its_sockets() {
    let (mut r, opened) = punching_pair();
    r.p.a.set_birthday(None);
    let (_, closed, _) = socket_events(&mut r.p.a);
    assert_eq!(closed, opened);
    assert_eq!(r.p.a.status(Instant::now()).extra_sockets, 0);
    // And no attempt starts again while disabled.
    for _ in 0..200 {
        r.tick();
    }
    let (opened_again, _, _) = socket_events(&mut r.p.a);
    assert!(opened_again.is_empty());
}

#[test]
fn a_burst_leaves_in_gso_batches_the_kernel_accepts() {
    let mut p = Pair::new();
    let (ip_a, ip_b) = (Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2));
    for _ in 0..200 {
        p.a.handle_tun_packet(&icmp(ip_a, ip_b, &[7; 1380]), p.now);
    }
    let mut datagrams = 0;
    while let Some(t) = p.a.poll_transmit() {
        assert!(
            t.contents.len() <= MAX_BATCH_BYTES,
            "{} bytes",
            t.contents.len()
        );
        assert!(t.datagrams() <= MAX_BATCH);
        assert_eq!(t.segments().count(), t.datagrams());
        datagrams += t.datagrams();
        for d in t.segments() {
            p.b.handle_datagram(Source::main(p.a_addr), d, p.now);
        }
    }
    assert_eq!(datagrams, 200);
    let mut delivered = 0;
    while p.b.poll_tun_packet().is_some() {
        delivered += 1;
    }
    assert_eq!(
        delivered, 200,
        "every packet of the burst arrives, in batches"
    );
}

/// `a` sends `n` data packets to `b`; the ones whose index `drop` picks never arrive. What
/// reaches `b`'s TUN device is taken away.
fn data_with_loss(p: &mut Pair, n: usize, drop: impl Fn(usize) -> bool) {
    let (ip_a, ip_b) = (p.a.address(), p.b.address());
    for i in 0..n {
        p.a.handle_tun_packet(&icmp(ip_a, ip_b, &[i as u8; 100]), p.now);
        while let Some(t) = p.a.poll_udp() {
            if !drop(i) {
                p.b.handle_datagram(Source::main(p.a_addr), &t.payload, p.now);
            }
        }
    }
    while p.b.poll_tun_packet().is_some() {}
}

/// Both nodes' timers every 250 ms for `d`, the datagrams between them delivered.
fn run_timers(p: &mut Pair, d: Duration) {
    let end = p.now + d;
    while p.now < end {
        p.now += Duration::from_millis(250);
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        p.drive();
        while p.a.poll_tun_packet().is_some() {}
        while p.b.poll_tun_packet().is_some() {}
    }
}

#[test]
fn the_receiver_reports_the_data_it_missed_and_the_sender_learns_its_loss() {
    let mut p = Pair::new();
    // 10 of 40 lost on the way (one in four from the tenth on).
    data_with_loss(&mut p, 40, |i| i >= 10 && i % 4 == 2);
    run_timers(&mut p, Duration::from_secs(2));
    assert!(p.b.counters().loss_reports_sent >= 1);
    assert!(p.a.counters().loss_reports_received >= 1);
    assert_eq!(p.a.counters().loss_reports_unmatched, 0);
    let direct = p.a.peer_status(p.now)[0].direct_quality;
    let loss = direct.loss.expect("enough reported");
    // b counts from the second packet it got: 8 of the 39 data packets after the first, and
    // the probes of the path in use, which all came through (not the path MTU probes, which
    // neither side counts).
    assert!((0.17..0.21).contains(&loss), "{loss}");
    assert!(
        direct.rtt.is_some(),
        "a probe of the path in use went and came back"
    );
    assert_eq!(p.a.peer_status(p.now)[0].relay_quality.loss, None);
    // b sent no data: it judges nothing, and a reports nothing to it.
    assert_eq!(p.a.counters().loss_reports_sent, 0);
    assert_eq!(p.b.peer_status(p.now)[0].direct_quality.loss, None);
}

#[test]
fn an_idle_peer_keeps_no_measurements_and_sends_no_reports() {
    let mut p = Pair::new();
    let kb = p.b.public_key();
    let ka = p.a.public_key();
    // A handshake and keepalives are no data: nothing is measured.
    run_timers(&mut p, Duration::from_secs(30));
    assert!(p.a.peers.get(&kb).is_some_and(|x| x.measure.is_none()));
    assert_eq!(p.b.counters().loss_reports_sent, 0);
    data_with_loss(&mut p, 30, |_| false);
    assert!(p.a.peers.get(&kb).is_some_and(|x| x.measure.is_some()));
    assert!(p.b.peers.get(&ka).is_some_and(|x| x.measure.is_some()));
    run_timers(&mut p, Duration::from_secs(2));
    let reports = p.b.counters().loss_reports_sent;
    assert!(reports >= 1);
    // Ten seconds after the last data both sides have let go of what they measured, and
    // reports stopped with the data.
    run_timers(&mut p, Duration::from_secs(12));
    assert!(p.a.peers.get(&kb).is_some_and(|x| x.measure.is_none()));
    assert!(p.b.peers.get(&ka).is_some_and(|x| x.measure.is_none()));
    assert_eq!(p.b.counters().loss_reports_sent, reports);
    assert_eq!(
        p.a.peer_status(p.now)[0].direct_quality,
        PathQuality::default()
    );
}

#[test]
fn malformed_loss_reports_are_counted_and_never_reach_the_tun_device() {
    use mesh_proto::tunnel::{build_report, LossReport, ReportPath, REPORT_LEN};
    let mut p = Pair::new();
    let ka = p.a.public_key();
    let (ip_a, ip_b) = (p.a.address(), p.b.address());
    let good = build_report(
        ip_b,
        ip_a,
        1,
        &LossReport {
            path: ReportPath::Direct,
            index: 1,
            first: 10,
            last: 20,
            received: 5,
        },
    );
    let mut bad_path = good.clone();
    bad_path[33] = 9;
    let mut backwards = good.clone();
    backwards[38..46].copy_from_slice(&30u64.to_be_bytes());
    let mut short = good[..REPORT_LEN - 4].to_vec();
    // (The IPv4 length says how much WireGuard delivers.)
    short[2..4].copy_from_slice(&((REPORT_LEN - 4) as u16).to_be_bytes());
    for inner in [bad_path, backwards, short] {
        let bytes = sealed(&mut p.b, ka, &inner);
        p.a.handle_datagram(Source::main(p.b_addr), &bytes, p.now);
    }
    assert_eq!(p.a.poll_tun_packet(), None);
    assert_eq!(p.a.counters().malformed_loss_reports, 3);
    assert_eq!(p.a.counters().loss_reports_received, 0);
    // A well-formed one about data a never sent counts for nothing.
    let bytes = sealed(&mut p.b, ka, &good);
    p.a.handle_datagram(Source::main(p.b_addr), &bytes, p.now);
    assert_eq!(p.a.poll_tun_packet(), None);
    let c = p.a.counters();
    assert_eq!((c.loss_reports_received, c.loss_reports_unmatched), (1, 1));
    assert_eq!(p.a.peer_status(p.now)[0].direct_quality.loss, None);
}

#[test]
fn switching_off_brings_a_peer_back_from_the_relay() {
    let mut r = Relayed::new(true);
    assert!(r.send_a_to_b(1));
    let kb = r.p.b.public_key();
    let now = r.p.now;
    let peer = r.p.a.peers.get_mut(&kb).expect("peer");
    assert!(peer.path.endpoint().is_some(), "a direct path");
    peer.path.choice = crate::peer::choice::Choice::Relay {
        since: now,
        stay: Duration::from_secs(30),
    };
    assert_eq!(r.p.a.peer_status(now)[0].path, Path::Relay);
    while r.p.a.poll_event().is_some() {}
    r.p.a.set_quality(QualityConfig {
        switching: false,
        ..QualityConfig::default()
    });
    assert!(matches!(r.p.a.peer_status(now)[0].path, Path::Direct(_)));
    let events: Vec<Event> = std::iter::from_fn(|| r.p.a.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::PathChanged {
                path: Path::Direct(_),
                ..
            }
        )),
        "{events:?}"
    );
}

/// Two dual-stack nodes, each with an IPv4 and an IPv6 address, over links with a delay per
/// family (and IPv6 that can be cut), exchanging a packet each way every 50 ms.
struct DualStack {
    a: Node,
    b: Node,
    now: Instant,
    delay4: Duration,
    delay6: Duration,
    cut6: bool,
    /// In flight: when it arrives, whether for b, from where, the bytes.
    wire: Vec<(Instant, bool, Source, Vec<u8>)>,
}

/// How long the relay takes between the two nodes of a [`DualStack`].
const DUAL_STACK_RELAY_DELAY: Duration = Duration::from_millis(20);

const A4: &str = "192.0.2.1:51820";
const A6: &str = "[2001:db8:a::1]:51820";
const B4: &str = "192.0.2.2:51820";
const B6: &str = "[2001:db8:b::1]:51820";

impl DualStack {
    fn new(delay4: Duration, delay6: Duration) -> DualStack {
        let now = Instant::now();
        let (ska, pka) = key(1);
        let (skb, pkb) = key(2);
        let node = |sk, ip, seed| {
            Node::new(
                NodeConfig {
                    private_key: sk,
                    address: ip,
                    keepalive: None,
                    mtu: 1420,
                },
                seed,
                now,
            )
        };
        let mut a = node(ska, Ipv4Addr::new(100, 64, 0, 1), 1);
        let mut b = node(skb, Ipv4Addr::new(100, 64, 0, 2), 1000);
        let peer = |key, name: &str, ip, v4: &str, v6: &str| PeerConfig {
            address6: None,
            routes: Vec::new(),
            key,
            name: name.into(),
            address: ip,
            endpoints: vec![v4.parse().unwrap(), v6.parse().unwrap()],
            observed: None,
            nat: Some(NatKind::Public),
        };
        a.set_peers(&[peer(pkb, "b", Ipv4Addr::new(100, 64, 0, 2), B4, B6)], now);
        b.set_peers(&[peer(pka, "a", Ipv4Addr::new(100, 64, 0, 1), A4, A6)], now);
        DualStack {
            a,
            b,
            now,
            delay4,
            delay6,
            cut6: false,
            wire: Vec::new(),
        }
    }

    /// Runs `d` of traffic and timers.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        let mut next_packet = self.now;
        let (ip_a, ip_b) = (self.a.address(), self.b.address());
        while self.now < end {
            if self.now >= next_packet {
                self.a
                    .handle_tun_packet(&icmp(ip_a, ip_b, b"ping"), self.now);
                self.b
                    .handle_tun_packet(&icmp(ip_b, ip_a, b"pong"), self.now);
                next_packet = self.now + Duration::from_millis(50);
            }
            for (from_a, node) in [(true, &mut self.a), (false, &mut self.b)] {
                while let Some(t) = node.poll_udp() {
                    let v6 = t.dst.is_ipv6();
                    if v6 && self.cut6 {
                        continue;
                    }
                    let src = match (from_a, v6) {
                        (true, false) => A4,
                        (true, true) => A6,
                        (false, false) => B4,
                        (false, true) => B6,
                    };
                    let delay = if v6 { self.delay6 } else { self.delay4 };
                    self.wire.push((
                        self.now + delay,
                        from_a,
                        Source::main(src.parse().unwrap()),
                        t.payload,
                    ));
                }
                // The relay (where set up) carries what it is given.
                let from = node.public_key();
                while let Some(r) = node.poll_relayed() {
                    let source = Source::Relay { from };
                    let at = self.now + DUAL_STACK_RELAY_DELAY;
                    self.wire.push((at, from_a, source, r.payload));
                }
                while node.poll_tun_packet().is_some() {}
            }
            self.wire.sort_by_key(|w| w.0);
            while self.wire.first().is_some_and(|w| w.0 <= self.now) {
                let (_, to_b, src, bytes) = self.wire.remove(0);
                let node = if to_b { &mut self.b } else { &mut self.a };
                node.handle_datagram(src, &bytes, self.now);
            }
            for node in [&mut self.a, &mut self.b] {
                if node.poll_timeout().is_some_and(|t| t <= self.now) {
                    node.handle_timeout(self.now);
                }
            }
            let next = [
                Some(next_packet),
                self.wire.first().map(|w| w.0),
                self.a.poll_timeout(),
                self.b.poll_timeout(),
                Some(end),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end);
            self.now = next.max(self.now + Duration::from_micros(10));
        }
    }

    fn a_path(&self) -> Path {
        self.a.peer_status(self.now)[0].path
    }

    fn b_path(&self) -> Path {
        self.b.peer_status(self.now)[0].path
    }
}

#[test]
fn a_dual_stack_pair_settles_on_ipv6_when_both_families_are_as_fast() {
    let mut d = DualStack::new(Duration::from_millis(5), Duration::from_millis(5));
    d.run(Duration::from_secs(5));
    assert_eq!(d.a_path(), Path::Direct(B6.parse().unwrap()));
    assert_eq!(d.b_path(), Path::Direct(A6.parse().unwrap()));
    // It stays there.
    d.run(Duration::from_secs(30));
    assert_eq!(d.a_path(), Path::Direct(B6.parse().unwrap()));
}

#[test]
fn a_dual_stack_pair_takes_ipv4_when_ipv6_is_much_slower() {
    let mut d = DualStack::new(Duration::from_millis(5), Duration::from_millis(25));
    d.run(Duration::from_secs(5));
    assert_eq!(d.a_path(), Path::Direct(B4.parse().unwrap()));
    assert_eq!(d.b_path(), Path::Direct(A4.parse().unwrap()));
    // IPv6 gets as fast: the next round moves the pair to it.
    d.delay6 = Duration::from_millis(5);
    d.run(Duration::from_secs(12));
    assert_eq!(d.a_path(), Path::Direct(B6.parse().unwrap()));
    assert_eq!(d.b_path(), Path::Direct(A6.parse().unwrap()));
}

#[test]
fn losing_ipv6_moves_a_dual_stack_pair_to_ipv4_without_a_relay_stay() {
    let mut d = DualStack::new(Duration::from_millis(5), Duration::from_millis(5));
    // A relay is up, so that a dead direct path is given up (PATH_TIMEOUT).
    d.a.set_relay(true, d.now);
    d.b.set_relay(true, d.now);
    d.run(Duration::from_secs(15));
    assert_eq!(d.a_path(), Path::Direct(B6.parse().unwrap()));
    d.cut6 = true;
    for _ in 0..25 {
        d.run(Duration::from_millis(100));
        assert_ne!(
            d.a_path(),
            Path::Relay,
            "the other family was measured lately"
        );
    }
    assert_eq!(d.a_path(), Path::Direct(B4.parse().unwrap()));
    assert_eq!(d.b_path(), Path::Direct(A4.parse().unwrap()));
}

/// A node that learns a network of 300 at once shakes hands ahead of traffic with the
/// [`PROACTIVE_PEERS`] peers of the lowest addresses only (whatever the order of the list),
/// holds no WireGuard state for the others, and starts a session with one of them when a
/// packet first goes there.
#[test]
fn past_proactive_peers_a_session_waits_for_the_first_packet() {
    let now = Instant::now();
    let me = Ipv4Addr::new(100, 64, 0, 1);
    let mut a = Node::new(
        NodeConfig {
            private_key: key(1).0,
            address: me,
            keepalive: None,
            mtu: 1420,
        },
        1,
        now,
    );
    let peer = |i: u16| {
        // (Bytes 1 and 2: x25519 clears the low bits of byte 0.)
        let mut secret = [9u8; 32];
        secret[1..3].copy_from_slice(&i.to_le_bytes());
        let public = PublicKey(XPublic::from(&StaticSecret::from(secret)).to_bytes());
        let [hi, lo] = (i + 2).to_be_bytes();
        PeerConfig {
            routes: Vec::new(),
            key: public,
            name: format!("n{i}"),
            address: Ipv4Addr::new(100, 64, hi, lo),
            address6: None,
            endpoints: vec![SocketAddr::from(([198, 51, 100, hi], 10_000 + i))],
            observed: None,
            nat: None,
        }
    };
    // Highest address first: the list's order must not decide.
    let peers: Vec<PeerConfig> = (0..300u16).rev().map(peer).collect();
    a.set_peers(&peers, now);
    let later = now + PROACTIVE_FALLBACK + Duration::from_millis(10);
    a.handle_timeout(later);
    // Where the node sent handshake initiations (148 bytes, type 1) since the last call.
    let initiations = |node: &mut Node| -> Vec<SocketAddr> {
        std::iter::from_fn(|| node.poll_udp())
            .filter(|t| t.payload.len() == 148 && t.payload[0] == 1)
            .map(|t| t.dst)
            .collect()
    };
    let initiated: std::collections::BTreeSet<SocketAddr> =
        initiations(&mut a).into_iter().collect();
    let first: std::collections::BTreeSet<SocketAddr> = (0..PROACTIVE_PEERS as u16)
        .map(|i| peer(i).endpoints[0])
        .collect();
    assert_eq!(
        initiated, first,
        "handshakes ahead of traffic: the lowest addresses"
    );
    let without_state = a.peers.iter().filter(|(_, p)| !p.session.in_use()).count();
    assert_eq!(without_state, 300 - PROACTIVE_PEERS);

    // A packet toward a peer past the limit starts its handshake at once.
    let far = peer(299);
    a.handle_tun_packet(&icmp(me, far.address, b"hello"), later);
    assert_eq!(
        initiations(&mut a),
        far.endpoints,
        "the first packet starts the session"
    );
    assert!(a.peers.get(&far.key).unwrap().session.in_use());

    // A node that joins later is one more peer past the limit: nothing ahead of traffic.
    let newcomer = peer(300);
    a.upsert_peer(newcomer.clone(), later);
    a.handle_timeout(later + PROACTIVE_FALLBACK * 2);
    while let Some(t) = a.poll_udp() {
        assert_ne!(t.dst, newcomer.endpoints[0], "nothing sent to the newcomer");
    }
    assert!(!a.peers.get(&newcomer.key).unwrap().session.in_use());

    // `mesh ping` toward it finds no session, and starts the handshake for the next try.
    let t = later + PROACTIVE_FALLBACK * 3;
    assert!(!a.ping(&newcomer.key, t));
    assert_eq!(initiations(&mut a), newcomer.endpoints);
}
