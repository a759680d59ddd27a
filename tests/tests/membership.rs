//! Membership changes: joins, leaves and removals reach every connected node within a second,
//! and `mesh leave` cleans up after itself (with or without a running daemon).
#![allow(clippy::unwrap_used)]

use mesh_e2e::{netns::ip, wait_all_pairs_ping, wait_until, Agent, Controller, Lab};
use std::time::{Duration, Instant};

const NET: &str = "members";

#[test]
fn joins_leaves_and_removals_reach_everyone_within_a_second() {
    let mut lab = Lab::new("membership").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let hosts: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| lab.add_host(n).unwrap())
        .collect();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a = Agent::join(&lab, &hosts[0], "a", &token).unwrap();
    let mut b = Agent::join(&lab, &hosts[1], "b", &token).unwrap();
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();

    // A join: a learns of c within a second of c being up.
    let c = Agent::join(&lab, &hosts[2], "c", &token).unwrap();
    let t = Instant::now();
    assert!(wait_until(Duration::from_secs(1), || a
        .peer_names()
        .contains(&"c".to_owned())));
    eprintln!("join reached a after {:?}", t.elapsed());
    wait_all_pairs_ping(&[&a, &b, &c], Duration::from_secs(20)).unwrap();

    // A leave: b leaves; a and c drop it within a second; b's state and mesh0 are gone.
    let out = b.cli(["leave"]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("left network members"), "{out}");
    let t = Instant::now();
    assert!(wait_until(Duration::from_secs(1), || {
        !a.peer_names().contains(&"b".to_owned()) && !c.peer_names().contains(&"b".to_owned())
    }));
    eprintln!("leave reached a and c after {:?}", t.elapsed());
    assert!(
        wait_until(Duration::from_secs(5), || !b.is_running()),
        "b's daemon stopped"
    );
    assert!(!b.cli(["ip"]).success(), "b's state is deleted");
    assert!(
        ip(["-n", hosts[1].ns.as_str(), "link", "show", "mesh0"]).is_err(),
        "b's mesh0 is deleted"
    );
    let names: Vec<String> = ctl
        .nodes(NET)
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec!["a".to_owned(), "c".to_owned()]);

    // A removal by the admin: a drops c within a second.
    let out = ctl.admin(["node", "remove", NET, "c"]);
    assert!(out.success(), "{out}");
    let t = Instant::now();
    assert!(wait_until(Duration::from_secs(1), || !Agent::peer_names(
        &a
    )
    .contains(&"c".to_owned())));
    eprintln!("removal reached a after {:?}", t.elapsed());
    // c is told, and its traffic no longer gets in.
    assert!(!hosts[2].ping(a.address));

    // `mesh leave` without a daemon: d joins, its daemon stops, then it leaves.
    let mut d = Agent::join(&lab, &hosts[3], "d", &token).unwrap();
    assert!(wait_until(Duration::from_secs(1), || a
        .peer_names()
        .contains(&"d".to_owned())));
    d.stop();
    let out = d.cli(["leave"]);
    assert!(out.success(), "{out}");
    assert!(wait_until(Duration::from_secs(1), || !Agent::peer_names(
        &a
    )
    .contains(&"d".to_owned())));
    assert!(!d.cli(["ip"]).success());
}
