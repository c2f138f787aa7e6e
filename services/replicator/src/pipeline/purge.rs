//! The purge of old tombstones in a pipeline's Elasticsearch sinks (#18).
//! A delete is a tombstone document so that an older record arriving later
//! is still refused; once no record older than the feed's retention can
//! arrive any more, a tombstone older than a retention well past it refuses
//! nothing and only fills the index. The pipeline's first feed unit (held
//! by one replica at a time) purges them on a schedule while it runs.

use std::sync::Arc;
use std::time::Duration;

use tidemark_connectors::elasticsearch::ElasticsearchSink;
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::replicator::v1::change_feed::Feed;
use tidemark_proto::replicator::v1::{Pipeline, Sink};

use super::open::Opened;
use super::spec::FEED_UNIT;
use crate::context::Context;
use crate::stores::SinkHandle;

const HOUR: Duration = Duration::from_secs(3600);
/// Twice DynamoDB Streams' 24 h retention (also used for the embedded
/// change log, which a replay reads from its checkpoint).
pub const STREAMS_TOMBSTONE_RETENTION: Duration = Duration::from_secs(48 * 3600);
/// Twice Kafka's default 7-day log retention.
pub const KAFKA_TOMBSTONE_RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);

/// How long a sink keeps a tombstone: its `tombstone_retention`, else well
/// past the retention of the pipeline's feed, the oldest a replayed record
/// can be.
pub fn tombstone_retention(pipeline: &Pipeline, sink: &Sink) -> Duration {
    if let Some(d) = &sink.tombstone_retention
        && let (Ok(s), Ok(n)) = (u64::try_from(d.seconds), u32::try_from(d.nanos))
    {
        return Duration::new(s, n).max(Duration::from_secs(1));
    }
    match pipeline
        .spec
        .as_ref()
        .and_then(|s| s.feed.as_ref())
        .and_then(|f| f.feed.as_ref())
    {
        Some(Feed::Kafka(_)) => KAFKA_TOMBSTONE_RETENTION,
        _ => STREAMS_TOMBSTONE_RETENTION,
    }
}

/// How often the purge runs: often enough that a tombstone outlives its
/// retention by an eighth of it at most, at most hourly, at least a second
/// apart.
pub fn purge_every(retention: Duration) -> Duration {
    (retention / 8).clamp(Duration::from_secs(1), HOUR)
}

/// The running purge; stops when dropped (the feed unit ended or lost its
/// lease).
pub struct Purge(Option<tokio::task::JoinHandle<()>>);

impl Drop for Purge {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Starts the purge of the pipeline's Elasticsearch sinks, in its first
/// feed unit only; nothing for other units or pipelines without one.
pub async fn start(ctx: &Context, unit_key: &str, pipeline: &Pipeline, opened: &Opened) -> Purge {
    if unit_key != FEED_UNIT {
        return Purge(None);
    }
    let sinks = elasticsearch_sinks(ctx, pipeline, opened).await;
    if sinks.is_empty() {
        return Purge(None);
    }
    let every = sinks
        .iter()
        .map(|(_, retention)| purge_every(*retention))
        .min()
        .unwrap_or(HOUR);
    let name = pipeline.name.clone();
    Purge(Some(tokio::spawn(async move {
        loop {
            for (sink, retention) in &sinks {
                let retention = *retention;
                match sink.purge_tombstones(retention).await {
                    Ok(deleted) => {
                        tracing::debug!(pipeline = %name, sink = %sink.index(), deleted, "tombstones purged");
                    }
                    Err(e) => {
                        tracing::warn!(pipeline = %name, sink = %sink.index(), error = %e, "tombstone purge failed; retried at the next one");
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    })))
}

/// The pipeline's Elasticsearch sinks, opened with their index-name
/// templates, and their retentions (a sink that cannot be opened is left
/// out, with a warning: the pipeline itself just opened it).
async fn elasticsearch_sinks(
    ctx: &Context,
    pipeline: &Pipeline,
    opened: &Opened,
) -> Vec<(Arc<ElasticsearchSink>, Duration)> {
    let spec = pipeline.spec.clone().unwrap_or_default();
    let mut out = Vec::new();
    for (s, open) in spec.sinks.iter().zip(&opened.sinks) {
        let Some(store) = s
            .store
            .as_ref()
            .filter(|d| matches!(d.store, Some(Store::ElasticsearchIndex(_))))
        else {
            continue;
        };
        let schema = crate::schema::target_schema(&opened.source.schema, &open.transform);
        match ctx.stores.sink(store, &schema, "", &open.transform).await {
            Ok(SinkHandle::Elasticsearch(sink)) => {
                out.push((sink, tombstone_retention(pipeline, s)));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(pipeline = %pipeline.name, sink = %s.name, error = %e, "no tombstone purge for this sink");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use tidemark_proto::replicator::v1::{
        ChangeFeed, DynamoDbStreamsFeed, KafkaFeed, PipelineSpec,
    };

    use super::*;

    fn with_feed(feed: Feed) -> Pipeline {
        Pipeline {
            spec: Some(PipelineSpec {
                feed: Some(ChangeFeed { feed: Some(feed) }),
                ..PipelineSpec::default()
            }),
            ..Pipeline::default()
        }
    }

    #[test]
    fn tombstones_outlive_the_feeds_retention_twice() {
        let sink = Sink::default();
        let streams = with_feed(Feed::DynamodbStreams(DynamoDbStreamsFeed::default()));
        assert_eq!(
            tombstone_retention(&streams, &sink),
            Duration::from_secs(48 * 3600)
        );
        let kafka = with_feed(Feed::Kafka(KafkaFeed::default()));
        assert_eq!(
            tombstone_retention(&kafka, &sink),
            Duration::from_secs(14 * 86_400)
        );
        let set = Sink {
            tombstone_retention: Some(prost_types::Duration {
                seconds: 7200,
                nanos: 0,
            }),
            ..Sink::default()
        };
        assert_eq!(tombstone_retention(&kafka, &set), Duration::from_secs(7200));
    }

    #[test]
    fn the_purge_runs_an_eighth_of_the_retention_apart_at_most_hourly() {
        assert_eq!(purge_every(STREAMS_TOMBSTONE_RETENTION), HOUR);
        assert_eq!(
            purge_every(Duration::from_secs(80)),
            Duration::from_secs(10)
        );
        assert_eq!(purge_every(Duration::from_secs(2)), Duration::from_secs(1));
    }
}
