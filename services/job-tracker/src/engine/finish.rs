//! How a run ends, decided from one consistent view of its units (#19.7).
//!
//! A run keeps the number of its unfinished units (NOT_MIGRATED or
//! IN_PROGRESS) in one record, `run#<id>` / `#open`, written in the same
//! transaction as every change of a unit that changes that number. A run
//! ends on its own or by CompleteRun only while that count is 0, in a
//! transaction that checks the record is still at the revision read: a unit
//! claimed or put back in the queue stays counted, one registered while the
//! end was decided makes the end retry. So no run ends SUCCEEDED with a
//! unit undone, whatever the interleaving, on DynamoDB as on SQLite.

use chrono::Utc;

use serde::{Deserialize, Serialize};

use super::{ACTIVE, Tracker, delete, job_puts, parse, put, run_pk, run_puts};
use crate::error::{TrackerError, TrackerResult};
use crate::kv::{Expect, Op};
use crate::limits;
use crate::model::{RunEnd, RunStatus, Spec, Watermark};

/// Sort key of a run's unfinished-unit count, in the run's partition.
const OPEN: &str = "#open";
/// Sort key of the end an explicit-completion run was asked for by a unit's
/// completion (CompleteUnit.end_run), in the run's partition.
const END: &str = "#end";

/// The end a unit's completion asked for, and which unit asked.
#[derive(Serialize, Deserialize)]
struct AskedEnd {
    unit_key: String,
    error: Option<String>,
    /// Kept for a SUCCEEDED end (records written before it have none).
    #[serde(default)]
    last_processed: Option<Watermark>,
}

/// Records the end `unit_key`'s completion asks for (the last one asked
/// wins), in that completion's transaction.
pub(super) fn asked_end_op(run_id: &str, unit_key: &str, end: &RunEnd) -> TrackerResult<Op> {
    let asked = AskedEnd {
        unit_key: unit_key.to_owned(),
        error: end.error.clone(),
        last_processed: end.last_processed.clone(),
    };
    put(&run_pk(run_id), END, &asked, Expect::Any)
}

/// Writes a run's unfinished-unit count under `expect` (from
/// [`Tracker::open_units`]).
pub(super) fn open_units_op(run_id: &str, count: u64, expect: Expect) -> Op {
    Op::Put {
        pk: run_pk(run_id),
        sk: OPEN.to_owned(),
        body: count.to_string(),
        expect,
    }
}

/// Guards a run's end: its count is still the 0 read, or, for a run that
/// kept none, is created as 0.
fn settled_guard(run_id: &str, expect: Expect) -> Op {
    match expect {
        Expect::Rev(_) => Op::Check {
            pk: run_pk(run_id),
            sk: OPEN.to_owned(),
            expect,
        },
        _ => open_units_op(run_id, 0, Expect::Absent),
    }
}

impl Tracker {
    /// How many units of the run are unfinished, and what a write of a new
    /// count must expect. A run registered before counts were kept has
    /// none: its units are counted and the count is created
    /// (`Expect::Absent`), so only one of two racing writers creates it.
    pub(super) async fn open_units(&self, run_id: &str) -> TrackerResult<(u64, Expect)> {
        if let Some(entry) = self.kv.get(&run_pk(run_id), OPEN).await? {
            let count = entry.body.parse().map_err(|_| {
                TrackerError::Internal(format!(
                    "corrupt unit count of run {run_id}: {:?}",
                    entry.body
                ))
            })?;
            return Ok((count, Expect::Rev(entry.rev)));
        }
        let units = self.list_units(run_id).await?;
        let open = units.iter().filter(|u| !u.status.is_terminal()).count();
        Ok((open as u64, Expect::Absent))
    }

    /// Ends a run when no unit is unfinished and the job does not ask for
    /// explicit completion: SUCCEEDED if every unit MIGRATED, else FAILED.
    pub(super) async fn maybe_finish_run(&self, run_id: &str, actor: &str) -> TrackerResult<()> {
        // Decided once before retrying: most calls (every claim that finds
        // nothing) end nothing, and a retried call wakes every waiter.
        if self.decide_end(run_id).await?.is_none() {
            return Ok(());
        }
        self.retrying("finish run", || async {
            let Some(decided) = self.decide_end(run_id).await? else {
                return Ok(Some(()));
            };
            let end = End {
                status: decided.status,
                reason: &decided.reason,
                watermark: decided.watermark.as_ref(),
                result: decided.result.as_ref(),
                actor,
            };
            let expect = decided.expect;
            let guard = settled_guard(run_id, expect);
            match self.try_finish_run(run_id, &end, Some(guard)).await {
                // Ended otherwise meanwhile (FailRun): nothing left to do.
                Err(TrackerError::Precondition(_)) => Ok(Some(())),
                other => Ok(other?.map(drop)),
            }
        })
        .await
    }

    /// How a RUNNING run ends now, if it does: a run without explicit
    /// completion once no unit is open; an explicit-completion run once no
    /// unit is open and the last unit completed said how (CompleteUnit's
    /// `end_run`), with that unit's result.
    async fn decide_end(&self, run_id: &str) -> TrackerResult<Option<Decided>> {
        let (run, _) = self.load_run(run_id).await?;
        if run.status != RunStatus::Running {
            return Ok(None);
        }
        // One read decides most explicit runs: no end asked, no end.
        let asked = if run.explicit_completion {
            match self.kv.get(&run_pk(run_id), END).await? {
                Some(entry) => Some(parse::<AskedEnd>(&entry)?),
                None => return Ok(None),
            }
        } else {
            None
        };
        let (open, expect) = self.open_units(run_id).await?;
        if open > 0 {
            return Ok(None);
        }
        let view = self.view(run).await?;
        let units = &view.units;
        let undone = units.not_migrated + units.in_progress;
        if undone > 0 {
            // Only a writer that does not keep the count gets here; never
            // end a run over an unfinished unit.
            tracing::warn!(run_id, undone, "unit count says 0 but units are unfinished");
            return Ok(None);
        }
        let (failed, all) = (units.failed + units.rolled_back, units.total);
        if let Some(asked) = asked {
            let (unit, _) = self.load_unit(run_id, &asked.unit_key).await?;
            let (status, reason) = match asked.error {
                Some(error) => (RunStatus::Failed, error),
                None if failed > 0 => {
                    (RunStatus::Failed, format!("{failed} of {all} units failed"))
                }
                None => (RunStatus::Succeeded, "completed".to_owned()),
            };
            let watermark = (status == RunStatus::Succeeded)
                .then_some(asked.last_processed)
                .flatten();
            return Ok(Some(Decided {
                status,
                reason,
                result: unit.result,
                watermark,
                expect,
            }));
        }
        let (status, reason) = if failed == 0 {
            (RunStatus::Succeeded, format!("all {all} units MIGRATED"))
        } else {
            (RunStatus::Failed, format!("{failed} of {all} units failed"))
        };
        Ok(Some(Decided {
            status,
            reason,
            result: None,
            watermark: None,
            expect,
        }))
    }

    /// Ends a run whose job asked for explicit completion, recording where
    /// it stopped (the next incremental run starts there).
    pub async fn complete_run(
        &self,
        run_id: &str,
        watermark: Option<Watermark>,
        result: Option<Spec>,
        actor: &str,
    ) -> TrackerResult<crate::model::Run> {
        limits::check_result(result.as_ref(), "result")?;
        let end = End {
            status: RunStatus::Succeeded,
            reason: "completed",
            watermark: watermark.as_ref(),
            result: result.as_ref(),
            actor,
        };
        self.retrying("complete run", || async {
            let (run, _) = self.load_run(run_id).await?;
            // A repeat of the CompleteRun that ended the run (its answer was
            // lost and the caller sent it again) gets the same answer.
            if run.status == RunStatus::Succeeded
                && same_watermark(run.last_processed.as_ref(), watermark.as_ref())
            {
                return Ok(Some(run));
            }
            if run.status != RunStatus::Running {
                return Err(TrackerError::Precondition(format!(
                    "run {run_id} is {:?}; only a RUNNING run can complete",
                    run.status
                )));
            }
            let (open, expect) = self.open_units(run_id).await?;
            let view = self.view(run).await?;
            let pending = view.units.not_migrated + view.units.in_progress;
            if open > 0 || pending > 0 {
                return Err(TrackerError::Precondition(format!(
                    "run {run_id} still has {} units pending",
                    pending.max(i64::try_from(open).unwrap_or(i64::MAX))
                )));
            }
            if view.units.failed + view.units.rolled_back > 0 {
                return Err(TrackerError::Precondition(format!(
                    "run {run_id} has failed units; end it with FailRun instead"
                )));
            }
            let guard = settled_guard(run_id, expect);
            self.try_finish_run(run_id, &end, Some(guard)).await
        })
        .await
    }

    /// Ends a run FAILED; its error is kept truncated to
    /// [`limits::MAX_ERROR_BYTES`].
    pub async fn fail_run(
        &self,
        run_id: &str,
        error: &str,
        result: Option<Spec>,
        actor: &str,
    ) -> TrackerResult<crate::model::Run> {
        limits::check_result(result.as_ref(), "result")?;
        let reason = limits::truncate_error(error);
        let end = End {
            status: RunStatus::Failed,
            reason: &reason,
            watermark: None,
            result: result.as_ref(),
            actor,
        };
        self.retrying("finish run", || self.try_finish_run(run_id, &end, None))
            .await
    }

    /// One attempt to end a run as `end` says, with `guard` in the same
    /// transaction: `None` on a conflict. Ending it again the same way is a
    /// no-op.
    async fn try_finish_run(
        &self,
        run_id: &str,
        end: &End<'_>,
        guard: Option<Op>,
    ) -> TrackerResult<Option<crate::model::Run>> {
        let (mut run, rev) = self.load_run(run_id).await?;
        if run.status.is_terminal() {
            return if run.status == end.status {
                Ok(Some(run))
            } else {
                Err(TrackerError::Precondition(format!(
                    "run {run_id} already ended {:?}",
                    run.status
                )))
            };
        }
        let (mut job, job_rev) = self.load_job(&run.job_name).await?;
        let from = run.status;
        run.status = end.status;
        run.status_reason = end.reason.to_owned();
        run.finish_time = Some(Utc::now());
        run.last_processed = end.watermark.cloned();
        if end.result.is_some() {
            run.result = end.result.cloned();
        }
        if job.active_run_id.as_deref() == Some(run_id) {
            job.active_run_id = None;
        }
        match end.status {
            RunStatus::Failed => job.blocking_run_id = Some(run_id.to_owned()),
            RunStatus::Succeeded if end.watermark.is_some() => {
                job.last_processed = end.watermark.cloned();
                job.last_processed_run_id = Some(run_id.to_owned());
            }
            _ => {}
        }
        let mut ops = run_puts(&run, Expect::Rev(rev))?;
        ops.extend(job_puts(&job, Expect::Rev(job_rev))?);
        ops.extend([
            delete(ACTIVE, run_id, Expect::Any),
            self.run_transition(&run, Some(from), end.actor, end.reason)?,
        ]);
        ops.extend(guard);
        Ok(self.apply(ops).await?.map(|()| run))
    }
}

/// How a run ends by itself, and the expectation on its unit count that
/// guards the end.
struct Decided {
    status: RunStatus,
    reason: String,
    result: Option<Spec>,
    watermark: Option<Watermark>,
    expect: Expect,
}

/// How a run ends.
struct End<'a> {
    status: RunStatus,
    reason: &'a str,
    watermark: Option<&'a Watermark>,
    result: Option<&'a Spec>,
    actor: &'a str,
}

/// Whether two watermarks are the same position (times to the microsecond,
/// the precision the stores keep).
fn same_watermark(a: Option<&Watermark>, b: Option<&Watermark>) -> bool {
    let micros = |w: &Watermark| w.time.map(|t| t.timestamp_micros());
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => micros(a) == micros(b) && a.position == b.position,
        _ => false,
    }
}
