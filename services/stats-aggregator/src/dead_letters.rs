//! Dead letters: an entity whose change the store refuses for good (a
//! value out of DynamoDB's range, an attribute of another type, an item
//! over the size limit) is set aside with its reason, and the rest of the
//! flush goes on. Nothing is lost (DESIGN.md invariant 1): the letter keeps
//! the change that was not applied, durably, where the replicas' buffer is
//! (Redis, or SQLite for the embedded buffer), and the count is the gauge
//! `stats_dead_lettered_entities`.
//!
//! A letter is keyed by its flush sequence, stage and entity, so a flush
//! retried after it set one aside writes the same letter again rather than a
//! second one.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use rusqlite::params;
use serde::{Deserialize, Serialize};
use tidemark_connectors::sqlite::{SharedConnection, open_file};
use tidemark_connectors::{ConnectorError, ConnectorResult, EntityDelta};
use tokio::sync::OnceCell;

use crate::lazy_redis::LazyRedis;

/// Where the entity's change failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Its write to the stats table: `delta` was not applied.
    Write,
    /// Its publication: `delta` is applied, the item was not published.
    Publish,
}

/// One entity's change set aside.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub entity: String,
    /// The flush it belonged to.
    pub sequence: u64,
    pub stage: Stage,
    /// Why, as the store or the publisher said it.
    pub reason: String,
    /// For `Write`, the change not applied: the parts from the failing one
    /// on (the parts before it are stored). Applied by a later flush, it
    /// counts once.
    pub delta: EntityDelta,
    /// Parts of the entity's change applied before the failure, of `parts`.
    pub applied_parts: u32,
    pub parts: u32,
    pub at_micros: i64,
}

impl DeadLetter {
    fn field(&self) -> String {
        let stage = match self.stage {
            Stage::Write => "write",
            Stage::Publish => "publish",
        };
        format!("{}/{stage}/{}", self.sequence, self.entity)
    }
}

/// Where dead letters are kept.
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Keeps `letter` (replacing the same letter written before).
    async fn put(&self, letter: &DeadLetter) -> ConnectorResult<()>;
    /// Every letter kept.
    async fn list(&self) -> ConnectorResult<Vec<DeadLetter>>;
    /// How many letters are kept.
    async fn count(&self) -> ConnectorResult<u64>;
}

fn encode(letter: &DeadLetter) -> ConnectorResult<String> {
    serde_json::to_string(letter)
        .map_err(|e| ConnectorError::terminal("dead letters", e.to_string()))
}

fn decode(text: &str) -> ConnectorResult<DeadLetter> {
    serde_json::from_str(text)
        .map_err(|e| ConnectorError::terminal("dead letters", format!("corrupt letter: {e}")))
}

/// Dead letters in the Redis hash `Pdead` of the buffer under prefix `P`:
/// field `<sequence>/<stage>/<entity>`, value the letter as JSON.
pub struct RedisDeadLetters {
    conn: LazyRedis,
    key: String,
}

impl RedisDeadLetters {
    pub fn new(url: &str, prefix: &str) -> Self {
        Self {
            conn: LazyRedis::new(url),
            key: format!("{prefix}dead"),
        }
    }
}

#[async_trait]
impl DeadLetters for RedisDeadLetters {
    async fn put(&self, letter: &DeadLetter) -> ConnectorResult<()> {
        let _: i64 = redis::cmd("HSET")
            .arg(&self.key)
            .arg(letter.field())
            .arg(encode(letter)?)
            .query_async(&mut self.conn.get().await?)
            .await?;
        Ok(())
    }

    async fn list(&self) -> ConnectorResult<Vec<DeadLetter>> {
        let values: Vec<String> = redis::cmd("HVALS")
            .arg(&self.key)
            .query_async(&mut self.conn.get().await?)
            .await?;
        values.iter().map(|v| decode(v)).collect()
    }

    async fn count(&self) -> ConnectorResult<u64> {
        Ok(redis::cmd("HLEN")
            .arg(&self.key)
            .query_async(&mut self.conn.get().await?)
            .await?)
    }
}

/// Dead letters in a SQLite file, beside the embedded buffer; opened (and
/// created) on first use.
pub struct EmbeddedDeadLetters {
    path: PathBuf,
    conn: OnceCell<SharedConnection>,
}

impl EmbeddedDeadLetters {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            conn: OnceCell::new(),
        }
    }

    async fn conn(&self) -> ConnectorResult<SharedConnection> {
        self.conn
            .get_or_try_init(|| async {
                if let Some(dir) = self.path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        ConnectorError::terminal("sqlite", format!("{}: {e}", dir.display()))
                    })?;
                }
                let conn = open_file(&self.path)?;
                conn.execute_batch(
                    "CREATE TABLE IF NOT EXISTS dead_letters (
                         id TEXT NOT NULL PRIMARY KEY, letter TEXT NOT NULL) WITHOUT ROWID;",
                )?;
                Ok(SharedConnection::new(conn))
            })
            .await
            .cloned()
    }
}

#[async_trait]
impl DeadLetters for EmbeddedDeadLetters {
    async fn put(&self, letter: &DeadLetter) -> ConnectorResult<()> {
        let (id, text) = (letter.field(), encode(letter)?);
        self.conn()
            .await?
            .run(move |conn| {
                conn.execute(
                    "INSERT INTO dead_letters (id, letter) VALUES (?1, ?2)
                     ON CONFLICT (id) DO UPDATE SET letter = excluded.letter",
                    params![id, text],
                )?;
                Ok(())
            })
            .await
    }

    async fn list(&self) -> ConnectorResult<Vec<DeadLetter>> {
        let texts: Vec<String> = self
            .conn()
            .await?
            .run(|conn| {
                let mut stmt = conn.prepare("SELECT letter FROM dead_letters ORDER BY id")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<Result<Vec<String>, _>>()?)
            })
            .await?;
        texts.iter().map(|t| decode(t)).collect()
    }

    async fn count(&self) -> ConnectorResult<u64> {
        self.conn()
            .await?
            .run(|conn| {
                let n: i64 =
                    conn.query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn embedded_letters_are_kept_once_per_flush_and_entity() {
        let dir = tempfile::tempdir().unwrap();
        let letters = EmbeddedDeadLetters::new(&dir.path().join("sub/dead.db"));
        assert_eq!(letters.count().await.unwrap(), 0);
        let letter = DeadLetter {
            entity: "a".into(),
            sequence: 7,
            stage: Stage::Write,
            reason: "ValidationException: bad".into(),
            delta: EntityDelta {
                entity: "a".into(),
                ..EntityDelta::default()
            },
            applied_parts: 0,
            parts: 1,
            at_micros: 1,
        };
        letters.put(&letter).await.unwrap();
        letters.put(&letter).await.unwrap();
        assert_eq!(letters.count().await.unwrap(), 1);
        assert_eq!(letters.list().await.unwrap(), [letter]);
    }
}
