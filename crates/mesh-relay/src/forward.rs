//! The forwarding table, shared by the embedded and the standalone relay.

use mesh_proto::PublicKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tracing::debug;

type Table = HashMap<(String, PublicKey), quinn::Connection>;

/// Totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Frames forwarded.
    pub forwarded: u64,
    /// Bytes forwarded.
    pub forwarded_bytes: u64,
    /// Frames dropped: malformed, unknown or offline destination, or a full destination queue.
    pub dropped: u64,
}

/// Admitted nodes by (network, key), and the loop that forwards what each sends.
#[derive(Default)]
pub struct Forwarder {
    table: Mutex<Table>,
    forwarded: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped: AtomicU64,
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
            .is_some_and(|c| c.stable_id() == self.conn.stable_id())
        {
            table.remove(&id);
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
        let _attached = self.attach(network, key, conn.clone());
        let mut dropped: u64 = 0;
        while let Ok(datagram) = conn.read_datagram().await {
            if !self.forward_one(network, &key, &datagram) {
                dropped += 1;
            }
        }
        if dropped > 0 {
            debug!(node = %key, dropped, "relay frames dropped");
        }
    }

    /// Puts a node in the table until the returned value is dropped.
    pub fn attach(
        self: &Arc<Self>,
        network: &str,
        key: PublicKey,
        conn: quinn::Connection,
    ) -> Attachment {
        self.lock().insert((network.to_owned(), key), conn.clone());
        Attachment {
            forwarder: self.clone(),
            network: network.to_owned(),
            key,
            conn,
        }
    }

    /// Forwards one frame from `from`; false if it was dropped.
    fn forward_one(&self, network: &str, from: &PublicKey, datagram: &[u8]) -> bool {
        let ok = (|| {
            let dst = mesh_proto::relay::decode(datagram).ok()?.key;
            if dst == *from {
                return None;
            }
            let target = self.lock().get(&(network.to_owned(), dst)).cloned()?;
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
        }
    }
}
