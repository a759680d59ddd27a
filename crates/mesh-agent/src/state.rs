//! The agent's state directory: node key, membership, cached peer list, local API socket.

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use mesh_proto::control::PeerInfo;
use mesh_proto::PublicKey;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const KEY_FILE: &str = "node.key";
const NODE_FILE: &str = "node.json";
const PEERS_FILE: &str = "peers.json";
const RELAYS_FILE: &str = "relays.json";
const SOCKET_FILE: &str = "mesh.sock";

/// What the node remembers about its membership (`node.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Controller address, `host:port`.
    pub controller: String,
    /// The controller's pinned key.
    pub controller_key: PublicKey,
    /// Network name.
    pub network: String,
    /// This node's name.
    pub name: String,
    /// Overlay address.
    pub address: Ipv4Addr,
    /// Prefix length of the overlay network.
    pub prefix_len: u8,
    /// Interface MTU.
    pub mtu: u32,
    /// UDP port.
    pub port: u16,
    /// TUN device name.
    pub interface: String,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

impl StateDir {
    /// The directory, without touching the file system.
    pub fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
        }
    }

    /// The directory path.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (mode 0700).
    pub fn create(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create state directory {}", self.dir.display()))?;
        let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        Ok(())
    }

    /// Path of the local API socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET_FILE)
    }

    /// Loads the node key, or generates one (file mode 0600).
    pub fn load_or_create_key(&self) -> anyhow::Result<[u8; 32]> {
        if let Some(k) = self.load_key()? {
            return Ok(k);
        }
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
        write_atomic(
            &self.dir.join(KEY_FILE),
            format!("{}\n", STANDARD.encode(key)).as_bytes(),
            0o600,
        )?;
        Ok(key)
    }

    /// Loads the node key if there is one.
    pub fn load_key(&self) -> anyhow::Result<Option<[u8; 32]>> {
        let path = self.dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => STANDARD
                .decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .map(Some)
                .with_context(|| {
                    format!("{} is damaged (not a base64 x25519 key)", path.display())
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Saves the membership.
    pub fn save_membership(&self, m: &Membership) -> anyhow::Result<()> {
        write_atomic(
            &self.dir.join(NODE_FILE),
            &serde_json::to_vec_pretty(m)?,
            0o600,
        )
    }

    /// Loads the membership, with an error that says what to do when there is none.
    pub fn load_membership(&self) -> anyhow::Result<Membership> {
        let path = self.dir.join(NODE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "this node has not joined a network (no {}); run `mesh join <token>` first",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", path.display()))
    }

    /// Saves the last peer list.
    pub fn save_peers(&self, peers: &[PeerInfo]) -> anyhow::Result<()> {
        write_atomic(
            &self.dir.join(PEERS_FILE),
            &serde_json::to_vec(peers)?,
            0o600,
        )
    }

    /// The cached peer list (empty if none or unreadable).
    pub fn load_peers(&self) -> Vec<PeerInfo> {
        std::fs::read(self.dir.join(PEERS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Caches the relay list with its tickets (they stay valid for hours), so that relays work
    /// after a restart while the controller is down.
    pub fn save_relays(&self, relays: &[mesh_proto::control::RelayInfo]) -> anyhow::Result<()> {
        write_atomic(
            &self.dir.join(RELAYS_FILE),
            &serde_json::to_vec(relays)?,
            0o600,
        )
    }

    /// The cached relay list (empty if none or unreadable).
    pub fn load_relays(&self) -> Vec<mesh_proto::control::RelayInfo> {
        std::fs::read(self.dir.join(RELAYS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Deletes everything the node stored.
    pub fn wipe(&self) -> anyhow::Result<()> {
        for f in [KEY_FILE, NODE_FILE, PEERS_FILE, RELAYS_FILE, SOCKET_FILE] {
            match std::fs::remove_file(self.dir.join(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot remove {f}")),
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        Ok(())
    }
}
