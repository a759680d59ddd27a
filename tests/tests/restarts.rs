//! Agents and the controller restart, get killed, and the mesh keeps its addresses and works.
#![allow(clippy::unwrap_used)]

use mesh_e2e::{wait_all_pairs_ping, wait_until, Agent, Controller, Host, Lab};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

const NET: &str = "lab";

/// A lab with a controller, network `lab`, a reusable token, and one host per name.
fn setup(label: &str, names: &[&str]) -> (Lab, Controller, String, Vec<Host>) {
    let (lab, ctl, hosts, token) = mesh_e2e::daemons::lab_with_network(label, NET, names).unwrap();
    (lab, ctl, token, hosts)
}

/// name -> address, from `node list --json`.
fn node_addresses(ctl: &Controller) -> BTreeMap<String, String> {
    ctl.nodes(NET)
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["address"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn agent_restart_keeps_its_address() {
    let (lab, ctl, token, hosts) = setup("agent-restart", &["a", "b"]);
    let mut a = Agent::join(&lab, &hosts[0], "a", &token).unwrap();
    let b = Agent::join(&lab, &hosts[1], "b", &token).unwrap();
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();
    let before = a.ip().unwrap();
    let key_before = a.status().unwrap()["node"]["key"].clone();
    let nodes_before = node_addresses(&ctl);

    let status = a.stop().unwrap();
    assert_ne!(
        status.signal(),
        Some(9),
        "the agent did not exit within 3 s of SIGTERM"
    );
    assert!(
        !a.cli(["status", "--json"]).success(),
        "`mesh status` should fail while no daemon runs"
    );

    let after = a.up().unwrap();
    assert_eq!(after, before, "the address changed across a restart");
    assert_eq!(a.ip().unwrap(), before);
    assert_eq!(
        a.status().unwrap()["node"]["key"],
        key_before,
        "the node key changed"
    );
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();
    // Same node (same key) on the controller, not a new one.
    assert_eq!(node_addresses(&ctl), nodes_before);
}

#[test]
fn controller_crash_loses_nothing_and_reuses_no_address() {
    let (lab, mut ctl, token, hosts) = setup("controller-crash", &["a", "b", "c"]);
    let a = Agent::join(&lab, &hosts[0], "a", &token).unwrap();
    let b = Agent::join(&lab, &hosts[1], "b", &token).unwrap();
    let before = node_addresses(&ctl);
    assert_eq!(before.len(), 2, "{before:?}");

    let status = ctl.kill9().unwrap();
    assert_eq!(status.signal(), Some(9));
    ctl.serve().unwrap();

    // The token made before the crash still works.
    let c = Agent::join(&lab, &hosts[2], "c", &token).unwrap();
    let after = node_addresses(&ctl);
    assert_eq!(after.len(), 3, "{after:?}");
    for (name, addr) in &before {
        assert_eq!(after.get(name), Some(addr), "{name} changed: {after:?}");
    }
    let distinct: BTreeSet<&String> = after.values().collect();
    assert_eq!(
        distinct.len(),
        3,
        "an address was handed out twice: {after:?}"
    );
    assert_eq!(after["c"], c.address.to_string());
    assert_eq!(a.ip().unwrap(), a.address);
    assert_eq!(b.ip().unwrap(), b.address);

    // a and b learn about c from the restarted controller.
    wait_all_pairs_ping(&[&a, &b, &c], Duration::from_secs(30)).unwrap();
}

#[test]
fn agent_restarts_from_cache_while_controller_is_down() {
    let (lab, mut ctl, token, hosts) = setup("controller-down", &["a", "b", "c"]);
    let mut a = Agent::join(&lab, &hosts[0], "a", &token).unwrap();
    let b = Agent::join(&lab, &hosts[1], "b", &token).unwrap();
    let c = Agent::join(&lab, &hosts[2], "c", &token).unwrap();
    wait_all_pairs_ping(&[&a, &b, &c], Duration::from_secs(20)).unwrap();
    let before = a.address;

    ctl.kill9().unwrap();
    a.stop().unwrap();
    let after = a.up().unwrap();
    assert_eq!(after, before);

    let mut status = a.status().unwrap();
    assert_eq!(
        status["peers"].as_array().map(Vec::len),
        Some(2),
        "the restarted agent should have its cached peers: {status:#}"
    );
    let disconnected = wait_until(Duration::from_secs(10), || {
        status = a.status().unwrap();
        status["controller"]["connected"] == false
    });
    assert!(
        disconnected,
        "the controller is down, status says otherwise: {status:#}"
    );
    wait_all_pairs_ping(&[&a, &b, &c], Duration::from_secs(20)).unwrap();
    assert!(a.is_running(), "{}", a.log());
}

#[test]
fn join_without_daemon_then_up_as_a_service_would() {
    let (lab, _ctl, token, hosts) = setup("join-no-daemon", &["a", "b"]);
    let b = Agent::join(&lab, &hosts[1], "b", &token).unwrap();
    let mut a = Agent::idle(&lab, &hosts[0], "a").unwrap();
    let out = a.cli(["join", token.as_str(), "--name", "a", "--no-daemon"]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("joined network"), "{out}");
    let joined_ip = a.ip().unwrap();
    assert!(out.stdout.contains(&joined_ip.to_string()), "{out}");
    assert!(
        !a.cli(["status", "--json"]).success(),
        "no daemon runs after --no-daemon"
    );
    // What `systemctl start mesh` runs: `mesh up` from the saved state.
    assert_eq!(a.up().unwrap(), joined_ip);
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();
}
