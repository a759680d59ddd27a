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

/// What batched TUN reads and writes need: the flow table of write coalescing, the packets a
/// batch holds, and the room the virtio-net header takes in front of each packet.
pub use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Makes the device outlive the process: when the agent restarts, `mesh0` keeps its address
/// and routes (and so do the CNI routes that point at it), and the new process re-attaches.
pub fn persist(dev: &Tun) -> io::Result<()> {
    dev.persist()
}

/// Whether the device was opened with offloads (`IFF_VNET_HDR` and TSO): the kernel then hands
/// over TCP super-packets of up to 64 KB with a virtio-net header, split into MTU-sized packets
/// by [`tun_rs::AsyncDevice::recv_multiple`], and takes coalesced ones from
/// [`tun_rs::AsyncDevice::send_multiple`]. Without offloads both still work, one packet per
/// system call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offload {
    /// Opened with offloads.
    On,
    /// Opened without, and why.
    Off(String),
}

/// Set to `0` in the environment, the device is opened without offloads (for measuring what
/// they bring, and as a way out should a kernel mishandle them).
pub const OFFLOAD_ENV: &str = "MESH_TUN_OFFLOAD";

/// Creates (or attaches to) the TUN device `name`, with offloads where the kernel takes them
/// (see [`Offload`]); where it does not, without, and says why. Address, MTU and link state are
/// set separately through [`crate::netlink`]. IPv6 is disabled on the device so that the kernel
/// does not send router solicitations into it, until [`enable_ipv6`] turns it on for an IPv6
/// overlay address.
pub fn create(name: &str) -> Result<(Tun, Offload), TunError> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(name)
            .offload(offload)
            .build_async()
    };
    let wanted = std::env::var(OFFLOAD_ENV).map_or(true, |v| v != "0");
    let (dev, offload) = match wanted.then(|| build(true)) {
        Some(Ok(dev)) if dev.tcp_gso() => (dev, Offload::On),
        Some(Ok(dev)) => (dev, Offload::Off("the kernel took no TCP offload".into())),
        Some(Err(e)) => {
            let why = format!("the kernel refused offloads ({e})");
            match build(false) {
                Ok(dev) => (dev, Offload::Off(why)),
                Err(e) => return Err(tun_error(name, e)),
            }
        }
        None => match build(false) {
            Ok(dev) => (dev, Offload::Off(format!("{OFFLOAD_ENV}=0"))),
            Err(e) => return Err(tun_error(name, e)),
        },
    };
    // Best effort: without IPv6 on the device there are no router solicitations to drop.
    // mesh-core still drops and counts any non-IPv4 packet.
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::debug!(%path, error = %e, "could not disable IPv6 on the TUN device");
    }
    Ok((dev, offload))
}

fn tun_error(name: &str, e: io::Error) -> TunError {
    match e.kind() {
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
    }
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
