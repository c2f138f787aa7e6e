//! Sharded change streams (DynamoDB Streams): a [`ShardSource`] lists shards
//! and reads records from shard iterators; [`ShardedFeed`] turns it into a
//! [`ChangeFeed`] that reads every shard, a child only after its parent was
//! read and committed to the end, so per-key order survives shard splits.
//!
//! Versions (DESIGN.md invariant 3) come from the record itself for foreign
//! tables: `max(previous in lineage + 1, creation second × 10⁶)`. The
//! previous version is carried from parent to child and stored in the
//! checkpoint, so a resumed or replayed feed assigns the same versions again.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{ConnectorError, ConnectorResult};
use crate::image::Image;
use crate::traits::{
    ChangeFeed, ChangeKind, ChangeRecord, FeedCheckpoint, PartitionCheckpoint, PartitionLag,
    Position,
};
use crate::value::{Item, Key};

/// A shard as the stream lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    pub parent: Option<String>,
    /// The shard has an ending sequence number: no new records will arrive.
    pub closed: bool,
}

/// Where to open a shard iterator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IteratorStart {
    TrimHorizon,
    Latest,
    AfterSequence(String),
}

/// A record as the stream returns it, before versioning.
#[derive(Clone, Debug, PartialEq)]
pub struct RawRecord {
    pub sequence: String,
    pub kind: ChangeKind,
    pub key: Key,
    pub new_image: Option<Item>,
    pub old_image: Option<Item>,
    pub created_at_secs: i64,
}

/// One page of a shard.
#[derive(Clone, Debug, Default)]
pub struct ShardPage {
    pub records: Vec<RawRecord>,
    /// `None` when the shard is closed and fully read.
    pub next_iterator: Option<String>,
}

#[async_trait]
pub trait ShardSource: Send + Sync {
    async fn list_shards(&self) -> ConnectorResult<Vec<ShardInfo>>;
    async fn iterator(&self, shard: &str, start: &IteratorStart) -> ConnectorResult<String>;
    async fn read(&self, iterator: &str, limit: usize) -> ConnectorResult<ShardPage>;
}

/// Where a feed with no checkpoint starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StartPosition {
    /// Every record the stream still holds (24 h on DynamoDB Streams).
    TrimHorizon,
    /// Only records written from now on.
    Latest,
}

#[derive(Debug, Default)]
struct ShardState {
    parent: Option<String>,
    iterator: Option<String>,
    /// The iterator returned no next iterator: nothing more will come.
    exhausted: bool,
    delivered: Option<String>,
    committed: Option<String>,
    /// Version of the last record delivered in this lineage.
    lineage_version: u64,
    committed_version: u64,
    /// Whether this shard took over its parent's lineage version yet.
    inherited: bool,
    /// Delivered but not committed: (sequence, version, created micros).
    uncommitted: VecDeque<(String, u64, i64)>,
    /// Open the first iterator at LATEST (initial shards of a LATEST feed).
    start_latest: bool,
    finished: bool,
    /// Read by another reader of a shared feed: tracked only so that its
    /// children know when it is done (from [`ChangeFeed::learn_peers`]).
    foreign: bool,
}

/// Sequence numbers are decimal strings of varying length.
fn seq_le(a: &str, b: &str) -> bool {
    (a.len(), a) <= (b.len(), b)
}

/// A [`ChangeFeed`] over any [`ShardSource`].
pub struct ShardedFeed<S> {
    source: S,
    start: StartPosition,
    /// This reader's index among the readers sharing the stream.
    share: Option<(u32, u32)>,
    shards: BTreeMap<String, ShardState>,
    listed_at: Option<Instant>,
    refresh_every: Duration,
    first_listing: bool,
}

impl<S: ShardSource> ShardedFeed<S> {
    /// A feed that resumes from `checkpoint`, or starts at `start` for
    /// shards the checkpoint does not know.
    pub fn new(source: S, start: StartPosition, checkpoint: &FeedCheckpoint) -> Self {
        let shards = checkpoint
            .partitions
            .iter()
            .map(|(id, p)| {
                (
                    id.clone(),
                    ShardState {
                        parent: p.parent.clone(),
                        delivered: p.sequence.clone(),
                        committed: p.sequence.clone(),
                        lineage_version: p.version,
                        committed_version: p.version,
                        inherited: true,
                        finished: p.finished,
                        ..ShardState::default()
                    },
                )
            })
            .collect::<BTreeMap<_, _>>();
        Self {
            source,
            start,
            share: None,
            first_listing: shards.is_empty(),
            shards,
            listed_at: None,
            refresh_every: Duration::from_secs(2),
        }
    }

    /// Shares the stream among `readers` feeds (one per replica or unit):
    /// this one, number `index`, reads the shards whose id hashes to it. A
    /// child shard whose parent another reader has waits until that reader's
    /// checkpoint, passed to [`ChangeFeed::learn_peers`], says the parent is
    /// done, so the order per key holds across the split.
    #[must_use]
    pub fn shared(mut self, index: u32, readers: u32) -> Self {
        if readers > 1 {
            self.share = Some((index, readers));
        }
        self
    }

    /// Which of `readers` reads shard `id` (FNV-1a of the id: stable across
    /// processes and releases).
    pub fn reader_of(id: &str, readers: u32) -> u32 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in id.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        u32::try_from(hash % u64::from(readers.max(1))).unwrap_or(0)
    }

    fn owns(&self, id: &str) -> bool {
        self.share
            .is_none_or(|(index, readers)| Self::reader_of(id, readers) == index)
    }

    /// How often the shard list is refreshed (new shards appear on splits).
    #[must_use]
    pub fn refresh_every(mut self, every: Duration) -> Self {
        self.refresh_every = every;
        self
    }

    async fn refresh(&mut self) -> ConnectorResult<()> {
        if self
            .listed_at
            .is_some_and(|t| t.elapsed() < self.refresh_every)
        {
            return Ok(());
        }
        let listed = self.source.list_shards().await?;
        let first = std::mem::take(&mut self.first_listing);
        for shard in &listed {
            let foreign = !self.owns(&shard.id);
            self.shards.entry(shard.id.clone()).or_insert_with(|| {
                let mut state = ShardState {
                    parent: shard.parent.clone(),
                    foreign,
                    ..ShardState::default()
                };
                if foreign {
                    return state;
                }
                if first && self.start == StartPosition::Latest {
                    // Starting at LATEST: closed shards hold only the past.
                    if shard.closed {
                        state.finished = true;
                        state.inherited = true;
                    } else {
                        state.start_latest = true;
                        state.inherited = true;
                    }
                }
                state
            });
        }
        // Shards trimmed from the stream that are done can be forgotten;
        // their children then treat the parent as done.
        self.shards
            .retain(|id, s| !s.finished || listed.iter().any(|l| &l.id == id));
        self.listed_at = Some(Instant::now());
        Ok(())
    }

    fn parent_done(&self, parent: Option<&String>) -> (bool, u64) {
        match parent.and_then(|p| self.shards.get(p)) {
            None => (true, 0),
            Some(p) => (p.finished, p.committed_version),
        }
    }

    fn version_for(lineage: u64, created_at_secs: i64) -> u64 {
        let floor = u64::try_from(created_at_secs)
            .unwrap_or(0)
            .saturating_mul(1_000_000);
        floor.max(lineage + 1)
    }
}

#[async_trait]
impl<S: ShardSource> ChangeFeed for ShardedFeed<S> {
    async fn poll(&mut self, max: usize) -> ConnectorResult<Vec<ChangeRecord>> {
        self.refresh().await?;
        let mut out = Vec::new();
        let ids: Vec<String> = self.shards.keys().cloned().collect();
        for id in ids {
            if out.len() >= max {
                break;
            }
            let (ready, parent_version) = {
                let s = &self.shards[&id];
                if s.finished || s.exhausted || s.foreign {
                    continue;
                }
                self.parent_done(s.parent.as_ref())
            };
            if !ready {
                continue;
            }
            let state = self.shards.get_mut(&id).expect("listed shard");
            if !state.inherited {
                state.lineage_version = state.lineage_version.max(parent_version);
                state.committed_version = state.committed_version.max(parent_version);
                state.inherited = true;
            }
            let iterator = match state.iterator.take() {
                Some(it) => it,
                None => {
                    let start = match (&state.delivered, state.start_latest) {
                        (Some(seq), _) => IteratorStart::AfterSequence(seq.clone()),
                        (None, true) => IteratorStart::Latest,
                        (None, false) => IteratorStart::TrimHorizon,
                    };
                    self.source.iterator(&id, &start).await?
                }
            };
            let page = match self.source.read(&iterator, max - out.len()).await {
                Ok(page) => page,
                Err(ConnectorError::IteratorExpired { .. }) => continue,
                Err(e) => {
                    self.shards.get_mut(&id).expect("listed shard").iterator = Some(iterator);
                    return Err(e);
                }
            };
            let state = self.shards.get_mut(&id).expect("listed shard");
            state.start_latest = false;
            for raw in page.records {
                let version = Self::version_for(state.lineage_version, raw.created_at_secs);
                state.lineage_version = version;
                let micros = raw.created_at_secs.saturating_mul(1_000_000);
                state.delivered = Some(raw.sequence.clone());
                state
                    .uncommitted
                    .push_back((raw.sequence.clone(), version, micros));
                out.push(ChangeRecord {
                    key: raw.key,
                    kind: raw.kind,
                    new_image: raw.new_image.map(Image::Item),
                    old_image: raw.old_image,
                    version,
                    created_at_micros: micros,
                    position: Position {
                        partition: id.clone(),
                        sequence: raw.sequence,
                    },
                });
            }
            match page.next_iterator {
                Some(next) => state.iterator = Some(next),
                None => {
                    state.exhausted = true;
                    state.finished = state.uncommitted.is_empty();
                }
            }
        }
        Ok(out)
    }

    async fn commit(&mut self, position: &Position) -> ConnectorResult<()> {
        let state = self.shards.get_mut(&position.partition).ok_or_else(|| {
            ConnectorError::invalid(
                "stream",
                format!("commit for unknown shard {}", position.partition),
            )
        })?;
        if !state
            .uncommitted
            .iter()
            .any(|(seq, _, _)| seq == &position.sequence)
        {
            if state
                .committed
                .as_deref()
                .is_some_and(|c| seq_le(&position.sequence, c))
            {
                return Ok(()); // already committed
            }
            return Err(ConnectorError::invalid(
                "stream",
                format!(
                    "commit of {} in shard {}, which was never delivered",
                    position.sequence, position.partition
                ),
            ));
        }
        while let Some((seq, version, _)) = state.uncommitted.front() {
            if !seq_le(seq, &position.sequence) {
                break;
            }
            state.committed = Some(seq.clone());
            state.committed_version = *version;
            state.uncommitted.pop_front();
        }
        if state.exhausted && state.uncommitted.is_empty() {
            state.finished = true;
        }
        Ok(())
    }

    fn checkpoint(&self) -> FeedCheckpoint {
        FeedCheckpoint {
            partitions: self
                .shards
                .iter()
                .filter(|(_, s)| !s.foreign)
                .map(|(id, s)| {
                    (
                        id.clone(),
                        PartitionCheckpoint {
                            sequence: s.committed.clone(),
                            version: s.committed_version,
                            finished: s.finished,
                            parent: s.parent.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    fn learn_peers(&mut self, peers: &FeedCheckpoint) {
        for (id, p) in &peers.partitions {
            if let Some(s) = self.shards.get_mut(id).filter(|s| s.foreign) {
                s.finished |= p.finished;
                s.committed_version = s.committed_version.max(p.version);
            }
        }
    }

    fn lag(&self) -> Vec<PartitionLag> {
        let now = crate::now_micros();
        self.shards
            .iter()
            .filter(|(_, s)| !s.finished && !s.foreign)
            .map(|(id, s)| PartitionLag {
                partition: id.clone(),
                records: s.uncommitted.len() as u64,
                seconds: s.uncommitted.front().map_or(0.0, |(_, _, micros)| {
                    let age = now.saturating_sub(*micros).max(0);
                    Duration::from_micros(u64::try_from(age).unwrap_or(0)).as_secs_f64()
                }),
            })
            .collect()
    }
}

/// DynamoDB Streams as a [`ShardSource`].
#[derive(Clone)]
pub struct DynamoStreamSource {
    client: aws_sdk_dynamodbstreams::Client,
    stream_arn: String,
}

const STREAMS: &str = "dynamodb-streams";

impl DynamoStreamSource {
    /// A source reading `stream_arn` through `client`, each attempt of its
    /// calls bounded ([`crate::aws::ATTEMPT_TIMEOUT`]; the SDK's retries
    /// stay: the feed has no loop of its own around a single call).
    pub fn new(client: &aws_sdk_dynamodbstreams::Client, stream_arn: impl Into<String>) -> Self {
        let config = client.config();
        let client = aws_sdk_dynamodbstreams::Client::from_conf(
            config
                .to_builder()
                .timeout_config(crate::aws::bounded_attempts(
                    config.timeout_config(),
                    crate::aws::ATTEMPT_TIMEOUT,
                ))
                .build(),
        );
        Self {
            client,
            stream_arn: stream_arn.into(),
        }
    }

    /// The stream of `table` (its latest stream ARN).
    ///
    /// # Errors
    /// `InvalidInput` for a bad table name; `NotFound` when the table has
    /// no stream enabled.
    pub async fn for_table(
        dynamodb: &aws_sdk_dynamodb::Client,
        client: aws_sdk_dynamodbstreams::Client,
        table: &str,
    ) -> ConnectorResult<Self> {
        crate::dynamodb::check_table_name(table)?;
        let out = dynamodb
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| crate::aws::classify("dynamodb", &e))?;
        let arn = out.table.and_then(|t| t.latest_stream_arn).ok_or_else(|| {
            ConnectorError::NotFound {
                backend: STREAMS,
                message: format!("table {table} has no stream; enable NEW_AND_OLD_IMAGES"),
            }
        })?;
        Ok(Self::new(&client, arn))
    }
}

fn convert_image(
    image: Option<
        &std::collections::HashMap<String, aws_sdk_dynamodbstreams::types::AttributeValue>,
    >,
) -> ConnectorResult<Option<Item>> {
    image
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    Ok((
                        k.clone(),
                        crate::dynamodb::from_streams(v)
                            .map_err(|e| ConnectorError::invalid(STREAMS, e))?,
                    ))
                })
                .collect::<ConnectorResult<Item>>()
        })
        .transpose()
}

#[async_trait]
impl ShardSource for DynamoStreamSource {
    async fn list_shards(&self) -> ConnectorResult<Vec<ShardInfo>> {
        let mut shards = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let out = self
                .client
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(start.take())
                .send()
                .await
                .map_err(|e| crate::aws::classify(STREAMS, &e))?;
            let Some(description) = out.stream_description else {
                return Ok(shards);
            };
            for shard in description.shards() {
                shards.push(ShardInfo {
                    id: shard.shard_id().unwrap_or_default().to_owned(),
                    parent: shard.parent_shard_id().map(str::to_owned),
                    closed: shard
                        .sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .is_some(),
                });
            }
            match description.last_evaluated_shard_id {
                Some(last) => start = Some(last),
                None => return Ok(shards),
            }
        }
    }

    async fn iterator(&self, shard: &str, start: &IteratorStart) -> ConnectorResult<String> {
        use aws_sdk_dynamodbstreams::types::ShardIteratorType;
        let mut request = self
            .client
            .get_shard_iterator()
            .stream_arn(&self.stream_arn)
            .shard_id(shard);
        request = match start {
            IteratorStart::TrimHorizon => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            IteratorStart::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            IteratorStart::AfterSequence(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(seq),
        };
        let out = request
            .send()
            .await
            .map_err(|e| crate::aws::classify(STREAMS, &e))?;
        out.shard_iterator.ok_or_else(|| {
            ConnectorError::terminal(STREAMS, format!("no iterator for shard {shard}"))
        })
    }

    async fn read(&self, iterator: &str, limit: usize) -> ConnectorResult<ShardPage> {
        let out = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(i32::try_from(limit.clamp(1, 1000)).unwrap_or(1000))
            .send()
            .await
            .map_err(|e| crate::aws::classify(STREAMS, &e))?;
        let mut records = Vec::with_capacity(out.records().len());
        for record in out.records() {
            use aws_sdk_dynamodbstreams::types::OperationType;
            let Some(data) = record.dynamodb() else {
                continue;
            };
            let kind = match record.event_name() {
                Some(OperationType::Insert) => ChangeKind::Insert,
                Some(OperationType::Remove) => ChangeKind::Remove,
                _ => ChangeKind::Modify,
            };
            let key = convert_image(data.keys.as_ref())?.unwrap_or_default();
            records.push(RawRecord {
                sequence: data.sequence_number().unwrap_or_default().to_owned(),
                kind,
                key: Key(key),
                new_image: convert_image(data.new_image.as_ref())?,
                old_image: convert_image(data.old_image.as_ref())?,
                created_at_secs: data
                    .approximate_creation_date_time()
                    .map_or(0, aws_smithy_types::DateTime::secs),
            });
        }
        Ok(ShardPage {
            records,
            next_iterator: out.next_shard_iterator,
        })
    }
}
