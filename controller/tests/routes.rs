//! The administrator's side of subnet routes, on the real binary: the networks' auto-approve
//! prefixes and the route list, approve and reject commands. Real processes, traffic on
//! loopback only. (Routes themselves are advertised by nodes over the wire; the store's unit
//! tests cover their rules.)

#![allow(clippy::unwrap_used)]

use std::path::Path;

mod common;
use common::{fails, ok, stderr, stdout, text, unserved, Daemon, TempDir};

/// `network list --json`, the entry of network `name`.
fn listed(dir: &Path, name: &str) -> serde_json::Value {
    let json: Vec<serde_json::Value> =
        serde_json::from_slice(&ok(dir, &["network", "list", "--json"]).stdout).unwrap();
    json.into_iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no network {name} listed"))
}

#[test]
fn auto_approve_routes_are_set_at_creation_changed_and_listed() {
    let tmp = TempDir::new("policy");
    let dir = tmp.0.join("state");
    let mut _serve = Daemon::spawn(&dir, "serve");
    _serve.wait_listening(&dir);
    let out = ok(
        &dir,
        &[
            "network",
            "create",
            "prod",
            "--auto-approve-routes",
            "10.245.0.0/16,10.244.0.0/16",
        ],
    );
    assert!(
        stderr(&out).contains(
            "subnet routes inside 10.244.0.0/16,10.245.0.0/16 are approved automatically"
        ),
        "{}",
        text(&out)
    );
    ok(
        &dir,
        &["network", "create", "dev", "--cidr", "100.65.0.0/24"],
    );
    let prod = listed(&dir, "prod");
    assert_eq!(
        prod["auto_approve_routes"],
        serde_json::json!(["10.244.0.0/16", "10.245.0.0/16"])
    );
    assert!(prod["id"].is_string(), "{prod}");
    assert_eq!(
        listed(&dir, "dev")["auto_approve_routes"],
        serde_json::json!([])
    );
    let list = stdout(&ok(&dir, &["network", "list"]));
    assert!(
        list.lines()
            .next()
            .unwrap()
            .contains(" AUTO-APPROVE ROUTES "),
        "{list}"
    );
    let row = |name: &str| {
        list.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}: {list}"))
            .split_whitespace()
            .nth(6)
            .unwrap()
            .to_owned()
    };
    assert_eq!(row("prod"), "10.244.0.0/16,10.245.0.0/16");
    assert_eq!(row("dev"), "-");
    // Changed, then back to none.
    let out = ok(
        &dir,
        &[
            "network",
            "set",
            "dev",
            "--auto-approve-routes",
            "10.0.0.0/8",
        ],
    );
    assert!(
        stdout(&out)
            .contains("network dev: subnet routes inside 10.0.0.0/8 are approved automatically"),
        "{}",
        text(&out)
    );
    assert_eq!(
        listed(&dir, "dev")["auto_approve_routes"],
        serde_json::json!(["10.0.0.0/8"])
    );
    let out = ok(
        &dir,
        &["network", "set", "prod", "--auto-approve-routes", "none"],
    );
    assert!(
        stdout(&out).contains(
            "network prod: the administrator approves each subnet route (`mesh-controller route approve prod PREFIX`)"
        ),
        "{}",
        text(&out)
    );
    assert_eq!(
        listed(&dir, "prod")["auto_approve_routes"],
        serde_json::json!([])
    );
    let e = fails(&dir, &["network", "set", "prod"]);
    assert!(e.contains("--auto-approve-routes PREFIX,...|none"), "{e}");
    let e = fails(
        &dir,
        &["network", "set", "nope", "--auto-approve-routes", "none"],
    );
    assert!(e.contains("no network named \"nope\""), "{e}");
}

#[test]
fn bad_prefixes_in_flags_are_refused_with_what_to_type() {
    let (dir, _tmp) = unserved("flags");
    let create = |value: &str| {
        fails(
            &dir,
            &["network", "create", "prod", "--auto-approve-routes", value],
        )
    };
    let e = create("10.244.1.0/33");
    assert!(
        e.contains(
            "10.244.1.0/33 is not an IP prefix (expected e.g. 10.244.0.0/16 or fd00:10:244::/56)"
        ),
        "{e}"
    );
    let e = create("10.244.1.0/16");
    assert!(
        e.contains("10.244.1.0/16 has host bits set; did you mean 10.244.0.0/16?"),
        "{e}"
    );
    let e = create("10.244.0.0/16,pods");
    assert!(e.contains("pods is not an IP prefix"), "{e}");
    let json = stdout(&ok(&dir, &["network", "list", "--json"]));
    assert_eq!(json.trim(), "[]", "no network was created");
    ok(&dir, &["network", "create", "prod"]);
    let e = fails(
        &dir,
        &[
            "network",
            "set",
            "prod",
            "--auto-approve-routes",
            "10.244.1.7/24",
        ],
    );
    assert!(e.contains("did you mean 10.244.1.0/24?"), "{e}");
    assert_eq!(
        listed(&dir, "prod")["auto_approve_routes"],
        serde_json::json!([])
    );
}

#[test]
fn a_network_without_routes_lists_none_and_says_where_to_look() {
    let (dir, _tmp) = unserved("empty");
    ok(&dir, &["network", "create", "prod"]);
    let out = ok(&dir, &["route", "list", "prod", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]");
    let out = ok(&dir, &["route", "list", "prod"]);
    assert!(stdout(&out).is_empty(), "{}", text(&out));
    assert!(
        stderr(&out).contains("no routes advertised in prod"),
        "{}",
        text(&out)
    );
    let e = fails(&dir, &["route", "list", "nope"]);
    assert!(
        e.contains("no network named \"nope\" (see `mesh-controller network list`)"),
        "{e}"
    );
    let see = "see `mesh-controller route list prod`";
    for verb in ["approve", "reject"] {
        let e = fails(&dir, &["route", verb, "prod", "10.244.1.0/24"]);
        assert!(
            e.contains(&format!(
                "no node advertises 10.244.1.0/24 in network \"prod\"; {see}"
            )),
            "{e}"
        );
        let e = fails(&dir, &["route", verb, "prod", "node-b"]);
        assert!(
            e.contains(&format!(
                "no route or node with routes matches \"node-b\" in network \"prod\"; {see}"
            )),
            "{e}"
        );
        let e = fails(&dir, &["route", verb, "prod", "10.244.1.0/33"]);
        assert!(
            e.contains("10.244.1.0/33 is not an IP prefix (expected e.g. 10.244.0.0/16 or fd00:10:244::/56)"),
            "{e}"
        );
        let e = fails(&dir, &["route", verb, "prod", "--all"]);
        assert!(
            e.contains(&format!(
                "no pending routes in network \"prod\" to {verb}; {see}"
            )),
            "{e}"
        );
        // Prefixes and nodes, or --all: exactly one of them.
        let e = fails(&dir, &["route", verb, "prod"]);
        assert!(e.contains("--all"), "{e}");
        let e = fails(&dir, &["route", verb, "prod", "node-b", "--all"]);
        assert!(e.contains("cannot be used with"), "{e}");
        let e = fails(&dir, &["route", verb, "nope", "--all"]);
        assert!(e.contains("no network named \"nope\""), "{e}");
    }
}
