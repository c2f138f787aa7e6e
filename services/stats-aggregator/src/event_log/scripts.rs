//! The id log's scripts (module documentation of [`super`]).

/// KEYS: log, log times, meta, dirty set, live event count, live event
/// times, then the `n` live entity hashes.
/// ARGV: now (seconds), window (seconds), ids blob, fresh event count, `n`,
/// then `n` pairs (entity, latest event time), then triples (KEYS index,
/// field, value) with field `i:<metric>` = HINCRBY, `r:<metric>` = replace
/// (voids the increment), `s:<metric>` = set the increment (increments after
/// a replace), and last the epoch and position the caller's mirror is at
/// (last, so the rest is encoded before the mirror is locked).
/// Returns {'ok', new position} or {'stale', epoch, base, position}.
pub(super) const LUA_INGEST: &str = r"
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
pub(super) const LUA_READ: &str = r"
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

/// KEYS: log, meta. ARGV: the mirror's epoch and position.
/// Answers 1, after a write for `WAIT` to count, when the log is still at
/// that epoch and at or past that position (so it holds what the mirror
/// decided duplicates from); 0 otherwise, writing nothing.
pub(super) const LUA_CONFIRM: &str = r"
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'base')
if meta[1] ~= ARGV[1] then
  return 0
end
if tonumber(meta[2] or '0') + redis.call('LLEN', KEYS[1]) < tonumber(ARGV[2]) then
  return 0
end
redis.call('HINCRBY', KEYS[2], 'confirmations', 1)
return 1
";
