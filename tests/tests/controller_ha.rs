//! Three controllers on one PostgreSQL (Debian's server, started by the test in a lab host as
//! an unprivileged user): nodes joined through different controllers ping each other; a change
//! made through one controller reaches nodes on another within a second; a controller killed
//! with -9 loses its nodes to the others within 5 s while pings go on, and no address is given
//! twice; a node whose token names the controllers by one DNS name (three A records) moves
//! the same way; PostgreSQL restarted, the controllers carry on by themselves.
#![allow(clippy::unwrap_used)]

use mesh_e2e::daemons::Replicas;
use mesh_e2e::{wait_all_pairs_ping, wait_until, Agent, Controller, Host, Lab};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const NET: &str = "ha";

/// The controller address the node's session is up with, if it is up.
fn connected_to(a: &Agent) -> Option<String> {
    let s = a.status().ok()?;
    (s["controller"]["connected"] == true)
        .then(|| s["controller"]["address"].as_str().unwrap().to_owned())
}

/// `mesh-controller --database URL ARGS` on controller `c`'s host; stdout.
fn admin(c: &Controller, url: &str, args: &[&str]) -> String {
    c.admin_db(url, args).ok().unwrap().stdout
}

/// A token whose first address is `first` (the others after it): the node connects there.
fn token_via(c: &Controller, url: &str, first: &str, all: &[String]) -> String {
    let mut args = vec!["token", "create", NET, "--reusable"];
    for a in std::iter::once(first).chain(all.iter().map(String::as_str).filter(|a| *a != first)) {
        args.extend_from_slice(&["--controller", a]);
    }
    admin(c, url, &args).trim().to_owned()
}

fn addresses(c: &Controller, url: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&admin(c, url, &["node", "list", NET, "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n["address"].as_str().unwrap().to_owned())
        .collect()
}

/// `ping -i 0.2 -c COUNT` running in a host while the test does something else.
struct Pinging(std::process::Child);

impl Pinging {
    fn start(from: &Host, to: std::net::Ipv4Addr, count: u32) -> Pinging {
        let child = std::process::Command::new("ip")
            .args([
                "netns", "exec", &from.ns, "ping", "-n", "-q", "-i", "0.2", "-W", "1",
            ])
            .args(["-c", &count.to_string(), &to.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Pinging(child)
    }

    /// Waits for the end; (sent, received).
    fn wait(self) -> (u32, u32) {
        let out = self.0.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no summary from ping: {text}"));
        let num = |word: &str| -> u32 {
            line.split(',')
                .find(|p| p.contains(word))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        (num("transmitted"), num("received"))
    }
}

/// /etc/netns/<namespace>/hosts (which `ip netns exec` mounts over /etc/hosts), removed on
/// drop: the host's resolver answers `name` with every address given.
struct HostsFile(std::path::PathBuf);

impl HostsFile {
    fn new(host: &Host, name: &str, addrs: &[String]) -> HostsFile {
        let dir = std::path::PathBuf::from("/etc/netns").join(&host.ns);
        std::fs::create_dir_all(&dir).unwrap();
        let mut text = String::from("127.0.0.1\tlocalhost\n");
        for a in addrs {
            text.push_str(&format!("{}\t{name}\n", a.rsplit_once(':').unwrap().0));
        }
        std::fs::write(dir.join("hosts"), text).unwrap();
        HostsFile(dir)
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn three_controllers_on_one_postgresql_survive_a_kill_and_a_database_restart() {
    let mut lab = Lab::new("ha").unwrap();
    // Dropped before the lab: the controllers stop, then the database server.
    let mut replicas = Replicas::start(&mut lab, 3).unwrap();
    let hosts: Vec<Host> = ["a", "b", "c", "d", "g"]
        .iter()
        .map(|n| lab.add_host(n).unwrap())
        .collect();
    let url = replicas.url.clone();
    let all = replicas.addrs();
    let [c1, c2, c3] = &mut replicas.controllers[..] else {
        unreachable!()
    };
    admin(c2, &url, &["network", "create", NET, "--approval", "auto"]);
    // A token made without --controller names this host's controller, then the others up.
    let made = c2.admin_db(&url, &["token", "create", NET]);
    let told = made.stderr.clone();
    assert!(
        told.contains(&format!("at {}", all[1]))
            && told.contains(&all[0])
            && told.contains(&all[2]),
        "{made}"
    );
    // a on c1, b on c2, c on c3, d on c1; each token names the three.
    let via = |first: &Controller| token_via(c3, &url, &first.listen.to_string(), &all);
    let mut a = Agent::join(&lab, &hosts[0], "a", &via(c1)).unwrap();
    let b = Agent::join(&lab, &hosts[1], "b", &via(c2)).unwrap();
    let c = Agent::join(&lab, &hosts[2], "c", &via(c3)).unwrap();
    let d = Agent::join(&lab, &hosts[3], "d", &via(c1)).unwrap();
    for (node, ctl) in [(&a, &c1), (&b, &c2), (&c, &c3), (&d, &c1)] {
        assert_eq!(
            connected_to(node),
            Some(ctl.listen.to_string()),
            "{} is on its token's first controller",
            node.name
        );
    }
    // g knows the controllers by one name with three addresses (c1's first).
    let _hosts_file = HostsFile::new(&hosts[4], "ctl.mesh.test", &all);
    let by_name = admin(
        c3,
        &url,
        &[
            "token",
            "create",
            NET,
            "--reusable",
            "--controller",
            "ctl.mesh.test:7443",
        ],
    );
    let mut g = Agent::join(&lab, &hosts[4], "g", by_name.trim()).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || connected_to(&g).is_some()),
        "g is not connected: {:?}",
        g.status()
    );
    eprintln!("g (by name) is on {:?}", connected_to(&g));
    wait_all_pairs_ping(&[&a, &b, &c, &d, &g], Duration::from_secs(30)).unwrap();
    let before: BTreeSet<String> = addresses(c1, &url).into_iter().collect();
    assert_eq!(before.len(), 5, "five nodes, five addresses: {before:?}");

    // A removal through c2 reaches c (on c3) within a second.
    let asked = Instant::now();
    admin(c2, &url, &["node", "remove", NET, "d"]);
    // From the moment the command returns (its own start-up is not the control plane's).
    let started = Instant::now();
    eprintln!(
        "`node remove` took {} ms, returned at {:?}",
        started.duration_since(asked).as_millis(),
        std::time::SystemTime::now()
    );
    assert!(
        wait_until(Duration::from_secs(5), || !c
            .peer_names()
            .iter()
            .any(|n| n == "d")),
        "c still lists d"
    );
    let took = started.elapsed();
    eprintln!(
        "a removal through c2 reached a node on c3 in {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    drop(d);

    // c1 dies: a moves to another controller within 5 s while it keeps pinging b.
    let pinging = Pinging::start(&a.host, b.address, 50);
    let killed = Instant::now();
    c1.kill9();
    assert!(
        wait_until(Duration::from_secs(10), || connected_to(&a)
            .is_some_and(|to| to != c1.listen.to_string())),
        "a did not move off the dead controller: {:?}\n{}",
        a.status(),
        a.log()
    );
    let moved = killed.elapsed();
    eprintln!(
        "a was on another controller {} ms after c1 was killed",
        moved.as_millis()
    );
    assert!(moved < Duration::from_secs(5), "took {moved:?}");
    // g too, whichever of the name's addresses it was on.
    assert!(
        wait_until(Duration::from_secs(10), || connected_to(&g)
            .is_some_and(|to| to != all[0])),
        "g did not move off the dead controller: {:?}\n{}",
        g.status(),
        g.log()
    );
    let g_moved = killed.elapsed();
    eprintln!(
        "g was on {:?} {} ms after c1 was killed",
        connected_to(&g),
        g_moved.as_millis()
    );
    assert!(g_moved < Duration::from_secs(5), "took {g_moved:?}");
    let (sent, received) = pinging.wait();
    eprintln!("pings a -> b across the kill: {received} of {sent}");
    assert!(
        received * 10 >= sent * 9,
        "{received} of {sent} pings came back"
    );
    // The address stays, and a new node gets one nobody had.
    let a_before = a.address;
    assert_eq!(a.ip().unwrap(), a_before);
    let e = Agent::join(&lab, &hosts[3], "e", &via(c2)).unwrap();
    assert!(
        !before.contains(&e.address.to_string()),
        "e got a used address {}",
        e.address
    );
    wait_all_pairs_ping(&[&a, &b, &c, &e, &g], Duration::from_secs(30)).unwrap();

    // PostgreSQL restarts: the controllers reconnect by themselves; joins and changes work.
    replicas.postgres.restart().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let out = c3.admin_db(&url, &["node", "remove", NET, "e"]);
            out.success()
        }),
        "the database did not come back"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !b
            .peer_names()
            .iter()
            .any(|n| n == "e")),
        "b (on c2) did not hear of e's removal after the database restart\n{}",
        c2.log()
    );
    drop(e);
    let f = Agent::join(&lab, &hosts[3], "f", &via(c3)).unwrap();
    assert!(!before.contains(&f.address.to_string()));
    wait_all_pairs_ping(&[&a, &b, &c, &f], Duration::from_secs(30)).unwrap();
    let _ = &mut a;
}
