//! A sink in the embedded store, as a versioned [`Sink`].

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::connection::write_transaction;
use super::{EmbeddedStore, item_from_json, to_json};
use crate::error::{ConnectorError, ConnectorResult};
use crate::traits::{BucketDigest, RecordOutcome, Sink, SinkRecord, fold_digest};
use crate::value::{Item, Key};

/// A sink in the embedded store: versioned rows with tombstones.
#[derive(Clone)]
pub struct EmbeddedSink {
    store: EmbeddedStore,
    name: String,
}

impl EmbeddedStore {
    pub fn sink(&self, name: &str) -> EmbeddedSink {
        EmbeddedSink {
            store: self.clone(),
            name: name.to_owned(),
        }
    }
}

#[async_trait]
impl Sink for EmbeddedSink {
    fn name(&self) -> String {
        format!("sqlite:{}", self.name)
    }

    async fn apply(&self, batch: &[SinkRecord]) -> ConnectorResult<Vec<RecordOutcome>> {
        let sink = self.name.clone();
        let batch = batch.to_vec();
        self.store
            .conn.run(move |conn| {
                let tx = write_transaction(conn)?;
                let mut outcomes = Vec::with_capacity(batch.len());
                for record in &batch {
                    let k = record.key.canonical();
                    let version = i64::try_from(record.version)
                        .map_err(|_| ConnectorError::invalid("sqlite", "version exceeds i64"))?;
                    let (deleted, item) = match record.op.item() {
                        Some(item) => (0, Some(to_json(&item))),
                        None => (1, None),
                    };
                    let changed = tx.execute(
                        "INSERT INTO tm_sink (sink, k, version, deleted, item) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (sink, k) DO UPDATE SET version = excluded.version,
                             deleted = excluded.deleted, item = excluded.item
                         WHERE excluded.version > tm_sink.version",
                        params![sink, k, version, deleted, item],
                    )?;
                    outcomes.push(if changed == 1 { RecordOutcome::Applied } else { RecordOutcome::Stale });
                }
                tx.commit()?;
                Ok(outcomes)
            })
            .await
    }

    async fn purge(&self, keys: &[Key]) -> ConnectorResult<u64> {
        let sink = self.name.clone();
        let keys: Vec<String> = keys.iter().map(Key::canonical).collect();
        self.store
            .conn
            .run(move |conn| {
                let tx = write_transaction(conn)?;
                let mut removed = 0u64;
                for k in &keys {
                    removed += tx.execute(
                        "DELETE FROM tm_sink WHERE sink = ?1 AND k = ?2",
                        params![sink, k],
                    )? as u64;
                }
                tx.commit()?;
                Ok(removed)
            })
            .await
    }

    async fn read(&self, key: &Key) -> ConnectorResult<Option<(u64, Item)>> {
        let sink = self.name.clone();
        let k = key.canonical();
        self.store
            .conn.run(move |conn| {
                let row: Option<(i64, Option<String>)> = conn
                    .query_row(
                        "SELECT version, item FROM tm_sink WHERE sink = ?1 AND k = ?2 AND deleted = 0",
                        params![sink, k],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                row.map(|(v, item)| Ok((u64::try_from(v).unwrap_or(0), item_from_json(item.as_deref().unwrap_or("{}"))?)))
                    .transpose()
            })
            .await
    }

    async fn digest(&self, buckets: u32) -> ConnectorResult<Vec<BucketDigest>> {
        if buckets == 0 {
            return Err(ConnectorError::invalid(
                "sqlite",
                "buckets must be at least 1",
            ));
        }
        let sink = self.name.clone();
        self.store
            .conn
            .run(move |conn| {
                let mut out = vec![BucketDigest::default(); buckets as usize];
                let mut stmt = conn.prepare(
                    "SELECT k, version, item FROM tm_sink WHERE sink = ?1 AND deleted = 0",
                )?;
                let mut rows = stmt.query(params![sink])?;
                while let Some(row) = rows.next()? {
                    let k: String = row.get(0)?;
                    let key: Key = serde_json::from_str(&k).map_err(|e| {
                        ConnectorError::terminal("sqlite", format!("corrupt key: {e}"))
                    })?;
                    let version: i64 = row.get(1)?;
                    let item = item_from_json(&row.get::<_, String>(2)?)?;
                    fold_digest(&mut out, &key, u64::try_from(version).unwrap_or(0), &item);
                }
                Ok(out)
            })
            .await
    }

    /// Pages through the live rows by key, so `visit` runs outside the
    /// connection's blocking task.
    async fn entries(&self, visit: &mut (dyn FnMut(Key, u64, Item) + Send)) -> ConnectorResult<()> {
        let mut after = String::new();
        loop {
            let sink = self.name.clone();
            let from = after.clone();
            let rows: Vec<(String, i64, String)> = self
                .store
                .conn.run(move |conn| {
                    let mut stmt = conn.prepare_cached(
                        "SELECT k, version, item FROM tm_sink WHERE sink = ?1 AND k > ?2 AND deleted = 0
                         ORDER BY k LIMIT 4096",
                    )?;
                    let rows = stmt
                        .query_map(params![sink, from], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect::<Result<_, _>>()?;
                    Ok(rows)
                })
                .await?;
            let Some((last, _, _)) = rows.last() else {
                return Ok(());
            };
            after.clone_from(last);
            for (k, version, text) in rows {
                let key: Key = serde_json::from_str(&k)
                    .map_err(|e| ConnectorError::terminal("sqlite", format!("corrupt key: {e}")))?;
                visit(
                    key,
                    u64::try_from(version).unwrap_or(0),
                    item_from_json(&text)?,
                );
            }
        }
    }
}
