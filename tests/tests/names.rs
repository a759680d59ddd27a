//! Node names (issue 16): every node's name resolves to its overlay address on every node, by
//! the responder on each node's overlay address (`dig`, and the system resolver pointed at it)
//! and by the managed block in /etc/hosts (`--hosts-file`); a name for several nodes follows
//! which of them are online.
//!
//! Each host's /etc/hosts and /etc/resolv.conf are its own: `ip netns exec` mounts the files
//! of /etc/netns/<namespace>/ over /etc, as Docker mounts a container's hosts file. So the
//! agent meets a hosts file that is a mount point, as it does in a container.
#![allow(clippy::unwrap_used)]

use mesh_e2e::{wait_until, Agent, Host};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const NET: &str = "prod";

/// /etc/netns/<namespace>/ with a hosts file (and later a resolv.conf), removed on drop.
struct EtcFiles(PathBuf);

impl EtcFiles {
    fn new(host: &Host) -> EtcFiles {
        let dir = PathBuf::from("/etc/netns").join(&host.ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("hosts"),
            "127.0.0.1\tlocalhost\n# the admin's own line\n",
        )
        .unwrap();
        EtcFiles(dir)
    }

    fn hosts(&self) -> String {
        std::fs::read_to_string(self.0.join("hosts")).unwrap()
    }

    /// Points the host's resolver at `server`, as an operator does (or systemd-resolved).
    fn resolver(&self, server: Ipv4Addr) {
        std::fs::write(
            self.0.join("resolv.conf"),
            format!("nameserver {server}\noptions timeout:1 attempts:2\n"),
        )
        .unwrap();
    }
}

impl Drop for EtcFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `dig +short` on `host` asking `server` for `name`: the addresses, and the status line.
fn dig(host: &Host, server: Ipv4Addr, name: &str) -> (Vec<Ipv4Addr>, String) {
    let out = host.run(
        "dig",
        [
            &format!("@{server}"),
            name,
            "A",
            "+time=1",
            "+tries=2",
            "+noall",
            "+answer",
            "+comments",
        ],
    );
    let status = out
        .stdout
        .lines()
        .find(|l| l.contains("status:"))
        .unwrap_or("")
        .to_owned();
    let mut addrs: Vec<Ipv4Addr> = out
        .stdout
        .lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    addrs.sort();
    (addrs, status)
}

/// `dig +short AAAA` on `host` asking `server` for `name`: the IPv6 addresses.
fn dig6(host: &Host, server: std::net::IpAddr, name: &str) -> Vec<std::net::Ipv6Addr> {
    let out = host.run(
        "dig",
        [
            &format!("@{server}"),
            name,
            "AAAA",
            "+time=1",
            "+tries=2",
            "+short",
        ],
    );
    out.stdout
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn getent(host: &Host, name: &str) -> Option<Ipv4Addr> {
    let out = host.run("getent", ["ahostsv4", name]);
    out.stdout.split_whitespace().next()?.parse().ok()
}

#[test]
fn names_resolve_on_every_node_and_a_name_for_several_nodes_follows_who_is_online() {
    assert!(
        std::path::Path::new("/usr/bin/dig").exists(),
        "dig is missing: install dnsutils (./test.sh does)"
    );
    let (lab, ctl, hosts, token) =
        mesh_e2e::daemons::lab_with_network("names", NET, &["a", "b", "c"]).unwrap();
    let etc: Vec<EtcFiles> = hosts.iter().map(EtcFiles::new).collect();
    // a keeps the names in its hosts file; b and c ask their own responder.
    let a = Agent::join_with(&lab, &hosts[0], "cp1", &token, &["--hosts-file"]).unwrap();
    let mut b = Agent::join(&lab, &hosts[1], "cp2.example.com", &token).unwrap();
    etc[1].resolver(b.address);
    let (ha, hb, hc) = (&hosts[0], &hosts[1], &hosts[2]);

    // dig, on the overlay address: full names, first labels, and the zone.
    let wait_name = |host: &Host, server: Ipv4Addr, name: &str, want: Vec<Ipv4Addr>| {
        let t0 = Instant::now();
        let ok = wait_until(Duration::from_secs(10), || {
            dig(host, server, name).0 == want
        });
        assert!(
            ok,
            "{name} on {}: {:?}, want {want:?}",
            host.name,
            dig(host, server, name)
        );
        t0.elapsed()
    };
    wait_name(ha, a.address, "cp2.example.com", vec![b.address]);
    wait_name(ha, a.address, "cp2", vec![b.address]);
    wait_name(ha, a.address, &format!("cp2.{NET}.mesh"), vec![b.address]);
    wait_name(hb, b.address, &format!("cp1.{NET}.mesh"), vec![a.address]);
    wait_name(hb, b.address, "CP1.", vec![a.address]);
    // AAAA: the node's IPv6 overlay address (every network has one by default).
    let a6: std::net::Ipv6Addr = a.status().unwrap()["node"]["address6"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("a has an IPv6 overlay address");
    let (b4, a6_server) = (
        std::net::IpAddr::from(b.address),
        std::net::IpAddr::from(a6),
    );
    assert!(
        wait_until(Duration::from_secs(10), || dig6(hb, b4, "cp1") == vec![a6]),
        "AAAA cp1 on b: {:?}, want {a6}",
        dig6(hb, b4, "cp1")
    );
    // The responder answers on the IPv6 overlay address too (asked across the tunnel).
    assert!(
        wait_until(Duration::from_secs(10), || dig6(hb, a6_server, "cp1")
            == vec![a6]),
        "AAAA cp1 asked of a's IPv6 overlay address from b: {:?}",
        dig6(hb, a6_server, "cp1")
    );
    // Not ours: refused (no open resolver); ours but unknown: NXDOMAIN.
    let (none, status) = dig(ha, a.address, "example.com");
    assert!(none.is_empty() && status.contains("REFUSED"), "{status}");
    let (none, status) = dig(ha, a.address, &format!("nobody.{NET}.mesh"));
    assert!(none.is_empty() && status.contains("NXDOMAIN"), "{status}");
    // Only on the overlay address: the underlay address does not answer.
    let (none, status) = dig(hb, ha.ip, "cp1");
    assert!(none.is_empty() && status.is_empty(), "{status}");

    // The system resolver, as kubeadm's checks use it: b resolves its own name and a's, and
    // reaches a by name; a does the same from its hosts file.
    assert_eq!(getent(hb, "cp2.example.com"), Some(b.address));
    assert_eq!(getent(hb, "cp1"), Some(a.address));
    assert!(hb.run("ping", ["-c", "1", "-W", "5", "cp1"]).success());
    assert!(wait_until(Duration::from_secs(5), || getent(ha, "cp2")
        == Some(b.address)));
    assert_eq!(getent(ha, "cp1"), Some(a.address));
    let hosts_a = etc[0].hosts();
    assert!(
        hosts_a.starts_with("127.0.0.1\tlocalhost\n# the admin's own line\n"),
        "{hosts_a}"
    );
    assert!(
        hosts_a.contains(&format!("# BEGIN mesh {NET}")),
        "{hosts_a}"
    );

    // A node that joins now is a name everywhere within a second or so.
    let t0 = Instant::now();
    let c = Agent::join(&lab, hc, "worker", &token).unwrap();
    let joined = t0.elapsed();
    let seen = wait_name(hb, b.address, "worker", vec![c.address]);
    assert!(wait_until(Duration::from_secs(5), || getent(ha, "worker")
        == Some(c.address)));
    eprintln!("names: worker joined in {joined:?}, answered on cp2 {seen:?} after its join");

    // A name for several nodes: the control-plane nodes.
    let t0 = Instant::now();
    let out = ctl.admin(["name", "set", NET, "k8s-api", "cp1", "cp2.example.com"]);
    assert!(out.success(), "{out}");
    let mut both = vec![a.address, b.address];
    both.sort();
    wait_name(hc, c.address, "k8s-api", both.clone());
    let set_seen = t0.elapsed();
    wait_name(ha, a.address, &format!("k8s-api.{NET}.mesh"), both);
    eprintln!("names: k8s-api answered on worker {set_seen:?} after `name set`");
    // A clash is an error that says what is wrong.
    let out = ctl.admin(["name", "set", NET, "worker", "cp1"]);
    assert!(
        !out.success() && out.stderr.contains("is the name of node"),
        "{out}"
    );

    // cp2 dies (kill -9): once the controller sees it gone, k8s-api answers with cp1 alone.
    let t0 = Instant::now();
    b.kill9();
    wait_name_long(hc, c.address, "k8s-api", vec![a.address]);
    eprintln!(
        "names: k8s-api dropped the killed cp2 after {:?}",
        t0.elapsed()
    );

    // Leaving takes the block out of the hosts file and leaves the rest as it was.
    let out = a.cli(["leave"]);
    assert!(out.success(), "{out}");
    assert!(wait_until(Duration::from_secs(10), || !etc[0]
        .hosts()
        .contains("BEGIN mesh")));
    assert_eq!(
        etc[0].hosts(),
        "127.0.0.1\tlocalhost\n# the admin's own line\n"
    );
    drop(c);
}

/// Like `wait_name` but for the controller to notice a dead node (its QUIC idle timeout).
fn wait_name_long(host: &Host, server: Ipv4Addr, name: &str, want: Vec<Ipv4Addr>) {
    let ok = wait_until(Duration::from_secs(60), || {
        dig(host, server, name).0 == want
    });
    assert!(ok, "{name}: {:?}, want {want:?}", dig(host, server, name));
}

#[test]
fn a_name_kubernetes_would_refuse_is_refused_at_join_with_the_fix() {
    let state = std::env::temp_dir().join(format!("mesh-names-{}", std::process::id()));
    let out = std::process::Command::new(mesh_e2e::mesh_bin().unwrap())
        .args([
            "join",
            "mesh1_AAAA",
            "--name",
            "Node_B",
            "--no-daemon",
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&state);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("node names are DNS names") && stderr.contains("--name node-b"),
        "{stderr}"
    );
}
