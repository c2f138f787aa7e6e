//! Connection plumbing: opening a database file, and the one connection
//! every handle on it shares.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::config::DbConfig;
use tokio::sync::oneshot;

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
    // Plans that do not depend on the values bound. Without this SQLite
    // plans `LIMIT ?` (and other parameters it can fold) with the value
    // bound, so binding another value expires the statement and the next
    // step parses and plans it again: every page a store reads re-prepared
    // its cached statement (measured in the job-tracker's claims: half of
    // the cost of its queries, 6 % of the whole bench's CPU).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(conn)
}

/// A transaction that writes: `BEGIN IMMEDIATE` takes the write lock at the
/// start, waiting up to [`BUSY_TIMEOUT`] for another connection's writer
/// (another process on the file, or another service of `tidemark dev`). A
/// deferred transaction that reads first fails at once with "database is
/// locked" when it then writes after another connection did, whatever the
/// timeout.
///
/// # Errors
/// The lock not had within the timeout.
pub fn write_transaction(conn: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}

/// A call waiting for the connection, as the worker thread runs it.
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// One connection shared by every handle on a database: SQLite runs one
/// writer at a time anyway, and a mutex queues them where separate
/// connections would spin on busy errors. Cheap to clone.
///
/// Async callers ([`SharedConnection::run`]) hand their statements to one
/// worker thread per connection through a queue, so a commit's fsync never
/// stalls the runtime and a burst of callers costs queue entries, not
/// threads: with one blocking-pool thread per waiting call, a busy
/// stats-aggregator held ~400 threads parked on this mutex and grew its
/// memory with them. The thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct SharedConnection {
    // Dropped before `jobs`: see `with_guard`.
    conn: Arc<Mutex<Connection>>,
    jobs: mpsc::Sender<Job>,
}

impl SharedConnection {
    /// Shares `conn` and starts its worker thread.
    ///
    /// # Panics
    /// When the operating system refuses a new thread.
    pub fn new(conn: Connection) -> Self {
        Self::with_guard(conn, ())
    }

    /// [`SharedConnection::new`], keeping `guard` until the connection has
    /// closed: the worker thread drops it right after, once every handle is
    /// gone. For what must outlive the connection, such as another
    /// descriptor on its file: closing one releases every POSIX lock the
    /// process holds on the file, SQLite's included.
    ///
    /// # Panics
    /// When the operating system refuses a new thread.
    pub fn with_guard(conn: Connection, guard: impl Send + 'static) -> Self {
        let conn = Arc::new(Mutex::new(conn));
        let (jobs, queue) = mpsc::channel::<Job>();
        let worker = Arc::clone(&conn);
        std::thread::Builder::new()
            .name("tm-sqlite".into())
            .spawn(move || {
                for job in queue {
                    // A poisoned lock still holds a usable connection (see
                    // `lock`).
                    let mut conn = worker.lock().unwrap_or_else(PoisonError::into_inner);
                    // A panic in one call fails that call (its answer is
                    // dropped), not every later one.
                    let _ = catch_unwind(AssertUnwindSafe(|| job(&mut conn)));
                }
                // The queue ends with the last handle, and a handle lets go
                // of the connection before its sender (field order): this
                // is the last reference, and dropping it closes the file.
                drop(worker);
                drop(guard);
            })
            .expect("start the SQLite worker thread");
        Self { conn, jobs }
    }

    /// The connection, on the calling thread: for callers whose statements
    /// take microseconds, less than a hop to the worker thread. A lock
    /// poisoned by a panicking holder is taken all the same: that holder's
    /// transaction was rolled back when its `Transaction` dropped.
    ///
    /// # Errors
    /// None today; kept so callers need not change if one appears.
    pub fn lock(&self) -> ConnectorResult<MutexGuard<'_, Connection>> {
        Ok(self.conn.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Runs `f` with the connection on its worker thread, in the order the
    /// calls were made.
    ///
    /// # Errors
    /// What `f` returns; a terminal error when `f` panicked.
    pub async fn run<T, F>(&self, f: F) -> ConnectorResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> ConnectorResult<T> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            // The caller may have gone (its RPC cancelled); the statement
            // has run all the same, as it would have on the blocking pool.
            let _ = answer.send(f(conn));
        });
        self.jobs
            .send(job)
            .map_err(|_| ConnectorError::terminal("sqlite", "the connection's worker stopped"))?;
        answered
            .await
            .map_err(|_| ConnectorError::terminal("sqlite", "a call on the connection panicked"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> SharedConnection {
        SharedConnection::new(Connection::open_in_memory().unwrap())
    }

    /// Signals when it is dropped.
    struct Witness(mpsc::Sender<()>);

    impl Drop for Witness {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    #[test]
    fn the_guard_outlives_every_handle_and_the_connection() {
        let (dropped, witness) = mpsc::channel();
        let conn =
            SharedConnection::with_guard(Connection::open_in_memory().unwrap(), Witness(dropped));
        let other = conn.clone();
        let weak = Arc::downgrade(&conn.conn);
        drop(conn);
        assert!(
            witness.recv_timeout(Duration::from_millis(200)).is_err(),
            "dropped while a handle was left"
        );
        other
            .lock()
            .unwrap()
            .execute_batch("CREATE TABLE t (n INTEGER)")
            .unwrap();
        drop(other);
        witness
            .recv_timeout(Duration::from_secs(10))
            .expect("the guard is dropped once the last handle is");
        assert_eq!(weak.strong_count(), 0, "the connection closed first");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_waiting_calls_share_one_worker_thread() {
        let conn = shared();
        conn.run(|c| Ok(c.execute_batch("CREATE TABLE t (n INTEGER)")?))
            .await
            .unwrap();
        let threads = |_: &mut Connection| -> ConnectorResult<String> {
            Ok(std::thread::current().name().unwrap_or("").to_owned())
        };
        let calls = (0..500).map(|n| {
            let conn = conn.clone();
            tokio::spawn(async move {
                conn.run(move |c| {
                    c.execute("INSERT INTO t (n) VALUES (?1)", [n])?;
                    threads(c)
                })
                .await
            })
        });
        let names: Vec<String> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        assert!(names.iter().all(|n| n == "tm-sqlite"), "{names:?}");
        let rows: i64 = conn
            .run(|c| Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(rows, 500);
    }

    /// Two connections on one file (two processes, or two services of
    /// `tidemark dev`) writing the same items with read-then-write
    /// transactions: each waits for the other's lock instead of failing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writers_on_two_connections_wait_for_each_other() {
        use crate::value::{AttrValue, Item, KeySchema};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shared.db");
        let writers = (0..2).map(|w| {
            let table = crate::sqlite::EmbeddedStore::open(&file)
                .unwrap()
                .table("items", KeySchema::new("id", None));
            tokio::spawn(async move {
                for round in 0..150 {
                    let items: Vec<Item> = (0..10)
                        .map(|i| {
                            [
                                ("id".to_owned(), AttrValue::s(format!("item-{i}"))),
                                ("by".to_owned(), AttrValue::s(format!("{w}/{round}"))),
                            ]
                            .into()
                        })
                        .collect();
                    table.put_all(items).await?;
                }
                ConnectorResult::Ok(())
            })
        });
        for done in futures::future::join_all(writers).await {
            done.unwrap()
                .expect("no write fails on the other connection's lock");
        }
    }

    /// A cached statement read page by page, with another limit and
    /// another key each time, runs as prepared: binding new values does not
    /// make SQLite parse and plan it again.
    #[test]
    fn cached_statements_are_not_prepared_again_for_new_values() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_file(&dir.path().join("pages.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE t (k TEXT PRIMARY KEY) WITHOUT ROWID;
             INSERT INTO t VALUES ('a'), ('b'), ('c'), ('d');",
        )
        .unwrap();
        let sql = "SELECT k FROM t WHERE k > ?1 ORDER BY k LIMIT ?2";
        for (after, limit, rows) in [("", 1, 1), ("a", 2, 2), ("b", 3, 2), ("", 4, 4)] {
            let mut stmt = conn.prepare_cached(sql).unwrap();
            let keys: Vec<String> = stmt
                .query_map(rusqlite::params![after, limit], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(keys.len(), rows);
            assert_eq!(
                stmt.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "re-prepared after binding ({after:?}, {limit})"
            );
        }
    }

    #[tokio::test]
    async fn a_panicking_call_fails_alone() {
        let conn = shared();
        let err = conn
            .run(|_| -> ConnectorResult<()> { panic!("boom") })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        let one: i64 = conn
            .run(|c| Ok(c.query_row("SELECT 1", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(one, 1);
        // The lock the panic poisoned is usable from the calling thread too.
        let two: i64 = conn
            .lock()
            .unwrap()
            .query_row("SELECT 2", [], |r| r.get(0))
            .unwrap();
        assert_eq!(two, 2);
    }
}
