//! The four store abstractions of DESIGN.md §2. Every real store and the
//! embedded one implement them; one behaviour suite checks every
//! implementation of each trait.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::ConnectorResult;
use crate::image::{EncodedItem, Image};
use crate::predicate::Predicate;
use crate::value::{Item, Key, KeySchema};

impl SinkOp {
    /// The item an upsert writes (decoded if it is encoded); `None` for a
    /// delete.
    pub fn item(&self) -> Option<Cow<'_, Item>> {
        match self {
            Self::Upsert(item) => Some(Cow::Borrowed(item)),
            Self::UpsertEncoded(e) => Some(Cow::Owned(e.to_item())),
            Self::Delete => None,
        }
    }
}

/// One page of a segmented scan.
#[derive(Clone, Debug)]
pub struct ScanRequest {
    /// This worker's segment, `0..total_segments`.
    pub segment: u32,
    pub total_segments: u32,
    /// Resume after this key (the previous page's `last_key`, or a checkpoint).
    pub start_after: Option<Key>,
    /// Items to examine in this page (before the filter).
    pub limit: u32,
    /// Only items matching this are returned.
    pub filter: Option<Predicate>,
    /// Strongly consistent reads where the store offers a choice.
    pub consistent: bool,
}

impl ScanRequest {
    pub fn segment(segment: u32, total_segments: u32) -> Self {
        Self {
            segment,
            total_segments,
            start_after: None,
            limit: 1000,
            filter: None,
            consistent: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ScanPage {
    pub items: Vec<Item>,
    /// Where the next page starts; `None` when the segment is exhausted.
    /// A page may be empty and still have a `last_key` (everything filtered).
    pub last_key: Option<Key>,
    /// Items examined, filtered or not.
    pub scanned: u64,
}

/// A table that can be scanned in parallel segments, read by key and written
/// conditionally: the source of a backfill or migration.
#[async_trait]
pub trait SourceTable: Send + Sync {
    fn name(&self) -> &str;
    fn key_schema(&self) -> &KeySchema;
    async fn scan(&self, request: &ScanRequest) -> ConnectorResult<ScanPage>;
    async fn get(&self, key: &Key) -> ConnectorResult<Option<Item>>;
    /// Writes the whole item; fails with `Precondition` when `condition` does not hold.
    async fn put(&self, item: &Item, condition: Option<&Predicate>) -> ConnectorResult<()>;
    /// Sets the given attributes of the item (creating it when absent) and
    /// returns the new item; fails with `Precondition` when `condition` does
    /// not hold, leaving the item untouched.
    async fn update(
        &self,
        key: &Key,
        set: &Item,
        condition: Option<&Predicate>,
    ) -> ConnectorResult<Item>;
    async fn delete(&self, key: &Key, condition: Option<&Predicate>) -> ConnectorResult<()>;
}

/// What happened to an item, as a change feed reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    Insert,
    Modify,
    Remove,
}

/// Where a record sits in its feed: a shard or partition and a sequence
/// number or offset within it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    pub partition: String,
    pub sequence: String,
}

/// One committed change of one item.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangeRecord {
    pub key: Key,
    pub kind: ChangeKind,
    /// Encoded only from a Kafka feed, in the canonical form.
    pub new_image: Option<Image>,
    pub old_image: Option<Item>,
    /// Monotonic per key across the feed (DESIGN.md invariant 3): sinks write
    /// conditionally on it, so replays never move a target backwards.
    pub version: u64,
    /// When the change was made, in microseconds since the epoch
    /// (second precision for DynamoDB Streams).
    pub created_at_micros: i64,
    pub position: Position,
}

/// Durable progress of a feed: what was committed per partition. Opaque to
/// callers; stored as JSON in checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedCheckpoint {
    pub partitions: BTreeMap<String, PartitionCheckpoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionCheckpoint {
    /// Last committed sequence; `None` when nothing was committed yet.
    pub sequence: Option<String>,
    /// Version assigned to that record, so a resumed feed assigns the same
    /// versions to the records that follow.
    pub version: u64,
    /// The partition has ended and every record of it was committed.
    pub finished: bool,
    pub parent: Option<String>,
}

/// Lag of one partition.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionLag {
    pub partition: String,
    /// Records delivered but not committed, plus records known to be waiting.
    pub records: u64,
    /// Age of the oldest uncommitted record, or 0.
    pub seconds: f64,
}

/// An ordered stream of changes that is read from a checkpoint and
/// acknowledged after the sink write succeeded (DESIGN.md invariant 1).
#[async_trait]
pub trait ChangeFeed: Send {
    /// Up to `max` records not yet delivered, in order within each key.
    /// Returns an empty batch when nothing is waiting.
    async fn poll(&mut self, max: usize) -> ConnectorResult<Vec<ChangeRecord>>;
    /// Marks every record of `position.partition` up to and including
    /// `position` as done. Records delivered but never committed are
    /// delivered again after a restart from [`ChangeFeed::checkpoint`].
    async fn commit(&mut self, position: &Position) -> ConnectorResult<()>;
    /// Commits the last position of each partition of one batch, as
    /// [`ChangeFeed::commit`] does one by one. A feed whose records are
    /// written in a transaction commits them all with it.
    async fn commit_all(&mut self, positions: &[Position]) -> ConnectorResult<()> {
        for position in positions {
            self.commit(position).await?;
        }
        Ok(())
    }
    fn checkpoint(&self) -> FeedCheckpoint;
    fn lag(&self) -> Vec<PartitionLag>;
    /// What the other readers of a shared feed checkpointed (their
    /// partitions' progress), so that a partition waiting on one of theirs
    /// (a child shard on its parent) can go on. Ignored by feeds that are
    /// not shared this way.
    fn learn_peers(&mut self, _peers: &FeedCheckpoint) {}
    /// How long a reader waits after an empty poll before polling again:
    /// what the feed's own reads cost its source (DynamoDB Streams allows
    /// five GetRecords a second per shard, shared by every reader).
    fn idle_wait(&self) -> Duration {
        Duration::from_millis(200)
    }
    /// The messages of the last poll that were not change records. The
    /// reader keeps each as a dead letter before it commits anything after
    /// it (invariant 1: nothing is dropped silently); their positions are
    /// committed with the records polled alongside them.
    fn take_undecodable(&mut self) -> Vec<Undecodable> {
        Vec::new()
    }
}

/// A message of a feed that cannot be applied: not a change record.
#[derive(Clone, Debug, PartialEq)]
pub struct Undecodable {
    pub position: Position,
    /// The message's key as sent (Kafka: the item key's bytes), if any.
    pub key: Option<Vec<u8>>,
    /// The message's first [`Undecodable::KEPT_BYTES`] bytes.
    pub payload: Vec<u8>,
    /// The whole payload's length.
    pub payload_len: usize,
    /// When the message was produced, in microseconds since the epoch.
    pub created_at_micros: i64,
    pub reason: String,
}

impl Undecodable {
    /// How much of a payload is kept: a dead letter is one item of the
    /// dead-letter table, well under DynamoDB's 400 KB.
    pub const KEPT_BYTES: usize = 64 * 1024;
}

/// A write to a sink: the item's full new image (or its deletion) with the
/// source version.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkRecord {
    pub key: Key,
    pub version: u64,
    pub op: SinkOp,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SinkOp {
    Upsert(Item),
    /// An upsert of an image still encoded (already shaped by the sink's
    /// transform): only for a sink whose [`Sink::writes_encoded`] says it
    /// writes from the encoding. Any other sink reads it as
    /// [`SinkOp::item`] gives it.
    UpsertEncoded(EncodedItem),
    /// Deletes the item and keeps a tombstone at this version, so an older
    /// upsert arriving later cannot bring it back.
    Delete,
}

/// Per-record result of [`Sink::apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordOutcome {
    Applied,
    /// The sink already holds this or a newer version: nothing to do.
    Stale,
    /// The sink refused the record itself (mapping error, too large):
    /// it belongs in the dead-letter store with this reason.
    Rejected(String),
}

/// Count and order-independent digest of one bucket of keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketDigest {
    pub count: u64,
    pub digest: [u8; 32],
}

/// A target that applies versioned writes idempotently.
#[async_trait]
pub trait Sink: Send + Sync {
    fn name(&self) -> String;
    /// Applies a batch; one outcome per record, in order. An `Err` means the
    /// batch as a whole failed (retry it); per-record refusals are outcomes.
    async fn apply(&self, batch: &[SinkRecord]) -> ConnectorResult<Vec<RecordOutcome>>;
    /// Whether batches must be applied one after the other: a sink without
    /// conditional writes (a topic) keeps a key's records in the order
    /// they were applied, so concurrent batches could put an older record
    /// last.
    fn ordered(&self) -> bool {
        false
    }
    /// Whether the sink writes [`SinkOp::UpsertEncoded`] from the encoding
    /// (without decoding it); a pipeline gives any other sink decoded items.
    fn writes_encoded(&self) -> bool {
        false
    }
    /// The live item and its version; `None` when absent or deleted.
    async fn read(&self, key: &Key) -> ConnectorResult<Option<(u64, Item)>>;
    /// Removes these keys outright, tombstones included, so nothing of them
    /// outranks a later write at any version: the rollback of a unit's
    /// partial copy (the unit is then absent from the target, not deleted
    /// in it, and copies again with its items' own versions). Returns how
    /// many items (live or tombstones) went. Never for replication, where
    /// a tombstone is what keeps an older record from resurrecting a key.
    async fn purge(&self, keys: &[Key]) -> ConnectorResult<u64>;
    /// Live items bucketed by [`crate::value::key_hash`] `% buckets`, each
    /// bucket with a count and a digest of (key, version, item).
    async fn digest(&self, buckets: u32) -> ConnectorResult<Vec<BucketDigest>>;

    /// Calls `visit` with every live (key, version, item), in no particular
    /// order: the verifier digests and counts what it reads itself, so both
    /// sides of a comparison are shaped the same way. Sinks that cannot be
    /// verified (a Kafka topic) keep this default.
    async fn entries(&self, visit: &mut (dyn FnMut(Key, u64, Item) + Send)) -> ConnectorResult<()> {
        let _ = visit;
        Err(crate::error::ConnectorError::invalid(
            "sink",
            format!("{} cannot list its entries", self.name()),
        ))
    }

    /// The live entries whose key falls in one of the `wanted` buckets of
    /// [`crate::value::key_hash`] `% buckets`: the drill-down of a digest
    /// mismatch. Stores that can tell a key's bucket before reading the item
    /// override it to read only those.
    async fn bucket_entries(
        &self,
        buckets: u32,
        wanted: &BTreeSet<u32>,
    ) -> ConnectorResult<Vec<(Key, u64, Item)>> {
        let n = u64::from(buckets.max(1));
        let mut out = Vec::new();
        self.entries(&mut |key, version, item| {
            if wanted.contains(&bucket_of(&key, n)) {
                out.push((key, version, item));
            }
        })
        .await?;
        Ok(out)
    }
}

/// The digest bucket of `key` among `buckets`.
pub fn bucket_of(key: &Key, buckets: u64) -> u32 {
    u32::try_from(crate::value::key_hash(key) % buckets.max(1)).unwrap_or(u32::MAX)
}

/// Runs per-record sink writes `concurrency` at a time and returns their
/// outcomes in batch order; the first error fails the batch.
///
/// # Errors
/// The first write that failed as a whole.
pub async fn apply_in_order<F>(
    writes: Vec<F>,
    concurrency: usize,
) -> ConnectorResult<Vec<RecordOutcome>>
where
    F: Future<Output = ConnectorResult<RecordOutcome>>,
{
    use futures::StreamExt as _;
    futures::stream::iter(writes)
        .buffered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Folds one live item into its bucket: XOR of SHA-256 over canonical key,
/// version and item, so the order of reading does not matter.
pub fn fold_digest(buckets: &mut [BucketDigest], key: &Key, version: u64, item: &Item) {
    use sha2::{Digest, Sha256};
    let n = u64::try_from(buckets.len()).expect("bucket count fits u64");
    let index = usize::try_from(crate::value::key_hash(key) % n).expect("bucket index fits usize");
    let mut hasher = Sha256::new();
    hasher.update(key.canonical().as_bytes());
    hasher.update(version.to_be_bytes());
    hasher.update(crate::value::canonical_item(item).as_bytes());
    let h = hasher.finalize();
    let bucket = &mut buckets[index];
    bucket.count += 1;
    for (d, x) in bucket.digest.iter_mut().zip(h.iter()) {
        *d ^= x;
    }
}

/// One buffered counter operation of the stats aggregator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BufferOp {
    /// Add `delta` to `metric` of `entity`.
    Increment {
        entity: String,
        metric: String,
        delta: i64,
    },
    /// Replace `metric` of `entity` with `value` (decimal text).
    Replace {
        entity: String,
        metric: String,
        value: String,
    },
}

impl BufferOp {
    /// The entity the operation changes.
    pub fn entity(&self) -> &str {
        match self {
            Self::Increment { entity, .. } | Self::Replace { entity, .. } => entity,
        }
    }
}

/// One event for [`Buffer::apply_events`]: an operation under the client's
/// event id, which makes a resent event a duplicate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferEvent {
    pub id: String,
    pub op: BufferOp,
    /// When the event happened, in microseconds since the epoch.
    pub time_micros: i64,
}

/// The pending changes of one entity taken out for a flush.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EntityDelta {
    pub entity: String,
    pub increments: BTreeMap<String, i64>,
    pub replaces: BTreeMap<String, String>,
    /// The latest event time among the events folded in (through
    /// [`Buffer::apply_events`]), in microseconds since the epoch. A
    /// duplicate may count too: it is the same event resent, same time.
    #[serde(default)]
    pub last_event_micros: Option<i64>,
}

/// Counts of a buffer, for the aggregator's buffer state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BufferStats {
    /// Entities with changes not yet acknowledged as flushed (live ones plus
    /// those of a pending flush).
    pub dirty_keys: u64,
    /// Events accepted through [`Buffer::apply_events`] and not yet
    /// acknowledged as flushed.
    pub pending_events: u64,
    /// The flush taken out and not acknowledged, if any.
    pub pending_flush: Option<u64>,
    /// The last acknowledged flush sequence, if any.
    pub last_acked: Option<u64>,
}

/// The aggregation buffer between ingestion and flush: atomic increments and
/// replaces per entity plus a dirty set, swapped out whole for a flush so
/// events arriving during the flush belong to the next one.
#[async_trait]
pub trait Buffer: Send + Sync {
    /// Applies the operations atomically (all or none).
    async fn apply(&self, ops: &[BufferOp]) -> ConnectorResult<()>;
    /// Moves every dirty entity into flush `sequence` and returns them. If
    /// flush `sequence` was already taken out and not acknowledged (a crash
    /// during a flush), returns that same content again.
    async fn take_for_flush(&self, sequence: u64) -> ConnectorResult<Vec<EntityDelta>>;
    /// Forgets flush `sequence` after it was written to the store.
    async fn ack_flush(&self, sequence: u64) -> ConnectorResult<()>;
    /// The unacknowledged flush, if any: (sequence, content).
    async fn pending_flush(&self) -> ConnectorResult<Option<(u64, Vec<EntityDelta>)>>;
    /// What is buffered for `entity` and not yet taken for a flush.
    async fn peek(&self, entity: &str) -> ConnectorResult<EntityDelta>;
    /// Number of dirty entities not yet taken for a flush.
    async fn dirty_count(&self) -> ConnectorResult<u64>;
    /// Applies the events whose id was not seen within `dedup_window` (an
    /// implementation may remember ids longer, up to twice the window),
    /// atomically with remembering their ids (so a batch resent after a lost
    /// reply is all duplicates, never counted twice), and returns the
    /// positions of the duplicates in `events`, ascending. All or none: on an
    /// error nothing is applied and no id is remembered.
    async fn apply_events(
        &self,
        events: &[BufferEvent],
        dedup_window: Duration,
    ) -> ConnectorResult<Vec<usize>>;
    /// What the unacknowledged flush holds for `entity`: (sequence, content);
    /// `None` when no flush is pending or it does not hold the entity.
    async fn peek_pending(&self, entity: &str) -> ConnectorResult<Option<(u64, EntityDelta)>>;
    /// Counts for the buffer state, read in one consistent step.
    async fn stats(&self) -> ConnectorResult<BufferStats>;
}
