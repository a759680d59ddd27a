//! The relay of [`Sim::add_relay`](super::Sim::add_relay), running the real relay code on a
//! simulated host.
//!
//! - The relay forwards by mesh-relay's own rules ([`Routes`], the code the embedded and the
//!   standalone relay run): one connection per node key, frames only between nodes of one
//!   network (the simulation has one), only from a node's current connection, with the key
//!   rewritten to the sender's.
//! - Nodes frame and reassemble with mesh-proto's [`Framer`], as the agent does, in frames of at
//!   most [`MAX_DATAGRAM`] bytes (about what one QUIC datagram holds at QUIC's initial MTU), so
//!   a full-size message is split in two as it is for real, and one lost fragment loses it.
//!
//! QUIC is modelled, not run. A UDP datagram to or from the relay stands for one QUIC packet
//! with one datagram in it: [`QUIC_HEADER_LEN`] bytes standing for the cleartext part of a QUIC
//! short header (a first byte with QUIC's fixed bit 0x40, so [`mesh_proto::demux`] calls it
//! QUIC, then the connection id), then the relay frame. The relay knows a node's connection by
//! that id, not by address, and sends to the address the connection's last datagram came from,
//! so a node whose NAT mapping moved is followed as QUIC path migration follows it. Not
//! simulated: the QUIC and Noise handshakes, encryption and its overhead, packet numbers,
//! acknowledgements, congestion control and the bounded datagram queues; a datagram is lost
//! only to the network (loss, NATs, firewalls).
//!
//! Admission: a node's QUIC connection and its admission (by the control channel for the
//! embedded relay; Noise and a ticket for a standalone one) are taken as done when
//! [`SimRelay::connect`] runs. The simulation calls it when the relay or the node appears and
//! again at every relay keepalive, each time with the address the relay sees the node at then.
//! The first call attaches the node to the relay's table on a new connection; later ones only
//! move the connection to that address (a keepalive packet would). A node the relay cannot hear
//! from is never attached, and what it gives its relay link is dropped (counted in
//! [`RelayStats::unsent`]).

use super::HostId;
use mesh_proto::demux::{classify, DatagramKind};
use mesh_proto::relay::Framer;
use mesh_proto::PublicKey;
use mesh_relay::route::{Connection, RelayCounters, Routed, Routes};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

/// Largest relay frame a node sends in one QUIC datagram: about the datagram room of a QUIC
/// connection at its initial 1200-byte MTU (quinn reports a little less; the agent asks the
/// connection). A full-size WireGuard message (1452 bytes for a 1420-byte packet) takes two.
pub const MAX_DATAGRAM: usize = 1200;
/// Bytes before each relay frame standing for the cleartext part of a QUIC short header: the
/// first byte (fixed bit 0x40 set) and an 8-byte connection id.
pub const QUIC_HEADER_LEN: usize = 9;
/// The network every simulated node belongs to.
const NETWORK: &str = "sim";
/// First byte of the modelled QUIC short header.
const SHORT_HEADER: u8 = 0x40;

/// One node's QUIC connection to the relay, named by its connection id (the same one both ways
/// in the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnId(u64);

impl Connection for ConnId {
    fn id(&self) -> usize {
        self.0 as usize
    }
}

/// The UDP payload carrying `frame` on connection `conn`.
fn packet(conn: ConnId, frame: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(QUIC_HEADER_LEN + frame.len());
    p.push(SHORT_HEADER);
    p.extend_from_slice(&conn.0.to_be_bytes());
    p.extend_from_slice(frame);
    p
}

/// The connection and frame of a UDP payload, or `None` if it is no QUIC packet.
fn unpack(datagram: &[u8]) -> Option<(ConnId, &[u8])> {
    if classify(datagram) != DatagramKind::Quic || datagram.len() < QUIC_HEADER_LEN {
        return None;
    }
    let id = u64::from_be_bytes(datagram[1..QUIC_HEADER_LEN].try_into().ok()?);
    Some((ConnId(id), &datagram[QUIC_HEADER_LEN..]))
}

/// A node's end of its relay connection: the connection and the node's framing.
struct NodeEnd {
    conn: ConnId,
    framer: Framer,
}

/// What went over the relay connections, besides the relay's own [`RelayCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Messages nodes gave their relay link.
    pub messages_out: u64,
    /// Frames (QUIC datagrams) nodes sent toward the relay for them.
    pub frames_out: u64,
    /// Messages a node could not send: no relay connection, or the message could not be framed.
    pub unsent: u64,
    /// Datagrams the relay got on no connection it knows (not QUIC, or an unknown id).
    pub unknown: u64,
    /// Frames from the relay that reached a node on its connection.
    pub frames_in: u64,
    /// Messages whole at their receiver and handed to its node.
    pub messages_in: u64,
    /// Datagrams from the relay a node dropped: not on its connection, or malformed.
    pub refused: u64,
}

/// The relay host and every node's end of its connection to it. See the module docs.
pub struct SimRelay {
    /// The relay's host.
    pub host: HostId,
    /// When nodes next refresh their connection toward it.
    pub next_keepalive: Instant,
    /// The real forwarding rules, over the modelled connections.
    routes: Routes<ConnId>,
    /// Each connection's node, and the address its datagrams last came from.
    conns: HashMap<ConnId, (PublicKey, SocketAddr)>,
    /// Each node's end of its connection, by key.
    ends: HashMap<PublicKey, NodeEnd>,
    /// Id of the next connection.
    next_conn: u64,
    stats: RelayStats,
}

impl SimRelay {
    /// A relay on `host` that nobody has connected to yet.
    pub fn new(host: HostId, next_keepalive: Instant) -> SimRelay {
        SimRelay {
            host,
            next_keepalive,
            routes: Routes::new(),
            conns: HashMap::new(),
            ends: HashMap::new(),
            next_conn: 1,
            stats: RelayStats::default(),
        }
    }

    /// Node `key`'s connection is up (admitted on the first call) and the relay sees it at
    /// `seen`.
    pub fn connect(&mut self, key: PublicKey, seen: SocketAddr) {
        if let Some(end) = self.ends.get(&key) {
            if let Some(c) = self.conns.get_mut(&end.conn) {
                c.1 = seen;
            }
            return;
        }
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.conns.insert(conn, (key, seen));
        let replaced = self.routes.attach(NETWORK, key, conn, u64::MAX);
        assert!(replaced.is_none(), "one connection per node");
        self.ends.insert(
            key,
            NodeEnd {
                conn,
                framer: Framer::default(),
            },
        );
    }

    /// Node `from` sends a WireGuard message to node `to` through the relay: the UDP payloads
    /// to send to the relay from its main socket (none when it cannot).
    pub fn node_sends(&mut self, from: &PublicKey, to: &PublicKey, message: &[u8]) -> Vec<Vec<u8>> {
        self.stats.messages_out += 1;
        let Some(end) = self.ends.get_mut(from) else {
            self.stats.unsent += 1;
            return Vec::new();
        };
        match end.framer.frame(to, message, MAX_DATAGRAM) {
            Ok(frames) => {
                self.stats.frames_out += frames.len() as u64;
                frames.iter().map(|f| packet(end.conn, f)).collect()
            }
            Err(_) => {
                self.stats.unsent += 1;
                Vec::new()
            }
        }
    }

    /// A datagram from `from` reached the relay: where to send what it forwards, if anything.
    pub fn forward(&mut self, from: SocketAddr, datagram: &[u8]) -> Option<(SocketAddr, Vec<u8>)> {
        let known = unpack(datagram).filter(|(c, _)| self.conns.contains_key(c));
        let Some((conn, frame)) = known else {
            self.stats.unknown += 1;
            return None;
        };
        let (key, addr) = self.conns.get_mut(&conn)?;
        // Path migration: the connection goes on from wherever its node now sends from.
        *addr = from;
        let key = *key;
        // A refused frame is counted in the relay's counters (`dropped`).
        let Routed { to, frame } = self.routes.route(NETWORK, &key, &conn, frame).ok()?;
        let (_, dst) = self.conns.get(&to)?;
        Some((*dst, packet(to, &frame)))
    }

    /// A datagram from the relay reached node `key`: the message it completes, if any, with
    /// the node it came from.
    pub fn node_receives(
        &mut self,
        key: &PublicKey,
        datagram: &[u8],
        now: Instant,
    ) -> Option<(PublicKey, Vec<u8>)> {
        let end = self.ends.get_mut(key);
        let frame = end.as_ref().and_then(|end| {
            unpack(datagram)
                .filter(|(c, _)| *c == end.conn)
                .map(|(_, f)| f)
        });
        let (Some(end), Some(frame)) = (end, frame) else {
            self.stats.refused += 1;
            return None;
        };
        self.stats.frames_in += 1;
        match end.framer.receive(frame, now) {
            Ok(Some(message)) => {
                self.stats.messages_in += 1;
                Some(message)
            }
            Ok(None) => None,
            Err(_) => {
                self.stats.refused += 1;
                None
            }
        }
    }

    /// The relay's totals: frames forwarded and dropped by its rules.
    pub fn counters(&self) -> RelayCounters {
        self.routes.counters()
    }

    /// What went over the nodes' relay connections.
    pub fn stats(&self) -> RelayStats {
        self.stats
    }

    /// Messages nodes gave up reassembling (a fragment lost or late).
    pub fn incomplete(&self) -> u64 {
        self.ends.values().map(|e| e.framer.dropped()).sum()
    }
}
