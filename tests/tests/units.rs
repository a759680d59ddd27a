//! The shipped systemd units pass `systemd-analyze verify` (with ExecStart pointing at the
//! binaries under test), and the controller's and relay's may bind TCP port 443.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[test]
fn shipped_units_verify_and_may_bind_443() {
    let dir = std::env::temp_dir().join(format!("mesh-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bins = mesh_e2e::mesh_bin().unwrap();
    let bin_dir = bins.parent().unwrap().to_str().unwrap().to_owned();
    let mut paths = Vec::new();
    for unit in [
        "mesh.service",
        "mesh-controller.service",
        "mesh-relay.service",
    ] {
        let text = std::fs::read_to_string(deploy_dir().join(unit)).unwrap();
        if unit != "mesh.service" {
            assert!(
                text.lines()
                    .any(|l| l.starts_with("AmbientCapabilities=")
                        && l.contains("CAP_NET_BIND_SERVICE")),
                "{unit} cannot bind port 443"
            );
            assert!(
                !text.lines().any(|l| l.trim() == "PrivateUsers=yes"),
                "{unit}: in a private user namespace the capability would not count"
            );
        }
        let path = dir.join(unit);
        std::fs::write(&path, text.replace("/usr/bin", &bin_dir)).unwrap();
        paths.push(path);
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("systemd-analyze (Debian package systemd; test.sh installs it)");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
