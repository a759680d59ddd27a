//! The control-plane load tool's short pass (`benches/control.sh` runs it at 100 to 1,000
//! nodes): 40 simulated nodes join a real controller over the real protocol, then one more
//! joins and leaves. What a user of a big network relies on: every node joins, every connected
//! node hears of the join and of the leave, and what each is sent for one change is a delta of
//! one peer, not the network's whole list. Then the same across three controllers on one
//! PostgreSQL: 200 nodes join at once spread over the three, no address is given twice, and
//! every node, whichever controller it is on, hears of a join made through another.
#![allow(clippy::unwrap_used)]

use mesh_e2e::daemons::Replicas;
use mesh_e2e::{bin_dir, run_with_timeout, Controller, Host, Lab};
use serde_json::Value;
use std::time::Duration;

const NET: &str = "lab";
const NODES: u64 = 40;

/// Runs `mesh-control-load` in `host`: `nodes` nodes join with `token`, `concurrency` at a
/// time, spread over `controllers` (none: the token's), then one more joins and leaves; its
/// JSON report.
fn run_load(
    host: &Host,
    token: &str,
    nodes: u64,
    concurrency: u32,
    controllers: &[String],
    timeout: Duration,
) -> Value {
    let tool = bin_dir().join("mesh-control-load");
    assert!(
        tool.is_file(),
        "{} not found: build it with `cargo build --bins`",
        tool.display()
    );
    let (bind, nodes, concurrency) = (
        host.ip.to_string(),
        nodes.to_string(),
        concurrency.to_string(),
    );
    let mut args = vec![
        "--token",
        token,
        "--nodes",
        nodes.as_str(),
        "--concurrency",
        concurrency.as_str(),
        "--bind",
        bind.as_str(),
        "--idle",
        "1",
        "--settle-max",
        "60",
        "--json",
    ];
    for c in controllers {
        args.extend_from_slice(&["--controller", c]);
    }
    let out = run_with_timeout(&host.ns, &tool, args, timeout);
    assert!(out.success(), "{out}");
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {out}"))
}

#[test]
fn forty_nodes_join_and_each_hears_of_one_more_join_and_leave_as_a_delta() {
    let mut lab = Lab::new("control-load").unwrap();
    let host = lab.add_controller_host("ctl").unwrap();
    let ctl = Controller::start(&lab, &host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let report = run_load(&host, &token, NODES, 8, &[], Duration::from_secs(180));
    let n = |path: &[&str]| -> u64 {
        let mut v = &report;
        for p in path {
            v = &v[*p];
        }
        v.as_u64()
            .unwrap_or_else(|| panic!("{path:?} is not a count in {report:#}"))
    };
    assert_eq!(n(&["joined"]), NODES, "{report:#}");
    assert_eq!(n(&["failed"]), 0, "{report:#}");
    // Nodes welcomed while others joined still end up knowing every one of them.
    assert!(
        report["converged_s"].is_number(),
        "not every node came to know every other: {report:#}"
    );
    for change in ["extra_join", "extra_leave"] {
        assert_eq!(n(&[change, "nodes"]), NODES, "{change}: {report:#}");
        assert_eq!(
            n(&[change, "within_10s"]),
            NODES,
            "{change}: not every node heard of it: {report:#}"
        );
    }
    // One peer's entry is about 300 bytes; the whole list of 40 would be over 10,000.
    let bytes = n(&["extra_join", "bytes_per_node_max"]);
    assert!(
        (100..=1_000).contains(&bytes),
        "a node was sent {bytes} bytes for one join: {report:#}"
    );
}

#[test]
fn two_hundred_nodes_join_three_controllers_at_once_and_no_address_is_given_twice() {
    const MANY: u64 = 200;
    let mut lab = Lab::new("control-load-ha").unwrap();
    let replicas = Replicas::start(&mut lab, 3).unwrap();
    let load = lab.add_host("load").unwrap();
    replicas
        .admin(0, &["network", "create", NET, "--approval", "auto"])
        .ok()
        .unwrap();
    let token = replicas
        .admin(1, &["token", "create", NET, "--reusable"])
        .ok()
        .unwrap()
        .stdout
        .trim()
        .to_owned();
    let report = run_load(
        &load,
        &token,
        MANY,
        64,
        &replicas.addrs(),
        Duration::from_secs(300),
    );
    eprintln!(
        "200 joins over 3 controllers: {} s, all know all after {} s; one more join reached all in p99 {} ms",
        report["join_span_s"], report["converged_s"], report["extra_join"]["p99_ms"]
    );
    assert_eq!(report["joined"].as_u64(), Some(MANY), "{report:#}");
    assert_eq!(report["failed"].as_u64(), Some(0), "{report:#}");
    assert!(
        report["converged_s"].is_number(),
        "not every node came to know every other: {report:#}"
    );
    // The extra join went through one controller; nodes on all three heard of it.
    assert_eq!(
        report["extra_join"]["within_10s"].as_u64(),
        Some(MANY),
        "{report:#}"
    );
    let listed: Value = serde_json::from_str(
        &replicas
            .admin(2, &["node", "list", NET, "--json"])
            .ok()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let addresses: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["address"].as_str().unwrap())
        .collect();
    let unique: std::collections::BTreeSet<&&str> = addresses.iter().collect();
    assert_eq!(
        addresses.len() as u64,
        MANY,
        "the extra node left: {listed:#}"
    );
    assert_eq!(unique.len(), addresses.len(), "an address was given twice");
}
