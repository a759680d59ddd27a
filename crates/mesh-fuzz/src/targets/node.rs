//! Whole `mesh_core::Node`s: raw datagrams, relayed messages and TUN packets into a node that
//! has a real WireGuard session with a peer, and mutated inner packets through that session.

use super::packet::inner_packets;
use super::{check, committed, Harness, Step};
use crate::mutate::Mutator;
use crate::Outcome;
use mesh_core::{Counters, Destination, Node, NodeConfig, PeerConfig, SocketId, Source};
use mesh_proto::PublicKey;
use rand::rngs::SmallRng;
use rand::Rng;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

const KEY_A: [u8; 32] = [0x11; 32];
const KEY_B: [u8; 32] = [0x22; 32];
/// A peer both know of that never comes online.
const KEY_C: [u8; 32] = [0x33; 32];
const IP_A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const IP_C: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
const A_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 51820);
const B_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 51820);
const C_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3)), 51820);
const STRANGER_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9)), 4444);
const STRANGER_KEY: PublicKey = PublicKey([0x44; 32]);
/// Node B's WireGuard index for peer A (from its index seed), as receivers see it on the wire.
const B_INDEX_FOR_A: u32 = 1000 << 8;

/// Inputs per pair before a fresh one (boringtun's own clock ages sessions; a fresh pair keeps
/// the session young and the run reproducible from the start of its epoch).
const EPOCH: u64 = 1000;

fn public(private: &[u8; 32]) -> PublicKey {
    let secret = x25519_dalek::StaticSecret::from(*private);
    PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
}

fn node(private: [u8; 32], address: Ipv4Addr, seed: u32, now: Instant) -> Node {
    let config = NodeConfig {
        private_key: private,
        address,
        keepalive: Some(25),
        mtu: 1420,
    };
    Node::new(config, seed, now)
}

/// Two nodes that know each other (and C, which never answers), with a relay, either with
/// each other's direct endpoints or relay-only.
struct Pair {
    a: Node,
    b: Node,
    now: Instant,
}

impl Pair {
    fn new(direct: bool, log: Option<&mut Vec<Vec<u8>>>) -> Pair {
        let now = Instant::now();
        let mut a = node(KEY_A, IP_A, 1, now);
        let mut b = node(KEY_B, IP_B, 1000, now);
        a.set_relay(true, now);
        b.set_relay(true, now);
        let endpoints = |addr| if direct { vec![addr] } else { vec![] };
        let c = PeerConfig {
            routes: Vec::new(),
            key: public(&KEY_C),
            name: "c".into(),
            address: IP_C,
            address6: None,
            endpoints: vec![C_ADDR],
            observed: Some(C_ADDR),
            nat: None,
        };
        a.set_peers(
            &[
                PeerConfig {
                    routes: Vec::new(),
                    key: b.public_key(),
                    name: "b".into(),
                    address: IP_B,
                    address6: None,
                    endpoints: endpoints(B_ADDR),
                    observed: Some(B_ADDR),
                    nat: None,
                },
                c.clone(),
            ],
            now,
        );
        b.set_peers(
            &[
                PeerConfig {
                    routes: Vec::new(),
                    key: a.public_key(),
                    name: "a".into(),
                    address: IP_A,
                    address6: None,
                    endpoints: endpoints(A_ADDR),
                    observed: Some(A_ADDR),
                    nat: None,
                },
                c,
            ],
            now,
        );
        let mut p = Pair { a, b, now };
        p.drive(16, log);
        p
    }

    /// Moves what each node sends to the other (straight to its address from the main socket,
    /// or through the relay) until both are quiet or `rounds` rounds passed; drops the rest.
    /// Returns how many messages moved.
    fn drive(&mut self, rounds: usize, mut log: Option<&mut Vec<Vec<u8>>>) -> usize {
        let (ka, kb) = (self.a.public_key(), self.b.public_key());
        let mut total = 0;
        for _ in 0..rounds {
            let mut moved = deliver(
                &mut self.a,
                &mut self.b,
                (A_ADDR, ka),
                (B_ADDR, kb),
                self.now,
                log.as_deref_mut(),
            );
            moved += deliver(
                &mut self.b,
                &mut self.a,
                (B_ADDR, kb),
                (A_ADDR, ka),
                self.now,
                log.as_deref_mut(),
            );
            total += moved;
            if moved == 0 {
                break;
            }
        }
        total
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
    }

    /// Drains both TUN queues, checking that every packet comes from the peer's overlay
    /// address (or is the node's own ICMP answer); returns how many B wrote.
    fn check_tun(&mut self) -> usize {
        while let Some(p) = self.a.poll_tun_packet() {
            check_tun_packet(&p, IP_B, IP_A);
        }
        let mut n = 0;
        while let Some(p) = self.b.poll_tun_packet() {
            check_tun_packet(&p, IP_A, IP_B);
            n += 1;
        }
        n
    }
}

fn deliver(
    from: &mut Node,
    to: &mut Node,
    (from_addr, from_key): (SocketAddr, PublicKey),
    (to_addr, to_key): (SocketAddr, PublicKey),
    now: Instant,
    mut log: Option<&mut Vec<Vec<u8>>>,
) -> usize {
    let mut moved = 0;
    // Events first: transmits on a new extra socket wait for its announcement.
    while from.poll_event().is_some() {}
    while let Some(t) = from.poll_transmit() {
        let source = match t.destination {
            Destination::Udp { socket, dst } if dst == to_addr && socket == SocketId::MAIN => {
                Source::main(from_addr)
            }
            Destination::Relay { to } if to == to_key => Source::Relay { from: from_key },
            _ => continue,
        };
        for d in t.segments() {
            to.handle_datagram(source, d, now);
            moved += 1;
            if let Some(log) = log.as_deref_mut() {
                log.push(d.to_vec());
            }
        }
    }
    moved
}

fn check_tun_packet(p: &[u8], peer: Ipv4Addr, me: Ipv4Addr) {
    let src = mesh_core::packet::ipv4_addrs(p).map(|(s, _)| s);
    let own_icmp = src == Some(me) && p.len() >= 22 && p[9] == 1 && p[20..22] == [3, 4];
    check(
        src == Some(peer) || own_icmp,
        "a node writes to TUN only packets from the peer's overlay address (or its own ICMP)",
    );
    check(
        mesh_proto::tunnel::parse(p).is_none(),
        "in-tunnel probe messages never reach TUN",
    );
}

/// The first drop counter that moved, by name.
fn moved(before: &Counters, after: &Counters) -> Option<&'static str> {
    [
        (
            "malformed",
            before.malformed_packets,
            after.malformed_packets,
        ),
        (
            "unknown peer",
            before.unknown_peer_packets,
            after.unknown_peer_packets,
        ),
        ("rejected", before.rejected_packets, after.rejected_packets),
        ("spoofed", before.spoofed_packets, after.spoofed_packets),
        ("no route", before.no_route_packets, after.no_route_packets),
        ("non ipv4", before.non_ipv4_packets, after.non_ipv4_packets),
        ("too big", before.too_big_packets, after.too_big_packets),
        (
            "unknown socket",
            before.unknown_socket_packets,
            after.unknown_socket_packets,
        ),
        ("queue drop", before.queue_drops, after.queue_drops),
    ]
    .into_iter()
    .find(|(_, b, a)| a > b)
    .map(|(name, _, _)| name)
}

/// Every WireGuard message two real nodes exchange while they handshake, carry traffic, probe
/// the path MTU, ping, and keep alive, directly and through the relay; plus a cookie reply and
/// a data header for B's session index.
fn recorded_datagrams() -> Vec<Vec<u8>> {
    let mut log = Vec::new();
    for direct in [true, false] {
        let mut p = Pair::new(direct, Some(&mut log));
        for packet in inner_packets(IP_A, IP_B) {
            p.a.handle_tun_packet(&packet, p.now);
        }
        for packet in inner_packets(IP_B, IP_A) {
            p.b.handle_tun_packet(&packet, p.now);
        }
        p.drive(16, Some(&mut log));
        for _ in 0..12 {
            p.tick(Duration::from_millis(250));
            p.drive(16, Some(&mut log));
        }
        p.tick(Duration::from_secs(30));
        p.drive(16, Some(&mut log));
    }
    let mut cookie = vec![3, 0, 0, 0];
    cookie.extend_from_slice(&B_INDEX_FOR_A.to_le_bytes());
    cookie.extend([0x5c; 56]);
    log.push(cookie);
    let mut data = vec![4, 0, 0, 0];
    data.extend_from_slice(&B_INDEX_FOR_A.to_le_bytes());
    data.extend([0u8; 8 + 16]);
    log.push(data);
    log.sort();
    log.dedup();
    log
}

/// What a step of the node target does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// A datagram from the peer's address.
    FromPeer = 0,
    /// A datagram from an address nobody knows.
    FromStranger = 1,
    /// A relayed message named as the peer's.
    RelayedFromPeer = 2,
    /// A relayed message named as a stranger's.
    RelayedFromStranger = 3,
    /// A datagram on an extra socket the node may or may not have.
    ExtraSocket = 4,
    /// A packet from the TUN device.
    Tun = 5,
    /// Time passes; timers run.
    Pause = 6,
    /// The peer sends a real packet through the session.
    PeerTraffic = 7,
}

impl Op {
    fn from_u8(op: u8) -> Op {
        match op % 8 {
            0 => Op::FromPeer,
            1 => Op::FromStranger,
            2 => Op::RelayedFromPeer,
            3 => Op::RelayedFromStranger,
            4 => Op::ExtraSocket,
            5 => Op::Tun,
            6 => Op::Pause,
            _ => Op::PeerTraffic,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Op::FromPeer => "from peer",
            Op::FromStranger => "from stranger",
            Op::RelayedFromPeer => "relayed from peer",
            Op::RelayedFromStranger => "relayed from stranger",
            Op::ExtraSocket => "extra socket",
            Op::Tun => "tun",
            Op::Pause => "pause",
            Op::PeerTraffic => "peer traffic",
        }
    }
}

/// Node B under fire: it has a session with A, knows C, and gets mutated WireGuard messages
/// from A's address, from strangers, through the relay and on extra sockets, mutated TUN
/// packets, real traffic from A and the passage of time.
pub(super) struct Single {
    datagrams: Vec<Vec<u8>>,
    /// B's outbound packets: to A, to C (no session), to nobody.
    tun: Vec<Vec<u8>>,
    /// A's real packets to B.
    traffic: Vec<Vec<u8>>,
    pair: Option<Pair>,
}

impl Single {
    pub(super) fn new() -> Single {
        let mut datagrams = recorded_datagrams();
        datagrams.extend(committed("node"));
        let mut tun = inner_packets(IP_B, IP_A);
        tun.extend(inner_packets(IP_B, IP_C));
        tun.extend(inner_packets(IP_B, Ipv4Addr::new(100, 64, 9, 9)));
        tun.extend(committed("node_tun"));
        Single {
            datagrams,
            tun,
            traffic: inner_packets(IP_A, IP_B),
            pair: None,
        }
    }
}

impl Harness for Single {
    fn generate(&self, rng: &mut SmallRng) -> Vec<Step> {
        let steps = if rng.gen_range(0..8) == 0 {
            rng.gen_range(2..=4)
        } else {
            1
        };
        (0..steps)
            .map(|_| {
                let op = match rng.gen_range(0..20) {
                    0..=5 => Op::FromPeer,
                    6 | 7 => Op::FromStranger,
                    8..=10 => Op::RelayedFromPeer,
                    11 => Op::RelayedFromStranger,
                    12 => Op::ExtraSocket,
                    13..=15 => Op::Tun,
                    16 | 17 => Op::Pause,
                    _ => Op::PeerTraffic,
                };
                let bytes = match op {
                    Op::Tun => Mutator::new(&self.tun, 2000).input(rng),
                    Op::Pause => vec![rng.gen()],
                    Op::PeerTraffic => self.traffic[rng.gen_range(0..self.traffic.len())].clone(),
                    Op::ExtraSocket => {
                        let mut b = Mutator::new(&self.datagrams, 2000).input(rng);
                        b.insert(0, rng.gen_range(1..=4));
                        b
                    }
                    _ => Mutator::new(&self.datagrams, 2000).input(rng),
                };
                Step {
                    op: op as u8,
                    bytes,
                }
            })
            .collect()
    }

    fn execute(&mut self, case: &[Step]) -> Outcome {
        let p = self.pair.get_or_insert_with(|| Pair::new(true, None));
        let key_a = p.a.public_key();
        let before = p.b.status(p.now).counters;
        let mut last = Op::Pause;
        let mut written = 0;
        for step in case {
            let op = Op::from_u8(step.op);
            last = op;
            let bytes = &step.bytes;
            match op {
                Op::FromPeer => p.b.handle_datagram(Source::main(A_ADDR), bytes, p.now),
                Op::FromStranger => {
                    p.b.handle_datagram(Source::main(STRANGER_ADDR), bytes, p.now)
                }
                Op::RelayedFromPeer => {
                    p.b.handle_datagram(Source::Relay { from: key_a }, bytes, p.now)
                }
                Op::RelayedFromStranger => {
                    p.b.handle_datagram(Source::Relay { from: STRANGER_KEY }, bytes, p.now)
                }
                Op::ExtraSocket => {
                    let id = SocketId(u16::from(bytes.first().copied().unwrap_or(1)));
                    p.b.handle_datagram(
                        Source::Udp {
                            socket: id,
                            from: A_ADDR,
                        },
                        bytes.get(1..).unwrap_or(&[]),
                        p.now,
                    );
                }
                Op::Tun => p.b.handle_tun_packet(bytes, p.now),
                Op::Pause => {
                    let ms = u64::from(bytes.first().copied().unwrap_or(0)) * 4;
                    p.tick(Duration::from_millis(ms));
                }
                Op::PeerTraffic => {
                    p.a.handle_tun_packet(bytes, p.now);
                    p.drive(4, None);
                }
            }
            let n = p.check_tun();
            written += n;
            if matches!(op, Op::FromStranger | Op::RelayedFromStranger) {
                check(n == 0, "nothing a stranger sends reaches TUN");
            }
        }
        let after = p.b.status(p.now).counters;
        let exchanged = p.drive(4, None) > 0;
        written += p.check_tun();
        let endpoint =
            p.b.status(p.now)
                .peers
                .into_iter()
                .find(|s| s.key == key_a)
                .and_then(|s| s.endpoint);
        check(
            endpoint != Some(STRANGER_ADDR),
            "an unauthenticated datagram never moves the peer's path",
        );
        let kind = moved(&before, &after).unwrap_or(if written > 0 {
            "to tun"
        } else if exchanged {
            "exchanged"
        } else {
            "silent"
        });
        Outcome::with(kind, last.name())
    }

    fn epoch(&self) -> u64 {
        EPOCH
    }

    fn reset(&mut self, _epoch: u64) {
        self.pair = Some(Pair::new(true, None));
    }

    fn corpus(&self) -> Vec<Vec<u8>> {
        let mut all = self.datagrams.clone();
        all.extend(self.tun.iter().cloned());
        all
    }
}

/// Mutated inner packets from A through a real session to B: B decrypts them, checks their
/// source and reads its in-tunnel messages (path MTU probes and acks, pings, birthday joins).
/// Even epochs run over a direct path, odd ones through the relay.
pub(super) struct Tunnel {
    corpus: Vec<Vec<u8>>,
    pair: Option<Pair>,
}

impl Tunnel {
    pub(super) fn new() -> Tunnel {
        let mut corpus = inner_packets(IP_A, IP_B);
        corpus.extend(committed("tunnel"));
        Tunnel { corpus, pair: None }
    }
}

impl Harness for Tunnel {
    fn generate(&self, rng: &mut SmallRng) -> Vec<Step> {
        let mut b = Mutator::new(&self.corpus, 1600).input(rng);
        // Keep most packets routable and plausible, so they get through A and into B.
        if b.len() >= 20 {
            if rng.gen_range(0..8) != 0 {
                b[16..20].copy_from_slice(&IP_B.octets());
            }
            if rng.gen_range(0..4) != 0 {
                b[12..16].copy_from_slice(&IP_A.octets());
            }
            if rng.gen() && b[0] >> 4 != 4 {
                b[0] = 0x45;
            }
            if rng.gen() {
                let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
                b[2..4].copy_from_slice(&len.to_be_bytes());
            }
        }
        let pause = u8::from(rng.gen_range(0..8) == 0);
        vec![Step {
            op: pause,
            bytes: b,
        }]
    }

    fn execute(&mut self, case: &[Step]) -> Outcome {
        let p = self.pair.get_or_insert_with(|| Pair::new(true, None));
        let (a_before, b_before) = (p.a.status(p.now).counters, p.b.status(p.now).counters);
        let mut written = 0;
        for step in case {
            if step.op & 1 == 1 {
                p.tick(Duration::from_millis(250));
            }
            p.a.handle_tun_packet(&step.bytes, p.now);
            p.drive(8, None);
            written += p.check_tun();
        }
        if let Some(at_a) = moved(&a_before, &p.a.status(p.now).counters) {
            return Outcome::with("at A", at_a);
        }
        match moved(&b_before, &p.b.status(p.now).counters) {
            Some(at_b) => Outcome::with("at B", at_b),
            None if written > 0 => Outcome::new("delivered"),
            None => Outcome::new("consumed"),
        }
    }

    fn epoch(&self) -> u64 {
        EPOCH
    }

    fn reset(&mut self, epoch: u64) {
        self.pair = Some(Pair::new(epoch.is_multiple_of(2), None));
    }

    fn corpus(&self) -> Vec<Vec<u8>> {
        self.corpus.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_come_up_both_ways() {
        for direct in [true, false] {
            let p = Pair::new(direct, None);
            let status = p.b.status(p.now).peers;
            let a = status.iter().find(|s| s.address == IP_A).unwrap();
            assert!(a.since_handshake.is_some(), "direct {direct}: {a:?}");
        }
    }

    #[test]
    fn real_traffic_is_delivered() {
        let mut t = Tunnel::new();
        t.reset(0);
        let echo = inner_packets(IP_A, IP_B)[6].clone();
        let out = t.execute(&[Step { op: 0, bytes: echo }]);
        assert_eq!(out, Outcome::new("delivered"));
    }
}
