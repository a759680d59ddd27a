//! Port mapping (issue 12, item 5). A node behind a symmetric NAT whose router runs miniupnpd
//! (UPnP IGD, NAT-PMP and PCP, as most home routers) gets its UDP port mapped, announces the
//! mapped address to its peers, and goes direct to a node behind every other kind of router,
//! another symmetric one included; when it stops, the mapping is gone from the router, and it
//! comes back with the node. Nodes whose routers map nothing work as before and say so, and a
//! node started with `--no-port-mapping` asks nothing.
#![allow(clippy::unwrap_used)]

use mesh_e2e::natlab::{Mapping, NatKind, NatLab, Speaks, Stun};
use mesh_e2e::{netns::Host, wait_for, wait_until, Agent, Controller, AGENT_PORT};
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

const NET: &str = "portmap";
/// How long the port mapping may take once the agent is up (PCP answers in milliseconds), and
/// how long a node whose router maps nothing may take to say so.
const MAPPED_WITHIN: Duration = Duration::from_secs(10);
/// How long every pair may take to go direct. (Without the mapping, the port-restricted pair
/// needs birthday punching, which starts after two unanswered rounds, about 6 s, and the
/// symmetric pair never goes direct.)
const DIRECT_WITHIN: Duration = Duration::from_secs(30);

/// The port mapping object of an agent's `mesh status --json` once it is no longer
/// `searching`.
fn port_mapping(agent: &Agent) -> serde_json::Value {
    wait_for(MAPPED_WITHIN, || {
        let s = agent.status().ok()?;
        (s["port_mapping"]["state"] != "searching").then(|| s["port_mapping"].clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "{}'s port mapping is still searching: {:#}",
            agent.name,
            agent.status().unwrap()["port_mapping"]
        )
    })
}

#[test]
fn a_node_behind_a_symmetric_nat_that_maps_ports_goes_direct_to_every_kind() {
    let stun = Stun::new(env!("CARGO_BIN_EXE_mesh-e2e-stun"));
    let mut nat = NatLab::new("portmap").unwrap();
    let ctl_host = nat.controller_host();
    let (home, mut mapper) = nat
        .add_port_mapping_router("home", NatKind::Symmetric, &stun)
        .unwrap();
    let a_host = nat.add_host_behind(&home, "a").unwrap();
    let off_host = nat.add_host_behind(&home, "off").unwrap();
    let mut others: Vec<(&str, Host)> = vec![("public", nat.add_public_host("public").unwrap())];
    for (name, kind) in [
        ("cone", NatKind::FullCone),
        ("port", NatKind::PortRestricted),
        ("sym", NatKind::Symmetric),
        ("masq", NatKind::Masquerade),
    ] {
        let r = nat.add_router(&format!("r{name}"), kind).unwrap();
        others.push((name, nat.add_host_behind(&r, name).unwrap()));
    }
    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let agents: Vec<Agent> = others
        .iter()
        .map(|(n, h)| Agent::join(nat.lab(), h, n, &token).unwrap())
        .collect();

    // A comes last, while the others run: they learn its mapped address from the heartbeat
    // that follows the mapping (its Hello went out before the router answered).
    let start = Instant::now();
    let mut a = Agent::join(nat.lab(), &a_host, "a", &token).unwrap();
    let a_up = start.elapsed();
    let pm = port_mapping(&a);
    let mapped_at = start.elapsed();
    let external = SocketAddrV4::new(home.wan_ip, AGENT_PORT);
    assert_eq!(pm["state"], "mapped", "{pm:#}\n{}", mapper.log());
    assert_eq!(pm["protocol"], "pcp", "{pm:#}");
    assert_eq!(pm["external"], external.to_string(), "{pm:#}");
    assert_eq!(pm["gateway"], home.lan_ip.to_string(), "{pm:#}");
    assert!(pm["lease_secs"].as_u64().unwrap() >= 3600, "{pm:#}");
    assert!(pm["expires_at"].as_str().is_some(), "{pm:#}");
    let a_mapping = Mapping {
        protocol: "udp".into(),
        external_port: AGENT_PORT,
        internal: a.underlay(),
    };
    assert!(
        mapper.mappings().unwrap().contains(&a_mapping),
        "miniupnpd holds no mapping for a: {:?}\n{}",
        mapper.mappings(),
        home.ruleset()
    );
    let human = a.cli(["status"]).ok().unwrap().stdout;
    assert!(
        human.contains(&format!(
            "portmap   pcp {external} at gateway {}",
            home.lan_ip
        )),
        "{human}"
    );

    // A and each other node: direct both ways (pings keep traffic flowing meanwhile).
    let direct = |x: &Agent, peer: &str| x.peer(peer).is_ok_and(|p| p["path"] == "direct");
    let mut direct_at: Vec<Option<Duration>> = vec![None; agents.len()];
    wait_until(DIRECT_WITHIN, || {
        for (i, b) in agents.iter().enumerate() {
            if direct_at[i].is_none() {
                let _ = a_host.ping(b.address);
                if direct(&a, &b.name) && direct(b, "a") {
                    direct_at[i] = Some(start.elapsed());
                }
            }
        }
        direct_at.iter().all(Option::is_some)
    });
    let endpoint = |x: &Agent, peer: &str| {
        x.peer(peer)
            .ok()
            .and_then(|p| p["endpoint"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "-".into())
    };
    let mut report = format!(
        "\na up {:.1} s after its start, mapped ({}) after {:.1} s",
        a_up.as_secs_f64(),
        pm["protocol"],
        mapped_at.as_secs_f64(),
    );
    for (b, at) in agents.iter().zip(&direct_at) {
        report += &format!(
            "\na <-> {:<7} {:<22} a -> {}, {} -> {}",
            b.name,
            at.map_or("not direct".to_owned(), |d| format!(
                "direct after {:.1} s",
                d.as_secs_f64()
            )),
            endpoint(&a, &b.name),
            b.name,
            endpoint(b, "a"),
        );
    }
    eprintln!("{report}");
    let missing: Vec<String> = agents
        .iter()
        .zip(&direct_at)
        .filter(|(_, at)| at.is_none())
        .map(|(b, _)| {
            format!(
                "{}: a sees {:#}, {} sees {:#}",
                b.name,
                a.peer(&b.name).unwrap(),
                b.name,
                b.peer("a").unwrap()
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "not direct within {DIRECT_WITHIN:?}:{report}\n{}",
        missing.join("\n")
    );

    // Every peer was told the mapped address. The others' routers map nothing, which changes
    // nothing for them, and their status says so.
    for b in &agents {
        let seen = b.peer("a").unwrap();
        assert!(
            seen["candidates"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == &external.to_string()),
            "{} does not list a's mapped address {external}: {seen:#}",
            b.name
        );
        let pm = port_mapping(b);
        assert_eq!(pm["state"], "unavailable", "{}: {pm:#}", b.name);
        assert_eq!(pm["protocol"], "none", "{}: {pm:#}", b.name);
        assert!(pm["external"].is_null(), "{}: {pm:#}", b.name);
        let human = b.cli(["status"]).ok().unwrap().stdout;
        assert!(human.contains("portmap   none (unavailable"), "{human}");
    }

    // Off: a node behind the same router, joined with --no-port-mapping, asks nothing (the
    // flag is saved and carried into the daemon that `mesh join` becomes).
    let off =
        Agent::join_with(nat.lab(), &off_host, "off", &token, &["--no-port-mapping"]).unwrap();
    let pm = off.status().unwrap()["port_mapping"].clone();
    assert_eq!(
        (pm["state"].as_str(), pm["protocol"].as_str()),
        (Some("off"), Some("none")),
        "{pm:#}"
    );
    assert!(off_host.wait_ping(a.address, Duration::from_secs(10)));
    assert!(
        !mapper
            .mappings()
            .unwrap()
            .iter()
            .any(|m| m.internal.ip() == &off_host.ip),
        "{:?}",
        mapper.mappings()
    );

    // A stops (SIGTERM): it removes its mapping from the router on the way out.
    a.stop();
    let gone = |mapper: &mesh_e2e::natlab::PortMapper| {
        mapper
            .mappings()
            .is_ok_and(|m| !m.iter().any(|m| m.internal == a_mapping.internal))
    };
    assert!(
        wait_until(Duration::from_secs(5), || gone(&mapper)),
        "a's mapping is still there after it stopped: {:?}\n{}\n{}",
        mapper.mappings(),
        a.log(),
        mapper.log()
    );
    assert!(a.stderr().contains("port mapping removed"), "{}", a.log());

    // And maps the port again when it comes back, and removes it when it leaves the network.
    a.up().unwrap();
    assert_eq!(port_mapping(&a)["external"], external.to_string());
    assert!(mapper.mappings().unwrap().contains(&a_mapping));
    for b in &agents {
        assert!(
            a_host.wait_ping(b.address, Duration::from_secs(10)),
            "a -> {}",
            b.name
        );
    }
    a.cli(["leave"]).ok().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || gone(&mapper)),
        "a's mapping is still there after `mesh leave`: {:?}\n{}",
        mapper.mappings(),
        a.log()
    );
}

/// A router that speaks UPnP IGD only (no PCP, no NAT-PMP): the agent finds it by SSDP, maps
/// its port with AddPortMapping and reaches a node behind another symmetric NAT directly;
/// DeletePortMapping removes it when the agent stops.
#[test]
fn a_router_that_speaks_only_upnp_maps_the_port_too() {
    let stun = Stun::new(env!("CARGO_BIN_EXE_mesh-e2e-stun"));
    let mut nat = NatLab::new("portmap-upnp").unwrap();
    let ctl_host = nat.controller_host();
    let (home, mut mapper) = nat
        .add_port_mapping_router_with("home", NatKind::Symmetric, &stun, Speaks::Upnp)
        .unwrap();
    let u_host = nat.add_host_behind(&home, "u").unwrap();
    let other = nat.add_router("rsym", NatKind::Symmetric).unwrap();
    let s_host = nat.add_host_behind(&other, "s").unwrap();
    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let s = Agent::join(nat.lab(), &s_host, "s", &token).unwrap();
    let start = Instant::now();
    let mut u = Agent::join(nat.lab(), &u_host, "u", &token).unwrap();
    let pm = port_mapping(&u);
    let mapped_at = start.elapsed();
    let external = SocketAddrV4::new(home.wan_ip, AGENT_PORT);
    assert_eq!(
        (pm["state"].as_str(), pm["protocol"].as_str()),
        (Some("mapped"), Some("upnp")),
        "{pm:#}\n{}",
        mapper.log()
    );
    assert_eq!(pm["external"], external.to_string(), "{pm:#}");
    let u_mapping = Mapping {
        protocol: "udp".into(),
        external_port: AGENT_PORT,
        internal: u.underlay(),
    };
    assert!(
        mapper.mappings().unwrap().contains(&u_mapping),
        "{:?}",
        mapper.mappings()
    );
    let direct = |x: &Agent, peer: &str| x.peer(peer).is_ok_and(|p| p["path"] == "direct");
    let both = wait_until(DIRECT_WITHIN, || {
        let _ = u_host.ping(s.address);
        direct(&u, "s") && direct(&s, "u")
    });
    eprintln!(
        "upnp: u up and mapped after {:.1} s; u <-> s (symmetric) {} after {:.1} s",
        mapped_at.as_secs_f64(),
        if both { "direct" } else { "not direct" },
        start.elapsed().as_secs_f64(),
    );
    assert!(
        both,
        "u sees {:#}\ns sees {:#}",
        u.peer("s").unwrap(),
        s.peer("u").unwrap()
    );
    u.stop();
    assert!(
        wait_until(Duration::from_secs(5), || mapper
            .mappings()
            .is_ok_and(|m| !m.contains(&u_mapping))),
        "u's UPnP mapping outlived it: {:?}\n{}\n{}",
        mapper.mappings(),
        u.log(),
        mapper.log()
    );
}

/// A lease is renewed before it runs out: a router that grants only 130 s (miniupnpd's
/// shortest lease is 120 s, and its longest must be longer) sees the node ask again at half of
/// it, the lease's end moves on, and the router still holds the mapping.
#[test]
fn a_short_lease_is_renewed_before_it_ends() {
    let stun = Stun::new(env!("CARGO_BIN_EXE_mesh-e2e-stun"));
    let mut nat = NatLab::new("renew").unwrap();
    let ctl_host = nat.controller_host();
    let (home, mut mapper) = nat
        .add_port_mapping_router_with_lease(
            "home",
            NatKind::Symmetric,
            &stun,
            Duration::from_secs(130),
        )
        .unwrap();
    let a_host = nat.add_host_behind(&home, "a").unwrap();
    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(nat.lab(), &a_host, "a", &token).unwrap();
    let first = port_mapping(&a);
    assert_eq!(first["state"], "mapped", "{first:#}\n{}", mapper.log());
    assert_eq!(first["lease_secs"], 130, "{first:#}");
    assert_eq!(first["renewals"], 0, "{first:#}");
    // Renewed at half the lease (65 s), well before the router would drop it.
    let renewed = wait_for(Duration::from_secs(80), || {
        let pm = a.status().ok()?["port_mapping"].clone();
        (pm["renewals"].as_u64() >= Some(1)).then_some(pm)
    })
    .unwrap_or_else(|| {
        panic!(
            "no renewal within 80 s: {:#}\n{}",
            a.status().unwrap()["port_mapping"],
            mapper.log()
        )
    });
    assert_eq!(renewed["state"], "mapped", "{renewed:#}");
    assert_eq!(renewed["external"], first["external"], "{renewed:#}");
    assert!(
        renewed["expires_at"].as_str() > first["expires_at"].as_str(),
        "the lease's end moved on: {first:#} then {renewed:#}"
    );
    let held = Mapping {
        protocol: "udp".into(),
        external_port: AGENT_PORT,
        internal: a.underlay(),
    };
    assert!(
        mapper.mappings().unwrap().contains(&held),
        "{:?}",
        mapper.mappings()
    );
}
