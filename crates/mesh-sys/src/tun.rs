//! Creating the TUN device.

use std::io;

/// Why the TUN device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// No CAP_NET_ADMIN, or /dev/net/tun not accessible.
    #[error("cannot create TUN device {name}: permission denied; run mesh as root or give it CAP_NET_ADMIN (the systemd unit does), and check that /dev/net/tun is accessible")]
    Permission {
        /// Device name.
        name: String,
    },
    /// The kernel has no TUN support here.
    #[error("cannot create TUN device {name}: /dev/net/tun is missing; load the tun module (`modprobe tun`) or, in a container, pass the device in")]
    Missing {
        /// Device name.
        name: String,
    },
    /// Anything else.
    #[error("cannot create TUN device {name}: {source}")]
    Other {
        /// Device name.
        name: String,
        /// Cause.
        source: io::Error,
    },
}

/// A TUN device carrying raw IP packets (no packet-information header).
pub type Tun = tun_rs::AsyncDevice;

/// Makes the device outlive the process: when the agent restarts, `mesh0` keeps its address
/// and routes (and so do the CNI routes that point at it), and the new process re-attaches.
pub fn persist(dev: &Tun) -> io::Result<()> {
    dev.persist()
}

/// Creates (or attaches to) the TUN device `name`. Address, MTU and link state are set
/// separately through [`crate::netlink`]. IPv6 is disabled on the device so that the kernel
/// does not send router solicitations into it, until [`enable_ipv6`] turns it on for an IPv6
/// overlay address.
pub fn create(name: &str) -> Result<Tun, TunError> {
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .build_async()
        .map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => TunError::Permission {
                name: name.to_owned(),
            },
            io::ErrorKind::NotFound => TunError::Missing {
                name: name.to_owned(),
            },
            _ if e.raw_os_error() == Some(1) => TunError::Permission {
                name: name.to_owned(),
            },
            _ => TunError::Other {
                name: name.to_owned(),
                source: e,
            },
        })?;
    // Best effort: without IPv6 on the device there are no router solicitations to drop.
    // mesh-core still drops and counts any non-IPv4 packet.
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::debug!(%path, error = %e, "could not disable IPv6 on the TUN device");
    }
    Ok(dev)
}

/// Turns IPv6 on for the device `name` so that it can carry an IPv6 overlay address, without
/// what a fresh IPv6 interface does on its own: no link-local address (`addr_gen_mode` 1), so
/// no router or neighbour solicitations go into the tunnel; no router advertisements taken; no
/// duplicate address detection (the controller guarantees the address is unique). mesh-core
/// drops and counts any link-scoped packet that still comes.
pub fn enable_ipv6(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    let conf = format!("/proc/sys/net/ipv6/conf/{name}");
    // The order matters: the address generation mode must be set before IPv6 comes up.
    for (key, value) in [
        ("addr_gen_mode", "1"),
        ("accept_ra", "0"),
        ("router_solicitations", "0"),
        ("accept_dad", "0"),
    ] {
        let path = format!("{conf}/{key}");
        if let Err(e) = std::fs::write(&path, value) {
            tracing::debug!(%path, error = %e, "could not set an IPv6 setting of the TUN device");
        }
    }
    std::fs::write(format!("{conf}/disable_ipv6"), "0")
}
