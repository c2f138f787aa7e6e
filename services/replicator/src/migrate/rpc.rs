//! MigrateUnit: validate, create (or reuse) the job, start a run of the given
//! units and say which of them were already migrated by an earlier run.

use prost::Message as _;
use tidemark_kit::error::FieldError;
use tidemark_kit::jobs::spec_of;
use tidemark_kit::worker::pack_any;
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::job_tracker::v1::{Job, JobKind, UnitStatus};
use tidemark_proto::replicator::v1::{MigrateUnitRequest, MigrateUnitResponse, MigrateUnitSpec};

use super::run as migrate;
use crate::context::Replicator;
use crate::error::{ReplicatorError, ReplicatorResult};
use crate::jobs::{
    ensure_job, open_source, source_kind, start_run, store_name, transform_violation,
};

fn validate_migrate_spec(spec: &MigrateUnitSpec) -> Vec<FieldError> {
    let mut violations = Vec::new();
    if let Err(e) = source_kind(spec.source.as_ref(), "spec.source") {
        violations.push(e);
    }
    if spec.unit_attribute.is_empty() {
        violations.push(FieldError::required("spec.unit_attribute"));
    }
    if !spec.index_name.is_empty()
        && !matches!(
            spec.source.as_ref().and_then(|s| s.store.as_ref()),
            Some(Store::DynamodbTable(_))
        )
    {
        violations.push(FieldError::new(
            "spec.index_name",
            "an index can only be queried on a dynamodb_table source",
        ));
    }
    match spec.target.as_ref().and_then(|t| t.store.as_ref()) {
        Some(Store::S3Prefix(p)) if p.bucket.is_empty() => {
            violations.push(FieldError::required("spec.target.s3_prefix.bucket"));
        }
        Some(Store::ElasticsearchIndex(i)) if i.index.is_empty() => {
            violations.push(FieldError::required(
                "spec.target.elasticsearch_index.index",
            ));
        }
        Some(Store::S3Prefix(_) | Store::ElasticsearchIndex(_)) => {}
        Some(Store::DynamodbTable(_) | Store::SqliteTable(_)) => {
            if let Err(e) = source_kind(spec.target.as_ref(), "spec.target") {
                violations.push(e);
            }
        }
        Some(Store::KafkaTopic(_)) => violations.push(FieldError::new(
            "spec.target",
            "must be an s3_prefix, dynamodb_table, sqlite_table or elasticsearch_index",
        )),
        None => violations.push(FieldError::required("spec.target")),
    }
    violations.extend(transform_violation(
        spec.transform.as_ref(),
        spec.target.as_ref(),
    ));
    violations
}

pub async fn migrate_unit(
    r: &Replicator,
    req: MigrateUnitRequest,
) -> ReplicatorResult<MigrateUnitResponse> {
    let violations = validate_request(&req);
    if !violations.is_empty() {
        return Err(ReplicatorError::Invalid(violations));
    }
    let concurrency = if req.concurrency == 0 {
        4
    } else {
        req.concurrency
    };
    let job = stored_job(r, &req, concurrency).await?;
    if job.max_concurrent_units != concurrency {
        let change = Job {
            name: job.name.clone(),
            kind: job.kind,
            max_concurrent_units: concurrency,
            ..Job::default()
        };
        r.ctx
            .jobs
            .update_job(change, &["max_concurrent_units"], 0, &req.actor)
            .await?;
    }
    let run_id = start_run(
        r,
        &job.name,
        req.unit_keys.clone(),
        &req.actor,
        &req.correlation_id,
        req.force_remigrate,
    )
    .await?;
    let already = if req.force_remigrate {
        Vec::new()
    } else {
        already_migrated(r, &run_id).await?
    };
    Ok(MigrateUnitResponse {
        job_name: job.name,
        run_id,
        already_migrated_unit_keys: already,
    })
}

/// Every field error of the request, the spec's included.
fn validate_request(req: &MigrateUnitRequest) -> Vec<FieldError> {
    let mut violations = Vec::new();
    if req.job_name.is_empty() {
        violations.push(FieldError::required("job_name"));
    }
    if req.actor.trim().is_empty() {
        violations.push(FieldError::required("actor"));
    }
    if req.unit_keys.is_empty() || req.unit_keys.len() > 10_000 {
        violations.push(FieldError::new("unit_keys", "give 1 to 10000 unit keys"));
    }
    for (i, k) in req.unit_keys.iter().enumerate() {
        if k.is_empty() || k.contains('/') {
            violations.push(FieldError::new(
                format!("unit_keys[{i}]"),
                "a unit key must be non-empty and contain no '/' (it names the unit's folder)",
            ));
        }
    }
    if req.concurrency > 1000 {
        violations.push(FieldError::new("concurrency", "1 to 1000 (0 means 4)"));
    }
    if let Some(spec) = &req.spec {
        violations.extend(validate_migrate_spec(spec));
        if let Ok(v) = spec.unit_key_type.try_into()
            && matches!(v, tidemark_proto::replicator::v1::UnitKeyType::Number)
        {
            for (i, k) in req.unit_keys.iter().enumerate() {
                if let Err(e) = migrate::unit_value(spec, k) {
                    violations.push(FieldError::new(format!("unit_keys[{i}]"), e));
                }
            }
        }
    }
    violations
}

/// The job to run: the stored one (its spec must equal a given spec), or a
/// new one created from the spec.
async fn stored_job(
    r: &Replicator,
    req: &MigrateUnitRequest,
    concurrency: u32,
) -> ReplicatorResult<Job> {
    let existing = r
        .ctx
        .jobs
        .find_job(&req.job_name)
        .await
        .map_err(|e| crate::jobs::as_job_name(e, "name"))?;
    Ok(match existing {
        Some(job) => {
            let stored: MigrateUnitSpec = spec_of(&job)?;
            if let Some(spec) = &req.spec
                && spec.encode_to_vec() != stored.encode_to_vec()
            {
                return Err(ReplicatorError::Precondition(format!(
                    "job {:?} exists with another spec; omit spec to rerun it or pick another job name",
                    req.job_name
                )));
            }
            job
        }
        None => {
            let Some(spec) = &req.spec else {
                return Err(ReplicatorError::Invalid(vec![FieldError::new(
                    "spec",
                    format!("required: job {:?} does not exist yet", req.job_name),
                )]));
            };
            let source = spec.source.clone().unwrap_or_default();
            open_source(r, &source, "spec.source").await?;
            ensure_job(
                r,
                Job {
                    name: req.job_name.clone(),
                    kind: JobKind::UnitMigration as i32,
                    description: format!(
                        "migrate units of {} by {}",
                        store_name(&source),
                        spec.unit_attribute
                    ),
                    spec: Some(pack_any(migrate::SPEC_TYPE, spec)),
                    max_attempts: 3,
                    max_concurrent_units: concurrency,
                    ..Job::default()
                },
            )
            .await?
        }
    })
}

/// The run's units the job-tracker registered MIGRATED when the run
/// started.
async fn already_migrated(r: &Replicator, run_id: &str) -> ReplicatorResult<Vec<String>> {
    let migrated = r
        .ctx
        .jobs
        .list_units(run_id, &[], &[UnitStatus::Migrated])
        .await?;
    // Units MIGRATED this early were registered so by the job-tracker
    // (done in an earlier run), not by a worker of this run.
    let already = migrated
        .into_iter()
        .filter(|u| u.attempts == 0)
        .map(|u| u.unit_key)
        .collect();
    Ok(already)
}
