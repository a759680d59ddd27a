//! Many nodes on one flat LAN: every address public, nothing NATed. Every pair must go direct
//! quickly, with no birthday punching (there is no NAT to punch) and nothing left on the relay.
//!
//! `MESH_SCALE_NODES` sets the number of agents (default 40); `MESH_SCALE_HOG=1` runs a busy
//! loop per core beside them, as on a Kubernetes node at 100 % CPU.
#![allow(clippy::unwrap_used)]

use mesh_e2e::{run_with_timeout, wait_until, Agent, Controller, Lab};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

const NET: &str = "lab";

fn nodes() -> usize {
    std::env::var("MESH_SCALE_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

/// Busy loops on every core, killed on drop.
struct Hog(Vec<Child>);

impl Hog {
    fn start() -> Hog {
        let cores = thread::available_parallelism().map_or(2, |n| n.get());
        Hog((0..cores)
            .map(|_| {
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .unwrap()
            })
            .collect())
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Pings, from every agent at once, every other agent once (one after the other); returns the
/// pairs that got no answer. (Not all 1,560 pings at once: forking that many processes on two
/// cores stalls every process on the machine, peers included, for over a second.)
fn ping_round(agents: &[Agent]) -> Vec<(usize, usize)> {
    let script =
        "for ip in \"$@\"; do ping -n -q -c 1 -W 2 \"$ip\" >/dev/null 2>&1 || echo \"$ip\"; done";
    let results: Vec<(usize, String)> = thread::scope(|s| {
        let handles: Vec<_> = agents
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let targets: Vec<String> = agents
                    .iter()
                    .filter(|o| o.name != a.name)
                    .map(|o| o.address.to_string())
                    .collect();
                s.spawn(move || {
                    let mut args = vec!["-c".to_string(), script.to_string(), "sh".to_string()];
                    args.extend(targets);
                    let out = run_with_timeout(&a.host.ns, "sh", &args, Duration::from_secs(30));
                    (i, out.stdout)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failed = Vec::new();
    for (i, stdout) in results {
        for ip in stdout.split_whitespace() {
            if let Some(j) = agents.iter().position(|o| o.address.to_string() == ip) {
                failed.push((i, j));
            }
        }
    }
    failed
}

fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter `{name}` in {status:#}"))
}

fn flat_lan_converges(label: &str, hog: bool) {
    let n = nodes();
    let mut lab = Lab::new(label).unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let hosts: Vec<_> = (1..=n)
        .map(|i| lab.add_host(&format!("n{i}")).unwrap())
        .collect();
    let mut all: Vec<_> = hosts.iter().collect();
    all.push(&ctl_host);
    lab.pin_neighbours(&all).unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let _hog = hog.then(Hog::start);
    let born = Instant::now();
    let mut agents: Vec<Agent> = hosts
        .iter()
        .map(|h| Agent::join(&lab, h, &h.name, &token).unwrap())
        .collect();
    let joined = born.elapsed();

    // Every agent lists every other one.
    let listed = wait_until(Duration::from_secs(30), || {
        agents.iter().all(|a| {
            a.status()
                .is_ok_and(|s| s["peers"].as_array().is_some_and(|p| p.len() == n - 1))
        })
    });
    let counts: BTreeMap<&str, usize> = agents
        .iter()
        .map(|a| {
            let peers = a
                .status()
                .ok()
                .and_then(|s| s["peers"].as_array().map(Vec::len));
            (a.name.as_str(), peers.unwrap_or(0))
        })
        .collect();
    assert!(listed, "not every agent lists {} peers: {counts:?}", n - 1);
    let all_listed = born.elapsed();

    // Every pair pings within 5 s of that.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut failed = ping_round(&agents);
    while !failed.is_empty() && Instant::now() < deadline {
        failed = ping_round(&agents);
    }
    let pinged = born.elapsed();
    let names: Vec<String> = failed
        .iter()
        .map(|&(i, j)| format!("{} -> {}", agents[i].name, agents[j].name))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} pairs got no ping answer within 5 s of every agent listing its peers \
         (joins took {joined:?}): {}",
        failed.len(),
        n * (n - 1),
        names.join(", ")
    );

    // Every path direct, nothing punched, handshake ages within the network's age.
    let mut last = BTreeMap::new();
    let direct = wait_until(Duration::from_secs(10), || {
        last.clear();
        agents.iter().all(|a| {
            let s = a.status().unwrap();
            let ok = s["peers"]
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["path"] == "direct"));
            last.insert(a.name.clone(), s);
            ok
        })
    });
    let relayed: Vec<String> = last
        .iter()
        .flat_map(|(name, s)| {
            s["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["path"] != "direct")
                .map(move |p| format!("{name} -> {} ({})", p["name"], p["path"]))
        })
        .collect();
    assert!(direct, "paths not direct: {}", relayed.join(", "));
    let age = born.elapsed().as_secs();
    for (name, s) in &last {
        assert_eq!(
            counter(s, "birthday_sockets_opened"),
            0,
            "{name} opened birthday sockets on a LAN without NAT: {:#}",
            s["counters"]
        );
        assert_eq!(
            counter(s, "birthday_probes_sent"),
            0,
            "{name} sent birthday probes on a LAN without NAT: {:#}",
            s["counters"]
        );
        for p in s["peers"].as_array().unwrap() {
            let hs = p["last_handshake_secs_ago"].as_u64();
            assert!(
                hs.is_some_and(|h| h <= age),
                "{name}: the handshake with {} is {hs:?} s old on a network {age} s old",
                p["name"]
            );
        }
    }
    // Steady state, with traffic: no path falls back to the relay (an agent that ran late
    // must not give up a path that works).
    thread::sleep(Duration::from_secs(5));
    let failed = ping_round(&agents);
    assert!(
        failed.is_empty(),
        "{} pairs lost their ping answer after converging",
        failed.len()
    );
    for a in &mut agents {
        let log = a.log();
        let fell: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("path changed") && !l.contains("path=direct"))
            .collect();
        let drops = a.host.run("nstat", ["-az", "UdpRcvbufErrors"]).stdout;
        assert!(
            fell.is_empty(),
            "{} left a direct path on a LAN where every path works:\n{}\n{drops}",
            a.name,
            fell.join("\n")
        );
    }
    if std::env::var_os("MESH_SCALE_MEASURE").is_some() {
        measure_idle(&agents);
    }
    eprintln!(
        "{n} agents: joined in {joined:?}, all listed at {all_listed:?}, all pairs pinged at \
         {pinged:?}"
    );
}

#[test]
fn forty_nodes_on_one_lan_all_go_direct() {
    flat_lan_converges("scale-flat", false);
}

#[test]
fn forty_nodes_on_one_lan_all_go_direct_at_full_cpu() {
    flat_lan_converges("scale-flat-hog", true);
}

/// Resident memory (KiB) and CPU ticks (user + system) of a process.
fn rss_and_ticks(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((rss, ticks))
}

/// With `MESH_SCALE_MEASURE=1`: the agents' memory and their CPU over 30 s without traffic.
fn measure_idle(agents: &[Agent]) {
    let pids: Vec<u32> = agents.iter().filter_map(Agent::pid).collect();
    let before: Vec<(u64, u64)> = pids.iter().filter_map(|&p| rss_and_ticks(p)).collect();
    let idle = Duration::from_secs(30);
    thread::sleep(idle);
    let after: Vec<(u64, u64)> = pids.iter().filter_map(|&p| rss_and_ticks(p)).collect();
    let hz = 100.0; // USER_HZ on Linux
    let mut cpu: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a.1 - b.1) as f64 / hz / idle.as_secs_f64() * 100.0)
        .collect();
    let mut rss: Vec<u64> = after.iter().map(|a| a.0).collect();
    cpu.sort_by(f64::total_cmp);
    rss.sort_unstable();
    eprintln!(
        "idle, {} agents with {} peers each: RSS median {} KiB (min {}, max {}); CPU median \
         {:.2} % of a core (max {:.2} %)",
        agents.len(),
        agents.len() - 1,
        rss[rss.len() / 2],
        rss[0],
        rss[rss.len() - 1],
        cpu[cpu.len() / 2],
        cpu[cpu.len() - 1]
    );
}
