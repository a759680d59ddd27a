//! The relay embedded in the controller: a pair that cannot reach each other directly talks
//! through it at once; when a direct path opens, traffic moves there; when it dies, traffic is
//! back on the relay within seconds; an open TCP connection survives every switch.
#![allow(clippy::unwrap_used)]

use mesh_e2e::netns::Host;
use mesh_e2e::{netns::ip, wait_for, wait_until, Agent, Controller, Lab};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NET: &str = "relay";

/// Drops every UDP datagram between `host` and `peer_ip` (both ways, any port), as a firewall
/// would: a direct path on another port (a socket a birthday attempt won) dies with the rest.
fn block_direct(host: &Host, peer_ip: &str) {
    let table = format!(
        "table inet blockdirect {{ \
         chain out {{ type filter hook output priority 0; ip daddr {peer_ip} meta l4proto udp drop; }}; \
         chain in {{ type filter hook input priority 0; ip saddr {peer_ip} meta l4proto udp drop; }}; }}"
    );
    ip(["netns", "exec", host.ns.as_str(), "nft", table.as_str()]).unwrap();
}

fn unblock_direct(host: &Host) {
    ip([
        "netns",
        "exec",
        host.ns.as_str(),
        "nft",
        "delete",
        "table",
        "inet",
        "blockdirect",
    ])
    .unwrap();
}

fn path_of(a: &Agent, peer: &str) -> String {
    a.peer(peer)
        .ok()
        .and_then(|p| p["path"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[test]
fn relay_when_blocked_direct_when_open_and_tcp_survives_every_switch() {
    let mut lab = Lab::new("relay").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let a_host = lab.add_host("a").unwrap();
    let b_host = lab.add_host("b").unwrap();
    block_direct(&a_host, &b_host.ip.to_string());
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(&lab, &a_host, "a", &token).unwrap();
    let b = Agent::join(&lab, &b_host, "b", &token).unwrap();
    let b_ip = b.address.to_string();

    // Through the relay at once, with full-size packets.
    assert!(
        a_host.wait_ping(b.address, Duration::from_secs(10)),
        "no ping through the relay"
    );
    assert_eq!(path_of(&a, "b"), "relay");
    let out = a_host.run(
        "ping",
        [
            "-c",
            "2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            "1392",
            b_ip.as_str(),
        ],
    );
    assert!(out.success(), "1420-byte packets through the relay: {out}");
    let out = a.cli(["ping", "b", "-c", "1"]);
    assert!(out.success() && out.stdout.contains("via relay"), "{out}");

    // A TCP stream that runs through every switch that follows.
    let sink = b_host.tcp_sink(5202, 60).unwrap();
    // 20 KB every 50 ms until a stop file appears; prints what it sent.
    let stop = lab.dir().join("stop-tcp");
    let client = format!(
        "import socket,os,time\n\
         s=socket.create_connection(('{b_ip}', 5202), timeout=30); n=0\n\
         while not os.path.exists('{}'):\n\
         \x20   s.sendall(b'x'*20000); n+=20000; time.sleep(0.05)\n\
         s.close(); print(n)\n",
        stop.display()
    );
    let mut cli = Command::new("ip")
        .args([
            "netns",
            "exec",
            a_host.ns.as_str(),
            "timeout",
            "90",
            "python3",
            "-c",
            client.as_str(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));

    // The firewall opens: direct within a few probe rounds.
    unblock_direct(&a_host);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || path_of(&a, "b") == "direct"
            && path_of(&b, "a") == "direct"),
        "no upgrade to direct: {:#}",
        a.status().unwrap()
    );
    let upgrade = t.elapsed();
    let out = a.cli(["ping", "b", "-c", "1"]);
    assert!(out.stdout.contains("via direct"), "{out}");

    // The direct path dies (while the stream keeps sending): back on the relay within ~5 s.
    block_direct(&a_host, &b_host.ip.to_string());
    let t = Instant::now();
    let fell_back = wait_for(Duration::from_secs(15), || {
        (path_of(&a, "b") == "relay").then(|| t.elapsed())
    })
    .unwrap_or_else(|| panic!("no fallback: {:#}", a.status().unwrap()));
    assert!(
        fell_back <= Duration::from_secs(7),
        "fallback took {fell_back:?}"
    );
    std::thread::sleep(Duration::from_secs(2));

    // And direct again.
    unblock_direct(&a_host);
    assert!(wait_until(Duration::from_secs(15), || path_of(&a, "b") == "direct"));
    std::thread::sleep(Duration::from_secs(1));

    std::fs::write(&stop, b"").unwrap();
    let mut sent = String::new();
    let status = cli.wait().unwrap();
    cli.stdout
        .take()
        .unwrap()
        .read_to_string(&mut sent)
        .unwrap();
    assert!(
        status.success(),
        "the TCP client failed (connection broken?)"
    );
    let received = sink.received();
    let sent: u64 = sent.trim().parse().unwrap();
    assert!(sent > 200_000, "sent only {sent}");
    assert_eq!(received, sent, "bytes lost across path switches");
    eprintln!("upgrade to direct after {upgrade:?}, fallback to relay after {fell_back:?}, {sent} bytes over one TCP connection");
}
