#![allow(clippy::unwrap_used)]
//! NAT traversal on the simulated network (`simnet`): real [`mesh_core::Node`]s behind
//! full-cone, port-restricted, symmetric, UDP-blocking and double NATs, on a virtual clock with
//! seeded loss and NAT mapping timeouts.
//!
//! There is no relay yet, so every echo reply here came over a direct path. The tests assert
//! what direct connectivity gives, including the pairs that must NOT connect (the relay's job).

mod simnet;

use mesh_core::Transmit;
use simnet::{all_pairs, pairs_among, pairs_until_answered, Behaviour, Sim};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Pings `a -> b` once a second for up to `secs` seconds; whether a reply came back.
fn ping_for(sim: &mut Sim, a: usize, b: usize, secs: u16) -> bool {
    let before = sim.nodes[a].replies.len();
    for s in 0..secs {
        sim.ping(a, b, 1000 + s);
        sim.run_for(Duration::from_secs(1));
        if sim.nodes[a].replies[before..]
            .iter()
            .any(|(src, _)| *src == sim.nodes[b].overlay)
        {
            return true;
        }
    }
    false
}

/// Nodes of the given behaviours, each on its own new site.
fn sites(sim: &mut Sim, kinds: &[Behaviour]) -> Vec<usize> {
    kinds.iter().map(|k| sim.add_node_behind(*k)).collect()
}

fn cone_mix(seed: u64, loss: f64) -> Sim {
    let mut sim = Sim::empty(seed, loss);
    for k in [
        Behaviour::Public,
        Behaviour::FullCone,
        Behaviour::PortRestricted,
    ] {
        for _ in 0..3 {
            sim.add_node_behind(k);
        }
    }
    sim.connect();
    sim
}

#[test]
fn public_full_cone_and_port_restricted_all_connect_directly() {
    let mut sim = cone_mix(1, 0.0);
    let candidates = sim.peer_configs();
    let all: Vec<usize> = (0..sim.nodes.len()).collect();
    let (took, missing) = pairs_until_answered(&mut sim, &all, 10);
    eprintln!("lossless: every pair answered after {took:?}");
    assert!(missing.is_empty(), "no reply for {missing:?}");
    // Lossless, the first ping of every pair is answered.
    assert_eq!(took, Duration::from_secs(1));
    // Everyone talks to everyone on the reflexive address the controller saw (EIM: one external
    // port per node, whoever it talks to).
    for a in 0..sim.nodes.len() {
        for (b, peer) in candidates.iter().enumerate() {
            if a != b {
                assert_eq!(sim.endpoint(a, b), Some(peer.endpoints[0]), "{a} -> {b}");
            }
        }
    }
}

#[test]
fn public_full_cone_and_port_restricted_all_connect_with_five_percent_loss() {
    let mut sim = cone_mix(2, 0.05);
    // Handshake retransmission every 5 s on both sides keeps punching.
    let all: Vec<usize> = (0..sim.nodes.len()).collect();
    let (took, missing) = pairs_until_answered(&mut sim, &all, 30);
    eprintln!("5 % loss: every pair answered after {took:?}");
    assert!(missing.is_empty(), "no reply for {missing:?}");
}

#[test]
fn two_nodes_behind_one_nat_use_their_lan_addresses() {
    let mut sim = Sim::empty(3, 0.0);
    let lan = sim.add_site(Behaviour::PortRestricted);
    let a = sim.add_node(lan);
    let b = sim.add_node(lan);
    let p = sim.add_node_behind(Behaviour::Public);
    sim.connect();
    let missing = all_pairs(&mut sim, 3);
    assert!(missing.is_empty(), "no reply for {missing:?}");
    assert_eq!(sim.endpoint(a, b), Some(sim.addr(b)));
    assert_eq!(sim.endpoint(b, a), Some(sim.addr(a)));
    // The reflexive candidate would need hairpinning, which the NAT does not do.
    assert!(sim.net.stats.hairpin > 0);
    // Outside, the two are one public address with two ports.
    let (ea, eb) = (sim.endpoint(p, a).unwrap(), sim.endpoint(p, b).unwrap());
    assert_eq!(ea.ip(), eb.ip());
    assert_ne!(ea.port(), eb.port());
    assert_eq!(
        ea.ip(),
        std::net::IpAddr::V4(sim.net.nat_public(lan).unwrap())
    );
}

/// Who got echo replies from whom, as text: one row per node, `D` direct, `-` no path.
fn matrix(sim: &Sim, labels: &[String]) -> String {
    let mut s = format!("{:5}", "a\\b");
    for l in labels {
        s.push_str(&format!(" {l:>4}"));
    }
    s.push('\n');
    for (a, la) in labels.iter().enumerate() {
        s.push_str(&format!("{la:5}"));
        for b in 0..labels.len() {
            let c = if a == b {
                "."
            } else if sim.replied(a, b) {
                "D"
            } else {
                "-"
            };
            s.push_str(&format!(" {c:>4}"));
        }
        s.push('\n');
    }
    s
}

/// Two nodes of every behaviour, each on its own site, plus two nodes on one shared
/// port-restricted LAN.
fn zoo(seed: u64, loss: f64) -> (Sim, Vec<String>) {
    let mut sim = Sim::empty(seed, loss);
    let mut labels = Vec::new();
    for k in Behaviour::ALL {
        for n in 0..2 {
            sim.add_node_behind(k);
            labels.push(format!("{}{n}", k.label()));
        }
    }
    let lan = sim.add_site(Behaviour::PortRestricted);
    for n in 0..2 {
        sim.add_node(lan);
        labels.push(format!("lan{n}"));
    }
    sim.connect();
    (sim, labels)
}

const EXPECTED_MATRIX: &str = "\
a\\b   pub0 pub1  fc0  fc1  pr0  pr1 sym0 sym1 blk0 blk1 dbl0 dbl1 lan0 lan1
pub0     .    D    D    D    D    D    D    D    -    -    D    D    D    D
pub1     D    .    D    D    D    D    D    D    -    -    D    D    D    D
fc0      D    D    .    D    D    D    D    D    -    -    D    D    D    D
fc1      D    D    D    .    D    D    D    D    -    -    D    D    D    D
pr0      D    D    D    D    .    D    -    -    -    -    D    D    D    D
pr1      D    D    D    D    D    .    -    -    -    -    D    D    D    D
sym0     D    D    D    D    -    -    .    -    -    -    -    -    -    -
sym1     D    D    D    D    -    -    -    .    -    -    -    -    -    -
blk0     -    -    -    -    -    -    -    -    .    -    -    -    -    -
blk1     -    -    -    -    -    -    -    -    -    .    -    -    -    -
dbl0     D    D    D    D    D    D    -    -    -    -    .    D    D    D
dbl1     D    D    D    D    D    D    -    -    -    -    D    .    D    D
lan0     D    D    D    D    D    D    -    -    -    -    D    D    .    D
lan1     D    D    D    D    D    D    -    -    -    -    D    D    D    .
";

#[test]
fn matrix_of_all_kinds() {
    for (seed, loss, secs) in [(4, 0.0, 20), (14, 0.05, 30)] {
        let (mut sim, labels) = zoo(seed, loss);
        all_pairs(&mut sim, secs);
        let got = matrix(&sim, &labels);
        eprintln!(
            "direct connectivity, {}% loss, after {secs} virtual seconds \
             (row pinged column; D = direct, - = no path):\n{got}{:?}\n",
            loss * 100.0,
            sim.net.stats
        );
        assert_eq!(got, EXPECTED_MATRIX);
    }
}

#[test]
fn symmetric_reaches_public_and_full_cone_only() {
    use Behaviour::*;
    let mut sim = Sim::empty(5, 0.0);
    let n = sites(
        &mut sim,
        &[Symmetric, Symmetric, Public, FullCone, PortRestricted],
    );
    let (s0, s1, public, cone, restricted) = (n[0], n[1], n[2], n[3], n[4]);
    let candidates = sim.peer_configs();
    sim.set_peers(&candidates);
    let mut missing = all_pairs(&mut sim, 20);
    missing.sort();
    let mut expected = vec![
        // Symmetric <-> Symmetric: each side's packets leave on a port made for that
        // destination, which the other side's NAT never sent to. The relay's job.
        (s0, s1),
        (s1, s0),
        // Symmetric <-> PortRestricted: without port prediction the restricted side only
        // accepts the symmetric side's controller-facing port, and the symmetric NAT only
        // lets the controller in on that port. No direct path either.
        (s0, restricted),
        (restricted, s0),
        (s1, restricted),
        (restricted, s1),
    ];
    expected.sort();
    assert_eq!(missing, expected);
    // The public and full-cone nodes reach the symmetric node on a port the controller never
    // saw: the one its NAT opened towards them, learned from its authenticated packets.
    for s in [s0, s1] {
        for other in [public, cone] {
            let e = sim.endpoint(other, s).unwrap();
            assert!(
                !candidates[s].endpoints.contains(&e),
                "{other} -> {s} uses {e}"
            );
            assert_eq!(sim.endpoint(s, other), Some(candidates[other].endpoints[0]));
        }
    }
}

#[test]
fn udp_blocked_reaches_nobody() {
    use Behaviour::*;
    let mut sim = Sim::empty(6, 0.0);
    let n = sites(
        &mut sim,
        &[UdpBlocked, UdpBlocked, Public, FullCone, PortRestricted],
    );
    sim.connect();
    let missing = all_pairs(&mut sim, 10);
    for a in 0..n.len() {
        for b in 0..n.len() {
            let blocked = a < 2 || b < 2;
            assert_eq!(
                missing.contains(&(n[a], n[b])),
                blocked && a != b,
                "{a} -> {b}"
            );
        }
    }
    for b in [n[0], n[1]] {
        assert!(sim.nodes[b]
            .node
            .peer_status(sim.now)
            .iter()
            .all(|p| p.endpoint.is_none() && p.rx_bytes == 0));
    }
    assert!(sim.net.stats.blocked > 0);
}

/// A public node and one behind a port-restricted NAT, connected.
fn public_and_restricted(seed: u64, keepalive: Option<u16>) -> (Sim, usize, usize) {
    let mut sim = Sim::empty(seed, 0.0);
    sim.keepalive = keepalive;
    let public = sim.add_node_behind(Behaviour::Public);
    let natted = sim.add_node_behind(Behaviour::PortRestricted);
    sim.connect();
    assert!(pairs_among(&mut sim, &[public, natted], 3).is_empty());
    (sim, public, natted)
}

#[test]
fn idle_mapping_expires_without_keepalive_until_the_inside_sends() {
    let (mut sim, public, natted) = public_and_restricted(7, None);
    let lan = sim.net.realm_of(sim.nodes[natted].host);
    let before = sim.endpoint(public, natted).unwrap();
    // Twice the NAT timeout of silence: nothing refreshes the mapping.
    let sent = sim.net.stats.sent;
    sim.run_for(Duration::from_secs(60));
    assert_eq!(
        sim.net.stats.sent, sent,
        "keepalive off: nothing on the wire"
    );
    assert_eq!(sim.net.live_mappings(lan, sim.now), 0);
    // The public side cannot get in any more, even after its stale-session handshake (15 s)
    // goes to every candidate.
    let dropped = sim.net.stats.no_mapping;
    assert!(!ping_for(&mut sim, public, natted, 25));
    assert!(sim.net.stats.no_mapping > dropped);
    // Traffic from the inside opens a new mapping (a new port: no port preservation); the
    // public side follows it from the first authenticated packet.
    assert!(ping_for(&mut sim, natted, public, 2));
    let after = sim.endpoint(public, natted).unwrap();
    assert_eq!(after.ip(), before.ip());
    assert_ne!(after.port(), before.port());
    assert!(ping_for(&mut sim, public, natted, 2));
}

#[test]
fn default_keepalive_holds_the_mapping_across_five_minutes_of_silence() {
    let (mut sim, public, natted) = public_and_restricted(8, Some(25));
    assert_eq!(sim.nat_timeout, Duration::from_secs(30));
    let before = sim.endpoint(public, natted).unwrap();
    sim.run_for(Duration::from_secs(300));
    let lan = sim.net.realm_of(sim.nodes[natted].host);
    assert_eq!(
        sim.net.live_mappings(lan, sim.now),
        1,
        "keepalives every 25 s hold the mapping: {:?}",
        sim.net.stats
    );
    // The first ping from outside gets through at once, on the same mapping.
    assert!(ping_for(&mut sim, public, natted, 1));
    assert_eq!(sim.endpoint(public, natted), Some(before));
}

#[test]
fn same_seed_same_run_with_nats_and_loss() {
    let run = |seed| {
        let (mut sim, _) = zoo(seed, 0.1);
        let missing = all_pairs(&mut sim, 10);
        (sim.transcript, missing, sim.net.stats)
    };
    let (t1, m1, s1) = run(9);
    let (t2, m2, s2) = run(9);
    assert!(t1.len() > 500);
    assert!(s1.lost > 0 && s1.filtered > 0 && s1.blocked > 0);
    assert_eq!(m1, m2);
    assert_eq!(s1, s2);
    assert_eq!(t1, t2, "same seed must give the same transcript");
    let (t3, _, _) = run(10);
    assert_ne!(t1, t3, "another seed gives another run");
}

#[test]
fn two_subscribers_of_one_cgnat_have_no_direct_path_without_hairpinning() {
    let mut sim = Sim::empty(11, 0.0);
    let t = sim.nat_timeout;
    let cgnat = sim
        .net
        .add_nat(simnet::INTERNET, simnet::NatConfig::port_restricted(t));
    let home_a = sim
        .net
        .add_nat(cgnat, simnet::NatConfig::port_restricted(t));
    let home_b = sim
        .net
        .add_nat(cgnat, simnet::NatConfig::port_restricted(t));
    let a = sim.add_node(home_a);
    let b = sim.add_node(home_b);
    let p = sim.add_node_behind(Behaviour::Public);
    sim.connect();
    let missing = all_pairs(&mut sim, 10);
    // Both reflexive addresses are the CGNAT's public address, which it does not hairpin; their
    // LAN addresses are in two different home LANs.
    assert_eq!(missing, vec![(a, b), (b, a)]);
    assert!(sim.net.stats.hairpin > 0);
    assert_eq!(
        sim.endpoint(p, a).unwrap().ip(),
        sim.endpoint(p, b).unwrap().ip()
    );
}

/// Two nodes behind port-restricted NATs, keepalive off, connected and then idle for twice the
/// NAT timeout.
fn restricted_pair_gone_idle(seed: u64, controller: Option<Duration>) -> (Sim, usize, usize) {
    let mut sim = Sim::empty(seed, 0.0);
    sim.keepalive = None;
    sim.set_controller_keepalive(controller);
    let a = sim.add_node_behind(Behaviour::PortRestricted);
    let b = sim.add_node_behind(Behaviour::PortRestricted);
    sim.connect();
    assert!(pairs_among(&mut sim, &[a, b], 3).is_empty());
    sim.run_for(Duration::from_secs(60));
    sim.clear_replies();
    (sim, a, b)
}

#[test]
fn restricted_pair_with_both_mappings_expired_needs_fresh_candidates() {
    let (mut sim, a, b) = restricted_pair_gone_idle(12, None);
    // Both sides have traffic, but each NAT hands out a new port and filters the other's new
    // port; the handshakes after the stale-session timeout go to the old candidates.
    let missing = pairs_among(&mut sim, &[a, b], 25);
    assert_eq!(missing, vec![(a, b), (b, a)]);
    // The controller sees the new reflexive addresses and sends them out: both sides' handshake
    // retransmissions now go to the right ports and punch through.
    sim.connect();
    let (took, missing) = pairs_until_answered(&mut sim, &[a, b], 15);
    eprintln!("recovered {took:?} after fresh candidates");
    assert!(missing.is_empty(), "no reply for {missing:?}");
}

#[test]
fn restricted_pair_recovers_from_traffic_when_control_traffic_keeps_the_ports() {
    let (mut sim, a, b) = restricted_pair_gone_idle(13, Some(Duration::from_secs(15)));
    let before = (sim.endpoint(a, b), sim.endpoint(b, a));
    // The ports survived (the control connection refreshed them) but the filter entries for
    // the peer did not: one side alone cannot get in.
    assert!(!ping_for(&mut sim, a, b, 3));
    // Once both sides send, each opens its own filter for the other and the pair recovers on
    // the same addresses.
    let missing = pairs_among(&mut sim, &[a, b], 3);
    assert!(missing.is_empty(), "no reply for {missing:?}");
    assert_eq!((sim.endpoint(a, b), sim.endpoint(b, a)), before);
}

/// Answers every datagram with the source address it saw, like a STUN server.
struct Reflector;

impl simnet::Service for Reflector {
    fn handle_datagram(
        &mut self,
        from: SocketAddr,
        _payload: &[u8],
        _now: Instant,
        out: &mut Vec<Transmit>,
    ) {
        out.push(Transmit {
            dst: from,
            payload: from.to_string().into_bytes(),
        });
    }
}

/// Sends one datagram to `target` at its first timer and keeps what comes back.
struct Probe {
    target: SocketAddr,
    due: Option<Instant>,
    got: Rc<RefCell<Vec<String>>>,
}

impl simnet::Service for Probe {
    fn handle_datagram(
        &mut self,
        _from: SocketAddr,
        payload: &[u8],
        _now: Instant,
        _out: &mut Vec<Transmit>,
    ) {
        self.got
            .borrow_mut()
            .push(String::from_utf8_lossy(payload).into_owned());
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.due
    }

    fn handle_timeout(&mut self, _now: Instant, out: &mut Vec<Transmit>) {
        self.due = None;
        out.push(Transmit {
            dst: self.target,
            payload: b"?".to_vec(),
        });
    }
}

#[test]
fn a_public_service_sees_what_the_controller_sees_and_passes_an_allow_list() {
    use Behaviour::*;
    let server: SocketAddr = "203.0.113.2:3478".parse().unwrap();
    let mut sim = Sim::empty(15, 0.0);
    sim.add_service(simnet::INTERNET, server, Box::new(Reflector));
    let probe_addr: SocketAddr = "192.0.2.200:4000".parse().unwrap();
    let mut seen = Vec::new();
    for kind in [FullCone, PortRestricted, Symmetric, DoubleNat, UdpBlocked] {
        let lan = sim.add_site(kind);
        if kind == UdpBlocked {
            sim.net.allow_udp(lan, server);
            sim.net.allow_udp(lan, simnet::CONTROLLER);
        }
        let got = Rc::new(RefCell::new(Vec::new()));
        let host = sim.add_service(
            lan,
            probe_addr,
            Box::new(Probe {
                target: server,
                due: Some(sim.now),
                got: got.clone(),
            }),
        );
        let controller_saw = sim.net.observe(host, simnet::CONTROLLER, sim.now).unwrap();
        sim.run_for(Duration::from_millis(200));
        let answer: SocketAddr = got.borrow()[0].parse().unwrap();
        assert_eq!(answer.ip(), controller_saw.ip(), "{kind:?}");
        seen.push((kind, answer == controller_saw));
    }
    // Endpoint-independent mapping shows every server the same port; symmetric does not.
    assert_eq!(
        seen,
        vec![
            (FullCone, true),
            (PortRestricted, true),
            (Symmetric, false),
            (DoubleNat, true),
            (UdpBlocked, true),
        ]
    );
}
