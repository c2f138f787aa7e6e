//! The transition log: every change of a job, run, unit or route is
//! recorded with who made it and why, so an operator can replay what happened.

use chrono::Utc;
use tidemark_kit::FieldError;

use super::{Tracker, job_pk, micros, parse, put, run_pk};
use crate::error::TrackerResult;
use crate::kv::{Expect, Op, query_all};
use crate::model::{Change, Run, RunStatus, Transition, Unit, UnitStatus};
use std::sync::atomic::Ordering;

impl Tracker {
    /// A transition record. Sort keys are time-ordered, made unique across
    /// replicas by a random suffix.
    pub(super) fn transition(&self, pk: &str, mut t: Transition) -> TrackerResult<Op> {
        let now = micros(t.time).max(0).unsigned_abs();
        let local = self.sequence.fetch_add(1, Ordering::Relaxed) % 1000;
        t.sequence = now * 1000 + local;
        let sk = format!("t#{:020}#{:08x}", t.sequence, rand::random::<u32>());
        put(pk, &sk, &t, Expect::Absent)
    }

    pub(super) fn run_transition(
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

    pub(super) fn unit_transition(
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

    /// Transitions of a job, a run or a unit, oldest first.
    pub async fn list_transitions(
        &self,
        job_name: &str,
        run_id: &str,
        unit_key: &str,
    ) -> TrackerResult<Vec<Transition>> {
        self.transitions_after(job_name, run_id, unit_key, None, usize::MAX)
            .await
    }

    /// Transitions of a job, a run or a unit after the sequence `after`,
    /// oldest first: every one there is up to the `want`-th, and perhaps
    /// some after it. Each partition (the job's, each run's) is read from
    /// `after` on and only until it gave `want`, so paging through a long
    /// history does not read all of it for every page.
    pub async fn transitions_after(
        &self,
        job_name: &str,
        run_id: &str,
        unit_key: &str,
        after: Option<u64>,
        want: usize,
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
        let keep = |t: &Transition| {
            (run_id.is_empty() || t.run_id == run_id)
                && (unit_key.is_empty() || t.unit_key == unit_key)
        };
        let mut partitions = vec![job_pk(&job)];
        if run_id.is_empty() {
            for e in query_all(self.kv.as_ref(), &job_pk(&job), "run#").await? {
                partitions.push(run_pk(&e.sk[4..]));
            }
        } else {
            partitions.push(run_pk(run_id));
        }
        let mut out = Vec::new();
        for pk in partitions {
            out.extend(self.partition_after(&pk, after, &keep, want).await?);
        }
        out.sort_by_key(|t| t.sequence);
        Ok(out)
    }

    /// Up to `want` transitions of one partition kept by `keep`, after the
    /// sequence `after`, oldest first.
    async fn partition_after(
        &self,
        pk: &str,
        after: Option<u64>,
        keep: &impl Fn(&Transition) -> bool,
        want: usize,
    ) -> TrackerResult<Vec<Transition>> {
        const READ: usize = 500;
        // Past every sort key of the sequence `after` (its suffix is hex).
        let mut cursor = after.map(|s| format!("t#{s:020}#~"));
        let mut out = Vec::new();
        loop {
            let page = self.kv.query(pk, "t#", cursor.as_deref(), READ).await?;
            for entry in &page {
                let t: Transition = parse(entry)?;
                if keep(&t) {
                    out.push(t);
                    if out.len() >= want {
                        return Ok(out);
                    }
                }
            }
            if page.len() < READ {
                return Ok(out);
            }
            cursor = page.last().map(|e| e.sk.clone());
        }
    }
}
