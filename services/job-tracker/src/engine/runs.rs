//! Runs and their units: start (behind the failure gate), register units,
//! end a run when its last unit settles, and acknowledge a failed run.

use std::collections::HashSet;

use chrono::Utc;
use tidemark_kit::FieldError;

use super::{
    ACTIVE, ActiveRun, JOBS, StartRun, Tracker, TrackerStats, UnitSpec, delete, job_pk, parse, put,
    run_pk,
};
use crate::error::{TrackerError, TrackerResult};
use crate::kv::{Expect, Op, query_all};
use crate::model::{
    Acknowledgement, Job, JobKind, Progress, Run, RunStatus, RunView, Spec, Unit, UnitCounts,
    UnitStatus, Watermark,
};

/// Units registered per transaction: each writes up to three records (unit,
/// queue entry, transition) and DynamoDB allows 100 per transaction.
const UNIT_BATCH: usize = 30;

impl Tracker {
    pub async fn get_run(&self, run_id: &str) -> TrackerResult<RunView> {
        let (run, _) = self.load_run(run_id).await?;
        self.view(run).await
    }

    /// Runs of a job, newest first.
    pub async fn list_runs(
        &self,
        job_name: &str,
        statuses: &[RunStatus],
    ) -> TrackerResult<Vec<Run>> {
        self.load_job(job_name).await?;
        let mut runs: Vec<Run> = query_all(self.kv.as_ref(), &job_pk(job_name), "run#")
            .await?
            .iter()
            .map(parse)
            .collect::<TrackerResult<_>>()?;
        runs.retain(|r: &Run| statuses.is_empty() || statuses.contains(&r.status));
        runs.reverse();
        Ok(runs)
    }

    pub async fn list_units(&self, run_id: &str) -> TrackerResult<Vec<Unit>> {
        query_all(self.kv.as_ref(), &run_pk(run_id), "unit#")
            .await?
            .iter()
            .map(parse)
            .collect()
    }

    pub async fn list_units_filtered(
        &self,
        run_id: &str,
        statuses: &[UnitStatus],
        keys: &[String],
    ) -> TrackerResult<Vec<Unit>> {
        self.load_run(run_id).await?;
        let mut units = self.list_units(run_id).await?;
        units.retain(|u| {
            (statuses.is_empty() || statuses.contains(&u.status))
                && (keys.is_empty() || keys.contains(&u.unit_key))
        });
        Ok(units)
    }

    async fn view(&self, run: Run) -> TrackerResult<RunView> {
        let mut units = UnitCounts::default();
        let mut totals = Progress::default();
        for unit in self.list_units(&run.run_id).await? {
            units.add(unit.status);
            totals.items_processed += unit.progress.items_processed;
            totals.items_failed += unit.progress.items_failed;
            totals.items_estimated += unit.progress.items_estimated;
            for (k, v) in &unit.progress.counters {
                *totals.counters.entry(k.clone()).or_default() += v;
            }
        }
        Ok(RunView { run, units, totals })
    }

    /// Starts a run: refused while the job's last run FAILED unacknowledged
    /// (invariant 8) or another run is active. Units register while the run
    /// is QUEUED; it becomes RUNNING (claimable) once all are in.
    pub async fn start_run(&self, req: StartRun) -> TrackerResult<RunView> {
        if !req.correlation_id.is_empty()
            && let Some(entry) = self
                .kv
                .get(
                    &job_pk(&req.job_name),
                    &format!("corr#{}", req.correlation_id),
                )
                .await?
        {
            return self.get_run(&entry.body).await;
        }
        let run = self
            .retrying("start run", || async {
                let (mut job, job_rev) = self.load_job(&req.job_name).await?;
                if let Some(blocking) = &job.blocking_run_id {
                    let reason = self.load_run(blocking).await.map(|(r, _)| r.status_reason).unwrap_or_default();
                    return Err(TrackerError::Precondition(format!(
                        "job {:?} is blocked: its run {blocking} FAILED ({reason}); acknowledge it with AcknowledgeFailure (tidemark jobs ack) before starting another run",
                        job.name
                    )));
                }
                if let Some(active) = &job.active_run_id {
                    return Err(TrackerError::Precondition(format!(
                        "job {:?} already has an active run {active}; wait for it to finish or fail it",
                        job.name
                    )));
                }
                let now = Utc::now();
                let run_id = uuid::Uuid::now_v7().to_string();
                let window_start = req.window_start.or_else(|| {
                    (job.kind == JobKind::IncrementalExtract)
                        .then(|| job.last_processed.as_ref().and_then(|w| w.time))
                        .flatten()
                });
                let run = Run {
                    run_id: run_id.clone(),
                    job_name: job.name.clone(),
                    job_kind: job.kind,
                    job_revision: job.revision,
                    correlation_id: if req.correlation_id.is_empty() { run_id.clone() } else { req.correlation_id.clone() },
                    trigger: req.trigger,
                    actor: req.actor.clone(),
                    status: RunStatus::Queued,
                    status_reason: req.reason.clone(),
                    create_time: now,
                    scheduled_time: req.scheduled_time,
                    start_time: None,
                    finish_time: None,
                    window_start,
                    window_end: (job.kind == JobKind::IncrementalExtract).then_some(req.scheduled_time.unwrap_or(now)),
                    last_processed: None,
                    force_remigrate: req.force_remigrate,
                    explicit_completion: job.explicit_completion,
                    max_attempts: if job.max_attempts == 0 { 3 } else { job.max_attempts },
                    result: None,
                    acknowledgement: None,
                };
                job.active_run_id = Some(run_id.clone());
                job.last_run_id = Some(run_id.clone());
                job.due_since = None;
                let mut ops = vec![
                    put(JOBS, &job.name, &job, Expect::Rev(job_rev))?,
                    put(&job_pk(&job.name), &format!("run#{run_id}"), &run, Expect::Absent)?,
                    Op::Put { pk: run_pk(&run_id), sk: "#run".to_owned(), body: job.name.clone(), expect: Expect::Absent },
                    put(ACTIVE, &run_id, &ActiveRun { job_name: job.name.clone(), kind: job.kind }, Expect::Absent)?,
                    self.run_transition(&run, None, &req.actor, &req.reason)?,
                ];
                if !req.correlation_id.is_empty() {
                    ops.push(Op::Put {
                        pk: job_pk(&job.name),
                        sk: format!("corr#{}", req.correlation_id),
                        body: run_id.clone(),
                        expect: Expect::Absent,
                    });
                }
                Ok(self.apply(ops).await?.map(|()| run))
            })
            .await?;
        let units = if req.units.is_empty() {
            let job = self.get_job(&req.job_name).await?;
            job.default_unit_keys
                .into_iter()
                .map(|k| UnitSpec {
                    unit_key: k,
                    after_unit_keys: Vec::new(),
                })
                .collect()
        } else {
            req.units
        };
        self.add_units_to(&run, &units, &req.actor).await?;
        self.transition_run(
            &run.run_id,
            RunStatus::Queued,
            RunStatus::Running,
            &req.actor,
            "units registered",
        )
        .await?;
        self.maybe_finish_run(&run.run_id, &req.actor).await?;
        self.get_run(&run.run_id).await
    }

    async fn transition_run(
        &self,
        run_id: &str,
        from: RunStatus,
        to: RunStatus,
        actor: &str,
        reason: &str,
    ) -> TrackerResult<()> {
        self.retrying("run transition", || async {
            let (mut run, rev) = self.load_run(run_id).await?;
            if run.status != from {
                return Err(TrackerError::Precondition(format!(
                    "run {run_id} is {:?}, not {from:?}",
                    run.status
                )));
            }
            run.status = to;
            if to == RunStatus::Running {
                run.start_time = Some(Utc::now());
            }
            let ops = vec![
                put(
                    &job_pk(&run.job_name),
                    &format!("run#{run_id}"),
                    &run,
                    Expect::Rev(rev),
                )?,
                self.run_transition(&run, Some(from), actor, reason)?,
            ];
            self.apply(ops).await
        })
        .await
    }

    /// Adds units to a QUEUED or RUNNING run. Keys already in the run are
    /// left as they are.
    pub async fn add_units(
        &self,
        run_id: &str,
        units: &[UnitSpec],
        actor: &str,
    ) -> TrackerResult<Vec<Unit>> {
        let (run, _) = self.load_run(run_id).await?;
        if run.status.is_terminal() {
            return Err(TrackerError::Precondition(format!(
                "run {run_id} is {:?}; units can only be added to an active run",
                run.status
            )));
        }
        self.add_units_to(&run, units, actor).await?;
        let keys: HashSet<&str> = units.iter().map(|u| u.unit_key.as_str()).collect();
        Ok(self
            .list_units(run_id)
            .await?
            .into_iter()
            .filter(|u| keys.contains(u.unit_key.as_str()))
            .collect())
    }

    async fn add_units_to(&self, run: &Run, units: &[UnitSpec], actor: &str) -> TrackerResult<()> {
        let keys: HashSet<&str> = units.iter().map(|u| u.unit_key.as_str()).collect();
        for (i, unit) in units.iter().enumerate() {
            if let Some(dep) = unit
                .after_unit_keys
                .iter()
                .find(|d| !keys.contains(d.as_str()))
            {
                return Err(FieldError::new(
                    format!("units[{i}].after_unit_keys"),
                    format!("{dep:?} is not a unit of this run"),
                )
                .into());
            }
        }
        let migration = run.job_kind == JobKind::UnitMigration;
        for chunk in units.chunks(UNIT_BATCH) {
            let mut ops = Vec::with_capacity(chunk.len() * 3);
            let now = Utc::now();
            for spec in chunk {
                if self
                    .kv
                    .get(&run_pk(&run.run_id), &format!("unit#{}", spec.unit_key))
                    .await?
                    .is_some()
                {
                    continue;
                }
                let done = migration
                    && self
                        .kv
                        .get(&job_pk(&run.job_name), &format!("done#{}", spec.unit_key))
                        .await?
                        .is_some();
                let keep_migrated = done && !run.force_remigrate;
                let unit = Unit {
                    run_id: run.run_id.clone(),
                    job_name: run.job_name.clone(),
                    unit_key: spec.unit_key.clone(),
                    status: if keep_migrated {
                        UnitStatus::Migrated
                    } else {
                        UnitStatus::NotMigrated
                    },
                    checkpoint: Vec::new(),
                    progress: Progress::default(),
                    last_error: String::new(),
                    attempts: 0,
                    fencing_token: 0,
                    lease: None,
                    after_unit_keys: spec.after_unit_keys.clone(),
                    result: None,
                    create_time: now,
                    update_time: now,
                };
                let reason = match (done, run.force_remigrate) {
                    (true, false) => "already MIGRATED by an earlier run; not claimed again",
                    (true, true) => {
                        "force_remigrate: migrating again although an earlier run MIGRATED it"
                    }
                    _ => "registered",
                };
                ops.push(put(
                    &run_pk(&run.run_id),
                    &format!("unit#{}", unit.unit_key),
                    &unit,
                    Expect::Absent,
                )?);
                if !keep_migrated {
                    ops.push(Op::Put {
                        pk: run_pk(&run.run_id),
                        sk: format!("q#{}", unit.unit_key),
                        body: String::new(),
                        expect: Expect::Absent,
                    });
                }
                ops.push(self.unit_transition(&unit, None, actor, reason, 0)?);
            }
            if !ops.is_empty() {
                self.kv.transact(ops).await?;
            }
        }
        self.notify();
        Ok(())
    }

    /// Ends a run when nothing is waiting or leased and the job does not
    /// ask for explicit completion: SUCCEEDED if every unit MIGRATED.
    pub(super) async fn maybe_finish_run(&self, run_id: &str, actor: &str) -> TrackerResult<()> {
        let (run, _) = self.load_run(run_id).await?;
        if run.status != RunStatus::Running || run.explicit_completion {
            return Ok(());
        }
        let pk = run_pk(run_id);
        if !self.kv.query(&pk, "q#", None, 1).await?.is_empty()
            || !self.kv.query(&pk, "p#", None, 1).await?.is_empty()
        {
            return Ok(());
        }
        let view = self.view(run).await?;
        let failed = view.units.failed + view.units.rolled_back;
        let (status, reason) = if failed == 0 {
            (
                RunStatus::Succeeded,
                format!("all {} units MIGRATED", view.units.total),
            )
        } else {
            (
                RunStatus::Failed,
                format!("{failed} of {} units failed", view.units.total),
            )
        };
        self.finish_run(run_id, status, &reason, None, None, actor)
            .await
            .map(drop)
    }

    async fn finish_run(
        &self,
        run_id: &str,
        status: RunStatus,
        reason: &str,
        watermark: Option<Watermark>,
        result: Option<Spec>,
        actor: &str,
    ) -> TrackerResult<Run> {
        self.retrying("finish run", || async {
            let (mut run, rev) = self.load_run(run_id).await?;
            if run.status.is_terminal() {
                return if run.status == status {
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
            run.status = status;
            run.status_reason = reason.to_owned();
            run.finish_time = Some(Utc::now());
            run.last_processed.clone_from(&watermark);
            if result.is_some() {
                run.result.clone_from(&result);
            }
            if job.active_run_id.as_deref() == Some(run_id) {
                job.active_run_id = None;
            }
            match status {
                RunStatus::Failed => job.blocking_run_id = Some(run_id.to_owned()),
                RunStatus::Succeeded if watermark.is_some() => {
                    job.last_processed.clone_from(&watermark);
                }
                _ => {}
            }
            let ops = vec![
                put(
                    &job_pk(&run.job_name),
                    &format!("run#{run_id}"),
                    &run,
                    Expect::Rev(rev),
                )?,
                put(JOBS, &job.name, &job, Expect::Rev(job_rev))?,
                delete(ACTIVE, run_id, Expect::Any),
                self.run_transition(&run, Some(from), actor, reason)?,
            ];
            Ok(self.apply(ops).await?.map(|()| run.clone()))
        })
        .await
    }

    /// Ends a run whose job asked for explicit completion, recording where
    /// it stopped (the next incremental run starts there).
    pub async fn complete_run(
        &self,
        run_id: &str,
        watermark: Option<Watermark>,
        result: Option<Spec>,
        actor: &str,
    ) -> TrackerResult<Run> {
        let (run, _) = self.load_run(run_id).await?;
        if run.status != RunStatus::Running {
            return Err(TrackerError::Precondition(format!(
                "run {run_id} is {:?}; only a RUNNING run can complete",
                run.status
            )));
        }
        let view = self.view(run).await?;
        let pending = view.units.not_migrated + view.units.in_progress;
        if pending > 0 {
            return Err(TrackerError::Precondition(format!(
                "run {run_id} still has {pending} units pending"
            )));
        }
        if view.units.failed + view.units.rolled_back > 0 {
            return Err(TrackerError::Precondition(format!(
                "run {run_id} has failed units; end it with FailRun instead"
            )));
        }
        self.finish_run(
            run_id,
            RunStatus::Succeeded,
            "completed",
            watermark,
            result,
            actor,
        )
        .await
    }

    pub async fn fail_run(
        &self,
        run_id: &str,
        error: &str,
        result: Option<Spec>,
        actor: &str,
    ) -> TrackerResult<Run> {
        self.finish_run(run_id, RunStatus::Failed, error, None, result, actor)
            .await
    }

    /// Opens the failure gate: the job's blocking FAILED run becomes
    /// FAILED_ACKNOWLEDGED.
    pub async fn acknowledge_failure(
        &self,
        job_name: &str,
        run_id: &str,
        actor: &str,
        reason: &str,
    ) -> TrackerResult<Run> {
        self.retrying("acknowledge failure", || async {
            let (mut job, job_rev) = self.load_job(job_name).await?;
            let blocking = job.blocking_run_id.clone().ok_or_else(|| {
                TrackerError::Precondition(format!(
                    "job {job_name:?} has no failed run awaiting acknowledgement"
                ))
            })?;
            if !run_id.is_empty() && run_id != blocking {
                return Err(TrackerError::Precondition(format!(
                    "run {run_id} is not the job's blocking run; the blocking run is {blocking}"
                )));
            }
            let (mut run, rev) = self.load_run(&blocking).await?;
            if run.status != RunStatus::Failed {
                return Err(TrackerError::Precondition(format!(
                    "run {blocking} is {:?}, not FAILED",
                    run.status
                )));
            }
            run.status = RunStatus::FailedAcknowledged;
            run.acknowledgement = Some(Acknowledgement {
                actor: actor.to_owned(),
                reason: reason.to_owned(),
                time: Utc::now(),
            });
            job.blocking_run_id = None;
            let ops = vec![
                put(
                    &job_pk(job_name),
                    &format!("run#{blocking}"),
                    &run,
                    Expect::Rev(rev),
                )?,
                put(JOBS, job_name, &job, Expect::Rev(job_rev))?,
                self.run_transition(&run, Some(RunStatus::Failed), actor, reason)?,
            ];
            Ok(self.apply(ops).await?.map(|()| run.clone()))
        })
        .await
    }

    /// Figures for the service's gauges: unit counts over the active runs,
    /// how many runs are active, how many jobs a failed run blocks.
    pub async fn stats(&self) -> TrackerResult<TrackerStats> {
        let mut stats = TrackerStats::default();
        for entry in query_all(self.kv.as_ref(), ACTIVE, "").await? {
            stats.active_runs += 1;
            for unit in self.list_units(&entry.sk).await? {
                stats.units.add(unit.status);
            }
        }
        for entry in query_all(self.kv.as_ref(), JOBS, "").await? {
            let job: Job = parse(&entry)?;
            stats.blocked_jobs += u64::from(job.blocking_run_id.is_some());
        }
        Ok(stats)
    }
}
