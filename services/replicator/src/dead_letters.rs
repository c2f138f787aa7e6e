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

    /// Every dead letter of a pipeline (optionally of one sink), oldest first.
    pub async fn list(&self, pipeline: &str, sink: &str) -> ConnectorResult<Vec<Stored>> {
        let mut filter = vec![Predicate::Equals(
            "pipeline".to_owned(),
            AttrValue::s(pipeline),
        )];
        if !sink.is_empty() {
            filter.push(Predicate::Equals("sink".to_owned(), AttrValue::s(sink)));
        }
        let mut out = BTreeMap::new();
        let mut start_after = None;
        loop {
            let page = self
                .table
                .scan(&ScanRequest {
                    start_after,
                    filter: Some(Predicate::And(filter.clone())),
                    consistent: true,
                    ..ScanRequest::segment(0, 1)
                })
                .await?;
            for item in page.items {
                let key: BTreeMap<String, AttrValue> =
                    serde_json::from_str(&s(&item, "key")).unwrap_or_default();
                let key = Key(key);
                let letter = DeadLetter {
                    id: s(&item, "id"),
                    pipeline_name: s(&item, "pipeline"),
                    sink_name: s(&item, "sink"),
                    key: Some(key_to_proto(&key)),
                    version: n(&item, "version"),
                    deleted: matches!(item.get("deleted"), Some(AttrValue::Bool(true))),
                    record_position: s(&item, "position"),
                    reason: s(&item, "reason"),
                    create_time: Some(timestamp(n(&item, "created"))),
                    last_attempt_time: Some(timestamp(n(&item, "attempted"))),
                    attempts: u32::try_from(n(&item, "attempts")).unwrap_or(u32::MAX),
                };
                out.insert(letter.id.clone(), Stored { letter, key });
            }
            match page.last_key {
                Some(k) => start_after = Some(k),
                None => break,
            }
        }
        Ok(out.into_values().collect())
    }

    pub async fn remove(&self, pipeline: &str, id: &str) -> ConnectorResult<()> {
        let key = Key::new([
            ("pipeline".to_owned(), AttrValue::s(pipeline)),
            ("id".to_owned(), AttrValue::s(id)),
        ]);
        self.table.delete(&key, None).await
    }

    /// Records another failed attempt with its new reason.
    pub async fn retried(&self, stored: &Stored, reason: &str) -> ConnectorResult<()> {
        let key = Key::new([
            (
                "pipeline".to_owned(),
                AttrValue::s(&stored.letter.pipeline_name),
            ),
            ("id".to_owned(), AttrValue::s(&stored.letter.id)),
        ]);
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
