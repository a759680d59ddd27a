//! The local API between the `mesh` CLI and the running daemon: one JSON request line, one JSON
//! response line, over the Unix socket `<state-dir>/mesh.sock`.
//!
//! Who may use it: root, the daemon's own user, and members of the socket's group, which is the
//! state directory's group. The socket has mode 0660 ([`SOCKET_MODE`]); it is bound inside a
//! private directory (0700), given its group and mode there, and only then renamed into place,
//! so it is never reachable with a wider mode. The kernel enforces the mode at `connect`; the
//! daemon checks every caller's credentials again (`SO_PEERCRED`) and answers others with a
//! one-line refusal. The state directory that `mesh` creates is 0700 (root only); to let a group
//! use `mesh status` and `mesh ping`, give the directory that group and mode 0750 (see
//! `deploy/README.md`).

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

/// Longest request line accepted.
const MAX_LINE: usize = 4096;

/// Mode of the socket: the daemon's user and the socket's group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// Mode of the read-only socket (`status.sock`): every local user may connect; it answers
/// [`Request::read_only`] requests only (`mesh status`, `mesh ip PEER`, `mesh ping`), as
/// `tailscale status` works for every user.
pub const READ_ONLY_SOCKET_MODE: u32 = 0o666;

/// Name prefix of the private directory the socket is bound in, in the state directory.
pub const PRIVATE_DIR_PREFIX: &str = ".sock-";

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Full status.
    Status,
    /// Leave the network and stop. `force`: also when the controller cannot be told.
    Leave {
        /// Leave even if the controller does not confirm within a few seconds.
        #[serde(default)]
        force: bool,
    },
    /// Stop the daemon without leaving: mesh0 goes, the state stays (`mesh up` resumes).
    Down,
    /// Change the prefixes this node advertises (subnet routes): add `advertise`, remove
    /// `withdraw`; the controller is told at once, and the list is saved.
    Routes {
        /// Prefixes to add.
        #[serde(default)]
        advertise: Vec<String>,
        /// Prefixes to remove.
        #[serde(default)]
        withdraw: Vec<String>,
    },
    /// Ping a peer (by name, overlay address or key) inside the tunnel.
    Ping {
        /// Name, overlay address or key.
        peer: String,
    },
}

impl Request {
    /// Whether the request only reads (anyone may send it, on the read-only socket).
    pub fn read_only(&self) -> bool {
        matches!(self, Request::Status | Request::Ping { .. })
    }
}

/// The daemon is not running (no socket, or nobody listening).
#[derive(Debug, thiserror::Error)]
#[error("the mesh daemon is not running for state directory {0} (start it with `mesh up`, or `mesh join --token-file FILE`)")]
pub struct NotRunning(pub String);

/// The caller may not use the daemon's socket.
#[derive(Debug, thiserror::Error)]
pub enum NotAllowed {
    /// The kernel refused the connection (the socket's or the directory's mode).
    #[error("permission denied on {socket}: talking to the mesh daemon needs root or membership in group {group}; run the command with sudo, or ask an admin to add this user to group {group}")]
    Kernel {
        /// The socket path.
        socket: String,
        /// The group that may use it.
        group: String,
    },
    /// The daemon refused the caller (its credentials); the daemon's message.
    #[error("{0}")]
    Daemon(String),
}

/// Sends a read-only request on `socket`, or, when this user may not use it, on the read-only
/// socket `read_only` (which an older daemon may not have: then the first refusal stands).
pub async fn query(
    socket: &Path,
    read_only: &Path,
    req: Request,
) -> anyhow::Result<serde_json::Value> {
    match request(socket, req.clone()).await {
        Err(e) if e.downcast_ref::<NotAllowed>().is_some() && req.read_only() => {
            match request(read_only, req).await {
                Err(second) if second.downcast_ref::<NotRunning>().is_some() => Err(e),
                r => r,
            }
        }
        r => r,
    }
}

/// Sends one request and returns the response.
pub async fn request(socket: &Path, req: Request) -> anyhow::Result<serde_json::Value> {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(NotAllowed::Kernel {
                socket: socket.display().to_string(),
                group: socket_group(socket),
            }
            .into());
        }
        Err(_) => {
            let dir = socket
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(NotRunning(dir).into());
        }
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(&req)?;
    line.push('\n');
    // A daemon that refuses the caller closes at once; its answer below says why.
    let _ = w.write_all(line.as_bytes()).await;
    let mut reader = BufReader::new(r);
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut resp))
        .await
        .context("the daemon did not answer within 20 s")??;
    let v: serde_json::Value =
        serde_json::from_str(&resp).context("the daemon sent a malformed answer")?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        if v["denied"] == true {
            return Err(NotAllowed::Daemon(err.to_owned()).into());
        }
        anyhow::bail!("{err}");
    }
    Ok(v)
}

/// The name of the group that may use `socket`: the socket's group, else (when the caller may
/// not even look into the state directory) the directory's, which the daemon gives the socket.
fn socket_group(socket: &Path) -> String {
    let gid = std::fs::metadata(socket)
        .or_else(|_| std::fs::metadata(socket.parent().unwrap_or(Path::new("."))))
        .map(|m| m.gid());
    match gid {
        Ok(gid) => group_name(gid),
        Err(_) => "root".to_owned(),
    }
}

/// The name of group `gid` from `/etc/group`, else the number.
fn group_name(gid: u32) -> String {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?;
            (id.parse::<u32>().ok()? == gid).then(|| name.to_owned())
        })
        .unwrap_or_else(|| gid.to_string())
}

/// Who may use the socket, besides root.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Access {
    /// The daemon's own user (the socket's owner).
    owner_uid: u32,
    /// The socket's group.
    gid: u32,
    /// Every local user (the read-only socket).
    everyone: bool,
}

/// A caller, from `SO_PEERCRED` (and `/proc/<pid>/status` for its supplementary groups).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Caller {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl Access {
    fn allows(&self, c: &Caller) -> bool {
        self.everyone
            || c.uid == 0
            || c.uid == self.owner_uid
            || c.gid == self.gid
            || c.groups.contains(&self.gid)
    }
}

/// The supplementary groups of process `pid` (empty if unknown).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The daemon's end of the socket: hands out only connections whose caller may use it.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    access: Access,
    refusal: String,
}

impl Listener {
    /// The next connection of an allowed caller. Callers that may not use the API get a
    /// one-line refusal (written without waiting) and are dropped. Cancel-safe.
    pub async fn accept(&self) -> std::io::Result<(UnixStream, ())> {
        loop {
            let (stream, _) = self.inner.accept().await?;
            let caller = match stream.peer_cred() {
                Ok(c) => Caller {
                    uid: c.uid(),
                    gid: c.gid(),
                    groups: c.pid().map(supplementary_groups).unwrap_or_default(),
                },
                Err(e) => {
                    debug!(error = %e, "local API: no peer credentials; connection refused");
                    continue;
                }
            };
            if self.access.allows(&caller) {
                return Ok((stream, ()));
            }
            debug!(
                uid = caller.uid,
                gid = caller.gid,
                "local API: caller refused"
            );
            let _ = stream.try_write(self.refusal.as_bytes());
        }
    }
}

/// Binds the socket with its final group and mode before it is reachable, replacing a stale
/// one; refuses when another daemon answers on it.
pub fn bind(socket: &Path) -> anyhow::Result<Listener> {
    bind_as(socket, false)
}

/// Binds the read-only socket (mode [`READ_ONLY_SOCKET_MODE`]), like [`bind`].
pub fn bind_read_only(socket: &Path) -> anyhow::Result<Listener> {
    bind_as(socket, true)
}

fn bind_as(socket: &Path, read_only: bool) -> anyhow::Result<Listener> {
    if socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!(
            "another mesh daemon is already running with this state directory ({})",
            socket.display()
        );
    }
    let dir = socket.parent().unwrap_or(Path::new("."));
    let private = dir.join(format!("{PRIVATE_DIR_PREFIX}{:08x}", rand::random::<u32>()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("cannot create the control socket in {}", dir.display()))?;
    let result = bind_in(&private.join("s"), socket, dir, read_only);
    let _ = std::fs::remove_file(private.join("s"));
    let _ = std::fs::remove_dir(&private);
    result
}

/// Binds at `tmp` (in a private directory), sets group and mode, renames it to `socket`.
fn bind_in(tmp: &Path, socket: &Path, dir: &Path, read_only: bool) -> anyhow::Result<Listener> {
    let mode = if read_only {
        READ_ONLY_SOCKET_MODE
    } else {
        SOCKET_MODE
    };
    let cannot = || format!("cannot create the control socket {}", socket.display());
    let std_listener = std::os::unix::net::UnixListener::bind(tmp).with_context(cannot)?;
    std_listener.set_nonblocking(true).with_context(cannot)?;
    let dir_gid = std::fs::metadata(dir).with_context(cannot)?.gid();
    if let Err(e) = std::os::unix::fs::chown(tmp, None, Some(dir_gid)) {
        warn!(error = %e, gid = dir_gid, "cannot give the control socket the state directory's group; only root and this daemon's user can use it");
    }
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode)).with_context(cannot)?;
    let meta = std::fs::metadata(tmp).with_context(cannot)?;
    let access = Access {
        owner_uid: meta.uid(),
        gid: meta.gid(),
        everyone: read_only,
    };
    std::fs::rename(tmp, socket).with_context(cannot)?;
    let group = group_name(access.gid);
    let mut refusal = serde_json::json!({
        "error": format!(
            "permission denied: the mesh daemon answers only root and members of group {group} (socket {}); run the command with sudo, or ask an admin to add this user to group {group}",
            socket.display()
        ),
        "denied": true,
    })
    .to_string();
    refusal.push('\n');
    let inner = UnixListener::from_std(std_listener).with_context(cannot)?;
    debug!(socket = %socket.display(), group = %group, mode = format!("{mode:o}"), "local API listening");
    Ok(Listener {
        inner,
        access,
        refusal,
    })
}

/// Reads one request from a connection; `None` for a malformed or oversized one.
pub async fn read_request(stream: &mut UnixStream) -> Option<Request> {
    let mut reader = BufReader::new(stream).take(MAX_LINE as u64);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .ok()?
        .ok()?;
    serde_json::from_str(&line).ok()
}

/// Writes one response.
pub async fn write_response(stream: &mut UnixStream, v: &impl serde::Serialize) {
    let Ok(mut line) = serde_json::to_vec(v) else {
        return;
    };
    line.push(b'\n');
    let _ = stream.write_all(&line).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_the_owner_and_the_group_may_use_the_socket() {
        let access = Access {
            owner_uid: 0,
            gid: 4242,
            everyone: false,
        };
        let caller = |uid, gid, groups: &[u32]| Caller {
            uid,
            gid,
            groups: groups.to_vec(),
        };
        assert!(access.allows(&caller(0, 0, &[])));
        assert!(access.allows(&caller(1000, 4242, &[])));
        assert!(access.allows(&caller(1000, 1000, &[27, 4242])));
        assert!(!access.allows(&caller(1000, 1000, &[27])));
        assert!(!access.allows(&caller(65534, 65534, &[])));
        let own = Access {
            owner_uid: 1000,
            gid: 1000,
            everyone: false,
        };
        assert!(own.allows(&caller(1000, 50, &[])));
        assert!(!own.allows(&caller(1001, 50, &[])));
        let everyone = Access {
            everyone: true,
            ..own
        };
        assert!(everyone.allows(&caller(65534, 65534, &[])));
        assert!(Request::Status.read_only());
        assert!(Request::Ping { peer: "b".into() }.read_only());
        assert!(!Request::Leave { force: true }.read_only());
        assert!(!Request::Down.read_only());
    }

    #[test]
    fn group_names_come_from_etc_group() {
        assert_eq!(group_name(0), "root");
        assert_eq!(group_name(4_000_000_000), "4000000000");
    }

    #[test]
    fn this_process_has_its_groups_in_proc() {
        let groups = supplementary_groups(std::process::id() as i32);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        assert_eq!(groups.len(), line.split_whitespace().count() - 1, "{line}");
    }

    #[tokio::test]
    async fn the_socket_has_its_mode_and_group_and_answers_its_owner() {
        let dir = std::env::temp_dir().join(format!(
            "mesh-api-test-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("mesh.sock");
        // A stale socket from a crashed daemon is replaced.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let listener = bind(&socket).unwrap();
        let meta = std::fs::metadata(&socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, SOCKET_MODE);
        assert_eq!(meta.gid(), std::fs::metadata(&dir).unwrap().gid());
        // Nothing else is left in the directory (the private one is gone).
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["mesh.sock"]);
        // A second daemon on the same directory is refused.
        let err = bind(&socket).unwrap_err();
        assert!(err.to_string().contains("already running"), "{err}");

        let server = tokio::spawn(async move {
            // The first connection is the second `bind`'s probe, which says nothing.
            loop {
                let (mut stream, ()) = listener.accept().await.unwrap();
                if let Some(req) = read_request(&mut stream).await {
                    let v = serde_json::json!({"got": format!("{req:?}")});
                    write_response(&mut stream, &v).await;
                    break;
                }
            }
        });
        let v = request(&socket, Request::Status).await.unwrap();
        assert_eq!(v["got"], "Status");
        server.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
