//! The counters: a batch folded per metric and applied by one script, and
//! the flush swap-out (take, acknowledge, a pending flush read back), each
//! one atomic script.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::reply::{
    array, corrupt, delta_from_fields, event_time, flush_content, parse_sequence, text,
};
use super::{BACKEND, RedisBuffer};
use crate::error::{ConnectorError, ConnectorResult};
use crate::traits::{Buffer, BufferEvent, BufferOp, BufferStats, EntityDelta};

/// Reads the content of flush `seq` as `{entity, {field, value, ...}, ...}`.
pub(super) const LUA_FLUSH_CONTENT: &str = r"
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
pub(super) const LUA_APPLY: &str = r"
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

/// KEYS: pending. ARGV: prefix, entity.
pub(super) const LUA_PEEK_PENDING: &str = r"
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
pub(super) const LUA_STATS: &str = r"
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
pub(super) const LUA_TAKE: &str = r"
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
pub(super) const LUA_ACK: &str = r"
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
pub(super) const LUA_PENDING: &str = r"
local pending = redis.call('GET', KEYS[1])
if not pending then
  return false
end
return {pending, flush_content(ARGV[1], pending)}
";

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
        self.apply_events_deduped(events, dedup_window).await
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
}
