//! BackfillAttribute and SetBackfillRate: validate, create the job and its
//! run in the job-tracker, return the run id at once (workers do the rest,
//! by pull); change a running backfill's write rate.

use tidemark_connectors::proto::value_from_proto;
use tidemark_kit::error::FieldError;
use tidemark_kit::jobs::spec_of;
use tidemark_kit::worker::pack_any;
use tidemark_proto::job_tracker::v1::{Job, JobKind};
use tidemark_proto::replicator::v1::{
    BackfillAttributeRequest, BackfillAttributeResponse, BackfillAttributeSpec,
    SetBackfillRateRequest, SetBackfillRateResponse,
};

use super::run as backfill;
use crate::context::{MAX_WRITES_IN_FLIGHT, Replicator, segment_units};
use crate::error::{ReplicatorError, ReplicatorResult};
use crate::jobs::{
    as_job_name, ensure_job, generated_name, open_source, source_kind, start_run, store_name,
};

pub async fn backfill_attribute(
    r: &Replicator,
    req: BackfillAttributeRequest,
) -> ReplicatorResult<BackfillAttributeResponse> {
    let mut violations = Vec::new();
    if req.actor.trim().is_empty() {
        violations.push(FieldError::required("actor"));
    }
    let Some(spec) = req.spec else {
        violations.push(FieldError::required("spec"));
        return Err(ReplicatorError::Invalid(violations));
    };
    if let Err(e) = source_kind(spec.table.as_ref(), "spec.table") {
        violations.push(e);
    }
    if spec.attribute_name.is_empty() {
        violations.push(FieldError::required("spec.attribute_name"));
    }
    match spec.value.as_ref().map(value_from_proto) {
        None => violations.push(FieldError::required("spec.value")),
        Some(Err(e)) => violations.push(FieldError::new(
            if e.field.is_empty() {
                "spec.value".to_owned()
            } else {
                format!("spec.value.{}", e.field)
            },
            e.reason,
        )),
        Some(Ok(_)) => {}
    }
    if spec.segments > 1000 {
        violations.push(FieldError::new(
            "spec.segments",
            "at most 1000 (0 means 16)",
        ));
    }
    if spec.writes_in_flight > MAX_WRITES_IN_FLIGHT {
        violations.push(FieldError::new(
            "spec.writes_in_flight",
            format!(
                "at most {MAX_WRITES_IN_FLIGHT} (0 means {})",
                backfill::IN_FLIGHT
            ),
        ));
    }
    if !violations.is_empty() {
        return Err(ReplicatorError::Invalid(violations));
    }
    let table_ref = spec.table.clone().unwrap_or_default();
    let table = open_source(r, &table_ref, "spec.table").await?;
    if table.schema.names().any(|n| n == spec.attribute_name) {
        return Err(ReplicatorError::Invalid(vec![FieldError::new(
            "spec.attribute_name",
            format!(
                "{:?} is a key attribute of the table; backfill a non-key attribute",
                spec.attribute_name
            ),
        )]));
    }
    let job_name = if req.job_name.is_empty() {
        generated_name("backfill", &store_name(&table_ref))
    } else {
        req.job_name.clone()
    };
    let units = segment_units(backfill::segments(&spec));
    let job = ensure_job(
        r,
        Job {
            name: job_name.clone(),
            kind: JobKind::BackfillAttribute as i32,
            description: format!(
                "set {} on every item of {} lacking it",
                spec.attribute_name,
                store_name(&table_ref)
            ),
            spec: Some(pack_any(backfill::SPEC_TYPE, &spec)),
            default_unit_keys: units.clone(),
            max_attempts: 5,
            ..Job::default()
        },
    )
    .await?;
    let run_id = start_run(r, &job.name, units, &req.actor, &req.correlation_id, false).await?;
    Ok(BackfillAttributeResponse { job_name, run_id })
}

pub async fn set_backfill_rate(
    r: &Replicator,
    req: SetBackfillRateRequest,
) -> ReplicatorResult<SetBackfillRateResponse> {
    let mut violations = Vec::new();
    if req.job_name.is_empty() {
        violations.push(FieldError::required("job_name"));
    }
    if req.actor.trim().is_empty() {
        violations.push(FieldError::required("actor"));
    }
    if !violations.is_empty() {
        return Err(ReplicatorError::Invalid(violations));
    }
    // The job-tracker names its own field (`name`); the caller's is `job_name`.
    let job = r
        .ctx
        .jobs
        .get_job(&req.job_name)
        .await
        .map_err(|e| as_job_name(e, "name"))?;
    if job.kind != JobKind::BackfillAttribute as i32 {
        return Err(ReplicatorError::Precondition(format!(
            "job {:?} is not a BACKFILL_ATTRIBUTE job",
            req.job_name
        )));
    }
    let mut spec: BackfillAttributeSpec = spec_of(&job)?;
    spec.write_units_per_second = req.write_units_per_second;
    let updated = r.ctx.jobs.update_spec(&job, &spec, &req.actor).await?;
    Ok(SetBackfillRateResponse {
        write_units_per_second: spec.write_units_per_second,
        job_revision: updated.revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_kit::ServiceError;

    #[test]
    fn a_bad_job_name_from_the_job_tracker_names_job_name() {
        // SetBackfillRate passed the job-tracker's violation on `name`
        // through, naming no field of its own request (e2e RPC fuzzer).
        let upstream = ServiceError::field("name", "must be at most 200 characters");
        let e = as_job_name(upstream, "name");
        assert_eq!(e.violations()[0].field, "job_name");
        assert_eq!(
            e.violations()[0].description,
            "must be at most 200 characters"
        );
        let missing = as_job_name(ServiceError::not_found("no job"), "name");
        assert_eq!(missing.violations().len(), 0);
        assert_eq!(missing.code(), tonic::Code::NotFound);
    }
}
