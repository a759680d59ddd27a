//! The forwarding table over links (QUIC or TCP), shared by the embedded and the standalone
//! relay.
//!
//! One connection per (network, node key): a node that connects again replaces its older
//! connection, which is closed ([`mesh_control::quic::CLOSE_REPLACED`]). Only the connection in
//! the table may send: frames from a replaced, removed or revoked connection are dropped. The
//! rules themselves are [`Routes`], without I/O; this module drives them with links.
//!
//! Frames do not take the table's lock. Each node's forwarding task keeps the destinations it
//! resolved ([`Routes::resolve`]) with the table's generation, mirrored in an atomic; a frame
//! whose destination is known and whose generation is unchanged goes straight out. Any change
//! of the table (a node in or out, replaced, removed, revoked) bumps the generation, and the
//! next frame of every task resolves again under the lock. Counters are atomics.

use crate::route::{self, Routes};
use bytes::Bytes;
use mesh_control::Link;
use mesh_proto::PublicKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tracing::{debug, info};

pub use crate::route::RelayCounters;

/// Application close code: the node was removed from its network (its tickets revoked).
pub const CLOSE_REVOKED: u32 = 0x4d06;

impl route::Connection for Link {
    fn id(&self) -> usize {
        Link::id(self)
    }
}

/// Admitted nodes by (network, key), and the loop that forwards what each sends.
#[derive(Default)]
pub struct Forwarder {
    routes: Mutex<Routes<Link>>,
    /// [`Routes::generation`], written under the lock after every change.
    generation: AtomicU64,
    forwarded: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped: AtomicU64,
}

/// A forwarding task's destinations, valid for one generation of the table.
#[derive(Default)]
struct RouteCache {
    generation: u64,
    to: HashMap<PublicKey, Link>,
}

impl RouteCache {
    /// Forgets what it knew if the table's generation is no longer the one it was resolved in.
    fn at(&mut self, generation: u64) {
        if generation != self.generation {
            self.to.clear();
            self.generation = generation;
        }
    }
}

/// Keeps a node in the table; dropping it removes the node unless a newer connection of the
/// same node replaced it.
pub struct Attachment {
    forwarder: Arc<Forwarder>,
    network: String,
    key: PublicKey,
    conn: Link,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.forwarder
            .change(|r| r.detach(&self.network, &self.key, &self.conn));
    }
}

impl Attachment {
    /// Forwards what the node sends until its connection closes.
    pub async fn forward(&self) {
        let mut dropped: u64 = 0;
        let mut cache = RouteCache::default();
        while let Ok(datagram) = self.conn.read_datagram().await {
            if !self.forwarder.forward_one(
                &mut cache,
                &self.network,
                &self.key,
                &self.conn,
                datagram,
            ) {
                dropped += 1;
            }
        }
        if dropped > 0 {
            debug!(node = %self.key, dropped, "relay frames dropped");
        }
    }

    /// Extends the node's admission (a renewed ticket).
    pub fn set_expires(&self, expires: u64) {
        self.forwarder
            .lock()
            .set_expires(&self.network, &self.key, &self.conn, expires);
    }
}

impl Forwarder {
    /// An empty table.
    pub fn new() -> Arc<Forwarder> {
        Arc::new(Forwarder::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes<Link>> {
        // A panic while holding the lock would be a bug; the table is still consistent.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the table and publishes its new generation.
    fn change<T>(&self, f: impl FnOnce(&mut Routes<Link>) -> T) -> T {
        let mut routes = self.lock();
        let out = f(&mut routes);
        self.generation
            .store(routes.generation(), Ordering::Release);
        out
    }

    /// Admits `key` of `network` on `conn` (replacing an older connection of the same node) and
    /// forwards what it sends until the connection closes. Frames go only to nodes of the same
    /// network, with the key rewritten to the sender's.
    pub async fn serve(self: &Arc<Self>, network: &str, key: PublicKey, conn: Link) {
        self.attach(network, key, conn, u64::MAX).forward().await;
    }

    /// Puts a node in the table until the returned value is dropped. An older connection of
    /// the same node is closed with [`mesh_control::quic::CLOSE_REPLACED`].
    pub fn attach(
        self: &Arc<Self>,
        network: &str,
        key: PublicKey,
        conn: Link,
        expires: u64,
    ) -> Attachment {
        let old = self.change(|r| r.attach(network, key, conn.clone(), expires));
        if let Some(old) = old {
            info!(node = %key, %network, "node connected again; closing its older relay connection");
            old.close(
                mesh_control::quic::CLOSE_REPLACED,
                b"replaced by a newer connection of the same node",
            );
        }
        Attachment {
            forwarder: self.clone(),
            network: network.to_owned(),
            key,
            conn,
        }
    }

    /// Takes `key` of `network` out of the table at once (the node was removed): nothing it
    /// sends is forwarded and nothing reaches it. Its connection is closed when `close` is set;
    /// the controller closes its own after telling the node why. Returns whether it was there.
    pub fn remove(&self, network: &str, key: &PublicKey, close: bool) -> bool {
        let Some(conn) = self.change(|r| r.remove(network, key)) else {
            return false;
        };
        if close {
            conn.close(CLOSE_REVOKED, b"removed from the network");
        }
        true
    }

    /// Applies a verified revocation: disconnects `key` of `network` if its admission ends at
    /// or before `cutoff`. Returns whether a connection was closed.
    pub fn revoke(&self, network: &str, key: &PublicKey, cutoff: u64) -> bool {
        let Some(conn) = self.change(|r| r.revoke(network, key, cutoff)) else {
            return false;
        };
        conn.close(
            CLOSE_REVOKED,
            b"removed from the network by the controller admin",
        );
        true
    }

    /// Forwards one frame from `from` on `conn` by the rules of [`Routes`]; false if it was
    /// dropped. Takes the lock only when `cache` does not know the destination for the table's
    /// current generation.
    fn forward_one(
        &self,
        cache: &mut RouteCache,
        network: &str,
        from: &PublicKey,
        conn: &Link,
        datagram: Bytes,
    ) -> bool {
        let Ok(dst) = route::destination(from, &datagram) else {
            return self.drop_one();
        };
        cache.at(self.generation.load(Ordering::Acquire));
        let to = match cache.to.get(&dst) {
            Some(to) => to,
            None => {
                let routes = self.lock();
                let Ok(to) = routes.resolve(network, from, conn, &dst) else {
                    return self.drop_one();
                };
                // Resolved under the lock: valid for the generation the table has now.
                cache.at(routes.generation());
                drop(routes);
                cache.to.entry(dst).or_insert(to)
            }
        };
        // The frame goes on with the sender's key. A datagram that is the last holder of its
        // receive buffer is rewritten in place; one that still shares it (with other datagrams
        // of the same received batch, or a TCP link's read buffer) is copied. How often the
        // first case happens under load was not measured.
        let mut frame = match datagram.try_into_mut() {
            Ok(frame) => frame,
            Err(shared) => bytes::BytesMut::from(&shared[..]),
        };
        if mesh_proto::relay::set_key(&mut frame, from).is_err() {
            return self.drop_one();
        }
        let len = frame.len() as u64;
        // A full destination queue drops its oldest datagrams, never blocks the sender (quinn
        // does not count them; a TCP link does, and they count as dropped here).
        let before = to.datagrams_dropped();
        if to.send_datagram(frame.freeze()).is_err() {
            return self.drop_one();
        }
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        self.forwarded_bytes.fetch_add(len, Ordering::Relaxed);
        let evicted = to.datagrams_dropped().saturating_sub(before);
        if evicted > 0 {
            // Counted as forwarded before; they were not.
            let _ = self
                .forwarded
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(evicted))
                });
            self.dropped.fetch_add(evicted, Ordering::Relaxed);
        }
        true
    }

    fn drop_one(&self) -> bool {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Nodes connected now.
    pub fn connected(&self) -> usize {
        self.lock().len()
    }

    /// Whether `key` of `network` is connected.
    pub fn is_connected(&self, network: &str, key: &PublicKey) -> bool {
        self.lock().contains(network, key)
    }

    /// Totals since start.
    pub fn counters(&self) -> RelayCounters {
        let mut c = self.lock().counters();
        c.forwarded += self.forwarded.load(Ordering::Relaxed);
        c.forwarded_bytes += self.forwarded_bytes.load(Ordering::Relaxed);
        c.dropped += self.dropped.load(Ordering::Relaxed);
        c
    }
}
