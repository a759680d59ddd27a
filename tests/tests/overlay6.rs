//! The dual-stack overlay (issue 17): three nodes get IPv6 addresses in the network's ULA
//! prefix beside their IPv4 ones, every pair pings over both families, the IPv6 address
//! survives an agent restart, and a packet from a source its sender does not own is dropped.
#![allow(clippy::unwrap_used)]

use mesh_e2e::{wait_all_pairs_ping, wait_until, Agent, Controller, Lab};
use std::collections::BTreeSet;
use std::net::Ipv6Addr;
use std::time::Duration;

const NET: &str = "lab6";
const PREFIX: &str = "fd5e:1e55:7000::/64";

/// `mesh ip -6` of an agent, parsed.
fn ip6(a: &Agent) -> Ipv6Addr {
    let out = a.cli(["ip", "-6"]).ok().unwrap();
    let text = out
        .stdout
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("`mesh ip -6` output does not end in a newline: {out}"));
    text.parse()
        .unwrap_or_else(|e| panic!("`mesh ip -6` printed {text:?}, not one address ({e}): {out}"))
}

/// One `ping -6` from `from` to `to` (optionally from source `src`); whether it was answered.
fn ping6(from: &Agent, to: Ipv6Addr, src: Option<Ipv6Addr>) -> bool {
    let mut args = vec![
        "-6".to_owned(),
        "-n".into(),
        "-c".into(),
        "1".into(),
        "-W".into(),
        "1".into(),
    ];
    if let Some(src) = src {
        args.extend(["-I".into(), src.to_string()]);
    }
    args.push(to.to_string());
    from.host.run("ping", &args).success()
}

fn spoofed(a: &Agent) -> u64 {
    a.status().unwrap()["counters"]["spoofed_packets"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn three_nodes_ping_over_both_families_and_keep_their_ipv6_address() {
    let mut lab = Lab::new("overlay6").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let hosts: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| lab.add_host(n).unwrap())
        .collect();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.admin(["network", "create", NET, "--cidr6", PREFIX])
        .ok()
        .unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let mut agents: Vec<Agent> = hosts
        .iter()
        .map(|h| Agent::join(&lab, h, &h.name, &token).unwrap())
        .collect();
    let in_prefix = |a: &Ipv6Addr| a.segments()[..4] == [0xfd5e, 0x1e55, 0x7000, 0];

    // Each node has a distinct address in the prefix, on mesh0 with the prefix's length; the
    // controller lists the same.
    let addrs: Vec<Ipv6Addr> = agents.iter().map(ip6).collect();
    let distinct: BTreeSet<Ipv6Addr> = addrs.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "{addrs:?}");
    assert!(addrs.iter().all(in_prefix), "{addrs:?}");
    let nodes = ctl.nodes(NET).unwrap();
    for (a, addr) in agents.iter().zip(&addrs) {
        let on_link = a
            .host
            .run("ip", ["-6", "-o", "addr", "show", "dev", "mesh0"])
            .ok()
            .unwrap()
            .stdout;
        assert!(on_link.contains(&format!("{addr}/64")), "{on_link}");
        assert!(
            !on_link.contains("fe80:"),
            "no link-local address on mesh0 (no router solicitations): {on_link}"
        );
        let listed = nodes.iter().find(|n| n["name"] == a.name.as_str()).unwrap();
        assert_eq!(listed["address6"], addr.to_string(), "{listed:#}");
        // `mesh ip` stays the IPv4 one.
        assert_eq!(a.ip().unwrap(), a.address);
        // kubelet's node IP for a dual-stack cluster names both, IPv4 first.
        let kubelet = a
            .cli([
                "kubeadm",
                "node-ip",
                "--dual-stack",
                "--dry-run",
                "--file",
                "/nonexistent/kubelet",
            ])
            .ok()
            .unwrap()
            .stdout;
        assert!(
            kubelet.contains(&format!("--node-ip={},{addr}", a.address)),
            "{kubelet}"
        );
    }

    // Every pair, both families.
    let refs: Vec<&Agent> = agents.iter().collect();
    wait_all_pairs_ping(&refs, Duration::from_secs(20)).unwrap();
    for (i, a) in agents.iter().enumerate() {
        for (j, to) in addrs.iter().enumerate() {
            if i != j {
                assert!(
                    wait_until(Duration::from_secs(10), || ping6(a, *to, None)),
                    "{} cannot ping6 {to}",
                    a.name
                );
            }
        }
        // Status shows both families, for the node and for its peers.
        let status = a.status().unwrap();
        assert_eq!(status["node"]["address6"], addrs[i].to_string());
        assert_eq!(status["node"]["prefix6"], PREFIX);
        for p in status["peers"].as_array().unwrap() {
            let j = agents.iter().position(|o| o.name == p["name"]).unwrap();
            assert_eq!(p["address6"], addrs[j].to_string(), "{status:#}");
        }
    }

    // A restart keeps the address (from node.json), even with the controller gone.
    let mut ctl = ctl;
    ctl.stop();
    let b = &mut agents[1];
    b.stop();
    b.up().unwrap();
    assert_eq!(ip6(b), addrs[1], "the IPv6 address after a restart");
    assert!(
        wait_until(Duration::from_secs(20), || ping6(
            &agents[0], addrs[1], None
        )),
        "a reaches b's IPv6 address again after b's restart during the outage"
    );
    ctl.serve().unwrap();

    // a claims a source it does not own (another address of the ULA, put on its mesh0): its
    // packets reach b's tunnel, where the source check drops them.
    let forged: Ipv6Addr = "fd5e:1e55:7000::bad".parse().unwrap();
    agents[0]
        .host
        .run(
            "ip",
            [
                "-6",
                "addr",
                "add",
                &format!("{forged}/128"),
                "dev",
                "mesh0",
                "nodad",
            ],
        )
        .ok()
        .unwrap();
    let before = spoofed(&agents[1]);
    for _ in 0..3 {
        assert!(
            !ping6(&agents[0], addrs[1], Some(forged)),
            "a ping from a forged source was answered"
        );
    }
    assert!(
        wait_until(Duration::from_secs(5), || spoofed(&agents[1]) >= before + 3),
        "b counted {} spoofed packets, expected at least {}",
        spoofed(&agents[1]),
        before + 3
    );
    // The real address still works.
    assert!(ping6(&agents[0], addrs[1], Some(addrs[0])));
}
