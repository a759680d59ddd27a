//! The NAT lab's routers behave as their names say: mappings and filtering as seen from the
//! internet with `mesh-e2e-stun`. Only the last test needs the product binaries.
#![allow(clippy::unwrap_used)]

use mesh_e2e::natlab::{NatKind, NatLab, Stack, Stun, CONTROLLER_IP};
use mesh_e2e::netns::ip;
use mesh_e2e::{Agent, Controller, Host, Proc, CONTROL_PORT};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::thread;
use std::time::Duration;

/// The reflectors' port.
const STUN_PORT: u16 = 3478;
/// The LAN hosts' probing port.
const LOCAL_PORT: u16 = 40000;
/// How long a datagram that should arrive may take.
const ARRIVAL: Duration = Duration::from_secs(3);
/// How long to wait after the last expected datagram before concluding the others were dropped.
const SETTLE: Duration = Duration::from_millis(500);

fn stun() -> Stun {
    Stun::new(env!("CARGO_BIN_EXE_mesh-e2e-stun"))
}

/// Two reflectors on two public hosts (203.0.113.10 and .11, port 3478).
struct Reflectors {
    hosts: [Host; 2],
    addrs: [SocketAddrV4; 2],
    _procs: [Proc; 2],
}

fn reflectors(nat: &mut NatLab) -> Reflectors {
    let r1 = nat.add_public_host("refl1").unwrap();
    let r2 = nat.add_public_host("refl2").unwrap();
    let p1 = stun().serve(nat, &r1, STUN_PORT).unwrap();
    let p2 = stun().serve(nat, &r2, STUN_PORT).unwrap();
    Reflectors {
        addrs: [
            SocketAddrV4::new(r1.ip, STUN_PORT),
            SocketAddrV4::new(r2.ip, STUN_PORT),
        ],
        hosts: [r1, r2],
        _procs: [p1, p2],
    }
}

/// Probes both reflectors from `host`'s port `port`; both must answer.
fn mappings(host: &Host, port: u16, refl: &Reflectors) -> [SocketAddrV4; 2] {
    let seen = stun().probe(host, port, &refl.addrs).unwrap();
    match seen.as_slice() {
        [Some(a), Some(b)] => [*a, *b],
        _ => panic!(
            "{} (port {port}) did not get answers from both reflectors {:?}: {seen:?}",
            host.name, refl.addrs
        ),
    }
}

fn assert_gone(names: &[String]) {
    let list = ip(["netns", "list"]).unwrap();
    for n in names {
        assert!(
            !list.split_whitespace().any(|w| w == n),
            "namespace {n} left behind"
        );
    }
}

#[test]
fn full_cone_maps_independently_of_endpoint_and_lets_anyone_in() {
    let mut nat = NatLab::new("full-cone").unwrap();
    let refl = reflectors(&mut nat);
    let router = nat.add_router("fc", NatKind::FullCone).unwrap();
    let h = nat.add_host_behind(&router, "h").unwrap();
    let h2 = nat.add_host_behind(&router, "h2").unwrap();
    let stranger = nat.add_public_host("stranger").unwrap();
    assert_eq!(router.wan_ip, Ipv4Addr::new(203, 0, 113, 100));
    assert_eq!(h.ip, Ipv4Addr::new(198, 51, 100, 10));

    // EIM: both reflectors see one mapping, on the router's WAN address.
    let [m1, m2] = mappings(&h, LOCAL_PORT, &refl);
    assert_eq!(m1, m2, "full cone: mapping depends on the destination");
    assert_eq!(*m1.ip(), router.wan_ip);

    // A second host using the same local port gets its own mapping, also independent of the
    // destination (a plain masquerade would give it per-destination ports).
    let [n1, n2] = mappings(&h2, LOCAL_PORT, &refl);
    assert_eq!(
        n1, n2,
        "full cone: the second host's mapping depends on the destination"
    );
    assert_eq!(*n1.ip(), router.wan_ip);
    assert_ne!(n1, m1, "two LAN endpoints share one mapping");

    // EIF: a host that never heard from them reaches each one through its mapping.
    let l1 = stun().listen(&nat, &h, LOCAL_PORT, 10, &[]).unwrap();
    let l2 = stun().listen(&nat, &h2, LOCAL_PORT, 10, &[]).unwrap();
    let from1 = SocketAddrV4::new(stranger.ip, 5001);
    let from2 = SocketAddrV4::new(stranger.ip, 5002);
    stun().send(&stranger, from1.port(), m1).unwrap();
    stun().send(&stranger, from2.port(), n1).unwrap();
    assert!(
        l1.wait_from(from1, ARRIVAL),
        "full cone: unsolicited datagram to {m1} did not reach h; got {:?}\n{}",
        l1.sources(),
        nat.rulesets()
    );
    assert!(
        l2.wait_from(from2, ARRIVAL),
        "full cone: unsolicited datagram to {n1} did not reach h2; got {:?}\n{}",
        l2.sources(),
        nat.rulesets()
    );
    thread::sleep(SETTLE);
    assert_eq!(l1.sources(), vec![from1], "h got someone else's datagrams");
    assert_eq!(l2.sources(), vec![from2], "h2 got someone else's datagrams");
}

#[test]
fn port_restricted_maps_independently_but_filters_by_address_and_port() {
    let mut nat = NatLab::new("port-restricted").unwrap();
    let refl = reflectors(&mut nat);
    let router = nat.add_router("pr", NatKind::PortRestricted).unwrap();
    let h = nat.add_host_behind(&router, "h").unwrap();
    let h2 = nat.add_host_behind(&router, "h2").unwrap();
    let stranger = nat.add_public_host("stranger").unwrap();

    let [m1, m2] = mappings(&h, LOCAL_PORT, &refl);
    assert_eq!(
        m1, m2,
        "port restricted: mapping depends on the destination"
    );
    assert_eq!(*m1.ip(), router.wan_ip);
    let [n1, n2] = mappings(&h2, LOCAL_PORT, &refl);
    assert_eq!(
        n1, n2,
        "port restricted: the second host's mapping depends on the destination"
    );
    assert_ne!(n1, m1, "two LAN endpoints share one mapping");

    // h has sent to refl1:5000 (and only that, on this port, besides the reflectors' 3478).
    let peer = SocketAddrV4::new(refl.hosts[0].ip, 5000);
    let l = stun().listen(&nat, &h, LOCAL_PORT, 10, &[peer]).unwrap();
    let stranger_src = SocketAddrV4::new(stranger.ip, 5000);
    let other_port = SocketAddrV4::new(refl.hosts[0].ip, 5001);
    stun().send(&stranger, stranger_src.port(), m1).unwrap();
    stun().send(&refl.hosts[0], other_port.port(), m1).unwrap();
    stun().send(&refl.hosts[0], peer.port(), m1).unwrap();
    assert!(
        l.wait_from(peer, ARRIVAL),
        "port restricted: the peer h sent to could not answer at {m1}; got {:?}\n{}",
        l.sources(),
        nat.rulesets()
    );
    thread::sleep(SETTLE);
    assert_eq!(
        l.sources(),
        vec![peer],
        "port restricted: unsolicited datagrams (from {stranger_src}, {other_port}) got in"
    );
}

#[test]
fn symmetric_maps_each_destination_to_another_port() {
    let mut nat = NatLab::new("symmetric").unwrap();
    let refl = reflectors(&mut nat);
    let router = nat.add_router("sym", NatKind::Symmetric).unwrap();
    let h = nat.add_host_behind(&router, "h").unwrap();

    let [m1, m2] = mappings(&h, LOCAL_PORT, &refl);
    assert_eq!(*m1.ip(), router.wan_ip);
    assert_eq!(*m2.ip(), router.wan_ip);
    assert_ne!(m1, m2, "symmetric: both destinations see one mapping");

    // And it filters: refl2 cannot reach h through the mapping refl1 saw.
    let l = stun().listen(&nat, &h, LOCAL_PORT, 10, &[]).unwrap();
    stun().send(&refl.hosts[1], 5000, m1).unwrap();
    stun().send(&refl.hosts[0], 5000, m2).unwrap();
    thread::sleep(SETTLE);
    assert_eq!(
        l.sources(),
        vec![],
        "symmetric: unsolicited datagrams got in"
    );
}

#[test]
fn plain_linux_gateway_behind_a_core_router_keeps_ports_and_is_a_hop_away() {
    let mut nat = NatLab::new("masquerade").unwrap();
    let refl = reflectors(&mut nat);
    let router = nat
        .add_router_via_core("masq", NatKind::Masquerade)
        .unwrap();
    let h = nat.add_host_behind(&router, "h").unwrap();

    // masquerade keeps the source port while the tuple is unique: one mapping for both.
    let [m1, m2] = mappings(&h, LOCAL_PORT, &refl);
    assert_eq!(m1, SocketAddrV4::new(router.wan_ip, LOCAL_PORT));
    assert_eq!(m1, m2);

    // The core is a routed hop: from behind the gateway, TTL 2 dies at the core (the gateway
    // took one), TTL 3 reaches the controller.
    let ping = |ttl: &str| {
        h.run(
            "ping",
            [
                "-n",
                "-c",
                "1",
                "-W",
                "1",
                "-t",
                ttl,
                &CONTROLLER_IP.to_string(),
            ],
        )
        .success()
    };
    assert!(!ping("2"), "TTL 2 got past the core router");
    assert!(ping("3"), "TTL 3 did not reach the controller");

    // No input filter: unsolicited UDP to the gateway's own address is taken by the gateway
    // itself (conntrack confirms an entry for it), and the port the host then uses toward that
    // sender is no longer free on the gateway: its flow leaves from another one.
    let sender = SocketAddrV4::new(*refl.addrs[0].ip(), 6000);
    stun()
        .send(
            &refl.hosts[0],
            6000,
            SocketAddrV4::new(router.wan_ip, 41000),
        )
        .unwrap();
    thread::sleep(SETTLE);
    let l = stun().listen(&nat, &refl.hosts[0], 6000, 10, &[]).unwrap();
    stun().send(&h, 41000, sender).unwrap();
    let arrived = mesh_e2e::wait_until(ARRIVAL, || {
        l.sources().iter().any(|s| *s.ip() == router.wan_ip)
    });
    assert!(arrived, "nothing arrived from the gateway");
    let seen = l.sources();
    assert!(
        seen.iter().all(|s| s.port() != 41000),
        "the gateway kept port 41000 although an inbound entry held it: {seen:?}"
    );
}

#[test]
fn udp_blocked_only_lets_udp_to_the_controller_port_out() {
    let mut nat = NatLab::new("udp-blocked").unwrap();
    let refl = reflectors(&mut nat);
    let ctl = nat.controller_host();
    assert_eq!(ctl.ip, CONTROLLER_IP);
    let _ctl_refl = stun().serve(&nat, &ctl, CONTROL_PORT).unwrap();
    let router = nat.add_router("blk", NatKind::UdpBlocked).unwrap();
    let h = nat.add_host_behind(&router, "h").unwrap();
    let control = SocketAddrV4::new(CONTROLLER_IP, CONTROL_PORT);

    // The reflector works from the internet...
    let from_public = stun()
        .probe(&refl.hosts[1], LOCAL_PORT, &refl.addrs[..1])
        .unwrap();
    assert!(from_public[0].is_some(), "refl1 does not answer at all");
    // ...but not from behind the router, while the controller port does.
    let seen = stun()
        .probe(&h, LOCAL_PORT, &[refl.addrs[0], control])
        .unwrap();
    assert_eq!(
        seen[0], None,
        "udp blocked: UDP to {} got through",
        refl.addrs[0]
    );
    let m = seen[1].unwrap_or_else(|| panic!("udp blocked: no answer from {control}"));
    assert_eq!(*m.ip(), router.wan_ip);
    // Another port of the controller host is blocked too.
    let other = SocketAddrV4::new(CONTROLLER_IP, CONTROL_PORT + 1);
    let _ctl_refl2 = stun().serve(&nat, &ctl, other.port()).unwrap();
    let seen = stun().probe(&h, LOCAL_PORT + 1, &[other]).unwrap();
    assert_eq!(seen[0], None, "udp blocked: UDP to {other} got through");
}

#[test]
fn double_nat_shows_the_cgnat_address_and_keeps_mappings() {
    let mut nat = NatLab::new("double-nat").unwrap();
    let refl = reflectors(&mut nat);
    let (cgnat, home) = nat.add_double_nat("dn").unwrap();
    let h = nat.add_host_behind(&home, "h").unwrap();
    let h2 = nat.add_host_behind(&home, "h2").unwrap();
    assert_eq!(cgnat.wan_ip, Ipv4Addr::new(203, 0, 113, 100));
    assert_eq!(cgnat.lan_ip, Ipv4Addr::new(192, 0, 2, 1));
    assert_eq!(home.wan_ip, Ipv4Addr::new(192, 0, 2, 2));
    assert_eq!(home.public_ip, cgnat.wan_ip);
    assert_eq!(h.ip, Ipv4Addr::new(198, 51, 100, 10));

    let [m1, m2] = mappings(&h, LOCAL_PORT, &refl);
    assert_eq!(
        *m1.ip(),
        cgnat.wan_ip,
        "double NAT: not seen from the CGNAT's address"
    );
    assert_eq!(m1, m2, "double NAT: mapping depends on the destination");
    let [n1, n2] = mappings(&h2, LOCAL_PORT, &refl);
    assert_eq!(
        n1, n2,
        "double NAT: the second host's mapping depends on the destination"
    );
    assert_ne!(n1, m1, "two LAN endpoints share one mapping");

    // Filtering: only the peer h sent to gets in, a stranger does not.
    let stranger = nat.add_public_host("stranger").unwrap();
    let peer = SocketAddrV4::new(refl.hosts[0].ip, 5000);
    let l = stun().listen(&nat, &h, LOCAL_PORT, 10, &[peer]).unwrap();
    stun().send(&stranger, 5000, m1).unwrap();
    stun().send(&refl.hosts[0], peer.port(), m1).unwrap();
    assert!(
        l.wait_from(peer, ARRIVAL),
        "double NAT: the peer h sent to could not answer at {m1}; got {:?}",
        l.sources()
    );
    thread::sleep(SETTLE);
    assert_eq!(
        l.sources(),
        vec![peer],
        "double NAT: an unsolicited datagram got in"
    );
}

#[test]
fn hosts_behind_one_router_talk_directly_and_everything_is_cleaned_up() {
    let mut nat = NatLab::new("lan").unwrap();
    let router = nat.add_router("home", NatKind::PortRestricted).unwrap();
    let a = nat.add_host_behind(&router, "a").unwrap();
    let b = nat.add_host_behind(&router, "b").unwrap();
    assert_eq!(a.ip, Ipv4Addr::new(198, 51, 100, 10));
    assert_eq!(b.ip, Ipv4Addr::new(198, 51, 100, 11));
    let _refl = stun().serve(&nat, &a, STUN_PORT).unwrap();
    let seen = stun()
        .probe(&b, LOCAL_PORT, &[SocketAddrV4::new(a.ip, STUN_PORT)])
        .unwrap();
    assert_eq!(
        seen[0],
        Some(SocketAddrV4::new(b.ip, LOCAL_PORT)),
        "b does not reach a directly on the LAN"
    );
    assert!(b.wait_ping(a.ip, Duration::from_secs(5)));
    // The router answers on both sides; the hosts' default route is the router.
    assert!(a.ping(router.lan_ip));
    assert!(a.ping(router.wan_ip));
    assert!(ip(["-n", &a.ns, "route", "show", "default"])
        .unwrap()
        .contains("via 198.51.100.1"));
    assert!(router.ruleset().contains("map eim_in"));

    // A daemon still running is killed with the lab, and no namespace is left.
    let mut sleeper = nat.spawn(&a, "sleeper", "sleep", ["300"]).unwrap();
    let names = nat.namespaces();
    assert!(names.len() >= 5, "{names:?}");
    drop(nat);
    assert_gone(&names);
    assert!(
        sleeper.wait_exit(Duration::from_secs(2)).is_some(),
        "the process in a deleted namespace still runs"
    );
}

#[test]
fn a_failing_test_cleans_up_too() {
    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut nat = NatLab::new("panics").unwrap();
        let router = nat.add_router("r", NatKind::Symmetric).unwrap();
        let h = nat.add_host_behind(&router, "h").unwrap();
        let _p = nat.spawn(&h, "sleeper", "sleep", ["300"]).unwrap();
        names = nat.namespaces();
        panic!("deliberate failure");
    }));
    assert!(result.is_err());
    assert!(!names.is_empty());
    assert_gone(&names);
}

/// The recipe for mesh tests on the NAT lab: the controller on the controller host, agents on
/// the internet and behind NATs all join (their control connection goes out through the NATs).
/// Needs the product binaries (`cargo build --bins`). Paths between the agents are the NAT
/// traversal feature's to test, not this one's.
#[test]
fn agents_behind_nats_join_the_controller() {
    let mut nat = NatLab::new("agents").unwrap();
    let ctl_host = nat.controller_host();
    let public = nat.add_public_host("pub").unwrap();
    let home = nat.add_router("home", NatKind::PortRestricted).unwrap();
    let a_host = nat.add_host_behind(&home, "a").unwrap();
    let (_cgnat, inner) = nat.add_double_nat("dn").unwrap();
    let b_host = nat.add_host_behind(&inner, "b").unwrap();

    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    assert_eq!(ctl.listen, SocketAddrV4::new(CONTROLLER_IP, CONTROL_PORT));
    ctl.create_network("nat").unwrap();
    let token = ctl.create_token("nat", &["--reusable"]).unwrap();
    let agents: Vec<Agent> = [&public, &a_host, &b_host]
        .iter()
        .map(|h| Agent::join(nat.lab(), h, &h.name, &token).unwrap())
        .collect();
    let nodes = ctl.nodes("nat").unwrap();
    assert_eq!(nodes.len(), 3, "{nodes:#?}");
    for a in &agents {
        assert_eq!(
            a.address.octets()[..2],
            [100, 64],
            "{}: {}",
            a.name,
            a.address
        );
    }
}

/// The UDP port of the IPv6 firewall check (and the next one).
const V6_PORT: u16 = 40600;

#[test]
fn ipv6_sites_are_routed_without_nat_behind_stateful_firewalls_that_a_punch_opens() {
    let mut nat = NatLab::new("v6-firewall").unwrap();
    let ctl6 = nat.controller_ipv6().unwrap();
    let ctl = nat.controller_host();
    let r1 = nat
        .add_dual_stack_router("site1", NatKind::Symmetric)
        .unwrap();
    let r2 = nat
        .add_dual_stack_router("site2", NatKind::PortRestricted)
        .unwrap();
    let h1 = nat
        .add_host_behind_with(&r1, "h1", Stack::DualStack)
        .unwrap();
    let h2 = nat
        .add_host_behind_with(&r2, "h2", Stack::DualStack)
        .unwrap();
    let only6 = nat
        .add_host_behind_with(&r2, "only6", Stack::V6Only)
        .unwrap();
    let stranger = nat
        .add_public_host_with("stranger", Stack::DualStack)
        .unwrap();
    let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    assert_eq!(ctl6, v6("2001:db8::1"));
    assert_eq!(r1.ip6.unwrap().site, v6("2001:db8:1:1::"));
    assert_eq!(r2.ip6.unwrap().wan, v6("2001:db8::101"));
    assert_eq!(h1.ip6, Some(v6("2001:db8:1:1::10")));
    assert_eq!(h2.ip6, Some(v6("2001:db8:1:2::10")));
    assert_eq!(only6.ip6, Some(v6("2001:db8:1:2::11")));
    assert_eq!(stranger.ip6, Some(v6("2001:db8::10")));
    assert_eq!(h1.ip, Ipv4Addr::new(198, 51, 100, 10));

    // The IPv6-only host has no IPv4 but loopback, and no IPv4 route; IPv6 gets out.
    let v4 = only6.run("ip", ["-4", "-o", "addr", "show"]).ok().unwrap();
    assert!(
        v4.stdout.lines().all(|l| l.contains(" lo ")),
        "IPv4 on an IPv6-only host: {v4}"
    );
    let routes = only6.run("ip", ["-4", "route", "show"]).ok().unwrap();
    assert!(routes.stdout.trim().is_empty(), "{routes}");
    assert!(
        only6.ping6(ctl6),
        "the IPv6-only host cannot ping the controller"
    );
    assert!(
        !only6.ping(CONTROLLER_IP),
        "an IPv6-only host pinged over IPv4"
    );

    // Out through the firewall with the host's own address: no NAT for IPv6.
    let at_ctl = stun().listen6(&nat, &ctl, V6_PORT, 10, &[]).unwrap();
    let h1_addr = SocketAddr::new(h1.ip6.unwrap().into(), V6_PORT);
    stun()
        .send_any(&h1, V6_PORT, SocketAddr::new(ctl6.into(), V6_PORT))
        .unwrap();
    assert!(
        at_ctl.wait_from_any(h1_addr, ARRIVAL),
        "the controller did not see h1 at {h1_addr}: {:?}\n{}",
        at_ctl.sources_any(),
        nat.rulesets()
    );

    // Unsolicited datagrams from another site or from the internet are dropped.
    let port = V6_PORT + 1;
    let quiet = stun().listen6(&nat, &h1, port, 10, &[]).unwrap();
    let h1_quiet = SocketAddr::new(h1.ip6.unwrap().into(), port);
    stun().send_any(&h2, port, h1_quiet).unwrap();
    stun().send_any(&stranger, port, h1_quiet).unwrap();
    assert!(
        !quiet.wait_from_any(SocketAddr::new(h2.ip6.unwrap().into(), port), ARRIVAL),
        "an unsolicited datagram crossed the IPv6 firewall: {:?}\n{}",
        quiet.sources_any(),
        nat.rulesets()
    );
    assert_eq!(quiet.sources_any(), vec![], "unsolicited datagrams got in");

    // A punch: h1 sends first (dropped at site2, but it opens site1), then h2 (opens site2 and
    // gets through to h1), then h1 again gets through to h2.
    let h2_addr = SocketAddr::new(h2.ip6.unwrap().into(), V6_PORT);
    let mut first = stun().listen6(&nat, &h1, V6_PORT, 3, &[h2_addr]).unwrap();
    let second = stun().listen6(&nat, &h2, V6_PORT, 10, &[h1_addr]).unwrap();
    assert!(
        first.wait_from_any(h2_addr, ARRIVAL),
        "h2's punch did not reach h1 although h1 had sent to it: {:?}\n{}",
        first.sources_any(),
        nat.rulesets()
    );
    first.proc().wait_exit(Duration::from_secs(10));
    stun().send_any(&h1, V6_PORT, h2_addr).unwrap();
    assert!(
        second.wait_from_any(h1_addr, ARRIVAL),
        "h1 did not reach h2 after both had sent: {:?}\n{}",
        second.sources_any(),
        nat.rulesets()
    );

    // A privacy address beside the stable one, in the same /64.
    let tmp = nat.add_temporary_address(&h1).unwrap();
    assert_ne!(Some(tmp), h1.ip6);
    assert_eq!(tmp.segments()[..4], h1.ip6.unwrap().segments()[..4]);
    let shown = h1
        .run("ip", ["-6", "-o", "addr", "show", "dev", "eth0"])
        .ok()
        .unwrap();
    assert!(
        shown
            .stdout
            .lines()
            .any(|l| l.contains(&format!(" {tmp}/64 ")) && l.contains("temporary")),
        "{shown}"
    );
}

/// Round trip of one ping from `host` to `to` in ms (`None`: no answer).
fn rtt_ms(host: &Host, to: &str) -> Option<f64> {
    let out = host.run("ping", ["-n", "-c", "1", "-W", "2", to]);
    out.stdout
        .split("time=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn the_ipv6_delay_box_slows_ipv6_between_its_hosts_and_nothing_else() {
    let mut nat = NatLab::new("v6-delay").unwrap();
    let p = nat.add_public_host_with("p", Stack::DualStack).unwrap();
    let q = nat.add_public_host_with("q", Stack::DualStack).unwrap();
    let ctl6 = nat.controller_ipv6().unwrap();
    let q6 = q.ip6.unwrap().to_string();
    let fast = rtt_ms(&p, &q6).unwrap();
    let mut delay = nat
        .delay_ipv6(
            std::path::Path::new(env!("CARGO_BIN_EXE_mesh-e2e-tundelay")),
            &[&p, &q],
            40,
        )
        .unwrap();
    let slow = rtt_ms(&p, &q6);
    let v4 = rtt_ms(&p, &q.ip.to_string());
    let other = rtt_ms(&p, &ctl6.to_string());
    eprintln!(
        "ping p -> q: IPv6 {fast} ms, delayed {slow:?} ms; IPv4 {v4:?} ms; p -> ctl {other:?} ms"
    );
    // 40 ms each way, and the box is the only thing that delays.
    assert!(
        slow.is_some_and(|ms| (80.0..200.0).contains(&ms)),
        "{slow:?}"
    );
    assert!(v4.is_some_and(|ms| ms < 40.0), "IPv4 was delayed: {v4:?}");
    assert!(
        other.is_some_and(|ms| ms < 40.0),
        "other IPv6 was delayed: {other:?}"
    );
    delay.remove().unwrap();
    let again = rtt_ms(&p, &q6);
    assert!(
        again.is_some_and(|ms| ms < 40.0),
        "still delayed: {again:?}"
    );
}
