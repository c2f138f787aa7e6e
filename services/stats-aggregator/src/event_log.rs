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
//!
//! Keys added to the buffer's layout (prefix `P`):
//!
//! | key          | type | holds                                            |
//! |--------------|------|--------------------------------------------------|
//! | `Pidlog`     | list | one blob of ids per accepted batch, oldest first |
//! | `Pidlog:at`  | list | the second of each blob (decimal), aligned       |
//! | `Pidlog:meta`| hash | `epoch`, `base` (position of the list's head)    |

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher as _, Hasher as _};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tidemark_connectors::redis::RedisBuffer;
use tidemark_connectors::{
    Buffer, BufferEvent, BufferOp, BufferStats, ConnectorError, ConnectorResult, EntityDelta,
};

const BACKEND: &str = "redis";
/// Blobs read per call while catching up with the log.
const READ_CHUNK: usize = 64;
/// Catch-ups of one batch before giving up (another replica appending
/// faster than this one can read).
const MAX_ATTEMPTS: usize = 50;

/// KEYS: log, log times, meta, dirty set, live event count, live event
/// times, then the `n` live entity hashes.
/// ARGV: now (seconds), window (seconds), ids blob, fresh event count, `n`,
/// then `n` pairs (entity, latest event time), then triples (KEYS index,
/// field, value) with field `i:<metric>` = HINCRBY, `r:<metric>` = replace
/// (voids the increment), `s:<metric>` = set the increment (increments after
/// a replace), and last the epoch and position the caller's mirror is at
/// (last, so the rest is encoded before the mirror is locked).
/// Returns {'ok', new position} or {'stale', epoch, base, position}.
const LUA_INGEST: &str = r"
local meta = redis.call('HMGET', KEYS[3], 'epoch', 'base')
local epoch, base = meta[1], tonumber(meta[2] or '0')
if not epoch then
  return {'stale', '', 0, 0}
end
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local last = #ARGV - 2
local current = math.floor(now / window)
local trimmed = 0
while true do
  local at = redis.call('LINDEX', KEYS[2], 0)
  if not at or math.floor(tonumber(at) / window) >= current - 1 then break end
  redis.call('LPOP', KEYS[1])
  redis.call('LPOP', KEYS[2])
  trimmed = trimmed + 1
end
if trimmed > 0 then
  base = base + trimmed
  redis.call('HSET', KEYS[3], 'base', base)
end
local pos = base + redis.call('LLEN', KEYS[1])
if epoch ~= ARGV[last + 1] or tonumber(ARGV[last + 2]) ~= pos then
  return {'stale', epoch, base, pos}
end
local n = tonumber(ARGV[5])
local first = 6 + 2 * n
-- Only an HINCRBY can fail (overflow, a corrupt field): they go first and
-- are undone in reverse on a failure, so the batch is all or none.
local done = {}
local function negate(v)
  if string.sub(v, 1, 1) == '-' then return string.sub(v, 2) end
  return '-' .. v
end
for a = first, last, 3 do
  local field = ARGV[a + 1]
  if string.byte(field, 1) == 105 then
    local key = KEYS[tonumber(ARGV[a])]
    local r = redis.pcall('HINCRBY', key, field, ARGV[a + 2])
    if type(r) == 'table' and r.err then
      for d = #done, 1, -1 do
        local k, f, v = done[d][1], done[d][2], done[d][3]
        if v == '-9223372036854775808' then
          redis.call('HINCRBY', k, f, '9223372036854775807')
          redis.call('HINCRBY', k, f, '1')
        elseif v ~= '0' then
          redis.call('HINCRBY', k, f, negate(v))
        end
        if redis.call('HGET', k, f) == '0' then redis.call('HDEL', k, f) end
      end
      return r
    end
    done[#done + 1] = {key, field, ARGV[a + 2]}
  end
end
for a = first, last, 3 do
  local field = ARGV[a + 1]
  local c = string.byte(field, 1)
  if c == 114 then
    local key = KEYS[tonumber(ARGV[a])]
    redis.call('HSET', key, field, ARGV[a + 2])
    redis.call('HDEL', key, 'i' .. string.sub(field, 2))
  elseif c == 115 then
    redis.call('HSET', KEYS[tonumber(ARGV[a])], 'i' .. string.sub(field, 2), ARGV[a + 2])
  end
end
for c = 6, first - 1, 2000 do
  local names, times = {}, {}
  for e = c, math.min(c + 1999, first - 1), 2 do
    names[#names + 1] = ARGV[e]
    times[#times + 1] = ARGV[e + 1]
    times[#times + 1] = ARGV[e]
  end
  redis.call('SADD', KEYS[4], unpack(names))
  redis.call('ZADD', KEYS[6], 'GT', unpack(times))
end
redis.call('INCRBY', KEYS[5], ARGV[4])
redis.call('RPUSH', KEYS[1], ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[1])
return {'ok', pos + 1}
";

/// KEYS: log, meta. ARGV: position to read from, most blobs to return, an
/// epoch to create the log with if it has none yet.
/// Returns {epoch, base, position, blobs from max(from, base) ...}.
const LUA_READ: &str = r"
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'base')
local epoch, base = meta[1], tonumber(meta[2] or '0')
if not epoch then
  epoch = ARGV[3]
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'base', 0)
  base = 0
end
local len = redis.call('LLEN', KEYS[1])
local from = math.max(tonumber(ARGV[1]), base) - base
local out = {epoch, base, base + len}
if from < len then
  for _, b in ipairs(redis.call('LRANGE', KEYS[1], from, from + tonumber(ARGV[2]) - 1)) do
    out[#out + 1] = b
  end
end
return out
";

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn corrupt(what: &str) -> ConnectorError {
    ConnectorError::terminal(BACKEND, format!("corrupt id log: {what}"))
}

/// Appends `id` to a blob: its length (u16, little-endian), then its bytes.
fn pack_id(blob: &mut Vec<u8>, id: &[u8]) -> ConnectorResult<()> {
    let len = u16::try_from(id.len())
        .map_err(|_| ConnectorError::invalid(BACKEND, "an event id is over 65,535 bytes"))?;
    blob.extend_from_slice(&len.to_le_bytes());
    blob.extend_from_slice(id);
    Ok(())
}

/// A blob's second and ids.
fn unpack(blob: &[u8]) -> ConnectorResult<(u64, Vec<&[u8]>)> {
    let (at, mut rest) = blob
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt("blob without its time"))?;
    let mut ids = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_le_bytes(*len));
        if tail.len() < len {
            return Err(corrupt("truncated id"));
        }
        let (id, tail) = tail.split_at(len);
        ids.push(id);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(corrupt("trailing byte"));
    }
    Ok((u64::from_le_bytes(*at), ids))
}

/// This process's mirror of the id log.
#[derive(Default)]
struct Mirror {
    /// The log's epoch; empty before the first read.
    epoch: String,
    /// The log position the mirror holds every blob before.
    position: u64,
    /// Id → the second of its blob.
    seen: HashMap<Box<[u8]>, u64>,
    /// The largest window asked for: ids are kept for it.
    keep_window: u64,
    /// `now / keep_window` at the last sweep.
    swept: u64,
}

impl Mirror {
    fn reset(&mut self, epoch: String, base: u64) {
        self.epoch = epoch;
        self.position = base;
        self.seen.clear();
    }

    fn remember(&mut self, id: &[u8], at: u64) {
        match self.seen.get_mut(id) {
            Some(s) => *s = (*s).max(at),
            None => {
                self.seen.insert(id.into(), at);
            }
        }
    }

    fn is_seen(&self, id: &[u8], now: u64, window: u64) -> bool {
        self.seen
            .get(id)
            .is_some_and(|&at| at / window + 1 >= now / window)
    }

    /// Forgets ids whose window (the largest asked for) has passed.
    fn sweep(&mut self, now: u64, window: u64) {
        self.keep_window = self.keep_window.max(window);
        let current = now / self.keep_window;
        if current > self.swept {
            self.swept = current;
            let keep = self.keep_window;
            self.seen.retain(|_, at| *at / keep + 1 >= current);
        }
    }
}

/// One metric's change in a batch, folded in order.
#[derive(Default)]
struct Change<'a> {
    replace: Option<&'a str>,
    /// Sum of the increments after the last replace (of all of them when
    /// there is none).
    increment: i128,
}

/// The fresh events of a batch folded for the script.
struct Folded<'a> {
    /// Entities in order of first appearance, with their latest event time.
    entities: Vec<(&'a str, i64)>,
    /// (entity slot, metric) → change, in order of first appearance.
    changes: Vec<(usize, &'a str, Change<'a>)>,
    fresh: usize,
}

fn fold<'a>(events: &'a [BufferEvent], dups: &[usize]) -> Folded<'a> {
    let mut entities: Vec<(&str, i64)> = Vec::new();
    let mut entity_slot: HashMap<&str, usize> = HashMap::new();
    let mut changes: Vec<(usize, &str, Change<'_>)> = Vec::new();
    let mut change_slot: HashMap<(usize, &str), usize> = HashMap::new();
    let mut dups = dups.iter().peekable();
    let mut fresh = 0;
    for (i, event) in events.iter().enumerate() {
        if dups.next_if_eq(&&i).is_some() {
            continue;
        }
        fresh += 1;
        let (entity, metric) = match &event.op {
            BufferOp::Increment { entity, metric, .. }
            | BufferOp::Replace { entity, metric, .. } => (entity.as_str(), metric.as_str()),
        };
        let e = *entity_slot.entry(entity).or_insert_with(|| {
            entities.push((entity, event.time_micros));
            entities.len() - 1
        });
        entities[e].1 = entities[e].1.max(event.time_micros);
        let c = *change_slot.entry((e, metric)).or_insert_with(|| {
            changes.push((e, metric, Change::default()));
            changes.len() - 1
        });
        let change = &mut changes[c].2;
        match &event.op {
            BufferOp::Increment { delta, .. } => change.increment += i128::from(*delta),
            BufferOp::Replace { value, .. } => {
                change.replace = Some(value);
                change.increment = 0;
            }
        }
    }
    Folded {
        entities,
        changes,
        fresh,
    }
}

/// Splits a folded sum into HINCRBY arguments within i64, all of one sign
/// (so, applied in turn, none overflows unless the total does).
fn increments(mut sum: i128) -> Vec<i64> {
    let mut out = Vec::new();
    loop {
        let part = i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX });
        out.push(part);
        sum -= i128::from(part);
        if sum == 0 {
            return out;
        }
    }
}

/// The aggregation buffer in Redis with the id log (module documentation).
/// It owns the mirror: share one per process behind an `Arc`.
pub struct EventLogBuffer {
    inner: RedisBuffer,
    conn: ConnectionManager,
    prefix: String,
    ingest: Script,
    read: Script,
    /// Held from deciding a batch's duplicates until its script answered:
    /// the mirror must be at the log's position when the script runs.
    mirror: tokio::sync::Mutex<Mirror>,
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
            mirror: tokio::sync::Mutex::new(Mirror::default()),
            new_epoch: format!("{:016x}", h.finish()),
        }
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

    /// Sends the apply script, loading it first if Redis lost it.
    async fn send(&self, cmd: &redis::Cmd) -> ConnectorResult<Vec<Value>> {
        let mut conn = self.conn.clone();
        match cmd.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.ingest.load_async(&mut conn).await?;
                Ok(cmd.query_async(&mut conn).await?)
            }
            other => Ok(other?),
        }
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
                return Ok(dups);
            }
            if !(dups.is_empty() && guessed) {
                command = self.command(events, &dups, now, window)?;
                guessed = dups.is_empty();
            }
            let mut cmd = command.clone();
            cmd.arg(&mirror.epoch).arg(mirror.position);
            let reply = self.send(&cmd).await?;
            let mut it = reply.into_iter();
            let status = text(it.next().ok_or_else(|| corrupt("empty reply"))?)?;
            if status == "ok" {
                let position = number(it.next().ok_or_else(|| corrupt("ok without position"))?)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip() {
        let mut blob = 42u64.to_le_bytes().to_vec();
        for id in ["a", "", "ünïcode", &"x".repeat(300)] {
            pack_id(&mut blob, id.as_bytes()).unwrap();
        }
        let (at, ids) = unpack(&blob).unwrap();
        assert_eq!(at, 42);
        assert_eq!(ids.len(), 4);
        assert_eq!(ids[2], "ünïcode".as_bytes());
        assert_eq!(ids[3].len(), 300);
        assert!(unpack(&blob[..blob.len() - 1]).is_err());
    }

    #[test]
    fn big_sums_split_within_i64_of_one_sign() {
        assert_eq!(increments(5), [5]);
        assert_eq!(increments(0), [0]);
        let big = i128::from(i64::MAX) * 2 + 3;
        let parts = increments(big);
        assert_eq!(parts.iter().map(|p| i128::from(*p)).sum::<i128>(), big);
        assert!(parts.iter().all(|p| *p > 0));
        let parts = increments(i128::from(i64::MIN) - 1);
        assert_eq!(parts, [i64::MIN, -1]);
    }

    #[test]
    fn a_batch_folds_per_entity_metric_skipping_duplicates() {
        let ev = |id: &str, op: BufferOp, t| BufferEvent {
            id: id.into(),
            op,
            time_micros: t,
        };
        let inc = |e: &str, m: &str, d| BufferOp::Increment {
            entity: e.into(),
            metric: m.into(),
            delta: d,
        };
        let rep = |e: &str, m: &str, v: &str| BufferOp::Replace {
            entity: e.into(),
            metric: m.into(),
            value: v.into(),
        };
        let events = [
            ev("1", inc("a", "n", 2), 5),
            ev("2", inc("a", "n", 3), 9),
            ev("3", rep("b", "n", "7"), 1),
            ev("4", inc("b", "n", 1), 2),
            ev("5", inc("a", "n", 100), 50),
            ev("6", inc("c", "n", 4), 3),
            ev("7", rep("c", "n", "9"), 4),
        ];
        let f = fold(&events, &[4]);
        assert_eq!(f.fresh, 6);
        assert_eq!(f.entities, [("a", 9), ("b", 2), ("c", 4)]);
        let got: Vec<_> = f
            .changes
            .iter()
            .map(|(e, m, c)| (*e, *m, c.replace, c.increment))
            .collect();
        assert_eq!(
            got,
            [
                (0, "n", None, 5),
                (1, "n", Some("7"), 1),
                (2, "n", Some("9"), 0)
            ]
        );
    }

    #[test]
    fn the_mirror_remembers_for_one_to_two_windows() {
        let mut m = Mirror::default();
        m.remember(b"x", 100);
        assert!(m.is_seen(b"x", 100, 10));
        assert!(m.is_seen(b"x", 119, 10));
        assert!(!m.is_seen(b"x", 120, 10));
        m.sweep(120, 10);
        assert!(m.seen.is_empty());
    }
}
