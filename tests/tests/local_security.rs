//! What other local users can see and do on a node: the join token never stays in the
//! daemon's command line, environment or logs; the local API socket answers only root and its
//! group, with a clear refusal for everyone else; tokens expire by default.
#![allow(clippy::unwrap_used)]

use mesh_e2e::daemons::write_token_file;
use mesh_e2e::{
    assert_clean_failure, mesh_bin, run, wait_all_pairs_ping, Agent, Controller, Lab, Output,
};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

const NET: &str = "local";
/// uid and gid of `nobody`.
const NOBODY: u32 = 65534;
/// A group no account has, for the socket's group.
const MESH_GROUP: u32 = 4242;

/// The 32-byte secret of a `mesh1_` token (its last 32 bytes), as lowercase hex: the form the
/// agent sends to the controller, which must not show up in any log either.
fn secret_hex(token: &str) -> String {
    let body = token.strip_prefix("mesh1_").unwrap();
    let mut bits = 0u32;
    let mut n = 0;
    let mut bytes = Vec::new();
    for c in body.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("not base64url: {c}"),
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            bytes.push((bits >> n) as u8);
        }
    }
    bytes[bytes.len() - 32..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Asserts that `text` (named `what`) shows neither the token nor its secret.
fn assert_no_token(what: &str, text: &str, token: &str) {
    let body = &token["mesh1_".len()..];
    assert!(
        !text.contains(body) && !text.contains(&body[body.len() - 40..]),
        "{what} shows the join token:\n{text}"
    );
    assert!(
        !text.contains(&secret_hex(token)),
        "{what} shows the token's secret:\n{text}"
    );
}

fn proc_file(pid: u32, file: &str) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/{file}"))
        .unwrap()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .filter(|a| !a.is_empty())
        .collect()
}

/// The daemon, still the process the harness started (same PID), now runs as `mesh up` and
/// holds the token neither in its argv nor in its environment.
fn assert_clean_daemon(agent: &Agent, token: &str) {
    let pid = agent.pid().unwrap();
    let argv = proc_file(pid, "cmdline");
    assert!(
        argv.iter().any(|a| a == "up"),
        "{} (pid {pid}) should run as `mesh up` after the join: {argv:?}",
        agent.name
    );
    assert_no_token(
        &format!("{}'s /proc/{pid}/cmdline", agent.name),
        &argv.join(" "),
        token,
    );
    let env = proc_file(pid, "environ");
    assert!(
        !env.iter().any(|e| e.starts_with("MESH_TOKEN=")),
        "{}'s environment still holds MESH_TOKEN",
        agent.name
    );
    assert_no_token(
        &format!("{}'s /proc/{pid}/environ", agent.name),
        &env.join(" "),
        token,
    );
}

/// Lines of `text` that warn about a token on the command line.
fn argv_warnings(text: &str) -> usize {
    text.lines()
        .filter(|l| l.contains("warning") && l.contains("command line"))
        .count()
}

#[test]
fn the_join_token_never_stays_with_the_daemon() {
    let mut lab = Lab::new("join-token").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let hosts: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| lab.add_host(n).unwrap())
        .collect();
    let mut ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();

    // Tokens expire after 24 h unless told otherwise; `--expires never` opts out.
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let after_first = ctl.tokens().unwrap();
    let forever = ctl.create_token(NET, &["--expires", "never"]).unwrap();
    assert_ne!(forever, token);
    let listed = ctl.tokens().unwrap();
    assert_eq!((after_first.len(), listed.len()), (1, 2), "{listed:?}");
    let first_id = &after_first[0]["id"];
    let row = |id_is_first: bool| {
        listed
            .iter()
            .find(|r| (&r["id"] == first_id) == id_is_first)
            .unwrap()
            .clone()
    };
    assert!(
        row(true)["expires_at"].is_string(),
        "a token created without --expires must expire (24 h): {listed:?}"
    );
    assert!(row(false)["expires_at"].is_null(), "{listed:?}");
    let table = ctl.admin(["token", "list"]).ok().unwrap();
    assert!(table.stdout.contains("never"), "{table}");

    let mesh = mesh_bin().unwrap();
    let mesh = mesh.to_str().unwrap();
    // a: --token-file (the harness's way), the recommended form.
    let a = Agent::join(&lab, &hosts[0], "a", &token).unwrap();
    // b: on the command line, still accepted, with one warning.
    let b_state = lab.state_dir("b").unwrap();
    let b = Agent::spawn(
        &lab,
        &hosts[1],
        "b",
        mesh,
        [
            "join",
            &token,
            "--name",
            "b",
            "--state-dir",
            b_state.to_str().unwrap(),
        ],
    )
    .unwrap();
    // c: on standard input (`mesh join -`); `exec` keeps the PID the harness holds.
    let c_state = lab.state_dir("c").unwrap();
    let c_token = write_token_file(&c_state, &token).unwrap();
    let c = Agent::spawn(
        &lab,
        &hosts[2],
        "c",
        "sh",
        [
            "-c",
            "exec \"$0\" join - --name c --state-dir \"$1\" < \"$2\"",
            mesh,
            c_state.to_str().unwrap(),
            c_token.to_str().unwrap(),
        ],
    )
    .unwrap();
    // d: in MESH_TOKEN.
    let d_state = lab.state_dir("d").unwrap();
    let env = format!("MESH_TOKEN={token}");
    let d = Agent::spawn(
        &lab,
        &hosts[3],
        "d",
        "env",
        [
            env.as_str(),
            mesh,
            "join",
            "--name",
            "d",
            "--state-dir",
            d_state.to_str().unwrap(),
        ],
    )
    .unwrap();

    let agents = [&a, &b, &c, &d];
    wait_all_pairs_ping(&agents, Duration::from_secs(30)).unwrap();
    for agent in agents {
        assert_clean_daemon(agent, &token);
        assert_no_token(&format!("{}'s log", agent.name), &agent.stderr(), &token);
    }
    eprintln!("b's daemon: {:?}", proc_file(b.pid().unwrap(), "cmdline"));
    assert_eq!(
        argv_warnings(&b.stderr()),
        1,
        "one warning for a token on the command line:\n{}",
        b.stderr()
    );
    let warning = b
        .stderr()
        .lines()
        .find(|l| l.contains("warning"))
        .unwrap()
        .to_owned();
    assert!(
        warning.contains("--token-file") && warning.contains("MESH_TOKEN"),
        "the warning names the safer forms: {warning}"
    );
    for agent in [&a, &c, &d] {
        assert_eq!(argv_warnings(&agent.stderr()), 0, "{}", agent.stderr());
    }
    assert_no_token("the controller's log", &ctl.log(), &token);

    // --no-daemon with the token on stdin: joins, prints, exits; then `mesh up` as systemd would.
    let e_host = lab.add_host("e").unwrap();
    let e_state = lab.state_dir("e").unwrap();
    let e_token = write_token_file(&e_state, &token).unwrap();
    let out = run(
        &e_host.ns,
        "sh",
        [
            "-c",
            "exec \"$0\" join --token-file - --no-daemon --name e --state-dir \"$1\" < \"$2\"",
            mesh,
            e_state.to_str().unwrap(),
            e_token.to_str().unwrap(),
        ],
    );
    assert!(
        out.success() && out.stdout.contains("joined network"),
        "{out}"
    );
    assert_no_token("`mesh join --no-daemon`'s output", &out.to_string(), &token);
    let mut e = Agent::idle(&lab, &e_host, "e").unwrap();
    e.up().unwrap();
    wait_all_pairs_ping(&[&a, &e], Duration::from_secs(30)).unwrap();

    // A token that cannot be read or parsed: one line that names the source, not the token.
    let out = e.cli(["join", "--token-file", "/nonexistent/token", "--name", "x"]);
    assert_clean_failure(&out, &["/nonexistent/token"]);
    let damaged = &token[..token.len() - 3];
    let bad_file = write_token_file(&lab.state_dir("bad").unwrap(), damaged).unwrap();
    let out = e.cli([
        "join",
        "--token-file",
        bad_file.to_str().unwrap(),
        "--name",
        "x",
    ]);
    let line = assert_clean_failure(&out, &["damaged"]);
    assert!(line.contains(bad_file.to_str().unwrap()), "{line}");
    assert_no_token("a refused token's error", &out.to_string(), damaged);
    let out = e.cli(["join", "--name", "x"]);
    assert_clean_failure(&out, &["--token-file"]);
    ctl.stop();
}

/// `mesh ARGS --state-dir DIR` as `nobody` with the given groups, in `ns`.
fn as_user(ns: &str, gid: u32, groups: &[u32], args: &[&str], state: &Path) -> Output {
    let mesh = mesh_bin().unwrap();
    let reuid = format!("--reuid={NOBODY}");
    let regid = format!("--regid={gid}");
    let groups_arg = if groups.is_empty() {
        "--clear-groups".to_owned()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let mut all = vec![
        reuid.as_str(),
        regid.as_str(),
        groups_arg.as_str(),
        mesh.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    all.extend(["--state-dir", state.to_str().unwrap()]);
    run(ns, "setpriv", all)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_local_api_answers_root_and_its_group_only() {
    let mut lab = Lab::new("local-api").unwrap();
    let ctl_host = lab.add_controller_host("ctl").unwrap();
    let host = lab.add_host("a").unwrap();
    let host_b = lab.add_host("b").unwrap();
    let ctl = Controller::start(&lab, &ctl_host).unwrap();
    ctl.create_network(NET).unwrap();
    let token = ctl.create_token(NET, &["--reusable"]).unwrap();
    let mut a = Agent::join(&lab, &host, "a", &token).unwrap();
    let b = Agent::join(&lab, &host_b, "b", &token).unwrap();
    wait_all_pairs_ping(&[&a, &b], Duration::from_secs(20)).unwrap();
    let state = a.state_dir.clone();
    let socket = state.join("mesh.sock");
    let read_only = state.join("status.sock");

    // The socket: 0660, the state directory's group; the read-only one 0666; the state files
    // 0600, no leftovers.
    assert_eq!(mode(&socket), 0o660);
    assert_eq!(mode(&read_only), 0o666);
    assert_eq!(
        std::fs::metadata(&socket).unwrap().gid(),
        std::fs::metadata(&state).unwrap().gid()
    );
    let mut names: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "agent.lock",
            "mesh.sock",
            "node.json",
            "node.key",
            "peers.json",
            "relays.json",
            "status.sock"
        ]
    );
    for f in [
        "agent.lock",
        "node.json",
        "node.key",
        "peers.json",
        "relays.json",
    ] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }

    // Root may.
    assert!(a.cli(["status"]).success());
    // A stranger may look, as with `tailscale status`: status with its peers, a peer's
    // address, a ping (through the read-only socket).
    let out = as_user(&host.ns, NOBODY, &[], &["status"], &state);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains(&b.address.to_string()), "{out}");
    let out = as_user(&host.ns, NOBODY, &[], &["ip", "b"], &state);
    assert_eq!(out.stdout.trim(), b.address.to_string(), "{out}");
    let out = as_user(&host.ns, NOBODY, &[], &["ip"], &state);
    assert_eq!(out.stdout.trim(), a.address.to_string(), "{out}");
    let out = as_user(&host.ns, NOBODY, &[], &["ping", "b", "-c", "1"], &state);
    assert!(out.success(), "{out}");
    // But changes need root or the group: one line that says so, and nothing on stdout.
    for args in [&["leave"][..], &["down"]] {
        let out = as_user(&host.ns, NOBODY, &[], args, &state);
        let line = assert_clean_failure(&out, &["root"]);
        eprintln!("`mesh {}` as nobody: {line}", args.join(" "));
        assert!(line.contains("group"), "{line}");
        assert!(!line.contains("not running"), "{line}");
        assert!(out.stdout.is_empty(), "{out}");
    }

    // Even if someone opens the socket to everybody, the daemon checks the caller itself.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [&["leave"][..], &["down"], &["leave", "--force"]] {
        let out = as_user(&host.ns, NOBODY, &[], args, &state);
        let line = assert_clean_failure(&out, &["root"]);
        eprintln!("`mesh {}` as nobody, socket 0666: {line}", args.join(" "));
        assert!(line.contains("group"), "{line}");
    }
    assert!(a.is_running(), "{}", a.log());
    assert!(a.cli(["status"]).success());

    // Open the state directory to a group, as the docs say, and restart: members may.
    std::os::unix::fs::chown(&state, None, Some(MESH_GROUP)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o750)).unwrap();
    a.stop();
    a.up().unwrap();
    assert_eq!(std::fs::metadata(&socket).unwrap().gid(), MESH_GROUP);
    assert_eq!(mode(&socket), 0o660);
    assert_eq!(mode(&state), 0o750, "the daemon keeps the directory's mode");
    let out = as_user(&host.ns, MESH_GROUP, &[], &["status", "--json"], &state);
    assert!(out.success() && out.stdout.contains("\"address\""), "{out}");
    let out = as_user(&host.ns, NOBODY, &[MESH_GROUP], &["status"], &state);
    assert!(out.success(), "{out}");
    // Others still may not: the kernel refuses them, and the message names the group.
    let out = as_user(&host.ns, NOBODY, &[], &["status"], &state);
    let line = assert_clean_failure(&out, &["root"]);
    assert!(line.contains(&MESH_GROUP.to_string()), "{line}");
    assert!(a.is_running(), "{}", a.log());
}
