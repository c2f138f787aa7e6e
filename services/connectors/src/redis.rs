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
//! - Every multi-key step is one Lua script (atomic in Redis): a process killed
//!   between two commands could otherwise lose or double-count a batch.
//! - The default prefix carries a hash tag (`{<name>}`) so every key of one
//!   buffer hashes to one cluster slot; the flush scripts derive entity keys
//!   from set members, which Redis Cluster only allows within one slot.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script, ServerErrorKind, Value};

use crate::error::{ConnectorError, ConnectorResult};
use crate::traits::{Buffer, BufferOp, EntityDelta};

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
redis.call('DEL', base .. 'dirty', KEYS[1])
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
    take: Script,
    ack: Script,
    pending: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            apply: Script::new(LUA_APPLY),
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
        let client = redis::Client::open(url)
            .map_err(|e| ConnectorError::invalid(BACKEND, format!("{url}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            // Generous: a flush of many entities is one script.
            .set_response_timeout(Some(Duration::from_secs(30)));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self::new(conn, prefix))
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
        if let Some(metric) = field.strip_prefix("i:") {
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

/// Decodes `{entity, {field, value, ...}, ...}` into deltas sorted by entity.
fn flush_content(value: Value) -> ConnectorResult<Vec<EntityDelta>> {
    let mut it = array(value)?.into_iter();
    let mut out = Vec::new();
    while let Some(entity) = it.next() {
        let fields = it
            .next()
            .ok_or_else(|| corrupt("flush content without fields"))?;
        out.push(delta_from_fields(text(entity)?, array(fields)?)?);
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
        let fields: Value = redis::cmd("HGETALL")
            .arg(self.entity_key(entity))
            .query_async(&mut self.conn())
            .await?;
        delta_from_fields(entity.to_owned(), array(fields)?)
    }

    #[tracing::instrument(skip_all, fields(prefix = %self.prefix))]
    async fn dirty_count(&self) -> ConnectorResult<u64> {
        Ok(redis::cmd("SCARD")
            .arg(self.key("dirty"))
            .query_async(&mut self.conn())
            .await?)
    }
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
