//! Pipeline RPCs: create, read, pause and resume pipelines (stored as the
//! spec of their REPLICATION job, so they survive restarts without a store of
//! the replicator's own). Lag and drain live in `lag`, repair and dead
//! letters in `repair`.

use std::time::Duration;

use tidemark_connectors::transform::Transform;
use tidemark_kit::error::FieldError;
use tidemark_kit::jobs::NewRun;
use tidemark_kit::worker::pack_any;
use tidemark_proto::job_tracker::v1::{Job, JobKind, ListJobsRequest, RunStatus, RunTrigger};
use tidemark_proto::replicator::v1::change_feed::Feed;
use tidemark_proto::replicator::v1::*;
use tonic::Code;

use super::checks::{Checked, check_name, check_stores, validate_spec};
use super::spec::{self, FEED_UNIT};
use crate::context::Replicator;
use crate::error::{ReplicatorError, ReplicatorResult};

fn job_name(name: &str) -> String {
    format!("pipeline/{name}")
}

/// The pipeline with its output fields filled from the job and run.
async fn view(r: &Replicator, job: &Job) -> ReplicatorResult<Pipeline> {
    let mut p = spec::decode(job).map_err(ReplicatorError::Internal)?;
    p.job_name.clone_from(&job.name);
    p.create_time = job.create_time;
    p.update_time = job.update_time;
    let run = match &job.last_run {
        Some(run) => Some(r.ctx.jobs.get_run(&run.run_id).await?),
        None => None,
    };
    if let Some(run) = &run {
        p.run_id.clone_from(&run.run_id);
        if let Some(why) = ended(run)
            && p.state != PipelineState::Paused as i32
        {
            p.state = PipelineState::Failed as i32;
            p.state_reason = why;
        }
    }
    if p.state != PipelineState::Paused as i32 && p.state != PipelineState::Failed as i32 {
        p.state = match &run {
            None => PipelineState::Creating as i32,
            Some(run) if run.status == RunStatus::Queued as i32 => {
                p.state_reason = format!(
                    "run {} is being started (QUEUED); an interrupted CreatePipeline finishes it when sent again",
                    run.run_id
                );
                PipelineState::Creating as i32
            }
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
        .count(&p.name)
        .await
        .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
        .unwrap_or_default();
    Ok(p)
}

/// Whether the feed unit's watermark backfill is still going on (it is
/// until the unit first reports otherwise).
async fn watermark_pending(r: &Replicator, run_id: &str) -> ReplicatorResult<bool> {
    let feed = feed_unit(r, run_id).await?;
    Ok(feed.counters.get(spec::BACKFILL_PENDING) != Some(&0))
}

async fn feed_unit(
    r: &Replicator,
    run_id: &str,
) -> ReplicatorResult<tidemark_proto::job_tracker::v1::Unit> {
    Ok(r.ctx
        .jobs
        .list_units(run_id, &[FEED_UNIT.to_owned()], &[])
        .await?
        .into_iter()
        .next()
        .unwrap_or_default())
}

async fn get_job(r: &Replicator, name: &str) -> ReplicatorResult<Job> {
    if name.is_empty() {
        return Err(ReplicatorError::Invalid(vec![FieldError::required("name")]));
    }
    r.ctx
        .jobs
        .find_job(&job_name(name))
        .await?
        .ok_or_else(|| ReplicatorError::NotFound(format!("no pipeline named {name:?}")))
}

pub async fn create(
    r: &Replicator,
    req: CreatePipelineRequest,
) -> ReplicatorResult<CreatePipelineResponse> {
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
        return Err(ReplicatorError::Invalid(violations));
    }
    if let Some(Feed::Kafka(k)) = spec.feed.as_ref().and_then(|f| f.feed.as_ref())
        && k.topic
            .as_ref()
            .is_some_and(|t| t.bootstrap_servers.is_empty())
        && r.ctx.config.kafka_brokers.is_none()
    {
        return Err(ReplicatorError::Invalid(vec![FieldError::new(
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
    let job = r.ctx.jobs.ensure_job(job).await.map_err(|e| {
        if e.code() == Code::AlreadyExists {
            ReplicatorError::AlreadyExists(format!(
                "a pipeline named {:?} exists with another spec",
                req.name
            ))
        } else {
            e.into()
        }
    })?;
    if needs_first_run(&job) {
        start_first_run(r, &job, &stored, &req).await?;
    }
    let job = get_job(r, &req.name).await?;
    Ok(CreatePipelineResponse {
        pipeline: Some(view(r, &job).await?),
        checks: Vec::new(),
    })
}

/// Whether CreatePipeline must (again) start the pipeline's run: it has
/// none, or its start was interrupted (the replicator killed or the
/// job-tracker unreachable between creating the run and registering its
/// units) and left it QUEUED. The start's correlation id makes the same
/// StartRun finish that run instead of starting another.
fn needs_first_run(job: &Job) -> bool {
    job.last_run
        .as_ref()
        .is_none_or(|run| run.status == RunStatus::Queued as i32)
}

/// Why the pipeline's run is over, when it is: it ended (SUCCEEDED, FAILED,
/// acknowledged or SKIPPED); a QUEUED run has not started yet.
fn ended(run: &tidemark_proto::job_tracker::v1::Run) -> Option<String> {
    let status = RunStatus::try_from(run.status).unwrap_or(RunStatus::Unspecified);
    if matches!(status, RunStatus::Running | RunStatus::Queued) {
        return None;
    }
    let reason = if run.status_reason.is_empty() {
        "(no reason recorded)"
    } else {
        run.status_reason.as_str()
    };
    Some(format!(
        "run {} ended {}: {reason}",
        run.run_id,
        status.as_str_name()
    ))
}

/// Opens every sink of a new pipeline.
async fn open_sinks(
    r: &Replicator,
    spec: &PipelineSpec,
    source_schema: &tidemark_connectors::KeySchema,
) -> ReplicatorResult<()> {
    for (i, s) in spec.sinks.iter().enumerate() {
        // Opening creates what a sink may create (an index with its mapping).
        let transform =
            Transform::from_proto(&s.transform.clone().unwrap_or_default()).unwrap_or_default();
        super::open::open_sink(&r.ctx.stores, s, source_schema, &transform, &spec.origin)
            .await
            .map_err(ReplicatorError::store_of(&format!("spec.sinks[{i}].store")))?;
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
) -> ReplicatorResult<()> {
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
    // Read before the run (and so any segment) exists.
    let first_checkpoints = super::feed::first_checkpoints(&r.ctx, stored)
        .await
        .map_err(ReplicatorError::store_of("spec.source"))?;
    r.ctx
        .jobs
        .start_run(NewRun {
            job_name: job.name.clone(),
            units,
            first_checkpoints,
            trigger: RunTrigger::Api,
            correlation_id: format!("create-{}", req.name),
            actor: if req.actor.is_empty() {
                "replicator".to_owned()
            } else {
                req.actor.clone()
            },
            ..NewRun::default()
        })
        .await?;
    Ok(())
}

/// The answer of a validate-only CreatePipeline: the pipeline as it exists
/// (same name and spec) or as it would be created.
async fn validate_only(
    r: &Replicator,
    name: &str,
    spec: PipelineSpec,
    checked: Checked,
) -> ReplicatorResult<CreatePipelineResponse> {
    let pipeline = match get_job(r, name).await {
        Ok(job) => {
            let existing = view(r, &job).await?;
            if existing.spec.as_ref() != Some(&spec) {
                return Err(ReplicatorError::AlreadyExists(format!(
                    "a pipeline named {name:?} exists with another spec"
                )));
            }
            existing
        }
        Err(ReplicatorError::NotFound(_)) => Pipeline {
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

pub async fn get(r: &Replicator, name: &str) -> ReplicatorResult<Pipeline> {
    let job = get_job(r, name).await?;
    view(r, &job).await
}

pub async fn list(
    r: &Replicator,
    req: ListPipelinesRequest,
) -> ReplicatorResult<ListPipelinesResponse> {
    let page = r
        .ctx
        .jobs
        .list_jobs(ListJobsRequest {
            kind: JobKind::Replication as i32,
            page_size: req.page_size,
            page_token: req.page_token,
        })
        .await?;
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
) -> ReplicatorResult<Pipeline> {
    let job = get_job(r, name).await?;
    let mut stored = spec::decode(&job).map_err(ReplicatorError::Internal)?;
    stored.state = state as i32;
    reason.clone_into(&mut stored.state_reason);
    r.ctx.jobs.update_spec(&job, &stored, actor).await?;
    get(r, name).await
}

pub async fn pause(
    r: &Replicator,
    req: PausePipelineRequest,
) -> ReplicatorResult<PausePipelineResponse> {
    if req.actor.is_empty() {
        return Err(ReplicatorError::Invalid(vec![FieldError::required(
            "actor",
        )]));
    }
    let current = get(r, &req.name).await?;
    if current.state == PipelineState::Failed as i32 {
        return Err(ReplicatorError::Precondition(format!(
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
) -> ReplicatorResult<ResumePipelineResponse> {
    if req.actor.is_empty() {
        return Err(ReplicatorError::Invalid(vec![FieldError::required(
            "actor",
        )]));
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

#[cfg(test)]
mod tests {
    use tidemark_proto::job_tracker::v1::{Job, Run, RunStatus};

    use super::{ended, needs_first_run};

    fn run(status: RunStatus, reason: &str) -> Run {
        Run {
            run_id: "r1".to_owned(),
            status: status as i32,
            status_reason: reason.to_owned(),
            ..Run::default()
        }
    }

    // Found by the fault matrix: the cut-over's pipeline said FAILED ("run …
    // ended" and no reason) while its run was QUEUED after an interrupted
    // start, and CreatePipeline sent again never finished that start.
    #[test]
    fn a_queued_run_has_not_ended_and_is_started_again() {
        assert_eq!(ended(&run(RunStatus::Queued, "")), None);
        assert_eq!(ended(&run(RunStatus::Running, "")), None);
        let job = |last: Option<Run>| Job {
            last_run: last,
            ..Job::default()
        };
        assert!(needs_first_run(&job(None)));
        assert!(needs_first_run(&job(Some(run(RunStatus::Queued, "")))));
        assert!(!needs_first_run(&job(Some(run(RunStatus::Running, "")))));
        assert!(!needs_first_run(&job(Some(run(RunStatus::Failed, "x")))));
    }

    #[test]
    fn an_ended_run_says_how_and_why() {
        assert_eq!(
            ended(&run(RunStatus::Failed, "2 of 3 units failed")).as_deref(),
            Some("run r1 ended RUN_STATUS_FAILED: 2 of 3 units failed")
        );
        assert_eq!(
            ended(&run(RunStatus::Skipped, "")).as_deref(),
            Some("run r1 ended RUN_STATUS_SKIPPED: (no reason recorded)")
        );
    }
}
