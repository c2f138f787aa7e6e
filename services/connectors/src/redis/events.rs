//! Events: a batch applied with its event ids remembered, in one script, so
//! a batch resent after a lost reply changes nothing.

use std::collections::HashMap;
use std::time::Duration;

use super::RedisBuffer;
use crate::error::ConnectorResult;
use crate::traits::{BufferEvent, BufferOp};

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
pub(super) const LUA_APPLY_EVENTS: &str = r"
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

impl RedisBuffer {
    /// Applies `events`, skipping those whose id was seen within
    /// `dedup_window`: the positions of the duplicates.
    pub(super) async fn apply_events_deduped(
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
}
