//! The embedded change log: every table write appends its change in the
//! same transaction, and [`EmbeddedFeed`] reads it back as a [`ChangeFeed`].

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, params};

use super::{EmbeddedStore, item_from_json, to_json};
use crate::error::{ConnectorError, ConnectorResult};
use crate::image::Image;
use crate::now_micros;
use crate::traits::{
    ChangeFeed, ChangeKind, ChangeRecord, FeedCheckpoint, PartitionCheckpoint, PartitionLag,
    Position,
};
use crate::value::{Item, Key};

const PARTITION: &str = "0";

/// The change log of one embedded table, as a [`ChangeFeed`]: one partition,
/// sequence = log row id, version = sequence (monotonic per key).
pub struct EmbeddedFeed {
    store: EmbeddedStore,
    table: String,
    committed: i64,
    delivered: i64,
    oldest_uncommitted_micros: Option<i64>,
}

impl EmbeddedStore {
    /// The change feed of table `name`, resumed from `checkpoint`.
    pub fn feed(&self, name: &str, checkpoint: &FeedCheckpoint) -> EmbeddedFeed {
        let committed = checkpoint
            .partitions
            .get(PARTITION)
            .and_then(|p| p.sequence.as_deref())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        EmbeddedFeed {
            store: self.clone(),
            table: name.to_owned(),
            committed,
            delivered: committed,
            oldest_uncommitted_micros: None,
        }
    }

    /// The change feed of table `name` from the log's current end: only
    /// changes made from now on (a checkpoint, once written, resumes there).
    pub async fn feed_from_end(&self, name: &str) -> ConnectorResult<EmbeddedFeed> {
        let tbl = name.to_owned();
        let end: i64 = self
            .conn
            .run(move |conn| {
                Ok(conn.query_row(
                    "SELECT COALESCE(MAX(seq), 0) FROM tm_changes WHERE tbl = ?1",
                    params![tbl],
                    |r| r.get(0),
                )?)
            })
            .await?;
        Ok(EmbeddedFeed {
            store: self.clone(),
            table: name.to_owned(),
            committed: end,
            delivered: end,
            oldest_uncommitted_micros: None,
        })
    }

    /// The checkpoint of a feed of table `name` that has read the log to
    /// its current end: [`feed`](Self::feed) resumed from it reads only
    /// changes made after this call.
    pub async fn log_end(&self, name: &str) -> ConnectorResult<FeedCheckpoint> {
        Ok(self.feed_from_end(name).await?.checkpoint())
    }
}

pub(super) fn log_change(
    tx: &Connection,
    tbl: &str,
    k: &str,
    old: Option<&Item>,
    new: Option<&Item>,
) -> ConnectorResult<()> {
    let kind = match (old, new) {
        (None, Some(_)) => "INSERT",
        (Some(_), Some(_)) => "MODIFY",
        (Some(_), None) => "REMOVE",
        (None, None) => return Ok(()),
    };
    tx.execute(
        "INSERT INTO tm_changes (tbl, k, kind, new_image, old_image, created_micros) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![tbl, k, kind, new.map(to_json), old.map(to_json), now_micros()],
    )?;
    Ok(())
}

fn parse_kind(kind: &str) -> ChangeKind {
    match kind {
        "INSERT" => ChangeKind::Insert,
        "REMOVE" => ChangeKind::Remove,
        _ => ChangeKind::Modify,
    }
}

#[async_trait]
impl ChangeFeed for EmbeddedFeed {
    async fn poll(&mut self, max: usize) -> ConnectorResult<Vec<ChangeRecord>> {
        let tbl = self.table.clone();
        let after = self.delivered;
        let max = i64::try_from(max.max(1)).unwrap_or(i64::MAX);
        type Row = (i64, String, String, Option<String>, Option<String>, i64);
        let rows: Vec<Row> = self
            .store
            .conn
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT seq, k, kind, new_image, old_image, created_micros FROM tm_changes
                     WHERE tbl = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )?;
                let rows = stmt
                    .query_map(params![tbl, after, max], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (seq, k, kind, new_image, old_image, created) in rows {
            let key: Key = serde_json::from_str(&k)
                .map_err(|e| ConnectorError::terminal("sqlite", format!("corrupt key: {e}")))?;
            out.push(ChangeRecord {
                key,
                kind: parse_kind(&kind),
                new_image: new_image
                    .as_deref()
                    .map(item_from_json)
                    .transpose()?
                    .map(Image::Item),
                old_image: old_image.as_deref().map(item_from_json).transpose()?,
                version: u64::try_from(seq).unwrap_or_default(),
                created_at_micros: created,
                position: Position {
                    partition: PARTITION.to_owned(),
                    sequence: seq.to_string(),
                },
            });
            self.delivered = seq;
            self.oldest_uncommitted_micros.get_or_insert(created);
        }
        Ok(out)
    }

    /// One indexed read of a local file: cheap enough to ask often.
    fn idle_wait(&self) -> Duration {
        Duration::from_millis(20)
    }

    async fn commit(&mut self, position: &Position) -> ConnectorResult<()> {
        let seq: i64 = position.sequence.parse().map_err(|_| {
            ConnectorError::invalid("sqlite", format!("bad sequence {:?}", position.sequence))
        })?;
        if position.partition != PARTITION || seq > self.delivered {
            return Err(ConnectorError::invalid(
                "sqlite",
                "commit of a position that was never delivered",
            ));
        }
        self.committed = self.committed.max(seq);
        if self.committed == self.delivered {
            self.oldest_uncommitted_micros = None;
        }
        Ok(())
    }

    fn checkpoint(&self) -> FeedCheckpoint {
        let mut checkpoint = FeedCheckpoint::default();
        checkpoint.partitions.insert(
            PARTITION.to_owned(),
            PartitionCheckpoint {
                sequence: (self.committed > 0).then(|| self.committed.to_string()),
                version: u64::try_from(self.committed).unwrap_or_default(),
                finished: false,
                parent: None,
            },
        );
        checkpoint
    }

    fn lag(&self) -> Vec<PartitionLag> {
        let seconds = self.oldest_uncommitted_micros.map_or(0.0, |t| {
            Duration::from_micros(u64::try_from(now_micros() - t).unwrap_or(0)).as_secs_f64()
        });
        vec![PartitionLag {
            partition: PARTITION.to_owned(),
            records: u64::try_from(self.delivered - self.committed).unwrap_or(0),
            seconds,
        }]
    }
}
