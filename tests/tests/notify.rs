//! The agent under a minimal systemd-style supervisor: READY=1 comes only once the overlay
//! address is on mesh0, and `mesh wait-online` returns exactly when the node is usable.
#![allow(clippy::unwrap_used)]

use mesh_e2e::process::Proc;
use mesh_e2e::{mesh_bin, netns::ip, wait_until, Agent, Controller, Lab};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NET: &str = "notify";

fn has_overlay_address(ns: &str) -> bool {
    ip(["-n", ns, "-4", "addr", "show", "dev", "mesh0"])
        .map(|o| o.contains("inet 100.64."))
        .unwrap_or(false)
}

/// `mesh wait-online` started in the background, in a namespace.
fn wait_online(ns: &str, state_dir: &std::path::Path, args: &[&str]) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(mesh_bin().unwrap())
        .arg("wait-online")
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn ready_and_wait_online_only_once_the_address_is_up() {
    let mut lab = Lab::new("notify").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let a_host = lab.add_host("a").unwrap();
    let b_host = lab.add_host("b").unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let a_state = lab.state_dir("a").unwrap();

    // Started before the node even joined: it must wait, not fail.
    let mut waiter = wait_online(&a_host.ns, &a_state, &["--timeout", "40s"]);

    // The supervisor: a datagram socket the agent reports to, as systemd's NOTIFY_SOCKET.
    let sock_path = lab.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify_env = format!("NOTIFY_SOCKET={}", sock_path.display());
    let mesh = mesh_bin().unwrap();
    let state_arg = a_state.to_str().unwrap().to_owned();
    let _agent = Proc::spawn(
        &a_host.ns,
        &lab.log_dir(),
        "a-join-notify",
        "env",
        [
            notify_env.as_str(),
            mesh.to_str().unwrap(),
            "join",
            token.as_str(),
            "--name",
            "a",
            "--state-dir",
            state_arg.as_str(),
        ],
    )
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    let ready_with_address = loop {
        assert!(Instant::now() < deadline, "no READY=1; got {messages:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let ready = msg.lines().any(|l| l == "READY=1");
            // Checked the moment READY arrives: the address must already be there.
            let present = has_overlay_address(&a_host.ns);
            messages.push(msg);
            if ready {
                break present;
            }
        } else {
            // Until READY, the supervisor would keep kubelet waiting; nothing to check.
        }
    };
    assert!(
        ready_with_address,
        "READY=1 before the address was on mesh0: {messages:?}"
    );
    let status_line = messages
        .iter()
        .flat_map(|m| m.lines())
        .find(|l| l.starts_with("STATUS="));
    assert!(
        status_line.is_some_and(|l| l.contains("100.64.") && l.contains("mesh0")),
        "STATUS names the address: {messages:?}"
    );

    // The waiter started before the join returns now, successfully, with the address up.
    assert!(wait_until(Duration::from_secs(10), || matches!(
        waiter.try_wait(),
        Ok(Some(_))
    )));
    let out = waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(has_overlay_address(&a_host.ns));

    // With --peers, it waits for peers that answer: none yet, so it times out and says why.
    let out = wait_online(&a_host.ns, &a_state, &["--timeout", "1s", "--peers", "1"])
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("answering peers") && err.lines().count() == 1,
        "{err}"
    );

    // Once b joins, it returns as soon as b answers.
    let peers_waiter = wait_online(&a_host.ns, &a_state, &["--timeout", "30s", "--peers", "1"]);
    let _b = Agent::join(&lab, &b_host, "b", &token).unwrap();
    let out = peers_waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&sock_path);
}

#[test]
fn wait_online_times_out_with_a_reason() {
    let dir = std::env::temp_dir().join(format!("mesh-wo-none-{}", std::process::id()));
    let out = Command::new(mesh_bin().unwrap())
        .args(["wait-online", "--timeout", "300ms", "--state-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not online after 300ms") && err.contains("mesh join"),
        "{err}"
    );
}

/// A node that asks by network id, as mesh.service runs it: while it waits for the approval,
/// systemd hears the approve command as STATUS= and EXTEND_TIMEOUT_USEC= (so the unit's start
/// does not time out) and no READY=1; once approved, READY=1 comes with the address on mesh0.
#[test]
fn a_node_waiting_for_approval_extends_the_start_and_says_why() {
    let mut lab = Lab::new("notify-ask").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let a_host = lab.add_host("a").unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let id = ctl.network_id(NET).unwrap();
    let a_state = lab.state_dir("a").unwrap();
    let mut waiter = wait_online(&a_host.ns, &a_state, &["--timeout", "60s"]);
    let sock_path = lab.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify_env = format!("NOTIFY_SOCKET={}", sock_path.display());
    let mesh = mesh_bin().unwrap();
    let state_arg = a_state.to_str().unwrap().to_owned();
    let _agent = Proc::spawn(
        &a_host.ns,
        &lab.log_dir(),
        "a-ask-notify",
        "env",
        [
            notify_env.as_str(),
            mesh.to_str().unwrap(),
            "join",
            id.as_str(),
            "--name",
            "a",
            "--state-dir",
            state_arg.as_str(),
        ],
    )
    .unwrap();
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    let lines = |messages: &Vec<String>| -> Vec<String> {
        messages
            .iter()
            .flat_map(|m| m.lines().map(str::to_owned))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "no waiting status; got {messages:?}"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let l = lines(&messages);
        if l.iter().any(|l| l.starts_with("EXTEND_TIMEOUT_USEC="))
            && l.iter().any(|l| {
                l.starts_with("STATUS=waiting for approval of node a")
                    && l.contains("mesh-controller node approve notify a")
            })
        {
            break;
        }
    }
    assert!(
        !lines(&messages).iter().any(|l| l == "READY=1"),
        "{messages:?}"
    );
    assert!(!has_overlay_address(&a_host.ns));
    assert!(
        matches!(waiter.try_wait(), Ok(None)),
        "wait-online waits too"
    );

    let out = ctl.admin(["node", "approve", NET, "a"]);
    assert!(out.success(), "{out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let ready_with_address = loop {
        assert!(Instant::now() < deadline, "no READY=1; got {messages:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let ready = msg.lines().any(|l| l == "READY=1");
            let present = has_overlay_address(&a_host.ns);
            messages.push(msg);
            if ready {
                break present;
            }
        }
    };
    assert!(
        ready_with_address,
        "READY=1 before the address: {messages:?}"
    );
    let out = waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&sock_path);
}
