//! Relay frames: WireGuard messages carried as QUIC datagrams through a relay.
//!
//! One frame per QUIC datagram:
//! `[version u8 = 1][fragment u8: index << 4 | count][packet id u16][peer key 32][chunk]`.
//! Toward the relay the key is the destination node; from the relay it is the source node (the
//! relay rewrites it, so a node cannot claim to be another). A WireGuard message larger than one
//! datagram (a full 1420-byte inner packet needs 1452 bytes, a QUIC datagram starts at about
//! 1150) is split into at most [`MAX_FRAGMENTS`] chunks with the same packet id, reassembled by
//! [`Reassembly`] with hard bounds on memory and time.
//!
//! A node frames and reassembles with one [`Framer`] (packet ids and reassembly, without I/O),
//! so the agent's data plane and the simulation do it the same way.

use crate::PublicKey;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Frame format version.
pub const VERSION: u8 = 1;
/// Bytes before the chunk.
pub const HEADER_LEN: usize = 1 + 1 + 2 + 32;
/// Most fragments of one message.
pub const MAX_FRAGMENTS: usize = 4;
/// Largest WireGuard message relayed (a 1420-byte inner packet needs 1452; jumbo MTUs up to
/// 9000 are not relayed whole).
pub const MAX_MESSAGE: usize = 4096;
/// Messages being reassembled at once, over all senders.
pub const MAX_PENDING: usize = 256;
/// Messages being reassembled at once from one sender: its share of [`MAX_PENDING`]. A sender
/// at its share loses its own oldest message, never another sender's; when the whole table is
/// full, the sender with the most pending loses its oldest.
pub const MAX_PENDING_PER_SENDER: usize = 32;
/// An incomplete message is dropped after this long.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// Shorter than the header, or an empty chunk.
    #[error("relay frame too short")]
    Short,
    /// Unknown version.
    #[error("relay frame version {0} unknown")]
    Version(u8),
    /// Fragment index/count out of range.
    #[error("relay frame fragment fields out of range")]
    Fragment,
    /// The datagram size cannot hold even one byte of payload, or the message is too big.
    #[error("relay message does not fit")]
    Size,
}

/// A decoded frame, borrowing the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Destination (toward the relay) or source (from the relay).
    pub key: PublicKey,
    /// Packet id shared by the fragments of one message.
    pub id: u16,
    /// Fragment index.
    pub index: u8,
    /// Fragment count.
    pub count: u8,
    /// This fragment's bytes.
    pub chunk: &'a [u8],
}

/// Decodes one frame.
pub fn decode(bytes: &[u8]) -> Result<Frame<'_>, RelayError> {
    if bytes.len() <= HEADER_LEN {
        return Err(RelayError::Short);
    }
    if bytes[0] != VERSION {
        return Err(RelayError::Version(bytes[0]));
    }
    let (index, count) = (bytes[1] >> 4, bytes[1] & 0x0f);
    if count == 0 || usize::from(count) > MAX_FRAGMENTS || index >= count {
        return Err(RelayError::Fragment);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes[4..HEADER_LEN]);
    Ok(Frame {
        key: PublicKey(key),
        id: u16::from_be_bytes([bytes[2], bytes[3]]),
        index,
        count,
        chunk: &bytes[HEADER_LEN..],
    })
}

/// Rewrites the key of an encoded frame in place (what the relay does: destination → source).
pub fn set_key(frame: &mut [u8], key: &PublicKey) -> Result<(), RelayError> {
    if frame.len() <= HEADER_LEN {
        return Err(RelayError::Short);
    }
    frame[4..HEADER_LEN].copy_from_slice(&key.0);
    Ok(())
}

/// Splits `message` into frames of at most `max_datagram` bytes each.
pub fn encode(
    key: &PublicKey,
    id: u16,
    message: &[u8],
    max_datagram: usize,
) -> Result<Vec<Vec<u8>>, RelayError> {
    let room = max_datagram
        .checked_sub(HEADER_LEN)
        .filter(|r| *r > 0)
        .ok_or(RelayError::Size)?;
    if message.is_empty() || message.len() > MAX_MESSAGE {
        return Err(RelayError::Size);
    }
    let count = message.len().div_ceil(room);
    if count > MAX_FRAGMENTS {
        return Err(RelayError::Size);
    }
    Ok(message
        .chunks(room)
        .enumerate()
        .map(|(i, chunk)| {
            let mut f = Vec::with_capacity(HEADER_LEN + chunk.len());
            f.push(VERSION);
            f.push(((i as u8) << 4) | count as u8);
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&key.0);
            f.extend_from_slice(chunk);
            f
        })
        .collect())
}

struct Pending {
    /// Tells this message apart from an earlier one with the same sender and packet id, so the
    /// age queues can keep entries of finished messages (see [`Reassembly`]).
    seq: u64,
    started: Instant,
    count: u8,
    parts: [Option<Vec<u8>>; MAX_FRAGMENTS],
}

/// One sender's pending messages, oldest first (by sequence number; some may be finished).
#[derive(Default)]
struct Sender {
    pending: usize,
    order: VecDeque<(u64, u16)>,
}

/// Entries beyond twice the live ones (plus this) make an age queue drop its finished entries.
const QUEUE_SLACK: usize = 64;

/// Reassembles fragmented messages, bounded in entries and time, with a share per sender.
///
/// Every frame costs O(1) (amortised): the age queues (all messages, and each sender's) are
/// not searched when a message completes. A finished message leaves its queue entries behind;
/// they are told apart from a newer message with the same sender and packet id by a sequence
/// number, skipped when they reach the front, and dropped in one pass when a queue holds more
/// than twice the live messages (so a pass over n entries comes after at least n/2 pushes).
/// Only a full table (an attack or heavy loss) scans the senders, at most [`MAX_PENDING`], to
/// find the one with most pending.
#[derive(Default)]
pub struct Reassembly {
    pending: HashMap<(PublicKey, u16), Pending>,
    /// Every pending message by age (some entries finished).
    order: VecDeque<(u64, PublicKey, u16)>,
    senders: HashMap<PublicKey, Sender>,
    next_seq: u64,
    dropped: u64,
}

impl Reassembly {
    /// Messages given up on (expired or evicted) so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Adds a frame; returns the whole message once every fragment is there.
    pub fn push(&mut self, frame: Frame<'_>, now: Instant) -> Option<(PublicKey, Vec<u8>)> {
        if frame.count == 1 {
            return Some((frame.key, frame.chunk.to_vec()));
        }
        self.expire(now);
        let k = (frame.key, frame.id);
        if !self.pending.contains_key(&k) {
            self.make_room(frame.key);
            self.start(k, frame.count, now);
        }
        let p = self.pending.get_mut(&k)?;
        if p.count != frame.count {
            // Inconsistent fragment counts: drop the message.
            self.remove(k);
            self.dropped += 1;
            return None;
        }
        let index = usize::from(frame.index);
        let count = usize::from(frame.count);
        let complete = (0..count).all(|i| i == index || p.parts[i].is_some());
        if !complete {
            let mut part = Vec::with_capacity(if index == 0 {
                // The whole message is built on the first chunk: room for the others.
                (frame.chunk.len() * count).min(MAX_MESSAGE)
            } else {
                frame.chunk.len()
            });
            part.extend_from_slice(frame.chunk);
            p.parts[index] = Some(part);
            return None;
        }
        let mut p = self.remove(k)?;
        let mut msg = match p.parts[0].take() {
            Some(first) => first,
            None => Vec::with_capacity((frame.chunk.len() * count).min(MAX_MESSAGE)),
        };
        for (i, part) in p.parts.iter().enumerate().take(count) {
            let chunk = if i == index {
                frame.chunk
            } else if i == 0 {
                continue;
            } else {
                part.as_deref().unwrap_or_default()
            };
            if msg.len() + chunk.len() > MAX_MESSAGE {
                self.dropped += 1;
                return None;
            }
            msg.extend_from_slice(chunk);
        }
        Some((frame.key, msg))
    }

    /// Before a new message of `sender`: evicts its own oldest at its share, or the fullest
    /// sender's oldest when the table is full.
    fn make_room(&mut self, sender: PublicKey) {
        let mine = self.senders.get(&sender).map_or(0, |s| s.pending);
        if mine >= MAX_PENDING_PER_SENDER {
            self.evict_oldest_of(sender);
        } else if self.pending.len() >= MAX_PENDING {
            let hog = self
                .senders
                .iter()
                .max_by_key(|(_, s)| s.pending)
                .map(|(key, _)| *key);
            if let Some(hog) = hog {
                self.evict_oldest_of(hog);
            }
        }
    }

    /// Opens message `k` of `count` fragments and queues it by age.
    fn start(&mut self, k: (PublicKey, u16), count: u8, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(
            k,
            Pending {
                seq,
                started: now,
                count,
                parts: Default::default(),
            },
        );
        let live = self.pending.len();
        self.order.push_back((seq, k.0, k.1));
        if self.order.len() > 2 * live + QUEUE_SLACK {
            let pending = &self.pending;
            self.order
                .retain(|&(seq, key, id)| is_live(pending, seq, key, id));
        }
        let s = self.senders.entry(k.0).or_default();
        s.pending += 1;
        s.order.push_back((seq, k.1));
        if s.order.len() > 2 * s.pending + QUEUE_SLACK {
            let pending = &self.pending;
            s.order.retain(|&(seq, id)| is_live(pending, seq, k.0, id));
        }
    }

    /// Takes a message out of the table (its queue entries stay, finished).
    fn remove(&mut self, k: (PublicKey, u16)) -> Option<Pending> {
        let p = self.pending.remove(&k)?;
        if let Some(s) = self.senders.get_mut(&k.0) {
            s.pending = s.pending.saturating_sub(1);
            if s.pending == 0 {
                // Every entry left in its queue is finished.
                self.senders.remove(&k.0);
            }
        }
        Some(p)
    }

    /// Gives up on the oldest pending message of `sender`.
    fn evict_oldest_of(&mut self, sender: PublicKey) {
        let Some(s) = self.senders.get_mut(&sender) else {
            return;
        };
        while let Some((seq, id)) = s.order.pop_front() {
            if is_live(&self.pending, seq, sender, id) {
                self.remove((sender, id));
                self.dropped += 1;
                return;
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(seq, key, id)) = self.order.front() {
            match self.pending.get(&(key, id)) {
                Some(p) if p.seq == seq => {
                    if now.duration_since(p.started) < REASSEMBLY_TIMEOUT {
                        break;
                    }
                    self.remove((key, id));
                    self.dropped += 1;
                }
                _ => {}
            }
            self.order.pop_front();
        }
    }

    /// Messages pending now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.pending.len()
    }
}

/// Whether the queue entry `(seq, key, id)` is a message still pending (not finished, and not
/// an earlier message with the same sender and packet id).
fn is_live(
    pending: &HashMap<(PublicKey, u16), Pending>,
    seq: u64,
    key: PublicKey,
    id: u16,
) -> bool {
    pending.get(&(key, id)).is_some_and(|p| p.seq == seq)
}

/// A node's end of its relay connections, without I/O: numbers and frames the WireGuard
/// messages it sends through a relay, and reassembles the ones it receives. One per node,
/// shared by all its relay connections (one packet id sequence, one bounded [`Reassembly`]).
#[derive(Default)]
pub struct Framer {
    /// Packet id of the last message framed.
    last_id: u16,
    reassembly: Reassembly,
}

impl Framer {
    /// Frames a WireGuard message for the node `to` under the next packet id, in datagrams of
    /// at most `max_datagram` bytes (the relay connection's QUIC datagram room now). Send every
    /// datagram returned; the receiver reassembles them in any order. A message that cannot be
    /// framed (empty, larger than [`MAX_MESSAGE`], or needing more than [`MAX_FRAGMENTS`]
    /// datagrams) is an error: drop it and count it.
    pub fn frame(
        &mut self,
        to: &PublicKey,
        message: &[u8],
        max_datagram: usize,
    ) -> Result<Vec<Vec<u8>>, RelayError> {
        self.last_id = self.last_id.wrapping_add(1);
        encode(to, self.last_id, message, max_datagram)
    }

    /// One datagram from a relay. `Ok(Some((from, message)))` once a message is whole: hand it to
    /// the node as relayed from `from`. `Ok(None)` while fragments are missing. An error for a
    /// malformed frame: drop it and count it.
    pub fn receive(
        &mut self,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Option<(PublicKey, Vec<u8>)>, RelayError> {
        let frame = decode(datagram)?;
        Ok(self.reassembly.push(frame, now))
    }

    /// Incomplete messages given up on so far (expired or evicted).
    pub fn dropped(&self) -> u64 {
        self.reassembly.dropped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: PublicKey = PublicKey([3; 32]);

    #[test]
    fn small_message_is_one_frame() {
        let frames = encode(&K, 7, &[1, 2, 3], 1200).unwrap();
        assert_eq!(frames.len(), 1);
        let f = decode(&frames[0]).unwrap();
        assert_eq!(
            (f.key, f.id, f.index, f.count, f.chunk),
            (K, 7, 0, 1, &[1u8, 2, 3][..])
        );
    }

    #[test]
    fn full_size_packet_splits_and_reassembles_in_any_order() {
        let msg: Vec<u8> = (0..1452u32).map(|i| i as u8).collect();
        let frames = encode(&K, 9, &msg, 1150).unwrap();
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.len() <= 1150));
        let now = Instant::now();
        let mut r = Reassembly::default();
        assert_eq!(r.push(decode(&frames[1]).unwrap(), now), None);
        assert_eq!(r.push(decode(&frames[0]).unwrap(), now), Some((K, msg)));
    }

    #[test]
    fn relay_rewrites_the_key() {
        let mut f = encode(&K, 1, b"wg", 1200).unwrap().remove(0);
        set_key(&mut f, &PublicKey([8; 32])).unwrap();
        assert_eq!(decode(&f).unwrap().key, PublicKey([8; 32]));
    }

    #[test]
    fn bad_frames_are_refused() {
        assert_eq!(decode(&[1; 10]), Err(RelayError::Short));
        let mut f = encode(&K, 1, b"wg", 1200).unwrap().remove(0);
        f[0] = 2;
        assert_eq!(decode(&f), Err(RelayError::Version(2)));
        f[0] = 1;
        f[1] = 0x22; // index 2 of 2
        assert_eq!(decode(&f), Err(RelayError::Fragment));
        f[1] = 0x05; // 5 fragments
        assert_eq!(decode(&f), Err(RelayError::Fragment));
        assert_eq!(encode(&K, 1, &[0; 5000], 1200), Err(RelayError::Size));
        assert_eq!(encode(&K, 1, b"x", 36), Err(RelayError::Size));
    }

    #[test]
    fn incomplete_messages_expire_and_memory_is_bounded() {
        let msg = vec![5u8; 2000];
        let now = Instant::now();
        let mut r = Reassembly::default();
        for id in 0..(MAX_PENDING as u16 + 10) {
            let frames = encode(&K, id, &msg, 1200).unwrap();
            assert_eq!(r.push(decode(&frames[0]).unwrap(), now), None);
        }
        assert!(r.len() <= MAX_PENDING_PER_SENDER);
        assert_eq!(r.dropped(), u64::from(MAX_PENDING as u16 + 10) - 32);
        // Many senders together stay within the total.
        for n in 0..20u8 {
            for id in 0..40u16 {
                let frames = encode(&PublicKey([n; 32]), id, &msg, 1200).unwrap();
                r.push(decode(&frames[0]).unwrap(), now);
            }
        }
        assert!(r.len() <= MAX_PENDING);
        assert!(r.order.len() <= 2 * r.len() + QUEUE_SLACK);
        assert_eq!(
            r.senders.values().map(|s| s.pending).sum::<usize>(),
            r.len()
        );
        let later = now + REASSEMBLY_TIMEOUT;
        let frames = encode(&K, 60000, &msg, 1200).unwrap();
        r.push(decode(&frames[0]).unwrap(), later);
        assert_eq!(r.len(), 1, "old ones expired");
    }

    #[test]
    fn a_sender_spraying_partial_frames_does_not_evict_another_senders() {
        let msg = vec![7u8; 2000];
        let now = Instant::now();
        let mut r = Reassembly::default();
        let victim = PublicKey([1; 32]);
        let sprayer = PublicKey([2; 32]);
        // The victim's first fragment arrives...
        let good = encode(&victim, 42, &msg, 1200).unwrap();
        assert_eq!(r.push(decode(&good[0]).unwrap(), now), None);
        // ...then the sprayer sends thousands of first fragments that never complete...
        for id in 0..5000u16 {
            let f = encode(&sprayer, id, &msg, 1200).unwrap();
            assert_eq!(r.push(decode(&f[0]).unwrap(), now), None);
        }
        // ...and the victim's message still completes.
        assert_eq!(
            r.push(decode(&good[1]).unwrap(), now),
            Some((victim, msg.clone()))
        );
        // Many sprayers together cannot evict it either: the fullest sender pays.
        assert_eq!(r.push(decode(&good[0]).unwrap(), now), None);
        for n in 10..30u8 {
            for id in 0..100u16 {
                let f = encode(&PublicKey([n; 32]), id, &msg, 1200).unwrap();
                r.push(decode(&f[0]).unwrap(), now);
            }
        }
        assert_eq!(r.push(decode(&good[1]).unwrap(), now), Some((victim, msg)));
    }

    /// A finished message leaves its age entry behind; when its packet id comes back (ids
    /// wrap), eviction must still take the sender's oldest live message, not the newer one
    /// that reuses the id.
    #[test]
    fn a_reused_packet_id_does_not_inherit_the_age_of_a_finished_message() {
        let msg = vec![9u8; 2000];
        let now = Instant::now();
        let mut r = Reassembly::default();
        let m = msg.clone();
        let frames = move |id| encode(&K, id, &m, 1200).unwrap();
        let old = frames(5);
        assert_eq!(r.push(decode(&old[0]).unwrap(), now), None);
        assert_eq!(
            r.push(decode(&old[1]).unwrap(), now),
            Some((K, msg.clone()))
        );
        // 31 partial messages, then id 5 again: the sender's share is full.
        for id in 100..131 {
            assert_eq!(r.push(decode(&frames(id)[0]).unwrap(), now), None);
        }
        let again = frames(5);
        assert_eq!(r.push(decode(&again[0]).unwrap(), now), None);
        assert_eq!(r.len(), MAX_PENDING_PER_SENDER);
        // One more: the oldest live message (id 100) goes, not the newer id 5.
        assert_eq!(r.push(decode(&frames(200)[0]).unwrap(), now), None);
        assert_eq!(r.dropped(), 1);
        assert_eq!(
            r.push(decode(&again[1]).unwrap(), now),
            Some((K, msg.clone()))
        );
        assert_eq!(
            r.push(decode(&frames(101)[1]).unwrap(), now),
            Some((K, msg))
        );
        assert_eq!(r.push(decode(&frames(100)[1]).unwrap(), now), None);
    }

    #[test]
    fn framer_numbers_messages_and_reassembles_what_it_frames() {
        let now = Instant::now();
        let (mut a, mut b) = (Framer::default(), Framer::default());
        let small = a.frame(&K, b"handshake", 1200).unwrap();
        let msg: Vec<u8> = (0..1452u32).map(|i| i as u8).collect();
        let big = a.frame(&K, &msg, 1200).unwrap();
        assert_eq!((small.len(), big.len()), (1, 2));
        assert!(big.iter().all(|f| f.len() <= 1200));
        let ids: Vec<u16> = [&small[0], &big[0], &big[1]]
            .iter()
            .map(|f| decode(f).unwrap().id)
            .collect();
        assert_eq!(ids, [1, 2, 2]);
        // What a relay would forward: the sender's key in place of the destination's.
        let from = PublicKey([4; 32]);
        let mut relayed: Vec<Vec<u8>> = small.into_iter().chain(big.into_iter().rev()).collect();
        for f in &mut relayed {
            set_key(f, &from).unwrap();
        }
        assert_eq!(
            b.receive(&relayed[0], now),
            Ok(Some((from, b"handshake".to_vec())))
        );
        assert_eq!(b.receive(&relayed[1], now), Ok(None));
        assert_eq!(b.receive(&relayed[2], now), Ok(Some((from, msg))));
        assert_eq!(b.receive(&[1; 20], now), Err(RelayError::Short));
        // A message that cannot be framed still uses up its id; the next one goes on.
        assert_eq!(a.frame(&K, &[], 1200), Err(RelayError::Size));
        assert_eq!(decode(&a.frame(&K, b"x", 1200).unwrap()[0]).unwrap().id, 4);
        assert_eq!(b.dropped(), 0);
    }

    #[test]
    fn framer_packet_ids_wrap() {
        let mut a = Framer {
            last_id: u16::MAX - 1,
            ..Framer::default()
        };
        let id = |a: &mut Framer| decode(&a.frame(&K, b"x", 1200).unwrap()[0]).unwrap().id;
        assert_eq!((id(&mut a), id(&mut a), id(&mut a)), (u16::MAX, 0, 1));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            let _ = decode(&bytes);
        }
    }
}
