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

/// Capacity a packet's buffer takes on when the writer first coalesces into it: a TCP
/// super-packet of 64 KiB behind its virtio-net header, with room to spare. The node files a
/// buffer this large among its large ones when it comes back (`mesh_core::LARGE_BUFFER`, the
/// same number; the agent checks that they agree).
pub const COALESCE_CAPACITY: usize = 65_536 + 2048;

/// Capacity a packet's buffer reports to tun-rs, whatever it really has: the largest IP
/// packet (its length field holds 65,535) behind the virtio-net header.
///
/// tun-rs bounds a coalesced super-packet only by the capacity its first buffer reports
/// (less twice the header room) and writes the sum of the segments into the IPv4 total length
/// (or IPv6 payload length) and UDP length fields as 16-bit numbers. A buffer that reported
/// more let a batch of one flow grow past 65,535 bytes; the lengths wrapped, the kernel cut
/// the packet to the wrapped length and dropped the whole batch (a UDP super-packet cut to
/// one segment or less fails segmentation in `udp_queue_rcv_skb`). That took out dozens of
/// VXLAN packets at a time whenever a peer's datagrams arrived in long runs (GRO on the
/// underlay), and flannel's TCP over them collapsed.
pub const COALESCE_LIMIT: usize = VIRTIO_NET_HDR_LEN + 65_535;

/// A packet for [`tun_rs::AsyncDevice::send_multiple`] in a buffer that reports
/// [`COALESCE_LIMIT`] and takes [`COALESCE_CAPACITY`], once, when tun-rs writes past what it
/// has.
///
/// tun-rs coalesces the segments of a flow into the flow's first buffer only if that buffer's
/// capacity already holds the whole super-packet (it never allocates: "insufficient
/// capacity" writes the packet alone). [`Heads`] gives the first packet of each flow it finds
/// a buffer of that size before the write; this type is the fallback for the rest (a flow
/// beyond those searched, a prepended header): it reports the capacity it does not have and
/// grows on the one write past it, so such a flow still coalesces, at one allocation and a
/// copy of one packet.
#[derive(Debug, Default)]
pub struct TunPacket(pub Vec<u8>);

impl TunPacket {
    /// Makes room for `len` bytes: the whole coalescing capacity at once rather than the
    /// doublings a `Vec` would go through (each a copy of everything so far).
    fn room_for(&mut self, len: usize) {
        let v = &mut self.0;
        if len > v.capacity() {
            v.reserve_exact(COALESCE_CAPACITY.max(len) - v.len());
        }
    }
}

impl AsRef<[u8]> for TunPacket {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsMut<[u8]> for TunPacket {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl tun_rs::ExpandBuffer for TunPacket {
    fn buf_capacity(&self) -> usize {
        // Never more, even for a buffer that has more (see COALESCE_LIMIT).
        COALESCE_LIMIT
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        self.room_for(new_len);
        self.0.resize(new_len, value);
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        self.room_for(self.0.len() + src.len());
        self.0.extend_from_slice(src);
    }
}

/// Most large buffers a [`Heads`] keeps (at most 4.3 MB, resident only as far as written).
const HEADS_KEPT: usize = 64;

/// Moves the first packet of each flow that a batch holds more than one packet of into a buffer
/// of [`COALESCE_CAPACITY`] before the batch is written, from a set it keeps, and takes those
/// buffers back afterwards.
///
/// The flow heads are where tun-rs coalesces a flow's segments ([`TunPacket`]); without this
/// each would grow (an allocation of 66 KB, its pages faulted in as they are written) in every
/// batch. The packets around them keep their small buffers, so the memory held is in
/// proportion to the flows of one batch, not to the packets in flight.
#[derive(Debug, Default)]
pub struct Heads {
    /// Large buffers between batches.
    kept: Vec<Vec<u8>>,
    /// The small buffers the heads of the batch being written came in.
    small: Vec<Vec<u8>>,
    /// Flows seen in the batch being prepared: key, index of its first packet, whether a
    /// second packet followed.
    flows: Vec<(FlowKey, usize, bool)>,
}

/// Protocol, addresses and ports of a TCP or UDP packet (IPv6 addresses take 32 bytes).
type FlowKey = [u8; 37];

/// Most flows a batch is searched for: past that, packets of further flows are written as
/// they come (a linear search stays cheap).
const FLOWS_SEARCHED: usize = 16;

impl Heads {
    /// Moves each flow head of `batch` (packets `offset` bytes into their buffers) into a large
    /// buffer, while there are kept ones or fewer than [`HEADS_KEPT`] exist.
    pub fn prepare(&mut self, batch: &mut [TunPacket], offset: usize) {
        self.flows.clear();
        for (i, p) in batch.iter().enumerate() {
            let Some(key) = p.0.get(offset..).and_then(flow_key) else {
                continue;
            };
            if let Some(flow) = self.flows.iter_mut().find(|(k, _, _)| *k == key) {
                flow.2 = true;
            } else if self.flows.len() < FLOWS_SEARCHED {
                self.flows.push((key, i, false));
            }
        }
        for &(_, head, more) in &self.flows {
            if !more || batch[head].0.capacity() >= COALESCE_CAPACITY {
                continue;
            }
            let made = self.kept.len() + self.small.len();
            let mut big = match self.kept.pop() {
                Some(b) => b,
                None if made < HEADS_KEPT => Vec::with_capacity(COALESCE_CAPACITY),
                None => break,
            };
            big.clear();
            big.extend_from_slice(&batch[head].0);
            self.small.push(std::mem::replace(&mut batch[head].0, big));
        }
    }

    /// Takes the large buffers of a written batch back (the writer may have moved them around
    /// the batch), leaving the small ones they replaced in their place: whoever gets the
    /// batch's buffers back gets as many as it gave.
    pub fn restore(&mut self, batch: &mut [TunPacket]) {
        for p in batch.iter_mut() {
            if p.0.capacity() < COALESCE_CAPACITY {
                continue;
            }
            let Some(small) = self.small.pop() else {
                break;
            };
            self.kept.push(std::mem::replace(&mut p.0, small));
        }
        // Heads that grew on their own (none kept was left) stay with the batch; any small
        // buffer not swapped back is dropped.
        self.small.clear();
    }
}

/// The flow a TCP or UDP packet belongs to, for IPv4 or IPv6 (`None` for anything else or a
/// packet too short for its headers).
fn flow_key(packet: &[u8]) -> Option<FlowKey> {
    let mut key = [0u8; 37];
    match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let proto = *packet.get(9)?;
            if !matches!(proto, 6 | 17) || ihl < 20 {
                return None;
            }
            key[0] = proto;
            key[1..9].copy_from_slice(packet.get(12..20)?);
            key[33..37].copy_from_slice(packet.get(ihl..ihl + 4)?);
        }
        6 => {
            let proto = *packet.get(6)?;
            if !matches!(proto, 6 | 17) {
                return None;
            }
            key[0] = proto;
            key[1..33].copy_from_slice(packet.get(8..40)?);
            key[33..37].copy_from_slice(packet.get(40..44)?);
        }
        _ => return None,
    }
    Some(key)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use tun_rs::ExpandBuffer;

    /// A packet's buffer claims the capacity of a super-packet, stays as small as it is while
    /// nothing is written past it, and grows once, to that capacity, when a flow is coalesced
    /// into it.
    #[test]
    fn a_packet_grows_once_when_a_flow_is_coalesced_into_it() {
        let mut p = TunPacket(vec![7; 1430]);
        let small = p.0.capacity();
        assert!(small < COALESCE_CAPACITY);
        assert_eq!(p.buf_capacity(), COALESCE_LIMIT);
        p.buf_resize(1400, 0);
        assert_eq!(p.0.capacity(), small, "shrinking must not allocate");
        p.buf_extend_from_slice(&[1; 1380]);
        assert!(p.0.capacity() >= COALESCE_CAPACITY);
        let grown = (p.0.capacity(), p.0.as_ptr());
        for _ in 0..45 {
            p.buf_extend_from_slice(&[2; 1380]);
        }
        assert_eq!((p.0.capacity(), p.0.as_ptr()), grown, "grew more than once");
        assert_eq!(p.0.len(), 1400 + 46 * 1380);
        assert!(p.0[..1400].iter().all(|&b| b == 7));
        assert!(p.0[1400..2780].iter().all(|&b| b == 1));
        assert!(p.0[2780..].iter().all(|&b| b == 2));
        // A prepend resizes the new first packet's buffer: the same single growth.
        let mut q = TunPacket(vec![3; 1430]);
        q.buf_resize(1430 + 1380 * 10, 0);
        assert!(q.0.capacity() >= COALESCE_CAPACITY);
        assert!(q.0[..1430].iter().all(|&b| b == 3));
    }

    /// An IPv4 TCP packet behind `offset` bytes of room, from port `sport`, `len` bytes long.
    fn tcp4(offset: usize, sport: u16, len: usize, fill: u8) -> TunPacket {
        let mut p = vec![0u8; offset + len];
        let ip = &mut p[offset..];
        ip[0] = 0x45;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[100, 64, 0, 1]);
        ip[16..20].copy_from_slice(&[100, 64, 0, 2]);
        ip[20..22].copy_from_slice(&sport.to_be_bytes());
        ip[22..24].copy_from_slice(&5201u16.to_be_bytes());
        ip[40..].fill(fill);
        TunPacket(p)
    }

    /// The first packet of each flow with more than one packet in the batch gets a large
    /// buffer with its bytes unchanged; a lone packet, an ICMP packet and a runt keep theirs.
    /// Afterwards the large buffers are kept and the batch holds small ones again, as many as
    /// before; the next batch reuses the kept ones.
    #[test]
    fn flow_heads_get_kept_large_buffers_and_the_batch_gets_its_own_back() {
        let off = VIRTIO_NET_HDR_LEN;
        let mut icmp = vec![0u8; off + 84];
        icmp[off] = 0x45;
        icmp[off + 9] = 1;
        let mut batch = vec![
            tcp4(off, 1000, 1420, 1),
            tcp4(off, 2000, 1420, 2),
            tcp4(off, 1000, 1420, 3),
            TunPacket(icmp),
            tcp4(off, 3000, 600, 4),
            tcp4(off, 2000, 1420, 5),
            TunPacket(vec![0x45; off + 8]),
        ];
        let before: Vec<Vec<u8>> = batch.iter().map(|p| p.0.clone()).collect();
        let mut heads = Heads::default();
        heads.prepare(&mut batch, off);
        let large: Vec<bool> = batch
            .iter()
            .map(|p| p.0.capacity() >= COALESCE_CAPACITY)
            .collect();
        assert_eq!(large, [true, true, false, false, false, false, false]);
        for (p, b) in batch.iter().zip(&before) {
            assert_eq!(&p.0, b);
        }
        let large_at = [batch[0].0.as_ptr(), batch[1].0.as_ptr()];
        heads.restore(&mut batch);
        assert!(batch.iter().all(|p| p.0.capacity() < COALESCE_CAPACITY));
        assert_eq!(batch.len(), before.len());
        assert_eq!(heads.kept.len(), 2);
        let mut next = vec![tcp4(off, 7, 1420, 8), tcp4(off, 7, 1420, 9)];
        heads.prepare(&mut next, off);
        assert!(next[0].0.capacity() >= COALESCE_CAPACITY);
        assert!(
            large_at.contains(&next[0].0.as_ptr()),
            "a kept buffer was not reused"
        );
        assert_eq!(heads.kept.len(), 1);
        assert_eq!(next[0].0, tcp4(off, 7, 1420, 8).0);
    }

    /// Large buffers are reused batch after batch: what is kept is the flow heads of one
    /// batch (at most [`FLOWS_SEARCHED`] of them), not of every batch written.
    #[test]
    fn large_buffers_are_reused_and_bounded_by_one_batch() {
        let off = VIRTIO_NET_HDR_LEN;
        let mut heads = Heads::default();
        for round in 0..8u16 {
            let flows = FLOWS_SEARCHED as u16 + 4;
            let mut batch: Vec<TunPacket> = (0..flows)
                .flat_map(|f| {
                    [
                        tcp4(off, round * 100 + f, 200, 0),
                        tcp4(off, round * 100 + f, 200, 1),
                    ]
                })
                .collect();
            heads.prepare(&mut batch, off);
            let large = batch
                .iter()
                .filter(|p| p.0.capacity() >= COALESCE_CAPACITY)
                .count();
            assert_eq!(large, FLOWS_SEARCHED, "round {round}");
            heads.restore(&mut batch);
            assert_eq!(heads.kept.len(), FLOWS_SEARCHED, "round {round}");
            assert!(heads.kept.len() + heads.small.len() <= HEADS_KEPT);
        }
    }

    /// Flow keys: TCP and UDP over IPv4 and IPv6 by addresses and ports; nothing else, and no
    /// packet too short for its headers.
    #[test]
    fn flow_keys_come_from_tcp_and_udp_headers_only() {
        let a = tcp4(0, 1, 60, 0).0;
        let mut b = a.clone();
        b[21] = 2;
        assert!(flow_key(&a).is_some());
        assert_ne!(flow_key(&a), flow_key(&b));
        let mut v6 = vec![0u8; 60];
        v6[0] = 0x60;
        v6[6] = 17;
        assert!(flow_key(&v6).is_some());
        assert_eq!(flow_key(&v6[..43]), None);
        v6[6] = 58;
        assert_eq!(flow_key(&v6), None);
        assert_eq!(flow_key(&a[..23]), None);
        assert_eq!(flow_key(&[]), None);
        let mut bad = a.clone();
        bad[0] = 0x41;
        assert_eq!(flow_key(&bad), None);
    }
}
