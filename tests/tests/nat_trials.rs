//! Every NAT pair kind of the lab, from fresh, several times: the share of trials that went
//! direct and the time it took (median and 90th percentile), measured from the moment both
//! agents are up while one pings the other, as a user would.
//!
//! `MESH_NAT_TRIALS` sets the trials per pair kind (default 1: CI's short pass checks that
//! every kind goes where it should). `benches/nat.sh` runs 10 and prints the table.
//! Plain Linux gateways (`masquerade`, no input filter) with a core router between the sites
//! (`masq/core`, as in the world) are asserted like the others, and must go direct within
//! [`GATEWAY_TIMEOUT`]. `MESH_NAT_TRIALS_LINUX=1` adds the pairs whose plain gateways share one
//! segment with the other side's router (`masq`): there a primer reaches the far gateway, so
//! they are measured, not asserted.
#![allow(clippy::unwrap_used)]

use mesh_e2e::natlab::{NatKind, NatLab};
use mesh_e2e::{netns::Host, Agent, Controller};
use std::time::{Duration, Instant};

const NET: &str = "trials";
/// How long a trial waits for a direct path.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a pair that cannot go direct is watched (it must stay on the relay, and answer).
const RELAY_WATCH: Duration = Duration::from_secs(15);
/// How long a pair behind plain Linux gateways may take to go direct (issue 12: within 10 s of
/// the first ping).
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a node of a pair sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    Public,
    Behind(NatKind),
    /// Both nodes behind one port-restricted NAT.
    SameNat,
    /// Behind a home router behind a carrier-grade NAT.
    Double,
    /// Behind a plain Linux gateway one routed hop (a core router) away from the internet.
    MasqViaCore,
}

fn label(s: Site) -> &'static str {
    match s {
        Site::Public => "public",
        Site::Behind(NatKind::FullCone) => "cone",
        Site::Behind(NatKind::PortRestricted) => "port",
        Site::Behind(NatKind::Symmetric) => "sym",
        Site::Behind(NatKind::UdpBlocked) => "blocked",
        Site::Behind(NatKind::Masquerade) => "masq",
        Site::SameNat => "lan",
        Site::Double => "double",
        Site::MasqViaCore => "masq/core",
    }
}

fn trials() -> usize {
    std::env::var("MESH_NAT_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Places a node at `site` (for [`Site::SameNat`], `shared` is the one router).
fn place(
    nat: &mut NatLab,
    site: Site,
    name: &str,
    shared: &mut Option<mesh_e2e::natlab::Router>,
) -> Host {
    match site {
        Site::Public => nat.add_public_host(name).unwrap(),
        Site::Behind(kind) => {
            let r = nat.add_router(&format!("r{name}"), kind).unwrap();
            nat.add_host_behind(&r, name).unwrap()
        }
        Site::SameNat => {
            if shared.is_none() {
                *shared = Some(nat.add_router("rlan", NatKind::PortRestricted).unwrap());
            }
            nat.add_host_behind(shared.as_ref().unwrap(), name).unwrap()
        }
        Site::Double => {
            let (_cgnat, home) = nat.add_double_nat(&format!("d{name}")).unwrap();
            nat.add_host_behind(&home, name).unwrap()
        }
        Site::MasqViaCore => {
            let r = nat
                .add_router_via_core(&format!("r{name}"), NatKind::Masquerade)
                .unwrap();
            nat.add_host_behind(&r, name).unwrap()
        }
    }
}

/// One trial from fresh: the time to a direct path both ways, or `None` after `timeout`. Panics
/// if no ping got an answer at all (the relay must carry a pair that cannot go direct).
fn trial(a: Site, b: Site, n: usize, timeout: Duration) -> Option<Duration> {
    let mut nat = NatLab::new(&format!("trial-{}-{}-{n}", label(a), label(b))).unwrap();
    let ctl_host = nat.controller_host();
    let mut shared = None;
    let ha = place(&mut nat, a, "a", &mut shared);
    let hb = place(&mut nat, b, "b", &mut shared);
    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let aa = Agent::join(nat.lab(), &ha, "a", &token).unwrap();
    let ab = Agent::join(nat.lab(), &hb, "b", &token).unwrap();
    let start = Instant::now();
    let direct = |x: &Agent, peer: &str| x.peer(peer).is_ok_and(|p| p["path"] == "direct");
    let mut answered = false;
    while start.elapsed() < timeout {
        // One ping at a time, as `ping` does (it waits up to a second for each answer).
        answered |= ha.ping(ab.address);
        if direct(&aa, "b") && direct(&ab, "a") {
            return Some(start.elapsed());
        }
    }
    assert!(
        answered,
        "{} -> {}: not one ping answered in {timeout:?}",
        label(a),
        label(b)
    );
    None
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i])
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

#[test]
fn every_nat_pair_kind_goes_direct_where_it_can_over_trials() {
    use NatKind::*;
    // (a, b, whether a direct path can exist)
    let pairs = [
        (Site::Public, Site::Behind(FullCone), true),
        (Site::Behind(FullCone), Site::Behind(PortRestricted), true),
        (
            Site::Behind(PortRestricted),
            Site::Behind(PortRestricted),
            true,
        ),
        (Site::SameNat, Site::SameNat, true),
        (Site::Double, Site::Behind(PortRestricted), true),
        (Site::Behind(Symmetric), Site::Public, true),
        (Site::Behind(Symmetric), Site::Behind(FullCone), true),
        (Site::Behind(Symmetric), Site::Behind(PortRestricted), true),
        (Site::Behind(Symmetric), Site::Behind(Symmetric), false),
        (Site::MasqViaCore, Site::Behind(PortRestricted), true),
        (Site::MasqViaCore, Site::MasqViaCore, true),
    ];
    let mut pairs: Vec<(Site, Site, bool)> = pairs.to_vec();
    let linux = std::env::var_os("MESH_NAT_TRIALS_LINUX").is_some();
    if linux {
        let masq = Site::Behind(Masquerade);
        pairs.extend([
            (masq, Site::Public, true),
            (masq, Site::Behind(PortRestricted), true),
            (masq, masq, true),
        ]);
    }
    // MESH_NAT_TRIALS_ONLY=PREFIX: only the pairs whose first side's label starts with it.
    if let Ok(only) = std::env::var("MESH_NAT_TRIALS_ONLY") {
        pairs.retain(|(a, _, _)| label(*a).starts_with(only.as_str()));
    }
    let n = trials();
    let mut table = format!(
        "\n{:<20} {:>7} {:>8} {:>8} {:>8}",
        "pair", "trials", "direct", "median", "p90"
    );
    let mut wrong = Vec::new();
    for (a, b, can) in pairs {
        let mut times = Vec::new();
        for t in 0..n {
            let timeout = match (can, a) {
                (false, _) => RELAY_WATCH,
                (true, Site::MasqViaCore) => GATEWAY_TIMEOUT,
                (true, _) => TRIAL_TIMEOUT,
            };
            if let Some(d) = trial(a, b, t, timeout) {
                times.push(d);
            }
        }
        times.sort();
        let name = format!("{}-{}", label(a), label(b));
        table += &format!(
            "\n{name:<20} {n:>7} {:>7.0}% {:>8} {:>8}",
            100.0 * times.len() as f64 / n as f64,
            secs(percentile(&times, 0.5)),
            secs(percentile(&times, 0.9))
        );
        let direct_all = times.len() == n;
        let direct_none = times.is_empty();
        let measured_only = a == Site::Behind(Masquerade);
        if !measured_only && ((can && !direct_all) || (!can && !direct_none)) {
            wrong.push(format!(
                "{name}: direct in {} of {n} trials, expected {}",
                times.len(),
                if can { "all" } else { "none" }
            ));
        }
    }
    eprintln!("{table}");
    assert!(wrong.is_empty(), "{wrong:#?}\n{table}");
}

/// The birthday budget is the network administrator's: at 0, a symmetric node and a
/// port-restricted one stay on the relay (and answer) while neither opens a birthday socket;
/// set back to the default while both run, they are told at once and go direct.
#[test]
fn a_network_budget_of_zero_stops_birthday_punching_until_it_is_lifted() {
    let mut nat = NatLab::new("budget").unwrap();
    let ctl_host = nat.controller_host();
    let mut shared = None;
    let ha = place(&mut nat, Site::Behind(NatKind::Symmetric), "a", &mut shared);
    let hb = place(
        &mut nat,
        Site::Behind(NatKind::PortRestricted),
        "b",
        &mut shared,
    );
    let ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let set = |value: &str| {
        ctl.admin(["network", "set", NET, "--birthday-budget", value])
            .ok()
            .unwrap()
            .stdout
    };
    assert!(set("0").contains("0 birthday attempts per node"));
    let list = ctl.admin(["network", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(list[0]["birthday_budget"], 0);
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let aa = Agent::join(nat.lab(), &ha, "a", &token).unwrap();
    let ab = Agent::join(nat.lab(), &hb, "b", &token).unwrap();
    let direct = |x: &Agent, peer: &str| x.peer(peer).is_ok_and(|p| p["path"] == "direct");
    let start = Instant::now();
    let mut answered = false;
    while start.elapsed() < Duration::from_secs(15) {
        answered |= ha.ping(ab.address);
        assert!(!direct(&aa, "b"), "direct with birthday punching off");
    }
    assert!(answered, "the relay carries the pair");
    for (x, name) in [(&aa, "a"), (&ab, "b")] {
        let s = x.status().unwrap();
        assert_eq!(s["nat"]["birthday_budget"], 0, "{name}");
        assert_eq!(s["counters"]["birthday_sockets_opened"], 0, "{name}");
        assert_eq!(s["counters"]["birthday_attempts"], 0, "{name}");
    }
    // Lifted while both run: pushed to them, and the pair goes direct.
    assert!(set("default").contains("default"));
    let lifted = Instant::now();
    loop {
        ha.ping(ab.address);
        if direct(&aa, "b") && direct(&ab, "a") {
            break;
        }
        assert!(
            lifted.elapsed() < Duration::from_secs(45),
            "not direct 45 s after the budget was lifted: {}",
            aa.status().unwrap()["counters"]
        );
    }
    eprintln!(
        "direct {:.1} s after the budget was lifted",
        lifted.elapsed().as_secs_f64()
    );
    let s = aa.status().unwrap();
    assert_eq!(s["nat"]["birthday_budget"], 8);
    assert!(
        s["counters"]["birthday_sockets_opened"].as_u64() > Some(0),
        "the symmetric side punched: {}",
        s["counters"]
    );
}
