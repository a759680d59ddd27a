//! The agent's configuration file (`/etc/mesh/mesh.toml`).
//!
//! Every command-line flag has a key here. A flag given on the command line wins over the file,
//! and the file wins over the built-in default.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where the file is looked for when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/mesh/mesh.toml";

/// Built-in defaults.
pub mod defaults {
    /// State directory.
    pub const STATE_DIR: &str = "/var/lib/mesh";
    /// TUN device name.
    pub const INTERFACE: &str = "mesh0";
    /// UDP port.
    pub const PORT: u16 = 51820;
    /// Interface MTU: a 1500-byte underlay minus WireGuard over IPv6 (80 bytes: 40 IPv6, 8 UDP,
    /// 32 WireGuard); over IPv4 (60 bytes) the 20 left over are margin (PPPoE, say).
    pub const MTU: u32 = 1420;
    /// Wait for the controller at join.
    pub const CONNECT_TIMEOUT: &str = "10s";
    /// Log filter.
    pub const LOG: &str = "info";
}

/// The file's contents; every key is optional.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// TUN device name.
    pub interface: Option<String>,
    /// UDP port.
    pub port: Option<u16>,
    /// Interface MTU.
    pub mtu: Option<u32>,
    /// Controller connect timeout at join, e.g. "10s".
    pub connect_timeout: Option<String>,
    /// Prometheus endpoint address; empty or absent: off.
    pub metrics_listen: Option<String>,
    /// Interfaces whose addresses are offered as endpoint candidates: comma-separated globs,
    /// `!` to deny (see `mesh up --help`); empty: the defaults.
    pub endpoint_interfaces: Option<String>,
    /// Whether to ask the router (UPnP IGD, NAT-PMP, PCP) to forward the UDP port [default:
    /// true].
    pub port_mapping: Option<bool>,
    /// Prefixes to advertise as subnet routes, comma-separated (see `mesh up --help`);
    /// `auto` advertises the pod subnet found on the node.
    pub advertise_routes: Option<String>,
    /// Prefixes to offer as an exit, comma-separated (see `mesh up --help`).
    pub advertise_exits: Option<String>,
    /// The node whose exit carries everything without a more specific route.
    pub exit_node: Option<String>,
    /// Prefixes to send through a peer's exit: comma-separated "PREFIX via NODE".
    pub use_routes: Option<String>,
    /// Whether to answer node names on the overlay address [default: true].
    pub dns: Option<bool>,
    /// Whether to keep the node names in a block of /etc/hosts [default: false].
    pub hosts_file: Option<bool>,
    /// Where `advertise_routes = "auto"` looks for CNI configs [default: /etc/cni/net.d].
    pub cni_conf_dir: Option<PathBuf>,
    /// Where `advertise_routes = "auto"` looks for flannel's subnet file [default:
    /// /run/flannel/subnet.env].
    pub flannel_subnet_env: Option<PathBuf>,
    /// Log filter (tracing syntax), e.g. "info" or "mesh=debug".
    pub log: Option<String>,
}

impl FileConfig {
    /// Reads `path`. With `explicit` false, a missing file means "all defaults".
    pub fn load(path: &Path, explicit: bool) -> anyhow::Result<FileConfig> {
        mesh_service::load_config(path, explicit)
    }
}

/// The machine's hostname made a valid node name (the default `--name`, and what a join
/// request tells the administrator).
pub fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(mesh_proto::control::MAX_NAME_LEN)
        .collect();
    if clean.is_empty() {
        "node".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_refuses_unknown_ones() {
        let c: FileConfig = toml::from_str(
            r#"
            state_dir = "/srv/mesh"
            interface = "mesh1"
            port = 41641
            mtu = 1380
            connect_timeout = "5s"
            metrics_listen = "127.0.0.1:9101"
            endpoint_interfaces = "eth0,!docker*"
            port_mapping = false
            advertise_routes = "auto,192.168.5.0/24"
            cni_conf_dir = "/srv/cni"
            flannel_subnet_env = "/srv/subnet.env"
            log = "debug"
            "#,
        )
        .unwrap();
        assert_eq!(c.endpoint_interfaces.as_deref(), Some("eth0,!docker*"));
        assert_eq!(c.port_mapping, Some(false));
        assert_eq!(c.cni_conf_dir.as_deref(), Some(Path::new("/srv/cni")));
        assert_eq!(c.port, Some(41641));
        assert_eq!(c.mtu, Some(1380));
        assert_eq!(c.state_dir.as_deref(), Some(Path::new("/srv/mesh")));
        let err = toml::from_str::<FileConfig>("prot = 1").unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
    }

    #[test]
    fn missing_default_file_is_fine_missing_explicit_file_is_not() {
        let p = Path::new("/nonexistent/mesh.toml");
        assert_eq!(FileConfig::load(p, false).unwrap(), FileConfig::default());
        assert!(FileConfig::load(p, true).is_err());
    }
}
