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
//! - `run#<id>` / `#open`: how many of its units are unfinished (`finish`)
//! - `run#<id>` / `q#<key>`: the unit is waiting to be claimed (body: the
//!   units it waits for, JSON, when any; for a small unit, a copy of it at
//!   its revision instead, written with it: see `deps`)
//! - `run#<id>` / `q`: a copy of the run, written with it (runs created
//!   before #16.5 have none): it sorts before every `q#<key>`, so the one
//!   Query a claim makes over the queue (prefix `q`) reads the run as well
//! - `run#<id>` / `q!`: while the run is its job's active run, a copy of
//!   the job, written with it (see `job_puts`; none for a job over 8 KiB):
//!   it sorts between the run's copy and its queue, so that same Query
//!   reads the job as well
//! - `run#<id>` / `p#<key>`: the unit is leased (body: lease expiry, µs)
//! - `active` / `<run id>`: a QUEUED or RUNNING run (what workers poll)
//!
//! Every change is a conditional write on the revision read, retried on
//! conflict, so any number of job-tracker replicas can share one store.

mod deps;
mod finish;
mod history;
mod jobs;
mod leases;
mod routes;
mod runs;
mod schedules;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tidemark_kit::CancellationToken;
use tokio::sync::Notify;

use crate::error::{TrackerError, TrackerResult};
use crate::kv::{Entry, Expect, KvError, KvStore, Op};
use crate::model::{Job, JobKind, Run, RunTrigger, Spec, Unit, UnitCounts};

const JOBS: &str = "jobs";
const ACTIVE: &str = "active";
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

/// Sort key, in a run's partition, of the copy of the run at the head of
/// its queue (see the records above).
const RUN_COPY: &str = "q";

/// The writes of a run: its record, under `expect`, and its copy at the
/// head of its queue. Every write of a run goes through here, so a copy
/// that exists is the run as it stands.
fn run_puts(run: &Run, expect: Expect) -> TrackerResult<Vec<Op>> {
    Ok(vec![
        put(
            &job_pk(&run.job_name),
            &format!("run#{}", run.run_id),
            run,
            expect,
        )?,
        put(&run_pk(&run.run_id), RUN_COPY, run, Expect::Any)?,
    ])
}

/// Sort key, in a run's partition, of the copy of its job while the run is
/// the job's active one: between the run's copy (`q`) and its queue
/// (`q#<key>`).
const JOB_COPY: &str = "q!";

/// The largest job (as stored) copied into its active run's partition. A
/// claim reads the copy every time, so a larger one would cost more read
/// capacity per claim than the claim's other reads; such a job is read on
/// its own at most once a second ([`JOB_FRESH`]) instead.
const JOB_COPY_MAX_BYTES: usize = 8 * 1024;

/// The writes of a job: its record, under `expect`, and, while it has an
/// active run, its copy in that run's partition (removed instead when the
/// job is larger than [`JOB_COPY_MAX_BYTES`]). Every write of a job goes
/// through here, so a copy whose `active_run_id` names the run it is in is
/// the job as it stands (a copy left in a run that ended no longer names
/// it: the job's write that ended it cleared `active_run_id`).
fn job_puts(job: &Job, expect: Expect) -> TrackerResult<Vec<Op>> {
    let body = to_body(job)?;
    let copy = job.active_run_id.as_ref().map(|run_id| {
        if body.len() <= JOB_COPY_MAX_BYTES {
            Op::Put {
                pk: run_pk(run_id),
                sk: JOB_COPY.to_owned(),
                body: body.clone(),
                expect: Expect::Any,
            }
        } else {
            delete(&run_pk(run_id), JOB_COPY, Expect::Any)
        }
    });
    let record = Op::Put {
        pk: JOBS.to_owned(),
        sk: job.name.clone(),
        body,
        expect,
    };
    Ok(std::iter::once(record).chain(copy).collect())
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

#[derive(Clone, Debug, Default)]
pub struct UnitSpec {
    pub unit_key: String,
    pub after_unit_keys: Vec<String>,
    /// The checkpoint the unit starts from (its first claim reads it).
    pub checkpoint: Vec<u8>,
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
        /// Switch the unit's route to TARGET in the same write that marks it
        /// MIGRATED (UNIT_MIGRATION jobs).
        route_to_target: bool,
        /// Explicit-completion runs: how the run ends once no unit is open.
        end_run: Option<crate::model::RunEnd>,
    },
    Failed {
        error: String,
        retryable: bool,
        rolled_back: bool,
    },
}

impl UnitOutcome {
    /// Completed, without a result, the route left alone.
    pub fn done() -> Self {
        Self::Completed {
            result: None,
            route_to_target: false,
            end_run: None,
        }
    }
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
    /// Jobs as a worker's hot path last read them (see [`JOB_FRESH`]).
    recent_jobs: std::sync::Mutex<std::collections::HashMap<String, (Job, std::time::Instant)>>,
    /// Bumped by every write of a job here: a read that overlapped one is
    /// not cached (it may predate the write).
    job_writes: AtomicU64,
    /// (run id, unit key) → the unit as this replica last wrote it under a
    /// lease, and the revision that write gave it (#16.5): the holder's
    /// checkpoints and heartbeats write on that revision without reading
    /// the unit first. Only a hint: the write is conditional on the
    /// revision, and one that fails (the unit changed elsewhere) reads the
    /// unit and checks the fence as before.
    held: std::sync::Mutex<std::collections::HashMap<(String, String), (Unit, u64)>>,
    /// The first wait before a unit that failed retryably may be claimed
    /// again ([`Tracker::with_retry_delay`]).
    retry_delay: Duration,
}

/// The longest wait between two attempts of a unit, however many it made.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// The wait before attempt `attempts + 1` of a unit that failed retryably:
/// `first` doubled per attempt made, at most [`MAX_RETRY_DELAY`], jittered
/// down to half of that so units that failed together (a store's outage)
/// do not all come back at the same moment.
pub fn retry_delay(first: Duration, attempts: u32) -> Duration {
    let full = first
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(MAX_RETRY_DELAY);
    full.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// How long a checkpoint or a heartbeat may answer from a job read earlier
/// instead of reading it again (one DynamoDB request per call): a write
/// through this replica replaces it at once, one through another replica
/// shows within this time, so a worker notices a new job revision (a
/// paused pipeline) at most this much later than the heartbeat after it.
/// A claim reads the job's copy with its run (`JOB_COPY`) and refreshes it.
const JOB_FRESH: Duration = Duration::from_secs(1);
/// Cached jobs kept before the stale ones are dropped.
const RECENT_JOBS: usize = 1024;
/// Leased units remembered (see `Tracker::held`) before one is dropped.
const HELD_UNITS: usize = 4096;
/// Units whose checkpoint is larger are not remembered (memory bound).
const HELD_CHECKPOINT_BYTES: usize = 4 * 1024;

impl Tracker {
    pub fn new(kv: Arc<dyn KvStore>, shutdown: CancellationToken) -> Self {
        Self {
            kv,
            changed: Notify::new(),
            shutdown,
            sequence: AtomicU64::new(0),
            run_jobs: std::sync::Mutex::default(),
            recent_jobs: std::sync::Mutex::default(),
            job_writes: AtomicU64::new(0),
            held: std::sync::Mutex::default(),
            retry_delay: Duration::ZERO,
        }
    }

    /// Waits `first` (doubled per attempt, see [`retry_delay`]) before a
    /// unit that failed retryably may be claimed again; none by default.
    #[must_use]
    pub fn with_retry_delay(mut self, first: Duration) -> Self {
        self.retry_delay = first;
        self
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
        let jobs: Vec<String> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put { pk, sk, .. } | Op::Delete { pk, sk, .. } if pk == JOBS => {
                    Some(sk.clone())
                }
                _ => None,
            })
            .collect();
        let applied = self.kv.transact(ops).await;
        // Whatever the outcome (a timeout may have applied it): the next
        // hot-path read of these jobs goes to the store.
        if !jobs.is_empty() {
            self.job_writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut recent = self.recent_jobs.lock().expect("job cache lock");
            for name in &jobs {
                recent.remove(name);
            }
        }
        match applied {
            Ok(()) => Ok(Some(())),
            Err(KvError::Conflict) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The job, read at most [`JOB_FRESH`] ago: for the calls every worker
    /// makes per unit (claim, checkpoint, heartbeat), which only need what
    /// a job says, not its revision in the store for a write.
    async fn recent_job(&self, name: &str) -> TrackerResult<Job> {
        if let Some((job, read)) = self.recent_jobs.lock().expect("job cache lock").get(name)
            && read.elapsed() < JOB_FRESH
        {
            return Ok(job.clone());
        }
        let read = self.job_read_start();
        let (job, _) = self.load_job(name).await?;
        self.keep_job(&job, read);
        Ok(job)
    }

    /// When a read of a job starts, for [`Tracker::keep_job`].
    fn job_read_start(&self) -> (std::time::Instant, u64) {
        (
            std::time::Instant::now(),
            self.job_writes.load(std::sync::atomic::Ordering::SeqCst),
        )
    }

    /// Keeps a job read since `read` for [`Tracker::recent_job`], unless a
    /// write of a job through this replica overlapped the read (it may
    /// predate that write).
    fn keep_job(&self, job: &Job, (at, writes): (std::time::Instant, u64)) {
        let mut recent = self.recent_jobs.lock().expect("job cache lock");
        if self.job_writes.load(std::sync::atomic::Ordering::SeqCst) != writes {
            return;
        }
        if recent.len() >= RECENT_JOBS {
            recent.retain(|_, (_, at)| at.elapsed() < JOB_FRESH);
        }
        recent.insert(job.name.clone(), (job.clone(), at));
    }

    async fn load_job(&self, name: &str) -> TrackerResult<(Job, u64)> {
        let entry = self
            .kv
            .get(JOBS, name)
            .await?
            .ok_or_else(|| TrackerError::NotFound(format!("job {name:?} does not exist")))?;
        Ok((parse(&entry)?, entry.rev))
    }

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

    /// The unit of `fence` as this replica last wrote it, if that write
    /// leased it under `fence`'s token; with the revision it left.
    fn held_unit(&self, fence: &Fence) -> Option<(Unit, u64)> {
        let held = self.held.lock().expect("held units lock");
        let (unit, rev) = held.get(&(fence.run_id.clone(), fence.unit_key.clone()))?;
        let leased = unit.status == crate::model::UnitStatus::InProgress
            && unit
                .lease
                .as_ref()
                .is_some_and(|l| l.fencing_token == fence.fencing_token);
        leased.then(|| (unit.clone(), *rev))
    }

    /// Remembers `unit`, just written under a lease, at revision `rev`.
    fn remember_held(&self, unit: &Unit, rev: u64) {
        let key = (unit.run_id.clone(), unit.unit_key.clone());
        let mut held = self.held.lock().expect("held units lock");
        if unit.checkpoint.len() > HELD_CHECKPOINT_BYTES {
            held.remove(&key);
            return;
        }
        if held.len() >= HELD_UNITS
            && !held.contains_key(&key)
            && let Some(any) = held.keys().next().cloned()
        {
            held.remove(&any);
        }
        held.insert(key, (unit.clone(), rev));
    }

    fn forget_held(&self, run_id: &str, unit_key: &str) {
        self.held
            .lock()
            .expect("held units lock")
            .remove(&(run_id.to_owned(), unit_key.to_owned()));
    }

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
}
