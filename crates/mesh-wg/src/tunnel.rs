//! One peer's WireGuard state: the handshake in progress, the current and previous sessions,
//! the next ones a responder holds until the initiator's first data message confirms one, the
//! packets waiting for a handshake, and WireGuard's timers (section 6 of the paper) on the
//! clock the caller passes in.
//!
//! Nothing here reads a clock: every call takes `now`, so a simulation decides what time it is;
//! the wall-clock time an initiation carries is counted from the pair of wall time and
//! `Instant` given to [`Tunnel::new`]. Ephemeral keys come from the caller's cryptographic
//! random generator.
//!
//! Where an output is bytes to send, they are written into the caller's buffer and the call
//! says how many ([`Action::Send`]); a received data message is opened into that buffer too
//! ([`Action::Deliver`]: the packet is at its start).

use crate::handshake::{self, Initiated, LocalKeys};
use crate::transport::{OpenKey, OpenedData, SealKey, Transport, REJECT_AFTER_MESSAGES};
use crate::{
    Error, COOKIE_REPLY_LEN, DATA_HEADER_LEN, DATA_OVERHEAD, INITIATION_LEN, RESPONSE_LEN,
    TYPE_COOKIE_REPLY, TYPE_DATA, TYPE_INITIATION, TYPE_RESPONSE,
};
use rand::{CryptoRng, RngCore};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use x25519_dalek::PublicKey;

/// An initiator starts a new handshake after this many messages under one session.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// An initiator starts a new handshake when its session is this old.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// No session older than this seals or opens anything.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// A handshake is given up after this long without an answer.
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
/// An unanswered initiation is sent again after this long.
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// A keepalive answers data after this long without anything sent back.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A cookie is used in mac2 for this long after it came.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(120);
/// Initiations accepted from one peer at most this often.
pub const MIN_INITIATION_GAP: Duration = Duration::from_millis(20);
/// Packets held while a handshake runs; past it, the oldest go.
pub const MAX_QUEUED: usize = 256;
/// Answered initiations whose sessions wait for the initiator's first data message. Two
/// initiations can cross on the way (a retransmission close behind the first): the initiator
/// may confirm either.
const MAX_PENDING: usize = 3;

/// What a call produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to send or deliver.
    Done,
    /// Send the first `n` bytes of the output buffer to the peer.
    Send(usize),
    /// Deliver the packet of `n` bytes now at the start of the output buffer.
    Deliver(usize),
    /// An authenticated keepalive: nothing to deliver.
    Keepalive,
    /// The message was refused; nothing changed.
    Refused(Error),
    /// The sessions expired or the handshake was given up: everything was cleared, the next
    /// packet starts over.
    Expired,
}

/// Counters of a tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Since the current session was made.
    pub since_handshake: Option<Duration>,
    /// Inner bytes sealed and sent.
    pub tx_bytes: u64,
    /// Inner bytes opened and delivered.
    pub rx_bytes: u64,
    /// How long the last handshake of ours took to be answered.
    pub rtt: Option<Duration>,
}

/// A session and what the timers need to know of it.
struct Keys {
    transport: Transport,
    made: Instant,
    /// Whether this side initiated it (only the initiator rekeys on age).
    initiator: bool,
    /// `made` + [`REJECT_AFTER_TIME`]: from then on the keys neither seal nor open.
    rejected_at: Instant,
}

/// A handshake of ours waiting for its response.
struct Waiting {
    initiated: Initiated,
    /// The initiation before it: its response may still come, and is as good.
    earlier: Option<Initiated>,
    /// When this handshake attempt began (the first initiation).
    first: Instant,
    /// When the last initiation went out.
    last: Instant,
}

/// One peer's WireGuard state.
pub struct Tunnel {
    local: LocalKeys,
    peer: PublicKey,
    psk: [u8; 32],
    keepalive: Option<Duration>,
    /// Wall-clock time (since the Unix epoch) at an `Instant`: what initiations are stamped from.
    wall: (Duration, Instant),
    /// The peer's 24-bit index; a session's index is it shifted left 8 bits plus a counter.
    index: u32,
    rotation: u8,
    current: Option<Keys>,
    previous: Option<Keys>,
    next: VecDeque<Keys>,
    waiting: Option<Waiting>,
    cookie: Option<([u8; 16], Instant)>,
    /// The timestamp and arrival of the last initiation accepted from the peer.
    last_initiation: Option<([u8; 12], Instant)>,
    queue: VecDeque<Vec<u8>>,
    /// When anything last went to the peer (persistent keepalive).
    last_sent: Option<Instant>,
    /// When data first came in since we last sent anything: a keepalive is owed from then.
    owe_keepalive: Option<Instant>,
    /// When data first went out since we last heard anything: no answer for long means the
    /// session may be gone on the other side.
    unanswered: Option<Instant>,
    /// When data last came in (an old session still in use is renewed).
    last_data_received: Option<Instant>,
    tx_bytes: u64,
    rx_bytes: u64,
    rtt: Option<Duration>,
}

/// Where a data message's session sits.
#[derive(Clone, Copy)]
enum Slot {
    Current,
    Previous,
    Next(usize),
}

fn since(now: Instant, t: Option<Instant>) -> Option<Duration> {
    t.map(|t| now.saturating_duration_since(t))
}

impl Keys {
    /// (One comparison of `Instant`s on the data path, not a subtraction.)
    fn usable(&self, now: Instant) -> bool {
        now < self.rejected_at && self.transport.sent() < REJECT_AFTER_MESSAGES
    }
}

impl Tunnel {
    /// A tunnel to `peer`; `index` is the peer's 24-bit index on this node (received messages
    /// carry it in their top 24 bits); `keepalive`: persistent keepalive, if any; `wall`: the
    /// time since the Unix epoch at some `Instant` (initiations carry the wall-clock time, which
    /// must grow across restarts).
    pub fn new(
        local: LocalKeys,
        peer: PublicKey,
        psk: Option<[u8; 32]>,
        keepalive: Option<Duration>,
        index: u32,
        wall: (Duration, Instant),
    ) -> Tunnel {
        Tunnel {
            local,
            peer,
            psk: psk.unwrap_or([0; 32]),
            keepalive,
            wall,
            index: index & 0x00ff_ffff,
            rotation: 0,
            current: None,
            previous: None,
            next: VecDeque::new(),
            waiting: None,
            cookie: None,
            last_initiation: None,
            queue: VecDeque::new(),
            last_sent: None,
            owe_keepalive: None,
            unanswered: None,
            last_data_received: None,
            tx_bytes: 0,
            rx_bytes: 0,
            rtt: None,
        }
    }

    /// The peer's public key.
    pub fn peer(&self) -> &PublicKey {
        &self.peer
    }

    /// Whether a session can seal now.
    pub fn established(&self, now: Instant) -> bool {
        self.sealing_keys(now).is_some()
    }

    /// The keys that seal now: the current session's, while usable.
    fn sealing_keys(&self, now: Instant) -> Option<&Keys> {
        self.current.as_ref().filter(|k| k.usable(now))
    }

    /// Whether a session was made (it may be too old to seal: [`Tunnel::established`]).
    pub fn has_session(&self) -> bool {
        self.current.is_some()
    }

    /// Counters of this tunnel.
    pub fn stats(&self, now: Instant) -> Stats {
        Stats {
            since_handshake: self
                .current
                .as_ref()
                .map(|k| now.saturating_duration_since(k.made)),
            tx_bytes: self.tx_bytes,
            rx_bytes: self.rx_bytes,
            rtt: self.rtt,
        }
    }

    /// Packets waiting for a handshake.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// When the newest of the keys held was made.
    fn newest_keys(&self) -> Option<Instant> {
        self.current
            .iter()
            .chain(&self.previous)
            .chain(&self.next)
            .map(|k| k.made)
            .max()
    }

    fn sent_something(&mut self, now: Instant) {
        self.last_sent = Some(now);
        self.owe_keepalive = None;
    }

    fn heard_something(&mut self) {
        self.unanswered = None;
    }

    fn next_index(&mut self) -> u32 {
        self.rotation = self.rotation.wrapping_add(1);
        (self.index << 8) | u32::from(self.rotation)
    }

    /// Seals the `len`-byte packet at `buf[DATA_HEADER_LEN..]` in place with the current
    /// session (the data path); `Err` with nothing changed when there is none: use
    /// [`Tunnel::send`].
    pub fn seal(&mut self, buf: &mut [u8], len: usize, now: Instant) -> Result<usize, Error> {
        let keys = self.sealing_keys(now).ok_or(Error::Exhausted)?;
        let n = keys.transport.seal(buf, len)?;
        self.sealed(len, now);
        Ok(n)
    }

    /// [`Tunnel::seal`] without the encryption: copies `packet` behind room for the header in
    /// `out`, takes the current session's next counter and writes the header; returns the
    /// message's length and the key that must seal it ([`SealKey::seal`]) before it leaves.
    /// `None`, with nothing changed, when no session can seal now: use [`Tunnel::send`].
    pub fn reserve(
        &mut self,
        packet: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Option<(usize, SealKey)> {
        let keys = self.sealing_keys(now)?;
        let room = out.get_mut(DATA_HEADER_LEN..DATA_HEADER_LEN + packet.len())?;
        room.copy_from_slice(packet);
        let n = keys.transport.reserve(out, packet.len()).ok()?;
        let key = keys.transport.seal_key().clone();
        self.sealed(packet.len(), now);
        Some((n, key))
    }

    /// What sealing `len` bytes of packet tells the timers and counters.
    fn sealed(&mut self, len: usize, now: Instant) {
        self.sent_something(now);
        if len > 0 {
            self.unanswered.get_or_insert(now);
            self.tx_bytes += len as u64;
        }
    }

    /// Sends `packet`: sealed into `out` when a session is up ([`Action::Send`], a data
    /// message), else queued, with an initiation written into `out` if none is in flight
    /// ([`Action::Send`] of [`INITIATION_LEN`] bytes) or [`Action::Done`].
    pub fn send(
        &mut self,
        packet: &[u8],
        out: &mut [u8],
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Action {
        if self.established(now) {
            return self.seal_copy(packet, out, now);
        }
        if self.queue.len() >= MAX_QUEUED {
            self.queue.pop_front();
        }
        self.queue.push_back(packet.to_vec());
        if self.waiting.is_some() {
            return Action::Done;
        }
        self.initiate(out, now, rng)
    }

    /// Writes a fresh initiation into `out` (even if one is in flight: a retransmission).
    pub fn initiate(
        &mut self,
        out: &mut [u8],
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Action {
        if out.len() < INITIATION_LEN {
            return Action::Refused(Error::Buffer);
        }
        let mut ephemeral = [0u8; 32];
        rng.fill_bytes(&mut ephemeral);
        let index = self.next_index();
        let (epoch, at) = self.wall;
        let wall = match now.checked_duration_since(at) {
            Some(d) => epoch + d,
            None => epoch.saturating_sub(at.saturating_duration_since(now)),
        };
        let initiated = match handshake::initiate(
            &self.local,
            &self.peer,
            index,
            ephemeral,
            crate::tai64n(wall),
            out,
        ) {
            Ok(i) => i,
            Err(e) => return Action::Refused(e),
        };
        if let Some((cookie, at)) = self.cookie {
            if now.saturating_duration_since(at) < COOKIE_LIFETIME {
                let _ = handshake::add_mac2(&mut out[..INITIATION_LEN], &cookie);
            }
        }
        let (first, earlier) = match self.waiting.take() {
            Some(w) => (w.first, Some(w.initiated)),
            None => (now, None),
        };
        self.waiting = Some(Waiting {
            initiated,
            earlier,
            first,
            last: now,
        });
        self.sent_something(now);
        Action::Send(INITIATION_LEN)
    }

    /// Takes one datagram from the peer (already known to be for this tunnel: an initiation
    /// from its key, or a message carrying one of its indexes). A packet it carried, or a
    /// handshake answer, is written into `out` (as long as the datagram, and at least
    /// [`RESPONSE_LEN`] bytes).
    pub fn receive(
        &mut self,
        datagram: &[u8],
        out: &mut [u8],
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Action {
        match datagram.first() {
            Some(&TYPE_DATA) => self.receive_data(datagram, out, now),
            Some(&TYPE_INITIATION) => self.receive_initiation(datagram, out, now, rng),
            Some(&TYPE_RESPONSE) => self.receive_response(datagram, out, now),
            Some(&TYPE_COOKIE_REPLY) => self.receive_cookie(datagram, now),
            _ => Action::Refused(Error::Malformed),
        }
    }

    fn receive_data(&mut self, datagram: &[u8], out: &mut [u8], now: Instant) -> Action {
        let Some(to) = crate::receiver_index(datagram) else {
            return Action::Refused(Error::Malformed);
        };
        let slot = match self.usable_slot(to, now) {
            Ok(slot) => slot,
            Err(e) => return Action::Refused(e),
        };
        let Some(keys) = self.keys_mut(slot) else {
            return Action::Refused(Error::WrongIndex);
        };
        match keys.transport.open_into(datagram, out) {
            Ok(len) => self.data_received(slot, &out[..len], now),
            Err(e) => Action::Refused(e),
        }
    }

    /// The key that opens the data message `datagram`, for opening it away from the tunnel
    /// ([`OpenKey::open`]); `None` when it is not a data message or no session of ours that
    /// may still receive carries its index (take [`Tunnel::receive`], which refuses it).
    pub fn open_key(&self, datagram: &[u8], now: Instant) -> Option<OpenKey> {
        if datagram.first() != Some(&TYPE_DATA) {
            return None;
        }
        let to = crate::receiver_index(datagram)?;
        let slot = self.usable_slot(to, now).ok()?;
        Some(self.keys(slot)?.transport.open_key().clone())
    }

    /// [`Tunnel::receive`] of a data message already opened with a key from
    /// [`Tunnel::open_key`]: `packet` is what it carried. The same checks and bookkeeping
    /// (its session still able to receive, the counter not seen before), without the
    /// decryption.
    pub fn accept_opened(&mut self, opened: &OpenedData, packet: &[u8], now: Instant) -> Action {
        let slot = match self.usable_slot(opened.index(), now) {
            Ok(slot) => slot,
            Err(e) => return Action::Refused(e),
        };
        let Some(keys) = self.keys_mut(slot) else {
            return Action::Refused(Error::WrongIndex);
        };
        match keys.transport.accept(opened) {
            Ok(len) if len <= packet.len() => self.data_received(slot, &packet[..len], now),
            Ok(_) => Action::Refused(Error::Buffer),
            Err(e) => Action::Refused(e),
        }
    }

    /// Where the session with local index `to` sits, if it may still receive.
    fn usable_slot(&self, to: u32, now: Instant) -> Result<Slot, Error> {
        let ours = |k: &Keys| k.transport.local_index() == to;
        let slot = if self.current.as_ref().is_some_and(ours) {
            Slot::Current
        } else if self.previous.as_ref().is_some_and(ours) {
            Slot::Previous
        } else if let Some(i) = self.next.iter().position(ours) {
            Slot::Next(i)
        } else {
            return Err(Error::WrongIndex);
        };
        match self.keys(slot) {
            Some(k) if k.usable(now) => Ok(slot),
            Some(_) => Err(Error::Exhausted),
            None => Err(Error::WrongIndex),
        }
    }

    fn keys(&self, slot: Slot) -> Option<&Keys> {
        match slot {
            Slot::Current => self.current.as_ref(),
            Slot::Previous => self.previous.as_ref(),
            Slot::Next(i) => self.next.get(i),
        }
    }

    fn keys_mut(&mut self, slot: Slot) -> Option<&mut Keys> {
        match slot {
            Slot::Current => self.current.as_mut(),
            Slot::Previous => self.previous.as_mut(),
            Slot::Next(i) => self.next.get_mut(i),
        }
    }

    /// A data message of the session at `slot` was opened and its counter taken: `packet` is
    /// what it carried.
    fn data_received(&mut self, slot: Slot, packet: &[u8], now: Instant) -> Action {
        if let Slot::Next(i) = slot {
            // The initiator used a session we answered with: it becomes current, and the
            // other answers are moot.
            self.previous = self.current.take();
            self.current = self.next.remove(i);
            self.next.clear();
        }
        self.heard_something();
        if packet.is_empty() {
            return Action::Keepalive;
        }
        let Some(real) = ip_length(packet) else {
            return Action::Refused(Error::Malformed);
        };
        self.last_data_received = Some(now);
        self.owe_keepalive.get_or_insert(now);
        self.rx_bytes += real as u64;
        Action::Deliver(real)
    }

    fn receive_initiation(
        &mut self,
        datagram: &[u8],
        out: &mut [u8],
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Action {
        match handshake::open_initiation(&self.local, datagram) {
            Ok(opened) => self.receive_opened(opened, datagram, out, now, rng),
            Err(e) => Action::Refused(e),
        }
    }

    /// [`Tunnel::receive`] for an initiation the caller already opened (to learn whose it is,
    /// [`handshake::open_initiation`]) with this tunnel's local keys: the same, without that
    /// Diffie-Hellman again.
    pub fn receive_opened(
        &mut self,
        opened: handshake::Opened,
        datagram: &[u8],
        out: &mut [u8],
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Action {
        if out.len() < RESPONSE_LEN {
            return Action::Refused(Error::Buffer);
        }
        let received = match opened.finish(&self.local, datagram) {
            Ok(r) => r,
            Err(e) => return Action::Refused(e),
        };
        if received.peer != self.peer {
            return Action::Refused(Error::Decrypt);
        }
        if let Some((ts, at)) = self.last_initiation {
            // Replayed (not later than the last), or a flood.
            if received.timestamp <= ts || now.saturating_duration_since(at) < MIN_INITIATION_GAP {
                return Action::Refused(Error::Replay);
            }
        }
        let timestamp = received.timestamp;
        let mut ephemeral = [0u8; 32];
        rng.fill_bytes(&mut ephemeral);
        let index = self.next_index();
        let transport = match handshake::respond(received, &self.psk, index, ephemeral, out) {
            Ok(t) => t,
            Err(e) => return Action::Refused(e),
        };
        self.last_initiation = Some((timestamp, now));
        if self.next.len() >= MAX_PENDING {
            self.next.pop_front();
        }
        self.next.push_back(Keys {
            transport,
            made: now,
            rejected_at: now + REJECT_AFTER_TIME,
            initiator: false,
        });
        self.sent_something(now);
        Action::Send(RESPONSE_LEN)
    }

    fn receive_response(&mut self, datagram: &[u8], out: &mut [u8], now: Instant) -> Action {
        let Some(w) = &self.waiting else {
            return Action::Refused(Error::WrongIndex);
        };
        let latest = w
            .initiated
            .receive_response(&self.local, &self.psk, datagram);
        let transport = match (latest, &w.earlier) {
            (Ok(t), _) => t,
            (Err(Error::WrongIndex), Some(earlier)) => {
                match earlier.receive_response(&self.local, &self.psk, datagram) {
                    Ok(t) => t,
                    Err(e) => return Action::Refused(e),
                }
            }
            (Err(e), _) => return Action::Refused(e),
        };
        self.rtt = Some(now.saturating_duration_since(w.last));
        self.waiting = None;
        // (Sessions answered for the peer's own initiations stay pending: when handshakes
        // crossed, the peer may send under one of them.)
        self.previous = self.current.take();
        self.current = Some(Keys {
            transport,
            made: now,
            rejected_at: now + REJECT_AFTER_TIME,
            initiator: true,
        });
        self.heard_something();
        // Waiting packets confirm the session; without any, a keepalive does.
        match self.flush_queued(out, now) {
            Action::Done => self.keepalive(out, now),
            other => other,
        }
    }

    fn receive_cookie(&mut self, datagram: &[u8], now: Instant) -> Action {
        let Some(w) = &self.waiting else {
            return Action::Refused(Error::WrongIndex);
        };
        if datagram.len() != COOKIE_REPLY_LEN {
            return Action::Refused(Error::Malformed);
        }
        let cookie = w.initiated.receive_cookie_reply(datagram);
        let cookie = match (cookie, &w.earlier) {
            (Err(Error::WrongIndex), Some(earlier)) => earlier.receive_cookie_reply(datagram),
            (c, _) => c,
        };
        match cookie {
            Ok(cookie) => {
                self.cookie = Some((cookie, now));
                Action::Done
            }
            Err(e) => Action::Refused(e),
        }
    }

    /// Seals the next packet that waited for the handshake into `out`; [`Action::Done`] when
    /// none waits (or no session is up yet).
    pub fn flush_queued(&mut self, out: &mut [u8], now: Instant) -> Action {
        if !self.established(now) {
            return Action::Done;
        }
        let Some(p) = self.queue.pop_front() else {
            return Action::Done;
        };
        self.seal_copy(&p, out, now)
    }

    /// Copies `packet` behind room for the header in `out` and seals it there.
    fn seal_copy(&mut self, packet: &[u8], out: &mut [u8], now: Instant) -> Action {
        let Some(room) = out.get_mut(DATA_HEADER_LEN..DATA_HEADER_LEN + packet.len()) else {
            return Action::Refused(Error::Buffer);
        };
        room.copy_from_slice(packet);
        match self.seal(out, packet.len(), now) {
            Ok(n) => Action::Send(n),
            Err(e) => Action::Refused(e),
        }
    }

    fn keepalive(&mut self, out: &mut [u8], now: Instant) -> Action {
        if out.len() < DATA_OVERHEAD {
            return Action::Refused(Error::Buffer);
        }
        match self.seal(out, 0, now) {
            Ok(n) => Action::Send(n),
            Err(e) => Action::Refused(e),
        }
    }

    fn clear(&mut self) {
        self.current = None;
        self.previous = None;
        self.next.clear();
        self.waiting = None;
        self.queue.clear();
    }

    /// WireGuard's timers at `now`: at most one message to send (written into `out`), or the
    /// news that everything expired. Call it whenever [`Tunnel::next_deadline`] is due, or more
    /// often.
    pub fn update_timers(
        &mut self,
        out: &mut [u8],
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Action {
        // Keys three times REJECT_AFTER_TIME old (or a handshake given up): all gone.
        let newest = self.newest_keys();
        if let Some(made) = newest {
            if now.saturating_duration_since(made) >= REJECT_AFTER_TIME * 3 {
                self.clear();
                return Action::Expired;
            }
        }
        if let Some(w) = &self.waiting {
            if now.saturating_duration_since(w.first) >= REKEY_ATTEMPT_TIME {
                self.waiting = None;
                self.queue.clear();
                return Action::Expired;
            }
            if now.saturating_duration_since(w.last) >= REKEY_TIMEOUT {
                return self.initiate(out, now, rng);
            }
            return Action::Done;
        }
        let Some(current) = &self.current else {
            return Action::Done;
        };
        let age = now.saturating_duration_since(current.made);
        let initiator = current.initiator;
        let sent = current.transport.sent();
        // The initiator renews an old or well-used session.
        if initiator && (age >= REKEY_AFTER_TIME || sent >= REKEY_AFTER_MESSAGES) {
            return self.initiate(out, now, rng);
        }
        // Data keeps coming under a session about to be rejected: the initiator renews it.
        if initiator
            && age >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
            && since(now, self.last_data_received).is_some_and(|d| d < KEEPALIVE_TIMEOUT)
        {
            return self.initiate(out, now, rng);
        }
        // Data sent and nothing heard for long: the session may be dead on the other side.
        if let Some(sent) = self.unanswered {
            if now.saturating_duration_since(sent) >= KEEPALIVE_TIMEOUT + REKEY_TIMEOUT {
                self.unanswered = None;
                return self.initiate(out, now, rng);
            }
        }
        if !self.established(now) {
            return Action::Done;
        }
        // Data received and nothing sent back for a while: a keepalive says we are here.
        if let Some(got) = self.owe_keepalive {
            if now.saturating_duration_since(got) >= KEEPALIVE_TIMEOUT {
                return self.keepalive(out, now);
            }
        }
        if let Some(every) = self.keepalive {
            if since(now, self.last_sent).is_none_or(|d| d >= every) {
                return self.keepalive(out, now);
            }
        }
        Action::Done
    }
}

impl Tunnel {
    /// The earliest time [`Tunnel::update_timers`] may have something to do (never later than
    /// that; sometimes earlier, when a rule's condition may not hold by then). `None`: nothing
    /// until a packet comes or goes.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut consider = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        if let Some(made) = self.newest_keys() {
            consider(made + REJECT_AFTER_TIME * 3);
        }
        if let Some(w) = &self.waiting {
            consider(w.last + REKEY_TIMEOUT);
            consider(w.first + REKEY_ATTEMPT_TIME);
            return at;
        }
        if let Some(k) = &self.current {
            if k.initiator {
                consider(
                    k.made
                        + REKEY_AFTER_TIME
                            .min(REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT),
                );
            }
        }
        if let Some(sent) = self.unanswered {
            consider(sent + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
        }
        if let Some(got) = self.owe_keepalive {
            consider(got + KEEPALIVE_TIMEOUT);
        }
        if let (Some(every), Some(sent), true) =
            (self.keepalive, self.last_sent, self.current.is_some())
        {
            consider(sent + every);
        }
        at
    }
}

/// The length an IPv4 or IPv6 packet says it has, if it fits what arrived (a sender may pad).
fn ip_length(packet: &[u8]) -> Option<usize> {
    let len = match packet.first()? >> 4 {
        4 if packet.len() >= 20 => usize::from(u16::from_be_bytes([packet[2], packet[3]])),
        6 if packet.len() >= 40 => 40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])),
        _ => return None,
    };
    (len <= packet.len()).then_some(len)
}
