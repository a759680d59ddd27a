//! Every pair of nodes behind every kind of NAT: ping works, and the path is direct wherever
//! the implementation can open one, relayed otherwise. Prints the matrix, the time from start
//! to first ping, and iperf3 through a direct and a relayed pair.
#![allow(clippy::unwrap_used)]

use mesh_e2e::natlab::{NatKind, NatLab};
use mesh_e2e::{netns::Host, wait_until, Agent, Controller};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const NET: &str = "natmatrix";

/// What each node sits behind.
fn kind_of(name: &str) -> &'static str {
    match name {
        "public" => "public",
        "cone" => "full-cone",
        "port" => "port-restricted",
        "sym1" | "sym2" => "symmetric",
        "lan1" | "lan2" => "same-NAT",
        "double" => "double-NAT",
        "blocked" => "UDP-blocked",
        _ => "?",
    }
}

/// The path expected: direct wherever one can exist, that is everywhere except between two
/// symmetric NATs and to the UDP-blocked node. A symmetric node reaches nodes behind
/// endpoint-independent mapping with address-and-port filtering (port-restricted, same-NAT,
/// double NAT) by birthday hole punching (`mesh_core::birthday`), which starts after two
/// unanswered probe rounds (about 6 s).
fn expected(a: &str, b: &str) -> &'static str {
    let (ka, kb) = (kind_of(a), kind_of(b));
    if ka == "UDP-blocked" || kb == "UDP-blocked" {
        return "relay";
    }
    if ka == "symmetric" && kb == "symmetric" {
        return "relay";
    }
    "direct"
}

#[test]
fn every_pair_connects_directly_where_it_can_and_through_the_relay_otherwise() {
    let mut nat = NatLab::new("matrix").unwrap();
    let ctl_host = nat.controller_host();
    let public = nat.add_public_host("public").unwrap();
    let cone_r = nat.add_router("cone", NatKind::FullCone).unwrap();
    let port_r = nat.add_router("port", NatKind::PortRestricted).unwrap();
    let sym1_r = nat.add_router("sym1", NatKind::Symmetric).unwrap();
    let sym2_r = nat.add_router("sym2", NatKind::Symmetric).unwrap();
    let lan_r = nat.add_router("lan", NatKind::PortRestricted).unwrap();
    let (_cg, home) = nat.add_double_nat("dbl").unwrap();
    let blk_r = nat.add_router("blk", NatKind::UdpBlocked).unwrap();
    let hosts: Vec<(String, Host)> = vec![
        ("public".into(), public),
        ("cone".into(), nat.add_host_behind(&cone_r, "cone").unwrap()),
        ("port".into(), nat.add_host_behind(&port_r, "port").unwrap()),
        ("sym1".into(), nat.add_host_behind(&sym1_r, "sym1").unwrap()),
        ("sym2".into(), nat.add_host_behind(&sym2_r, "sym2").unwrap()),
        ("lan1".into(), nat.add_host_behind(&lan_r, "lan1").unwrap()),
        ("lan2".into(), nat.add_host_behind(&lan_r, "lan2").unwrap()),
        (
            "double".into(),
            nat.add_host_behind(&home, "double").unwrap(),
        ),
        (
            "blocked".into(),
            nat.add_host_behind(&blk_r, "blocked").unwrap(),
        ),
    ];
    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let start = Instant::now();
    let agents: Vec<Agent> = hosts
        .iter()
        .map(|(n, h)| Agent::join(nat.lab(), h, n, &token).unwrap())
        .collect();
    let joined = start.elapsed();

    // Every ordered pair pings; remember how long the first answer took.
    let mut first_ping: BTreeMap<(String, String), Duration> = BTreeMap::new();
    for (i, a) in agents.iter().enumerate() {
        for (j, b) in agents.iter().enumerate() {
            if i == j {
                continue;
            }
            let ok = hosts[i].1.wait_ping(b.address, Duration::from_secs(20));
            assert!(
                ok,
                "{} cannot ping {}: {:#}",
                a.name,
                b.name,
                a.status().unwrap()
            );
            first_ping.insert((a.name.clone(), b.name.clone()), start.elapsed());
        }
    }

    // Give hole punching its rounds (probes every 2 s), with traffic flowing, then read paths.
    let path = |a: &Agent, b: &str| -> String {
        a.peer(b).unwrap()["path"]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    };
    // A birthday attempt succeeds with about 98 % probability; a miss is retried after 30 s.
    let settle_start = Instant::now();
    let mut direct_at: BTreeMap<(String, String), Duration> = BTreeMap::new();
    let settled = wait_until(Duration::from_secs(75), || {
        agents.iter().enumerate().all(|(i, a)| {
            agents.iter().enumerate().all(|(j, b)| {
                if i == j {
                    return true;
                }
                let _ = hosts[i].1.ping(b.address);
                let p = path(a, &b.name);
                if p == "direct" {
                    direct_at
                        .entry((a.name.clone(), b.name.clone()))
                        .or_insert_with(|| start.elapsed());
                }
                p == expected(&a.name, &b.name)
            })
        })
    });

    // The matrix, as each row's node sees each column.
    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    let mut table = format!("\n{:<9}", "");
    for n in &names {
        table += &format!("{n:>8}");
    }
    let mut mismatches = Vec::new();
    for a in &agents {
        table += &format!("\n{:<9}", a.name);
        for b in &agents {
            if a.name == b.name {
                table += &format!("{:>8}", "-");
                continue;
            }
            let p = path(a, &b.name);
            if p != expected(&a.name, &b.name) {
                mismatches.push(format!(
                    "{} -> {}: {p}, expected {}",
                    a.name,
                    b.name,
                    expected(&a.name, &b.name)
                ));
            }
            table += &format!("{p:>8}");
        }
    }
    eprintln!("{table}");
    eprintln!("all {} agents joined after {joined:?}", agents.len());
    eprintln!("paths settled {:?} after the pings", settle_start.elapsed());
    let hard: Vec<String> = direct_at
        .iter()
        .filter(|((a, b), _)| (kind_of(a) == "symmetric") != (kind_of(b) == "symmetric"))
        .filter(|((a, b), _)| kind_of(a) != "full-cone" && kind_of(b) != "full-cone")
        .filter(|((a, b), _)| kind_of(a) != "public" && kind_of(b) != "public")
        .map(|((a, b), t)| format!("{a}->{b} {:.1}s", t.as_secs_f64()))
        .collect();
    eprintln!(
        "direct across a symmetric NAT (birthday), seen at: {}",
        hard.join(", ")
    );
    for a in &agents {
        let c = &a.status().unwrap()["counters"];
        eprintln!(
            "{}: extra sockets open {}, sent {}, received {}; udp sent {}, send errors {}",
            a.name,
            c["extra_sockets"],
            c["extra_tx"],
            c["extra_rx"],
            c["udp_tx"],
            c["udp_send_errors"]
        );
    }
    let slowest = first_ping.iter().max_by_key(|(_, d)| **d).unwrap();
    eprintln!(
        "every ordered pair answered a ping by {:?} after start (last: {} -> {})",
        slowest.1, slowest.0 .0, slowest.0 .1
    );

    // Throughput through a direct pair and a relayed pair (measured, not asserted).
    let idx = |n: &str| names.iter().position(|x| *x == n).unwrap();
    for (from, to) in [("cone", "port"), ("sym1", "sym2")] {
        let (f, t) = (idx(from), idx(to));
        let mbit = mesh_e2e::iperf3(
            &hosts[f].1,
            &hosts[t].1,
            &agents[t].address.to_string(),
            5301,
            3,
        );
        eprintln!(
            "iperf3 {from} -> {to} ({}): {}",
            path(&agents[f], to),
            mbit.map_or("iperf3 unavailable".to_owned(), |m| format!(
                "{m:.0} Mbit/s"
            ))
        );
    }
    assert!(
        settled && mismatches.is_empty(),
        "paths differ from the expected matrix: {mismatches:#?}"
    );
    // Each node knows how its NAT maps (the controller's QUIC side and its STUN observer are
    // two destinations), and only nodes behind endpoint-dependent mapping open birthday
    // sockets: the others never need them.
    for a in &agents {
        let s = a.status().unwrap();
        let want = match kind_of(&a.name) {
            "public" => Some("public"),
            "symmetric" => Some("endpoint_dependent"),
            // Its UDP may go to the controller's QUIC port only: the observer cannot answer.
            "UDP-blocked" => None,
            _ => Some("endpoint_independent"),
        };
        assert_eq!(
            s["nat"]["kind"].as_str(),
            want,
            "{}'s NAT kind: {:#}",
            a.name,
            s["nat"]
        );
        let sockets = s["counters"]["birthday_sockets_opened"].as_u64().unwrap();
        if kind_of(&a.name) != "symmetric" {
            assert_eq!(
                sockets, 0,
                "{} is not behind endpoint-dependent mapping yet opened birthday sockets: {:#}",
                a.name, s["counters"]
            );
        }
    }
    // Two nodes behind one NAT talk over their LAN addresses (the NAT does not hairpin).
    let lan_endpoint = agents[idx("lan1")].peer("lan2").unwrap()["endpoint"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        lan_endpoint.starts_with("198.51.100."),
        "lan1 reaches lan2 at {lan_endpoint}"
    );
}
