//! The agent's state directory: node key, membership, cached peer list, local API socket.

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use mesh_proto::control::PeerInfo;
use mesh_proto::PublicKey;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const KEY_FILE: &str = "node.key";
const NODE_FILE: &str = "node.json";
const PEERS_FILE: &str = "peers.json";
const RELAYS_FILE: &str = "relays.json";
/// Where the controller's word on the prefixes this node advertises is cached.
const ROUTES_FILE: &str = "routes.json";
/// Where the network's names for several nodes are cached (`mesh-controller name set`).
const NAMES_FILE: &str = "names.json";
/// Present while the controller was last reached over TCP only (its content: `tcp`).
const TRANSPORT_FILE: &str = "transport";
const SOCKET_FILE: &str = "mesh.sock";
const READ_ONLY_SOCKET_FILE: &str = "status.sock";
/// Mode of a state directory mesh creates: only root lists or writes it, but every user may
/// reach the read-only socket in it (every file in it is 0600).
pub const DIR_MODE: u32 = 0o711;
/// Locked (`flock`) by the running agent, which writes its PID into it.
const LOCK_FILE: &str = "agent.lock";
/// Present once the controller said this node is no longer a member: why, as JSON.
const REMOVED_FILE: &str = "removed.json";
/// Present while a join by network id waits for the administrator's approval.
const REQUEST_FILE: &str = "request.json";

/// What the agent keeps after the controller said the node is no longer a member
/// (`removed.json`): `mesh up` refuses to put the old address back on the interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// Network it was removed from.
    pub network: String,
    /// The address it had, which the controller may give to another node.
    pub address: Ipv4Addr,
    /// The controller's words.
    pub message: String,
    /// When, in seconds since the Unix epoch.
    pub at: u64,
}

/// A join by network id that waits for the administrator (`request.json`): what `mesh up`
/// needs to keep asking, across its own restarts, until the controller answers with a welcome
/// (then `node.json` replaces it) or a rejection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingJoin {
    /// The network id, as given to `mesh join`.
    pub id: String,
    /// The name asked for.
    pub name: String,
    /// The name was given with `--name` (taken means refused, not renamed).
    #[serde(default)]
    pub exact_name: bool,
    /// When the node first asked, in seconds since the Unix epoch.
    pub since: u64,
    /// The daemon settings of the join (port, MTU, interface...), in the form `node.json`
    /// keeps them; its address, prefix and name are placeholders until the welcome.
    pub settings: Membership,
}

impl PendingJoin {
    /// The network id, parsed.
    pub fn network_id(&self) -> anyhow::Result<mesh_proto::token::NetworkId> {
        self.id
            .parse()
            .map_err(|e| anyhow::anyhow!("the network id saved in request.json: {e}"))
    }
}

/// What the node remembers about its membership (`node.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Controller address, `host:port`.
    pub controller: String,
    /// The controller's TCP address, `host:port`, from the token; absent: port 443 of the
    /// controller's host (see [`crate::dial::Target::new`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_tcp: Option<String>,
    /// The controller's pinned key.
    pub controller_key: PublicKey,
    /// Further addresses (`host:port`, QUIC) the controller announced (`serve --announce`),
    /// tried in turn when `controller` stops answering: how a controller moves without every
    /// node joining again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
    /// Network name.
    pub network: String,
    /// This node's name.
    pub name: String,
    /// Overlay address.
    pub address: Ipv4Addr,
    /// Prefix length of the overlay network.
    pub prefix_len: u8,
    /// IPv6 overlay address, from the controller; absent in networks without an IPv6 overlay
    /// and from files written before it existed (the next welcome brings it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<std::net::Ipv6Addr>,
    /// The network's IPv6 overlay prefix, with `address6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix6: Option<mesh_proto::control::Ipv6Net>,
    /// Interface MTU.
    pub mtu: u32,
    /// UDP port.
    pub port: u16,
    /// TUN device name.
    pub interface: String,
    /// The endpoint interface list it last ran with (`--endpoint-interfaces`); `None`: the
    /// defaults. Absent from files written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_interfaces: Option<String>,
    /// The prefixes it advertises as subnet routes (`--advertise-routes`, `mesh routes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertise_routes: Vec<mesh_proto::control::IpNet>,
    /// Present when it also advertises the pod subnet found on the node
    /// (`--advertise-routes auto`), with the prefix found last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_routes: Option<crate::podcidr::AutoRoutes>,
    /// Whether it asks the router to forward its UDP port (`--no-port-mapping` turns it off).
    /// Absent from files written before it existed, and when on.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub port_mapping: bool,
    /// Whether it answers node names on its overlay address (`--no-dns` turns it off).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub dns: bool,
    /// Whether it keeps the node names in a block of /etc/hosts (`--hosts-file`).
    #[serde(default, skip_serializing_if = "is_no")]
    pub hosts_file: bool,
    /// The prefixes it offers as an exit (`--advertise-exit`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertise_exits: Vec<mesh_proto::control::IpNet>,
    /// The prefixes it sends through a peer's exit (`--exit-node`, `--use-routes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub use_exits: Vec<crate::exits::ExitUse>,
}

fn is_no(b: &bool) -> bool {
    !*b
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// How many temporary names [`write_file`] tries before it gives up.
const TEMP_ATTEMPTS: u32 = 16;

/// Whether `name` is one of the temporary files [`write_file`] creates for `target`.
fn is_temp_of(name: &str, target: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_prefix(target))
        .is_some_and(|rest| rest.starts_with('.') && rest.ends_with(".tmp"))
}

/// Creates a new temporary file next to `path`, with a name no one else uses (`O_EXCL`: an
/// existing file or symlink of that name is never opened) and exactly `mode` before any byte
/// is written.
fn create_temp(path: &Path, mode: u32) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} is not a file path", path.display()))?;
    for _ in 0..TEMP_ATTEMPTS {
        let tmp = dir.join(format!(
            ".{name}.{}.{:016x}.tmp",
            std::process::id(),
            rand::random::<u64>()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => {
                // The umask may have taken bits away; set exactly `mode` while it is empty.
                if let Err(e) = f.set_permissions(std::fs::Permissions::from_mode(mode)) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e)
                        .with_context(|| format!("cannot set the mode of {}", tmp.display()));
                }
                return Ok((tmp, f));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot create a temporary file in {}", dir.display())
                })
            }
        }
    }
    anyhow::bail!(
        "cannot create a temporary file in {}: {TEMP_ATTEMPTS} random names were all taken",
        dir.display()
    )
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replaces `path` with `bytes`, so that a reader, a crash or a power cut leaves either the
/// old file or the whole new one, with exactly `mode`, never a mix: the bytes go to a
/// temporary file of their own in the same directory (created with `mode` before anything is
/// written), which is fsynced and renamed over `path`; then the directory is fsynced so that
/// the rename itself is on disk. On error the temporary file is removed.
///
/// Every file the agent keeps (node key, membership, peer and relay caches) and the kubelet
/// defaults file it edits are written through here.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let (tmp, mut file) = create_temp(path, mode)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()));
    drop(file);
    let renamed = written.and_then(|()| {
        std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
    });
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let dir = parent_dir(path);
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
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

    /// Creates the directory (mode [`DIR_MODE`]) if it is missing. An existing directory keeps its
    /// mode (an admin may open it to a group for `mesh status`, see [`crate::api`]), but one
    /// that every user may write to is refused.
    pub fn create(&self) -> anyhow::Result<()> {
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create state directory {}", self.dir.display()))?;
        }
        match std::fs::DirBuilder::new().mode(DIR_MODE).create(&self.dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot create state directory {}", self.dir.display())
                })
            }
        }
        let meta = std::fs::metadata(&self.dir)
            .with_context(|| format!("cannot use state directory {}", self.dir.display()))?;
        if !meta.is_dir() {
            anyhow::bail!(
                "state directory {} is not a directory; choose another with --state-dir",
                self.dir.display()
            );
        }
        if meta.permissions().mode() & 0o002 != 0 {
            anyhow::bail!(
                "state directory {} is writable by every user; give mesh a directory of its own (e.g. /var/lib/mesh, mode 0700) with --state-dir",
                self.dir.display()
            );
        }
        Ok(())
    }

    /// Checks that the directory can be written (before the agent touches the interface, so
    /// that a read-only mount fails at once instead of after the address is up).
    pub fn check_writable(&self) -> anyhow::Result<()> {
        let probe = self
            .dir
            .join(format!(".write-check-{}.tmp", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
        {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                Ok(())
            }
            Err(e) => anyhow::bail!(
                "state directory {} cannot be written ({e}): mesh saves its peer list and membership there; give it a writable directory (--state-dir, or remount)",
                self.dir.display()
            ),
        }
    }

    /// Takes the lock of this state directory for the life of the process: one agent per
    /// state directory.
    pub fn lock(&self) -> anyhow::Result<mesh_service::DirLock> {
        mesh_service::DirLock::acquire(&self.dir, LOCK_FILE, "an agent").map_err(|e| match e {
            mesh_service::LockError::Held { .. } => anyhow::anyhow!(
                "{e}; stop it first (`mesh down`, or `systemctl stop mesh` where the unit runs it)"
            ),
            e => e.into(),
        })
    }

    /// Whether an agent runs for this state directory (and its PID, if known).
    pub fn running_agent(&self) -> Option<Option<u32>> {
        mesh_service::DirLock::holder(&self.dir, LOCK_FILE)
    }

    /// Records that the controller removed this node.
    pub fn save_removed(&self, r: &Removed) -> anyhow::Result<()> {
        write_file(
            &self.dir.join(REMOVED_FILE),
            &serde_json::to_vec_pretty(r)?,
            0o600,
        )
    }

    /// Why the controller removed this node, if it did (and nobody joined since).
    pub fn load_removed(&self) -> Option<Removed> {
        std::fs::read(self.dir.join(REMOVED_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Forgets a removal (after a new join).
    pub fn clear_removed(&self) -> anyhow::Result<()> {
        remove_if_present(&self.dir.join(REMOVED_FILE))
    }

    /// Saves a join request that waits for approval.
    pub fn save_request(&self, r: &PendingJoin) -> anyhow::Result<()> {
        write_file(
            &self.dir.join(REQUEST_FILE),
            &serde_json::to_vec_pretty(r)?,
            0o600,
        )
    }

    /// The join request that waits for approval, if there is one.
    pub fn load_request(&self) -> anyhow::Result<Option<PendingJoin>> {
        let path = self.dir.join(REQUEST_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).with_context(|| {
                format!(
                    "{} is damaged: delete it and ask again (`mesh join NETWORK-ID`)",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Forgets the join request (approved, rejected, or replaced by another join).
    pub fn clear_request(&self) -> anyhow::Result<()> {
        remove_if_present(&self.dir.join(REQUEST_FILE))
    }

    /// Path of the local API socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET_FILE)
    }

    /// Path of the read-only local API socket (see [`crate::api::READ_ONLY_SOCKET_MODE`]).
    pub fn read_only_socket_path(&self) -> PathBuf {
        self.dir.join(READ_ONLY_SOCKET_FILE)
    }

    /// Loads the node key, or generates one (file mode 0600).
    pub fn load_or_create_key(&self) -> anyhow::Result<[u8; 32]> {
        if let Some(k) = self.load_key()? {
            return Ok(k);
        }
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
        write_file(
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
                    format!(
                        "{} is damaged (not a base64 x25519 key): restore it from a backup; without it the node must join again with a new key (`mesh leave --force`, then `mesh join`), which gives it a new overlay address unless the admin first removes the old node (`mesh-controller node remove NETWORK NAME`) so that the name keeps its address",
                        path.display()
                    )
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Saves the membership.
    pub fn save_membership(&self, m: &Membership) -> anyhow::Result<()> {
        write_file(
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
                "this node has not joined a network (no {}); run `mesh join NETWORK-ID` (or `mesh join --token-file FILE`) first",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is damaged: restore it from a backup, or join again (`mesh join --token-file FILE`; with the same node.key and --name the node keeps its address)",
                path.display()
            )
        })
    }

    /// Saves the last peer list.
    pub fn save_peers(&self, peers: &[PeerInfo]) -> anyhow::Result<()> {
        write_file(
            &self.dir.join(PEERS_FILE),
            &serde_json::to_vec(peers)?,
            0o600,
        )
    }

    /// The cached peer list (empty if none; a damaged one is a warning, not an error: the
    /// controller sends the list again).
    pub fn load_peers(&self) -> Vec<PeerInfo> {
        load_cache(&self.dir.join(PEERS_FILE), "peer list")
    }

    /// Caches the relay list with its tickets (they stay valid for hours), so that relays work
    /// after a restart while the controller is down.
    pub fn save_relays(&self, relays: &[mesh_proto::control::RelayInfo]) -> anyhow::Result<()> {
        write_file(
            &self.dir.join(RELAYS_FILE),
            &serde_json::to_vec(relays)?,
            0o600,
        )
    }

    /// Remembers whether the controller was last reached over TCP only, so that the next
    /// start (`mesh up` after `mesh join`, a restart) tries TCP at once instead of after
    /// QUIC's head start.
    pub fn save_tcp_only(&self, tcp_only: bool) -> anyhow::Result<()> {
        let path = self.dir.join(TRANSPORT_FILE);
        if tcp_only {
            write_file(&path, b"tcp\n", 0o600)
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
        }
    }

    /// Whether the controller was last reached over TCP only.
    pub fn load_tcp_only(&self) -> bool {
        std::fs::read_to_string(self.dir.join(TRANSPORT_FILE)).is_ok_and(|s| s.trim() == "tcp")
    }

    /// Caches where this node's advertised prefixes stand, so that a restart while the
    /// controller is down keeps routing the approved ones.
    pub fn save_route_states(
        &self,
        states: &[mesh_proto::control::RouteState],
    ) -> anyhow::Result<()> {
        write_file(
            &self.dir.join(ROUTES_FILE),
            &serde_json::to_vec(states)?,
            0o600,
        )
    }

    /// The cached route states (empty if none; a damaged one is a warning).
    pub fn load_route_states(&self) -> Vec<mesh_proto::control::RouteState> {
        load_cache(&self.dir.join(ROUTES_FILE), "route states")
    }

    /// Caches the network's names for several nodes, so that they resolve after a restart
    /// while the controller is down.
    pub fn save_names(&self, names: &[mesh_proto::control::NameAlias]) -> anyhow::Result<()> {
        write_file(
            &self.dir.join(NAMES_FILE),
            &serde_json::to_vec(names)?,
            0o600,
        )
    }

    /// The cached names for several nodes (empty if none; a damaged one is a warning).
    pub fn load_names(&self) -> Vec<mesh_proto::control::NameAlias> {
        load_cache(&self.dir.join(NAMES_FILE), "names")
    }

    /// The cached relay list (empty if none; a damaged one is a warning).
    pub fn load_relays(&self) -> Vec<mesh_proto::control::RelayInfo> {
        load_cache(&self.dir.join(RELAYS_FILE), "relay list")
    }

    /// Deletes everything the node stored, including temporary files a crash left behind.
    pub fn wipe(&self) -> anyhow::Result<()> {
        for f in [
            KEY_FILE,
            NODE_FILE,
            PEERS_FILE,
            RELAYS_FILE,
            ROUTES_FILE,
            NAMES_FILE,
            SOCKET_FILE,
            READ_ONLY_SOCKET_FILE,
            TRANSPORT_FILE,
            REMOVED_FILE,
            REQUEST_FILE,
            LOCK_FILE,
        ] {
            remove_if_present(&self.dir.join(f))?;
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if [KEY_FILE, NODE_FILE, PEERS_FILE, RELAYS_FILE, REQUEST_FILE]
                    .iter()
                    .any(|target| is_temp_of(&name, target))
                {
                    remove_if_present(&entry.path())?;
                } else if name.starts_with(crate::api::PRIVATE_DIR_PREFIX) {
                    // Where a daemon that was killed while binding its socket left it.
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        Ok(())
    }
}

/// A cache file's list: empty when the file is missing; when it cannot be read or parsed, a
/// warning that names it, and empty (the controller sends the list again once it answers).
fn load_cache<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Vec<T> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the cached {what}; starting without it until the controller answers");
            return Vec::new();
        }
    };
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        tracing::warn!(file = %path.display(), error = %e, "the cached {what} is damaged; starting without it until the controller answers (it is rewritten then)");
        Vec::new()
    })
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// A membership for tests (node-a, 100.64.0.7/16 in network prod).
#[cfg(test)]
pub(crate) fn sample_membership() -> Membership {
    Membership {
        controller: "192.0.2.1:7443".into(),
        controller_tcp: None,
        controller_key: PublicKey([3; 32]),
        controllers: Vec::new(),
        network: "prod".into(),
        name: "node-a".into(),
        address: std::net::Ipv4Addr::new(100, 64, 0, 7),
        prefix_len: 16,
        address6: None,
        prefix6: None,
        mtu: 1420,
        port: 51820,
        interface: "mesh0".into(),
        endpoint_interfaces: None,
        port_mapping: true,
        advertise_routes: Vec::new(),
        dns: true,
        hosts_file: false,
        advertise_exits: Vec::new(),
        use_exits: Vec::new(),
        auto_routes: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> TempDir {
            let d = std::env::temp_dir().join(format!(
                "mesh-state-test-{label}-{}-{:x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    fn membership() -> Membership {
        super::sample_membership()
    }

    #[test]
    fn writes_round_trip_with_their_modes_and_leave_no_temp_file() {
        let tmp = TempDir::new("round-trip");
        let state = StateDir::new(&tmp.0.join("mesh"));
        state.create().unwrap();
        assert_eq!(mode(state.path()), DIR_MODE);
        let key = state.load_or_create_key().unwrap();
        assert_eq!(state.load_key().unwrap(), Some(key));
        assert_eq!(state.load_or_create_key().unwrap(), key, "the key is kept");
        let m = membership();
        state.save_membership(&m).unwrap();
        assert_eq!(state.load_membership().unwrap(), m);
        // Written again over an existing file.
        let m2 = Membership {
            port: 41641,
            endpoint_interfaces: Some("eth0,!docker*".into()),
            port_mapping: false,
            ..m.clone()
        };
        state.save_membership(&m2).unwrap();
        assert_eq!(state.load_membership().unwrap(), m2);
        state.save_peers(&[]).unwrap();
        assert!(state.load_peers().is_empty());
        state.save_relays(&[]).unwrap();
        assert!(state.load_relays().is_empty());
        assert_eq!(
            names(state.path()),
            [NODE_FILE, KEY_FILE, PEERS_FILE, RELAYS_FILE]
        );
        for f in [KEY_FILE, NODE_FILE, PEERS_FILE, RELAYS_FILE] {
            assert_eq!(mode(&state.path().join(f)), 0o600, "{f}");
        }
        state.wipe().unwrap();
        assert!(!state.path().exists());
    }

    #[test]
    fn node_json_from_before_the_endpoint_interface_list_and_port_mapping_loads() {
        let old = r#"{"controller":"192.0.2.1:7443","controller_key":"AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=","network":"prod","name":"node-a","address":"100.64.0.7","prefix_len":16,"mtu":1420,"port":51820,"interface":"mesh0"}"#;
        let m: Membership = serde_json::from_str(old).unwrap();
        assert_eq!(m, membership());
        // The defaults are not written out, so older agents read the file as before.
        let text = serde_json::to_string(&m).unwrap();
        assert!(!text.contains("endpoint_interfaces"), "{text}");
        assert!(!text.contains("port_mapping"), "{text}");
    }

    /// A restart while the controller is down finds the IPv6 overlay address in node.json and
    /// the peers' in peers.json.
    #[test]
    fn the_ipv6_overlay_is_kept_across_restarts() {
        let tmp = TempDir::new("overlay6");
        let state = StateDir::new(&tmp.0.join("state"));
        state.create().unwrap();
        let mut m = membership();
        m.address6 = Some("fd12:3456:789a::7".parse().unwrap());
        m.prefix6 = Some("fd12:3456:789a::/64".parse().unwrap());
        state.save_membership(&m).unwrap();
        let text = std::fs::read_to_string(state.path().join(NODE_FILE)).unwrap();
        assert!(text.contains("fd12:3456:789a::7"), "{text}");
        assert_eq!(state.load_membership().unwrap(), m);
        let peer: PeerInfo = serde_json::from_str(
            r#"{"key":"BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=","name":"b","address":"100.64.0.4","address6":"fd12:3456:789a::4","endpoints":[]}"#,
        )
        .unwrap();
        state.save_peers(std::slice::from_ref(&peer)).unwrap();
        assert_eq!(state.load_peers()[0].address6, peer.address6);
        // A file of an IPv4-only membership has neither field.
        let plain = serde_json::to_string(&membership()).unwrap();
        assert!(
            !plain.contains("address6") && !plain.contains("prefix6"),
            "{plain}"
        );
    }

    #[test]
    fn the_mode_is_exact_even_over_a_looser_file() {
        let tmp = TempDir::new("mode");
        let path = tmp.0.join("kubelet");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_file(&path, b"new", 0o600).unwrap();
        assert_eq!(mode(&path), 0o600);
        write_file(&path, b"newer", 0o644).unwrap();
        assert_eq!(mode(&path), 0o644);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "newer");
        assert_eq!(names(&tmp.0), ["kubelet"]);
    }

    /// A file or symlink left where a fixed temporary name would be (by a crash, or planted by
    /// someone who can write to the directory) is neither followed nor reused.
    #[test]
    fn leftovers_at_temp_names_are_never_written_through() {
        let tmp = TempDir::new("leftovers");
        let state = StateDir::new(&tmp.0.join("mesh"));
        state.create().unwrap();
        let victim = tmp.0.join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        for name in ["node.tmp", "node.key.tmp", "node.json.tmp", ".node.key.tmp"] {
            std::os::unix::fs::symlink(&victim, state.path().join(name)).unwrap();
        }
        let key = state.load_or_create_key().unwrap();
        state.save_membership(&membership()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(state.load_key().unwrap(), Some(key));
        assert_eq!(mode(&state.path().join(KEY_FILE)), 0o600);
    }

    #[test]
    fn every_write_has_a_temporary_file_of_its_own() {
        let tmp = TempDir::new("unique");
        let path = tmp.0.join("node.key");
        let (a, _fa) = create_temp(&path, 0o600).unwrap();
        let (b, _fb) = create_temp(&path, 0o600).unwrap();
        let (c, _fc) = create_temp(&tmp.0.join("node.json"), 0o600).unwrap();
        assert!(a != b && b != c && a != c, "{a:?} {b:?} {c:?}");
        for p in [&a, &b, &c] {
            assert_eq!(mode(p), 0o600);
            assert_eq!(p.parent(), Some(tmp.0.as_path()));
        }
        let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(is_temp_of(&name(&a), "node.key"));
        assert!(!is_temp_of(&name(&c), "node.key"));
        // A crash leaves such files behind; leaving the network removes them too.
        let state = StateDir::new(&tmp.0);
        state.wipe().unwrap();
        assert!(!a.exists() && !b.exists() && !c.exists());
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let tmp = TempDir::new("failed");
        // The target is a directory: the rename fails, and the temporary file goes away.
        let target = tmp.0.join("node.json");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), "keep").unwrap();
        assert!(write_file(&target, b"{}", 0o600).is_err());
        assert_eq!(names(&tmp.0), ["node.json"]);
    }

    #[test]
    fn a_state_dir_every_user_may_write_to_is_refused() {
        let tmp = TempDir::new("world-writable");
        let dir = tmp.0.join("mesh");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = StateDir::new(&dir).create().unwrap_err();
        assert!(err.to_string().contains("writable by every user"), "{err}");
        // A directory an admin opened to a group keeps its mode.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        StateDir::new(&dir).create().unwrap();
        assert_eq!(mode(&dir), 0o750);
    }
}
