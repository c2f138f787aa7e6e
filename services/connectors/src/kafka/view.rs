//! A topic read back as a table: every partition from its start to the end
//! it had when the read began, each key's latest record by version (ties
//! and older records ignored, a purge forgets the key), deletes dropped.
//! That is what a consumer applying "newer wins" holds, and what a
//! compacted topic converges to; the verifier compares it with the source.
//!
//! Messages written by [`super::KafkaSink`] say what they are in their
//! headers. A message without them is read as a `ChangeRecord` (what the
//! stats-aggregator publishes); anything else fails the read, naming the
//! message, rather than being skipped.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};

use super::sink::{
    CONTENT_TYPE_HEADER, JSON_TYPE, JsonRecord, KEY_HEADER, OP_HEADER, Op, VERSION_HEADER,
};
use super::{BACKEND, kafka_error};
use crate::error::{ConnectorError, ConnectorResult};
use crate::image::Image;
use crate::traits::Position;
use crate::value::{Item, Key};

/// How long a read may wait for the next message before it gives up.
const STALL: Duration = Duration::from_secs(30);

pub struct TopicView {
    brokers: String,
    topic: String,
}

/// A key's latest record; `item` is `None` for a delete.
struct Latest {
    key: Key,
    version: u64,
    item: Option<Item>,
}

/// One message, decoded.
struct Decoded {
    key: Key,
    version: u64,
    op: Op,
    item: Option<Item>,
}

impl TopicView {
    pub fn new(brokers: &str, topic: &str) -> Self {
        Self {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
        }
    }

    /// Calls `visit` with every live (key, version, item).
    ///
    /// # Errors
    /// A topic that cannot be read to its end, or a message that is not a
    /// record.
    pub async fn read(
        &self,
        visit: &mut (dyn FnMut(Key, u64, Item) + Send),
    ) -> ConnectorResult<()> {
        let brokers = self.brokers.clone();
        let topic = self.topic.clone();
        let latest = tokio::task::spawn_blocking(move || read_all(&brokers, &topic))
            .await
            .map_err(|e| ConnectorError::terminal(BACKEND, e.to_string()))??;
        for l in latest.into_values() {
            if let Some(item) = l.item {
                visit(l.key, l.version, item);
            }
        }
        Ok(())
    }
}

fn read_all(brokers: &str, topic: &str) -> ConnectorResult<HashMap<String, Latest>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Assigned partitions only: the group is never joined or committed.
        .set(
            "group.id",
            format!(
                "tidemark-view-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false")
        // Only committed records of transactional producers.
        .set("isolation.level", "read_committed")
        .create()
        .map_err(|e| kafka_error(&e))?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| kafka_error(&e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(ConnectorError::NotFound {
            backend: BACKEND,
            message: format!("topic {topic:?} does not exist"),
        });
    }
    // The end of each partition now: records written after the read began
    // are the next read's.
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| kafka_error(&e))?;
        if high > low {
            ends.insert(p, high);
            assignment
                .add_partition_offset(topic, p, Offset::Offset(low))
                .map_err(|e| kafka_error(&e))?;
        }
    }
    let mut latest: HashMap<String, Latest> = HashMap::new();
    if ends.is_empty() {
        return Ok(latest);
    }
    consumer.assign(&assignment).map_err(|e| kafka_error(&e))?;
    let mut heard = Instant::now();
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                heard = Instant::now();
                let p = message.partition();
                let offset = message.offset();
                if ends.get(&p).is_some_and(|end| offset < *end) {
                    apply(&mut latest, decode(&message, topic)?);
                }
                if ends.get(&p).is_some_and(|end| offset + 1 >= *end) {
                    ends.remove(&p);
                }
            }
            Some(Err(e)) => return Err(kafka_error(&e)),
            None => {
                // Transaction markers and compacted gaps hold offsets that
                // are never delivered: the consumer's position says when a
                // partition is read to its end.
                if let Ok(positions) = consumer.position() {
                    for e in positions.elements() {
                        if let (Offset::Offset(at), Some(end)) =
                            (e.offset(), ends.get(&e.partition()))
                            && at >= *end
                        {
                            ends.remove(&e.partition());
                        }
                    }
                }
                if !ends.is_empty() && heard.elapsed() > STALL {
                    return Err(ConnectorError::Retryable {
                        backend: BACKEND,
                        message: format!(
                            "topic {topic:?}: nothing read for {}s with partitions {:?} short of their end",
                            STALL.as_secs(),
                            ends.keys().collect::<Vec<_>>()
                        ),
                        retry_after: None,
                    });
                }
            }
        }
    }
    Ok(latest)
}

/// Newer wins; a purge forgets.
fn apply(latest: &mut HashMap<String, Latest>, d: Decoded) {
    let canonical = d.key.canonical();
    if d.op == Op::Purge {
        latest.remove(&canonical);
        return;
    }
    if latest
        .get(&canonical)
        .is_some_and(|l| d.version <= l.version)
    {
        return;
    }
    let item = if d.op == Op::Delete { None } else { d.item };
    latest.insert(
        canonical,
        Latest {
            key: d.key,
            version: d.version,
            item,
        },
    );
}

fn header<'a>(message: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

fn decode(message: &BorrowedMessage<'_>, topic: &str) -> ConnectorResult<Decoded> {
    let at = || {
        format!(
            "topic {topic:?} partition {} offset {}",
            message.partition(),
            message.offset()
        )
    };
    let bad = |why: String| ConnectorError::terminal(BACKEND, format!("{}: {why}", at()));
    let Some(op) = header(message, OP_HEADER) else {
        // Not the sink's: a ChangeRecord as Tidemark publishes them.
        let payload = message
            .payload()
            .ok_or_else(|| bad("a message without value or tidemark headers".to_owned()))?;
        let position = Position {
            partition: format!("{topic}/{}", message.partition()),
            sequence: message.offset().to_string(),
        };
        let record = crate::proto::decode_change(payload, position)
            .map_err(|e| bad(format!("not a ChangeRecord: {e}")))?;
        return Ok(Decoded {
            key: record.key,
            version: record.version,
            op: if record.new_image.is_some() {
                Op::Upsert
            } else {
                Op::Delete
            },
            item: record.new_image.map(Image::into_item),
        });
    };
    let op = Op::parse(op).ok_or_else(|| bad(format!("{OP_HEADER} {op:?}")))?;
    let version: u64 = header(message, VERSION_HEADER)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad(format!("no {VERSION_HEADER}")))?;
    let key: Key = header(message, KEY_HEADER)
        .and_then(|k| serde_json::from_str(k).ok())
        .ok_or_else(|| bad(format!("no {KEY_HEADER}")))?;
    let item = match (op, message.payload()) {
        (Op::Upsert, Some(payload)) => {
            let json = header(message, CONTENT_TYPE_HEADER) == Some(JSON_TYPE);
            Some(item_of(payload, json).map_err(bad)?)
        }
        (Op::Upsert, None) => return Err(bad("an upsert without value".to_owned())),
        _ => None,
    };
    Ok(Decoded {
        key,
        version,
        op,
        item,
    })
}

/// The item of an upsert's value, JSON or ChangeRecord.
fn item_of(payload: &[u8], json: bool) -> Result<Item, String> {
    if json {
        let record: JsonRecord =
            serde_json::from_slice(payload).map_err(|e| format!("bad JSON record: {e}"))?;
        return Ok(record.item);
    }
    let position = Position {
        partition: String::new(),
        sequence: String::new(),
    };
    crate::proto::decode_change(payload, position)
        .map_err(|e| format!("not a ChangeRecord: {e}"))?
        .new_image
        .map(Image::into_item)
        .ok_or_else(|| "an upsert whose ChangeRecord has no image".to_owned())
}
