#![allow(clippy::unwrap_used)]
//! In-process simulation of many mesh nodes on a virtual clock.
//!
//! Every node is a real [`mesh_core::Node`] with real WireGuard sessions; the network between
//! them is the shared model in `simnet` (per-link latency, seeded random loss, documentation
//! addresses), here with every node public and no NAT (see `sim_nat.rs` for NATs). The clock
//! jumps to the next event (a delivery or the earliest `poll_timeout`), so a run of minutes of
//! virtual time takes well under a second per dozen nodes, and the same seed gives the same run.

mod simnet;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use simnet::{all_pairs, overlay, Sim, INTERNET, NODE_PORT};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

fn underlay(i: usize) -> SocketAddr {
    // 192.0.2.0/24 and 198.51.100.0/24, then 203.0.113.0/24: up to 762 nodes, all on the
    // internet realm (no NAT in this file).
    let (net, host) = (i / 254, (i % 254) + 1);
    let ip = match net {
        0 => Ipv4Addr::new(192, 0, 2, host as u8),
        1 => Ipv4Addr::new(198, 51, 100, host as u8),
        _ => Ipv4Addr::new(203, 0, 113, host as u8),
    };
    SocketAddr::from((ip, NODE_PORT))
}

impl Sim {
    /// `n` public nodes at `underlay(i)`, each knowing all the others.
    fn new(n: usize, seed: u64, loss: f64) -> Sim {
        let mut sim = Sim::empty(seed, loss);
        for i in 0..n {
            sim.add_node_at(INTERNET, underlay(i));
        }
        sim.connect();
        sim
    }
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
        let peers = sim.nodes[i].node.status(sim.now).peers;
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
        let st = sim.nodes[*a].node.status(sim.now).peers;
        let p = st.iter().find(|p| p.address == overlay(*b)).unwrap();
        eprintln!(
            "{a}->{b}: {:?} counters {:?}",
            p,
            sim.nodes[*a].node.status(sim.now).counters
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

#[test]
fn an_idle_network_wakes_its_nodes_rarely() {
    // Every pair talks, then the network goes quiet for two minutes: an idle peer's timers run
    // only for its keepalives (every 25 s per peer, on a 1 s grid) and at its session's rekey
    // and expiry ages, nothing in between. A 250 ms sweep woke each node 480 times, a 1 s idle
    // tick about 100, a 5 s one 24.
    let mut sim = Sim::new(8, 21, 0.0);
    assert!(all_pairs(&mut sim, 2).is_empty());
    sim.run_for(Duration::from_secs(30));
    let before: Vec<(u64, u64)> = sim
        .nodes
        .iter()
        .map(|n| (n.io.wakes, n.node.status(sim.now).counters.peer_timer_runs))
        .collect();
    sim.run_for(Duration::from_secs(120));
    for (i, n) in sim.nodes.iter().enumerate() {
        let wakes = n.io.wakes - before[i].0;
        let runs = n.node.status(sim.now).counters.peer_timer_runs - before[i].1;
        eprintln!("node {i}: {wakes} wake-ups, {runs} peer timer runs in 120 idle seconds");
        // (WireGuard's timers run on the simulated clock: the passive keepalive a peer sends
        // 10 s after data it did not answer moves that peer's 25 s keepalive phase by 10 s, so
        // a node's keepalives fall into two groups on the grid instead of one: up to twice the
        // wake-ups of a single group, 10 with boringtun's timers on the wall clock.)
        assert!(
            wakes <= 20,
            "node {i} woke {wakes} times in 120 idle seconds"
        );
        // Seven peers, each with about five keepalives in two minutes and a session age or two.
        assert!(
            runs <= 7 * 8,
            "node {i} ran its peers' timers {runs} times in 120 idle seconds"
        );
    }
    // Still connected.
    sim.clear_replies();
    assert!(all_pairs(&mut sim, 2).is_empty());
}
