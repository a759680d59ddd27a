//! The agent's lifecycle has no dead ends (issue 14): a node the controller removed stops with
//! its address gone and stays down; `mesh leave --force` works while the agent runs and the
//! controller is gone; `mesh down` stops the agent and `mesh up` resumes with the same address;
//! one agent per state directory; a read-only state directory fails before mesh0 exists; and
//! `mesh join` waits for a controller that is still booting.
#![allow(clippy::unwrap_used)]

use mesh_e2e::daemons::write_token_file;
use mesh_e2e::{netns::ip, wait_all_pairs_ping, wait_until, Agent, Controller, Lab};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

const NET: &str = "cycle";
/// `mesh`'s exit status for a state no restart can fix (`RestartPreventExitStatus=` in the unit).
const EXIT_FATAL: i32 = 78;

fn has_mesh0(host: &mesh_e2e::Host) -> bool {
    ip(["-n", host.ns.as_str(), "link", "show", "mesh0"]).is_ok()
}

/// A lab with a controller serving network [`NET`], hosts named `hosts`, and a reusable token.
fn lab(label: &str, hosts: &[&str]) -> (Lab, Controller, Vec<mesh_e2e::Host>, String) {
    mesh_e2e::daemons::lab_with_network(label, NET, hosts).unwrap()
}

fn code(status: Option<ExitStatus>) -> Option<i32> {
    status.and_then(|s| s.code())
}

#[test]
fn a_removed_node_stops_with_its_address_gone_and_stays_down() {
    let (lab, ctl, hosts, token) = lab("removed", &["a", "b"]);
    let (ha, hb) = (&hosts[0], &hosts[1]);
    let a = Agent::join(&lab, ha, "a", &token).unwrap();
    let mut b = Agent::join(&lab, hb, "b", &token).unwrap();
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();
    let old = b.address;

    let out = ctl.admin(["node", "remove", NET, "b"]);
    assert!(out.success(), "{out}");
    let t = Instant::now();
    let status = b.wait_exit(Duration::from_secs(10));
    eprintln!("b exited {:?} after {:?}", status, t.elapsed());
    assert_eq!(code(status), Some(EXIT_FATAL), "{}", b.log());
    let log = b.stderr();
    assert!(log.contains("no longer a member of network cycle"), "{log}");
    assert!(
        !has_mesh0(hb),
        "mesh0 (with {old}) must be gone once the node is removed"
    );

    // A restart (what systemd would do without RestartPreventExitStatus) does not put the
    // address back: it refuses before mesh0 exists.
    let out = b.cli(["up"]);
    assert_eq!(out.code(), Some(EXIT_FATAL), "{out}");
    assert!(
        out.stderr.contains("was removed from network cycle"),
        "{out}"
    );
    assert!(out.stderr.contains("mesh join"), "{out}");
    assert!(!has_mesh0(hb));

    // Leaving cleans up even though the controller no longer knows the node.
    let out = b.cli(["leave"]);
    assert!(out.success(), "{out}");
    assert!(!b.state_dir.join("node.json").exists());
}

#[test]
fn leave_force_works_while_the_agent_runs_and_the_controller_is_gone() {
    let (lab, mut ctl, hosts, token) = lab("leaveforce", &["a"]);
    let ha = &hosts[0];
    let mut a = Agent::join(&lab, ha, "a", &token).unwrap();
    ctl.kill9();

    // Without --force: refused, and the error says what to do.
    let out = a.cli(["leave"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("mesh leave --force"), "{out}");
    assert!(a.is_running(), "a refused leave leaves the agent running");
    assert!(has_mesh0(ha));

    let t = Instant::now();
    let out = a.cli(["leave", "--force"]);
    eprintln!("leave --force took {:?}", t.elapsed());
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("left network cycle"), "{out}");
    assert!(
        out.stderr.contains("mesh-controller node remove cycle a"),
        "{out}"
    );
    assert!(
        a.wait_exit(Duration::from_secs(10)).is_some(),
        "agent stopped"
    );
    assert!(!has_mesh0(ha), "mesh0 and its address are gone");
    assert!(!a.state_dir.join("node.json").exists(), "state deleted");
}

#[test]
fn down_stops_the_agent_and_up_resumes_with_the_same_address() {
    let (lab, _ctl, hosts, token) = lab("down", &["a", "b"]);
    let (ha, hb) = (&hosts[0], &hosts[1]);
    let a = Agent::join(&lab, ha, "a", &token).unwrap();
    let mut b = Agent::join(&lab, hb, "b", &token).unwrap();
    let before = b.address;

    let out = b.cli(["down"]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("mesh up"), "{out}");
    assert_eq!(code(b.wait_exit(Duration::from_secs(10))), Some(0));
    assert!(!has_mesh0(hb), "down removes mesh0");
    assert_eq!(b.ip().unwrap(), before, "membership kept");
    assert!(!ha.ping(before), "b is down");

    assert_eq!(b.up().unwrap(), before);
    assert!(ha.wait_ping(before, Duration::from_secs(20)));
    drop(a);
}

#[test]
fn one_agent_per_state_directory() {
    let (lab, _ctl, hosts, token) = lab("owner", &["a"]);
    let ha = &hosts[0];
    let mut a = Agent::join(&lab, ha, "a", &token).unwrap();
    let pid = a.pid().unwrap();

    let expected = format!(
        "an agent already runs for state directory {} (pid {pid})",
        a.state_dir.display()
    );
    let out = a.cli(["up"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains(&expected), "{out}");
    assert!(!out.stderr.contains("resource busy"), "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "one line: {out}");

    let token_file = a.state_dir.with_extension("token");
    let out = a.cli([
        "join",
        "--token-file",
        token_file.to_str().unwrap(),
        "--name",
        "a",
    ]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains(&expected), "{out}");
    assert!(a.is_running(), "the running agent is untouched");
    assert_eq!(a.pid(), Some(pid));
}

/// A read-only bind mount of a directory onto itself, undone when dropped.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn mount(dir: &Path) -> ReadOnly {
        let d = dir.to_str().unwrap();
        let run = |args: &[&str]| {
            let s = std::process::Command::new("mount")
                .args(args)
                .status()
                .unwrap();
            assert!(s.success(), "mount {args:?}");
        };
        run(&["--bind", d, d]);
        let guard = ReadOnly(dir.to_owned());
        run(&["-o", "remount,bind,ro", d]);
        guard
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_read_only_state_directory_fails_before_mesh0_exists() {
    let (lab, _ctl, hosts, token) = lab("readonly", &["a"]);
    let ha = &hosts[0];
    let mut a = Agent::join(&lab, ha, "a", &token).unwrap();
    a.stop();
    // (A stopped agent leaves mesh0 for a quick restart; take it away to see that the failed
    // start does not create it.)
    ip(["-n", ha.ns.as_str(), "link", "del", "mesh0"]).unwrap();

    let ro = ReadOnly::mount(&a.state_dir);
    let out = a.cli(["up"]);
    drop(ro);
    assert_eq!(out.code(), Some(EXIT_FATAL), "{out}");
    assert!(out.stderr.contains("cannot be written"), "{out}");
    assert!(!has_mesh0(ha), "nothing touched mesh0");
}

#[test]
fn join_waits_for_a_controller_that_starts_later() {
    let (lab, mut ctl, hosts, token) = lab("latectl", &["a"]);
    let ha = &hosts[0];
    ctl.stop();

    // The controller VM boots 20 s after the node runs its cloud-init.
    const LATE: Duration = Duration::from_secs(20);
    let started = Instant::now();
    let joined = std::thread::scope(|s| {
        let join = s.spawn(|| {
            let mut a = Agent::idle(&lab, ha, "a").unwrap();
            let out = a.cli([
                "join",
                "--no-daemon",
                "--token-file",
                write_token_file(&a.state_dir, &token)
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "--name",
                "a",
            ]);
            let took = started.elapsed();
            let up = out.success().then(|| a.up());
            (out, took, up.map(|r| r.map_err(|e| e.to_string())))
        });
        std::thread::sleep(LATE);
        ctl.serve().unwrap();
        join.join().unwrap()
    });
    let (out, took, up) = joined;
    eprintln!("join with the controller {LATE:?} late took {took:?}");
    assert!(out.success(), "{out}");
    assert!(took >= LATE, "it really waited: {took:?}");
    assert!(
        out.stderr.contains("does not answer yet"),
        "progress shown: {out}"
    );
    let addr = up.unwrap().unwrap();
    assert!(wait_until(Duration::from_secs(5), || ip([
        "-n",
        ha.ns.as_str(),
        "-4",
        "addr",
        "show",
        "mesh0"
    ])
    .is_ok_and(|s| s.contains(&addr.to_string()))));
}

#[test]
fn names_are_never_changed_behind_the_users_back() {
    let (lab, _ctl, hosts, token) = lab("names", &["a", "b"]);
    let (ha, hb) = (&hosts[0], &hosts[1]);
    let a = Agent::join(&lab, ha, "web", &token).unwrap();

    // An explicit --name that another node holds: refused, naming the holder and the fix.
    let b = Agent::idle(&lab, hb, "b").unwrap();
    let token_file = write_token_file(&b.state_dir, &token).unwrap();
    let token_file = token_file.to_str().unwrap();
    let out = b.cli([
        "join",
        "--no-daemon",
        "--token-file",
        token_file,
        "--name",
        "web",
    ]);
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr
            .contains(&format!("the name \"web\" is taken by node {}", a.address)),
        "{out}"
    );
    assert!(
        out.stderr.contains("mesh-controller node remove cycle web"),
        "{out}"
    );
    assert!(
        !b.state_dir.join("node.json").exists(),
        "no membership saved"
    );

    // The implicit name (the hostname, the same for every namespace here): the second node
    // gets a suffix, and is told so with the same advice.
    let c = Agent::idle(&lab, hb, "c").unwrap();
    let c_token = write_token_file(&c.state_dir, &token).unwrap();
    let out = c.cli([
        "join",
        "--no-daemon",
        "--token-file",
        c_token.to_str().unwrap(),
    ]);
    assert!(out.success(), "{out}");
    // "joined network cycle as NAME with address ..."
    let host = out
        .stdout
        .split(" as ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let d = Agent::idle(&lab, hb, "d").unwrap();
    let d_token = write_token_file(&d.state_dir, &token).unwrap();
    let out = d.cli([
        "join",
        "--no-daemon",
        "--token-file",
        d_token.to_str().unwrap(),
    ]);
    assert!(out.success(), "{out}");
    assert!(!out.stdout.contains(&format!(" as {host} ")), "{out}");
    assert!(out.stderr.contains("is taken"), "{out}");
    assert!(
        out.stderr
            .contains(&format!("mesh-controller node remove cycle {host}")),
        "{out}"
    );
}

#[test]
fn a_controller_moves_to_the_address_it_announced_and_nodes_follow() {
    let mut lab = Lab::new("move").unwrap();
    let old_host = lab.add_controller_host("ctl").unwrap();
    let new_host = lab.add_host_at("ctl-new", 2).unwrap();
    let (ha, hb) = (lab.add_host("a").unwrap(), lab.add_host("b").unwrap());
    let state = lab.state_dir("ctl").unwrap();
    let new_addr = format!("{}:{}", new_host.ip, mesh_e2e::CONTROL_PORT);
    // Before the move, the controller announces where it is going.
    let mut ctl = Controller::start_with_args(
        &lab,
        &old_host,
        &state,
        mesh_e2e::CONTROL_PORT,
        &["--announce", &new_addr],
    )
    .unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(&lab, &ha, "a", &token).unwrap();
    let b = Agent::join(&lab, &hb, "b", &token).unwrap();
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();
    let saved = std::fs::read_to_string(a.state_dir.join("node.json")).unwrap();
    assert!(
        saved.contains(&new_addr),
        "the node saved the address: {saved}"
    );

    // The move: the old address goes dark, the same state directory serves at the new one.
    ctl.stop();
    let _moved = Controller::start_with(&lab, &new_host, &state, mesh_e2e::CONTROL_PORT).unwrap();
    let t = Instant::now();
    let followed = wait_until(Duration::from_secs(60), || {
        [&a, &b].iter().all(|n| {
            n.status().is_ok_and(|v| {
                v["controller"]["connected"] == true && v["controller"]["address"] == new_addr
            })
        })
    });
    eprintln!("nodes followed the controller after {:?}", t.elapsed());
    assert!(followed, "{:#}", a.status().unwrap()["controller"]);
    // Nobody joined again: same addresses, and the overlay works.
    assert_eq!(a.ip().unwrap(), a.address);
    assert!(ha.wait_ping(b.address, Duration::from_secs(10)));
}
