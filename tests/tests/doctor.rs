#![allow(clippy::unwrap_used)]
//! `mesh doctor` in namespaces: a node where every check the test controls passes, and one that
//! fails several (ip_forward off, a local network in the pod range, a CNI MTU above mesh0's, a
//! forward chain that drops, a proxy whose NO_PROXY misses the overlay, a stale kubelet file).
//! br_netfilter, swap and firewalld/ufw belong to the host that runs the test: their lines are
//! whatever the host has, and only their presence is asserted.

use mesh_e2e::daemons::{lab_with_network, Agent};
use mesh_e2e::mesh_bin;
use mesh_e2e::netns::Host;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Checks that depend on the machine running the test, not on its namespaces.
const HOST_WIDE: &[&str] = &[
    "br_netfilter",
    "bridge_nf_call_iptables",
    "swap",
    "host_firewall",
];

fn sh(host: &Host, args: &[&str]) {
    let out = host.run(args[0], &args[1..]);
    assert!(out.success(), "{out:?}");
}

/// `mesh doctor ARGS` in the agent's host, with exactly the proxy variables given.
fn doctor(agent: &Agent, proxy: &[(&str, &str)], args: &[&str]) -> mesh_e2e::Output {
    let mut argv: Vec<String> = [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
    ]
    .iter()
    .flat_map(|v| ["-u".to_owned(), (*v).to_owned()])
    .collect();
    argv.extend(proxy.iter().map(|(k, v)| format!("{k}={v}")));
    argv.push(mesh_bin().unwrap().to_string_lossy().into_owned());
    argv.push("doctor".into());
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    argv.push("--state-dir".into());
    argv.push(agent.state_dir.to_string_lossy().into_owned());
    agent.host.run("env", &argv)
}

fn checks(out: &mesh_e2e::Output) -> Vec<Value> {
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    v["checks"].as_array().unwrap().clone()
}

fn named<'a>(checks: &'a [Value], name: &str) -> Vec<&'a Value> {
    checks.iter().filter(|c| c["name"] == name).collect()
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mesh-doctor-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cni")).unwrap();
        Scratch(dir)
    }

    fn path(&self, p: &str) -> String {
        self.0.join(p).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn overlay_range(agent: &Agent) -> String {
    let s = agent.status().unwrap();
    let prefix = s["node"]["prefix_len"].as_u64().unwrap() as u32;
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    let net = std::net::Ipv4Addr::from(u32::from(agent.address) & mask);
    format!("{net}/{prefix}")
}

fn paths(s: &Scratch) -> (String, String, String) {
    (s.path("cni"), s.path("kubelet"), s.path("subnet.env"))
}

#[test]
fn doctor_passes_a_good_node_and_names_the_fixes_on_a_bad_one() {
    let (lab, _ctl, hosts, token) = lab_with_network("doctor", "k8s", &["good", "bad"]).unwrap();
    let (good_host, bad_host) = (&hosts[0], &hosts[1]);

    // The bad node has a LAN-like network (a veth pair: the lab kernel may lack dummy) inside the overlay range before it joins:
    // `mesh join` warns about it.
    sh(
        bad_host,
        &[
            "ip", "link", "add", "lan1", "type", "veth", "peer", "name", "lan1p",
        ],
    );
    sh(
        bad_host,
        &["ip", "addr", "add", "100.64.250.1/24", "dev", "lan1"],
    );
    sh(bad_host, &["ip", "link", "set", "lan1", "up"]);
    sh(bad_host, &["ip", "link", "set", "lan1p", "up"]);

    let mut good = Agent::join(&lab, good_host, "good", &token).unwrap();
    let mut bad = Agent::join(&lab, bad_host, "bad", &token).unwrap();
    assert!(
        bad.log()
            .contains("overlaps this host's address 100.64.250.1/24 on lan1"),
        "{}",
        bad.log()
    );
    assert!(!good.log().contains("overlaps this host's"));

    // --- The good node: forwarding on, its kubelet file written by mesh itself, no CNI yet.
    sh(good_host, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let gs = Scratch::new("good");
    let (cni, kubelet, flannel) = paths(&gs);
    let out = good.cli(["kubeadm", "node-ip", "--file", &kubelet]);
    assert!(out.success(), "{out:?}");
    // Wait until the peer's path settles, so that peer_path says direct.
    assert!(good_host.wait_ping(bad.address, std::time::Duration::from_secs(20)));
    let args = [
        "--json",
        "--cni-dir",
        &cni,
        "--kubelet-file",
        &kubelet,
        "--flannel-env",
        &flannel,
    ];
    let out = doctor(&good, &[], &args);
    let all = checks(&out);
    for c in &all {
        let name = c["name"].as_str().unwrap();
        if HOST_WIDE.contains(&name) {
            continue;
        }
        match name {
            // No CNI config in the directory yet.
            "cni_mtu" => assert_eq!(c["status"], "skip", "{c}\n{}", out.stdout),
            // Whether the lab's flat network reads as a NAT kind depends on the observer.
            "nat" => assert_ne!(c["status"], "fail", "{c}\n{}", out.stdout),
            _ => assert_eq!(c["status"], "ok", "{c}\n{}", out.stdout),
        }
    }
    for name in HOST_WIDE {
        assert_eq!(named(&all, name).len(), 1, "{name}: {}", out.stdout);
    }
    let any_fail = all.iter().any(|c| c["status"] == "fail");
    assert_eq!(out.code(), Some(i32::from(any_fail)), "{out:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap()["ok"],
        !any_fail
    );
    assert!(named(&all, "peer_path")[0]["message"]
        .as_str()
        .unwrap()
        .contains("bad: direct"));

    // --- The bad node.
    sh(bad_host, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    sh(
        bad_host,
        &[
            "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p",
        ],
    );
    sh(
        bad_host,
        &["ip", "addr", "add", "10.244.5.1/24", "dev", "lan0"],
    );
    sh(bad_host, &["ip", "link", "set", "lan0", "up"]);
    sh(bad_host, &["ip", "link", "set", "lan0p", "up"]);
    bad_host
        .nft("add table ip filter { chain FORWARD { type filter hook forward priority 0; policy drop; }; }")
        .unwrap();
    let bs = Scratch::new("bad");
    let (cni, kubelet, flannel) = paths(&bs);
    std::fs::write(
        Path::new(&cni).join("10-bridge.conflist"),
        r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","bridge":"cni0","mtu":1500}]}"#,
    )
    .unwrap();
    std::fs::write(&kubelet, "KUBELET_EXTRA_ARGS=\"--node-ip=192.0.2.99\"\n").unwrap();
    let overlay = overlay_range(&bad);
    let proxy = [
        ("HTTPS_PROXY", "http://192.0.2.250:3128"),
        ("NO_PROXY", "localhost,127.0.0.1"),
    ];
    let args = [
        "--json",
        "--cni-dir",
        &cni,
        "--kubelet-file",
        &kubelet,
        "--flannel-env",
        &flannel,
    ];
    let out = doctor(&bad, &proxy, &args);
    assert_eq!(out.code(), Some(1), "{out:?}");
    let all = checks(&out);
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap()["ok"],
        false
    );
    let failed: Vec<&str> = all
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["name"].as_str().unwrap())
        .filter(|n| !HOST_WIDE.contains(n))
        .collect();
    let mut expected = vec![
        "ip_forward",
        "kubelet_node_ip",
        "cni_mtu",
        "route_overlap",
        "route_overlap",
        "forward_policy",
        "proxy",
    ];
    expected.sort_unstable();
    let mut got = failed.clone();
    got.sort_unstable();
    assert_eq!(got, expected, "{}", out.stdout);
    let message = |name: &str, needle: &str| {
        let found = named(&all, name)
            .iter()
            .any(|c| c["message"].as_str().unwrap().contains(needle));
        assert!(
            found,
            "no {name} message contains {needle:?}:\n{}",
            out.stdout
        );
    };
    message("ip_forward", "sysctl -w net.ipv4.ip_forward=1");
    message("kubelet_node_ip", "mesh kubeadm node-ip");
    message("cni_mtu", "\"mtu\": 1420");
    message("route_overlap", "address 10.244.5.1/24 on lan0");
    message("route_overlap", "--pod-network-cidr");
    message("route_overlap", "address 100.64.250.1/24 on lan1");
    message(
        "forward_policy",
        "nft insert rule ip filter FORWARD iifname \"mesh0\" accept",
    );
    message(
        "forward_policy",
        "nft insert rule ip filter FORWARD oifname \"mesh0\" accept",
    );
    message("proxy", &format!("NO_PROXY=localhost,127.0.0.1,{overlay}"));
    // What passes on the bad node still passes.
    for name in ["overlay_address", "controller", "range_overlap"] {
        assert_eq!(
            named(&all, name)[0]["status"],
            "ok",
            "{name}: {}",
            out.stdout
        );
    }

    // The plain output: one line per check, the same verdicts.
    let out = doctor(&bad, &proxy, &args[1..]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(out.stdout.lines().count(), all.len(), "{}", out.stdout);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("FAIL ip_forward ")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("ok   overlay_address ")),
        "{}",
        out.stdout
    );

    // Fixing them by the messages' own commands makes those checks pass.
    sh(bad_host, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    bad_host
        .nft("insert rule ip filter FORWARD iifname \"mesh0\" accept")
        .unwrap();
    bad_host
        .nft("insert rule ip filter FORWARD oifname \"mesh0\" accept")
        .unwrap();
    let out = doctor(&bad, &proxy, &args);
    let all = checks(&out);
    for name in ["ip_forward", "forward_policy"] {
        assert_eq!(
            named(&all, name)[0]["status"],
            "ok",
            "{name}: {}",
            out.stdout
        );
    }
    drop(good);
}
