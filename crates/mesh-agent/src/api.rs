//! The local API between the `mesh` CLI and the running daemon: one JSON request line, one JSON
//! response line, over a Unix socket in the state directory (mode 0600).

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted.
const MAX_LINE: usize = 4096;

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Full status.
    Status,
    /// Leave the network and stop.
    Leave,
    /// Ping a peer (by name, overlay address or key) inside the tunnel.
    Ping {
        /// Name, overlay address or key.
        peer: String,
    },
}

/// The daemon is not running (no socket, or nobody listening).
#[derive(Debug, thiserror::Error)]
#[error("the mesh daemon is not running for state directory {0} (start it with `mesh up`, or `mesh join <token>`)")]
pub struct NotRunning(pub String);

/// Sends one request and returns the response.
pub async fn request(socket: &Path, req: Request) -> anyhow::Result<serde_json::Value> {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
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
    w.write_all(line.as_bytes()).await?;
    let mut reader = BufReader::new(r);
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut resp))
        .await
        .context("the daemon did not answer within 20 s")??;
    let v: serde_json::Value =
        serde_json::from_str(&resp).context("the daemon sent a malformed answer")?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{err}");
    }
    Ok(v)
}

/// Binds the socket, replacing a stale one.
pub fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            anyhow::bail!(
                "another mesh daemon is already running with this state directory ({})",
                socket.display()
            );
        }
        let _ = std::fs::remove_file(socket);
    }
    let l = UnixListener::bind(socket)
        .with_context(|| format!("cannot create the control socket {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600));
    Ok(l)
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
pub async fn write_response(stream: &mut UnixStream, v: &serde_json::Value) {
    let mut line = v.to_string();
    line.push('\n');
    let _ = stream.write_all(line.as_bytes()).await;
}
