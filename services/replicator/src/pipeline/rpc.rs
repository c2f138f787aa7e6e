//! Pipeline RPCs: create, read, pause and resume pipelines (stored as the
//! spec of their REPLICATION job, so they survive restarts without a store of
//! the replicator's own). Lag and drain live in `lag`, repair and dead
//! letters in `repair`.

use std::time::Duration;

use tidemark_connectors::transform::Transform;
use tidemark_kit::error::{FieldError, invalid_argument};
use tidemark_kit::worker::pack_any;
use tidemark_proto::job_tracker::v1::{
    CreateJobRequest, GetJobRequest, GetRunRequest, Job, JobKind, ListJobsRequest,
    ListUnitsRequest, RunStatus, UnitSpec, UpdateJobRequest,
};
use tidemark_proto::replicator::v1::change_feed::Feed;
use tidemark_proto::replicator::v1::*;
use tonic::{Code, Status};

use super::checks::{Checked, check_name, check_stores, validate_spec};
use super::spec::{self, FEED_UNIT};
use crate::context::Replicator;
use crate::jobs::{jobs_status, store_status};

fn job_name(name: &str) -> String {
    format!("pipeline/{name}")
}

/// The pipeline with its output fields filled from the job and run.
async fn view(r: &Replicator, job: &Job) -> Result<Pipeline, Status> {
    let mut p = spec::decode(job).map_err(Status::internal)?;
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
                let watermark = spec::backfill_mode(&p) == BackfillMode::Watermark;
                let feeds = i64::try_from(spec::feed_units(&p).len()).unwrap_or(1);
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
    Ok(feed.counters.get(spec::BACKFILL_PENDING) != Some(&0))
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
    open_sinks(r, &spec, &checks.schema).await?;
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
        spec: Some(pack_any(spec::SPEC_TYPE, &stored)),
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
        start_first_run(r, &job, &stored, &req).await?;
    }
    let job = get_job(r, &req.name).await?;
    Ok(CreatePipelineResponse {
        pipeline: Some(view(r, &job).await?),
        checks: Vec::new(),
    })
}

/// Opens every sink of a new pipeline.
async fn open_sinks(
    r: &Replicator,
    spec: &PipelineSpec,
    source_schema: &tidemark_connectors::KeySchema,
) -> Result<(), Status> {
    for (i, s) in spec.sinks.iter().enumerate() {
        // Opening creates what a sink may create (an index with its mapping).
        let transform =
            Transform::from_proto(&s.transform.clone().unwrap_or_default()).unwrap_or_default();
        let schema = crate::schema::target_schema(source_schema, &transform);
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
    Ok(())
}

/// Starts the pipeline's one run: its feed units and, unless the backfill
/// reads its chunks in the feed unit, its segment units.
async fn start_first_run(
    r: &Replicator,
    job: &Job,
    stored: &Pipeline,
    req: &CreatePipelineRequest,
) -> Result<(), Status> {
    let mut units = spec::feed_units(stored);
    // Segments are units of their own, claimed by any replica, except
    // for a watermark backfill: it reads its chunks where the feed is
    // read, in the feed unit.
    if matches!(
        spec::backfill_mode(stored),
        BackfillMode::Tombstones | BackfillMode::Touch
    ) {
        units.extend(crate::context::segment_units(spec::segments(stored)));
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
    Ok(())
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
        if spec::decode(job).is_ok() {
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
    let mut stored = spec::decode(&job).map_err(Status::internal)?;
    stored.state = state as i32;
    reason.clone_into(&mut stored.state_reason);
    r.ctx
        .jobs
        .clone()
        .update_job(UpdateJobRequest {
            job: Some(Job {
                name: job.name.clone(),
                kind: job.kind,
                spec: Some(pack_any(spec::SPEC_TYPE, &stored)),
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
