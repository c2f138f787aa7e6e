//! Kafka as a [`ChangeFeed`]: a topic of `tidemark.common.v1.ChangeRecord`
//! messages keyed by item key (so one key's changes are in one partition, in
//! order), read by a consumer group with rdkafka's async `StreamConsumer`.
//! Offsets are committed only through [`ChangeFeed::commit`], which the
//! replicator calls after every sink wrote the records (invariant 1); the
//! group's committed offsets are the durable checkpoint, so a replica that
//! takes over a partition resumes after the last record written.
//!
//! A message that is not a valid `ChangeRecord` cannot be applied and must
//! not block its partition: it is handed to the reader through
//! [`ChangeFeed::take_undecodable`] (the replicator keeps it as a dead
//! letter), counted in [`KafkaFeed::undecodable`], and its offset is
//! committed with the records polled alongside it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use super::{BACKEND, KafkaStart, kafka_error};
use crate::error::{ConnectorError, ConnectorResult};
use crate::traits::{
    ChangeFeed, ChangeRecord, FeedCheckpoint, PartitionCheckpoint, PartitionLag, Position,
    Undecodable,
};

#[derive(Default)]
struct PartitionState {
    delivered: Option<i64>,
    committed: Option<i64>,
    low_watermark: Option<i64>,
    high_watermark: Option<i64>,
    oldest_uncommitted_micros: Option<i64>,
}

pub struct KafkaFeed {
    consumer: Arc<StreamConsumer>,
    /// Set when the records are written by a transactional sink: offsets
    /// commit in its transactions.
    transactional: Option<Arc<super::KafkaSink>>,
    topic: String,
    partitions: BTreeMap<i32, PartitionState>,
    undecodable: u64,
    /// Undecodable messages of the last polls, not yet taken by the reader.
    rejected: Vec<Undecodable>,
    watermarks_at: Option<Instant>,
    start: KafkaStart,
    /// Whether a record's new image may stay encoded (see
    /// [`KafkaFeed::keep_images_encoded`]).
    encoded: bool,
}

impl KafkaFeed {
    /// Joins consumer group `group` on `topic`.
    ///
    /// # Errors
    /// A client that cannot be created or a subscription refused.
    pub fn subscribe(
        brokers: &str,
        topic: &str,
        group: &str,
        start: KafkaStart,
    ) -> ConnectorResult<Self> {
        Self::subscribe_as(brokers, topic, group, start, None)
    }

    /// [`Self::subscribe`] as the static member `instance`
    /// (`group.instance.id`): the next holder of the same instance takes
    /// its partitions over at once, without waiting for the group to drop
    /// a member that died without leaving, and without moving the other
    /// members' partitions.
    ///
    /// # Errors
    /// A client that cannot be created or a subscription refused.
    pub fn subscribe_as(
        brokers: &str,
        topic: &str,
        group: &str,
        start: KafkaStart,
        instance: Option<&str>,
    ) -> ConnectorResult<Self> {
        let mut config = ClientConfig::new();
        if let Some(instance) = instance {
            config.set("group.instance.id", instance);
        }
        let consumer: StreamConsumer = config
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match start {
                    KafkaStart::Earliest => "earliest",
                    KafkaStart::Latest => "latest",
                },
            )
            .set("session.timeout.ms", "6000")
            .create()
            .map_err(|e| kafka_error(&e))?;
        consumer.subscribe(&[topic]).map_err(|e| kafka_error(&e))?;
        Ok(Self {
            consumer: Arc::new(consumer),
            transactional: None,
            topic: topic.to_owned(),
            partitions: BTreeMap::new(),
            undecodable: 0,
            rejected: Vec::new(),
            watermarks_at: None,
            start,
            encoded: false,
        })
    }

    /// Hands over new images in the canonical form still encoded
    /// ([`crate::Image::Encoded`], read in place in the message's payload)
    /// instead of decoded: for a reader whose every sink writes from the
    /// encoding, so no item is built only to be taken apart.
    pub fn keep_images_encoded(&mut self) {
        self.encoded = true;
    }

    /// Commits offsets in `sink`'s transactions from now on: the records
    /// written and the offsets read commit together (exactly once).
    pub fn commit_through(&mut self, sink: Arc<super::KafkaSink>) {
        self.transactional = Some(sink);
    }

    /// Messages skipped because they were not valid change records.
    pub fn undecodable(&self) -> u64 {
        self.undecodable
    }

    fn partition_name(&self, p: i32) -> String {
        format!("{}/{p}", self.topic)
    }

    /// Refreshes, at most once a second, every partition of the topic with
    /// its watermarks and the group's committed offset, so lag also counts
    /// partitions from which nothing was delivered yet. Bounded metadata
    /// round trips on the blocking pool, so a slow broker stalls neither
    /// polling for long nor a runtime worker at all.
    async fn refresh_watermarks(&mut self) {
        if self
            .watermarks_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.watermarks_at = Some(Instant::now());
        let consumer = Arc::clone(&self.consumer);
        let topic = self.topic.clone();
        let known: Vec<i32> = self.partitions.keys().copied().collect();
        let Ok(seen) = tokio::task::spawn_blocking(move || observe(&consumer, &topic, known)).await
        else {
            return;
        };
        for (p, observed) in seen {
            let state = self.partitions.entry(p).or_default();
            if let Some(c) = observed.committed {
                state.committed = state.committed.max(Some(c));
            }
            if let Some((low, high)) = observed.watermarks {
                state.low_watermark = Some(low);
                state.high_watermark = Some(high);
            }
        }
    }

    /// Keeps an undecodable message for the reader to dead-letter.
    fn reject(&mut self, message: &rdkafka::message::BorrowedMessage<'_>, reason: String) {
        let partition = message.partition();
        let offset = message.offset();
        tracing::error!(topic = %self.topic, partition, offset, reason, "a message that is not a change record: dead-lettered");
        self.undecodable += 1;
        let payload = message.payload().unwrap_or_default();
        self.rejected.push(Undecodable {
            position: Position {
                partition: self.partition_name(partition),
                sequence: offset.to_string(),
            },
            key: message.key().map(<[u8]>::to_vec),
            payload: payload[..payload.len().min(Undecodable::KEPT_BYTES)].to_vec(),
            payload_len: payload.len(),
            created_at_micros: message
                .timestamp()
                .to_millis()
                .map_or_else(crate::now_micros, |ms| ms.saturating_mul(1000)),
            reason,
        });
    }
}

/// What one metadata round found of a partition.
#[derive(Default)]
struct Observed {
    /// The group's last committed record (Kafka's committed offset − 1).
    committed: Option<i64>,
    watermarks: Option<(i64, i64)>,
}

/// The topic's partitions with the group's committed offsets and the
/// watermarks, each call bounded; blocking (librdkafka waits for the
/// broker), so it runs on the blocking pool.
fn observe(consumer: &StreamConsumer, topic: &str, known: Vec<i32>) -> BTreeMap<i32, Observed> {
    let timeout = Duration::from_millis(500);
    let mut out: BTreeMap<i32, Observed> = known
        .into_iter()
        .map(|p| (p, Observed::default()))
        .collect();
    if let Ok(metadata) = consumer.client().fetch_metadata(Some(topic), timeout) {
        for t in metadata.topics() {
            for p in t.partitions() {
                out.entry(p.id()).or_default();
            }
        }
    }
    // Every partition's committed offset, each time: other consumers of
    // the group commit the partitions they were given, and the lag
    // reported here is the whole topic's.
    let mut all = TopicPartitionList::new();
    for p in out.keys() {
        all.add_partition(topic, *p);
    }
    if all.count() > 0
        && let Ok(committed) = consumer.committed_offsets(all, timeout)
    {
        for e in committed.elements() {
            if let (Offset::Offset(o), Some(observed)) = (e.offset(), out.get_mut(&e.partition())) {
                observed.committed = Some(o - 1);
            }
        }
    }
    for (p, observed) in &mut out {
        observed.watermarks = consumer.client().fetch_watermarks(topic, *p, timeout).ok();
    }
    out
}

#[async_trait]
impl ChangeFeed for KafkaFeed {
    async fn poll(&mut self, max: usize) -> ConnectorResult<Vec<ChangeRecord>> {
        let mut out = Vec::new();
        let first_wait = Duration::from_millis(200);
        let mut wait = first_wait;
        let consumer = Arc::clone(&self.consumer);
        while out.len() < max {
            let message = match tokio::time::timeout(wait, consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(kafka_error(&e)),
                Ok(Ok(m)) => m,
            };
            // After the first message, only take what is already buffered.
            wait = Duration::from_millis(5);
            let partition = message.partition();
            let offset = message.offset();
            let position = Position {
                partition: self.partition_name(partition),
                sequence: offset.to_string(),
            };
            let state = self.partitions.entry(partition).or_default();
            state.delivered = Some(offset);
            let decoded = match message.payload() {
                Some(p) if self.encoded => {
                    Some(crate::proto::decode_change_encoded(&Arc::from(p), position))
                }
                Some(p) => Some(crate::proto::decode_change(p, position)),
                None => None,
            };
            match decoded {
                Some(Ok(record)) => {
                    state
                        .oldest_uncommitted_micros
                        .get_or_insert(record.created_at_micros);
                    out.push(record);
                }
                Some(Err(e)) => self.reject(&message, e.to_string()),
                None => self.reject(&message, "a message without payload".to_owned()),
            }
        }
        self.refresh_watermarks().await;
        Ok(out)
    }

    /// An empty poll already waited for the broker to deliver.
    fn idle_wait(&self) -> Duration {
        Duration::ZERO
    }

    async fn commit(&mut self, position: &Position) -> ConnectorResult<()> {
        self.commit_all(std::slice::from_ref(position)).await
    }

    /// One commit for the batch: of the consumer, or of the transactional
    /// sink's transaction with these offsets.
    async fn commit_all(&mut self, positions: &[Position]) -> ConnectorResult<()> {
        let mut tpl = TopicPartitionList::new();
        let mut done = Vec::with_capacity(positions.len());
        for position in positions {
            let partition: i32 = position
                .partition
                .rsplit('/')
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| {
                    ConnectorError::invalid(
                        BACKEND,
                        format!("bad partition {:?}", position.partition),
                    )
                })?;
            let offset: i64 = position.sequence.parse().map_err(|_| {
                ConnectorError::invalid(BACKEND, format!("bad offset {:?}", position.sequence))
            })?;
            // Kafka's committed offset is the next one to read.
            tpl.add_partition_offset(&self.topic, partition, Offset::Offset(offset + 1))
                .map_err(|e| kafka_error(&e))?;
            done.push((partition, offset));
        }
        if let Some(sink) = &self.transactional {
            let group = self.consumer.group_metadata().ok_or_else(|| {
                ConnectorError::terminal(BACKEND, "the consumer has no group metadata")
            })?;
            sink.commit_offsets(tpl, group).await?;
        } else if !done.is_empty() {
            let consumer = Arc::clone(&self.consumer);
            tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
                .await
                .map_err(|e| ConnectorError::terminal(BACKEND, e.to_string()))?
                .map_err(|e| kafka_error(&e))?;
        }
        for (partition, offset) in done {
            let state = self.partitions.entry(partition).or_default();
            state.committed = Some(offset);
            if state.delivered.is_none_or(|d| d <= offset) {
                state.oldest_uncommitted_micros = None;
            }
        }
        Ok(())
    }

    fn take_undecodable(&mut self) -> Vec<Undecodable> {
        std::mem::take(&mut self.rejected)
    }

    fn checkpoint(&self) -> FeedCheckpoint {
        FeedCheckpoint {
            partitions: self
                .partitions
                .iter()
                .map(|(p, s)| {
                    (
                        self.partition_name(*p),
                        PartitionCheckpoint {
                            sequence: s.committed.map(|o| o.to_string()),
                            version: 0,
                            finished: false,
                            parent: None,
                        },
                    )
                })
                .collect(),
        }
    }

    fn lag(&self) -> Vec<PartitionLag> {
        let now = chrono::Utc::now().timestamp_micros();
        self.partitions
            .iter()
            .map(|(p, s)| {
                let records = match (s.committed, s.high_watermark) {
                    (Some(c), Some(h)) => (h - (c + 1)).max(0),
                    // No committed offset yet: from the start of the
                    // partition when reading from the earliest, nothing
                    // when reading only new messages.
                    (None, Some(h)) if self.start == KafkaStart::Earliest => {
                        (h - s.low_watermark.unwrap_or(0)).max(0)
                    }
                    _ => 0,
                };
                #[allow(clippy::cast_precision_loss, reason = "seconds of lag")]
                let seconds = s
                    .oldest_uncommitted_micros
                    .map_or(0.0, |t| ((now - t).max(0)) as f64 / 1e6);
                PartitionLag {
                    partition: self.partition_name(*p),
                    records: u64::try_from(records).unwrap_or(0),
                    seconds,
                }
            })
            .collect()
    }
}
