//! Three nodes join one network and form a full mesh.
#![allow(clippy::unwrap_used)]

use mesh_e2e::{netns::ip, wait_all_pairs_ping, wait_until, Agent, Controller, Lab};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

const NET: &str = "lab";

fn u64_field(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v:#}"))
}

#[test]
fn three_nodes_ping_each_other_and_report_it() {
    let mut lab = Lab::new("three-nodes").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let hosts: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| lab.add_host(n).unwrap())
        .collect();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let agents: Vec<Agent> = hosts
        .iter()
        .map(|h| Agent::join(&lab, h, &h.name, &token).unwrap())
        .collect();

    // `mesh ip` prints one address of 100.64.0.0/16 and a newline, nothing else.
    for a in &agents {
        let out = a.cli(["ip"]).ok().unwrap();
        let text = out
            .stdout
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("`mesh ip` output does not end in a newline: {out}"));
        let addr: Ipv4Addr = text
            .parse()
            .unwrap_or_else(|e| panic!("`mesh ip` printed {text:?}, not one address ({e}): {out}"));
        assert_eq!(
            addr.octets()[..2],
            [100, 64],
            "{addr} is outside 100.64.0.0/16"
        );
        assert_eq!(addr, a.address, "`mesh ip` and `mesh status` disagree");
    }
    let distinct: BTreeSet<Ipv4Addr> = agents.iter().map(|a| a.address).collect();
    assert_eq!(
        distinct.len(),
        3,
        "addresses are not distinct: {distinct:?}"
    );

    let refs: Vec<&Agent> = agents.iter().collect();
    wait_all_pairs_ping(&refs, Duration::from_secs(20)).unwrap();

    // Each status lists the two others, with traffic both ways after the pings.
    for a in &agents {
        let others: BTreeSet<&str> = agents
            .iter()
            .filter(|o| o.name != a.name)
            .map(|o| o.name.as_str())
            .collect();
        let mut last = Value::Null;
        // Traffic may start on the relay; on one flat LAN the direct path follows within a
        // probe round (2 s), so wait for it rather than catch the moment before.
        let counted = wait_until(Duration::from_secs(10), || {
            last = a.status().unwrap();
            last["peers"].as_array().is_some_and(|peers| {
                peers.len() == 2
                    && peers.iter().all(|p| {
                        u64_field(p, "rx_bytes") > 0
                            && u64_field(p, "tx_bytes") > 0
                            && p["path"] == "direct"
                    })
            })
        });
        assert!(
            counted,
            "{} should list 2 peers, direct, with rx_bytes and tx_bytes > 0: {last:#}",
            a.name
        );
        let peers = last["peers"].as_array().unwrap();
        let names: BTreeSet<&str> = peers.iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, others, "{}: {last:#}", a.name);
        for p in peers {
            let o = agents.iter().find(|o| o.name == p["name"]).unwrap();
            assert_eq!(p["address"], o.address.to_string(), "{}: {last:#}", a.name);
            // On one flat LAN the path is direct, to the peer's own UDP socket.
            assert_eq!(
                p["endpoint"],
                o.underlay().to_string(),
                "{}: {last:#}",
                a.name
            );
        }
        assert_eq!(last["node"]["name"], a.name.as_str(), "{last:#}");
        assert_eq!(last["node"]["address"], a.address.to_string(), "{last:#}");
        assert_eq!(last["node"]["prefix_len"], 16, "{last:#}");
        assert_eq!(last["controller"]["connected"], true, "{last:#}");

        // The MTU it reports is the MTU of its interface.
        let iface = last["node"]["interface"].as_str().unwrap_or("mesh0");
        let link = ip(["-n", &a.host.ns, "-o", "link", "show", "dev", iface]).unwrap();
        let mtu = u64_field(&last["node"], "mtu");
        assert!(
            link.contains(&format!(" mtu {mtu} ")),
            "status says MTU {mtu}, the interface says: {link}"
        );

        // The human form shows each peer's path, endpoint and RTT on its line (the agent
        // measures the RTT of a new session by itself, within a round trip or two).
        let mut human = String::new();
        let complete = wait_until(Duration::from_secs(5), || {
            human = a.cli(["status"]).ok().unwrap().stdout;
            agents.iter().filter(|o| o.name != a.name).all(|o| {
                human
                    .lines()
                    .find(|l| l.starts_with(&format!("{} ", o.name)))
                    .is_some_and(|line| {
                        line.contains(" direct ")
                            && line.contains(&o.underlay().to_string())
                            && line.contains(" ms ")
                    })
            })
        });
        assert!(
            complete,
            "a peer line lacks path, endpoint or RTT:\n{human}"
        );
    }

    // The controller lists the three nodes with their addresses.
    let out = ctl.admin(["node", "list", NET]).ok().unwrap();
    for a in &agents {
        assert!(
            out.stdout.contains(&a.name) && out.stdout.contains(&a.address.to_string()),
            "node list lacks {} {}: {out}",
            a.name,
            a.address
        );
    }
    let tokens = ctl.tokens().unwrap();
    assert_eq!(tokens.len(), 1, "{tokens:#?}");
    assert_eq!(
        tokens[0]["uses"], 3,
        "three joins with the token: {tokens:#?}"
    );
    assert_eq!(tokens[0]["reusable"], true, "{tokens:#?}");

    let nodes = ctl.nodes(NET).unwrap();
    assert_eq!(nodes.len(), 3, "{nodes:#?}");
    for a in &agents {
        let n = nodes
            .iter()
            .find(|n| n["name"] == a.name.as_str())
            .unwrap_or_else(|| panic!("node list --json lacks {}: {nodes:#?}", a.name));
        assert_eq!(n["address"], a.address.to_string(), "{n:#}");
        assert_eq!(n["online"], true, "{n:#}");
        let key = a.status().unwrap()["node"]["key"].clone();
        assert_eq!(n["key"], key, "{n:#}");
    }
}
