#![allow(clippy::unwrap_used)]
//! Golden transcripts: whole same-seed simulation runs, recorded as files and compared line by
//! line, so that a change to mesh-core that was meant to keep behaviour (a move, a split, a new
//! type) shows every datagram and every event it changed.
//!
//! Two scenarios, five seeds each:
//! - `flat`: eight public nodes on a lossy internet, every pair pinging;
//! - `nat`: a relay and two nodes of every NAT kind (full cone, port-restricted, symmetric, UDP
//!   blocked, double NAT) plus two on one LAN, with loss: relayed paths, hole punching and
//!   birthday punching.
//!
//! A transcript lists, in virtual milliseconds, every datagram delivered (from, to, size), every
//! event a node returned, and at the end each node's path to each peer. A change that is meant
//! to alter timing or traffic regenerates the files in a commit of its own that says why:
//! `MESH_BLESS=1 cargo test -p mesh-core --test golden`.

mod simnet;

use mesh_core::{Event, Path};
use mesh_proto::PublicKey;
use simnet::{all_pairs, Behaviour, Sim, INTERNET, NODE_PORT};
use std::collections::HashMap;
use std::fmt::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

const SEEDS: std::ops::RangeInclusive<u64> = 1..=5;

/// What every node leaves to the driver: sealing ([`mesh_core::Node::set_deferred_sealing`])
/// and opening ([`mesh_core::Node::set_deferred_opening`]), which must change nothing a
/// transcript shows.
#[derive(Clone, Copy, Default)]
struct Defer {
    sealing: bool,
    opening: bool,
}

fn flat(seed: u64, defer: Defer) -> Sim {
    let mut sim = Sim::empty(seed, 0.1);
    for i in 0..8u8 {
        sim.add_node_at(
            INTERNET,
            SocketAddr::from((Ipv4Addr::new(192, 0, 2, i + 1), NODE_PORT)),
        );
    }
    defer_to_driver(&mut sim, defer);
    sim.connect();
    all_pairs(&mut sim, 8);
    sim
}

fn nat(seed: u64, defer: Defer) -> Sim {
    let mut sim = Sim::empty(seed, 0.05);
    sim.add_relay();
    for k in Behaviour::ALL {
        for _ in 0..2 {
            sim.add_node_behind(k);
        }
    }
    let lan = sim.add_site(Behaviour::PortRestricted);
    for _ in 0..2 {
        sim.add_node(lan);
    }
    defer_to_driver(&mut sim, defer);
    sim.connect();
    sim.run_for(Duration::from_secs(2));
    all_pairs(&mut sim, 12);
    sim
}

fn defer_to_driver(sim: &mut Sim, defer: Defer) {
    for n in &mut sim.nodes {
        n.node.set_deferred_sealing(defer.sealing);
        n.node.set_deferred_opening(defer.opening);
    }
}

fn ms(t: u128) -> String {
    format!("{}.{:03}", t / 1000, t % 1000)
}

/// The run as text: deliveries, events, then every node's paths.
fn transcript(sim: &Sim, title: &str) -> String {
    let names: HashMap<PublicKey, String> = (0..sim.nodes.len())
        .map(|i| (sim.key(i), format!("n{i}")))
        .collect();
    let name = |k: &PublicKey| names.get(k).cloned().unwrap_or_else(|| k.short());
    let path = |p: &Path| match p {
        Path::Direct(a) => format!("direct {a}"),
        Path::Relay => "relay".to_owned(),
        Path::None => "none".to_owned(),
    };
    let mut s = format!("# {title}\n## deliveries: ms from > to bytes\n");
    for (t, from, to, len) in &sim.transcript {
        writeln!(s, "{} {from} > {to} {len}", ms(*t)).unwrap();
    }
    s.push_str("## events (runs of socket opens or closes on one line)\n");
    let mut k = 0;
    while k < sim.events.len() {
        let (t, i, ev) = &sim.events[k];
        // A birthday attempt opens (and closes) hundreds of sockets at once.
        let run = |open: bool| {
            sim.events[k..]
                .iter()
                .take_while(|(t2, i2, e)| {
                    t2 == t
                        && i2 == i
                        && matches!(
                            (open, e),
                            (true, Event::OpenSocket(_)) | (false, Event::CloseSocket(_))
                        )
                })
                .count()
        };
        let n = match ev {
            Event::OpenSocket(_) => run(true),
            Event::CloseSocket(_) => run(false),
            _ => 1,
        };
        let last = &sim.events[k + n - 1].2;
        k += n;
        let what = match ev {
            Event::PeerUnreachable { key } => format!("unreachable {}", name(key)),
            Event::PathChanged { key, path: p } => format!("path {} {}", name(key), path(p)),
            Event::Pong { key, rtt, path: p } => {
                format!("pong {} {}us {}", name(key), rtt.as_micros(), path(p))
            }
            Event::PathMtu {
                key,
                mtu,
                configured,
                ..
            } => format!("mtu {} {mtu}/{configured}", name(key)),
            Event::OpenSocket(id) | Event::CloseSocket(id) if n > 1 => {
                let verb = if matches!(ev, Event::OpenSocket(_)) {
                    "open"
                } else {
                    "close"
                };
                let (Event::OpenSocket(to) | Event::CloseSocket(to)) = last else {
                    unreachable!()
                };
                format!("{verb} {n}: {id} .. {to}")
            }
            Event::OpenSocket(id) => format!("open {id}"),
            Event::CloseSocket(id) => format!("close {id}"),
        };
        writeln!(s, "{} n{i} {what}", ms(*t)).unwrap();
    }
    s.push_str("## paths at the end\n");
    for (i, n) in sim.nodes.iter().enumerate() {
        for p in n.node.status(sim.now).peers {
            writeln!(
                s,
                "n{i} {}: {} rx {} tx {}",
                name(&p.key),
                path(&p.path),
                p.rx_bytes,
                p.tx_bytes
            )
            .unwrap();
        }
    }
    s.push_str("## sends per node (driver's count) and the network's totals\n");
    for (i, n) in sim.nodes.iter().enumerate() {
        writeln!(s, "n{i} {:?}", n.io).unwrap();
    }
    writeln!(s, "{:?}", sim.net.stats).unwrap();
    s
}

fn check(file: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(file);
    if std::env::var_os("MESH_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; record it with MESH_BLESS=1 cargo test -p mesh-core --test golden",
            path.display()
        )
    });
    if want == got {
        return;
    }
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let first = w
        .iter()
        .zip(&g)
        .position(|(a, b)| a != b)
        .unwrap_or(w.len().min(g.len()));
    let around = |l: &[&str]| l[first.saturating_sub(3)..(first + 4).min(l.len())].join("\n");
    panic!(
        "{file} differs from line {} on ({} lines recorded, {} now)\nrecorded:\n{}\nnow:\n{}\n\
         If the change is meant to alter traffic or timing, regenerate in a commit of its own: \
         MESH_BLESS=1 cargo test -p mesh-core --test golden",
        first + 1,
        w.len(),
        g.len(),
        around(&w),
        around(&g)
    );
}

#[test]
fn flat_network_transcripts_match() {
    for seed in SEEDS {
        let sim = flat(seed, Defer::default());
        let title = format!("flat seed {seed}: 8 public nodes, 10% loss, every pair pings for 8 s");
        check(&format!("flat-{seed}.txt"), &transcript(&sim, &title));
    }
}

#[test]
fn nat_zoo_transcripts_match() {
    for seed in SEEDS {
        let sim = nat(seed, Defer::default());
        let title = format!(
            "nat seed {seed}: relay, two nodes of every NAT kind and two on one LAN, 5% loss, \
             every pair pings for 12 s"
        );
        check(&format!("nat-{seed}.txt"), &transcript(&sim, &title));
    }
}

/// Sealing left to the driver moves only where the encryption runs: the same runs give the
/// same transcripts (every delivery, event and path, byte for byte).
#[test]
fn deferred_sealing_changes_no_transcript() {
    same_transcripts(Defer {
        sealing: true,
        opening: false,
    });
}

/// So does opening left to the driver: the node takes each message back in the order it
/// came, with what came behind it after it.
#[test]
fn deferred_opening_changes_no_transcript() {
    same_transcripts(Defer {
        sealing: true,
        opening: true,
    });
}

fn same_transcripts(defer: Defer) {
    for seed in 1..=2 {
        let sim = flat(seed, defer);
        let title = format!("flat seed {seed}: 8 public nodes, 10% loss, every pair pings for 8 s");
        check(&format!("flat-{seed}.txt"), &transcript(&sim, &title));
        let sim = nat(seed, defer);
        let title = format!(
            "nat seed {seed}: relay, two nodes of every NAT kind and two on one LAN, 5% loss, \
             every pair pings for 12 s"
        );
        check(&format!("nat-{seed}.txt"), &transcript(&sim, &title));
    }
}
