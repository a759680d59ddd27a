//! Standalone relays in regions (`mesh-controller relay`): nodes connect to every relay the
//! controller announces, make the nearest their home, and peers send relayed traffic there.
//! Relayed traffic keeps flowing with the controller dead, and moves to the next relay when the
//! home relay stops. A relay that cannot prove its key is reported, and removing it is pushed.
//!
//! Two nodes behind symmetric NATs (no direct path can exist) ping each other throughout. The
//! "far" relay sits behind a forwarder that delays each datagram by 40 ms each way (the lab
//! kernel has no netem).
#![allow(clippy::unwrap_used)]

use mesh_e2e::daemons::udp_port_bound;
use mesh_e2e::natlab::{NatKind, NatLab};
use mesh_e2e::{controller_bin, wait_until, Agent, Controller, Host, Proc};
use serde_json::Value;
use std::time::{Duration, Instant};

const NET: &str = "regions";
const RELAY_PORT: u16 = 7444;

fn relay_key(host: &Host, state: &std::path::Path) -> String {
    let out = mesh_e2e::run(
        &host.ns,
        controller_bin().unwrap(),
        [
            "relay",
            "--print-key",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    )
    .ok()
    .unwrap();
    out.stdout.trim().to_owned()
}

/// The near relay serves metrics here, in its namespace.
const METRICS_PORT: u16 = 9103;

fn start_relay(nat: &NatLab, host: &Host, listen: &str, controller_key: &str) -> Proc {
    let metrics = format!("127.0.0.1:{METRICS_PORT}");
    let state = nat.lab().state_dir(&host.name).unwrap();
    let p = nat
        .spawn(
            host,
            &format!("{}-relay", host.name),
            controller_bin().unwrap(),
            [
                "relay",
                "--listen",
                listen,
                "--controller-key",
                controller_key,
                "--state-dir",
                state.to_str().unwrap(),
                "--metrics-listen",
                &metrics,
            ],
        )
        .unwrap();
    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || udp_port_bound(&host.ns, port)),
        "relay on {} did not start",
        host.name
    );
    p
}

fn relay<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["relays"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)
}

/// Both agents list `name` as connected and as home (or not).
fn relay_state(agents: &[&Agent], name: &str, connected: bool, home: bool) -> bool {
    agents.iter().all(|a| {
        a.status().ok().is_some_and(|s| {
            relay(&s, name).is_some_and(|r| r["connected"] == connected && r["home"] == home)
        })
    })
}

#[test]
fn nodes_use_their_nearest_relay_and_survive_losing_it_and_the_controller() {
    let mut nat = NatLab::new("regions").unwrap();
    let ctl_host = nat.controller_host();
    let near = nat.add_public_host("near").unwrap();
    let far = nat.add_public_host("far").unwrap();
    let r1 = nat.add_router("sym1", NatKind::Symmetric).unwrap();
    let r2 = nat.add_router("sym2", NatKind::Symmetric).unwrap();
    let h1 = nat.add_host_behind(&r1, "sym1").unwrap();
    let h2 = nat.add_host_behind(&r2, "sym2").unwrap();

    let mut ctl = Controller::start(nat.lab(), &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let controller_key = ctl.admin(["key"]).ok().unwrap().stdout.trim().to_owned();

    let near_key = relay_key(&near, &nat.lab().state_dir("near").unwrap());
    let far_key = relay_key(&far, &nat.lab().state_dir("far").unwrap());
    assert_ne!(near_key, far_key);
    let near_addr = format!("{}:{RELAY_PORT}", near.ip);
    let far_addr = format!("{}:{RELAY_PORT}", far.ip);
    let mut near_relay = start_relay(&nat, &near, &near_addr, &controller_key);
    let _far_relay = start_relay(&nat, &far, "127.0.0.1:7445", &controller_key);
    let _far_delay = nat
        .spawn(
            &far,
            "far-delay",
            env!("CARGO_BIN_EXE_mesh-e2e-delay"),
            [far_addr.as_str(), "127.0.0.1:7445", "40"],
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || udp_port_bound(
        &far.ns, RELAY_PORT
    )));

    let a = Agent::join(nat.lab(), &h1, "sym1", &token).unwrap();
    let b = Agent::join(nat.lab(), &h2, "sym2", &token).unwrap();
    assert!(
        h1.wait_ping(b.address, Duration::from_secs(20)),
        "no ping through the controller's relay"
    );

    // Relays added while the nodes run are pushed to them. The "bogus" one claims the near
    // relay's address with another key.
    let t0 = Instant::now();
    for (name, addr, key) in [
        ("near", &near_addr, &near_key),
        ("far", &far_addr, &far_key),
        ("bogus", &near_addr, &far_key),
    ] {
        ctl.admin(["region", "add", name, "--addr", addr, "--key", key])
            .ok()
            .unwrap();
    }
    let listed = ctl.admin(["region", "list", "--json"]).ok().unwrap();
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&listed.stdout)
            .unwrap()
            .len(),
        3
    );
    assert!(
        wait_until(Duration::from_secs(20), || relay_state(
            &[&a, &b],
            "near",
            true,
            true
        ) && relay_state(
            &[&a, &b],
            "far",
            true,
            false
        )),
        "the nodes did not make the near relay their home: {:#}",
        a.status().unwrap()["relays"]
    );
    let homed = t0.elapsed();
    // The controller and the near relay see different mappings of the same socket.
    let nat_view = a.status().unwrap()["nat"].clone();
    assert_eq!(nat_view["mapping"], "endpoint-dependent", "{nat_view:#}");
    let bogus = wait_until(Duration::from_secs(10), || {
        a.status().ok().is_some_and(|s| {
            relay(&s, "bogus").is_some_and(|r| {
                r["connected"] == false
                    && r["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("did not prove its key"))
            })
        })
    });
    assert!(
        bogus,
        "a relay with the wrong key must be reported: {:#}",
        a.status().unwrap()["relays"]
    );
    ctl.admin(["region", "remove", "bogus"]).ok().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || a
            .status()
            .ok()
            .is_some_and(|s| relay(&s, "bogus").is_none())),
        "a removed relay must disappear from the nodes"
    );

    // Relayed traffic between the two goes through the near relay, each way.
    assert!(
        wait_until(Duration::from_secs(15), || {
            a.peer("sym2")
                .is_ok_and(|p| p["path"] == "relay" && p["relay"] == "near")
                && b.peer("sym1")
                    .is_ok_and(|p| p["path"] == "relay" && p["relay"] == "near")
        }),
        "traffic does not go through the peer's home relay: {:#}",
        a.peer("sym2").unwrap()
    );
    assert!(h1.wait_ping(b.address, Duration::from_secs(5)));
    assert!(h2.wait_ping(a.address, Duration::from_secs(5)));
    // The human status says the same: the relays, which is home, and the relay per peer.
    let human = a.cli(["status"]).ok().unwrap().stdout;
    eprintln!("{human}");
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("relay ") && l.contains("near") && l.contains(", home")),
        "{human}"
    );
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("sym2 ") && l.contains("relay near")),
        "{human}"
    );
    assert!(human.contains("mapping endpoint-dependent"), "{human}");
    let rtt_near = a.cli(["ping", "sym2"]).ok().unwrap().stdout;
    // The relay's own count agrees: frames went through it.
    let metrics = mesh_e2e::scrape_metrics(&near.ns, METRICS_PORT).expect("relay metrics");
    let forwarded = mesh_e2e::metric_value(&metrics, "mesh_relay_forwarded_frames_total");
    assert!(forwarded.is_some_and(|n| n >= 10.0), "{metrics}");
    assert_eq!(
        mesh_e2e::metric_value(&metrics, "mesh_relay_nodes_connected"),
        Some(2.0),
        "{metrics}"
    );
    assert!(rtt_near.contains("via relay near"), "{rtt_near}");

    // The controller dies: the relays do not need it.
    ctl.kill9();
    for _ in 0..5 {
        assert!(
            h1.ping(b.address),
            "relayed ping failed with the controller down"
        );
    }

    // The home relay stops: the nodes move to the far one by themselves.
    let t1 = Instant::now();
    near_relay.stop();
    assert!(
        wait_until(Duration::from_secs(20), || h1.ping(b.address)),
        "no ping after the near relay stopped"
    );
    let recovered = t1.elapsed();
    assert!(
        wait_until(Duration::from_secs(15), || relay_state(
            &[&a, &b],
            "far",
            true,
            true
        )),
        "the far relay did not become home: {:#}",
        a.status().unwrap()["relays"]
    );
    assert_eq!(a.peer("sym2").unwrap()["relay"], "far");
    let rtt_far = a.cli(["ping", "sym2"]).ok().unwrap().stdout;
    assert!(rtt_far.contains("via relay far"), "{rtt_far}");
    eprintln!(
        "relays announced to home chosen: {homed:?}; ping again {recovered:?} after the home relay stopped\n\
         near: {}\nfar: {}",
        rtt_near.trim(),
        rtt_far.trim()
    );
}
