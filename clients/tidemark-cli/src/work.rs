//! `tidemark backfill-attribute`, `tidemark migrate-units`, `tidemark
//! extract` and `tidemark jobs run`: start the replicator's jobs and follow
//! their runs to the end.

use std::time::Duration;

use tidemark_client::spec::{parse_duration, parse_value};
use tidemark_client::{RunOutcome, StoreSpec, Tidemark};
use tidemark_proto::common::v1 as common;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::replicator::v1 as rp;

use crate::error::{CliError, CliResult};
use crate::output::{self, Output, run_status};
use crate::progress;

#[derive(clap::Args, Debug)]
pub struct BackfillArgs {
    /// The table, e.g. dynamodb:items or sqlite:items?key=pk.
    #[arg(long)]
    table: StoreSpec,
    /// The top-level attribute to set on every item lacking it, e.g. test.
    #[arg(long)]
    attribute: String,
    /// The value: n:1, s:text, bool:true or null.
    #[arg(long, value_parser = parse_value)]
    value: tidemark_proto::common::v1::AttributeValue,
    /// Parallel scan segments (0: the replicator's 16).
    #[arg(long, default_value_t = 0)]
    segments: u32,
    /// Write capacity units per second across all workers (0: no fixed
    /// limit; throttling still backs off). `--rate` of a running job changes
    /// it within seconds.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Conditional updates in flight per segment, 1 to 256 (0: the
    /// replicator's 16): more against a distant table, fewer to leave a
    /// shared table's capacity to its other writers.
    #[arg(long, default_value_t = 0)]
    writes_in_flight: u32,
    /// The job's name; reusing one starts a new run of it. Empty: generated.
    #[arg(long, default_value = "")]
    job: String,
    #[command(flatten)]
    follow: Follow,
}

#[derive(clap::Args, Debug)]
pub struct Follow {
    /// Who starts it (recorded in the job's history).
    #[arg(long, env = "USER", default_value = "operator")]
    actor: String,
    /// Return once started instead of following the run to its end.
    #[arg(long)]
    no_wait: bool,
    /// How long to follow the run (the work goes on if this passes).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The UNIT_MIGRATION job; reruns use the same name so units MIGRATED
    /// earlier are left alone.
    #[arg(long)]
    job: String,
    /// The units to migrate (repeat, or comma-separate).
    #[arg(long = "unit", value_delimiter = ',', required = true)]
    units: Vec<String>,
    /// The source table (needed when the job does not exist yet).
    #[arg(long)]
    source: Option<StoreSpec>,
    /// The target, e.g. s3://bucket/courses/ (objects under <prefix><unit>/).
    #[arg(long)]
    target: Option<StoreSpec>,
    /// The attribute naming an item's unit, e.g. courseId.
    #[arg(long, default_value = "")]
    unit_attribute: String,
    /// The unit attribute's type.
    #[arg(long, value_enum, default_value = "string")]
    unit_type: UnitType,
    /// A global secondary index keyed by the unit attribute (else a
    /// filtered scan per unit).
    #[arg(long, default_value = "")]
    index: String,
    /// The source attribute holding item versions (empty: the read time).
    #[arg(long, default_value = "")]
    version_attribute: String,
    /// Units migrated at once across all workers.
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    #[command(flatten)]
    follow: Follow,
}

#[derive(clap::Args, Debug)]
pub struct ExtractArgs {
    /// The INCREMENTAL_EXTRACT job; running the same definition again keeps
    /// the job (and its last processed time).
    job: String,
    /// The source table, e.g. dynamodb:orders.
    #[arg(long)]
    source: StoreSpec,
    /// The target: s3://bucket/prefix/ (one object per key, plus a manifest
    /// per run under <prefix>_manifests/).
    #[arg(long)]
    target: StoreSpec,
    /// The attribute holding an item's last change time, e.g. updated_at.
    #[arg(long)]
    changed_at: String,
    /// How the change time is encoded.
    #[arg(long, value_enum)]
    encoding: Encoding,
    /// A global secondary index keyed by a partition attribute and sorted by
    /// the change time (else a filtered parallel scan).
    #[arg(long, default_value = "", requires_all = ["index_partition", "index_values"])]
    index: String,
    /// The index's partition key attribute.
    #[arg(long, default_value = "")]
    index_partition: String,
    /// Every value the index's partition key takes, e.g. n:0,n:1,n:2.
    #[arg(long, value_delimiter = ',', value_parser = parse_value)]
    index_values: Vec<tidemark_proto::common::v1::AttributeValue>,
    /// Parallel scan segments without an index (0: the replicator's 8).
    #[arg(long, default_value_t = 0)]
    segments: u32,
    /// The source attribute holding item versions (empty: the change time).
    #[arg(long, default_value = "")]
    version_attribute: String,
    /// Seconds before each run's trigger the extract stops, so writes not
    /// yet visible to the scan or index are left to the next run (unset:
    /// the replicator's 2 s).
    #[arg(long, value_name = "SECONDS")]
    settle_lag: Option<u32>,
    /// When to run, a cron expression with seconds, e.g. "0 0 * * * *"
    /// for hourly (empty: only when started).
    #[arg(long, default_value = "")]
    cron: String,
    /// The IANA time zone of --cron, e.g. Europe/Berlin (empty: UTC).
    #[arg(long, default_value = "")]
    time_zone: String,
    /// No scheduled run falls due before this RFC 3339 time, e.g.
    /// 2026-12-01T00:00:00Z (default: from now).
    #[arg(long, value_parser = parse_time)]
    start_time: Option<prost_types::Timestamp>,
    /// Start a run now and follow it.
    #[arg(long)]
    run_now: bool,
    #[command(flatten)]
    follow: Follow,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Encoding {
    /// An S attribute holding RFC 3339 text.
    Rfc3339,
    /// An N attribute holding seconds since the epoch.
    EpochSeconds,
    /// An N attribute holding milliseconds since the epoch.
    EpochMillis,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum UnitType {
    String,
    Number,
}

/// Follows a run with a progress bar; `None` with --no-wait.
async fn follow(
    client: &Tidemark,
    run_id: &str,
    what: &str,
    f: &Follow,
    out: Output,
) -> Result<Option<RunOutcome>, CliError> {
    if f.no_wait {
        return Ok(None);
    }
    let pb = progress::bar(out, what);
    let outcome = client
        .wait_run(run_id, f.timeout, |p| progress::show_run(&pb, p))
        .await;
    pb.finish_and_clear();
    Ok(Some(outcome?))
}

fn failed_run(run: &jt::Run, job: &str) -> CliError {
    CliError::failed(
        format!(
            "run {} of {job} ended {}: {}",
            run.run_id,
            run_status(run.status),
            run.status_reason
        ),
        format!(
            "`tidemark jobs show {job}` lists the failed units and why; fix the cause, then `tidemark jobs ack {job} --reason \"...\"` and run it again"
        ),
    )
}

pub async fn backfill(client: &Tidemark, a: BackfillArgs, out: Output) -> CliResult {
    let request = rp::BackfillAttributeRequest {
        job_name: a.job.clone(),
        spec: Some(rp::BackfillAttributeSpec {
            table: Some(a.table.to_proto()),
            attribute_name: a.attribute.clone(),
            value: Some(a.value.clone()),
            segments: a.segments,
            write_units_per_second: a.rate,
            writes_in_flight: a.writes_in_flight,
        }),
        actor: a.follow.actor.clone(),
        correlation_id: String::new(),
    };
    let started = client.backfill_attribute(request).await?;
    let said = format!(
        "backfilling {} on {} as job {}, run {}",
        a.attribute, a.table, started.job_name, started.run_id
    );
    follow_started(
        client,
        &started.job_name,
        &started.run_id,
        "backfill",
        &said,
        &a.follow,
        out,
    )
    .await
}

pub async fn migrate(client: &Tidemark, a: MigrateArgs, out: Output) -> CliResult {
    let spec = match (&a.source, &a.target) {
        (Some(source), Some(target)) => Some(rp::MigrateUnitSpec {
            source: Some(source.to_proto()),
            unit_attribute: a.unit_attribute.clone(),
            unit_key_type: match a.unit_type {
                UnitType::String => rp::UnitKeyType::String,
                UnitType::Number => rp::UnitKeyType::Number,
            } as i32,
            index_name: a.index.clone(),
            target: Some(target.to_proto()),
            transform: None,
            version_attribute: a.version_attribute.clone(),
        }),
        (None, None) => None,
        _ => {
            return Err(CliError::invalid(
                "--source and --target go together",
                "give both for a new job, or neither to rerun an existing one",
            ));
        }
    };
    if spec.is_some() && a.unit_attribute.is_empty() {
        return Err(CliError::invalid(
            "--unit-attribute is required with --source",
            "name the attribute that holds an item's unit, e.g. --unit-attribute courseId",
        ));
    }
    let started = client
        .migrate_units(
            &a.job,
            spec,
            a.units.clone(),
            a.concurrency,
            &a.follow.actor,
        )
        .await?;
    output::announce(out, &output::migrating(&a.job, a.units.len(), &started));
    let outcome = follow(client, &started.run_id, "migrate", &a.follow, out).await?;
    let Some(outcome) = outcome else {
        let skipped = &started.already_migrated_unit_keys;
        output::run_started(out, &a.job, &started.run_id, Some(skipped));
        return Ok(());
    };
    let jobs = client.jobs();
    let units = retried!(
        client,
        jobs,
        list_units,
        jt::ListUnitsRequest {
            run_id: started.run_id.clone(),
            page_size: 1000,
            ..Default::default()
        }
    )?
    .units;
    let run = &outcome.run;
    output::migration_finished(
        out,
        &a.job,
        run,
        &started.already_migrated_unit_keys,
        &units,
    );
    if outcome.succeeded() {
        Ok(())
    } else {
        Err(failed_run(run, &a.job))
    }
}

/// Prints a finished run (or the started one with --no-wait) and turns a
/// failed run into the operation-failed exit code.
fn report_run(job: &str, run_id: &str, outcome: Option<RunOutcome>, out: Output) -> CliResult {
    let Some(outcome) = outcome else {
        output::run_started(out, job, run_id, None);
        return Ok(());
    };
    let run = &outcome.run;
    output::run_finished(out, job, run);
    if outcome.succeeded() {
        Ok(())
    } else {
        Err(failed_run(run, job))
    }
}

pub async fn extract(client: &Tidemark, a: ExtractArgs, out: Output) -> CliResult {
    let index = (!a.index.is_empty()).then(|| rp::ChangedItemsIndex {
        index_name: a.index.clone(),
        partition_attribute: a.index_partition.clone(),
        partition_values: a.index_values.clone(),
    });
    let request = rp::CreateIncrementalExtractRequest {
        job_name: a.job.clone(),
        spec: Some(rp::IncrementalExtractSpec {
            source: Some(a.source.to_proto()),
            changed_at_attribute: a.changed_at.clone(),
            changed_at_encoding: match a.encoding {
                Encoding::Rfc3339 => common::TimeEncoding::Rfc3339,
                Encoding::EpochSeconds => common::TimeEncoding::EpochSeconds,
                Encoding::EpochMillis => common::TimeEncoding::EpochMillis,
            } as i32,
            index,
            segments: a.segments,
            target: Some(a.target.to_proto()),
            transform: None,
            version_attribute: a.version_attribute.clone(),
            settle_lag: a.settle_lag.map(|s| prost_types::Duration {
                seconds: i64::from(s),
                nanos: 0,
            }),
        }),
        schedule: (!a.cron.is_empty()).then(|| jt::Schedule {
            cron: a.cron.clone(),
            time_zone: a.time_zone.clone(),
            start_time: a.start_time,
            ..Default::default()
        }),
        run_now: a.run_now,
        actor: a.follow.actor.clone(),
    };
    let created = client.incremental_extract(request).await?;
    if !a.run_now {
        output::extract_ready(out, &created.job_name, &a.cron);
        return Ok(());
    }
    let said = format!(
        "extracting {} changed by {} as job {}, run {}",
        a.source, a.changed_at, created.job_name, created.run_id
    );
    follow_started(
        client,
        &created.job_name,
        &created.run_id,
        "extract",
        &said,
        &a.follow,
        out,
    )
    .await
}

fn parse_time(text: &str) -> Result<prost_types::Timestamp, String> {
    let t = chrono::DateTime::parse_from_rfc3339(text)
        .map_err(|e| format!("{text:?}: expected RFC 3339, e.g. 2026-12-01T00:00:00Z ({e})"))?;
    Ok(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

/// `tidemark jobs run JOB`: a run now over the job's default units.
pub async fn run_job(client: &Tidemark, job: &str, f: &Follow, out: Output) -> CliResult {
    let run = client.start_run(job, &f.actor).await?;
    let said = format!("started run {} of {job}", run.run_id);
    follow_started(client, job, &run.run_id, "run", &said, f, out).await
}

/// Says what started (text output only), follows the run and reports it.
async fn follow_started(
    client: &Tidemark,
    job: &str,
    run_id: &str,
    what: &str,
    said: &str,
    f: &Follow,
    out: Output,
) -> CliResult {
    output::announce(out, said);
    let outcome = follow(client, run_id, what, f, out).await?;
    report_run(job, run_id, outcome, out)
}
