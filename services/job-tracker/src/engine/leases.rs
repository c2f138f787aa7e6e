//! Leases with fencing tokens (invariant 5): claim, heartbeat, checkpoint,
//! and complete or fail the unit held.

use std::time::Duration;

use chrono::Utc;

use super::deps::{Migrated, queue_body_with, queued};
use super::finish::{asked_end_op, open_units_op};
use super::{
    ACTIVE, ActiveRun, ClaimRequest, Claimed, Fence, JOB_COPY, RUN_COPY, Tracker, UnitOutcome,
    delete, job_pk, micros, parse, put, retry_delay, run_pk,
};
use crate::error::{TrackerError, TrackerResult};
use crate::kv::{Entry, Expect, Op, query_all};
use crate::limits;
use crate::model::{
    Job, JobKind, Lease, Progress, RouteTarget, Run, RunStatus, RunView, Unit, UnitStatus,
};

/// Queue entries a claim reads first: a claimable unit is usually near the
/// front.
const FIRST_PAGE: usize = 32;
/// Entries per further page, read only while every entry so far waited for
/// other units.
const NEXT_PAGE: usize = 500;
/// What a claim queries in a run's partition: the copies of the run
/// (`RUN_COPY`, first) and of its job (`JOB_COPY`), and the queue entries
/// (`q#<key>`) after them.
const QUEUE_SCAN: &str = "q";

/// A page of a run's queue read with the run, for the claim to start with.
struct QueuePage {
    /// As read: may begin with the run's copy.
    entries: Vec<Entry>,
    /// The read returned fewer entries than asked: nothing follows.
    last: bool,
}

/// The result of one attempt to claim one unit (or of a pass over many).
enum ClaimAttempt {
    Claimed(Box<Unit>),
    /// Another claimer wrote first: read the queue again.
    Lost,
    /// Not claimable now (finished, or waiting for its dependencies).
    NotClaimable,
}

impl Tracker {
    /// Claims a unit with a lease, waiting up to `req.wait` for one. `None`
    /// when nothing is claimable (or the server is shutting down).
    pub async fn claim_unit(&self, req: &ClaimRequest) -> TrackerResult<Option<Claimed>> {
        limits::check_worker_id(&req.worker_id)?;
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

    /// The run to claim in, its job and, unless the claim names its unit,
    /// the first page of its queue: one Query reads all three where the run
    /// keeps copies of itself and of its job at the head of its queue
    /// (#16.5). A run without a copy of itself (written before it kept one)
    /// is read as well; one without a copy of its job answers `None` for
    /// it.
    async fn run_to_claim(
        &self,
        run_id: &str,
        req: &ClaimRequest,
    ) -> TrackerResult<(Run, Option<Job>, Option<QueuePage>)> {
        let named = !req.unit_key.is_empty();
        let limit = if named { 2 } else { FIRST_PAGE + 2 };
        let read = self.job_read_start();
        let entries = self
            .kv
            .query(&run_pk(run_id), QUEUE_SCAN, None, limit)
            .await?;
        let last = entries.len() < limit;
        let mut run = None;
        let mut job = None;
        for entry in entries.iter().take(2) {
            match entry.sk.as_str() {
                RUN_COPY => run = Some(parse::<Run>(entry)?),
                JOB_COPY => job = Some(parse::<Job>(entry)?),
                _ => {}
            }
        }
        let run = match run {
            Some(run) => run,
            None => self.load_run(run_id).await?.0,
        };
        // A copy left in a run that is no longer the job's active one is
        // not the job as it stands: the job's later writes skipped it.
        let job = job.filter(|j| j.active_run_id.as_deref() == Some(run_id));
        if let Some(job) = &job {
            self.keep_job(job, read);
        }
        Ok((run, job, (!named).then_some(QueuePage { entries, last })))
    }

    async fn try_claim(&self, req: &ClaimRequest) -> TrackerResult<Option<Claimed>> {
        for run_id in self.candidate_runs(req).await? {
            let (run, job, first_page) = match self.run_to_claim(&run_id, req).await {
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
            let job = match job {
                Some(job) => job,
                None => self.recent_job(&run.job_name).await?,
            };
            if let Some(unit) = self.claim_in_run(&run, &job, req, first_page).await? {
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
        mut first_page: Option<QueuePage>,
    ) -> TrackerResult<Option<Unit>> {
        let pk = run_pk(&run.run_id);
        for _ in 0..16 {
            let mut seen = Migrated::default();
            let mut lost = false;
            if !req.unit_key.is_empty() {
                match self
                    .claim_one(run, &req.unit_key, req, true, &mut seen, None)
                    .await?
                {
                    ClaimAttempt::Claimed(unit) => return Ok(Some(*unit)),
                    ClaimAttempt::Lost => continue,
                    ClaimAttempt::NotClaimable => return Ok(None),
                }
            }
            let cap = job.max_concurrent_units as usize;
            if cap == 0 || self.kv.query(&pk, "p#", None, cap).await?.len() < cap {
                match self
                    .claim_queued(run, req, &mut seen, first_page.take())
                    .await?
                {
                    ClaimAttempt::Claimed(unit) => return Ok(Some(*unit)),
                    ClaimAttempt::Lost => lost = true,
                    ClaimAttempt::NotClaimable => {}
                }
            }
            // Leases that expired: their holders died; anyone may take over.
            // Looked at even while units wait in the queue: they may wait
            // for one of these.
            let now = micros(Utc::now());
            let expired: Vec<String> = query_all(self.kv.as_ref(), &pk, "p#")
                .await?
                .into_iter()
                .filter(|e| e.body.parse::<i64>().is_ok_and(|exp| exp < now))
                .map(|e| e.sk[2..].to_owned())
                .collect();
            for key in expired {
                match self
                    .claim_one(run, &key, req, false, &mut seen, None)
                    .await?
                {
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

    /// Claims the first claimable unit of the queue, paging past units that
    /// wait for others (#19.8): their entries name what they wait for, so
    /// passing one reads no unit, and each unit waited for is read once.
    /// Starts with `first_page` when given (read with the run).
    async fn claim_queued(
        &self,
        run: &Run,
        req: &ClaimRequest,
        seen: &mut Migrated,
        mut first_page: Option<QueuePage>,
    ) -> TrackerResult<ClaimAttempt> {
        let pk = run_pk(&run.run_id);
        let mut after: Option<String> = None;
        let mut lost = false;
        loop {
            let (mut page, last_page) = if let Some(first) = first_page.take() {
                (first.entries, first.last)
            } else {
                let limit = if after.is_none() {
                    FIRST_PAGE
                } else {
                    NEXT_PAGE
                };
                let page = self
                    .kv
                    .query(&pk, QUEUE_SCAN, after.as_deref(), limit)
                    .await?;
                let last_page = page.len() < limit;
                (page, last_page)
            };
            after = page.last().map(|e| e.sk.clone());
            // The run's copy heads the range: not a unit.
            page.retain(|e| e.sk.starts_with("q#"));
            // Start at a random entry: concurrent claimers then rarely race
            // for the same unit.
            if !page.is_empty() {
                let offset = rand::random::<u32>() as usize % page.len();
                page.rotate_left(offset);
            }
            for entry in page {
                let says = queued(&entry.body);
                if let Some(waits_for) = &says.after
                    && !self.all_migrated(&run.run_id, waits_for, seen).await?
                {
                    continue;
                }
                let key = &entry.sk[2..];
                let copied = says.unit.is_some();
                let mut attempt = self
                    .claim_one(run, key, req, false, seen, says.unit)
                    .await?;
                if matches!(attempt, ClaimAttempt::Lost) && copied {
                    // The copy was stale (the unit changed since) or another
                    // claimer won: read the unit to tell which.
                    attempt = self.claim_one(run, key, req, false, seen, None).await?;
                }
                match attempt {
                    ClaimAttempt::Claimed(unit) => return Ok(ClaimAttempt::Claimed(unit)),
                    ClaimAttempt::Lost => lost = true,
                    ClaimAttempt::NotClaimable => {}
                }
            }
            if last_page {
                return Ok(if lost {
                    ClaimAttempt::Lost
                } else {
                    ClaimAttempt::NotClaimable
                });
            }
        }
    }

    /// One claim attempt of one unit: of `copy`, the unit at a revision as
    /// its queue entry carries it, when given (the write is conditional on
    /// that revision, so a stale copy loses like a race), else as read.
    async fn claim_one(
        &self,
        run: &Run,
        key: &str,
        req: &ClaimRequest,
        explicit: bool,
        seen: &mut Migrated,
        copy: Option<(Unit, u64)>,
    ) -> TrackerResult<ClaimAttempt> {
        let (mut unit, rev) = match copy {
            Some(copy) => copy,
            None => self.load_unit(&run.run_id, key).await?,
        };
        let now = Utc::now();
        let expired = unit.lease.as_ref().is_none_or(|l| l.expire_time < now);
        // A unit that failed retryably waits out its delay, unless named.
        let waiting = !explicit && unit.retry_time.is_some_and(|t| t > now);
        let claimable = match unit.status {
            UnitStatus::NotMigrated => !waiting,
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
        if !self
            .all_migrated(&run.run_id, &unit.after_unit_keys, seen)
            .await?
        {
            return Ok(ClaimAttempt::NotClaimable);
        }
        let pk = run_pk(&run.run_id);
        let from = unit.status;
        let mut ops = Vec::with_capacity(4);
        unit.attempts += 1;
        unit.fencing_token += 1;
        unit.update_time = now;
        unit.retry_time = None;
        // A migration unit out of attempts may hold a partial copy in the
        // target: it gets up to `max_attempts` more leases, for a worker to
        // remove that copy and fail it rolled back (one clean-up lease was
        // not enough in the fault matrix: it lapsed under a slow-close of
        // the job-tracker's connections), before it is failed as it stands.
        let migration = run.job_kind == JobKind::UnitMigration;
        let clean_up = migration
            && unit.attempts > run.max_attempts
            && unit.attempts <= run.max_attempts.saturating_mul(2);
        if unit.attempts > run.max_attempts && !clean_up {
            unit.status = UnitStatus::Failed;
            unit.lease = None;
            unit.last_error = if migration {
                format!(
                    "gave up after {0} attempts and {0} clean-up attempts whose leases lapsed; the target may still hold part of the unit (remove it, or run the unit again with force_remigrate){1}",
                    run.max_attempts,
                    if unit.last_error.is_empty() {
                        String::new()
                    } else {
                        format!("; last error: {}", unit.last_error)
                    }
                )
            } else if unit.last_error.is_empty() {
                format!(
                    "gave up after {} attempts: each attempt's lease lapsed before its worker finished (workers killed, or cut off from the job-tracker)",
                    run.max_attempts
                )
            } else {
                format!(
                    "gave up after {} attempts; last error: {}",
                    run.max_attempts, unit.last_error
                )
            };
            let (open, expect) = self.open_units(&run.run_id).await?;
            ops.push(put(&pk, &format!("unit#{key}"), &unit, Expect::Rev(rev))?);
            ops.push(delete(&pk, &format!("q#{key}"), Expect::Any));
            ops.push(delete(&pk, &format!("p#{key}"), Expect::Any));
            ops.push(open_units_op(&run.run_id, open.saturating_sub(1), expect));
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
        let reason = if clean_up {
            "out of attempts; leased again to remove its partial copy"
        } else if from == UnitStatus::InProgress {
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
            Some(()) => {
                self.remember_held(&unit, rev + 1);
                ClaimAttempt::Claimed(Box::new(unit))
            }
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
        if let Some(c) = &checkpoint {
            limits::check_checkpoint(c)?;
        }
        if let Some(p) = &progress {
            limits::check_counters(&p.counters)?;
        }
        let (lease, job_name) = self
            .retrying("checkpoint", || async {
                // The unit as this replica last wrote it under this lease
                // needs no read (#16.5): the write below is conditional on
                // its revision, and fails if anything wrote the unit since.
                let (mut unit, rev) = match self.held_unit(fence) {
                    Some(held) => held,
                    None => self.fenced(fence).await?,
                };
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
                match self.apply(ops).await {
                    Ok(Some(())) => {
                        self.remember_held(&unit, rev + 1);
                        Ok(Some((
                            unit.lease.clone().expect("leased"),
                            unit.job_name.clone(),
                        )))
                    }
                    // Changed meanwhile (reclaimed, finished, written by
                    // another replica): the next attempt reads it and checks
                    // the fence.
                    Ok(None) => {
                        self.forget_held(&fence.run_id, &fence.unit_key);
                        Ok(None)
                    }
                    Err(e) => {
                        self.forget_held(&fence.run_id, &fence.unit_key);
                        Err(e)
                    }
                }
            })
            .await?;
        let job = self.recent_job(&job_name).await?;
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
        let outcome = capped(outcome, progress.as_ref())?;
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
                // A repeat of the CompleteUnit that completed the unit (its
                // answer was lost and the worker sent it again under the same
                // token) gets the same answer, not "lease lost".
                if matches!(outcome, UnitOutcome::Completed { .. })
                    && unit.status == UnitStatus::Migrated
                    && unit.fencing_token == fence.fencing_token
                {
                    return Ok(Some(unit));
                }
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
                        // As documented: a retryable failure goes back to
                        // the queue while attempts remain, rolled back or
                        // not (a unit whose partial copy was removed starts
                        // clean); `rolled_back` says how it ends otherwise.
                        if *retryable && unit.attempts < run.max_attempts {
                            let wait = retry_delay(self.retry_delay, unit.attempts);
                            unit.retry_time = (!wait.is_zero()).then(|| {
                                Utc::now()
                                    + chrono::Duration::from_std(wait)
                                        .unwrap_or_else(|_| chrono::Duration::seconds(300))
                            });
                            (
                                UnitStatus::NotMigrated,
                                format!(
                                    "retryable failure (attempt {} of {}), claimable again in {:.1} s: {error}",
                                    unit.attempts,
                                    run.max_attempts,
                                    wait.as_secs_f64()
                                ),
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
                // The history names the holder that finished the unit (the
                // RPC does not carry a worker id; its fencing token does).
                let holder = unit.lease.take().map(|l| l.owner);
                let actor = holder.as_deref().unwrap_or(actor);
                unit.update_time = Utc::now();
                if let UnitOutcome::Completed { result, .. } = &outcome {
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
                        // The unit's write above takes it to `rev + 1`.
                        body: queue_body_with(&unit, rev + 1)?,
                        expect: Expect::Any,
                    });
                }
                if !from.is_terminal() && to.is_terminal() {
                    let (open, expect) = self.open_units(&fence.run_id).await?;
                    ops.push(open_units_op(&fence.run_id, open.saturating_sub(1), expect));
                }
                // How the run ends, with the completion that asks it: a
                // worker that dies right after leaves it to the next claim.
                if let UnitOutcome::Completed {
                    end_run: Some(end), ..
                } = &outcome
                    && run.explicit_completion
                {
                    ops.push(asked_end_op(&fence.run_id, &fence.unit_key, end)?);
                }
                // Readers move in the write that commits the unit: a worker
                // that dies after CompleteUnit cannot leave a MIGRATED unit
                // with readers on the source.
                if to == UnitStatus::Migrated && run.job_kind == JobKind::UnitMigration {
                    if matches!(
                        outcome,
                        UnitOutcome::Completed {
                            route_to_target: true,
                            ..
                        }
                    ) {
                        let (_, route_ops) = self
                            .route_write(
                                &run.job_name,
                                &fence.unit_key,
                                RouteTarget::Target,
                                0,
                                actor,
                                &format!("unit migrated in run {}", run.run_id),
                            )
                            .await?;
                        ops.extend(route_ops);
                    }
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
        self.forget_held(&fence.run_id, &fence.unit_key);
        self.maybe_finish_run(&fence.run_id, actor).await?;
        Ok((unit, self.get_run(&fence.run_id).await?))
    }
}

/// `outcome` within the size caps: a result or counters over theirs are
/// refused, an error longer than its cap is truncated (a worker can always
/// report a failure).
fn capped(outcome: UnitOutcome, progress: Option<&Progress>) -> TrackerResult<UnitOutcome> {
    if let Some(p) = progress {
        limits::check_counters(&p.counters)?;
    }
    Ok(match outcome {
        UnitOutcome::Completed {
            result,
            route_to_target,
            end_run,
        } => {
            limits::check_result(result.as_ref(), "result")?;
            let end_run = end_run.map(|e| crate::model::RunEnd {
                error: e.error.map(|error| limits::truncate_error(&error)),
                last_processed: e.last_processed,
            });
            UnitOutcome::Completed {
                result,
                route_to_target,
                end_run,
            }
        }
        UnitOutcome::Failed {
            error,
            retryable,
            rolled_back,
        } => UnitOutcome::Failed {
            error: limits::truncate_error(&error),
            retryable,
            rolled_back,
        },
    })
}
