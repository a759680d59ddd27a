//! A session's keys: data messages sealed and opened in place.
//!
//! A data message is a 16-byte header (type 4, three zero bytes, the receiver's index, a
//! 64-bit little-endian counter), the packet encrypted with ChaCha20-Poly1305 (the counter as
//! nonce), and the 16-byte tag. [`Transport::seal`] encrypts a packet where it already lies,
//! behind room for the header: no copy. [`Transport::open`] decrypts in place
//! ([`Transport::open_into`] into another buffer, with one copy) and accepts each
//! counter once ([`ReplayWindow`]), only after the tag proved the message.
//!
//! Sealing takes `&self` (the counter is atomic): one session can seal on several threads.
//! It can also be split in two ([`Transport::reserve`] then [`SealKey::seal`]): the counter
//! is taken and the header written where the order of messages is decided, and the
//! encryption, the costly part, runs later on another thread.
//!
//! Opening splits the same way: [`OpenKey::open`] (the session's receiving key, shared)
//! decrypts on any thread and returns an [`OpenedData`], which only it makes; the session
//! then takes the counter into its replay window ([`Transport::accept`]), in the order the
//! messages came.

use crate::{Error, DATA_HEADER_LEN, DATA_OVERHEAD, TAG_LEN, TYPE_DATA};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The paper's Reject-After-Messages (2^64 - 2^13 - 1): no counter at or past it is used, so
/// a nonce never repeats under one key.
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

/// The keys and counters of one session.
pub struct Transport {
    local_index: u32,
    remote_index: u32,
    sender: SealKey,
    receiver: OpenKey,
    next_counter: AtomicU64,
    replay: ReplayWindow,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("sent", &self.sent())
            .finish_non_exhaustive()
    }
}

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is what ChaCha20-Poly1305 takes: this cannot fail.
    match UnboundKey::new(&CHACHA20_POLY1305, bytes) {
        Ok(k) => LessSafeKey::new(k),
        Err(_) => unreachable!("ChaCha20-Poly1305 takes 32-byte keys"),
    }
}

/// The receiver index in a data message's header (`msg` holds at least the header).
fn header_index(msg: &[u8]) -> u32 {
    u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]])
}

/// The counter in a data message's header (`msg` holds at least the header).
fn header_counter(msg: &[u8]) -> u64 {
    let mut c = [0u8; 8];
    c.copy_from_slice(&msg[8..DATA_HEADER_LEN]);
    u64::from_le_bytes(c)
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

impl Transport {
    pub(crate) fn new(
        local_index: u32,
        remote_index: u32,
        send: &[u8; 32],
        recv: &[u8; 32],
    ) -> Transport {
        Transport {
            local_index,
            remote_index,
            sender: SealKey(Arc::new(key(send))),
            receiver: OpenKey {
                key: Arc::new(key(recv)),
                index: local_index,
            },
            next_counter: AtomicU64::new(0),
            replay: ReplayWindow::default(),
        }
    }

    /// The index the peer puts in the messages it sends us.
    pub fn local_index(&self) -> u32 {
        self.local_index
    }

    /// The index our messages carry.
    pub fn remote_index(&self) -> u32 {
        self.remote_index
    }

    /// Data messages sealed so far.
    pub fn sent(&self) -> u64 {
        self.next_counter
            .load(Ordering::Relaxed)
            .min(REJECT_AFTER_MESSAGES)
    }

    /// Seals the `len`-byte packet at `buf[DATA_HEADER_LEN..]` in place into a data message
    /// that starts at `buf[0]`; returns the message's length (`len + DATA_OVERHEAD`). An empty
    /// packet is a keepalive.
    pub fn seal(&self, buf: &mut [u8], len: usize) -> Result<usize, Error> {
        let total = self.reserve(buf, len)?;
        self.sender.seal(&mut buf[..total])?;
        Ok(total)
    }

    /// The first half of [`Transport::seal`]: takes the next counter and writes the header
    /// in front of the `len`-byte packet at `buf[DATA_HEADER_LEN..]`; returns the message's
    /// length. The message must then go through [`SealKey::seal`] (this session's
    /// [`Transport::seal_key`]) before it leaves: until then the packet lies in it in clear.
    pub fn reserve(&self, buf: &mut [u8], len: usize) -> Result<usize, Error> {
        let total = len.checked_add(DATA_OVERHEAD).ok_or(Error::Buffer)?;
        let header = buf.get_mut(..total).ok_or(Error::Buffer)?;
        let counter = self.next_counter.fetch_add(1, Ordering::Relaxed);
        if counter >= REJECT_AFTER_MESSAGES {
            // Keep it from wrapping however often this is asked.
            self.next_counter
                .store(REJECT_AFTER_MESSAGES, Ordering::Relaxed);
            return Err(Error::Exhausted);
        }
        header[0] = TYPE_DATA;
        header[1..4].fill(0);
        header[4..8].copy_from_slice(&self.remote_index.to_le_bytes());
        header[8..16].copy_from_slice(&counter.to_le_bytes());
        Ok(total)
    }

    /// The key that seals what [`Transport::reserve`] prepared (shared, cheap to clone).
    pub fn seal_key(&self) -> &SealKey {
        &self.sender
    }

    /// Opens the data message `msg` in place; returns the packet it carried (empty for a
    /// keepalive), at `msg[DATA_HEADER_LEN..]`. A refused message changes nothing (the window
    /// records a counter only once the tag proved the message).
    pub fn open<'a>(&mut self, msg: &'a mut [u8]) -> Result<&'a mut [u8], Error> {
        let counter = self.check_header(msg)?;
        let len = msg.len() - DATA_OVERHEAD;
        let sealed = &mut msg[DATA_HEADER_LEN..];
        self.receiver
            .key
            .open_in_place(nonce(counter), Aad::empty(), sealed)
            .map_err(|_| Error::Decrypt)?;
        if !self.replay.accept(counter) {
            return Err(Error::Replay);
        }
        Ok(&mut sealed[..len])
    }

    /// Opens the data message `msg` into `out`: the packet it carried lands at `out[..n]` (one
    /// copy, the ciphertext's, which the cipher then decrypts in place). Same checks as
    /// [`Transport::open`]; `out` must hold the packet.
    pub fn open_into(&mut self, msg: &[u8], out: &mut [u8]) -> Result<usize, Error> {
        let counter = self.check_header(msg)?;
        let len = msg.len() - DATA_OVERHEAD;
        let room = out.get_mut(..len).ok_or(Error::Buffer)?;
        room.copy_from_slice(&msg[DATA_HEADER_LEN..DATA_HEADER_LEN + len]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&msg[DATA_HEADER_LEN + len..]);
        self.receiver
            .key
            .open_in_place_separate_tag(nonce(counter), Aad::empty(), Tag::from(tag), room, 0..)
            .map_err(|_| Error::Decrypt)?;
        if !self.replay.accept(counter) {
            return Err(Error::Replay);
        }
        Ok(len)
    }

    /// The key that opens this session's data messages away from it ([`OpenKey::open`]; shared,
    /// cheap to clone).
    pub fn open_key(&self) -> &OpenKey {
        &self.receiver
    }

    /// The second half of opening off the session's thread: records the counter of a message
    /// this session's [`OpenKey`] opened; returns the packet's length. Refused (nothing
    /// recorded) when another session's key opened it or the counter was already taken.
    pub fn accept(&mut self, opened: &OpenedData) -> Result<usize, Error> {
        if !Arc::ptr_eq(&opened.key.key, &self.receiver.key) {
            return Err(Error::WrongIndex);
        }
        if !self.replay.accept(opened.counter) {
            return Err(Error::Replay);
        }
        Ok(opened.len)
    }

    /// The counter of a data message for this session that the window may accept.
    fn check_header(&self, msg: &[u8]) -> Result<u64, Error> {
        if msg.len() < DATA_OVERHEAD || msg[0] != TYPE_DATA || msg[1..4] != [0, 0, 0] {
            return Err(Error::Malformed);
        }
        if header_index(msg) != self.local_index {
            return Err(Error::WrongIndex);
        }
        let counter = header_counter(msg);
        if !self.replay.may_accept(counter) {
            return Err(Error::Replay);
        }
        Ok(counter)
    }
}

/// A session's sending key, shared with whoever seals the messages [`Transport::reserve`]
/// prepared. Clones are the same key ([`SealKey::same`]).
#[derive(Clone)]
pub struct SealKey(Arc<LessSafeKey>);

impl SealKey {
    /// Encrypts a data message [`Transport::reserve`] prepared, in place: `msg` is the whole
    /// message (header, packet, room for the tag), its counter read from the header.
    pub fn seal(&self, msg: &mut [u8]) -> Result<(), Error> {
        if msg.len() < DATA_OVERHEAD || msg[0] != TYPE_DATA {
            return Err(Error::Malformed);
        }
        let counter = header_counter(msg);
        let len = msg.len() - DATA_OVERHEAD;
        let (packet, tag_room) = msg[DATA_HEADER_LEN..].split_at_mut(len);
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce(counter), Aad::empty(), packet)
            .map_err(|_| Error::Buffer)?;
        tag_room.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Whether `other` is this key (a clone of it).
    pub fn same(&self, other: &SealKey) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey")
    }
}

impl PartialEq for SealKey {
    fn eq(&self, other: &SealKey) -> bool {
        self.same(other)
    }
}

impl Eq for SealKey {}

/// A session's receiving key, shared with whoever opens its data messages away from the
/// session ([`Transport::open_key`]).
#[derive(Clone)]
pub struct OpenKey {
    key: Arc<LessSafeKey>,
    /// The session's own index, which its messages carry.
    index: u32,
}

impl OpenKey {
    /// The index of the session whose key this is.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Decrypts a data message in place: `header` is its 16 bytes of header, `sealed` the
    /// encrypted packet and the tag behind it. The packet lands at `sealed[..len]`, `len`
    /// being [`OpenedData::len`]. The counter is not yet taken: the session must
    /// [`Transport::accept`] it before the packet counts as received.
    pub fn open(self, header: &[u8], sealed: &mut [u8]) -> Result<OpenedData, Error> {
        if header.len() != DATA_HEADER_LEN || header[0] != TYPE_DATA || header[1..4] != [0, 0, 0] {
            return Err(Error::Malformed);
        }
        if header_index(header) != self.index {
            return Err(Error::WrongIndex);
        }
        let Some(len) = sealed.len().checked_sub(TAG_LEN) else {
            return Err(Error::Malformed);
        };
        let counter = header_counter(header);
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(Error::Replay);
        }
        self.key
            .open_in_place(nonce(counter), Aad::empty(), sealed)
            .map_err(|_| Error::Decrypt)?;
        Ok(OpenedData {
            key: self,
            counter,
            len,
        })
    }
}

impl std::fmt::Debug for OpenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpenKey({})", self.index)
    }
}

/// A data message an [`OpenKey`] authenticated: only [`OpenKey::open`] makes one, so a
/// session that accepts it ([`Transport::accept`]) knows the packet is the peer's.
#[derive(Debug)]
pub struct OpenedData {
    key: OpenKey,
    counter: u64,
    len: usize,
}

impl OpenedData {
    /// The index of the session that opened it.
    pub fn index(&self) -> u32 {
        self.key.index
    }

    /// The packet's length (0: a keepalive).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it was a keepalive.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Words of the replay bitmap: 64 × 32 = 2,048 counters, the last word kept as slack.
const WORDS: usize = 32;
const BITS: u64 = 64 * WORDS as u64;
/// The window: a counter is accepted while it is less than this far behind the highest one.
pub const REPLAY_WINDOW: u64 = BITS - 64;

/// Which counters were accepted, within [`REPLAY_WINDOW`] of the highest: each accepted once,
/// reordering within the window allowed, anything older refused.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// One past the highest counter accepted.
    next: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            next: 0,
            bits: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    /// Whether `counter` would be accepted (without recording it).
    pub fn may_accept(&self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES {
            return false;
        }
        if counter >= self.next {
            return true;
        }
        if self.next - counter > REPLAY_WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] & bit == 0
    }

    /// Records `counter`; `false` (and nothing recorded) if it was seen or is too old.
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.may_accept(counter) {
            return false;
        }
        if counter >= self.next {
            // Clear the words the window moves onto.
            let new_word = counter / 64;
            let first = if self.next == 0 {
                0
            } else {
                (self.next - 1) / 64 + 1
            };
            let moved = new_word.saturating_add(1).saturating_sub(first);
            for w in 0..moved.min(WORDS as u64) {
                self.bits[((first + w) % WORDS as u64) as usize] = 0;
            }
            self.next = counter + 1;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= bit;
        true
    }

    fn slot(counter: u64) -> (usize, u64) {
        (
            ((counter / 64) % WORDS as u64) as usize,
            1u64 << (counter % 64),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_message_sealed_later_is_the_message_seal_makes() {
        let (a, b) = ([7u8; 32], [9u8; 32]);
        let whole = Transport::new(1, 2, &a, &b);
        let split = Transport::new(1, 2, &a, &b);
        let mut receiver = Transport::new(2, 1, &b, &a);
        let packet: Vec<u8> = (0..1400u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut keys = Vec::new();
        let mut reserved = Vec::new();
        for len in [0usize, 1, 600, 1400] {
            let mut one = vec![0u8; len + DATA_OVERHEAD];
            one[DATA_HEADER_LEN..DATA_HEADER_LEN + len].copy_from_slice(&packet[..len]);
            let mut two = one.clone();
            assert_eq!(whole.seal(&mut one, len).unwrap(), len + DATA_OVERHEAD);
            assert_eq!(split.reserve(&mut two, len).unwrap(), len + DATA_OVERHEAD);
            assert_eq!(
                two[DATA_HEADER_LEN..DATA_HEADER_LEN + len],
                packet[..len],
                "reserved but not sealed: still in clear"
            );
            keys.push(split.seal_key().clone());
            reserved.push((one, two));
        }
        // Sealed later, in another order: each message still carries its own counter.
        for ((one, two), key) in reserved.iter_mut().zip(&keys).rev() {
            key.seal(two).unwrap();
            assert_eq!(one, two);
        }
        for (_, two) in &mut reserved {
            let len = two.len() - DATA_OVERHEAD;
            assert_eq!(receiver.open(two).unwrap(), &packet[..len]);
        }
        assert!(keys[0].same(split.seal_key()) && !keys[0].same(whole.seal_key()));
        assert_eq!(keys[0].seal(&mut [4u8; 20]), Err(Error::Malformed));
    }

    #[test]
    fn messages_opened_away_from_the_session_are_accepted_once_and_only_by_it() {
        let (a, b) = ([7u8; 32], [9u8; 32]);
        let sender = Transport::new(1, 2, &a, &b);
        let mut receiver = Transport::new(2, 1, &b, &a);
        let mut stranger = Transport::new(2, 1, &b, &a);
        let packet: Vec<u8> = (0..1400u32).map(|i| (i * 17 % 253) as u8).collect();
        let mut sealed = Vec::new();
        for len in [0usize, 1, 1400, 600] {
            let mut m = vec![0u8; len + DATA_OVERHEAD];
            m[DATA_HEADER_LEN..DATA_HEADER_LEN + len].copy_from_slice(&packet[..len]);
            sender.seal(&mut m, len).unwrap();
            sealed.push(m);
        }
        let replayed = sealed[2].clone();
        // Opened on another thread, in the order they came.
        let key = receiver.open_key().clone();
        let opened = std::thread::spawn(move || {
            let mut out = Vec::new();
            for mut m in sealed {
                let (header, body) = m.split_at_mut(DATA_HEADER_LEN);
                let o = key.clone().open(header, body).unwrap();
                let len = o.len();
                out.push((o, body[..len].to_vec()));
            }
            out
        })
        .join()
        .unwrap();
        for (o, p) in &opened {
            assert_eq!(p[..], packet[..o.len()]);
            assert_eq!(
                stranger.accept(o),
                Err(Error::WrongIndex),
                "another session's proof"
            );
            assert_eq!(receiver.accept(o), Ok(o.len()));
            assert_eq!(
                receiver.accept(o),
                Err(Error::Replay),
                "a counter counts once"
            );
        }
        assert!(opened[0].0.is_empty(), "the keepalive");
        // A message opened in place the usual way after that is a replay too.
        let mut again = replayed.clone();
        assert_eq!(receiver.open(&mut again), Err(Error::Replay));
        // Tampered, or a header that is not a data message for this key: refused, nothing
        // taken.
        let mut bad = replayed.clone();
        bad[100] ^= 1;
        let (h, body) = bad.split_at_mut(DATA_HEADER_LEN);
        assert_eq!(
            receiver.open_key().clone().open(h, body).unwrap_err(),
            Error::Decrypt
        );
        let mut other = replayed;
        other[4] ^= 1;
        let (h, body) = other.split_at_mut(DATA_HEADER_LEN);
        assert_eq!(
            receiver.open_key().clone().open(h, body).unwrap_err(),
            Error::WrongIndex
        );
        assert_eq!(
            receiver
                .open_key()
                .clone()
                .open(&[4u8; 3], &mut [0u8; 40])
                .unwrap_err(),
            Error::Malformed
        );
        assert_eq!(
            receiver
                .open_key()
                .clone()
                .open(&h[..16], &mut [0u8; 15])
                .unwrap_err(),
            Error::WrongIndex
        );
    }

    #[test]
    fn the_window_accepts_each_counter_once_and_refuses_the_old() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(5));
        assert!(w.accept(3), "reordered within the window");
        assert!(!w.accept(3));
        assert!(w.accept(10_000));
        assert!(!w.accept(5), "now far behind");
        assert!(
            w.accept(10_000 - REPLAY_WINDOW + 1),
            "the oldest still in the window"
        );
        assert!(!w.accept(10_000 - REPLAY_WINDOW));
        assert!(!w.accept(10_000));
        // A jump of many words clears what the window moved onto.
        assert!(w.accept(10_000 + 64 * 5 + 7));
        for c in 10_001..10_000 + 64 * 5 + 7 {
            assert!(w.may_accept(c), "{c} was never seen");
        }
        assert!(!w.accept(REJECT_AFTER_MESSAGES));
    }

    #[test]
    fn the_window_agrees_with_a_set_of_seen_counters() {
        // Against a plain model, on a mixed order with repeats.
        let mut w = ReplayWindow::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut top: Option<u64> = None;
        let mut x: u64 = 12345;
        for _ in 0..50_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let base = top.unwrap_or(0);
            let c = (base + (x >> 40) % 300).saturating_sub((x >> 20) % 2_500);
            let fresh = !seen.contains(&c) && top.is_none_or(|t| c + REPLAY_WINDOW > t);
            assert_eq!(w.accept(c), fresh, "counter {c}, top {top:?}");
            if fresh {
                seen.insert(c);
                top = Some(top.map_or(c, |t| t.max(c)));
            }
        }
    }
}
