//! The dead-letter store: every record a sink rejected, with its reason
//! (invariant 1: nothing is dropped silently). One item per dead letter in a
//! table keyed by (`pipeline`, `id`); ids are time-ordered (UUIDv7), so a
//! pipeline's dead letters read back oldest first. The table is a DynamoDB
//! table shared by the replicas (`dead_letter_table`) or, on the embedded
//! default, a table of the replicator's data directory.

use std::collections::BTreeMap;
use std::sync::Arc;

use tidemark_connectors::proto::key_to_proto;
use tidemark_connectors::{
    AttrValue, ConnectorResult, Item, Key, Predicate, ScanRequest, SinkOp, SinkRecord, SourceTable,
    Undecodable,
};
use tidemark_proto::replicator::v1::DeadLetter;

#[derive(Clone)]
pub struct DeadLetters {
    table: Arc<dyn SourceTable>,
}

fn s(item: &Item, name: &str) -> String {
    item.get(name)
        .and_then(AttrValue::as_s)
        .unwrap_or_default()
        .to_owned()
}

fn n(item: &Item, name: &str) -> u64 {
    item.get(name)
        .and_then(AttrValue::as_number)
        .and_then(tidemark_connectors::Number::as_u64)
        .unwrap_or_default()
}

fn timestamp(micros: u64) -> prost_types::Timestamp {
    let micros = i64::try_from(micros).unwrap_or(i64::MAX);
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

/// A time-ordered id (UUIDv7 layout) that is the same for the same message:
/// its timestamp, then a digest of the pipeline and the position.
fn position_id(pipeline: &str, position: &str, created_micros: i64) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(pipeline.as_bytes())
        .chain_update([0])
        .chain_update(position.as_bytes())
        .finalize();
    let mut tail = [0u8; 10];
    tail.copy_from_slice(&digest[..10]);
    let millis = u64::try_from(created_micros / 1000).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &tail)
        .into_uuid()
        .to_string()
}

fn now_micros() -> u64 {
    u64::try_from(tidemark_connectors::now_micros()).unwrap_or(0)
}

/// The table key of one dead letter.
fn letter_key(pipeline: &str, id: &str) -> Key {
    Key::new([
        ("pipeline".to_owned(), AttrValue::s(pipeline)),
        ("id".to_owned(), AttrValue::s(id)),
    ])
}

/// A stored item read back as a dead letter.
fn stored(item: &Item) -> Stored {
    let key: BTreeMap<String, AttrValue> =
        serde_json::from_str(&s(item, "key")).unwrap_or_default();
    let key = Key(key);
    let letter = DeadLetter {
        id: s(item, "id"),
        pipeline_name: s(item, "pipeline"),
        sink_name: s(item, "sink"),
        key: Some(key_to_proto(&key)),
        version: n(item, "version"),
        deleted: matches!(item.get("deleted"), Some(AttrValue::Bool(true))),
        record_position: s(item, "position"),
        reason: s(item, "reason"),
        create_time: Some(timestamp(n(item, "created"))),
        last_attempt_time: Some(timestamp(n(item, "attempted"))),
        attempts: u32::try_from(n(item, "attempts")).unwrap_or(u32::MAX),
    };
    Stored { letter, key }
}

/// A dead letter as stored: the record to write again and where it failed.
pub struct Stored {
    pub letter: DeadLetter,
    pub key: Key,
}

impl DeadLetters {
    pub fn new(table: Arc<dyn SourceTable>) -> Self {
        Self { table }
    }

    pub async fn add(
        &self,
        pipeline: &str,
        sink: &str,
        record: &SinkRecord,
        position: &str,
        reason: &str,
    ) -> ConnectorResult<()> {
        let now = now_micros();
        let key_json = serde_json::to_string(&record.key.0).expect("keys serialise");
        let item: Item = [
            ("pipeline", AttrValue::s(pipeline)),
            ("id", AttrValue::s(uuid::Uuid::now_v7().to_string())),
            ("sink", AttrValue::s(sink)),
            ("key", AttrValue::s(key_json)),
            ("version", AttrValue::n(record.version)),
            (
                "deleted",
                AttrValue::Bool(matches!(record.op, SinkOp::Delete)),
            ),
            ("position", AttrValue::s(position)),
            ("reason", AttrValue::s(reason)),
            ("created", AttrValue::n(now)),
            ("attempted", AttrValue::n(now)),
            ("attempts", AttrValue::n(1u64)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        tracing::warn!(pipeline, sink, key = %record.key, reason, "record dead-lettered");
        self.table.put(&item, None).await
    }

    /// Keeps a feed message that is not a change record. It has no sink
    /// (`sink` is empty) and is never replayed: the reason, the message's
    /// key and the first bytes of its payload say what it was. Its id is
    /// derived from the message's position, so the same message delivered
    /// again after a restart (its offset not yet committed) is kept once.
    pub async fn add_undecodable(
        &self,
        pipeline: &str,
        message: &Undecodable,
    ) -> ConnectorResult<()> {
        let now = now_micros();
        let position = format!(
            "{}/{}",
            message.position.partition, message.position.sequence
        );
        let id = position_id(pipeline, &position, message.created_at_micros);
        let key =
            message
                .key
                .as_deref()
                .map_or_else(String::new, |k| match std::str::from_utf8(k) {
                    Ok(s) => format!("; message key {s:?}"),
                    Err(_) => format!("; message key of {} bytes (binary)", k.len()),
                });
        let reason = format!(
            "not a change record: {}{key}; payload of {} bytes",
            message.reason, message.payload_len
        );
        let item: Item = [
            ("pipeline", AttrValue::s(pipeline)),
            ("id", AttrValue::s(id)),
            ("sink", AttrValue::s("")),
            ("key", AttrValue::s("{}")),
            ("version", AttrValue::n(0u64)),
            ("deleted", AttrValue::Bool(false)),
            ("position", AttrValue::s(&position)),
            ("reason", AttrValue::s(&reason)),
            ("payload", AttrValue::B(message.payload.clone())),
            ("created", AttrValue::n(now)),
            ("attempted", AttrValue::n(now)),
            ("attempts", AttrValue::n(1u64)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        tracing::warn!(pipeline, position, reason, "feed message dead-lettered");
        self.table.put(&item, None).await
    }

    /// Up to `limit` dead letters of a pipeline (optionally of one sink),
    /// oldest first, after the one with id `after`; and the id to pass as
    /// `after` for the next page, `None` at the end. Memory is bounded by
    /// `limit` whatever the table holds.
    pub async fn page(
        &self,
        pipeline: &str,
        sink: &str,
        after: Option<&str>,
        limit: usize,
    ) -> ConnectorResult<(Vec<Stored>, Option<String>)> {
        let mut filter = vec![Predicate::Equals(
            "pipeline".to_owned(),
            AttrValue::s(pipeline),
        )];
        if !sink.is_empty() {
            filter.push(Predicate::Equals("sink".to_owned(), AttrValue::s(sink)));
        }
        let mut out = Vec::new();
        let mut start_after = after.map(|id| letter_key(pipeline, id));
        loop {
            let page = self
                .table
                .scan(&ScanRequest {
                    start_after,
                    filter: Some(Predicate::And(filter.clone())),
                    consistent: true,
                    limit: u32::try_from(limit.clamp(1, 1000)).unwrap_or(1000),
                    ..ScanRequest::segment(0, 1)
                })
                .await?;
            let mut items = page.items.into_iter();
            for item in items.by_ref() {
                out.push(stored(&item));
                if out.len() == limit {
                    break;
                }
            }
            let more = items.next().is_some() || page.last_key.is_some();
            if out.len() == limit {
                let next = out.last().filter(|_| more).map(|s| s.letter.id.clone());
                return Ok((out, next));
            }
            match page.last_key {
                Some(k) => start_after = Some(k),
                None => return Ok((out, None)),
            }
        }
    }

    /// How many dead letters a pipeline has, read a page at a time.
    pub async fn count(&self, pipeline: &str) -> ConnectorResult<u64> {
        let mut n = 0;
        let mut after: Option<String> = None;
        loop {
            let (page, next) = self.page(pipeline, "", after.as_deref(), 1000).await?;
            n += page.len() as u64;
            match next {
                Some(id) => after = Some(id),
                None => return Ok(n),
            }
        }
    }

    pub async fn remove(&self, pipeline: &str, id: &str) -> ConnectorResult<()> {
        self.table.delete(&letter_key(pipeline, id), None).await
    }

    /// One dead letter by id.
    pub async fn get(&self, pipeline: &str, id: &str) -> ConnectorResult<Option<Stored>> {
        Ok(self
            .table
            .get(&letter_key(pipeline, id))
            .await?
            .map(|item| stored(&item)))
    }

    /// Records another failed attempt with its new reason.
    pub async fn retried(&self, stored: &Stored, reason: &str) -> ConnectorResult<()> {
        let key = letter_key(&stored.letter.pipeline_name, &stored.letter.id);
        let set: Item = [
            ("reason".to_owned(), AttrValue::s(reason)),
            ("attempted".to_owned(), AttrValue::n(now_micros())),
            (
                "attempts".to_owned(),
                AttrValue::n(u64::from(stored.letter.attempts) + 1),
            ),
        ]
        .into_iter()
        .collect();
        self.table
            .update(&key, &set, Some(&Predicate::ItemExists))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use tidemark_connectors::dynamodb::DynamoTable;
    use tidemark_connectors::sqlite::EmbeddedStore;
    use tidemark_connectors::testing::{dynamodb_clients, unique_name};
    use tidemark_connectors::{KeySchema, Position};

    use super::*;

    fn record(i: u64) -> SinkRecord {
        SinkRecord {
            key: Key::single("id", AttrValue::s(format!("k{i:04}"))),
            version: i + 1,
            op: SinkOp::Delete,
        }
    }

    /// Pages of a pipeline's letters: bounded, in id order, each letter
    /// once, other pipelines' letters never; the count and a get by id agree.
    async fn pages_walk_every_letter_once(letters: DeadLetters) {
        for i in 0..230 {
            letters
                .add("a", "search", &record(i), "p", "refused")
                .await
                .unwrap();
        }
        for i in 0..7 {
            letters
                .add("b", "search", &record(i), "p", "refused")
                .await
                .unwrap();
        }
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let (page, next) = letters.page("a", "", after.as_deref(), 100).await.unwrap();
            assert!(page.len() <= 100);
            pages += 1;
            seen.extend(page.into_iter().map(|s| s.letter));
            match next {
                Some(id) => after = Some(id),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen.len(), 230);
        assert!(
            seen.windows(2).all(|w| w[0].id < w[1].id),
            "oldest first, no repeat"
        );
        assert!(seen.iter().all(|l| l.pipeline_name == "a"));
        assert_eq!(letters.count("a").await.unwrap(), 230);
        assert_eq!(letters.count("b").await.unwrap(), 7);
        let one = letters.get("a", &seen[42].id).await.unwrap().unwrap();
        assert_eq!(one.letter, seen[42]);
        assert!(letters.get("b", &seen[42].id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn embedded_letters_are_read_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("d.db")).unwrap();
        let table = store.table("dead", KeySchema::new("pipeline", Some("id")));
        pages_walk_every_letter_once(DeadLetters::new(Arc::new(table))).await;
    }

    #[tokio::test]
    async fn dynamodb_letters_are_read_a_page_at_a_time() {
        let (client, _) = dynamodb_clients().await;
        let name = unique_name("dead");
        let table = DynamoTable::create(
            client,
            &name,
            &KeySchema::new("pipeline", Some("id")),
            false,
        )
        .await
        .unwrap();
        pages_walk_every_letter_once(DeadLetters::new(Arc::new(table))).await;
    }

    /// A feed message delivered twice (its offset not committed before a
    /// restart) is kept once.
    #[tokio::test]
    async fn an_undecodable_message_is_kept_once_per_position() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("d.db")).unwrap();
        let letters = DeadLetters::new(Arc::new(
            store.table("dead", KeySchema::new("pipeline", Some("id"))),
        ));
        let message = Undecodable {
            position: Position {
                partition: "t/0".to_owned(),
                sequence: "17".to_owned(),
            },
            key: Some(b"k".to_vec()),
            payload: vec![0xff],
            payload_len: 1,
            created_at_micros: 1_700_000_000_000_000,
            reason: "bad".to_owned(),
        };
        letters.add_undecodable("a", &message).await.unwrap();
        letters.add_undecodable("a", &message).await.unwrap();
        let (page, _) = letters.page("a", "", None, 10).await.unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].letter.record_position, "t/0/17");
        assert_eq!(page[0].letter.sink_name, "");
    }
}
