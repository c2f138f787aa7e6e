//! CreatePipeline's checks of a spec: its fields, then every store it names
//! (source, feed, sinks), creating nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use tidemark_connectors::KeySchema;
use tidemark_connectors::transform::Transform;
use tidemark_kit::error::FieldError;
use tidemark_proto::common::v1::DataStore;
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::replicator::v1::change_feed::Feed;
use tidemark_proto::replicator::v1::{BackfillMode, Pipeline, PipelineSpec};

use super::spec;
use crate::context::{MAX_WRITES_IN_FLIGHT, Replicator};
use crate::error::{ReplicatorError, ReplicatorResult};

pub fn check_name(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "name",
            "1-100 ASCII letters, digits, '-' and '_', starting with a letter or digit",
        ))
    }
}

pub fn validate_spec(spec: &PipelineSpec) -> Vec<FieldError> {
    let mut v = Vec::new();
    let watermark = spec.backfill.as_ref().map(|b| b.mode) == Some(BackfillMode::Watermark as i32);
    let source = spec.source.as_ref().and_then(|s| s.store.as_ref());
    match source {
        Some(Store::DynamodbTable(t)) if !t.table_name.is_empty() => {}
        Some(Store::SqliteTable(t)) if !t.table_name.is_empty() => {}
        None => v.push(FieldError::required("spec.source")),
        _ => v.push(FieldError::new(
            "spec.source",
            "must be a dynamodb_table or sqlite_table with a table_name",
        )),
    }
    match (spec.feed.as_ref().and_then(|f| f.feed.as_ref()), source) {
        (None, _) => v.push(FieldError::required("spec.feed")),
        (Some(Feed::DynamodbStreams(d)), Some(Store::DynamodbTable(_)) | None) => {
            if d.readers > 64 {
                v.push(FieldError::new("spec.feed.dynamodb_streams.readers", "1 to 64 (0 means 1)"));
            }
            if d.readers > 1 && watermark {
                v.push(FieldError::new(
                    "spec.feed.dynamodb_streams.readers",
                    "BACKFILL_MODE_WATERMARK needs one reader (its chunks must see every shard); use 1, or BACKFILL_MODE_TOMBSTONES",
                ));
            }
        }
        (Some(Feed::EmbeddedChangeLog(_)), Some(Store::SqliteTable(_)) | None) => {}
        (Some(Feed::Kafka(k)), _) => {
            if k.topic.as_ref().is_none_or(|t| t.topic.is_empty()) {
                v.push(FieldError::required("spec.feed.kafka.topic.topic"));
            }
            if k.consumers > 64 {
                v.push(FieldError::new("spec.feed.kafka.consumers", "1 to 64 (0 means 1)"));
            }
            if k.consumers > 1 && watermark {
                v.push(FieldError::new(
                    "spec.feed.kafka.consumers",
                    "BACKFILL_MODE_WATERMARK needs one consumer (its chunks must see every partition); use 1, or BACKFILL_MODE_TOMBSTONES",
                ));
            }
        }
        (Some(_), Some(_)) => v.push(FieldError::new(
            "spec.feed",
            "does not match the source: DynamoDB Streams for a dynamodb_table, the embedded change log for a sqlite_table",
        )),
    }
    if spec.sinks.is_empty() {
        v.push(FieldError::new(
            "spec.sinks",
            "at least one sink is required",
        ));
    }
    let mut names = BTreeSet::new();
    for (i, sink) in spec.sinks.iter().enumerate() {
        let field = format!("spec.sinks[{i}]");
        if sink.name.is_empty() {
            v.push(FieldError::required(format!("{field}.name")));
        } else if !names.insert(sink.name.clone()) {
            v.push(FieldError::new(
                format!("{field}.name"),
                format!("duplicate sink name {:?}", sink.name),
            ));
        }
        match sink.store.as_ref().and_then(|s| s.store.as_ref()) {
            Some(Store::DynamodbTable(t)) if !t.table_name.is_empty() => {}
            Some(Store::SqliteTable(t)) if !t.table_name.is_empty() => {}
            Some(Store::ElasticsearchIndex(x)) if !x.index.is_empty() => {}
            Some(Store::S3Prefix(p)) if !p.bucket.is_empty() => {}
            Some(Store::KafkaTopic(t)) if !t.topic.is_empty() => {}
            None => v.push(FieldError::required(format!("{field}.store"))),
            _ => v.push(FieldError::new(
                format!("{field}.store"),
                "names no table, index or bucket",
            )),
        }
        if sink
            .tombstone_retention
            .as_ref()
            .is_some_and(|d| d.seconds < 1 || d.nanos < 0)
        {
            v.push(FieldError::new(
                format!("{field}.tombstone_retention"),
                "at least 1 s, and well past the feed's retention",
            ));
        }
        if sink.writes_in_flight > MAX_WRITES_IN_FLIGHT {
            v.push(FieldError::new(
                format!("{field}.writes_in_flight"),
                format!(
                    "at most {MAX_WRITES_IN_FLIGHT} (0 means {})",
                    tidemark_connectors::dynamodb::DEFAULT_WRITES_IN_FLIGHT
                ),
            ));
        }
        if let Some(t) = &sink.transform
            && let Err(e) = Transform::from_proto(t)
        {
            v.push(FieldError::new(
                format!("{field}.transform.{}", e.field),
                e.reason,
            ));
        }
    }
    for (field, value) in [
        ("spec.origin", &spec.origin),
        ("spec.skip_origin", &spec.skip_origin),
    ] {
        if !value.is_empty()
            && let Err(e) = check_name(value)
        {
            v.push(FieldError::new(field, e.description));
        }
    }
    if !spec.skip_origin.is_empty() && spec.skip_origin == spec.origin {
        v.push(FieldError::new(
            "spec.skip_origin",
            "must differ from spec.origin: a pipeline skipping its own writes would copy nothing it wrote, and skip nothing else",
        ));
    }
    if let Some(b) = &spec.backfill {
        if b.segments > 1000 {
            v.push(FieldError::new(
                "spec.backfill.segments",
                "1 to 1000 (0 means 8)",
            ));
        }
        if b.chunk_size > 10_000 {
            v.push(FieldError::new(
                "spec.backfill.chunk_size",
                "1 to 10000 (0 means 1000)",
            ));
        }
    }
    v
}

/// What the store checks of a spec found.
pub struct Checked {
    /// The source's key schema.
    pub schema: KeySchema,
    pub lines: Vec<String>,
}

/// Checks every store a spec names, creating nothing: the source table, its
/// stream or the Kafka topic, every sink.
pub async fn check_stores(r: &Replicator, spec: &PipelineSpec) -> ReplicatorResult<Checked> {
    let mut lines = Vec::new();
    let source_store = spec.source.clone().unwrap_or_default();
    let source = r
        .ctx
        .stores
        .table(&source_store)
        .await
        .map_err(ReplicatorError::store_of("spec.source"))?;
    if spec::backfill_mode(&Pipeline {
        spec: Some(spec.clone()),
        ..Pipeline::default()
    }) == BackfillMode::Watermark
        && source
            .dynamo
            .as_ref()
            .and_then(|t| t.key_type(&source.schema.partition))
            .is_some_and(|t| t != "S")
    {
        return Err(ReplicatorError::Precondition(format!(
            "spec.backfill.mode: BACKFILL_MODE_WATERMARK writes watermark items under the string partition key prefix {:?}, and {} is not a string; use BACKFILL_MODE_TOMBSTONES",
            spec.backfill
                .as_ref()
                .map(|b| b.watermark_key_prefix.as_str())
                .filter(|p| !p.is_empty())
                .unwrap_or(spec::DEFAULT_WATERMARK_PREFIX),
            source.schema.partition
        )));
    }
    lines.push(format!(
        "spec.source: table {} exists (partition key {}{})",
        crate::jobs::store_name(&source_store),
        source.schema.partition,
        source
            .schema
            .sort
            .as_ref()
            .map_or_else(String::new, |s| format!(", sort key {s}"))
    ));
    lines.push(check_feed(r, spec, &source_store).await?);
    check_templates(spec, &source.schema)?;
    for (i, s) in spec.sinks.iter().enumerate() {
        let field = format!("spec.sinks[{i}].store");
        let line = r
            .ctx
            .stores
            .check_sink(s.store.as_ref().unwrap_or(&Default::default()))
            .await
            .map_err(ReplicatorError::store_of(&field))?;
        lines.push(format!("{field} ({}): {line}", s.name));
    }
    Ok(Checked {
        schema: source.schema,
        lines,
    })
}

/// Checks the feed a spec names (the source's stream, the Kafka topic) and
/// says what it found.
async fn check_feed(
    r: &Replicator,
    spec: &PipelineSpec,
    source_store: &DataStore,
) -> ReplicatorResult<String> {
    match (
        spec.feed.as_ref().and_then(|f| f.feed.as_ref()),
        source_store.store.as_ref(),
    ) {
        (Some(Feed::DynamodbStreams(_)), Some(Store::DynamodbTable(t))) => {
            let ddb = r
                .ctx
                .stores
                .dynamodb_client(&t.endpoint, &t.region)
                .await
                .map_err(ReplicatorError::store_of("spec.source.endpoint"))?;
            let streams = r
                .ctx
                .stores
                .streams_client(&t.endpoint, &t.region)
                .await
                .map_err(ReplicatorError::store_of("spec.source.endpoint"))?;
            tidemark_connectors::streams::DynamoStreamSource::for_table(
                &ddb,
                streams,
                &t.table_name,
            )
            .await
            .map_err(|e| ReplicatorError::Precondition(format!("spec.source: {e}")))?;
            Ok(format!(
                "spec.feed: table {} has a stream with new images",
                t.table_name
            ))
        }
        (Some(Feed::Kafka(k)), _) => {
            let topic = k.topic.clone().unwrap_or_default();
            r.ctx
                .stores
                .check_endpoint(&topic.bootstrap_servers)
                .map_err(ReplicatorError::store_of(
                    "spec.feed.kafka.topic.bootstrap_servers",
                ))?;
            let brokers = if topic.bootstrap_servers.is_empty() {
                r.ctx.config.kafka_brokers.clone().unwrap_or_default()
            } else {
                topic.bootstrap_servers.clone()
            };
            let partitions = tidemark_connectors::kafka::topic_partitions(
                &brokers,
                &topic.topic,
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| {
                ReplicatorError::Precondition(format!(
                    "spec.feed.kafka.topic: {e} (brokers {brokers})"
                ))
            })?;
            Ok(format!(
                "spec.feed: Kafka topic {} has {partitions} partition(s)",
                topic.topic
            ))
        }
        _ => Ok("spec.feed: the embedded change log of the source".to_owned()),
    }
}

/// Checks the sinks' document id and index name templates against the key
/// as each sink names it.
fn check_templates(spec: &PipelineSpec, source_schema: &KeySchema) -> ReplicatorResult<()> {
    for (i, s) in spec.sinks.iter().enumerate() {
        let transform =
            Transform::from_proto(&s.transform.clone().unwrap_or_default()).unwrap_or_default();
        if let Some(t) = transform.document_id_template() {
            let field = format!("spec.sinks[{i}].transform.document_id_template");
            let checked = match s.store.as_ref().and_then(|d| d.store.as_ref()) {
                Some(Store::S3Prefix(_)) => Err(crate::stores::S3_TEMPLATE.to_owned()),
                Some(Store::ElasticsearchIndex(_)) => {
                    tidemark_connectors::elasticsearch::check_key_template(
                        t,
                        &crate::schema::target_schema(source_schema, &transform),
                    )
                }
                _ => Ok(()),
            };
            if let Err(reason) = checked {
                return Err(ReplicatorError::Invalid(vec![FieldError::new(
                    field, reason,
                )]));
            }
        }
        if let (Some(t), Some(Store::ElasticsearchIndex(_))) = (
            transform.index_name_template(),
            s.store.as_ref().and_then(|d| d.store.as_ref()),
        ) {
            let schema = crate::schema::target_schema(source_schema, &transform);
            let key: BTreeSet<&str> = schema.names().collect();
            if let Some(a) = t.attributes().find(|a| !key.contains(a)) {
                return Err(ReplicatorError::Invalid(vec![FieldError::new(
                    format!("spec.sinks[{i}].transform.index_name_template"),
                    format!(
                        "may name only the key attributes {key:?}, not {a:?}: a delete knows only the key"
                    ),
                )]));
            }
        }
    }
    Ok(())
}
