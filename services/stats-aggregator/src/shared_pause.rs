//! The writer pause as every replica sees it: kept in Redis next to the
//! buffer the replicas share, so a PauseWriters that reaches one replica
//! stops the flushes of all of them (DESIGN.md invariant 9).
//!
//! Keys under the buffer's prefix `P` (its hash tag keeps them in the
//! buffer's cluster slot, so the scripts may touch several):
//!
//! | key           | type   | holds                                              |
//! |---------------|--------|----------------------------------------------------|
//! | `Ppause`      | hash   | `id`, `mode`, `reason`, `since`, `until` (ms on the Redis clock); its TTL is `max_pause` |
//! | `Ppause:seq`  | string | the last pause id given out                        |
//! | `Ppause:acks` | hash   | replica → the pause id it confirmed                |
//! | `Preplicas`   | zset   | replica → when its heartbeat expires (ms, Redis clock) |
//!
//! Why:
//! - Every PauseWriters gives out a new id, and a replica confirms an id only
//!   once its own flush lock is free, after it has seen the pause: so "every
//!   live replica confirmed the current id" means no flush runs anywhere and
//!   every later one reads the pause first and refuses.
//! - Liveness is a heartbeat with an expiry rather than a list kept by
//!   hand: a replica that died stops being waited for after the expiry, and a
//!   replica that lost Redis for that long stops flushing by itself (it
//!   checks its own heartbeat before each write), so it cannot be writing
//!   unseen.
//! - Times are Redis's own clock (`TIME` in the scripts), never a replica's:
//!   the replicas' clocks may disagree.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tidemark_connectors::{ConnectorError, ConnectorResult};

use crate::lazy_redis::LazyRedis;

const BACKEND: &str = "redis";

/// The Redis clock in milliseconds, in a script.
const LUA_NOW: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
";

/// KEYS: pause, acks, seq. ARGV: mode, reason, max pause in ms (0: none).
/// Returns {id, mode, reason, since, until}.
const LUA_PAUSE: &str = r"
local now = now_ms()
local id = redis.call('INCR', KEYS[3])
local since = redis.call('HGET', KEYS[1], 'since') or string.format('%.0f', now)
local max = tonumber(ARGV[3])
local ends = ''
if max > 0 then ends = string.format('%.0f', now + max) end
redis.call('HSET', KEYS[1], 'id', id, 'mode', ARGV[1], 'reason', ARGV[2],
  'since', since, 'until', ends)
if max > 0 then
  redis.call('PEXPIRE', KEYS[1], max)
else
  redis.call('PERSIST', KEYS[1])
end
redis.call('DEL', KEYS[2])
return {tostring(id), ARGV[1], ARGV[2], since, ends}
";

/// KEYS: pause, acks. ARGV: replica.
/// Returns {} or {id, mode, reason, since, until, the replica's ack or ''}.
const LUA_READ: &str = r"
local p = redis.call('HMGET', KEYS[1], 'id', 'mode', 'reason', 'since', 'until')
if not p[1] then
  return {}
end
return {p[1], p[2] or '', p[3] or '', p[4] or '', p[5] or '',
  redis.call('HGET', KEYS[2], ARGV[1]) or ''}
";

/// KEYS: pause, acks. ARGV: replica, pause id. Confirms only the pause in
/// force (a replica that saw an older one confirms nothing).
const LUA_ACK: &str = r"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
";

/// KEYS: replicas. ARGV: replica, expiry in ms. Forgets expired replicas.
const LUA_HEARTBEAT: &str = r"
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now))
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
return 1
";

/// KEYS: pause, acks, replicas. Returns {id, mode, reason, since, until,
/// {live replicas}, {their acks or ''}} (id '' when not paused).
const LUA_STATUS: &str = r"
local p = redis.call('HMGET', KEYS[1], 'id', 'mode', 'reason', 'since', 'until')
local live = redis.call('ZRANGEBYSCORE', KEYS[3], string.format('%.0f', now_ms()), '+inf')
local acks = {}
if #live > 0 then
  acks = redis.call('HMGET', KEYS[2], unpack(live))
  for i = 1, #live do acks[i] = acks[i] or '' end
end
return {p[1] or '', p[2] or '', p[3] or '', p[4] or '', p[5] or '', live, acks}
";

/// How paused writers treat new events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseMode {
    Buffer,
    Reject,
}

impl PauseMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Buffer => "buffer",
            Self::Reject => "reject",
        }
    }
}

/// A pause in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pause {
    /// Given out by Redis, new at every PauseWriters; 0 for a pause kept in
    /// one process only.
    pub id: u64,
    pub mode: PauseMode,
    pub reason: String,
    pub since: SystemTime,
    /// When it ends by itself (`max_pause`).
    pub until: Option<SystemTime>,
}

impl Pause {
    /// Whether its `max_pause` has passed.
    pub fn ended(&self, now: SystemTime) -> bool {
        self.until.is_some_and(|u| now >= u)
    }
}

/// The pause and who confirmed it.
#[derive(Clone, Debug, Default)]
pub struct Confirmations {
    pub pause: Option<Pause>,
    /// Live replicas (a heartbeat not yet expired).
    pub live: Vec<String>,
    /// Live replicas that have not confirmed the pause in force (all of
    /// them when there is none).
    pub missing: Vec<String>,
}

/// One replica's handle on the shared pause.
pub struct SharedPause {
    conn: LazyRedis,
    prefix: String,
    replica: String,
    pause: Script,
    read: Script,
    ack: Script,
    heartbeat: Script,
    status: Script,
}

fn corrupt(what: &str) -> ConnectorError {
    ConnectorError::terminal(BACKEND, format!("corrupt writer pause: {what}"))
}

fn text(v: Value) -> ConnectorResult<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).map_err(|_| corrupt("non-UTF-8 text")),
        Value::SimpleString(s) => Ok(s),
        Value::Int(n) => Ok(n.to_string()),
        Value::Nil => Ok(String::new()),
        other => Err(corrupt(&format!("expected text, got {other:?}"))),
    }
}

fn texts(v: Value) -> ConnectorResult<Vec<String>> {
    match v {
        Value::Array(items) => items.into_iter().map(text).collect(),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(&format!("expected an array, got {other:?}"))),
    }
}

fn millis(text: &str) -> ConnectorResult<Option<SystemTime>> {
    if text.is_empty() {
        return Ok(None);
    }
    let ms: u64 = text
        .parse()
        .map_err(|_| corrupt(&format!("time {text:?}")))?;
    Ok(Some(UNIX_EPOCH + Duration::from_millis(ms)))
}

/// A pause from `{id, mode, reason, since, until}`; `None` for an empty id.
fn pause_from(fields: &[String]) -> ConnectorResult<Option<Pause>> {
    let [id, mode, reason, since, until, ..] = fields else {
        return Err(corrupt("short reply"));
    };
    if id.is_empty() {
        return Ok(None);
    }
    Ok(Some(Pause {
        id: id.parse().map_err(|_| corrupt(&format!("id {id:?}")))?,
        mode: match mode.as_str() {
            "buffer" => PauseMode::Buffer,
            "reject" => PauseMode::Reject,
            other => return Err(corrupt(&format!("mode {other:?}"))),
        },
        reason: reason.clone(),
        since: millis(since)?.unwrap_or(UNIX_EPOCH),
        until: millis(until)?,
    }))
}

impl SharedPause {
    /// The pause of the buffer under `prefix` in the Redis at `url`, seen by
    /// `replica` (a name unique among the live replicas). Connects on first
    /// use, so a service can be assembled before Redis answers.
    pub fn new(url: &str, prefix: &str, replica: impl Into<String>) -> Self {
        let script = |body: &str| Script::new(&format!("{LUA_NOW}{body}"));
        Self {
            conn: LazyRedis::new(url),
            prefix: prefix.to_owned(),
            replica: replica.into(),
            pause: script(LUA_PAUSE),
            read: Script::new(LUA_READ),
            ack: Script::new(LUA_ACK),
            heartbeat: script(LUA_HEARTBEAT),
            status: script(LUA_STATUS),
        }
    }

    /// A replica name: the host (the pod's name in Kubernetes), the process
    /// and a random part, so two engines of one process differ too.
    pub fn replica_name() -> String {
        use std::hash::{BuildHasher as _, Hasher as _};
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "replica".to_owned());
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        format!(
            "{host}-{}-{:06x}",
            std::process::id(),
            h.finish() & 0xff_ffff
        )
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    async fn conn(&self) -> ConnectorResult<ConnectionManager> {
        self.conn.get().await
    }

    /// Sets the pause (a new id; `since` kept when one is in force already)
    /// and clears every confirmation.
    ///
    /// # Errors
    /// The classified Redis failure.
    #[tracing::instrument(skip_all, fields(prefix = %self.prefix, ?mode))]
    pub async fn set(
        &self,
        mode: PauseMode,
        reason: &str,
        max_pause: Option<Duration>,
    ) -> ConnectorResult<Pause> {
        // 0 means none: a positive pause under a millisecond is one.
        let max_ms = max_pause.map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        let reply: Value = self
            .pause
            .key(self.key("pause"))
            .key(self.key("pause:acks"))
            .key(self.key("pause:seq"))
            .arg(mode.as_str())
            .arg(reason)
            .arg(max_ms)
            .invoke_async(&mut self.conn().await?)
            .await?;
        pause_from(&texts(reply)?)?.ok_or_else(|| corrupt("no pause after setting it"))
    }

    /// Ends the pause for every replica.
    ///
    /// # Errors
    /// The classified Redis failure.
    #[tracing::instrument(skip_all, fields(prefix = %self.prefix))]
    pub async fn clear(&self) -> ConnectorResult<bool> {
        let removed: i64 = redis::cmd("DEL")
            .arg(self.key("pause"))
            .arg(self.key("pause:acks"))
            .query_async(&mut self.conn().await?)
            .await?;
        Ok(removed > 0)
    }

    /// The pause in force and whether this replica confirmed it.
    ///
    /// # Errors
    /// The classified Redis failure.
    pub async fn read(&self) -> ConnectorResult<(Option<Pause>, bool)> {
        let reply: Value = self
            .read
            .key(self.key("pause"))
            .key(self.key("pause:acks"))
            .arg(&self.replica)
            .invoke_async(&mut self.conn().await?)
            .await?;
        let fields = texts(reply)?;
        if fields.is_empty() {
            return Ok((None, false));
        }
        let pause = pause_from(&fields)?;
        let acked = pause
            .as_ref()
            .is_some_and(|p| fields.get(5).is_some_and(|a| *a == p.id.to_string()));
        Ok((pause, acked))
    }

    /// Confirms pause `id` for this replica: the caller holds its flush
    /// lock, so no flush of this replica runs, and every later one reads the
    /// pause first. False when `id` is no longer the pause in force.
    ///
    /// # Errors
    /// The classified Redis failure.
    pub async fn confirm(&self, id: u64) -> ConnectorResult<bool> {
        let done: i64 = self
            .ack
            .key(self.key("pause"))
            .key(self.key("pause:acks"))
            .arg(&self.replica)
            .arg(id)
            .invoke_async(&mut self.conn().await?)
            .await?;
        Ok(done == 1)
    }

    /// Registers this replica as live for `expiry` from now (Redis clock).
    ///
    /// # Errors
    /// The classified Redis failure.
    pub async fn heartbeat(&self, expiry: Duration) -> ConnectorResult<()> {
        let _: i64 = self
            .heartbeat
            .key(self.key("replicas"))
            .arg(&self.replica)
            .arg(u64::try_from(expiry.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut self.conn().await?)
            .await?;
        Ok(())
    }

    /// Unregisters this replica (a clean shutdown), so nobody waits for it.
    ///
    /// # Errors
    /// The classified Redis failure.
    pub async fn leave(&self) -> ConnectorResult<()> {
        let _: i64 = redis::cmd("ZREM")
            .arg(self.key("replicas"))
            .arg(&self.replica)
            .query_async(&mut self.conn().await?)
            .await?;
        Ok(())
    }

    /// The pause in force, the live replicas and which of them have not
    /// confirmed it.
    ///
    /// # Errors
    /// The classified Redis failure.
    pub async fn confirmations(&self) -> ConnectorResult<Confirmations> {
        let reply: Value = self
            .status
            .key(self.key("pause"))
            .key(self.key("pause:acks"))
            .key(self.key("replicas"))
            .invoke_async(&mut self.conn().await?)
            .await?;
        let Value::Array(parts) = reply else {
            return Err(corrupt("status reply"));
        };
        let mut parts = parts.into_iter();
        let fields = parts
            .by_ref()
            .take(5)
            .map(text)
            .collect::<ConnectorResult<Vec<_>>>()?;
        let pause = pause_from(&fields)?;
        let live = texts(parts.next().unwrap_or(Value::Nil))?;
        let acks = texts(parts.next().unwrap_or(Value::Nil))?;
        let current = pause.as_ref().map(|p| p.id.to_string());
        let missing = live
            .iter()
            .zip(acks.iter().map(Some).chain(std::iter::repeat(None)))
            .filter(|(_, ack)| current.is_none() || *ack != current.as_ref())
            .map(|(replica, _)| replica.clone())
            .collect();
        Ok(Confirmations {
            pause,
            live,
            missing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_reads_back_from_its_fields() {
        let f = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(pause_from(&f(&["", "", "", "", ""])).unwrap(), None);
        let p = pause_from(&f(&["7", "reject", "cut-over", "1000", "2500"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.id, p.mode, p.reason.as_str()),
            (7, PauseMode::Reject, "cut-over")
        );
        assert_eq!(p.since, UNIX_EPOCH + Duration::from_secs(1));
        assert!(!p.ended(UNIX_EPOCH + Duration::from_millis(2499)));
        assert!(p.ended(UNIX_EPOCH + Duration::from_millis(2500)));
        assert!(pause_from(&f(&["7", "sideways", "", "0", ""])).is_err());
    }
}
