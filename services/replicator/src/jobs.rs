//! What the RPCs that start one-shot jobs (BackfillAttribute, MigrateUnit,
//! CreateIncrementalExtract) and pipelines share: source checks, creating a
//! job and starting its run.
//! The handlers themselves live with their operation (`*/rpc.rs`).

use tidemark_connectors::transform::Transform;
use tidemark_kit::ServiceError;
use tidemark_kit::error::FieldError;
use tidemark_kit::jobs::NewRun;
use tidemark_proto::common::v1::DataStore;
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::job_tracker::v1::{Job, RunTrigger};

use crate::context::Replicator;
use crate::error::{ReplicatorError, ReplicatorResult};
use crate::stores::OpenTable;

pub fn source_kind(store: Option<&DataStore>, field: &str) -> Result<(), FieldError> {
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

pub async fn open_source(
    r: &Replicator,
    store: &DataStore,
    field: &str,
) -> ReplicatorResult<OpenTable> {
    r.ctx
        .stores
        .table(store)
        .await
        .map_err(ReplicatorError::store_of(field))
}

pub fn store_name(store: &DataStore) -> String {
    match &store.store {
        Some(Store::DynamodbTable(t)) => t.table_name.clone(),
        Some(Store::SqliteTable(t)) => t.table_name.clone(),
        _ => "table".to_owned(),
    }
}

/// Creates the job if it does not exist (an identical definition is
/// accepted as is) and returns the stored job. The RPCs that call this take
/// the job's name as `job_name`: the job-tracker's refusal of it (on its
/// own field, `job.name`) is moved onto that field, so the caller is told
/// which of its fields to fix.
pub async fn ensure_job(r: &Replicator, job: Job) -> ReplicatorResult<Job> {
    r.ctx
        .jobs
        .ensure_job(job)
        .await
        .map_err(|e| as_job_name(e, "job.name").into())
}

/// `e` with the job-tracker's violation of the job's name (its field
/// `upstream`: `name` for GetJob, `job.name` for CreateJob) named
/// `job_name`, the field of the replicator's requests; other violations
/// and errors as they are.
pub fn as_job_name(e: ServiceError, upstream: &str) -> ServiceError {
    if !e.violations().iter().any(|v| v.field == upstream) {
        return e;
    }
    ServiceError::invalid(
        e.violations()
            .iter()
            .map(|v| {
                let field = if v.field == upstream {
                    "job_name"
                } else {
                    v.field.as_str()
                };
                FieldError::new(field, v.description.clone())
            })
            .collect(),
    )
}

pub async fn start_run(
    r: &Replicator,
    job_name: &str,
    units: Vec<String>,
    actor: &str,
    correlation_id: &str,
    force_remigrate: bool,
) -> ReplicatorResult<String> {
    let run = r
        .ctx
        .jobs
        .start_run(NewRun {
            job_name: job_name.to_owned(),
            units,
            trigger: RunTrigger::Api,
            correlation_id: correlation_id.to_owned(),
            actor: actor.to_owned(),
            force_remigrate,
            ..NewRun::default()
        })
        .await?;
    Ok(run.run_id)
}

pub fn generated_name(prefix: &str, table: &str) -> String {
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
    // Job names are at most 200 characters; a table's name can be longer.
    let safe: String = safe.chars().take(GENERATED_TABLE_CHARS).collect();
    format!("{prefix}/{safe}/{}", uuid::Uuid::now_v7().simple())
}

/// Of a table's name, what a generated job name keeps: with a prefix and
/// the 32-digit id it stays within a job name's 200 characters.
const GENERATED_TABLE_CHARS: usize = 128;

/// What is wrong with a job's transform for its target, if anything.
pub fn transform_violation(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_job_name_names_the_requests_field() {
        // BackfillAttribute with a 1 MB job_name answered a violation on
        // `job.name`, a field the request does not have (e2e RPC fuzzer).
        let upstream = ServiceError::invalid(vec![
            FieldError::new("job.name", "must be at most 200 characters"),
            FieldError::new("job.description", "too long"),
        ]);
        let e = as_job_name(upstream, "job.name");
        let fields: Vec<&str> = e.violations().iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["job_name", "job.description"]);
        assert_eq!(
            e.violations()[0].description,
            "must be at most 200 characters"
        );
        let other = as_job_name(ServiceError::not_found("no job"), "job.name");
        assert_eq!(other.code(), tonic::Code::NotFound);
    }

    #[test]
    fn a_generated_job_name_fits_whatever_the_tables_name() {
        let long = "t".repeat(255);
        let name = generated_name("backfill", &long);
        assert!(name.len() <= 200, "{} characters: {name}", name.len());
        assert!(name.starts_with("backfill/ttt"), "{name}");
    }
}
