//! Connection plumbing: opening a database file, and the one connection
//! every handle on it shares.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::Semaphore;

use crate::error::{ConnectorError, ConnectorResult};

/// How long a statement waits for another connection's lock before failing
/// with `DatabaseBusy` (a retryable error).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens (creating) the database file at `path` in WAL mode with
/// [`BUSY_TIMEOUT`]: WAL lets readers run beside the writer and, with
/// `synchronous = NORMAL`, survives a killed process without losing a
/// committed transaction. Every embedded store of Tidemark opens its file
/// here; each sets its own `synchronous` and schema.
///
/// # Errors
/// When the file cannot be opened or switched to WAL.
pub fn open_file(path: &Path) -> ConnectorResult<Connection> {
    // A data directory given by configuration may not exist yet (the
    // verifier failed to start on a fresh one).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            ConnectorError::invalid(
                "sqlite",
                format!("cannot create the directory {}: {e}", dir.display()),
            )
        })?;
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch("PRAGMA journal_mode = WAL;")?;
    Ok(conn)
}

/// Blocking-pool tasks one connection may have at once: one running, the
/// others already waiting on its mutex, so the connection passes from one
/// to the next without a trip through the async runtime. With only two
/// (one running, one ready) each hand-over waited for a runtime worker on
/// a busy machine, and the soak's stats p99 rose from 28 ms to seconds.
const BLOCKING_TASKS: usize = 16;

/// One connection shared by every handle on a database: SQLite runs one
/// writer at a time anyway, and a mutex queues them where separate
/// connections would spin on busy errors. Cheap to clone.
///
/// Calls through [`Self::run`] wait for the connection as tasks, not as
/// threads: only [`BLOCKING_TASKS`] of them are handed to the blocking pool
/// at once. Each used to take a pool thread that then blocked on the mutex,
/// so a burst of requests grew the pool toward its 512 threads (376 in the
/// stats-aggregator of the soak, its resident memory 1.25× the first
/// minutes').
#[derive(Clone)]
pub struct SharedConnection {
    conn: Arc<Mutex<Connection>>,
    blocking: Arc<Semaphore>,
}

impl SharedConnection {
    pub fn new(conn: Connection) -> Self {
        Self {
            conn: Arc::new(Mutex::new(conn)),
            blocking: Arc::new(Semaphore::new(BLOCKING_TASKS)),
        }
    }

    /// The connection, on the calling thread: for callers whose statements
    /// take microseconds, less than a hop to the blocking pool.
    ///
    /// # Errors
    /// When a previous holder panicked.
    pub fn lock(&self) -> ConnectorResult<MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| ConnectorError::terminal("sqlite", "connection lock poisoned"))
    }

    /// Runs `f` with the connection on the blocking pool, so a commit's
    /// fsync never stalls the async runtime.
    ///
    /// # Errors
    /// What `f` returns; a terminal error when the lock is poisoned or the
    /// task panicked.
    pub async fn run<T, F>(&self, f: F) -> ConnectorResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> ConnectorResult<T> + Send + 'static,
    {
        let permit = Arc::clone(&self.blocking)
            .acquire_owned()
            .await
            .map_err(|e| ConnectorError::terminal("sqlite", e.to_string()))?;
        let shared = self.clone();
        tokio::task::spawn_blocking(move || {
            // Held until the statement is done, even if the caller stopped
            // waiting for it.
            let _permit = permit;
            f(&mut *shared.lock()?)
        })
        .await
        .map_err(|e| ConnectorError::terminal("sqlite", e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of this process, from /proc (Linux).
    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
    }

    #[test]
    fn a_burst_of_calls_waits_as_tasks_not_as_blocking_threads() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shared = SharedConnection::new(Connection::open_in_memory().unwrap());
        let before = threads();
        let peak = runtime.block_on(async {
            let calls: Vec<_> = (0..200)
                .map(|_| {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        shared
                            .run(|_| {
                                std::thread::sleep(Duration::from_millis(2));
                                Ok(())
                            })
                            .await
                    })
                })
                .collect();
            let mut peak = 0;
            while calls.iter().any(|c| !c.is_finished()) {
                peak = peak.max(threads());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            for call in calls {
                call.await.unwrap().unwrap();
            }
            peak
        });
        // Without the bound, each waiting call held a pool thread: about
        // 200 more threads at the peak.
        assert!(
            peak.saturating_sub(before) < 40,
            "{before} threads before the burst, {peak} at its peak"
        );
    }
}
