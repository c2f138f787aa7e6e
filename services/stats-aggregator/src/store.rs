//! Where flushed counters live: one item per entity, its metrics as number
//! attributes, plus the aggregator's own attributes (last applied flush
//! sequence, version, latest event time). A flush writes each entity once,
//! conditional on the item's last applied flush sequence being lower than
//! the flush's (DESIGN.md invariant 2), so a replayed flush is a no-op.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue as DdbValue, KeyType, ReturnConsumedCapacity, ReturnValue,
    ReturnValuesOnConditionCheckFailure,
};
use rusqlite::{Connection, OptionalExtension, params};
use tidemark_connectors::dynamodb::{
    classify, describe_table, get_item, item_from_ddb, own_retries, record_consumed,
};
use tidemark_connectors::sqlite::{SharedConnection, item_from_json, open_file};
use tidemark_connectors::value::canonical_item;
use tidemark_connectors::{AttrValue, ConnectorError, ConnectorResult, EntityDelta, Item, Number};

use crate::decimal;

/// The item attribute holding the last applied flush sequence.
pub const SEQUENCE_ATTR: &str = "tidemark_flush_seq";
/// The item attribute holding the version, incremented by every flush.
pub const VERSION_ATTR: &str = "tidemark_version";
/// The item attribute holding the latest event time (microseconds).
pub const EVENT_TIME_ATTR: &str = "tidemark_last_event_micros";
/// The item attribute holding the last applied part of a flush written in
/// several parts; absent once the flush's last part is applied.
pub const PART_ATTR: &str = "tidemark_flush_part";
/// Metrics written by one UpdateItem, at most: DynamoDB bounds an update
/// expression to 4 KB (a metric takes up to ~16 bytes of it through its
/// placeholders), and expressions of many more actions are slow to parse.
pub const MAX_METRICS_PER_WRITE: usize = 100;
/// Metric names starting with this are refused: the aggregator's own.
pub const RESERVED_PREFIX: &str = "tidemark_";

const BACKEND: &str = "dynamodb";

/// A stored entity.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredItem {
    /// The whole item, key and the aggregator's attributes included: what is
    /// published.
    pub image: Item,
    pub version: u64,
    pub last_flush_sequence: u64,
    /// The last part applied of flush `last_flush_sequence`, while it is
    /// not applied whole.
    pub last_flush_part: Option<u32>,
    pub last_event_micros: Option<i64>,
}

impl StoredItem {
    fn from_image(image: Item) -> Self {
        let number = |name: &str| image.get(name).and_then(AttrValue::as_number).cloned();
        Self {
            version: number(VERSION_ATTR).and_then(|n| n.as_u64()).unwrap_or(0),
            last_flush_sequence: number(SEQUENCE_ATTR).and_then(|n| n.as_u64()).unwrap_or(0),
            last_flush_part: number(PART_ATTR)
                .and_then(|n| n.as_u64())
                .and_then(|p| u32::try_from(p).ok()),
            last_event_micros: number(EVENT_TIME_ATTR).and_then(|n| n.as_i64()),
            image,
        }
    }

    /// The metrics: number attributes other than the key and the
    /// aggregator's own.
    pub fn metrics(&self, key_attribute: &str) -> BTreeMap<String, String> {
        self.image
            .iter()
            .filter(|(name, _)| *name != key_attribute && !name.starts_with(RESERVED_PREFIX))
            .filter_map(|(name, v)| v.as_number().map(|n| (name.clone(), n.as_str().to_owned())))
            .collect()
    }
}

/// What one conditional write did.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteOutcome {
    /// Applied; the item as it is now.
    Written(StoredItem),
    /// The item already carried this flush (a resumed flush): nothing
    /// changed. The item as it is, when the store returned it.
    AlreadyApplied(Option<StoredItem>),
}

/// Which part of an entity's delta a write is: `index` of `count`, from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub index: u32,
    pub count: u32,
}

impl Part {
    /// The whole delta in one write.
    pub const WHOLE: Self = Self { index: 1, count: 1 };

    pub fn is_last(self) -> bool {
        self.index >= self.count
    }
}

/// The stats table.
#[async_trait]
pub trait StatsStore: Send + Sync {
    /// Splits one entity's delta into the parts written by one conditional
    /// write each, in order. The same delta always splits the same way, so
    /// a flush resumed after a crash skips exactly the parts applied.
    fn split(&self, delta: &EntityDelta) -> Vec<EntityDelta> {
        vec![delta.clone()]
    }
    /// Applies part `part` of one entity's delta of flush `sequence` in one
    /// conditional write (applied once: skipped when the item carries a
    /// later flush, or this flush up to this part): increments added,
    /// replacements set (a replacement followed by increments sets their
    /// exact sum), version incremented.
    ///
    /// # Errors
    /// `InvalidInput` when this entity's change cannot be stored (a value
    /// out of DynamoDB's range, an attribute of another type, an item over
    /// the size limit): retrying will not help.
    async fn apply_part(
        &self,
        delta: &EntityDelta,
        sequence: u64,
        part: Part,
    ) -> ConnectorResult<WriteOutcome>;
    /// The stored item, read consistently.
    async fn get(&self, entity: &str) -> ConnectorResult<Option<StoredItem>>;
    /// Whether the store answers.
    async fn ping(&self) -> ConnectorResult<()>;
}

/// Splits a delta by metric, in name order, `per_part` metrics a part; the
/// latest event time goes with the last part.
pub fn split_by_metric(delta: &EntityDelta, per_part: usize) -> Vec<EntityDelta> {
    let metrics: BTreeSet<&String> = delta
        .increments
        .keys()
        .chain(delta.replaces.keys())
        .collect();
    if metrics.len() <= per_part {
        return vec![delta.clone()];
    }
    let metrics: Vec<&String> = metrics.into_iter().collect();
    let chunks = metrics.chunks(per_part.max(1));
    let count = chunks.len();
    chunks
        .enumerate()
        .map(|(i, chunk)| EntityDelta {
            entity: delta.entity.clone(),
            increments: chunk
                .iter()
                .filter_map(|m| delta.increments.get(*m).map(|n| ((*m).clone(), *n)))
                .collect(),
            replaces: chunk
                .iter()
                .filter_map(|m| delta.replaces.get(*m).map(|v| ((*m).clone(), v.clone())))
                .collect(),
            last_event_micros: (i + 1 == count)
                .then_some(delta.last_event_micros)
                .flatten(),
        })
        .collect()
}

/// Whether an item already carries part `part` of flush `sequence`.
fn carries(item: &StoredItem, has_sequence: bool, sequence: u64, part: Part) -> bool {
    has_sequence
        && (item.last_flush_sequence > sequence
            || (item.last_flush_sequence == sequence
                && item.last_flush_part.is_none_or(|p| p >= part.index)))
}

/// The values a delta sets: a replacement plus the increments after it,
/// each checked against DynamoDB's number range here, where the error can
/// name the metric.
fn replacements(delta: &EntityDelta) -> ConnectorResult<Vec<(&str, String)>> {
    delta
        .replaces
        .iter()
        .map(|(metric, value)| {
            let increment = delta.increments.get(metric).copied().unwrap_or(0);
            decimal::add(value, i128::from(increment))
                .and_then(|v| decimal::storable(&v).map(|()| v))
                .map(|v| (metric.as_str(), v))
                .map_err(|e| ConnectorError::invalid(BACKEND, format!("{metric}: {e}")))
        })
        .collect()
}

/// The stats table in DynamoDB.
#[derive(Clone)]
pub struct DynamoStatsStore {
    client: Client,
    table: String,
    key_attribute: String,
}

impl DynamoStatsStore {
    /// Opens `table`, which must exist: the aggregator never creates its
    /// table (deploy/cloudformation does).
    ///
    /// # Errors
    /// `NotFound` when the table does not exist; the classified failure when
    /// DynamoDB cannot be reached.
    pub async fn open(client: Client, table: &str, key_attribute: &str) -> ConnectorResult<Self> {
        let store = Self {
            // The flush retries each write itself, every throttled attempt
            // seen by its write rate.
            client: own_retries(&client),
            table: table.to_owned(),
            key_attribute: key_attribute.to_owned(),
        };
        let table = describe_table(&store.client, &store.table).await?;
        // A key of another name or a sort key would make every write
        // invalid, and every entity a dead letter: refuse at start-up.
        let keys: Vec<(&str, bool)> = table
            .key_schema()
            .iter()
            .map(|k| (k.attribute_name(), k.key_type() == &KeyType::Hash))
            .collect();
        if keys != [(key_attribute, true)] {
            return Err(ConnectorError::invalid(
                BACKEND,
                format!(
                    "table {table:?} must have the partition key {key_attribute:?} alone, not {keys:?}",
                    table = store.table
                ),
            ));
        }
        Ok(store)
    }

    fn key(&self, entity: &str) -> HashMap<String, DdbValue> {
        HashMap::from([(self.key_attribute.clone(), DdbValue::S(entity.to_owned()))])
    }

    fn stored(item: &HashMap<String, DdbValue>) -> ConnectorResult<StoredItem> {
        Ok(StoredItem::from_image(item_from_ddb(item)?))
    }
}

#[async_trait]
impl StatsStore for DynamoStatsStore {
    fn split(&self, delta: &EntityDelta) -> Vec<EntityDelta> {
        split_by_metric(delta, MAX_METRICS_PER_WRITE)
    }

    #[tracing::instrument(skip_all, fields(table = %self.table, entity = %delta.entity, sequence, part = part.index))]
    async fn apply_part(
        &self,
        delta: &EntityDelta,
        sequence: u64,
        part: Part,
    ) -> ConnectorResult<WriteOutcome> {
        let mut names = HashMap::from([
            ("#s".to_owned(), SEQUENCE_ATTR.to_owned()),
            ("#v".to_owned(), VERSION_ATTR.to_owned()),
            ("#p".to_owned(), PART_ATTR.to_owned()),
        ]);
        let mut values = HashMap::from([
            (":s".to_owned(), DdbValue::N(sequence.to_string())),
            (":one".to_owned(), DdbValue::N("1".to_owned())),
            (":p".to_owned(), DdbValue::N(part.index.to_string())),
        ]);
        let mut set = vec!["#s = :s".to_owned()];
        let mut add = vec!["#v :one".to_owned()];
        // The part applied so far, until the last one marks the flush whole.
        let tail = if part.is_last() {
            " REMOVE #p"
        } else {
            set.push("#p = :p".to_owned());
            ""
        };
        for (i, (metric, value)) in replacements(delta)?.into_iter().enumerate() {
            names.insert(format!("#r{i}"), metric.to_owned());
            values.insert(format!(":r{i}"), DdbValue::N(value));
            set.push(format!("#r{i} = :r{i}"));
        }
        // A metric both replaced and incremented is set above (DynamoDB
        // refuses two actions on one attribute in one update).
        for (i, (metric, n)) in delta
            .increments
            .iter()
            .filter(|(m, _)| !delta.replaces.contains_key(*m))
            .enumerate()
        {
            names.insert(format!("#a{i}"), metric.clone());
            values.insert(format!(":a{i}"), DdbValue::N(n.to_string()));
            add.push(format!("#a{i} :a{i}"));
        }
        if let Some(t) = delta.last_event_micros {
            names.insert("#t".to_owned(), EVENT_TIME_ATTR.to_owned());
            values.insert(":t".to_owned(), DdbValue::N(t.to_string()));
            set.push("#t = :t".to_owned());
        }
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key(&delta.entity)))
            .update_expression(format!(
                "SET {} ADD {}{tail}",
                set.join(", "),
                add.join(", ")
            ))
            // A part not yet applied: an earlier flush, or this one up to an
            // earlier part (`#p` is absent once this flush is whole).
            .condition_expression("attribute_not_exists(#s) OR #s < :s OR (#s = :s AND #p < :p)")
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(out) => {
                record_consumed(out.consumed_capacity());
                let item = out.attributes.unwrap_or_default();
                Ok(WriteOutcome::Written(Self::stored(&item)?))
            }
            Err(err) => {
                let classified = classify(BACKEND, &err);
                if !classified.is_precondition() {
                    return Err(classified);
                }
                let old = match err.as_service_error() {
                    Some(UpdateItemError::ConditionalCheckFailedException(e)) => e.item.clone(),
                    _ => None,
                };
                Ok(WriteOutcome::AlreadyApplied(
                    old.as_ref().map(Self::stored).transpose()?,
                ))
            }
        }
    }

    #[tracing::instrument(skip_all, fields(table = %self.table, entity))]
    async fn get(&self, entity: &str) -> ConnectorResult<Option<StoredItem>> {
        get_item(&self.client, &self.table, self.key(entity))
            .await?
            .as_ref()
            .map(Self::stored)
            .transpose()
    }

    #[tracing::instrument(skip_all, fields(table = %self.table))]
    async fn ping(&self) -> ConnectorResult<()> {
        describe_table(&self.client, &self.table).await?;
        Ok(())
    }
}

/// The stats table in a SQLite file: what `tidemark dev` runs on. Items are
/// kept as JSON; the conditional write is a read and a write in one
/// transaction.
#[derive(Clone)]
pub struct EmbeddedStatsStore {
    conn: SharedConnection,
    key_attribute: String,
}

impl EmbeddedStatsStore {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// # Errors
    /// When the file cannot be opened or the table not created.
    pub fn open(path: &Path, key_attribute: &str) -> ConnectorResult<Self> {
        let conn = open_file(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS stats_items (
                 entity TEXT NOT NULL PRIMARY KEY, item TEXT NOT NULL) WITHOUT ROWID;",
        )?;
        Ok(Self {
            conn: SharedConnection::new(conn),
            key_attribute: key_attribute.to_owned(),
        })
    }
}

fn read_item(conn: &Connection, entity: &str) -> ConnectorResult<Option<Item>> {
    let text: Option<String> = conn
        .query_row(
            "SELECT item FROM stats_items WHERE entity = ?1",
            params![entity],
            |r| r.get(0),
        )
        .optional()?;
    text.as_deref().map(item_from_json).transpose()
}

fn number(v: &impl ToString) -> ConnectorResult<AttrValue> {
    Number::parse(&v.to_string())
        .map(AttrValue::N)
        .map_err(|e| ConnectorError::invalid("sqlite", e))
}

#[async_trait]
impl StatsStore for EmbeddedStatsStore {
    async fn apply_part(
        &self,
        delta: &EntityDelta,
        sequence: u64,
        part: Part,
    ) -> ConnectorResult<WriteOutcome> {
        let delta = delta.clone();
        let key_attribute = self.key_attribute.clone();
        self.conn
            .run(move |conn| {
                let tx = conn.transaction()?;
                let mut item = read_item(&tx, &delta.entity)?.unwrap_or_default();
                let current = StoredItem::from_image(item.clone());
                if carries(&current, item.contains_key(SEQUENCE_ATTR), sequence, part) {
                    return Ok(WriteOutcome::AlreadyApplied(Some(current)));
                }
                item.insert(key_attribute, AttrValue::s(delta.entity.clone()));
                for (metric, value) in replacements(&delta)? {
                    item.insert(metric.to_owned(), number(&value)?);
                }
                for (metric, n) in &delta.increments {
                    if delta.replaces.contains_key(metric) {
                        continue;
                    }
                    let before = item
                        .get(metric)
                        .and_then(AttrValue::as_number)
                        .map_or_else(|| "0".to_owned(), |n| n.as_str().to_owned());
                    let after = decimal::add(&before, i128::from(*n))
                        .map_err(|e| ConnectorError::invalid("sqlite", e))?;
                    item.insert(metric.clone(), number(&after)?);
                }
                item.insert(SEQUENCE_ATTR.to_owned(), number(&sequence)?);
                if part.is_last() {
                    item.remove(PART_ATTR);
                } else {
                    item.insert(PART_ATTR.to_owned(), number(&part.index)?);
                }
                item.insert(VERSION_ATTR.to_owned(), number(&(current.version + 1))?);
                if let Some(t) = delta.last_event_micros {
                    item.insert(EVENT_TIME_ATTR.to_owned(), number(&t)?);
                }
                let text = canonical_item(&item);
                tx.execute(
                    "INSERT INTO stats_items (entity, item) VALUES (?1, ?2)
                 ON CONFLICT (entity) DO UPDATE SET item = excluded.item",
                    params![delta.entity, text],
                )?;
                tx.commit()?;
                Ok(WriteOutcome::Written(StoredItem::from_image(item)))
            })
            .await
    }

    async fn get(&self, entity: &str) -> ConnectorResult<Option<StoredItem>> {
        let entity = entity.to_owned();
        self.conn
            .run(move |conn| Ok(read_item(conn, &entity)?.map(StoredItem::from_image)))
            .await
    }

    async fn ping(&self) -> ConnectorResult<()> {
        self.conn
            .run(|conn| {
                conn.query_row("SELECT 1", [], |_| Ok(()))?;
                Ok(())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(entity: &str) -> EntityDelta {
        EntityDelta {
            entity: entity.to_owned(),
            ..EntityDelta::default()
        }
    }

    #[tokio::test]
    async fn embedded_store_applies_each_flush_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStatsStore::open(&dir.path().join("s.db"), "pk").unwrap();
        let mut d = delta("a");
        d.increments.insert("views".into(), 5);
        d.replaces.insert("score".into(), "4.5".into());
        d.increments.insert("score".into(), 1);
        d.last_event_micros = Some(7);
        let WriteOutcome::Written(first) = store.apply_part(&d, 10, Part::WHOLE).await.unwrap()
        else {
            panic!("first write applies");
        };
        assert_eq!(first.version, 1);
        assert_eq!(first.last_flush_sequence, 10);
        let metrics = first.metrics("pk");
        assert_eq!(metrics["views"], "5");
        assert_eq!(metrics["score"], "5.5");
        assert_eq!(first.last_event_micros, Some(7));
        assert!(matches!(
            store.apply_part(&d, 10, Part::WHOLE).await.unwrap(),
            WriteOutcome::AlreadyApplied(Some(_))
        ));
        let mut again = delta("a");
        again.increments.insert("views".into(), -7);
        let WriteOutcome::Written(second) =
            store.apply_part(&again, 11, Part::WHOLE).await.unwrap()
        else {
            panic!("a later flush applies");
        };
        assert_eq!(second.metrics("pk")["views"], "-2");
        assert_eq!(second.version, 2);
        assert_eq!(store.get("a").await.unwrap(), Some(second));
        assert_eq!(store.get("b").await.unwrap(), None);
    }

    #[tokio::test]
    async fn each_part_of_a_flush_is_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStatsStore::open(&dir.path().join("s.db"), "pk").unwrap();
        let mut d = delta("a");
        for m in ["m1", "m2", "m3"] {
            d.increments.insert(m.into(), 2);
        }
        d.last_event_micros = Some(9);
        let parts = split_by_metric(&d, 2);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].increments.keys().collect::<Vec<_>>(), ["m1", "m2"]);
        assert_eq!(
            (parts[0].last_event_micros, parts[1].last_event_micros),
            (None, Some(9))
        );
        let part = |index| Part { index, count: 2 };
        let WriteOutcome::Written(half) = store.apply_part(&parts[0], 5, part(1)).await.unwrap()
        else {
            panic!("the first part applies");
        };
        assert_eq!(half.last_flush_part, Some(1));
        // Resumed after a crash: the applied part is skipped, the rest applied.
        assert!(matches!(
            store.apply_part(&parts[0], 5, part(1)).await.unwrap(),
            WriteOutcome::AlreadyApplied(_)
        ));
        let WriteOutcome::Written(whole) = store.apply_part(&parts[1], 5, part(2)).await.unwrap()
        else {
            panic!("the second part applies");
        };
        assert_eq!((whole.last_flush_part, whole.version), (None, 2));
        for (i, p) in parts.iter().enumerate() {
            let index = u32::try_from(i).unwrap() + 1;
            assert!(matches!(
                store.apply_part(p, 5, part(index)).await.unwrap(),
                WriteOutcome::AlreadyApplied(_)
            ));
        }
        assert_eq!(
            whole.metrics("pk").values().collect::<Vec<_>>(),
            ["2", "2", "2"]
        );
    }

    #[test]
    fn a_replaced_sum_beyond_dynamodbs_range_names_its_metric() {
        let mut d = delta("a");
        // 38 significant digits, 39 once 10 is added.
        d.replaces.insert(
            "score".into(),
            "1.2345678901234567890123456789012345678".into(),
        );
        d.increments.insert("score".into(), 10);
        let err = replacements(&d).expect_err("39 digits");
        assert!(
            matches!(&err, ConnectorError::InvalidInput { message, .. } if message.starts_with("score:")),
            "{err:?}"
        );
    }
}
