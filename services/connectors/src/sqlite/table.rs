//! A table in the embedded store, as a [`SourceTable`].

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::changelog::log_change;
use super::connection::write_transaction;
use super::{EmbeddedStore, item_from_json, to_json};
use crate::error::{ConnectorError, ConnectorResult};
use crate::predicate::Predicate;
use crate::traits::{ScanPage, ScanRequest, SourceTable};
use crate::value::{Item, Key, KeySchema, key_hash};

/// A table in the embedded store. Every write is logged to its change feed
/// in the same transaction.
#[derive(Clone)]
pub struct EmbeddedTable {
    store: EmbeddedStore,
    name: String,
    schema: KeySchema,
}

impl EmbeddedStore {
    pub fn table(&self, name: &str, schema: KeySchema) -> EmbeddedTable {
        EmbeddedTable {
            store: self.clone(),
            name: name.to_owned(),
            schema,
        }
    }
}

fn read_item(tx: &Connection, tbl: &str, k: &str) -> ConnectorResult<Option<Item>> {
    tx.query_row(
        "SELECT item FROM tm_items WHERE tbl = ?1 AND k = ?2",
        params![tbl, k],
        |r| r.get::<_, String>(0),
    )
    .optional()?
    .map(|t| item_from_json(&t))
    .transpose()
}

fn check(condition: Option<&Predicate>, current: Option<&Item>, key: &Key) -> ConnectorResult<()> {
    match condition {
        Some(c) if !c.matches(current) => Err(ConnectorError::Precondition(format!(
            "condition failed for {key}"
        ))),
        _ => Ok(()),
    }
}

impl EmbeddedTable {
    /// Writes `items` (each replacing the item of its key) in one
    /// transaction, each change logged as [`SourceTable::put`] logs it: a
    /// bulk load at a fraction of the cost of one commit per item.
    ///
    /// # Errors
    /// An item without the table's key attributes (nothing is written), or
    /// the store failing.
    pub async fn put_all(&self, items: Vec<Item>) -> ConnectorResult<()> {
        let keys = items
            .iter()
            .map(|item| {
                self.schema
                    .key_of(item)
                    .map(|k| k.canonical())
                    .map_err(|m| ConnectorError::invalid("sqlite", m))
            })
            .collect::<ConnectorResult<Vec<String>>>()?;
        let tbl = self.name.clone();
        self.store
            .conn
            .run(move |conn| {
                let tx = write_transaction(conn)?;
                for (k, item) in keys.iter().zip(&items) {
                    let old = read_item(&tx, &tbl, k)?;
                    tx.prepare_cached(
                        "INSERT INTO tm_items (tbl, k, item) VALUES (?1, ?2, ?3)
                         ON CONFLICT (tbl, k) DO UPDATE SET item = excluded.item",
                    )?
                    .execute(params![tbl, k, to_json(item)])?;
                    log_change(&tx, &tbl, k, old.as_ref(), Some(item))?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }

    async fn write<F>(
        &self,
        key: Key,
        condition: Option<Predicate>,
        change: F,
    ) -> ConnectorResult<Option<Item>>
    where
        F: FnOnce(Option<&Item>) -> Option<Item> + Send + 'static,
    {
        let tbl = self.name.clone();
        self.store
            .conn
            .run(move |conn| {
                let tx = write_transaction(conn)?;
                let k = key.canonical();
                let old = read_item(&tx, &tbl, &k)?;
                check(condition.as_ref(), old.as_ref(), &key)?;
                let new = change(old.as_ref());
                match &new {
                    Some(item) => {
                        tx.execute(
                            "INSERT INTO tm_items (tbl, k, item) VALUES (?1, ?2, ?3)
                             ON CONFLICT (tbl, k) DO UPDATE SET item = excluded.item",
                            params![tbl, k, to_json(item)],
                        )?;
                    }
                    None => {
                        tx.execute(
                            "DELETE FROM tm_items WHERE tbl = ?1 AND k = ?2",
                            params![tbl, k],
                        )?;
                    }
                }
                log_change(&tx, &tbl, &k, old.as_ref(), new.as_ref())?;
                tx.commit()?;
                Ok(new)
            })
            .await
    }
}

#[async_trait]
impl SourceTable for EmbeddedTable {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_schema(&self) -> &KeySchema {
        &self.schema
    }

    async fn scan(&self, request: &ScanRequest) -> ConnectorResult<ScanPage> {
        if request.total_segments == 0 || request.segment >= request.total_segments {
            return Err(ConnectorError::invalid(
                "sqlite",
                "segment must be below total_segments",
            ));
        }
        let tbl = self.name.clone();
        let request = request.clone();
        self.store
            .conn
            .run(move |conn| {
                let mut after = request
                    .start_after
                    .as_ref()
                    .map(Key::canonical)
                    .unwrap_or_default();
                let mut page = ScanPage::default();
                let limit = u64::from(request.limit.max(1));
                let mut stmt = conn.prepare_cached(
                    "SELECT k, item FROM tm_items WHERE tbl = ?1 AND k > ?2 ORDER BY k LIMIT 512",
                )?;
                loop {
                    let rows: Vec<(String, String)> = stmt
                        .query_map(params![tbl, after], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?;
                    if rows.is_empty() {
                        page.last_key = None;
                        return Ok(page);
                    }
                    for (k, text) in rows {
                        after.clone_from(&k);
                        let key: Key = serde_json::from_str(&k).map_err(|e| {
                            ConnectorError::terminal("sqlite", format!("corrupt key: {e}"))
                        })?;
                        if key_hash(&key) % u64::from(request.total_segments)
                            != u64::from(request.segment)
                        {
                            continue;
                        }
                        page.scanned += 1;
                        let item = item_from_json(&text)?;
                        if request
                            .filter
                            .as_ref()
                            .is_none_or(|f| f.matches(Some(&item)))
                        {
                            page.items.push(item);
                        }
                        if page.scanned >= limit {
                            page.last_key = Some(key);
                            return Ok(page);
                        }
                    }
                }
            })
            .await
    }

    async fn get(&self, key: &Key) -> ConnectorResult<Option<Item>> {
        let tbl = self.name.clone();
        let k = key.canonical();
        self.store
            .conn
            .run(move |conn| read_item(conn, &tbl, &k))
            .await
    }

    async fn put(&self, item: &Item, condition: Option<&Predicate>) -> ConnectorResult<()> {
        let key = self
            .schema
            .key_of(item)
            .map_err(|m| ConnectorError::invalid("sqlite", m))?;
        let item = item.clone();
        self.write(key, condition.cloned(), move |_| Some(item))
            .await
            .map(drop)
    }

    async fn update(
        &self,
        key: &Key,
        set: &Item,
        condition: Option<&Predicate>,
    ) -> ConnectorResult<Item> {
        let key_attrs = key.0.clone();
        let set = set.clone();
        let new = self
            .write(key.clone(), condition.cloned(), move |old| {
                let mut item = old.cloned().unwrap_or_else(|| key_attrs.clone());
                item.extend(set);
                Some(item)
            })
            .await?;
        Ok(new.expect("update always produces an item"))
    }

    async fn delete(&self, key: &Key, condition: Option<&Predicate>) -> ConnectorResult<()> {
        self.write(key.clone(), condition.cloned(), |_| None)
            .await
            .map(drop)
    }
}
