//! A path that cannot carry the configured MTU is found and reported, and traffic adapts
//! instead of vanishing: a per-peer route MTU, ICMP "too big" for DF packets, TCP that flows.
#![allow(clippy::unwrap_used)]

use mesh_e2e::{netns::ip, wait_for, wait_until, Agent, Controller, Lab};
use std::time::Duration;

const NET: &str = "mtu";

/// Sends `bytes` over TCP from `from` to `to_ip:port` where a receiver counts them; returns
/// what the receiver counted.
fn tcp_transfer(
    from: &mesh_e2e::netns::Host,
    to: &mesh_e2e::netns::Host,
    to_ip: &str,
    bytes: usize,
) -> usize {
    let sink = to.tcp_sink(5201, 30).unwrap();
    let client = format!(
        "import socket\n\
         s=socket.create_connection(('{to_ip}', 5201), timeout=30)\n\
         s.sendall(b'x'*{bytes}); s.close()\n"
    );
    let out = from.run("timeout", ["40", "python3", "-c", client.as_str()]);
    assert!(out.success(), "client failed: {out}");
    sink.received() as usize
}

/// One ping with `payload` bytes of ICMP data and DF set, from `host` to `to`.
fn df_ping(host: &mesh_e2e::Host, payload: usize, to: &str) -> mesh_e2e::Output {
    let size = payload.to_string();
    host.run(
        "ping",
        ["-M", "do", "-c", "1", "-W", "2", "-s", size.as_str(), to],
    )
}

#[test]
fn small_path_is_detected_reported_and_carried() {
    let mut lab = Lab::new("small-path").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let a_host = lab.add_host("a").unwrap();
    let b_host = lab.add_host("b").unwrap();
    // b's link carries 1400-byte frames: WireGuard around a 1420-byte packet needs 1480.
    lab.set_link_mtu(&b_host, 1400).unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(&lab, &a_host, "a", &token).unwrap();
    let b = Agent::join(&lab, &b_host, "b", &token).unwrap();

    // Status reports the path MTU: at most 1400 - 28 (IP+UDP) - 32 (WireGuard) = 1340.
    let mtu = wait_for(Duration::from_secs(40), || {
        a.peer("b").ok()?["path_mtu"].as_u64().filter(|m| *m < 1420)
    })
    .unwrap_or_else(|| panic!("no reduced path MTU in status: {:#}", a.status().unwrap()));
    assert!((1332..=1340).contains(&mtu), "path MTU {mtu}");

    // The kernel learned it: a host route to b with that MTU.
    let b_ip = b.address.to_string();
    assert!(wait_until(Duration::from_secs(5), || {
        ip(["-n", &a_host.ns, "route", "get", &b_ip])
            .map(|r| r.contains(&format!("mtu {mtu}")))
            .unwrap_or(false)
    }));

    // A DF packet too large for the path fails at once with a clear local error instead of
    // being lost on the way.
    let out = df_ping(&a_host, mtu as usize + 100 - 28, &b_ip);
    assert!(!out.success());
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("mtu") || text.contains("too long"), "{text}");
    // What fits gets through.
    let out = df_ping(&a_host, mtu as usize - 28, &b_ip);
    assert!(out.success(), "{out}");

    // Bulk TCP both ways completes (segments sized to the path, no stall).
    assert_eq!(tcp_transfer(&a_host, &b_host, &b_ip, 4_000_000), 4_000_000);
    let a_ip = a.address.to_string();
    assert_eq!(tcp_transfer(&b_host, &a_host, &a_ip, 4_000_000), 4_000_000);
}
