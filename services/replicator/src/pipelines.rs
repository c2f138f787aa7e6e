//! Pipeline RPCs: create, read, pause and resume pipelines (stored as the
//! spec of their REPLICATION job, so they survive restarts without a store of
//! the replicator's own), lag and drain (read from the counters the feed
//! unit's holder checkpoints), repair and dead letters.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use tidemark_connectors::proto::key_from_proto;
use tidemark_connectors::transform::Transform;
use tidemark_connectors::{RecordOutcome, SinkOp, SinkRecord};
use tidemark_kit::error::{FieldError, invalid_argument};
use tidemark_kit::rpc::BoxStream;
use tidemark_kit::worker::pack_any;
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::job_tracker::v1::{
    CreateJobRequest, GetJobRequest, GetRunRequest, Job, JobKind, ListJobsRequest,
    ListUnitsRequest, RunStatus, UnitSpec, UnitStatus, UpdateJobRequest,
};
use tidemark_proto::replicator::v1::change_feed::Feed;
use tidemark_proto::replicator::v1::*;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::Replicator;
use crate::jobs::{jobs_status, store_status};
use crate::pipeline::{self, FEED_UNIT};

fn job_name(name: &str) -> String {
    format!("pipeline/{name}")
}

fn check_name(name: &str) -> Result<(), FieldError> {
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

fn micros_ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn validate_spec(spec: &PipelineSpec) -> Vec<FieldError> {
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
            Some(Store::KafkaTopic(_)) => v.push(FieldError::new(
                format!("{field}.store"),
                "kafka_topic sinks are not supported by this release; use dynamodb_table, elasticsearch_index, s3_prefix or sqlite_table",
            )),
            None => v.push(FieldError::required(format!("{field}.store"))),
            _ => v.push(FieldError::new(format!("{field}.store"), "names no table, index or bucket")),
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

/// The pipeline with its output fields filled from the job and run.
async fn view(r: &Replicator, job: &Job) -> Result<Pipeline, Status> {
    let mut p = pipeline::decode(job).map_err(Status::internal)?;
    p.job_name.clone_from(&job.name);
    p.create_time = job.create_time;
    p.update_time = job.update_time;
    let run = match &job.last_run {
        Some(run) => {
            r.ctx
                .jobs
                .clone()
                .get_run(GetRunRequest {
                    run_id: run.run_id.clone(),
                })
                .await
                .map_err(jobs_status)?
                .into_inner()
                .run
        }
        None => None,
    };
    if let Some(run) = &run {
        p.run_id.clone_from(&run.run_id);
        if run.status != RunStatus::Running as i32 && p.state != PipelineState::Paused as i32 {
            p.state = PipelineState::Failed as i32;
            p.state_reason = format!("run {} ended {}", run.run_id, run.status_reason);
        }
    }
    if p.state != PipelineState::Paused as i32 && p.state != PipelineState::Failed as i32 {
        p.state = match &run {
            None => PipelineState::Creating as i32,
            Some(run) => {
                let units = run.units.unwrap_or_default();
                // Every unit but the feed done: the backfill is over (a
                // watermark backfill runs in the feed unit and says when).
                let watermark = pipeline::backfill_mode(&p) == BackfillMode::Watermark;
                let feeds = i64::try_from(pipeline::feed_units(&p).len()).unwrap_or(1);
                if units.migrated + feeds >= units.total
                    && (!watermark || !watermark_pending(r, &run.run_id).await?)
                {
                    PipelineState::Streaming as i32
                } else {
                    PipelineState::Backfilling as i32
                }
            }
        };
    }
    p.dead_letter_count = r
        .ctx
        .dead_letters
        .list(&p.name, "")
        .await
        .map(|l| i64::try_from(l.len()).unwrap_or(i64::MAX))
        .unwrap_or_default();
    Ok(p)
}

/// Whether the feed unit's watermark backfill is still going on (it is
/// until the unit first reports otherwise).
async fn watermark_pending(r: &Replicator, run_id: &str) -> Result<bool, Status> {
    let feed = feed_unit(r, run_id).await?;
    Ok(feed.counters.get(pipeline::BACKFILL_PENDING) != Some(&0))
}

async fn feed_unit(
    r: &Replicator,
    run_id: &str,
) -> Result<tidemark_proto::job_tracker::v1::Unit, Status> {
    Ok(r.ctx
        .jobs
        .clone()
        .list_units(ListUnitsRequest {
            run_id: run_id.to_owned(),
            unit_keys: vec![FEED_UNIT.to_owned()],
            ..Default::default()
        })
        .await
        .map_err(jobs_status)?
        .into_inner()
        .units
        .into_iter()
        .next()
        .unwrap_or_default())
}

async fn get_job(r: &Replicator, name: &str) -> Result<Job, Status> {
    if name.is_empty() {
        return Err(invalid_argument(vec![FieldError::required("name")]));
    }
    match r
        .ctx
        .jobs
        .clone()
        .get_job(GetJobRequest {
            name: job_name(name),
        })
        .await
    {
        Ok(j) => Ok(j.into_inner().job.unwrap_or_default()),
        Err(s) if s.code() == Code::NotFound => {
            Err(Status::not_found(format!("no pipeline named {name:?}")))
        }
        Err(s) => Err(jobs_status(s)),
    }
}

pub async fn create(
    r: &Replicator,
    req: CreatePipelineRequest,
) -> Result<CreatePipelineResponse, Status> {
    let mut violations = Vec::new();
    if let Err(e) = check_name(&req.name) {
        violations.push(e);
    }
    let spec = req.spec.clone().unwrap_or_default();
    if req.spec.is_none() {
        violations.push(FieldError::required("spec"));
    } else {
        violations.extend(validate_spec(&spec));
    }
    if !violations.is_empty() {
        return Err(invalid_argument(violations));
    }
    if let Some(Feed::Kafka(k)) = spec.feed.as_ref().and_then(|f| f.feed.as_ref())
        && k.topic
            .as_ref()
            .is_some_and(|t| t.bootstrap_servers.is_empty())
        && r.ctx.config.kafka_brokers.is_none()
    {
        return Err(invalid_argument(vec![FieldError::new(
            "spec.feed.kafka.topic.bootstrap_servers",
            "required: this replicator has no kafka_brokers configured",
        )]));
    }
    let checks = check_stores(r, &spec).await?;
    if req.validate_only {
        return validate_only(r, &req.name, spec, checks).await;
    }
    for (i, s) in spec.sinks.iter().enumerate() {
        // Opening creates what a sink may create (an index with its mapping).
        let transform =
            Transform::from_proto(&s.transform.clone().unwrap_or_default()).unwrap_or_default();
        let schema = crate::migrate::target_schema(&checks.schema, &transform);
        r.ctx
            .stores
            .sink(
                s.store.as_ref().unwrap_or(&Default::default()),
                &schema,
                "",
                &transform,
            )
            .await
            .map_err(|e| store_status(&e, &format!("spec.sinks[{i}].store")))?;
    }
    let stored = Pipeline {
        name: req.name.clone(),
        spec: Some(spec),
        state: PipelineState::Streaming as i32,
        ..Pipeline::default()
    };
    let job = Job {
        name: job_name(&req.name),
        kind: JobKind::Replication as i32,
        description: format!("replication pipeline {}", req.name),
        spec: Some(pack_any(pipeline::SPEC_TYPE, &stored)),
        explicit_completion: true,
        // A feed unit is taken over on every lease expiry; that must not
        // use up its attempts.
        max_attempts: 1000,
        ..Job::default()
    };
    let job = r
        .ctx
        .jobs
        .clone()
        .create_job(CreateJobRequest { job: Some(job) })
        .await
        .map_err(|s| {
            if s.code() == Code::AlreadyExists {
                Status::already_exists(format!(
                    "a pipeline named {:?} exists with another spec",
                    req.name
                ))
            } else {
                jobs_status(s)
            }
        })?
        .into_inner()
        .job
        .unwrap_or_default();
    if job.last_run.is_none() {
        let mut units = pipeline::feed_units(&stored);
        // Segments are units of their own, claimed by any replica, except
        // for a watermark backfill: it reads its chunks where the feed is
        // read, in the feed unit.
        if matches!(
            pipeline::backfill_mode(&stored),
            BackfillMode::Tombstones | BackfillMode::Touch
        ) {
            units.extend(crate::context::segment_units(pipeline::segments(&stored)));
        }
        r.ctx
            .jobs
            .clone()
            .start_run(tidemark_proto::job_tracker::v1::StartRunRequest {
                job_name: job.name.clone(),
                units: units
                    .into_iter()
                    .map(|unit_key| UnitSpec {
                        unit_key,
                        after_unit_keys: Vec::new(),
                    })
                    .collect(),
                trigger: tidemark_proto::job_tracker::v1::RunTrigger::Api as i32,
                correlation_id: format!("create-{}", req.name),
                actor: if req.actor.is_empty() {
                    "replicator".to_owned()
                } else {
                    req.actor.clone()
                },
                ..Default::default()
            })
            .await
            .map_err(jobs_status)?;
    }
    let job = get_job(r, &req.name).await?;
    Ok(CreatePipelineResponse {
        pipeline: Some(view(r, &job).await?),
        checks: Vec::new(),
    })
}

/// What the store checks of a spec found.
struct Checked {
    /// The source's key schema.
    schema: tidemark_connectors::KeySchema,
    lines: Vec<String>,
}

/// Checks every store a spec names, creating nothing: the source table, its
/// stream or the Kafka topic, every sink.
async fn check_stores(r: &Replicator, spec: &PipelineSpec) -> Result<Checked, Status> {
    let mut lines = Vec::new();
    let source_store = spec.source.clone().unwrap_or_default();
    let source = r
        .ctx
        .stores
        .table(&source_store)
        .await
        .map_err(|e| store_status(&e, "spec.source"))?;
    if pipeline::backfill_mode(&Pipeline {
        spec: Some(spec.clone()),
        ..Pipeline::default()
    }) == BackfillMode::Watermark
        && source
            .dynamo
            .as_ref()
            .and_then(|t| t.key_type(&source.schema.partition))
            .is_some_and(|t| t != "S")
    {
        return Err(Status::failed_precondition(format!(
            "spec.backfill.mode: BACKFILL_MODE_WATERMARK writes watermark items under the string partition key prefix {:?}, and {} is not a string; use BACKFILL_MODE_TOMBSTONES",
            spec.backfill
                .as_ref()
                .map(|b| b.watermark_key_prefix.as_str())
                .filter(|p| !p.is_empty())
                .unwrap_or(pipeline::DEFAULT_WATERMARK_PREFIX),
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
    match (
        spec.feed.as_ref().and_then(|f| f.feed.as_ref()),
        source_store.store.as_ref(),
    ) {
        (Some(Feed::DynamodbStreams(_)), Some(Store::DynamodbTable(t))) => {
            let ddb = r.ctx.stores.dynamodb_client(&t.endpoint, &t.region).await;
            let streams = r.ctx.stores.streams_client(&t.endpoint, &t.region).await;
            tidemark_connectors::streams::DynamoStreamSource::for_table(
                &ddb,
                streams,
                &t.table_name,
            )
            .await
            .map_err(|e| Status::failed_precondition(format!("spec.source: {e}")))?;
            lines.push(format!(
                "spec.feed: table {} has a stream with new images",
                t.table_name
            ));
        }
        (Some(Feed::Kafka(k)), _) => {
            let topic = k.topic.clone().unwrap_or_default();
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
                Status::failed_precondition(format!(
                    "spec.feed.kafka.topic: {e} (brokers {brokers})"
                ))
            })?;
            lines.push(format!(
                "spec.feed: Kafka topic {} has {partitions} partition(s)",
                topic.topic
            ));
        }
        _ => lines.push("spec.feed: the embedded change log of the source".to_owned()),
    }
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
                        &crate::migrate::target_schema(&source.schema, &transform),
                    )
                }
                _ => Ok(()),
            };
            if let Err(reason) = checked {
                return Err(invalid_argument(vec![FieldError::new(field, reason)]));
            }
        }
        if let (Some(t), Some(Store::ElasticsearchIndex(_))) = (
            transform.index_name_template(),
            s.store.as_ref().and_then(|d| d.store.as_ref()),
        ) {
            let schema = crate::migrate::target_schema(&source.schema, &transform);
            let key: BTreeSet<&str> = schema.names().collect();
            if let Some(a) = t.attributes().find(|a| !key.contains(a)) {
                return Err(invalid_argument(vec![FieldError::new(
                    format!("spec.sinks[{i}].transform.index_name_template"),
                    format!(
                        "may name only the key attributes {key:?}, not {a:?}: a delete knows only the key"
                    ),
                )]));
            }
        }
    }
    for (i, s) in spec.sinks.iter().enumerate() {
        let field = format!("spec.sinks[{i}].store");
        let line = r
            .ctx
            .stores
            .check_sink(s.store.as_ref().unwrap_or(&Default::default()))
            .await
            .map_err(|e| store_status(&e, &field))?;
        lines.push(format!("{field} ({}): {line}", s.name));
    }
    Ok(Checked {
        schema: source.schema,
        lines,
    })
}

/// The answer of a validate-only CreatePipeline: the pipeline as it exists
/// (same name and spec) or as it would be created.
async fn validate_only(
    r: &Replicator,
    name: &str,
    spec: PipelineSpec,
    checked: Checked,
) -> Result<CreatePipelineResponse, Status> {
    let pipeline = match get_job(r, name).await {
        Ok(job) => {
            let existing = view(r, &job).await?;
            if existing.spec.as_ref() != Some(&spec) {
                return Err(Status::already_exists(format!(
                    "a pipeline named {name:?} exists with another spec"
                )));
            }
            existing
        }
        Err(s) if s.code() == Code::NotFound => Pipeline {
            name: name.to_owned(),
            spec: Some(spec),
            state: PipelineState::Creating as i32,
            ..Pipeline::default()
        },
        Err(s) => return Err(s),
    };
    Ok(CreatePipelineResponse {
        pipeline: Some(pipeline),
        checks: checked.lines,
    })
}

pub async fn get(r: &Replicator, name: &str) -> Result<Pipeline, Status> {
    let job = get_job(r, name).await?;
    view(r, &job).await
}

pub async fn list(
    r: &Replicator,
    req: ListPipelinesRequest,
) -> Result<ListPipelinesResponse, Status> {
    let page = r
        .ctx
        .jobs
        .clone()
        .list_jobs(ListJobsRequest {
            kind: JobKind::Replication as i32,
            page_size: req.page_size,
            page_token: req.page_token,
        })
        .await
        .map_err(jobs_status)?
        .into_inner();
    let mut pipelines = Vec::with_capacity(page.jobs.len());
    for job in &page.jobs {
        if pipeline::decode(job).is_ok() {
            pipelines.push(view(r, job).await?);
        }
    }
    Ok(ListPipelinesResponse {
        pipelines,
        next_page_token: page.next_page_token,
    })
}

async fn set_state(
    r: &Replicator,
    name: &str,
    state: PipelineState,
    reason: &str,
    actor: &str,
) -> Result<Pipeline, Status> {
    let job = get_job(r, name).await?;
    let mut stored = pipeline::decode(&job).map_err(Status::internal)?;
    stored.state = state as i32;
    reason.clone_into(&mut stored.state_reason);
    r.ctx
        .jobs
        .clone()
        .update_job(UpdateJobRequest {
            job: Some(Job {
                name: job.name.clone(),
                kind: job.kind,
                spec: Some(pack_any(pipeline::SPEC_TYPE, &stored)),
                ..Job::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["spec".to_owned()],
            }),
            expected_revision: job.revision,
            actor: actor.to_owned(),
        })
        .await
        .map_err(jobs_status)?;
    get(r, name).await
}

pub async fn pause(
    r: &Replicator,
    req: PausePipelineRequest,
) -> Result<PausePipelineResponse, Status> {
    if req.actor.is_empty() {
        return Err(invalid_argument(vec![FieldError::required("actor")]));
    }
    let current = get(r, &req.name).await?;
    if current.state == PipelineState::Failed as i32 {
        return Err(Status::failed_precondition(format!(
            "pipeline {:?} is FAILED ({}); resume it instead",
            req.name, current.state_reason
        )));
    }
    if current.state == PipelineState::Paused as i32 {
        return Ok(PausePipelineResponse {
            pipeline: Some(current),
        });
    }
    let p = set_state(r, &req.name, PipelineState::Paused, &req.reason, &req.actor).await?;
    // Workers see the new job revision at their next heartbeat (a third of
    // the lease); once that has passed, nothing more is written.
    tokio::time::sleep(
        Duration::from_secs(r.ctx.config.lease_secs) / 3 + Duration::from_millis(500),
    )
    .await;
    Ok(PausePipelineResponse { pipeline: Some(p) })
}

pub async fn resume(
    r: &Replicator,
    req: ResumePipelineRequest,
) -> Result<ResumePipelineResponse, Status> {
    if req.actor.is_empty() {
        return Err(invalid_argument(vec![FieldError::required("actor")]));
    }
    let current = get(r, &req.name).await?;
    if current.state != PipelineState::Paused as i32
        && current.state != PipelineState::Failed as i32
    {
        return Ok(ResumePipelineResponse {
            pipeline: Some(current),
        });
    }
    let p = set_state(r, &req.name, PipelineState::Streaming, "", &req.actor).await?;
    Ok(ResumePipelineResponse { pipeline: Some(p) })
}

/// The lag now, from the feed unit's last checkpointed counters.
/// The pipeline's lag from the counters its feed units' holders checkpoint,
/// one partition entry per feed unit; with the oldest of their observation
/// times (a drain waits until every unit reported after it began).
async fn lag(r: &Replicator, p: &Pipeline) -> Result<(PipelineLag, i64), Status> {
    let keys = pipeline::feed_units(p);
    let mut feeds = if p.run_id.is_empty() {
        Vec::new()
    } else {
        r.ctx
            .jobs
            .clone()
            .list_units(ListUnitsRequest {
                run_id: p.run_id.clone(),
                unit_keys: keys.clone(),
                ..Default::default()
            })
            .await
            .map_err(jobs_status)?
            .into_inner()
            .units
    };
    // A unit not listed yet reports nothing: behind, never observed.
    for key in &keys {
        if !feeds.iter().any(|u| &u.unit_key == key) {
            feeds.push(tidemark_proto::job_tracker::v1::Unit {
                unit_key: key.clone(),
                ..Default::default()
            });
        }
    }
    let backfill_done = p.state == PipelineState::Streaming as i32;
    // One entry per shard or partition, from the checkpoint of the feed unit
    // reading it; a unit that reads none yet stands for itself. Consumers of
    // one Kafka group each report the whole topic: the most behind counts.
    let mut by_partition: std::collections::BTreeMap<String, PartitionLag> =
        std::collections::BTreeMap::new();
    let mut observed = i64::MAX;
    let mut units_caught_up = true;
    for feed in &feeds {
        let c = |k: &str| feed.counters.get(k).copied().unwrap_or_default();
        observed = observed.min(c("observed_ms"));
        let unit_caught_up = c("caught_up") == 1;
        units_caught_up &= unit_caught_up;
        let owner = feed
            .lease
            .as_ref()
            .filter(|_| feed.status == UnitStatus::InProgress as i32)
            .map(|l| l.owner.clone())
            .unwrap_or_default();
        let report = pipeline::feed_report(&feed.checkpoint);
        let mut entries = Vec::new();
        if let Some(report) = report.filter(|r| !r.lag.is_empty() || !r.positions.is_empty()) {
            let mut names: BTreeSet<&String> = report.positions.keys().collect();
            names.extend(report.lag.iter().map(|l| &l.partition));
            for name in names {
                let lag = report.lag.iter().find(|l| &l.partition == name);
                let (position, closed) = report.positions.get(name).cloned().unwrap_or_default();
                let records = lag.map_or(0, |l| l.records);
                let millis = i64::try_from(lag.map_or(0, |l| l.millis)).unwrap_or(i64::MAX);
                entries.push(PartitionLag {
                    partition: name.clone(),
                    records_behind: Some(i64::try_from(records).unwrap_or(i64::MAX)),
                    time_behind: Some(millis_duration(millis)),
                    caught_up: closed || (unit_caught_up && records == 0),
                    position: position.unwrap_or_default(),
                    owner: owner.clone(),
                    closed,
                });
            }
        } else {
            entries.push(PartitionLag {
                partition: feed.unit_key.clone(),
                records_behind: Some(c("lag_records")),
                time_behind: Some(millis_duration(c("lag_ms"))),
                caught_up: unit_caught_up,
                position: String::new(),
                owner,
                closed: false,
            });
        }
        for e in entries {
            match by_partition.get(&e.partition) {
                Some(have) if have.records_behind >= e.records_behind => {}
                _ => {
                    by_partition.insert(e.partition.clone(), e);
                }
            }
        }
    }
    let partitions: Vec<PartitionLag> = by_partition.into_values().collect();
    let records: i64 = partitions
        .iter()
        .map(|p| p.records_behind.unwrap_or_default())
        .sum();
    let max_time_behind = partitions
        .iter()
        .filter_map(|p| p.time_behind)
        .max_by_key(|d| (d.seconds, d.nanos));
    let caught_up = units_caught_up && partitions.iter().all(|p| p.caught_up);
    let lag = PipelineLag {
        pipeline_name: p.name.clone(),
        state: p.state,
        records_behind: Some(records),
        max_time_behind,
        caught_up: caught_up && backfill_done,
        observe_time: Some(micros_ts(observed)),
        partitions,
    };
    Ok((lag, observed))
}

fn millis_duration(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

fn duration_of(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| {
        let secs = u64::try_from(d.seconds).ok()?;
        let nanos = u32::try_from(d.nanos).ok()?;
        Some(Duration::new(secs, nanos))
    })
}

pub async fn drain(r: &Replicator, req: DrainRequest) -> Result<DrainResponse, Status> {
    let Some(timeout) = duration_of(req.timeout.as_ref())
        .filter(|t| !t.is_zero() && *t <= Duration::from_secs(3600))
    else {
        return Err(invalid_argument(vec![FieldError::new(
            "timeout",
            "required, positive and at most 1 h",
        )]));
    };
    let started = Instant::now();
    let call_ms = chrono::Utc::now().timestamp_millis();
    let mut p = get(r, &req.name).await?;
    if p.state != PipelineState::Streaming as i32 {
        return Err(Status::failed_precondition(format!(
            "pipeline {:?} is {:?}, not STREAMING: drain after the backfill, and resume a paused pipeline first",
            req.name,
            PipelineState::try_from(p.state).unwrap_or(PipelineState::Unspecified)
        )));
    }
    loop {
        let (lag, observed_ms) = lag(r, &p).await?;
        // An observation made after the call began that saw nothing
        // waiting: every change committed before the call is applied.
        if lag.caught_up && observed_ms >= call_ms {
            let elapsed = started.elapsed();
            return Ok(DrainResponse {
                lag: Some(lag),
                elapsed: Some(prost_types::Duration {
                    seconds: i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(elapsed.subsec_nanos()).unwrap_or(0),
                }),
            });
        }
        if started.elapsed() >= timeout {
            let mut metadata = HashMap::new();
            if let Some(n) = lag.records_behind {
                metadata.insert("records_behind".to_owned(), n.to_string());
            }
            let secs = lag.max_time_behind.map_or(0, |d| d.seconds);
            metadata.insert("seconds_behind".to_owned(), secs.to_string());
            return Err(Status::with_error_details(
                Code::DeadlineExceeded,
                format!(
                    "pipeline {:?} did not reach lag 0 within {timeout:?}",
                    req.name
                ),
                ErrorDetails::with_error_info("DRAIN_TIMEOUT", "tidemark.replicator.v1", metadata),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        p = get(r, &req.name).await?;
    }
}

pub async fn watch_lag(
    r: &Replicator,
    req: WatchLagRequest,
) -> Result<BoxStream<WatchLagResponse>, Status> {
    let interval = match req.interval.as_ref() {
        None => Duration::from_secs(1),
        Some(d) => duration_of(Some(d))
            .filter(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(60))
            .ok_or_else(|| {
                invalid_argument(vec![FieldError::new("interval", "100 ms to 1 min")])
            })?,
    };
    get(r, &req.name).await?;
    let r = r.clone();
    let name = req.name;
    let stream = async_stream(move |tx| async move {
        loop {
            let item = match get(&r, &name).await {
                Ok(p) => lag(&r, &p)
                    .await
                    .map(|(lag, _)| WatchLagResponse { lag: Some(lag) }),
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    });
    Ok(stream)
}

/// A response stream fed by a task that ends when the client goes away.
fn async_stream<T, F, Fut>(f: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

pub async fn repair(r: &Replicator, req: RepairRequest) -> Result<RepairResponse, Status> {
    if req.keys.is_empty() || req.keys.len() > 1000 {
        return Err(invalid_argument(vec![FieldError::new(
            "keys",
            "give 1 to 1000 keys",
        )]));
    }
    let p = get(r, &req.name).await?;
    if p.state == PipelineState::Creating as i32 {
        return Err(Status::failed_precondition(format!(
            "pipeline {:?} is still CREATING",
            req.name
        )));
    }
    let opened = pipeline::open(&r.ctx, &p)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    for s in &req.sink_names {
        if !opened.sinks.iter().any(|o| &o.name == s) {
            return Err(Status::not_found(format!(
                "pipeline {:?} has no sink {s:?}",
                req.name
            )));
        }
    }
    let mut keys = Vec::with_capacity(req.keys.len());
    for (i, k) in req.keys.iter().enumerate() {
        let key = key_from_proto(k).map_err(|e| {
            invalid_argument(vec![FieldError::new(
                format!("keys[{i}].{}", e.field),
                e.reason,
            )])
        })?;
        let names: BTreeSet<&str> = key.0.keys().map(String::as_str).collect();
        let wanted: BTreeSet<&str> = opened.source.schema.names().collect();
        if names != wanted {
            return Err(invalid_argument(vec![FieldError::new(
                format!("keys[{i}]"),
                format!("must hold exactly the key attributes {wanted:?}"),
            )]));
        }
        keys.push(key);
    }
    let (rewritten, deleted, dead) = pipeline::repair(
        &opened,
        &keys,
        &req.sink_names,
        &r.ctx.dead_letters,
        &p.name,
    )
    .await
    .map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(RepairResponse {
        rewritten_count: rewritten,
        deleted_count: deleted,
        dead_lettered_count: dead,
    })
}

pub async fn list_dead_letters(
    r: &Replicator,
    req: ListDeadLettersRequest,
) -> Result<ListDeadLettersResponse, Status> {
    let size = match req.page_size {
        0 => 100,
        n @ 1..=1000 => usize::try_from(n).unwrap_or(100),
        _ => {
            return Err(invalid_argument(vec![FieldError::new(
                "page_size",
                "0 to 1000",
            )]));
        }
    };
    let start: usize = if req.page_token.is_empty() {
        0
    } else {
        req.page_token.parse().map_err(|_| {
            invalid_argument(vec![FieldError::new(
                "page_token",
                "not a token this call issued",
            )])
        })?
    };
    let p = get(r, &req.name).await?;
    check_sink(&p, &req.sink_name)?;
    let all = r
        .ctx
        .dead_letters
        .list(&req.name, &req.sink_name)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let page: Vec<DeadLetter> = all
        .iter()
        .skip(start)
        .take(size)
        .map(|s| s.letter.clone())
        .collect();
    let next = start + page.len();
    Ok(ListDeadLettersResponse {
        dead_letters: page,
        next_page_token: if next < all.len() {
            next.to_string()
        } else {
            String::new()
        },
    })
}

fn check_sink(p: &Pipeline, sink: &str) -> Result<(), Status> {
    if sink.is_empty()
        || p.spec
            .as_ref()
            .is_some_and(|s| s.sinks.iter().any(|x| x.name == sink))
    {
        Ok(())
    } else {
        Err(Status::not_found(format!(
            "pipeline {:?} has no sink {sink:?}",
            p.name
        )))
    }
}

pub async fn replay_dead_letters(
    r: &Replicator,
    req: ReplayDeadLettersRequest,
) -> Result<ReplayDeadLettersResponse, Status> {
    if req.ids.len() > 1000 {
        return Err(invalid_argument(vec![FieldError::new(
            "ids",
            "at most 1000",
        )]));
    }
    let p = get(r, &req.name).await?;
    check_sink(&p, &req.sink_name)?;
    let opened = pipeline::open(&r.ctx, &p)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let all = r
        .ctx
        .dead_letters
        .list(&req.name, &req.sink_name)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    for id in &req.ids {
        if !all.iter().any(|s| &s.letter.id == id) {
            return Err(Status::not_found(format!(
                "no dead letter {id:?} in pipeline {:?}",
                req.name
            )));
        }
    }
    let mut response = ReplayDeadLettersResponse::default();
    let now = chrono::Utc::now().timestamp();
    let derived = u64::try_from((now - 1).max(1)).unwrap_or(1) * 1_000_000;
    for stored in all
        .iter()
        .filter(|s| req.ids.is_empty() || req.ids.contains(&s.letter.id))
    {
        let Some(sink) = opened
            .sinks
            .iter()
            .find(|s| s.name == stored.letter.sink_name)
        else {
            continue;
        };
        let source_key = stored.key.clone();
        let item = opened
            .source
            .table
            .get(&source_key)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let record = SinkRecord {
            key: sink.transform.shape_key(&source_key),
            version: stored.letter.version.max(derived),
            op: match &item {
                Some(i) => SinkOp::Upsert(sink.transform.shape(i, &opened.source.schema)),
                None => SinkOp::Delete,
            },
        };
        let outcome = sink
            .sink
            .apply(std::slice::from_ref(&record))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        match outcome.into_iter().next() {
            Some(RecordOutcome::Rejected(reason)) => {
                r.ctx
                    .dead_letters
                    .retried(stored, &reason)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                response.still_failing_count += 1;
                if response.still_failing.len() < 100 {
                    let mut letter = stored.letter.clone();
                    letter.reason = reason;
                    letter.attempts += 1;
                    response.still_failing.push(letter);
                }
            }
            _ => {
                r.ctx
                    .dead_letters
                    .remove(&req.name, &stored.letter.id)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                response.replayed_count += 1;
            }
        }
    }
    Ok(response)
}
