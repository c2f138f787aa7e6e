//! The job-tracker's storage: a small partitioned key-value store with
//! per-record revisions and atomic conditional multi-record writes. Every
//! rule of the job-tracker is written once on top of it (in `engine`), and
//! two implementations keep the records: SQLite (embedded, the default) and
//! a single DynamoDB table (shared by several replicas, every write a
//! conditional write or TransactWriteItems).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use async_trait::async_trait;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Delete, TransactWriteItem, Update};
use rusqlite::{OptionalExtension, params};
use tidemark_connectors::sqlite::{BUSY_TIMEOUT, SharedConnection, open_file};
use tidemark_connectors::{ConnectorError, KeySchema, dynamodb};

/// A stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub sk: String,
    /// Starts at 1 and grows by one on every write.
    pub rev: u64,
    pub body: String,
}

/// What a write expects of the record it touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The record must not exist.
    Absent,
    /// The record must exist at exactly this revision.
    Rev(u64),
    /// No expectation.
    Any,
}

#[derive(Clone, Debug)]
pub enum Op {
    Put {
        pk: String,
        sk: String,
        body: String,
        expect: Expect,
    },
    Delete {
        pk: String,
        sk: String,
        expect: Expect,
    },
    /// Only checks the expectation (guards a write on another record).
    Check {
        pk: String,
        sk: String,
        expect: Expect,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// An expectation did not hold: someone else wrote first.
    #[error("conflicting write")]
    Conflict,
    /// A fault of the store, as its connector classified it (retryable,
    /// not found, terminal…); the kit's error table gives it its code.
    #[error(transparent)]
    Store(ConnectorError),
    /// A record this store cannot read back, or its own set-up failing.
    #[error("storage failure: {0}")]
    Failed(String),
}

pub type KvResult<T> = Result<T, KvError>;

/// Both stores' errors as the connector layer classifies them, in the terms
/// the engine acts on: a failed condition is a conflict to retry on fresh
/// reads; throttling, timeouts and a busy database are temporary.
impl From<ConnectorError> for KvError {
    fn from(e: ConnectorError) -> Self {
        match e {
            ConnectorError::Precondition(_) => Self::Conflict,
            other => Self::Store(other),
        }
    }
}

#[async_trait]
pub trait KvStore: Send + Sync {
    async fn get(&self, pk: &str, sk: &str) -> KvResult<Option<Entry>>;
    /// Records of `pk` whose sort key starts with `prefix`, in sort-key
    /// order, after `after` when given, at most `limit`.
    async fn query(
        &self,
        pk: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> KvResult<Vec<Entry>>;
    /// Applies every op or none; `Conflict` when an expectation fails.
    async fn transact(&self, ops: Vec<Op>) -> KvResult<()>;
    /// Cheap reachability probe for health.
    async fn ping(&self) -> KvResult<()>;
}

/// All records of `pk` under `prefix` (pages through `query`).
pub async fn query_all(store: &dyn KvStore, pk: &str, prefix: &str) -> KvResult<Vec<Entry>> {
    let mut out: Vec<Entry> = Vec::new();
    loop {
        let after = out.last().map(|e| e.sk.clone());
        let page = store.query(pk, prefix, after.as_deref(), 500).await?;
        let done = page.len() < 500;
        out.extend(page);
        if done {
            return Ok(out);
        }
    }
}

// ---------------------------------------------------------------- SQLite

/// The embedded store: one SQLite file.
pub struct SqliteKv {
    conn: SharedConnection,
    /// Closed by the checkpointer while it restarts the WAL under the
    /// connection's lock (see [`Checkpointer`]): requests wait for it here,
    /// as tasks, rather than on the lock, where they would block the
    /// runtime's worker threads and with them every other request, health
    /// check and, in `tidemark dev`, the other services of the process.
    gate: Gate,
    _checkpointer: Checkpointer,
}

/// Requests read-lock it; the WAL restart write-locks it.
type Gate = Arc<tokio::sync::RwLock<()>>;

/// Keeps the WAL short with as little of the work as possible on a
/// request's path. SQLite's automatic checkpoint would run inside whichever
/// commit crossed the threshold (measured: the p99 of a claim), so a thread
/// of its own checkpoints every [`CHECKPOINT_EVERY`]:
///
/// 1. a PASSIVE checkpoint on its own connection copies the bulk of the WAL
///    into the database file while requests go on;
/// 2. once the WAL has grown to [`WAL_SIZE_LIMIT`], the database file is
///    synced and a second PASSIVE copies what was committed meanwhile, twice
///    (tens of milliseconds of claims, then a few), still without holding
///    requests up;
/// 3. then a RESTART checkpoint on the writer's connection, under its lock,
///    copies the few frames committed since, so the next commit writes the
///    WAL from its start again.
///
/// Requests wait for step 3: two fsyncs under the lock (the WAL's, then the
/// database file's) and SQLite's fsync of the new WAL header in the first
/// commit after it, which the checkpointer makes itself (it counts the
/// restarts in `wal_restarts`). They wait as tasks, at [`SqliteKv`]'s gate.
/// The database file's fsync is the long one: a PASSIVE checkpoint syncs the
/// file only when it catches up with the last commit, which under load it
/// never does, so every page copied since the last restart is still to be
/// written (measured on this project's 2-core machines: 0.2 ms to sync one
/// dirty page, 27 ms to sync 16 MB). Step 2 therefore syncs the file itself,
/// twice, each followed by a PASSIVE, before the lock is taken, so the
/// RESTART syncs only the last copy's pages (measured at 2,000 claims +
/// checkpoints a second: the lock held 9 ms at the median without it, 5 ms
/// with it). The stall must still come seldom: step 2 keeps what is copied
/// under the lock small (measured at 2,000 claims/s, before the header's
/// commit moved here: the lock was held 7-110 ms without it, 13-23 ms with
/// it), and the WAL restarts only at the size it is cut back to anyway:
/// 16,000 frames of 4 KB pages, about a second of claims and checkpoints at
/// 2,000/s (about eight frames each, measured). At half that size it
/// restarted 30 times in the job-tracker bench's embedded rounds; now 6.
///
/// Without the restart the WAL never starts over under sustained load: a
/// PASSIVE checkpoint always ends behind the frames committed while it ran,
/// and a commit restarts the WAL only when it finds nothing left to copy
/// (measured: 64,554 frames, 260 MB, after 15 s of claims at 2,000/s, and
/// every checkpoint slower than the one before).
struct Checkpointer {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// How often the WAL is copied into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The WAL restarts once it holds this much, and its file is cut back to
/// this size when it does (it grows past it only during a burst, such as
/// registering many units at once, or while a restart waits for another
/// connection).
const WAL_SIZE_LIMIT: u64 = 64 << 20;

/// Bytes of a WAL frame besides its page.
const WAL_FRAME_HEADER: u64 = 24;

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The database file at `path`, opened once in this process while any
/// store on it is open, for the checkpointer to sync it outside SQLite.
///
/// Closing a descriptor releases every POSIX lock the process holds on the
/// file, SQLite's included (another process could then, say, take the
/// database for its own and delete the WAL). So the descriptor is shared
/// by every store on the file and closed only after the last one's
/// connections: the writer's connection keeps it as its guard
/// ([`SharedConnection::with_guard`]), the checkpointer's thread until
/// its own connection has closed.
fn database_file(path: &Path) -> KvResult<Arc<File>> {
    static OPEN: LazyLock<Mutex<HashMap<PathBuf, Weak<File>>>> = LazyLock::new(Mutex::default);
    let key = path
        .canonicalize()
        .map_err(|e| KvError::Failed(format!("resolve {}: {e}", path.display())))?;
    let mut open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(file) = open.get(&key).and_then(Weak::upgrade) {
        return Ok(file);
    }
    open.retain(|_, file| file.strong_count() > 0);
    // Read-only is enough to sync a file.
    let file = Arc::new(
        File::open(&key).map_err(|e| KvError::Failed(format!("open {}: {e}", key.display())))?,
    );
    open.insert(key, Arc::downgrade(&file));
    Ok(file)
}

fn checkpoint_in_background(
    path: &Path,
    writer: SharedConnection,
    gate: Gate,
    file: Arc<File>,
) -> KvResult<Checkpointer> {
    let conn = open_file(path)?;
    let restart_after = restart_after_frames(&conn)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("sqlite-checkpoint".to_owned())
        .spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(CHECKPOINT_EVERY);
                if let Err(e) = checkpoint(&conn, &writer, &gate, &file, restart_after) {
                    tracing::warn!(error = %e, "wal checkpoint failed");
                }
            }
            // The file's descriptor last (see `database_file`).
            drop(conn);
            drop(writer);
            drop(file);
        })
        .map_err(|e| KvError::Failed(format!("start the checkpoint thread: {e}")))?;
    Ok(Checkpointer { stop })
}

/// WAL frames of [`WAL_SIZE_LIMIT`] bytes, for the file's page size.
fn restart_after_frames(conn: &rusqlite::Connection) -> KvResult<i64> {
    let page: u64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(sqlite_err)?;
    Ok(i64::try_from(WAL_SIZE_LIMIT / (page + WAL_FRAME_HEADER)).unwrap_or(i64::MAX))
}

/// A PASSIVE checkpoint on `conn`: never waits for readers or writers,
/// copies what it can; the WAL's frames.
fn passive(conn: &rusqlite::Connection) -> KvResult<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
        .map_err(sqlite_err)
}

/// One round of [`Checkpointer`]'s steps.
fn checkpoint(
    own: &rusqlite::Connection,
    writer: &SharedConnection,
    gate: &Gate,
    file: &File,
    restart_after: i64,
) -> KvResult<()> {
    if passive(own)? < restart_after {
        return Ok(());
    }
    for _ in 0..2 {
        file.sync_data()
            .map_err(|e| KvError::Failed(format!("sync the database file: {e}")))?;
        passive(own)?;
    }
    // New requests queue at the gate; the lock waits for those already past it.
    let _closed = gate.blocking_write();
    let conn = writer.lock()?;
    let started = std::time::Instant::now();
    // No request of this process runs while the lock is held. Another
    // connection on the file (a second process) would make RESTART wait
    // for it: give up at once instead, holding the lock no longer; the
    // frames are copied all the same and the next round tries again.
    conn.busy_timeout(std::time::Duration::ZERO)
        .map_err(sqlite_err)?;
    let restarted = conn
        .query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
        // The first commit after a restart writes the WAL's new header and
        // fsyncs it: this one, behind the gate, rather than a request's.
        .and_then(|()| conn.execute("UPDATE wal_restarts SET n = n + 1", []));
    // Requests wait for other connections' locks as before, whatever the
    // checkpoint's outcome.
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite_err)?;
    tracing::debug!(held = ?started.elapsed(), "wal restarted");
    restarted.map(drop).map_err(sqlite_err)
}

impl SqliteKv {
    /// Opens (creating) `dir/job-tracker.db`.
    ///
    /// # Errors
    /// When the directory or file cannot be created.
    pub fn open(dir: &Path) -> KvResult<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| KvError::Failed(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("job-tracker.db");
        let conn = open_file(&path)?;
        // WAL + NORMAL survives a killed process (kill -9) without losing a
        // committed transaction; FULL is only needed against power loss.
        conn.execute_batch(&format!(
            "PRAGMA synchronous = NORMAL;
             PRAGMA wal_autocheckpoint = 0;
             PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};
             CREATE TABLE IF NOT EXISTS kv (
                 pk TEXT NOT NULL, sk TEXT NOT NULL, rev INTEGER NOT NULL, body TEXT NOT NULL,
                 PRIMARY KEY (pk, sk)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS wal_restarts (n INTEGER NOT NULL);
             INSERT INTO wal_restarts SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM wal_restarts);"
        ))
        .map_err(sqlite_err)?;
        let file = database_file(&path)?;
        let conn = SharedConnection::with_guard(conn, Arc::clone(&file));
        let gate = Gate::default();
        Ok(Self {
            _checkpointer: checkpoint_in_background(&path, conn.clone(), gate.clone(), file)?,
            conn,
            gate,
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> KvResult<T> + Send + 'static,
    ) -> KvResult<T> {
        // Statements run inline: with WAL and synchronous=NORMAL a commit
        // does not fsync, so each takes tens of microseconds, far less than
        // a hop to the blocking pool and back (measured: that hop dominated
        // a claim's cost). The slow part of WAL, checkpointing, runs on its
        // own connection in the background (see `checkpoint_in_background`).
        let _open = self.gate.read().await;
        f(&mut *self.conn.lock()?)
    }
}

fn sqlite_err(e: rusqlite::Error) -> KvError {
    ConnectorError::from(e).into()
}

/// A query's statements from the prefix itself ([`QUERY_FROM`]) or after a
/// sort key ([`QUERY_AFTER`]); the first of each pair ends before `?4`, the
/// end of the prefix's range, the second (for the empty prefix) does not.
const QUERY_FROM: [&str; 2] = [
    "SELECT sk, rev, body FROM kv WHERE pk = ?1 AND sk >= ?2 AND sk < ?4 ORDER BY sk LIMIT ?3",
    "SELECT sk, rev, body FROM kv WHERE pk = ?1 AND sk >= ?2 ORDER BY sk LIMIT ?3",
];
const QUERY_AFTER: [&str; 2] = [
    "SELECT sk, rev, body FROM kv WHERE pk = ?1 AND sk > ?2 AND sk < ?4 ORDER BY sk LIMIT ?3",
    "SELECT sk, rev, body FROM kv WHERE pk = ?1 AND sk > ?2 ORDER BY sk LIMIT ?3",
];

/// The least string above every string that starts with `prefix`: the
/// prefix with its last character advanced (past a last character that
/// cannot advance, the one before). SQLite compares text byte by byte and
/// UTF-8 keeps the characters' order, so `prefix <= sk < end` is "starts
/// with `prefix`". `None` when no string is above them all (the empty
/// prefix).
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

fn current_rev(tx: &rusqlite::Transaction<'_>, pk: &str, sk: &str) -> KvResult<Option<u64>> {
    // Cached statements: a claim runs about ten of these per transaction.
    tx.prepare_cached("SELECT rev FROM kv WHERE pk = ?1 AND sk = ?2")
        .and_then(|mut stmt| {
            stmt.query_row(params![pk, sk], |r| r.get::<_, i64>(0))
                .optional()
        })
        .map(|r| r.map(|v| u64::try_from(v).unwrap_or(0)))
        .map_err(sqlite_err)
}

fn holds(expect: Expect, rev: Option<u64>) -> bool {
    match expect {
        Expect::Absent => rev.is_none(),
        Expect::Rev(r) => rev == Some(r),
        Expect::Any => true,
    }
}

/// Applies one op inside a transaction; `false` when its expectation failed.
fn apply_sqlite(tx: &rusqlite::Transaction<'_>, op: &Op) -> KvResult<bool> {
    let run = |sql: &str, params: &[&dyn rusqlite::ToSql]| -> KvResult<usize> {
        tx.prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute(params))
            .map_err(sqlite_err)
    };
    Ok(match op {
        Op::Put {
            pk,
            sk,
            body,
            expect: Expect::Absent,
        } => {
            let inserted = tx
                .prepare_cached("INSERT INTO kv (pk, sk, rev, body) VALUES (?1, ?2, 1, ?3)")
                .and_then(|mut stmt| stmt.execute(params![pk, sk, body]));
            match inserted {
                Ok(_) => true,
                Err(e)
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) =>
                {
                    false
                }
                Err(e) => return Err(sqlite_err(e)),
            }
        }
        Op::Put {
            pk,
            sk,
            body,
            expect: Expect::Rev(r),
        } => {
            let r = i64::try_from(*r).unwrap_or(i64::MAX);
            run(
                "UPDATE kv SET rev = rev + 1, body = ?3 WHERE pk = ?1 AND sk = ?2 AND rev = ?4",
                params![pk, sk, body, r],
            )? == 1
        }
        Op::Put {
            pk,
            sk,
            body,
            expect: Expect::Any,
        } => {
            run(
                "INSERT INTO kv (pk, sk, rev, body) VALUES (?1, ?2, 1, ?3)
                 ON CONFLICT (pk, sk) DO UPDATE SET rev = kv.rev + 1, body = excluded.body",
                params![pk, sk, body],
            )?;
            true
        }
        Op::Delete {
            pk,
            sk,
            expect: Expect::Rev(r),
        } => {
            let r = i64::try_from(*r).unwrap_or(i64::MAX);
            run(
                "DELETE FROM kv WHERE pk = ?1 AND sk = ?2 AND rev = ?3",
                params![pk, sk, r],
            )? == 1
        }
        Op::Delete {
            pk,
            sk,
            expect: Expect::Any,
        } => {
            run("DELETE FROM kv WHERE pk = ?1 AND sk = ?2", params![pk, sk])?;
            true
        }
        Op::Delete {
            pk,
            sk,
            expect: Expect::Absent,
        }
        | Op::Check {
            pk,
            sk,
            expect: Expect::Absent,
        } => current_rev(tx, pk, sk)?.is_none(),
        Op::Check { pk, sk, expect } => holds(*expect, current_rev(tx, pk, sk)?),
    })
}

#[async_trait]
impl KvStore for SqliteKv {
    async fn get(&self, pk: &str, sk: &str) -> KvResult<Option<Entry>> {
        let (pk, sk) = (pk.to_owned(), sk.to_owned());
        self.with(move |conn| {
            conn.prepare_cached("SELECT rev, body FROM kv WHERE pk = ?1 AND sk = ?2")
                .and_then(|mut s| {
                    s.query_row(params![pk, sk], |r| {
                        Ok(Entry {
                            sk: sk.clone(),
                            rev: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                            body: r.get(1)?,
                        })
                    })
                    .optional()
                })
                .map_err(sqlite_err)
        })
        .await
    }

    async fn query(
        &self,
        pk: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> KvResult<Vec<Entry>> {
        let pk = pk.to_owned();
        // From the prefix (or just after `after`) to the end of the
        // prefix's range: the scan stops there rather than reading the
        // rest of the partition when fewer than `limit` records match.
        let (from, sql) = match after {
            Some(after) if after >= prefix => (after.to_owned(), QUERY_AFTER),
            _ => (prefix.to_owned(), QUERY_FROM),
        };
        let end = prefix_end(prefix);
        let sql = sql[usize::from(end.is_none())];
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(sql).map_err(sqlite_err)?;
            let entry = |r: &rusqlite::Row<'_>| {
                Ok(Entry {
                    sk: r.get(0)?,
                    rev: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    body: r.get(2)?,
                })
            };
            let rows = match &end {
                Some(end) => stmt.query_map(params![pk, from, limit, end], entry),
                None => stmt.query_map(params![pk, from, limit], entry),
            }
            .and_then(Iterator::collect)
            .map_err(sqlite_err)?;
            Ok(rows)
        })
        .await
    }

    async fn transact(&self, ops: Vec<Op>) -> KvResult<()> {
        self.with(move |conn| {
            let tx = conn.transaction().map_err(sqlite_err)?;
            for op in &ops {
                // Each expectation is checked by the write itself (one
                // statement per op): a claim writes about five records.
                if !apply_sqlite(&tx, op)? {
                    return Err(KvError::Conflict);
                }
            }
            tx.commit().map_err(sqlite_err)
        })
        .await
    }

    async fn ping(&self) -> KvResult<()> {
        self.with(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(sqlite_err)
        })
        .await
    }
}

// -------------------------------------------------------------- DynamoDB

/// The shared store: one DynamoDB table with string keys `pk` and `sk`.
pub struct DynamoKv {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

#[allow(clippy::needless_pass_by_value)] // used as `map_err(ddb_err)`
fn ddb_err<E>(e: SdkError<E, HttpResponse>) -> KvError
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    dynamodb::classify("dynamodb", &e).into()
}

/// A transaction cancelled because another one was writing the same item
/// (`TransactionConflict`) lost a race like a failed condition: the engine
/// reads again and retries rather than fail the request.
#[allow(clippy::needless_pass_by_value)] // used as `map_err(transaction_err)`
fn transaction_err(
    e: SdkError<
        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError,
        HttpResponse,
    >,
) -> KvError {
    let classified = dynamodb::classify("dynamodb", &e);
    if classified.is_retryable() && classified.to_string().contains("TransactionConflict") {
        KvError::Conflict
    } else {
        classified.into()
    }
}

impl DynamoKv {
    pub fn new(client: aws_sdk_dynamodb::Client, table: &str) -> Self {
        Self {
            client,
            table: table.to_owned(),
        }
    }

    /// Creates the table (on-demand) if it does not exist. Production tables
    /// come from deploy/cloudformation; this serves local runs and tests.
    ///
    /// # Errors
    /// When the table cannot be described or created.
    pub async fn ensure_table(&self) -> KvResult<()> {
        let schema = KeySchema::new("pk", Some("sk"));
        Ok(dynamodb::ensure_table(&self.client, &self.table, &schema).await?)
    }

    fn condition(expect: Expect) -> (Option<String>, Option<HashMap<String, AttributeValue>>) {
        match expect {
            Expect::Absent => (Some("attribute_not_exists(pk)".to_owned()), None),
            Expect::Rev(r) => (
                Some("rev = :expected".to_owned()),
                Some(HashMap::from([(
                    ":expected".to_owned(),
                    AttributeValue::N(r.to_string()),
                )])),
            ),
            Expect::Any => (None, None),
        }
    }

    fn key(pk: &str, sk: &str) -> HashMap<String, AttributeValue> {
        HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), s(sk))])
    }

    fn entry(item: &HashMap<String, AttributeValue>) -> KvResult<Entry> {
        let field = |n: &str| {
            item.get(n)
                .ok_or_else(|| KvError::Failed(format!("record lacks {n}")))
        };
        Ok(Entry {
            sk: field("sk")?
                .as_s()
                .map_err(|_| KvError::Failed("sk is not a string".into()))?
                .clone(),
            rev: field("rev")?
                .as_n()
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| KvError::Failed("rev is not a number".into()))?,
            body: field("body")?
                .as_s()
                .map_err(|_| KvError::Failed("body is not a string".into()))?
                .clone(),
        })
    }
}

#[async_trait]
impl KvStore for DynamoKv {
    async fn get(&self, pk: &str, sk: &str) -> KvResult<Option<Entry>> {
        dynamodb::get_item(&self.client, &self.table, Self::key(pk, sk))
            .await?
            .as_ref()
            .map(Self::entry)
            .transpose()
    }

    async fn query(
        &self,
        pk: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> KvResult<Vec<Entry>> {
        let mut out = Vec::new();
        let mut start = after.map(|a| Self::key(pk, a));
        while out.len() < limit {
            // DynamoDB rejects an empty string in a key condition: an empty
            // prefix means the whole partition.
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .expression_attribute_values(":pk", s(pk));
            query = if prefix.is_empty() {
                query.key_condition_expression("pk = :pk")
            } else {
                query
                    .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                    .expression_attribute_values(":prefix", s(prefix))
            };
            let page = query
                .set_exclusive_start_key(start.take())
                .limit(i32::try_from(limit - out.len()).unwrap_or(i32::MAX))
                .consistent_read(true)
                .send()
                .await
                .map_err(ddb_err)?;
            for item in page.items() {
                out.push(Self::entry(item)?);
            }
            match page.last_evaluated_key {
                Some(k) if out.len() < limit => start = Some(k),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn transact(&self, ops: Vec<Op>) -> KvResult<()> {
        if ops.is_empty() {
            return Ok(());
        }
        if ops.len() > 100 {
            return Err(KvError::Failed(format!(
                "{} writes exceed one transaction (100)",
                ops.len()
            )));
        }
        let mut items = Vec::with_capacity(ops.len());
        for op in ops {
            let item = match op {
                Op::Put {
                    pk,
                    sk,
                    body,
                    expect,
                } => {
                    let (condition, mut values) = Self::condition(expect);
                    let values = values.get_or_insert_with(HashMap::new);
                    values.insert(":body".to_owned(), s(&body));
                    values.insert(":one".to_owned(), AttributeValue::N("1".to_owned()));
                    values.insert(":zero".to_owned(), AttributeValue::N("0".to_owned()));
                    TransactWriteItem::builder()
                        .update(
                            Update::builder()
                                .table_name(&self.table)
                                .set_key(Some(Self::key(&pk, &sk)))
                                .update_expression(
                                    "SET body = :body, rev = if_not_exists(rev, :zero) + :one",
                                )
                                .set_condition_expression(condition)
                                .set_expression_attribute_values(Some(values.clone()))
                                .build()
                                .map_err(|e| KvError::Failed(e.to_string()))?,
                        )
                        .build()
                }
                Op::Delete { pk, sk, expect } => {
                    let (condition, values) = Self::condition(expect);
                    TransactWriteItem::builder()
                        .delete(
                            Delete::builder()
                                .table_name(&self.table)
                                .set_key(Some(Self::key(&pk, &sk)))
                                .set_condition_expression(condition)
                                .set_expression_attribute_values(values)
                                .build()
                                .map_err(|e| KvError::Failed(e.to_string()))?,
                        )
                        .build()
                }
                Op::Check { pk, sk, expect } => {
                    let (condition, values) = Self::condition(expect);
                    TransactWriteItem::builder()
                        .condition_check(
                            ConditionCheck::builder()
                                .table_name(&self.table)
                                .set_key(Some(Self::key(&pk, &sk)))
                                .condition_expression(condition.unwrap_or_else(|| {
                                    "attribute_exists(pk) OR attribute_not_exists(pk)".to_owned()
                                }))
                                .set_expression_attribute_values(values)
                                .build()
                                .map_err(|e| KvError::Failed(e.to_string()))?,
                        )
                        .build()
                }
            };
            items.push(item);
        }
        self.client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
            .map_err(transaction_err)?;
        Ok(())
    }

    async fn ping(&self) -> KvResult<()> {
        dynamodb::describe_table(&self.client, &self.table).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The WAL's restart count, from its header (checkpoint sequence
    /// number, bytes 12..16, big-endian).
    fn wal_restarts(wal: &Path) -> u32 {
        let header = std::fs::read(wal).expect("read the WAL");
        u32::from_be_bytes(header[12..16].try_into().expect("a WAL header"))
    }

    /// Commits without a pause between them never leave the background
    /// PASSIVE checkpoint caught up: the WAL must start over all the same,
    /// or it grows by every commit for as long as the load lasts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_sustained_writes() {
        let dir = tempfile::tempdir().unwrap();
        let kv = SqliteKv::open(dir.path()).unwrap();
        let wal = dir.path().join("job-tracker.db-wal");
        let body = "x".repeat(1000);
        let put = |n: u64| Op::Put {
            pk: "run".to_owned(),
            sk: format!("unit#{:05}", n % 5000),
            body: body.clone(),
            expect: Expect::Any,
        };
        kv.transact(vec![put(0)]).await.unwrap();
        let before = wal_restarts(&wal);
        // Enough commits for several restarts (each commit writes at least
        // one frame), over several rounds, however fast this machine is.
        let started = std::time::Instant::now();
        let enough = 5 * WAL_SIZE_LIMIT / 4096;
        let mut commits = 0_u64;
        while commits < enough || started.elapsed() < 16 * CHECKPOINT_EVERY {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(120),
                "{commits} commits in two minutes"
            );
            commits += 1;
            kv.transact(vec![put(commits)]).await.unwrap();
        }
        let restarts = wal_restarts(&wal) - before;
        assert!(
            restarts >= 2,
            "the WAL started over {restarts} times in {commits} commits over {:?}",
            started.elapsed()
        );
        // The checkpointer made the first commit after its restarts itself
        // (each restart, its own or SQLite's, advances the header).
        let counted: u32 = kv
            .conn
            .lock()
            .unwrap()
            .query_row("SELECT n FROM wal_restarts", [], |r| r.get(0))
            .unwrap();
        assert!(
            (1..=restarts).contains(&counted),
            "{counted} restarts counted, {restarts} in the WAL's header"
        );
        // Nothing was lost by starting over.
        let all = query_all(&kv, "run", "unit#").await.unwrap();
        assert_eq!(all.len() as u64, (commits + 1).min(5000));
    }

    /// Waits until `file` has `holders` handles (its holders let go from
    /// their own threads).
    async fn settles_at(file: &Arc<File>, holders: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(file) != holders {
            assert!(
                std::time::Instant::now() < deadline,
                "{} handles on the database file, not {holders}",
                Arc::strong_count(file)
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The checkpointer's descriptor on the database file is one per file,
    /// shared by every store on it, and let go of by a store only after its
    /// connections have closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stores_on_one_file_share_its_descriptor_until_the_last_closes() {
        let dir = tempfile::tempdir().unwrap();
        let first = SqliteKv::open(dir.path()).unwrap();
        let second = SqliteKv::open(dir.path()).unwrap();
        let file = database_file(&dir.path().join("job-tracker.db")).unwrap();
        // Each store's writer connection and checkpointer, and this test.
        assert_eq!(Arc::strong_count(&file), 5);
        drop(first);
        settles_at(&file, 3).await;
        let put = Op::Put {
            pk: "run".to_owned(),
            sk: "unit#1".to_owned(),
            body: "{}".to_owned(),
            expect: Expect::Absent,
        };
        second.transact(vec![put]).await.unwrap();
        drop(second);
        settles_at(&file, 1).await;
    }

    #[test]
    fn a_prefix_ends_at_its_last_character_advanced() {
        assert_eq!(prefix_end("q").as_deref(), Some("r"));
        assert_eq!(prefix_end("p#").as_deref(), Some("p$"));
        assert_eq!(prefix_end("unit#é").as_deref(), Some("unit#ê"));
        // Past the surrogates, which no string holds.
        assert_eq!(prefix_end("\u{D7FF}").as_deref(), Some("\u{E000}"));
        // The last character cannot advance: the one before it does.
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        assert_eq!(prefix_end(""), None);
    }

    /// A query returns the records of its prefix only, in order, page by
    /// page, and its statement is not prepared again for each page.
    #[tokio::test]
    async fn a_query_reads_its_prefix_page_by_page() {
        let dir = tempfile::tempdir().unwrap();
        let kv = SqliteKv::open(dir.path()).unwrap();
        let keys = ["o#9", "p", "p#a", "p#b", "p#c", "p$", "q#a", "unit#a"];
        let ops = keys
            .iter()
            .map(|sk| Op::Put {
                pk: "run".to_owned(),
                sk: (*sk).to_owned(),
                body: String::new(),
                expect: Expect::Absent,
            })
            .collect();
        kv.transact(ops).await.unwrap();
        let sks = |page: Vec<Entry>| page.into_iter().map(|e| e.sk).collect::<Vec<_>>();
        assert_eq!(
            sks(kv.query("run", "p#", None, 10).await.unwrap()),
            ["p#a", "p#b", "p#c"]
        );
        assert_eq!(
            sks(kv.query("run", "p#", None, 2).await.unwrap()),
            ["p#a", "p#b"]
        );
        assert_eq!(
            sks(kv.query("run", "p#", Some("p#b"), 2).await.unwrap()),
            ["p#c"]
        );
        // An `after` before the prefix reads from the prefix.
        assert_eq!(
            sks(kv.query("run", "p#", Some("o#9"), 1).await.unwrap()),
            ["p#a"]
        );
        assert_eq!(
            sks(kv.query("run", "p", None, 10).await.unwrap()),
            ["p", "p#a", "p#b", "p#c", "p$"]
        );
        assert_eq!(query_all(&kv, "run", "").await.unwrap().len(), keys.len());
        assert!(kv.query("other", "", None, 10).await.unwrap().is_empty());
        let conn = kv.conn.lock().unwrap();
        for sql in QUERY_FROM.iter().chain(&QUERY_AFTER) {
            let stmt = conn.prepare_cached(sql).unwrap();
            assert_eq!(
                stmt.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "{sql}"
            );
        }
    }
}
