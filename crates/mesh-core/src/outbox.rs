//! What the node has produced and the driver has not yet taken, and the context every part of
//! the node writes its output through.

use crate::budget::ProbeBudget;
use crate::io::PendingSeal;
use crate::node::{
    Counters, Destination, Event, Transmit, MAX_QUEUE, PROBE_BUDGET, PROBE_BUDGET_WINDOW,
};
use crate::sockets::SocketId;
use mesh_proto::PublicKey;
use std::collections::{BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

/// Everything a node has produced and not yet handed to the driver, plus its drop counters.
pub(crate) struct Outbox {
    /// Datagrams to send, oldest first; runs to one UDP destination of one size share a
    /// transmit (a GSO batch).
    pub(crate) transmits: VecDeque<Transmit>,
    /// Datagrams in `transmits` (a batch counts each of its segments).
    queued: usize,
    pub(crate) to_tun: VecDeque<Vec<u8>>,
    pub(crate) events: VecDeque<Event>,
    pub(crate) counters: Counters,
    /// Whether the driver has a relay connection.
    pub(crate) relay_up: bool,
    /// Extra sockets whose [`Event::OpenSocket`] the driver has not polled yet: transmits on
    /// them wait.
    pub(crate) unannounced: BTreeSet<SocketId>,
    /// What each unconfirmed target may still be sent ([`PROBE_BUDGET`]).
    budget: ProbeBudget,
    /// Buffers the driver gave back ([`crate::Node::recycle`]), reused for new transmits and
    /// TUN packets so the data path allocates nothing once warm.
    pool: Vec<Vec<u8>>,
    /// Large buffers ([`LARGE_BUFFER`]): a transmit that a second datagram joins moves into
    /// one instead of growing by doubling (each step a copy of everything so far). They come
    /// from here and from TUN packets that a coalescing writer grew to a super-packet.
    large: Vec<Vec<u8>>,
    /// Large buffers that exist, kept or out (at most [`LARGE_LIMIT`]; one the driver drops
    /// without giving it back counts on: fewer are made, nothing worse).
    large_made: usize,
    /// Bytes before each packet in a TUN buffer ([`crate::Node::set_tun_headroom`]).
    pub(crate) tun_headroom: usize,
    /// Whether data messages to UDP destinations are reserved rather than sealed, their
    /// encryption left to the driver ([`crate::Node::set_deferred_sealing`]).
    pub(crate) defer: bool,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            transmits: VecDeque::new(),
            queued: 0,
            to_tun: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            relay_up: false,
            unannounced: BTreeSet::new(),
            budget: ProbeBudget::new(PROBE_BUDGET, PROBE_BUDGET_WINDOW),
            pool: Vec::new(),
            large: Vec::new(),
            large_made: 0,
            tun_headroom: 0,
            defer: false,
        }
    }
}

impl Outbox {
    /// A datagram to a confirmed endpoint (or an answer to what just came from there).
    pub(crate) fn udp(&mut self, socket: SocketId, dst: SocketAddr, bytes: &[u8]) {
        self.push(Destination::Udp { socket, dst }, bytes);
    }

    /// A datagram to an address that is not a confirmed endpoint: sent within the target's
    /// [`PROBE_BUDGET`], else counted and dropped.
    pub(crate) fn probe(
        &mut self,
        socket: SocketId,
        dst: SocketAddr,
        bytes: &[u8],
        now: Instant,
    ) -> bool {
        if !self.budget_allows(dst, now) {
            return false;
        }
        self.udp(socket, dst, bytes);
        true
    }

    /// Whether `dst` may be sent one more unconfirmed datagram now ([`PROBE_BUDGET`]); counts
    /// the drop when not.
    fn budget_allows(&mut self, dst: SocketAddr, now: Instant) -> bool {
        let ok = self.budget.take(dst.ip(), now);
        if !ok {
            self.counters.probe_budget_drops += 1;
        }
        ok
    }

    /// A primer: `bytes` to an unconfirmed address with IP TTL [`PRIMER_TTL`], so that it opens
    /// our own NAT's mapping toward `dst` and dies at the first router past it. Within the
    /// target's [`PROBE_BUDGET`] like any probe.
    pub(crate) fn primer(
        &mut self,
        socket: SocketId,
        dst: SocketAddr,
        bytes: &[u8],
        now: Instant,
    ) -> bool {
        if !self.budget_allows(dst, now) {
            return false;
        }
        let mut contents = self.buffer();
        contents.clear();
        contents.extend_from_slice(bytes);
        self.push_transmit(Destination::Udp { socket, dst }, contents, Some(PRIMER_TTL));
        self.counters.primers_sent += 1;
        true
    }

    pub(crate) fn open_socket(&mut self, id: SocketId) {
        self.unannounced.insert(id);
        self.events.push_back(Event::OpenSocket(id));
    }

    pub(crate) fn close_socket(&mut self, id: SocketId) {
        self.events.push_back(Event::CloseSocket(id));
    }

    /// A WireGuard message for the relay to carry to `to`.
    pub(crate) fn relay(&mut self, to: PublicKey, bytes: &[u8]) {
        self.push(Destination::Relay { to }, bytes);
    }

    /// Sends a reply on the path the message it answers came in on.
    pub(crate) fn reply(&mut self, via: Via, key: PublicKey, bytes: &[u8]) {
        match via {
            Via::Direct(from) => self.udp(from.socket, from.addr, bytes),
            Via::Relay => self.relay(key, bytes),
        }
    }

    /// An inner packet for the TUN device.
    pub(crate) fn deliver(&mut self, packet: &[u8]) {
        let mut buf = self.buffer();
        buf.clear();
        buf.resize(self.tun_headroom, 0);
        buf.extend_from_slice(packet);
        self.deliver_buffer(buf);
    }

    /// An inner packet for the TUN device, already in a buffer of its own (decrypted there,
    /// [`Outbox::tun_headroom`] bytes in, the bytes before it zeroed).
    pub(crate) fn deliver_buffer(&mut self, packet: Vec<u8>) {
        if self.to_tun.len() >= MAX_QUEUE {
            if let Some(old) = self.to_tun.pop_front() {
                self.counters.queue_drops += 1;
                self.recycle(old);
            }
        }
        self.to_tun.push_back(packet);
    }

    /// A buffer the driver may give back with [`crate::Node::recycle`]. It keeps its length:
    /// whoever takes it next sets the length it needs, and resizing within what it had writes
    /// nothing.
    pub(crate) fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() >= LARGE_BUFFER {
            if self.large.len() < LARGE_LIMIT {
                self.large.push(buf);
            } else {
                self.large_made = self.large_made.saturating_sub(1);
            }
        } else if self.pool.len() < POOL {
            self.pool.push(buf);
        }
    }

    /// A buffer from the pool (any length and contents: set them), or a new one.
    pub(crate) fn buffer(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_default()
    }

    /// Seals one datagram straight into the transmit queue: `seal` writes it into the `room`
    /// bytes it is given and says how long it came out (`None`: nothing to send). It goes at
    /// the end of the last transmit when that is a batch it can join, so a run of same-size
    /// datagrams to one destination is encrypted into one GSO buffer without a copy.
    pub(crate) fn seal(
        &mut self,
        destination: Destination,
        room: usize,
        seal: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) -> Option<usize> {
        let mut seal = Some(seal);
        if let Some(last) = self.transmits.back_mut() {
            if let Some(size) = last.can_grow(&destination) {
                let start = last.contents.len();
                into_batch_buffer(
                    &mut last.contents,
                    start + room,
                    (&mut self.large, &mut self.large_made),
                    &mut self.pool,
                );
                last.contents.resize(start + room, 0);
                let written = seal.take().and_then(|f| f(&mut last.contents[start..]));
                match written {
                    Some(n) if n == size => {
                        last.contents.truncate(start + n);
                        last.segment_size = Some(size);
                        self.queued += 1;
                        return Some(n);
                    }
                    Some(n) => {
                        // Another size ends the batch: the datagram gets a transmit of its own.
                        let own = last.contents[start..start + n].to_vec();
                        last.contents.truncate(start);
                        self.push_transmit(destination, own, None);
                        return Some(n);
                    }
                    None => {
                        last.contents.truncate(start);
                        return None;
                    }
                }
            }
        }
        let mut contents = self.buffer();
        contents.resize(room, 0);
        match seal.take().and_then(|f| f(&mut contents)) {
            Some(n) => {
                contents.truncate(n);
                self.push_transmit(destination, contents, None);
                Some(n)
            }
            None => {
                self.recycle(contents);
                None
            }
        }
    }

    /// The datagram [`Outbox::seal`] just queued was reserved, not sealed: `key` must seal it
    /// before it leaves.
    pub(crate) fn defer_last(&mut self, key: mesh_wg::SealKey) {
        let Some(last) = self.transmits.back_mut() else {
            return;
        };
        let at = last.datagrams() - 1;
        match last.pending.last_mut() {
            Some(run) if run.end == at && run.key.same(&key) => run.end += 1,
            _ => last.pending.push(PendingSeal {
                first: at,
                end: at + 1,
                key,
            }),
        }
    }

    /// The next transmit the driver may send now (not on a socket it has not been told to
    /// open yet); it may hold datagrams still to seal ([`Transmit::seal_pending`]).
    pub(crate) fn pop_transmit(&mut self) -> Option<Transmit> {
        let t = if self.unannounced.is_empty() {
            self.transmits.pop_front()?
        } else {
            let unannounced = &self.unannounced;
            let pos = self.transmits.iter().position(|t| match t.destination {
                Destination::Udp { socket, .. } => !unannounced.contains(&socket),
                Destination::Relay { .. } => true,
            })?;
            self.transmits.remove(pos)?
        };
        self.queued -= t.datagrams();
        Some(t)
    }

    /// Queues one datagram: appended to the last transmit when that is a batch it can join
    /// (same UDP destination, every datagram so far of this one's size, room left), else a
    /// transmit of its own. The oldest transmit goes when [`MAX_QUEUE`] datagrams wait.
    fn push(&mut self, destination: Destination, bytes: &[u8]) {
        if let Some(last) = self.transmits.back_mut() {
            if last.can_take(&destination, bytes.len()) {
                let end = last.contents.len() + bytes.len();
                into_batch_buffer(
                    &mut last.contents,
                    end,
                    (&mut self.large, &mut self.large_made),
                    &mut self.pool,
                );
                last.contents.extend_from_slice(bytes);
                last.segment_size = Some(bytes.len());
                self.queued += 1;
                return;
            }
        }
        let mut contents = self.buffer();
        contents.clear();
        contents.extend_from_slice(bytes);
        self.push_transmit(destination, contents, None);
    }

    /// Queues one datagram as a transmit of its own; the oldest transmit goes when
    /// [`MAX_QUEUE`] datagrams wait.
    fn push_transmit(&mut self, destination: Destination, contents: Vec<u8>, ttl: Option<u8>) {
        if self.queued >= MAX_QUEUE {
            if let Some(old) = self.transmits.pop_front() {
                self.queued -= old.datagrams();
                self.counters.queue_drops += old.datagrams() as u64;
                self.recycle(old.contents);
            }
        }
        self.transmits.push_back(Transmit {
            destination,
            contents,
            segment_size: None,
            ttl,
            pending: Vec::new(),
        });
        self.queued += 1;
    }
}

/// Most datagrams in one GSO batch (Linux sends at most 64 segments in one call).
pub const MAX_BATCH: usize = 64;
/// Most bytes in one GSO batch: the whole batch must fit one UDP datagram's length field
/// (65,535 with headers), or the kernel refuses all of it.
pub const MAX_BATCH_BYTES: usize = 64_000;
/// Most buffers kept for reuse.
const POOL: usize = 1024;
/// Capacity of a large buffer: a whole GSO batch and the room one more seal asks for. A buffer
/// given back with at least this capacity is kept among the large ones (a TUN buffer the
/// driver's writer grew to hold a coalesced super-packet must be as large: drivers check it).
pub const LARGE_BUFFER: usize = 65_536 + 2048;
/// Most large buffers in existence, kept or out (at most 17 MB, resident only as far as they
/// were written).
const LARGE_LIMIT: usize = 256;

/// A kept large buffer, or a new one of at least `need` bytes while fewer than
/// [`LARGE_LIMIT`] exist (`made` counts them).
fn take_large(large: &mut Vec<Vec<u8>>, made: &mut usize, need: usize) -> Option<Vec<u8>> {
    if let Some(b) = large.pop() {
        return Some(b);
    }
    if *made >= LARGE_LIMIT {
        return None;
    }
    *made += 1;
    Some(Vec::with_capacity(LARGE_BUFFER.max(need)))
}

/// Makes sure `contents` (a transmit that grows into a batch) holds `need` bytes without
/// growing again: when it cannot, it moves into a large buffer (kept or new), and the buffer it
/// leaves goes to `pool`. One copy of the first datagrams instead of one per doubling.
fn into_batch_buffer(
    contents: &mut Vec<u8>,
    need: usize,
    (large, made): (&mut Vec<Vec<u8>>, &mut usize),
    pool: &mut Vec<Vec<u8>>,
) {
    if contents.capacity() >= need {
        return;
    }
    // (With every large buffer out, the batch grows as a Vec does.)
    let Some(mut bigger) = take_large(large, made, need) else {
        return;
    };
    bigger.clear();
    bigger.extend_from_slice(contents);
    let small = std::mem::replace(contents, bigger);
    if pool.len() < POOL {
        pool.push(small);
    }
}
/// IP TTL of a primer: it passes the node's own gateway (one hop) and dies at the next router,
/// so a gateway that accepts unsolicited input on the far side never sees it. (Two gateways on
/// one segment are one hop apart: there a primer arrives like any probe.)
pub const PRIMER_TTL: u8 = 2;

/// Most datagrams a transmit may hold still to seal and yet be sealed by the node itself
/// rather than handed to the driver as [`crate::io::Unsealed`]: a lone packet (a ping, a small
/// request) is sealed at once, cheaper than the trip to another thread and its wake-up.
pub const SEAL_INLINE_MAX: usize = 2;
/// A transmit of fewer bytes than this the node seals itself too: a batch of TCP ACKs is
/// many datagrams but little to encrypt.
pub const SEAL_INLINE_BYTES: usize = 4096;

impl Transmit {
    /// Encrypts the datagrams reserved and not yet sealed. A datagram that cannot be sealed
    /// (which a reservation rules out) is zeroed rather than sent in clear.
    pub(crate) fn seal_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let size = self.segment_size.unwrap_or(self.contents.len()).max(1);
        for run in std::mem::take(&mut self.pending) {
            let start = (run.first * size).min(self.contents.len());
            let end = (run.end * size).min(self.contents.len());
            for datagram in self.contents[start..end].chunks_mut(size) {
                if run.key.seal(datagram).is_err() {
                    debug_assert!(false, "a reserved datagram could not be sealed");
                    datagram.fill(0);
                }
            }
        }
    }

    /// How many datagrams still wait to be sealed.
    pub(crate) fn unsealed(&self) -> usize {
        self.pending.iter().map(|r| r.end - r.first).sum()
    }

    /// Datagrams in this transmit.
    pub fn datagrams(&self) -> usize {
        match self.segment_size {
            Some(size) if size > 0 => self.contents.len().div_ceil(size),
            _ => 1,
        }
    }

    /// Each datagram of this transmit (one, or a batch's segments).
    pub fn segments(&self) -> std::slice::Chunks<'_, u8> {
        let size = self.segment_size.unwrap_or(self.contents.len()).max(1);
        self.contents.chunks(size)
    }

    /// The segment size a datagram to `destination` must have to join this batch, if one may.
    fn can_grow(&self, destination: &Destination) -> Option<usize> {
        let size = self.segment_size.unwrap_or(self.contents.len());
        let ok = matches!(destination, Destination::Udp { .. })
            && self.ttl.is_none()
            && self.destination == *destination
            && size > 0
            && self.contents.len().is_multiple_of(size)
            && self.contents.len() / size < MAX_BATCH
            && self.contents.len() + size <= MAX_BATCH_BYTES;
        ok.then_some(size)
    }

    fn can_take(&self, destination: &Destination, len: usize) -> bool {
        let size = self.segment_size.unwrap_or(self.contents.len());
        matches!(destination, Destination::Udp { .. })
            && self.ttl.is_none()
            && self.destination == *destination
            && len == size
            && len > 0
            && self.contents.len().is_multiple_of(size)
            && self.contents.len() / size < MAX_BATCH
            && self.contents.len() + len <= MAX_BATCH_BYTES
    }
}

/// A direct path's two ends: our socket and the peer's address as seen from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) socket: SocketId,
    pub(crate) addr: SocketAddr,
}

/// Where a received WireGuard message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// Straight from this UDP address, on this socket of ours.
    Direct(Endpoint),
    /// Through the relay.
    Relay,
}

/// What every part of a peer acts with: the time, the node's overlay address and MTU, a
/// scratch buffer for WireGuard to write into, and the outbox.
pub(crate) struct Ctx<'a> {
    pub(crate) now: Instant,
    /// The node's overlay address (source of the packets it originates).
    pub(crate) me: Ipv4Addr,
    /// The node's IPv6 overlay address, if it has one.
    pub(crate) me6: Option<std::net::Ipv6Addr>,
    /// The node's public key (the lower key of a pair starts over after crossed handshakes).
    pub(crate) me_key: &'a [u8; 32],
    /// The configured interface MTU.
    pub(crate) mtu: u16,
    pub(crate) buf: &'a mut [u8],
    pub(crate) out: &'a mut Outbox,
    /// Node-wide id of the next ping (see [`crate::node::PING_IDS`]).
    pub(crate) next_ping: &'a mut u16,
    /// The node's NAT kind, if known.
    pub(crate) own_nat: Option<mesh_proto::control::NatKind>,
    /// How paths are measured and chosen.
    pub(crate) quality: &'a crate::io::QualityConfig,
    /// The prefixes this node routes for its peers (see [`crate::Node::set_routes`]).
    pub(crate) routes: &'a [ipnet::IpNet],
    /// Who may send from which source address.
    pub(crate) sources: &'a crate::peers::Sources,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of sealed datagrams to one address becomes one GSO transmit, written into a kept
    /// batch buffer once it outgrows its first one, each datagram intact.
    #[test]
    fn a_growing_batch_moves_once_into_a_kept_batch_buffer() {
        let mut out = Outbox::default();
        let kept = Vec::with_capacity(LARGE_BUFFER);
        let kept_at = kept.as_ptr();
        out.recycle(kept);
        out.recycle(vec![0; 2000]);
        let dst = Destination::Udp {
            socket: SocketId::MAIN,
            dst: "192.0.2.1:51820".parse().unwrap(),
        };
        for i in 0..40u8 {
            let sealed = out.seal(dst, 1500, |buf| {
                buf[..1452].fill(i);
                Some(1452)
            });
            assert_eq!(sealed, Some(1452));
        }
        let t = out.pop_transmit().unwrap();
        assert_eq!(t.segment_size, Some(1452));
        assert_eq!(t.contents.len(), 40 * 1452);
        assert_eq!(
            t.contents.as_ptr(),
            kept_at,
            "the kept batch buffer was not used"
        );
        for (i, datagram) in t.contents.chunks(1452).enumerate() {
            assert!(
                datagram.iter().all(|&b| usize::from(b) == i),
                "datagram {i}"
            );
        }
        assert!(out.pop_transmit().is_none());
        // The first buffer went back to the pool of packet buffers.
        assert_eq!(out.pool.len(), 1);
    }
}
