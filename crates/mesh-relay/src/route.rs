//! The forwarding rules of the relay, without I/O.
//!
//! [`Routes`] is the table of admitted nodes (one connection per network and node key) and the
//! decision for each frame a node sends: the connection it goes to and the bytes to send, or why
//! it is dropped. It never touches a socket or a clock. Its driver admits and removes nodes,
//! hands it every frame with the connection it came on, and sends what it returns: the
//! [`Forwarder`](crate::Forwarder) over QUIC and TCP links in the embedded and the standalone relay, and
//! mesh-core's simulation, so relayed paths are simulated with the very rules that run.
//!
//! A frame ([`mesh_proto::relay`]) is forwarded only when:
//! - it decodes;
//! - it is not addressed to its own sender;
//! - it came on the sender's current connection (not one replaced by a newer connection of the
//!   same node, nor one whose node was removed or revoked);
//! - its destination is connected in the sender's network.
//!
//! The forwarded frame carries the sender's key instead of the destination's, so the receiver
//! learns who sent it and no node can pose as another.

use mesh_proto::relay::{self, RelayError};
use mesh_proto::PublicKey;
use std::collections::HashMap;

/// A connection to one admitted node, as the rules see it: the handle the driver sends on.
pub trait Connection {
    /// Tells this connection apart from every other the relay has had: clones of one connection
    /// share it, two connections never do (even two of the same node).
    fn id(&self) -> usize;
}

/// Totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Frames forwarded.
    pub forwarded: u64,
    /// Bytes forwarded.
    pub forwarded_bytes: u64,
    /// Frames dropped: malformed, addressed to their sender, from a connection that may not
    /// send, to an unknown or offline destination, or not taken by the destination's connection.
    pub dropped: u64,
    /// Connections replaced because the same node connected again.
    pub replaced: u64,
    /// Nodes taken out because they were removed or revoked.
    pub revoked: u64,
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not a relay frame.
    #[error("malformed relay frame: {0}")]
    Malformed(#[from] RelayError),
    /// Addressed to the node that sent it.
    #[error("relay frame addressed to its own sender")]
    ToSelf,
    /// The connection it came on is not its node's current one: never admitted, replaced by a
    /// newer connection of the same node, or the node was removed or revoked.
    #[error("relay frame from a connection that may not send")]
    NotAdmitted,
    /// Nobody with that key is connected in the sender's network.
    #[error("relay frame to a node not connected in the sender's network")]
    NoDestination,
}

/// The destination of a frame `from` sent: decodes the header and refuses what is malformed or
/// addressed to its own sender (the first rules of [`Routes::route`]).
pub fn destination(from: &PublicKey, datagram: &[u8]) -> Result<PublicKey, Refused> {
    let dst = relay::decode(datagram)?.key;
    if dst == *from {
        return Err(Refused::ToSelf);
    }
    Ok(dst)
}

/// Where one frame goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed<C> {
    /// The destination's connection.
    pub to: C,
    /// The frame to send on it: the sender's frame with the sender's key.
    pub frame: Vec<u8>,
}

struct Entry<C> {
    conn: C,
    /// Unix seconds when the node's admission ends (`u64::MAX`: never, as in the embedded
    /// relay, where the control connection itself is the admission).
    expires: u64,
}

/// Admitted nodes by network and key, and the rules for forwarding between them.
pub struct Routes<C> {
    networks: HashMap<String, HashMap<PublicKey, Entry<C>>>,
    counters: RelayCounters,
    generation: u64,
}

impl<C> Default for Routes<C> {
    fn default() -> Self {
        Routes {
            networks: HashMap::new(),
            counters: RelayCounters::default(),
            generation: 0,
        }
    }
}

impl<C: Connection> Routes<C> {
    /// An empty table.
    pub fn new() -> Self {
        Routes::default()
    }

    fn entry(&self, network: &str, key: &PublicKey) -> Option<&Entry<C>> {
        self.networks.get(network)?.get(key)
    }

    fn take(&mut self, network: &str, key: &PublicKey) -> Option<Entry<C>> {
        let nodes = self.networks.get_mut(network)?;
        let e = nodes.remove(key)?;
        self.generation += 1;
        if nodes.is_empty() {
            self.networks.remove(network);
        }
        Some(e)
    }

    /// Admits `key` of `network` on `conn` until `expires` (unix seconds). Returns the node's
    /// older connection when this one replaces it: the driver closes that one.
    pub fn attach(&mut self, network: &str, key: PublicKey, conn: C, expires: u64) -> Option<C> {
        let id = conn.id();
        self.generation += 1;
        let nodes = self.networks.entry(network.to_owned()).or_default();
        let old = nodes.insert(key, Entry { conn, expires })?;
        if old.conn.id() == id {
            return None;
        }
        self.counters.replaced += 1;
        Some(old.conn)
    }

    /// The node's connection `conn` closed: takes the node out, unless a newer connection of
    /// the same node replaced it. Returns whether it was taken out.
    pub fn detach(&mut self, network: &str, key: &PublicKey, conn: &C) -> bool {
        if !self.is_current(network, key, conn) {
            return false;
        }
        self.take(network, key).is_some()
    }

    /// Takes `key` of `network` out at once (the node was removed): nothing it sends is
    /// forwarded and nothing reaches it. Returns its connection, for the driver to close.
    pub fn remove(&mut self, network: &str, key: &PublicKey) -> Option<C> {
        let e = self.take(network, key)?;
        self.counters.revoked += 1;
        Some(e.conn)
    }

    /// Applies a revocation: takes `key` of `network` out if its admission ends at or before
    /// `cutoff`. Returns its connection, for the driver to close.
    pub fn revoke(&mut self, network: &str, key: &PublicKey, cutoff: u64) -> Option<C> {
        if self.entry(network, key)?.expires > cutoff {
            return None;
        }
        self.remove(network, key)
    }

    /// Extends the admission of `key` of `network` (a renewed ticket), if `conn` is still its
    /// current connection. Returns whether it was.
    pub fn set_expires(&mut self, network: &str, key: &PublicKey, conn: &C, expires: u64) -> bool {
        let e = self
            .networks
            .get_mut(network)
            .and_then(|nodes| nodes.get_mut(key));
        match e {
            Some(e) if e.conn.id() == conn.id() => {
                e.expires = expires;
                true
            }
            _ => false,
        }
    }

    /// Whether `conn` is the current connection of `key` of `network`.
    pub fn is_current(&self, network: &str, key: &PublicKey, conn: &C) -> bool {
        self.entry(network, key)
            .is_some_and(|e| e.conn.id() == conn.id())
    }

    /// Whether `key` of `network` is connected.
    pub fn contains(&self, network: &str, key: &PublicKey) -> bool {
        self.entry(network, key).is_some()
    }

    /// Nodes connected, over all networks.
    pub fn len(&self) -> usize {
        self.networks.values().map(HashMap::len).sum()
    }

    /// Whether no node is connected.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// Decides where `datagram`, sent by `from` of `network` on `sender`, goes, and counts it as
    /// forwarded or dropped. The driver sends [`Routed::frame`] on [`Routed::to`].
    pub fn route(
        &mut self,
        network: &str,
        from: &PublicKey,
        sender: &C,
        datagram: &[u8],
    ) -> Result<Routed<C>, Refused>
    where
        C: Clone,
    {
        let routed = self.decide(network, from, sender, datagram);
        match &routed {
            Ok(r) => {
                self.counters.forwarded += 1;
                self.counters.forwarded_bytes += r.frame.len() as u64;
            }
            Err(_) => self.counters.dropped += 1,
        }
        routed
    }

    fn decide(
        &self,
        network: &str,
        from: &PublicKey,
        sender: &C,
        datagram: &[u8],
    ) -> Result<Routed<C>, Refused>
    where
        C: Clone,
    {
        let dst = destination(from, datagram)?;
        let to = self.resolve(network, from, sender, &dst)?;
        let mut frame = datagram.to_vec();
        relay::set_key(&mut frame, from)?;
        Ok(Routed { to, frame })
    }

    /// The connection a frame from `from` of `network` on `sender`, addressed to `dst`, goes
    /// to: the rules of [`Routes::route`] after the frame was decoded ([`destination`]). The
    /// answer holds until the table changes ([`Routes::generation`]), so a driver may keep it
    /// for later frames of the same sender while the generation stays the same. Counts nothing.
    pub fn resolve(
        &self,
        network: &str,
        from: &PublicKey,
        sender: &C,
        dst: &PublicKey,
    ) -> Result<C, Refused>
    where
        C: Clone,
    {
        if !self.is_current(network, from, sender) {
            return Err(Refused::NotAdmitted);
        }
        Ok(self
            .entry(network, dst)
            .ok_or(Refused::NoDestination)?
            .conn
            .clone())
    }

    /// Changes with every change of the table (a node admitted, replaced, detached, removed or
    /// revoked): what [`Routes::resolve`] answered stays true while this stays the same.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Totals since start.
    pub fn counters(&self) -> RelayCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::relay::{decode, encode};

    /// A connection in the tests: its number is its identity.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Conn(usize);

    impl Connection for Conn {
        fn id(&self) -> usize {
            self.0
        }
    }

    const A: PublicKey = PublicKey([1; 32]);
    const B: PublicKey = PublicKey([2; 32]);
    const C: PublicKey = PublicKey([3; 32]);

    fn frame(to: &PublicKey, message: &[u8]) -> Vec<u8> {
        encode(to, 7, message, 1200).unwrap().remove(0)
    }

    /// A and B in network "n", on connections 1 and 2.
    fn two() -> Routes<Conn> {
        let mut r = Routes::new();
        assert_eq!(r.attach("n", A, Conn(1), u64::MAX), None);
        assert_eq!(r.attach("n", B, Conn(2), u64::MAX), None);
        r
    }

    #[test]
    fn forwards_with_the_key_rewritten_to_the_senders() {
        let mut r = two();
        let f = frame(&B, b"wireguard");
        let routed = r.route("n", &A, &Conn(1), &f).unwrap();
        assert_eq!(routed.to, Conn(2));
        let out = decode(&routed.frame).unwrap();
        assert_eq!((out.key, out.id, out.chunk), (A, 7, &b"wireguard"[..]));
        assert_eq!(routed.frame.len(), f.len());
        let c = r.counters();
        assert_eq!(
            (c.forwarded, c.forwarded_bytes, c.dropped),
            (1, f.len() as u64, 0)
        );
    }

    #[test]
    fn only_within_the_senders_network() {
        let mut r = two();
        r.attach("other", C, Conn(3), u64::MAX);
        assert_eq!(
            r.route("n", &A, &Conn(1), &frame(&C, b"x")),
            Err(Refused::NoDestination)
        );
        assert_eq!(
            r.route("other", &C, &Conn(3), &frame(&A, b"x")),
            Err(Refused::NoDestination)
        );
        // The same key in two networks: each network reaches its own connection.
        r.attach("other", B, Conn(4), u64::MAX);
        assert_eq!(
            r.route("n", &A, &Conn(1), &frame(&B, b"x")).unwrap().to,
            Conn(2)
        );
        assert_eq!(
            r.route("other", &C, &Conn(3), &frame(&B, b"x")).unwrap().to,
            Conn(4)
        );
        // A sender admitted in one network cannot send as a member of another.
        assert_eq!(
            r.route("other", &A, &Conn(1), &frame(&B, b"x")),
            Err(Refused::NotAdmitted)
        );
        assert_eq!(r.counters().dropped, 3);
    }

    #[test]
    fn a_frame_to_its_own_sender_is_dropped() {
        let mut r = two();
        assert_eq!(
            r.route("n", &A, &Conn(1), &frame(&A, b"x")),
            Err(Refused::ToSelf)
        );
        assert_eq!(r.counters().dropped, 1);
    }

    #[test]
    fn only_the_current_connection_of_a_key_may_send() {
        let mut r = two();
        // Never admitted.
        assert_eq!(
            r.route("n", &C, &Conn(9), &frame(&A, b"x")),
            Err(Refused::NotAdmitted)
        );
        // A posing as A on B's connection.
        assert_eq!(
            r.route("n", &A, &Conn(2), &frame(&B, b"x")),
            Err(Refused::NotAdmitted)
        );
        // A connects again: the older connection is handed back to be closed, and may no
        // longer send; frames to A go to the new one.
        assert_eq!(r.attach("n", A, Conn(5), u64::MAX), Some(Conn(1)));
        assert_eq!(r.counters().replaced, 1);
        assert_eq!(
            r.route("n", &A, &Conn(1), &frame(&B, b"x")),
            Err(Refused::NotAdmitted)
        );
        assert_eq!(
            r.route("n", &A, &Conn(5), &frame(&B, b"x")).unwrap().to,
            Conn(2)
        );
        assert_eq!(
            r.route("n", &B, &Conn(2), &frame(&A, b"x")).unwrap().to,
            Conn(5)
        );
        // The old connection closing does not take the node out; the current one does.
        assert!(!r.detach("n", &A, &Conn(1)));
        assert!(r.contains("n", &A));
        assert!(r.detach("n", &A, &Conn(5)));
        assert!(!r.contains("n", &A));
        assert_eq!(
            r.route("n", &B, &Conn(2), &frame(&A, b"x")),
            Err(Refused::NoDestination)
        );
        // Attaching the same connection again replaces nothing.
        assert_eq!(r.attach("n", B, Conn(2), 10), None);
        assert_eq!(r.counters().replaced, 1);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn malformed_frames_are_dropped_and_counted() {
        let mut r = two();
        let mut bad_version = frame(&B, b"x");
        bad_version[0] = 9;
        let mut bad_fragment = frame(&B, b"x");
        bad_fragment[1] = 0x11; // index 1 of 1
        for (bytes, why) in [
            (&[][..], RelayError::Short),
            (&[1; 36][..], RelayError::Short),
            (&bad_version[..], RelayError::Version(9)),
            (&bad_fragment[..], RelayError::Fragment),
        ] {
            assert_eq!(
                r.route("n", &A, &Conn(1), bytes),
                Err(Refused::Malformed(why))
            );
        }
        let c = r.counters();
        assert_eq!((c.forwarded, c.forwarded_bytes, c.dropped), (0, 0, 4));
    }

    #[test]
    fn removed_and_revoked_nodes_neither_send_nor_receive() {
        let mut r = two();
        r.attach("n", C, Conn(3), 100);
        assert_eq!(r.remove("n", &A), Some(Conn(1)));
        assert_eq!(r.remove("n", &A), None);
        assert_eq!(
            r.route("n", &A, &Conn(1), &frame(&B, b"x")),
            Err(Refused::NotAdmitted)
        );
        assert_eq!(
            r.route("n", &B, &Conn(2), &frame(&A, b"x")),
            Err(Refused::NoDestination)
        );
        // A revocation only reaches admissions that end at or before its cutoff.
        assert_eq!(r.revoke("n", &C, 99), None);
        assert!(!r.set_expires("n", &C, &Conn(7), 200), "not C's connection");
        assert!(r.set_expires("n", &C, &Conn(3), 200));
        assert_eq!(r.revoke("n", &C, 100), None);
        assert_eq!(r.revoke("n", &C, 200), Some(Conn(3)));
        assert_eq!(r.counters().revoked, 2);
        assert_eq!(r.len(), 1);
        assert!(r.remove("n", &B).is_some());
        assert!(r.is_empty());
    }

    /// What a forwarding task may keep: `resolve` answers as `route` does, and the
    /// generation moves with every change that could alter an answer, and only then.
    #[test]
    fn resolve_follows_route_and_the_generation_marks_every_change() {
        let mut r = two();
        let g = r.generation();
        assert_eq!(r.resolve("n", &A, &Conn(1), &B), Ok(Conn(2)));
        assert_eq!(r.resolve("n", &A, &Conn(9), &B), Err(Refused::NotAdmitted));
        assert_eq!(
            r.resolve("n", &A, &Conn(1), &C),
            Err(Refused::NoDestination)
        );
        assert_eq!(destination(&A, &frame(&A, b"x")), Err(Refused::ToSelf));
        assert_eq!(destination(&A, &frame(&B, b"x")), Ok(B));
        // Forwarding and renewals change no answer.
        r.route("n", &A, &Conn(1), &frame(&B, b"x")).unwrap();
        assert!(r.set_expires("n", &A, &Conn(1), 50));
        assert_eq!(r.generation(), g);
        let mut seen = vec![g];
        let mut changed = |r: &Routes<Conn>| {
            assert!(!seen.contains(&r.generation()), "the generation moved");
            seen.push(r.generation());
        };
        r.attach("n", C, Conn(3), u64::MAX);
        changed(&r);
        r.attach("n", A, Conn(5), u64::MAX);
        changed(&r);
        assert_eq!(r.resolve("n", &A, &Conn(1), &B), Err(Refused::NotAdmitted));
        r.detach("n", &C, &Conn(3));
        changed(&r);
        r.remove("n", &B);
        changed(&r);
        assert_eq!(
            r.resolve("n", &A, &Conn(5), &B),
            Err(Refused::NoDestination)
        );
        r.attach("n", B, Conn(6), 10);
        changed(&r);
        r.revoke("n", &B, 10);
        changed(&r);
        // Nothing to detach, remove or revoke: nothing changed.
        let g = r.generation();
        assert!(!r.detach("n", &B, &Conn(6)));
        assert_eq!(r.remove("n", &B), None);
        assert_eq!(r.revoke("n", &A, 0), None);
        assert_eq!(r.generation(), g);
    }
}
