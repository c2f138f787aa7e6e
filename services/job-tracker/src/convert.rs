//! Conversions between the protobuf API and the domain: `From<Domain>` for
//! responses, validating `TryFrom`-style functions for requests that name
//! the offending field.

use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use tidemark_kit::FieldError;
use tidemark_kit::error::non_empty;
use tidemark_proto::job_tracker::v1 as pb;

use crate::engine::{NewJob, UnitSpec};
use crate::model::{
    self, Job, JobKind, Lease, Progress, Route, RouteTarget, Run, RunStatus, RunTrigger, RunView,
    Schedule, Spec, Transition, Unit, UnitCounts, UnitStatus, Watermark,
};

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    t.map(timestamp)
}

pub fn from_timestamp(
    t: &prost_types::Timestamp,
    field: &str,
) -> Result<DateTime<Utc>, FieldError> {
    Utc.timestamp_opt(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        .single()
        .ok_or_else(|| FieldError::new(field, "is not a valid timestamp"))
}

pub fn from_duration(
    d: Option<&prost_types::Duration>,
    field: &str,
    default: Duration,
) -> Result<Duration, FieldError> {
    match d {
        None => Ok(default),
        Some(d) if d.seconds < 0 || d.nanos < 0 => {
            Err(FieldError::new(field, "must not be negative"))
        }
        Some(d) => Ok(Duration::new(
            d.seconds.unsigned_abs(),
            d.nanos.unsigned_abs(),
        )),
    }
}

/// The lease lengths the API allows (proto: "1 s to 10 min"): a longer one
/// would only delay the takeover of a dead worker's unit, and an unbounded
/// one overflowed the expiry time.
const LEASES: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(600);

/// A request's `lease_duration`: unset is `default`; outside [`LEASES`] is
/// refused naming the field.
///
/// # Errors
/// A violation of `lease_duration`.
pub fn lease_duration(
    d: Option<&prost_types::Duration>,
    default: Duration,
) -> Result<Duration, FieldError> {
    let lease = from_duration(d, "lease_duration", default)?;
    if !LEASES.contains(&lease) {
        return Err(FieldError::new("lease_duration", "must be 1s to 10min"));
    }
    Ok(lease)
}

fn duration(d: chrono::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.num_seconds(),
        nanos: d.subsec_nanos(),
    }
}

pub fn kind_from(value: i32, field: &str) -> Result<JobKind, FieldError> {
    match pb::JobKind::try_from(value) {
        Ok(pb::JobKind::BackfillAttribute) => Ok(JobKind::BackfillAttribute),
        Ok(pb::JobKind::UnitMigration) => Ok(JobKind::UnitMigration),
        Ok(pb::JobKind::IncrementalExtract) => Ok(JobKind::IncrementalExtract),
        Ok(pb::JobKind::Replication) => Ok(JobKind::Replication),
        Ok(pb::JobKind::Verification) => Ok(JobKind::Verification),
        _ => Err(FieldError::new(
            field,
            "must be a JobKind such as JOB_KIND_UNIT_MIGRATION",
        )),
    }
}

pub fn kind_to(kind: JobKind) -> pb::JobKind {
    match kind {
        JobKind::BackfillAttribute => pb::JobKind::BackfillAttribute,
        JobKind::UnitMigration => pb::JobKind::UnitMigration,
        JobKind::IncrementalExtract => pb::JobKind::IncrementalExtract,
        JobKind::Replication => pb::JobKind::Replication,
        JobKind::Verification => pb::JobKind::Verification,
    }
}

pub fn run_status_to(s: RunStatus) -> pb::RunStatus {
    match s {
        RunStatus::Queued => pb::RunStatus::Queued,
        RunStatus::Running => pb::RunStatus::Running,
        RunStatus::Succeeded => pb::RunStatus::Succeeded,
        RunStatus::Failed => pb::RunStatus::Failed,
        RunStatus::FailedAcknowledged => pb::RunStatus::FailedAcknowledged,
        RunStatus::Skipped => pb::RunStatus::Skipped,
    }
}

pub fn run_status_from(v: i32, field: &str) -> Result<RunStatus, FieldError> {
    match pb::RunStatus::try_from(v) {
        Ok(pb::RunStatus::Queued) => Ok(RunStatus::Queued),
        Ok(pb::RunStatus::Running) => Ok(RunStatus::Running),
        Ok(pb::RunStatus::Succeeded) => Ok(RunStatus::Succeeded),
        Ok(pb::RunStatus::Failed) => Ok(RunStatus::Failed),
        Ok(pb::RunStatus::FailedAcknowledged) => Ok(RunStatus::FailedAcknowledged),
        Ok(pb::RunStatus::Skipped) => Ok(RunStatus::Skipped),
        _ => Err(FieldError::new(field, "is not a RunStatus")),
    }
}

pub fn unit_status_to(s: UnitStatus) -> pb::UnitStatus {
    match s {
        UnitStatus::NotMigrated => pb::UnitStatus::NotMigrated,
        UnitStatus::InProgress => pb::UnitStatus::InProgress,
        UnitStatus::Migrated => pb::UnitStatus::Migrated,
        UnitStatus::Failed => pb::UnitStatus::Failed,
        UnitStatus::RolledBack => pb::UnitStatus::RolledBack,
    }
}

pub fn unit_status_from(v: i32, field: &str) -> Result<UnitStatus, FieldError> {
    match pb::UnitStatus::try_from(v) {
        Ok(pb::UnitStatus::NotMigrated) => Ok(UnitStatus::NotMigrated),
        Ok(pb::UnitStatus::InProgress) => Ok(UnitStatus::InProgress),
        Ok(pb::UnitStatus::Migrated) => Ok(UnitStatus::Migrated),
        Ok(pb::UnitStatus::Failed) => Ok(UnitStatus::Failed),
        Ok(pb::UnitStatus::RolledBack) => Ok(UnitStatus::RolledBack),
        _ => Err(FieldError::new(field, "is not a UnitStatus")),
    }
}

pub fn route_target_from(v: i32, field: &str) -> Result<RouteTarget, FieldError> {
    match pb::RouteTarget::try_from(v) {
        Ok(pb::RouteTarget::Source) => Ok(RouteTarget::Source),
        Ok(pb::RouteTarget::Target) => Ok(RouteTarget::Target),
        _ => Err(FieldError::new(
            field,
            "must be ROUTE_TARGET_SOURCE or ROUTE_TARGET_TARGET",
        )),
    }
}

fn route_target_to(t: RouteTarget) -> pb::RouteTarget {
    match t {
        RouteTarget::Source => pb::RouteTarget::Source,
        RouteTarget::Target => pb::RouteTarget::Target,
    }
}

pub fn trigger_from(v: i32) -> RunTrigger {
    match pb::RunTrigger::try_from(v) {
        Ok(pb::RunTrigger::Schedule) => RunTrigger::Schedule,
        Ok(pb::RunTrigger::Api) => RunTrigger::Api,
        _ => RunTrigger::Manual,
    }
}

fn trigger_to(t: RunTrigger) -> pb::RunTrigger {
    match t {
        RunTrigger::Manual => pb::RunTrigger::Manual,
        RunTrigger::Schedule => pb::RunTrigger::Schedule,
        RunTrigger::Api => pb::RunTrigger::Api,
    }
}

fn spec_from(any: Option<&prost_types::Any>) -> Option<Spec> {
    any.map(|a| Spec {
        type_url: a.type_url.clone(),
        value: a.value.clone(),
    })
}

fn spec_to(spec: Option<&Spec>) -> Option<prost_types::Any> {
    spec.map(|s| prost_types::Any {
        type_url: s.type_url.clone(),
        value: s.value.clone(),
    })
}

pub fn name(value: &str, field: &str) -> Result<String, FieldError> {
    model::valid_name(value).map_err(|e| FieldError::new(field, e))?;
    Ok(value.to_owned())
}

pub fn unit_key(value: &str, field: &str) -> Result<String, FieldError> {
    model::valid_unit_key(value).map_err(|e| FieldError::new(field, e))?;
    Ok(value.to_owned())
}

pub fn required_id(value: &str, field: &str) -> Result<String, FieldError> {
    non_empty(value, field).map(str::to_owned)
}

/// Validates a job definition (CreateJob, UpdateJob).
pub fn new_job(job: Option<&pb::Job>) -> Result<NewJob, FieldError> {
    let job = job.ok_or_else(|| FieldError::required("job"))?;
    let name = name(&job.name, "job.name")?;
    let kind = kind_from(job.kind, "job.kind")?;
    let schedule = job
        .schedule
        .as_ref()
        .map(|s| -> Result<Schedule, FieldError> {
            crate::calendar::parse_cron(&s.cron)
                .map_err(|e| FieldError::new("job.schedule.cron", e))?;
            crate::calendar::parse_zone(&s.time_zone)
                .map_err(|e| FieldError::new("job.schedule.time_zone", e))?;
            let max_wait =
                from_duration(s.max_wait.as_ref(), "job.schedule.max_wait", Duration::ZERO)?;
            let start_time = s
                .start_time
                .as_ref()
                .map(|t| from_timestamp(t, "job.schedule.start_time"))
                .transpose()?;
            let end_time = s
                .end_time
                .as_ref()
                .map(|t| from_timestamp(t, "job.schedule.end_time"))
                .transpose()?;
            if let (Some(a), Some(b)) = (start_time, end_time)
                && b <= a
            {
                return Err(FieldError::new(
                    "job.schedule.end_time",
                    "must be after start_time",
                ));
            }
            Ok(Schedule {
                cron: s.cron.clone(),
                time_zone: s.time_zone.clone(),
                max_wait_ms: u64::try_from(max_wait.as_millis()).unwrap_or(u64::MAX),
                start_time,
                end_time,
            })
        })
        .transpose()?;
    let default_unit_keys = job
        .default_unit_keys
        .iter()
        .enumerate()
        .map(|(i, k)| unit_key(k, &format!("job.default_unit_keys[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    if schedule.is_some() && default_unit_keys.is_empty() {
        return Err(FieldError::new(
            "job.default_unit_keys",
            "a scheduled job needs default unit keys for the runs the scheduler starts",
        ));
    }
    if job.max_attempts > 1000 {
        return Err(FieldError::new("job.max_attempts", "must be at most 1000"));
    }
    Ok(NewJob {
        name,
        kind,
        description: job.description.clone(),
        spec: spec_from(job.spec.as_ref()),
        schedule,
        default_unit_keys,
        explicit_completion: job.explicit_completion,
        max_attempts: if job.max_attempts == 0 {
            3
        } else {
            job.max_attempts
        },
        max_concurrent_units: job.max_concurrent_units,
    })
}

pub fn unit_specs(units: &[pb::UnitSpec], field: &str) -> Result<Vec<UnitSpec>, FieldError> {
    if units.len() > crate::limits::MAX_UNITS_PER_CALL {
        return Err(FieldError::new(
            field,
            format!(
                "lists {} units; at most {} per call (register more with further AddUnits calls)",
                units.len(),
                crate::limits::MAX_UNITS_PER_CALL
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    units
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let key = unit_key(&u.unit_key, &format!("{field}[{i}].unit_key"))?;
            if !seen.insert(key.clone()) {
                return Err(FieldError::new(
                    format!("{field}[{i}].unit_key"),
                    format!("{key:?} appears twice"),
                ));
            }
            crate::limits::check_checkpoint(&u.checkpoint)
                .map_err(|e| FieldError::new(format!("{field}[{i}].checkpoint"), e.description))?;
            Ok(UnitSpec {
                unit_key: key,
                after_unit_keys: u.after_unit_keys.clone(),
                checkpoint: u.checkpoint.clone(),
            })
        })
        .collect()
}

/// CompleteUnit's `end_run`: a failed end must say why.
pub fn run_end(end: &pb::RunEnd) -> Result<model::RunEnd, FieldError> {
    let last_processed = watermark_from(end.last_processed.as_ref())
        .map_err(|e| FieldError::new(format!("end_run.{}", e.field), e.description))?;
    if !end.failed {
        return Ok(model::RunEnd {
            error: None,
            last_processed,
        });
    }
    if end.error.trim().is_empty() {
        return Err(FieldError::new(
            "end_run.error",
            "is required when end_run.failed is set: say why the run failed",
        ));
    }
    Ok(model::RunEnd {
        error: Some(end.error.clone()),
        last_processed,
    })
}

pub fn checkpoint_bytes(bytes: &[u8]) -> Result<Vec<u8>, FieldError> {
    crate::limits::check_checkpoint(bytes)?;
    Ok(bytes.to_vec())
}

pub fn progress(
    processed: i64,
    failed: i64,
    estimated: i64,
    counters: &std::collections::HashMap<String, i64>,
) -> Progress {
    Progress {
        items_processed: processed,
        items_failed: failed,
        items_estimated: estimated,
        counters: counters.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    }
}

pub fn watermark_from(w: Option<&pb::Watermark>) -> Result<Option<Watermark>, FieldError> {
    w.map(|w| {
        Ok(Watermark {
            time: w
                .time
                .as_ref()
                .map(|t| from_timestamp(t, "last_processed.time"))
                .transpose()?,
            position: w.position.clone(),
        })
    })
    .transpose()
}

fn watermark_to(w: &Watermark) -> pb::Watermark {
    pb::Watermark {
        time: opt_timestamp(w.time),
        position: w.position.clone(),
    }
}

impl From<&Job> for pb::Job {
    fn from(j: &Job) -> Self {
        Self {
            name: j.name.clone(),
            kind: kind_to(j.kind) as i32,
            description: j.description.clone(),
            spec: spec_to(j.spec.as_ref()),
            schedule: j.schedule.as_ref().map(|s| pb::Schedule {
                cron: s.cron.clone(),
                time_zone: s.time_zone.clone(),
                max_wait: Some(duration(chrono::Duration::milliseconds(
                    i64::try_from(s.max_wait_ms).unwrap_or(i64::MAX),
                ))),
                start_time: opt_timestamp(s.start_time),
                end_time: opt_timestamp(s.end_time),
            }),
            default_unit_keys: j.default_unit_keys.clone(),
            explicit_completion: j.explicit_completion,
            max_attempts: j.max_attempts,
            max_concurrent_units: j.max_concurrent_units,
            revision: j.revision,
            create_time: Some(timestamp(j.create_time)),
            update_time: Some(timestamp(j.update_time)),
            last_run: None,
            next_run_time: opt_timestamp(j.next_run_time),
            blocking_run_id: j.blocking_run_id.clone().unwrap_or_default(),
        }
    }
}

fn counts_to(c: &UnitCounts) -> pb::UnitCounts {
    pb::UnitCounts {
        total: c.total,
        not_migrated: c.not_migrated,
        in_progress: c.in_progress,
        migrated: c.migrated,
        failed: c.failed,
        rolled_back: c.rolled_back,
    }
}

pub fn run_to(r: &Run, units: Option<&UnitCounts>, totals: Option<&Progress>) -> pb::Run {
    let totals = totals.cloned().unwrap_or_default();
    pb::Run {
        run_id: r.run_id.clone(),
        job_name: r.job_name.clone(),
        job_kind: kind_to(r.job_kind) as i32,
        job_revision: r.job_revision,
        correlation_id: r.correlation_id.clone(),
        trigger: trigger_to(r.trigger) as i32,
        actor: r.actor.clone(),
        status: run_status_to(r.status) as i32,
        status_reason: r.status_reason.clone(),
        create_time: Some(timestamp(r.create_time)),
        scheduled_time: opt_timestamp(r.scheduled_time),
        start_time: opt_timestamp(r.start_time),
        finish_time: opt_timestamp(r.finish_time),
        window_start: opt_timestamp(r.window_start),
        window_end: opt_timestamp(r.window_end),
        last_processed: r.last_processed.as_ref().map(watermark_to),
        force_remigrate: r.force_remigrate,
        units: units.map(counts_to),
        items_processed: totals.items_processed,
        items_failed: totals.items_failed,
        items_estimated: totals.items_estimated,
        counters: totals.counters.into_iter().collect(),
        result: spec_to(r.result.as_ref()),
        acknowledgement: r.acknowledgement.as_ref().map(|a| pb::Acknowledgement {
            actor: a.actor.clone(),
            reason: a.reason.clone(),
            time: Some(timestamp(a.time)),
        }),
        window_start_run_id: r.window_start_run_id.clone().unwrap_or_default(),
    }
}

impl From<&RunView> for pb::Run {
    fn from(v: &RunView) -> Self {
        run_to(&v.run, Some(&v.units), Some(&v.totals))
    }
}

pub fn lease_to(l: &Lease) -> pb::Lease {
    pb::Lease {
        owner: l.owner.clone(),
        fencing_token: l.fencing_token,
        acquire_time: Some(timestamp(l.acquire_time)),
        expire_time: Some(timestamp(l.expire_time)),
    }
}

impl From<&Unit> for pb::Unit {
    fn from(u: &Unit) -> Self {
        Self {
            run_id: u.run_id.clone(),
            job_name: u.job_name.clone(),
            unit_key: u.unit_key.clone(),
            status: unit_status_to(u.status) as i32,
            checkpoint: u.checkpoint.clone(),
            items_processed: u.progress.items_processed,
            items_failed: u.progress.items_failed,
            items_estimated: u.progress.items_estimated,
            counters: u.progress.counters.clone().into_iter().collect(),
            last_error: u.last_error.clone(),
            attempts: u.attempts,
            lease: u.lease.as_ref().map(lease_to),
            after_unit_keys: u.after_unit_keys.clone(),
            result: spec_to(u.result.as_ref()),
            create_time: Some(timestamp(u.create_time)),
            update_time: Some(timestamp(u.update_time)),
            retry_time: u.retry_time.map(timestamp),
        }
    }
}

impl From<&Route> for pb::Route {
    fn from(r: &Route) -> Self {
        Self {
            job_name: r.job_name.clone(),
            unit_key: r.unit_key.clone(),
            target: route_target_to(r.target) as i32,
            revision: r.revision,
            update_time: opt_timestamp(r.update_time),
            actor: r.actor.clone(),
            reason: r.reason.clone(),
        }
    }
}

impl From<&Transition> for pb::Transition {
    fn from(t: &Transition) -> Self {
        use pb::transition::Change as C;
        let change = match &t.change {
            model::Change::RunStatus { from, to } => C::RunStatus(pb::RunStatusChange {
                from_status: from.map_or(0, |s| run_status_to(s) as i32),
                to_status: run_status_to(*to) as i32,
            }),
            model::Change::UnitStatus { from, to } => C::UnitStatus(pb::UnitStatusChange {
                from_status: from.map_or(0, |s| unit_status_to(s) as i32),
                to_status: unit_status_to(*to) as i32,
            }),
            model::Change::Route { from, to, revision } => C::Route(pb::RouteChange {
                from_target: from.map_or(0, |t| route_target_to(t) as i32),
                to_target: route_target_to(*to) as i32,
                revision: *revision,
            }),
            model::Change::JobUpdate { revision, fields } => C::JobUpdate(pb::JobUpdate {
                revision: *revision,
                fields: fields.clone(),
            }),
        };
        Self {
            sequence: t.sequence,
            job_name: t.job_name.clone(),
            run_id: t.run_id.clone(),
            unit_key: t.unit_key.clone(),
            time: Some(timestamp(t.time)),
            actor: t.actor.clone(),
            reason: t.reason.clone(),
            fencing_token: t.fencing_token,
            change: Some(change),
        }
    }
}

/// Progress of a run as `WatchRun` reports it. `rate` is items per second
/// since the previous observation.
pub fn progress_to(v: &RunView, rate: f64) -> pb::RunProgress {
    let remaining = (v.totals.items_estimated - v.totals.items_processed).max(0);
    let eta = if rate > 0.0 && remaining > 0 {
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        let secs = (remaining as f64 / rate) as i64;
        Some(duration(chrono::Duration::seconds(secs)))
    } else {
        None
    };
    pb::RunProgress {
        run_id: v.run.run_id.clone(),
        job_name: v.run.job_name.clone(),
        status: run_status_to(v.run.status) as i32,
        units: Some(counts_to(&v.units)),
        items_processed: v.totals.items_processed,
        items_failed: v.totals.items_failed,
        items_estimated: v.totals.items_estimated,
        items_per_second: rate,
        eta,
        observe_time: Some(timestamp(Utc::now())),
        counters: v.totals.counters.clone().into_iter().collect(),
    }
}

/// The sort key a page token carries: the key of the last item of the page
/// before. A page starts right after it, however many items were added or
/// removed before it meanwhile (an offset repeated runs on the next page
/// when a run started between two pages, and skipped items when one went).
pub fn page(token: &str, field: &str) -> Result<Option<String>, FieldError> {
    use base64::Engine as _;
    if token.is_empty() {
        return Ok(None);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(Some)
        .ok_or_else(|| {
            FieldError::new(
                field,
                "is not a token returned by this API; list again without one",
            )
        })
}

/// A page size as AIP-158 has it: 0 means the default (100), more than the
/// maximum (1000) is lowered to it; only a negative one is refused.
pub fn page_size(size: i32, field: &str) -> Result<usize, FieldError> {
    match size {
        0 => Ok(100),
        s if s < 0 => Err(FieldError::new(field, "must not be negative")),
        s => Ok(usize::try_from(s.min(1000)).unwrap_or(1000)),
    }
}

/// The order a list is sorted in by its page key.
#[derive(Clone, Copy, Debug)]
pub enum Order {
    Ascending,
    Descending,
}

/// Slices `items`, sorted by `key` in `order`, into the page of at most
/// `size` that follows the key `after` (from [`page`]), with the token of
/// the next page (empty on the last).
pub fn paginate<T: Clone>(
    items: &[T],
    after: Option<&str>,
    size: usize,
    order: Order,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, String) {
    use base64::Engine as _;
    let start = after.map_or(0, |after| {
        items.partition_point(|item| match order {
            Order::Ascending => key(item).as_str() <= after,
            Order::Descending => key(item).as_str() >= after,
        })
    });
    let mut end = start.saturating_add(size).min(items.len());
    // Items of one key stay on one page: the token could not say where
    // within them the page stopped.
    while end < items.len() && end > start + 1 && key(&items[end - 1]) == key(&items[end]) {
        end -= 1;
    }
    let next = if end < items.len() && end > start {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key(&items[end - 1]))
    } else {
        String::new()
    };
    (items[start..end].to_vec(), next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_registers_at_most_the_documented_units() {
        let specs = |n: usize| -> Vec<pb::UnitSpec> {
            (0..n)
                .map(|i| pb::UnitSpec {
                    unit_key: format!("u{i}"),
                    ..Default::default()
                })
                .collect()
        };
        let max = crate::limits::MAX_UNITS_PER_CALL;
        assert_eq!(unit_specs(&specs(max), "units").unwrap().len(), max);
        let err = unit_specs(&specs(max + 1), "units").unwrap_err();
        assert_eq!(err.field, "units");
        assert!(err.description.contains("10000"), "{}", err.description);
    }

    #[test]
    fn a_first_checkpoint_is_kept_up_to_the_checkpoint_limit() {
        let spec = |len: usize| pb::UnitSpec {
            unit_key: format!("feed-{len}"),
            checkpoint: vec![b'x'; len],
            ..Default::default()
        };
        let max = crate::limits::MAX_CHECKPOINT_BYTES;
        let kept = unit_specs(&[spec(max)], "units").unwrap();
        assert_eq!(kept[0].checkpoint.len(), max);
        let err = unit_specs(&[spec(0), spec(max + 1)], "units").unwrap_err();
        assert_eq!(err.field, "units[1].checkpoint");
        assert!(err.description.contains("65536"), "{}", err.description);
    }

    #[test]
    fn page_sizes_over_the_maximum_are_lowered_not_refused() {
        assert_eq!(page_size(0, "page_size").unwrap(), 100);
        assert_eq!(page_size(1, "page_size").unwrap(), 1);
        assert_eq!(page_size(1000, "page_size").unwrap(), 1000);
        assert_eq!(page_size(1001, "page_size").unwrap(), 1000);
        assert_eq!(page_size(i32::MAX, "page_size").unwrap(), 1000);
        let err = page_size(-1, "page_size").unwrap_err();
        assert_eq!(err.field, "page_size");
        assert!(page_size(i32::MIN, "page_size").is_err());
    }

    #[test]
    fn pages_neither_repeat_nor_skip_while_the_list_grows() {
        let key = |n: &u32| format!("{n:04}");
        // Newest first, as ListRuns: new items arrive at the head.
        let mut items: Vec<u32> = (1..=5).rev().collect();
        let (first, token) = paginate(&items, None, 2, Order::Descending, key);
        assert_eq!(first, vec![5, 4]);
        items.insert(0, 6);
        items.insert(0, 7);
        let after = page(&token, "page_token").unwrap();
        let (second, token) = paginate(&items, after.as_deref(), 2, Order::Descending, key);
        assert_eq!(second, vec![3, 2]);
        let after = page(&token, "page_token").unwrap();
        let (last, token) = paginate(&items, after.as_deref(), 2, Order::Descending, key);
        assert_eq!((last, token), (vec![1], String::new()));
        // Oldest first, as ListTransitions, with an item gone meanwhile.
        let mut items: Vec<u32> = (1..=5).collect();
        let (first, token) = paginate(&items, None, 2, Order::Ascending, key);
        assert_eq!(first, vec![1, 2]);
        items.retain(|n| *n != 2);
        let after = page(&token, "page_token").unwrap();
        let (rest, token) = paginate(&items, after.as_deref(), 10, Order::Ascending, key);
        assert_eq!((rest, token), (vec![3, 4, 5], String::new()));
    }

    #[test]
    fn a_page_never_splits_items_of_one_key() {
        let items = [(1, 'a'), (2, 'b'), (2, 'c'), (3, 'd')];
        let key = |i: &(u32, char)| i.0.to_string();
        let (first, token) = paginate(&items, None, 2, Order::Ascending, key);
        assert_eq!(first, vec![(1, 'a')]);
        let after = page(&token, "page_token").unwrap();
        let (second, _) = paginate(&items, after.as_deref(), 2, Order::Ascending, key);
        assert_eq!(second, vec![(2, 'b'), (2, 'c')]);
    }

    #[test]
    fn a_token_not_from_the_api_names_the_field() {
        let err = page("not base64 ~", "page_token").unwrap_err();
        assert_eq!(err.field, "page_token");
        assert!(
            err.description.contains("without one"),
            "{}",
            err.description
        );
        let past_the_end = page(&base64_of("zzzz"), "page_token").unwrap();
        let (empty, next) = paginate(&[1, 2], past_the_end.as_deref(), 5, Order::Ascending, |n| {
            n.to_string()
        });
        assert_eq!((empty, next), (Vec::<i32>::new(), String::new()));
    }

    fn base64_of(s: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }
}
