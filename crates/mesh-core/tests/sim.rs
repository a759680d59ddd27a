#![allow(clippy::unwrap_used)]
//! In-process simulation of many mesh nodes on a virtual clock.
//!
//! Every node is a real [`mesh_core::Node`] with real WireGuard sessions; the network between
//! them is a model with per-link latency and seeded random loss, on documentation addresses.
//! The clock jumps to the next event (a delivery or the earliest `poll_timeout`), so a run of
//! minutes of virtual time takes well under a second per dozen nodes, and the same seed gives
//! the same run.

use mesh_core::{Node, NodeConfig, PeerConfig};
use mesh_proto::PublicKey;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;

/// A datagram in flight.
struct InFlight {
    at: Instant,
    seq: u64,
    from: SocketAddr,
    to: SocketAddr,
    payload: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct SimNode {
    node: Node,
    underlay: SocketAddr,
    /// Echo replies received: (peer overlay address, sequence number).
    replies: Vec<(Ipv4Addr, u16)>,
}

struct Sim {
    start: Instant,
    now: Instant,
    nodes: Vec<SimNode>,
    by_underlay: HashMap<SocketAddr, usize>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    rng: SmallRng,
    loss: f64,
    /// (virtual ms, from, to, bytes) of every datagram delivered.
    transcript: Vec<(u128, SocketAddr, SocketAddr, usize)>,
}

fn underlay(i: usize) -> SocketAddr {
    // 192.0.2.0/24 and 198.51.100.0/24, then 203.0.113.0/24: up to 762 nodes.
    let (net, host) = (i / 254, (i % 254) + 1);
    let ip = match net {
        0 => Ipv4Addr::new(192, 0, 2, host as u8),
        1 => Ipv4Addr::new(198, 51, 100, host as u8),
        _ => Ipv4Addr::new(203, 0, 113, host as u8),
    };
    SocketAddr::from((ip, 51820))
}

fn overlay(i: usize) -> Ipv4Addr {
    let n = i as u32 + 1;
    Ipv4Addr::new(100, 64, (n >> 8) as u8, n as u8)
}

fn echo(kind: u8, src: Ipv4Addr, dst: Ipv4Addr, seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 28 + 32];
    p[0] = 0x45;
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20] = kind;
    p[26..28].copy_from_slice(&seq.to_be_bytes());
    p
}

fn addrs(p: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    (
        Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        Ipv4Addr::new(p[16], p[17], p[18], p[19]),
    )
}

impl Sim {
    fn new(n: usize, seed: u64, loss: f64) -> Sim {
        let start = Instant::now();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut secrets = Vec::new();
        let mut peers = Vec::new();
        for i in 0..n {
            let mut sk = [0u8; 32];
            rng.fill(&mut sk);
            let pk = PublicKey(XPublic::from(&StaticSecret::from(sk)).to_bytes());
            secrets.push(sk);
            peers.push(PeerConfig {
                key: pk,
                name: format!("node-{i}"),
                address: overlay(i),
                endpoints: vec![underlay(i)],
            });
        }
        let mut nodes = Vec::new();
        let mut by_underlay = HashMap::new();
        for (i, sk) in secrets.iter().enumerate() {
            let mut node = Node::new(
                NodeConfig {
                    private_key: *sk,
                    address: overlay(i),
                    keepalive: Some(25),
                    mtu: 1420,
                },
                (i as u32) * 4099 + 1,
                start,
            );
            node.set_peers(&peers, start);
            by_underlay.insert(underlay(i), i);
            nodes.push(SimNode {
                node,
                underlay: underlay(i),
                replies: Vec::new(),
            });
        }
        Sim {
            start,
            now: start,
            nodes,
            by_underlay,
            in_flight: BinaryHeap::new(),
            seq: 0,
            rng,
            loss,
            transcript: Vec::new(),
        }
    }

    fn latency(&self, a: SocketAddr, b: SocketAddr) -> Duration {
        // Deterministic per link: 5..45 ms from the two addresses.
        let h = a.ip().to_string().len() * 7 + b.ip().to_string().len() * 13;
        let o = match (a.ip(), b.ip()) {
            (std::net::IpAddr::V4(x), std::net::IpAddr::V4(y)) => {
                usize::from(x.octets()[3]) + usize::from(y.octets()[3])
            }
            _ => 0,
        };
        Duration::from_millis(5 + ((h + o) % 40) as u64)
    }

    /// Moves everything each node wants to do into the network or back into the node.
    fn flush(&mut self, i: usize) {
        loop {
            let mut progressed = false;
            while let Some(t) = self.nodes[i].node.poll_transmit() {
                progressed = true;
                if self.rng.gen_bool(self.loss) {
                    continue;
                }
                let from = self.nodes[i].underlay;
                let at = self.now + self.latency(from, t.dst);
                self.seq += 1;
                self.in_flight.push(Reverse(InFlight {
                    at,
                    seq: self.seq,
                    from,
                    to: t.dst,
                    payload: t.payload,
                }));
            }
            while let Some(pkt) = self.nodes[i].node.poll_tun_packet() {
                progressed = true;
                // Play the peer's IP stack: answer echo requests, record replies.
                let (src, dst) = addrs(&pkt);
                let seq = u16::from_be_bytes([pkt[26], pkt[27]]);
                if pkt[20] == ECHO_REQUEST {
                    let reply = echo(ECHO_REPLY, dst, src, seq);
                    self.nodes[i].node.handle_tun_packet(&reply, self.now);
                } else {
                    self.nodes[i].replies.push((src, seq));
                }
            }
            while self.nodes[i].node.poll_event().is_some() {}
            if !progressed {
                break;
            }
        }
    }

    fn ping(&mut self, from: usize, to: usize, seq: u16) {
        let p = echo(ECHO_REQUEST, overlay(from), overlay(to), seq);
        self.nodes[from].node.handle_tun_packet(&p, self.now);
        self.flush(from);
    }

    /// Advances virtual time up to `until`, processing deliveries and timers in order.
    fn run_until(&mut self, until: Instant) {
        loop {
            let next_delivery = self.in_flight.peek().map(|r| r.0.at);
            let next_timer = self
                .nodes
                .iter()
                .filter_map(|n| n.node.poll_timeout())
                .min();
            let next = match (next_delivery, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => until,
            };
            if next > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(next);
            while self.in_flight.peek().is_some_and(|r| r.0.at <= self.now) {
                let Some(Reverse(d)) = self.in_flight.pop() else {
                    break;
                };
                let Some(&j) = self.by_underlay.get(&d.to) else {
                    continue;
                };
                self.transcript.push((
                    d.at.duration_since(self.start).as_millis(),
                    d.from,
                    d.to,
                    d.payload.len(),
                ));
                self.nodes[j]
                    .node
                    .handle_datagram(d.from, &d.payload, self.now);
                self.flush(j);
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i]
                    .node
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now)
                {
                    self.nodes[i].node.handle_timeout(self.now);
                    self.flush(i);
                }
            }
        }
    }

    fn replied(&self, from: usize, to: usize) -> bool {
        self.nodes[from]
            .replies
            .iter()
            .any(|(src, _)| *src == overlay(to))
    }
}

/// Pings every ordered pair (with application retries each second, as `ping` does) and returns
/// the pairs that never got an answer.
fn all_pairs(sim: &mut Sim, attempts: u16) -> Vec<(usize, usize)> {
    let n = sim.nodes.len();
    for attempt in 0..attempts {
        for a in 0..n {
            for b in 0..n {
                if a != b && !sim.replied(a, b) {
                    sim.ping(a, b, attempt);
                }
            }
        }
        let t = sim.now + Duration::from_secs(1);
        sim.run_until(t);
    }
    let mut missing = Vec::new();
    for a in 0..n {
        for b in 0..n {
            if a != b && !sim.replied(a, b) {
                missing.push((a, b));
            }
        }
    }
    missing
}

#[test]
fn fifty_nodes_every_pair_pings() {
    let mut sim = Sim::new(50, 7, 0.0);
    let missing = all_pairs(&mut sim, 3);
    assert!(missing.is_empty(), "no reply for {missing:?}");
    // The first attempt suffices on a lossless network: one request per ordered pair.
    let underlay_of: HashMap<Ipv4Addr, SocketAddr> =
        (0..50).map(|i| (overlay(i), underlay(i))).collect();
    for i in 0..50 {
        let peers = sim.nodes[i].node.peer_status(sim.now);
        assert_eq!(peers.len(), 49);
        for p in peers {
            assert_eq!(
                p.endpoint,
                Some(underlay_of[&p.address]),
                "endpoint of {}",
                p.name
            );
        }
    }
}

#[test]
fn sixty_nodes_with_ten_percent_loss_all_connect() {
    let mut sim = Sim::new(60, 11, 0.10);
    // Handshake retransmission (REKEY_TIMEOUT 5 s) runs on the virtual clock; 30 virtual seconds
    // of retries is enough for every pair at 10 % loss.
    let missing = all_pairs(&mut sim, 30);
    for (a, b) in &missing {
        let st = sim.nodes[*a].node.peer_status(sim.now);
        let p = st.iter().find(|p| p.address == overlay(*b)).unwrap();
        eprintln!(
            "{a}->{b}: {:?} counters {:?}",
            p,
            sim.nodes[*a].node.counters()
        );
    }
    assert!(missing.is_empty(), "no reply for {missing:?}");
}

#[test]
fn three_hundred_nodes_sparse_traffic() {
    let n = 300;
    let mut sim = Sim::new(n, 3, 0.0);
    let mut rng = SmallRng::seed_from_u64(99);
    let mut pairs = Vec::new();
    for a in 0..n {
        for _ in 0..3 {
            let b = rng.gen_range(0..n);
            if a != b {
                pairs.push((a, b));
            }
        }
    }
    for (a, b) in &pairs {
        sim.ping(*a, *b, 1);
    }
    let t = sim.now + Duration::from_secs(2);
    sim.run_until(t);
    for (a, b) in pairs {
        assert!(sim.replied(a, b), "node {a} got no reply from {b}");
    }
}

#[test]
fn same_seed_same_run() {
    let run = |seed| {
        let mut sim = Sim::new(12, seed, 0.2);
        let missing = all_pairs(&mut sim, 20);
        (sim.transcript, missing)
    };
    let (t1, m1) = run(5);
    let (t2, m2) = run(5);
    assert_eq!(m1, m2);
    assert!(t1.len() > 100);
    assert_eq!(t1, t2, "same seed must give the same transcript");
    let (t3, _) = run(6);
    assert_ne!(t1, t3, "another seed gives another run");
}

#[test]
fn removed_peer_is_cut_off_while_others_continue() {
    let mut sim = Sim::new(5, 1, 0.0);
    assert!(all_pairs(&mut sim, 2).is_empty());
    // Node 0 removes node 4 (as after `mesh-controller node remove`).
    let gone = sim.nodes[4].node.public_key();
    sim.nodes[0].node.remove_peer(&gone);
    sim.nodes[0].replies.clear();
    sim.ping(0, 4, 100);
    sim.ping(0, 1, 100);
    let t = sim.now + Duration::from_secs(2);
    sim.run_until(t);
    assert!(!sim.replied(0, 4));
    assert!(sim.replied(0, 1));
    // Node 4 can no longer reach node 0 either: its packets are refused as unknown.
    sim.nodes[4].replies.clear();
    sim.ping(4, 0, 101);
    let t = sim.now + Duration::from_secs(2);
    sim.run_until(t);
    assert!(!sim.replied(4, 0));
}
