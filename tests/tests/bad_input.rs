//! Bad input: every refused join says why in one line and exits non-zero; garbage on the wire
//! is counted and dropped.
#![allow(clippy::unwrap_used)]

use mesh_e2e::daemons::write_token_file;
use mesh_e2e::{
    assert_clean_failure, mesh_bin, netns::ip, run, run_with_timeout, wait_all_pairs_ping,
    wait_until, Agent, Controller, Host, Lab, Output, AGENT_PORT,
};
use serde_json::Value;
use std::net::SocketAddrV4;
use std::path::Path;
use std::time::Duration;

const NET: &str = "lab";
/// A refused join must fail well before this.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// One `mesh join --token-file FILE --name NAME --state-dir DIR EXTRA...` in `host`, expected
/// to fail. (A token on the command line works too, with a warning line of its own: see
/// `local_security.rs`.)
fn join_once(host: &Host, state_dir: &Path, token: &str, extra: &[&str]) -> Output {
    let token_file = write_token_file(state_dir, token).unwrap();
    let mut args = vec![
        "join".to_string(),
        "--token-file".into(),
        token_file.display().to_string(),
        "--name".into(),
        host.name.clone(),
        "--state-dir".into(),
        state_dir.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run_with_timeout(&host.ns, mesh_bin().unwrap(), args, JOIN_TIMEOUT)
}

/// A refused join leaves no TUN interface behind.
fn assert_no_tun(host: &Host) {
    let links = ip(["-n", &host.ns, "-o", "link"]).unwrap();
    assert!(
        !links.contains("mesh0"),
        "a refused join left an interface behind: {links}"
    );
}

fn lab_with_controller(label: &str) -> (Lab, Controller, Host) {
    let mut lab = Lab::new(label).unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let host = lab.add_host("node").unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    (lab, ctl, host)
}

#[test]
fn garbage_tokens_are_refused() {
    let mut lab = Lab::new("garbage-token").unwrap();
    let host = lab.add_host("node").unwrap();
    let state = lab.state_dir("node").unwrap();
    for token in ["mesh1_garbage", "hello"] {
        let out = join_once(&host, &state, token, &["--connect-timeout", "2s"]);
        assert_clean_failure(&out, &["token"]);
        assert_no_tun(&host);
    }
    let out = run(
        &host.ns,
        mesh_bin().unwrap(),
        ["status", "--state-dir", state.to_str().unwrap()],
    );
    assert!(
        !out.success() && !out.timed_out,
        "`mesh status` without a daemon should fail: {out}"
    );
}

#[test]
fn expired_token_is_refused() {
    let (lab, ctl, host) = lab_with_controller("expired-token");
    let token = ctl.create_token(NET, &["--expires", "1s"]).unwrap();
    // Waiting on the wall clock for the expiry itself, not on readiness.
    std::thread::sleep(Duration::from_millis(2100));
    let out = join_once(&host, &lab.state_dir("node").unwrap(), &token, &[]);
    assert_clean_failure(&out, &["expired"]);
    assert_no_tun(&host);
    assert!(ctl.nodes(NET).unwrap().is_empty());
}

#[test]
fn revoked_token_is_refused() {
    let (lab, ctl, host) = lab_with_controller("revoked-token");
    let ids = |tokens: Vec<Value>| -> Vec<String> {
        tokens
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = ids(ctl.tokens().unwrap());
    let token = ctl.create_token(NET, &[]).unwrap();
    let new: Vec<String> = ids(ctl.tokens().unwrap())
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert_eq!(
        new.len(),
        1,
        "token list should show the new token: {new:?}"
    );
    ctl.admin(["token", "revoke", new[0].as_str()])
        .ok()
        .unwrap();
    let listed = ctl.tokens().unwrap();
    let entry = listed.iter().find(|t| t["id"] == new[0].as_str()).unwrap();
    assert_eq!(entry["revoked"], true, "{entry:#}");
    assert_eq!(entry["network"], NET, "{entry:#}");

    let out = join_once(&host, &lab.state_dir("node").unwrap(), &token, &[]);
    assert_clean_failure(&out, &["revoked"]);
    assert_no_tun(&host);
    assert!(ctl.nodes(NET).unwrap().is_empty());
}

#[test]
fn unreachable_controller_is_reported() {
    let (lab, ctl, host) = lab_with_controller("unreachable");
    // A real token of this controller, but pointing at an address where nothing listens.
    let token = ctl
        .create_token(NET, &["--controller", "192.0.2.99:7443"])
        .unwrap();
    let out = join_once(
        &host,
        &lab.state_dir("node").unwrap(),
        &token,
        // (Without --wait-controller 0s a join keeps trying for a minute: a controller
        // that does not answer may still be booting.)
        &["--connect-timeout", "2s", "--wait-controller", "0s"],
    );
    let line = assert_clean_failure(&out, &["reach"]);
    // The cause, in words: here the address takes the packets and nothing answers.
    assert!(
        line.contains("QUIC: no answer from 192.0.2.99:7443"),
        "{line}"
    );
    assert!(
        out.elapsed < Duration::from_secs(10),
        "--connect-timeout 2s took {:?}",
        out.elapsed
    );
    assert_no_tun(&host);
}

#[test]
fn controller_with_another_key_is_refused() {
    let (lab, mut ctl, host) = lab_with_controller("wrong-key");
    let token = ctl.create_token(NET, &[]).unwrap();
    ctl.stop();
    // Another controller, with a fresh state (so another key), on the very same address.
    let other_state = lab.state_dir("ctl-impostor").unwrap();
    let impostor =
        Controller::start_with(&lab, &ctl.host, &other_state, ctl.listen.port()).unwrap();
    impostor.create_network(NET).unwrap();
    let out = join_once(
        &host,
        &lab.state_dir("node").unwrap(),
        &token,
        &["--connect-timeout", "5s"],
    );
    assert_clean_failure(&out, &["key"]);
    assert_no_tun(&host);
    assert!(impostor.nodes(NET).unwrap().is_empty());
}

#[test]
fn missing_tun_permission_is_reported() {
    let (lab, ctl, host) = lab_with_controller("no-tun-permission");
    let token = ctl.create_token(NET, &[]).unwrap();
    let state = lab.state_dir("nobody").unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let mesh = mesh_bin().unwrap();
    let as_nobody = |args: &[&str]| {
        let mut all = vec![
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            mesh.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        run_with_timeout(&host.ns, "setpriv", all, JOIN_TIMEOUT)
    };
    // First make sure `nobody` can run the binary at all, so that a "permission denied" below
    // comes from mesh and not from exec.
    let help = as_nobody(&["--help"]);
    assert!(
        help.success(),
        "`nobody` cannot run {}: {help}",
        mesh.display()
    );

    let token_file = write_token_file(&state, &token).unwrap();
    std::os::unix::fs::chown(&token_file, Some(65534), Some(65534)).unwrap();
    let out = as_nobody(&[
        "join",
        "--token-file",
        token_file.to_str().unwrap(),
        "--name",
        "nobody",
        "--state-dir",
        state.to_str().unwrap(),
        "--connect-timeout",
        "5s",
    ]);
    let line = assert_clean_failure(&out, &["permission", "tun"]);
    assert!(!line.starts_with("setpriv"), "{out}");
    assert_no_tun(&host);
}

/// The agent's malformed-packet counter, from `mesh status --json`.
fn malformed(agent: &Agent) -> u64 {
    let status = agent.status().unwrap();
    status["counters"]["malformed_packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no counters.malformed_packets: {status:#}"))
}

#[test]
fn malformed_udp_is_counted_and_survived() {
    let (mut lab, mut ctl, host_a) = lab_with_controller("malformed-udp");
    let host_b = lab.add_host("b").unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let port = AGENT_PORT.to_string();
    let mut a = Agent::join_with(&lab, &host_a, "a", &token, &["--port", &port]).unwrap();
    let b = Agent::join_with(&lab, &host_b, "b", &token, &["--port", &port]).unwrap();
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();
    let before = malformed(&a);

    let mut stun_like = vec![0x00, 0x01, 0xff, 0xff, 0x21, 0x12, 0xa4, 0x42];
    stun_like.extend_from_slice(&[0xee; 12]);
    let payloads: Vec<Vec<u8>> = vec![
        b"\x00garbage".to_vec(),
        vec![0x20, 0xff],
        vec![0x05, 0, 0, 0, 1, 2, 3],
        vec![0x01],
        vec![0x01, 0, 0, 0, 9, 9, 9, 9, 9, 9],
        [vec![0x04, 0, 0, 0], vec![0; 40]].concat(),
        [vec![0x02, 0, 0, 0], vec![0xab; 300]].concat(),
        [vec![0xc0, 0, 0, 0, 1], vec![0x55; 50]].concat(),
        vec![0x3f; 1400],
        stun_like,
        b"garbage\n".to_vec(),
    ];
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let udp = Path::new(env!("CARGO_BIN_EXE_mesh-e2e-udp"));
    // From a host that is no peer: the controller's, to the agent and to the controller.
    for _ in 0..3 {
        ctl.host.send_udp(udp, a.underlay(), &refs).ok().unwrap();
        ctl.host
            .send_udp(
                udp,
                SocketAddrV4::new(ctl.host.ip, ctl.listen.port()),
                &refs,
            )
            .ok()
            .unwrap();
    }

    let mut now = before;
    let counted = wait_until(Duration::from_secs(10), || {
        now = malformed(&a);
        now > before
    });
    assert!(
        counted,
        "counters.malformed_packets stayed at {before} after {} garbage datagrams (now {now})",
        3 * refs.len()
    );
    assert!(a.is_running(), "the agent died on garbage:\n{}", a.log());
    assert!(
        ctl.is_running(),
        "the controller died on garbage:\n{}",
        ctl.log()
    );
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();
}
