//! A Kafka topic as a pipeline's [`Sink`]: one message per record, keyed by
//! the item's key (its values joined with `#`, partition key first, as every
//! Tidemark topic is keyed), so one key's records share a partition and
//! stay in order. An idempotent producer (`enable.idempotence`) writes them:
//! librdkafka's own retries can neither duplicate nor reorder a partition's
//! messages.
//!
//! Every message says what it is in its headers, whatever its format:
//! [`VERSION_HEADER`] (the record's version, decimal), [`KEY_HEADER`] (the
//! item's key as DynamoDB JSON), [`OP_HEADER`] (`upsert`, `delete` or
//! `purge`) and `content-type`. A topic has no conditional write, so
//! "newer wins" is what a reader applies: the latest record of a key is the
//! one with the highest version, ties and older ones ignored, and a purge
//! forgets the key ([`super::TopicView`] reads a topic that way, and the
//! verifier with it). On a compacted topic (`cleanup.policy=compact`) a
//! delete in JSON is a real tombstone (no value), so compaction removes the
//! key.
//!
//! Within one process the sink remembers the versions it delivered (a
//! bounded map), so a replayed record is answered `Stale` without being
//! sent again; after a restart a replay is sent again, which readers
//! applying "newer wins" ignore.
//!
//! Read from a Kafka feed, a sink can be transactional
//! ([`KafkaSink::connect_transactional`]): the records of a batch and the
//! feed's consumer offsets commit together ([`KafkaSink::commit_offsets`],
//! which the feed calls instead of committing its offsets itself), so a
//! `read_committed` reader sees each record once, after a crash too
//! (read-process-write, exactly once). A new holder of the same
//! `transactional.id` fences the old one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::TopicPartitionList;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use serde::{Deserialize, Serialize};

use super::{BACKEND, TopicView, kafka_error};
use crate::error::{ConnectorError, ConnectorResult};
use crate::proto::{encode_change, kafka_key};
use crate::traits::{BucketDigest, RecordOutcome, Sink, SinkRecord, fold_digest};
use crate::value::{Item, Key, KeySchema};

/// The record's version, in decimal.
pub const VERSION_HEADER: &str = "tidemark-version";
/// The item's key as DynamoDB JSON (`{"pk":{"S":"a"}}`): the key of a
/// delete, whose JSON message has no value.
pub const KEY_HEADER: &str = "tidemark-key";
/// `upsert`, `delete` or `purge`.
pub const OP_HEADER: &str = "tidemark-op";
pub const CONTENT_TYPE_HEADER: &str = "content-type";
pub const JSON_TYPE: &str = "application/json";
pub const CHANGE_RECORD_TYPE: &str =
    "application/x-protobuf; messageType=tidemark.common.v1.ChangeRecord";

/// How long a transaction's blocking calls may take.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Versions remembered per process before the memory starts over.
const REMEMBERED: usize = 65_536;
/// How long librdkafka may take to deliver one message, its retries
/// included, before the batch fails (and is retried by the pipeline).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// How a sink encodes its messages' values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KafkaFormat {
    /// `{"key": {...}, "version": "7", "item": {...}}` with key and item as
    /// DynamoDB JSON; a delete has no value (a tombstone).
    #[default]
    Json,
    /// `tidemark.common.v1.ChangeRecord` (protobuf), which a pipeline with a
    /// Kafka feed reads; a delete is a record with `deleted` set.
    ChangeRecord,
}

/// The JSON value of an upsert.
#[derive(Serialize, Deserialize)]
pub(crate) struct JsonRecord {
    pub key: Key,
    /// Decimal: a version may not fit a JSON reader's double.
    pub version: String,
    pub item: Item,
}

/// What one message does to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Upsert,
    Delete,
    Purge,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Upsert => "upsert",
            Self::Delete => "delete",
            Self::Purge => "purge",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "upsert" => Some(Self::Upsert),
            "delete" => Some(Self::Delete),
            "purge" => Some(Self::Purge),
            _ => None,
        }
    }
}

pub struct KafkaSink {
    producer: FutureProducer,
    brokers: String,
    topic: String,
    schema: KeySchema,
    format: KafkaFormat,
    /// Versions delivered by this process, by canonical key (not kept by a
    /// transactional sink: a delivered record of an aborted transaction
    /// was never written).
    delivered: Mutex<HashMap<String, u64>>,
    /// Set for a transactional sink: whether a transaction is open.
    transaction: Option<tokio::sync::Mutex<bool>>,
}

impl KafkaSink {
    /// A sink writing `topic` on `brokers`; `schema` names the key's
    /// partition attribute (the first part of the message key). The topic
    /// must exist: see [`super::topic_partitions`].
    ///
    /// # Errors
    /// A producer that cannot be configured.
    pub fn connect(
        brokers: &str,
        topic: &str,
        schema: KeySchema,
        format: KafkaFormat,
    ) -> ConnectorResult<Self> {
        let producer: FutureProducer = producer_config(brokers)
            // Acks from every in-sync replica, retries without duplicates
            // or reordering within a partition.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| kafka_error(&e))?;
        Ok(Self::with(producer, brokers, topic, schema, format, None))
    }

    fn with(
        producer: FutureProducer,
        brokers: &str,
        topic: &str,
        schema: KeySchema,
        format: KafkaFormat,
        transaction: Option<tokio::sync::Mutex<bool>>,
    ) -> Self {
        Self {
            producer,
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            schema,
            format,
            delivered: Mutex::default(),
            transaction,
        }
    }

    /// A sink whose records commit with the offsets of the Kafka feed they
    /// were read from; `id` is the `transactional.id`, the same for every
    /// holder of one feed unit, so a new holder fences the last one (and
    /// aborts what it left open).
    ///
    /// # Errors
    /// A producer that cannot be configured, or brokers that refuse the
    /// transactional id.
    pub async fn connect_transactional(
        brokers: &str,
        topic: &str,
        schema: KeySchema,
        format: KafkaFormat,
        id: &str,
    ) -> ConnectorResult<Self> {
        // A transactional producer is idempotent and acks from all.
        let producer: FutureProducer = producer_config(brokers)
            .set("transactional.id", id)
            .create()
            .map_err(|e| kafka_error(&e))?;
        let init = producer.clone();
        tokio::task::spawn_blocking(move || init.init_transactions(TRANSACTION_TIMEOUT))
            .await
            .map_err(|e| ConnectorError::terminal(BACKEND, e.to_string()))?
            .map_err(|e| classify(&e))?;
        let open = Some(tokio::sync::Mutex::new(false));
        Ok(Self::with(producer, brokers, topic, schema, format, open))
    }

    pub fn is_transactional(&self) -> bool {
        self.transaction.is_some()
    }

    /// Opens a transaction unless one is open.
    async fn begin(&self) -> ConnectorResult<()> {
        if let Some(open) = &self.transaction {
            let mut open = open.lock().await;
            if !*open {
                self.producer
                    .begin_transaction()
                    .map_err(|e| classify(&e))?;
                *open = true;
            }
        }
        Ok(())
    }

    /// Commits the open transaction (or an empty one) with the feed's
    /// `offsets` (the next offset to read, per partition) for the consumer
    /// group `group`. On failure the transaction is aborted: the batch's
    /// records are never seen, and the feed delivers them again.
    ///
    /// # Errors
    /// `Retryable` for a transaction to try again; `Terminal` when this
    /// producer was fenced by a newer holder of its id.
    pub async fn commit_offsets(
        &self,
        offsets: TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> ConnectorResult<()> {
        let Some(open) = &self.transaction else {
            return Err(ConnectorError::invalid(
                BACKEND,
                "commit_offsets needs a transactional sink",
            ));
        };
        let mut open = open.lock().await;
        if !*open {
            self.producer
                .begin_transaction()
                .map_err(|e| classify(&e))?;
        }
        *open = false;
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            let sent = if offsets.count() == 0 {
                Ok(())
            } else {
                producer.send_offsets_to_transaction(&offsets, &group, TRANSACTION_TIMEOUT)
            };
            let done = sent.and_then(|()| producer.commit_transaction(TRANSACTION_TIMEOUT));
            if let Err(e) = &done {
                tracing::warn!(error = %e, "transaction failed: aborted, the batch is read again");
                let _ = producer.abort_transaction(TRANSACTION_TIMEOUT);
            }
            done
        })
        .await
        .map_err(|e| ConnectorError::terminal(BACKEND, e.to_string()))?
        .map_err(|e| classify(&e))
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn view(&self) -> TopicView {
        TopicView::new(&self.brokers, &self.topic)
    }

    /// The value, op and content type of a record's message.
    fn encode(&self, record: &SinkRecord) -> (Option<Vec<u8>>, Op) {
        match (record.op.item(), self.format) {
            (Some(item), KafkaFormat::Json) => {
                let value = serde_json::to_vec(&JsonRecord {
                    key: record.key.clone(),
                    version: record.version.to_string(),
                    item: item.into_owned(),
                })
                .expect("attribute values always serialise");
                (Some(value), Op::Upsert)
            }
            (None, KafkaFormat::Json) => (None, Op::Delete),
            (Some(item), KafkaFormat::ChangeRecord) => (
                Some(encode_change(
                    &record.key,
                    Some(&item),
                    record.version,
                    crate::now_micros(),
                )),
                Op::Upsert,
            ),
            (None, KafkaFormat::ChangeRecord) => (
                Some(encode_change(
                    &record.key,
                    None,
                    record.version,
                    crate::now_micros(),
                )),
                Op::Delete,
            ),
        }
    }

    fn content_type(&self) -> &'static str {
        match self.format {
            KafkaFormat::Json => JSON_TYPE,
            KafkaFormat::ChangeRecord => CHANGE_RECORD_TYPE,
        }
    }

    /// Queues one message, in the order of the calls: a full local queue
    /// is waited out here, never skipped past (that would reorder a key's
    /// records).
    async fn enqueue(
        &self,
        key: &Key,
        version: u64,
        value: Option<&[u8]>,
        op: Op,
    ) -> ConnectorResult<DeliveryFuture> {
        let message_key = kafka_key(key, &self.schema.partition);
        let key_json = serde_json::to_string(key).expect("keys always serialise");
        let version_text = version.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: VERSION_HEADER,
                value: Some(version_text.as_str()),
            })
            .insert(Header {
                key: KEY_HEADER,
                value: Some(key_json.as_str()),
            })
            .insert(Header {
                key: OP_HEADER,
                value: Some(op.name()),
            })
            .insert(Header {
                key: CONTENT_TYPE_HEADER,
                value: Some(self.content_type()),
            });
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topic)
            .key(message_key.as_str())
            .headers(headers);
        if let Some(v) = value {
            record = record.payload(v);
        }
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    // The producer's own thread serves delivery reports,
                    // which frees the queue; a blocking poll here would
                    // hold a runtime worker.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(classify(&e)),
            }
        }
    }

    /// Waits for one message's delivery: `Ok(None)` when delivered,
    /// `Ok(Some(reason))` when the broker refused this message alone.
    async fn delivered(delivery: DeliveryFuture) -> ConnectorResult<Option<String>> {
        match delivery.await {
            Ok(Ok(_)) => Ok(None),
            Ok(Err((e, _))) => match classify(&e) {
                ConnectorError::Terminal { message, .. } => Ok(Some(message)),
                other => Err(other),
            },
            Err(_) => Err(ConnectorError::Retryable {
                backend: BACKEND,
                message: "the producer went away before the delivery report".to_owned(),
                retry_after: None,
            }),
        }
    }

    fn remembered(&self, key: &str) -> Option<u64> {
        self.delivered
            .lock()
            .expect("delivered versions lock")
            .get(key)
            .copied()
    }

    fn remember(&self, key: String, version: Option<u64>) {
        let mut delivered = self.delivered.lock().expect("delivered versions lock");
        if delivered.len() >= REMEMBERED {
            // Forgetting only costs a resend, which readers ignore.
            delivered.clear();
        }
        match version {
            Some(v) => {
                let at = delivered.entry(key).or_insert(v);
                *at = (*at).max(v);
            }
            None => {
                delivered.remove(&key);
            }
        }
    }
}

/// What every producer of a sink sets.
fn producer_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
        )
        .set("allow.auto.create.topics", "false");
    config
}

/// Refusals of one message (too large, not allowed) are the record's; the
/// rest is worth another try of the batch.
fn classify(err: &KafkaError) -> ConnectorError {
    use RDKafkaErrorCode as C;
    match err.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidRecord
            | C::TopicAuthorizationFailed
            | C::UnknownTopicOrPartition
            | C::UnknownTopic
            | C::ProducerFenced
            | C::InvalidProducerEpoch
            | C::TransactionalIdAuthorizationFailed,
        ) => ConnectorError::terminal(BACKEND, err.to_string()),
        _ => kafka_error(err),
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn name(&self) -> String {
        format!("kafka topic {}", self.topic)
    }

    fn ordered(&self) -> bool {
        true
    }

    #[tracing::instrument(skip_all, fields(topic = %self.topic, records = batch.len()))]
    async fn apply(&self, batch: &[SinkRecord]) -> ConnectorResult<Vec<RecordOutcome>> {
        self.begin().await?;
        let remember = !self.is_transactional();
        // Decided in batch order, counting what this batch itself sends.
        let mut sending: HashMap<String, u64> = HashMap::new();
        let mut plan = Vec::with_capacity(batch.len());
        for record in batch {
            let canonical = record.key.canonical();
            let known = sending
                .get(&canonical)
                .copied()
                .or_else(|| remember.then(|| self.remembered(&canonical)).flatten());
            if known.is_some_and(|v| record.version <= v) {
                plan.push(None);
                continue;
            }
            sending.insert(canonical.clone(), record.version);
            plan.push(Some(canonical));
        }
        let mut deliveries = Vec::with_capacity(batch.len());
        for (record, canonical) in batch.iter().zip(&plan) {
            if canonical.is_some() {
                let (value, op) = self.encode(record);
                deliveries.push(Some(
                    self.enqueue(&record.key, record.version, value.as_deref(), op)
                        .await?,
                ));
            } else {
                deliveries.push(None);
            }
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for ((record, canonical), delivery) in batch.iter().zip(plan).zip(deliveries) {
            let (Some(canonical), Some(delivery)) = (canonical, delivery) else {
                outcomes.push(RecordOutcome::Stale);
                continue;
            };
            match Self::delivered(delivery).await? {
                None => {
                    if remember {
                        self.remember(canonical, Some(record.version));
                    }
                    outcomes.push(RecordOutcome::Applied);
                }
                Some(reason) => outcomes.push(RecordOutcome::Rejected(reason)),
            }
        }
        Ok(outcomes)
    }

    async fn read(&self, key: &Key) -> ConnectorResult<Option<(u64, Item)>> {
        let wanted = key.canonical();
        let mut found = None;
        self.view()
            .read(&mut |k, version, item| {
                if k.canonical() == wanted {
                    found = Some((version, item));
                }
            })
            .await?;
        Ok(found)
    }

    /// Sends a purge for each key: readers forget everything the topic
    /// held of it, so a later record at any version is its latest.
    async fn purge(&self, keys: &[Key]) -> ConnectorResult<u64> {
        let mut deliveries = Vec::with_capacity(keys.len());
        for key in keys {
            deliveries.push(self.enqueue(key, 0, None, Op::Purge).await?);
        }
        for (key, delivery) in keys.iter().zip(deliveries) {
            if let Some(reason) = Self::delivered(delivery).await? {
                return Err(ConnectorError::terminal(BACKEND, reason));
            }
            self.remember(key.canonical(), None);
        }
        Ok(u64::try_from(keys.len()).unwrap_or(u64::MAX))
    }

    async fn digest(&self, buckets: u32) -> ConnectorResult<Vec<BucketDigest>> {
        let n = usize::try_from(buckets.max(1)).unwrap_or(1);
        let mut out = vec![BucketDigest::default(); n];
        self.view()
            .read(&mut |key, version, item| fold_digest(&mut out, &key, version, &item))
            .await?;
        Ok(out)
    }

    async fn entries(&self, visit: &mut (dyn FnMut(Key, u64, Item) + Send)) -> ConnectorResult<()> {
        self.view().read(visit).await
    }
}
