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
//!
//! By concern: `connection` (connecting, classifying Redis errors),
//! `buffer` (applying counter batches, the flush swap-out and its
//! acknowledgement, their scripts), `events` (applying events with their ids
//! remembered for deduplication), `reply` (decoding script replies).
//!
//! [`Buffer`]: crate::traits::Buffer

mod buffer;
mod connection;
mod events;
mod reply;

use std::sync::Arc;

use redis::Script;
use redis::aio::ConnectionManager;

use buffer::{
    LUA_ACK, LUA_APPLY, LUA_FLUSH_CONTENT, LUA_PEEK_PENDING, LUA_PENDING, LUA_STATS, LUA_TAKE,
};
use events::LUA_APPLY_EVENTS;
use reply::corrupt;

use crate::error::{ConnectorError, ConnectorResult};

pub use connection::{classify, connection};

const BACKEND: &str = "redis";

/// Error code the scripts answer with when a flush-sequence condition fails.
const PRECONDITION_CODE: &str = "PRECONDITION";

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

    pub(super) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub(super) fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    pub(super) fn entity_key(&self, entity: &str) -> String {
        format!("{}e:{entity}", self.prefix)
    }
}
