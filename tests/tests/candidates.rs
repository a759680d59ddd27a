//! Endpoint candidates that can work (issue 12, item 2): a node offers its peers only addresses
//! on interfaces that can carry a path to it, and `--endpoint-interfaces` narrows that further.
//!
//! The node `k8s` sits behind a port-restricted NAT with its peer `peer` on the same LAN, so the
//! controller passes `peer` every address `k8s` reports (not only the public mapping). `k8s`
//! looks like a Kubernetes node in kube-proxy's IPVS mode next to Docker: the dummy interface
//! `kube-ipvs0` holds 60 ClusterIPs of 10.96.0.0/12 and the bridge `docker0` holds
//! 172.17.0.1/16, addresses that every node of a cluster holds as well. Before the fix `k8s`
//! announced 14 ClusterIPs after its LAN address. It also has a second uplink `eth1` (a veth, as
//! its `eth0` is), which the defaults keep and `--endpoint-interfaces '!eth1'` removes.
//!
//! A node behind a symmetric NAT with more local addresses than a report has places still
//! reports the mapping a standalone relay observes: local addresses get only the places the
//! mappings leave. And a VM host whose uplink is a bridge (`br0`, with `eth0` as its port)
//! offers that bridge's address, while libvirt's `virbr0` stays out.
#![allow(clippy::unwrap_used)]

use mesh_e2e::daemons::udp_port_bound;
use mesh_e2e::natlab::{NatKind, NatLab};
use mesh_e2e::netns::ip;
use mesh_e2e::{assert_clean_failure, controller_bin, wait_until, Proc};
use mesh_e2e::{wait_all_pairs_ping, wait_for, Agent, Controller, Host, AGENT_PORT};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

const NET: &str = "candidates";
/// How many ClusterIPs `kube-ipvs0` holds.
const CLUSTER_IPS: usize = 60;
/// Docker's default bridge address.
const DOCKER0: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);
/// The address of `k8s`'s second uplink `eth1`.
const ETH1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
/// How long candidates and paths may take to settle (a heartbeat is 10 s).
const SETTLE: Duration = Duration::from_secs(30);

/// `CLUSTER_IPS` distinct addresses spread over 10.96.0.0/12, 10.96.0.1 (the API server's
/// service) and 10.96.0.10 (kube-dns) first.
fn cluster_ips() -> Vec<Ipv4Addr> {
    let mut ips = vec![Ipv4Addr::new(10, 96, 0, 1), Ipv4Addr::new(10, 96, 0, 10)];
    let mut i: u32 = 0;
    while ips.len() < CLUSTER_IPS {
        i += 1;
        let ip = Ipv4Addr::new(
            10,
            96 + (i % 16) as u8,
            (i * 37 % 256) as u8,
            (i * 11 % 254 + 1) as u8,
        );
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

fn in_cluster_range(ip: Ipv4Addr) -> bool {
    ip.octets()[0] == 10 && (96..112).contains(&ip.octets()[1])
}

fn in_docker_range(ip: Ipv4Addr) -> bool {
    ip.octets()[..2] == [172, 17]
}

/// Makes `host` look like a Kubernetes node with Docker: `kube-ipvs0` (dummy, down, as
/// kube-proxy leaves it) with the ClusterIPs as /32, and `docker0` (bridge) with 172.17.0.1/16.
/// Returns what `mesh status` should give as the reason for skipping `kube-ipvs0`: its kind,
/// or, on a kernel without the dummy driver (some VMs' kernels lack it), where `kube-ipvs0`
/// has to be a veth, the name rule `kube-*`.
fn make_kubernetes_node(host: &Host) -> &'static str {
    let ns = host.ns.as_str();
    let reason = match ip(["-n", ns, "link", "add", "kube-ipvs0", "type", "dummy"]) {
        Ok(_) => "dummy",
        Err(e) if e.to_string().contains("Unknown device type") => {
            eprintln!(
                "this kernel has no dummy driver: kube-ipvs0 is a veth here, so the name rule \
                 kube-* (not the kind rule) must keep its addresses out"
            );
            ip([
                "-n",
                ns,
                "link",
                "add",
                "kube-ipvs0",
                "type",
                "veth",
                "peer",
                "name",
                "kube-ipvs0-end",
            ])
            .unwrap();
            "kube-*"
        }
        Err(e) => panic!("cannot create kube-ipvs0: {e:#}"),
    };
    for a in cluster_ips() {
        ip([
            "-n",
            ns,
            "addr",
            "add",
            &format!("{a}/32"),
            "dev",
            "kube-ipvs0",
        ])
        .unwrap();
    }
    ip(["-n", ns, "link", "add", "docker0", "type", "bridge"]).unwrap();
    ip([
        "-n",
        ns,
        "addr",
        "add",
        &format!("{DOCKER0}/16"),
        "dev",
        "docker0",
    ])
    .unwrap();
    ip(["-n", ns, "link", "set", "docker0", "up"]).unwrap();
    reason
}

/// Gives `host` a second uplink `eth1`: a veth (whose other end stays in the same namespace)
/// with `ETH1`/24, up.
fn add_second_uplink(host: &Host) {
    let ns = host.ns.as_str();
    ip([
        "-n", ns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-end",
    ])
    .unwrap();
    ip([
        "-n",
        ns,
        "addr",
        "add",
        &format!("{ETH1}/24"),
        "dev",
        "eth1",
    ])
    .unwrap();
    ip(["-n", ns, "link", "set", "eth1-end", "up"]).unwrap();
    ip(["-n", ns, "link", "set", "eth1", "up"]).unwrap();
}

/// What `viewer`'s `mesh status --json` says about peer `name`: path and candidates.
fn view_of(viewer: &Agent, name: &str) -> (String, Vec<SocketAddrV4>) {
    let p = viewer.peer(name).unwrap();
    let candidates = p["candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str()?.parse().ok())
        .collect();
    (p["path"].as_str().unwrap_or("-").to_owned(), candidates)
}

/// Candidates that are the addresses of `kube-ipvs0` or `docker0`.
fn unusable(candidates: &[SocketAddrV4]) -> Vec<SocketAddrV4> {
    candidates
        .iter()
        .filter(|c| in_cluster_range(*c.ip()) || in_docker_range(*c.ip()))
        .copied()
        .collect()
}

/// Waits until `peer` reaches `node` directly and its candidates for `node` hold every one of
/// `present` and none of `absent`; returns them. Panics with the last view otherwise.
fn wait_candidates(
    peer: &Agent,
    node: &str,
    present: &[SocketAddrV4],
    absent: &[SocketAddrV4],
) -> Vec<SocketAddrV4> {
    let mut last = (String::new(), Vec::new());
    let settled = wait_for(SETTLE, || {
        last = view_of(peer, node);
        let (path, c) = &last;
        (path == "direct"
            && present.iter().all(|p| c.contains(p))
            && !absent.iter().any(|a| c.contains(a)))
        .then(|| c.clone())
    });
    settled.unwrap_or_else(|| {
        panic!(
            "{}'s view of {node} did not settle within {SETTLE:?} on a direct path with \
             candidates including {present:?} and not {absent:?}: path {}, candidates {:?}",
            peer.name, last.0, last.1
        )
    })
}

/// The interfaces `agent`'s `mesh status --json` lists as not offered, with their reasons.
fn skipped_interfaces(agent: &Agent) -> Vec<(String, String)> {
    let status = agent.status().unwrap();
    status["endpoint_interfaces"]["skipped"]
        .as_array()
        .unwrap_or_else(|| panic!("no endpoint_interfaces.skipped in {status:#}"))
        .iter()
        .map(|s: &Value| {
            (
                s["interface"].as_str().unwrap_or_default().to_owned(),
                s["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_kubernetes_node_offers_only_addresses_that_reach_it() {
    let mut nat = NatLab::new("candidates").unwrap();
    let ctl = Controller::start(nat.lab(), &nat.controller_host()).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let home = nat.add_router("home", NatKind::PortRestricted).unwrap();
    let k8s_host = nat.add_host_behind(&home, "k8s").unwrap();
    let peer_host = nat.add_host_behind(&home, "peer").unwrap();
    let ipvs_reason = make_kubernetes_node(&k8s_host);
    add_second_uplink(&k8s_host);
    assert_eq!(
        cluster_ips().into_iter().collect::<BTreeSet<_>>().len(),
        CLUSTER_IPS
    );

    let mut k8s = Agent::join(nat.lab(), &k8s_host, "k8s", &token).unwrap();
    let peer = Agent::join(nat.lab(), &peer_host, "peer", &token).unwrap();
    let lan = SocketAddrV4::new(k8s_host.ip, AGENT_PORT);
    let eth1 = SocketAddrV4::new(ETH1, AGENT_PORT);

    // Defaults: the LAN address and eth1 are offered, no ClusterIP and not docker0.
    wait_all_pairs_ping(&[&k8s, &peer], SETTLE).unwrap();
    let seen = wait_candidates(&peer, "k8s", &[lan, eth1], &[]);
    assert_eq!(
        unusable(&seen),
        Vec::<SocketAddrV4>::new(),
        "peer's candidates for k8s include addresses of kube-ipvs0 or docker0 (all: {seen:?})"
    );
    let (path, _) = view_of(&k8s, "peer");
    assert_eq!(path, "direct", "k8s does not reach peer directly");
    let skipped = skipped_interfaces(&k8s);
    for (name, reason) in [("kube-ipvs0", ipvs_reason), ("docker0", "bridge")] {
        assert!(
            skipped.iter().any(|(n, r)| n == name && r.contains(reason)),
            "k8s's status does not list {name} as skipped ({reason}): {skipped:?}"
        );
    }
    assert!(
        !skipped.iter().any(|(n, _)| n == "eth0" || n == "eth1"),
        "k8s's status lists an uplink as skipped: {skipped:?}"
    );

    // A bad pattern is refused with a message that says what is wrong, before anything starts.
    let bad = k8s.cli(["up", "--endpoint-interfaces", "eth[01]"]);
    let line = assert_clean_failure(&bad, &["eth[01]"]);
    assert!(
        line.contains("not supported") && line.contains('*'),
        "the error should say that [...] is not supported and what to use: {line}"
    );

    // An operator deny pattern removes eth1, which the defaults keep.
    k8s.stop();
    k8s.up_with(&["--endpoint-interfaces", "!eth1"]).unwrap();
    let seen = wait_candidates(&peer, "k8s", &[lan], &[eth1]);
    assert_eq!(unusable(&seen), Vec::<SocketAddrV4>::new(), "all: {seen:?}");
    let skipped = skipped_interfaces(&k8s);
    assert!(
        skipped
            .iter()
            .any(|(n, r)| n == "eth1" && r.contains("!eth1")),
        "k8s's status does not list eth1 as denied by !eth1: {skipped:?}"
    );

    // `mesh up` without the flag keeps the list the node last ran with.
    k8s.stop();
    k8s.up().unwrap();
    let status = k8s.status().unwrap();
    assert_eq!(
        status["endpoint_interfaces"]["list"], "!eth1",
        "the saved list is not in effect after a plain `mesh up`: {status:#}"
    );
    let seen = wait_candidates(&peer, "k8s", &[lan], &[eth1]);
    assert_eq!(unusable(&seen), Vec::<SocketAddrV4>::new(), "all: {seen:?}");
}

/// The standalone relay's port.
const RELAY_PORT: u16 = 7444;
/// Most candidates a peer gets for a node (`mesh_proto::control::MAX_ENDPOINTS`).
const MAX_ENDPOINTS: usize = 16;

/// Starts `mesh-controller relay` on `host` for the controller with key `controller_key` and
/// returns it with its key, once its port is bound.
fn start_relay(nat: &NatLab, host: &Host, controller_key: &str) -> (Proc, String) {
    let state = nat.lab().state_dir(&host.name).unwrap();
    let state = state.to_str().unwrap();
    let key = mesh_e2e::run(
        &host.ns,
        controller_bin().unwrap(),
        ["relay", "--print-key", "--state-dir", state],
    )
    .ok()
    .unwrap()
    .stdout
    .trim()
    .to_owned();
    let listen = format!("{}:{RELAY_PORT}", host.ip);
    let p = nat
        .spawn(
            host,
            &format!("{}-relay", host.name),
            controller_bin().unwrap(),
            [
                "relay",
                "--listen",
                &listen,
                "--controller-key",
                controller_key,
                "--state-dir",
                state,
            ],
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || udp_port_bound(
            &host.ns, RELAY_PORT
        )),
        "relay on {} did not start",
        host.name
    );
    (p, key)
}

#[test]
fn relay_mappings_keep_their_place_among_many_local_addresses() {
    let mut nat = NatLab::new("candidates-relay").unwrap();
    let ctl = Controller::start(nat.lab(), &nat.controller_host()).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let controller_key = ctl.admin(["key"]).ok().unwrap().stdout.trim().to_owned();
    let relay_host = nat.add_public_host("relay").unwrap();
    let (_relay, relay_key) = start_relay(&nat, &relay_host, &controller_key);
    let relay_addr = format!("{}:{RELAY_PORT}", relay_host.ip);
    ctl.admin([
        "region",
        "add",
        "eu",
        "--addr",
        &relay_addr,
        "--key",
        &relay_key,
    ])
    .ok()
    .unwrap();
    let sym = nat.add_router("sym", NatKind::Symmetric).unwrap();
    let busy_host = nat.add_host_behind(&sym, "busy").unwrap();
    let pub_host = nat.add_public_host("pub").unwrap();
    // 20 more addresses on a second uplink, each of which the defaults offer.
    add_second_uplink(&busy_host);
    for i in 100..120 {
        ip([
            "-n",
            &busy_host.ns,
            "addr",
            "add",
            &format!("192.0.2.{i}/24"),
            "dev",
            "eth1",
        ])
        .unwrap();
    }

    let busy = Agent::join(nat.lab(), &busy_host, "busy", &token).unwrap();
    let public = Agent::join(nat.lab(), &pub_host, "pub", &token).unwrap();

    // The relay's view of busy's socket: another port of the NAT than the controller's.
    let mut last = Value::Null;
    let mapped = wait_for(SETTLE, || {
        last = busy.status().ok()?;
        let relay = last["relays"]
            .as_array()?
            .iter()
            .find(|r| r["name"] == "eu" && r["connected"] == true)?;
        relay["observed"].as_str()?.parse::<SocketAddrV4>().ok()
    })
    .unwrap_or_else(|| panic!("busy never connected to relay eu: {last:#}"));
    let ctl_observed: SocketAddrV4 = last["controller"]["observed"]
        .as_str()
        .and_then(|o| o.parse().ok())
        .unwrap_or_else(|| panic!("no controller.observed in {last:#}"));
    assert_eq!(mapped.ip(), &sym.public_ip, "{last:#}");
    assert_ne!(
        mapped, ctl_observed,
        "behind a symmetric NAT the relay and the controller should see different ports"
    );

    // pub gets both public mappings of busy, whatever the number of busy's local addresses.
    let mut last = Vec::new();
    let seen = wait_until(SETTLE, || {
        last = view_of(&public, "busy").1;
        last.contains(&mapped) && last.contains(&ctl_observed)
    });
    assert!(
        seen,
        "pub's candidates for busy lack the relay's mapping {mapped} or the controller's \
         {ctl_observed}: {last:?}"
    );
    assert!(last.len() <= MAX_ENDPOINTS, "{last:?}");
    // busy's LAN peer would get the local addresses as well: as many as the places allow.
    let reported = ctl.nodes(NET).unwrap();
    let busy_row = reported
        .iter()
        .find(|n| n["name"] == "busy")
        .unwrap_or_else(|| panic!("no busy in {reported:#?}"));
    let endpoints: Vec<&str> = busy_row["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str())
        .collect();
    assert!(
        endpoints.contains(&mapped.to_string().as_str()),
        "the controller does not hold busy's relay mapping {mapped}: {endpoints:?}"
    );
    // The controller's own observation first, then what busy reported: its uplink's address
    // first, as many local addresses as the mapping leaves room for.
    assert!(
        endpoints.len() <= MAX_ENDPOINTS,
        "the controller holds more than a peer may get: {endpoints:?}"
    );
    let lan = SocketAddrV4::new(busy_host.ip, AGENT_PORT).to_string();
    assert_eq!(endpoints.get(1), Some(&lan.as_str()), "{endpoints:?}");
}

#[test]
fn the_uplink_is_offered_even_when_it_is_a_bridge() {
    let mut nat = NatLab::new("candidates-bridge").unwrap();
    let ctl = Controller::start(nat.lab(), &nat.controller_host()).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let home = nat.add_router("home", NatKind::PortRestricted).unwrap();
    let vmhost = nat.add_host_behind(&home, "vmhost").unwrap();
    let peer_host = nat.add_host_behind(&home, "peer").unwrap();
    // A VM host's network: eth0 is a port of the bridge br0, which holds the LAN address and
    // the default route; virbr0, libvirt's NAT bridge, holds 192.168.122.1 as on every host.
    let ns = vmhost.ns.as_str();
    let lan_cidr = format!("{}/24", vmhost.ip);
    for args in [
        vec!["link", "add", "br0", "type", "bridge"],
        vec!["addr", "del", &lan_cidr, "dev", "eth0"],
        vec!["link", "set", "eth0", "master", "br0"],
        vec!["addr", "add", &lan_cidr, "dev", "br0"],
        vec!["link", "set", "br0", "up"],
        vec![
            "route",
            "replace",
            "default",
            "via",
            "198.51.100.1",
            "dev",
            "br0",
        ],
        vec!["link", "add", "virbr0", "type", "bridge"],
        vec!["addr", "add", "192.168.122.1/24", "dev", "virbr0"],
        vec!["link", "set", "virbr0", "up"],
    ] {
        let mut full = vec!["-n", ns];
        full.extend(args);
        ip(full).unwrap();
    }
    assert!(
        vmhost.wait_ping(home.lan_ip, Duration::from_secs(10)),
        "vmhost does not reach its router through br0"
    );

    let vm = Agent::join(nat.lab(), &vmhost, "vmhost", &token).unwrap();
    let peer = Agent::join(nat.lab(), &peer_host, "peer", &token).unwrap();
    wait_all_pairs_ping(&[&vm, &peer], SETTLE).unwrap();
    let lan = SocketAddrV4::new(vmhost.ip, AGENT_PORT);
    let virbr0 = SocketAddrV4::new(Ipv4Addr::new(192, 168, 122, 1), AGENT_PORT);
    let seen = wait_candidates(&peer, "vmhost", &[lan], &[]);
    assert!(
        !seen.contains(&virbr0),
        "peer's candidates for vmhost include virbr0's address: {seen:?}"
    );
    let (path, _) = view_of(&vm, "peer");
    assert_eq!(path, "direct", "vmhost does not reach peer directly");
    let status = vm.status().unwrap();
    assert_eq!(
        status["endpoint_interfaces"]["offered"],
        serde_json::json!(["br0"]),
        "{:#}",
        status["endpoint_interfaces"]
    );
}
