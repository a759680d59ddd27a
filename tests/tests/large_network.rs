//! A network larger than `mesh_core::PROACTIVE_PEERS` (128 peers): 200 members that stay
//! connected (the control-plane load tool: the real protocol, no WireGuard behind them) joined
//! first, then two real agents. Each agent shakes hands ahead of traffic with the 128 peers of
//! the lowest addresses only and shows the others as `on demand`; the two late nodes, which
//! never shook hands with each other, reach each other on their first packet.
#![allow(clippy::unwrap_used)]

use mesh_e2e::{bin_dir, wait_all_pairs_ping, wait_until, Agent, Controller, Lab};
use serde_json::Value;
use std::net::Ipv4Addr;
use std::time::Duration;

const NET: &str = "lab";
const MEMBERS: usize = 200;
const PROACTIVE: usize = 128;

fn address(p: &Value) -> Ipv4Addr {
    p["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no overlay address in {p:#}"))
}

fn on_demand(p: &Value) -> bool {
    p["on_demand"]
        .as_bool()
        .unwrap_or_else(|| panic!("no `on_demand` in {p:#}"))
}

/// The peers `agent` lists, once it lists `n`.
fn peers_once(agent: &Agent, n: usize) -> Vec<Value> {
    let mut last = Vec::new();
    let listed = wait_until(Duration::from_secs(30), || {
        last = agent
            .status()
            .ok()
            .and_then(|s| s["peers"].as_array().cloned())
            .unwrap_or_default();
        last.len() == n
    });
    assert!(listed, "{} lists {} peers, not {n}", agent.name, last.len());
    last
}

#[test]
fn past_128_peers_late_nodes_reach_each_other_on_their_first_packet() {
    let mut lab = Lab::new("large-net").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let ha = lab.add_host("a").unwrap();
    let hb = lab.add_host("b").unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();

    let tool = bin_dir().join("mesh-control-load");
    assert!(
        tool.is_file(),
        "{} not found: build it with `cargo build --bins`",
        tool.display()
    );
    let (members, bind) = (MEMBERS.to_string(), ctl_host.ip.to_string());
    // Connected for the whole test (stopped when `_load` is dropped).
    let _load = lab
        .spawn(
            &ctl_host,
            "load",
            &tool,
            [
                "--token",
                &token,
                "--nodes",
                &members,
                "--concurrency",
                "16",
                "--bind",
                &bind,
                "--idle",
                "600",
                "--settle-max",
                "60",
                "--json",
            ],
        )
        .unwrap();
    let joined = wait_until(Duration::from_secs(120), || {
        ctl.nodes(NET).is_ok_and(|n| n.len() >= MEMBERS)
    });
    assert!(
        joined,
        "the {MEMBERS} simulated members did not join: {:?}",
        ctl.nodes(NET).map(|n| n.len())
    );

    let a = Agent::join(&lab, &ha, "a", &token).unwrap();
    let b = Agent::join(&lab, &hb, "b", &token).unwrap();

    for agent in [&a, &b] {
        let peers = peers_once(agent, MEMBERS + 1);
        let mut by_address: Vec<(Ipv4Addr, bool, String)> = peers
            .iter()
            .map(|p| {
                (
                    address(p),
                    on_demand(p),
                    p["name"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        by_address.sort();
        // The late nodes have the highest addresses, so they are past the limit for each other.
        let other = if agent.name == "a" { "b" } else { "a" };
        assert_eq!(by_address.last().unwrap().2, other, "{by_address:?}");
        let ahead: Vec<&(Ipv4Addr, bool, String)> =
            by_address.iter().filter(|(_, od, _)| !od).collect();
        assert_eq!(
            ahead.len(),
            PROACTIVE,
            "{}: sessions ahead of traffic with {} peers, not {PROACTIVE}",
            agent.name,
            ahead.len()
        );
        assert!(
            by_address[..PROACTIVE].iter().all(|(_, od, _)| !od),
            "{}: the {PROACTIVE} lowest addresses go ahead: {by_address:?}",
            agent.name
        );
        let text = agent.cli(["status"]).ok().unwrap().stdout;
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(other))
            .unwrap_or_else(|| panic!("`mesh status` has no line for {other}:\n{text}"));
        assert!(line.contains("on demand"), "{line}");
    }

    // The first packet starts the session, and traffic flows both ways.
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();
    for (agent, other) in [(&a, "b"), (&b, "a")] {
        let p = agent.peer(other).unwrap();
        assert!(!on_demand(&p), "{p:#}");
        assert!(p["last_handshake_secs_ago"].is_u64(), "{p:#}");
    }
    // A member past the limit that nothing talked to is still without a session.
    let peers = a.status().unwrap()["peers"].as_array().cloned().unwrap();
    let untouched = peers
        .iter()
        .filter(|p| p["name"] != "b" && on_demand(p))
        .count();
    assert_eq!(untouched, MEMBERS - PROACTIVE, "{peers:#?}");
}
