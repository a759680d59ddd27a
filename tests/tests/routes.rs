//! Subnet routes (issue 16): each node advertises its pod subnet, the controller approves it
//! (by network policy or by the admin), and pods on different nodes reach each other through
//! mesh0 with no second encapsulation. Pods are namespaces on a `cni0` bridge, as the CNI
//! `bridge` plugin makes them; the pod range 10.244.0.0/16 exists only inside the lab.
#![allow(clippy::unwrap_used)]

use mesh_e2e::cni::{CniBridge, FlannelNode};
use mesh_e2e::{wait_until, Agent, Controller, Lab};
use std::net::Ipv4Addr;
use std::time::Duration;

const NET: &str = "pods";

/// Hosts a, b, c with pods in 10.244.1.0/24, 10.244.2.0/24 and 10.244.200.0/24; the network
/// approves 10.244.0.0/17 by itself, so c's prefix waits for the administrator.
struct Cluster {
    lab: Lab,
    ctl: Controller,
    agents: Vec<Agent>,
    pods: Vec<CniBridge>,
}

fn cluster(label: &str) -> Cluster {
    let (lab, ctl, hosts, token) =
        mesh_e2e::daemons::lab_with_network(label, NET, &["a", "b", "c"]).unwrap();
    let out = ctl.admin([
        "network",
        "set",
        NET,
        "--auto-approve-routes",
        "10.244.0.0/17",
    ]);
    assert!(out.success(), "{out}");
    let mut agents = Vec::new();
    let mut pods = Vec::new();
    for (host, index) in hosts.iter().zip([1u8, 2, 200]) {
        let node = FlannelNode {
            host: host.clone(),
            index,
            overlay: Ipv4Addr::UNSPECIFIED,
        };
        pods.push(CniBridge::new(&node, 1420).unwrap());
        let subnet = format!("10.244.{index}.0/24");
        agents.push(
            Agent::join_with(
                &lab,
                host,
                &host.name,
                &token,
                &["--advertise-routes", &subnet],
            )
            .unwrap(),
        );
    }
    Cluster {
        lab,
        ctl,
        agents,
        pods,
    }
}

fn has_route(host: &mesh_e2e::Host, prefix: &str) -> bool {
    host.run("ip", ["route", "show", prefix])
        .stdout
        .contains("dev mesh0")
}

#[test]
fn pods_reach_each_other_through_approved_routes_and_nothing_else_is_routed() {
    let c = cluster("routes");
    let (a, b, cc) = (&c.agents[0], &c.agents[1], &c.agents[2]);
    let (pa, pb, pc) = (&c.pods[0], &c.pods[1], &c.pods[2]);
    let _ = &c.lab;
    // a's and b's pods: approved by the network's policy, routed both ways.
    assert!(
        pa.pod.wait_ping(pb.pod_ip, Duration::from_secs(30)),
        "{}",
        c.ctl.admin(["route", "list", NET]).stdout
    );
    assert!(pb.pod.wait_ping(pa.pod_ip, Duration::from_secs(10)));
    // Full-size packets, not fragmented: mesh0's MTU is the pods' MTU, no second header.
    let big = pa.pod.run(
        "ping",
        [
            "-n",
            "-c",
            "3",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            "1372",
            &pb.pod_ip.to_string(),
        ],
    );
    assert!(big.success(), "a 1400-byte DF ping between pods: {big}");

    // c's prefix is outside the policy: pending, routed nowhere, and its pod unreachable.
    let routes: serde_json::Value =
        serde_json::from_str(&cc.cli(["routes", "list", "--json"]).stdout).unwrap();
    assert_eq!(routes["advertised"][0]["state"], "pending", "{routes}");
    assert!(!has_route(&a.host, "10.244.200.0/24"));
    assert!(
        !pa.pod.ping(pc.pod_ip),
        "a pending prefix must not be routed"
    );

    // The administrator approves it: every node routes it within seconds.
    let out = c.ctl.admin(["route", "approve", NET, "10.244.200.0/24"]);
    assert!(out.success(), "{out}");
    assert!(wait_until(Duration::from_secs(5), || has_route(
        &a.host,
        "10.244.200.0/24"
    )));
    assert!(pa.pod.wait_ping(pc.pod_ip, Duration::from_secs(10)));

    // b withdraws its prefix at run time: the routes go everywhere, and so does the traffic.
    let out = b.cli(["routes", "withdraw", "10.244.2.0/24"]);
    assert!(out.success(), "{out}");
    assert!(
        wait_until(Duration::from_secs(5), || !has_route(
            &a.host,
            "10.244.2.0/24"
        )),
        "{}",
        a.host.run("ip", ["route"]).stdout
    );
    assert!(!pa.pod.ping(pb.pod_ip));
}

#[test]
fn a_peer_cannot_send_from_another_nodes_prefix() {
    let Cluster {
        lab,
        ctl: _ctl,
        mut agents,
        pods,
    } = cluster("spoof");
    let mut b = agents.remove(1);
    let a = &agents[0];
    let (pa, pb) = (&pods[0], &pods[1]);
    assert!(pa.pod.wait_ping(pb.pod_ip, Duration::from_secs(30)));
    let a_key = a.status().unwrap()["node"]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = a.status().unwrap()["counters"]["spoofed_packets"]
        .as_u64()
        .unwrap();
    // b's agent stops; b's key speaks through a client that picks its own source addresses.
    b.stop();
    let key_file = b.state_dir.join("node.key");
    let member = env!("CARGO_BIN_EXE_mesh-e2e-member");
    let a_underlay = format!("{}:51820", a.host.ip);
    let send = |source: &str| {
        b.host.run(
            member,
            [
                key_file.to_str().unwrap(),
                a_key.as_str(),
                a_underlay.as_str(),
                "0.0.0.0:51820",
                source,
                &pa.pod_ip.to_string(),
            ],
        )
    };
    // From inside b's own approved prefix: a's pod answers.
    let own = send("10.244.2.9");
    assert!(own.success(), "{own}");
    assert!(
        own.stdout.lines().any(|l| !l.ends_with("replies=0")),
        "b's own prefix is a source b may use: {own}"
    );
    // From c's prefix: dropped by a and counted.
    let spoofed = send("10.244.200.9");
    assert!(spoofed.success(), "{spoofed}");
    assert!(spoofed.stdout.contains("replies=0"), "{spoofed}");
    let after = a.status().unwrap()["counters"]["spoofed_packets"]
        .as_u64()
        .unwrap();
    assert!(after >= before + 5, "spoofed_packets {before} -> {after}");
    drop(lab);
}

#[test]
fn routes_survive_an_agent_restart_while_the_controller_is_down() {
    let Cluster {
        lab: _lab,
        mut ctl,
        mut agents,
        pods,
    } = cluster("routes-cache");
    let (pa, pb) = (&pods[0], &pods[1]);
    assert!(pa.pod.wait_ping(pb.pod_ip, Duration::from_secs(30)));
    ctl.kill9();
    // a restarts (mesh0 and its routes stay; the agent reconciles them from its caches).
    let a = &mut agents[0];
    a.stop();
    a.host.run("ip", ["route", "del", "10.244.2.0/24"]);
    a.up().unwrap();
    assert!(wait_until(Duration::from_secs(10), || has_route(
        &a.host,
        "10.244.2.0/24"
    )));
    assert!(pa.pod.wait_ping(pb.pod_ip, Duration::from_secs(20)));
    assert!(pb.pod.wait_ping(pa.pod_ip, Duration::from_secs(10)));
}
