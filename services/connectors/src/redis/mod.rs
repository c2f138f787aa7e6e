//! Redis: the stats aggregator's [`Buffer`] (DESIGN.md §1 problem 1,
//! invariant 2).
//!
//! Key layout under a prefix `P` (by default `tidemark:stats:{<name>}:`;
//! keys are `P` immediately followed by the suffix):
//!
//! | key                   | type   | holds                                     |
//! |-----------------------|--------|-------------------------------------------|
//! | `Pdirty`              | set    | entities with live (not yet taken) values |
//! | `Pe:<entity>`         | hash   | live values: `i:<metric>`, `r:<metric>`   |
//! | `Ppending`            | string | sequence of the flush taken and not acked |
//! | `Packed`              | string | last acknowledged flush sequence          |
//! | `Pf:<seq>:dirty`      | set    | entities of flush `seq`                   |
//! | `Pf:<seq>:e:<entity>` | hash   | values of `entity` in flush `seq`         |
//! | `Pevents`             | string | events applied and not yet taken          |
//! | `Pf:<seq>:events`     | string | events of flush `seq`                     |
//! | `Ptimes`              | zset   | latest event time (µs) per live entity    |
//! | `Pf:<seq>:times`      | zset   | the same for the entities of flush `seq`  |
//! | `Pd:<bucket>`         | set    | event ids seen in a window-long bucket    |
//!
//! Why this shape:
//! - Increments and replaces of a metric live in separate fields (`i:`, `r:`)
//!   because a flush writes them differently (DynamoDB `ADD` vs `SET`), and a
//!   replace must void the increments before it but not those after it.
//! - A flush *renames* the dirty set and each entity hash to keys of its own
//!   sequence instead of copying them: renaming is O(1) per key, and once
//!   renamed, writes of new events create fresh live keys, so events arriving
//!   during a flush belong to the next one without any lock.
//! - `pending` makes a crashed flush visible to the next process: the flush
//!   keys stay until `ack_flush`, so the same sequence is taken out again with
//!   the same content (the store's conditional write on the sequence makes the
//!   replay a no-op), while a different sequence is refused.
//! - `acked` refuses a flush sequence that is not after the last acknowledged
//!   one: the store would treat such a flush as already applied and its
//!   increments would silently vanish.
//! - Event ids are remembered in the same script that applies the events: a
//!   batch resent after a lost reply finds every id taken and changes
//!   nothing, and a batch that failed remembers no id. They go into one set
//!   per window-long time bucket, expiring after three windows, and an id is
//!   a duplicate if any of the buckets around now holds it: remembered for
//!   at least the window (and at most three), with a few variadic calls per
//!   batch instead of a `SET NX EX` per event, which would bound ingestion.
//! - Every multi-key step is one Lua script (atomic in Redis): a process killed
//!   between two commands could otherwise lose or double-count a batch.
//! - The default prefix carries a hash tag (`{<name>}`) so every key of one
//!   buffer hashes to one cluster slot; the flush scripts derive entity keys
//!   from set members, which Redis Cluster only allows within one slot.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script, ServerErrorKind, Value};

use crate::error::{ConnectorError, ConnectorResult};
use crate::traits::{Buffer, BufferEvent, BufferOp, BufferStats, EntityDelta};

const BACKEND: &str = "redis";

/// Error code the scripts answer with when a flush-sequence condition fails.
const PRECONDITION_CODE: &str = "PRECONDITION";

/// Reads the content of flush `seq` as `{entity, {field, value, ...}, ...}`.
const LUA_FLUSH_CONTENT: &str = r"
local function flush_content(prefix, seq)
  local base = prefix .. 'f:' .. seq .. ':'
  local out = {}
  for _, e in ipairs(redis.call('SMEMBERS', base .. 'dirty')) do
    out[#out + 1] = e
    out[#out + 1] = redis.call('HGETALL', base .. 'e:' .. e)
    out[#out + 1] = redis.call('ZSCORE', base .. 'times', e) or ''
  end
  return out
end
";

/// KEYS: dirty set, then one live hash per entity.
/// ARGV: entity count `n`, the `n` entity names (aligned with KEYS[2..]),
/// then groups of (op, key index, metric, value) with op
/// `i` = add to the stored increment, `r` = replace (voids the increment),
/// `s` = set the increment (an increment that follows a replace in the batch).
const LUA_APPLY: &str = r"
local n = tonumber(ARGV[1])
local first = n + 2
-- A foreign key of the wrong type would fail a write halfway: refuse first.
local dirty_type = redis.call('TYPE', KEYS[1]).ok
if dirty_type ~= 'none' and dirty_type ~= 'set' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' is not a set')
end
for k = 2, #KEYS do
  local t = redis.call('TYPE', KEYS[k]).ok
  if t ~= 'none' and t ~= 'hash' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' is not a hash')
  end
end
-- Increments onto stored values are the only writes that can fail (overflow,
-- a corrupt field): they go first, and on a failure the ones already done are
-- undone, so the batch is all or none.
local done = {}
for a = first, #ARGV, 4 do
  if ARGV[a] == 'i' then
    local key = KEYS[tonumber(ARGV[a + 1])]
    local field = 'i:' .. ARGV[a + 2]
    local before = redis.call('HGET', key, field)
    local r = redis.pcall('HINCRBY', key, field, ARGV[a + 3])
    if type(r) == 'table' and r.err then
      for d = #done, 1, -1 do
        local u = done[d]
        if u[3] then redis.call('HSET', u[1], u[2], u[3]) else redis.call('HDEL', u[1], u[2]) end
      end
      return r
    end
    done[#done + 1] = {key, field, before}
  end
end
for a = first, #ARGV, 4 do
  local op = ARGV[a]
  local key = KEYS[tonumber(ARGV[a + 1])]
  if op == 'r' then
    redis.call('HSET', key, 'r:' .. ARGV[a + 2], ARGV[a + 3])
    redis.call('HDEL', key, 'i:' .. ARGV[a + 2])
  elseif op == 's' then
    redis.call('HSET', key, 'i:' .. ARGV[a + 2], ARGV[a + 3])
  end
end
for e = 2, n + 1 do
  redis.call('SADD', KEYS[1], ARGV[e])
end
return n
";

/// KEYS: dirty set, live event count, live event times, the dedup sets of
/// buckets b-1, b and b+1 (b = the caller's clock ÷ the window), then the
/// `n` live entity hashes.
/// ARGV: bucket TTL in seconds, `n`, `m`, then `n` pairs (entity name,
/// latest event time), then the `m` event ids, then `m` triples (KEYS index
/// of the entity hash, field `i:<metric>` or `r:<metric>`, value).
/// Returns the 0-based positions of the duplicates.
///
/// Cost is what bounds ingestion, so the script makes few Redis calls per
/// batch rather than several per event: ids are looked up with SMISMEMBER
/// and remembered with SADD (variadic), the increments of one field are
/// summed in Lua and applied with one HINCRBY, dirty entities and event
/// times are added with one SADD and one ZADD GT. Lua numbers are doubles:
/// a sum is folded only from deltas below 2^39 (10,000 of them stay below
/// 2^53, so exact); a larger delta gets its own HINCRBY (exact 64-bit).
/// Only an HINCRBY can fail (overflow, a corrupt field): everything done
/// before it is undone in reverse and no id is remembered, so the batch is
/// all or none.
const LUA_APPLY_EVENTS: &str = r"
local ttl = ARGV[1]
local n = tonumber(ARGV[2])
local m = tonumber(ARGV[3])
local idbase = 4 + 2 * n
local opbase = idbase + m
local LIM = 549755813888
-- unpack is bounded by the Lua C stack (8000): variadic calls go in chunks.
local function chunked(cmd, key, list, from, to, size, extra)
  for c = from, to, size do
    local last = math.min(c + size - 1, to)
    if extra then
      redis.call(cmd, key, extra, unpack(list, c, last))
    else
      redis.call(cmd, key, unpack(list, c, last))
    end
  end
end
local seen = {}
for b = 4, 6 do
  if redis.call('EXISTS', KEYS[b]) == 1 then
    for c = 0, m - 1, 1000 do
      local last = math.min(c + 999, m - 1)
      local found = redis.call('SMISMEMBER', KEYS[b], unpack(ARGV, idbase + c, idbase + last))
      for i = 1, #found do
        if found[i] == 1 then seen[c + i] = true end
      end
    end
  end
end
-- Per entity hash: field -> folded sum (a Lua number), big deltas kept
-- apart as text, and fields voided by a replace in this batch. Flat tables,
-- no allocation per event: this loop is the ingestion hot path.
local dups, fresh, undo, sums, bigs, voided, first = {}, {}, {}, {}, {}, {}, {}
for j = 1, m do
  local id = ARGV[idbase + j - 1]
  if seen[j] or first[id] then
    dups[#dups + 1] = j - 1
  else
    first[id] = true
    fresh[#fresh + 1] = id
    local a = opbase + 3 * (j - 1)
    local ki = tonumber(ARGV[a])
    local field = ARGV[a + 1]
    local value = ARGV[a + 2]
    local fields = sums[ki]
    if not fields then
      fields = {}
      sums[ki] = fields
    end
    if string.byte(field, 1) == 105 then
      local v = tonumber(value)
      if v and v > -LIM and v < LIM then
        fields[field] = (fields[field] or 0) + v
      else
        fields[field] = fields[field] or 0
        local b = bigs[ki]
        if not b then
          b = {}
          bigs[ki] = b
        end
        b[#b + 1] = {field, value}
      end
    else
      -- A replace voids the increments before it, stored and folded.
      local key = KEYS[ki]
      local ifield = 'i' .. string.sub(field, 2)
      undo[#undo + 1] = {key, field, redis.call('HGET', key, field), ifield,
        redis.call('HGET', key, ifield)}
      redis.call('HSET', key, field, value)
      redis.call('HDEL', key, ifield)
      if fields[ifield] then
        fields[ifield] = 0
        local v = voided[ki]
        if not v then
          v = {}
          voided[ki] = v
        end
        v[ifield] = true
        local b = bigs[ki]
        if b then
          for i = #b, 1, -1 do
            if b[i][1] == ifield then table.remove(b, i) end
          end
        end
      end
    end
  end
end
local done = {}
local function rollback()
  for d = #done, 1, -1 do
    local key, field, v = done[d][1], done[d][2], done[d][3]
    if v == '0' then
      -- Nothing to undo (and '-0' is no integer to Redis).
    elseif v == '-9223372036854775808' then
      redis.call('HINCRBY', key, field, '9223372036854775807')
      redis.call('HINCRBY', key, field, '1')
    elseif string.sub(v, 1, 1) == '-' then
      redis.call('HINCRBY', key, field, string.sub(v, 2))
    else
      redis.call('HINCRBY', key, field, '-' .. v)
    end
    if redis.call('HGET', key, field) == '0' then redis.call('HDEL', key, field) end
  end
  for d = #undo, 1, -1 do
    local u = undo[d]
    if u[3] then redis.call('HSET', u[1], u[2], u[3]) else redis.call('HDEL', u[1], u[2]) end
    if u[5] then redis.call('HSET', u[1], u[4], u[5]) else redis.call('HDEL', u[1], u[4]) end
  end
end
local function incr(key, field, v)
  local r = redis.pcall('HINCRBY', key, field, v)
  if type(r) == 'table' and r.err then
    rollback()
    return r
  end
  done[#done + 1] = {key, field, v}
end
for ki, fields in pairs(sums) do
  local key = KEYS[ki]
  local void = voided[ki]
  for field, sum in pairs(fields) do
    -- A field voided by a replace and not incremented after it: nothing.
    if sum ~= 0 or not (void and void[field]) then
      local text = string.format('%.0f', sum)
      if text == '-0' then text = '0' end
      local err = incr(key, field, text)
      if err then return err end
    end
  end
  local b = bigs[ki]
  if b then
    for _, big in ipairs(b) do
      local err = incr(key, big[1], big[2])
      if err then return err end
    end
  end
end
local touched = sums
if #fresh > 0 then
  chunked('SADD', KEYS[5], fresh, 1, #fresh, 1000)
  if redis.call('TTL', KEYS[5]) < 0 then
    redis.call('EXPIRE', KEYS[5], ttl)
  end
  local names, times = {}, {}
  for ki, _ in pairs(touched) do
    local e = 4 + 2 * (ki - 7)
    names[#names + 1] = ARGV[e]
    times[#times + 1] = ARGV[e + 1]
    times[#times + 1] = ARGV[e]
  end
  chunked('SADD', KEYS[1], names, 1, #names, 1000)
  chunked('ZADD', KEYS[3], times, 1, #times, 2000, 'GT')
  redis.call('INCRBY', KEYS[2], #fresh)
end
return dups
";

/// KEYS: pending. ARGV: prefix, entity.
const LUA_PEEK_PENDING: &str = r"
local pending = redis.call('GET', KEYS[1])
if not pending then
  return false
end
local base = ARGV[1] .. 'f:' .. pending .. ':'
return {pending, redis.call('HGETALL', base .. 'e:' .. ARGV[2]),
  redis.call('ZSCORE', base .. 'times', ARGV[2]) or ''}
";

/// KEYS: dirty set, live event count, pending, acked. ARGV: prefix.
/// Returns {live dirty, live events, pending or false, pending dirty,
/// pending events, acked or false}.
const LUA_STATS: &str = r"
local pending = redis.call('GET', KEYS[3])
local pdirty, pevents = 0, '0'
if pending then
  local base = ARGV[1] .. 'f:' .. pending .. ':'
  pdirty = redis.call('SCARD', base .. 'dirty')
  pevents = redis.call('GET', base .. 'events') or '0'
end
return {redis.call('SCARD', KEYS[1]), redis.call('GET', KEYS[2]) or '0', pending or '',
  pdirty, pevents, redis.call('GET', KEYS[4]) or ''}
";

/// KEYS: dirty set, pending, acked. ARGV: prefix, sequence (decimal, no
/// leading zeros, so strings of equal length compare like numbers).
const LUA_TAKE: &str = r"
local pending = redis.call('GET', KEYS[2])
if pending then
  if pending == ARGV[2] then
    return flush_content(ARGV[1], pending)
  end
  return redis.error_reply('PRECONDITION flush ' .. pending ..
    ' is still pending; complete and acknowledge it before flush ' .. ARGV[2])
end
local acked = redis.call('GET', KEYS[3])
if acked and (#acked > #ARGV[2] or (#acked == #ARGV[2] and acked >= ARGV[2])) then
  return redis.error_reply('PRECONDITION flush ' .. ARGV[2] ..
    ' is not after the last acknowledged flush ' .. acked)
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
local base = ARGV[1] .. 'f:' .. ARGV[2] .. ':'
redis.call('RENAME', KEYS[1], base .. 'dirty')
for _, e in ipairs(redis.call('SMEMBERS', base .. 'dirty')) do
  local live = ARGV[1] .. 'e:' .. e
  if redis.call('EXISTS', live) == 1 then
    redis.call('RENAME', live, base .. 'e:' .. e)
  end
end
for _, k in ipairs({'events', 'times'}) do
  if redis.call('EXISTS', ARGV[1] .. k) == 1 then
    redis.call('RENAME', ARGV[1] .. k, base .. k)
  end
end
redis.call('SET', KEYS[2], ARGV[2])
return flush_content(ARGV[1], ARGV[2])
";

/// KEYS: pending, acked. ARGV: prefix, sequence. Acknowledging a flush that
/// is not the pending one does nothing (a repeated ack is harmless).
const LUA_ACK: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return 0
end
local base = ARGV[1] .. 'f:' .. ARGV[2] .. ':'
for _, e in ipairs(redis.call('SMEMBERS', base .. 'dirty')) do
  redis.call('DEL', base .. 'e:' .. e)
end
redis.call('DEL', base .. 'dirty', base .. 'events', base .. 'times', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
";

/// KEYS: pending. ARGV: prefix. One script so an ack racing with the read
/// cannot yield half a flush.
const LUA_PENDING: &str = r"
local pending = redis.call('GET', KEYS[1])
if not pending then
  return false
end
return {pending, flush_content(ARGV[1], pending)}
";

struct Scripts {
    apply: Script,
    apply_events: Script,
    take: Script,
    ack: Script,
    pending: Script,
    peek_pending: Script,
    stats: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            apply: Script::new(LUA_APPLY),
            apply_events: Script::new(LUA_APPLY_EVENTS),
            peek_pending: Script::new(LUA_PEEK_PENDING),
            stats: Script::new(LUA_STATS),
            take: Script::new(&format!("{LUA_FLUSH_CONTENT}{LUA_TAKE}")),
            ack: Script::new(LUA_ACK),
            pending: Script::new(&format!("{LUA_FLUSH_CONTENT}{LUA_PENDING}")),
        }
    }
}

/// Maps a Redis error to a [`ConnectorError`]: connection trouble, timeouts
/// and a server that is busy, loading or failing over are retryable; a flush
/// sequence refused by a script is a precondition; the rest is terminal.
pub fn classify(err: &RedisError) -> ConnectorError {
    let retryable = || ConnectorError::Retryable {
        backend: BACKEND,
        message: err.to_string(),
        retry_after: None,
    };
    if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
    {
        return retryable();
    }
    match err.kind() {
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::ReadOnly,
        ) => return retryable(),
        ErrorKind::InvalidClientConfig => return ConnectorError::invalid(BACKEND, err.to_string()),
        _ => {}
    }
    match err.code() {
        // BUSY: another script is running; OOM: memory frees up as flushes
        // are acknowledged.
        Some("BUSY" | "LOADING" | "TRYAGAIN" | "OOM") => retryable(),
        Some(PRECONDITION_CODE) => {
            ConnectorError::Precondition(err.detail().unwrap_or_default().to_owned())
        }
        _ => ConnectorError::terminal(BACKEND, err.to_string()),
    }
}

impl From<RedisError> for ConnectorError {
    fn from(err: RedisError) -> Self {
        classify(&err)
    }
}

/// A reconnecting connection to the Redis at `url`, as the buffers use it.
///
/// # Errors
/// `InvalidInput` for a malformed URL, `Retryable` when Redis cannot be
/// reached.
pub async fn connection(url: &str) -> ConnectorResult<ConnectionManager> {
    let client = redis::Client::open(url)
        .map_err(|e| ConnectorError::invalid(BACKEND, format!("{url}: {e}")))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        // Generous: a flush of many entities is one script.
        .set_response_timeout(Some(Duration::from_secs(30)));
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

/// The aggregation buffer in Redis (see the module documentation for the
/// layout). Cheap to clone; clones share the connection.
///
/// An `apply` that fails with a retryable error may or may not have landed
/// (the reply was lost, not necessarily the write): the caller decides
/// whether to retry it.
#[derive(Clone)]
pub struct RedisBuffer {
    conn: ConnectionManager,
    prefix: String,
    scripts: Arc<Scripts>,
}

impl RedisBuffer {
    /// The default key prefix of the buffer `name`; the hash tag keeps all
    /// its keys in one cluster slot.
    pub fn prefix_for(name: &str) -> String {
        format!("tidemark:stats:{{{name}}}:")
    }

    /// Connects to `url` (`redis://host:port/db`) with a reconnecting
    /// connection and bounded connect and response timeouts.
    ///
    /// # Errors
    /// `InvalidInput` for a malformed URL, `Retryable` when Redis cannot be
    /// reached.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> ConnectorResult<Self> {
        Ok(Self::new(connection(url).await?, prefix))
    }

    /// A buffer over an existing connection, its keys under `prefix`.
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            scripts: Arc::new(Scripts::new()),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// PING: whether Redis answers, for the health service.
    ///
    /// # Errors
    /// The classified failure when Redis does not answer `PONG`.
    #[tracing::instrument(skip_all, fields(prefix = %self.prefix))]
    pub async fn ping(&self) -> ConnectorResult<()> {
        let pong: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(ConnectorError::terminal(
                BACKEND,
                format!("PING answered {pong:?}"),
            ))
        }
    }

    /// The last acknowledged flush sequence, if any flush was acknowledged.
    ///
    /// # Errors
    /// The classified Redis failure.
    #[tracing::instrument(skip_all, fields(prefix = %self.prefix))]
    pub async fn last_acked(&self) -> ConnectorResult<Option<u64>> {
        let acked: Option<String> = redis::cmd("GET")
            .arg(self.key("acked"))
            .query_async(&mut self.conn())
            .await?;
        acked
            .map(|s| {
                s.parse()
                    .map_err(|_| corrupt(&format!("acked sequence {s:?}")))
            })
            .transpose()
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn entity_key(&self, entity: &str) -> String {
        format!("{}e:{entity}", self.prefix)
    }
}

fn corrupt(what: &str) -> ConnectorError {
    ConnectorError::terminal(BACKEND, format!("corrupt buffer: {what}"))
}

fn check_sequence(sequence: u64) -> ConnectorResult<()> {
    if sequence == 0 {
        return Err(ConnectorError::invalid(
            BACKEND,
            "flush sequence must be positive",
        ));
    }
    Ok(())
}

/// What one batch does to one metric of one entity, folded in order.
#[derive(Default)]
struct MetricChange {
    replace: Option<String>,
    /// Sum of the increments after the last replace of the batch (or of all
    /// of them when there is none).
    increment: Option<i64>,
}

/// Folds a batch per (entity, metric), so the script applies at most one
/// increment per field and an `i64` overflow inside the batch is refused
/// before anything is written.
fn fold_batch(ops: &[BufferOp]) -> ConnectorResult<BTreeMap<&str, BTreeMap<&str, MetricChange>>> {
    let mut out: BTreeMap<&str, BTreeMap<&str, MetricChange>> = BTreeMap::new();
    for op in ops {
        match op {
            BufferOp::Increment {
                entity,
                metric,
                delta,
            } => {
                let change = out.entry(entity).or_default().entry(metric).or_default();
                let sum = change
                    .increment
                    .unwrap_or(0)
                    .checked_add(*delta)
                    .ok_or_else(|| {
                        ConnectorError::invalid(
                            BACKEND,
                            format!("increments of {entity}/{metric} overflow i64 in one batch"),
                        )
                    })?;
                change.increment = Some(sum);
            }
            BufferOp::Replace {
                entity,
                metric,
                value,
            } => {
                let change = out.entry(entity).or_default().entry(metric).or_default();
                change.replace = Some(value.clone());
                change.increment = None;
            }
        }
    }
    Ok(out)
}

fn text(value: Value) -> ConnectorResult<String> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes).map_err(|e| corrupt(&format!("non-UTF-8 text: {e}")))
        }
        Value::SimpleString(s) => Ok(s),
        Value::Int(n) => Ok(n.to_string()),
        other => Err(corrupt(&format!("expected text, got {other:?}"))),
    }
}

fn array(value: Value) -> ConnectorResult<Vec<Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(&format!("expected an array, got {other:?}"))),
    }
}

/// Builds an entity's delta from a flat `field, value, ...` hash reply.
fn delta_from_fields(entity: String, fields: Vec<Value>) -> ConnectorResult<EntityDelta> {
    let mut delta = EntityDelta {
        entity,
        ..EntityDelta::default()
    };
    let mut it = fields.into_iter();
    while let (Some(field), Some(value)) = (it.next(), it.next()) {
        let (field, value) = (text(field)?, text(value)?);
        if field == "t" {
            let micros = value
                .parse()
                .map_err(|_| corrupt(&format!("event time {value:?}")))?;
            delta.last_event_micros = Some(micros);
        } else if let Some(metric) = field.strip_prefix("i:") {
            let n = value
                .parse()
                .map_err(|_| corrupt(&format!("increment {field}={value:?}")))?;
            delta.increments.insert(metric.to_owned(), n);
        } else if let Some(metric) = field.strip_prefix("r:") {
            delta.replaces.insert(metric.to_owned(), value);
        } else {
            return Err(corrupt(&format!("unknown field {field:?}")));
        }
    }
    Ok(delta)
}

/// An event time score (ZSCORE: integral microseconds, exact in a double),
/// or `None` for an empty reply.
fn event_time(value: Value) -> ConnectorResult<Option<i64>> {
    let s = match value {
        Value::Nil => return Ok(None),
        Value::Double(d) => return Ok(Some(micros_of(d))),
        other => text(other)?,
    };
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<f64>()
        .map(|d| Some(micros_of(d)))
        .map_err(|_| corrupt(&format!("event time {s:?}")))
}

#[allow(clippy::cast_possible_truncation)]
fn micros_of(score: f64) -> i64 {
    // Scores are integral microseconds below 2^53: the cast is exact.
    score as i64
}

/// Decodes `{entity, {field, value, ...}, time, ...}` into deltas sorted by
/// entity.
fn flush_content(value: Value) -> ConnectorResult<Vec<EntityDelta>> {
    let mut it = array(value)?.into_iter();
    let mut out = Vec::new();
    while let Some(entity) = it.next() {
        let (Some(fields), Some(time)) = (it.next(), it.next()) else {
            return Err(corrupt("flush content without fields"));
        };
        let mut delta = delta_from_fields(text(entity)?, array(fields)?)?;
        delta.last_event_micros = event_time(time)?;
        out.push(delta);
    }
    out.sort_by(|a, b| a.entity.cmp(&b.entity));
    Ok(out)
}

#[async_trait]
impl Buffer for RedisBuffer {
    #[tracing::instrument(skip_all, fields(prefix = %self.prefix, ops = ops.len()))]
    async fn apply(&self, ops: &[BufferOp]) -> ConnectorResult<()> {
        let batch = fold_batch(ops)?;
        if batch.is_empty() {
            return Ok(());
        }
        let mut invocation = self.scripts.apply.prepare_invoke();
        invocation.key(self.key("dirty")).arg(batch.len());
        for entity in batch.keys() {
            invocation.key(self.entity_key(entity)).arg(*entity);
        }
        for (index, metrics) in batch.values().enumerate() {
            // KEYS[1] is the dirty set; entity hashes follow in batch order.
            let key = index + 2;
            for (metric, change) in metrics {
                match (&change.replace, change.increment) {
                    (None, Some(delta)) => {
                        invocation.arg("i").arg(key).arg(*metric).arg(delta);
                    }
                    (Some(value), increment) => {
                        invocation.arg("r").arg(key).arg(*metric).arg(value);
                        if let Some(delta) = increment {
                            invocation.arg("s").arg(key).arg(*metric).arg(delta);
                        }
                    }
                    (None, None) => {}
                }
            }
        }
        let _: i64 = invocation.invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(prefix = %self.prefix, sequence = sequence))]
    async fn take_for_flush(&self, sequence: u64) -> ConnectorResult<Vec<EntityDelta>> {
        check_sequence(sequence)?;
        let content: Value = self
            .scripts
            .take
            .key(self.key("dirty"))
            .key(self.key("pending"))
            .key(self.key("acked"))
            .arg(&self.prefix)
            .arg(sequence)
            .invoke_async(&mut self.conn())
            .await?;
        flush_content(content)
    }

    #[tracing::instrument(skip_all, fields(prefix = %self.prefix, sequence = sequence))]
    async fn ack_flush(&self, sequence: u64) -> ConnectorResult<()> {
        let _: i64 = self
            .scripts
            .ack
            .key(self.key("pending"))
            .key(self.key("acked"))
            .arg(&self.prefix)
            .arg(sequence)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(prefix = %self.prefix))]
    async fn pending_flush(&self) -> ConnectorResult<Option<(u64, Vec<EntityDelta>)>> {
        let reply: Value = self
            .scripts
            .pending
            .key(self.key("pending"))
            .arg(&self.prefix)
            .invoke_async(&mut self.conn())
            .await?;
        if matches!(reply, Value::Nil) {
            return Ok(None);
        }
        let mut it = array(reply)?.into_iter();
        let (Some(sequence), Some(content)) = (it.next(), it.next()) else {
            return Err(corrupt("pending flush reply"));
        };
        let sequence = text(sequence)?;
        let sequence = sequence
            .parse()
            .map_err(|_| corrupt(&format!("pending sequence {sequence:?}")))?;
        Ok(Some((sequence, flush_content(content)?)))
    }

    #[tracing::instrument(skip_all, fields(prefix = %self.prefix, entity = entity))]
    async fn peek(&self, entity: &str) -> ConnectorResult<EntityDelta> {
        let (fields, time): (Value, Value) = redis::pipe()
            .cmd("HGETALL")
            .arg(self.entity_key(entity))
            .cmd("ZSCORE")
            .arg(self.key("times"))
            .arg(entity)
            .query_async(&mut self.conn())
            .await?;
        let mut delta = delta_from_fields(entity.to_owned(), array(fields)?)?;
        delta.last_event_micros = event_time(time)?;
        Ok(delta)
    }

    #[tracing::instrument(skip_all, fields(prefix = %self.prefix))]
    async fn dirty_count(&self) -> ConnectorResult<u64> {
        Ok(redis::cmd("SCARD")
            .arg(self.key("dirty"))
            .query_async(&mut self.conn())
            .await?)
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
        let now = u64::try_from(crate::now_micros() / 1_000_000).unwrap_or(0);
        let bucket = now / window;
        // Entities in order of first appearance, with their latest event time.
        let mut entities: Vec<(&str, i64)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(events.len());
        let mut slots = Vec::with_capacity(events.len());
        for event in events {
            let entity = event.op.entity();
            let slot = *index.entry(entity).or_insert_with(|| {
                entities.push((entity, event.time_micros));
                entities.len() - 1
            });
            let latest = &mut entities[slot].1;
            *latest = (*latest).max(event.time_micros);
            slots.push(slot);
        }
        let mut invocation = self.scripts.apply_events.prepare_invoke();
        invocation
            .key(self.key("dirty"))
            .key(self.key("events"))
            .key(self.key("times"));
        for b in [bucket.saturating_sub(1), bucket, bucket + 1] {
            invocation.key(self.key(&format!("d:{b}")));
        }
        // Three windows: an id stays findable while its bucket is b-1, b or b+1.
        invocation
            .arg(window.saturating_mul(3))
            .arg(entities.len())
            .arg(events.len());
        for (entity, latest) in &entities {
            invocation
                .key(self.entity_key(entity))
                .arg(*entity)
                .arg(*latest);
        }
        for event in events {
            invocation.arg(event.id.as_bytes());
        }
        let mut field = String::with_capacity(64);
        for (event, slot) in events.iter().zip(&slots) {
            // KEYS[1..6]: dirty, events, times and the three dedup buckets.
            invocation.arg(slot + 7);
            field.clear();
            match &event.op {
                BufferOp::Increment { metric, delta, .. } => {
                    field.push_str("i:");
                    field.push_str(metric);
                    invocation.arg(field.as_bytes()).arg(*delta);
                }
                BufferOp::Replace { metric, value, .. } => {
                    field.push_str("r:");
                    field.push_str(metric);
                    invocation.arg(field.as_bytes()).arg(value.as_bytes());
                }
            }
        }
        let dups: Vec<usize> = invocation.invoke_async(&mut self.conn()).await?;
        Ok(dups)
    }

    #[tracing::instrument(skip_all, fields(prefix = %self.prefix, entity = entity))]
    async fn peek_pending(&self, entity: &str) -> ConnectorResult<Option<(u64, EntityDelta)>> {
        let reply: Value = self
            .scripts
            .peek_pending
            .key(self.key("pending"))
            .arg(&self.prefix)
            .arg(entity)
            .invoke_async(&mut self.conn())
            .await?;
        if matches!(reply, Value::Nil) {
            return Ok(None);
        }
        let mut it = array(reply)?.into_iter();
        let (Some(sequence), Some(fields), Some(time)) = (it.next(), it.next(), it.next()) else {
            return Err(corrupt("pending peek reply"));
        };
        let fields = array(fields)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let mut delta = delta_from_fields(entity.to_owned(), fields)?;
        delta.last_event_micros = event_time(time)?;
        Ok(Some((parse_sequence(&text(sequence)?)?, delta)))
    }

    #[tracing::instrument(skip_all, fields(prefix = %self.prefix))]
    async fn stats(&self) -> ConnectorResult<BufferStats> {
        let reply: Value = self
            .scripts
            .stats
            .key(self.key("dirty"))
            .key(self.key("events"))
            .key(self.key("pending"))
            .key(self.key("acked"))
            .arg(&self.prefix)
            .invoke_async(&mut self.conn())
            .await?;
        let parts = array(reply)?
            .into_iter()
            .map(text)
            .collect::<ConnectorResult<Vec<String>>>()?;
        let [dirty, events, pending, pending_dirty, pending_events, acked] =
            <[String; 6]>::try_from(parts).map_err(|_| corrupt("stats reply"))?;
        let count = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| corrupt(&format!("count {s:?}")))
        };
        let optional = |s: &str| {
            if s.is_empty() {
                Ok(None)
            } else {
                parse_sequence(s).map(Some)
            }
        };
        Ok(BufferStats {
            dirty_keys: count(&dirty)? + count(&pending_dirty)?,
            pending_events: count(&events)? + count(&pending_events)?,
            pending_flush: optional(&pending)?,
            last_acked: optional(&acked)?,
        })
    }
}

fn parse_sequence(s: &str) -> ConnectorResult<u64> {
    s.parse()
        .map_err(|_| corrupt(&format!("flush sequence {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(entity: &str, metric: &str, delta: i64) -> BufferOp {
        BufferOp::Increment {
            entity: entity.into(),
            metric: metric.into(),
            delta,
        }
    }

    fn replace(entity: &str, metric: &str, value: &str) -> BufferOp {
        BufferOp::Replace {
            entity: entity.into(),
            metric: metric.into(),
            value: value.into(),
        }
    }

    #[test]
    fn a_batch_folds_like_the_reference_buffer() {
        let ops = [
            inc("a", "n", 2),
            inc("a", "n", 3),
            replace("b", "n", "7"),
            inc("b", "n", 1),
            inc("b", "n", 1),
            inc("c", "n", 4),
            replace("c", "n", "9"),
        ];
        let batch = fold_batch(&ops).unwrap();
        let a = &batch["a"]["n"];
        assert_eq!((a.replace.as_deref(), a.increment), (None, Some(5)));
        let b = &batch["b"]["n"];
        assert_eq!((b.replace.as_deref(), b.increment), (Some("7"), Some(2)));
        let c = &batch["c"]["n"];
        assert_eq!((c.replace.as_deref(), c.increment), (Some("9"), None));
    }

    #[test]
    fn an_overflowing_batch_is_refused_before_any_write() {
        let err = fold_batch(&[inc("a", "n", i64::MAX), inc("a", "n", 1)])
            .err()
            .expect("overflow");
        assert!(
            matches!(err, ConnectorError::InvalidInput { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn errors_are_classified() {
        let io = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(classify(&io).is_retryable());
        let timeout = RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "slow"));
        assert!(classify(&timeout).is_retryable());
        let other = RedisError::from((ErrorKind::UnexpectedReturnType, "bad type"));
        assert!(
            matches!(classify(&other), ConnectorError::Terminal { .. }),
            "{other:?}"
        );
    }
}
