//! The edges of a mesh node: everything that touches the kernel.
//!
//! - [`socket`]: the node's one UDP socket, with batched receive (recvmmsg/GRO) and batched send
//!   (GSO) through quinn-udp, and [`socket::QuicSocket`], which lets a quinn endpoint share that
//!   socket: the driver hands it the QUIC datagrams it demultiplexed.
//! - [`tun`]: creating the TUN device.
//! - [`netlink`]: address, route, MTU and link state through rtnetlink; local addresses.
//! - [`bypass`]: the firewall mark on mesh's own sockets and the policy-routing rules that keep
//!   marked packets off the overlay interface.
//! - [`firewall`]: TCP MSS clamping on the overlay interface (nftables).
//!
//! No protocol logic lives here.

pub mod bypass;
pub mod exits;
pub mod firewall;
pub mod netlink;
pub mod socket;
pub mod tun;
