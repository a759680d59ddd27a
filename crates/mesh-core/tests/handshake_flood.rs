#![allow(clippy::unwrap_used)]
//! A stranger floods a member with handshake initiations that carry a valid mac1 (anyone who
//! knows the member's public key can make them) from random keys, on a virtual clock. Two real
//! [`mesh_core::Node`]s must still complete their handshake and exchange packets: the node-wide
//! DH budget is spent by the flood, the member's first initiation is answered with a cookie
//! reply, and its retry (which carries mac2) gets in.

use mesh_core::session::{Output, Session};
use mesh_core::{Destination, Node, NodeConfig, PeerConfig, SocketId, Source};
use mesh_proto::PublicKey;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

const A_UNDERLAY: &str = "192.0.2.1:51820";
const B_UNDERLAY: &str = "192.0.2.2:51820";
const STRANGER: &str = "192.0.2.66:40000";
const A_OVERLAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const B_OVERLAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// The flood: this many initiations every `FLOOD_TICK` (10,000 per second).
const FLOOD_BATCH: usize = 500;
const FLOOD_TICK: Duration = Duration::from_millis(50);
/// WireGuard's REKEY_TIMEOUT: an initiator retries after this.
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);

fn public(private: [u8; 32]) -> PublicKey {
    PublicKey(XPublic::from(&StaticSecret::from(private)).to_bytes())
}

/// A UDP/IPv4 packet with a payload, as the TUN device would hand it over.
fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&4001u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// Initiations from `n` random stranger keys, each with a valid mac1 for `victim`.
fn stranger_initiations(victim: PublicKey, n: usize, rng: &mut SmallRng) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    (0..n)
        .map(|i| {
            let secret = StaticSecret::from(rng.gen::<[u8; 32]>());
            let mut s = Session::new(
                secret,
                victim,
                None,
                i as u32,
                mesh_core::session::wall_clock(std::time::Instant::now()),
            );
            match s.force_handshake(&mut buf, std::time::Instant::now()) {
                Output::Network(b) => b.to_vec(),
                other => panic!("no initiation: {other:?}"),
            }
        })
        .collect()
}

struct Lab {
    a: Node,
    b: Node,
    start: Instant,
    now: Instant,
    next_flood: Instant,
    flood: Vec<Vec<u8>>,
    flooded: usize,
    /// Cookie replies B sent to A, and to the stranger.
    cookies_to_a: usize,
    cookies_to_stranger: usize,
    /// Payloads that came out of each node's TUN side.
    a_tun: Vec<Vec<u8>>,
    b_tun: Vec<Vec<u8>>,
}

impl Lab {
    fn new(flood: bool) -> Lab {
        let now = Instant::now();
        // The lower key starts the handshake with a new peer: make it A's.
        let (mut ka, mut kb) = ([1u8; 32], [2u8; 32]);
        if public(ka) > public(kb) {
            std::mem::swap(&mut ka, &mut kb);
        }
        let config = |private_key, address| NodeConfig {
            private_key,
            address,
            keepalive: None,
            mtu: 1420,
        };
        let a = Node::new(config(ka, A_OVERLAY), 1, now);
        let b = Node::new(config(kb, B_OVERLAY), 2, now);
        let mut rng = SmallRng::seed_from_u64(7);
        let flood = if flood {
            stranger_initiations(b.public_key(), 512, &mut rng)
        } else {
            Vec::new()
        };
        Lab {
            a,
            b,
            start: now,
            now,
            next_flood: now,
            flood,
            flooded: 0,
            cookies_to_a: 0,
            cookies_to_stranger: 0,
            a_tun: Vec::new(),
            b_tun: Vec::new(),
        }
    }

    fn connect(&mut self) {
        let peer = |key, name: &str, address, endpoint: &str| PeerConfig {
            routes: Vec::new(),
            key,
            name: name.into(),
            address,
            address6: None,
            endpoints: vec![endpoint.parse().unwrap()],
            observed: None,
            nat: None,
        };
        let (ka, kb) = (self.a.public_key(), self.b.public_key());
        self.a
            .set_peers(&[peer(kb, "b", B_OVERLAY, B_UNDERLAY)], self.now);
        self.b
            .set_peers(&[peer(ka, "a", A_OVERLAY, A_UNDERLAY)], self.now);
    }

    fn flood_now(&mut self) {
        let from: SocketAddr = STRANGER.parse().unwrap();
        for _ in 0..FLOOD_BATCH {
            let init = &self.flood[self.flooded % self.flood.len()];
            self.b.handle_datagram(Source::main(from), init, self.now);
            self.flooded += 1;
        }
        self.next_flood = self.now + FLOOD_TICK;
    }

    /// Delivers everything the nodes want sent (no latency, no loss) until both are quiet.
    fn exchange(&mut self) {
        let (a_addr, b_addr): (SocketAddr, SocketAddr) =
            (A_UNDERLAY.parse().unwrap(), B_UNDERLAY.parse().unwrap());
        let stranger: SocketAddr = STRANGER.parse().unwrap();
        loop {
            let mut moved = false;
            while let Some(t) = self.a.poll_transmit() {
                moved = true;
                let Destination::Udp { socket, dst } = t.destination else {
                    panic!("no relay here")
                };
                assert_eq!(socket, SocketId::MAIN);
                for d in t.segments() {
                    if dst == b_addr {
                        self.b.handle_datagram(Source::main(a_addr), d, self.now);
                    }
                }
            }
            while let Some(t) = self.b.poll_transmit() {
                moved = true;
                let Destination::Udp { dst, .. } = t.destination else {
                    panic!("no relay here")
                };
                for d in t.segments() {
                    let cookie = d.len() == 64 && d[..4] == [3, 0, 0, 0];
                    if dst == a_addr {
                        self.cookies_to_a += usize::from(cookie);
                        self.a.handle_datagram(Source::main(b_addr), d, self.now);
                    } else if dst == stranger {
                        self.cookies_to_stranger += usize::from(cookie);
                    }
                }
            }
            while let Some(p) = self.a.poll_tun_packet() {
                self.a_tun.push(p);
            }
            while let Some(p) = self.b.poll_tun_packet() {
                self.b_tun.push(p);
            }
            while self.a.poll_event().is_some() {}
            while self.b.poll_event().is_some() {}
            if !moved {
                break;
            }
        }
    }

    /// Runs the virtual clock to `until`: node timers, and the flood every [`FLOOD_TICK`].
    fn run_until(&mut self, until: Instant) {
        loop {
            self.exchange();
            let mut next = until;
            for t in [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
            {
                next = next.min(t);
            }
            if !self.flood.is_empty() {
                next = next.min(self.next_flood);
            }
            if next >= until {
                self.now = until;
                return;
            }
            self.now = next.max(self.now);
            if !self.flood.is_empty() && self.now >= self.next_flood {
                self.flood_now();
            }
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
        }
    }

    fn send_a_to_b(&mut self, payload: &[u8]) {
        let p = udp_packet(A_OVERLAY, B_OVERLAY, payload);
        self.a.handle_tun_packet(&p, self.now);
    }

    fn send_b_to_a(&mut self, payload: &[u8]) {
        let p = udp_packet(B_OVERLAY, A_OVERLAY, payload);
        self.b.handle_tun_packet(&p, self.now);
    }

    fn b_got(&self, payload: &[u8]) -> bool {
        self.b_tun.iter().any(|p| p.ends_with(payload))
    }

    fn a_got(&self, payload: &[u8]) -> bool {
        self.a_tun.iter().any(|p| p.ends_with(payload))
    }
}

#[test]
fn members_handshake_and_talk_through_a_stranger_flood() {
    let mut lab = Lab::new(true);
    // The flood runs for a second first: B's DH budget is spent long before A shows up.
    let t = lab.now + Duration::from_secs(1);
    lab.run_until(t);
    let c = lab.b.status(lab.now).counters;
    assert!(
        c.over_budget_handshakes > 0,
        "the flood spent the budget: {c:?}"
    );
    assert_eq!(c.bad_mac1_packets, 0, "the flood's mac1 is valid");
    // Only a few cookie replies reach the one flooding address.
    assert!(
        lab.cookies_to_stranger <= 8,
        "cookie replies to the stranger: {}",
        lab.cookies_to_stranger
    );

    // A shows up right after a flood batch has taken what the budget refilled.
    lab.flood_now();
    lab.connect();
    lab.send_a_to_b(b"hello b");
    let started = lab.now;
    // A's first initiation gets a cookie reply; its retry after REKEY_TIMEOUT carries mac2.
    let t = lab.now + REKEY_TIMEOUT + Duration::from_secs(2);
    lab.run_until(t);
    assert!(
        lab.cookies_to_a >= 1,
        "A's initiation was answered with a cookie"
    );
    assert!(
        lab.b_got(b"hello b"),
        "B got A's packet within {:?} of flood",
        lab.now - started
    );
    lab.send_b_to_a(b"hello a");
    let t = lab.now + Duration::from_millis(100);
    lab.run_until(t);
    assert!(lab.a_got(b"hello a"), "A got B's answer");

    // The session keeps working while the flood goes on.
    for i in 0..20u8 {
        let t = lab.now + Duration::from_millis(500);
        lab.run_until(t);
        lab.send_a_to_b(&[b'x', i]);
        lab.send_b_to_a(&[b'y', i]);
    }
    let t = lab.now + Duration::from_millis(100);
    lab.run_until(t);
    for i in 0..20u8 {
        assert!(lab.b_got(&[b'x', i]) && lab.a_got(&[b'y', i]), "packet {i}");
    }
    let c = lab.b.status(lab.now).counters;
    assert!(c.cookie_replies_sent >= 1);
    assert!(lab.flooded >= 100_000, "flooded {}", lab.flooded);
    // What the stranger's flood cost B in DH: what the budget lets through, not the flood.
    let budget = 2048 + 200 * (lab.now - lab.start).as_secs() as usize + 200;
    assert!(
        c.unknown_peer_packets as usize <= budget,
        "stranger initiations that reached the DH: {} of {} (budget {budget})",
        c.unknown_peer_packets,
        lab.flooded
    );
}

#[test]
fn without_a_flood_the_first_initiation_gets_in() {
    let mut lab = Lab::new(false);
    lab.connect();
    lab.send_a_to_b(b"hello b");
    let t = lab.now + Duration::from_millis(100);
    lab.run_until(t);
    assert!(lab.b_got(b"hello b"));
    assert_eq!(lab.cookies_to_a, 0);
    let c = lab.b.status(lab.now).counters;
    assert_eq!(
        (
            c.bad_mac1_packets,
            c.over_budget_handshakes,
            c.cookie_replies_sent
        ),
        (0, 0, 0)
    );
}
