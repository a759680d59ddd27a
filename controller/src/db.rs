//! The database, on a thread of its own.
//!
//! SQLite calls block: on the disk, on the fsync of every commit, and for up to the busy
//! timeout when another process (an admin command, a backup) holds the write lock. Made from a
//! tokio task, such a call holds up the worker thread and every connection it drives: a slow
//! disk stalled heartbeats, relayed traffic and the hub's pushes alike. A [`Db`] owns one
//! [`Store`] on a dedicated thread and runs the closures it is given there, one at a time and
//! in the order they came; the caller awaits the result without blocking anything else.
//!
//! The queue is bounded ([`QUEUE`]): when the database falls behind, callers wait for room
//! (back-pressure on the connections that write) instead of piling up work without limit.

use crate::store::{Store, StoreError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tracing::error;

/// Closures waiting for the database thread, at most.
pub const QUEUE: usize = 256;

type Job = Box<dyn FnOnce(&mut Store) + Send>;

/// A handle to a store on its own thread. Cheap to clone; the thread ends when the last handle
/// is dropped (after the closures already queued ran).
#[derive(Clone)]
pub struct Db {
    jobs: mpsc::Sender<Job>,
    changes: Arc<AtomicU64>,
}

/// Runs `f` on a short-lived thread of its own and waits for it: for the database work of
/// start-up, made before the database threads exist. A call from inside the tokio runtime
/// blocks its worker for that long, and the PostgreSQL client, which runs a runtime of its own,
/// cannot run on a runtime's thread at all.
pub fn blocking<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(t) => t,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

impl Db {
    /// Moves `store` to a new thread called `name`.
    pub fn start(store: Store, name: &str) -> std::io::Result<Db> {
        let (jobs, mut queue) = mpsc::channel::<Job>(QUEUE);
        let changes = Arc::new(AtomicU64::new(store.total_changes()));
        let thread = name.to_owned();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut store = store;
                while let Some(job) = queue.blocking_recv() {
                    // A panic is a bug in one call: its caller gets an error (its reply is
                    // dropped) and the others go on with the data as it is.
                    let run = std::panic::AssertUnwindSafe(|| job(&mut store));
                    if std::panic::catch_unwind(run).is_err() {
                        error!(thread, "a database call panicked; its request failed");
                    }
                }
            })?;
        Ok(Db { jobs, changes })
    }

    /// Runs `f` on the database thread and gives back what it returned.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> R + Send + 'static,
    ) -> Result<R, StoreError> {
        let (reply, result) = oneshot::channel();
        let changes = self.changes.clone();
        let job: Job = Box::new(move |store| {
            let r = f(store);
            changes.store(store.total_changes(), Ordering::Relaxed);
            let _ = reply.send(r);
        });
        if self.jobs.send(job).await.is_err() {
            return Err(gone());
        }
        result.await.map_err(|_| gone())
    }

    /// [`Db::call`] for the store's own fallible calls.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.call(f).await?
    }

    /// Rows changed through this store since it was opened, as of the last call.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }
}

fn gone() -> StoreError {
    StoreError::Invalid("the database call failed (see the controller's log)".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn store() -> (std::path::PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!(
            "mesh-db-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mesh.db");
        (dir, Store::open(&path).unwrap())
    }

    /// While another process holds the database's write lock (an admin command's transaction),
    /// a write waits for it on the database thread, and the runtime's only worker goes on
    /// running everything else meanwhile.
    #[tokio::test(flavor = "current_thread")]
    async fn a_locked_database_holds_up_its_callers_and_nothing_else() {
        let (dir, store) = store();
        let db = Db::start(store, "test-db").unwrap();
        let admin = rusqlite::Connection::open(dir.join("mesh.db")).unwrap();
        admin.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let write = tokio::spawn({
            let db = db.clone();
            async move {
                db.run(|s| s.create_network("prod", "100.64.0.0/16".parse().unwrap(), 1))
                    .await
            }
        });
        // Ticks of 10 ms on the same (single) worker while the write waits.
        let ticks = tokio::spawn(async {
            let mut n = 0u32;
            let mut every = tokio::time::interval(Duration::from_millis(10));
            let end = tokio::time::Instant::now() + Duration::from_millis(500);
            while tokio::time::Instant::now() < end {
                every.tick().await;
                n += 1;
            }
            n
        });
        let n = ticks.await.unwrap();
        assert!(n >= 25, "the worker ran {n} ticks of 10 ms in 500 ms");
        assert!(!write.is_finished(), "the write did not wait for the lock");
        admin.execute_batch("COMMIT").unwrap();
        write.await.unwrap().unwrap();
        let names = db
            .run(|s| s.networks())
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.name)
            .collect::<Vec<_>>();
        assert_eq!(names, ["prod"], "the write landed once the lock was gone");
        assert!(db.changes() > 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_that_panics_fails_alone() {
        let (dir, store) = store();
        let db = Db::start(store, "test-db").unwrap();
        let failed = db.call(|_| -> u32 { panic!("a bug") }).await;
        assert!(failed.is_err());
        assert_eq!(db.call(|_| 7).await.unwrap(), 7, "the thread goes on");
        let _ = std::fs::remove_dir_all(dir);
    }
}
