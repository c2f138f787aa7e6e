//! Every rule of the job-tracker, written once over a [`KvStore`]: the run
//! and unit state machines, leases with fencing tokens, the failure gate,
//! never re-migrating a MIGRATED unit, routes and the transition history.
//!
//! Records (partition key / sort key):
//! - `jobs` / `<name>`: the job
//! - `job#<name>` / `run#<run id>`: a run (ids are time-ordered UUIDv7)
//! - `job#<name>` / `route#<unit key>`: a route (`route#` alone: job-wide)
//! - `job#<name>` / `done#<unit key>`: the unit was MIGRATED (unit migrations)
//! - `job#<name>` / `corr#<id>`: correlation id → run id
//! - `job#<name>` / `t#…`, `run#<id>` / `t#…`: transitions
//! - `run#<id>` / `#run`: the run's job name
//! - `run#<id>` / `unit#<key>`: a unit
//! - `run#<id>` / `q#<key>`: the unit is waiting to be claimed
//! - `run#<id>` / `p#<key>`: the unit is leased (body: lease expiry, µs)
//! - `active` / `<run id>`: a QUEUED or RUNNING run (what workers poll)
//!
//! Every change is a conditional write on the revision read, retried on
//! conflict, so any number of job-tracker replicas can share one store.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tidemark_kit::CancellationToken;
use tidemark_kit::FieldError;
use tokio::sync::Notify;

use crate::error::{TrackerError, TrackerResult};
use crate::kv::{Entry, Expect, KvError, KvStore, Op, query_all};
use crate::model::{
    Acknowledgement, Change, Job, JobKind, Lease, Progress, Route, RouteTarget, Run, RunStatus,
    RunTrigger, RunView, Spec, Transition, Unit, UnitCounts, UnitStatus, Watermark,
};

const JOBS: &str = "jobs";
const ACTIVE: &str = "active";
/// Units registered per transaction: each writes up to three records (unit,
/// queue entry, transition) and DynamoDB allows 100 per transaction.
const UNIT_BATCH: usize = 30;
const CONFLICT_RETRIES: usize = 64;

fn job_pk(name: &str) -> String {
    format!("job#{name}")
}

fn run_pk(run_id: &str) -> String {
    format!("run#{run_id}")
}

fn to_body<T: Serialize>(value: &T) -> TrackerResult<String> {
    Ok(serde_json::to_string(value)?)
}

fn parse<T: DeserializeOwned>(entry: &Entry) -> TrackerResult<T> {
    Ok(serde_json::from_str(&entry.body)?)
}

fn put<T: Serialize>(pk: &str, sk: &str, value: &T, expect: Expect) -> TrackerResult<Op> {
    Ok(Op::Put {
        pk: pk.to_owned(),
        sk: sk.to_owned(),
        body: to_body(value)?,
        expect,
    })
}

fn delete(pk: &str, sk: &str, expect: Expect) -> Op {
    Op::Delete {
        pk: pk.to_owned(),
        sk: sk.to_owned(),
        expect,
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// An entry in the `active` partition.
#[derive(Serialize, Deserialize)]
struct ActiveRun {
    job_name: String,
    kind: JobKind,
}

/// What a new job is made of (the caller validated it).
#[derive(Clone, Debug)]
pub struct NewJob {
    pub name: String,
    pub kind: JobKind,
    pub description: String,
    pub spec: Option<Spec>,
    pub schedule: Option<crate::model::Schedule>,
    pub default_unit_keys: Vec<String>,
    pub explicit_completion: bool,
    pub max_attempts: u32,
    pub max_concurrent_units: u32,
}

#[derive(Clone, Debug)]
pub struct UnitSpec {
    pub unit_key: String,
    pub after_unit_keys: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct StartRun {
    pub job_name: String,
    pub units: Vec<UnitSpec>,
    pub trigger: RunTrigger,
    pub correlation_id: String,
    pub actor: String,
    pub reason: String,
    pub force_remigrate: bool,
    pub window_start: Option<DateTime<Utc>>,
    pub scheduled_time: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Default)]
pub struct ClaimRequest {
    pub worker_id: String,
    pub kinds: Vec<JobKind>,
    pub job_name: String,
    pub run_id: String,
    pub unit_key: String,
    pub lease: Duration,
    pub wait: Duration,
}

/// A unit together with the run and job it belongs to. The run comes
/// without unit counts: computing them reads every unit, which a claim on
/// the hot path must not do (`get_run` gives them).
#[derive(Clone, Debug)]
pub struct Claimed {
    pub unit: Unit,
    pub run: Run,
    pub job: Job,
}

/// See [`Tracker::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    pub active_runs: u64,
    pub blocked_jobs: u64,
    pub units: UnitCounts,
}

/// The result of one attempt to claim one unit.
enum ClaimAttempt {
    Claimed(Box<Unit>),
    /// Another claimer wrote first: read the queue again.
    Lost,
    /// Not claimable now (finished, or waiting for its dependencies).
    NotClaimable,
}

/// Identifies the holder of a unit's lease.
#[derive(Clone, Debug)]
pub struct Fence {
    pub run_id: String,
    pub unit_key: String,
    pub fencing_token: u64,
}

/// How a unit ends (CompleteUnit / FailUnit).
#[derive(Clone, Debug)]
pub enum UnitOutcome {
    Completed {
        result: Option<Spec>,
    },
    Failed {
        error: String,
        retryable: bool,
        rolled_back: bool,
    },
}

/// The job-tracker's state machine over a store.
pub struct Tracker {
    kv: Arc<dyn KvStore>,
    /// Wakes long-polling claimers and watchers when something changed here.
    changed: Notify,
    shutdown: CancellationToken,
    sequence: AtomicU64,
    /// Run id → job name. Never changes once written, so it is cached to
    /// spare every call on a run the pointer read.
    run_jobs: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl Tracker {
    pub fn new(kv: Arc<dyn KvStore>, shutdown: CancellationToken) -> Self {
        Self {
            kv,
            changed: Notify::new(),
            shutdown,
            sequence: AtomicU64::new(0),
            run_jobs: std::sync::Mutex::default(),
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    pub fn store(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }

    /// Waits until something changed in this replica, `timeout` passed, or
    /// shutdown began.
    pub async fn wait_for_change(&self, timeout: Duration) {
        tokio::select! {
            () = self.changed.notified() => {}
            () = tokio::time::sleep(timeout) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    fn notify(&self) {
        self.changed.notify_waiters();
    }

    /// A transition record. Sort keys are time-ordered, made unique across
    /// replicas by a random suffix.
    fn transition(&self, pk: &str, mut t: Transition) -> TrackerResult<Op> {
        let now = micros(t.time).max(0).unsigned_abs();
        let local = self.sequence.fetch_add(1, Ordering::Relaxed) % 1000;
        t.sequence = now * 1000 + local;
        let sk = format!("t#{:020}#{:08x}", t.sequence, rand::random::<u32>());
        put(pk, &sk, &t, Expect::Absent)
    }

    async fn retrying<T, F, Fut>(&self, what: &str, mut attempt: F) -> TrackerResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = TrackerResult<Option<T>>>,
    {
        for n in 0..CONFLICT_RETRIES {
            match attempt().await {
                Ok(Some(v)) => {
                    self.notify();
                    return Ok(v);
                }
                Ok(None) => {
                    // Lost a race: back off a little, growing with contention.
                    let jitter = rand::random::<u64>() % (1 + 2 * n as u64);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(TrackerError::Unavailable(format!(
            "{what}: too many concurrent writers; retry"
        )))
    }

    /// Runs `ops`: `Some(())` when applied, `None` on a conflict (retry).
    async fn apply(&self, ops: Vec<Op>) -> TrackerResult<Option<()>> {
        match self.kv.transact(ops).await {
            Ok(()) => Ok(Some(())),
            Err(KvError::Conflict) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    // ------------------------------------------------------------ jobs

    async fn load_job(&self, name: &str) -> TrackerResult<(Job, u64)> {
        let entry = self
            .kv
            .get(JOBS, name)
            .await?
            .ok_or_else(|| TrackerError::NotFound(format!("job {name:?} does not exist")))?;
        Ok((parse(&entry)?, entry.rev))
    }

    pub async fn get_job(&self, name: &str) -> TrackerResult<Job> {
        Ok(self.load_job(name).await?.0)
    }

    /// Creates a job; creating the same definition again returns it.
    pub async fn create_job(&self, new: NewJob, actor: &str) -> TrackerResult<Job> {
        let now = Utc::now();
        let job = Job {
            name: new.name.clone(),
            kind: new.kind,
            description: new.description,
            spec: new.spec,
            next_run_time: match &new.schedule {
                Some(s) => crate::schedule::next_fire(s, now)
                    .map_err(|e| FieldError::new("job.schedule.cron", e))?,
                None => None,
            },
            schedule: new.schedule,
            default_unit_keys: new.default_unit_keys,
            explicit_completion: new.explicit_completion,
            max_attempts: new.max_attempts,
            max_concurrent_units: new.max_concurrent_units,
            revision: 1,
            create_time: now,
            update_time: now,
            last_run_id: None,
            blocking_run_id: None,
            active_run_id: None,
            last_processed: None,
            due_since: None,
        };
        let ops = vec![
            put(JOBS, &job.name, &job, Expect::Absent)?,
            self.transition(
                &job_pk(&job.name),
                Transition {
                    sequence: 0,
                    job_name: job.name.clone(),
                    run_id: String::new(),
                    unit_key: String::new(),
                    time: now,
                    actor: actor.to_owned(),
                    reason: "created".to_owned(),
                    fencing_token: 0,
                    change: Change::JobUpdate {
                        revision: 1,
                        fields: vec!["*".to_owned()],
                    },
                },
            )?,
        ];
        if self.apply(ops).await?.is_some() {
            return Ok(job);
        }
        let existing = self.get_job(&job.name).await?;
        let same = existing.kind == job.kind
            && existing.description == job.description
            && existing.spec == job.spec
            && existing.schedule == job.schedule
            && existing.default_unit_keys == job.default_unit_keys
            && existing.explicit_completion == job.explicit_completion
            && existing.max_attempts == job.max_attempts
            && existing.max_concurrent_units == job.max_concurrent_units;
        if same {
            Ok(existing)
        } else {
            Err(TrackerError::AlreadyExists(format!(
                "job {:?} already exists with a different definition; pick another name or use UpdateJob",
                job.name
            )))
        }
    }

    /// A page of jobs in name order, after `after`; the next page token is
    /// the last name when the page was full.
    pub async fn list_jobs(
        &self,
        kind: Option<JobKind>,
        after: Option<&str>,
        limit: usize,
    ) -> TrackerResult<(Vec<Job>, Option<String>)> {
        let limit = limit.max(1);
        let page = self.kv.query(JOBS, "", after, limit).await?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|e| e.sk.clone()))
            .flatten();
        let mut jobs = Vec::with_capacity(page.len());
        for entry in &page {
            let job: Job = parse(entry)?;
            if kind.is_none_or(|k| k == job.kind) {
                jobs.push(job);
            }
        }
        Ok((jobs, next))
    }

    /// Changes the listed fields of a job (revision + 1). `expected` guards
    /// against lost updates when non-zero.
    pub async fn update_job(
        &self,
        patch: NewJob,
        fields: &[String],
        expected: u64,
        actor: &str,
    ) -> TrackerResult<Job> {
        let fields: Vec<String> = fields.to_vec();
        self.retrying("update job", || async {
            let (mut job, rev) = self.load_job(&patch.name).await?;
            if expected != 0 && job.revision != expected {
                return Err(TrackerError::Precondition(format!(
                    "job {:?} is at revision {}, not {expected}; re-read it and retry",
                    job.name, job.revision
                )));
            }
            for field in &fields {
                match field.as_str() {
                    "description" => job.description.clone_from(&patch.description),
                    "spec" => job.spec.clone_from(&patch.spec),
                    "schedule" => {
                        job.schedule.clone_from(&patch.schedule);
                        job.next_run_time = match &job.schedule {
                            Some(s) => crate::schedule::next_fire(s, Utc::now())
                                .map_err(|e| FieldError::new("job.schedule.cron", e))?,
                            None => None,
                        };
                    }
                    "default_unit_keys" => {
                        job.default_unit_keys.clone_from(&patch.default_unit_keys);
                    }
                    "explicit_completion" => job.explicit_completion = patch.explicit_completion,
                    "max_attempts" => job.max_attempts = patch.max_attempts,
                    "max_concurrent_units" => job.max_concurrent_units = patch.max_concurrent_units,
                    other => {
                        return Err(FieldError::new(
                            "update_mask",
                            format!("{other:?} cannot be updated"),
                        )
                        .into());
                    }
                }
            }
            job.revision += 1;
            job.update_time = Utc::now();
            let ops = vec![
                put(JOBS, &job.name, &job, Expect::Rev(rev))?,
                self.transition(
                    &job_pk(&job.name),
                    Transition {
                        sequence: 0,
                        job_name: job.name.clone(),
                        run_id: String::new(),
                        unit_key: String::new(),
                        time: job.update_time,
                        actor: actor.to_owned(),
                        reason: "updated".to_owned(),
                        fencing_token: 0,
                        change: Change::JobUpdate {
                            revision: job.revision,
                            fields: fields.clone(),
                        },
                    },
                )?,
            ];
            Ok(self.apply(ops).await?.map(|()| job))
        })
        .await
    }

    // ------------------------------------------------------------ runs

    async fn run_job_name(&self, run_id: &str) -> TrackerResult<String> {
        if let Some(job) = self.run_jobs.lock().expect("run cache lock").get(run_id) {
            return Ok(job.clone());
        }
        let entry = self
            .kv
            .get(&run_pk(run_id), "#run")
            .await?
            .ok_or_else(|| TrackerError::NotFound(format!("run {run_id:?} does not exist")))?;
        let mut cache = self.run_jobs.lock().expect("run cache lock");
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(run_id.to_owned(), entry.body.clone());
        Ok(entry.body)
    }

    async fn load_run(&self, run_id: &str) -> TrackerResult<(Run, u64)> {
        let job = self.run_job_name(run_id).await?;
        let entry = self
            .kv
            .get(&job_pk(&job), &format!("run#{run_id}"))
            .await?
            .ok_or_else(|| TrackerError::NotFound(format!("run {run_id:?} does not exist")))?;
        Ok((parse(&entry)?, entry.rev))
    }

    pub async fn list_units(&self, run_id: &str) -> TrackerResult<Vec<Unit>> {
        query_all(self.kv.as_ref(), &run_pk(run_id), "unit#")
            .await?
            .iter()
            .map(parse)
            .collect()
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

    fn run_transition(
        &self,
        run: &Run,
        from: Option<RunStatus>,
        actor: &str,
        reason: &str,
    ) -> TrackerResult<Op> {
        self.transition(
            &job_pk(&run.job_name),
            Transition {
                sequence: 0,
                job_name: run.job_name.clone(),
                run_id: run.run_id.clone(),
                unit_key: String::new(),
                time: Utc::now(),
                actor: actor.to_owned(),
                reason: reason.to_owned(),
                fencing_token: 0,
                change: Change::RunStatus {
                    from,
                    to: run.status,
                },
            },
        )
    }

    fn unit_transition(
        &self,
        unit: &Unit,
        from: Option<UnitStatus>,
        actor: &str,
        reason: &str,
        token: u64,
    ) -> TrackerResult<Op> {
        self.transition(
            &run_pk(&unit.run_id),
            Transition {
                sequence: 0,
                job_name: unit.job_name.clone(),
                run_id: unit.run_id.clone(),
                unit_key: unit.unit_key.clone(),
                time: Utc::now(),
                actor: actor.to_owned(),
                reason: reason.to_owned(),
                fencing_token: token,
                change: Change::UnitStatus {
                    from,
                    to: unit.status,
                },
            },
        )
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
    async fn maybe_finish_run(&self, run_id: &str, actor: &str) -> TrackerResult<()> {
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

    /// Records a run that was due but could not start (gate closed, or a
    /// run still active past the schedule's max wait).
    pub async fn record_skipped(
        &self,
        job_name: &str,
        scheduled: DateTime<Utc>,
        reason: &str,
    ) -> TrackerResult<Run> {
        let (job, _) = self.load_job(job_name).await?;
        let run_id = uuid::Uuid::now_v7().to_string();
        let now = Utc::now();
        let run = Run {
            run_id: run_id.clone(),
            job_name: job.name.clone(),
            job_kind: job.kind,
            job_revision: job.revision,
            correlation_id: run_id.clone(),
            trigger: RunTrigger::Schedule,
            actor: "scheduler".to_owned(),
            status: RunStatus::Skipped,
            status_reason: reason.to_owned(),
            create_time: now,
            scheduled_time: Some(scheduled),
            start_time: None,
            finish_time: Some(now),
            window_start: None,
            window_end: None,
            last_processed: None,
            force_remigrate: false,
            explicit_completion: job.explicit_completion,
            max_attempts: job.max_attempts,
            result: None,
            acknowledgement: None,
        };
        self.kv
            .transact(vec![
                put(
                    &job_pk(&job.name),
                    &format!("run#{run_id}"),
                    &run,
                    Expect::Absent,
                )?,
                Op::Put {
                    pk: run_pk(&run_id),
                    sk: "#run".to_owned(),
                    body: job.name.clone(),
                    expect: Expect::Absent,
                },
                self.run_transition(&run, None, "scheduler", reason)?,
            ])
            .await?;
        Ok(run)
    }

    /// Stores the scheduler's bookkeeping on the job (next fire time, since
    /// when the due run waits) if the job did not change meanwhile.
    pub async fn save_schedule_state(&self, job: &Job, rev: u64) -> TrackerResult<bool> {
        Ok(self
            .apply(vec![put(JOBS, &job.name, job, Expect::Rev(rev))?])
            .await?
            .is_some())
    }

    pub async fn load_job_with_rev(&self, name: &str) -> TrackerResult<(Job, u64)> {
        self.load_job(name).await
    }

    // ----------------------------------------------------------- units

    async fn load_unit(&self, run_id: &str, key: &str) -> TrackerResult<(Unit, u64)> {
        let entry = self
            .kv
            .get(&run_pk(run_id), &format!("unit#{key}"))
            .await?
            .ok_or_else(|| {
                TrackerError::NotFound(format!("unit {key:?} of run {run_id} does not exist"))
            })?;
        Ok((parse(&entry)?, entry.rev))
    }

    /// Claims a unit with a lease, waiting up to `req.wait` for one. `None`
    /// when nothing is claimable (or the server is shutting down).
    pub async fn claim_unit(&self, req: &ClaimRequest) -> TrackerResult<Option<Claimed>> {
        let deadline = tokio::time::Instant::now() + req.wait;
        loop {
            if let Some(claimed) = self.try_claim(req).await? {
                return Ok(Some(claimed));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline || self.shutdown.is_cancelled() {
                return Ok(None);
            }
            // Other replicas do not wake us: poll as well.
            self.wait_for_change((deadline - now).min(Duration::from_millis(200)))
                .await;
        }
    }

    async fn candidate_runs(&self, req: &ClaimRequest) -> TrackerResult<Vec<String>> {
        if !req.run_id.is_empty() {
            return Ok(vec![req.run_id.clone()]);
        }
        let mut out = Vec::new();
        for entry in query_all(self.kv.as_ref(), ACTIVE, "").await? {
            let active: ActiveRun = parse(&entry)?;
            if (req.job_name.is_empty() || req.job_name == active.job_name)
                && (req.kinds.is_empty() || req.kinds.contains(&active.kind))
            {
                out.push(entry.sk);
            }
        }
        Ok(out)
    }

    async fn try_claim(&self, req: &ClaimRequest) -> TrackerResult<Option<Claimed>> {
        for run_id in self.candidate_runs(req).await? {
            let (run, _) = match self.load_run(&run_id).await {
                Ok(r) => r,
                Err(TrackerError::NotFound(_)) if req.run_id.is_empty() => continue,
                Err(e) => return Err(e),
            };
            if run.status != RunStatus::Running {
                if !req.run_id.is_empty() && run.status.is_terminal() {
                    return Err(TrackerError::Precondition(format!(
                        "run {run_id} is {:?}; nothing to claim",
                        run.status
                    )));
                }
                continue;
            }
            let job = self.get_job(&run.job_name).await?;
            if let Some(unit) = self.claim_in_run(&run, &job, req).await? {
                return Ok(Some(Claimed { unit, run, job }));
            }
            self.maybe_finish_run(&run_id, &req.worker_id).await?;
        }
        Ok(None)
    }

    /// Claims one unit of `run`: a waiting one first, else one whose lease
    /// expired. Claimers that lose a race for the same candidates read the
    /// queue again rather than report "nothing to claim" while work waits.
    async fn claim_in_run(
        &self,
        run: &Run,
        job: &Job,
        req: &ClaimRequest,
    ) -> TrackerResult<Option<Unit>> {
        let pk = run_pk(&run.run_id);
        let explicit = !req.unit_key.is_empty();
        for _ in 0..16 {
            let mut candidates: Vec<String> = Vec::new();
            if explicit {
                candidates.push(req.unit_key.clone());
            } else {
                let cap = job.max_concurrent_units as usize;
                let below_cap = cap == 0 || self.kv.query(&pk, "p#", None, cap).await?.len() < cap;
                if below_cap {
                    let mut fresh: Vec<String> = self
                        .kv
                        .query(&pk, "q#", None, 32)
                        .await?
                        .into_iter()
                        .map(|e| e.sk[2..].to_owned())
                        .collect();
                    // Start at a random candidate: concurrent claimers then
                    // rarely race for the same unit.
                    if !fresh.is_empty() {
                        let offset = rand::random::<u32>() as usize % fresh.len();
                        fresh.rotate_left(offset);
                    }
                    candidates = fresh;
                }
                if candidates.is_empty() {
                    // Leases that expired: their holders died; anyone may take over.
                    let now = micros(Utc::now());
                    candidates = query_all(self.kv.as_ref(), &pk, "p#")
                        .await?
                        .into_iter()
                        .filter(|e| e.body.parse::<i64>().is_ok_and(|exp| exp < now))
                        .map(|e| e.sk[2..].to_owned())
                        .collect();
                }
            }
            if candidates.is_empty() {
                return Ok(None);
            }
            let mut lost = false;
            for key in candidates {
                match self.claim_one(run, &key, req, explicit).await? {
                    ClaimAttempt::Claimed(unit) => return Ok(Some(*unit)),
                    ClaimAttempt::Lost => lost = true,
                    ClaimAttempt::NotClaimable => {}
                }
            }
            if !lost {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// One claim attempt of one unit.
    async fn claim_one(
        &self,
        run: &Run,
        key: &str,
        req: &ClaimRequest,
        explicit: bool,
    ) -> TrackerResult<ClaimAttempt> {
        let (mut unit, rev) = self.load_unit(&run.run_id, key).await?;
        let now = Utc::now();
        let expired = unit.lease.as_ref().is_none_or(|l| l.expire_time < now);
        let claimable = match unit.status {
            UnitStatus::NotMigrated => true,
            UnitStatus::InProgress => expired,
            _ => false,
        };
        if !claimable {
            if explicit && unit.status.is_terminal() {
                return Err(TrackerError::Precondition(format!(
                    "unit {key:?} of run {} is {:?} and cannot be claimed",
                    run.run_id, unit.status
                )));
            }
            // Leased meanwhile by another claimer: the queue entry we read
            // was already stale.
            return Ok(if unit.status == UnitStatus::InProgress && !explicit {
                ClaimAttempt::Lost
            } else {
                ClaimAttempt::NotClaimable
            });
        }
        for dep in &unit.after_unit_keys {
            let (d, _) = self.load_unit(&run.run_id, dep).await?;
            if d.status != UnitStatus::Migrated {
                return Ok(ClaimAttempt::NotClaimable);
            }
        }
        let pk = run_pk(&run.run_id);
        let from = unit.status;
        let mut ops = Vec::with_capacity(4);
        unit.attempts += 1;
        unit.fencing_token += 1;
        unit.update_time = now;
        if unit.attempts > run.max_attempts {
            unit.status = UnitStatus::Failed;
            unit.lease = None;
            unit.last_error = format!(
                "gave up after {} attempts; last error: {}",
                run.max_attempts, unit.last_error
            );
            ops.push(put(&pk, &format!("unit#{key}"), &unit, Expect::Rev(rev))?);
            ops.push(delete(&pk, &format!("q#{key}"), Expect::Any));
            ops.push(delete(&pk, &format!("p#{key}"), Expect::Any));
            ops.push(self.unit_transition(
                &unit,
                Some(from),
                &req.worker_id,
                "max attempts reached",
                unit.fencing_token,
            )?);
            return Ok(match self.apply(ops).await? {
                Some(()) => ClaimAttempt::NotClaimable,
                None => ClaimAttempt::Lost,
            });
        }
        let lease_for =
            chrono::Duration::from_std(req.lease).unwrap_or_else(|_| chrono::Duration::seconds(30));
        unit.status = UnitStatus::InProgress;
        unit.lease = Some(Lease {
            owner: req.worker_id.clone(),
            fencing_token: unit.fencing_token,
            acquire_time: now,
            expire_time: now + lease_for,
        });
        let expiry = micros(now + lease_for).to_string();
        ops.push(put(&pk, &format!("unit#{key}"), &unit, Expect::Rev(rev))?);
        ops.push(delete(&pk, &format!("q#{key}"), Expect::Any));
        ops.push(Op::Put {
            pk: pk.clone(),
            sk: format!("p#{key}"),
            body: expiry,
            expect: Expect::Any,
        });
        let reason = if from == UnitStatus::InProgress {
            "lease expired; reclaimed"
        } else {
            "claimed"
        };
        ops.push(self.unit_transition(
            &unit,
            Some(from),
            &req.worker_id,
            reason,
            unit.fencing_token,
        )?);
        Ok(match self.apply(ops).await? {
            Some(()) => ClaimAttempt::Claimed(Box::new(unit)),
            None => ClaimAttempt::Lost,
        })
    }

    /// Loads a unit and checks that `fence` still holds its lease.
    async fn fenced(&self, fence: &Fence) -> TrackerResult<(Unit, u64)> {
        let (unit, rev) = self.load_unit(&fence.run_id, &fence.unit_key).await?;
        let holder = unit
            .lease
            .as_ref()
            .filter(|_| unit.status == UnitStatus::InProgress);
        match holder {
            Some(lease) if lease.fencing_token == fence.fencing_token => Ok((unit, rev)),
            Some(lease) => Err(TrackerError::Precondition(format!(
                "stale fencing token {} for unit {:?} of run {}: the lease is now held by {} with token {}",
                fence.fencing_token, fence.unit_key, fence.run_id, lease.owner, lease.fencing_token
            ))),
            None => Err(TrackerError::Precondition(format!(
                "unit {:?} of run {} is {:?} and not leased; token {} is stale",
                fence.unit_key, fence.run_id, unit.status, fence.fencing_token
            ))),
        }
    }

    /// Extends the lease; returns it and the job's current revision.
    pub async fn heartbeat(&self, fence: &Fence, lease: Duration) -> TrackerResult<(Lease, u64)> {
        self.record_progress(fence, None, None, Some(lease)).await
    }

    /// Stores a checkpoint (and progress), optionally extending the lease.
    pub async fn checkpoint(
        &self,
        fence: &Fence,
        checkpoint: Vec<u8>,
        progress: Progress,
        lease: Option<Duration>,
    ) -> TrackerResult<(Lease, u64)> {
        self.record_progress(fence, Some(checkpoint), Some(progress), lease)
            .await
    }

    async fn record_progress(
        &self,
        fence: &Fence,
        checkpoint: Option<Vec<u8>>,
        progress: Option<Progress>,
        extend: Option<Duration>,
    ) -> TrackerResult<(Lease, u64)> {
        let (lease, job_name) = self
            .retrying("checkpoint", || async {
                let (mut unit, rev) = self.fenced(fence).await?;
                let now = Utc::now();
                if let Some(c) = &checkpoint {
                    unit.checkpoint.clone_from(c);
                }
                if let Some(p) = &progress {
                    unit.progress = p.clone();
                }
                unit.update_time = now;
                let pk = run_pk(&fence.run_id);
                let mut ops = Vec::with_capacity(2);
                if let Some(d) = extend {
                    let lease = unit.lease.as_mut().expect("fenced units are leased");
                    lease.expire_time = now
                        + chrono::Duration::from_std(d)
                            .unwrap_or_else(|_| chrono::Duration::seconds(30));
                    ops.push(Op::Put {
                        pk: pk.clone(),
                        sk: format!("p#{}", fence.unit_key),
                        body: micros(lease.expire_time).to_string(),
                        expect: Expect::Any,
                    });
                }
                ops.push(put(
                    &pk,
                    &format!("unit#{}", fence.unit_key),
                    &unit,
                    Expect::Rev(rev),
                )?);
                Ok(self
                    .apply(ops)
                    .await?
                    .map(|()| (unit.lease.clone().expect("leased"), unit.job_name.clone())))
            })
            .await?;
        let job = self.get_job(&job_name).await?;
        Ok((lease, job.revision))
    }

    /// Completes or fails a unit held under `fence`, then ends the run if
    /// that was its last pending unit.
    pub async fn finish_unit(
        &self,
        fence: &Fence,
        outcome: UnitOutcome,
        progress: Option<Progress>,
        actor: &str,
    ) -> TrackerResult<(Unit, RunView)> {
        let unit = self
            .retrying("finish unit", || async {
                let (mut unit, rev) = self.load_unit(&fence.run_id, &fence.unit_key).await?;
                let (run, _) = self.load_run(&fence.run_id).await?;
                // A second FailUnit may confirm the rollback of a FAILED unit.
                let confirming_rollback = matches!(
                    outcome,
                    UnitOutcome::Failed {
                        rolled_back: true,
                        ..
                    }
                ) && unit.status == UnitStatus::Failed
                    && unit.fencing_token == fence.fencing_token;
                if !confirming_rollback {
                    self.fenced(fence).await?;
                }
                let from = unit.status;
                let (to, reason) = match &outcome {
                    UnitOutcome::Completed { .. } => (UnitStatus::Migrated, "completed".to_owned()),
                    UnitOutcome::Failed {
                        error,
                        retryable,
                        rolled_back,
                    } => {
                        unit.last_error.clone_from(error);
                        if *retryable && !rolled_back && unit.attempts < run.max_attempts {
                            (
                                UnitStatus::NotMigrated,
                                format!("retryable failure: {error}"),
                            )
                        } else if *rolled_back {
                            (
                                UnitStatus::RolledBack,
                                format!("failed and rolled back: {error}"),
                            )
                        } else {
                            (UnitStatus::Failed, format!("failed: {error}"))
                        }
                    }
                };
                if !from.can_become(to) {
                    return Err(TrackerError::Precondition(format!(
                        "unit {:?} of run {} is {from:?} and cannot become {to:?}",
                        fence.unit_key, fence.run_id
                    )));
                }
                unit.status = to;
                unit.lease = None;
                unit.update_time = Utc::now();
                if let UnitOutcome::Completed { result } = &outcome {
                    unit.result.clone_from(result);
                }
                if let Some(p) = &progress {
                    unit.progress = p.clone();
                }
                let pk = run_pk(&fence.run_id);
                let mut ops = vec![
                    put(
                        &pk,
                        &format!("unit#{}", fence.unit_key),
                        &unit,
                        Expect::Rev(rev),
                    )?,
                    delete(&pk, &format!("p#{}", fence.unit_key), Expect::Any),
                    self.unit_transition(&unit, Some(from), actor, &reason, fence.fencing_token)?,
                ];
                if to == UnitStatus::NotMigrated {
                    ops.push(Op::Put {
                        pk: pk.clone(),
                        sk: format!("q#{}", fence.unit_key),
                        body: String::new(),
                        expect: Expect::Any,
                    });
                }
                if to == UnitStatus::Migrated && run.job_kind == JobKind::UnitMigration {
                    ops.push(Op::Put {
                        pk: job_pk(&run.job_name),
                        sk: format!("done#{}", fence.unit_key),
                        body: fence.run_id.clone(),
                        expect: Expect::Any,
                    });
                }
                Ok(self.apply(ops).await?.map(|()| unit.clone()))
            })
            .await?;
        self.maybe_finish_run(&fence.run_id, actor).await?;
        Ok((unit, self.get_run(&fence.run_id).await?))
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

    // ---------------------------------------------------------- routes

    pub async fn set_route(
        &self,
        job_name: &str,
        unit_key: &str,
        target: RouteTarget,
        expected: u64,
        actor: &str,
        reason: &str,
    ) -> TrackerResult<Route> {
        self.retrying("set route", || async {
            self.load_job(job_name).await?;
            let sk = format!("route#{unit_key}");
            let existing = self.kv.get(&job_pk(job_name), &sk).await?;
            let (previous, rev) = match &existing {
                Some(e) => (Some(parse::<Route>(e)?), Expect::Rev(e.rev)),
                None => (None, Expect::Absent),
            };
            let current_revision = previous.as_ref().map_or(0, |r| r.revision);
            if expected != 0 && expected != current_revision {
                return Err(TrackerError::Precondition(format!(
                    "route of {unit_key:?} is at revision {current_revision}, not {expected}"
                )));
            }
            let route = Route {
                job_name: job_name.to_owned(),
                unit_key: unit_key.to_owned(),
                target,
                revision: current_revision + 1,
                update_time: Some(Utc::now()),
                actor: actor.to_owned(),
                reason: reason.to_owned(),
            };
            let ops = vec![
                put(&job_pk(job_name), &sk, &route, rev)?,
                self.transition(
                    &job_pk(job_name),
                    Transition {
                        sequence: 0,
                        job_name: job_name.to_owned(),
                        run_id: String::new(),
                        unit_key: unit_key.to_owned(),
                        time: Utc::now(),
                        actor: actor.to_owned(),
                        reason: reason.to_owned(),
                        fencing_token: 0,
                        change: Change::Route {
                            from: previous.map(|p| p.target),
                            to: target,
                            revision: route.revision,
                        },
                    },
                )?,
            ];
            Ok(self.apply(ops).await?.map(|()| route.clone()))
        })
        .await
    }

    /// The unit's route, else the job-wide route, else SOURCE at revision 0.
    pub async fn get_route(&self, job_name: &str, unit_key: &str) -> TrackerResult<Route> {
        self.load_job(job_name).await?;
        for sk in [format!("route#{unit_key}"), "route#".to_owned()] {
            if let Some(e) = self.kv.get(&job_pk(job_name), &sk).await? {
                return parse(&e);
            }
        }
        Ok(Route {
            job_name: job_name.to_owned(),
            unit_key: unit_key.to_owned(),
            target: RouteTarget::Source,
            revision: 0,
            update_time: None,
            actor: String::new(),
            reason: String::new(),
        })
    }

    pub async fn list_routes(&self, job_name: &str) -> TrackerResult<Vec<Route>> {
        self.load_job(job_name).await?;
        query_all(self.kv.as_ref(), &job_pk(job_name), "route#")
            .await?
            .iter()
            .map(parse)
            .collect()
    }

    // ------------------------------------------------------ history

    /// Transitions of a job, a run or a unit, oldest first.
    pub async fn list_transitions(
        &self,
        job_name: &str,
        run_id: &str,
        unit_key: &str,
    ) -> TrackerResult<Vec<Transition>> {
        let job = if run_id.is_empty() {
            job_name.to_owned()
        } else {
            self.run_job_name(run_id).await?
        };
        if job.is_empty() {
            return Err(FieldError::new("job_name", "give a job name or a run id").into());
        }
        self.load_job(&job).await?;
        let mut out: Vec<Transition> = query_all(self.kv.as_ref(), &job_pk(&job), "t#")
            .await?
            .iter()
            .map(parse)
            .collect::<TrackerResult<_>>()?;
        let runs: Vec<String> = if run_id.is_empty() {
            query_all(self.kv.as_ref(), &job_pk(&job), "run#")
                .await?
                .into_iter()
                .map(|e| e.sk[4..].to_owned())
                .collect()
        } else {
            vec![run_id.to_owned()]
        };
        for run in runs {
            for entry in query_all(self.kv.as_ref(), &run_pk(&run), "t#").await? {
                out.push(parse(&entry)?);
            }
        }
        out.retain(|t| {
            (run_id.is_empty() || t.run_id == run_id)
                && (unit_key.is_empty() || t.unit_key == unit_key)
        });
        out.sort_by_key(|t| t.sequence);
        Ok(out)
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

    /// Jobs that have a schedule (the scheduler's work list).
    pub async fn scheduled_jobs(&self) -> TrackerResult<Vec<(Job, u64)>> {
        let mut out = Vec::new();
        for entry in query_all(self.kv.as_ref(), JOBS, "").await? {
            let job: Job = parse(&entry)?;
            if job.schedule.is_some() {
                out.push((job, entry.rev));
            }
        }
        Ok(out)
    }
}
