//! A member cannot use a node as a router, and mesh's own packets stay off the overlay.
//!
//! Node a runs with `ip_forward=1` (Kubernetes needs it) and has a LAN behind it. Member b,
//! with its agent stopped, speaks WireGuard with its own key through a crafted client
//! (`mesh-e2e-member`) and sends a's LAN, a's cloud metadata address and a pod-like address
//! echo requests through the tunnel: nothing may reach them, while what b addresses to a itself
//! is still answered (so the session was real and the drops are a's doing).
#![allow(clippy::unwrap_used)]

use mesh_e2e::netns::ip;
use mesh_e2e::{wait_all_pairs_ping, wait_until, Agent, Controller, Lab, Netns};
use std::time::Duration;

const NET: &str = "guard";
const LAN_HOST: &str = "198.51.100.2";

#[test]
fn a_member_cannot_route_through_a_node_and_own_packets_bypass_the_overlay() {
    let mut lab = Lab::new("forwarding-guard").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let a_host = lab.add_host("a").unwrap();
    let b_host = lab.add_host("b").unwrap();

    // a's LAN (a documentation range inside the lab): one host behind a, a router for it.
    let lan = Netns::new().unwrap();
    ip([
        "-n",
        a_host.ns.as_str(),
        "link",
        "add",
        "lan0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        lan.name(),
    ])
    .unwrap();
    ip([
        "-n",
        &a_host.ns,
        "addr",
        "add",
        "198.51.100.1/24",
        "dev",
        "lan0",
    ])
    .unwrap();
    ip(["-n", &a_host.ns, "link", "set", "lan0", "up"]).unwrap();
    ip([
        "-n",
        lan.name(),
        "addr",
        "add",
        "198.51.100.2/24",
        "dev",
        "eth0",
    ])
    .unwrap();
    ip(["-n", lan.name(), "link", "set", "eth0", "up"]).unwrap();
    ip([
        "-n",
        lan.name(),
        "route",
        "add",
        "default",
        "via",
        "198.51.100.1",
    ])
    .unwrap();
    let fwd = a_host.run("sysctl", ["-w", "net.ipv4.ip_forward=1"]);
    assert!(fwd.success(), "{fwd}");
    // What reaches the LAN host from the overlay range is counted there.
    let watch = "table ip watch {\n\
                 \tchain input {\n\
                 \t\ttype filter hook input priority 0; policy accept;\n\
                 \t\tip saddr 100.64.0.0/10 counter\n\
                 \t}\n\
                 }\n";
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", lan.name(), "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(watch.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(out.success());
    let reached_lan = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                lan.name(),
                "nft",
                "list",
                "table",
                "ip",
                "watch",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split("packets ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no counter in {text}"))
    };

    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(&lab, &a_host, "a", &token).unwrap();
    let mut b = Agent::join(&lab, &b_host, "b", &token).unwrap();
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();

    // mesh's own packets carry the bypass mark, and the rules keep them off mesh0.
    let rules = a_host.run("ip", ["rule"]);
    assert!(
        rules
            .stdout
            .contains("fwmark 0x1000000/0x1000000 lookup main suppress_ifgroup")
            && rules
                .stdout
                .contains("fwmark 0x1000000/0x1000000 unreachable"),
        "{rules}"
    );
    let marked = a_host.run(
        "ip",
        ["route", "get", &b.address.to_string(), "mark", "0x1000000"],
    );
    assert!(
        !marked.success(),
        "a marked packet to an overlay address must find no route: {marked}"
    );
    let status = a.status().unwrap();
    assert_eq!(status["overlay"]["sockets_marked"], true, "{status:#}");
    assert_eq!(status["overlay"]["bypass_rule"], true, "{status:#}");
    let guard = a_host.run("nft", ["list", "chain", "inet", "mesh", "guard"]);
    assert!(
        guard.success() && guard.stdout.contains("iifname \"mesh0\""),
        "{guard}"
    );

    // b's agent stops; b's key now speaks through a client that sends whatever it likes.
    b.stop();
    let a_key = status["node"]["key"].as_str().unwrap().to_string();
    let key_file = b.state_dir.join("node.key");
    let member = env!("CARGO_BIN_EXE_mesh-e2e-member");
    let a_underlay = format!("{}:51820", a_host.ip);
    let b_overlay = b.address.to_string();
    let a_overlay = a.address.to_string();
    let out = b_host.run(
        member,
        [
            key_file.to_str().unwrap(),
            a_key.as_str(),
            a_underlay.as_str(),
            "0.0.0.0:51820",
            b_overlay.as_str(),
            a_overlay.as_str(),
            LAN_HOST,
            "169.254.169.254",
            "10.244.3.7",
        ],
    );
    assert!(out.success(), "{out}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(&format!("{a_overlay} replies=")) && !l.ends_with("=0")),
        "a did not answer what was addressed to it, so the test proves nothing: {out}"
    );
    assert!(
        out.stdout.contains(&format!("{LAN_HOST} replies=0")),
        "a routed b's packets into its LAN: {out}"
    );
    assert_eq!(reached_lan(), 0, "packets from the overlay reached a's LAN");
    let counters = a.status().unwrap()["counters"].clone();
    assert!(
        counters["misdirected_packets"].as_u64().unwrap() >= 15,
        "{counters:#}"
    );

    // The rules go with the daemon.
    let mut a = a;
    a.stop();
    assert!(
        wait_until(Duration::from_secs(5), || {
            !a_host.run("ip", ["rule"]).stdout.contains("0x1000000")
        }),
        "the bypass rules stayed after the agent stopped"
    );
}
