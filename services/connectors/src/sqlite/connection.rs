//! Connection plumbing: opening a database file, and the one connection
//! every handle on it shares.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;

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

/// One connection shared by every handle on a database: SQLite runs one
/// writer at a time anyway, and a mutex queues them where separate
/// connections would spin on busy errors. Cheap to clone.
#[derive(Clone)]
pub struct SharedConnection {
    conn: Arc<Mutex<Connection>>,
}

impl SharedConnection {
    pub fn new(conn: Connection) -> Self {
        Self {
            conn: Arc::new(Mutex::new(conn)),
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
        let shared = self.clone();
        tokio::task::spawn_blocking(move || f(&mut *shared.lock()?))
            .await
            .map_err(|e| ConnectorError::terminal("sqlite", e.to_string()))?
    }
}
