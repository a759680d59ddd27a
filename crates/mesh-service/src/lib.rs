//! What `mesh` and `mesh-controller` set up the same way.
//!
//! - [`init_logging`]: tracing to stderr, filtered by `MESH_LOG` (else the configured level),
//!   colours only on a terminal, no timestamps under journald (which stamps every line).
//! - [`load_config`]: a TOML configuration file whose every key is optional; errors are one
//!   line naming the file and the line.
//! - [`DirLock`]: one process per state directory.

mod lock;

pub use lock::{DirLock, LockError};

use anyhow::Context as _;
use serde::de::DeserializeOwned;
use std::path::Path;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Sets up logging; `default` is the filter when `MESH_LOG` is not set (e.g. "info").
pub fn init_logging(default: &str) {
    // quinn-udp logs a failed sendmsg as a Rust Debug dump (`Os { code: 101, .. }`) once a
    // minute; mesh reports the cause in its own words where it matters (see the agent's
    // dialer), so by default those lines stay out of the log.
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default},quinn_udp=error"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    // Under systemd, stderr goes to the journal, which stamps every line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().finish().with(quiet_repeats()).init();
    } else {
        builder.finish().with(quiet_repeats()).init();
    }
}

/// How often one of boringtun's warnings may appear (each says the same thing every 5 s while
/// a peer does not answer).
const REPEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// A filter that lets each warning of boringtun's through at most once per [`REPEAT_INTERVAL`]
/// (mesh's own lines are left alone).
fn quiet_repeats() -> tracing_subscriber::filter::FilterFn<
    impl Fn(&tracing::Metadata<'_>) -> bool + Send + Sync + 'static,
> {
    let last = std::sync::Mutex::new(std::collections::HashMap::new());
    tracing_subscriber::filter::filter_fn(move |meta| {
        if !meta.is_event() || !meta.target().starts_with("boringtun") {
            return true;
        }
        let now = std::time::Instant::now();
        let Ok(mut last) = last.lock() else {
            return true;
        };
        match last.get(&meta.callsite()) {
            Some(t) if now.saturating_duration_since(*t) < REPEAT_INTERVAL => false,
            _ => {
                last.insert(meta.callsite(), now);
                true
            }
        }
    })
}

/// Reads the configuration file at `path`. With `explicit` false (the default path, not one
/// the user named), a missing file means "all defaults".
pub fn load_config<T: DeserializeOwned + Default>(
    path: &Path,
    explicit: bool,
) -> anyhow::Result<T> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(T::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read config {}", path.display())),
    };
    toml::from_str(&text).map_err(|e| anyhow::anyhow!(one_line(path, &text, &e)))
}

/// A TOML error as one line: file, line number, message.
fn one_line(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    match line {
        Some(l) => format!(
            "invalid config {} line {l}: {}",
            path.display(),
            e.message().trim()
        ),
        None => format!("invalid config {}: {}", path.display(), e.message().trim()),
    }
}
