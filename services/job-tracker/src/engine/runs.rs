//! Runs and their units: start (behind the failure gate), register units
//! (how a run ends is in `finish`), and acknowledge a failed run.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::deps::{check_units, queue_body_with};
use super::finish::open_units_op;
use super::{
    ACTIVE, ActiveRun, JOBS, StartRun, Tracker, TrackerStats, UnitSpec, job_pk, job_puts, parse,
    put, run_pk, run_puts,
};
use crate::error::{TrackerError, TrackerResult};
use crate::kv::{Expect, KvStore, Op, query_all};
use crate::model::{
    Acknowledgement, Job, JobKind, Progress, Run, RunStatus, RunTrigger, RunView, Unit, UnitCounts,
    UnitStatus,
};

/// Units registered per transaction: each writes up to three records (unit,
/// queue entry, transition), plus the run's count and a check of the run;
/// DynamoDB allows 100 per transaction.
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

    /// Runs of every job, newest first (ListRuns without a job, as the API
    /// documents it).
    pub async fn list_all_runs(&self, statuses: &[RunStatus]) -> TrackerResult<Vec<Run>> {
        let mut runs = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (jobs, next) = self.list_jobs(None, after.as_deref(), 1000).await?;
            for job in &jobs {
                runs.extend(self.list_runs(&job.name, statuses).await?);
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        runs.sort_by(|a, b| {
            b.create_time
                .cmp(&a.create_time)
                .then_with(|| b.run_id.cmp(&a.run_id))
        });
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
        let mut units = if keys.is_empty() {
            self.list_units(run_id).await?
        } else {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            self.units_by_key(run_id, &keys).await?
        };
        units.retain(|u| statuses.is_empty() || statuses.contains(&u.status));
        Ok(units)
    }

    /// The units of `keys` that exist, each read by its key (a few reads at
    /// a time), in key order like [`Self::list_units`]: the cost follows
    /// the keys asked for, not the size of the run.
    async fn units_by_key(&self, run_id: &str, keys: &[&str]) -> TrackerResult<Vec<Unit>> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let mut seen = HashSet::new();
        let reads: Vec<_> = keys
            .iter()
            .filter(|k| seen.insert(**k))
            .map(|k| read_unit(Arc::clone(&self.kv), run_pk(run_id), format!("unit#{k}")))
            .collect();
        let found: Vec<Option<Unit>> = futures::stream::iter(reads)
            .buffered(16)
            .try_collect()
            .await?;
        let mut units: Vec<Unit> = found.into_iter().flatten().collect();
        units.sort_by(|a, b| a.unit_key.cmp(&b.unit_key));
        Ok(units)
    }

    pub(super) async fn view(&self, run: Run) -> TrackerResult<RunView> {
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
        // Before anything is written: a refused declaration creates nothing.
        check_units(&req.units)?;
        if !req.correlation_id.is_empty()
            && let Some(entry) = self
                .kv
                .get(
                    &job_pk(&req.job_name),
                    &format!("corr#{}", req.correlation_id),
                )
                .await?
        {
            // The same request again (its answer lost): a start that was
            // interrupted before every unit was registered (the process
            // killed, the store failing) is finished now, instead of leaving
            // a QUEUED run that holds the job forever.
            let (run, _) = self.load_run(&entry.body).await?;
            if run.status == RunStatus::Queued {
                self.finish_start(&run.run_id, &req.job_name, req.units, &req.actor)
                    .await?;
            }
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
                let extract = job.kind == JobKind::IncrementalExtract;
                let (window_start, window_start_run_id) = match req.window_start {
                    Some(start) => (Some(start), None),
                    None if extract => (
                        job.last_processed.as_ref().and_then(|w| w.time),
                        job.last_processed_run_id.clone(),
                    ),
                    None => (None, None),
                };
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
                    window_end: extract.then_some(req.scheduled_time.unwrap_or(now)),
                    last_processed: None,
                    force_remigrate: req.force_remigrate,
                    explicit_completion: job.explicit_completion,
                    max_attempts: if job.max_attempts == 0 { 3 } else { job.max_attempts },
                    result: None,
                    acknowledgement: None,
                    window_start_run_id,
                };
                job.active_run_id = Some(run_id.clone());
                job.last_run_id = Some(run_id.clone());
                job.due_since = None;
                let mut ops = job_puts(&job, Expect::Rev(job_rev))?;
                ops.extend(run_puts(&run, Expect::Absent)?);
                ops.extend([
                    Op::Put { pk: run_pk(&run_id), sk: "#run".to_owned(), body: job.name.clone(), expect: Expect::Absent },
                    put(ACTIVE, &run_id, &ActiveRun { job_name: job.name.clone(), kind: job.kind }, Expect::Absent)?,
                    self.run_transition(&run, None, &req.actor, &req.reason)?,
                ]);
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
        self.finish_start(&run.run_id, &req.job_name, req.units, &req.actor)
            .await?;
        self.get_run(&run.run_id).await
    }

    /// Finishes the start of a scheduled run left QUEUED (the job-tracker
    /// killed, or its store failing, between creating the run and
    /// registering its units). A scheduled start is never asked again (the
    /// next due time has another correlation id), so without this the run
    /// holds its job for good and every later due run is SKIPPED behind
    /// it. Its units are the job's default ones, as when it was started.
    /// Idempotent, like the start it finishes; `false` when `run_id` is not
    /// such a run.
    pub async fn finish_scheduled_start(&self, run_id: &str) -> TrackerResult<bool> {
        let (run, _) = self.load_run(run_id).await?;
        if run.status != RunStatus::Queued || run.trigger != RunTrigger::Schedule {
            return Ok(false);
        }
        self.finish_start(run_id, &run.job_name, Vec::new(), &run.actor)
            .await?;
        Ok(true)
    }

    /// Registers a QUEUED run's units (those given, else the job's default
    /// ones; units already in are skipped) and makes it RUNNING.
    async fn finish_start(
        &self,
        run_id: &str,
        job_name: &str,
        units: Vec<UnitSpec>,
        actor: &str,
    ) -> TrackerResult<()> {
        let units = if units.is_empty() {
            let job = self.get_job(job_name).await?;
            job.default_unit_keys
                .into_iter()
                .map(|k| UnitSpec {
                    unit_key: k,
                    ..UnitSpec::default()
                })
                .collect()
        } else {
            units
        };
        self.add_units_to(run_id, &units, actor).await?;
        match self
            .transition_run(
                run_id,
                RunStatus::Queued,
                RunStatus::Running,
                actor,
                "units registered",
            )
            .await
        {
            // Another call finishing the same start got there first.
            Err(TrackerError::Precondition(_))
                if self.load_run(run_id).await?.0.status != RunStatus::Queued => {}
            other => other?,
        }
        self.maybe_finish_run(run_id, actor).await
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
            let mut ops = run_puts(&run, Expect::Rev(rev))?;
            ops.push(self.run_transition(&run, Some(from), actor, reason)?);
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
        check_units(units)?;
        let (run, _) = self.load_run(run_id).await?;
        if run.status.is_terminal() {
            return Err(TrackerError::Precondition(format!(
                "run {run_id} is {:?}; units can only be added to an active run",
                run.status
            )));
        }
        self.add_units_to(run_id, units, actor).await?;
        let keys: Vec<&str> = units.iter().map(|u| u.unit_key.as_str()).collect();
        self.units_by_key(run_id, &keys).await
    }

    async fn add_units_to(
        &self,
        run_id: &str,
        units: &[UnitSpec],
        actor: &str,
    ) -> TrackerResult<()> {
        for chunk in units.chunks(UNIT_BATCH) {
            self.retrying("add units", || self.add_unit_batch(run_id, chunk, actor))
                .await?;
        }
        Ok(())
    }

    /// Registers the units of `chunk` not yet in the run, in one transaction
    /// with the run's unfinished-unit count and a check of the run's
    /// revision, so no unit joins a run that ended meanwhile. `None` on a
    /// conflict.
    async fn add_unit_batch(
        &self,
        run_id: &str,
        chunk: &[UnitSpec],
        actor: &str,
    ) -> TrackerResult<Option<()>> {
        let (run, run_rev) = self.load_run(run_id).await?;
        if run.status.is_terminal() {
            return Err(TrackerError::Precondition(format!(
                "run {run_id} is {:?}; units can only be added to an active run",
                run.status
            )));
        }
        let migration = run.job_kind == JobKind::UnitMigration;
        let pk = run_pk(run_id);
        let now = Utc::now();
        let mut ops = Vec::with_capacity(chunk.len() * 3 + 2);
        let mut opened = 0;
        for spec in chunk {
            let unit_sk = format!("unit#{}", spec.unit_key);
            if self.kv.get(&pk, &unit_sk).await?.is_some() {
                continue;
            }
            let done = migration
                && self
                    .kv
                    .get(&job_pk(&run.job_name), &format!("done#{}", spec.unit_key))
                    .await?
                    .is_some();
            let keep_migrated = done && !run.force_remigrate;
            let unit = new_unit(&run, spec, keep_migrated, now);
            let reason = match (done, run.force_remigrate) {
                (true, false) => "already MIGRATED by an earlier run; not claimed again",
                (true, true) => {
                    "force_remigrate: migrating again although an earlier run MIGRATED it"
                }
                _ => "registered",
            };
            ops.push(put(&pk, &unit_sk, &unit, Expect::Absent)?);
            if !keep_migrated {
                opened += 1;
                ops.push(Op::Put {
                    pk: pk.clone(),
                    sk: format!("q#{}", unit.unit_key),
                    // The unit is created at revision 1 in this transaction.
                    body: queue_body_with(&unit, 1)?,
                    expect: Expect::Absent,
                });
            }
            ops.push(self.unit_transition(&unit, None, actor, reason, 0)?);
        }
        if ops.is_empty() {
            return Ok(Some(()));
        }
        if opened > 0 {
            let (open, expect) = self.open_units(run_id).await?;
            ops.push(open_units_op(run_id, open + opened, expect));
        }
        ops.push(Op::Check {
            pk: job_pk(&run.job_name),
            sk: format!("run#{run_id}"),
            expect: Expect::Rev(run_rev),
        });
        self.apply(ops).await
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
            let mut ops = run_puts(&run, Expect::Rev(rev))?;
            ops.extend(job_puts(&job, Expect::Rev(job_rev))?);
            ops.push(self.run_transition(&run, Some(RunStatus::Failed), actor, reason)?);
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

/// A unit as registered: waiting, or MIGRATED already when an earlier run
/// of a unit migration migrated it.
fn new_unit(run: &Run, spec: &UnitSpec, keep_migrated: bool, now: DateTime<Utc>) -> Unit {
    Unit {
        run_id: run.run_id.clone(),
        job_name: run.job_name.clone(),
        unit_key: spec.unit_key.clone(),
        status: if keep_migrated {
            UnitStatus::Migrated
        } else {
            UnitStatus::NotMigrated
        },
        checkpoint: spec.checkpoint.clone(),
        progress: Progress::default(),
        last_error: String::new(),
        attempts: 0,
        fencing_token: 0,
        lease: None,
        after_unit_keys: spec.after_unit_keys.clone(),
        result: None,
        create_time: now,
        update_time: now,
        retry_time: None,
    }
}

/// The unit stored at `pk`/`sk`, if any.
async fn read_unit(kv: Arc<dyn KvStore>, pk: String, sk: String) -> TrackerResult<Option<Unit>> {
    match kv.get(&pk, &sk).await? {
        Some(entry) => parse(&entry).map(Some),
        None => Ok(None),
    }
}
