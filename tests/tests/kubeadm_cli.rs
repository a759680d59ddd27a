#![allow(clippy::unwrap_used)]
//! `mesh kubeadm` through the real binary, on sample files (no namespaces needed).

use mesh_e2e::mesh_bin;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mesh-kubeadm-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::write(
            dir.join("state/node.json"),
            r#"{"controller":"192.0.2.1:7443","controller_key":"sWuNN/4Lknh8fdqbszGTbCntHGt6SmN/55uGOFou3FU=","network":"k8s","name":"worker-1","address":"100.64.0.7","prefix_len":16,"mtu":1420,"port":51820,"interface":"mesh0"}"#,
        )
        .unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mesh(state: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(mesh_bin().unwrap())
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env_remove("MESH_LOG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn node_ip_merges_into_existing_args_and_is_idempotent() {
    let s = Scratch::new("nodeip");
    let state = s.0.join("state");
    let file = s.0.join("kubelet");
    let original = "# set by the admin\nKUBELET_EXTRA_ARGS=\"--cgroup-driver=systemd --node-ip=10.0.0.5 --max-pods=200\"\nOTHER=1\n";
    std::fs::write(&file, original).unwrap();
    let f = file.to_str().unwrap();

    let (ok, dry, _) = mesh(&state, &["kubeadm", "node-ip", "--dry-run", "--file", f]);
    assert!(ok);
    assert!(
        dry.contains("-KUBELET_EXTRA_ARGS=\"--cgroup-driver=systemd --node-ip=10.0.0.5"),
        "{dry}"
    );
    assert!(
        dry.contains(
            "+KUBELET_EXTRA_ARGS=\"--cgroup-driver=systemd --node-ip=100.64.0.7 --max-pods=200\""
        ),
        "{dry}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        original,
        "dry run writes nothing"
    );

    let (ok, _, err) = mesh(&state, &["kubeadm", "node-ip", "--file", f]);
    assert!(ok, "{err}");
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        written,
        "# set by the admin\nKUBELET_EXTRA_ARGS=\"--cgroup-driver=systemd --node-ip=100.64.0.7 --max-pods=200\"\nOTHER=1\n"
    );
    let (ok, again, _) = mesh(&state, &["kubeadm", "node-ip", "--file", f]);
    assert!(ok && again.contains("already"), "{again}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), written);

    // A missing file is created with the variable.
    let fresh = s.0.join("etc/default/kubelet");
    let (ok, _, err) = mesh(
        &state,
        &["kubeadm", "node-ip", "--file", fresh.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(std::fs::read_to_string(&fresh)
        .unwrap()
        .contains("--node-ip=100.64.0.7"));
}

#[test]
fn kubeadm_config_and_cni_mtu_use_the_overlay_address_and_mtu() {
    let s = Scratch::new("config");
    let state = s.0.join("state");
    let (ok, cp, _) = mesh(&state, &["kubeadm", "config", "--role", "control-plane"]);
    assert!(ok);
    assert!(cp.contains("kind: InitConfiguration"));
    assert!(cp.contains("advertiseAddress: 100.64.0.7"));
    assert!(cp.contains("value: 100.64.0.7"));
    let (ok, w, _) = mesh(&state, &["kubeadm", "config", "--role", "worker"]);
    assert!(
        ok && w.contains("kind: JoinConfiguration") && w.contains("value: 100.64.0.7"),
        "{w}"
    );
    let (ok, _, err) = mesh(&state, &["kubeadm", "config", "--role", "boss"]);
    assert!(!ok && err.contains("boss"), "{err}");

    let (ok, flannel, _) = mesh(&state, &["kubeadm", "cni-mtu", "--cni", "flannel"]);
    assert!(
        ok && flannel.contains("1370") && flannel.contains("--iface=mesh0"),
        "{flannel}"
    );
    let (ok, calico, _) = mesh(&state, &["kubeadm", "cni-mtu", "--cni", "calico"]);
    assert!(
        ok && calico.contains("IP_AUTODETECTION_METHOD=interface=mesh0"),
        "{calico}"
    );
}

#[test]
fn kubeadm_without_a_membership_says_to_join() {
    let dir = std::env::temp_dir().join(format!("mesh-kubeadm-none-{}", std::process::id()));
    let (ok, _, err) = mesh(&dir, &["kubeadm", "config", "--role", "worker"]);
    assert!(!ok);
    assert!(err.contains("mesh join"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
