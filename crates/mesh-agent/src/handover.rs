//! `mesh join` and `mesh up` where systemd runs and mesh.service is installed: the daemon is
//! the unit's, as `tailscale up` leaves it to tailscaled. The command joins (or checks the
//! saved state), starts the unit and returns once the overlay address is on the interface,
//! printing it. Elsewhere (containers, tests, another state directory or config than the
//! unit's) the daemon runs in the foreground as before; `--foreground` forces that.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The unit the daemon is handed to.
pub const UNIT: &str = "mesh.service";

/// Where systemd looks for units an admin or a package installed.
const UNIT_DIRS: [&str; 4] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// How long the handed-over daemon may take to put the address on the interface.
pub const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the host is like, for [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// systemd is PID 1 (`/run/systemd/system` exists).
    pub systemd: bool,
    /// mesh.service is installed.
    pub unit_installed: bool,
    /// This process is already run by systemd (it is the unit, or another one).
    pub under_systemd: bool,
}

impl Host {
    /// This host.
    pub fn detect() -> Host {
        Host {
            systemd: Path::new("/run/systemd/system").is_dir(),
            unit_installed: UNIT_DIRS.iter().any(|d| Path::new(d).join(UNIT).exists()),
            under_systemd: std::env::var_os("INVOCATION_ID").is_some()
                || std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }
}

/// What the command line asks for, for [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `--foreground`.
    pub foreground: bool,
    /// The state directory is the unit's (the default).
    pub default_state_dir: bool,
    /// The config file is the unit's (the default).
    pub default_config: bool,
    /// Daemon flags were given that only a foreground `mesh up` would apply (a join saves
    /// them with the state, so it can still hand over).
    pub run_flags: bool,
}

/// Whether to hand the daemon to the unit.
pub fn decide(host: Host, req: Request) -> bool {
    !req.foreground
        && host.systemd
        && host.unit_installed
        && !host.under_systemd
        && req.default_state_dir
        && req.default_config
        && !req.run_flags
}

/// `systemctl ARGS`, with its own message on failure.
fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run systemctl {}: {e}", args.join(" ")))?;
    if out.status.success() {
        return Ok(());
    }
    anyhow::bail!(
        "systemctl {} failed: {}; see `systemctl status {UNIT}` and `journalctl -u {UNIT}`",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Enables the unit and (re)starts it: after a join the daemon must start from the new state.
pub fn start_after_join() -> anyhow::Result<()> {
    systemctl(&["enable", "--quiet", UNIT])?;
    systemctl(&["restart", UNIT])
}

/// Starts the unit (`mesh up`).
pub fn start() -> anyhow::Result<()> {
    systemctl(&["start", UNIT])
}

/// After a join by network id that waits for approval: enables and (re)starts the unit without
/// waiting for its start to finish, which happens only once the administrator approves.
pub fn start_after_join_no_block() -> anyhow::Result<()> {
    systemctl(&["enable", "--quiet", UNIT])?;
    systemctl(&["restart", "--no-block", UNIT])
}

/// Starts the unit without waiting for it to be ready (a node that waits for approval).
pub fn start_no_block() -> anyhow::Result<()> {
    systemctl(&["start", "--no-block", UNIT])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYSTEMD_HOST: Host = Host {
        systemd: true,
        unit_installed: true,
        under_systemd: false,
    };
    const PLAIN: Request = Request {
        foreground: false,
        default_state_dir: true,
        default_config: true,
        run_flags: false,
    };

    #[test]
    fn hands_over_only_to_an_installed_unit_under_systemd_for_the_units_own_state() {
        assert!(decide(SYSTEMD_HOST, PLAIN));
        // A container or a test: no systemd, or no unit.
        for host in [
            Host {
                systemd: false,
                ..SYSTEMD_HOST
            },
            Host {
                unit_installed: false,
                ..SYSTEMD_HOST
            },
            // The unit itself runs `mesh up`: it must not start itself.
            Host {
                under_systemd: true,
                ..SYSTEMD_HOST
            },
        ] {
            assert!(!decide(host, PLAIN), "{host:?}");
        }
        for req in [
            Request {
                foreground: true,
                ..PLAIN
            },
            // The unit would run another state directory or config than the user named.
            Request {
                default_state_dir: false,
                ..PLAIN
            },
            Request {
                default_config: false,
                ..PLAIN
            },
            Request {
                run_flags: true,
                ..PLAIN
            },
        ] {
            assert!(!decide(SYSTEMD_HOST, req), "{req:?}");
        }
    }
}
