//! The RPCs that start one-shot jobs (BackfillAttribute, MigrateUnit,
//! CreateIncrementalExtract) and
//! change them (SetBackfillRate): validate, create the job and its run in the
//! job-tracker, return the run id at once. Workers do the rest (work by pull).

use prost::Message as _;
use tidemark_connectors::ConnectorError;
use tidemark_connectors::proto::value_from_proto;
use tidemark_connectors::transform::TimeEncoding;
use tidemark_connectors::transform::Transform;
use tidemark_kit::error::{FieldError, invalid_argument};
use tidemark_kit::worker::{pack_any, unpack_any};
use tidemark_proto::common::v1::DataStore;
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::job_tracker::v1::{
    CreateJobRequest, GetJobRequest, Job, JobKind, ListUnitsRequest, RunTrigger, StartRunRequest,
    UnitSpec, UnitStatus, UpdateJobRequest,
};
use tidemark_proto::replicator::v1::{
    BackfillAttributeRequest, BackfillAttributeResponse, BackfillAttributeSpec,
    CreateIncrementalExtractRequest, CreateIncrementalExtractResponse, MigrateUnitRequest,
    MigrateUnitResponse, MigrateUnitSpec, SetBackfillRateRequest, SetBackfillRateResponse,
};
use tonic::{Code, Status};

use crate::context::segment_units;
use crate::stores::OpenTable;
use crate::{Replicator, backfill, extract, migrate};

/// Maps a store error met while validating a request.
pub fn store_status(e: &ConnectorError, field: &str) -> Status {
    match e {
        ConnectorError::NotFound { message, .. } => {
            Status::not_found(format!("{field}: {message}"))
        }
        ConnectorError::InvalidInput { message, .. } => {
            invalid_argument(vec![FieldError::new(field, message.clone())])
        }
        ConnectorError::Retryable { .. } => Status::unavailable(format!("{field}: {e}")),
        ConnectorError::Precondition(m) => Status::failed_precondition(format!("{field}: {m}")),
        _ => Status::internal(format!("{field}: {e}")),
    }
}

fn source_kind(store: Option<&DataStore>, field: &str) -> Result<(), FieldError> {
    match store.and_then(|s| s.store.as_ref()) {
        Some(Store::DynamodbTable(t)) if !t.table_name.is_empty() => Ok(()),
        Some(Store::SqliteTable(t)) if !t.table_name.is_empty() => Ok(()),
        Some(Store::DynamodbTable(_)) => Err(FieldError::required(format!(
            "{field}.dynamodb_table.table_name"
        ))),
        Some(Store::SqliteTable(_)) => Err(FieldError::required(format!(
            "{field}.sqlite_table.table_name"
        ))),
        Some(_) => Err(FieldError::new(
            field,
            "must be a dynamodb_table or a sqlite_table",
        )),
        None => Err(FieldError::required(field)),
    }
}

async fn open_source(r: &Replicator, store: &DataStore, field: &str) -> Result<OpenTable, Status> {
    r.ctx
        .stores
        .table(store)
        .await
        .map_err(|e| store_status(&e, field))
}

pub fn store_name(store: &DataStore) -> String {
    match &store.store {
        Some(Store::DynamodbTable(t)) => t.table_name.clone(),
        Some(Store::SqliteTable(t)) => t.table_name.clone(),
        _ => "table".to_owned(),
    }
}

pub fn jobs_status(s: Status) -> Status {
    // The job-tracker's answers already name the job and say what to do;
    // only an unreachable job-tracker needs context.
    if s.code() == Code::Unavailable {
        Status::unavailable(format!("job-tracker unavailable: {}", s.message()))
    } else {
        s
    }
}

/// Creates the job if it does not exist (an identical definition is
/// accepted as is) and returns the stored job.
async fn ensure_job(r: &Replicator, job: Job) -> Result<Job, Status> {
    let created = r
        .ctx
        .jobs
        .clone()
        .create_job(CreateJobRequest { job: Some(job) })
        .await
        .map_err(jobs_status)?;
    Ok(created.into_inner().job.unwrap_or_default())
}

async fn start_run(
    r: &Replicator,
    job_name: &str,
    units: Vec<String>,
    actor: &str,
    correlation_id: &str,
    force_remigrate: bool,
) -> Result<String, Status> {
    let run = r
        .ctx
        .jobs
        .clone()
        .start_run(StartRunRequest {
            job_name: job_name.to_owned(),
            units: units
                .into_iter()
                .map(|unit_key| UnitSpec {
                    unit_key,
                    after_unit_keys: Vec::new(),
                })
                .collect(),
            trigger: RunTrigger::Api as i32,
            correlation_id: correlation_id.to_owned(),
            actor: actor.to_owned(),
            reason: String::new(),
            force_remigrate,
            window_start: None,
        })
        .await
        .map_err(jobs_status)?;
    Ok(run.into_inner().run.unwrap_or_default().run_id)
}

fn generated_name(prefix: &str, table: &str) -> String {
    let safe: String = table
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{prefix}/{safe}/{}", uuid::Uuid::now_v7().simple())
}

pub async fn backfill_attribute(
    r: &Replicator,
    req: BackfillAttributeRequest,
) -> Result<BackfillAttributeResponse, Status> {
    let mut violations = Vec::new();
    if req.actor.trim().is_empty() {
        violations.push(FieldError::required("actor"));
    }
    let Some(spec) = req.spec else {
        violations.push(FieldError::required("spec"));
        return Err(invalid_argument(violations));
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
    if !violations.is_empty() {
        return Err(invalid_argument(violations));
    }
    let table_ref = spec.table.clone().unwrap_or_default();
    let table = open_source(r, &table_ref, "spec.table").await?;
    if table.schema.names().any(|n| n == spec.attribute_name) {
        return Err(invalid_argument(vec![FieldError::new(
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
) -> Result<SetBackfillRateResponse, Status> {
    let mut violations = Vec::new();
    if req.job_name.is_empty() {
        violations.push(FieldError::required("job_name"));
    }
    if req.actor.trim().is_empty() {
        violations.push(FieldError::required("actor"));
    }
    if !violations.is_empty() {
        return Err(invalid_argument(violations));
    }
    let job = r
        .ctx
        .jobs
        .clone()
        .get_job(GetJobRequest {
            name: req.job_name.clone(),
        })
        .await
        .map_err(jobs_status)?
        .into_inner()
        .job
        .unwrap_or_default();
    if job.kind != JobKind::BackfillAttribute as i32 {
        return Err(Status::failed_precondition(format!(
            "job {:?} is not a BACKFILL_ATTRIBUTE job",
            req.job_name
        )));
    }
    let mut spec: BackfillAttributeSpec =
        unpack_any(job.spec.as_ref(), backfill::SPEC_TYPE).map_err(Status::failed_precondition)?;
    spec.write_units_per_second = req.write_units_per_second;
    let updated = r
        .ctx
        .jobs
        .clone()
        .update_job(UpdateJobRequest {
            job: Some(Job {
                name: job.name.clone(),
                kind: job.kind,
                spec: Some(pack_any(backfill::SPEC_TYPE, &spec)),
                ..Job::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["spec".to_owned()],
            }),
            expected_revision: job.revision,
            actor: req.actor,
        })
        .await
        .map_err(jobs_status)?
        .into_inner()
        .job
        .unwrap_or_default();
    Ok(SetBackfillRateResponse {
        write_units_per_second: spec.write_units_per_second,
        job_revision: updated.revision,
    })
}

/// What is wrong with a job's transform for its target, if anything.
fn transform_violation(
    transform: Option<&tidemark_proto::common::v1::Transform>,
    target: Option<&DataStore>,
) -> Option<FieldError> {
    let t = transform?;
    if let Err(e) = Transform::from_proto(t) {
        return Some(FieldError::new(
            format!("spec.transform.{}", e.field),
            e.reason,
        ));
    }
    (!t.document_id_template.is_empty()
        && matches!(
            target.and_then(|s| s.store.as_ref()),
            Some(Store::S3Prefix(_))
        ))
    .then(|| {
        FieldError::new(
            "spec.transform.document_id_template",
            crate::stores::S3_TEMPLATE,
        )
    })
}

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
) -> Result<MigrateUnitResponse, Status> {
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
    if !violations.is_empty() {
        return Err(invalid_argument(violations));
    }
    let existing = match r
        .ctx
        .jobs
        .clone()
        .get_job(GetJobRequest {
            name: req.job_name.clone(),
        })
        .await
    {
        Ok(j) => j.into_inner().job,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => return Err(jobs_status(s)),
    };
    let concurrency = if req.concurrency == 0 {
        4
    } else {
        req.concurrency
    };
    let job = match existing {
        Some(job) => {
            let stored: MigrateUnitSpec = unpack_any(job.spec.as_ref(), migrate::SPEC_TYPE)
                .map_err(Status::failed_precondition)?;
            if let Some(spec) = &req.spec
                && spec.encode_to_vec() != stored.encode_to_vec()
            {
                return Err(Status::failed_precondition(format!(
                    "job {:?} exists with another spec; omit spec to rerun it or pick another job name",
                    req.job_name
                )));
            }
            job
        }
        None => {
            let Some(spec) = &req.spec else {
                return Err(invalid_argument(vec![FieldError::new(
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
    };
    if job.max_concurrent_units != concurrency {
        r.ctx
            .jobs
            .clone()
            .update_job(UpdateJobRequest {
                job: Some(Job {
                    name: job.name.clone(),
                    kind: job.kind,
                    max_concurrent_units: concurrency,
                    ..Job::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["max_concurrent_units".to_owned()],
                }),
                expected_revision: 0,
                actor: req.actor.clone(),
            })
            .await
            .map_err(jobs_status)?;
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
    let mut already = Vec::new();
    if !req.force_remigrate {
        let mut page_token = String::new();
        loop {
            let page = r
                .ctx
                .jobs
                .clone()
                .list_units(ListUnitsRequest {
                    run_id: run_id.clone(),
                    statuses: vec![UnitStatus::Migrated as i32],
                    unit_keys: Vec::new(),
                    page_size: 1000,
                    page_token,
                })
                .await
                .map_err(jobs_status)?
                .into_inner();
            // Units MIGRATED this early were registered so by the job-tracker
            // (done in an earlier run), not by a worker of this run.
            already.extend(
                page.units
                    .into_iter()
                    .filter(|u| u.attempts == 0)
                    .map(|u| u.unit_key),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
    }
    Ok(MigrateUnitResponse {
        job_name: job.name,
        run_id,
        already_migrated_unit_keys: already,
    })
}

pub async fn create_incremental_extract(
    r: &Replicator,
    req: CreateIncrementalExtractRequest,
) -> Result<CreateIncrementalExtractResponse, Status> {
    let mut violations = Vec::new();
    if req.job_name.is_empty() {
        violations.push(FieldError::required("job_name"));
    }
    if req.actor.trim().is_empty() {
        violations.push(FieldError::required("actor"));
    }
    let Some(spec) = req.spec else {
        violations.push(FieldError::required("spec"));
        return Err(invalid_argument(violations));
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
        return Err(invalid_argument(violations));
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
