//! Networks that break UDP: a node behind a firewall that lets only TCP 443 out joins with the
//! ordinary token and works over TLS; the same through an HTTP CONNECT proxy with no direct TCP
//! at all; UDP blocked while the mesh is up moves control and relayed traffic to TCP within
//! seconds (an open TCP connection inside the tunnel survives), and back to QUIC and a direct
//! path once UDP works again; a controller restarted under nodes on TCP gets them back.
#![allow(clippy::unwrap_used)]

use mesh_e2e::daemons::write_token_file;
use mesh_e2e::natlab::{NatKind, NatLab, Router};
use mesh_e2e::{wait_for, wait_until, Agent, Controller};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NET: &str = "hostile";

/// The router's firewall: no UDP through it either way, and new TCP connections only to port
/// 443 (`only_to` narrows that to one address and port, for the proxy case).
fn block_udp(router: &Router, only_to: Option<(&str, u16)>) {
    let tcp = match only_to {
        Some((ip, port)) => format!(
            "meta l4proto tcp ct state new ip daddr != {ip} drop; \
             meta l4proto tcp ct state new tcp dport != {port} drop;"
        ),
        None => "meta l4proto tcp ct state new tcp dport != 443 drop;".to_owned(),
    };
    let table = format!(
        "table inet hostile {{ chain filter_forward {{ type filter hook forward priority -5; \
         meta l4proto udp drop; {tcp} }}; }}"
    );
    let out = router.run("nft", [table.as_str()]);
    assert!(out.success(), "nft: {out}");
}

fn unblock(router: &Router) {
    let out = router.run("nft", ["delete", "table", "inet", "hostile"]);
    assert!(out.success(), "nft: {out}");
}

fn transport(a: &Agent) -> String {
    a.status()
        .ok()
        .and_then(|s| s["controller"]["transport"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn path_of(a: &Agent, peer: &str) -> String {
    a.peer(peer)
        .ok()
        .and_then(|p| p["path"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[test]
fn a_node_with_only_tcp_443_joins_pings_everyone_and_carries_iperf() {
    let mut nat = NatLab::new("tcponly").unwrap();
    let ctl_host = nat.controller_host();
    let public = nat.add_public_host("public").unwrap();
    let cone_r = nat.add_router("cone", NatKind::PortRestricted).unwrap();
    let cone = nat.add_host_behind(&cone_r, "cone").unwrap();
    let fw = nat.add_router("fw", NatKind::PortRestricted).unwrap();
    let walled = nat.add_host_behind(&fw, "walled").unwrap();
    let old_token_host = nat.add_host_behind(&fw, "oldtok").unwrap();
    block_udp(&fw, None);

    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(nat.lab(), &public, "public", &token).unwrap();
    let b = Agent::join(nat.lab(), &cone, "cone", &token).unwrap();

    // The ordinary token: it names the controller's TCP side.
    let t = Instant::now();
    let w = Agent::join(nat.lab(), &walled, "walled", &token).unwrap();
    let joined = t.elapsed();
    assert!(
        walled.wait_ping(a.address, Duration::from_secs(10)),
        "no ping from the walled node: {:#}",
        w.status().unwrap()
    );
    let first_ping = t.elapsed();
    eprintln!(
        "UDP blocked, TCP 443 only: `mesh join` to ready {joined:?}, to first ping {first_ping:?}"
    );
    assert_eq!(transport(&w), "tcp");
    assert!(walled.wait_ping(b.address, Duration::from_secs(10)));
    assert!(public.wait_ping(w.address, Duration::from_secs(10)));
    assert!(cone.wait_ping(w.address, Duration::from_secs(10)));
    assert_eq!(path_of(&w, "public"), "relay");
    let out = w.cli(["status"]);
    assert!(
        out.stdout.contains("tcp"),
        "mesh status names the transport: {out}"
    );

    // Bulk through the TCP relay.
    let mbit = mesh_e2e::iperf3(&walled, &public, &a.address.to_string(), 5302, 3)
        .expect("iperf3 through the TCP relay failed (see the lab's command log)");
    assert!(mbit > 1.0, "iperf3 through the TCP relay: {mbit:.1} Mbit/s");
    eprintln!("iperf3 walled -> public over the TCP relay: {mbit:.0} Mbit/s");

    // A token from before the controller listened on TCP (no TCP address in it): the agent
    // tries port 443 of the controller's host.
    let old = ctl
        .create_token(NET, &["--controller-tcp", "none"])
        .unwrap();
    let o = Agent::join(nat.lab(), &old_token_host, "oldtok", &old).unwrap();
    assert!(old_token_host.wait_ping(a.address, Duration::from_secs(10)));
    assert_eq!(transport(&o), "tcp");
}

/// A CONNECT proxy from Python's standard library: it logs each tunnel it opens.
const PROXY: &str = r#"
import socket, sys, threading
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d: break
            b.sendall(d)
    except OSError: pass
    finally:
        for s in (a, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
def handle(c):
    head = b""
    while b"\r\n\r\n" not in head:
        d = c.recv(1)
        if not d: return
        head += d
    line = head.split(b"\r\n")[0].decode()
    method, target = line.split()[:2]
    if method != "CONNECT":
        c.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n"); c.close(); return
    host, port = target.rsplit(":", 1)
    try: s = socket.create_connection((host, int(port)), timeout=5)
    except OSError:
        c.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n"); c.close(); return
    print("CONNECT", target, flush=True)
    c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    threading.Thread(target=pipe, args=(c, s), daemon=True).start()
    threading.Thread(target=pipe, args=(s, c), daemon=True).start()
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 3128)); srv.listen(64)
print("listening", flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

#[test]
fn through_an_http_connect_proxy_with_no_direct_tcp_either() {
    let mut nat = NatLab::new("proxy").unwrap();
    let ctl_host = nat.controller_host();
    let public = nat.add_public_host("public").unwrap();
    let proxy_host = nat.add_public_host("proxy").unwrap();
    let fw = nat.add_router("fw", NatKind::PortRestricted).unwrap();
    let walled = nat.add_host_behind(&fw, "walled").unwrap();
    let proxy_ip = proxy_host.ip.to_string();
    block_udp(&fw, Some((&proxy_ip, 3128)));
    let script = nat.lab().dir().join("proxy.py");
    std::fs::write(&script, PROXY).unwrap();
    let proxy = nat
        .spawn(
            &proxy_host,
            "connect-proxy",
            "python3",
            [script.as_os_str()],
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || proxy
            .stdout()
            .contains("listening")),
        "proxy did not start"
    );

    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(nat.lab(), &public, "public", &token).unwrap();

    let state = nat.lab().state_dir("walled").unwrap();
    let token_file = write_token_file(&state, &token).unwrap();
    let mesh = mesh_e2e::mesh_bin().unwrap();
    let proxy_url = format!("HTTPS_PROXY=http://{proxy_ip}:3128");
    let t = Instant::now();
    let w = Agent::spawn(
        nat.lab(),
        &walled,
        "walled",
        "env",
        [
            proxy_url.as_str(),
            mesh.to_str().unwrap(),
            "join",
            "--token-file",
            token_file.to_str().unwrap(),
            "--name",
            "walled",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(
        walled.wait_ping(a.address, Duration::from_secs(10)),
        "no ping through the proxy: {:#}",
        w.status().unwrap()
    );
    eprintln!(
        "through an HTTP CONNECT proxy: join to first ping {:?}",
        t.elapsed()
    );
    assert!(public.wait_ping(w.address, Duration::from_secs(10)));
    assert_eq!(transport(&w), "tcp");
    let log = proxy.stdout();
    assert!(
        log.contains(&format!("CONNECT {}:443", ctl_host.ip)),
        "the proxy carried the control connection: {log}"
    );
}

#[test]
fn udp_blocked_while_up_moves_to_tcp_in_seconds_and_back_when_it_returns() {
    let mut nat = NatLab::new("udpflip").unwrap();
    let ctl_host = nat.controller_host();
    let public = nat.add_public_host("public").unwrap();
    let fw = nat.add_router("fw", NatKind::PortRestricted).unwrap();
    let site = nat.add_host_behind(&fw, "site").unwrap();
    let mut ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(nat.lab(), &public, "public", &token).unwrap();
    let s = Agent::join(nat.lab(), &site, "site", &token).unwrap();
    assert!(site.wait_ping(a.address, Duration::from_secs(10)));
    assert!(
        wait_until(Duration::from_secs(15), || path_of(&s, "public")
            == "direct"),
        "no direct path to start with: {:#}",
        s.status().unwrap()
    );
    assert_eq!(transport(&s), "quic");

    // A TCP stream inside the tunnel that runs through everything that follows.
    let a_ip = a.address.to_string();
    let sink = public.tcp_sink(5203, 120).unwrap();
    let stop = nat.lab().dir().join("stop-tcp");
    let client = format!(
        "import socket,os,time\n\
         s=socket.create_connection(('{a_ip}', 5203), timeout=60); n=0\n\
         while not os.path.exists('{}'):\n\
         \x20   s.sendall(b'x'*20000); n+=20000; time.sleep(0.05)\n\
         s.close(); print(n)\n",
        stop.display()
    );
    let mut cli = Command::new("ip")
        .args(["netns", "exec", site.ns.as_str(), "timeout", "150"])
        .args(["python3", "-c", client.as_str()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));

    // UDP goes, while traffic flows.
    block_udp(&fw, None);
    let t = Instant::now();
    let back = wait_for(Duration::from_secs(15), || {
        let out = site.run("ping", ["-c", "1", "-W", "1", a_ip.as_str()]);
        out.success().then(|| t.elapsed())
    })
    .unwrap_or_else(|| {
        panic!(
            "no traffic after UDP was blocked: {:#}",
            s.status().unwrap()
        )
    });
    eprintln!(
        "UDP blocked: traffic again after {back:?} (on {})",
        transport(&s)
    );
    assert!(back <= Duration::from_secs(5), "took {back:?}");
    assert!(wait_until(Duration::from_secs(5), || transport(&s) == "tcp"));
    assert_eq!(path_of(&s, "public"), "relay");
    std::thread::sleep(Duration::from_secs(2));

    // UDP comes back: QUIC and a direct path again within a minute.
    unblock(&fw);
    let t = Instant::now();
    let restored = wait_for(Duration::from_secs(60), || {
        (transport(&s) == "quic" && path_of(&s, "public") == "direct").then(|| t.elapsed())
    })
    .unwrap_or_else(|| panic!("not back on QUIC and direct: {:#}", s.status().unwrap()));
    eprintln!("UDP restored: QUIC and direct again after {restored:?}");

    // The stream survived both moves.
    std::fs::write(&stop, b"").unwrap();
    let status = cli.wait().unwrap();
    let mut sent = String::new();
    cli.stdout
        .take()
        .unwrap()
        .read_to_string(&mut sent)
        .unwrap();
    assert!(
        status.success(),
        "the TCP connection inside the tunnel broke"
    );
    let sent: u64 = sent.trim().parse().unwrap();
    assert_eq!(sink.received(), sent, "bytes lost across the moves");

    // The controller (and its relay) restarted while the node is on TCP: it comes back.
    block_udp(&fw, None);
    assert!(wait_until(Duration::from_secs(10), || transport(&s) == "tcp"));
    ctl.kill9();
    ctl.serve().unwrap();
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || {
            transport(&s) == "tcp"
                && s.status()
                    .is_ok_and(|v| v["controller"]["connected"] == true)
                && site
                    .run("ping", ["-c", "1", "-W", "1", a_ip.as_str()])
                    .success()
        }),
        "not back after the controller restarted: {:#}",
        s.status().unwrap()
    );
    eprintln!(
        "controller restarted under a node on TCP: back after {:?}",
        t.elapsed()
    );
}

fn relay_state(a: &Agent, name: &str) -> (bool, String) {
    let status = a.status().unwrap_or_default();
    let relay = status["relays"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or_default();
    (
        relay["connected"] == true,
        relay["transport"].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn a_standalone_relay_restarted_under_nodes_on_tcp_gets_them_back() {
    let mut nat = NatLab::new("tcprelay").unwrap();
    let ctl_host = nat.controller_host();
    let relay_host = nat.add_public_host("relay").unwrap();
    let fw1 = nat.add_router("fw1", NatKind::PortRestricted).unwrap();
    let fw2 = nat.add_router("fw2", NatKind::PortRestricted).unwrap();
    let h1 = nat.add_host_behind(&fw1, "w1").unwrap();
    let h2 = nat.add_host_behind(&fw2, "w2").unwrap();
    block_udp(&fw1, None);
    block_udp(&fw2, None);

    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let controller_key = ctl.admin(["key"]).ok().unwrap().stdout.trim().to_owned();
    let state = nat.lab().state_dir("relay").unwrap();
    let state = state.to_str().unwrap().to_owned();
    let bin = mesh_e2e::controller_bin().unwrap();
    let key = mesh_e2e::run(
        &relay_host.ns,
        &bin,
        ["relay", "--print-key", "--state-dir", state.as_str()],
    )
    .ok()
    .unwrap()
    .stdout
    .trim()
    .to_owned();
    let listen = format!("{}:7444", relay_host.ip);
    let tcp = format!("{}:443", relay_host.ip);
    let args = [
        "relay",
        "--listen",
        listen.as_str(),
        "--controller-key",
        controller_key.as_str(),
        "--state-dir",
        state.as_str(),
    ];
    let relay_up = |ns: &str| {
        wait_until(Duration::from_secs(10), || {
            mesh_e2e::run(ns, "ss", ["-H", "-ltn"])
                .stdout
                .contains(&format!("{}:443", relay_host.ip))
        })
    };
    let mut relay = nat.spawn(&relay_host, "relay", &bin, args).unwrap();
    assert!(relay_up(&relay_host.ns), "relay did not listen on TCP");
    ctl.admin([
        "region",
        "add",
        "eu",
        "--addr",
        &listen,
        "--tcp-addr",
        &tcp,
        "--key",
        &key,
    ])
    .ok()
    .unwrap();

    let a = Agent::join(nat.lab(), &h1, "w1", &token).unwrap();
    let b = Agent::join(nat.lab(), &h2, "w2", &token).unwrap();
    let on_relay_over_tcp = || {
        relay_state(&a, "eu") == (true, "tcp".to_owned())
            && relay_state(&b, "eu") == (true, "tcp".to_owned())
    };
    assert!(
        wait_until(Duration::from_secs(20), on_relay_over_tcp),
        "not on the standalone relay over TCP: {:#}",
        a.status().unwrap()
    );
    assert!(h1.wait_ping(b.address, Duration::from_secs(10)));
    assert!(
        wait_until(Duration::from_secs(10), || a
            .peer("w2")
            .is_ok_and(|p| p["relay"] == "eu")),
        "traffic not through the standalone relay: {:#}",
        a.peer("w2").unwrap()
    );

    // The relay restarts: the nodes come back to it over TCP and traffic flows.
    relay.kill9();
    let mut relay = nat.spawn(&relay_host, "relay-again", &bin, args).unwrap();
    assert!(relay_up(&relay_host.ns));
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), on_relay_over_tcp),
        "not back on the restarted relay: {:#}",
        a.status().unwrap()
    );
    assert!(h1.wait_ping(b.address, Duration::from_secs(10)));
    eprintln!(
        "standalone relay restarted under nodes on TCP: back after {:?}",
        t.elapsed()
    );
    relay.stop();
}
