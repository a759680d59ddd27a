//! The administrator's side of joins by network id, on the real binary: network ids that name
//! this controller, the approval policy, and the pending, approve and reject commands. Real
//! processes, traffic on loopback only. (Requests themselves come from nodes over the wire; the
//! store's unit tests cover their rules.)

#![allow(clippy::unwrap_used)]

use mesh_proto::token::NetworkId;
use mesh_proto::PublicKey;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{fails, ok, stderr, stdout, text, Daemon, TempDir, A_KEY};

/// Another address of the controller that `serve` announces.
const ANNOUNCED: &str = "192.0.2.50:7443";

/// `serve` on a loopback port the kernel picks, without TCP or STUN, announcing [`ANNOUNCED`]
/// besides.
fn spawn_announcing(dir: &Path) -> Daemon {
    let args = ["serve", "--listen", "127.0.0.1:0", "--listen-tcp", "off"];
    let more = ["--observer-listen", "off", "--announce", ANNOUNCED];
    Daemon::spawn_with(&args, &more, dir, "serve")
}

/// A `serve` listening in a new state directory: it, the address it listens on, the directory,
/// and the temporary directory around it (removed after the `serve` is killed).
fn serving(label: &str) -> (Daemon, String, PathBuf, TempDir) {
    let tmp = TempDir::new(label);
    let dir = tmp.0.join("state");
    let mut serve = spawn_announcing(&dir);
    let addr = serve.wait_listening(&dir);
    (serve, addr, dir, tmp)
}

/// The one line `out` printed on stdout, parsed as a network id.
fn network_id(out: &Output) -> NetworkId {
    let printed = stdout(out);
    assert_eq!(printed.lines().count(), 1, "one line: {}", text(out));
    printed
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("not a network id ({e}): {}", text(out)))
}

#[test]
fn network_create_prints_an_id_that_names_this_controller() {
    let (_serve, addr, dir, _tmp) = serving("create");
    let out = ok(
        &dir,
        &["network", "create", "prod", "--cidr", "100.64.0.0/24"],
    );
    let id = network_id(&out);
    let key: PublicKey = stdout(&ok(&dir, &["key"])).trim().parse().unwrap();
    assert_eq!(id.network, "prod");
    assert_eq!(id.controller.key, key);
    assert_eq!(id.controller.addr, addr);
    assert_eq!(id.controller.tcp, None, "serve listens on no TCP port");
    assert_eq!(id.controller.others, [ANNOUNCED]);
    let said = stderr(&out);
    assert!(
        said.contains("created network prod (100.64.0.0/24), manual approval"),
        "{said}"
    );
    assert!(said.contains(&format!("mesh join {id}")), "{said}");
    assert!(
        said.contains("`mesh-controller node approve prod NODE`"),
        "{said}"
    );
    let out = ok(&dir, &["network", "create", "open", "--approval", "auto"]);
    assert_eq!(network_id(&out).network, "open");
    assert!(stderr(&out).contains("auto approval"), "{}", text(&out));
    let e = fails(
        &dir,
        &["network", "create", "odd", "--approval", "sometimes"],
    );
    assert!(e.contains("use manual") && e.contains("or auto"), "{e}");
}

#[test]
fn network_id_prints_the_id_alone_on_one_line() {
    let (_serve, _addr, dir, _tmp) = serving("id");
    let created = ok(
        &dir,
        &["network", "create", "prod", "--cidr", "100.64.0.0/24"],
    );
    let out = ok(&dir, &["network", "id", "prod"]);
    assert_eq!(
        stdout(&out),
        stdout(&created),
        "the id network create printed"
    );
    assert!(stderr(&out).is_empty(), "{}", text(&out));
    let out = ok(
        &dir,
        &[
            "network",
            "id",
            "prod",
            "--controller",
            "192.0.2.1:7443",
            "--controller-tcp",
            "192.0.2.1:443",
        ],
    );
    let id = network_id(&out);
    assert_eq!(id.controller.addr, "192.0.2.1:7443");
    assert_eq!(id.controller.tcp.as_deref(), Some("192.0.2.1:443"));
    let e = fails(&dir, &["network", "id", "nope"]);
    assert!(
        e.contains("no network named \"nope\" (see `mesh-controller network list`)"),
        "{e}"
    );
    let e = fails(
        &dir,
        &["network", "id", "prod", "--controller", "ctl.example.com"],
    );
    assert!(e.contains("use host:port"), "{e}");
}

#[test]
fn network_list_shows_the_approval_policy_and_the_id() {
    let (_serve, _addr, dir, _tmp) = serving("list");
    let prod = network_id(&ok(&dir, &["network", "create", "prod"]));
    let open = network_id(&ok(
        &dir,
        &[
            "network",
            "create",
            "open",
            "--cidr",
            "100.65.0.0/24",
            "--approval",
            "auto",
        ],
    ));
    let list = stdout(&ok(&dir, &["network", "list"]));
    let mut lines = list.lines();
    let header = lines.next().unwrap();
    assert!(
        header.contains("APPROVAL") && header.ends_with(" ID"),
        "{list}"
    );
    let row = |name: &str| {
        list.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}: {list}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // APPROVAL, AUTO-APPROVE ROUTES (none), ID (after NAME, CIDR, CIDR6, NODES, BIRTHDAY).
    let rest = |policy: &str, id: &NetworkId| [policy.to_owned(), "-".to_owned(), id.to_string()];
    assert_eq!(row("prod")[5..], rest("manual", &prod));
    assert_eq!(row("open")[5..], rest("auto", &open));
    // Switching the policy.
    let out = ok(&dir, &["network", "set", "prod", "--approval", "auto"]);
    assert!(
        stdout(&out).contains("approved automatically"),
        "{}",
        text(&out)
    );
    let out = ok(&dir, &["network", "set", "open", "--approval", "manual"]);
    assert!(
        stdout(&out).contains("approves each join request"),
        "{}",
        text(&out)
    );
    let json: Vec<serde_json::Value> =
        serde_json::from_slice(&ok(&dir, &["network", "list", "--json"]).stdout).unwrap();
    let entry = |name: &str| json.iter().find(|n| n["name"] == name).unwrap().clone();
    assert_eq!(entry("prod")["approval"], "auto");
    assert_eq!(entry("prod")["id"], prod.to_string());
    assert_eq!(entry("open")["approval"], "manual");
    let e = fails(&dir, &["network", "set", "prod", "--approval", "maybe"]);
    assert!(e.contains("is not an approval policy"), "{e}");
    let e = fails(&dir, &["network", "set", "nope", "--approval", "auto"]);
    assert!(e.contains("no network named \"nope\""), "{e}");
    let e = fails(&dir, &["network", "set", "prod"]);
    assert!(e.contains("--approval manual|auto"), "{e}");
}

#[test]
fn a_network_created_before_serve_ever_ran_gets_its_id_later() {
    let tmp = TempDir::new("unserved");
    let dir = tmp.0.join("state");
    std::fs::create_dir(&dir).unwrap();
    // A controller whose key exists but that has never served: no address is known.
    std::fs::write(dir.join("controller.key"), A_KEY).unwrap();
    let out = ok(&dir, &["network", "create", "prod"]);
    assert!(stdout(&out).is_empty(), "no id to print: {}", text(&out));
    assert!(
        stderr(&out).contains("`mesh-controller network id prod` prints it"),
        "{}",
        text(&out)
    );
    let e = fails(&dir, &["network", "id", "prod"]);
    assert!(e.contains("no controller address known"), "{e}");
    assert!(e.contains("--controller <ip:port>"), "{e}");
    let list = stdout(&ok(&dir, &["network", "list"]));
    assert!(list.lines().nth(1).unwrap().ends_with(" -"), "{list}");
    let json: serde_json::Value =
        serde_json::from_slice(&ok(&dir, &["network", "list", "--json"]).stdout).unwrap();
    assert!(json[0]["id"].is_null(), "{json}");
    // Once serve runs, the id is there.
    let mut serve = spawn_announcing(&dir);
    let addr = serve.wait_listening(&dir);
    let id = network_id(&ok(&dir, &["network", "id", "prod"]));
    assert_eq!(
        (id.controller.addr.as_str(), id.network.as_str()),
        (addr.as_str(), "prod")
    );
}

#[test]
fn with_nothing_pending_the_admin_is_told_what_to_do() {
    let (_serve, _addr, dir, _tmp) = serving("pending");
    ok(&dir, &["network", "create", "prod"]);
    let out = ok(&dir, &["node", "pending", "prod", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]");
    let out = ok(&dir, &["node", "pending", "prod"]);
    assert!(stdout(&out).is_empty(), "{}", text(&out));
    assert!(
        stderr(&out).contains("no pending requests in prod"),
        "{}",
        text(&out)
    );
    for verb in ["approve", "reject"] {
        let e = fails(&dir, &["node", verb, "prod", "web"]);
        assert!(
            e.contains("no pending request matches \"web\" in network \"prod\"; see `mesh-controller node pending prod`"),
            "{e}"
        );
        let e = fails(&dir, &["node", verb, "prod", "--all"]);
        assert!(
            e.contains(&format!(
                "no pending requests in network \"prod\" to {verb}"
            )),
            "{e}"
        );
        // Names or --all: exactly one of them.
        let e = fails(&dir, &["node", verb, "prod"]);
        assert!(e.contains("--all"), "{e}");
        let e = fails(&dir, &["node", verb, "prod", "web", "--all"]);
        assert!(e.contains("cannot be used with"), "{e}");
        let e = fails(&dir, &["node", verb, "nope", "web"]);
        assert!(e.contains("no network named \"nope\""), "{e}");
    }
    let e = fails(&dir, &["node", "pending", "nope"]);
    assert!(e.contains("no network named \"nope\""), "{e}");
    // Who admitted each node is a column of its own.
    let list = stdout(&ok(&dir, &["node", "list", "prod"]));
    assert!(
        list.lines().next().unwrap().contains(" APPROVED "),
        "{list}"
    );
}
