//! Pods made by the real CNI plugins (`bridge`, `host-local`, `portmap` from Debian's
//! `containernetworking-plugins`) on three nodes across NATs, with the config from `mesh kubeadm
//! cni --write` and each node advertising its pod subnet with `--advertise-routes auto`: the
//! agents find the subnet in the CNI config, the controller approves it by policy, and pods
//! reach each other over mesh0 with no second encapsulation. A node's CNI config that changes
//! subnet moves its advertisement.
//!
//! Each node's CNI config directory is its own directory in the lab, given to the agent with the
//! hidden `--cni-conf-dir` flag (a real node uses /etc/cni/net.d), and each node's host-local
//! leases live in a directory of their own (`dataDir`), since the lab's nodes share one file
//! system.
#![allow(clippy::unwrap_used)]

use mesh_e2e::cni::{plugins_installed, CniPod, CNI_PATH};
use mesh_e2e::natlab::{NatKind, NatLab};
use mesh_e2e::{wait_for, wait_until, Agent, Controller};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NET: &str = "cni";

fn routes(agent: &Agent) -> Value {
    let out = agent.cli(["routes", "list", "--json"]);
    serde_json::from_str(&out.stdout).unwrap_or(Value::Null)
}

/// Whether `agent` routes `prefix` via a peer (what the controller pushed it).
fn routes_peer_prefix(agent: &Agent, prefix: &str) -> bool {
    routes(agent)["peers"]
        .as_array()
        .is_some_and(|l| l.iter().any(|r| r["prefix"] == prefix))
}

/// `mesh kubeadm cni --pod-cidr CIDR --write --dir DIR [--force]` with the agent's state.
fn write_cni(agent: &Agent, dir: &Path, cidr: &str, force: bool) -> String {
    let dir = dir.to_str().unwrap();
    let mut args = vec![
        "kubeadm",
        "cni",
        "--pod-cidr",
        cidr,
        "--write",
        "--dir",
        dir,
    ];
    if force {
        args.push("--force");
    }
    let out = agent.cli(args);
    assert!(out.success(), "{out}");
    std::fs::read_to_string(Path::new(dir).join("10-mesh.conflist")).unwrap()
}

#[test]
fn real_cni_pods_reach_each_other_over_auto_advertised_routes() {
    if !plugins_installed() {
        eprintln!(
            "SKIPPED: the CNI plugins bridge, host-local and portmap are not in {CNI_PATH} (apt-get install containernetworking-plugins)"
        );
        return;
    }
    let start = Instant::now();
    let mut nat = NatLab::new("cni-plugins").unwrap();
    let ctl_host = nat.controller_host();
    let cone = nat.add_router("cone", NatKind::FullCone).unwrap();
    let sym = nat.add_router("sym", NatKind::Symmetric).unwrap();
    let hosts = [
        nat.add_public_host("a").unwrap(),
        nat.add_host_behind(&cone, "b").unwrap(),
        nat.add_host_behind(&sym, "c").unwrap(),
    ];
    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let out = ctl.admin([
        "network",
        "set",
        NET,
        "--auto-approve-routes",
        "10.244.0.0/16",
    ]);
    assert!(out.success(), "{out}");
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();

    // Each node joins with auto before it has a pod subnet, as a kubeadm node does: the
    // cluster assigns the subnet only after the node joined.
    let lab_dir = nat.lab().dir().to_owned();
    let node_dir = |i: usize, what: &str| -> PathBuf {
        let d = lab_dir.join(format!("node{i}-{what}"));
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let mut agents = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let conf_dir = node_dir(i, "net.d");
        let flannel = node_dir(i, "flannel").join("subnet.env");
        agents.push(
            Agent::join_with(
                nat.lab(),
                host,
                &host.name,
                &token,
                &[
                    "--advertise-routes",
                    "auto",
                    "--cni-conf-dir",
                    conf_dir.to_str().unwrap(),
                    "--flannel-subnet-env",
                    flannel.to_str().unwrap(),
                ],
            )
            .unwrap(),
        );
    }
    let before: Value = routes(&agents[0]);
    assert_eq!(before["auto"]["enabled"], true, "{before}");
    assert!(before["auto"]["found"]["prefix"].is_null(), "{before}");

    // The CNI config, as `mesh kubeadm cni --write` writes it; the agents find it.
    let mut conflists = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let cidr = format!("10.244.{}.0/24", i + 1);
        let text = write_cni(agent, &node_dir(i, "net.d"), &cidr, false);
        assert!(text.contains("\"mtu\": 1420"), "{text}");
        conflists.push(text);
    }
    // Writing it again is a no-op; another subnet without --force is refused.
    let again = agents[0].cli([
        "kubeadm",
        "cni",
        "--pod-cidr",
        "10.244.9.0/24",
        "--write",
        "--dir",
        node_dir(0, "net.d").to_str().unwrap(),
    ]);
    assert!(
        !again.success() && again.stderr.contains("--force"),
        "{again}"
    );

    for (i, agent) in agents.iter().enumerate() {
        let cidr = format!("10.244.{}.0/24", i + 1);
        let r = wait_for(Duration::from_secs(10), || {
            let r = routes(agent);
            (r["advertised"][0]["prefix"] == cidr.as_str()
                && r["advertised"][0]["state"] == "approved")
                .then_some(r)
        })
        .unwrap_or_else(|| panic!("{} did not advertise {cidr}: {}", agent.name, routes(agent)));
        let source = r["auto"]["found"]["source"].as_str().unwrap();
        assert!(source.ends_with("10-mesh.conflist"), "{r}");
    }
    let listed = ctl.admin(["route", "list", NET]).stdout;
    for n in 1..=3 {
        assert!(listed.contains(&format!("10.244.{n}.0/24")), "{listed}");
    }
    let advertised_at = start.elapsed();

    // Pods, made by the plugins in each node's namespace.
    let mut pods: Vec<CniPod> = agents
        .iter()
        .enumerate()
        .map(|(i, agent)| {
            CniPod::add(&agent.host, &conflists[i], "pod1", &node_dir(i, "ipam")).unwrap()
        })
        .collect();
    for (i, p) in pods.iter().enumerate() {
        assert_eq!(
            p.pod.ip.octets()[..3],
            [10, 244, i as u8 + 1],
            "{}",
            p.result()
        );
        let link = p.pod.run("ip", ["link", "show", "eth0"]).stdout;
        assert!(link.contains("mtu 1420"), "{link}");
    }
    for a in &pods {
        for b in &pods {
            if a.pod.ip != b.pod.ip {
                assert!(
                    a.pod.wait_ping(b.pod.ip, Duration::from_secs(20)),
                    "pod {} cannot ping pod {}: {}",
                    a.pod.ip,
                    b.pod.ip,
                    routes(&agents[0])
                );
            }
        }
    }
    let pinged_at = start.elapsed();
    // A 1400-byte IP packet (1372 bytes of ICMP payload + 8 + 20), not fragmented, between
    // pods behind the public host and the symmetric NAT.
    let rtt = |from: &CniPod, to: &CniPod, size: &str| {
        let out = from.pod.run(
            "ping",
            [
                "-n",
                "-q",
                "-c",
                "3",
                "-W",
                "2",
                "-M",
                "do",
                "-s",
                size,
                &to.pod.ip.to_string(),
            ],
        );
        assert!(out.success(), "a DF ping of {size} bytes: {out}");
        out.stdout.lines().last().unwrap_or_default().to_owned()
    };
    let small = rtt(&pods[0], &pods[2], "56");
    let big = rtt(&pods[0], &pods[2], "1372");
    // mesh0's full MTU: a 1420-byte pod packet.
    let full = rtt(&pods[1], &pods[2], "1392");
    let mbits = mesh_e2e::iperf3(
        &pods[0].pod,
        &pods[2].pod,
        &pods[2].pod.ip.to_string(),
        5201,
        3,
    );
    let mbits = mbits.expect("iperf3 pod a -> pod c moved no data");
    assert!(mbits > 0.0);
    let path = |from: usize, to: &str| agents[from].peer(to).unwrap()["path"].to_string();
    eprintln!(
        "cni_plugins: routes advertised+approved after {advertised_at:?}, all pods ping after {pinged_at:?}; \
         pod a->c ({} path) 84 B: {small}; 1400 B DF: {big}; pod b->c ({} path) 1420 B DF: {full}; \
         iperf3 pod a->c {mbits:.0} Mbit/s",
        path(0, "c"),
        path(1, "c")
    );

    // CNI DEL: the veths go from the bridge, the lease is released.
    for p in &mut pods {
        p.del().unwrap();
    }
    for (i, agent) in agents.iter().enumerate() {
        let links = agent
            .host
            .run("ip", ["-o", "link", "show", "master", "cni0"]);
        assert!(links.stdout.trim().is_empty(), "{links}");
        let leases = std::fs::read_dir(node_dir(i, "ipam").join("mesh"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("10.244."))
            .count();
        assert_eq!(leases, 0, "host-local leases left on node {i}");
    }

    // The cluster gives b another subnet: its CNI config changes and the route follows.
    let moved = Instant::now();
    let text = write_cni(&agents[1], &node_dir(1, "net.d"), "10.244.12.0/24", true);
    let followed = wait_until(Duration::from_secs(10), || {
        routes_peer_prefix(&agents[0], "10.244.12.0/24")
            && !routes_peer_prefix(&agents[0], "10.244.2.0/24")
    });
    assert!(
        followed,
        "a: {}\nb: {}",
        routes(&agents[0]),
        routes(&agents[1])
    );
    let follow_time = moved.elapsed();
    let r = routes(&agents[1]);
    assert_eq!(r["advertised"].as_array().unwrap().len(), 1, "{r}");
    // A pod in the new subnet is reachable from a's node. The bridge keeps its old gateway
    // address, which the bridge plugin refuses to change, so the old bridge goes first, as an
    // operator deletes cni0 when a node's pod subnet changes.
    let out = agents[1].host.run("ip", ["link", "del", "cni0"]);
    assert!(out.success(), "{out}");
    let new_pod = CniPod::add(&agents[1].host, &text, "pod2", &node_dir(1, "ipam")).unwrap();
    assert_eq!(new_pod.pod.ip.octets()[..3], [10, 244, 12]);
    assert!(
        hosts[0].wait_ping(new_pod.pod.ip, Duration::from_secs(10)),
        "{}",
        routes(&agents[0])
    );
    eprintln!(
        "cni_plugins: the moved subnet was routed on a after {follow_time:?}; total {:?}",
        start.elapsed()
    );
    drop(new_pod);
    drop(pods);
    drop(agents);
    drop(ctl);
}
