//! Controller state in SQLite: networks, join tokens, nodes and address management.
//!
//! Every method takes the wall-clock time (`now`, seconds since the Unix epoch) it should act
//! at, so expiry and liveness are tested without a real clock. Every state change is one
//! transaction; the `UNIQUE(network_id, address)` constraint makes it impossible, even across
//! crashes or two processes, to give one address to two nodes.
//!
//! Removed nodes are kept as tombstones that hold their address: the same key, or a new key under
//! the same name (a reinstalled machine), gets that address back. Tombstoned addresses are
//! reused for other nodes only when the range has nothing else free.
//!
//! Nodes are admitted with a join token, or by asking to join a network by its id: such a request
//! waits for the administrator unless the network approves automatically ([`approval`]).
//!
//! Every network also has an IPv6 overlay prefix (a ULA) unless created without one, and every
//! node a stable address in it, under the same rules ([`ipam6`]).
//!
//! Nodes advertise subnet routes (their pod subnet, say); the network's policy or the
//! administrator approves them, overlaps are refused, and peers get the approved ones
//! ([`routes`]).
//!
//! The database file (and SQLite's `-wal`/`-shm` files beside it) is readable by its owner only:
//! it holds token hashes and the membership of every network.

use mesh_proto::control::{ErrorCode, Ipv6Net, NatKind, PeerInfo};
use mesh_proto::PublicKey;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sql::{params, Conn, OptionalExtension};
use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

pub mod approval;
pub mod ipam6;
pub mod names;
mod pg_schema;
pub mod pg_tls;
pub mod replicas;
pub mod routes;
pub mod sql;

pub use approval::{
    rejection_message, Approval, Approved, JoinRequest, PendingRow, Rejected, RequestOutcome,
    RequestState, Who, MAX_PENDING_PER_NETWORK, MAX_PENDING_PER_SOURCE, REJECT_COOLDOWN_SECS,
    REQUEST_LIFETIME_SECS,
};
pub use routes::{parse_prefix, parse_prefix_list, RouteRow};

/// A node counts as online when connected and heard from within this many seconds.
pub const ONLINE_WINDOW_SECS: u64 = 30;

/// Failures of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database (SQLite or PostgreSQL) failed.
    #[error("database error: {0}")]
    Db(sql::DbError),
    /// The caller asked for something that does not exist or is not allowed.
    #[error("{0}")]
    Invalid(String),
    /// A join or hello was refused; the code goes on the wire.
    #[error("{message}")]
    Refused {
        /// Wire code.
        code: ErrorCode,
        /// Text for the person at the node.
        message: String,
    },
}

impl From<sql::DbError> for StoreError {
    fn from(e: sql::DbError) -> StoreError {
        StoreError::Db(e)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Db(e.into())
    }
}

fn refused(code: ErrorCode, message: impl Into<String>) -> StoreError {
    StoreError::Refused {
        code,
        message: message.into(),
    }
}

/// An IPv4 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub network: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (expected e.g. 100.64.0.0/16)"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        let prefix_len: u8 = len
            .parse()
            .map_err(|_| format!("{len:?} is not a prefix length"))?;
        if !(8..=30).contains(&prefix_len) {
            return Err(format!(
                "prefix length /{prefix_len} out of range: use /8 to /30"
            ));
        }
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        if u32::from(ip) & !mask != 0 {
            return Err(format!(
                "{s} has host bits set; did you mean {}/{prefix_len}?",
                Ipv4Addr::from(u32::from(ip) & mask)
            ));
        }
        Ok(Cidr {
            network: ip,
            prefix_len,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl Cidr {
    /// Usable host addresses, lowest first (network and broadcast excluded).
    pub fn hosts(&self) -> impl Iterator<Item = u32> {
        let base = u32::from(self.network);
        let size = 1u32 << (32 - u32::from(self.prefix_len));
        (base + 1)..(base + size - 1)
    }
}

/// A network as listed.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkRow {
    /// Name.
    pub name: String,
    /// Address range.
    pub cidr: String,
    /// IPv6 overlay prefix (a ULA); `None`: the network has no IPv6 overlay.
    pub cidr6: Option<String>,
    /// Live nodes.
    pub nodes: u64,
    /// Birthday attempts per node per 10 minutes the network allows; `None`: the nodes'
    /// default (see [`Store::set_birthday_budget`]).
    pub birthday_budget: Option<u16>,
    /// Whether joins by network id wait for the administrator.
    pub approval: Approval,
    /// Prefixes inside which advertised routes are approved automatically (`a.b.c.d/n`);
    /// empty: the administrator approves each.
    pub auto_approve_routes: Vec<String>,
}

/// A token as listed (never the secret).
#[derive(Debug, Clone, Serialize)]
pub struct TokenRow {
    /// Token id.
    pub id: String,
    /// Network it admits to.
    pub network: String,
    /// Whether it can be used by several nodes.
    pub reusable: bool,
    /// Expiry, RFC 3339 UTC, if any.
    pub expires_at: Option<String>,
    /// Revoked by the admin.
    pub revoked: bool,
    /// How many joins used it.
    pub uses: u64,
    /// The controller address (QUIC over UDP) the token embeds; `None` for tokens made before
    /// addresses were recorded.
    pub controller: Option<String>,
    /// The controller's TCP address the token embeds, if any.
    pub controller_tcp: Option<String>,
}

/// A join token to record; the caller generated `id` and `secret` (stored hashed).
#[derive(Debug, Clone, Copy, Default)]
pub struct NewToken<'a> {
    /// Token id (stored in clear).
    pub id: &'a str,
    /// Token secret.
    pub secret: &'a [u8],
    /// Whether several nodes may use it.
    pub reusable: bool,
    /// Unix seconds it expires at, if ever.
    pub expires_at: Option<u64>,
    /// The controller address it embeds (shown by `token list`).
    pub controller: Option<&'a str>,
    /// The controller TCP address it embeds, if any.
    pub controller_tcp: Option<&'a str>,
}

#[cfg(test)]
impl<'a> NewToken<'a> {
    /// A token that never expires, with no recorded addresses.
    pub(crate) fn for_test(id: &'a str, secret: &'a [u8], reusable: bool) -> NewToken<'a> {
        NewToken {
            id,
            secret,
            reusable,
            ..NewToken::default()
        }
    }
}

/// A standalone relay as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayRow {
    /// Region name.
    pub name: String,
    /// `host:port` nodes dial.
    pub addr: String,
    /// The relay's public key.
    pub key: PublicKey,
    /// `host:port` nodes dial over TCP, if the relay listens on TCP.
    pub tcp_addr: Option<String>,
}

/// A node as listed.
#[derive(Debug, Clone, Serialize)]
pub struct NodeRow {
    /// Name.
    pub name: String,
    /// Key.
    pub key: PublicKey,
    /// Overlay address.
    pub address: Ipv4Addr,
    /// IPv6 overlay address; `None` in a network without an IPv6 overlay.
    pub address6: Option<Ipv6Addr>,
    /// Endpoints: the observed address first, then the reported ones.
    pub endpoints: Vec<SocketAddr>,
    /// Last time heard from, RFC 3339 UTC.
    pub last_seen: Option<String>,
    /// Connected and heard from recently.
    pub online: bool,
    /// Who admitted it: `token <id>`, the administrator who approved its request, or
    /// `auto (network policy)`; `None` for nodes admitted before this was recorded.
    pub approved_by: Option<String>,
    /// When it was admitted, RFC 3339 UTC.
    pub approved_at: Option<String>,
}

/// What a node gets when admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Network id (internal).
    pub network_id: i64,
    /// Network name.
    pub network: String,
    /// Registered node name (may differ from the requested one when taken).
    pub name: String,
    /// Overlay address.
    pub address: Ipv4Addr,
    /// Prefix length of the network.
    pub prefix_len: u8,
    /// The network's overlay range.
    pub overlay: Cidr,
    /// IPv6 overlay address, in `prefix6`.
    pub address6: Option<Ipv6Addr>,
    /// The network's IPv6 overlay prefix; `None`: it has none.
    pub prefix6: Option<Ipv6Net>,
    /// Reported endpoints stored (refused ones left out; see `netmap::filter_reported`).
    pub endpoints: Vec<SocketAddr>,
    /// Reported endpoints refused.
    pub refused: usize,
}

/// Formats Unix seconds as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn hash_secret(secret: &[u8]) -> Vec<u8> {
    Sha256::digest(secret).to_vec()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The controller's database.
pub struct Store {
    conn: Conn,
}

impl Store {
    /// Opens (creating if needed) the database at `path`. Another process opening or switching
    /// the same file to WAL at the same moment can answer "busy" without waiting on the busy
    /// handler, so that is retried for a few seconds.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut attempts = 0;
        loop {
            match Store::open_once(path) {
                Err(StoreError::Db(e)) if e.is_busy() && attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    fn open_once(path: &Path) -> Result<Store, StoreError> {
        restrict_mode(path)?;
        let conn = rusqlite::Connection::open(path)?;
        // Another process may hold the write lock (a migration, a join): wait for it.
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let conn = Conn::sqlite(conn);
        migrate(&conn)?;
        // SQLite creates -wal and -shm with the database file's mode; older versions of this
        // controller left them readable by all.
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            fix_mode(Path::new(&side))?;
        }
        Ok(Store { conn })
    }

    /// Connects to the controller's PostgreSQL database at `url` (`postgres://user@host/db`)
    /// and brings its schema up to date. The connection comes back by itself after the
    /// database restarts: a call while it is away fails, and the next one connects again.
    pub fn connect(url: &str) -> Result<Store, StoreError> {
        let conn = Conn::postgres(url)?;
        pg_schema::migrate(&conn)?;
        Ok(Store { conn })
    }

    /// Copies the database to `dest` while other connections (a running `serve`) keep using
    /// it, with SQLite's online backup API: into a temporary file beside `dest` (mode 0600),
    /// which then replaces `dest`. The copy is a single file (no `-wal` beside it), ready to be
    /// put back as `controller.db`.
    pub fn backup_to(&self, dest: &Path) -> Result<BackupSummary, StoreError> {
        let file_name = dest
            .file_name()
            .ok_or_else(|| StoreError::Invalid(format!("{} is not a file name", dest.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = dest.with_file_name(tmp_name);
        let Some(conn) = self.conn.as_sqlite() else {
            return Err(StoreError::Invalid(
                "the database is PostgreSQL: back it up with PostgreSQL's own tools (pg_dump, or the base backups and WAL archive you already run)".into(),
            ));
        };
        let written = copy_into(conn, &tmp).and_then(|summary| {
            std::fs::rename(&tmp, dest).map_err(|e| {
                StoreError::Invalid(format!("cannot write {}: {e}", dest.display()))
            })?;
            Ok(summary)
        });
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// Rows changed by this connection since it opened.
    pub fn total_changes(&self) -> u64 {
        self.conn.total_changes()
    }

    /// A number that changes whenever another connection commits (see [`Conn::data_version`]).
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn.data_version()?)
    }

    /// Creates a network whose join requests wait for the administrator, with a random
    /// IPv6 overlay prefix.
    pub fn create_network(&self, name: &str, cidr: Cidr, now: u64) -> Result<(), StoreError> {
        self.create_network_with(name, cidr, Some(ipam6::random_ula()), Approval::Manual, now)
    }

    /// Creates a network with the given IPv6 overlay prefix (`None`: no IPv6 overlay) and
    /// approval policy for joins by network id.
    pub fn create_network_with(
        &self,
        name: &str,
        cidr: Cidr,
        cidr6: Option<Ipv6Net>,
        approval: Approval,
        now: u64,
    ) -> Result<(), StoreError> {
        if !mesh_proto::control::valid_name(name) {
            return Err(StoreError::Invalid(format!(
                "invalid network name {name:?}: use 1-63 letters, digits, '-', '_' or '.'"
            )));
        }
        if let Some(p) = cidr6.filter(|p| !mesh_proto::control::valid_prefix6(p)) {
            return Err(StoreError::Invalid(format!(
                "{p} cannot be an IPv6 overlay: use a unique local prefix (fc00::/7) of /{} to /{}",
                mesh_proto::control::MIN_PREFIX6_LEN,
                mesh_proto::control::MAX_PREFIX6_LEN
            )));
        }
        let r = self.conn.execute(
            "INSERT INTO networks (name, network, prefix_len, created_at, approval, prefix6)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                name,
                u32::from(cidr.network),
                cidr.prefix_len,
                now as i64,
                approval.as_str(),
                cidr6.map(|p| p.to_string()),
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.is_constraint() => Err(StoreError::Invalid(format!(
                "network {name:?} already exists"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists networks.
    pub fn networks(&self) -> Result<Vec<NetworkRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT n.name, n.network, n.prefix_len,
                    (SELECT COUNT(*) FROM nodes WHERE network_id = n.id AND removed_at IS NULL),
                    n.birthday_budget, n.approval, n.auto_approve_routes, n.prefix6
             FROM networks n ORDER BY n.name",
        )?;
        let rows = st.query_map(params![], |r| {
            let net: u32 = r.get(1)?;
            let len: u8 = r.get(2)?;
            Ok(NetworkRow {
                name: r.get(0)?,
                cidr: format!("{}/{len}", Ipv4Addr::from(net)),
                cidr6: r.get(7)?,
                nodes: r.get::<_, i64>(3)? as u64,
                birthday_budget: r.get(4)?,
                approval: Approval::from_column(&r.get::<_, String>(5)?),
                auto_approve_routes: routes::decode_auto(r.get::<_, Option<String>>(6)?.as_deref())
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets how many birthday attempts per 10 minutes each node of network `name` may run
    /// (started or joined; 0: none), or back to the nodes' default with `None`. Connected
    /// nodes are told within a poll of the hub.
    pub fn set_birthday_budget(&self, name: &str, budget: Option<u16>) -> Result<(), StoreError> {
        let max = mesh_proto::control::MAX_BIRTHDAY_BUDGET;
        if let Some(b) = budget.filter(|b| *b > max) {
            return Err(StoreError::Invalid(format!(
                "a birthday budget of {b} is more than the {max} attempts per 10 minutes a node runs at most"
            )));
        }
        let (id, _) = self.network(name)?;
        self.conn.execute(
            "UPDATE networks SET birthday_budget = ?1 WHERE id = ?2",
            params![budget, id],
        )?;
        Ok(())
    }

    /// The birthday budget of the network with this id (see [`Store::set_birthday_budget`]).
    pub fn birthday_budget(&self, network_id: i64) -> Result<Option<u16>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT birthday_budget FROM networks WHERE id = ?1",
                [network_id],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }

    fn network(&self, name: &str) -> Result<(i64, Cidr), StoreError> {
        network_by_name(&self.conn, name)
    }

    /// Records a token for `network`.
    pub fn create_token(
        &self,
        network: &str,
        token: &NewToken<'_>,
        now: u64,
    ) -> Result<(), StoreError> {
        let (network_id, _) = self.network(network)?;
        self.conn.execute(
            "INSERT INTO tokens (id, network_id, secret_hash, reusable, expires_at, created_at,
                 controller, controller_tcp)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                token.id,
                network_id,
                hash_secret(token.secret),
                token.reusable,
                token.expires_at.map(|e| e as i64),
                now as i64,
                token.controller,
                token.controller_tcp,
            ],
        )?;
        Ok(())
    }

    /// Lists tokens.
    pub fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT t.id, n.name, t.reusable, t.expires_at, t.revoked, t.uses, t.controller,
                    t.controller_tcp
             FROM tokens t JOIN networks n ON n.id = t.network_id ORDER BY t.created_at, t.id",
        )?;
        let rows = st.query_map(params![], |r| {
            Ok(TokenRow {
                id: r.get(0)?,
                network: r.get(1)?,
                reusable: r.get(2)?,
                expires_at: r.get::<_, Option<i64>>(3)?.map(|e| rfc3339(e as u64)),
                revoked: r.get(4)?,
                uses: r.get::<_, i64>(5)? as u64,
                controller: r.get(6)?,
                controller_tcp: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes a token.
    pub fn revoke_token(&self, id: &str) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::Invalid(format!(
                "no token with id {id:?} (see `mesh-controller token list`)"
            )));
        }
        Ok(())
    }

    /// Admits a node that presents a join token. Same key, same address, every time. A node
    /// admitted anew records `token <id>` as who approved it; one that joins again keeps what
    /// it had. A join request the key had waiting in the network is settled by the token.
    pub fn join(
        &mut self,
        token_id: &str,
        secret: &[u8],
        key: &PublicKey,
        name: NameRequest<'_>,
        seen: Candidates<'_>,
        now: u64,
    ) -> Result<Admission, StoreError> {
        let tx = self.conn.transaction()?;
        type TokenInfo = (i64, Vec<u8>, bool, Option<i64>, bool, i64);
        let token: Option<TokenInfo> = tx
            .query_row(
                "SELECT network_id, secret_hash, reusable, expires_at, revoked, uses
                 FROM tokens WHERE id = ?1",
                [token_id],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .optional()?;
        let invalid = || {
            refused(
                ErrorCode::TokenInvalid,
                "join token not accepted by the controller (unknown id or wrong secret); ask the controller admin for a new one (`mesh-controller token create`)",
            )
        };
        let Some((network_id, hash, reusable, expires_at, revoked, uses)) = token else {
            return Err(invalid());
        };
        if !ct_eq(&hash, &hash_secret(secret)) {
            return Err(invalid());
        }
        if revoked {
            return Err(refused(
                ErrorCode::TokenRevoked,
                format!("join token {token_id} was revoked; ask the controller admin for a new one (`mesh-controller token create`)"),
            ));
        }
        if let Some(exp) = expires_at {
            if (exp as u64) <= now {
                return Err(refused(
                    ErrorCode::TokenExpired,
                    format!("join token {token_id} expired at {}; ask the controller admin for a new one (`mesh-controller token create`)", rfc3339(exp as u64)),
                ));
            }
        }
        let known_live: bool = tx
            .query_row(
                "SELECT 1 FROM nodes WHERE network_id = ?1 AND key = ?2 AND removed_at IS NULL",
                params![network_id, key.to_string()],
                |_| Ok(true),
            )
            .optional()?
            .unwrap_or(false);
        if !reusable && uses > 0 && !known_live {
            return Err(refused(
                ErrorCode::TokenUsed,
                format!("join token {token_id} was for one node and is used up; ask the controller admin for a new one, or a reusable one (`mesh-controller token create --reusable`)"),
            ));
        }
        let admission = admit(&tx, network_id, key, name, seen, now)?;
        if !known_live {
            record_approval(&tx, network_id, key, &format!("token {token_id}"), now)?;
        }
        approval::forget_request(&tx, network_id, key)?;
        tx.execute(
            "UPDATE tokens SET uses = uses + 1 WHERE id = ?1",
            [token_id],
        )?;
        tx.commit()?;
        Ok(admission)
    }

    /// Admits a node that joined before, by key.
    pub fn hello(
        &mut self,
        network: &str,
        key: &PublicKey,
        seen: Candidates<'_>,
        now: u64,
    ) -> Result<Admission, StoreError> {
        let tx = self.conn.transaction()?;
        let Some(admission) = welcome_back(&tx, network, key, seen, now)? else {
            return Err(refused(
                ErrorCode::NodeUnknown,
                format!("this node is not (or no longer) a member of network {network:?}; join again with a new token (`mesh join --token-file FILE`)"),
            ));
        };
        tx.commit()?;
        Ok(admission)
    }

    /// Records that a node is alive, with what it reports now. One statement; the caller
    /// writes only when something changed or `last_seen` is due (see `server`).
    pub fn heartbeat(
        &self,
        network_id: i64,
        key: &PublicKey,
        report: &NodeReport,
        now: u64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE nodes SET endpoints = ?1, last_seen = ?2, connected = 1, observed = ?5,
                 home_relay = ?6, nat = ?7
             WHERE network_id = ?3 AND key = ?4 AND removed_at IS NULL",
            params![
                endpoints_json(&report.endpoints),
                now as i64,
                network_id,
                key.to_string(),
                report.observed.map(|o| o.to_string()),
                report.home_relay,
                report.nat.map(nat_text),
            ],
        )?;
        Ok(())
    }

    /// Records at `now` that the nodes of `sessions` (network, key, session) are still
    /// connected, in one transaction: the periodic `last_seen` of every connected node, written
    /// together instead of one commit per node (each of which every replica's hub took for a
    /// change of the network). A session that ended meanwhile changes nothing: its end
    /// cleared the node's session.
    pub fn still_connected(
        &self,
        sessions: &[(i64, PublicKey, String)],
        now: u64,
    ) -> Result<(), StoreError> {
        if sessions.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for (network_id, key, session) in sessions {
            tx.execute(
                "UPDATE nodes SET last_seen = ?1, connected = 1
                 WHERE network_id = ?2 AND key = ?3 AND removed_at IS NULL AND session = ?4",
                params![now as i64, network_id, key.to_string(), session],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Nodes of a network removed (or gone by `leave`) at or after `since`, newest first, at
    /// most `limit`: key and removal time.
    pub fn removed_since(
        &self,
        network_id: i64,
        since: u64,
        limit: usize,
    ) -> Result<Vec<(PublicKey, u64)>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT key, removed_at FROM nodes
             WHERE network_id = ?1 AND removed_at IS NOT NULL AND removed_at >= ?2
             ORDER BY removed_at DESC, key LIMIT ?3",
        )?;
        let rows = st.query_map(params![network_id, since as i64, limit as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, at) = row?;
            let Ok(key) = key.parse() else { continue };
            out.push((key, at as u64));
        }
        Ok(out)
    }

    /// Records that a node's control connection, that of `session`, ended; nothing when the
    /// node has connected again since (to this controller or another).
    pub fn disconnected(
        &self,
        network_id: i64,
        key: &PublicKey,
        session: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE nodes SET connected = 0, last_seen = ?1, session = NULL
             WHERE network_id = ?2 AND key = ?3 AND removed_at IS NULL
                 AND (session IS NULL OR session = ?4)",
            params![now as i64, network_id, key.to_string(), session],
        )?;
        Ok(())
    }

    /// Removes a node by name or key; its address stays reserved for its key and name. A join
    /// request the key may still have in the network goes too: if it asks again, that is a new
    /// request. Its routes go (if it joins again, it advertises afresh).
    pub fn remove_node(&self, network: &str, who: &str, now: u64) -> Result<String, StoreError> {
        let (network_id, _) = self.network(network)?;
        let found: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT name, key FROM nodes WHERE network_id = ?1 AND removed_at IS NULL AND (name = ?2 OR key = ?2)",
                params![network_id, who],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((name, key)) = found else {
            return Err(StoreError::Invalid(format!(
                "no node {who:?} in network {network:?} (see `mesh-controller node list {network}`)"
            )));
        };
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE nodes SET removed_at = ?1, connected = 0 WHERE network_id = ?2 AND removed_at IS NULL AND name = ?3",
            params![now as i64, network_id, name],
        )?;
        tx.execute(
            "DELETE FROM join_requests WHERE network_id = ?1 AND key = ?2",
            params![network_id, key],
        )?;
        routes::forget_routes(&tx, network_id, &key, now)?;
        tx.commit()?;
        Ok(name)
    }

    /// Removes a node by key (the node asked to leave), with its routes.
    pub fn leave(&self, network_id: i64, key: &PublicKey, now: u64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE nodes SET removed_at = ?1, connected = 0 WHERE network_id = ?2 AND key = ?3",
            params![now as i64, network_id, key.to_string()],
        )?;
        routes::forget_routes(&tx, network_id, &key.to_string(), now)?;
        tx.commit()?;
        Ok(())
    }

    /// Lists the live nodes of a network.
    pub fn nodes(&self, network: &str, now: u64) -> Result<Vec<NodeRow>, StoreError> {
        let (network_id, _) = self.network(network)?;
        let mut st = self.conn.prepare(
            "SELECT name, key, address, endpoints, last_seen, connected, observed, approved_by,
                    approved_at, address6
             FROM nodes WHERE network_id = ?1 AND removed_at IS NULL ORDER BY address",
        )?;
        let rows = st.query_map([network_id], |r| {
            let key: String = r.get(1)?;
            let endpoints: String = r.get(3)?;
            let last_seen: Option<i64> = r.get(4)?;
            let connected: bool = r.get(5)?;
            Ok((
                r.get::<_, String>(0)?,
                key,
                r.get::<_, u32>(2)?,
                endpoints,
                last_seen,
                connected,
                r.get::<_, Option<String>>(6)?,
                (r.get::<_, Option<String>>(7)?, r.get::<_, Option<i64>>(8)?),
                r.get::<_, Option<String>>(9)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, key, address, endpoints, last_seen, connected, observed, approval, address6) =
                row?;
            let (approved_by, approved_at) = approval;
            let Ok(key) = key.parse() else { continue };
            let mut all: Vec<SocketAddr> =
                observed.and_then(|o| o.parse().ok()).into_iter().collect();
            for e in serde_json::from_str::<Vec<SocketAddr>>(&endpoints).unwrap_or_default() {
                if !all.contains(&e) {
                    all.push(e);
                }
            }
            out.push(NodeRow {
                name,
                key,
                address: Ipv4Addr::from(address),
                address6: address6.and_then(|a| a.parse().ok()),
                endpoints: all,
                last_seen: last_seen.map(|t| rfc3339(t as u64)),
                online: connected
                    && last_seen
                        .is_some_and(|t| now.saturating_sub(t as u64) <= ONLINE_WINDOW_SECS),
                approved_by,
                approved_at: approved_at.map(|t| rfc3339(t as u64)),
            });
        }
        Ok(out)
    }

    /// The peer list of a network: every live node, with `endpoints` as the node reported them
    /// and `observed` apart (`netmap::view_for` decides what each viewer gets), and its approved
    /// routes, sorted.
    pub fn peers(&self, network_id: i64) -> Result<Vec<PeerInfo>, StoreError> {
        let mut approved = routes::approved_by_key(&self.conn, network_id)?;
        let mut st = self.conn.prepare(
            "SELECT n.key, n.name, n.address, n.endpoints, r.name, n.observed, n.nat, n.address6
             FROM nodes n
             LEFT JOIN relays r ON r.name = n.home_relay
             WHERE n.network_id = ?1 AND n.removed_at IS NULL ORDER BY n.address",
        )?;
        let rows = st.query_map([network_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<String>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, name, address, endpoints, relay, observed, nat, address6) = row?;
            let routes::Approved { routes, exits } = approved.remove(&key).unwrap_or_default();
            let Ok(key) = key.parse() else { continue };
            out.push(PeerInfo {
                key,
                name,
                address: Ipv4Addr::from(address),
                address6: address6.and_then(|a| a.parse().ok()),
                endpoints: serde_json::from_str(&endpoints).unwrap_or_default(),
                relay,
                observed: observed.and_then(|o| o.parse().ok()),
                nat: nat.as_deref().and_then(nat_from_text),
                routes,
                exits,
            });
        }
        Ok(out)
    }

    /// Records the standalone relay a node uses as its home (`None`: the controller's).
    pub fn set_home_relay(
        &self,
        network_id: i64,
        key: &PublicKey,
        home: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE nodes SET home_relay = ?1
             WHERE network_id = ?2 AND key = ?3 AND home_relay IS DISTINCT FROM ?1",
            params![home, network_id, key.to_string()],
        )?;
        Ok(())
    }

    /// Adds or replaces a standalone relay.
    pub fn add_relay(
        &self,
        name: &str,
        addr: &str,
        tcp_addr: Option<&str>,
        key: &PublicKey,
        now: u64,
    ) -> Result<(), StoreError> {
        if !mesh_proto::control::valid_name(name) {
            return Err(StoreError::Invalid(format!(
                "invalid relay name {name:?}: use 1-63 letters, digits, '-', '_' or '.'"
            )));
        }
        let valid = |a: &str| {
            !a.is_empty()
                && a.len() <= mesh_proto::control::MAX_RELAY_ADDR
                && a.rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_some()
        };
        if !valid(addr) {
            return Err(StoreError::Invalid(format!(
                "invalid relay address {addr:?}: use host:port, e.g. relay-eu.example.net:7444"
            )));
        }
        if let Some(tcp) = tcp_addr.filter(|a| !valid(a)) {
            return Err(StoreError::Invalid(format!(
                "invalid relay TCP address {tcp:?}: use host:port, e.g. relay-eu.example.net:443"
            )));
        }
        let count: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM relays WHERE name != ?1",
            [name],
            |r| r.get(0),
        )?;
        if count as usize >= mesh_proto::control::MAX_RELAYS {
            return Err(StoreError::Invalid(format!(
                "at most {} relays are supported",
                mesh_proto::control::MAX_RELAYS
            )));
        }
        self.conn.execute(
            "INSERT INTO relays (name, addr, key, created_at, tcp_addr) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name) DO UPDATE SET addr = ?2, key = ?3, tcp_addr = ?5",
            params![name, addr, key.to_string(), now as i64, tcp_addr],
        )?;
        Ok(())
    }

    /// Every standalone relay, by name.
    pub fn relays(&self) -> Result<Vec<RelayRow>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT name, addr, key, tcp_addr FROM relays ORDER BY name")?;
        let rows = st.query_map(params![], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, addr, key, tcp_addr) = row?;
            let Ok(key) = key.parse() else { continue };
            out.push(RelayRow {
                name,
                addr,
                key,
                tcp_addr,
            });
        }
        Ok(out)
    }

    /// Removes a standalone relay; nodes stop using it at the next push.
    pub fn remove_relay(&self, name: &str) -> Result<(), StoreError> {
        if self
            .conn
            .execute("DELETE FROM relays WHERE name = ?1", [name])?
            == 0
        {
            return Err(StoreError::Invalid(format!("no relay named {name:?}")));
        }
        Ok(())
    }

    /// Whether a key is a live member of a network.
    pub fn is_member(&self, network_id: i64, key: &PublicKey) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM nodes WHERE network_id = ?1 AND key = ?2 AND removed_at IS NULL",
                params![network_id, key.to_string()],
                |_| Ok(true),
            )
            .optional()?
            .unwrap_or(false))
    }

    /// Counts of nodes and online nodes over all networks.
    pub fn counts(&self, now: u64) -> Result<(u64, u64), StoreError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(connected = 1 AND last_seen >= ?1), 0) FROM nodes WHERE removed_at IS NULL",
            [now.saturating_sub(ONLINE_WINDOW_SECS) as i64],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }
}

/// What [`Store::backup_to`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSummary {
    /// Size of the copy.
    pub bytes: u64,
    /// Networks in it.
    pub networks: u64,
    /// Live nodes in it.
    pub nodes: u64,
}

/// The backup proper: `from` into a new file at `path`, which is left complete and synced.
fn copy_into(from: &rusqlite::Connection, path: &Path) -> Result<BackupSummary, StoreError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::Invalid(format!("cannot create {}: {e}", path.display())))?;
    let mut to = rusqlite::Connection::open(path)?;
    {
        let backup = rusqlite::backup::Backup::new(from, &mut to)?;
        // All pages in one step, under one read transaction: in WAL mode it does not hold up
        // `serve`'s writes, and a copy made in steps would restart at each of them.
        let mut waits = 0;
        loop {
            match backup.step(-1)? {
                rusqlite::backup::StepResult::Done => break,
                rusqlite::backup::StepResult::More => {}
                _ if waits < 100 => {
                    waits += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    return Err(StoreError::Invalid(
                        "the database stayed busy for 10 s; try the backup again".into(),
                    ))
                }
            }
        }
    }
    // A self-contained file: the copy took the source's WAL mode.
    to.pragma_update(None, "journal_mode", "DELETE")?;
    let (networks, nodes) = to.query_row(
        "SELECT (SELECT COUNT(*) FROM networks),
                (SELECT COUNT(*) FROM nodes WHERE removed_at IS NULL)",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )?;
    to.close().map_err(|(_, e)| e)?;
    let file = std::fs::File::open(path)
        .map_err(|e| StoreError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let synced = file.sync_all().and_then(|()| file.metadata());
    let bytes = synced
        .map_err(|e| StoreError::Invalid(format!("cannot sync {}: {e}", path.display())))?
        .len();
    Ok(BackupSummary {
        bytes,
        networks,
        nodes,
    })
}

/// The schema this version of the controller writes, kept in SQLite's `user_version`. Raise it
/// with every change to the schema, and add the change to [`migrate`].
const SCHEMA_VERSION: i64 = 7;

/// Brings the schema up to [`SCHEMA_VERSION`] in one `BEGIN IMMEDIATE` transaction: the version
/// is read under the write lock, so of several processes opening one database at once (`serve`
/// and an admin command) exactly one migrates and the others wait, then find nothing to do.
fn migrate(conn: &Conn) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", params![], |r| r.get(0))?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction()?;
    let version: i64 = tx.query_row("PRAGMA user_version", params![], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Invalid(format!(
            "the database has schema version {version}, written by a newer mesh-controller (this one knows {SCHEMA_VERSION}); run the newer version, or restore a backup taken before the upgrade"
        )));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    // Version 0 is every database before versions were kept: whatever subset of the columns
    // below it has, each step adds what is missing.
    if version < 1 {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS networks (
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                network INTEGER NOT NULL,
                prefix_len INTEGER NOT NULL,
                created_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS tokens (
                id TEXT PRIMARY KEY,
                network_id INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
                secret_hash BLOB NOT NULL,
                reusable INTEGER NOT NULL,
                expires_at INTEGER,
                revoked INTEGER NOT NULL DEFAULT 0,
                uses INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS nodes (
                id INTEGER PRIMARY KEY,
                network_id INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
                key TEXT NOT NULL,
                name TEXT NOT NULL,
                address INTEGER NOT NULL,
                endpoints TEXT NOT NULL DEFAULT '[]',
                last_seen INTEGER,
                connected INTEGER NOT NULL DEFAULT 0,
                removed_at INTEGER,
                created_at INTEGER NOT NULL,
                UNIQUE (network_id, key),
                UNIQUE (network_id, address)
            );
            CREATE TABLE IF NOT EXISTS relays (
                name TEXT PRIMARY KEY,
                addr TEXT NOT NULL,
                key TEXT NOT NULL,
                created_at INTEGER NOT NULL
            );",
        )?;
        // The standalone relay a node keeps as its home.
        add_column(&tx, "nodes", "home_relay", "TEXT")?;
        // The address the controller saw the node's control connection come from, apart from
        // what the node reported. Older databases kept it as the first endpoint.
        if add_column(&tx, "nodes", "observed", "TEXT")? {
            tx.execute_batch(
                "UPDATE nodes SET observed = json_extract(endpoints, '$[0]'),
                     endpoints = COALESCE((SELECT json_group_array(value) FROM json_each(nodes.endpoints) WHERE key > 0), '[]')
                     WHERE json_valid(endpoints) AND json_array_length(endpoints) > 0;",
            )?;
        }
        // What the node found out about its own NAT.
        add_column(&tx, "nodes", "nat", "TEXT")?;
        // The network's birthday budget (NULL: the nodes' default).
        add_column(&tx, "networks", "birthday_budget", "INTEGER")?;
        // Where a relay listens on TCP (NULL: it does not say).
        add_column(&tx, "relays", "tcp_addr", "TEXT")?;
    }
    if version < 2 {
        // The controller addresses a token embeds, for `token list` (NULL: an older token).
        add_column(&tx, "tokens", "controller", "TEXT")?;
        add_column(&tx, "tokens", "controller_tcp", "TEXT")?;
    }
    if version < 3 {
        // Joins by network id: whether the administrator approves each one, who admitted
        // each node, and the requests that wait (see `approval`).
        add_column(
            &tx,
            "networks",
            "approval",
            "TEXT NOT NULL DEFAULT 'manual'",
        )?;
        add_column(&tx, "nodes", "approved_by", "TEXT")?;
        add_column(&tx, "nodes", "approved_at", "INTEGER")?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS join_requests (
                id INTEGER PRIMARY KEY,
                network_id INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
                key TEXT NOT NULL,
                name TEXT NOT NULL,
                exact_name INTEGER NOT NULL DEFAULT 0,
                hostname TEXT NOT NULL DEFAULT '',
                source TEXT,
                endpoints TEXT NOT NULL DEFAULT '[]',
                observed TEXT,
                first_seen INTEGER NOT NULL,
                last_seen INTEGER NOT NULL,
                state TEXT NOT NULL DEFAULT 'pending',
                decided_at INTEGER,
                decided_by TEXT,
                UNIQUE (network_id, key)
            );
            -- The caps (per network, per network and source) and the pruning.
            CREATE INDEX IF NOT EXISTS join_requests_by_network
                ON join_requests (network_id, state, first_seen);
            CREATE INDEX IF NOT EXISTS join_requests_by_source
                ON join_requests (network_id, source, state, first_seen);
            CREATE INDEX IF NOT EXISTS join_requests_by_age
                ON join_requests (state, first_seen);
            CREATE INDEX IF NOT EXISTS join_requests_by_decision
                ON join_requests (state, decided_at);",
        )?;
    }
    if version < 4 {
        // Subnet routes: what nodes advertise, and each network's auto-approve prefixes.
        routes::migrate(&tx)?;
    }
    if version < 5 {
        // Names for several nodes (`mesh-controller name set`).
        names::migrate(&tx)?;
        routes::migrate_exits(&tx)?;
    }
    if version < 6 {
        // The IPv6 overlay: a ULA prefix per network, an address per node.
        ipam6::migrate(&tx)?;
    }
    if version < 7 {
        // Several controllers on one database: their shared identity, who is up, and which
        // session owns each node's connection.
        replicas::migrate(&tx)?;
    }
    tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    tx.commit()?;
    Ok(())
}

/// Adds `column` to `table` unless it is there; whether it was added.
fn add_column(tx: &Conn, table: &str, column: &str, decl: &str) -> Result<bool, StoreError> {
    let has: bool = tx
        .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
        .exists(params![table, column])?;
    if !has {
        tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(!has)
}

/// The name a joining node asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRequest<'a> {
    /// A default (the node's hostname): when another live node holds it, the node is
    /// registered as `name-2`, `name-3`... and learns its name from the welcome.
    Preferred(&'a str),
    /// Chosen by the user (`mesh join --name`): when another live node holds it, the join is
    /// refused with [`ErrorCode::NameTaken`], naming the holder.
    Exact(&'a str),
}

impl<'a> NameRequest<'a> {
    /// The name asked for.
    pub fn name(self) -> &'a str {
        match self {
            NameRequest::Preferred(n) | NameRequest::Exact(n) => n,
        }
    }
}

/// Where a node says it can be reached, and where its connection comes from (join, hello).
#[derive(Debug, Clone, Copy, Default)]
pub struct Candidates<'a> {
    /// Endpoints the node reported (filtered before they are stored).
    pub reported: &'a [SocketAddr],
    /// The address its connection comes from.
    pub observed: Option<SocketAddr>,
}

/// What a node reports about itself (with the address its connection comes from).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReport {
    /// Reported endpoint candidates (already filtered).
    pub endpoints: Vec<SocketAddr>,
    /// The address the controller sees the node's connection come from.
    pub observed: Option<SocketAddr>,
    /// The node's home relay (`None`: the controller's).
    pub home_relay: Option<String>,
    /// The node's NAT kind as it found it (`None`: not known yet, or an older agent).
    pub nat: Option<NatKind>,
}

/// How a NAT kind is stored.
fn nat_text(kind: NatKind) -> &'static str {
    match kind {
        NatKind::Public => "public",
        NatKind::EndpointIndependent => "endpoint_independent",
        NatKind::EndpointDependent => "endpoint_dependent",
    }
}

fn nat_from_text(s: &str) -> Option<NatKind> {
    [
        NatKind::Public,
        NatKind::EndpointIndependent,
        NatKind::EndpointDependent,
    ]
    .into_iter()
    .find(|k| nat_text(*k) == s)
}

fn endpoints_json(endpoints: &[SocketAddr]) -> String {
    serde_json::to_string(endpoints).unwrap_or_else(|_| "[]".into())
}

/// Creates the database file with mode 0600 if it does not exist, and tightens an existing
/// one that group or others could read.
fn restrict_mode(path: &Path) -> Result<(), StoreError> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => fix_mode(path),
        Err(e) => Err(StoreError::Invalid(format!(
            "cannot create database {}: {e}",
            path.display()
        ))),
    }
}

/// Sets mode 0600 on `path` if it exists and group or others have any access.
fn fix_mode(path: &Path) -> Result<(), StoreError> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        StoreError::Invalid(format!(
            "{} is readable by other users (mode {mode:o}) and its mode cannot be changed: {e}; run `chmod 600` on it",
            path.display()
        ))
    })?;
    tracing::warn!(
        path = %path.display(),
        old_mode = format!("{mode:o}"),
        "database file was readable by other users; changed its mode to 600"
    );
    Ok(())
}

/// The id and range of the network called `name`, or an error that says how to list them.
fn network_by_name(conn: &Conn, name: &str) -> Result<(i64, Cidr), StoreError> {
    conn.query_row(
        "SELECT id, network, prefix_len FROM networks WHERE name = ?1",
        [name],
        |r| {
            Ok((
                r.get(0)?,
                Cidr {
                    network: Ipv4Addr::from(r.get::<_, u32>(1)?),
                    prefix_len: r.get(2)?,
                },
            ))
        },
    )
    .optional()?
    .ok_or_else(|| {
        StoreError::Invalid(format!(
            "no network named {name:?} (see `mesh-controller network list`)"
        ))
    })
}

/// A live member of `network` connects again: its endpoints, observed address and liveness
/// are brought up to date inside the open transaction. `None` when the key is no live member.
fn welcome_back(
    tx: &Conn,
    network: &str,
    key: &PublicKey,
    seen: Candidates<'_>,
    now: u64,
) -> Result<Option<Admission>, StoreError> {
    let row: Option<(i64, String, u32, u8, u32)> = tx
        .query_row(
            "SELECT n.network_id, n.name, n.address, w.prefix_len, w.network
             FROM nodes n JOIN networks w ON w.id = n.network_id
             WHERE w.name = ?1 AND n.key = ?2 AND n.removed_at IS NULL",
            params![network, key.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let Some((network_id, name, address, prefix_len, net)) = row else {
        return Ok(None);
    };
    let overlay = Cidr {
        network: Ipv4Addr::from(net),
        prefix_len,
    };
    let observed = seen
        .observed
        .and_then(|o| crate::netmap::usable_observed(o, (overlay.network, overlay.prefix_len)));
    let (mut endpoints, mut refused) = crate::netmap::filter_reported(
        seen.reported,
        observed,
        (overlay.network, overlay.prefix_len),
    );
    let prefix6 = ipam6::prefix_of(tx, network_id)?;
    refused += ipam6::refuse_overlay6(prefix6, &mut endpoints);
    let address6 = ipam6::ensure(tx, network_id, network, &key.to_string())?;
    tx.execute(
        "UPDATE nodes SET endpoints = ?1, last_seen = ?2, connected = 1, observed = ?5
         WHERE network_id = ?3 AND key = ?4",
        params![
            endpoints_json(&endpoints),
            now as i64,
            network_id,
            key.to_string(),
            observed.map(|o| o.to_string()),
        ],
    )?;
    Ok(Some(Admission {
        network_id,
        network: network.to_owned(),
        name,
        address: Ipv4Addr::from(address),
        prefix_len,
        overlay,
        address6,
        prefix6,
        endpoints,
        refused,
    }))
}

/// Records who admitted the node with this key, and when.
fn record_approval(
    tx: &Conn,
    network_id: i64,
    key: &PublicKey,
    by: &str,
    now: u64,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE nodes SET approved_by = ?1, approved_at = ?2 WHERE network_id = ?3 AND key = ?4",
        params![by, now as i64, network_id, key.to_string()],
    )?;
    Ok(())
}

/// Finds or allocates the node's address inside the open transaction.
fn admit(
    tx: &Conn,
    network_id: i64,
    key: &PublicKey,
    request: NameRequest<'_>,
    seen: Candidates<'_>,
    now: u64,
) -> Result<Admission, StoreError> {
    let requested_name = request.name();
    let (network_name, net, prefix_len): (String, u32, u8) = tx.query_row(
        "SELECT name, network, prefix_len FROM networks WHERE id = ?1",
        [network_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let cidr = Cidr {
        network: Ipv4Addr::from(net),
        prefix_len,
    };
    let key_s = key.to_string();
    let overlay = (cidr.network, cidr.prefix_len);
    let observed = seen
        .observed
        .and_then(|o| crate::netmap::usable_observed(o, overlay));
    let (mut endpoints, mut refused_endpoints) =
        crate::netmap::filter_reported(seen.reported, observed, overlay);
    let prefix6 = ipam6::prefix_of(tx, network_id)?;
    refused_endpoints += ipam6::refuse_overlay6(prefix6, &mut endpoints);
    let eps = endpoints_json(&endpoints);
    let observed = observed.map(|o| o.to_string());

    // 1. This key was here before (live or removed): same address.
    let mine: Option<(u32, String, bool)> = tx
        .query_row(
            "SELECT address, name, removed_at IS NULL FROM nodes WHERE network_id = ?1 AND key = ?2",
            params![network_id, key_s],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some((address, old_name, live)) = mine {
        let name = if live {
            old_name
        } else {
            free_name(tx, network_id, request, Some(&key_s))?
        };
        tx.execute(
            "UPDATE nodes SET removed_at = NULL, name = ?1, endpoints = ?2, last_seen = ?3, connected = 1,
                 observed = ?6
             WHERE network_id = ?4 AND key = ?5",
            params![name, eps, now as i64, network_id, key_s, observed],
        )?;
        let address6 = ipam6::ensure(tx, network_id, &network_name, &key_s)?;
        return Ok(Admission {
            network_id,
            network: network_name,
            name,
            address: Ipv4Addr::from(address),
            prefix_len,
            overlay: cidr,
            address6,
            prefix6,
            endpoints,
            refused: refused_endpoints,
        });
    }

    // 2. A removed node had this name (a reinstalled machine): take its addresses back.
    let tomb: Option<(i64, u32, Option<String>)> = tx
        .query_row(
            "SELECT id, address, address6 FROM nodes
             WHERE network_id = ?1 AND name = ?2 AND removed_at IS NOT NULL
             ORDER BY removed_at DESC LIMIT 1",
            params![network_id, requested_name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let name = free_name(tx, network_id, request, None)?;
    let mut address6 = None;
    let address = if let Some((id, address, old6)) = tomb.filter(|_| name == requested_name) {
        tx.execute("DELETE FROM nodes WHERE id = ?1", [id])?;
        address6 = ipam6::stored(old6, prefix6);
        address
    } else {
        // 3. The lowest address no node, live or removed, holds.
        let used: HashSet<u32> = {
            let mut st = tx.prepare("SELECT address FROM nodes WHERE network_id = ?1")?;
            let rows = st.query_map([network_id], |r| r.get::<_, u32>(0))?;
            rows.collect::<Result<_, _>>()?
        };
        match cidr.hosts().find(|a| !used.contains(a)) {
            Some(a) => a,
            None => {
                // 4. Full: reuse the address of the node removed longest ago.
                let oldest: Option<(i64, u32)> = tx
                    .query_row(
                        "SELECT id, address FROM nodes WHERE network_id = ?1 AND removed_at IS NOT NULL
                         ORDER BY removed_at ASC LIMIT 1",
                        [network_id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((id, address)) = oldest else {
                    return Err(refused(
                        ErrorCode::NetworkFull,
                        format!("network {network_name:?} ({cidr}) has no free address left; remove nodes or create a network with a larger range"),
                    ));
                };
                tx.execute("DELETE FROM nodes WHERE id = ?1", [id])?;
                address
            }
        }
    };
    if let (None, Some(prefix)) = (address6, prefix6) {
        address6 = Some(ipam6::allocate(
            tx,
            network_id,
            &network_name,
            &prefix,
            key,
        )?);
    }
    tx.execute(
        "INSERT INTO nodes (network_id, key, name, address, endpoints, last_seen, connected, created_at,
             observed, address6)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?6, ?7, ?8)",
        params![
            network_id,
            key_s,
            name,
            address,
            eps,
            now as i64,
            observed,
            address6.map(|a| a.to_string())
        ],
    )?;
    Ok(Admission {
        network_id,
        network: network_name,
        name,
        address: Ipv4Addr::from(address),
        prefix_len,
        overlay: cidr,
        address6,
        prefix6,
        endpoints,
        refused: refused_endpoints,
    })
}

/// The requested name, or for a [`NameRequest::Preferred`] one `name-2`, `name-3`... if a live
/// node of another key holds it.
fn free_name(
    tx: &Conn,
    network_id: i64,
    request: NameRequest<'_>,
    own_key: Option<&str>,
) -> Result<String, StoreError> {
    let requested = request.name();
    if !mesh_proto::control::valid_node_name(requested) {
        return Err(refused(
            ErrorCode::BadRequest,
            format!(
                "{requested:?} is not a valid node name: Kubernetes takes lowercase letters, digits, '-' and '.' (each part starting and ending with a letter or digit), and mesh at most {} characters; join again with --name (e.g. --name {})",
                mesh_proto::control::MAX_NAME_LEN,
                mesh_proto::control::node_name_like(requested)
            ),
        ));
    }
    if names::is_alias(tx, network_id, requested)? {
        if let NameRequest::Exact(name) = request {
            return Err(refused(
                ErrorCode::NameTaken,
                format!(
                    "{name:?} is a name for several nodes in this network (`mesh-controller name list`); choose another --name"
                ),
            ));
        }
    }
    // The live node of another key that holds `name` (or a name for several nodes): its key
    // and address.
    let holder = |name: &str| {
        if names::is_alias(tx, network_id, name)? {
            return Ok(Some((String::new(), 0)));
        }
        tx.query_row(
            "SELECT key, address FROM nodes WHERE network_id = ?1 AND name = ?2 AND removed_at IS NULL AND key != ?3",
            params![network_id, name, own_key.unwrap_or("")],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)),
        )
        .optional()
        .map_err(StoreError::from)
    };
    if let NameRequest::Exact(name) = request {
        let Some((mut key, address)) = holder(name)? else {
            return Ok(name.to_owned());
        };
        let network: String = tx.query_row(
            "SELECT name FROM networks WHERE id = ?1",
            [network_id],
            |r| r.get(0),
        )?;
        key.truncate(8);
        return Err(refused(
            ErrorCode::NameTaken,
            format!(
                "the name {name:?} is taken by node {} (key {key}…) in network {network:?}; remove it with `mesh-controller node remove {network} {name}` or choose another --name",
                Ipv4Addr::from(address)
            ),
        ));
    }
    for n in 1..1000u32 {
        let candidate = if n == 1 {
            requested.to_owned()
        } else {
            let suffix = format!("-{n}");
            let mut base = requested.to_owned();
            base.truncate(mesh_proto::control::MAX_NAME_LEN - suffix.len());
            base + &suffix
        };
        if holder(&candidate)?.is_none() {
            return Ok(candidate);
        }
    }
    Err(refused(
        ErrorCode::NameTaken,
        format!("name {requested:?} is taken; pass another with --name"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const T0: u64 = 1_800_000_000;

    pub(super) fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    /// A store with network `prod` (100.64.0.0/29, manual approval) and reusable token `tok1`.
    /// On PostgreSQL when the tests run with `MESH_TEST_DATABASE=postgres` (a database of its
    /// own in the test process's server), else on SQLite.
    pub(super) fn store() -> (tempdir::Dir, Store) {
        with_prod(tempdir::Dir::new())
    }

    /// The same on SQLite whatever the tests run on (its migrations, its backups).
    pub(super) fn sqlite_store() -> (tempdir::Dir, Store) {
        with_prod(tempdir::Dir::sqlite())
    }

    fn with_prod(dir: tempdir::Dir) -> (tempdir::Dir, Store) {
        let s = dir.open();
        s.create_network("prod", "100.64.0.0/29".parse().unwrap(), T0)
            .unwrap();
        s.create_token("prod", &NewToken::for_test("tok1", b"secret", true), T0)
            .unwrap();
        (dir, s)
    }

    pub(super) mod tempdir {
        use super::Store;

        /// A temporary directory, and the database a test's store lives in.
        pub struct Dir(pub std::path::PathBuf, Option<String>);
        impl Dir {
            pub fn new() -> Dir {
                let mut d = Dir::sqlite();
                if std::env::var("MESH_TEST_DATABASE").as_deref() == Ok("postgres") {
                    d.1 = Some(mesh_testpg::Postgres::shared().new_database());
                }
                d
            }

            /// The store (again): `state.db` in the directory, or the test's PostgreSQL database.
            pub fn open(&self) -> Store {
                match &self.1 {
                    Some(url) => Store::connect(url).unwrap(),
                    None => Store::open(&self.0.join("state.db")).unwrap(),
                }
            }

            pub fn sqlite() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "mesh-store-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p, None)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    pub(super) fn join(s: &mut Store, n: u8, name: &str) -> Result<Admission, StoreError> {
        join_as(s, n, NameRequest::Preferred(name))
    }

    pub(super) fn join_as(
        s: &mut Store,
        n: u8,
        name: NameRequest<'_>,
    ) -> Result<Admission, StoreError> {
        s.join("tok1", b"secret", &key(n), name, Candidates::default(), T0)
    }

    /// Node `n` (named `n<n>`) joins with this token at `now`.
    fn join_with(
        s: &mut Store,
        token: &str,
        secret: &[u8],
        n: u8,
        now: u64,
    ) -> Result<Admission, StoreError> {
        let name = format!("n{n}");
        let name = NameRequest::Preferred(&name);
        s.join(token, secret, &key(n), name, Candidates::default(), now)
    }

    fn code(r: Result<Admission, StoreError>) -> ErrorCode {
        match r {
            Err(StoreError::Refused { code, .. }) => code,
            other => panic!("expected refusal, got {other:?}"),
        }
    }

    #[test]
    fn same_key_same_address_distinct_keys_distinct_addresses() {
        let (_d, mut s) = store();
        let a = join(&mut s, 1, "a").unwrap();
        let b = join(&mut s, 2, "b").unwrap();
        assert_eq!(a.address, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(b.address, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(join(&mut s, 1, "a").unwrap().address, a.address);
        assert_eq!(
            s.hello("prod", &key(2), Candidates::default(), T0)
                .unwrap()
                .address,
            b.address
        );
    }

    /// The IPv6 addresses of the live nodes of network `prod`, by name.
    fn addresses6(s: &Store) -> Vec<(String, Ipv6Addr)> {
        s.nodes("prod", T0)
            .unwrap()
            .into_iter()
            .map(|n| (n.name, n.address6.expect("an IPv6 address")))
            .collect()
    }

    #[test]
    fn ipv6_addresses_are_stable_for_a_key_and_never_shared() {
        let d = tempdir::Dir::new();
        let path = d.0.join("c.db");
        let mut s = Store::open(&path).unwrap();
        let prefix: Ipv6Net = "fd12:3456:789a::/64".parse().unwrap();
        s.create_network_with(
            "prod",
            "100.64.0.0/24".parse().unwrap(),
            Some(prefix),
            Approval::Manual,
            T0,
        )
        .unwrap();
        s.create_token("prod", &NewToken::for_test("tok1", b"secret", true), T0)
            .unwrap();
        let a = join(&mut s, 1, "a").unwrap();
        assert_eq!(a.prefix6, Some(prefix));
        let a6 = a.address6.expect("an IPv6 address");
        // By construction: the key's first hashed candidate.
        assert_eq!(Some(a6), ipam6::candidate(&prefix, &key(1), 0));
        for n in 2..=40 {
            join(&mut s, n, &format!("n{n}")).unwrap();
        }
        let all = addresses6(&s);
        let distinct: HashSet<Ipv6Addr> = all.iter().map(|(_, a)| *a).collect();
        assert_eq!(distinct.len(), 40);
        assert!(distinct.iter().all(|a| prefix.contains(a)));
        // Again, by hello, after a restart of the controller, and after a removal.
        assert_eq!(join(&mut s, 1, "a").unwrap().address6, Some(a6));
        drop(s);
        let mut s = Store::open(&path).unwrap();
        let hello = s.hello("prod", &key(1), Candidates::default(), T0).unwrap();
        assert_eq!((hello.address6, hello.prefix6), (Some(a6), Some(prefix)));
        assert_eq!(s.peers(1).unwrap()[0].address6, Some(a6));
        s.remove_node("prod", "a", T0 + 1).unwrap();
        assert_eq!(join(&mut s, 1, "a").unwrap().address6, Some(a6));
        // A reinstalled machine (new key, same name) takes the old one's address back...
        s.remove_node("prod", "a", T0 + 2).unwrap();
        let again = join(&mut s, 99, "a").unwrap();
        assert_eq!(again.address6, Some(a6));
        // ...and a key whose hashed address is taken gets the next candidate.
        s.conn
            .execute(
                "UPDATE nodes SET address6 = ?1 WHERE key = ?2",
                params![
                    ipam6::candidate(&prefix, &key(200), 0).unwrap().to_string(),
                    key(99).to_string()
                ],
            )
            .unwrap();
        let clash = join(&mut s, 200, "clash").unwrap().address6.unwrap();
        assert_eq!(Some(clash), ipam6::candidate(&prefix, &key(200), 1));
        // The database itself refuses one address for two nodes.
        let dup = s.conn.execute(
            "UPDATE nodes SET address6 = ?1 WHERE key = ?2",
            params![clash.to_string(), key(2).to_string()],
        );
        assert!(dup.is_err(), "{dup:?}");
    }

    #[test]
    fn a_network_without_ipv6_gives_no_address6() {
        let (_d, mut s) = store();
        s.create_network_with(
            "v4only",
            "100.65.0.0/24".parse().unwrap(),
            None,
            Approval::Manual,
            T0,
        )
        .unwrap();
        s.create_token("v4only", &NewToken::for_test("tok4", b"secret", true), T0)
            .unwrap();
        let a = s
            .join(
                "tok4",
                b"secret",
                &key(1),
                NameRequest::Preferred("a"),
                Candidates::default(),
                T0,
            )
            .unwrap();
        assert_eq!((a.address6, a.prefix6), (None, None));
        let nets = s.networks().unwrap();
        assert!(nets.iter().any(|n| n.name == "v4only" && n.cidr6.is_none()));
        assert!(nets
            .iter()
            .any(|n| n.name == "prod" && n.cidr6.as_deref().is_some_and(|p| p.starts_with("fd"))));
        let bad = s.create_network_with(
            "gua",
            "100.66.0.0/24".parse().unwrap(),
            Some("2001:db8::/64".parse().unwrap()),
            Approval::Manual,
            T0,
        );
        assert!(matches!(bad, Err(StoreError::Invalid(m)) if m.contains("unique local")));
    }

    #[test]
    fn ipv6_endpoints_inside_the_overlay_are_refused() {
        let (_d, mut s) = store();
        let prefix = s.networks().unwrap()[0].cidr6.clone().unwrap();
        let prefix: Ipv6Net = prefix.parse().unwrap();
        let inside = SocketAddr::new(
            std::net::IpAddr::V6(ipam6::candidate(&prefix, &key(7), 0).unwrap()),
            51820,
        );
        let lan: SocketAddr = "[2001:db8::5]:51820".parse().unwrap();
        let seen = Candidates {
            reported: &[inside, lan],
            observed: None,
        };
        let a = s
            .join(
                "tok1",
                b"secret",
                &key(1),
                NameRequest::Preferred("a"),
                seen,
                T0,
            )
            .unwrap();
        assert_eq!((a.endpoints, a.refused), (vec![lan], 1));
    }

    #[test]
    fn old_databases_get_an_ipv6_overlay() {
        let d = tempdir::Dir::new();
        let path = d.0.join("old.db");
        {
            let mut s = Store::open(&path).unwrap();
            s.create_network("prod", "100.64.0.0/29".parse().unwrap(), T0)
                .unwrap();
            s.create_network("dev", "100.65.0.0/29".parse().unwrap(), T0)
                .unwrap();
            s.create_token("prod", &NewToken::for_test("tok1", b"secret", true), T0)
                .unwrap();
            for n in 1..=4 {
                join(&mut s, n, &format!("n{n}")).unwrap();
            }
            s.remove_node("prod", "n4", T0).unwrap();
            // Schema version 5, as the controller before the IPv6 overlay left it.
            s.conn
                .execute_batch(
                    "DROP INDEX nodes_by_address6;
                     ALTER TABLE nodes DROP COLUMN address6;
                     ALTER TABLE networks DROP COLUMN prefix6;
                     PRAGMA user_version = 5;",
                )
                .unwrap();
        }
        let mut s = Store::open(&path).unwrap();
        let nets = s.networks().unwrap();
        let prefixes: Vec<Ipv6Net> = nets
            .iter()
            .map(|n| n.cidr6.as_deref().expect("a prefix").parse().unwrap())
            .collect();
        assert!(prefixes
            .iter()
            .all(|p| p.prefix_len() == 64 && p.network().octets()[0] == 0xfd));
        assert_ne!(prefixes[0], prefixes[1], "a random global id per network");
        let prod: Ipv6Net = nets
            .iter()
            .find(|n| n.name == "prod")
            .unwrap()
            .cidr6
            .as_deref()
            .unwrap()
            .parse()
            .unwrap();
        let before = addresses6(&s);
        assert_eq!(before.len(), 3);
        let distinct: HashSet<Ipv6Addr> = before.iter().map(|(_, a)| *a).collect();
        assert_eq!(distinct.len(), 3);
        assert!(distinct.iter().all(|a| prod.contains(a)));
        // The tombstone holds its address too: its key comes back to it.
        let tomb: Option<String> = s
            .conn
            .query_row(
                "SELECT address6 FROM nodes WHERE name = 'n4'",
                params![],
                |r| r.get(0),
            )
            .unwrap();
        let back = join(&mut s, 4, "n4").unwrap().address6;
        assert_eq!(back.map(|a| a.to_string()), tomb);
        // Opening again changes nothing.
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(addresses6(&s)[..3], before[..]);
        assert_eq!(s.networks().unwrap()[1].cidr6, nets[1].cidr6);
    }

    #[test]
    fn range_exhaustion_and_tombstone_reuse() {
        let (_d, mut s) = store();
        // /29: six usable addresses.
        for n in 1..=6 {
            join(&mut s, n, &format!("n{n}")).unwrap();
        }
        assert_eq!(code(join(&mut s, 7, "n7")), ErrorCode::NetworkFull);
        s.remove_node("prod", "n3", T0 + 1).unwrap();
        // The removed key comes back to its own address...
        assert_eq!(
            join(&mut s, 3, "n3").unwrap().address,
            Ipv4Addr::new(100, 64, 0, 3)
        );
        s.remove_node("prod", "n3", T0 + 2).unwrap();
        // ...and only when the range is full does another key take it.
        assert_eq!(
            join(&mut s, 7, "n7").unwrap().address,
            Ipv4Addr::new(100, 64, 0, 3)
        );
    }

    #[test]
    fn reinstalled_machine_gets_its_address_back_by_name() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        let b = join(&mut s, 2, "b").unwrap();
        s.remove_node("prod", "b", T0).unwrap();
        join(&mut s, 3, "c").unwrap();
        let b2 = join(&mut s, 4, "b").unwrap();
        assert_eq!(b2.address, b.address);
    }

    #[test]
    fn name_clash_gets_suffix() {
        let (_d, mut s) = store();
        join(&mut s, 1, "web").unwrap();
        assert_eq!(join(&mut s, 2, "web").unwrap().name, "web-2");
    }

    #[test]
    fn a_name_the_user_chose_is_never_changed() {
        let (_d, mut s) = store();
        let web = join(&mut s, 1, "web").unwrap();
        match join_as(&mut s, 2, NameRequest::Exact("web")) {
            Err(StoreError::Refused { code, message }) => {
                assert_eq!(code, ErrorCode::NameTaken);
                let holder = format!("node {} (key {}…)", web.address, &key(1).to_string()[..8]);
                assert!(message.contains(&holder), "{message}");
                assert!(
                    message.contains("`mesh-controller node remove prod web`"),
                    "{message}"
                );
                assert!(message.contains("another --name"), "{message}");
            }
            other => panic!("expected NameTaken, got {other:?}"),
        }
        assert_eq!(s.nodes("prod", T0).unwrap().len(), 1, "nothing registered");
        // The holder itself may ask for its own name again, and a free name is given as is.
        assert_eq!(
            join_as(&mut s, 1, NameRequest::Exact("web")).unwrap().name,
            "web"
        );
        assert_eq!(
            join_as(&mut s, 2, NameRequest::Exact("db")).unwrap().name,
            "db"
        );
        // Once the holder is removed, the name is free (and its address goes with it).
        s.remove_node("prod", "web", T0).unwrap();
        let again = join_as(&mut s, 3, NameRequest::Exact("web")).unwrap();
        assert_eq!((again.name.as_str(), again.address), ("web", web.address));
    }

    #[test]
    fn token_checks() {
        let (_d, mut s) = store();
        assert_eq!(
            code(join_with(&mut s, "tok1", b"wrong", 1, T0)),
            ErrorCode::TokenInvalid
        );
        assert_eq!(
            code(join_with(&mut s, "nope", b"secret", 1, T0)),
            ErrorCode::TokenInvalid
        );
        s.create_token(
            "prod",
            &NewToken {
                expires_at: Some(T0 + 10),
                ..NewToken::for_test("exp", b"s", true)
            },
            T0,
        )
        .unwrap();
        assert!(join_with(&mut s, "exp", b"s", 1, T0 + 9).is_ok());
        let r = join_with(&mut s, "exp", b"s", 2, T0 + 10);
        match r {
            Err(StoreError::Refused { code, message }) => {
                assert_eq!(code, ErrorCode::TokenExpired);
                assert!(
                    message.contains("expired at 2027-01-15T08:00:10Z"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        s.create_token("prod", &NewToken::for_test("one", b"s", false), T0)
            .unwrap();
        assert!(join_with(&mut s, "one", b"s", 3, T0).is_ok());
        // The same node may present it again; another node may not.
        assert!(join_with(&mut s, "one", b"s", 3, T0).is_ok());
        assert_eq!(
            code(join_with(&mut s, "one", b"s", 4, T0)),
            ErrorCode::TokenUsed
        );
        s.revoke_token("tok1").unwrap();
        assert_eq!(code(join(&mut s, 5, "e")), ErrorCode::TokenRevoked);
        let t = s.tokens().unwrap();
        assert!(t.iter().any(|t| t.id == "tok1" && t.revoked));
    }

    #[test]
    fn tokens_list_the_addresses_they_embed() {
        let (_d, s) = store();
        let token = NewToken {
            id: "tcp",
            secret: b"s",
            controller: Some("192.0.2.1:7443"),
            controller_tcp: Some("192.0.2.1:443"),
            ..NewToken::default()
        };
        s.create_token("prod", &token, T0).unwrap();
        let rows = s.tokens().unwrap();
        let old = rows.iter().find(|t| t.id == "tok1").unwrap();
        assert_eq!(
            (old.controller.as_deref(), old.controller_tcp.as_deref()),
            (None, None)
        );
        let new = rows.iter().find(|t| t.id == "tcp").unwrap();
        assert_eq!(
            (new.controller.as_deref(), new.controller_tcp.as_deref()),
            (Some("192.0.2.1:7443"), Some("192.0.2.1:443"))
        );
    }

    #[test]
    fn relays_and_home_relay() {
        let (_d, mut s) = store();
        let a = join(&mut s, 1, "a").unwrap();
        s.add_relay(
            "eu-1",
            "192.0.2.10:7444",
            Some("192.0.2.10:443"),
            &key(9),
            T0,
        )
        .unwrap();
        assert_eq!(
            s.relays().unwrap()[0].tcp_addr.as_deref(),
            Some("192.0.2.10:443")
        );
        assert!(s
            .add_relay("eu-2", "192.0.2.10:7444", Some("no-port"), &key(9), T0)
            .is_err());
        assert!(s
            .add_relay("bad name", "192.0.2.10:7444", None, &key(9), T0)
            .is_err());
        assert!(s.add_relay("us-1", "no-port", None, &key(9), T0).is_err());
        assert_eq!(s.relays().unwrap().len(), 1);
        s.set_home_relay(a.network_id, &key(1), Some("eu-1"))
            .unwrap();
        assert_eq!(
            s.peers(a.network_id).unwrap()[0].relay.as_deref(),
            Some("eu-1")
        );
        // A relay that is removed is no longer anybody's home.
        s.remove_relay("eu-1").unwrap();
        assert_eq!(s.peers(a.network_id).unwrap()[0].relay, None);
        assert!(s.remove_relay("eu-1").is_err());
    }

    #[test]
    fn removed_node_cannot_hello() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        s.remove_node("prod", &key(1).to_string(), T0).unwrap();
        assert!(matches!(
            s.hello("prod", &key(1), Candidates::default(), T0),
            Err(StoreError::Refused {
                code: ErrorCode::NodeUnknown,
                ..
            })
        ));
    }

    #[test]
    fn survives_reopen() {
        let (d, mut s) = store();
        let a = join(&mut s, 1, "a").unwrap();
        drop(s);
        let mut s = d.open();
        assert_eq!(join(&mut s, 1, "a").unwrap().address, a.address);
        assert_eq!(
            join(&mut s, 2, "b").unwrap().address,
            Ipv4Addr::new(100, 64, 0, 2)
        );
    }

    #[test]
    fn online_needs_recent_heartbeat() {
        let (_d, mut s) = store();
        let a = join(&mut s, 1, "a").unwrap();
        assert!(s.nodes("prod", T0).unwrap()[0].online);
        assert!(!s.nodes("prod", T0 + ONLINE_WINDOW_SECS + 1).unwrap()[0].online);
        s.disconnected(a.network_id, &key(1), "r/1", T0).unwrap();
        assert!(!s.nodes("prod", T0).unwrap()[0].online);
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_network_sets_its_birthday_budget_within_bounds() {
        let (_d, s) = store();
        let id = s.network("prod").unwrap().0;
        assert_eq!(s.birthday_budget(id).unwrap(), None, "the nodes' default");
        s.set_birthday_budget("prod", Some(0)).unwrap();
        assert_eq!(s.birthday_budget(id).unwrap(), Some(0));
        assert_eq!(s.networks().unwrap()[0].birthday_budget, Some(0));
        let e = s
            .set_birthday_budget("prod", Some(65))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than the 64"), "{e}");
        assert_eq!(
            s.birthday_budget(id).unwrap(),
            Some(0),
            "a refused setting changes nothing"
        );
        let e = s
            .set_birthday_budget("nope", Some(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no network named"), "{e}");
        s.set_birthday_budget("prod", None).unwrap();
        assert_eq!(s.birthday_budget(id).unwrap(), None);
    }

    #[test]
    fn database_files_are_private() {
        let d = tempdir::Dir::new();
        let path = d.0.join("c.db");
        let s = Store::open(&path).unwrap();
        s.create_network("prod", "100.64.0.0/29".parse().unwrap(), T0)
            .unwrap();
        assert_eq!(mode(&path), 0o600);
        for side in ["c.db-wal", "c.db-shm"] {
            assert_eq!(mode(&d.0.join(side)), 0o600, "{side}");
        }
        drop(s);
        // A file left readable by an older version is fixed on start.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = Store::open(&path).unwrap();
        s.create_network("dev", "100.65.0.0/29".parse().unwrap(), T0)
            .unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    /// Three controllers (a connection each, as three `serve` processes on one database have)
    /// admit 200 nodes at once: every node gets an address and a name of its own. Run with
    /// `MESH_TEST_DATABASE=postgres` it is the PostgreSQL rule: joins that race on different
    /// controllers never share an address.
    #[test]
    fn joins_racing_on_three_controllers_never_share_an_address() {
        let (d, s) = store();
        s.create_network("big", "100.64.0.0/22".parse().unwrap(), T0)
            .unwrap();
        s.create_token("big", &NewToken::for_test("many", b"secret", true), T0)
            .unwrap();
        let admitted: Vec<Admission> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..3u8)
                .map(|c| {
                    let d = &d;
                    scope.spawn(move || {
                        let mut s = d.open();
                        let mut out = Vec::new();
                        for i in (0..200u16).filter(|i| i % 3 == u16::from(c)) {
                            let mut k = [0x5A; 32];
                            k[..2].copy_from_slice(&i.to_be_bytes());
                            out.push(
                                s.join(
                                    "many",
                                    b"secret",
                                    &PublicKey(k),
                                    NameRequest::Preferred("node"),
                                    Candidates::default(),
                                    T0,
                                )
                                .unwrap(),
                            );
                        }
                        out
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        assert_eq!(admitted.len(), 200);
        let addresses: HashSet<Ipv4Addr> = admitted.iter().map(|a| a.address).collect();
        let names: HashSet<&str> = admitted.iter().map(|a| a.name.as_str()).collect();
        assert_eq!((addresses.len(), names.len()), (200, 200));
        assert_eq!(s.nodes("big", T0).unwrap().len(), 200);
    }

    #[test]
    fn old_databases_get_the_observed_column() {
        let d = tempdir::Dir::new();
        let path = d.0.join("old.db");
        {
            let mut s = Store::open(&path).unwrap();
            s.create_network("prod", "100.64.0.0/29".parse().unwrap(), T0)
                .unwrap();
            s.create_token("prod", &NewToken::for_test("tok1", b"secret", true), T0)
                .unwrap();
            join(&mut s, 1, "a").unwrap();
            // What an older controller stored: observed first, then reported; no column.
            s.conn
                .execute_batch(
                    "ALTER TABLE nodes DROP COLUMN observed;
                     UPDATE nodes SET endpoints = '[\"203.0.113.5:40000\",\"198.51.100.4:51820\"]';
                     PRAGMA user_version = 0;",
                )
                .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let p = &s.peers(1).unwrap()[0];
        assert_eq!(p.observed, Some("203.0.113.5:40000".parse().unwrap()));
        assert_eq!(p.endpoints, vec!["198.51.100.4:51820".parse().unwrap()]);
    }

    #[test]
    fn processes_opening_a_new_database_at_once_migrate_it_once() {
        let d = tempdir::Dir::new();
        let path = d.0.join("c.db");
        let barrier = std::sync::Barrier::new(10);
        let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..10)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        let s = Store::open(&path).map_err(|e| e.to_string())?;
                        s.networks().map(drop).map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in &results {
            assert!(r.is_ok(), "{results:?}");
        }
        let s = Store::open(&path).unwrap();
        let version: i64 = s
            .conn
            .query_row("PRAGMA user_version", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_database_from_a_newer_controller_is_refused() {
        let d = tempdir::Dir::new();
        let path = d.0.join("c.db");
        Store::open(&path)
            .unwrap()
            .conn
            .as_sqlite()
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = Store::open(&path).err().unwrap().to_string();
        assert!(e.contains("newer mesh-controller"), "{e}");
    }

    #[test]
    fn a_backup_made_while_the_database_is_in_use_reads_the_same() {
        let (d, mut s) = sqlite_store();
        let a = join(&mut s, 1, "a").unwrap();
        // A second connection, as `serve` holds while an admin command runs the backup.
        let live = Store::open(&d.0.join("state.db")).unwrap();
        let copy = d.0.join("backup.db");
        let summary = live.backup_to(&copy).unwrap();
        assert_eq!((summary.networks, summary.nodes), (1, 1));
        assert_eq!(summary.bytes, std::fs::metadata(&copy).unwrap().len());
        assert_eq!(mode(&copy), 0o600);
        let names: Vec<_> = std::fs::read_dir(&d.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("backup"))
            .collect();
        assert_eq!(names, ["backup.db"], "no temporary or -wal file left");
        // The original keeps working; the copy holds what was there.
        join(&mut s, 2, "b").unwrap();
        let restored = Store::open(&copy).unwrap();
        let nodes = restored.nodes("prod", T0).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!((nodes[0].key, nodes[0].address), (key(1), a.address));
        assert_eq!(restored.tokens().unwrap()[0].id, "tok1");
    }

    #[test]
    fn removals_are_listed_for_revocation() {
        let (_d, mut s) = store();
        let a = join(&mut s, 1, "a").unwrap();
        join(&mut s, 2, "b").unwrap();
        s.remove_node("prod", "a", T0 + 10).unwrap();
        let removed = s.removed_since(a.network_id, T0, 64).unwrap();
        assert_eq!(removed, vec![(key(1), T0 + 10)]);
        assert!(s
            .removed_since(a.network_id, T0 + 11, 64)
            .unwrap()
            .is_empty());
        // Joining again ends the revocation.
        join(&mut s, 1, "a").unwrap();
        assert!(s.removed_since(a.network_id, T0, 64).unwrap().is_empty());
    }

    #[test]
    fn heartbeat_stores_what_the_node_reports() {
        let (_d, mut s) = store();
        let a = join(&mut s, 1, "a").unwrap();
        let report = NodeReport {
            endpoints: vec!["198.51.100.4:51820".parse().unwrap()],
            observed: Some("203.0.113.5:40000".parse().unwrap()),
            home_relay: None,
            nat: None,
        };
        s.heartbeat(a.network_id, &key(1), &report, T0 + 1).unwrap();
        let p = &s.peers(a.network_id).unwrap()[0];
        assert_eq!(
            (&p.endpoints, p.observed),
            (&report.endpoints, report.observed)
        );
        let row = &s.nodes("prod", T0 + 1).unwrap()[0];
        assert_eq!(row.endpoints[0], report.observed.unwrap(), "observed first");
        assert_eq!(p.nat, None);
        // The NAT kind, once the node knows it, reaches its peers' lists.
        for kind in [
            NatKind::EndpointDependent,
            NatKind::EndpointIndependent,
            NatKind::Public,
        ] {
            let report = NodeReport {
                nat: Some(kind),
                ..report.clone()
            };
            s.heartbeat(a.network_id, &key(1), &report, T0 + 2).unwrap();
            assert_eq!(s.peers(a.network_id).unwrap()[0].nat, Some(kind));
        }
    }

    #[test]
    fn cidr_parsing() {
        assert!("100.64.0.0/16".parse::<Cidr>().is_ok());
        assert!("100.64.0.1/16"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("host bits"));
        assert!("100.64.0.0/31".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }
}
