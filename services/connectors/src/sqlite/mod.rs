//! The embedded store: one SQLite file holding tables, their change log (the
//! embedded change feed) and sinks. It is what `tidemark dev` and fast tests
//! run on; it implements the same traits, checked by the same suites, as the
//! real stores.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{ConnectorError, ConnectorResult};
use crate::predicate::Predicate;
use crate::traits::{
    BucketDigest, Buffer, BufferEvent, BufferOp, BufferStats, ChangeFeed, ChangeKind, ChangeRecord,
    EntityDelta, FeedCheckpoint, PartitionCheckpoint, PartitionLag, Position, RecordOutcome,
    ScanPage, ScanRequest, Sink, SinkOp, SinkRecord, SourceTable, fold_digest,
};
use crate::value::{Item, Key, KeySchema, key_hash};

const SCHEMA: &str = "
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS tm_items (
    tbl TEXT NOT NULL, k TEXT NOT NULL, item TEXT NOT NULL,
    PRIMARY KEY (tbl, k)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tm_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, k TEXT NOT NULL, kind TEXT NOT NULL,
    new_image TEXT, old_image TEXT, created_micros INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tm_changes_tbl ON tm_changes (tbl, seq);
CREATE TABLE IF NOT EXISTS tm_buffer (
    buf TEXT NOT NULL, flush INTEGER NOT NULL, entity TEXT NOT NULL, metric TEXT NOT NULL,
    kind TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (buf, flush, entity, metric, kind)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tm_buffer_dedup (
    buf TEXT NOT NULL, id TEXT NOT NULL, expires_micros INTEGER NOT NULL,
    PRIMARY KEY (buf, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tm_buffer_acked (
    buf TEXT NOT NULL PRIMARY KEY, acked INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tm_sink (
    sink TEXT NOT NULL, k TEXT NOT NULL, version INTEGER NOT NULL, deleted INTEGER NOT NULL, item TEXT,
    PRIMARY KEY (sink, k)) WITHOUT ROWID;
";

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

/// A handle on one embedded database file. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    conn: SharedConnection,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// # Errors
    /// When the file cannot be opened or the schema not created.
    pub fn open(path: &Path) -> ConnectorResult<Self> {
        let conn = open_file(path)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: SharedConnection::new(conn),
        })
    }

    /// A private in-memory database (tests).
    #[cfg(feature = "testsuite")]
    ///
    /// # Errors
    /// When SQLite cannot allocate it.
    pub fn in_memory() -> ConnectorResult<Self> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: SharedConnection::new(conn),
        })
    }

    pub fn table(&self, name: &str, schema: KeySchema) -> EmbeddedTable {
        EmbeddedTable {
            store: self.clone(),
            name: name.to_owned(),
            schema,
        }
    }

    pub fn buffer(&self, name: &str) -> EmbeddedBuffer {
        EmbeddedBuffer {
            store: self.clone(),
            name: name.to_owned(),
        }
    }

    pub fn sink(&self, name: &str) -> EmbeddedSink {
        EmbeddedSink {
            store: self.clone(),
            name: name.to_owned(),
        }
    }

    /// The change feed of table `name`, resumed from `checkpoint`.
    pub fn feed(&self, name: &str, checkpoint: &FeedCheckpoint) -> EmbeddedFeed {
        let committed = checkpoint
            .partitions
            .get(PARTITION)
            .and_then(|p| p.sequence.as_deref())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        EmbeddedFeed {
            store: self.clone(),
            table: name.to_owned(),
            committed,
            delivered: committed,
            oldest_uncommitted_micros: None,
        }
    }

    /// The change feed of table `name` from the log's current end: only
    /// changes made from now on (a checkpoint, once written, resumes there).
    pub async fn feed_from_end(&self, name: &str) -> ConnectorResult<EmbeddedFeed> {
        let tbl = name.to_owned();
        let end: i64 = self
            .conn
            .run(move |conn| {
                Ok(conn.query_row(
                    "SELECT COALESCE(MAX(seq), 0) FROM tm_changes WHERE tbl = ?1",
                    params![tbl],
                    |r| r.get(0),
                )?)
            })
            .await?;
        Ok(EmbeddedFeed {
            store: self.clone(),
            table: name.to_owned(),
            committed: end,
            delivered: end,
            oldest_uncommitted_micros: None,
        })
    }
}

fn to_json(item: &Item) -> String {
    crate::value::canonical_item(item)
}

/// Reads an item stored as [`canonical_item`](crate::value::canonical_item) JSON.
///
/// # Errors
/// A terminal error when the text is no item.
pub fn item_from_json(text: &str) -> ConnectorResult<Item> {
    serde_json::from_str(text)
        .map_err(|e| ConnectorError::terminal("sqlite", format!("corrupt item: {e}")))
}

use crate::now_micros;

/// A table in the embedded store. Every write is logged to its change feed
/// in the same transaction.
#[derive(Clone)]
pub struct EmbeddedTable {
    store: EmbeddedStore,
    name: String,
    schema: KeySchema,
}

fn read_item(tx: &Connection, tbl: &str, k: &str) -> ConnectorResult<Option<Item>> {
    tx.query_row(
        "SELECT item FROM tm_items WHERE tbl = ?1 AND k = ?2",
        params![tbl, k],
        |r| r.get::<_, String>(0),
    )
    .optional()?
    .map(|t| item_from_json(&t))
    .transpose()
}

fn check(condition: Option<&Predicate>, current: Option<&Item>, key: &Key) -> ConnectorResult<()> {
    match condition {
        Some(c) if !c.matches(current) => Err(ConnectorError::Precondition(format!(
            "condition failed for {key}"
        ))),
        _ => Ok(()),
    }
}

fn log_change(
    tx: &Connection,
    tbl: &str,
    k: &str,
    old: Option<&Item>,
    new: Option<&Item>,
) -> ConnectorResult<()> {
    let kind = match (old, new) {
        (None, Some(_)) => "INSERT",
        (Some(_), Some(_)) => "MODIFY",
        (Some(_), None) => "REMOVE",
        (None, None) => return Ok(()),
    };
    tx.execute(
        "INSERT INTO tm_changes (tbl, k, kind, new_image, old_image, created_micros) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![tbl, k, kind, new.map(to_json), old.map(to_json), now_micros()],
    )?;
    Ok(())
}

impl EmbeddedTable {
    async fn write<F>(
        &self,
        key: Key,
        condition: Option<Predicate>,
        change: F,
    ) -> ConnectorResult<Option<Item>>
    where
        F: FnOnce(Option<&Item>) -> Option<Item> + Send + 'static,
    {
        let tbl = self.name.clone();
        self.store
            .conn
            .run(move |conn| {
                let tx = conn.transaction()?;
                let k = key.canonical();
                let old = read_item(&tx, &tbl, &k)?;
                check(condition.as_ref(), old.as_ref(), &key)?;
                let new = change(old.as_ref());
                match &new {
                    Some(item) => {
                        tx.execute(
                            "INSERT INTO tm_items (tbl, k, item) VALUES (?1, ?2, ?3)
                             ON CONFLICT (tbl, k) DO UPDATE SET item = excluded.item",
                            params![tbl, k, to_json(item)],
                        )?;
                    }
                    None => {
                        tx.execute(
                            "DELETE FROM tm_items WHERE tbl = ?1 AND k = ?2",
                            params![tbl, k],
                        )?;
                    }
                }
                log_change(&tx, &tbl, &k, old.as_ref(), new.as_ref())?;
                tx.commit()?;
                Ok(new)
            })
            .await
    }
}

#[async_trait]
impl SourceTable for EmbeddedTable {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_schema(&self) -> &KeySchema {
        &self.schema
    }

    async fn scan(&self, request: &ScanRequest) -> ConnectorResult<ScanPage> {
        if request.total_segments == 0 || request.segment >= request.total_segments {
            return Err(ConnectorError::invalid(
                "sqlite",
                "segment must be below total_segments",
            ));
        }
        let tbl = self.name.clone();
        let request = request.clone();
        self.store
            .conn
            .run(move |conn| {
                let mut after = request
                    .start_after
                    .as_ref()
                    .map(Key::canonical)
                    .unwrap_or_default();
                let mut page = ScanPage::default();
                let limit = u64::from(request.limit.max(1));
                let mut stmt = conn.prepare_cached(
                    "SELECT k, item FROM tm_items WHERE tbl = ?1 AND k > ?2 ORDER BY k LIMIT 512",
                )?;
                loop {
                    let rows: Vec<(String, String)> = stmt
                        .query_map(params![tbl, after], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?;
                    if rows.is_empty() {
                        page.last_key = None;
                        return Ok(page);
                    }
                    for (k, text) in rows {
                        after.clone_from(&k);
                        let key: Key = serde_json::from_str(&k).map_err(|e| {
                            ConnectorError::terminal("sqlite", format!("corrupt key: {e}"))
                        })?;
                        if key_hash(&key) % u64::from(request.total_segments)
                            != u64::from(request.segment)
                        {
                            continue;
                        }
                        page.scanned += 1;
                        let item = item_from_json(&text)?;
                        if request
                            .filter
                            .as_ref()
                            .is_none_or(|f| f.matches(Some(&item)))
                        {
                            page.items.push(item);
                        }
                        if page.scanned >= limit {
                            page.last_key = Some(key);
                            return Ok(page);
                        }
                    }
                }
            })
            .await
    }

    async fn get(&self, key: &Key) -> ConnectorResult<Option<Item>> {
        let tbl = self.name.clone();
        let k = key.canonical();
        self.store
            .conn
            .run(move |conn| read_item(conn, &tbl, &k))
            .await
    }

    async fn put(&self, item: &Item, condition: Option<&Predicate>) -> ConnectorResult<()> {
        let key = self
            .schema
            .key_of(item)
            .map_err(|m| ConnectorError::invalid("sqlite", m))?;
        let item = item.clone();
        self.write(key, condition.cloned(), move |_| Some(item))
            .await
            .map(drop)
    }

    async fn update(
        &self,
        key: &Key,
        set: &Item,
        condition: Option<&Predicate>,
    ) -> ConnectorResult<Item> {
        let key_attrs = key.0.clone();
        let set = set.clone();
        let new = self
            .write(key.clone(), condition.cloned(), move |old| {
                let mut item = old.cloned().unwrap_or_else(|| key_attrs.clone());
                item.extend(set);
                Some(item)
            })
            .await?;
        Ok(new.expect("update always produces an item"))
    }

    async fn delete(&self, key: &Key, condition: Option<&Predicate>) -> ConnectorResult<()> {
        self.write(key.clone(), condition.cloned(), |_| None)
            .await
            .map(drop)
    }
}

const PARTITION: &str = "0";

/// The change log of one embedded table, as a [`ChangeFeed`]: one partition,
/// sequence = log row id, version = sequence (monotonic per key).
pub struct EmbeddedFeed {
    store: EmbeddedStore,
    table: String,
    committed: i64,
    delivered: i64,
    oldest_uncommitted_micros: Option<i64>,
}

fn parse_kind(kind: &str) -> ChangeKind {
    match kind {
        "INSERT" => ChangeKind::Insert,
        "REMOVE" => ChangeKind::Remove,
        _ => ChangeKind::Modify,
    }
}

#[async_trait]
impl ChangeFeed for EmbeddedFeed {
    async fn poll(&mut self, max: usize) -> ConnectorResult<Vec<ChangeRecord>> {
        let tbl = self.table.clone();
        let after = self.delivered;
        let max = i64::try_from(max.max(1)).unwrap_or(i64::MAX);
        type Row = (i64, String, String, Option<String>, Option<String>, i64);
        let rows: Vec<Row> = self
            .store
            .conn
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT seq, k, kind, new_image, old_image, created_micros FROM tm_changes
                     WHERE tbl = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )?;
                let rows = stmt
                    .query_map(params![tbl, after, max], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (seq, k, kind, new_image, old_image, created) in rows {
            let key: Key = serde_json::from_str(&k)
                .map_err(|e| ConnectorError::terminal("sqlite", format!("corrupt key: {e}")))?;
            out.push(ChangeRecord {
                key,
                kind: parse_kind(&kind),
                new_image: new_image.as_deref().map(item_from_json).transpose()?,
                old_image: old_image.as_deref().map(item_from_json).transpose()?,
                version: u64::try_from(seq).unwrap_or_default(),
                created_at_micros: created,
                position: Position {
                    partition: PARTITION.to_owned(),
                    sequence: seq.to_string(),
                },
            });
            self.delivered = seq;
            self.oldest_uncommitted_micros.get_or_insert(created);
        }
        Ok(out)
    }

    /// One indexed read of a local file: cheap enough to ask often.
    fn idle_wait(&self) -> Duration {
        Duration::from_millis(20)
    }

    async fn commit(&mut self, position: &Position) -> ConnectorResult<()> {
        let seq: i64 = position.sequence.parse().map_err(|_| {
            ConnectorError::invalid("sqlite", format!("bad sequence {:?}", position.sequence))
        })?;
        if position.partition != PARTITION || seq > self.delivered {
            return Err(ConnectorError::invalid(
                "sqlite",
                "commit of a position that was never delivered",
            ));
        }
        self.committed = self.committed.max(seq);
        if self.committed == self.delivered {
            self.oldest_uncommitted_micros = None;
        }
        Ok(())
    }

    fn checkpoint(&self) -> FeedCheckpoint {
        let mut checkpoint = FeedCheckpoint::default();
        checkpoint.partitions.insert(
            PARTITION.to_owned(),
            PartitionCheckpoint {
                sequence: (self.committed > 0).then(|| self.committed.to_string()),
                version: u64::try_from(self.committed).unwrap_or_default(),
                finished: false,
                parent: None,
            },
        );
        checkpoint
    }

    fn lag(&self) -> Vec<PartitionLag> {
        let seconds = self.oldest_uncommitted_micros.map_or(0.0, |t| {
            Duration::from_micros(u64::try_from(now_micros() - t).unwrap_or(0)).as_secs_f64()
        });
        vec![PartitionLag {
            partition: PARTITION.to_owned(),
            records: u64::try_from(self.delivered - self.committed).unwrap_or(0),
            seconds,
        }]
    }
}

/// A sink in the embedded store: versioned rows with tombstones.
#[derive(Clone)]
pub struct EmbeddedSink {
    store: EmbeddedStore,
    name: String,
}

#[async_trait]
impl Sink for EmbeddedSink {
    fn name(&self) -> String {
        format!("sqlite:{}", self.name)
    }

    async fn apply(&self, batch: &[SinkRecord]) -> ConnectorResult<Vec<RecordOutcome>> {
        let sink = self.name.clone();
        let batch = batch.to_vec();
        self.store
            .conn.run(move |conn| {
                let tx = conn.transaction()?;
                let mut outcomes = Vec::with_capacity(batch.len());
                for record in &batch {
                    let k = record.key.canonical();
                    let version = i64::try_from(record.version)
                        .map_err(|_| ConnectorError::invalid("sqlite", "version exceeds i64"))?;
                    let (deleted, item) = match &record.op {
                        SinkOp::Upsert(item) => (0, Some(to_json(item))),
                        SinkOp::Delete => (1, None),
                    };
                    let changed = tx.execute(
                        "INSERT INTO tm_sink (sink, k, version, deleted, item) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (sink, k) DO UPDATE SET version = excluded.version,
                             deleted = excluded.deleted, item = excluded.item
                         WHERE excluded.version > tm_sink.version",
                        params![sink, k, version, deleted, item],
                    )?;
                    outcomes.push(if changed == 1 { RecordOutcome::Applied } else { RecordOutcome::Stale });
                }
                tx.commit()?;
                Ok(outcomes)
            })
            .await
    }

    async fn read(&self, key: &Key) -> ConnectorResult<Option<(u64, Item)>> {
        let sink = self.name.clone();
        let k = key.canonical();
        self.store
            .conn.run(move |conn| {
                let row: Option<(i64, Option<String>)> = conn
                    .query_row(
                        "SELECT version, item FROM tm_sink WHERE sink = ?1 AND k = ?2 AND deleted = 0",
                        params![sink, k],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                row.map(|(v, item)| Ok((u64::try_from(v).unwrap_or(0), item_from_json(item.as_deref().unwrap_or("{}"))?)))
                    .transpose()
            })
            .await
    }

    async fn digest(&self, buckets: u32) -> ConnectorResult<Vec<BucketDigest>> {
        if buckets == 0 {
            return Err(ConnectorError::invalid(
                "sqlite",
                "buckets must be at least 1",
            ));
        }
        let sink = self.name.clone();
        self.store
            .conn
            .run(move |conn| {
                let mut out = vec![BucketDigest::default(); buckets as usize];
                let mut stmt = conn.prepare(
                    "SELECT k, version, item FROM tm_sink WHERE sink = ?1 AND deleted = 0",
                )?;
                let mut rows = stmt.query(params![sink])?;
                while let Some(row) = rows.next()? {
                    let k: String = row.get(0)?;
                    let key: Key = serde_json::from_str(&k).map_err(|e| {
                        ConnectorError::terminal("sqlite", format!("corrupt key: {e}"))
                    })?;
                    let version: i64 = row.get(1)?;
                    let item = item_from_json(&row.get::<_, String>(2)?)?;
                    fold_digest(&mut out, &key, u64::try_from(version).unwrap_or(0), &item);
                }
                Ok(out)
            })
            .await
    }

    /// Pages through the live rows by key, so `visit` runs outside the
    /// connection's blocking task.
    async fn entries(&self, visit: &mut (dyn FnMut(Key, u64, Item) + Send)) -> ConnectorResult<()> {
        let mut after = String::new();
        loop {
            let sink = self.name.clone();
            let from = after.clone();
            let rows: Vec<(String, i64, String)> = self
                .store
                .conn.run(move |conn| {
                    let mut stmt = conn.prepare_cached(
                        "SELECT k, version, item FROM tm_sink WHERE sink = ?1 AND k > ?2 AND deleted = 0
                         ORDER BY k LIMIT 4096",
                    )?;
                    let rows = stmt
                        .query_map(params![sink, from], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect::<Result<_, _>>()?;
                    Ok(rows)
                })
                .await?;
            let Some((last, _, _)) = rows.last() else {
                return Ok(());
            };
            after.clone_from(last);
            for (k, version, text) in rows {
                let key: Key = serde_json::from_str(&k)
                    .map_err(|e| ConnectorError::terminal("sqlite", format!("corrupt key: {e}")))?;
                visit(
                    key,
                    u64::try_from(version).unwrap_or(0),
                    item_from_json(&text)?,
                );
            }
        }
    }
}

/// The aggregation buffer in the embedded store. Live rows have flush 0; a
/// flush moves them to its sequence in one statement, so an event arriving
/// meanwhile lands in flush 0 and belongs to the next flush. Besides the
/// `inc` and `set` rows of its metrics, an entity has a `time` row (latest
/// event time) and an `events` row (events applied) under the metric `''`.
#[derive(Clone)]
pub struct EmbeddedBuffer {
    store: EmbeddedStore,
    name: String,
}

fn read_deltas(
    conn: &Connection,
    buf: &str,
    flush: i64,
    entity: Option<&str>,
) -> ConnectorResult<Vec<EntityDelta>> {
    let mut stmt = conn.prepare_cached(
        "SELECT entity, metric, kind, value FROM tm_buffer WHERE buf = ?1 AND flush = ?2
         AND (?3 IS NULL OR entity = ?3) ORDER BY entity, metric, kind",
    )?;
    let mut rows = stmt.query(params![buf, flush, entity])?;
    let mut out: Vec<EntityDelta> = Vec::new();
    while let Some(row) = rows.next()? {
        let (e, metric, kind, value): (String, String, String, String) =
            (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
        if out.last().is_none_or(|d| d.entity != e) {
            out.push(EntityDelta {
                entity: e,
                ..EntityDelta::default()
            });
        }
        let delta = out.last_mut().expect("pushed above");
        if kind == "events" {
            continue;
        }
        if kind == "time" {
            delta.last_event_micros = value.parse().ok();
        } else if kind == "inc" {
            let n = value.parse().map_err(|_| {
                ConnectorError::terminal("sqlite", format!("corrupt increment {value:?}"))
            })?;
            delta.increments.insert(metric, n);
        } else {
            delta.replaces.insert(metric, value);
        }
    }
    Ok(out)
}

fn pending(conn: &Connection, buf: &str) -> ConnectorResult<Option<i64>> {
    Ok(conn.query_row(
        "SELECT MIN(flush) FROM tm_buffer WHERE buf = ?1 AND flush <> 0",
        params![buf],
        |r| r.get::<_, Option<i64>>(0),
    )?)
}

fn last_acked(conn: &Connection, buf: &str) -> ConnectorResult<Option<i64>> {
    Ok(conn
        .query_row(
            "SELECT acked FROM tm_buffer_acked WHERE buf = ?1",
            params![buf],
            |r| r.get::<_, i64>(0),
        )
        .optional()?)
}

/// Adds `delta` to a live counter row, refusing an `i64` overflow (SQLite
/// would silently turn the sum into a float).
fn add_to_row(
    tx: &Connection,
    buf: &str,
    entity: &str,
    metric: &str,
    kind: &str,
    delta: i64,
) -> ConnectorResult<()> {
    let current: Option<String> = tx
        .query_row(
            "SELECT value FROM tm_buffer WHERE buf = ?1 AND flush = 0 AND entity = ?2 AND metric = ?3 AND kind = ?4",
            params![buf, entity, metric, kind],
            |r| r.get(0),
        )
        .optional()?;
    let current: i64 = match current {
        Some(v) => v
            .parse()
            .map_err(|_| ConnectorError::terminal("sqlite", format!("corrupt increment {v:?}")))?,
        None => 0,
    };
    let sum = current.checked_add(delta).ok_or_else(|| {
        ConnectorError::invalid(
            "sqlite",
            format!("increments of {entity}/{metric} overflow i64"),
        )
    })?;
    tx.execute(
        "INSERT INTO tm_buffer (buf, flush, entity, metric, kind, value) VALUES (?1, 0, ?2, ?3, ?4, ?5)
         ON CONFLICT (buf, flush, entity, metric, kind) DO UPDATE SET value = excluded.value",
        params![buf, entity, metric, kind, sum.to_string()],
    )?;
    Ok(())
}

fn apply_event(tx: &Connection, buf: &str, event: &BufferEvent) -> ConnectorResult<()> {
    let entity = event.op.entity();
    match &event.op {
        BufferOp::Increment { metric, delta, .. } => {
            add_to_row(tx, buf, entity, metric, "inc", *delta)?;
        }
        BufferOp::Replace { metric, value, .. } => {
            tx.execute(
                "DELETE FROM tm_buffer WHERE buf = ?1 AND flush = 0 AND entity = ?2 AND metric = ?3 AND kind = 'inc'",
                params![buf, entity, metric],
            )?;
            tx.execute(
                "INSERT INTO tm_buffer (buf, flush, entity, metric, kind, value) VALUES (?1, 0, ?2, ?3, 'set', ?4)
                 ON CONFLICT (buf, flush, entity, metric, kind) DO UPDATE SET value = excluded.value",
                params![buf, entity, metric, value],
            )?;
        }
    }
    add_to_row(tx, buf, entity, "", "events", 1)?;
    tx.execute(
        "INSERT INTO tm_buffer (buf, flush, entity, metric, kind, value) VALUES (?1, 0, ?2, '', 'time', ?3)
         ON CONFLICT (buf, flush, entity, metric, kind)
         DO UPDATE SET value = CAST(MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)",
        params![buf, entity, event.time_micros.to_string()],
    )?;
    Ok(())
}

#[async_trait]
impl Buffer for EmbeddedBuffer {
    async fn apply(&self, ops: &[BufferOp]) -> ConnectorResult<()> {
        let buf = self.name.clone();
        let ops = ops.to_vec();
        self.store
            .conn.run(move |conn| {
                let tx = conn.transaction()?;
                for op in &ops {
                    match op {
                        BufferOp::Increment { entity, metric, delta } => {
                            tx.execute(
                                "INSERT INTO tm_buffer (buf, flush, entity, metric, kind, value) VALUES (?1, 0, ?2, ?3, 'inc', ?4)
                                 ON CONFLICT (buf, flush, entity, metric, kind)
                                 DO UPDATE SET value = CAST(CAST(value AS INTEGER) + CAST(excluded.value AS INTEGER) AS TEXT)",
                                params![buf, entity, metric, delta.to_string()],
                            )?;
                        }
                        BufferOp::Replace { entity, metric, value } => {
                            // A replace resets the metric: earlier increments are void.
                            tx.execute(
                                "DELETE FROM tm_buffer WHERE buf = ?1 AND flush = 0 AND entity = ?2 AND metric = ?3 AND kind = 'inc'",
                                params![buf, entity, metric],
                            )?;
                            tx.execute(
                                "INSERT INTO tm_buffer (buf, flush, entity, metric, kind, value) VALUES (?1, 0, ?2, ?3, 'set', ?4)
                                 ON CONFLICT (buf, flush, entity, metric, kind) DO UPDATE SET value = excluded.value",
                                params![buf, entity, metric, value],
                            )?;
                        }
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }

    async fn take_for_flush(&self, sequence: u64) -> ConnectorResult<Vec<EntityDelta>> {
        let seq = i64::try_from(sequence)
            .map_err(|_| ConnectorError::invalid("sqlite", "flush sequence exceeds i64"))?;
        if seq <= 0 {
            return Err(ConnectorError::invalid(
                "sqlite",
                "flush sequence must be positive",
            ));
        }
        let buf = self.name.clone();
        self.store
            .conn.run(move |conn| {
                let tx = conn.transaction()?;
                match pending(&tx, &buf)? {
                    Some(p) if p == seq => return read_deltas(&tx, &buf, seq, None),
                    Some(p) => {
                        return Err(ConnectorError::Precondition(format!(
                            "flush {p} is still pending; complete and acknowledge it before flush {seq}"
                        )));
                    }
                    None => {}
                }
                // The store would skip a flush at or below the last
                // acknowledged one as already applied: refused, not lost.
                if let Some(acked) = last_acked(&tx, &buf)?
                    && acked >= seq
                {
                    return Err(ConnectorError::Precondition(format!(
                        "flush {seq} is not after the last acknowledged flush {acked}"
                    )));
                }
                tx.execute(
                    "DELETE FROM tm_buffer_dedup WHERE buf = ?1 AND expires_micros <= ?2",
                    params![buf, now_micros()],
                )?;
                tx.execute("UPDATE tm_buffer SET flush = ?2 WHERE buf = ?1 AND flush = 0", params![buf, seq])?;
                let out = read_deltas(&tx, &buf, seq, None)?;
                tx.commit()?;
                Ok(out)
            })
            .await
    }

    async fn ack_flush(&self, sequence: u64) -> ConnectorResult<()> {
        let seq = i64::try_from(sequence)
            .map_err(|_| ConnectorError::invalid("sqlite", "flush sequence exceeds i64"))?;
        let buf = self.name.clone();
        self.store
            .conn
            .run(move |conn| {
                let tx = conn.transaction()?;
                // Acknowledging a flush that is not the pending one does
                // nothing (a repeated ack is harmless).
                if pending(&tx, &buf)? == Some(seq) {
                    tx.execute(
                        "DELETE FROM tm_buffer WHERE buf = ?1 AND flush = ?2",
                        params![buf, seq],
                    )?;
                    tx.execute(
                        "INSERT INTO tm_buffer_acked (buf, acked) VALUES (?1, ?2)
                         ON CONFLICT (buf) DO UPDATE SET acked = MAX(acked, excluded.acked)",
                        params![buf, seq],
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }

    async fn pending_flush(&self) -> ConnectorResult<Option<(u64, Vec<EntityDelta>)>> {
        let buf = self.name.clone();
        self.store
            .conn
            .run(move |conn| match pending(conn, &buf)? {
                Some(seq) => Ok(Some((
                    u64::try_from(seq).unwrap_or(0),
                    read_deltas(conn, &buf, seq, None)?,
                ))),
                None => Ok(None),
            })
            .await
    }

    async fn peek(&self, entity: &str) -> ConnectorResult<EntityDelta> {
        let buf = self.name.clone();
        let entity = entity.to_owned();
        self.store
            .conn
            .run(move |conn| {
                Ok(read_deltas(conn, &buf, 0, Some(&entity))?
                    .pop()
                    .unwrap_or(EntityDelta {
                        entity,
                        ..EntityDelta::default()
                    }))
            })
            .await
    }

    async fn dirty_count(&self) -> ConnectorResult<u64> {
        let buf = self.name.clone();
        self.store
            .conn
            .run(move |conn| {
                let n: i64 = conn.query_row(
                    "SELECT COUNT(DISTINCT entity) FROM tm_buffer WHERE buf = ?1 AND flush = 0",
                    params![buf],
                    |r| r.get(0),
                )?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }

    async fn apply_events(
        &self,
        events: &[BufferEvent],
        dedup_window: Duration,
    ) -> ConnectorResult<Vec<usize>> {
        let buf = self.name.clone();
        let events = events.to_vec();
        let window = i64::try_from(dedup_window.as_micros()).unwrap_or(i64::MAX);
        self.store
            .conn.run(move |conn| {
                let now = now_micros();
                let tx = conn.transaction()?;
                let mut dups = Vec::new();
                for (position, event) in events.iter().enumerate() {
                    let expires: Option<i64> = tx
                        .query_row(
                            "SELECT expires_micros FROM tm_buffer_dedup WHERE buf = ?1 AND id = ?2",
                            params![buf, event.id],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if expires.is_some_and(|e| e > now) {
                        dups.push(position);
                        continue;
                    }
                    tx.execute(
                        "INSERT INTO tm_buffer_dedup (buf, id, expires_micros) VALUES (?1, ?2, ?3)
                         ON CONFLICT (buf, id) DO UPDATE SET expires_micros = excluded.expires_micros",
                        params![buf, event.id, now.saturating_add(window)],
                    )?;
                    apply_event(&tx, &buf, event)?;
                }
                tx.commit()?;
                Ok(dups)
            })
            .await
    }

    async fn peek_pending(&self, entity: &str) -> ConnectorResult<Option<(u64, EntityDelta)>> {
        let buf = self.name.clone();
        let entity = entity.to_owned();
        self.store
            .conn
            .run(move |conn| {
                let Some(seq) = pending(conn, &buf)? else {
                    return Ok(None);
                };
                Ok(read_deltas(conn, &buf, seq, Some(&entity))?
                    .pop()
                    .map(|d| (u64::try_from(seq).unwrap_or(0), d)))
            })
            .await
    }

    async fn stats(&self) -> ConnectorResult<BufferStats> {
        let buf = self.name.clone();
        self.store
            .conn.run(move |conn| {
                let tx = conn.transaction()?;
                let pending_flush = pending(&tx, &buf)?;
                let (dirty, events): (i64, i64) = tx.query_row(
                    "SELECT COUNT(DISTINCT flush || ':' || entity),
                            COALESCE(SUM(CASE WHEN kind = 'events' THEN CAST(value AS INTEGER) END), 0)
                     FROM tm_buffer WHERE buf = ?1 AND (flush = 0 OR flush = ?2)",
                    params![buf, pending_flush.unwrap_or(0)],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let acked = last_acked(&tx, &buf)?;
                Ok(BufferStats {
                    dirty_keys: u64::try_from(dirty).unwrap_or(0),
                    pending_events: u64::try_from(events).unwrap_or(0),
                    pending_flush: pending_flush.and_then(|p| u64::try_from(p).ok()),
                    last_acked: acked.and_then(|a| u64::try_from(a).ok()),
                })
            })
            .await
    }
}
