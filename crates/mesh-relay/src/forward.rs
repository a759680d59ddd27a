//! The forwarding table, shared by the embedded and the standalone relay.
//!
//! One connection per (network, node key): a node that connects again replaces its older
//! connection, which is closed ([`mesh_control::quic::CLOSE_REPLACED`]). Only the connection in
//! the table may send: frames from a replaced, removed or revoked connection are dropped.

use mesh_proto::PublicKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tracing::{debug, info};

/// QUIC application close code: the node was removed from its network (its tickets revoked).
pub const CLOSE_REVOKED: u32 = 0x4d06;

struct Entry {
    conn: quinn::Connection,
    /// Unix seconds when the node's admission ends (its ticket's expiry; `u64::MAX` for the
    /// embedded relay, where the control connection itself is the admission).
    expires: u64,
}

type Table = HashMap<(String, PublicKey), Entry>;

/// Totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Frames forwarded.
    pub forwarded: u64,
    /// Bytes forwarded.
    pub forwarded_bytes: u64,
    /// Frames dropped: malformed, unknown or offline destination, or a full destination queue.
    pub dropped: u64,
    /// Connections closed because the same node connected again.
    pub replaced: u64,
    /// Connections closed because the node was removed or revoked.
    pub revoked: u64,
}

/// Admitted nodes by (network, key), and the loop that forwards what each sends.
#[derive(Default)]
pub struct Forwarder {
    table: Mutex<Table>,
    forwarded: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped: AtomicU64,
    replaced: AtomicU64,
    revoked: AtomicU64,
}

/// Keeps a node in the table; dropping it removes the node unless a newer connection of the
/// same node replaced it.
pub struct Attachment {
    forwarder: Arc<Forwarder>,
    network: String,
    key: PublicKey,
    conn: quinn::Connection,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut table = self.forwarder.lock();
        let id = (std::mem::take(&mut self.network), self.key);
        if table
            .get(&id)
            .is_some_and(|e| e.conn.stable_id() == self.conn.stable_id())
        {
            table.remove(&id);
        }
    }
}

impl Attachment {
    /// Forwards what the node sends until its connection closes.
    pub async fn forward(&self) {
        let mut dropped: u64 = 0;
        while let Ok(datagram) = self.conn.read_datagram().await {
            if !self
                .forwarder
                .forward_one(&self.network, &self.key, &self.conn, &datagram)
            {
                dropped += 1;
            }
        }
        if dropped > 0 {
            debug!(node = %self.key, dropped, "relay frames dropped");
        }
    }

    /// Extends the node's admission (a renewed ticket).
    pub fn set_expires(&self, expires: u64) {
        let mut table = self.forwarder.lock();
        if let Some(e) = table.get_mut(&(self.network.clone(), self.key)) {
            if e.conn.stable_id() == self.conn.stable_id() {
                e.expires = expires;
            }
        }
    }
}

impl Forwarder {
    /// An empty table.
    pub fn new() -> Arc<Forwarder> {
        Arc::new(Forwarder::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding the lock would be a bug; the table is still consistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `key` of `network` on `conn` (replacing an older connection of the same node) and
    /// forwards what it sends until the connection closes. Frames go only to nodes of the same
    /// network, with the key rewritten to the sender's.
    pub async fn serve(self: &Arc<Self>, network: &str, key: PublicKey, conn: quinn::Connection) {
        self.attach(network, key, conn, u64::MAX).forward().await;
    }

    /// Puts a node in the table until the returned value is dropped. An older connection of
    /// the same node is closed with [`mesh_control::quic::CLOSE_REPLACED`].
    pub fn attach(
        self: &Arc<Self>,
        network: &str,
        key: PublicKey,
        conn: quinn::Connection,
        expires: u64,
    ) -> Attachment {
        let old = self.lock().insert(
            (network.to_owned(), key),
            Entry {
                conn: conn.clone(),
                expires,
            },
        );
        if let Some(old) = old.filter(|o| o.conn.stable_id() != conn.stable_id()) {
            self.replaced.fetch_add(1, Ordering::Relaxed);
            info!(node = %key, %network, "node connected again; closing its older relay connection");
            old.conn.close(
                mesh_control::quic::CLOSE_REPLACED.into(),
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
        let Some(e) = self.lock().remove(&(network.to_owned(), *key)) else {
            return false;
        };
        self.revoked.fetch_add(1, Ordering::Relaxed);
        if close {
            e.conn
                .close(CLOSE_REVOKED.into(), b"removed from the network");
        }
        true
    }

    /// Applies a verified revocation: disconnects `key` of `network` if its admission ends at
    /// or before `cutoff`. Returns whether a connection was closed.
    pub fn revoke(&self, network: &str, key: &PublicKey, cutoff: u64) -> bool {
        let id = (network.to_owned(), *key);
        let e = {
            let mut table = self.lock();
            match table.get(&id) {
                Some(e) if e.expires <= cutoff => table.remove(&id),
                _ => None,
            }
        };
        let Some(e) = e else { return false };
        self.revoked.fetch_add(1, Ordering::Relaxed);
        e.conn.close(
            CLOSE_REVOKED.into(),
            b"removed from the network by the controller admin",
        );
        true
    }

    /// Forwards one frame from `from` on `conn`; false if it was dropped.
    fn forward_one(
        &self,
        network: &str,
        from: &PublicKey,
        conn: &quinn::Connection,
        datagram: &[u8],
    ) -> bool {
        let ok = (|| {
            let dst = mesh_proto::relay::decode(datagram).ok()?.key;
            if dst == *from {
                return None;
            }
            let target = {
                let table = self.lock();
                // Only the node's current connection may send (not a replaced or removed one).
                let sender = table.get(&(network.to_owned(), *from))?;
                if sender.conn.stable_id() != conn.stable_id() {
                    return None;
                }
                table.get(&(network.to_owned(), dst))?.conn.clone()
            };
            let mut frame = datagram.to_vec();
            mesh_proto::relay::set_key(&mut frame, from).ok()?;
            // A full destination queue drops its oldest datagrams, never blocks the sender.
            target.send_datagram(frame.into()).ok()
        })()
        .is_some();
        if ok {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
            self.forwarded_bytes
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Nodes connected now.
    pub fn connected(&self) -> usize {
        self.lock().len()
    }

    /// Whether `key` of `network` is connected.
    pub fn is_connected(&self, network: &str, key: &PublicKey) -> bool {
        self.lock().contains_key(&(network.to_owned(), *key))
    }

    /// Totals since start.
    pub fn counters(&self) -> RelayCounters {
        RelayCounters {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            replaced: self.replaced.load(Ordering::Relaxed),
            revoked: self.revoked.load(Ordering::Relaxed),
        }
    }
}
