//! The controller's state directory: its key, its database, the address it listens on.

use crate::store::Store;
use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use mesh_proto::PublicKey;
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

/// The controller's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Uses (creating with mode 0700 if needed) `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<StateDir> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create state directory {}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    /// Opens the database.
    pub fn open_store(&self) -> anyhow::Result<Store> {
        let path = self.dir.join(DB_FILE);
        Store::open(&path).with_context(|| format!("cannot open database {}", path.display()))
    }

    /// The controller's private key; generated (mode 0600) on first use.
    pub fn controller_key(&self) -> anyhow::Result<[u8; 32]> {
        self.private_key(KEY_FILE)
    }

    /// A standalone relay's private key; generated (mode 0600) on first use.
    pub fn relay_key(&self) -> anyhow::Result<[u8; 32]> {
        self.private_key(RELAY_KEY_FILE)
    }

    fn private_key(&self, file: &str) -> anyhow::Result<[u8; 32]> {
        let path = self.dir.join(file);
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
        std::fs::write(self.dir.join(ADDR_FILE), format!("{addr}\n"))?;
        Ok(())
    }

    /// Remembers the TCP address `serve` listens on (or that it does not), for `token create`.
    pub fn write_listen_tcp_addr(&self, addr: Option<SocketAddr>) -> anyhow::Result<()> {
        let path = self.dir.join(TCP_ADDR_FILE);
        match addr {
            Some(a) => std::fs::write(path, format!("{a}\n"))?,
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

    /// The address `serve` last listened on.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        std::fs::read_to_string(self.dir.join(ADDR_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}
