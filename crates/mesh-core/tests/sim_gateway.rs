#![allow(clippy::unwrap_used)]
//! Plain Linux gateways on the simulated network: `masquerade` without an input filter, modelled
//! by `simnet`'s conntrack (see `simnet::Conntrack`), with a core router between the sites.
//!
//! Such a gateway accepts unsolicited UDP to its own address and confirms a conntrack entry for
//! it; the inside host's later flow to that remote then leaves from another port, and the
//! remote's datagrams keep landing on the gateway. Whichever side's probe arrives first poisons
//! the pair, so probing every candidate at once, as works through home routers, never goes
//! direct here. The tests below pin the model itself, then what the node must achieve.

mod simnet;

use mesh_core::BirthdayConfig;
use mesh_proto::control::NatKind;
use simnet::{pairs_among, Behaviour, NatConfig, Net, Sim, INTERNET};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The model does what `conntrack -L` showed on real gateways: an early probe from outside
/// confirms an entry on the gateway, the inside flow to that remote moves to another port, and
/// the remote's datagrams to the old port still land on the gateway. A primer with TTL 2 opens
/// the gateway's entry and dies at the core router.
#[test]
fn the_model_poisons_a_flow_whose_first_datagram_came_from_outside() {
    let now = Instant::now();
    let mut net = Net::new(1, 0.0);
    net.core_hops = 1;
    let lan = net.add_nat(INTERNET, NatConfig::linux_gateway());
    let inside = net.add_host(lan);
    let remote = net.add_host(INTERNET);
    let gateway = net.nat_public(lan).unwrap();
    let port = net.addr(inside).port();
    let mapped = SocketAddr::from((gateway, port));
    let remote_addr = net.addr(remote);

    // The remote's probe arrives first: the gateway takes it and holds the tuple.
    net.send(remote, mapped, b"probe".to_vec(), now);
    assert!(net.pop_arrival(now + Duration::from_secs(1)).is_none());
    assert_eq!(net.stats.poisoned, 1);
    // The inside host's flow to the remote cannot have its own port any more.
    let seen = net.observe(inside, remote_addr, now).unwrap();
    assert_eq!(seen.ip(), std::net::IpAddr::V4(gateway));
    assert_ne!(
        seen.port(),
        port,
        "the port stays only while the tuple is unique"
    );
    // And the remote's next probe to the port it knows lands on the gateway again.
    net.send(remote, mapped, b"again".to_vec(), now);
    assert!(net.pop_arrival(now + Duration::from_secs(2)).is_none());
    assert_eq!(net.stats.accepted_locally, 2);
    // 30 s without traffic and the unreplied entry is gone.
    let later = now + Duration::from_secs(31);
    let other = net.add_host(lan);
    let seen = net.observe(other, remote_addr, later).unwrap();
    assert_eq!(seen.port(), net.addr(other).port());

    // A fresh pair: the inside host primes with TTL 2 first. The primer passes the gateway
    // (which keeps the port: the tuple is unique) and dies at the core router.
    let mut net = Net::new(2, 0.0);
    net.core_hops = 1;
    let lan = net.add_nat(INTERNET, NatConfig::linux_gateway());
    let inside = net.add_host(lan);
    let remote = net.add_host(INTERNET);
    let remote_addr = net.addr(remote);
    net.send_with_ttl(inside, remote_addr, b"primer".to_vec(), 2, now);
    assert!(net.pop_arrival(now + Duration::from_secs(1)).is_none());
    assert_eq!(net.stats.ttl_expired, 1);
    // The remote's probe now answers the gateway's entry and reaches the inside host.
    let mapped = SocketAddr::from((net.nat_public(lan).unwrap(), net.addr(inside).port()));
    net.send(remote, mapped, b"probe".to_vec(), now);
    let got = net.pop_arrival(now + Duration::from_secs(1)).unwrap();
    assert_eq!(got.to, net.addr(inside));
    assert_eq!(net.stats.poisoned, 0);
}

/// Two nodes of the given kinds on their own sites, a relay, `core_hops` routers between the
/// sites, and the NAT kinds the controller's observer would report, connected.
fn pair(seed: u64, kinds: [(Behaviour, NatKind); 2], core_hops: u8) -> (Sim, usize, usize) {
    let mut sim = Sim::empty(seed, 0.0);
    sim.net.core_hops = core_hops;
    sim.add_relay();
    let a = sim.add_node_behind(kinds[0].0);
    let b = sim.add_node_behind(kinds[1].0);
    for i in [a, b] {
        sim.nodes[i]
            .node
            .set_birthday(Some(BirthdayConfig::default()));
    }
    // The controller's pushes do not arrive at one instant: the second node learns of the
    // first 0..80 ms later.
    let skew = Duration::from_millis(seed * 37 % 80);
    let mut peers = sim.peer_configs();
    for (i, (_, nat)) in [a, b].into_iter().zip(kinds) {
        sim.nodes[i].node.set_nat(Some(nat));
        peers[i].nat = Some(nat);
    }
    let now = sim.now;
    sim.nodes[a].node.set_peers(&peers, now);
    sim.flush(a);
    sim.run_for(skew);
    let now = sim.now;
    sim.nodes[b].node.set_peers(&peers, now);
    sim.flush(b);
    (sim, a, b)
}

const GATEWAY: (Behaviour, NatKind) = (Behaviour::LinuxGateway, NatKind::EndpointIndependent);

/// The case: two sites behind plain Linux gateways with a core router between them go
/// direct on every seed, within 10 s of the first ping, with no birthday punching (both mappings
/// are endpoint-independent), and every ping is answered.
#[test]
fn two_linux_gateways_with_a_core_router_go_direct() {
    let mut took = Vec::new();
    let mut failed = Vec::new();
    for seed in 1..=10 {
        let (mut sim, a, b) = pair(seed, [GATEWAY, GATEWAY], 1);
        sim.ping(a, b, 1);
        let Some(t) = sim.time_to_direct(a, b, Duration::from_secs(10)) else {
            failed.push((seed, sim.net.stats.poisoned));
            continue;
        };
        sim.clear_replies();
        assert!(pairs_among(&mut sim, &[a, b], 3).is_empty(), "seed {seed}");
        for i in [a, b] {
            let s = sim.nodes[i].node.status(sim.now).birthday;
            assert_eq!(s.birthday_sockets_opened, 0, "seed {seed}");
        }
        took.push(t);
    }
    took.sort();
    eprintln!("time to direct: {took:?}");
    assert!(
        failed.is_empty(),
        "no direct path within 10 s for (seed, datagrams that poisoned a gateway): {failed:?}"
    );
}

/// A plain gateway meets every other kind of site it can meet: a public node, a full cone, a
/// port-restricted cone, and a node that has not learned its NAT kind (no observer).
#[test]
fn a_linux_gateway_goes_direct_to_public_and_cone_sites() {
    for (seed, other) in [
        (21, (Behaviour::Public, NatKind::Public)),
        (22, (Behaviour::FullCone, NatKind::EndpointIndependent)),
        (
            23,
            (Behaviour::PortRestricted, NatKind::EndpointIndependent),
        ),
    ] {
        let (mut sim, a, b) = pair(seed, [GATEWAY, other], 1);
        sim.ping(a, b, 1);
        assert!(
            sim.time_to_direct(a, b, Duration::from_secs(10)).is_some(),
            "{:?}",
            other.0
        );
    }
}
