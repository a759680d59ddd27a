//! `mesh join <network-id>` (issue 15): a node asks by network id, waits, and joins once the
//! administrator approves it; a rejected node stops with the reason; a network that approves
//! automatically admits at once; a request survives a controller killed with -9 and the
//! agent's own restart. Real binaries in namespaces; the controller at 192.0.2.1.
#![allow(clippy::unwrap_used)]

use mesh_e2e::{netns::ip, wait_all_pairs_ping, Agent, Controller, Lab};
use std::time::{Duration, Instant};

const NET: &str = "ask";
/// `mesh`'s exit status for a state no restart can fix (`RestartPreventExitStatus=` in the unit).
const EXIT_FATAL: i32 = 78;

fn has_address(host: &mesh_e2e::Host) -> bool {
    ip(["-n", host.ns.as_str(), "-4", "addr", "show", "dev", "mesh0"])
        .is_ok_and(|s| s.contains("inet "))
}

/// A controller serving network [`NET`] (manual approval), node `a` joined with a token, and
/// hosts for the nodes that ask.
fn lab(label: &str, askers: &[&str]) -> (Lab, Controller, Agent, Vec<mesh_e2e::Host>, String) {
    let (lab, ctl, mut hosts, token) =
        mesh_e2e::daemons::lab_with_network(label, NET, &[&["a"], askers].concat()).unwrap();
    let a = Agent::join(&lab, &hosts.remove(0), "a", &token).unwrap();
    let id = ctl.network_id(NET).unwrap();
    (lab, ctl, a, hosts, id)
}

#[test]
fn a_node_that_asks_waits_and_joins_once_approved() {
    let (lab, ctl, a, hosts, id) = lab("approve", &["b"]);
    let mut b = Agent::ask(&lab, &hosts[0], "b", &id, &[]).unwrap();
    let status = b.wait_pending(Duration::from_secs(20)).unwrap();
    let fingerprint = status["node"]["fingerprint"].as_str().unwrap().to_owned();
    assert_eq!(status["approve_with"], "mesh-controller node approve ask b");
    // The agent says what to do, and the controller lists the request with the same fingerprint.
    assert!(
        b.stderr().contains("waiting for approval of node b"),
        "{}",
        b.stderr()
    );
    assert!(b.stderr().contains(&fingerprint), "{}", b.stderr());
    let pending = ctl.pending(NET).unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0]["name"], "b");
    assert_eq!(pending[0]["fingerprint"], fingerprint.as_str());
    // A waiting node learns nothing and gets no address; its peers do not see it.
    assert!(!has_address(&b.host), "no address before approval");
    let out = b.cli(["ip"]);
    assert!(
        !out.success() && out.stderr.contains("waits for approval"),
        "{out}"
    );
    assert!(a.peer("b").is_err(), "a must not list b before approval");
    let out = b.cli(["status"]);
    assert!(out.success() && out.stdout.contains(&fingerprint), "{out}");

    let pid = b.pid();
    let t = Instant::now();
    let out = ctl.admin(["node", "approve", NET, "b"]);
    assert!(out.success(), "{out}");
    let address = b.wait_ready(Duration::from_secs(10)).unwrap();
    let took = t.elapsed();
    eprintln!("approve → address on b's mesh0 in {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(b.pid(), pid, "the same process goes on, no restart");
    assert!(b.is_running());
    b.address = address;
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();
    // The approval is recorded, and nothing is pending any more.
    let nodes = ctl.nodes(NET).unwrap();
    let row = nodes.iter().find(|n| n["name"] == "b").unwrap();
    assert!(
        row["approved_by"].as_str().is_some_and(|s| !s.is_empty()),
        "{row}"
    );
    assert!(ctl.pending(NET).unwrap().is_empty());
    // The agent restarts as a member, with the same address, without asking again.
    b.stop();
    assert_eq!(b.up().unwrap(), address);
}

#[test]
fn a_rejected_node_stops_with_the_reason_and_is_refused_at_once_after() {
    let (lab, ctl, _a, hosts, id) = lab("reject", &["b"]);
    let mut b = Agent::ask(&lab, &hosts[0], "b", &id, &[]).unwrap();
    b.wait_pending(Duration::from_secs(20)).unwrap();
    let out = ctl.admin(["node", "reject", NET, "b"]);
    assert!(out.success(), "{out}");
    let status = b.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(EXIT_FATAL),
        "{}",
        b.log()
    );
    assert!(b.stderr().contains("rejected"), "{}", b.stderr());
    assert!(!has_address(&b.host));
    // Nothing left to resume; asking again is refused at once, with the reason.
    let out = b.cli(["up"]);
    assert!(!out.success(), "{out}");
    let t = Instant::now();
    let out = b.cli(["join", &id, "--name", "b", "--foreground"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("rejected"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn a_network_with_automatic_approval_admits_at_once() {
    let (lab, ctl, a, hosts, _) = lab("auto", &["b"]);
    let out = ctl.admin(["network", "set", NET, "--approval", "auto"]);
    assert!(out.success(), "{out}");
    let id = ctl.network_id(NET).unwrap();
    let mut b = Agent::ask(&lab, &hosts[0], "b", &id, &[]).unwrap();
    b.address = b.wait_ready(Duration::from_secs(20)).unwrap();
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();
    let nodes = ctl.nodes(NET).unwrap();
    let row = nodes.iter().find(|n| n["name"] == "b").unwrap();
    assert!(
        row["approved_by"]
            .as_str()
            .is_some_and(|s| s.contains("auto")),
        "{row}"
    );
}

#[test]
fn a_request_survives_a_controller_killed_and_the_agents_restart() {
    let (lab, mut ctl, a, hosts, id) = lab("restart", &["b"]);
    let mut b = Agent::ask(&lab, &hosts[0], "b", &id, &[]).unwrap();
    b.wait_pending(Duration::from_secs(20)).unwrap();
    // The agent stops (a reboot) and the controller dies meanwhile.
    b.stop();
    ctl.kill9();
    b.spawn_daemon(&["up"], "up-pending").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let status: serde_json::Value =
        serde_json::from_str(&b.cli(["status", "--json"]).stdout).unwrap();
    assert_eq!(status["state"], "waiting_for_approval", "{status}");
    assert_eq!(status["controller"]["connected"], false, "{status}");
    ctl.serve().unwrap();
    b.wait_pending(Duration::from_secs(30)).unwrap();
    assert_eq!(ctl.pending(NET).unwrap().len(), 1);
    let out = ctl.admin(["node", "approve", NET, "b"]);
    assert!(out.success(), "{out}");
    b.address = b.wait_ready(Duration::from_secs(10)).unwrap();
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(30)).unwrap();
}

#[test]
fn join_arguments_say_which_form_they_resemble() {
    let (lab, _ctl, _a, hosts, id) = lab("args", &["b"]);
    let b = Agent::idle(&lab, &hosts[0], "b").unwrap();
    let out = b.cli(["join", "ask"]);
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("mesh-controller network id ask"),
        "{out}"
    );
    let out = b.cli(["join", &id[..id.len() - 8]]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("network id is damaged"), "{out}");
    assert!(
        !b.state_dir.join("node.key").exists(),
        "a refused argument changes nothing"
    );
    // --wait bounds the wait for approval (here the controller answers, so the request waits).
    let t = Instant::now();
    let out = b.cli(["join", &id, "--name", "b", "--wait", "2s"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("--wait"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

#[test]
fn leaving_while_waiting_withdraws_the_request_here_and_says_how_to_clear_it_there() {
    let (lab, _ctl, _a, hosts, id) = lab("withdraw", &["b"]);
    let mut b = Agent::ask(&lab, &hosts[0], "b", &id, &[]).unwrap();
    b.wait_pending(Duration::from_secs(20)).unwrap();
    let out = b.cli(["leave"]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("left network ask"), "{out}");
    assert!(
        out.stderr.contains("mesh-controller node reject ask b"),
        "{out}"
    );
    let status = b.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", b.log());
    assert!(!b.state_dir.join("request.json").exists());
    assert!(!b.state_dir.join("node.key").exists());
}
