//! Deferred opening: data messages decrypted by the driver, away from the node.
//!
//! With [`crate::Node::set_deferred_opening`] a data message on the main socket is not opened
//! where it comes in: the node looks up the session it is for, copies the sealed packet into
//! a buffer that can go to the TUN device as it is, and queues it with the session's receiving
//! key. [`crate::Node::poll_output`] hands a run of them out as an [`Unopened`]; the driver
//! decrypts it on any thread ([`Unopened::open`]) and gives it back
//! ([`crate::Node::handle_opened`]), where the node does everything else (the replay window,
//! timers, paths, the source check) in the order the messages came. A run of at most
//! [`OPEN_INLINE_MAX`] messages or under [`OPEN_INLINE_BYTES`], with nothing at the driver,
//! the node opens itself.
//!
//! Order is kept without a reorder buffer: anything that comes in while messages wait (a
//! handshake, a message on another socket or the relay) waits behind them, and batches come
//! back in the order they went out.

use crate::io::Source;
use crate::outbox::Endpoint;
use mesh_wg::{OpenKey, OpenedData, DATA_HEADER_LEN};
use std::collections::VecDeque;
use std::time::Instant;

/// Most data messages the node opens itself instead of handing them out (while none are at
/// the driver): a ping costs less opened here than a trip to another thread.
pub const OPEN_INLINE_MAX: usize = 2;
/// A run of messages carrying fewer bytes than this the node opens itself too (while none are
/// at the driver): a batch of TCP ACKs is many messages but little to decrypt.
pub const OPEN_INLINE_BYTES: usize = 4096;
/// Most data messages in one [`Unopened`] (one GRO batch).
pub const OPEN_BATCH_MAX: usize = 64;

/// A data message waiting to be opened.
#[derive(Debug)]
pub(crate) struct Item {
    /// Where it came from (the main socket).
    pub(crate) from: Endpoint,
    /// When it came.
    pub(crate) now: Instant,
    /// Its header (type, receiver index, counter).
    pub(crate) header: [u8; DATA_HEADER_LEN],
    /// The sealed packet and its tag, `room` bytes in: once opened, the packet lies where a
    /// TUN packet of the node's lies.
    pub(crate) buf: Vec<u8>,
    pub(crate) room: usize,
    pub(crate) state: State,
}

#[derive(Debug)]
pub(crate) enum State {
    Sealed(OpenKey),
    Opened(OpenedData),
    /// The tag did not prove it (or it was malformed): refused when the node takes it back.
    Refused,
}

impl Item {
    /// Decrypts it (any thread).
    pub(crate) fn open(&mut self) {
        let state = std::mem::replace(&mut self.state, State::Refused);
        self.state = match state {
            State::Sealed(key) => match self.buf.get_mut(self.room..) {
                Some(sealed) => key
                    .open(&self.header, sealed)
                    .map_or(State::Refused, State::Opened),
                None => State::Refused,
            },
            done => done,
        };
    }
}

/// What came in behind messages still to open, in order.
#[derive(Debug)]
pub(crate) enum Pending {
    Data(Item),
    /// Anything else, taken when everything before it was.
    Other {
        source: Source,
        datagram: Vec<u8>,
        now: Instant,
    },
}

/// Data messages for the driver to open ([`Unopened::open`], on any thread), then give back
/// with [`crate::Node::handle_opened`] in the order they were handed out. Nothing in it can be
/// read: the node takes the packets only once the keys proved them.
#[derive(Debug)]
pub struct Unopened {
    pub(crate) batch: u64,
    pub(crate) items: Vec<Item>,
}

impl Unopened {
    /// How many messages it holds.
    pub fn datagrams(&self) -> usize {
        self.items.len()
    }

    /// Decrypts every message, in place.
    pub fn open(mut self) -> Opened {
        for item in &mut self.items {
            item.open();
        }
        Opened(self)
    }
}

/// An [`Unopened`] after [`Unopened::open`]: to give back to the node.
#[derive(Debug)]
pub struct Opened(pub(crate) Unopened);

impl Opened {
    /// How many messages it holds.
    pub fn datagrams(&self) -> usize {
        self.0.items.len()
    }
}

/// The node's side: the queue, and which batches are at the driver.
#[derive(Debug, Default)]
pub(crate) struct Opening {
    pub(crate) on: bool,
    pub(crate) queue: VecDeque<Pending>,
    /// Batches handed out and not yet back, oldest first.
    pub(crate) at_driver: VecDeque<u64>,
    next_batch: u64,
    /// Messages at the queue's front the node decided to open itself (a short run), not yet
    /// taken.
    here: usize,
}

/// What to do next with the queue.
pub(crate) enum Next {
    /// Nothing now (empty, or only what must wait for batches at the driver).
    Wait,
    /// Take this message in the node (opened here, or something else).
    Take(Pending),
    /// Hand this batch out.
    HandOut(Unopened),
}

impl Opening {
    /// Whether something waits or is at the driver: whatever comes in now goes behind it.
    pub(crate) fn busy(&self) -> bool {
        !self.queue.is_empty() || !self.at_driver.is_empty()
    }

    pub(crate) fn next(&mut self) -> Next {
        if self.here > 0 {
            // (Nothing is at the driver while a run is taken here.)
            return self.next_here().map_or(Next::Wait, Next::Take);
        }
        let (run, bytes) = self
            .queue
            .iter()
            .take(OPEN_BATCH_MAX)
            .map_while(|p| match p {
                Pending::Data(item) => Some(item.buf.len() - item.room),
                Pending::Other { .. } => None,
            })
            .fold((0, 0), |(n, b), len| (n + 1, b + len));
        let here = run <= OPEN_INLINE_MAX || bytes < OPEN_INLINE_BYTES;
        match self.queue.front() {
            None => Next::Wait,
            Some(Pending::Other { .. }) if !self.at_driver.is_empty() => Next::Wait,
            Some(Pending::Other { .. }) => self.queue.pop_front().map_or(Next::Wait, Next::Take),
            Some(Pending::Data(_)) if here && self.at_driver.is_empty() => {
                // The whole run, one message a call.
                self.here = run;
                self.next()
            }
            Some(Pending::Data(_)) => {
                let items = self
                    .queue
                    .drain(..run)
                    .filter_map(|p| match p {
                        Pending::Data(item) => Some(item),
                        Pending::Other { .. } => None,
                    })
                    .collect();
                let batch = self.next_batch;
                self.next_batch += 1;
                self.at_driver.push_back(batch);
                Next::HandOut(Unopened { batch, items })
            }
        }
    }

    /// The next thing to take in the node now, opened here if it is a message, whatever the
    /// size of its run; `None` while batches are at the driver (or nothing waits).
    pub(crate) fn next_here(&mut self) -> Option<Pending> {
        if !self.at_driver.is_empty() {
            return None;
        }
        self.here = self.here.saturating_sub(1);
        let mut next = self.queue.pop_front()?;
        if let Pending::Data(item) = &mut next {
            item.open();
        }
        Some(next)
    }

    /// A batch came back: whether it is the oldest at the driver (batches handed out before it
    /// and never given back are forgotten: the driver dropped them).
    pub(crate) fn back(&mut self, batch: u64) -> bool {
        while self.at_driver.front().is_some_and(|b| *b < batch) {
            self.at_driver.pop_front();
        }
        if self.at_driver.front() == Some(&batch) {
            self.at_driver.pop_front();
            true
        } else {
            false
        }
    }
}
