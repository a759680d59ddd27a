//! IPv6 subnet routes and exits (issue 17): over a dual-stack overlay, each node advertises an
//! IPv6 pod prefix beside its IPv4 one, the network's policy approves both, and pods reach each
//! other over IPv6 through mesh0; a forwarded IPv6 packet the path cannot carry is answered with
//! "packet too big" so the pod adapts; a node offers `::/0` as an exit and another sends its IPv6
//! traffic to the world through it. Pod and registry ranges (fd00:10:244::/48, 2001:db8:80::/64)
//! exist only inside the lab.
#![allow(clippy::unwrap_used)]

use mesh_e2e::cni::{CniBridge, FlannelNode};
use mesh_e2e::netns::ip;
use mesh_e2e::{wait_for, wait_until, Agent, Controller, Host, Lab, Netns};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

const NET: &str = "pods6";
const OVERLAY6: &str = "fd5e:1e55:7100::/64";

/// One `ping -6` (payload `size`, DF when `size` is given) from `from` to `to`.
fn ping6(from: &Host, to: Ipv6Addr, size: Option<usize>) -> mesh_e2e::Output {
    let mut args = vec!["-6", "-n", "-c", "1", "-W", "2"];
    let size = size.map(|s| s.to_string());
    if let Some(size) = &size {
        args.extend(["-M", "do", "-s", size.as_str()]);
    }
    let to = to.to_string();
    args.push(&to);
    from.run("ping", &args)
}

fn wait_ping6(from: &Host, to: Ipv6Addr, timeout: Duration) -> bool {
    wait_until(timeout, || ping6(from, to, None).success())
}

fn run_ok(host: &Host, bin: &str, args: &[&str]) {
    let out = host.run(bin, args);
    assert!(out.success(), "{bin} {args:?} on {}: {out}", host.name);
}

/// Gives a node's `cni0` the pod gateway fd00:10:244:N::1/64 and its pod fd00:10:244:N::2 with a
/// default route through it, and turns IPv6 forwarding on, as a dual-stack CNI does. Returns the
/// pod's IPv6 address.
fn dual_stack_pod(node: &Host, pods: &CniBridge, index: u8) -> Ipv6Addr {
    let gateway = format!("fd00:10:244:{index:x}::1");
    let pod = format!("fd00:10:244:{index:x}::2");
    ip([
        "-n",
        &node.ns,
        "-6",
        "addr",
        "add",
        &format!("{gateway}/64"),
        "dev",
        "cni0",
        "nodad",
    ])
    .unwrap();
    ip([
        "-n",
        &pods.pod.ns,
        "-6",
        "addr",
        "add",
        &format!("{pod}/64"),
        "dev",
        "eth0",
        "nodad",
    ])
    .unwrap();
    ip([
        "-n",
        &pods.pod.ns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        &gateway,
    ])
    .unwrap();
    run_ok(node, "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    pod.parse().unwrap()
}

fn has_route6(host: &Host, prefix: &str) -> bool {
    host.run("ip", ["-6", "route", "show", prefix])
        .stdout
        .contains("dev mesh0")
}

#[test]
fn ipv6_pod_prefixes_are_routed_and_oversized_packets_are_answered() {
    let mut lab = Lab::new("routes6").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let hosts: Vec<Host> = ["a", "b"]
        .iter()
        .map(|n| lab.add_host(n).unwrap())
        .collect();
    // b's link carries 1400-byte frames: the path between a and b holds inner packets of at
    // most 1340 bytes, less than mesh0's 1420.
    lab.set_link_mtu(&hosts[1], 1400).unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.admin(["network", "create", NET, "--cidr6", OVERLAY6])
        .ok()
        .unwrap();
    let out = ctl.admin([
        "network",
        "set",
        NET,
        "--auto-approve-routes",
        "10.244.0.0/16,fd00:10:244::/48",
    ]);
    assert!(out.success(), "{out}");
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let mut agents = Vec::new();
    let mut bridges = Vec::new();
    let mut pods6 = Vec::new();
    for (host, index) in hosts.iter().zip([1u8, 2]) {
        let node = FlannelNode {
            host: host.clone(),
            index,
            overlay: Ipv4Addr::UNSPECIFIED,
        };
        let bridge = CniBridge::new(&node, 1420).unwrap();
        pods6.push(dual_stack_pod(host, &bridge, index));
        bridges.push(bridge);
        let prefixes = format!("10.244.{index}.0/24,fd00:10:244:{index:x}::/64");
        agents.push(
            Agent::join_with(
                &lab,
                host,
                &host.name,
                &token,
                &["--advertise-routes", &prefixes],
            )
            .unwrap(),
        );
    }
    let (a, b) = (&agents[0], &agents[1]);
    let (pod_a, pod_b) = (&bridges[0].pod.clone(), &bridges[1].pod.clone());

    // Both families of each node's prefixes are approved by the policy and routed on the other.
    assert!(
        wait_until(Duration::from_secs(30), || has_route6(
            &a.host,
            "fd00:10:244:2::/64"
        )),
        "{}\n{}",
        ctl.admin(["route", "list", NET]).stdout,
        a.host.run("ip", ["-6", "route"]).stdout
    );
    let routes: serde_json::Value =
        serde_json::from_str(&b.cli(["routes", "list", "--json"]).stdout).unwrap();
    let states: Vec<(String, String)> = routes["advertised"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["prefix"].as_str().unwrap().to_owned(),
                r["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        states.contains(&("fd00:10:244:2::/64".into(), "approved".into())),
        "{routes}"
    );
    assert!(states.contains(&("10.244.2.0/24".into(), "approved".into())));

    // Pods reach each other over IPv6 (and still over IPv4), both ways.
    assert!(
        wait_ping6(pod_a, pods6[1], Duration::from_secs(20)),
        "pod a -> pod b over IPv6: {}",
        a.host
            .run("ip", ["-6", "route", "get", &pods6[1].to_string()])
    );
    assert!(wait_ping6(pod_b, pods6[0], Duration::from_secs(10)));
    assert!(pod_a.wait_ping(bridges[1].pod_ip, Duration::from_secs(10)));

    // The path to b is smaller than mesh0: once a knows it, a pod's oversized IPv6 packet is
    // answered with "packet too big" (routers never fragment IPv6) and the pod's kernel lowers
    // its path MTU, so the next packets fit.
    let mtu = wait_for(Duration::from_secs(40), || {
        a.peer("b").ok()?["path_mtu"].as_u64().filter(|m| *m < 1420)
    })
    .unwrap_or_else(|| panic!("no reduced path MTU: {:#}", a.status().unwrap()));
    assert!((1332..=1340).contains(&mtu), "path MTU {mtu}");
    let too_big = usize::try_from(mtu).unwrap() + 60 - 48;
    let first = ping6(pod_a, pods6[1], Some(too_big));
    assert!(
        !first.success(),
        "a packet larger than the path got through: {first}"
    );
    eprintln!("routes6: the pod's first oversized ping: {first}");
    let b_pod = pods6[1].to_string();
    assert!(
        wait_until(Duration::from_secs(5), || pod_a
            .run("ip", ["-6", "route", "get", &b_pod])
            .stdout
            .contains(&format!("mtu {mtu}"))),
        "the pod learned no path MTU: {}",
        pod_a.run("ip", ["-6", "route", "get", &b_pod])
    );
    let again = ping6(pod_a, pods6[1], Some(too_big));
    let text = format!("{}{}", again.stdout, again.stderr);
    assert!(
        !again.success() && (text.contains("too long") || text.contains("mtu")),
        "{text}"
    );
    let fits = ping6(pod_a, pods6[1], Some(usize::try_from(mtu).unwrap() - 48));
    assert!(fits.success(), "a packet the size of the path: {fits}");
    let answered = a.status().unwrap()["counters"]["too_big_packets"]
        .as_u64()
        .unwrap_or(0);
    assert!(answered >= 1, "{:#}", a.status().unwrap());

    // b withdraws its IPv6 prefix while a is down: mesh0 and its routes outlive a's agent, and
    // the restarted agent leaves no stale IPv6 route behind; the IPv4 one stays.
    agents[0].stop();
    let out = agents[1].cli(["routes", "withdraw", "fd00:10:244:2::/64"]);
    assert!(out.success(), "{out}");
    let a = &mut agents[0];
    assert!(
        has_route6(&a.host, "fd00:10:244:2::/64"),
        "kept over the stop"
    );
    a.up().unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || !has_route6(
            &a.host,
            "fd00:10:244:2::/64"
        )),
        "{}",
        a.host.run("ip", ["-6", "route"]).stdout
    );
    assert!(!ping6(pod_a, pods6[1], None).success());
    assert!(pod_a.wait_ping(bridges[1].pod_ip, Duration::from_secs(20)));
    drop((agents, bridges, ctl, lab));
}

#[test]
fn an_ipv6_exit_carries_a_nodes_ipv6_traffic_to_the_world() {
    const REGISTRY: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x80, 0, 0, 0, 0, 0x80);
    let mut lab = Lab::new("exits6").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let a_host = lab.add_host("a").unwrap();
    let b_host = lab.add_host("b").unwrap();
    let c_host = lab.add_host("c").unwrap();
    // A registry that only a reaches, with no route back to the overlay: answers arrive only
    // if a masquerades.
    let registry = Netns::new().unwrap();
    ip([
        "-n",
        &a_host.ns,
        "link",
        "add",
        "rg0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        registry.name(),
    ])
    .unwrap();
    ip([
        "-n",
        &a_host.ns,
        "-6",
        "addr",
        "add",
        "2001:db8:80::1/64",
        "dev",
        "rg0",
        "nodad",
    ])
    .unwrap();
    ip(["-n", &a_host.ns, "link", "set", "rg0", "up"]).unwrap();
    ip([
        "-n",
        registry.name(),
        "-6",
        "addr",
        "add",
        "2001:db8:80::80/64",
        "dev",
        "eth0",
        "nodad",
    ])
    .unwrap();
    ip(["-n", registry.name(), "link", "set", "eth0", "up"]).unwrap();
    run_ok(
        &a_host,
        "sysctl",
        &["-qw", "net.ipv6.conf.all.forwarding=1"],
    );

    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.admin(["network", "create", NET, "--cidr6", OVERLAY6])
        .ok()
        .unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join_with(&lab, &a_host, "a", &token, &["--advertise-exit", "::/0"]).unwrap();
    let b = Agent::join_with(&lab, &b_host, "b", &token, &["--exit-node", "a"]).unwrap();
    let c = Agent::join(&lab, &c_host, "c", &token).unwrap();

    // Offered, pending: nobody goes through it.
    let list = ctl.admin(["route", "list", NET]);
    assert!(
        list.stdout
            .lines()
            .any(|l| l.contains("::/0") && l.contains("exit") && l.contains("pending")),
        "{list}"
    );
    assert!(!ping6(&b.host, REGISTRY, None).success());

    let out = ctl.admin(["route", "approve", NET, "::/0"]);
    assert!(out.success(), "{out}");
    assert!(
        wait_until(Duration::from_secs(15), || ping6(&b.host, REGISTRY, None)
            .success()),
        "b through the IPv6 exit: {}\n{}",
        b.status().unwrap()["exits"],
        b.host.run("ip", ["-6", "rule"]).stdout
    );
    let using = b.status().unwrap()["exits"]["using"].clone();
    let active = |prefix: &str| {
        using
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["prefix"] == prefix)
            .map(|u| u["active"] == true)
    };
    assert_eq!(active("::/0"), Some(true), "{using}");
    assert_eq!(
        active("0.0.0.0/0"),
        Some(false),
        "a offers no IPv4 exit: {using}"
    );
    assert!(
        !ping6(&c.host, REGISTRY, None).success(),
        "c did not choose it"
    );
    // b's own packets keep the underlay, and the overlay works over both families.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(b.status().unwrap()["controller"]["connected"], true);
    assert!(b.host.ping(a.address) && b.host.ping(c.address));
    let c6: Ipv6Addr = c.cli(["ip", "-6"]).stdout.trim().parse().unwrap();
    assert!(
        ping6(&b.host, c6, None).success(),
        "b -> c over the IPv6 overlay"
    );

    // Rejected: b stops using it.
    let out = ctl.admin(["route", "reject", NET, "::/0"]);
    assert!(out.success(), "{out}");
    assert!(wait_until(Duration::from_secs(10), || !b
        .host
        .run("ip", ["-6", "route", "show", "table", "28019"])
        .stdout
        .contains("mesh0")));
    assert!(!ping6(&b.host, REGISTRY, None).success());
    drop((a, b, c, registry));
}
