//! What the node has produced and the driver has not yet taken, and the context every part of
//! the node writes its output through.

use crate::budget::ProbeBudget;
use crate::node::{
    Counters, Event, RelayTransmit, Transmit, MAX_QUEUE, PROBE_BUDGET, PROBE_BUDGET_WINDOW,
};
use crate::sockets::SocketId;
use mesh_proto::PublicKey;
use std::collections::{BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

/// Everything a node has produced and not yet handed to the driver, plus its drop counters.
pub(crate) struct Outbox {
    pub(crate) transmits: VecDeque<Transmit>,
    pub(crate) relayed: VecDeque<RelayTransmit>,
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
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            transmits: VecDeque::new(),
            relayed: VecDeque::new(),
            to_tun: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            relay_up: false,
            unannounced: BTreeSet::new(),
            budget: ProbeBudget::new(PROBE_BUDGET, PROBE_BUDGET_WINDOW),
        }
    }
}

impl Outbox {
    /// A datagram to a confirmed endpoint (or an answer to what just came from there).
    pub(crate) fn udp(&mut self, socket: SocketId, dst: SocketAddr, bytes: &[u8]) {
        push_bounded(
            &mut self.transmits,
            &mut self.counters,
            Transmit {
                socket,
                dst,
                payload: bytes.to_vec(),
            },
        );
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
        if !self.budget.take(dst.ip(), now) {
            self.counters.probe_budget_drops += 1;
            return false;
        }
        self.udp(socket, dst, bytes);
        true
    }

    pub(crate) fn open_socket(&mut self, id: SocketId) {
        self.unannounced.insert(id);
        self.events.push_back(Event::OpenSocket(id));
    }

    pub(crate) fn close_socket(&mut self, id: SocketId) {
        self.events.push_back(Event::CloseSocket(id));
    }

    pub(crate) fn relay(&mut self, to: PublicKey, bytes: &[u8]) {
        push_bounded(
            &mut self.relayed,
            &mut self.counters,
            RelayTransmit {
                to,
                payload: bytes.to_vec(),
            },
        );
    }

    /// Sends a reply on the path the message it answers came in on.
    pub(crate) fn reply(&mut self, via: Via, key: PublicKey, bytes: &[u8]) {
        match via {
            Via::Direct(from) => self.udp(from.socket, from.addr, bytes),
            Via::Relay => self.relay(key, bytes),
        }
    }

    /// An inner packet for the TUN device.
    pub(crate) fn deliver(&mut self, packet: Vec<u8>) {
        push_bounded(&mut self.to_tun, &mut self.counters, packet);
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
    /// The node's public key (the lower key of a pair starts over after crossed handshakes).
    pub(crate) me_key: &'a [u8; 32],
    /// The configured interface MTU.
    pub(crate) mtu: u16,
    pub(crate) buf: &'a mut [u8],
    pub(crate) out: &'a mut Outbox,
    /// Node-wide id of the next ping (see [`crate::node::PING_IDS`]).
    pub(crate) next_ping: &'a mut u16,
}

pub(crate) fn push_bounded<T>(queue: &mut VecDeque<T>, counters: &mut Counters, item: T) {
    if queue.len() >= MAX_QUEUE {
        queue.pop_front();
        counters.queue_drops += 1;
    }
    queue.push_back(item);
}
