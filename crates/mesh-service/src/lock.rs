//! One owner per state directory: an exclusive `flock` on a lock file inside it, held for the
//! life of the process, with the owner's PID in the file so that a second process can say who
//! holds it.
//!
//! The kernel drops the lock when the process exits, however it exits (`kill -9` included), so
//! a stale lock file never blocks a restart. The descriptor is close-on-exec: a process that
//! replaces itself (`mesh join` continuing as `mesh up`) takes the lock again after the exec.

use nix::fcntl::{Flock, FlockArg};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("{what} already runs for state directory {} (pid {})", dir.display(), pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()))]
    Held {
        /// What holds it, e.g. "an agent".
        what: &'static str,
        /// The directory.
        dir: PathBuf,
        /// The holder's PID, as it wrote it.
        pid: Option<u32>,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot lock state directory {}: {source}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// A held lock; released when dropped or when the process ends.
#[derive(Debug)]
pub struct DirLock {
    _file: Flock<std::fs::File>,
}

impl DirLock {
    /// Locks `dir` through the file `name` in it (created with mode 0600). `what` names the
    /// owner in the error ("an agent", "a controller").
    pub fn acquire(dir: &Path, name: &str, what: &'static str) -> Result<DirLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(name))
            .map_err(io)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    what,
                    dir: dir.to_owned(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err((_, e)) => return Err(io(e.into())),
        };
        let pid = std::process::id();
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{pid}"))
            .map_err(io)?;
        Ok(DirLock { _file: file })
    }

    /// Whether a process holds `dir`'s lock file `name` now, and its PID if it wrote one
    /// (`Some(None)`: held, PID unknown). Creates nothing; the check takes a shared lock for an
    /// instant, so it never keeps the owner from taking the lock for long.
    pub fn holder(dir: &Path, name: &str) -> Option<Option<u32>> {
        let file = std::fs::File::open(dir.join(name)).ok()?;
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                Some(text.trim().parse().ok())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_the_first_release_frees_it() {
        let dir = std::env::temp_dir().join(format!("mesh-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = DirLock::acquire(&dir, "test.lock", "an agent").unwrap();
        // flock locks belong to the open file description: a second open in the same
        // process conflicts like another process would.
        let err = DirLock::acquire(&dir, "test.lock", "an agent").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "an agent already runs for state directory {} (pid {})",
                dir.display(),
                std::process::id()
            )
        );
        assert_eq!(
            DirLock::holder(&dir, "test.lock"),
            Some(Some(std::process::id()))
        );
        drop(first);
        assert_eq!(DirLock::holder(&dir, "test.lock"), None);
        assert_eq!(DirLock::holder(&dir, "absent.lock"), None);
        assert!(!dir.join("absent.lock").exists(), "a check creates nothing");
        let again = DirLock::acquire(&dir, "test.lock", "an agent");
        assert!(again.is_ok());
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
