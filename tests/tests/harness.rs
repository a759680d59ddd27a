//! Checks of the harness itself; they need no product binary.
#![allow(clippy::unwrap_used)]

use mesh_e2e::{netns::ip, run, run_with_timeout, wait_until, Lab};
use std::time::{Duration, Instant};

#[test]
fn lab_hosts_reach_each_other_and_are_cleaned_up() {
    let mut lab = Lab::new("harness-ping").unwrap();
    let ctl = lab.add_controller_host("ctl").unwrap();
    let a = lab.add_host("a").unwrap();
    let b = lab.add_host("b").unwrap();
    assert_eq!(ctl.ip.to_string(), "192.0.2.1");
    assert_eq!(a.ip.to_string(), "192.0.2.11");
    assert_eq!(b.ip.to_string(), "192.0.2.12");
    for ns in lab.namespaces() {
        assert!(ns.len() <= 15, "namespace name {ns} too long");
    }
    for (from, to) in [(&a, &b), (&b, &a), (&ctl, &a), (&b, &ctl)] {
        assert!(
            from.wait_ping(to.ip, Duration::from_secs(10)),
            "{} cannot ping {}",
            from.name,
            to.name
        );
    }
    // Nothing answers on an address no host has.
    assert!(!a.ping("192.0.2.99".parse().unwrap()));

    // A daemon in a host shows up in `ip netns pids` and is killed with the lab.
    let mut sleeper = lab.spawn(&a, "sleeper", "sleep", ["300"]).unwrap();
    let pid = sleeper.pid();
    assert!(wait_until(Duration::from_secs(5), || ip([
        "netns", "pids", &a.ns
    ])
    .unwrap()
    .split_whitespace()
    .any(|p| p == pid.to_string())));
    let status = sleeper.stop().unwrap();
    assert!(!status.success(), "sleep killed by SIGTERM: {status:?}");
    drop(sleeper);

    let names = lab.namespaces();
    let dir = lab.dir().to_path_buf();
    assert!(dir.is_dir());
    drop(lab);
    let list = ip(["netns", "list"]).unwrap();
    for n in names {
        assert!(
            !list.split_whitespace().any(|w| w == n),
            "namespace {n} left behind"
        );
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn proc_logs_stop_and_kill() {
    let mut lab = Lab::new("harness-proc").unwrap();
    let h = lab.add_host("h").unwrap();

    let mut talker = lab
        .spawn(
            &h,
            "talker",
            "bash",
            ["-c", "echo out-line; echo err-line >&2; exec sleep 300"],
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || talker
        .stderr()
        .contains("err-line")));
    assert!(talker.stdout().contains("out-line"));
    assert!(talker.is_running());
    assert!(talker.log().contains("err-line"));

    // A process that ignores SIGTERM is SIGKILLed after the grace time.
    let mut stubborn = lab
        .spawn(
            &h,
            "stubborn",
            "bash",
            [
                "-c",
                "trap '' TERM; echo trapped; while :; do sleep 0.2; done",
            ],
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || stubborn
        .stdout()
        .contains("trapped")));
    let start = Instant::now();
    let status = stubborn.stop_within(Duration::from_millis(500)).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(!stubborn.is_running());

    let status = talker.kill9().unwrap();
    assert_eq!(status.signal(), Some(9));
}

#[test]
fn run_reports_output_and_times_out() {
    let mut lab = Lab::new("harness-run").unwrap();
    let h = lab.add_host("h").unwrap();

    let out = run(&h.ns, "bash", ["-c", "echo hi; echo oops >&2; exit 3"]);
    assert_eq!(out.code(), Some(3));
    assert_eq!(out.stdout, "hi\n");
    assert_eq!(out.stderr, "oops\n");
    assert!(!out.success());

    // Commands run inside the namespace: it has lo and eth0 only.
    let links = run(&h.ns, "ip", ["-o", "link"]).ok().unwrap().stdout;
    assert_eq!(links.lines().count(), 2, "{links}");

    let start = Instant::now();
    let out = run_with_timeout(&h.ns, "sleep", ["30"], Duration::from_millis(300));
    assert!(out.timed_out);
    assert!(!out.success());
    assert!(start.elapsed() < Duration::from_secs(5));
}
