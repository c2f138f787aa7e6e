//! Leases with fencing tokens (invariant 5): claim, heartbeat, checkpoint,
//! and complete or fail the unit held.

use std::time::Duration;

use chrono::Utc;

use super::{
    ACTIVE, ActiveRun, ClaimRequest, Claimed, Fence, Tracker, UnitOutcome, delete, job_pk, micros,
    parse, put, run_pk,
};
use crate::error::{TrackerError, TrackerResult};
use crate::kv::{Expect, Op, query_all};
use crate::model::{Job, JobKind, Lease, Progress, Run, RunStatus, RunView, Unit, UnitStatus};

/// The result of one attempt to claim one unit.
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
}
