//! The change feed as a feed unit reads it: what the unit checkpoints
//! ([`FeedState`], read back by the lag RPCs), opening the feed the spec
//! names, and writing then acknowledging what was polled (nothing is
//! acknowledged before every sink has it, invariant 1).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidemark_connectors::kafka::{KafkaFeed, KafkaSink, KafkaStart};
use tidemark_connectors::streams::{DynamoStreamSource, ShardedFeed, StartPosition as FeedStart};
use tidemark_connectors::{ChangeFeed, ChangeRecord, FeedCheckpoint, Key, Position};
use tidemark_kit::worker::{LeaseError, Progress, UnitLease};
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::replicator::v1::change_feed::Feed;
use tidemark_proto::replicator::v1::{BackfillMode, Pipeline, StartPosition};

use super::open::{Change, Filtered, Opened};
use super::spec::{BACKFILL_PENDING, backfill_mode, reader_index};
use super::watermark;
use crate::context::{Context, UnitFailure};
use crate::dead_letters::DeadLetters;

/// What the feed unit checkpoints: the feed's own checkpoint plus totals.
#[derive(Default, Serialize, Deserialize)]
pub struct FeedState {
    pub feed: FeedCheckpoint,
    pub applied: u64,
    pub stale: u64,
    pub dead_lettered: u64,
    /// The DBLog backfill's progress (BACKFILL_MODE_WATERMARK), saved with
    /// the feed position it was reached at.
    #[serde(default)]
    pub watermark: Option<watermark::Progress>,
    /// Each partition's lag when last reported.
    #[serde(default)]
    pub lag: Vec<ReportedLag>,
}

/// One shard's or partition's lag as its feed unit last reported it.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct ReportedLag {
    pub partition: String,
    pub records: u64,
    pub millis: u64,
}

/// What a feed unit's checkpoint says of its partitions: each one's lag,
/// and its position (last applied sequence or offset) and whether it is
/// closed and read to its end.
pub struct FeedReport {
    pub lag: Vec<ReportedLag>,
    pub positions: BTreeMap<String, (Option<String>, bool)>,
}

/// Reads a feed unit's checkpoint; `None` when it has none yet.
pub fn feed_report(checkpoint: &[u8]) -> Option<FeedReport> {
    let state: FeedState = serde_json::from_slice(checkpoint).ok()?;
    Some(FeedReport {
        lag: state.lag,
        positions: state
            .feed
            .partitions
            .into_iter()
            .map(|(id, p)| (id, (p.sequence, p.finished)))
            .collect(),
    })
}

/// The checkpoints a new pipeline's feed units start from, by unit key:
/// for a backfilling pipeline whose feed can say where its log ends
/// without reading it (the embedded change log), that end, read before
/// the run that scans the source exists. Every change made while a segment
/// scans is after it, so the feed still sees each one (invariant: no change
/// made during the backfill is missed), and the changes before it, which
/// the scans copy, are not replayed.
///
/// Empty for the other feeds, whose backfilling pipelines read from the
/// trim horizon (the earliest offset) and replay what the scans copy as
/// well: a DynamoDB stream has no position to give without reading its
/// shards; and a Kafka topic's message may be written before the table's
/// change it carries (an application that writes the topic first, or a
/// consumer that applies the topic to the table), so a message before the
/// topic's end can carry a change the scan does not see yet.
pub async fn first_checkpoints(
    ctx: &Context,
    pipeline: &Pipeline,
) -> Result<BTreeMap<String, Vec<u8>>, tidemark_connectors::ConnectorError> {
    let mut first = BTreeMap::new();
    if backfill_mode(pipeline) == BackfillMode::None {
        return Ok(first);
    }
    let spec = pipeline.spec.clone().unwrap_or_default();
    if let (Some(Feed::EmbeddedChangeLog(_)), Some(Store::SqliteTable(t))) = (
        spec.feed.and_then(|f| f.feed),
        spec.source.and_then(|s| s.store),
    ) {
        let store = ctx.stores.embedded(&t.database)?;
        let state = FeedState {
            feed: store.log_end(&t.table_name).await?,
            ..FeedState::default()
        };
        let bytes = serde_json::to_vec(&state).expect("a feed state serializes");
        first.extend(
            super::spec::feed_units(pipeline)
                .into_iter()
                .map(|k| (k, bytes.clone())),
        );
    }
    Ok(first)
}

/// Opens the feed a unit reads; `transactional` (see
/// [`transactional_sink`]) commits a Kafka feed's offsets in its
/// transactions.
pub async fn open_feed(
    ctx: &Context,
    pipeline: &Pipeline,
    unit_key: &str,
    checkpoint: &FeedCheckpoint,
    transactional: Option<Arc<KafkaSink>>,
    opened: &Opened,
) -> Result<Box<dyn ChangeFeed>, UnitFailure> {
    let spec = pipeline.spec.clone().unwrap_or_default();
    let feed = spec.feed.and_then(|f| f.feed);
    let backfilling = backfill_mode(pipeline) != BackfillMode::None;
    let start_of = |p: i32| {
        // A backfilling pipeline must see every change made while it scans
        // (its feed units start at the log's end when the log can say
        // where that is: see `first_checkpoints`).
        if backfilling || p == StartPosition::TrimHorizon as i32 {
            FeedStart::TrimHorizon
        } else {
            FeedStart::Latest
        }
    };
    match (feed, spec.source.and_then(|s| s.store)) {
        (Some(Feed::DynamodbStreams(f)), Some(Store::DynamodbTable(t))) => {
            let ddb = ctx.stores.dynamodb_client(&t.endpoint, &t.region).await?;
            let streams = ctx.stores.streams_client(&t.endpoint, &t.region).await?;
            let source = DynamoStreamSource::for_table(&ddb, streams, &t.table_name).await?;
            Ok(Box::new(
                ShardedFeed::new(source, start_of(f.start_position), checkpoint)
                    .shared(reader_index(unit_key), f.readers),
            ))
        }
        (Some(Feed::EmbeddedChangeLog(f)), Some(Store::SqliteTable(t))) => {
            let store = ctx.stores.embedded(&t.database)?;
            let fresh = checkpoint.partitions.is_empty();
            if fresh && matches!(start_of(f.start_position), FeedStart::Latest) {
                Ok(Box::new(store.feed_from_end(&t.table_name).await?))
            } else {
                Ok(Box::new(store.feed(&t.table_name, checkpoint)))
            }
        }
        (Some(Feed::Kafka(k)), _) => {
            let topic = k.topic.unwrap_or_default();
            let brokers = ctx.stores.kafka_brokers(&topic)?;
            let group = if k.consumer_group.is_empty() {
                format!("tidemark-pipeline-{}", pipeline.name)
            } else {
                k.consumer_group.clone()
            };
            let start = match start_of(k.start_position) {
                FeedStart::TrimHorizon => KafkaStart::Earliest,
                FeedStart::Latest => KafkaStart::Latest,
            };
            // One static member per feed unit: the replica that takes the
            // unit over takes its partitions at once.
            let instance = format!("{group}-{unit_key}");
            let mut feed =
                KafkaFeed::subscribe_as(&brokers, &topic.topic, &group, start, Some(&instance))?;
            if let Some(sink) = transactional {
                feed.commit_through(sink);
            }
            if opened.sinks.iter().all(|s| s.sink.writes_encoded()) {
                feed.keep_images_encoded();
            }
            Ok(Box::new(feed))
        }
        _ => Err(UnitFailure::terminal("the feed does not match the source")),
    }
}

/// A pipeline from a Kafka feed into one Kafka sink writes exactly once:
/// the feed unit's writes and its consumer offsets commit in one
/// transaction (read-process-write). The sink is opened transactional, with
/// an id per feed unit, so a new holder of the unit fences the last one.
/// `None` for every other pipeline (their sinks are idempotent).
pub async fn transactional_sink(
    ctx: &Context,
    pipeline: &Pipeline,
    unit_key: &str,
    opened: &Opened,
) -> Result<Option<Arc<KafkaSink>>, UnitFailure> {
    let spec = pipeline.spec.clone().unwrap_or_default();
    if !matches!(
        spec.feed.as_ref().and_then(|f| f.feed.as_ref()),
        Some(Feed::Kafka(_))
    ) {
        return Ok(None);
    }
    let [sink] = spec.sinks.as_slice() else {
        return Ok(None);
    };
    let Some(Store::KafkaTopic(topic)) = sink.store.as_ref().and_then(|s| s.store.as_ref()) else {
        return Ok(None);
    };
    let brokers = ctx.stores.kafka_brokers(topic)?;
    let schema = crate::schema::target_schema(&opened.source.schema, &opened.sinks[0].transform);
    let id = format!("tidemark-{}-{unit_key}", pipeline.name);
    let sink = KafkaSink::connect_transactional(
        &brokers,
        &topic.topic,
        schema,
        super::open::kafka_format(sink.kafka_format()),
        &id,
    )
    .await?;
    Ok(Some(Arc::new(sink)))
}

/// Checkpoints the feed's position, totals and lag with the unit's
/// counters (what Drain, WatchLag and GetPipeline read).
pub async fn report_progress(
    lease: &UnitLease,
    feed: &mut dyn ChangeFeed,
    state: &mut FeedState,
    caught_up: bool,
) -> Result<(), UnitFailure> {
    state.feed = feed.checkpoint();
    let lag = feed.lag();
    state.lag = lag
        .iter()
        .map(|l| ReportedLag {
            partition: l.partition.clone(),
            records: l.records,
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "milliseconds of lag"
            )]
            millis: (l.seconds * 1000.0) as u64,
        })
        .collect();
    let mut p = Progress {
        items_processed: i64::try_from(state.applied + state.stale).unwrap_or(i64::MAX),
        items_failed: i64::try_from(state.dead_lettered).unwrap_or(i64::MAX),
        ..Progress::default()
    };
    p.add("applied", i64::try_from(state.applied).unwrap_or(i64::MAX));
    p.add("stale", i64::try_from(state.stale).unwrap_or(i64::MAX));
    p.add(
        "dead_lettered",
        i64::try_from(state.dead_lettered).unwrap_or(i64::MAX),
    );
    let records_behind: u64 = lag.iter().map(|l| l.records).sum();
    let seconds_behind = lag.iter().map(|l| l.seconds).fold(0.0, f64::max);
    p.add(
        "lag_records",
        i64::try_from(records_behind).unwrap_or(i64::MAX),
    );
    #[allow(clippy::cast_possible_truncation, reason = "milliseconds of lag")]
    p.add("lag_ms", (seconds_behind * 1000.0) as i64);
    p.add("caught_up", i64::from(caught_up && records_behind == 0));
    p.add("observed_ms", chrono::Utc::now().timestamp_millis());
    if let Some(w) = &state.watermark {
        p.add(BACKFILL_PENDING, i64::from(!w.done));
        p.add(
            "backfill_copied",
            i64::try_from(w.copied).unwrap_or(i64::MAX),
        );
        p.add(
            "backfill_dropped",
            i64::try_from(w.dropped).unwrap_or(i64::MAX),
        );
        p.add(
            "backfill_chunks",
            i64::try_from(w.chunks).unwrap_or(i64::MAX),
        );
    }
    let bytes = serde_json::to_vec(state).expect("feed state serialises");
    match lease.checkpoint(bytes, &p).await {
        Ok(()) => {}
        Err(LeaseError::Lost(_)) => return Err(UnitFailure::LeaseLost),
        Err(LeaseError::Rpc(s)) => tracing::warn!(error = %s, "feed checkpoint failed"),
    }
    Ok(())
}

/// Takes the keys and new images out of `records`: what stays is enough
/// to acknowledge them (their positions), and keys and images move on to
/// the sinks instead of being copied for them.
pub fn changes_of(opened: &Opened, records: &mut [ChangeRecord]) -> Vec<Change> {
    records
        .iter_mut()
        .filter(|r| !opened.reserved(&r.key))
        .filter(|r| !opened.echo(r.new_image.as_ref(), r.old_image.as_ref()))
        .map(|r| change_of(opened, r))
        .collect()
}

/// One poll's yield, not yet acknowledged: its change records, and the
/// positions of the messages in it that were not change records (already
/// dead-lettered by [`Polled::take`]).
#[derive(Default)]
pub struct Polled {
    pub records: Vec<ChangeRecord>,
    pub rejected: Vec<Position>,
}

impl Polled {
    /// The feed's last poll: `records`, and its undecodable messages kept
    /// as dead letters (before anything after them is acknowledged).
    pub async fn take(
        records: Vec<ChangeRecord>,
        feed: &mut dyn ChangeFeed,
        dead: &DeadLetters,
        pipeline: &str,
        state: &mut FeedState,
    ) -> Result<Self, UnitFailure> {
        let undecodable = feed.take_undecodable();
        let mut rejected = Vec::with_capacity(undecodable.len());
        for u in undecodable {
            dead.add_undecodable(pipeline, &u)
                .await
                .map_err(UnitFailure::from)?;
            state.dead_lettered += 1;
            rejected.push(u.position);
        }
        Ok(Self { records, rejected })
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.rejected.is_empty()
    }
}

/// Writes and acknowledges what was polled, before what must come after
/// it (a pause, a watermark chunk).
pub async fn flush(
    opened: &Opened,
    dead: &DeadLetters,
    pipeline: &str,
    feed: &mut dyn ChangeFeed,
    state: &mut FeedState,
    pending: &mut Polled,
) -> Result<(), UnitFailure> {
    let mut polled = std::mem::take(pending);
    let written = opened
        .write(
            changes_of(opened, &mut polled.records),
            dead,
            pipeline,
            Filtered::Delete,
        )
        .await?;
    acknowledge(feed, state, written, &polled).await
}

/// Counts a written batch and acknowledges it to the feed, the last
/// position of each partition (a dead-lettered message's included).
pub async fn acknowledge(
    feed: &mut dyn ChangeFeed,
    state: &mut FeedState,
    (applied, stale, dead_lettered): (u64, u64, u64),
    polled: &Polled,
) -> Result<(), UnitFailure> {
    state.applied += applied;
    state.stale += stale;
    state.dead_lettered += dead_lettered;
    let mut last: BTreeMap<&str, &Position> = BTreeMap::new();
    for position in polled
        .records
        .iter()
        .map(|r| &r.position)
        .chain(&polled.rejected)
    {
        let slot = last.entry(&position.partition).or_insert(position);
        if later(position, slot) {
            *slot = position;
        }
    }
    let positions: Vec<Position> = last.into_values().cloned().collect();
    feed.commit_all(&positions).await?;
    Ok(())
}

/// Whether `a` comes after `b` in their partition: sequence numbers and
/// offsets are decimal strings of any length.
fn later(a: &Position, b: &Position) -> bool {
    (a.sequence.len(), &a.sequence) > (b.sequence.len(), &b.sequence)
}

/// Passes the other feed units' checkpointed progress to the feed (a shared
/// stream's child shard waits on its parent's reader). Best effort: an
/// unanswered read is tried again later.
pub async fn learn_peers(ctx: &Context, run_id: &str, peers: &[String], feed: &mut dyn ChangeFeed) {
    let units = match ctx.jobs.list_units(run_id, peers, &[]).await {
        Ok(units) => units,
        Err(s) => {
            tracing::debug!(error = %s, "reading the other feed units failed");
            return;
        }
    };
    for unit in units {
        if let Ok(peer) = serde_json::from_slice::<FeedState>(&unit.checkpoint) {
            feed.learn_peers(&peer.feed);
        }
    }
}

fn change_of(opened: &Opened, r: &mut ChangeRecord) -> Change {
    let version = if opened.version_attribute.is_empty() {
        r.version
    } else {
        // Versions come from the item alone; mixing in feed-derived ones
        // (microseconds, far above any counter) would freeze the target.
        // An image without the attribute ranks below every versioned one;
        // a delete ranks just above the version it removed.
        match (&r.new_image, &r.old_image) {
            (Some(image), _) => opened.version_in(image, 0),
            (None, Some(old)) => opened.version_of(old, 0) + 1,
            (None, None) => r.version,
        }
    };
    (
        std::mem::replace(&mut r.key, Key(BTreeMap::new())),
        opened.application_new_image(r.new_image.take()),
        version,
        format!("{}/{}", r.position.partition, r.position.sequence),
    )
}
