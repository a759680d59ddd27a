//! The controller's state directory: its key, its database, the addresses it listens on and
//! announces.
//!
//! One directory holds one controller, and one `serve` owns it at a time ([`StateDir::lock`]).
//! Only `serve` creates a controller ([`StateDir::init_controller`]); admin commands open an
//! existing one ([`StateDir::existing`]) so that a mistyped `--state-dir` never mints a new
//! controller identity.

use crate::store::Store;
use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use mesh_proto::PublicKey;
use mesh_service::DirLock;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const KEY_FILE: &str = "controller.key";
const RELAY_KEY_FILE: &str = "relay.key";
const DB_FILE: &str = "controller.db";
const ADDR_FILE: &str = "listen.addr";
const TCP_ADDR_FILE: &str = "listen-tcp.addr";
const ANNOUNCE_FILE: &str = "announce.addrs";
const LOCK_FILE: &str = "controller.lock";
/// How long an admin command waits for a `serve` started just before it to take its directory.
const SERVE_START_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const RELAY_LOCK_FILE: &str = "relay.lock";

/// Which long-running process owns a state directory (see [`StateDir::lock`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `mesh-controller serve`.
    Controller,
    /// `mesh-controller relay`.
    Relay,
}

impl Role {
    fn lock_file(self) -> &'static str {
        match self {
            Role::Controller => LOCK_FILE,
            Role::Relay => RELAY_LOCK_FILE,
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The public key of an x25519 private key.
pub fn public_of(secret: &[u8; 32]) -> PublicKey {
    let secret = x25519_dalek::StaticSecret::from(*secret);
    PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
}

/// The controller's state directory, with where its database and key are when they live
/// elsewhere (`--database`, `--key-file`).
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
    /// A PostgreSQL database shared by several controllers; `None`: SQLite in the directory.
    database: Option<String>,
    /// The key file, when not `controller.key` in the directory.
    key_file: Option<PathBuf>,
}

/// `url` without its password, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Checks a `--database` value: a PostgreSQL connection string.
pub fn check_database(url: &str) -> anyhow::Result<()> {
    let url = url.trim();
    if url.starts_with("postgres://")
        || url.starts_with("postgresql://")
        || url.contains("host=")
        || url.contains("dbname=")
    {
        return Ok(());
    }
    bail!("--database {:?} is not a PostgreSQL connection string: use postgres://USER:PASSWORD@HOST:5432/DB (or host=... dbname=... pairs); without --database the controller keeps SQLite in its state directory", redact_url(url))
}

impl StateDir {
    /// Uses (creating with mode 0700 if needed) `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<StateDir> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create state directory {}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        Ok(StateDir {
            dir: dir.to_owned(),
            database: None,
            key_file: None,
        })
    }

    /// Uses the PostgreSQL database at `url` instead of SQLite in the directory.
    pub fn with_database(mut self, url: Option<String>) -> StateDir {
        self.database = url;
        self
    }

    /// Uses the key at `path` instead of `controller.key` in the directory.
    pub fn with_key_file(mut self, path: Option<PathBuf>) -> StateDir {
        self.key_file = path;
        self
    }

    /// Whether the database is PostgreSQL, possibly shared with other controllers.
    pub fn is_shared(&self) -> bool {
        self.database.is_some()
    }

    /// For admin commands on a shared database: nothing local is needed (the database tells
    /// the key and where the controllers are), so nothing is checked or created.
    pub fn remote(dir: &Path, url: String, key_file: Option<PathBuf>) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
            database: Some(url),
            key_file,
        }
    }

    /// Where the database is, for logs: the file, or the PostgreSQL URL without password.
    pub fn database_name(&self) -> String {
        match &self.database {
            Some(url) => redact_url(url),
            None => self.dir.join(DB_FILE).display().to_string(),
        }
    }

    /// An existing controller's directory, for admin commands: refuses a directory without
    /// `controller.key` (creating nothing, not even the directory), so that a mistyped
    /// `--state-dir` never mints a new controller identity.
    pub fn existing(dir: &Path) -> anyhow::Result<StateDir> {
        let state = StateDir {
            dir: dir.to_owned(),
            database: None,
            key_file: None,
        };
        // A `serve` that has just started (`serve ... &` then `network create`, as every
        // provisioning script does) is about to create the key: wait for it, up to 10 s once it
        // holds the lock, and up to 2 s for it to take the lock at all.
        let started = std::time::Instant::now();
        while !state.dir.join(KEY_FILE).exists() {
            let waited = started.elapsed();
            let limit = if state.locked(Role::Controller) {
                std::time::Duration::from_secs(10)
            } else {
                SERVE_START_WAIT
            };
            if waited >= limit {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if !state.dir.join(KEY_FILE).exists() {
            if state.dir.join(DB_FILE).exists() {
                bail!("{}", state.lost_key());
            }
            bail!(
                "no controller in {dir}: start one with `mesh-controller serve --state-dir {dir}`, or pass the right --state-dir",
                dir = dir.display()
            );
        }
        Ok(state)
    }

    /// For `serve`: creates the controller's key if the directory has none yet; whether it did.
    /// Refuses a database without its key: every token and node of that controller pins the
    /// lost key, so a new one would lock them all out.
    pub fn init_controller(&self) -> anyhow::Result<bool> {
        if self.key_path().exists() {
            return Ok(false);
        }
        // On a shared database the others' key is checked at start (`claim_identity`).
        if !self.is_shared() && self.dir.join(DB_FILE).exists() {
            bail!("{}", self.lost_key());
        }
        self.controller_key()?;
        Ok(true)
    }

    fn lost_key(&self) -> String {
        format!(
            "{dir} holds {DB_FILE} but no {KEY_FILE}: restore {KEY_FILE} from your backup (every token and node pins it), or move {DB_FILE} away to start a new controller",
            dir = self.dir.display()
        )
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The controller's key file: its identity, which every token and node pins.
    pub fn key_path(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.dir.join(KEY_FILE))
    }

    /// Whether a process holds the directory for `role` (creating nothing).
    fn locked(&self, role: Role) -> bool {
        mesh_service::DirLock::holder(&self.dir, role.lock_file()).is_some()
    }

    /// Takes the directory for `role` for as long as the returned lock lives, or says which
    /// process holds it. Admin commands take no lock: they share the database with `serve`.
    pub fn lock(&self, role: Role) -> anyhow::Result<DirLock> {
        let what = match role {
            Role::Controller => "a controller",
            Role::Relay => "a relay",
        };
        DirLock::acquire(&self.dir, role.lock_file(), what).map_err(|e| match e {
            mesh_service::LockError::Held { .. } => {
                anyhow::anyhow!("{e}; stop it first, or give this one another --state-dir")
            }
            e => e.into(),
        })
    }

    /// Opens the database.
    pub fn open_store(&self) -> anyhow::Result<Store> {
        if let Some(url) = &self.database {
            return Store::connect(url).with_context(|| {
                format!("cannot use the PostgreSQL database {}", redact_url(url))
            });
        }
        let path = self.dir.join(DB_FILE);
        Store::open(&path).with_context(|| format!("cannot open database {}", path.display()))
    }

    /// The controller's private key; generated (mode 0600) on first use.
    pub fn controller_key(&self) -> anyhow::Result<[u8; 32]> {
        self.private_key(&self.key_path())
    }

    /// The controller's public key for admin commands: from the key file, or on a shared
    /// database without one here, as the controllers recorded it.
    pub fn public_key(&self) -> anyhow::Result<PublicKey> {
        if self.key_path().exists() || !self.is_shared() {
            return self.controller_public();
        }
        self.open_store()?.identity()?.with_context(|| {
            format!(
                "no controller has started on {} yet: start `mesh-controller serve --database ...` first",
                self.database_name()
            )
        })
    }

    /// A standalone relay's private key; generated (mode 0600) on first use.
    pub fn relay_key(&self) -> anyhow::Result<[u8; 32]> {
        self.private_key(&self.dir.join(RELAY_KEY_FILE))
    }

    fn private_key(&self, path: &Path) -> anyhow::Result<[u8; 32]> {
        let path = path.to_owned();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = STANDARD
                    .decode(text.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .with_context(|| {
                        format!("{} is damaged (not a base64 x25519 key)", path.display())
                    })?;
                Ok(bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                writeln!(f, "{}", STANDARD.encode(key))?;
                f.sync_all()?;
                Ok(key)
            }
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// The controller's public key.
    pub fn controller_public(&self) -> anyhow::Result<PublicKey> {
        Ok(public_of(&self.controller_key()?))
    }

    /// Remembers the address `serve` listens on, for `token create`.
    pub fn write_listen_addr(&self, addr: SocketAddr) -> anyhow::Result<()> {
        self.write_whole(ADDR_FILE, &format!("{addr}\n"))
    }

    /// Writes `name` so that a reader sees the old or the new content, never a part.
    fn write_whole(&self, name: &str, content: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, self.dir.join(name))?;
        Ok(())
    }

    /// Remembers the TCP address `serve` listens on (or that it does not), for `token create`.
    pub fn write_listen_tcp_addr(&self, addr: Option<SocketAddr>) -> anyhow::Result<()> {
        let path = self.dir.join(TCP_ADDR_FILE);
        match addr {
            Some(a) => self.write_whole(TCP_ADDR_FILE, &format!("{a}\n"))?,
            None => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            },
        }
        Ok(())
    }

    /// The TCP address `serve` last listened on, if it listened on TCP.
    pub fn listen_tcp_addr(&self) -> Option<SocketAddr> {
        std::fs::read_to_string(self.dir.join(TCP_ADDR_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Remembers the addresses `serve` announces to nodes (`--announce`), one a line, for the
    /// network ids admin commands print; an empty list when it announces none.
    pub fn write_announced(&self, addrs: &[String]) -> anyhow::Result<()> {
        let content: String = addrs.iter().map(|a| format!("{a}\n")).collect();
        self.write_whole(ANNOUNCE_FILE, &content)
    }

    /// The addresses `serve` last announced, in its order; none if it announced none or never
    /// ran.
    pub fn announced(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(ANNOUNCE_FILE))
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The address `serve` listens on; while a `serve` that holds the directory has not yet
    /// written it (it is still binding), waits up to 10 s for it.
    pub fn wait_listen_addr(&self) -> Option<SocketAddr> {
        let started = std::time::Instant::now();
        loop {
            let addr = self.listen_addr();
            if addr.is_some()
                || !self.locked(Role::Controller)
                || started.elapsed() >= std::time::Duration::from_secs(10)
            {
                return addr;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The address `serve` last listened on.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        std::fs::read_to_string(self.dir.join(ADDR_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_addresses_are_kept_in_order_and_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("mesh-state-test-{}", std::process::id()));
        let state = StateDir::open(&dir).unwrap();
        assert!(state.announced().is_empty(), "serve never ran");
        let addrs = vec![
            "ctl.example.com:7443".to_owned(),
            "192.0.2.9:7443".to_owned(),
        ];
        state.write_announced(&addrs).unwrap();
        assert_eq!(state.announced(), addrs);
        state.write_announced(&[]).unwrap();
        assert!(
            state.announced().is_empty(),
            "a serve that announces nothing"
        );
        assert!(!dir.join("announce.addrs.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
