//! Path choice by measured quality, with real binaries: a direct path that loses 20 % of its
//! UDP (nftables `numgen random`) while the relay is clean gives way to the relay, and a
//! 3-member etcd cluster over the overlay completes its writes; a direct path under a UDP rate
//! limit (nftables `limit rate over`: sparse probes pass, bulk is dropped) gives way too, and
//! bulk TCP inside the tunnel keeps at least the limit's throughput.
//!
//! The loss and the limit apply to UDP between the two nodes only (their direct path); the
//! controller's relay, over QUIC, stays clean.
#![allow(clippy::unwrap_used)]

use mesh_e2e::netns::Host;
use mesh_e2e::{wait_until, Agent, Controller, Lab, Proc};
use std::time::{Duration, Instant};

const NET: &str = "quality";

/// Drops UDP between `host` and `peer` as `rule` says (an nftables statement that ends in
/// `drop`), both ways.
fn spoil_direct(host: &Host, peer: &str, rule: &str) {
    let table = format!(
        "table inet spoil {{ \
         chain o {{ type filter hook output priority 0; ip daddr {peer} meta l4proto udp {rule}; }}; \
         chain i {{ type filter hook input priority 0; ip saddr {peer} meta l4proto udp {rule}; }}; }}"
    );
    let out = mesh_e2e::run(&host.ns, "nft", [table.as_str()]);
    assert!(out.success(), "nft: {out}");
}

fn path_of(a: &Agent, peer: &str) -> String {
    a.peer(peer)
        .ok()
        .and_then(|p| p["path"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn start_etcd(lab: &Lab, hosts: &[(&Host, &Agent)], cluster: &str) -> Vec<Proc> {
    hosts
        .iter()
        .map(|(host, agent)| {
            let ip = agent.address.to_string();
            let dir = lab.dir().join(format!("etcd-{}", agent.name));
            lab.spawn(
                host,
                &format!("etcd-{}", agent.name),
                "etcd",
                [
                    "--name",
                    agent.name.as_str(),
                    "--data-dir",
                    dir.to_str().unwrap(),
                    "--listen-peer-urls",
                    &format!("http://{ip}:2380"),
                    "--initial-advertise-peer-urls",
                    &format!("http://{ip}:2380"),
                    "--listen-client-urls",
                    &format!("http://{ip}:2379"),
                    "--advertise-client-urls",
                    &format!("http://{ip}:2379"),
                    "--initial-cluster",
                    cluster,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "mesh-e2e",
                ],
            )
            .unwrap()
        })
        .collect()
}

#[test]
fn a_lossy_direct_path_gives_way_to_a_clean_relay_and_etcd_keeps_writing() {
    let mut lab = Lab::new("lossy").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let ha = lab.add_host("a").unwrap();
    let hb = lab.add_host("b").unwrap();
    let hc = lab.add_host("c").unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(&lab, &ha, "a", &token).unwrap();
    let b = Agent::join(&lab, &hb, "b", &token).unwrap();
    let c = Agent::join(&lab, &hc, "c", &token).unwrap();
    assert!(wait_until(Duration::from_secs(15), || {
        path_of(&a, "b") == "direct" && path_of(&b, "a") == "direct"
    }));

    let cluster = [&a, &b, &c]
        .iter()
        .map(|x| format!("{}=http://{}:2380", x.name, x.address))
        .collect::<Vec<_>>()
        .join(",");
    let _etcd = start_etcd(&lab, &[(&ha, &a), (&hb, &b), (&hc, &c)], &cluster);
    let endpoint = format!("http://{}:2379", a.address);
    let all = [&a, &b, &c]
        .iter()
        .map(|x| format!("http://{}:2379", x.address))
        .collect::<Vec<_>>()
        .join(",");
    assert!(
        wait_until(Duration::from_secs(30), || mesh_e2e::run(
            &ha.ns,
            "etcdctl",
            ["--endpoints", all.as_str(), "endpoint", "health"]
        )
        .success()),
        "etcd cluster not healthy"
    );

    // 20 % of the UDP between a and b is lost from now on.
    spoil_direct(&ha, &hb.ip.to_string(), "numgen random mod 100 < 20 drop");
    let t = Instant::now();
    let mut ok = 0;
    let mut moved = None;
    for i in 0..200 {
        let key = format!("k{i}");
        let value = format!("v{i}");
        let out = mesh_e2e::run_with_timeout(
            &ha.ns,
            "etcdctl",
            [
                "--endpoints",
                endpoint.as_str(),
                "--command-timeout",
                "5s",
                "put",
                key.as_str(),
                value.as_str(),
            ],
            Duration::from_secs(10),
        );
        if out.success() {
            ok += 1;
        }
        if moved.is_none() && path_of(&a, "b") == "relay" {
            moved = Some(t.elapsed());
        }
    }
    // Bulk between a and b (etcd alone is sparse), so that the loss shows in the data.
    let _ = mesh_e2e::run_with_timeout(
        &ha.ns,
        "ping",
        ["-f", "-c", "2000", "-s", "1000", &b.address.to_string()],
        Duration::from_secs(20),
    );
    let moved = moved.or_else(|| {
        wait_until(Duration::from_secs(30), || path_of(&a, "b") == "relay").then(|| t.elapsed())
    });
    let elapsed = t.elapsed();
    let status = a.peer("b").unwrap();
    eprintln!(
        "20 % loss on the direct path: {ok} of 200 etcd puts in {elapsed:?}; a -> b on the relay after {moved:?}; quality {}",
        status["quality"]
    );
    assert!(ok >= 198, "only {ok} of 200 puts completed");
    assert!(
        moved.is_some(),
        "the pair stayed on the lossy direct path: {status:#}"
    );
    assert!(
        elapsed < Duration::from_secs(180),
        "over the lab's time budget"
    );
    // Every member still agrees.
    let out = mesh_e2e::run(
        &hc.ns,
        "etcdctl",
        [
            "--endpoints",
            all.as_str(),
            "get",
            "k199",
            "--print-value-only",
        ],
    );
    assert_eq!(out.stdout.trim(), "v199", "{out}");
}

#[test]
fn a_rate_limited_direct_path_gives_way_and_bulk_keeps_the_limits_throughput() {
    let mut lab = Lab::new("ratelimit").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let ha = lab.add_host("a").unwrap();
    let hb = lab.add_host("b").unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(&lab, &ha, "a", &token).unwrap();
    let b = Agent::join(&lab, &hb, "b", &token).unwrap();
    assert!(wait_until(Duration::from_secs(15), || {
        path_of(&a, "b") == "direct" && path_of(&b, "a") == "direct"
    }));

    // A carrier's UDP limit: about 1,000 packets per second pass (sparse probes and
    // keepalives always do), the rest is dropped.
    spoil_direct(&ha, &hb.ip.to_string(), "limit rate over 1000/second drop");
    let relayed = || {
        a.status().unwrap()["counters"]["relay_tx"]
            .as_u64()
            .unwrap()
    };
    let before = relayed();
    let mbit = mesh_e2e::iperf3(&ha, &hb, &b.address.to_string(), 5304, 20)
        .expect("iperf3 through the rate-limited pair failed (see the lab's command log)");
    let relayed = relayed() - before;
    let path = path_of(&a, "b");
    // 1,000 packets of at most 1,452 bytes per second is about 11.6 Mbit/s.
    eprintln!("UDP rate limit on the direct path: bulk TCP at {mbit:.1} Mbit/s over 20 s, {relayed} packets relayed, path now {path}");
    // The direct path gave way: the relay carried more packets than the limit lets through the
    // direct path in the whole run. (Where the pair is at the last instant is no measure: with
    // the loss the limit causes measured just under the 10 % switch threshold, liveness moves
    // traffic to the relay and back; see the stop 25 note.)
    assert!(
        relayed > 20 * 1000,
        "{relayed} packets relayed: {:#}",
        a.peer("b").unwrap()
    );
    assert!(mbit >= 11.6, "{mbit:.1} Mbit/s, under the limit's rate");
}

#[test]
fn lossy_udp_everywhere_moves_the_node_to_the_tcp_relay() {
    let mut lab = Lab::new("lossyall").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let ha = lab.add_host("a").unwrap();
    let hb = lab.add_host("b").unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(&lab, &ha, "a", &token).unwrap();
    let b = Agent::join(&lab, &hb, "b", &token).unwrap();
    assert!(wait_until(Duration::from_secs(15), || {
        path_of(&a, "b") == "direct" && path_of(&b, "a") == "direct"
    }));

    // A fifth of all of a's UDP is lost: the direct path and QUIC to the controller alike.
    // TCP is clean.
    let table = "table inet spoil { \
         chain o { type filter hook output priority 0; oifname != \"mesh0\" meta l4proto udp numgen random mod 100 < 20 drop; }; \
         chain i { type filter hook input priority 0; iifname != \"mesh0\" meta l4proto udp numgen random mod 100 < 20 drop; }; }";
    let out = mesh_e2e::run(&ha.ns, "nft", [table]);
    assert!(out.success(), "nft: {out}");
    let b_ip = b.address.to_string();
    let t = Instant::now();
    // Traffic, so that both the core and the agent see the loss.
    let mut pinger = std::process::Command::new("ip")
        .args(["netns", "exec", ha.ns.as_str(), "ping", "-q", "-i", "0.01"])
        .args(["-s", "1000", "-w", "70", b_ip.as_str()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let transport = |x: &Agent| {
        x.status()
            .ok()
            .and_then(|s| s["controller"]["transport"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    // The pair: b sends into a's lossy UDP too, and learns it from a's loss reports.
    let moved = wait_until(Duration::from_secs(45), || {
        transport(&a) == "tcp" && path_of(&a, "b") == "relay" && path_of(&b, "a") == "relay"
    });
    let _ = pinger.kill();
    let _ = pinger.wait();
    assert!(moved, "not on the TCP relay: {:#}", a.status().unwrap());
    let after = t.elapsed();
    // Over the TCP relay nothing is lost any more.
    let out = mesh_e2e::run_with_timeout(
        &ha.ns,
        "ping",
        ["-q", "-c", "100", "-i", "0.02", "-W", "2", b_ip.as_str()],
        Duration::from_secs(30),
    );
    let loss: f64 = out
        .stdout
        .split(", ")
        .find_map(|p| p.strip_suffix("% packet loss"))
        .and_then(|p| p.parse().ok())
        .unwrap_or(100.0);
    eprintln!(
        "20 % loss on all UDP: on the TCP relay after {after:?}; then {loss} % of 100 pings lost"
    );
    assert!(loss <= 2.0, "{loss} % lost over the TCP relay: {out}");
}
