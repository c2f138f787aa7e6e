//! What a stored pipeline says, read the same way by its RPCs and its
//! executors: the job spec's type, its feed units and segment units, its
//! backfill mode and sizes.

use tidemark_kit::worker::unpack_any;
use tidemark_proto::replicator::v1::change_feed::Feed;
use tidemark_proto::replicator::v1::{BackfillMode, Pipeline};

pub const SPEC_TYPE: &str = <Pipeline as tidemark_kit::jobs::JobSpec>::TYPE;
pub const FEED_UNIT: &str = "feed";
pub const DEFAULT_SEGMENTS: u32 = 8;
pub use tidemark_connectors::DEFAULT_WATERMARK_PREFIX;
pub const DEFAULT_TOUCH_ATTRIBUTE: &str = "_tidemark_touch";
/// The feed unit's counter saying a watermark backfill is still going on.
pub const BACKFILL_PENDING: &str = "backfill_pending";

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
pub fn reader_index(unit_key: &str) -> u32 {
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

/// The pipeline as stored in its job (state included); `None` when the
/// job's spec is not a pipeline.
pub fn decode(job: &tidemark_proto::job_tracker::v1::Job) -> Result<Pipeline, String> {
    unpack_any(job.spec.as_ref(), SPEC_TYPE)
}
