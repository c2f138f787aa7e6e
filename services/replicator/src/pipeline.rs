//! Pipelines at work (DESIGN.md problems 1 and 2, invariants 1, 3, 4): a
//! pipeline is a REPLICATION job whose run has one `feed` unit (the change
//! feed, held by one replica at a time through its lease) and, while
//! backfilling, `segment-<i>` units (parallel scan segments).
//!
//! Versions (invariant 3): with a source version attribute, its value; else
//! the feed's derived version, and backfill reads carry version 0, below
//! every feed record of the same key. Sinks write conditionally on version
//! and keep tombstones, so a scan row read before a delete can never bring
//! the item back, and a replayed feed never moves a target backwards. A
//! backfilling pipeline reads its feed from the trim horizon, so no change
//! made while the scan runs is missed, whenever the feed unit is claimed.
//!
//! Nothing is acknowledged to the feed (checkpointed) before every sink
//! wrote or dead-lettered the record (invariant 1).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidemark_connectors::kafka::{KafkaFeed, KafkaStart};
use tidemark_connectors::streams::{DynamoStreamSource, ShardedFeed, StartPosition as FeedStart};
use tidemark_connectors::transform::Transform;
use tidemark_connectors::{
    AttrValue, ChangeFeed, ChangeRecord, FeedCheckpoint, Item, Key, Number, Predicate,
    RecordOutcome, ScanRequest, Sink, SinkOp, SinkRecord,
};
use tidemark_kit::worker::{Claim, LeaseError, Progress, UnitLease, unpack_any};
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::job_tracker::v1::GetJobRequest;
use tidemark_proto::replicator::v1::change_feed::Feed;
use tidemark_proto::replicator::v1::{BackfillMode, Pipeline, PipelineState, StartPosition};

use crate::context::{Context, UnitFailure};
use crate::dead_letters::DeadLetters;
use crate::stores::OpenTable;
use crate::watermark;

pub const SPEC_TYPE: &str = "tidemark.replicator.v1.Pipeline";
pub const FEED_UNIT: &str = "feed";
pub const DEFAULT_SEGMENTS: u32 = 8;
pub const DEFAULT_WATERMARK_PREFIX: &str = "__tidemark_watermark#";
pub const DEFAULT_TOUCH_ATTRIBUTE: &str = "_tidemark_touch";
/// Records per sink request, and sink requests in flight per poll.
const SINK_BATCH: usize = 500;
const SINK_CONCURRENCY: usize = 4;
/// The feed unit's counter saying a watermark backfill is still going on.
pub const BACKFILL_PENDING: &str = "backfill_pending";
/// How often a feed unit sharing its feed reads the others' progress.
const PEERS_EVERY: Duration = Duration::from_secs(2);
/// How often the feed unit publishes its lag (as unit counters).
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// One sink of a pipeline, opened, with its transform.
pub struct OpenSink {
    pub name: String,
    pub sink: Arc<dyn Sink>,
    pub transform: Transform,
}

/// A pipeline's source and sinks, opened.
pub struct Opened {
    pub source: OpenTable,
    pub sinks: Vec<OpenSink>,
    pub version_attribute: String,
    pub watermark_prefix: String,
}

/// How many feed units share the pipeline's feed: a Kafka group's
/// consumers, or DynamoDB Streams readers.
pub fn feed_readers(pipeline: &Pipeline) -> u32 {
    match pipeline
        .spec
        .as_ref()
        .and_then(|s| s.feed.as_ref())
        .and_then(|f| f.feed.as_ref())
    {
        Some(Feed::Kafka(k)) => k.consumers.max(1),
        Some(Feed::DynamodbStreams(d)) => d.readers.max(1),
        _ => 1,
    }
}

/// The pipeline's feed units: `feed`, and `feed-<i>` for every further
/// reader (see [`feed_readers`]).
pub fn feed_units(pipeline: &Pipeline) -> Vec<String> {
    std::iter::once(FEED_UNIT.to_owned())
        .chain((1..feed_readers(pipeline)).map(|i| format!("{FEED_UNIT}-{i}")))
        .collect()
}

/// A feed unit's index among the readers: `feed` is 0, `feed-<i>` is i.
fn reader_index(unit_key: &str) -> u32 {
    unit_key
        .strip_prefix(FEED_UNIT)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

pub fn is_feed_unit(unit_key: &str) -> bool {
    unit_key == FEED_UNIT
        || unit_key
            .strip_prefix(FEED_UNIT)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|n| n.parse::<u32>().is_ok())
}

pub fn backfill_mode(pipeline: &Pipeline) -> BackfillMode {
    let mode = pipeline
        .spec
        .as_ref()
        .and_then(|s| s.backfill.as_ref())
        .map_or(0, |b| b.mode);
    match BackfillMode::try_from(mode).unwrap_or(BackfillMode::Unspecified) {
        BackfillMode::Unspecified => BackfillMode::Tombstones,
        m => m,
    }
}

/// Items a backfill reads per chunk (scan page).
pub fn chunk_size(pipeline: &Pipeline) -> u32 {
    match pipeline.spec.as_ref().and_then(|s| s.backfill.as_ref()) {
        Some(b) if b.chunk_size > 0 => b.chunk_size,
        _ => 1000,
    }
}

pub fn segments(pipeline: &Pipeline) -> u32 {
    match pipeline.spec.as_ref().and_then(|s| s.backfill.as_ref()) {
        Some(b) if b.segments > 0 => b.segments,
        _ => DEFAULT_SEGMENTS,
    }
}

/// Opens what a pipeline reads and writes.
///
/// # Errors
/// A store that cannot be opened.
pub async fn open(ctx: &Context, pipeline: &Pipeline) -> Result<Opened, UnitFailure> {
    let spec = pipeline.spec.clone().unwrap_or_default();
    let source = ctx
        .stores
        .table(spec.source.as_ref().unwrap_or(&Default::default()))
        .await?;
    let mut sinks = Vec::new();
    for s in &spec.sinks {
        let transform = Transform::from_proto(&s.transform.clone().unwrap_or_default())
            .map_err(|e| UnitFailure::terminal(format!("sink {}: transform.{e}", s.name)))?;
        let schema = crate::migrate::target_schema(&source.schema, &transform);
        let handle = ctx
            .stores
            .sink(
                s.store.as_ref().unwrap_or(&Default::default()),
                &schema,
                "",
                &transform,
            )
            .await?;
        sinks.push(OpenSink {
            name: s.name.clone(),
            sink: handle.sink(),
            transform,
        });
    }
    let watermark_prefix = spec
        .backfill
        .as_ref()
        .map(|b| b.watermark_key_prefix.clone())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_WATERMARK_PREFIX.to_owned());
    Ok(Opened {
        source,
        sinks,
        version_attribute: spec.version_attribute,
        watermark_prefix,
    })
}

impl Opened {
    /// Items under the reserved watermark prefix are Tidemark's own and
    /// never forwarded.
    pub(crate) fn reserved(&self, key: &Key) -> bool {
        key.get(&self.source.schema.partition)
            .and_then(AttrValue::as_s)
            .is_some_and(|p| p.starts_with(&self.watermark_prefix))
    }

    pub(crate) fn version_of(&self, item: &Item, derived: u64) -> u64 {
        if self.version_attribute.is_empty() {
            return derived;
        }
        item.get(&self.version_attribute)
            .and_then(AttrValue::as_number)
            .and_then(Number::as_u64)
            .unwrap_or(derived)
    }

    /// Writes changes (key, image or `None` for a delete, version, where it
    /// came from) to every sink; records a sink rejects go to the dead-letter
    /// store. Returns (applied, stale, dead-lettered).
    pub async fn write(
        &self,
        changes: &[(Key, Option<Item>, u64, String)],
        dead: &DeadLetters,
        pipeline: &str,
    ) -> Result<(u64, u64, u64), UnitFailure> {
        let now = chrono::Utc::now().timestamp_micros();
        let mut totals = (0, 0, 0);
        for sink in &self.sinks {
            let mut batch = Vec::with_capacity(changes.len());
            let mut origin = Vec::with_capacity(changes.len());
            for (key, image, version, position) in changes {
                let op = match image {
                    Some(item) if sink.transform.passes(item, now) => {
                        SinkOp::Upsert(sink.transform.shape(item, &self.source.schema))
                    }
                    // Filtered out: not written (a target never holds it
                    // unless an earlier image passed, which a delete fixes).
                    Some(_) => continue,
                    None => SinkOp::Delete,
                };
                batch.push(SinkRecord {
                    key: sink.transform.shape_key(key),
                    version: *version,
                    op,
                });
                origin.push(position);
            }
            if batch.is_empty() {
                continue;
            }
            // Writes are conditional on version, so chunks of one poll may be
            // applied concurrently without ever moving a target backwards; the
            // feed is acknowledged only after all of them.
            let requests: Vec<_> = batch
                .chunks(SINK_BATCH)
                .map(|chunk| sink.sink.apply(chunk))
                .collect();
            let chunks = futures::future::try_join_all(requests).await?;
            let outcomes = chunks.into_iter().flatten();
            for ((record, position), outcome) in batch.iter().zip(origin).zip(outcomes) {
                match outcome {
                    RecordOutcome::Applied => totals.0 += 1,
                    RecordOutcome::Stale => totals.1 += 1,
                    RecordOutcome::Rejected(reason) => {
                        dead.add(pipeline, &sink.name, record, position, &reason)
                            .await?;
                        totals.2 += 1;
                    }
                }
            }
        }
        Ok(totals)
    }
}

/// The pipeline as stored in its job (state included); `None` when the
/// job's spec is not a pipeline.
pub fn decode(job: &tidemark_proto::job_tracker::v1::Job) -> Result<Pipeline, String> {
    unpack_any(job.spec.as_ref(), SPEC_TYPE)
}

/// Re-reads the pipeline when the job changed (pause, resume).
async fn refresh(ctx: &Context, name: &str) -> Result<(Pipeline, u64), UnitFailure> {
    let job = ctx
        .jobs
        .clone()
        .get_job(GetJobRequest {
            name: name.to_owned(),
        })
        .await
        .map_err(|s| UnitFailure::retryable(s.message()))?
        .into_inner()
        .job
        .unwrap_or_default();
    let pipeline = decode(&job).map_err(UnitFailure::terminal)?;
    Ok((pipeline, job.revision))
}

fn paused(p: &Pipeline) -> bool {
    p.state == PipelineState::Paused as i32 || p.state == PipelineState::Failed as i32
}

/// Waits while the pipeline is paused, holding the unit's lease; returns
/// the pipeline once resumed.
async fn wait_while_paused(
    ctx: &Context,
    lease: &UnitLease,
    job: &str,
    mut pipeline: Pipeline,
    revision: &mut u64,
) -> Result<Pipeline, UnitFailure> {
    while paused(&pipeline) {
        tokio::select! {
            () = lease.lost().cancelled() => return Err(UnitFailure::LeaseLost),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if lease.job_revision() > *revision {
            let (p, r) = refresh(ctx, job).await?;
            pipeline = p;
            *revision = r;
        }
    }
    Ok(pipeline)
}

pub async fn execute(ctx: Context, claim: Claim) -> Result<(), UnitFailure> {
    let pipeline = decode(&claim.job).map_err(UnitFailure::terminal)?;
    if is_feed_unit(&claim.unit.unit_key) {
        Box::pin(follow(ctx, claim, pipeline)).await
    } else {
        Box::pin(backfill_segment(ctx, claim, pipeline)).await
    }
}

/// What the feed unit checkpoints: the feed's own checkpoint plus totals.
#[derive(Default, Serialize, Deserialize)]
struct FeedState {
    feed: FeedCheckpoint,
    applied: u64,
    stale: u64,
    dead_lettered: u64,
    /// The DBLog backfill's progress (BACKFILL_MODE_WATERMARK), saved with
    /// the feed position it was reached at.
    #[serde(default)]
    watermark: Option<watermark::Progress>,
    /// Each partition's lag when last reported.
    #[serde(default)]
    lag: Vec<ReportedLag>,
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
    pub positions: std::collections::BTreeMap<String, (Option<String>, bool)>,
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

async fn open_feed(
    ctx: &Context,
    pipeline: &Pipeline,
    unit_key: &str,
    checkpoint: &FeedCheckpoint,
) -> Result<Box<dyn ChangeFeed>, UnitFailure> {
    let spec = pipeline.spec.clone().unwrap_or_default();
    let feed = spec.feed.and_then(|f| f.feed);
    let backfilling = backfill_mode(pipeline) != BackfillMode::None;
    let start_of = |p: i32| {
        // A backfilling pipeline must see every change made while it scans.
        if backfilling || p == StartPosition::TrimHorizon as i32 {
            FeedStart::TrimHorizon
        } else {
            FeedStart::Latest
        }
    };
    match (feed, spec.source.and_then(|s| s.store)) {
        (Some(Feed::DynamodbStreams(f)), Some(Store::DynamodbTable(t))) => {
            let ddb = ctx.stores.dynamodb_client(&t.endpoint, &t.region).await;
            let streams = ctx.stores.streams_client(&t.endpoint, &t.region).await;
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
            let brokers = if topic.bootstrap_servers.is_empty() {
                ctx.config.kafka_brokers.clone().ok_or_else(|| {
                    UnitFailure::terminal("no Kafka brokers: set the topic's bootstrap_servers or the replicator's kafka_brokers")
                })?
            } else {
                topic.bootstrap_servers.clone()
            };
            let group = if k.consumer_group.is_empty() {
                format!("tidemark-pipeline-{}", pipeline.name)
            } else {
                k.consumer_group.clone()
            };
            let start = match start_of(k.start_position) {
                FeedStart::TrimHorizon => KafkaStart::Earliest,
                FeedStart::Latest => KafkaStart::Latest,
            };
            Ok(Box::new(KafkaFeed::subscribe(
                &brokers,
                &topic.topic,
                &group,
                start,
            )?))
        }
        _ => Err(UnitFailure::terminal("the feed does not match the source")),
    }
}

async fn follow(ctx: Context, claim: Claim, mut pipeline: Pipeline) -> Result<(), UnitFailure> {
    let job = claim.job.name.clone();
    let lease = claim.lease.clone();
    let mut revision = claim.job.revision;
    let mut state: FeedState = if claim.unit.checkpoint.is_empty() {
        FeedState::default()
    } else {
        serde_json::from_slice(&claim.unit.checkpoint)
            .map_err(|e| UnitFailure::terminal(format!("unreadable feed checkpoint: {e}")))?
    };
    let opened = open(&ctx, &pipeline).await?;
    let dead = ctx.dead_letters.clone();
    let mut feed = open_feed(&ctx, &pipeline, &claim.unit.unit_key, &state.feed).await?;
    let peers: Vec<String> = feed_units(&pipeline)
        .into_iter()
        .filter(|u| u != &claim.unit.unit_key)
        .collect();
    let mut peers_read = Instant::now() - PEERS_EVERY;
    let mut backfill = if backfill_mode(&pipeline) == BackfillMode::Watermark
        && claim.unit.unit_key == FEED_UNIT
        && !state.watermark.as_ref().is_some_and(|p| p.done)
    {
        let key =
            watermark::watermark_key(&opened, &pipeline.name).map_err(UnitFailure::terminal)?;
        state
            .watermark
            .get_or_insert_with(|| watermark::Progress::new(segments(&pipeline)));
        Some(watermark::Backfill::new(key, chunk_size(&pipeline)))
    } else {
        None
    };
    let mut last_report = Instant::now() - REPORT_EVERY;
    let mut dirty = true;
    let mut was_caught_up = false;
    // Polled, not yet written: written while the next poll is read, so the
    // source's read time hides behind the sink's write time. One batch is
    // written at a time, and acknowledged only once every sink has it.
    let mut pending: Vec<ChangeRecord> = Vec::new();
    loop {
        if lease.lost().is_cancelled() {
            return Err(UnitFailure::LeaseLost);
        }
        if lease.job_revision() > revision {
            let (p, r) = refresh(&ctx, &job).await?;
            pipeline = p;
            revision = r;
        }
        if paused(&pipeline) {
            flush(
                &opened,
                &dead,
                &pipeline.name,
                feed.as_mut(),
                &mut state,
                &mut pending,
            )
            .await?;
            pipeline = wait_while_paused(&ctx, &lease, &job, pipeline, &mut revision).await?;
        }
        if let (Some(b), Some(p)) = (backfill.as_mut(), state.watermark.as_ref()) {
            b.select(&opened, p).await?;
        }
        if !peers.is_empty() && peers_read.elapsed() >= PEERS_EVERY {
            peers_read = Instant::now();
            learn_peers(&ctx, &claim.unit.run_id, &peers, feed.as_mut()).await;
        }
        let changes = changes_of(&opened, &pending);
        let (polled, written) = tokio::join!(
            feed.poll(SINK_BATCH * SINK_CONCURRENCY),
            opened.write(&changes, &dead, &pipeline.name),
        );
        // A failed poll leaves the written batch unacknowledged: it is
        // delivered again, and the sinks' version checks make that a no-op.
        let records = polled?;
        if !pending.is_empty() {
            acknowledge(feed.as_mut(), &mut state, written?, &pending).await?;
            dirty = true;
        }
        pending = records;
        let caught_up = pending.is_empty();
        if let Some(b) = backfill.as_mut() {
            b.observe(&pending);
        }
        // A chunk goes out once the feed records polled with its high
        // watermark are written.
        if let Some(b) = backfill.as_mut()
            && b.ready()
        {
            flush(
                &opened,
                &dead,
                &pipeline.name,
                feed.as_mut(),
                &mut state,
                &mut pending,
            )
            .await?;
            let p = state
                .watermark
                .as_mut()
                .expect("a watermark backfill keeps its progress");
            b.emit(&opened, &dead, &pipeline.name, p).await?;
            if p.done {
                backfill = None;
            }
            dirty = true;
        }
        // Report on catching up (Drain waits for it), then every
        // REPORT_EVERY, busy or idle (Drain wants fresh observations).
        let report = (caught_up && !was_caught_up) || last_report.elapsed() >= REPORT_EVERY;
        was_caught_up = caught_up;
        if dirty && report {
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
            let bytes = serde_json::to_vec(&state).expect("feed state serialises");
            match lease.checkpoint(bytes, &p).await {
                Ok(()) => {}
                Err(LeaseError::Lost(_)) => return Err(UnitFailure::LeaseLost),
                Err(LeaseError::Rpc(s)) => tracing::warn!(error = %s, "feed checkpoint failed"),
            }
            last_report = Instant::now();
            // Keep reporting while idle so Drain sees fresh observations.
            dirty = caught_up;
        }
        if caught_up {
            tokio::select! {
                () = lease.lost().cancelled() => return Err(UnitFailure::LeaseLost),
                () = tokio::time::sleep(feed.idle_wait()) => {}
            }
        }
    }
}

fn changes_of(opened: &Opened, records: &[ChangeRecord]) -> Vec<(Key, Option<Item>, u64, String)> {
    records
        .iter()
        .filter(|r| !opened.reserved(&r.key))
        .map(|r| change_of(opened, r))
        .collect()
}

/// Writes and acknowledges what was polled, before what must come after
/// it (a pause, a watermark chunk).
async fn flush(
    opened: &Opened,
    dead: &DeadLetters,
    pipeline: &str,
    feed: &mut dyn ChangeFeed,
    state: &mut FeedState,
    pending: &mut Vec<ChangeRecord>,
) -> Result<(), UnitFailure> {
    let records = std::mem::take(pending);
    let written = opened
        .write(&changes_of(opened, &records), dead, pipeline)
        .await?;
    acknowledge(feed, state, written, &records).await
}

/// Counts a written batch and acknowledges it to the feed, the last
/// position of each partition.
async fn acknowledge(
    feed: &mut dyn ChangeFeed,
    state: &mut FeedState,
    (applied, stale, dead_lettered): (u64, u64, u64),
    records: &[ChangeRecord],
) -> Result<(), UnitFailure> {
    state.applied += applied;
    state.stale += stale;
    state.dead_lettered += dead_lettered;
    let mut last: std::collections::BTreeMap<&str, &tidemark_connectors::Position> =
        std::collections::BTreeMap::new();
    for r in records {
        last.insert(&r.position.partition, &r.position);
    }
    for position in last.values() {
        feed.commit(position).await?;
    }
    Ok(())
}

/// Passes the other feed units' checkpointed progress to the feed (a shared
/// stream's child shard waits on its parent's reader). Best effort: an
/// unanswered read is tried again later.
async fn learn_peers(ctx: &Context, run_id: &str, peers: &[String], feed: &mut dyn ChangeFeed) {
    let units = match ctx
        .jobs
        .clone()
        .list_units(tidemark_proto::job_tracker::v1::ListUnitsRequest {
            run_id: run_id.to_owned(),
            unit_keys: peers.to_vec(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.into_inner().units,
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

fn change_of(opened: &Opened, r: &ChangeRecord) -> (Key, Option<Item>, u64, String) {
    let version = if opened.version_attribute.is_empty() {
        r.version
    } else {
        // Versions come from the item alone; mixing in feed-derived ones
        // (microseconds, far above any counter) would freeze the target.
        // An image without the attribute ranks below every versioned one;
        // a delete ranks just above the version it removed.
        match (&r.new_image, &r.old_image) {
            (Some(image), _) => opened.version_of(image, 0),
            (None, Some(old)) => opened.version_of(old, 0) + 1,
            (None, None) => r.version,
        }
    };
    (
        r.key.clone(),
        r.new_image.clone(),
        version,
        format!("{}/{}", r.position.partition, r.position.sequence),
    )
}

#[derive(Default, Serialize, Deserialize)]
struct SegmentState {
    start_after: Option<Key>,
    copied: u64,
    scanned: u64,
}

async fn backfill_segment(
    ctx: Context,
    claim: Claim,
    pipeline: Pipeline,
) -> Result<(), UnitFailure> {
    let total = segments(&pipeline);
    let segment =
        crate::context::segment_of(&claim.unit.unit_key, total).map_err(UnitFailure::terminal)?;
    let lease = claim.lease.clone();
    let job = claim.job.name.clone();
    let mut revision = claim.job.revision;
    let mut pipeline = pipeline;
    let opened = open(&ctx, &pipeline).await?;
    let dead = ctx.dead_letters.clone();
    let mode = backfill_mode(&pipeline);
    let touch = pipeline
        .spec
        .as_ref()
        .and_then(|s| s.backfill.as_ref())
        .map(|b| b.touch_attribute.clone())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| DEFAULT_TOUCH_ATTRIBUTE.to_owned());
    let chunk = chunk_size(&pipeline);
    let mut state: SegmentState = if claim.unit.checkpoint.is_empty() {
        SegmentState::default()
    } else {
        serde_json::from_slice(&claim.unit.checkpoint)
            .map_err(|e| UnitFailure::terminal(format!("unreadable segment checkpoint: {e}")))?
    };
    loop {
        if lease.lost().is_cancelled() {
            return Err(UnitFailure::LeaseLost);
        }
        if lease.job_revision() > revision {
            let (p, r) = refresh(&ctx, &job).await?;
            pipeline = p;
            revision = r;
        }
        if paused(&pipeline) {
            pipeline = wait_while_paused(&ctx, &lease, &job, pipeline, &mut revision).await?;
        }
        let page = opened
            .source
            .table
            .scan(&ScanRequest {
                segment,
                total_segments: total,
                start_after: state.start_after.clone(),
                limit: chunk,
                filter: None,
                consistent: true,
            })
            .await?;
        state.scanned += page.scanned;
        let rows: Vec<(Key, Item)> = page
            .items
            .into_iter()
            .filter_map(|item| opened.source.schema.key_of(&item).ok().map(|k| (k, item)))
            .filter(|(k, _)| !opened.reserved(k))
            .collect();
        match mode {
            BackfillMode::Touch => {
                // The feed carries every touched item to the sinks.
                for (key, _) in &rows {
                    let set: Item = [(
                        touch.clone(),
                        AttrValue::n(
                            u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0),
                        ),
                    )]
                    .into_iter()
                    .collect();
                    match opened
                        .source
                        .table
                        .update(key, &set, Some(&Predicate::ItemExists))
                        .await
                    {
                        Ok(_) | Err(tidemark_connectors::ConnectorError::Precondition(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            _ => {
                let changes: Vec<(Key, Option<Item>, u64, String)> = rows
                    .iter()
                    .map(|(k, item)| {
                        (
                            k.clone(),
                            Some(item.clone()),
                            opened.version_of(item, 0),
                            format!("backfill/{segment}"),
                        )
                    })
                    .collect();
                opened.write(&changes, &dead, &pipeline.name).await?;
            }
        }
        state.copied += u64::try_from(rows.len()).unwrap_or(u64::MAX);
        state.start_after.clone_from(&page.last_key);
        let mut p = Progress {
            items_processed: i64::try_from(state.copied).unwrap_or(i64::MAX),
            ..Progress::default()
        };
        p.add("scanned", i64::try_from(state.scanned).unwrap_or(i64::MAX));
        if page.last_key.is_none() {
            return match lease.complete(&p, None).await {
                Ok(_) => Ok(()),
                Err(LeaseError::Lost(_)) => Err(UnitFailure::LeaseLost),
                Err(LeaseError::Rpc(s)) => Err(UnitFailure::retryable(s.message())),
            };
        }
        let bytes = serde_json::to_vec(&state).expect("segment state serialises");
        match lease.checkpoint(bytes, &p).await {
            Ok(()) => {}
            Err(LeaseError::Lost(_)) => return Err(UnitFailure::LeaseLost),
            Err(LeaseError::Rpc(s)) => tracing::warn!(error = %s, "segment checkpoint failed"),
        }
    }
}

/// Re-reads keys from the source and rewrites their current image to the
/// sinks (deleting those the source no longer has). A derived version one
/// second in the past keeps any change made after the read winning over the
/// repair write.
pub async fn repair(
    opened: &Opened,
    keys: &[Key],
    only: &[String],
    dead: &DeadLetters,
    pipeline: &str,
) -> Result<(i64, i64, i64), UnitFailure> {
    let now = chrono::Utc::now().timestamp();
    let derived = u64::try_from((now - 1).max(1)).unwrap_or(1) * 1_000_000;
    let mut rewritten = 0;
    let mut deleted = 0;
    let mut changes = Vec::with_capacity(keys.len());
    for key in keys {
        let item = opened.source.table.get(key).await?;
        match &item {
            Some(_) => rewritten += 1,
            None => deleted += 1,
        }
        let unversioned = if opened.version_attribute.is_empty() {
            derived
        } else {
            0
        };
        let version = item
            .as_ref()
            .map_or(derived, |i| opened.version_of(i, unversioned));
        changes.push((key.clone(), item, version, "repair".to_owned()));
    }
    let sinks: Vec<&OpenSink> = opened
        .sinks
        .iter()
        .filter(|s| only.is_empty() || only.contains(&s.name))
        .collect();
    let subset = Opened {
        source: opened.source.clone(),
        sinks: sinks
            .into_iter()
            .map(|s| OpenSink {
                name: s.name.clone(),
                sink: Arc::clone(&s.sink),
                transform: s.transform.clone(),
            })
            .collect(),
        version_attribute: opened.version_attribute.clone(),
        watermark_prefix: opened.watermark_prefix.clone(),
    };
    let (_, _, dead_lettered) = subset.write(&changes, dead, pipeline).await?;
    let dl = i64::try_from(dead_lettered).unwrap_or(i64::MAX);
    Ok((rewritten - dl.min(rewritten), deleted, dl))
}
