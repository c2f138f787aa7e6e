//! CreateIncrementalExtract: validate, create the scheduled job and, when
//! asked, start its first run at once.

use tidemark_connectors::proto::value_from_proto;
use tidemark_connectors::transform::TimeEncoding;
use tidemark_kit::error::FieldError;
use tidemark_kit::worker::pack_any;
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::job_tracker::v1::{Job, JobKind};
use tidemark_proto::replicator::v1::{
    CreateIncrementalExtractRequest, CreateIncrementalExtractResponse,
};

use super::run as extract;
use crate::context::{Replicator, segment_units};
use crate::error::{ReplicatorError, ReplicatorResult};
use crate::jobs::{
    ensure_job, open_source, source_kind, start_run, store_name, transform_violation,
};

pub async fn create_incremental_extract(
    r: &Replicator,
    req: CreateIncrementalExtractRequest,
) -> ReplicatorResult<CreateIncrementalExtractResponse> {
    let mut violations = Vec::new();
    if req.job_name.is_empty() {
        violations.push(FieldError::required("job_name"));
    }
    if req.actor.trim().is_empty() {
        violations.push(FieldError::required("actor"));
    }
    let Some(spec) = req.spec else {
        violations.push(FieldError::required("spec"));
        return Err(ReplicatorError::Invalid(violations));
    };
    if let Err(e) = source_kind(spec.source.as_ref(), "spec.source") {
        violations.push(e);
    }
    if spec.changed_at_attribute.is_empty() {
        violations.push(FieldError::required("spec.changed_at_attribute"));
    }
    if let Err(e) = TimeEncoding::from_proto(spec.changed_at_encoding, "spec.changed_at_encoding") {
        violations.push(FieldError::new(e.field, e.reason));
    }
    match spec.target.as_ref().and_then(|t| t.store.as_ref()) {
        Some(Store::S3Prefix(p)) if !p.bucket.is_empty() => {}
        Some(Store::S3Prefix(_)) => {
            violations.push(FieldError::required("spec.target.s3_prefix.bucket"));
        }
        Some(_) => violations.push(FieldError::new("spec.target", "must be an s3_prefix")),
        None => violations.push(FieldError::required("spec.target")),
    }
    if spec.segments > 1000 {
        violations.push(FieldError::new("spec.segments", "1 to 1000 (0 means 8)"));
    }
    if spec.settle_lag.is_some_and(|d| {
        d.seconds < 0
            || d.nanos < 0
            || extract::settle_lag_micros(&spec) > extract::MAX_SETTLE_LAG_MICROS
    }) {
        violations.push(FieldError::new(
            "spec.settle_lag",
            "0 to 1 h (unset means 2 s)",
        ));
    }
    if let Some(index) = &spec.index {
        if index.index_name.is_empty() {
            violations.push(FieldError::required("spec.index.index_name"));
        }
        if index.partition_attribute.is_empty() {
            violations.push(FieldError::required("spec.index.partition_attribute"));
        }
        if index.partition_values.is_empty() || index.partition_values.len() > 1000 {
            violations.push(FieldError::new(
                "spec.index.partition_values",
                "give 1 to 1000 values",
            ));
        }
        for (i, v) in index.partition_values.iter().enumerate() {
            if let Err(e) = value_from_proto(v) {
                violations.push(FieldError::new(
                    format!("spec.index.partition_values[{i}]"),
                    e.reason,
                ));
            }
        }
        if !matches!(
            spec.source.as_ref().and_then(|s| s.store.as_ref()),
            Some(Store::DynamodbTable(_))
        ) {
            violations.push(FieldError::new(
                "spec.index",
                "an index can only be queried on a dynamodb_table source",
            ));
        }
    }
    violations.extend(transform_violation(
        spec.transform.as_ref(),
        spec.target.as_ref(),
    ));
    if !violations.is_empty() {
        return Err(ReplicatorError::Invalid(violations));
    }
    let source = spec.source.clone().unwrap_or_default();
    open_source(r, &source, "spec.source").await?;
    let units = segment_units(extract::segments(&spec));
    let job = ensure_job(
        r,
        Job {
            name: req.job_name.clone(),
            kind: JobKind::IncrementalExtract as i32,
            description: format!(
                "extract items of {} changed since the last run by {}",
                store_name(&source),
                spec.changed_at_attribute
            ),
            spec: Some(pack_any(extract::SPEC_TYPE, &spec)),
            schedule: req.schedule,
            default_unit_keys: units.clone(),
            explicit_completion: true,
            max_attempts: 3,
            ..Job::default()
        },
    )
    .await?;
    let run_id = if req.run_now {
        start_run(r, &job.name, units, &req.actor, "", false).await?
    } else {
        String::new()
    };
    Ok(CreateIncrementalExtractResponse {
        job_name: job.name,
        run_id,
    })
}
