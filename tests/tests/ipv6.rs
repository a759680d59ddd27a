//! The IPv6 underlay (issue 17), checked as a user would check it, in the NAT lab with IPv6
//! (2001:db8::/32 only; see `mesh_e2e::natlab`):
//!
//! - two nodes behind IPv4 symmetric NATs (only the relay over IPv4) with global IPv6 behind
//!   stateful firewalls go direct over IPv6 within 5 s of both being up, also when one of them
//!   has a temporary (privacy) address beside its stable one;
//! - a checksummed TCP stream (8 MiB) survives the loss of the IPv6 underlay (a router stops
//!   forwarding IPv6, or the host's address is deleted): the pair moves to IPv4 (direct where
//!   the NATs allow, else the relay) and every byte arrives;
//! - a 1,400-byte DF ping crosses an IPv6 underlay whose links carry 1,480-byte frames, at the
//!   MTU the agent chose for the peer (80 bytes of WireGuard over IPv6);
//! - an IPv6-only node joins a dual-stack controller (a token naming both addresses) and reaches
//!   IPv4-only nodes over the overlay;
//! - two public dual-stack nodes use IPv6 when both families are equal, settle on IPv4 when
//!   the IPv6 path is 40 ms slower each way, and go back to IPv6 when it is not.
//!
//! Every figure is printed before the limits are checked, so a failing run still reports them.
#![allow(clippy::unwrap_used)]

use mesh_e2e::natlab::{is_documentation_v6, NatKind, NatLab, Router, Stack, CONTROLLER_IP};
use mesh_e2e::netns::{ip, Host};
use mesh_e2e::{wait_all_pairs_ping, wait_for, wait_until, Agent, Controller, Proc, CONTROL_PORT};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

const NET: &str = "v6";
/// Both nodes direct over IPv6 this soon after both are up (issue 17).
const DIRECT_V6_LIMIT: Duration = Duration::from_secs(5);
/// How long a figure is measured beyond its limit, so that a failure says how long it took.
const MEASURE: Duration = Duration::from_secs(20);
/// The pair must be off the dead IPv6 path this soon after it died.
const OFF_V6_LIMIT: Duration = Duration::from_secs(10);
/// With IPv6 40 ms slower each way, the pair must be on IPv4 this soon (issue 17).
const TO_V4_LIMIT: Duration = Duration::from_secs(30);
/// TCP port of the checksummed stream.
const STREAM_PORT: u16 = 5217;
/// Rate of the stream: 2 MB/s, within what the relay carries.
const STREAM_RATE: u64 = 2_000_000;
/// The stream carries at least this much (8 MiB) before it ends.
const STREAM_TOTAL: u64 = 8 << 20;
/// Bytes the stream must move past a point to count as flowing: more than can be in flight.
const FLOWING: u64 = 256 * 1024;

/// What `mesh status --json` says of the path to one peer.
#[derive(Debug, Clone, Default, PartialEq)]
struct PathSeen {
    path: String,
    endpoint: Option<SocketAddr>,
    family: Option<String>,
}

impl PathSeen {
    /// Direct, over IPv6, to an address of the lab's IPv6 internet.
    fn direct_v6(&self) -> bool {
        self.path == "direct"
            && self.family.as_deref() == Some("ipv6")
            && self
                .endpoint
                .is_some_and(|e| matches!(e.ip(), IpAddr::V6(ip) if is_documentation_v6(&ip)))
    }

    /// Direct, over IPv4 (shown as a plain IPv4 address, not an IPv4-mapped IPv6 one).
    fn direct_v4(&self) -> bool {
        self.path == "direct"
            && self.family.as_deref() == Some("ipv4")
            && self.endpoint.is_some_and(|e| e.is_ipv4())
    }

    /// On IPv4: direct over IPv4, or the relay (which the nodes reach over IPv4 here).
    fn off_v6(&self) -> bool {
        self.direct_v4() || self.path == "relay"
    }
}

fn seen(a: &Agent, peer: &str) -> PathSeen {
    let Ok(p) = a.peer(peer) else {
        return PathSeen::default();
    };
    PathSeen {
        path: p["path"].as_str().unwrap_or_default().to_string(),
        endpoint: p["endpoint"].as_str().and_then(|e| e.parse().ok()),
        family: p["family"].as_str().map(str::to_owned),
    }
}

/// Pings `a` → `b` over the overlay (traffic for the path choice to act on) and polls both
/// statuses until `ok` holds on both sides; how long that took, or `None` after `timeout`.
fn wait_both(
    a: &Agent,
    b: &Agent,
    timeout: Duration,
    ok: impl Fn(&PathSeen) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    wait_for(timeout, || {
        let _ = a.host.ping(b.address);
        (ok(&seen(a, &b.name)) && ok(&seen(b, &a.name))).then(|| start.elapsed())
    })
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{:.3} s", d.as_secs_f64()))
}

fn both_statuses(a: &Agent, b: &Agent) -> String {
    format!(
        "{}: {:#}\n{}: {:#}",
        a.name,
        a.status().unwrap_or_default(),
        b.name,
        b.status().unwrap_or_default()
    )
}

/// Two sites behind dual-stack routers of `kind` (IPv4 NAT, IPv6 firewall), one dual-stack
/// host in each, named `a` and `b`.
fn two_sites(nat: &mut NatLab, kind: NatKind) -> (Router, Host, Router, Host) {
    let r1 = nat.add_dual_stack_router("site-a", kind).unwrap();
    let r2 = nat.add_dual_stack_router("site-b", kind).unwrap();
    let a = nat
        .add_host_behind_with(&r1, "a", Stack::DualStack)
        .unwrap();
    let b = nat
        .add_host_behind_with(&r2, "b", Stack::DualStack)
        .unwrap();
    (r1, a, r2, b)
}

/// A controller on 203.0.113.1 with network [`NET`] and a reusable token.
fn controller(nat: &NatLab) -> (Controller, String) {
    let ctl = Controller::start(nat.lab(), &nat.controller_host()).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    (ctl, token)
}

#[test]
fn nodes_behind_symmetric_nats_with_global_ipv6_go_direct_over_ipv6_within_5s() {
    direct_over_ipv6_within_5s("v6-direct", false);
}

/// As above, with a privacy address on b (as most desktops and phones have: `use_tempaddr=2`,
/// so the kernel sends from the temporary address unless told otherwise). b offers its stable
/// address; both firewalls only let in what answers their own host's packets, so mesh must
/// send from the address it offers (or use the one its peer's packets come from).
#[test]
fn a_node_with_a_privacy_address_goes_direct_over_ipv6_within_5s_too() {
    direct_over_ipv6_within_5s("v6-privacy", true);
}

fn direct_over_ipv6_within_5s(label: &str, privacy: bool) {
    let mut nat = NatLab::new(label).unwrap();
    let (_r1, a_host, _r2, b_host) = two_sites(&mut nat, NatKind::Symmetric);
    let b_stable = b_host.ip6.unwrap();
    let b_temporary = privacy.then(|| nat.add_temporary_address(&b_host).unwrap());
    let b_addrs: Vec<IpAddr> = [Some(b_stable), b_temporary]
        .into_iter()
        .flatten()
        .map(IpAddr::V6)
        .collect();
    let (_ctl, token) = controller(&nat);
    let a = Agent::join(nat.lab(), &a_host, "a", &token).unwrap();
    let b = Agent::join(nat.lab(), &b_host, "b", &token).unwrap();

    let direct = wait_both(&a, &b, MEASURE, PathSeen::direct_v6);
    let (on_a, on_b) = (seen(&a, "b"), seen(&b, "a"));
    // The source address b's kernel picks toward a, for the failure message.
    let b_source = b_host
        .run(
            "ip",
            ["-6", "route", "get", &a_host.ip6.unwrap().to_string()],
        )
        .stdout;
    eprintln!(
        "both up -> direct over IPv6 on both sides: {} (limit {}); a sees b at {:?}, b sees a at \
         {:?}",
        secs(direct),
        secs(Some(DIRECT_V6_LIMIT)),
        on_a.endpoint,
        on_b.endpoint
    );
    assert!(
        direct.is_some_and(|d| d <= DIRECT_V6_LIMIT),
        "not direct over IPv6 on both sides within {DIRECT_V6_LIMIT:?} (took {}); b's route to \
         a: {}\n{}\n{}",
        secs(direct),
        b_source.trim(),
        both_statuses(&a, &b),
        nat.rulesets()
    );
    // The endpoints are the peers' own global addresses (no NAT for IPv6).
    assert!(
        on_a.endpoint.is_some_and(|e| b_addrs.contains(&e.ip())),
        "a does not use one of b's addresses {b_addrs:?}: {on_a:?}"
    );
    assert_eq!(
        on_b.endpoint.map(|e| e.ip()),
        a_host.ip6.map(IpAddr::V6),
        "{on_b:?}"
    );
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(10)).unwrap();
    assert!(
        seen(&a, "b").direct_v6() && seen(&b, "a").direct_v6(),
        "the overlay ping moved the pair off IPv6:\n{}",
        both_statuses(&a, &b)
    );

    // What b offers: its stable global address (before a temporary one), no link-local one.
    let offered: Vec<SocketAddr> = a.peer("b").unwrap()["candidates"]
        .as_array()
        .map(|c| c.iter().filter_map(|e| e.as_str()?.parse().ok()).collect())
        .unwrap_or_default();
    let at = |ip: std::net::Ipv6Addr| offered.iter().position(|c| c.ip() == IpAddr::V6(ip));
    assert!(
        offered.iter().all(|c| match c.ip() {
            IpAddr::V6(ip) => ip.segments()[0] & 0xffc0 != 0xfe80,
            IpAddr::V4(_) => true,
        }),
        "b offers a link-local address: {offered:?}"
    );
    // (The temporary one may be left out where a stable one exists; offered, it comes after.)
    let temporary_at = b_temporary.and_then(at);
    assert!(
        matches!((at(b_stable), temporary_at), (Some(s), t) if t.is_none_or(|t| s < t)),
        "b does not offer its stable address {b_stable} (before its temporary one \
         {b_temporary:?}): {offered:?}"
    );
}

fn stream_bin() -> &'static str {
    env!("CARGO_BIN_EXE_mesh-e2e-stream")
}

/// The stream receiver's last progress line `at UNIX_MS TOTAL`: bytes received so far.
fn received(receiver: &Proc) -> u64 {
    receiver
        .stdout()
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("at "))
        .find_map(|l| l.split_once(' ')?.1.parse().ok())
        .unwrap_or(0)
}

/// How the IPv6 underlay goes away.
#[derive(Debug, Clone, Copy)]
enum Withdrawal {
    /// Site a's router stops forwarding IPv6; the hosts are not told (a black hole).
    RouterDrops,
    /// a's global IPv6 address is deleted (the host knows; its packets cannot leave).
    AddressDeleted,
}

#[test]
fn a_tcp_stream_survives_ipv6_dying_in_the_network_by_moving_to_ipv4() {
    // Port-restricted NATs: after IPv6, a direct IPv4 path exists too.
    stream_survives_losing_ipv6(
        "v6-blackhole",
        NatKind::PortRestricted,
        Withdrawal::RouterDrops,
    );
}

#[test]
fn a_tcp_stream_survives_the_hosts_ipv6_address_going_by_moving_to_ipv4() {
    stream_survives_losing_ipv6(
        "v6-addr-gone",
        NatKind::PortRestricted,
        Withdrawal::AddressDeleted,
    );
}

#[test]
fn a_tcp_stream_survives_ipv6_dying_behind_symmetric_nats_by_moving_to_the_relay() {
    // Over IPv4 only the relay is left.
    stream_survives_losing_ipv6("v6-to-relay", NatKind::Symmetric, Withdrawal::RouterDrops);
}

fn stream_survives_losing_ipv6(label: &str, kind: NatKind, how: Withdrawal) {
    let mut nat = NatLab::new(label).unwrap();
    let (r1, a_host, _r2, b_host) = two_sites(&mut nat, kind);
    let (_ctl, token) = controller(&nat);
    let a = Agent::join(nat.lab(), &a_host, "a", &token).unwrap();
    let b = Agent::join(nat.lab(), &b_host, "b", &token).unwrap();
    assert!(
        wait_both(&a, &b, Duration::from_secs(30), PathSeen::direct_v6).is_some(),
        "precondition: a and b never went direct over IPv6:\n{}",
        both_statuses(&a, &b)
    );

    // The checksummed stream a -> b over the overlay.
    let mut receiver = nat
        .spawn(
            &b_host,
            "stream-recv",
            stream_bin(),
            ["recv".to_string(), STREAM_PORT.to_string()],
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || receiver
            .stdout()
            .starts_with("listening")),
        "the stream receiver did not start: {}",
        receiver.log()
    );
    let stop = nat.lab().dir().join("stop-stream");
    let mut sender = nat
        .spawn(
            &a_host,
            "stream-send",
            stream_bin(),
            [
                "send".to_string(),
                SocketAddrV4::new(b.address, STREAM_PORT).to_string(),
                STREAM_RATE.to_string(),
                stop.display().to_string(),
            ],
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || received(&receiver) > FLOWING),
        "the stream does not flow over IPv6: {}\n{}",
        sender.log(),
        receiver.log()
    );
    assert!(
        seen(&a, "b").direct_v6(),
        "precondition: the stream does not start on IPv6:\n{}",
        both_statuses(&a, &b)
    );

    match how {
        Withdrawal::RouterDrops => r1.block_ipv6().unwrap(),
        Withdrawal::AddressDeleted => {
            let addr = format!("{}/64", a_host.ip6.unwrap());
            ip(["-n", &a_host.ns, "addr", "del", &addr, "dev", "eth0"]).unwrap();
        }
    }
    let cut = Instant::now();
    let before = received(&receiver);
    let off_v6 = wait_for(MEASURE, || {
        (seen(&a, "b").off_v6() && seen(&b, "a").off_v6()).then(|| cut.elapsed())
    });
    let (on_a, on_b) = (seen(&a, "b"), seen(&b, "a"));
    let flowing = wait_for(MEASURE, || {
        (received(&receiver) > before + FLOWING).then(|| cut.elapsed())
    });
    // On its new path until it carried STREAM_TOTAL in all.
    wait_until(MEASURE, || received(&receiver) >= STREAM_TOTAL);
    std::fs::write(&stop, b"").unwrap();
    let sender_status = sender.wait_exit(Duration::from_secs(90));
    let receiver_status = receiver.wait_exit(Duration::from_secs(30));
    let line = |p: &Proc, prefix: &str| {
        p.stdout()
            .lines()
            .find_map(|l| l.strip_prefix(prefix).map(str::to_owned))
    };
    let (sent, done) = (line(&sender, "sent "), line(&receiver, "done "));
    eprintln!(
        "IPv6 withdrawn ({how:?}) -> both sides off IPv6: {} (limit {}; a: {} {:?} {:?}, b: {} \
         {:?} {:?}); stream moving again: {}; sender `{}`, receiver `{}`",
        secs(off_v6),
        secs(Some(OFF_V6_LIMIT)),
        on_a.path,
        on_a.family,
        on_a.endpoint,
        on_b.path,
        on_b.family,
        on_b.endpoint,
        secs(flowing),
        sent.as_deref().unwrap_or("?"),
        done.as_deref().unwrap_or("?")
    );
    assert!(
        off_v6.is_some_and(|d| d <= OFF_V6_LIMIT),
        "the pair did not leave the dead IPv6 path within {OFF_V6_LIMIT:?}:\n{}",
        both_statuses(&a, &b)
    );
    assert!(
        flowing.is_some(),
        "the stream stopped moving after IPv6 was withdrawn: {}\n{}",
        sender.log(),
        receiver.log()
    );
    let total: Option<u64> = done
        .as_deref()
        .and_then(|d| d.split_whitespace().next()?.parse().ok());
    let intact = matches!((&sent, &done), (Some(s), Some(d)) if s == d)
        && total.is_some_and(|t| t >= STREAM_TOTAL)
        && sender_status.is_some_and(|s| s.success())
        && receiver_status.is_some_and(|s| s.success());
    assert!(
        intact,
        "the TCP stream did not survive whole (sent: {sent:?}, received: {done:?}):\n{}\n{}",
        sender.log(),
        receiver.log()
    );
}

/// One ping over the overlay with `size` bytes of IP packet and DF set.
fn df_ping(host: &Host, size: u32, to: &str) -> mesh_e2e::Output {
    let payload = (size - 28).to_string();
    host.run(
        "ping",
        ["-M", "do", "-c", "1", "-W", "2", "-s", payload.as_str(), to],
    )
}

/// The MTU of `dev` in `host`.
fn link_mtu(host: &Host, dev: &str) -> Option<u32> {
    let out = ip(["-n", &host.ns, "-o", "link", "show", dev]).ok()?;
    let mut words = out.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

#[test]
fn a_1400_byte_df_ping_crosses_an_ipv6_underlay_of_1480_byte_links() {
    let mut nat = NatLab::new("v6-mtu").unwrap();
    // Symmetric NATs: IPv6 is the only direct path.
    let (_r1, a_host, r2, b_host) = two_sites(&mut nat, NatKind::Symmetric);
    // b's LAN carries 1,480-byte frames: 1,400 of overlay packet + 80 of IPv6, UDP and
    // WireGuard. (1,420, the default, would need 1,500; over IPv4 it would still fit.)
    nat.set_link_mtu(&r2, &b_host, 1480).unwrap();
    let (_ctl, token) = controller(&nat);
    let a = Agent::join(nat.lab(), &a_host, "a", &token).unwrap();
    let b = Agent::join(nat.lab(), &b_host, "b", &token).unwrap();
    assert!(
        wait_both(&a, &b, Duration::from_secs(30), PathSeen::direct_v6).is_some(),
        "precondition: a and b never went direct over IPv6:\n{}",
        both_statuses(&a, &b)
    );

    // The MTU the agent uses toward b: the peer's path MTU if it has found a smaller one,
    // else mesh0's.
    let b_ip = b.address.to_string();
    let effective = || {
        let mesh0 = link_mtu(&a_host, "mesh0")?;
        let path = a.peer("b").ok()?["path_mtu"].as_u64();
        Some(path.map_or(mesh0, |p| mesh0.min(u32::try_from(p).unwrap_or(mesh0))))
    };
    let mtu = wait_for(Duration::from_secs(40), || {
        let _ = df_ping(&a_host, 1400, &b_ip);
        effective().filter(|m| *m <= 1400)
    });
    eprintln!(
        "MTU toward b over IPv6 with 1480-byte links: {:?} (mesh0 {:?}, status {})",
        mtu,
        link_mtu(&a_host, "mesh0"),
        a.peer("b")
            .map(|p| p["path_mtu"].clone())
            .unwrap_or_default()
    );
    let mtu = mtu.unwrap_or_else(|| {
        panic!(
            "the agent kept an MTU toward b that a 1,480-byte IPv6 path cannot carry ({:?}): {}",
            effective(),
            both_statuses(&a, &b)
        )
    });
    assert!(
        (1392..=1400).contains(&mtu),
        "MTU toward b {mtu}: 1480 - 80 = 1400 expected"
    );
    // A DF ping of that size, and of 1,400 bytes where that fits, gets through over IPv6.
    for size in [mtu, mtu.min(1400)] {
        assert!(
            wait_until(Duration::from_secs(10), || df_ping(&a_host, size, &b_ip)
                .success()),
            "a {size}-byte DF ping a -> b does not get through: {}\n{}",
            df_ping(&a_host, size, &b_ip),
            both_statuses(&a, &b)
        );
    }
    let a_ip = a.address.to_string();
    assert!(
        wait_until(Duration::from_secs(10), || df_ping(
            &b_host,
            mtu.min(1400),
            &a_ip
        )
        .success()),
        "a DF ping b -> a does not get through"
    );
    assert!(
        seen(&a, "b").direct_v6() && seen(&b, "a").direct_v6(),
        "the large pings did not cross IPv6:\n{}",
        both_statuses(&a, &b)
    );
    // The IPv6 overlay follows the same path MTU: a full-size IPv6 packet to b's ULA crosses,
    // and a larger one is refused at once by a's kernel (the peer's /128 route carries the
    // MTU) instead of vanishing on the path.
    let b6 = b.status().unwrap()["node"]["address6"]
        .as_str()
        .map(str::to_owned)
        .expect("b has an IPv6 overlay address");
    let ping6 = |size: u32| {
        let payload = (size - 48).to_string();
        a_host.run(
            "ping",
            [
                "-6",
                "-M",
                "do",
                "-c",
                "1",
                "-W",
                "2",
                "-s",
                payload.as_str(),
                b6.as_str(),
            ],
        )
    };
    assert!(
        wait_until(Duration::from_secs(10), || ping6(mtu).success()),
        "a {mtu}-byte IPv6 DF ping to b's overlay address does not get through: {}",
        ping6(mtu)
    );
    let too_big = ping6(mtu + 16);
    assert!(
        !too_big.success() && too_big.to_string().to_lowercase().contains("too long"),
        "a {}-byte IPv6 packet to b was not refused locally as too long: {too_big}",
        mtu + 16
    );
}

#[test]
fn an_ipv6_only_node_joins_a_dual_stack_controller_and_reaches_ipv4_only_nodes() {
    let mut nat = NatLab::new("v6-only").unwrap();
    let ctl6 = nat.controller_ipv6().unwrap();
    let site6 = nat
        .add_dual_stack_router("site6", NatKind::PortRestricted)
        .unwrap();
    let six_host = nat
        .add_host_behind_with(&site6, "six", Stack::V6Only)
        .unwrap();
    let site4 = nat.add_router("site4", NatKind::PortRestricted).unwrap();
    let four_host = nat.add_host_behind(&site4, "four").unwrap();
    let pub4_host = nat.add_public_host("pub4").unwrap();
    let dual_host = nat.add_public_host_with("dual", Stack::DualStack).unwrap();
    // One controller socket for both families, one token for all: it names the IPv6 address
    // (`--controller`) and the other announced one, so the IPv4-only nodes must go on to it.
    // (Without `--controller`: tokens_of_a_dual_stack_controller_name_the_addresses_it_announces.)
    let ctl = dual_stack_controller(&mut nat);
    let v6_first = SocketAddr::new(ctl6.into(), CONTROL_PORT).to_string();
    let token = ctl
        .create_token(NET, &["--reusable", "--controller", &v6_first])
        .unwrap();

    let six = Agent::join(nat.lab(), &six_host, "six", &token).unwrap();
    let four = Agent::join(nat.lab(), &four_host, "four", &token).unwrap();
    let pub4 = Agent::join(nat.lab(), &pub4_host, "pub4", &token).unwrap();
    let dual = Agent::join(nat.lab(), &dual_host, "dual", &token).unwrap();
    let controller = six.status().unwrap()["controller"].clone();
    eprintln!("the IPv6-only node's controller: {controller}");
    assert_eq!(
        controller["connected"], true,
        "the IPv6-only node is not connected to the controller: {controller:#}"
    );

    wait_all_pairs_ping(&[&six, &four, &pub4, &dual], Duration::from_secs(30)).unwrap_or_else(
        |e| {
            panic!(
                "{e:#}\n{}\n{}",
                both_statuses(&six, &four),
                both_statuses(&pub4, &dual)
            )
        },
    );
    // Between the families, the relay; with the dual-stack node, IPv6 directly.
    for peer in ["four", "pub4"] {
        let s = seen(&six, peer);
        assert_eq!(s.path, "relay", "six -> {peer}: {s:?}");
    }
    let mut failures = Vec::new();
    if wait_both(&six, &dual, MEASURE, PathSeen::direct_v6).is_none() {
        failures.push(format!(
            "the IPv6-only node and the dual-stack node are not direct over IPv6: six sees dual \
             as {:?} with candidates {}, dual sees six as {:?} with candidates {}",
            seen(&six, "dual"),
            six.peer("dual").unwrap()["candidates"],
            seen(&dual, "six"),
            dual.peer("six").unwrap()["candidates"]
        ));
    }
    // Over QUIC, as IPv4 nodes are, not TLS over TCP 443 (the fallback for blocked UDP).
    for node in [&six, &dual] {
        let controller = node.status().unwrap()["controller"].clone();
        if controller["transport"] != "quic" {
            failures.push(format!(
                "{} reaches the controller at {} over {} instead of QUIC; its log says: {}",
                node.name,
                controller["address"],
                controller["transport"],
                node.stderr()
                    .lines()
                    .find(|l| l.contains("QUIC"))
                    .unwrap_or("(nothing about QUIC)")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `mesh-controller serve --listen [::]:7443 --announce [2001:db8::1]:7443,203.0.113.1:7443`
/// on the controller host (given its IPv6 address), with network [`NET`].
fn dual_stack_controller(nat: &mut NatLab) -> Controller {
    let ctl6 = nat.controller_ipv6().unwrap();
    let announce = [
        SocketAddr::new(ctl6.into(), CONTROL_PORT),
        SocketAddr::new(CONTROLLER_IP.into(), CONTROL_PORT),
    ];
    let ctl = Controller::start_dual_stack(nat.lab(), &nat.controller_host(), &announce).unwrap();
    ctl.create_network(NET).unwrap();
    ctl
}

/// What issue 17 promises an administrator: `serve --announce "[2001:db8::1]:7443,
/// 203.0.113.1:7443"` on a controller listening on `[::]:7443` makes tokens that name both
/// addresses, so that nodes of either family join with the one token.
#[test]
fn tokens_of_a_dual_stack_controller_name_the_addresses_it_announces() {
    let mut nat = NatLab::new("v6-token").unwrap();
    let six_host = nat.add_public_host_with("six", Stack::V6Only).unwrap();
    let four_host = nat.add_public_host("four").unwrap();
    let ctl = dual_stack_controller(&mut nat);
    let token = ctl.create_token(NET, &["--reusable"]).unwrap_or_else(|e| {
        panic!("`token create` on a controller that announces both its addresses: {e:#}")
    });
    let six = Agent::join(nat.lab(), &six_host, "six", &token).unwrap();
    let four = Agent::join(nat.lab(), &four_host, "four", &token).unwrap();
    wait_all_pairs_ping(&[&six, &four], Duration::from_secs(20)).unwrap();
}

fn tundelay_bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_mesh-e2e-tundelay"))
}

/// The round trip of one IPv6 ping from `host` to `to`, in ms.
fn ping6_ms(host: &Host, to: std::net::Ipv6Addr) -> Option<f64> {
    let out = host.run("ping", ["-6", "-n", "-c", "1", "-W", "2", &to.to_string()]);
    out.stdout
        .split("time=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn public_dual_stack_nodes_prefer_ipv6_and_settle_on_ipv4_when_ipv6_is_40ms_slower() {
    let mut nat = NatLab::new("v6-choice").unwrap();
    let p_host = nat.add_public_host_with("p", Stack::DualStack).unwrap();
    let q_host = nat.add_public_host_with("q", Stack::DualStack).unwrap();
    let (_ctl, token) = controller(&nat);
    let p = Agent::join(nat.lab(), &p_host, "p", &token).unwrap();
    let q = Agent::join(nat.lab(), &q_host, "q", &token).unwrap();

    // Both families equal: IPv6.
    let on_v6 = wait_both(&p, &q, MEASURE, PathSeen::direct_v6);
    eprintln!("both families equal -> direct over IPv6: {}", secs(on_v6));
    assert!(
        on_v6.is_some(),
        "with both families equal the pair did not go direct over IPv6:\n{}",
        both_statuses(&p, &q)
    );

    // IPv6 40 ms slower each way.
    let mut delay = nat
        .delay_ipv6(tundelay_bin(), &[&p_host, &q_host], 40)
        .unwrap();
    let rtt6 = ping6_ms(&p_host, q_host.ip6.unwrap());
    assert!(
        rtt6.is_some_and(|ms| ms >= 70.0),
        "the lab did not delay IPv6 (ping -6 round trip {rtt6:?} ms)"
    );
    let on_v4 = wait_both(&p, &q, TO_V4_LIMIT + MEASURE, PathSeen::direct_v4);
    eprintln!(
        "IPv6 +80 ms round trip ({rtt6:?} ms) -> direct over IPv4: {} (limit {})",
        secs(on_v4),
        secs(Some(TO_V4_LIMIT))
    );
    assert!(
        on_v4.is_some_and(|d| d <= TO_V4_LIMIT),
        "the pair did not settle on IPv4 within {TO_V4_LIMIT:?} of IPv6 getting slower:\n{}",
        both_statuses(&p, &q)
    );

    // The delay gone: both families equal again, so IPv6 again.
    delay.remove().unwrap();
    let back = wait_both(&p, &q, TO_V4_LIMIT + MEASURE, PathSeen::direct_v6);
    eprintln!(
        "delay removed -> back on IPv6: {} (limit {})",
        secs(back),
        secs(Some(TO_V4_LIMIT))
    );
    assert!(
        back.is_some_and(|d| d <= TO_V4_LIMIT),
        "the pair did not go back to IPv6 within {TO_V4_LIMIT:?} of it being as fast as IPv4:\n{}",
        both_statuses(&p, &q)
    );
}
