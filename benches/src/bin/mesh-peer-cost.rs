//! What one peer costs a node: memory, and wake-ups while nothing happens.
//!
//! `mesh-peer-cost [PEERS]` (default 1,000) builds a hub node and PEERS remote nodes in one
//! process (virtual clock, datagrams handed over in memory), establishes a WireGuard session
//! between the hub and every remote, then lets the network sit idle for ten virtual minutes.
//! It prints:
//!
//! - the hub's memory per peer: configured (peer table, boringtun state before a handshake)
//!   and with a session (after the handshake), as growth of the process's resident memory.
//!   The remotes are built first and measured apart; a session adds the same state on both
//!   sides of a pair, so the hub's share of the handshake phase is half of what it adds in all;
//! - the hub's wake-ups in ten idle minutes, and in how many of them each peer had work.
//!
//! Release build: `cargo run --release -p mesh-benches --bin mesh-peer-cost -- 1000`.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use mesh_core::{Destination, Node, NodeConfig, Output, PeerConfig, Source};
use mesh_proto::PublicKey;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

/// Resident memory of this process, in bytes (`VmRSS`). Growth of it across a phase is what
/// the phase cost the host; with a thousand peers, allocator slack is small beside it.
fn in_use() -> isize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kb| kb.parse::<isize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn secret(i: u32) -> [u8; 32] {
    // Bytes 4..8: X25519 clamps the low bits of byte 0 away.
    let mut s = [7u8; 32];
    s[4..8].copy_from_slice(&(i + 1).to_le_bytes());
    s
}

fn public(s: [u8; 32]) -> PublicKey {
    PublicKey(XPublic::from(&StaticSecret::from(s)).to_bytes())
}

/// Remote `i`'s underlay address (198.51.100.0/24 and 203.0.113.0/24, then ports).
fn underlay(i: u32) -> SocketAddr {
    let ip = if i.is_multiple_of(2) {
        Ipv4Addr::new(198, 51, 100, (i / 2 % 250) as u8 + 1)
    } else {
        Ipv4Addr::new(203, 0, 113, (i / 2 % 250) as u8 + 1)
    };
    SocketAddr::new(ip.into(), 40000 + (i / 500) as u16)
}

fn overlay(i: u32) -> Ipv4Addr {
    let n = i + 2;
    Ipv4Addr::new(100, 64, (n >> 8) as u8, n as u8)
}

fn config(private_key: [u8; 32], address: Ipv4Addr) -> NodeConfig {
    NodeConfig {
        private_key,
        address,
        keepalive: None,
        mtu: 1420,
    }
}

struct Net {
    hub: Node,
    hub_addr: SocketAddr,
    remotes: Vec<Node>,
    by_addr: HashMap<SocketAddr, usize>,
    now: Instant,
}

impl Net {
    /// Hands every pending datagram over until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            while let Some(out) = self.hub.poll_output() {
                if let Output::Transmit(t) = out {
                    if let Destination::Udp { dst, .. } = t.destination {
                        if let Some(&r) = self.by_addr.get(&dst) {
                            for d in t.segments() {
                                self.remotes[r].handle_datagram(
                                    Source::main(self.hub_addr),
                                    d,
                                    self.now,
                                );
                            }
                            moved = true;
                        }
                    }
                    self.hub.recycle(t.contents);
                }
            }
            for (i, r) in self.remotes.iter_mut().enumerate() {
                while let Some(out) = r.poll_output() {
                    if let Output::Transmit(t) = out {
                        if matches!(t.destination, Destination::Udp { dst, .. } if dst == self.hub_addr)
                        {
                            for d in t.segments() {
                                self.hub.handle_datagram(
                                    Source::main(underlay(i as u32)),
                                    d,
                                    self.now,
                                );
                            }
                            moved = true;
                        }
                        r.recycle(t.contents);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Runs every node's timers that are due at `now`.
    fn tick(&mut self) -> bool {
        let mut hub_woke = false;
        if self.hub.poll_timeout().is_some_and(|t| t <= self.now) {
            self.hub.handle_timeout(self.now);
            hub_woke = true;
        }
        for r in &mut self.remotes {
            if r.poll_timeout().is_some_and(|t| t <= self.now) {
                r.handle_timeout(self.now);
            }
        }
        self.settle();
        hub_woke
    }

    /// The hub's counters now.
    fn hub_counters(&self) -> mesh_core::Counters {
        self.hub.status(self.now).counters
    }

    fn next_deadline(&self) -> Option<Instant> {
        std::iter::once(&self.hub)
            .chain(self.remotes.iter())
            .filter_map(Node::poll_timeout)
            .min()
    }
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let start = Instant::now();
    let hub_secret = [0u8; 32];
    let hub_key = public(hub_secret);
    let hub_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let hub_overlay = Ipv4Addr::new(100, 64, 0, 1);

    // The remotes first, each knowing the hub only.
    let hub_entry = PeerConfig {
        routes: Vec::new(),
        key: hub_key,
        name: "hub".into(),
        address: hub_overlay,
        address6: None,
        endpoints: vec![hub_addr],
        observed: None,
        nat: None,
    };
    let before_remotes = in_use();
    let mut remotes = Vec::with_capacity(n as usize);
    let mut entries = Vec::with_capacity(n as usize);
    let mut by_addr = HashMap::new();
    for i in 0..n {
        let s = secret(i);
        let mut r = Node::new(config(s, overlay(i)), 1000 + i, start);
        r.set_peers(std::slice::from_ref(&hub_entry), start);
        remotes.push(r);
        entries.push(PeerConfig {
            routes: Vec::new(),
            key: public(s),
            name: format!("n{i}"),
            address: overlay(i),
            address6: None,
            endpoints: vec![underlay(i)],
            observed: Some(underlay(i)),
            nat: None,
        });
        by_addr.insert(underlay(i), i as usize);
    }
    let remotes_bytes = in_use() - before_remotes;

    let before_hub = in_use();
    let mut hub = Node::new(config(hub_secret, hub_overlay), 1, start);
    hub.set_peers(&entries, start);
    drop(entries);
    let configured = in_use() - before_hub;

    let mut net = Net {
        hub,
        hub_addr,
        remotes,
        by_addr,
        now: start,
    };
    let before_sessions = in_use();
    net.settle();

    // Crossed and proactive handshakes finish within seconds of virtual time.
    for _ in 0..20 {
        net.now += Duration::from_millis(500);
        net.tick();
    }
    let status = net.hub.status(net.now);
    let sessions = status
        .peers
        .iter()
        .filter(|p| p.since_handshake.is_some())
        .count();
    let handshakes_added = in_use() - before_sessions;
    let with_sessions = configured + handshakes_added / 2;
    let remotes_per = remotes_bytes as f64 / f64::from(n);

    // Half a minute for the handshakes' own activity to end (boringtun's timers tick fast for
    // 16 s after one), then ten idle minutes: jump from deadline to deadline.
    let settle_until = net.now + Duration::from_secs(30);
    while let Some(next) = net.next_deadline().filter(|t| *t <= settle_until) {
        net.now = next.max(net.now);
        net.tick();
    }
    net.now = settle_until;
    let idle_until = net.now + Duration::from_secs(600);
    let runs_before = net.hub_counters().peer_timer_runs;
    let mut hub_wakes = 0u64;
    while let Some(next) = net.next_deadline() {
        if next > idle_until {
            break;
        }
        net.now = next.max(net.now);
        if net.tick() {
            hub_wakes += 1;
        }
    }
    println!("peers: {n}; sessions established: {sessions}");
    println!("hub counters: {:?}", status.counters);
    println!(
        "hub memory, configured: {:.1} KiB per peer ({:.1} MiB in all)",
        configured as f64 / 1024.0 / f64::from(n),
        configured as f64 / 1048576.0
    );
    println!(
        "hub memory, with sessions: {:.1} KiB per peer ({:.1} MiB in all)",
        with_sessions as f64 / 1024.0 / f64::from(n),
        with_sessions as f64 / 1048576.0
    );
    println!(
        "(a remote node with one peer, before its handshake: {:.1} KiB)",
        remotes_per / 1024.0
    );
    println!(
        "hub wake-ups in 600 s idle: {hub_wakes} ({:.2} per second)",
        hub_wakes as f64 / 600.0
    );
    let runs = net.hub_counters().peer_timer_runs - runs_before;
    println!(
        "hub peer timer runs in 600 s idle: {runs} ({:.1} per peer)",
        runs as f64 / f64::from(n)
    );
}
