//! Exits (issue 16): site a offers 0.0.0.0/0 as an exit; b (behind a NAT) sends everything
//! through it (`--exit-node a`), c only one prefix (`--use-routes "192.0.2.0/24 via a"`), d
//! nothing. Behind a sits a "registry" (192.0.2.80) that only a reaches, and that has no route
//! back to the overlay, so answers arrive only if a masquerades. mesh's own packets (WireGuard,
//! QUIC to the controller) must keep leaving through the underlay while b's default route is
//! the exit.
#![allow(clippy::unwrap_used)]

use mesh_e2e::natlab::{NatKind, NatLab};
use mesh_e2e::netns::ip;
use mesh_e2e::{wait_until, Agent, Controller, Host, Netns};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const NET: &str = "exits";
const REGISTRY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);

fn ping(host: &Host, to: Ipv4Addr) -> bool {
    host.run("ping", ["-n", "-c", "1", "-W", "1", &to.to_string()])
        .success()
}

fn status(agent: &Agent) -> serde_json::Value {
    agent.status().unwrap()
}

#[test]
fn a_site_is_an_exit_only_for_the_nodes_that_choose_it() {
    let mut nat = NatLab::new("exits").unwrap();
    let ctl_host = nat.controller_host();
    let cone = nat.add_router("cone", NatKind::PortRestricted).unwrap();
    let a_host = nat.add_public_host("a").unwrap();
    let b_host = nat.add_host_behind(&cone, "b").unwrap();
    let c_host = nat.add_public_host("c").unwrap();
    let d_host = nat.add_public_host("d").unwrap();
    // The registry: reachable from a's namespace alone, with no route anywhere else.
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
        "addr",
        "add",
        "192.0.2.1/24",
        "dev",
        "rg0",
    ])
    .unwrap();
    ip(["-n", &a_host.ns, "link", "set", "rg0", "up"]).unwrap();
    ip([
        "-n",
        registry.name(),
        "addr",
        "add",
        "192.0.2.80/24",
        "dev",
        "eth0",
    ])
    .unwrap();
    ip(["-n", registry.name(), "link", "set", "eth0", "up"]).unwrap();
    // An exit forwards, as its operator sets it up.
    assert!(a_host
        .run("sysctl", ["-qw", "net.ipv4.ip_forward=1"])
        .success());

    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join_with(
        nat.lab(),
        &a_host,
        "a",
        &token,
        &["--advertise-exit", "0.0.0.0/0"],
    )
    .unwrap();
    let b = Agent::join_with(nat.lab(), &b_host, "b", &token, &["--exit-node", "a"]).unwrap();
    let c = Agent::join_with(
        nat.lab(),
        &c_host,
        "c",
        &token,
        &["--use-routes", "192.0.2.0/24 via a"],
    )
    .unwrap();
    let d = Agent::join(nat.lab(), &d_host, "d", &token).unwrap();

    // Offered, not yet approved: nobody goes through it.
    let list = ctl.admin(["route", "list", NET]);
    assert!(
        list.stdout
            .lines()
            .any(|l| l.contains("0.0.0.0/0") && l.contains("exit") && l.contains("pending")),
        "{list}"
    );
    assert!(!ping(&b.host, REGISTRY));
    assert_eq!(
        status(&b)["exits"]["using"][0]["active"],
        false,
        "{}",
        status(&b)
    );

    // Approved: b and c reach the registry through a within seconds; d, which did not choose
    // the exit, does not.
    let out = ctl.admin(["route", "approve", NET, "0.0.0.0/0"]);
    assert!(out.success(), "{out}");
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || ping(&b.host, REGISTRY)),
        "b through the exit: {}\n{}",
        status(&b)["exits"],
        b.host.run("ip", ["rule"]).stdout
    );
    let b_took = t0.elapsed();
    assert!(wait_until(Duration::from_secs(10), || ping(
        &c.host, REGISTRY
    )));
    assert!(!ping(&d.host, REGISTRY), "d did not choose the exit");
    eprintln!("exits: b reached the registry through a {b_took:?} after the approval");
    assert_eq!(status(&b)["exits"]["using"][0]["active"], true);
    let table = b.host.run("ip", ["route", "show", "table", "28019"]);
    assert!(table.stdout.contains("default dev mesh0"), "{table}");

    // The kernel's answer: an ordinary packet to the controller goes into the exit, one with
    // mesh's mark goes out the underlay.
    let plain = b.host.run("ip", ["route", "get", "203.0.113.1"]);
    assert!(plain.stdout.contains("dev mesh0"), "{plain}");
    let marked = b
        .host
        .run("ip", ["route", "get", "203.0.113.1", "mark", "0x1000000"]);
    assert!(marked.stdout.contains("dev eth0"), "{marked}");
    // mesh's own packets kept the underlay: b's control connection and its tunnels live on,
    // and the overlay still works between every pair, after several keepalive rounds.
    std::thread::sleep(Duration::from_secs(3));
    assert!(ping(&b.host, c.address) && ping(&b.host, d.address) && ping(&b.host, a.address));
    let control = &status(&b)["controller"];
    assert_eq!(control["connected"], true, "{control}");
    // A more specific route of b's own (its LAN) still wins over the exit.
    assert!(
        ping(&b.host, Ipv4Addr::new(198, 51, 100, 1)),
        "b's router on its LAN"
    );

    // The administrator rejects the exit: b and c stop using it.
    let out = ctl.admin(["route", "reject", NET, "0.0.0.0/0"]);
    assert!(out.success(), "{out}");
    assert!(wait_until(Duration::from_secs(10), || !b
        .host
        .run("ip", ["route", "show", "table", "28019"])
        .stdout
        .contains("mesh0")));
    assert!(!ping(&b.host, REGISTRY));
    drop((a, b, c, d, registry));
}
