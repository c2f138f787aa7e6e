//! The Redis buffer the aggregator ingests through: event-id dedup from an
//! id log mirrored in this process, and one folded write per entity field
//! per batch (DESIGN.md §6: ingest at ≥ 200k events/s on 2 cores).
//!
//! Everything a flush reads stays in the layout of
//! [`tidemark_connectors::redis::RedisBuffer`] (entity hashes `Pe:<entity>`,
//! the dirty set, event count and event times under the same prefix), and
//! taking out, acknowledging, peeking and counting are delegated to it: only
//! how events get in changes.
//!
//! Why: deciding per event in Redis whether an id was seen (SMISMEMBER over
//! the window's sets, then SADD) costs Redis about 1.3 µs an event and the
//! script around it another microsecond; with the increments folded per
//! field that was still ~2.3 µs an event on the single Redis thread, the
//! bound of ingestion. Here Redis does no work per event:
//!
//! - The ids of every accepted batch are appended to one Redis list, `Pidlog`,
//!   as one packed blob (its time in seconds, then each id with its length),
//!   in the same script that applies the batch: a batch that landed has its
//!   ids in the log, a batch that failed has none, whatever crashes.
//! - Each process mirrors the log in memory (id → seconds) and decides the
//!   duplicates itself. The log has a position (`base` + its length) and an
//!   epoch (random, made when the log is first created): the apply script
//!   runs only if the caller's mirror is at the log's current epoch and
//!   position, so no append by another replica, or by this process before a
//!   kill -9 or a lost reply, can be missed. Otherwise it changes nothing and
//!   answers `stale`; the caller reads the blobs it lacks, decides again and
//!   resends. A batch resent after a lost reply therefore finds its own ids
//!   and is all duplicates, as before.
//! - The batch's fresh events are folded in this process per entity and
//!   metric, so the script does one HINCRBY (or HSET for a replace) per
//!   entity field, one SADD of the dirty entities, one ZADD GT of their
//!   latest event times, one INCRBY of the event count and one RPUSH.
//! - Blobs are dropped from the head of the log (and ids from the mirror)
//!   once their window has passed: an id seen at second `s` is a duplicate
//!   while `s / window ≥ now / window − 1`, so it is remembered for at least
//!   the window and at most two.
//! - The log holds at most `max_ids` ids (`dedup_max_ids`), so every
//!   replica's mirror does too, whatever the number of replicas: a batch
//!   whose fresh ids would take the mirror past it is refused whole
//!   (nothing written; [`is_dedup_full`], `RESOURCE_EXHAUSTED` to the
//!   client) until a window passes. The check is made on a mirror at the
//!   log's current position (the script runs only then), swept with the
//!   same `now` and window the script trims with, so it counts exactly the
//!   ids the log holds: it is the whole cluster's bound, not this
//!   process's guess. Another replica's mirror may hold, besides, the ids
//!   its clock has not swept yet (the clock skew's worth).
//!
//! Keys added to the buffer's layout (prefix `P`):
//!
//! | key          | type | holds                                            |
//! |--------------|------|--------------------------------------------------|
//! | `Pidlog`     | list | one blob of ids per accepted batch, oldest first |
//! | `Pidlog:at`  | list | the second of each blob (decimal), aligned       |
//! | `Pidlog:meta`| hash | `epoch`, `base` (position of the list's head)    |
//!
//! By concern: `scripts` (the Lua), `mirror` (the log's blobs and their
//! mirror), `fold` (a batch folded for the script), `wait` (Redis `WAIT`
//! before a batch is acknowledged).

mod fold;
mod mirror;
mod scripts;
mod wait;

use std::collections::HashSet;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher as _, Hasher as _};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tidemark_connectors::redis::RedisBuffer;
use tidemark_connectors::{
    Buffer, BufferEvent, BufferOp, BufferStats, ConnectorError, ConnectorResult, EntityDelta,
};

use fold::{fold, increments};
use mirror::{Mirror, pack_id, unpack};
use scripts::{LUA_CONFIRM, LUA_INGEST, LUA_READ};

pub use wait::{REPLICATION, ReplicaWait, is_replica_shortfall};

/// The backend a batch refused for a full id log fails with (see
/// [`is_dedup_full`]).
pub const DEDUP_CAPACITY: &str = "dedup capacity";

/// Whether `e` is a batch refused because the id log holds `max_ids` ids
/// already: nothing of it was written, and retrying before its
/// `retry_after` (the next window boundary) is refused again.
pub fn is_dedup_full(e: &ConnectorError) -> bool {
    matches!(e, ConnectorError::Retryable { backend, .. } if *backend == DEDUP_CAPACITY)
}

const BACKEND: &str = "redis";
/// Blobs read per call while catching up with the log.
const READ_CHUNK: usize = 64;
/// Catch-ups of one batch before giving up (another replica appending
/// faster than this one can read).
const MAX_ATTEMPTS: usize = 50;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn corrupt(what: &str) -> ConnectorError {
    ConnectorError::terminal(BACKEND, format!("corrupt id log: {what}"))
}

/// The aggregation buffer in Redis with the id log (module documentation).
/// It owns the mirror: share one per process behind an `Arc`.
pub struct EventLogBuffer {
    inner: RedisBuffer,
    conn: ConnectionManager,
    prefix: String,
    ingest: Script,
    read: Script,
    confirm: Script,
    /// Replicas to `WAIT` for before a batch is acknowledged.
    wait: Option<ReplicaWait>,
    /// Held from deciding a batch's duplicates until its script answered:
    /// the mirror must be at the log's position when the script runs.
    mirror: tokio::sync::Mutex<Mirror>,
    /// Most ids the log (hence every mirror) holds; see the module docs.
    max_ids: usize,
    /// The epoch this process offers should it create the log.
    new_epoch: String,
}

impl EventLogBuffer {
    /// Connects to `url` with a reconnecting connection shared with the
    /// flush side, keys under `prefix`.
    ///
    /// # Errors
    /// `InvalidInput` for a malformed URL, `Retryable` when Redis cannot be
    /// reached.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> ConnectorResult<Self> {
        Ok(Self::new(
            tidemark_connectors::redis::connection(url).await?,
            prefix,
        ))
    }

    /// A buffer over an existing connection, its keys under `prefix`.
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        Self {
            inner: RedisBuffer::new(conn.clone(), prefix.clone()),
            conn,
            prefix,
            ingest: Script::new(LUA_INGEST),
            read: Script::new(LUA_READ),
            confirm: Script::new(LUA_CONFIRM),
            wait: None,
            mirror: tokio::sync::Mutex::new(Mirror::default()),
            max_ids: usize::MAX,
            new_epoch: format!("{:016x}", h.finish()),
        }
    }

    /// Refuses a batch whose fresh ids would take the id log past
    /// `max_ids` ids (module documentation; 0: no bound). Every replica of a buffer
    /// should be given the same bound and the same dedup window.
    #[must_use]
    pub fn with_max_ids(mut self, max_ids: usize) -> Self {
        // 0: no bound.
        self.max_ids = if max_ids == 0 { usize::MAX } else { max_ids };
        self
    }

    /// The flush side, which shares this buffer's keys and connection.
    pub fn redis(&self) -> &RedisBuffer {
        &self.inner
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// Brings the mirror to the log's current position (from scratch when
    /// the log's epoch is not the mirror's).
    async fn catch_up(&self, mirror: &mut Mirror) -> ConnectorResult<()> {
        loop {
            let reply: Vec<Value> = self
                .read
                .key(self.key("idlog"))
                .key(self.key("idlog:meta"))
                .arg(mirror.position)
                .arg(READ_CHUNK)
                .arg(&self.new_epoch)
                .invoke_async(&mut self.conn.clone())
                .await?;
            let mut it = reply.into_iter();
            let (Some(epoch), Some(base), Some(position)) = (it.next(), it.next(), it.next())
            else {
                return Err(corrupt("read reply"));
            };
            let epoch = text(epoch)?;
            let (base, position) = (number(base)?, number(position)?);
            if epoch != mirror.epoch || mirror.position > position {
                // A new log (first use, or Redis lost it): start over.
                mirror.reset(epoch, base);
                if position > base {
                    continue;
                }
                return Ok(());
            }
            let mut at = mirror.position.max(base);
            for blob in it {
                let Value::BulkString(blob) = blob else {
                    return Err(corrupt("blob is not a string"));
                };
                let (secs, ids) = unpack(&blob)?;
                for id in ids {
                    mirror.remember(id, secs);
                }
                at += 1;
            }
            mirror.position = at;
            if at >= position {
                return Ok(());
            }
        }
    }

    /// The script call of a batch whose duplicates are `dups`, but for its
    /// last two arguments (the mirror's epoch and position).
    fn command(
        &self,
        events: &[BufferEvent],
        dups: &[usize],
        now: u64,
        window: u64,
    ) -> ConnectorResult<redis::Cmd> {
        let folded = fold(events, dups);
        let mut blob = Vec::with_capacity(8 + events.len() * 24);
        blob.extend_from_slice(&now.to_le_bytes());
        let mut dup = dups.iter().peekable();
        for (i, event) in events.iter().enumerate() {
            if dup.next_if_eq(&&i).is_none() {
                pack_id(&mut blob, event.id.as_bytes())?;
            }
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.ingest.get_hash())
            .arg(6 + folded.entities.len())
            .arg(self.key("idlog"))
            .arg(self.key("idlog:at"))
            .arg(self.key("idlog:meta"))
            .arg(self.key("dirty"))
            .arg(self.key("events"))
            .arg(self.key("times"));
        let mut key = String::with_capacity(self.prefix.len() + 64);
        for (entity, _) in &folded.entities {
            key.clear();
            key.push_str(&self.prefix);
            key.push_str("e:");
            key.push_str(entity);
            cmd.arg(key.as_bytes());
        }
        cmd.arg(now)
            .arg(window)
            .arg(blob)
            .arg(folded.fresh)
            .arg(folded.entities.len());
        for (entity, latest) in &folded.entities {
            cmd.arg(*entity).arg(*latest);
        }
        let mut field = String::with_capacity(64);
        for (slot, metric, change) in &folded.changes {
            // KEYS[1..6] are the log and buffer keys; entity hashes follow.
            let index = slot + 7;
            let mut put = |kind: char, value: &[u8]| {
                field.clear();
                field.push(kind);
                field.push(':');
                field.push_str(metric);
                cmd.arg(index).arg(field.as_bytes()).arg(value);
            };
            match change.replace {
                None => {
                    for part in increments(change.increment) {
                        put('i', part.to_string().as_bytes());
                    }
                }
                Some(value) => {
                    put('r', value.as_bytes());
                    if change.increment != 0 {
                        let set = i64::try_from(change.increment).map_err(|_| {
                            ConnectorError::invalid(
                                BACKEND,
                                format!("increments of {metric} after a replace overflow i64"),
                            )
                        })?;
                        put('s', set.to_string().as_bytes());
                    }
                }
            }
        }
        Ok(cmd)
    }
}

fn text(v: Value) -> ConnectorResult<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).map_err(|_| corrupt("non-UTF-8 text")),
        Value::SimpleString(s) => Ok(s),
        Value::Int(n) => Ok(n.to_string()),
        other => Err(corrupt(&format!("expected text, got {other:?}"))),
    }
}

fn number(v: Value) -> ConnectorResult<u64> {
    match v {
        Value::Int(n) => u64::try_from(n).map_err(|_| corrupt("negative position")),
        other => text(other)?
            .parse()
            .map_err(|_| corrupt("position is not a number")),
    }
}

#[async_trait]
impl Buffer for EventLogBuffer {
    async fn apply(&self, ops: &[BufferOp]) -> ConnectorResult<()> {
        self.inner.apply(ops).await
    }

    async fn take_for_flush(&self, sequence: u64) -> ConnectorResult<Vec<EntityDelta>> {
        self.inner.take_for_flush(sequence).await
    }

    async fn ack_flush(&self, sequence: u64) -> ConnectorResult<()> {
        self.inner.ack_flush(sequence).await
    }

    async fn pending_flush(&self) -> ConnectorResult<Option<(u64, Vec<EntityDelta>)>> {
        self.inner.pending_flush().await
    }

    async fn peek(&self, entity: &str) -> ConnectorResult<EntityDelta> {
        self.inner.peek(entity).await
    }

    async fn dirty_count(&self) -> ConnectorResult<u64> {
        self.inner.dirty_count().await
    }

    #[tracing::instrument(skip_all, fields(prefix = %self.prefix, events = events.len()))]
    async fn apply_events(
        &self,
        events: &[BufferEvent],
        dedup_window: Duration,
    ) -> ConnectorResult<Vec<usize>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let window = dedup_window.as_secs().max(1);
        let now = now_secs();
        // Encoded before the lock on the guess that nothing is a duplicate
        // (retries are rare); encoded again under it when something is.
        let mut command = self.command(events, &[], now, window)?;
        let mut guessed = true;
        let mut mirror = self.mirror.lock().await;
        mirror.sweep(now, window);
        if mirror.epoch.is_empty() {
            self.catch_up(&mut mirror).await?;
        }
        for _ in 0..MAX_ATTEMPTS {
            let mut dups = Vec::new();
            let mut batch: HashSet<&[u8]> = HashSet::with_capacity(events.len());
            for (i, event) in events.iter().enumerate() {
                let id = event.id.as_bytes();
                if mirror.is_seen(id, now, window) || !batch.insert(id) {
                    dups.push(i);
                }
            }
            if dups.len() == events.len() {
                // Nothing to write: every id is in the log already.
                if self.confirm(&mirror).await? {
                    return Ok(dups);
                }
                self.catch_up(&mut mirror).await?;
                continue;
            }
            // The mirror may be behind here; then the script answers
            // `stale` and this is checked again once it caught up, so the
            // check a batch lands after was made at the log's position.
            let fresh = events.len() - dups.len();
            if !mirror.admits(fresh, self.max_ids) {
                return Err(ConnectorError::Retryable {
                    backend: DEDUP_CAPACITY,
                    message: format!(
                        "the dedup id log holds {} ids and this batch brings {fresh}: over dedup_max_ids ({}) until the window passes",
                        mirror.seen.len(),
                        self.max_ids
                    ),
                    retry_after: Some(mirror.until_next_sweep(now)),
                });
            }
            if !(dups.is_empty() && guessed) {
                command = self.command(events, &dups, now, window)?;
                guessed = dups.is_empty();
            }
            let mut cmd = command.clone();
            cmd.arg(&mirror.epoch).arg(mirror.position);
            let (reply, acked) = self.send(&self.ingest, &cmd).await?;
            let Value::Array(reply) = reply else {
                return Err(corrupt("ingest reply"));
            };
            let mut it = reply.into_iter();
            let status = text(it.next().ok_or_else(|| corrupt("empty reply"))?)?;
            if status == "ok" {
                let position = number(it.next().ok_or_else(|| corrupt("ok without position"))?)?;
                if let Some(short) = self.shortfall(acked) {
                    // The mirror stays behind: it reads the batch back from
                    // the log, as the primary holds it, on the next call.
                    return Err(short);
                }
                let mut dup = dups.iter().peekable();
                for (i, event) in events.iter().enumerate() {
                    if dup.next_if_eq(&&i).is_none() {
                        mirror.remember(event.id.as_bytes(), now);
                    }
                }
                mirror.position = position;
                return Ok(dups);
            }
            // Another writer appended (or this process did, before a lost
            // reply or a crash): read what it wrote and decide again.
            self.catch_up(&mut mirror).await?;
        }
        Err(ConnectorError::Retryable {
            backend: BACKEND,
            message: "the id log kept moving while this batch caught up".to_owned(),
            retry_after: Some(Duration::from_millis(50)),
        })
    }

    async fn peek_pending(&self, entity: &str) -> ConnectorResult<Option<(u64, EntityDelta)>> {
        self.inner.peek_pending(entity).await
    }

    async fn stats(&self) -> ConnectorResult<BufferStats> {
        self.inner.stats().await
    }
}
