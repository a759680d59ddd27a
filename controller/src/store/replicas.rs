//! Several controllers on one database: the identity they share, and who is up.
//!
//! Every replica proves the same controller key (tokens and network ids pin it), so the first
//! `serve` records it and every later one must bring the same ([`Store::claim_identity`]).
//! Each `serve` writes a row of where nodes reach it, every few seconds
//! ([`Store::replica_alive`]); `token create` on any host puts the replicas that are up into
//! the token, and admin commands on a host that runs no controller learn from them where nodes
//! connect and which key they pin.
//!
//! Each node's control connection is owned by one session of one replica
//! ([`Store::claim_session`]): only the owner marks the node disconnected when its connection
//! ends, so a session the node left on another replica cannot mark it offline; and the nodes of
//! a replica that is gone are marked disconnected by the others ([`Store::release_sessions`]).

use super::sql::{params, Conn, OptionalExtension};
use super::{Store, StoreError};
use mesh_proto::PublicKey;
use serde::Serialize;

/// A replica counts as up when it wrote its row within this many seconds.
pub const REPLICA_WINDOW_SECS: u64 = 15;

/// A running controller, as it describes itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaRow {
    /// Unique per `serve` process (host name, process id, a random part).
    pub id: String,
    /// Where nodes dial it (host:port of its QUIC listener), best first; empty when it listens
    /// on a wildcard address and announces nothing.
    pub addrs: Vec<String>,
    /// Where nodes reach it over TCP, if it listens there.
    pub tcp: Option<String>,
    /// When it started and when it last wrote (seconds since the epoch).
    pub started_at: u64,
    pub last_seen: u64,
}

impl Store {
    /// Records `key` as the controller identity of this database, or refuses when the
    /// database already belongs to another key.
    pub fn claim_identity(&self, key: &PublicKey) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        match held_identity(&tx)? {
            Some(held) if held == key.to_string() => return Ok(()),
            Some(held) => {
                return Err(StoreError::Invalid(format!(
                    "this database belongs to controller {held}, and this controller's key is {key}: every controller on one database must use the same key file; copy it from a running controller (see `mesh-controller serve --key-file`)"
                )))
            }
            None => {
                tx.execute(
                    "INSERT INTO settings (name, value) VALUES ('controller_key', ?1)",
                    [key.to_string()],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The controller identity recorded in this database, once a controller has started on it.
    pub fn identity(&self) -> Result<Option<PublicKey>, StoreError> {
        Ok(held_identity(&self.conn)?.and_then(|k| k.parse().ok()))
    }

    /// Writes (or refreshes) the row of a running replica.
    pub fn replica_alive(&self, row: &ReplicaRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO controllers (id, addrs, tcp, started_at, last_seen) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET addrs = excluded.addrs, tcp = excluded.tcp,
                 last_seen = excluded.last_seen",
            params![
                row.id,
                serde_json::to_string(&row.addrs).unwrap_or_else(|_| "[]".into()),
                row.tcp,
                row.started_at as i64,
                row.last_seen as i64,
            ],
        )?;
        Ok(())
    }

    /// Removes a replica's row (at a clean stop), and rows not refreshed for an hour.
    pub fn replica_gone(&self, id: &str, now: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM controllers WHERE id = ?1 OR last_seen < ?2",
            params![id, now.saturating_sub(3600) as i64],
        )?;
        Ok(())
    }

    /// The replicas up at `now`, oldest first.
    pub fn replicas(&self, now: u64) -> Result<Vec<ReplicaRow>, StoreError> {
        let rows = self.conn.query(
            "SELECT id, addrs, tcp, started_at, last_seen FROM controllers
             WHERE last_seen >= ?1 ORDER BY started_at, id",
            [now.saturating_sub(REPLICA_WINDOW_SECS) as i64],
        )?;
        rows.iter()
            .map(|r| {
                Ok(ReplicaRow {
                    id: r.get(0)?,
                    addrs: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or_default(),
                    tcp: r.get(2)?,
                    started_at: r.get::<_, i64>(3)?.max(0) as u64,
                    last_seen: r.get::<_, i64>(4)?.max(0) as u64,
                })
            })
            .collect()
    }

    /// Makes `session` the owner of the node's control connection (the one that just
    /// connected, on whichever replica).
    pub fn claim_session(
        &self,
        network_id: i64,
        key: &PublicKey,
        session: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE nodes SET session = ?1 WHERE network_id = ?2 AND key = ?3 AND removed_at IS NULL",
            params![session, network_id, key.to_string()],
        )?;
        Ok(())
    }

    /// Marks disconnected every node whose connection belonged to a replica not in `live`
    /// (one killed, or this one's earlier run): nobody else will. The number marked.
    pub fn release_sessions(&self, live: &[String]) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let rows = tx.query(
            "SELECT id, session FROM nodes WHERE connected = 1 AND removed_at IS NULL",
            params![],
        )?;
        let mut released = 0;
        for r in &rows {
            let session: Option<String> = r.get(1)?;
            let owner = session
                .as_deref()
                .and_then(|s| s.split_once('/'))
                .map(|(o, _)| o);
            if owner.is_some_and(|o| live.iter().any(|l| l == o)) {
                continue;
            }
            tx.execute(
                "UPDATE nodes SET connected = 0 WHERE id = ?1",
                [r.get::<_, i64>(0)?],
            )?;
            released += 1;
        }
        tx.commit()?;
        Ok(released)
    }
}

/// The controller key recorded in the database, as text.
fn held_identity(conn: &Conn) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT value FROM settings WHERE name = 'controller_key'",
            params![],
            |r| r.get(0),
        )
        .optional()?)
}

/// The tables, on SQLite (schema version 7).
pub(super) fn migrate(tx: &Conn) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS settings (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS controllers (
            id TEXT PRIMARY KEY,
            addrs TEXT NOT NULL DEFAULT '[]',
            tcp TEXT,
            started_at INTEGER NOT NULL,
            last_seen INTEGER NOT NULL
        );",
    )?;
    super::add_column(tx, "nodes", "session", "TEXT")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{join, key, store, T0};
    use super::*;

    fn replica(id: &str, addr: &str, at: u64) -> ReplicaRow {
        ReplicaRow {
            id: id.into(),
            addrs: vec![addr.into()],
            tcp: None,
            started_at: at,
            last_seen: at,
        }
    }

    #[test]
    fn the_first_controller_sets_the_identity_and_others_must_share_it() {
        let (_d, s) = store();
        assert_eq!(s.identity().unwrap(), None);
        s.claim_identity(&key(7)).unwrap();
        s.claim_identity(&key(7)).unwrap();
        assert_eq!(s.identity().unwrap(), Some(key(7)));
        let e = s.claim_identity(&key(8)).unwrap_err().to_string();
        assert!(e.contains("must use the same key file"), "{e}");
        assert_eq!(s.identity().unwrap(), Some(key(7)), "nothing changed");
    }

    #[test]
    fn replicas_are_listed_while_they_write_their_rows() {
        let (_d, s) = store();
        s.replica_alive(&replica("b", "192.0.2.2:7443", T0 + 1))
            .unwrap();
        s.replica_alive(&replica("a", "192.0.2.1:7443", T0))
            .unwrap();
        let ids =
            |now| -> Vec<String> { s.replicas(now).unwrap().into_iter().map(|r| r.id).collect() };
        assert_eq!(ids(T0 + 2), ["a", "b"], "oldest first");
        // `a` keeps writing, `b` stops.
        s.replica_alive(&replica("a", "192.0.2.1:7443", T0 + 20))
            .unwrap();
        // The started time stays the first one.
        let a = &s.replicas(T0 + 20).unwrap()[0];
        assert_eq!((a.started_at, a.last_seen), (T0, T0 + 20));
        assert_eq!(ids(T0 + 20), ["a"], "b is down");
        s.replica_gone("a", T0 + 21).unwrap();
        assert!(ids(T0 + 21).is_empty());
    }

    #[test]
    fn only_the_sessions_of_replicas_that_are_gone_are_released() {
        let (_d, mut s) = store();
        let report = super::super::NodeReport::default();
        for (n, name, session) in [(1, "a", "r1/1"), (2, "b", "r2/1"), (3, "c", "r3/4")] {
            let a = join(&mut s, n, name).unwrap();
            s.heartbeat(a.network_id, &key(n), &report, T0).unwrap();
            s.claim_session(a.network_id, &key(n), session).unwrap();
        }
        assert_eq!(s.release_sessions(&["r1".into(), "r3".into()]).unwrap(), 1);
        let online: Vec<String> = s
            .nodes("prod", T0)
            .unwrap()
            .into_iter()
            .filter(|n| n.online)
            .map(|n| n.name)
            .collect();
        assert_eq!(online, ["a", "c"]);
    }

    /// A node that moved from r1 to r2: the end of its old session on r1 leaves it online,
    /// the end of the one on r2 does not.
    #[test]
    fn only_the_latest_session_marks_its_node_disconnected() {
        let (_d, mut s) = store();
        let a = join(&mut s, 1, "a").unwrap();
        let online = |s: &Store| s.nodes("prod", T0).unwrap()[0].online;
        s.heartbeat(
            a.network_id,
            &key(1),
            &super::super::NodeReport::default(),
            T0,
        )
        .unwrap();
        s.claim_session(a.network_id, &key(1), "r1/1").unwrap();
        s.claim_session(a.network_id, &key(1), "r2/9").unwrap();
        s.disconnected(a.network_id, &key(1), "r1/1", T0).unwrap();
        assert!(online(&s), "the stale session's end changed nothing");
        s.disconnected(a.network_id, &key(1), "r2/9", T0).unwrap();
        assert!(!online(&s));
    }

    /// The periodic `last_seen` of connected nodes, written together: it reaches the nodes of
    /// live sessions, and a session that ended before the write does not bring its node back
    /// online.
    #[test]
    fn still_connected_touches_live_sessions_only() {
        let (_d, mut s) = store();
        let report = super::super::NodeReport::default();
        for (n, name, session) in [(1, "a", "r1/1"), (2, "b", "r1/2")] {
            let a = join(&mut s, n, name).unwrap();
            s.heartbeat(a.network_id, &key(n), &report, T0).unwrap();
            s.claim_session(a.network_id, &key(n), session).unwrap();
        }
        let network_id = join(&mut s, 3, "c").unwrap().network_id;
        // b's session ends; then the batch that still holds it is written.
        s.disconnected(network_id, &key(2), "r1/2", T0 + 1).unwrap();
        let batch = [
            (network_id, key(1), "r1/1".to_string()),
            (network_id, key(2), "r1/2".to_string()),
        ];
        s.still_connected(&batch, T0 + 15).unwrap();
        let nodes = s.nodes("prod", T0 + 15).unwrap();
        let node = |name: &str| nodes.iter().find(|n| n.name == name).unwrap();
        assert!(node("a").online);
        assert_eq!(node("a").last_seen, Some(crate::store::rfc3339(T0 + 15)));
        assert!(
            !node("b").online,
            "an ended session brought its node back online"
        );
        assert_eq!(node("b").last_seen, Some(crate::store::rfc3339(T0 + 1)));
    }
}
